//! The IPv6 route table the fast path reads (`router_common::fib6`), kept in memory and changed
//! one prefix at a time.
//!
//! The table is a function of the upper 64 bits of the address: ranges of constant route, each
//! prefix up to /64 opening one where it starts and giving the range back to the prefix around
//! it where it ends. `Six` keeps the prefixes sorted by address, and a chunk's ranges are found
//! by sweeping the prefixes inside it with a stack of the ones still open. A chunk with one
//! range is a value, with up to `RANGES` a block, with more a group of 256 smaller chunks.
//!
//! A change marks its prefix's span dirty; `settle` (before the writes are taken) recomputes
//! every chunk the dirty spans touch from the final prefixes of the batch, so that nothing
//! written is an intermediate state. A block is never changed in place: the new ranges go to a
//! fresh block, and the entry pointing to the old one switches in one 32-bit store; the old
//! block and the groups let go wait in quarantine like the IPv4 groups (see `live`). A group
//! whose chunk fits in a block again collapses into one.
//!
//! Prefixes longer than /64 stay in the kernel's LPM trie; the /64 holding one is a range of
//! its own, its value marked `LONG`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use router_common::{
    fib::{GROUP_SIZE, L1_ENTRIES},
    fib6::{BLOCK, INDEX, LONG, NODE, RANGES},
    Block6, Pfx6,
};

use super::live::{wait_for_lookups, Pool, PENDING};

/// The arrays of the IPv6 table as the maps hold them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table6 {
    /// `FIB6_L1`: 65 536 entries.
    pub l1: Vec<u32>,
    /// `FIB6_NODES`, flat: group g is `nodes[g * 256..(g + 1) * 256]` (up to the last in use).
    pub nodes: Vec<u32>,
    /// `FIB6_BLOCKS`, up to the last in use.
    pub blocks: Vec<Block6>,
    /// `FIB6_PFX`, up to the last in use.
    pub pfx: Vec<Pfx6>,
}

impl Table6 {
    pub fn empty() -> Table6 {
        Table6 {
            l1: vec![0; L1_ENTRIES as usize],
            nodes: Vec::new(),
            blocks: Vec::new(),
            pfx: Vec::new(),
        }
    }

    /// The value the fast path finds for the upper 64 bits `hi` (`LONG` possibly set).
    pub fn lookup(&self, hi: u64) -> u32 {
        let mut e = self.l1[(hi >> 48) as usize];
        let mut shift = 40;
        while e & NODE != 0 {
            e = self.nodes[((e & INDEX) as usize) << 8 | ((hi >> shift) & 0xff) as usize];
            shift -= 8;
        }
        if e & BLOCK != 0 {
            let b = &self.blocks[(e & INDEX) as usize];
            let mut i = 0;
            for step in [4, 2, 1] {
                if b.starts[i + step] <= hi {
                    i += step;
                }
            }
            e = b.vals[i];
        }
        e
    }

    /// The groups and blocks the table references (walking from the first level).
    pub fn used(&self) -> (Vec<u32>, Vec<u32>) {
        let (mut nodes, mut blocks) = (Vec::new(), Vec::new());
        let mut todo: Vec<u32> = self
            .l1
            .iter()
            .copied()
            .filter(|e| e & (NODE | BLOCK) != 0)
            .collect();
        while let Some(e) = todo.pop() {
            let i = e & INDEX;
            if e & BLOCK != 0 {
                blocks.push(i);
            } else if e & NODE != 0 {
                nodes.push(i);
                if let Some(g) = self.nodes.get((i as usize) << 8..((i as usize) + 1) << 8) {
                    todo.extend(g.iter().copied().filter(|e| e & (NODE | BLOCK) != 0));
                }
            }
        }
        nodes.sort_unstable();
        blocks.sort_unstable();
        (nodes, blocks)
    }
}

/// How many groups, blocks and prefix elements the maps hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap6 {
    pub nodes: u32,
    pub blocks: u32,
    pub prefixes: u32,
}

/// What changed since the last `take`, in the order it must reach the maps.
#[derive(Debug, Default)]
pub struct Writes6 {
    /// Blocks and groups written whole (fresh ones), then single entries of groups in use,
    /// then entries of the first level.
    pub blocks: Vec<u32>,
    pub nodes: Vec<u32>,
    pub node_entries: Vec<u32>,
    pub l1: Vec<u32>,
    /// Elements of `FIB6_PFX` (for readers of the table; the fast path does not read them).
    pub pfx: Vec<u32>,
}

impl Writes6 {
    pub fn len(&self) -> usize {
        self.blocks.len()
            + self.nodes.len()
            + self.node_entries.len()
            + self.l1.len()
            + self.pfx.len()
    }
}

/// The old table's arrays, while a table is built over it (to keep its numbers).
struct Hints6 {
    old: Table6,
}

/// The IPv6 table in memory (see the module's documentation).
pub struct Six {
    pub t: Table6,
    cap: Cap6,
    /// Prefixes up to /64: (upper 64 bits, length) → (value, element of `FIB6_PFX`). Length 65
    /// marks a /64 holding longer prefixes: → (how many, 0).
    idx: BTreeMap<(u64, u8), (u32, u32)>,
    /// Prefixes per length (0..=64), so that the covering prefix is probed at used lengths only.
    lens: [u32; 65],
    nodes: Pool,
    blocks: Pool,
    /// Prefix elements in use: the first `n_pfx` (kept dense, so that a reader stops at the
    /// first unused one).
    n_pfx: u32,
    /// The settle pass that built each group and block (not revisited in the same pass).
    node_pass: Vec<u32>,
    block_pass: Vec<u32>,
    pass: u32,
    dirty: Vec<(u64, u64)>,
    w: Writes6,
    hints: Option<Hints6>,
}

fn mask(len: u8) -> u64 {
    if len == 0 {
        0
    } else {
        !0u64 << (64 - len as u32)
    }
}

/// The last address of a prefix of length `len` (at most 64) at `a`.
fn last(a: u64, len: u8) -> u64 {
    a | !mask(len)
}

impl Six {
    /// An empty table in maps of capacity `cap`, built over `old` (the maps' table now) when
    /// given: its groups, blocks and prefix elements keep their numbers where they stay.
    pub fn new(cap: Cap6, old: Option<&Table6>) -> Six {
        let (used_nodes, used_blocks) = old.map(Table6::used).unwrap_or_default();
        let hints = old.map(|o| Hints6 { old: o.clone() });
        Six {
            t: Table6::empty(),
            cap,
            idx: BTreeMap::new(),
            lens: [0; 65],
            nodes: Pool::new(cap.nodes, used_nodes),
            blocks: Pool::new(cap.blocks, used_blocks),
            n_pfx: 0,
            node_pass: Vec::new(),
            block_pass: Vec::new(),
            pass: 0,
            dirty: Vec::new(),
            w: Writes6::default(),
            hints,
        }
    }

    /// The build over the old table is done: its numbers not taken are free after a grace
    /// period.
    pub fn end_hints(&mut self) {
        self.hints = None;
    }

    /// Prefixes up to /64 held.
    pub fn len(&self) -> usize {
        self.lens.iter().map(|c| *c as usize).sum()
    }

    /// Sets prefix (`a`, `len`), `len` at most 64, to `val` (nexthop index + 1).
    pub fn set(&mut self, a: u64, len: u8, val: u32) -> Result<()> {
        let slot = match self.idx.get(&(a, len)) {
            Some(&(v, _)) if v == val => return Ok(()),
            Some(&(_, s)) => s,
            None => {
                if self.n_pfx >= self.cap.prefixes {
                    bail!(
                        "the route table needs room for more IPv6 prefixes than the {} this \
                         router's maps hold; destroy and re-apply the router to size its maps \
                         for the table",
                        self.cap.prefixes
                    );
                }
                let s = self.n_pfx;
                self.n_pfx += 1;
                self.lens[len as usize] += 1;
                s
            }
        };
        self.idx.insert((a, len), (val, slot));
        self.put_pfx(
            slot,
            Pfx6 {
                addr: a,
                len_1: len as u32 + 1,
                val,
            },
        );
        self.dirty.push((a, last(a, len)));
        Ok(())
    }

    /// Removes prefix (`a`, `len`); false when absent.
    pub fn remove(&mut self, a: u64, len: u8) -> bool {
        let Some((_, slot)) = self.idx.remove(&(a, len)) else {
            return false;
        };
        self.lens[len as usize] -= 1;
        // The last element moves into the one freed.
        self.n_pfx -= 1;
        let end = self.n_pfx;
        if slot != end {
            let moved = self.t.pfx[end as usize];
            self.put_pfx(slot, moved);
            if let Some(e) = self.idx.get_mut(&(moved.addr, (moved.len_1 - 1) as u8)) {
                e.1 = slot;
            }
        }
        self.put_pfx(end, Pfx6::default());
        self.dirty.push((a, last(a, len)));
        true
    }

    /// One more (`add`) or one fewer prefix longer than /64 in the /64 `a`.
    pub fn long(&mut self, a: u64, add: bool) {
        let e = self.idx.entry((a, 65)).or_insert((0, 0));
        if add {
            e.0 += 1;
            if e.0 > 1 {
                return;
            }
        } else {
            e.0 -= 1;
            if e.0 > 0 {
                return;
            }
            self.idx.remove(&(a, 65));
        }
        self.dirty.push((a, a));
    }

    fn put_pfx(&mut self, slot: u32, p: Pfx6) {
        let i = slot as usize;
        if self.t.pfx.len() <= i {
            let step = 4096;
            let len = (i + 1).div_ceil(step) * step;
            self.t.pfx.resize(
                len.min(self.cap.prefixes as usize).max(i + 1),
                Pfx6::default(),
            );
        }
        self.t.pfx[i] = p;
        self.w.pfx.push(slot);
    }

    /// The value of the longest prefix of length at most `b` covering `a`.
    fn covering(&self, a: u64, b: u8) -> u32 {
        (0..=b)
            .rev()
            .filter(|l| self.lens[*l as usize] != 0)
            .find_map(|l| self.idx.get(&(a & mask(l), l)).map(|v| v.0))
            .unwrap_or(0)
    }

    /// The ranges of chunk [`lo`, `hi`] (the addresses under a prefix of length `b`): (first
    /// address, value), ascending, neighbours with different values.
    fn ranges(&self, lo: u64, hi: u64, b: u8) -> Vec<(u64, u32)> {
        let base = self.covering(lo, b);
        let mut out: Vec<(u64, u32)> = vec![(lo, base)];
        fn emit(out: &mut Vec<(u64, u32)>, s: u64, v: u32) {
            let n = out.len();
            if out[n - 1].0 == s {
                out[n - 1].1 = v;
                if n >= 2 && out[n - 2].1 == v {
                    out.pop();
                }
            } else if out[n - 1].1 != v {
                out.push((s, v));
            }
        }
        // Open prefixes: (last address, value); the chunk itself at the bottom.
        let mut open: Vec<(u64, u32)> = vec![(hi, base)];
        for (&(a, len), &(v, _)) in self.idx.range((lo, b + 1)..=(hi, 65)) {
            while open.len() > 1 && open[open.len() - 1].0 < a {
                let (end, _) = open.pop().expect("open prefix");
                emit(&mut out, end + 1, open[open.len() - 1].1);
            }
            let top = open[open.len() - 1].1;
            let (end, val) = if len == 65 {
                (a, top | LONG)
            } else {
                (last(a, len), v)
            };
            emit(&mut out, a, val);
            open.push((end, val));
        }
        while open.len() > 1 {
            let (end, _) = open.pop().expect("open prefix");
            if end < hi {
                emit(&mut out, end + 1, open[open.len() - 1].1);
            }
        }
        out
    }

    /// The entry the old table had for the chunk at `lo` under a prefix of length `b`.
    fn hint_at(&self, lo: u64, b: u8) -> Option<u32> {
        let h = self.hints.as_ref()?;
        let mut e = h.old.l1[(lo >> 48) as usize];
        let mut level = 16;
        while level < b {
            if e & NODE == 0 {
                return None;
            }
            e = *h
                .old
                .nodes
                .get(((e & INDEX) as usize) << 8 | ((lo >> (56 - level)) & 0xff) as usize)?;
            level += 8;
        }
        Some(e)
    }

    fn alloc(&mut self, node: bool) -> Result<u32> {
        let pool = if node {
            &mut self.nodes
        } else {
            &mut self.blocks
        };
        if let Some(x) = pool.alloc() {
            return Ok(x);
        }
        if pool.waiting() {
            wait_for_lookups();
            self.nodes.promote();
            self.blocks.promote();
            let pool = if node {
                &mut self.nodes
            } else {
                &mut self.blocks
            };
            if let Some(x) = pool.alloc() {
                return Ok(x);
            }
        }
        let (what, have) = if node {
            ("IPv6 route groups", self.cap.nodes)
        } else {
            ("IPv6 route blocks", self.cap.blocks)
        };
        bail!(
            "the route table needs more {what} than the {have} this router's maps hold; \
             destroy and re-apply the router to size its maps for the table"
        )
    }

    fn block_of(rs: &[(u64, u32)]) -> Block6 {
        let mut b = Block6 {
            starts: [u64::MAX; RANGES],
            vals: [rs[rs.len() - 1].1; RANGES],
        };
        for (i, (s, v)) in rs.iter().enumerate() {
            b.starts[i] = *s;
            b.vals[i] = *v;
        }
        b
    }

    /// The entry for chunk [`lo`, `hi`] (length `b`) holding ranges `rs`: a value, a new block
    /// or a new group (with everything below it).
    fn place(&mut self, rs: &[(u64, u32)], lo: u64, b: u8) -> Result<u32> {
        if rs.len() == 1 {
            return Ok(rs[0].1);
        }
        if rs.len() <= RANGES {
            let blk = Six::block_of(rs);
            let hint = self
                .hint_at(lo, b)
                .filter(|e| e & (BLOCK | NODE) == BLOCK)
                .map(|e| e & INDEX);
            let reuse = hint.filter(|h| {
                self.hints
                    .as_ref()
                    .and_then(|x| x.old.blocks.get(*h as usize))
                    == Some(&blk)
            });
            let i = match self.blocks.take_hint(reuse) {
                Some(i) => i,
                None => {
                    let i = self.alloc(false)?;
                    self.w.blocks.push(i);
                    i
                }
            };
            let n = i as usize + 1;
            if self.t.blocks.len() < n {
                let len = n.div_ceil(4096) * 4096;
                self.t.blocks.resize(
                    len.min(self.cap.blocks as usize).max(n),
                    Six::block_of(&[(u64::MAX, 0)]),
                );
                self.block_pass.resize(self.t.blocks.len(), 0);
            }
            self.t.blocks[i as usize] = blk;
            self.block_pass[i as usize] = self.pass;
            return Ok(BLOCK | i);
        }
        debug_assert!(b < 64, "a /64 is one range");
        let hint = self
            .hint_at(lo, b)
            .filter(|e| e & NODE != 0)
            .map(|e| e & INDEX);
        let g = match self.nodes.take_hint(hint) {
            Some(g) => g,
            None => {
                let g = self.alloc(true)?;
                self.w.nodes.push(g);
                g
            }
        };
        let n = (g as usize + 1) * GROUP_SIZE as usize;
        if self.t.nodes.len() < n {
            let step = 1024 * GROUP_SIZE as usize;
            let len = n.div_ceil(step) * step;
            self.t.nodes.resize(
                len.min(self.cap.nodes as usize * GROUP_SIZE as usize)
                    .max(n),
                0,
            );
            self.node_pass
                .resize(self.t.nodes.len() / GROUP_SIZE as usize, 0);
        }
        self.node_pass[g as usize] = self.pass;
        let step = 1u64 << (56 - b as u32);
        let mut sub: Vec<(u64, u32)> = Vec::new();
        for j in 0..GROUP_SIZE as u64 {
            let (clo, chi) = (lo + j * step, lo + j * step + (step - 1));
            let first = rs.partition_point(|r| r.0 <= clo) - 1;
            let end = rs.partition_point(|r| r.0 <= chi);
            sub.clear();
            sub.push((clo, rs[first].1));
            sub.extend_from_slice(&rs[first + 1..end]);
            let e = if sub.len() == 1 {
                sub[0].1
            } else {
                let s = sub.clone();
                self.place(&s, clo, b + 8)?
            };
            self.t.nodes[(g as usize) << 8 | j as usize] = e;
        }
        Ok(NODE | g)
    }

    /// Lets go of what entry `e` references (a block, or a group and everything below it).
    fn release(&mut self, e: u32) {
        let i = e & INDEX;
        if e & BLOCK != 0 {
            self.blocks.release(i);
        } else if e & NODE != 0 {
            for j in 0..GROUP_SIZE as usize {
                let c = self.t.nodes[(i as usize) << 8 | j];
                self.release(c);
            }
            self.nodes.release(i);
        }
    }

    /// The new entry for chunk [`lo`, `hi`] (length `b`), now `e`, after the prefixes in
    /// [`from`, `to`] changed.
    fn refresh(&mut self, e: u32, lo: u64, hi: u64, b: u8, from: u64, to: u64) -> Result<u32> {
        if e & NODE != 0 {
            let g = e & INDEX;
            if self.node_pass[g as usize] == self.pass {
                return Ok(e);
            }
            // Few prefixes left inside: maybe a block holds the chunk again.
            if self
                .idx
                .range((lo, b + 1)..=(hi, 65))
                .take(RANGES + 1)
                .count()
                <= RANGES
            {
                let rs = self.ranges(lo, hi, b);
                if rs.len() <= RANGES {
                    let ne = self.place(&rs, lo, b)?;
                    self.release(e);
                    return Ok(ne);
                }
            }
            let step = 1u64 << (56 - b as u32);
            let j0 = (from.max(lo) - lo) / step;
            let j1 = (to.min(hi) - lo) / step;
            for j in j0..=j1 {
                let at = (g as usize) << 8 | j as usize;
                let c = self.t.nodes[at];
                let clo = lo + j * step;
                let nc = self.refresh(c, clo, clo + (step - 1), b + 8, from, to)?;
                if nc != c {
                    self.t.nodes[at] = nc;
                    self.w.node_entries.push(at as u32);
                }
            }
            return Ok(e);
        }
        if e & BLOCK != 0 && self.block_pass[(e & INDEX) as usize] == self.pass {
            return Ok(e);
        }
        let rs = self.ranges(lo, hi, b);
        if rs.len() == 1 && rs[0].1 == e {
            return Ok(e);
        }
        if e & BLOCK != 0
            && rs.len() <= RANGES
            && self.t.blocks[(e & INDEX) as usize] == Six::block_of(&rs)
            && !cfg!(mutant = "block_in_place")
        {
            return Ok(e);
        }
        if cfg!(mutant = "block_in_place") && e & BLOCK != 0 && rs.len() > 1 && rs.len() <= RANGES {
            // The fault: a block in use is rewritten where lookups read it.
            let i = e & INDEX;
            self.t.blocks[i as usize] = Six::block_of(&rs);
            self.block_pass[i as usize] = self.pass;
            self.w.blocks.push(i);
            return Ok(e);
        }
        let ne = self.place(&rs, lo, b)?;
        self.release(e);
        Ok(ne)
    }

    /// Recomputes every chunk the changes since the last call touch.
    pub fn settle(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        self.pass += 1;
        let mut d = std::mem::take(&mut self.dirty);
        d.sort_unstable();
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(d.len());
        for (a, z) in d {
            match spans.last_mut() {
                Some(s) if a <= s.1.saturating_add(1) => s.1 = s.1.max(z),
                _ => spans.push((a, z)),
            }
        }
        for (from, to) in spans {
            for i in (from >> 48)..=(to >> 48) {
                let e = self.t.l1[i as usize];
                let lo = i << 48;
                let ne = self.refresh(e, lo, lo | ((1 << 48) - 1), 16, from, to)?;
                if ne != e {
                    self.t.l1[i as usize] = ne;
                    self.w.l1.push(i as u32);
                }
            }
        }
        Ok(())
    }

    /// What changed since the last call (after `settle`). Groups and blocks let go start their
    /// quarantine.
    pub fn take(&mut self) -> Writes6 {
        let mut w = std::mem::take(&mut self.w);
        let (nodes, blocks) = (&self.nodes, &self.blocks);
        let kept = |p: &Pool, x: u32| p.state_of(x) != PENDING;
        w.blocks.retain(|b| kept(blocks, *b));
        w.blocks.sort_unstable();
        w.blocks.dedup();
        w.nodes.retain(|g| kept(nodes, *g));
        w.nodes.sort_unstable();
        w.nodes.dedup();
        w.node_entries
            .retain(|i| kept(nodes, i >> 8) && w.nodes.binary_search(&(i >> 8)).is_err());
        w.node_entries.sort_unstable();
        w.node_entries.dedup();
        w.l1.sort_unstable();
        w.l1.dedup();
        // Elements filled in ascending order, then those emptied from the last down: a reader
        // of the maps at any moment finds the elements in use first, then unused ones.
        w.pfx.sort_unstable();
        w.pfx.dedup();
        let pfx = &self.t.pfx;
        w.pfx.sort_by_key(|i| {
            if pfx[*i as usize].len_1 != 0 {
                (0, *i as i64)
            } else {
                (1, -(*i as i64))
            }
        });
        self.nodes.committed();
        self.blocks.committed();
        w
    }

    /// Forgets the writes so far (a caller that wrote the table by comparing it with the old one).
    pub fn forget(&mut self) {
        self.take();
    }

    pub fn promote(&mut self) {
        self.nodes.promote();
        self.blocks.promote();
    }
}

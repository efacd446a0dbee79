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
//! Prefixes longer than /64 are kept in the kernel's LPM trie; the /64 holding one is a range
//! of its own, marked `LONG`: its value is a block of ranges of the lower 64 bits when they make
//! at most `RANGES` ranges (the router's own addresses, /128s inside its subnets, make three),
//! else the route of the /64 around them, with the LPM trie looked up first.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use router_common::{
    fib::{GROUP_SIZE, L1_ENTRIES},
    fib6::{BLOCK, INDEX, LONG, NODE, RANGES},
    Block6, Pfx6,
};

use super::pool::{wait_for_lookups, Pool, PENDING};

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

    /// The value the fast path finds for the address (`hi`, `lo`): with `LONG` set, the LPM
    /// trie decides first.
    pub fn lookup(&self, hi: u64, lo: u64) -> u32 {
        let mut e = self.upper(hi);
        if e & (BLOCK | LONG) == BLOCK | LONG {
            e = self.search(e, lo);
        }
        e
    }

    /// The value of the range of the upper 64 bits holding `hi`.
    fn upper(&self, hi: u64) -> u32 {
        let mut e = self.l1[(hi >> 48) as usize];
        let mut shift = 40;
        while e & NODE != 0 {
            e = self.nodes[((e & INDEX) as usize) << 8 | ((hi >> shift) & 0xff) as usize];
            shift -= 8;
        }
        if e & (BLOCK | LONG) == BLOCK {
            e = self.search(e, hi);
        }
        e
    }

    fn search(&self, e: u32, key: u64) -> u32 {
        let b = &self.blocks[(e & INDEX) as usize];
        let mut i = 0;
        for step in [4, 2, 1] {
            if b.starts[i + step] <= key {
                i += step;
            }
        }
        b.vals[i]
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
                if e & LONG == 0 {
                    if let Some(b) = self.blocks.get(i as usize) {
                        todo.extend(
                            b.vals
                                .iter()
                                .copied()
                                .filter(|v| v & (BLOCK | LONG) == BLOCK | LONG),
                        );
                    }
                }
            } else if e & NODE != 0 {
                nodes.push(i);
                if let Some(g) = self.nodes.get((i as usize) << 8..((i as usize) + 1) << 8) {
                    todo.extend(g.iter().copied().filter(|e| e & (NODE | BLOCK) != 0));
                }
            }
        }
        nodes.sort_unstable();
        blocks.sort_unstable();
        blocks.dedup();
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
    /// Prefixes longer than /64: (upper 64 bits, lower 64 bits, length) → value.
    long: BTreeMap<(u64, u64, u8), u32>,
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

/// Groups holding at most this many prefixes are checked at each change for fitting in a block.
const COLLAPSE_CHECK: usize = 64;

/// A range before it is placed: first address, value, and for a /64 whose longer prefixes fit
/// in a block, that block's content (the value is then `LONG | BLOCK`).
type Range = (u64, u32, Option<Block6>);

/// The ranges of [`lo`, `hi`] given the value `base` around everything and the prefixes inside
/// it, sorted by (first address, length): (first, last, value), a value of None for a /64 with
/// longer prefixes (a range of its own, `LONG` | the value around it).
fn sweep(
    lo: u64,
    hi: u64,
    base: u32,
    inner: impl Iterator<Item = (u64, u64, Option<u32>)>,
) -> Vec<(u64, u32)> {
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
    // Open prefixes: (last address, value); the whole span at the bottom.
    let mut open: Vec<(u64, u32)> = vec![(hi, base)];
    for (a, end, v) in inner {
        while open.len() > 1 && open[open.len() - 1].0 < a {
            let (end, _) = open.pop().expect("open prefix");
            emit(&mut out, end + 1, open[open.len() - 1].1);
        }
        let val = v.unwrap_or(open[open.len() - 1].1 | LONG);
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
            long: BTreeMap::new(),
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

    /// Sets prefix (`a`, `low`, `len`), `len` above 64, to `val`.
    pub fn long_set(&mut self, a: u64, low: u64, len: u8, val: u32) {
        if self.long.insert((a, low, len), val).is_none() {
            self.idx.entry((a, 65)).or_insert((0, 0)).0 += 1;
        }
        self.dirty.push((a, a));
    }

    /// Removes prefix (`a`, `low`, `len`), `len` above 64.
    pub fn long_remove(&mut self, a: u64, low: u64, len: u8) {
        if self.long.remove(&(a, low, len)).is_none() {
            return;
        }
        let e = self.idx.get_mut(&(a, 65)).expect("a counted /64");
        e.0 -= 1;
        if e.0 == 0 {
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
    /// address, value), ascending, neighbours with different values; a /64 holding longer
    /// prefixes is a range of its own, `LONG` | the route around it.
    fn ranges(&self, lo: u64, hi: u64, b: u8) -> Vec<(u64, u32)> {
        let inner = self
            .idx
            .range((lo, b + 1)..=(hi, 65))
            .map(|(&(a, len), &(v, _))| {
                if len == 65 {
                    (a, a, None)
                } else {
                    (a, last(a, len), Some(v))
                }
            });
        sweep(lo, hi, self.covering(lo, b), inner)
    }

    /// `rs` with each `LONG` range's lower 64 bits resolved: the content of its low block, or
    /// the LPM trie's fallback when they make more ranges than a block holds.
    fn resolve(&self, rs: Vec<(u64, u32)>) -> Vec<Range> {
        rs.into_iter()
            .map(|(s, v)| {
                if v & LONG == 0 {
                    return (s, v, None);
                }
                let inner = self
                    .long
                    .range((s, 0, 0)..=(s, u64::MAX, u8::MAX))
                    .map(|(&(_, a, len), &v)| (a, last(a, len - 64), Some(v)));
                let low = sweep(0, u64::MAX, v & INDEX, inner);
                if low.len() <= RANGES && !cfg!(mutant = "long_always_lpm") {
                    (s, LONG | BLOCK, Some(Six::block_of(&low)))
                } else {
                    (s, v, None)
                }
            })
            .collect()
    }

    /// An entry's value as `resolve` gives it (a low block by its content).
    fn canon(&self, v: u32) -> (u32, Option<Block6>) {
        if v & (BLOCK | LONG) == BLOCK | LONG {
            (BLOCK | LONG, Some(self.t.blocks[(v & INDEX) as usize]))
        } else {
            (v, None)
        }
    }

    /// Whether entry `e` holds ranges `rc` already.
    fn same(&self, e: u32, rc: &[Range]) -> bool {
        if e & NODE != 0 {
            return false;
        }
        if e & (BLOCK | LONG) == BLOCK {
            let b = &self.t.blocks[(e & INDEX) as usize];
            return rc.len() >= 2
                && rc.len() <= RANGES
                && b.starts[rc.len()..].iter().all(|s| *s == u64::MAX)
                && rc
                    .iter()
                    .enumerate()
                    .all(|(i, r)| b.starts[i] == r.0 && self.canon(b.vals[i]) == (r.1, r.2));
        }
        rc.len() == 1 && self.canon(e) == (rc[0].1, rc[0].2)
    }

    /// The value for range `r`: its low block written to a fresh block when it has one (or
    /// kept where the old table had the same for this /64).
    fn value_of(&mut self, r: &Range) -> Result<u32> {
        match r.2 {
            Some(low) => {
                let reuse = self.hints.as_ref().and_then(|h| {
                    let v = h.old.upper(r.0);
                    (v & (BLOCK | LONG) == BLOCK | LONG
                        && h.old.blocks.get((v & INDEX) as usize) == Some(&low))
                    .then_some(v & INDEX)
                });
                Ok(LONG | BLOCK | self.new_block(low, reuse)?)
            }
            None => Ok(r.1),
        }
    }

    /// A block holding `blk`: `reuse` (the old table's at the same place, with the same
    /// content) or a fresh one.
    fn new_block(&mut self, blk: Block6, reuse: Option<u32>) -> Result<u32> {
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
        Ok(i)
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

    fn pool(&mut self, node: bool) -> &mut Pool {
        if node {
            &mut self.nodes
        } else {
            &mut self.blocks
        }
    }

    fn alloc(&mut self, node: bool) -> Result<u32> {
        if let Some(x) = self.pool(node).alloc() {
            return Ok(x);
        }
        if self.pool(node).waiting() {
            wait_for_lookups();
            self.promote();
            if let Some(x) = self.pool(node).alloc() {
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
    fn place(&mut self, rs: &[Range], lo: u64, b: u8) -> Result<u32> {
        if rs.len() == 1 {
            return self.value_of(&rs[0]);
        }
        if rs.len() <= RANGES {
            let mut vals = Vec::with_capacity(rs.len());
            for r in rs {
                vals.push((r.0, self.value_of(r)?));
            }
            let blk = Six::block_of(&vals);
            let hint = self
                .hint_at(lo, b)
                .filter(|e| e & (BLOCK | NODE | LONG) == BLOCK)
                .map(|e| e & INDEX);
            let reuse = hint.filter(|h| {
                self.hints
                    .as_ref()
                    .and_then(|x| x.old.blocks.get(*h as usize))
                    == Some(&blk)
            });
            return Ok(BLOCK | self.new_block(blk, reuse)?);
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
        for j in 0..GROUP_SIZE as u64 {
            let (clo, chi) = (lo + j * step, lo + j * step + (step - 1));
            let first = rs.partition_point(|r| r.0 <= clo) - 1;
            let end = rs.partition_point(|r| r.0 <= chi);
            let mut sub: Vec<Range> = Vec::with_capacity(end - first);
            sub.push((clo, rs[first].1, rs[first].2));
            sub.extend_from_slice(&rs[first + 1..end]);
            let e = self.place(&sub, clo, b + 8)?;
            self.t.nodes[(g as usize) << 8 | j as usize] = e;
        }
        Ok(NODE | g)
    }

    /// Lets go of what entry `e` references (a block, or a group and everything below it).
    fn release(&mut self, e: u32) {
        let i = e & INDEX;
        if e & BLOCK != 0 {
            if e & LONG == 0 {
                // The low blocks of its ranges (the last range's value repeats in the padding).
                let vals = self.t.blocks[i as usize].vals;
                for (k, v) in vals.iter().enumerate() {
                    if v & (BLOCK | LONG) == BLOCK | LONG && (k == 0 || vals[k - 1] != *v) {
                        self.blocks.release(v & INDEX);
                    }
                }
            }
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
            // Few prefixes left inside: maybe a block holds the chunk again (as a table built
            // afresh would have it, so that a build over this one keeps its numbers). Beyond
            // COLLAPSE_CHECK prefixes inside, the ranges are not counted at every change.
            if self
                .idx
                .range((lo, b + 1)..=(hi, 65))
                .take(COLLAPSE_CHECK + 1)
                .count()
                <= COLLAPSE_CHECK
            {
                let rs = self.ranges(lo, hi, b);
                if rs.len() <= RANGES {
                    let rc = self.resolve(rs);
                    let ne = self.place(&rc, lo, b)?;
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
        let rc = self.resolve(self.ranges(lo, hi, b));
        if self.same(e, &rc) && !cfg!(mutant = "block_in_place") {
            return Ok(e);
        }
        if cfg!(mutant = "block_in_place")
            && e & (BLOCK | LONG) == BLOCK
            && rc.len() > 1
            && rc.len() <= RANGES
            && rc.iter().all(|r| r.2.is_none())
        {
            // The fault: a block in use is rewritten where lookups read it.
            let i = e & INDEX;
            let vals: Vec<(u64, u32)> = rc.iter().map(|r| (r.0, r.1)).collect();
            self.t.blocks[i as usize] = Six::block_of(&vals);
            self.block_pass[i as usize] = self.pass;
            self.w.blocks.push(i);
            return Ok(e);
        }
        let ne = self.place(&rc, lo, b)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Cap6 {
        Cap6 {
            nodes: 64,
            blocks: 256,
            prefixes: 256,
        }
    }

    /// The router's own address inside its subnet (a /128 in a /64) costs the lookup a block of
    /// the lower 64 bits, not the LPM trie; nine longer prefixes in one /64 (more ranges than a
    /// block holds) fall back to the trie, the /64's route kept as the value when it misses.
    #[test]
    fn longer_prefixes_in_a_64_take_a_block_of_the_lower_bits() {
        let mut t = Six::new(cap(), None);
        let subnet = 0x2001_0db8_0001_0000u64;
        t.set(subnet, 64, 7).unwrap();
        t.long_set(subnet, 1, 128, 9);
        t.settle().unwrap();
        t.take();
        let e = t.t.lookup(subnet, 1);
        assert_eq!(e, 9, "the address itself");
        assert_eq!(t.t.lookup(subnet, 2), 7, "a host of the subnet");
        assert_eq!(t.t.lookup(subnet, u64::MAX), 7);
        assert_eq!(t.t.lookup(subnet + 1, 2), 0, "the next /64");
        // The /64's value points to a block of the lower bits, not to the trie.
        let mut v = t.t.l1[(subnet >> 48) as usize];
        let mut shift = 40;
        while v & NODE != 0 {
            v = t.t.nodes[((v & INDEX) as usize) << 8 | ((subnet >> shift) & 0xff) as usize];
            shift -= 8;
        }
        if v & (BLOCK | LONG) == BLOCK {
            let b = &t.t.blocks[(v & INDEX) as usize];
            let i = b.starts.iter().rposition(|s| *s <= subnet).unwrap();
            v = b.vals[i];
        }
        assert_eq!(v & (BLOCK | LONG), BLOCK | LONG, "{v:#x}");
        // Nine /128s: 19 ranges, the LPM trie's.
        for k in 2..11u64 {
            t.long_set(subnet, k * 16, 128, 9);
        }
        t.settle().unwrap();
        t.take();
        assert_eq!(t.t.lookup(subnet, 1), LONG | 7);
        // Back to one: a block again, the others' blocks let go.
        for k in 2..11u64 {
            t.long_remove(subnet, k * 16, 128);
        }
        t.settle().unwrap();
        t.take();
        assert_eq!(t.t.lookup(subnet, 1), 9);
        assert_eq!(t.t.lookup(subnet, 32), 7);
    }
}

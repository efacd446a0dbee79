//! The route table kept in memory as it is in the maps, changed one route at a time.
//!
//! `Live` holds the three IPv4 levels, the IPv6 prefixes, the nexthops and the ECMP groups as
//! the maps hold them, plus what the maps do not say: for every IPv4 leaf entry the length of
//! the prefix that set it (its *tag*, length + 1, 0 where no prefix covers it), the prefixes
//! themselves, and reference counts. A change touches only the entries its prefix covers:
//!
//! - adding or replacing a prefix rewrites the entries of its range whose tag is not longer
//!   (descending into the groups below them);
//! - removing one gives the entries tagged with its length back to the longest shorter prefix
//!   that covers it (found by probing the shorter lengths);
//! - a /17–/24 or /25–/32 prefix needs a second- or third-level group for its block, created
//!   filled with what the entry above it held; the group goes when the last such prefix goes.
//!
//! Every entry written is recorded as dirty; `take_writes` hands them over leaves first
//! (nexthops and ECMP groups, then level 3, 2, 1, then IPv6), which is the order that keeps a
//! lookup racing the update from meeting a group or nexthop that is not filled yet.
//!
//! A group or nexthop slot that stops being referenced is not reused until every lookup that
//! may still hold it has finished: it waits in a quarantine until an RCU grace period
//! (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which is `synchronize_rcu()`, and XDP and tc programs
//! run inside RCU read-side sections) has passed after the write that unreferenced it. The
//! grace period is only waited for when a free number is needed and none is left.
//!
//! An error (a table larger than the maps) leaves the `Live` poisoned: the caller drops it
//! without writing anything and rebuilds from the maps.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Result};
use router_common::{fib::*, route_kind, NhGroup, Route};

use super::six::{Six, Writes6};
use super::Capacity;
use super::Fib;
use crate::config::{IpNet, Ipv4Net, Ipv6Net};

use super::pool::{wait_for_lookups, Pool, PENDING};

/// Entries of one level written since the last `take_writes`: whole groups (new ones, filled
/// at once) and single entries.
#[derive(Clone, Debug, Default)]
struct Dirty {
    bits: Vec<u64>,
    list: Vec<u32>,
    fresh: Vec<u64>,
    groups: Vec<u32>,
}

impl Dirty {
    fn new(n: usize) -> Dirty {
        Dirty {
            bits: vec![0; n.div_ceil(64)],
            list: Vec::new(),
            fresh: vec![0; (n / GROUP_SIZE as usize).div_ceil(64)],
            groups: Vec::new(),
        }
    }
    fn mark(&mut self, i: usize) {
        let g = i / GROUP_SIZE as usize;
        if self
            .fresh
            .get(g / 64)
            .is_some_and(|w| w & (1u64 << (g % 64)) != 0)
        {
            return;
        }
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if self.bits[w] & b == 0 {
            self.bits[w] |= b;
            self.list.push(i as u32);
        }
    }
    fn mark_group(&mut self, g: u32) {
        let (w, b) = (g as usize / 64, 1u64 << (g % 64));
        if self.fresh[w] & b == 0 {
            self.fresh[w] |= b;
            self.groups.push(g);
        }
    }
    fn resize(&mut self, entries: usize) {
        self.bits.resize(entries.div_ceil(64), 0);
        self.fresh
            .resize((entries / GROUP_SIZE as usize).div_ceil(64), 0);
    }
    fn take(&mut self) -> (Vec<u32>, Vec<u32>) {
        let l = std::mem::take(&mut self.list);
        for i in &l {
            self.bits[*i as usize / 64] = 0;
        }
        let g = std::mem::take(&mut self.groups);
        for x in &g {
            self.fresh[*x as usize / 64] = 0;
        }
        (g, l)
    }
}

/// What to write of one level: whole groups (their entries as the table holds them) and single
/// entries.
#[derive(Debug, Default)]
pub struct LevelWrites {
    pub groups: Vec<u32>,
    pub entries: Vec<(u32, u32)>,
}

impl LevelWrites {
    pub fn len(&self) -> usize {
        self.groups.len() * GROUP_SIZE as usize + self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One past the highest index written.
    pub fn end(&self) -> usize {
        let n = GROUP_SIZE as usize;
        let g = self.groups.iter().map(|g| (*g as usize + 1) * n).max();
        let e = self.entries.iter().map(|(i, _)| *i as usize + 1).max();
        g.max(e).unwrap_or(0)
    }

    /// Every (index, value) to write, the groups' values read from `level`.
    pub fn each(&self, level: &[u32], f: &mut dyn FnMut(u32, u32)) {
        let n = GROUP_SIZE as usize;
        for g in &self.groups {
            for i in *g as usize * n..(*g as usize + 1) * n {
                f(i as u32, level[i]);
            }
        }
        for (i, v) in &self.entries {
            f(*i, *v);
        }
    }
}

/// Hints from the table being replaced: which number each block, nexthop or group had.
#[derive(Default)]
struct Hints {
    l2: HashMap<u32, u32>,
    l3: HashMap<u32, u32>,
    nexthops: HashMap<Route, u32>,
    groups: HashMap<NhGroup, u32>,
}

/// Which entries of a range a change rewrites.
#[derive(Clone, Copy)]
enum Cond {
    /// Those set by a prefix no longer than this tag (adding or replacing).
    AtMost(u8),
    /// Those set by the prefix being removed.
    Exactly(u8),
}

impl Cond {
    fn hit(self, t: u8) -> bool {
        match self {
            Cond::AtMost(x) => t <= x,
            Cond::Exactly(x) => t == x,
        }
    }
}

/// What changed since the last `take_writes`, in the order it must reach the maps.
#[derive(Debug, Default)]
pub struct Writes {
    pub nexthops: Vec<(u32, Route)>,
    pub groups: Vec<(u32, NhGroup)>,
    pub l3: LevelWrites,
    pub l2: LevelWrites,
    pub l1: LevelWrites,
    /// IPv6 prefixes longer than /64 to insert or replace in the LPM trie (value = nexthop
    /// index + 1), longest first, before anything else points to them, and to delete, shortest
    /// first, after everything else.
    pub v6_set: Vec<((u8, u128), u32)>,
    pub v6_del: Vec<(u8, u128)>,
    /// The IPv6 table up to /64 (see `six`), after the IPv4 levels.
    pub six: Writes6,
}

impl Writes {
    pub fn len(&self) -> usize {
        self.nexthops.len()
            + self.groups.len()
            + self.l3.len()
            + self.l2.len()
            + self.l1.len()
            + self.v6_set.len()
            + self.v6_del.len()
            + self.six.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A route table in memory, changed incrementally (see the module's documentation).
pub struct Live {
    pub fib: Fib,
    cap: Capacity,
    tag1: Vec<u8>,
    tag2: Vec<u8>,
    tag3: Vec<u8>,
    v4: HashMap<(u8, u32), u32>,
    refs: Vec<u32>,
    slot_of: HashMap<Route, u32>,
    group_of: HashMap<NhGroup, u32>,
    /// Prefixes longer than /16 per /16 block, longer than /24 per /24 block.
    long16: Vec<u32>,
    long24: HashMap<u32, u32>,
    nh: Pool,
    ecmp: Pool,
    l2: Pool,
    l3: Pool,
    dirty: [Dirty; 3],
    dirty_nh: BTreeSet<u32>,
    dirty_groups: BTreeSet<u32>,
    /// Changed IPv6 prefixes longer than /64 (the LPM trie's).
    dirty6: BTreeSet<(u8, u128)>,
    six: Six,
    hints: Option<Hints>,
    poisoned: bool,
}

impl Live {
    /// The table for `routes`, numbered to change as little as possible of `old` (the table in
    /// the maps now): a block, nexthop or ECMP group that stays keeps its number, and new ones
    /// take numbers `old` does not use. The writes it reports are every entry it set; a caller
    /// writing over `old` compares with it instead.
    ///
    /// `cap` is what the maps hold; the second and third levels are kept only up to the highest
    /// group in use (groups are numbered lowest first), so memory follows the table.
    pub fn build(routes: &[(IpNet, Route)], old: &Fib, cap: Capacity) -> Result<Live> {
        let n = GROUP_SIZE as usize;
        let used2 = super::groups_used(&old.l1);
        let used3 = super::groups_used_in(&old.l2, &used2);
        let mut hints = Hints::default();
        for (i, e) in old.l1.iter().enumerate() {
            if e & GROUP != 0 {
                let g2 = e & !GROUP;
                hints.l2.insert(i as u32, g2);
                for j in 0..n {
                    let Some(&e2) = old.l2.get(g2 as usize * n + j) else {
                        break;
                    };
                    if e2 & GROUP != 0 {
                        hints.l3.insert(((i as u32) << 8) | j as u32, e2 & !GROUP);
                    }
                }
            }
        }
        for (i, r) in old.nexthops.iter().enumerate() {
            if let Some(r) = r {
                hints.nexthops.entry(*r).or_insert(i as u32);
            }
        }
        for (i, g) in old.groups.iter().enumerate() {
            if let Some(g) = g {
                hints.groups.entry(*g).or_insert(i as u32);
            }
        }
        fn slots<T>(v: &[Option<T>]) -> Vec<u32> {
            v.iter()
                .enumerate()
                .filter(|(_, x)| x.is_some())
                .map(|(i, _)| i as u32)
                .collect()
        }
        let mut fib = Fib::empty(Capacity {
            l2_groups: 0,
            l3_groups: 0,
            ..cap
        });
        fib.nexthops = vec![None; cap.nexthops as usize];
        let mut live = Live {
            fib,
            cap,
            tag1: vec![0; L1_ENTRIES as usize],
            tag2: Vec::new(),
            tag3: Vec::new(),
            v4: HashMap::new(),
            refs: vec![0; cap.nexthops as usize],
            slot_of: HashMap::new(),
            group_of: HashMap::new(),
            long16: vec![0; L1_ENTRIES as usize],
            long24: HashMap::new(),
            nh: Pool::new(cap.nexthops, slots(&old.nexthops)),
            ecmp: Pool::new(NH_GROUPS, slots(&old.groups)),
            l2: Pool::new(cap.l2_groups, used2),
            l3: Pool::new(cap.l3_groups, used3),
            dirty: [
                Dirty::new(L1_ENTRIES as usize),
                Dirty::new(0),
                Dirty::new(0),
            ],
            dirty_nh: BTreeSet::new(),
            dirty_groups: BTreeSet::new(),
            dirty6: BTreeSet::new(),
            six: Six::new(cap.six(), Some(&old.t6)),
            hints: Some(hints),
            poisoned: false,
        };
        live.replace_all(routes)?;
        live.six.settle()?;
        live.six.end_hints();
        live.hints = None;
        Ok(live)
    }

    /// Makes the table hold exactly `routes` (several routes to one prefix: ECMP), changing
    /// only the prefixes that differ.
    pub fn replace_all(&mut self, routes: &[(IpNet, Route)]) -> Result<()> {
        // The routes in prefix order (shortest first, so that a longer prefix then finds its
        // range painted once), as indices: a million routes are not copied.
        let key = |i: u32| {
            let n = canonical(routes[i as usize].0);
            (n.is_ipv6(), n.prefix_len(), n)
        };
        let mut order: Vec<u32> = (0..routes.len() as u32).collect();
        order.sort_unstable_by_key(|i| key(*i));
        let gone: Vec<IpNet> = self
            .prefixes()
            .filter(|p| {
                order
                    .binary_search_by_key(&(p.is_ipv6(), p.prefix_len(), *p), |i| key(*i))
                    .is_err()
            })
            .collect();
        let mut rs: Vec<Route> = Vec::new();
        let mut k = 0;
        while k < order.len() {
            let net = key(order[k]).2;
            rs.clear();
            while k < order.len() && key(order[k]).2 == net {
                rs.push(routes[order[k] as usize].1);
                k += 1;
            }
            rs.sort();
            rs.dedup();
            if self.routes_of(net).as_deref() != Some(&rs[..]) {
                self.set(net, &rs)?;
            }
        }
        for net in gone {
            self.remove(net)?;
        }
        Ok(())
    }

    /// Room for `more` prefixes beyond those held (a large batch coming).
    pub fn reserve(&mut self, more: usize) {
        self.v4.reserve(more);
    }

    /// Every prefix in the table.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        let v4 = self.v4.keys().map(|&(len, a)| {
            IpNet::V4(Ipv4Net {
                addr: a.into(),
                len,
            })
        });
        let v6 = self.fib.v6.keys().map(|&(len, a)| {
            IpNet::V6(Ipv6Net {
                addr: a.into(),
                len,
            })
        });
        v4.chain(v6)
    }

    /// How many prefixes the table holds.
    pub fn len(&self) -> usize {
        self.v4.len() + self.fib.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The routes of `net` (one, or the members of its ECMP group), if the table holds it.
    pub fn routes_of(&self, net: IpNet) -> Option<Vec<Route>> {
        let v = match canonical(net) {
            IpNet::V4(n) => *self.v4.get(&(n.len, n.network()))?,
            IpNet::V6(n) => *self.fib.v6.get(&(n.len, n.network()))?,
        };
        let r = self.fib.nexthops[(v - 1) as usize]?;
        if r.kind != route_kind::ECMP {
            return Some(vec![r]);
        }
        let g = self.fib.groups[r.tx_port as usize]?;
        let mut v: Vec<Route> = g.members[..g.count as usize]
            .iter()
            .filter_map(|m| self.fib.nexthops[*m as usize])
            .collect();
        v.sort();
        Some(v)
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Adds `net` through `routes`, or replaces its routes.
    pub fn set(&mut self, net: IpNet, routes: &[Route]) -> Result<()> {
        let r = self.set_inner(canonical(net), routes);
        self.poisoned |= r.is_err();
        r
    }

    /// Removes `net`; false when the table does not hold it.
    pub fn remove(&mut self, net: IpNet) -> Result<bool> {
        let r = self.remove_inner(canonical(net));
        self.poisoned |= r.is_err();
        r
    }

    fn set_inner(&mut self, net: IpNet, routes: &[Route]) -> Result<()> {
        let mut rs = routes.to_vec();
        rs.sort();
        rs.dedup();
        if rs.is_empty() {
            bail!("{net}: a route needs a nexthop");
        }
        if rs.len() > MAX_PATHS {
            bail!(
                "{net} has {} nexthops; at most {MAX_PATHS} are supported",
                rs.len()
            );
        }
        let val = self.acquire(&rs)? + 1;
        match net {
            IpNet::V6(n) => {
                let k = (n.len, n.network());
                let top = (k.1 >> 64) as u64;
                let old = self.fib.v6.insert(k, val);
                if n.len <= 64 {
                    self.six.set(top, n.len, val)?;
                } else if old != Some(val) {
                    self.six.long_set(top, k.1 as u64, n.len, val);
                    self.dirty6.insert(k);
                }
                if let Some(o) = old {
                    self.release(o - 1);
                }
            }
            IpNet::V4(n) => {
                let (len, a) = (n.len, n.network());
                let old = self.v4.get(&(len, a)).copied();
                if old.is_none() {
                    if len > 16 {
                        self.ensure_l2(a >> 16)?;
                        self.long16[(a >> 16) as usize] += 1;
                    }
                    if len > 24 {
                        self.ensure_l3(a >> 8)?;
                        *self.long24.entry(a >> 8).or_default() += 1;
                    }
                }
                self.v4.insert((len, a), val);
                self.paint(len, a, val, len + 1, Cond::AtMost(len + 1));
                if let Some(o) = old {
                    self.release(o - 1);
                }
            }
        }
        Ok(())
    }

    fn remove_inner(&mut self, net: IpNet) -> Result<bool> {
        match net {
            IpNet::V6(n) => {
                let k = (n.len, n.network());
                let Some(o) = self.fib.v6.remove(&k) else {
                    return Ok(false);
                };
                let top = (k.1 >> 64) as u64;
                if cfg!(mutant = "v6_route_removal_kept") {
                    // The fault: a deleted IPv6 route stays in the fast path's table.
                } else if n.len <= 64 {
                    self.six.remove(top, n.len);
                } else {
                    self.six.long_remove(top, k.1 as u64, n.len);
                    self.dirty6.insert(k);
                }
                self.release(o - 1);
            }
            IpNet::V4(n) => {
                let (len, a) = (n.len, n.network());
                let Some(o) = self.v4.remove(&(len, a)) else {
                    return Ok(false);
                };
                // The longest shorter prefix covering this one takes its entries back.
                let (pv, pt) = (0..len)
                    .rev()
                    .find_map(|l| {
                        let p = a & Ipv4Net::mask(l);
                        self.v4.get(&(l, p)).map(|v| (*v, l + 1))
                    })
                    .unwrap_or((0, 0));
                self.paint(len, a, pv, pt, Cond::Exactly(len + 1));
                if len > 24 {
                    let c = self.long24.get_mut(&(a >> 8)).expect("counted block");
                    *c -= 1;
                    if *c == 0 {
                        self.long24.remove(&(a >> 8));
                        self.collapse_l3(a >> 8);
                    }
                }
                if len > 16 {
                    let c = &mut self.long16[(a >> 16) as usize];
                    *c -= 1;
                    if *c == 0 {
                        self.collapse_l2(a >> 16);
                    }
                }
                self.release(o - 1);
            }
        }
        Ok(true)
    }

    /// Everything written since the last call, in the order the maps must take it. The
    /// numbers unreferenced meanwhile start their quarantine: the caller writes these before
    /// asking for more.
    pub fn take_writes(&mut self) -> Result<Writes> {
        assert!(!self.poisoned, "a poisoned table is never written");
        if let Err(e) = self.six.settle() {
            self.poisoned = true;
            return Err(e);
        }
        // Entries of a group this batch let go keep their old content: a lookup that still
        // follows the old pointer to it must find the old route, not what the batch painted
        // there on its way.
        let level = |d: &mut Dirty, v: &[u32], pool: Option<&Pool>| -> LevelWrites {
            let kept = |g: u32| {
                pool.is_none_or(|p| p.state_of(g) != PENDING) || cfg!(mutant = "no_quarantine")
            };
            let (mut groups, mut l) = d.take();
            groups.retain(|g| kept(*g));
            groups.sort_unstable();
            l.sort_unstable();
            LevelWrites {
                groups,
                entries: l
                    .into_iter()
                    .filter(|i| kept(*i / GROUP_SIZE))
                    .map(|i| (i, v[i as usize]))
                    .collect(),
            }
        };
        let w = Writes {
            nexthops: std::mem::take(&mut self.dirty_nh)
                .into_iter()
                .map(|i| (i, self.fib.nexthops[i as usize].unwrap_or(Route::NONE)))
                .collect(),
            groups: std::mem::take(&mut self.dirty_groups)
                .into_iter()
                .map(|i| (i, self.fib.groups[i as usize].unwrap_or(EMPTY_GROUP)))
                .collect(),
            l3: level(&mut self.dirty[2], &self.fib.l3, Some(&self.l3)),
            l2: level(&mut self.dirty[1], &self.fib.l2, Some(&self.l2)),
            l1: level(&mut self.dirty[0], &self.fib.l1, None),
            // A lookup's answer depends on every IPv6 prefix covering its address: the longest
            // prefixes set first and the shortest deleted first take each address from its
            // old route to its new one with nothing else between.
            v6_set: self
                .dirty6
                .iter()
                .rev()
                .filter_map(|k| self.fib.v6.get(k).map(|v| (*k, *v)))
                .collect(),
            v6_del: self
                .dirty6
                .iter()
                .filter(|k| !self.fib.v6.contains_key(k))
                .copied()
                .collect(),
            six: self.six.take(),
        };
        self.dirty6.clear();
        for p in [&mut self.nh, &mut self.ecmp, &mut self.l2, &mut self.l3] {
            p.committed();
        }
        Ok(w)
    }

    /// The IPv6 table up to /64 as the maps hold it after the last `take_writes`.
    pub fn table6(&self) -> &super::six::Table6 {
        &self.six.t
    }

    /// Forgets what was written so far (a caller that wrote the whole table by comparing it with
    /// the old one).
    pub fn forget_writes(&mut self) {
        for d in &mut self.dirty {
            d.take();
        }
        self.dirty_nh.clear();
        self.dirty_groups.clear();
        self.dirty6.clear();
        self.six.forget();
        for p in [&mut self.nh, &mut self.ecmp, &mut self.l2, &mut self.l3] {
            p.committed();
        }
    }

    /// Whether numbers wait in quarantine (a caller about to exit may wait for the lookups and
    /// clear them with `release_quarantine`, so that the next process finds them free).
    pub fn has_quarantine(&self) -> bool {
        self.nh.waiting() || self.ecmp.waiting()
    }

    /// After a grace period: quarantined numbers become free, and the nexthop and ECMP slots
    /// among them are cleared in the next writes.
    pub fn release_quarantine(&mut self) {
        for s in self.nh.promote() {
            self.fib.nexthops[s as usize] = None;
            self.dirty_nh.insert(s);
        }
        for g in self.ecmp.promote() {
            self.fib.groups[g as usize] = None;
            self.dirty_groups.insert(g);
        }
        self.l2.promote();
        self.l3.promote();
        self.six.promote();
    }

    /// A free number from `pool`, waiting for a grace period when only quarantined ones are left.
    fn alloc(&mut self, which: usize, what: &str, have: usize) -> Result<u32> {
        fn pool(s: &mut Live, which: usize) -> &mut Pool {
            match which {
                0 => &mut s.nh,
                1 => &mut s.ecmp,
                2 => &mut s.l2,
                _ => &mut s.l3,
            }
        }
        if let Some(x) = pool(self, which).alloc() {
            return Ok(x);
        }
        if [&self.nh, &self.ecmp, &self.l2, &self.l3][which].waiting() {
            wait_for_lookups();
            self.release_quarantine();
            if let Some(x) = pool(self, which).alloc() {
                return Ok(x);
            }
        }
        bail!(
            "the route table needs more {what} than the {have} this router's maps hold; \
             destroy and re-apply the router to size its maps for the table"
        )
    }

    fn acquire_nh(&mut self, r: Route) -> Result<u32> {
        if let Some(&s) = self.slot_of.get(&r) {
            self.refs[s as usize] += 1;
            return Ok(s);
        }
        let hint = self
            .hints
            .as_ref()
            .and_then(|h| h.nexthops.get(&r).copied());
        let s = match self.nh.take_hint(hint) {
            Some(s) => s,
            None => self.alloc(0, "distinct nexthops", self.refs.len())?,
        };
        self.slot_of.insert(r, s);
        self.refs[s as usize] = 1;
        if self.fib.nexthops[s as usize] != Some(r) {
            self.fib.nexthops[s as usize] = Some(r);
            self.dirty_nh.insert(s);
        }
        Ok(s)
    }

    /// The nexthop slot for `rs` (sorted, distinct): the route's own, or an ECMP entry.
    fn acquire(&mut self, rs: &[Route]) -> Result<u32> {
        if rs.len() == 1 {
            return self.acquire_nh(rs[0]);
        }
        let mut members = [0u32; MAX_PATHS];
        for (m, r) in members.iter_mut().zip(rs) {
            *m = self.acquire_nh(*r)?;
        }
        let grp = NhGroup {
            count: rs.len() as u32,
            members,
        };
        let g = match self.group_of.get(&grp) {
            Some(&g) => {
                // The group holds its members already.
                for m in &members[..rs.len()] {
                    self.refs[*m as usize] -= 1;
                }
                g
            }
            None => {
                let hint = self
                    .hints
                    .as_ref()
                    .and_then(|h| h.groups.get(&grp).copied());
                let g = match self.ecmp.take_hint(hint) {
                    Some(g) => g,
                    None => self.alloc(1, "ECMP groups", NH_GROUPS as usize)?,
                };
                self.group_of.insert(grp, g);
                if self.fib.groups[g as usize] != Some(grp) {
                    self.fib.groups[g as usize] = Some(grp);
                    self.dirty_groups.insert(g);
                }
                g
            }
        };
        self.acquire_nh(Route {
            kind: route_kind::ECMP,
            tx_port: g,
            ..Route::NONE
        })
    }

    fn release(&mut self, s: u32) {
        let refs = &mut self.refs[s as usize];
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let r = self.fib.nexthops[s as usize].expect("a referenced nexthop");
        self.slot_of.remove(&r);
        self.nh.release(s);
        if r.kind == route_kind::ECMP {
            let g = r.tx_port;
            let grp = self.fib.groups[g as usize].expect("a referenced group");
            self.group_of.remove(&grp);
            self.ecmp.release(g);
            for m in &grp.members[..grp.count as usize] {
                self.release(*m);
            }
        }
    }

    fn set1(&mut self, i: usize, v: u32, t: u8) {
        self.tag1[i] = t;
        if self.fib.l1[i] != v {
            self.fib.l1[i] = v;
            self.dirty[0].mark(i);
        }
    }
    fn set2(&mut self, i: usize, v: u32, t: u8) {
        self.tag2[i] = t;
        if self.fib.l2[i] != v {
            self.fib.l2[i] = v;
            self.dirty[1].mark(i);
        }
    }
    fn set3(&mut self, i: usize, v: u32, t: u8) {
        self.tag3[i] = t;
        if self.fib.l3[i] != v {
            self.fib.l3[i] = v;
            self.dirty[2].mark(i);
        }
    }

    /// Rewrites the entries of prefix (len, a)'s range that `cond` selects, and those of the
    /// groups below the range.
    fn paint(&mut self, len: u8, a: u32, v: u32, t: u8, cond: Cond) {
        let n = GROUP_SIZE as usize;
        if len <= 16 {
            let start = (a >> 16) as usize;
            for i in start..start + (1usize << (16 - len)) {
                let e = self.fib.l1[i];
                if e & GROUP != 0 {
                    let g = (e & !GROUP) as usize;
                    self.paint2(g * n..(g + 1) * n, v, t, cond);
                } else if cond.hit(self.tag1[i]) {
                    self.set1(i, v, t);
                }
            }
            return;
        }
        let g2 = (self.fib.l1[(a >> 16) as usize] & !GROUP) as usize;
        let e2 = g2 * n + ((a >> 8) & 0xff) as usize;
        if len <= 24 {
            self.paint2(e2..e2 + (1usize << (24 - len)), v, t, cond);
            return;
        }
        let g3 = (self.fib.l2[e2] & !GROUP) as usize;
        let start = g3 * n + (a & 0xff) as usize;
        self.paint3(start..start + (1usize << (32 - len)), v, t, cond);
    }

    fn paint2(&mut self, r: std::ops::Range<usize>, v: u32, t: u8, cond: Cond) {
        let n = GROUP_SIZE as usize;
        for i in r {
            let e = self.fib.l2[i];
            if e & GROUP != 0 {
                let g = (e & !GROUP) as usize;
                self.paint3(g * n..(g + 1) * n, v, t, cond);
            } else if cond.hit(self.tag2[i]) {
                self.set2(i, v, t);
            }
        }
    }

    fn paint3(&mut self, r: std::ops::Range<usize>, v: u32, t: u8, cond: Cond) {
        for i in r {
            if cond.hit(self.tag3[i]) {
                self.set3(i, v, t);
            }
        }
    }

    /// A second-level group under /16 block `i`, filled with what its entry held.
    fn ensure_l2(&mut self, i: u32) -> Result<()> {
        let e = self.fib.l1[i as usize];
        if e & GROUP != 0 {
            return Ok(());
        }
        let hint = self.hints.as_ref().and_then(|h| h.l2.get(&i).copied());
        let g = match self.l2.take_hint(hint) {
            Some(g) => g,
            None => self.alloc(2, "L2 (/17–/24) groups", self.cap.l2_groups as usize)?,
        };
        let t = self.tag1[i as usize];
        let n = GROUP_SIZE as usize;
        grow(
            &mut self.fib.l2,
            &mut self.tag2,
            &mut self.dirty[1],
            g,
            self.cap.l2_groups,
        );
        for j in g as usize * n..(g as usize + 1) * n {
            self.tag2[j] = t;
            self.fib.l2[j] = e;
        }
        self.dirty[1].mark_group(g);
        self.set1(i as usize, GROUP | g, 0);
        Ok(())
    }

    /// A third-level group under /24 block `b` (whose /16 has its group already).
    fn ensure_l3(&mut self, b: u32) -> Result<()> {
        let n = GROUP_SIZE as usize;
        let g2 = (self.fib.l1[(b >> 8) as usize] & !GROUP) as usize;
        let e2 = g2 * n + (b & 0xff) as usize;
        let e = self.fib.l2[e2];
        if e & GROUP != 0 {
            return Ok(());
        }
        let hint = self.hints.as_ref().and_then(|h| h.l3.get(&b).copied());
        let g = match self.l3.take_hint(hint) {
            Some(g) => g,
            None => self.alloc(3, "L3 (/25–/32) groups", self.cap.l3_groups as usize)?,
        };
        let t = self.tag2[e2];
        grow(
            &mut self.fib.l3,
            &mut self.tag3,
            &mut self.dirty[2],
            g,
            self.cap.l3_groups,
        );
        for j in g as usize * n..(g as usize + 1) * n {
            self.tag3[j] = t;
            self.fib.l3[j] = e;
        }
        self.dirty[2].mark_group(g);
        self.set2(e2, GROUP | g, 0);
        Ok(())
    }

    /// /16 block `i` holds no longer prefix any more: its entry takes the group's (uniform)
    /// value again and the group goes.
    fn collapse_l2(&mut self, i: u32) {
        let n = GROUP_SIZE as usize;
        let g = self.fib.l1[i as usize] & !GROUP;
        let first = g as usize * n;
        let (v, t) = (self.fib.l2[first], self.tag2[first]);
        debug_assert!(self.fib.l2[first..first + n].iter().all(|e| *e == v));
        self.set1(i as usize, v, t);
        self.l2.release(g);
    }

    fn collapse_l3(&mut self, b: u32) {
        let n = GROUP_SIZE as usize;
        let g2 = (self.fib.l1[(b >> 8) as usize] & !GROUP) as usize;
        let e2 = g2 * n + (b & 0xff) as usize;
        let g = self.fib.l2[e2] & !GROUP;
        let first = g as usize * n;
        let (v, t) = (self.fib.l3[first], self.tag3[first]);
        debug_assert!(self.fib.l3[first..first + n].iter().all(|e| *e == v));
        self.set2(e2, v, t);
        self.l3.release(g);
    }
}

/// Room in a level for group `g`, growing by half at a time.
fn grow(level: &mut Vec<u32>, tags: &mut Vec<u8>, dirty: &mut Dirty, g: u32, groups: u32) {
    let n = GROUP_SIZE as usize;
    let need = (g as usize + 1) * n;
    if level.len() >= need {
        return;
    }
    // In steps of 1 024 groups (1 MiB): a reallocation of this size moves no data (mremap),
    // and the level never holds much more than the table uses.
    let step = 1024 * n;
    let len = need.div_ceil(step).max(1) * step;
    let len = len.min(groups as usize * n).max(need);
    level.resize(len, 0);
    tags.resize(len, 0);
    dirty.resize(len);
}

const EMPTY_GROUP: NhGroup = NhGroup {
    count: 0,
    members: [0; MAX_PATHS],
};

/// The prefix with its host bits cleared.
fn canonical(n: IpNet) -> IpNet {
    match n {
        IpNet::V4(n) => IpNet::V4(Ipv4Net {
            addr: n.network().into(),
            len: n.len,
        }),
        IpNet::V6(n) => IpNet::V6(Ipv6Net {
            addr: n.network().into(),
            len: n.len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, Ipv6Addr},
    };

    use super::*;
    use crate::fib::tests::{nh, Rng};
    use crate::fib::Table6;
    use router_common::{Block6, Pfx6};

    /// The reference: every prefix with its routes, matched by scanning the lengths.
    #[derive(Clone, Default)]
    struct Reference(BTreeMap<IpNet, Vec<Route>>);

    impl Reference {
        fn lookup(&self, d: u128, v6: bool) -> Option<Vec<Route>> {
            let top = if v6 { 128 } else { 32 };
            (0..=top).rev().find_map(|len| {
                let net = if v6 {
                    IpNet::V6(Ipv6Net {
                        addr: (d & Ipv6Net::mask(len)).into(),
                        len,
                    })
                } else {
                    IpNet::V4(Ipv4Net {
                        addr: (d as u32 & Ipv4Net::mask(len)).into(),
                        len,
                    })
                };
                self.0.get(&net).cloned()
            })
        }
    }

    /// What a lookup in `fib` (as the maps hold it) finds: the route, or the ECMP members.
    fn resolve(fib: &Fib, d: u128, v6: bool) -> Option<Vec<Route>> {
        let r = if v6 {
            fib.lookup6(Ipv6Addr::from(d))?
        } else {
            fib.lookup(Ipv4Addr::from(d as u32))?
        };
        if r.kind != route_kind::ECMP {
            return Some(vec![r]);
        }
        let g = fib.groups[r.tx_port as usize]?;
        let mut m: Vec<Route> = g.members[..g.count as usize]
            .iter()
            .map(|i| fib.nexthops[*i as usize])
            .collect::<Option<_>>()?;
        m.sort();
        Some(m)
    }

    /// One write to the maps.
    enum Write {
        Nexthop(u32, Route),
        Group(u32, NhGroup),
        Level(usize, u32, u32),
        Set6((u8, u128), u32),
        Del6((u8, u128)),
        /// Block, word of the block (starts as two words each, then values), word.
        Block6(u32, usize, u32),
        Node6(u32, u32),
        L1_6(u32, u32),
        Pfx6(u32, Pfx6),
    }

    /// The writes of `w` one by one, in the order the maps take them (a block word by word).
    fn flatten(w: &Writes, fib: &Fib, t6: &Table6) -> Vec<Write> {
        let mut v: Vec<Write> = Vec::new();
        v.extend(w.nexthops.iter().map(|(i, r)| Write::Nexthop(*i, *r)));
        v.extend(w.groups.iter().map(|(i, g)| Write::Group(*i, *g)));
        v.extend(w.v6_set.iter().map(|(k, e)| Write::Set6(*k, *e)));
        for (level, l, values) in [
            (3, &w.l3, &fib.l3),
            (2, &w.l2, &fib.l2),
            (1, &w.l1, &fib.l1),
        ] {
            l.each(values, &mut |i, e| v.push(Write::Level(level, i, e)));
        }
        let s = &w.six;
        for b in &s.blocks {
            let blk = &t6.blocks[*b as usize];
            for (k, x) in blk.starts.iter().enumerate() {
                v.push(Write::Block6(*b, 2 * k, *x as u32));
                v.push(Write::Block6(*b, 2 * k + 1, (*x >> 32) as u32));
            }
            for (k, x) in blk.vals.iter().enumerate() {
                v.push(Write::Block6(*b, 16 + k, *x));
            }
        }
        for g in &s.nodes {
            for i in *g << 8..(*g + 1) << 8 {
                v.push(Write::Node6(i, t6.nodes[i as usize]));
            }
        }
        v.extend(
            s.node_entries
                .iter()
                .map(|i| Write::Node6(*i, t6.nodes[*i as usize])),
        );
        v.extend(s.l1.iter().map(|i| Write::L1_6(*i, t6.l1[*i as usize])));
        v.extend(w.v6_del.iter().map(|k| Write::Del6(*k)));
        v.extend(s.pfx.iter().map(|i| Write::Pfx6(*i, t6.pfx[*i as usize])));
        v
    }

    fn write_one(m: &mut Fib, w: &Write) {
        match w {
            Write::Nexthop(i, r) => m.nexthops[*i as usize] = (*r != Route::NONE).then_some(*r),
            Write::Group(i, g) => m.groups[*i as usize] = (g.count != 0).then_some(*g),
            Write::Level(1, i, e) => m.l1[*i as usize] = *e,
            Write::Level(level, i, e) => {
                let l = if *level == 2 { &mut m.l2 } else { &mut m.l3 };
                if l.len() <= *i as usize {
                    l.resize((*i as usize / 256 + 1) * 256, 0);
                }
                l[*i as usize] = *e;
            }
            Write::Set6(k, e) => {
                m.v6.insert(*k, *e);
            }
            Write::Del6(k) => {
                m.v6.remove(k);
            }
            Write::Block6(b, k, x) => {
                let b = *b as usize;
                if m.t6.blocks.len() <= b {
                    m.t6.blocks.resize(
                        b + 1,
                        Block6 {
                            starts: [0; 8],
                            vals: [0; 8],
                        },
                    );
                }
                let blk = &mut m.t6.blocks[b];
                if *k < 16 {
                    let s = &mut blk.starts[k / 2];
                    *s = if k % 2 == 0 {
                        (*s & !0xffff_ffff) | *x as u64
                    } else {
                        (*s & 0xffff_ffff) | (*x as u64) << 32
                    };
                } else {
                    blk.vals[k - 16] = *x;
                }
            }
            Write::Node6(i, e) => {
                let i = *i as usize;
                if m.t6.nodes.len() <= i {
                    m.t6.nodes.resize((i / 256 + 1) * 256, 0);
                }
                m.t6.nodes[i] = *e;
            }
            Write::L1_6(i, e) => m.t6.l1[*i as usize] = *e,
            Write::Pfx6(i, p) => {
                let i = *i as usize;
                if m.t6.pfx.len() <= i {
                    m.t6.pfx.resize(i + 1, Pfx6::default());
                }
                m.t6.pfx[i] = *p;
                // The maps' prefixes are the elements' (up to the first unused one, as a
                // reader finds them) and the LPM trie's.
                m.v6.retain(|k, _| k.0 > 64);
                for p in m.t6.pfx.iter().take_while(|p| p.len_1 != 0) {
                    m.v6.insert(((p.len_1 - 1) as u8, (p.addr as u128) << 64), p.val);
                }
            }
        }
    }

    /// Prefixes clustered in a few blocks so that they nest at every level (IPv4: 10.0/14;
    /// IPv6: 2001:db8::/40, lengths up to /72).
    fn random_net(rng: &mut Rng, v6: bool) -> IpNet {
        if v6 {
            let len = [0, 32, 40, 44, 48, 48, 56, 64, 64, 72][rng.below(10) as usize];
            let a = (0x2001_0db8u128 << 96)
                | ((rng.below(4) as u128) << 88)
                | ((rng.below(8) as u128) << 80)
                | ((rng.next() as u128) << 16);
            IpNet::V6(Ipv6Net {
                addr: (a & Ipv6Net::mask(len)).into(),
                len,
            })
        } else {
            let len = [0, 8, 12, 15, 16, 16, 18, 20, 22, 24, 24, 24, 26, 28, 30, 32]
                [rng.below(16) as usize];
            let a = (10u32 << 24) | ((rng.below(4) as u32) << 16) | (rng.next() as u32 & 0xffff);
            IpNet::V4(Ipv4Net {
                addr: (a & Ipv4Net::mask(len)).into(),
                len,
            })
        }
    }

    fn random_routes(rng: &mut Rng) -> Vec<Route> {
        let n = if rng.below(5) == 0 {
            2 + rng.below(3)
        } else {
            1
        };
        let mut v: Vec<Route> = (0..n).map(|_| nh(rng.below(24))).collect();
        v.sort();
        v.dedup();
        v
    }

    fn probe(rng: &mut Rng, net: IpNet) -> u128 {
        let (v6, len, a) = match net {
            IpNet::V4(n) => (false, n.len as u32, n.network() as u128),
            IpNet::V6(n) => (true, n.len as u32, n.network()),
        };
        let bits = if v6 { 128 } else { 32 };
        let host_mask = if len == bits {
            0
        } else {
            u128::MAX >> (128 - (bits - len))
        };
        let r = ((rng.next() as u128) << 64) | rng.next() as u128;
        let host = match rng.below(4) {
            0 => 0,
            1 => host_mask,
            // Beside a prefix longer than /64, in its /64: what a block of the lower bits holds.
            3 if v6 && len > 64 => return (a & !(u64::MAX as u128)) | (r & u64::MAX as u128),
            _ => r & host_mask,
        };
        a | host
    }

    /// Random single-route changes (add, replace, ECMP, remove) on a table in tight maps, so
    /// that groups and nexthop slots are freed and reused: after every change, every single
    /// write taken in order leaves a table in which each probe finds its route before or after
    /// the change (never nothing, never a recycled group); after the writes, the maps' copy
    /// equals the table in memory and matches the reference.
    fn random_changes(seed: u64, v6_share: u64) {
        let mut rng = Rng(seed);
        let cap = Capacity {
            l2_groups: 12,
            l3_groups: 10,
            nexthops: 96,
            v6_nodes: 30,
            v6_blocks: 70,
            v6_prefixes: 100,
        };
        let mut reference = Reference::default();
        let mut initial = Vec::new();
        while reference.0.len() < 60 {
            let v6 = rng.below(100) < v6_share;
            let net = random_net(&mut rng, v6);
            if reference.0.contains_key(&net) || net.prefix_len() > 24 && !net.is_ipv6() {
                continue;
            }
            let rs = vec![nh(rng.below(24))];
            initial.push((net, rs[0]));
            reference.0.insert(net, rs);
        }
        let mut live = Live::build(&initial, &Fib::empty(cap), cap).unwrap();
        let mut maps = live.fib.clone();
        maps.t6 = live.table6().clone();
        live.forget_writes();
        let mut full_checks = 0;
        for step in 0..1500 {
            let before = reference.clone();
            // One to three changes per batch: numbers freed by one may not serve the next.
            let mut nets = Vec::new();
            let mut refused = false;
            for _ in 0..1 + rng.below(3) {
                let v6 = rng.below(100) < v6_share;
                let net = if rng.below(3) == 0 && !reference.0.is_empty() {
                    *reference
                        .0
                        .keys()
                        .nth(rng.below(reference.0.len() as u64) as usize)
                        .unwrap()
                } else {
                    random_net(&mut rng, v6)
                };
                nets.push(net);
                if reference.0.contains_key(&net) && rng.below(2) == 0 {
                    assert!(live.remove(net).unwrap());
                    reference.0.remove(&net);
                    continue;
                }
                let rs = random_routes(&mut rng);
                match live.set(net, &rs) {
                    Ok(()) => {
                        reference.0.insert(net, rs);
                    }
                    Err(e) => {
                        // Only a full table may refuse, and then nothing is written: rebuild.
                        assert!(e.to_string().contains("maps hold"), "{e}");
                        assert!(live.is_poisoned());
                        refused = true;
                        break;
                    }
                }
            }
            // The IPv6 table is recomputed when the writes are taken: a full map refuses there.
            let mut writes = None;
            if !refused {
                match live.take_writes() {
                    Ok(w) => writes = Some(w),
                    Err(e) => {
                        assert!(e.to_string().contains("maps hold"), "{e}");
                        assert!(live.is_poisoned());
                        refused = true;
                    }
                }
            }
            if refused {
                reference = before;
                let all: Vec<(IpNet, Route)> = reference
                    .0
                    .iter()
                    .flat_map(|(n, rs)| rs.iter().map(|r| (*n, *r)))
                    .collect();
                // Built over the maps; a build renumbering more than the free room allows is
                // refused like a change (the operator re-applies the router): then afresh.
                live = match Live::build(&all, &maps, cap) {
                    Ok(l) => l,
                    Err(e) => {
                        assert!(e.to_string().contains("maps hold"), "{e}");
                        Live::build(&all, &Fib::empty(cap), cap).unwrap()
                    }
                };
                maps = live.fib.clone();
                maps.t6 = live.table6().clone();
                live.forget_writes();
                continue;
            }
            let mut probes: Vec<(u128, bool)> = Vec::new();
            for n in &nets {
                for _ in 0..3 {
                    probes.push((probe(&mut rng, *n), n.is_ipv6()));
                }
            }
            if !reference.0.is_empty() {
                for _ in 0..2 {
                    let n = *reference
                        .0
                        .keys()
                        .nth(rng.below(reference.0.len() as u64) as usize)
                        .unwrap();
                    probes.push((probe(&mut rng, n), n.is_ipv6()));
                }
            }
            let expect: Vec<_> = probes
                .iter()
                .map(|(d, v6)| (before.lookup(*d, *v6), reference.lookup(*d, *v6)))
                .collect();
            let writes = writes.expect("taken above");
            let w = flatten(&writes, &live.fib, live.table6());
            for (k, one) in w.iter().enumerate() {
                write_one(&mut maps, one);
                for ((d, v6), (was, now)) in probes.iter().zip(&expect) {
                    let got = resolve(&maps, *d, *v6);
                    assert!(
                        got == *was || got == *now,
                        "step {step}, changing {nets:?}, write {k} of {}: {d:x} finds {got:?}, \
                         not {was:?} (before) or {now:?} (after)",
                        w.len()
                    );
                }
            }
            if step % 100 == 0 {
                full_checks += 1;
                for _ in 0..300 {
                    let n = *reference
                        .0
                        .keys()
                        .nth(rng.below(reference.0.len() as u64) as usize)
                        .unwrap();
                    let d = probe(&mut rng, n);
                    assert_eq!(
                        resolve(&maps, d, n.is_ipv6()),
                        reference.lookup(d, n.is_ipv6())
                    );
                }
                // Apart from entries of unused groups, the maps hold the table in memory.
                assert_eq!(maps.l1, live.fib.l1, "step {step}");
                assert_eq!(maps.v6, live.fib.v6, "step {step}");
                assert_eq!(maps.t6.l1, live.table6().l1, "step {step}");
                let used = |p: &[Pfx6]| -> Vec<Pfx6> {
                    let mut v: Vec<Pfx6> = p.iter().copied().filter(|p| p.len_1 != 0).collect();
                    v.sort_by_key(|p| (p.addr, p.len_1));
                    v
                };
                assert_eq!(used(&maps.t6.pfx), used(&live.table6().pfx), "step {step}");
                for g in super::super::groups_used(&live.fib.l1) {
                    let r = g as usize * 256..(g as usize + 1) * 256;
                    assert_eq!(maps.l2[r.clone()], live.fib.l2[r], "step {step}");
                }
            }
        }
        assert!(full_checks > 0);
        assert_eq!(live.len(), reference.0.len());
    }

    #[test]
    fn single_ipv4_changes_match_a_reference_at_every_write() {
        random_changes(0x1234_5678_9abc_def1, 0);
    }

    #[test]
    fn single_ipv6_changes_match_a_reference_at_every_write() {
        random_changes(0x0fed_cba9_8765_4321, 100);
    }

    #[test]
    fn mixed_changes_share_nexthops_across_families() {
        random_changes(0x5555_aaaa_3333_cccc, 50);
    }

    /// Replacing the whole table changes only what differs, and the same table twice writes
    /// nothing.
    #[test]
    fn replace_all_writes_only_the_difference() {
        let routes: Vec<(IpNet, Route)> = vec![
            ("10.1.0.0/16".parse().unwrap(), nh(1)),
            ("10.1.2.0/24".parse().unwrap(), nh(2)),
            ("10.1.2.128/25".parse().unwrap(), nh(3)),
            ("2001:db8::/32".parse().unwrap(), nh(4)),
        ];
        let mut live = Live::build(
            &routes,
            &Fib::empty(Capacity::default()),
            Capacity::default(),
        )
        .unwrap();
        live.forget_writes();
        live.replace_all(&routes).unwrap();
        assert!(live.take_writes().unwrap().is_empty());
        let mut moved = routes.clone();
        moved[1].1 = nh(5);
        live.replace_all(&moved).unwrap();
        let w = live.take_writes().unwrap();
        // The new nexthop, and the half of the /24's third-level group that the /25 leaves it.
        assert_eq!(w.nexthops.len(), 1);
        assert_eq!(w.l3.entries.len(), 128);
        assert!(w.l1.is_empty() && w.l2.is_empty() && w.v6_set.is_empty());
        assert_eq!(
            live.routes_of("10.1.2.0/24".parse().unwrap()),
            Some(vec![nh(5)])
        );
    }
}

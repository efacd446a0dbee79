//! Building the route table the fast path reads (`router_common::fib`): for IPv4, a 16-8-8
//! multibit trie filled by prefix expansion, so that a lookup costs at most three array reads
//! whatever the size of the table; for IPv6, the entries of the kernel's LPM trie. Both families
//! share the nexthops and ECMP groups.
//!
//! Updates are make-before-break, entry by entry: group and nexthop indices that exist in the
//! table being replaced keep their numbers, new nexthops and groups go to free slots, and the
//! arrays are written leaves first (nexthops, L3, L2, then L1). Every 32-bit entry changes
//! atomically from its old value to its new one, so a lookup racing an update finds either the
//! old route or the new one, never a half-written group or a recycled nexthop.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, Result};
use router_common::{fib::*, NhGroup, Route};

use crate::config::{IpNet, Ipv6Net};

/// The three levels and the nexthops, as they are (or will be) in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fib {
    pub l1: Vec<u32>,
    pub l2: Vec<u32>,
    pub l3: Vec<u32>,
    pub nexthops: Vec<Option<Route>>,
    pub groups: Vec<Option<NhGroup>>,
    /// The IPv6 table: (prefix length, network) → nexthop index + 1.
    pub v6: BTreeMap<(u8, u128), u32>,
}

/// How many groups and nexthops the maps of a router hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub l2_groups: u32,
    pub l3_groups: u32,
    pub nexthops: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            l2_groups: DEFAULT_L2_GROUPS,
            l3_groups: DEFAULT_L3_GROUPS,
            nexthops: DEFAULT_NEXTHOPS,
        }
    }
}

impl Capacity {
    /// Room for a table of `n` routes shaped like an Internet table: an L2 group per route up to
    /// every /16, and L3 groups for one route in 48 being longer than /24.
    pub fn for_max_routes(n: u32) -> Capacity {
        let d = Capacity::default();
        Capacity {
            l2_groups: n.clamp(d.l2_groups, L1_ENTRIES),
            l3_groups: (n / 48).max(d.l3_groups),
            nexthops: d.nexthops,
        }
    }

    /// The larger of two capacities, field by field.
    pub fn max(self, o: Capacity) -> Capacity {
        Capacity {
            l2_groups: self.l2_groups.max(o.l2_groups),
            l3_groups: self.l3_groups.max(o.l3_groups),
            nexthops: self.nexthops.max(o.nexthops),
        }
    }

    /// Room for `routes` with a quarter to spare (and at least the default): one L2 group per
    /// /16 block holding a longer prefix, one L3 group per /24 block holding a longer prefix.
    pub fn for_table(routes: &[(IpNet, Route)]) -> Capacity {
        let d = Capacity::default();
        let mut l2 = std::collections::HashSet::new();
        let mut l3 = std::collections::HashSet::new();
        for n in routes.iter().filter_map(|(n, _)| match n {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }) {
            if n.len > 16 {
                l2.insert(n.network() >> 16);
            }
            if n.len > 24 {
                l3.insert(n.network() >> 8);
            }
        }
        let spare = |n: usize| (n + n / 4) as u32;
        Capacity {
            l2_groups: spare(l2.len()).clamp(d.l2_groups, L1_ENTRIES),
            l3_groups: spare(l3.len()).max(d.l3_groups),
            nexthops: d.nexthops,
        }
    }
}

impl Fib {
    pub fn empty(cap: Capacity) -> Fib {
        Fib {
            l1: vec![0; L1_ENTRIES as usize],
            l2: vec![0; (cap.l2_groups * GROUP_SIZE) as usize],
            l3: vec![0; (cap.l3_groups * GROUP_SIZE) as usize],
            nexthops: vec![None; cap.nexthops as usize],
            groups: vec![None; NH_GROUPS as usize],
            v6: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> Capacity {
        Capacity {
            l2_groups: (self.l2.len() / GROUP_SIZE as usize) as u32,
            l3_groups: (self.l3.len() / GROUP_SIZE as usize) as u32,
            nexthops: self.nexthops.len() as u32,
        }
    }

    /// The lookup the XDP program does, for tests and tools.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Route> {
        let a = u32::from(dst);
        let mut e = self.l1[(a >> 16) as usize];
        if e & GROUP != 0 {
            e = self.l2[(((e & !GROUP) << 8) | ((a >> 8) & 0xff)) as usize];
            if e & GROUP != 0 {
                e = self.l3[(((e & !GROUP) << 8) | (a & 0xff)) as usize];
            }
        }
        if e == 0 {
            return None;
        }
        self.nexthops[(e - 1) as usize]
    }

    /// The IPv6 lookup the XDP program does (through the kernel's LPM trie), for tests and tools.
    pub fn lookup6(&self, dst: Ipv6Addr) -> Option<Route> {
        let a = u128::from(dst);
        (0..=128u8).rev().find_map(|len| {
            let e = self.v6.get(&(len, a & Ipv6Net::mask(len)))?;
            self.nexthops[(*e - 1) as usize]
        })
    }

    /// The table for `routes`, reusing the group and nexthop numbers of `old` (the table in the
    /// maps now) wherever the same prefix block or nexthop is still there.
    pub fn build(routes: &[(IpNet, Route)], old: &Fib) -> Result<Fib> {
        let cap = old.capacity();
        let mut new = Fib::empty(cap);

        // One route per prefix is itself; several (Neutron's way of saying ECMP) make a group.
        // The key is (family, length, network); IPv4 networks sit in the low 32 bits.
        let mut by_prefix: BTreeMap<(bool, u8, u128), Vec<Route>> = BTreeMap::new();
        for (net, r) in routes {
            let k = match net {
                IpNet::V4(n) => (false, n.len, n.network() as u128),
                IpNet::V6(n) => (true, n.len, n.network()),
            };
            by_prefix.entry(k).or_default().push(*r);
        }
        for (k, v) in by_prefix.iter_mut() {
            v.sort();
            v.dedup();
            if v.len() > MAX_PATHS {
                let net = if k.0 {
                    Ipv6Addr::from(k.2).to_string()
                } else {
                    Ipv4Addr::from(k.2 as u32).to_string()
                };
                bail!(
                    "{net}/{} has {} nexthops; at most {MAX_PATHS} are supported",
                    k.1,
                    v.len()
                );
            }
        }
        // Nexthop slots and group numbers: a nexthop or group that stays keeps its number; new
        // ones take numbers the old table does not use.
        let mut slots = Numbering::new(&old.nexthops);
        for v in by_prefix.values() {
            for r in v {
                slots.assign(*r, "distinct nexthops")?;
            }
        }
        let mut groups = Numbering::new(&old.groups);
        let mut value: BTreeMap<(u8, u32), u32> = BTreeMap::new();
        for (&(v6, len, a), v) in &by_prefix {
            let slot = if v.len() == 1 {
                slots.assign(v[0], "distinct nexthops")?
            } else {
                let mut members = [0u32; MAX_PATHS];
                for (m, r) in members.iter_mut().zip(v.iter()) {
                    *m = slots.assign(*r, "distinct nexthops")?;
                }
                let g = groups.assign(
                    NhGroup {
                        count: v.len() as u32,
                        members,
                    },
                    "ECMP groups",
                )?;
                slots.assign(
                    Route {
                        kind: router_common::route_kind::ECMP,
                        tx_port: g,
                        ..Route::NONE
                    },
                    "distinct nexthops",
                )?
            };
            if v6 {
                new.v6.insert((len, a), slot + 1);
            } else {
                value.insert((len, a as u32), slot + 1);
            }
        }
        new.nexthops = slots.into_table();
        new.groups = groups.into_table();

        // Groups: which /16 and /24 blocks need one, with stable numbers.
        let mut need_l2: BTreeMap<u32, u32> = BTreeMap::new(); // l1 index → group
        let mut need_l3: BTreeMap<u32, u32> = BTreeMap::new(); // (dst >> 8) → group
        for &(len, a) in value.keys() {
            if len > 16 {
                need_l2.insert(a >> 16, u32::MAX);
            }
            if len > 24 {
                need_l3.insert(a >> 8, u32::MAX);
            }
        }
        let old_l2_of = |i: u32| {
            let e = old.l1[i as usize];
            (e & GROUP != 0).then_some(e & !GROUP)
        };
        let old_l3_of = |b: u32| {
            let g2 = old_l2_of(b >> 8)?;
            let e = old.l2[((g2 << 8) | (b & 0xff)) as usize];
            (e & GROUP != 0).then_some(e & !GROUP)
        };
        assign(
            &mut need_l2,
            cap.l2_groups,
            old_l2_of,
            old.l1
                .iter()
                .filter(|e| *e & GROUP != 0)
                .map(|e| e & !GROUP),
            "L2 (/17–/24)",
        )?;
        let old_l3_refs = groups_used_in(&old.l2, &groups_used(&old.l1));
        assign(
            &mut need_l3,
            cap.l3_groups,
            old_l3_of,
            old_l3_refs.into_iter(),
            "L3 (/25–/32)",
        )?;

        // Prefix expansion, shortest prefixes first, so that longer ones overwrite them.
        for (&(len, a), &v) in &value {
            let len = len as u32;
            if len <= 16 {
                let start = (a >> 16) as usize;
                new.l1[start..start + (1usize << (16 - len))].fill(v);
                continue;
            }
            let i = a >> 16;
            let g2 = need_l2[&i];
            if new.l1[i as usize] & GROUP == 0 {
                let inherit = new.l1[i as usize];
                new.l2[(g2 << 8) as usize..((g2 + 1) << 8) as usize].fill(inherit);
                new.l1[i as usize] = GROUP | g2;
            }
            if len <= 24 {
                let start = ((g2 << 8) | ((a >> 8) & 0xff)) as usize;
                new.l2[start..start + (1usize << (24 - len))].fill(v);
                continue;
            }
            let b = a >> 8;
            let g3 = need_l3[&b];
            let e2 = ((g2 << 8) | (b & 0xff)) as usize;
            if new.l2[e2] & GROUP == 0 {
                let inherit = new.l2[e2];
                new.l3[(g3 << 8) as usize..((g3 + 1) << 8) as usize].fill(inherit);
                new.l2[e2] = GROUP | g3;
            }
            let start = ((g3 << 8) | (a & 0xff)) as usize;
            new.l3[start..start + (1usize << (32 - len))].fill(v);
        }
        Ok(new)
    }
}

/// The groups of the next level that any entry of `level` points to.
pub fn groups_used(level: &[u32]) -> BTreeSet<u32> {
    level
        .iter()
        .filter(|e| *e & GROUP != 0)
        .map(|e| e & !GROUP)
        .collect()
}

/// The groups of the next level that the entries of groups `groups` of `level` point to.
pub fn groups_used_in(level: &[u32], groups: &BTreeSet<u32>) -> BTreeSet<u32> {
    let n = GROUP_SIZE as usize;
    groups
        .iter()
        .flat_map(|g| level[*g as usize * n..(*g as usize + 1) * n].iter())
        .filter(|e| *e & GROUP != 0)
        .map(|e| e & !GROUP)
        .collect()
}

/// Numbers for nexthops or ECMP groups, stable across tables: a value the old table holds keeps
/// its number; a new value gets the lowest number the old table leaves empty (a number it uses
/// is not recycled in the same update, so no lookup can find a changed value behind it).
struct Numbering<T> {
    old: HashMap<T, u32>,
    old_used: Vec<bool>,
    taken: Vec<bool>,
    assigned: HashMap<T, u32>,
}

impl<T: Copy + Eq + std::hash::Hash> Numbering<T> {
    fn new(old: &[Option<T>]) -> Numbering<T> {
        let mut o = HashMap::new();
        for (i, v) in old.iter().enumerate() {
            if let Some(v) = v {
                o.entry(*v).or_insert(i as u32);
            }
        }
        Numbering {
            old: o,
            old_used: old.iter().map(Option::is_some).collect(),
            taken: vec![false; old.len()],
            assigned: HashMap::new(),
        }
    }

    fn assign(&mut self, v: T, what: &str) -> Result<u32> {
        if let Some(i) = self.assigned.get(&v) {
            return Ok(*i);
        }
        let i = match self.old.get(&v) {
            Some(&i) if !self.taken[i as usize] => i,
            _ => match (0..self.taken.len()).find(|i| !self.taken[*i] && !self.old_used[*i]) {
                Some(i) => i as u32,
                None => bail!(
                    "the route table needs more than {} {what}",
                    self.taken.len()
                ),
            },
        };
        self.taken[i as usize] = true;
        self.assigned.insert(v, i);
        Ok(i)
    }

    fn into_table(self) -> Vec<Option<T>> {
        let mut t = vec![None; self.taken.len()];
        for (v, i) in self.assigned {
            t[i as usize] = Some(v);
        }
        t
    }
}

/// Gives every needed block a group number: its old one when it had one, else a free one that
/// the old table does not reference.
fn assign(
    need: &mut BTreeMap<u32, u32>,
    capacity: u32,
    old_of: impl Fn(u32) -> Option<u32>,
    old_refs: impl Iterator<Item = u32>,
    level: &str,
) -> Result<()> {
    let mut taken = vec![false; capacity as usize];
    for g in old_refs {
        if (g as usize) < taken.len() {
            taken[g as usize] = true;
        }
    }
    let mut mine = vec![false; capacity as usize];
    for (k, g) in need.iter_mut() {
        if let Some(o) = old_of(*k).filter(|o| (*o as usize) < mine.len() && !mine[*o as usize]) {
            *g = o;
            mine[o as usize] = true;
        }
    }
    let mut next = 0usize;
    for (_, g) in need.iter_mut() {
        if *g != u32::MAX {
            continue;
        }
        while next < taken.len() && (taken[next] || mine[next]) {
            next += 1;
        }
        if next == taken.len() {
            bail!(
                "the route table needs more {level} groups than the {capacity} this router's maps hold; \
                 destroy and re-apply the router to size its maps for the table"
            );
        }
        *g = next as u32;
        mine[next] = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ipv4Net;
    use router_common::route_kind;

    fn v4(routes: &[(Ipv4Net, Route)]) -> Vec<(IpNet, Route)> {
        routes.iter().map(|(n, r)| ((*n).into(), *r)).collect()
    }

    /// The simplest correct longest-prefix match: scan every prefix.
    fn reference(routes: &[(Ipv4Net, Route)], dst: Ipv4Addr) -> Option<Route> {
        routes
            .iter()
            .filter(|(n, _)| n.contains(dst))
            .max_by_key(|(n, _)| n.len)
            .map(|(_, r)| *r)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn nh(i: u64) -> Route {
        Route {
            ifindex: 2 + (i % 3) as u32,
            kind: route_kind::GATEWAY,
            nexthop: [
                10,
                0,
                (i >> 8) as u8,
                i as u8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ],
            ..Route::NONE
        }
    }

    /// Random tables clustered in a few /8s so that prefixes nest deeply at every level.
    fn random_routes(rng: &mut Rng, n: usize) -> Vec<(Ipv4Net, Route)> {
        let mut v: Vec<(Ipv4Net, Route)> = Vec::new();
        while v.len() < n {
            let len = (rng.next() % 33) as u8;
            let a = (((rng.next() % 3) as u32 + 10) << 24)
                | (rng.next() as u32
                    & 0x00ff_ffff
                    & if rng.next() % 2 == 0 {
                        0x0000_ffff
                    } else {
                        0x00ff_ffff
                    });
            let net = Ipv4Net {
                addr: Ipv4Addr::from(a & Ipv4Net::mask(len)),
                len,
            };
            if !v.iter().any(|(p, _)| *p == net) {
                v.push((net, nh(rng.next() % 40)));
            }
        }
        v
    }

    fn probe(rng: &mut Rng, routes: &[(Ipv4Net, Route)]) -> Ipv4Addr {
        // Half the probes land inside a random prefix, near its edges or anywhere in it.
        if rng.next() % 2 == 0 {
            let (n, _) = routes[(rng.next() % routes.len() as u64) as usize];
            let host = match rng.next() % 3 {
                0 => 0,
                1 => !Ipv4Net::mask(n.len),
                _ => rng.next() as u32 & !Ipv4Net::mask(n.len),
            };
            Ipv4Addr::from(n.network() | host)
        } else {
            Ipv4Addr::from(
                (((rng.next() % 4) as u32 + 9) << 24) | (rng.next() as u32 & 0x00ff_ffff),
            )
        }
    }

    #[test]
    fn equals_a_reference_lpm_on_random_tables() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..40 {
            let routes = random_routes(&mut rng, 1 + (round * 37) % 600);
            let fib =
                Fib::build(&v4(&routes), &Fib::empty(Capacity::for_table(&v4(&routes)))).unwrap();
            for _ in 0..5000 {
                let d = probe(&mut rng, &routes);
                assert_eq!(fib.lookup(d), reference(&routes, d), "round {round}, {d}");
            }
        }
    }

    #[test]
    fn updates_keep_numbers_and_stay_exact() {
        let mut rng = Rng(12345);
        let mut routes = random_routes(&mut rng, 300);
        let mut fib = Fib::build(&v4(&routes), &Fib::empty(Capacity::default())).unwrap();
        for step in 0..30 {
            // Drop a few routes, add a few, change a few nexthops.
            for _ in 0..10 {
                let i = (rng.next() % routes.len() as u64) as usize;
                routes.swap_remove(i);
            }
            routes.extend(
                random_routes(&mut rng, 10)
                    .into_iter()
                    .filter(|(n, _)| !routes.iter().any(|(p, _)| p == n))
                    .collect::<Vec<_>>(),
            );
            for _ in 0..5 {
                let i = (rng.next() % routes.len() as u64) as usize;
                routes[i].1 = nh(rng.next() % 40);
            }
            let next = Fib::build(&v4(&routes), &fib).unwrap();
            // A nexthop slot that the old table used holds the same nexthop, or is unused now.
            for (i, (a, b)) in fib.nexthops.iter().zip(next.nexthops.iter()).enumerate() {
                if let (Some(a), Some(b)) = (a, b) {
                    assert_eq!(
                        a, b,
                        "step {step}: nexthop slot {i} was reused for another nexthop"
                    );
                }
            }
            for _ in 0..3000 {
                let d = probe(&mut rng, &routes);
                assert_eq!(next.lookup(d), reference(&routes, d), "step {step}, {d}");
            }
            fib = next;
        }
    }

    #[test]
    fn ipv6_routes_match_a_reference_and_share_nexthops_with_ipv4() {
        let mut rng = Rng(777);
        let mut routes: Vec<(IpNet, Route)> = Vec::new();
        let mut six: Vec<(Ipv6Net, Route)> = Vec::new();
        while six.len() < 300 {
            let len = (rng.next() % 129) as u8;
            let a = (0x2001_0db8u128 << 96)
                | ((rng.next() as u128 & 0xff) << 88)
                | ((rng.next() as u128) << 24);
            let n = Ipv6Net {
                addr: Ipv6Addr::from(a & Ipv6Net::mask(len)),
                len,
            };
            if !six.iter().any(|(p, _)| *p == n) {
                six.push((n, nh(rng.next() % 40)));
            }
        }
        routes.extend(six.iter().map(|(n, r)| ((*n).into(), *r)));
        routes.extend(v4(&random_routes(&mut rng, 100)));
        let fib = Fib::build(&routes, &Fib::empty(Capacity::default())).unwrap();
        // 40 distinct nexthops at most, whatever the family that uses them.
        assert!(fib.nexthops.iter().flatten().count() <= 40);
        for _ in 0..5000 {
            let (n, _) = six[(rng.next() % six.len() as u64) as usize];
            let host = (((rng.next() as u128) << 64) | rng.next() as u128) & !Ipv6Net::mask(n.len);
            let d = Ipv6Addr::from(n.network() | host);
            let want = six
                .iter()
                .filter(|(p, _)| p.contains(d))
                .max_by_key(|(p, _)| p.len)
                .map(|(_, r)| *r);
            assert_eq!(fib.lookup6(d), want, "{d}");
        }
        assert_eq!(Fib::build(&routes, &fib).unwrap(), fib);
    }

    #[test]
    fn several_routes_to_one_prefix_make_an_ecmp_group() {
        let routes: Vec<(IpNet, Route)> = vec![
            ("10.10.0.0/16".parse().unwrap(), nh(1)),
            ("10.10.0.0/16".parse().unwrap(), nh(2)),
            ("10.1.0.0/24".parse().unwrap(), nh(3)),
        ];
        let fib = Fib::build(&routes, &Fib::empty(Capacity::default())).unwrap();
        let r = fib.lookup("10.10.3.4".parse().unwrap()).unwrap();
        assert_eq!(r.kind, route_kind::ECMP);
        let g = fib.groups[r.tx_port as usize].unwrap();
        assert_eq!(g.count, 2);
        let mut m: Vec<Route> = g.members[..2]
            .iter()
            .map(|i| fib.nexthops[*i as usize].unwrap())
            .collect();
        m.sort();
        let mut want = vec![nh(1), nh(2)];
        want.sort();
        assert_eq!(m, want);
        // Built again over itself, nothing moves.
        assert_eq!(Fib::build(&routes, &fib).unwrap(), fib);
    }

    #[test]
    fn the_default_route_and_host_routes() {
        let r = |i| nh(i);
        let routes: Vec<(IpNet, Route)> = vec![
            ("0.0.0.0/0".parse().unwrap(), r(1)),
            ("10.1.2.3/32".parse().unwrap(), r(2)),
            ("10.1.2.0/24".parse().unwrap(), r(3)),
            ("10.1.0.0/16".parse().unwrap(), r(4)),
            ("10.1.2.128/25".parse().unwrap(), r(5)),
        ];
        let fib = Fib::build(&routes, &Fib::empty(Capacity::default())).unwrap();
        let l = |s: &str| fib.lookup(s.parse().unwrap());
        assert_eq!(l("8.8.8.8"), Some(r(1)));
        assert_eq!(l("10.1.2.3"), Some(r(2)));
        assert_eq!(l("10.1.2.4"), Some(r(3)));
        assert_eq!(l("10.1.2.200"), Some(r(5)));
        assert_eq!(l("10.1.9.9"), Some(r(4)));
        let empty = Fib::build(&[], &fib).unwrap();
        assert_eq!(empty.lookup("10.1.2.3".parse().unwrap()), None);
    }
}

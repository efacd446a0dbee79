//! Building the route table the fast path reads (`router_common::fib`): for IPv4, a 16-8-8
//! multibit trie filled by prefix expansion, so that a lookup costs at most three array reads
//! whatever the size of the table; for IPv6, ranges of the upper 64 bits under a 16-8-…-8 trie
//! (`six`), with the prefixes longer than /64 in the kernel's LPM trie. Both families share the
//! nexthops and ECMP groups.
//!
//! Updates are make-before-break, entry by entry: group and nexthop indices that exist in the
//! table being replaced keep their numbers, new nexthops and groups go to free slots, and the
//! arrays are written leaves first (nexthops, L3, L2, then L1). Every 32-bit entry changes
//! atomically from its old value to its new one, so a lookup racing an update finds either the
//! old route or the new one, never a half-written group or a recycled nexthop. `Live` keeps the
//! table in memory and changes it one route at a time.

mod live;
mod pool;
mod six;
pub mod writer;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use router_common::{fib::*, NhGroup, Route};

use crate::config::{IpNet, Ipv6Net};
pub use live::{Live, Writes};
pub use pool::wait_for_lookups;
pub use six::{Cap6, Table6, Writes6};

/// The three levels and the nexthops, as they are (or will be) in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fib {
    pub l1: Vec<u32>,
    pub l2: Vec<u32>,
    pub l3: Vec<u32>,
    pub nexthops: Vec<Option<Route>>,
    pub groups: Vec<Option<NhGroup>>,
    /// The IPv6 prefixes: (prefix length, network) → nexthop index + 1.
    pub v6: BTreeMap<(u8, u128), u32>,
    /// The IPv6 table the fast path reads (prefixes up to /64; longer ones are `v6`'s entries
    /// in the LPM trie).
    pub t6: Table6,
}

/// How many groups and nexthops the maps of a router hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub l2_groups: u32,
    pub l3_groups: u32,
    pub nexthops: u32,
    pub v6_nodes: u32,
    pub v6_blocks: u32,
    pub v6_prefixes: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            l2_groups: DEFAULT_L2_GROUPS,
            l3_groups: DEFAULT_L3_GROUPS,
            nexthops: DEFAULT_NEXTHOPS,
            v6_nodes: router_common::fib6::DEFAULT_NODES,
            v6_blocks: router_common::fib6::DEFAULT_BLOCKS,
            v6_prefixes: router_common::fib6::DEFAULT_PREFIXES,
        }
    }
}

impl Capacity {
    /// Room for a table of `n` routes shaped like an Internet table: an L2 group per route up to
    /// every /16, and L3 groups for one route in 48 being longer than /24; IPv6 room for n / 4.
    pub fn for_max_routes(n: u32) -> Capacity {
        let d = Capacity::default();
        Capacity {
            l2_groups: n.clamp(d.l2_groups, L1_ENTRIES),
            l3_groups: (n / 48).max(d.l3_groups),
            nexthops: d.nexthops,
            // IPv6, for a quarter as many prefixes (the Internet's IPv6 table is a fifth of its
            // IPv4 one): a block per prefix, a group per 64 (random /48s need one per 80).
            v6_nodes: (n / 256).max(d.v6_nodes),
            v6_blocks: (n / 4).max(d.v6_blocks),
            v6_prefixes: (n / 4).max(d.v6_prefixes),
        }
    }

    /// The IPv6 part.
    pub fn six(&self) -> Cap6 {
        Cap6 {
            nodes: self.v6_nodes,
            blocks: self.v6_blocks,
            prefixes: self.v6_prefixes,
        }
    }

    /// The larger of two capacities, field by field.
    pub fn max(self, o: Capacity) -> Capacity {
        Capacity {
            l2_groups: self.l2_groups.max(o.l2_groups),
            l3_groups: self.l3_groups.max(o.l3_groups),
            nexthops: self.nexthops.max(o.nexthops),
            v6_nodes: self.v6_nodes.max(o.v6_nodes),
            v6_blocks: self.v6_blocks.max(o.v6_blocks),
            v6_prefixes: self.v6_prefixes.max(o.v6_prefixes),
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
        let six = Capacity::shape6(routes);
        Capacity {
            l2_groups: spare(l2.len()).clamp(d.l2_groups, L1_ENTRIES),
            l3_groups: spare(l3.len()).max(d.l3_groups),
            nexthops: d.nexthops,
            v6_nodes: spare(six.nodes as usize).max(d.v6_nodes),
            v6_blocks: spare(six.blocks as usize).max(d.v6_blocks),
            v6_prefixes: spare(six.prefixes as usize).max(d.v6_prefixes),
        }
    }

    /// The groups, blocks and prefix elements the IPv6 routes of `routes` take, found by
    /// building their table (each prefix with a value of its own: the most blocks).
    fn shape6(routes: &[(IpNet, Route)]) -> Cap6 {
        let six: Vec<&Ipv6Net> = routes
            .iter()
            .filter_map(|(n, _)| match n {
                IpNet::V6(n) => Some(n),
                IpNet::V4(_) => None,
            })
            .collect();
        let n = six.len() as u32 + 1;
        // Upper bounds: a block holds a prefix edge at least, a group 8 of them per level.
        let mut t = six::Six::new(
            Cap6 {
                nodes: n * 3 / 2 + 16,
                blocks: 2 * n + 16,
                prefixes: n,
            },
            None,
        );
        for (i, p) in six.iter().enumerate() {
            let top = (p.network() >> 64) as u64;
            if p.len <= 64 {
                let _ = t.set(top, p.len, i as u32 + 1);
            } else {
                t.long_set(top, p.network() as u64, p.len, i as u32 + 1);
            }
        }
        if t.settle().is_err() {
            return Cap6 {
                nodes: n,
                blocks: 2 * n,
                prefixes: n,
            };
        }
        let (nodes, blocks) = t.t.used();
        Cap6 {
            nodes: nodes.last().map_or(0, |g| g + 1),
            blocks: blocks.last().map_or(0, |b| b + 1),
            prefixes: t.len() as u32,
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
            t6: Table6::empty(),
        }
    }

    pub fn capacity(&self) -> Capacity {
        Capacity {
            l2_groups: (self.l2.len() / GROUP_SIZE as usize) as u32,
            l3_groups: (self.l3.len() / GROUP_SIZE as usize) as u32,
            nexthops: self.nexthops.len() as u32,
            v6_nodes: (self.t6.nodes.len() / GROUP_SIZE as usize) as u32,
            v6_blocks: self.t6.blocks.len() as u32,
            v6_prefixes: self.t6.pfx.len() as u32,
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

    /// The IPv6 lookup the XDP program does, for tests and tools.
    pub fn lookup6(&self, dst: Ipv6Addr) -> Option<Route> {
        self.lookup6_in(&self.t6, dst)
    }

    /// The IPv6 lookup in table `t6` (with this table's long prefixes and nexthops).
    pub fn lookup6_in(&self, t6: &Table6, dst: Ipv6Addr) -> Option<Route> {
        use router_common::fib6::{INDEX, LONG};
        let a = u128::from(dst);
        let mut e = t6.lookup((a >> 64) as u64, a as u64);
        if e & LONG != 0 {
            e = (65..=128u8)
                .rev()
                .find_map(|len| self.v6.get(&(len, a & Ipv6Net::mask(len))).copied())
                .unwrap_or(e & INDEX);
        }
        if e == 0 {
            return None;
        }
        self.nexthops[(e - 1) as usize]
    }

    /// The table for `routes`, reusing the group and nexthop numbers of `old` (the table in the
    /// maps now) wherever the same prefix block or nexthop is still there (see `Live::build`).
    pub fn build(routes: &[(IpNet, Route)], old: &Fib) -> Result<Fib> {
        let cap = Capacity::default()
            .max(old.capacity())
            .max(Capacity::for_table(routes));
        let mut live = Live::build(routes, old, cap)?;
        live.take_writes()?;
        let t6 = live.table6().clone();
        let mut fib = live.fib;
        fib.t6 = t6;
        // The levels end with the last group in use (whatever the order they grew in).
        let used2 = groups_used(&fib.l1);
        let end2 = used2
            .last()
            .map_or(0, |g| (*g as usize + 1) * GROUP_SIZE as usize);
        fib.l2.truncate(end2);
        let end3 = groups_used_in(&fib.l2, &used2)
            .last()
            .map_or(0, |g| (*g as usize + 1) * GROUP_SIZE as usize);
        fib.l3.truncate(end3);
        Ok(fib)
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

    /// Shared with `live`'s tests.
    pub(super) struct Rng(pub(super) u64);
    impl Rng {
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(super) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    pub(super) fn nh(i: u64) -> Route {
        let mut nexthop = [0u8; 16];
        nexthop[..4].copy_from_slice(&[10, 0, (i >> 8) as u8, i as u8]);
        Route {
            ifindex: 2 + (i % 3) as u32,
            kind: route_kind::GATEWAY,
            nexthop,
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

//! Random routing tables shaped like a real one: mostly /24, the rest spread from /8 to /32.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use router_ctl::config::{Ipv4Net, Ipv6Net};

use crate::stats::Rng;

/// `n` distinct prefixes (the first is 0.0.0.0/0, so that every destination is routed), first
/// octets in 1..=223 except 127, so that no destination is a martian or multicast.
pub fn random_table(n: usize, seed: u64) -> Vec<Ipv4Net> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    v.push(Ipv4Net {
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    });
    seen.insert((0u32, 0u8));
    while v.len() < n {
        let len = match rng.below(1000) {
            0..=599 => 24,
            600..=799 => 22 + rng.below(2) as u8,
            800..=969 => 16 + rng.below(6) as u8,
            970..=984 => 8 + rng.below(8) as u8,
            _ => 25 + rng.below(8) as u8,
        };
        let first = loop {
            let f = 1 + rng.below(223) as u32;
            if f != 127 {
                break f;
            }
        };
        let addr = (first << 24) | (rng.next() as u32 & 0x00ff_ffff);
        let net = addr & Ipv4Net::mask(len);
        if seen.insert((net, len)) {
            v.push(Ipv4Net {
                addr: Ipv4Addr::from(net),
                len,
            });
        }
    }
    v
}

/// A random address inside `net`.
pub fn addr_in(net: &Ipv4Net, rng: &mut Rng) -> Ipv4Addr {
    let host = rng.next() as u32 & !Ipv4Net::mask(net.len);
    let mut a = net.network() | host;
    if net.len == 0 {
        // Keep the default route's destinations out of the martian ranges too.
        a = (a & 0x00ff_ffff) | ((1 + (rng.below(126) as u32)) << 24);
    }
    Ipv4Addr::from(a)
}

/// `n` distinct IPv6 prefixes shaped like the IPv6 Internet table: ::/0 first (in 2000::/3 for
/// the destinations drawn from it), then mostly /48, the rest /29 to /64 and a few longer.
pub fn random_table6(n: usize, seed: u64) -> Vec<Ipv6Net> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    v.push(Ipv6Net {
        addr: Ipv6Addr::UNSPECIFIED,
        len: 0,
    });
    seen.insert((0u128, 0u8));
    while v.len() < n {
        let len = match rng.below(1000) {
            0..=499 => 48,
            500..=799 => 29 + rng.below(19) as u8,
            800..=969 => 49 + rng.below(16) as u8,
            _ => 65 + rng.below(64) as u8,
        };
        let a = (0x2u128 << 125) | ((rng.next() as u128) << 64 | rng.next() as u128) >> 3;
        let net = a & Ipv6Net::mask(len);
        if seen.insert((net, len)) {
            v.push(Ipv6Net {
                addr: Ipv6Addr::from(net),
                len,
            });
        }
    }
    v
}

/// A random address inside `net`, in 2000::/3 for the default route.
pub fn addr_in6(net: &Ipv6Net, rng: &mut Rng) -> Ipv6Addr {
    let r = (rng.next() as u128) << 64 | rng.next() as u128;
    let mut a = net.network() | (r & !Ipv6Net::mask(net.len));
    if net.len == 0 {
        a = (0x2u128 << 125) | (a >> 3);
    }
    Ipv6Addr::from(a)
}

//! Lookups: the ingress device, the router's own addresses, the route tables, ECMP members.

use aya_ebpf::maps::lpm_trie::Key;
use router_common::{fib, fib6, Iface, Route, IFACE_INDEX_SLOTS};

use crate::maps::{
    FIB6, FIB6_BLOCKS, FIB6_L1, FIB6_NODES, FIB_L1, FIB_L2, FIB_L3, IFACES, IFACE_INDEX, LOCAL4,
    LOCAL_BITS, NEXTHOPS, NH_GROUPS,
};

/// The ingress device: an array read, or a hash lookup when its index slot holds another device.
#[inline(always)]
pub fn iface_of(ifindex: u32) -> Option<&'static Iface> {
    if let Some(at) = IFACE_INDEX.get(ifindex & (IFACE_INDEX_SLOTS - 1)) {
        if at.ifindex == ifindex {
            return Some(&at.iface);
        }
    }
    // SAFETY: a map lookup; the value is read while the program runs.
    unsafe { IFACES.get(&ifindex) }
}

/// One of the router's own IPv4 addresses: a bit test, then an exact lookup on a hit.
#[inline(always)]
pub fn is_local4(a: u32) -> bool {
    let Some(bits) = LOCAL_BITS.get(0) else {
        return false;
    };
    let Some(w) = bits.get(((a & 0xffff) >> 6) as usize) else {
        return false;
    };
    (*w >> (a & 63)) & 1 != 0 && unsafe { LOCAL4.get(&a) }.is_some()
}

/// IPv4 longest-prefix match: at most three array reads, whatever the size of the table.
#[inline(always)]
pub fn fib_lookup(dst: u32) -> Option<&'static Route> {
    let mut e = *FIB_L1.get(dst >> 24)?.get(((dst >> 16) & 0xff) as usize)?;
    if e & fib::GROUP != 0 {
        e = *FIB_L2
            .get(e & !fib::GROUP)?
            .get(((dst >> 8) & 0xff) as usize)?;
        if e & fib::GROUP != 0 {
            e = *FIB_L3.get(e & !fib::GROUP)?.get((dst & 0xff) as usize)?;
        }
    }
    if e == 0 {
        return None;
    }
    NEXTHOPS.get(e - 1)
}

/// IPv6 longest-prefix match (see `router_common::fib6`): the first level, the groups below it
/// while the entry points to one, the range in a block, for a /64 holding longer prefixes the
/// range of its lower 64 bits (or the LPM trie when they do not fit in a block).
#[inline(always)]
pub fn fib6_lookup(dst: [u8; 16]) -> Option<&'static Route> {
    let hi = u64::from_be_bytes([
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7],
    ]);
    let mut e = *FIB6_L1
        .get((hi >> 56) as u32)?
        .get(((hi >> 48) & 0xff) as usize)?;
    let mut shift = 40u32;
    for _ in 0..fib6::DEPTH {
        if e & fib6::NODE == 0 {
            break;
        }
        e = *FIB6_NODES
            .get(e & fib6::INDEX)?
            .get(((hi >> shift) & 0xff) as usize)?;
        shift = shift.wrapping_sub(8);
    }
    if e & (fib6::BLOCK | fib6::LONG) == fib6::BLOCK {
        e = block6_search(e, hi)?;
    }
    if e & (fib6::BLOCK | fib6::LONG) == fib6::BLOCK | fib6::LONG {
        // A /64 holding longer prefixes: the ranges of the lower 64 bits.
        let lo = u64::from_be_bytes([
            dst[8], dst[9], dst[10], dst[11], dst[12], dst[13], dst[14], dst[15],
        ]);
        e = block6_search(e, lo)?;
    } else if e & fib6::LONG != 0 {
        e = match FIB6.get(Key::new(128, dst)) {
            Some(v) => *v,
            None => e & fib6::INDEX,
        };
    }
    NEXTHOPS.get((e & fib6::INDEX).wrapping_sub(1))
}

/// The value of the range of block `e` holding `key`: the last start at or below it, in three
/// steps (starts[0] is the chunk's first address).
#[inline(always)]
fn block6_search(e: u32, key: u64) -> Option<u32> {
    let b = FIB6_BLOCKS.get(e & fib6::INDEX)?;
    let mut i = 0usize;
    if *b.starts.get(4)? <= key {
        i = 4;
    }
    if *b.starts.get(i + 2)? <= key {
        i += 2;
    }
    if *b.starts.get(i + 1)? <= key {
        i += 1;
    }
    b.vals.get(i).copied()
}

/// The member of ECMP group `group` that flow hash `h` picks.
#[inline(always)]
pub fn ecmp_pick(group: u32, mut h: u32) -> Option<&'static Route> {
    let g = NH_GROUPS.get(group)?;
    let n = g.count;
    if n == 0 {
        return None;
    }
    h = h.wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    // `get` bounds the index for the verifier, which does not follow the bounds of a remainder
    // (so n is deliberately not checked against MAX_PATHS: the compiler would drop this check).
    let idx = *g.members.get((h % n) as usize)?;
    NEXTHOPS.get(idx)
}

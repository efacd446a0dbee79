//! The router's fast path: one XDP program attached to every `qr-` device of a router.
//!
//! Ethernet → IPv4 or IPv6 → longest-prefix route → neighbour → MAC rewrite, TTL − 1 with an
//! RFC 1624 checksum update (IPv6: hop limit − 1, no header checksum) → redirect through a
//! devmap. Everything else goes to the kernel (XDP_PASS) with a counted reason, so the
//! namespace's kernel keeps doing what Neutron's router does.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, DevMap, HashMap, LpmTrie, PerCpuArray},
    programs::XdpContext,
};
use router_common::{
    fib, pass_reason as why, route_kind, Iface, IfaceAt, Neigh, Neigh6Key, NeighKey, NhGroup,
    Route, Stats, IFACE_INDEX_SLOTS, MAX_IFACES, MAX_LOCAL4, MAX_NEIGHS, STATS_SLOTS,
    UNKNOWN_IFACE_SLOT,
};

// The route table (see `router_common::fib`); the controller sizes L2, L3 and NEXTHOPS per router.
// Each array element is a group of 256 entries: array elements are 8-byte aligned, so single
// u32 elements would double the memory and break the flat mmap layout.
#[map(name = "FIB_L1")]
static FIB_L1: Array<[u32; 256]> = Array::with_max_entries(fib::L1_ENTRIES / 256, BPF_F_MMAPABLE);
#[map(name = "FIB_L2")]
static FIB_L2: Array<[u32; 256]> = Array::with_max_entries(fib::DEFAULT_L2_GROUPS, BPF_F_MMAPABLE);
#[map(name = "FIB_L3")]
static FIB_L3: Array<[u32; 256]> = Array::with_max_entries(fib::DEFAULT_L3_GROUPS, BPF_F_MMAPABLE);
#[map(name = "NEXTHOPS")]
static NEXTHOPS: Array<Route> = Array::with_max_entries(fib::DEFAULT_NEXTHOPS, 0);
#[map(name = "NH_GROUPS")]
static NH_GROUPS: Array<NhGroup> = Array::with_max_entries(fib::NH_GROUPS, 0);

// Hash maps the controller updates while the program reads them are not preallocated: a
// preallocated map recycles a replaced or deleted element at once, possibly for another key,
// while a program may still hold it; these are freed after an RCU grace period instead.
#[map(name = "NEIGHS")]
static NEIGHS: HashMap<NeighKey, Neigh> = HashMap::with_max_entries(MAX_NEIGHS, BPF_F_NO_PREALLOC);

// IPv6 routes: the kernel's LPM trie, value = nexthop index + 1 (the same `NEXTHOPS` as IPv4).
#[map(name = "FIB6")]
static FIB6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(fib::MAX_ROUTES6, 0);
#[map(name = "NEIGHS6")]
static NEIGHS6: HashMap<Neigh6Key, Neigh> =
    HashMap::with_max_entries(MAX_NEIGHS, BPF_F_NO_PREALLOC);

#[map(name = "IFACES")]
static IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_IFACES, BPF_F_NO_PREALLOC);
#[map(name = "IFACE_INDEX")]
static IFACE_INDEX: Array<IfaceAt> = Array::with_max_entries(IFACE_INDEX_SLOTS, 0);

#[map(name = "TX_PORTS")]
static TX_PORTS: DevMap = DevMap::with_max_entries(MAX_IFACES, 0);

// The router's own IPv4 addresses (see `router_common::map_names::LOCAL_BITS`).
#[map(name = "LOCAL_BITS")]
static LOCAL_BITS: Array<[u64; 1024]> = Array::with_max_entries(1, 0);
#[map(name = "LOCAL4")]
static LOCAL4: HashMap<u32, u32> = HashMap::with_max_entries(MAX_LOCAL4, BPF_F_NO_PREALLOC);

#[map(name = "STATS")]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const NEXTHDR_HOP: u8 = 0;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// What the program decided for one frame.
enum Verdict {
    /// Redirected; the frame was rewritten. IPv6 is counted apart too.
    Forward { ipv6: bool },
    /// Handed to the kernel unchanged, for the reason given (an index into `Stats::pass`).
    Pass(usize),
}

#[xdp]
pub fn router(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let ingress = ctx.ingress_ifindex() as u32;
    let (slot, verdict) = match iface_of(ingress) {
        Some(iface) => (iface.slot, forward(&ctx, ingress, iface)),
        None => (UNKNOWN_IFACE_SLOT, Verdict::Pass(why::UNKNOWN_IFACE)),
    };
    let stats = STATS.get_ptr_mut(slot);
    match verdict {
        Verdict::Forward { ipv6 } => {
            if let Some(s) = stats {
                let v6 = ipv6 as u64;
                // SAFETY: a per-CPU slot, written only by this CPU.
                unsafe {
                    (*s).fwd_packets += 1;
                    (*s).fwd_bytes += len;
                    (*s).fwd6_packets += v6;
                    (*s).fwd6_bytes += v6 * len;
                }
            }
            if cfg!(mutant = "pass_all") {
                xdp_action::XDP_PASS
            } else {
                xdp_action::XDP_REDIRECT
            }
        }
        Verdict::Pass(reason) => {
            if let Some(s) = stats {
                if let Some(c) = unsafe { (*s).pass.get_mut(reason) } {
                    *c += 1;
                }
                unsafe { (*s).pass_bytes += len };
            }
            xdp_action::XDP_PASS
        }
    }
}

/// The ingress device: an array read, or a hash lookup when its index slot holds another device.
#[inline(always)]
fn iface_of(ifindex: u32) -> Option<&'static Iface> {
    if let Some(at) = IFACE_INDEX.get(ifindex & (IFACE_INDEX_SLOTS - 1)) {
        if at.ifindex == ifindex {
            return Some(&at.iface);
        }
    }
    // SAFETY: a map lookup; the value is read while the program runs.
    unsafe { IFACES.get(&ifindex) }
}

/// Bounds-checked pointer to a `T` at `offset` bytes into the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn forward(ctx: &XdpContext, ingress: u32, iface: &Iface) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::Pass(why::MALFORMED);
    };
    // SAFETY: `ptr_at` checked that the header lies inside the frame.
    let eth = unsafe { &mut *eth };
    if eth.dst[0] & 1 != 0 {
        return Verdict::Pass(why::BCAST_MCAST);
    }
    if !same_mac(&eth.dst, &iface.mac) {
        return Verdict::Pass(why::NOT_OUR_MAC);
    }
    match u16::from_be_bytes(eth.ether_type) {
        ETH_P_IPV4 => forward4(ctx, ingress),
        ETH_P_IPV6 => forward6(ctx, ingress),
        _ => Verdict::Pass(why::NOT_IP),
    }
}

#[inline(always)]
fn forward4(ctx: &XdpContext, ingress: u32) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Verdict::Pass(why::MALFORMED);
    };
    // SAFETY: as above.
    let ip = unsafe { &mut *ip };
    if ip.version_ihl != 0x45 {
        return Verdict::Pass(if ip.version_ihl >> 4 == 4 && ip.version_ihl & 0xf > 5 {
            why::IP_OPTIONS
        } else {
            why::MALFORMED
        });
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < IPV4_LEN || ETH_LEN + tot_len > ctx.data_end() - ctx.data() {
        return Verdict::Pass(why::MALFORMED);
    }
    if !header_checksum_ok(ctx) {
        return Verdict::Pass(why::BAD_CHECKSUM);
    }
    // The kernel's rules (ip_route_input_slow): multicast and limited broadcast destinations
    // are not routed; class E (240/4) is routed like any unicast address. Sources in 0/8,
    // 127/8, multicast or the limited broadcast, and destinations in 0/8 or 127/8, are martians.
    let (s0, d0) = (ip.src[0], ip.dst[0]);
    let (src, dst) = (u32::from_be_bytes(ip.src), u32::from_be_bytes(ip.dst));
    if d0 & 0xf0 == 0xe0 || dst == u32::MAX {
        return Verdict::Pass(why::BCAST_MCAST);
    }
    if s0 == 0 || s0 == 127 || s0 & 0xf0 == 0xe0 || src == u32::MAX || d0 == 0 || d0 == 127 {
        return Verdict::Pass(why::MARTIAN);
    }
    // From one of the router's own addresses: the kernel drops it as a martian source.
    if is_local4(src) {
        return Verdict::Pass(why::MARTIAN);
    }
    if ip.ttl <= 1 {
        return Verdict::Pass(why::TTL_EXCEEDED);
    }

    let Some(route) = fib_lookup(dst) else {
        return Verdict::Pass(why::NO_ROUTE);
    };
    let route = match egress(route, ingress, tot_len, |g| ecmp_member(ctx, ip, g)) {
        Ok(r) => r,
        Err(reason) => return Verdict::Pass(reason),
    };
    let nexthop = if route.kind == route_kind::GATEWAY {
        [
            route.nexthop[0],
            route.nexthop[1],
            route.nexthop[2],
            route.nexthop[3],
        ]
    } else {
        ip.dst
    };
    let key = NeighKey {
        ifindex: route.ifindex,
        addr: nexthop,
    };
    let Some(neigh) = (unsafe { NEIGHS.get(&key) }) else {
        return Verdict::Pass(if cfg!(mutant = "wrong_pass_reason") {
            why::NO_ROUTE
        } else {
            why::NO_NEIGH
        });
    };
    match send::<Ipv4Hdr>(ctx, route, neigh, ETH_LEN + tot_len) {
        Ok(ip) => {
            if !cfg!(mutant = "no_ttl_decrement") {
                ip.check = decrement_ttl(ip.check);
                ip.ttl -= 1;
            }
            Verdict::Forward { ipv6: false }
        }
        Err(reason) => Verdict::Pass(reason),
    }
}

#[inline(always)]
fn forward6(ctx: &XdpContext, ingress: u32) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
        return Verdict::Pass(why::MALFORMED);
    };
    // SAFETY: `ptr_at` checked that the header lies inside the frame.
    let ip = unsafe { &mut *ip };
    if ip.vtc_flow[0] >> 4 != 6 {
        return Verdict::Pass(why::MALFORMED);
    }
    // Before the length check: a jumbogram says payload length 0 and carries its length here.
    if ip.next_header == NEXTHDR_HOP {
        return Verdict::Pass(why::IP_OPTIONS);
    }
    let ip_len = IPV6_LEN + u16::from_be_bytes(ip.payload_len) as usize;
    if ETH_LEN + ip_len > ctx.data_end() - ctx.data() {
        return Verdict::Pass(why::MALFORMED);
    }
    if ip.dst[0] == 0xff {
        return Verdict::Pass(why::BCAST_MCAST);
    }
    // Multicast sources, and ::/64 either way (unspecified, loopback, IPv4-mapped and
    // -compatible addresses): the kernel drops or answers these; it is never ours to forward.
    if ip.src[0] == 0xff || first_half_zero(&ip.src) || first_half_zero(&ip.dst) {
        return Verdict::Pass(why::MARTIAN);
    }
    if link_local(&ip.src) || link_local(&ip.dst) {
        return Verdict::Pass(why::LINK_LOCAL);
    }
    if ip.hop_limit <= 1 {
        return Verdict::Pass(why::TTL_EXCEEDED);
    }

    let Some(e) = FIB6.get(Key::new(128, ip.dst)) else {
        return Verdict::Pass(why::NO_ROUTE);
    };
    let Some(route) = NEXTHOPS.get(e.wrapping_sub(1)) else {
        return Verdict::Pass(why::NO_ROUTE);
    };
    let route = match egress(route, ingress, ip_len, |g| ecmp_member6(ctx, ip, g)) {
        Ok(r) => r,
        Err(reason) => return Verdict::Pass(reason),
    };
    let key = Neigh6Key {
        ifindex: route.ifindex,
        addr: if route.kind == route_kind::GATEWAY {
            route.nexthop
        } else {
            ip.dst
        },
    };
    let Some(neigh) = (unsafe { NEIGHS6.get(&key) }) else {
        return Verdict::Pass(why::NO_NEIGH);
    };
    match send::<Ipv6Hdr>(ctx, route, neigh, ETH_LEN + ip_len) {
        Ok(ip) => {
            if !cfg!(mutant = "no_ttl_decrement") {
                ip.hop_limit -= 1;
            }
            Verdict::Forward { ipv6: true }
        }
        Err(reason) => Verdict::Pass(reason),
    }
}

/// The nexthop a packet of `ip_len` bytes leaves through, both families: an ECMP route becomes
/// its member for this flow (`member` hashes the flow), or the reason to pass the packet.
#[inline(always)]
fn egress(
    route: &'static Route,
    ingress: u32,
    ip_len: usize,
    member: impl FnOnce(u32) -> Option<&'static Route>,
) -> Result<&'static Route, usize> {
    let route = if route.kind == route_kind::ECMP {
        member(route.tx_port).ok_or(why::NO_ROUTE)?
    } else {
        route
    };
    if route.kind == route_kind::LOCAL {
        return Err(why::LOCAL_DEST);
    }
    if route.ifindex == ingress {
        return Err(why::SAME_IFACE);
    }
    if ip_len > route.mtu as usize {
        return Err(why::TOO_BIG);
    }
    Ok(route)
}

/// Redirects the frame to `route`'s device, trims it to `len` bytes and rewrites its MACs;
/// returns its IP header for the TTL or hop limit. The redirect only records the target (the
/// frame is sent after the program returns), so asking first keeps a failed redirect's frame
/// untouched for the kernel.
#[inline(always)]
fn send<T>(
    ctx: &XdpContext,
    route: &Route,
    neigh: &Neigh,
    len: usize,
) -> Result<&'static mut T, usize> {
    if TX_PORTS.redirect(route.tx_port, 0).is_err() {
        return Err(why::NO_TX_PORT);
    }
    let (eth, ip) = trimmed::<T>(ctx, len).ok_or(why::MALFORMED)?;
    copy_mac(&mut eth.dst, &neigh.mac);
    if !cfg!(mutant = "src_mac_unchanged") {
        copy_mac(&mut eth.src, &route.src_mac);
    }
    Ok(ip)
}

/// The frame cut to `len` bytes, as the kernel trims Ethernet padding (bytes past the IP
/// packet) before forwarding, and its headers again (resizing invalidates earlier pointers).
#[inline(always)]
fn trimmed<T>(ctx: &XdpContext, len: usize) -> Option<(&'static mut EthHdr, &'static mut T)> {
    let have = ctx.data_end() - ctx.data();
    if have > len && !cfg!(mutant = "no_padding_trim") {
        // SAFETY: shrinking the frame's tail by a positive amount smaller than the frame.
        let rc =
            unsafe { aya_ebpf::helpers::bpf_xdp_adjust_tail(ctx.ctx, len as i32 - have as i32) };
        if rc != 0 {
            return None;
        }
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<T>(ctx, ETH_LEN)?;
    // SAFETY: both checked inside the (new) frame by `ptr_at`.
    Some(unsafe { (&mut *eth, &mut *ip) })
}

/// One of the router's own IPv4 addresses: a bit test, then an exact lookup on a hit.
#[inline(always)]
fn is_local4(a: u32) -> bool {
    let Some(bits) = LOCAL_BITS.get(0) else {
        return false;
    };
    let Some(w) = bits.get(((a & 0xffff) >> 6) as usize) else {
        return false;
    };
    (*w >> (a & 63)) & 1 != 0 && unsafe { LOCAL4.get(&a) }.is_some()
}

#[inline(always)]
fn first_half_zero(a: &[u8; 16]) -> bool {
    // SAFETY: 8 readable bytes; unaligned read.
    unsafe { core::ptr::read_unaligned(a.as_ptr() as *const u64) == 0 }
}

/// fe80::/10.
#[inline(always)]
fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// The IPv6 counterpart of `ecmp_member`: addresses folded to 32 bits, next header, and the
/// ports of TCP and UDP when they follow the fixed header directly.
#[inline(always)]
fn ecmp_member6(ctx: &XdpContext, ip: &Ipv6Hdr, group: u32) -> Option<&'static Route> {
    let fold = |a: &[u8; 16]| {
        // SAFETY: 16 readable bytes; unaligned reads.
        let w = unsafe { core::ptr::read_unaligned(a.as_ptr() as *const [u32; 4]) };
        w[0] ^ w[1] ^ w[2] ^ w[3]
    };
    let mut h = fold(&ip.src) ^ fold(&ip.dst).rotate_left(16) ^ ((ip.next_header as u32) << 8);
    if ip.next_header == 6 || ip.next_header == 17 {
        h ^= ports(ctx, ETH_LEN + IPV6_LEN);
    }
    ecmp_pick(group, h)
}

/// The member of ECMP group `group` for this packet's flow: a hash of addresses, protocol and,
/// for unfragmented TCP and UDP, ports, so that every packet of a flow takes the same nexthop.
#[inline(always)]
fn ecmp_member(ctx: &XdpContext, ip: &Ipv4Hdr, group: u32) -> Option<&'static Route> {
    let mut h = u32::from_ne_bytes(ip.src)
        ^ u32::from_ne_bytes(ip.dst).rotate_left(16)
        ^ ((ip.protocol as u32) << 8);
    let unfragmented = u16::from_be_bytes(ip.frag_off) & 0x3fff == 0;
    if unfragmented && (ip.protocol == 6 || ip.protocol == 17) {
        h ^= ports(ctx, ETH_LEN + IPV4_LEN);
    }
    ecmp_pick(group, h)
}

/// The TCP/UDP ports at `offset`, mixed for the flow hash (0 when the frame ends before them).
#[inline(always)]
fn ports(ctx: &XdpContext, offset: usize) -> u32 {
    if cfg!(mutant = "ecmp_ignores_ports") {
        return 0;
    }
    match ptr_at::<[u8; 4]>(ctx, offset) {
        // SAFETY: bounds checked by `ptr_at`.
        Some(p) => u32::from_ne_bytes(unsafe { *p }).rotate_left(7),
        None => 0,
    }
}

/// The member of ECMP group `group` that flow hash `h` picks.
#[inline(always)]
fn ecmp_pick(group: u32, mut h: u32) -> Option<&'static Route> {
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

/// MACs are compared and copied as one u32 and one u16 rather than through memcmp/memmove,
/// which the BPF target compiles to byte loops in called subprograms.
#[inline(always)]
fn same_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    // SAFETY: both point to 6 readable bytes; unaligned reads.
    unsafe {
        let (a, b) = (a.as_ptr(), b.as_ptr());
        core::ptr::read_unaligned(a as *const u32) == core::ptr::read_unaligned(b as *const u32)
            && core::ptr::read_unaligned(a.add(4) as *const u16)
                == core::ptr::read_unaligned(b.add(4) as *const u16)
    }
}

#[inline(always)]
fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    // SAFETY: both point to 6 bytes; unaligned accesses.
    unsafe {
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        core::ptr::write_unaligned(d as *mut u32, core::ptr::read_unaligned(s as *const u32));
        core::ptr::write_unaligned(
            d.add(4) as *mut u16,
            core::ptr::read_unaligned(s.add(4) as *const u16),
        );
    }
}

/// Longest-prefix match: at most three array reads, whatever the size of the table.
#[inline(always)]
fn fib_lookup(dst: u32) -> Option<&'static Route> {
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

/// True when the 20-byte IPv4 header at `ETH_LEN` sums to 0xffff in one's complement.
#[inline(always)]
fn header_checksum_ok(ctx: &XdpContext) -> bool {
    let Some(words) = ptr_at::<[u16; IPV4_LEN / 2]>(ctx, ETH_LEN) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`; the words are summed in memory order, which gives
    // the byte-swapped sum on a little-endian machine, and 0xffff either way.
    let words = unsafe { core::ptr::read_unaligned(words) };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_LEN / 2 {
        sum += words[i] as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// New header checksum after TTL − 1, computed exactly as the kernel's `ip_decrease_ttl` does
/// (so forwarded bytes equal the kernel's): TTL is the high byte of its 16-bit word, so the
/// checksum grows by 0x0100, with the end-around carry folded in. On this little-endian target
/// the stored word read natively is byte-swapped, which makes 0x0100 the native value 1.
#[inline(always)]
fn decrement_ttl(check: [u8; 2]) -> [u8; 2] {
    let c = u16::from_ne_bytes(check) as u32 + u16::from_ne_bytes([1, 0]) as u32;
    let c = (c + (c >= 0xffff) as u32) as u16;
    if cfg!(mutant = "checksum_byte_order") {
        c.to_be_bytes()
    } else {
        c.to_ne_bytes()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

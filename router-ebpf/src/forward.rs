//! The per-packet logic, once, for both hooks: Ethernet → IPv4 or IPv6 sanity → longest-prefix
//! route → egress checks → neighbour → redirect, MAC rewrite, TTL or hop limit − 1. Everything
//! else goes to the kernel with a counted reason.

use router_common::{
    iface_flags, nat_conf, nat_flags, pass_reason as why, route_kind, Iface, Neigh6Key, NeighKey,
    Route, UNKNOWN_IFACE_SLOT,
};

use crate::{
    csum::{self, decrement_ttl, pseudo4, pseudo6},
    hook::Hook,
    lookup::{ecmp_pick, fib6_lookup, fib_lookup, iface_of, is_local4},
    maps::{NEIGHS, NEIGHS6, STATS},
    nat,
    parse::{
        first_half_zero, link_local, ports, ptr_at, same_mac, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_LEN,
        ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, NEXTHDR_HOP,
    },
    rewrite::copy_mac,
};

/// What the program decided for one packet.
enum Verdict {
    /// Redirected; the packet was rewritten. IPv6 is counted apart too, and IPv4 NAT by the
    /// `nat_flags` of its flow (0: none).
    Forward { ipv6: bool, nat: u32 },
    /// Handed to the kernel unchanged, for the reason given (an index into `Stats::pass`).
    Pass(usize),
    /// Dropped: changed already and impossible to finish (counted in `drop_packets`).
    Drop,
}

/// Runs the fast path on one packet and counts it; returns the hook's action.
#[inline(always)]
pub fn run<H: Hook>(h: &H) -> i32 {
    let len = h.len() as u64;
    let ingress = h.ingress();
    let (slot, verdict) = match iface_of(ingress) {
        Some(iface) => (
            iface.slot,
            match h.prepare() {
                Ok(()) => forward(h, ingress, iface),
                Err(reason) => Verdict::Pass(reason),
            },
        ),
        None => (UNKNOWN_IFACE_SLOT, Verdict::Pass(why::UNKNOWN_IFACE)),
    };
    let stats = STATS.get_ptr_mut(slot);
    match verdict {
        Verdict::Forward { ipv6, nat } => {
            if let Some(s) = stats {
                let v6 = ipv6 as u64;
                // SAFETY: a per-CPU slot, written only by this CPU.
                unsafe {
                    (*s).fwd_packets += 1;
                    (*s).fwd_bytes += len;
                    (*s).fwd6_packets += v6;
                    (*s).fwd6_bytes += v6 * len;
                    (*s).nat_src_packets += (nat & nat_flags::SRC != 0) as u64;
                    (*s).nat_dst_packets += (nat & nat_flags::DST != 0) as u64;
                }
            }
            if cfg!(mutant = "pass_all") {
                H::PASS
            } else {
                H::FORWARD
            }
        }
        Verdict::Drop => {
            if let Some(s) = stats {
                // SAFETY: as above.
                unsafe { (*s).drop_packets += 1 };
            }
            H::DROP
        }
        Verdict::Pass(reason) => {
            if let Some(s) = stats {
                if let Some(c) = unsafe { (*s).pass.get_mut(reason) } {
                    *c += 1;
                }
                unsafe { (*s).pass_bytes += len };
            }
            H::PASS
        }
    }
}

#[inline(always)]
fn forward(h: &impl Hook, ingress: u32, iface: &Iface) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(h, 0) else {
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
    // The namespace's own switches first: a family its kernel would not forward from this
    // device as the maps say is the kernel's.
    let kernel = iface.flags & (iface_flags::KERNEL_V4 | iface_flags::KERNEL_V6);
    match u16::from_be_bytes(eth.ether_type) {
        ETH_P_IPV4
            if kernel & iface_flags::KERNEL_V4 == 0 || cfg!(mutant = "kernel_policy_ignored") =>
        {
            forward4(h, ingress, iface)
        }
        ETH_P_IPV6
            if kernel & iface_flags::KERNEL_V6 == 0 || cfg!(mutant = "kernel_policy_ignored") =>
        {
            forward6(h, ingress, iface)
        }
        ETH_P_IPV4 | ETH_P_IPV6 => Verdict::Pass(why::KERNEL_POLICY),
        _ => Verdict::Pass(why::NOT_IP),
    }
}

#[inline(always)]
fn forward4(h: &impl Hook, ingress: u32, iface: &Iface) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(h, ETH_LEN) else {
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
    if tot_len < IPV4_LEN || ETH_LEN + tot_len > h.len() {
        return Verdict::Pass(why::MALFORMED);
    }
    let Some(words) = ptr_at::<[u16; IPV4_LEN / 2]>(h, ETH_LEN) else {
        return Verdict::Pass(why::BAD_CHECKSUM);
    };
    // SAFETY: bounds checked by `ptr_at`; an unaligned read.
    if !csum::ipv4_header_ok(&unsafe { core::ptr::read_unaligned(words) }) {
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

    // NAT: the flow's translation, if conntrack gave it one; it is written only once the
    // packet is sure to leave through the fast path. Routing follows the new destination.
    let unfragmented = u16::from_be_bytes(ip.frag_off) & 0x3fff == 0;
    let conf = nat::conf();
    // Under foreign netfilter rules every forwarded packet needs its flow's copy.
    let guarded = conf & nat_conf::GUARDED != 0 && !cfg!(mutant = "guard_ignored");
    let nat_on = conf & (nat_conf::ON | nat_conf::GUARDED) != 0;
    let mut flow = None;
    // A packet NAT could translate, without a copy of its flow: reported when it goes to the
    // kernel for NAT (see `nat::missed`).
    let mut miss = None;
    // An ICMP error about a NAT flow: the flow, and the outer addresses it gets.
    let mut icmp_err = None;
    if nat_on && unfragmented && !cfg!(mutant = "nat_ignored") {
        match nat::lookup(h, ip, tot_len, guarded) {
            Ok(nat::Lookup::Flow(key, f, now)) => flow = Some((key, f, now)),
            Ok(nat::Lookup::Miss(m)) => miss = Some(m),
            Ok(nat::Lookup::Other) => {}
            Err(reason) => return Verdict::Pass(reason),
        }
        if flow.is_none()
            && !guarded
            && ip.protocol == nat::IPPROTO_ICMP
            && !cfg!(mutant = "nat_icmp_errors_to_kernel")
        {
            icmp_err = nat::lookup_icmp_error(h, ip, tot_len);
        }
    }
    let (dst, dst_bytes) = match (&flow, &icmp_err) {
        (Some((_, f, _)), _) => (u32::from_be_bytes(f.dst), f.dst),
        (None, Some((_, outer))) => (u32::from_be_bytes(outer.1), outer.1),
        (None, None) => (dst, ip.dst),
    };
    let (src_before, dst_before) = (ip.src, ip.dst);

    let Some(route) = fib_lookup(dst) else {
        return Verdict::Pass(why::NO_ROUTE);
    };
    let l4 = ETH_LEN + IPV4_LEN;
    let Some(seg_len) = h.segment_len(tot_len, l4, ip.protocol) else {
        return Verdict::Pass(why::TOO_BIG);
    };
    let route = match egress(route, ingress, seg_len, |g| ecmp_member(h, ip, g)) {
        Ok(r) => r,
        Err(reason) => {
            // To one of the router's addresses: the gateway's or a floating IP's, the way
            // the replies of SNAT flows and new flows to floating IPs come in.
            if reason == why::LOCAL_DEST {
                if let Some(m) = &miss {
                    nat::missed(m);
                }
            }
            return Verdict::Pass(reason);
        }
    };
    // Nothing leaves through the gateway untranslated while NAT is on: without a flow, the
    // kernel NATs it (and conntrack decides the mapping the fast path then copies).
    if nat_on && flow.is_none() && icmp_err.is_none() && !cfg!(mutant = "nat_untranslated_out") {
        if let Some(out) = iface_of(route.ifindex) {
            if out.flags & iface_flags::EXTERNAL != 0 {
                if let Some(m) = &miss {
                    nat::missed(m);
                }
                return Verdict::Pass(if unfragmented {
                    why::NAT_NO_FLOW
                } else {
                    why::NAT_FRAGMENT
                });
            }
        }
    }
    // Under foreign rules, only the kernel's verdict on the flow lets a packet through.
    if guarded && flow.is_none() {
        if let Some(m) = &miss {
            nat::missed(m);
        }
        return Verdict::Pass(why::GUARDED);
    }
    let nexthop = if route.kind == route_kind::GATEWAY {
        [
            route.nexthop[0],
            route.nexthop[1],
            route.nexthop[2],
            route.nexthop[3],
        ]
    } else {
        dst_bytes
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
    // A TCP or UDP segment with at least a UDP header's worth of bytes (a partial checksum
    // needs a header), not a fragment (a stack finishes checksums before fragmenting).
    let whole_header = tot_len >= IPV4_LEN + 8;
    if unfragmented && whole_header && (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) {
        let pseudo = pseudo4(ip, tot_len - IPV4_LEN);
        let udp_none = ip.protocol == IPPROTO_UDP && udp_checksum_zero(h, l4);
        if !udp_none && !h.l4_complete(iface, l4, ETH_LEN + tot_len, pseudo, ip.protocol) {
            return Verdict::Pass(why::L4_CHECKSUM);
        }
    }
    match send::<Ipv4Hdr>(h, route, neigh, ETH_LEN + tot_len) {
        Ok(ip) => {
            if !cfg!(mutant = "no_ttl_decrement") {
                ip.check = decrement_ttl(ip.check);
                ip.ttl -= 1;
            }
            let mut nat = 0;
            if let Some((key, f, now)) = flow {
                nat::touch(f, now);
                // Redirected already: a packet that cannot be translated must not leave.
                if !h.nat_rewrite(&key, f) {
                    return Verdict::Drop;
                }
                nat = f.flags;
            }
            if let Some((f, outer)) = icmp_err {
                if !nat::rewrite_icmp_error(h, f, outer, tot_len) {
                    return Verdict::Drop;
                }
                nat = if outer.0 != src_before {
                    nat_flags::SRC
                } else {
                    0
                } | if outer.1 != dst_before {
                    nat_flags::DST
                } else {
                    0
                };
            }
            Verdict::Forward { ipv6: false, nat }
        }
        Err(reason) => Verdict::Pass(reason),
    }
}

#[inline(always)]
fn forward6(h: &impl Hook, ingress: u32, iface: &Iface) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(h, ETH_LEN) else {
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
    if ETH_LEN + ip_len > h.len() {
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

    let Some(route) = fib6_lookup(ip.dst) else {
        return Verdict::Pass(why::NO_ROUTE);
    };
    let l4 = ETH_LEN + IPV6_LEN;
    let Some(seg_len) = h.segment_len(ip_len, l4, ip.next_header) else {
        return Verdict::Pass(why::TOO_BIG);
    };
    let route = match egress(route, ingress, seg_len, |g| ecmp_member6(h, ip, g)) {
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
    // Under foreign rules IPv6 is the kernel's (no IPv6 flow copies).
    if nat::conf() & nat_conf::GUARDED != 0 && !cfg!(mutant = "guard_ignored") {
        return Verdict::Pass(why::GUARDED);
    }
    let Some(neigh) = (unsafe { NEIGHS6.get(&key) }) else {
        return Verdict::Pass(why::NO_NEIGH);
    };
    match ip.next_header {
        IPPROTO_TCP | IPPROTO_UDP if ip_len >= IPV6_LEN + 8 => {
            let pseudo = pseudo6(ip, ip_len - IPV6_LEN);
            if !h.l4_complete(iface, l4, ETH_LEN + ip_len, pseudo, ip.next_header) {
                return Verdict::Pass(why::L4_CHECKSUM);
            }
        }
        // Routing and destination options headers may hide a TCP or UDP segment, and SCTP
        // may carry a partial CRC: where partial checksums are possible, the kernel decides.
        43 | 60 | 132 if !h.l4_complete(iface, 0, 0, 0, 0) => {
            return Verdict::Pass(why::L4_CHECKSUM);
        }
        _ => {}
    }
    match send::<Ipv6Hdr>(h, route, neigh, ETH_LEN + ip_len) {
        Ok(ip) => {
            if !cfg!(mutant = "no_ttl_decrement") {
                // SAFETY: the 4 bytes before the addresses, inside the header.
                let word = unsafe { &mut *(ip.payload_len.as_mut_ptr() as *mut u32) };
                let old = *word;
                ip.hop_limit -= 1;
                h.hop_limit_changed(old, *word);
            }
            Verdict::Forward { ipv6: true, nat: 0 }
        }
        Err(reason) => Verdict::Pass(reason),
    }
}

/// The nexthop a packet of `seg_len` bytes (a segment's, for GSO) leaves through, both
/// families: an ECMP route becomes its member for this flow (`member` hashes the flow), or the
/// reason to pass the packet.
#[inline(always)]
fn egress(
    route: &'static Route,
    ingress: u32,
    seg_len: usize,
    member: impl FnOnce(u32) -> Option<&'static Route>,
) -> Result<&'static Route, usize> {
    let route = if route.kind == route_kind::ECMP {
        member(route.tx_port).ok_or(why::NO_ROUTE)?
    } else {
        route
    };
    // LOCAL or KERNEL (an ECMP route's members are gateways): the kernel's.
    if route.kind >= route_kind::LOCAL {
        return Err(if route.kind == route_kind::LOCAL {
            why::LOCAL_DEST
        } else {
            why::KERNEL_ROUTE
        });
    }
    if route.ifindex == ingress {
        return Err(why::SAME_IFACE);
    }
    if seg_len > route.mtu as usize {
        return Err(why::TOO_BIG);
    }
    Ok(route)
}

/// Redirects the packet to `route`'s device, trims it to `len` bytes and rewrites its MACs;
/// returns its IP header for the TTL or hop limit. The redirect is asked first (it takes
/// effect after the program returns), so a refusal leaves the packet untouched for the kernel.
#[inline(always)]
fn send<T>(
    h: &impl Hook,
    route: &Route,
    neigh: &router_common::Neigh,
    len: usize,
) -> Result<&'static mut T, usize> {
    h.redirect(route)?;
    if !h.trim(len) {
        return Err(why::MALFORMED);
    }
    // Resizing invalidates earlier pointers: the headers again.
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(h, 0), ptr_at::<T>(h, ETH_LEN)) else {
        return Err(why::MALFORMED);
    };
    // SAFETY: both checked inside the (new) frame by `ptr_at`.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    copy_mac(&mut eth.dst, &neigh.mac);
    if !cfg!(mutant = "src_mac_unchanged") {
        copy_mac(&mut eth.src, &route.src_mac);
    }
    Ok(ip)
}

/// The member of ECMP group `group` for this packet's flow: a hash of addresses, protocol and,
/// for unfragmented TCP and UDP, ports, so that every packet of a flow takes the same nexthop.
#[inline(always)]
fn ecmp_member(h: &impl Hook, ip: &Ipv4Hdr, group: u32) -> Option<&'static Route> {
    let mut x = u32::from_ne_bytes(ip.src)
        ^ u32::from_ne_bytes(ip.dst).rotate_left(16)
        ^ ((ip.protocol as u32) << 8);
    let unfragmented = u16::from_be_bytes(ip.frag_off) & 0x3fff == 0;
    if unfragmented && (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) {
        x ^= ports(h, ETH_LEN + IPV4_LEN);
    }
    ecmp_pick(group, x)
}

/// The IPv6 counterpart of `ecmp_member`: addresses folded to 32 bits, next header, and the
/// ports of TCP and UDP when they follow the fixed header directly.
#[inline(always)]
fn ecmp_member6(h: &impl Hook, ip: &Ipv6Hdr, group: u32) -> Option<&'static Route> {
    let fold = |a: &[u8; 16]| {
        // SAFETY: 16 readable bytes; unaligned reads.
        let w = unsafe { core::ptr::read_unaligned(a.as_ptr() as *const [u32; 4]) };
        w[0] ^ w[1] ^ w[2] ^ w[3]
    };
    let mut x = fold(&ip.src) ^ fold(&ip.dst).rotate_left(16) ^ ((ip.next_header as u32) << 8);
    if ip.next_header == IPPROTO_TCP || ip.next_header == IPPROTO_UDP {
        x ^= ports(h, ETH_LEN + IPV6_LEN);
    }
    ecmp_pick(group, x)
}

/// An IPv4 UDP datagram sent without a checksum (0).
#[inline(always)]
fn udp_checksum_zero(h: &impl Hook, l4: usize) -> bool {
    match ptr_at::<[u8; 2]>(h, l4 + 6) {
        // SAFETY: bounds checked by `ptr_at`.
        Some(p) => (unsafe { *p }) == [0, 0],
        None => false,
    }
}

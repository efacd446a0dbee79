//! NAT in the fast path: flows the kernel's conntrack set up (SNAT to the gateway address,
//! floating IPs both ways, hairpins), copied into `NAT_FLOWS` by the controller, are
//! translated here; everything else NAT needs (a flow's first packets, TCP SYN/FIN/RST,
//! fragments, ICMP errors) is the kernel's. The kernel stays the authority on every mapping:
//! the fast path never picks a port.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use router_common::{nat_conf, pass_reason as why, NatFlow, NatKey};

use crate::{
    hook::Hook,
    maps::{NAT_CONF, NAT_FLOWS},
    parse::{ptr_at, Ipv4Hdr, ETH_LEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN},
};

pub const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// The router translates at all (one array read; false for routers without a gateway).
#[inline(always)]
pub fn on() -> bool {
    matches!(NAT_CONF.get(0), Some(c) if *c & nat_conf::ON != 0)
}

/// The translation for this unfragmented IPv4 packet (20-byte header at `ETH_LEN`, `tot_len`
/// bytes long): its key and flow, None when it has none (or is too short to hold the header
/// the translation rewrites), or the reason to hand it to the kernel.
#[inline(always)]
pub fn lookup(
    h: &impl Hook,
    ip: &Ipv4Hdr,
    tot_len: usize,
) -> Result<Option<(NatKey, &'static mut NatFlow)>, usize> {
    let l4 = ETH_LEN + IPV4_LEN;
    if ip.protocol != IPPROTO_TCP {
        if tot_len < IPV4_LEN + 8 {
            return Ok(None);
        }
        return match ptr_at::<[u8; 8]>(h, l4) {
            // SAFETY: bounds checked by `ptr_at`.
            Some(p) => find(ip, unsafe { &*p }),
            None => Ok(None),
        };
    }
    if tot_len < IPV4_LEN + 20 {
        return Ok(None);
    }
    let Some(p) = ptr_at::<[u8; 20]>(h, l4) else {
        return Ok(None);
    };
    // SAFETY: bounds checked by `ptr_at`.
    let b = unsafe { &*p };
    if ip.protocol == IPPROTO_TCP && b[13] & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        // Whether or not a flow exists: a SYN starts one (the kernel NATs it), FIN and RST end
        // one; either way conntrack must see it. (A TCP packet without a flow goes to the
        // kernel anyway when it leaves through the gateway.)
        return match find(ip, &[b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])? {
            Some(_) => Err(why::NAT_TCP_CONTROL),
            None => Ok(None),
        };
    }
    find(ip, &[b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[inline(always)]
fn find(ip: &Ipv4Hdr, l4: &[u8; 8]) -> Result<Option<(NatKey, &'static mut NatFlow)>, usize> {
    let (sport, dport) = match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => ([l4[0], l4[1]], [l4[2], l4[3]]),
        IPPROTO_ICMP if l4[0] == ICMP_ECHO || l4[0] == ICMP_ECHO_REPLY => ([l4[4], l4[5]], [0, 0]),
        _ => return Ok(None),
    };
    let key = NatKey {
        src: ip.src,
        dst: ip.dst,
        sport,
        dport,
        proto: ip.protocol,
        _pad: [0; 3],
    };
    match NAT_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a map value, valid while the program runs (the map is not preallocated:
        // a deleted element is freed after an RCU grace period).
        Some(f) => Ok(Some((key, unsafe { &mut *f }))),
        None => Ok(None),
    }
}

/// Marks the flow used, at most once a second (a write per packet would bounce its cache
/// line between CPUs).
#[inline(always)]
pub fn touch(f: &mut NatFlow) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(f.used) > 1_000_000_000 {
        f.used = now;
    }
}

/// One's-complement update of checksum `check` (memory order) for 16-bit words `old` →
/// `new` (memory order): RFC 1624's HC' = ~(~HC + ~m + m'), as the kernel's csum_replace.
#[inline(always)]
pub fn csum_replace(check: u16, old: u32, new: u32) -> u16 {
    let mut s = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + (new >> 16) as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The translation written straight into a frame whose checksums are complete (XDP): IPv4
/// header checksum, addresses, ports or ICMP identifier, and the TCP, UDP (unless 0: no
/// checksum) or ICMP checksum.
#[inline(always)]
pub fn rewrite_frame(h: &impl Hook, key: &NatKey, f: &NatFlow) -> bool {
    let l4 = ETH_LEN + IPV4_LEN;
    let (Some(ip), Some(t)) = (ptr_at::<Ipv4Hdr>(h, ETH_LEN), ptr_at::<[u8; 8]>(h, l4)) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (ip, t) = unsafe { (&mut *ip, &mut *t) };
    let w = |b: [u8; 4]| u32::from_ne_bytes(b);
    let (os, od, ns, nd) = (w(key.src), w(key.dst), w(f.src), w(f.dst));
    let c = u16::from_ne_bytes(ip.check);
    ip.check = csum_replace(csum_replace(c, os, ns), od, nd).to_ne_bytes();
    ip.src = f.src;
    ip.dst = f.dst;
    let ports_old = w([key.sport[0], key.sport[1], key.dport[0], key.dport[1]]);
    let ports_new = w([f.sport[0], f.sport[1], f.dport[0], f.dport[1]]);
    match key.proto {
        IPPROTO_TCP => {
            let Some(c) = ptr_at::<[u8; 2]>(h, l4 + 16) else {
                return false;
            };
            // SAFETY: bounds checked by `ptr_at`.
            let c = unsafe { &mut *c };
            let mut x = u16::from_ne_bytes(*c);
            x = csum_replace(csum_replace(x, os, ns), od, nd);
            *c = csum_replace(x, ports_old, ports_new).to_ne_bytes();
            set_ports(t, f);
        }
        IPPROTO_UDP => {
            let c = u16::from_ne_bytes([t[6], t[7]]);
            if c != 0 || cfg!(mutant = "nat_udp_zero_updated") {
                let mut x = csum_replace(csum_replace(c, os, ns), od, nd);
                x = csum_replace(x, ports_old, ports_new);
                // 0 means "no checksum" in UDP: a computed 0 is sent as its other form.
                let x = if x == 0 { 0xffff } else { x };
                [t[6], t[7]] = x.to_ne_bytes();
            }
            set_ports(t, f);
        }
        _ => {
            // ICMP echo: no pseudo-header; only the identifier changes the checksum.
            let (oid, nid) = (u16::from_ne_bytes(key.sport), u16::from_ne_bytes(f.sport));
            let c = u16::from_ne_bytes([t[2], t[3]]);
            [t[2], t[3]] = csum_replace2(c, oid, nid).to_ne_bytes();
            [t[4], t[5]] = f.sport;
        }
    }
    true
}

/// As `csum_replace`, for one 16-bit word.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut s = (!check) as u32 + (!old) as u32 + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn set_ports(t: &mut [u8; 8], f: &NatFlow) {
    [t[0], t[1]] = f.sport;
    [t[2], t[3]] = f.dport;
}

//! The two hooks the per-packet logic runs in, behind one trait: XDP (frames, in the driver)
//! and tc (skbs, at tcx ingress). Everything a hook does differently lives here: how long the
//! packet is, how a redirect is asked for, how the frame is cut, what a GSO packet's segments
//! measure, and what the checksum state needs.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_REDIRECT},
    helpers::{
        bpf_csum_diff, bpf_csum_update, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_redirect,
        bpf_skb_change_tail, bpf_skb_store_bytes, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use router_common::{iface_flags, pass_reason as why, Iface, NatFlow, NatKey, Route};

use crate::{
    csum,
    maps::{TC_PORTS, TX_PORTS},
    parse::{
        l4_header_len, ptr_at, Ipv4Hdr, Packet, ETH_LEN, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_LEN,
    },
};

/// tcx: hand the packet on (to the next program of the chain, then the stack).
const TCX_NEXT: i32 = -1;
/// Bytes the headers need in an skb's directly readable part: Ethernet, IPv6, and the TCP
/// header's first 20 bytes (ports for ECMP and NAT, flags, data offset for GSO).
const HEADERS: u32 = (ETH_LEN + 40 + 20) as u32;
/// The same for IPv4 (a 20-byte header: longer ones go to the kernel). A TCP segment whose
/// payload lies in pages has just its headers in the readable part, so asking for more would
/// make the program pull payload into it, which for a clone (every segment a local TCP sender
/// keeps for retransmission) means a new head and a copy, on packets the kernel forwards too.
const HEADERS4: u32 = (ETH_LEN + IPV4_LEN + 20) as u32;

pub trait Hook: Packet {
    /// The action for a packet redirected to its egress device.
    const FORWARD: i32;
    /// The action for a packet handed to the kernel.
    const PASS: i32;
    const DROP: i32;

    /// The whole packet's length (an skb may hold more than its directly readable part).
    fn len(&self) -> usize;
    fn ingress(&self) -> u32;
    /// Checks and preparation before any header is read.
    fn prepare(&self) -> Result<(), usize>;
    /// The length the egress MTU is compared with: the IP packet's (`ip_len`), or for a GSO
    /// packet one segment's (None: cannot tell, the kernel decides). `l4` is the transport
    /// header's offset in the frame.
    fn segment_len(&self, ip_len: usize, l4: usize, proto: u8) -> Option<usize>;
    /// Asks for the packet to leave through `route`'s device. Called before the packet is
    /// changed: a refusal leaves it untouched for the kernel.
    fn redirect(&self, route: &Route) -> Result<(), usize>;
    /// Cuts the frame to `len` bytes (the kernel trims Ethernet padding before forwarding).
    fn trim(&self, len: usize) -> bool;
    /// False when the transport checksum must be left to the kernel (see `iface_flags`).
    fn l4_complete(&self, iface: &Iface, l4: usize, end: usize, pseudo: u64, proto: u8) -> bool;
    /// The IPv6 hop limit went from `old` to `new` (the 32-bit word holding it).
    fn hop_limit_changed(&self, old: u32, new: u32);
    /// Rewrites the IPv4 packet `key` describes into `flow`'s addresses and ports, with every
    /// checksum kept right; false if it could not (the packet is dropped then: it was already
    /// redirected and changed).
    fn nat_rewrite(&self, key: &NatKey, flow: &NatFlow) -> bool;
}

pub struct Xdp(pub XdpContext);

impl Packet for Xdp {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
}

impl Hook for Xdp {
    const FORWARD: i32 = xdp_action::XDP_REDIRECT as i32;
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }
    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn prepare(&self) -> Result<(), usize> {
        Ok(())
    }
    #[inline(always)]
    fn segment_len(&self, ip_len: usize, _l4: usize, _proto: u8) -> Option<usize> {
        Some(ip_len)
    }
    #[inline(always)]
    fn redirect(&self, route: &Route) -> Result<(), usize> {
        if TX_PORTS.redirect(route.tx_port, 0).is_ok() {
            return Ok(());
        }
        // No XDP slot: the device is down, or it is up but cannot take XDP frames now.
        match TC_PORTS.get(route.tx_port) {
            Some(i) if *i != 0 => Err(why::NO_XDP_XMIT),
            _ => Err(why::NO_TX_PORT),
        }
    }
    #[inline(always)]
    fn trim(&self, len: usize) -> bool {
        let have = self.len();
        if have <= len || cfg!(mutant = "no_padding_trim") {
            return true;
        }
        // SAFETY: shrinking the frame's tail by a positive amount smaller than the frame.
        unsafe { bpf_xdp_adjust_tail(self.0.as_ptr() as *mut _, len as i32 - have as i32) == 0 }
    }
    #[inline(always)]
    fn l4_complete(&self, iface: &Iface, l4: usize, end: usize, pseudo: u64, _proto: u8) -> bool {
        if iface.flags & iface_flags::VERIFY_L4 == 0 || cfg!(mutant = "l4_unverified") {
            return true;
        }
        csum::l4_verifies(&self.0, l4, end, pseudo)
    }
    #[inline(always)]
    fn hop_limit_changed(&self, _old: u32, _new: u32) {}
    #[inline(always)]
    fn nat_rewrite(&self, key: &NatKey, flow: &NatFlow) -> bool {
        rewrite_frame(self, key, flow)
    }
}

pub struct Tc(pub TcContext);

impl Tc {
    #[inline(always)]
    fn skb(&self) -> &aya_ebpf::bindings::__sk_buff {
        // SAFETY: the context the kernel passed, valid while the program runs.
        unsafe { &*self.0.skb.skb }
    }
}

impl Packet for Tc {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
}

impl Hook for Tc {
    const FORWARD: i32 = TC_ACT_REDIRECT as i32;
    const PASS: i32 = TCX_NEXT;
    const DROP: i32 = aya_ebpf::bindings::TC_ACT_SHOT as i32;

    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.skb().ingress_ifindex
    }
    #[inline(always)]
    fn prepare(&self) -> Result<(), usize> {
        // A tag the driver or a veth took out of the frame: the kernel hands the packet to a
        // VLAN device, or drops it; it is never routed as it stands.
        if self.skb().vlan_present != 0 {
            return Err(why::NOT_IP);
        }
        // The headers in the directly readable part (they are, unless a driver split them).
        let linear = self.data_end() - self.data();
        let ipv4 = self.skb().protocol == (ETH_P_IPV4 as u16).to_be() as u32;
        let want = (self.len() as u32).min(if ipv4 { HEADERS4 } else { HEADERS });
        if (linear as u32) < want && self.0.pull_data(want).is_err() {
            return Err(why::MALFORMED);
        }
        Ok(())
    }
    #[inline(always)]
    fn segment_len(&self, ip_len: usize, l4: usize, proto: u8) -> Option<usize> {
        let gso = self.skb().gso_size as usize;
        if gso == 0 || cfg!(mutant = "gso_whole_length") {
            return Some(ip_len);
        }
        // One segment: the network and transport headers, and gso_size bytes of payload (as
        // the kernel's skb_gso_validate_network_len counts it).
        Some(l4 - ETH_LEN + l4_header_len(self, l4, proto)? + gso)
    }
    #[inline(always)]
    fn redirect(&self, route: &Route) -> Result<(), usize> {
        match TC_PORTS.get(route.tx_port) {
            Some(i) if *i != 0 => {
                // SAFETY: a helper call; the redirect happens when the program returns.
                unsafe { bpf_redirect(*i, 0) };
                Ok(())
            }
            _ => Err(why::NO_TX_PORT),
        }
    }
    #[inline(always)]
    fn trim(&self, len: usize) -> bool {
        if self.len() <= len || cfg!(mutant = "no_padding_trim") {
            return true;
        }
        // SAFETY: shrinking the packet to `len` bytes, fewer than it has.
        unsafe { bpf_skb_change_tail(self.0.skb.skb, len as u32, 0) == 0 }
    }
    #[inline(always)]
    fn l4_complete(&self, _: &Iface, _: usize, _: usize, _: u64, _: u8) -> bool {
        // The skb keeps its checksum state (partial or complete) through the redirect.
        true
    }
    #[inline(always)]
    fn hop_limit_changed(&self, old: u32, new: u32) {
        // A CHECKSUM_COMPLETE skb carries the one's-complement sum of its bytes: keep it right
        // (the helper does nothing for other checksum states).
        let (mut o, mut n) = (old, new);
        // SAFETY: two 4-byte values on the stack.
        unsafe {
            let diff = bpf_csum_diff(&mut o as *mut u32, 4, &mut n as *mut u32, 4, 0);
            if diff >= 0 {
                bpf_csum_update(self.0.skb.skb, diff as u32);
            }
        }
    }
    #[inline(always)]
    fn nat_rewrite(&self, key: &NatKey, flow: &NatFlow) -> bool {
        // The kernel's checksum helpers: they know the skb's checksum state (a partial
        // checksum holds the pseudo-header's sum, a complete one the packet's), and mark a
        // UDP checksum of 0 as "none". Each may move the packet's data: values are written
        // with bpf_skb_store_bytes, never through pointers.
        const F_PSEUDO_HDR: u64 = 1 << 4;
        const F_MARK_MANGLED_0: u64 = 1 << 5;
        let skb = self.0.skb.skb;
        let l4 = (ETH_LEN + IPV4_LEN) as u32;
        let ip_check = ETH_LEN as u32 + 10;
        let (l4_check, l4_flags) = match key.proto {
            IPPROTO_TCP => (l4 + 16, 0),
            IPPROTO_UDP => (l4 + 6, F_MARK_MANGLED_0),
            _ => (l4 + 2, 0),
        };
        let icmp = key.proto == IPPROTO_ICMP;
        let mut ok = true;
        let addrs = [
            (ETH_LEN as u32 + 12, key.src, flow.src),
            (ETH_LEN as u32 + 16, key.dst, flow.dst),
        ];
        for (off, old, new) in addrs {
            if old == new {
                continue;
            }
            let (o, n) = (
                u32::from_ne_bytes(old) as u64,
                u32::from_ne_bytes(new) as u64,
            );
            // SAFETY: helper calls on this skb with offsets inside its headers (checked when
            // the headers were read); `new` lives on the stack.
            unsafe {
                if !icmp {
                    ok &=
                        bpf_l4_csum_replace(skb, l4_check, o, n, F_PSEUDO_HDR | l4_flags | 4) == 0;
                }
                ok &= bpf_l3_csum_replace(skb, ip_check, o, n, 4) == 0;
                ok &= bpf_skb_store_bytes(skb, off, new.as_ptr() as *const _, 4, 0) == 0;
            }
        }
        let ports = if icmp {
            [(l4 + 4, key.sport, flow.sport), (0, [0; 2], [0; 2])]
        } else {
            [(l4, key.sport, flow.sport), (l4 + 2, key.dport, flow.dport)]
        };
        for (off, old, new) in ports {
            if old == new {
                continue;
            }
            let (o, n) = (
                u16::from_ne_bytes(old) as u64,
                u16::from_ne_bytes(new) as u64,
            );
            // SAFETY: as above.
            unsafe {
                ok &= bpf_l4_csum_replace(skb, l4_check, o, n, l4_flags | 2) == 0;
                ok &= bpf_skb_store_bytes(skb, off, new.as_ptr() as *const _, 2, 0) == 0;
            }
        }
        ok
    }
}

/// The translation written straight into a frame whose checksums are complete (XDP): IPv4
/// header checksum, addresses, ports or ICMP identifier, and the TCP, UDP (unless 0: no
/// checksum) or ICMP checksum.
#[inline(always)]
fn rewrite_frame(h: &Xdp, key: &NatKey, f: &NatFlow) -> bool {
    let l4 = ETH_LEN + IPV4_LEN;
    let (Some(ip), Some(t)) = (ptr_at::<Ipv4Hdr>(h, ETH_LEN), ptr_at::<[u8; 8]>(h, l4)) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (ip, t) = unsafe { (&mut *ip, &mut *t) };
    let w = |b: [u8; 4]| u32::from_ne_bytes(b);
    let (os, od, ns, nd) = (w(key.src), w(key.dst), w(f.src), w(f.dst));
    let c = u16::from_ne_bytes(ip.check);
    ip.check = csum::replace4(csum::replace4(c, os, ns), od, nd).to_ne_bytes();
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
            x = csum::replace4(csum::replace4(x, os, ns), od, nd);
            *c = csum::replace4(x, ports_old, ports_new).to_ne_bytes();
            set_ports(t, f);
        }
        IPPROTO_UDP => {
            let c = u16::from_ne_bytes([t[6], t[7]]);
            if c != 0 || cfg!(mutant = "nat_udp_zero_updated") {
                let mut x = csum::replace4(csum::replace4(c, os, ns), od, nd);
                x = csum::replace4(x, ports_old, ports_new);
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
            [t[2], t[3]] = csum::replace2(c, oid, nid).to_ne_bytes();
            [t[4], t[5]] = f.sport;
        }
    }
    true
}

#[inline(always)]
fn set_ports(t: &mut [u8; 8], f: &NatFlow) {
    [t[0], t[1]] = f.sport;
    [t[2], t[3]] = f.dport;
}

//! A reference model of what the fast path must do with one frame, written from the kernel's
//! forwarding rules and the fast path's documented contract, apart from the program.
//!
//! The contract: the fast path forwards a frame only when the kernel would forward it, to the
//! same neighbour, with the same bytes; everything else goes to the kernel unchanged, counted
//! under one reason. The model gives, for every frame, either the exact forward (egress device,
//! neighbour MAC) or the exact reason. Tests compare the program with it frame by frame, so that
//! a frame the fast path should have forwarded but left to the kernel is a failure too, even
//! though the kernel would have delivered it.
//!
//! The rules, in the order the fast path applies them (the first that matches decides):
//!
//! | rule | the kernel | the model |
//! |---|---|---|
//! | broadcast/multicast destination MAC | not forwarded (`PACKET_BROADCAST/MULTICAST`) | `bcast_mcast` |
//! | destination MAC not the ingress device's | `PACKET_OTHERHOST`, dropped | `not_our_mac` |
//! | neither IPv4 nor IPv6 (ARP, 802.1Q, …) | other protocols | `not_ip` |
//! | IPv4: version ≠ 4 or IHL < 5; truncated; total length < 20 or past the frame | dropped (`ip_rcv_core`) | `malformed` |
//! | IPv4 options (IHL > 5) | forwarded after option processing | `ip_options`: the kernel's |
//! | bad IPv4 header checksum | dropped | `bad_checksum` |
//! | destination 224/4 or 255.255.255.255 | multicast/broadcast input, not unicast-forwarded | `bcast_mcast` |
//! | source 0/8, 127/8, 224/4 or 255.255.255.255; destination 0/8 or 127/8 (`ip_route_input_slow`) | martian, dropped | `martian` |
//! | source 240/4 (other than 255.255.255.255), destination 240/4 | routed like unicast | like unicast |
//! | source = one of the router's addresses (`fib_validate_source`) | martian, dropped | `martian` |
//! | TTL ≤ 1 | time exceeded | `ttl_exceeded` |
//! | IPv4 fragment (MF or offset set) | forwarded as it is (never reassembled when forwarded) | like any packet |
//! | IPv6: version ≠ 6, truncated, payload length past the frame | dropped (`ipv6_rcv`) | `malformed` |
//! | IPv6 hop-by-hop header | processed, then forwarded | `ip_options`: the kernel's |
//! | other IPv6 extension headers | forwarded as they are | like any packet |
//! | IPv6 multicast destination | not forwarded as unicast | `bcast_mcast` |
//! | IPv6 multicast source, ::/64 source or destination | dropped | `martian` |
//! | IPv6 link-local source or destination | never forwarded | `link_local` |
//! | hop limit ≤ 1 | time exceeded | `ttl_exceeded` |
//! | no route | unreachable | `no_route` |
//! | one of the router's addresses, a subnet broadcast, IPv6 subnet-router anycast | delivered locally | `local_dest` |
//! | egress = ingress device | forwarded with a redirect | `same_iface` |
//! | larger than the egress MTU (IPv4 total length, IPv6 header + payload) | fragmented, or ICMP too big | `too_big` |
//! | no neighbour for the nexthop | resolved first | `no_neigh` |
//! | XDP on a device fed by skbs (forced): an unfragmented TCP or UDP segment of at least 8 bytes whose checksum does not verify (a partial checksum; an IPv4 UDP checksum of 0 means none), or IPv6 routing/destination-options/SCTP | keeps the skb's checksum state | `l4_checksum` |
//! | egress device without a redirect slot (down, or unable to take redirected frames) | the kernel decides | `no_tx_port` |
//! | otherwise | forwarded: MACs rewritten, TTL − 1 (checksum as `ip_decrease_ttl`), padding trimmed | forward |

use router_common::pass_reason as why;

/// One device of the modelled router.
#[derive(Clone, Debug)]
pub struct Dev {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The device has a redirect slot (it is up and can take redirected frames).
    pub redirect: bool,
    /// The fast path verifies TCP/UDP checksums of frames arriving here (XDP on a device fed
    /// by a local stack's skbs).
    pub verify_l4: bool,
}

/// Where a route leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A connected subnet: the destination itself is the neighbour.
    Connected(usize),
    /// An extra route through a nexthop on device `.0`.
    Gateway(usize, Addr),
    /// The router's own address or a subnet broadcast: for the kernel.
    Local,
}

/// An IPv4 or IPv6 address as a 128-bit number (IPv4 in the low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr {
    pub v6: bool,
    pub bits: u128,
}

impl Addr {
    pub fn v4(a: [u8; 4]) -> Addr {
        Addr {
            v6: false,
            bits: u32::from_be_bytes(a) as u128,
        }
    }
    pub fn v6(a: [u8; 16]) -> Addr {
        Addr {
            v6: true,
            bits: u128::from_be_bytes(a),
        }
    }
    pub fn parse(s: &str) -> Addr {
        match s.parse::<std::net::IpAddr>().expect("an address") {
            std::net::IpAddr::V4(a) => Addr::v4(a.octets()),
            std::net::IpAddr::V6(a) => Addr::v6(a.octets()),
        }
    }
    fn width(&self) -> u32 {
        if self.v6 {
            128
        } else {
            32
        }
    }
}

/// The model of one router: its devices, routes, neighbours and own IPv4 addresses.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub devs: Vec<Dev>,
    /// (prefix, length, where it leads).
    pub routes: Vec<(Addr, u32, Via)>,
    /// (device, address, MAC).
    pub neighs: Vec<(usize, Addr, [u8; 6])>,
    /// The router's own IPv4 addresses: packets from them are martians.
    pub own4: Vec<[u8; 4]>,
}

/// What the fast path must do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward out of device `dev` to neighbour `mac`.
    Forward { dev: usize, mac: [u8; 6] },
    /// Hand to the kernel unchanged, counted under this reason.
    Pass(usize),
}

impl Model {
    /// `s` = "PREFIX/LEN".
    pub fn route(&mut self, s: &str, via: Via) -> &mut Model {
        let (a, l) = s.split_once('/').expect("PREFIX/LEN");
        self.routes.push((Addr::parse(a), l.parse().unwrap(), via));
        self
    }

    pub fn neigh(&mut self, dev: usize, ip: &str, mac: [u8; 6]) -> &mut Model {
        self.neighs.push((dev, Addr::parse(ip), mac));
        self
    }

    /// Longest-prefix match.
    fn lookup(&self, d: Addr) -> Option<Via> {
        self.routes
            .iter()
            .filter(|(n, l, _)| {
                n.v6 == d.v6 && (*l == 0 || (n.bits ^ d.bits) >> (d.width() - l) == 0)
            })
            .max_by_key(|(_, l, _)| *l)
            .map(|(_, _, v)| *v)
    }

    /// The verdict for `f` arriving on device `ingress`.
    pub fn verdict(&self, ingress: usize, f: &[u8]) -> Verdict {
        use Verdict::Pass;
        if f.len() < 14 {
            return Pass(why::MALFORMED);
        }
        if f[0] & 1 != 0 {
            return Pass(why::BCAST_MCAST);
        }
        if f[0..6] != self.devs[ingress].mac {
            return Pass(why::NOT_OUR_MAC);
        }
        let l3 = &f[14..];
        let (dst, ip_len) = match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 => match self.ipv4(l3) {
                Ok(v) => v,
                Err(reason) => return Pass(reason),
            },
            0x86dd => match ipv6(l3) {
                Ok(v) => v,
                Err(reason) => return Pass(reason),
            },
            _ => return Pass(why::NOT_IP),
        };
        let Some(via) = self.lookup(dst) else {
            return Pass(why::NO_ROUTE);
        };
        let (dev, neigh) = match via {
            Via::Local => return Pass(why::LOCAL_DEST),
            Via::Connected(d) => (d, dst),
            Via::Gateway(d, nh) => (d, nh),
        };
        if dev == ingress {
            return Pass(why::SAME_IFACE);
        }
        if ip_len > self.devs[dev].mtu as usize {
            return Pass(why::TOO_BIG);
        }
        let Some(mac) = self
            .neighs
            .iter()
            .find(|(d, a, _)| *d == dev && *a == neigh)
            .map(|(_, _, m)| *m)
        else {
            return Pass(why::NO_NEIGH);
        };
        if self.devs[ingress].verify_l4 && !l4_complete(l3, dst.v6) {
            return Pass(why::L4_CHECKSUM);
        }
        if !self.devs[dev].redirect {
            return Pass(why::NO_TX_PORT);
        }
        Verdict::Forward { dev, mac }
    }

    /// IPv4 header checks: (destination, total length) or the reason to pass.
    fn ipv4(&self, ip: &[u8]) -> Result<(Addr, usize), usize> {
        if ip.len() < 20 {
            return Err(why::MALFORMED);
        }
        let (version, ihl) = (ip[0] >> 4, ip[0] & 0xf);
        if version != 4 || ihl < 5 {
            return Err(why::MALFORMED);
        }
        if ihl > 5 {
            return Err(why::IP_OPTIONS);
        }
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if tot < 20 || tot > ip.len() {
            return Err(why::MALFORMED);
        }
        if crate::frame::checksum(&ip[..20]) != 0 {
            return Err(why::BAD_CHECKSUM);
        }
        let (s, d) = (
            [ip[12], ip[13], ip[14], ip[15]],
            [ip[16], ip[17], ip[18], ip[19]],
        );
        if d[0] >> 4 == 0xe || d == [255; 4] {
            return Err(why::BCAST_MCAST);
        }
        let martian = |a: [u8; 4]| a[0] == 0 || a[0] == 127;
        if martian(s) || s[0] >> 4 == 0xe || s == [255; 4] || martian(d) {
            return Err(why::MARTIAN);
        }
        if self.own4.contains(&s) {
            return Err(why::MARTIAN);
        }
        if ip[8] <= 1 {
            return Err(why::TTL_EXCEEDED);
        }
        Ok((Addr::v4(d), tot))
    }
}

/// Whether a frame's transport checksum is complete, as far as the fast path can tell on a
/// device that may carry partial checksums: an unfragmented IPv4 TCP or UDP segment (UDP with
/// checksum 0: none) or an IPv6 one right after the fixed header verifies against its
/// pseudo-header; IPv6 routing or destination-options headers and SCTP are never trusted;
/// everything else is.
fn l4_complete(ip: &[u8], v6: bool) -> bool {
    let (proto, hdr, len, pseudo): (u8, usize, usize, Vec<u8>) = if v6 {
        let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let mut p = ip[8..40].to_vec();
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, ip[6]]);
        (ip[6], 40, len, p)
    } else {
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return true;
        }
        let len = u16::from_be_bytes([ip[2], ip[3]]) as usize - 20;
        let mut p = ip[12..20].to_vec();
        p.extend_from_slice(&[0, ip[9]]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        (ip[9], 20, len, p)
    };
    match proto {
        6 | 17 => {}
        43 | 60 | 132 if v6 => return false,
        _ => return true,
    }
    let seg = &ip[hdr..hdr + len];
    // Shorter than a UDP header: no partial checksum possible, nothing to verify.
    if seg.len() < 8 {
        return true;
    }
    if !v6 && proto == 17 && seg[6..8] == [0, 0] {
        return true;
    }
    if seg.len() > 8192 {
        return false;
    }
    let mut all = pseudo;
    all.extend_from_slice(seg);
    crate::frame::checksum(&all) == 0
}

/// IPv6 header checks: (destination, header + payload length) or the reason to pass.
fn ipv6(ip: &[u8]) -> Result<(Addr, usize), usize> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return Err(why::MALFORMED);
    }
    if ip[6] == 0 {
        return Err(why::IP_OPTIONS);
    }
    let len = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if len > ip.len() {
        return Err(why::MALFORMED);
    }
    let (s, d) = (&ip[8..24], &ip[24..40]);
    if d[0] == 0xff {
        return Err(why::BCAST_MCAST);
    }
    let low = |a: &[u8]| a[..8].iter().all(|b| *b == 0);
    if s[0] == 0xff || low(s) || low(d) {
        return Err(why::MARTIAN);
    }
    let link_local = |a: &[u8]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    if link_local(s) || link_local(d) {
        return Err(why::LINK_LOCAL);
    }
    if ip[7] <= 1 {
        return Err(why::TTL_EXCEEDED);
    }
    Ok((Addr::v6(d.try_into().unwrap()), len))
}

/// The frame the kernel would send for `f` forwarded to `mac` out of a device with MAC `src`:
/// padding trimmed, MACs rewritten, TTL − 1 with the header checksum updated as the kernel's
/// `ip_decrease_ttl` does, or hop limit − 1.
pub fn forwarded(f: &[u8], mac: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let ipv6 = f[12..14] == [0x86, 0xdd];
    let len = if ipv6 {
        54 + u16::from_be_bytes([f[18], f[19]]) as usize
    } else {
        14 + u16::from_be_bytes([f[16], f[17]]) as usize
    };
    let mut out = f[..len].to_vec();
    out[0..6].copy_from_slice(&mac);
    out[6..12].copy_from_slice(&src);
    if ipv6 {
        out[21] -= 1;
    } else {
        out[22] -= 1;
        // check += htons(0x0100); check += (check >= 0xffff), on the stored bytes.
        let c = u16::from_be_bytes([out[24], out[25]]) as u32 + 0x0100;
        let c = (c + (c >= 0xffff) as u32) as u16;
        out[24..26].copy_from_slice(&c.to_be_bytes());
    }
    out
}

//! Frames built byte by byte, with checksums computed from scratch, independently of the
//! program under test.

pub const ETH_P_IP: u16 = 0x0800;

/// Internet checksum over `bytes`, from scratch.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub tos: u8,
    pub id: u16,
    pub flags_frag: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Options (a multiple of 4 bytes); IHL follows from their length.
    pub options: Vec<u8>,
}

impl Ipv4 {
    pub fn udp(src: [u8; 4], dst: [u8; 4], ttl: u8) -> Ipv4 {
        Ipv4 {
            tos: 0,
            id: 0x1234,
            flags_frag: 0x4000,
            ttl,
            protocol: 17,
            src,
            dst,
            options: Vec::new(),
        }
    }

    /// The header with a from-scratch checksum, for a payload of `payload_len` bytes.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let ihl = 5 + self.options.len() / 4;
        let total = (ihl * 4 + payload_len) as u16;
        let mut h = vec![(4 << 4) | ihl as u8, self.tos];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.flags_frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }
}

/// A UDP datagram (checksum 0, as IPv4 allows) with `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Ethernet + IPv4 + UDP with a 64-byte patterned payload.
pub fn ipv4_udp(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &Ipv4) -> Vec<u8> {
    let payload: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(3))
        .collect();
    let l4 = udp(40000, 5201, &payload);
    let mut l3 = ip.header(l4.len());
    l3.extend_from_slice(&l4);
    ethernet(dst_mac, src_mac, ETH_P_IP, &l3)
}

pub const ETH_P_IPV6: u16 = 0x86dd;

#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub traffic_class: u8,
    pub flow_label: u32,
    /// The first next header (of `ext` when there is one, else of the payload).
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Extension headers, already encoded, between the fixed header and the payload.
    pub ext: Vec<u8>,
}

impl Ipv6 {
    pub fn udp(src: [u8; 16], dst: [u8; 16], hop_limit: u8) -> Ipv6 {
        Ipv6 {
            traffic_class: 0,
            flow_label: 0x12345,
            next_header: 17,
            hop_limit,
            src,
            dst,
            ext: Vec::new(),
        }
    }

    /// The fixed header plus `ext`, for an upper-layer payload of `payload_len` bytes.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let vtc = (6u32 << 28) | ((self.traffic_class as u32) << 20) | (self.flow_label & 0xfffff);
        let mut h = vtc.to_be_bytes().to_vec();
        h.extend_from_slice(&((self.ext.len() + payload_len) as u16).to_be_bytes());
        h.extend_from_slice(&[self.next_header, self.hop_limit]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.ext);
        h
    }
}

/// An IPv6 address from its eight 16-bit groups.
pub fn v6(g: [u16; 8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    for (i, w) in g.iter().enumerate() {
        a[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    a
}

/// A UDP datagram over IPv6, with the mandatory checksum over the pseudo-header.
pub fn udp6(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp(sport, dport, payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(u.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&u);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// Ethernet + IPv6 + UDP with the same 64-byte payload as `ipv4_udp`.
pub fn ipv6_udp(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &Ipv6) -> Vec<u8> {
    let payload: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(3))
        .collect();
    let l4 = udp6(&ip.src, &ip.dst, 40000, 5201, &payload);
    let mut l3 = ip.header(l4.len());
    l3.extend_from_slice(&l4);
    ethernet(dst_mac, src_mac, ETH_P_IPV6, &l3)
}

/// Sets the IPv4 header checksum of Ethernet frame `f` to what its IHL covers (at least 20
/// bytes), when the frame holds that much of a header; other frames are left as they are.
pub fn fix_ipv4_checksum(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [8, 0] {
        return;
    }
    let hl = ((f[14] & 0xf) as usize * 4).max(20);
    if f.len() >= 14 + hl {
        f[24..26].fill(0);
        let c = checksum(&f[14..14 + hl]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

//! Headers and bounds-checked access to them, whatever the hook.

/// What bounds-checked access needs of a packet: where its directly readable bytes start and
/// end (each hook is one, see `hook::Hook`).
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const NEXTHDR_HOP: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// Bounds-checked pointer to a `T` at `offset` bytes into the frame's directly readable part.
#[inline(always)]
pub fn ptr_at<T>(h: &impl Packet, offset: usize) -> Option<*mut T> {
    let start = h.data();
    if start + offset + core::mem::size_of::<T>() > h.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn first_half_zero(a: &[u8; 16]) -> bool {
    // SAFETY: 8 readable bytes; unaligned read.
    unsafe { core::ptr::read_unaligned(a.as_ptr() as *const u64) == 0 }
}

/// fe80::/10.
#[inline(always)]
pub fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// The TCP/UDP ports at `offset`, mixed for the flow hash (0 when the frame ends before them).
#[inline(always)]
pub fn ports(h: &impl Packet, offset: usize) -> u32 {
    if cfg!(mutant = "ecmp_ignores_ports") {
        return 0;
    }
    match ptr_at::<[u8; 4]>(h, offset) {
        // SAFETY: bounds checked by `ptr_at`.
        Some(p) => u32::from_ne_bytes(unsafe { *p }).rotate_left(7),
        None => 0,
    }
}

/// The length of the TCP or UDP header at `offset` (None for other protocols, or when the
/// frame ends before it).
#[inline(always)]
pub fn l4_header_len(h: &impl Packet, offset: usize, proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_UDP => Some(8),
        IPPROTO_TCP => {
            let doff = ptr_at::<u8>(h, offset + 12)?;
            // SAFETY: bounds checked by `ptr_at`.
            Some(((unsafe { *doff } >> 4) as usize) * 4)
        }
        _ => None,
    }
}

/// MACs are compared and copied as one u32 and one u16 rather than through memcmp/memmove,
/// which the BPF target compiles to byte loops in called subprograms.
#[inline(always)]
pub fn same_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    // SAFETY: both point to 6 readable bytes; unaligned reads.
    unsafe {
        let (a, b) = (a.as_ptr(), b.as_ptr());
        core::ptr::read_unaligned(a as *const u32) == core::ptr::read_unaligned(b as *const u32)
            && core::ptr::read_unaligned(a.add(4) as *const u16)
                == core::ptr::read_unaligned(b.add(4) as *const u16)
    }
}

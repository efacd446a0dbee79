//! Every checksum computation of the fast path, in one place: RFC 1624 incremental updates
//! (the arithmetic of XDP's checksum primitives and of ICMP error translation), the TTL
//! decrement's update, IPv4 header verification, pseudo-header sums and the XDP verification
//! of TCP and UDP checksums. Values are 16-bit words in memory order (read natively on this
//! little-endian target): one's-complement sums do not depend on the byte order as long as
//! every word is read the same way.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_load_bytes},
    programs::XdpContext,
    EbpfContext as _,
};

use crate::{
    maps::SCRATCH,
    parse::{Ipv4Hdr, Ipv6Hdr, IPV4_LEN},
};

/// One's-complement update of checksum `check` for 16-bit words `old` → `new` (two words
/// each): RFC 1624's HC' = ~(~HC + ~m + m'), as the kernel's csum_replace.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut s = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + (new >> 16) as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// As `replace4`, for one 16-bit word.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut s = (!check) as u32 + (!old) as u32 + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// New header checksum after TTL − 1, computed exactly as the kernel's `ip_decrease_ttl` does
/// (so forwarded bytes equal the kernel's): TTL is the high byte of its 16-bit word, so the
/// checksum grows by 0x0100, with the end-around carry folded in. On this little-endian target
/// the stored word read natively is byte-swapped, which makes 0x0100 the native value 1.
///
/// The same write serves both hooks: the IPv4 header checksum is never left partial, and the
/// header's one's-complement sum does not change (the checksum compensates the TTL), so an
/// skb's CHECKSUM_COMPLETE value stays right.
#[inline(always)]
pub fn decrement_ttl(check: [u8; 2]) -> [u8; 2] {
    let c = u16::from_ne_bytes(check) as u32 + u16::from_ne_bytes([1, 0]) as u32;
    let c = (c + (c >= 0xffff) as u32) as u16;
    if cfg!(mutant = "checksum_byte_order") {
        c.to_be_bytes()
    } else {
        c.to_ne_bytes()
    }
}

/// True when a 20-byte IPv4 header (its 16-bit words) sums to 0xffff in one's complement.
#[inline(always)]
pub fn ipv4_header_ok(words: &[u16; IPV4_LEN / 2]) -> bool {
    // The words are summed in memory order, which gives the byte-swapped sum on a
    // little-endian machine, and 0xffff either way.
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

/// The IPv4 pseudo-header's sum, in memory-order 16-bit words (see `l4_verifies`).
#[inline(always)]
pub fn pseudo4(ip: &Ipv4Hdr, l4_len: usize) -> u64 {
    let w = |b: [u8; 2]| u16::from_ne_bytes(b) as u64;
    w([ip.src[0], ip.src[1]])
        + w([ip.src[2], ip.src[3]])
        + w([ip.dst[0], ip.dst[1]])
        + w([ip.dst[2], ip.dst[3]])
        + w([0, ip.protocol])
        + w((l4_len as u16).to_be_bytes())
}

/// The IPv6 pseudo-header's sum, likewise.
#[inline(always)]
pub fn pseudo6(ip: &Ipv6Hdr, l4_len: usize) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < 16 {
        s += u16::from_ne_bytes([ip.src[i], ip.src[i + 1]]) as u64;
        s += u16::from_ne_bytes([ip.dst[i], ip.dst[i + 1]]) as u64;
        i += 2;
    }
    s + u16::from_ne_bytes((l4_len as u16).to_be_bytes()) as u64
        + u16::from_ne_bytes([0, ip.next_header]) as u64
}

/// True when the TCP or UDP segment in `[l4, end)` (at least 8 bytes) of an XDP frame
/// verifies against the pseudo-header sum `pseudo` (memory-order 16-bit words). Segments
/// longer than 8 KiB are not verified (false: the kernel decides).
///
/// The segment is copied in chunks of up to 512 bytes into a per-CPU scratch buffer
/// (`bpf_xdp_load_bytes` checks the bounds when it runs) and summed there by the kernel's
/// checksum helper: the verifier tracks no packet range through the loop, which keeps loading
/// the program cheap.
#[inline(always)]
pub fn l4_verifies(ctx: &XdpContext, l4: usize, end: usize, pseudo: u64) -> bool {
    const CHUNK: u32 = 512;
    if end < l4 + 8 || end - l4 > 16 * CHUNK as usize {
        return false;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let mut sum = pseudo;
    let mut off = l4 as u32;
    let mut left = (end - l4) as u32;
    for _ in 0..16 {
        if left == 0 {
            break;
        }
        let n = if left > CHUNK { CHUNK } else { left };
        // 1..=512 as the verifier sees it too (n is never 0 here: left > 0).
        let n = ((n.wrapping_sub(1)) & (CHUNK - 1)) + 1;
        // SAFETY: the helper copies n (1..=512) bytes at `off` of the frame into the 516-byte
        // buffer, or fails when the frame is shorter.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                ctx.as_ptr() as *mut _,
                off,
                buf as *mut core::ffi::c_void,
                n,
            )
        };
        if rc != 0 {
            return false;
        }
        // The last chunk may end inside a 32-bit word: zeros complete it.
        let words = (n + 3) & !3;
        // SAFETY: n <= 512 and the buffer has 516 bytes: bytes n..n+3 lie inside it.
        unsafe {
            let b = &mut *buf;
            let i = n as usize;
            if let Some(x) = b.get_mut(i) {
                *x = 0;
            }
            if let Some(x) = b.get_mut(i + 1) {
                *x = 0;
            }
            if let Some(x) = b.get_mut(i + 2) {
                *x = 0;
            }
        }
        // SAFETY: `words` (4..=512, a multiple of 4) bytes of the buffer.
        let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf as *mut u32, words, 0) };
        if s < 0 {
            return false;
        }
        sum += s as u32 as u64;
        off += n;
        left -= n;
    }
    // Fold to 16 bits (a fixed number of steps, for the verifier): the sum stays below 2^40.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

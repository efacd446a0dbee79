//! What forwarding changes in a frame: MACs, TTL and its checksum.

#[inline(always)]
pub fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
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

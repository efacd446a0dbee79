//! What forwarding changes in a frame besides the TTL (see `csum::decrement_ttl`): the MACs.

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

//! Benchmark helpers, never attached by the router itself:
//! - `bench_gen`: a traffic generator for BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES. Live
//!   frame pages are recycled without being reset, so every run rewrites all header bytes from a
//!   per-flow template (cycling through `GEN_FLOWS`) and transmits the frame (XDP_TX).
//!   The template is the whole 64-byte frame, so IPv4 and IPv6 are generated alike.
//! - `bench_wire`: the floor for any XDP router on a path: redirect to a fixed device, no lookup.
//! - `bench_fib`: what an XDP router built on the kernel's own FIB does per packet (the way of
//!   the kernel's xdp_fwd sample and of xdp-forward): parse, `bpf_fib_lookup` in the
//!   namespace's main table with its neighbour, MAC rewrite, TTL or hop limit decrement,
//!   `bpf_redirect`; the yardstick for our own lookup at the same table size.
//! - `bench_probe_array`, `bench_probe_hash`: one read of a random 1 KiB group, in a BPF array
//!   (vmalloc'd: 4 KiB pages) or in a hash map without preallocation (elements kmalloc'd, in the
//!   kernel's direct map), to measure what the page size of a table's memory costs a cold lookup.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    bindings::BPF_F_NO_PREALLOC,
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_DIRECT},
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
};

/// Bytes the generator writes: a whole 64-byte frame (Ethernet + IPv4 or IPv6 + UDP + payload).
pub const GEN_HDR_LEN: usize = 64;
pub const GEN_MAX_FLOWS: u32 = 4096;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowHdr {
    pub bytes: [u8; 64],
}

#[map(name = "GEN_FLOWS")]
static GEN_FLOWS: Array<FlowHdr> = Array::with_max_entries(GEN_MAX_FLOWS, 0);

/// [0] = number of flows in use.
#[map(name = "GEN_CONF")]
static GEN_CONF: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "GEN_SEQ")]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "WIRE_PORT")]
static WIRE_PORT: DevMapHash = DevMapHash::with_max_entries(1, 0);

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + GEN_HDR_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let n = match GEN_CONF.get(0) {
        Some(n) if *n > 0 => *n,
        _ => return xdp_action::XDP_ABORTED,
    };
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot.
    let i = unsafe {
        let v = *seq;
        *seq = if v + 1 >= n { 0 } else { v + 1 };
        v
    };
    let Some(flow) = GEN_FLOWS.get(i) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: GEN_HDR_LEN bytes are inside the frame (checked above) and inside the map value.
    unsafe {
        core::ptr::copy_nonoverlapping(flow.bytes.as_ptr(), start as *mut u8, GEN_HDR_LEN);
    }
    xdp_action::XDP_TX
}

#[map(name = "PROBE_ARRAY")]
static PROBE_ARRAY: Array<[u32; 256]> = Array::with_max_entries(1, 0);

#[map(name = "PROBE_HASH")]
static PROBE_HASH: HashMap<u32, [u32; 256]> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// The probe's group and entry: from the 4 bytes at offset 30 of the frame (an IPv4
/// destination), the group from the high 16 bits modulo the groups in use (`GEN_CONF[0]`), the
/// entry from the next 8.
#[inline(always)]
fn probe_at(ctx: &XdpContext) -> Option<(u32, usize)> {
    let start = ctx.data();
    if start + 34 > ctx.data_end() {
        return None;
    }
    // SAFETY: bytes 30..34 are inside the frame (checked above).
    let k = u32::from_be(unsafe { core::ptr::read_unaligned((start + 30) as *const u32) });
    let n = *GEN_CONF.get(0)?;
    if n == 0 {
        return None;
    }
    Some(((k >> 16) % n, ((k >> 8) & 0xff) as usize))
}

#[xdp]
pub fn bench_probe_array(ctx: XdpContext) -> u32 {
    let Some((g, i)) = probe_at(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    match PROBE_ARRAY.get(g).and_then(|g| g.get(i)) {
        Some(v) if *v != 0 => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[xdp]
pub fn bench_probe_hash(ctx: XdpContext) -> u32 {
    let Some((g, i)) = probe_at(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a map lookup; the value is read while the program runs.
    match unsafe { PROBE_HASH.get(&g) }.and_then(|g| g.get(i)) {
        Some(v) if *v != 0 => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// [0] = the ifindex packets arrive on for `bench_fib` (the namespace its lookups are in).
#[map(name = "FIB_IN")]
static FIB_IN: Array<u32> = Array::with_max_entries(1, 0);

const ETH_LEN: usize = 14;

#[xdp]
pub fn bench_fib(ctx: XdpContext) -> u32 {
    fib_forward(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn fib_forward(ctx: &XdpContext) -> Option<u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_LEN + 40 > end {
        return None;
    }
    // SAFETY: every read and write below is inside the first 54 bytes, checked above.
    unsafe {
        let proto = u16::from_be(core::ptr::read_unaligned((start + 12) as *const u16));
        let ip = start + ETH_LEN;
        // SAFETY: a plain C struct; all zeroes is a valid value.
        let mut p: FibParams = core::mem::zeroed();
        p.ifindex = *FIB_IN.get(0)?;
        match proto {
            0x0800 => {
                if *((ip + 8) as *const u8) <= 1 {
                    return None;
                }
                p.family = 2;
                p.l4_protocol = *((ip + 9) as *const u8);
                p.__bindgen_anon_1.tot_len =
                    u16::from_be(core::ptr::read_unaligned((ip + 2) as *const u16));
                p.__bindgen_anon_3.ipv4_src = core::ptr::read_unaligned((ip + 12) as *const u32);
                p.__bindgen_anon_4.ipv4_dst = core::ptr::read_unaligned((ip + 16) as *const u32);
            }
            0x86dd => {
                if *((ip + 7) as *const u8) <= 1 {
                    return None;
                }
                p.family = 10;
                p.l4_protocol = *((ip + 6) as *const u8);
                p.__bindgen_anon_1.tot_len =
                    u16::from_be(core::ptr::read_unaligned((ip + 4) as *const u16)) + 40;
                p.__bindgen_anon_3.ipv6_src =
                    core::ptr::read_unaligned((ip + 8) as *const [u32; 4]);
                p.__bindgen_anon_4.ipv6_dst =
                    core::ptr::read_unaligned((ip + 24) as *const [u32; 4]);
            }
            _ => return None,
        }
        let rc = bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_DIRECT,
        );
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
            return None;
        }
        if proto == 0x0800 {
            // TTL down by one, the header checksum up by 0x0100 (ones' complement).
            *((ip + 8) as *mut u8) -= 1;
            let c = (ip + 10) as *mut u16;
            let sum = u16::from_be(core::ptr::read_unaligned(c)) as u32 + 0x0100;
            core::ptr::write_unaligned(c, (((sum & 0xffff) + (sum >> 16)) as u16).to_be());
        } else {
            *((ip + 7) as *mut u8) -= 1;
        }
        core::ptr::write_unaligned(start as *mut [u8; 6], p.dmac);
        core::ptr::write_unaligned((start + 6) as *mut [u8; 6], p.smac);
        Some(bpf_redirect(p.ifindex, 0) as u32)
    }
}

#[xdp]
pub fn bench_wire(_ctx: XdpContext) -> u32 {
    match WIRE_PORT.redirect(0, 0) {
        Ok(a) => a,
        Err(_) => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

//! The router's fast path: one object per router with two programs sharing its maps, both
//! running the same per-packet logic (`forward`):
//!
//! - `router`, attached at XDP (driver hook) to devices whose frames arrive as frames;
//! - `router_tc`, attached at tcx ingress to devices whose traffic arrives as skbs (veth, tap,
//!   Open vSwitch internal ports), where it keeps GSO packets and partial checksums intact.
//!
//! Ethernet → IPv4 or IPv6 → longest-prefix route → neighbour → MAC rewrite, TTL − 1 with the
//! kernel's checksum arithmetic (IPv6: hop limit − 1) → redirect. Everything else goes to the
//! kernel with a counted reason, so the namespace's kernel keeps doing what Neutron's router does.
#![no_std]
#![no_main]

mod csum;
mod forward;
mod hook;
mod lookup;
mod maps;
mod nat;
mod parse;
mod rewrite;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn router(ctx: XdpContext) -> u32 {
    forward::run(&hook::Xdp(ctx)) as u32
}

#[classifier]
pub fn router_tc(ctx: TcContext) -> i32 {
    forward::run(&hook::Tc(ctx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

//! What an HA host does to a router it holds or gives up: its addresses taken off (a standby,
//! a resign), the fence put up and taken down.

use std::net::IpAddr;

use anyhow::Result;

use crate::{
    kernel::{netns, rtnl::Rtnl},
    state::RouterState,
};

/// Removes every address of the router from its namespace (qr- gateway IPs, qg- external IPs
/// and floating IPs): what a standby holds, and what fencing and resigning do.
pub fn release(st: &RouterState) -> Result<()> {
    let st = st.clone();
    netns::run_in(&st.namespace.clone(), move || {
        let rt = Rtnl::new()?;
        let have = rt.addrs()?;
        let mut failed = Vec::new();
        for (index, ip, len) in addresses(&st) {
            if have
                .iter()
                .any(|a| a.index == index && a.ip == ip && a.prefix_len == len)
            {
                if let Err(e) = rt.addr_del(index, &format!("ifindex {index}"), ip, len) {
                    failed.push(format!("{e:#}"));
                }
            }
        }
        match failed.is_empty() {
            true => Ok(()),
            false => anyhow::bail!("{}", failed.join("; ")),
        }
    })
}

/// Fences the router (see `nft::fence`): what the fencer does when the lease was not renewed
/// in time. Unlike `release`, the addresses and routes stay, so traffic still sent to this
/// host's MAC keeps being forwarded until the clients move to the new active host.
pub fn fence(st: &RouterState) -> Result<()> {
    netns::run_in(&st.namespace, crate::kernel::nft::fence)
}

/// Takes the fence down: before this host holds the router again, or as a standby.
pub fn unfence(st: &RouterState) -> Result<()> {
    netns::run_in(&st.namespace, crate::kernel::nft::unfence)
}

/// (ifindex, address, prefix length) of every address the router holds when active.
pub(super) fn addresses(st: &RouterState) -> Vec<(u32, IpAddr, u8)> {
    let mut v = Vec::new();
    for i in &st.interfaces {
        for f in &i.fixed_ips {
            let (ip, len) = f.addr();
            v.push((i.ifindex, ip, len));
        }
    }
    if let (Some(g), Some(qg)) = (&st.gateway, st.interfaces.iter().find(|i| i.external)) {
        for f in g
            .floating_ips
            .iter()
            .filter(|f| f.fixed_ip_address.is_some())
        {
            v.push((qg.ifindex, IpAddr::V4(f.floating_ip_address), 32));
        }
    }
    v
}

//! One view of a router as it runs now, for the CLI (`show`, `stats`, `neigh`, `nat`, `router
//! list`), the metrics endpoint and the API alike: its health, each device's hook, program and
//! redirect slots, the fast path's counters, neighbours and NAT flows. Nothing here changes
//! anything.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result};
use router_common::{map_names, pass_reason, Stats};

use crate::{
    config::Hook,
    datapath,
    kernel::{netns, policy::PortPolicy, rtnl::Rtnl},
    state::{self, IfaceState, RouterState},
};

/// A router's health: forwarding as defined, its namespace there but a device gone or without
/// its program, or its namespace gone without `destroy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Active,
    Degraded,
    Lost,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Active => "ACTIVE",
            Health::Degraded => "DEGRADED",
            Health::Lost => "LOST",
        }
    }
}

/// The health of `r`, and why it is not active.
pub fn health(r: &RouterState) -> (Health, Vec<String>) {
    if let Some(why) = r.lost.clone().or_else(|| r.namespace_gone()) {
        return (Health::Lost, vec![why]);
    }
    let links = match netns::run_in(&r.namespace.clone(), || Rtnl::new()?.links()) {
        Ok(l) => l,
        Err(e) => return (Health::Degraded, vec![format!("{e:#}")]),
    };
    let mut problems = Vec::new();
    for i in &r.interfaces {
        match links.iter().find(|l| l.name == i.device) {
            Some(l) if l.index == i.ifindex => {
                if hook_of(r, i) == "none" {
                    problems.push(format!("{}: no program attached", i.device));
                }
            }
            Some(_) => problems.push(format!(
                "{}: another device of that name replaced it; apply again",
                i.device
            )),
            None => problems.push(format!(
                "{}: gone from {}; plug it back and apply again",
                i.device, r.namespace
            )),
        }
    }
    match problems.is_empty() {
        true => (Health::Active, problems),
        false => (Health::Degraded, problems),
    }
}

/// "tc" or "xdp": the hook the fast path runs in on a device ("none" when not attached).
pub fn hook_of(r: &RouterState, i: &IfaceState) -> &'static str {
    match i.active_hook {
        Some(Hook::Xdp) if state::link_pin(&r.id, &i.device).exists() => "xdp",
        Some(Hook::Tc) if state::tc_link_pin(&r.id, &i.device).exists() => "tc",
        _ => "none",
    }
}

/// One device of a router, as it runs.
#[derive(Clone, Debug)]
pub struct Device {
    pub iface: IfaceState,
    /// `hook_of`.
    pub hook: &'static str,
    /// The program its link runs.
    pub prog_id: Option<u32>,
    /// Packets can be redirected to it now: by the tc program (skbs: the device is up), by
    /// the XDP program (frames: up, and able to take XDP-redirected frames).
    pub redirect_tc: bool,
    pub redirect_xdp: bool,
}

/// A router as it runs: its state, health and devices.
#[derive(Clone, Debug)]
pub struct Router {
    pub state: RouterState,
    pub health: Health,
    pub problems: Vec<String>,
    pub devices: Vec<Device>,
    /// The namespace's foreign netfilter rules and whether the fast path is guarded by them
    /// (see `crate::guard`); None for a lost router.
    pub filter: Option<Filter>,
    /// Each port's families its namespace's settings leave to the kernel, and why (see
    /// `kernel::policy`); empty for a lost router and a defined one.
    pub policy: BTreeMap<String, PortPolicy>,
}

/// Foreign netfilter rules as the fast path sees them.
#[derive(Clone, Debug)]
pub struct Filter {
    /// The fast path carries only flows the kernel forwarded under the rules.
    pub guarded: bool,
    pub rules: crate::kernel::nfrules::Foreign,
}

/// The filter view of a live router: its `nat_conf` bit, and the rules its namespace holds.
fn filter(r: &RouterState) -> Result<Filter> {
    let bits = datapath::nat_conf(&r.id)?;
    let rules = crate::kernel::netns::run_in(&r.namespace, || {
        crate::kernel::nfrules::NfRules::open(false)?.foreign()
    })?;
    Ok(Filter {
        guarded: bits & router_common::nat_conf::GUARDED != 0,
        rules,
    })
}

/// What the namespace's forwarding switches and policy rules leave to the kernel, by port.
fn policy(r: &RouterState) -> Result<BTreeMap<String, PortPolicy>> {
    let ports = r.ports();
    let by_index = netns::run_in(&r.namespace, move || {
        crate::kernel::policy::read(&Rtnl::new()?, &ports)
    })?;
    Ok(r.interfaces
        .iter()
        .filter_map(|i| Some((i.device.clone(), by_index.get(&i.ifindex)?.clone())))
        .collect())
}

/// The view of router `r`.
pub fn router(r: &RouterState) -> Result<Router> {
    let (mut health, mut problems) = health(r);
    let (xdp, tc) = if r.lost.is_some() {
        (Vec::new(), Vec::new())
    } else {
        // A router being applied or destroyed right now may have its state file without its
        // maps: it is shown with the problem, and the other routers are shown all the same.
        match (datapath::tx_ports(&r.id), datapath::tc_ports(&r.id)) {
            (Ok(x), Ok(t)) => (x, t),
            (Err(e), _) | (_, Err(e)) => {
                problems.push(format!("redirect maps: {e:#}"));
                health = Health::Degraded;
                (Vec::new(), Vec::new())
            }
        }
    };
    let devices = r
        .interfaces
        .iter()
        .map(|i| Device {
            iface: i.clone(),
            hook: hook_of(r, i),
            prog_id: datapath::linked_program(&state::link_pin(&r.id, &i.device))
                .or_else(|| datapath::linked_program(&state::tc_link_pin(&r.id, &i.device))),
            redirect_tc: tc.get(i.slot as usize) == Some(&i.ifindex),
            redirect_xdp: xdp.get(i.slot as usize).copied().flatten() == Some(i.ifindex),
        })
        .collect();
    let filter = if r.lost.is_some() {
        None
    } else {
        match filter(r) {
            Ok(f) => Some(f),
            Err(e) => {
                problems.push(format!("netfilter rules: {e:#}"));
                None
            }
        }
    };
    let policy = if r.lost.is_some() || !r.followed {
        BTreeMap::new()
    } else {
        policy(r).unwrap_or_else(|e| {
            problems.push(format!("forwarding settings: {e:#}"));
            BTreeMap::new()
        })
    };
    Ok(Router {
        state: r.clone(),
        health,
        problems,
        devices,
        filter,
        policy,
    })
}

/// A device's counters, summed over the CPUs.
#[derive(Clone, Debug)]
pub struct Counters {
    pub device: String,
    pub ifindex: u32,
    pub stats: Stats,
}

impl Counters {
    /// Forwarded IPv4 (packets, bytes): the IPv6 part taken from the total. The CPUs' values
    /// are read one after the other while they count, so the part may be read ahead of the
    /// total by a packet: never below zero.
    pub fn ipv4(&self) -> (u64, u64) {
        let s = &self.stats;
        (
            s.fwd_packets.saturating_sub(s.fwd6_packets),
            s.fwd_bytes.saturating_sub(s.fwd6_bytes),
        )
    }

    /// (reason's name, packets) for every pass reason this build knows.
    pub fn reasons(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        pass_reason::NAMES
            .iter()
            .copied()
            .zip(self.stats.pass.iter().copied())
    }
}

/// The fast path's counters of every device of `r`.
pub fn counters(r: &RouterState) -> Result<Vec<Counters>> {
    let map = datapath::open_pinned(&r.id, map_names::STATS)?;
    r.interfaces
        .iter()
        .map(|i| {
            Ok(Counters {
                device: i.device.clone(),
                ifindex: i.ifindex,
                stats: datapath::read_stats(&map, i.slot)
                    .with_context(|| format!("reading counters of {}", i.device))?,
            })
        })
        .collect()
}

/// The neighbours the fast path knows for `r`: (device, address, MAC).
pub fn neighbours(r: &RouterState) -> Result<Vec<(String, IpAddr, [u8; 6])>> {
    let n = datapath::Neighs::open(&r.id)?;
    Ok(n.all()
        .into_iter()
        .map(|(ifindex, addr, mac)| {
            let dev = r
                .interfaces
                .iter()
                .find(|i| i.ifindex == ifindex)
                .map(|i| i.device.clone())
                .unwrap_or_else(|| format!("ifindex {ifindex}"));
            (dev, addr, mac)
        })
        .collect())
}

/// The NAT flows the fast path may use for `r` (none without an external gateway).
pub fn nat_flows(r: &RouterState) -> Result<Vec<crate::nat::FlowEntry>> {
    match r.gateway {
        Some(_) => crate::nat::list(&r.id),
        None => Ok(Vec::new()),
    }
}

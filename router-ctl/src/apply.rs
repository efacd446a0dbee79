//! `apply` and `destroy`: turning router definitions into namespaces, devices, addresses, a loaded
//! program and filled maps, and back.
//!
//! Apply adopts what exists and creates what is missing, recording what it created so that
//! destroy removes only that. A failure part-way undoes what this run created, in reverse order.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
};

use anyhow::{bail, Context as _, Result};
use router_common::MAX_IFACES;

use crate::{
    config::{self, Hook, IpNet, Router},
    datapath,
    state::{self, AddrState, IfaceState, Lock, RouteState, RouterState},
    sys::{self, ip},
};

/// Something apply did that must be undone if a later step fails.
#[derive(Debug)]
enum Undo {
    DeleteNetns(String),
    DeleteLink {
        ns: Option<String>,
        dev: String,
    },
    DeleteAddr {
        ns: String,
        dev: String,
        cidr: String,
    },
    /// An adopted device apply brought up goes back down.
    SetDown {
        ns: String,
        dev: String,
    },
    RemoveBpfDir(String),
}

impl Undo {
    fn run(self) {
        let r = match &self {
            Undo::DeleteNetns(ns) => ip(&["netns", "del", ns]).map(|_| ()),
            Undo::DeleteLink { ns: Some(ns), dev } => {
                ip(&["-n", ns, "link", "del", dev]).map(|_| ())
            }
            Undo::DeleteLink { ns: None, dev } => ip(&["link", "del", dev]).map(|_| ()),
            Undo::DeleteAddr { ns, dev, cidr } => {
                ip(&["-n", ns, "addr", "del", cidr, "dev", dev]).map(|_| ())
            }
            Undo::SetDown { ns, dev } => ip(&["-n", ns, "link", "set", dev, "down"]).map(|_| ()),
            Undo::RemoveBpfDir(id) => remove_bpf_dir(id),
        };
        match r {
            Ok(()) => tracing::info!(undo = ?self, "rolled back"),
            Err(e) => tracing::warn!(undo = ?self, error = %e, "rollback step failed"),
        }
    }
}

/// What `apply` reports for one router.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub created: Vec<String>,
}

/// Checks what can be checked on the system before anything is changed.
fn precheck(routers: &[Router]) -> Result<()> {
    let applied = RouterState::all()?;
    for r in routers {
        for i in &r.interfaces {
            if let Some(other) = applied
                .iter()
                .find(|s| s.id != r.id && s.interfaces.iter().any(|x| x.device == i.device))
            {
                bail!(
                    "router {}, port {}: device {} already belongs to applied router {} ({}); destroy that router or change the port",
                    r.id, i.port_id, i.device, other.id, other.name
                );
            }
            let ns = r.namespace();
            let in_ns = sys::netns_exists(&ns) && sys::link(Some(&ns), &i.device)?.is_some();
            if !in_ns && sys::link(None, &i.device)?.is_none() {
                let peer = config::peer_of(&i.port_id);
                if sys::link(None, &peer)?.is_some() {
                    bail!(
                        "router {}, port {}: device {} is missing but {peer}, the name apply gives its veth peer, already exists; delete {peer} or create {} yourself",
                        r.id, i.port_id, i.device, i.device
                    );
                }
            }
        }
    }
    Ok(())
}

/// Applies `routers`. The programs are loaded and swapped in only where the attached ones come
/// from another build, a device is new or changes hook, or `reload` asks for it.
pub fn apply(routers: &[Router]) -> Result<Vec<Report>> {
    apply_with(routers, false)
}

pub fn apply_with(routers: &[Router], reload: bool) -> Result<Vec<Report>> {
    sys::ensure_bpffs()?;
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    precheck(routers)?;
    let mut reports = Vec::new();
    for r in routers {
        let mut undo = Vec::new();
        match apply_one(r, &mut undo, reload) {
            Ok(rep) => reports.push(rep),
            Err(e) => {
                for u in undo.into_iter().rev() {
                    u.run();
                }
                return Err(e.context(format!(
                    "applying router {} ({}); its changes were rolled back",
                    r.id, r.name
                )));
            }
        }
    }
    Ok(reports)
}

fn apply_one(r: &Router, undo: &mut Vec<Undo>, reload: bool) -> Result<Report> {
    let mut prev = RouterState::load(&r.id)?;
    let ns = r.namespace();
    // A router whose namespace went away without destroy starts clean: nothing of the old
    // namespace (links, counters, created devices) carries over.
    if let Some(p) = &prev {
        if let Some(why) = p.lost.clone().or_else(|| p.namespace_gone()) {
            tracing::info!(router = %r.id, reason = %why, "starting clean");
            remove_bpf_dir(&r.id)?;
            prev = None;
        }
    }
    let mut created = Vec::new();
    let created_netns = if sys::netns_exists(&ns) {
        prev.as_ref().is_some_and(|p| p.created_netns)
    } else {
        ip(&["netns", "add", &ns])?;
        undo.push(Undo::DeleteNetns(ns.clone()));
        created.push(format!("namespace {ns}"));
        true
    };
    if !sys::link(Some(&ns), "lo")?.is_some_and(|l| l.is_up()) {
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        undo.push(Undo::SetDown {
            ns: ns.clone(),
            dev: "lo".into(),
        });
    }
    if prev.is_none() {
        undo.push(Undo::RemoveBpfDir(r.id.clone()));
    }

    let addrs_before = sys::ip_addrs(&ns)?;
    let mut ifaces: Vec<IfaceState> = Vec::new();
    let mut used_slots: BTreeSet<u32> = BTreeSet::new();
    let mut fresh_slots: Vec<u32> = Vec::new();
    let prev_iface = |port: &str| {
        prev.as_ref()
            .and_then(|p| p.interfaces.iter().find(|i| i.port_id == port).cloned())
    };
    // Counter slots of interfaces that stay keep their numbers, so counters survive re-applies.
    let reserved: BTreeSet<u32> = r
        .interfaces
        .iter()
        .filter_map(|i| prev_iface(&i.port_id))
        .map(|b| b.slot)
        .collect();
    for i in &r.interfaces {
        let before = prev_iface(&i.port_id);
        let mut created_device = before.as_ref().is_some_and(|b| b.created_device);
        let mut peer = before.as_ref().and_then(|b| b.peer.clone());
        if sys::link(Some(&ns), &i.device)?.is_none() {
            if sys::link(None, &i.device)?.is_some() {
                // Plugged by someone else in our namespace: move it where Neutron keeps it.
                ip(&["link", "set", &i.device, "netns", &ns])?;
            } else {
                let p = config::peer_of(&i.port_id);
                ip(&["link", "add", &i.device, "type", "veth", "peer", "name", &p])?;
                undo.push(Undo::DeleteLink {
                    ns: None,
                    dev: p.clone(),
                });
                ip(&["link", "set", &i.device, "netns", &ns])?;
                ip(&["link", "set", &p, "up"])?;
                created.push(format!(
                    "device {} (veth, peer {p} in this namespace)",
                    i.device
                ));
                created_device = true;
                peer = Some(p);
            }
        }
        if !sys::link(Some(&ns), &i.device)?.is_some_and(|l| l.is_up()) {
            ip(&["-n", &ns, "link", "set", &i.device, "up"])?;
            if !created_device {
                undo.push(Undo::SetDown {
                    ns: ns.clone(),
                    dev: i.device.clone(),
                });
            }
        }
        let mut fixed_ips = Vec::new();
        for f in &i.fixed_ips {
            let cidr = format!("{}/{}", f.gateway_ip, f.subnet.prefix_len());
            let has_addr = addrs_before.iter().any(|(d, a, l)| {
                d == &i.device && *a == f.gateway_ip && *l == f.subnet.prefix_len()
            });
            let mut added = before.as_ref().is_some_and(|b| {
                b.fixed_ips
                    .iter()
                    .any(|x| x.added && x.gateway_ip == f.gateway_ip.to_string())
            });
            if !has_addr {
                // IPv6: no duplicate address detection, as for any router address Neutron
                // plugs (the address would stay tentative, unusable, for a second or more).
                let mut args = vec!["-n", &ns, "addr", "add", &cidr, "dev", &i.device];
                if f.gateway_ip.is_ipv6() {
                    args.push("nodad");
                }
                ip(&args)?;
                if !created_device {
                    undo.push(Undo::DeleteAddr {
                        ns: ns.clone(),
                        dev: i.device.clone(),
                        cidr: cidr.clone(),
                    });
                }
                created.push(format!("address {cidr} on {}", i.device));
                added = true;
            }
            fixed_ips.push(AddrState {
                subnet: f.subnet.to_string(),
                gateway_ip: f.gateway_ip.to_string(),
                added,
            });
        }
        // Addresses apply added earlier that the definition no longer has.
        for old in before.iter().flat_map(|b| b.fixed_ips.iter()) {
            if old.added && !fixed_ips.iter().any(|n| n.gateway_ip == old.gateway_ip) {
                let _ = ip(&["-n", &ns, "addr", "del", &old.cidr(), "dev", &i.device]);
            }
        }
        let info = sys::link(Some(&ns), &i.device)?
            .with_context(|| format!("device {} vanished from {ns}", i.device))?;
        let slot = match before.as_ref().map(|b| b.slot) {
            Some(s) => s,
            None => {
                let s = (0..MAX_IFACES)
                    .find(|s| !used_slots.contains(s) && !reserved.contains(s))
                    .context("no free counter slot")?;
                fresh_slots.push(s);
                s
            }
        };
        used_slots.insert(slot);
        let mut st = IfaceState::new(i.port_id.clone(), i.device.clone(), fixed_ips);
        st.ifindex = info.ifindex;
        st.mac = info.address.clone();
        st.mtu = info.mtu;
        st.slot = slot;
        st.created_device = created_device;
        st.peer = peer;
        st.hook = i.hook;
        st.kind = info.kind();
        ifaces.push(st);
    }
    // Each device's hook, from what the device is and what its driver can do.
    let features = sys::xdp_features(&ns)?;
    for st in ifaces.iter_mut() {
        let f = features.get(&st.ifindex).copied().unwrap_or_default();
        let (hook, why) = choose_hook(st.hook, &st.device, st.kind.as_deref(), f)
            .with_context(|| format!("router {}, port {}", r.id, st.port_id))?;
        if hook == Hook::Xdp && st.kind.is_some() {
            tracing::warn!(router = %r.id, device = %st.device, kind = ?st.kind, "XDP forced on a device fed by skbs: GSO is lost there (TCP is slower than through tc), and TCP/UDP segments whose checksum does not verify (partial checksums) go to the kernel");
        }
        st.active_hook = Some(hook);
        st.hook_reason = why;
    }

    let ip_forward_before = match prev.as_ref().and_then(|p| p.ip_forward_before.clone()) {
        Some(v) => Some(v),
        None => {
            let v = sys::sysctl_get(&ns, "net.ipv4.ip_forward")?;
            (v != "1").then_some(v)
        }
    };
    sys::sysctl_set(&ns, "net.ipv4.ip_forward", "1")?;
    let ipv6_forwarding_before = match prev.as_ref().and_then(|p| p.ipv6_forwarding_before.clone())
    {
        Some(v) => Some(v),
        None => {
            let v = sys::sysctl_get(&ns, "net.ipv6.conf.all.forwarding")?;
            (v != "1").then_some(v)
        }
    };
    sys::sysctl_set(&ns, "net.ipv6.conf.all.forwarding", "1")?;

    // Extra routes go into the namespace's kernel table too: the kernel forwards the first
    // packets (and resolves the nexthop) while the fast path has no neighbour yet.
    let mut routes = Vec::new();
    // Several nexthops for one destination make one multipath (ECMP) kernel route.
    let mut by_dest: std::collections::BTreeMap<IpNet, Vec<(IpAddr, String)>> = Default::default();
    for rt in &r.routes {
        let via = r
            .interface_for(rt.nexthop)
            .expect("validated: nexthop on a connected subnet");
        by_dest
            .entry(rt.destination)
            .or_default()
            .push((rt.nexthop, via.device.clone()));
        routes.push(RouteState {
            destination: rt.destination.to_string(),
            nexthop: rt.nexthop.to_string(),
            device: via.device.clone(),
        });
    }
    for (dest, hops) in &by_dest {
        let dest = dest.to_string();
        let mut args: Vec<String> = ["-n", &ns, "route", "replace", &dest]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let [(nh, dev)] = &hops[..] {
            args.extend(["via".into(), nh.to_string(), "dev".into(), dev.clone()]);
        } else {
            for (nh, dev) in hops {
                args.extend([
                    "nexthop".into(),
                    "via".into(),
                    nh.to_string(),
                    "dev".into(),
                    dev.clone(),
                ]);
            }
        }
        ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    if let Some(p) = &prev {
        for old in &p.routes {
            if !routes.iter().any(|n| n.destination == old.destination) {
                let _ = ip(&["-n", &ns, "route", "del", &old.destination]);
            }
        }
        for old in &p.interfaces {
            if !ifaces.iter().any(|n| n.port_id == old.port_id) {
                remove_iface(&r.id, &ns, old);
            }
        }
    }

    let st = RouterState {
        id: r.id.clone(),
        name: r.name.clone(),
        namespace: ns.clone(),
        created_netns,
        ip_forward_before,
        ipv6_forwarding_before,
        interfaces: ifaces,
        routes,
        max_routes: r.max_routes,
        program: Some(datapath::program_fingerprint()),
        netns_inode: sys::netns_inode(&ns),
        lost: None,
    };
    // The programs stay when they are this build's and every device keeps its hook.
    let keep_programs = !reload
        && prev.as_ref().is_some_and(|p| {
            p.program == st.program
                && st.interfaces.iter().all(|i| {
                    p.interfaces.iter().any(|o| {
                        o.device == i.device
                            && o.ifindex == i.ifindex
                            && o.active_hook == i.active_hook
                    }) && match i.active_hook {
                        Some(Hook::Xdp) => state::link_pin(&r.id, &i.device).exists(),
                        _ => state::tc_link_pin(&r.id, &i.device).exists(),
                    }
                })
        });

    // The fast path's tables.
    let Tables {
        ifaces: iface_entries,
        routes: route_entries,
        down,
        no_xmit,
        own,
    } = tables_of(&st)?;
    let mut cap = crate::fib::Capacity::for_table(&route_entries);
    if let Some(n) = r.max_routes {
        cap = cap.max(crate::fib::Capacity::for_max_routes(n));
    }
    let id = r.id.clone();
    let attach: Vec<(u32, String, Option<Hook>)> = st
        .interfaces
        .iter()
        .map(|i| (i.ifindex, i.device.clone(), i.active_hook))
        .collect();
    sys::in_netns(&ns, move || {
        let mut ebpf = if keep_programs {
            datapath::open_pinned_object_sized(&id, cap)?
        } else {
            datapath::load_pinned(&id, cap)?
        };
        datapath::set_ifaces(&mut ebpf, &iface_entries, &down, &no_xmit)?;
        datapath::set_routes(&mut ebpf, &route_entries)?;
        datapath::set_local_addrs(&mut ebpf, &own)?;
        for slot in &fresh_slots {
            datapath::reset_stats(&mut ebpf, *slot)?;
        }
        if keep_programs {
            return Ok(());
        }
        // The new hook is attached before the other is detached: a device switching hooks
        // never goes without the fast path (a frame XDP passes meets the tc program).
        for (ifindex, dev, hook) in &attach {
            let (xdp_pin, tc_pin) = (state::link_pin(&id, dev), state::tc_link_pin(&id, dev));
            if *hook == Some(Hook::Xdp) {
                datapath::attach_xdp(&mut ebpf, *ifindex, dev, &xdp_pin)?;
                datapath::detach(&tc_pin)?;
            } else {
                datapath::attach_tc(&mut ebpf, dev, &tc_pin)?;
                datapath::detach(&xdp_pin)?;
            }
        }
        Ok(())
    })?;

    st.save()?;
    tracing::info!(router = %r.id, name = %r.name, namespace = %ns, "applied");
    Ok(Report {
        id: r.id.clone(),
        name: r.name.clone(),
        namespace: ns,
        created,
    })
}

/// Which hook the fast path uses on `device` (of kind `kind`, None for a NIC, with XDP
/// features `f`) when the definition asks for `want`, and why.
///
/// The rule for `auto`, measured on this project's topology (see the README): traffic on a
/// virtual device (veth, tap, macvlan, an Open vSwitch internal port) comes from a local
/// stack as skbs, with GSO packets and partial checksums: XDP would have to turn each into a
/// frame (and a veth with an XDP program stops taking GSO from its peer), tc keeps it whole.
/// Frames from a NIC's driver are frames: XDP meets them first, before any skb is built.
pub fn choose_hook(
    want: Hook,
    device: &str,
    kind: Option<&str>,
    f: crate::netdev::XdpFeatures,
) -> Result<(Hook, String)> {
    let native = f.native();
    Ok(match (want, kind) {
        (Hook::Tc, _) => (Hook::Tc, "tc: set in the definition".into()),
        (Hook::Xdp, _) if !native => bail!(
            "device {device}{} has no native XDP: set hook = \"tc\" or \"auto\" for it",
            kind.map(|k| format!(" ({k})")).unwrap_or_default()
        ),
        (Hook::Xdp, None) => (Hook::Xdp, "xdp: set in the definition".into()),
        (Hook::Xdp, Some(k)) => (
            Hook::Xdp,
            format!("xdp: set in the definition; {k} traffic arrives as skbs: GSO lost, TCP/UDP checksums verified"),
        ),
        (Hook::Auto, Some(_)) if cfg!(mutant = "auto_picks_xdp_on_veth") && native => {
            (Hook::Xdp, "xdp: the fault".into())
        }
        (Hook::Auto, Some(k)) => (
            Hook::Tc,
            format!("tc: {k} traffic arrives as skbs (GSO and checksum offload kept)"),
        ),
        (Hook::Auto, None) if !native => (Hook::Tc, "tc: the driver has no native XDP".into()),
        (Hook::Auto, None) => (Hook::Xdp, "xdp: native XDP in the driver".into()),
    })
}

/// What the fast path's maps must hold for a router (see `tables_of`).
pub struct Tables {
    pub ifaces: Vec<(u32, router_common::Iface)>,
    pub routes: Vec<(IpNet, router_common::Route)>,
    /// Devices that are down: no redirect to them, the kernel decides.
    pub down: Vec<u32>,
    /// Devices that are up but cannot take XDP-redirected frames now (no NDO_XMIT).
    pub no_xmit: Vec<u32>,
    /// The router's own IPv4 addresses.
    pub own: Vec<std::net::Ipv4Addr>,
}

/// What the fast path's maps must hold for a router as the kernel has it now: its devices,
/// its routes (connected subnets, extra routes, every address of the namespace and the subnet
/// broadcasts as local), and the devices that are down (no redirect to them: the kernel decides).
pub fn tables_of(st: &RouterState) -> Result<Tables> {
    let ns = &st.namespace;
    let ifindex_of = |dev: &str| {
        st.interfaces
            .iter()
            .find(|i| i.device == dev)
            .map(|i| i.ifindex)
            .unwrap_or(0)
    };
    let net = |s: &str| {
        s.parse::<IpNet>()
            .map_err(|e| anyhow::anyhow!("router {}: {e}", st.id))
    };
    let mut connected = Vec::new();
    // Every address of the namespace but IPv6 link-local ones (the fast path never routes those).
    let mut locals: Vec<IpAddr> = sys::ip_addrs(ns)?
        .into_iter()
        .map(|(_, a, _)| a)
        .filter(|a| !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80))
        .collect();
    let own: Vec<std::net::Ipv4Addr> = locals
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut down = Vec::new();
    let features = sys::xdp_features(ns)?;
    let no_xmit: Vec<u32> = st
        .interfaces
        .iter()
        .filter(|i| !features.get(&i.ifindex).is_some_and(|f| f.ndo_xmit()))
        .filter(|_| !cfg!(mutant = "ndo_xmit_ignored"))
        .map(|i| i.ifindex)
        .collect();
    for i in &st.interfaces {
        for f in &i.fixed_ips {
            let subnet = net(&f.subnet)?;
            connected.push((subnet, i.ifindex));
            match subnet {
                IpNet::V4(n) => locals.extend(n.broadcast().map(IpAddr::V4)),
                // The subnet-router anycast address: a forwarding kernel answers it.
                IpNet::V6(n) if n.len < 127 => locals.push(IpAddr::V6(Ipv6Addr::from(n.network()))),
                IpNet::V6(_) => {}
            }
        }
        let up = sys::link(Some(ns), &i.device)?
            .is_some_and(|l| l.is_up() && l.flags.iter().any(|f| f == "LOWER_UP"));
        if !up && !cfg!(mutant = "down_keeps_tx_slot") {
            down.push(i.ifindex);
        }
    }
    let mut gateways = Vec::new();
    for rt in &st.routes {
        let nh: IpAddr = rt
            .nexthop
            .parse()
            .with_context(|| format!("router {}: nexthop {}", st.id, rt.nexthop))?;
        gateways.push((net(&rt.destination)?, ifindex_of(&rt.device), nh));
    }
    locals.sort();
    locals.dedup();
    let iface_entries = st
        .interfaces
        .iter()
        .map(IfaceState::entry)
        .collect::<Result<Vec<_>>>()?;
    let routes = datapath::route_entries(&iface_entries, &connected, &gateways, &locals);
    Ok(Tables {
        ifaces: iface_entries,
        routes,
        down,
        no_xmit,
        own,
    })
}

/// When the namespace of an applied router went away without destroy (an operator's `ip netns
/// del`, an agent's clean-up): removes its pinned programs and maps, which nothing can use any
/// more, and records why, so that `show` reports it and the next apply starts clean. Returns
/// the reason when it did so.
pub fn forget_lost(router_id: &str) -> Result<Option<String>> {
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    let Some(mut st) = RouterState::load(router_id)? else {
        return Ok(None);
    };
    if st.lost.is_some() {
        return Ok(None);
    }
    let Some(why) = st.namespace_gone() else {
        return Ok(None);
    };
    remove_bpf_dir(&st.id)?;
    st.lost = Some(format!("{why}; apply the router again to recreate it"));
    st.save()?;
    Ok(Some(why))
}

/// Brings a router's fast path in line with its namespace after a device went up or down,
/// changed MTU or MAC, or an address changed (the daemon calls it on rtnetlink events).
pub fn resync(router_id: &str) -> Result<()> {
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    let Some(mut st) = RouterState::load(router_id)? else {
        return Ok(());
    };
    if st.lost.is_some() || st.namespace_gone().is_some() {
        return Ok(());
    }
    let mut changed = false;
    for i in st.interfaces.iter_mut() {
        if let Some(info) = sys::link(Some(&st.namespace), &i.device)? {
            if info.ifindex == i.ifindex && (info.address != i.mac || info.mtu != i.mtu) {
                tracing::info!(router = %st.id, device = %i.device, mac = %info.address, mtu = info.mtu, "device changed");
                i.mac = info.address.clone();
                i.mtu = info.mtu;
                changed = true;
            }
        }
    }
    let t = tables_of(&st)?;
    let id = st.id.clone();
    sys::in_netns(&st.namespace, move || {
        let mut ebpf = datapath::open_maps(&id)?;
        datapath::set_ifaces(&mut ebpf, &t.ifaces, &t.down, &t.no_xmit)?;
        datapath::set_routes(&mut ebpf, &t.routes)?;
        datapath::set_local_addrs(&mut ebpf, &t.own)
    })?;
    if changed {
        st.save()?;
    }
    Ok(())
}

/// Detaches the program from one device and removes what apply created for it.
fn remove_iface(router_id: &str, ns: &str, i: &IfaceState) {
    let _ = std::fs::remove_file(state::link_pin(router_id, &i.device));
    let _ = std::fs::remove_file(state::tc_link_pin(router_id, &i.device));
    if i.created_device {
        let _ = ip(&["-n", ns, "link", "del", &i.device]);
    } else {
        for a in i.fixed_ips.iter().filter(|a| a.added) {
            let _ = ip(&["-n", ns, "addr", "del", &a.cidr(), "dev", &i.device]);
        }
    }
}

fn remove_bpf_dir(router_id: &str) -> Result<()> {
    let dir = state::bpf_dir(router_id);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Detaches the programs, removes the pins, and removes only what apply created.
pub fn destroy(key: &str) -> Result<RouterState> {
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    let st = RouterState::find(key)?;
    let ns = &st.namespace;
    let ns_exists = sys::netns_exists(ns);
    for i in &st.interfaces {
        if ns_exists {
            remove_iface(&st.id, ns, i);
        } else {
            let _ = std::fs::remove_file(state::link_pin(&st.id, &i.device));
            let _ = std::fs::remove_file(state::tc_link_pin(&st.id, &i.device));
        }
    }
    if ns_exists && !st.created_netns {
        for rt in &st.routes {
            let _ = ip(&["-n", ns, "route", "del", &rt.destination]);
        }
        if let Some(v) = &st.ip_forward_before {
            let _ = sys::sysctl_set(ns, "net.ipv4.ip_forward", v);
        }
        if let Some(v) = &st.ipv6_forwarding_before {
            let _ = sys::sysctl_set(ns, "net.ipv6.conf.all.forwarding", v);
        }
    }
    remove_bpf_dir(&st.id)?;
    if ns_exists && st.created_netns {
        ip(&["netns", "del", ns]).with_context(|| format!("cannot delete namespace {ns}"))?;
    }
    RouterState::remove(&st.id)?;
    tracing::info!(router = %st.id, name = %st.name, "destroyed");
    Ok(st)
}

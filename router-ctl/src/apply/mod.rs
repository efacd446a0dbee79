//! `apply` and `destroy`: turning router definitions into namespaces, devices, addresses, a loaded
//! program and filled maps, and back.
//!
//! Apply adopts what exists and creates what is missing, recording what it created so that
//! destroy removes only that. Before each step, how to undo it is recorded in a journal that
//! outlives the process (`undo`); a failure part-way undoes what this run changed, in reverse
//! order, and an apply killed part-way is undone by the next apply or destroy of the router.
//! The kernel is driven through netlink and
//! `/proc/sys` (`crate::kernel`), never through subprocesses: a router's namespace work runs on
//! one thread inside the namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
};

use anyhow::{bail, Context as _, Result};
use router_common::MAX_IFACES;

pub mod follow;
mod undo;

use undo::{Undo, UndoLog};

use crate::{
    config::{self, Hook, IpNet, Router},
    datapath,
    kernel::{
        conntrack::Conntrack,
        netdev::{Netdev, XdpFeatures},
        netns, nft,
        rtnl::{Addr, Link, Rtnl},
        sysctl,
    },
    state::{
        self, AddrState, FloatingIpState, GatewayState, IfaceState, Lock, RouteState, RouterState,
    },
};

/// How an apply treats the routers it is given.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Load and swap the programs in even where the attached ones are this build's.
    pub reload: bool,
    /// HA routers this host holds as a standby (the etcd agent's decision): apply readies the
    /// namespace, devices and fast path but gives the router none of its addresses (and no
    /// kernel routes through them), so only the active host answers for them.
    pub standby: BTreeSet<String>,
}

/// Moves device `dev` from namespace `ns` back into the caller's (where apply found it); a
/// device no longer in `ns` is left alone.
fn move_back(ns: &str, dev: &str, addrs: &[(IpAddr, u8)]) -> Result<()> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")
        .context("cannot open this thread's network namespace")?;
    let name = dev.to_string();
    let moved = netns::run_in(ns, move || {
        let rt = Rtnl::new()?;
        match rt.link(&name)? {
            Some(l) => rt.set_netns(l.index, &name, home.as_fd()).map(|_| true),
            None => Ok(false),
        }
    })?;
    if moved && !addrs.is_empty() && !cfg!(mutant = "home_addresses_lost") {
        // Its addresses, as it had them here.
        let rt = Rtnl::new()?;
        if let Some(l) = rt.link(dev)? {
            let have: Vec<(IpAddr, u8)> = rt
                .addrs()?
                .into_iter()
                .filter(|a| a.index == l.index)
                .map(|a| (a.ip, a.prefix_len))
                .collect();
            for (ip, len) in addrs {
                if !have.contains(&(*ip, *len)) {
                    rt.addr_add(l.index, dev, *ip, *len)?;
                }
            }
        }
    }
    Ok(())
}

fn delete_link(rt: &Rtnl, dev: &str) -> Result<()> {
    match rt.link(dev)? {
        Some(l) => rt.link_del(l.index, dev),
        None => Ok(()),
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
    let here = Rtnl::new()?.links()?;
    let here = |name: &str| here.iter().any(|l| l.name == name);
    for r in routers {
        let ns = r.namespace();
        let in_ns: Vec<Link> = if netns::exists(&ns) {
            netns::run_in(&ns, || Rtnl::new()?.links())?
        } else {
            Vec::new()
        };
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
            if !in_ns.iter().any(|l| l.name == i.device) && !here(&i.device) {
                let peer = config::peer_of(&i.port_id);
                if here(&peer) {
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

/// At most this many routers are applied at once.
const APPLY_WORKERS: usize = 16;

/// Applies `routers`. The programs are loaded and swapped in only where the attached ones come
/// from another build, a device is new or changes hook, or `reload` asks for it.
pub fn apply(routers: &[Router]) -> Result<Vec<Report>> {
    apply_with(routers, &Options::default())
}

pub fn apply_with(routers: &[Router], opts: &Options) -> Result<Vec<Report>> {
    crate::kernel::ensure_bpffs()?;
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    precheck(routers)?;
    // Routers are independent (their own namespace, devices, pins and state file), and most of
    // an apply is spent waiting in the kernel (device changes and tcx attaches wait for RCU
    // grace periods): routers are applied by a pool of workers, so that the waits overlap
    // where the kernel lets them. Each router is applied whole or rolled back whole.
    let results = in_parallel(routers, |r| {
        // An earlier apply of this router that was killed part-way is rolled back first.
        undo::recover(&r.id)
            .and_then(|_| UndoLog::begin(&r.id))
            .with_context(|| format!("applying router {} ({})", r.id, r.name))
            .and_then(|mut log| match apply_one(r, &mut log, opts) {
                Ok(rep) => {
                    log.finish();
                    Ok(rep)
                }
                Err(e) => {
                    log.roll_back();
                    Err(e.context(format!(
                        "applying router {} ({}); its changes were rolled back",
                        r.id, r.name
                    )))
                }
            })
    });
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for res in results {
        match res {
            Ok(rep) => reports.push(rep),
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        return Ok(reports);
    }
    let first = failed.remove(0);
    let mut msg = String::new();
    for e in &failed {
        msg.push_str(&format!("\nalso failed: {e:#}"));
    }
    if !reports.is_empty() {
        msg.push_str(&format!(
            "\n{} other router(s) were applied: {}",
            reports.len(),
            reports
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Err(if msg.is_empty() {
        first
    } else {
        anyhow::anyhow!("{first:#}{msg}")
    })
}

/// The router's previous state, unless its namespace went away since: then it starts clean.
fn previous(r: &Router) -> Result<Option<RouterState>> {
    let ns = r.namespace();
    // A followed router's id is its namespace's name.
    if let Some(f) = RouterState::load(&ns)?.filter(|s| s.followed && s.namespace == ns) {
        bail!(
            "router {}: namespace {ns} is followed (`run --follow`, router {}): a defined and a followed router never share a namespace; stop following it first",
            r.id,
            f.id
        );
    }
    let prev = RouterState::load(&r.id)?;
    if prev.as_ref().is_some_and(|p| p.followed) {
        bail!("router {}: a followed router has this id", r.id);
    }
    if let Some(p) = &prev {
        if let Some(why) = p.lost.clone().or_else(|| p.namespace_gone()) {
            tracing::info!(router = %r.id, reason = %why, "starting clean");
            remove_bpf_dir(&r.id)?;
            return Ok(None);
        }
    }
    Ok(prev)
}

/// Where each port's device came from: (apply created it, its veth peer).
/// Per port: (apply created its veth pair, the peer's name, apply moved the device in from the
/// caller's namespace).
type Plugged = BTreeMap<String, Origin>;

/// Where one port's device came from.
#[derive(Clone, Default)]
struct Origin {
    /// apply created it as a veth pair, `peer` the other end.
    created: bool,
    peer: Option<String>,
    /// apply moved it in from the caller's namespace, where it had `home_addrs`.
    moved_in: bool,
    home_addrs: Vec<(IpAddr, u8)>,
}

fn apply_one(r: &Router, undo: &mut UndoLog, opts: &Options) -> Result<Report> {
    let prev = previous(r)?;
    let ns = r.namespace();
    let mut created = Vec::new();
    // The namespace: adopted, or created.
    let created_netns = if netns::exists(&ns) {
        if cfg!(mutant = "rollback_deletes_previous_namespace") {
            // The fault: a failed re-apply deletes the namespace an earlier apply made.
            undo.push(Undo::DeleteNetns(ns.clone()))?;
        }
        prev.as_ref().is_some_and(|p| p.created_netns)
    } else {
        undo.around(Undo::DeleteNetns(ns.clone()), || netns::create(&ns))?;
        created.push(format!("namespace {ns}"));
        true
    };
    if prev.is_none() {
        undo.push(Undo::RemoveBpfDir(r.id.clone()))?;
    }
    let plugged = bring_devices(r, &prev, &ns, undo, &mut created)?;
    // Everything else happens inside the namespace, on one thread.
    let job = Job {
        router: r.clone(),
        prev,
        plugged,
        created_netns,
        reload: opts.reload,
        standby: opts.standby.contains(&r.id) && !cfg!(mutant = "standby_keeps_addresses"),
    };
    let part = undo.part();
    let (done, result) = netns::run_in(&ns, move || Ok(job.run(part)))?;
    undo.absorb(done);
    let (mut st, more) = result?;
    created.extend(more);
    st.apply_token = Some(undo.token().to_string());
    st.save()?;
    tracing::info!(router = %r.id, name = %r.name, namespace = %ns, "applied");
    Ok(Report {
        id: r.id.clone(),
        name: r.name.clone(),
        namespace: ns,
        created,
    })
}

/// Puts each port's device into the router's namespace: a device the L2 agent plugged in the
/// caller's namespace is moved there (where Neutron keeps it); a missing one is created as a
/// veth pair whose other end (`tap<port[:11]>`) stays in the caller's namespace, at kernel
/// defaults.
fn bring_devices(
    r: &Router,
    prev: &Option<RouterState>,
    ns: &str,
    undo: &mut UndoLog,
    created: &mut Vec<String>,
) -> Result<Plugged> {
    let in_ns: Vec<Link> = netns::run_in(ns, || Rtnl::new()?.links())?;
    let rt = Rtnl::new()?;
    let target = netns::open(ns)?;
    let mut plugged = Plugged::new();
    for i in &r.interfaces {
        let before = prev
            .as_ref()
            .and_then(|p| p.interfaces.iter().find(|x| x.port_id == i.port_id));
        let mut origin = Origin {
            created: before.is_some_and(|b| b.created_device),
            peer: before.and_then(|b| b.peer.clone()),
            moved_in: before.is_some_and(|b| b.moved_in),
            home_addrs: before.map(|b| b.home_addrs.clone()).unwrap_or_default(),
        };
        if !in_ns.iter().any(|l| l.name == i.device) {
            if let Some(l) = rt.link(&i.device)? {
                // The kernel drops a device's addresses when it changes namespace: they are
                // kept, to be given back with it.
                let home: Vec<(IpAddr, u8)> = rt
                    .addrs()?
                    .into_iter()
                    .filter(|a| a.index == l.index)
                    .filter(
                        |a| !matches!(a.ip, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80),
                    )
                    .map(|a| (a.ip, a.prefix_len))
                    .collect();
                let back = Undo::MoveBack {
                    ns: ns.to_string(),
                    dev: i.device.clone(),
                    addrs: home.clone(),
                };
                if cfg!(mutant = "adopted_devices_stay") {
                    rt.set_netns(l.index, &i.device, target.as_fd())?;
                } else {
                    undo.around(back, || rt.set_netns(l.index, &i.device, target.as_fd()))?;
                }
                origin.moved_in = true;
                origin.home_addrs = home;
            } else {
                let p = config::peer_of(&i.port_id);
                let gone = Undo::DeleteLink {
                    ns: None,
                    dev: p.clone(),
                };
                undo.around(gone, || rt.veth_add_in(&i.device, &p, target.as_fd()))?;
                rt.set_up_by_name(&p)?;
                created.push(format!(
                    "device {} (veth, peer {p} in this namespace)",
                    i.device
                ));
                origin = Origin {
                    created: true,
                    peer: Some(p),
                    ..Origin::default()
                };
            }
        }
        plugged.insert(i.port_id.clone(), origin);
    }
    Ok(plugged)
}

/// A router's apply inside its namespace.
struct Job {
    router: Router,
    prev: Option<RouterState>,
    plugged: Plugged,
    created_netns: bool,
    reload: bool,
    /// An HA router held here as a standby (`Options::standby`).
    standby: bool,
}

impl Job {
    /// Runs the steps; returns what to undo (whatever happened) and the router's new state and
    /// report lines.
    fn run(self, mut undo: UndoLog) -> (UndoLog, Result<(RouterState, Vec<String>)>) {
        let mut created = Vec::new();
        let r = self.steps(&mut undo, &mut created);
        (undo, r.map(|st| (st, created)))
    }

    fn steps(&self, undo: &mut UndoLog, created: &mut Vec<String>) -> Result<RouterState> {
        let r = &self.router;
        let ns = r.namespace();
        let rt = Rtnl::new()?;
        up(&rt, &ns, "lo", true, undo)?;
        let (mut ifaces, fresh_slots) = self.interfaces(&rt, undo, created)?;
        let ip_forward_before =
            self.forwarding("net.ipv4.ip_forward", |p| p.ip_forward_before.clone())?;
        let ipv6_forwarding_before = self.forwarding("net.ipv6.conf.all.forwarding", |p| {
            p.ipv6_forwarding_before.clone()
        })?;
        let routes = self.routes(&rt, &ifaces)?;
        let gateway = self.gateway(&rt, &ifaces, undo, created)?;
        if let Some(p) = &self.prev {
            for old in &p.interfaces {
                if !ifaces.iter().any(|n| n.port_id == old.port_id) {
                    remove_iface(&rt, &r.id, old);
                }
            }
        }
        // Each device's hook, from what the device is and what its driver can do.
        let features = Netdev::open()?.dump()?;
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
        let st = RouterState {
            created_netns: self.created_netns,
            ip_forward_before,
            ipv6_forwarding_before,
            interfaces: ifaces,
            routes,
            max_routes: r.max_routes,
            program: Some(datapath::program_fingerprint()),
            netns_inode: netns::current_inode(),
            gateway,
            ha: r.ha,
            definition: Some(r.definition()),
            ..RouterState::empty(&r.id, &r.name, &ns)
        };
        self.datapath(&st, &rt.links()?, &rt.addrs()?, &features, &fresh_slots)?;
        Ok(st)
    }

    /// Each port's device: up, its addresses, a counter slot. Returns the devices' state and
    /// the slots handed out afresh.
    fn interfaces(
        &self,
        rt: &Rtnl,
        undo: &mut UndoLog,
        created: &mut Vec<String>,
    ) -> Result<(Vec<IfaceState>, Vec<u32>)> {
        let r = &self.router;
        let ns = r.namespace();
        let addrs_before = rt.addrs()?;
        let prev_iface = |port: &str| {
            self.prev
                .as_ref()
                .and_then(|p| p.interfaces.iter().find(|i| i.port_id == port).cloned())
        };
        // Counter slots of interfaces that stay keep their numbers, so counters survive.
        let reserved: BTreeSet<u32> = r
            .interfaces
            .iter()
            .filter_map(|i| prev_iface(&i.port_id))
            .map(|b| b.slot)
            .collect();
        let mut used_slots = BTreeSet::new();
        let (mut ifaces, mut fresh_slots) = (Vec::new(), Vec::new());
        let standby = self.standby;
        for i in &r.interfaces {
            let before = prev_iface(&i.port_id);
            let Origin {
                created: created_device,
                peer,
                moved_in,
                home_addrs,
            } = self.plugged[&i.port_id].clone();
            up(rt, &ns, &i.device, !created_device, undo)?;
            let link = rt
                .link(&i.device)?
                .with_context(|| format!("device {} vanished from {ns}", i.device))?;
            let mut fixed_ips = Vec::new();
            for f in &i.fixed_ips {
                let len = f.subnet.prefix_len();
                let has = addrs_before
                    .iter()
                    .any(|a| a.index == link.index && a.ip == f.gateway_ip && a.prefix_len == len);
                let mut added = before.as_ref().is_some_and(|b| {
                    b.fixed_ips
                        .iter()
                        .any(|x| x.added && x.gateway_ip == f.gateway_ip)
                });
                if standby {
                    // A standby holds none of the router's addresses.
                    if has {
                        rt.addr_del(link.index, &i.device, f.gateway_ip, len)?;
                    }
                    added = true;
                } else if !has {
                    let add = || rt.addr_add(link.index, &i.device, f.gateway_ip, len);
                    if created_device {
                        add()?;
                    } else {
                        let gone = Undo::DeleteAddr {
                            ns: ns.clone(),
                            dev: i.device.clone(),
                            ip: f.gateway_ip,
                            prefix_len: len,
                        };
                        undo.around(gone, add)?;
                    }
                    created.push(format!("address {}/{len} on {}", f.gateway_ip, i.device));
                    added = true;
                }
                fixed_ips.push(AddrState {
                    subnet: f.subnet,
                    gateway_ip: f.gateway_ip,
                    added,
                });
            }
            // Addresses apply added earlier that the definition no longer has.
            for old in before.iter().flat_map(|b| b.fixed_ips.iter()) {
                if old.added && !fixed_ips.iter().any(|n| n.gateway_ip == old.gateway_ip) {
                    let (ip, len) = old.addr();
                    let _ = rt.addr_del(link.index, &i.device, ip, len);
                }
            }
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
            st.ifindex = link.index;
            st.mac = Some(link.mac()?.into());
            st.mtu = link.mtu;
            st.slot = slot;
            st.created_device = created_device;
            st.peer = peer;
            st.moved_in = moved_in;
            st.home_addrs = home_addrs;
            st.hook = i.hook;
            st.kind = link.kind.clone();
            st.external = i.external;
            ifaces.push(st);
        }
        Ok((ifaces, fresh_slots))
    }

    /// Turns forwarding on for one family; returns the value to restore on destroy (of an
    /// adopted namespace), when apply changed it.
    fn forwarding(
        &self,
        key: &str,
        recorded: impl Fn(&RouterState) -> Option<String>,
    ) -> Result<Option<String>> {
        let before = match self.prev.as_ref().and_then(recorded) {
            Some(v) => Some(v),
            None => {
                let v = sysctl::get(key)?;
                (v != "1").then_some(v)
            }
        };
        sysctl::set(key, "1")?;
        Ok(before)
    }

    /// Extra routes go into the namespace's kernel table too: the kernel forwards the first
    /// packets (and resolves the nexthop) while the fast path has no neighbour yet. Several
    /// nexthops for one destination make one multipath (ECMP) kernel route.
    fn routes(&self, rt: &Rtnl, ifaces: &[IfaceState]) -> Result<Vec<RouteState>> {
        let r = &self.router;
        let mut routes = Vec::new();
        let mut by_dest: BTreeMap<IpNet, Vec<(IpAddr, u32)>> = BTreeMap::new();
        for x in &r.routes {
            let via = r
                .interface_for(x.nexthop)
                .expect("validated: nexthop on a connected subnet");
            let ifindex = ifaces
                .iter()
                .find(|i| i.device == via.device)
                .map(|i| i.ifindex)
                .expect("the device of every interface");
            by_dest
                .entry(x.destination)
                .or_default()
                .push((x.nexthop, ifindex));
            routes.push(RouteState {
                destination: x.destination,
                nexthop: x.nexthop,
                device: via.device.clone(),
                gateway: false,
            });
        }
        // The external gateway's default route per family, through an on-link host route
        // first when the upstream router is outside its subnet.
        if let (Some(g), Some(qg)) = (&r.gateway, ifaces.iter().find(|i| i.external)) {
            for u in &g.upstreams {
                if u.onlink() && !self.standby {
                    rt.route_onlink(IpNet::host(u.gateway_ip), qg.ifindex)?;
                }
                let default: IpNet = if u.gateway_ip.is_ipv6() {
                    "::/0".parse().expect("a prefix")
                } else {
                    "0.0.0.0/0".parse().expect("a prefix")
                };
                by_dest
                    .entry(default)
                    .or_default()
                    .push((u.gateway_ip, qg.ifindex));
                routes.push(RouteState {
                    destination: default,
                    nexthop: u.gateway_ip,
                    device: qg.device.clone(),
                    gateway: true,
                });
            }
        }
        // A standby has no addresses, so no nexthop is reachable in its kernel: its routes
        // come with the addresses when it becomes active (apply runs again then).
        for (dest, hops) in by_dest.iter().filter(|_| !self.standby) {
            rt.route_replace(*dest, hops)?;
        }
        let now: std::collections::HashSet<IpNet> = routes.iter().map(|n| n.destination).collect();
        for old in self.prev.iter().flat_map(|p| p.routes.iter()) {
            if !now.contains(&old.destination) {
                let _ = rt.route_del(old.destination);
            }
        }
        Ok(routes)
    }

    /// The external gateway's namespace state: floating IPs as /32s on `qg-`, the NAT table,
    /// the agent's sysctls; what a previous apply set up and the definition no longer has is
    /// removed (a floating IP removed or moved loses its conntrack entries).
    fn gateway(
        &self,
        rt: &Rtnl,
        ifaces: &[IfaceState],
        undo: &mut UndoLog,
        created: &mut Vec<String>,
    ) -> Result<Option<GatewayState>> {
        let r = &self.router;
        let ns = r.namespace();
        let prev = self.prev.as_ref().and_then(|p| p.gateway.clone());
        let prev_nat = self.prev.as_ref().and_then(nat_of);
        let Some(g) = &r.gateway else {
            if let Some(p) = prev {
                undo.push(Undo::RestoreNat { ns, to: prev_nat })?;
                remove_gateway(rt, &p, true);
            }
            return Ok(None);
        };
        let qg = ifaces
            .iter()
            .find(|i| i.external)
            .expect("validated: the gateway's port is an interface");
        let addrs = rt.addrs()?;
        let mut fips = Vec::new();
        for f in &r.floating_ips {
            let ip = IpAddr::V4(f.floating_ip_address);
            let was = prev
                .iter()
                .flat_map(|p| p.floating_ips.iter())
                .find(|x| x.floating_ip_address == f.floating_ip_address);
            let mut added = was.is_some_and(|w| w.added);
            let has = addrs
                .iter()
                .any(|a| a.index == qg.ifindex && a.ip == ip && a.prefix_len == 32);
            let standby = self.standby;
            if standby && has {
                rt.addr_del(qg.ifindex, &qg.device, ip, 32)?;
                added = true;
            } else if standby {
                added = f.fixed_ip_address.is_some();
            } else if f.fixed_ip_address.is_some() && !has {
                let gone = Undo::DeleteAddr {
                    ns: ns.clone(),
                    dev: qg.device.clone(),
                    ip,
                    prefix_len: 32,
                };
                undo.around(gone, || rt.addr_add(qg.ifindex, &qg.device, ip, 32))?;
                created.push(format!("floating IP {ip}/32 on {}", qg.device));
                added = true;
            }
            if f.fixed_ip_address.is_none() && has && added {
                // Disassociated: its address goes (an unassociated floating IP answers nothing).
                rt.addr_del(qg.ifindex, &qg.device, ip, 32)?;
                added = false;
            }
            fips.push(FloatingIpState {
                floating_ip_address: f.floating_ip_address,
                fixed_ip_address: f.fixed_ip_address,
                added,
            });
        }
        let st = GatewayState {
            port_id: g.port_id.clone(),
            device: qg.device.clone(),
            network_id: g.network_id.clone(),
            enable_snat: g.enable_snat,
            upstreams: g.upstreams.iter().map(|u| u.gateway_ip).collect(),
            onlink: g
                .upstreams
                .iter()
                .filter(|u| u.onlink())
                .map(|u| u.gateway_ip)
                .collect(),
            floating_ips: fips,
            sysctls_before: Vec::new(),
        };
        let nat = nat_of_parts(&qg.device, &qg.fixed_ips, &st);
        let back = Undo::RestoreNat {
            ns: ns.clone(),
            to: prev_nat.clone(),
        };
        undo.around(back, || nft::replace(&nat))?;
        // The agent's sysctls (conntrack's exist once the NAT table made the namespace use it).
        let mut before = prev
            .as_ref()
            .map(|p| p.sysctls_before.clone())
            .unwrap_or_default();
        for (key, want) in GATEWAY_SYSCTLS {
            let now = sysctl::get(key)?;
            if now != want {
                if !before.iter().any(|(k, _)| k == key) {
                    before.push((key.to_string(), now.clone()));
                }
                let back = Undo::Sysctl {
                    ns: ns.clone(),
                    key: key.to_string(),
                    value: now,
                };
                undo.around(back, || sysctl::set(key, want))?;
            }
        }
        // Floating IPs gone or moved: their address, and the kernel's flows through them.
        let mut flush = Vec::new();
        for old in prev.iter().flat_map(|p| p.floating_ips.iter()) {
            let now = st
                .floating_ips
                .iter()
                .find(|n| n.floating_ip_address == old.floating_ip_address);
            if now.is_none() && old.added {
                let ip = IpAddr::V4(old.floating_ip_address);
                rt.addr_del(qg.ifindex, &qg.device, ip, 32)?;
            }
            if now.is_none_or(|n| n.fixed_ip_address != old.fixed_ip_address) {
                flush.push(old.floating_ip_address);
            }
        }
        if let Some(p) = &prev {
            for o in &p.onlink {
                if !st.onlink.contains(o) {
                    let _ = rt.route_del(IpNet::host(*o));
                }
            }
        }
        if !flush.is_empty() {
            let mut ct = Conntrack::open(0)?;
            for f in flush {
                let n = ct.flush_address(f)?;
                let m = crate::nat::purge_address(&r.id, f)?;
                tracing::info!(router = %r.id, floating_ip = %f, flows = n, fast_path_entries = m, "flushed the flows of a removed or moved floating IP");
            }
        }
        Ok(Some(GatewayState {
            sysctls_before: before,
            ..st
        }))
    }

    /// The fast path's maps and programs. The programs stay when they are this build's and
    /// every device keeps its hook; otherwise they are loaded and swapped in.
    fn datapath(
        &self,
        st: &RouterState,
        links: &[Link],
        addrs: &[Addr],
        features: &BTreeMap<u32, XdpFeatures>,
        fresh_slots: &[u32],
    ) -> Result<()> {
        let id = &st.id;
        // Maps pinned by a build with another layout of a renewable map (counters) are
        // replaced while the programs are loaded again.
        let keep_programs = !self.reload
            && datapath::layout_current(id)?
            && self.prev.as_ref().is_some_and(|p| {
                p.program == st.program
                    && st.interfaces.iter().all(|i| {
                        p.interfaces.iter().any(|o| {
                            o.device == i.device
                                && o.ifindex == i.ifindex
                                && o.active_hook == i.active_hook
                        }) && match i.active_hook {
                            Some(Hook::Xdp) => state::link_pin(id, &i.device).exists(),
                            _ => state::tc_link_pin(id, &i.device).exists(),
                        }
                    })
            });
        let t = tables_in(st, links, addrs, features)?;
        let mut cap = crate::fib::Capacity::for_table(&t.routes);
        if let Some(n) = st.max_routes {
            cap = cap.max(crate::fib::Capacity::for_max_routes(n));
        }
        let mut ebpf = if keep_programs {
            datapath::open_pinned_object_sized(id, cap)?
        } else {
            let uses = |h| st.interfaces.iter().any(|i| i.active_hook == Some(h));
            let progs = datapath::Programs {
                xdp: uses(Hook::Xdp),
                tc: uses(Hook::Tc),
            };
            datapath::load_pinned(id, cap, progs)?
        };
        datapath::set_ifaces(&mut ebpf, &t.ifaces, &t.down, &t.no_xmit)?;
        crate::fib::writer::set_router_routes(&st.id, &mut ebpf, &t.routes)?;
        datapath::set_local_addrs(&mut ebpf, &t.own)?;
        datapath::set_nat_conf(&mut ebpf, t.nat_conf)?;
        for slot in fresh_slots {
            datapath::reset_stats(&mut ebpf, *slot)?;
        }
        if keep_programs {
            return Ok(());
        }
        // The new hook is attached before the other is detached: a device switching hooks
        // never goes without the fast path (a frame XDP passes meets the tc program).
        for i in &st.interfaces {
            let (xdp_pin, tc_pin) = (
                state::link_pin(id, &i.device),
                state::tc_link_pin(id, &i.device),
            );
            if i.active_hook == Some(Hook::Xdp) {
                datapath::attach_xdp(&mut ebpf, i.ifindex, &i.device, &xdp_pin)?;
                datapath::detach(&tc_pin)?;
            } else {
                datapath::attach_tc(&mut ebpf, &i.device, &tc_pin)?;
                datapath::detach(&xdp_pin)?;
            }
        }
        Ok(())
    }
}

/// Brings `dev` up when it is not; when `adopted`, records that rollback puts it back down.
fn up(rt: &Rtnl, ns: &str, dev: &str, adopted: bool, undo: &mut UndoLog) -> Result<()> {
    let l = rt
        .link(dev)?
        .with_context(|| format!("no device {dev} in {ns}"))?;
    if !l.up {
        if adopted {
            let down = Undo::SetDown {
                ns: ns.to_string(),
                dev: dev.to_string(),
            };
            undo.around(down, || rt.set_up(l.index, dev))?;
        } else {
            rt.set_up(l.index, dev)?;
        }
    }
    Ok(())
}

/// The namespace sysctls Neutron's agent sets on a router with a gateway.
const GATEWAY_SYSCTLS: [(&str, &str); 3] = [
    ("net.netfilter.nf_conntrack_tcp_be_liberal", "1"),
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
];

/// The NAT table of an applied router, if it has a gateway.
fn nat_of(st: &RouterState) -> Option<nft::Nat> {
    let g = st.gateway.as_ref()?;
    let qg = st.interfaces.iter().find(|i| i.external)?;
    Some(nat_of_parts(&qg.device, &qg.fixed_ips, g))
}

fn nat_of_parts(device: &str, fixed: &[AddrState], g: &GatewayState) -> nft::Nat {
    nft::Nat {
        device: device.to_string(),
        gateway_ip: fixed.iter().find_map(|a| match a.gateway_ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }),
        enable_snat: g.enable_snat,
        floating_ips: g
            .floating_ips
            .iter()
            .filter_map(|f| Some((f.floating_ip_address, f.fixed_ip_address?)))
            .collect(),
    }
}

/// Removes what apply set up for a gateway (inside the router's namespace): the NAT table, the
/// sysctls it changed, on-link routes, the floating IPs' addresses it added (when the device
/// stays) and their conntrack entries. Best effort: each step is tried.
fn remove_gateway(rt: &Rtnl, g: &GatewayState, device_stays: bool) {
    if let Err(e) = nft::remove() {
        tracing::warn!(error = format!("{e:#}"), "cannot remove the NAT table");
    }
    for (k, v) in &g.sysctls_before {
        let _ = sysctl::set(k, v);
    }
    for o in &g.onlink {
        let _ = rt.route_del(IpNet::host(*o));
    }
    let link = rt.link(&g.device).ok().flatten();
    for f in &g.floating_ips {
        let ip = f.floating_ip_address;
        if let (true, true, Some(l)) = (device_stays, f.added, &link) {
            let _ = rt.addr_del(l.index, &g.device, IpAddr::V4(ip), 32);
        }
        if let Ok(mut ct) = Conntrack::open(0) {
            let _ = ct.flush_address(ip);
        }
    }
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
    f: XdpFeatures,
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
    pub own: Vec<Ipv4Addr>,
    /// `router_common::nat_conf` bits.
    pub nat_conf: u32,
}

/// What the fast path's maps must hold for a router as the kernel has it now (read inside its
/// namespace).
pub fn tables_of(st: &RouterState) -> Result<Tables> {
    let s = st.clone();
    netns::run_in(&st.namespace, move || {
        let rt = Rtnl::new()?;
        tables_in(&s, &rt.links()?, &rt.addrs()?, &Netdev::open()?.dump()?)
    })
}

/// The tables from the namespace's devices, addresses and XDP features: the router's devices,
/// its routes (connected subnets, extra routes, every address of the namespace and the subnet
/// broadcasts as local), the devices that are down and those that cannot take XDP frames.
pub fn tables_in(
    st: &RouterState,
    links: &[Link],
    addrs: &[Addr],
    features: &BTreeMap<u32, XdpFeatures>,
) -> Result<Tables> {
    let ifindex_of = |dev: &str| {
        st.interfaces
            .iter()
            .find(|i| i.device == dev)
            .map(|i| i.ifindex)
            .unwrap_or(0)
    };
    // Every address of the namespace but IPv6 link-local ones (the fast path never routes those).
    let mut locals: Vec<IpAddr> = addrs
        .iter()
        .map(|a| a.ip)
        .filter(|a| !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80))
        .collect();
    let own: Vec<Ipv4Addr> = locals
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut connected = Vec::new();
    // An upstream router outside its subnet is reached on-link through the gateway's device.
    if let (Some(g), Some(qg)) = (&st.gateway, st.interfaces.iter().find(|i| i.external)) {
        for o in &g.onlink {
            connected.push((IpNet::host(*o), qg.ifindex));
        }
    }
    let mut down = Vec::new();
    for i in &st.interfaces {
        for f in &i.fixed_ips {
            connected.push((f.subnet, i.ifindex));
            match f.subnet {
                IpNet::V4(n) => locals.extend(n.broadcast().map(IpAddr::V4)),
                // The subnet-router anycast address: a forwarding kernel answers it.
                IpNet::V6(n) if n.len < 127 => locals.push(IpAddr::V6(Ipv6Addr::from(n.network()))),
                IpNet::V6(_) => {}
            }
        }
        let running = links
            .iter()
            .any(|l| l.index == i.ifindex && l.name == i.device && l.running());
        if !running && !cfg!(mutant = "down_keeps_tx_slot") {
            down.push(i.ifindex);
        }
    }
    let no_xmit: Vec<u32> = st
        .interfaces
        .iter()
        .filter(|i| !features.get(&i.ifindex).is_some_and(|f| f.ndo_xmit()))
        .filter(|_| !cfg!(mutant = "ndo_xmit_ignored"))
        .map(|i| i.ifindex)
        .collect();
    let mut gateways = Vec::new();
    for x in &st.routes {
        gateways.push((x.destination, ifindex_of(&x.device), x.nexthop));
    }
    // Dynamic routes (`routes`), but none shadowing a route of the definition.
    let dynamic = crate::routes::load(&st.id)?;
    if !dynamic.is_empty() {
        let own: std::collections::HashSet<IpNet> = gateways.iter().map(|g| g.0).collect();
        for (n, nh) in dynamic {
            if let Some(dev) = crate::routes::device_for(st, nh).filter(|_| !own.contains(&n)) {
                gateways.push((n, dev, nh));
            }
        }
    }
    locals.sort();
    locals.dedup();
    let mut ifaces = st
        .interfaces
        .iter()
        .map(IfaceState::entry)
        .collect::<Result<Vec<_>>>()?;
    // A followed namespace's own switches (forwarding, reverse-path filter, policy rules): a
    // port and family its kernel would not forward as the maps say are left to it. A defined
    // router's definition is its policy (apply switches forwarding on; the tests switch the
    // kernel's forwarding off to show what the fast path alone carries).
    let policy = if st.followed {
        crate::kernel::policy::read(&Rtnl::new()?, &st.ports())?
    } else {
        Default::default()
    };
    for (ifindex, iface) in ifaces.iter_mut() {
        if let Some(p) = policy.get(ifindex) {
            if !p.v4.is_empty() {
                iface.flags |= router_common::iface_flags::KERNEL_V4;
            }
            if !p.v6.is_empty() {
                iface.flags |= router_common::iface_flags::KERNEL_V6;
            }
        }
    }
    let kernel: Vec<IpNet> = st
        .kernel_routes
        .iter()
        .filter(|_| !cfg!(mutant = "kernel_routes_ignored"))
        .map(|k| k.destination)
        .collect();
    let routes = crate::fib::writer::with_kernel_routes(
        crate::fib::writer::route_entries(&ifaces, &connected, &gateways, &locals),
        &kernel,
    );
    // Foreign netfilter rules on the forwarding path: the fast path carries only flows the
    // kernel forwarded under them (see `crate::guard`).
    // Rules that cannot be read are treated as rules that cannot be followed: the kernel
    // forwards (fail closed).
    let foreign = crate::kernel::nfrules::NfRules::open(false)
        .and_then(|mut n| n.foreign())
        .unwrap_or_else(|e| crate::kernel::nfrules::Foreign {
            chains: Vec::new(),
            legacy: vec![format!("(netfilter rules unreadable: {e:#})")],
        });
    Ok(Tables {
        ifaces,
        routes,
        down,
        no_xmit,
        own,
        nat_conf: crate::guard::conf_bits(st.nat_on(), &foreign),
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
/// changed MTU or MAC, or an address or a device's XDP features changed (the daemon calls it
/// on rtnetlink and netdev events).
pub fn resync(router_id: &str) -> Result<()> {
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    let Some(st) = RouterState::load(router_id)? else {
        return Ok(());
    };
    if st.lost.is_some() || st.namespace_gone().is_some() {
        return Ok(());
    }
    if st.followed {
        return follow::refresh(st);
    }
    let ns = st.namespace.clone();
    let (st, changed) = netns::run_in(&ns, move || {
        let mut st = st;
        let rt = Rtnl::new()?;
        let links = rt.links()?;
        let mut changed = false;
        for i in st.interfaces.iter_mut() {
            if let Some(l) = links
                .iter()
                .find(|l| l.index == i.ifindex && l.name == i.device)
            {
                let mac = l.mac.map(config::Mac);
                if (mac != i.mac && !cfg!(mutant = "device_mac_change_ignored")) || l.mtu != i.mtu {
                    i.mac = mac;
                    i.mtu = l.mtu;
                    tracing::info!(router = %st.id, device = %i.device, mac = %i.mac_text(), mtu = l.mtu, "device changed");
                    changed = true;
                }
            }
        }
        let t = tables_in(&st, &links, &rt.addrs()?, &Netdev::open()?.dump()?)?;
        let mut ebpf = datapath::open_maps(&st.id)?;
        datapath::set_ifaces(&mut ebpf, &t.ifaces, &t.down, &t.no_xmit)?;
        crate::fib::writer::set_router_routes(&st.id, &mut ebpf, &t.routes)?;
        datapath::set_local_addrs(&mut ebpf, &t.own)?;
        datapath::set_nat_conf(&mut ebpf, t.nat_conf)?;
        Ok((st, changed))
    })?;
    if changed {
        st.save()?;
    }
    Ok(())
}

/// Detaches the programs from one device and removes what apply created for it (inside the
/// router's namespace).
fn remove_iface(rt: &Rtnl, router_id: &str, i: &IfaceState) {
    let _ = std::fs::remove_file(state::link_pin(router_id, &i.device));
    let _ = std::fs::remove_file(state::tc_link_pin(router_id, &i.device));
    let Ok(Some(l)) = rt.link(&i.device) else {
        return;
    };
    if i.created_device {
        let _ = rt.link_del(l.index, &i.device);
    } else {
        for (ip, len) in i.fixed_ips.iter().filter(|a| a.added).map(|a| a.addr()) {
            let _ = rt.addr_del(l.index, &i.device, ip, len);
        }
    }
}

fn remove_bpf_dir(router_id: &str) -> Result<()> {
    crate::fib::writer::forget_router_table(router_id);
    crate::routes::forget(router_id);
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
    destroy_locked(key)
}

/// Destroys each router of `keys` (ids or names), several at once (as apply does): one
/// result per key, in order; a failure leaves the others to go on.
pub fn destroy_many(keys: &[String]) -> Result<Vec<Result<RouterState>>> {
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    Ok(in_parallel(keys, |k| destroy_locked(k)))
}

/// Runs `f` on every item on a pool of `APPLY_WORKERS` threads; the results in order.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..items.len().clamp(1, APPLY_WORKERS) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(k) else { break };
                let r = f(item);
                *results[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item is done once the pool has ended")
        })
        .collect()
}

fn destroy_locked(key: &str) -> Result<RouterState> {
    // An apply of this router that was killed part-way is rolled back first (a first apply
    // left no state: it is found by the router's id alone).
    let interrupted = undo::recover(key)?;
    let st = match RouterState::find(key) {
        Ok(st) => st,
        Err(_) if interrupted => return Ok(RouterState::interrupted(key)),
        Err(e) => return Err(e),
    };
    if st.followed {
        bail!(
            "router {}: followed, not defined (`run --follow`); it goes when the namespace goes or follow mode stops",
            st.id
        );
    }
    undo::recover(&st.id)?;
    let (id, name) = (st.id.clone(), st.name.clone());
    destroy_found(st).with_context(|| format!("destroying router {id} ({name})"))
}

fn destroy_found(st: RouterState) -> Result<RouterState> {
    let ns = st.namespace.clone();
    let live = st.lost.is_none() && st.namespace_gone().is_none();
    if live {
        // Instances that autoconfigured from the router's advertisements drop it as their
        // default router at once (router lifetime 0), before its devices go.
        crate::ra::withdraw(&st);
        let s = st.clone();
        netns::run_in(&ns, move || {
            let rt = Rtnl::new()?;
            for i in &s.interfaces {
                remove_iface(&rt, &s.id, i);
            }
            if !s.created_netns {
                // The daemon's record of the flows the kernel forwarded (see `crate::guard`).
                if let Err(e) = crate::guard::remove() {
                    tracing::warn!(router = %s.id, error = format!("{e:#}"), "cannot remove the table of forwarded flows");
                }
                if let Some(g) = &s.gateway {
                    let stays = s.interfaces.iter().any(|i| i.external && !i.created_device);
                    remove_gateway(&rt, g, stays);
                }
                // A followed router's routes are the other control plane's.
                for x in s.routes.iter().filter(|_| !s.followed) {
                    let _ = rt.route_del(x.destination);
                }
                if let Some(v) = &s.ip_forward_before {
                    let _ = sysctl::set("net.ipv4.ip_forward", v);
                }
                if let Some(v) = &s.ipv6_forwarding_before {
                    let _ = sysctl::set("net.ipv6.conf.all.forwarding", v);
                }
            }
            Ok(())
        })?;
    } else {
        for i in &st.interfaces {
            let _ = std::fs::remove_file(state::link_pin(&st.id, &i.device));
            let _ = std::fs::remove_file(state::tc_link_pin(&st.id, &i.device));
        }
    }
    remove_bpf_dir(&st.id)?;
    if live {
        // Devices apply moved in go back where they came from, before their namespace may go.
        let mut stuck = Vec::new();
        for i in st
            .interfaces
            .iter()
            .filter(|i| i.moved_in && !i.created_device)
        {
            if cfg!(mutant = "adopted_devices_stay") {
                break;
            }
            if let Err(e) = move_back(&ns, &i.device, &i.home_addrs) {
                stuck.push(format!("{}: {e:#}", i.device));
            }
        }
        if !stuck.is_empty() {
            // Deleting the namespace now would destroy them: keep it, and say so.
            anyhow::bail!(
                "router {}: cannot move adopted devices back out of {ns} ({}); the namespace stays so that they live on: move them out by hand and destroy again",
                st.id,
                stuck.join("; ")
            );
        }
    }
    if live && st.created_netns {
        netns::delete(&ns).with_context(|| format!("cannot delete namespace {ns}"))?;
    }
    RouterState::remove(&st.id)?;
    tracing::info!(router = %st.id, name = %st.name, "destroyed");
    Ok(st)
}

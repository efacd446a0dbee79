//! The openstack-style verbs (`router-ctl router create|delete|list|show`, `router add|remove
//! subnet|route`): each one turns the router's current definition into a new one and applies it
//! through the same validation and apply as a definitions file, so a refused change changes
//! nothing.

use anyhow::{anyhow, bail, Context as _, Result};

use std::net::{IpAddr, Ipv4Addr};

use crate::{
    apply,
    config::{
        self, IpNet, RawExternalIp, RawFixedIp, RawFloatingIp, RawGateway, RawInterface, RawRoute,
        RawRouter, Router,
    },
    state::{FloatingIpState, GatewayState, RouterState},
};

/// Where the verbs find the routers' definitions and put the changed ones: the routers applied
/// on this host, or the definitions in etcd (whose agents apply them).
#[derive(Clone, Copy)]
pub enum Target<'a> {
    Here,
    Etcd(&'a crate::agent::store::Store),
}

/// A random UUID (version 4), as Neutron gives routers and ports.
pub fn new_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom")?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The definition of an applied router, as a file would state it: the one applied, kept in
/// its state.
pub fn definition_of(st: &RouterState) -> RawRouter {
    st.definition.clone().unwrap_or_else(|| rebuilt(st))
}

/// The definition of a router applied by a build that did not keep it, from its state.
fn rebuilt(st: &RouterState) -> RawRouter {
    let interface = st
        .interfaces
        .iter()
        .filter(|i| !i.external)
        .map(|i| {
            RawInterface::of(
                &i.port_id,
                i.fixed_ips.iter().map(|f| RawFixedIp {
                    subnet: f.subnet.to_string(),
                    ip_address: f.gateway_ip.to_string(),
                    ..RawFixedIp::default()
                }),
                i.hook,
            )
        })
        .collect();
    let route = st
        .routes
        .iter()
        .filter(|r| !r.gateway)
        .map(|r| RawRoute::of(r.destination, r.nexthop))
        .collect();
    let qg = st.interfaces.iter().find(|i| i.external);
    let (external_gateway, floating_ip) = match (&st.gateway, qg) {
        (Some(g), Some(qg)) => (
            Some(RawGateway {
                port_id: g.port_id.clone(),
                network_id: g.network_id.clone(),
                enable_snat: Some(g.enable_snat),
                external_fixed_ips: external_ips_of(g, qg),
                hook: config::raw_hook(qg.hook),
            }),
            floating_ips_of(&g.floating_ips),
        ),
        _ => (None, Vec::new()),
    };
    RawRouter {
        id: st.id.clone(),
        name: Some(st.name.clone()),
        max_routes: st.max_routes.map(u64::from),
        ha: st.ha,
        interface,
        route,
        external_gateway,
        floating_ip,
    }
}

/// The external fixed IPs of an applied gateway, each with the upstream router of its family
/// (one per family, the first not taken yet).
fn external_ips_of(g: &GatewayState, qg: &crate::state::IfaceState) -> Vec<RawExternalIp> {
    let mut used: Vec<&IpAddr> = Vec::new();
    qg.fixed_ips
        .iter()
        .map(|f| {
            let v6 = f.subnet.is_ipv6();
            let up = g
                .upstreams
                .iter()
                .find(|u| u.is_ipv6() == v6 && !used.contains(u));
            if let Some(u) = up {
                used.push(u);
            }
            RawExternalIp {
                subnet: f.subnet.to_string(),
                ip_address: f.gateway_ip.to_string(),
                gateway_ip: up.map(|u| u.to_string()),
            }
        })
        .collect()
}

fn floating_ips_of(fips: &[FloatingIpState]) -> Vec<RawFloatingIp> {
    fips.iter()
        .map(|f| RawFloatingIp::of(f.floating_ip_address, f.fixed_ip_address))
        .collect()
}

/// A `--fixed-ip subnet=CIDR,ip-address=IP[,gateway=IP]` argument, as the definition's entry.
pub fn parse_fixed_ip(arg: &str) -> Result<RawExternalIp> {
    let (mut s, mut ip, mut gw) = (None, None, None);
    for kv in arg.split(',') {
        match kv.split_once('=') {
            Some(("subnet", v)) => s = Some(v.to_string()),
            Some(("ip-address", v)) | Some(("ip_address", v)) => ip = Some(v.to_string()),
            Some(("gateway", v)) | Some(("gateway_ip", v)) => gw = Some(v.to_string()),
            _ => bail!("--fixed-ip '{arg}': expected subnet=CIDR,ip-address=IP[,gateway=IP]"),
        }
    }
    Ok(RawExternalIp {
        subnet: s.ok_or_else(|| anyhow!("--fixed-ip '{arg}': subnet= is missing"))?,
        ip_address: ip.ok_or_else(|| anyhow!("--fixed-ip '{arg}': ip-address= is missing"))?,
        gateway_ip: gw,
    })
}

/// `router set R --external-gateway NET [--port-id P] [--fixed-ip …]… [--enable-snat|--disable-snat]`:
/// sets or changes the gateway; what is not given stays as it was (a new gateway needs
/// --fixed-ip; its port id is new unless given).
pub fn set_gateway(
    t: Target,
    router: &str,
    network: &str,
    port_id: Option<String>,
    fixed_ips: &[String],
    snat: Option<bool>,
) -> Result<Router> {
    let fixed: Vec<RawExternalIp> = fixed_ips
        .iter()
        .map(|f| parse_fixed_ip(f))
        .collect::<Result<_>>()?;
    let port = port_id.map(Ok);
    change(t, router, |st, def| {
        let old = def.external_gateway.take();
        if old.is_none() && fixed.is_empty() {
            bail!("router {}: a new external gateway needs at least one --fixed-ip subnet=CIDR,ip-address=IP,gateway=IP", st.name);
        }
        let port_id = match (port, &old) {
            (Some(p), _) => p,
            (None, Some(g)) => Ok(g.port_id.clone()),
            (None, None) => new_uuid(),
        }?;
        let old = old.unwrap_or_default();
        def.external_gateway = Some(RawGateway {
            port_id,
            network_id: Some(network.to_string()),
            enable_snat: Some(snat.or(old.enable_snat).unwrap_or(true)),
            external_fixed_ips: if fixed.is_empty() {
                old.external_fixed_ips
            } else {
                fixed
            },
            hook: old.hook,
        });
        Ok(())
    })
}

/// `router unset R --external-gateway`; refused while floating IPs need it (as Neutron does).
pub fn unset_gateway(t: Target, router: &str) -> Result<Router> {
    change(t, router, |st, def| {
        if def.external_gateway.is_none() {
            bail!("router {} has no external gateway", st.name);
        }
        if !def.floating_ip.is_empty() {
            bail!(
                "router {}: floating IPs {} need the external gateway; delete them first (`router-ctl floating ip delete F`)",
                st.name,
                def.floating_ip.iter().map(|f| f.floating_ip_address.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        def.external_gateway = None;
        Ok(())
    })
}

/// The router holding floating IP `fip` (of router `router` when given: the same address
/// may exist on routers of different external networks), and the floating IP.
pub fn find_floating_ip(
    t: Target,
    fip: &str,
    router: Option<&str>,
) -> Result<(RouterState, FloatingIpState)> {
    let fip = canonical(fip);
    let addr = fip.parse::<Ipv4Addr>().ok();
    let mut found = Vec::new();
    let candidates = match router {
        Some(r) => vec![find(t, r)?],
        None => all(t)?,
    };
    for st in candidates {
        if let Some(f) = st
            .gateway
            .iter()
            .flat_map(|g| g.floating_ips.iter())
            .find(|f| Some(f.floating_ip_address) == addr)
        {
            let f = f.clone();
            found.push((st, f));
        }
    }
    match found.len() {
        0 => bail!("no floating IP {fip}{}; `router-ctl floating ip list` lists them", router.map(|r| format!(" on router {r}")).unwrap_or_default()),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "floating IP {fip} exists on routers {} (different external networks); say which with --router",
            found.iter().map(|(s, _)| s.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Rewrites the floating IPs of `st`'s definition with `f` and applies.
fn with_floating_ips(
    t: Target,
    st: &RouterState,
    f: impl FnOnce(&mut Vec<RawFloatingIp>),
) -> Result<Router> {
    let mut def = definition_of(st);
    if def.external_gateway.is_none() {
        bail!("router {} has no external gateway; `router-ctl router set {} --external-gateway NET --fixed-ip …` first", st.name, st.name);
    }
    f(&mut def.floating_ip);
    apply_definition(t, def)
}

pub fn create_floating_ip(
    t: Target,
    router: &str,
    fip: &str,
    fixed: Option<&str>,
) -> Result<Router> {
    let st = find(t, router)?;
    let (fip, fixed) = (canonical(fip), fixed.map(canonical));
    let addr = fip.parse::<Ipv4Addr>().ok();
    let network = st.gateway.as_ref().and_then(|g| g.network_id.clone());
    for other in all(t)? {
        let Some(g) = &other.gateway else { continue };
        if g.network_id == network
            && g.floating_ips
                .iter()
                .any(|f| Some(f.floating_ip_address) == addr)
        {
            bail!(
                "floating IP {fip} exists already on network {}, on router {}",
                network.as_deref().unwrap_or("-"),
                other.name
            );
        }
    }
    with_floating_ips(t, &st, |v| {
        v.push(RawFloatingIp {
            floating_ip_address: fip,
            fixed_ip_address: fixed,
        })
    })
}

/// `floating ip set F --fixed-ip-address X` (Some) or `floating ip unset F` (None).
pub fn associate_floating_ip(
    t: Target,
    fip: &str,
    router: Option<&str>,
    fixed: Option<&str>,
) -> Result<Router> {
    let (st, f) = find_floating_ip(t, fip, router)?;
    let fixed = fixed.map(canonical);
    with_floating_ips(t, &st, |v| {
        for x in v
            .iter_mut()
            .filter(|x| canonical(&x.floating_ip_address) == f.floating_ip_address.to_string())
        {
            x.fixed_ip_address = fixed.clone();
        }
    })
}

pub fn delete_floating_ip(t: Target, fip: &str, router: Option<&str>) -> Result<Router> {
    let (st, f) = find_floating_ip(t, fip, router)?;
    with_floating_ips(t, &st, |v| {
        v.retain(|x| canonical(&x.floating_ip_address) != f.floating_ip_address.to_string())
    })
}

/// The router `key` (id or name): applied here, or defined in etcd when the CLI works
/// against etcd.
pub fn find(t: Target, key: &str) -> Result<RouterState> {
    match t {
        Target::Etcd(s) => s.find(key),
        Target::Here => RouterState::find(key),
    }
}

pub fn all(t: Target) -> Result<Vec<RouterState>> {
    match t {
        Target::Etcd(s) => s.all(),
        Target::Here => RouterState::all(),
    }
}

/// Validates and applies one router's new definition (or writes it to etcd, whose agents
/// apply it).
fn apply_definition(t: Target, def: RawRouter) -> Result<Router> {
    if let Target::Etcd(s) = t {
        return s.put(&config::to_text(&[def]));
    }
    let routers = config::validate(vec![def])?;
    apply::apply(&routers)?;
    Ok(routers.into_iter().next().expect("one router"))
}

/// `router create NAME [--ha]`.
pub fn create_ha(t: Target, name: &str, id: Option<String>, ha: bool) -> Result<Router> {
    if all(t)?.iter().any(|r| r.name == name) {
        bail!("a router named '{name}' exists already; `router-ctl router list` shows it");
    }
    let id = match id {
        Some(i) => i,
        None => new_uuid()?,
    };
    apply_definition(
        t,
        RawRouter {
            id,
            name: Some(name.to_string()),
            ha,
            ..RawRouter::default()
        },
    )
}

pub fn create(t: Target, name: &str, id: Option<String>) -> Result<Router> {
    create_ha(t, name, id, false)
}

/// A `--route destination=D,gateway=G` argument.
pub fn parse_route(arg: &str) -> Result<(String, String)> {
    let (mut d, mut g) = (None, None);
    for kv in arg.split(',') {
        match kv.split_once('=') {
            Some(("destination", v)) => d = Some(v.to_string()),
            Some(("gateway", v)) | Some(("nexthop", v)) => g = Some(v.to_string()),
            _ => bail!("--route '{arg}': expected destination=CIDR,gateway=IP"),
        }
    }
    Ok((
        d.ok_or_else(|| anyhow!("--route '{arg}': destination= is missing"))?,
        g.ok_or_else(|| anyhow!("--route '{arg}': gateway= is missing"))?,
    ))
}

/// Applies `change` to the router's current definition.
fn change(
    t: Target,
    router: &str,
    f: impl FnOnce(&RouterState, &mut RawRouter) -> Result<()>,
) -> Result<Router> {
    let st = find(t, router)?;
    let mut def = definition_of(&st);
    f(&st, &mut def)?;
    apply_definition(t, def)
}

/// `router add subnet R --subnet S --gateway G [--ipv6-ra-mode M --ipv6-address-mode M]`:
/// the subnet `ip` on a new port, or on port `port_id` when the router has it.
pub fn add_subnet(
    t: Target,
    router: &str,
    ip: RawFixedIp,
    port_id: Option<String>,
) -> Result<Router> {
    let port = match port_id {
        Some(p) => p,
        None => new_uuid()?,
    };
    change(t, router, |_, def| {
        match def.interface.iter_mut().find(|i| i.port_id == port) {
            // A port the router has already gets one more fixed IP (a dual-stack port).
            Some(i) => {
                let mut ips = i.fixed_ips();
                ips.push(ip);
                i.set_fixed_ips(ips);
            }
            None => def.interface.push(RawInterface::new(port, vec![ip], None)),
        }
        Ok(())
    })
}

/// The canonical spelling of a prefix or address (IPv6 has several), or the text as given.
fn canonical(s: &str) -> String {
    if s.contains('/') {
        s.parse::<IpNet>().map(|n| n.to_string())
    } else {
        s.parse::<IpAddr>()
            .map(|a| a.to_string())
            .map_err(|e| e.to_string())
    }
    .unwrap_or_else(|_| s.to_string())
}

pub fn remove_subnet(t: Target, router: &str, subnet: &str) -> Result<Router> {
    let subnet = canonical(subnet);
    change(t, router, |st, def| {
        let mut removed = 0;
        for i in def.interface.iter_mut() {
            let mut ips = i.fixed_ips();
            let before = ips.len();
            ips.retain(|f| canonical(&f.subnet) != subnet);
            removed += before - ips.len();
            i.set_fixed_ips(ips);
        }
        // A port left without any subnet goes, as Neutron's router port does.
        def.interface.retain(|i| !i.fixed_ips().is_empty());
        if removed == 0 {
            bail!("router {}: no interface on subnet {subnet}", st.name);
        }
        Ok(())
    })
}

pub fn add_route(t: Target, router: &str, route: &str) -> Result<Router> {
    let (d, g) = parse_route(route)?;
    change(t, router, |_, def| {
        def.route.push(RawRoute {
            destination: d,
            nexthop: g,
        });
        Ok(())
    })
}

pub fn remove_route(t: Target, router: &str, route: &str) -> Result<Router> {
    let (d, g) = parse_route(route)?;
    let (d, g) = (canonical(&d), canonical(&g));
    change(t, router, |st, def| {
        let before = def.route.len();
        def.route
            .retain(|r| !(canonical(&r.destination) == d && canonical(&r.nexthop) == g));
        if def.route.len() == before {
            bail!("router {}: no route to {d} via {g}", st.name);
        }
        Ok(())
    })
}

/// `route batch`: dynamic routes (see `crate::routes`) in bulk.
pub mod batch {
    use std::collections::{HashMap, HashSet};

    use anyhow::{bail, Context as _, Result};
    use serde::Serialize;

    use crate::{
        apply,
        config::IpNet,
        datapath,
        kernel::{netns, rtnl::Rtnl},
        routes,
        state::{self, Lock, RouterState},
    };

    /// Lines carried to the kernel and the fast path at a time. A batch that fails in the kernel
    /// after its checks (out of memory, a device gone meanwhile) keeps its earlier chunks, in the
    /// kernel, the fast path and the journal alike.
    const CHUNK: usize = 16384;

    /// What a batch did.
    #[derive(Debug, Default, Serialize)]
    pub struct Summary {
        pub router: String,
        pub set: usize,
        pub deleted: usize,
        /// Prefixes in the fast path's table afterwards (all of the router's routes).
        pub prefixes: usize,
    }

    /// Applies the batch `ops` (parsed with `routes::parse`) to router `router` (name or id).
    pub fn batch(router: &str, ops: Vec<routes::Op>) -> Result<Summary> {
        let (total, deletes) = (
            ops.len(),
            ops.iter()
                .filter(|o| matches!(o, routes::Op::Del(_)))
                .count(),
        );
        let _lock = Lock::acquire(state::STATE_LOCK)?;
        let st = RouterState::find(router)?;
        // The router's own routes (subnets, extra routes, the gateway's default) are its
        // definition's; a dynamic route may not shadow one of them.
        let mut own: HashSet<IpNet> = HashSet::new();
        for i in &st.interfaces {
            own.extend(i.fixed_ips.iter().map(|f| f.subnet));
        }
        own.extend(st.routes.iter().map(|r| r.destination));
        let ifaces = st.iface_entries()?;
        // Every line checked first; each set's device found once.
        let mut devs: Vec<u32> = Vec::with_capacity(ops.len());
        for op in &ops {
            let net = op.net();
            if own.contains(&net) {
                bail!(
                    "router {}: {net} is one of its own routes (a subnet or an extra route); \
                 change those with `router-ctl router add|remove route|subnet`",
                    st.name
                );
            }
            if let routes::Op::Set(net, nh) = *op {
                let Some(dev) = routes::device_for(&st, nh) else {
                    bail!(
                        "router {}: nexthop {nh} of {net} is in none of its subnets",
                        st.name
                    );
                };
                devs.push(dev);
            }
        }
        let mut ebpf = datapath::open_maps(&st.id)?;
        let prefixes = crate::fib::writer::with_router_table(&st.id, &mut ebpf, |t| {
            if t.live().is_none() {
                t.set(&apply::tables_of(&st)?.routes)?;
            }
            // A prefix deleted must be there when its turn comes (only deleted prefixes are
            // followed through the batch, so a bulk load costs no memory for this).
            let live = t.live().expect("set above");
            // Nor one of its addresses, broadcasts or on-link hosts (local and connected entries).
            for op in &ops {
                let net = op.net();
                if live.routes_of(net).is_some_and(|rs| {
                    rs.iter()
                        .any(|r| r.kind != router_common::route_kind::GATEWAY)
                }) {
                    bail!(
                        "router {}: {net} is one of its own addresses or connected routes",
                        st.name
                    );
                }
            }
            let deleted: HashSet<IpNet> = ops
                .iter()
                .filter_map(|o| match o {
                    routes::Op::Del(n) => Some(*n),
                    routes::Op::Set(..) => None,
                })
                .collect();
            let mut present: HashMap<IpNet, bool> = HashMap::new();
            for op in ops.iter().filter(|o| deleted.contains(&o.net())) {
                let net = op.net();
                let here = *present
                    .entry(net)
                    .or_insert_with(|| live.routes_of(net).is_some());
                if matches!(op, routes::Op::Del(_)) && !here {
                    bail!("router {}: no dynamic route to {net} to delete", st.name);
                }
                present.insert(net, matches!(op, routes::Op::Set(..)));
            }
            // In chunks, so that a million lines never exist three times over: the kernel first
            // (a frame the fast path hands over finds the route there already), then the fast path.
            // Each chunk's lines are dropped once applied: the table grows as the batch shrinks.
            let mut devs = devs.iter();
            if let Some(l) = t.live_mut() {
                l.reserve(total - deletes);
            }
            let mut chunks: Vec<Vec<routes::Op>> =
                ops.chunks(CHUNK).map(<[routes::Op]>::to_vec).collect();
            drop(ops);
            chunks.reverse();
            while let Some(chunk) = chunks.pop() {
                let chunk = chunk.as_slice();
                let mut kernel = Vec::with_capacity(chunk.len());
                let mut fast = Vec::with_capacity(chunk.len());
                for op in chunk {
                    match *op {
                        routes::Op::Set(net, nh) => {
                            let dev = *devs.next().expect("a device per set");
                            let r = crate::fib::writer::route_entries(
                                &ifaces,
                                &[],
                                &[(net, dev, nh)],
                                &[],
                            );
                            kernel.push((net, Some((nh, dev))));
                            fast.push((net, Some(vec![r[0].1])));
                        }
                        routes::Op::Del(net) => {
                            kernel.push((net, None));
                            fast.push((net, None));
                        }
                    }
                }
                netns::run_in(&st.namespace, move || Rtnl::new()?.routes_change(&kernel))
                    .with_context(|| format!("router {}: the kernel refused a route", st.name))?;
                t.change(&fast)?;
                routes::append(&st.id, chunk)?;
            }
            Ok(t.live().map(|l| l.len()).unwrap_or(0))
        })?;
        Ok(Summary {
            router: st.name.clone(),
            set: total - deletes,
            deleted: deletes,
            prefixes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the verbs start from (an applied router's state, with its definition kept or, from
    /// an older build, without) gives back the router it was applied from, for every shipped
    /// example: no field is dropped on the way.
    #[test]
    fn the_definition_of_an_applied_router_is_the_one_applied() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
        for e in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            for r in config::parse(&text).unwrap() {
                let st = crate::agent::store::planned(&r);
                assert_eq!(definition_of(&st), r.definition(), "{text}");
                // A state file of a build that did not keep the definition.
                let old = RouterState {
                    definition: None,
                    ..st
                };
                let back = config::validate(vec![definition_of(&old)]).unwrap();
                assert_eq!(back, vec![r.clone()], "{text}");
                assert_eq!(rebuilt(&old), r.definition(), "{text}");
            }
        }
    }
}

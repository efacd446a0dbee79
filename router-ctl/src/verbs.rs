//! The openstack-style verbs (`router-ctl router create|delete|list|show`, `router add|remove
//! subnet|route`): each one turns the router's current definition into a new one and applies it
//! through the same validation and apply as a definitions file, so a refused change changes
//! nothing.

use anyhow::{anyhow, bail, Context as _, Result};

use std::net::IpAddr;

use crate::{
    apply,
    config::{self, IpNet, Router},
    state::{AddrState, FloatingIpState, GatewayState, RouterState},
};

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

/// The definition of an applied router, as a file would state it.
pub fn definition_of(st: &RouterState) -> String {
    let mut t = format!("[[router]]\nid = \"{}\"\nname = \"{}\"\n", st.id, st.name);
    if let Some(n) = st.max_routes {
        t += &format!("max_routes = {n}\n");
    }
    if st.ha {
        t += "ha = true\n";
    }
    for i in st.interfaces.iter().filter(|i| !i.external) {
        t += &format!("[[router.interface]]\nport_id = \"{}\"\n", i.port_id);
        if i.hook != config::Hook::Auto {
            t += &format!("hook = \"{}\"\n", i.hook);
        }
        if let [f] = &i.fixed_ips[..] {
            t += &format!(
                "subnet = \"{}\"\ngateway_ip = \"{}\"\n",
                f.subnet, f.gateway_ip
            );
        } else {
            let f: Vec<String> = i
                .fixed_ips
                .iter()
                .map(|f| {
                    format!(
                        "{{ subnet = \"{}\", ip_address = \"{}\" }}",
                        f.subnet, f.gateway_ip
                    )
                })
                .collect();
            t += &format!("fixed_ips = [{}]\n", f.join(", "));
        }
    }
    for r in st.routes.iter().filter(|r| !r.gateway) {
        t += &format!(
            "[[router.route]]\ndestination = \"{}\"\nnexthop = \"{}\"\n",
            r.destination, r.nexthop
        );
    }
    if let (Some(g), Some(qg)) = (&st.gateway, st.interfaces.iter().find(|i| i.external)) {
        t += &gateway_text(g, qg, None, None);
        t += &floating_ips_text(&g.floating_ips);
    }
    t
}

/// `[router.external_gateway]` of an applied gateway, with its SNAT or its fixed IPs replaced
/// when given.
fn gateway_text(
    g: &GatewayState,
    qg: &crate::state::IfaceState,
    snat: Option<bool>,
    fixed: Option<&[String]>,
) -> String {
    let mut t = format!("[router.external_gateway]\nport_id = \"{}\"\n", g.port_id);
    if let Some(n) = &g.network_id {
        t += &format!("network_id = \"{n}\"\n");
    }
    t += &format!("enable_snat = {}\n", snat.unwrap_or(g.enable_snat));
    if qg.hook != config::Hook::Auto {
        t += &format!("hook = \"{}\"\n", qg.hook);
    }
    let ips: Vec<String> = match fixed {
        Some(f) => f.to_vec(),
        None => {
            let mut used: Vec<String> = Vec::new();
            qg.fixed_ips
                .iter()
                .map(|f| {
                    let v6 = f.subnet.contains(':');
                    let up = g
                        .upstreams
                        .iter()
                        .find(|u| u.contains(':') == v6 && !used.contains(u));
                    let gw = match up {
                        Some(u) => {
                            used.push(u.clone());
                            format!(", gateway_ip = \"{u}\"")
                        }
                        None => String::new(),
                    };
                    format!(
                        "{{ subnet = \"{}\", ip_address = \"{}\"{gw} }}",
                        f.subnet, f.gateway_ip
                    )
                })
                .collect()
        }
    };
    t += &format!("external_fixed_ips = [{}]\n", ips.join(", "));
    t
}

fn floating_ips_text(fips: &[FloatingIpState]) -> String {
    let mut t = String::new();
    for f in fips {
        t += &format!(
            "[[router.floating_ip]]\nfloating_ip_address = \"{}\"\n",
            f.floating_ip_address
        );
        if let Some(x) = &f.fixed_ip_address {
            t += &format!("fixed_ip_address = \"{x}\"\n");
        }
    }
    t
}

/// A `--fixed-ip subnet=CIDR,ip-address=IP[,gateway=IP]` argument, as the definition's entry.
pub fn parse_fixed_ip(arg: &str) -> Result<String> {
    let (mut s, mut ip, mut gw) = (None, None, None);
    for kv in arg.split(',') {
        match kv.split_once('=') {
            Some(("subnet", v)) => s = Some(v.to_string()),
            Some(("ip-address", v)) | Some(("ip_address", v)) => ip = Some(v.to_string()),
            Some(("gateway", v)) | Some(("gateway_ip", v)) => gw = Some(v.to_string()),
            _ => bail!("--fixed-ip '{arg}': expected subnet=CIDR,ip-address=IP[,gateway=IP]"),
        }
    }
    let s = s.ok_or_else(|| anyhow!("--fixed-ip '{arg}': subnet= is missing"))?;
    let ip = ip.ok_or_else(|| anyhow!("--fixed-ip '{arg}': ip-address= is missing"))?;
    Ok(match gw {
        Some(g) => format!("{{ subnet = \"{s}\", ip_address = \"{ip}\", gateway_ip = \"{g}\" }}"),
        None => format!("{{ subnet = \"{s}\", ip_address = \"{ip}\" }}"),
    })
}

/// The definition of `st` without its gateway and floating IPs.
fn without_gateway(st: &RouterState) -> String {
    let mut st = st.clone();
    st.gateway = None;
    definition_of(&st)
}

/// `router set R --external-gateway NET [--port-id P] [--fixed-ip …]… [--enable-snat|--disable-snat]`:
/// sets or changes the gateway; what is not given stays as it was (a new gateway needs
/// --fixed-ip; its port id is new unless given).
pub fn set_gateway(
    router: &str,
    network: &str,
    port_id: Option<String>,
    fixed_ips: &[String],
    snat: Option<bool>,
) -> Result<Router> {
    let fixed: Vec<String> = fixed_ips
        .iter()
        .map(|f| parse_fixed_ip(f))
        .collect::<Result<_>>()?;
    let st = find(router)?;
    let old = st.gateway.clone();
    let qg = st.interfaces.iter().find(|i| i.external).cloned();
    let port = match (port_id, &old) {
        (Some(p), _) => p,
        (None, Some(g)) => g.port_id.clone(),
        (None, None) => new_uuid()?,
    };
    if old.is_none() && fixed.is_empty() {
        bail!("router {}: a new external gateway needs at least one --fixed-ip subnet=CIDR,ip-address=IP,gateway=IP", st.name);
    }
    let g = GatewayState {
        port_id: port,
        network_id: Some(network.to_string()),
        enable_snat: snat.or(old.as_ref().map(|g| g.enable_snat)).unwrap_or(true),
        ..old.clone().unwrap_or_default()
    };
    let qg = qg
        .unwrap_or_else(|| crate::state::IfaceState::new(String::new(), String::new(), Vec::new()));
    let mut text = without_gateway(&st);
    text += &gateway_text(&g, &qg, None, (!fixed.is_empty()).then_some(&fixed[..]));
    text += &floating_ips_text(&g.floating_ips);
    apply_text(&text)
}

/// `router unset R --external-gateway`; refused while floating IPs need it (as Neutron does).
pub fn unset_gateway(router: &str) -> Result<Router> {
    let st = find(router)?;
    let Some(g) = &st.gateway else {
        bail!("router {} has no external gateway", st.name);
    };
    if !g.floating_ips.is_empty() {
        bail!(
            "router {}: floating IPs {} need the external gateway; delete them first (`router-ctl floating ip delete F`)",
            st.name,
            g.floating_ips.iter().map(|f| f.floating_ip_address.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    apply_text(&without_gateway(&st))
}

/// The router holding floating IP `fip` (of router `router` when given: the same address
/// may exist on routers of different external networks), and the floating IP.
pub fn find_floating_ip(fip: &str, router: Option<&str>) -> Result<(RouterState, FloatingIpState)> {
    let fip = canonical(fip);
    let mut found = Vec::new();
    let candidates = match router {
        Some(r) => vec![find(r)?],
        None => all()?,
    };
    for st in candidates {
        if let Some(f) = st
            .gateway
            .iter()
            .flat_map(|g| g.floating_ips.iter())
            .find(|f| f.floating_ip_address == fip)
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

/// Rewrites the floating IPs of `st` with `f` and applies.
fn with_floating_ips(
    st: &RouterState,
    f: impl FnOnce(&mut Vec<FloatingIpState>),
) -> Result<Router> {
    let mut st = st.clone();
    let Some(g) = st.gateway.as_mut() else {
        bail!("router {} has no external gateway; `router-ctl router set {} --external-gateway NET --fixed-ip …` first", st.name, st.name);
    };
    f(&mut g.floating_ips);
    apply_text(&definition_of(&st))
}

pub fn create_floating_ip(router: &str, fip: &str, fixed: Option<&str>) -> Result<Router> {
    let st = find(router)?;
    let (fip, fixed) = (canonical(fip), fixed.map(canonical));
    let network = st.gateway.as_ref().and_then(|g| g.network_id.clone());
    for other in all()? {
        let Some(g) = &other.gateway else { continue };
        if g.network_id == network && g.floating_ips.iter().any(|f| f.floating_ip_address == fip) {
            bail!(
                "floating IP {fip} exists already on network {}, on router {}",
                network.as_deref().unwrap_or("-"),
                other.name
            );
        }
    }
    with_floating_ips(&st, |v| {
        v.push(FloatingIpState {
            floating_ip_address: fip,
            fixed_ip_address: fixed,
            added: false,
        })
    })
}

/// `floating ip set F --fixed-ip-address X` (Some) or `floating ip unset F` (None).
pub fn associate_floating_ip(
    fip: &str,
    router: Option<&str>,
    fixed: Option<&str>,
) -> Result<Router> {
    let (st, f) = find_floating_ip(fip, router)?;
    let fixed = fixed.map(canonical);
    with_floating_ips(&st, |v| {
        for x in v
            .iter_mut()
            .filter(|x| x.floating_ip_address == f.floating_ip_address)
        {
            x.fixed_ip_address = fixed.clone();
        }
    })
}

pub fn delete_floating_ip(fip: &str, router: Option<&str>) -> Result<Router> {
    let (st, f) = find_floating_ip(fip, router)?;
    with_floating_ips(&st, |v| {
        v.retain(|x| x.floating_ip_address != f.floating_ip_address)
    })
}

/// The router `key` (id or name): applied here, or defined in etcd when the CLI works
/// against etcd.
pub fn find(key: &str) -> Result<RouterState> {
    match crate::agent::store::remote() {
        Some(s) => s.find(key),
        None => RouterState::find(key),
    }
}

pub fn all() -> Result<Vec<RouterState>> {
    match crate::agent::store::remote() {
        Some(s) => s.all(),
        None => RouterState::all(),
    }
}

/// Validates and applies one router's new definition (or writes it to etcd, whose agents
/// apply it).
fn apply_text(text: &str) -> Result<Router> {
    if let Some(s) = crate::agent::store::remote() {
        return s.put(text);
    }
    let routers = config::parse(text)?;
    apply::apply(&routers)?;
    Ok(routers.into_iter().next().expect("one router"))
}

/// `router create NAME [--ha]`.
pub fn create_ha(name: &str, id: Option<String>, ha: bool) -> Result<Router> {
    if !ha {
        return create(name, id);
    }
    if all()?.iter().any(|r| r.name == name) {
        bail!("a router named '{name}' exists already; `router-ctl router list` shows it");
    }
    let id = match id {
        Some(i) => i,
        None => new_uuid()?,
    };
    apply_text(&format!(
        "[[router]]\nid = \"{id}\"\nname = \"{name}\"\nha = true\n"
    ))
}

pub fn create(name: &str, id: Option<String>) -> Result<Router> {
    if all()?.iter().any(|r| r.name == name) {
        bail!("a router named '{name}' exists already; `router-ctl router list` shows it");
    }
    let id = match id {
        Some(i) => i,
        None => new_uuid()?,
    };
    apply_text(&format!("[[router]]\nid = \"{id}\"\nname = \"{name}\"\n"))
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

/// Applies `change` to the text of the router's current definition.
fn change(router: &str, f: impl FnOnce(&RouterState, &mut String) -> Result<()>) -> Result<Router> {
    let st = find(router)?;
    let mut text = definition_of(&st);
    f(&st, &mut text)?;
    apply_text(&text)
}

pub fn add_subnet(
    router: &str,
    subnet: &str,
    gateway: &str,
    port_id: Option<String>,
) -> Result<Router> {
    let port = match port_id {
        Some(p) => p,
        None => new_uuid()?,
    };
    change(router, |st, t| {
        // A port the router has already gets one more fixed IP (a dual-stack port).
        if st.interfaces.iter().any(|i| i.port_id == port) {
            let mut st = st.clone();
            for i in st.interfaces.iter_mut().filter(|i| i.port_id == port) {
                i.fixed_ips.push(AddrState {
                    subnet: subnet.to_string(),
                    gateway_ip: gateway.to_string(),
                    added: false,
                });
            }
            *t = definition_of(&st);
        } else {
            *t += &format!("[[router.interface]]\nport_id = \"{port}\"\nsubnet = \"{subnet}\"\ngateway_ip = \"{gateway}\"\n");
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

pub fn remove_subnet(router: &str, subnet: &str) -> Result<Router> {
    change(router, |st, t| {
        let mut st = st.clone();
        let subnet = canonical(subnet);
        let before: usize = st.interfaces.iter().map(|i| i.fixed_ips.len()).sum();
        for i in st.interfaces.iter_mut() {
            i.fixed_ips.retain(|f| f.subnet != subnet);
        }
        // A port left without any subnet goes, as Neutron's router port does.
        st.interfaces.retain(|i| !i.fixed_ips.is_empty());
        let after: usize = st.interfaces.iter().map(|i| i.fixed_ips.len()).sum();
        if after == before {
            bail!("router {}: no interface on subnet {subnet}", st.name);
        }
        *t = definition_of(&st);
        Ok(())
    })
}

pub fn add_route(router: &str, route: &str) -> Result<Router> {
    let (d, g) = parse_route(route)?;
    change(router, |_, t| {
        *t += &format!("[[router.route]]\ndestination = \"{d}\"\nnexthop = \"{g}\"\n");
        Ok(())
    })
}

pub fn remove_route(router: &str, route: &str) -> Result<Router> {
    let (d, g) = parse_route(route)?;
    let (d, g) = (canonical(&d), canonical(&g));
    change(router, |st, t| {
        let mut st = st.clone();
        let before = st.routes.len();
        st.routes
            .retain(|r| !(r.destination == d && r.nexthop == g));
        if st.routes.len() == before {
            bail!("router {}: no route to {d} via {g}", st.name);
        }
        *t = definition_of(&st);
        Ok(())
    })
}

//! The openstack-style verbs (`router-ctl router create|delete|list|show`, `router add|remove
//! subnet|route`): each one turns the router's current definition into a new one and applies it
//! through the same validation and apply as a definitions file, so a refused change changes
//! nothing.

use anyhow::{anyhow, bail, Context as _, Result};

use std::net::IpAddr;

use crate::{
    apply,
    config::{self, IpNet, Router},
    state::{AddrState, RouterState},
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
    for i in &st.interfaces {
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
    for r in &st.routes {
        t += &format!(
            "[[router.route]]\ndestination = \"{}\"\nnexthop = \"{}\"\n",
            r.destination, r.nexthop
        );
    }
    t
}

fn apply_text(text: &str) -> Result<Router> {
    let routers = config::parse(text)?;
    apply::apply(&routers)?;
    Ok(routers.into_iter().next().expect("one router"))
}

pub fn create(name: &str, id: Option<String>) -> Result<Router> {
    if RouterState::all()?.iter().any(|r| r.name == name) {
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
    let st = RouterState::find(router)?;
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

//! The local routers' live views: `show`, `stats`, `neigh`, `nat`, and the `router show`
//! table of a router applied here.

use anyhow::Result;
use serde_json::json;

use router_ctl::{
    config::fmt_mac,
    live,
    state::{self, RouterState},
    table::Table,
};

use super::json::{floating_ips_json, gateway_json, print_json};

pub fn selected(router: &Option<String>) -> Result<Vec<RouterState>> {
    match router {
        Some(k) => Ok(vec![RouterState::find(k)?]),
        None => RouterState::all(),
    }
}

/// As `selected`, for readers of a router's maps: a lost router has none (an error when it
/// was asked for by name, left out of a listing).
pub fn selected_live(router: &Option<String>) -> Result<Vec<RouterState>> {
    let all = selected(router)?;
    if let (Some(k), [r]) = (router, &all[..]) {
        if let Some(why) = &r.lost {
            anyhow::bail!("router {k} has no fast path: {why}");
        }
    }
    Ok(all.into_iter().filter(|r| r.lost.is_none()).collect())
}

/// `openstack router show` style: a Field | Value table.
pub fn router_table(r: &RouterState, json_out: bool) -> Result<()> {
    let modes = router_ctl::ra::modes(r);
    let mode = |dev: &str, subnet| modes.get(&(dev.to_string(), subnet)).map(|m| m.as_str());
    let interfaces: Vec<String> = r
        .interfaces
        .iter()
        .flat_map(|i| {
            i.fixed_ips.iter().map(|f| {
                let ra = mode(&i.device, f.subnet)
                    .map(|m| format!(" ipv6_ra_mode={m}"))
                    .unwrap_or_default();
                format!(
                    "{} {} {} {}{ra}",
                    i.port_id, i.device, f.subnet, f.gateway_ip
                )
            })
        })
        .collect();
    let ra = router_ctl::ra::counters(&r.id);
    let routes: Vec<String> = r
        .routes
        .iter()
        .map(|x| format!("destination='{}', gateway='{}'", x.destination, x.nexthop))
        .collect();
    if json_out {
        print_json(json!({
            "id": r.id, "name": r.name, "status": health(r).0, "problems": health(r).1, "namespace": r.namespace,
            "interfaces_info": r.interfaces.iter().flat_map(|i| i.fixed_ips.iter().map(|f| json!({"port_id": i.port_id, "device": i.device, "subnet": f.subnet, "ip_address": f.gateway_ip, "ipv6_ra_mode": mode(&i.device, f.subnet)}))).collect::<Vec<_>>(),
            "router_advertisements": ra.iter().map(|(d, c)| (d.clone(), json!({"sent": c.sent, "solicitations_answered": c.solicited}))).collect::<serde_json::Map<_, _>>(),
            "routes": r.routes.iter().filter(|x| !x.gateway).map(|x| json!({"destination": x.destination, "nexthop": x.nexthop})).collect::<Vec<_>>(),
            "external_gateway_info": gateway_json(r),
            "floating_ips": floating_ips_json(r),
        }));
        return Ok(());
    }
    let mut t = Table::new(&["Field", "Value"]);
    t.row(vec!["id".into(), r.id.clone()]);
    t.row(vec!["name".into(), r.name.clone()]);
    let (status, problems) = health(r);
    t.row(vec!["status".into(), status.into()]);
    if !problems.is_empty() {
        t.row(vec!["problems".into(), problems.join("; ")]);
    }
    t.row(vec!["namespace".into(), r.namespace.clone()]);
    t.row(vec!["interfaces_info".into(), interfaces.join("; ")]);
    if !ra.is_empty() {
        let v: Vec<String> = ra
            .iter()
            .map(|(d, c)| {
                format!(
                    "{d}: {} sent, {} solicitations answered",
                    c.sent, c.solicited
                )
            })
            .collect();
        t.row(vec!["router_advertisements".into(), v.join("; ")]);
    }
    t.row(vec!["routes".into(), routes.join("; ")]);
    if let Some(g) = &r.gateway {
        let ips: Vec<String> = r
            .interfaces
            .iter()
            .filter(|i| i.external)
            .flat_map(|i| {
                i.fixed_ips
                    .iter()
                    .map(|f| format!("subnet='{}', ip_address='{}'", f.subnet, f.gateway_ip))
            })
            .collect();
        t.row(vec![
            "external_gateway_info".into(),
            format!(
                "network_id='{}', port_id='{}', enable_snat='{}', external_fixed_ips=[{}]",
                g.network_id.as_deref().unwrap_or(""),
                g.port_id,
                g.enable_snat,
                ips.join("; ")
            ),
        ]);
        let f: Vec<String> = g
            .floating_ips
            .iter()
            .map(|f| {
                format!(
                    "{} → {}",
                    f.floating_ip_address,
                    f.fixed_ip_address
                        .map(|x| x.to_string())
                        .unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        t.row(vec!["floating_ips".into(), f.join("; ")]);
    }
    print!("{}", t.render());
    Ok(())
}

/// ACTIVE, DEGRADED or LOST (see `live::health`), and why.
pub fn health(r: &RouterState) -> (&'static str, Vec<String>) {
    let (h, why) = live::health(r);
    (h.as_str(), why)
}

pub fn show(routers: &[RouterState], json_out: bool) -> Result<()> {
    let views: Vec<live::Router> = routers.iter().map(live::router).collect::<Result<_>>()?;
    if json_out {
        let v: Vec<_> = views
            .iter()
            .map(|v| {
                let r = &v.state;
                json!({
                    "id": r.id, "name": r.name, "namespace": r.namespace,
                    "status": v.health.as_str(), "problems": v.problems,
                    "followed": r.followed,
                    "ha_port": r.ha_port, "ha_state": r.ha_role(),
                    "interfaces": v.devices.iter().map(|d| {
                        let i = &d.iface;
                        json!({
                            "port_id": i.port_id, "device": i.device, "ifindex": i.ifindex, "mac": i.mac_text(),
                            "mtu": i.mtu, "kind": i.kind,
                            "hook": d.hook, "hook_wanted": i.hook, "hook_reason": i.hook_reason,
                            "prog_id": d.prog_id,
                            "redirect": {"tc": d.redirect_tc, "xdp": d.redirect_xdp},
                            "fixed_ips": i.fixed_ips.iter().map(|f| json!({"subnet": f.subnet, "ip_address": f.gateway_ip})).collect::<Vec<_>>(),
                            "created": i.created_device, "peer": i.peer,
                        })
                    }).collect::<Vec<_>>(),
                    "routes": r.routes.iter().map(|rt| json!({
                        "destination": rt.destination, "nexthop": rt.nexthop, "device": rt.device,
                        "external_gateway": rt.gateway,
                    })).collect::<Vec<_>>(),
                    "external_gateway": gateway_json(r),
                    "floating_ips": floating_ips_json(r),
                    "filter": v.filter.as_ref().map(|f| json!({
                        "guarded": f.guarded,
                        "rules": f.rules.chains,
                        "legacy_tables": f.rules.legacy,
                    })),
                    "kernel_policy": v.policy.iter()
                        .filter(|(_, p)| !p.v4.is_empty() || !p.v6.is_empty())
                        .map(|(d, p)| (d.clone(), json!({"ipv4": p.v4, "ipv6": p.v6})))
                        .collect::<serde_json::Map<_, _>>(),
                    "kernel_routes": r.kernel_routes.iter().map(|k| json!({
                        "destination": k.destination, "what": k.what,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(json!(v));
        return Ok(());
    }
    if routers.is_empty() {
        println!("no routers applied");
    }
    for v in &views {
        let r = &v.state;
        println!(
            "router {} ({})  namespace {}  {}{}",
            r.id,
            r.name,
            r.namespace,
            v.health.as_str(),
            if r.followed {
                "  followed (read from the namespace)"
            } else {
                ""
            }
        );
        for p in &v.problems {
            println!("  problem: {p}");
        }
        if let (Some(port), Some(role)) = (&r.ha_port, r.ha_role()) {
            println!(
                "  HA port {port}: {role} ({})",
                match role {
                    "active" => "keepalived holds the router's addresses here",
                    _ => "the router's addresses are on another host: nothing to forward",
                }
            );
        }
        let mut t = Table::new(&[
            "DEVICE", "IFINDEX", "MAC", "MTU", "ADDRESS", "SUBNET", "HOOK", "REDIRECT", "PEER",
        ]);
        for d in &v.devices {
            let i = &d.iface;
            let all = |f: fn(&state::AddrState) -> String| {
                i.fixed_ips.iter().map(f).collect::<Vec<_>>().join(",")
            };
            t.row(vec![
                i.device.clone(),
                i.ifindex.to_string(),
                i.mac_text(),
                i.mtu.to_string(),
                all(|f| f.cidr()),
                all(|f| f.subnet.to_string()),
                d.hook.into(),
                match (d.redirect_tc, d.redirect_xdp) {
                    (true, true) => "tc,xdp",
                    (true, false) => "tc",
                    (false, true) => "xdp",
                    (false, false) => "none",
                }
                .into(),
                i.peer.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        print!("{}", t.render());
        for i in &r.interfaces {
            println!("  {}: {}", i.device, i.hook_reason);
        }
        if let Some(f) = &v.filter {
            match (f.guarded, f.rules.is_empty()) {
                (true, _) if !f.rules.legacy.is_empty() => println!(
                    "  filter: guarded, the kernel forwards everything (legacy iptables changes cannot be followed): {}",
                    f.rules.describe()
                ),
                (true, _) => println!(
                    "  filter: guarded, the fast path carries only flows the kernel forwarded both ways under the rules (IPv4): {}",
                    f.rules.describe()
                ),
                (false, true) => println!("  filter: none on the forwarding path"),
                (false, false) => println!(
                    "  filter: rules present but not yet followed (the daemon guards within milliseconds): {}",
                    f.rules.describe()
                ),
            }
        }
        for (dev, p) in &v.policy {
            for (family, why) in [("IPv4", &p.v4), ("IPv6", &p.v6)] {
                if !why.is_empty() {
                    println!("  {dev}: {family} left to the kernel: {}", why.join("; "));
                }
            }
        }
        for k in &r.kernel_routes {
            println!("  route {} left to the kernel: {}", k.destination, k.what);
        }
        if let Some(g) = &r.gateway {
            println!(
                "  external gateway: port {} ({}) network {} snat {}  upstream {}",
                g.port_id,
                g.device,
                g.network_id.as_deref().unwrap_or("-"),
                if g.enable_snat { "on" } else { "off" },
                if g.upstreams.is_empty() {
                    "-".to_string()
                } else {
                    g.upstreams
                        .iter()
                        .map(|u| u.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                }
            );
            for f in &g.floating_ips {
                println!(
                    "  floating IP {} → {}",
                    f.floating_ip_address,
                    f.fixed_ip_address
                        .map(|x| x.to_string())
                        .unwrap_or_else(|| "(not associated)".into())
                );
            }
        }
        if !r.routes.is_empty() {
            let mut t = Table::new(&["DESTINATION", "NEXTHOP", "DEVICE"]);
            for rt in &r.routes {
                t.row(vec![
                    rt.destination.to_string(),
                    rt.nexthop.to_string(),
                    rt.device.clone(),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(())
}

pub fn nat_flows(routers: &[RouterState], json_out: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in routers {
        for f in live::nat_flows(r)? {
            rows.push((r, f));
        }
    }
    if json_out {
        print_json(json!(rows
            .iter()
            .map(|(r, f)| json!({"router": r.name, "router_id": r.id, "source": f.source, "proto": f.proto, "from": f.from, "to": f.to, "translated": f.translated, "idle_s": f.idle_s}))
            .collect::<Vec<_>>()));
        return Ok(());
    }
    let mut t = Table::new(&[
        "ROUTER",
        "SOURCE",
        "PROTO",
        "FROM",
        "TO",
        "TRANSLATED",
        "IDLE",
    ]);
    for (r, f) in &rows {
        t.row(vec![
            r.name.clone(),
            f.source.into(),
            f.proto.into(),
            f.from.clone(),
            f.to.clone(),
            f.translated.into(),
            f.idle_s
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

pub fn stats(routers: &[RouterState], json_out: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in routers {
        for c in live::counters(r)? {
            rows.push((r, c));
        }
    }
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, c)| {
                let s = &c.stats;
                let reasons: serde_json::Map<String, serde_json::Value> =
                    c.reasons().map(|(n, p)| (n.to_string(), json!(p))).collect();
                let (p4, b4) = c.ipv4();
                json!({
                    "router": r.name, "router_id": r.id, "device": c.device, "ifindex": c.ifindex,
                    "forwarded": {
                        "packets": s.fwd_packets, "bytes": s.fwd_bytes,
                        "ipv4": {"packets": p4, "bytes": b4},
                        "ipv6": {"packets": s.fwd6_packets, "bytes": s.fwd6_bytes},
                    },
                    "passed": {"packets": s.pass_packets(), "bytes": s.pass_bytes, "reasons": reasons},
                    "dropped": {"packets": s.drop_packets},
                    "nat": {"source_translated": s.nat_src_packets, "destination_translated": s.nat_dst_packets},
                })
            })
            .collect();
        print_json(json!(v));
        return Ok(());
    }
    let mut t = Table::new(&[
        "ROUTER",
        "DEVICE",
        "FWD_PKTS",
        "FWD4_PKTS",
        "FWD6_PKTS",
        "FWD_BYTES",
        "PASS_PKTS",
        "PASS_BYTES",
        "DROPPED",
        "SNAT_PKTS",
        "DNAT_PKTS",
        "PASS_REASONS",
    ]);
    for (r, c) in &rows {
        let s = &c.stats;
        let reasons: Vec<String> = c
            .reasons()
            .filter(|(_, n)| *n > 0)
            .map(|(n, p)| format!("{n}={p}"))
            .collect();
        t.row(vec![
            r.name.clone(),
            c.device.clone(),
            s.fwd_packets.to_string(),
            c.ipv4().0.to_string(),
            s.fwd6_packets.to_string(),
            s.fwd_bytes.to_string(),
            s.pass_packets().to_string(),
            s.pass_bytes.to_string(),
            s.drop_packets.to_string(),
            s.nat_src_packets.to_string(),
            s.nat_dst_packets.to_string(),
            if reasons.is_empty() {
                "-".into()
            } else {
                reasons.join(",")
            },
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

pub fn neigh(routers: &[RouterState], json_out: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in routers {
        for (dev, addr, mac) in live::neighbours(r)? {
            rows.push((r.name.clone(), r.id.clone(), dev, addr, fmt_mac(&mac)));
        }
    }
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, id, d, a, m)| json!({"router": n, "router_id": id, "device": d, "dst": a.to_string(), "lladdr": m}))
            .collect();
        print_json(json!(v));
        return Ok(());
    }
    let mut t = Table::new(&["ROUTER", "DEVICE", "ADDRESS", "LLADDR"]);
    for (n, _, d, a, m) in rows {
        t.row(vec![n, d, a.to_string(), m]);
    }
    print!("{}", t.render());
    Ok(())
}

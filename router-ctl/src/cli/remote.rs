//! The views of etcd (`--etcd`): `router list`, `router show` and `agent list`.

use anyhow::{Context as _, Result};
use serde_json::json;

use router_ctl::table::Table;

use super::json::{floating_ips_json, gateway_json, print_json};

/// Per host of a router in etcd: (host, alive, role, generation applied, error).
fn placements(
    o: &router_ctl::agent::store::Overview,
    id: &str,
) -> Vec<(String, bool, String, i64, Option<String>)> {
    let hosts = o
        .schedule
        .get(id)
        .map(|s| s.hosts.clone())
        .unwrap_or_default();
    hosts
        .into_iter()
        .map(|h| {
            let st = o.status.get(&(id.to_string(), h.clone()));
            let alive = o.agents.contains_key(&h);
            let role = match st {
                Some(s) => s.role.to_string(),
                None if alive => "pending".into(),
                None => "down".into(),
            };
            (
                h,
                alive,
                role,
                st.map(|s| s.generation).unwrap_or(0),
                st.and_then(|s| s.error.clone()),
            )
        })
        .collect()
}

/// A router's overall status from etcd: ACTIVE when every host applied the current
/// definition (and an HA router has an active host), BUILD while one has not yet, ERROR when a
/// host could not, DOWN when none runs it.
fn remote_status(
    o: &router_ctl::agent::store::Overview,
    id: &str,
    rev: i64,
    ha: bool,
) -> &'static str {
    let p = placements(o, id);
    if p.iter().any(|x| x.2 == "error") {
        "ERROR"
    } else if p.iter().all(|x| !x.1) {
        "DOWN"
    } else if p.iter().filter(|x| x.1).any(|x| x.3 != rev) || (ha && !o.active.contains_key(id)) {
        "BUILD"
    } else {
        "ACTIVE"
    }
}

pub fn remote_router_list(s: &router_ctl::agent::store::Store, json_out: bool) -> Result<()> {
    let o = s.overview()?;
    if json_out {
        let mut v: Vec<serde_json::Value> = o.routers.iter().map(|(r, rev)| json!({
            "id": r.id, "name": r.name, "ha": r.ha, "generation": rev,
            "status": remote_status(&o, &r.id, *rev, r.ha),
            "hosts": placements(&o, &r.id).iter().map(|(h, alive, role, g, e)| json!({"host": h, "alive": alive, "role": role, "generation": g, "error": e})).collect::<Vec<_>>(),
        })).collect();
        v.extend(o.invalid.iter().map(|(id, rev, why)| json!({
            "id": id, "generation": rev, "status": "ERROR", "error": format!("the definition does not validate: {why}"),
            "hosts": placements(&o, id).iter().map(|(h, alive, role, g, e)| json!({"host": h, "alive": alive, "role": role, "generation": g, "error": e})).collect::<Vec<_>>(),
        })));
        print_json(json!(v));
        return Ok(());
    }
    for (id, rev, why) in &o.invalid {
        eprintln!("router {id}: the definition at revision {rev} does not validate ({why}); its hosts keep the last good one; write a valid one (e.g. with etcdctl) to fix it");
    }
    let mut t = Table::new(&["ID", "Name", "Status", "HA", "Hosts"]);
    for (r, rev) in &o.routers {
        let hosts: Vec<String> = placements(&o, &r.id)
            .iter()
            .map(|(h, _, role, _, _)| format!("{h} ({role})"))
            .collect();
        t.row(vec![
            r.id.clone(),
            r.name.clone(),
            remote_status(&o, &r.id, *rev, r.ha).into(),
            if r.ha { "True" } else { "False" }.into(),
            hosts.join(", "),
        ]);
    }
    for (id, _, _) in &o.invalid {
        let hosts: Vec<String> = placements(&o, id)
            .iter()
            .map(|(h, _, role, _, _)| format!("{h} ({role})"))
            .collect();
        t.row(vec![
            id.clone(),
            "?".into(),
            "ERROR".into(),
            "?".into(),
            hosts.join(", "),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

pub fn remote_router_table(
    s: &router_ctl::agent::store::Store,
    key: &str,
    json_out: bool,
) -> Result<()> {
    let st = s.find(key)?;
    let o = s.overview()?;
    let rev = o
        .routers
        .iter()
        .find(|(r, _)| r.id == st.id)
        .map(|x| x.1)
        .unwrap_or(0);
    let p = placements(&o, &st.id);
    if json_out {
        print_json(json!({
            "id": st.id, "name": st.name, "ha": st.ha, "generation": rev,
            "status": remote_status(&o, &st.id, rev, st.ha),
            "active_host": o.active.get(&st.id),
            "hosts": p.iter().map(|(h, alive, role, g, e)| json!({"host": h, "alive": alive, "role": role, "generation": g, "error": e})).collect::<Vec<_>>(),
            "interfaces_info": st.interfaces.iter().flat_map(|i| i.fixed_ips.iter().map(|f| json!({"port_id": i.port_id, "device": i.device, "subnet": f.subnet, "ip_address": f.gateway_ip}))).collect::<Vec<_>>(),
            "routes": st.routes.iter().map(|x| json!({"destination": x.destination, "nexthop": x.nexthop})).collect::<Vec<_>>(),
            "external_gateway_info": gateway_json(&st),
            "floating_ips": floating_ips_json(&st),
        }));
        return Ok(());
    }
    let mut t = Table::new(&["Field", "Value"]);
    t.row(vec!["id".into(), st.id.clone()]);
    t.row(vec!["name".into(), st.name.clone()]);
    t.row(vec![
        "status".into(),
        remote_status(&o, &st.id, rev, st.ha).into(),
    ]);
    t.row(vec![
        "ha".into(),
        if st.ha { "True" } else { "False" }.into(),
    ]);
    t.row(vec!["generation".into(), rev.to_string()]);
    let hosts: Vec<String> = p
        .iter()
        .map(|(h, alive, role, g, e)| {
            format!(
                "{h}: {role}{}, generation {g}{}",
                if *alive { "" } else { " (agent down)" },
                e.as_ref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    t.row(vec!["hosts".into(), hosts.join("; ")]);
    let interfaces: Vec<String> = st
        .interfaces
        .iter()
        .flat_map(|i| {
            i.fixed_ips
                .iter()
                .map(|f| format!("{} {} {} {}", i.port_id, i.device, f.subnet, f.gateway_ip))
        })
        .collect();
    t.row(vec!["interfaces_info".into(), interfaces.join("; ")]);
    let routes: Vec<String> = st
        .routes
        .iter()
        .map(|x| format!("destination='{}', gateway='{}'", x.destination, x.nexthop))
        .collect();
    t.row(vec!["routes".into(), routes.join("; ")]);
    print!("{}", t.render());
    Ok(())
}

/// `agent list`: like `openstack network agent list` (host, alive, routers).
pub fn agent_list(etcd: Option<&router_ctl::agent::access::Access>, json_out: bool) -> Result<()> {
    let access =
        etcd.context("agent list reads etcd: give --etcd URLS (or set ROUTER_XDP_ETCD)")?;
    let s = router_ctl::agent::store::Store::connect(access)?;
    let o = s.overview()?;
    let mut hosts = o.hosts.clone();
    hosts.extend(o.agents.keys().cloned());
    let rows: Vec<(String, bool, usize, usize, Option<u32>)> = hosts
        .iter()
        .map(|h| {
            let n = o.schedule.values().filter(|s| s.hosts.contains(h)).count();
            let active = o.active.values().filter(|a| *a == h).count();
            (
                h.clone(),
                o.agents.contains_key(h),
                n,
                active,
                o.agents.get(h).map(|a| a.pid),
            )
        })
        .collect();
    if json_out {
        print_json(json!(rows.iter().map(|(h, alive, n, a, pid)| json!({"host": h, "agent_type": "L3 agent", "alive": alive, "routers": n, "ha_active": a, "pid": pid})).collect::<Vec<_>>()));
        return Ok(());
    }
    let mut t = Table::new(&[
        "Agent Type",
        "Host",
        "Alive",
        "State",
        "Routers",
        "HA Active",
    ]);
    for (h, alive, n, a, _) in &rows {
        t.row(vec![
            "L3 agent".into(),
            h.clone(),
            if *alive { ":-)" } else { "XXX" }.into(),
            "UP".into(),
            n.to_string(),
            a.to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

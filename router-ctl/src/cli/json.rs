//! The JSON shapes the local and the etcd views share, and how JSON is printed.

use serde_json::json;

use router_ctl::state::RouterState;

pub fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
}

pub fn gateway_json(r: &RouterState) -> serde_json::Value {
    match &r.gateway {
        None => serde_json::Value::Null,
        Some(g) => {
            let qg = r.interfaces.iter().find(|i| i.external);
            json!({
                "network_id": g.network_id, "port_id": g.port_id, "device": g.device,
                "enable_snat": g.enable_snat, "upstreams": g.upstreams,
                "external_fixed_ips": qg.map(|i| i.fixed_ips.iter().map(|f| json!({"subnet": f.subnet, "ip_address": f.gateway_ip})).collect::<Vec<_>>()),
            })
        }
    }
}

pub fn floating_ips_json(r: &RouterState) -> Vec<serde_json::Value> {
    r.gateway
        .iter()
        .flat_map(|g| g.floating_ips.iter())
        .map(|f| json!({
            "floating_ip_address": f.floating_ip_address, "fixed_ip_address": f.fixed_ip_address,
            "router_id": r.id, "router": r.name,
            "status": if f.fixed_ip_address.is_some() { "ACTIVE" } else { "DOWN" },
        }))
        .collect()
}

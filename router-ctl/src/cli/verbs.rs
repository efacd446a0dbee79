//! The openstack-style verbs (`router …`, `floating ip …`) and `route batch`: each sends its
//! change where it runs (`api::dispatch`) and prints the result.

use anyhow::{Context as _, Result};
use serde_json::json;

use router_ctl::{
    daemon,
    state::{self, Lock, RouterState},
    table::Table,
    verbs::Target,
};

use super::{
    json::{floating_ips_json, print_json},
    remote::{remote_router_list, remote_router_table},
    show::{health, router_table},
    AddCmd, FipCmd, Format, RemoveCmd, RouterCmd,
};

/// `route batch`: through the daemon when one runs (it keeps large tables in memory), else here.
pub fn route_batch(router: String, file: &std::path::Path, json: bool) -> Result<()> {
    use router_ctl::api::{self, Request};
    use std::io::Read as _;
    // The batch's text goes to the daemon over its socket (it opens no file a client names);
    // a file is streamed, standard input first read here.
    let (name, len, text) = if file == std::path::Path::new("-") {
        let mut b = Vec::new();
        std::io::stdin()
            .lock()
            .take(api::MAX_BATCH + 1)
            .read_to_end(&mut b)
            .context("cannot read standard input")?;
        (
            "standard input".to_string(),
            b.len() as u64,
            api::BatchText::Bytes(b),
        )
    } else {
        let name = file.display().to_string();
        let len = std::fs::metadata(file)
            .with_context(|| format!("cannot open {name}"))?
            .len();
        (name, len, api::BatchText::File(file.to_path_buf()))
    };
    if len > api::MAX_BATCH {
        anyhow::bail!(
            "{name}: a route batch is at most {} bytes; split it",
            api::MAX_BATCH
        );
    }
    let req = Request::RouteBatch {
        router,
        name,
        len,
        text,
    };
    let out = api::dispatch(Target::Here, req);
    let v: serde_json::Value = serde_json::from_str(&out?)?;
    if json {
        println!("{v}");
    } else {
        let mut t = Table::new(&["Field", "Value"]);
        for k in ["router", "set", "deleted", "prefixes"] {
            t.row(vec![
                k.to_string(),
                v[k].to_string().trim_matches('"').to_string(),
            ]);
        }
        print!("{}", t.render());
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Through the daemon when one runs, else here; then the daemon is made sure of.
fn change_applied(t: Target, req: router_ctl::api::Request) -> Result<String> {
    use router_ctl::api;
    let id = api::dispatch(t, req)?;
    // Against etcd, or for a member of the API group (whose change the running daemon just
    // made): nothing to make sure of here.
    if matches!(t, Target::Etcd(_)) || !is_root() {
        return Ok(id);
    }
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    daemon::ensure_running()?;
    Ok(id)
}

pub fn floating_verb(t: Target, cmd: FipCmd, json_flag: bool) -> Result<()> {
    use router_ctl::api::Request;
    let json_of = |f: Format| json_flag || matches!(f, Format::Json);
    let show_one = |fip: &str, router: Option<&str>, f: Format| -> Result<()> {
        let (st, _) = router_ctl::verbs::find_floating_ip(t, fip, router)?;
        let fip = fip
            .parse::<std::net::IpAddr>()
            .map(|a| a.to_string())
            .unwrap_or(fip.to_string());
        let v = floating_ips_json(&st)
            .into_iter()
            .find(|v| v["floating_ip_address"] == fip.as_str())
            .expect("found above");
        if json_of(f) {
            print_json(v);
        } else {
            let mut t = Table::new(&["Field", "Value"]);
            for k in [
                "floating_ip_address",
                "fixed_ip_address",
                "router_id",
                "router",
                "status",
            ] {
                t.row(vec![k.into(), v[k].as_str().unwrap_or("None").to_string()]);
            }
            print!("{}", t.render());
        }
        Ok(())
    };
    match cmd {
        FipCmd::Create {
            router,
            floating_ip_address,
            fixed_ip_address,
            format,
        } => {
            let id = change_applied(
                t,
                Request::CreateFloatingIp {
                    router,
                    floating_ip_address: floating_ip_address.clone(),
                    fixed_ip_address,
                },
            )?;
            show_one(&floating_ip_address, Some(&id), format)
        }
        FipCmd::Set {
            floating_ip,
            router,
            fixed_ip_address,
            format,
        } => {
            let id = change_applied(
                t,
                Request::SetFloatingIp {
                    floating_ip_address: floating_ip.clone(),
                    router,
                    fixed_ip_address: Some(fixed_ip_address),
                },
            )?;
            show_one(&floating_ip, Some(&id), format)
        }
        FipCmd::Unset {
            floating_ip,
            router,
            format,
        } => {
            let id = change_applied(
                t,
                Request::SetFloatingIp {
                    floating_ip_address: floating_ip.clone(),
                    router,
                    fixed_ip_address: None,
                },
            )?;
            show_one(&floating_ip, Some(&id), format)
        }
        FipCmd::Delete {
            floating_ip,
            router,
        } => {
            change_applied(
                t,
                Request::DeleteFloatingIp {
                    floating_ip_address: floating_ip.clone(),
                    router,
                },
            )?;
            if json_flag {
                print_json(json!({"floating_ip_address": floating_ip, "deleted": true}));
            } else {
                println!("floating IP {floating_ip} deleted");
            }
            Ok(())
        }
        FipCmd::Show {
            floating_ip,
            router,
            format,
        } => show_one(&floating_ip, router.as_deref(), format),
        FipCmd::List { format } => {
            let all: Vec<serde_json::Value> = router_ctl::verbs::all(t)?
                .iter()
                .flat_map(floating_ips_json)
                .collect();
            if json_of(format) {
                print_json(json!(all));
            } else {
                let mut t = Table::new(&[
                    "Floating IP Address",
                    "Fixed IP Address",
                    "Router",
                    "Status",
                ]);
                for v in &all {
                    t.row(vec![
                        v["floating_ip_address"].as_str().unwrap_or("").into(),
                        v["fixed_ip_address"].as_str().unwrap_or("None").into(),
                        v["router"].as_str().unwrap_or("").into(),
                        v["status"].as_str().unwrap_or("").into(),
                    ]);
                }
                print!("{}", t.render());
            }
            Ok(())
        }
    }
}

/// The verbs serialise with apply and destroy through the state lock; each one ends by making
/// sure the neighbour daemon runs.
pub fn router_verb(t: Target, cmd: RouterCmd, json_flag: bool) -> Result<()> {
    use router_ctl::verbs;
    let json_of = |f: Format| json_flag || matches!(f, Format::Json);
    use router_ctl::api::{self, Request};
    let remote = match t {
        Target::Etcd(s) => Some(s),
        Target::Here => None,
    };
    let change = |req| api::dispatch(t, req);
    let after = |id: String, f: Format| -> Result<()> {
        if let Some(s) = remote {
            return remote_router_table(s, &id, json_of(f));
        }
        if is_root() {
            let _lock = Lock::acquire(state::STATE_LOCK)?;
            daemon::ensure_running()?;
        }
        router_table(&RouterState::find(&id)?, json_of(f))
    };
    match cmd {
        RouterCmd::Create {
            name,
            id,
            ha,
            format,
        } => {
            if ha && remote.is_none() {
                anyhow::bail!("router create --ha: HA routers are scheduled by the etcd agents; give --etcd URLS");
            }
            let id = if ha {
                verbs::create_ha(t, &name, id, true)?.id
            } else {
                change(Request::Create { name, id })?
            };
            after(id, format)
        }
        RouterCmd::List { format } if remote.is_some() => {
            remote_router_list(remote.expect("remote"), json_of(format))
        }
        RouterCmd::Show { router, format } if remote.is_some() => {
            remote_router_table(remote.expect("remote"), &router, json_of(format))
        }
        RouterCmd::Delete { router } => {
            let id = change(Request::Delete {
                router: router.clone(),
            })?;
            println!("router {router} ({id}) deleted");
            Ok(())
        }
        RouterCmd::List { format } => {
            let all = RouterState::all()?;
            if json_of(format) {
                print_json(json!(all.iter().map(|r| json!({"id": r.id, "name": r.name, "status": health(r).0, "interfaces": r.interfaces.len(), "routes": r.routes.len()})).collect::<Vec<_>>()));
            } else {
                let mut t = Table::new(&["ID", "Name", "Status", "Interfaces", "Routes"]);
                for r in &all {
                    t.row(vec![
                        r.id.clone(),
                        r.name.clone(),
                        health(r).0.into(),
                        r.interfaces.len().to_string(),
                        r.routes.len().to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
            Ok(())
        }
        RouterCmd::Show { router, format } => {
            router_table(&RouterState::find(&router)?, json_of(format))
        }
        RouterCmd::Add {
            what:
                AddCmd::Subnet {
                    router,
                    subnet,
                    gateway,
                    port_id,
                    ipv6_ra_mode,
                    ipv6_address_mode,
                },
        } => after(
            change(Request::AddSubnet {
                router,
                subnet,
                gateway,
                port_id,
                ipv6_ra_mode,
                ipv6_address_mode,
            })?,
            Format::Table,
        ),
        RouterCmd::Add {
            what: AddCmd::Route { router, route },
        } => {
            verbs::parse_route(&route)?;
            after(change(Request::AddRoute { router, route })?, Format::Table)
        }
        RouterCmd::Remove {
            what: RemoveCmd::Subnet { router, subnet },
        } => after(
            change(Request::RemoveSubnet { router, subnet })?,
            Format::Table,
        ),
        RouterCmd::Set {
            router,
            external_gateway,
            port_id,
            fixed_ip,
            enable_snat,
            disable_snat,
            format,
        } => {
            for f in &fixed_ip {
                verbs::parse_fixed_ip(f)?;
            }
            let snat = match (enable_snat, disable_snat) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            after(
                change(Request::SetGateway {
                    router,
                    network: external_gateway,
                    port_id,
                    fixed_ips: fixed_ip,
                    enable_snat: snat,
                })?,
                format,
            )
        }
        RouterCmd::Unset { router, .. } => {
            after(change(Request::UnsetGateway { router })?, Format::Table)
        }
        RouterCmd::Remove {
            what: RemoveCmd::Route { router, route },
        } => {
            verbs::parse_route(&route)?;
            after(
                change(Request::RemoveRoute { router, route })?,
                Format::Table,
            )
        }
    }
}

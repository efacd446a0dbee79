//! The CLI against etcd (`--etcd URL` or `ROUTER_XDP_ETCD`): the verbs read a router's
//! definition from etcd and write the new one back in a transaction that fails if anyone
//! changed it meanwhile; `router list/show` and `agent list` read hosts, roles and status.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use super::{AgentInfo, Elections, Held, Key, Schedule, Status, PREFIX};
use crate::{
    config::{self, Router},
    state::{AddrState, FloatingIpState, GatewayState, IfaceState, RouteState, RouterState},
};

pub struct Store {
    rt: tokio::runtime::Runtime,
    client: std::sync::Mutex<Client>,
    access: super::access::Access,
    /// The revision of each definition read, for the write that follows.
    read: std::sync::Mutex<BTreeMap<String, i64>>,
}

impl Store {
    /// The CLI's connection to etcd, as `access` says (`--etcd` and its credentials).
    pub fn connect(access: &super::access::Access) -> Result<Store> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt.block_on(access.connect(
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)),
            Duration::from_secs(3),
        ))?;
        Ok(Store {
            rt,
            client: std::sync::Mutex::new(client),
            access: access.clone(),
            read: Default::default(),
        })
    }
}

/// Everything the CLI shows about routers and agents.
#[derive(Debug, Default)]
pub struct Overview {
    pub routers: Vec<(Router, i64)>,
    pub schedule: BTreeMap<String, Schedule>,
    pub active: BTreeMap<String, String>,
    /// (router, host) → status.
    pub status: BTreeMap<(String, String), Status>,
    pub agents: BTreeMap<String, AgentInfo>,
    pub hosts: BTreeSet<String>,
    /// Definitions that do not validate here: (id, revision, why). Their hosts keep the last
    /// good one applied.
    pub invalid: Vec<(String, i64, String)>,
}

impl Store {
    fn block<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> Result<T> {
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), f(&mut c)).await })
            .map_err(|_| anyhow!("etcd at {} did not answer within 5 s", self.access.urls()))?
            .map_err(|e| self.access.explain(&e))
    }

    pub fn overview(&self) -> Result<Overview> {
        let r = self.block(async |c| c.get(PREFIX, Some(GetOptions::new().with_prefix())).await)?;
        let mut o = Overview::default();
        let mut elections = Elections::default();
        for kv in r.kvs() {
            let (Ok(key), Ok(val)) = (kv.key_str(), kv.value_str()) else {
                continue;
            };
            let Some(k) = Key::parse(key) else {
                continue;
            };
            let held = Held {
                created: kv.create_revision(),
                lease: kv.lease(),
            };
            if elections.put(k, val, held) {
                continue;
            }
            match k {
                Key::Router(id) => match config::parse(val) {
                    Ok(mut v) if v.len() == 1 && v[0].id == id => {
                        o.routers.push((v.remove(0), kv.mod_revision()))
                    }
                    Ok(_) => o.invalid.push((
                        id.into(),
                        kv.mod_revision(),
                        "the definition is not one router with this id".into(),
                    )),
                    Err(e) => o
                        .invalid
                        .push((id.into(), kv.mod_revision(), e.to_string())),
                },
                Key::Schedule(id) => {
                    if let Ok(s) = serde_json::from_str(val) {
                        o.schedule.insert(id.into(), s);
                    }
                }
                // A status in the host's own keys wins over one an older build wrote.
                Key::Status { host, id } => {
                    if let Ok(s) = serde_json::from_str(val) {
                        o.status.insert((id.into(), host.into()), s);
                    }
                }
                Key::LegacyStatus { id, host } => {
                    if let Ok(s) = serde_json::from_str(val) {
                        o.status.entry((id.into(), host.into())).or_insert(s);
                    }
                }
                Key::Alive(h) | Key::LegacyAgent(h) => {
                    if let Ok(a) = serde_json::from_str(val) {
                        o.agents.insert(h.into(), a);
                    }
                }
                Key::Registered(h) | Key::LegacyHost(h) => {
                    o.hosts.insert(h.into());
                }
                _ => {}
            }
        }
        for (id, s) in &o.schedule {
            if let Some((h, _)) = elections.active(id, &s.hosts) {
                o.active.insert(id.clone(), h.to_string());
            }
        }
        Ok(o)
    }

    /// Every router's definition, as the verbs see routers.
    pub fn all(&self) -> Result<Vec<RouterState>> {
        let o = self.overview()?;
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        Ok(o.routers
            .iter()
            .map(|(r, rev)| {
                read.insert(r.id.clone(), *rev);
                planned(r)
            })
            .collect())
    }

    /// A router by id or name.
    pub fn find(&self, key: &str) -> Result<RouterState> {
        let all = self.all()?;
        let mut m: Vec<RouterState> = all
            .into_iter()
            .filter(|r| r.id == key || r.name == key)
            .collect();
        match m.len() {
            0 => bail!(
                "no router '{key}' in etcd at {}; `router-ctl --etcd {} router list` lists them",
                self.access.urls(),
                self.access.urls()
            ),
            1 => Ok(m.remove(0)),
            _ => bail!("several routers are named '{key}'; use the id"),
        }
    }

    /// Writes one router's definition (validated first): created if new, else replaced only if
    /// nobody changed it since it was read.
    pub fn put(&self, text: &str) -> Result<Router> {
        let r = config::parse(text)?
            .into_iter()
            .next()
            .context("no router in the definition")?;
        let key = super::router_key(&r.id);
        let rev = self
            .read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.id)
            .copied();
        let cmp = match rev {
            Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::put(key, text, None)]);
        let ok = self.block(async |c| c.txn(txn).await)?.succeeded();
        if !ok {
            bail!(
                "router {} was changed (or created) in etcd by someone else meanwhile; nothing written, run the command again",
                r.name
            );
        }
        Ok(r)
    }

    /// Deletes a router's definition; its hosts destroy it.
    pub fn delete(&self, key: &str) -> Result<String> {
        let st = self.find(key)?;
        let rev = self.read.lock().unwrap_or_else(|e| e.into_inner())[&st.id];
        let k = super::router_key(&st.id);
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                rev,
            )])
            .and_then(vec![TxnOp::delete(k, None)]);
        if !self.block(async |c| c.txn(txn).await)?.succeeded() {
            bail!("router {key} was changed in etcd meanwhile; nothing deleted, run the command again");
        }
        Ok(st.id)
    }
}

/// A definition seen as the verbs see an applied router (nothing applied: no devices).
pub fn planned(r: &Router) -> RouterState {
    let addr = |f: &config::FixedIp| AddrState {
        subnet: f.subnet,
        gateway_ip: f.gateway_ip,
        added: false,
    };
    let interfaces = r
        .interfaces
        .iter()
        .map(|i| {
            let mut s = IfaceState::new(
                i.port_id.clone(),
                i.device.clone(),
                i.fixed_ips.iter().map(addr).collect(),
            );
            s.hook = i.hook;
            s.external = i.external;
            s
        })
        .collect();
    let routes = r
        .routes
        .iter()
        .map(|x| RouteState {
            destination: x.destination,
            nexthop: x.nexthop,
            device: r
                .interface_for(x.nexthop)
                .map(|i| i.device.clone())
                .unwrap_or_default(),
            gateway: false,
        })
        .collect();
    let gateway = r.gateway.as_ref().map(|g| GatewayState {
        port_id: g.port_id.clone(),
        device: config::gateway_device_of(&g.port_id),
        network_id: g.network_id.clone(),
        enable_snat: g.enable_snat,
        upstreams: g.upstreams.iter().map(|u| u.gateway_ip).collect(),
        onlink: Vec::new(),
        floating_ips: r
            .floating_ips
            .iter()
            .map(|f| FloatingIpState {
                floating_ip_address: f.floating_ip_address,
                fixed_ip_address: f.fixed_ip_address,
                added: false,
            })
            .collect(),
        sysctls_before: Vec::new(),
    });
    RouterState {
        interfaces,
        routes,
        max_routes: r.max_routes,
        gateway,
        ha: r.ha,
        definition: Some(r.definition()),
        ..RouterState::empty(&r.id, &r.name, &r.namespace())
    }
}

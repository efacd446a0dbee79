//! What `apply` did, kept on disk so that `destroy`, `show` and the daemon know each router.
//!
//! - `/run/router-xdp/routers/<id>.json`: the definition and what apply created or adopted.
//! - `/sys/fs/bpf/router-xdp/v1/<id>/`: the router's pinned maps and, under `links/`, one pinned
//!   bpf_link per `qr-` device, so the fast path outlives the process that set it up.
//! - `/run/router-xdp/state.lock`: serialises apply, destroy and the daemon's start and stop.
//! - `/run/router-xdp/daemon.lock`: held by the running daemon (`router-ctl run`).

use std::{
    fs::{self, File, OpenOptions},
    os::fd::AsRawFd,
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

pub const RUN_DIR: &str = "/run/router-xdp";
/// The layout version is part of the path, so that a later layout can live beside this one.
pub const BPF_DIR: &str = "/sys/fs/bpf/router-xdp/v1";

pub fn run_dir() -> PathBuf {
    std::env::var_os("ROUTER_XDP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

pub fn bpf_root() -> PathBuf {
    std::env::var_os("ROUTER_XDP_BPF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BPF_DIR))
}

pub fn routers_dir() -> PathBuf {
    run_dir().join("routers")
}

pub fn bpf_dir(router_id: &str) -> PathBuf {
    bpf_root().join(router_id)
}

pub fn map_pin(router_id: &str, map: &str) -> PathBuf {
    bpf_dir(router_id).join(map)
}

/// The pinned bpf_link of the XDP program on `device`.
pub fn link_pin(router_id: &str, device: &str) -> PathBuf {
    bpf_dir(router_id).join("links").join(device)
}

/// The pinned bpf_link of the tc program at `device`'s tcx ingress.
pub fn tc_link_pin(router_id: &str, device: &str) -> PathBuf {
    bpf_dir(router_id).join("tc-links").join(device)
}

/// A router as applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouterState {
    pub id: String,
    pub name: String,
    pub namespace: String,
    /// apply created the namespace (destroy deletes it).
    pub created_netns: bool,
    /// The namespace's `net.ipv4.ip_forward` before apply set it, when apply changed it.
    pub ip_forward_before: Option<String>,
    /// The same for `net.ipv6.conf.all.forwarding`.
    #[serde(default)]
    pub ipv6_forwarding_before: Option<String>,
    pub interfaces: Vec<IfaceState>,
    pub routes: Vec<RouteState>,
    /// The definition's `max_routes`, if it had one.
    #[serde(default)]
    pub max_routes: Option<u32>,
    /// The fingerprint of the object the attached programs were loaded from.
    #[serde(default)]
    pub program: Option<String>,
    /// The identity (nsfs inode) of the namespace apply configured.
    #[serde(default)]
    pub netns_inode: Option<u64>,
    /// Why the router no longer forwards, when its namespace went away without `destroy`
    /// (the daemon noticed, released it and removed the pinned programs and maps).
    #[serde(default)]
    pub lost: Option<String>,
    /// The external gateway, when the router has one (its port is in `interfaces` too).
    #[serde(default)]
    pub gateway: Option<GatewayState>,
    /// The definition asks for L3 HA.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ha: bool,
    /// The definition applied, in its written form: what the verbs change. (None in state
    /// files of builds before it was kept: the verbs rebuild it from the fields above.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<crate::config::RawRouter>,
}

/// The external gateway as applied: what `destroy` and the next apply must know of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayState {
    pub port_id: String,
    pub device: String,
    pub network_id: Option<String>,
    pub enable_snat: bool,
    /// The upstream routers (one per family at most): the default routes' nexthops.
    pub upstreams: Vec<String>,
    /// Upstream routers outside their subnet, reached through an on-link host route.
    #[serde(default)]
    pub onlink: Vec<String>,
    pub floating_ips: Vec<FloatingIpState>,
    /// Namespace sysctls apply changed, with their values before (restored on destroy of an
    /// adopted namespace).
    #[serde(default)]
    pub sysctls_before: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FloatingIpState {
    pub floating_ip_address: String,
    /// None: not associated (nothing configured for it).
    pub fixed_ip_address: Option<String>,
    /// apply added the /32 to the `qg-` device.
    pub added: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IfaceState {
    pub port_id: String,
    pub device: String,
    /// The port's subnets and the router's address on each.
    #[serde(default)]
    pub fixed_ips: Vec<AddrState>,
    pub ifindex: u32,
    pub mac: String,
    pub mtu: u32,
    /// Index of the device's counters in the STATS map; stable across applies.
    pub slot: u32,
    /// apply created this veth pair; `peer` is its other end, left in the caller's namespace.
    pub created_device: bool,
    pub peer: Option<String>,
    /// apply moved this (adopted) device from the caller's namespace into the router's:
    /// destroy moves it back before anything else (a namespace apply created and deletes
    /// would take a virtual device with it).
    #[serde(default)]
    pub moved_in: bool,
    /// The hook the definition asks for.
    #[serde(default)]
    pub hook: crate::config::Hook,
    /// The hook the fast path runs in on this device (`Xdp` or `Tc`), and why.
    #[serde(default)]
    pub active_hook: Option<crate::config::Hook>,
    #[serde(default)]
    pub hook_reason: String,
    /// The device's kind (veth, macvlan, …; None for a NIC).
    #[serde(default)]
    pub kind: Option<String>,
    /// The external gateway's port (`qg-`).
    #[serde(default)]
    pub external: bool,
    /// State files written before dual-stack had one subnet per interface; read into
    /// `fixed_ips` on load.
    #[serde(default, skip_serializing)]
    subnet: Option<String>,
    #[serde(default, skip_serializing)]
    gateway_ip: Option<String>,
    #[serde(default, skip_serializing)]
    added_address: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddrState {
    pub subnet: String,
    pub gateway_ip: String,
    /// apply added this address (destroy removes it from an adopted device).
    pub added: bool,
}

impl AddrState {
    /// The address and its prefix length.
    pub fn addr(&self) -> Option<(std::net::IpAddr, u8)> {
        let ip = self.gateway_ip.parse().ok()?;
        let len = self.subnet.split('/').nth(1)?.parse().ok()?;
        Some((ip, len))
    }

    /// `ADDRESS/LENGTH`, as iproute2 takes it.
    pub fn cidr(&self) -> String {
        format!(
            "{}/{}",
            self.gateway_ip,
            self.subnet.split('/').nth(1).unwrap_or("32")
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteState {
    pub destination: String,
    pub nexthop: String,
    pub device: String,
    /// The external gateway's default route, not an extra route of the definition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

impl IfaceState {
    /// XDP runs on a device fed by a local stack's skbs (any virtual device): frames may carry
    /// partial checksums that XDP cannot see, so the program verifies TCP and UDP checksums.
    pub fn verify_l4(&self) -> bool {
        self.active_hook == Some(crate::config::Hook::Xdp) && self.kind.is_some()
    }

    pub fn new(port_id: String, device: String, fixed_ips: Vec<AddrState>) -> IfaceState {
        IfaceState {
            port_id,
            device,
            fixed_ips,
            ifindex: 0,
            mac: String::new(),
            mtu: 0,
            slot: 0,
            created_device: false,
            peer: None,
            moved_in: false,
            hook: crate::config::Hook::Auto,
            active_hook: None,
            hook_reason: String::new(),
            kind: None,
            external: false,
            subnet: None,
            gateway_ip: None,
            added_address: false,
        }
    }

    /// The device as the fast path's maps know it: (ifindex, `Iface`).
    pub fn entry(&self) -> Result<(u32, router_common::Iface)> {
        let mac = crate::config::parse_mac(&self.mac).with_context(|| {
            format!(
                "device {} has no Ethernet address ('{}')",
                self.device, self.mac
            )
        })?;
        Ok((
            self.ifindex,
            router_common::Iface {
                mac,
                flags: if self.verify_l4() {
                    router_common::iface_flags::VERIFY_L4
                } else {
                    0
                } | if self.external {
                    router_common::iface_flags::EXTERNAL
                } else {
                    0
                },
                mtu: self.mtu,
                slot: self.slot,
            },
        ))
    }
}

impl RouterState {
    /// The fast path translates: a gateway with SNAT, or floating IPs.
    pub fn nat_on(&self) -> bool {
        self.gateway.as_ref().is_some_and(|g| {
            g.enable_snat || g.floating_ips.iter().any(|f| f.fixed_ip_address.is_some())
        })
    }

    /// Why the namespace this router was applied to is not there any more (deleted, or
    /// replaced by another of the same name), if it is not.
    pub fn namespace_gone(&self) -> Option<String> {
        match crate::kernel::netns::inode(&self.namespace) {
            None => Some(format!("namespace {} was deleted", self.namespace)),
            Some(i) if self.netns_inode.is_some_and(|was| was != i) => Some(format!(
                "namespace {} was deleted and created again",
                self.namespace
            )),
            _ => None,
        }
    }

    /// Every device of the router as the fast path's maps know it.
    pub fn iface_entries(&self) -> Result<Vec<(u32, router_common::Iface)>> {
        self.interfaces.iter().map(IfaceState::entry).collect()
    }

    pub fn path(id: &str) -> PathBuf {
        routers_dir().join(format!("{id}.json"))
    }

    pub fn save(&self) -> Result<()> {
        let dir = routers_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = dir.join(format!(".{}.json.tmp", self.id));
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, Self::path(&self.id)).context("cannot replace the router state file")?;
        Ok(())
    }

    pub fn load(id: &str) -> Result<Option<RouterState>> {
        let p = Self::path(id);
        match fs::read(&p) {
            Ok(b) => {
                let mut st: RouterState = serde_json::from_slice(&b)
                    .with_context(|| format!("corrupt state file {}", p.display()))?;
                for i in st.interfaces.iter_mut() {
                    if let (Some(subnet), Some(gateway_ip)) = (i.subnet.take(), i.gateway_ip.take())
                    {
                        i.fixed_ips.push(AddrState {
                            subnet,
                            gateway_ip,
                            added: i.added_address,
                        });
                    }
                }
                Ok(Some(st))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub fn remove(id: &str) -> Result<()> {
        match fs::remove_file(Self::path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every applied router, sorted by id.
    pub fn all() -> Result<Vec<RouterState>> {
        let mut v = Vec::new();
        let dir = routers_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        for e in entries {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                // One unreadable file (a torn write, a hand edit) must not stop every other
                // router's apply, show or sync: it is left out, loudly.
                match Self::load(id) {
                    Ok(Some(s)) => v.push(s),
                    Ok(None) => {}
                    Err(e) => tracing::error!(
                        file = %dir.join(&name).display(),
                        error = format!("{e:#}"),
                        "a router's state file cannot be read; that router is left out until the file is fixed or removed"
                    ),
                }
            }
        }
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Finds a router by id or name.
    pub fn find(key: &str) -> Result<RouterState> {
        let all = Self::all()?;
        let found: Vec<_> = all
            .into_iter()
            .filter(|r| r.id == key || r.name == key)
            .collect();
        match found.len() {
            1 => Ok(found.into_iter().next().unwrap()),
            0 => anyhow::bail!("no router '{key}' is applied; `router-ctl show` lists them"),
            _ => anyhow::bail!("several routers are named '{key}'; give the router id instead"),
        }
    }
}

/// An exclusive `flock` held until dropped.
pub struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn open(name: &str) -> Result<File> {
        let dir = run_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let p = dir.join(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("cannot open lock {}", p.display()))
    }

    /// Waits for the lock.
    pub fn acquire(name: &str) -> Result<Lock> {
        let f = Self::open(name)?;
        // SAFETY: flock on a valid descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("flock");
        }
        Ok(Lock(f))
    }

    /// Takes the lock if nobody holds it.
    pub fn try_acquire(name: &str) -> Result<Option<Lock>> {
        let f = Self::open(name)?;
        // SAFETY: as above.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(e).context("flock");
        }
        Ok(Some(Lock(f)))
    }
}

pub const STATE_LOCK: &str = "state.lock";
pub const DAEMON_LOCK: &str = "daemon.lock";

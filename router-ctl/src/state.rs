//! What `apply` did, kept on disk so that `destroy`, `show` and the daemon know each router.
//!
//! - `/run/router-xdp/routers/<id>.json`: the definition and what apply created or adopted.
//! - `/sys/fs/bpf/router-xdp/v1/<id>/`: the router's pinned maps and, under `links/`, one pinned
//!   bpf_link per `qr-` device, so the fast path outlives the process that set it up.
//! - `/run/router-xdp/state.lock`: serialises apply, destroy and the daemon's start and stop.
//! - `/run/router-xdp/daemon.lock`: held by the running daemon (`router-ctl run`).

use std::{
    fs::{self, File, OpenOptions},
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::config::{IpNet, Mac};

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
    /// The apply that made this state (its undo journal's token, see `apply::undo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_token: Option<String>,
    /// Followed (`run --follow`): the namespace, its devices, addresses and routes are another
    /// control plane's (Neutron's L3 agent); this router is read from them and never writes
    /// into the namespace but its programs' records (see `apply::follow`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub followed: bool,
    /// A followed router's main-table routes the fast path does not carry (blackhole,
    /// unreachable, prohibit; through a device not one of its ports): their packets go to the
    /// kernel (`route_kind::KERNEL`), with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_routes: Vec<KernelRoute>,
    /// A followed router's HA port (`ha-`, Neutron's HA routers: keepalived moves the
    /// router's addresses between hosts over it), when it has one (see `ha_role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_port: Option<String>,
}

/// A route the kernel keeps (see `RouterState::kernel_routes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRoute {
    pub destination: IpNet,
    /// What the route does, as `show` says it.
    pub what: String,
}

impl RouterState {
    /// A router `id` named `name` in namespace `ns` with nothing applied yet: no devices,
    /// routes, gateway or programs; what the constructors of the real states start from.
    pub fn empty(id: &str, name: &str, ns: &str) -> RouterState {
        RouterState {
            id: id.to_string(),
            name: name.to_string(),
            namespace: ns.to_string(),
            created_netns: false,
            ip_forward_before: None,
            ipv6_forwarding_before: None,
            interfaces: Vec::new(),
            routes: Vec::new(),
            max_routes: None,
            program: None,
            netns_inode: None,
            lost: None,
            gateway: None,
            ha: false,
            definition: None,
            apply_token: None,
            followed: false,
            kernel_routes: Vec::new(),
            ha_port: None,
        }
    }

    /// For a followed HA router, the role keepalived gives this host as the namespace shows
    /// it: "active" where the router's ports hold their addresses (the fast path carries),
    /// "standby" where they hold none (nothing to forward).
    pub fn ha_role(&self) -> Option<&'static str> {
        self.ha_port.as_ref()?;
        Some(
            match cfg!(mutant = "ha_role_always_active")
                || self.interfaces.iter().any(|i| !i.fixed_ips.is_empty())
            {
                true => "active",
                false => "standby",
            },
        )
    }

    /// What `destroy` reports for a router whose only trace was an interrupted first apply
    /// (rolled back): its id, nothing applied.
    pub fn interrupted(id: &str) -> RouterState {
        RouterState::empty(id, "an interrupted apply, rolled back", "")
    }
}

/// The external gateway as applied: what `destroy` and the next apply must know of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayState {
    pub port_id: String,
    pub device: String,
    pub network_id: Option<String>,
    pub enable_snat: bool,
    /// The upstream routers (one per family at most): the default routes' nexthops.
    pub upstreams: Vec<IpAddr>,
    /// Upstream routers outside their subnet, reached through an on-link host route.
    #[serde(default)]
    pub onlink: Vec<IpAddr>,
    pub floating_ips: Vec<FloatingIpState>,
    /// Namespace sysctls apply changed, with their values before (restored on destroy of an
    /// adopted namespace).
    #[serde(default)]
    pub sysctls_before: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FloatingIpState {
    pub floating_ip_address: Ipv4Addr,
    /// None: not associated (nothing configured for it).
    pub fixed_ip_address: Option<Ipv4Addr>,
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
    /// None: the device has no Ethernet address (written as "").
    #[serde(with = "mac_or_empty")]
    pub mac: Option<Mac>,
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
    /// The addresses the device had in the caller's namespace when apply moved it in (the
    /// kernel drops them on a move): destroy gives them back with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub home_addrs: Vec<(std::net::IpAddr, u8)>,
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
    subnet: Option<IpNet>,
    #[serde(default, skip_serializing)]
    gateway_ip: Option<IpAddr>,
    #[serde(default, skip_serializing)]
    added_address: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddrState {
    pub subnet: IpNet,
    pub gateway_ip: IpAddr,
    /// apply added this address (destroy removes it from an adopted device).
    pub added: bool,
}

impl AddrState {
    /// The address and its prefix length.
    pub fn addr(&self) -> (IpAddr, u8) {
        (self.gateway_ip, self.subnet.prefix_len())
    }

    /// `ADDRESS/LENGTH`, as iproute2 takes it.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.gateway_ip, self.subnet.prefix_len())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteState {
    pub destination: IpNet,
    pub nexthop: IpAddr,
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
            mac: None,
            mtu: 0,
            slot: 0,
            created_device: false,
            peer: None,
            moved_in: false,
            home_addrs: Vec::new(),
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

    /// The device's Ethernet address as the state file and `show` write it: "" for none.
    pub fn mac_text(&self) -> String {
        self.mac.map(|m| m.to_string()).unwrap_or_default()
    }

    /// The device as the fast path's maps know it: (ifindex, `Iface`).
    pub fn entry(&self) -> Result<(u32, router_common::Iface)> {
        // The message as when the address was kept as text (an empty one here).
        let mac = self
            .mac
            .with_context(|| format!("device {} has no Ethernet address ('')", self.device))?;
        Ok((
            self.ifindex,
            router_common::Iface {
                mac: mac.0,
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
    /// Its ports: (ifindex, device).
    pub fn ports(&self) -> Vec<(u32, String)> {
        self.interfaces
            .iter()
            .map(|i| (i.ifindex, i.device.clone()))
            .collect()
    }

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

    /// A state file's text, with the fields of older layouts moved into place.
    fn from_json(b: &[u8]) -> serde_json::Result<RouterState> {
        let mut st: RouterState = serde_json::from_slice(b)?;
        for i in st.interfaces.iter_mut() {
            if let (Some(subnet), Some(gateway_ip)) = (i.subnet.take(), i.gateway_ip.take()) {
                i.fixed_ips.push(AddrState {
                    subnet,
                    gateway_ip,
                    added: i.added_address,
                });
            }
        }
        Ok(st)
    }

    pub fn load(id: &str) -> Result<Option<RouterState>> {
        let p = Self::path(id);
        match fs::read(&p) {
            Ok(b) => Self::from_json(&b)
                .map(Some)
                .with_context(|| format!("corrupt state file {}", p.display())),
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

/// `IfaceState::mac` in the state file: the address as a string, "" for a device without one.
mod mac_or_empty {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::config::Mac;

    pub fn serialize<S: Serializer>(mac: &Option<Mac>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.collect_str(m),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mac>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        match text.parse() {
            Ok(m) => Ok(Some(m)),
            // Builds that recorded what `ip -j link` printed may have kept another link-layer
            // address (a tunnel's); every reader took one that does not parse as no Ethernet
            // address, and so does this: the router's file stays readable.
            Err(e) => {
                tracing::warn!(mac = %text, error = %e, "a device's recorded address is not a MAC address; taken as none");
                Ok(None)
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file as the build that kept addresses as text wrote it: two tenant ports (one
    /// dual-stack, one on a device without an Ethernet address), the gateway's port, extra
    /// routes and the gateway's default routes, an on-link upstream, floating IPs associated
    /// and not.
    const WRITTEN_AS_TEXT: &str = r#"{
  "id": "a81cc110-16f4-4d6c-89d2-8af91cec9714",
  "name": "router_100_101",
  "namespace": "qrouter-a81cc110-16f4-4d6c-89d2-8af91cec9714",
  "created_netns": true,
  "ip_forward_before": null,
  "ipv6_forwarding_before": "0",
  "interfaces": [
    {
      "port_id": "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e",
      "device": "qr-d295b258-45",
      "fixed_ips": [
        {
          "subnet": "172.16.100.0/24",
          "gateway_ip": "172.16.100.1",
          "added": true
        },
        {
          "subnet": "2001:db8:100::/64",
          "gateway_ip": "2001:db8:100::1",
          "added": true
        }
      ],
      "ifindex": 7,
      "mac": "02:00:5e:10:00:01",
      "mtu": 1500,
      "slot": 0,
      "created_device": true,
      "peer": "tapd295b258-45",
      "moved_in": false,
      "hook": "auto",
      "active_hook": "tc",
      "hook_reason": "tc: veth",
      "kind": "veth",
      "external": false
    },
    {
      "port_id": "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e",
      "device": "qr-2ffdb861-73",
      "fixed_ips": [
        {
          "subnet": "172.16.101.0/24",
          "gateway_ip": "172.16.101.1",
          "added": false
        }
      ],
      "ifindex": 9,
      "mac": "",
      "mtu": 9000,
      "slot": 1,
      "created_device": false,
      "peer": null,
      "moved_in": true,
      "hook": "xdp",
      "active_hook": null,
      "hook_reason": "",
      "kind": null,
      "external": false
    },
    {
      "port_id": "e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b",
      "device": "qg-e1a2b3c4-5d",
      "fixed_ips": [
        {
          "subnet": "192.168.1.0/24",
          "gateway_ip": "192.168.1.10",
          "added": true
        },
        {
          "subnet": "2001:db8:ffff::/64",
          "gateway_ip": "2001:db8:ffff::10",
          "added": true
        }
      ],
      "ifindex": 11,
      "mac": "aa:bb:cc:dd:ee:0f",
      "mtu": 1500,
      "slot": 2,
      "created_device": true,
      "peer": "tape1a2b3c4-5d",
      "moved_in": false,
      "hook": "tc",
      "active_hook": "tc",
      "hook_reason": "tc: asked for",
      "kind": "veth",
      "external": true
    }
  ],
  "routes": [
    {
      "destination": "10.20.0.0/16",
      "nexthop": "172.16.101.254",
      "device": "qr-2ffdb861-73"
    },
    {
      "destination": "2001:db8:aaaa::/48",
      "nexthop": "2001:db8:100::fe",
      "device": "qr-d295b258-45"
    },
    {
      "destination": "0.0.0.0/0",
      "nexthop": "192.168.1.1",
      "device": "qg-e1a2b3c4-5d",
      "gateway": true
    },
    {
      "destination": "::/0",
      "nexthop": "2001:db8:eeee::1",
      "device": "qg-e1a2b3c4-5d",
      "gateway": true
    }
  ],
  "max_routes": 1000,
  "program": "sha256:0123abcd",
  "netns_inode": 4026532283,
  "lost": null,
  "gateway": {
    "port_id": "e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b",
    "device": "qg-e1a2b3c4-5d",
    "network_id": "public",
    "enable_snat": true,
    "upstreams": [
      "192.168.1.1",
      "2001:db8:eeee::1"
    ],
    "onlink": [
      "2001:db8:eeee::1"
    ],
    "floating_ips": [
      {
        "floating_ip_address": "192.168.1.20",
        "fixed_ip_address": "172.16.101.3",
        "added": true
      },
      {
        "floating_ip_address": "192.168.1.21",
        "fixed_ip_address": null,
        "added": false
      }
    ],
    "sysctls_before": [
      [
        "net.ipv4.conf.all.arp_ignore",
        "0"
      ]
    ]
  },
  "ha": true
}"#;

    /// A state file of the build that kept addresses as text loads into typed values and is
    /// written back as it was: the same JSON, byte for byte.
    #[test]
    fn a_state_file_written_as_text_loads_and_is_written_back_the_same() {
        let st = RouterState::from_json(WRITTEN_AS_TEXT.as_bytes()).unwrap();
        let (a, b, qg) = (&st.interfaces[0], &st.interfaces[1], &st.interfaces[2]);
        assert_eq!(a.mac, Some(Mac([0x02, 0x00, 0x5e, 0x10, 0x00, 0x01])));
        assert_eq!(b.mac, None);
        assert_eq!(qg.mac_text(), "aa:bb:cc:dd:ee:0f");
        assert_eq!(a.fixed_ips[1].subnet, "2001:db8:100::/64".parse().unwrap());
        assert_eq!(
            a.fixed_ips[1].addr(),
            ("2001:db8:100::1".parse().unwrap(), 64)
        );
        assert_eq!(b.fixed_ips[0].cidr(), "172.16.101.1/24");
        assert_eq!(st.routes[3].destination, "::/0".parse().unwrap());
        assert_eq!(
            st.routes[0].nexthop,
            IpAddr::V4(Ipv4Addr::new(172, 16, 101, 254))
        );
        let g = st.gateway.as_ref().unwrap();
        assert_eq!(
            g.onlink,
            vec!["2001:db8:eeee::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            g.floating_ips[0].fixed_ip_address,
            Some(Ipv4Addr::new(172, 16, 101, 3))
        );
        assert_eq!(g.floating_ips[1].fixed_ip_address, None);
        assert!(st.nat_on());
        assert_eq!(
            b.entry().unwrap_err().to_string(),
            "device qr-2ffdb861-73 has no Ethernet address ('')"
        );
        assert_eq!(
            a.entry().unwrap().1.mac,
            [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01]
        );

        let written = serde_json::to_string_pretty(&st).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&written).unwrap(),
            serde_json::from_str::<serde_json::Value>(WRITTEN_AS_TEXT).unwrap()
        );
        assert_eq!(written, WRITTEN_AS_TEXT);
    }

    /// A state file from before dual-stack (one subnet per interface) loads into `fixed_ips`;
    /// a recorded address that is no MAC address reads as none, as every reader took it.
    #[test]
    fn older_layouts_load() {
        let old = r#"{
  "id": "r1", "name": "old", "namespace": "qrouter-r1", "created_netns": false,
  "ip_forward_before": "0",
  "interfaces": [
    {"port_id": "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e", "device": "qr-d295b258-45",
     "subnet": "2001:db8:100::/64", "gateway_ip": "2001:db8:100::1", "added_address": true,
     "ifindex": 3, "mac": "0.0.0.0", "mtu": 1480, "slot": 0, "created_device": false,
     "peer": null}
  ],
  "routes": [{"destination": "2001:db8:aaaa::/48", "nexthop": "2001:db8:100::fe", "device": "qr-d295b258-45", "gateway": false}]
}"#;
        let st = RouterState::from_json(old.as_bytes()).unwrap();
        let i = &st.interfaces[0];
        assert_eq!(i.fixed_ips.len(), 1);
        assert_eq!(i.fixed_ips[0].cidr(), "2001:db8:100::1/64");
        assert!(i.fixed_ips[0].added);
        assert_eq!(i.mac, None);
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["interfaces"][0]["mac"], "");
        assert_eq!(
            v["interfaces"][0]["fixed_ips"][0]["subnet"],
            "2001:db8:100::/64"
        );
        assert!(v["interfaces"][0].get("subnet").is_none());
        assert!(v["routes"][0].get("gateway").is_none());
    }
}

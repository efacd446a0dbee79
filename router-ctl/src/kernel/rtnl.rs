//! A blocking rtnetlink client for the calling thread's network namespace: devices, addresses
//! and routes, as apply, destroy and the daemon need them.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        route::{RouteAttribute, RouteMessage},
        rule::RuleMessage,
        AddressFamily,
    },
    Handle, IpVersion, LinkUnspec, LinkVeth, RouteMessageBuilder, RouteNextHopBuilder,
};

use crate::config::IpNet;

/// A device as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Has carrier (a veth: its peer is up).
    pub lower_up: bool,
    /// veth, macvlan, openvswitch, …; None for a NIC.
    pub kind: Option<String>,
}

impl Link {
    /// Up with carrier: frames can leave through it.
    pub fn running(&self) -> bool {
        self.up && self.lower_up
    }

    pub fn mac(&self) -> Result<[u8; 6]> {
        self.mac
            .ok_or_else(|| anyhow!("device {} has no Ethernet address", self.name))
    }
}

/// An address on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// An rtnetlink connection in the namespace of the thread that made it.
pub struct Rtnl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

/// An rtnetlink error as the OS error it carries (EEXIST, ENODEV, …) when it carries one.
fn os_error(e: rtnetlink::Error) -> anyhow::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => anyhow::Error::new(std::io::Error::from_raw_os_error(-c.get())),
            None => anyhow!("netlink error"),
        },
        other => anyhow::Error::new(other),
    }
}

/// The errno of an error made by `os_error`.
fn errno(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<std::io::Error>()
        .and_then(|e| e.raw_os_error())
}

impl Rtnl {
    pub fn new() -> Result<Rtnl> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("cannot start an I/O runtime")?;
        let (conn, handle) = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().context("cannot open an rtnetlink socket")?;
            anyhow::Ok((conn, handle))
        })?;
        rt.spawn(conn);
        Ok(Rtnl { rt, handle })
    }

    /// Every device of the namespace.
    pub fn links(&self) -> Result<Vec<Link>> {
        self.rt
            .block_on(async {
                let mut s = self.handle.link().get().execute();
                let mut v = Vec::new();
                while let Some(m) = s.try_next().await.map_err(os_error)? {
                    v.push(link_of(&m));
                }
                anyhow::Ok(v)
            })
            .context("cannot list the devices")
    }

    /// The device named `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let got = self.rt.block_on(async {
            let mut s = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            s.try_next().await.map_err(os_error)
        });
        match got {
            Ok(m) => Ok(m.map(|m| link_of(&m))),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up device {name}")),
        }
    }

    /// Creates a veth pair `name` ↔ `peer` in this namespace.
    /// Creates the veth pair `name` / `peer`, `name` straight in the namespace open as `ns` and
    /// `peer` in this one: no device has to move between namespaces afterwards (a move waits
    /// for an RCU grace period with the RTNL held).
    pub fn veth_add_in(&self, name: &str, peer: &str, ns: BorrowedFd<'_>) -> Result<()> {
        self.rt
            .block_on(
                self.handle
                    .link()
                    .add(
                        LinkVeth::new(name, peer)
                            .setns_by_fd(ns.as_raw_fd())
                            .build(),
                    )
                    .execute(),
            )
            .map_err(os_error)
            .with_context(|| format!("cannot create veth pair {name} / {peer}"))
    }

    fn set(&self, msg: LinkMessage, what: impl FnOnce() -> String) -> Result<()> {
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(os_error)
            .with_context(what)
    }

    pub fn set_up(&self, index: u32, name: &str) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).up().build(), || {
            format!("cannot set {name} up")
        })
    }

    pub fn set_down(&self, index: u32, name: &str) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).down().build(), || {
            format!("cannot set {name} down")
        })
    }

    pub fn set_up_by_name(&self, name: &str) -> Result<()> {
        let l = self
            .link(name)?
            .ok_or_else(|| anyhow!("no device {name}"))?;
        self.set_up(l.index, name)
    }

    /// Moves device `index` into the namespace open as `ns`.
    pub fn set_netns(&self, index: u32, name: &str, ns: BorrowedFd<'_>) -> Result<()> {
        self.set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
            || format!("cannot move {name} to another namespace (the kernel keeps some kinds of device, a bridge among them, in the namespace that made them: plug a veth or an Open vSwitch internal port)"),
        )
    }

    pub fn link_del(&self, index: u32, name: &str) -> Result<()> {
        let h = self.handle.clone();
        match self
            .rt
            .block_on(h.link().del(index).execute())
            .map_err(os_error)
        {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            r => r.with_context(|| format!("cannot delete device {name}")),
        }
    }

    /// Every IPv4 and IPv6 address of the namespace.
    pub fn addrs(&self) -> Result<Vec<Addr>> {
        self.rt
            .block_on(async {
                let mut s = self.handle.address().get().execute();
                let mut v = Vec::new();
                while let Some(m) = s.try_next().await.map_err(os_error)? {
                    let ip = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    });
                    if let Some(ip) = ip {
                        v.push(Addr {
                            index: m.header.index,
                            ip,
                            prefix_len: m.header.prefix_len,
                        });
                    }
                }
                anyhow::Ok(v)
            })
            .context("cannot list the addresses")
    }

    /// Adds `ip/prefix_len` to device `index`; IPv6 without duplicate address detection (a
    /// router's address never sits tentative).
    pub fn addr_add(&self, index: u32, dev: &str, ip: IpAddr, prefix_len: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, ip, prefix_len);
        if ip.is_ipv6() {
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.rt
            .block_on(req.execute())
            .map_err(os_error)
            .with_context(|| format!("cannot add address {ip}/{prefix_len} to {dev}"))
    }

    pub fn addr_del(&self, index: u32, dev: &str, ip: IpAddr, prefix_len: u8) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = if ip.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.prefix_len = prefix_len;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(ip));
        if ip.is_ipv6() {
            m.attributes = vec![AddressAttribute::Address(ip)];
        } else {
            m.attributes.push(AddressAttribute::Address(ip));
        }
        match self
            .rt
            .block_on(self.handle.address().del(m).execute())
            .map_err(os_error)
        {
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            r => r.with_context(|| format!("cannot delete address {ip}/{prefix_len} from {dev}")),
        }
    }

    /// Adds or replaces the route to `dest` through `hops` (nexthop, device index): one hop is a
    /// plain route, several a multipath route.
    pub fn route_replace(&self, dest: IpNet, hops: &[(IpAddr, u32)]) -> Result<()> {
        let msg = route_message(dest, hops)?;
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(os_error)
            .with_context(|| format!("cannot add the route to {dest}"))
    }

    /// Adds or replaces an on-link route to `dest` through device `dev` (no gateway, link
    /// scope): how an upstream router outside its subnet is reached.
    pub fn route_onlink(&self, dest: IpNet, dev: u32) -> Result<()> {
        let mut msg = route_message(dest, &[])?;
        msg.header.scope = rtnetlink::packet_route::route::RouteScope::Link;
        msg.attributes
            .push(rtnetlink::packet_route::route::RouteAttribute::Oif(dev));
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(os_error)
            .with_context(|| format!("cannot add the on-link route to {dest}"))
    }

    /// Deletes the route to `dest` (nothing to do when there is none).
    pub fn route_del(&self, dest: IpNet) -> Result<()> {
        let msg = route_message(dest, &[])?;
        match self
            .rt
            .block_on(self.handle.route().del(msg).execute())
            .map_err(os_error)
        {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            r => r.with_context(|| format!("cannot delete the route to {dest}")),
        }
    }
}

impl Rtnl {
    /// Many route changes at once: `Some((nexthop, device))` adds or replaces the route to the
    /// prefix, `None` deletes it (a route already gone is fine). Up to 256 requests are in
    /// flight on the socket, as `ip -batch` would not wait for each answer either; changes to
    /// one prefix are never in flight together, so they land in order. The first error is
    /// returned after every request was answered.
    pub fn routes_change(&self, changes: &[(IpNet, Option<(IpAddr, u32)>)]) -> Result<()> {
        use futures::StreamExt as _;
        let mut seen = std::collections::HashSet::new();
        // Runs of changes with distinct prefixes: a repeated prefix starts a new run.
        let mut runs: Vec<&[(IpNet, Option<(IpAddr, u32)>)]> = Vec::new();
        let mut start = 0;
        for (i, (net, _)) in changes.iter().enumerate() {
            if !seen.insert(*net) {
                runs.push(&changes[start..i]);
                seen.clear();
                seen.insert(*net);
                start = i;
            }
        }
        runs.push(&changes[start..]);
        for run in runs {
            let results: Vec<Result<()>> = self.rt.block_on(
                futures::stream::iter(run.iter().map(|(dest, hop)| {
                    let h = self.handle.clone();
                    async move {
                        match hop {
                            Some(hop) => {
                                let msg = route_message(*dest, &[*hop])?;
                                h.route()
                                    .add(msg)
                                    .replace()
                                    .execute()
                                    .await
                                    .map_err(os_error)
                                    .with_context(|| format!("cannot add the route to {dest}"))
                            }
                            None => {
                                let msg = route_message(*dest, &[])?;
                                match h.route().del(msg).execute().await.map_err(os_error) {
                                    Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
                                    r => r.with_context(|| {
                                        format!("cannot delete the route to {dest}")
                                    }),
                                }
                            }
                        }
                    }
                }))
                .buffer_unordered(256)
                .collect(),
            );
            results.into_iter().collect::<Result<()>>()?;
        }
        Ok(())
    }
}

/// A route of the main table, both families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MainRoute {
    /// Destination network address and prefix length.
    pub dest: IpAddr,
    pub len: u8,
    pub via: Via,
}

/// Where a main-table route sends packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// Unicast through gateways: [(gateway, output device)], several for a multipath route.
    Gateways(Vec<(IpAddr, u32)>),
    /// Unicast on-link through a device (a connected subnet's route, or an operator's).
    Device(u32),
    /// Anything else (blackhole, unreachable, prohibit, throw, a nexthop object, a gateway
    /// without a device): named for `show`.
    Other(String),
}

impl Rtnl {
    /// Every route of the main table (254), both families; the local table's are the
    /// addresses'.
    pub fn main_routes(&self) -> Result<Vec<MainRoute>> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteType};
        let ip_of = |a: &RouteAddress| match a {
            RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
            RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
            _ => None,
        };
        self.rt
            .block_on(async {
                let mut v = Vec::new();
                for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                    let mut msg = RouteMessageBuilder::<IpAddr>::new().build();
                    msg.header.address_family = family;
                    let mut s = self.handle.route().get(msg).execute();
                    while let Some(m) = s.try_next().await.map_err(os_error)? {
                        let table = m
                            .attributes
                            .iter()
                            .find_map(|a| match a {
                                RouteAttribute::Table(t) => Some(*t),
                                _ => None,
                            })
                            .unwrap_or(m.header.table as u32);
                        if table != 254 {
                            continue;
                        }
                        let dest = m
                            .attributes
                            .iter()
                            .find_map(|a| match a {
                                RouteAttribute::Destination(d) => ip_of(d),
                                _ => None,
                            })
                            .unwrap_or(if family == AddressFamily::Inet {
                                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                            } else {
                                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                            });
                        let oif = m.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Oif(i) => Some(*i),
                            _ => None,
                        });
                        let mut hops = Vec::new();
                        let mut whole = true;
                        for a in &m.attributes {
                            match a {
                                RouteAttribute::Gateway(g) => match (ip_of(g), oif) {
                                    (Some(g), Some(oif)) => hops.push((g, oif)),
                                    _ => whole = false,
                                },
                                // A gateway of the other family, tunnel encapsulation:
                                // not what the fast path sends by.
                                RouteAttribute::Via(_) | RouteAttribute::Encap(_) => whole = false,
                                RouteAttribute::MultiPath(nhs) => {
                                    for nh in nhs {
                                        let g = nh.attributes.iter().find_map(|a| match a {
                                            RouteAttribute::Gateway(g) => ip_of(g),
                                            _ => None,
                                        });
                                        match g {
                                            Some(g) => hops.push((g, nh.interface_index)),
                                            None => whole = false,
                                        }
                                    }
                                }
                                RouteAttribute::Other(nla)
                                    if rtnetlink::packet_utils::nla::Nla::kind(nla)
                                        == RTA_NH_ID =>
                                {
                                    whole = false
                                }
                                _ => {}
                            }
                        }
                        let via = match (m.header.kind, oif) {
                            (RouteType::Unicast, _) if !whole => {
                                Via::Other("a nexthop the fast path cannot read".into())
                            }
                            (RouteType::Unicast, _) if !hops.is_empty() => Via::Gateways(hops),
                            (RouteType::Unicast, Some(oif)) => Via::Device(oif),
                            (kind, _) => Via::Other(format!("{kind:?}").to_lowercase()),
                        };
                        v.push(MainRoute {
                            dest,
                            len: m.header.destination_prefix_length,
                            via,
                        });
                    }
                }
                anyhow::Ok(v)
            })
            .context("cannot list the routes")
    }

    /// The policy routing rules, both families (false: IPv4).
    pub fn rules(&self) -> Result<Vec<(bool, RuleMessage)>> {
        self.rt
            .block_on(async {
                let mut v = Vec::new();
                for (ipv6, family) in [(false, IpVersion::V4), (true, IpVersion::V6)] {
                    let mut s = self.handle.rule().get(family).execute();
                    while let Some(m) = s.try_next().await.map_err(os_error)? {
                        v.push((ipv6, m));
                    }
                }
                anyhow::Ok(v)
            })
            .context("cannot list the policy routing rules")
    }
}

/// RTA_NH_ID: a route through a nexthop object (`ip nexthop`), which the fast path does not
/// read.
const RTA_NH_ID: u16 = 30;

fn route_message(dest: IpNet, hops: &[(IpAddr, u32)]) -> Result<RouteMessage> {
    let (addr, len) = match dest {
        IpNet::V4(n) => (IpAddr::V4(n.addr), n.len),
        IpNet::V6(n) => (IpAddr::V6(n.addr), n.len),
    };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, len)
        .map_err(|e| anyhow!("route to {dest}: {e}"))?;
    match hops {
        [] => {}
        [(via, dev)] => {
            b = b
                .gateway(*via)
                .map_err(|e| anyhow!("route to {dest}: {e}"))?
                .output_interface(*dev);
        }
        _ => {
            let family = if dest.is_ipv6() {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            let mut nexthops = Vec::new();
            for (via, dev) in hops {
                nexthops.push(
                    RouteNextHopBuilder::new(family)
                        .interface(*dev)
                        .via(*via)
                        .map_err(|e| anyhow!("route to {dest}: {e}"))?
                        .build(),
                );
            }
            b = b.multipath(nexthops);
        }
    }
    let mut m = b.build();
    // Without a table attribute the kernel takes the main table, as `ip route` does.
    m.attributes
        .retain(|a| !matches!(a, RouteAttribute::Table(_)));
    Ok(m)
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        lower_up: m.header.flags.contains(LinkFlags::LowerUp),
        kind: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(a) if a.len() == 6 => {
                l.mac = Some([a[0], a[1], a[2], a[3], a[4], a[5]])
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Other(s) => s.clone(),
        k => format!("{k}").to_lowercase(),
    }
}

//! Routers followed, not defined (`router-ctl run --follow [PATTERN]…`): a namespace another
//! control plane built (Neutron's L3 agent: `qrouter-<id>` with its `qr-`/`qg-` ports, their
//! addresses, the routes of its main table, its iptables rules) is the definition.
//!
//! - The router's id is the namespace's name; a namespace a defined router claims is never
//!   followed (and a followed one is never claimed by `apply`, which names namespaces itself).
//! - Every `qr-` and `qg-` device is a port, with the addresses it carries as its subnets; the
//!   main table's routes with a gateway through one of them are its routes (ECMP included).
//!   Read again on every link, address and route event of the namespace (the daemon's watcher).
//! - Nothing is written into the namespace but the programs (tcx links, XDP) and, under its
//!   rules (always, for Neutron's), the guard's record table (`crate::guard`): no address,
//!   route, sysctl or NAT rule. The namespace's netfilter rules decide what is forwarded, NAT
//!   included (conntrack's mappings are copied as for defined routers).
//! - A namespace that goes away, or the daemon's stop, releases the router: programs detached,
//!   pins and state removed, the guard's table dropped.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, Context as _, Result};
use router_common::MAX_IFACES;

use super::{choose_hook, destroy_found, Job};
use crate::{
    config::{self, Hook, IpNet, Ipv4Net, Ipv6Net},
    datapath,
    kernel::{
        netdev::Netdev,
        netns,
        rtnl::{Rtnl, Via},
    },
    state::{self, AddrState, IfaceState, KernelRoute, Lock, RouteState, RouterState},
};

/// Route room a followed router's table gets (its maps cannot grow later).
const FOLLOWED_MAX_ROUTES: u32 = 4096;

/// `name` matches `pattern`: `*` stands for any run of characters, everything else for itself.
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// A namespace name this controller can use as a router id (a file name of its state and of
/// its pins): letters, digits, `-`, `_`, `.`, not starting with a dot, at most 64 bytes.
pub fn usable_name(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 64
        && !ns.starts_with('.')
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The namespaces under /run/netns that match one of `patterns` (a file not yet bound to a
/// namespace, as `ip netns add` leaves it for a moment, is not one).
pub fn candidates(patterns: &[String]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(netns::NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| patterns.iter().any(|p| matches(p, n)))
        .filter(|n| is_namespace(&format!("{}/{n}", netns::NETNS_RUN_DIR)))
        .collect();
    v.sort();
    v
}

/// `path` is a namespace's binding (nsfs), not a plain file.
fn is_namespace(path: &str) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statfs(2) into a zeroed struct, with a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC
    }
}

/// Starts following namespace `ns` (or reads it again when it is followed already): the
/// router's state from the namespace, its maps filled and programs attached.
pub fn take(ns: &str) -> Result<RouterState> {
    if !usable_name(ns) {
        bail!("namespace {ns:?}: its name cannot name a router here (letters, digits, '-', '_', '.'; at most 64)");
    }
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    if let Some(other) = RouterState::all()?
        .into_iter()
        .find(|r| r.namespace == ns && !r.followed)
    {
        bail!(
            "namespace {ns} belongs to defined router {} ({}): not followed",
            other.id,
            other.name
        );
    }
    let prev = RouterState::load(ns)?;
    let st = read(ns, prev)?;
    st.save()?;
    Ok(st)
}

/// Reads a followed router again (the daemon's resync, under the state lock).
pub fn refresh(prev: RouterState) -> Result<()> {
    let st = read(&prev.namespace.clone(), Some(prev))?;
    st.save()
}

/// Stops following router `id`: programs detached, pins and state removed, the guard's table
/// dropped; nothing else of the namespace is touched.
pub fn release(id: &str) -> Result<()> {
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    let Some(st) = RouterState::load(id)? else {
        return Ok(());
    };
    if !st.followed {
        bail!("router {id} is defined, not followed: destroy it instead");
    }
    destroy_found(st).map(|_| ())
}

/// The router the namespace holds now, its maps and programs brought in line (inside it).
fn read(ns: &str, prev: Option<RouterState>) -> Result<RouterState> {
    let id = ns.to_string();
    let ns = ns.to_string();
    netns::run_in(&ns.clone(), move || {
        let rt = Rtnl::new()?;
        let links = rt.links()?;
        let addrs = rt.addrs()?;
        let features = Netdev::open()?.dump()?;
        let before = |l: &crate::kernel::rtnl::Link| {
            prev.as_ref()
                .and_then(|p| {
                    p.interfaces
                        .iter()
                        .find(|i| i.ifindex == l.index && i.device == l.name)
                })
                .cloned()
        };
        let ports: Vec<_> = links
            .iter()
            .filter(|l| l.name.starts_with("qr-") || l.name.starts_with("qg-"))
            .collect();
        let mut used: BTreeSet<u32> = ports
            .iter()
            .filter_map(|l| before(l))
            .map(|b| b.slot)
            .collect();
        let (mut ifaces, mut fresh) = (Vec::new(), Vec::new());
        for l in ports {
            let slot = match before(l) {
                Some(b) => b.slot,
                None => {
                    let s = (0..MAX_IFACES)
                        .find(|s| !used.contains(s))
                        .with_context(|| format!("namespace {ns}: more ports than {MAX_IFACES}"))?;
                    used.insert(s);
                    fresh.push(s);
                    s
                }
            };
            let fixed_ips = addrs
                .iter()
                .filter(|a| a.index == l.index && !link_local(a.ip))
                .map(|a| AddrState {
                    subnet: network(a.ip, a.prefix_len),
                    gateway_ip: a.ip,
                    added: false,
                })
                .collect();
            let mut st = IfaceState::new(l.name[3..].to_string(), l.name.clone(), fixed_ips);
            st.ifindex = l.index;
            st.mac = l.mac.map(config::Mac);
            st.mtu = l.mtu;
            st.slot = slot;
            st.kind = l.kind.clone();
            st.external = l.name.starts_with("qg-");
            let f = features.get(&l.index).copied().unwrap_or_default();
            let (hook, why) = choose_hook(Hook::Auto, &l.name, l.kind.as_deref(), f)?;
            st.active_hook = Some(hook);
            st.hook_reason = why;
            ifaces.push(st);
        }
        let by_index: BTreeMap<u32, &IfaceState> = ifaces.iter().map(|i| (i.ifindex, i)).collect();
        let connected: BTreeSet<(IpNet, u32)> = ifaces
            .iter()
            .flat_map(|i| i.fixed_ips.iter().map(|f| (f.subnet, i.ifindex)))
            .collect();
        let (mut routes, mut kernel_routes) = (Vec::new(), Vec::new());
        for r in rt.main_routes()? {
            let destination = network(r.dest, r.len);
            let to_kernel = |what: String| KernelRoute { destination, what };
            match r.via {
                // Through the ports: ours to carry (ECMP included).
                Via::Gateways(hops) if hops.iter().all(|(_, oif)| by_index.contains_key(oif)) => {
                    for (via, oif) in hops {
                        routes.push(RouteState {
                            destination,
                            nexthop: via,
                            device: by_index[&oif].device.clone(),
                            gateway: by_index[&oif].external && r.len == 0,
                        });
                    }
                }
                Via::Gateways(hops) => kernel_routes.push(to_kernel(format!(
                    "via {} (not through the router's ports)",
                    hops.iter()
                        .map(|(g, _)| g.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ))),
                // A port's subnet route (the address gives it); any other on-link route, or
                // one through another device (Neutron's `ha-` port, `lo`), is the kernel's.
                Via::Device(oif) if connected.contains(&(destination, oif)) => {}
                // IPv6 link-local and multicast: never forwarded, by the fast path or the kernel.
                Via::Device(_) if unroutable(destination) => {}
                Via::Device(oif) => kernel_routes.push(to_kernel(match by_index.get(&oif) {
                    Some(i) => format!("on-link through {}", i.device),
                    None => format!("through device {oif}, not a port"),
                })),
                Via::Other(what) => kernel_routes.push(to_kernel(what)),
            }
        }
        let st = RouterState {
            interfaces: ifaces,
            routes,
            max_routes: Some(FOLLOWED_MAX_ROUTES),
            program: Some(datapath::program_fingerprint()),
            netns_inode: netns::current_inode(),
            followed: true,
            kernel_routes,
            ha_port: links
                .iter()
                .find(|l| l.name.starts_with("ha-"))
                .map(|l| l.name.clone()),
            ..RouterState::empty(&id, &id, &id)
        };
        let job = Job {
            router: config::Router {
                id: id.clone(),
                name: id.clone(),
                max_routes: Some(FOLLOWED_MAX_ROUTES),
                ha: false,
                interfaces: Vec::new(),
                routes: Vec::new(),
                gateway: None,
                floating_ips: Vec::new(),
            },
            prev,
            plugged: BTreeMap::new(),
            created_netns: false,
            reload: false,
            standby: false,
        };
        job.datapath(&st, &links, &addrs, &features, &fresh)?;
        // Devices that left: their pins go (the programs detach with the device anyway).
        for old in job.prev.iter().flat_map(|p| p.interfaces.iter()) {
            if !st
                .interfaces
                .iter()
                .any(|i| i.ifindex == old.ifindex && i.device == old.device)
            {
                let _ = std::fs::remove_file(state::link_pin(&id, &old.device));
                let _ = std::fs::remove_file(state::tc_link_pin(&id, &old.device));
            }
        }
        Ok(st)
    })
}

/// fe80::/10 or ff00::/8: routes every IPv6 device gets, for nothing the router forwards.
fn unroutable(net: IpNet) -> bool {
    matches!(net, IpNet::V6(n) if n.len >= 8 && (n.addr.segments()[0] & 0xffc0 == 0xfe80 || n.addr.segments()[0] & 0xff00 == 0xff00))
}

fn link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
}

/// The network `ip/len` belongs to.
fn network(ip: IpAddr, len: u8) -> IpNet {
    match ip {
        IpAddr::V4(a) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32))
            };
            IpNet::V4(Ipv4Net {
                addr: Ipv4Addr::from(u32::from(a) & mask),
                len,
            })
        }
        IpAddr::V6(a) => IpNet::V6(Ipv6Net {
            addr: Ipv6Addr::from(u128::from(a) & Ipv6Net::mask(len)),
            len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_globs() {
        for (p, n, want) in [
            ("qrouter-*", "qrouter-a81cc110-16f4", true),
            ("qrouter-*", "qrouter-", true),
            ("qrouter-*", "snat-a81cc110", false),
            ("*-a81*", "snat-a81cc110", true),
            ("qrouter-x", "qrouter-xy", false),
        ] {
            assert_eq!(matches(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn names_that_cannot_name_a_router_are_refused() {
        assert!(usable_name("qrouter-a81cc110-16f4-4d6c-89d2-8af91cec9714"));
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a b",
            "a/b",
            "x\n",
            &"x".repeat(65),
        ] {
            assert!(!usable_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn networks_drop_the_host_bits() {
        assert_eq!(
            network("172.16.100.1".parse().unwrap(), 24).to_string(),
            "172.16.100.0/24"
        );
        assert_eq!(
            network("10.1.2.3".parse().unwrap(), 0).to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            network("2001:db8:100::1".parse().unwrap(), 64).to_string(),
            "2001:db8:100::/64"
        );
    }
}

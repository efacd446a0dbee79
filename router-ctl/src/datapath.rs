//! The kernel side of a router: loading the embedded XDP program, attaching it, and the maps.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, DevMapHash, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use router_common::{map_names, route_kind, Iface, Neigh, NeighKey, Route, Stats, PROGRAM_NAME};

use crate::state;

/// The XDP program, built by build.rs and embedded in this binary.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router"));

const ALL_MAPS: [&str; 5] = [
    map_names::ROUTES,
    map_names::NEIGHS,
    map_names::IFACES,
    map_names::TX_PORTS,
    map_names::STATS,
];

/// Loads the program with private, unpinned maps (packet tests and benchmarks).
pub fn load_unpinned() -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new().load(PROGRAM).context("loading the XDP object")?;
    program(&mut ebpf)?.load().context("the kernel refused the XDP program")?;
    Ok(ebpf)
}

/// Loads the program for `router_id`, reusing the maps pinned for it, or creating and pinning them.
pub fn load_pinned(router_id: &str) -> Result<Ebpf> {
    let dir = state::bpf_dir(router_id);
    std::fs::create_dir_all(dir.join("links")).with_context(|| format!("cannot create {}", dir.display()))?;
    let paths: Vec<_> = ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(PROGRAM)
        .with_context(|| format!("loading the XDP object for router {router_id} (maps in {})", dir.display()))?;
    program(&mut ebpf)?.load().context("the kernel refused the XDP program")?;
    Ok(ebpf)
}

pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program '{PROGRAM_NAME}' missing from the object"))?
        .try_into()
        .context("program is not XDP")
}

/// Attaches the program to `ifindex` in native mode through a bpf_link pinned at `pin`; when a
/// link is pinned there already, the program is swapped in atomically (bpf_link_update), so the
/// device never goes without a program. Must run inside the device's namespace.
pub fn attach(ebpf: &mut Ebpf, ifindex: u32, device: &str, pin: &Path) -> Result<()> {
    let prog = program(ebpf)?;
    let mut id = None;
    if pin.exists() {
        let pinned = PinnedLink::from_pin(pin).with_context(|| format!("cannot open pinned link {}", pin.display()))?;
        let fd: FdLink = pinned.into();
        // A link whose device went away is defunct: updating it fails, and we attach anew.
        match XdpLink::try_from(fd) {
            Ok(link) => match prog.attach_to_link(link) {
                Ok(link_id) => id = Some(link_id),
                Err(e) => tracing::warn!(device, error = %e, "pinned link is stale; attaching anew"),
            },
            Err(_) => tracing::warn!(device, "pinned object is not an XDP link; attaching anew"),
        }
        std::fs::remove_file(pin).with_context(|| format!("cannot remove {}", pin.display()))?;
    }
    let id = match id {
        Some(id) => id,
        None => prog.attach_to_if_index(ifindex, XdpMode::Driver).with_context(|| {
            format!("cannot attach XDP in native mode to {device} (ifindex {ifindex}); is another XDP program attached? `ip link show {device}` tells")
        })?,
    };
    let link: FdLink = prog.take_link(id)?.try_into().context("XDP link is not a bpf_link")?;
    link.pin(pin).with_context(|| format!("cannot pin the XDP link at {}", pin.display()))?;
    Ok(())
}

/// Opens a map pinned for `router_id`.
pub fn open_pinned(router_id: &str, name: &str) -> Result<MapData> {
    let p = state::map_pin(router_id, name);
    MapData::from_pin(&p).with_context(|| format!("cannot open map {} of router {router_id}", p.display()))
}

/// The desired content of `ROUTES` for one router.
pub fn route_entries(
    connected: &[(crate::config::Ipv4Net, u32)],
    gateways: &[(crate::config::Ipv4Net, u32, Ipv4Addr)],
    locals: &[Ipv4Addr],
) -> Vec<(Key<u32>, Route)> {
    let mut v = Vec::new();
    for (net, ifindex) in connected {
        v.push((key(net.addr, net.len), Route { ifindex: *ifindex, kind: route_kind::CONNECTED, nexthop: [0; 4] }));
    }
    for (net, ifindex, nh) in gateways {
        v.push((key(net.addr, net.len), Route { ifindex: *ifindex, kind: route_kind::GATEWAY, nexthop: nh.octets() }));
    }
    for ip in locals {
        v.push((key(*ip, 32), Route { ifindex: 0, kind: route_kind::LOCAL, nexthop: [0; 4] }));
    }
    v
}

pub fn key(addr: Ipv4Addr, len: u8) -> Key<u32> {
    Key::new(len as u32, u32::from_ne_bytes(addr.octets()))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

/// Replaces the whole content of `ROUTES`, inserting before deleting (make-before-break).
pub fn set_routes(ebpf: &mut Ebpf, entries: &[(Key<u32>, Route)]) -> Result<()> {
    let mut trie: LpmTrie<_, u32, Route> = LpmTrie::try_from(map_mut(ebpf, map_names::ROUTES)?)?;
    let want: BTreeSet<(u32, u32)> = entries.iter().map(|(k, _)| (k.prefix_len(), k.data())).collect();
    for (k, r) in entries {
        trie.insert(k, r, 0).with_context(|| format!("cannot insert route {}/{}", Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len()))?;
    }
    let stale: Vec<Key<u32>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
        .collect();
    for k in stale {
        trie.remove(&k).context("cannot remove a stale route")?;
    }
    Ok(())
}

/// Replaces `IFACES` and `TX_PORTS`. Must run inside the router's namespace: the kernel resolves
/// devmap ifindexes in the namespace of the thread that updates the map.
pub fn set_ifaces(ebpf: &mut Ebpf, ifaces: &[(u32, Iface)]) -> Result<()> {
    {
        let mut tx: DevMapHash<_> = DevMapHash::try_from(map_mut(ebpf, map_names::TX_PORTS)?)?;
        for (ifindex, _) in ifaces {
            tx.insert(*ifindex, *ifindex, None, 0)
                .with_context(|| format!("cannot add ifindex {ifindex} to the devmap"))?;
        }
        let stale: Vec<u32> = tx.keys().filter_map(|k| k.ok()).filter(|k| !ifaces.iter().any(|(i, _)| i == k)).collect();
        for k in stale {
            tx.remove(k)?;
        }
    }
    let mut map: HashMap<_, u32, Iface> = HashMap::try_from(map_mut(ebpf, map_names::IFACES)?)?;
    for (ifindex, iface) in ifaces {
        map.insert(ifindex, iface, 0)?;
    }
    let stale: Vec<u32> = map.keys().filter_map(|k| k.ok()).filter(|k| !ifaces.iter().any(|(i, _)| i == k)).collect();
    for k in stale {
        map.remove(&k)?;
    }
    Ok(())
}

/// Zeroes the counters of `slot` (a slot handed to a new device).
pub fn reset_stats(ebpf: &mut Ebpf, slot: u32) -> Result<()> {
    let mut arr: PerCpuArray<_, Stats> = PerCpuArray::try_from(map_mut(ebpf, map_names::STATS)?)?;
    let n = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
    arr.set(slot, aya::maps::PerCpuValues::try_from(vec![Stats::ZERO; n])?, 0)?;
    Ok(())
}

/// Per-device counters summed over CPUs, by slot.
pub fn read_stats(map: &MapData, slot: u32) -> Result<Stats> {
    let arr: PerCpuArray<_, Stats> = PerCpuArray::try_from(Map::PerCpuArray(clone_map(map)?))?;
    let mut total = Stats::ZERO;
    for s in arr.get(&slot, 0)?.iter() {
        total.add(s);
    }
    Ok(total)
}

/// Counters of every slot of a loaded (unpinned) program; for tests and benchmarks.
pub fn stats_of(ebpf: &Ebpf, slot: u32) -> Result<Stats> {
    let arr: PerCpuArray<_, Stats> =
        PerCpuArray::try_from(ebpf.map(map_names::STATS).ok_or_else(|| anyhow!("no STATS map"))?)?;
    let mut total = Stats::ZERO;
    for s in arr.get(&slot, 0)?.iter() {
        total.add(s);
    }
    Ok(total)
}

fn clone_map(map: &MapData) -> Result<MapData> {
    let fd = map.fd().as_fd().try_clone_to_owned()?;
    Ok(MapData::from_fd(fd)?)
}

use std::os::fd::AsFd as _;

/// A handle on a router's neighbour map.
pub struct Neighs(HashMap<MapData, NeighKey, Neigh>);

impl Neighs {
    pub fn open(router_id: &str) -> Result<Neighs> {
        Ok(Neighs(HashMap::try_from(Map::HashMap(open_pinned(router_id, map_names::NEIGHS)?))?))
    }
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Neighs> {
        let m = ebpf.take_map(map_names::NEIGHS).ok_or_else(|| anyhow!("no NEIGHS map"))?;
        Ok(Neighs(HashMap::try_from(m)?))
    }
    pub fn set(&mut self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let k = NeighKey { ifindex, addr: ip.octets() };
        self.0.insert(k, Neigh { mac, _pad: [0; 2] }, 0).with_context(|| format!("cannot add neighbour {ip} on ifindex {ifindex}"))?;
        Ok(())
    }
    pub fn remove(&mut self, ifindex: u32, ip: Ipv4Addr) {
        let _ = self.0.remove(&NeighKey { ifindex, addr: ip.octets() });
    }
    pub fn all(&self) -> Vec<(NeighKey, Neigh)> {
        let mut v: Vec<_> = self.0.iter().filter_map(|r| r.ok()).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

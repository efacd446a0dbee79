//! The maps' setters and readers: devices, redirect slots, own addresses, NAT configuration,
//! counters.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray},
    Ebpf,
};
use router_common::{map_names, Iface, Stats};

use super::{clone_map, map_mut, open_pinned};

/// Replaces `IFACES` and the redirect targets. A device in `down` gets no redirect slot in
/// either hook, so frames routed to it go to the kernel; a device in `no_xmit` (up, but unable
/// to take XDP-redirected frames now) keeps its tc slot and gets no XDP slot. Must run inside
/// the router's namespace: the kernel resolves devmap ifindexes in the namespace of the thread
/// that updates the map.
pub fn set_ifaces(
    ebpf: &mut Ebpf,
    ifaces: &[(u32, Iface)],
    down: &[u32],
    no_xmit: &[u32],
) -> Result<()> {
    {
        let mut tx: DevMap<_> = DevMap::try_from(map_mut(ebpf, map_names::TX_PORTS)?)?;
        for (ifindex, iface) in ifaces
            .iter()
            .filter(|(i, _)| !down.contains(i) && !no_xmit.contains(i))
        {
            tx.set(iface.slot, *ifindex, None, 0)
                .with_context(|| format!("cannot add ifindex {ifindex} to the devmap"))?;
        }
    }
    for slot in 0..router_common::MAX_IFACES {
        if !ifaces.iter().any(|(ifindex, i)| {
            i.slot == slot && !down.contains(ifindex) && !no_xmit.contains(ifindex)
        }) {
            remove_tx_port(ebpf, slot)?;
        }
    }
    {
        let mut tc: Array<_, u32> = Array::try_from(map_mut(ebpf, map_names::TC_PORTS)?)?;
        for slot in 0..router_common::MAX_IFACES {
            let want = ifaces
                .iter()
                .find(|(ifindex, i)| i.slot == slot && !down.contains(ifindex))
                .map(|(ifindex, _)| *ifindex)
                .unwrap_or(0);
            if tc.get(&slot, 0)? != want {
                tc.set(slot, want, 0)
                    .with_context(|| format!("cannot write slot {slot} of TC_PORTS"))?;
            }
        }
    }
    // The devices the maps hold now: the index array holds some of them, never others.
    let before: Vec<u32> = HashMap::<_, u32, Iface>::try_from(map_mut(ebpf, map_names::IFACES)?)?
        .keys()
        .filter_map(|k| k.ok())
        .collect();
    // The index array: each device in its slot, unless another device of the router took it
    // (that one is found through the hash map); slots of devices gone are emptied. Only the
    // slots of devices old and new are touched.
    {
        let n = router_common::IFACE_INDEX_SLOTS;
        let mut index: Array<_, router_common::IfaceAt> =
            Array::try_from(map_mut(ebpf, map_names::IFACE_INDEX)?)?;
        let mut want: std::collections::BTreeMap<u32, router_common::IfaceAt> = Default::default();
        for (ifindex, iface) in ifaces {
            want.entry(ifindex & (n - 1))
                .or_insert(router_common::IfaceAt {
                    ifindex: *ifindex,
                    iface: *iface,
                });
        }
        let empty = router_common::IfaceAt {
            ifindex: 0,
            iface: Iface {
                mac: [0; 6],
                flags: 0,
                mtu: 0,
                slot: 0,
            },
        };
        let slots: BTreeSet<u32> = want
            .keys()
            .copied()
            .chain(before.iter().map(|i| i & (n - 1)))
            .collect();
        for i in slots {
            let new = want.get(&i).copied().unwrap_or(empty);
            if index.get(&i, 0)? != new {
                index.set(i, new, 0)?;
            }
        }
    }
    let mut map: HashMap<_, u32, Iface> = HashMap::try_from(map_mut(ebpf, map_names::IFACES)?)?;
    for (ifindex, iface) in ifaces {
        map.insert(ifindex, iface, 0)?;
    }
    let stale: Vec<u32> = before
        .into_iter()
        .filter(|k| !ifaces.iter().any(|(i, _)| i == k))
        .collect();
    for k in stale {
        map.remove(&k)?;
    }
    Ok(())
}

/// Replaces the router's own IPv4 addresses (`LOCAL4` and its filter `LOCAL_BITS`): packets
/// from them are martians. New addresses are added before the filter, stale ones removed after.
pub fn set_local_addrs(ebpf: &mut Ebpf, addrs: &[Ipv4Addr]) -> Result<()> {
    anyhow::ensure!(
        addrs.len() <= router_common::MAX_LOCAL4 as usize,
        "{} IPv4 addresses in the router's namespace, at most {} are supported",
        addrs.len(),
        router_common::MAX_LOCAL4
    );
    let mut bits = [0u64; 1024];
    for a in addrs {
        let k = u32::from(*a) & 0xffff;
        bits[(k >> 6) as usize] |= 1 << (k & 63);
    }
    let mut set: HashMap<_, u32, u32> = HashMap::try_from(map_mut(ebpf, map_names::LOCAL4)?)?;
    for a in addrs {
        set.insert(u32::from(*a), 1, 0)
            .with_context(|| format!("cannot record local address {a}"))?;
    }
    let stale: Vec<u32> = set
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !addrs.iter().any(|a| u32::from(*a) == *k))
        .collect();
    let mut filter: Array<_, [u64; 1024]> = Array::try_from(map_mut(ebpf, map_names::LOCAL_BITS)?)?;
    filter.set(0, bits, 0).context("cannot write LOCAL_BITS")?;
    let mut set: HashMap<_, u32, u32> = HashMap::try_from(map_mut(ebpf, map_names::LOCAL4)?)?;
    for k in stale {
        set.remove(&k)?;
    }
    Ok(())
}

/// Sets the router's `nat_conf` bits.
pub fn set_nat_conf(ebpf: &mut Ebpf, bits: u32) -> Result<()> {
    let mut a: Array<_, u32> = Array::try_from(map_mut(ebpf, map_names::NAT_CONF)?)?;
    a.set(0, bits, 0).context("writing NAT_CONF")?;
    Ok(())
}

/// The router's `nat_conf` bits, from its pinned map.
pub fn nat_conf(router_id: &str) -> Result<u32> {
    let a: Array<MapData, u32> =
        Array::try_from(Map::Array(open_pinned(router_id, map_names::NAT_CONF)?))?;
    a.get(&0, 0).context("reading NAT_CONF")
}

/// Zeroes the counters of `slot` (a slot handed to a new device).
pub fn reset_stats(ebpf: &mut Ebpf, slot: u32) -> Result<()> {
    let mut arr: PerCpuArray<_, Stats> = PerCpuArray::try_from(map_mut(ebpf, map_names::STATS)?)?;
    let n = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting CPUs")?;
    arr.set(
        slot,
        aya::maps::PerCpuValues::try_from(vec![Stats::ZERO; n])?,
        0,
    )?;
    Ok(())
}

/// Empties slot `slot` of the devmap (aya has no delete for array devmaps: BPF_MAP_DELETE_ELEM).
pub fn remove_tx_port(ebpf: &mut Ebpf, slot: u32) -> Result<()> {
    let Some(Map::DevMap(data)) = ebpf.map(map_names::TX_PORTS) else {
        anyhow::bail!("map {} is not a devmap", map_names::TX_PORTS);
    };
    delete_slot(data, slot)
}

/// Empties slot `slot` of a router's pinned `TX_PORTS` at once: a device that stops taking
/// XDP-redirected frames must leave the devmap before more frames are sent into it.
pub fn remove_tx_port_pinned(router_id: &str, slot: u32) -> Result<()> {
    delete_slot(&open_pinned(router_id, map_names::TX_PORTS)?, slot)
}

fn delete_slot(data: &MapData, slot: u32) -> Result<()> {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let key = slot;
    let attr = ElemAttr {
        map_fd: data.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    // SAFETY: a BPF_MAP_DELETE_ELEM call with a valid descriptor and key pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e).context("cannot empty a devmap slot");
        }
    }
    Ok(())
}

/// The ifindex in each slot of a router's `TC_PORTS` (0: nothing is redirected through it).
pub fn tc_ports(router_id: &str) -> Result<Vec<u32>> {
    let map: Array<MapData, u32> =
        Array::try_from(Map::Array(open_pinned(router_id, map_names::TC_PORTS)?))?;
    (0..map.len())
        .map(|i| map.get(&i, 0).context("reading TC_PORTS"))
        .collect()
}

/// The redirect target of each slot of a router's `TX_PORTS` (None: empty, nothing is
/// redirected through that slot).
pub fn tx_ports(router_id: &str) -> Result<Vec<Option<u32>>> {
    let map: DevMap<MapData> =
        DevMap::try_from(Map::DevMap(open_pinned(router_id, map_names::TX_PORTS)?))?;
    (0..map.len())
        .map(|i| match map.get(i, 0) {
            Ok(v) => Ok(Some(v.if_index)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading slot {i} of TX_PORTS")),
        })
        .collect()
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
    let arr: PerCpuArray<_, Stats> = PerCpuArray::try_from(
        ebpf.map(map_names::STATS)
            .ok_or_else(|| anyhow!("no STATS map"))?,
    )?;
    let mut total = Stats::ZERO;
    for s in arr.get(&slot, 0)?.iter() {
        total.add(s);
    }
    Ok(total)
}

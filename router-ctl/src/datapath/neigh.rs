//! A router's neighbour maps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    Ebpf,
};
use router_common::{map_names, Neigh, Neigh6Key, NeighKey};

use super::open_pinned;

/// A handle on a router's neighbour maps (IPv4 and IPv6).
pub struct Neighs {
    v4: HashMap<MapData, NeighKey, Neigh>,
    v6: HashMap<MapData, Neigh6Key, Neigh>,
}

impl Neighs {
    pub fn open(router_id: &str) -> Result<Neighs> {
        Ok(Neighs {
            v4: HashMap::try_from(Map::HashMap(open_pinned(router_id, map_names::NEIGHS)?))?,
            v6: HashMap::try_from(Map::HashMap(open_pinned(router_id, map_names::NEIGHS6)?))?,
        })
    }
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Neighs> {
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("no {name} map"));
        Ok(Neighs {
            v4: HashMap::try_from(take(map_names::NEIGHS)?)?,
            v6: HashMap::try_from(take(map_names::NEIGHS6)?)?,
        })
    }
    pub fn set(&mut self, ifindex: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        let n = Neigh { mac, _pad: [0; 2] };
        match ip {
            IpAddr::V4(a) => self.v4.insert(
                NeighKey {
                    ifindex,
                    addr: a.octets(),
                },
                n,
                0,
            ),
            IpAddr::V6(a) => self.v6.insert(
                Neigh6Key {
                    ifindex,
                    addr: a.octets(),
                },
                n,
                0,
            ),
        }
        .with_context(|| format!("cannot add neighbour {ip} on ifindex {ifindex}"))
    }
    pub fn get(&self, ifindex: u32, ip: IpAddr) -> Option<[u8; 6]> {
        match ip {
            IpAddr::V4(a) => self.v4.get(
                &NeighKey {
                    ifindex,
                    addr: a.octets(),
                },
                0,
            ),
            IpAddr::V6(a) => self.v6.get(
                &Neigh6Key {
                    ifindex,
                    addr: a.octets(),
                },
                0,
            ),
        }
        .ok()
        .map(|n| n.mac)
    }
    pub fn remove(&mut self, ifindex: u32, ip: IpAddr) {
        let _ = match ip {
            IpAddr::V4(a) => self.v4.remove(&NeighKey {
                ifindex,
                addr: a.octets(),
            }),
            IpAddr::V6(a) => self.v6.remove(&Neigh6Key {
                ifindex,
                addr: a.octets(),
            }),
        };
    }
    /// Every entry, IPv4 first, sorted: (ifindex, address, MAC).
    pub fn all(&self) -> Vec<(u32, IpAddr, [u8; 6])> {
        let mut v: Vec<(u32, IpAddr, [u8; 6])> = self
            .v4
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, n)| (k.ifindex, IpAddr::V4(Ipv4Addr::from(k.addr)), n.mac))
            .chain(
                self.v6
                    .iter()
                    .filter_map(|r| r.ok())
                    .map(|(k, n)| (k.ifindex, IpAddr::V6(Ipv6Addr::from(k.addr)), n.mac)),
            )
            .collect();
        v.sort_by_key(|(i, a, _)| (a.is_ipv6(), *i, *a));
        v
    }
}

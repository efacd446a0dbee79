//! The netfilter rules of a namespace as the fast path must respect them, over nfnetlink
//! (`NFNL_SUBSYS_NFTABLES`), without subprocesses: which base chains sit on the forwarding
//! path (iptables-nft's tables are nftables tables), which tables legacy iptables holds, the
//! change notifications, and the elements of the evidence sets of `nft::guard_ruleset`.
//!
//! Works in the network namespace of the thread that opens the socket.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result};

use super::{
    netdev::{attrs_in, drain, messages, put_attr, request},
    nft,
};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_NEWGEN: u16 = 15;
/// The multicast group of nftables' change notifications.
const NFNLGRP_NFTABLES: u32 = 7;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;

/// The table name: the first attribute of every nftables object message.
const NFTA_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_IPV6: u8 = 10;

/// Hooks of the ip, ip6 and inet families a forwarded packet passes: prerouting, forward,
/// postrouting, ingress.
const FORWARDING_HOOKS: [u32; 4] = [0, 2, 4, 5];

/// Netfilter rules of a namespace that are not this project's and may see forwarded packets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Foreign {
    /// nftables base chains on the forwarding path, as `family table chain`.
    pub chains: Vec<String>,
    /// Tables of legacy iptables (x_tables), whose changes send no notification.
    pub legacy: Vec<String>,
}

impl Foreign {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.legacy.is_empty()
    }

    /// One line for `show` and the logs.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.chains.is_empty() {
            parts.push(format!("nftables chains {}", self.chains.join(", ")));
        }
        if !self.legacy.is_empty() {
            parts.push(format!("legacy iptables tables {}", self.legacy.join(", ")));
        }
        parts.join("; ")
    }
}

fn family_name(f: u8) -> &'static str {
    match f {
        NFPROTO_INET => "inet",
        NFPROTO_IPV4 => "ip",
        3 => "arp",
        NFPROTO_NETDEV => "netdev",
        7 => "bridge",
        NFPROTO_IPV6 => "ip6",
        _ => "?",
    }
}

/// This project's own tables, by family.
fn ours(family: u8, table: &str) -> bool {
    family == NFPROTO_IPV4 && (table == nft::TABLE || table == nft::GUARD)
}

/// Whether a base chain of `family` on `hook` can see a forwarded packet.
fn on_forwarding_path(family: u8, hook: u32) -> bool {
    match family {
        NFPROTO_INET | NFPROTO_IPV4 | NFPROTO_IPV6 => FORWARDING_HOOKS.contains(&hook),
        NFPROTO_NETDEV => true,
        _ => false,
    }
}

/// A string attribute's value without its NUL.
fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
}

pub struct NfRules {
    fd: OwnedFd,
    seq: u32,
}

impl AsRawFd for NfRules {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NfRules {
    /// A socket in the calling thread's namespace; `watch`: subscribed to nftables' changes.
    pub fn open(watch: bool) -> Result<NfRules> {
        let groups = if watch {
            1 << (NFNLGRP_NFTABLES - 1)
        } else {
            0
        };
        // iptables-restore replaces whole tables: many messages at once.
        let fd = super::netdev::socket(NETLINK_NETFILTER, groups, 4 << 20, "nfnetlink")?;
        Ok(NfRules { fd, seq: 0 })
    }

    /// Reads every notification queued, without blocking: true when one was about a table not
    /// this project's, or some were lost (the socket overflowed).
    pub fn changed(&self) -> bool {
        let mut foreign = false;
        let r = drain(self.fd.as_raw_fd(), |buf| {
            for (ty, payload) in messages(buf) {
                foreign |= foreign_change(ty, payload);
            }
        });
        r.is_err() || foreign
    }

    /// The rules of the namespace that are not ours and may see forwarded packets.
    pub fn foreign(&mut self) -> Result<Foreign> {
        self.seq += 1;
        let replies = request(
            self.fd.as_raw_fd(),
            self.seq,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN,
            NLM_F_REQUEST | NLM_F_DUMP,
            [NFPROTO_UNSPEC, 0, 0, 0],
            &[],
            |t| t >> 8 == NFNL_SUBSYS_NFTABLES,
        )
        .context("listing the namespace's nftables chains")?;
        let mut chains: Vec<String> = replies.iter().filter_map(|p| forwarding_chain(p)).collect();
        chains.sort();
        chains.dedup();
        Ok(Foreign {
            chains,
            legacy: legacy_tables(),
        })
    }

    /// The keys of set `set` in table `nft::GUARD`, raw (each field padded to 4 bytes).
    pub fn set_keys(&mut self, set: &str) -> Result<HashSet<Vec<u8>>> {
        let mut attrs = Vec::new();
        put_attr(
            &mut attrs,
            NFTA_TABLE,
            format!("{}\0", nft::GUARD).as_bytes(),
        );
        put_attr(
            &mut attrs,
            NFTA_SET_ELEM_LIST_SET,
            format!("{set}\0").as_bytes(),
        );
        self.seq += 1;
        let replies = request(
            self.fd.as_raw_fd(),
            self.seq,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_DUMP,
            [NFPROTO_IPV4, 0, 0, 0],
            &attrs,
            |t| t >> 8 == NFNL_SUBSYS_NFTABLES,
        )
        .with_context(|| format!("reading set {set} of table ip {}", nft::GUARD))?;
        let mut keys = HashSet::new();
        for p in &replies {
            for (ty, list) in attrs_in(p.get(4..).unwrap_or(&[])) {
                if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (_, elem) in attrs_in(list) {
                    for (ty, key) in attrs_in(elem) {
                        if ty != NFTA_SET_ELEM_KEY {
                            continue;
                        }
                        for (ty, v) in attrs_in(key) {
                            if ty == NFTA_DATA_VALUE {
                                keys.insert(v.to_vec());
                            }
                        }
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// A notification (type, payload with its nfgenmsg) about something else than this project's
/// tables; a generation message only closes a transaction whose objects came before it.
fn foreign_change(ty: u16, payload: &[u8]) -> bool {
    if ty >> 8 != NFNL_SUBSYS_NFTABLES || ty & 0xff == NFT_MSG_NEWGEN {
        return false;
    }
    let family = payload.first().copied().unwrap_or(0);
    let table = attrs_in(payload.get(4..).unwrap_or(&[]))
        .into_iter()
        .find(|(t, _)| *t == NFTA_TABLE)
        .map(|(_, v)| text(v));
    !matches!(table, Some(t) if ours(family, &t))
}

/// `family table chain` of a chain message's base chain on the forwarding path, not ours.
fn forwarding_chain(payload: &[u8]) -> Option<String> {
    let family = *payload.first()?;
    let (mut table, mut name, mut hook) = (None, None, None);
    for (ty, v) in attrs_in(payload.get(4..)?) {
        match ty {
            NFTA_TABLE => table = Some(text(v)),
            NFTA_CHAIN_NAME => name = Some(text(v)),
            NFTA_CHAIN_HOOK => {
                hook = attrs_in(v)
                    .into_iter()
                    .find(|(t, v)| *t == NFTA_HOOK_HOOKNUM && v.len() >= 4)
                    .map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            }
            _ => {}
        }
    }
    let (table, hook) = (table?, hook?);
    if ours(family, &table) || !on_forwarding_path(family, hook) {
        return None;
    }
    Some(format!("{} {} {}", family_name(family), table, name?))
}

/// Tables legacy iptables and ip6tables hold in the calling thread's namespace.
fn legacy_tables() -> Vec<String> {
    let mut v = Vec::new();
    for (file, family) in [("ip_tables_names", "ip"), ("ip6_tables_names", "ip6")] {
        let path = format!("/proc/thread-self/net/{file}");
        for t in std::fs::read_to_string(path).unwrap_or_default().lines() {
            if !t.trim().is_empty() {
                v.push(format!("{family} {}", t.trim()));
            }
        }
    }
    v
}

/// The key of a `seen` element: source, source port, destination, destination port,
/// protocol, each field padded to 4 bytes as nftables concatenates them.
pub fn seen_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(20);
    k.extend_from_slice(&src.octets());
    k.extend_from_slice(&sport.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k.extend_from_slice(&dst.octets());
    k.extend_from_slice(&dport.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k.extend_from_slice(&[proto, 0, 0, 0]);
    k
}

/// The key of a `seen_icmp` element: source, destination, echo identifier.
pub fn seen_icmp_key(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    k.extend_from_slice(&src.octets());
    k.extend_from_slice(&dst.octets());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_msg(family: u8, table: &str, name: &str, hook: Option<u32>) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        put_attr(&mut p, NFTA_TABLE, format!("{table}\0").as_bytes());
        put_attr(&mut p, NFTA_CHAIN_NAME, format!("{name}\0").as_bytes());
        if let Some(h) = hook {
            let mut nest = Vec::new();
            put_attr(&mut nest, NFTA_HOOK_HOOKNUM, &h.to_be_bytes());
            put_attr(&mut nest, 2, &0u32.to_be_bytes());
            put_attr(&mut p, NFTA_CHAIN_HOOK, &nest);
        }
        p
    }

    #[test]
    fn forwarding_chains_are_told_from_the_rest() {
        assert_eq!(
            forwarding_chain(&chain_msg(NFPROTO_IPV4, "filter", "FORWARD", Some(2))).as_deref(),
            Some("ip filter FORWARD")
        );
        assert_eq!(
            forwarding_chain(&chain_msg(NFPROTO_INET, "fw", "pre", Some(0))).as_deref(),
            Some("inet fw pre")
        );
        // Input and output hooks, regular chains, ARP, and our own tables do not count.
        for m in [
            chain_msg(NFPROTO_IPV4, "filter", "INPUT", Some(1)),
            chain_msg(NFPROTO_IPV4, "filter", "OUTPUT", Some(3)),
            chain_msg(NFPROTO_IPV4, "filter", "neutron-l3-agent-FORWARD", None),
            chain_msg(3, "router_fence", "output", Some(1)),
            chain_msg(NFPROTO_IPV4, nft::TABLE, "postrouting", Some(4)),
            chain_msg(NFPROTO_IPV4, nft::GUARD, "post", Some(4)),
        ] {
            assert_eq!(forwarding_chain(&m), None);
        }
        // Our names in another family are someone else's.
        assert!(forwarding_chain(&chain_msg(NFPROTO_INET, nft::TABLE, "x", Some(2))).is_some());
    }

    #[test]
    fn notifications_about_our_tables_are_not_changes() {
        let ty = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        assert!(!foreign_change(
            ty(3),
            &chain_msg(NFPROTO_IPV4, nft::GUARD, "post", Some(4))
        ));
        assert!(foreign_change(
            ty(6),
            &chain_msg(NFPROTO_IPV4, "filter", "FORWARD", None)
        ));
        assert!(!foreign_change(ty(NFT_MSG_NEWGEN), &[0, 0, 0, 0]));
        assert!(!foreign_change(1 << 8, &chain_msg(2, "filter", "x", None)));
    }

    #[test]
    fn evidence_keys_are_padded_as_nftables_concatenates() {
        let k = seen_key(
            Ipv4Addr::new(1, 2, 3, 4),
            80,
            Ipv4Addr::new(5, 6, 7, 8),
            443,
            6,
        );
        assert_eq!(
            k,
            [1, 2, 3, 4, 0, 80, 0, 0, 5, 6, 7, 8, 1, 187, 0, 0, 6, 0, 0, 0]
        );
        assert_eq!(
            seen_icmp_key(Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8), 77),
            [1, 2, 3, 4, 5, 6, 7, 8, 0, 77, 0, 0]
        );
    }
}

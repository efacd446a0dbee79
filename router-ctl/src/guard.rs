//! The fast path under netfilter rules that are not this project's.
//!
//! A namespace may hold rules on the forwarding path: Neutron's L3 agent writes filter, mangle
//! and NAT chains (`neutron-l3-agent-*`, through iptables-nft), an operator adds their own. The
//! fast path cannot evaluate them, so it must never forward a packet the kernel would drop,
//! mark or rewrite differently. The model is the one of nftables' flowtable offload: the fast
//! path carries only flows the kernel has already forwarded, in both directions, under the
//! rules in force now.
//!
//! - While such rules exist (`kernel::nfrules::Foreign`), the router's `nat_conf` carries
//!   `GUARDED`: every IPv4 packet the fast path would forward needs a copy of its flow in
//!   `NAT_FLOWS` (with or without translation), and IPv6 goes to the kernel.
//! - The evidence: a chain of our own at the very end of postrouting (`nft::guard_ruleset`)
//!   records, by its tuple as it leaves, every packet of an established flow the kernel
//!   forwarded. A flow reported by the fast path is copied only when conntrack holds it and
//!   both directions are recorded.
//! - Any change of a table that is not ours (an `iptables-restore` of the agent, an
//!   operator's rule) is announced by nftables' notifications: the copies are deleted at once
//!   (the fast path stops carrying every flow), the records are emptied, and the flows come
//!   back only once the kernel has forwarded them again under the new rules.
//! - Legacy iptables (x_tables) sends no notification of its changes: a namespace holding its
//!   tables is left to the kernel entirely.
//!
//! What this model cannot keep exact, like the flowtable's: rules whose verdict changes from
//! one packet of a flow to the next without a rule change (rate limits, quotas, time of day,
//! per-packet marks or DSCP rewrites of established flows).

use std::{collections::HashSet, os::fd::AsRawFd as _};

use anyhow::Result;
use router_common::nat_conf;

use crate::kernel::{
    conntrack::{Flow, Tuple, IPPROTO_ICMP},
    nfrules::{seen_icmp_key, seen_key, Foreign, NfRules},
    nft,
};

/// The `nat_conf` bits of a router: `nat_on` (a gateway that translates) and the foreign
/// rules of its namespace.
pub fn conf_bits(nat_on: bool, foreign: &Foreign) -> u32 {
    let mut bits = 0;
    if nat_on && !cfg!(mutant = "nat_conf_off") {
        bits |= nat_conf::ON;
    }
    if !foreign.is_empty() && !cfg!(mutant = "guard_off") {
        bits |= nat_conf::GUARDED;
    }
    bits
}

/// The flows the kernel forwarded lately under the current rules, by their tuples as they
/// left.
pub struct Evidence {
    seen: HashSet<Vec<u8>>,
    icmp: HashSet<Vec<u8>>,
}

impl Evidence {
    /// Both directions of `f` left through the kernel since the rules last changed. A
    /// direction leaves with the other direction's tuple reversed (translated as conntrack says).
    pub fn both_ways(&self, f: &Flow) -> bool {
        let left = |other: &Tuple| {
            if other.proto == IPPROTO_ICMP {
                self.icmp
                    .contains(&seen_icmp_key(other.dst, other.src, other.sport))
            } else {
                self.seen.contains(&seen_key(
                    other.dst,
                    other.dport,
                    other.src,
                    other.sport,
                    other.proto,
                ))
            }
        };
        cfg!(mutant = "guard_no_evidence") || (left(&f.reply) && left(&f.orig))
    }
}

/// A router namespace's foreign rules, followed (one per flow-sync thread, inside the
/// namespace).
pub struct Guard {
    watch: NfRules,
    query: NfRules,
    pub foreign: Foreign,
    /// The evidence table is up.
    table: bool,
}

impl Guard {
    /// Subscribes to the namespace's rule changes, then reads its rules and puts the evidence
    /// table up (empty) when they call for it.
    pub fn open() -> Result<Guard> {
        let mut g = Guard {
            watch: NfRules::open(true)?,
            query: NfRules::open(false)?,
            foreign: Foreign::default(),
            table: false,
        };
        g.assess()?;
        Ok(g)
    }

    /// The socket that becomes readable when the rules may have changed.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.watch.as_raw_fd()
    }

    /// Reads the notifications queued: true when a table not ours changed.
    pub fn changed(&self) -> bool {
        self.watch.changed()
    }

    /// Foreign rules are on the forwarding path.
    pub fn guarded(&self) -> bool {
        !self.foreign.is_empty()
    }

    /// Flows may be copied once both directions are recorded: only under nftables rules,
    /// whose changes are announced.
    pub fn may_copy(&self) -> bool {
        self.foreign.legacy.is_empty()
    }

    /// Reads the rules again; the evidence table is put up anew (empty) when they call for
    /// it, and taken down when they no longer do.
    pub fn assess(&mut self) -> Result<()> {
        self.foreign = self.query.foreign()?;
        let want = self.guarded() && self.may_copy();
        if want {
            nft::guard()?;
        } else if self.table {
            nft::unguard()?;
        }
        self.table = want;
        Ok(())
    }

    /// The flows recorded now.
    pub fn evidence(&mut self) -> Result<Evidence> {
        Ok(Evidence {
            seen: self.query.set_keys(nft::SEEN)?,
            icmp: self.query.set_keys(nft::SEEN_ICMP)?,
        })
    }
}

/// Takes the evidence table down (in the calling thread's namespace): the router is
/// destroyed or no longer followed.
pub fn remove() -> Result<()> {
    nft::unguard()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn a_flow_needs_both_directions_as_they_left() {
        let ip = |d| Ipv4Addr::new(10, 0, 0, d);
        // vm 10.0.0.3:5000 → 10.0.0.9:80, SNATed to 10.0.0.1:7000.
        let f = Flow {
            orig: Tuple {
                src: ip(3),
                dst: ip(9),
                proto: 6,
                sport: 5000,
                dport: 80,
            },
            reply: Tuple {
                src: ip(9),
                dst: ip(1),
                proto: 6,
                sport: 80,
                dport: 7000,
            },
            status: 0,
            timeout: None,
            tcp_state: None,
            mark: 0,
        };
        let out = seen_key(ip(1), 7000, ip(9), 80, 6);
        let back = seen_key(ip(9), 80, ip(3), 5000, 6);
        let ev = |keys: &[&Vec<u8>]| Evidence {
            seen: keys.iter().map(|k| (*k).clone()).collect(),
            icmp: HashSet::new(),
        };
        assert!(ev(&[&out, &back]).both_ways(&f));
        assert!(!ev(&[&out]).both_ways(&f));
        assert!(!ev(&[&back]).both_ways(&f));
        // Untranslated tuples are not what left.
        assert!(!ev(&[&seen_key(ip(3), 5000, ip(9), 80, 6), &back]).both_ways(&f));
    }

    #[test]
    fn conf_bits_follow_nat_and_rules() {
        let none = Foreign::default();
        let some = Foreign {
            chains: vec!["ip filter FORWARD".into()],
            legacy: vec![],
        };
        assert_eq!(conf_bits(false, &none), 0);
        assert_eq!(conf_bits(true, &none), nat_conf::ON);
        assert_eq!(conf_bits(false, &some), nat_conf::GUARDED);
        assert_eq!(conf_bits(true, &some), nat_conf::ON | nat_conf::GUARDED);
    }
}

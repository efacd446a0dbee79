//! What in a namespace's own settings makes its kernel forward otherwise than the fast path's
//! maps say, per port and family: forwarding switched off, reverse-path filtering, IPv6
//! disabled on a device, policy routing rules beyond the kernel's defaults. A port and family
//! named here are left to the kernel (`iface_flags::KERNEL_V4`, `KERNEL_V6`); `show` says why.
//!
//! Read in the calling thread's namespace (`/proc/sys/net` and rtnetlink belong to the opener's
//! namespace). Changes arrive as rtnetlink netconf and rule notifications (`Watch`).

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

use super::rtnl::Rtnl;

/// Why the kernel keeps a port's IPv4 or IPv6: empty when the fast path may forward it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortPolicy {
    pub v4: Vec<String>,
    pub v6: Vec<String>,
}

/// The policy of each port (by ifindex) of `ports` (ifindex, device name).
pub fn read(rt: &Rtnl, ports: &[(u32, String)]) -> Result<BTreeMap<u32, PortPolicy>> {
    let conf = |family: &str, dev: &str, key: &str| -> Option<u32> {
        std::fs::read_to_string(format!("/proc/sys/net/{family}/conf/{dev}/{key}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let rules = rt.rules()?;
    let (v4_rules, v6_rules) = (unusual_rules(&rules, false), unusual_rules(&rules, true));
    let v6_all = conf("ipv6", "all", "forwarding");
    let rp_all = conf("ipv4", "all", "rp_filter").unwrap_or(0);
    let mut out = BTreeMap::new();
    for (ifindex, dev) in ports {
        let mut p = PortPolicy::default();
        match conf("ipv4", dev, "forwarding") {
            Some(0) => p.v4.push(format!("IPv4 forwarding is off on {dev}")),
            Some(_) => {}
            None => {
                p.v4.push(format!("net.ipv4.conf.{dev}.forwarding cannot be read"))
            }
        }
        let rp = rp_all.max(conf("ipv4", dev, "rp_filter").unwrap_or(0));
        if rp != 0 {
            p.v4.push(format!(
                "reverse-path filtering is on for {dev} (rp_filter {rp})"
            ));
        }
        match v6_all {
            Some(0) => {
                p.v6.push("IPv6 forwarding is off (net.ipv6.conf.all.forwarding 0)".into())
            }
            Some(_) => {}
            None => {
                p.v6.push("net.ipv6.conf.all.forwarding cannot be read".into())
            }
        }
        if conf("ipv6", dev, "disable_ipv6").is_none_or(|v| v != 0) {
            p.v6.push(format!("IPv6 is disabled on {dev}"));
        }
        p.v4.extend(v4_rules.iter().cloned());
        p.v6.extend(v6_rules.iter().cloned());
        out.insert(*ifindex, p);
    }
    Ok(out)
}

/// The rules of one family (`ipv6`) beyond the kernel's defaults (`0: lookup local`,
/// `32766: lookup main`, and for IPv4 `32767: lookup default`), described for `show`; also
/// when the main table's rule is missing.
fn unusual_rules(rules: &[(bool, RuleMessage)], ipv6: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut main = false;
    for (_, m) in rules.iter().filter(|(v6, _)| *v6 == ipv6) {
        let (mut prio, mut table) = (0, m.header.table as u32);
        for a in &m.attributes {
            match a {
                RuleAttribute::Priority(p) => prio = *p,
                RuleAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        let plain = m.header.src_len == 0
            && m.header.dst_len == 0
            && m.header.tos == 0
            && m.header.flags.is_empty()
            && m.header.action == RuleAction::ToTable
            && m.attributes.iter().all(|a| {
                matches!(
                    a,
                    RuleAttribute::Priority(_) | RuleAttribute::Table(_) | RuleAttribute::Protocol(_)
                ) || matches!(a, RuleAttribute::FwMark(0) | RuleAttribute::FwMask(0))
                    // The kernel reports "unset" as all ones.
                    || matches!(
                        a,
                        RuleAttribute::SuppressPrefixLen(u32::MAX)
                            | RuleAttribute::SuppressIfGroup(u32::MAX)
                    )
            });
        let default = plain && matches!((prio, table), (0, 255) | (32766, 254))
            || (plain && !ipv6 && (prio, table) == (32767, 253));
        main |= default && table == 254;
        if !default {
            out.push(format!("policy routing rule {}", describe(m, prio, table)));
        }
    }
    if !main {
        out.push(format!(
            "no plain rule looks up the main table ({})",
            if ipv6 { "IPv6" } else { "IPv4" }
        ));
    }
    out
}

/// A rule as `ip rule` prints it, roughly.
fn describe(m: &RuleMessage, prio: u32, table: u32) -> String {
    let mut s = format!("{prio}:");
    let (mut from, mut to) = (None, None);
    for a in &m.attributes {
        match a {
            RuleAttribute::Source(ip) => from = Some(format!("{ip}/{}", m.header.src_len)),
            RuleAttribute::Destination(ip) => to = Some(format!("{ip}/{}", m.header.dst_len)),
            _ => {}
        }
    }
    s += &format!(" from {}", from.as_deref().unwrap_or("all"));
    if let Some(t) = to {
        s += &format!(" to {t}");
    }
    for a in &m.attributes {
        match a {
            RuleAttribute::Iifname(d) => s += &format!(" iif {d}"),
            RuleAttribute::Oifname(d) => s += &format!(" oif {d}"),
            RuleAttribute::FwMark(v) => s += &format!(" fwmark {v:#x}"),
            RuleAttribute::Priority(_)
            | RuleAttribute::Table(_)
            | RuleAttribute::Protocol(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Destination(_)
            | RuleAttribute::FwMask(_) => {}
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            RuleAttribute::SuppressPrefixLen(n) => s += &format!(" suppress_prefixlength {n}"),
            other => s += &format!(" {other:?}"),
        }
    }
    match m.header.action {
        RuleAction::ToTable => s += &format!(" lookup {table}"),
        other => s += &format!(" {}", format!("{other:?}").to_lowercase()),
    }
    s
}

/// rtnetlink groups of netconf (forwarding, rp_filter) and rule changes.
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_RULE: u32 = 19;
const RTNLGRP_IPV4_NETCONF: u32 = 24;
const RTNLGRP_IPV6_NETCONF: u32 = 25;

/// Notifications of a namespace's forwarding settings and rules (opened in it).
pub struct Watch {
    fd: OwnedFd,
}

impl Watch {
    pub fn open() -> Result<Watch> {
        let fd = super::netdev::socket(libc::NETLINK_ROUTE, 0, 0, "rtnetlink netconf")?;
        for group in [
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_RULE,
            RTNLGRP_IPV4_NETCONF,
            RTNLGRP_IPV6_NETCONF,
        ] {
            super::netdev::join_group(&fd, group)
                .with_context(|| format!("joining rtnetlink group {group}"))?;
        }
        Ok(Watch { fd })
    }

    /// Something changed since the last call (an overrun socket counts as a change).
    pub fn changed(&mut self) -> bool {
        let mut any = false;
        super::netdev::drain(self.fd.as_raw_fd(), |_| any = true).is_err() || any
    }
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::rule::RuleHeader;

    fn rule(prio: u32, table: u32, extra: Vec<RuleAttribute>) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header = RuleHeader {
            action: RuleAction::ToTable,
            ..m.header
        };
        m.attributes = vec![RuleAttribute::Priority(prio), RuleAttribute::Table(table)];
        m.attributes.extend(extra);
        m
    }

    #[test]
    fn only_the_kernels_default_rules_are_plain() {
        // As the kernel reports them: suppressors unset (all ones).
        let unset = || vec![RuleAttribute::SuppressPrefixLen(u32::MAX)];
        let defaults = vec![
            (false, rule(0, 255, unset())),
            (false, rule(32766, 254, vec![])),
            (false, rule(32767, 253, vec![])),
            (true, rule(0, 255, vec![])),
            (true, rule(32766, 254, vec![])),
        ];
        assert!(unusual_rules(&defaults, false).is_empty());
        assert!(unusual_rules(&defaults, true).is_empty());
        // IPv6 has no `default` table rule by default: one is unusual there.
        let mut more = defaults.clone();
        more.push((true, rule(32767, 253, vec![])));
        assert_eq!(unusual_rules(&more, true).len(), 1);
        // A selector, another table, another action: each one is named.
        let mut more = defaults.clone();
        more.push((false, rule(100, 200, vec![RuleAttribute::FwMark(0x4000)])));
        more.push((
            false,
            rule(32765, 254, vec![RuleAttribute::Iifname("qr-x".into())]),
        ));
        more.push((
            false,
            rule(32000, 254, vec![RuleAttribute::SuppressPrefixLen(0)]),
        ));
        let said = unusual_rules(&more, false);
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[2].contains("suppress_prefixlength 0"), "{said:?}");
        assert!(
            said[0].contains("fwmark 0x4000") && said[0].contains("lookup 200"),
            "{said:?}"
        );
        assert!(said[1].contains("iif qr-x"), "{said:?}");
        assert!(unusual_rules(&more, true).is_empty());
        // Without the main table's rule the kernel never routes by it.
        let v4: Vec<_> = defaults
            .iter()
            .filter(|(v6, m)| *v6 || m.attributes[1] != RuleAttribute::Table(254))
            .cloned()
            .collect();
        assert_eq!(unusual_rules(&v4, false).len(), 1);
    }
}

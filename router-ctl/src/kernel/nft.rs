//! The router's NAT rules for the kernel path, in nftables: one table per router namespace,
//! owned by this project and replaced atomically (one `nft -f` transaction). The rules are
//! Neutron's L3 agent's (legacy router, iptables) in nftables form; see `ruleset`.
//!
//! nftables' netlink protocol has no maintained Rust client: the `nft` binary is run, from the
//! calling thread (a forked child keeps the thread's network namespace).

use std::{io::Write as _, net::Ipv4Addr, process::Stdio};

use anyhow::{bail, Context as _, Result};

/// The table's name in every router namespace.
pub const TABLE: &str = "router_nat";

/// What the rules need to know.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nat {
    /// The `qg-` device.
    pub device: String,
    /// The router's external IPv4 address (SNAT target); None when it has none.
    pub gateway_ip: Option<Ipv4Addr>,
    pub enable_snat: bool,
    /// (floating IP, fixed IP).
    pub floating_ips: Vec<(Ipv4Addr, Ipv4Addr)>,
}

/// The table, as `nft -f` takes it:
/// - mangle: packets entering through `qg-` get mark 0x2/0xffff (Neutron's external mark);
/// - floating IPs: DNAT F → X in prerouting and output (the router's own traffic), SNAT X → F;
/// - never NAT between tenant subnets: leaving through another device than `qg-` and not
///   DNATed, accept; floating IPs' SNAT comes before the gateway's;
/// - with `enable_snat`: SNAT to the gateway IP through `qg-` (fully random ports), and the
///   hairpin: DNATed traffic that did not enter through `qg-` is SNATed to the gateway IP.
pub fn ruleset(n: &Nat) -> String {
    let dev = &n.device;
    let mut t = format!("table ip {TABLE} {{\n");
    t += "  chain mangle_prerouting {\n    type filter hook prerouting priority mangle; policy accept;\n";
    t += &format!("    iifname \"{dev}\" meta mark set meta mark & 0xffff0000 | 0x2\n  }}\n");
    t += "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n";
    for (f, x) in &n.floating_ips {
        t += &format!("    ip daddr {f} dnat to {x}\n");
    }
    t += "  }\n  chain output {\n    type nat hook output priority -100; policy accept;\n";
    for (f, x) in &n.floating_ips {
        t += &format!("    ip daddr {f} dnat to {x}\n");
    }
    t += "  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n";
    t += &format!("    oifname != \"{dev}\" ct status & dnat == 0 accept\n");
    for (f, x) in &n.floating_ips {
        t += &format!("    ip saddr {x} snat to {f}\n");
    }
    if let (true, Some(g)) = (n.enable_snat, n.gateway_ip) {
        t += &format!("    oifname \"{dev}\" snat to {g} fully-random\n");
        t += &format!("    meta mark & 0xffff != 0x2 ct status dnat snat to {g} fully-random\n");
    }
    t += "  }\n}\n";
    t
}

/// Where `nft` is looked for: the distributions' places, never the caller's PATH (a daemon or
/// fencer started from a shell must not run whatever `nft` that shell would).
const NFT_PATHS: [&str; 4] = [
    "/usr/sbin/nft",
    "/sbin/nft",
    "/usr/bin/nft",
    "/usr/local/sbin/nft",
];
/// How long one `nft` run may take: the fencer acts within a margin of a few hundred
/// milliseconds, and a hung `nft` must not hold it (nor an apply) forever.
const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn nft_path() -> Result<&'static str> {
    NFT_PATHS
        .iter()
        .copied()
        .find(|p| std::path::Path::new(p).exists())
        .context("cannot find `nft` in /usr/sbin, /sbin, /usr/bin or /usr/local/sbin (install nftables: `cargo xtask setup`)")
}

fn run(script: &str) -> Result<()> {
    let nft = nft_path()?;
    let mut child = std::process::Command::new(nft)
        .args(["-f", "-"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {nft}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let t0 = std::time::Instant::now();
    loop {
        if child.try_wait().context("waiting for nft")?.is_some() {
            break;
        }
        if t0.elapsed() > NFT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("nft did not finish within {NFT_TIMEOUT:?}; killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Replaces the table with `n`'s rules in one transaction (in the calling thread's namespace).
pub fn replace(n: &Nat) -> Result<()> {
    run(&format!(
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\n{}",
        ruleset(n)
    ))
}

/// Removes the table, if there is one.
pub fn remove() -> Result<()> {
    run(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"))
}

/// The fence of an HA router whose host lost its lease: nothing of the namespace's own ARP
/// and neighbour discovery leaves (no answer for the router's addresses, no request that
/// would teach a neighbour its MAC again), while forwarding goes on with the neighbours the
/// fast path has, until the clients follow the new active's announcements.
pub const FENCE: &str = "router_fence";

pub fn fence_ruleset() -> String {
    format!(
        "table arp {FENCE} {{\n  chain output {{\n    type filter hook output priority 0; policy drop;\n  }}\n}}\n\
         table ip6 {FENCE} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} drop\n  }}\n}}\n"
    )
}

/// Puts the fence up (in the calling thread's namespace).
pub fn fence() -> Result<()> {
    run(&format!("{}{}", unfence_text(), fence_ruleset()))
}

fn unfence_text() -> String {
    format!(
        "table arp {FENCE} {{}}\ndelete table arp {FENCE}\ntable ip6 {FENCE} {{}}\ndelete table ip6 {FENCE}\n"
    )
}

/// Takes the fence down, if there is one.
pub fn unfence() -> Result<()> {
    run(&unfence_text())
}

/// The table recording which flows the kernel forwarded, in routers whose namespace holds
/// foreign rules on the forwarding path (see `crate::guard`).
pub const GUARD: &str = "router_guard";
/// Sets of `GUARD`: TCP and UDP flows, ICMP echo flows.
pub const SEEN: &str = "seen";
pub const SEEN_ICMP: &str = "seen_icmp";
/// How long a flow's record outlives the last packet the kernel forwarded.
const SEEN_TIMEOUT_S: u32 = 10;
/// Records per set (a full set records no new flow: those stay the kernel's).
const SEEN_SIZE: u32 = 65536;
/// One TCP or UDP packet in this many is looked at (an element is added once, never
/// refreshed): a flow the fast path would carry passes the kernel many times before it is
/// copied, and the kernel's path of short connections stays nearly as cheap as without us.
const SEEN_SAMPLE: u32 = 8;

/// The evidence table: a chain at the very end of postrouting (after every filter, mangle
/// and NAT chain, as the packet leaves) that records each direction of an established flow
/// the kernel forwarded, by its tuple as it leaves (translated); TCP and UDP from a sample of
/// their packets (`SEEN_SAMPLE`), ICMP echo from every one. Its `ct` match also turns
/// conntrack on in a namespace whose rules did not.
pub fn guard_ruleset() -> String {
    let set = |name: &str, typeof_: &str| {
        format!(
            "  set {name} {{ typeof {typeof_}; flags dynamic,timeout; timeout {SEEN_TIMEOUT_S}s; size {SEEN_SIZE}; }}\n"
        )
    };
    format!(
        "table ip {GUARD} {{\n{}{}  chain post {{\n    type filter hook postrouting priority 2147483647; policy accept;\n    \
         numgen random mod {SEEN_SAMPLE} 0 ct state established meta l4proto {{ tcp, udp }} add @{SEEN} {{ ip saddr . th sport . ip daddr . th dport . meta l4proto }}\n    \
         ct state established icmp type {{ echo-request, echo-reply }} add @{SEEN_ICMP} {{ ip saddr . ip daddr . icmp id }}\n  }}\n}}\n",
        set(SEEN, "ip saddr . th sport . ip daddr . th dport . meta l4proto"),
        set(SEEN_ICMP, "ip saddr . ip daddr . icmp id"),
    )
}

/// Puts the evidence table up, empty (in the calling thread's namespace).
pub fn guard() -> Result<()> {
    run(&format!(
        "table ip {GUARD} {{}}\ndelete table ip {GUARD}\n{}",
        guard_ruleset()
    ))
}

/// Forgets every flow recorded (the rules changed: what they let through before proves
/// nothing now).
pub fn guard_flush() -> Result<()> {
    run(&format!(
        "flush set ip {GUARD} {SEEN}\nflush set ip {GUARD} {SEEN_ICMP}\n"
    ))
}

/// Removes the evidence table, if there is one.
pub fn unguard() -> Result<()> {
    run(&format!("table ip {GUARD} {{}}\ndelete table ip {GUARD}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_agent() {
        let n = Nat {
            device: "qg-e1a2b3c4-5d".into(),
            gateway_ip: Some(Ipv4Addr::new(192, 168, 1, 10)),
            enable_snat: true,
            floating_ips: vec![(
                Ipv4Addr::new(192, 168, 1, 20),
                Ipv4Addr::new(172, 16, 101, 3),
            )],
        };
        let r = ruleset(&n);
        let post = r.split("chain postrouting").nth(1).unwrap();
        let order: Vec<usize> = [
            "ct status & dnat == 0 accept",
            "ip saddr 172.16.101.3 snat to 192.168.1.20",
            "oifname \"qg-e1a2b3c4-5d\" snat to 192.168.1.10 fully-random",
            "ct status dnat snat to 192.168.1.10",
        ]
        .iter()
        .map(|x| {
            post.find(x)
                .unwrap_or_else(|| panic!("{x} missing in {post}"))
        })
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{post}");
        assert_eq!(
            r.matches("ip daddr 192.168.1.20 dnat to 172.16.101.3")
                .count(),
            2
        );
        let off = ruleset(&Nat {
            enable_snat: false,
            ..n
        });
        assert!(!off.contains("snat to 192.168.1.10"));
        assert!(off.contains("snat to 192.168.1.20"));
    }
}

//! The external gateway in namespaces: SNAT, floating IPs, hairpin and tenant traffic as
//! Neutron's L3 agent's rules say, on devices at kernel defaults; the fast path's share of
//! NAT'd traffic, from its own counters.

use std::time::Duration;

use tests::{
    ctl_json, require_root, sh, sh_out,
    topo::{in_ns, tcp_transfer_via, Seed},
};

const FIP_VM3: &str =
    "[[router.floating_ip]]\nfloating_ip_address = \"192.168.1.20\"\nfixed_ip_address = \"172.16.101.3\"\n";
const FIP_VM1: &str =
    "[[router.floating_ip]]\nfloating_ip_address = \"192.168.1.20\"\nfixed_ip_address = \"172.16.100.3\"\n";
const OUT: &str = "203.0.113.5";

/// Counts, at the input of namespace `ns`, packets by source address (one counter per
/// address in `srcs`), and drops UDP to port 9 (the discard flows' sink).
fn count_sources(ns: &str, srcs: &[&str]) {
    let mut rules = String::new();
    for a in srcs {
        rules += &format!("    ip saddr {a} counter\n");
    }
    sh(&format!(
        "ip netns exec {ns} nft -f - <<'X'\ntable ip srccount {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n{rules}    udp dport 9 drop\n  }}\n}}\nX"
    ));
}

/// Packets counted from `src` in `ns` so far.
fn from(ns: &str, src: &str) -> u64 {
    let out = sh(&format!("ip netns exec {ns} nft list chain ip srccount input"));
    out.lines()
        .find(|l| l.contains(&format!("ip saddr {src} counter")))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter for {src} in {ns}: {out}"))
}

/// (source translated, destination translated) by the fast path on `dev`.
fn nat_counts(s: &Seed, dev: &str) -> (u64, u64) {
    let v = ctl_json(&["stats", &s.ids.router_id]);
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == dev)
        .unwrap_or_else(|| panic!("no stats for {dev}: {v}"));
    (
        d["nat"]["source_translated"].as_u64().unwrap(),
        d["nat"]["destination_translated"].as_u64().unwrap(),
    )
}

fn all_answered(ns: &str, dst: &str, n: u32) {
    let (sent, got) = Seed::ping_counts(ns, dst, n);
    assert_eq!((sent, got), (n, n), "ping {ns} → {dst}");
}

/// `n` UDP datagrams from `ns` (port 40000) to `dst`:9, 100 µs apart.
fn udp_flow(ns: &str, dst: &str, n: u32) {
    let dst = format!("{dst}:9");
    in_ns(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:40000").unwrap();
        for i in 0..n {
            s.send_to(&i.to_be_bytes(), &dst).unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
    })
    .join()
    .unwrap();
}

#[test]
fn snat_floating_ip_hairpin_and_tenant_traffic_follow_the_agents_rules() {
    require_root();
    let s = Seed::up_nat(|ids| ids.config_nat("", FIP_VM3));
    let (ns, out, ext) = (s.ns(), s.out(), s.ext());
    let (a, b, g) = (s.ids.dev_a(), s.ids.dev_b(), s.ids.dev_g());
    // Every device stays at kernel defaults; the agent's namespace settings are in place.
    for (key, want) in [
        ("net.netfilter.nf_conntrack_tcp_be_liberal", "1"),
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
    ] {
        assert_eq!(sh(&format!("ip netns exec {ns} sysctl -n {key}")).trim(), want, "{key}");
    }
    let addrs = sh(&format!("ip -n {ns} -4 -o addr show dev {g}"));
    assert!(addrs.contains("192.168.1.10/24") && addrs.contains("192.168.1.20/32"), "{addrs}");
    assert!(sh(&format!("ip -n {ns} route show default")).contains(&format!("via 192.168.1.1 dev {g}")));
    s.prime_neighbours();
    count_sources(&out, &["192.168.1.10", "192.168.1.20", "172.16.100.3", "172.16.101.3"]);
    count_sources(&s.vm3, &[OUT, "192.168.1.10", "172.16.100.3", "172.16.101.1"]);

    // vm1 has no floating IP: it leaves with the gateway address.
    all_answered(&s.vm1, OUT, 5);
    assert_eq!((from(&out, "192.168.1.10"), from(&out, "172.16.100.3")), (5, 0));
    // vm3 leaves with its floating IP.
    all_answered(&s.vm3, OUT, 5);
    assert_eq!((from(&out, "192.168.1.20"), from(&out, "172.16.101.3")), (5, 0));
    // The outside reaches vm3 at its floating IP, and vm3 sees the real source.
    all_answered(&out, "192.168.1.20", 5);
    assert_eq!(from(&s.vm3, OUT), 5 + 5, "5 requests, and the replies to vm3's 5 pings");
    // Hairpin: vm1 → vm3's floating IP arrives SNATed to the gateway address.
    all_answered(&s.vm1, "192.168.1.20", 5);
    assert_eq!((from(&s.vm3, "192.168.1.10"), from(&s.vm3, "172.16.100.3")), (5, 0));
    // The router's own traffic to a floating IP: DNAT in output, then the hairpin SNAT.
    all_answered(&ns, "192.168.1.20", 3);
    assert_eq!(from(&s.vm3, "192.168.1.10"), 8);
    // Between tenant subnets: never NATed.
    all_answered(&s.vm1, "172.16.101.3", 5);
    assert_eq!(from(&s.vm3, "172.16.100.3"), 5);
    // The upstream router has no route to the tenant subnets: all of the above needed NAT.
    assert!(!sh(&format!("ip -n {ext} route")).contains("172.16."));

    // TCP both ways, through SNAT and through the floating IP.
    let (n, same, peer) = tcp_transfer_via(&s.vm1, &out, OUT, OUT, 8 << 20);
    assert_eq!((n, same, peer.as_str()), (8 << 20, true, "192.168.1.10"), "vm1 → outside");
    let (n, same, peer) = tcp_transfer_via(&out, &s.vm3, "192.168.1.20", "0.0.0.0", 8 << 20);
    assert_eq!((n, same, peer.as_str()), (8 << 20, true, OUT), "outside → vm3's floating IP");
    let (n, same, peer) = tcp_transfer_via(&s.vm3, &out, OUT, OUT, 8 << 20);
    assert_eq!((n, same, peer.as_str()), (8 << 20, true, "192.168.1.20"), "vm3 → outside");

    // The fast path carries established NAT flows: a ping flood to the floating IP, and a
    // UDP flow through SNAT, at least 90 % each by its own counters.
    let (g0, b0, a0) = (nat_counts(&s, &g), nat_counts(&s, &b), nat_counts(&s, &a));
    let flood = sh_out(&format!("ip netns exec {out} ping -f -c 2000 -w 20 192.168.1.20"));
    let text = String::from_utf8_lossy(&flood.stdout);
    assert!(text.contains("2000 received"), "flood lost replies: {text}");
    let (g1, b1) = (nat_counts(&s, &g), nat_counts(&s, &b));
    eprintln!(
        "ping flood to the floating IP: {} of 2000 requests and {} of 2000 replies translated by the fast path",
        g1.1 - g0.1,
        b1.0 - b0.0
    );
    assert!(g1.1 - g0.1 >= 1800, "floating IP inbound: {} of 2000 in the fast path", g1.1 - g0.1);
    assert!(b1.0 - b0.0 >= 1800, "floating IP outbound: {} of 2000 in the fast path", b1.0 - b0.0);
    let before = from(&out, "192.168.1.10");
    udp_flow(&s.vm1, OUT, 2000);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(from(&out, "192.168.1.10") - before, 2000, "UDP through SNAT");
    let a1 = nat_counts(&s, &a);
    eprintln!("UDP through SNAT: {} of 2000 translated by the fast path", a1.0 - a0.0);
    assert!(a1.0 - a0.0 >= 1800, "SNAT UDP: {} of 2000 in the fast path", a1.0 - a0.0);
    // What the kernel got instead is counted by reason.
    let v = ctl_json(&["stats", &s.ids.router_id]);
    let passed_a = v.as_array().unwrap().iter().find(|d| d["device"] == a.as_str()).unwrap()["passed"]["reasons"].clone();
    assert!(passed_a["nat_no_flow"].as_u64().unwrap() >= 1, "a new flow's first packet goes to the kernel: {passed_a}");
    assert!(passed_a["nat_tcp_control"].as_u64().unwrap() >= 1, "FIN goes to the kernel: {passed_a}");
}

#[test]
fn snat_off_and_a_floating_ip_moved_then_removed() {
    require_root();
    let mut s = Seed::up_nat(|ids| ids.config_nat("enable_snat = false", FIP_VM3));
    let (ns, out, g) = (s.ns(), s.out(), s.ids.dev_g());
    s.prime_neighbours();
    count_sources(&out, &["192.168.1.10", "192.168.1.20", "172.16.100.3"]);
    // Without SNAT, vm1 leaves untranslated (and the upstream router cannot answer it).
    let (sent, got) = Seed::ping_counts(&s.vm1, OUT, 3);
    assert_eq!((sent > 0, got), (true, 0));
    assert_eq!((from(&out, "172.16.100.3"), from(&out, "192.168.1.10")), (sent as u64, 0));
    // The floating IP still translates.
    all_answered(&s.vm3, OUT, 3);
    assert_eq!(from(&out, "192.168.1.20"), 3);
    // Moved to vm1: the old flows are flushed, the outside now reaches vm1.
    all_answered(&out, "192.168.1.20", 3);
    let ids = &s.ids;
    let moved = ids.config_nat("enable_snat = false", FIP_VM1);
    let through_fip = |ns: &str| {
        let f: std::net::Ipv4Addr = "192.168.1.20".parse().unwrap();
        in_ns(ns, || router_ctl::kernel::conntrack::Conntrack::open(0).unwrap().dump().unwrap())
            .join()
            .unwrap()
            .into_iter()
            .filter(|x| x.orig.dst == f || x.reply.dst == f)
            .count()
    };
    assert!(through_fip(&ns) >= 2, "the kernel tracks flows through the floating IP before the move");
    s.apply(&moved);
    assert_eq!(through_fip(&ns), 0, "flows of the moved floating IP remain");
    count_sources(&s.vm1, &[OUT]);
    all_answered(&out, "192.168.1.20", 3);
    assert_eq!(from(&s.vm1, OUT), 3);
    // Removed: the address goes, and nothing answers it.
    let none = s.ids.config_nat("enable_snat = false", "");
    s.apply(&none);
    assert!(!sh(&format!("ip -n {ns} -4 -o addr show dev {g}")).contains("192.168.1.20"));
    let (_, got) = Seed::ping_counts(&out, "192.168.1.20", 2);
    assert_eq!(got, 0);
    // Destroy removes the NAT table and the agent's sysctls from the adopted namespace.
    let out = tests::ctl(&["destroy", &s.ids.router_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.destroyed();
    let tables = sh(&format!("ip netns exec {ns} nft list tables"));
    assert!(!tables.contains("router_nat"), "{tables}");
    assert_eq!(sh(&format!("ip netns exec {ns} sysctl -n net.ipv4.conf.all.arp_ignore")).trim(), "0");
}

fn ctl_ok(args: &[&str]) -> String {
    let out = tests::ctl(args);
    assert!(
        out.status.success(),
        "router-ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ctl_err(args: &[&str]) -> String {
    let out = tests::ctl(args);
    assert!(!out.status.success(), "router-ctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The openstack-style verbs, through the daemon's API: a gateway set on a router plugged
/// beforehand, a floating IP created, moved, disassociated and deleted, the gateway unset;
/// each change applied like a file, and bad arguments refused with the field named.
#[test]
fn gateway_and_floating_ip_verbs_change_what_forwards() {
    require_root();
    let s = Seed::up_nat(|ids| ids.config(""));
    // A network of its own: tests running side by side use the same addresses.
    let net = format!("public-{}", s.ids.tag);
    let (ns, out, g, id) = (s.ns(), s.out(), s.ids.dev_g(), s.ids.router_id.clone());
    s.prime_neighbours();
    count_sources(&out, &["192.168.1.10"]);
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&[
        "router", "set", &id, "--external-gateway", &net, "--port-id", &s.ids.port_g,
        "--fixed-ip", "subnet=192.168.1.0/24,ip-address=192.168.1.10,gateway=192.168.1.1",
        "-f", "json",
    ]))
    .unwrap();
    assert_eq!(v["external_gateway_info"]["enable_snat"], true, "{v}");
    assert_eq!(v["external_gateway_info"]["device"], g.as_str(), "{v}");
    all_answered(&s.vm1, OUT, 3);
    assert_eq!(from(&out, "192.168.1.10"), 3);
    // Refusals name the field and change nothing.
    let e = ctl_err(&["floating", "ip", "create", "--router", &id, "--floating-ip-address", "10.9.9.9", "--fixed-ip-address", "172.16.101.3"]);
    assert!(e.contains("'floating_ip_address' = 10.9.9.9 is outside every external subnet"), "{e}");
    let e = ctl_err(&["router", "set", &id, "--external-gateway", "public", "--fixed-ip", "subnet=192.168.1.0/24"]);
    assert!(e.contains("ip-address= is missing"), "{e}");

    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&[
        "floating", "ip", "create", "--router", &id, "--floating-ip-address", "192.168.1.20",
        "--fixed-ip-address", "172.16.101.3", "-f", "json",
    ]))
    .unwrap();
    assert_eq!((v["status"].as_str(), v["fixed_ip_address"].as_str()), (Some("ACTIVE"), Some("172.16.101.3")));
    count_sources(&s.vm3, &[OUT]);
    count_sources(&s.vm1, &[OUT]);
    all_answered(&out, "192.168.1.20", 3);
    assert_eq!(from(&s.vm3, OUT), 3);
    ctl_ok(&["floating", "ip", "set", "192.168.1.20", "--router", &id, "--fixed-ip-address", "172.16.100.3"]);
    all_answered(&out, "192.168.1.20", 3);
    assert_eq!((from(&s.vm1, OUT), from(&s.vm3, OUT)), (3, 3), "moved to vm1");
    let v: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["floating", "ip", "unset", "192.168.1.20", "--router", &id, "-f", "json"])).unwrap();
    assert_eq!((v["status"].as_str(), v["fixed_ip_address"].is_null()), (Some("DOWN"), true), "{v}");
    assert_eq!(Seed::ping_counts(&out, "192.168.1.20", 2).1, 0, "a disassociated floating IP answers nothing");
    let list: serde_json::Value = serde_json::from_str(&ctl_ok(&["floating", "ip", "list", "-f", "json"])).unwrap();
    assert!(list.as_array().unwrap().iter().any(|f| f["floating_ip_address"] == "192.168.1.20"), "{list}");
    let e = ctl_err(&["router", "unset", &id, "--external-gateway"]);
    assert!(e.contains("floating IPs 192.168.1.20 need the external gateway"), "{e}");
    ctl_ok(&["floating", "ip", "delete", "192.168.1.20", "--router", &id]);
    ctl_ok(&["router", "unset", &id, "--external-gateway"]);
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&["router", "show", &id, "-f", "json"])).unwrap();
    assert!(v["external_gateway_info"].is_null(), "{v}");
    assert!(!sh(&format!("ip -n {ns} -4 -o addr show dev {g}")).contains("192.168.1.10"));
    assert!(!sh(&format!("ip netns exec {ns} nft list tables")).contains("router_nat"));
    assert!(!sh(&format!("ip -n {ns} route")).contains("default"));
}

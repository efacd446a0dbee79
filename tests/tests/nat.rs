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
    let out = sh(&format!(
        "ip netns exec {ns} nft list chain ip srccount input"
    ));
    out.lines()
        .find(|l| l.contains(&format!("ip saddr {src} counter")))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter for {src} in {ns}: {out}"))
}

/// (source translated, destination translated) by the fast path on `dev`.
fn nat_counts(s: &Seed, dev: &str) -> (u64, u64) {
    s.nat_counts(dev)
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
        assert_eq!(
            sh(&format!("ip netns exec {ns} sysctl -n {key}")).trim(),
            want,
            "{key}"
        );
    }
    let addrs = sh(&format!("ip -n {ns} -4 -o addr show dev {g}"));
    assert!(
        addrs.contains("192.168.1.10/24") && addrs.contains("192.168.1.20/32"),
        "{addrs}"
    );
    assert!(
        sh(&format!("ip -n {ns} route show default")).contains(&format!("via 192.168.1.1 dev {g}"))
    );
    s.prime_neighbours();
    count_sources(
        &out,
        &[
            "192.168.1.10",
            "192.168.1.20",
            "172.16.100.3",
            "172.16.101.3",
        ],
    );
    count_sources(
        &s.vm3,
        &[OUT, "192.168.1.10", "172.16.100.3", "172.16.101.1"],
    );

    // vm1 has no floating IP: it leaves with the gateway address.
    all_answered(&s.vm1, OUT, 5);
    assert_eq!(
        (from(&out, "192.168.1.10"), from(&out, "172.16.100.3")),
        (5, 0)
    );
    // vm3 leaves with its floating IP.
    all_answered(&s.vm3, OUT, 5);
    assert_eq!(
        (from(&out, "192.168.1.20"), from(&out, "172.16.101.3")),
        (5, 0)
    );
    // The outside reaches vm3 at its floating IP, and vm3 sees the real source.
    all_answered(&out, "192.168.1.20", 5);
    assert_eq!(
        from(&s.vm3, OUT),
        5 + 5,
        "5 requests, and the replies to vm3's 5 pings"
    );
    // Hairpin: vm1 → vm3's floating IP arrives SNATed to the gateway address.
    all_answered(&s.vm1, "192.168.1.20", 5);
    assert_eq!(
        (from(&s.vm3, "192.168.1.10"), from(&s.vm3, "172.16.100.3")),
        (5, 0)
    );
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
    assert_eq!(
        (n, same, peer.as_str()),
        (8 << 20, true, "192.168.1.10"),
        "vm1 → outside"
    );
    let (n, same, peer) = tcp_transfer_via(&out, &s.vm3, "192.168.1.20", "0.0.0.0", 8 << 20);
    assert_eq!(
        (n, same, peer.as_str()),
        (8 << 20, true, OUT),
        "outside → vm3's floating IP"
    );
    let (n, same, peer) = tcp_transfer_via(&s.vm3, &out, OUT, OUT, 8 << 20);
    assert_eq!(
        (n, same, peer.as_str()),
        (8 << 20, true, "192.168.1.20"),
        "vm3 → outside"
    );

    // The fast path carries established NAT flows: a ping flood to the floating IP, and a
    // UDP flow through SNAT, at least 90 % each by its own counters.
    let (g0, b0, a0) = (nat_counts(&s, &g), nat_counts(&s, &b), nat_counts(&s, &a));
    let flood = sh_out(&format!(
        "ip netns exec {out} ping -f -c 10000 -w 30 192.168.1.20"
    ));
    let text = String::from_utf8_lossy(&flood.stdout);
    // With -w, ping sends until 10 000 replies came back (or the deadline): a lost request or
    // reply shows as more than 10 000 sent.
    assert_eq!(
        tests::topo::ping_summary(&text),
        (10000, 10000),
        "ping flood to the floating IP (sent, received): {text}"
    );
    let (g1, b1) = (nat_counts(&s, &g), nat_counts(&s, &b));
    let (inbound, outbound) = (
        tests::grew("destination_translated on qg-", g0.1, g1.1),
        tests::grew("source_translated on the instance's qr-", b0.0, b1.0),
    );
    eprintln!(
        "ping flood to the floating IP: {inbound} of 10000 requests and {outbound} of 10000 replies translated by the fast path"
    );
    assert!(
        inbound >= 9000,
        "floating IP inbound: {inbound} of 10000 in the fast path"
    );
    assert!(
        outbound >= 9000,
        "floating IP outbound: {outbound} of 10000 in the fast path"
    );
    let before = from(&out, "192.168.1.10");
    udp_flow(&s.vm1, OUT, 2000);
    // Until the last datagram arrived (no more than 2 000 were sent).
    tests::wait_until(
        "UDP through SNAT: 2000 datagrams",
        Duration::from_secs(3),
        || {
            let n = tests::grew(
                "datagrams from the gateway address",
                before,
                from(&out, "192.168.1.10"),
            );
            (n == 2000).then_some(()).ok_or(format!("{n} arrived"))
        },
    );
    let a1 = nat_counts(&s, &a);
    eprintln!(
        "UDP through SNAT: {} of 2000 translated by the fast path",
        a1.0 - a0.0
    );
    assert!(
        a1.0 - a0.0 >= 1800,
        "SNAT UDP: {} of 2000 in the fast path",
        a1.0 - a0.0
    );
    // What the kernel got instead is counted by reason.
    let v = ctl_json(&["stats", &s.ids.router_id]);
    let passed_a = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == a.as_str())
        .unwrap()["passed"]["reasons"]
        .clone();
    assert!(
        passed_a["nat_no_flow"].as_u64().unwrap() >= 1,
        "a new flow's first packet goes to the kernel: {passed_a}"
    );
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
    assert_eq!(
        (from(&out, "172.16.100.3"), from(&out, "192.168.1.10")),
        (sent as u64, 0)
    );
    // The floating IP still translates.
    all_answered(&s.vm3, OUT, 3);
    assert_eq!(from(&out, "192.168.1.20"), 3);
    // Moved to vm1: the old flows are flushed, the outside now reaches vm1.
    all_answered(&out, "192.168.1.20", 3);
    let ids = &s.ids;
    let moved = ids.config_nat("enable_snat = false", FIP_VM1);
    let through_fip = |ns: &str| {
        let f: std::net::Ipv4Addr = "192.168.1.20".parse().unwrap();
        tests::topo::conntrack_flows(ns)
            .into_iter()
            .filter(|x| x.orig.dst == f || x.reply.dst == f)
            .count()
    };
    assert!(
        through_fip(&ns) >= 2,
        "the kernel tracks flows through the floating IP before the move"
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.destroyed();
    let tables = sh(&format!("ip netns exec {ns} nft list tables"));
    assert!(!tables.contains("router_nat"), "{tables}");
    assert_eq!(
        sh(&format!(
            "ip netns exec {ns} sysctl -n net.ipv4.conf.all.arp_ignore"
        ))
        .trim(),
        "0"
    );
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
        "router",
        "set",
        &id,
        "--external-gateway",
        &net,
        "--port-id",
        &s.ids.port_g,
        "--fixed-ip",
        "subnet=192.168.1.0/24,ip-address=192.168.1.10,gateway=192.168.1.1",
        "-f",
        "json",
    ]))
    .unwrap();
    assert_eq!(v["external_gateway_info"]["enable_snat"], true, "{v}");
    assert_eq!(v["external_gateway_info"]["device"], g.as_str(), "{v}");
    all_answered(&s.vm1, OUT, 3);
    assert_eq!(from(&out, "192.168.1.10"), 3);
    // Refusals name the field and change nothing.
    let e = ctl_err(&[
        "floating",
        "ip",
        "create",
        "--router",
        &id,
        "--floating-ip-address",
        "10.9.9.9",
        "--fixed-ip-address",
        "172.16.101.3",
    ]);
    assert!(
        e.contains("'floating_ip_address' = 10.9.9.9 is outside every external subnet"),
        "{e}"
    );
    let e = ctl_err(&[
        "router",
        "set",
        &id,
        "--external-gateway",
        "public",
        "--fixed-ip",
        "subnet=192.168.1.0/24",
    ]);
    assert!(e.contains("ip-address= is missing"), "{e}");

    // The new floating IP is announced to the external network (gratuitous ARP).
    let garp = tests::topo::capture(&s.ext(), "up0", |f| {
        f.len() >= 42
            && f[12..14] == [8, 6]
            && f[28..32] == [192, 168, 1, 20]
            && f[38..42] == [192, 168, 1, 20]
    });
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&[
        "floating",
        "ip",
        "create",
        "--router",
        &id,
        "--floating-ip-address",
        "192.168.1.20",
        "--fixed-ip-address",
        "172.16.101.3",
        "-f",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        (v["status"].as_str(), v["fixed_ip_address"].as_str()),
        (Some("ACTIVE"), Some("172.16.101.3"))
    );
    assert!(
        garp.join().unwrap().is_some(),
        "no gratuitous ARP for the new floating IP"
    );
    count_sources(&s.vm3, &[OUT]);
    count_sources(&s.vm1, &[OUT]);
    all_answered(&out, "192.168.1.20", 3);
    assert_eq!(from(&s.vm3, OUT), 3);
    ctl_ok(&[
        "floating",
        "ip",
        "set",
        "192.168.1.20",
        "--router",
        &id,
        "--fixed-ip-address",
        "172.16.100.3",
    ]);
    all_answered(&out, "192.168.1.20", 3);
    assert_eq!(
        (from(&s.vm1, OUT), from(&s.vm3, OUT)),
        (3, 3),
        "moved to vm1"
    );
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(&[
        "floating",
        "ip",
        "unset",
        "192.168.1.20",
        "--router",
        &id,
        "-f",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        (v["status"].as_str(), v["fixed_ip_address"].is_null()),
        (Some("DOWN"), true),
        "{v}"
    );
    assert_eq!(
        Seed::ping_counts(&out, "192.168.1.20", 2).1,
        0,
        "a disassociated floating IP answers nothing"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["floating", "ip", "list", "-f", "json"])).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|f| f["floating_ip_address"] == "192.168.1.20"),
        "{list}"
    );
    let e = ctl_err(&["router", "unset", &id, "--external-gateway"]);
    assert!(
        e.contains("floating IPs 192.168.1.20 need the external gateway"),
        "{e}"
    );
    ctl_ok(&["floating", "ip", "delete", "192.168.1.20", "--router", &id]);
    ctl_ok(&["router", "unset", &id, "--external-gateway"]);
    let v: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["router", "show", &id, "-f", "json"])).unwrap();
    assert!(v["external_gateway_info"].is_null(), "{v}");
    assert!(!sh(&format!("ip -n {ns} -4 -o addr show dev {g}")).contains("192.168.1.10"));
    assert!(!sh(&format!("ip netns exec {ns} nft list tables")).contains("router_nat"));
    assert!(!sh(&format!("ip -n {ns} route")).contains("default"));
}

/// A paced TCP stream from `from` to `to_ip`:5002 in `to` for `secs` seconds (32 KiB every
/// 10 ms), checked byte by byte: (bytes sent, bytes received intact, peer address seen).
fn paced_stream(
    from: &str,
    to: &str,
    to_ip: &str,
    secs: u64,
) -> (
    std::thread::JoinHandle<usize>,
    std::thread::JoinHandle<(usize, bool, String)>,
) {
    use std::io::{Read, Write};
    let addr = format!("{to_ip}:5002");
    let (tx, rx) = std::sync::mpsc::channel();
    let bind = addr.clone();
    let server = in_ns(to, move || {
        let l = std::net::TcpListener::bind(&bind).unwrap();
        tx.send(()).unwrap();
        let (mut c, peer) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (mut n, mut ok) = (0usize, true);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    ok &= buf[..k]
                        .iter()
                        .enumerate()
                        .all(|(i, b)| *b == ((n + i) % 251) as u8);
                    n += k;
                }
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        (n, ok, peer.ip().to_string())
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let client = in_ns(from, move || {
        let mut c =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
                .unwrap();
        c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let t0 = std::time::Instant::now();
        let mut n = 0usize;
        while t0.elapsed() < Duration::from_secs(secs) {
            let chunk: Vec<u8> = (0..32768).map(|i| ((n + i) % 251) as u8).collect();
            c.write_all(&chunk).unwrap();
            n += chunk.len();
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    });
    (client, server)
}

static DAEMON: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A TCP connection through SNAT keeps going, intact and with the
/// same mapping, while the daemon is killed (-9) and restarted and the program is swapped
/// (`apply --reload`, as an upgrade does): conntrack keeps the mapping, the restarted daemon
/// copies it back, and the fast path carries the flows again afterwards.
#[test]
fn nat_connections_survive_a_daemon_restart_and_a_program_swap() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let s = Seed::up_nat(|ids| ids.config_nat("", FIP_VM3));
    let (out, a) = (s.out(), s.ids.dev_a());
    s.prime_neighbours();
    all_answered(&s.vm1, OUT, 2);
    let path = tests::topo::write_config(
        &format!("{}-nat", s.ids.tag),
        &s.ids.config_nat("", FIP_VM3),
    );
    let (c1, s1) = paced_stream(&s.vm1, &out, OUT, 8);
    let a0 = nat_counts(&s, &a).0;
    std::thread::sleep(Duration::from_secs(2));
    let a1 = nat_counts(&s, &a).0;
    assert!(
        a1 > a0,
        "the fast path carries the SNAT flow before the restart"
    );
    tests::topo::restart_daemon(
        &[],
        &std::env::temp_dir().join(format!("router-test-{}-nat-daemon.log", s.ids.tag)),
    );
    std::thread::sleep(Duration::from_secs(2));
    let outp = tests::ctl(&["apply", "--reload", "-f", &path]);
    assert!(
        outp.status.success(),
        "{}",
        String::from_utf8_lossy(&outp.stderr)
    );
    std::thread::sleep(Duration::from_secs(1));
    let (a2, seen2) = (nat_counts(&s, &a).0, s.seen(&a));
    let sent = c1.join().unwrap();
    let (got, intact, peer) = s1.join().unwrap();
    assert_eq!(
        (got, intact, peer.as_str()),
        (sent, true, "192.168.1.10"),
        "the SNAT connection"
    );
    let (a3, seen3) = (nat_counts(&s, &a).0, s.seen(&a));
    // What vm1 sent in the stream's last seconds (its data segments and acknowledgements, the
    // FIN, a neighbour probe at most): the fast path carried at least 90 % of it.
    let carried = tests::grew("source_translated", a2, a3);
    let seen = tests::grew("packets seen on the instance's qr-", seen2, seen3);
    eprintln!(
        "after the restart and the swap: {carried} of {seen} packets carried by the fast path"
    );
    assert!(
        seen >= 50 && carried * 10 >= seen * 9,
        "the fast path carries the flow again after the restart and the swap: {carried} of {seen} packets"
    );
    // The connection's FIN, a flow the fast path knows, went to the kernel, counted.
    let v = ctl_json(&["stats", &s.ids.router_id]);
    let passed_a = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == a.as_str())
        .unwrap()["passed"]["reasons"]
        .clone();
    assert!(
        passed_a["nat_tcp_control"].as_u64().unwrap() >= 1,
        "FIN goes to the kernel: {passed_a}"
    );
}

/// 2 000 concurrent UDP flows from vm1 through SNAT, three datagrams each (the third after all
/// second ones, when the fast path has copied most flows: a flow is reported after its
/// second datagram through the kernel): every flow keeps one gateway port for all three, and
/// no two flows share one.
#[test]
fn thousands_of_concurrent_snat_flows_get_distinct_stable_ports() {
    require_root();
    const FLOWS: u32 = 2000;
    let s = Seed::up_nat(|ids| ids.config_nat("", ""));
    let (out, a) = (s.out(), s.ids.dev_a());
    s.prime_neighbours();
    all_answered(&s.vm1, OUT, 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_ns(&out, move || {
        let u = std::net::UdpSocket::bind("203.0.113.5:9").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&u);
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with an int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                4,
            )
        };
        u.set_read_timeout(Some(Duration::from_secs(12))).unwrap();
        tx.send(()).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 16];
        while seen.len() < 3 * FLOWS as usize {
            let Ok((n, peer)) = u.recv_from(&mut buf) else {
                break;
            };
            if n == 5 {
                seen.push((
                    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                    buf[4],
                    peer,
                ));
            }
        }
        seen
    });
    rx.recv().unwrap();
    let before = nat_counts(&s, &a).0;
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (two_tx, two_rx) = std::sync::mpsc::channel::<()>();
    let vm1 = in_ns(&s.vm1, move || {
        let socks: Vec<std::net::UdpSocket> = (0..FLOWS)
            .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        for round in 0..3u8 {
            if round == 2 {
                two_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            for (i, u) in socks.iter().enumerate() {
                let mut m = (i as u32).to_be_bytes().to_vec();
                m.push(round);
                u.send_to(&m, "203.0.113.5:9").unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    // The third round once the daemon has copied the flows (how soon it does depends on what
    // else this machine runs: a CI run's parallel tests, a daemon restarted by another test):
    // what is asserted is where the third datagrams go once the copies exist.
    two_rx.recv().unwrap();
    let t0 = std::time::Instant::now();
    let copied = || {
        ctl_json(&["nat", &s.ids.router_id])
            .as_array()
            .map_or(0, |v| {
                v.iter()
                    .filter(|f| {
                        f["from"].as_str().is_some_and(|t| {
                            t.starts_with("172.16.100.3:") && t.ends_with("→ 203.0.113.5:9")
                        })
                    })
                    .count()
            })
    };
    let mut n = copied();
    while n < FLOWS as usize * 95 / 100 && t0.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(100));
        n = copied();
    }
    eprintln!(
        "{n} flows copied {:.2} s after the second round",
        t0.elapsed().as_secs_f64()
    );
    go_tx.send(()).unwrap();
    vm1.join().unwrap();
    let seen = server.join().unwrap();
    let mut port_of = std::collections::BTreeMap::new();
    for (flow, round, peer) in &seen {
        assert_eq!(
            peer.ip().to_string(),
            "192.168.1.10",
            "flow {flow} left with another source"
        );
        let p = port_of.entry(*flow).or_insert(peer.port());
        assert_eq!(
            *p,
            peer.port(),
            "flow {flow} changed its port in round {round}"
        );
    }
    assert_eq!(seen.len(), 3 * FLOWS as usize, "datagrams lost");
    let ports: std::collections::BTreeSet<u16> = port_of.values().copied().collect();
    assert_eq!(
        ports.len(),
        FLOWS as usize,
        "two flows share a gateway port"
    );
    let carried = tests::grew("source_translated", before, nat_counts(&s, &a).0);
    eprintln!(
        "{carried} of {} datagrams translated by the fast path",
        3 * FLOWS
    );
    assert!(
        carried >= FLOWS as u64 * 9 / 10,
        "the third datagrams should be the fast path's: {carried}; {}",
        tests::topo::daemon_report()
    );
}

/// A connected UDP socket in `ns` sends to `dst` (a closed port) and waits for the ICMP port
/// unreachable that answers it: true when it arrived (as ECONNREFUSED).
fn refused(ns: &str, dst: &str) -> bool {
    let dst = dst.to_string();
    in_ns(ns, move || {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        u.connect(&dst).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            let _ = u.send(b"knock");
            if let Err(e) = u.recv(&mut buf) {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    return true;
                }
            }
        }
        false
    })
    .join()
    .unwrap()
}

/// ICMP errors both ways through SNAT and through a floating IP, PMTU discovery through a
/// smaller MTU beyond the upstream router (TCP completes), and UDP datagrams without a
/// checksum (0) delivered through SNAT by the fast path with their checksum still 0.
#[test]
fn icmp_errors_pmtu_and_udp_without_checksum_cross_the_nat() {
    require_root();
    let s = Seed::up_nat(|ids| ids.config_nat("", FIP_VM3));
    let (out, ext, a) = (s.out(), s.ext(), s.ids.dev_a());
    s.prime_neighbours();
    all_answered(&s.vm1, OUT, 2);
    // ICMP errors: from outside back through SNAT, from vm3 out through its floating IP.
    assert!(
        refused(&s.vm1, "203.0.113.5:7777"),
        "port unreachable through SNAT"
    );
    assert!(
        refused(&out, "192.168.1.20:7777"),
        "port unreachable from vm3 through its floating IP"
    );
    // PMTU: the link beyond the upstream router takes 1280 bytes; vm1 and vm3 send bulk TCP
    // with DF, and the upstream router's fragmentation-needed errors must reach them.
    sh(&format!(
        "ip -n {ext} link set o0 mtu 1280 && ip -n {out} link set e0 mtu 1280"
    ));
    let (n, same, peer) = tcp_transfer_via(&s.vm1, &out, OUT, OUT, 4 << 20);
    assert_eq!(
        (n, same, peer.as_str()),
        (4 << 20, true, "192.168.1.10"),
        "PMTU through SNAT"
    );
    let (n, same, peer) = tcp_transfer_via(&s.vm3, &out, OUT, OUT, 4 << 20);
    assert_eq!(
        (n, same, peer.as_str()),
        (4 << 20, true, "192.168.1.20"),
        "PMTU through the floating IP"
    );
    // UDP without a checksum: sent with SO_NO_CHECK, received intact at the outside host (a
    // wrong checksum would be dropped there), most of them translated by the fast path.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_ns(&out, move || {
        let u = std::net::UdpSocket::bind("203.0.113.5:5003").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        tx.send(()).unwrap();
        let mut got = 0;
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = u.recv_from(&mut buf) {
            if n == 32
                && buf[..32].iter().all(|b| *b == 0x5a)
                && peer.ip().to_string() == "192.168.1.10"
            {
                got += 1;
            }
        }
        got
    });
    rx.recv().unwrap();
    let before = nat_counts(&s, &a).0;
    in_ns(&s.vm1, || {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let one: libc::c_int = 1;
        // SAFETY: SO_NO_CHECK (11) with an int: the kernel sends checksum 0.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&u),
                libc::SOL_SOCKET,
                11,
                &one as *const _ as *const libc::c_void,
                4,
            )
        };
        assert_eq!(rc, 0);
        for _ in 0..200 {
            u.send_to(&[0x5a; 32], "203.0.113.5:5003").unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        server.join().unwrap(),
        200,
        "UDP datagrams without checksum lost or altered"
    );
    assert!(
        nat_counts(&s, &a).0 - before >= 180,
        "checksum-less UDP should be the fast path's"
    );
}

/// The kernel's conntrack stays in charge of a flow's life: a one-way UDP flow the fast path
/// carries for longer than the namespace's UDP timeout keeps its kernel entry, hence its
/// gateway port, throughout, and the fast path keeps carrying it (its copy's time is extended
/// with each refresh of the kernel's entry); once it stops, the kernel expires it and the fast
/// path forgets it.
/// (The test shortens the namespace's UDP timeout to 3 s so as not to wait 30.)
#[test]
fn flows_in_use_stay_alive_in_the_kernel_and_idle_ones_are_forgotten() {
    require_root();
    let s = Seed::up_nat(|ids| ids.config_nat("", ""));
    let (ns, out, a, id) = (s.ns(), s.out(), s.ids.dev_a(), s.ids.router_id.clone());
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.netfilter.nf_conntrack_udp_timeout=3"
    ));
    s.prime_neighbours();
    all_answered(&s.vm1, OUT, 2);
    std::thread::sleep(Duration::from_millis(1500));
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_ns(&out, move || {
        let u = std::net::UdpSocket::bind("203.0.113.5:5004").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        tx.send(()).unwrap();
        let mut ports = std::collections::BTreeSet::new();
        let mut n = 0;
        let mut buf = [0u8; 16];
        while let Ok((_, peer)) = u.recv_from(&mut buf) {
            ports.insert(peer.port());
            n += 1;
        }
        (n, ports)
    });
    rx.recv().unwrap();
    let before = nat_counts(&s, &a).0;
    let sender = in_ns(&s.vm1, || {
        let u = std::net::UdpSocket::bind("0.0.0.0:40404").unwrap();
        for _ in 0..400 {
            u.send_to(b"tick", "203.0.113.5:5004").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    // The kernel's entry stays alive throughout (a dump also reaps expired entries at once,
    // so an entry left to expire would be gone from it, and its flow from the fast path).
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        let flows = tests::topo::conntrack_flows(&ns);
        assert!(
            flows
                .iter()
                .any(|f| f.orig.sport == 40404 && f.orig.proto == 17),
            "the kernel's entry of a flow in use expired after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let flows = ctl_json(&["nat", &id]);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["from"] == "172.16.100.3:40404 → 203.0.113.5:5004"),
        "the fast path has the flow: {flows}"
    );
    sender.join().unwrap();
    let (n, ports) = server.join().unwrap();
    assert_eq!(n, 400, "datagrams lost");
    assert_eq!(
        ports.len(),
        1,
        "the flow's gateway port changed: the kernel expired it under traffic ({ports:?})"
    );
    // The kernel carries the first 2 datagrams (then the flow is reported and copied); a copy
    // whose time ran out for want of a refresh would hand 2 more to the kernel every time.
    let carried = nat_counts(&s, &a).0 - before;
    assert!(
        carried >= 396,
        "the fast path carried {carried} of 400 datagrams: its copy was not kept alive"
    );
    // Idle: the kernel expires it (3 s) and the fast path's copy goes with it.
    let t0 = std::time::Instant::now();
    let waited = || t0.elapsed();
    loop {
        let flows = ctl_json(&["nat", &id]);
        if !flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["from"].as_str().unwrap_or("").contains(":40404"))
        {
            break;
        }
        // The kernel reaps expired entries from a periodic worker: allow it time.
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "an expired flow stayed in the fast path: {flows}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "the idle flow left the fast path {:.1} s after its last packet",
        waited().as_secs_f64()
    );
}

/// Where a differential frame is sent from.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The upstream router's port (the external network).
    Ext,
    /// vm3's port (behind the floating IP).
    Vm3,
}

fn ipv4_frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &tests::frame::Ipv4, l4: &[u8]) -> Vec<u8> {
    let mut l3 = ip.header(l4.len());
    l3.extend_from_slice(l4);
    tests::frame::ethernet(dst_mac, src_mac, 0x0800, &l3)
}

/// A UDP datagram with a checksum computed from scratch (or 0 when `zero`).
fn udp_dgram(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
    zero: bool,
) -> Vec<u8> {
    let mut u = tests::frame::udp(sport, dport, payload);
    if !zero {
        let mut p = Vec::new();
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0, 17]);
        p.extend_from_slice(&(u.len() as u16).to_be_bytes());
        p.extend_from_slice(&u);
        let c = tests::frame::checksum(&p);
        u[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    }
    u
}

fn icmp_msg(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = tests::frame::checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    router_ctl::config::parse_mac(&tests::topo::link_mac(ns, dev)).unwrap()
}

/// Sends `frames` (each from its side, 3 ms apart) and records the IPv4 frames arriving at vm3's
/// and at the upstream router's port, in order.
fn exchange(s: &Seed, frames: &[(Side, Vec<u8>)]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let open = |ns: &str, dev: &str| {
        let dev = std::ffi::CString::new(dev).unwrap();
        in_ns(ns, move || tests::topo::packet_socket(&dev))
            .join()
            .unwrap()
    };
    let (ext, vm3) = (open(&s.ext(), "up0"), open(&s.vm3, &s.ids.tap_b()));
    for (side, f) in frames {
        let fd = match side {
            Side::Ext => ext,
            Side::Vm3 => vm3,
        };
        // SAFETY: sends f on a bound packet socket.
        let n = unsafe { libc::send(fd, f.as_ptr() as *const libc::c_void, f.len(), 0) };
        assert_eq!(
            n,
            f.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(Duration::from_millis(3));
    }
    std::thread::sleep(Duration::from_millis(200));
    let drain = |fd: i32| {
        let mut v = Vec::new();
        let mut buf = vec![0u8; 9000];
        while let Some(f) = tests::topo::recv_incoming(fd, &mut buf) {
            if f.len() > 14 && f[12..14] == [8, 0] {
                v.push(f.to_vec());
            }
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        v
    };
    (drain(vm3), drain(ext))
}

/// Packets the fast path translated so far, source or destination, on every device.
fn translated_total(s: &Seed) -> u64 {
    s.stats()
        .iter()
        .map(|d| {
            d["nat"]["source_translated"].as_u64().unwrap()
                + d["nat"]["destination_translated"].as_u64().unwrap()
        })
        .sum()
}

/// Packets the fast path saw on all of the router's devices (forwarded, passed, dropped).
fn seen_total(s: &Seed) -> u64 {
    [s.ids.dev_a(), s.ids.dev_b(), s.ids.dev_g()]
        .iter()
        .map(|d| s.seen(d))
        .sum()
}

/// The ids of the programs `show` says are attached to the router's devices.
fn attached_programs(s: &Seed) -> Vec<u64> {
    let v = ctl_json(&["show", &s.ids.router_id]);
    v[0]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["prog_id"].as_u64())
        .collect()
}

/// The kernel's BPF links (any namespace) that run one of `progs`.
fn links_of(progs: &[u64]) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&sh("bpftool -j link show")).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .cloned()
        .collect()
}

/// Deletes every conntrack entry of the router's namespace.
fn flush_conntrack(ns: &str) {
    in_ns(ns, || {
        let mut ct = router_ctl::kernel::conntrack::Conntrack::open(0).unwrap();
        for f in ct.dump().unwrap() {
            ct.delete(&f.orig).unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Differential test against the kernel's NAT: the same frames through a floating IP, both ways
/// (UDP with and without checksum, TTL 2, ICMP echo both ways, an ICMP error from the instance
/// and one from a router beyond the gateway about the flows, then two TCP connections from
/// one client port, the second reusing it as soon as the server closed the first, which the
/// fast path carried), once with the router's programs detached (the kernel NATs everything)
/// and once with the fast path carrying the flows; what arrives on each side must be the same,
/// byte for byte. (Floating IPs only: the kernel picks SNAT ports at random, so two runs of
/// SNAT never agree on them.)
#[test]
fn the_fast_path_translates_what_the_kernels_nat_translates() {
    require_root();
    let mut s = Seed::up_nat(|ids| ids.config_nat("", FIP_VM3));
    // The programs come and go between the runs: the teardown's counter check does not apply.
    s.check_counters = false;
    let (ns, ext, g, b) = (s.ns(), s.ext(), s.ids.dev_g(), s.ids.dev_b());
    s.prime_neighbours();
    all_answered(&ext, "192.168.1.20", 1);
    // Neighbours fixed, and neither end's kernel answers anything: every frame recorded is the
    // router's doing.
    let (qg, qrb, up0, tapb) = (
        mac_of(&ns, &g),
        mac_of(&ns, &b),
        mac_of(&ext, "up0"),
        mac_of(&s.vm3, &s.ids.tap_b()),
    );
    let fmt = router_ctl::config::fmt_mac;
    sh(&format!(
        "ip -n {ns} neigh replace 172.16.101.3 lladdr {} nud permanent dev {b} && ip -n {ns} neigh replace 192.168.1.1 lladdr {} nud permanent dev {g}",
        fmt(&tapb),
        fmt(&up0)
    ));
    for (n, dev) in [
        (ext.clone(), "up0".to_string()),
        (s.vm3.clone(), s.ids.tap_b()),
    ] {
        sh(&format!(
            "ip netns exec {n} nft add table netdev deaf && ip netns exec {n} nft add chain netdev deaf in '{{ type filter hook ingress device \"{dev}\" priority 0; policy drop; }}'"
        ));
    }
    let (out, fip, x, up) = (
        [203, 0, 113, 5],
        [192, 168, 1, 20],
        [172, 16, 101, 3],
        [192, 168, 1, 1],
    );
    let ip = |src, dst, proto, ttl| tests::frame::Ipv4 {
        protocol: proto,
        ..tests::frame::Ipv4::udp(src, dst, ttl)
    };
    let from_ext = |i: &tests::frame::Ipv4, l4: &[u8]| (Side::Ext, ipv4_frame(qg, up0, i, l4));
    let from_vm3 = |i: &tests::frame::Ipv4, l4: &[u8]| (Side::Vm3, ipv4_frame(qrb, tapb, i, l4));
    let pay = [0x42u8; 24];
    let echo = |ty: u8, seq: u8| icmp_msg(ty, 0, [0x12, 0x34, 0, seq], &pay);
    // The quoted packets, as their senders sent them.
    let quoted_in = {
        let u = udp_dgram(out, x, 5001, 6001, &pay, true);
        let mut p = ip(out, x, 17, 63).header(u.len());
        p.extend_from_slice(&u);
        p
    };
    let quoted_out = {
        let u = udp_dgram(fip, out, 6000, 5000, &pay, false);
        let mut p = ip(fip, out, 17, 63).header(u.len());
        p.extend_from_slice(&u);
        p
    };
    let primers = vec![
        from_ext(
            &ip(out, fip, 17, 64),
            &udp_dgram(out, fip, 5000, 6000, &pay, false),
        ),
        from_ext(
            &ip(out, fip, 17, 64),
            &udp_dgram(out, fip, 5001, 6001, &pay, true),
        ),
        from_ext(&ip(out, fip, 1, 64), &echo(8, 1)),
    ];
    let frames = vec![
        from_ext(
            &ip(out, fip, 17, 64),
            &udp_dgram(out, fip, 5000, 6000, &pay, false),
        ),
        from_ext(
            &ip(out, fip, 17, 2),
            &udp_dgram(out, fip, 5000, 6000, &pay, false),
        ),
        from_ext(
            &ip(out, fip, 17, 64),
            &udp_dgram(out, fip, 5001, 6001, &pay, true),
        ),
        from_ext(&ip(out, fip, 1, 64), &echo(8, 2)),
        from_vm3(
            &ip(x, out, 17, 64),
            &udp_dgram(x, out, 6000, 5000, &pay, false),
        ),
        from_vm3(
            &ip(x, out, 17, 64),
            &udp_dgram(x, out, 6001, 5001, &pay, true),
        ),
        from_vm3(&ip(x, out, 1, 64), &echo(0, 2)),
        from_vm3(&ip(x, out, 1, 64), &icmp_msg(3, 3, [0; 4], &quoted_in)),
        from_ext(
            &ip(up, fip, 1, 64),
            &icmp_msg(3, 4, [0, 0, 0x05, 0x00], &quoted_out),
        ),
    ];
    // Two TCP connections from one client port of the outside host to vm3's floating IP, one
    // after the other: the first long enough to be copied into the fast path (16 segments each
    // way after the handshake), the server closing it (its FIN retires the copy, the kernel
    // sees the rest of the close), then the port reused at once by a second one (conntrack
    // replaces the closed connection's entry).
    let (cport, sport) = (7000u16, 80u16);
    let data = [0x5au8; 24];
    let mut conns = Vec::new();
    for (c_isn, s_isn, segments) in [(1_000u32, 50_000u32, 16u32), (900_000, 70_000, 3)] {
        let (mut c, mut sv) = (c_isn, s_isn);
        let ext_seg = |seq: u32, ack: u32, fl: u8, pay: &[u8]| {
            from_ext(
                &ip(out, fip, 6, 64),
                &tests::corpus::tcp(&out, &fip, cport, sport, seq, ack, fl, pay),
            )
        };
        let vm3_seg = |seq: u32, ack: u32, fl: u8, pay: &[u8]| {
            from_vm3(
                &ip(x, out, 6, 64),
                &tests::corpus::tcp(&x, &out, sport, cport, seq, ack, fl, pay),
            )
        };
        conns.push(ext_seg(c, 0, 0x02, &[]));
        c += 1;
        conns.push(vm3_seg(sv, c, 0x12, &[]));
        sv += 1;
        conns.push(ext_seg(c, sv, 0x10, &[]));
        for _ in 0..segments {
            conns.push(ext_seg(c, sv, 0x18, &data));
            c += data.len() as u32;
            conns.push(vm3_seg(sv, c, 0x18, &data));
            sv += data.len() as u32;
        }
        conns.push(vm3_seg(sv, c, 0x11, &[]));
        sv += 1;
        conns.push(ext_seg(c, sv, 0x10, &[]));
        conns.push(ext_seg(c, sv, 0x11, &[]));
        c += 1;
        conns.push(vm3_seg(sv, c, 0x10, &[]));
    }
    let id = s.ids.router_id.clone();
    let (mut runs, mut tcp_runs) = (Vec::new(), Vec::new());
    for fast in [false, true] {
        if fast {
            let t = s.ids.config_nat("", FIP_VM3);
            let out = tests::ctl(&[
                "apply",
                "--reload",
                "-f",
                &tests::topo::write_config(&format!("{}-diff", s.ids.tag), &t),
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            // The kernel alone: every device's link unpinned (one hook per device), and then
            // none of the router's programs attached anywhere.
            let progs = attached_programs(&s);
            assert_eq!(progs.len(), 3, "one program per device: {progs:?}");
            for d in [s.ids.dev_a(), s.ids.dev_b(), s.ids.dev_g()] {
                let pins: Vec<_> = [
                    router_ctl::state::link_pin(&id, &d),
                    router_ctl::state::tc_link_pin(&id, &d),
                ]
                .into_iter()
                .filter(|p| p.exists())
                .collect();
                assert_eq!(pins.len(), 1, "{d}: one hook's link pinned: {pins:?}");
                std::fs::remove_file(&pins[0])
                    .unwrap_or_else(|e| panic!("cannot detach {}: {e}", pins[0].display()));
            }
            tests::wait_until(
                "the router's programs to be detached",
                Duration::from_secs(5),
                || {
                    let links = links_of(&progs);
                    links.is_empty().then_some(()).ok_or(format!("{links:?}"))
                },
            );
        }
        flush_conntrack(&ns);
        let seen0 = seen_total(&s);
        std::thread::sleep(Duration::from_millis(300));
        // Twice: a flow is reported for a copy once it passed the kernel `COPY_AFTER` times.
        let _ = exchange(&s, &primers);
        let _ = exchange(&s, &primers);
        if fast {
            // The daemon copies the three flows the fast path reported (two UDP, one echo).
            tests::wait_until(
                "the daemon to copy the primers' flows",
                Duration::from_secs(3),
                || {
                    let flows = ctl_json(&["nat", &id]);
                    let n = flows.as_array().map_or(0, Vec::len);
                    (n >= 3).then_some(()).ok_or(format!("{flows}"))
                },
            );
        }
        let t0 = translated_total(&s);
        let got = exchange(&s, &frames);
        let t1 = translated_total(&s);
        if fast {
            let n = tests::grew("translated", t0, t1);
            assert!(
                n >= frames.len() as u64,
                "the fast path translated {n} of {} frames",
                frames.len()
            );
        }
        let tcp = exchange(&s, &conns);
        let t2 = translated_total(&s);
        if fast {
            // The first connection's segments after it was reported (8 from the outside) and
            // copied, both ways, up to the server's FIN.
            let n = tests::grew("translated", t1, t2);
            assert!(
                n >= 12,
                "the fast path translated {n} of the TCP connections' {} segments",
                conns.len()
            );
        }
        if !fast {
            assert_eq!(
                seen_total(&s),
                seen0,
                "the fast path saw packets while detached: the kernel was not alone"
            );
        }
        runs.push(got);
        tcp_runs.push(tcp);
    }
    let (kernel, fast) = (&tcp_runs[0], &tcp_runs[1]);
    // From the outside: SYN, ACK, the data, ACK and FIN; from vm3: SYN-ACK, the data, FIN and
    // the last ACK; for 16 and 3 data segments.
    assert_eq!(
        (kernel.0.len(), kernel.1.len()),
        (4 + 16 + 4 + 3, 3 + 16 + 3 + 3),
        "the kernel delivered every segment of both connections (to vm3, outside)"
    );
    for (side, k, f) in [("vm3", &kernel.0, &fast.0), ("outside", &kernel.1, &fast.1)] {
        assert_eq!(k.len(), f.len(), "TCP segments arriving {side}");
        for (i, (a, b)) in k.iter().zip(f.iter()).enumerate() {
            assert_eq!(
                a, b,
                "TCP segment {i} arriving {side}: the kernel's NAT made {a:02x?}, the fast path {b:02x?}"
            );
        }
    }
    let (kernel, fast) = (&runs[0], &runs[1]);
    assert_eq!(
        kernel.0.len(),
        5,
        "the kernel delivered to vm3: {:02x?}",
        kernel.0
    );
    assert_eq!(
        kernel.1.len(),
        4,
        "the kernel delivered outside: {:02x?}",
        kernel.1
    );
    for (side, k, f) in [("vm3", &kernel.0, &fast.0), ("outside", &kernel.1, &fast.1)] {
        assert_eq!(k.len(), f.len(), "frames arriving {side}");
        for (i, (a, b)) in k.iter().zip(f.iter()).enumerate() {
            assert_eq!(
                a, b,
                "frame {i} arriving {side}: the kernel's NAT made {a:02x?}, the fast path {b:02x?}"
            );
        }
    }
}

/// A floating IP moved, then removed, while the outside pings it every 20 ms: after the move no
/// echo request reaches the old instance (beyond one in flight) and the new one answers; after
/// the removal none reaches either.
#[test]
fn a_floating_ip_moved_and_removed_under_traffic() {
    require_root();
    let mut s = Seed::up_nat(|ids| ids.config_nat("", FIP_VM3));
    let out = s.out();
    s.prime_neighbours();
    all_answered(&out, "192.168.1.20", 2);
    count_sources(&s.vm1, &[OUT]);
    count_sources(&s.vm3, &[OUT]);
    let o = out.clone();
    let pinger = std::thread::spawn(move || {
        let r = sh_out(&format!(
            "ip netns exec {o} ping -i 0.02 -c 200 -W 1 -w 15 192.168.1.20"
        ));
        tests::topo::ping_summary(&String::from_utf8_lossy(&r.stdout))
    });
    std::thread::sleep(Duration::from_millis(1000));
    let moved = s.ids.config_nat("", FIP_VM1);
    s.apply(&moved);
    let at_vm3 = from(&s.vm3, OUT);
    assert!(at_vm3 >= 30, "vm3 answered before the move: {at_vm3}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        from(&s.vm3, OUT) <= at_vm3 + 1,
        "echo requests still reached vm3 after the move"
    );
    let at_vm1 = from(&s.vm1, OUT);
    assert!(at_vm1 >= 50, "vm1 got {at_vm1} requests after the move");
    let none = s.ids.config_nat("", "");
    s.apply(&none);
    let (a1, a3) = (from(&s.vm1, OUT), from(&s.vm3, OUT));
    let (sent, got) = pinger.join().unwrap();
    assert!(sent >= 150, "{sent} sent");
    assert!(
        got as u64 >= at_vm1 + at_vm3 - 2,
        "answered {got} of {} that arrived",
        at_vm1 + at_vm3
    );
    assert_eq!(
        (from(&s.vm1, OUT), from(&s.vm3, OUT)),
        (a1, a3),
        "requests reached an instance after the removal"
    );
}

/// A connection's conntrack entry read from one table and installed into another (what a
/// standby host gets from the active one, `agent::replica`) keeps its translation: deleted
/// from the kernel and installed again from what the dump said, the TCP connection through a
/// fully random SNAT goes on from the same port, with its state, mark and timeout; without
/// the install the kernel picks the connection up again with another port. A floating IP's
/// (DNAT) UDP entry comes back equal too.
#[test]
fn a_connection_installed_from_a_dump_keeps_its_translation_state_and_mark() {
    use router_ctl::kernel::conntrack::{self, Conntrack, Flow};
    use std::io::{Read as _, Write as _};
    require_root();
    let tag = tests::topo::unique_tag();
    let (c, n, s) = (format!("cc{tag}"), format!("cn{tag}"), format!("cs{tag}"));
    struct Gone(Vec<String>);
    impl Drop for Gone {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = sh_out(&format!("ip netns del {ns}"));
            }
        }
    }
    let _gone = Gone(vec![c.clone(), n.clone(), s.clone()]);
    sh(&format!(
        "ip netns add {c} && ip netns add {n} && ip netns add {s} && \
         ip -n {c} link add e0 type veth peer name e1 netns {n} && \
         ip -n {s} link add e0 type veth peer name e2 netns {n} && \
         ip -n {c} addr add 10.9.1.2/24 dev e0 && ip -n {c} link set e0 up && ip -n {c} link set lo up && \
         ip -n {c} route add default via 10.9.1.1 && \
         ip -n {s} addr add 10.9.2.2/24 dev e0 && ip -n {s} link set e0 up && ip -n {s} link set lo up && \
         ip -n {n} addr add 10.9.1.1/24 dev e1 && ip -n {n} addr add 10.9.2.1/24 dev e2 && \
         ip -n {n} link set e1 up && ip -n {n} link set e2 up && \
         ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1"
    ));
    sh(&format!(
        "ip netns exec {n} nft -f - <<'X'\ntable ip t {{\n  chain pre {{ type nat hook prerouting priority -100; ip daddr 10.9.1.1 udp dport 7000 dnat to 10.9.2.2:7001; }}\n  chain post {{ type nat hook postrouting priority 100; oifname \"e2\" snat to 10.9.2.1 fully-random; }}\n  chain forw {{ type filter hook forward priority 0; ct mark set 0x2a; }}\n}}\nX"
    ));
    let dump = |ns: &str| {
        in_ns(ns, || Conntrack::open(0).unwrap().dump().unwrap())
            .join()
            .unwrap()
    };
    let tcp_of = |flows: Vec<Flow>| {
        flows
            .into_iter()
            .find(|f| f.orig.proto == conntrack::IPPROTO_TCP && f.orig.dport == 5001)
    };
    // The server: bytes received so far, and every peer port it saw, until the connection ends.
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let got2 = got.clone();
    let server = in_ns(&s, move || {
        let l = std::net::TcpListener::bind("10.9.2.2:5001").unwrap();
        let (mut conn, _) = l.accept().unwrap();
        let mut ports = std::collections::BTreeSet::new();
        let mut buf = [0u8; 4096];
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        loop {
            ports.insert(conn.peer_addr().map(|a| a.port()).unwrap_or(0));
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break ports,
                Ok(k) => drop(got2.fetch_add(k, std::sync::atomic::Ordering::SeqCst)),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // The client writes a chunk each time it is told to; true: one more, false: close.
    let client = in_ns(&c, move || {
        let mut k = std::net::TcpStream::connect("10.9.2.2:5001").unwrap();
        k.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut sent = 0usize;
        let mut failed = false;
        while let Ok(more) = rx.recv() {
            if !more {
                break;
            }
            if k.write_all(&[7u8; 1000]).is_ok() {
                sent += 1000;
            } else {
                failed = true;
            }
            // Whatever comes back (a reset) shows as an error on the next read or write.
            let mut b = [0u8; 1];
            if let Err(e) = k.read(&mut b) {
                failed |= !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
            done_tx.send(()).unwrap();
        }
        (sent, failed)
    });
    let step = || {
        tx.send(true).unwrap();
        done_rx.recv().unwrap();
    };
    step();
    let f = tcp_of(dump(&n)).expect("the connection's entry");
    assert!(
        f.status & conntrack::status::SRC_NAT != 0 && f.reply.dst.to_string() == "10.9.2.1",
        "SNAT'd: {f:?}"
    );
    assert_eq!(f.mark, 0x2a, "the entry's mark: {f:?}");
    // Gone from the kernel, then installed from the dump.
    let g = f.clone();
    let created = in_ns(&n, move || {
        let mut ct = Conntrack::open(0).unwrap();
        ct.delete(&g.orig).unwrap();
        ct.install(&g).unwrap()
    })
    .join()
    .unwrap();
    assert!(created, "the entry was created");
    let back = tcp_of(dump(&n)).expect("the installed entry");
    let bits =
        conntrack::status::SEEN_REPLY | conntrack::status::ASSURED | conntrack::status::SRC_NAT;
    assert_eq!(
        (
            back.orig,
            back.reply,
            back.tcp_state,
            back.mark,
            back.status & bits
        ),
        (f.orig, f.reply, f.tcp_state, f.mark, f.status & bits),
        "the installed entry equals the dumped one"
    );
    let (t0, t1) = (f.timeout.unwrap(), back.timeout.unwrap());
    assert!(
        t1 <= t0 && t1 + 5 >= t0,
        "timeout {t1} s left, {t0} s dumped"
    );
    // Installed again over itself: an update, not a second entry.
    let g = f.clone();
    let again = in_ns(&n, move || Conntrack::open(0).unwrap().install(&g).unwrap())
        .join()
        .unwrap();
    assert!(!again, "an existing entry is updated");
    for _ in 0..5 {
        step();
    }
    tests::wait_until(
        "the server to get every byte sent before and after the install",
        Duration::from_secs(2),
        || match got.load(std::sync::atomic::Ordering::SeqCst) {
            6000 => Ok(()),
            n => Err(format!("{n} bytes")),
        },
    );
    // The control: deleted and not installed (a standby without the state), the next chunk
    // does not reach the server (the kernel sends it untranslated, or picks the connection up
    // with another port: either way the server's socket does not take it).
    let g = f.clone();
    in_ns(&n, move || {
        Conntrack::open(0).unwrap().delete(&g.orig).unwrap()
    })
    .join()
    .unwrap();
    step();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        got.load(std::sync::atomic::Ordering::SeqCst),
        6000,
        "without the install the connection does not go on (the test's control)"
    );
    tx.send(false).unwrap();
    let _ = client.join().unwrap();
    let ports = server.join().unwrap();
    assert_eq!(ports.len(), 1, "one peer port all along: {ports:?}");
    // A floating IP's entry (DNAT, UDP).
    in_ns(&s, || {
        let u = std::net::UdpSocket::bind("10.9.2.2:7001").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 8];
        let _ = u.recv_from(&mut b);
    });
    in_ns(&c, || {
        let u = std::net::UdpSocket::bind("10.9.1.2:7002").unwrap();
        u.send_to(b"x", "10.9.1.1:7000").unwrap();
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let udp = dump(&n)
        .into_iter()
        .find(|f| f.orig.proto == conntrack::IPPROTO_UDP && f.orig.dport == 7000)
        .expect("the DNAT entry");
    assert!(udp.status & conntrack::status::DST_NAT != 0, "{udp:?}");
    let g = udp.clone();
    assert!(in_ns(&n, move || {
        let mut ct = Conntrack::open(0).unwrap();
        ct.delete(&g.orig).unwrap();
        ct.install(&g).unwrap()
    })
    .join()
    .unwrap());
    let back = dump(&n)
        .into_iter()
        .find(|f| f.orig.proto == conntrack::IPPROTO_UDP && f.orig.dport == 7000)
        .expect("the installed DNAT entry");
    assert_eq!(
        (back.orig, back.reply, back.mark),
        (udp.orig, udp.reply, udp.mark)
    );
    // Entries in the way on a standby: one holding the translated tuple for another client
    // port (what it kept from when it forwarded itself, or an end not told yet), then the same
    // original tuple translated otherwise. The installed flow is the authority both times.
    let mut stale = f.clone();
    stale.orig.sport = f.orig.sport.wrapping_add(1);
    let (g, st) = (f.clone(), stale.clone());
    let (first, second) = in_ns(&n, move || {
        let mut ct = Conntrack::open(0).unwrap();
        let first = ct.install(&st).unwrap();
        (first, ct.install(&g).unwrap())
    })
    .join()
    .unwrap();
    assert!(first && second, "both created");
    let tcp = |d: Vec<conntrack::Flow>| -> Vec<conntrack::Flow> {
        d.into_iter()
            .filter(|x| x.orig.proto == conntrack::IPPROTO_TCP && x.orig.dst == f.orig.dst)
            .collect()
    };
    let now = tcp(dump(&n));
    assert_eq!(
        now.iter().map(|x| (x.orig, x.reply)).collect::<Vec<_>>(),
        vec![(f.orig, f.reply)],
        "the entry in the way was replaced by the installed one"
    );
    let mut moved = f.clone();
    moved.reply.dport = f.reply.dport.wrapping_add(1);
    let m = moved.clone();
    assert!(
        in_ns(&n, move || Conntrack::open(0).unwrap().install(&m).unwrap())
            .join()
            .unwrap(),
        "created again with its own translation"
    );
    let now = tcp(dump(&n));
    assert_eq!(
        now.iter().map(|x| (x.orig, x.reply)).collect::<Vec<_>>(),
        vec![(moved.orig, moved.reply)],
        "the same original tuple, translated as the installed flow says"
    );
}

//! Netfilter rules that are not ours in a router's namespace (Neutron's iptables chains, an
//! operator's rule): the fast path never lets through what they drop, carries the flows the
//! kernel accepted under them, and stops carrying a flow within milliseconds of a rule change
//! (see `router_ctl::guard`). The rules are written with iptables (iptables-nft), as the agent
//! writes them; devices at kernel defaults.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use tests::{
    grew, require_root, sh,
    topo::{in_ns, tcp_transfer, udp_socket_in, EchoStream, Seed},
    wait_until,
};

const VM3: &str = "172.16.101.3";

fn iptables(ns: &str, args: &str) {
    sh(&format!("ip netns exec {ns} iptables -w {args}"));
}

/// Packets the rule `-p PROTO --dport PORT -j DROP` of the agent's chain counted.
fn dropped(ns: &str, port: u16) -> u64 {
    let out = sh(&format!(
        "ip netns exec {ns} iptables -w -x -v -n -L neutron-l3-agent-FORWARD"
    ));
    out.lines()
        .find(|l| l.contains("DROP") && l.contains(&format!("dpt:{port}")))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no DROP rule for port {port}: {out}"))
}

/// Datagrams that reached a socket bound in vm3 on `port` within `wait` after `n` were sent
/// from vm1, 200 µs apart.
fn one_way(s: &Seed, port: u16, n: u32) -> u32 {
    let rx = udp_socket_in(&s.vm3, port, Duration::from_millis(50));
    let dst = format!("{VM3}:{port}");
    in_ns(&s.vm1, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..n {
            sock.send_to(&i.to_be_bytes(), &dst).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    })
    .join()
    .unwrap();
    count_for(&rx, Duration::from_millis(500))
}

/// Datagrams `rx` receives until none came for `quiet`.
fn count_for(rx: &UdpSocket, quiet: Duration) -> u32 {
    let mut buf = [0u8; 64];
    let (mut n, mut last) = (0, Instant::now());
    while last.elapsed() < quiet {
        if rx.recv(&mut buf).is_ok() {
            n += 1;
            last = Instant::now();
        }
    }
    n
}

/// The router's `show` as JSON.
fn show(s: &Seed) -> serde_json::Value {
    tests::ctl_json(&["show", &s.ids.router_id])[0].clone()
}

#[test]
fn foreign_rules_are_never_bypassed_and_accepted_flows_are_carried() {
    require_root();
    // The namespace holds the agent's rules before the router is applied: a chain of its own
    // in filter FORWARD that drops UDP to port 7777.
    let s = Seed::up_text(|ids| {
        let ns = ids.ns();
        iptables(&ns, "-N neutron-l3-agent-FORWARD");
        iptables(&ns, "-A FORWARD -j neutron-l3-agent-FORWARD");
        iptables(
            &ns,
            "-A neutron-l3-agent-FORWARD -p udp --dport 7777 -j DROP",
        );
        // As the agent sets it in every router namespace (without it TCP stays the kernel's
        // under foreign rules, see `follow.rs`).
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1"
        ));
        ids.config("")
    });
    let (ns, a) = (s.ns(), s.ids.dev_a());
    s.prime_neighbours();
    let v = show(&s);
    assert_eq!(v["filter"]["guarded"], true, "show: {v}");
    assert!(
        v["filter"]["rules"]
            .to_string()
            .contains("ip filter FORWARD"),
        "show: {v}"
    );

    // The denied flow: none of 200 datagrams arrives, the agent's rule counted every one.
    let guarded_before = s.passed(&a, "guarded");
    assert_eq!(
        one_way(&s, 7777, 200),
        0,
        "datagrams the rule drops arrived"
    );
    assert_eq!(dropped(&ns, 7777), 200);
    assert!(grew("guarded passes", guarded_before, s.passed(&a, "guarded")) >= 200);
    // Another port is accepted: every datagram arrives (a one-way flow stays the kernel's).
    assert_eq!(one_way(&s, 7778, 200), 200);

    // Flows the kernel accepted both ways are carried by the fast path: pings and TCP.
    let f0 = s.forwarded(&a);
    let (sent, got) = {
        let out = Seed::exec(&s.vm1, &format!("ping -c 300 -i 0.005 -W 2 {VM3}"));
        tests::topo::ping_summary(&String::from_utf8_lossy(&out.stdout))
    };
    assert_eq!((sent, got), (300, 300));
    let pings = grew("qr-a forwarded", f0, s.forwarded(&a));
    assert!(
        pings >= 250,
        "the fast path carried {pings} of 300 echo requests"
    );
    let (f0, k0, p0) = (s.forwarded(&a), s.forw_datagrams(), s.fast_path());
    assert_eq!(
        tcp_transfer(&s.vm1, &s.vm3, VM3, 256 << 20),
        (256 << 20, true)
    );
    let tcp = grew("qr-a forwarded", f0, s.forwarded(&a));
    let kernel = grew("ForwDatagrams", k0, s.forw_datagrams());
    eprintln!("256 MiB over TCP: the fast path carried {tcp} segments from vm1, the kernel forwarded {kernel} packets both ways");
    assert!(
        tcp >= 100 && tcp > 4 * kernel,
        "the fast path carried {tcp} segments from vm1, the kernel forwarded {kernel} packets; passed: {}",
        s.fast_path().passed_since(&p0, &a)
    );

    // A rule added while a flow runs in the fast path: no request leaves through the fast
    // path 10 ms after the rule is in.
    let stream = EchoStream::start(&s.vm1, &s.vm3, VM3, 7000);
    wait_until(
        "the exchange carried by the fast path",
        Duration::from_secs(5),
        || {
            let f = s.forwarded(&a);
            std::thread::sleep(Duration::from_millis(200));
            let d = grew("qr-a forwarded", f, s.forwarded(&a));
            if d >= 200 {
                Ok(())
            } else {
                Err(format!("{d} forwarded in 200 ms"))
            }
        },
    );
    let before = Instant::now();
    iptables(
        &ns,
        "-I neutron-l3-agent-FORWARD -p udp --dport 7000 -j DROP",
    );
    let ruled = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let seen = stream.arrivals();
    drop(stream);
    let late: Vec<Duration> = seen
        .iter()
        .filter(|t| **t > ruled)
        .map(|t| t.duration_since(ruled))
        .collect();
    let last = seen.iter().rev().find(|t| **t > before);
    eprintln!(
        "iptables ran {:?}; the last request arrived {:?} after it started; {} after it returned",
        ruled - before,
        last.map(|t| t.duration_since(before)),
        late.len()
    );
    assert!(
        late.iter().all(|d| *d <= Duration::from_millis(10)),
        "requests arrived after the rule was in: {late:?}"
    );
    assert!(dropped(&ns, 7000) > 1000, "the kernel dropped the rest");

    // The rules go: the router is no longer guarded, and routes without copies again.
    sh(&format!("ip netns exec {ns} nft delete table ip filter"));
    wait_until("the guard lifted", Duration::from_secs(2), || {
        let v = show(&s);
        if v["filter"]["guarded"] == false {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let g0 = s.passed(&a, "guarded");
    assert_eq!(one_way(&s, 7777, 200), 200);
    assert_eq!(s.passed(&a, "guarded"), g0);
}

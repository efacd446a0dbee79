//! `router-ctl run --follow`: a router namespace built by Neutron 29's own L3 agent code
//! (`tests/neutron/l3_agent.py`: the agent's addresses, routes, sysctls and its iptables and
//! ip6tables chains `neutron-l3-agent-*`, written with iptables-restore; the ports plugged as
//! the L2 agent's switch would, a firewall group's denying rule where FWaaS puts it) is
//! accelerated with nothing configured beyond `--follow`: routed, SNAT and floating-IP traffic
//! is carried by the fast path, the denying rule holds, a route the agent adds is followed, the
//! namespace's own forwarding switches, blackhole routes and policy rules are, and stopping
//! leaves nothing of ours in the namespace.

use std::time::{Duration, Instant};

use tests::{
    grew,
    neutron::{Agent, HaPair},
    require_root, sh,
    topo::{ping_summary, tcp_transfer_via, Seed},
    wait_until,
};

/// One `router-ctl run` at a time (it holds the daemon lock): the tests take turns.
static DAEMON: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_daemon() -> std::sync::MutexGuard<'static, ()> {
    DAEMON.lock().unwrap_or_else(|e| e.into_inner())
}

fn pings(from: &str, to: &str, n: u32) -> (u32, u32) {
    let out = Seed::exec(from, &format!("ping -c {n} -i 0.005 -W 2 {to}"));
    ping_summary(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn a_router_the_l3_agent_built_is_accelerated_with_only_follow() {
    require_root();
    let _daemon = one_daemon();
    let mut a = tests::in_setup(Agent::build);
    let (ns, vm1, vm3, out) = (a.ns.clone(), a.vm1(), a.vm3(), a.out());
    // The kernel alone first: the set-up works without us.
    assert_eq!(tests::in_setup(|| pings(&vm1, "203.0.113.5", 5)), (5, 5));
    a.follow();
    let v = a.followed();
    assert_eq!(
        (&v["filter"]["guarded"], &v["followed"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{v}"
    );
    let devices: Vec<&str> = v["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, [a.qr_a.as_str(), a.qr_b.as_str(), a.qg.as_str()]);
    assert!(
        v["routes"].to_string().contains("0.0.0.0/0"),
        "the default route: {v}"
    );

    // Routed between the tenant subnets: carried by the fast path once the kernel forwarded
    // it both ways under the agent's rules.
    let f0 = a.forwarded(&a.qr_a);
    assert_eq!(pings(&vm1, "172.16.101.3", 300), (300, 300));
    let carried = grew("qr-a forwarded", f0, a.forwarded(&a.qr_a));
    assert!(carried >= 250, "the fast path carried {carried} of 300");

    // Without a liberal conntrack, a TCP connection stays the kernel's (segments coming back
    // after the fast path carried its middle would be out of conntrack's window): the
    // transfer through SNAT is whole, none of it translated by the fast path.
    assert_eq!(
        sh(&format!(
            "ip netns exec {ns} sysctl -n net.netfilter.nf_conntrack_tcp_be_liberal"
        ))
        .trim(),
        "0"
    );
    let (s0, _) = a.translated(&a.qr_a);
    let (n, same, peer) = tcp_transfer_via(&vm1, &out, "203.0.113.5", "203.0.113.5", 64 << 20);
    assert_eq!((n, same, peer.as_str()), (64 << 20, true, "192.168.1.10"));
    assert_eq!(
        a.translated(&a.qr_a).0,
        s0,
        "TCP carried under a strict conntrack"
    );
    // The agent sets it when it creates a router namespace (namespaces.py): from here on TCP
    // is carried.
    a.liberal();
    std::thread::sleep(Duration::from_millis(1100));

    // SNAT by the agent's rule: the outside sees the gateway address; the fast path
    // translates the established flow as conntrack mapped it.
    let (s0, _) = a.translated(&a.qr_a);
    let (n, same, peer) = tcp_transfer_via(&vm1, &out, "203.0.113.5", "203.0.113.5", 64 << 20);
    assert_eq!((n, same, peer.as_str()), (64 << 20, true, "192.168.1.10"));
    let snat = grew("qr-a source translated", s0, a.translated(&a.qr_a).0);
    assert!(snat >= 100, "the fast path SNATed {snat} segments");

    // The floating IP by the agent's DNAT: the outside reaches vm3 at 192.168.1.20.
    let (_, d0) = a.translated(&a.qg);
    let (n, same, peer) = tcp_transfer_via(&out, &vm3, "192.168.1.20", "172.16.101.3", 64 << 20);
    assert_eq!((n, same, peer.as_str()), (64 << 20, true, "203.0.113.5"));
    let dnat = grew("qg destination translated", d0, a.translated(&a.qg).1);
    assert!(dnat >= 100, "the fast path DNATed {dnat} segments");

    // The denying rule holds: none of 200 datagrams arrives.
    assert_eq!(
        tests::neutron::denied_arrived(&vm1, &vm3, 200),
        0,
        "a denied datagram arrived"
    );

    // A route the agent adds (an extra route of the router) is followed: the router's state
    // (written once the maps hold it) is polled every half millisecond.
    let state_file = router_ctl::state::RouterState::path(&ns);
    let t0 = Instant::now();
    sh(&format!(
        "ip -n {ns} route add 10.10.0.0/16 via 172.16.101.254"
    ));
    let took = wait_until(
        "the extra route followed",
        Duration::from_secs(2),
        || loop {
            let text = std::fs::read_to_string(&state_file).unwrap_or_default();
            if text.contains("10.10.0.0/16") {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_millis(500) {
                return Err(text);
            }
            std::thread::sleep(Duration::from_micros(500));
        },
    );
    eprintln!("the agent's extra route was in the fast path's table {took:?} after `ip route add` started");
    let v = a.show().unwrap();
    assert!(v["routes"].to_string().contains("10.10.0.0/16"), "{v}");

    // keepalived's move, as an HA router's standby and active see it: the addresses (and the
    // routes through them) leave the ports (the standby holds the devices without them) and
    // come back, as keepalived's virtual_ipaddress and virtual_routes. Without them the fast
    // path forwards nothing (no connected subnet, no route); back, it carries again.
    let (qa, qb, qg) = (a.qr_a.clone(), a.qr_b.clone(), a.qg.clone());
    sh(&format!(
        "ip -n {ns} addr flush dev {qa} && ip -n {ns} addr flush dev {qb} && ip -n {ns} addr flush dev {qg}"
    ));
    wait_until(
        "the ports without addresses",
        Duration::from_secs(2),
        || {
            let v = a.show().ok_or("no show")?;
            let empty = v["interfaces"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["fixed_ips"].as_array().is_some_and(|f| f.is_empty()));
            if empty {
                Ok(())
            } else {
                Err(v["interfaces"].to_string())
            }
        },
    );
    let f0 = a.forwarded(&a.qr_a);
    assert_eq!(
        pings(&vm1, "172.16.101.3", 20).1,
        0,
        "answered without addresses"
    );
    assert_eq!(a.forwarded(&a.qr_a), f0, "forwarded without addresses");
    sh(&format!(
        "ip -n {ns} addr add 172.16.100.1/24 dev {qa} && ip -n {ns} addr add 172.16.101.1/24 dev {qb} && \
         ip -n {ns} addr add 192.168.1.10/24 dev {qg} && ip -n {ns} addr add 192.168.1.20/32 dev {qg} && \
         ip -n {ns} route replace default via 192.168.1.1 dev {qg} && \
         ip -n {ns} route replace 10.10.0.0/16 via 172.16.101.254"
    ));
    let f0 = a.forwarded(&a.qr_a);
    assert_eq!(pings(&vm1, "172.16.101.3", 300), (300, 300));
    let back = grew("qr-a forwarded", f0, a.forwarded(&a.qr_a));
    assert!(
        back >= 250,
        "after the addresses came back the fast path carried {back} of 300"
    );

    // Stopping follow mode leaves nothing of ours in the namespace, and the kernel goes on.
    a.stop();
    assert!(a.show().is_none(), "the router is still listed");
    assert!(
        !sh(&format!("ip netns exec {ns} nft list tables"))
            .contains(router_ctl::kernel::nft::GUARD),
        "the guard's table stayed"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/router-xdp/v1/{ns}")).exists(),
        "pins stayed"
    );
    let progs = sh(&format!("ip netns exec {ns} bpftool -j net show"));
    assert!(!progs.contains("tcx"), "programs stayed attached: {progs}");
    assert_eq!(pings(&vm1, "172.16.101.3", 5), (5, 5));
    // The agent's routes and rules are as it wrote them.
    let routes = sh(&format!("ip -n {ns} route"));
    assert!(
        routes.contains("default via 192.168.1.1")
            && routes.contains("10.10.0.0/16 via 172.16.101.254"),
        "{routes}"
    );
    assert!(sh(&format!(
        "ip netns exec {ns} iptables -w -S neutron-l3-agent-iv4fwg7777"
    ))
    .contains("--dport 7777 -j DROP"));
    assert!(sh(&format!("ip netns exec {ns} iptables -w -t nat -S"))
        .contains("-j SNAT --to-source 192.168.1.10 --random-fully"));

    // Followed again, then the agent deletes the namespace: the router is released.
    a.follow();
    wait_until("followed again", Duration::from_secs(5), || {
        a.show().ok_or("not yet".to_string())
    });
    sh(&format!("ip netns del {ns}"));
    wait_until(
        "released after the namespace went",
        Duration::from_secs(5),
        || match (
            a.show(),
            std::path::Path::new(&format!("/sys/fs/bpf/router-xdp/v1/{ns}")).exists(),
        ) {
            (None, false) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

#[test]
fn a_router_on_open_vswitch_internal_ports_is_accelerated_with_only_follow() {
    require_root();
    let _daemon = one_daemon();
    let mut a = tests::in_setup(Agent::build_on_ovs);
    a.liberal();
    let (vm1, vm3) = (a.vm1(), a.vm3());
    // The kernel alone first: through OVS's userspace datapath, both ways.
    assert_eq!(
        tests::in_setup(|| pings(&vm1, "172.16.101.3", 5)),
        (5, 5),
        "the set-up does not forward without us"
    );
    let (n, same) = tests::topo::tcp_transfer(&vm1, &vm3, "172.16.101.3", 4 << 20);
    assert_eq!((n, same), (4 << 20, true), "TCP through the kernel alone");
    a.follow();
    let v = a.followed();
    // OVS internal ports are taps here: tc.
    for i in v["interfaces"].as_array().unwrap() {
        assert_eq!(i["hook"], "tc", "{i}");
    }
    let f0 = a.forwarded(&a.qr_a);
    assert_eq!(pings(&vm1, "172.16.101.3", 300), (300, 300));
    let carried = grew("qr-a forwarded", f0, a.forwarded(&a.qr_a));
    assert!(carried >= 250, "the fast path carried {carried} of 300");
    let f0 = a.forwarded(&a.qr_a);
    let (n, same) = tests::topo::tcp_transfer(&vm1, &vm3, "172.16.101.3", 16 << 20);
    assert_eq!((n, same), (16 << 20, true), "TCP through the fast path");
    let tcp = grew("qr-a forwarded", f0, a.forwarded(&a.qr_a));
    assert!(tcp >= 100, "the fast path carried {tcp} TCP segments");
    // The agent's denying rule holds on OVS ports too.
    assert_eq!(
        tests::neutron::denied_arrived(&vm1, &vm3, 200),
        0,
        "a denied datagram arrived"
    );
}

/// The namespace's own switches are followed as its rules are: IPv4 forwarding switched off on
/// a port, a blackhole route, a policy routing rule — each stops what the kernel stops, in the
/// fast path too, within 10 ms of the command's return (a flow the fast path was carrying),
/// `show` says why, and when it is undone the fast path carries the flow again.
#[test]
fn forwarding_switches_blackholes_and_policy_rules_are_followed() {
    require_root();
    let _daemon = one_daemon();
    let mut a = tests::in_setup(Agent::build);
    a.liberal();
    let (ns, vm1, vm3, qa) = (a.ns.clone(), a.vm1(), a.vm3(), a.qr_a.clone());
    let port = 9300 + (std::process::id() % 500) as u16;
    a.follow_with(&["--metrics", &port.to_string()]);
    a.followed();
    // The metrics list the router as followed.
    let metrics = wait_until("metrics served", Duration::from_secs(5), || {
        tests::http_get(&format!("127.0.0.1:{port}"), "/metrics").ok_or("no answer".to_string())
    });
    let line = format!(
        "router_xdp_router{{router=\"{ns}\",router_id=\"{ns}\",namespace=\"{ns}\",origin=\"followed\"}} 1"
    );
    assert!(metrics.contains(&line), "{line} not in {metrics}");
    let stream = tests::topo::EchoStream::start(&vm1, &vm3, "172.16.101.3", 7100);
    let carried = |what: &str| {
        wait_until(what, Duration::from_secs(10), || {
            let f = a.forwarded(&qa);
            std::thread::sleep(Duration::from_millis(200));
            match grew("qr-a forwarded", f, a.forwarded(&qa)) {
                d if d >= 200 => Ok(()),
                d => Err(format!("{d} forwarded in 200 ms")),
            }
        })
    };
    for (what, on, off, reason, shown) in [
        (
            "IPv4 forwarding off on qr-a",
            format!("ip netns exec {ns} sysctl -qw net.ipv4.conf.{qa}.forwarding=0"),
            format!("ip netns exec {ns} sysctl -qw net.ipv4.conf.{qa}.forwarding=1"),
            "kernel_policy",
            "kernel_policy",
        ),
        (
            "a blackhole route to vm3",
            format!("ip -n {ns} route add blackhole 172.16.101.3/32"),
            format!("ip -n {ns} route del blackhole 172.16.101.3/32"),
            "kernel_route",
            "kernel_routes",
        ),
        (
            "a policy rule prohibiting vm1's subnet",
            format!("ip -n {ns} rule add from 172.16.100.0/24 prohibit pref 100"),
            format!("ip -n {ns} rule del pref 100"),
            "kernel_policy",
            "kernel_policy",
        ),
    ] {
        carried(&format!("the stream carried before {what}"));
        let p0 = a.stats(&qa)["passed"]["reasons"][reason]
            .as_u64()
            .unwrap_or(0);
        let before = Instant::now();
        sh(&on);
        let done = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let late = stream.after(done);
        eprintln!(
            "{what}: the command ran {:?}; {} datagrams arrived after it returned, the last {:?} after",
            done - before,
            late.len(),
            late.last()
        );
        assert!(
            late.iter().all(|d| *d <= Duration::from_millis(10)),
            "{what}: datagrams arrived after the kernel stopped forwarding them: {late:?}"
        );
        let passed = grew(
            reason,
            p0,
            a.stats(&qa)["passed"]["reasons"][reason]
                .as_u64()
                .unwrap_or(0),
        );
        assert!(
            passed >= 500,
            "{what}: the fast path passed {passed} as {reason}"
        );
        let v = a.show().unwrap();
        assert!(
            v[shown]
                .as_object()
                .map_or(v[shown].as_array().is_some_and(|r| !r.is_empty()), |o| !o
                    .is_empty()),
            "{what}: show says nothing: {v}"
        );
        sh(&off);
        carried(&format!("the stream carried again after {what} was undone"));
    }
}

/// Every frame of UDP that arrives on `dev` in `ns` while it runs (incoming only), whole.
struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    frames: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    fn start(ns: &str, dev: &str) -> Capture {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dev = std::ffi::CString::new(dev).unwrap();
        let st = stop.clone();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let frames = tests::topo::in_ns(ns, move || {
            let fd = tests::topo::packet_socket(&dev);
            ready.send(()).unwrap();
            let (mut v, mut buf) = (Vec::new(), vec![0u8; 65536]);
            while !st.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(f) = tests::topo::recv_incoming(fd, &mut buf) {
                    // IPv4, UDP.
                    if f.len() > 42 && f[12..14] == [8, 0] && f[23] == 17 {
                        v.push(f.to_vec());
                    }
                }
            }
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            v
        });
        is_ready.recv().unwrap();
        Capture { stop, frames }
    }

    fn stop(self) -> Vec<Vec<u8>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.frames.join().unwrap()
    }
}

/// The frames of one exchange round: by (where captured, UDP source and destination port,
/// sequence number in the payload), the whole frame.
type Arrivals = std::collections::BTreeMap<(&'static str, u16, u16, u32), Vec<u8>>;

/// One round of the parity exchange through the router of `a`: `n` datagrams, 1 ms apart, on
/// each of four flows, each echoed: routed (vm1 → vm3), SNAT (vm1 → out), the floating IP
/// (out → 192.168.1.20, vm3) and the firewall's denied port (vm1 → vm3:7777, nobody echoes).
/// Captured where each direction arrives: vm3's and out's devices for the requests, vm1's and
/// out's for the replies.
fn parity_round(a: &Agent, n: u32) -> Arrivals {
    let (vm1, vm3, out) = (a.vm1(), a.vm3(), a.out());
    let points = [
        ("vm1", &vm1, "t1"),
        ("vm3", &vm3, "t3"),
        ("out", &out, "e0"),
    ];
    let caps: Vec<(&'static str, Capture)> = points
        .iter()
        .map(|(name, ns, dev)| (*name, Capture::start(ns, dev)))
        .collect();
    let echo = |ns: &str, port: u16| {
        let s = tests::topo::udp_socket_in(ns, port, Duration::from_millis(500));
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..len], from).unwrap();
            }
        })
    };
    let echoes = [echo(&vm3, 6001), echo(&out, 6002), echo(&vm3, 6003)];
    let send = |ns: &str, flows: Vec<(u16, &'static str, u16)>| {
        tests::topo::in_ns(ns, move || {
            let socks: Vec<_> = flows
                .iter()
                .map(|(sport, dst, dport)| {
                    let s = std::net::UdpSocket::bind(("0.0.0.0", *sport)).unwrap();
                    s.set_nonblocking(true).unwrap();
                    (s, *dst, *dport)
                })
                .collect();
            for i in 0..n {
                for (s, dst, dport) in &socks {
                    let mut payload = [0x5au8; 40];
                    payload[..4].copy_from_slice(&i.to_be_bytes());
                    s.send_to(&payload, (*dst, *dport)).unwrap();
                    while s.recv(&mut [0u8; 64]).is_ok() {}
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(300));
        })
    };
    let senders = [
        send(
            &vm1,
            vec![
                (5001, "172.16.101.3", 6001),
                (5002, "203.0.113.5", 6002),
                (5004, "172.16.101.3", 7777),
            ],
        ),
        send(&out, vec![(5003, "192.168.1.20", 6003)]),
    ];
    for s in senders {
        s.join().unwrap();
    }
    for e in echoes {
        e.join().unwrap();
    }
    let mut got = Arrivals::new();
    for (name, cap) in caps {
        for f in cap.stop() {
            let l4 = 14 + ((f[14] & 0xf) as usize) * 4;
            let port = |o: usize| u16::from_be_bytes([f[l4 + o], f[l4 + o + 1]]);
            let seq = u32::from_be_bytes([f[l4 + 8], f[l4 + 9], f[l4 + 10], f[l4 + 11]]);
            let (sport, dport) = (port(0), port(2));
            // The IP ID is the sender's choice (per destination, at random): it is compared as
            // the header checksum that covers it verifies, then left out.
            assert_eq!(
                tests::frame::checksum(&f[14..l4]),
                0,
                "{name}: datagram {seq} of {sport} → {dport}: the IP header checksum does not verify"
            );
            let mut f = f;
            f[18..20].fill(0);
            f[24..26].fill(0);
            assert!(
                got.insert((name, sport, dport, seq), f).is_none(),
                "{name}: datagram {seq} of {sport} → {dport} arrived twice"
            );
        }
    }
    got
}

/// Kernel parity on a router Neutron's agent built: the same datagrams sent through the kernel
/// alone and then with the fast path arrive as the same bytes — Ethernet, IP and UDP headers,
/// checksums (the IP ID, which the senders pick at random, aside), NAT included (the kernel's conntrack entries outlive the first round, so the
/// second is translated as the first was) — and what the firewall drops arrives in neither.
#[test]
fn the_fast_path_sends_the_bytes_the_kernel_sends() {
    require_root();
    let _daemon = one_daemon();
    let mut a = tests::in_setup(Agent::build);
    a.liberal();
    const N: u32 = 2000;
    let kernel = parity_round(&a, N);
    a.follow();
    a.followed();
    let (f0, g0) = (a.forwarded(&a.qr_a), a.forwarded(&a.qg));
    let (s0, _) = a.translated(&a.qr_a);
    let (_, d0) = a.translated(&a.qg);
    let fast = parity_round(&a, N);
    // The fast path carried most of the second round, both ways and both translations.
    let carried = grew("qr-a forwarded", f0, a.forwarded(&a.qr_a));
    let back = grew("qg forwarded", g0, a.forwarded(&a.qg));
    let snat = grew("qr-a source translated", s0, a.translated(&a.qr_a).0);
    let dnat = grew("qg destination translated", d0, a.translated(&a.qg).1);
    eprintln!(
        "second round: the fast path forwarded {carried} from qr-a ({snat} SNATed) and {back} from qg ({dnat} DNATed)"
    );
    assert!(
        carried >= N as u64 && [snat, back, dnat].iter().all(|c| *c >= N as u64 / 2),
        "the fast path carried too little of the second round"
    );
    let flows = |m: &Arrivals| {
        let mut c = std::collections::BTreeMap::new();
        for (point, sport, dport, _) in m.keys() {
            *c.entry((*point, *sport, *dport)).or_insert(0u32) += 1;
        }
        c
    };
    assert_eq!(flows(&kernel), flows(&fast), "what arrived, by flow");
    assert!(
        !kernel.keys().chain(fast.keys()).any(|k| k.2 == 7777),
        "a datagram the firewall denies arrived"
    );
    // Every flow both ways: 4 request and reply streams at 3 points, but the denied one.
    assert_eq!(flows(&kernel).len(), 6, "{:?}", flows(&kernel));
    let mut differ = Vec::new();
    for (k, want) in &kernel {
        if fast.get(k) != Some(want) {
            differ.push(format!(
                "{k:?}:\n kernel {want:02x?}\n fast   {:02x?}",
                fast.get(k)
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} datagrams differ, the first: {}",
        differ.len(),
        kernel.len(),
        differ.first().unwrap()
    );
}

#[test]
fn an_ha_router_moved_by_keepalived_is_followed_to_its_new_master() {
    require_root();
    let _daemon = one_daemon();
    let mut p = tests::in_setup(HaPair::build);
    let vm1 = p.ns("vm1");
    let first = tests::in_setup(|| {
        wait_until("a keepalived master", Duration::from_secs(20), || {
            p.master().ok_or("none yet".to_string())
        })
    });
    assert_eq!(tests::in_setup(|| pings(&vm1, "172.16.101.3", 5)), (5, 5));
    p.follow();
    let standby = 1 - first;
    let show = |host: usize| -> Option<serde_json::Value> {
        let out = tests::ctl(&["show", &p.hosts[host], "-j"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
            .flatten()
            .map(|v| v[0].clone())
    };
    let addresses = |v: &serde_json::Value| -> usize {
        v["interfaces"]
            .as_array()
            .map(|i| {
                i.iter()
                    .filter(|i| i["device"].as_str().is_some_and(|d| d.starts_with("qr-")))
                    .map(|i| i["fixed_ips"].as_array().map_or(0, |f| f.len()))
                    .sum()
            })
            .unwrap_or(0)
    };
    // The followed routers as keepalived has them: the master's ports with their subnets, the
    // standby's without, and `show` says which role each host has; the master's fast path
    // carries, the standby's has nothing to route.
    let carries = |master: usize, what: &str| {
        let other = 1 - master;
        wait_until(what, Duration::from_secs(5), || {
            match (show(master), show(other)) {
                (Some(m), Some(s))
                    if addresses(&m) == 2
                        && addresses(&s) == 0
                        && m["ha_state"] == "active"
                        && s["ha_state"] == "standby" =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        });
        let (m0, s0) = (p.forwarded(master), p.forwarded(other));
        assert_eq!(pings(&vm1, "172.16.101.3", 300), (300, 300), "{what}");
        let carried = grew("master's qr-a forwarded", m0, p.forwarded(master));
        assert!(
            carried >= 250,
            "{what}: the master's fast path carried {carried} of 300"
        );
        assert_eq!(p.forwarded(other), s0, "{what}: the standby forwarded");
    };
    carries(first, "both hosts followed");

    // Failover: the master's keepalived stops (its addresses go with it); the standby's takes
    // them. A ping every 10 ms runs across it.
    let (sent, got, took) = p.failover();
    assert_eq!(p.master(), Some(standby));
    eprintln!("keepalived moved the router in {took:?}");
    eprintln!("across the failover: {got} of {sent} pings answered (10 ms apart)");
    carries(standby, "the new master followed");
}

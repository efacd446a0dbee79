//! `router-ctl run --follow`: a router namespace built the way Neutron's L3 agent builds a
//! legacy router (the namespace, `qr-`/`qg-` devices at kernel defaults, addresses, the
//! default route, and the agent's iptables chains — `neutron-l3-agent-*` in filter, nat and
//! mangle, in the shape `neutron/agent/l3/router_info.py` and
//! `neutron/agent/linux/iptables_manager.py` give them, loaded with iptables-restore as the
//! agent does) is accelerated with nothing configured beyond `--follow`: routed, SNAT and
//! floating-IP traffic is carried by the fast path, a denying rule holds, a route the agent
//! adds is followed, and stopping leaves nothing of ours in the namespace.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use tests::{
    grew,
    neutron::Agent,
    require_root, sh,
    topo::{in_ns, ping_summary, tcp_transfer_via, Seed},
    wait_until,
};

fn pings(from: &str, to: &str, n: u32) -> (u32, u32) {
    let out = Seed::exec(from, &format!("ping -c {n} -i 0.005 -W 2 {to}"));
    ping_summary(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn a_router_the_l3_agent_built_is_accelerated_with_only_follow() {
    require_root();
    let mut a = tests::in_setup(Agent::build);
    let (ns, vm1, vm3, out) = (a.ns.clone(), a.vm1(), a.vm3(), a.out());
    // The kernel alone first: the set-up works without us.
    assert_eq!(tests::in_setup(|| pings(&vm1, "203.0.113.5", 5)), (5, 5));
    a.follow();
    let v = wait_until(
        "the namespace followed",
        Duration::from_secs(5),
        || match a.show() {
            Some(v) if v["interfaces"].as_array().map(|i| i.len()) == Some(3) => Ok(v),
            other => Err(format!("{other:?}")),
        },
    );
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
    let rx = in_ns(&vm3, || UdpSocket::bind("0.0.0.0:7777").unwrap())
        .join()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    in_ns(&vm1, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0u32..200 {
            s.send_to(&i.to_be_bytes(), "172.16.101.3:7777").unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    })
    .join()
    .unwrap();
    assert!(
        rx.recv(&mut [0u8; 16]).is_err(),
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
        "ip netns exec {ns} iptables -w -S neutron-l3-agent-FORWARD"
    ))
    .contains("--dport 7777 -j DROP"));

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
    let v = wait_until(
        "the namespace followed",
        Duration::from_secs(5),
        || match a.show() {
            Some(v) if v["interfaces"].as_array().map(|i| i.len()) == Some(3) => Ok(v),
            other => Err(format!("{other:?}")),
        },
    );
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
    let rx = in_ns(&vm3, || UdpSocket::bind("0.0.0.0:7777").unwrap())
        .join()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    in_ns(&vm1, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0u32..200 {
            s.send_to(&i.to_be_bytes(), "172.16.101.3:7777").unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    })
    .join()
    .unwrap();
    assert!(
        rx.recv(&mut [0u8; 16]).is_err(),
        "a denied datagram arrived"
    );
}

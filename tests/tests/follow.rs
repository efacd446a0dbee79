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
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    ctl_json, grew, require_root, router_ctl, sh,
    topo::{in_ns, ping_summary, tcp_transfer_via, unique_tag, Seed},
    wait_until,
};

struct Agent {
    tag: String,
    ns: String,
    qr_a: String,
    qr_b: String,
    qg: String,
    daemon: Option<Child>,
}

impl Agent {
    fn vm1(&self) -> String {
        format!("fvm1-{}", self.tag)
    }
    fn vm3(&self) -> String {
        format!("fvm3-{}", self.tag)
    }
    fn ext(&self) -> String {
        format!("fext-{}", self.tag)
    }
    fn out(&self) -> String {
        format!("fout-{}", self.tag)
    }

    /// The router as the L3 agent builds it (legacy router, SNAT on, one floating IP for vm3).
    fn build() -> Agent {
        let tag = unique_tag();
        let id = format!("{tag}0000-16f4-4d6c-89d2-8af91cec9714");
        let a = Agent {
            ns: format!("qrouter-{id}"),
            qr_a: format!("qr-{tag}00a-45"),
            qr_b: format!("qr-{tag}00b-73"),
            qg: format!("qg-{tag}00c-11"),
            tag,
            daemon: None,
        };
        let (ns, vm1, vm3, ext, out) = (a.ns.clone(), a.vm1(), a.vm3(), a.ext(), a.out());
        let (qa, qb, qg) = (&a.qr_a, &a.qr_b, &a.qg);
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 && \
             ip netns add {vm1} && ip netns add {vm3} && ip netns add {ext} && ip netns add {out} && \
             ip -n {ns} link add {qa} type veth peer name t1 netns {vm1} && \
             ip -n {ns} link add {qb} type veth peer name t3 netns {vm3} && \
             ip -n {ns} link add {qg} type veth peer name up0 netns {ext} && \
             ip -n {ns} addr add 172.16.100.1/24 dev {qa} && ip -n {ns} link set {qa} up && \
             ip -n {ns} addr add 172.16.101.1/24 dev {qb} && ip -n {ns} link set {qb} up && \
             ip -n {ns} addr add 192.168.1.10/24 dev {qg} && ip -n {ns} addr add 192.168.1.20/32 dev {qg} && \
             ip -n {ns} link set {qg} up && ip -n {ns} route add default via 192.168.1.1 dev {qg} && \
             ip -n {vm1} link set lo up && ip -n {vm1} link set t1 up && ip -n {vm1} addr add 172.16.100.3/24 dev t1 && \
             ip -n {vm1} route add default via 172.16.100.1 && \
             ip -n {vm3} link set lo up && ip -n {vm3} link set t3 up && ip -n {vm3} addr add 172.16.101.3/24 dev t3 && \
             ip -n {vm3} route add default via 172.16.101.1 && \
             ip -n {ext} link set lo up && ip -n {ext} link set up0 up && ip -n {ext} addr add 192.168.1.1/24 dev up0 && \
             ip -n {ext} link add o0 type veth peer name e0 netns {out} && ip -n {ext} link set o0 up && \
             ip -n {ext} addr add 203.0.113.1/24 dev o0 && ip netns exec {ext} sysctl -qw net.ipv4.ip_forward=1 && \
             ip -n {out} link set lo up && ip -n {out} link set e0 up && ip -n {out} addr add 203.0.113.5/24 dev e0 && \
             ip -n {out} route add default via 203.0.113.1"
        ));
        // The agent's rules, replaced wholesale as the agent does.
        let rules = format!(
            "*filter\n\
             :neutron-filter-top - [0:0]\n\
             :neutron-l3-agent-FORWARD - [0:0]\n\
             :neutron-l3-agent-INPUT - [0:0]\n\
             :neutron-l3-agent-local - [0:0]\n\
             :neutron-l3-agent-scope - [0:0]\n\
             -A INPUT -j neutron-l3-agent-INPUT\n\
             -A FORWARD -j neutron-filter-top\n\
             -A FORWARD -j neutron-l3-agent-FORWARD\n\
             -A neutron-filter-top -j neutron-l3-agent-local\n\
             -A neutron-l3-agent-FORWARD -j neutron-l3-agent-scope\n\
             -A neutron-l3-agent-FORWARD -p udp --dport 7777 -j DROP\n\
             -A neutron-l3-agent-INPUT -m mark --mark 0x1/0xffff -j ACCEPT\n\
             COMMIT\n\
             *mangle\n\
             :neutron-l3-agent-PREROUTING - [0:0]\n\
             :neutron-l3-agent-mark - [0:0]\n\
             :neutron-l3-agent-scope - [0:0]\n\
             -A PREROUTING -j neutron-l3-agent-PREROUTING\n\
             -A neutron-l3-agent-PREROUTING -j neutron-l3-agent-mark\n\
             -A neutron-l3-agent-PREROUTING -j neutron-l3-agent-scope\n\
             -A neutron-l3-agent-mark -i {qg} -j MARK --set-xmark 0x2/0xffff\n\
             COMMIT\n\
             *nat\n\
             :neutron-l3-agent-OUTPUT - [0:0]\n\
             :neutron-l3-agent-POSTROUTING - [0:0]\n\
             :neutron-l3-agent-PREROUTING - [0:0]\n\
             :neutron-l3-agent-float-snat - [0:0]\n\
             :neutron-l3-agent-snat - [0:0]\n\
             :neutron-postrouting-bottom - [0:0]\n\
             -A PREROUTING -j neutron-l3-agent-PREROUTING\n\
             -A OUTPUT -j neutron-l3-agent-OUTPUT\n\
             -A POSTROUTING -j neutron-l3-agent-POSTROUTING\n\
             -A POSTROUTING -j neutron-postrouting-bottom\n\
             -A neutron-l3-agent-OUTPUT -d 192.168.1.20/32 -j DNAT --to-destination 172.16.101.3\n\
             -A neutron-l3-agent-POSTROUTING ! -o {qg} -m conntrack ! --ctstate DNAT -j ACCEPT\n\
             -A neutron-l3-agent-PREROUTING -d 192.168.1.20/32 -j DNAT --to-destination 172.16.101.3\n\
             -A neutron-l3-agent-float-snat -s 172.16.101.3/32 -j SNAT --to-source 192.168.1.20 --random-fully\n\
             -A neutron-l3-agent-snat -j neutron-l3-agent-float-snat\n\
             -A neutron-l3-agent-snat -o {qg} -j SNAT --to-source 192.168.1.10 --random-fully\n\
             -A neutron-l3-agent-snat -m mark ! --mark 0x2/0xffff -m conntrack --ctstate DNAT -j SNAT --to-source 192.168.1.10 --random-fully\n\
             -A neutron-postrouting-bottom -m comment --comment \"Perform source NAT on outgoing traffic.\" -j neutron-l3-agent-snat\n\
             COMMIT\n"
        );
        // The agent's namespace settings (`Namespace.create` in neutron/agent/l3/namespaces.py)
        // but `nf_conntrack_tcp_be_liberal=1`, which the test sets later: first it shows that a
        // strict conntrack keeps TCP with the kernel.
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2"
        ));
        let path = std::env::temp_dir().join(format!("follow-{}.rules", a.tag));
        std::fs::write(&path, rules).unwrap();
        sh(&format!(
            "ip netns exec {ns} iptables-restore -w < {}",
            path.display()
        ));
        let _ = std::fs::remove_file(path);
        a
    }

    fn follow(&mut self) {
        let child = Command::new(router_ctl())
            .args(["run", "--follow", &self.ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("router-ctl run --follow");
        self.daemon = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: plain kill(2) of our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("the follow daemon did not stop within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn show(&self) -> Option<serde_json::Value> {
        let out = tests::ctl(&["show", &self.ns, "-j"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .map(|v| v[0].clone())
    }

    fn stats(&self, dev: &str) -> serde_json::Value {
        ctl_json(&["stats", &self.ns])
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == dev)
            .unwrap_or_else(|| panic!("no stats for {dev}"))
            .clone()
    }

    fn forwarded(&self, dev: &str) -> u64 {
        self.stats(dev)["forwarded"]["packets"].as_u64().unwrap()
    }

    fn translated(&self, dev: &str) -> (u64, u64) {
        let s = self.stats(dev);
        (
            s["nat"]["source_translated"].as_u64().unwrap(),
            s["nat"]["destination_translated"].as_u64().unwrap(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        for n in [
            self.ns.clone(),
            self.vm1(),
            self.vm3(),
            self.ext(),
            self.out(),
        ] {
            let _ = Command::new("ip")
                .args(["netns", "del", &n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

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
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1"
    ));
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

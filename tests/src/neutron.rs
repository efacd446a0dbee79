//! A router namespace built by Neutron's own L3 agent code: `tests/neutron/l3_agent.py` runs
//! Neutron 29's `L3NATAgentWithStateReport` (installed by `cargo xtask setup` from the Python
//! registry) with its RPC to neutron-server faked, and hands it the router as the server would
//! (a legacy router: two subnets, the external gateway with SNAT, a floating IP for vm3). The
//! agent writes what it writes on a network node: the namespace's sysctls, the ports'
//! addresses, the default route, the floating IP's address, every iptables and ip6tables rule
//! of `neutron-l3-agent-*` (iptables-restore), and the metadata proxy's rules. The ports are
//! plugged here, as the L2 agent's switch would (veths, or Open vSwitch internal ports), and a
//! firewall group denies UDP to port 7777 in the chains FWaaS v2 hooks into the agent's
//! FORWARD chain (FWaaS is a package of its own). vm1 (172.16.100.3), vm3 (172.16.101.3,
//! floating IP 192.168.1.20), an upstream router and an outside host (203.0.113.5) as in the
//! NAT seed. `follow` runs `router-ctl run --follow` on it.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{router_ctl, sh, topo::unique_tag};

pub struct Agent {
    pub tag: String,
    pub ns: String,
    pub qr_a: String,
    pub qr_b: String,
    pub qg: String,
    daemon: Option<Child>,
    /// The Open vSwitch whose internal ports are the `qr-` devices (`build_on_ovs`); dropped
    /// after the namespaces.
    pub ovs: Option<crate::ovs::Ovs>,
}

impl Agent {
    pub fn vm1(&self) -> String {
        format!("fvm1-{}", self.tag)
    }
    pub fn vm3(&self) -> String {
        format!("fvm3-{}", self.tag)
    }
    pub fn ext(&self) -> String {
        format!("fext-{}", self.tag)
    }
    pub fn out(&self) -> String {
        format!("fout-{}", self.tag)
    }

    /// The router as the L3 agent builds it (legacy router, SNAT on, one floating IP for vm3),
    /// its `qr-` devices veth pairs (the linuxbridge agent's way).
    pub fn build() -> Agent {
        Agent::build_with(false)
    }

    /// The same with the `qr-` devices as the OVS agent plugs them: internal ports of an
    /// integration bridge (a private Open vSwitch, userspace datapath: taps), tagged per
    /// network, moved into the namespace; the instances' veths on the bridge with the same
    /// tags. OVS's userspace datapath hands a veth's partial checksums on unresolved, so the
    /// instances' veth ends have transmit checksum offload off: the switch's requirement (the
    /// kernel alone delivers nothing without it), not the router's.
    pub fn build_on_ovs() -> Agent {
        Agent::build_with(true)
    }

    fn build_with(on_ovs: bool) -> Agent {
        let tag = unique_tag();
        let id = format!("{tag}0000-16f4-4d6c-89d2-8af91cec9714");
        let a = Agent {
            ns: format!("qrouter-{id}"),
            qr_a: format!("qr-{tag}0a-45"),
            qr_b: format!("qr-{tag}0b-73"),
            qg: format!("qg-{tag}0c-11"),
            tag: tag.clone(),
            daemon: None,
            ovs: on_ovs.then(|| crate::ovs::Ovs::start(&tag, &format!("bn{tag}"))),
        };
        let (ns, vm1, vm3, ext, out) = (a.ns.clone(), a.vm1(), a.vm3(), a.ext(), a.out());
        let (qa, qb, qg) = (&a.qr_a, &a.qr_b, &a.qg);
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip netns add {vm1} && ip netns add {vm3} && ip netns add {ext} && ip netns add {out}"
        ));
        match &a.ovs {
            None => sh(&format!(
                "ip -n {ns} link add {qa} type veth peer name t1 netns {vm1} && \
                 ip -n {ns} link add {qb} type veth peer name t3 netns {vm3}"
            )),
            Some(o) => {
                for (port, vm, inst, tag_no) in [(qa, &vm1, "t1", 1), (qb, &vm3, "t3", 2)] {
                    o.add_internal_port(port);
                    o.vsctl(&format!("set port {port} tag={tag_no}"));
                    sh(&format!("ip link set {port} netns {ns}"));
                    let side = format!("o{tag_no}{}", a.tag);
                    sh(&format!(
                        "ip link add {side} type veth peer name {inst} netns {vm} && ip link set {side} up && \
                         ip netns exec {vm} ethtool -K {inst} tx off >/dev/null"
                    ));
                    o.vsctl(&format!("add-port {} {side} tag={tag_no}", o.bridge));
                }
                sh(&format!("ip link set {} up", o.bridge));
                String::new()
            }
        };
        sh(&format!(
            "ip -n {ns} link add {qg} type veth peer name up0 netns {ext}"
        ));
        instances_and_outside(&vm1, &vm3, &ext, &out);
        l3_agent(&serde_json::json!({
            "namespace": ns,
            "gateway": {"device": qg, "ip": "192.168.1.10/24", "gateway_ip": "192.168.1.1"},
            "internal_ports": [
                {"device": qa, "cidr": "172.16.100.1/24"},
                {"device": qb, "cidr": "172.16.101.1/24"},
            ],
            "floating_ips": [
                {"fixed_ip_address": "172.16.101.3", "floating_ip_address": "192.168.1.20"},
            ],
        }));
        deny_udp_7777(&ns);
        // The agent made conntrack liberal (namespaces.py); the tests first show what a strict
        // one does, then set it back as the agent has it (`Agent::liberal`).
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=0"
        ));
        a
    }

    /// Waits (5 s at most) until `show` lists the router with its three ports; its JSON.
    pub fn followed(&self) -> serde_json::Value {
        crate::wait_until(
            "the namespace followed",
            Duration::from_secs(5),
            || match self.show() {
                Some(v) if v["interfaces"].as_array().map(|i| i.len()) == Some(3) => Ok(v),
                other => Err(format!("{other:?}")),
            },
        )
    }

    /// `nf_conntrack_tcp_be_liberal=1`, as the agent sets it in every router namespace.
    pub fn liberal(&self) {
        sh(&format!(
            "ip netns exec {} sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1",
            self.ns
        ));
    }

    /// Starts `router-ctl run --follow` on this namespace alone.
    pub fn follow(&mut self) {
        self.follow_with(&[]);
    }

    /// `follow` with more arguments for `router-ctl run`.
    pub fn follow_with(&mut self, args: &[&str]) {
        let child = Command::new(router_ctl())
            .args(["run", "--follow", &self.ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("router-ctl run --follow");
        self.daemon = Some(child);
    }

    pub fn stop(&mut self) {
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

    pub fn show(&self) -> Option<serde_json::Value> {
        let out = crate::ctl(&["show", &self.ns, "-j"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .map(|v| v[0].clone())
    }

    pub fn stats(&self, dev: &str) -> serde_json::Value {
        crate::ctl_json(&["stats", &self.ns])
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == dev)
            .unwrap_or_else(|| panic!("no stats for {dev}"))
            .clone()
    }

    pub fn forwarded(&self, dev: &str) -> u64 {
        self.stats(dev)["forwarded"]["packets"].as_u64().unwrap()
    }

    pub fn translated(&self, dev: &str) -> (u64, u64) {
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

/// Where `cargo xtask setup` installs Neutron (xtask/src/main.rs: NEUTRON_VENV).
const NEUTRON_VENV: &str = "/opt/router-xdp/neutron-29";

/// Has Neutron's L3 agent build the router `spec` describes (tests/neutron/l3_agent.py: the
/// namespace, its ports plugged already).
pub fn l3_agent(spec: &serde_json::Value) {
    use std::io::Write as _;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/neutron/l3_agent.py");
    let state = std::env::temp_dir().join(format!("l3-agent-{}", unique_tag()));
    let mut child = Command::new(format!("{NEUTRON_VENV}/bin/python"))
        .arg(script)
        .arg(&state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run Neutron's L3 agent ({NEUTRON_VENV}: `cargo xtask setup` installs it): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&state);
    assert!(
        out.status.success(),
        "Neutron's L3 agent failed to build the router: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A firewall group denying UDP to port 7777, where FWaaS v2's L3 agent extension puts its
/// rules: a chain of its own for the group, jumped to from the agent's FORWARD chain for
/// traffic to the router's internal ports.
pub fn deny_udp_7777(ns: &str) {
    sh(&format!(
        "ip netns exec {ns} iptables -w -N neutron-l3-agent-iv4fwg7777 && \
         ip netns exec {ns} iptables -w -A neutron-l3-agent-iv4fwg7777 -p udp --dport 7777 -j DROP && \
         ip netns exec {ns} iptables -w -I neutron-l3-agent-FORWARD -o qr-+ -j neutron-l3-agent-iv4fwg7777"
    ));
}

/// A legacy router's rules in the shape the agent writes them (router_info.py,
/// iptables_manager.py), for a gateway port `qg` (SNAT to 192.168.1.10, floating IP
/// 192.168.1.20 → 172.16.101.3, UDP to port 7777 dropped), loaded into `ns` with
/// iptables-restore: the HA pair's hosts, which keepalived drives (an HA router is the agent's
/// code with keepalived and its state-change daemon, not run here).
pub fn load_rules(ns: &str, qg: &str, tag: &str) {
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
    let path = std::env::temp_dir().join(format!("follow-{tag}-{ns}.rules"));
    std::fs::write(&path, rules).unwrap();
    sh(&format!(
        "ip netns exec {ns} iptables-restore -w < {}",
        path.display()
    ));
    let _ = std::fs::remove_file(path);
}

/// The instances and the outside, once their devices exist: vm1's `t1` (172.16.100.3, gateway
/// .1), vm3's `t3` (172.16.101.3), the upstream router `ext` on its `up0` (192.168.1.1,
/// forwarding), and behind it the outside host `out` (203.0.113.5).
pub fn instances_and_outside(vm1: &str, vm3: &str, ext: &str, out: &str) {
    sh(&format!(
        "ip -n {vm1} link set lo up && ip -n {vm1} link set t1 up && ip -n {vm1} addr add 172.16.100.3/24 dev t1 && \
         ip -n {vm1} route add default via 172.16.100.1 && \
         ip -n {vm3} link set lo up && ip -n {vm3} link set t3 up && ip -n {vm3} addr add 172.16.101.3/24 dev t3 && \
         ip -n {vm3} route add default via 172.16.101.1 && \
         ip -n {ext} link set lo up && ip -n {ext} link set up0 up && ip -n {ext} addr add 192.168.1.1/24 dev up0 && \
         ip -n {ext} link add o0 type veth peer name e0 netns {out} && ip -n {ext} link set o0 up && \
         ip -n {ext} addr add 203.0.113.1/24 dev o0 && ip netns exec {ext} sysctl -qw net.ipv4.ip_forward=1 && \
         ip -n {out} link set lo up && ip -n {out} link set e0 up && ip -n {out} addr add 203.0.113.5/24 dev e0 && \
         ip -n {out} route add default via 203.0.113.1"
    ));
}

/// Datagrams that arrive in `vm3` of `n` that `vm1` sends to its UDP port 7777 (which the
/// agent's chain drops), 200 µs apart.
pub fn denied_arrived(vm1: &str, vm3: &str, n: u32) -> u32 {
    let rx = crate::topo::in_ns(vm3, || std::net::UdpSocket::bind("0.0.0.0:7777").unwrap())
        .join()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    crate::topo::in_ns(vm1, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..n {
            s.send_to(&i.to_be_bytes(), "172.16.101.3:7777").unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    })
    .join()
    .unwrap();
    let mut got = 0;
    while rx.recv(&mut [0u8; 16]).is_ok() {
        got += 1;
    }
    got
}

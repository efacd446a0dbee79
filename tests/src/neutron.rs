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
        l3_agent(&router_spec(&ns, qa, qb, qg));
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

/// The router of these tests as neutron-server would hand it to the agent (tests/neutron/
/// l3_agent.py): in `ns`, subnets 172.16.100.0/24 on `qa` and 172.16.101.0/24 on `qb`, the
/// gateway 192.168.1.10/24 on `qg` with SNAT, the floating IP 192.168.1.20 for vm3.
fn router_spec(ns: &str, qa: &str, qb: &str, qg: &str) -> serde_json::Value {
    serde_json::json!({
        "namespace": ns,
        "gateway": {"device": qg, "ip": "192.168.1.10/24", "gateway_ip": "192.168.1.1"},
        "internal_ports": [
            {"device": qa, "cidr": "172.16.100.1/24"},
            {"device": qb, "cidr": "172.16.101.1/24"},
        ],
        "floating_ips": [
            {"fixed_ip_address": "172.16.101.3", "floating_ip_address": "192.168.1.20"},
        ],
    })
}

/// Where `cargo xtask setup` installs Neutron (xtask/src/main.rs: NEUTRON_VENV).
const NEUTRON_VENV: &str = "/opt/router-xdp/neutron-29";

/// Neutron's L3 agent (tests/neutron/l3_agent.py) started on the router `spec` describes
/// (the namespace, its ports plugged already), its state in a directory of its own, its log in
/// `agent.log` there and its standard error in `stderr`.
fn start_agent(spec: &serde_json::Value) -> (Child, std::path::PathBuf) {
    use std::io::Write as _;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/neutron/l3_agent.py");
    let state = std::env::temp_dir().join(format!("l3-agent-{}", unique_tag()));
    std::fs::create_dir_all(&state).unwrap();
    let log = std::fs::File::create(state.join("stderr")).unwrap();
    let mut child = Command::new(format!("{NEUTRON_VENV}/bin/python"))
        .arg(script)
        .arg(&state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run Neutron's L3 agent ({NEUTRON_VENV}: `cargo xtask setup` installs it): {e}")
        });
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(stdin, "{spec}").unwrap();
    (child, state)
}

/// The agent's standard error (a traceback) and the end of its log.
fn agent_log(state: &std::path::Path) -> String {
    let log = std::fs::read_to_string(state.join("agent.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    let stderr = std::fs::read_to_string(state.join("stderr")).unwrap_or_default();
    format!(
        "{stderr}\n(log) …\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Has Neutron's L3 agent build the router `spec` describes, and exit.
pub fn l3_agent(spec: &serde_json::Value) {
    let (mut child, state) = start_agent(spec);
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    let log = agent_log(&state);
    let _ = std::fs::remove_dir_all(&state);
    assert!(
        status.success(),
        "Neutron's L3 agent failed to build the router: {log}"
    );
}

/// Neutron's L3 agent running on one router, as on a network node, until dropped: then it
/// removes the router as on its deletion (for an HA router: keepalived and the state-change
/// monitor stopped) and exits.
pub struct ServedAgent {
    child: Child,
    state: std::path::PathBuf,
    /// What the agent said once the router was built (`keepalived_pid_file` for an HA router).
    pub ready: serde_json::Value,
}

impl ServedAgent {
    pub fn start(spec: &serde_json::Value) -> ServedAgent {
        use std::io::BufRead as _;
        let mut spec = spec.clone();
        spec["serve"] = true.into();
        let (mut child, state) = start_agent(&spec);
        let mut line = String::new();
        let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let ready = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "Neutron's L3 agent failed to build the router: {line}{}",
                agent_log(&state)
            )
        });
        ServedAgent {
            child,
            state,
            ready,
        }
    }

    /// The pid of the router's keepalived (its parent process), as its pid file has it.
    pub fn keepalived_pid(&self) -> Option<i32> {
        let file = self.ready["keepalived_pid_file"].as_str()?;
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Tells the agent to remove the router and exit (`drop` waits for it).
    pub fn close(&mut self) {
        drop(self.child.stdin.take());
    }
}

impl Drop for ServedAgent {
    fn drop(&mut self) {
        self.close();
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t0.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
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

/// An HA router built by Neutron's L3 agent on two network nodes (here two namespaces,
/// `qrouter-<id>-h1` and `-h2`, on one machine, and an agent for each, running until the pair
/// is dropped): the same devices with the same MACs in both, plugged here as the L2 agent
/// would, and an `ha-` port on the HA network (169.254.192.0/18). The agent does the rest as on
/// a network node (ha_router.py): the namespace without IPv6 link-local addresses, the HA
/// port's address, the router's rules, keepalived's configuration (both BACKUP, nopreempt, the
/// router's addresses and default route for keepalived to hold) and keepalived and
/// neutron-keepalived-state-change started in the namespace. The firewall group denying UDP to
/// port 7777 is added in both. The networks are bridges in a switch namespace.
pub struct HaPair {
    pub tag: String,
    /// The two hosts' router namespaces.
    pub hosts: [String; 2],
    /// Each host's L3 agent, host 1's first.
    pub agents: Vec<ServedAgent>,
    /// `router-ctl run --follow` on both, when started.
    pub daemon: Option<std::process::Child>,
}

impl HaPair {
    pub fn ns(&self, n: &str) -> String {
        format!("f{n}-{}", self.tag)
    }

    pub fn build() -> HaPair {
        let tag = unique_tag();
        let id = format!("{tag}0000-16f4-4d6c-89d2-8af91cec9714");
        let mut p = HaPair {
            hosts: [format!("qrouter-{id}-h1"), format!("qrouter-{id}-h2")],
            tag: tag.clone(),
            agents: Vec::new(),
            daemon: None,
        };
        let (sw, vm1, vm3, ext, out) = (
            p.ns("sw"),
            p.ns("vm1"),
            p.ns("vm3"),
            p.ns("ext"),
            p.ns("out"),
        );
        let (qa, qb, qg, ha) = (
            format!("qr-{tag}0a-45"),
            format!("qr-{tag}0b-73"),
            format!("qg-{tag}0c-11"),
            format!("ha-{tag}0d-22"),
        );
        sh(&format!(
            "ip netns add {sw} && ip netns add {vm1} && ip netns add {vm3} && ip netns add {ext} && ip netns add {out} && \
             for b in bra brb brg brh; do ip -n {sw} link add $b type bridge && ip -n {sw} link set $b up; done && \
             ip -n {vm1} link add t1 type veth peer name pv1 netns {sw} && ip -n {sw} link set pv1 master bra up && \
             ip -n {vm3} link add t3 type veth peer name pv3 netns {sw} && ip -n {sw} link set pv3 master brb up && \
             ip -n {ext} link add up0 type veth peer name pe netns {sw} && ip -n {sw} link set pe master brg up"
        ));
        instances_and_outside(&vm1, &vm3, &ext, &out);
        for (h, ns) in p.hosts.clone().iter().enumerate() {
            let n = h + 1;
            // The ports as the L2 agent leaves them: in the namespace, down until the agent's
            // plug brings them up.
            sh(&format!(
                "ip netns add {ns} && \
                 ip -n {ns} link add {qa} address fa:16:3e:00:00:0a type veth peer name a{n} netns {sw} && \
                 ip -n {ns} link add {qb} address fa:16:3e:00:00:0b type veth peer name b{n} netns {sw} && \
                 ip -n {ns} link add {qg} address fa:16:3e:00:00:0c type veth peer name g{n} netns {sw} && \
                 ip -n {ns} link add {ha} address fa:16:3e:00:00:d{n} type veth peer name h{n} netns {sw} && \
                 ip -n {sw} link set a{n} master bra up && ip -n {sw} link set b{n} master brb up && \
                 ip -n {sw} link set g{n} master brg up && ip -n {sw} link set h{n} master brh up"
            ));
            let mut spec = router_spec(ns, &qa, &qb, &qg);
            spec["ha"] = serde_json::json!({"device": ha, "cidr": format!("169.254.192.{n}/18"), "vr_id": 1});
            p.agents.push(ServedAgent::start(&spec));
            deny_udp_7777(ns);
        }
        p
    }

    /// The host whose namespace holds the router's addresses now (keepalived's master).
    pub fn master(&self) -> Option<usize> {
        let holds = |ns: &str| {
            crate::sh_out(&format!("ip -n {ns} -4 -o addr show"))
                .stdout
                .windows(b"172.16.100.1/24".len())
                .any(|w| w == b"172.16.100.1/24")
        };
        match (holds(&self.hosts[0]), holds(&self.hosts[1])) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    }

    pub fn forwarded(&self, host: usize) -> u64 {
        let qa = format!("qr-{}0a-45", self.tag);
        crate::ctl_json(&["stats", &self.hosts[host]])
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == qa)
            .expect("qr-a in stats")["forwarded"]["packets"]
            .as_u64()
            .unwrap()
    }
    /// Starts `router-ctl run --follow` on both hosts' namespaces.
    pub fn follow(&mut self) {
        let pattern = format!("{}*", &self.hosts[0][..self.hosts[0].len() - 1]);
        self.daemon = Some(
            Command::new(router_ctl())
                .args(["run", "--follow", &pattern])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("router-ctl run --follow"),
        );
    }

    /// The master's keepalived stops (SIGTERM: its addresses go with it) while vm1 pings vm3
    /// every 10 ms, 1 500 times, from 0.5 s before; the other host takes the router. (pings
    /// sent, answered, how long keepalived took to move the router).
    pub fn failover(&self) -> (u32, u32, Duration) {
        let master = self.master().expect("a master");
        let vm1 = self.ns("vm1");
        let during = std::thread::spawn(move || {
            let out = crate::topo::Seed::exec(&vm1, "ping -c 1500 -i 0.01 -W 1 172.16.101.3");
            crate::topo::ping_summary(&String::from_utf8_lossy(&out.stdout))
        });
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let pid = self.agents[master]
            .keepalived_pid()
            .expect("the master's keepalived pid");
        // SAFETY: plain kill(2) of the keepalived the agent started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        crate::wait_until(
            "the standby became master",
            Duration::from_secs(20),
            || match self.master() {
                Some(m) if m != master => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        let took = t0.elapsed();
        let (sent, got) = during.join().unwrap();
        (sent, got, took)
    }
}

impl Drop for HaPair {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: plain kill(2) of our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // The agents remove the router (keepalived and its monitor stopped), side by side.
        for a in &mut self.agents {
            a.close();
        }
        self.agents.clear();
        let mut all = self.hosts.to_vec();
        for n in ["sw", "vm1", "vm3", "ext", "out"] {
            all.push(self.ns(n));
        }
        for n in all {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &n])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

//! The seed topology in network namespaces, with unique names so tests can run side by side, torn
//! down on drop (also when the test fails).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{ctl, ctl_json, sh, sh_out};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short tag unique to this process and call.
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{:04x}{:02x}", std::process::id() & 0xffff, n & 0xff)
}

/// The ids a test router uses: derived from the tag so that device names do not collide.
pub struct Ids {
    pub tag: String,
    pub router_id: String,
    pub name: String,
    pub port_a: String,
    pub port_b: String,
    /// The external gateway's port (NAT tests).
    pub port_g: String,
}

impl Ids {
    pub fn new(tag: &str) -> Ids {
        Ids {
            tag: tag.to_string(),
            router_id: format!("{tag}00-16f4-4d6c-89d2-8af91cec9714"),
            name: format!("router_{tag}"),
            port_a: format!("{tag}0a-4586-4e8a-9c3e-1f2a3b4c5d6e"),
            port_b: format!("{tag}0b-731c-4b1a-8d2e-6f7a8b9c0d1e"),
            port_g: format!("{tag}0c-5d6e-4f70-8a9b-0c1d2e3f4a5b"),
        }
    }
    pub fn ns(&self) -> String {
        format!("qrouter-{}", self.router_id)
    }
    pub fn dev_a(&self) -> String {
        format!("qr-{}", &self.port_a[..11])
    }
    pub fn dev_b(&self) -> String {
        format!("qr-{}", &self.port_b[..11])
    }
    pub fn dev_g(&self) -> String {
        format!("qg-{}", &self.port_g[..11])
    }
    /// The seed router with an external gateway on 192.168.1.0/24 (its address .10, the
    /// upstream router .1; `snat` is the `enable_snat` line or empty), then `extra` TOML
    /// (floating IPs).
    pub fn config_nat(&self, snat: &str, extra: &str) -> String {
        self.config(&format!(
            "[router.external_gateway]\nport_id = \"{}\"\nnetwork_id = \"public\"\n{snat}\nexternal_fixed_ips = [\n  {{ subnet = \"192.168.1.0/24\", ip_address = \"192.168.1.10\", gateway_ip = \"192.168.1.1\" }},\n]\n{extra}",
            self.port_g
        ))
    }
    pub fn tap_a(&self) -> String {
        format!("tap{}", &self.port_a[..11])
    }
    pub fn tap_b(&self) -> String {
        format!("tap{}", &self.port_b[..11])
    }

    /// The seed router's definition (172.16.100.0/24 and 172.16.101.0/24) plus `extra` TOML.
    pub fn config(&self, extra: &str) -> String {
        self.config_with("", extra)
    }

    /// As `config`, with `router_fields` (TOML keys of the router table itself) too.
    pub fn config_with(&self, router_fields: &str, extra: &str) -> String {
        self.router_toml(
            router_fields,
            "subnet = \"172.16.100.0/24\"\ngateway_ip = \"172.16.100.1\"",
            "subnet = \"172.16.101.0/24\"\ngateway_ip = \"172.16.101.1\"",
            extra,
        )
    }

    /// The seed router with dual-stack ports: 172.16.100.0/24 + 2001:db8:100::/64 on port a,
    /// 172.16.101.0/24 + 2001:db8:101::/64 on port b, plus `extra` TOML.
    pub fn config_dual(&self, extra: &str) -> String {
        self.config_dual_with("", extra)
    }

    pub fn config_dual_with(&self, router_fields: &str, extra: &str) -> String {
        self.config_dual_fields(router_fields, "", "", extra)
    }

    /// As `config_dual_with`, with fields `a` and `b` added to the IPv6 subnet of port a and
    /// port b (e.g. `, ipv6_ra_mode = "slaac"`).
    pub fn config_dual_fields(&self, router_fields: &str, a: &str, b: &str, extra: &str) -> String {
        let fixed = |n: u32, more: &str| {
            format!(
                "fixed_ips = [\n  {{ subnet = \"172.16.{n}.0/24\", ip_address = \"172.16.{n}.1\" }},\n  {{ subnet = \"2001:db8:{n}::/64\", ip_address = \"2001:db8:{n}::1\"{more} }},\n]"
            )
        };
        self.router_toml(router_fields, &fixed(100, a), &fixed(101, b), extra)
    }

    /// This router with ports a and b, each with the addressing given.
    fn router_toml(&self, router_fields: &str, a: &str, b: &str, extra: &str) -> String {
        format!(
            "[[router]]\nid = \"{}\"\nname = \"{}\"\n{router_fields}\n[[router.interface]]\nport_id = \"{}\"\n{a}\n[[router.interface]]\nport_id = \"{}\"\n{b}\n{extra}",
            self.router_id, self.name, self.port_a, self.port_b
        )
    }
}

pub fn write_config(tag: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("router-test-{tag}.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Queues of the seed's instance veth pairs (both ends): 1, the kernel's default, unless a
/// benchmark asks for more (one per core receiving, as a multi-queue NIC with RSS has).
pub static VETH_QUEUES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The seed router applied by router-ctl, with instance namespaces vm1 (172.16.100.3) and vm3
/// (172.16.101.3) plugged into the veth peers that apply created.
pub struct Seed {
    pub ids: Ids,
    pub vm1: String,
    pub vm3: String,
    /// Further namespaces the test made (bridges, more instances), deleted on drop.
    pub extra_ns: Vec<String>,
    /// Frames a test ran through the program as if received on qr-a (BPF_PROG_TEST_RUN): the
    /// fast path counts them, the device does not.
    pub injected_a: u64,
    /// Off for users that swap other programs onto the devices (the benchmark's wire floor).
    pub check_counters: bool,
    /// For devices in tc: packets the device received minus packets the fast path counted,
    /// once the router was applied (see `counters_add_up`).
    rx_offset: Vec<(String, i64)>,
}

impl Seed {
    /// Applies the seed router (plus `extra` TOML) and plugs vm1 and vm3 directly.
    pub fn up(extra: &str) -> Seed {
        Seed::up_with("", extra)
    }

    /// As `up`, with `router_fields` in the router's table (e.g. `max_routes = 1000000`).
    pub fn up_with(router_fields: &str, extra: &str) -> Seed {
        Seed::plugged_then_applied(|ids| ids.config_with(router_fields, extra))
    }

    /// The dual-stack seed (`Ids::config_dual`): vm1 is also 2001:db8:100::3, vm3
    /// 2001:db8:101::3, each with its gateway as IPv6 default route.
    pub fn up_dual(extra: &str) -> Seed {
        Seed::up_dual_with("", extra)
    }

    /// As `up_dual`, with `router_fields` in the router's table.
    pub fn up_dual_with(router_fields: &str, extra: &str) -> Seed {
        Seed::up_dual_text(|ids| ids.config_dual_with(router_fields, extra))
    }

    /// As `up_dual`, with the whole (dual-stack) definition from `text`.
    pub fn up_dual_text(text: impl FnOnce(&Ids) -> String) -> Seed {
        let s = Seed::plugged_then_applied(text);
        for (ns, dev, addr, gw) in [
            (
                &s.vm1,
                s.ids.tap_a(),
                "2001:db8:100::3/64",
                "2001:db8:100::1",
            ),
            (
                &s.vm3,
                s.ids.tap_b(),
                "2001:db8:101::3/64",
                "2001:db8:101::1",
            ),
        ] {
            sh(&format!(
                "ip -n {ns} addr add {addr} dev {dev} nodad && ip -n {ns} -6 route add default via {gw}"
            ));
        }
        s
    }

    /// The dual-stack seed whose IPv6 subnets carry fields `a` and `b`
    /// (`Ids::config_dual_fields`), the instances left to configure IPv6 themselves (kernel
    /// defaults: they accept router advertisements and autoconfigure).
    pub fn up_dual_advertised(a: &str, b: &str) -> Seed {
        Seed::plugged_then_applied(|ids| ids.config_dual_fields("", a, b, ""))
    }

    /// vm1 and vm3 talk to their IPv6 gateways, so that the router learns both (ND).
    pub fn prime_neighbours6(&self) {
        assert!(
            Self::ping(&self.vm1, "2001:db8:100::1", 1),
            "vm1 cannot reach its IPv6 gateway"
        );
        assert!(
            Self::ping(&self.vm3, "2001:db8:101::1", 1),
            "vm3 cannot reach its IPv6 gateway"
        );
        self.wait_neigh("2001:db8:100::3");
        self.wait_neigh("2001:db8:101::3");
    }

    pub fn set_forwarding6(&self, on: bool) {
        sh(&format!(
            "ip netns exec {} sysctl -qw net.ipv6.conf.all.forwarding={}",
            self.ns(),
            on as u8
        ));
    }

    /// The router namespace's kernel Ip6OutForwDatagrams counter (/proc/net/snmp6).
    pub fn forw6_datagrams(&self) -> u64 {
        let snmp = sh(&format!("ip netns exec {} cat /proc/net/snmp6", self.ns()));
        snmp.lines()
            .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"))
            .expect("Ip6OutForwDatagrams")
            .trim()
            .parse()
            .unwrap()
    }

    /// What the fast path has forwarded, per `qr-` device, by its own counters and by the
    /// kernel's count of the device's redirects: compare two with `assert_fast_path`.
    pub fn fast_path(&self) -> FastPath {
        let stats = self.stats();
        let ns = self.ns();
        let hooks = self.hooks();
        let devs = [self.ids.dev_a(), self.ids.dev_b()]
            .into_iter()
            .map(|dev| {
                let d = stats
                    .iter()
                    .find(|s| s["device"] == dev.as_str())
                    .unwrap_or_else(|| panic!("{dev} missing from stats"));
                let n = |k: &str| d["forwarded"][k]["packets"].as_u64().unwrap();
                // The kernel counts XDP's redirects on a veth; tc's it does not count apart.
                let redirects = (hooks.iter().any(|(d, h)| *d == dev && h == "xdp")).then(|| {
                    veth_xdp_count(&ns, &dev, "_xdp_redirect").unwrap_or_else(|e| panic!("{e}"))
                });
                (
                    dev,
                    Forwarded {
                        ipv4: n("ipv4"),
                        ipv6: n("ipv6"),
                        bytes: d["forwarded"]["bytes"].as_u64().unwrap(),
                        passed: d["passed"]["reasons"].clone(),
                        redirects,
                    },
                )
            })
            .collect();
        FastPath {
            devs,
            kernel: (self.forw_datagrams(), self.forw6_datagrams()),
        }
    }

    /// Waits (up to 5 s) until the fast path can redirect to every device of the router (the
    /// daemon has followed the devices coming up).
    pub fn wait_settled(&self) {
        let t0 = Instant::now();
        loop {
            let v = ctl_json(&["show", &self.ids.router_id]);
            let ready = v[0]["interfaces"]
                .as_array()
                .is_some_and(|a| a.iter().all(|i| i["redirect"]["tc"] == true));
            if ready {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the router's devices never all took redirects: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (device, hook) of each device of the router: "xdp", "tc" or "none".
    pub fn hooks(&self) -> Vec<(String, String)> {
        ctl_json(&["show", &self.ids.router_id])[0]["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .map(|i| {
                (
                    i["device"].as_str().unwrap().to_string(),
                    i["hook"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Asserts that, since `before`, the fast path of each device in `want` forwarded exactly
    /// (ipv4, ipv6) packets, and that the kernel's redirect count agrees: proof that the traffic
    /// took the fast path and not the kernel's forwarding.
    pub fn assert_fast_path(&self, before: &FastPath, want: &[(&str, u64, u64)]) {
        let now = self.fast_path();
        for (dev, v4, v6) in want {
            let (b, a) = (before.get(dev), now.get(dev));
            assert_eq!(
                (
                    crate::grew("forwarded ipv4", b.ipv4, a.ipv4),
                    crate::grew("forwarded ipv6", b.ipv6, a.ipv6)
                ),
                (*v4, *v6),
                "{dev}: the fast path forwarded (IPv4, IPv6) packets other than expected; it passed to the kernel: {}",
                now.passed_since(before, dev)
            );
            if let (Some(x), Some(y)) = (a.redirects, b.redirects) {
                assert_eq!(
                    crate::grew("the kernel's XDP redirects", y, x),
                    v4 + v6,
                    "{dev}: the kernel's XDP redirect count differs from the fast path's"
                );
            }
        }
        now.assert_kernel_forwarded_none(before);
    }

    /// Asserts that, since `before`, the fast path of each device in `want` forwarded at least
    /// the bytes given, and that the kernel's redirect count equals the packets it forwarded
    /// (for traffic whose packet count is not known in advance, such as TCP).
    pub fn assert_fast_path_carried(&self, before: &FastPath, want: &[(&str, u64)]) {
        let now = self.fast_path();
        for (dev, bytes) in want {
            let (b, a) = (before.get(dev), now.get(dev));
            let carried = crate::grew("forwarded bytes", b.bytes, a.bytes);
            assert!(
                carried >= *bytes,
                "{dev}: the fast path forwarded {carried} bytes, at least {bytes} were expected"
            );
            if let (Some(x), Some(y)) = (a.redirects, b.redirects) {
                assert_eq!(
                    crate::grew("the kernel's XDP redirects", y, x),
                    crate::grew("forwarded packets", b.ipv4 + b.ipv6, a.ipv4 + a.ipv6),
                    "{dev}: the kernel's XDP redirect count differs from the fast path's"
                );
            }
        }
        now.assert_kernel_forwarded_none(before);
    }

    /// Packets forwarded by the fast path from `dev`, of one family ("ipv4" or "ipv6").
    pub fn forwarded_family(&self, dev: &str, family: &str) -> u64 {
        self.stats()
            .iter()
            .find(|s| s["device"] == dev)
            .expect("device in stats")["forwarded"][family]["packets"]
            .as_u64()
            .unwrap()
    }

    /// Applies the router only; the caller plugs the instances.
    pub fn applied(extra: &str) -> Seed {
        Seed::applied_with("", extra)
    }

    pub fn applied_with(router_fields: &str, extra: &str) -> Seed {
        Seed::apply_new(|ids| ids.config_with(router_fields, extra))
    }

    /// A router with fresh ids, applied from the definition `text` gives for them; apply
    /// creates its namespace and devices.
    fn apply_new(text: impl FnOnce(&Ids) -> String) -> Seed {
        let mut seed = Seed::new();
        crate::in_setup(|| seed.apply(&text(&seed.ids)));
        seed
    }

    fn new() -> Seed {
        let tag = unique_tag();
        Seed {
            vm1: format!("vm1-{tag}"),
            vm3: format!("vm3-{tag}"),
            ids: Ids::new(&tag),
            extra_ns: Vec::new(),
            injected_a: 0,
            check_counters: true,
            rx_offset: Vec::new(),
        }
    }

    /// Applies the definition `text` (asserting success); returns what apply wrote to stderr.
    pub fn apply(&mut self, text: &str) -> String {
        let path = write_config(&self.ids.tag, text);
        let out = ctl(&["apply", "-f", &path]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "apply failed: {err}");
        self.rx_offset = self.rx_offsets();
        err
    }

    /// `plugged_then_applied` with the whole definition from `text`.
    pub fn up_text(text: impl FnOnce(&Ids) -> String) -> Seed {
        Seed::plugged_then_applied(text)
    }

    /// The seed as Neutron's agents build it: the L2 agent plugs the router's `qr-` devices
    /// (veths, instance ends in vm1 and vm3, every device at kernel defaults) and the
    /// instances come up; then the router is applied, adopting the namespace and devices.
    fn plugged_then_applied(text: impl FnOnce(&Ids) -> String) -> Seed {
        let mut s = Seed::new();
        let ns = s.ns();
        // The namespace is adopted: destroy leaves it, the teardown deletes it.
        s.extra_ns.push(ns.clone());
        sh(&format!("ip netns add {ns}"));
        for (vm, dev, tap, addr, gw) in [
            (
                s.vm1.clone(),
                s.ids.dev_a(),
                s.ids.tap_a(),
                "172.16.100.3/24",
                "172.16.100.1",
            ),
            (
                s.vm3.clone(),
                s.ids.dev_b(),
                s.ids.tap_b(),
                "172.16.101.3/24",
                "172.16.101.1",
            ),
        ] {
            let q = match VETH_QUEUES.load(std::sync::atomic::Ordering::Relaxed) {
                0 | 1 => String::new(),
                n => format!(" numtxqueues {n} numrxqueues {n}"),
            };
            sh(&format!(
                "ip netns add {vm} && ip -n {vm} link set lo up && \
                 ip -n {ns} link add {dev}{q} type veth peer name {tap}{q} netns {vm} && \
                 ip -n {vm} link set {tap} up && ip -n {vm} addr add {addr} dev {tap} && \
                 ip -n {vm} route add default via {gw}"
            ));
        }
        let text = text(&s.ids);
        crate::in_setup(|| s.apply(&text));
        s
    }

    /// The seed plus an external network, plugged before apply at kernel defaults: the router's
    /// `qg-` device is a veth whose other end is in `ext-<tag>`, the upstream router
    /// (192.168.1.1/24, forwarding, no route to the tenant subnets), which also routes to
    /// `out-<tag>`, an outside host at 203.0.113.5/24. Then `text` is applied.
    pub fn up_nat(text: impl FnOnce(&Ids) -> String) -> Seed {
        Seed::plugged_then_applied(|ids| {
            let tag = &ids.tag;
            let (ns, ext, out, qg) = (
                ids.ns(),
                format!("ext-{tag}"),
                format!("out-{tag}"),
                ids.dev_g(),
            );
            sh(&format!(
                "ip netns add {ext} && ip netns add {out} && \
                 ip -n {ext} link set lo up && ip -n {out} link set lo up && \
                 ip -n {ns} link add {qg} type veth peer name up0 netns {ext} && \
                 ip -n {ext} link set up0 up && ip -n {ext} addr add 192.168.1.1/24 dev up0 && \
                 ip -n {ext} link add o0 type veth peer name e0 netns {out} && \
                 ip -n {ext} link set o0 up && ip -n {ext} addr add 203.0.113.1/24 dev o0 && \
                 ip -n {out} link set e0 up && ip -n {out} addr add 203.0.113.5/24 dev e0 && \
                 ip -n {out} route add default via 203.0.113.1 && \
                 ip netns exec {ext} sysctl -qw net.ipv4.ip_forward=1"
            ));
            text(ids)
        })
        .with_extra(["ext", "out"])
    }

    fn with_extra<const N: usize>(mut self, prefixes: [&str; N]) -> Seed {
        for p in prefixes {
            self.extra_ns.push(format!("{p}-{}", self.ids.tag));
        }
        self
    }

    pub fn ext(&self) -> String {
        format!("ext-{}", self.ids.tag)
    }
    pub fn out(&self) -> String {
        format!("out-{}", self.ids.tag)
    }

    /// Moves `dev` (in the caller's namespace) into instance namespace `ns` and configures it.
    pub fn plug(&self, ns: &str, dev: &str, addr: &str, gw: &str) {
        if !std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        sh(&format!(
            "ip link set {dev} netns {ns} && ip -n {ns} link set {dev} up && ip -n {ns} addr add {addr} dev {dev} && ip -n {ns} route add default via {gw}"
        ));
    }

    pub fn ns(&self) -> String {
        self.ids.ns()
    }

    /// Runs a shell command inside namespace `ns`.
    pub fn exec(ns: &str, cmd: &str) -> std::process::Output {
        sh_out(&format!("ip netns exec {ns} sh -c '{cmd}'"))
    }

    /// `count` pings from `ns` to `dst` (which may carry more ping options); true only when
    /// every ping sent was answered.
    pub fn ping(ns: &str, dst: &str, count: u32) -> bool {
        let (sent, got) = Self::ping_counts(ns, dst, count);
        got >= count && sent == got
    }

    /// (transmitted, received) of pings from `ns` to `dst`, 0.2 s apart, until `count` replies
    /// arrived or a deadline passed (without a deadline, ping succeeds on a single reply; with
    /// one, it sends until `count` replies came, so a slow first reply is not a loss).
    pub fn ping_counts(ns: &str, dst: &str, count: u32) -> (u32, u32) {
        let deadline = 3 + count / 5;
        let out = Self::exec(
            ns,
            &format!("ping -c {count} -i 0.2 -W 2 -w {deadline} {dst}"),
        );
        ping_summary(&String::from_utf8_lossy(&out.stdout))
    }

    /// vm1 and vm3 talk to their gateways, so that the router learns both (ARP).
    pub fn prime_neighbours(&self) {
        assert!(
            Self::ping(&self.vm1, "172.16.100.1", 1),
            "vm1 cannot reach its gateway"
        );
        assert!(
            Self::ping(&self.vm3, "172.16.101.1", 1),
            "vm3 cannot reach its gateway"
        );
        self.wait_neigh("172.16.100.3");
        self.wait_neigh("172.16.101.3");
    }

    /// Waits (up to 3 s) until the fast path's neighbour map holds `ip`.
    pub fn wait_neigh(&self, ip: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let v = ctl_json(&["neigh", &self.ids.router_id]);
            if let Some(n) = v.as_array().unwrap().iter().find(|n| n["dst"] == ip) {
                return n["lladdr"].as_str().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "neighbour {ip} never reached the fast path: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn set_forwarding(&self, on: bool) {
        sh(&format!(
            "ip netns exec {} sysctl -qw net.ipv4.ip_forward={}",
            self.ns(),
            on as u8
        ));
    }

    /// The router namespace's kernel ForwDatagrams counter (/proc/net/snmp).
    pub fn forw_datagrams(&self) -> u64 {
        let snmp = sh(&format!("ip netns exec {} cat /proc/net/snmp", self.ns()));
        let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
        let names: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let i = names
            .iter()
            .position(|n| *n == "ForwDatagrams")
            .expect("ForwDatagrams");
        values[i].parse().unwrap()
    }

    /// `router-ctl stats ROUTER -j` as (device → JSON).
    pub fn stats(&self) -> Vec<serde_json::Value> {
        ctl_json(&["stats", &self.ids.router_id])
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn forwarded(&self, dev: &str) -> u64 {
        self.stats()
            .iter()
            .find(|s| s["device"] == dev)
            .expect("device in stats")["forwarded"]["packets"]
            .as_u64()
            .unwrap()
    }

    /// (source translated, destination translated): packets the fast path forwarded from `dev`
    /// with their source or destination translated (NAT).
    pub fn nat_counts(&self, dev: &str) -> (u64, u64) {
        let v = self.stats();
        let d = v
            .iter()
            .find(|d| d["device"] == dev)
            .unwrap_or_else(|| panic!("no stats for {dev}: {v:?}"));
        (
            d["nat"]["source_translated"].as_u64().unwrap(),
            d["nat"]["destination_translated"].as_u64().unwrap(),
        )
    }

    /// Packets the fast path saw arrive on `dev`: forwarded, passed to the kernel or dropped.
    pub fn seen(&self, dev: &str) -> u64 {
        let v = self.stats();
        let d = v
            .iter()
            .find(|d| d["device"] == dev)
            .unwrap_or_else(|| panic!("no stats for {dev}: {v:?}"));
        ["forwarded", "passed", "dropped"]
            .iter()
            .map(|k| d[k]["packets"].as_u64().unwrap())
            .sum()
    }

    pub fn passed(&self, dev: &str, reason: &str) -> u64 {
        self.stats()
            .iter()
            .find(|s| s["device"] == dev)
            .expect("device in stats")["passed"]["reasons"][reason]
            .as_u64()
            .unwrap()
    }

    /// Device `dev`'s MAC as the router namespace's kernel has it (not as the router recorded
    /// it: that is what the fast path was given, so it cannot check the fast path).
    pub fn mac_of(&self, dev: &str) -> String {
        link_mac(&self.ns(), dev)
    }
}

/// Per device: what the fast path forwarded (`Seed::fast_path`); and what the kernel itself
/// forwarded in the router namespace (IPv4, IPv6).
#[derive(Clone, Debug)]
pub struct FastPath {
    devs: Vec<(String, Forwarded)>,
    kernel: (u64, u64),
}

#[derive(Clone, Debug)]
pub struct Forwarded {
    pub ipv4: u64,
    pub ipv6: u64,
    pub bytes: u64,
    /// Passed to the kernel, per reason.
    pub passed: serde_json::Value,
    /// The kernel's own count of frames XDP redirected from the device (XDP only).
    pub redirects: Option<u64>,
}

impl FastPath {
    pub fn get(&self, dev: &str) -> Forwarded {
        self.devs
            .iter()
            .find(|(d, _)| d == dev)
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no device {dev}"))
    }

    /// The pass reasons that moved on `dev` since `before`, as "reason=count".
    pub fn passed_since(&self, before: &FastPath, dev: &str) -> String {
        let (a, b) = (self.get(dev).passed, before.get(dev).passed);
        let moved: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let d = v.as_u64()? - b[k].as_u64().unwrap_or(0);
                (d > 0).then(|| format!("{k}={d}"))
            })
            .collect();
        if moved.is_empty() {
            "nothing".into()
        } else {
            moved.join(", ")
        }
    }

    /// The kernel's own forwarding counters did not move since `before` (with forwarding on, the
    /// kernel would have carried what the fast path dropped or passed).
    pub fn assert_kernel_forwarded_none(&self, before: &FastPath) {
        assert_eq!(
            self.kernel, before.kernel,
            "the kernel forwarded packets itself (ForwDatagrams, Ip6OutForwDatagrams)"
        );
    }
}

/// (transmitted, received) from ping's summary line; (0, 0) when it printed none.
pub fn ping_summary(text: &str) -> (u32, u32) {
    let Some(line) = text.lines().find(|l| l.contains("packets transmitted")) else {
        return (0, 0);
    };
    let n: Vec<u32> = line
        .split(',')
        .map(|p| {
            p.split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    (n[0], n.get(1).copied().unwrap_or(0))
}

impl Seed {
    /// The test destroyed the router itself: there are no counters left to check on teardown.
    pub fn destroyed(&mut self) {
        self.check_counters = false;
    }

    /// Packets the fast path counted on `dev`: forwarded + passed + dropped.
    fn ours(&self, dev: &str) -> Result<u64, String> {
        let out = ctl(&["stats", "-j", &self.ids.router_id]);
        if !out.status.success() {
            return Err(format!(
                "router-ctl stats {}: {}",
                self.ids.router_id,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("router-ctl stats -j: {e}"))?;
        let d = v
            .as_array()
            .and_then(|a| a.iter().find(|s| s["device"] == dev))
            .ok_or_else(|| format!("{dev} missing from router-ctl stats: {v}"))?;
        let n = |a: &str, b: &str| d[a][b].as_u64().ok_or_else(|| format!("{a}.{b}: {d}"));
        Ok(n("forwarded", "packets")? + n("passed", "packets")? + n("dropped", "packets")?)
    }

    /// What the kernel saw arrive on `dev` for the hook the fast path runs in there: frames XDP
    /// ran on (the veth's own counters), or every packet received (tc runs on each).
    fn kernel_seen(&self, dev: &str, hook: &str) -> Result<u64, String> {
        let ns = self.ns();
        if hook == "xdp" {
            return veth_xdp_count(&ns, dev, "_xdp_packets");
        }
        let v: serde_json::Value =
            serde_json::from_str(&sh(&format!("ip -n {ns} -j -s link show dev {dev}")))
                .map_err(|e| format!("ip -s link: {e}"))?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .ok_or_else(|| format!("no rx packets for {dev}: {v}"))
    }

    /// For each device in tc: received minus counted, at a moment when neither moves.
    fn rx_offsets(&self) -> Vec<(String, i64)> {
        let mut v = Vec::new();
        for (dev, hook) in self.hooks() {
            if hook != "tc" {
                continue;
            }
            let mut last = None;
            for _ in 0..40 {
                let (a, k, b) = (
                    self.ours(&dev).unwrap(),
                    self.kernel_seen(&dev, &hook).unwrap(),
                    self.ours(&dev).unwrap(),
                );
                if a == b && last == Some(k as i64 - a as i64) {
                    break;
                }
                last = Some(k as i64 - a as i64);
                std::thread::sleep(Duration::from_millis(20));
            }
            v.push((dev, last.unwrap()));
        }
        v
    }

    /// Per `qr-` device, what the kernel saw arrive against the fast path's counters
    /// (forwarded + passed + dropped): with XDP, the frames XDP ran on (the veth's own
    /// counters); with tc, the packets received since the router was applied. Err says where
    /// they differ, or what could not be read (a check that cannot read its inputs fails).
    pub fn counters_add_up(&self) -> Result<(), String> {
        for (dev, hook) in self.hooks() {
            if hook == "none" {
                return Err(format!("{dev}: no program attached"));
            }
            let injected = if dev == self.ids.dev_a() {
                self.injected_a
            } else {
                0
            };
            let offset = if hook == "tc" {
                self.rx_offset
                    .iter()
                    .find(|(d, _)| *d == dev)
                    .map(|(_, o)| *o)
                    .ok_or_else(|| format!("{dev}: no baseline (tc since when?)"))?
            } else {
                0
            };
            // Traffic may still be arriving: agree on a moment when neither count moves.
            let mut last = None;
            for _ in 0..20 {
                let (a, k, b) = (
                    self.ours(&dev)? as i64 - injected as i64,
                    self.kernel_seen(&dev, &hook)? as i64 - offset,
                    self.ours(&dev)? as i64 - injected as i64,
                );
                if a == b && a == k {
                    last = None;
                    break;
                }
                last = Some((a, k));
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some((a, k)) = last {
                return Err(format!(
                    "{dev} ({hook}): the kernel saw {k} packets arrive, the fast path counted {a} (forwarded + passed + dropped)"
                ));
            }
        }
        Ok(())
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        // After any test that passed: the counters add up (checked before the teardown, the
        // failure raised after it, so that nothing is left behind).
        let counters = if self.check_counters && !std::thread::panicking() {
            self.counters_add_up().err()
        } else {
            None
        };
        let out = ctl(&["destroy", &self.ids.router_id]);
        if !out.status.success() {
            eprintln!(
                "cleanup: destroy {}: {}",
                self.ids.router_id,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for ns in [&self.vm1, &self.vm3]
            .into_iter()
            .chain(self.extra_ns.iter())
        {
            let _ = sh_out(&format!("ip netns del {ns}"));
        }
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("router-test-{}.toml", self.ids.tag)),
        );
        if let Some(e) = counters {
            panic!("counters do not add up: {e}");
        }
    }
}

/// Sum of a veth's per-queue XDP counters (`ethtool -S`) whose name ends in `suffix`, e.g.
/// `_xdp_packets` (frames XDP ran on) or `_xdp_redirect`; Err when ethtool cannot tell.
pub fn veth_xdp_count(ns: &str, dev: &str, suffix: &str) -> Result<u64, String> {
    let out = sh_out(&format!("ip netns exec {ns} ethtool -S {dev}"));
    if !out.status.success() {
        return Err(format!(
            "ethtool -S {dev} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let counts: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with(suffix))
        .map(|(k, v)| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| format!("ethtool -S {dev}: {k}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if counts.is_empty() {
        return Err(format!(
            "ethtool -S {dev} in {ns} has no rx_queue_*{suffix} counter"
        ));
    }
    Ok(counts.iter().sum())
}

/// The MAC address of `dev` in namespace `ns`, as iproute2 prints it.
pub fn link_mac(ns: &str, dev: &str) -> String {
    let l = router_ctl::kernel::link_in(Some(ns), dev)
        .expect("rtnetlink")
        .unwrap_or_else(|| panic!("no {dev} in {ns}"));
    router_ctl::config::fmt_mac(&l.mac().expect("an Ethernet device"))
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("namespace");
    std::thread::spawn(move || {
        router_ctl::kernel::netns::enter(&file).expect("setns");
        f()
    })
}

/// Sends `len` patterned bytes over TCP from namespace `from` to `to_ip` in namespace `to`;
/// returns (bytes received, whether they equal what was sent).
pub fn tcp_transfer(from: &str, to: &str, to_ip: &str, len: usize) -> (usize, bool) {
    let (n, same, _) = tcp_transfer_via(from, to, to_ip, to_ip, len);
    (n, same)
}

/// As `tcp_transfer`, with the client connecting to `connect_ip` (a floating IP, say) while the
/// server listens on `bind_ip`; also returns the client address the server saw.
pub fn tcp_transfer_via(
    from: &str,
    to: &str,
    connect_ip: &str,
    bind_ip: &str,
    len: usize,
) -> (usize, bool, String) {
    let br = |ip: &str| {
        if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    };
    let (connect_ip, addr) = (br(connect_ip), format!("{}:5001", br(bind_ip)));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_ns(to, move || {
        let l = TcpListener::bind(&addr).expect("bind");
        ready_tx.send(()).unwrap();
        let (mut s, peer) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut got = Vec::with_capacity(len);
        s.read_to_end(&mut got).expect("read");
        (got, peer.ip().to_string())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    let client = in_ns(from, move || {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut s = TcpStream::connect_timeout(
            &format!("{connect_ip}:5001").parse().unwrap(),
            Duration::from_secs(5),
        )
        .expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(&data).expect("write");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        data
    });
    let sent = client.join().expect("client");
    let (got, peer) = server.join().expect("server");
    (got.len(), got == sent, peer)
}

/// A UDP socket bound to `port` (0: any) in namespace `ns`, reads timing out after `timeout`.
pub fn udp_socket_in(ns: &str, port: u16, timeout: Duration) -> std::net::UdpSocket {
    let s = in_ns(ns, move || {
        std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind")
    })
    .join()
    .unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// A request/response UDP flow from `from` to an echo in `to` at `to_ip`:`port`, one request
/// every 200 µs while it lives (both directions cross the router, as a flow the guarded fast
/// path carries must), and the instant each request reached the echo.
pub struct EchoStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl EchoStream {
    pub fn start(from: &str, to: &str, to_ip: &'static str, port: u16) -> EchoStream {
        use std::sync::{atomic::Ordering, Arc, Mutex};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rx = udp_socket_in(to, port, Duration::from_millis(50));
        let (st, sn) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let mut buf = [0u8; 16];
                if let Ok((n, from)) = rx.recv_from(&mut buf) {
                    sn.lock().unwrap().push(Instant::now());
                    let _ = rx.send_to(&buf[..n], from);
                }
            }
        });
        let st = stop.clone();
        in_ns(from, move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_nonblocking(true).unwrap();
            let mut i = 0u32;
            while !st.load(Ordering::SeqCst) {
                let _ = s.send_to(&i.to_be_bytes(), (to_ip, port));
                while s.recv(&mut [0u8; 16]).is_ok() {}
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        EchoStream { stop, seen }
    }

    /// Every arrival so far.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.seen.lock().unwrap().clone()
    }

    /// The arrivals after `t`, as delays from it.
    pub fn after(&self, t: Instant) -> Vec<Duration> {
        self.arrivals()
            .iter()
            .filter(|a| **a > t)
            .map(|a| a.duration_since(t))
            .collect()
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Captures frames on `dev` in namespace `ns` until `pred` accepts one (or 5 s pass).
pub fn capture(
    ns: &str,
    dev: &str,
    pred: impl Fn(&[u8]) -> bool + Send + 'static,
) -> std::thread::JoinHandle<Option<Vec<u8>>> {
    let dev = std::ffi::CString::new(dev).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = in_ns(ns, move || {
        let fd = packet_socket(&dev);
        tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        let mut found = None;
        while found.is_none() && Instant::now() < deadline {
            found = recv_incoming(fd, &mut buf)
                .filter(|f| pred(f))
                .map(|f| f.to_vec());
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        found
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("capture ready");
    h
}

/// Every IPv4 conntrack entry of namespace `ns`.
pub fn conntrack_flows(ns: &str) -> Vec<router_ctl::kernel::conntrack::Flow> {
    in_ns(ns, || {
        router_ctl::kernel::conntrack::Conntrack::open(0)
            .unwrap()
            .dump()
            .unwrap()
    })
    .join()
    .unwrap()
}

/// What a failing test says about the daemons: which run, whose pid the pid file names, and the
/// last lines of the log of the one `apply` started.
pub fn daemon_report() -> String {
    let log = std::fs::read_to_string("/run/router-xdp/daemon.log").unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    // And the log of the newest daemon a test restarted by hand.
    let restarted = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("daemon.log"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            format!(
                "{} ends:\n{}",
                e.path().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .unwrap_or_default();
    format!(
        "daemons running {:?}, pid file {:?}, daemon.log ends:\n{}\n{restarted}",
        daemon_pids(),
        std::fs::read_to_string("/run/router-xdp/daemon.pid").unwrap_or_default(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// The pids of the running `router-ctl run` daemons (zombies excluded: they are dead).
pub fn daemon_pids() -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_daemon = args.len() > 1 && args[0].ends_with(b"router-ctl") && args[1] == b"run";
        if is_daemon && process_alive(pid) {
            v.push(pid);
        }
    }
    v
}

/// True while `pid` runs (a zombie has exited).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

/// Kills every `router-ctl run` with SIGKILL, as a crash would, and asserts that each one is
/// gone; then starts `router-ctl run ARGS` as systemd would, logging to `log`, and returns its
/// pid once it holds the daemon lock (it has written the pid file).
pub fn restart_daemon(args: &[&str], log: &std::path::Path) -> u32 {
    let old = daemon_pids();
    for pid in &old {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let t0 = Instant::now();
    while old.iter().any(|p| process_alive(*p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "daemons {old:?} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = std::fs::File::create(log).expect("daemon log");
    let mut child = std::process::Command::new(crate::router_ctl())
        .arg("run")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("router-ctl run");
    let pid = child.id();
    // Reaped when it exits, so that it never lingers as a zombie.
    std::thread::spawn(move || child.wait());
    assert!(!old.contains(&pid));
    let t0 = Instant::now();
    loop {
        let owner = std::fs::read_to_string("/run/router-xdp/daemon.pid").unwrap_or_default();
        if owner.split_whitespace().next() == Some(pid.to_string().as_str()) {
            return pid;
        }
        // A daemon started without definitions stops at once when no router is applied (the
        // tests that ran before destroyed theirs): it took over, and had nothing to serve.
        if args.is_empty()
            && !process_alive(pid)
            && std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("router-ctl daemon stopped")
        {
            return pid;
        }
        assert!(
            process_alive(pid) && t0.elapsed() < Duration::from_secs(5),
            "the restarted daemon (pid {pid}) did not take over: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 5 s) until `log` holds `needle` at least `n` times.
pub fn wait_log(log: &std::path::Path, needle: &str, n: usize) {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{needle:?} did not appear {n} times in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Records the frames arriving at `dev` in namespace `ns` that `pred` accepts, until `stop`.
pub struct Recorder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Recorder {
    pub fn start(ns: &str, dev: &str, pred: impl Fn(&[u8]) -> bool + Send + 'static) -> Recorder {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let dev = std::ffi::CString::new(dev).unwrap();
        let s = stop.clone();
        let handle = in_ns(ns, move || {
            let fd = packet_socket(&dev);
            tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                if let Some(f) = recv_incoming(fd, &mut buf) {
                    if pred(f) {
                        frames.push(f.to_vec());
                    }
                }
            }
            // Drain what is queued.
            while let Some(f) = recv_incoming(fd, &mut buf) {
                if pred(f) {
                    frames.push(f.to_vec());
                }
            }
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            frames
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("recorder ready");
        Recorder { stop, handle }
    }

    pub fn stop(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("recorder")
    }
}

/// An AF_PACKET socket on `dev` of the calling thread's namespace, with a 100 ms receive
/// timeout.
pub fn packet_socket(dev: &std::ffi::CStr) -> i32 {
    // SAFETY: plain socket calls with checked results.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
        assert!(sll.sll_ifindex > 0, "no device {dev:?}");
        let rc = libc::bind(
            fd,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let big: libc::c_int = 16 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &big as *const _ as *const libc::c_void,
            4,
        );
        recv_timeout_100ms(fd);
        fd
    }
}

/// The next frame that arrived at the socket's device (not one it sent), or None on timeout.
pub fn recv_incoming(fd: i32, buf: &mut [u8]) -> Option<&[u8]> {
    loop {
        // SAFETY: receives into buf; `from` is a sockaddr_ll of the given length.
        let (n, pkttype) = unsafe {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut flen,
            );
            (n, from.sll_pkttype)
        };
        if n <= 0 {
            return None;
        }
        if pkttype != libc::PACKET_OUTGOING as u8 {
            return Some(&buf[..n as usize]);
        }
    }
}

/// Reads on socket `fd` give up after 100 ms (so that a reader loop can check its clock).
pub fn recv_timeout_100ms(fd: i32) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a timeval on the stack.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
}

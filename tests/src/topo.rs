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
}

impl Ids {
    pub fn new(tag: &str) -> Ids {
        Ids {
            tag: tag.to_string(),
            router_id: format!("{tag}00-16f4-4d6c-89d2-8af91cec9714"),
            name: format!("router_{tag}"),
            port_a: format!("{tag}0a-4586-4e8a-9c3e-1f2a3b4c5d6e"),
            port_b: format!("{tag}0b-731c-4b1a-8d2e-6f7a8b9c0d1e"),
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
        let fixed = |n: u32| {
            format!(
                "fixed_ips = [\n  {{ subnet = \"172.16.{n}.0/24\", ip_address = \"172.16.{n}.1\" }},\n  {{ subnet = \"2001:db8:{n}::/64\", ip_address = \"2001:db8:{n}::1\" }},\n]"
            )
        };
        self.router_toml(router_fields, &fixed(100), &fixed(101), extra)
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
}

impl Seed {
    /// Applies the seed router (plus `extra` TOML) and plugs vm1 and vm3 directly.
    pub fn up(extra: &str) -> Seed {
        let s = Seed::applied(extra);
        s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
        s.plug(&s.vm3, &s.ids.tap_b(), "172.16.101.3/24", "172.16.101.1");
        s
    }

    /// As `up`, with `router_fields` in the router's table (e.g. `max_routes = 1000000`).
    pub fn up_with(router_fields: &str, extra: &str) -> Seed {
        let s = Seed::applied_with(router_fields, extra);
        s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
        s.plug(&s.vm3, &s.ids.tap_b(), "172.16.101.3/24", "172.16.101.1");
        s
    }

    /// The dual-stack seed (`Ids::config_dual`): vm1 is also 2001:db8:100::3, vm3
    /// 2001:db8:101::3, each with its gateway as IPv6 default route.
    pub fn up_dual(extra: &str) -> Seed {
        Seed::up_dual_with("", extra)
    }

    /// As `up_dual`, with `router_fields` in the router's table.
    pub fn up_dual_with(router_fields: &str, extra: &str) -> Seed {
        let s = Seed::apply_new(|ids| ids.config_dual_with(router_fields, extra));
        s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
        s.plug(&s.vm3, &s.ids.tap_b(), "172.16.101.3/24", "172.16.101.1");
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

    /// A router with fresh ids, applied from the definition `text` gives for them.
    fn apply_new(text: impl FnOnce(&Ids) -> String) -> Seed {
        let tag = unique_tag();
        let seed = Seed {
            vm1: format!("vm1-{tag}"),
            vm3: format!("vm3-{tag}"),
            ids: Ids::new(&tag),
            extra_ns: Vec::new(),
            injected_a: 0,
            check_counters: true,
        };
        let path = write_config(&tag, &text(&seed.ids));
        let out = ctl(&["apply", "-f", &path]);
        assert!(
            out.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seed
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

    pub fn ping(ns: &str, dst: &str, count: u32) -> bool {
        Self::exec(ns, &format!("ping -c {count} -i 0.2 -W 2 {dst}"))
            .status
            .success()
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

    pub fn passed(&self, dev: &str, reason: &str) -> u64 {
        self.stats()
            .iter()
            .find(|s| s["device"] == dev)
            .expect("device in stats")["passed"]["reasons"][reason]
            .as_u64()
            .unwrap()
    }

    pub fn mac_of(&self, dev: &str) -> String {
        let v = ctl_json(&["show", &self.ids.router_id]);
        v[0]["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["device"] == dev)
            .unwrap()["mac"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Seed {
    /// Frames the kernel ran XDP on, per `qr-` device (the veth's own per-queue counters),
    /// against the fast path's counters: forwarded + passed + dropped. Err says where they differ.
    pub fn counters_add_up(&self) -> Result<(), String> {
        let ns = self.ns();
        let xdp_seen = |dev: &str| veth_xdp_count(&ns, dev, "_xdp_packets");
        let ours = |dev: &str| -> Option<u64> {
            // None when the test destroyed the router itself.
            let out = ctl(&["stats", "-j", &self.ids.router_id]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let d = v.as_array()?.iter().find(|s| s["device"] == dev)?.clone();
            Some(
                d["forwarded"]["packets"].as_u64()?
                    + d["passed"]["packets"].as_u64()?
                    + d["dropped"]["packets"].as_u64()?,
            )
        };
        for (dev, injected) in [(self.ids.dev_a(), self.injected_a), (self.ids.dev_b(), 0)] {
            // Traffic may still be arriving: agree on a moment when neither count moves.
            let mut last = None;
            for _ in 0..20 {
                let (a, k, b) = (ours(&dev), xdp_seen(&dev).map(|k| k + injected), ours(&dev));
                if a.is_none() || k.is_none() {
                    last = None;
                    break;
                }
                if a == b && a == k {
                    last = None;
                    break;
                }
                last = Some((a, k));
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some((a, k)) = last {
                return Err(format!(
                    "{dev}: XDP ran on {k:?} frames, the fast path counted {a:?} (forwarded + passed + dropped)"
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
/// `_xdp_packets` (frames XDP ran on) or `_xdp_redirect`; None when ethtool cannot tell.
pub fn veth_xdp_count(ns: &str, dev: &str, suffix: &str) -> Option<u64> {
    let out = sh_out(&format!("ip netns exec {ns} ethtool -S {dev}"));
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().split_once(": "))
            .filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    })
}

/// The MAC address of `dev` in namespace `ns`, as iproute2 prints it.
pub fn link_mac(ns: &str, dev: &str) -> String {
    router_ctl::sys::link(Some(ns), dev)
        .expect("ip link")
        .unwrap_or_else(|| panic!("no {dev} in {ns}"))
        .address
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("namespace");
    std::thread::spawn(move || {
        router_ctl::sys::enter_netns(&file).expect("setns");
        f()
    })
}

/// Sends `len` patterned bytes over TCP from namespace `from` to `to_ip` in namespace `to`;
/// returns (bytes received, whether they equal what was sent).
pub fn tcp_transfer(from: &str, to: &str, to_ip: &str, len: usize) -> (usize, bool) {
    let to_ip = if to_ip.contains(':') {
        format!("[{to_ip}]")
    } else {
        to_ip.to_string()
    };
    let addr = format!("{to_ip}:5001");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_ns(to, move || {
        let l = TcpListener::bind(&addr).expect("bind");
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::with_capacity(len);
        s.read_to_end(&mut got).expect("read");
        got
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    let client = in_ns(from, move || {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut s = TcpStream::connect_timeout(
            &format!("{to_ip}:5001").parse().unwrap(),
            Duration::from_secs(5),
        )
        .expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&data).expect("write");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        data
    });
    let sent = client.join().expect("client");
    let got = server.join().expect("server");
    (got.len(), got == sent)
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
            let rc = libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = vec![0u8; 65536];
            let mut found = None;
            while Instant::now() < deadline {
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
                // Only frames arriving at this device, not the ones it sends.
                if n > 0
                    && from.sll_pkttype != libc::PACKET_OUTGOING as u8
                    && pred(&buf[..n as usize])
                {
                    found = Some(buf[..n as usize].to_vec());
                    break;
                }
            }
            libc::close(fd);
            found
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("capture ready");
    h
}

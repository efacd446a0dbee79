//! Differential test against the kernel router: the corpus of `tests::corpus` (over 10 000
//! frames) is sent from vm1 into the dual-stack seed router twice, once with the fast path
//! attached and once with only the kernel forwarding, and what arrives at vm3 and what comes back
//! to vm1 must be the same, byte for byte, frame by frame.
//!
//! Making the kernel's side repeatable: vm1 and vm3 have no IP stack of their own (their kernel
//! sees nothing: an nftables ingress drop; the recording sockets see frames before that), the
//! router knows them as permanent neighbours, ICMP rate limits and ICMP redirects are off in the
//! router namespace, and after every corpus frame two markers (an echo request to the router
//! and a datagram to vm3) close the window in which the frame's effects are recorded.
//! IPv4 packets the router itself originates (ICMP errors, echo replies) carry an IP ID the
//! kernel draws at random: ID and header checksum of those are masked in both recordings.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use router_common::{map_names, pass_reason as why, Stats};
use router_ctl::{config::Hook, datapath, state::RouterState};
use tests::{
    corpus::{self, GW_A4, MARK_ID, MARK_PORT, VM1_4, VM3_4},
    ctl_json,
    model::{self, Model, Verdict, Via},
    require_root, sh,
    topo::{in_ns, link_mac, veth_xdp_count, Seed},
};

/// An AF_PACKET socket bound to one device of one namespace, non-blocking.
struct Port(OwnedFd);

impl Port {
    fn open(ns: &str, dev: &str) -> Port {
        let dev = std::ffi::CString::new(dev).unwrap();
        let fd = in_ns(ns, move || {
            // SAFETY: plain socket calls with checked results.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0);
                let rc = libc::bind(
                    fd,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                let big: libc::c_int = 8 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    &big as *const _ as *const libc::c_void,
                    4,
                );
                fd
            }
        })
        .join()
        .unwrap();
        // SAFETY: a descriptor we own from here on.
        Port(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn send(&self, f: &[u8]) -> Result<(), i32> {
        // SAFETY: sends f.len() bytes from f.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                f.as_ptr() as *const libc::c_void,
                f.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
        }
        Ok(())
    }

    /// The next frame that arrived at the device (not one it sent), if any is queued.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 9000];
        loop {
            // SAFETY: receives into buf; `from` is a sockaddr_ll of the given length.
            let (n, pkttype) = unsafe {
                let mut from: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                (n, from.sll_pkttype)
            };
            if n < 0 {
                return None;
            }
            if pkttype != libc::PACKET_OUTGOING as u8 {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }

    fn wait(&self, other: &Port, ms: i32) {
        let mut fds = [
            libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    }
}

/// What one corpus frame caused: frames arriving at vm3, frames coming back to vm1.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Effect {
    sent: Result<(), i32>,
    at_vm3: Vec<Vec<u8>>,
    at_vm1: Vec<Vec<u8>>,
}

/// The fast path's counters of qr-a, read from its pinned map.
struct Counters {
    map: aya::maps::MapData,
    slot: u32,
}

impl Counters {
    fn read(&self) -> Stats {
        datapath::read_stats(&self.map, self.slot).expect("reading the fast path's counters")
    }
}

/// What the counters moved by between two readings.
fn delta(a: &Stats, b: &Stats) -> Stats {
    let mut d = Stats::ZERO;
    d.fwd_packets = b.fwd_packets - a.fwd_packets;
    d.fwd6_packets = b.fwd6_packets - a.fwd6_packets;
    for r in 0..why::COUNT {
        d.pass[r] = b.pass[r] - a.pass[r];
    }
    d
}

fn gw_marker(qr_a: [u8; 6], vm1: [u8; 6], i: u16) -> Vec<u8> {
    let mut ip = tests::frame::Ipv4::udp(VM1_4, GW_A4, 64);
    ip.protocol = 1;
    let m = corpus::icmp(&VM1_4, &GW_A4, 8, 0, &corpus::echo(MARK_ID, i, b"mark"));
    corpus::ipv4_frame(qr_a, vm1, &ip, &m)
}

fn vm3_marker(qr_a: [u8; 6], vm1: [u8; 6], i: u16) -> Vec<u8> {
    let ip = tests::frame::Ipv4::udp(VM1_4, VM3_4, 64);
    let u = tests::frame::udp(MARK_PORT, MARK_PORT, &(i as u32).to_be_bytes());
    corpus::ipv4_frame(qr_a, vm1, &ip, &u)
}

fn is_gw_marker(f: &[u8], i: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [8, 0]
        && f[23] == 1
        && f[26..30] == GW_A4
        && f[34] == 0
        && f[38..40] == MARK_ID.to_be_bytes()
        && f[40..42] == i.to_be_bytes()
}

fn vm3_marker_seq(f: &[u8]) -> Option<u32> {
    (f.len() >= 46
        && f[12..14] == [8, 0]
        && f[23] == 17
        && f[26..30] == VM1_4
        && f[36..38] == MARK_PORT.to_be_bytes())
    .then(|| u32::from_be_bytes([f[42], f[43], f[44], f[45]]))
}

/// The kernel's own noise (MLD reports) is left out; the random IP ID of IPv4 packets the
/// router originates is masked.
fn normalize(mut f: Vec<u8>) -> Option<Vec<u8>> {
    if f.len() >= 63 && f[12..14] == [0x86, 0xdd] && f[20] == 0 && f[54] == 58 {
        if [130u8, 131, 132, 143].contains(&f[62]) {
            return None;
        }
    }
    if f.len() >= 34
        && f[12..14] == [8, 0]
        && [[172, 16, 100, 1], [172, 16, 101, 1]].contains(&[f[26], f[27], f[28], f[29]])
    {
        f[18..20].fill(0);
        f[24..26].fill(0);
    }
    Some(f)
}

/// Sends the corpus; returns each frame's effect and, with `counters`, what the fast path's
/// counters moved by while the frame and its two markers went through.
fn run_corpus(
    corpus: &[(&'static str, Vec<u8>)],
    vm1: &Port,
    vm3: &Port,
    qr_a: [u8; 6],
    vm1_mac: [u8; 6],
    counters: Option<&Counters>,
) -> (Vec<Effect>, Vec<Stats>) {
    let mut effects = Vec::with_capacity(corpus.len());
    let mut moved = Vec::new();
    for (i, (what, f)) in corpus.iter().enumerate() {
        let i16 = i as u16;
        let c0 = counters.map(Counters::read);
        let sent = vm1.send(f);
        vm1.send(&gw_marker(qr_a, vm1_mac, i16)).unwrap();
        vm1.send(&vm3_marker(qr_a, vm1_mac, i16)).unwrap();
        let mut e = Effect {
            sent,
            at_vm3: Vec::new(),
            at_vm1: Vec::new(),
        };
        let (mut done1, mut done3) = (false, false);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !(done1 && done3) {
            assert!(
                Instant::now() < deadline,
                "frame #{i} ({what}): markers lost (vm1 {done1}, vm3 {done3}): {f:02x?}"
            );
            vm1.wait(vm3, 20);
            while let Some(r) = vm1.recv() {
                if is_gw_marker(&r, i16) {
                    done1 = true;
                } else if let Some(n) = normalize(r) {
                    e.at_vm1.push(n);
                }
            }
            while let Some(r) = vm3.recv() {
                match vm3_marker_seq(&r) {
                    Some(s) if s == i as u32 => done3 = true,
                    Some(_) => {}
                    None => e.at_vm3.extend(normalize(r)),
                }
            }
        }
        effects.push(e);
        if let (Some(c), Some(c0)) = (counters, c0) {
            moved.push(delta(&c0, &c.read()));
        }
    }
    (effects, moved)
}

fn mac(s: &str) -> [u8; 6] {
    router_ctl::config::parse_mac(s).expect("a MAC")
}

/// Sets a global sysctl for the test's duration and restores it after (also on failure).
struct GlobalSysctl(&'static str, String);

impl GlobalSysctl {
    fn set(key: &'static str, value: &str) -> GlobalSysctl {
        let old = sh(&format!("sysctl -n {key}")).trim().to_string();
        sh(&format!("sysctl -qw {key}={value}"));
        GlobalSysctl(key, old)
    }
}

impl Drop for GlobalSysctl {
    fn drop(&mut self) {
        let _ = tests::sh_out(&format!("sysctl -qw {}={}", self.0, self.1));
    }
}

#[test]
fn the_fast_path_delivers_what_the_kernel_delivers() {
    require_root();
    // The kernel rate-limits "no route" errors per source with a token bucket refilled by time
    // (net.ipv4.route.error_cost, global, not per namespace): two runs could not agree.
    let _cost = GlobalSysctl::set("net.ipv4.route.error_cost", "0");
    let mut s = Seed::up_dual("");
    let (ns, dev_a, dev_b) = (s.ns(), s.ids.dev_a(), s.ids.dev_b());
    let vm1_mac = link_mac(&s.vm1, &s.ids.tap_a());
    let vm3_mac = link_mac(&s.vm3, &s.ids.tap_b());
    let qr_a = mac(&s.mac_of(&dev_a));
    // Instances without a stack of their own: no addresses, no IPv6, their kernel sees nothing.
    for (vm, tap) in [(&s.vm1, s.ids.tap_a()), (&s.vm3, s.ids.tap_b())] {
        sh(&format!(
            "ip -n {vm} addr flush dev {tap} && ip netns exec {vm} sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 && \
             ip netns exec {vm} nft add table netdev quiet && \
             ip netns exec {vm} nft add chain netdev quiet in '{{ type filter hook ingress device \"{tap}\" priority 0; policy drop; }}'"
        ));
    }
    // The router: permanent neighbours, no ICMP rate limits, no redirects, a smaller MTU
    // towards vm3 so that "too big" happens.
    for (ip, dev, m) in [
        ("172.16.100.3", &dev_a, &vm1_mac),
        ("2001:db8:100::3", &dev_a, &vm1_mac),
        ("fe80::3", &dev_a, &vm1_mac),
        ("172.16.101.3", &dev_b, &vm3_mac),
        ("2001:db8:101::3", &dev_b, &vm3_mac),
    ] {
        sh(&format!(
            "ip -n {ns} neigh replace {ip} lladdr {m} dev {dev} nud permanent"
        ));
    }
    for kv in [
        "net.ipv4.icmp_ratelimit=0",
        "net.ipv4.icmp_msgs_per_sec=1000000000",
        "net.ipv4.icmp_msgs_burst=1000000000",
        "net.ipv6.icmp.ratelimit=0",
        "net.ipv4.conf.all.send_redirects=0",
        &format!("net.ipv4.conf.{dev_a}.send_redirects=0"),
        &format!("net.ipv4.conf.{dev_b}.send_redirects=0"),
    ] {
        sh(&format!("ip netns exec {ns} sysctl -qw {kv}"));
    }
    sh(&format!("ip -n {ns} link set {dev_b} mtu 1400"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while ctl_json(&["show", &s.ids.router_id])[0]["interfaces"][1]["mtu"] != 1400 {
        assert!(
            Instant::now() < deadline,
            "the new MTU never reached the router's state"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for ip in ["172.16.101.3", "2001:db8:101::3", "172.16.100.3"] {
        s.wait_neigh(ip);
    }
    // The router's link-local addresses finish duplicate address detection first: a tentative
    // one is not used as the source of ICMPv6 errors to link-local addresses.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh(&format!("ip -n {ns} -6 addr show tentative"))
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "addresses stay tentative");
        std::thread::sleep(Duration::from_millis(100));
    }

    let corpus = corpus::corpus(qr_a, mac(&vm1_mac));
    assert!(corpus.len() >= 10_000, "corpus of {} frames", corpus.len());
    let vm1 = Port::open(&s.vm1, &s.ids.tap_a());
    let vm3 = Port::open(&s.vm3, &s.ids.tap_b());
    std::thread::sleep(Duration::from_millis(300));
    while vm1.recv().is_some() || vm3.recv().is_some() {}

    let vm1_m = mac(&vm1_mac);
    let qr_b = mac(&s.mac_of(&dev_b));
    // First with the hook the router picks by itself at kernel defaults (tc on veths).
    assert!(s.hooks().iter().all(|(_, h)| h == "tc"), "{:?}", s.hooks());
    let model = parity_model(qr_a, qr_b, vm1_m, mac(&vm3_mac), Hook::Tc);
    let (tc, tc_forwarded) = fast_pass(&s, &corpus, &vm1, &vm3, qr_a, vm1_m, &model, "tc");
    // Then with XDP forced on both ports, everything at kernel defaults.
    let text = s.ids.config_dual("");
    let text = [s.ids.port_a.clone(), s.ids.port_b.clone()]
        .iter()
        .fold(text, |t, p| {
            t.replace(
                &format!("port_id = \"{p}\"\n"),
                &format!("port_id = \"{p}\"\nhook = \"xdp\"\n"),
            )
        });
    let path = tests::topo::write_config(&format!("{}-xdp", s.ids.tag), &text);
    let out = tests::ctl(&["apply", "-f", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // At kernel defaults neither veth peer can take XDP-redirected frames (no GRO, no XDP at
    // the instances' ends): the router gives neither device a redirect slot, so every frame
    // XDP routes goes to the kernel (`no_xdp_xmit`), which must then deliver exactly what it
    // delivers alone. (XDP's own rewrites are checked byte for byte in packet.rs.)
    for i in 0..2 {
        assert_eq!(
            ctl_json(&["show", &s.ids.router_id])[0]["interfaces"][i]["redirect"]["xdp"],
            false,
            "a veth at kernel defaults got an XDP redirect slot"
        );
    }
    assert!(s.hooks().iter().all(|(_, h)| h == "xdp"), "{:?}", s.hooks());
    let model = parity_model(qr_a, qr_b, vm1_m, mac(&vm3_mac), Hook::Xdp);
    let (xdp, xdp_forwarded) = fast_pass(&s, &corpus, &vm1, &vm3, qr_a, vm1_m, &model, "xdp");

    // The same corpus with only the kernel: the programs detached (their links unpinned); the
    // teardown has no fast path left to check.
    s.check_counters = false;
    for dev in [&dev_a, &dev_b] {
        let _ = std::fs::remove_file(router_ctl::state::link_pin(&s.ids.router_id, dev));
        let _ = std::fs::remove_file(router_ctl::state::tc_link_pin(&s.ids.router_id, dev));
    }
    assert!(
        s.hooks().iter().all(|(_, h)| h == "none"),
        "{:?}",
        s.hooks()
    );
    std::thread::sleep(Duration::from_millis(100));
    while vm1.recv().is_some() || vm3.recv().is_some() {}
    let (kernel, _) = run_corpus(&corpus, &vm1, &vm3, qr_a, vm1_m, None);

    for (hook, fast, forwarded_corpus) in [("tc", &tc, tc_forwarded), ("xdp", &xdp, xdp_forwarded)]
    {
        compare(&corpus, hook, fast, &kernel, forwarded_corpus);
    }
}

/// Asserts that the fast path with `hook` delivered what the kernel delivered, frame by frame.
fn compare(
    corpus: &[(&'static str, Vec<u8>)],
    hook: &str,
    fast: &[Effect],
    kernel: &[Effect],
    forwarded_corpus: u64,
) {
    let mut diffs = Vec::new();
    for (i, ((what, f), (a, b))) in corpus
        .iter()
        .zip(fast.iter().zip(kernel.iter()))
        .enumerate()
    {
        if a != b {
            diffs.push(format!(
                "#{i} {what}: {f:02x?}\n  fast path ({hook}): {a:02x?}\n  kernel:    {b:02x?}"
            ));
        }
    }
    let delivered = kernel.iter().filter(|e| !e.at_vm3.is_empty()).count();
    let answered = kernel.iter().filter(|e| !e.at_vm1.is_empty()).count();
    eprintln!(
        "parity ({hook}): {} frames; kernel delivered {delivered} to vm3 and answered {answered} to vm1; the fast path forwarded {forwarded_corpus} itself; {} differences",
        corpus.len(),
        diffs.len()
    );
    assert!(
        diffs.is_empty(),
        "{hook}: {} of {} frames differ; the first ones:\n{}",
        diffs.len(),
        corpus.len(),
        diffs.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    // The corpus exercised both paths (the fast path's own forwarding where it can redirect:
    // not with XDP into veths at kernel defaults).
    assert!(delivered > 2000 && answered > 200);
    assert!(
        hook == "xdp" || forwarded_corpus > 2000,
        "{hook}: {forwarded_corpus} forwarded"
    );
}

/// Sends the corpus through the router with the fast path in `hook` (already attached) and
/// checks its counters: every packet the kernel saw arrive on qr-a was counted once, and each
/// frame went the way the model says (forwarded, or passed under the model's reason). Returns
/// the effects and how many corpus frames the fast path forwarded.
#[allow(clippy::too_many_arguments)]
fn fast_pass(
    s: &Seed,
    corpus: &[(&'static str, Vec<u8>)],
    vm1: &Port,
    vm3: &Port,
    qr_a: [u8; 6],
    vm1_mac: [u8; 6],
    model: &Model,
    hook: &str,
) -> (Vec<Effect>, u64) {
    let (ns, dev_a) = (s.ns(), s.ids.dev_a());
    // What the kernel saw arrive on qr-a for this hook: frames XDP ran on, or packets received.
    let seen = || -> u64 {
        if hook == "xdp" {
            veth_xdp_count(&ns, &dev_a, "_xdp_packets").unwrap()
        } else {
            let v: serde_json::Value =
                serde_json::from_str(&sh(&format!("ip -n {ns} -j -s link show dev {dev_a}")))
                    .unwrap();
            v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
        }
    };
    let redirects = || veth_xdp_count(&ns, &dev_a, "_xdp_redirect").unwrap();
    let st0 = RouterState::load(&s.ids.router_id).unwrap().unwrap();
    let counters = Counters {
        map: datapath::open_pinned(&s.ids.router_id, map_names::STATS).unwrap(),
        slot: st0.interfaces[0].slot,
    };
    while vm1.recv().is_some() || vm3.recv().is_some() {}
    let total = |s: &Stats| s.fwd_packets + s.pass_packets() + s.drop_packets;
    let (c0, seen0, redirects0) = (counters.read(), seen(), redirects());
    let (fast, moved) = run_corpus(corpus, vm1, vm3, qr_a, vm1_mac, Some(&counters));
    let (c1, seen1, redirects1) = (counters.read(), seen(), redirects());
    let sent = fast.iter().filter(|e| e.sent.is_ok()).count() as u64 + 2 * corpus.len() as u64;
    assert_eq!(
        seen1 - seen0,
        sent,
        "{hook}: qr-a saw other packets than the ones sent"
    );
    assert_eq!(
        total(&c1) - total(&c0),
        sent,
        "{hook}: packets seen on qr-a ≠ forwarded + passed + dropped"
    );
    let forwarded = c1
        .fwd_packets
        .checked_sub(c0.fwd_packets)
        .expect("the forwarded counter went back");
    if hook == "xdp" {
        assert_eq!(
            forwarded,
            redirects1 - redirects0,
            "forwarded ≠ the kernel's XDP redirect count"
        );
    }
    // Frame by frame, the fast path did what the model says: forwarded what it must forward,
    // and passed the rest under the model's reason (each frame's window also holds its two
    // markers: the echo to the gateway is local_dest, the datagram to vm3 is forwarded).
    let markers_forwarded = hook != "xdp";
    let mut must_forward = 0u64;
    let mut trim_refused = 0u64;
    let mut wrong = Vec::new();
    for (i, ((what, f), (e, d))) in corpus.iter().zip(fast.iter().zip(&moved)).enumerate() {
        let mut want = Stats::ZERO;
        // XDP at kernel defaults has no device to redirect into: the marker to vm3 too goes to
        // the kernel.
        if markers_forwarded {
            want.fwd_packets = 1;
        } else {
            want.pass[why::NO_XDP_XMIT] = 1;
        }
        want.pass[why::LOCAL_DEST] = 1;
        if e.sent.is_ok() {
            match model.verdict(0, f) {
                Verdict::Forward { .. } => {
                    // An AF_PACKET sender has the kernel probe the transport header: in a padded
                    // frame whose padding parses as a header, that offset lies past the IP
                    // packet, and the kernel will not trim the skb below it
                    // (bpf_skb_change_tail). The tc program then leaves the frame to the kernel
                    // (malformed), which forwards it: accepted for padded frames only.
                    let mut refused = want;
                    refused.pass[why::MALFORMED] += 1;
                    if hook == "tc" && padded(f) && *d == refused {
                        trim_refused += 1;
                        continue;
                    }
                    must_forward += 1;
                    want.fwd_packets += 1;
                    want.fwd6_packets += (f[12..14] == [0x86, 0xdd]) as u64;
                }
                // Every device is up here: a missing redirect slot is XDP's missing NDO_XMIT.
                Verdict::Pass(r) if hook == "xdp" && r == why::NO_TX_PORT => {
                    want.pass[why::NO_XDP_XMIT] += 1
                }
                Verdict::Pass(r) => want.pass[r] += 1,
            }
        }
        if *d != want {
            let name = |s: &Stats| {
                let mut v = vec![format!(
                    "forwarded {} (IPv6 {})",
                    s.fwd_packets, s.fwd6_packets
                )];
                v.extend(
                    (0..why::COUNT)
                        .filter(|r| s.pass[*r] > 0)
                        .map(|r| format!("{} {}", why::NAMES[r], s.pass[r])),
                );
                v.join(", ")
            };
            wrong.push(format!(
                "#{i} {what}: the fast path ({hook}): {}; the model: {}\n  {f:02x?}",
                name(d),
                name(&want)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{hook}: {} of {} frames went otherwise than the model says; the first ones:\n{}",
        wrong.len(),
        corpus.len(),
        wrong.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    let markers = if markers_forwarded { corpus.len() } else { 0 };
    let forwarded_corpus = forwarded
        .checked_sub(markers as u64)
        .expect("fewer frames forwarded than markers sent");
    assert_eq!(forwarded_corpus, must_forward, "{hook}");
    assert!(
        trim_refused <= 10,
        "{hook}: {trim_refused} padded frames the kernel would not trim"
    );
    if trim_refused > 0 {
        eprintln!(
            "parity ({hook}): {trim_refused} padded frames left to the kernel (trim refused)"
        );
    }
    (fast, forwarded_corpus)
}

/// The frame carries bytes past its IP packet (Ethernet padding).
fn padded(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([8, 0]) if f.len() >= 18 => f.len() > 14 + u16::from_be_bytes([f[16], f[17]]) as usize,
        Some([0x86, 0xdd]) if f.len() >= 20 => {
            f.len() > 54 + u16::from_be_bytes([f[18], f[19]]) as usize
        }
        _ => false,
    }
}

/// The dual-stack seed router of this test as the reference model sees it: qr-a (vm1's side,
/// MTU 1500) and qr-b (vm3's side, MTU 1400), their subnets, the router's own addresses, and
/// vm1 and vm3 as its only neighbours. With XDP forced on these veths, neither device can take
/// XDP-redirected frames (the instances' ends have neither GRO nor XDP) and TCP/UDP checksums
/// are verified.
fn parity_model(qr_a: [u8; 6], qr_b: [u8; 6], vm1: [u8; 6], vm3: [u8; 6], hook: Hook) -> Model {
    let xdp = hook == Hook::Xdp;
    let dev = |mac, mtu, redirect| model::Dev {
        mac,
        mtu,
        redirect,
        verify_l4: xdp,
    };
    let mut m = Model {
        devs: vec![dev(qr_a, 1500, !xdp), dev(qr_b, 1400, !xdp)],
        own4: vec![GW_A4, tests::corpus::GW_B4, [127, 0, 0, 1]],
        ..Model::default()
    };
    m.route("172.16.100.0/24", Via::Connected(0))
        .route("172.16.101.0/24", Via::Connected(1))
        .route("2001:db8:100::/64", Via::Connected(0))
        .route("2001:db8:101::/64", Via::Connected(1));
    // Every address of the namespace (link-local ones aside), the IPv4 subnet broadcasts and
    // the IPv6 subnet-router anycast addresses.
    for local in [
        "172.16.100.1/32",
        "172.16.101.1/32",
        "172.16.100.255/32",
        "172.16.101.255/32",
        "127.0.0.1/32",
        "2001:db8:100::1/128",
        "2001:db8:101::1/128",
        "2001:db8:100::/128",
        "2001:db8:101::/128",
        "::1/128",
    ] {
        m.route(local, Via::Local);
    }
    m.neigh(0, "172.16.100.3", vm1)
        .neigh(0, "2001:db8:100::3", vm1)
        .neigh(1, "172.16.101.3", vm3)
        .neigh(1, "2001:db8:101::3", vm3);
    m
}

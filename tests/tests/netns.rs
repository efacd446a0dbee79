//! Integration tests on the seed topology in network namespaces, with real traffic, through the
//! router-ctl binary as a user runs it.

use tests::{
    ctl, ctl_json, require_root, sh, sh_out,
    topo::{capture, tcp_transfer, unique_tag, write_config, Ids, Recorder, Seed},
};

/// The fast path at the hook auto picks for veths (tc): ping and TCP cross with the kernel's
/// forwarding off. (XDP, tuned: `forced_xdp_on_veths_is_never_worse_than_the_kernel`.)
#[test]
fn tc_forwards_ping_and_tcp_with_kernel_forwarding_off() {
    require_root();
    let s = Seed::up("");
    assert!(s.hooks().iter().all(|(_, h)| h == "tc"), "{:?}", s.hooks());
    s.prime_neighbours();
    s.set_forwarding(false);
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3", 5),
        "vm1 → vm3 ping failed with kernel forwarding off"
    );
    assert!(
        Seed::ping(&s.vm3, "172.16.100.3", 5),
        "vm3 → vm1 ping failed with kernel forwarding off"
    );
    // Requests one way and replies the other: ten packets through each device, every one in
    // the fast path.
    s.assert_fast_path(&before, &[(&a, 10, 0), (&b, 10, 0)]);
    let before = s.fast_path();
    let (n, same) = tcp_transfer(&s.vm1, &s.vm3, "172.16.101.3", 10 << 20);
    assert_eq!(n, 10 << 20, "TCP transfer incomplete");
    assert!(same, "TCP transfer corrupted");
    s.assert_fast_path_carried(&before, &[(&a, 10 << 20), (&b, 1)]);
}

#[test]
fn forwarded_frame_has_ttl_minus_one_and_egress_source_mac() {
    require_root();
    let s = Seed::up("");
    s.prime_neighbours();
    let qr_b = s.mac_of(&s.ids.dev_b());
    let vm3_mac = tests::topo::link_mac(&s.vm3, &s.ids.tap_b());
    let before = s.fast_path();
    // An echo request from vm1 to vm3, ICMP (1), with the pattern we send below.
    let cap = capture(&s.vm3, &s.ids.tap_b(), |f| {
        f.len() > 42
            && f[12..14] == [8, 0]
            && f[23] == 1
            && f[26..30] == [172, 16, 100, 3]
            && f[30..34] == [172, 16, 101, 3]
            && f[34] == 8
    });
    assert!(Seed::ping(&s.vm1, "172.16.101.3 -t 57 -p c0ffee", 1));
    let f = cap.join().unwrap().expect("no echo request reached vm3");
    assert_eq!(f[22], 56, "TTL must be sent − 1");
    let mac = |b: &[u8]| router_ctl::config::fmt_mac(b.try_into().unwrap());
    assert_eq!(
        mac(&f[6..12]),
        qr_b,
        "source MAC must be the egress qr- device's"
    );
    assert_eq!(mac(&f[0..6]), vm3_mac, "destination MAC must be vm3's");
    assert_eq!(
        tests::frame::checksum(&f[14..34]),
        0,
        "IPv4 header checksum"
    );
    // The kernel forwards too in this test: the frame must have been the fast path's.
    s.assert_fast_path(&before, &[(&s.ids.dev_a(), 1, 0), (&s.ids.dev_b(), 1, 0)]);
}

#[test]
fn ttl_1_gets_time_exceeded_from_the_gateway() {
    require_root();
    let s = Seed::up("");
    s.prime_neighbours();
    let before = s.passed(&s.ids.dev_a(), "ttl_exceeded");
    let out = Seed::exec(&s.vm1, "ping -c 1 -t 1 -W 2 172.16.101.3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("From 172.16.100.1") && text.to_lowercase().contains("time to live exceeded"),
        "ping said: {text}"
    );
    assert_eq!(s.passed(&s.ids.dev_a(), "ttl_exceeded"), before + 1);
}

/// As `tc_forwards_ping_and_tcp_with_kernel_forwarding_off`, over IPv6 (tc, auto on veths).
#[test]
fn tc_forwards_ipv6_ping_and_tcp_with_kernel_forwarding_off() {
    require_root();
    let s = Seed::up_dual("");
    assert!(s.hooks().iter().all(|(_, h)| h == "tc"), "{:?}", s.hooks());
    s.prime_neighbours6();
    s.set_forwarding6(false);
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "2001:db8:101::3", 5),
        "vm1 → vm3 ping -6 failed with kernel IPv6 forwarding off"
    );
    assert!(
        Seed::ping(&s.vm3, "2001:db8:100::3", 5),
        "vm3 → vm1 ping -6 failed with kernel IPv6 forwarding off"
    );
    s.assert_fast_path(&before, &[(&a, 0, 10), (&b, 0, 10)]);
    let before = s.fast_path();
    let (n, same) = tcp_transfer(&s.vm1, &s.vm3, "2001:db8:101::3", 10 << 20);
    assert_eq!(n, 10 << 20, "TCP transfer over IPv6 incomplete");
    assert!(same, "TCP transfer over IPv6 corrupted");
    s.assert_fast_path_carried(&before, &[(&a, 10 << 20), (&b, 1)]);
    // Hop limit 1, with the kernel forwarding again: ICMPv6 time exceeded from the gateway.
    s.set_forwarding6(true);
    let before = s.passed(&a, "ttl_exceeded");
    let out = Seed::exec(&s.vm1, "ping -c 1 -t 1 -W 2 2001:db8:101::3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("From 2001:db8:100::1") && text.to_lowercase().contains("time exceeded"),
        "ping said: {text}"
    );
    assert_eq!(s.passed(&a, "ttl_exceeded"), before + 1);
    // The CLI shows both families.
    let show = ctl_json(&["show", &s.ids.router_id]);
    let fixed = &show[0]["interfaces"][0]["fixed_ips"];
    assert_eq!(fixed.as_array().map(Vec::len), Some(2), "{show}");
    assert_eq!(fixed[1]["ip_address"], "2001:db8:100::1", "{show}");
    let text = String::from_utf8_lossy(&ctl(&["show", &s.ids.router_id]).stdout).into_owned();
    assert!(
        text.contains("172.16.100.1/24,2001:db8:100::1/64"),
        "{text}"
    );
}

#[test]
fn dual_stack_ports_forward_both_families_at_once() {
    require_root();
    let s = Seed::up_dual("");
    s.prime_neighbours();
    s.prime_neighbours6();
    s.set_forwarding(false);
    s.set_forwarding6(false);
    let (dev_a, dev_b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    // An IPv6 echo request from vm1 to vm3, as it arrives at vm3.
    let cap = capture(&s.vm3, &s.ids.tap_b(), |f| {
        f.len() > 62 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 128
    });
    let (vm1, vm3) = (s.vm1.clone(), s.vm3.clone());
    let pings: Vec<_> = [
        (vm1.clone(), "172.16.101.3"),
        (vm1, "2001:db8:101::3 -t 61"),
        (vm3.clone(), "172.16.100.3"),
        (vm3, "2001:db8:100::3"),
    ]
    .into_iter()
    .map(|(ns, dst)| std::thread::spawn(move || Seed::ping(&ns, dst, 10)))
    .collect();
    for p in pings {
        assert!(
            p.join().unwrap(),
            "a ping failed with both families at once"
        );
    }
    let f = cap
        .join()
        .unwrap()
        .expect("no IPv6 echo request reached vm3");
    assert_eq!(f[21], 60, "hop limit must be sent − 1");
    let src_mac: [u8; 6] = f[6..12].try_into().unwrap();
    assert_eq!(
        router_ctl::config::fmt_mac(&src_mac),
        s.mac_of(&dev_b),
        "source MAC = qr- device's"
    );
    // Through each device: ten requests and ten replies per family, each counted in its family.
    s.assert_fast_path(&before, &[(&dev_a, 20, 20), (&dev_b, 20, 20)]);
    let neigh = ctl_json(&["neigh", &s.ids.router_id]);
    for ip in ["172.16.101.3", "2001:db8:101::3"] {
        assert!(
            neigh.as_array().unwrap().iter().any(|n| n["dst"] == ip),
            "{ip} missing from {neigh}"
        );
    }
}

#[test]
fn ipv6_extra_route_and_packet_too_big() {
    require_root();
    let s = Seed::up_dual(
        "[[router.route]]\ndestination = \"2001:db8:aaaa::/48\"\nnexthop = \"2001:db8:101::3\"\n",
    );
    sh(&format!(
        "ip -n {} addr add 2001:db8:aaaa::1/128 dev lo",
        s.vm3
    ));
    s.prime_neighbours6();
    s.set_forwarding6(false);
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "2001:db8:aaaa::1", 5),
        "vm1 → 2001:db8:aaaa::1 through the nexthop vm3 failed with kernel forwarding off"
    );
    s.assert_fast_path(&before, &[(&s.ids.dev_a(), 0, 5), (&s.ids.dev_b(), 0, 5)]);
    // A smaller egress MTU: the fast path hands large packets to the kernel, which answers
    // Packet Too Big (routers do not fragment IPv6).
    s.set_forwarding6(true);
    sh(&format!(
        "ip -n {} link set {} mtu 1400",
        s.ns(),
        s.ids.dev_b()
    ));
    let dev_a = s.ids.dev_a();
    wait_for("the new MTU in the fast path", &|| {
        let before = s.passed(&dev_a, "too_big");
        let _ = Seed::exec(&s.vm1, "ping -c 1 -W 1 -s 1400 -M do 2001:db8:101::3");
        s.passed(&dev_a, "too_big") > before
    });
    let out = Seed::exec(&s.vm1, "ping -c 2 -i 0.3 -W 1 -s 1400 -M do 2001:db8:101::3; ping -c 2 -i 0.3 -W 1 -s 1400 -M do 2001:db8:101::3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase();
    // The kernel's Packet Too Big reached vm1: either ping reports it, or vm1 has learnt the
    // path MTU and refuses to send the packet at all.
    assert!(
        ["mtu = 1400", "mtu=1400", "mtu: 1400", "packet too big"]
            .iter()
            .any(|m| text.contains(m)),
        "ping said: {text}"
    );
    assert!(
        Seed::ping(&s.vm1, "2001:db8:101::3 -s 1300", 2),
        "smaller packets still pass"
    );
}

/// vlan101 as linuxbridge builds it: the router port's peer, vm3 and further instances
/// (namespace, address; each also holds 10.10.0.1) on a bridge in a namespace of its own.
fn bridge_vlan101(s: &mut Seed, instances: &[(&str, &str)]) {
    let br = format!("br-{}", s.ids.tag);
    s.extra_ns.push(br.clone());
    sh(&format!(
        "ip netns add {br} && ip netns add {vm3} && ip -n {vm3} link set lo up",
        vm3 = s.vm3
    ));
    sh(&format!(
        "ip link set {tap} netns {br} && ip -n {br} link add br0 type bridge && ip -n {br} link set br0 up && ip -n {br} link set {tap} master br0 up",
        tap = s.ids.tap_b()
    ));
    let vm3 = s.vm3.clone();
    for (ns, addr) in
        std::iter::once((vm3.as_str(), "172.16.101.3/24")).chain(instances.iter().copied())
    {
        if ns != vm3 {
            s.extra_ns.push(ns.to_string());
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up && ip -n {ns} addr add 10.10.0.1/32 dev lo"));
        }
        sh(&format!(
            "ip -n {br} link add p-{ns} type veth peer name eth0 netns {ns} && ip -n {br} link set p-{ns} master br0 up && \
             ip -n {ns} link set eth0 up && ip -n {ns} addr add {addr} dev eth0 && ip -n {ns} route add default via 172.16.101.1"
        ));
    }
}

#[test]
fn extra_route_through_a_nexthop_instance() {
    require_root();
    let mut s = Seed::applied(
        "[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n",
    );
    s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
    let nh = format!("nh-{}", s.ids.tag);
    bridge_vlan101(&mut s, &[(&nh, "172.16.101.254/24")]);
    assert!(Seed::ping(&s.vm1, "172.16.100.1", 1));
    assert!(Seed::ping(&nh, "172.16.101.1", 1));
    s.wait_neigh("172.16.100.3");
    s.wait_neigh("172.16.101.254");
    s.set_forwarding(false);
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "10.10.0.1", 3),
        "vm1 → 10.10.0.1 through nexthop 172.16.101.254 failed"
    );
    s.assert_fast_path(&before, &[(&s.ids.dev_a(), 3, 0), (&s.ids.dev_b(), 3, 0)]);
    // The kernel has the route too, for the slow path.
    let routes = sh(&format!("ip -n {} route show 10.10.0.0/16", s.ns()));
    assert!(
        routes.contains("via 172.16.101.254"),
        "kernel route missing: {routes}"
    );
}

#[test]
fn two_routers_side_by_side_do_not_see_each_others_traffic() {
    require_root();
    let a = Seed::up("");
    let b = Seed::up("");
    a.prime_neighbours();
    b.prime_neighbours();
    let fwd = |s: &Seed| s.forwarded(&s.ids.dev_a()) + s.forwarded(&s.ids.dev_b());
    let (a0, b0) = (fwd(&a), fwd(&b));
    assert!(Seed::ping(&a.vm1, "172.16.101.3", 5));
    let (a1, b1) = (fwd(&a), fwd(&b));
    assert!(a1 >= a0 + 10, "router A forwarded {} packets", a1 - a0);
    assert_eq!(b1, b0, "router B counted router A's traffic");
    assert!(Seed::ping(&b.vm3, "172.16.100.3", 5));
    assert_eq!(fwd(&a), a1, "router A counted router B's traffic");
    assert!(fwd(&b) >= b1 + 10);
    // Same addresses, different instances: each router knows only its own.
    let macs = |s: &Seed| {
        ctl_json(&["neigh", &s.ids.router_id])
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["lladdr"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (ma, mb) = (macs(&a), macs(&b));
    assert!(
        ma.iter().all(|m| !mb.contains(m)),
        "neighbour maps are shared: {ma:?} / {mb:?}"
    );
}

#[test]
fn apply_is_idempotent_and_destroy_removes_what_it_created() {
    require_root();
    // apply creates the devices here (the instances are plugged into the peers it leaves).
    let mut s = Seed::applied("");
    s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
    s.plug(&s.vm3, &s.ids.tap_b(), "172.16.101.3/24", "172.16.101.1");
    s.wait_settled();
    let show = ctl_json(&["show", &s.ids.router_id]);
    let path = write_config(&format!("{}-again", s.ids.tag), &s.ids.config(""));
    let out = ctl(&["apply", "-f", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ctl_json(&["show", &s.ids.router_id]),
        show,
        "a second apply changed the router"
    );
    s.prime_neighbours();
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3", 2),
        "forwarding after a re-apply"
    );
    s.destroyed();
    let out = ctl(&["destroy", &s.ids.name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !std::path::Path::new(&format!("/run/netns/{}", s.ns())).exists(),
        "namespace left behind"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/router-xdp/v1/{}", s.ids.router_id)).exists(),
        "pins left behind"
    );
    assert!(
        !sh_out(&format!("ip -n {} link show {}", s.vm1, s.ids.tap_a()))
            .status
            .success(),
        "veth peer left behind"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn adopts_existing_namespace_and_devices_and_leaves_them_on_destroy() {
    require_root();
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    let ns = ids.ns();
    let (vm1, vm3) = (format!("vm1-{tag}"), format!("vm3-{tag}"));
    // What Neutron's agents would have made: the namespace, the plugged qr- devices, one address.
    sh(&format!(
        "ip netns add {ns} && ip netns add {vm1} && ip netns add {vm3}"
    ));
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = sh_out(&format!("ip netns del {n}"));
            }
        }
    }
    let _c = Cleanup(vec![ns.clone(), vm1.clone(), vm3.clone()]);
    for (dev, vm, addr, gw) in [
        (ids.dev_a(), &vm1, "172.16.100.3/24", "172.16.100.1"),
        (ids.dev_b(), &vm3, "172.16.101.3/24", "172.16.101.1"),
    ] {
        sh(&format!(
            "ip -n {ns} link add {dev} type veth peer name eth0 netns {vm} && ip -n {vm} link set eth0 up && ip -n {vm} link set lo up && \
             ip -n {vm} addr add {addr} dev eth0 && ip -n {vm} route add default via {gw}"
        ));
    }
    sh(&format!(
        "ip -n {ns} addr add 172.16.100.1/24 dev {}",
        ids.dev_a()
    ));
    let path = write_config(&tag, &ids.config(""));
    let out = ctl(&["apply", "-f", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("created namespace") && !text.contains("created device"),
        "apply created what existed: {text}"
    );
    assert!(
        text.contains(&format!(
            "created address 172.16.101.1/24 on {}",
            ids.dev_b()
        )),
        "{text}"
    );
    assert!(Seed::ping(&vm1, "172.16.100.1", 1) && Seed::ping(&vm3, "172.16.101.1", 1));
    assert!(Seed::ping(&vm1, "172.16.101.3", 3));
    // The kernel's own list of bpf_links: the program attached to qr-a, and its link.
    let prog = ctl_json(&["show", &ids.router_id])[0]["interfaces"][0]["prog_id"]
        .as_u64()
        .expect("qr-a has a program attached");
    let attached = || {
        let links: serde_json::Value = serde_json::from_str(&sh("bpftool -j link show")).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["prog_id"].as_u64() == Some(prog))
    };
    assert!(
        attached(),
        "no bpf_link holds the fast path's program {prog}"
    );
    let out = ctl(&["destroy", &ids.router_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!attached(), "the fast path is still attached after destroy");
    let addrs = sh(&format!("ip -n {ns} -4 addr show"));
    assert!(
        addrs.contains("172.16.100.1/24"),
        "destroy removed an address it did not add"
    );
    assert!(
        !addrs.contains("172.16.101.1/24"),
        "destroy left the address it added"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn bad_configs_are_refused_with_nothing_changed() {
    require_root();
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    let good = ids
        .config("[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad TOML",
            good.replace("[[router.route]]", "[[router.route"),
            "TOML parse error",
        ),
        (
            "unknown key",
            good.replace("name = ", "colour = \"red\"\nname = "),
            "unknown field `colour`",
        ),
        (
            "gateway outside subnet",
            good.replace(
                "gateway_ip = \"172.16.101.1\"",
                "gateway_ip = \"172.16.1.1\"",
            ),
            "gateway_ip' = 172.16.1.1 is outside subnet 172.16.101.0/24",
        ),
        (
            "overlapping subnets",
            good.replace("172.16.101.0/24", "172.16.100.0/23"),
            "overlaps subnet 172.16.100.0/24",
        ),
        (
            "duplicate port id",
            good.replace(&ids.port_b, &ids.port_a),
            "duplicate port_id",
        ),
        (
            "duplicate device name",
            good.replace(&ids.port_b, &format!("{}ffff-ffff", &ids.port_a[..11])),
            "already used by port",
        ),
        (
            "nexthop off-link",
            good.replace("172.16.101.254", "192.168.7.1"),
            "'nexthop' = 192.168.7.1 is not on a connected IPv4 subnet",
        ),
        (
            "missing field",
            good.replacen("subnet = \"172.16.100.0/24\"\n", "", 1),
            "missing field `subnet`",
        ),
        (
            "bad prefix",
            good.replace("10.10.0.0/16", "10.10.0.0/40"),
            "'destination'",
        ),
        (
            "bad router id",
            good.replace(&ids.router_id, "a b"),
            "field 'id'",
        ),
    ];
    let tap_count = || {
        sh("ip -o link show")
            .lines()
            .filter(|l| l.contains(&format!("tap{tag}")))
            .count()
    };
    for (what, text, want) in cases {
        assert_ne!(text, good, "{what}: the case did not change the file");
        let path = write_config(&format!("{tag}-bad"), &text);
        let out = ctl(&["apply", "-f", &path]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(want), "{what}: message {err:?} lacks {want:?}");
        assert!(
            !std::path::Path::new(&format!("/run/netns/{}", ids.ns())).exists(),
            "{what}: namespace created"
        );
        assert!(
            !ctl_json(&["show"]).to_string().contains(&ids.router_id),
            "{what}: router recorded"
        );
        assert_eq!(tap_count(), 0, "{what}: devices created");
        let _ = std::fs::remove_file(&path);
    }
    // A missing file is an error too, naming the file.
    let out = ctl(&["apply", "-f", "/nonexistent/router.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/router.toml"));
}

#[test]
fn a_changed_neighbour_mac_is_followed() {
    require_root();
    let s = Seed::up("");
    s.prime_neighbours();
    let old = s.wait_neigh("172.16.101.3");
    let new = "02:aa:bb:cc:dd:03";
    assert_ne!(old, new);
    // The instance changes its MAC; the router's kernel learns it (here told directly, as an
    // ARP update would), and the daemon must carry it into the fast path.
    sh(&format!(
        "ip -n {} link set {} address {new}",
        s.vm3,
        s.ids.tap_b()
    ));
    sh(&format!(
        "ip -n {} neigh replace 172.16.101.3 lladdr {new} dev {} nud reachable",
        s.ns(),
        s.ids.dev_b()
    ));
    let t0 = std::time::Instant::now();
    while s.wait_neigh("172.16.101.3") != new {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "new MAC not in the fast path within a second"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    s.set_forwarding(false);
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3", 3),
        "vm3 unreachable after its MAC changed"
    );
    s.assert_fast_path(&before, &[(&s.ids.dev_a(), 3, 0), (&s.ids.dev_b(), 3, 0)]);
    // A neighbour the kernel deletes leaves the fast path.
    sh(&format!(
        "ip -n {} neigh del 172.16.101.3 dev {}",
        s.ns(),
        s.ids.dev_b()
    ));
    let t0 = std::time::Instant::now();
    loop {
        let v = ctl_json(&["neigh", &s.ids.router_id]);
        if !v
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "172.16.101.3")
        {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "deleted neighbour still in the fast path"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs `ping` at 1 000 packets per second for `count` packets from `ns` to `dst`, calling
/// `during` once `started` says traffic flows; returns (transmitted, received).
fn steady_ping(
    ns: &str,
    dst: &str,
    count: u32,
    started: &dyn Fn() -> bool,
    during: impl FnOnce(),
) -> (u32, u32) {
    let cmd = format!("ip netns exec {ns} ping -q -i 0.001 -W 2 -c {count} {dst}");
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the steady ping never got going", started);
    during();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, got) = tests::topo::ping_summary(&text);
    assert!(sent > 0, "ping said: {text}");
    (sent, got)
}

/// Echo requests counted per destination by the `inet c` nftables table of instance namespace
/// `ns` (see `count_echo_requests`).
fn echo_counter(ns: &str) -> std::collections::BTreeMap<String, u64> {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&format!("ip netns exec {ns} nft -j list table inet c"))).unwrap();
    let mut m = std::collections::BTreeMap::new();
    for rule in v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
    {
        let expr = rule["expr"].as_array().unwrap();
        let dst = expr
            .iter()
            .find_map(|e| {
                e.get("match")
                    .filter(|m| m["left"]["payload"]["field"] == "daddr")
            })
            .and_then(|m| m["right"].as_str())
            .expect("daddr match")
            .to_string();
        let n = expr
            .iter()
            .find_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
            .expect("counter");
        m.insert(dst, n);
    }
    m
}

/// Counts the echo requests instance namespace `ns` receives for each destination in `dsts`.
fn count_echo_requests(ns: &str, dsts: &[String]) {
    let rules: String = dsts
        .iter()
        .map(|d| format!("add rule inet c in ip daddr {d} icmp type echo-request counter\n"))
        .collect();
    let script = format!(
        "add table inet c\nadd chain inet c in {{ type filter hook input priority 0; }}\n{rules}"
    );
    let path = std::env::temp_dir().join(format!("router-test-{ns}.nft"));
    std::fs::write(&path, script).unwrap();
    sh(&format!("ip netns exec {ns} nft -f {}", path.display()));
    let _ = std::fs::remove_file(path);
}

/// Polls `f` until it holds, failing with `what` after five seconds.
fn wait_for(what: &str, f: &dyn Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Tests that replace the shared daemon take turns.
static DAEMON: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Kills every `router-ctl run` (asserting that each died) and starts one with `args`, as
/// systemd would restart it; its log goes to a file named after `tag`, returned.
fn restart_daemon(tag: &str, args: &[&str]) -> std::path::PathBuf {
    let log = std::env::temp_dir().join(format!("router-test-{tag}-daemon.log"));
    tests::topo::restart_daemon(args, &log);
    log
}

#[test]
fn a_killed_and_restarted_daemon_loses_no_packet() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let s = Seed::up("");
    s.prime_neighbours();
    // Only the fast path can carry the packets: a restart that lost the maps loses packets.
    s.set_forwarding(false);
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    let fwd0 = before.get(&a).ipv4;
    let (sent, got) = steady_ping(
        &s.vm1,
        "172.16.101.3",
        2000,
        &|| s.forwarded(&a) >= fwd0 + 100,
        || {
            restart_daemon(&s.ids.tag, &[]);
        },
    );
    assert_eq!(
        (sent, got),
        (2000, 2000),
        "packets lost across a daemon kill -9 and restart"
    );
    s.assert_fast_path(&before, &[(&a, 2000, 0), (&b, 2000, 0)]);
    // The restarted daemon adopted the router: a new neighbour still reaches the fast path.
    sh(&format!(
        "ip -n {} neigh replace 172.16.101.77 lladdr 02:00:00:00:00:77 dev {} nud reachable",
        s.ns(),
        s.ids.dev_b()
    ));
    s.wait_neigh("172.16.101.77");
}

/// apply signals whichever daemon the pid file names (SIGUSR1: rescan): a daemon that has
/// named itself there must already take the signal, or a second apply racing the first one's
/// freshly started daemon ends it silently (seen in CI: two routers' neighbours never synced).
#[test]
fn a_daemon_signalled_as_soon_as_it_names_itself_keeps_running() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let s = Seed::up("");
    for pid in tests::topo::daemon_pids() {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    wait_for("the old daemons gone", &|| {
        tests::topo::daemon_pids().is_empty()
    });
    let log = std::env::temp_dir().join(format!("router-test-{}-daemon.log", s.ids.tag));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(tests::router_ctl())
        .args(["run", "--auto"])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let pid = child.id();
    // As apply does: the moment the pid file names it, SIGUSR1.
    let t0 = std::time::Instant::now();
    loop {
        let owner = std::fs::read_to_string("/run/router-xdp/daemon.pid").unwrap_or_default();
        if owner.split_whitespace().next() == Some(pid.to_string().as_str()) {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "the daemon never wrote its pid"
        );
    }
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let exited = child.try_wait().unwrap();
    std::thread::spawn(move || child.wait());
    assert!(
        exited.is_none(),
        "the daemon ended on the rescan signal ({exited:?}): {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // And it serves the router: a new neighbour reaches the fast path.
    sh(&format!(
        "ip -n {} neigh replace 172.16.101.78 lladdr 02:00:00:00:00:78 dev {} nud reachable",
        s.ns(),
        s.ids.dev_b()
    ));
    s.wait_neigh("172.16.101.78");
}

#[test]
fn re_applying_swaps_the_program_without_losing_a_packet() {
    require_root();
    let s = Seed::up("");
    s.prime_neighbours();
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let path = write_config(&format!("{}-up", s.ids.tag), &s.ids.config(""));
    let prog_id = || ctl_json(&["show", &s.ids.router_id])[0]["interfaces"][0]["prog_id"].clone();
    let before_prog = prog_id();
    // Apply sets ip_forward=1, so the kernel could carry what a detached program dropped: every
    // packet must be the fast path's, and the kernel must forward none.
    let before = s.fast_path();
    let forw = s.forw_datagrams();
    let fwd0 = before.get(&a).ipv4;
    let (sent, got) = steady_ping(
        &s.vm1,
        "172.16.101.3",
        2000,
        &|| s.forwarded(&a) >= fwd0 + 100,
        || {
            let out = ctl(&["apply", "--reload", "-f", &path]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );
    assert_eq!(
        (sent, got),
        (2000, 2000),
        "packets lost while the program was replaced"
    );
    s.assert_fast_path(&before, &[(&a, 2000, 0), (&b, 2000, 0)]);
    assert_eq!(s.forw_datagrams(), forw, "the kernel forwarded packets");
    assert_ne!(
        prog_id(),
        before_prog,
        "the program attached to the device was not replaced"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn changing_an_extra_routes_nexthop_loses_and_misroutes_nothing() {
    require_root();
    let route = |nh: &str| {
        format!("[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"{nh}\"\n")
    };
    let mut s = Seed::applied(&route("172.16.101.254"));
    s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
    let (nh1, nh2) = (format!("nh1-{}", s.ids.tag), format!("nh2-{}", s.ids.tag));
    bridge_vlan101(
        &mut s,
        &[(&nh1, "172.16.101.254/24"), (&nh2, "172.16.101.253/24")],
    );
    assert!(Seed::ping(&s.vm1, "172.16.100.1", 1));
    assert!(Seed::ping(&nh1, "172.16.101.1", 1) && Seed::ping(&nh2, "172.16.101.1", 1));
    s.wait_neigh("172.16.101.254");
    s.wait_neigh("172.16.101.253");
    let path = write_config(
        &format!("{}-nh2", s.ids.tag),
        &s.ids.config(&route("172.16.101.253")),
    );
    // Each nexthop records the sequence numbers of the echo requests it receives.
    let echo_seq = |f: &[u8]| -> Option<u16> {
        (f.len() >= 42
            && f[12..14] == [8, 0]
            && f[23] == 1
            && f[30..34] == [10, 10, 0, 1]
            && f[34] == 8)
            .then(|| u16::from_be_bytes([f[40], f[41]]))
    };
    let rec1 = Recorder::start(&nh1, "eth0", move |f| echo_seq(f).is_some());
    let rec2 = Recorder::start(&nh2, "eth0", move |f| echo_seq(f).is_some());
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    let forw = s.forw_datagrams();
    let fwd0 = before.get(&a).ipv4;
    let (sent, got) = steady_ping(
        &s.vm1,
        "10.10.0.1",
        2000,
        &|| s.forwarded(&a) >= fwd0 + 100,
        || {
            let out = ctl(&["apply", "-f", &path]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );
    let seqs = |r: Recorder| -> Vec<u16> { r.stop().iter().filter_map(|f| echo_seq(f)).collect() };
    let (at1, at2) = (seqs(rec1), seqs(rec2));
    assert_eq!(
        (sent, got),
        (2000, 2000),
        "echo requests or replies lost while the nexthop changed ({} at nh1, {} at nh2)",
        at1.len(),
        at2.len()
    );
    // Every request reached exactly one nexthop; each packet's nexthop changed once, from the
    // old to the new: all of nh1's sequence numbers come before all of nh2's.
    let mut all: Vec<u16> = at1.iter().chain(at2.iter()).copied().collect();
    all.sort();
    assert_eq!(
        all,
        (1..=2000).collect::<Vec<u16>>(),
        "requests lost or duplicated between the nexthops"
    );
    assert!(
        !at1.is_empty() && !at2.is_empty(),
        "the change did not happen under traffic: {} at nh1, {} at nh2",
        at1.len(),
        at2.len()
    );
    let (last1, first2) = (at1.iter().max().unwrap(), at2.iter().min().unwrap());
    assert!(
        last1 < first2,
        "traffic went back to the old nexthop: request {last1} reached nh1 after request {first2} reached nh2"
    );
    s.assert_fast_path(&before, &[(&a, 2000, 0), (&b, 2000, 0)]);
    assert_eq!(s.forw_datagrams(), forw, "the kernel forwarded packets");
    eprintln!("nexthop change under traffic: requests 1..={last1} at nh1, {first2}..=2000 at nh2");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn metrics_count_the_traffic_sent() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let s = Seed::up("");
    let addr = format!("127.0.0.1:{}", 20000 + std::process::id() % 20000);
    restart_daemon(&s.ids.tag, &["--metrics", &addr]);
    // Neighbours known to the restarted daemon's maps before counting.
    s.prime_neighbours();
    let scrape = || tests::http_get(&addr, "/metrics");
    let t0 = std::time::Instant::now();
    while scrape().is_none() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(3),
            "no metrics on {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Hostile clients: one that connects and says nothing, one that sends a request line
    // without end. Neither holds the endpoint: a scrape beside them is answered, and the
    // endless line gets 400 after at most a few KiB.
    {
        use std::io::{Read, Write};
        let _silent = std::net::TcpStream::connect(&addr).unwrap();
        let mut long = std::net::TcpStream::connect(&addr).unwrap();
        long.write_all(&[b'A'; 8 * 1024]).unwrap();
        long.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = long.read_to_string(&mut out);
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "an endless request line got: {out:.80}"
        );
        let t = std::time::Instant::now();
        let text = scrape().expect("a scrape beside a silent client");
        assert!(text.starts_with("HTTP/1.1 200"), "{text:.80}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "a silent client held the scrape {:?}",
            t.elapsed()
        );
    }
    // `label`: the reason of a passed_packets line, the family of a forwarded_packets one.
    let value = |text: &str, metric: &str, dev: &str, label: Option<&str>| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter(|l| {
                l.contains(&format!("router_id=\"{}\"", s.ids.router_id))
                    && l.contains(&format!("device=\"{dev}\""))
            })
            .find(|l| {
                label.is_none_or(|r| {
                    l.contains(&format!("reason=\"{r}\""))
                        || l.contains(&format!("family=\"{r}\""))
                        || l.contains(&format!("translated=\"{r}\""))
                })
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{metric} for {dev} missing:\n{text}"))
    };
    let before = scrape().unwrap();
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    let (a0, b0) = (
        value(
            &before,
            "router_xdp_forwarded_packets_total",
            &s.ids.dev_a(),
            Some("ipv4"),
        ),
        value(
            &before,
            "router_xdp_forwarded_packets_total",
            &s.ids.dev_b(),
            Some("ipv4"),
        ),
    );
    let ttl0 = value(
        &before,
        "router_xdp_passed_packets_total",
        &s.ids.dev_a(),
        Some("ttl_exceeded"),
    );
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let bytes0: Vec<u64> = [&a, &b]
        .iter()
        .map(|d| value(&before, "router_xdp_forwarded_bytes_total", d, Some("ipv4")))
        .collect();
    let passed_bytes0 = value(&before, "router_xdp_passed_bytes_total", &a, None);
    assert!(Seed::ping(&s.vm1, "172.16.101.3", 20));
    let _ = Seed::exec(&s.vm1, "ping -c 3 -i 0.2 -t 1 -W 1 172.16.101.3");
    let after = scrape().unwrap();
    // The byte, drop and NAT series: 20 echoes of 98-byte frames (56 bytes of data) each way,
    // the 3 TTL-1 requests (98 bytes each) passed, nothing dropped, nothing translated (no
    // gateway on this router).
    for (i, d) in [&a, &b].iter().enumerate() {
        assert_eq!(
            tests::grew(
                "forwarded bytes",
                bytes0[i],
                value(&after, "router_xdp_forwarded_bytes_total", d, Some("ipv4"))
            ),
            20 * 98,
            "{d}: bytes forwarded"
        );
        assert_eq!(
            value(&after, "router_xdp_dropped_packets_total", d, None),
            0,
            "{d}: dropped"
        );
        for dir in ["source", "destination"] {
            assert_eq!(
                value(&after, "router_xdp_nat_packets_total", d, Some(dir)),
                0,
                "{d}: {dir} translated"
            );
        }
    }
    let passed_bytes = tests::grew(
        "passed bytes",
        passed_bytes0,
        value(&after, "router_xdp_passed_bytes_total", &a, None),
    );
    assert!(
        passed_bytes >= 3 * 98,
        "{a}: {passed_bytes} bytes passed, the three TTL-1 requests alone are 294"
    );
    assert_eq!(
        value(
            &after,
            "router_xdp_forwarded_packets_total",
            &s.ids.dev_a(),
            Some("ipv4")
        ),
        a0 + 20,
        "echo requests forwarded from vm1; passed: {:?}",
        after
            .lines()
            .filter(|l| l.contains("passed_packets_total") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        value(
            &after,
            "router_xdp_forwarded_packets_total",
            &s.ids.dev_b(),
            Some("ipv4")
        ),
        b0 + 20,
        "echo replies forwarded from vm3"
    );
    assert_eq!(
        value(
            &after,
            "router_xdp_passed_packets_total",
            &s.ids.dev_a(),
            Some("ttl_exceeded")
        ),
        ttl0 + 3,
        "TTL-1 pings passed to the kernel"
    );
    // What the metrics say is what `router-ctl stats` says.
    assert_eq!(s.forwarded(&s.ids.dev_a()), a0 + 20);
    let _ = scrape().map(|t| assert!(t.contains("# EOF")));
}

#[test]
fn a_device_going_down_or_changing_mtu_leaves_the_fast_path_in_line() {
    require_root();
    let s = Seed::up("");
    s.prime_neighbours();
    let (ns, dev_a, dev_b) = (s.ns(), s.ids.dev_a(), s.ids.dev_b());
    let vm3_mac = tests::topo::link_mac(&s.vm3, &s.ids.tap_b());
    let redirect_b = || {
        ctl_json(&["show", &s.ids.router_id])[0]["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["device"] == dev_b.as_str())
            .unwrap()["redirect"]["tc"]
            .as_bool()
            .unwrap()
    };
    assert!(redirect_b(), "qr-b has no redirect slot while up");
    // Frames routed to a device that is down go to the kernel, not into the dead device. The
    // kernel flushes its neighbours on link-down, which would hide that: vm3 is kept as a
    // permanent neighbour, so only the missing redirect slot can stop the frames. Two ways to
    // be down: the device itself (admin down), and its peer (no carrier).
    for (what, down, up) in [
        (
            "qr-b down",
            format!("ip -n {ns} link set {dev_b} down"),
            format!("ip -n {ns} link set {dev_b} up"),
        ),
        (
            "vm3's end down (no carrier on qr-b)",
            format!("ip -n {} link set {} down", s.vm3, s.ids.tap_b()),
            // (Down, vm3 lost its default route: put it back.)
            format!(
                "ip -n {vm3} link set {tap} up && ip -n {vm3} route replace default via 172.16.101.1",
                vm3 = s.vm3,
                tap = s.ids.tap_b()
            ),
        ),
    ] {
        sh(&down);
        wait_for(&format!("{what}: the redirect slot stayed"), &|| !redirect_b());
        sh(&format!(
            "ip -n {ns} neigh replace 172.16.101.3 lladdr {vm3_mac} dev {dev_b} nud permanent"
        ));
        assert_eq!(s.wait_neigh("172.16.101.3"), vm3_mac);
        let (fwd, no_tx) = (s.forwarded(&dev_a), s.passed(&dev_a, "no_tx_port"));
        let _ = Seed::exec(&s.vm1, "ping -c 3 -i 0.1 -W 0.2 172.16.101.3");
        assert_eq!(
            s.forwarded(&dev_a),
            fwd,
            "{what}: frames were redirected into a device that is down"
        );
        assert_eq!(
            s.passed(&dev_a, "no_tx_port"),
            no_tx + 3,
            "{what}: the three echo requests must go to the kernel for want of a redirect slot"
        );
        // Up again: forwarded in the fast path again.
        sh(&up);
        wait_for(&format!("{what}: no redirect slot once up"), &|| redirect_b());
        // vm3 stays a permanent neighbour: the first packet needs no resolution.
        let before = s.fast_path();
        assert!(
            Seed::ping(&s.vm1, "172.16.101.3", 2),
            "{what}: no forwarding once up again"
        );
        s.assert_fast_path(&before, &[(&dev_a, 2, 0), (&dev_b, 2, 0)]);
    }
    // A smaller MTU on qr-b: a DF packet larger than it gets "fragmentation needed" from the
    // router's kernel instead of vanishing in the veth.
    sh(&format!("ip -n {ns} link set {dev_b} mtu 1000"));
    wait_for("the fast path did not learn the new MTU", &|| {
        ctl_json(&["show", &s.ids.router_id])[0]["interfaces"][1]["mtu"] == 1000
    });
    let too_big = s.passed(&dev_a, "too_big");
    let text = String::from_utf8_lossy(
        &Seed::exec(&s.vm1, "ping -c 1 -W 1 -M do -s 1200 172.16.101.3").stdout,
    )
    .to_string();
    assert!(text.contains("mtu = 1000"), "ping said: {text}");
    assert_eq!(s.passed(&dev_a, "too_big"), too_big + 1);
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3 -s 900", 1),
        "packets under the new MTU still pass"
    );
}

/// An operator or an agent changes a router device after apply: new MACs on both qr- devices,
/// then an address added to one and removed again. The daemon follows each change: with the
/// kernel's forwarding off, only the fast path carries vm1 ↔ vm3, so frames sent to a new MAC
/// must be recognised as the router's, and what it forwards must leave with the new MAC (as the
/// kernel reads the device, not as the router recorded it); the added address is the router's
/// own (handed to the kernel as a local destination), and once removed it no longer is.
#[test]
fn a_changed_device_mac_or_address_is_followed() {
    require_root();
    let s = Seed::up("");
    s.prime_neighbours();
    s.set_forwarding(false);
    let (ns, a, b) = (s.ns(), s.ids.dev_a(), s.ids.dev_b());
    let (new_a, new_b) = ("02:5e:00:00:0a:01", "02:5e:00:00:0b:01");
    sh(&format!("ip -n {ns} link set {a} address {new_a}"));
    sh(&format!("ip -n {ns} link set {b} address {new_b}"));
    assert_eq!(s.mac_of(&a), new_a);
    assert_eq!(s.mac_of(&b), new_b);
    let recorded = |dev: &str| {
        ctl_json(&["show", &s.ids.router_id])[0]["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["device"] == dev)
            .map(|i| i["mac"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    wait_for("the daemon did not record qr-a's new MAC", &|| {
        recorded(&a) == new_a
    });
    wait_for("the daemon did not record qr-b's new MAC", &|| {
        recorded(&b) == new_b
    });
    // vm1 and vm3 forget the old MACs (the kernel sends no gratuitous ARP for a new MAC at
    // its defaults) and resolve their gateways again, before the capture starts.
    sh(&format!(
        "ip -n {} neigh flush dev {} && ip -n {} neigh flush dev {}",
        s.vm1,
        s.ids.tap_a(),
        s.vm3,
        s.ids.tap_b()
    ));
    // (The kernel flushed the router's neighbours on both devices with the change of MAC.)
    s.prime_neighbours();
    let cap = capture(&s.vm3, &s.ids.tap_b(), |f| {
        f.len() > 42
            && f[12..14] == [8, 0]
            && f[23] == 1
            && f[26..30] == [172, 16, 100, 3]
            && f[30..34] == [172, 16, 101, 3]
            && f[34] == 8
    });
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3", 3),
        "vm1 → vm3 through the new MACs with the kernel's forwarding off"
    );
    let f = cap.join().unwrap().expect("no echo request reached vm3");
    assert_eq!(
        router_ctl::config::fmt_mac(f[6..12].try_into().unwrap()),
        new_b,
        "a forwarded frame leaves with the egress device's new MAC"
    );
    s.assert_fast_path(&before, &[(&a, 3, 0), (&b, 3, 0)]);

    // An address added to qr-b is the router's: vm1's pings to it go to the kernel as a local
    // destination (and are answered), not towards a neighbour of that subnet.
    sh(&format!("ip -n {ns} addr add 172.16.101.77/24 dev {b}"));
    let local = s.passed(&a, "local_dest");
    let t = std::time::Instant::now();
    while s.passed(&a, "local_dest") == local {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(3),
            "pings to an address added to qr-b never reached the kernel as the router's own"
        );
        let _ = Seed::exec(&s.vm1, "ping -c 1 -W 0.2 172.16.101.77");
    }
    // A ping that raced the daemon's resync may have met the subnet's neighbour lookup (and
    // gone to the kernel all the same); from the first local one on, none may.
    let (local, no_neigh) = (s.passed(&a, "local_dest"), s.passed(&a, "no_neigh"));
    assert!(
        Seed::ping(&s.vm1, "172.16.101.77", 3),
        "the router answers its new address"
    );
    assert_eq!(s.passed(&a, "local_dest"), local + 3);
    assert_eq!(
        s.passed(&a, "no_neigh"),
        no_neigh,
        "the new address was taken for a neighbour's"
    );
    // Removed: no longer the router's own.
    sh(&format!("ip -n {ns} addr del 172.16.101.77/24 dev {b}"));
    let t = std::time::Instant::now();
    loop {
        let before = s.passed(&a, "local_dest");
        let _ = Seed::exec(&s.vm1, "ping -c 1 -W 0.2 172.16.101.77");
        if s.passed(&a, "local_dest") == before {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(3),
            "a removed address stayed the router's own in the fast path"
        );
    }
}

#[test]
fn the_daemon_applies_its_definitions_on_sighup_and_on_file_change() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    struct Cleanup(String, String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            // Back to a daemon that owns no file, then remove what the test made.
            restart_daemon(&self.2, &[]);
            let _ = ctl(&["destroy", &self.0]);
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let path = std::env::temp_dir()
        .join(format!("router-test-{tag}-owned.toml"))
        .to_string_lossy()
        .into_owned();
    let _c = Cleanup(ids.router_id.clone(), path.clone(), format!("{tag}-after"));
    let route = "[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n";
    std::fs::write(&path, ids.config("")).unwrap();
    let log = restart_daemon(&tag, &["-f", &path]);
    let routes = || -> Option<Vec<String>> {
        let v = ctl_json(&["show"]);
        let r = v
            .as_array()?
            .iter()
            .find(|r| r["id"] == ids.router_id.as_str())?
            .clone();
        Some(
            r["routes"]
                .as_array()?
                .iter()
                .map(|x| x["destination"].as_str().unwrap().to_string())
                .collect(),
        )
    };
    wait_for("the daemon did not apply its file at start", &|| {
        routes().is_some()
    });
    // An edit followed by SIGHUP. The daemon also applies the file when its mtime changes:
    // the edit keeps the old mtime (written aside, given the old time, renamed over the file),
    // so that only the signal can apply it.
    let old_mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let aside = format!("{path}.new");
    std::fs::write(&aside, ids.config(route)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&aside)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    std::fs::rename(&aside, &path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        old_mtime
    );
    // A rescan, as every `apply` and verb asks for (SIGUSR1), does not apply the file: an
    // operator's half-done edit stays unapplied until they signal. Several full passes of the
    // daemon (one every 200 ms) go by with the rescan asked for each time.
    for _ in 0..5 {
        sh("pkill -USR1 -f 'router-ct[l] run'");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        routes(),
        Some(Vec::<String>::new()),
        "a rescan (what apply sends) applied the daemon's definitions file"
    );
    sh("pkill -HUP -f 'router-ct[l] run'");
    wait_for("SIGHUP did not apply the new route", &|| {
        routes().is_some_and(|r| r == ["10.10.0.0/16"])
    });
    // A broken file changes nothing: the daemon says it refused the file, and the router stays.
    let refused = "definitions not applied";
    let n = std::fs::read_to_string(&log)
        .unwrap()
        .matches(refused)
        .count();
    std::fs::write(&path, ids.config(route).replace("nexthop", "nexthp")).unwrap();
    tests::topo::wait_log(&log, refused, n + 1);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("unknown field `nexthp`"),
        "the refusal does not name the field"
    );
    assert_eq!(
        routes(),
        Some(vec!["10.10.0.0/16".to_string()]),
        "a refused file changed the router"
    );
    // An edit alone (no signal): the daemon sees the file change.
    std::fs::write(&path, ids.config("")).unwrap();
    wait_for("a changed file was not applied", &|| {
        routes().is_some_and(|r| r.is_empty())
    });
    // A router that leaves the file is destroyed.
    std::fs::write(&path, "").unwrap();
    wait_for("a router removed from the file is still there", &|| {
        routes().is_none()
    });
    assert!(!std::path::Path::new(&format!("/run/netns/{}", ids.ns())).exists());
}

#[test]
fn ecmp_extra_routes_spread_flows_over_both_nexthops() {
    require_root();
    let routes = "[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n\
                  [[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.253\"\n";
    let mut s = Seed::applied(routes);
    s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
    let (nh1, nh2) = (format!("nh1-{}", s.ids.tag), format!("nh2-{}", s.ids.tag));
    bridge_vlan101(
        &mut s,
        &[(&nh1, "172.16.101.254/24"), (&nh2, "172.16.101.253/24")],
    );
    // 64 flows (destinations): the whole /16 is local to each instance, and each counts the
    // echo requests it receives per destination, so every flow's nexthop is on record.
    let flows: Vec<String> = (0..64).map(|i| format!("10.10.{i}.1")).collect();
    for ns in [&nh1, &nh2] {
        sh(&format!("ip -n {ns} addr add 10.10.0.2/16 dev lo"));
        count_echo_requests(ns, &flows);
    }
    let kernel_route = sh(&format!("ip -n {} route show 10.10.0.0/16", s.ns()));
    assert!(
        kernel_route.contains("nexthop via 172.16.101.254")
            && kernel_route.contains("nexthop via 172.16.101.253"),
        "{kernel_route}"
    );
    assert!(Seed::ping(&s.vm1, "172.16.100.1", 1));
    assert!(Seed::ping(&nh1, "172.16.101.1", 1) && Seed::ping(&nh2, "172.16.101.1", 1));
    s.wait_neigh("172.16.101.254");
    s.wait_neigh("172.16.101.253");
    s.set_forwarding(false);
    let before = s.fast_path();
    // Two echo requests per flow, all through the fast path.
    for dst in &flows {
        assert!(
            Seed::ping(&s.vm1, &format!("{dst} -i 0.05"), 2),
            "flow to {dst} failed"
        );
    }
    s.assert_fast_path(
        &before,
        &[(&s.ids.dev_a(), 128, 0), (&s.ids.dev_b(), 128, 0)],
    );
    let (c1, c2) = (echo_counter(&nh1), echo_counter(&nh2));
    let mut at = [0; 2];
    for dst in &flows {
        match (c1[dst], c2[dst]) {
            (2, 0) => at[0] += 1,
            (0, 2) => at[1] += 1,
            (x, y) => panic!("flow to {dst}: {x} requests at nh1, {y} at nh2: split or lost"),
        }
    }
    assert!(
        at[0] >= 16 && at[1] >= 16,
        "flows not spread over both nexthops: {at:?}"
    );
}

#[test]
fn openstack_style_verbs_build_a_router_that_forwards() {
    require_root();
    // The verbs go through the daemon's API: no other test may restart it meanwhile.
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let tag = unique_tag();
    let name = format!("verbs_{tag}");
    let (vm1, vm3) = (format!("vm1-{tag}"), format!("vm3-{tag}"));
    struct Cleanup(String, Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = ctl(&["router", "delete", &self.0]);
            for n in &self.1 {
                let _ = sh_out(&format!("ip netns del {n}"));
            }
        }
    }
    let _c = Cleanup(name.clone(), vec![vm1.clone(), vm3.clone()]);
    let ok = |args: &[&str]| {
        let out = ctl(args);
        assert!(
            out.status.success(),
            "router-ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (pa, pb) = (
        format!("{tag}0a-aaaa-4aaa-8aaa-aaaaaaaaaaaa"),
        format!("{tag}0b-bbbb-4bbb-8bbb-bbbbbbbbbbbb"),
    );
    ok(&["router", "create", &name]);
    ok(&[
        "router",
        "add",
        "subnet",
        &name,
        "--subnet",
        "172.16.100.0/24",
        "--gateway",
        "172.16.100.1",
        "--port-id",
        &pa,
    ]);
    ok(&[
        "router",
        "add",
        "subnet",
        &name,
        "--subnet",
        "172.16.101.0/24",
        "--gateway",
        "172.16.101.1",
        "--port-id",
        &pb,
    ]);
    let show = ctl_json(&["router", "show", &name]);
    assert_eq!(
        show["interfaces_info"].as_array().unwrap().len(),
        2,
        "{show}"
    );
    let ns = show["namespace"].as_str().unwrap().to_string();
    for (vm, port, addr, gw) in [
        (&vm1, &pa, "172.16.100.3/24", "172.16.100.1"),
        (&vm3, &pb, "172.16.101.3/24", "172.16.101.1"),
    ] {
        sh(&format!(
            "ip netns add {vm} && ip link set tap{p} netns {vm} && ip -n {vm} link set tap{p} up && ip -n {vm} addr add {addr} dev tap{p} && ip -n {vm} route add default via {gw}",
            p = &port[..11]
        ));
    }
    assert!(Seed::ping(&vm1, "172.16.100.1", 1) && Seed::ping(&vm3, "172.16.101.1", 1));
    // The instances are neighbours of the router's kernel now; the daemon copies them into the
    // fast path from its events, which takes a moment: the checks below leave no kernel path.
    let known = |addr: &str| {
        ctl_json(&["neigh", &name])
            .as_array()
            .is_some_and(|v| v.iter().any(|n| n["dst"] == addr))
    };
    wait_for(
        "the daemon never gave the fast path the instances' MACs",
        &|| known("172.16.100.3") && known("172.16.101.3"),
    );
    let id = show["id"].as_str().unwrap().to_string();
    let (qa, qb) = (format!("qr-{}", &pa[..11]), format!("qr-{}", &pb[..11]));
    // Forwarded packets by the fast path on each device, IPv4 and IPv6.
    let fwd = || -> Vec<(u64, u64)> {
        let v = ctl_json(&["stats", &name]);
        [&qa, &qb]
            .iter()
            .map(|d| {
                let s = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["device"] == d.as_str())
                    .unwrap_or_else(|| panic!("no stats for {d}: {v}"));
                let f = &s["forwarded"];
                (
                    f["ipv4"]["packets"].as_u64().unwrap(),
                    f["ipv6"]["packets"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let grew = |before: &[(u64, u64)], after: &[(u64, u64)], v6: bool| -> Vec<u64> {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| {
                let (b, a) = if v6 { (b.1, a.1) } else { (b.0, a.0) };
                tests::grew("forwarded", b, a)
            })
            .collect()
    };
    // The fast path forwards, not the kernel: with the namespace's IPv4 forwarding off, every
    // echo request (on qr-a) and reply (on qr-b) is forwarded by the fast path.
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=0"
    ));
    let f0 = fwd();
    assert_eq!(
        Seed::ping_counts(&vm1, "172.16.101.3", 3),
        (3, 3),
        "the router built with the verbs does not forward"
    );
    assert_eq!(
        grew(&f0, &fwd(), false),
        [3, 3],
        "echoes forwarded by the fast path (qr-a, qr-b)"
    );
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
    ));
    // A route whose gateway is not on a connected subnet is refused and changes nothing.
    let before = ctl_json(&["router", "show", &name]);
    let out = ctl(&[
        "router",
        "add",
        "route",
        &name,
        "--route",
        "destination=10.60.0.0/16,gateway=192.168.9.9",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("'nexthop' = 192.168.9.9 is not on a connected IPv4 subnet"));
    assert_eq!(ctl_json(&["router", "show", &name]), before);
    ok(&[
        "router",
        "add",
        "route",
        &name,
        "--route",
        "destination=10.50.0.0/16,gateway=172.16.101.9",
    ]);
    assert!(sh(&format!("ip -n {ns} route show 10.50.0.0/16")).contains("via 172.16.101.9"));
    let list = ctl_json(&["router", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == name.as_str() && r["routes"] == 1),
        "{list}"
    );
    ok(&[
        "router",
        "remove",
        "route",
        &name,
        "--route",
        "destination=10.50.0.0/16,gateway=172.16.101.9",
    ]);
    assert!(sh(&format!("ip -n {ns} route show 10.50.0.0/16")).is_empty());
    // IPv6 subnets on the same ports make them dual-stack; the devices stay.
    for (port, subnet, gw) in [
        (&pa, "2001:db8:100::/64", "2001:db8:100::1"),
        (&pb, "2001:db8:101:0::/64", "2001:db8:101::1"),
    ] {
        ok(&[
            "router",
            "add",
            "subnet",
            &name,
            "--subnet",
            subnet,
            "--gateway",
            gw,
            "--port-id",
            port,
        ]);
    }
    let show = ctl_json(&["router", "show", &name]);
    assert_eq!(
        show["interfaces_info"].as_array().unwrap().len(),
        4,
        "{show}"
    );
    for (vm, port, addr, gw) in [
        (&vm1, &pa, "2001:db8:100::3/64", "2001:db8:100::1"),
        (&vm3, &pb, "2001:db8:101::3/64", "2001:db8:101::1"),
    ] {
        sh(&format!(
            "ip -n {vm} addr add {addr} dev tap{p} nodad && ip -n {vm} -6 route add default via {gw}",
            p = &port[..11]
        ));
    }
    // Neighbour discovery first (both instances and the router learn each other's addresses,
    // as `prime_neighbours6` does for the seed): once failed in a loaded full run, its first
    // echo lost; then three echoes, none lost.
    let _ = Seed::ping_counts(&vm1, "2001:db8:101::3", 1);
    let f0 = fwd();
    assert_eq!(
        Seed::ping_counts(&vm1, "2001:db8:101::3", 3),
        (3, 3),
        "no IPv6 through the verbs' router"
    );
    assert_eq!(
        grew(&f0, &fwd(), true),
        [3, 3],
        "IPv6 echoes forwarded by the fast path (qr-a, qr-b)"
    );
    assert!(
        Seed::ping(&vm1, "172.16.101.3", 1),
        "IPv4 lost when IPv6 came"
    );
    // Removing the IPv6 subnet (spelt otherwise) leaves the port with its IPv4 one.
    ok(&[
        "router",
        "remove",
        "subnet",
        &name,
        "--subnet",
        "2001:db8:101:0:0::/64",
    ]);
    let show = ctl_json(&["router", "show", &name]);
    assert_eq!(
        show["interfaces_info"].as_array().unwrap().len(),
        3,
        "{show}"
    );
    assert!(!sh(&format!("ip -n {ns} addr show qr-{}", &pb[..11])).contains("2001:db8:101::1"));
    assert!(
        Seed::ping(&vm1, "172.16.101.3", 1),
        "IPv4 lost with the IPv6 subnet"
    );
    ok(&[
        "router",
        "remove",
        "subnet",
        &name,
        "--subnet",
        "172.16.101.0/24",
    ]);
    assert!(
        !sh_out(&format!("ip -n {ns} link show qr-{}", &pb[..11]))
            .status
            .success(),
        "removed interface still there"
    );
    ok(&["router", "delete", &name]);
    // Nothing of the router is left: namespace, devices (the instances' ends went with their
    // peers), pinned maps and links, state.
    assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
    assert!(
        !sh_out(&format!("ip -n {vm1} link show tap{}", &pa[..11]))
            .status
            .success(),
        "vm1's device outlived the router"
    );
    assert!(
        !router_ctl::state::bpf_dir(&id).exists(),
        "pinned maps and links left in {}",
        router_ctl::state::bpf_dir(&id).display()
    );
    assert!(
        !router_ctl::state::RouterState::path(&id).exists(),
        "state file left"
    );
    let list = ctl_json(&["router", "list"]);
    assert!(
        !list
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == name.as_str() || r["id"] == id.as_str()),
        "the deleted router is still listed: {list}"
    );
}

#[test]
fn malformed_api_requests_get_errors_and_never_stop_the_daemon() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let s = Seed::up("");
    restart_daemon(&s.ids.tag, &[]);
    let sock = "/run/router-xdp/ctl.sock";
    let send = |bytes: &[u8], close_write: bool| -> String {
        use std::io::{Read, Write};
        let t0 = std::time::Instant::now();
        let mut c = loop {
            match std::os::unix::net::UnixStream::connect(sock) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        t0.elapsed() < std::time::Duration::from_secs(3),
                        "no daemon on {sock}: {e}"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        };
        let _ = c.write_all(bytes);
        if close_write {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    // Wait until the restarted daemon answers (the one it replaces may still hold the socket).
    let t0 = std::time::Instant::now();
    while !send(
        b"{\"op\": \"delete\", \"router\": \"no-such-router\"}\n",
        false,
    )
    .contains("\"ok\"")
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "the daemon does not answer on {sock}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mode = std::fs::metadata(sock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600, "the API socket must be root-only");
    let dir_mode = std::fs::metadata("/run/router-xdp")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(dir_mode, 0o700, "the socket's directory must be root-only");
    let big = vec![b'x'; 70 * 1024];
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("garbage", b"garbage\n".to_vec(), false, "malformed request"),
        ("truncated", b"{\"op\": \"create\", \"name\": \"x\"".to_vec(), true, "truncated request"),
        ("oversized", big, true, "longer than"),
        ("unknown op", b"{\"op\": \"explode\"}\n".to_vec(), false, "malformed request"),
        ("unknown field", b"{\"op\": \"delete\", \"router\": \"x\", \"force\": true}\n".to_vec(), false, "malformed request"),
        ("unknown router", b"{\"op\": \"add_route\", \"router\": \"no-such-router\", \"route\": \"destination=10.1.0.0/16,gateway=1.1.1.1\"}\n".to_vec(), false, "no router 'no-such-router'"),
        ("empty", Vec::new(), true, "truncated request"),
        // A route batch is sent over the socket, never named as a file for root to open.
        ("batch from a file", format!("{{\"op\": \"route_batch\", \"router\": \"{}\", \"name\": \"x\", \"file\": \"/etc/shadow\", \"len\": 0}}\n", s.ids.router_id).into_bytes(), false, "malformed request"),
        ("batch over the limit", format!("{{\"op\": \"route_batch\", \"router\": \"{}\", \"name\": \"x\", \"len\": {}}}\n", s.ids.router_id, 1u64 << 40).into_bytes(), false, "over the limit"),
        ("batch cut short", format!("{{\"op\": \"route_batch\", \"router\": \"{}\", \"name\": \"x\", \"len\": 100}}\nadd 10.71.0.0/16 via 172.16.101.9\n", s.ids.router_id).into_bytes(), true, "truncated route batch"),
    ];
    for (what, bytes, close, want) in cases {
        let answer = send(&bytes, close);
        let v: serde_json::Value = serde_json::from_str(answer.trim())
            .unwrap_or_else(|_| panic!("{what}: answer {answer:?}"));
        assert_eq!(v["ok"], false, "{what}: {answer}");
        assert!(
            v["error"].as_str().unwrap().contains(want),
            "{what}: {answer}"
        );
    }
    // Still there, and still doing its job.
    let req = format!("{{\"op\": \"add_route\", \"router\": \"{}\", \"route\": \"destination=10.70.0.0/16,gateway=172.16.101.9\"}}\n", s.ids.router_id);
    let v: serde_json::Value = serde_json::from_str(send(req.as_bytes(), false).trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(sh(&format!("ip -n {} route show 10.70.0.0/16", s.ns())).contains("via 172.16.101.9"));
}

/// Everything a refused input must leave as it was: what router-ctl reports and what the
/// kernel holds for the router (devices, addresses, routes, pinned objects, the state file).
fn snapshot(s: &Seed) -> String {
    let ns = s.ns();
    let mut out = String::new();
    // Only this router: the parallel tests' routers come and go meanwhile.
    for args in [
        vec!["show", "-j", s.ids.router_id.as_str()],
        vec!["router", "show", "-j", s.ids.name.as_str()],
    ] {
        let o = ctl(&args);
        out += &String::from_utf8_lossy(&o.stdout);
        out += &String::from_utf8_lossy(&o.stderr);
    }
    for cmd in [
        format!("ip -n {ns} -j -d link show"),
        format!("ip -n {ns} -j addr show"),
        format!("ip -n {ns} -j -4 route show table all"),
        format!("ip -n {ns} -j -6 route show table all"),
        format!("ip netns list | grep {} || true", s.ids.tag),
        format!("ls -R /sys/fs/bpf/router-xdp/v1/{}", s.ids.router_id),
        format!("cat /run/router-xdp/routers/{}.json", s.ids.router_id),
        format!("ip netns exec {ns} sysctl net.ipv4.ip_forward net.ipv6.conf.all.forwarding"),
    ] {
        out += &cmd;
        out += "\n";
        out += &sh(&cmd);
    }
    out
}

#[test]
fn invalid_definitions_and_arguments_leave_the_system_byte_identical() {
    require_root();
    // The verbs go through the daemon's API: no other test may restart it meanwhile.
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let route = "[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n[[router.route]]\ndestination = \"2001:db8:aaaa::/48\"\nnexthop = \"2001:db8:101::fe\"\n";
    let s = Seed::up_dual(route);
    let ids = &s.ids;
    let good = ids.config_dual(route);
    // The kernel's own changes first: link-local addresses finishing duplicate detection.
    wait_for("no tentative address", &|| {
        sh(&format!("ip -n {} -6 addr show tentative", s.ns()))
            .trim()
            .is_empty()
    });
    let before = snapshot(&s);
    let same = |after: String, what: &str| {
        let d: Vec<String> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .take(12)
            .map(|(a, b)| format!("before: {a}\nafter:  {b}"))
            .collect();
        if !d.is_empty() {
            panic!(
                "{what}: the system changed ({}):\n{}",
                s.ids.router_id,
                d.join("\n")
            );
        }
        assert_eq!(after, before, "{what}: the system changed");
    };
    let second = |t: &str| {
        format!(
            "{good}\n[[router]]\nid = \"{}\"\n[[router.interface]]\nport_id = \"{}\"\nsubnet = \"10.77.0.0/24\"\ngateway_ip = \"10.77.0.1\"\n",
            t, "eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee"
        )
    };
    let many_paths: String = (0..9)
        .map(|k| {
            format!(
                "[[router.route]]\ndestination = \"10.20.0.0/16\"\nnexthop = \"172.16.101.{}\"\n",
                10 + k
            )
        })
        .collect();
    let many_ifaces: String = (0..64)
        .map(|k| format!("[[router.interface]]\nport_id = \"{k:08x}-1111-4111-8111-111111111111\"\nsubnet = \"10.{k}.0.0/24\"\ngateway_ip = \"10.{k}.0.1\"\n"))
        .collect();
    let many_ips: String = {
        let f: Vec<String> = (0..17)
            .map(|k| format!("{{ subnet = \"10.{k}.0.0/24\", ip_address = \"10.{k}.0.1\" }}"))
            .collect();
        format!("[[router.interface]]\nport_id = \"ffffffff-1111-4111-8111-111111111111\"\nfixed_ips = [{}]\n", f.join(", "))
    };
    // One definition per rule: (what, file text, what the message must say).
    let cases: Vec<(&str, String, &str)> = vec![
        ("gateway outside subnet", good.replacen("ip_address = \"172.16.100.1\"", "ip_address = \"172.16.9.1\"", 1), "'fixed_ips[0].ip_address' = 172.16.9.1 is outside subnet 172.16.100.0/24"),
        ("gateway = network", good.replacen("ip_address = \"172.16.100.1\"", "ip_address = \"172.16.100.0\"", 1), "network or broadcast address"),
        ("gateway = broadcast", good.replacen("ip_address = \"172.16.100.1\"", "ip_address = \"172.16.100.255\"", 1), "network or broadcast address"),
        ("IPv6 gateway = anycast", good.replacen("ip_address = \"2001:db8:100::1\"", "ip_address = \"2001:db8:100::\"", 1), "subnet-router anycast"),
        ("host bits", good.replacen("subnet = \"172.16.100.0/24\"", "subnet = \"172.16.100.1/24\"", 1), "'fixed_ips[0].subnet': '172.16.100.1/24' has host bits set"),
        ("prefix length", good.replacen("subnet = \"2001:db8:100::/64\"", "subnet = \"2001:db8:100::/129\"", 1), "'fixed_ips[1].subnet': '129'"),
        ("overlap IPv4", good.replacen("subnet = \"172.16.101.0/24\", ip_address = \"172.16.101.1\"", "subnet = \"172.16.100.0/23\", ip_address = \"172.16.101.1\"", 1), "overlaps subnet 172.16.100.0/24"),
        ("overlap IPv6", good.replacen("subnet = \"2001:db8:101::/64\", ip_address = \"2001:db8:101::1\"", "subnet = \"2001:db8:100::/56\", ip_address = \"2001:db8:100::fe\"", 1), "overlaps subnet 2001:db8:100::/64"),
        ("family", good.replacen("ip_address = \"2001:db8:100::1\"", "ip_address = \"172.16.100.9\"", 1), "is not an IPv6 address like subnet"),
        ("link-local subnet", good.replacen("subnet = \"2001:db8:100::/64\", ip_address = \"2001:db8:100::1\"", "subnet = \"fe80::/64\", ip_address = \"fe80::1\"", 1), "not a unicast subnet"),
        ("empty fixed_ips", good.replacen("fixed_ips = [\n  { subnet = \"172.16.100.0/24\", ip_address = \"172.16.100.1\" },\n  { subnet = \"2001:db8:100::/64\", ip_address = \"2001:db8:100::1\" },\n]", "fixed_ips = []", 1), "'fixed_ips' is empty"),
        ("both forms", good.replacen("fixed_ips = [\n  { subnet = \"172.16.100.0/24\"", "subnet = \"10.1.1.0/24\"\nfixed_ips = [\n  { subnet = \"172.16.100.0/24\"", 1), "not both"),
        ("too many fixed IPs", format!("{good}{many_ips}"), "at most 16"),
        ("unknown field", good.replacen("name = ", "colour = \"blue\"\nname = ", 1), "unknown field `colour`"),
        ("missing field", good.replacen(&format!("port_id = \"{}\"\n", ids.port_b), "", 1), "missing field `port_id`"),
        ("bad TOML", good.replacen("[[router.route]]", "[[router.route", 1), "expected"),
        ("duplicate port", good.replacen(&ids.port_b, &ids.port_a, 1), "duplicate port_id"),
        ("device name clash", good.replacen(&ids.port_b, &format!("{}ff-4000-8000-000000000000", &ids.port_a[..11]), 1), "is already used by port"),
        ("short port id", good.replacen(&ids.port_b, "abc", 1), "field 'port_id' must be a Neutron port UUID"),
        ("nexthop off-link", good.replacen("nexthop = \"172.16.101.254\"", "nexthop = \"192.168.7.1\"", 1), "'nexthop' = 192.168.7.1 is not on a connected IPv4 subnet"),
        ("IPv6 nexthop off-link", good.replacen("nexthop = \"2001:db8:101::fe\"", "nexthop = \"2001:db8:7::1\"", 1), "is not on a connected IPv6 subnet"),
        ("nexthop family", good.replacen("nexthop = \"2001:db8:101::fe\"", "nexthop = \"172.16.101.254\"", 1), "is not an IPv6 address like destination"),
        ("nexthop = router", good.replacen("nexthop = \"172.16.101.254\"", "nexthop = \"172.16.101.1\"", 1), "the router's own address"),
        ("destination = connected", good.replacen("destination = \"10.10.0.0/16\"", "destination = \"172.16.100.0/24\"", 1), "is the connected subnet of port"),
        ("route twice", format!("{good}[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n"), "is defined twice"),
        ("more than 8 paths", format!("{good}{many_paths}"), "more than 8 nexthops"),
        ("more than 64 interfaces", format!("{good}{many_ifaces}"), "at most 64 are supported"),
        ("max_routes", good.replacen("name = ", "max_routes = 0\nname = ", 1), "'max_routes' = 0 must be from 1"),
        ("router id", good.replacen(&format!("id = \"{}\"", ids.router_id), "id = \"a b\"", 1), "field 'id'"),
        ("router defined twice", second(&ids.router_id), "defined twice (field 'id')"),
        ("port of another router", second("other-router").replacen("eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee", &ids.port_a, 1), "is also used by router"),
    ];
    let tag = &ids.tag;
    for (what, text, want) in &cases {
        assert_ne!(text, &good, "{what}: the case did not change the file");
        let path = write_config(&format!("{tag}-bad"), text);
        let out = ctl(&["apply", "-f", &path]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(want), "{what}: message {err:?} lacks {want:?}");
        same(snapshot(&s), what);
        let _ = std::fs::remove_file(&path);
    }
    // Arguments: each refused, nothing changed.
    let r = ids.name.as_str();
    let args: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "router",
                "add",
                "subnet",
                r,
                "--subnet",
                "10.0.0.0/33",
                "--gateway",
                "10.0.0.1",
            ],
            "'10.0.0.0/33'",
        ),
        (
            vec![
                "router",
                "add",
                "subnet",
                r,
                "--subnet",
                "172.16.100.0/25",
                "--gateway",
                "172.16.100.2",
            ],
            "overlaps subnet 172.16.100.0/24",
        ),
        (
            vec![
                "router",
                "add",
                "subnet",
                r,
                "--subnet",
                "2001:db8:100::/64",
                "--gateway",
                "2001:db8:100::9",
            ],
            "overlaps",
        ),
        (
            vec![
                "router",
                "add",
                "subnet",
                r,
                "--subnet",
                "10.9.0.0/24",
                "--gateway",
                "2001:db8::1",
            ],
            "is not an IPv4 address",
        ),
        (
            vec![
                "router",
                "add",
                "subnet",
                r,
                "--subnet",
                "10.9.0.0/24",
                "--gateway",
                "10.9.0.1",
                "--port-id",
                "x",
            ],
            "port_id",
        ),
        (
            vec!["router", "add", "subnet", r, "--subnet", "10.9.0.0/24"],
            "--gateway",
        ),
        (
            vec![
                "router",
                "add",
                "route",
                r,
                "--route",
                "destination=10.60.0.0/16,gateway=192.168.9.9",
            ],
            "is not on a connected IPv4 subnet",
        ),
        (
            vec![
                "router",
                "add",
                "route",
                r,
                "--route",
                "destination=2001:db8:5::/48,gateway=172.16.101.9",
            ],
            "is not an IPv6 address like destination",
        ),
        (
            vec![
                "router",
                "add",
                "route",
                r,
                "--route",
                "destination=10.60.0.0/16",
            ],
            "gateway= is missing",
        ),
        (
            vec!["router", "add", "route", r, "--route", "garbage"],
            "expected destination=CIDR,gateway=IP",
        ),
        (
            vec![
                "router",
                "remove",
                "route",
                r,
                "--route",
                "destination=10.99.0.0/16,gateway=172.16.101.9",
            ],
            "no route to 10.99.0.0/16",
        ),
        (
            vec!["router", "remove", "subnet", r, "--subnet", "10.99.0.0/24"],
            "no interface on subnet",
        ),
        (vec!["router", "create", r], "exists already"),
        (
            vec!["router", "show", "no-such-router"],
            "no router 'no-such-router'",
        ),
        (
            vec!["router", "delete", "no-such-router"],
            "no router 'no-such-router'",
        ),
        (
            vec!["destroy", "no-such-router"],
            "no router 'no-such-router'",
        ),
        (
            vec!["stats", "no-such-router"],
            "no router 'no-such-router'",
        ),
        (vec!["apply"], "--file"),
        (
            vec!["apply", "-f", "/nonexistent/router.toml"],
            "/nonexistent/router.toml",
        ),
        (vec!["frobnicate"], "unrecognized subcommand"),
        (vec!["router", "add", "subnet"], "required"),
    ];
    for (a, want) in &args {
        let out = ctl(a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "router-ctl {a:?}: accepted");
        assert!(
            err.contains(want),
            "router-ctl {a:?}: message {err:?} lacks {want:?}"
        );
        same(snapshot(&s), &format!("router-ctl {a:?}"));
    }
}

/// `hook = "HOOK"` on both ports of a definition.
fn with_hook(ids: &Ids, text: String, hook: &str) -> String {
    [&ids.port_a, &ids.port_b].iter().fold(text, |t, p| {
        t.replace(
            &format!("port_id = \"{p}\"\n"),
            &format!("port_id = \"{p}\"\nhook = \"{hook}\"\n"),
        )
    })
}

/// Waits until `dev` can (or cannot) take XDP-redirected frames, as `show` reports it.
fn wait_xdp_slot(s: &Seed, dev: &str, want: bool) {
    wait_for(
        &format!("{dev}: XDP redirect slot never became {want}"),
        &|| {
            ctl_json(&["show", &s.ids.router_id])[0]["interfaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["device"] == dev && i["redirect"]["xdp"] == want)
        },
    );
}

/// The issue's own scenario: the seed as Neutron plugs it (qr- devices before apply, instances
/// at kernel defaults: GRO off, checksum and segmentation offloads on), the kernel's
/// forwarding off: ping both ways loses nothing and 20 MB of TCP cross both ways, all in the
/// fast path (tc, the hook auto picks for veths).
#[test]
fn at_kernel_defaults_ping_and_tcp_cross_in_the_fast_path_both_ways() {
    require_root();
    let s = Seed::up("");
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    for (ns, tap) in [(&s.vm1, s.ids.tap_a()), (&s.vm3, s.ids.tap_b())] {
        let k = sh(&format!("ip netns exec {ns} ethtool -k {tap}"));
        for want in [
            "generic-receive-offload: off",
            "tx-checksumming: on",
            "tcp-segmentation-offload: on",
        ] {
            assert!(k.contains(want), "{tap} is not at kernel defaults: {want}");
        }
    }
    assert_eq!(
        s.hooks(),
        vec![(a.clone(), "tc".to_string()), (b.clone(), "tc".to_string())]
    );
    s.prime_neighbours();
    s.set_forwarding(false);
    let before = s.fast_path();
    let (sent, got) = Seed::ping_counts(&s.vm1, "172.16.101.3", 20);
    assert_eq!((sent, got), (20, 20), "vm1 → vm3");
    let (sent, got) = Seed::ping_counts(&s.vm3, "172.16.100.3", 20);
    assert_eq!((sent, got), (20, 20), "vm3 → vm1");
    s.assert_fast_path(&before, &[(&a, 40, 0), (&b, 40, 0)]);
    let before = s.fast_path();
    for (from, to, ip) in [
        (&s.vm1, &s.vm3, "172.16.101.3"),
        (&s.vm3, &s.vm1, "172.16.100.3"),
    ] {
        let (n, same) = tcp_transfer(from, to, ip, 20 << 20);
        assert_eq!(n, 20 << 20, "TCP {from} → {to} incomplete");
        assert!(same, "TCP {from} → {to} corrupted");
    }
    s.assert_fast_path_carried(&before, &[(&a, 20 << 20), (&b, 20 << 20)]);
}

/// XDP forced on veths is never worse than the kernel router, whatever the instance side does:
/// at kernel defaults the qr- devices cannot take XDP-redirected frames (no_xdp_xmit, the
/// kernel forwards); with GRO on at vm3 they can, and TCP segments vm1 sends with partial
/// checksums are still left to the kernel (l4_checksum: XDP cannot keep that state), so TCP
/// stays intact; with the instance side tuned (TX checksum offload off) the fast path carries
/// the TCP itself; and vm3's GRO going off under traffic loses at most the frame in flight.
#[test]
fn forced_xdp_on_veths_is_never_worse_than_the_kernel() {
    require_root();
    let s = Seed::up_dual_text(|ids| with_hook(ids, ids.config_dual(""), "xdp"));
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    assert_eq!(
        s.hooks(),
        vec![
            (a.clone(), "xdp".to_string()),
            (b.clone(), "xdp".to_string())
        ]
    );
    s.prime_neighbours();
    // Kernel defaults: nothing can be XDP-redirected to the qr- devices.
    let no_xmit = s.passed(&a, "no_xdp_xmit");
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3", 3),
        "vm1 → vm3 at defaults"
    );
    assert_eq!(s.passed(&a, "no_xdp_xmit"), no_xmit + 3);
    // GRO on at vm3: qr-b takes XDP frames; vm1 still sends partial checksums.
    sh(&format!(
        "ip netns exec {} ethtool -K {} gro on",
        s.vm3,
        s.ids.tap_b()
    ));
    wait_xdp_slot(&s, &b, true);
    let l4 = s.passed(&a, "l4_checksum");
    let (n, same) = tcp_transfer(&s.vm1, &s.vm3, "172.16.101.3", 4 << 20);
    assert!(
        n == 4 << 20 && same,
        "TCP with partial checksums through forced XDP"
    );
    assert!(
        s.passed(&a, "l4_checksum") > l4 + 100,
        "segments with partial checksums were not left to the kernel"
    );
    // Tuned instance side (complete checksums, GRO on both ends): the fast path carries TCP,
    // with the kernel's forwarding off.
    sh(&format!(
        "ip netns exec {} ethtool -K {} tx off gro on",
        s.vm1,
        s.ids.tap_a()
    ));
    sh(&format!(
        "ip netns exec {} ethtool -K {} tx off",
        s.vm3,
        s.ids.tap_b()
    ));
    // Ping and TCP of both families, each way, cross in the XDP program with the kernel's
    // forwarding off, and the kernel's own count of XDP redirects on each device equals the
    // fast path's.
    wait_xdp_slot(&s, &a, true);
    s.prime_neighbours6();
    s.set_forwarding(false);
    s.set_forwarding6(false);
    let before = s.fast_path();
    for dev in [&a, &b] {
        assert!(
            before.get(dev).redirects.is_some(),
            "{dev}: no kernel count of XDP redirects to check against"
        );
    }
    for (from, to) in [
        (&s.vm1, "172.16.101.3"),
        (&s.vm3, "172.16.100.3"),
        (&s.vm1, "2001:db8:101::3"),
        (&s.vm3, "2001:db8:100::3"),
    ] {
        assert_eq!(Seed::ping_counts(from, to, 5), (5, 5), "{from} → {to}");
    }
    s.assert_fast_path(&before, &[(&a, 10, 10), (&b, 10, 10)]);
    for ip in ["172.16.101.3", "2001:db8:101::3"] {
        let before = s.fast_path();
        let (n, same) = tcp_transfer(&s.vm1, &s.vm3, ip, 10 << 20);
        assert!(
            n == 10 << 20 && same,
            "TCP to {ip} through forced XDP, tuned"
        );
        s.assert_fast_path_carried(&before, &[(&a, 10 << 20), (&b, 1)]);
    }
    s.set_forwarding6(true);
    // vm3's GRO goes off under 1 000 pps while the controller's state lock is held for a second
    // (as an apply of many other routers holds it): qr-b leaves the devmap at once anyway (the
    // daemon follows the kernel's XDP feature notification, without waiting for the lock its
    // resync needs) and the kernel forwards the rest.
    s.set_forwarding(true);
    let fwd0 = s.forwarded(&a);
    let (sent, got) = steady_ping(
        &s.vm1,
        "172.16.101.3",
        2000,
        &|| s.forwarded(&a) >= fwd0 + 100,
        || {
            let _busy = router_ctl::state::Lock::acquire(router_ctl::state::STATE_LOCK)
                .expect("state lock");
            sh(&format!(
                "ip netns exec {} ethtool -K {} gro off",
                s.vm3,
                s.ids.tap_b()
            ));
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
    );
    // The kernel drops a frame XDP already queued for a veth whose peer just turned GRO off
    // (NDO_XMIT went away under it): at most the one in flight. A daemon that waited for its
    // resync to drop the slot lost every frame until the lock was free. (tc: none, see
    // a_peers_gro_changing_under_traffic_loses_nothing.)
    assert!(
        sent == 2000 && got >= 1999,
        "{} packets lost when vm3's GRO went off",
        sent - got
    );
    wait_xdp_slot(&s, &b, false);
    assert!(
        s.passed(&a, "no_xdp_xmit") > no_xmit + 3,
        "frames after the change"
    );
}

/// With the tc hook (auto on veths) the peer's GRO is irrelevant: it going off and on under
/// traffic changes nothing, and every packet stays in the fast path.
#[test]
fn a_peers_gro_changing_under_traffic_loses_nothing() {
    require_root();
    let s = Seed::up("");
    let a = s.ids.dev_a();
    s.prime_neighbours();
    s.set_forwarding(false);
    let before = s.fast_path();
    let (sent, got) = steady_ping(
        &s.vm1,
        "172.16.101.3",
        2000,
        &|| s.forwarded(&a) >= before.get(&a).ipv4 + 100,
        || {
            for gro in ["on", "off", "on", "off"] {
                sh(&format!(
                    "ip netns exec {} ethtool -K {} gro {gro}",
                    s.vm3,
                    s.ids.tap_b()
                ));
            }
        },
    );
    assert_eq!((sent, got), (2000, 2000));
    s.assert_fast_path(&before, &[(&a, 2000, 0), (&s.ids.dev_b(), 2000, 0)]);
}

/// Open vSwitch internal ports (Neutron's qr- devices on br-int) have no native XDP. A macvlan
/// has none here either: auto picks tc for it and forwards in the fast path; XDP forced on it
/// is refused, naming the device and what to do, and nothing is left half-applied.
#[test]
fn devices_without_native_xdp_get_tc_and_refuse_forced_xdp() {
    require_root();
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    let (ns, vm1, vm3, br) = (
        ids.ns(),
        format!("vm1-{tag}"),
        format!("vm3-{tag}"),
        format!("br-{tag}"),
    );
    struct Cleanup(String, Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = ctl(&["destroy", &self.0]);
            for n in &self.1 {
                let _ = sh_out(&format!("ip netns del {n}"));
            }
        }
    }
    let _c = Cleanup(
        ids.router_id.clone(),
        vec![ns.clone(), vm1.clone(), vm3.clone(), br.clone()],
    );
    // Each subnet is a lower device (a bridge with no ports) in a namespace of its own; the
    // router's port and the instance are macvlans on it, in bridge mode.
    sh(&format!(
        "ip netns add {ns} && ip netns add {vm1} && ip netns add {vm3} && ip netns add {br}"
    ));
    for (lower, dev, vm, addr, gw) in [
        (
            "low100",
            ids.dev_a(),
            &vm1,
            "172.16.100.3/24",
            "172.16.100.1",
        ),
        (
            "low101",
            ids.dev_b(),
            &vm3,
            "172.16.101.3/24",
            "172.16.101.1",
        ),
    ] {
        sh(&format!(
            "ip -n {br} link add {lower} type bridge && ip -n {br} link set {lower} up && \
             ip -n {br} link add {dev} link {lower} type macvlan mode bridge && \
             ip -n {br} link set {dev} netns {ns} && \
             ip -n {br} link add eth0-{lower} link {lower} type macvlan mode bridge && \
             ip -n {br} link set eth0-{lower} netns {vm} && ip -n {vm} link set eth0-{lower} name eth0 && \
             ip -n {vm} link set eth0 up && ip -n {vm} link set lo up && ip -n {vm} addr add {addr} dev eth0 && \
             ip -n {vm} route add default via {gw}"
        ));
    }
    let path = write_config(&tag, &with_hook(&ids, ids.config(""), "xdp"));
    let out = ctl(&["apply", "-f", &path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "XDP forced on a macvlan was accepted"
    );
    assert!(
        err.contains(&format!(
            "device {} (macvlan) has no native XDP",
            ids.dev_a()
        )) && err.contains("hook = \"tc\""),
        "{err}"
    );
    assert!(
        !ctl_json(&["show"]).to_string().contains(&ids.router_id),
        "a refused apply left the router recorded"
    );
    for dev in [ids.dev_a(), ids.dev_b()] {
        let shown = sh(&format!("ip -n {ns} addr show dev {dev}"));
        assert!(
            !shown.contains("inet") && shown.contains("state DOWN"),
            "a refused apply left {dev} changed: {shown}"
        );
    }
    // auto: tc, and the fast path forwards with the kernel's forwarding off.
    let path = write_config(&tag, &ids.config(""));
    let out = ctl(&["apply", "-f", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = ctl_json(&["show", &ids.router_id]);
    for i in show[0]["interfaces"].as_array().unwrap() {
        assert_eq!(i["hook"], "tc", "{show}");
        assert_eq!(i["kind"], "macvlan", "{show}");
    }
    assert!(Seed::ping(&vm1, "172.16.100.1", 1) && Seed::ping(&vm3, "172.16.101.1", 1));
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=0"
    ));
    let fwd = |dev: &str| {
        ctl_json(&["stats", &ids.router_id])
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == dev)
            .unwrap()["forwarded"]["packets"]
            .as_u64()
            .unwrap()
    };
    let (a0, b0) = (fwd(&ids.dev_a()), fwd(&ids.dev_b()));
    assert!(
        Seed::ping(&vm1, "172.16.101.3", 3),
        "vm1 → vm3 over macvlans"
    );
    assert_eq!((fwd(&ids.dev_a()) - a0, fwd(&ids.dev_b()) - b0), (3, 3));
    let (n, same) = tcp_transfer(&vm1, &vm3, "172.16.101.3", 4 << 20);
    assert!(n == 4 << 20 && same, "TCP over macvlans");
}

/// A router namespace deleted without destroy (an operator's `ip netns del`): the daemon lets
/// go of it, so that it really goes (the instances' veths lose their other end), `show`
/// reports the router LOST and why, its pinned objects are removed, and the next apply starts
/// clean (no stale-link warnings, counters from zero) and forwards again. A device deleted
/// from a live router makes it DEGRADED, naming the device.
#[test]
fn a_deleted_namespace_is_released_and_the_next_apply_starts_clean() {
    require_root();
    let _turn = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Seed::up("");
    s.prime_neighbours();
    assert!(Seed::ping(&s.vm1, "172.16.101.3", 2));
    let id = s.ids.router_id.clone();
    let status = || ctl_json(&["show", &id])[0]["status"].clone();
    assert_eq!(status(), "ACTIVE");
    // A device gone from a live router.
    sh(&format!("ip -n {} link del {}", s.ns(), s.ids.dev_b()));
    assert_eq!(status(), "DEGRADED");
    let show = ctl_json(&["show", &s.ids.router_id]);
    assert!(
        show[0]["problems"].to_string().contains(&s.ids.dev_b()),
        "{show}"
    );
    // The namespace deleted: released (vm1's veth goes with its other end), reported, cleaned.
    sh(&format!("ip netns del {}", s.ns()));
    wait_for("the daemon kept the deleted namespace alive", &|| {
        !sh_out(&format!("ip -n {} link show {}", s.vm1, s.ids.tap_a()))
            .status
            .success()
    });
    assert_eq!(status(), "LOST");
    let pins = format!("/sys/fs/bpf/router-xdp/v1/{}", s.ids.router_id);
    wait_for("the lost router's pins stayed", &|| {
        !std::path::Path::new(&pins).exists()
    });
    let out = ctl(&["stats", &s.ids.router_id]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("was deleted"),
        "stats of a lost router: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plugged again by the agents, applied again: a clean start that forwards.
    sh(&format!("ip netns add {}", s.ns()));
    for (vm, dev, tap, addr, gw) in [
        (
            &s.vm1,
            s.ids.dev_a(),
            s.ids.tap_a(),
            "172.16.100.3/24",
            "172.16.100.1",
        ),
        (
            &s.vm3,
            s.ids.dev_b(),
            s.ids.tap_b(),
            "172.16.101.3/24",
            "172.16.101.1",
        ),
    ] {
        let _ = sh_out(&format!("ip -n {vm} link del {tap}"));
        sh(&format!(
            "ip -n {ns} link add {dev} type veth peer name {tap} netns {vm} && ip -n {vm} link set {tap} up && \
             ip -n {vm} addr add {addr} dev {tap} && ip -n {vm} route replace default via {gw}",
            ns = s.ns()
        ));
    }
    let text = s.ids.config("");
    let err = s.apply(&text);
    assert!(!err.contains("WARN") && !err.contains("stale"), "{err}");
    assert_eq!(status(), "ACTIVE");
    for d in s.stats() {
        assert_eq!(d["forwarded"]["packets"], 0, "counters carried over: {d}");
    }
    s.prime_neighbours();
    s.set_forwarding(false);
    let before = s.fast_path();
    assert!(Seed::ping(&s.vm1, "172.16.101.3", 3));
    s.assert_fast_path(&before, &[(&s.ids.dev_a(), 3, 0), (&s.ids.dev_b(), 3, 0)]);
}

/// `router-ctl -j route batch ROUTER FILE` with `text` in a file of its own (named by `tag`).
fn route_batch(router: &str, tag: &str, text: &str) -> std::process::Output {
    let path = format!("/tmp/batch-{tag}");
    std::fs::write(&path, text).unwrap();
    let out = ctl(&["-j", "route", "batch", router, &path]);
    let _ = std::fs::remove_file(&path);
    out
}

/// Dynamic IPv6 routes end to end: a batch adds a /64 behind vm3 that only the batch routes; with
/// the kernel's IPv6 forwarding off, vm1 reaches it through the fast path; the route is in the
/// kernel's table too; deleting it takes it out of both.
#[test]
fn an_ipv6_route_batch_reaches_the_kernel_and_the_fast_path() {
    require_root();
    let s = Seed::up_dual("");
    s.prime_neighbours6();
    sh(&format!(
        "ip -n {} addr add 2001:db8:99::1/128 dev lo",
        s.vm3
    ));
    let (router, tag) = (s.ids.router_id.clone(), s.ids.tag.clone());
    let batch = |name: &str, text: &str| {
        let out = route_batch(&router, &format!("6-{tag}-{name}"), text);
        assert!(
            out.status.success(),
            "{text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let kernel = || sh(&format!("ip -n {} -6 route show 2001:db8:99::/64", s.ns()));
    let v = batch(
        "add",
        "add 2001:db8:99::/64 via 2001:db8:101::3\nadd 2001:db8:98::/64 via 2001:db8:101::3\n",
    );
    assert_eq!(v["set"], 2, "{v}");
    assert!(kernel().contains("via 2001:db8:101::3"), "{}", kernel());
    s.set_forwarding6(false);
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "2001:db8:99::1", 3),
        "vm1 → 2001:db8:99::1 through the batch's IPv6 route, kernel forwarding off"
    );
    s.assert_fast_path(&before, &[(&a, 0, 3), (&b, 0, 3)]);
    let v = batch("del", "del 2001:db8:99::/64\n");
    assert_eq!(v["deleted"], 1, "{v}");
    assert_eq!(kernel().trim(), "");
    // Gone from the fast path too: with the kernel forwarding again, it answers unreachable
    // and nothing is forwarded by the fast path.
    s.set_forwarding6(true);
    let before = s.fast_path();
    assert!(!Seed::ping(&s.vm1, "2001:db8:99::1", 1));
    s.assert_fast_path(&before, &[(&a, 0, 0), (&b, 0, 0)]);
    // The other route of the batch stayed.
    assert!(sh(&format!("ip -n {} -6 route show 2001:db8:98::/64", s.ns())).contains("via"));
}

/// Dynamic routes: a batch of 5 000 routes (enough for the daemon to keep the table in memory)
/// reaches the kernel and the fast path; single-route batches then replace a nexthop and delete
/// a route, changing only those; a bad batch changes nothing; apply keeps the dynamic routes.
#[test]
fn route_batches_change_the_kernel_and_the_fast_path_route_by_route() {
    require_root();
    let mut s = Seed::applied("");
    s.plug(&s.vm1, &s.ids.tap_a(), "172.16.100.3/24", "172.16.100.1");
    let (nh1, nh2) = (format!("nh1-{}", s.ids.tag), format!("nh2-{}", s.ids.tag));
    bridge_vlan101(
        &mut s,
        &[(&nh1, "172.16.101.254/24"), (&nh2, "172.16.101.253/24")],
    );
    sh(&format!("ip -n {nh2} addr add 10.20.0.1/32 dev lo"));
    assert!(Seed::ping(&s.vm1, "172.16.100.1", 1));
    assert!(Seed::ping(&nh1, "172.16.101.1", 1) && Seed::ping(&nh2, "172.16.101.1", 1));
    s.wait_neigh("172.16.101.254");
    s.wait_neigh("172.16.101.253");
    let (router, test_tag) = (s.ids.router_id.clone(), s.ids.tag.clone());
    let batch = |tag: &str, text: &str| route_batch(&router, &format!("{test_tag}-{tag}"), text);
    let mut bulk = String::from("# a routing daemon's table\nadd 10.10.0.0/16 via 172.16.101.254\nadd 10.20.0.0/16 via 172.16.101.254\n");
    for i in 0..5000u32 {
        bulk += &format!(
            "add 10.{}.{}.0/24 via 172.16.101.254\n",
            30 + i / 256,
            i % 256
        );
    }
    let out = batch("bulk", &bulk);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["set"], 5002);
    assert!(v["prefixes"].as_u64().unwrap() > 5002, "{v}");
    let router_ns = s.ns();
    let kernel = |dest: &str| sh(&format!("ip -n {router_ns} route show {dest}"));
    assert!(kernel("10.10.0.0/16").contains("via 172.16.101.254"));
    assert!(kernel("10.49.135.0/24").contains("via 172.16.101.254"));

    // Only the fast path carries it.
    s.set_forwarding(false);
    let (a, b) = (s.ids.dev_a(), s.ids.dev_b());
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "10.10.0.1", 3),
        "vm1 → 10.10.0.1 via the batch's route"
    );
    s.assert_fast_path(&before, &[(&a, 3, 0), (&b, 3, 0)]);
    // 10.20.0.1 lives behind nh2 only: through nh1 it is lost until the route moves.
    assert!(!Seed::ping(&s.vm1, "10.20.0.1", 1));
    let out = batch("move", "replace 10.20.0.0/16 via 172.16.101.253\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "10.20.0.1", 3),
        "the replaced route's new nexthop"
    );
    s.assert_fast_path(&before, &[(&a, 3, 0), (&b, 3, 0)]);
    assert!(kernel("10.20.0.0/16").contains("via 172.16.101.253"));

    // Another process (apply, no daemon involved) rewrites the maps with an extra route inside
    // a dynamic /24; the daemon's next batch must start from what the maps hold now, not from
    // the table it kept: deleting the /24 leaves the extra /25 in the fast path.
    sh(&format!("ip -n {nh2} addr add 10.30.0.200/32 dev lo"));
    let extra =
        "[[router.route]]\ndestination = \"10.30.0.128/25\"\nnexthop = \"172.16.101.253\"\n";
    let text = s.ids.config(extra);
    s.apply(&text);
    let out = batch("under", "del 10.30.0.0/24\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "10.30.0.200", 2),
        "the extra route written by another process was lost by the daemon's batch"
    );
    s.assert_fast_path(&before, &[(&a, 2, 0), (&b, 2, 0)]);

    // A bad batch is refused whole, naming the line; nothing of it is applied.
    let kernel_before = sh(&format!("ip -n {} route show", s.ns()));
    for (text, says) in [
        (
            "del 10.10.0.0/16\nadd 10.11.0.0/16 via 192.0.2.1\n",
            "192.0.2.1",
        ),
        (
            "del 10.10.0.0/16\nadd 10.11.0.1/16 via 172.16.101.254\n",
            "line 2",
        ),
        ("del 10.10.0.0/16\ndel 10.99.0.0/16\n", "10.99.0.0/16"),
        (
            "add 172.16.100.0/24 via 172.16.101.254\n",
            "one of its own routes",
        ),
        ("add 172.16.101.1/32 via 172.16.101.254\n", "own addresses"),
    ] {
        let out = batch("bad", text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{text}: {err}");
    }
    assert_eq!(sh(&format!("ip -n {} route show", s.ns())), kernel_before);
    assert!(
        Seed::ping(&s.vm1, "10.10.0.1", 1),
        "a refused batch removed a route"
    );

    // Delete: gone from both (the kernel answers unreachable, nothing is forwarded).
    let out = batch("del", "del 10.10.0.0/16\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kernel("10.10.0.0/16").trim(), "");
    s.set_forwarding(true);
    let before = s.fast_path();
    assert!(!Seed::ping(&s.vm1, "10.10.0.1", 1));
    s.assert_fast_path(&before, &[(&a, 0, 0), (&b, 0, 0)]);
    s.set_forwarding(false);

    // Re-applying the definition keeps the dynamic routes (from the router's journal).
    let text = s.ids.config("");
    s.apply(&text);
    let before = s.fast_path();
    assert!(
        Seed::ping(&s.vm1, "10.20.0.1", 2),
        "dynamic route lost by apply"
    );
    s.assert_fast_path(&before, &[(&a, 2, 0), (&b, 2, 0)]);
}

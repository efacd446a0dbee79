//! The operator's devices outlive every failure of ours: what apply adopted is given back.

use tests::{
    ctl, require_root, sh, sh_out,
    topo::{unique_tag, write_config, Ids},
};

/// `ip -j link show DEV` in namespace `ns` (None: this one): the device's kind, if it is there.
fn kind(ns: Option<&str>, dev: &str) -> Option<String> {
    let n = ns.map(|n| format!("-n {n} ")).unwrap_or_default();
    let out = sh_out(&format!("ip {n}-j -d link show {dev}"));
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v[0]["linkinfo"]["info_kind"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

/// Commands run when a test ends, however it ends (its clean-up).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = sh_out(c);
        }
    }
}

/// A `[[router]]` header for `ids`.
fn head(ids: &Ids) -> String {
    format!(
        "[[router]]\nid = \"{}\"\nname = \"{}\"\n",
        ids.router_id, ids.name
    )
}

/// A port on 172.16.NET.0/24 (gateway .1), with `extra` lines (a hook).
fn iface(port: &str, net: u32, extra: &str) -> String {
    format!(
        "[[router.interface]]\nport_id = \"{port}\"\nsubnet = \"172.16.{net}.0/24\"\ngateway_ip = \"172.16.{net}.1\"\n{extra}\n"
    )
}

/// Devices an L2 agent left in this namespace for a router's ports are moved into the namespace
/// apply creates: a veth whose other end is in an instance's namespace, then a bridge, which
/// the kernel refuses to move (a bridge stays in the namespace that made it), so the first
/// apply fails after the veth moved: it rolls back and gives the veth back, whole, and the
/// bridge stays; a good apply followed by destroy does the same for the veth. Before this, the rollback and destroy deleted the namespace with the devices in
/// it, and the kernel destroyed them.
#[test]
fn a_failed_first_apply_and_a_destroy_give_adopted_devices_back() {
    require_root();
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    let (a, b, ns) = (ids.dev_a(), ids.dev_b(), ids.ns());
    let vm = format!("vm-{tag}");
    let _c = Cleanup(vec![
        format!("ip link del {a}"),
        format!("ip link del {b}"),
        format!("ip netns del {vm}"),
        format!("ip netns del {ns}"),
    ]);
    sh(&format!(
        "ip netns add {vm} && ip link add {a} type veth peer name eth0 netns {vm} && ip link add {b} type bridge"
    ));
    let head = head(&ids);
    let bad = write_config(
        &format!("{tag}-bad"),
        &format!(
            "{head}{}{}",
            iface(&ids.port_a, 100, ""),
            iface(&ids.port_b, 101, "hook = \"xdp\"")
        ),
    );
    let out = ctl(&["apply", "-f", &bad]);
    assert!(
        !out.status.success(),
        "a bridge was moved into a router's namespace"
    );
    assert!(
        !std::path::Path::new(&format!("/run/netns/{ns}")).exists(),
        "the failed apply left its namespace"
    );
    assert_eq!(kind(None, &a).as_deref(), Some("veth"), "the veth is gone");
    assert_eq!(
        kind(None, &b).as_deref(),
        Some("bridge"),
        "the bridge is gone"
    );
    assert_eq!(
        kind(Some(&vm), "eth0").as_deref(),
        Some("veth"),
        "the instance lost its end of the veth"
    );

    let good = write_config(
        &format!("{tag}-good"),
        &format!("{head}{}", iface(&ids.port_a, 100, "")),
    );
    let out = ctl(&["apply", "-f", &good]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kind(Some(&ns), &a).as_deref(), Some("veth"));
    assert_eq!(kind(None, &a), None, "the device was not moved in");
    let out = ctl(&["destroy", &ids.router_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
    assert_eq!(
        kind(None, &a).as_deref(),
        Some("veth"),
        "destroy took the adopted veth with its namespace"
    );
    assert_eq!(kind(Some(&vm), "eth0").as_deref(), Some("veth"));
    let _ = std::fs::remove_file(&bad);
    let _ = std::fs::remove_file(&good);
}

/// One apply of several routers: each is applied whole or rolled back whole, and a failure of
/// one leaves the others applied. Routers A and B are applied; then one apply changes A (a
/// second subnet) and B (a port on a bridge the operator left here, which the kernel will not
/// move into B's namespace). B fails and goes back to what it was: its namespace, its first port and its
/// state as before, the bridge back in this namespace; A's change is applied; the error names B
/// and says A was applied.
#[test]
fn a_failing_router_rolls_back_alone_in_a_multi_router_apply() {
    require_root();
    let (ta, tb) = (unique_tag(), unique_tag());
    let (ra, rb) = (Ids::new(&ta), Ids::new(&tb));
    let bridge = rb.dev_b();
    let _c = Cleanup(vec![
        format!("{} destroy {}", tests::router_ctl(), ra.router_id),
        format!("{} destroy {}", tests::router_ctl(), rb.router_id),
        format!("ip link del {bridge}"),
    ]);
    sh(&format!("ip link add {bridge} type bridge"));
    let first = write_config(
        &format!("{ta}-first"),
        &format!(
            "{}{}{}{}",
            head(&ra),
            iface(&ra.port_a, 100, ""),
            head(&rb),
            iface(&rb.port_a, 100, "")
        ),
    );
    let out = ctl(&["apply", "-f", &first]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state_b = |ids: &Ids| {
        std::fs::read_to_string(format!("/run/router-xdp/routers/{}.json", ids.router_id))
            .unwrap_or_default()
    };
    let b_before = state_b(&rb);
    assert!(!b_before.is_empty(), "no state file for B");
    let second = write_config(
        &format!("{ta}-second"),
        &format!(
            "{}{}{}{}{}{}",
            head(&ra),
            iface(&ra.port_a, 100, ""),
            iface(&ra.port_b, 101, ""),
            head(&rb),
            iface(&rb.port_a, 100, ""),
            iface(&rb.port_b, 101, "hook = \"xdp\"")
        ),
    );
    let out = ctl(&["apply", "-f", &second]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a bridge was moved into a router's namespace"
    );
    assert!(
        err.contains(&rb.router_id) && err.contains("rolled back"),
        "the error names the failed router: {err}"
    );
    assert!(
        err.contains("1 other router(s) were applied") && err.contains(&ra.name),
        "the error says which router was applied: {err}"
    );
    // B as it was.
    assert!(
        std::path::Path::new(&format!("/run/netns/{}", rb.ns())).exists(),
        "B's namespace went with its failed re-apply"
    );
    assert_eq!(
        kind(Some(&rb.ns()), &rb.dev_a()).as_deref(),
        Some("veth"),
        "B lost its first port"
    );
    assert_eq!(
        kind(None, &bridge).as_deref(),
        Some("bridge"),
        "the operator's bridge was not given back"
    );
    assert_eq!(
        state_b(&rb),
        b_before,
        "B's state changed with a failed apply"
    );
    let show = tests::ctl_json(&["show", &rb.router_id]);
    assert_eq!(
        show[0]["interfaces"].as_array().map(Vec::len),
        Some(1),
        "{show}"
    );
    assert!(
        show[0]["interfaces"][0]["prog_id"].as_u64().is_some(),
        "{show}"
    );
    // A with its change.
    let show = tests::ctl_json(&["show", &ra.router_id]);
    assert_eq!(
        show[0]["interfaces"].as_array().map(Vec::len),
        Some(2),
        "{show}"
    );
    assert_eq!(kind(Some(&ra.ns()), &ra.dev_b()).as_deref(), Some("veth"));
    let _ = std::fs::remove_file(&first);
    let _ = std::fs::remove_file(&second);
}

/// An apply killed (SIGKILL) at each of its steps in turn, then destroyed or applied again and
/// destroyed: every time, what was there before is there again, as it was — the devices an L2
/// agent plugged (veths whose other ends are an instance's; their MAC, MTU, state and an
/// address one of them had), and nothing of the router's (namespace, created veths, pins). The steps are
/// recorded before they are made (`apply::undo`), so whatever moment the kill comes at, the
/// next apply or destroy knows what to take back.
#[test]
fn an_apply_killed_at_any_step_is_rolled_back_by_the_next_destroy_or_apply() {
    use std::os::unix::process::ExitStatusExt as _;
    require_root();
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    let (a, b, ns) = (ids.dev_a(), ids.dev_b(), ids.ns());
    let vm = format!("vm-{tag}");
    let created_peers = [router_ctl::config::peer_of(&ids.port_g)];
    let _c = Cleanup(vec![
        format!("{} destroy {}", tests::router_ctl(), ids.router_id),
        format!("ip link del {a}"),
        format!("ip link del {b}"),
        format!("ip link del {}", created_peers[0]),
        format!("ip netns del {vm}"),
        format!("ip netns del {ns}"),
    ]);
    sh(&format!(
        "ip netns add {vm} && ip link add {a} type veth peer name eth0 netns {vm} && ip link set {a} mtu 1400 address 02:aa:00:00:00:01 && ip link add {b} type veth peer name eth1 netns {vm} && ip link set {b} address 02:bb:00:00:00:01 && ip addr add 10.99.0.1/24 dev {b}"
    ));
    let text = format!(
        "[[router]]\nid = \"{}\"\nname = \"{}\"\n\
         [[router.interface]]\nport_id = \"{}\"\nsubnet = \"172.16.100.0/24\"\ngateway_ip = \"172.16.100.1\"\n\
         [[router.interface]]\nport_id = \"{}\"\nsubnet = \"172.16.101.0/24\"\ngateway_ip = \"172.16.101.1\"\n\
         [router.external_gateway]\nport_id = \"{}\"\nnetwork_id = \"public\"\n\
         external_fixed_ips = [ {{ subnet = \"192.168.1.0/24\", ip_address = \"192.168.1.10\", gateway_ip = \"192.168.1.1\" }} ]\n",
        ids.router_id, ids.name, ids.port_a, ids.port_b, ids.port_g
    );
    let cfg = write_config(&format!("{tag}-kill"), &text);
    // What an operator sees of the devices and of the router.
    let snapshot = || -> String {
        let mut out = String::new();
        for d in [&a, &b] {
            let l = sh_out(&format!("ip -j -d link show {d}"));
            let v: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap_or_default();
            let l = &v[0];
            out += &format!(
                "{d}: kind={} mac={} mtu={} flags={} netns=here addrs={}\n",
                l["linkinfo"]["info_kind"],
                l["address"],
                l["mtu"],
                l["flags"],
                sh(&format!("ip -br addr show {d}"))
                    .split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        out += &format!(
            "vm's ends: {:?} {:?}\n",
            kind(Some(&vm), "eth0"),
            kind(Some(&vm), "eth1")
        );
        out += &format!("router namespace: {}\n", sh("ip netns list").contains(&ns));
        for p in &created_peers {
            out += &format!("{p}: {:?}\n", kind(None, p));
        }
        out += &format!(
            "pins: {}\n",
            std::path::Path::new(&format!("/sys/fs/bpf/router-xdp/v1/{}", ids.router_id)).exists()
        );
        out
    };
    let before = snapshot();
    let ctl_env = |kill: Option<u64>, args: &[&str]| {
        let mut c = std::process::Command::new(tests::router_ctl());
        if let Some(n) = kill {
            c.env("ROUTER_XDP_TEST_KILL_AT_STEP", n.to_string());
        }
        c.args(args).output().unwrap()
    };
    let mut n = 1;
    loop {
        let out = ctl_env(Some(n), &["apply", "--no-daemon", "-f", &cfg]);
        if out.status.success() {
            // Past the last step: the apply completed.
            assert!(n > 8, "only {n} steps recorded");
            let out = ctl(&["destroy", &ids.router_id]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(snapshot(), before, "after a complete apply and destroy");
            break;
        }
        assert_eq!(
            out.status.signal(),
            Some(9),
            "step {n}: the apply failed instead of being killed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let then = if n % 2 == 1 {
            let out = ctl(&["destroy", &ids.router_id]);
            assert!(
                out.status.success(),
                "destroy after a kill at step {n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            "destroy"
        } else {
            let out = ctl_env(None, &["apply", "--no-daemon", "-f", &cfg]);
            assert!(
                out.status.success(),
                "apply after a kill at step {n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = ctl(&["destroy", &ids.router_id]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            "apply and destroy"
        };
        assert_eq!(snapshot(), before, "killed at step {n}, then {then}");
        n += 1;
        assert!(n < 60, "no end to the steps");
    }
    eprintln!(
        "apply killed at each of {} steps, each time rolled back",
        n - 1
    );
    let _ = std::fs::remove_file(&cfg);
}

/// The seed's `qr-` ports as Neutron's OVS agent plugs them: internal ports of an Open vSwitch
/// bridge (a private `ovs-vswitchd`, userspace datapath: tap devices it holds open). A failed
/// first apply (a third port on a bridge the kernel will not move), an apply killed part-way
/// and a good apply followed by destroy each leave both ports where OVS made them, as they
/// were, and still OVS's (a valid OpenFlow port).
#[test]
fn open_vswitch_internal_ports_outlive_a_failed_apply_a_killed_apply_and_a_destroy() {
    use std::os::unix::process::ExitStatusExt as _;
    require_root();
    let tag = unique_tag();
    let ids = Ids::new(&tag);
    let (a, b, ns) = (ids.dev_a(), ids.dev_b(), ids.ns());
    // (A third port's device, named as apply names interface ports.)
    let stuck = format!("qr-{}", &ids.port_g[..11]);
    let ovs = tests::ovs::Ovs::start(&tag, &format!("bi{tag}"));
    let _c = Cleanup(vec![
        format!("{} destroy {}", tests::router_ctl(), ids.router_id),
        format!("ip link del {stuck}"),
        format!("ip netns del {ns}"),
    ]);
    ovs.add_internal_port(&a);
    ovs.add_internal_port(&b);
    sh(&format!("ip link add {stuck} type bridge"));
    let head = head(&ids);
    let good = write_config(
        &format!("{tag}-ovs-good"),
        &format!(
            "{head}{}{}",
            iface(&ids.port_a, 100, ""),
            iface(&ids.port_b, 101, "")
        ),
    );
    let bad = write_config(
        &format!("{tag}-ovs-bad"),
        &format!(
            "{head}{}{}{}",
            iface(&ids.port_a, 100, ""),
            iface(&ids.port_b, 101, ""),
            iface(&ids.port_g, 102, "")
        ),
    );
    let snapshot = || -> String {
        let mut out = String::new();
        for d in [&a, &b] {
            let l = sh_out(&format!("ip -j -d link show {d}"));
            let v: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap_or_default();
            out += &format!(
                "{d}: kind={} mac={} mtu={} ofport_ok={}\n",
                v[0]["linkinfo"]["info_kind"],
                v[0]["address"],
                v[0]["mtu"],
                ovs.ofport(d) > 0
            );
        }
        out += &format!(
            "ports: {}\n",
            ovs.vsctl(&format!("list-ports {}", ovs.bridge)).trim()
        );
        out += &format!("router namespace: {}\n", sh("ip netns list").contains(&ns));
        out
    };
    let before = snapshot();
    assert!(before.contains("kind=\"tun\""), "{before}");
    assert!(!before.contains("ofport_ok=false"), "{before}");

    let out = ctl(&["apply", "--no-daemon", "-f", &bad]);
    assert!(
        !out.status.success(),
        "a bridge was moved into the router's namespace"
    );
    assert_eq!(snapshot(), before, "after a failed first apply");

    let out = std::process::Command::new(tests::router_ctl())
        .env("ROUTER_XDP_TEST_KILL_AT_STEP", "5")
        .args(["apply", "--no-daemon", "-f", &good])
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["destroy", &ids.router_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        snapshot(),
        before,
        "after an apply killed at its 5th step, and destroy"
    );

    let out = ctl(&["apply", "--no-daemon", "-f", &good]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        kind(Some(&ns), &a).as_deref(),
        Some("tun"),
        "the internal port was adopted"
    );
    let out = ctl(&["destroy", &ids.router_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(), before, "after apply and destroy");
    let _ = std::fs::remove_file(&good);
    let _ = std::fs::remove_file(&bad);
}

/// The service unit shipped in `packaging/` is one systemd accepts (with this build's binary
/// in place of the installed path).
#[test]
fn the_service_unit_is_valid() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/router-ctl.service"
    ))
    .unwrap();
    let ctl = std::env::var("ROUTER_CTL").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/router-ctl").to_string()
    });
    let dir = std::env::temp_dir().join(format!("router-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router-ctl.service");
    std::fs::write(&path, unit.replace("/usr/local/sbin/router-ctl", &ctl)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd) is installed");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze: {text}"
    );
}

/// The Debian package (`cargo xtask package`; `cargo xtask test` builds it from this build and
/// names it in ROUTER_XDP_DEB): the binary, the service unit pointing at it, the definitions
/// file it applies (kept as a configuration file, and valid), a man page with every command,
/// and a version that is the binary's.
#[test]
fn the_package_holds_the_binary_unit_configuration_and_man_page() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let deb = std::env::var("ROUTER_XDP_DEB").unwrap_or_else(|_| {
        let out = std::process::Command::new("cargo")
            .args(["xtask", "package"])
            .current_dir(root)
            .output()
            .expect("cargo xtask package");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("the package's path")
            .to_string()
    });
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = run(&["dpkg-deb", "-c", &deb]);
    for (path, mode) in [
        ("./usr/sbin/router-ctl", "-rwxr-xr-x"),
        ("./lib/systemd/system/router-ctl.service", "-rw-r--r--"),
        ("./etc/router-xdp/routers.toml", "-rw-r--r--"),
        ("./usr/share/man/man8/router-ctl.8.gz", "-rw-r--r--"),
        ("./usr/share/doc/router-xdp/README.md", "-rw-r--r--"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.contains(" root/root ") && l.ends_with(path)),
            "{path} ({mode}, root's) not in the package:\n{listing}"
        );
    }
    let dir = std::env::temp_dir().join(format!("router-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    run(&["dpkg-deb", "-x", &deb, &d]);
    run(&["dpkg-deb", "-e", &deb, &format!("{d}/DEBIAN")]);
    let bin = format!("{d}/usr/sbin/router-ctl");
    let version = run(&[&bin, "--version"]);
    let control = std::fs::read_to_string(format!("{d}/DEBIAN/control")).unwrap();
    assert!(control.contains("Package: router-xdp\n"), "{control}");
    assert!(
        control.contains(&format!(
            "Version: {}\n",
            version.split_whitespace().nth(1).unwrap()
        )),
        "the package's version is not the binary's ({version}): {control}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{d}/DEBIAN/conffiles")).unwrap(),
        "/etc/router-xdp/routers.toml\n"
    );
    // The definitions file the unit applies is valid as shipped.
    run(&[
        &bin,
        "validate",
        "-f",
        &format!("{d}/etc/router-xdp/routers.toml"),
    ]);
    // The unit runs the packaged binary on that file, and systemd accepts it.
    let unit_path = format!("{d}/lib/systemd/system/router-ctl.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/sbin/router-ctl run -f /etc/router-xdp/routers.toml\n"),
        "{unit}"
    );
    std::fs::write(&unit_path, unit.replace("/usr/sbin/router-ctl", &bin)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", &unit_path])
        .output()
        .expect("systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze: {text}"
    );
    // The man page names every command the binary's help lists.
    let man = run(&[
        "sh",
        "-c",
        &format!("zcat {d}/usr/share/man/man8/router-ctl.8.gz"),
    ]);
    assert!(man.starts_with(".TH ROUTER-CTL 8"), "{man}");
    let help = run(&[&bin, "--help"]);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 10, "{help}");
    for c in commands {
        assert!(
            man.contains(&format!(".SS router-ctl {c}\n")),
            "the man page lacks {c}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `run --api-group GID`: members of the group change routers through the daemon's socket as
/// root does; a user outside it is refused, and nothing changes.
#[test]
fn members_of_the_api_group_change_routers_through_the_daemon_and_others_cannot() {
    // A daemon of its own, with its own run directory (not under the default one, which is
    // root's alone), pins and namespace prefix.
    let tag = format!("g{}", std::process::id() % 1_000_000);
    let run_dir = format!("/run/router-xdp-{tag}");
    let env = [
        ("ROUTER_XDP_RUN_DIR", run_dir.clone()),
        (
            "ROUTER_XDP_BPF_DIR",
            format!("/sys/fs/bpf/router-xdp/instances/{tag}/v1"),
        ),
        ("ROUTER_XDP_NS_PREFIX", format!("qrouter-{tag}-")),
    ];
    let ctl = tests::router_ctl();
    let mut daemon = std::process::Command::new(&ctl)
        .envs(env.clone())
        .args(["run", "--stay", "--api-group", "4242"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the daemon");
    let sock = std::path::PathBuf::from(format!("{run_dir}/ctl.sock"));
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "no API socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let as_user = |gid: u32, args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ])
            .arg(&ctl)
            .envs(env.clone())
            .args(args)
            .output()
            .expect("setpriv")
    };
    let id = "6a0e2b4c-0d3f-4f7e-9a51-2c8d7e6f5a40";
    let state = std::path::PathBuf::from(format!("{run_dir}/routers/{id}.json"));
    let created = as_user(4242, &["router", "create", "api-group-test", "--id", id]);
    let refused = as_user(4343, &["router", "delete", id]);
    let kept = state.exists();
    // Root tears down whatever happened.
    let _ = std::process::Command::new(&ctl)
        .envs(env.clone())
        .args(["router", "delete", id])
        .output();
    // SAFETY: plain kill(2) of the daemon this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/router-xdp/instances/{tag}"));
    assert!(
        created.status.success(),
        "a member of the API group could not create a router: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(
        !refused.status.success(),
        "a user outside the API group deleted a router"
    );
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("permission denied") && why.contains("API group"),
        "{why}"
    );
    assert!(kept, "the refused delete removed the router");
}

//! Churn: 1 000 000 frames over 1 000 flows through the router's real program and live maps
//! (BPF_PROG_TEST_RUN in the router's namespace, ingress qr-a) while the kernel's neighbours
//! are deleted and added 100 times a second (the daemon following them) and the routes of the
//! flows move between two nexthops. Every frame must be forwarded to one of its flow's two
//! nexthops, out of qr-b, byte-exact, or handed to the kernel unchanged: never to another MAC.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use router_ctl::{apply, datapath, fib::Capacity, state::RouterState, sys};
use tests::{
    corpus::{ipv4_frame, VM1_4},
    ctl_json,
    frame::{checksum, udp, Ipv4},
    require_root, sh,
    topo::Seed,
};

const FLOWS: usize = 1000;
const NEXTHOPS: usize = 32;
const FRAMES: usize = 1_000_000;

fn flow_net(i: usize) -> [u8; 3] {
    [10, 100 + (i / 256) as u8, (i % 256) as u8]
}
fn nexthop(k: usize) -> [u8; 4] {
    [172, 16, 101, 10 + k as u8]
}
fn nh_mac(k: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x65, 10 + k as u8]
}
/// The flow's two nexthops (indexes): where its route starts and where churn moves it.
fn pair(i: usize) -> [usize; 2] {
    [i % NEXTHOPS, (i + NEXTHOPS / 2) % NEXTHOPS]
}
fn fmt_ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

#[test]
fn frames_reach_their_nexthops_or_the_kernel_under_churn() {
    require_root();
    let routes: String = (0..FLOWS)
        .map(|i| {
            let n = flow_net(i);
            format!(
                "[[router.route]]\ndestination = \"{}.{}.{}.0/24\"\nnexthop = \"{}\"\n",
                n[0],
                n[1],
                n[2],
                fmt_ip(nexthop(pair(i)[0]))
            )
        })
        .collect();
    let mut s = Seed::up(&routes);
    let (ns, dev_a, dev_b) = (s.ns(), s.ids.dev_a(), s.ids.dev_b());
    for k in 0..NEXTHOPS {
        sh(&format!(
            "ip -n {ns} neigh replace {} lladdr {} dev {dev_b} nud permanent",
            fmt_ip(nexthop(k)),
            sys::fmt_mac(&nh_mac(k))
        ));
    }
    s.wait_neigh(&fmt_ip(nexthop(NEXTHOPS - 1)));
    let st = RouterState::load(&s.ids.router_id).unwrap().unwrap();
    let qr_a = router_ctl::sys::parse_mac(&st.interfaces[0].mac).unwrap();
    let qr_b = router_ctl::sys::parse_mac(&st.interfaces[1].mac).unwrap();
    let ifindex_a = st.interfaces[0].ifindex;

    let stop = Arc::new(AtomicBool::new(false));
    // Neighbour churn, 100 changes a second: a nexthop's entry deleted, then added back with
    // its MAC; and unrelated neighbours coming and going.
    let churn = {
        let (stop, ns, dev_b) = (stop.clone(), ns.clone(), dev_b.clone());
        std::thread::spawn(move || {
            let mut ip = Command::new("ip")
                .args(["-n", &ns, "-batch", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut w = ip.stdin.take().unwrap();
            let mut n = 0usize;
            let t0 = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                // Each step of four: delete a nexthop, add it back, add an unrelated neighbour,
                // delete it; every command acts on an entry in the state it expects.
                let k = (n / 4 * 7) % NEXTHOPS;
                let other = 100 + (n / 4) % 100;
                let line = match n % 4 {
                    0 => format!("neigh del {} dev {dev_b}\n", fmt_ip(nexthop(k))),
                    1 => format!(
                        "neigh replace {} lladdr {} dev {dev_b} nud permanent\n",
                        fmt_ip(nexthop(k)),
                        sys::fmt_mac(&nh_mac(k))
                    ),
                    2 => format!(
                        "neigh replace 172.16.101.{other} lladdr 02:00:00:00:99:{other:02x} dev {dev_b} nud reachable\n"
                    ),
                    _ => format!("neigh del 172.16.101.{other} dev {dev_b}\n"),
                };
                w.write_all(line.as_bytes()).unwrap();
                w.flush().unwrap();
                n += 1;
                let next = t0 + Duration::from_millis(10 * n as u64);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            // Leave every nexthop in place.
            for k in 0..NEXTHOPS {
                let _ = writeln!(
                    w,
                    "neigh replace {} lladdr {} dev {dev_b} nud permanent",
                    fmt_ip(nexthop(k)),
                    sys::fmt_mac(&nh_mac(k))
                );
            }
            drop(w);
            ip.wait().unwrap();
            n as f64 / t0.elapsed().as_secs_f64()
        })
    };
    // Route churn: the flows' routes move between their two nexthops, a tenth of them at a time.
    let routes_thread = {
        let (stop, ns, id) = (stop.clone(), ns.clone(), s.ids.router_id.clone());
        let st = st.clone();
        std::thread::spawn(move || {
            let tables: Vec<_> = (0..4)
                .map(|round| {
                    let mut moved = st.clone();
                    for (i, r) in moved.routes.iter_mut().enumerate() {
                        if (i / 100) % 4 == round || (i + round) % 3 == 0 {
                            r.nexthop = fmt_ip(nexthop(pair(i)[1]));
                        }
                    }
                    apply::tables_of(&moved).unwrap().1
                })
                .collect();
            sys::in_netns(&ns, move || {
                let mut ebpf = datapath::load_pinned(&id, Capacity::default())?;
                let mut table = datapath::RouteTable::open(&mut ebpf)?;
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    table.set(&tables[n % tables.len()])?;
                    n += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(n)
            })
            .unwrap()
        })
    };

    // The frames, from the router's namespace, through its real program and pinned maps.
    let id = s.ids.router_id.clone();
    let result = sys::in_netns(&ns, move || {
        let mut ebpf = datapath::load_pinned(&id, Capacity::default())?;
        let prog = datapath::program(&mut ebpf)?;
        let frames: Vec<Vec<u8>> = (0..FLOWS)
            .map(|i| {
                let n = flow_net(i);
                let mut ip = Ipv4::udp(VM1_4, [n[0], n[1], n[2], 7], 64);
                ip.id = i as u16;
                ipv4_frame(
                    qr_a,
                    [0x02, 0, 0, 0, 0x64, 3],
                    &ip,
                    &udp(1000 + i as u16, 53, &[i as u8; 18]),
                )
            })
            .collect();
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&ifindex_a.to_ne_bytes());
        let (mut fwd, mut passed) = (0usize, 0usize);
        let mut out = vec![0u8; 256];
        for n in 0..FRAMES {
            let i = (n * 7919) % FLOWS;
            let f = &frames[i];
            ctx[4..8].copy_from_slice(&(f.len() as u32).to_ne_bytes());
            let r = prog.test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })?;
            let o = &out[..r.data_size_out as usize];
            match r.return_value {
                4 => {
                    fwd += 1;
                    let m: [u8; 6] = o[0..6].try_into().unwrap();
                    anyhow::ensure!(
                        pair(i).iter().any(|k| nh_mac(*k) == m),
                        "frame {n} (flow {i}) went to {} instead of {} or {}",
                        sys::fmt_mac(&m),
                        sys::fmt_mac(&nh_mac(pair(i)[0])),
                        sys::fmt_mac(&nh_mac(pair(i)[1]))
                    );
                    anyhow::ensure!(o[6..12] == qr_b, "frame {n}: not out of qr-b");
                    anyhow::ensure!(
                        o[22] == 63 && checksum(&o[14..34]) == 0,
                        "frame {n}: TTL/checksum"
                    );
                    anyhow::ensure!(
                        o.len() == f.len()
                            && o[12..22] == f[12..22]
                            && o[23] == f[23]
                            && o[26..] == f[26..],
                        "frame {n}: changed beyond MACs, TTL, checksum"
                    );
                }
                2 => {
                    passed += 1;
                    anyhow::ensure!(o == &f[..], "frame {n}: passed frame changed");
                }
                rc => anyhow::bail!("frame {n}: action {rc}"),
            }
        }
        Ok((fwd, passed))
    });
    stop.store(true, Ordering::SeqCst);
    let rate = churn.join().unwrap();
    let route_changes = routes_thread.join().unwrap();
    let (fwd, passed) = result.unwrap();
    s.injected_a = FRAMES as u64;
    eprintln!(
        "churn: {FRAMES} frames over {FLOWS} flows: {fwd} forwarded, {passed} to the kernel; {rate:.0} neighbour changes/s, {route_changes} route table changes"
    );
    assert_eq!(fwd + passed, FRAMES);
    assert!(rate >= 90.0, "neighbour churn ran at {rate:.0}/s");
    assert!(route_changes >= 10, "{route_changes} route table changes");
    assert!(fwd > FRAMES / 2, "too little forwarded: {fwd}");
    // Afterwards the fast path's neighbours are the kernel's again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let ours: Vec<String> = ctl_json(&["neigh", &s.ids.router_id])
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["device"] == dev_b.as_str() && n["dst"].as_str().unwrap().contains('.'))
            .map(|n| {
                format!(
                    "{} {}",
                    n["dst"].as_str().unwrap(),
                    n["lladdr"].as_str().unwrap()
                )
            })
            .collect();
        let kernel: Vec<String> = serde_json::from_str::<serde_json::Value>(&sh(&format!(
            "ip -n {ns} -j neigh show dev {dev_b}"
        )))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        // The IPv4 entries the daemon treats as usable (IPv6 ones here are the kernel's own
        // multicast and link-local entries, which the fast path never uses).
        .filter(|n| {
            n.get("lladdr").is_some()
                && n["dst"].as_str().is_some_and(|d| d.contains('.'))
                && !n["state"]
                    .as_array()
                    .is_some_and(|st| st.iter().any(|x| x == "FAILED" || x == "INCOMPLETE"))
        })
        .map(|n| {
            format!(
                "{} {}",
                n["dst"].as_str().unwrap(),
                n["lladdr"].as_str().unwrap()
            )
        })
        .collect();
        let (mut a, mut b) = (ours.clone(), kernel.clone());
        a.sort();
        b.sort();
        if a == b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fast path neighbours {a:?} ≠ kernel's {b:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = dev_a;
}

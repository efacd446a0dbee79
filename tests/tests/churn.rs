//! Churn: 1 000 000 frames over 1 000 flows through the router's real program and live maps
//! (BPF_PROG_TEST_RUN in the router's namespace, ingress qr-a) while the kernel's neighbours
//! change 100 times a second (the daemon following them) and the routes of the flows move
//! between two nexthops.
//!
//! Every nexthop's MAC changes each time its entry is touched (a new "generation"), so that an
//! entry the fast path failed to update is caught: a frame must carry one of its flow's two
//! nexthops' MACs, of the current generation or the one before (the daemon may be a moment
//! behind the kernel). Frames may be handed to the kernel only for want of a neighbour, never for
//! want of a route (a route change must never be seen half-written).
//!
//! BPF_PROG_TEST_RUN does not transmit, so a share of the frames is also sent for real, from
//! vm1 into qr-a (skbs through the tc hook the router picks for veths at kernel defaults): vm3,
//! behind qr-b, must receive exactly the ones the fast path forwarded, and vm1 none of them.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use router_common::{map_names, pass_reason as why, Stats};
use router_ctl::{apply, config, datapath, fib::Capacity, kernel::netns, state::RouterState};
use tests::{
    corpus::{ipv4_frame, VM1_4},
    ctl_json,
    frame::{checksum, udp, Ipv4},
    require_root, sh,
    topo::{in_ns, packet_socket, Recorder, Seed},
};

const FLOWS: usize = 1000;
const NEXTHOPS: usize = 32;
const FRAMES: usize = 1_000_000;
/// Every this many frames, one is sent live.
const LIVE_EVERY: usize = 50;

fn flow_net(i: usize) -> [u8; 3] {
    [10, 100 + (i / 256) as u8, (i % 256) as u8]
}
fn nexthop(k: usize) -> [u8; 4] {
    [172, 16, 101, 10 + k as u8]
}
/// Nexthop `k`'s MAC in generation `g`.
fn nh_mac(k: usize, g: u32) -> [u8; 6] {
    [
        0x02,
        (g >> 16) as u8,
        (g >> 8) as u8,
        g as u8,
        0x65,
        10 + k as u8,
    ]
}
/// (nexthop, generation) of a MAC made by `nh_mac`.
fn of_mac(m: &[u8]) -> Option<(usize, u32)> {
    (m[0] == 0x02 && m[4] == 0x65 && (10..10 + NEXTHOPS as u8).contains(&m[5])).then(|| {
        (
            (m[5] - 10) as usize,
            u32::from_be_bytes([0, m[1], m[2], m[3]]),
        )
    })
}
/// The flow's two nexthops (indexes): where its route starts and where churn moves it.
fn pair(i: usize) -> [usize; 2] {
    [i % NEXTHOPS, (i + NEXTHOPS / 2) % NEXTHOPS]
}
fn fmt_ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}
/// The flow a frame to 10.100-103.x.7 belongs to.
fn flow_of(f: &[u8]) -> Option<usize> {
    (f.len() >= 34 && f[12..14] == [8, 0] && f[26..30] == VM1_4 && f[30] == 10 && f[33] == 7)
        .then(|| (f[31] as usize - 100) * 256 + f[32] as usize)
        .filter(|i| *i < FLOWS)
}

/// A forwarded frame's MAC is acceptable for flow `i`: one of its nexthops, of the current
/// generation or the one before it. Err says what is wrong.
fn check_mac(m: &[u8], i: usize, gens: &[AtomicU32], gen_before: &[u32]) -> Result<(), String> {
    let Some((k, g)) = of_mac(m) else {
        return Err(format!("flow {i} went to {m:02x?}, no nexthop's MAC"));
    };
    if !pair(i).contains(&k) {
        return Err(format!(
            "flow {i} went to nexthop {k}, not to {:?}",
            pair(i)
        ));
    }
    let now = gens[k].load(Ordering::SeqCst);
    if g + 1 < gen_before[k] || g > now {
        return Err(format!(
            "flow {i} went to nexthop {k}'s MAC of generation {g}; the current one was {} (stale entry)",
            gen_before[k]
        ));
    }
    Ok(())
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
    // Devices at kernel defaults: the router picks tc on both veths; the live frames below
    // enter as an instance sends them.
    let mut s = Seed::up_text(|ids| ids.config(&routes));
    let (ns, dev_b) = (s.ns(), s.ids.dev_b());
    assert!(s.hooks().iter().all(|(_, h)| h == "tc"), "{:?}", s.hooks());
    let sender = {
        let dev = std::ffi::CString::new(s.ids.tap_a()).unwrap();
        in_ns(&s.vm1, move || packet_socket(&dev)).join().unwrap()
    };
    for k in 0..NEXTHOPS {
        sh(&format!(
            "ip -n {ns} neigh replace {} lladdr {} dev {dev_b} nud permanent",
            fmt_ip(nexthop(k)),
            config::fmt_mac(&nh_mac(k, 0))
        ));
    }
    s.wait_neigh(&fmt_ip(nexthop(NEXTHOPS - 1)));
    // What the fast path passes, the kernel must not forward: vm3 then receives exactly the
    // live frames the fast path forwarded.
    s.set_forwarding(false);
    let st = RouterState::load(&s.ids.router_id).unwrap().unwrap();
    assert_eq!(st.interfaces[0].device, s.ids.dev_a());
    // The egress MACs as the kernel has them, not as the router recorded them.
    let qr_a = config::parse_mac(&tests::topo::link_mac(&ns, &s.ids.dev_a())).unwrap();
    let qr_b = config::parse_mac(&tests::topo::link_mac(&ns, &dev_b)).unwrap();
    let (ifindex_a, slot_a) = (st.interfaces[0].ifindex, st.interfaces[0].slot);
    let gens: Arc<Vec<AtomicU32>> = Arc::new((0..NEXTHOPS).map(|_| AtomicU32::new(0)).collect());

    let stop = Arc::new(AtomicBool::new(false));
    // Neighbour churn, 100 changes a second, cycling through: a nexthop's MAC changed in place;
    // another nexthop deleted, then added back with a new MAC; an unrelated neighbour added,
    // then deleted. Each new MAC is a new generation, announced before the kernel sees it.
    let churn = {
        let (stop, ns, dev_b, gens) = (stop.clone(), ns.clone(), dev_b.clone(), gens.clone());
        std::thread::spawn(move || {
            let mut ip = Command::new("ip")
                .args(["-n", &ns, "-batch", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut w = ip.stdin.take().unwrap();
            let new_mac = |k: usize| nh_mac(k, gens[k].fetch_add(1, Ordering::SeqCst) + 1);
            let mut n = 0usize;
            let t0 = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let step = n / 5;
                let (k, j) = ((step * 7) % NEXTHOPS, (step * 11 + 3) % NEXTHOPS);
                let other = 100 + step % 100;
                let line = match n % 5 {
                    0 => format!(
                        "neigh replace {} lladdr {} dev {dev_b} nud permanent\n",
                        fmt_ip(nexthop(k)),
                        config::fmt_mac(&new_mac(k))
                    ),
                    1 => format!("neigh del {} dev {dev_b}\n", fmt_ip(nexthop(j))),
                    2 => format!(
                        "neigh replace {} lladdr {} dev {dev_b} nud permanent\n",
                        fmt_ip(nexthop(j)),
                        config::fmt_mac(&new_mac(j))
                    ),
                    3 => format!(
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
            drop(w);
            ip.wait().unwrap();
            n as f64 / t0.elapsed().as_secs_f64()
        })
    };
    // Route churn: the flows' routes move between their two nexthops, a share at a time.
    let routes_thread = {
        let (stop, ns, id) = (stop.clone(), ns.clone(), s.ids.router_id.clone());
        let st = st.clone();
        std::thread::spawn(move || {
            let tables: Vec<_> = (0..4)
                .map(|round| {
                    let mut moved = st.clone();
                    for (i, r) in moved.routes.iter_mut().enumerate() {
                        if (i / 100) % 4 == round || (i + round) % 3 == 0 {
                            r.nexthop = std::net::Ipv4Addr::from(nexthop(pair(i)[1])).into();
                        }
                    }
                    apply::tables_of(&moved).unwrap().routes
                })
                .collect();
            netns::run_in(&ns, move || {
                let mut ebpf = datapath::open_maps(&id)?;
                let mut table = router_ctl::fib::writer::RouteTable::open(&mut ebpf)?;
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

    // What arrives at vm3 (behind qr-b) and at vm1 (behind qr-a) of the flows' frames.
    let at_vm3 = Recorder::start(&s.vm3, &s.ids.tap_b(), |f| flow_of(f).is_some());
    let at_vm1 = Recorder::start(&s.vm1, &s.ids.tap_a(), |f| flow_of(f).is_some());
    let counters = datapath::open_pinned(&s.ids.router_id, map_names::STATS).unwrap();
    let before: Stats = datapath::read_stats(&counters, slot_a).unwrap();

    // The frames, from the router's namespace, through its real program and pinned maps.
    let id = s.ids.router_id.clone();
    let g = gens.clone();
    let result = netns::run_in(&ns, move || {
        // The frames go through the tc program, the hook the router runs on these veths (the
        // XDP program shares the lookups; packet.rs races route changes against it).
        let mut tc_ctx = [0u8; 192];
        tc_ctx[36..40].copy_from_slice(&ifindex_a.to_ne_bytes());
        tc_ctx[40..44].copy_from_slice(&ifindex_a.to_ne_bytes());
        let mut ebpf_tc =
            datapath::load_pinned(&id, Capacity::default(), datapath::Programs::BOTH)?;
        let tc = datapath::tc_program(&mut ebpf_tc)?;
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
        let (mut fwd, mut passed, mut live) = (0usize, 0usize, 0usize);
        let mut out = vec![0u8; 256];
        for n in 0..FRAMES {
            let i = (n * 7919) % FLOWS;
            let f = &frames[i];
            if n % LIVE_EVERY == 0 {
                // SAFETY: send(2) of our buffer on our bound packet socket.
                let sent =
                    unsafe { libc::send(sender, f.as_ptr() as *const libc::c_void, f.len(), 0) };
                anyhow::ensure!(sent == f.len() as isize, "live frame {n} not sent");
                live += 1;
                continue;
            }
            let gen_before: Vec<u32> = g.iter().map(|x| x.load(Ordering::SeqCst)).collect();
            let r = tc.test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ctx_in: Some(&tc_ctx),
                ..Default::default()
            })?;
            let o = &out[..r.data_size_out as usize];
            // tc's actions: redirect (7), pass (tcx next, -1).
            match r.return_value as i32 {
                7 => {
                    fwd += 1;
                    check_mac(&o[0..6], i, &g, &gen_before)
                        .map_err(|e| anyhow::anyhow!("frame {n}: {e}"))?;
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
                -1 => {
                    passed += 1;
                    anyhow::ensure!(o == &f[..], "frame {n}: passed frame changed");
                }
                rc => anyhow::bail!("frame {n}: action {rc}"),
            }
        }
        Ok((fwd, passed, live))
    });
    stop.store(true, Ordering::SeqCst);
    let rate = churn.join().unwrap();
    let route_changes = routes_thread.join().unwrap();
    let (fwd, passed, live) = result.unwrap();
    // The live frames are on their way through vm1's veth: let them land.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: our descriptor.
    unsafe { libc::close(sender) };
    // The frames run through BPF_PROG_TEST_RUN; the live ones arrived on qr-a (rx counts them).
    s.injected_a = (FRAMES - live) as u64;
    let after = datapath::read_stats(&counters, slot_a).unwrap();
    let gen_end: Vec<u32> = gens.iter().map(|x| x.load(Ordering::SeqCst)).collect();
    eprintln!(
        "churn: {FRAMES} frames over {FLOWS} flows ({live} live): {fwd} forwarded, {passed} to the kernel; {rate:.0} neighbour changes/s (MACs up to generation {}), {route_changes} route table changes",
        gen_end.iter().max().unwrap()
    );
    assert_eq!(fwd + passed + live, FRAMES);
    assert!(rate >= 90.0, "neighbour churn ran at {rate:.0}/s");
    assert!(route_changes >= 10, "{route_changes} route table changes");
    assert!(
        *gen_end.iter().min().unwrap() >= 2,
        "some nexthop's MAC never changed twice: {gen_end:?}"
    );
    // Passed only for want of a neighbour: never for want of a route. (vm1's own multicast and
    // ARP, not_ip and bcast_mcast, arrive on qr-a meanwhile; the flows' frames are unicast IPv4.)
    for r in 0..why::COUNT {
        if ![why::NO_NEIGH, why::NOT_IP, why::BCAST_MCAST].contains(&r) {
            assert_eq!(
                after.pass[r] - before.pass[r],
                0,
                "frames passed as {}",
                why::NAMES[r]
            );
        }
    }
    assert!(fwd > FRAMES / 2, "too little forwarded: {fwd}");
    let live_fwd = (after.fwd_packets - before.fwd_packets) as usize - fwd;
    let live_passed = (after.pass[why::NO_NEIGH] - before.pass[why::NO_NEIGH]) as usize;
    assert!(
        live_passed <= passed + live && live_fwd <= live,
        "live frames miscounted: {live_fwd} forwarded of {live}"
    );
    // The live frames the fast path forwarded all went out of qr-b: each one arrived at vm3,
    // to one of its flow's nexthops' MACs; none came back out of qr-a to vm1.
    let (got3, got1) = (at_vm3.stop(), at_vm1.stop());
    assert!(
        got1.is_empty(),
        "{} frames of the flows reached vm1",
        got1.len()
    );
    assert_eq!(
        got3.len(),
        live_fwd,
        "vm3 received other than the live frames the fast path forwarded"
    );
    for f in &got3 {
        let i = flow_of(f).unwrap();
        let (k, _) =
            of_mac(&f[0..6]).unwrap_or_else(|| panic!("a frame reached vm3 to {:02x?}", &f[0..6]));
        assert!(
            pair(i).contains(&k),
            "flow {i} reached vm3 through nexthop {k}"
        );
        assert_eq!(f[6..12], qr_b, "a frame reached vm3 not from qr-b's MAC");
    }
    assert!(
        live_fwd > live / 2,
        "too few live frames forwarded: {live_fwd} of {live}"
    );
    // Afterwards the fast path's neighbours are the kernel's again, MACs included.
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
}

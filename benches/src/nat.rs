//! NAT beside the kernel's NAT, in one run (issue 12): small UDP frames through SNAT and through
//! a floating IP (an XDP live-frames generator, as in `e2e`; the router's ingress in XDP or at
//! tc, where the generator's frames arrive as skbs), against the kernel's nftables NAT and the
//! kernel's own fast path for established flows (an nftables flowtable); bulk TCP through SNAT
//! at default offloads (iperf3); and the rate of new TCP connections through SNAT.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::{
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    EbpfLoader,
};
use router_ctl::{datapath, kernel::link_in, state};
use tests::{
    frame::{ethernet, udp, Ipv4},
    sh, sh_out,
    topo::{in_ns, Ids, Seed},
};

use crate::{
    skb::{nft_count, nft_sink},
    stats::{summarize, Summary},
};

pub(crate) const FIP: &str = "[[router.floating_ip]]\nfloating_ip_address = \"192.168.1.20\"\nfixed_ip_address = \"172.16.101.3\"\n";
const PACKETS: u32 = 2_000_000;
pub const PACKETS_PER_RUN: u32 = PACKETS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No program: the kernel forwards and NATs (nftables, conntrack).
    Kernel,
    /// The kernel with an nftables flowtable for established flows.
    Flowtable,
    /// This router at tc (the generator's frames reach it as skbs).
    Tc,
    /// This router in XDP on every device.
    Xdp,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Kernel => "kernel NAT",
            Mode::Flowtable => "kernel NAT + flowtable",
            Mode::Tc => "this router, tc",
            Mode::Xdp => "this router, XDP",
        }
    }
}

pub const MODES: [Mode; 4] = [Mode::Kernel, Mode::Flowtable, Mode::Tc, Mode::Xdp];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// vm1 → the outside host, through SNAT to the gateway address.
    Snat,
    /// The outside host → vm3's floating IP.
    FloatingIp,
}

pub struct Frames {
    pub dir: Dir,
    pub flows: usize,
    pub mpps: Vec<(Mode, Summary)>,
    /// Per round: XDP ÷ kernel, tc ÷ kernel, XDP ÷ flowtable (None: this kernel has no
    /// flowtable support).
    pub xdp_over_kernel: Summary,
    pub tc_over_kernel: Summary,
    pub xdp_over_flowtable: Option<Summary>,
    /// Share of the timed run's frames the fast path translated (XDP mode, median).
    pub fast_share: f64,
}

pub struct NatBench {
    pub frames: Vec<Frames>,
    /// Bulk TCP vm1 → outside through SNAT: kernel, this router (auto: tc), per-round ratio.
    pub tcp_kernel: Summary,
    pub tcp_router: Summary,
    pub tcp_ratio: Summary,
    /// New TCP connections per second through SNAT.
    pub conn_kernel: Summary,
    pub conn_router: Summary,
    pub conn_ratio: Summary,
    /// Why the flowtable anchor is missing, when it is.
    pub flowtable_missing: Option<String>,
}

/// The seed with a gateway and vm3's floating IP, every port on `hook`.
fn definition(ids: &Ids, hook: &str) -> String {
    let mut t = ids.config_nat("", FIP);
    for p in [&ids.port_a, &ids.port_b, &ids.port_g] {
        t = t.replacen(
            &format!("port_id = \"{p}\"\n"),
            &format!("port_id = \"{p}\"\nhook = \"{hook}\"\n"),
            1,
        );
    }
    t
}

pub(crate) fn set_mode(s: &mut Seed, mode: Mode) -> Result<()> {
    let ns = s.ns();
    let _ = sh_out(&format!(
        "ip netns exec {ns} nft delete table inet bench_ft 2>/dev/null"
    ));
    match mode {
        Mode::Kernel | Mode::Flowtable => {
            // Neutron's router as it is: no program, and no daemon listening to conntrack
            // (a listener makes the kernel build an event for every flow it is told about).
            stop_daemon();
            for d in [s.ids.dev_a(), s.ids.dev_b(), s.ids.dev_g()] {
                let _ = std::fs::remove_file(state::link_pin(&s.ids.router_id, &d));
                let _ = std::fs::remove_file(state::tc_link_pin(&s.ids.router_id, &d));
            }
            if mode == Mode::Flowtable {
                flowtable(&ns, s)?;
            }
        }
        Mode::Tc => {
            let t = definition(&s.ids, "tc");
            s.apply(&t);
        }
        Mode::Xdp => {
            let t = definition(&s.ids, "xdp");
            s.apply(&t);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Stops the running `router-ctl run` (SIGTERM) and waits until it is gone; the next apply
/// starts one again.
fn stop_daemon() {
    let pid = std::fs::read_to_string("/run/router-xdp/daemon.pid").unwrap_or_default();
    let Some(pid) = pid
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The nftables flowtable over the router's three devices (the kernel's software fast path for
/// established flows), or why this kernel cannot have one.
fn flowtable(ns: &str, s: &Seed) -> Result<()> {
    let out = sh_out(&format!(
        "ip netns exec {ns} nft -f - <<'X'\ntable inet bench_ft {{\n  flowtable ft {{ hook ingress priority 0; devices = {{ {}, {}, {} }}; }}\n  chain forward_ft {{ type filter hook forward priority 0; policy accept; meta l4proto {{ tcp, udp }} flow add @ft; }}\n}}\nX",
        s.ids.dev_a(),
        s.ids.dev_b(),
        s.ids.dev_g()
    ));
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
    );
    Ok(())
}

fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    link_in(Some(ns), dev)?
        .with_context(|| format!("{dev} in {ns}"))?
        .mac()
}

/// The generator for `dir` with `flows` flows (source ports 40000 onwards), and the namespace
/// and device it runs on.
fn generator(s: &Seed, dir: Dir, flows: usize) -> Result<(aya::Ebpf, String, u32)> {
    let (ns, dev, peer_ns, peer, src, dst) = match dir {
        Dir::Snat => (
            s.vm1.clone(),
            s.ids.tap_a(),
            s.ns(),
            s.ids.dev_a(),
            [172, 16, 100, 3],
            [203, 0, 113, 5],
        ),
        Dir::FloatingIp => (
            s.ext(),
            "up0".to_string(),
            s.ns(),
            s.ids.dev_g(),
            [203, 0, 113, 5],
            [192, 168, 1, 20],
        ),
    };
    let (to, from) = (mac(&peer_ns, &peer)?, mac(&ns, &dev)?);
    let mut gen = EbpfLoader::new().load(datapath::BENCH_PROGRAM)?;
    {
        let mut tpl: Array<_, [u8; 64]> =
            Array::try_from(gen.map_mut("GEN_FLOWS").context("GEN_FLOWS")?)?;
        for i in 0..flows {
            let l4 = udp(40000 + i as u16, 9, &[0u8; 22]);
            let mut l3 = Ipv4::udp(src, dst, 64).header(l4.len());
            l3.extend_from_slice(&l4);
            let f = ethernet(to, from, 0x0800, &l3);
            tpl.set(
                i as u32,
                <[u8; 64]>::try_from(&f[..]).context("64 bytes")?,
                0,
            )?;
        }
    }
    Array::<_, u32>::try_from(gen.map_mut("GEN_CONF").context("GEN_CONF")?)?.set(
        0,
        flows as u32,
        0,
    )?;
    let p: &mut Xdp = gen
        .program_mut("bench_gen")
        .context("bench_gen")?
        .try_into()?;
    p.load()?;
    let ifindex = link_in(Some(&ns), &dev)?.context("generator device")?.index;
    Ok((gen, ns, ifindex))
}

/// Sends `n` frames from the generator (pinned to CPU 0); seconds taken.
fn send(gen: aya::Ebpf, ns: &str, ifindex: u32, n: u32) -> Result<(aya::Ebpf, f64)> {
    let cell = std::sync::Arc::new(std::sync::Mutex::new(Some(gen)));
    let c2 = cell.clone();
    let secs = in_ns(ns, move || -> Result<f64> {
        crate::host::pin_to_cpu(0)?;
        let mut g = c2.lock().unwrap().take().context("generator")?;
        let prog: &mut Xdp = g
            .program_mut("bench_gen")
            .context("bench_gen")?
            .try_into()?;
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&64u32.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let t = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(&[0u8; 64]),
            ctx_in: Some(&ctx),
            repeat: n,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .context("live-frames test run")?;
        let secs = t.elapsed().as_secs_f64();
        *c2.lock().unwrap() = Some(g);
        Ok(secs)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    let g = cell.lock().unwrap().take().context("generator back")?;
    Ok((g, secs))
}

/// Translated packets (source + destination) the fast path counted on every device.
fn translated(s: &Seed) -> u64 {
    s.stats()
        .iter()
        .map(|d| {
            d["nat"]["source_translated"].as_u64().unwrap_or(0)
                + d["nat"]["destination_translated"].as_u64().unwrap_or(0)
        })
        .sum()
}

/// Mpps counted at the sink of `dir`, after a warm-up that lets the flows start (their first
/// packets go through the kernel, and the daemon copies them); and the fast path's share.
fn measure(s: &Seed, dir: Dir, flows: usize) -> Result<(f64, f64)> {
    let (sink_ns, table) = match dir {
        Dir::Snat => (s.ext(), "natsink"),
        Dir::FloatingIp => (s.vm3.clone(), "natsink"),
    };
    let (gen, ns, ifindex) = generator(s, dir, flows)?;
    let (gen, _) = send(gen, &ns, ifindex, 20_000)?;
    std::thread::sleep(Duration::from_millis(300));
    let (before, t0) = (nft_count(&sink_ns, table)?, translated(s));
    let (_, secs) = send(gen, &ns, ifindex, PACKETS)?;
    std::thread::sleep(Duration::from_millis(100));
    let got = nft_count(&sink_ns, table)? - before;
    // Each forwarded packet is translated once (source for SNAT, destination for a FIP).
    let share = (translated(s) - t0) as f64 / got.max(1) as f64;
    Ok((got as f64 / secs / 1e6, share))
}

pub fn run(runs: usize) -> Result<NatBench> {
    let (tcp_kernel, tcp_router, tcp_ratio, conn_kernel, conn_router, conn_ratio) =
        tcp_and_connections(runs)?;
    let mut s = Seed::up_nat(|ids| definition(ids, "auto"));
    s.check_counters = false;
    s.prime_neighbours();
    let (vm1, vm3, ext, out) = (s.vm1.clone(), s.vm3.clone(), s.ext(), s.out());
    let (ns, dev_a, dev_g, tap_b) = (s.ns(), s.ids.dev_a(), s.ids.dev_g(), s.ids.tap_b());
    sh(&format!("ip netns exec {vm1} ping -c 2 -i 0.2 203.0.113.5 >/dev/null && ip netns exec {out} ping -c 2 -i 0.2 192.168.1.20 >/dev/null"));
    // The tuning an XDP generator and XDP redirects need on veths (the kernel and tc take the
    // same): GRO on the devices frames are sent into (qr-a, qg-, and the sinks' up0 and vm3).
    sh(&format!(
        "ip netns exec {ns} ethtool -K {dev_a} gro on >/dev/null && ip netns exec {ns} ethtool -K {dev_g} gro on >/dev/null && \
         ip netns exec {ext} ethtool -K up0 gro on >/dev/null && ip netns exec {vm3} ethtool -K {tap_b} gro on >/dev/null"
    ));
    nft_sink(&ext, "natsink", "up0", "drop");
    nft_sink(&vm3, "natsink", &tap_b, "drop");
    let flowtable_missing = flowtable(&ns, &s).err().map(|e| format!("{e:#}"));
    let _ = sh_out(&format!(
        "ip netns exec {ns} nft delete table inet bench_ft 2>/dev/null"
    ));
    let modes: Vec<Mode> = MODES
        .iter()
        .copied()
        .filter(|m| *m != Mode::Flowtable || flowtable_missing.is_none())
        .collect();
    let mut frames = Vec::new();
    for (dir, flows) in [
        (Dir::Snat, 1usize),
        (Dir::Snat, 1000),
        (Dir::FloatingIp, 1),
        (Dir::FloatingIp, 1000),
    ] {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let (mut xk, mut tk, mut xf, mut share) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..runs {
            let mut this = [0f64; 4];
            for (k, m) in modes.iter().enumerate() {
                set_mode(&mut s, *m)?;
                let (mpps, sh) = measure(&s, dir, flows)?;
                eprintln!(
                    "nat: {dir:?} {flows} flow(s), round {}, {}: {mpps:.3} Mpps{}",
                    round + 1,
                    m.name(),
                    if *m == Mode::Xdp || *m == Mode::Tc {
                        format!(" ({:.1} % translated by the fast path)", sh * 100.0)
                    } else {
                        String::new()
                    }
                );
                if *m == Mode::Xdp {
                    share.push(sh);
                }
                samples[k].push(mpps);
                let slot = MODES.iter().position(|x| x == m).expect("a mode");
                this[slot] = mpps;
            }
            xk.push(this[3] / this[0]);
            tk.push(this[2] / this[0]);
            if this[1] > 0.0 {
                xf.push(this[3] / this[1]);
            }
        }
        frames.push(Frames {
            dir,
            flows,
            mpps: modes
                .iter()
                .zip(&samples)
                .map(|(m, v)| (*m, summarize(v)))
                .collect(),
            xdp_over_kernel: summarize(&xk),
            tc_over_kernel: summarize(&tk),
            xdp_over_flowtable: (!xf.is_empty()).then(|| summarize(&xf)),
            fast_share: summarize(&share).median,
        });
    }
    set_mode(&mut s, Mode::Tc)?;
    Ok(NatBench {
        frames,
        tcp_kernel,
        tcp_router,
        tcp_ratio,
        conn_kernel,
        conn_router,
        conn_ratio,
        flowtable_missing,
    })
}

/// iperf3 from namespace `client` to `dst` for `secs` seconds (a server runs there); Gbit/s
/// received.
pub fn iperf(client: &str, dst: &str, secs: u32) -> Result<f64> {
    let out = sh_out(&format!(
        "ip netns exec {client} iperf3 -c {dst} -t {secs} -J"
    ));
    anyhow::ensure!(
        out.status.success(),
        "iperf3 {client} → {dst}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON")
}

/// `n` TCP connections from vm1 to the outside host, one after the other (connect, then close
/// with a reset, so no TIME_WAIT piles up); connections per second.
fn connections(s: &Seed, n: usize) -> Result<f64> {
    let vm1 = s.vm1.clone();
    let t = in_ns(&vm1, move || -> Result<f64> {
        let t0 = Instant::now();
        for _ in 0..n {
            let c = std::net::TcpStream::connect_timeout(
                &"203.0.113.5:5005".parse().unwrap(),
                Duration::from_secs(2),
            )?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&c);
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: SO_LINGER with a linger struct on our socket.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &l as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
        }
        Ok(n as f64 / t0.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client panicked"))??;
    Ok(t)
}

type Six = (Summary, Summary, Summary, Summary, Summary, Summary);

/// Bulk TCP and new connections through SNAT at kernel defaults: the kernel's NAT and this
/// router as `auto` sets it up (tc), taking turns.
fn tcp_and_connections(runs: usize) -> Result<Six> {
    let mut s = Seed::up_nat(|ids| ids.config_nat("", ""));
    s.check_counters = false;
    s.prime_neighbours();
    let (vm1, out) = (s.vm1.clone(), s.out());
    sh(&format!(
        "ip netns exec {vm1} ping -c 2 -i 0.2 203.0.113.5 >/dev/null"
    ));
    sh(&format!(
        "ip netns exec {out} iperf3 -s -D -I /tmp/router-bench-nat-iperf3.pid"
    ));
    // Accepts until told to stop (a connection reset before it was accepted never shows up),
    // then ends and leaves the namespace.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    let server = in_ns(&out, move || {
        let l = std::net::TcpListener::bind("203.0.113.5:5005").unwrap();
        l.set_nonblocking(true).unwrap();
        while !halt.load(std::sync::atomic::Ordering::SeqCst) {
            match l.accept() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Err(_) => {}
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let res = (|| -> Result<Six> {
        let (mut tk, mut tr, mut tq, mut ck, mut cr, mut cq) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for round in 0..runs {
            let (mut gk, mut gr, mut nk, mut nr) = (0.0, 0.0, 0.0, 0.0);
            for kernel_first in [round % 2 == 0, round % 2 == 1] {
                if kernel_first {
                    set_mode(&mut s, Mode::Kernel)?;
                    gk = iperf(&vm1, "203.0.113.5", 5)?;
                    nk = connections(&s, 1000)?;
                } else {
                    let t = s.ids.config_nat("", "");
                    s.apply(&t);
                    std::thread::sleep(Duration::from_millis(300));
                    let t0 = translated(&s);
                    gr = iperf(&vm1, "203.0.113.5", 5)?;
                    anyhow::ensure!(translated(&s) > t0, "the fast path translated nothing");
                    nr = connections(&s, 1000)?;
                }
            }
            eprintln!("nat: round {}: TCP through SNAT kernel {gk:.2} Gbit/s, this router {gr:.2}; new connections kernel {nk:.0}/s, this router {nr:.0}/s", round + 1);
            tk.push(gk);
            tr.push(gr);
            tq.push(gr / gk);
            ck.push(nk);
            cr.push(nr);
            cq.push(nr / nk);
        }
        Ok((
            summarize(&tk),
            summarize(&tr),
            summarize(&tq),
            summarize(&ck),
            summarize(&cr),
            summarize(&cq),
        ))
    })();
    let _ = sh_out("kill $(cat /tmp/router-bench-nat-iperf3.pid) 2>/dev/null");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = server.join();
    res
}

//! Control-plane figures: route installation, route updates under traffic, neighbour latency,
//! and the memory it all takes.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use router_ctl::{
    datapath,
    kernel::{link_in, netns},
    state,
};
use tests::topo::Seed;

use crate::stats::{summarize, Summary};

pub struct NeighLatency {
    /// From sending the neighbour change (RTM_NEWNEIGH, new MAC) to the fast path's map holding
    /// the new MAC.
    pub total_ms: Summary,
    /// From sending it to the kernel's acknowledgement.
    pub kernel_ack_ms: Summary,
}

/// Latency from a kernel neighbour change to the map update, `samples` times. The change is sent
/// over rtnetlink from a thread inside the router's namespace; the map is polled meanwhile.
pub fn neighbour_latency(samples: usize) -> Result<NeighLatency> {
    let s = Seed::up("");
    s.prime_neighbours();
    let ns = s.ns();
    let dev = s.ids.dev_b();
    let ifindex = link_in(Some(&ns), &dev)?.context("qr device")?.index;
    let id = s.ids.router_id.clone();
    let (total, ack) = netns::run_in(&ns, move || {
        let neighs = datapath::Neighs::open(&id)?;
        let ip = Ipv4Addr::new(172, 16, 101, 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let (mut total, mut ack) = (Vec::new(), Vec::new());
            for i in 0..samples {
                let mac = [0x02, 0x42, 0, 0, (i >> 8) as u8, i as u8];
                let t0 = Instant::now();
                handle
                    .neighbours()
                    .add(ifindex, ip.into())
                    .link_local_address(&mac)
                    .state(rtnetlink::packet_route::neighbour::NeighbourState::Reachable)
                    .replace()
                    .execute()
                    .await
                    .context("RTM_NEWNEIGH")?;
                ack.push(t0.elapsed().as_secs_f64() * 1e3);
                let deadline = t0 + Duration::from_secs(2);
                while neighs.get(ifindex, ip.into()) != Some(mac) {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "neighbour change never reached the map"
                    );
                    std::hint::spin_loop();
                }
                total.push(t0.elapsed().as_secs_f64() * 1e3);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((total, ack))
        })
    })?;
    Ok(NeighLatency {
        total_ms: summarize(&total),
        kernel_ack_ms: summarize(&ack),
    })
}

/// Route table rewrites per second on a live router's pinned maps: each update moves one /24
/// between two nexthops (the whole 1 000-route table is rebuilt and the changed entries written).
pub fn route_updates_per_second(s: &Seed, seconds: f64) -> Result<f64> {
    let id = s.ids.router_id.clone();
    let ns = s.ns();
    let st = state::RouterState::load(&id)?.context("router state")?;
    // The router's own table, and the same with its first extra route through another nexthop.
    let mut moved = st.clone();
    moved.routes[0].nexthop = std::net::Ipv4Addr::new(172, 16, 101, 4).into();
    let tables = [
        router_ctl::apply::tables_of(&st)?.routes,
        router_ctl::apply::tables_of(&moved)?.routes,
    ];
    netns::run_in(&ns, move || {
        let mut ebpf = datapath::open_maps(&id)?;
        let mut table = router_ctl::fib::writer::RouteTable::open(&mut ebpf)?;
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < seconds {
            table.set(&tables[(n % 2) as usize])?;
            n += 1;
        }
        // Leave the table as apply made it.
        router_ctl::fib::writer::set_routes(&mut ebpf, &tables[0])?;
        Ok(n as f64 / t.elapsed().as_secs_f64())
    })
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// `router-ctl apply` at scale, as an operator runs it (the binary, a definitions file, the
/// daemon started or signalled as usual). Each router has two subnets on veths that apply
/// creates, so the hook is tc (a tcx link per device).
pub struct ApplyScale {
    pub one: Summary,
    pub hundred: Summary,
    pub reapply_hundred: Summary,
    pub destroy_hundred: Summary,
    /// (routers, first apply seconds, unchanged re-apply seconds)
    pub big: Option<(usize, f64, f64)>,
    /// One router with a large table through the real binary (issue 14's controller memory).
    pub table: Option<BigTable>,
}

/// `router-ctl apply` of the seed router with `routes` extra routes (distinct /24s): wall time
/// and the process's peak RSS (wait4's rusage), first apply and re-apply with one route changed.
pub struct BigTable {
    pub routes: usize,
    pub first_s: f64,
    pub first_rss_mib: f64,
    pub again_s: f64,
    pub again_rss_mib: f64,
}

/// Runs `router-ctl ARGS` as a child of its own: (wall seconds, peak RSS in MiB). The peak is
/// the child's VmHWM, read every 10 ms until it exits (wait4's ru_maxrss would count the memory
/// of this process too: the child is spawned with vfork and execs from this address space).
pub fn timed_rss(args: &[&str]) -> Result<(f64, f64)> {
    let t = Instant::now();
    let mut child = std::process::Command::new(tests::router_ctl())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("router-ctl")?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0f64;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    anyhow::ensure!(status.success(), "router-ctl {args:?} failed ({status})");
    Ok((t.elapsed().as_secs_f64(), peak_kib / 1024.0))
}

pub fn big_table(routes: usize) -> Result<BigTable> {
    let id = "bbbbbbbb-16f4-4d6c-89d2-8af91cec9714";
    let seed = format!(
        "[[router]]\nid = \"{id}\"\nname = \"bench-table\"\n\
         [[router.interface]]\nport_id = \"e295b258-4586-4e8a-9c3e-1f2a3b4c5d6e\"\nsubnet = \"172.16.100.0/24\"\ngateway_ip = \"172.16.100.1\"\n\
         [[router.interface]]\nport_id = \"3ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e\"\nsubnet = \"172.16.101.0/24\"\ngateway_ip = \"172.16.101.1\"\n"
    );
    let write = |first_len: u8| -> Result<String> {
        let mut t = seed.clone();
        t.reserve(routes * 80);
        for i in 0..routes {
            let (a, b, c) = (1 + (i >> 16), (i >> 8) & 255, i & 255);
            let len = if i == 0 { first_len } else { 24 };
            let _ = std::fmt::Write::write_fmt(
                &mut t,
                format_args!("[[router.route]]\ndestination = \"{a}.{b}.{c}.0/{len}\"\nnexthop = \"172.16.101.254\"\n"),
            );
        }
        let path = format!("/tmp/router-bench-table-{routes}.toml");
        std::fs::write(&path, t)?;
        Ok(path)
    };
    let path = write(24)?;
    let (first_s, first_rss_mib) = timed_rss(&["apply", "--no-daemon", "-f", &path])?;
    let path = write(23)?;
    let (again_s, again_rss_mib) = timed_rss(&["apply", "--no-daemon", "-f", &path])?;
    timed(&["destroy", id])?;
    let _ = std::fs::remove_file(&path);
    eprintln!("apply: {routes} routes: {first_s:.1} s, {first_rss_mib:.0} MiB; one changed: {again_s:.1} s, {again_rss_mib:.0} MiB");
    Ok(BigTable {
        routes,
        first_s,
        first_rss_mib,
        again_s,
        again_rss_mib,
    })
}

fn definitions(n: usize) -> String {
    let mut t = String::new();
    for i in 0..n {
        let _ = std::fmt::Write::write_fmt(
            &mut t,
            format_args!(
                "[[router]]\nid = \"c{i:06x}-0000-4000-8000-000000000000\"\nname = \"bench-apply-{i}\"\n\
                 [[router.interface]]\nport_id = \"b{i:05x}0-0000-4000-8000-000000000000\"\nsubnet = \"10.{a}.{b}.0/24\"\ngateway_ip = \"10.{a}.{b}.1\"\n\
                 [[router.interface]]\nport_id = \"b{i:05x}1-0000-4000-8000-000000000000\"\nsubnet = \"10.{c}.{b}.0/24\"\ngateway_ip = \"10.{c}.{b}.1\"\n",
                a = 200 + (i >> 8),
                b = i & 255,
                c = 220 + (i >> 8),
            ),
        );
    }
    t
}

/// Runs `router-ctl ARGS`; its wall time in seconds.
pub fn timed(args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = std::process::Command::new(tests::router_ctl())
        .args(args)
        .output()
        .context("router-ctl")?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "router-ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(secs)
}

fn apply_and_destroy(n: usize, reapply: bool) -> Result<(f64, Option<f64>, f64)> {
    let path = format!("/tmp/router-bench-apply-{n}.toml");
    std::fs::write(&path, definitions(n))?;
    let first = timed(&["apply", "-f", &path])?;
    let again = if reapply {
        // The daemon starts its watchers after the first apply; let it settle first.
        std::thread::sleep(Duration::from_secs(2));
        Some(timed(&["apply", "-f", &path])?)
    } else {
        None
    };
    let names: Vec<String> = (0..n).map(|i| format!("bench-apply-{i}")).collect();
    let mut args = vec!["destroy"];
    args.extend(names.iter().map(|s| s.as_str()));
    let destroy = timed(&args)?;
    let _ = std::fs::remove_file(&path);
    Ok((first, again, destroy))
}

pub fn apply_scale(runs: usize, big: Option<usize>) -> Result<ApplyScale> {
    let (mut one, mut hundred, mut re, mut de) = (vec![], vec![], vec![], vec![]);
    for round in 0..runs {
        one.push(apply_and_destroy(1, false)?.0);
        let (a, r, d) = apply_and_destroy(100, true)?;
        eprintln!(
            "apply: round {}: 1 router {:.3} s; 100 routers {a:.2} s, unchanged again {:.3} s, destroyed in {d:.2} s",
            round + 1,
            one[round],
            r.unwrap_or(0.0)
        );
        hundred.push(a);
        re.extend(r);
        de.push(d);
    }
    let big = match big {
        Some(n) => {
            let (a, r, d) = apply_and_destroy(n, true)?;
            let r = r.unwrap_or(0.0);
            eprintln!(
                "apply: {n} routers {a:.1} s, unchanged again {r:.2} s, destroyed in {d:.1} s"
            );
            Some((n, a, r))
        }
        None => None,
    };
    Ok(ApplyScale {
        one: summarize(&one),
        hundred: summarize(&hundred),
        reapply_hundred: summarize(&re),
        destroy_hundred: summarize(&de),
        big,
        table: big.map(|_| big_table(1_000_000)).transpose()?,
    })
}

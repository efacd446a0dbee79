//! Single-route changes on a table of a million routes while frames are forwarded (issue 14):
//! the in-memory table (`fib::Live`) writing only what each change covers, and the real
//! binary's `route batch` (kernel, fast path, journal), with its memory.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{ensure, Result};
use aya::programs::TestRun as _;
use router_common::Route;
use router_ctl::{
    config::{IpNet, Ipv4Net},
    datapath,
};

use crate::{
    pkt::nexthop,
    stats::{summarize, Rng, Summary},
    table::{random_table, random_table6},
};

pub struct UpdateRate {
    pub routes: usize,
    pub ipv6: bool,
    /// Single-route changes (each its own batch and commit) per second, traffic running.
    pub changes_per_s: Summary,
    /// Frames the traffic thread forwarded per second with the changes running, and without.
    pub fwd_mpps_with: Summary,
    pub fwd_mpps_without: Summary,
}

/// `runs` rounds of `seconds` each: changes racing frames, then frames alone.
pub fn update_rate(routes: usize, ipv6: bool, runs: usize, seconds: f64) -> Result<UpdateRate> {
    std::thread::spawn(move || update_rate_here(routes, ipv6, runs, seconds))
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

fn update_rate_here(routes: usize, ipv6: bool, runs: usize, seconds: f64) -> Result<UpdateRate> {
    let crate::pkt::Tables {
        e0,
        table,
        ifaces,
        entries,
    } = crate::pkt::Tables::here(routes, 0x0bd ^ routes as u64, ipv6)?;
    let mut ebpf = datapath::load_unpinned_sized(router_ctl::fib::Capacity::for_table(&entries))?;
    datapath::set_ifaces(&mut ebpf, &ifaces, &[], &[])?;
    let mut writer = router_ctl::fib::writer::RouteTable::open(&mut ebpf)?;
    writer.set(&entries)?;
    drop(entries);
    crate::pkt::set_neighbours(&mut ebpf, e0, true, ipv6)?;

    // The changes: new prefixes added, replaced and removed again, and existing ones moved to
    // another nexthop and back; the table's size stays about the same.
    let mut rng = Rng::new(7);
    let route_to = |net: IpNet, i: usize| {
        router_ctl::fib::writer::route_entries(&ifaces, &[], &[(net, e0, nexthop(i, ipv6))], &[])[0]
            .1
    };
    let extra: Vec<IpNet> = if ipv6 {
        random_table6(20_001, 0xadd6)[1..]
            .iter()
            .map(|n| IpNet::from(*n))
            .collect()
    } else {
        random_table(20_001, 0xadd4)[1..]
            .iter()
            .map(|n| IpNet::from(*n))
            .collect()
    };
    let extra: Vec<IpNet> = {
        let have: std::collections::HashSet<IpNet> = table.iter().copied().collect();
        extra.into_iter().filter(|n| !have.contains(n)).collect()
    };
    let mut changes: Vec<(IpNet, Option<Vec<Route>>)> = Vec::new();
    for (k, n) in extra.iter().enumerate() {
        changes.push((*n, Some(vec![route_to(*n, k)])));
        let t = table[1 + rng.below(table.len() as u64 - 1) as usize];
        changes.push((t, Some(vec![route_to(t, k + 1)])));
        changes.push((*n, Some(vec![route_to(*n, k + 2)])));
    }
    for (k, n) in extra.iter().enumerate() {
        changes.push((*n, None));
        let t = table[1 + rng.below(table.len() as u64 - 1) as usize];
        changes.push((t, Some(vec![route_to(t, k)])));
    }

    // Traffic: frames to destinations inside the table, run through the program meanwhile.
    let frames = crate::pkt::frames_into(&table, 4096, &mut rng);
    let writer = Arc::new(std::sync::Mutex::new(writer));
    let changes = Arc::new(changes);
    let mut next = 0usize;
    let (mut rate, mut with, mut without) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, w, c) = (stop.clone(), writer.clone(), changes.clone());
        let start_at = next;
        let changer = std::thread::spawn(move || -> Result<usize> {
            let mut w = w.lock().expect("writer");
            let mut n = 0usize;
            while !s.load(Ordering::Relaxed) {
                let ch = &c[(start_at + n) % c.len()];
                w.change(std::slice::from_ref(ch))?;
                n += 1;
            }
            Ok(n)
        });
        let t = Instant::now();
        let sent = run_for(&mut ebpf, &frames, seconds)?;
        stop.store(true, Ordering::Relaxed);
        let n = changer.join().map_err(|_| anyhow::anyhow!("changer"))??;
        let secs = t.elapsed().as_secs_f64();
        // The writes go in whole rounds: the table ends where a round of changes ends.
        next = start_at + n;
        rate.push(n as f64 / secs);
        with.push(sent as f64 / secs / 1e6);
        let t = Instant::now();
        let sent = run_for(&mut ebpf, &frames, seconds)?;
        without.push(sent as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    eprintln!(
        "updates: {routes} {} routes: {} changes/s; forwarding {} Mpps with, {} without",
        if ipv6 { "IPv6" } else { "IPv4" },
        summarize(&rate).fmt(0),
        summarize(&with).fmt(3),
        summarize(&without).fmt(3)
    );
    Ok(UpdateRate {
        routes,
        ipv6,
        changes_per_s: summarize(&rate),
        fwd_mpps_with: summarize(&with),
        fwd_mpps_without: summarize(&without),
    })
}

/// Runs the frames through the XDP program for `seconds`; every one must be redirected.
fn run_for(ebpf: &mut aya::Ebpf, frames: &[Vec<u8>], seconds: f64) -> Result<u64> {
    let prog = datapath::program(ebpf)?;
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < seconds {
        for f in frames.iter().take(256) {
            let r = prog.test_run(aya::programs::TestRunOptions {
                data_in: Some(f),
                repeat: 1,
                ..Default::default()
            })?;
            ensure!(
                r.return_value == 4,
                "a frame was not forwarded during the changes (action {})",
                r.return_value
            );
            n += 1;
        }
    }
    Ok(n)
}

/// The real binary's `route batch` on a router sized for a million routes: one batch adding
/// `routes` routes with no daemon (wall time, peak RSS of the process), then through the daemon
/// a batch of `changes` single-route replacements, and single-line batches from the CLI.
pub struct BatchFigures {
    pub routes: usize,
    pub bulk_s: f64,
    pub bulk_rss_mib: f64,
    pub changes: usize,
    /// Through the daemon, its table kept: routes changed per second in one batch (kernel, fast
    /// path, journal).
    pub changes_per_s: f64,
    /// A one-line batch from the CLI (a process started per change), milliseconds.
    pub one_line_ms: Summary,
    /// The daemon's peak RSS (VmHWM) afterwards.
    pub daemon_rss_mib: f64,
}

pub fn batch_figures(routes: usize, changes: usize) -> Result<BatchFigures> {
    let id = "bbbbbbbb-16f4-4d6c-89d2-8af91cec9715";
    let def = format!(
        "[[router]]\nid = \"{id}\"\nname = \"bench-batch\"\nmax_routes = {}\n\
         [[router.interface]]\nport_id = \"e295b258-4586-4e8a-9c3e-1f2a3b4c5d6f\"\nsubnet = \"172.16.100.0/24\"\ngateway_ip = \"172.16.100.1\"\n\
         [[router.interface]]\nport_id = \"3ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1f\"\nsubnet = \"172.16.101.0/24\"\ngateway_ip = \"172.16.101.1\"\n",
        routes + 1000
    );
    let def_path = "/tmp/router-bench-batch.toml";
    std::fs::write(def_path, def)?;
    let _ = std::process::Command::new(tests::router_ctl())
        .args(["destroy", id])
        .output();
    let _ = std::process::Command::new("pkill")
        .args(["-f", "router-ct[l] run"])
        .status();
    crate::ctl::timed_rss(&["apply", "--no-daemon", "-f", def_path])?;
    let table = random_table(routes + 1, 0xba7c);
    let mut text = String::with_capacity(routes * 40);
    for n in &table[1..] {
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!("add {} via 172.16.101.254\n", IpNet::from(*n)),
        );
    }
    let bulk_path = "/tmp/router-bench-batch-bulk";
    std::fs::write(bulk_path, &text)?;
    drop(text);
    let (bulk_s, bulk_rss_mib) = crate::ctl::timed_rss(&["route", "batch", id, bulk_path])?;
    eprintln!("route batch: {routes} routes in {bulk_s:.1} s, peak RSS {bulk_rss_mib:.0} MiB");
    // The daemon, and a first batch that has it read the table once.
    crate::ctl::timed_rss(&["apply", "-f", def_path])?;
    let one = "/tmp/router-bench-batch-one";
    let mut ms = Vec::new();
    for i in 0..41 {
        let n: Ipv4Net = table[1 + i].clone();
        std::fs::write(
            one,
            format!(
                "replace {} via 172.16.101.{}\n",
                IpNet::from(n),
                250 + i % 4
            ),
        )?;
        let secs = crate::ctl::timed(&["route", "batch", id, one])?;
        if i > 0 {
            ms.push(secs * 1e3);
        }
    }
    let mut text = String::new();
    for (k, n) in table[1..].iter().take(changes).enumerate() {
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "replace {} via 172.16.101.{}\n",
                IpNet::from(*n),
                250 + k % 4
            ),
        );
    }
    let change_path = "/tmp/router-bench-batch-changes";
    std::fs::write(change_path, text)?;
    let change_s = crate::ctl::timed(&["route", "batch", id, change_path])?;
    let pid = std::fs::read_to_string(router_ctl::daemon::pid_file())
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok());
    let daemon_rss_mib = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0);
    crate::ctl::timed_rss(&["destroy", id])?;
    for p in [def_path, bulk_path, one, change_path] {
        let _ = std::fs::remove_file(p);
    }
    let one_line_ms = summarize(&ms);
    eprintln!(
        "route batch: {changes} changes through the daemon {:.0}/s; one-line batches {} ms; daemon peak RSS {daemon_rss_mib:.0} MiB",
        changes as f64 / change_s,
        one_line_ms.fmt(1)
    );
    Ok(BatchFigures {
        routes,
        bulk_s,
        bulk_rss_mib,
        changes,
        changes_per_s: changes as f64 / change_s,
        one_line_ms,
        daemon_rss_mib,
    })
}

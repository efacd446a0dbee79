//! `cargo xtask bench`: the benchmark suite. Writes BENCHMARKS.md and bench-plot.svg.
//!
//! Run as root (BPF, namespaces). Sections: per-packet cost against routing-table size,
//! end-to-end forwarding beside the kernel, control-plane figures.

mod attach;
mod conns;
mod ctl;
mod e2e;
mod fence;
mod fib;
mod follow;
mod ha;
mod host;
mod nat;
mod pkt;
mod probe;
mod report;
mod skb;
mod stats;
mod table;
mod updates;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use clap::Parser;

/// Group counts of the cold-read probe (1 KiB each).
const PROBE_GROUPS: [u32; 5] = [1, 256, 1024, 16384, 65536];

#[derive(Parser)]
struct Args {
    /// Runs per figure (the median of them is reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Route table sizes for the per-packet cost.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
    sizes: Vec<usize>,
    /// IPv6 route table sizes for the per-packet cost.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
    sizes6: Vec<usize>,
    /// Skip the end-to-end comparison.
    #[arg(long)]
    no_e2e: bool,
    /// Skip the skb traffic (iperf3 TCP, small UDP from an AF_PACKET sender).
    #[arg(long)]
    no_skb: bool,
    /// Skip the NAT comparison.
    #[arg(long)]
    no_nat: bool,
    /// Skip the request-shaped connections (short HTTP-like TCP connections through the plain
    /// route, SNAT and a floating IP).
    #[arg(long)]
    no_conns: bool,
    /// Only the request-shaped connections: their section is printed, and replaced in place in
    /// the report (`--out`), or appended to it.
    #[arg(long)]
    only_conns: bool,
    /// Seconds of each timed run of the request-shaped connections (after the warm-up). Longer runs
    /// narrow the spread of the rounds where the end hosts share the router's cores.
    #[arg(long, default_value_t = 5.0)]
    conns_secs: f64,
    /// Seconds of warm-up before each timed run of the request-shaped connections.
    #[arg(long, default_value_t = 0.5)]
    conns_warmup: f64,
    /// Size of the clients' ephemeral port range for the request-shaped connections (0: the
    /// kernel's default range).
    #[arg(long, default_value_t = 1024)]
    conns_ports: u16,
    /// Only these runs of the request-shaped connections: path and concurrency, e.g.
    /// `snat64,fip1` (paths: plain, snat, fip).
    #[arg(long, value_delimiter = ',')]
    conns_only: Vec<String>,
    /// Skip `router-ctl apply` at scale.
    #[arg(long)]
    no_apply: bool,
    /// Routers in the large apply (0: none).
    #[arg(long, default_value_t = 1000)]
    apply_big: usize,
    /// Where to write the report (the plot goes beside it).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Skip the multi-host agent (etcd) figures.
    #[arg(long)]
    no_ha: bool,
    /// Only the multi-host agent figures: their section of the report is replaced in place.
    #[arg(long)]
    only_ha: bool,
    /// Routers in the multi-host convergence figure.
    #[arg(long, default_value_t = 1000)]
    ha_routers: usize,
    /// Agents in the multi-host convergence figure.
    #[arg(long, default_value_t = 10)]
    ha_agents: usize,
    /// Routes installed for the single-route change figures.
    #[arg(long, default_value_t = 1_000_000)]
    update_routes: usize,
    /// Only the single-route change figures, printed (no report written).
    #[arg(long)]
    only_updates: bool,
    /// Skip the single-route change figures.
    #[arg(long)]
    no_updates: bool,
    /// Only the page-size probe (array against hash, printed).
    #[arg(long)]
    only_probe: bool,
    /// Skip the router built as Neutron's agent builds it, followed (`run --follow`).
    #[arg(long)]
    no_follow: bool,
    /// Only that: its section of the report is replaced in place.
    #[arg(long)]
    only_follow: bool,
    /// Route table sizes for our lookup against the kernel's FIB (both families).
    #[arg(long, value_delimiter = ',', default_value = "1,1000000")]
    fib_sizes: Vec<usize>,
    /// Skip our lookup against the kernel's FIB.
    #[arg(long)]
    no_fib: bool,
    /// Only that: its section of the report is replaced in place.
    #[arg(long)]
    only_fib: bool,
    /// Devices in the attach-mode figures (0: none).
    #[arg(long, default_value_t = 100)]
    attach_devices: usize,
    /// Only the end-to-end figures with two cores receiving, printed (no report written).
    #[arg(long)]
    only_two_cores: bool,
    /// Only what checksum verification costs forced XDP: its section is replaced in place.
    #[arg(long)]
    only_verify: bool,
    /// Only the attach-mode figures: their section of the report is replaced in place.
    #[arg(long)]
    only_attach: bool,
    /// HA routers fenced at once in the fencing figures (0: none).
    #[arg(long, default_value_t = 100)]
    fence_routers: usize,
    /// Only the fencing figures: their section of the report is replaced in place.
    #[arg(long)]
    only_fence: bool,
    /// Long-lived connections across each failover in the HA connection-state figures.
    #[arg(long, default_value_t = 100)]
    sync_conns: usize,
    /// Only the HA connection-state figures: their section of the report is replaced in place.
    #[arg(long)]
    only_ha_sync: bool,
}

fn ha_sync_section(args: &Args) -> Result<String> {
    let f = ha::sync_run(args.runs.min(5), args.sync_conns).context("HA connection state")?;
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(ha::sync_markdown(&f, &date))
}

fn fence_section(args: &Args) -> Result<String> {
    let runs = args.runs.min(5);
    let res = fence::measure(args.fence_routers, runs).context("fencing many routers")?;
    for r in &res {
        eprintln!(
            "fence {} routers, {} at a time: {} ms",
            args.fence_routers,
            r.workers,
            r.ms.fmt(0)
        );
    }
    Ok(fence::section(&res, args.fence_routers, runs, &date_utc()))
}

fn verify_section(args: &Args) -> Result<String> {
    let res = pkt::verify_cost(args.runs).context("checksum verification on its own")?;
    Ok(pkt::verify_section(&res, args.runs, &date_utc()))
}

fn attach_section(args: &Args) -> Result<String> {
    let res =
        attach::measure(args.attach_devices, args.runs.min(5)).context("attach costs per mode")?;
    for r in &res {
        eprintln!(
            "attach {}: {} ms per device, detach {} ms",
            r.mode,
            r.attach_ms.fmt(2),
            r.detach_ms.fmt(2)
        );
    }
    Ok(attach::section(
        &res,
        args.attach_devices,
        args.runs.min(5),
        &date_utc(),
    ))
}

fn fib_section(args: &Args) -> Result<String> {
    Ok(fib::section(&fib_figures(args)?, args.runs, &date_utc()))
}

fn fib_figures(args: &Args) -> Result<Vec<fib::FibResult>> {
    let mut res = Vec::new();
    for ipv6 in [false, true] {
        for &n in &args.fib_sizes {
            let r = fib::measure(n, args.runs, ipv6)
                .with_context(|| format!("our lookup against the kernel's FIB, {n} routes"))?;
            eprintln!(
                "fib {} {n}: ours {} ns (warm {}), kernel FIB {} ns (warm {}); ip -batch {:.1} s",
                if ipv6 { "IPv6" } else { "IPv4" },
                r.ours_ns.fmt(1),
                r.ours_warm_ns.fmt(1),
                r.kernel_ns.fmt(1),
                r.kernel_warm_ns.fmt(1),
                r.kernel_install_s
            );
            res.push(r);
        }
    }
    Ok(res)
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn follow_section(args: &Args) -> Result<String> {
    let f = follow::run(args.runs.min(5)).context("a followed router beside the kernel")?;
    Ok(follow::markdown(&f, &date_utc()))
}

/// Single-route changes under traffic for both families, and the real binary's `route batch`.
fn update_figures(args: &Args) -> Result<(Vec<updates::UpdateRate>, updates::BatchFigures)> {
    let mut rates = Vec::new();
    for ipv6 in [false, true] {
        rates.push(
            updates::update_rate(args.update_routes, ipv6, args.runs.min(5), 2.0)
                .context("single-route changes under traffic")?,
        );
    }
    let batch = updates::batch_figures(args.update_routes, 100_000).context("route batch")?;
    Ok((rates, batch))
}

fn ha_section(args: &Args) -> Result<String> {
    let f = ha::run(args.runs.min(5), args.ha_routers, args.ha_agents)
        .context("the multi-host agent")?;
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(ha::markdown(&f, &date))
}

fn conns_figures(args: &Args) -> Result<conns::ConnBench> {
    conns::run(
        args.runs,
        args.conns_warmup,
        args.conns_secs,
        args.conns_ports,
        &args.conns_only,
    )
    .context("request-shaped connections")
}

/// The hand-written notes of a report: each block from `<!-- note -->` to `<!-- /note -->`.
fn notes(report: &str) -> Vec<&str> {
    let (open, close) = ("<!-- note -->", "<!-- /note -->");
    let mut out = Vec::new();
    let mut rest = report;
    while let Some(a) = rest.find(open) {
        let Some(b) = rest[a..].find(close) else {
            break;
        };
        out.push(&rest[a..a + b + close.len()]);
        rest = &rest[a + b + close.len()..];
    }
    out
}

/// Replaces the section between `<!-- NAME -->` and `<!-- /NAME -->` of the report at `out`
/// with `section` (which carries the markers), or appends it.
fn replace_section(out: &std::path::Path, name: &str, section: &str) -> Result<()> {
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->\n"));
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{}{}", &old[..a], section, &old[b + close.len()..])
        }
        _ => format!("{old}\n{section}"),
    };
    std::fs::write(out, new).with_context(|| format!("writing {}", out.display()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    if args.only_ha {
        let section = ha_section(&args)?;
        let old = std::fs::read_to_string(&args.out).unwrap_or_default();
        let new = match (old.find("<!-- ha -->"), old.find("<!-- /ha -->")) {
            (Some(a), Some(b)) => format!(
                "{}{}{}",
                &old[..a],
                section,
                &old[b + "<!-- /ha -->\n".len().min(old.len() - b)..]
            ),
            _ => format!("{old}\n{section}"),
        };
        std::fs::write(&args.out, new)?;
        println!("wrote the multi-host section of {}", args.out.display());
        return Ok(());
    }
    if args.only_ha_sync {
        let section = ha_sync_section(&args)?;
        print!("{section}");
        replace_section(&args.out, "ha-sync", &section)?;
        println!(
            "wrote the HA connection-state section of {}",
            args.out.display()
        );
        return Ok(());
    }
    if args.only_conns {
        let c = conns_figures(&args)?;
        let section = report::conns_section(&c, Some(&date_utc()));
        print!("{section}");
        replace_section(&args.out, "conns", &section)?;
        println!(
            "wrote the request-shaped connections section of {} in {:.0} s",
            args.out.display(),
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if args.only_follow {
        let section = follow_section(&args)?;
        print!("{section}");
        replace_section(&args.out, "follow", &section)?;
        return Ok(());
    }
    if args.only_two_cores {
        for r in e2e::two_cores(args.runs)? {
            println!(
                "{} {} cores: router ÷ kernel {}, router ÷ wire {}, router on 2 ÷ on 1 {}",
                if r.ipv6 { "IPv6" } else { "IPv4" },
                r.cores,
                r.router_over_kernel.fmt(2),
                r.router_over_wire.fmt(2),
                r.router_over_one_core.map(|s| s.fmt(2)).unwrap_or_default()
            );
        }
        return Ok(());
    }
    if args.only_verify {
        let section = verify_section(&args)?;
        print!("{section}");
        replace_section(&args.out, "verify", &section)?;
        return Ok(());
    }
    if args.only_fence {
        let section = fence_section(&args)?;
        print!("{section}");
        replace_section(&args.out, "fence", &section)?;
        return Ok(());
    }
    if args.only_attach {
        let section = attach_section(&args)?;
        print!("{section}");
        replace_section(&args.out, "attach", &section)?;
        return Ok(());
    }
    if args.only_fib {
        let section = fib_section(&args)?;
        print!("{section}");
        replace_section(&args.out, "fib", &section)?;
        return Ok(());
    }
    if args.only_probe {
        probe::run(&PROBE_GROUPS, args.runs)?;
        return Ok(());
    }
    if args.only_updates {
        update_figures(&args)?;
        return Ok(());
    }
    let mut pkt = Vec::new();
    let sizes = args.sizes.iter().map(|n| (*n, false));
    for (n, ipv6) in sizes.chain(args.sizes6.iter().map(|n| (*n, true))) {
        let fam = if ipv6 { "IPv6" } else { "IPv4" };
        let r = pkt::measure(n, args.runs, ipv6)
            .with_context(|| format!("per-packet cost with {n} {fam} routes"))?;
        eprintln!(
            "per-packet, {n} {fam} routes: forward {} ns, pass {} ns, warm {} ns, install {:.2} s, {:.1} MiB",
            r.forward_ns.fmt(1),
            r.pass_ns.fmt(1),
            r.forward_warm_ns.fmt(1),
            r.install_s,
            r.routes_memlock as f64 / 1048576.0
        );
        pkt.push(r);
    }
    let e2e = if args.no_e2e {
        None
    } else {
        let (mut res, upd) = e2e::run(args.runs).context("end-to-end comparison")?;
        res.extend(e2e::two_cores(args.runs).context("end-to-end, two cores receiving")?);
        Some((res, upd))
    };
    let (tcp, small) = if args.no_skb {
        (None, None)
    } else {
        (
            Some(skb::tcp(args.runs).context("bulk TCP")?),
            Some(skb::small_udp(args.runs).context("small UDP from an skb sender")?),
        )
    };
    let nat = if args.no_nat {
        None
    } else {
        Some(nat::run(args.runs).context("NAT beside the kernel's NAT")?)
    };
    let conns = if args.no_conns {
        None
    } else {
        Some(conns_figures(&args)?)
    };
    let apply = if args.no_apply {
        None
    } else {
        Some(
            ctl::apply_scale(
                args.runs.min(5),
                (args.apply_big > 0).then_some(args.apply_big),
            )
            .context("apply at scale")?,
        )
    };
    let updates = if args.no_updates {
        None
    } else {
        Some(update_figures(&args)?)
    };
    let fib = if args.no_fib {
        None
    } else {
        Some(fib_figures(&args)?)
    };
    let probe = probe::run(&PROBE_GROUPS, args.runs).context("cold read probe")?;
    let neigh = ctl::neighbour_latency(20).context("neighbour latency")?;
    eprintln!("neighbour latency {} ms", neigh.total_ms.fmt(2));
    let report = report::Report {
        runs: args.runs,
        pkt: &pkt,
        e2e: e2e.as_ref(),
        neigh: Some(&neigh),
        tcp: tcp.as_deref(),
        small: small.as_deref(),
        apply: apply.as_ref(),
        nat: nat.as_ref(),
        conns: conns.as_ref(),
        updates: updates.as_ref(),
        probe: Some(&probe),
        fib: fib.as_deref(),
        seconds: start.elapsed().as_secs_f64(),
    };
    let mut md = report.markdown();
    if let Some(f) = &fib {
        md += "\n";
        md += &fib::section(f, args.runs, &date_utc());
    }
    md += "\n";
    md += &verify_section(&args)?;
    if args.attach_devices > 0 && !args.no_apply {
        md += "\n";
        md += &attach_section(&args)?;
    }
    if args.fence_routers > 0 && !args.no_ha {
        md += "\n";
        md += &fence_section(&args)?;
    }
    if !args.no_follow {
        md += "\n";
        md += &follow_section(&args)?;
    }
    if !args.no_ha {
        md += "\n";
        md += &ha_section(&args)?;
        md += "\n";
        md += &ha_sync_section(&args)?;
    }
    // Accounts written by hand (profiles, experiments), each between `<!-- note -->` and
    // `<!-- /note -->`, outlive a new run: they carry their own dates.
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    for n in notes(&old) {
        md += "\n";
        md += n;
        md += "\n";
    }
    std::fs::write(&args.out, md).with_context(|| format!("writing {}", args.out.display()))?;
    let plot = args.out.with_file_name("bench-plot.svg");
    std::fs::write(&plot, report.svg()).with_context(|| format!("writing {}", plot.display()))?;
    println!(
        "wrote {} and {} in {:.0} s",
        args.out.display(),
        plot.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hand_written_notes_are_found_whole_and_in_order() {
        let r = "# B\n<!-- note -->\nfirst\n<!-- /note -->\ntable\n<!-- note -->second<!-- /note -->\n<!-- note -->cut";
        assert_eq!(
            super::notes(r),
            vec![
                "<!-- note -->\nfirst\n<!-- /note -->",
                "<!-- note -->second<!-- /note -->"
            ]
        );
        assert!(super::notes("no notes").is_empty());
    }
}

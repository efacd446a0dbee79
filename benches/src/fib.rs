//! Our lookup against the kernel's FIB at the same size: the router's program with a random
//! table of N prefixes, and `bench_fib` (router-ebpf/src/bench.rs: `bpf_fib_lookup` in the
//! namespace's main table holding the same N routes, the way an XDP router on the kernel's FIB
//! forwards) on the same frames, each destination once (cold: its lookup path out of the
//! caches, as with many flows) and a few destinations repeated (warm), in one run. Per-packet
//! ns as BPF_PROG_TEST_RUN reports them, the test-run floor subtracted.

use std::{io::Write as _, time::Instant};

use anyhow::{ensure, Context as _, Result};
use aya::maps::Array;
use router_ctl::datapath;

use crate::{
    pkt::{self, Bed, DESTINATIONS, REPEAT, WARM_DESTINATIONS, WARM_REPEAT},
    stats::{summarize, Rng, Summary},
};

/// XDP_REDIRECT: what both programs return for a forwarded frame.
const REDIRECT: u32 = 4;

#[derive(Debug, Clone)]
pub struct FibResult {
    pub routes: usize,
    pub ipv6: bool,
    /// Our program, each destination once (cold) and repeated (warm).
    pub ours_ns: Summary,
    pub ours_warm_ns: Summary,
    /// `bench_fib` over the kernel's FIB, the same.
    pub kernel_ns: Summary,
    pub kernel_warm_ns: Summary,
    /// Seconds `ip -batch` took to install the routes in the kernel's FIB.
    pub kernel_install_s: f64,
}

pub fn measure(routes: usize, runs: usize, ipv6: bool) -> Result<FibResult> {
    std::thread::spawn(move || measure_here(routes, runs, ipv6))
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

/// The same routes in the namespace's main table (through `e0`, nexthops with permanent
/// neighbours) and forwarding on: what `bpf_fib_lookup` finds.
fn kernel_table(bed: &Bed, ipv6: bool) -> Result<f64> {
    let (addr, fwd) = if ipv6 {
        ("2001:db8:2::1/64 nodad", "net.ipv6.conf.all.forwarding=1")
    } else {
        ("10.2.0.1/24", "net.ipv4.ip_forward=1")
    };
    tests::sh(&format!("ip addr add {addr} dev e0 && sysctl -qw {fwd}"));
    let mut batch = String::with_capacity(bed.table.len() * 48);
    for i in 0..8 {
        batch.push_str(&format!(
            "neigh replace {} lladdr {} dev e0 nud permanent\n",
            pkt::nexthop(i, ipv6),
            router_ctl::config::Mac(pkt::IN_MAC)
        ));
    }
    for (i, net) in bed.table.iter().enumerate() {
        batch.push_str(&format!(
            "route add {net} via {} dev e0\n",
            pkt::nexthop(i, ipv6)
        ));
    }
    let t = Instant::now();
    let mut ip = std::process::Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("ip -batch")?;
    ip.stdin
        .take()
        .context("ip's stdin")?
        .write_all(batch.as_bytes())?;
    ensure!(
        ip.wait()?.success(),
        "ip -batch failed to install the routes"
    );
    Ok(t.elapsed().as_secs_f64())
}

fn measure_here(routes: usize, runs: usize, ipv6: bool) -> Result<FibResult> {
    let mut bed = Bed::build(routes, ipv6)?;
    pkt::set_neighbours(&mut bed.ebpf, bed.e0, true, ipv6)?;
    let kernel_install_s = kernel_table(&bed, ipv6)?;
    let mut helpers = pkt::bench_programs(&["bench_wire", "bench_fib"])?;
    let e1 = pkt::ifindex("e1")?;
    Array::<_, u32>::try_from(helpers.map_mut("FIB_IN").context("FIB_IN")?)?.set(0, e1, 0)?;
    let (wire, fib) = (
        pkt::bench_program(&helpers, "bench_wire")?,
        pkt::bench_program(&helpers, "bench_fib")?,
    );
    let mut rng = Rng::new(42);
    let frames = pkt::frames_into(&bed.table, DESTINATIONS, &mut rng);
    let warm = &frames[..WARM_DESTINATIONS];
    let (mut ours, mut kern, mut ours_w, mut kern_w) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let f = pkt::run_frames(wire, &frames, 2, REPEAT)?;
        ours.push(
            pkt::run_frames(datapath::program(&mut bed.ebpf)?, &frames, REDIRECT, REPEAT)? - f,
        );
        kern.push(pkt::run_frames(fib, &frames, REDIRECT, REPEAT)? - f);
        let fw = pkt::run_frames(wire, warm, 2, WARM_REPEAT)?;
        ours_w.push(
            pkt::run_frames(
                datapath::program(&mut bed.ebpf)?,
                warm,
                REDIRECT,
                WARM_REPEAT,
            )? - fw,
        );
        kern_w.push(pkt::run_frames(fib, warm, REDIRECT, WARM_REPEAT)? - fw);
    }
    Ok(FibResult {
        routes,
        ipv6,
        ours_ns: summarize(&ours),
        ours_warm_ns: summarize(&ours_w),
        kernel_ns: summarize(&kern),
        kernel_warm_ns: summarize(&kern_w),
        kernel_install_s,
    })
}

/// The report's section: per family and size, both programs cold and warm, and the ratio.
pub fn section(res: &[FibResult], runs: usize, date: &str) -> String {
    let mut md = format!(
        "<!-- fib -->\n## Our lookup against the kernel's FIB at the same size\n\n{date}. The router's XDP program with a random table of N prefixes (the per-packet benchmark's tables: IPv4 lengths 8–32, IPv6 16–64, 8 nexthops), and beside it in the same namespace and run `bench_fib`, an XDP program that forwards as the kernel's `xdp_fwd` sample and xdp-forward do: parse, `bpf_fib_lookup` (`BPF_FIB_LOOKUP_DIRECT`: the main table, with its neighbour) over the namespace's FIB holding the same N routes (installed with `ip -batch`), MAC rewrite, TTL or hop limit decrement, `bpf_redirect`. Both on the same {DESTINATIONS} frames, each to its own random destination in a random prefix, once each (cold: the lookup's path out of the caches) and {WARM_DESTINATIONS} of them {WARM_REPEAT} times in a row (warm); ns per packet as BPF_PROG_TEST_RUN reports them, minus a program that returns at once. Medians (min–max) of {runs} runs.\n\n| family | routes | ours, cold (ns) | kernel FIB, cold (ns) | ours ÷ kernel, cold | ours, warm (ns) | kernel FIB, warm (ns) | ours ÷ kernel, warm |\n|---|---|---|---|---|---|---|---|\n"
    );
    for r in res {
        md += &format!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} |\n",
            if r.ipv6 { "IPv6" } else { "IPv4" },
            r.routes,
            r.ours_ns.fmt(1),
            r.kernel_ns.fmt(1),
            r.ours_ns.median / r.kernel_ns.median,
            r.ours_warm_ns.fmt(1),
            r.kernel_warm_ns.fmt(1),
            r.ours_warm_ns.median / r.kernel_warm_ns.median,
        );
    }
    md += "\nOur program does more per packet than `bench_fib` (its counters, the NAT and policy checks): the ratio bounds from above what our lookup costs against the kernel's.\n<!-- /fib -->\n";
    md
}

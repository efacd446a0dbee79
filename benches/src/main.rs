//! `cargo xtask bench`: the benchmark suite, written to BENCHMARKS.md with a plot.

mod e2e;
mod pkt;
mod stats;
mod table;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Runs per figure (the median of them is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Route table sizes for the per-packet cost.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
    sizes: Vec<usize>,
    /// Interleaved rounds of the end-to-end comparison (0 skips it).
    #[arg(long, default_value_t = 5)]
    e2e_rounds: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for &n in &args.sizes {
        let r = pkt::measure(n, args.runs)?;
        println!("{n:>8} routes: floor {} ns, forward {} ns, pass {} ns, install {:.2} s, ROUTES memlock {:.1} MiB",
            r.floor_ns.fmt(1), r.forward_ns.fmt(1), r.pass_ns.fmt(1), r.install_s, r.routes_memlock as f64 / 1048576.0);
    }
    if args.e2e_rounds > 0 {
        for r in e2e::run(args.e2e_rounds)? {
            for (m, s) in &r.mpps {
                println!("{} flow(s) {}: {} Mpps", r.flows, m.name(), s.fmt(3));
            }
            println!("  router/kernel {}  router/wire {}", r.router_over_kernel.fmt(2), r.router_over_wire.fmt(2));
        }
    }
    Ok(())
}

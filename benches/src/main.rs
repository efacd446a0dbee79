//! `cargo xtask bench`: the benchmark suite, written to BENCHMARKS.md with a plot.

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
}

fn main() -> Result<()> {
    let args = Args::parse();
    for &n in &args.sizes {
        let r = pkt::measure(n, args.runs)?;
        println!("{n:>8} routes: floor {} ns, forward {} ns, pass {} ns, install {:.2} s, ROUTES memlock {:.1} MiB",
            r.floor_ns.fmt(1), r.forward_ns.fmt(1), r.pass_ns.fmt(1), r.install_s, r.routes_memlock as f64 / 1048576.0);
    }
    Ok(())
}

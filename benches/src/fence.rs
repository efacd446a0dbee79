//! What fencing costs when many HA routers lead on one host: the fencer's work once the
//! deadline passed (an nftables fence in each router's namespace), for N routers, one at a
//! time and `fence::FENCE_WORKERS` at a time (what the fencer does), against the margin the
//! deadline leaves before the lease can expire on the server.

use std::time::Instant;

use anyhow::Result;
use router_ctl::{
    agent::{fence, hold},
    state::RouterState,
};

use crate::stats::{summarize, Summary};

#[derive(Debug, Clone)]
pub struct FenceCost {
    pub workers: usize,
    pub ms: Summary,
}

/// The margin between the fencer's deadline and the lease's end with the default TTL.
pub fn margin_ms() -> f64 {
    let ttl = router_ctl::agent::DEFAULT_LEASE_TTL;
    (ttl.as_nanos() as u64 - fence::deadline(0, ttl)) as f64 / 1e6
}

pub fn measure(routers: usize, runs: usize) -> Result<Vec<FenceCost>> {
    let tag = std::process::id();
    let states: Vec<RouterState> = (0..routers)
        .map(|i| {
            let ns = format!("fb{tag}-{i}");
            tests::sh(&format!("ip netns add {ns}"));
            RouterState::empty(&ns, &ns, &ns)
        })
        .collect();
    let mut out = Vec::new();
    let result = (|| -> Result<()> {
        for workers in [1, fence::FENCE_WORKERS] {
            let mut v = Vec::new();
            for _ in 0..runs {
                for st in &states {
                    hold::unfence(st)?;
                }
                let t = Instant::now();
                fence::fence_all(&states, workers);
                v.push(t.elapsed().as_secs_f64() * 1e3);
                // Every namespace holds its fence.
                for st in &states {
                    let tables =
                        tests::sh(&format!("ip netns exec {} nft list tables", st.namespace));
                    anyhow::ensure!(
                        tables.contains("router_fence"),
                        "{} was not fenced",
                        st.namespace
                    );
                }
            }
            out.push(FenceCost {
                workers,
                ms: summarize(&v),
            });
        }
        Ok(())
    })();
    for st in &states {
        let _ = tests::sh_out(&format!("ip netns del {}", st.namespace));
    }
    result.map(|_| out)
}

/// The report's section.
pub fn section(res: &[FenceCost], routers: usize, runs: usize, date: &str) -> String {
    let margin = margin_ms();
    let mut md = format!(
        "<!-- fence -->\n## Fencing many HA routers at once\n\n{date}. {routers} router namespaces on one host; the fencer's work once its deadline passed: the nftables fence (`table arp router_fence`, `table ip6 router_fence`) put up in every namespace. ms for all of them, medians (min–max) of {runs} runs; the margin the deadline leaves before the lease can expire on the server is {margin:.0} ms with the default 2 s TTL.\n\n| fences at a time | all {routers} fenced (ms) | inside the margin |\n|---|---|---|\n"
    );
    for r in res {
        md += &format!(
            "| {}{} | {} | {} |\n",
            r.workers,
            if r.workers == fence::FENCE_WORKERS {
                " (the fencer)"
            } else {
                ""
            },
            r.ms.fmt(0),
            if r.ms.median <= margin {
                "yes"
            } else {
                "**no**"
            }
        );
    }
    md += "\nEach fence is one `nft -f` run in the router's namespace (a process, a netlink transaction): there is no transaction across namespaces, so the fencer runs them side by side.\n<!-- /fence -->\n";
    md
}

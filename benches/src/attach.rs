//! What attaching the router's programs to a new device costs the kernel, per attach mode:
//! the router's tc program at tcx ingress through a bpf_link (what `apply` does), the same
//! program as a legacy tc filter (a `clsact` qdisc and a `cls_bpf` filter over netlink), and
//! the XDP program in native mode on a veth (a bpf_link). One device after the other, as the
//! kernel serialises them all under the RTNL; then each detached the same way. Per device, ms.

use std::time::Instant;

use anyhow::{Context as _, Result};
use aya::programs::{
    tc::{NlOptions, TcAttachOptions, TcAttachType},
    LinkOrder, XdpMode,
};
use router_ctl::datapath;

use crate::stats::{summarize, Summary};

#[derive(Debug, Clone)]
pub struct AttachCost {
    pub mode: &'static str,
    pub attach_ms: Summary,
    pub detach_ms: Summary,
}

/// Modes in the order they are reported.
pub const MODES: [&str; 3] = [
    "tcx link (apply's choice)",
    "legacy tc (clsact + cls_bpf)",
    "XDP link, native on veth",
];

pub fn measure(devices: usize, runs: usize) -> Result<Vec<AttachCost>> {
    std::thread::spawn(move || measure_here(devices, runs))
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

fn measure_here(devices: usize, runs: usize) -> Result<Vec<AttachCost>> {
    tests::unshare_netns();
    for i in 0..devices {
        tests::sh(&format!(
            "ip link add a{i} type veth peer name b{i} && ip link set a{i} up && ip link set b{i} up"
        ));
    }
    let mut ebpf = datapath::load_unpinned()?;
    let mut per: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); MODES.len()];
    for _ in 0..runs {
        for (m, (att, det)) in per.iter_mut().enumerate() {
            let (a, d) = match m {
                0 | 1 => per_device(
                    datapath::tc_program(&mut ebpf)?,
                    devices,
                    |p, dev| {
                        let opts = if m == 0 {
                            TcAttachOptions::TcxOrder(LinkOrder::default())
                        } else {
                            // EEXIST: the qdisc is there from an earlier run.
                            let _ = aya::programs::tc::qdisc_add_clsact(dev);
                            TcAttachOptions::Netlink(NlOptions::default())
                        };
                        Ok(p.attach_with_options(dev, TcAttachType::Ingress, opts)?)
                    },
                    |p, id| Ok(p.detach(id)?),
                ),
                _ => per_device(
                    datapath::program(&mut ebpf)?,
                    devices,
                    |p, dev| Ok(p.attach(dev, XdpMode::Driver)?),
                    |p, id| Ok(p.detach(id)?),
                ),
            }
            .with_context(|| MODES[m])?;
            att.push(a);
            det.push(d);
        }
    }
    Ok(MODES
        .iter()
        .zip(per)
        .map(|(mode, (a, d))| AttachCost {
            mode,
            attach_ms: summarize(&a),
            detach_ms: summarize(&d),
        })
        .collect())
}

/// Attaches to devices `a0`… one after the other, then detaches them the same way: ms per
/// device for each.
fn per_device<P, I>(
    prog: &mut P,
    devices: usize,
    attach: impl Fn(&mut P, &str) -> Result<I>,
    detach: impl Fn(&mut P, I) -> Result<()>,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let mut ids = Vec::with_capacity(devices);
    for i in 0..devices {
        let dev = format!("a{i}");
        ids.push(attach(prog, &dev).with_context(|| format!("on {dev}"))?);
    }
    let attached = t.elapsed().as_secs_f64() * 1e3 / devices as f64;
    let t = Instant::now();
    for id in ids {
        detach(prog, id)?;
    }
    Ok((attached, t.elapsed().as_secs_f64() * 1e3 / devices as f64))
}

/// The report's section.
pub fn section(res: &[AttachCost], devices: usize, runs: usize, date: &str) -> String {
    let mut md = format!(
        "<!-- attach -->\n## What attaching to a new device costs, per attach mode\n\n{date}. {devices} veth devices in one namespace; the router's programs attached to each in turn (the kernel serialises attaches under the RTNL, so one at a time is what many routers at once get too), then detached. Per device, ms; medians (min–max) of {runs} runs.\n\n| mode | attach (ms per device) | detach (ms per device) |\n|---|---|---|\n"
    );
    for r in res {
        md += &format!(
            "| {} | {} | {} |\n",
            r.mode,
            r.attach_ms.fmt(2),
            r.detach_ms.fmt(2)
        );
    }
    md += "\nA tcx link waits for an RCU grace period with the RTNL held, on attach and on detach (kernel/bpf/tcx.c: the program list is swapped and old readers waited for); with the kernel's 250 Hz tick that is a few jiffies. `apply` keeps tcx for what it gives (the link is ours: no `tc` command of another tool removes or reorders it, a pinned link survives the daemon, and a new program replaces the old one in place with no packet lost), so a router with two devices costs two grace periods that no parallelism can share. A legacy filter's first attach waits only for an expedited grace period, but any `tc qdisc del … clsact` (Neutron's, an operator's) takes it away unseen; XDP on a veth takes skbs out of GSO (see the hooks section).\n<!-- /attach -->\n";
    md
}

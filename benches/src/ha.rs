//! The etcd agent on several hosts (namespaces, `tests::cluster`): HA failover time, CLI change
//! → the remote host's kernel, and convergence of many routers over many agents from empty and
//! after an etcd restart.

use std::{
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use tests::cluster::{first_answer, ArpWatch, Cluster, ROUTER_ID};

use crate::stats::{summarize, Summary};

pub struct Figures {
    pub failover_s: Summary,
    pub graceful_s: Summary,
    pub cli_ms: Summary,
    pub routers: usize,
    pub agents: usize,
    pub converge_s: f64,
    pub etcd_restart_s: f64,
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > within {
            bail!("timed out after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(t.elapsed())
}

fn active_of(c: &Cluster) -> Option<usize> {
    c.show()["active_host"].as_str().map(|h| c.index(h))
}

pub fn run(runs: usize, routers: usize, agents: usize) -> Result<Figures> {
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    c.define_router(true);
    c.wait_scheduled(2, Duration::from_secs(20));
    c.wait_converged(Duration::from_secs(20));
    c.wait_ping(Duration::from_secs(10));
    let (mut failover, mut graceful, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs * 2 {
        let active = c.wait_converged(Duration::from_secs(30));
        let standby = 1 - active;
        wait_until(Duration::from_secs(30), || {
            c.role(standby).as_deref() == Some("standby")
        })?;
        let arp = ArpWatch::start(&c);
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        if round % 2 == 0 {
            c.kill_agent(active);
        } else {
            c.stop_agent(active);
        }
        wait_until(Duration::from_secs(15), || {
            active_of(&c) == Some(standby) && c.addresses(standby).contains("172.16.100.1/24")
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let rounds = arp.stop();
        let took = first_answer(&rounds, &c.hosts[standby].mac1, t)
            .ok_or_else(|| anyhow::anyhow!("the standby never answered"))?;
        tests::cluster::answering(&rounds);
        if round % 2 == 0 {
            failover.push(took.as_secs_f64());
        } else {
            graceful.push(took.as_secs_f64());
        }
        eprintln!(
            "ha: round {round}: {} → answered after {took:?}",
            if round % 2 == 0 { "kill -9" } else { "SIGTERM" }
        );
        c.start_agent(active);
        // CLI → the active host's kernel (a route added, then removed).
        let active = standby;
        let ns = c.hosts[active].router_ns(ROUTER_ID);
        let dest = format!("10.{}.0.0/16", 10 + round);
        let t = Instant::now();
        c.ctl_ok(&[
            "router",
            "add",
            "route",
            "r1",
            "--route",
            &format!("destination={dest},gateway=172.16.101.254"),
        ]);
        wait_until(Duration::from_secs(5), || {
            tests::sh(&format!("ip -n {ns} route")).contains(&dest)
        })?;
        cli.push(t.elapsed().as_secs_f64() * 1000.0);
        c.ctl_ok(&[
            "router",
            "remove",
            "route",
            "r1",
            "--route",
            &format!("destination={dest},gateway=172.16.101.254"),
        ]);
    }
    drop(c);
    let (converge_s, etcd_restart_s) = scale(routers, agents)?;
    Ok(Figures {
        failover_s: summarize(&failover),
        graceful_s: summarize(&graceful),
        cli_ms: summarize(&cli),
        routers,
        agents,
        converge_s,
        etcd_restart_s,
    })
}

/// `routers` single-interface routers defined in etcd, then `agents` agents started: the time
/// until every router is reported applied at its generation; then etcd killed and restarted:
/// the time until that holds again and a change made then reached its host.
fn scale(routers: usize, agents: usize) -> Result<(f64, f64)> {
    let mut c = Cluster::new(agents);
    let fabric = c.fabric.clone();
    let texts: Vec<String> = (0..routers)
        .map(|i| {
            format!(
                "[[router]]\nid = \"{i:08x}-0000-4000-8000-00000000beef\"\nname = \"scale{i}\"\n[[router.interface]]\nport_id = \"{i:08x}-1111-4111-8111-00000000beef\"\nsubnet = \"10.{}.{}.0/24\"\ngateway_ip = \"10.{}.{}.1\"\n",
                i / 256, i % 256, i / 256, i % 256
            )
        })
        .collect();
    // The definitions, written from the fabric namespace through the CLI's own store.
    let texts2 = texts.clone();
    std::thread::spawn(move || -> Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{fabric}"))?;
        // SAFETY: setns on this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns");
        }
        let s = router_ctl::agent::store::Store::connect(
            &router_ctl::agent::access::Access::plain(tests::cluster::ETCD)?,
        )?;
        for t in &texts2 {
            s.put(t)?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let converged = |c: &Cluster| -> bool {
        let v = c.ctl_json(&["router", "list"]);
        v.as_array()
            .is_some_and(|a| a.len() == routers && a.iter().all(|r| r["status"] == "ACTIVE"))
    };
    let t = Instant::now();
    for i in 0..agents {
        c.start_agent(i);
    }
    let mut ok = false;
    while t.elapsed() < Duration::from_secs(600) {
        if converged(&c) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if !ok {
        bail!("{routers} routers over {agents} agents did not converge in 600 s");
    }
    let converge = t.elapsed().as_secs_f64();
    eprintln!("ha: {routers} routers over {agents} agents converged in {converge:.1} s");
    let t = Instant::now();
    c.kill_etcd();
    c.start_etcd();
    // A change made as soon as etcd is back must reach its host (the watches resumed).
    c.ctl_ok(&[
        "router",
        "add",
        "route",
        "scale0",
        "--route",
        "destination=192.168.77.0/24,gateway=10.0.0.254",
    ]);
    let mut ok = false;
    while t.elapsed() < Duration::from_secs(300) {
        if converged(&c) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !ok {
        bail!("no convergence after the etcd restart");
    }
    let restart = t.elapsed().as_secs_f64();
    eprintln!("ha: converged again {restart:.1} s after the etcd restart");
    drop(c);
    // Each agent destroyed nothing on stop: clean the router namespaces up.
    for ns in tests::sh("ip netns list").lines() {
        let n = ns.split_whitespace().next().unwrap_or("");
        if n.starts_with("qrouter-") && n.ends_with("-00000000beef") {
            let _ = tests::sh_out(&format!("ip netns del {n}"));
        }
    }
    Ok((converge, restart))
}

/// The section of BENCHMARKS.md.
pub fn markdown(f: &Figures, date: &str) -> String {
    let mut s = String::new();
    s += "<!-- ha -->\n## Multi-host agent on etcd (issue 13)\n\n";
    s += &format!("Measured {date} on this machine: two agents (`tests::cluster`: hosts as namespaces, etcd 3.4 in its own namespace), lease TTL 2 s (the default), an HA router; ARP asked every 10 ms from a probe on the tenant network.\n\n");
    s += "| figure | median (min–max) | goal |\n|---|---|---|\n";
    s += &format!("| failover: active agent `kill -9` → the standby answers ARP for the gateway | {} s | ≤ 3 s (Neutron keepalived: 6–7 s) — {} |\n", f.failover_s.fmt(2), if f.failover_s.median <= 3.0 { "met" } else { "missed" });
    s += &format!("| switchover: active agent SIGTERM (resigns) → the standby answers | {} s | sub-second — {} |\n", f.graceful_s.fmt(2), if f.graceful_s.max < 1.0 { "met" } else { "missed" });
    s += &format!("| CLI `router add route` → the route in the remote active host's kernel | {} ms | ≤ 200 ms — {} |\n", f.cli_ms.fmt(1), if f.cli_ms.median <= 200.0 { "met" } else { "missed" });
    s += &format!("| {} routers over {} agents, from empty hosts → every router reported applied | {:.1} s | reported |\n", f.routers, f.agents, f.converge_s);
    s += &format!("| etcd killed and restarted → every router reported applied again, and a change made then applied | {:.1} s | reported |\n", f.etcd_restart_s);
    s += "\nThe failover time is the lease TTL (the standby acts when the dead host's lease expires) plus the election, an apply (the routes and addresses) and the first ARP answer; in the same case `tests/tests/ha.rs` loses no packet of a 10 ms ping through the router (the old active's fast path keeps forwarding until the client moves to the new MAC). With no agent alive on the old active host, its fencer stopped it answering for the addresses first (before the TTL ran out), so two hosts never answered in one 10 ms round.\n<!-- /ha -->\n";
    s
}

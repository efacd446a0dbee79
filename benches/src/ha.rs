//! The etcd agent on several hosts (namespaces, `tests::cluster`): HA failover time, CLI change
//! → the remote host's kernel, and convergence of many routers over many agents from empty and
//! after an etcd restart.

use std::{
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
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

/// HA connection state (issue 26): what survives a failover with the agents replicating
/// connection state and without, and what replication costs the active host.
pub struct SyncFigures {
    pub conns: usize,
    /// Connections (of `conns`) that survived the active agent's kill -9, per round.
    pub survived_with: Vec<usize>,
    pub survived_without: Vec<usize>,
    /// From the last connection opened to all of them on the standby, ms.
    pub lag_ms: Summary,
    /// New TCP connections per second through SNAT, with replication and without.
    pub rate_with: Summary,
    pub rate_without: Summary,
    pub ratios: Summary,
    /// CPU time of the active host's agent during the rate measurement, ms per second, with
    /// replication and without.
    pub cpu_with: Summary,
    pub cpu_without: Summary,
    /// Rounds (with replication) in which the connection opened `LATE_MS[k]` before the kill
    /// survived.
    pub late_survived: [usize; LATE_MS.len()],
    pub rounds: usize,
}

/// `n` long-lived TCP connections from vm1 through SNAT to the outside, each writing 64
/// bytes every 100 ms until told to stop; the count that ended clean (no error on either
/// side, every byte received).
struct Conns {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Each client's bytes sent, clean end and local port.
    clients: Vec<std::thread::JoinHandle<(u64, bool, u16)>>,
    /// By connection (the id its client sent first): bytes received after the id, and a
    /// clean end.
    server: std::thread::JoinHandle<std::collections::BTreeMap<u32, (u64, bool)>>,
}

const SYNC_PORT: u16 = 7100;

fn open_conns(c: &Cluster, n: usize, port: u16) -> Conns {
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = tests::topo::in_ns(&c.public, move || {
        let l = std::net::TcpListener::bind((tests::cluster::OUTSIDE, port)).unwrap();
        ready_tx.send(()).unwrap();
        l.set_nonblocking(true).unwrap();
        let mut handlers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handlers.len() < n && Instant::now() < deadline {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let _ = s.set_nonblocking(false);
            handlers.push(std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut id = [0u8; 4];
                if s.read_exact(&mut id).is_err() {
                    return (u32::MAX, (0, false));
                }
                let (mut got, mut buf) = (0u64, [0u8; 1024]);
                let end = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break (got, true),
                        Ok(k) => got += k as u64,
                        Err(_) => break (got, false),
                    }
                };
                (u32::from_be_bytes(id), end)
            }));
        }
        handlers.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    ready_rx.recv().unwrap();
    let clients = (0..n as u32)
        .map(|id| {
            let stop = stop.clone();
            tests::topo::in_ns(&c.vm1, move || {
                let to = format!("{}:{port}", tests::cluster::OUTSIDE);
                let Ok(mut s) = std::net::TcpStream::connect(to) else {
                    return (0, false, 0);
                };
                let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
                let _ = s.set_write_timeout(Some(Duration::from_secs(20)));
                if s.write_all(&id.to_be_bytes()).is_err() {
                    return (0, false, port);
                }
                let mut sent = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if s.write_all(&[1u8; 64]).is_err() {
                        return (sent, false, port);
                    }
                    sent += 64;
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut b = [0u8; 1];
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                (sent, matches!(s.read(&mut b), Ok(0)), port)
            })
        })
        .collect();
    Conns {
        stop,
        clients,
        server,
    }
}

impl Conns {
    /// Stops the writers; the connections that ended clean with every byte received (each
    /// failure said on stderr).
    fn finish(self, before: &[(&str, Vec<router_ctl::kernel::conntrack::Flow>)]) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent: Vec<(u64, bool, u16)> = self
            .clients
            .into_iter()
            .map(|h| h.join().unwrap_or((0, false, 0)))
            .collect();
        let got = self.server.join().unwrap_or_default();
        let (mut ok, mut said) = (0, 0);
        for (id, (bytes, clean, port)) in sent.iter().enumerate() {
            let there = got.get(&(id as u32));
            if *clean && there == Some(&(*bytes, true)) && *bytes > 0 {
                ok += 1;
            } else if sent.len() > 1 && said < 5 {
                said += 1;
                eprintln!("ha-sync: connection {id} (vm1 port {port}): client sent {bytes} (clean end: {clean}), server {there:?}");
                for (what, flows) in before {
                    for f in flows
                        .iter()
                        .filter(|f| f.orig.sport == *port && f.orig.proto == 6)
                    {
                        eprintln!("ha-sync:   before the kill, {what}: {f:?}");
                    }
                }
            }
        }
        ok
    }
}

/// New TCP connections per second from vm1 through SNAT for `secs` (connect, a byte, close;
/// two clients; the server accepts and closes).
fn conn_rate(c: &Cluster, secs: f64) -> f64 {
    use std::io::Write as _;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Spread over RATE_PORTS server ports: to one port, SNAT's ports for that destination
    // (about 64 000, each held while conntrack keeps the closed connection) ran out within
    // seconds at these rates.
    let ports: Vec<u16> = (0..RATE_PORTS).map(|i| RATE_PORT + i).collect();
    let servers: Vec<_> = ports
        .iter()
        .map(|&port| {
            let s2 = stop.clone();
            tests::topo::in_ns(&c.public, move || {
                let l = std::net::TcpListener::bind((tests::cluster::OUTSIDE, port)).unwrap();
                while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(l.accept());
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let clients: Vec<_> = (0..2u16)
        .map(|k| {
            let ports = ports.clone();
            tests::topo::in_ns(&c.vm1, move || {
                let t0 = Instant::now();
                let mut n = 0u64;
                let mut i = k as usize;
                while t0.elapsed().as_secs_f64() < secs {
                    i = (i + 1) % ports.len();
                    let to = (tests::cluster::OUTSIDE, ports[i]);
                    if let Ok(mut s) = std::net::TcpStream::connect(to) {
                        let _ = s.write_all(b"x");
                        // Closed with a reset: a client in TIME_WAIT would run out of ports
                        // (28 232 per minute) within seconds, and fail the next rounds too.
                        let linger = libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        };
                        // SAFETY: setsockopt on an open socket with a value of the right size.
                        unsafe {
                            use std::os::fd::AsRawFd as _;
                            libc::setsockopt(
                                s.as_raw_fd(),
                                libc::SOL_SOCKET,
                                libc::SO_LINGER,
                                &linger as *const libc::linger as *const libc::c_void,
                                std::mem::size_of::<libc::linger>() as libc::socklen_t,
                            );
                        }
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = clients.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // One more connection to each port wakes its server's accept.
    let vm1 = c.vm1.clone();
    let _ = tests::topo::in_ns(&vm1, move || {
        for port in ports {
            drop(std::net::TcpStream::connect((
                tests::cluster::OUTSIDE,
                port,
            )));
        }
    })
    .join();
    for s in servers {
        let _ = s.join();
    }
    total as f64 / secs
}

/// The server ports of the rate measurement: `RATE_PORTS` from `RATE_PORT`.
const RATE_PORT: u16 = 7200;
const RATE_PORTS: u16 = 16;

/// Restarts both agents, with replication or without, and waits for the router.
fn agents(c: &mut Cluster, sync: bool) -> Result<usize> {
    for i in 0..2 {
        c.stop_agent(i);
    }
    for i in 0..2 {
        if sync {
            c.start_syncing_agent(i);
        } else {
            c.start_agent(i);
        }
    }
    let t = Instant::now();
    let active = c.wait_converged(Duration::from_secs(30));
    wait_until(Duration::from_secs(30), || {
        c.role(1 - active).as_deref() == Some("standby")
    })?;
    // Both paths answer (the outside's neighbour entry may still name the other host's MAC
    // until the announcements reach it): only then is anything measured.
    let outside = format!(
        "ip netns exec {} ping -c 1 -W 1 {}",
        c.vm1,
        tests::cluster::OUTSIDE
    );
    wait_until(Duration::from_secs(60), || {
        c.ping_once() && tests::sh_out(&outside).status.success()
    })
    .with_context(|| {
        format!(
            "the router did not forward after its agents restarted: {}",
            c.show()
        )
    })?;
    eprintln!(
        "ha-sync: agents restarted (replication {}), forwarding after {:?}",
        if sync { "on" } else { "off" },
        t.elapsed()
    );
    Ok(active)
}

/// One failover with `n` connections open: how many survive, and (with replication) how long
/// after the last one opened the standby held them all.
/// How long before the kill the late connections are opened, ms.
pub const LATE_MS: [u64; 6] = [400, 200, 100, 50, 25, 10];

/// One failover with `n` connections open: how many survive, how long after they were
/// started the standby held them all (with replication), and which of the late connections
/// (opened `LATE_MS` before the kill) survived.
fn failover_round(
    c: &mut Cluster,
    active: usize,
    n: usize,
    sync: bool,
) -> Result<(usize, f64, Vec<bool>)> {
    let standby = 1 - active;
    let conns = open_conns(c, n, SYNC_PORT);
    let opened = Instant::now();
    let ns = c.hosts[standby].router_ns(ROUTER_ID);
    let on_standby = || {
        tests::topo::conntrack_flows(&ns)
            .iter()
            .filter(|f| f.orig.dport == SYNC_PORT && f.tcp_state == Some(3))
            .count()
    };
    let lag = if sync {
        wait_until(Duration::from_secs(10), || on_standby() >= n)?.as_secs_f64() * 1000.0
    } else {
        0.0
    };
    let kill_at = opened + Duration::from_secs(2);
    let ns_active = c.hosts[active].router_ns(ROUTER_ID);
    let mut late = Vec::new();
    for (k, ms) in LATE_MS.iter().enumerate() {
        let at = kill_at - Duration::from_millis(*ms);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        late.push(open_conns(c, 1, SYNC_PORT + 10 + k as u16));
    }
    std::thread::sleep(kill_at.saturating_duration_since(Instant::now()));
    // What both hosts' kernels held just before (said for the connections that fail).
    let before = if sync {
        vec![
            ("active", tests::topo::conntrack_flows(&ns_active)),
            ("standby", tests::topo::conntrack_flows(&ns)),
        ]
    } else {
        Vec::new()
    };
    c.kill_agent(active);
    wait_until(Duration::from_secs(15), || {
        active_of(c) == Some(standby) && c.addresses(standby).contains("192.168.1.10/24")
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let survived = conns.finish(&before);
    let late = late.into_iter().map(|l| l.finish(&[]) == 1).collect();
    c.start_agent(active);
    Ok((survived, lag, late))
}

pub fn sync_run(runs: usize, n: usize) -> Result<SyncFigures> {
    let (mut c, _) = Cluster::ha_pair_with_gateway(false);
    let mut f = SyncFigures {
        conns: n,
        survived_with: Vec::new(),
        survived_without: Vec::new(),
        lag_ms: Summary::default(),
        rate_with: Summary::default(),
        rate_without: Summary::default(),
        ratios: Summary::default(),
        cpu_with: Summary::default(),
        cpu_without: Summary::default(),
        late_survived: [0; LATE_MS.len()],
        rounds: runs,
    };
    let (mut lags, mut with, mut without, mut ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_with, mut cpu_without) = (Vec::new(), Vec::new());
    // The rate over 5 s, and what the active agent's process spent meanwhile (ms per s).
    let rate_and_cpu = |c: &Cluster, active: usize| {
        let pid = c.agent_pid(active);
        let (t0, cpu0) = (Instant::now(), pid.and_then(cpu_ms));
        let r = conn_rate(c, 5.0);
        let cpu = match (cpu0, pid.and_then(cpu_ms)) {
            (Some(a), Some(b)) => (b - a) / t0.elapsed().as_secs_f64(),
            _ => f64::NAN,
        };
        (r, cpu)
    };
    for round in 0..runs {
        let active = agents(&mut c, false)?;
        // Settled (the applies, the announcements) before anything is measured.
        std::thread::sleep(Duration::from_secs(2));
        let (r0, u0) = rate_and_cpu(&c, active);
        let (s0, _, _) = failover_round(&mut c, active, n, false)?;
        let active = agents(&mut c, true)?;
        std::thread::sleep(Duration::from_secs(2));
        let (r1, u1) = rate_and_cpu(&c, active);
        cpu_with.push(u1);
        cpu_without.push(u0);
        let (s1, lag, late) = failover_round(&mut c, active, n, true)?;
        for (k, ok) in late.iter().enumerate() {
            f.late_survived[k] += *ok as usize;
        }
        eprintln!(
            "ha-sync: round {round}: survived {s1}/{n} with replication (standby had them {lag:.0} ms after they were started), {s0}/{n} without; new connections/s {r1:.0} with, {r0:.0} without; the active agent's CPU meanwhile {u1:.1} ms/s with, {u0:.1} without"
        );
        f.survived_with.push(s1);
        f.survived_without.push(s0);
        lags.push(lag);
        with.push(r1);
        without.push(r0);
        ratios.push(r1 / r0);
    }
    f.lag_ms = summarize(&lags);
    f.rate_with = summarize(&with);
    f.rate_without = summarize(&without);
    f.ratios = summarize(&ratios);
    f.cpu_with = summarize(&cpu_with);
    f.cpu_without = summarize(&cpu_without);
    Ok(f)
}

/// CPU time process `pid` has used (user and system, all its threads), ms.
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces) in its parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf without side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

/// The section of BENCHMARKS.md.
pub fn sync_markdown(f: &SyncFigures, date: &str) -> String {
    let mut s = String::new();
    s += "<!-- ha-sync -->\n## HA failover with connection state (issue 26)\n\n";
    s += &format!("Measured {date} on this machine: two agents (`tests::cluster`), an HA router with its external gateway (SNAT); per round, agents without replication then with it (`--sync-listen`/`--sync-key`), each time: 2 s to settle, then new TCP connections per second through SNAT for 5 s (two clients, connect + 1 byte + reset, to 16 server ports in turn), then {} long-lived TCP connections through SNAT (64 bytes every 100 ms), the active agent killed with -9 2 s after they opened, the connections closed 2 s after the standby took over. A connection survived when neither side saw an error and every byte arrived.\n\n", f.conns);
    s += "| figure | with replication | without (keepalived alone keeps none either) |\n|---|---|---|\n";
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    s += &format!(
        "| connections surviving the failover, of {}, per round | {} | {} |\n",
        f.conns,
        list(&f.survived_with),
        list(&f.survived_without)
    );
    s += &format!(
        "| replication lag: connections started → all established on the standby's kernel | {} ms | — |\n",
        f.lag_ms.fmt(0)
    );
    s += &format!(
        "| new TCP connections per second through SNAT on the active host | {} | {} |\n",
        f.rate_with.fmt(0),
        f.rate_without.fmt(0)
    );
    s += &format!(
        "| ratio with / without, same round | {} | |\n",
        f.ratios.fmt(2)
    );
    s += &format!(
        "| CPU of the active host's agent during those 5 s (user + system, ms per s) | {} | {} |\n",
        f.cpu_with.fmt(1),
        f.cpu_without.fmt(1)
    );
    let late: Vec<String> = LATE_MS
        .iter()
        .zip(f.late_survived)
        .map(|(ms, k)| format!("{ms} ms: {k}/{}", f.rounds))
        .collect();
    s += &format!(
        "| a connection opened shortly before the kill: rounds it survived, by how long before | {} | — |\n",
        late.join(", ")
    );
    s += &format!("\nThe connection rates spread {:.1}× (with) and {:.1}× (without) between rounds on this two-vCPU machine, where the clients, the server, both agents and both hosts' kernels share the CPUs; the per-round ratio's median is the figure to read, and its spread says how little one round tells. With replication the active host's agent keeps the router's table from conntrack's events (the rate measurement makes a few events per connection) and reads it whole every 10 s (a whole read walks every bucket of the host's conntrack hash, however few entries the router has).\n", f.rate_with.max / f.rate_with.min.max(1.0), f.rate_without.max / f.rate_without.min.max(1.0));
    s += "\nThe lag is bounded by the sync period (200 ms: what changed since, per HA router the host leads) plus the install on the standby; a connection opened within that time before the active host dies is not on the standby yet.\n<!-- /ha-sync -->\n";
    s
}

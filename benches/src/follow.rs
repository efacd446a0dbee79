//! A router built by Neutron 29's own L3 agent code (`tests::neutron`: the agent's addresses,
//! routes, sysctls and iptables chains, a liberal conntrack as it sets it, veths at kernel
//! defaults, a firewall group denying UDP to port 7777), forwarded by the kernel alone and by
//! the same namespace followed (`router-ctl run --follow`), taking turns in every round: bulk
//! TCP (iperf3, 1 stream) routed, through SNAT and to the floating IP; request-shaped
//! connections through SNAT (64 clients, ports reused); established flows of small datagrams
//! (echoed) on the same three paths; and the denied flow (datagrams that arrive: must be 0
//! either way).

use std::time::Duration;

use anyhow::Result;
use tests::{
    neutron::{Agent, HaPair},
    sh, sh_out, wait_until,
};

use crate::{
    conns::{self, Server},
    nat::iperf,
    stats::{summarize, Summary},
};

pub struct Row {
    pub what: &'static str,
    pub unit: &'static str,
    pub kernel: Summary,
    pub router: Summary,
    pub ratio: Summary,
}

pub struct FollowFigures {
    pub rounds: usize,
    pub rows: Vec<Row>,
    /// Datagrams of the denied flow that arrived, over all rounds (kernel, followed).
    pub denied_arrived: (u64, u64),
    pub denied_sent: u64,
    /// Across a keepalived failover of an HA pair: pings lost (10 ms apart), and how long
    /// keepalived took to move the router (s); the kernel alone's, then followed.
    pub failover_lost: [Summary; 2],
    pub failover_took: [Summary; 2],
    pub failover_rounds: usize,
}

/// Runs the comparison over `rounds` rounds.
pub fn run(rounds: usize) -> Result<FollowFigures> {
    let mut a = Agent::build();
    a.liberal();
    let (vm1, vm3, out) = (a.vm1(), a.vm3(), a.out());
    for ns in [&vm3, &out] {
        sh(&format!(
            "ip netns exec {ns} iperf3 -s -D -I /tmp/router-bench-follow-{ns}.pid"
        ));
        // As in the connections benchmark: servers keep no TIME_WAIT (see conns.rs).
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.tcp_max_tw_buckets=0"
        ));
    }
    sh(&format!(
        "ip netns exec {vm1} sysctl -qw net.ipv4.ip_local_port_range='40000 41023'"
    ));
    let server = Server::start(&out)?;
    std::thread::sleep(Duration::from_millis(300));
    let res = (|| -> Result<FollowFigures> {
        // (kernel, followed) per row and round.
        let mut vals: Vec<[Vec<f64>; 2]> = vec![Default::default(); ROWS];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); ROWS];
        let mut denied_arrived = (0, 0);
        let mut denied_sent = 0;
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            let mut got = [[0f64; ROWS]; 2];
            for followed in order {
                if followed {
                    a.follow();
                    wait_until("followed", Duration::from_secs(5), || match a.show() {
                        Some(v) if v["filter"]["guarded"] == true => Ok(()),
                        other => Err(format!("{other:?}")),
                    });
                }
                let m = followed as usize;
                got[m][0] = iperf(&vm1, "172.16.101.3", 3)?;
                got[m][1] = iperf(&vm1, "203.0.113.5", 3)?;
                got[m][2] = iperf(&out, "192.168.1.20", 3)?;
                let addr = "203.0.113.5:8080".parse().expect("an address");
                let r = conns::load(&vm1, addr, 64, 0.5, 2.0)?;
                got[m][3] = r.conn_s;
                got[m][4] = small_udp(&vm1, &vm3, "172.16.101.3")?;
                got[m][5] = small_udp(&vm1, &out, "203.0.113.5")?;
                got[m][6] = small_udp(&out, &vm3, "192.168.1.20")?;
                let d = tests::neutron::denied_arrived(&vm1, &vm3, 1000) as u64;
                if followed {
                    denied_arrived.1 += d;
                    a.stop();
                } else {
                    denied_arrived.0 += d;
                }
                denied_sent += if followed { 1000 } else { 0 };
                eprintln!(
                    "follow round {round} {}: routed {:.2} Gbit/s, SNAT {:.2}, floating IP {:.2}, {:.0} conn/s; small UDP routed {:.0}/s, SNAT {:.0}/s, floating IP {:.0}/s; {d} denied arrived",
                    if followed { "followed" } else { "kernel" },
                    got[m][0], got[m][1], got[m][2], got[m][3], got[m][4], got[m][5], got[m][6]
                );
            }
            for i in 0..ROWS {
                vals[i][0].push(got[0][i]);
                vals[i][1].push(got[1][i]);
                ratios[i].push(got[1][i] / got[0][i]);
            }
        }
        let what = [
            ("bulk TCP vm1 → vm3, routed", "Gbit/s"),
            ("bulk TCP vm1 → outside, SNAT", "Gbit/s"),
            ("bulk TCP outside → vm3's floating IP", "Gbit/s"),
            (
                "new connections vm1 → outside through SNAT, 64 clients",
                "conn/s",
            ),
            (
                "small UDP datagrams vm1 → vm3, routed, echoed",
                "datagrams/s",
            ),
            (
                "small UDP datagrams vm1 → outside, SNAT, echoed",
                "datagrams/s",
            ),
            (
                "small UDP datagrams outside → vm3's floating IP, echoed",
                "datagrams/s",
            ),
        ];
        Ok(FollowFigures {
            rounds,
            rows: what
                .iter()
                .enumerate()
                .map(|(i, (w, u))| Row {
                    what: w,
                    unit: u,
                    kernel: summarize(&vals[i][0]),
                    router: summarize(&vals[i][1]),
                    ratio: summarize(&ratios[i]),
                })
                .collect(),
            denied_arrived,
            denied_sent,
            failover_lost: Default::default(),
            failover_took: Default::default(),
            failover_rounds: 0,
        })
    })();
    server.stop();
    for ns in [&vm3, &out] {
        let _ = sh_out(&format!(
            "kill $(cat /tmp/router-bench-follow-{ns}.pid) 2>/dev/null"
        ));
    }
    drop(a);
    let mut res = res?;
    let (lost, took) = failovers(rounds.min(3))?;
    res.failover_rounds = rounds.min(3);
    res.failover_lost = [summarize(&lost[0]), summarize(&lost[1])];
    res.failover_took = [summarize(&took[0]), summarize(&took[1])];
    Ok(res)
}

/// `rounds` failovers of an HA pair (`tests::neutron::HaPair`, built by Neutron's agent code,
/// which starts keepalived) with the kernel alone and as many followed, taking turns: pings lost and
/// the seconds keepalived took, (kernel, followed).
fn failovers(rounds: usize) -> Result<([Vec<f64>; 2], [Vec<f64>; 2])> {
    let (mut lost, mut took): ([Vec<f64>; 2], [Vec<f64>; 2]) = Default::default();
    for round in 0..rounds {
        for followed in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let mut p = HaPair::build();
            let master = wait_until("a keepalived master", Duration::from_secs(20), || {
                p.master().ok_or("none yet".to_string())
            });
            if followed {
                p.follow();
                wait_until("both hosts followed", Duration::from_secs(10), || {
                    match p
                        .hosts
                        .iter()
                        .all(|h| tests::ctl(&["show", h, "-j"]).status.success())
                    {
                        true => Ok(()),
                        false => Err("not yet".to_string()),
                    }
                });
                // The master's fast path carries before the failover.
                wait_until(
                    "the master's fast path carrying",
                    Duration::from_secs(10),
                    || {
                        let f0 = p.forwarded(master);
                        let out = tests::topo::Seed::exec(
                            &p.ns("vm1"),
                            "ping -c 20 -i 0.01 -W 1 172.16.101.3",
                        );
                        let (_, got) =
                            tests::topo::ping_summary(&String::from_utf8_lossy(&out.stdout));
                        match p.forwarded(master) - f0 {
                            d if d >= 15 && got == 20 => Ok(()),
                            d => Err(format!("{d} forwarded, {got} answered")),
                        }
                    },
                );
            }
            let (sent, got, t) = p.failover();
            let m = followed as usize;
            lost[m].push(sent.saturating_sub(got) as f64);
            took[m].push(t.as_secs_f64());
            eprintln!(
                "failover round {round} {}: {got} of {sent} pings answered, keepalived took {t:?}",
                if followed { "followed" } else { "kernel" }
            );
        }
    }
    Ok((lost, took))
}

/// Rows of the comparison: three bulk TCP, connections, three small-datagram flows.
const ROWS: usize = 7;

/// An established flow of small datagrams: a client in `from` sends 18-byte datagrams to
/// `to_ip`:9100 as fast as one socket can, a server in `to` echoes each (the flow runs both
/// ways, as a guarded fast path needs before it carries it); after 1 s of warm-up, the
/// datagrams per second that reached the server over 2 s.
fn small_udp(from: &str, to: &str, to_ip: &str) -> Result<f64> {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let server = tests::topo::udp_socket_in(to, 9100, Duration::from_millis(100));
    let echo = {
        let (stop, count) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = server.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        })
    };
    let dst = format!("{to_ip}:9100");
    let client = {
        let stop = stop.clone();
        tests::topo::in_ns(from, move || -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(&dst)?;
            s.set_nonblocking(true)?;
            let (payload, mut buf) = ([0x5au8; 18], [0u8; 64]);
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..32 {
                    let _ = s.send(&payload);
                }
                while s.recv(&mut buf).is_ok() {}
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let c0 = count.load(Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let got = count.load(Ordering::Relaxed) - c0;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    echo.join().expect("echo");
    client.join().expect("client")?;
    Ok(got as f64 / secs)
}

/// The report's section, between `<!-- follow -->` markers.
pub fn markdown(f: &FollowFigures, date: &str) -> String {
    let mut m = String::from(
        "<!-- follow -->\n## A router built by Neutron's L3 agent, followed (`run --follow`)\n\n",
    );
    m += &format!(
        "{date}. A legacy router built by Neutron 29's own L3 agent code (`tests/neutron/l3_agent.py`, RPC faked: the agent's addresses, default route, floating IP, sysctls — `nf_conntrack_tcp_be_liberal=1` among them — and its iptables and ip6tables chains; SNAT to the gateway address, a floating IP for vm3), a firewall group's rule dropping UDP to port 7777, veths at kernel defaults. In each of {} rounds the kernel alone and the same namespace followed by `router-ctl run --follow` (nothing else configured) take turns going first; followed, the fast path carries only flows the kernel forwarded both ways under the agent's rules (the guard). iperf3, one stream, 3 s; connections as in the request-shaped benchmark (1 KiB answers, the server closing first, clients cycling through 1 024 ports), 2 s after 0.5 s of warm-up; small datagrams: one client socket sending 18-byte datagrams as fast as it can, the server echoing each, datagrams per second reaching the server over 2 s after 1 s of warm-up (on two cores the client, the echo and both routers' work share the CPUs: the figure is what is left for forwarding). Medians (min–max).\n\n| traffic | kernel alone | followed | followed ÷ kernel |\n|---|---|---|---|\n",
        f.rounds
    );
    for r in &f.rows {
        let p = if r.unit == "Gbit/s" { 2 } else { 0 };
        m += &format!(
            "| {} ({}) | {} | {} | {} |\n",
            r.what,
            r.unit,
            r.kernel.fmt(p),
            r.router.fmt(p),
            r.ratio.fmt(2)
        );
    }
    m += &format!(
        "| pings lost across a keepalived failover, 10 ms apart (HA pair, {} failovers each) | {} | {} | |\n| seconds keepalived took to move the router | {} | {} | |\n",
        f.failover_rounds,
        f.failover_lost[0].fmt(0),
        f.failover_lost[1].fmt(0),
        f.failover_took[0].fmt(2),
        f.failover_took[1].fmt(2),
    );
    m += &format!(
        "\nThe denied flow: {} datagrams sent to vm3's port 7777 in the kernel's runs and as many in the followed runs; {} and {} arrived. The failovers: an HA router built by Neutron's agent code on two hosts (`tests::neutron::HaPair`: an agent per host, which writes keepalived's configuration and starts keepalived and its state-change monitor: both BACKUP, nopreempt, advert_int 2), the master's keepalived stopped while vm1 pings vm3 every 10 ms; followed, both hosts' namespaces by one `run --follow`, the master's fast path carrying before the stop.\n<!-- /follow -->\n",
        f.denied_sent, f.denied_arrived.0, f.denied_arrived.1
    );
    m
}

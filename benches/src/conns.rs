//! Request-shaped traffic: many short TCP connections, each one small HTTP-like request and a
//! ~1 KiB response, through three paths of the NAT seed (plain route, SNAT, floating IP), at
//! concurrency 1 and 64, this router (`auto`) beside the kernel alone, taking turns in every
//! round.
//!
//! Each connection: the client connects from a port the kernel chooses (it cycles through the
//! ephemeral range), sends a GET of about 100 bytes, the server answers 1 KiB and closes first,
//! the client reads to EOF and closes. The client keeps no TIME_WAIT (nor do the servers here,
//! see `run`), so the
//! client's ports come back while the router's conntrack still holds their previous connection
//! (TIME_WAIT, 120 s): what every busy client does.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tests::{
    sh, sh_out,
    topo::{in_ns, Seed},
};

use crate::{
    nat::{set_mode, Mode, FIP},
    stats::{summarize, Summary},
};

/// The port the servers listen on.
const PORT: u16 = 8080;
/// Server threads per listener (more than the highest concurrency, so that a stalled
/// connection never holds up the others).
const WORKERS: usize = 80;
/// A connection taking longer than this (connect to EOF) is stalled.
const STALL: Duration = Duration::from_secs(1);
/// Connect timeout, and read/write timeout of each socket operation: beyond these a
/// connection fails (it is counted, the run goes on).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes of the response, headers included.
pub const RESPONSE_BYTES: usize = 1024;
pub const CONCURRENCY: [usize; 2] = [1, 64];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnPath {
    /// vm1 → a server in vm3, routed, no NAT.
    Plain,
    /// vm1 → a server on the outside host, through SNAT to the gateway address.
    Snat,
    /// A client on the outside host → vm3's floating IP (DNAT), server in vm3.
    FloatingIp,
}

pub const PATHS: [ConnPath; 3] = [ConnPath::Plain, ConnPath::Snat, ConnPath::FloatingIp];

impl ConnPath {
    /// The short name `--conns-only` takes (with the concurrency: `snat64`).
    pub fn key(&self) -> &'static str {
        match self {
            ConnPath::Plain => "plain",
            ConnPath::Snat => "snat",
            ConnPath::FloatingIp => "fip",
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            ConnPath::Plain => "vm1 → vm3, routed (no NAT)",
            ConnPath::Snat => "vm1 → outside through SNAT",
            ConnPath::FloatingIp => "outside → vm3's floating IP",
        }
    }
    /// The namespace of the server that answers.
    fn server_ns(&self, s: &Seed) -> String {
        match self {
            ConnPath::Snat => s.out(),
            ConnPath::Plain | ConnPath::FloatingIp => s.vm3.clone(),
        }
    }
    /// (client namespace, address the client connects to).
    fn client(&self, s: &Seed) -> (String, SocketAddr) {
        let (ns, ip) = match self {
            ConnPath::Plain => (s.vm1.clone(), "172.16.101.3"),
            ConnPath::Snat => (s.vm1.clone(), "203.0.113.5"),
            ConnPath::FloatingIp => (s.out(), "192.168.1.20"),
        };
        (ns, format!("{ip}:{PORT}").parse().expect("an address"))
    }
}

/// One timed run of one mode.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// Connections that completed (response whole, EOF) within the timed window, per second.
    pub conn_s: f64,
    /// Connect to EOF (ms) of the connections of the window (those that ended after the
    /// warm-up, also after the window's end: a stall at the end is not left out).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Connections of the window that took more than `STALL` (and completed).
    pub stalled: u64,
    /// Connections of the window that failed (an error, a timeout, a short response).
    pub failed: u64,
    /// Connections of the window (completed or failed).
    pub counted: u64,
    /// SYNs the server's TIME_WAIT sockets refused by their timestamps (TcpExtPAWSTimewait in
    /// the server's namespace), and SYNs the clients sent again (TcpExtTCPSynRetrans in
    /// theirs), over the whole run.
    pub paws_tw: u64,
    pub syn_retrans: u64,
    /// Every connection of the run, warm-up included (to scale the fast path's counters).
    pub all: u64,
}

/// One mode's figures over the rounds.
#[derive(Clone, Debug, Default)]
pub struct Side {
    pub conn_s: Summary,
    pub p50_ms: Summary,
    pub p99_ms: Summary,
    /// Whether any round had a latency to report.
    pub has_latency: bool,
    /// Totals over the rounds.
    pub stalled: u64,
    pub failed: u64,
    /// Connections of the timed windows, over the rounds.
    pub counted: u64,
    pub paws_tw: u64,
    pub syn_retrans: u64,
}

pub struct ConnFigure {
    pub path: ConnPath,
    pub concurrency: usize,
    pub kernel: Side,
    pub router: Side,
    /// NAT paths: this router with learning from handshakes off (the namespace's conntrack
    /// made strict for those runs, which is what turns it off), and its ratio to the kernel.
    pub no_learn: Option<(Side, Summary)>,
    /// Router ÷ kernel connections per second, per round (in round order) and summarized.
    pub ratios: Vec<f64>,
    pub ratio: Summary,
    /// Over the router's runs: packets the fast path forwarded (all devices) and translated
    /// (source + destination), per connection; and the share of the packets the router's
    /// devices received that the fast path forwarded.
    pub fwd_per_conn: f64,
    pub translated_per_conn: f64,
    pub fwd_share: f64,
}

pub struct ConnBench {
    pub rounds: usize,
    pub secs: f64,
    pub warmup: f64,
    /// The clients' ephemeral port range ((low, high); None: the kernel's default).
    pub port_range: Option<(u16, u16)>,
    /// The hooks `auto` chose (device, hook).
    pub hooks: Vec<(String, String)>,
    pub figures: Vec<ConnFigure>,
    /// Nanoseconds the tc program took per run, by path and concurrency (a run of its own
    /// with BPF statistics on).
    pub prog_ns: Vec<(ConnPath, usize, f64)>,
}

/// (run time in ns, runs) summed over the loaded programs named `router_tc`.
fn tc_prog_stats() -> (u64, u64) {
    let out = sh_out("bpftool -j prog show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "router_tc")
        .fold((0, 0), |(t, n), p| {
            (
                t + p["run_time_ns"].as_u64().unwrap_or(0),
                n + p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
}

fn request(host: &str) -> Vec<u8> {
    let mut r = format!(
        "GET /index.html HTTP/1.1\r\nHost: {host}\r\nUser-Agent: router-bench/1\r\nAccept: */*\r\n"
    );
    // Pad to about 100 bytes with a header a server ignores.
    let pad = 100usize.saturating_sub(r.len() + "X-Pad: \r\n\r\n".len());
    r += &format!("X-Pad: {}\r\n\r\n", "x".repeat(pad));
    r.into_bytes()
}

fn response() -> Vec<u8> {
    let head = |n: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
    };
    let body = RESPONSE_BYTES - head(1000).len();
    let mut r = head(body).into_bytes();
    r.resize(RESPONSE_BYTES, b'.');
    r
}

/// A listener on `0.0.0.0:PORT` in `ns` with `WORKERS` threads, each accepting, reading one
/// request, answering and closing first. `stop` ends it.
pub struct Server {
    listener: Arc<TcpListener>,
    halt: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &str) -> Result<Server> {
        let listener = in_ns(ns, || TcpListener::bind(("0.0.0.0", PORT)))
            .join()
            .map_err(|_| anyhow::anyhow!("bind panicked"))?
            .with_context(|| format!("listening on port {PORT} in {ns}"))?;
        let listener = Arc::new(listener);
        let halt = Arc::new(AtomicBool::new(false));
        let resp = Arc::new(response());
        let workers = (0..WORKERS)
            .map(|_| {
                let (l, halt, resp) = (listener.clone(), halt.clone(), resp.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !halt.load(Ordering::SeqCst) {
                        // Blocking accept; `stop` shuts the listener down, which wakes it.
                        let Ok((mut c, _)) = l.accept() else {
                            if halt.load(Ordering::SeqCst) {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        };
                        let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                        let _ = c.set_write_timeout(Some(IO_TIMEOUT));
                        let mut got = 0;
                        let whole = loop {
                            match c.read(&mut buf[got..]) {
                                Ok(0) | Err(_) => break false,
                                Ok(n) => {
                                    got += n;
                                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                                        break true;
                                    }
                                    if got == buf.len() {
                                        break false;
                                    }
                                }
                            }
                        };
                        if whole {
                            let _ = c.write_all(&resp);
                        }
                        // Dropped: the server closes first (and keeps the TIME_WAIT).
                    }
                })
            })
            .collect();
        Ok(Server {
            listener,
            halt,
            workers,
        })
    }

    pub fn stop(self) {
        self.halt.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket makes every blocked accept return (EINVAL).
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// What one client thread saw.
#[derive(Default)]
struct ThreadOut {
    /// Completions within the timed window.
    done_in_window: u64,
    /// Connect-to-EOF times (µs) of the connections of the window that completed.
    lat_us: Vec<u32>,
    stalled: u64,
    failed: u64,
    counted: u64,
    all: u64,
}

/// One connection: connect, request, read to EOF (expecting the whole response), close.
fn one_connection(addr: &SocketAddr, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    let mut c = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    c.write_all(req)?;
    let mut got = 0usize;
    loop {
        let n = c.read(buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got != RESPONSE_BYTES {
        return Err(std::io::Error::other(format!(
            "{got} bytes of response, {RESPONSE_BYTES} expected"
        )));
    }
    Ok(())
}

/// `conc` client threads in `ns`, each doing connection after connection to `addr` for
/// `warmup` then `secs` seconds; figures of the timed window.
pub fn load(ns: &str, addr: SocketAddr, conc: usize, warmup: f64, secs: f64) -> Result<Run> {
    let t0 = Instant::now();
    let start = t0 + Duration::from_secs_f64(warmup);
    let end = start + Duration::from_secs_f64(secs);
    let req = Arc::new(request(&addr.ip().to_string()));
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let req = req.clone();
            in_ns(ns, move || {
                let mut out = ThreadOut::default();
                let mut buf = vec![0u8; 4096];
                loop {
                    let a = Instant::now();
                    if a >= end {
                        break;
                    }
                    let r = one_connection(&addr, &req, &mut buf);
                    let b = Instant::now();
                    out.all += 1;
                    if r.is_ok() && b >= start && b <= end {
                        out.done_in_window += 1;
                    }
                    if b >= start {
                        out.counted += 1;
                        match r {
                            Ok(()) => {
                                let d = b - a;
                                out.lat_us.push(d.as_micros().min(u32::MAX as u128) as u32);
                                if d > STALL {
                                    out.stalled += 1;
                                }
                            }
                            Err(_) => out.failed += 1,
                        }
                    }
                    if r.is_err() {
                        // An immediate error (refused, no port) must not spin.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                out
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut run = Run::default();
    let mut done = 0u64;
    for t in threads {
        let o = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        done += o.done_in_window;
        run.stalled += o.stalled;
        run.failed += o.failed;
        run.counted += o.counted;
        run.all += o.all;
        lat.extend(o.lat_us);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    run.conn_s = done as f64 / secs;
    run.p50_ms = pct(0.50);
    run.p99_ms = pct(0.99);
    Ok(run)
}

/// `n` connections to `addr` from `ns`, `conc` at a time (every port of a small ephemeral
/// range gets a previous connection); (made, failed).
fn prime(ns: &str, addr: SocketAddr, n: u64, conc: usize) -> Result<(u64, u64)> {
    let left = Arc::new(std::sync::atomic::AtomicU64::new(n));
    let req = Arc::new(request(&addr.ip().to_string()));
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let (left, req) = (left.clone(), req.clone());
            in_ns(ns, move || {
                let (mut made, mut failed) = (0u64, 0u64);
                let mut buf = vec![0u8; 4096];
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| x.checked_sub(1))
                    .is_ok()
                {
                    made += 1;
                    if one_connection(&addr, &req, &mut buf).is_err() {
                        failed += 1;
                    }
                }
                (made, failed)
            })
        })
        .collect();
    let mut tot = (0, 0);
    for t in threads {
        let (m, f) = t.join().map_err(|_| anyhow::anyhow!("priming panicked"))?;
        tot = (tot.0 + m, tot.1 + f);
    }
    Ok(tot)
}

/// A TcpExt counter of namespace `ns` (/proc/net/netstat).
fn tcp_ext(ns: &str, name: &str) -> u64 {
    let out = sh_out(&format!("ip netns exec {ns} cat /proc/net/netstat"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The fast path's counters summed over the router's devices: (forwarded, translated).
fn fast_counters(s: &Seed) -> (u64, u64) {
    s.stats().iter().fold((0, 0), |(f, t), d| {
        (
            f + d["forwarded"]["packets"].as_u64().unwrap_or(0),
            t + d["nat"]["source_translated"].as_u64().unwrap_or(0)
                + d["nat"]["destination_translated"].as_u64().unwrap_or(0),
        )
    })
}

/// Packets the router's devices received (the kernel's counters: every packet, whoever
/// forwarded it).
fn rx_packets(s: &Seed) -> u64 {
    let out = sh_out(&format!("ip -n {} -s -j link show", s.ns()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let devs = [s.ids.dev_a(), s.ids.dev_b(), s.ids.dev_g()];
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| devs.iter().any(|d| l["ifname"] == d.as_str()))
        .map(|l| l["stats64"]["rx"]["packets"].as_u64().unwrap_or(0))
        .sum()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Kernel,
    Router,
    /// This router with learning from handshakes off.
    NoLearn,
}

/// The router's `NAT_LEARN` (0: the program learns no flow).
fn learn_ns(s: &Seed) -> u64 {
    use aya::maps::{Array, Map};
    router_ctl::datapath::open_pinned(&s.ids.router_id, router_common::map_names::NAT_LEARN)
        .ok()
        .and_then(|m| Array::<_, u64>::try_from(Map::Array(m)).ok())
        .and_then(|a| a.get(&0, 0).ok())
        .unwrap_or(0)
}

/// Makes the router namespace's conntrack liberal (as apply leaves it) or strict, and waits
/// until the daemon turned learning on or off accordingly (it reads the timeouts every second).
fn set_learning(s: &Seed, on: bool) -> Result<()> {
    sh(&format!(
        "ip netns exec {} sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal={}",
        s.ns(),
        on as u8
    ));
    let t0 = Instant::now();
    while (learn_ns(s) != 0) != on {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "the daemon did not turn learning {} within 5 s",
            if on { "on" } else { "off" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn switch(s: &mut Seed, now: &mut Option<Which>, to: Which) -> Result<()> {
    if *now == Some(to) {
        return Ok(());
    }
    if *now == Some(Which::NoLearn) {
        set_learning(s, true)?;
        *now = Some(Which::Router);
        if to == Which::Router {
            return Ok(());
        }
    }
    match to {
        Which::Kernel => set_mode(s, Mode::Kernel)?,
        Which::Router | Which::NoLearn => {
            if *now != Some(Which::Router) {
                // The definition as Neutron gives it: hooks `auto`.
                let t = s.ids.config_nat("", FIP);
                s.apply(&t);
                std::thread::sleep(Duration::from_millis(300));
                set_learning(s, true)?;
            }
            if to == Which::NoLearn {
                set_learning(s, false)?;
            }
        }
    }
    *now = Some(to);
    Ok(())
}

#[derive(Default)]
struct Acc {
    conn_s: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    stalled: u64,
    failed: u64,
    counted: u64,
    paws_tw: u64,
    syn_retrans: u64,
}

impl Acc {
    fn push(&mut self, r: &Run) {
        self.conn_s.push(r.conn_s);
        if r.p50_ms.is_finite() {
            self.p50.push(r.p50_ms);
            self.p99.push(r.p99_ms);
        }
        self.stalled += r.stalled;
        self.failed += r.failed;
        self.counted += r.counted;
        self.paws_tw += r.paws_tw;
        self.syn_retrans += r.syn_retrans;
    }
    fn side(&self) -> Side {
        Side {
            conn_s: summarize(&self.conn_s),
            p50_ms: summarize(&self.p50),
            p99_ms: summarize(&self.p99),
            has_latency: !self.p50.is_empty(),
            stalled: self.stalled,
            failed: self.failed,
            counted: self.counted,
            paws_tw: self.paws_tw,
            syn_retrans: self.syn_retrans,
        }
    }
}

/// The whole section: `rounds` rounds of every (path, concurrency), each `warmup` + `secs`
/// seconds per mode. `ports`: the clients' ephemeral range size (0: the kernel's default).
pub fn run(
    rounds: usize,
    warmup: f64,
    secs: f64,
    ports: u16,
    only: &[String],
) -> Result<ConnBench> {
    let mut s = Seed::up_nat(|ids| ids.config_nat("", FIP));
    s.check_counters = false;
    s.prime_neighbours();
    let (vm1, vm3, out) = (s.vm1.clone(), s.vm3.clone(), s.out());
    sh(&format!(
        "ip netns exec {vm1} ping -c 2 -i 0.2 203.0.113.5 >/dev/null && ip netns exec {out} ping -c 2 -i 0.2 192.168.1.20 >/dev/null && ip netns exec {vm1} ping -c 2 -i 0.2 172.16.101.3 >/dev/null"
    ));
    // 256 ports at least (64 clients), and within the port space.
    let ports = if ports == 0 {
        0
    } else {
        ports.clamp(256, 20000)
    };
    let port_range = (ports > 0).then(|| (40000u16, 40000 + ports - 1));
    if let Some((lo, hi)) = port_range {
        for ns in [&vm1, &out] {
            sh(&format!(
                "ip netns exec {ns} sysctl -qw net.ipv4.ip_local_port_range='{lo} {hi}'"
            ));
        }
    }
    // The servers keep no TIME_WAIT: with fully random SNAT ports and one client address, a
    // new connection often lands on a gateway port whose previous connection the server still
    // holds in TIME_WAIT, and half of those SYNs are refused by their timestamps and wait a
    // 1 s retransmission, with or without this router (see the report). The router's
    // conntrack still keeps every closed connection in TIME_WAIT, which is what matters here.
    for ns in [&vm3, &out] {
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.tcp_max_tw_buckets=0"
        ));
    }
    let hooks = s.hooks();
    let servers = [Server::start(&vm3)?, Server::start(&out)?];
    let res = (|| -> Result<ConnBench> {
        let mut mode = Some(Which::Router);
        // Every client port has had a connection before the first timed run (the steady
        // state of a client cycling through its range), through the kernel: twice the range,
        // no more.
        switch(&mut s, &mut mode, Which::Kernel)?;
        if ports > 0 {
            for p in PATHS {
                let (ns, addr) = p.client(&s);
                let (made, failed) = prime(&ns, addr, 2 * ports as u64, 8)?;
                eprintln!(
                    "conns: priming {}: {made} connections, {failed} failed",
                    p.name()
                );
            }
        }
        let combos: Vec<(ConnPath, usize)> = PATHS
            .iter()
            .flat_map(|p| CONCURRENCY.iter().map(move |c| (*p, *c)))
            .filter(|(p, c)| {
                only.is_empty() || only.iter().any(|o| *o == format!("{}{c}", p.key()))
            })
            .collect();
        let mut acc: Vec<[Acc; 3]> = combos.iter().map(|_| Default::default()).collect();
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); combos.len()];
        let mut no_learn_ratios: Vec<Vec<f64>> = vec![Vec::new(); combos.len()];
        // (fast path forwarded, translated, rx packets, connections) over the router's runs.
        let mut fast: Vec<[u64; 4]> = vec![[0; 4]; combos.len()];
        for round in 0..rounds {
            for (j, (path, conc)) in combos.iter().enumerate() {
                // Who goes first alternates per round; along a round it alternates per
                // combination too, so that one mode change serves two runs.
                // NAT paths: a third mode, this router without learning, and the three
                // modes' order turns.
                let order: Vec<Which> = if *path == ConnPath::Plain {
                    if (round + j) % 2 == 0 {
                        vec![Which::Kernel, Which::Router]
                    } else {
                        vec![Which::Router, Which::Kernel]
                    }
                } else {
                    let mut o = vec![Which::Kernel, Which::Router, Which::NoLearn];
                    o.rotate_left((round + j) % 3);
                    o
                };
                let (ns, addr) = path.client(&s);
                let server_ns = path.server_ns(&s);
                let mut this = [0f64; 3];
                for w in order {
                    switch(&mut s, &mut mode, w)?;
                    let before = (w == Which::Router).then(|| (fast_counters(&s), rx_packets(&s)));
                    let tcp0 = (
                        tcp_ext(&server_ns, "PAWSTimewait"),
                        tcp_ext(&ns, "TCPSynRetrans"),
                    );
                    let mut r = load(&ns, addr, *conc, warmup, secs)?;
                    r.paws_tw = tcp_ext(&server_ns, "PAWSTimewait").saturating_sub(tcp0.0);
                    r.syn_retrans = tcp_ext(&ns, "TCPSynRetrans").saturating_sub(tcp0.1);
                    if let Some(((f0, t0), rx0)) = before {
                        let ((f1, t1), rx1) = (fast_counters(&s), rx_packets(&s));
                        let e = &mut fast[j];
                        e[0] += f1.saturating_sub(f0);
                        e[1] += t1.saturating_sub(t0);
                        e[2] += rx1.saturating_sub(rx0);
                        e[3] += r.all;
                    }
                    let k = match w {
                        Which::Kernel => 0,
                        Which::Router => 1,
                        Which::NoLearn => 2,
                    };
                    this[k] = r.conn_s;
                    eprintln!(
                        "conns: round {}, {}, concurrency {conc}, {}: {:.0} conn/s, p50 {:.2} ms, p99 {:.2} ms, {} stalled, {} failed of {}; server TIME_WAIT refused {} SYNs, clients resent {}",
                        round + 1,
                        path.name(),
                        ["kernel", "this router", "this router without learning"][k],
                        r.conn_s,
                        r.p50_ms,
                        r.p99_ms,
                        r.stalled,
                        r.failed,
                        r.counted,
                        r.paws_tw,
                        r.syn_retrans
                    );
                    acc[j][k].push(&r);
                }
                let ratio = |x: f64| if this[0] > 0.0 { x / this[0] } else { f64::NAN };
                ratios[j].push(ratio(this[1]));
                if *path != ConnPath::Plain {
                    no_learn_ratios[j].push(ratio(this[2]));
                }
            }
        }
        let figures = combos
            .iter()
            .enumerate()
            .map(|(j, (path, conc))| {
                let [f, t, rx, n] = fast[j];
                let finite: Vec<f64> = ratios[j]
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .collect();
                let finite_no_learn: Vec<f64> = no_learn_ratios[j]
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .collect();
                ConnFigure {
                    path: *path,
                    concurrency: *conc,
                    kernel: acc[j][0].side(),
                    router: acc[j][1].side(),
                    no_learn: (*path != ConnPath::Plain)
                        .then(|| (acc[j][2].side(), summarize(&finite_no_learn))),
                    ratio: summarize(&finite),
                    ratios: ratios[j].clone(),
                    fwd_per_conn: f as f64 / n.max(1) as f64,
                    translated_per_conn: t as f64 / n.max(1) as f64,
                    fwd_share: f as f64 / rx.max(1) as f64,
                }
            })
            .collect();
        // Leave the router as applied.
        switch(&mut s, &mut mode, Which::Router)?;
        // What the tc program costs a packet, measured apart (BPF statistics cost time too).
        let mut prog_ns = Vec::new();
        for (path, conc) in combos.iter() {
            let (ns, addr) = path.client(&s);
            let before = tc_prog_stats();
            sh("sysctl -qw kernel.bpf_stats_enabled=1");
            let r = load(&ns, addr, *conc, 0.0, secs);
            sh("sysctl -qw kernel.bpf_stats_enabled=0");
            let after = tc_prog_stats();
            r?;
            let (t, n) = (
                after.0.saturating_sub(before.0),
                after.1.saturating_sub(before.1),
            );
            let per = t as f64 / n.max(1) as f64;
            eprintln!("conns: {}, concurrency {conc}: the tc program ran {n} times, {per:.0} ns each (BPF statistics on)", path.name());
            prog_ns.push((*path, *conc, per));
        }
        Ok(ConnBench {
            prog_ns,
            rounds,
            secs,
            warmup,
            port_range,
            hooks,
            figures,
        })
    })();
    for sv in servers {
        sv.stop();
    }
    res
}

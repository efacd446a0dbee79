//! Client ports reused through the NAT. A closed TCP connection's conntrack entry lives on
//! (TIME_WAIT, or CLOSE after a reset), and a copy of its mapping may have been in the router's
//! `NAT_FLOWS` map. A new connection from the same client port to the same server makes the
//! kernel replace the entry; SNAT then picks a new gateway port (`fully-random`), and the fast
//! path must translate the new connection with the new mapping, never the old one. (With the
//! old one, the handshake's last ACK and the first request go to the old port, and the
//! connection waits for the client's retransmission, 200 ms or more.)
//!
//! Each client makes its connections one after another from one fixed port, of two kinds:
//! - *short*: every round back to back and closed within milliseconds, so that the kernel sees
//!   the whole connection; the port is reused once the fast path lists the closed
//!   connection's flow (a copy written late), or after `COPY_WAIT` when it never does;
//! - *carried*: half the rounds, then more, a round every 5 ms, until the connection's own
//!   mapping is in the fast path (the router's flow listing; within `LISTED_WITHIN`), then the
//!   other half, carried by the fast path, then the close (or a reset), whose FIN or RST
//!   retires the copy.
//!
//! Every connection carries dozens of packets each way (24 request/answer rounds, 192 KiB of
//! answers), enough for the daemon to copy it under any copy policy. Every exchange (connect,
//! a request and its answer, the close) must complete within `EXCHANGE_DEADLINE`, which a
//! single retransmission exceeds, and every answer must be the one the server computed for
//! that very request (it names the connection, the client port and the round).
//!
//! The tests of this file run one at a time (`TURN`): their deadlines measure the network,
//! not how several of them share the processors.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use tests::{
    ctl_json, require_root, sh, sh_out,
    topo::{daemon_pids, in_ns, Seed},
};

const OUT: &str = "203.0.113.5";
const FIP: &str = "192.168.1.20";
const VM3: &str = "172.16.101.3";
const GATEWAY: &str = "192.168.1.10";
const FIP_VM3: &str =
    "[[router.floating_ip]]\nfloating_ip_address = \"192.168.1.20\"\nfixed_ip_address = \"172.16.101.3\"\n";

/// What one exchange may take. On these veths one takes well under a millisecond; a packet
/// lost to a stale mapping costs at least the sender's minimum retransmission timeout (200 ms).
const EXCHANGE_DEADLINE: Duration = Duration::from_millis(150);
/// How long any socket operation may block before the connection counts as broken.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a short connection's client waits, after the close, for the fast path to list
/// the closed flow before it reuses the port anyway.
const COPY_WAIT: Duration = Duration::from_millis(150);
/// How long a carried connection goes on (a round every 5 ms) waiting for its flow to be
/// listed before it counts as broken.
const LISTED_WITHIN: Duration = Duration::from_secs(2);
/// How long the server waits for the next connection before it stops (longer than a client
/// waits between two).
const ACCEPT_IDLE: Duration = Duration::from_secs(10);
/// A request: text naming the test, connection, client port and round, padded.
const REQ_LEN: usize = 64;
/// An answer: the request it answers, what the server saw (peer and local address), then bytes
/// derived from the request.
const ANSWER_LEN: usize = 8 << 10;
const HEAD_LEN: usize = 2 * REQ_LEN;
/// Rounds of a connection: a carried connection's flow is checked in the fast path after the
/// first half.
const ROUNDS: usize = 24;
const ROUNDS_FAST: usize = ROUNDS / 2;

static TURN: Mutex<()> = Mutex::new(());

/// How a connection ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Close {
    /// The server closes after its last answer; the client reads to EOF, then closes.
    ServerFirst,
    /// The client shuts its side down after the last answer and reads to EOF (the server
    /// closes on EOF). The client's end is then in TIME_WAIT (see `allow_time_wait_reuse`).
    ClientFirst,
    /// The client resets the connection after the last answer (SO_LINGER 0). Conntrack
    /// moves it to CLOSE, or keeps it established when the reset's sequence number is not the
    /// last one acknowledged that it saw (the fast path hid the acknowledgements): then the
    /// next SYN from the port rides the old entry, and the one after finds it in CLOSE.
    ClientAborts,
}

/// Which kind of connection (module comment).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Short,
    Carried,
}

/// `short` short connections, then `carried` carried ones.
fn sequence(short: usize, carried: usize) -> Vec<Kind> {
    let mut v = vec![Kind::Short; short];
    v.extend(std::iter::repeat_n(Kind::Carried, carried));
    v
}

/// How a client makes sure the fast path had its flow.
#[derive(Clone, Copy, Debug)]
enum Copied {
    /// By the router's flow listing (module comment).
    Listed,
    /// By waiting this long instead (the concurrent test, whose clients would otherwise run
    /// hundreds of listings): after a short connection, and in the middle of a carried one
    /// (exchanging a round every 5 ms); the fast path's counters then show that the carried
    /// flows were copied.
    Pause(Duration),
}

/// One scenario: `ports.len()` clients side by side in `client_ns`, each making the
/// connections of `kinds` one after another from its own fixed port to `connect`, answered by
/// a server listening on `listen` in `server_ns`.
struct Run {
    /// Names the scenario in requests and messages.
    what: &'static str,
    router: String,
    client_ns: String,
    server_ns: String,
    connect: SocketAddrV4,
    listen: SocketAddrV4,
    ports: Vec<u16>,
    kinds: Vec<Kind>,
    close: Close,
    copied: Copied,
    /// The client address the server must see (the gateway's for SNAT, the real one through a
    /// floating IP).
    peer_ip: &'static str,
    /// Time to leave between two connections of one port (TIME_WAIT reuse on older kernels).
    gap: Duration,
}

/// What a scenario showed: every failure, one line each, and figures for the log.
#[derive(Default)]
struct Outcome {
    failures: Vec<String>,
    connections: usize,
    /// Short connections whose closed flow the fast path listed before the port was reused
    /// (None: not looked at, `Copied::Pause`).
    closed_listed: Option<usize>,
    slowest: (Duration, String),
    retransmissions: u32,
}

impl Outcome {
    /// Fails naming every connection that broke, stalled or got another answer.
    fn assert_clean(&self, what: &str) {
        let shown: Vec<&str> = self.failures.iter().take(12).map(|s| s.as_str()).collect();
        assert!(
            self.failures.is_empty(),
            "{what}: {} failure(s) over {} connections{}; {}:\n  {}{}",
            self.failures.len(),
            self.connections,
            match self.closed_listed {
                Some(n) => format!(" ({n} short ones' closed flows were in the fast path when their port was reused)"),
                None => String::new(),
            },
            if self.failures.len() > shown.len() { "the first ones" } else { "all of them" },
            shown.join("\n  "),
            if self.failures.len() > shown.len() {
                format!("\n  … and {} more", self.failures.len() - shown.len())
            } else {
                String::new()
            }
        );
    }
}

/// Which of the two counters of `Seed::nat_counts`.
#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// The fast path's translated-packet counters named by `which`, each (device, side).
fn translated(s: &Seed, which: &[(String, Side)]) -> Vec<u64> {
    which
        .iter()
        .map(|(dev, side)| {
            let (src, dst) = s.nat_counts(dev);
            match side {
                Side::Source => src,
                Side::Destination => dst,
            }
        })
        .collect()
}

/// Asserts that, between `before` and now, the fast path translated at least `least` packets
/// on each (device, side) of `which`.
fn assert_fast_path_translated(
    s: &Seed,
    what: &str,
    which: &[(String, Side)],
    before: &[u64],
    least: u64,
) {
    let now = translated(s, which);
    for (((dev, side), b), a) in which.iter().zip(before).zip(&now) {
        let side = match side {
            Side::Source => "source",
            Side::Destination => "destination",
        };
        eprintln!(
            "{what}: the fast path translated the {side} of {} packets on {dev}",
            a - b
        );
        assert!(
            a - b >= least,
            "{what}: the fast path translated the {side} of {} packets on {dev}, at least {least} expected (the carried connections' flows were not in the fast path)",
            a - b
        );
    }
}

/// Runs `r`, asserts that every connection got its own answers without a stall (`label`
/// says which), and that the fast path translated at least the carried connections' second
/// halves (`carried` connections) on each (device, side) of `which`.
fn run_checked(s: &Seed, r: &Run, label: &str, which: &[(String, Side)], carried: usize) {
    let before = translated(s, which);
    run(r).assert_clean(label);
    assert_fast_path_translated(s, label, which, &before, (carried * ROUNDS_FAST) as u64);
}

/// Every `router-ctl run` on the machine is the build under test (waiting up to 3 s for one
/// that is replacing itself with a new build). Another checkout's daemon would serve these
/// routers (an apply only signals a running daemon) and the test would prove nothing about
/// this one.
fn assert_daemon_under_test() {
    let want = std::fs::canonicalize(tests::router_ctl()).expect("ROUTER_CTL");
    let t0 = Instant::now();
    loop {
        let pids = daemon_pids();
        let other: Vec<String> = pids
            .iter()
            .filter_map(|p| {
                let exe = std::fs::read_link(format!("/proc/{p}/exe")).ok()?;
                (exe != want).then(|| format!("pid {p}: {}", exe.display()))
            })
            .collect();
        if !pids.is_empty() && other.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the daemon serving the routers is not {} under test: {}",
            want.display(),
            if pids.is_empty() {
                "none runs (was it killed?)".to_string()
            } else {
                format!("{} (another checkout's daemon)", other.join(", "))
            }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lets clients in `ns` reuse a port whose last connection they closed first (in TIME_WAIT):
/// `net.ipv4.tcp_tw_reuse=1`, as busy clients run, and `tcp_tw_reuse_delay` (1 s by default)
/// down to 1 ms where the kernel has it. Settings of the client instance, not of the router
/// or any device. Returns the time a client must still leave between two connections of one
/// port (2 s where the delay cannot be set: the kernel counts it in whole seconds there).
fn allow_time_wait_reuse(ns: &str) -> Duration {
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.tcp_tw_reuse=1"
    ));
    let delay = sh_out(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.tcp_tw_reuse_delay=1"
    ));
    if delay.status.success() {
        Duration::ZERO
    } else {
        Duration::from_secs(2)
    }
}

/// The request of round `round` of connection `conn` from `port`, the last one saying what
/// the server does after answering it.
fn request(what: &str, conn: usize, port: u16, round: usize, last: Option<Close>) -> [u8; REQ_LEN] {
    let text = format!(
        "{what} conn {conn:03} port {port:05} round {round:02}{}",
        match last {
            None => "",
            Some(Close::ServerFirst) => " then close",
            Some(_) => " last",
        }
    );
    let mut r = [b'.'; REQ_LEN];
    r[..text.len()].copy_from_slice(text.as_bytes());
    r
}

/// The bytes of an answer after its head: a stream seeded by the request.
fn derived(req: &[u8], out: &mut [u8]) {
    // FNV-1a, then xorshift64.
    let mut x = req.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    }) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// The server's answer to `req` from `peer`, received at `local`.
fn answer(req: &[u8; REQ_LEN], peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut a = vec![b' '; ANSWER_LEN];
    a[..REQ_LEN].copy_from_slice(req);
    let seen = format!("peer {peer} local {local}");
    a[REQ_LEN..REQ_LEN + seen.len()].copy_from_slice(seen.as_bytes());
    derived(req, &mut a[HEAD_LEN..]);
    a
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['.', ' '])
        .to_string()
}

/// Reads one request, or Ok(false) at EOF before it.
fn read_request(c: &mut TcpStream, buf: &mut [u8; REQ_LEN]) -> std::io::Result<bool> {
    let mut n = 0;
    while n < REQ_LEN {
        match c.read(&mut buf[n..])? {
            0 if n == 0 => return Ok(false),
            0 => {
                return Err(std::io::Error::other(format!(
                    "EOF after {n} bytes of a request"
                )))
            }
            k => n += k,
        }
    }
    Ok(true)
}

/// Answers one connection's requests until the last one, then closes as it says (at once, or
/// once the client closed or reset its side); returns the peer it saw, or what went wrong.
fn serve_connection(mut c: TcpStream, peer: SocketAddr) -> Result<SocketAddr, String> {
    let local = c.local_addr().map_err(|e| e.to_string())?;
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = [0u8; REQ_LEN];
    let mut last = String::from("none");
    loop {
        match read_request(&mut c, &mut req) {
            Ok(true) => {}
            Ok(false) => return Err(format!("from {peer}: EOF after request {last:?}")),
            Err(e) => return Err(format!("from {peer}, after request {last:?}: {e}")),
        }
        last = text(&req);
        c.write_all(&answer(&req, peer, local))
            .map_err(|e| format!("from {peer}, answering {last:?}: {e}"))?;
        if last.ends_with("then close") {
            return Ok(peer);
        }
        if last.ends_with(" last") {
            return match read_request(&mut c, &mut req) {
                Ok(false) => Ok(peer),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(peer),
                Ok(true) => Err(format!(
                    "from {peer}: a request after the last one: {:?}",
                    text(&req)
                )),
                Err(e) => Err(format!("from {peer}, after the last request: {e}")),
            };
        }
    }
}

/// A server in `ns` on `listen` answering `total` connections (each on a thread of its own),
/// or as many as come before `Server::stop` (or before it waits `ACCEPT_IDLE` for the next).
struct Server {
    listener: std::sync::Arc<TcpListener>,
    handle: std::thread::JoinHandle<Vec<Result<SocketAddr, String>>>,
}

impl Server {
    fn start(ns: &str, listen: SocketAddrV4, total: usize) -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = in_ns(ns, move || {
            let l = std::sync::Arc::new(TcpListener::bind(listen).expect("bind"));
            // accept() gives up after this (SO_RCVTIMEO).
            let tv = libc::timeval {
                tv_sec: ACCEPT_IDLE.as_secs() as libc::time_t,
                tv_usec: 0,
            };
            // SAFETY: setsockopt with a timeval.
            let rc = unsafe {
                libc::setsockopt(
                    l.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
            tx.send(l.clone()).unwrap();
            let mut handlers = Vec::new();
            while handlers.len() < total {
                match l.accept() {
                    Ok((c, peer)) => {
                        handlers.push(std::thread::spawn(move || serve_connection(c, peer)))
                    }
                    // Stopped, or nobody came for ACCEPT_IDLE.
                    Err(_) => break,
                }
            }
            handlers
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("server thread panicked".into()))
                })
                .collect()
        });
        let listener = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server ready");
        Server { listener, handle }
    }

    /// Stops accepting (the clients are done) and returns, per connection taken, the peer it
    /// saw or what went wrong.
    fn stop(self) -> Vec<Result<SocketAddr, String>> {
        // SAFETY: shutdown(2) on a listening socket we hold: a blocked accept returns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        self.handle.join().expect("server thread")
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: a plain C struct, all zeroes is valid.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

/// A TCP connection to `dst` from local port `port` (SO_REUSEADDR, so that the port can be
/// bound again while its last connection is in TIME_WAIT at either end).
fn connect_from(port: u16, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor the TcpStream owns from the start.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            4,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // A blocking connect gives up after the send timeout.
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let me = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        if libc::bind(fd, &me as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let to = sockaddr(dst);
        if libc::connect(fd, &to as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// Makes closing `c` reset the connection (SO_LINGER with a zero timeout).
fn linger_zero(c: &TcpStream) -> std::io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a linger.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Segments the socket's sender retransmitted so far (TCP_INFO).
fn retransmissions(c: &TcpStream) -> u32 {
    // SAFETY: getsockopt into a tcp_info of the length given.
    unsafe {
        let mut ti: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            c.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut ti as *mut _ as *mut libc::c_void,
            &mut len,
        );
        if rc == 0 {
            ti.tcpi_total_retrans
        } else {
            0
        }
    }
}

/// Whether the router's flow listing holds `from` translated to `to`; if not, what it holds
/// for `from` ("from → to" each).
fn listed(router: &str, from: &str, to: &str) -> Result<(), Vec<String>> {
    let flows = ctl_json(&["nat", router]);
    let flows = flows.as_array().unwrap();
    if flows.iter().any(|f| f["from"] == from && f["to"] == to) {
        return Ok(());
    }
    Err(flows
        .iter()
        .filter(|f| f["from"] == from)
        .map(|f| format!("{} → {}", f["from"], f["to"]))
        .collect())
}

/// What one client saw.
#[derive(Default)]
struct ClientReport {
    failures: Vec<String>,
    connections: usize,
    closed_listed: usize,
    slowest: (Duration, String),
    retransmissions: u32,
}

/// What one connection showed.
struct Conn {
    /// Each exchange and what it took.
    took: Vec<(String, Duration)>,
    /// Segments its client retransmitted.
    retransmissions: u32,
    /// A short connection's closed flow was listed in the fast path before the port's reuse.
    closed_listed: bool,
}

/// A connection's request/answer rounds, each checked and timed.
struct Exchanges {
    c: TcpStream,
    what: &'static str,
    conn: usize,
    port: u16,
    buf: Vec<u8>,
    want: Vec<u8>,
    /// The connection as the server saw it, "peer → local": the fast path's listing shows the
    /// connection's flow translated to that.
    seen: Option<String>,
    took: Vec<(String, Duration)>,
    round: usize,
}

impl Exchanges {
    /// The next round: a request and its answer, which must be this request's, from a server
    /// that saw the same connection as before; `last` tells the server how the connection
    /// ends after it.
    fn round(&mut self, last: Option<Close>) -> Result<(), String> {
        let round = self.round;
        self.round += 1;
        let req = request(self.what, self.conn, self.port, round, last);
        let t = Instant::now();
        self.c
            .write_all(&req)
            .map_err(|e| format!("round {round}: sending the request: {e}"))?;
        self.c.read_exact(&mut self.buf).map_err(|e| {
            format!(
                "round {round}: no whole answer after {} ms: {e} (the client retransmitted {} segment(s))",
                t.elapsed().as_millis(),
                retransmissions(&self.c)
            )
        })?;
        self.took.push((format!("round {round}"), t.elapsed()));
        let buf = &self.buf;
        if buf[..REQ_LEN] != req {
            return Err(format!(
                "round {round}: asked {:?}, got the answer to {:?}",
                text(&req),
                text(&buf[..REQ_LEN])
            ));
        }
        derived(&req, &mut self.want);
        if let Some(i) = buf[HEAD_LEN..]
            .iter()
            .zip(&self.want)
            .position(|(a, b)| a != b)
        {
            return Err(format!(
                "round {round}: the answer to {:?} differs from what the server computes for it at byte {}",
                text(&req),
                HEAD_LEN + i
            ));
        }
        let head = text(&buf[REQ_LEN..HEAD_LEN]);
        let Some((peer, local)) = head
            .strip_prefix("peer ")
            .and_then(|h| h.split_once(" local "))
        else {
            return Err(format!("round {round}: a malformed answer head {head:?}"));
        };
        let view = format!("{peer} → {local}");
        match &self.seen {
            None => self.seen = Some(view),
            Some(v) if *v != view => {
                return Err(format!(
                    "round {round}: the server saw the connection as {view}, earlier as {v}"
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// Settings a client thread takes along.
#[derive(Clone)]
struct Client {
    what: &'static str,
    router: String,
    connect: SocketAddrV4,
    port: u16,
    kinds: Vec<Kind>,
    close: Close,
    copied: Copied,
    gap: Duration,
}

impl Client {
    /// The connections of `kinds` one after another from `port`, each checked.
    fn run(&self) -> ClientReport {
        let mut rep = ClientReport::default();
        let mut broken = 0;
        let mut last_close: Option<Instant> = None;
        for (conn, kind) in self.kinds.iter().enumerate() {
            if let Some(t) = last_close {
                std::thread::sleep(self.gap.saturating_sub(t.elapsed()));
            }
            let name = format!(
                "{} connection {conn} ({kind:?}) from port {}",
                self.what, self.port
            );
            rep.connections += 1;
            match self.connection(conn, *kind) {
                Ok(c) => {
                    rep.retransmissions += c.retransmissions;
                    rep.closed_listed += c.closed_listed as usize;
                    for (label, took) in c.took {
                        if took > rep.slowest.0 {
                            rep.slowest = (took, format!("{name}, {label}"));
                        }
                        if took > EXCHANGE_DEADLINE {
                            rep.failures.push(format!(
                                "{name}: {label} took {} ms (deadline {} ms; the client retransmitted {} segment(s))",
                                took.as_millis(),
                                EXCHANGE_DEADLINE.as_millis(),
                                c.retransmissions
                            ));
                        }
                    }
                }
                Err(e) => {
                    rep.failures.push(format!("{name}: {e}"));
                    broken += 1;
                    if broken == 2 {
                        rep.failures.push(format!(
                            "{} port {}: gave up after 2 broken connections",
                            self.what, self.port
                        ));
                        break;
                    }
                }
            }
            last_close = Some(Instant::now());
        }
        rep
    }

    /// One connection, or why it broke (an error, a wrong answer, a carried flow never in the
    /// fast path).
    fn connection(&self, conn: usize, kind: Kind) -> Result<Conn, String> {
        let mut took = Vec::new();
        // The port's previous connection may linger a moment (LAST_ACK, or TIME_WAIT not yet
        // reusable): the kernel refuses the 4-tuple without sending anything; try again.
        let t0 = Instant::now();
        let c = loop {
            let t = Instant::now();
            match connect_from(self.port, self.connect) {
                Ok(c) => {
                    took.push(("connect".to_string(), t.elapsed()));
                    break c;
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                        && t0.elapsed() < Duration::from_secs(2) =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
        };
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let local = c.local_addr().map_err(|e| e.to_string())?;
        let from = format!("{local} → {}", self.connect);
        let mut x = Exchanges {
            c,
            what: self.what,
            conn,
            port: self.port,
            buf: vec![0u8; ANSWER_LEN],
            want: vec![0u8; ANSWER_LEN - HEAD_LEN],
            seen: None,
            took,
            round: 0,
        };
        match kind {
            Kind::Short => {
                for round in 0..ROUNDS {
                    x.round((round + 1 == ROUNDS).then_some(self.close))?;
                }
            }
            Kind::Carried => {
                for _ in 0..ROUNDS - ROUNDS_FAST {
                    x.round(None)?;
                }
                // Until the fast path has the flow, the connection goes on through the kernel
                // (whatever a copy policy waits for, traffic keeps coming), a round every 5 ms.
                let t = Instant::now();
                match self.copied {
                    Copied::Listed => {
                        let to = x.seen.clone().unwrap_or_default();
                        while let Err(mine) = listed(&self.router, &from, &to) {
                            if t.elapsed() > LISTED_WITHIN {
                                return Err(format!(
                                    "its flow {from} (translated to {to}) was not in the fast path {} s and {} rounds after the first {} (the fast path has for it: {mine:?})",
                                    LISTED_WITHIN.as_secs(),
                                    x.round - (ROUNDS - ROUNDS_FAST),
                                    ROUNDS - ROUNDS_FAST
                                ));
                            }
                            x.round(None)?;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    Copied::Pause(d) => {
                        while t.elapsed() < d {
                            x.round(None)?;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                for round in 0..ROUNDS_FAST {
                    x.round((round + 1 == ROUNDS_FAST).then_some(self.close))?;
                }
            }
        }
        let Exchanges {
            mut c,
            seen,
            mut took,
            ..
        } = x;
        let retrans = retransmissions(&c);
        let t = Instant::now();
        match self.close {
            Close::ClientAborts => {
                linger_zero(&c).map_err(|e| format!("SO_LINGER: {e}"))?;
                drop(c);
            }
            close => {
                if close == Close::ClientFirst {
                    c.shutdown(std::net::Shutdown::Write)
                        .map_err(|e| format!("shutdown: {e}"))?;
                }
                // Either way the server's FIN ends it: EOF, nothing more.
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).map_err(|e| {
                    format!(
                        "waiting for the server's close: {e} after {} ms",
                        t.elapsed().as_millis()
                    )
                })?;
                took.push(("close".to_string(), t.elapsed()));
                if !rest.is_empty() {
                    return Err(format!(
                        "{} bytes after the last answer: {:?}",
                        rest.len(),
                        text(&rest[..rest.len().min(REQ_LEN)])
                    ));
                }
                // The client's FIN, if it has not sent it yet.
                drop(c);
            }
        }
        // A short connection: reuse the port only once the fast path got the closed flow, if
        // it gets it at all.
        let mut closed_listed = false;
        if kind == Kind::Short {
            match self.copied {
                Copied::Listed => {
                    let to = seen.as_deref().unwrap_or_default();
                    let t = Instant::now();
                    closed_listed = loop {
                        if listed(&self.router, &from, to).is_ok() {
                            break true;
                        }
                        if t.elapsed() > COPY_WAIT {
                            break false;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    };
                }
                Copied::Pause(d) => std::thread::sleep(d),
            }
        }
        Ok(Conn {
            took,
            retransmissions: retrans,
            closed_listed,
        })
    }
}

/// Runs scenario `r` and checks the server's side too: every connection it took came from
/// `peer_ip` and was answered without error. Fails if another build's daemon served it.
fn run(r: &Run) -> Outcome {
    let t0 = Instant::now();
    let total = r.ports.len() * r.kinds.len();
    let server = Server::start(&r.server_ns, r.listen, total);
    let clients: Vec<_> = r
        .ports
        .iter()
        .map(|&port| {
            let c = Client {
                what: r.what,
                router: r.router.clone(),
                connect: r.connect,
                port,
                kinds: r.kinds.clone(),
                close: r.close,
                copied: r.copied,
                gap: r.gap,
            };
            in_ns(&r.client_ns, move || c.run())
        })
        .collect();
    let mut o = Outcome {
        slowest: (Duration::ZERO, "none".into()),
        closed_listed: matches!(r.copied, Copied::Listed).then_some(0),
        ..Outcome::default()
    };
    for c in clients {
        let rep = c.join().expect("client thread");
        o.failures.extend(rep.failures);
        o.connections += rep.connections;
        if let Some(n) = &mut o.closed_listed {
            *n += rep.closed_listed;
        }
        o.retransmissions += rep.retransmissions;
        if rep.slowest.0 > o.slowest.0 {
            o.slowest = rep.slowest;
        }
    }
    let served = server.stop();
    for s in &served {
        match s {
            Ok(peer) if peer.ip().to_string() == r.peer_ip => {}
            Ok(peer) => o.failures.push(format!(
                "{}: the server saw a connection from {peer}, {} expected",
                r.what, r.peer_ip
            )),
            Err(e) => o.failures.push(format!("{}: server: {e}", r.what)),
        }
    }
    if served.len() != total {
        o.failures.push(format!(
            "{}: the server took {} connections of {total}",
            r.what,
            served.len()
        ));
    }
    eprintln!(
        "{}: {} connections in {:.2} s, {} closed flows in the fast path at their port's reuse, slowest exchange {:.1} ms ({}), {} segment(s) retransmitted, {} failure(s)",
        r.what,
        o.connections,
        t0.elapsed().as_secs_f64(),
        o.closed_listed.map_or("(not looked at)".to_string(), |n| n.to_string()),
        o.slowest.0.as_secs_f64() * 1e3,
        o.slowest.1,
        o.retransmissions,
        o.failures.len()
    );
    assert_daemon_under_test();
    o
}

fn addr(ip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.parse().unwrap(), port)
}

/// The NAT seed (SNAT, vm3's floating IP) with its neighbours learnt and the way out warm.
fn nat_seed() -> Seed {
    let s = Seed::up_nat(|ids| ids.config_nat("", FIP_VM3));
    assert_daemon_under_test();
    // The servers keep no TIME_WAIT (a setting of the server hosts, not of the router or of
    // any device). With fully random SNAT ports, a few hundred connections from one gateway
    // address land, about once per run, on a port whose previous connection from another
    // client port the server still holds in TIME_WAIT; this kernel gives every connection its
    // own timestamp offset, so the server refuses about half of those SYNs (PAWS) and the
    // client sends again a second later: with or without this router (see BENCHMARKS.md).
    // The router's conntrack keeps its TIME_WAIT entries, which is what these tests are about.
    for ns in [s.out(), s.vm3.clone()] {
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.tcp_max_tw_buckets=0"
        ));
    }
    s.prime_neighbours();
    assert!(Seed::ping(&s.vm1, OUT, 2), "vm1 cannot reach the outside");
    assert!(
        Seed::ping(&s.out(), FIP, 2),
        "the outside cannot reach vm3's floating IP"
    );
    s
}

/// 30 connections one after another from one vm1 port to the same outside server through
/// SNAT, the server closing each: 20 short ones (each in conntrack's TIME_WAIT when the next
/// one comes, and in the fast path if the daemon copied it), then 10 the fast path carries.
/// The kernel gives a connection a new gateway port whenever it replaces the previous one's
/// entry; every connection gets its own answers and none stalls, and the fast path carried
/// the second half of each carried connection.
#[test]
fn snat_client_port_reused_while_the_server_closes_first() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let which = [
        (s.ids.dev_a(), Side::Source),
        (s.ids.dev_g(), Side::Destination),
    ];
    let (short, carried) = (20, 10);
    run_checked(
        &s,
        &Run {
            what: "snat-server-closes",
            router: s.ids.router_id.clone(),
            client_ns: s.vm1.clone(),
            server_ns: s.out(),
            connect: addr(OUT, 5101),
            listen: addr(OUT, 5101),
            ports: vec![40001],
            kinds: sequence(short, carried),
            close: Close::ServerFirst,
            copied: Copied::Listed,
            peer_ip: GATEWAY,
            gap: Duration::ZERO,
        },
        "SNAT, one client port reused, the server closing first",
        &which,
        carried,
    );
}

/// As above with the client closing each connection first: the client's end is in TIME_WAIT
/// when it connects again from the same port (`allow_time_wait_reuse`), and so is conntrack's
/// entry.
#[test]
fn snat_client_port_reused_while_the_client_closes_first() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let gap = allow_time_wait_reuse(&s.vm1);
    let which = [
        (s.ids.dev_a(), Side::Source),
        (s.ids.dev_g(), Side::Destination),
    ];
    let (short, carried) = if gap.is_zero() { (20, 10) } else { (5, 3) };
    run_checked(
        &s,
        &Run {
            what: "snat-client-closes",
            router: s.ids.router_id.clone(),
            client_ns: s.vm1.clone(),
            server_ns: s.out(),
            connect: addr(OUT, 5102),
            listen: addr(OUT, 5102),
            ports: vec![40002],
            kinds: sequence(short, carried),
            close: Close::ClientFirst,
            copied: Copied::Listed,
            peer_ip: GATEWAY,
            gap,
        },
        "SNAT, one client port reused, the client closing first",
        &which,
        carried,
    );
}

/// 30 connections from one vm1 port through SNAT that the fast path carries, each reset by
/// the client at its end (as load balancers and impatient clients do): the fast path had the
/// flow (listed) when the reset went to the kernel, so this needs no late copy, whatever the
/// copy policy; at least every other connection finds the previous one's entry in CLOSE and
/// the kernel replaces it (`Close::ClientAborts`). Each gets its own answers and none stalls,
/// and the fast path carried the second half of each.
#[test]
fn snat_client_port_reused_after_the_client_resets() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let which = [
        (s.ids.dev_a(), Side::Source),
        (s.ids.dev_g(), Side::Destination),
    ];
    let carried = 30;
    run_checked(
        &s,
        &Run {
            what: "snat-client-resets",
            router: s.ids.router_id.clone(),
            client_ns: s.vm1.clone(),
            server_ns: s.out(),
            connect: addr(OUT, 5107),
            listen: addr(OUT, 5107),
            ports: vec![40007],
            kinds: sequence(0, carried),
            close: Close::ClientAborts,
            copied: Copied::Listed,
            peer_ip: GATEWAY,
            gap: Duration::ZERO,
        },
        "SNAT, one client port reused, the client resetting each connection",
        &which,
        carried,
    );
}

/// Through vm3's floating IP: the outside host reuses its client port towards 192.168.1.20,
/// the server (vm3) closing first, then the client closing first (a floating IP maps ports
/// 1:1, so a replaced entry maps the same: these must simply keep working); then vm1 reuses
/// its port towards the floating IP (the hairpin: DNAT to vm3 and SNAT to a new gateway port
/// whenever the kernel replaces the entry). 20 short and 10 carried connections each; every
/// one gets its own answers without a stall, vm3 sees the real source (the outside's) or the
/// gateway address (the hairpin's), and the fast path carried the carried ones (a connection
/// that rode an old copy through its handshake leaves conntrack's entry short of ESTABLISHED,
/// and a daemon following conntrack may then never copy it).
#[test]
fn floating_ip_client_ports_reused_from_outside_and_through_the_hairpin() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let (a, b, g) = (s.ids.dev_a(), s.ids.dev_b(), s.ids.dev_g());
    let inbound = [(g, Side::Destination), (b.clone(), Side::Source)];
    for (what, port, close, listen) in [
        ("fip-server-closes", 40003, Close::ServerFirst, 5103),
        ("fip-client-closes", 40004, Close::ClientFirst, 5104),
    ] {
        let gap = if close == Close::ClientFirst {
            allow_time_wait_reuse(&s.out())
        } else {
            Duration::ZERO
        };
        let (short, carried) = if gap.is_zero() { (20, 10) } else { (5, 3) };
        run_checked(
            &s,
            &Run {
                what,
                router: s.ids.router_id.clone(),
                client_ns: s.out(),
                server_ns: s.vm3.clone(),
                connect: addr(FIP, listen),
                listen: addr(VM3, listen),
                ports: vec![port],
                kinds: sequence(short, carried),
                close,
                copied: Copied::Listed,
                peer_ip: OUT,
                gap,
            },
            &format!("the outside to the floating IP, one client port reused, {close:?}"),
            &inbound,
            carried,
        );
    }
    // The hairpin: vm1 → the floating IP.
    let hairpin = [(a, Side::Destination), (b, Side::Source)];
    let (short, carried) = (20, 10);
    run_checked(
        &s,
        &Run {
            what: "hairpin-server-closes",
            router: s.ids.router_id.clone(),
            client_ns: s.vm1.clone(),
            server_ns: s.vm3.clone(),
            connect: addr(FIP, 5105),
            listen: addr(VM3, 5105),
            ports: vec![40005],
            kinds: sequence(short, carried),
            close: Close::ServerFirst,
            copied: Copied::Listed,
            peer_ip: GATEWAY,
            gap: Duration::ZERO,
        },
        "vm1 to the floating IP (hairpin), one client port reused, the server closing first",
        &hairpin,
        carried,
    );
}

/// 32 clients in vm1 at once, each making 10 connections one after another from a port of its
/// own to the outside server through SNAT (the server closing each): 5 short ones, each
/// followed by a 60 ms pause (the daemon may copy the closed flow meanwhile), then 5 that go on
/// for 60 ms mid-way, a round every 5 ms (the daemon copies the open flow). Every one of the
/// 320 connections gets its own answers without a stall, and the fast path carried most of the
/// carried connections' last 12 rounds.
#[test]
fn many_clients_reuse_their_ports_at_once_through_snat() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let which = [
        (s.ids.dev_a(), Side::Source),
        (s.ids.dev_g(), Side::Destination),
    ];
    let before = translated(&s, &which);
    let (clients, short, carried) = (32u16, 5, 5);
    run(&Run {
        what: "snat-concurrent",
        router: s.ids.router_id.clone(),
        client_ns: s.vm1.clone(),
        server_ns: s.out(),
        connect: addr(OUT, 5106),
        listen: addr(OUT, 5106),
        ports: (41000..41000 + clients).collect(),
        kinds: sequence(short, carried),
        close: Close::ServerFirst,
        copied: Copied::Pause(Duration::from_millis(60)),
        peer_ip: GATEWAY,
        gap: Duration::ZERO,
    })
    .assert_clean("32 clients reusing their ports through SNAT");
    // At least three quarters of the carried connections' last rounds: their flows were in the
    // fast path.
    assert_fast_path_translated(
        &s,
        "SNAT reuse, 32 clients",
        &which,
        &before,
        (clients as usize * carried * ROUNDS_FAST * 3 / 4) as u64,
    );
}

/// Connections the size of a web request through SNAT and through vm3's floating IP: `n`
/// of them one after another, each connecting from a port the kernel picks, sending a
/// 100-byte request naming the connection, reading the server's 1 KiB answer to EOF (the
/// server closes first) and checking it byte for byte. Such a connection is about ten
/// segments, never enough for the daemon to copy its flow: the fast path carries its request
/// and answer only by learning the mapping from the handshake. Every connection must complete
/// within `EXCHANGE_DEADLINE`, and the fast path must have translated the request and the
/// answer of at least three quarters of them.
#[test]
fn request_sized_connections_are_carried_from_their_first_request() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let n = 200usize;
    for (what, client_ns, server_ns, connect, listen, peer, which) in [
        (
            "SNAT",
            s.vm1.clone(),
            s.out(),
            addr(OUT, 5120),
            addr(OUT, 5120),
            GATEWAY,
            [
                (s.ids.dev_a(), Side::Source),
                (s.ids.dev_g(), Side::Destination),
            ],
        ),
        (
            "floating IP",
            s.out(),
            s.vm3.clone(),
            addr(FIP, 5121),
            addr(VM3, 5121),
            OUT,
            [
                (s.ids.dev_g(), Side::Destination),
                (s.ids.dev_b(), Side::Source),
            ],
        ),
    ] {
        let before = translated(&s, &which);
        let server = in_ns(&server_ns, move || -> Result<(), String> {
            let l = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
            for _ in 0..n {
                let (mut c, from) = l.accept().map_err(|e| format!("accept: {e}"))?;
                if from.ip().to_string() != peer {
                    return Err(format!("a connection from {from}, {peer} expected"));
                }
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut req = [0u8; 100];
                c.read_exact(&mut req)
                    .map_err(|e| format!("reading a request: {e}"))?;
                let answer: Vec<u8> = (0..1024).map(|i| req[i % 100] ^ (i / 100) as u8).collect();
                c.write_all(&answer)
                    .map_err(|e| format!("answering: {e}"))?;
            }
            Ok(())
        });
        let client = in_ns(&client_ns, move || -> Vec<String> {
            let mut failures = Vec::new();
            for i in 0..n {
                let t0 = Instant::now();
                let req: Vec<u8> = format!("{what} request {i:>6} ")
                    .bytes()
                    .chain(std::iter::repeat(b'.'))
                    .take(100)
                    .collect();
                let want: Vec<u8> = (0..1024).map(|j| req[j % 100] ^ (j / 100) as u8).collect();
                let got = (|| -> std::io::Result<Vec<u8>> {
                    let mut c = TcpStream::connect_timeout(&connect.into(), IO_TIMEOUT)?;
                    c.set_read_timeout(Some(IO_TIMEOUT))?;
                    c.write_all(&req)?;
                    let mut got = Vec::new();
                    c.read_to_end(&mut got)?;
                    Ok(got)
                })();
                let took = t0.elapsed();
                match got {
                    Ok(g) if g == want && took <= EXCHANGE_DEADLINE => {}
                    Ok(g) if g == want => failures.push(format!(
                        "connection {i} took {:.1} ms (a stall)",
                        took.as_secs_f64() * 1e3
                    )),
                    Ok(g) => failures.push(format!(
                        "connection {i}: {} bytes back, not its own answer",
                        g.len()
                    )),
                    Err(e) => failures.push(format!("connection {i}: {e}")),
                }
            }
            failures
        });
        let failures = client.join().expect("client thread");
        let served = server.join().expect("server thread");
        assert!(
            failures.is_empty() && served.is_ok(),
            "{what}: {} of {n} connections failed: {:?}; server: {served:?}",
            failures.len(),
            &failures[..failures.len().min(8)]
        );
        assert_fast_path_translated(&s, what, &which, &before, (n * 3 / 4) as u64);
    }
}

/// The flow the program learned for `orig` (client address and port → server), as its
/// NAT_LEARNED slot holds it whole (valid or not).
fn learned(
    router: &str,
    orig: SocketAddrV4,
    server: SocketAddrV4,
) -> Option<router_common::NatFlow> {
    use aya::maps::{Array, Map};
    use router_common::{map_names, nat};
    let slots: Array<_, router_common::LearnedFlow> = Array::try_from(Map::Array(
        router_ctl::datapath::open_pinned(router, map_names::NAT_LEARNED).expect("NAT_LEARNED"),
    ))
    .unwrap();
    let k = router_common::NatKey {
        src: orig.ip().octets(),
        dst: server.ip().octets(),
        sport: orig.port().to_be_bytes(),
        dport: server.port().to_be_bytes(),
        proto: 6,
        _pad: [0; 3],
    };
    let e = slots.get(&nat::learn_slot(&k), 0).unwrap();
    (e.key == k && e.check == nat::learned_check(&e.key, &e.flow)).then_some(e.flow)
}

/// Connects to `to` (from the calling thread's namespace), sends 100 bytes of `fill` and
/// reads the server's echo: the stream and its local address.
fn connect_and_echo(to: SocketAddrV4, fill: u8) -> Result<(TcpStream, SocketAddrV4), String> {
    let mut c =
        TcpStream::connect_timeout(&to.into(), IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let me = match c.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        a => return Err(format!("local address {a}")),
    };
    let mut buf = [fill; 100];
    c.write_all(&buf).unwrap();
    c.read_exact(&mut buf)
        .map_err(|e| format!("the first answer: {e}"))?;
    if buf != [fill; 100] {
        return Err("the first answer is not the echo".into());
    }
    Ok((c, me))
}

/// A learned flow whose connection goes quiet without a FIN or RST through the router (a
/// client that vanished, or one that pauses) is used no longer than `NAT_LEARN` after its
/// SYN-ACK (5 s here, below the kernel's SYN_RECV and ESTABLISHED timeouts, so that the
/// kernel's entry outlives the use): the connection's next exchange, after that, is the
/// kernel's (the fast path's counters do not move) and arrives.
#[test]
fn a_learned_flow_whose_connection_goes_quiet_stops_being_used() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = nat_seed();
    let listen = addr(OUT, 5122);
    let server = in_ns(&s.out(), move || {
        let l = TcpListener::bind(listen).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 100];
        // Two requests, the second after the quiet time: echoed.
        for _ in 0..2 {
            c.read_exact(&mut buf).unwrap();
            c.write_all(&buf).unwrap();
        }
    });
    let which = [
        (s.ids.dev_a(), Side::Source),
        (s.ids.dev_g(), Side::Destination),
    ];
    let router = s.ids.router_id.clone();
    let (quiet_tx, quiet_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = in_ns(&s.vm1, move || -> Result<(), String> {
        let (mut c, me) = connect_and_echo(listen, 7)?;
        let Some(flow) = learned(&router, me, listen) else {
            return Err(format!(
                "{me} → {listen} was not learned from its handshake"
            ));
        };
        let left = flow.until.saturating_sub(router_ctl::nat::monotonic_ns());
        if left > 5_000_000_000 {
            return Err(format!("usable for {left} ns more, at most 5 s expected"));
        }
        // Quiet until the flow may no longer be used.
        std::thread::sleep(Duration::from_nanos(left) + Duration::from_millis(100));
        quiet_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let mut buf = [9u8; 100];
        c.write_all(&buf).unwrap();
        c.read_exact(&mut buf)
            .map_err(|e| format!("second answer: {e}"))?;
        if buf != [9u8; 100] {
            return Err("the second answer differs".into());
        }
        Ok(())
    });
    // The fast path's counters around the second exchange only.
    let mut before = None;
    if quiet_rx.recv().is_ok() {
        before = Some(translated(&s, &which));
        go_tx.send(()).unwrap();
    }
    let r = client.join().expect("client thread");
    server.join().expect("server thread");
    r.unwrap();
    let before = before.expect("the client reached its quiet time");
    assert_eq!(
        translated(&s, &which),
        before,
        "the fast path translated the quiet connection's second exchange with a learned flow past its time"
    );
}

/// A connection through vm3's floating IP, learned from its handshake, and then the floating
/// IP removed: the kernel flushes its flows, and the fast path must not go on translating the
/// connection's segments to vm3 with the learned flow (the daemon empties the learned slots
/// through the address with the copies). The next request the client sends is not translated
/// by the fast path and does not reach vm3.
#[test]
fn a_learned_flow_through_a_floating_ip_ends_with_the_floating_ip() {
    require_root();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = nat_seed();
    let (connect, listen) = (addr(FIP, 5123), addr(VM3, 5123));
    let (got_tx, got_rx) = std::sync::mpsc::channel::<usize>();
    let server = in_ns(&s.vm3, move || {
        let l = TcpListener::bind(listen).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 100];
        c.read_exact(&mut buf).unwrap();
        c.write_all(&buf).unwrap();
        // After the removal: whatever still arrives.
        let n = c.read(&mut buf).unwrap_or(0);
        got_tx.send(n).unwrap();
    });
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let router = s.ids.router_id.clone();
    let client = in_ns(&s.out(), move || -> Result<(), String> {
        let (mut c, me) = connect_and_echo(connect, 5)?;
        if learned(&router, me, connect).is_none() {
            return Err(format!("{me} → {connect} was not learned"));
        }
        sent_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // Whatever happens to it: nothing must reach vm3.
        let _ = c.write_all(&[6u8; 100]);
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    });
    sent_rx.recv().expect("the client's first exchange");
    s.apply(&s.ids.config_nat("", ""));
    let which = [(s.ids.dev_g(), Side::Destination)];
    let before = translated(&s, &which);
    go_tx.send(()).unwrap();
    client.join().expect("client thread").unwrap();
    let reached = got_rx.recv_timeout(Duration::from_secs(5)).unwrap_or(0);
    server.join().expect("server thread");
    assert_eq!(
        translated(&s, &which),
        before,
        "the fast path translated the connection's segment after its floating IP was removed"
    );
    assert_eq!(
        reached, 0,
        "{reached} bytes reached vm3 after its floating IP was removed"
    );
}

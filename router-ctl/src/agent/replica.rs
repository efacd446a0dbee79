//! Connection state on an HA router's standby hosts: the active host's agent streams the
//! router namespace's conntrack entries (tuples, translation, TCP state, mark, seconds left)
//! to the agents of the router's other hosts, which install them in their own copy of the
//! namespace. After a failover the new active's kernel already holds every connection with
//! the same translated ports: established TCP and UDP flows through SNAT and floating IPs go
//! on (the fast path copies them from there, as it does any flow the kernel translated).
//!
//! Not through etcd: per-connection data is no business of the consensus store. A direct TCP
//! stream from the active host to each standby over the management network
//! (`--sync-listen ADDR:PORT` on every host, published in the host's `alive` key), each
//! side proving it holds the shared key (`--sync-key FILE`), every frame carrying an
//! HMAC-SHA256 over the session, its sequence number and its bytes (nothing can be injected,
//! replayed or reordered). A standby only takes entries for routers it holds as a standby.
//!
//! What goes: every confirmed TCP and UDP entry of the namespace (TCP in TIME_WAIT or CLOSE
//! excepted), as changes every `PERIOD`, all of them again every `FULL_EVERY` (seconds left
//! refreshed) and on every new connection; entries that went are deleted on the standby.
//!
//! Where the active host's agent gets the table: a `Mirror` per router, read whole from the
//! kernel every `FULL_EVERY` and kept current in between from conntrack's events (a socket
//! opened once in the namespace), each of which only names an entry to look up. Reading a
//! table whole walks every bucket of the host's conntrack hash, whatever few entries the
//! router has (262 144 buckets here): every `PERIOD` for every led router, that grows into
//! cores at tens of HA routers.
//!
//! On the standby, a batch's ends are applied before its new entries, and an entry in the way
//! of one (the translated tuple still held by an ended connection, or kept from when this
//! host forwarded itself) is deleted: the active host is the authority.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::applier::Shared;
use crate::{
    kernel::{
        conntrack::{self, Conntrack, Flow, Tuple},
        netns,
    },
    state::RouterState,
};

/// How often the active host looks for changes.
pub const PERIOD: Duration = Duration::from_millis(200);
/// How often it sends every entry again.
const FULL_EVERY: Duration = Duration::from_secs(10);
const MAGIC: &[u8; 8] = b"rxsync01";
/// A frame's payload at most (about 40 000 entries; more go in several frames).
const MAX_FRAME: usize = 8 << 20;
const ENTRIES_PER_FRAME: usize = 20_000;
/// Standbys served at once at most.
const MAX_PEERS: usize = 32;

/// `--sync-listen` and `--sync-key`, and the stream's counters (shared with `--metrics`).
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub key: Arc<hmac::Key>,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Reads the shared key: at least 32 bytes, readable by its owner only.
pub fn load_key(path: &std::path::Path) -> Result<hmac::Key> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)
        .with_context(|| format!("cannot read the sync key {}", path.display()))?;
    ensure!(
        m.mode() & 0o077 == 0,
        "the sync key {} is readable by others (mode {:o}); chmod 600 it",
        path.display(),
        m.mode() & 0o777
    );
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the sync key {}", path.display()))?;
    ensure!(
        bytes.len() >= 32,
        "the sync key {} holds {} bytes; it needs 32 or more (e.g. head -c 32 /dev/urandom > FILE)",
        path.display(),
        bytes.len()
    );
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

/// What one frame carries: changes of one router's table.
#[derive(Serialize, Deserialize, Debug, Default)]
struct Batch {
    router: String,
    /// Entries to create or update.
    put: Vec<Flow>,
    /// Entries gone on the active host (original tuples).
    gone: Vec<Tuple>,
}

/// What the stream did since the agent started, served by `--metrics`.
#[derive(Default, Debug)]
pub struct Counters {
    /// Entries sent to standbys (changed or new, and gone).
    pub sent: AtomicU64,
    /// Entries created in this host's kernel for a router it holds as a standby.
    pub installed: AtomicU64,
    /// Entries this host's kernel held already, given the active's state.
    pub updated: AtomicU64,
    /// Entries deleted because they ended on the active host.
    pub deleted: AtomicU64,
    /// Entries the kernel here refused to create (connections a failover to this host loses).
    pub failed: AtomicU64,
    /// Batches for a router this host does not hold as a standby (left alone).
    pub ignored: AtomicU64,
    /// Incoming streams ended by an error (a failed handshake or frame check among them).
    pub ended: AtomicU64,
}

fn nonce() -> Result<[u8; 16]> {
    use ring::rand::SecureRandom as _;
    let mut n = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| anyhow::anyhow!("no random numbers"))?;
    Ok(n)
}

fn sign(key: &hmac::Key, parts: &[&[u8]]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(&(p.len() as u32).to_be_bytes());
        ctx.update(p);
    }
    ctx.sign()
}

fn verify(key: &hmac::Key, parts: &[&[u8]], tag: &[u8]) -> Result<()> {
    let mut msg = Vec::new();
    for p in parts {
        msg.extend_from_slice(&(p.len() as u32).to_be_bytes());
        msg.extend_from_slice(p);
    }
    if cfg!(mutant = "replica_unauthenticated") {
        return Ok(());
    }
    hmac::verify(key, &msg, tag).map_err(|_| anyhow::anyhow!("authentication failed"))
}

/// One authenticated direction of a session: frames numbered from 1.
struct Session {
    key: hmac::Key,
    seq: u64,
}

impl Session {
    /// The session's own key, from the shared key and both nonces.
    fn new(shared: &hmac::Key, server: &[u8; 16], client: &[u8; 16]) -> Session {
        let k = sign(shared, &[b"session", server, client]);
        Session {
            key: hmac::Key::new(hmac::HMAC_SHA256, k.as_ref()),
            seq: 0,
        }
    }

    fn write(&mut self, s: &mut impl Write, payload: &[u8]) -> Result<()> {
        self.seq += 1;
        let seq = self.seq.to_be_bytes();
        let tag = sign(&self.key, &[&seq, payload]);
        let mut frame = Vec::with_capacity(payload.len() + 44);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&seq);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(tag.as_ref());
        s.write_all(&frame)?;
        Ok(())
    }

    fn read(&mut self, s: &mut impl Read) -> Result<Vec<u8>> {
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
        ensure!(
            len <= MAX_FRAME,
            "a frame of {len} bytes (at most {MAX_FRAME})"
        );
        let seq = u64::from_be_bytes(head[4..].try_into().unwrap());
        let mut body = vec![0u8; len + 32];
        s.read_exact(&mut body)?;
        let (payload, tag) = body.split_at(len);
        verify(&self.key, &[&seq.to_be_bytes(), payload], tag)?;
        ensure!(
            seq == self.seq + 1,
            "frame {seq} out of order (expected {})",
            self.seq + 1
        );
        self.seq = seq;
        body.truncate(len);
        Ok(body)
    }
}

/// The client's side of the handshake (the active host): proves it holds the key, and
/// checks that the standby does.
fn connect(peer: SocketAddr, key: &hmac::Key, host: &str) -> Result<(TcpStream, Session)> {
    let mut s = TcpStream::connect_timeout(&peer, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    let mut hello = [0u8; 24];
    s.read_exact(&mut hello)?;
    ensure!(
        &hello[..8] == MAGIC,
        "{peer} does not speak the sync protocol"
    );
    let server: [u8; 16] = hello[8..].try_into().unwrap();
    let client = nonce()?;
    let tag = sign(key, &[b"hello", &server, &client, host.as_bytes()]);
    let mut m = Vec::new();
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&client);
    m.push(host.len() as u8);
    m.extend_from_slice(host.as_bytes());
    m.extend_from_slice(tag.as_ref());
    s.write_all(&m)?;
    let mut welcome = [0u8; 32];
    s.read_exact(&mut welcome)?;
    verify(key, &[b"welcome", &server, &client], &welcome)
        .with_context(|| format!("{peer} does not hold this sync key"))?;
    Ok((s, Session::new(key, &server, &client)))
}

/// The server's side: the client's host name once it proved it holds the key.
fn accept(s: &mut TcpStream, key: &hmac::Key) -> Result<(String, Session)> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let server = nonce()?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&server);
    s.write_all(&hello)?;
    let mut head = [0u8; 25];
    s.read_exact(&mut head)?;
    ensure!(&head[..8] == MAGIC, "not the sync protocol");
    let client: [u8; 16] = head[8..24].try_into().unwrap();
    let mut rest = vec![0u8; head[24] as usize + 32];
    s.read_exact(&mut rest)?;
    let (host, tag) = rest.split_at(head[24] as usize);
    verify(key, &[b"hello", &server, &client, host], tag)?;
    let host = String::from_utf8(host.to_vec()).context("a host name that is not UTF-8")?;
    s.write_all(sign(key, &[b"welcome", &server, &client]).as_ref())?;
    // Between frames an active host may be quiet for a while; a dead one is seen by TCP.
    s.set_read_timeout(Some(FULL_EVERY * 3))?;
    Ok((host, Session::new(key, &server, &client)))
}

/// Serves standbys' side: installs what active hosts send for routers held here as a standby.
pub fn serve(cfg: Config, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .with_context(|| format!("cannot listen for connection state on {}", cfg.listen))?;
    listener.set_nonblocking(true)?;
    tracing::info!(listen = %cfg.listen, "receiving connection state for standby routers");
    let c = cfg.counters.clone();
    let open = Arc::new(AtomicU64::new(0));
    std::thread::Builder::new()
        .name("sync-listen".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (mut conn, from) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a sync connection failed");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                if open.load(Ordering::SeqCst) >= MAX_PEERS as u64 {
                    tracing::warn!(%from, "sync connection refused: {MAX_PEERS} open already");
                    continue;
                }
                let _ = conn.set_nonblocking(false);
                let (key, shared, c, open, stop) = (
                    cfg.key.clone(),
                    shared.clone(),
                    c.clone(),
                    open.clone(),
                    stop.clone(),
                );
                open.fetch_add(1, Ordering::SeqCst);
                let _ = std::thread::Builder::new()
                    .name("sync-in".into())
                    .spawn(move || {
                        let r = receive(&mut conn, &key, &shared, &c, &stop);
                        open.fetch_sub(1, Ordering::SeqCst);
                        if let Err(e) = r {
                            c.ended.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%from, error = format!("{e:#}"), "sync connection ended");
                        }
                    });
            }
        })?;
    Ok(())
}

fn receive(
    conn: &mut TcpStream,
    key: &hmac::Key,
    shared: &Shared,
    c: &Counters,
    stop: &AtomicBool,
) -> Result<()> {
    let (host, mut session) = accept(conn, key)?;
    tracing::info!(from = %host, "connection state arrives from the active host");
    while !stop.load(Ordering::SeqCst) {
        let payload = session.read(conn)?;
        let batch: Batch =
            serde_json::from_slice(&payload).context("a frame that is not a batch")?;
        let want = shared.current();
        let standby_here = want.routers.get(&batch.router).is_some_and(|(r, _)| r.ha)
            && !want.active.contains(&batch.router);
        if !standby_here {
            // Not a router held here as a standby (any more): its own kernel is the authority.
            c.ignored.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Some(st) = RouterState::load(&batch.router).ok().flatten() else {
            continue;
        };
        let (put, gone) = (batch.put, batch.gone);
        let counts = netns::run_in(&st.namespace, move || {
            let mut ct = Conntrack::open(0)?;
            let (mut new, mut upd, mut del, mut failed) = (0u64, 0u64, 0u64, 0u64);
            // Ends first: a connection that ended there may hold the translated tuple a new
            // one in the same batch was given.
            for t in &gone {
                ct.delete(t)?;
                del += 1;
            }
            for f in put.iter().filter(|f| replicated(f)) {
                match ct.install(f) {
                    Ok(true) => new += 1,
                    Ok(false) => upd += 1,
                    Err(e) => {
                        // A connection that will not survive a failover to this host.
                        if failed < 3 {
                            tracing::info!(flow = ?f.orig, reply = ?f.reply, error = format!("{e:#}"), "cannot install a connection from the active host");
                        }
                        failed += 1;
                    }
                }
            }
            Ok((new, upd, del, failed))
        })?;
        if !cfg!(mutant = "replica_uncounted") {
            c.installed.fetch_add(counts.0, Ordering::Relaxed);
        }
        c.updated.fetch_add(counts.1, Ordering::Relaxed);
        c.deleted.fetch_add(counts.2, Ordering::Relaxed);
        c.failed.fetch_add(counts.3, Ordering::Relaxed);
    }
    Ok(())
}

/// The entries that go to the standbys.
fn replicated(f: &Flow) -> bool {
    const TIME_WAIT: u8 = 7;
    const CLOSE: u8 = 8;
    matches!(
        f.orig.proto,
        conntrack::IPPROTO_TCP | conntrack::IPPROTO_UDP
    ) && f.status & conntrack::status::CONFIRMED != 0
        && f.status & conntrack::status::DYING == 0
        && !matches!(f.tcp_state, Some(TIME_WAIT | CLOSE))
}

/// What of an entry, when it changes, is sent again before the next full round.
fn signature(f: &Flow) -> (Tuple, u32, Option<u8>, u32) {
    (f.reply, f.status, f.tcp_state, f.mark)
}

/// One standby host, as the active host's sender sees it.
#[derive(Default)]
struct Link {
    conn: Option<(TcpStream, Session)>,
    /// What it holds, by router: each entry's signature as last sent.
    sent: BTreeMap<String, HashMap<Tuple, (Tuple, u32, Option<u8>, u32)>>,
    last_full: Option<Instant>,
    /// Not before this again after a failed connection.
    retry: Option<Instant>,
}

/// The active host's side: every `PERIOD`, the entries of each HA router it leads go to the
/// sync addresses of the router's other hosts.
pub fn send_loop(
    key: Arc<hmac::Key>,
    host: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut links: BTreeMap<SocketAddr, Link> = BTreeMap::new();
    let mut mirrors = Mirrors::default();
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let want = shared.current();
        let mut wanted: BTreeMap<SocketAddr, Vec<String>> = BTreeMap::new();
        for (id, peers) in &want.peers {
            if want.active.contains(id) && !cfg!(mutant = "replica_not_sent") {
                for p in peers {
                    wanted.entry(*p).or_default().push(id.clone());
                }
            }
        }
        links.retain(|a, _| wanted.contains_key(a));
        // Every led router's table, whether or not its standbys can be reached now: the
        // events must not pile up.
        let led: std::collections::BTreeSet<&String> = wanted.values().flatten().collect();
        mirrors.keep(&led);
        let mut tables: BTreeMap<String, Option<Vec<Flow>>> = led
            .iter()
            .map(|id| (id.to_string(), mirrors.table(id)))
            .collect();
        for (addr, ids) in wanted {
            let link = links.entry(addr).or_default();
            if let Err(e) = send_to(link, addr, &ids, &key, &host, &mut tables, &counters) {
                if link.conn.is_some() || link.retry.is_none() {
                    tracing::info!(standby = %addr, error = format!("{e:#}"), "cannot send connection state; retrying");
                }
                link.conn = None;
                link.sent.clear();
                link.retry = Some(Instant::now() + Duration::from_millis(500));
            }
        }
        if let Some(rest) = PERIOD.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

fn send_to(
    link: &mut Link,
    addr: SocketAddr,
    ids: &[String],
    key: &hmac::Key,
    host: &str,
    tables: &mut BTreeMap<String, Option<Vec<Flow>>>,
    counters: &Counters,
) -> Result<()> {
    if link.conn.is_none() {
        if link.retry.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        link.conn = Some(connect(addr, key, host)?);
        link.sent.clear();
        link.last_full = None;
        link.retry = None;
        tracing::info!(standby = %addr, "sending connection state");
    }
    let full = link.last_full.is_none_or(|t| t.elapsed() >= FULL_EVERY);
    if full {
        link.last_full = Some(Instant::now());
    }
    link.sent.retain(|id, _| ids.contains(id));
    let Some((conn, session)) = link.conn.as_mut() else {
        bail!("not connected");
    };
    for id in ids {
        let Some(Some(flows)) = tables.get(id) else {
            continue;
        };
        let sent = link.sent.entry(id.clone()).or_default();
        let mut batch = Batch {
            router: id.clone(),
            ..Default::default()
        };
        let mut now: HashMap<Tuple, (Tuple, u32, Option<u8>, u32)> = HashMap::new();
        for f in flows.iter().filter(|f| replicated(f)) {
            let sig = signature(f);
            if full || sent.get(&f.orig) != Some(&sig) {
                batch.put.push(f.clone());
            }
            now.insert(f.orig, sig);
        }
        batch.gone = sent
            .keys()
            .filter(|t| !now.contains_key(t))
            .copied()
            .collect();
        *sent = now;
        if batch.put.is_empty() && batch.gone.is_empty() {
            continue;
        }
        let n = (batch.put.len() + batch.gone.len()) as u64;
        for chunk in chunks(batch) {
            session.write(conn, &serde_json::to_vec(&chunk)?)?;
        }
        counters.sent.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

/// A batch cut into frames of at most `ENTRIES_PER_FRAME` entries.
fn chunks(b: Batch) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut put = b.put.into_iter().peekable();
    let mut gone = b.gone.into_iter().peekable();
    while put.peek().is_some() || gone.peek().is_some() || out.is_empty() {
        let p: Vec<Flow> = put.by_ref().take(ENTRIES_PER_FRAME).collect();
        let g: Vec<Tuple> = gone.by_ref().take(ENTRIES_PER_FRAME - p.len()).collect();
        out.push(Batch {
            router: b.router.clone(),
            put: p,
            gone: g,
        });
    }
    out
}

/// One led HA router's replicated conntrack entries as the sender knows them (see the
/// module's notes). Events only name the entries that changed: each is then asked of the
/// kernel (a lookup by its original tuple), so the table holds what the kernel holds at that
/// moment, whatever order events arrive in (the end of an older connection with the same
/// tuples, told late, or an update of it racing a newer one's creation, change nothing).
struct Mirror {
    namespace: String,
    /// The namespace's identity (`netns::inode`) when the sockets were opened: one deleted
    /// and made again under the same name gets new sockets.
    ident: u64,
    /// Subscribed to new, changed and destroyed entries.
    events: Conntrack,
    /// For whole reads and lookups (their answers must not mix with events).
    reader: Conntrack,
    /// The replicated entries (`replicated`), by original tuple.
    flows: HashMap<Tuple, Flow>,
    /// When the table was last read whole; None: due (at the start, after lost events).
    read_at: Option<Instant>,
    /// The namespace's conntrack sends events (`net.netfilter.nf_conntrack_events` not 0);
    /// without them the table is read whole every `PERIOD`.
    events_on: bool,
}

impl Mirror {
    fn open(id: &str) -> Result<Mirror> {
        let st =
            RouterState::load(id)?.with_context(|| format!("router {id} has no state here"))?;
        let ident = netns::inode(&st.namespace)
            .with_context(|| format!("cannot find network namespace {}", st.namespace))?;
        let (events, reader, events_on) = netns::run_in(&st.namespace, || {
            let on = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events")
                .map(|v| v.trim() != "0")
                .unwrap_or(false);
            Ok((Conntrack::open(Conntrack::EVENTS)?, Conntrack::open(0)?, on))
        })?;
        if !events_on {
            tracing::info!(router = %id, namespace = %st.namespace, "conntrack events are off in the namespace: its table is read whole every {PERIOD:?}");
        }
        Ok(Mirror {
            namespace: st.namespace,
            ident,
            events,
            reader,
            flows: HashMap::new(),
            read_at: None,
            events_on,
        })
    }

    /// Brings the table up to date: the entries events named since the last call, asked of
    /// the kernel, or a whole read when one is due or events were lost.
    fn update(&mut self) -> Result<()> {
        match self.events.events() {
            Ok(evs) if self.read_at.is_some() => {
                for t in self.to_ask(&evs) {
                    match self.reader.get(&t, false)? {
                        Some(f) if replicated(&f) => {
                            self.flows.insert(t, f);
                        }
                        _ => {
                            self.flows.remove(&t);
                        }
                    }
                }
            }
            // A whole read is due anyway: what events said is older than it.
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(namespace = %self.namespace, error = %e, "conntrack events lost; reading the table whole");
                self.read_at = None;
            }
        }
        let due = !self.events_on || self.read_at.is_none_or(|t| t.elapsed() >= FULL_EVERY);
        if due && !(cfg!(mutant = "replica_table_frozen") && self.read_at.is_some()) {
            // Events queued before the read are older than what it returns.
            let _ = self.events.events();
            self.flows = self
                .reader
                .dump()?
                .into_iter()
                .filter(replicated)
                .map(|f| (f.orig, f))
                .collect();
            self.read_at = Some(Instant::now());
        }
        Ok(())
    }

    /// The original tuples to ask the kernel about after `evs` (see `to_ask`).
    fn to_ask(&self, evs: &[conntrack::Event]) -> std::collections::BTreeSet<Tuple> {
        if cfg!(mutant = "replica_table_frozen") {
            return Default::default();
        }
        to_ask(|t| self.flows.contains_key(t), evs)
    }
}

/// The original tuples to ask the kernel about after events `evs`: those `held` (they may have
/// changed or gone), and those an event showed in a replicated state — except a connection
/// that opened and ended between two reads: not held, the events of one entry only, the last
/// of them gone or closing. An entry never comes back from there, and another entry with the
/// same tuples (a client reusing its port) tells of itself with another id, whatever order
/// the two entries' events come in.
fn to_ask(
    held: impl Fn(&Tuple) -> bool,
    evs: &[conntrack::Event],
) -> std::collections::BTreeSet<Tuple> {
    struct Seen {
        /// The id all its events carried; None once two differ (or one had none).
        id: Option<u32>,
        live: bool,
        ended: bool,
    }
    let mut seen: HashMap<Tuple, Seen> = HashMap::new();
    for e in evs {
        let live = !e.gone && replicated(&e.flow);
        let s = seen.entry(e.flow.orig).or_insert(Seen {
            id: e.id,
            live: false,
            ended: false,
        });
        if s.id != e.id || cfg!(mutant = "replica_skip_ignores_ids") {
            s.id = if cfg!(mutant = "replica_skip_ignores_ids") {
                s.id.or(e.id)
            } else {
                None
            };
        }
        s.live |= live;
        s.ended = !live;
    }
    seen.into_iter()
        .filter(|(t, s)| held(t) || (s.live && !(s.id.is_some() && s.ended)))
        .map(|(t, _)| t)
        .collect()
}

/// The mirrors of the routers whose tables are sent.
#[derive(Default)]
struct Mirrors(BTreeMap<String, Mirror>);

impl Mirrors {
    /// Router `id`'s entries now, or None (cannot be read: logged).
    fn table(&mut self, id: &str) -> Option<Vec<Flow>> {
        if let Some(m) = self.0.get(id) {
            if netns::inode(&m.namespace) != Some(m.ident) {
                self.0.remove(id);
            }
        }
        if !self.0.contains_key(id) {
            match Mirror::open(id) {
                Ok(m) => {
                    self.0.insert(id.to_string(), m);
                }
                Err(e) => {
                    tracing::warn!(router = %id, error = format!("{e:#}"), "cannot read the router's connections");
                    return None;
                }
            }
        }
        let m = self.0.get_mut(id)?;
        if let Err(e) = m.update() {
            tracing::warn!(router = %id, error = format!("{e:#}"), "cannot read the router's connections");
            self.0.remove(id);
            return None;
        }
        Some(m.flows.values().cloned().collect())
    }

    /// Closes the mirrors of routers no longer sent.
    fn keep(&mut self, ids: &std::collections::BTreeSet<&String>) {
        self.0.retain(|id, _| ids.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// Only what may be replicated now is asked of the kernel: a connection that opened and
    /// ended between two reads is not, unless another entry with its tuples told of itself.
    #[test]
    fn connections_over_between_two_reads_are_not_looked_up_unless_tuples_were_reused() {
        let t = |sport: u16| conntrack::Tuple {
            src: std::net::Ipv4Addr::new(10, 0, 0, 5),
            dst: std::net::Ipv4Addr::new(203, 0, 113, 5),
            proto: conntrack::IPPROTO_TCP,
            sport,
            dport: 80,
        };
        let ev = |sport: u16, id: u32, state: u8, gone: bool| conntrack::Event {
            flow: Flow {
                orig: t(sport),
                reply: t(sport),
                status: conntrack::status::CONFIRMED,
                timeout: Some(100),
                tcp_state: Some(state),
                mark: 0,
            },
            id: Some(id),
            gone,
        };
        let (syn_sent, established, close) = (1u8, 3u8, 8u8);
        let evs = [
            // Opened and reset before the read: not asked.
            ev(1, 10, syn_sent, false),
            ev(1, 10, established, false),
            ev(1, 10, close, false),
            // Still open: asked.
            ev(2, 20, syn_sent, false),
            // A new connection on a reused tuple, whose old entry's close is told after it:
            // asked.
            ev(3, 31, syn_sent, false),
            ev(3, 30, close, false),
            // Held, and ended: asked (it goes).
            ev(4, 40, close, true),
            // Not held, ended: not asked.
            ev(5, 50, close, true),
        ];
        let asked = to_ask(|x| *x == t(4), &evs);
        assert_eq!(
            asked.into_iter().map(|x| x.sport).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    /// The handshake admits a client holding the key, and frames pass; a client with another
    /// key is refused, and a changed or replayed frame is rejected.
    #[test]
    fn only_holders_of_the_key_get_through_and_frames_cannot_be_changed_or_replayed() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8u8; 32]);
        let (l, a) = pair();
        let k2 = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let (host, mut sess) = accept(&mut s, &k2).unwrap();
            let first = sess.read(&mut s).unwrap();
            // The second frame was tampered with.
            let second = sess.read(&mut s);
            (host, first, second.is_err())
        });
        let (mut c, mut sess) = connect(a, &key, "host-a").unwrap();
        sess.write(&mut c, b"one").unwrap();
        // A frame whose payload byte changed on the way.
        let mut frame = Vec::new();
        sess.write(&mut frame, b"two").unwrap();
        frame[12] ^= 1;
        c.write_all(&frame).unwrap();
        let (host, first, rejected) = server.join().unwrap();
        assert_eq!(
            (host.as_str(), &first[..], rejected),
            ("host-a", &b"one"[..], true)
        );

        let (l, a) = pair();
        let k3 = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, &k3).is_err()
        });
        assert!(
            connect(a, &other, "intruder").is_err(),
            "a client without the key"
        );
        assert!(server.join().unwrap(), "the server refused it");

        // A replayed frame (the same sequence number twice).
        let (l, a) = pair();
        let k4 = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let (_, mut sess) = accept(&mut s, &k4).unwrap();
            let one = sess.read(&mut s).is_ok();
            (one, sess.read(&mut s).is_err())
        });
        let (mut c, mut sess) = connect(a, &key, "host-a").unwrap();
        let mut frame = Vec::new();
        sess.write(&mut frame, b"once").unwrap();
        c.write_all(&frame).unwrap();
        c.write_all(&frame).unwrap();
        assert_eq!(server.join().unwrap(), (true, true));
    }

    #[test]
    fn batches_are_cut_into_frames() {
        let t = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: 6,
            sport: 1,
            dport: 2,
        };
        let b = Batch {
            router: "r".into(),
            put: vec![],
            gone: vec![t; ENTRIES_PER_FRAME + 1],
        };
        let c = chunks(b);
        assert_eq!(
            c.iter().map(|b| b.gone.len()).collect::<Vec<_>>(),
            vec![ENTRIES_PER_FRAME, 1]
        );
    }
}

//! The agent's etcd side (`router-ctl run --etcd URL --host NAME`): the host lease and its
//! renewals, the watch on the whole prefix (resumed from the last revision; a full read when
//! etcd compacted past it), the elections (scheduler, each HA router's active host) and the
//! write-back of what was applied. It hands the wanted state to the applier thread and never
//! touches the kernel itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    applier::{self, Report, Shared, Want},
    fence, legacy, schedule, AgentInfo, Elections, Held, Key, Role, Schedule, Status, PREFIX,
};
use crate::{config::Router, state};

#[derive(Clone, Debug)]
pub struct Options {
    pub access: super::access::Access,
    /// What this host takes on at most.
    pub limits: applier::Limits,
    pub host: String,
    pub ttl: Duration,
    pub down_time: Duration,
    /// Connection state for HA routers (`--sync-listen`, `--sync-key`).
    pub sync: Option<super::replica::Config>,
}

/// How the agent stops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Release every role (addresses first, then the lease): a sub-second switchover.
    Resign = 1,
    /// Keep the lease and the roles (a new build takes over at once, within the lease).
    Keep = 2,
}

pub struct Agent {
    stop: Arc<AtomicU8>,
    /// Ends the connection-state threads.
    sync_stop: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    etcd: JoinHandle<()>,
    applier: JoinHandle<()>,
}

impl Agent {
    pub fn stop(self, how: Stop) {
        self.stop.store(how as u8, Ordering::SeqCst);
        self.sync_stop.store(true, Ordering::SeqCst);
        let _ = self.etcd.join();
        self.shared.stop();
        let _ = self.applier.join();
    }
}

pub fn start(opts: Options) -> Result<Agent> {
    std::fs::create_dir_all(state::run_dir())?;
    fence::ensure_fencer()?;
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let s = shared.clone();
    let limits = opts.limits;
    let applier = std::thread::Builder::new()
        .name("agent-apply".into())
        .spawn(move || applier::run(s, limits, move |r| drop(tx.send(r))))?;
    let sync_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(cfg) = &opts.sync {
        super::replica::serve(cfg.clone(), shared.clone(), sync_stop.clone())?;
        let counters = cfg.counters.clone();
        let (key, host, s, st) = (
            cfg.key.clone(),
            opts.host.clone(),
            shared.clone(),
            sync_stop.clone(),
        );
        std::thread::Builder::new()
            .name("sync-out".into())
            .spawn(move || super::replica::send_loop(key, host, s, st, counters))?;
    }
    let stop = Arc::new(AtomicU8::new(0));
    let (st, sh) = (stop.clone(), shared.clone());
    let etcd = std::thread::Builder::new()
        .name("agent-etcd".into())
        .spawn(move || {
            // Renewing the lease must not wait for the CPU behind bulk work (applies, the
            // neighbour watchers of many routers): this thread runs ahead of them (root may
            // raise its priority; if not, it stays as it was).
            // SAFETY: setpriority on this thread's own id.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(agent(opts, sh, rx, st));
        })?;
    Ok(Agent {
        stop,
        sync_stop,
        shared,
        etcd,
        applier,
    })
}

/// What the agent knows of etcd's prefix.
#[derive(Default)]
struct Cache {
    rev: i64,
    routers: BTreeMap<String, Def>,
    schedule: BTreeMap<String, Schedule>,
    /// Hosts alive by their `alive` key, and by an older build's `agents/` key.
    alive: BTreeSet<String>,
    /// Where hosts receive connection state (their `alive` key's `sync`).
    sync: BTreeMap<String, std::net::SocketAddr>,
    legacy_alive: BTreeSet<String>,
    elections: Elections,
}

/// A router's definition as etcd holds it.
struct Def {
    text: String,
    rev: i64,
    /// The text validates here.
    valid: bool,
    /// The last definition that validated, and its revision: what stays applied when a newer
    /// one does not (written by hand, or by a newer CLI with fields this agent does not know).
    good: Option<(Router, i64)>,
}

impl Cache {
    fn put(&mut self, key: &str, value: &str, rev: i64, created: i64, lease: i64) {
        let Some(k) = Key::parse(key) else {
            return;
        };
        if self.elections.put(k, value, Held { created, lease }) {
            return;
        }
        match k {
            Key::Router(id) => {
                let parsed = crate::config::parse(value)
                    .ok()
                    .and_then(|v| v.into_iter().next())
                    .filter(|r| r.id == id);
                let valid = parsed.is_some();
                let good = match parsed {
                    Some(r) => Some((r, rev)),
                    None => self.routers.get(id).and_then(|d| d.good.clone()),
                };
                self.routers.insert(
                    id.into(),
                    Def {
                        text: value.into(),
                        rev,
                        valid,
                        good,
                    },
                );
            }
            Key::Schedule(id) => {
                if let Ok(s) = serde_json::from_str(value) {
                    self.schedule.insert(id.into(), s);
                }
            }
            Key::Alive(h) => {
                self.alive.insert(h.into());
                // Only the host's own address: a value naming another host is ignored.
                match serde_json::from_str::<super::AgentInfo>(value) {
                    Ok(AgentInfo {
                        host,
                        sync: Some(a),
                        ..
                    }) if host == h => {
                        self.sync.insert(h.into(), a);
                    }
                    _ => drop(self.sync.remove(h)),
                }
            }
            Key::LegacyAgent(h) => drop(self.legacy_alive.insert(h.into())),
            _ => {}
        }
    }
    fn delete(&mut self, key: &str) {
        let Some(k) = Key::parse(key) else {
            return;
        };
        if self.elections.delete(k) {
            return;
        }
        match k {
            Key::Router(id) => drop(self.routers.remove(id)),
            Key::Schedule(id) => drop(self.schedule.remove(id)),
            Key::Alive(h) => {
                self.alive.remove(h);
                self.sync.remove(h);
            }
            Key::LegacyAgent(h) => drop(self.legacy_alive.remove(h)),
            _ => {}
        }
    }
    /// The hosts alive.
    fn agents(&self) -> BTreeSet<String> {
        self.alive.union(&self.legacy_alive).cloned().collect()
    }
    /// HA router `id`'s active host and what holds the role.
    fn active(&self, id: &str) -> Option<(&str, Held)> {
        let hosts = self.schedule.get(id).map(|s| &s.hosts[..]).unwrap_or(&[]);
        self.elections.active(id, hosts)
    }
    fn scheduled_here<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.routers.keys().filter(move |id| {
            self.schedule
                .get(*id)
                .is_some_and(|s| s.hosts.iter().any(|h| h == host))
        })
    }
}

/// The agent's own memory across sessions (reconnections).
struct Agent0 {
    o: Options,
    cache: Cache,
    lease: Option<i64>,
    ready: BTreeMap<String, bool>,
    statuses: BTreeMap<String, Status>,
    /// Definitions that do not validate, reported once per revision: (revision, why).
    bad: BTreeMap<String, (i64, String)>,
    down_since: BTreeMap<String, Instant>,
    last_pass: Option<Instant>,
    fencing: Arc<Fencing>,
    /// This host's credentials may stand for the scheduler (false once etcd said no).
    may_schedule: bool,
    /// Since when no fencer acknowledges the deadline (see `campaign`).
    fencer_silent: Option<Instant>,
    /// This host's credentials may write the keys of the layout before host prefixes (false
    /// once etcd said no: then no agent of an older build runs against this etcd).
    legacy_writes: bool,
}

/// etcd refused a request for the credentials' role.
fn denied(e: &anyhow::Error) -> bool {
    e.downcast_ref::<etcd_client::Error>()
        .is_some_and(|e| e.to_string().contains("permission denied"))
}

/// What the fencer is told, shared by the session and its renewal task: the send time of the
/// last renewal answered, and the HA routers held.
struct Fencing {
    /// The fence file (`fence::path()`).
    path: std::path::PathBuf,
    ttl: Duration,
    renewed: std::sync::atomic::AtomicU64,
    state: std::sync::Mutex<(Vec<String>, Option<(u64, Vec<String>)>)>,
}

impl Fencing {
    /// Whether a live fencer acknowledges the deadline last written (`fence::acknowledges`).
    fn acknowledged(&self) -> bool {
        let written = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .as_ref()
            .map(|w| w.0);
        written.is_some_and(|d| fence::acknowledges(fence::acked(), d, fence::monotonic_ns()))
    }
    fn set_routers(&self, routers: Vec<String>) -> Result<()> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = routers;
        self.write()
    }
    fn renewed(&self, sent: u64) -> Result<()> {
        self.renewed.store(sent, Ordering::SeqCst);
        self.write()
    }
    /// Writes the fence file when what it says changed. A write that fails (a full `/run`)
    /// leaves the fencer an older deadline: the caller must then stop renewing, so that the
    /// lease expires when the fencer acts and another host takes the routers.
    fn write(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = fence::deadline(self.renewed.load(Ordering::SeqCst), self.ttl);
        let routers = st.0.clone();
        if st.1.as_ref() == Some(&(deadline, routers.clone())) {
            return Ok(());
        }
        let written = fence::write_to(
            &self.path,
            &fence::Fence {
                deadline_ns: deadline,
                routers: routers.clone(),
            },
        );
        if !cfg!(mutant = "fence_write_ignored") {
            written?;
        }
        st.1 = Some((deadline, routers));
        Ok(())
    }
}

/// The renewals of a session's lease, on a thread of their own with their own runtime and
/// their own connection to etcd: nothing the session does (a full read after a compaction,
/// parsing many definitions, a slow write) can hold a renewal up. Stopped with the session;
/// `done` says why they ended.
struct Renewals {
    done: tokio::sync::oneshot::Receiver<Result<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Renewals {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Renewals {
    fn start(
        access: super::access::Access,
        lease: i64,
        period: Duration,
        fencing: Arc<Fencing>,
    ) -> Result<Renewals> {
        let (tx, done) = tokio::sync::oneshot::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let work = async move {
            let mut c = access
                .connect(
                    ConnectOptions::new()
                        .with_connect_timeout(Duration::from_millis(500))
                        .with_keep_alive(Duration::from_millis(500), Duration::from_millis(500)),
                    Duration::from_secs(1),
                )
                .await?;
            let (keeper, renewals) = timed(c.lease_keep_alive(lease)).await?;
            renew(keeper, renewals, period, fencing, &halt).await
        };
        if cfg!(mutant = "renewals_share_the_session_thread") {
            // The fault: the renewals wait for whatever holds the session's thread.
            tokio::spawn(async move {
                let _ = tx.send(work.await);
            });
            return Ok(Renewals { done, stop });
        }
        std::thread::Builder::new()
            .name("agent-renew".into())
            .spawn(move || {
                // Ahead of bulk work, as the session's thread is (when root may say so).
                // SAFETY: setpriority on this thread's own id.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10);
                }
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(work));
                let _ = tx.send(r);
            })?;
        Ok(Renewals { done, stop })
    }
}

/// Renews the lease every `period`, on a task of its own so that nothing the session waits
/// for (a slow write under load) delays a renewal; each answer moves the fencing deadline.
async fn renew(
    mut keeper: etcd_client::LeaseKeeper,
    mut renewals: etcd_client::LeaseKeepAliveStream,
    period: Duration,
    fencing: Arc<Fencing>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let sent = fence::monotonic_ns();
        timed(keeper.keep_alive()).await?;
        let m = tokio::time::timeout(Duration::from_secs(2), renewals.message())
            .await
            .map_err(|_| anyhow!("etcd answered no lease renewal within 2 s"))??
            .ok_or_else(|| anyhow!("etcd closed the lease renewals"))?;
        if m.ttl() <= 0 {
            bail!(LeaseExpired);
        }
        fencing.renewed(sent).context(
            "the fence file cannot be written: renewals stop, so that the lease expires when this host's fencer acts and another host takes the routers",
        )?;
    }
}

/// Tests only (`ROUTER_XDP_TEST_SESSION_STALL_MS`): the session's thread blocks that long when
/// the key `test/stall` changes, as a full read or a large parse would hold it; the lease must
/// be renewed all the same.
fn stall_for_tests(m: &etcd_client::WatchResponse) {
    let Some(ms) = std::env::var("ROUTER_XDP_TEST_SESSION_STALL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let key = super::key("test/stall");
    if m.events()
        .iter()
        .any(|e| e.kv().is_some_and(|kv| kv.key() == key.as_bytes()))
    {
        tracing::warn!(ms, "test: the session stalls");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

#[derive(Debug)]
struct LeaseExpired;

impl std::fmt::Display for LeaseExpired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the host's lease expired")
    }
}

impl std::error::Error for LeaseExpired {}

fn lease_file() -> std::path::PathBuf {
    state::run_dir().join("agent-lease")
}

async fn agent(
    o: Options,
    shared: Arc<Shared>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    stop: Arc<AtomicU8>,
) {
    let lease = std::fs::read_to_string(lease_file()).ok().and_then(|s| {
        let (h, l) = s.trim().split_once(' ')?;
        (h == o.host).then(|| l.parse().ok()).flatten()
    });
    let o_ttl = o.ttl;
    let mut a = Agent0 {
        o,
        cache: Cache::default(),
        lease,
        ready: BTreeMap::new(),
        statuses: BTreeMap::new(),
        bad: BTreeMap::new(),
        down_since: BTreeMap::new(),
        last_pass: None,
        may_schedule: true,
        fencer_silent: None,
        legacy_writes: true,
        fencing: Arc::new(Fencing {
            path: fence::path(),
            ttl: o_ttl,
            renewed: std::sync::atomic::AtomicU64::new(0),
            state: Default::default(),
        }),
    };
    let mut backoff = Duration::from_millis(100);
    // The same failure again and again (etcd away, credentials refused) is logged once, then
    // once every 30 s with how many times it happened.
    let mut last: Option<(String, Instant, u64)> = None;
    loop {
        let r = a.session(&shared, &mut reports, &stop).await;
        let how = stop.load(Ordering::SeqCst);
        if how != 0 {
            a.leave(&shared, how == Stop::Resign as u8).await;
            return;
        }
        if let Err(e) = r {
            let (kind, e) = match e.downcast_ref::<etcd_client::Error>() {
                Some(etcd) => (
                    a.o.access.hint(etcd),
                    format!("{:#}", a.o.access.explain(etcd)),
                ),
                None => (format!("{e:#}"), format!("{e:#}")),
            };
            match &mut last {
                Some((k, since, n)) if *k == kind && since.elapsed() < Duration::from_secs(30) => {
                    *n += 1;
                }
                _ => {
                    let again = last.as_ref().map_or(0, |l| l.2);
                    tracing::warn!(
                        error = %e,
                        repeated = again,
                        "etcd session ended; reconnecting (what is applied keeps forwarding)"
                    );
                    last = Some((kind, Instant::now(), 0));
                }
            }
        } else {
            last = None;
        }
        let t = Instant::now();
        while t.elapsed() < backoff && stop.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Short: etcd restarting must not outlast the fencing deadline because of us.
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

enum Ev {
    Tick,
    Renewed(Result<Result<()>, tokio::sync::oneshot::error::RecvError>),
    Watch(Result<Option<etcd_client::WatchResponse>, etcd_client::Error>),
    Report(Option<Report>),
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(Duration::from_secs(2), f).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("etcd did not answer within 2 s"),
    }
}

impl Agent0 {
    async fn connect(&self) -> Result<Client> {
        self.o
            .access
            .connect(
                ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500))
                    .with_keep_alive(Duration::from_millis(500), Duration::from_millis(500)),
                Duration::from_secs(2),
            )
            .await
    }

    /// The routers this host runs now, and the HA routers it leads.
    fn want(&mut self) -> (Want, Vec<(String, Status)>) {
        let host = self.o.host.clone();
        let mut want = Want {
            synced: true,
            ..Default::default()
        };
        let mut errors = Vec::new();
        let ids: Vec<String> = self.cache.scheduled_here(&host).cloned().collect();
        for id in ids {
            let d = &self.cache.routers[&id];
            if let Some((r, rev)) = &d.good {
                want.routers.insert(id.clone(), (r.clone(), *rev));
            }
            if !d.valid && self.bad.get(&id).map(|b| b.0) != Some(d.rev) {
                let e = crate::config::parse(&d.text)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| format!("the definition's id is not {id}"));
                let e = match &d.good {
                    Some((_, g)) => format!(
                        "revision {} not applied ({e}); revision {g} stays applied",
                        d.rev
                    ),
                    None => format!("revision {} not applied ({e})", d.rev),
                };
                self.bad.insert(id.clone(), (d.rev, e.clone()));
                let generation = d.good.as_ref().map(|g| g.1).unwrap_or(0);
                let role = match self.statuses.get(&id) {
                    Some(s) if d.good.is_some() => s.role.clone(),
                    _ => Role::Error,
                };
                errors.push((
                    id.clone(),
                    Status {
                        generation,
                        role,
                        error: Some(e),
                        updated_ms: super::now_ms(),
                    },
                ));
            }
        }
        want.active = self.mine();
        for id in &want.active {
            let Some(s) = self.cache.schedule.get(id) else {
                continue;
            };
            let peers: Vec<std::net::SocketAddr> = s
                .hosts
                .iter()
                .filter(|h| **h != host)
                .filter_map(|h| self.cache.sync.get(h).copied())
                .collect();
            if !peers.is_empty() {
                want.peers.insert(id.clone(), peers);
            }
        }
        (want, errors)
    }

    /// The HA routers whose election this host's lease holds.
    fn mine(&self) -> BTreeSet<String> {
        let host = self.o.host.as_str();
        self.cache
            .routers
            .keys()
            .cloned()
            .chain(self.cache.elections.candidacies_of(host))
            .filter(|id| {
                self.cache
                    .active(id)
                    .is_some_and(|(h, held)| h == host && Some(held.lease) == self.lease)
            })
            .collect()
    }

    /// What a write made in HA router `id`'s active role compares first: the key that gives
    /// this host the role, as it was when the role was seen.
    fn active_guard(&self, id: &str) -> Option<Compare> {
        let host = self.o.host.as_str();
        let (h, held) = self.cache.active(id)?;
        if h != host {
            return None;
        }
        Some(if self.cache.elections.legacy_active(id) == Some(host) {
            Compare::value(legacy::active_key(id), CompareOp::Equal, host)
        } else {
            Compare::create_revision(
                super::candidate_key(host, id),
                CompareOp::Equal,
                held.created,
            )
        })
    }

    /// The same for the scheduler's role.
    fn scheduler_guard(&self) -> Option<Compare> {
        let host = self.o.host.as_str();
        let (h, held) = self.cache.elections.scheduler()?;
        if h != host {
            return None;
        }
        Some(if self.cache.elections.legacy_scheduler() == Some(host) {
            Compare::value(legacy::scheduler_key(), CompareOp::Equal, host)
        } else {
            Compare::create_revision(
                super::scheduler_candidate_key(host),
                CompareOp::Equal,
                held.created,
            )
        })
    }

    /// Tells the fencer the deadline of the last renewal answered and the routers held.
    fn write_fence(&mut self) -> Result<()> {
        // Until etcd was read, the routers the last fence named stay named.
        let routers: Vec<String> = if self.cache.rev == 0 {
            fence::read().map(|f| f.routers).unwrap_or_default()
        } else {
            self.mine().into_iter().collect()
        };
        self.fencing.set_routers(routers)
    }

    /// A watch response's events into the cache.
    fn absorb(&mut self, m: &etcd_client::WatchResponse) {
        for e in m.events() {
            let Some(kv) = e.kv() else { continue };
            let key = kv.key_str().unwrap_or("");
            match e.event_type() {
                EventType::Put => self.cache.put(
                    key,
                    kv.value_str().unwrap_or(""),
                    kv.mod_revision(),
                    kv.create_revision(),
                    kv.lease(),
                ),
                EventType::Delete => self.cache.delete(key),
            }
            self.cache.rev = self.cache.rev.max(kv.mod_revision());
        }
    }

    async fn full_read(&mut self, c: &mut Client) -> Result<()> {
        let r = timed(c.get(PREFIX, Some(GetOptions::new().with_prefix()))).await?;
        let mut cache = Cache {
            rev: r.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        for kv in r.kvs() {
            cache.put(
                kv.key_str().unwrap_or(""),
                kv.value_str().unwrap_or(""),
                kv.mod_revision(),
                kv.create_revision(),
                kv.lease(),
            );
        }
        tracing::info!(
            revision = cache.rev,
            routers = cache.routers.len(),
            "read the desired state from etcd"
        );
        self.cache = cache;
        Ok(())
    }

    async fn put_status(&mut self, c: &mut Client, id: &str, s: &Status) -> Result<()> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        let key = super::status_key(id, &self.o.host);
        let val = serde_json::to_string(s)?;
        let put = TxnOp::put(key, val, Some(PutOptions::new().with_lease(lease)));
        // The active role is recorded only while this host holds the election.
        let txn = if s.role == Role::Active {
            let Some(guard) = self.active_guard(id) else {
                return Ok(());
            };
            Txn::new().when(vec![guard]).and_then(vec![put])
        } else {
            Txn::new().and_then(vec![put])
        };
        timed(c.txn(txn)).await?;
        Ok(())
    }

    /// Creates `key`, bound to `lease`, unless it exists: the revision that created it, or
    /// None when it existed.
    async fn stand(&self, c: &mut Client, key: String, lease: i64) -> Result<Option<i64>> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key,
                self.o.host.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = timed(c.txn(txn)).await?;
        Ok(r.succeeded()
            .then(|| r.header().map(|h| h.revision()))
            .flatten())
    }

    /// Elections: this host stands for the scheduler, and for each HA router scheduled here
    /// whose devices are ready; it withdraws from routers no longer scheduled here, no longer
    /// HA, or not ready. True when the routers it leads changed.
    async fn campaign(&mut self, c: &mut Client) -> Result<bool> {
        let Some(lease) = self.lease else {
            return Ok(false);
        };
        let host = self.o.host.clone();
        let before = self.mine();
        if self.may_schedule && self.cache.elections.scheduler_candidacy(&host).is_none() {
            match self
                .stand(c, super::scheduler_candidate_key(&host), lease)
                .await
            {
                Ok(Some(created)) => {
                    self.cache.elections.put(
                        Key::SchedulerCandidate(&host),
                        &host,
                        Held { created, lease },
                    );
                }
                Ok(None) => {}
                Err(e) if denied(&e) => {
                    self.may_schedule = false;
                    tracing::info!("this host's etcd role may not schedule (no write to scheduler/ and schedule/): hosts whose role may, schedule");
                }
                Err(e) => return Err(e),
            }
        }
        // A host stands for an HA role only while a live fencer acknowledges its deadline (else
        // nothing would fence it if its lease lapsed), and withdraws the candidacies of routers
        // it does not lead while none does, so that it cannot come to lead them (after a
        // second its supervisor replaces the fencer). The routers it leads stay: withdrawing
        // would move them for a fencer's hiccup, and the lease is still renewed.
        let fenced = self.fencing.acknowledged() || cfg!(mutant = "elections_without_fencer");
        if fenced {
            if self.fencer_silent.take().is_some() {
                tracing::info!("the fencer acknowledges the deadline again: standing for HA roles");
            }
        } else if self.fencer_silent.is_none() {
            self.fencer_silent = Some(Instant::now());
        }
        let ha = |id: &String| self.cache.routers[id].good.as_ref().is_some_and(|r| r.0.ha);
        let here: BTreeSet<String> = self
            .cache
            .scheduled_here(&host)
            .filter(|id| ha(id))
            .cloned()
            .collect();
        for id in &here {
            if fenced
                && self.ready.get(id) == Some(&true)
                && self.cache.elections.candidacy(&host, id).is_none()
            {
                if let Some(created) = self
                    .stand(c, super::candidate_key(&host, id), lease)
                    .await?
                {
                    self.cache.elections.put(
                        Key::Candidate { host: &host, id },
                        &host,
                        Held { created, lease },
                    );
                }
            }
        }
        // Candidacies for routers no longer scheduled here (or no longer HA), and for routers
        // whose devices are not ready here, go.
        for id in self.cache.elections.candidacies_of(&host) {
            let unfenced = !fenced && !before.contains(&id);
            if unfenced {
                tracing::warn!(router = %id, "no fencer acknowledges the deadline: withdrawing from the router's election");
            }
            // A standby whose devices are not ready steps out of line; a router this host
            // leads is resigned by the applier instead (`Report::Resigned`), which takes the
            // addresses off first, so that two hosts never hold them at once.
            let unready = self.ready.get(&id) == Some(&false) && !before.contains(&id);
            if unfenced || unready || !here.contains(&id) {
                self.resign(c, &id).await?;
            }
        }
        self.mirror(c, lease).await?;
        let after = self.mine();
        for id in after.difference(&before) {
            tracing::info!(router = %id, "leads the router: becoming active");
        }
        Ok(after != before)
    }

    /// While agents of the build before host prefixes may run (the credentials allow the old
    /// keys), the roles this host holds are written into the old keys too, so that those agents
    /// see them and stand aside.
    async fn mirror(&mut self, c: &mut Client, lease: i64) -> Result<()> {
        if !self.legacy_writes || cfg!(mutant = "no_legacy_mirror") {
            return Ok(());
        }
        let host = self.o.host.clone();
        let mut keys: Vec<String> = self
            .mine()
            .iter()
            .filter(|id| self.cache.elections.legacy_active(id).is_none())
            .map(|id| legacy::active_key(id))
            .collect();
        if self
            .cache
            .elections
            .scheduler()
            .is_some_and(|s| s.0 == host)
            && self.cache.elections.legacy_scheduler().is_none()
        {
            keys.push(legacy::scheduler_key());
        }
        for key in keys {
            match self.stand(c, key.clone(), lease).await {
                Ok(Some(created)) => {
                    if let Some(k) = Key::parse(&key) {
                        self.cache.elections.put(k, &host, Held { created, lease });
                    }
                }
                Ok(None) => {}
                Err(e) if denied(&e) => {
                    self.legacy_writes = false;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Withdraws this host's candidacy for HA router `id` (and the old key naming it).
    async fn resign(&mut self, c: &mut Client, id: &str) -> Result<()> {
        let host = self.o.host.clone();
        let key = super::candidate_key(&host, id);
        timed(c.delete(key.clone(), None)).await?;
        if self.cache.elections.legacy_active(id) == Some(host.as_str()) {
            let old = legacy::active_key(id);
            let txn = Txn::new()
                .when(vec![Compare::value(
                    old.clone(),
                    CompareOp::Equal,
                    host.clone(),
                )])
                .and_then(vec![TxnOp::delete(old.clone(), None)]);
            timed(c.txn(txn)).await?;
            self.cache.elections.delete(Key::LegacyActive(id));
        }
        self.cache
            .elections
            .delete(Key::Candidate { host: &host, id });
        Ok(())
    }

    /// The scheduler's pass, when this host runs it.
    async fn schedule(&mut self, c: &mut Client, force: bool) -> Result<()> {
        let Some(guard) = self.scheduler_guard() else {
            self.down_since.clear();
            return Ok(());
        };
        let now = Instant::now();
        if !force
            && self
                .last_pass
                .is_some_and(|t| now - t < Duration::from_secs(1))
        {
            return Ok(());
        }
        self.last_pass = Some(now);
        let scheduled: BTreeSet<String> = self
            .cache
            .schedule
            .values()
            .flat_map(|s| s.hosts.iter().cloned())
            .collect();
        let agents = self.cache.agents();
        self.down_since.retain(|h, _| !agents.contains(h));
        for h in scheduled.iter().filter(|h| !agents.contains(*h)) {
            self.down_since.entry(h.clone()).or_insert(now);
        }
        let expired: BTreeSet<String> = self
            .down_since
            .iter()
            .filter(|(_, t)| now - **t >= self.o.down_time)
            .map(|(h, _)| h.clone())
            .collect();
        let routers: BTreeMap<String, bool> = self
            .cache
            .routers
            .iter()
            .map(|(id, d)| (id.clone(), d.good.as_ref().is_some_and(|r| r.0.ha)))
            .collect();
        let plan = schedule::plan(&routers, &self.cache.schedule, &agents, &expired);
        let mut ops: Vec<TxnOp> = Vec::new();
        for (id, s) in &plan.put {
            tracing::info!(router = %id, hosts = ?s.hosts, "scheduled");
            ops.push(TxnOp::put(
                super::schedule_key(id),
                serde_json::to_string(s)?,
                None,
            ));
        }
        for id in &plan.delete {
            ops.push(TxnOp::delete(super::schedule_key(id), None));
        }
        // etcd takes at most 128 operations per transaction.
        for chunk in ops.chunks(100) {
            let txn = Txn::new()
                .when(vec![guard.clone()])
                .and_then(chunk.to_vec());
            if !timed(c.txn(txn)).await?.succeeded() {
                bail!("lost the scheduler's election while scheduling");
            }
        }
        // Known now, not only when the watch echoes it: the next pass plans from it.
        for (id, s) in plan.put {
            self.cache.schedule.insert(id, s);
        }
        for id in plan.delete {
            self.cache.schedule.remove(&id);
        }
        Ok(())
    }

    fn push(&mut self, shared: &Shared) -> Vec<(String, Status)> {
        let (want, errors) = self.want();
        // The fence file lists a router before the applier gives it its addresses: when it
        // cannot, the applier keeps what it has.
        if let Err(e) = self.write_fence() {
            tracing::error!(
                error = format!("{e:#}"),
                "cannot write the fence file; role changes wait"
            );
            return errors;
        }
        shared.set(want);
        errors
    }

    async fn session(
        &mut self,
        shared: &Shared,
        reports: &mut mpsc::UnboundedReceiver<Report>,
        stop: &AtomicU8,
    ) -> Result<()> {
        let mut c = self.connect().await?;
        // The lease: the one this host had, if it is still alive (a restart within the lease
        // keeps every role), or a new one.
        if let Some(l) = self.lease {
            let ttl = timed(c.lease_time_to_live(l, None)).await?.ttl();
            if ttl <= 0 {
                tracing::warn!(
                    lease = format!("{l:x}"),
                    "the host's lease expired: its roles are gone"
                );
                self.lease = None;
            } else {
                tracing::info!(lease = format!("{l:x}"), ttl, "kept the host's lease");
            }
        }
        if self.lease.is_none() {
            let secs = self.o.ttl.as_secs().max(1) as i64;
            let l = timed(c.lease_grant(secs, None)).await?.id();
            std::fs::write(lease_file(), format!("{} {l}", self.o.host))?;
            tracing::info!(lease = format!("{l:x}"), ttl = secs, "new host lease");
            self.lease = Some(l);
        }
        let lease = self.lease.expect("a lease");
        // A renewal whose deadline could not be written would keep the lease alive while the
        // fencer acts on an older deadline (a fenced router no standby takes over): a session
        // renews only where the fence file can be written (a full `/run` ends it here, and the
        // lease runs out).
        if !cfg!(mutant = "renewed_without_fence_room") {
            fence::writable().context(
                "the fence file cannot be written: the lease is not renewed, so that it expires when this host's fencer acts and another host takes the routers",
            )?;
        }
        // Renew at once: a restarted agent has little time left before its fencer acts.
        let (mut keeper, mut renewals) = timed(c.lease_keep_alive(lease)).await?;
        let sent = fence::monotonic_ns();
        timed(keeper.keep_alive()).await?;
        let first = tokio::time::timeout(Duration::from_secs(2), renewals.message())
            .await
            .map_err(|_| anyhow!("etcd did not renew the lease within 2 s"))??
            .ok_or_else(|| anyhow!("etcd closed the lease renewals"))?;
        if first.ttl() <= 0 {
            self.lease = None;
            bail!("the host's lease expired");
        }
        self.fencing
            .renewed(sent)
            .context("the fence file cannot be written")?;
        self.write_fence()
            .context("the fence file cannot be written")?;
        let period = (self.o.ttl / 8).max(Duration::from_millis(100));
        // The session's own keeper goes: the renewals' thread has its own.
        drop((keeper, renewals));
        let mut renewing =
            Renewals::start(self.o.access.clone(), lease, period, self.fencing.clone())?;
        let info = AgentInfo {
            host: self.o.host.clone(),
            pid: std::process::id(),
            started: super::now_ms() / 1000,
            sync: self.o.sync.as_ref().map(|s| s.listen),
        };
        let alive = serde_json::to_string(&info)?;
        timed(c.put(
            super::alive_key(&self.o.host),
            alive.clone(),
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        // Agents of the build before host prefixes see this host alive only in their key.
        if self.legacy_writes {
            let put = timed(c.put(
                legacy::agent_key(&self.o.host),
                alive,
                Some(PutOptions::new().with_lease(lease)),
            ))
            .await;
            match put {
                Err(e) if denied(&e) => self.legacy_writes = false,
                r => drop(r?),
            }
        }
        let hk = super::registered_key(&self.o.host);
        timed(
            c.txn(
                Txn::new()
                    .when(vec![Compare::create_revision(
                        hk.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(hk, serde_json::to_string(&info)?, None)]),
            ),
        )
        .await?;
        // The watch: resumed after the last revision seen, or from a full read. When etcd has
        // compacted past it, the watch is cancelled with the compaction revision (handled
        // below): the next session reads everything again.
        if self.cache.rev == 0 {
            self.full_read(&mut c).await?;
        }
        let (_watcher, mut watch) = timed(
            c.watch(
                PREFIX,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.cache.rev + 1),
                ),
            ),
        )
        .await?;
        tracing::info!(from = self.cache.rev + 1, "watching etcd");
        for (id, s) in self.push(shared) {
            self.put_status(&mut c, &id, &s).await?;
        }
        let statuses: Vec<(String, Status)> = self
            .statuses
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, s) in statuses {
            self.put_status(&mut c, &id, &s).await?;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fencer_checked = Instant::now();
        loop {
            let ev = tokio::select! {
                _ = tick.tick() => Ev::Tick,
                r = &mut renewing.done => Ev::Renewed(r),
                m = watch.message() => Ev::Watch(m),
                r = reports.recv() => Ev::Report(r),
            };
            let mut changed = false;
            match ev {
                Ev::Tick => {
                    if stop.load(Ordering::SeqCst) != 0 {
                        return Ok(());
                    }
                    // The fencer is supervised: one that died (killed, OOM) is started again
                    // within a second, while this host holds routers it must fence.
                    if fencer_checked.elapsed() >= Duration::from_secs(1)
                        && !cfg!(mutant = "fencer_unsupervised")
                    {
                        fencer_checked = Instant::now();
                        // One that runs but has not acknowledged for a second (stopped, stuck)
                        // is replaced.
                        if self
                            .fencer_silent
                            .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
                        {
                            fence::kill_fencer();
                            // The new one gets a second of its own to acknowledge.
                            self.fencer_silent = Some(Instant::now());
                        }
                        if let Err(e) = fence::ensure_fencer() {
                            tracing::error!(
                                error = format!("{e:#}"),
                                "cannot start the fencer again"
                            );
                        }
                    }
                }
                Ev::Renewed(r) => {
                    // The renewal task ended: the lease expired, or etcd stopped answering.
                    let e = match r {
                        Ok(Ok(())) => anyhow!("the lease renewals stopped"),
                        Ok(Err(e)) => e,
                        Err(e) => anyhow!("the lease renewal thread failed: {e}"),
                    };
                    if e.downcast_ref::<LeaseExpired>().is_some() {
                        self.lease = None;
                        let _ = std::fs::remove_file(lease_file());
                    }
                    return Err(e);
                }
                Ev::Watch(m) => {
                    let m = m?.ok_or_else(|| anyhow!("etcd closed the watch"))?;
                    stall_for_tests(&m);
                    if m.canceled() || m.compact_revision() > 0 {
                        if m.compact_revision() > 0 {
                            tracing::warn!(
                                revision = self.cache.rev,
                                compacted = m.compact_revision(),
                                "etcd compacted past the last revision seen: full resync"
                            );
                            self.cache.rev = 0;
                        }
                        bail!("etcd cancelled the watch: {}", m.cancel_reason());
                    }
                    self.absorb(&m);
                    changed = true;
                }
                Ev::Report(None) => bail!("the applier stopped"),
                Ev::Report(Some(r)) => match r {
                    Report::Status { id, mut status } => {
                        // A newer definition that does not validate stays reported.
                        if let Some((rev, why)) = self.bad.get(&id) {
                            if *rev > status.generation && status.error.is_none() {
                                status.error = Some(why.clone());
                            }
                        }
                        // Kept first: a put that fails (lease gone, etcd away) is made again by
                        // the next session.
                        self.statuses.insert(id.clone(), status.clone());
                        self.put_status(&mut c, &id, &status).await?;
                    }
                    Report::Ready { id, ready } => {
                        self.ready.insert(id, ready);
                    }
                    Report::Resigned { id } => {
                        self.ready.insert(id.clone(), false);
                        self.resign(&mut c, &id).await?;
                        if let Some(mut s) = self.statuses.get(&id).cloned() {
                            s.role = Role::Standby;
                            s.updated_ms = super::now_ms();
                            self.statuses.insert(id.clone(), s.clone());
                            self.put_status(&mut c, &id, &s).await?;
                        }
                        changed = true;
                    }
                    Report::Removed { id } => {
                        self.statuses.remove(&id);
                        self.ready.remove(&id);
                        timed(c.delete(super::status_key(&id, &self.o.host), None)).await?;
                    }
                },
            }
            if self.campaign(&mut c).await? {
                changed = true;
            }
            self.schedule(&mut c, changed).await?;
            if changed {
                for (id, s) in self.push(shared) {
                    self.put_status(&mut c, &id, &s).await?;
                }
            }
        }
    }

    /// Stopping: with `resign`, the addresses go first, then the lease (and with it every
    /// election this host held), so a standby takes over at once.
    async fn leave(&mut self, shared: &Shared, resign: bool) {
        if !resign {
            tracing::info!(
                "agent stops keeping its lease: a restart within the lease keeps every role"
            );
            return;
        }
        let mine = self.mine();
        // The applier must not give the addresses back while we leave.
        shared.set(Want::default());
        for id in &mine {
            apply_standby_now(id);
        }
        fence::stop();
        if let Some(l) = self.lease.take() {
            if let Ok(mut c) = self.connect().await {
                match timed(c.lease_revoke(l)).await {
                    Ok(_) => tracing::info!(routers = ?mine, "resigned: lease revoked"),
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        "cannot revoke the lease; it expires by itself"
                    ),
                }
            }
        }
        let _ = std::fs::remove_file(lease_file());
    }
}

/// Removes the addresses of an HA router this host leads, at once.
fn apply_standby_now(id: &str) {
    if let Ok(Some(st)) = state::RouterState::load(id) {
        if let Err(e) = super::hold::release(&st) {
            tracing::warn!(router = %id, error = format!("{e:#}"), "cannot remove the router's addresses");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fence file that cannot be written is an error for the renewal (which then stops, so
    /// that the lease expires with the deadline the fencer holds), and is written again, not
    /// skipped as unchanged, once it can be.
    #[test]
    fn a_fence_file_that_cannot_be_written_stops_the_renewals() {
        let dir = std::env::temp_dir().join(format!("router-fence-{}", std::process::id()));
        let f = Fencing {
            path: dir.join("fence.json"),
            ttl: Duration::from_secs(2),
            renewed: std::sync::atomic::AtomicU64::new(0),
            state: Default::default(),
        };
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            f.renewed(1_000).is_err(),
            "a renewal whose deadline was not written"
        );
        std::fs::create_dir_all(&dir).unwrap();
        f.renewed(1_000).unwrap();
        let written: fence::Fence =
            serde_json::from_slice(&std::fs::read(dir.join("fence.json")).unwrap()).unwrap();
        assert_eq!(
            written.deadline_ns,
            fence::deadline(1_000, Duration::from_secs(2))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

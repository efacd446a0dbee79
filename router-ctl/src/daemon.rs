//! `router-ctl run`: keeps every applied router's neighbour map in sync with the kernel's
//! neighbour table of its namespace (rtnetlink: a dump, then events).
//!
//! One watcher thread per router joins the router's namespace and opens its netlink socket
//! there; it sleeps until the kernel has news (no polling), and hands device changes to a
//! resync thread of its own. The daemon rescans the routers applied when their state changes
//! (checked every 200 ms, at once on SIGUSR1, which apply and the verbs send) and every second (a deleted namespace shows no
//! event), starts and stops watchers to match, and exits by itself when no router is left.
//! SIGTERM/SIGINT stop it; the fast path keeps forwarding with the neighbours it has.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{AsyncSocket as _, SocketAddr},
    IpVersion,
};

use crate::{
    datapath::Neighs,
    kernel::netns,
    state::{self, Lock, RouterState},
};

static TERM: AtomicBool = AtomicBool::new(false);
/// SIGHUP: the operator's reload (the definitions file again, and a rescan).
static HUP: AtomicBool = AtomicBool::new(false);
/// SIGUSR1: a rescan of the routers applied (what `apply` and the verbs ask for); never a
/// reload of the definitions file, which may be half edited.
static RESCAN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}
extern "C" fn on_hup(_: libc::c_int) {
    HUP.store(true, Ordering::SeqCst);
}
extern "C" fn on_rescan(_: libc::c_int) {
    RESCAN.store(true, Ordering::SeqCst);
}

/// The third word of the pid file of a daemon that takes SIGUSR1 as "rescan" (a daemon of an
/// older build does not: SIGUSR1 would stop it, and its SIGHUP is a rescan too).
const RESCAN_WORD: &str = "rescan=usr1";

const RTMGRP_LINK: u32 = 1;
const RTMGRP_NEIGH: u32 = 4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

struct Watcher {
    stop: Arc<Stop>,
    handle: JoinHandle<()>,
    /// What the watcher was started for; a change restarts it.
    fingerprint: String,
}

/// Tells a watcher to stop, waking it at once.
#[derive(Default)]
struct Stop {
    flag: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Stop {
    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// Work for a router's resync thread: set by the watcher, waited for (without polling) by the
/// resync thread.
#[derive(Default)]
struct Pending {
    state: std::sync::Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
}

impl Pending {
    fn dirty(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.cv.notify_one();
    }
    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_one();
    }
    /// Waits for work; false once stopped.
    fn wait(&self) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.1 {
                return false;
            }
            if std::mem::take(&mut g.0) {
                return true;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn fingerprint(r: &RouterState) -> String {
    r.interfaces
        .iter()
        .map(|i| format!("{}:{}", i.device, i.ifindex))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn pid_file() -> std::path::PathBuf {
    state::run_dir().join("daemon.pid")
}

/// This process's binary, without the " (deleted)" the kernel adds once it was replaced.
fn current_binary() -> Option<std::path::PathBuf> {
    let p = std::fs::read_link("/proc/self/exe").ok()?;
    let s = p.to_string_lossy();
    Some(std::path::PathBuf::from(
        s.strip_suffix(" (deleted)").unwrap_or(&s).to_string(),
    ))
}

/// True when the file this process runs from was replaced (a new build installed over it).
fn binary_replaced() -> bool {
    std::fs::read_link("/proc/self/exe").is_ok_and(|p| p.to_string_lossy().ends_with(" (deleted)"))
        && current_binary().is_some_and(|p| p.exists())
}

/// A new build seen on disk: its size and mtime, since when they have not changed, and
/// whether it answered `--version` already.
struct NewBuild {
    size: u64,
    mtime: std::time::SystemTime,
    since: std::time::Instant,
    tried: bool,
}

/// True once the binary installed over this one is whole: unchanged for a second (an
/// installer may still be writing it), and able to run (`--version` succeeds). Until then the
/// daemon goes on as it is; a build that cannot run is logged once and never exec'd.
fn new_build_ready(seen: &mut Option<NewBuild>) -> bool {
    let Some(path) = current_binary() else {
        return false;
    };
    let Ok(m) = std::fs::metadata(&path) else {
        return false;
    };
    let (size, mtime) = (m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH));
    match seen {
        Some(b) if b.size == size && b.mtime == mtime => {
            if b.since.elapsed() < Duration::from_secs(1) || b.tried {
                return false;
            }
            b.tried = true;
            let ok = Command::new(&path)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                tracing::error!(binary = %path.display(), "the router-ctl installed over this one does not run; this daemon goes on (install a working build)");
            }
            ok
        }
        _ => {
            *seen = Some(NewBuild {
                size,
                mtime,
                since: std::time::Instant::now(),
                tried: false,
            });
            false
        }
    }
}

/// The running daemon: (pid, started by `ensure_running`, takes SIGUSR1 as a rescan).
fn running_daemon() -> Option<(i32, bool, bool)> {
    let s = std::fs::read_to_string(pid_file()).ok()?;
    let mut w = s.split_whitespace();
    let pid = w.next()?.parse().ok()?;
    let auto = w.next() == Some("auto");
    Some((pid, auto, w.next() == Some(RESCAN_WORD)))
}

/// Router definitions the daemon owns (`run -f FILE`): applied at start, and again, difference
/// only, on SIGHUP or when the file changes; routers that leave the file are destroyed.
struct Definitions {
    path: std::path::PathBuf,
    mtime: Option<std::time::SystemTime>,
    /// Ids applied from the file by the last successful load.
    owned: BTreeSet<String>,
}

impl Definitions {
    fn mtime(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }

    /// Loads and applies the file. A file that does not validate changes nothing.
    fn load(&mut self) -> Result<()> {
        self.mtime = self.mtime();
        let routers = crate::config::load_file(&self.path)?;
        crate::apply::apply(&routers)?;
        let now: BTreeSet<String> = routers.iter().map(|r| r.id.clone()).collect();
        for gone in self.owned.difference(&now) {
            match crate::apply::destroy(gone) {
                Ok(_) => tracing::info!(router = %gone, "destroyed: no longer in the definitions"),
                Err(e) => {
                    tracing::warn!(router = %gone, error = format!("{e:#}"), "cannot destroy a router that left the definitions")
                }
            }
        }
        self.owned = now;
        tracing::info!(file = %self.path.display(), routers = self.owned.len(), "definitions applied");
        Ok(())
    }
}

/// Runs the daemon in the foreground until SIGTERM/SIGINT, or until no router is applied
/// (unless `stay`, or definitions are given with `file`).
///
/// `auto` marks a daemon that `apply` started; a daemon started any other way (by hand, by
/// systemd) takes over from an `auto` one.
pub fn run(
    stay: bool,
    file: Option<std::path::PathBuf>,
    metrics: Option<String>,
    auto: bool,
    agent: Option<crate::agent::run::Options>,
    follow: Vec<String>,
    api_group: Option<u32>,
) -> Result<()> {
    let stay = stay || file.is_some() || agent.is_some() || !follow.is_empty();
    // A daemon that is leaving may hold the lock for a moment: wait up to two seconds.
    let mut daemon_lock = None;
    for _ in 0..200 {
        daemon_lock = Lock::try_acquire(state::DAEMON_LOCK)?;
        if daemon_lock.is_some() {
            break;
        }
        if !auto {
            if let Some((pid, true, _)) = running_daemon() {
                tracing::info!(pid, "taking over from the daemon that apply started");
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let daemon_lock = daemon_lock.context(
        "another `router-ctl run` is already running (it holds /run/router-xdp/daemon.lock)",
    )?;
    // The handlers before the pid file: an apply signals whatever pid the file names (SIGUSR1:
    // rescan), and a signal with no handler yet would end this daemon silently.
    if !cfg!(mutant = "signals_after_pid_file") {
        install_signal_handlers();
    }
    std::fs::write(
        pid_file(),
        format!(
            "{} {} {RESCAN_WORD}",
            std::process::id(),
            if auto { "auto" } else { "owned" }
        ),
    )
    .context("cannot write the pid file")?;
    if let Some(addr) = &metrics {
        let replica = agent
            .as_ref()
            .and_then(|o| o.sync.as_ref())
            .map(|c| c.counters.clone());
        crate::metrics::serve(addr, replica)?;
    }
    let api = crate::api::serve(api_group)?;
    if cfg!(mutant = "signals_after_pid_file") {
        // The fault: a window in which SIGUSR1 ends the daemon.
        std::thread::sleep(Duration::from_millis(50));
        install_signal_handlers();
    }
    crate::kernel::init_io_runtime()?;
    tracing::info!(pid = std::process::id(), "router-ctl daemon started");
    let agent = match agent {
        Some(o) => {
            tracing::info!(host = %o.host, etcd = %o.access.urls(), "agent: definitions come from etcd");
            Some(crate::agent::run::start(o)?)
        }
        None => None,
    };
    let mut defs = file.map(|path| Definitions {
        path,
        mtime: None,
        owned: BTreeSet::new(),
    });
    if let Some(d) = defs.as_mut() {
        d.load()
            .with_context(|| format!("applying {}", d.path.display()))?;
    }
    let mut watchers: BTreeMap<String, Watcher> = BTreeMap::new();
    // Router advertisements, per router with advertised IPv6 subnets.
    let mut advertisers: BTreeMap<String, crate::ra::Advertiser> = BTreeMap::new();
    let mut daemon_lock = Some(daemon_lock);
    let mut upgrade = false;
    let mut known: Option<(Option<std::time::SystemTime>, Vec<RouterState>)> = None;
    let mut passes = 0u64;
    let mut new_build: Option<NewBuild> = None;
    // Namespaces that could not be followed, and when they were last tried.
    let mut follow_failed: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    // /run/netns's modification time when it was last scanned, and when: a namespace added
    // or deleted changes it; a scan every 5 s anyway retries the namespaces that failed.
    let mut follow_scanned: (Option<std::time::SystemTime>, Option<std::time::Instant>) =
        (None, None);
    if !follow.is_empty() {
        tracing::info!(patterns = ?follow, "following the routers of the namespaces that match");
    }
    while !TERM.load(Ordering::SeqCst) {
        if binary_replaced() && new_build_ready(&mut new_build) {
            // A new build was installed over this one: hand over to it, so that one daemon
            // never writes the maps with an older build's logic.
            tracing::info!("router-ctl was replaced on disk; restarting into the new build");
            upgrade = true;
            break;
        }
        let hup = HUP.swap(false, Ordering::SeqCst);
        let mut rescan = RESCAN.swap(false, Ordering::SeqCst) || hup;
        if !follow.is_empty() {
            let m = std::fs::metadata(netns::NETNS_RUN_DIR)
                .and_then(|m| m.modified())
                .ok();
            if m != follow_scanned.0
                || follow_scanned
                    .1
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
            {
                follow_scanned = (m, Some(std::time::Instant::now()));
                rescan |= follow_new(&follow, &mut follow_failed);
            }
        }
        if let Some(d) = defs.as_mut() {
            if hup || d.mtime() != d.mtime {
                if let Err(e) = d.load() {
                    // Keep what runs; the operator fixes the file and signals again.
                    tracing::error!(file = %d.path.display(), error = format!("{e:#}"), "definitions not applied; the routers keep their previous state");
                }
            }
        }
        // The state files are read again only when one changed (a save renames a file into
        // the directory, which changes its mtime): with many routers, parsing them all on
        // every pass would cost more than everything else the daemon does.
        let mtime = std::fs::metadata(state::routers_dir())
            .and_then(|m| m.modified())
            .ok();
        // Nothing changed since the last full pass (and a watcher that stopped, say for a
        // deleted namespace, counts as a change): wait, with a full pass every second anyway.
        passes += 1;
        let quiet = !rescan
            && !passes.is_multiple_of(5)
            && known
                .as_ref()
                .is_some_and(|(t, _)| mtime.is_some() && *t == mtime)
            && !watchers.values().any(|w| w.handle.is_finished());
        if quiet {
            nap();
            continue;
        }
        let mut routers = match &known {
            Some((t, v)) if mtime.is_some() && *t == mtime => v.clone(),
            _ => {
                let v = RouterState::all().unwrap_or_default();
                known = Some((mtime, v.clone()));
                v
            }
        };
        // A namespace deleted without destroy: its watcher lets go of it (or the namespace, its
        // devices and the instances' carrier would live on, nameless), and its pinned objects
        // go; the router is reported lost until it is applied again or destroyed.
        for r in routers.iter().filter(|r| r.lost.is_none()) {
            if r.followed && r.namespace_gone().is_some() {
                // The other control plane deleted it: nothing of ours stays behind.
                match crate::apply::follow::release(&r.id) {
                    Ok(()) => tracing::info!(router = %r.id, "namespace gone; no longer followed"),
                    Err(e) => {
                        tracing::warn!(router = %r.id, error = format!("{e:#}"), "cannot release a followed router whose namespace went")
                    }
                }
                continue;
            }
            if r.namespace_gone().is_some() && !cfg!(mutant = "keeps_deleted_namespace") {
                match crate::apply::forget_lost(&r.id) {
                    Ok(Some(why)) => {
                        tracing::warn!(router = %r.id, name = %r.name, "{why}: the router's fast path is gone; apply it again to recreate it, or destroy it")
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(router = %r.id, error = format!("{e:#}"), "cannot clean up after a deleted namespace")
                    }
                }
            }
        }
        if routers
            .iter()
            .any(|r| r.lost.is_none() && r.namespace_gone().is_some())
        {
            routers = RouterState::all().unwrap_or_default();
        }
        let lost: BTreeSet<String> = routers
            .iter()
            .filter(|r| r.lost.is_some())
            .map(|r| r.id.clone())
            .collect();
        routers.retain(|r| r.lost.is_none());
        if routers.is_empty() && lost.is_empty() && !stay {
            // Exit only under the state lock, so that an apply never sees a daemon that is
            // about to leave.
            let _state = Lock::acquire(state::STATE_LOCK)?;
            if RouterState::all().unwrap_or_default().is_empty() {
                let _ = std::fs::remove_file(pid_file());
                drop(daemon_lock.take());
                break;
            }
            continue;
        }
        let ids: BTreeSet<&str> = routers.iter().map(|r| r.id.as_str()).collect();
        let gone: Vec<String> = watchers
            .iter()
            .filter(|(id, w)| {
                !ids.contains(id.as_str())
                    || routers
                        .iter()
                        .any(|r| &r.id == *id && fingerprint(r) != w.fingerprint)
                    || w.handle.is_finished()
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(w) = watchers.remove(&id) {
                w.stop.set();
                let _ = w.handle.join();
                tracing::info!(router = %id, "neighbour watcher stopped");
            }
        }
        // Advertisers follow the routers' advertised subnets: a router that no longer
        // advertises (its subnets' modes removed) says so with a final advertisement; one
        // destroyed said so in destroy.
        let advertised: BTreeMap<String, (String, Vec<crate::ra::Port>)> = routers
            .iter()
            .map(|r| (r.id.clone(), (r.namespace.clone(), crate::ra::ports_of(r))))
            .filter(|(_, (_, p))| !p.is_empty())
            .collect();
        let ended: Vec<String> = advertisers
            .iter()
            .filter(|(id, a)| !advertised.contains_key(*id) || a.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            if let Some(a) = advertisers.remove(&id) {
                a.stop(ids.contains(id.as_str()));
            }
        }
        for (id, (ns, ports)) in advertised {
            match advertisers.get(&id) {
                Some(a) => a.update(ports),
                None => match crate::ra::Advertiser::start(&id, &ns, ports) {
                    Ok(a) => drop(advertisers.insert(id, a)),
                    Err(e) => {
                        tracing::error!(router = %id, error = format!("{e:#}"), "cannot start the router advertisements")
                    }
                },
            }
        }
        for r in routers {
            if !watchers.contains_key(&r.id) {
                let stop = Arc::new(Stop::default());
                let fp = fingerprint(&r);
                let id = r.id.clone();
                let s = stop.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("neigh-{}", &id[..id.len().min(8)]))
                    .spawn(move || {
                        if let Err(e) = watch(&r, &s) {
                            tracing::error!(router = %r.id, error = format!("{e:#}"), "neighbour watcher failed; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    })
                    .context("cannot spawn a watcher thread")?;
                watchers.insert(
                    id,
                    Watcher {
                        stop,
                        handle,
                        fingerprint: fp,
                    },
                );
            }
        }
        nap();
    }
    if let Some(a) = agent {
        a.stop(if upgrade {
            crate::agent::run::Stop::Keep
        } else {
            crate::agent::run::Stop::Resign
        });
    }
    // No API request is acted on from here on; one under way is finished and answered first.
    let _api = api.hold();
    for w in watchers.values() {
        w.stop.set();
    }
    // A daemon that stops withdraws nothing: the router keeps routing, and the advertised
    // lifetime covers a restart.
    for (_, a) in advertisers {
        a.stop(false);
    }
    for (_, w) in watchers {
        let _ = w.handle.join();
    }
    // Stopping follow mode leaves nothing of ours behind in the namespaces it followed (an
    // upgrade hands them over as they are).
    if !upgrade {
        for r in RouterState::all()
            .unwrap_or_default()
            .iter()
            .filter(|r| r.followed)
        {
            if let Err(e) = crate::apply::follow::release(&r.id) {
                tracing::warn!(router = %r.id, error = format!("{e:#}"), "cannot release a followed router");
            }
        }
    }
    if upgrade {
        drop(daemon_lock.take());
        let exe = current_binary().context("cannot find the new router-ctl")?;
        use std::os::unix::process::CommandExt as _;
        let err = Command::new(&exe).args(std::env::args_os().skip(1)).exec();
        return Err(err).with_context(|| format!("cannot start {}", exe.display()));
    }
    tracing::info!("router-ctl daemon stopped; the fast path keeps forwarding");
    Ok(())
}

/// The main loop's pause between passes: 200 ms, cut short by a signal.
fn nap() {
    for _ in 0..20 {
        if TERM.load(Ordering::SeqCst)
            || HUP.load(Ordering::SeqCst)
            || RESCAN.load(Ordering::SeqCst)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Follows the namespaces matching `patterns` that are not followed yet (none a defined router
/// claims); a namespace that fails is tried again 10 s later. True when one was taken.
fn follow_new(patterns: &[String], failed: &mut BTreeMap<String, std::time::Instant>) -> bool {
    let mut taken = false;
    let known: BTreeSet<String> = RouterState::all()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.lost.is_none())
        .map(|r| r.namespace)
        .collect();
    for ns in crate::apply::follow::candidates(patterns) {
        if known.contains(&ns)
            || failed
                .get(&ns)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            continue;
        }
        match crate::apply::follow::take(&ns) {
            Ok(st) => {
                failed.remove(&ns);
                tracing::info!(router = %st.id, ports = st.interfaces.len(), routes = st.routes.len(), "following namespace");
                taken = true;
            }
            Err(e) => {
                failed.insert(ns.clone(), std::time::Instant::now());
                tracing::warn!(namespace = %ns, error = format!("{e:#}"), "cannot follow the namespace; trying again in 10 s");
            }
        }
    }
    taken
}

/// One router's sync with its namespace: neighbours, devices and (with a gateway) the
/// kernel's NAT flows, each on a thread inside the namespace.
fn watch(r: &RouterState, stop: &Stop) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // SAFETY: eventfd(2); the descriptor is owned from here on.
    let wake = unsafe {
        std::os::fd::OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))
    };
    // Every router: one without a gateway may still get foreign rules (see `crate::guard`).
    let nat = Some({
        let (r, done) = (r.clone(), done.clone());
        let wake = wake.as_raw_fd();
        std::thread::Builder::new()
            .name(format!("nat-{}", &r.id[..r.id.len().min(8)]))
            .spawn(move || follow_nat(&r, &done, wake))
            .context("cannot spawn the NAT flow thread")?
    });
    let res = watch_neighbours(r, stop);
    done.store(true, Ordering::SeqCst);
    let one = 1u64;
    // SAFETY: an 8-byte write to our eventfd.
    unsafe {
        libc::write(
            wake.as_raw_fd(),
            &one as *const u64 as *const libc::c_void,
            8,
        )
    };
    if let Some(h) = nat {
        let _ = h.join();
    }
    res
}

/// Copies the kernel's NAT flows into the fast path, and follows the namespace's foreign
/// netfilter rules (see `crate::guard`), until `done` (see `crate::nat`); `wake` becomes
/// readable when it is set.
fn follow_nat(r: &RouterState, done: &std::sync::atomic::AtomicBool, wake: std::os::fd::RawFd) {
    let run = || -> Result<()> {
        let f = netns::open(&r.namespace)?;
        netns::enter(&f)?;
        let mut sync = crate::nat::NatSync::open(&r.id, r.nat_on())?;
        while !done.load(Ordering::SeqCst) {
            sync.step_or_wake(60_000, wake)?;
        }
        Ok(())
    };
    while !done.load(Ordering::SeqCst) {
        if let Err(e) = run() {
            tracing::warn!(router = %r.id, error = format!("{e:#}"), "NAT flow sync failed; the kernel carries new NAT flows meanwhile; retrying");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// One router's neighbour sync, on its own thread inside the router's namespace.
fn watch_neighbours(r: &RouterState, stop: &Stop) -> Result<()> {
    let f =
        netns::open(&r.namespace).with_context(|| format!("namespace {} is gone", r.namespace))?;
    netns::enter(&f)?;
    drop(f);
    let ifindexes: BTreeSet<u32> = r.interfaces.iter().map(|i| i.ifindex).collect();
    let mut neighs = Neighs::open(&r.id)?;
    #[cfg(mutant = "empty_maps_on_restart")]
    {
        // The fault: a (re)started daemon empties the neighbour and device maps and fills them
        // only a second later.
        for (ifindex, ip, _) in neighs.all() {
            neighs.remove(ifindex, ip);
        }
        let mut ebpf = crate::datapath::open_maps(&r.id)?;
        crate::datapath::set_ifaces(&mut ebpf, &[], &[], &[])?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async {
        let (mut conn, handle, mut events) = rtnetlink::new_connection().context("netlink socket")?;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(
                0,
                RTMGRP_NEIGH
                    | RTMGRP_LINK
                    | RTMGRP_IPV4_IFADDR
                    | RTMGRP_IPV6_IFADDR
                    | if r.followed && !cfg!(mutant = "follow_route_events_ignored") {
                        RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
                    } else {
                        0
                    },
            ))
            .context("cannot subscribe to neighbour, link and address events")?;
        tokio::spawn(conn);
        // Subscribe first, then dump: an event racing the dump is applied after it.
        let mut present = BTreeSet::new();
        for family in [IpVersion::V4, IpVersion::V6] {
            let mut dump = handle.neighbours().get().set_family(family).execute();
            while let Some(msg) = dump.try_next().await.context("neighbour dump")? {
                if let Some((ifindex, ip)) = update(&mut neighs, &ifindexes, &msg, false) {
                    present.insert((ifindex, ip));
                }
            }
        }
        for (ifindex, ip, _) in neighs.all() {
            if !present.contains(&(ifindex, ip)) {
                neighs.remove(ifindex, ip);
            }
        }
        tracing::info!(router = %r.id, neighbours = present.len(), "neighbour table synced");
        // The external device's IPv4 addresses (gateway IP, floating IPs) are announced when
        // the router is taken up, and each new one when it appears.
        let qg = r.interfaces.iter().filter(|_| !r.followed).find(|i| i.external).and_then(|i| {
            Some((i.ifindex, i.mac?.0))
        });
        if let Some((ifindex, mac)) = qg {
            let mut dump = handle.address().get().set_link_index_filter(ifindex).execute();
            let mut ips = Vec::new();
            while let Some(m) = dump.try_next().await.context("address dump")? {
                ips.extend(ipv4_of(&m));
            }
            announce(&r.id, ifindex, mac, ips);
        }
        // Devices may have changed while no daemon ran; then on every link, address or XDP
        // feature event. Resyncs run on a thread of their own (they wait for the state lock,
        // which an apply of another router may hold for a while): neighbour events are never
        // held up behind them.
        let pending = Arc::new(Pending::default());
        pending.dirty();
        let resyncer = {
            let (pending, id) = (pending.clone(), r.id.clone());
            std::thread::Builder::new()
                .name(format!("resync-{}", &id[..id.len().min(7)]))
                .spawn(move || {
                    while pending.wait() {
                        if let Err(e) = crate::apply::resync(&id) {
                            tracing::warn!(router = %id, error = format!("{e:#}"), "cannot bring the fast path in line with the devices");
                        }
                    }
                })
                .context("cannot spawn a resync thread")?
        };
        // The kernel's XDP feature notifications (a veth's NDO_XMIT follows its peer's GRO).
        let mut netdev = readable(
            crate::kernel::netdev::Netdev::open().and_then(|mut n| {
                n.subscribe()?;
                Ok(n)
            }),
            &r.id,
            "no XDP feature notifications; devices are checked on link events only",
        );
        // A followed namespace's forwarding switches and policy rules (`kernel::policy`).
        let mut policy = if r.followed {
            readable(
                crate::kernel::policy::Watch::open(),
                &r.id,
                "no forwarding-setting or rule notifications; they are read on link and address events only",
            )
        } else {
            None
        };
        loop {
            tokio::select! {
                ready = async { policy.as_mut().unwrap().readable_mut().await }, if policy.is_some() => {
                    if let Ok(mut guard) = ready {
                        let changed = guard.get_inner_mut().changed();
                        guard.clear_ready();
                        if changed && !cfg!(mutant = "kernel_policy_events_ignored") {
                            pending.dirty();
                        }
                    }
                }
                ev = events.next() => {
                    let Some((msg, _)) = ev else { break };
                    match msg.payload {
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                            update(&mut neighs, &ifindexes, &m, false);
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => {
                            update(&mut neighs, &ifindexes, &m, true);
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => {
                            if let Some((ifindex, mac)) = qg.filter(|(i, _)| *i == m.header.index) {
                                announce(&r.id, ifindex, mac, ipv4_of(&m).into_iter().collect());
                            }
                            if !cfg!(mutant = "address_events_ignored") {
                                pending.dirty()
                            }
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(_)) => {
                            if !cfg!(mutant = "address_events_ignored") {
                                pending.dirty()
                            }
                        }
                        NetlinkPayload::InnerMessage(
                            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
                        ) => pending.dirty(),
                        // Only a followed router subscribes: its routes are the kernel's.
                        NetlinkPayload::InnerMessage(
                            RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
                        ) => pending.dirty(),
                        _ => {}
                    }
                }
                ready = async { netdev.as_mut().unwrap().readable_mut().await }, if netdev.is_some() => {
                    if let Ok(mut guard) = ready {
                        let changes = guard.get_inner_mut().changes();
                        guard.clear_ready();
                        // A device that can no longer take XDP-redirected frames leaves the
                        // devmap now, before the resync (frames XDP redirects into it are lost
                        // until then); any change (or an overrun socket) makes the devices be
                        // read again.
                        for (ifindex, f) in changes.as_deref().unwrap_or_default() {
                            if f.is_none_or(|f| !f.ndo_xmit()) && !cfg!(mutant = "late_xmit_removal") {
                                if let Some(i) = r.interfaces.iter().find(|i| i.ifindex == *ifindex) {
                                    if let Err(e) = crate::datapath::remove_tx_port_pinned(&r.id, i.slot) {
                                        tracing::warn!(router = %r.id, device = %i.device, error = format!("{e:#}"), "cannot remove an XDP redirect slot");
                                    }
                                }
                            }
                        }
                        if changes.map_or(true, |c| c.iter().any(|(i, _)| ifindexes.contains(i))) {
                            pending.dirty();
                        }
                    }
                }
                _ = stop.wake.notified() => {
                    if stop.is_set() { break; }
                }
            }
        }
        pending.stop();
        let _ = resyncer.join();
        anyhow::Ok(())
    })
}

/// `sock` registered with the runtime for readiness, or None with a warning saying what is
/// `lost` without it.
fn readable<T: std::os::fd::AsRawFd>(
    sock: Result<T>,
    router: &str,
    lost: &str,
) -> Option<tokio::io::unix::AsyncFd<T>> {
    sock.and_then(|s| {
        // SAFETY: the socket is owned by the value registered, and lives as long.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(s, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .map_err(|e| tracing::warn!(router = %router, error = format!("{e:#}"), "{lost}"))
    .ok()
}

/// The IPv4 address of an address message.
fn ipv4_of(m: &rtnetlink::packet_route::address::AddressMessage) -> Option<std::net::Ipv4Addr> {
    use rtnetlink::packet_route::address::AddressAttribute;
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
        _ => None,
    })
}

/// Gratuitous ARPs for `ips` out of `ifindex`: 3 rounds, 2 s apart, from a thread of their
/// own (it starts in the caller's namespace).
fn announce(router: &str, ifindex: u32, mac: [u8; 6], ips: Vec<std::net::Ipv4Addr>) {
    if ips.is_empty() {
        return;
    }
    let router = router.to_string();
    let spawned = std::thread::Builder::new()
        .name("garp".into())
        .spawn(move || {
            use crate::kernel::arp;
            for round in 0..arp::ROUNDS {
                if round > 0 {
                    std::thread::sleep(arp::INTERVAL);
                }
                for ip in &ips {
                    if let Err(e) = arp::announce(ifindex, mac, *ip) {
                        tracing::warn!(router = %router, error = format!("{e:#}"), "gratuitous ARP not sent");
                    }
                }
            }
            tracing::debug!(router = %router, addresses = ?ips, "announced with gratuitous ARPs");
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the gratuitous ARP thread");
    }
}

/// Applies one neighbour message; returns the entry when it is now usable by the fast path.
fn update(
    neighs: &mut Neighs,
    ifindexes: &BTreeSet<u32>,
    m: &NeighbourMessage,
    deleted: bool,
) -> Option<(u32, IpAddr)> {
    if !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6)
        || !ifindexes.contains(&m.header.ifindex)
    {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(IpAddr::V4(*v)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                ip = Some(IpAddr::V6(*v))
            }
            NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => {
                mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]]);
            }
            _ => {}
        }
    }
    let ip = ip?;
    // Only neighbours the fast path can forward to: never multicast, never IPv6 link-local.
    let unusable = match ip {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.segments()[0] & 0xffc0 == 0xfe80,
    };
    if unusable {
        return None;
    }
    let ifindex = m.header.ifindex;
    let usable = matches!(
        m.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    match (deleted, usable, mac) {
        // The fault: a neighbour the map holds keeps its old MAC.
        (false, true, Some(_))
            if cfg!(mutant = "neigh_change_ignored") && neighs.get(ifindex, ip).is_some() =>
        {
            Some((ifindex, ip))
        }
        (false, true, Some(mac)) => match neighs.set(ifindex, ip, mac) {
            Ok(()) => {
                tracing::debug!(%ip, ifindex, mac = %crate::config::fmt_mac(&mac), state = ?m.header.state, "neighbour set");
                Some((ifindex, ip))
            }
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "neighbour map update failed");
                None
            }
        },
        _ => {
            tracing::debug!(%ip, ifindex, state = ?m.header.state, deleted, "neighbour removed");
            neighs.remove(ifindex, ip);
            None
        }
    }
}

fn install_signal_handlers() {
    // SAFETY: the handlers only store to atomics.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_hup as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_rescan as *const () as libc::sighandler_t);
    }
}

/// Starts the daemon in the background unless one is running. Call with the state lock held.
pub fn ensure_running() -> Result<Option<u32>> {
    match Lock::try_acquire(state::DAEMON_LOCK)? {
        None => {
            // Running: make it rescan now (never reload its definitions file: that is the
            // operator's SIGHUP).
            if let Some((pid, _, usr1)) = running_daemon() {
                let sig = if usr1 { libc::SIGUSR1 } else { libc::SIGHUP };
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, sig) };
            }
            Ok(None)
        }
        Some(lock) => {
            drop(lock);
            let log_path = state::run_dir().join("daemon.log");
            let child = crate::kernel::process::spawn_detached(&["run", "--auto"], &log_path)
                .context("cannot start `router-ctl run`")?;
            tracing::info!(pid = child.id(), log = %log_path.display(), "started the neighbour daemon");
            // Wait until it has taken its lock (it then writes its pid), so that a second apply
            // does not start another.
            let pid = child.id() as i32;
            for _ in 0..300 {
                if running_daemon().is_some_and(|(p, _, _)| p == pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Some(child.id()))
        }
    }
}

//! Fencing: a host that cannot renew its lease in time stops answering for the addresses of
//! the HA routers it holds active (nothing of their namespaces' ARP and neighbour discovery
//! leaves: `nft::fence`) before the lease can expire on the server, so that no two hosts ever
//! answer for one address; what clients still send to its MAC is forwarded meanwhile.
//!
//! The agent writes a deadline after each renewal it got an answer to: the time it sent that
//! renewal plus the lease's TTL, minus a margin. A separate process, the fencer (`router-ctl
//! fence`, started by the agent, outliving it), removes the addresses when the deadline
//! passes. It is a process of its own because the agent itself may be what failed (killed,
//! stuck): a restarted agent that renews the same lease in time writes a new deadline and
//! nothing happens (no failover); one that does not leaves the fencer to act, and the lease
//! expires on the server only after that.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::state::{self, RouterState};

/// What the agent tells the fencer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Fence {
    /// CLOCK_MONOTONIC nanoseconds after which the addresses must be gone.
    pub deadline_ns: u64,
    /// The HA routers whose addresses this host holds.
    pub routers: Vec<String>,
}

pub fn path() -> PathBuf {
    state::run_dir().join("fence.json")
}

/// Written by the fencer each time it acts (the agent re-asserts the addresses of routers it
/// still leads afterwards, if its lease turns out to have survived).
pub fn fired_path() -> PathBuf {
    state::run_dir().join("fence.fired")
}

fn pid_path() -> PathBuf {
    state::run_dir().join("fencer.pid")
}

/// The fencer's acknowledgement: the deadline it holds, and when it last read the fence file.
fn ack_path() -> PathBuf {
    state::run_dir().join("fence.ack")
}

/// What the fencer acknowledges (`ack_path`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ack {
    /// The deadline of the fence file it read last.
    pub deadline_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds of that read.
    pub read_ns: u64,
}

/// The fencer acknowledges at least this often while it runs.
const ACK_EVERY: Duration = Duration::from_millis(200);

pub fn acked() -> Option<Ack> {
    serde_json::from_slice(&std::fs::read(ack_path()).ok()?).ok()
}

/// Whether a fencer runs and holds a recent deadline of ours: it read the fence file within
/// the last half second, and the deadline it holds is no more than a second older than
/// `deadline_ns`, the one last written.
pub fn acknowledges(ack: Option<Ack>, deadline_ns: u64, now_ns: u64) -> bool {
    ack.is_some_and(|a| {
        now_ns.saturating_sub(a.read_ns) < 500_000_000
            && a.deadline_ns + 1_000_000_000 >= deadline_ns
    })
}

/// Ends a fencer that runs but does not acknowledge (stopped, stuck): the agent starts
/// another one.
pub fn kill_fencer() {
    if let Some(pid) = std::fs::read_to_string(pid_path())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|_| fencer_running())
    {
        tracing::warn!(
            pid,
            "the fencer does not acknowledge the deadline: killing it"
        );
        // SAFETY: plain kill(2) of the fencer's pid (checked to be a fencer just now).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t = std::time::Instant::now();
        // Reaped when it is our child (else init reaps it): a zombie still answers kill(0).
        // SAFETY: waitpid without a status pointer, not blocking.
        while unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == 0
            && alive(pid)
            && t.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The deadline for a renewal sent at `sent_ns` with lease time to live `ttl`. The server
/// received that renewal after it was sent, so the lease cannot expire before `sent + ttl`;
/// the margin covers the fencer's 10 ms polling, the removal itself (milliseconds) and clock
/// rate differences: a tenth of the TTL plus 150 ms (350 ms for 2 s).
pub fn deadline(sent_ns: u64, ttl: Duration) -> u64 {
    let margin = ttl / 10 + Duration::from_millis(150);
    sent_ns + ttl.saturating_sub(margin).as_nanos() as u64
}

pub fn write(f: &Fence) -> Result<()> {
    write_to(&path(), f)
}

/// `write` to the fence file at `p`.
pub fn write_to(p: &std::path::Path, f: &Fence) -> Result<()> {
    let p = p.to_path_buf();
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(f)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))
}

/// Whether a file the size of the fence file can be written beside it now (a scratch file,
/// removed at once; the fence file itself is left as it is).
pub fn writable() -> Result<()> {
    let p = path().with_extension("probe");
    let r =
        std::fs::write(&p, [b' '; 256]).with_context(|| format!("cannot write {}", p.display()));
    let _ = std::fs::remove_file(&p);
    r
}

pub fn read() -> Option<Fence> {
    serde_json::from_slice(&std::fs::read(path()).ok()?).ok()
}

/// The agent stops cleanly (it released the addresses itself): the fencer exits.
pub fn stop() {
    let _ = std::fs::remove_file(path());
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Starts the fencer unless one runs for this instance.
pub fn ensure_fencer() -> Result<()> {
    if fencer_running() {
        return Ok(());
    }
    // In a session of its own, so that a signal to the agent's process group misses it.
    let child =
        crate::kernel::process::spawn_detached(&["fence"], &state::run_dir().join("fencer.log"))
            .context("cannot start the fencer")?;
    std::fs::write(pid_path(), child.id().to_string())?;
    tracing::info!(pid = child.id(), "fencer started");
    Ok(())
}

/// Routers the fencer fences at once.
pub const FENCE_WORKERS: usize = 16;

/// Fences the routers of `states`, `workers` at a time: each router's fence is a command in
/// its own namespace, so they run side by side, not one after another. A router that cannot
/// be fenced (no `nft`) loses its addresses instead.
pub fn fence_all(states: &[RouterState], workers: usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, states.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(st) = states.get(i) else { return };
                if let Err(e) = super::hold::fence(st) {
                    tracing::error!(router = %st.id, error = format!("{e:#}"), "cannot fence the router: removing its addresses");
                    if let Err(e) = super::hold::release(st) {
                        tracing::error!(router = %st.id, error = format!("{e:#}"), "cannot remove the router's addresses");
                    }
                }
            });
        }
    });
}

/// Whether this instance's fencer runs.
pub fn fencer_running() -> bool {
    std::fs::read_to_string(pid_path())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            alive(pid) && cmd.split(|b| *b == 0).any(|a| a == b"fence")
        })
}

/// The fencer's loop (`router-ctl fence`): every 10 ms, until the agent removes the file.
pub fn run_fencer() -> Result<()> {
    // The fencer must act within a few hundred milliseconds of its deadline however busy the
    // host is (a standby takes the routers over soon after): it runs in the real-time class at
    // the lowest priority (it sleeps but for a file read every 10 ms), else at a high priority.
    // SAFETY: plain scheduler calls on this process.
    unsafe {
        let p = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
            tracing::warn!("the fencer could not take the real-time class; it runs at nice -10");
        }
    }
    let mut fired_for = 0u64;
    let mut missing = 0;
    let mut seen = false;
    let mut ack = Ack::default();
    let mut ack_failing = false;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let Some(f) = read() else {
            // Gone for 200 ms in a row after it existed (not a rename in progress): the agent
            // stopped cleanly.
            missing += 1;
            if seen && missing > 20 {
                tracing::info!("fence file removed: fencer exits");
                return Ok(());
            }
            continue;
        };
        missing = 0;
        seen = true;
        // Acknowledged when the deadline moves, and at least every ACK_EVERY: the agent stands
        // for no election while no fencer acknowledges.
        let now = monotonic_ns();
        if f.deadline_ns != ack.deadline_ns
            || now.saturating_sub(ack.read_ns) >= ACK_EVERY.as_nanos() as u64
        {
            ack = Ack {
                deadline_ns: f.deadline_ns,
                read_ns: now,
            };
            let tmp = ack_path().with_extension("tmp");
            let written = serde_json::to_vec(&ack)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|_| std::fs::rename(&tmp, ack_path()));
            match written {
                Err(e) if !ack_failing => {
                    ack_failing = true;
                    tracing::warn!(error = %e, "cannot acknowledge the deadline (the agent stands for no new HA role meanwhile)");
                }
                Err(_) => {}
                Ok(()) => ack_failing = false,
            }
        }
        if f.routers.is_empty()
            || monotonic_ns() < f.deadline_ns
            || fired_for == f.deadline_ns
            || cfg!(mutant = "fence_never")
        {
            continue;
        }
        fired_for = f.deadline_ns;
        tracing::warn!(routers = ?f.routers, "lease not renewed in time: fencing the HA routers held here (no ARP or neighbour discovery leaves them)");
        let states: Vec<RouterState> = f
            .routers
            .iter()
            .filter_map(|id| match RouterState::load(id) {
                Ok(Some(st)) => Some(st),
                _ => {
                    tracing::warn!(router = %id, "no state for a router to fence");
                    None
                }
            })
            .collect();
        fence_all(&states, FENCE_WORKERS);
        let _ = std::fs::write(fired_path(), fired_for.to_string());
    }
}

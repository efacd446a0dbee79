//! The undo journal of an apply: before each step that changes something, how to change it
//! back is recorded, in memory and in `<run dir>/routers/<id>.undo` (one JSON line per step,
//! synced), so that a failure rolls back what this run changed, in reverse order, and an apply
//! that was killed part-way is rolled back by the next apply or destroy of that router. The
//! journal's first line names the apply (a token the state file carries once the apply
//! completed): a journal whose apply completed is only removed, never rolled back.

use std::{
    io::{BufRead as _, Write as _},
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{delete_link, move_back, remove_bpf_dir};
use crate::{
    kernel::{netns, nft, rtnl::Rtnl, sysctl},
    state::{self, RouterState},
};

/// Something apply is about to change, and how to change it back if a later step fails (or
/// the apply is killed part-way). Each undo tolerates its step never having happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Undo {
    DeleteNetns(String),
    /// A device apply created, in namespace `ns` (None: the caller's).
    DeleteLink {
        ns: Option<String>,
        dev: String,
    },
    DeleteAddr {
        ns: String,
        dev: String,
        ip: IpAddr,
        prefix_len: u8,
    },
    /// An adopted device apply moved from the caller's namespace into `ns` goes back (before
    /// `ns` is deleted, which would destroy a virtual device in it).
    MoveBack {
        ns: String,
        dev: String,
        /// Its addresses in the caller's namespace (the kernel drops them on a move).
        #[serde(default)]
        addrs: Vec<(IpAddr, u8)>,
    },
    /// An adopted device apply brought up goes back down.
    SetDown {
        ns: String,
        dev: String,
    },
    RemoveBpfDir(String),
    /// The NAT table goes back to what it was (None: removed).
    RestoreNat {
        ns: String,
        to: Option<nft::Nat>,
    },
    /// A namespace sysctl goes back to `value`.
    Sysctl {
        ns: String,
        key: String,
        value: String,
    },
}

impl Undo {
    pub(super) fn run(self) {
        let in_ns = |ns: &str, f: Box<dyn FnOnce(&Rtnl) -> Result<()> + Send>| {
            netns::run_in(ns, move || f(&Rtnl::new()?))
        };
        let r = match &self {
            Undo::DeleteNetns(ns) => netns::delete(ns),
            Undo::DeleteLink { ns: None, dev } => Rtnl::new().and_then(|rt| delete_link(&rt, dev)),
            Undo::DeleteLink { ns: Some(ns), dev } => {
                let dev = dev.clone();
                in_ns(ns, Box::new(move |rt| delete_link(rt, &dev)))
            }
            Undo::DeleteAddr {
                ns,
                dev,
                ip,
                prefix_len,
            } => {
                let (dev, ip, len) = (dev.clone(), *ip, *prefix_len);
                in_ns(
                    ns,
                    Box::new(move |rt| match rt.link(&dev)? {
                        Some(l) => rt.addr_del(l.index, &dev, ip, len),
                        None => Ok(()),
                    }),
                )
            }
            Undo::MoveBack { ns, dev, addrs } => move_back(ns, dev, addrs),
            Undo::SetDown { ns, dev } => {
                let dev = dev.clone();
                in_ns(
                    ns,
                    Box::new(move |rt| match rt.link(&dev)? {
                        Some(l) => rt.set_down(l.index, &dev),
                        None => Ok(()),
                    }),
                )
            }
            Undo::RemoveBpfDir(id) => remove_bpf_dir(id),
            Undo::RestoreNat { ns, to } => {
                let to = to.clone();
                netns::run_in(ns, move || match &to {
                    Some(n) => nft::replace(n),
                    None => nft::remove(),
                })
            }
            Undo::Sysctl { ns, key, value } => {
                let (k, v) = (key.clone(), value.clone());
                netns::run_in(ns, move || sysctl::set(&k, &v))
            }
        };
        match r {
            Ok(()) => tracing::info!(undo = ?self, "rolled back"),
            Err(e) => {
                tracing::warn!(undo = ?self, error = format!("{e:#}"), "rollback step failed")
            }
        }
    }
}

/// The journal's first line.
#[derive(Serialize, Deserialize)]
struct Header {
    apply: String,
}

/// The journal line that takes back the record before it (its step failed unmade).
const RETRACT: &str = "\"retract\"";

/// Records written by this process (for `ROUTER_XDP_TEST_KILL_AT_STEP`).
static RECORDED: AtomicU64 = AtomicU64::new(0);

fn path(router_id: &str) -> PathBuf {
    state::run_dir()
        .join("routers")
        .join(format!("{router_id}.undo"))
}

/// What one apply of one router changed so far (see the module's comment).
pub(super) struct UndoLog {
    path: PathBuf,
    token: String,
    steps: Vec<Undo>,
}

impl UndoLog {
    /// A new journal for an apply of `router_id` (an interrupted one's must have been
    /// recovered first).
    pub(super) fn begin(router_id: &str) -> Result<UndoLog> {
        let path = path(router_id);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let token = format!(
            "{}-{}",
            std::process::id(),
            crate::agent::fence::monotonic_ns()
        );
        let mut f = std::fs::File::create(&path)
            .with_context(|| format!("cannot write the undo journal {}", path.display()))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string(&Header {
                apply: token.clone()
            })?
        )?;
        f.sync_data()?;
        Ok(UndoLog {
            path,
            token,
            steps: Vec::new(),
        })
    }

    /// The token the state file records when this apply completes.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// Another part of the same apply (the steps inside the router's namespace, on a thread
    /// of their own): the same journal, its own list; `absorb` brings the list back.
    pub(super) fn part(&self) -> UndoLog {
        UndoLog {
            path: self.path.clone(),
            token: self.token.clone(),
            steps: Vec::new(),
        }
    }

    pub(super) fn absorb(&mut self, other: UndoLog) {
        self.steps.extend(other.steps);
    }

    /// Records `u` before its step is made: the step must not be made when this fails.
    pub(super) fn push(&mut self, u: Undo) -> Result<()> {
        let line = serde_json::to_string(&u)?;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot write the undo journal {}", self.path.display()))?;
        writeln!(f, "{line}")
            .and_then(|_| f.sync_data())
            .with_context(|| format!("cannot write the undo journal {}", self.path.display()))?;
        self.steps.push(u);
        // Crash tests: killed right after the n-th record, before its step.
        let n = RECORDED.fetch_add(1, Ordering::SeqCst) + 1;
        if std::env::var("ROUTER_XDP_TEST_KILL_AT_STEP")
            .ok()
            .and_then(|v| v.parse().ok())
            == Some(n)
        {
            // SAFETY: kill(2) of this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        Ok(())
    }

    /// Records `u`, then makes the step; a step that fails takes its record back.
    pub(super) fn around<T>(&mut self, u: Undo, step: impl FnOnce() -> Result<T>) -> Result<T> {
        self.push(u)?;
        step().inspect_err(|_| self.retract())
    }

    /// The step recorded last failed before it changed anything: its record is taken back
    /// (so that a rollback does not "undo" what another owns, e.g. a namespace that already
    /// existed). In the file, a `RETRACT` line after it says so.
    pub(super) fn retract(&mut self) {
        self.steps.pop();
        let r = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                writeln!(f, "{RETRACT}")?;
                f.sync_data()
            });
        if let Err(e) = r {
            tracing::warn!(journal = %self.path.display(), error = %e, "cannot write to the undo journal");
        }
    }

    /// Undoes every recorded step, last first, and removes the journal.
    pub(super) fn roll_back(self) {
        for u in self.steps.into_iter().rev() {
            u.run();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// The apply completed (its state saved with `token`): the journal goes.
    pub(super) fn finish(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Rolls back an apply of `router_id` that was killed part-way, if its journal is there and
/// its apply did not complete (the state file does not carry its token). True when there was
/// one to roll back. The state lock must be held.
pub(super) fn recover(router_id: &str) -> Result<bool> {
    let path = path(router_id);
    if cfg!(mutant = "interrupted_apply_forgotten") {
        // The fault: an interrupted apply's journal is never read.
        return Ok(false);
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = text.as_bytes().lines();
    let header: Option<Header> = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str(&l).ok());
    let completed = match (&header, RouterState::load(router_id)) {
        (Some(h), Ok(Some(st))) => st.apply_token.as_deref() == Some(h.apply.as_str()),
        _ => false,
    };
    if completed {
        let _ = std::fs::remove_file(&path);
        return Ok(false);
    }
    // A torn last line (killed while writing it) was never followed by its step.
    let mut steps: Vec<Undo> = Vec::new();
    for l in lines.map_while(|l| l.ok()) {
        if l == RETRACT {
            steps.pop();
            continue;
        }
        match serde_json::from_str(&l) {
            Ok(u) => steps.push(u),
            Err(_) => break,
        }
    }
    tracing::warn!(
        router = router_id,
        steps = steps.len(),
        "an apply of this router was interrupted: rolling back what it changed"
    );
    UndoLog {
        path,
        token: String::new(),
        steps,
    }
    .roll_back();
    Ok(true)
}

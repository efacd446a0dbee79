//! Processes of this binary: starting one detached from the caller.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result};

/// A detached process's log beyond this size is set aside when the process is started again.
const MAX_LOG_BYTES: u64 = 16 << 20;

/// Starts this binary with `args` in a session of its own (a signal to the caller's process
/// group does not reach it), stdin closed, stdout and stderr appended to `log`.
pub fn spawn_detached(args: &[&str], log: &std::path::Path) -> Result<std::process::Child> {
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    // The log grows by appending, with no logrotate behind it: past a size, the old one is
    // kept once (`.1`) and a new one started.
    if std::fs::metadata(log).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setsid is async-signal-safe; it only detaches the child from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

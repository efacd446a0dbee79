//! Helpers shared by the packet tests and the namespace integration tests.

pub mod cluster;
pub mod corpus;
pub mod frame;
pub mod model;
pub mod neutron;
pub mod ovs;
pub mod topo;

use std::process::{Command, Output};

/// Tests need root (BPF, namespaces). A test that cannot run fails: it must never report a
/// pass it did not earn.
pub fn require_root() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        panic!("run as root: cargo xtask test (this test needs BPF_PROG_TEST_RUN and network namespaces)");
    }
}

/// Moves the calling thread into a new, empty network namespace of its own.
pub fn unshare_netns() {
    // SAFETY: affects only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output whatever its status.
pub fn sh_out(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// The router-ctl binary under test: $ROUTER_CTL (set by `cargo xtask test`), else the
/// workspace's release build.
pub fn router_ctl() -> String {
    std::env::var("ROUTER_CTL").unwrap_or_else(|_| {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/router-ctl");
        assert!(
            std::path::Path::new(p).exists(),
            "{p} is missing: build it with `cargo build --release -p router-ctl` or run `cargo xtask test`"
        );
        p.to_string()
    })
}

/// Runs `router-ctl ARGS`.
pub fn ctl(args: &[&str]) -> Output {
    Command::new(router_ctl())
        .args(args)
        .output()
        .expect("router-ctl")
}

/// Runs `router-ctl ARGS -j` and parses its JSON, panicking when it fails.
pub fn ctl_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("-j");
    let out = ctl(&a);
    assert!(
        out.status.success(),
        "router-ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("router-ctl JSON")
}

/// How much a counter grew from `before` to `after`; panics, naming `what`, when it went
/// backwards (tests build in release, where a plain `after - before` would wrap silently).
#[track_caller]
pub fn grew(what: &str, before: u64, after: u64) -> u64 {
    after
        .checked_sub(before)
        .unwrap_or_else(|| panic!("counter {what} went backwards: {before} → {after}"))
}

/// Polls `f` every 20 ms until it gives `Ok`, for at most `within`; panics naming `what` and
/// the last `Err` (the state that was waited on) when the time is up.
#[track_caller]
pub fn wait_until<T>(
    what: &str,
    within: std::time::Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let t0 = std::time::Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if t0.elapsed() >= within => {
                panic!("waited {within:?} for {what}; last: {e}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// Runs a test's set-up: a panic in it is raised again as "set-up failed: …", which the mutant
/// runner (`cargo xtask mutants`) does not count as a kill (the test never got to its claim).
#[track_caller]
pub fn in_setup<T>(f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{SETUP_FAILED} {msg}")
        }
    }
}

/// What a set-up failure's panic message starts with (see `in_setup`).
pub const SETUP_FAILED: &str = "set-up failed:";

/// The body-and-headers answer of a plain HTTP GET of `path` at `addr` (None: no answer).
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    Some(out)
}

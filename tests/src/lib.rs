//! Helpers shared by the packet tests and the namespace integration tests.

pub mod cluster;
pub mod corpus;
pub mod frame;
pub mod model;
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

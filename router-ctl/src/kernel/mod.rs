//! The kernel side of a router, without subprocesses: network namespaces, rtnetlink (devices,
//! addresses, routes), sysctls and the `netdev` generic-netlink family.
//!
//! Netlink sockets and `/proc/sys/net` work in the network namespace of the thread that opens
//! them, and setns()/unshare() move only the calling thread: work for a router's namespace runs
//! on a thread that joined it (`netns::run_in`), with clients opened there.

pub mod arp;
pub mod conntrack;
pub mod ndisc;
pub mod netdev;
pub mod netns;
pub mod nfrules;
pub mod nft;
pub mod policy;
pub mod process;
pub mod rtnl;
pub mod sysctl;

use anyhow::{bail, Context as _, Result};

/// Serialises this process's kernel calls that hold the RTNL for long (a tcx attach waits for an
/// RCU grace period with it held) with those that spin while another holds it (writing a
/// forwarding sysctl retries the system call until it gets the lock). Without it, routers
/// applied in parallel burn a CPU spinning against each other.
pub fn rtnl_section() -> std::sync::MutexGuard<'static, ()> {
    static RTNL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RTNL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device named `name` in namespace `ns` (None: the caller's), if there is one.
pub fn link_in(ns: Option<&str>, name: &str) -> Result<Option<rtnl::Link>> {
    let name = name.to_string();
    match ns {
        None => rtnl::Rtnl::new()?.link(&name),
        Some(ns) => netns::run_in(ns, move || rtnl::Rtnl::new()?.link(&name)),
    }
}

/// The XDP features of every device of namespace `ns`.
pub fn xdp_features(ns: &str) -> Result<std::collections::BTreeMap<u32, netdev::XdpFeatures>> {
    netns::run_in(ns, || netdev::Netdev::open()?.dump())
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("cannot create /sys/fs/bpf")?;
    let (src, dst, fs) = (
        std::ffi::CString::new("bpf").unwrap(),
        std::ffi::CString::new("/sys/fs/bpf").unwrap(),
        std::ffi::CString::new("bpf").unwrap(),
    );
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!(
            "cannot mount bpffs at /sys/fs/bpf ({}); mount it with `mount -t bpf bpf /sys/fs/bpf`",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// tokio creates a process-wide socket pair (its signal receiver) with the first runtime that
/// drives I/O, in the network namespace of the thread doing so. Created by a thread inside a
/// router's namespace, it would keep that namespace (and its devices) alive after
/// `ip netns del` for as long as the process lives: call this first, in the process's own
/// namespace.
pub fn init_io_runtime() -> Result<()> {
    drop(
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("cannot start an I/O runtime")?,
    );
    Ok(())
}

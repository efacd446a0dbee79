//! Named network namespaces, as iproute2 keeps them: a bind mount of the namespace under
//! `/run/netns/NAME` (a shared mount point), so that `ip netns exec` and every other tool see
//! them.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};

pub const NETNS_RUN_DIR: &str = "/run/netns";

pub fn path(ns: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(ns)
}

pub fn exists(ns: &str) -> bool {
    path(ns).exists()
}

/// The identity (nsfs inode) of the namespace named `ns`, None when there is none: a namespace
/// deleted and created again under the same name is another one.
pub fn inode(ns: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path(ns)).ok().map(|m| m.ino())
}

/// The identity of the namespace the calling thread is in.
pub fn current_inode() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// Opens the namespace named `ns` (its file keeps it reachable while open).
pub fn open(ns: &str) -> Result<File> {
    File::open(path(ns)).with_context(|| format!("cannot open network namespace {ns}"))
}

/// Moves the calling thread into the network namespace open as `file`.
pub fn enter(file: &File) -> Result<()> {
    // SAFETY: plain syscall on a valid descriptor; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Runs `f` on a new thread that has joined network namespace `ns`, and returns its result.
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = open(ns)?;
    let name = ns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{}", &ns[..ns.len().min(8)]))
        .spawn(move || {
            enter(&file).with_context(|| format!("cannot enter network namespace {name}"))?;
            drop(file);
            f()
        })
        .context("cannot spawn a thread")?
        .join()
        .map_err(|_| anyhow!("the thread working in namespace {ns} panicked"))?
}

/// Makes `/run/netns` a shared mount point, as iproute2 does, so that namespaces mounted there
/// appear in every mount namespace that shares it.
fn prepare_run_dir() -> Result<()> {
    std::fs::create_dir_all(NETNS_RUN_DIR)
        .with_context(|| format!("cannot create {NETNS_RUN_DIR}"))?;
    let dir = CString::new(NETNS_RUN_DIR).unwrap();
    let none = CString::new("none").unwrap();
    // SAFETY: mount(2) with valid C strings.
    let shared = unsafe {
        libc::mount(
            none.as_ptr(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if shared == 0 {
        return Ok(());
    }
    // Not a mount point yet: bind it onto itself, then share it.
    // SAFETY: as above.
    let rc = unsafe {
        libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            none.as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot bind-mount {NETNS_RUN_DIR}"));
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::mount(
            none.as_ptr(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot make {NETNS_RUN_DIR} shared"));
    }
    Ok(())
}

/// Creates network namespace `ns` (`ip netns add`): a new namespace, mounted at
/// `/run/netns/NAME`, with its loopback device up.
pub fn create(ns: &str) -> Result<()> {
    if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
        bail!("invalid namespace name '{ns}'");
    }
    prepare_run_dir()?;
    let target = path(ns);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let t = target.clone();
    let made = std::thread::spawn(move || -> Result<()> {
        // SAFETY: affects only this thread, which ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
        }
        let src = CString::new("/proc/thread-self/ns/net").unwrap();
        let dst = CString::new(t.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot mount the namespace at {}", t.display()));
        }
        crate::kernel::rtnl::Rtnl::new()?.set_up_by_name("lo")
    })
    .join()
    .map_err(|_| anyhow!("the thread creating namespace {ns} panicked"))?;
    if let Err(e) = made {
        let _ = delete(ns);
        return Err(e.context(format!("cannot create network namespace {ns}")));
    }
    Ok(())
}

/// Deletes network namespace `ns` (`ip netns del`): its mount goes, and the namespace with its
/// devices once nothing else holds it.
pub fn delete(ns: &str) -> Result<()> {
    let target = path(ns);
    let c = CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: umount2(2) with a valid C string.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    match std::fs::remove_file(&target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot delete namespace {ns}"))
        }
        _ => Ok(()),
    }
}

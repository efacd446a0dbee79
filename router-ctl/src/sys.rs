//! System plumbing: network namespaces, devices and addresses.
//!
//! Devices, addresses and namespaces are changed with iproute2 (`ip`), the same tool Neutron's
//! L3 agent drives, and read back with `ip -j`. Work that must happen *inside* a router's
//! namespace through a syscall (attaching XDP, filling the devmap, netlink sockets) runs on a
//! dedicated thread that has `setns()`-ed into it: setns changes only the calling thread.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;

/// Runs `ip ARGS`, returning its standard output; the error carries ip's own message.
pub fn ip(args: &[&str]) -> Result<String> {
    tracing::debug!(cmd = %format!("ip {}", args.join(" ")), "running");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (iproute2); install it with `cargo xtask setup`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

pub fn netns_exists(ns: &str) -> bool {
    std::path::Path::new(&netns_path(ns)).exists()
}

/// The identity (nsfs inode) of the namespace named `ns`, None when there is none: a namespace
/// deleted and created again under the same name is another one.
pub fn netns_inode(ns: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(netns_path(ns)).ok().map(|m| m.ino())
}

/// The identity of the namespace the calling thread is in.
pub fn current_netns_inode() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// Runs `f` on a new thread that has joined network namespace `ns`, and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = File::open(netns_path(ns))
        .with_context(|| format!("cannot open network namespace {ns}"))?;
    let ns_name = ns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{}", &ns[..ns.len().min(8)]))
        .spawn(move || {
            enter_netns(&file)
                .with_context(|| format!("cannot enter network namespace {ns_name}"))?;
            f()
        })
        .context("cannot spawn a thread")?
        .join()
        .map_err(|_| anyhow!("the thread working in namespace {ns} panicked"))?
}

/// Moves the calling thread into the network namespace open as `file`.
pub fn enter_netns(file: &File) -> Result<()> {
    // SAFETY: plain syscall on a valid descriptor; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub ifname: String,
    #[serde(default)]
    pub address: String,
    pub mtu: u32,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub linkinfo: Option<LinkKind>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LinkKind {
    #[serde(default)]
    pub info_kind: Option<String>,
}

impl LinkInfo {
    pub fn mac(&self) -> Result<[u8; 6]> {
        parse_mac(&self.address).ok_or_else(|| {
            anyhow!(
                "device {} has no Ethernet address ('{}')",
                self.ifname,
                self.address
            )
        })
    }
    pub fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
    /// The device's kind (veth, macvlan, openvswitch, …); None for a NIC.
    pub fn kind(&self) -> Option<String> {
        self.linkinfo.as_ref().and_then(|l| l.info_kind.clone())
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ns_args<'a>(ns: Option<&'a str>, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    if let Some(ns) = ns {
        v.extend(["-n", ns]);
    }
    v.extend_from_slice(rest);
    v
}

/// The device `name` in namespace `ns` (None: the caller's), if it exists.
pub fn link(ns: Option<&str>, name: &str) -> Result<Option<LinkInfo>> {
    let out = Command::new("ip")
        .args(ns_args(ns, &["-j", "-d", "link", "show", "dev", name]))
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip`")?;
    if !out.status.success() {
        return Ok(None);
    }
    let mut v: Vec<LinkInfo> =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j link` output")?;
    Ok(v.pop())
}

#[derive(Debug, Deserialize)]
struct AddrDump {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
}

/// IPv4 and IPv6 addresses with prefix length, per device, in namespace `ns`.
pub fn ip_addrs(ns: &str) -> Result<Vec<(String, IpAddr, u8)>> {
    let out = ip(&["-n", ns, "-j", "addr", "show"])?;
    let dump: Vec<AddrDump> = serde_json::from_str(&out).context("parsing `ip -j addr` output")?;
    let mut v = Vec::new();
    for d in dump {
        for a in d.addr_info {
            if a.family == "inet" || a.family == "inet6" {
                if let Ok(ip) = a.local.parse() {
                    v.push((d.ifname.clone(), ip, a.prefixlen));
                }
            }
        }
    }
    Ok(v)
}

pub fn sysctl_get(ns: &str, key: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-n", key])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip netns exec ... sysctl`")?;
    if !out.status.success() {
        bail!(
            "cannot read {key} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn sysctl_set(ns: &str, key: &str, value: &str) -> Result<()> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
    .map(|_| ())
}

/// The XDP features of every device of namespace `ns` (the kernel's `netdev` family).
pub fn xdp_features(
    ns: &str,
) -> Result<std::collections::BTreeMap<u32, crate::netdev::XdpFeatures>> {
    in_netns(ns, || crate::netdev::Netdev::open()?.dump())
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
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("cannot run mount")?;
    if !status.success() {
        bail!("cannot mount bpffs at /sys/fs/bpf; mount it with `mount -t bpf bpf /sys/fs/bpf`");
    }
    Ok(())
}

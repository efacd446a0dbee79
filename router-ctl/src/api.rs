//! The daemon's API: a unix socket (root only, mode 0600) taking one JSON request per line and
//! answering one JSON line. The CLI's changing verbs go through it when a daemon runs, so that
//! changes are made by one process; without a daemon they act on the pinned state directly.
//! A malformed, truncated or oversized request gets an error answer and never stops the daemon.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    state,
    verbs::{self, Target},
};

/// The API socket, served (`serve`). Its lock is held while a request is carried out and
/// answered; a daemon that stops or restarts takes it first (`hold`) and keeps it, so a
/// connection closed without an answer was never acted on, and the client may safely act on
/// its own.
pub struct Served {
    busy: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Served {
    /// Waits until the request under way, if any, is answered; none is acted on while the
    /// guard lives.
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Longest route batch accepted (about 7 million routes).
pub const MAX_BATCH: u64 = 256 << 20;

pub fn socket_path() -> PathBuf {
    state::run_dir().join("ctl.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Create {
        name: String,
        id: Option<String>,
    },
    Delete {
        router: String,
    },
    AddSubnet {
        router: String,
        subnet: String,
        gateway: String,
        port_id: Option<String>,
        /// IPv6: Neutron's ipv6_ra_mode and ipv6_address_mode.
        #[serde(default)]
        ipv6_ra_mode: Option<String>,
        #[serde(default)]
        ipv6_address_mode: Option<String>,
    },
    RemoveSubnet {
        router: String,
        subnet: String,
    },
    AddRoute {
        router: String,
        route: String,
    },
    RemoveRoute {
        router: String,
        route: String,
    },
    /// Dynamic route changes (`verbs::batch`): the request line gives the length of the batch's
    /// text, which follows it on the socket (the daemon opens no file a client names); the
    /// answer is the summary as JSON.
    RouteBatch {
        router: String,
        /// What errors call the batch (its file's name): a label, never opened by the daemon.
        name: String,
        len: u64,
        #[serde(skip)]
        text: BatchText,
    },
    SetGateway {
        router: String,
        network: String,
        port_id: Option<String>,
        fixed_ips: Vec<String>,
        enable_snat: Option<bool>,
    },
    UnsetGateway {
        router: String,
    },
    CreateFloatingIp {
        router: String,
        floating_ip_address: String,
        fixed_ip_address: Option<String>,
    },
    /// Associates (Some) or disassociates (None) a floating IP.
    SetFloatingIp {
        floating_ip_address: String,
        router: Option<String>,
        fixed_ip_address: Option<String>,
    },
    DeleteFloatingIp {
        floating_ip_address: String,
        router: Option<String>,
    },
}

/// A route batch's text, where it is: in the client's memory (standard input), in the
/// client's own file (streamed to the daemon, or parsed here without a daemon), or already
/// parsed (by the daemon, as it read the socket: a million routes are never held as text).
#[derive(Default)]
pub enum BatchText {
    #[default]
    None,
    Bytes(Vec<u8>),
    File(PathBuf),
    Ops(Vec<crate::routes::Op>),
}

impl std::fmt::Debug for BatchText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the text itself into a log line.
        match self {
            BatchText::None => f.write_str("none"),
            BatchText::Bytes(b) => write!(f, "{} bytes", b.len()),
            BatchText::File(p) => write!(f, "the client's file {}", p.display()),
            BatchText::Ops(o) => write!(f, "{} changes", o.len()),
        }
    }
}

impl BatchText {
    fn ops(self, name: &str) -> Result<Vec<crate::routes::Op>> {
        Ok(match self {
            BatchText::None => Vec::new(),
            BatchText::Bytes(b) => crate::routes::parse(&b[..], name)?,
            BatchText::File(p) => crate::routes::parse(
                BufReader::new(
                    std::fs::File::open(&p).with_context(|| format!("cannot open {name}"))?,
                ),
                name,
            )?,
            BatchText::Ops(o) => o,
        })
    }
}

/// Counts what passes through a reader.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub router_id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Where every changing command runs, chosen in one place: against etcd (`--etcd`), here (the
/// verbs write the definitions there, the agents apply them), except dynamic routes, which
/// live on one host; else through the daemon when one runs (one process makes every change,
/// and keeps large route tables in memory); else here, on the pinned state directly.
pub fn dispatch(t: Target, req: Request) -> Result<String> {
    let host_local = matches!(req, Request::RouteBatch { .. });
    if matches!(t, Target::Etcd(_)) && !host_local {
        return execute(t, req);
    }
    match call(&req) {
        Some(r) => r,
        None => execute(Target::Here, req),
    }
}

/// Carries out a request in this process.
pub fn execute(t: Target, req: Request) -> Result<String> {
    Ok(match req {
        Request::Create { name, id } => verbs::create(t, &name, id)?.id,
        Request::Delete { router } => match t {
            Target::Etcd(s) => s.delete(&router)?,
            Target::Here => crate::apply::destroy(&router)?.id,
        },
        Request::AddSubnet {
            router,
            subnet,
            gateway,
            port_id,
            ipv6_ra_mode,
            ipv6_address_mode,
        } => {
            let ip = crate::config::RawFixedIp {
                subnet,
                ip_address: gateway,
                ipv6_ra_mode,
                ipv6_address_mode,
                ..Default::default()
            };
            verbs::add_subnet(t, &router, ip, port_id)?.id
        }
        Request::RemoveSubnet { router, subnet } => verbs::remove_subnet(t, &router, &subnet)?.id,
        Request::AddRoute { router, route } => verbs::add_route(t, &router, &route)?.id,
        Request::RemoveRoute { router, route } => verbs::remove_route(t, &router, &route)?.id,
        Request::RouteBatch {
            router, name, text, ..
        } => serde_json::to_string(&crate::verbs::batch::batch(&router, text.ops(&name)?)?)?,
        Request::SetGateway {
            router,
            network,
            port_id,
            fixed_ips,
            enable_snat,
        } => verbs::set_gateway(t, &router, &network, port_id, &fixed_ips, enable_snat)?.id,
        Request::UnsetGateway { router } => verbs::unset_gateway(t, &router)?.id,
        Request::CreateFloatingIp {
            router,
            floating_ip_address,
            fixed_ip_address,
        } => {
            verbs::create_floating_ip(
                t,
                &router,
                &floating_ip_address,
                fixed_ip_address.as_deref(),
            )?
            .id
        }
        Request::SetFloatingIp {
            floating_ip_address,
            router,
            fixed_ip_address,
        } => {
            verbs::associate_floating_ip(
                t,
                &floating_ip_address,
                router.as_deref(),
                fixed_ip_address.as_deref(),
            )?
            .id
        }
        Request::DeleteFloatingIp {
            floating_ip_address,
            router,
        } => verbs::delete_floating_ip(t, &floating_ip_address, router.as_deref())?.id,
    })
}

/// `--api-group`: a group's id, from its name or its number.
pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name)
        .map_err(|_| anyhow!("--api-group {name:?}: not a group name"))?;
    // SAFETY: getgrnam with a NUL-terminated name; the entry is read at once.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        return Err(anyhow!(
            "--api-group {name}: no such group (give a group name or a gid)"
        ));
    }
    // SAFETY: a non-null entry from getgrnam.
    Ok(unsafe { (*g).gr_gid })
}

/// Serves the socket from a thread of its own; with `group`, that group's members may use it
/// as root may.
pub fn serve(group: Option<u32>) -> Result<Served> {
    let path = socket_path();
    // The socket's directory (the run directory: state, journals, the fence) is root's alone,
    // so the socket cannot be reached by a path through it even with a mode changed by hand;
    // with an API group, its members may pass through it (not list it).
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        let mode = if group.is_some() { 0o710 } else { 0o700 };
        std::os::unix::fs::chown(dir, Some(0), Some(group.unwrap_or(0)))
            .with_context(|| format!("cannot give {} to root", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    // Created with mode 0600 from the start (no moment where another user may connect).
    // SAFETY: umask only changes this process's file creation mask, restored at once.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&path);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&path, Some(0), Some(gid))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
        tracing::info!(gid, "API open to the group's members too");
    }
    tracing::info!(socket = %path.display(), "API listening");
    let served = Served {
        busy: Default::default(),
    };
    let busy = served.busy.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                // One request at a time: changes are serialised here (and by the state lock).
                // A stopping daemon holds the lock for good: a request accepted then is never
                // acted on, and its client, answered by the closed connection, acts itself.
                let _busy = busy.lock().unwrap_or_else(|e| e.into_inner());
                let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    peer_allowed(&conn, group)?;
                    handle(&conn)
                }));
                let resp = match answer {
                    Ok(Ok(id)) => Response {
                        ok: true,
                        router_id: Some(id),
                        error: None,
                    },
                    Ok(Err(e)) => Response {
                        ok: false,
                        router_id: None,
                        error: Some(format!("{e:#}")),
                    },
                    Err(_) => Response {
                        ok: false,
                        router_id: None,
                        error: Some("internal error".into()),
                    },
                };
                let mut conn = conn;
                let _ = writeln!(conn, "{}", serde_json::to_string(&resp).unwrap_or_default());
            }
        })?;
    Ok(served)
}

/// Only root may change routers through the socket (its mode says so too; this holds when
/// the mode was changed by hand).
fn peer_allowed(conn: &UnixStream, group: Option<u32>) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "cannot tell who is asking: {}",
            std::io::Error::last_os_error()
        ));
    }
    if cred.uid == 0 {
        return Ok(());
    }
    if let Some(gid) = group.filter(|_| !cfg!(mutant = "api_group_ignored")) {
        if cred.gid == gid || supplementary_groups(cred.pid).contains(&gid) {
            return Ok(());
        }
    }
    tracing::warn!(
        uid = cred.uid,
        pid = cred.pid,
        "API request from a user other than root (or the API group) refused"
    );
    Err(anyhow!(
        "only root{} may change routers (uid {} asked)",
        group
            .map(|g| format!(" and members of group {g}"))
            .unwrap_or_default(),
        cred.uid
    ))
}

/// The supplementary groups of process `pid` (its `Groups:` line).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn handle(conn: &UnixStream) -> Result<String> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    let mut reader = BufReader::new(conn);
    let n = reader
        .by_ref()
        .take(MAX_REQUEST + 1)
        .read_line(&mut line)
        .context("reading the request")?;
    if n as u64 > MAX_REQUEST {
        return Err(anyhow!("request longer than {MAX_REQUEST} bytes"));
    }
    if !line.ends_with('\n') {
        return Err(anyhow!(
            "truncated request: a request is one JSON object ending with a newline"
        ));
    }
    let mut req: Request = serde_json::from_str(&line).context("malformed request")?;
    if let Request::RouteBatch {
        len, text, name, ..
    } = &mut req
    {
        if *len > MAX_BATCH {
            return Err(anyhow!(
                "a route batch of {len} bytes is over the limit of {MAX_BATCH}"
            ));
        }
        // Parsed as it arrives: the text itself is never held whole.
        let mut body = Counted {
            inner: reader.take(*len),
            n: 0,
        };
        let ops = crate::routes::parse(BufReader::new(&mut body), name);
        if body.n != *len {
            return Err(anyhow!("truncated route batch: {} of {len} bytes", body.n));
        }
        *text = BatchText::Ops(ops?);
    }
    tracing::info!(?req, "API request");
    execute(Target::Here, req)
}

/// Sends a request to the running daemon; None when no daemon listens, or when it stopped
/// without acting on the request (see `BUSY`).
pub fn call(req: &Request) -> Option<Result<String>> {
    let mut s = match UnixStream::connect(socket_path()) {
        Ok(s) => s,
        // A daemon runs, and its socket is not ours to use: changes are root's (and its API
        // group's), here as there.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Some(Err(anyhow!(
                "permission denied on {}: only root and members of the daemon's API group (`run --api-group`) may change routers",
                socket_path().display()
            )))
        }
        Err(_) => return None,
    };
    let mut run = || -> Result<Option<String>> {
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        writeln!(s, "{}", serde_json::to_string(req)?)?;
        match req {
            Request::RouteBatch {
                text: BatchText::Bytes(b),
                ..
            } => s.write_all(b)?,
            Request::RouteBatch {
                text: BatchText::File(p),
                name,
                len,
                ..
            } => {
                let f = std::fs::File::open(p).with_context(|| format!("cannot open {name}"))?;
                let sent = std::io::copy(&mut f.take(*len), &mut s)?;
                if sent != *len {
                    anyhow::bail!("{name} shrank while it was sent ({sent} of {len} bytes)");
                }
            }
            _ => {}
        }
        let mut line = String::new();
        match BufReader::new(&s).read_line(&mut line) {
            // Closed while queued (the daemon was stopping): not acted on.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            r => r?,
        };
        if line.is_empty() {
            return Ok(None);
        }
        let resp: Response = serde_json::from_str(&line).context("the daemon's answer")?;
        match (resp.ok, resp.router_id, resp.error) {
            (true, Some(id), _) => Ok(Some(id)),
            (_, _, e) => Err(anyhow!(
                e.unwrap_or_else(|| "the daemon refused the request".into())
            )),
        }
    };
    run().transpose()
}

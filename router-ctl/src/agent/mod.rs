//! Routers across many hosts, on etcd: the agent (`router-ctl run --etcd URL --host NAME`), the
//! scheduler it elects among agents, L3 HA with fencing, and the CLI's view of etcd.
//!
//! Everything lives under one versioned prefix, `/router-xdp/v1/`:
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `routers/<id>` | the router's definition, TOML (one `[[router]]`, as in a file) | CLI | — |
//! | `schedule/<id>` | `{"hosts": [..]}`: where the router runs | scheduler | — |
//! | `agents/<host>` | `{"host", "pid", "started"}`: the host is alive | agent | host |
//! | `hosts/<host>` | `{"host", "registered"}`: the host was seen once | agent | — |
//! | `scheduler` | the host running the scheduler (election) | agent | host |
//! | `active/<id>` | the HA router's active host (election) | agent | host |
//! | `status/<id>/<host>` | `{"generation", "role", "error", "updated_ms"}` | agent | host |
//!
//! The definition's `mod_revision` is its generation: a host reports the generation it applied.
//! Elections are a transaction that creates the key only if it does not exist
//! (`create_revision == 0`), bound to the candidate's lease, so a host that dies loses every
//! role it held when its lease expires. Writes made in a role compare the role's key first.

pub mod access;
pub mod applier;
pub mod fence;
pub mod hold;
pub mod run;
pub mod schedule;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/router-xdp/v1/";

pub fn key(rest: &str) -> String {
    format!("{PREFIX}{rest}")
}

pub fn router_key(id: &str) -> String {
    key(&format!("routers/{id}"))
}
pub fn schedule_key(id: &str) -> String {
    key(&format!("schedule/{id}"))
}
pub fn agent_key(host: &str) -> String {
    key(&format!("agents/{host}"))
}
pub fn host_key(host: &str) -> String {
    key(&format!("hosts/{host}"))
}
pub fn active_key(id: &str) -> String {
    key(&format!("active/{id}"))
}
pub fn status_key(id: &str, host: &str) -> String {
    key(&format!("status/{id}/{host}"))
}
pub fn scheduler_key() -> String {
    key("scheduler")
}

/// The host lease's time to live. A dead host's roles go after at most this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
/// How long a host may stay dead before its routers move (Neutron's `agent_down_time`).
pub const DEFAULT_DOWN_TIME: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Schedule {
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    pub host: String,
    pub pid: u32,
    /// Unix seconds.
    pub started: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An HA router's host that holds its addresses.
    Active,
    /// An HA router's host ready to take over.
    Standby,
    /// A router without HA.
    Single,
    /// The definition could not be applied here.
    Error,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Single => "single",
            Role::Error => "error",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The definition's revision applied (0: none yet).
    pub generation: i64,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub updated_ms: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `--instance NAME`: an agent's own state directory, pin directory, API socket and namespace
/// prefix, so that several agents can run side by side on one machine. Call before any
/// thread starts.
pub fn use_instance(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 16
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        anyhow::bail!(
            "--instance '{name}': use 1 to 16 letters, digits, '-' or '_' (it names directories and namespaces)"
        );
    }
    // SAFETY (edition 2021: safe): called from main before any other thread exists.
    std::env::set_var(
        "ROUTER_XDP_RUN_DIR",
        format!("{}/instances/{name}", crate::state::RUN_DIR),
    );
    std::env::set_var(
        "ROUTER_XDP_BPF_DIR",
        format!("/sys/fs/bpf/router-xdp/instances/{name}/v1"),
    );
    std::env::set_var("ROUTER_XDP_NS_PREFIX", format!("qrouter-{name}-"));
    Ok(())
}

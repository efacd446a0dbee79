//! Routers across many hosts, on etcd: the agent (`router-ctl run --etcd URL --host NAME`), the
//! scheduler it elects among agents, L3 HA with fencing, and the CLI's view of etcd.
//!
//! Everything lives under one versioned prefix, `/router-xdp/v1/`. What an agent writes lies
//! under its own host's prefix, `hosts/<host>/`, so that etcd's permissions (key ranges) can
//! confine each host's credentials to its own keys (the README's roles):
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `routers/<id>` | the router's definition, TOML (one `[[router]]`, as in a file) | CLI | — |
//! | `schedule/<id>` | `{"hosts": [..]}`: where the router runs | scheduler | — |
//! | `scheduler/<host>` | the host stands to run the scheduler | scheduler | host |
//! | `hosts/<host>/alive` | `{"host", "pid", "started"}`: the host is alive | agent | host |
//! | `hosts/<host>/registered` | `{"host", "pid", "started"}`: the host was seen once | agent | — |
//! | `hosts/<host>/candidate/<id>` | the host stands to be the HA router's active host | agent | host |
//! | `hosts/<host>/status/<id>` | `{"generation", "role", "error", "updated_ms"}` | agent | host |
//!
//! The definition's `mod_revision` is its generation: a host reports the generation it applied.
//! Elections are candidacies: a key per candidate, bound to its lease; the candidate whose key
//! was created first holds the role (for an HA router, among the hosts it is scheduled on), so
//! a host that dies loses every role it held when its lease expires, and no host can take a
//! role by writing another host's key. Writes made in a role compare the role's key first.
//!
//! Keys of the layout before (`agents/<host>`, `hosts/<host>`, `active/<id>`, `scheduler`,
//! `status/<id>/<host>`) are still read, so that agents of both builds agree during an upgrade:
//! a role held in an old key wins over candidacies, and an agent whose credentials allow it
//! mirrors its liveness and roles into the old keys (see `Elections`).

pub mod access;
pub mod applier;
pub mod fence;
pub mod hold;
pub mod replica;
pub mod run;
pub mod schedule;
pub mod store;

use std::{collections::BTreeMap, time::Duration};

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
/// Everything host `host` writes (its credentials' whole write permission).
pub fn host_prefix(host: &str) -> String {
    key(&format!("hosts/{host}/"))
}
pub fn alive_key(host: &str) -> String {
    format!("{}alive", host_prefix(host))
}
pub fn registered_key(host: &str) -> String {
    format!("{}registered", host_prefix(host))
}
pub fn status_key(id: &str, host: &str) -> String {
    format!("{}status/{id}", host_prefix(host))
}
pub fn candidate_key(host: &str, id: &str) -> String {
    format!("{}candidate/{id}", host_prefix(host))
}
pub fn scheduler_candidate_key(host: &str) -> String {
    key(&format!("scheduler/{host}"))
}

/// The keys of the layout before host prefixes, read (and, where allowed, written) while
/// agents of an older build may still run.
pub mod legacy {
    use super::key;
    pub fn agent_key(host: &str) -> String {
        key(&format!("agents/{host}"))
    }
    pub fn active_key(id: &str) -> String {
        key(&format!("active/{id}"))
    }
    pub fn scheduler_key() -> String {
        key("scheduler")
    }
}

/// A key of the layout, by what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Router(&'a str),
    Schedule(&'a str),
    SchedulerCandidate(&'a str),
    Alive(&'a str),
    Registered(&'a str),
    Candidate { host: &'a str, id: &'a str },
    Status { host: &'a str, id: &'a str },
    LegacyAgent(&'a str),
    LegacyHost(&'a str),
    LegacyActive(&'a str),
    LegacyScheduler,
    LegacyStatus { id: &'a str, host: &'a str },
}

impl<'a> Key<'a> {
    /// What the full key `key` is, if it is one of the layout's.
    pub fn parse(key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(PREFIX)?;
        let named = |s: &'a str| (!s.is_empty() && !s.contains('/')).then_some(s);
        Some(match rest.split_once('/') {
            None if rest == "scheduler" => Key::LegacyScheduler,
            None => return None,
            Some(("routers", id)) => Key::Router(named(id)?),
            Some(("schedule", id)) => Key::Schedule(named(id)?),
            Some(("scheduler", h)) => Key::SchedulerCandidate(named(h)?),
            Some(("agents", h)) => Key::LegacyAgent(named(h)?),
            Some(("active", id)) => Key::LegacyActive(named(id)?),
            Some(("status", r)) => {
                let (id, host) = r.split_once('/')?;
                Key::LegacyStatus {
                    id: named(id)?,
                    host: named(host)?,
                }
            }
            Some(("hosts", r)) => match r.split_once('/') {
                None => Key::LegacyHost(named(r)?),
                Some((host, what)) => {
                    let host = named(host)?;
                    match what.split_once('/') {
                        None if what == "alive" => Key::Alive(host),
                        None if what == "registered" => Key::Registered(host),
                        Some(("candidate", id)) => Key::Candidate {
                            host,
                            id: named(id)?,
                        },
                        Some(("status", id)) => Key::Status {
                            host,
                            id: named(id)?,
                        },
                        _ => return None,
                    }
                }
            },
            _ => return None,
        })
    }
}

/// A candidacy or an old-layout role key: when it was created and the lease it is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub created: i64,
    pub lease: i64,
}

/// Who holds each role, as etcd's keys say: the HA routers' active hosts and the scheduler.
#[derive(Clone, Debug, Default)]
pub struct Elections {
    /// router → host → its candidacy.
    candidates: BTreeMap<String, BTreeMap<String, Held>>,
    /// host → its candidacy to schedule.
    schedulers: BTreeMap<String, Held>,
    /// router → the host an older build's election (`active/<id>`) names.
    legacy_active: BTreeMap<String, (String, Held)>,
    legacy_scheduler: Option<(String, Held)>,
}

impl Elections {
    /// Takes in a key's new value; false when the key holds no role.
    pub fn put(&mut self, key: Key, value: &str, held: Held) -> bool {
        match key {
            Key::Candidate { host, id } => {
                self.candidates
                    .entry(id.into())
                    .or_default()
                    .insert(host.into(), held);
            }
            Key::SchedulerCandidate(host) => {
                self.schedulers.insert(host.into(), held);
            }
            Key::LegacyActive(id) => {
                self.legacy_active.insert(id.into(), (value.into(), held));
            }
            Key::LegacyScheduler => self.legacy_scheduler = Some((value.into(), held)),
            _ => return false,
        }
        true
    }

    /// Takes in a key's deletion; false when the key holds no role.
    pub fn delete(&mut self, key: Key) -> bool {
        match key {
            Key::Candidate { host, id } => {
                if let Some(c) = self.candidates.get_mut(id) {
                    c.remove(host);
                    if c.is_empty() {
                        self.candidates.remove(id);
                    }
                }
            }
            Key::SchedulerCandidate(host) => drop(self.schedulers.remove(host)),
            Key::LegacyActive(id) => drop(self.legacy_active.remove(id)),
            Key::LegacyScheduler => self.legacy_scheduler = None,
            _ => return false,
        }
        true
    }

    /// The active host of HA router `id`, scheduled on `scheduled`: the one an older build's
    /// election names, else the first candidate among `scheduled` (a candidacy of a host the
    /// router is not scheduled on counts for nothing).
    pub fn active(&self, id: &str, scheduled: &[String]) -> Option<(&str, Held)> {
        if let Some((h, held)) = self.legacy_active.get(id) {
            return Some((h.as_str(), *held));
        }
        self.candidates
            .get(id)?
            .iter()
            .filter(|(h, _)| {
                scheduled.iter().any(|s| s == *h) || cfg!(mutant = "unscheduled_candidates_count")
            })
            .min_by_key(|(h, held)| (held.created, h.as_str()))
            .map(|(h, held)| (h.as_str(), *held))
    }

    /// The host that runs the scheduler: the one an older build's election names, else the
    /// first candidate.
    pub fn scheduler(&self) -> Option<(&str, Held)> {
        if let Some((h, held)) = &self.legacy_scheduler {
            return Some((h.as_str(), *held));
        }
        self.schedulers
            .iter()
            .min_by_key(|(h, held)| (held.created, h.as_str()))
            .map(|(h, held)| (h.as_str(), *held))
    }

    /// Host `host`'s candidacy for router `id`.
    pub fn candidacy(&self, host: &str, id: &str) -> Option<Held> {
        self.candidates.get(id)?.get(host).copied()
    }

    /// The routers host `host` stands for.
    pub fn candidacies_of(&self, host: &str) -> Vec<String> {
        self.candidates
            .iter()
            .filter(|(_, c)| c.contains_key(host))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn scheduler_candidacy(&self, host: &str) -> Option<Held> {
        self.schedulers.get(host).copied()
    }

    /// The host an older build's election for router `id` names.
    pub fn legacy_active(&self, id: &str) -> Option<&str> {
        self.legacy_active.get(id).map(|(h, _)| h.as_str())
    }

    pub fn legacy_scheduler(&self) -> Option<&str> {
        self.legacy_scheduler.as_ref().map(|(h, _)| h.as_str())
    }
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
    /// Where the host receives HA routers' connection state (`--sync-listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<std::net::SocketAddr>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_written_is_read_back_as_what_it_is() {
        assert_eq!(Key::parse(&router_key("r1")), Some(Key::Router("r1")));
        assert_eq!(Key::parse(&schedule_key("r1")), Some(Key::Schedule("r1")));
        assert_eq!(
            Key::parse(&scheduler_candidate_key("n1")),
            Some(Key::SchedulerCandidate("n1"))
        );
        assert_eq!(Key::parse(&alive_key("n1")), Some(Key::Alive("n1")));
        assert_eq!(
            Key::parse(&registered_key("n1")),
            Some(Key::Registered("n1"))
        );
        assert_eq!(
            Key::parse(&candidate_key("n1", "r1")),
            Some(Key::Candidate {
                host: "n1",
                id: "r1"
            })
        );
        assert_eq!(
            Key::parse(&status_key("r1", "n1")),
            Some(Key::Status {
                host: "n1",
                id: "r1"
            })
        );
        assert_eq!(
            Key::parse(&legacy::agent_key("n1")),
            Some(Key::LegacyAgent("n1"))
        );
        assert_eq!(
            Key::parse(&legacy::active_key("r1")),
            Some(Key::LegacyActive("r1"))
        );
        assert_eq!(
            Key::parse(&legacy::scheduler_key()),
            Some(Key::LegacyScheduler)
        );
        assert_eq!(Key::parse(&key("hosts/n1")), Some(Key::LegacyHost("n1")));
        assert_eq!(
            Key::parse(&key("status/r1/n1")),
            Some(Key::LegacyStatus {
                id: "r1",
                host: "n1"
            })
        );
        // Everything else is no key of ours: other prefixes, deeper paths, empty names.
        for k in [
            "/other/v1/routers/r1".to_string(),
            key("routers/r1/x"),
            key("routers/"),
            key("hosts/n1/candidate/r1/x"),
            key("hosts/n1/other"),
            key("hosts//alive"),
            key("nothing"),
        ] {
            assert_eq!(Key::parse(&k), None, "{k}");
        }
    }

    fn held(created: i64) -> Held {
        Held {
            created,
            lease: 100 + created,
        }
    }

    #[test]
    fn the_first_candidate_among_the_scheduled_hosts_leads() {
        let mut e = Elections::default();
        let both = ["n1".to_string(), "n2".to_string()];
        assert_eq!(e.active("r1", &both), None);
        let cand = |h: &'static str| Key::Candidate { host: h, id: "r1" };
        // A host the router is not scheduled on stood first: it leads nothing.
        assert!(e.put(cand("intruder"), "", held(5)));
        assert_eq!(e.active("r1", &both), None);
        e.put(cand("n2"), "", held(7));
        e.put(cand("n1"), "", held(9));
        assert_eq!(e.active("r1", &both).map(|a| a.0), Some("n2"));
        assert_eq!(e.candidacies_of("n1"), vec!["r1".to_string()]);
        // The leader's key goes (its lease expired, or it resigned): the next one leads.
        assert!(e.delete(cand("n2")));
        assert_eq!(e.active("r1", &both), Some(("n1", held(9))));
        // An older build's election wins over candidacies while it stands.
        e.put(Key::LegacyActive("r1"), "n2", held(20));
        assert_eq!(e.active("r1", &both).map(|a| a.0), Some("n2"));
        e.delete(Key::LegacyActive("r1"));
        assert_eq!(e.active("r1", &both).map(|a| a.0), Some("n1"));
        // Keys that hold no role are not taken.
        assert!(!e.put(Key::Alive("n1"), "", held(1)));
    }

    #[test]
    fn the_first_scheduler_candidate_schedules() {
        let mut e = Elections::default();
        e.put(Key::SchedulerCandidate("n2"), "", held(3));
        e.put(Key::SchedulerCandidate("n1"), "", held(4));
        assert_eq!(e.scheduler().map(|s| s.0), Some("n2"));
        e.put(Key::LegacyScheduler, "n1", held(9));
        assert_eq!(e.scheduler().map(|s| s.0), Some("n1"));
        e.delete(Key::LegacyScheduler);
        e.delete(Key::SchedulerCandidate("n2"));
        assert_eq!(e.scheduler().map(|s| s.0), Some("n1"));
    }
}

//! The agent's hands: applies the routers scheduled to this host with the same code as a file
//! (`apply::apply`), destroys those that left, and turns HA roles into addresses. It runs on a
//! thread of its own, so that applying never delays the lease renewals.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use anyhow::Result;

use super::{Role, Status};
use crate::{
    apply,
    config::Router,
    kernel::{arp, ndisc, netns, rtnl::Rtnl},
    state::RouterState,
};

/// What etcd wants of this host.
#[derive(Clone, Debug, Default)]
pub struct Want {
    /// The routers scheduled here, with their definition's revision.
    pub routers: BTreeMap<String, (Router, i64)>,
    /// The HA routers this host leads.
    pub active: BTreeSet<String>,
    /// Set once the agent has read etcd: before that nothing is touched (a restarted agent,
    /// or one that cannot reach etcd, leaves what is applied as it is).
    pub synced: bool,
    /// For each HA router this host leads: where its other hosts receive connection state.
    pub peers: BTreeMap<String, Vec<std::net::SocketAddr>>,
}

/// What one host takes on, whatever etcd asks: routers beyond are refused with a status
/// naming the limit, not applied (a definition written by anyone with etcd access must not
/// exhaust a network node's memory).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Routers applied here at most.
    pub max_routers: usize,
    /// The sum of the routers' route room (`max_routes`, or `DEFAULT_ROOM` for a router
    /// without it) at most: the fast path's route maps take about 120 bytes per route of room
    /// (BENCHMARKS.md: 84 MiB for a million IPv4 routes, with IPv6 room for a quarter as many).
    pub max_routes: u64,
}

/// The route room a router without `max_routes` gets (the maps' default capacity).
pub const DEFAULT_ROOM: u64 = 4096;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_routers: 2000,
            max_routes: 16 << 20,
        }
    }
}

/// The routers of `want` this host refuses under `limits`, with why. Those applied here already
/// (`applied`) count first and are kept; the others are taken in id order while they fit.
pub fn over_limits(
    want: &BTreeMap<String, (Router, i64)>,
    applied: &BTreeSet<String>,
    limits: &Limits,
) -> BTreeMap<String, String> {
    let room = |r: &Router| r.max_routes.map_or(DEFAULT_ROOM, u64::from);
    let (mut n, mut routes) = (0usize, 0u64);
    for (_, (r, _)) in want.iter().filter(|(id, _)| applied.contains(*id)) {
        n += 1;
        routes += room(r);
    }
    let mut refused = BTreeMap::new();
    for (id, (r, _)) in want.iter().filter(|(id, _)| !applied.contains(*id)) {
        if cfg!(mutant = "host_limits_ignored") {
            break;
        }
        if n + 1 > limits.max_routers {
            refused.insert(id.clone(), format!("this host's limit of {} routers is reached (router-ctl run --max-routers); schedule it elsewhere or raise the limit", limits.max_routers));
        } else if routes + room(r) > limits.max_routes {
            refused.insert(id.clone(), format!("its room for {} routes would take this host past its limit of {} routes of room in all (router-ctl run --max-routes, about 120 bytes of maps each)", room(r), limits.max_routes));
        } else {
            n += 1;
            routes += room(r);
        }
    }
    refused
}

/// What the applier tells the agent.
#[derive(Debug)]
pub enum Report {
    Status {
        id: String,
        status: Status,
    },
    /// An HA router here can (true) or cannot (false) be active: applied, every device up with
    /// carrier.
    Ready {
        id: String,
        ready: bool,
    },
    /// This host gave up being active for the router (a tracked link went down); its
    /// addresses are gone.
    Resigned {
        id: String,
    },
    /// The router was destroyed here.
    Removed {
        id: String,
    },
}

#[derive(Default)]
pub struct Shared {
    state: Mutex<(Want, u64, bool)>,
    cv: Condvar,
}

impl Shared {
    pub fn set(&self, want: Want) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = want;
        g.1 += 1;
        self.cv.notify_one();
    }
    /// The wanted state as it is now.
    pub fn current(&self) -> Want {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
    pub fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
        self.cv.notify_one();
    }
    /// The wanted state when it changed, or after `tick` anyway; None once stopped.
    fn wait(&self, seen: &mut u64, tick: Duration) -> Option<Want> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 == *seen && !g.2 {
            g = self
                .cv
                .wait_timeout(g, tick)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if g.2 {
            return None;
        }
        *seen = g.1;
        Some(g.0.clone())
    }
}

/// Gratuitous ARPs and unsolicited neighbour advertisements for every address of the router,
/// 3 rounds 2 s apart (as keepalived and Neutron's agent do), from a thread of their own.
pub fn announce(st: &RouterState) {
    let st = st.clone();
    let _ = std::thread::Builder::new().name("announce".into()).spawn(move || {
        let ns = st.namespace.clone();
        let r = netns::run_in(&ns, move || {
            for round in 0..arp::ROUNDS {
                if round > 0 {
                    std::thread::sleep(arp::INTERVAL);
                }
                for i in &st.interfaces {
                    let Some(mac) = i.mac.map(<[u8; 6]>::from) else { continue };
                    let mut ips: Vec<IpAddr> = i.fixed_ips.iter().map(|f| f.gateway_ip).collect();
                    if i.external {
                        ips.extend(st.gateway.iter().flat_map(|g| g.floating_ips.iter()).filter(|f| f.fixed_ip_address.is_some()).map(|f| IpAddr::V4(f.floating_ip_address)));
                    }
                    for ip in ips {
                        let sent = match ip {
                            IpAddr::V4(a) => arp::announce(i.ifindex, mac, a),
                            IpAddr::V6(a) => ndisc::announce(i.ifindex, mac, a),
                        };
                        if let Err(e) = sent {
                            tracing::debug!(router = %st.id, error = format!("{e:#}"), "announcement not sent");
                        }
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(error = format!("{e:#}"), "cannot announce the router's addresses");
        }
    });
}

/// Every device of the router is up with carrier (keepalived's `track_interface`).
fn links_running(st: &RouterState) -> bool {
    let devs: Vec<String> = st.interfaces.iter().map(|i| i.device.clone()).collect();
    netns::run_in(&st.namespace, move || {
        let links = Rtnl::new()?.links()?;
        Ok(devs
            .iter()
            .all(|d| links.iter().any(|l| &l.name == d && l.running())))
    })
    .unwrap_or(false)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Done {
    generation: i64,
    role: Role,
}

/// Routers whose apply failed: the definition and role that failed, when to try again, and the
/// wait after that (1 s, doubling to a minute), so that a router that cannot be applied is not
/// rolled back and reported five times a second; a new definition or role is tried at once.
#[derive(Debug, Default)]
struct Retries(BTreeMap<String, (Done, std::time::Instant, Duration)>);

impl Retries {
    /// `d` failed for router `id` lately and its wait is not over.
    fn waiting(&self, id: &str, d: &Done, now: std::time::Instant) -> bool {
        if cfg!(mutant = "no_backoff") {
            return false;
        }
        self.0
            .get(id)
            .is_some_and(|(f, next, _)| f == d && now < *next)
    }

    /// `d` failed for `id` at `now`: returns the wait before the next try.
    fn failed(&mut self, id: &str, d: &Done, now: std::time::Instant) -> Duration {
        let wait = match self.0.get(id) {
            Some((f, _, w)) if f == d => (*w * 2).min(Duration::from_secs(60)),
            _ => Duration::from_secs(1),
        };
        self.0.insert(id.to_string(), (d.clone(), now + wait, wait));
        wait
    }

    fn succeeded(&mut self, id: &str) {
        self.0.remove(id);
    }
}

/// The applier's loop: until `shared` is stopped.
pub fn run(shared: Arc<Shared>, limits: Limits, report: impl Fn(Report)) {
    // Applying is bulk work; renewing the lease is not: this thread (and the apply workers it
    // starts, which inherit it) yields the CPU to the lease renewals under load.
    // SAFETY: setpriority on this thread's own id.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
    let mut seen = 0;
    let mut done: BTreeMap<String, Done> = BTreeMap::new();
    let mut ready: BTreeMap<String, bool> = BTreeMap::new();
    let mut fired = std::fs::read_to_string(super::fence::fired_path()).unwrap_or_default();
    // HA routers that may carry a fence: all of them when this agent starts, all again each
    // time the fencer acts; each loses it at its next successful apply.
    let mut fenced: Option<BTreeSet<String>> = None;
    let mut fired_seen = fired.clone();
    let mut retries = Retries::default();
    let mut reported_refusal: BTreeSet<String> = BTreeSet::new();
    while let Some(want) = shared.wait(&mut seen, Duration::from_millis(200)) {
        if !want.synced {
            continue;
        }
        // Routers no longer scheduled here (or deleted) go.
        for st in RouterState::all().unwrap_or_default() {
            if !want.routers.contains_key(&st.id) {
                match apply::destroy(&st.id) {
                    Ok(_) => {
                        tracing::info!(router = %st.id, "destroyed: no longer scheduled on this host")
                    }
                    Err(e) => {
                        tracing::warn!(router = %st.id, error = format!("{e:#}"), "cannot destroy a router no longer scheduled here")
                    }
                }
                done.remove(&st.id);
                ready.remove(&st.id);
                report(Report::Removed { id: st.id });
            }
        }
        // The fencer acted: routers this host still leads are applied again, which takes the
        // fence down (its lease outlived the outage, so no other host took them) — only once
        // the lease was renewed after that (a new deadline ahead): until then the fence stays
        // up, whatever else happens.
        let now_fired = std::fs::read_to_string(super::fence::fired_path()).unwrap_or_default();
        if now_fired != fired_seen {
            fired_seen = now_fired.clone();
            fenced = None;
        }
        let fenced = fenced.get_or_insert_with(|| {
            want.routers
                .iter()
                .filter(|(_, (r, _))| r.ha)
                .map(|(id, _)| id.clone())
                .collect()
        });
        if now_fired != fired
            && super::fence::read().is_some_and(|f| f.deadline_ns > super::fence::monotonic_ns())
        {
            fired = now_fired;
            done.retain(|_, d| d.role != Role::Active);
        }
        // Beyond this host's limits: refused, reported, not applied.
        let applied: BTreeSet<String> = RouterState::all()
            .unwrap_or_default()
            .into_iter()
            .map(|st| st.id)
            .collect();
        let refused = over_limits(&want.routers, &applied, &limits);
        let mut batch = Vec::new();
        for (id, (r, rev)) in &want.routers {
            if let Some(why) = refused.get(id) {
                let status = Status {
                    generation: *rev,
                    role: Role::Error,
                    error: Some(why.clone()),
                    updated_ms: super::now_ms(),
                };
                if done.remove(id).is_some() || !reported_refusal.contains(id) {
                    tracing::warn!(router = %id, reason = %why, "not applied");
                    reported_refusal.insert(id.clone());
                    report(Report::Status {
                        id: id.clone(),
                        status,
                    });
                }
                continue;
            }
            reported_refusal.remove(id);
            // Leading, unless a tracked device is down here (then it resigned).
            let leads = want.active.contains(id) && ready.get(id) != Some(&false);
            let role = match (r.ha, leads) {
                (false, _) => Role::Single,
                (true, true) => Role::Active,
                (true, false) => Role::Standby,
            };
            let d = Done {
                generation: *rev,
                role: role.clone(),
            };
            if done.get(id) != Some(&d) {
                if retries.waiting(id, &d, std::time::Instant::now()) {
                    continue;
                }
                batch.push((r.clone(), d));
            }
        }
        if !batch.is_empty() {
            let routers: Vec<Router> = batch.iter().map(|(r, _)| r.clone()).collect();
            // A standby gets the router without its addresses.
            let opts = apply::Options {
                standby: batch
                    .iter()
                    .filter(|(_, d)| d.role == Role::Standby)
                    .map(|(r, _)| r.id.clone())
                    .collect(),
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let results: Vec<Result<()>> = match apply::apply_with(&routers, &opts) {
                Ok(_) => routers.iter().map(|_| Ok(())).collect(),
                // Which ones failed: each alone (a failed router was rolled back whole).
                Err(_) => routers
                    .iter()
                    .map(|r| apply::apply_with(std::slice::from_ref(r), &opts).map(|_| ()))
                    .collect(),
            };
            tracing::info!(
                routers = routers.len(),
                ms = t.elapsed().as_millis() as u64,
                "applied"
            );
            for ((r, d), res) in batch.into_iter().zip(results) {
                let status = match res {
                    Ok(()) => {
                        if fenced.remove(&r.id) && !cfg!(mutant = "fence_never_lifted") {
                            if let Ok(Some(st)) = RouterState::load(&r.id) {
                                if let Err(e) = super::hold::unfence(&st) {
                                    tracing::warn!(router = %r.id, error = format!("{e:#}"), "cannot take the fence down");
                                }
                            }
                        }
                        if d.role == Role::Active
                            && done.get(&r.id).is_none_or(|x| x.role != Role::Active)
                        {
                            if let Ok(Some(st)) = RouterState::load(&r.id) {
                                announce(&st);
                            }
                            tracing::info!(router = %r.id, name = %r.name, "active here: addresses taken");
                        }
                        done.insert(r.id.clone(), d.clone());
                        retries.succeeded(&r.id);
                        Status {
                            generation: d.generation,
                            role: d.role,
                            error: None,
                            updated_ms: super::now_ms(),
                        }
                    }
                    Err(e) => {
                        let wait = retries.failed(&r.id, &d, std::time::Instant::now());
                        tracing::error!(router = %r.id, error = format!("{e:#}"), retry_in_s = wait.as_secs(), "cannot apply the router's definition; trying again later, or at once when it changes");
                        done.remove(&r.id);
                        Status {
                            generation: d.generation,
                            role: Role::Error,
                            error: Some(format!("{e:#}")),
                            updated_ms: super::now_ms(),
                        }
                    }
                };
                report(Report::Status {
                    id: r.id.clone(),
                    status,
                });
            }
        }
        // HA routers: can this host be active (devices up with carrier)?
        for (id, (r, _)) in &want.routers {
            if !r.ha || !done.contains_key(id) {
                continue;
            }
            let Ok(Some(st)) = RouterState::load(id) else {
                continue;
            };
            let ok = links_running(&st);
            if ready.get(id) != Some(&ok) {
                ready.insert(id.clone(), ok);
                report(Report::Ready {
                    id: id.clone(),
                    ready: ok,
                });
            }
            if !ok && want.active.contains(id) && !cfg!(mutant = "ha_no_track") {
                tracing::warn!(router = %id, "a device of the router lost its link: resigning");
                let _ = super::hold::release(&st);
                if let Some(d) = done.get_mut(id) {
                    d.role = Role::Standby;
                }
                report(Report::Resigned { id: id.clone() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A router whose apply keeps failing is tried again after 1, 2, 4 … s, at most a minute
    /// apart; a new definition (or role) is tried at once, and a success forgets the failures.
    #[test]
    fn routers_beyond_the_host_limits_are_refused_and_applied_ones_kept() {
        let router = |id: &str, max_routes: Option<u32>| {
            let text = format!(
                "[[router]]\nid = \"{id}\"\nname = \"r-{id}\"\n{}",
                max_routes
                    .map(|n| format!("max_routes = {n}\n"))
                    .unwrap_or_default()
            );
            let mut v = crate::config::parse(&text).expect("a definition");
            (id.to_string(), (v.remove(0), 1))
        };
        let want: BTreeMap<String, (Router, i64)> = [
            router("a", None),
            router("b", Some(1_000_000)),
            router("c", None),
            router("d", None),
        ]
        .into_iter()
        .collect();
        let limits = Limits {
            max_routers: 4,
            max_routes: 1_000_000 + 2 * DEFAULT_ROOM,
        };
        // d applied already: it stays; a and b fit; c is past the routes' room; then nothing.
        let applied: BTreeSet<String> = ["d".to_string()].into();
        let refused = over_limits(&want, &applied, &limits);
        assert_eq!(refused.keys().collect::<Vec<_>>(), ["c"]);
        assert!(refused["c"].contains("--max-routes"), "{refused:?}");
        let limits = Limits {
            max_routers: 2,
            ..limits
        };
        let refused = over_limits(&want, &applied, &limits);
        assert_eq!(refused.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert!(refused["b"].contains("--max-routers"), "{refused:?}");
    }

    #[test]
    fn failed_applies_back_off() {
        let d = |generation| Done {
            generation,
            role: Role::Single,
        };
        let mut r = Retries::default();
        let t0 = std::time::Instant::now();
        assert!(!r.waiting("a", &d(1), t0));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            let w = r.failed("a", &d(1), now);
            waits.push(w.as_secs());
            assert!(r.waiting("a", &d(1), now + w - Duration::from_millis(1)));
            now += w;
            assert!(!r.waiting("a", &d(1), now));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(
            !r.waiting("a", &d(2), t0),
            "a new definition waits for nothing"
        );
        assert!(!r.waiting("b", &d(1), t0));
        r.succeeded("a");
        assert!(!r.waiting("a", &d(1), t0));
        assert_eq!(r.failed("a", &d(1), now), Duration::from_secs(1));
    }
}

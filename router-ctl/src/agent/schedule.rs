//! Where routers run: the scheduler's decision, a pure function of what etcd holds.
//!
//! A router gets one host (two with HA: an active and a standby), least-loaded live agents
//! first (fewest routers scheduled, then name). A host that is down keeps its routers for the
//! grace period (Neutron's `agent_down_time`: an agent restarting is not a failure); past it,
//! they move to live hosts. An HA router's roles are not the scheduler's business: its hosts
//! elect the active one among themselves.

use std::collections::{BTreeMap, BTreeSet};

use super::Schedule;

/// What changes: schedules to write, and schedule keys of routers that are gone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub put: BTreeMap<String, Schedule>,
    pub delete: Vec<String>,
}

/// `routers`: id → HA; `current`: the schedules; `live`: hosts with a live lease; `expired`:
/// hosts down for longer than the grace period.
pub fn plan(
    routers: &BTreeMap<String, bool>,
    current: &BTreeMap<String, Schedule>,
    live: &BTreeSet<String>,
    expired: &BTreeSet<String>,
) -> Plan {
    let mut out = Plan::default();
    let mut load: BTreeMap<&str, usize> = live.iter().map(|h| (h.as_str(), 0)).collect();
    let mut kept: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for id in routers.keys() {
        let hosts: Vec<String> = current
            .get(id)
            .map(|s| {
                s.hosts
                    .iter()
                    .filter(|h| !expired.contains(*h))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for h in &hosts {
            if let Some(n) = load.get_mut(h.as_str()) {
                *n += 1;
            }
        }
        kept.insert(id, hosts);
    }
    for (id, ha) in routers {
        let mut hosts = kept.remove(id.as_str()).unwrap_or_default();
        let want = if *ha { 2 } else { 1 };
        while hosts.len() < want {
            let pick = load
                .iter()
                .filter(|(h, _)| !hosts.iter().any(|x| x == *h))
                .min_by_key(|(h, n)| (**n, **h))
                .map(|(h, _)| h.to_string());
            let Some(h) = pick else { break };
            *load.get_mut(h.as_str()).expect("a live host") += 1;
            hosts.push(h);
        }
        let new = Schedule { hosts };
        if current.get(id) != Some(&new) && !new.hosts.is_empty() {
            out.put.insert(id.clone(), new);
        }
    }
    out.delete = current
        .keys()
        .filter(|id| !routers.contains_key(*id))
        .cloned()
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn sched(v: &[&str]) -> Schedule {
        Schedule {
            hosts: v.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn least_loaded_first_and_ha_gets_two_hosts() {
        let routers: BTreeMap<String, bool> = [("r1".into(), false), ("r2".into(), true)].into();
        let mut current = BTreeMap::new();
        current.insert("r0".to_string(), sched(&["a"]));
        let p = plan(&routers, &current, &set(&["a", "b", "c"]), &set(&[]));
        // r0 is gone: its schedule goes; it did not count as load for new routers either way.
        assert_eq!(p.delete, vec!["r0".to_string()]);
        assert_eq!(p.put["r1"], sched(&["a"]));
        assert_eq!(p.put["r2"], sched(&["b", "c"]));
    }

    #[test]
    fn load_counts_existing_schedules() {
        let routers: BTreeMap<String, bool> = [("r1".into(), false), ("r2".into(), false)].into();
        let current: BTreeMap<String, Schedule> = [("r1".to_string(), sched(&["a"]))].into();
        let p = plan(&routers, &current, &set(&["a", "b"]), &set(&[]));
        assert!(!p.put.contains_key("r1"), "unchanged");
        assert_eq!(p.put["r2"], sched(&["b"]));
    }

    #[test]
    fn a_down_host_keeps_its_routers_until_the_grace_period_ends() {
        let routers: BTreeMap<String, bool> = [("r1".into(), false), ("h".into(), true)].into();
        let current: BTreeMap<String, Schedule> = [
            ("r1".to_string(), sched(&["a"])),
            ("h".to_string(), sched(&["a", "b"])),
        ]
        .into();
        // a is down but within the grace period: nothing moves.
        let p = plan(&routers, &current, &set(&["b", "c"]), &set(&[]));
        assert_eq!(p, Plan::default());
        // Past it: the HA router gets a new second host (c, the least loaded), then r1 moves
        // to the least-loaded live host (b and c carry one each: by name).
        let p = plan(&routers, &current, &set(&["b", "c"]), &set(&["a"]));
        assert_eq!(p.put["h"], sched(&["b", "c"]));
        assert_eq!(p.put["r1"], sched(&["b"]));
    }

    #[test]
    fn no_live_host_schedules_nothing() {
        let routers: BTreeMap<String, bool> = [("r1".into(), true)].into();
        let p = plan(&routers, &BTreeMap::new(), &set(&[]), &set(&[]));
        assert!(p.put.is_empty());
        let p = plan(&routers, &BTreeMap::new(), &set(&["a"]), &set(&[]));
        assert_eq!(
            p.put["r1"],
            sched(&["a"]),
            "one host until a second appears"
        );
    }
}

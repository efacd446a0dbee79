//! NAT flows for the fast path, copied from the kernel's conntrack.
//!
//! The kernel decides every mapping: a flow's first packets go through the kernel path, whose
//! nftables rules (`kernel::nft`) SNAT or DNAT them and whose conntrack records the result.
//! The daemon follows conntrack's events (ctnetlink) in each router namespace with a gateway
//! and writes both directions of every NAT flow into the router's `NAT_FLOWS` map; the fast
//! path then translates the flow's packets itself. The kernel's entry stays the authority:
//!
//! - UDP and ICMP echo flows are copied when conntrack confirms them; TCP flows once they are
//!   ESTABLISHED (ASSURED), so that the kernel saw the whole handshake, and the fast path
//!   hands SYN, FIN and RST to the kernel: conntrack's TCP state stays true;
//! - flows the fast path carries have their kernel timeout refreshed (`refresh`), so the
//!   kernel never expires a flow in use; when it expires or deletes one (idle, closed,
//!   flushed), the event removes it from the map;
//! - the map is pinned: a restarted or upgraded daemon dumps conntrack and rewrites the map,
//!   and the kernel path carries every flow while no fast path runs, with the same mapping.

use std::{
    collections::HashMap as StdHashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use router_common::{map_names, nat_flags, NatFlow, NatKey};

use crate::{
    datapath,
    kernel::conntrack::{self, status, Conntrack, Event, Flow, Tuple, IPPROTO_ICMP, IPPROTO_TCP},
};

/// At most how long between two refreshes of the kernel's timeouts of flows in use (shorter
/// when the namespace's shortest timeout is short: a third of it, at least a second).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// How long the daemon gathers conntrack events after the first one of a burst.
pub const BATCH: Duration = Duration::from_millis(2);

/// How long an established TCP flow waits before it is copied: connections that end sooner
/// (most of a busy server's) never cost a map write.
pub const TCP_DELAY: Duration = Duration::from_millis(20);

/// The namespace's conntrack timeouts (seconds) for the flows the fast path carries: what a
/// packet passing through the kernel would set.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_established: u32,
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
}

impl Timeouts {
    /// Read in the calling thread's namespace (the kernel's defaults where unreadable).
    pub fn read() -> Timeouts {
        let get = |k: &str, d: u32| {
            crate::kernel::sysctl::get(&format!("net.netfilter.nf_conntrack_{k}"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(d)
        };
        Timeouts {
            tcp_established: get("tcp_timeout_established", 432_000),
            udp: get("udp_timeout", 30),
            udp_stream: get("udp_timeout_stream", 120),
            icmp: get("icmp_timeout", 30),
        }
    }

    fn of(&self, f: &Flow) -> u32 {
        match f.orig.proto {
            IPPROTO_TCP => self.tcp_established,
            conntrack::IPPROTO_UDP if f.status & status::SEEN_REPLY != 0 => self.udp_stream,
            conntrack::IPPROTO_UDP => self.udp,
            _ => self.icmp,
        }
    }

    /// How often to refresh.
    pub fn every(&self) -> Duration {
        let shortest = self
            .udp
            .min(self.icmp)
            .min(self.udp_stream)
            .min(self.tcp_established);
        Duration::from_secs((shortest / 3).max(1) as u64).min(REFRESH_EVERY)
    }
}

/// The fast path's key for one direction of a flow as conntrack writes it.
fn key_of(t: &Tuple) -> NatKey {
    let (sport, dport) = if t.proto == IPPROTO_ICMP {
        (t.sport.to_be_bytes(), [0, 0])
    } else {
        (t.sport.to_be_bytes(), t.dport.to_be_bytes())
    };
    NatKey {
        src: t.src.octets(),
        dst: t.dst.octets(),
        sport,
        dport,
        proto: t.proto,
        _pad: [0; 3],
    }
}

/// What a packet of direction `from` must become: the other direction, reversed.
fn flow_to(other: &Tuple, from: &Tuple) -> NatFlow {
    let (src, dst) = (other.dst, other.src);
    let (sport, dport) = if other.proto == IPPROTO_ICMP {
        (other.sport.to_be_bytes(), [0, 0])
    } else {
        (other.dport.to_be_bytes(), other.sport.to_be_bytes())
    };
    // What the counters call a source or destination translation: the address or port on that
    // side changed. An ICMP echo identifier belongs to neither side: it follows the addresses.
    let mut flags = 0;
    let from_key = key_of(from);
    let icmp = other.proto == IPPROTO_ICMP;
    if src.octets() != from_key.src || (!icmp && sport != from_key.sport) {
        flags |= nat_flags::SRC;
    }
    if dst.octets() != from_key.dst || (!icmp && dport != from_key.dport) {
        flags |= nat_flags::DST;
    }
    NatFlow {
        src: src.octets(),
        dst: dst.octets(),
        sport,
        dport,
        flags,
        used: 0,
    }
}

/// The two map entries of a NAT flow the fast path may carry (None: it is the kernel's:
/// no NAT, another protocol, ICMP other than echo, TCP not yet established, dying).
pub fn entries(f: &Flow) -> Option<[(NatKey, NatFlow); 2]> {
    if !f.nat() || f.status & status::DYING != 0 {
        return None;
    }
    match f.orig.proto {
        IPPROTO_TCP if f.status & status::ASSURED == 0 => return None,
        IPPROTO_TCP | conntrack::IPPROTO_UDP => {}
        IPPROTO_ICMP if f.orig.dport >> 8 == 8 => {}
        _ => return None,
    }
    Some([
        (key_of(&f.orig), flow_to(&f.reply, &f.orig)),
        (key_of(&f.reply), flow_to(&f.orig, &f.reply)),
    ])
}

/// A router's flow map and what was written to it.
pub struct NatSync {
    pub router: String,
    ct: Conntrack,
    map: HashMap<MapData, NatKey, NatFlow>,
    installed: StdHashMap<Tuple, (Flow, [NatKey; 2])>,
    /// Established TCP flows waiting out `TCP_DELAY`, by when they are due.
    pending: StdHashMap<Tuple, (Instant, Flow)>,
    last_refresh: Instant,
    timeouts: Timeouts,
    timeouts_read: Instant,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one timespec. The coarse clock is the one bpf_ktime_get_coarse_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl NatSync {
    /// Subscribes to conntrack's events in the calling thread's namespace, then copies every
    /// NAT flow the table has (subscribe first: an event racing the dump is applied after it).
    pub fn open(router: &str) -> Result<NatSync> {
        let ct = Conntrack::open(
            conntrack::GROUP_NEW | conntrack::GROUP_UPDATE | conntrack::GROUP_DESTROY,
        )?;
        let map = HashMap::try_from(Map::HashMap(datapath::open_pinned(
            router,
            map_names::NAT_FLOWS,
        )?))?;
        let mut s = NatSync {
            router: router.to_string(),
            ct,
            map,
            installed: StdHashMap::new(),
            pending: StdHashMap::new(),
            last_refresh: Instant::now(),
            timeouts: Timeouts::read(),
            timeouts_read: Instant::now(),
        };
        s.resync()?;
        Ok(s)
    }

    /// Rewrites the map from a dump of the kernel's table: every entry the map holds when
    /// `whole` (a daemon starting on a pinned map), else the flows this process installed.
    pub fn resync_with(&mut self, whole: bool) -> Result<()> {
        let mut dumper = Conntrack::open(0)?;
        let flows = dumper.dump().context("dumping conntrack")?;
        let mut keep = std::collections::HashSet::new();
        for f in &flows {
            if let Some(e) = entries(f) {
                self.install(f, e);
                keep.insert(e[0].0);
                keep.insert(e[1].0);
            }
        }
        let stale: Vec<NatKey> = if whole {
            self.map
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !keep.contains(k))
                .collect()
        } else {
            self.installed
                .values()
                .flat_map(|(_, k)| *k)
                .filter(|k| !keep.contains(k))
                .collect()
        };
        for k in &stale {
            let _ = self.map.remove(k);
        }
        self.installed
            .retain(|_, (_, keys)| keep.contains(&keys[0]));
        tracing::debug!(router = %self.router, flows = self.installed.len(), removed = stale.len(), "NAT flows synced with conntrack");
        Ok(())
    }

    pub fn resync(&mut self) -> Result<()> {
        self.resync_with(true)
    }

    fn install(&mut self, f: &Flow, e: [(NatKey, NatFlow); 2]) {
        if self.installed.contains_key(&f.orig) {
            return;
        }
        for (k, v) in &e {
            if let Err(err) = self.map.insert(k, v, 0) {
                tracing::warn!(router = %self.router, error = %err, "NAT flow map full or unwritable; the kernel keeps carrying the flow");
                let _ = self.map.remove(&e[0].0);
                return;
            }
        }
        self.installed.insert(f.orig, (f.clone(), [e[0].0, e[1].0]));
    }

    fn forget(&mut self, orig: &Tuple) {
        if let Some((_, keys)) = self.installed.remove(orig) {
            for k in &keys {
                let _ = self.map.remove(k);
            }
        }
    }

    /// Waits for conntrack events (at most `timeout_ms`, and at most until the next refresh is
    /// due) and applies them, refreshing timeouts when due; returns as soon as `wake` becomes
    /// readable. Lost events (a socket overrun) lead to a full resync: a router's flows cost one wake-up per refresh period when
    /// nothing happens.
    pub fn step_or_wake(&mut self, timeout_ms: i32, wake: std::os::fd::RawFd) -> Result<()> {
        let mut due = self
            .timeouts
            .every()
            .saturating_sub(self.last_refresh.elapsed());
        if let Some(first) = self.pending.values().map(|(t, _)| *t).min() {
            due = due.min(first.saturating_duration_since(Instant::now()));
        }
        let timeout_ms = timeout_ms.min(due.as_millis() as i32 + 1);
        if self.ct.wait_or_wake(timeout_ms, wake) {
            // Events come in bursts when connections come quickly: gather them for a moment,
            // so that one wake-up handles many (a new flow reaches the fast path 2 ms later
            // at most; its packets take the kernel path meanwhile).
            std::thread::sleep(BATCH);
        }
        match self.ct.events_or_wake(0, wake) {
            Ok(events) => {
                for ev in events {
                    match ev {
                        Event::New(f) | Event::Update(f) if f.orig.proto == IPPROTO_TCP => {
                            if entries(&f).is_some() && !self.installed.contains_key(&f.orig) {
                                self.pending
                                    .entry(f.orig)
                                    .or_insert((Instant::now() + TCP_DELAY, f));
                            }
                        }
                        Event::New(f) | Event::Update(f) => {
                            if let Some(e) = entries(&f) {
                                self.install(&f, e);
                            }
                        }
                        Event::Destroy(f) => {
                            self.pending.remove(&f.orig);
                            self.forget(&f.orig);
                        }
                    }
                }
            }
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(|e| e.raw_os_error())
                    == Some(libc::ENOBUFS) =>
            {
                tracing::warn!(router = %self.router, "conntrack events were lost; reading the table again");
                self.resync()?;
            }
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        let ready: Vec<Tuple> = self
            .pending
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in ready {
            if let Some((_, f)) = self.pending.remove(&k) {
                if let Some(e) = entries(&f) {
                    self.install(&f, e);
                }
            }
        }
        // The namespace's timeouts may be tuned at any time: read again every second.
        if self.timeouts_read.elapsed() >= Duration::from_secs(1) {
            self.timeouts = Timeouts::read();
            self.timeouts_read = Instant::now();
        }
        if self.last_refresh.elapsed() >= self.timeouts.every() && !cfg!(mutant = "nat_no_refresh")
        {
            self.refresh()?;
            // The kernel reaps expired entries lazily (and only then says so): a dump reaps
            // them at once, and the map is brought in line with what is left. A flow that
            // went idle thus leaves the fast path within a refresh period of its expiry.
            self.resync_with(false)?;
            self.last_refresh = Instant::now();
        }
        Ok(())
    }

    /// Gives the kernel's entry of every flow the fast path carried lately its full timeout
    /// again, as its packets would have in the kernel path.
    pub fn refresh(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let recent = 2 * self.timeouts.every().as_nanos() as u64;
        let mut due = Vec::new();
        for (orig, (f, keys)) in &self.installed {
            let used = keys
                .iter()
                .filter_map(|k| self.map.get(k, 0).ok())
                .map(|v| v.used)
                .max()
                .unwrap_or(0);
            if used != 0 && now.saturating_sub(used) < recent {
                due.push((*orig, self.timeouts.of(f)));
            }
        }
        for (orig, secs) in &due {
            self.ct
                .set_timeout(orig, *secs)
                .with_context(|| format!("refreshing the conntrack timeout of {orig:?}"))?;
        }
        // Gone from the kernel (expired, flushed): the fast path must not carry it on with a
        // mapping the kernel no longer reserves. (`resync` finds them; see `step`.)
        Ok(due.len())
    }
}

/// One entry of a router's flow map, for `router-ctl nat`.
#[derive(Debug, serde::Serialize)]
pub struct FlowEntry {
    pub proto: &'static str,
    pub from: String,
    pub to: String,
    pub translated: &'static str,
    /// Seconds since the fast path last carried a packet of it (None: never).
    pub idle_s: Option<u64>,
}

/// The flows in a router's map, both directions.
pub fn list(router: &str) -> Result<Vec<FlowEntry>> {
    let map: HashMap<MapData, NatKey, NatFlow> = HashMap::try_from(Map::HashMap(
        datapath::open_pinned(router, map_names::NAT_FLOWS)?,
    ))?;
    let now = monotonic_ns();
    let ep = |a: [u8; 4], p: [u8; 2], proto: u8| {
        if proto == IPPROTO_ICMP {
            format!("{} id {}", Ipv4Addr::from(a), u16::from_be_bytes(p))
        } else {
            format!("{}:{}", Ipv4Addr::from(a), u16::from_be_bytes(p))
        }
    };
    let mut v = Vec::new();
    for e in map.iter() {
        let (k, f) = e?;
        v.push(FlowEntry {
            proto: match k.proto {
                IPPROTO_TCP => "tcp",
                conntrack::IPPROTO_UDP => "udp",
                _ => "icmp",
            },
            from: format!(
                "{} → {}",
                ep(k.src, k.sport, k.proto),
                ep(k.dst, k.dport, k.proto).replace(" id 0", "")
            ),
            to: format!(
                "{} → {}",
                ep(f.src, f.sport, k.proto),
                ep(f.dst, f.dport, k.proto).replace(" id 0", "")
            ),
            translated: match (f.flags & nat_flags::SRC != 0, f.flags & nat_flags::DST != 0) {
                (true, true) => "source,destination",
                (true, false) => "source",
                (false, true) => "destination",
                _ => "-",
            },
            idle_s: (f.used != 0).then(|| now.saturating_sub(f.used) / 1_000_000_000),
        });
    }
    v.sort_by(|a, b| (a.proto, &a.from).cmp(&(b.proto, &b.from)));
    Ok(v)
}

/// Removes from a router's flow map every entry through `addr` (before or after translation),
/// as soon as its kernel flows are flushed: the fast path must not carry on with a floating
/// IP's old mapping until the daemon hears of the flush. Returns how many; none when the
/// router has no map yet.
pub fn purge_address(router: &str, addr: Ipv4Addr) -> Result<usize> {
    let Ok(data) = datapath::open_pinned(router, map_names::NAT_FLOWS) else {
        return Ok(0);
    };
    let mut map: HashMap<MapData, NatKey, NatFlow> = HashMap::try_from(Map::HashMap(data))?;
    let a = addr.octets();
    let gone: Vec<NatKey> = map
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(k, f)| k.src == a || k.dst == a || f.src == a || f.dst == a)
        .map(|(k, _)| k)
        .collect();
    for k in &gone {
        let _ = map.remove(k);
    }
    Ok(gone.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> Tuple {
        Tuple {
            src: src.into(),
            dst: dst.into(),
            proto,
            sport,
            dport,
        }
    }

    #[test]
    fn snat_flow_gives_both_directions() {
        // vm1:40000 → 203.0.113.5:53, SNATed to 192.168.1.10:61000.
        let f = Flow {
            orig: t([172, 16, 100, 3], 40000, [203, 0, 113, 5], 53, 17),
            reply: t([203, 0, 113, 5], 53, [192, 168, 1, 10], 61000, 17),
            status: status::SRC_NAT | status::CONFIRMED,
            timeout: Some(30),
        };
        let [(k0, v0), (k1, v1)] = entries(&f).unwrap();
        assert_eq!(
            (k0.src, k0.sport),
            ([172, 16, 100, 3], 40000u16.to_be_bytes())
        );
        assert_eq!(
            (v0.src, v0.sport, v0.dst, v0.dport),
            (
                [192, 168, 1, 10],
                61000u16.to_be_bytes(),
                [203, 0, 113, 5],
                53u16.to_be_bytes()
            )
        );
        assert_eq!(v0.flags, nat_flags::SRC);
        assert_eq!(
            (k1.dst, k1.dport),
            ([192, 168, 1, 10], 61000u16.to_be_bytes())
        );
        assert_eq!(
            (v1.dst, v1.dport, v1.src),
            ([172, 16, 100, 3], 40000u16.to_be_bytes(), [203, 0, 113, 5])
        );
        assert_eq!(v1.flags, nat_flags::DST);
        // TCP waits for ESTABLISHED; no NAT, or ICMP other than echo: the kernel's.
        let tcp = Flow {
            orig: Tuple { proto: 6, ..f.orig },
            reply: Tuple {
                proto: 6,
                ..f.reply
            },
            ..f.clone()
        };
        assert!(entries(&tcp).is_none());
        assert!(entries(&Flow {
            status: tcp.status | status::ASSURED,
            ..tcp
        })
        .is_some());
        assert!(entries(&Flow {
            status: status::CONFIRMED,
            ..f.clone()
        })
        .is_none());
    }

    #[test]
    fn icmp_echo_translates_the_identifier() {
        let f = Flow {
            orig: t([203, 0, 113, 5], 7, [192, 168, 1, 20], 8 << 8, 1),
            reply: t([172, 16, 101, 3], 7, [203, 0, 113, 5], 0, 1),
            status: status::DST_NAT,
            timeout: None,
        };
        let [(k0, v0), (k1, v1)] = entries(&f).unwrap();
        assert_eq!(
            (k0.dst, k0.sport, k0.dport),
            ([192, 168, 1, 20], 7u16.to_be_bytes(), [0, 0])
        );
        assert_eq!(
            (v0.dst, v0.sport, v0.flags),
            ([172, 16, 101, 3], 7u16.to_be_bytes(), nat_flags::DST)
        );
        assert_eq!(
            (k1.src, v1.src, v1.flags),
            ([172, 16, 101, 3], [192, 168, 1, 20], nat_flags::SRC)
        );
        let unreachable = Flow {
            orig: Tuple {
                dport: 13 << 8,
                ..f.orig
            },
            ..f
        };
        assert!(entries(&unreachable).is_none());
    }
}

//! NAT flows for the fast path, copied from the kernel's conntrack on demand.
//!
//! The kernel decides every mapping: a flow's first packets go through the kernel path, whose
//! nftables rules (`kernel::nft`) SNAT or DNAT them and whose conntrack records the result.
//! The fast path reports a flow whose packets keep coming to the kernel for want of a copy
//! (`NAT_MISSES`, see `router_common::nat`); the daemon asks conntrack for that one tuple and
//! writes both directions of the flow into the router's `NAT_FLOWS` map when it is a NAT flow
//! the fast path may carry (UDP, ICMP echo, TCP once established). The kernel's entry stays the
//! authority, and no event is asked of conntrack: a short connection costs the kernel nothing
//! it would not spend without this router.
//!
//! - every copy carries the generation of its flow's `NAT_GEN` slot, read before conntrack
//!   was asked, and a time before which the kernel's entry cannot have expired; the fast path
//!   uses a copy only while both hold, and moves the generation on when a TCP connection
//!   starts or a known one ends (so a reused client port never meets a closed connection's
//!   mapping, however late this daemon writes);
//! - flows the fast path carries have their kernel timeout refreshed (`refresh`), and only
//!   then their copies' time extended; a flow the kernel no longer has (flushed, deleted)
//!   loses its copies at the next refresh, within `REFRESH_EVERY`;
//! - the map is pinned: a restarted or upgraded daemon keeps the copies conntrack still
//!   holds, and the kernel path carries every flow while no fast path runs, with the same
//!   mapping.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use router_common::{
    map_names,
    nat::{gen_slot, hint_bit, learned_check, HINT_WORDS, LEARN_SLOTS},
    nat_flags, LearnedFlow, NatFlow, NatKey,
};

use crate::{
    datapath,
    guard::{Evidence, Guard},
    kernel::conntrack::{
        self, status, Conntrack, Flow, Tuple, IPPROTO_ICMP, IPPROTO_TCP, TCP_CONNTRACK_ESTABLISHED,
    },
};

/// At most how long between two refreshes of the kernel's timeouts of flows in use (shorter
/// when the namespace's shortest timeout is short: a third of it, at least a second).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// How long before the kernel's entry could expire a copy stops being used. The kernel's
/// deadline is at least the time before conntrack was asked plus the whole seconds it said
/// were left (it rounds down); the program and the daemon read the same coarse monotonic clock,
/// and the kernel counts in jiffies: a few ticks cover both.
const MARGIN_NS: u64 = 50_000_000;

/// Most reports a router's sync asks conntrack about in a second: a flood of traffic the
/// fast path reports but cannot have copied (to the router's own addresses, say) must not take
/// a processor; reports beyond are dropped (the fast path reports a flow again).
pub const ASKS_PER_SECOND: u32 = 20_000;

/// Longest use of a copy under foreign rules without a refresh (the daemon refreshes every
/// `REFRESH_EVERY` at most).
const GUARDED_HOLD: Duration = Duration::from_secs(15);

/// `BPF_EXIST`: update an element only if it is there (the fast path may have retired it).
const BPF_EXIST: u64 = 2;

/// The namespace's conntrack timeouts (seconds) for the flows the fast path carries: what a
/// packet passing through the kernel would set.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_established: u32,
    /// A connection's entry between its SYN-ACK and the client's ACK.
    pub tcp_syn_recv: u32,
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
    /// `nf_conntrack_tcp_be_liberal`: conntrack accepts TCP segments outside the window it
    /// last saw (those the fast path carried in between did not move it).
    pub tcp_liberal: bool,
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
            tcp_syn_recv: get("tcp_timeout_syn_recv", 60),
            udp: get("udp_timeout", 30),
            udp_stream: get("udp_timeout_stream", 120),
            icmp: get("icmp_timeout", 30),
            tcp_liberal: get("tcp_be_liberal", 0) == 1,
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

    /// How long (ns) the program may use a flow it learned from a handshake after the SYN-ACK
    /// went by (see `router_common::nat`): the kernel's entry lives that long whether or not the
    /// client's ACK reached conntrack, and the kernel forgetting the flow (a flush) is noticed
    /// no later than for a copy; 0 (no learning) without a liberal conntrack.
    pub fn learn_ns(&self) -> u64 {
        if !self.tcp_liberal {
            return 0;
        }
        let secs = self
            .tcp_syn_recv
            .min(self.tcp_established)
            .min(self.every().as_secs() as u32) as u64;
        (secs * 1_000_000_000).saturating_sub(MARGIN_NS)
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
pub fn key_of(t: &Tuple) -> NatKey {
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

/// The conntrack tuple of a packet with key `k`: as its flow's original direction (an ICMP
/// echo request) or as the reply direction (an echo reply).
fn tuple_of(k: &NatKey, reply: bool) -> Tuple {
    let (sport, dport) = if k.proto == IPPROTO_ICMP {
        // Type << 8 | code: echo request (8) one way, echo reply (0) the other.
        (u16::from_be_bytes(k.sport), if reply { 0 } else { 8 << 8 })
    } else {
        (u16::from_be_bytes(k.sport), u16::from_be_bytes(k.dport))
    };
    Tuple {
        src: Ipv4Addr::from(k.src),
        dst: Ipv4Addr::from(k.dst),
        proto: k.proto,
        sport,
        dport,
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
        // Set by `entries` and `NatSync::copy`.
        slot: 0,
        gen: 0,
        used: 0,
        until: 0,
    }
}

/// The two map entries of a NAT flow the fast path may carry, their generation slot that of
/// the original direction (None: it is the kernel's: no NAT, another protocol, ICMP other
/// than echo, TCP not established, dying). `any`: flows without translation too (a router
/// under foreign rules, see `crate::guard`).
pub fn entries(f: &Flow, any: bool) -> Option<[(NatKey, NatFlow); 2]> {
    if !(f.nat() || any) || f.status & status::DYING != 0 {
        return None;
    }
    match f.orig.proto {
        IPPROTO_TCP if f.tcp_state != Some(TCP_CONNTRACK_ESTABLISHED) => return None,
        IPPROTO_TCP | conntrack::IPPROTO_UDP => {}
        IPPROTO_ICMP if f.orig.dport >> 8 == 8 => {}
        _ => return None,
    }
    let slot = gen_slot(&key_of(&f.orig));
    let mut e = [
        (key_of(&f.orig), flow_to(&f.reply, &f.orig)),
        (key_of(&f.reply), flow_to(&f.orig, &f.reply)),
    ];
    for (_, v) in &mut e {
        v.slot = slot;
    }
    Some(e)
}

/// A flow this daemon copied.
struct Copied {
    flow: Flow,
    keys: [NatKey; 2],
}

/// A router's flow map, its reports, and what was written to the map.
pub struct NatSync {
    pub router: String,
    ct: Conntrack,
    /// The namespace's foreign netfilter rules, followed.
    guard: Guard,
    /// The flows the kernel forwarded, read at most once per step (None: not yet).
    evidence: Option<Evidence>,
    conf: Array<MapData, u32>,
    /// `NAT_LEARN` (None: the router's programs were loaded by a build without it).
    learn: Option<Array<MapData, u64>>,
    /// The router's own `nat_conf` bits (`ON` with a translating gateway).
    nat_on: bool,
    map: HashMap<MapData, NatKey, NatFlow>,
    gens: Array<MapData, u32>,
    hints: Array<MapData, u64>,
    misses: RingBuf<MapData>,
    installed: StdHashMap<Tuple, Copied>,
    /// Asks left in the current second, and when it started.
    asks: (u32, Instant),
    /// Reports dropped for want of asks (logged once a second at most).
    dropped: u64,
    last_refresh: Instant,
    timeouts: Timeouts,
    timeouts_read: Instant,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one timespec. The coarse clock is the one bpf_ktime_get_coarse_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl NatSync {
    /// Opens the router's maps and a conntrack socket in the calling thread's namespace, and
    /// keeps the copies a previous daemon left that conntrack still holds, with their mapping
    /// (the others are deleted; all of them under foreign rules, which may have changed while
    /// no daemon followed them).
    pub fn open(router: &str, nat_on: bool) -> Result<NatSync> {
        let pinned = |name| datapath::open_pinned(router, name);
        let mut s = NatSync {
            router: router.to_string(),
            ct: Conntrack::open(0)?,
            guard: Guard::open()?,
            evidence: None,
            conf: Array::try_from(Map::Array(pinned(map_names::NAT_CONF)?))?,
            learn: pinned(map_names::NAT_LEARN)
                .ok()
                .and_then(|m| Array::try_from(Map::Array(m)).ok()),
            nat_on,
            map: HashMap::try_from(Map::HashMap(pinned(map_names::NAT_FLOWS)?))?,
            gens: Array::try_from(Map::Array(pinned(map_names::NAT_GEN)?))?,
            hints: Array::try_from(Map::Array(pinned(map_names::NAT_HINT)?))?,
            misses: RingBuf::try_from(Map::RingBuf(pinned(map_names::NAT_MISSES)?))?,
            installed: StdHashMap::new(),
            asks: (ASKS_PER_SECOND, Instant::now()),
            dropped: 0,
            last_refresh: Instant::now(),
            timeouts: Timeouts::read(),
            timeouts_read: Instant::now(),
        };
        s.write_conf()?;
        s.write_learn()?;
        if s.guard.guarded() {
            s.forget_all()?;
        } else {
            s.adopt()?;
        }
        Ok(s)
    }

    /// Writes the router's `nat_conf` bits as its gateway and its namespace's rules say.
    fn write_conf(&mut self) -> Result<()> {
        let bits = crate::guard::conf_bits(self.nat_on, &self.guard.foreign);
        if self.conf.get(&0, 0).ok() != Some(bits) {
            self.conf.set(0, bits, 0).context("writing NAT_CONF")?;
            if self.guard.guarded() {
                tracing::info!(router = %self.router, rules = %self.guard.foreign.describe(), "foreign netfilter rules on the forwarding path: the fast path carries only flows the kernel forwarded under them");
            } else {
                tracing::info!(router = %self.router, "no foreign netfilter rules on the forwarding path any more");
            }
        }
        Ok(())
    }

    /// Writes how long the program may use a flow it learned from a handshake: never under
    /// foreign rules (only flows the kernel forwarded under them are carried, see
    /// `crate::guard`), else as the namespace's timeouts allow (`Timeouts::learn_ns`).
    fn write_learn(&mut self) -> Result<()> {
        let ns = if self.guard.guarded() || !self.nat_on {
            0
        } else {
            self.timeouts.learn_ns()
        };
        if let Some(m) = &mut self.learn {
            if m.get(&0, 0).ok() != Some(ns) {
                m.set(0, ns, 0).context("writing NAT_LEARN")?;
            }
        }
        Ok(())
    }

    /// The namespace's rules changed: the fast path stops carrying every flow at once (the
    /// map keeps no copy, and `GUARDED` is set before the rules are read again), the records
    /// of what the kernel forwarded start empty, and the bits follow the rules now in force.
    fn rules_changed(&mut self) -> Result<()> {
        if let Some(m) = &mut self.learn {
            m.set(0, 0, 0).context("writing NAT_LEARN")?;
        }
        let now = self.conf.get(&0, 0).unwrap_or(0);
        if now & router_common::nat_conf::GUARDED == 0 {
            self.conf
                .set(0, now | router_common::nat_conf::GUARDED, 0)
                .context("writing NAT_CONF")?;
        }
        if !cfg!(mutant = "guard_keeps_copies") {
            self.forget_all()?;
        }
        self.guard.assess()?;
        self.evidence = None;
        self.write_conf()?;
        self.write_learn()?;
        tracing::info!(router = %self.router, rules = %self.guard.foreign.describe(), "netfilter rules changed; flow copies dropped");
        Ok(())
    }

    /// Deletes every copy in the map, this daemon's and any other's, and every flow the
    /// program learned.
    fn forget_all(&mut self) -> Result<()> {
        let keys: Vec<NatKey> = self.map.keys().filter_map(|k| k.ok()).collect();
        for k in &keys {
            let _ = self.map.remove(k);
        }
        clear_learned(&self.router, |_| true)?;
        self.installed.clear();
        self.write_hints()
    }

    /// Keeps the map's copies of flows conntrack holds with the same mapping, deletes the rest.
    fn adopt(&mut self) -> Result<()> {
        let flows = self.ct.dump().context("dumping conntrack")?;
        let mut keep = HashSet::new();
        for f in &flows {
            let Some(e) = entries(f, false) else { continue };
            let same = e.iter().all(|(k, want)| {
                self.map.get(k, 0).is_ok_and(|v| {
                    (v.src, v.dst, v.sport, v.dport, v.slot)
                        == (want.src, want.dst, want.sport, want.dport, want.slot)
                })
            });
            if same {
                keep.insert(e[0].0);
                keep.insert(e[1].0);
                self.installed.insert(
                    f.orig,
                    Copied {
                        flow: f.clone(),
                        keys: [e[0].0, e[1].0],
                    },
                );
            }
        }
        let stale: Vec<NatKey> = self
            .map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !keep.contains(k))
            .collect();
        for k in &stale {
            let _ = self.map.remove(k);
        }
        self.write_hints()?;
        tracing::debug!(router = %self.router, kept = self.installed.len(), removed = stale.len(), "NAT flows checked against conntrack");
        Ok(())
    }

    /// Sets the hint bits of `keys` (before their entries are written: the program looks up
    /// only keys whose bit is set).
    fn hint(&mut self, keys: &[NatKey]) -> Result<()> {
        for k in keys {
            let (w, bit) = hint_bit(k);
            let old = self.hints.get(&w, 0).unwrap_or(0);
            if old & bit == 0 {
                self.hints
                    .set(w, old | bit, 0)
                    .context("setting a NAT hint bit")?;
            }
        }
        Ok(())
    }

    /// Rewrites the hint bits from the copies this daemon keeps, clearing the bits of keys no
    /// longer held (the only writer of `NAT_FLOWS` entries is this thread: none can be written
    /// meanwhile; the flows the program learns have no hint bits).
    fn write_hints(&mut self) -> Result<()> {
        let mut words = vec![0u64; HINT_WORDS as usize];
        for c in self.installed.values() {
            for k in &c.keys {
                let (w, bit) = hint_bit(k);
                words[w as usize] |= bit;
            }
        }
        for (i, w) in words.iter().enumerate() {
            let i = i as u32;
            if self.hints.get(&i, 0).unwrap_or(0) != *w {
                self.hints.set(i, *w, 0).context("writing the NAT hints")?;
            }
        }
        Ok(())
    }

    /// How long (ns) a copy may be used after conntrack said `secs` were left: as long as the
    /// kernel holds the entry, and under foreign rules no longer than `GUARDED_HOLD`, so that a
    /// copy outlives its daemon (which follows the rules) only briefly.
    fn hold(&self, secs: u32) -> u64 {
        let kernel = secs as u64 * 1_000_000_000;
        if self.guard.guarded() {
            kernel.min(GUARDED_HOLD.as_nanos() as u64)
        } else {
            kernel
        }
    }

    fn gen(&self, slot: u32) -> u32 {
        self.gens.get(&slot, 0).unwrap_or(0)
    }

    /// Copies the flow of a packet with key `k` (reported by the fast path) when conntrack has
    /// it and the fast path may carry it. The generation is read before conntrack is asked.
    pub fn copy(&mut self, k: &NatKey) -> Result<bool> {
        let mut gen = self.gen(gen_slot(k));
        let mut asked = monotonic_ns();
        let found = match self.ct.get(&tuple_of(k, false), false)? {
            Some(f) => Some(f),
            None => self.ct.get(&tuple_of(k, true), true)?,
        };
        let Some(mut flow) = found else {
            return Ok(false);
        };
        // conntrack finds a flow by the tuple of either direction (TCP and UDP answer the
        // first question for a reply too): when `k` is not the original direction, the
        // generation is the original direction's, read before conntrack is asked again.
        if key_of(&flow.orig) != *k {
            gen = self.gen(gen_slot(&key_of(&flow.orig)));
            asked = monotonic_ns();
            match self.ct.get(&flow.orig, false)? {
                Some(f) => flow = f,
                None => return Ok(false),
            }
        }
        let guarded = self.guard.guarded();
        let (Some(mut e), Some(secs)) = (entries(&flow, guarded), flow.timeout) else {
            return Ok(false);
        };
        if guarded {
            if !self.guard.may_copy() {
                return Ok(false);
            }
            // Without a liberal conntrack, the segments that come back to the kernel after
            // the fast path carried a connection's middle (its FIN, a retransmission) fall
            // outside the window conntrack last saw: marked invalid, they escape the rules and
            // NAT (and a rule may drop them). TCP stays the kernel's then.
            if flow.orig.proto == IPPROTO_TCP
                && !self.timeouts.tcp_liberal
                && !cfg!(mutant = "guard_strict_tcp_copied")
            {
                return Ok(false);
            }
            if self.evidence.is_none() {
                self.evidence = Some(self.guard.evidence()?);
            }
            if !self.evidence.as_ref().is_some_and(|ev| ev.both_ways(&flow)) {
                return Ok(false);
            }
        }
        let Some(until) = (asked + self.hold(secs)).checked_sub(MARGIN_NS) else {
            return Ok(false);
        };
        if until <= monotonic_ns() {
            return Ok(false);
        }
        self.hint(&[e[0].0, e[1].0])?;
        for (key, v) in &mut e {
            v.gen = gen;
            v.until = until;
            if let Err(err) = self.map.insert(*key, *v, 0) {
                tracing::warn!(router = %self.router, error = %err, "NAT flow map full or unwritable; the kernel keeps carrying the flow");
                let _ = self.map.remove(&e[0].0);
                return Ok(false);
            }
        }
        self.installed.insert(
            flow.orig,
            Copied {
                flow,
                keys: [e[0].0, e[1].0],
            },
        );
        Ok(true)
    }

    fn forget(&mut self, orig: &Tuple) {
        if let Some(c) = self.installed.remove(orig) {
            for k in &c.keys {
                let _ = self.map.remove(k);
            }
        }
    }

    /// Waits for the fast path's reports (at most `timeout_ms`, and at most until the next
    /// refresh is due), copies the flows reported, and refreshes when due; returns as soon as
    /// `wake` becomes readable.
    pub fn step_or_wake(&mut self, timeout_ms: i32, wake: std::os::fd::RawFd) -> Result<()> {
        let due = self
            .timeouts
            .every()
            .saturating_sub(self.last_refresh.elapsed());
        let timeout_ms = timeout_ms.min(due.as_millis() as i32 + 1);
        let mut pfd = [
            libc::pollfd {
                fd: self.misses.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.guard.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: three pollfds (a negative fd is ignored by poll).
        unsafe { libc::poll(pfd.as_mut_ptr(), 3, timeout_ms) };
        // Rules first: no copy is made under rules that are no longer in force.
        if self.guard.changed() {
            self.rules_changed()?;
        }
        self.evidence = None;
        let mut reported = Vec::new();
        while let Some(item) = self.misses.next() {
            if item.len() >= std::mem::size_of::<NatKey>() {
                // SAFETY: the program writes whole `NatKey`s; read unaligned.
                let k = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const NatKey) };
                reported.push(k);
            }
        }
        reported.sort();
        reported.dedup();
        if self.asks.1.elapsed() >= Duration::from_secs(1) {
            if self.dropped > 0 {
                tracing::info!(router = %self.router, dropped = self.dropped, "more NAT flows reported than conntrack is asked about in a second; the kernel carries the rest until they are reported again");
            }
            self.asks = (ASKS_PER_SECOND, Instant::now());
            self.dropped = 0;
        }
        for k in &reported {
            if self.asks.0 == 0 {
                self.dropped += 1;
                continue;
            }
            self.asks.0 -= 1;
            self.copy(k)
                .with_context(|| format!("copying the NAT flow of {k:?} from conntrack"))?;
        }
        // The namespace's timeouts may be tuned at any time: read again every second.
        if self.timeouts_read.elapsed() >= Duration::from_secs(1) {
            self.timeouts = Timeouts::read();
            self.timeouts_read = Instant::now();
            self.write_learn()?;
        }
        if self.last_refresh.elapsed() >= self.timeouts.every() {
            self.refresh()?;
            self.last_refresh = Instant::now();
        }
        Ok(())
    }

    /// Gives the kernel's entry of every flow the fast path carried lately its full timeout
    /// again, as its packets would have in the kernel path, and then extends its copies' time;
    /// forgets copies the fast path retired or can no longer use, and flows the kernel no
    /// longer has. Returns how many flows were refreshed.
    pub fn refresh(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let recent = 2 * self.timeouts.every().as_nanos() as u64;
        let (mut due, mut gone) = (Vec::new(), Vec::new());
        for (orig, c) in &self.installed {
            let vals: Vec<NatFlow> = c
                .keys
                .iter()
                .filter_map(|k| self.map.get(k, 0).ok())
                .collect();
            let usable = vals.len() == 2
                && vals
                    .iter()
                    .all(|v| v.until > now && self.gen(v.slot) == v.gen);
            if !usable {
                gone.push(*orig);
                continue;
            }
            let used = vals.iter().map(|v| v.used).max().unwrap_or(0);
            if used != 0 && now.saturating_sub(used) < recent && !cfg!(mutant = "nat_no_refresh") {
                due.push((*orig, self.timeouts.of(&c.flow)));
            }
        }
        for orig in &gone {
            self.forget(orig);
        }
        if !gone.is_empty() {
            self.write_hints()?;
        }
        for (orig, secs) in &due {
            let asked = monotonic_ns();
            let held = self
                .ct
                .set_timeout(orig, *secs)
                .with_context(|| format!("refreshing the conntrack timeout of {orig:?}"))?;
            if !held {
                // Flushed or deleted: the fast path must not go on with a mapping the kernel
                // no longer reserves.
                self.forget(orig);
                continue;
            }
            let until = (asked + self.hold(*secs)).saturating_sub(MARGIN_NS);
            if let Some(c) = self.installed.get(orig) {
                for k in &c.keys {
                    if let Ok(mut v) = self.map.get(k, 0) {
                        v.until = until;
                        // Only if the fast path has not retired it meanwhile.
                        let _ = self.map.insert(*k, v, BPF_EXIST);
                    }
                }
            }
        }
        Ok(due.len())
    }
}

/// One entry of a router's flow map, for `router-ctl nat`.
#[derive(Debug, serde::Serialize)]
pub struct FlowEntry {
    /// "copied" (by the daemon, from conntrack) or "learned" (by the program, from the
    /// handshake).
    pub source: &'static str,
    pub proto: &'static str,
    pub from: String,
    pub to: String,
    pub translated: &'static str,
    /// Seconds since the fast path last carried a packet of it (None: never).
    pub idle_s: Option<u64>,
}

/// The flows in a router's map the fast path may use (valid copies), both directions.
pub fn list(router: &str) -> Result<Vec<FlowEntry>> {
    let map: HashMap<MapData, NatKey, NatFlow> = HashMap::try_from(Map::HashMap(
        datapath::open_pinned(router, map_names::NAT_FLOWS)?,
    ))?;
    // A router set up before generations existed has none: every copy counts as valid then.
    let gens: Option<Array<MapData, u32>> = datapath::open_pinned(router, map_names::NAT_GEN)
        .ok()
        .and_then(|m| Array::try_from(Map::Array(m)).ok());
    let now = monotonic_ns();
    let ep = |a: [u8; 4], p: [u8; 2], proto: u8| {
        if proto == IPPROTO_ICMP {
            format!("{} id {}", Ipv4Addr::from(a), u16::from_be_bytes(p))
        } else {
            format!("{}:{}", Ipv4Addr::from(a), u16::from_be_bytes(p))
        }
    };
    let mut entries = Vec::new();
    for e in map.iter() {
        let (k, f) = e?;
        entries.push(("copied", k, f));
    }
    for (k, f) in learned(router)? {
        entries.push(("learned", k, f));
    }
    let mut v = Vec::new();
    for (source, k, f) in entries {
        let current = gens
            .as_ref()
            .is_none_or(|g| g.get(&f.slot, 0).is_ok_and(|g| g == f.gen));
        if !current || f.until <= now {
            continue;
        }
        v.push(FlowEntry {
            source,
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

/// The whole flows in a router's `NAT_LEARNED` slots, valid or not (none when the router's
/// programs were loaded by a build without learning).
fn learned(router: &str) -> Result<Vec<(NatKey, NatFlow)>> {
    let Ok(data) = datapath::open_pinned(router, map_names::NAT_LEARNED) else {
        return Ok(Vec::new());
    };
    let slots: Array<MapData, LearnedFlow> = Array::try_from(Map::Array(data))?;
    Ok((0..LEARN_SLOTS)
        .filter_map(|i| slots.get(&i, 0).ok())
        .filter(|e| e.check == learned_check(&e.key, &e.flow))
        .map(|e| (e.key, e.flow))
        .collect())
}

/// Empties the `NAT_LEARNED` slots of a router whose flow `drop` selects (key, translation);
/// returns how many. A slot the program rewrites meanwhile holds a newer flow.
fn clear_learned(router: &str, drop: impl Fn(&LearnedFlow) -> bool) -> Result<usize> {
    let Ok(data) = datapath::open_pinned(router, map_names::NAT_LEARNED) else {
        return Ok(0);
    };
    let mut slots: Array<MapData, LearnedFlow> = Array::try_from(Map::Array(data))?;
    let mut n = 0;
    for i in 0..LEARN_SLOTS {
        let Ok(e) = slots.get(&i, 0) else { continue };
        if e.check == learned_check(&e.key, &e.flow) && drop(&e) {
            // All zeros: its check word fails.
            // SAFETY: `LearnedFlow` is plain data; all zeros is a value of it.
            let empty: LearnedFlow = unsafe { std::mem::zeroed() };
            slots
                .set(i, empty, 0)
                .context("emptying a NAT_LEARNED slot")?;
            n += 1;
        }
    }
    Ok(n)
}

/// Removes from a router's flow map every entry through `addr` (before or after translation),
/// and the flows the program learned through it, as soon as its kernel flows are flushed: the
/// fast path must not carry on with a floating IP's old mapping until the daemon hears of the
/// flush. Returns how many; none when the router has no map yet.
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
    let learned = clear_learned(router, |e| {
        let (k, f) = (&e.key, &e.flow);
        (k.src == a || k.dst == a || f.src == a || f.dst == a)
            && !cfg!(mutant = "nat_learned_survive_purge")
    })?;
    Ok(gone.len() + learned)
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
            tcp_state: None,
            mark: 0,
        };
        let [(k0, v0), (k1, v1)] = entries(&f, false).unwrap();
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
        // Both directions share the original direction's generation slot.
        assert_eq!(v0.slot, gen_slot(&k0));
        assert_eq!(v1.slot, v0.slot);
        // TCP waits for ESTABLISHED (a closing connection is never copied); no NAT, or ICMP
        // other than echo: the kernel's.
        let tcp = Flow {
            orig: Tuple { proto: 6, ..f.orig },
            reply: Tuple {
                proto: 6,
                ..f.reply
            },
            ..f.clone()
        };
        assert!(entries(&tcp, false).is_none());
        for (state, copied) in [(2, false), (3, true), (4, false), (7, false)] {
            let t = Flow {
                tcp_state: Some(state),
                ..tcp.clone()
            };
            assert_eq!(entries(&t, false).is_some(), copied, "TCP state {state}");
        }
        // vm1:40000 → vm3:53, routed.
        let plain = Flow {
            orig: t([172, 16, 100, 3], 40000, [172, 16, 101, 3], 53, 17),
            reply: t([172, 16, 101, 3], 53, [172, 16, 100, 3], 40000, 17),
            status: status::CONFIRMED,
            ..f.clone()
        };
        assert!(entries(&plain, false).is_none());
        // Under foreign rules a flow without translation is copied too, as it is.
        let [(k0, v0), (k1, v1)] = entries(&plain, true).unwrap();
        assert_eq!(
            (v0.src, v0.dst, v0.sport, v0.dport, v0.flags),
            (k0.src, k0.dst, k0.sport, k0.dport, 0)
        );
        assert_eq!(
            (v1.src, v1.dst, v1.sport, v1.dport, v1.flags),
            (k1.src, k1.dst, k1.sport, k1.dport, 0)
        );
    }

    #[test]
    fn icmp_echo_translates_the_identifier() {
        let f = Flow {
            orig: t([203, 0, 113, 5], 7, [192, 168, 1, 20], 8 << 8, 1),
            reply: t([172, 16, 101, 3], 7, [203, 0, 113, 5], 0, 1),
            status: status::DST_NAT,
            timeout: None,
            tcp_state: None,
            mark: 0,
        };
        let [(k0, v0), (k1, v1)] = entries(&f, false).unwrap();
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
        assert!(entries(&unreachable, false).is_none());
    }

    #[test]
    fn reported_keys_ask_conntrack_for_either_direction() {
        // An echo request is the original direction (type 8), an echo reply the reply (0).
        let k = NatKey {
            src: [172, 16, 101, 3],
            dst: [203, 0, 113, 5],
            sport: 7u16.to_be_bytes(),
            dport: [0, 0],
            proto: 1,
            _pad: [0; 3],
        };
        assert_eq!(tuple_of(&k, false).dport, 8 << 8);
        assert_eq!(tuple_of(&k, true).dport, 0);
        assert_eq!(key_of(&tuple_of(&k, false)), k);
        let u = NatKey {
            proto: 17,
            dport: 53u16.to_be_bytes(),
            ..k
        };
        assert_eq!(
            (tuple_of(&u, true).sport, tuple_of(&u, true).dport),
            (7, 53)
        );
        assert_eq!(key_of(&tuple_of(&u, false)), u);
    }
}

//! NAT in the fast path: flows the kernel's conntrack set up (SNAT to the gateway address,
//! floating IPs both ways, hairpins), learned from their TCP handshake here (`NAT_LEARNED`) or
//! copied into `NAT_FLOWS` by the controller when the fast path reported them, are translated
//! here; everything else NAT needs (a flow's first packets, TCP SYN/FIN/RST, fragments) is the
//! kernel's. The kernel stays the authority on every mapping:
//! the fast path never picks a port, and uses a copy only while it is sure the kernel holds the
//! same mapping (see `router_common::nat`).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use router_common::{
    nat::{
        gen_slot, hint_bit, learn_slot, learned_check, seen_slots, syn_slot, COPY_AFTER,
        COPY_AFTER_TCP, SEEN_IDLE, SEEN_REPORTS, SEEN_SECOND_SHIFT, SEEN_TIME_SHIFT, SYN_ACK_SEEN,
        SYN_SEEN,
    },
    nat_conf, nat_flags, pass_reason as why, LearnedFlow, NatFlow, NatKey, NatSyn,
};

use crate::{
    csum,
    hook::Hook,
    maps::{
        NAT_CONF, NAT_FLOWS, NAT_GEN, NAT_HINT, NAT_LEARN, NAT_LEARNED, NAT_MISSES, NAT_SCRATCH,
        NAT_SEEN, NAT_SYNS,
    },
    parse::{ptr_at, Ipv4Hdr, ETH_LEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN},
};

pub use crate::parse::IPPROTO_ICMP;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The router's `nat_conf` bits (one array read; 0 for routers without a gateway or rules).
#[inline(always)]
pub fn conf() -> u32 {
    match NAT_CONF.get(0) {
        Some(c) => *c,
        None => 0,
    }
}

/// A packet NAT could translate by its tuple, without a valid copy of its flow.
pub struct Miss {
    pub key: NatKey,
    /// TCP SYN, FIN or RST: not counted towards a copy.
    pub control: bool,
    /// TCP SYN (with or without ACK): a direction's first segment starts its count again.
    pub opening: bool,
    /// TCP SYN without ACK: a connection starts (conntrack may replace a closed one's entry).
    pub syn: bool,
    /// TCP: the segment's flags, sequence and acknowledgement numbers (0 otherwise).
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
}

/// What NAT makes of one unfragmented IPv4 packet.
pub enum Lookup {
    /// Nothing NAT translates by tuple (another protocol, ICMP other than echo, too short).
    Other,
    /// No valid copy of its flow: the kernel translates it, if it needs translating.
    Miss(Miss),
    /// The flow's valid copy, under this key, and the time it was found valid at: the
    /// daemon's entry, or this processor's checked copy of a learned one.
    Flow(NatKey, &'static mut NatFlow, u64),
}

/// The translation for this unfragmented IPv4 packet (20-byte header at `ETH_LEN`, `tot_len`
/// bytes long), or the reason to hand it to the kernel: a TCP SYN, FIN or RST of a flow the
/// fast path has retires the flow's copies (both directions) and goes to the kernel, whose
/// conntrack must see it; a copy that is no longer valid is deleted and not used.
#[inline(always)]
pub fn lookup(h: &impl Hook, ip: &Ipv4Hdr, tot_len: usize, guarded: bool) -> Result<Lookup, usize> {
    let l4 = ETH_LEN + IPV4_LEN;
    let (key, flags, seq, ack) = if ip.protocol == IPPROTO_TCP {
        if tot_len < IPV4_LEN + 20 {
            return Ok(Lookup::Other);
        }
        let Some(p) = ptr_at::<[u8; 20]>(h, l4) else {
            return Ok(Lookup::Other);
        };
        // SAFETY: bounds checked by `ptr_at`.
        let b = unsafe { &*p };
        (
            key_of(ip, &[b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            b[13],
            u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        )
    } else {
        if tot_len < IPV4_LEN + 8 {
            return Ok(Lookup::Other);
        }
        let Some(p) = ptr_at::<[u8; 8]>(h, l4) else {
            return Ok(Lookup::Other);
        };
        // SAFETY: bounds checked by `ptr_at`.
        (key_of(ip, unsafe { &*p }), 0, 0, 0)
    };
    let Some(key) = key else {
        return Ok(Lookup::Other);
    };
    let control = flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
    let miss = Miss {
        key,
        control,
        opening: flags & TCP_SYN != 0,
        syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        flags,
        seq,
        ack,
    };
    // A flow learned from its handshake, valid: first (its slot is one cache line, which no
    // hint bit could spare: the slot is where it would be written).
    // Never under foreign rules: only flows the kernel forwarded under them are carried.
    // Only TCP is learned.
    let learned = if guarded || key.proto != IPPROTO_TCP {
        None
    } else {
        learned_of(&key)
    };
    if let Some((f, now)) = learned {
        if control {
            // A connection starts or ends: conntrack must see it, and the fast path stops
            // using the flow (both directions: one generation).
            if !cfg!(mutant = "nat_no_retire") {
                retire(&key, f, false);
            }
            return Err(why::NAT_TCP_CONTROL);
        }
        return Ok(Lookup::Flow(key, f, now));
    }
    let Some(f) = flow_of(&key) else {
        return Ok(Lookup::Miss(miss));
    };
    // SAFETY: a map value, valid while the program runs (the map is not preallocated: a
    // deleted element is freed after an RCU grace period).
    let f = unsafe { &mut *f };
    if control {
        // A connection starts or ends: the copy may be of a connection conntrack is about to
        // replace or forget. Whether or not it is, conntrack must see this packet.
        if !cfg!(mutant = "nat_no_retire") {
            retire(&key, f, true);
        }
        return Err(why::NAT_TCP_CONTROL);
    }
    let now = now();
    if !valid(f, now) {
        let _ = NAT_FLOWS.remove(&key);
        return Ok(Lookup::Miss(miss));
    }
    Ok(Lookup::Flow(key, f, now))
}

/// This processor's scratch entry (`NAT_SCRATCH`): flows are checked and built there, off
/// the stack and out of other processors' reach.
#[inline(always)]
fn scratch() -> Option<&'static mut LearnedFlow> {
    // SAFETY: a per-CPU array element; the program runs to its end on this processor.
    NAT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The flow the program learned for `key`, if its slot holds one, whole (its check word
/// matches: not a mix of two flows another processor wrote at once) and valid: a copy in this
/// processor's scratch entry, and the time it was found valid at.
#[inline(always)]
fn learned_of(key: &NatKey) -> Option<(&'static mut NatFlow, u64)> {
    let p = NAT_LEARNED.get_ptr(learn_slot(key))?;
    // SAFETY: an array element; a first look at its key (most packets stop here).
    if unsafe { core::ptr::read_volatile(&(*p).key) } != *key {
        return None;
    }
    let s = scratch()?;
    // SAFETY: an array element copied once into this processor's scratch; whatever another
    // processor writes meanwhile, the copy is checked below.
    unsafe { core::ptr::copy_nonoverlapping(p, s as *mut LearnedFlow, 1) };
    let whole = s.check == learned_check(&s.key, &s.flow) || cfg!(mutant = "nat_learned_unchecked");
    let now = now();
    if s.key != *key || !whole || !valid(&s.flow, now) {
        return None;
    }
    Some((&mut s.flow, now))
}

/// The entry `NAT_FLOWS` holds for `key`, if any; looked up only when the key's hint bit is set.
#[inline(always)]
fn flow_of(key: &NatKey) -> Option<*mut NatFlow> {
    let (word, bit) = hint_bit(key);
    match NAT_HINT.get(word) {
        Some(w) if *w & bit != 0 => NAT_FLOWS.get_ptr_mut(key),
        _ => None,
    }
}

/// The lookup key of a TCP, UDP or ICMP echo packet whose first 8 transport bytes are `l4`.
#[inline(always)]
fn key_of(ip: &Ipv4Hdr, l4: &[u8; 8]) -> Option<NatKey> {
    let (sport, dport) = match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => ([l4[0], l4[1]], [l4[2], l4[3]]),
        IPPROTO_ICMP if l4[0] == ICMP_ECHO || l4[0] == ICMP_ECHO_REPLY => ([l4[4], l4[5]], [0, 0]),
        _ => return None,
    };
    Some(NatKey {
        src: ip.src,
        dst: ip.dst,
        sport,
        dport,
        proto: ip.protocol,
        _pad: [0; 3],
    })
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The copy is of the flow conntrack holds now (see `router_common::nat`).
#[inline(always)]
fn valid(f: &NatFlow, now: u64) -> bool {
    if cfg!(mutant = "nat_stale_used") {
        return true;
    }
    matches!(NAT_GEN.get(f.slot), Some(g) if *g == f.gen) && now < f.until
}

/// Moves generation `slot` on: copies taken under the old one are never used again.
#[inline(always)]
fn bump(slot: u32) {
    if let Some(g) = NAT_GEN.get_ptr_mut(slot) {
        // SAFETY: an array element. Two CPUs bumping at once may both write the same value:
        // it differs from the old one either way, which is all a generation needs.
        unsafe { *g = (*g).wrapping_add(1) };
    }
}

/// Ends the fast path's use of flow `f` (found under `key`): its generation moves on (which
/// voids both directions, copied or learned), and both directions' copies are deleted
/// (`copied`: it came from `NAT_FLOWS`).
#[inline(always)]
fn retire(key: &NatKey, f: &NatFlow, copied: bool) {
    let icmp = key.proto == IPPROTO_ICMP;
    // The other direction arrives as this one leaves, reversed.
    let other = NatKey {
        src: f.dst,
        dst: f.src,
        sport: if icmp { f.sport } else { f.dport },
        dport: if icmp { [0, 0] } else { f.sport },
        proto: key.proto,
        _pad: [0; 3],
    };
    bump(f.slot);
    if copied {
        let _ = NAT_FLOWS.remove(key);
        let _ = NAT_FLOWS.remove(&other);
    }
}

/// Follows a TCP handshake the kernel translates (see `router_common::nat`): records the
/// SYN, then its SYN-ACK, and installs both directions of the flow when the client's first ACK
/// proves the mapping. Every one of these segments goes to the kernel all the same.
#[inline(always)]
fn handshake(m: &Miss) {
    let hold = match NAT_LEARN.get(0) {
        Some(h) => *h,
        None => 0,
    };
    if hold == 0 || conf() & nat_conf::GUARDED != 0 || cfg!(mutant = "nat_learn_off") {
        return;
    }
    match m.flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) {
        TCP_SYN => {
            // After `missed` moved the slot on: a later SYN of the same tuple voids this one.
            let gen = match NAT_GEN.get(gen_slot(&m.key)) {
                Some(g) => *g,
                None => return,
            };
            if let Some(r) = NAT_SYNS.get_ptr_mut(syn_slot(m.seq)) {
                // SAFETY: an array element. Two CPUs writing one slot at once leave a mix
                // that the checks below refuse (every later step compares what it wrote).
                let r = unsafe { &mut *r };
                r.stage = 0;
                r.key = m.key;
                r.isn = m.seq;
                r.gen = gen;
                r.stage = SYN_SEEN;
            }
        }
        f if f == TCP_SYN | TCP_ACK => {
            let isn = m.ack.wrapping_sub(1);
            let Some(r) = NAT_SYNS.get_ptr_mut(syn_slot(isn)) else {
                return;
            };
            // SAFETY: an array element.
            let r = unsafe { &mut *r };
            // The answer to that SYN: from its server (SNAT) or to its client (a floating
            // IP), one side translated. The first one wins: a forged one sent later changes
            // nothing, one sent earlier cannot know the answer the client will acknowledge.
            let server_kept = m.key.src == r.key.dst && m.key.sport == r.key.dport;
            let client_kept = m.key.dst == r.key.src && m.key.dport == r.key.sport;
            if r.stage != SYN_SEEN || r.isn != isn || server_kept == client_kept {
                return;
            }
            r.reply = m.key;
            r.reply_isn = m.seq;
            r.at = now();
            r.stage = SYN_ACK_SEEN;
        }
        TCP_ACK => {
            let isn = m.seq.wrapping_sub(1);
            let Some(r) = NAT_SYNS.get_ptr_mut(syn_slot(isn)) else {
                return;
            };
            // SAFETY: an array element.
            let r = unsafe { &mut *r };
            // Only the client that got the kernel's SYN-ACK knows its sequence number.
            let proven =
                m.ack == r.reply_isn.wrapping_add(1) || cfg!(mutant = "nat_learn_unproven");
            if r.stage != SYN_ACK_SEEN || r.isn != isn || r.key != m.key || !proven {
                return;
            }
            r.stage = 0;
            let slot = gen_slot(&m.key);
            match NAT_GEN.get(slot) {
                Some(g) if *g == r.gen => {}
                _ => return,
            }
            learn(&m.key, &r.reply, slot, r.gen, r.at.wrapping_add(hold));
        }
        _ => {}
    }
}

/// Writes both directions of a flow whose original direction arrives as `k` and whose reply
/// arrives as `reply` (each becomes the other reversed) into their `NAT_LEARNED` slots.
#[inline(always)]
fn learn(k: &NatKey, reply: &NatKey, slot: u32, gen: u32, until: u64) {
    let Some(s) = scratch() else {
        return;
    };
    let src = reply.dst != k.src || reply.dport != k.sport;
    let dst = reply.src != k.dst || reply.sport != k.dport;
    let (fs, fd) = (
        if src { nat_flags::SRC } else { 0 },
        if dst { nat_flags::DST } else { 0 },
    );
    // The original direction becomes the reply reversed, and the other way round.
    for (from, to, flags) in [(k, reply, fs | fd), (reply, k, swap(fs | fd))] {
        let Some(p) = NAT_LEARNED.get_ptr_mut(learn_slot(from)) else {
            continue;
        };
        s.key = *from;
        s.flow.src = to.dst;
        s.flow.dst = to.src;
        s.flow.sport = to.dport;
        s.flow.dport = to.sport;
        s.flow.flags = flags;
        s.flow.slot = slot;
        s.flow.gen = gen;
        s.flow.used = 0;
        s.flow.until = until;
        s.check = learned_check(&s.key, &s.flow);
        s._pad = 0;
        // SAFETY: from this processor's scratch into an array element. A reader racing this
        // write sees a mix that fails its check; a flow this one displaces goes to the kernel.
        unsafe { core::ptr::copy_nonoverlapping(s as *const LearnedFlow, p, 1) };
    }
}

/// `nat_flags` of the other direction: a source translated one way is a destination the other.
#[inline(always)]
fn swap(flags: u32) -> u32 {
    (if flags & nat_flags::SRC != 0 {
        nat_flags::DST
    } else {
        0
    }) | (if flags & nat_flags::DST != 0 {
        nat_flags::SRC
    } else {
        0
    })
}

/// A packet of `m` went to the kernel because it had no copy: a connection start moves its
/// flow's generation on (a copy being taken now may be of the connection conntrack replaces);
/// the packet counts towards reporting the flow for a copy (a SYN or SYN-ACK starts the count
/// again).
#[inline(always)]
pub fn missed(m: &Miss) {
    if m.syn && !cfg!(mutant = "nat_no_retire") {
        bump(gen_slot(&m.key));
    }
    if m.key.proto == IPPROTO_TCP {
        handshake(m);
    }
    // A FIN or RST neither counts nor starts over (the next connection's SYN does): the flow's
    // slot is left alone, one cache line fewer on the kernel's path.
    if m.control && !m.opening {
        return;
    }
    let (i1, i2, fp) = seen_slots(&m.key);
    let (Some(p1), Some(p2)) = (NAT_SEEN.get_ptr_mut(i1), NAT_SEEN.get_ptr_mut(i2)) else {
        return;
    };
    let t = (now() >> SEEN_TIME_SHIFT) & 0xffff;
    // SAFETY: array elements; a count lost to a race between CPUs delays a report only.
    let (e1, e2) = unsafe { (*p1, *p2) };
    let live = |e: u64| t.wrapping_sub(e >> 32) & 0xffff <= SEEN_IDLE;
    let (p, e) = if e1 >> 48 == fp && live(e1) {
        (p1, e1)
    } else if e2 >> 48 == fp && live(e2) {
        (p2, e2)
    } else {
        // A flow of its own from now on: in a slot whose flow paused, else in the one whose
        // flow counted less.
        let p = if !live(e1) || (live(e2) && e1 & 0xff <= e2 & 0xff) {
            p1
        } else {
            p2
        };
        (p, t << 32)
    };
    let mut reports = (e >> 8) & 0xff;
    if t >> SEEN_SECOND_SHIFT != ((e >> 32) & 0xffff) >> SEEN_SECOND_SHIFT {
        reports = 0;
    }
    let want = if m.key.proto == IPPROTO_TCP {
        COPY_AFTER_TCP
    } else {
        COPY_AFTER
    } as u64;
    let mut count = if m.control { 0 } else { (e & 0xff) + 1 };
    let report = count >= want && reports < SEEN_REPORTS;
    if count >= want {
        count = 0;
    }
    if report {
        reports += 1;
    }
    // SAFETY: as above.
    unsafe { *p = (fp << 48) | (t << 32) | (reports << 8) | count };
    if report {
        // A full ring (no controller reading it) loses the report: the kernel goes on.
        let _ = NAT_MISSES.output::<NatKey>(&m.key, 0);
    }
}

/// Marks the flow used, at most once a second (a write per packet would bounce its cache
/// line between CPUs); on a learned flow's scratch copy it changes nothing.
#[inline(always)]
pub fn touch(f: &mut NatFlow, now: u64) {
    if now.wrapping_sub(f.used) > 1_000_000_000 {
        f.used = now;
    }
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// An ICMP error (destination unreachable, source quench, time exceeded, parameter problem)
/// about a packet of a NAT flow: the flow of the direction opposite to the quoted packet (the
/// quoted packet went out, the error comes back the way a reply would), or None when the
/// message is not an error, quotes something this cannot translate (IPv4 options, a fragment,
/// another protocol, fewer than 8 bytes of its transport header) or no flow.
///
/// Also returns the outer addresses the error gets: the quoted packet's source (where the
/// error goes) and destination (when that host itself sent the error) become their
/// translations; an address of a router on the way stays.
#[inline(always)]
pub fn lookup_icmp_error(
    h: &impl Hook,
    ip: &Ipv4Hdr,
    tot_len: usize,
) -> Option<(&'static mut NatFlow, ([u8; 4], [u8; 4]))> {
    let l4 = ETH_LEN + IPV4_LEN;
    // ICMP header, quoted IPv4 header, 8 bytes of the quoted transport header.
    if tot_len < IPV4_LEN + 8 + IPV4_LEN + 8 {
        return None;
    }
    let t = ptr_at::<[u8; 8]>(h, l4)?;
    let inner = ptr_at::<Ipv4Hdr>(h, l4 + 8)?;
    let q = ptr_at::<[u8; 8]>(h, l4 + 8 + IPV4_LEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (t, inner, q) = unsafe { (&*t, &*inner, &*q) };
    if !matches!(
        t[0],
        ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) || inner.version_ihl != 0x45
        || u16::from_be_bytes(inner.frag_off) & 0x1fff != 0
    {
        return None;
    }
    let (sport, dport) = match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP => ([q[2], q[3]], [q[0], q[1]]),
        IPPROTO_ICMP if q[0] == ICMP_ECHO || q[0] == ICMP_ECHO_REPLY => ([q[4], q[5]], [0, 0]),
        _ => return None,
    };
    let key = NatKey {
        src: inner.dst,
        dst: inner.src,
        sport,
        dport,
        proto: inner.protocol,
        _pad: [0; 3],
    };
    // SAFETY: a map value, valid while the program runs (see `lookup`).
    let f = unsafe { &mut *flow_of(&key)? };
    if !valid(f, now()) {
        return None;
    }
    let src = if ip.src == inner.dst { f.src } else { ip.src };
    let dst = if ip.dst == inner.src { f.dst } else { ip.dst };
    Some((f, (src, dst)))
}

/// Rewrites an ICMP error about flow `f` (see `lookup_icmp_error`), checksums complete (both
/// hooks: an ICMP error never carries a partial checksum, and every change below is
/// compensated by a checksum change, so an skb's complete checksum stays right): the outer
/// addresses (`outer`, with the header checksum), the quoted packet translated back (its
/// addresses with its header checksum; its ports or echo identifier with its UDP checksum
/// unless 0, its TCP checksum when the whole TCP header is quoted, as the kernel does, or its
/// ICMP checksum), and the ICMP checksum for every quoted word that changed.
#[inline(always)]
pub fn rewrite_icmp_error(
    h: &impl Hook,
    f: &NatFlow,
    outer: ([u8; 4], [u8; 4]),
    tot_len: usize,
) -> bool {
    let l4 = ETH_LEN + IPV4_LEN;
    let ql4 = l4 + 8 + IPV4_LEN;
    let (Some(ip), Some(t), Some(inner), Some(q)) = (
        ptr_at::<Ipv4Hdr>(h, ETH_LEN),
        ptr_at::<[u8; 8]>(h, l4),
        ptr_at::<Ipv4Hdr>(h, l4 + 8),
        ptr_at::<[u8; 8]>(h, ql4),
    ) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (ip, t, inner, q) = unsafe { (&mut *ip, &mut *t, &mut *inner, &mut *q) };
    let w = |b: [u8; 4]| u32::from_ne_bytes(b);
    let h16 = |b: [u8; 2]| u16::from_ne_bytes(b);
    // Outer header.
    let c = h16(ip.check);
    ip.check = csum::replace4(
        csum::replace4(c, w(ip.src), w(outer.0)),
        w(ip.dst),
        w(outer.1),
    )
    .to_ne_bytes();
    ip.src = outer.0;
    ip.dst = outer.1;
    // The quoted packet: it travelled opposite to the flow's key direction, so its
    // translation is the flow's, reversed.
    let (nsrc, ndst) = (f.dst, f.src);
    let mut icmp = h16([t[2], t[3]]);
    let ic_old = h16(inner.check);
    let ic_new = csum::replace4(
        csum::replace4(ic_old, w(inner.src), w(nsrc)),
        w(inner.dst),
        w(ndst),
    );
    icmp = csum::replace4(icmp, w(inner.src), w(nsrc));
    icmp = csum::replace4(icmp, w(inner.dst), w(ndst));
    icmp = csum::replace2(icmp, ic_old, ic_new);
    let (osrc, odst) = (inner.src, inner.dst);
    inner.check = ic_new.to_ne_bytes();
    inner.src = nsrc;
    inner.dst = ndst;
    match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports_old = w([q[0], q[1], q[2], q[3]]);
            let ports_new = w([f.dport[0], f.dport[1], f.sport[0], f.sport[1]]);
            icmp = csum::replace4(icmp, ports_old, ports_new);
            let upd = |c: u16| {
                let x = csum::replace4(csum::replace4(c, w(osrc), w(nsrc)), w(odst), w(ndst));
                csum::replace4(x, ports_old, ports_new)
            };
            if inner.protocol == IPPROTO_UDP {
                let c = h16([q[6], q[7]]);
                if c != 0 {
                    let mut n = upd(c);
                    if n == 0 {
                        n = 0xffff;
                    }
                    icmp = csum::replace2(icmp, c, n);
                    [q[6], q[7]] = n.to_ne_bytes();
                }
            } else if tot_len >= IPV4_LEN + 8 + IPV4_LEN + 20 {
                if let Some(tc) = ptr_at::<[u8; 2]>(h, ql4 + 16) {
                    // SAFETY: bounds checked by `ptr_at`.
                    let tc = unsafe { &mut *tc };
                    let (c, n) = (h16(*tc), upd(h16(*tc)));
                    icmp = csum::replace2(icmp, c, n);
                    *tc = n.to_ne_bytes();
                }
            }
            [q[0], q[1]] = f.dport;
            [q[2], q[3]] = f.sport;
        }
        _ => {
            // A quoted echo: its identifier, and its own checksum.
            let (oid, nid) = (h16([q[4], q[5]]), h16(f.sport));
            let c = h16([q[2], q[3]]);
            let n = csum::replace2(c, oid, nid);
            icmp = csum::replace2(icmp, oid, nid);
            icmp = csum::replace2(icmp, c, n);
            [q[2], q[3]] = n.to_ne_bytes();
            [q[4], q[5]] = f.sport;
        }
    }
    [t[2], t[3]] = icmp.to_ne_bytes();
    true
}

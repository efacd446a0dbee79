//! The kernel's connection tracking through ctnetlink (`NETLINK_NETFILTER`): dump the table,
//! read one flow, delete flows and refresh their timeouts. The kernel's conntrack is the
//! authority for every NAT mapping: the fast path only copies what it decided.
//!
//! IPv4 only (floating IPs and SNAT are IPv4, as in Neutron). A socket works in the network
//! namespace of the thread that opens it.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
};

use anyhow::{Context as _, Result};

use super::netdev::{attrs_in, put_attr, request};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_NAT_SRC: u16 = 6;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_NAT_DST: u16 = 13;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
/// `IP_CT_TCP_FLAG_BE_LIBERAL`: no window checks for this direction (a flow installed from
/// another host's table has no window history here).
const TCP_FLAG_BE_LIBERAL: u8 = 0x08;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// `enum tcp_conntrack`: the connection is established.
pub const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;

/// `enum ip_conntrack_status` bits.
pub mod status {
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const DYING: u32 = 1 << 9;
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// One direction of a flow as conntrack writes it. For ICMP, `sport` is the echo identifier
/// and `dport` holds type << 8 | code.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flow {
    pub orig: Tuple,
    pub reply: Tuple,
    pub status: u32,
    /// Seconds left, when the message says.
    pub timeout: Option<u32>,
    /// TCP: conntrack's state of the connection (`enum tcp_conntrack`), when the message says.
    pub tcp_state: Option<u8>,
    /// The connection mark (`ct mark`).
    #[serde(default)]
    pub mark: u32,
}

impl Flow {
    pub fn nat(&self) -> bool {
        self.status & (status::SRC_NAT | status::DST_NAT) != 0
    }
}

pub struct Conntrack {
    fd: OwnedFd,
    seq: u32,
}

impl AsRawFd for Conntrack {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Conntrack {
    /// A socket in the calling thread's namespace, subscribed to `groups` (0: none).
    pub fn open(groups: u32) -> Result<Conntrack> {
        // A busy router sends many events: a large buffer, and ENOBUFS reported as such.
        let fd = super::netdev::socket(NETLINK_NETFILTER, groups, 8 << 20, "ctnetlink")?;
        Ok(Conntrack { fd, seq: 0 })
    }

    /// The event groups of new, changed and destroyed entries (`NFNLGRP_CONNTRACK_NEW`,
    /// `_UPDATE`, `_DESTROY`), for `open`.
    pub const EVENTS: u32 = 0b111;

    /// The events received since the last call, in order, without waiting. An error (ENOBUFS)
    /// means events were lost: the table must be read whole again.
    pub fn events(&self) -> io::Result<Vec<Event>> {
        let mut out = Vec::new();
        super::netdev::drain(self.fd.as_raw_fd(), |d| {
            for (t, payload) in super::netdev::messages(d) {
                if t >> 8 != NFNL_SUBSYS_CTNETLINK {
                    continue;
                }
                if let Some(flow) = flow_of(payload) {
                    let id = attrs_in(payload.get(4..).unwrap_or_default())
                        .into_iter()
                        .find(|(t, _)| *t == CTA_ID)
                        .and_then(|(_, v)| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
                    out.push(Event {
                        flow,
                        id,
                        gone: t & 0xff == IPCTNL_MSG_CT_DELETE,
                    });
                }
            }
        })?;
        Ok(out)
    }

    /// Every IPv4 flow of the namespace.
    pub fn dump(&mut self) -> Result<Vec<Flow>> {
        let replies = self.request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, &[])?;
        Ok(replies.iter().filter_map(|m| flow_of(m)).collect())
    }

    /// Deletes the flow whose original direction is `orig` (gone already: fine).
    pub fn delete(&mut self, orig: &Tuple) -> Result<()> {
        let mut attrs = Vec::new();
        put_tuple(&mut attrs, CTA_TUPLE_ORIG, orig);
        match self.request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, &attrs) {
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Creates `f` in this namespace's table as another host's table holds it: the same
    /// original tuple, the same translation (so the reply tuple comes out equal), TCP state,
    /// mark and seconds left, with window tracking liberal (no history here). A flow that
    /// exists already with the same translation gets its state, mark and timeout from `f`
    /// instead. `f` is the authority: an entry here in its way (the same original tuple with
    /// another translation, or another connection holding the translated tuple: what this
    /// namespace kept from when it forwarded itself, or an end not told yet) is deleted first.
    /// Returns true when it was created.
    pub fn install(&mut self, f: &Flow) -> Result<bool> {
        match self.install_once(f) {
            Err(e) if is_errno(&e, libc::EEXIST) && !cfg!(mutant = "replica_clash_kept") => {
                // What stands in the way: the original tuple translated otherwise, or the
                // translated tuple held by another entry.
                if let Some(old) = self.get(&f.orig, false)? {
                    if old.reply == f.reply {
                        return self.update(f).map(|()| false);
                    }
                    self.delete(&old.orig)?;
                }
                if let Some(old) = self.get(&f.reply, true)? {
                    self.delete(&old.orig)?;
                }
                self.install_once(f)
                    .with_context(|| format!("cannot create the flow {:?}", f.orig))
            }
            r => r.with_context(|| format!("cannot create the flow {:?}", f.orig)),
        }
    }

    /// Gives the existing entry of `f.orig` `f`'s TCP state, mark and seconds left.
    fn update(&mut self, f: &Flow) -> Result<()> {
        let mut attrs = Vec::new();
        put_tuple(&mut attrs, CTA_TUPLE_ORIG, &f.orig);
        attrs.extend_from_slice(&install_common(f));
        self.request(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_ACK, &attrs)
            .with_context(|| format!("cannot update the flow {:?}", f.orig))?;
        self.assure(f)
    }

    /// One create of `f` (EEXIST when something is in its way); then its status bits.
    fn install_once(&mut self, f: &Flow) -> Result<bool> {
        let mut attrs = Vec::new();
        put_tuple(&mut attrs, CTA_TUPLE_ORIG, &f.orig);
        // The reply tuple before translation; the NAT attributes below make the kernel
        // translate it (and record the bindings, as its own NAT does).
        let plain = Tuple {
            src: f.orig.dst,
            dst: f.orig.src,
            proto: f.orig.proto,
            sport: if f.orig.proto == IPPROTO_ICMP {
                f.orig.sport
            } else {
                f.orig.dport
            },
            dport: if f.orig.proto == IPPROTO_ICMP {
                f.orig.dport
            } else {
                f.orig.sport
            },
        };
        put_tuple(&mut attrs, CTA_TUPLE_REPLY, &plain);
        let translate = !cfg!(mutant = "replica_untranslated");
        if translate && (f.reply.dst != f.orig.src || f.reply.dport != f.orig.sport) {
            put_nat(
                &mut attrs,
                CTA_NAT_SRC,
                f.reply.dst,
                f.reply.dport,
                f.orig.proto,
            );
        }
        if translate && (f.reply.src != f.orig.dst || f.reply.sport != f.orig.dport) {
            put_nat(
                &mut attrs,
                CTA_NAT_DST,
                f.reply.src,
                f.reply.sport,
                f.orig.proto,
            );
        }

        attrs.extend_from_slice(&install_common(f));
        let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        self.request(IPCTNL_MSG_CT_NEW, create, &attrs)?;
        self.assure(f)?;
        Ok(true)
    }

    /// Seen both ways and assured, as `f` is (the kernel takes these bits on an entry it
    /// holds already, not on one being created; bits it has already stay).
    fn assure(&mut self, f: &Flow) -> Result<()> {
        let bits = f.status & (status::SEEN_REPLY | status::ASSURED);
        if bits != 0 {
            let mut attrs = Vec::new();
            put_tuple(&mut attrs, CTA_TUPLE_ORIG, &f.orig);
            put_attr(
                &mut attrs,
                CTA_STATUS,
                &(bits | status::CONFIRMED).to_be_bytes(),
            );
            match self.request(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_ACK, &attrs) {
                Err(e) if is_errno(&e, libc::EBUSY) => {}
                r => drop(r.with_context(|| format!("cannot mark the flow {:?}", f.orig))?),
            }
        }
        Ok(())
    }

    /// Sets the flow's timeout to `secs` (the kernel's own refresh, as if a packet passed);
    /// false when the kernel has no such flow (any more).
    pub fn set_timeout(&mut self, orig: &Tuple, secs: u32) -> Result<bool> {
        let mut attrs = Vec::new();
        put_tuple(&mut attrs, CTA_TUPLE_ORIG, orig);
        put_attr(&mut attrs, CTA_TIMEOUT, &secs.to_be_bytes());
        match self.request(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_ACK, &attrs) {
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(false),
            r => r.map(|_| true),
        }
    }

    /// The flow one of whose directions is `t` (`reply`: the reply direction's tuple), if the
    /// kernel has one.
    pub fn get(&mut self, t: &Tuple, reply: bool) -> Result<Option<Flow>> {
        let mut attrs = Vec::new();
        put_tuple(
            &mut attrs,
            if reply {
                CTA_TUPLE_REPLY
            } else {
                CTA_TUPLE_ORIG
            },
            t,
        );
        match self.request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_ACK, &attrs) {
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(None),
            r => Ok(r?.iter().find_map(|m| flow_of(m))),
        }
    }

    /// Deletes every flow with `addr` as a destination of either direction (`conntrack -D -d
    /// F` and `-D -q F`); returns how many.
    pub fn flush_address(&mut self, addr: Ipv4Addr) -> Result<usize> {
        let mut n = 0;
        for f in self.dump()? {
            if f.orig.dst == addr || f.reply.dst == addr {
                self.delete(&f.orig)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn request(&mut self, msg: u16, flags: u16, attrs: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let ty = (NFNL_SUBSYS_CTNETLINK << 8) | msg;
        let hdr = [libc::AF_INET as u8, 0, 0, 0];
        request(self.fd.as_raw_fd(), self.seq, ty, flags, hdr, attrs, |t| {
            t >> 8 == NFNL_SUBSYS_CTNETLINK
        })
    }
}

fn is_errno(e: &anyhow::Error, code: i32) -> bool {
    e.downcast_ref::<io::Error>().and_then(|e| e.raw_os_error()) == Some(code)
}

fn put_tuple(out: &mut Vec<u8>, which: u16, t: &Tuple) {
    let mut ip = Vec::new();
    put_attr(&mut ip, CTA_IP_V4_SRC, &t.src.octets());
    put_attr(&mut ip, CTA_IP_V4_DST, &t.dst.octets());
    let mut proto = Vec::new();
    put_attr(&mut proto, CTA_PROTO_NUM, &[t.proto]);
    if t.proto == IPPROTO_ICMP {
        put_attr(&mut proto, CTA_PROTO_ICMP_ID, &t.sport.to_be_bytes());
        put_attr(&mut proto, CTA_PROTO_ICMP_TYPE, &[(t.dport >> 8) as u8]);
        put_attr(&mut proto, CTA_PROTO_ICMP_CODE, &[t.dport as u8]);
    } else {
        put_attr(&mut proto, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
        put_attr(&mut proto, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
    }
    let mut tuple = Vec::new();
    put_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    put_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    put_attr(out, which | NLA_F_NESTED, &tuple);
}

/// A translation to exactly `ip`:`port` (`port` unused for ICMP, whose identifier stays).
fn put_nat(out: &mut Vec<u8>, which: u16, ip: Ipv4Addr, port: u16, proto: u8) {
    let mut nat = Vec::new();
    put_attr(&mut nat, CTA_NAT_V4_MINIP, &ip.octets());
    put_attr(&mut nat, CTA_NAT_V4_MAXIP, &ip.octets());
    if proto != IPPROTO_ICMP {
        let mut p = Vec::new();
        put_attr(&mut p, CTA_PROTONAT_PORT_MIN, &port.to_be_bytes());
        put_attr(&mut p, CTA_PROTONAT_PORT_MAX, &port.to_be_bytes());
        put_attr(&mut nat, CTA_NAT_PROTO | NLA_F_NESTED, &p);
    }
    put_attr(out, which | NLA_F_NESTED, &nat);
}

fn tuple_of(b: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport, mut ty, mut code) = (0u16, 0u16, 0u8, 0u8);
    let be16 = |v: &[u8]| v.get(..2).map(|v| u16::from_be_bytes([v[0], v[1]]));
    let v4 = |v: &[u8]| v.get(..4).map(|v| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
    for (t, v) in attrs_in(b) {
        match t {
            CTA_TUPLE_IP => {
                for (t, v) in attrs_in(v) {
                    match t {
                        CTA_IP_V4_SRC => src = v4(v),
                        CTA_IP_V4_DST => dst = v4(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, v) in attrs_in(v) {
                    match t {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT | CTA_PROTO_ICMP_ID => sport = be16(v)?,
                        CTA_PROTO_DST_PORT => dport = be16(v)?,
                        CTA_PROTO_ICMP_TYPE => ty = *v.first()?,
                        CTA_PROTO_ICMP_CODE => code = *v.first()?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let proto = proto?;
    if proto == IPPROTO_ICMP {
        dport = (ty as u16) << 8 | code as u16;
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto,
        sport,
        dport,
    })
}

/// The flow in a ctnetlink message's payload (after the 4-byte nfgenmsg); None for IPv6 and
/// anything incomplete.
/// What an install gives an entry besides its tuples: seconds left, mark, and for TCP the
/// state with liberal window tracking both ways.
fn install_common(f: &Flow) -> Vec<u8> {
    let timeout = f.timeout.unwrap_or(0).max(1);
    let mut common = Vec::new();
    put_attr(&mut common, CTA_TIMEOUT, &timeout.to_be_bytes());
    put_attr(&mut common, CTA_MARK, &f.mark.to_be_bytes());
    if let (IPPROTO_TCP, Some(state)) = (f.orig.proto, f.tcp_state) {
        let mut tcp = Vec::new();
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_STATE, &[state]);
        let liberal = [TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL];
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &liberal);
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_FLAGS_REPLY, &liberal);
        let mut info = Vec::new();
        put_attr(&mut info, CTA_PROTOINFO_TCP | NLA_F_NESTED, &tcp);
        put_attr(&mut common, CTA_PROTOINFO | NLA_F_NESTED, &info);
    }
    common
}

/// One conntrack event: an entry created or changed (what changed may be all it carries: an
/// update without `tcp_state` did not change it), or gone. Events of one entry come in order,
/// but not with respect to another entry's with the same tuples (an older connection's end
/// may be told after a newer one began): what an entry is now is the kernel's to say.
#[derive(Debug, Clone)]
pub struct Event {
    pub flow: Flow,
    /// The kernel's id of the entry (`CTA_ID`): a new connection with an old one's tuples has
    /// another.
    pub id: Option<u32>,
    pub gone: bool,
}

fn flow_of(payload: &[u8]) -> Option<Flow> {
    if payload.first() != Some(&(libc::AF_INET as u8)) {
        return None;
    }
    let (mut orig, mut reply, mut st, mut timeout) = (None, None, 0u32, None);
    let (mut tcp_state, mut mark) = (None, 0);
    for (t, v) in attrs_in(payload.get(4..)?) {
        match t {
            CTA_TUPLE_ORIG => orig = tuple_of(v),
            CTA_TUPLE_REPLY => reply = tuple_of(v),
            CTA_STATUS => st = u32::from_be_bytes(v.get(..4)?.try_into().ok()?),
            CTA_TIMEOUT => timeout = Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)),
            CTA_MARK => mark = u32::from_be_bytes(v.get(..4)?.try_into().ok()?),
            CTA_PROTOINFO => {
                for (t, v) in attrs_in(v) {
                    if t != CTA_PROTOINFO_TCP {
                        continue;
                    }
                    for (t, v) in attrs_in(v) {
                        if t == CTA_PROTOINFO_TCP_STATE {
                            tcp_state = v.first().copied();
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(Flow {
        orig: orig?,
        reply: reply?,
        status: st,
        timeout,
        tcp_state,
        mark,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_round_trip() {
        for t in [
            Tuple {
                src: Ipv4Addr::new(172, 16, 100, 3),
                dst: Ipv4Addr::new(192, 168, 1, 2),
                proto: IPPROTO_UDP,
                sport: 40000,
                dport: 53,
            },
            Tuple {
                src: Ipv4Addr::new(10, 0, 0, 1),
                dst: Ipv4Addr::new(10, 0, 0, 2),
                proto: IPPROTO_ICMP,
                sport: 77,
                dport: 8 << 8,
            },
        ] {
            let mut b = Vec::new();
            put_tuple(&mut b, CTA_TUPLE_ORIG, &t);
            let (ty, v) = attrs_in(&b)[0];
            assert_eq!(ty, CTA_TUPLE_ORIG);
            assert_eq!(tuple_of(v), Some(t));
        }
    }
}

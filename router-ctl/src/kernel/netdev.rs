//! The kernel's `netdev` generic-netlink family: what each device of a namespace can do with
//! XDP (its XDP features), and notifications when that changes.
//!
//! The flag that matters most here is NDO_XMIT: whether a device can take frames redirected to
//! it by XDP. A veth has it only while its peer has GRO on or an XDP program of its own; an XDP
//! redirect to a device without it is dropped after the program returned. The kernel sends a
//! change notification on the `mgmt` group whenever the flags change, so the daemon follows
//! them live.
//!
//! A socket works in the network namespace of the thread that opens it.

use std::{collections::BTreeMap, io, os::fd::AsRawFd, os::fd::FromRawFd, os::fd::OwnedFd};

use anyhow::{anyhow, bail, Context as _, Result};

/// Bits of a device's XDP features (`enum netdev_xdp_act`).
pub mod xdp_act {
    /// XDP runs in the driver (native mode).
    pub const BASIC: u64 = 1;
    pub const REDIRECT: u64 = 2;
    /// The device takes frames XDP redirected to it (`ndo_xdp_xmit`).
    pub const NDO_XMIT: u64 = 4;
}

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_CMD_DEV_DEL_NTF: u8 = 3;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;

/// A `netdev` family socket in the calling thread's namespace.
pub struct Netdev {
    fd: OwnedFd,
    family: u16,
    mgmt_group: Option<u32>,
    seq: u32,
}

impl AsRawFd for Netdev {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// A device's XDP features, as the kernel reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// XDP in the driver (native mode).
    pub fn native(&self) -> bool {
        self.0 & xdp_act::BASIC != 0
    }
    /// Takes XDP-redirected frames now.
    pub fn ndo_xmit(&self) -> bool {
        self.0 & xdp_act::NDO_XMIT != 0
    }
}

/// One change the kernel announced: a device's features, or its removal (None).
pub type Change = (u32, Option<XdpFeatures>);

impl Netdev {
    /// Opens the socket and resolves the family (absent before Linux 6.3).
    pub fn open() -> Result<Netdev> {
        let fd = socket(NETLINK_GENERIC, 0, 0, "generic netlink")?;
        let mut s = Netdev {
            fd,
            family: 0,
            mgmt_group: None,
            seq: 0,
        };
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
        let replies = s
            .request(
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                NLM_F_REQUEST | NLM_F_ACK,
                &attrs,
            )
            .context(
                "the kernel has no `netdev` generic netlink family (Linux 6.3 or later has it)",
            )?;
        for msg in replies {
            for (ty, val) in attrs_of(&msg) {
                match ty {
                    CTRL_ATTR_FAMILY_ID if val.len() >= 2 => {
                        s.family = u16::from_ne_bytes([val[0], val[1]])
                    }
                    CTRL_ATTR_MCAST_GROUPS => {
                        for (_, grp) in attrs_in(val) {
                            let mut name = None;
                            let mut id = None;
                            for (t, v) in attrs_in(grp) {
                                match t {
                                    CTRL_ATTR_MCAST_GRP_NAME => name = Some(v),
                                    CTRL_ATTR_MCAST_GRP_ID if v.len() >= 4 => {
                                        id = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
                                    }
                                    _ => {}
                                }
                            }
                            if name.is_some_and(|n| n.starts_with(b"mgmt")) {
                                s.mgmt_group = id;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if s.family == 0 {
            bail!("the kernel did not give the `netdev` family's id");
        }
        Ok(s)
    }

    /// Every device of the namespace and its XDP features.
    pub fn dump(&mut self) -> Result<BTreeMap<u32, XdpFeatures>> {
        let replies = self
            .request(
                self.family,
                NETDEV_CMD_DEV_GET,
                NLM_F_REQUEST | NLM_F_DUMP,
                &[],
            )
            .context("netdev dev-get")?;
        Ok(replies.iter().filter_map(|m| device_of(m)).collect())
    }

    /// Subscribes to change notifications; read them with `changes` when the socket is readable.
    pub fn subscribe(&mut self) -> Result<()> {
        let group = self
            .mgmt_group
            .ok_or_else(|| anyhow!("the `netdev` family has no mgmt notification group"))?;
        join_group(&self.fd, group).context("joining the netdev mgmt group")
    }

    /// The notifications queued on the socket (non-blocking).
    pub fn changes(&mut self) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        let family = self.family;
        // The socket overran (ENOBUFS): the caller dumps everything again.
        drain(self.fd.as_raw_fd(), |buf| {
            for (ty, msg) in messages(buf) {
                if ty == family && msg.len() >= 4 {
                    let cmd = msg[0];
                    if let Some((ifindex, f)) = device_of(msg) {
                        out.push((ifindex, (cmd != NETDEV_CMD_DEV_DEL_NTF).then_some(f)));
                    }
                }
            }
        })
        .context("reading netdev notifications")?;
        Ok(out)
    }

    /// Sends one request and collects the replies' generic-netlink payloads (header included)
    /// until the end of a dump or the acknowledgement.
    fn request(&mut self, ty: u16, cmd: u8, flags: u16, attrs: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        request(
            self.fd.as_raw_fd(),
            self.seq,
            ty,
            flags,
            [cmd, 1, 0, 0],
            attrs,
            |t| t == ty,
        )
    }
}

/// A netlink socket of `protocol` in the calling thread's namespace, bound to the multicast
/// `groups` (a bitmask; 0: none) with a receive buffer of `rcvbuf` bytes (0: the default);
/// `what` names it in errors.
pub(crate) fn socket(protocol: i32, groups: u32, rcvbuf: i32, what: &str) -> Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("{what} socket"));
    }
    // SAFETY: a descriptor we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_nl is valid; bind(2) with its size; setsockopt with an int.
    unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        if libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("binding a {what} socket"));
        }
        if rcvbuf > 0 {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &rcvbuf as *const _ as *const libc::c_void,
                4,
            );
        }
    }
    Ok(fd)
}

/// Joins the netlink socket `fd` to multicast group `group` (a group number, for the groups
/// past the 32 a bind's bitmask reaches).
pub(crate) fn join_group(fd: &OwnedFd, group: u32) -> io::Result<()> {
    // SAFETY: setsockopt with a u32 option value.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            &group as *const u32 as *const libc::c_void,
            4,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hands each datagram queued on the netlink socket `fd` to `each`, without blocking, until none
/// is left; an error (ENOBUFS: messages were lost) is returned as it is.
pub(crate) fn drain(fd: std::os::fd::RawFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: receives into buf, without blocking.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        each(&buf[..n as usize]);
    }
}

/// Sends one netlink request (header, the family's 4-byte header `family_hdr`, attributes) on
/// `fd` and collects the payloads of the replies whose type `keep` accepts, until the end of a
/// dump or the acknowledgement; a refusal is the kernel's errno.
pub(crate) fn request(
    fd: std::os::fd::RawFd,
    seq: u32,
    ty: u16,
    flags: u16,
    family_hdr: [u8; 4],
    attrs: &[u8],
    keep: impl Fn(u16) -> bool,
) -> Result<Vec<Vec<u8>>> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&family_hdr);
    m.extend_from_slice(attrs);
    // SAFETY: sends m.len() bytes of m to the kernel (the default destination).
    if unsafe { libc::send(fd, m.as_ptr() as *const libc::c_void, m.len(), 0) } < 0 {
        return Err(io::Error::last_os_error()).context("sending a netlink request");
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: receives into buf.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("reading a netlink reply");
        }
        for (t, payload) in messages(&buf[..n as usize]) {
            match t {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = payload
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-1);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code))
                            .context("the kernel refused a netlink request");
                    }
                    return Ok(out);
                }
                t if keep(t) => out.push(payload.to_vec()),
                _ => {}
            }
        }
    }
}

/// (message type, payload) of each netlink message in `buf`.
pub(crate) fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < 16 || off + len > buf.len() {
            break;
        }
        v.push((ty, &buf[off + 16..off + len]));
        off += (len + 3) & !3;
    }
    v
}

/// The attributes of a generic-netlink payload (after its 4-byte header).
fn attrs_of(payload: &[u8]) -> Vec<(u16, &[u8])> {
    attrs_in(payload.get(4..).unwrap_or(&[]))
}

/// The attributes in `b` (a nested attribute's value).
pub(crate) fn attrs_in(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    v
}

pub(crate) fn put_attr(out: &mut Vec<u8>, ty: u16, val: &[u8]) {
    let len = 4 + val.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(val);
    out.resize((out.len() + 3) & !3, 0);
}

/// (ifindex, features) of a dev-get reply or notification.
fn device_of(payload: &[u8]) -> Option<(u32, XdpFeatures)> {
    let mut ifindex = None;
    let mut features = XdpFeatures::default();
    for (ty, v) in attrs_of(payload) {
        match ty {
            NETDEV_A_DEV_IFINDEX if v.len() >= 4 => {
                ifindex = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            }
            NETDEV_A_DEV_XDP_FEATURES if v.len() >= 8 => {
                features = XdpFeatures(u64::from_ne_bytes(v[..8].try_into().unwrap()))
            }
            _ => {}
        }
    }
    Some((ifindex?, features))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_mcast_groups_parse() {
        // CTRL_ATTR_MCAST_GROUPS { 1: { NAME "mgmt", ID 7 } }
        let mut grp = Vec::new();
        put_attr(&mut grp, CTRL_ATTR_MCAST_GRP_NAME, b"mgmt\0");
        put_attr(&mut grp, CTRL_ATTR_MCAST_GRP_ID, &7u32.to_ne_bytes());
        let mut one = Vec::new();
        put_attr(&mut one, 1, &grp);
        let mut payload = vec![1, 1, 0, 0];
        put_attr(&mut payload, CTRL_ATTR_MCAST_GROUPS, &one);
        let groups = attrs_of(&payload);
        assert_eq!(groups.len(), 1);
        let inner = attrs_in(groups[0].1);
        let fields = attrs_in(inner[0].1);
        assert_eq!(fields[0], (CTRL_ATTR_MCAST_GRP_NAME, &b"mgmt\0"[..]));
        assert_eq!(fields[1].1, &7u32.to_ne_bytes()[..]);
    }
}

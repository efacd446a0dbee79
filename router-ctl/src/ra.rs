//! Router advertisements on the `qr-` ports (RFC 4861 §6.2), for the IPv6 subnets a definition
//! gives an `ipv6_ra_mode` — what radvd does in a Neutron router namespace, done by the daemon
//! (no process to supervise): the prefix (autonomous for `slaac` and `dhcpv6-stateless`, not
//! for `dhcpv6-stateful`), the managed and other-configuration flags, the port's MTU, the
//! router lifetime and the subnet's DNS servers (RDNSS, RFC 8106). Sent periodically (at a
//! random interval in [`MIN_INTERVAL`, `MAX_INTERVAL`], the first ones sooner) and in answer to
//! router solicitations (after a random delay of at most 0.5 s, at most one every 3 s), only
//! while the port holds the router's address (the active host of an HA router), and with a
//! router lifetime of 0 when a subnet, the port's role or the router goes away.

use std::{
    collections::BTreeMap,
    net::Ipv6Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    config::{IpNet, Ipv6Mode},
    state::RouterState,
};

/// Neutron's defaults (`min_rtr_adv_interval`, `max_rtr_adv_interval`).
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
pub const MAX_INTERVAL: Duration = Duration::from_secs(100);
/// The first advertisements come at most this far apart (RFC 4861 MAX_INITIAL_RTR_ADVERT_INTERVAL),
/// this many of them (MAX_INITIAL_RTR_ADVERTISEMENTS).
const INITIAL_INTERVAL: Duration = Duration::from_secs(16);
const INITIAL_COUNT: u32 = 3;
/// Solicited advertisements: a random delay up to this (MAX_RA_DELAY_TIME), and at most one
/// multicast advertisement per MIN_DELAY_BETWEEN_RAS.
const MAX_RA_DELAY: Duration = Duration::from_millis(500);
const MIN_DELAY_BETWEEN_RAS: Duration = Duration::from_secs(3);
/// radvd's defaults, as Neutron runs it: router lifetime 3 × the maximum interval, prefix
/// lifetimes one day (valid) and four hours (preferred), RDNSS twice the maximum interval.
const ROUTER_LIFETIME_S: u16 = 300;
const VALID_LIFETIME_S: u32 = 86_400;
const PREFERRED_LIFETIME_S: u32 = 14_400;
const RDNSS_LIFETIME_S: u32 = 200;

/// One advertised subnet of a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefix {
    pub subnet: IpNet,
    pub mode: Ipv6Mode,
    /// The router's address on the subnet: held by the port only on the active host.
    pub gateway: Ipv6Addr,
    pub dns: Vec<Ipv6Addr>,
}

/// A port that advertises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub device: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub prefixes: Vec<Prefix>,
}

impl Port {
    /// Whether the port holds the router's address on one of its advertised subnets (`held`:
    /// the namespace's addresses): only then does it advertise (an HA standby holds none).
    fn holds(&self, held: &[(String, Ipv6Addr)]) -> bool {
        self.prefixes.iter().any(|x| {
            held.iter()
                .any(|(d, a)| *d == self.device && *a == x.gateway)
        })
    }
}

/// The ports of a defined router that advertise, from its state (followed routers: none —
/// their own control plane runs radvd).
pub fn ports_of(st: &RouterState) -> Vec<Port> {
    let Some(def) = st.definition.as_ref().filter(|_| !st.followed) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in st.interfaces.iter().filter(|i| !i.external) {
        let Some(raw) = def.interface.iter().find(|r| r.port_id == i.port_id) else {
            continue;
        };
        let prefixes: Vec<Prefix> = raw
            .fixed_ips()
            .iter()
            .filter_map(|f| {
                let mode: Ipv6Mode = f.ipv6_ra_mode.as_deref()?.parse().ok()?;
                let subnet: IpNet = f.subnet.parse().ok()?;
                let gateway: Ipv6Addr = f.ip_address.parse().ok()?;
                let dns = f
                    .dns_nameservers
                    .iter()
                    .filter_map(|d| d.parse().ok())
                    .collect();
                Some(Prefix {
                    subnet,
                    mode,
                    gateway,
                    dns,
                })
            })
            .collect();
        if !prefixes.is_empty() {
            out.push(Port {
                device: i.device.clone(),
                mac: i.mac.map(|m| m.0).unwrap_or_default(),
                mtu: i.mtu,
                prefixes,
            });
        }
    }
    out
}

/// The advertisement mode of each (device, subnet) of `st` that has one.
pub fn modes(st: &RouterState) -> BTreeMap<(String, IpNet), Ipv6Mode> {
    ports_of(st)
        .into_iter()
        .flat_map(|p| {
            let dev = p.device;
            p.prefixes
                .into_iter()
                .map(move |x| ((dev.clone(), x.subnet), x.mode))
        })
        .collect()
}

/// The ICMPv6 router advertisement for `port` (checksum left 0: the kernel fills it in on a
/// raw ICMPv6 socket), with router lifetime `lifetime` seconds; a final one (0) also
/// deprecates its prefixes.
pub fn message(port: &Port, lifetime: u16) -> Vec<u8> {
    message_with(port, lifetime, lifetime == 0)
}

/// `message`, the prefixes deprecated (valid and preferred lifetimes 0) when `gone`.
fn message_with(port: &Port, lifetime: u16, gone: bool) -> Vec<u8> {
    let managed = port
        .prefixes
        .iter()
        .any(|p| p.mode == Ipv6Mode::Dhcpv6Stateful);
    let other = port
        .prefixes
        .iter()
        .any(|p| p.mode == Ipv6Mode::Dhcpv6Stateless);
    let flags = if managed { 0x80 } else { 0 } | if other { 0x40 } else { 0 };
    // Type, code, checksum, current hop limit 64, flags, router lifetime, reachable time and
    // retransmission timer unspecified.
    let mut m = vec![134, 0, 0, 0, 64, flags];
    m.extend_from_slice(&lifetime.to_be_bytes());
    m.extend_from_slice(&[0; 8]);
    // Source link-layer address.
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&port.mac);
    if port.mtu >= 1280 {
        m.extend_from_slice(&[5, 1, 0, 0]);
        m.extend_from_slice(&port.mtu.to_be_bytes());
    }
    let last = gone;
    for p in &port.prefixes {
        let autonomous =
            p.mode != Ipv6Mode::Dhcpv6Stateful || cfg!(mutant = "ra_stateful_autonomous");
        m.extend_from_slice(&[
            3,
            4,
            p.subnet.prefix_len(),
            0x80 | if autonomous { 0x40 } else { 0 },
        ]);
        let (valid, preferred) = if last {
            (0, 0)
        } else {
            (VALID_LIFETIME_S, PREFERRED_LIFETIME_S)
        };
        m.extend_from_slice(&valid.to_be_bytes());
        m.extend_from_slice(&preferred.to_be_bytes());
        m.extend_from_slice(&[0; 4]);
        let net = match p.subnet {
            IpNet::V6(n) => Ipv6Addr::from(n.network()),
            IpNet::V4(_) => Ipv6Addr::UNSPECIFIED,
        };
        m.extend_from_slice(&net.octets());
    }
    let mut dns: Vec<Ipv6Addr> = Vec::new();
    for d in port.prefixes.iter().flat_map(|p| p.dns.iter()) {
        if !dns.contains(d) {
            dns.push(*d);
        }
    }
    if !dns.is_empty() {
        m.extend_from_slice(&[25, 1 + 2 * dns.len() as u8, 0, 0]);
        let l = if lifetime == 0 { 0 } else { RDNSS_LIFETIME_S };
        m.extend_from_slice(&l.to_be_bytes());
        for d in dns {
            m.extend_from_slice(&d.octets());
        }
    }
    m
}

/// What a router's advertisements did, per port (written to `counters_path`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Advertisements sent (periodic, solicited and final).
    pub sent: u64,
    /// Solicitations answered.
    pub solicited: u64,
}

pub fn counters_path(router_id: &str) -> std::path::PathBuf {
    crate::state::run_dir()
        .join("ra")
        .join(format!("{router_id}.json"))
}

/// The counters of router `router_id`'s advertisements, per device.
pub fn counters(router_id: &str) -> BTreeMap<String, Counters> {
    std::fs::read(counters_path(router_id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// A router's advertiser: a thread in its namespace.
pub struct Advertiser {
    ports: Arc<Mutex<Vec<Port>>>,
    stop: Arc<AtomicBool>,
    /// Set with `stop`: a final advertisement on every port first.
    last: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Advertiser {
    pub fn start(router_id: &str, namespace: &str, ports: Vec<Port>) -> Result<Advertiser> {
        let ports = Arc::new(Mutex::new(ports));
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicBool::new(false));
        let (p, s, l) = (ports.clone(), stop.clone(), last.clone());
        let (id, ns) = (router_id.to_string(), namespace.to_string());
        let handle = std::thread::Builder::new()
            .name(format!("ra-{}", &id[..id.len().min(8)]))
            .spawn(move || {
                let r = crate::kernel::netns::open(&ns)
                    .and_then(|f| crate::kernel::netns::enter(&f))
                    .and_then(|_| run(&id, &p, &s, &l));
                if let Err(e) = r {
                    tracing::error!(router = %id, error = format!("{e:#}"), "router advertisements stopped");
                }
            })
            .context("cannot start the advertisement thread")?;
        Ok(Advertiser {
            ports,
            stop,
            last,
            handle,
        })
    }

    /// The ports as the router has them now: a port or prefix gone gets a final advertisement.
    pub fn update(&self, ports: Vec<Port>) {
        *self.ports.lock().unwrap_or_else(|e| e.into_inner()) = ports;
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops; with `last`, every port first sends a final advertisement (the router goes).
    pub fn stop(self, last: bool) {
        self.last.store(last, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.join();
    }
}

/// A port's advertising state in the thread.
struct Live {
    port: Port,
    ifindex: u32,
    next: Instant,
    initial_left: u32,
    last_multicast: Option<Instant>,
    /// Advertising (the port holds the router's address here).
    on: bool,
}

fn random_between(lo: Duration, hi: Duration) -> Duration {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into an 8-byte buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    let span = hi.saturating_sub(lo).as_millis() as u64;
    lo + Duration::from_millis(if span == 0 {
        0
    } else {
        u64::from_ne_bytes(b) % (span + 1)
    })
}

/// The (device, address) pairs of this namespace's IPv6 addresses.
fn addresses() -> Vec<(String, Ipv6Addr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; each entry is read only.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = &*p;
            if !a.ifa_addr.is_null() && i32::from((*a.ifa_addr).sa_family) == libc::AF_INET6 {
                let sin6 = &*(a.ifa_addr as *const libc::sockaddr_in6);
                let name = std::ffi::CStr::from_ptr(a.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                out.push((name, Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            p = a.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

fn ifindex(dev: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(dev) else {
        return 0;
    };
    // SAFETY: a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// The advertisement socket: raw ICMPv6, receiving router solicitations only, hop limit 255.
struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.0) };
    }
}

impl Socket {
    fn open() -> Result<Socket> {
        // SAFETY: plain socket calls; option values live on the stack for each call.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET6,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::IPPROTO_ICMPV6,
            );
            if fd < 0 {
                bail!("raw ICMPv6 socket: {}", std::io::Error::last_os_error());
            }
            let s = Socket(fd);
            // ICMP6_FILTER: block every type but router solicitations (133).
            let mut filter = [0xffff_ffffu32; 8];
            filter[133 >> 5] &= !(1 << (133 & 31));
            let set = |level, name, v: *const libc::c_void, len| {
                if libc::setsockopt(fd, level, name, v, len as libc::socklen_t) != 0 {
                    bail!("setsockopt {name}: {}", std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::IPPROTO_ICMPV6, 1, filter.as_ptr().cast(), 32)?;
            let hops: i32 = 255;
            let p = (&hops as *const i32).cast();
            set(libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, p, 4)?;
            set(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, p, 4)?;
            let on: i32 = 1;
            let p = (&on as *const i32).cast();
            set(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, p, 4)?;
            set(libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, p, 4)?;
            let off: i32 = 0;
            set(
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_LOOP,
                (&off as *const i32).cast(),
                4,
            )?;
            Ok(s)
        }
    }

    /// Listens for solicitations on `ifindex` (joins all-routers, ff02::2, there).
    fn join(&self, ifindex: u32) {
        let m = libc::ipv6_mreq {
            ipv6mr_multiaddr: libc::in6_addr {
                s6_addr: Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2).octets(),
            },
            ipv6mr_interface: ifindex,
        };
        // SAFETY: setsockopt with a valid ipv6_mreq; EADDRINUSE (joined already) is fine.
        unsafe {
            libc::setsockopt(
                self.0,
                libc::IPPROTO_IPV6,
                libc::IPV6_ADD_MEMBERSHIP,
                (&m as *const libc::ipv6_mreq).cast(),
                std::mem::size_of::<libc::ipv6_mreq>() as libc::socklen_t,
            );
        }
    }

    /// Sends `msg` to all nodes (ff02::1) on `ifindex`; the kernel picks the port's link-local
    /// address as the source.
    fn send(&self, ifindex: u32, msg: &[u8]) -> Result<()> {
        let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        to.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
        to.sin6_scope_id = ifindex;
        // SAFETY: sendto with a valid buffer and address.
        let n = unsafe {
            libc::sendto(
                self.0,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!(
                "sending a router advertisement: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// A router solicitation received, if any: the interface it came in on. Solicitations
    /// that are not valid (hop limit other than 255, code other than 0, too short) are dropped.
    fn solicitation(&self) -> Option<u32> {
        let mut buf = [0u8; 1500];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: recvmsg into our buffers; the control messages are read with the CMSG macros.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            let n = libc::recvmsg(self.0, &mut msg, libc::MSG_DONTWAIT);
            if n < 8 || buf[0] != 133 || buf[1] != 0 || cfg!(mutant = "ra_solicitations_ignored") {
                return None;
            }
            let (mut ifindex, mut hops) = (0u32, 0i32);
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                if (*c).cmsg_level == libc::IPPROTO_IPV6 {
                    if (*c).cmsg_type == libc::IPV6_PKTINFO {
                        ifindex = (*(data as *const libc::in6_pktinfo)).ipi6_ifindex;
                    } else if (*c).cmsg_type == libc::IPV6_HOPLIMIT {
                        hops = *(data as *const i32);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            (hops == 255 && ifindex != 0).then_some(ifindex)
        }
    }

    fn wait(&self, timeout: Duration) {
        let mut p = libc::pollfd {
            fd: self.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor.
        unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(500) as i32) };
    }
}

fn run(id: &str, ports: &Mutex<Vec<Port>>, stop: &AtomicBool, last: &AtomicBool) -> Result<()> {
    let sock = Socket::open()?;
    let mut live: BTreeMap<String, Live> = BTreeMap::new();
    let mut counts: BTreeMap<String, Counters> = counters(id);
    let mut dirty = false;
    let send = |l: &mut Live, lifetime: u16, counts: &mut BTreeMap<String, Counters>| match sock
        .send(l.ifindex, &message(&l.port, lifetime))
    {
        Ok(()) => {
            counts.entry(l.port.device.clone()).or_default().sent += 1;
            l.last_multicast = Some(Instant::now());
            true
        }
        Err(e) => {
            tracing::debug!(router = %id, device = %l.port.device, error = format!("{e:#}"), "advertisement not sent");
            false
        }
    };
    loop {
        let now = Instant::now();
        let want = ports.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let held = addresses();
        if stop.load(Ordering::SeqCst) {
            if last.load(Ordering::SeqCst) {
                for l in live.values_mut().filter(|l| l.on) {
                    send(l, 0, &mut counts);
                }
            }
            write_counters(id, &counts);
            return Ok(());
        }
        // Ports gone: a final advertisement while the device is still there. A port that
        // changed: its removed prefixes deprecated, then the new advertisement at once.
        let gone: Vec<String> = live
            .keys()
            .filter(|dev| !want.iter().any(|p| &p.device == *dev))
            .cloned()
            .collect();
        for dev in gone {
            if let Some(mut l) = live.remove(&dev) {
                if l.on && !cfg!(mutant = "ra_no_final") {
                    dirty |= send(&mut l, 0, &mut counts);
                    tracing::info!(router = %id, device = %dev, "advertisements ended (router lifetime 0 sent)");
                }
            }
        }
        for p in &want {
            let Some(l) = live.get_mut(&p.device).filter(|l| l.port != *p) else {
                continue;
            };
            let removed: Vec<Prefix> = l
                .port
                .prefixes
                .iter()
                .filter(|x| !p.prefixes.iter().any(|y| y.subnet == x.subnet))
                .cloned()
                .collect();
            if l.on && !removed.is_empty() {
                let old = Port {
                    prefixes: removed,
                    ..l.port.clone()
                };
                if sock
                    .send(l.ifindex, &message_with(&old, ROUTER_LIFETIME_S, true))
                    .is_ok()
                {
                    counts.entry(p.device.clone()).or_default().sent += 1;
                    dirty = true;
                }
            }
            l.port = p.clone();
            l.next = now;
        }
        for p in &want {
            let e = live.entry(p.device.clone()).or_insert_with(|| Live {
                port: p.clone(),
                ifindex: 0,
                next: now,
                initial_left: INITIAL_COUNT,
                last_multicast: None,
                on: false,
            });
            if e.ifindex == 0 {
                e.ifindex = ifindex(&p.device);
                if e.ifindex != 0 {
                    sock.join(e.ifindex);
                }
            }
            // Advertising only where the port holds one of the router's addresses of its
            // advertised subnets (an HA standby holds none).
            let on = e.ifindex != 0 && (p.holds(&held) || cfg!(mutant = "ra_standby_advertises"));
            if on && !e.on {
                e.next = now;
                e.initial_left = INITIAL_COUNT;
                tracing::info!(router = %id, device = %p.device, "advertising");
            } else if !on && e.on {
                // The role went (a standby now): routers that stop say so.
                dirty |= send(e, 0, &mut counts);
                tracing::info!(router = %id, device = %p.device, "advertisements ended: the router's address left the port");
            }
            e.on = on;
        }
        // Solicitations: answered with a multicast advertisement soon (at a random delay),
        // never sooner than MIN_DELAY_BETWEEN_RAS after the last one.
        while let Some(ifx) = sock.solicitation() {
            if let Some(l) = live.values_mut().find(|l| l.ifindex == ifx && l.on) {
                let soonest = l.last_multicast.map_or(now, |t| t + MIN_DELAY_BETWEEN_RAS);
                let at = (now + random_between(Duration::ZERO, MAX_RA_DELAY)).max(soonest);
                if at < l.next {
                    l.next = at;
                    counts.entry(l.port.device.clone()).or_default().solicited += 1;
                    dirty = true;
                }
            }
        }
        for l in live.values_mut().filter(|l| l.on && l.next <= now) {
            if !send(l, ROUTER_LIFETIME_S, &mut counts) {
                // Not sent (the port's link-local address still tentative, the link down):
                // again in a second.
                l.next = now + Duration::from_secs(1);
                continue;
            }
            dirty = true;
            let mut gap = random_between(MIN_INTERVAL, MAX_INTERVAL);
            if l.initial_left > 0 {
                l.initial_left -= 1;
                gap = gap.min(INITIAL_INTERVAL);
            }
            l.next = now + gap;
        }
        if dirty {
            write_counters(id, &counts);
            dirty = false;
        }
        let next = live
            .values()
            .filter(|l| l.on)
            .map(|l| l.next)
            .min()
            .map_or(Duration::from_millis(500), |t| {
                t.saturating_duration_since(Instant::now())
            });
        sock.wait(next);
    }
}

fn write_counters(id: &str, counts: &BTreeMap<String, Counters>) {
    let p = counters_path(id);
    if let Some(d) = p.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Ok(b) = serde_json::to_vec(counts) {
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, b).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
}

/// Final advertisements (router lifetime 0) on every advertising port of `st`, from the
/// calling process: what destroy sends before the router's devices go.
pub fn withdraw(st: &RouterState) {
    let ports = ports_of(st);
    if ports.is_empty() {
        return;
    }
    let r = crate::kernel::netns::run_in(&st.namespace, move || {
        let sock = Socket::open()?;
        let held = addresses();
        for p in &ports {
            let on = p.holds(&held);
            let ifx = ifindex(&p.device);
            if on && ifx != 0 {
                sock.send(ifx, &message(p, 0))?;
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        tracing::warn!(router = %st.id, error = format!("{e:#}"), "cannot send the final router advertisements");
    }
    let _ = std::fs::remove_file(counters_path(&st.id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(mode: Ipv6Mode, dns: Vec<Ipv6Addr>) -> Port {
        Port {
            device: "qr-x".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            prefixes: vec![Prefix {
                subnet: "2001:db8:100::/64".parse().unwrap(),
                mode,
                gateway: "2001:db8:100::1".parse().unwrap(),
                dns,
            }],
        }
    }

    /// The bytes of each mode's advertisement: header and flags, source link-layer address,
    /// MTU, prefix (autonomous or not), RDNSS.
    #[test]
    fn each_mode_advertises_its_flags_and_options() {
        let head = |flags: u8, life: [u8; 2]| {
            let mut h = vec![
                134, 0, 0, 0, 64, flags, life[0], life[1], 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            h.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]);
            h.extend_from_slice(&[5, 1, 0, 0, 0, 0, 0x05, 0xdc]);
            h
        };
        let prefix = |a: u8, valid: [u8; 4], pref: [u8; 4]| {
            let mut p = vec![3, 4, 64, 0x80 | a];
            p.extend_from_slice(&valid);
            p.extend_from_slice(&pref);
            p.extend_from_slice(&[0; 4]);
            p.extend_from_slice(&[
                0x20, 0x01, 0x0d, 0xb8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            p
        };
        let (v, p) = ([0, 1, 0x51, 0x80], [0, 0, 0x38, 0x40]);
        let slaac = [head(0, [1, 0x2c]), prefix(0x40, v, p)].concat();
        assert_eq!(message(&port(Ipv6Mode::Slaac, vec![]), 300), slaac);
        let stateless = [head(0x40, [1, 0x2c]), prefix(0x40, v, p)].concat();
        assert_eq!(
            message(&port(Ipv6Mode::Dhcpv6Stateless, vec![]), 300),
            stateless
        );
        let stateful = [head(0x80, [1, 0x2c]), prefix(0, v, p)].concat();
        assert_eq!(
            message(&port(Ipv6Mode::Dhcpv6Stateful, vec![]), 300),
            stateful
        );
        // DNS servers: one RDNSS option; the final advertisement: lifetimes 0.
        let dns: Ipv6Addr = "2001:db8::53".parse().unwrap();
        let mut rdnss = vec![25, 3, 0, 0, 0, 0, 0, 200];
        rdnss.extend_from_slice(&dns.octets());
        assert_eq!(
            message(&port(Ipv6Mode::Slaac, vec![dns]), 300),
            [slaac.clone(), rdnss].concat()
        );
        let mut last_rdnss = vec![25, 3, 0, 0, 0, 0, 0, 0];
        last_rdnss.extend_from_slice(&dns.octets());
        assert_eq!(
            message(&port(Ipv6Mode::Slaac, vec![dns]), 0),
            [head(0, [0, 0]), prefix(0x40, [0; 4], [0; 4]), last_rdnss].concat()
        );
    }
}

//! Router definitions (TOML, in Neutron's vocabulary) and their validation.
//!
//! Everything here is pure: a file is parsed and checked completely before `apply` touches the
//! system, and every error names the router, the port or route, and the field.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use router_common::MAX_IFACES;

/// The largest route table a router may ask for.
pub const MAX_ROUTES_LIMIT: u64 = 4_000_000;

/// Longest Linux device name (IFNAMSIZ − 1).
pub const IFNAMSIZ_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// An IPv4 prefix such as 172.16.100.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Net {
    pub fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len as u32)
        }
    }
    pub fn network(&self) -> u32 {
        u32::from(self.addr) & Self::mask(self.len)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == self.network()
    }
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        let len = self.len.min(other.len);
        u32::from(self.addr) & Self::mask(len) == u32::from(other.addr) & Self::mask(len)
    }
    /// The directed broadcast address, for prefixes that have one (/30 and shorter).
    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        (self.len <= 30).then(|| Ipv4Addr::from(self.network() | !Self::mask(self.len)))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').ok_or_else(|| {
            format!("'{s}' is not a prefix: expected ADDRESS/LENGTH, e.g. 172.16.100.0/24")
        })?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("'{a}' in '{s}' is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("'{l}' in '{s}' is not a prefix length from 0 to 32"))?;
        let net = Ipv4Net { addr, len };
        if u32::from(addr) != net.network() {
            return Err(format!(
                "'{s}' has host bits set; the prefix is {}/{len}",
                Ipv4Addr::from(net.network())
            ));
        }
        Ok(net)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An IPv6 prefix such as 2001:db8:100::/64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Net {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Ipv6Net {
    pub fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - len as u32)
        }
    }
    pub fn network(&self) -> u128 {
        u128::from(self.addr) & Self::mask(self.len)
    }
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask(self.len) == self.network()
    }
    pub fn overlaps(&self, other: &Ipv6Net) -> bool {
        let len = self.len.min(other.len);
        u128::from(self.addr) & Self::mask(len) == u128::from(other.addr) & Self::mask(len)
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv6Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').ok_or_else(|| {
            format!("'{s}' is not a prefix: expected ADDRESS/LENGTH, e.g. 2001:db8:100::/64")
        })?;
        let addr: Ipv6Addr = a
            .parse()
            .map_err(|_| format!("'{a}' in '{s}' is not an IPv6 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("'{l}' in '{s}' is not a prefix length from 0 to 128"))?;
        let net = Ipv6Net { addr, len };
        if u128::from(addr) != net.network() {
            return Err(format!(
                "'{s}' has host bits set; the prefix is {}/{len}",
                Ipv6Addr::from(net.network())
            ));
        }
        Ok(net)
    }
}

/// An IPv4 or IPv6 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpNet {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl IpNet {
    pub fn prefix_len(&self) -> u8 {
        match self {
            IpNet::V4(n) => n.len,
            IpNet::V6(n) => n.len,
        }
    }
    pub fn is_ipv6(&self) -> bool {
        matches!(self, IpNet::V6(_))
    }
    pub fn family(&self) -> &'static str {
        if self.is_ipv6() {
            "IPv6"
        } else {
            "IPv4"
        }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (IpNet::V4(n), IpAddr::V4(a)) => n.contains(a),
            (IpNet::V6(n), IpAddr::V6(a)) => n.contains(a),
            _ => false,
        }
    }
    pub fn overlaps(&self, other: &IpNet) -> bool {
        match (self, other) {
            (IpNet::V4(a), IpNet::V4(b)) => a.overlaps(b),
            (IpNet::V6(a), IpNet::V6(b)) => a.overlaps(b),
            _ => false,
        }
    }
    /// The prefix of one address: /32 or /128.
    pub fn host(ip: IpAddr) -> IpNet {
        match ip {
            IpAddr::V4(addr) => IpNet::V4(Ipv4Net { addr, len: 32 }),
            IpAddr::V6(addr) => IpNet::V6(Ipv6Net { addr, len: 128 }),
        }
    }
}

impl From<Ipv4Net> for IpNet {
    fn from(n: Ipv4Net) -> IpNet {
        IpNet::V4(n)
    }
}

impl From<Ipv6Net> for IpNet {
    fn from(n: Ipv6Net) -> IpNet {
        IpNet::V6(n)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpNet::V4(n) => n.fmt(f),
            IpNet::V6(n) => n.fmt(f),
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains(':') {
            s.parse().map(IpNet::V6)
        } else {
            s.parse().map(IpNet::V4)
        }
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An Ethernet (MAC) address, written in its usual notation: `02:00:5e:10:00:01`, lower case
/// (as a string in JSON and TOML).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl From<[u8; 6]> for Mac {
    fn from(b: [u8; 6]) -> Mac {
        Mac(b)
    }
}

impl From<Mac> for [u8; 6] {
    fn from(m: Mac) -> [u8; 6] {
        m.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            *b = parts
                .next()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("'{s}' is not a MAC address (e.g. 02:00:5e:10:00:01)"))?;
        }
        match parts.next() {
            None => Ok(Mac(mac)),
            Some(_) => Err(format!(
                "'{s}' is not a MAC address (e.g. 02:00:5e:10:00:01)"
            )),
        }
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A MAC address from its usual notation (`02:00:5e:10:00:01`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<Mac>().ok().map(|m| m.0)
}

/// A MAC address in its usual notation.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    Mac(*mac).to_string()
}

/// Most addresses on one router interface.
pub const MAX_FIXED_IPS: usize = 16;

/// The file as written: `[[router]]` tables.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    #[serde(default)]
    pub router: Vec<RawRouter>,
}

/// A router's definition as written (a file's `[[router]]`, an etcd value, what the verbs
/// change): `parse` validates it into a `Router`, `Router::definition` gives it back, and
/// `to_text` writes it through the TOML serializer (never by formatting text: names chosen by
/// tenants may hold any character).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouter {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_routes: Option<u64>,
    /// L3 HA: an active host and standbys (only where an etcd agent schedules the router).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ha: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interface: Vec<RawInterface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RawRoute>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_gateway: Option<RawGateway>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub floating_ip: Vec<RawFloatingIp>,
}

/// `[router.external_gateway]`: the router's port on the external network (Neutron's
/// `external_gateway_info`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub port_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_snat: Option<bool>,
    #[serde(default)]
    pub external_fixed_ips: Vec<RawExternalIp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawExternalIp {
    pub subnet: String,
    pub ip_address: String,
    /// The external subnet's gateway (the upstream router): the router's default route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_ip: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFloatingIp {
    pub floating_ip_address: String,
    /// None: allocated to the router but associated with no instance (nothing is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_ip_address: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawInterface {
    pub port_id: String,
    /// The single-subnet form: `subnet` and `gateway_ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_ip: Option<String>,
    /// Neutron's form: one entry per subnet of the port (dual-stack: one IPv4, one IPv6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_ips: Option<Vec<RawFixedIp>>,
    /// Where the fast path runs on this device: "auto" (default), "xdp" or "tc".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFixedIp {
    pub subnet: String,
    pub ip_address: String,
    /// IPv6 subnets: Neutron's `ipv6_ra_mode` ("slaac", "dhcpv6-stateful",
    /// "dhcpv6-stateless"): the router advertises the subnet on the port (router
    /// advertisements, sent by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_ra_mode: Option<String>,
    /// IPv6 subnets: Neutron's `ipv6_address_mode` (how instances get their addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_address_mode: Option<String>,
    /// IPv6 subnets advertised: DNS servers (IPv6, at most 3) sent as RDNSS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_nameservers: Vec<String>,
}

impl RawFixedIp {
    /// Whether the entry says more than its subnet and address (then it keeps the
    /// `fixed_ips` form).
    fn has_options(&self) -> bool {
        self.ipv6_ra_mode.is_some()
            || self.ipv6_address_mode.is_some()
            || !self.dns_nameservers.is_empty()
    }
}

impl From<&FixedIp> for RawFixedIp {
    fn from(f: &FixedIp) -> RawFixedIp {
        RawFixedIp {
            subnet: f.subnet.to_string(),
            ip_address: f.gateway_ip.to_string(),
            ipv6_ra_mode: f.ipv6_ra_mode.map(|m| m.as_str().to_string()),
            ipv6_address_mode: f.ipv6_address_mode.map(|m| m.as_str().to_string()),
            dns_nameservers: f.dns_nameservers.iter().map(|d| d.to_string()).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub destination: String,
    pub nexthop: String,
}

impl RawInterface {
    /// The written form of port `port_id` with its (subnet, gateway address) pairs and hook:
    /// what `Router::definition` and a definition rebuilt from an old state both write.
    pub fn of(
        port_id: &str,
        fixed: impl IntoIterator<Item = RawFixedIp>,
        hook: Hook,
    ) -> RawInterface {
        RawInterface::new(
            port_id.to_string(),
            fixed.into_iter().collect(),
            raw_hook(hook),
        )
    }

    /// Port `port_id` with fixed IPs `ips` (the single-subnet form when there is one).
    pub fn new(port_id: String, ips: Vec<RawFixedIp>, hook: Option<String>) -> RawInterface {
        let mut i = RawInterface {
            port_id,
            subnet: None,
            gateway_ip: None,
            fixed_ips: None,
            hook,
        };
        i.set_fixed_ips(ips);
        i
    }

    /// The port's fixed IPs, whichever form the definition uses.
    pub fn fixed_ips(&self) -> Vec<RawFixedIp> {
        match (&self.fixed_ips, &self.subnet, &self.gateway_ip) {
            (Some(v), _, _) => v.clone(),
            (None, Some(s), Some(g)) => vec![RawFixedIp {
                subnet: s.clone(),
                ip_address: g.clone(),
                ..RawFixedIp::default()
            }],
            _ => Vec::new(),
        }
    }

    /// Sets the port's fixed IPs, in the single-subnet form when there is one.
    pub fn set_fixed_ips(&mut self, ips: Vec<RawFixedIp>) {
        match &ips[..] {
            [one] if !one.has_options() => {
                self.subnet = Some(one.subnet.clone());
                self.gateway_ip = Some(one.ip_address.clone());
                self.fixed_ips = None;
            }
            _ => {
                self.subnet = None;
                self.gateway_ip = None;
                self.fixed_ips = Some(ips);
            }
        }
    }
}

/// Definitions as a file states them, written by the TOML serializer.
pub fn to_text(routers: &[RawRouter]) -> String {
    toml::to_string(&RawFile {
        router: routers.to_vec(),
    })
    .expect("a definition of strings, numbers and booleans always serializes")
}

/// Where the fast path runs on a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// The hook that is correct for the device and fastest for the traffic it carries: tc for
    /// devices whose traffic arrives as skbs (veth, tap, Open vSwitch internal ports, any
    /// virtual device, any device without native XDP), XDP for a NIC with native XDP.
    #[default]
    Auto,
    /// XDP in native mode (refused on a device without native XDP).
    Xdp,
    /// tc, at tcx ingress.
    Tc,
}

impl FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Hook, String> {
        match s {
            "auto" => Ok(Hook::Auto),
            "xdp" => Ok(Hook::Xdp),
            "tc" => Ok(Hook::Tc),
            _ => Err(format!("= '{s}' must be \"auto\", \"xdp\" or \"tc\"")),
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Auto => "auto",
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        })
    }
}

/// A validated router definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Router {
    pub id: String,
    pub name: String,
    /// How many routes the fast path's table is sized for when the router is first applied
    /// (its maps cannot grow later); None: room for the routes defined, with a quarter to spare.
    pub max_routes: Option<u32>,
    /// L3 HA (Neutron's `ha`): scheduled by the etcd agents on an active host and a standby;
    /// the standby holds the namespace, devices and maps ready without the router's addresses.
    /// A file applied on one host ignores it.
    pub ha: bool,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<ExtraRoute>,
    /// The external gateway: its port is also in `interfaces` (marked `external`).
    pub gateway: Option<Gateway>,
    pub floating_ips: Vec<FloatingIp>,
}

/// What the router does on its external network besides addressing its `qg-` port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub port_id: String,
    pub network_id: Option<String>,
    /// Instances without a floating IP leave with the gateway address as source (Neutron's
    /// default), or untranslated when false.
    pub enable_snat: bool,
    /// The upstream router of each external subnet that names one: (its address, the
    /// router's own address on that subnet, the subnet). One per family becomes the default
    /// route.
    pub upstreams: Vec<Upstream>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Upstream {
    pub gateway_ip: IpAddr,
    pub ip_address: IpAddr,
    pub subnet: IpNet,
}

impl Upstream {
    /// The upstream router lies outside its subnet: it is reached through an on-link route.
    pub fn onlink(&self) -> bool {
        !self.subnet.contains(self.gateway_ip)
    }
}

/// A floating IP: 1:1 NAT between an external address and an instance's fixed address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FloatingIp {
    pub floating_ip_address: Ipv4Addr,
    /// None: not associated (`floating ip unset`): recorded, not configured.
    pub fixed_ip_address: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub port_id: String,
    /// `qr-` + the first 11 characters of the port id.
    pub device: String,
    /// The port's subnets and the router's address on each (its gateway IP), in file order.
    pub fixed_ips: Vec<FixedIp>,
    /// Where the fast path runs on the device.
    pub hook: Hook,
    /// The external gateway's port (`qg-`), not a tenant subnet's.
    pub external: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FixedIp {
    pub subnet: IpNet,
    pub gateway_ip: IpAddr,
    /// IPv6: the subnet is advertised on its port in this mode (router advertisements).
    pub ipv6_ra_mode: Option<Ipv6Mode>,
    pub ipv6_address_mode: Option<Ipv6Mode>,
    /// Sent as RDNSS in the advertisements.
    pub dns_nameservers: Vec<std::net::Ipv6Addr>,
}

/// Neutron's IPv6 modes of a subnet (`ipv6_ra_mode`, `ipv6_address_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ipv6Mode {
    /// Addresses by stateless autoconfiguration from the advertised prefix.
    #[serde(rename = "slaac")]
    Slaac,
    /// Addresses from DHCPv6 (the "managed" flag; the prefix is not autonomous).
    #[serde(rename = "dhcpv6-stateful")]
    Dhcpv6Stateful,
    /// Addresses by autoconfiguration, other configuration from DHCPv6 (the "other" flag).
    #[serde(rename = "dhcpv6-stateless")]
    Dhcpv6Stateless,
}

impl Ipv6Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Ipv6Mode::Slaac => "slaac",
            Ipv6Mode::Dhcpv6Stateful => "dhcpv6-stateful",
            Ipv6Mode::Dhcpv6Stateless => "dhcpv6-stateless",
        }
    }
}

impl std::str::FromStr for Ipv6Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "slaac" => Ok(Ipv6Mode::Slaac),
            "dhcpv6-stateful" => Ok(Ipv6Mode::Dhcpv6Stateful),
            "dhcpv6-stateless" => Ok(Ipv6Mode::Dhcpv6Stateless),
            _ => Err(format!(
                " = '{s}' is not an IPv6 mode: use slaac, dhcpv6-stateful or dhcpv6-stateless"
            )),
        }
    }
}

/// At most this many DNS servers per subnet (what Neutron passes to radvd's RDNSS).
pub const MAX_DNS_NAMESERVERS: usize = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExtraRoute {
    pub destination: IpNet,
    pub nexthop: IpAddr,
}

impl Router {
    /// The definition this router was validated from, in its written form (the
    /// single-subnet form for a port with one subnet); `parse` of its text gives this router
    /// back.
    pub fn definition(&self) -> RawRouter {
        let interface = self
            .interfaces
            .iter()
            .filter(|i| !i.external)
            .map(|i| RawInterface::of(&i.port_id, i.fixed_ips.iter().map(RawFixedIp::from), i.hook))
            .collect();
        let route = self
            .routes
            .iter()
            .map(|r| RawRoute::of(r.destination, r.nexthop))
            .collect();
        let qg = self.interfaces.iter().find(|i| i.external);
        let external_gateway = self.gateway.as_ref().map(|g| RawGateway {
            port_id: g.port_id.clone(),
            network_id: g.network_id.clone(),
            enable_snat: Some(g.enable_snat),
            external_fixed_ips: qg
                .map(|q| {
                    q.fixed_ips
                        .iter()
                        .map(|f| RawExternalIp {
                            subnet: f.subnet.to_string(),
                            ip_address: f.gateway_ip.to_string(),
                            gateway_ip: g
                                .upstreams
                                .iter()
                                .find(|u| u.ip_address == f.gateway_ip && u.subnet == f.subnet)
                                .map(|u| u.gateway_ip.to_string()),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            hook: qg.and_then(|q| raw_hook(q.hook)),
        });
        let floating_ip = self
            .floating_ips
            .iter()
            .map(|f| RawFloatingIp::of(f.floating_ip_address, f.fixed_ip_address))
            .collect();
        RawRouter {
            id: self.id.clone(),
            name: Some(self.name.clone()),
            max_routes: self.max_routes.map(u64::from),
            ha: self.ha,
            interface,
            route,
            external_gateway,
            floating_ip,
        }
    }

    pub fn namespace(&self) -> String {
        namespace_of(&self.id)
    }
    /// The interface with a subnet holding `ip`.
    pub fn interface_for(&self, ip: IpAddr) -> Option<&Interface> {
        self.interfaces
            .iter()
            .find(|i| i.fixed_ips.iter().any(|f| f.subnet.contains(ip)))
    }
}

/// A hook as a definition writes it: nothing for `auto`, the default.
pub fn raw_hook(h: Hook) -> Option<String> {
    (h != Hook::Auto).then(|| h.to_string())
}

impl RawRoute {
    pub fn of(destination: IpNet, nexthop: IpAddr) -> RawRoute {
        RawRoute {
            destination: destination.to_string(),
            nexthop: nexthop.to_string(),
        }
    }
}

impl RawFloatingIp {
    pub fn of(floating: Ipv4Addr, fixed: Option<Ipv4Addr>) -> RawFloatingIp {
        RawFloatingIp {
            floating_ip_address: floating.to_string(),
            fixed_ip_address: fixed.map(|x| x.to_string()),
        }
    }
}

/// `qrouter-<id>`; an agent run with `--instance NAME` uses `qrouter-NAME-<id>`
/// (`ROUTER_XDP_NS_PREFIX`), so that several agents can share one machine.
pub fn namespace_of(router_id: &str) -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let p = PREFIX.get_or_init(|| {
        std::env::var("ROUTER_XDP_NS_PREFIX").unwrap_or_else(|_| "qrouter-".into())
    });
    format!("{p}{router_id}")
}

pub fn device_of(port_id: &str) -> String {
    format!("qr-{}", &port_id[..port_id.len().min(11)])
}

/// The external gateway port's device: `qg-` + the first 11 characters of the port id.
pub fn gateway_device_of(port_id: &str) -> String {
    format!("qg-{}", &port_id[..port_id.len().min(11)])
}

/// The veth peer that `apply` creates for a missing `qr-` device (linuxbridge's tap naming).
pub fn peer_of(port_id: &str) -> String {
    format!("tap{}", &port_id[..port_id.len().min(11)])
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn load_file(path: &Path) -> Result<Vec<Router>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: path.display().to_string(),
            message,
        },
        ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Parses and validates a whole file; the first problem found is returned.
pub fn parse(text: &str) -> Result<Vec<Router>, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: "<config>".into(),
        message: e.to_string(),
    })?;
    validate(raw.router)
}

/// Validates definitions (each, then across them); the first problem found is returned.
pub fn validate(raw: Vec<RawRouter>) -> Result<Vec<Router>, ConfigError> {
    let mut routers = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        routers.push(validate_router(i, r).map_err(ConfigError::Invalid)?);
    }
    validate_across(&routers).map_err(ConfigError::Invalid)?;
    Ok(routers)
}

fn validate_router(index: usize, r: RawRouter) -> Result<Router, String> {
    if !valid_id(&r.id) {
        return Err(format!(
            "router #{}: field 'id' = '{}' must be 1 to 64 letters, digits, '-' or '_' (a Neutron router UUID)",
            index + 1,
            r.id
        ));
    }
    let rname = r.name.clone().unwrap_or_else(|| r.id.clone());
    let who = format!("router {} ({})", r.id, rname);
    if r.interface.len() > MAX_IFACES as usize {
        return Err(format!(
            "{who}: {} interfaces, at most {MAX_IFACES} are supported",
            r.interface.len()
        ));
    }
    let mut interfaces: Vec<Interface> = Vec::new();
    for (j, i) in r.interface.into_iter().enumerate() {
        let at = format!("{who}, interface #{} (port_id '{}')", j + 1, i.port_id);
        if i.port_id.len() < 11 || !valid_id(&i.port_id) {
            return Err(format!(
                "{at}: field 'port_id' must be a Neutron port UUID (at least 11 letters, digits or '-')"
            ));
        }
        let pairs: Vec<(RawFixedIp, String)> = match (i.subnet, i.gateway_ip, i.fixed_ips) {
            (Some(s), Some(g), None) => vec![(
                RawFixedIp {
                    subnet: s,
                    ip_address: g,
                    ..RawFixedIp::default()
                },
                "gateway_ip".into(),
            )],
            (None, None, Some(f)) if !f.is_empty() => f
                .into_iter()
                .enumerate()
                .map(|(n, f)| (f, format!("fixed_ips[{n}].ip_address")))
                .collect(),
            (None, None, Some(_)) => {
                return Err(format!(
                    "{at}: field 'fixed_ips' is empty; give at least one {{ subnet, ip_address }}"
                ))
            }
            (Some(_), None, None) => {
                return Err(format!(
                    "{at}: missing field `gateway_ip` (the router's address on 'subnet')"
                ))
            }
            (None, Some(_), None) => {
                return Err(format!(
                    "{at}: missing field `subnet` (the subnet 'gateway_ip' belongs to)"
                ))
            }
            (None, None, None) => {
                return Err(format!(
                    "{at}: missing field `fixed_ips` (or `subnet` and `gateway_ip`)"
                ))
            }
            _ => {
                return Err(format!(
                    "{at}: give either 'subnet' and 'gateway_ip' or 'fixed_ips', not both"
                ))
            }
        };
        if pairs.len() > MAX_FIXED_IPS {
            return Err(format!(
                "{at}: field 'fixed_ips' has {} entries, at most {MAX_FIXED_IPS} are supported",
                pairs.len()
            ));
        }
        let device = device_of(&i.port_id);
        let mut fixed_ips: Vec<FixedIp> = Vec::new();
        for (raw, field) in pairs {
            let sfield = field
                .replace("ip_address", "subnet")
                .replace("gateway_ip", "subnet");
            let mut f = fixed_ip(&raw.subnet, &raw.ip_address).map_err(|(which, e)| {
                format!("{at}: field '{}'{e}", if which { &field } else { &sfield })
            })?;
            ipv6_options(&mut f, &raw).map_err(|(what, e)| {
                format!("{at}: field '{}{what}'{e}", field.replace("ip_address", ""))
            })?;
            let clash = fixed_ips.iter().map(|x| (x, i.port_id.as_str())).chain(
                interfaces
                    .iter()
                    .flat_map(|p| p.fixed_ips.iter().map(move |x| (x, p.port_id.as_str()))),
            );
            for (prev, port) in clash {
                if prev.subnet.overlaps(&f.subnet) {
                    return Err(format!(
                        "{at}: field '{sfield}' = {} overlaps subnet {} of port {port}",
                        f.subnet, prev.subnet
                    ));
                }
            }
            fixed_ips.push(f);
        }
        for prev in &interfaces {
            if prev.port_id == i.port_id {
                return Err(format!(
                    "{at}: duplicate port_id, already used by another interface of this router"
                ));
            }
            if prev.device == device {
                return Err(format!(
                    "{at}: device name {device} is already used by port {} (the first 11 characters of the port ids are equal)",
                    prev.port_id
                ));
            }
        }
        let hook = match i.hook.as_deref() {
            None => Hook::Auto,
            Some(h) => h.parse().map_err(|e| format!("{at}: field 'hook' {e}"))?,
        };
        interfaces.push(Interface {
            port_id: i.port_id,
            device,
            fixed_ips,
            hook,
            external: false,
        });
    }
    let gateway = match r.external_gateway {
        Some(g) => Some(validate_gateway(&who, g, &mut interfaces)?),
        None => None,
    };
    let mut routes: Vec<ExtraRoute> = Vec::with_capacity(r.route.len());
    // The nexthops of each destination so far: the duplicate and ECMP checks in constant time
    // (a table of a million routes must not cost a million scans of itself).
    let mut paths_of: std::collections::HashMap<IpNet, Vec<IpAddr>> =
        std::collections::HashMap::with_capacity(r.route.len());
    for (k, rt) in r.route.into_iter().enumerate() {
        let at = format!("{who}, route #{} (destination '{}')", k + 1, rt.destination);
        let destination: IpNet = rt
            .destination
            .parse()
            .map_err(|e| format!("{at}: field 'destination': {e}"))?;
        let nexthop: IpAddr = rt.nexthop.parse().map_err(|_| {
            format!(
                "{at}: field 'nexthop' = '{}' is not an IP address",
                rt.nexthop
            )
        })?;
        if nexthop.is_ipv6() != destination.is_ipv6() {
            return Err(format!(
                "{at}: field 'nexthop' = {nexthop} is not an {} address like destination {destination}",
                destination.family()
            ));
        }
        let on = |f: &FixedIp| f.subnet.contains(nexthop);
        let Some(via) = interfaces.iter().find(|i| i.fixed_ips.iter().any(on)) else {
            let connected: Vec<String> = interfaces
                .iter()
                .flat_map(|i| i.fixed_ips.iter())
                .filter(|f| f.subnet.is_ipv6() == nexthop.is_ipv6())
                .map(|f| f.subnet.to_string())
                .collect();
            return Err(format!(
                "{at}: field 'nexthop' = {nexthop} is not on a connected {} subnet of this router ({})",
                destination.family(),
                if connected.is_empty() { "it has none".to_string() } else { connected.join(", ") }
            ));
        };
        if via.fixed_ips.iter().any(|f| f.gateway_ip == nexthop) {
            return Err(format!(
                "{at}: field 'nexthop' = {nexthop} is the router's own address on {}",
                via.device
            ));
        }
        if let Some(i) = interfaces
            .iter()
            .find(|i| i.fixed_ips.iter().any(|f| f.subnet == destination))
        {
            return Err(format!(
                "{at}: field 'destination' = {destination} is the connected subnet of port {}",
                i.port_id
            ));
        }
        let paths = paths_of.entry(destination).or_default();
        if paths.contains(&nexthop) {
            return Err(format!(
                "{at}: route to {destination} via {nexthop} is defined twice"
            ));
        }
        if paths.len() >= router_common::fib::MAX_PATHS {
            return Err(format!(
                "{at}: destination {destination} has more than {} nexthops (ECMP paths)",
                router_common::fib::MAX_PATHS
            ));
        }
        if destination.prefix_len() == 0 {
            if let Some(u) = gateway
                .iter()
                .flat_map(|g| g.upstreams.iter())
                .find(|u| u.gateway_ip.is_ipv6() == destination.is_ipv6())
            {
                return Err(format!(
                    "{at}: field 'destination' = {destination} is the external gateway's default route (via {}); remove this route or the gateway's gateway_ip",
                    u.gateway_ip
                ));
            }
        }
        paths.push(nexthop);
        routes.push(ExtraRoute {
            destination,
            nexthop,
        });
    }
    let floating_ips = validate_floating_ips(&who, r.floating_ip, &gateway, &interfaces)?;
    let max_routes = match r.max_routes {
        None => None,
        Some(n) if (1..=MAX_ROUTES_LIMIT).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(format!(
                "{who}: field 'max_routes' = {n} must be from 1 to {MAX_ROUTES_LIMIT}"
            ))
        }
    };
    Ok(Router {
        id: r.id,
        name: rname,
        max_routes,
        ha: r.ha,
        interfaces,
        routes,
        gateway,
        floating_ips,
    })
}

/// `[router.external_gateway]`: its port joins `interfaces` (as `external`).
fn validate_gateway(
    who: &str,
    g: RawGateway,
    interfaces: &mut Vec<Interface>,
) -> Result<Gateway, String> {
    let at = format!("{who}, external_gateway (port_id '{}')", g.port_id);
    if g.port_id.len() < 11 || !valid_id(&g.port_id) {
        return Err(format!(
            "{at}: field 'port_id' must be a Neutron port UUID (at least 11 letters, digits or '-')"
        ));
    }
    if let Some(n) = &g.network_id {
        if !valid_id(n) {
            return Err(format!(
                "{at}: field 'network_id' = '{n}' must be 1 to 64 letters, digits, '-' or '_'"
            ));
        }
    }
    if interfaces.iter().any(|i| i.port_id == g.port_id) {
        return Err(format!(
            "{at}: field 'port_id' is also the port of one of the router's interfaces"
        ));
    }
    if interfaces.len() + 1 > MAX_IFACES as usize {
        return Err(format!(
            "{at}: the router has {} interfaces and a gateway, at most {MAX_IFACES} devices are supported",
            interfaces.len()
        ));
    }
    if g.external_fixed_ips.is_empty() {
        return Err(format!(
            "{at}: field 'external_fixed_ips' is missing or empty; give at least one {{ subnet, ip_address, gateway_ip }}"
        ));
    }
    if g.external_fixed_ips.len() > MAX_FIXED_IPS {
        return Err(format!(
            "{at}: field 'external_fixed_ips' has {} entries, at most {MAX_FIXED_IPS} are supported",
            g.external_fixed_ips.len()
        ));
    }
    let mut fixed_ips: Vec<FixedIp> = Vec::new();
    let mut upstreams: Vec<Upstream> = Vec::new();
    for (n, x) in g.external_fixed_ips.into_iter().enumerate() {
        let field = format!("external_fixed_ips[{n}]");
        let f = fixed_ip(&x.subnet, &x.ip_address).map_err(|(which, e)| {
            format!(
                "{at}: field '{field}.{}'{e}",
                if which { "ip_address" } else { "subnet" }
            )
        })?;
        for (prev, port) in fixed_ips.iter().map(|p| (p, g.port_id.as_str())).chain(
            interfaces
                .iter()
                .flat_map(|i| i.fixed_ips.iter().map(move |p| (p, i.port_id.as_str()))),
        ) {
            if prev.subnet.overlaps(&f.subnet) {
                return Err(format!(
                    "{at}: field '{field}.subnet' = {} overlaps subnet {} of port {port}",
                    f.subnet, prev.subnet
                ));
            }
        }
        if let Some(gw) = x.gateway_ip {
            let ip: IpAddr = gw.parse().map_err(|_| {
                format!("{at}: field '{field}.gateway_ip' = '{gw}' is not an IP address")
            })?;
            if ip.is_ipv6() != f.subnet.is_ipv6() {
                return Err(format!(
                    "{at}: field '{field}.gateway_ip' = {ip} is not an {} address like subnet {}",
                    f.subnet.family(),
                    f.subnet
                ));
            }
            if ip == f.gateway_ip {
                return Err(format!(
                    "{at}: field '{field}.gateway_ip' = {ip} is the router's own external address (ip_address); give the external subnet's gateway"
                ));
            }
            if upstreams
                .iter()
                .any(|u| u.gateway_ip.is_ipv6() == ip.is_ipv6())
            {
                return Err(format!(
                    "{at}: field '{field}.gateway_ip' = {ip}: another {} external subnet already gives the default route's gateway",
                    f.subnet.family()
                ));
            }
            upstreams.push(Upstream {
                gateway_ip: ip,
                ip_address: f.gateway_ip,
                subnet: f.subnet,
            });
        }
        fixed_ips.push(f);
    }
    let hook = match g.hook.as_deref() {
        None => Hook::Auto,
        Some(h) => h.parse().map_err(|e| format!("{at}: field 'hook' {e}"))?,
    };
    let device = gateway_device_of(&g.port_id);
    interfaces.push(Interface {
        port_id: g.port_id.clone(),
        device,
        fixed_ips,
        hook,
        external: true,
    });
    Ok(Gateway {
        port_id: g.port_id,
        network_id: g.network_id,
        enable_snat: g.enable_snat.unwrap_or(true),
        upstreams,
    })
}

/// `[[router.floating_ip]]`: IPv4 only (IPv6 external subnets are routed, as in Neutron).
fn validate_floating_ips(
    who: &str,
    raw: Vec<RawFloatingIp>,
    gateway: &Option<Gateway>,
    interfaces: &[Interface],
) -> Result<Vec<FloatingIp>, String> {
    let mut out: Vec<FloatingIp> = Vec::new();
    for (k, f) in raw.into_iter().enumerate() {
        let at = format!(
            "{who}, floating_ip #{} (floating_ip_address '{}')",
            k + 1,
            f.floating_ip_address
        );
        if gateway.is_none() {
            return Err(format!(
                "{at}: the router has no external gateway; add [router.external_gateway] first"
            ));
        }
        let fip: Ipv4Addr = f.floating_ip_address.parse().map_err(|_| {
            format!(
                "{at}: field 'floating_ip_address' = '{}' is not an IPv4 address (floating IPs are IPv4)",
                f.floating_ip_address
            )
        })?;
        let fixed: Option<Ipv4Addr> = match &f.fixed_ip_address {
            None => None,
            Some(x) => Some(x.parse().map_err(|_| {
                format!("{at}: field 'fixed_ip_address' = '{x}' is not an IPv4 address")
            })?),
        };
        let ext = interfaces
            .iter()
            .filter(|i| i.external)
            .flat_map(|i| i.fixed_ips.iter());
        let Some(on) = ext.clone().find(|x| x.subnet.contains(IpAddr::V4(fip))) else {
            let subnets: Vec<String> = ext
                .filter(|x| !x.subnet.is_ipv6())
                .map(|x| x.subnet.to_string())
                .collect();
            return Err(format!(
                "{at}: field 'floating_ip_address' = {fip} is outside every external subnet ({})",
                if subnets.is_empty() {
                    "the gateway has no IPv4 subnet".into()
                } else {
                    subnets.join(", ")
                }
            ));
        };
        if let IpNet::V4(n) = on.subnet {
            if u32::from(fip) == n.network() || Some(fip) == n.broadcast() {
                return Err(format!(
                    "{at}: field 'floating_ip_address' = {fip} is the network or broadcast address of {n}"
                ));
            }
        }
        let own = interfaces
            .iter()
            .flat_map(|i| i.fixed_ips.iter())
            .any(|x| x.gateway_ip == IpAddr::V4(fip));
        let upstream = gateway
            .iter()
            .flat_map(|g| g.upstreams.iter())
            .any(|u| u.gateway_ip == IpAddr::V4(fip));
        if own || upstream {
            return Err(format!(
                "{at}: field 'floating_ip_address' = {fip} is {} address",
                if own {
                    "one of the router's own"
                } else {
                    "the external subnet's gateway"
                }
            ));
        }
        if out.iter().any(|o| o.floating_ip_address == fip) {
            return Err(format!(
                "{at}: field 'floating_ip_address' = {fip} is used twice"
            ));
        }
        if let Some(fixed) = fixed {
            let tenant = interfaces.iter().filter(|i| !i.external).find(|i| {
                i.fixed_ips
                    .iter()
                    .any(|x| x.subnet.contains(IpAddr::V4(fixed)))
            });
            let Some(tenant) = tenant else {
                return Err(format!(
                    "{at}: field 'fixed_ip_address' = {fixed} is not on one of the router's tenant subnets"
                ));
            };
            if tenant
                .fixed_ips
                .iter()
                .any(|x| x.gateway_ip == IpAddr::V4(fixed))
            {
                return Err(format!(
                    "{at}: field 'fixed_ip_address' = {fixed} is the router's own address on {}",
                    tenant.device
                ));
            }
            if let Some(o) = out.iter().find(|o| o.fixed_ip_address == Some(fixed)) {
                return Err(format!(
                    "{at}: field 'fixed_ip_address' = {fixed} already has floating IP {}",
                    o.floating_ip_address
                ));
            }
        }
        out.push(FloatingIp {
            floating_ip_address: fip,
            fixed_ip_address: fixed,
        });
    }
    Ok(out)
}

/// One validated (subnet, router address) pair; the error says whether the address (true) or
/// the subnet (false) is at fault.
fn fixed_ip(subnet: &str, gateway: &str) -> Result<FixedIp, (bool, String)> {
    let net: IpNet = subnet.parse().map_err(|e| (false, format!(": {e}")))?;
    let ip: IpAddr = gateway
        .parse()
        .map_err(|_| (true, format!(" = '{gateway}' is not an IP address")))?;
    if ip.is_ipv6() != net.is_ipv6() {
        return Err((
            true,
            format!(
                " = {ip} is not an {} address like subnet {net}",
                net.family()
            ),
        ));
    }
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(g)) => {
            if n.len > 30 && n.len != 31 {
                return Err((
                    false,
                    format!(" = {n} leaves no room for a gateway and hosts"),
                ));
            }
            if !n.contains(g) {
                return Err((true, format!(" = {g} is outside subnet {n}")));
            }
            if n.len <= 30 && (u32::from(g) == n.network() || Some(g) == n.broadcast()) {
                return Err((
                    true,
                    format!(" = {g} is the network or broadcast address of {n}"),
                ));
            }
        }
        (IpNet::V6(n), IpAddr::V6(g)) => {
            if n.len > 127 {
                return Err((
                    false,
                    format!(" = {n} leaves no room for a gateway and hosts"),
                ));
            }
            let top = u128::from(n.addr) >> 120;
            if top == 0xff || (u128::from(n.addr) >> 118) == 0x3fa || n.network() >> 64 == 0 {
                return Err((
                    false,
                    format!(" = {n} is not a unicast subnet a router forwards (multicast, link-local or ::/64)"),
                ));
            }
            if !n.contains(g) {
                return Err((true, format!(" = {g} is outside subnet {n}")));
            }
            if n.len < 127 && u128::from(g) == n.network() {
                return Err((
                    true,
                    format!(" = {g} is the subnet-router anycast address of {n}"),
                ));
            }
        }
        _ => unreachable!("families checked above"),
    }
    Ok(FixedIp {
        subnet: net,
        gateway_ip: ip,
        ipv6_ra_mode: None,
        ipv6_address_mode: None,
        dns_nameservers: Vec::new(),
    })
}

/// The IPv6 options of a tenant subnet (`ipv6_ra_mode`, `ipv6_address_mode`,
/// `dns_nameservers`), checked as Neutron checks them: IPv6 subnets only, both modes equal
/// when both are given, at most `MAX_DNS_NAMESERVERS` IPv6 servers. Err: (field, why).
fn ipv6_options(f: &mut FixedIp, raw: &RawFixedIp) -> Result<(), (&'static str, String)> {
    if !raw.has_options() {
        return Ok(());
    }
    if !f.subnet.is_ipv6() {
        return Err((
            "subnet",
            format!(
                " = {}: ipv6_ra_mode, ipv6_address_mode and dns_nameservers are for IPv6 subnets",
                f.subnet
            ),
        ));
    }
    let mode = |v: &Option<String>, field| {
        v.as_deref()
            .map(|m| m.parse::<Ipv6Mode>().map_err(|e| (field, e)))
            .transpose()
    };
    f.ipv6_ra_mode = mode(&raw.ipv6_ra_mode, "ipv6_ra_mode")?;
    f.ipv6_address_mode = mode(&raw.ipv6_address_mode, "ipv6_address_mode")?;
    if let (Some(r), Some(a)) = (f.ipv6_ra_mode, f.ipv6_address_mode) {
        if r != a {
            return Err((
                "ipv6_address_mode",
                format!(
                    " = '{}' differs from ipv6_ra_mode '{}' (Neutron requires them equal when both are set)",
                    a.as_str(),
                    r.as_str()
                ),
            ));
        }
    }
    if raw.dns_nameservers.len() > MAX_DNS_NAMESERVERS {
        return Err((
            "dns_nameservers",
            format!(
                " has {} entries, at most {MAX_DNS_NAMESERVERS} are advertised",
                raw.dns_nameservers.len()
            ),
        ));
    }
    f.dns_nameservers = raw
        .dns_nameservers
        .iter()
        .map(|d| {
            d.parse::<std::net::Ipv6Addr>().map_err(|_| {
                (
                    "dns_nameservers",
                    format!(" = '{d}' is not an IPv6 address (RDNSS carries IPv6 servers)"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(())
}

fn validate_across(routers: &[Router]) -> Result<(), String> {
    let mut ids = BTreeMap::new();
    let mut ports: BTreeMap<&str, &str> = BTreeMap::new();
    let mut devices: BTreeMap<&str, &str> = BTreeMap::new();
    for r in routers {
        if ids.insert(r.id.as_str(), ()).is_some() {
            return Err(format!("router {}: defined twice (field 'id')", r.id));
        }
        for i in &r.interfaces {
            if let Some(other) = ports.insert(&i.port_id, &r.id) {
                return Err(format!(
                    "router {}, port {}: field 'port_id' is also used by router {other}",
                    r.id, i.port_id
                ));
            }
            if let Some(other) = devices.insert(&i.device, &r.id) {
                return Err(format!(
                    "router {}, port {}: device name {} is also used by router {other}",
                    r.id, i.port_id, i.device
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
[[router]]
id = "a81cc110-16f4-4d6c-89d2-8af91cec9714"
name = "router_100_101"
[[router.interface]]
port_id = "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e"
subnet = "172.16.100.0/24"
gateway_ip = "172.16.100.1"
[[router.interface]]
port_id = "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e"
subnet = "172.16.101.0/24"
gateway_ip = "172.16.101.1"
[[router.route]]
destination = "10.10.0.0/16"
nexthop = "172.16.101.254"
"#;

    #[test]
    fn seed_parses() {
        let r = parse(SEED).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].namespace(),
            "qrouter-a81cc110-16f4-4d6c-89d2-8af91cec9714"
        );
        assert_eq!(r[0].interfaces[0].device, "qr-d295b258-45");
        assert_eq!(r[0].interfaces[1].device, "qr-2ffdb861-73");
        assert_eq!(
            r[0].routes[0].nexthop,
            IpAddr::V4(Ipv4Addr::new(172, 16, 101, 254))
        );
        assert_eq!(peer_of("d295b258-4586-4e8a"), "tapd295b258-45");
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// Each case changes `base` once (`from` → `to`): the result must be refused with an error
    /// containing `want`.
    fn refused(base: &str, cases: &[(&str, &str, &str)]) {
        for (from, to, want) in cases {
            let text = base.replacen(from, to, 1);
            assert_ne!(text, base, "case {from} did not apply");
            let got = err(&text);
            assert!(got.contains(want), "for {to:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("gateway_ip = \"172.16.100.1\"", "gateway_ip = \"172.16.9.1\"", "'gateway_ip' = 172.16.9.1 is outside subnet 172.16.100.0/24"),
            ("subnet = \"172.16.101.0/24\"", "subnet = \"172.16.100.0/23\"", "overlaps subnet 172.16.100.0/24"),
            ("nexthop = \"172.16.101.254\"", "nexthop = \"192.168.1.1\"", "'nexthop' = 192.168.1.1 is not on a connected IPv4 subnet"),
            ("name = \"router_100_101\"", "name = \"r\"\ncolour = \"blue\"", "unknown field `colour`"),
            ("2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e", "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e", "duplicate port_id"),
            ("2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e", "d295b258-45ff-4e8a-9c3e-1f2a3b4c5d6e", "device name qr-d295b258-45 is already used"),
            ("gateway_ip = \"172.16.101.1\"\n", "\n", "missing field `gateway_ip`"),
            ("subnet = \"172.16.100.0/24\"", "subnet = \"172.16.100.1/24\"", "host bits set"),
            ("destination = \"10.10.0.0/16\"", "destination = \"10.10.0.0/33\"", "'destination'"),
            ("[[router.route]]", "[[router.route", "expected"),
            ("name = \"router_100_101\"", "name = \"r\"\nmax_routes = 0", "'max_routes' = 0 must be from 1"),
            ("nexthop = \"172.16.101.254\"\n", "nexthop = \"172.16.101.254\"\n[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.101.254\"\n", "is defined twice"),
        ];
        refused(SEED, cases);
    }

    const ADVERTISED: &str = r#"
[[router]]
id = "r6"
[[router.interface]]
port_id = "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e"
fixed_ips = [
  { subnet = "172.16.100.0/24", ip_address = "172.16.100.1" },
  { subnet = "2001:db8:100::/64", ip_address = "2001:db8:100::1", ipv6_ra_mode = "slaac", ipv6_address_mode = "slaac", dns_nameservers = ["2001:db8::53"] },
]
[[router.interface]]
port_id = "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e"
fixed_ips = [
  { subnet = "2001:db8:101::/64", ip_address = "2001:db8:101::1", ipv6_ra_mode = "dhcpv6-stateful" },
]
"#;

    /// Neutron's IPv6 subnet options: read, kept through the definition's written form (a
    /// single advertised subnet keeps the `fixed_ips` form), and refused where Neutron refuses
    /// them.
    #[test]
    fn advertised_subnets_round_trip_and_bad_options_are_refused() {
        let r = parse(ADVERTISED).unwrap();
        let f = &r[0].interfaces[0].fixed_ips[1];
        assert_eq!(f.ipv6_ra_mode, Some(Ipv6Mode::Slaac));
        assert_eq!(f.ipv6_address_mode, Some(Ipv6Mode::Slaac));
        assert_eq!(
            f.dns_nameservers,
            vec!["2001:db8::53".parse::<std::net::Ipv6Addr>().unwrap()]
        );
        assert_eq!(
            r[0].interfaces[1].fixed_ips[0].ipv6_ra_mode,
            Some(Ipv6Mode::Dhcpv6Stateful)
        );
        let text = to_text(&[r[0].definition()]);
        assert_eq!(parse(&text).unwrap(), r, "{text}");
        let cases: &[(&str, &str, &str)] = &[
            (
                "ipv6_ra_mode = \"dhcpv6-stateful\"",
                "ipv6_ra_mode = \"radvd\"",
                "'fixed_ips[0].ipv6_ra_mode' = 'radvd' is not an IPv6 mode",
            ),
            (
                "ipv6_address_mode = \"slaac\"",
                "ipv6_address_mode = \"dhcpv6-stateless\"",
                "differs from ipv6_ra_mode 'slaac'",
            ),
            (
                "dns_nameservers = [\"2001:db8::53\"]",
                "dns_nameservers = [\"192.0.2.53\"]",
                "is not an IPv6 address",
            ),
            (
                "dns_nameservers = [\"2001:db8::53\"]",
                "dns_nameservers = [\"::1\", \"::2\", \"::3\", \"::4\"]",
                "at most 3",
            ),
            (
                "ip_address = \"172.16.100.1\" }",
                "ip_address = \"172.16.100.1\", ipv6_ra_mode = \"slaac\" }",
                "are for IPv6 subnets",
            ),
        ];
        refused(ADVERTISED, cases);
    }

    const DUAL: &str = r#"
[[router]]
id = "r6"
[[router.interface]]
port_id = "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e"
fixed_ips = [
  { subnet = "172.16.100.0/24", ip_address = "172.16.100.1" },
  { subnet = "2001:db8:100::/64", ip_address = "2001:db8:100::1" },
]
[[router.interface]]
port_id = "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e"
subnet = "2001:db8:101::/64"
gateway_ip = "2001:db8:101::1"
[[router.route]]
destination = "2001:db8:aaaa::/48"
nexthop = "2001:db8:101::fe"
"#;

    #[test]
    fn dual_stack_ports_and_ipv6_routes_parse() {
        let r = parse(DUAL).unwrap();
        let i = &r[0].interfaces;
        assert_eq!(i[0].fixed_ips.len(), 2);
        assert_eq!(i[0].fixed_ips[1].subnet.to_string(), "2001:db8:100::/64");
        assert_eq!(i[1].fixed_ips[0].gateway_ip.to_string(), "2001:db8:101::1");
        assert_eq!(r[0].routes[0].destination.to_string(), "2001:db8:aaaa::/48");
        assert_eq!(
            r[0].interface_for("2001:db8:101::fe".parse().unwrap())
                .unwrap()
                .device,
            "qr-2ffdb861-73"
        );
    }

    #[test]
    fn ipv6_refusals_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("ip_address = \"2001:db8:100::1\"", "ip_address = \"2001:db8:999::1\"", "'fixed_ips[1].ip_address' = 2001:db8:999::1 is outside subnet 2001:db8:100::/64"),
            ("ip_address = \"2001:db8:100::1\"", "ip_address = \"172.16.100.9\"", "'fixed_ips[1].ip_address' = 172.16.100.9 is not an IPv6 address like subnet"),
            ("ip_address = \"2001:db8:100::1\"", "ip_address = \"2001:db8:100::\"", "subnet-router anycast"),
            ("subnet = \"2001:db8:101::/64\"\ngateway_ip = \"2001:db8:101::1\"", "subnet = \"2001:db8:100::/56\"\ngateway_ip = \"2001:db8:100::fe\"", "overlaps subnet 2001:db8:100::/64 of port d295b258"),
            ("subnet = \"2001:db8:100::/64\"", "subnet = \"2001:db8:100::/129\"", "'fixed_ips[1].subnet': '129'"),
            ("{ subnet = \"2001:db8:100::/64\", ip_address = \"2001:db8:100::1\" }", "{ subnet = \"fe80::/64\", ip_address = \"fe80::1\" }", "not a unicast subnet"),
            ("{ subnet = \"2001:db8:100::/64\", ip_address = \"2001:db8:100::1\" }", "{ subnet = \"2001:db8:100::1/128\", ip_address = \"2001:db8:100::1\" }", "leaves no room"),
            ("nexthop = \"2001:db8:101::fe\"", "nexthop = \"172.16.100.254\"", "'nexthop' = 172.16.100.254 is not an IPv6 address like destination"),
            ("nexthop = \"2001:db8:101::fe\"", "nexthop = \"2001:db8:5::1\"", "not on a connected IPv6 subnet of this router (2001:db8:100::/64, 2001:db8:101::/64)"),
            ("nexthop = \"2001:db8:101::fe\"", "nexthop = \"2001:db8:101::1\"", "the router's own address on qr-2ffdb861-73"),
            ("destination = \"2001:db8:aaaa::/48\"", "destination = \"2001:db8:101::/64\"", "is the connected subnet of port"),
            ("gateway_ip = \"2001:db8:101::1\"", "gateway_ip = \"2001:db8:101::1\"\nfixed_ips = []", "either 'subnet' and 'gateway_ip' or 'fixed_ips'"),
            ("fixed_ips = [", "fixed_ips = []\nx = [", "unknown field `x`"),
            ("  { subnet = \"172.16.100.0/24\", ip_address = \"172.16.100.1\" },\n  { subnet = \"2001:db8:100::/64\", ip_address = \"2001:db8:100::1\" },\n", "", "'fixed_ips' is empty"),
            ("gateway_ip = \"2001:db8:101::1\"\n", "", "missing field `gateway_ip`"),
        ];
        refused(DUAL, cases);
    }

    #[test]
    fn several_nexthops_for_one_destination_are_ecmp() {
        let text = SEED.replace(
            "nexthop = \"172.16.101.254\"\n",
            "nexthop = \"172.16.101.254\"\n[[router.route]]\ndestination = \"10.10.0.0/16\"\nnexthop = \"172.16.100.254\"\n",
        );
        let r = parse(&text).unwrap();
        assert_eq!(r[0].routes.len(), 2);
        assert!(r[0]
            .routes
            .iter()
            .all(|x| x.destination.to_string() == "10.10.0.0/16"));
    }

    const NAT: &str = r#"
[[router]]
id = "a81cc110-16f4-4d6c-89d2-8af91cec9714"
[[router.interface]]
port_id = "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e"
subnet = "172.16.100.0/24"
gateway_ip = "172.16.100.1"
[[router.interface]]
port_id = "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e"
subnet = "172.16.101.0/24"
gateway_ip = "172.16.101.1"
[router.external_gateway]
port_id = "e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b"
network_id = "public"
external_fixed_ips = [
  { subnet = "192.168.1.0/24", ip_address = "192.168.1.10", gateway_ip = "192.168.1.1" },
]
[[router.floating_ip]]
floating_ip_address = "192.168.1.20"
fixed_ip_address = "172.16.101.3"
"#;

    #[test]
    fn external_gateway_and_floating_ips_parse() {
        let r = &parse(NAT).unwrap()[0];
        let g = r.gateway.as_ref().unwrap();
        assert!(g.enable_snat, "Neutron's default");
        assert_eq!(g.network_id.as_deref(), Some("public"));
        assert_eq!(g.upstreams[0].gateway_ip.to_string(), "192.168.1.1");
        assert!(!g.upstreams[0].onlink());
        let qg = r.interfaces.iter().find(|i| i.external).unwrap();
        assert_eq!(qg.device, "qg-e1a2b3c4-5d");
        assert_eq!(qg.fixed_ips[0].gateway_ip.to_string(), "192.168.1.10");
        assert_eq!(r.interfaces.iter().filter(|i| i.external).count(), 1);
        assert_eq!(
            r.floating_ips[0].fixed_ip_address.unwrap().to_string(),
            "172.16.101.3"
        );
        let unassociated = NAT.replace("fixed_ip_address = \"172.16.101.3\"\n", "");
        assert_eq!(
            parse(&unassociated).unwrap()[0].floating_ips[0].fixed_ip_address,
            None
        );
        // A route via the upstream router is accepted (its subnet is connected).
        let t = NAT.replace(
            "[[router.floating_ip]]",
            "[[router.route]]\ndestination = \"10.9.0.0/16\"\nnexthop = \"192.168.1.254\"\n[[router.floating_ip]]",
        );
        assert_eq!(parse(&t).unwrap()[0].routes.len(), 1);
        let off = NAT.replace("network_id = \"public\"", "enable_snat = false");
        assert!(
            !parse(&off).unwrap()[0]
                .gateway
                .as_ref()
                .unwrap()
                .enable_snat
        );
        let far = NAT.replace("gateway_ip = \"192.168.1.1\"", "gateway_ip = \"10.0.0.1\"");
        assert!(parse(&far).unwrap()[0].gateway.as_ref().unwrap().upstreams[0].onlink());
    }

    #[test]
    fn nat_refusals_name_the_field() {
        let fip2 = "[[router.floating_ip]]\nfloating_ip_address = \"192.168.1.21\"\nfixed_ip_address = \"172.16.101.3\"\n";
        let cases: &[(&str, &str, &str)] = &[
            ("floating_ip_address = \"192.168.1.20\"", "floating_ip_address = \"10.1.1.1\"", "'floating_ip_address' = 10.1.1.1 is outside every external subnet (192.168.1.0/24)"),
            ("floating_ip_address = \"192.168.1.20\"", "floating_ip_address = \"192.168.1.10\"", "is one of the router's own address"),
            ("floating_ip_address = \"192.168.1.20\"", "floating_ip_address = \"192.168.1.1\"", "is the external subnet's gateway address"),
            ("floating_ip_address = \"192.168.1.20\"", "floating_ip_address = \"192.168.1.255\"", "network or broadcast"),
            ("fixed_ip_address = \"172.16.101.3\"\n", "fixed_ip_address = \"172.16.101.3\"\n[[router.floating_ip]]\nfloating_ip_address = \"192.168.1.20\"\nfixed_ip_address = \"172.16.100.3\"\n", "'floating_ip_address' = 192.168.1.20 is used twice"),
            ("fixed_ip_address = \"172.16.101.3\"\n", &format!("fixed_ip_address = \"172.16.101.3\"\n{fip2}"), "'fixed_ip_address' = 172.16.101.3 already has floating IP 192.168.1.20"),
            ("fixed_ip_address = \"172.16.101.3\"", "fixed_ip_address = \"192.168.1.30\"", "'fixed_ip_address' = 192.168.1.30 is not on one of the router's tenant subnets"),
            ("fixed_ip_address = \"172.16.101.3\"", "fixed_ip_address = \"172.16.101.1\"", "is the router's own address on qr-2ffdb861-73"),
            ("subnet = \"192.168.1.0/24\", ip_address = \"192.168.1.10\"", "subnet = \"172.16.0.0/16\", ip_address = \"172.16.1.10\"", "'external_fixed_ips[0].subnet' = 172.16.0.0/16 overlaps subnet 172.16.100.0/24"),
            ("gateway_ip = \"192.168.1.1\"", "gateway_ip = \"192.168.1.10\"", "'external_fixed_ips[0].gateway_ip' = 192.168.1.10 is the router's own external address"),
            ("ip_address = \"192.168.1.10\"", "ip_address = \"192.168.2.10\"", "'external_fixed_ips[0].ip_address' = 192.168.2.10 is outside subnet 192.168.1.0/24"),
            ("port_id = \"e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b\"", "port_id = \"2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e\"", "also the port of one of the router's interfaces"),
            ("network_id = \"public\"", "network_id = \"public\"\nsnat = true", "unknown field `snat`"),
            ("[router.external_gateway]\nport_id = \"e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b\"\nnetwork_id = \"public\"\nexternal_fixed_ips = [\n  { subnet = \"192.168.1.0/24\", ip_address = \"192.168.1.10\", gateway_ip = \"192.168.1.1\" },\n]\n", "", "the router has no external gateway"),
            ("  { subnet = \"192.168.1.0/24\", ip_address = \"192.168.1.10\", gateway_ip = \"192.168.1.1\" },\n", "", "'external_fixed_ips' is missing or empty"),
            ("[[router.floating_ip]]", "[[router.route]]\ndestination = \"0.0.0.0/0\"\nnexthop = \"172.16.100.9\"\n[[router.floating_ip]]", "is the external gateway's default route (via 192.168.1.1)"),
        ];
        refused(NAT, cases);
    }

    #[test]
    fn prefixes() {
        let n: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 255, 1, 2)));
        assert!(!n.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!(n.broadcast(), Some(Ipv4Addr::new(10, 255, 255, 255)));
        assert!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().overlaps(&n));
        assert!("1.2.3.4/32".parse::<Ipv4Net>().is_ok());
    }

    /// Every shipped example, and definitions with every optional part: a router's
    /// definition written back by the serializer parses into the same router.
    #[test]
    fn definitions_round_trip_through_their_text() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
        let mut texts: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        texts.push(SEED.to_string());
        texts.push(
            r#"
[[router]]
id = "r-1"
max_routes = 5000
ha = true
[[router.interface]]
port_id = "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e"
hook = "tc"
fixed_ips = [{ subnet = "172.16.100.0/24", ip_address = "172.16.100.1" }, { subnet = "2001:db8:100::/64", ip_address = "2001:db8:100::1" }]
[router.external_gateway]
port_id = "e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b"
enable_snat = false
hook = "xdp"
external_fixed_ips = [{ subnet = "192.168.1.0/24", ip_address = "192.168.1.10" }, { subnet = "2001:db8:1::/64", ip_address = "2001:db8:1::10", gateway_ip = "2001:db8:1::1" }]
[[router.floating_ip]]
floating_ip_address = "192.168.1.30"
"#
            .to_string(),
        );
        assert!(texts.len() >= 5, "the examples in {dir}");
        for text in texts {
            let routers = parse(&text).unwrap();
            let defs: Vec<RawRouter> = routers.iter().map(Router::definition).collect();
            assert_eq!(parse(&to_text(&defs)).unwrap(), routers, "{text}");
            assert_eq!(validate(defs).unwrap(), routers, "{text}");
        }
    }

    /// A name holds whatever a tenant typed: quotes, newlines, text that looks like more
    /// fields or routers stay inside the name.
    #[test]
    fn names_cannot_inject_fields_or_routers() {
        let name = "x\"\nha = true\n[[router]]\nid = \"evil\"\n#\\ \u{7f}";
        let def = RawRouter {
            id: "r-1".into(),
            name: Some(name.into()),
            ..RawRouter::default()
        };
        let routers = parse(&to_text(&[def])).unwrap();
        assert_eq!(routers.len(), 1);
        assert_eq!(routers[0].name, name);
        assert_eq!(routers[0].id, "r-1");
        assert!(!routers[0].ha);
    }

    /// A MAC address reads in any case and is written in lower case, as a string; anything
    /// else is refused.
    #[test]
    fn mac_addresses_read_and_write_in_their_usual_notation() {
        let m: Mac = "02:00:5E:10:0a:01".parse().unwrap();
        assert_eq!(m, Mac([0x02, 0x00, 0x5e, 0x10, 0x0a, 0x01]));
        assert_eq!(m.to_string(), "02:00:5e:10:0a:01");
        assert_eq!(fmt_mac(&m.0), m.to_string());
        assert_eq!(parse_mac("02:00:5e:10:0a:01"), Some(m.0));
        assert_eq!(serde_json::to_string(&m).unwrap(), r#""02:00:5e:10:0a:01""#);
        assert_eq!(
            serde_json::from_str::<Mac>(r#""02:00:5e:10:0a:01""#).unwrap(),
            m
        );
        for bad in [
            "",
            "02:00:5e:10:0a",
            "02:00:5e:10:0a:01:02",
            "0.0.0.0",
            "02:00:5e:10:0a:zz",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        let n: IpNet = serde_json::from_str(r#""2001:db8:100::/64""#).unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), r#""2001:db8:100::/64""#);
        assert!(serde_json::from_str::<IpNet>(r#""172.16.100.1/24""#).is_err());
    }
}

//! Router definitions (TOML, in Neutron's vocabulary) and their validation.
//!
//! Everything here is pure: a file is parsed and checked completely before `apply` touches the
//! system, and every error names the router, the port or route, and the field.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path, str::FromStr};

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

/// The file as written: `[[router]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    router: Vec<RawRouter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    id: String,
    name: Option<String>,
    max_routes: Option<u64>,
    #[serde(default)]
    interface: Vec<RawInterface>,
    #[serde(default)]
    route: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    port_id: String,
    subnet: String,
    gateway_ip: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    destination: String,
    nexthop: String,
}

/// A validated router definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Router {
    pub id: String,
    pub name: String,
    /// How many routes the fast path's table is sized for when the router is first applied
    /// (its maps cannot grow later); None: room for the routes defined, with a quarter to spare.
    pub max_routes: Option<u32>,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<ExtraRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub port_id: String,
    /// `qr-` + the first 11 characters of the port id.
    pub device: String,
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExtraRoute {
    pub destination: Ipv4Net,
    pub nexthop: Ipv4Addr,
}

impl Router {
    pub fn namespace(&self) -> String {
        namespace_of(&self.id)
    }
    /// The interface whose subnet holds `ip`.
    pub fn interface_for(&self, ip: Ipv4Addr) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.subnet.contains(ip))
    }
}

pub fn namespace_of(router_id: &str) -> String {
    format!("qrouter-{router_id}")
}

pub fn device_of(port_id: &str) -> String {
    format!("qr-{}", &port_id[..port_id.len().min(11)])
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
    let mut routers = Vec::new();
    for (i, r) in raw.router.into_iter().enumerate() {
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
        let subnet: Ipv4Net = i
            .subnet
            .parse()
            .map_err(|e| format!("{at}: field 'subnet': {e}"))?;
        let gateway_ip: Ipv4Addr = i.gateway_ip.parse().map_err(|_| {
            format!(
                "{at}: field 'gateway_ip' = '{}' is not an IPv4 address",
                i.gateway_ip
            )
        })?;
        if subnet.len > 30 && subnet.len != 31 {
            return Err(format!(
                "{at}: field 'subnet' = {subnet} leaves no room for a gateway and hosts"
            ));
        }
        if !subnet.contains(gateway_ip) {
            return Err(format!(
                "{at}: field 'gateway_ip' = {gateway_ip} is outside subnet {subnet}"
            ));
        }
        if subnet.len <= 30
            && (u32::from(gateway_ip) == subnet.network() || Some(gateway_ip) == subnet.broadcast())
        {
            return Err(format!(
                "{at}: field 'gateway_ip' = {gateway_ip} is the network or broadcast address of {subnet}"
            ));
        }
        let device = device_of(&i.port_id);
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
            if prev.subnet.overlaps(&subnet) {
                return Err(format!(
                    "{at}: field 'subnet' = {subnet} overlaps subnet {} of port {}",
                    prev.subnet, prev.port_id
                ));
            }
        }
        interfaces.push(Interface {
            port_id: i.port_id,
            device,
            subnet,
            gateway_ip,
        });
    }
    let mut routes: Vec<ExtraRoute> = Vec::new();
    for (k, rt) in r.route.into_iter().enumerate() {
        let at = format!("{who}, route #{} (destination '{}')", k + 1, rt.destination);
        let destination: Ipv4Net = rt
            .destination
            .parse()
            .map_err(|e| format!("{at}: field 'destination': {e}"))?;
        let nexthop: Ipv4Addr = rt.nexthop.parse().map_err(|_| {
            format!(
                "{at}: field 'nexthop' = '{}' is not an IPv4 address",
                rt.nexthop
            )
        })?;
        let Some(via) = interfaces.iter().find(|i| i.subnet.contains(nexthop)) else {
            let connected: Vec<String> = interfaces.iter().map(|i| i.subnet.to_string()).collect();
            return Err(format!(
                "{at}: field 'nexthop' = {nexthop} is not on a connected subnet of this router ({})",
                if connected.is_empty() { "it has none".to_string() } else { connected.join(", ") }
            ));
        };
        if nexthop == via.gateway_ip {
            return Err(format!(
                "{at}: field 'nexthop' = {nexthop} is the router's own address on {}",
                via.device
            ));
        }
        if let Some(i) = interfaces.iter().find(|i| i.subnet == destination) {
            return Err(format!(
                "{at}: field 'destination' = {destination} is the connected subnet of port {}",
                i.port_id
            ));
        }
        if routes
            .iter()
            .any(|p| p.destination == destination && p.nexthop == nexthop)
        {
            return Err(format!(
                "{at}: route to {destination} via {nexthop} is defined twice"
            ));
        }
        let paths = routes
            .iter()
            .filter(|p| p.destination == destination)
            .count();
        if paths >= router_common::fib::MAX_PATHS {
            return Err(format!(
                "{at}: destination {destination} has more than {} nexthops (ECMP paths)",
                router_common::fib::MAX_PATHS
            ));
        }
        routes.push(ExtraRoute {
            destination,
            nexthop,
        });
    }
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
        interfaces,
        routes,
    })
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
        assert_eq!(r[0].routes[0].nexthop, Ipv4Addr::new(172, 16, 101, 254));
        assert_eq!(peer_of("d295b258-4586-4e8a"), "tapd295b258-45");
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("gateway_ip = \"172.16.100.1\"", "gateway_ip = \"172.16.9.1\"", "'gateway_ip' = 172.16.9.1 is outside subnet 172.16.100.0/24"),
            ("subnet = \"172.16.101.0/24\"", "subnet = \"172.16.100.0/23\"", "overlaps subnet 172.16.100.0/24"),
            ("nexthop = \"172.16.101.254\"", "nexthop = \"192.168.1.1\"", "'nexthop' = 192.168.1.1 is not on a connected subnet"),
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
        for (from, to, want) in cases {
            let text = SEED.replacen(from, to, 1);
            assert_ne!(text, SEED, "case {from} did not apply");
            let got = err(&text);
            assert!(got.contains(want), "for {to:?}: got {got:?}, want {want:?}");
        }
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

    #[test]
    fn prefixes() {
        let n: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 255, 1, 2)));
        assert!(!n.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!(n.broadcast(), Some(Ipv4Addr::new(10, 255, 255, 255)));
        assert!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().overlaps(&n));
        assert!("1.2.3.4/32".parse::<Ipv4Net>().is_ok());
    }
}

//! Unsolicited neighbour advertisements (RFC 4861 §7.2.6): what a host that takes over an IPv6
//! address sends so that its neighbours' caches move to its MAC at once (the IPv6 twin of a
//! gratuitous ARP).

use std::net::Ipv6Addr;

use anyhow::{Context as _, Result};

const ETH_P_IPV6: u16 = 0x86dd;

/// The frame: to all nodes (ff02::1, 33:33:00:00:00:01) from `ip`, hop limit 255, flags
/// Override (not Solicited; Router: we are a router), target `ip` with our link-layer address.
pub fn frame(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0xa0, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    // Checksum over the pseudo-header (source, destination, length, next header 58).
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&ip.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Sends one unsolicited NA for `ip` out of device `ifindex` (calling thread's namespace).
pub fn announce(ifindex: u32, mac: [u8; 6], ip: Ipv6Addr) -> Result<()> {
    let f = frame(mac, ip);
    super::arp::send_frame(ifindex, ETH_P_IPV6, &f, [0x33, 0x33, 0, 0, 0, 1])
        .with_context(|| format!("sending a neighbour advertisement for {ip}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_bytes() {
        let ip: Ipv6Addr = "2001:db8:100::1".parse().unwrap();
        let f = frame([2, 0, 0, 0, 0, 1], ip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[20], 58, "ICMPv6");
        assert_eq!(f[21], 255, "hop limit 255, or receivers drop it");
        assert_eq!(f[54], 136, "neighbour advertisement");
        assert_eq!(f[58], 0xa0, "router + override, not solicited");
        assert_eq!(&f[62..78], &ip.octets(), "target");
        assert_eq!(
            &f[78..86],
            &[2, 1, 2, 0, 0, 0, 0, 1],
            "target link-layer option"
        );
        // The checksum verifies: the one's complement sum over pseudo-header and message.
        let mut sum: u32 = 0;
        for c in f[22..54].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        sum += 32 + 58;
        for c in f[54..].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}

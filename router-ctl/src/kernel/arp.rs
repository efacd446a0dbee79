//! Gratuitous ARP: what a router sends when an IPv4 address appears on its external device, so
//! that the external network's caches learn (or move) it at once. Neutron's agent sends 3
//! rounds, 2 s apart, for the gateway IP and each floating IP; so does the daemon.

use std::{io, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};

const ETH_P_ARP: u16 = 0x0806;
pub const ROUNDS: u32 = 3;
pub const INTERVAL: Duration = Duration::from_secs(2);

/// The frame: an ARP request from `ip` for `ip` (an "unsolicited" one, as `arping -U`
/// sends), broadcast.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

/// Sends one gratuitous ARP for `ip` out of device `ifindex` (in the calling thread's
/// namespace).
pub fn announce(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<()> {
    send_frame(ifindex, ETH_P_ARP, &frame(mac, ip), [0xff; 6])
        .with_context(|| format!("sending a gratuitous ARP for {ip}"))
}

/// Sends one whole Ethernet frame of `proto` out of device `ifindex` to `dst`.
pub fn send_frame(ifindex: u32, proto: u16, f: &[u8], dst: [u8; 6]) -> Result<()> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("packet socket");
    }
    // SAFETY: a zeroed sockaddr_ll is valid; sendto(2) with its size; fd is ours.
    let rc = unsafe {
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto.to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&dst);
        let rc = libc::sendto(
            fd,
            f.as_ptr() as *const libc::c_void,
            f.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            Err(err)
        } else {
            Ok(())
        }
    };
    Ok(rc?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_an_unsolicited_request() {
        let f = frame([2, 0, 0, 0, 0, 1], Ipv4Addr::new(192, 168, 1, 20));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &f[38..42], "sender = target address");
    }
}

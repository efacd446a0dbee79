//! Router advertisements on the `qr-` ports, sent by the daemon for the IPv6 subnets defined
//! with an `ipv6_ra_mode`: instances with the kernel's defaults (they accept advertisements
//! and autoconfigure) get their address and default route from the router with nothing else
//! configured, the flags and options follow each subnet's mode, solicitations are answered,
//! and a subnet that goes is withdrawn (router lifetime 0).

use std::time::{Duration, Instant};

use tests::{sh, topo::Seed};

/// An advertisement as an instance receives it.
#[derive(Debug)]
struct Ra {
    flags: u8,
    lifetime: u16,
    /// (prefix, length, autonomous, preferred lifetime).
    prefixes: Vec<(std::net::Ipv6Addr, u8, bool, u32)>,
    rdnss: Vec<std::net::Ipv6Addr>,
    mtu: Option<u32>,
}

fn parse(b: &[u8]) -> Option<Ra> {
    if b.len() < 16 || b[0] != 134 {
        return None;
    }
    let mut ra = Ra {
        flags: b[5],
        lifetime: u16::from_be_bytes([b[6], b[7]]),
        prefixes: Vec::new(),
        rdnss: Vec::new(),
        mtu: None,
    };
    let mut o = 16;
    while o + 2 <= b.len() {
        let (t, len) = (b[o], b[o + 1] as usize * 8);
        if len == 0 || o + len > b.len() {
            return None;
        }
        let opt = &b[o..o + len];
        match t {
            3 => ra.prefixes.push((
                <[u8; 16]>::try_from(&opt[16..32]).ok()?.into(),
                opt[2],
                opt[3] & 0x40 != 0,
                u32::from_be_bytes(opt[8..12].try_into().ok()?),
            )),
            5 => ra.mtu = Some(u32::from_be_bytes(opt[4..8].try_into().ok()?)),
            25 => {
                for a in opt[8..].chunks(16) {
                    ra.rdnss.push(<[u8; 16]>::try_from(a).ok()?.into());
                }
            }
            _ => {}
        }
        o += len;
    }
    Some(ra)
}

/// Listens in namespace `ns` for advertisements on device `dev`; with `solicit`, sends a
/// router solicitation first. Returns the first advertisement that `want` accepts within
/// `within`, and how long after the start it came.
fn listen(
    ns: &str,
    dev: &str,
    solicit: bool,
    within: Duration,
    want: fn(&Ra) -> bool,
) -> Option<(Ra, Duration)> {
    let dev = dev.to_string();
    tests::topo::in_ns(ns, move || {
        // SAFETY: a raw ICMPv6 socket of this thread, read with a timeout; buffers on the stack.
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
            assert!(fd >= 0, "raw socket");
            let c = std::ffi::CString::new(dev.clone()).unwrap();
            let ifindex = libc::if_nametoindex(c.as_ptr());
            tests::topo::recv_timeout_100ms(fd);
            let t = Instant::now();
            if solicit {
                let hops: i32 = 255;
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_HOPS,
                    (&hops as *const i32).cast(),
                    4,
                );
                let mut to: libc::sockaddr_in6 = std::mem::zeroed();
                to.sin6_family = libc::AF_INET6 as u16;
                to.sin6_addr.s6_addr = "ff02::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
                to.sin6_scope_id = ifindex;
                let rs = [133u8, 0, 0, 0, 0, 0, 0, 0];
                let n = libc::sendto(
                    fd,
                    rs.as_ptr().cast(),
                    rs.len(),
                    0,
                    (&to as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                );
                assert_eq!(
                    n,
                    8,
                    "sending a router solicitation: {}",
                    std::io::Error::last_os_error()
                );
            }
            let mut buf = [0u8; 1500];
            while t.elapsed() < within {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n > 0 {
                    if let Some(ra) = parse(&buf[..n as usize]) {
                        if want(&ra) {
                            libc::close(fd);
                            return Some((ra, t.elapsed()));
                        }
                    }
                }
            }
            libc::close(fd);
            None
        }
    })
    .join()
    .unwrap()
}

/// The instance's autoconfigured (dynamic) global address in `prefix`, once it has one.
fn slaac_address(ns: &str, prefix: &str, within: Duration) -> String {
    let t = Instant::now();
    loop {
        let out = sh(&format!("ip -n {ns} -6 -o addr show scope global"));
        // Autoconfigured (dynamic) and past duplicate address detection (not tentative).
        if let Some(line) = out.lines().find(|l| {
            l.contains(&format!(" {prefix}")) && l.contains("dynamic") && !l.contains("tentative")
        }) {
            let a = line
                .split_whitespace()
                .find(|w| w.starts_with(prefix))
                .unwrap();
            return a.split('/').next().unwrap().to_string();
        }
        assert!(
            t.elapsed() < within,
            "{ns} autoconfigured no address in {prefix} within {within:?}: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn default_route(ns: &str) -> String {
    sh(&format!("ip -n {ns} -6 route show default"))
}

#[test]
fn instances_that_autoconfigure_get_their_address_and_default_route_from_the_router() {
    let s = tests::in_setup(|| {
        Seed::up_dual_advertised(
            r#", ipv6_ra_mode = "slaac", ipv6_address_mode = "slaac", dns_nameservers = ["2001:db8::53"]"#,
            r#", ipv6_ra_mode = "dhcpv6-stateless", ipv6_address_mode = "dhcpv6-stateless""#,
        )
    });
    let (tap_a, tap_b) = (s.ids.tap_a(), s.ids.tap_b());
    // Nothing configured on the instances for IPv6: their addresses and default routes come
    // from the router's advertisements.
    let a1 = slaac_address(&s.vm1, "2001:db8:100:", Duration::from_secs(20));
    let a3 = slaac_address(&s.vm3, "2001:db8:101:", Duration::from_secs(20));
    for ns in [&s.vm1, &s.vm3] {
        let t = Instant::now();
        while !default_route(ns).contains("proto ra") {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{ns} has no default route from an advertisement: {}",
                default_route(ns)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            default_route(ns).contains("via fe80::"),
            "{}",
            default_route(ns)
        );
    }
    eprintln!("vm1 {a1}, vm3 {a3}");
    let ping = tests::sh_out(&format!(
        "ip netns exec {} ping -6 -c 5 -i 0.2 -w 5 {a3}",
        s.vm1
    ));
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success(),
        "vm1 cannot reach vm3's autoconfigured address through the router: {text}{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    // The flags and options follow each subnet's mode; a solicitation is answered at once
    // (the router's periodic advertisements come 30 to 100 s apart once the first few went).
    std::thread::sleep(Duration::from_secs(3));
    let (ra, after) = listen(&s.vm1, &tap_a, true, Duration::from_secs(3), |r| {
        r.lifetime > 0
    })
    .expect("no advertisement answered vm1's solicitation within 3 s");
    eprintln!("vm1's solicitation answered after {after:?}: {ra:?}");
    assert_eq!(
        ra.flags & 0xc0,
        0,
        "slaac: neither managed nor other configuration"
    );
    assert_eq!(ra.lifetime, 300);
    assert_eq!(ra.mtu, Some(1500));
    assert_eq!(
        ra.prefixes,
        vec![("2001:db8:100::".parse().unwrap(), 64, true, 14_400)]
    );
    assert_eq!(
        ra.rdnss,
        vec!["2001:db8::53".parse::<std::net::Ipv6Addr>().unwrap()]
    );
    let (ra, _) = listen(&s.vm3, &tap_b, true, Duration::from_secs(3), |r| {
        r.lifetime > 0
    })
    .expect("no advertisement answered vm3's solicitation within 3 s");
    assert_eq!(
        ra.flags & 0xc0,
        0x40,
        "dhcpv6-stateless: other configuration only"
    );
    assert_eq!(ra.prefixes.len(), 1);
    assert!(
        ra.prefixes[0].2,
        "dhcpv6-stateless: the prefix is autonomous"
    );
    assert!(ra.rdnss.is_empty());
    // `show` names the modes and counts the answers.
    let shown = tests::ctl(&["router", "show", &s.ids.router_id, "-j"]);
    let r: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap_or_else(|e| {
        panic!(
            "router show -j: {e}: {}{}",
            String::from_utf8_lossy(&shown.stdout),
            String::from_utf8_lossy(&shown.stderr)
        )
    });
    let modes: Vec<&str> = r["interfaces_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["ipv6_ra_mode"].as_str())
        .collect();
    assert_eq!(modes, vec!["slaac", "dhcpv6-stateless"], "{r}");
    let dev_a = s.ids.dev_a();
    let answered = r["router_advertisements"][&dev_a]["solicitations_answered"]
        .as_u64()
        .unwrap_or(0);
    assert!(answered >= 1, "no solicitation counted on {dev_a}: {r}");
    // vm3's subnet stops being advertised (the port keeps its IPv4 subnet): a final
    // advertisement takes the router out of vm3's default routers at once.
    let watch = {
        let (ns, dev) = (s.vm3.clone(), tap_b.clone());
        std::thread::spawn(move || {
            listen(&ns, &dev, false, Duration::from_secs(5), |r| {
                r.lifetime == 0
            })
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let out = tests::ctl(&[
        "router",
        "remove",
        "subnet",
        &s.ids.router_id,
        "--subnet",
        "2001:db8:101::/64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (last, _) = watch
        .join()
        .unwrap()
        .expect("no final advertisement (router lifetime 0) within 5 s of the subnet's removal");
    assert_eq!(last.prefixes.len(), 1);
    assert_eq!(last.prefixes[0].3, 0, "the withdrawn prefix is deprecated");
    let t = Instant::now();
    while default_route(&s.vm3).contains("proto ra") {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "vm3 kept the router as default: {}",
            default_route(&s.vm3)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // vm1's subnet is still advertised.
    assert!(default_route(&s.vm1).contains("proto ra"));
}

//! Packet tests: the real XDP program through BPF_PROG_TEST_RUN, asserting the return code, the
//! exact output bytes, and the counters.
//!
//! Each test moves its thread into a fresh network namespace, where the frame's ingress device
//! is `lo` (ifindex 1, what the kernel gives a test run) and a veth pair provides real egress
//! devices for the devmap.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    programs::{TestRun, TestRunOptions},
    Ebpf,
};
use router_common::{map_names, pass_reason as why, Iface, Stats, STATS_SLOTS, UNKNOWN_IFACE_SLOT};
use router_ctl::{
    config::{IpNet, Ipv4Net, Ipv6Net},
    datapath,
};
use tests::{
    corpus::Rng,
    frame::{ethernet, ipv4_udp, ipv6_udp, v6, Ipv4, Ipv6},
    model::{self, Model, Verdict, Via},
    require_root, sh, unshare_netns,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const E1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x03, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x05];
const NB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x05];
const NH1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0xfe];
const NH2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0xfd];

const SRC: [u8; 4] = [10, 1, 0, 5];
const DST: [u8; 4] = [10, 2, 0, 5];

/// Which of the two programs a harness runs frames through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    Xdp,
    Tc,
}

struct Harness {
    ebpf: Ebpf,
    prog: Prog,
    e0: u32,
    e1: u32,
    ifaces: Vec<(u32, Iface)>,
}

/// A harness for each program in turn: every packet test runs against both (each in a
/// namespace of its own); the tc program's actions are given as their XDP equivalents.
fn both() -> impl Iterator<Item = Harness> {
    [Prog::Xdp, Prog::Tc].into_iter().map(|p| {
        eprintln!("--- program: {p:?}");
        let mut h = harness();
        h.prog = p;
        h
    })
}

/// Frames the kernel refuses to run an skb program on (BPF_PROG_TEST_RUN checks that the
/// network header is there): the tc program's code for them is the XDP program's, tested there.
fn tc_refuses(f: &[u8]) -> bool {
    let et = f.get(12..14).map(|e| u16::from_be_bytes([e[0], e[1]]));
    f.len() <= 14 || (et == Some(0x0800) && f.len() < 34) || (et == Some(0x86dd) && f.len() < 54)
}

/// tcx's and tc's actions as the XDP action of the same meaning.
fn normalize(prog: Prog, rc: u32) -> u32 {
    match (prog, rc as i32) {
        (Prog::Xdp, _) => rc,
        (Prog::Tc, -1) => XDP_PASS,
        (Prog::Tc, 7) => XDP_REDIRECT,
        (Prog::Tc, other) => 1000 + other as u32,
    }
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no device {name}");
    i
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// A prefix of either family.
fn pfx(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// IPv6: lo on 2001:db8:1::/64, e0 on 2001:db8:2::/64, e1 on 2001:db8:3::/64.
const SRC6: [u16; 8] = [0x2001, 0xdb8, 1, 0, 0, 0, 0, 5];
const DST6: [u16; 8] = [0x2001, 0xdb8, 2, 0, 0, 0, 0, 5];

/// Ingress `lo` on 10.1.0.0/24 and 2001:db8:1::/64 (slot 0), egress e0 on 10.2.0.0/24 and
/// 2001:db8:2::/64 (slot 1), and e1 on 10.3.0.0/24 and 2001:db8:3::/64 (slot 2), known to
/// IFACES but down: absent from the devmap.
fn harness() -> Harness {
    harness_with(|| datapath::load_unpinned().expect("load the XDP program"))
}

/// `harness` with the program and maps `load` gives (in the test's namespace).
fn harness_with(load: impl FnOnce() -> Ebpf) -> Harness {
    require_root();
    unshare_netns();
    sh("ip link add e0 type veth peer name e1 && ip link set lo up && ip link set e0 up && ip link set e1 up");
    let (lo, e0, e1) = (1, ifindex("e0"), ifindex("e1"));
    let mut ebpf = tests::in_setup(load);
    let iface = |mac, slot| Iface {
        mac,
        flags: 0,
        mtu: 1500,
        slot,
    };
    let ifaces = vec![
        (lo, iface(IN_MAC, 0)),
        (e0, iface(OUT_MAC, 1)),
        (e1, iface(E1_MAC, 2)),
    ];
    datapath::set_ifaces(&mut ebpf, &ifaces, &[e1], &[]).unwrap();
    let mut h = Harness {
        ebpf,
        prog: Prog::Xdp,
        e0,
        e1,
        ifaces,
    };
    h.install_routes();
    datapath::set_local_addrs(
        &mut h.ebpf,
        &[Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 2, 0, 1)],
    )
    .unwrap();
    h.neigh(e0, [10, 2, 0, 5], NB_MAC);
    h.neigh(e0, [10, 2, 0, 254], NH1_MAC);
    h.neigh(e0, [10, 2, 0, 253], NH2_MAC);
    h.neigh(e1, [10, 3, 0, 5], NB_MAC);
    h.neigh(lo, [10, 1, 0, 9], HOST_MAC);
    h.neigh6(e0, v6(DST6), NB_MAC);
    h.neigh6(e0, v6([0x2001, 0xdb8, 2, 0, 0, 0, 0, 0xfe]), NH1_MAC);
    h.neigh6(e0, v6([0x2001, 0xdb8, 2, 0, 0, 0, 0, 0xfd]), NH2_MAC);
    h.neigh6(e1, v6([0x2001, 0xdb8, 3, 0, 0, 0, 0, 5]), NB_MAC);
    h.neigh6(lo, v6([0x2001, 0xdb8, 1, 0, 0, 0, 0, 9]), HOST_MAC);
    h
}

impl Harness {
    fn neigh(&mut self, ifindex: u32, ip: [u8; 4], mac: [u8; 6]) {
        use aya::maps::HashMap;
        let mut m: HashMap<_, router_common::NeighKey, router_common::Neigh> =
            HashMap::try_from(self.ebpf.map_mut(map_names::NEIGHS).unwrap()).unwrap();
        m.insert(
            router_common::NeighKey { ifindex, addr: ip },
            router_common::Neigh { mac, _pad: [0; 2] },
            0,
        )
        .unwrap();
    }

    fn neigh6(&mut self, ifindex: u32, ip: [u8; 16], mac: [u8; 6]) {
        use aya::maps::HashMap;
        let mut m: HashMap<_, router_common::Neigh6Key, router_common::Neigh> =
            HashMap::try_from(self.ebpf.map_mut(map_names::NEIGHS6).unwrap()).unwrap();
        m.insert(
            router_common::Neigh6Key { ifindex, addr: ip },
            router_common::Neigh { mac, _pad: [0; 2] },
            0,
        )
        .unwrap();
    }

    /// Runs the program once on `frame`: (return code, output bytes).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte frame: {e}", frame.len()))
    }

    /// As `run`, with a GSO size for the tc program (0: not GSO).
    fn try_run_gso(
        &mut self,
        frame: &[u8],
        gso_size: u32,
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let res = match self.prog {
            Prog::Xdp => datapath::program(&mut self.ebpf)
                .unwrap()
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..Default::default()
                })?,
            Prog::Tc => {
                // A __sk_buff: received on lo (ingress_ifindex, ifindex 1), and a GSO size.
                let mut ctx = [0u8; 192];
                ctx[36..40].copy_from_slice(&1u32.to_ne_bytes());
                ctx[40..44].copy_from_slice(&1u32.to_ne_bytes());
                if gso_size > 0 {
                    ctx[164..168].copy_from_slice(&2u32.to_ne_bytes());
                    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
                }
                datapath::tc_program(&mut self.ebpf)
                    .unwrap()
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        ..Default::default()
                    })?
            }
        };
        out.truncate(res.data_size_out as usize);
        Ok((normalize(self.prog, res.return_value), out))
    }

    fn try_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        self.try_run_gso(frame, 0)
    }

    fn stats(&self) -> Vec<Stats> {
        (0..STATS_SLOTS)
            .map(|s| datapath::stats_of(&self.ebpf, s).unwrap())
            .collect()
    }
}

fn udp_frame(dst_mac: [u8; 6], ip: &Ipv4) -> Vec<u8> {
    ipv4_udp(dst_mac, HOST_MAC, ip)
}

/// What the router must emit for `ip` sent to it: new MACs, TTL − 1, checksum from scratch.
fn forwarded(dst_mac: [u8; 6], ip: &Ipv4) -> Vec<u8> {
    let mut out = ip.clone();
    out.ttl -= 1;
    ipv4_udp(dst_mac, OUT_MAC, &out)
}

#[test]
fn forwards_to_a_connected_host_byte_exact() {
    for mut h in both() {
        let ip = Ipv4::udp(SRC, DST, 64);
        let input = udp_frame(IN_MAC, &ip);
        let (rc, out) = h.run(&input);
        assert_eq!(rc, XDP_REDIRECT);
        let want = forwarded(NB_MAC, &ip);
        assert_eq!(out, want, "forwarded frame differs");
        // Spelled out, so that a failure says which part is wrong.
        assert_eq!(&out[0..6], &NB_MAC, "destination MAC = the neighbour's");
        assert_eq!(&out[6..12], &OUT_MAC, "source MAC = the egress device's");
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        assert_eq!(
            tests::frame::checksum(&out[14..34]),
            0,
            "header checksum verifies"
        );
        assert_eq!(&out[34..], &input[34..], "payload untouched");
        let s = h.stats();
        assert_eq!(s[0].fwd_packets, 1);
        assert_eq!(s[0].fwd_bytes, input.len() as u64);
        assert_eq!(s[0].pass_packets(), 0);
    }
}

#[test]
fn extra_routes_use_the_longest_prefix_and_the_nexthop_mac() {
    for mut h in both() {
        for (dst, mac) in [
            ([10, 9, 1, 1], NH1_MAC),
            ([10, 9, 9, 7], NH2_MAC),
            ([10, 9, 255, 255], NH1_MAC),
        ] {
            let ip = Ipv4::udp(SRC, dst, 17);
            let (rc, out) = h.run(&udp_frame(IN_MAC, &ip));
            assert_eq!(rc, XDP_REDIRECT, "to {dst:?}");
            assert_eq!(out, forwarded(mac, &ip), "to {dst:?}");
        }
    }
}

#[test]
fn incremental_checksum_equals_recomputation() {
    for mut h in both() {
        let mut n = 0;
        for ttl in 2..=255u8 {
            for (tos, id, frag) in [
                (0u8, 0u16, 0u16),
                (0xb8, 0xffff, 0x4000),
                (0x10, 0x8001, 0x2005),
                (0xff, 0xfeff, 0xffff),
            ] {
                let mut ip = Ipv4::udp([10, 1, 0, ttl], [10, 2, 0, 5], ttl);
                ip.tos = tos;
                ip.id = id.wrapping_add(ttl as u16 * 257);
                ip.flags_frag = frag;
                let (rc, out) = h.run(&udp_frame(IN_MAC, &ip));
                assert_eq!(rc, XDP_REDIRECT);
                assert_eq!(
                    out,
                    forwarded(NB_MAC, &ip),
                    "ttl {ttl} tos {tos:#x} id {:#x} frag {frag:#x}",
                    ip.id
                );
                n += 1;
            }
        }
        assert_eq!(h.stats()[0].fwd_packets, n);
    }
}

#[test]
fn every_pass_reason_is_counted_and_leaves_the_frame_untouched() {
    for mut h in both() {
        h.set_mtu_of_e0(1400);
        let ok = Ipv4::udp(SRC, DST, 64);
        let with = |f: &dyn Fn(&mut Ipv4)| {
            let mut ip = ok.clone();
            f(&mut ip);
            udp_frame(IN_MAC, &ip)
        };
        let mut bad_csum = udp_frame(IN_MAC, &ok);
        bad_csum[24] ^= 0x40;
        let mut short_total = udp_frame(IN_MAC, &ok);
        short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        let mut long_total = udp_frame(IN_MAC, &ok);
        let too_long = (long_total.len() - 14 + 1) as u16;
        long_total[16..18].copy_from_slice(&too_long.to_be_bytes());
        let mut version6 = udp_frame(IN_MAC, &ok);
        version6[14] = 0x65;
        let mut ihl4 = udp_frame(IN_MAC, &ok);
        ihl4[14] = 0x44;
        let big = {
            let payload = vec![0x5a; 1400];
            let l4 = tests::frame::udp(1, 2, &payload);
            let mut l3 = ok.header(l4.len());
            l3.extend_from_slice(&l4);
            ethernet(IN_MAC, HOST_MAC, 0x0800, &l3)
        };
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            (
                "ARP",
                ethernet(IN_MAC, HOST_MAC, 0x0806, &[0u8; 28]),
                why::NOT_IP,
            ),
            (
                "802.1Q-tagged",
                ethernet(IN_MAC, HOST_MAC, 0x8100, &[0x60; 60]),
                why::NOT_IP,
            ),
            (
                "other unicast MAC",
                udp_frame([0x02, 9, 9, 9, 9, 9], &ok),
                why::NOT_OUR_MAC,
            ),
            ("broadcast MAC", udp_frame([0xff; 6], &ok), why::BCAST_MCAST),
            (
                "multicast MAC",
                udp_frame([0x01, 0, 0x5e, 0, 0, 5], &ok),
                why::BCAST_MCAST,
            ),
            (
                "multicast IP",
                with(&|ip| ip.dst = [224, 0, 0, 5]),
                why::BCAST_MCAST,
            ),
            (
                "limited broadcast IP",
                with(&|ip| ip.dst = [255, 255, 255, 255]),
                why::BCAST_MCAST,
            ),
            (
                "router address",
                with(&|ip| ip.dst = [10, 2, 0, 1]),
                why::LOCAL_DEST,
            ),
            (
                "ingress gateway address",
                with(&|ip| ip.dst = [10, 1, 0, 1]),
                why::LOCAL_DEST,
            ),
            (
                "subnet broadcast",
                with(&|ip| ip.dst = [10, 2, 0, 255]),
                why::LOCAL_DEST,
            ),
            ("TTL 1", with(&|ip| ip.ttl = 1), why::TTL_EXCEEDED),
            ("TTL 0", with(&|ip| ip.ttl = 0), why::TTL_EXCEEDED),
            (
                "IP options",
                with(&|ip| ip.options = vec![1, 1, 1, 0]),
                why::IP_OPTIONS,
            ),
            (
                "no route",
                with(&|ip| ip.dst = [192, 0, 2, 1]),
                why::NO_ROUTE,
            ),
            (
                "no neighbour",
                with(&|ip| ip.dst = [10, 2, 0, 77]),
                why::NO_NEIGH,
            ),
            (
                "no neighbour for the nexthop",
                with(&|ip| ip.dst = [10, 3, 0, 77]),
                why::NO_NEIGH,
            ),
            (
                "egress = ingress",
                with(&|ip| ip.dst = [10, 1, 0, 9]),
                why::SAME_IFACE,
            ),
            ("larger than the egress MTU", big, why::TOO_BIG),
            ("total length < 20", short_total, why::MALFORMED),
            ("total length > frame", long_total, why::MALFORMED),
            ("version 6 in an IPv4 ethertype", version6, why::MALFORMED),
            ("IHL 4", ihl4, why::MALFORMED),
            ("bad header checksum", bad_csum, why::BAD_CHECKSUM),
            (
                "source 127.0.0.1",
                with(&|ip| ip.src = [127, 0, 0, 1]),
                why::MARTIAN,
            ),
            (
                "source 0.0.0.0",
                with(&|ip| ip.src = [0, 0, 0, 0]),
                why::MARTIAN,
            ),
            (
                "source multicast",
                with(&|ip| ip.src = [224, 1, 2, 3]),
                why::MARTIAN,
            ),
            (
                "destination 127.0.0.1",
                with(&|ip| ip.dst = [127, 0, 0, 1]),
                why::MARTIAN,
            ),
            (
                "source = the router's address on the egress subnet",
                with(&|ip| ip.src = [10, 2, 0, 1]),
                why::MARTIAN,
            ),
            (
                "source = the router's address on the ingress subnet",
                with(&|ip| ip.src = [10, 1, 0, 1]),
                why::MARTIAN,
            ),
            (
                "egress not in the devmap",
                with(&|ip| ip.dst = [10, 3, 0, 5]),
                why::NO_TX_PORT,
            ),
        ];
        h.assert_each_passed(cases);
        let _ = h.e1;
    }
}

impl Harness {
    /// Each (what, frame, reason): XDP_PASS, the frame unchanged, exactly its own reason counted
    /// once on the ingress device with the frame's bytes, nothing else moved.
    fn assert_each_passed(&mut self, cases: Vec<(&str, Vec<u8>, usize)>) {
        for (what, frame, reason) in cases {
            let before = self.stats();
            let (rc, out) = self.run(&frame);
            assert_eq!(rc, XDP_PASS, "{what}: must go to the kernel");
            assert_eq!(out, frame, "{what}: a passed frame must be unchanged");
            let after = self.stats();
            for r in 0..why::COUNT {
                let d = after[0].pass[r] - before[0].pass[r];
                assert_eq!(
                    d,
                    (r == reason) as u64,
                    "{what}: counter {} moved by {d}",
                    why::NAMES[r]
                );
            }
            assert_eq!(
                after[0].pass_bytes - before[0].pass_bytes,
                frame.len() as u64,
                "{what}: pass bytes"
            );
            assert_eq!(
                after[0].fwd_packets, before[0].fwd_packets,
                "{what}: not forwarded"
            );
            assert_eq!(
                &after[1..],
                &before[1..],
                "{what}: other devices' counters moved"
            );
        }
    }

    /// The egress MTU lives in the device entry and in every nexthop through the device.
    fn set_mtu_of_e0(&mut self, mtu: u32) {
        let e0 = self.e0;
        self.ifaces
            .iter_mut()
            .filter(|(i, _)| *i == e0)
            .for_each(|(_, d)| d.mtu = mtu);
        datapath::set_ifaces(&mut self.ebpf, &self.ifaces, &[self.e1], &[]).unwrap();
        self.install_routes();
    }

    /// lo: 10.1.0.0/24, e0: 10.2.0.0/24, e1: 10.3.0.0/24; 10.9.0.0/16 and 10.9.9.0/24 via
    /// nexthops on e0; the router's own addresses. The same in IPv6: 2001:db8:1..3::/64,
    /// 2001:db8:9::/48 and 2001:db8:9:9::/64 via nexthops on e0.
    fn install_routes(&mut self) {
        self.install_routes_with_kernel(&[]);
    }

    /// `install_routes` and the namespace's routes `kernel`, which the fast path leaves to the
    /// kernel.
    fn install_routes_with_kernel(&mut self, kernel: &[IpNet]) {
        let (lo, e0, e1) = (1, self.e0, self.e1);
        let routes = router_ctl::fib::writer::route_entries(
            &self.ifaces,
            &[
                (pfx("10.1.0.0/24"), lo),
                (pfx("10.2.0.0/24"), e0),
                (pfx("10.3.0.0/24"), e1),
                (pfx("2001:db8:1::/64"), lo),
                (pfx("2001:db8:2::/64"), e0),
                (pfx("2001:db8:3::/64"), e1),
            ],
            &[
                (pfx("10.9.0.0/16"), e0, ip("10.2.0.254")),
                (pfx("10.9.9.0/24"), e0, ip("10.2.0.253")),
                (pfx("2001:db8:9::/48"), e0, ip("2001:db8:2::fe")),
                (pfx("2001:db8:9:9::/64"), e0, ip("2001:db8:2::fd")),
            ],
            &[
                ip("10.1.0.1"),
                ip("10.2.0.1"),
                ip("10.2.0.255"),
                ip("2001:db8:1::1"),
                ip("2001:db8:2::1"),
                ip("2001:db8:2::"),
            ],
        );
        let routes = router_ctl::fib::writer::with_kernel_routes(routes, kernel);
        router_ctl::fib::writer::set_routes(&mut self.ebpf, &routes).unwrap();
    }

    /// Sets `flags` (`iface_flags`) on the ingress device, lo.
    fn set_ingress_flags(&mut self, flags: u16) {
        self.ifaces[0].1.flags = flags;
        datapath::set_ifaces(&mut self.ebpf, &self.ifaces, &[self.e1], &[]).unwrap();
    }
}

/// What a namespace leaves to its kernel: a route the fast path does not carry
/// (`route_kind::KERNEL`: a blackhole, a route through another device) and a port's family
/// its kernel would not forward (`iface_flags::KERNEL_V4`, `_V6`: forwarding off, policy
/// rules). Both are passed untouched and counted as such; the rest is still forwarded
/// byte-exact.
#[test]
fn what_the_namespace_leaves_to_its_kernel_is_passed_untouched() {
    use router_common::iface_flags;
    for mut h in both() {
        // Inside carried routes: 10.9.9.0/24 in 10.9.0.0/16, 2001:db8:9:9::/64 in ::/48.
        h.install_routes_with_kernel(&[pfx("10.9.9.0/24"), pfx("2001:db8:9:9::/64")]);
        let v4 = Ipv4::udp(SRC, DST, 64);
        let v6_ = Ipv6::udp(v6(SRC6), v6(DST6), 64);
        h.assert_each_passed(vec![
            (
                "to a kernel route",
                udp_frame(IN_MAC, &Ipv4::udp(SRC, [10, 9, 9, 7], 17)),
                why::KERNEL_ROUTE,
            ),
            (
                "to an IPv6 kernel route",
                udp6_frame(
                    IN_MAC,
                    &Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 9, 9, 0, 0, 0, 7]), 17),
                ),
                why::KERNEL_ROUTE,
            ),
        ]);
        let ip = Ipv4::udp(SRC, [10, 9, 1, 1], 17);
        assert_eq!(
            h.run(&udp_frame(IN_MAC, &ip)),
            (XDP_REDIRECT, forwarded(NH1_MAC, &ip)),
            "the covering route"
        );
        h.set_ingress_flags(iface_flags::KERNEL_V4);
        h.assert_each_passed(vec![(
            "IPv4 on a port whose IPv4 is the kernel's",
            udp_frame(IN_MAC, &v4),
            why::KERNEL_POLICY,
        )]);
        assert_eq!(
            h.run(&udp6_frame(IN_MAC, &v6_)),
            (XDP_REDIRECT, forwarded6(NB_MAC, &v6_)),
            "IPv6 on a port whose IPv4 only is the kernel's"
        );
        h.set_ingress_flags(iface_flags::KERNEL_V6);
        h.assert_each_passed(vec![(
            "IPv6 on a port whose IPv6 is the kernel's",
            udp6_frame(IN_MAC, &v6_),
            why::KERNEL_POLICY,
        )]);
        assert_eq!(
            h.run(&udp_frame(IN_MAC, &v4)),
            (XDP_REDIRECT, forwarded(NB_MAC, &v4)),
            "IPv4 on a port whose IPv6 only is the kernel's"
        );
    }
}

#[test]
fn a_frame_of_exactly_the_egress_mtu_is_forwarded() {
    for mut h in both() {
        h.set_mtu_of_e0(1400);
        let ip = Ipv4::udp(SRC, DST, 64);
        let payload = vec![0xa5; 1400 - 20 - 8];
        let l4 = tests::frame::udp(1, 2, &payload);
        let mut l3 = ip.header(l4.len());
        l3.extend_from_slice(&l4);
        let (rc, out) = h.run(&ethernet(IN_MAC, HOST_MAC, 0x0800, &l3));
        assert_eq!(rc, XDP_REDIRECT);
        let mut ip2 = ip.clone();
        ip2.ttl = 63;
        let mut l3b = ip2.header(l4.len());
        l3b.extend_from_slice(&l4);
        assert_eq!(out, ethernet(NB_MAC, OUT_MAC, 0x0800, &l3b));
    }
}

#[test]
fn every_truncation_is_passed_without_reading_past_the_end() {
    for mut h in both() {
        let full = udp_frame(IN_MAC, &Ipv4::udp(SRC, DST, 64));
        assert!(full.len() > 54);
        let mut refused = Vec::new();
        for len in 0..=54usize {
            let frame = &full[..len];
            let before = h.stats();
            match h.try_run(frame) {
                Ok((rc, out)) => {
                    assert_eq!(rc, XDP_PASS, "{len}-byte truncation");
                    assert_eq!(&out[..], frame, "{len}-byte truncation changed");
                    let after = h.stats();
                    let d: u64 = after[0].pass_packets() - before[0].pass_packets();
                    assert_eq!(d, 1, "{len}-byte truncation counted once");
                    assert_eq!(
                        after[0].pass[why::MALFORMED] - before[0].pass[why::MALFORMED],
                        1,
                        "{len}-byte truncation is malformed"
                    );
                }
                // The kernel itself refuses test frames shorter than an Ethernet header, and
                // skbs without their network header.
                Err(_) if len < 14 || (h.prog == Prog::Tc && tc_refuses(frame)) => {
                    refused.push(len)
                }
                Err(e) => panic!("{len}-byte truncation: {e:?}"),
            }
        }
        assert!(refused
            .iter()
            .all(|l| *l < 14 || (h.prog == Prog::Tc && *l < 34)));
    }
}

#[test]
fn frames_on_an_unknown_device_are_passed_and_counted() {
    for mut h in both() {
        // The ingress device leaves the router (as the controller removes it: both the index
        // array and the hash map).
        let rest: Vec<_> = h.ifaces.iter().filter(|(i, _)| *i != 1).copied().collect();
        datapath::set_ifaces(&mut h.ebpf, &rest, &[h.e1], &[]).unwrap();
        let frame = udp_frame(IN_MAC, &Ipv4::udp(SRC, DST, 64));
        let (rc, out) = h.run(&frame);
        assert_eq!(rc, XDP_PASS);
        assert_eq!(out, frame);
        let s = h.stats();
        assert_eq!(s[UNKNOWN_IFACE_SLOT as usize].pass[why::UNKNOWN_IFACE], 1);
        assert_eq!(s[0].pass_packets(), 0);
    }
}

/// A device whose ifindex shares its index slot with another device's is found through the
/// hash map: here ifindex 4097 takes slot 1 first, and lo (ifindex 1) still forwards.
#[test]
fn a_device_sharing_an_index_slot_is_still_found() {
    for mut h in both() {
        let other = Iface {
            mac: [0x02, 0, 0, 0, 0x09, 0x09],
            flags: 0,
            mtu: 1500,
            slot: 3,
        };
        let mut ifaces = vec![(1 + router_common::IFACE_INDEX_SLOTS, other)];
        ifaces.extend(h.ifaces.iter().copied());
        datapath::set_ifaces(
            &mut h.ebpf,
            &ifaces,
            &[h.e1, 1 + router_common::IFACE_INDEX_SLOTS],
            &[],
        )
        .unwrap();
        let ip = Ipv4::udp(SRC, DST, 64);
        let (rc, out) = h.run(&udp_frame(IN_MAC, &ip));
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(out, forwarded(NB_MAC, &ip));
        assert_eq!(h.stats()[0].fwd_packets, 1, "counted on lo's slot");
    }
}

/// The kernel side of the route table: the real program's choice of nexthop, for random tables
/// and destinations, equals a simple reference longest-prefix match.
#[test]
fn kernel_lookup_equals_a_reference_lpm() {
    for mut h in both() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Prefixes of every length nested inside 10.64.0.0/10, each through its own nexthop. The
        // table then changes twice (a third of it replaced, nexthops moved), so that the writer's
        // reuse of groups and nexthop slots is checked in the kernel too.
        let nh_ip = |i: u16| Ipv4Addr::new(10, 2, 1 + (i >> 8) as u8, i as u8);
        let nh_mac = |i: u16| [0x02, 0, 0, 0x77, (i >> 8) as u8, i as u8];
        for i in 0..600u16 {
            h.neigh(h.e0, nh_ip(i).octets(), nh_mac(i));
        }
        let mut table: Vec<(Ipv4Net, u16)> = vec![(net("10.64.0.0/10"), 0)];
        for step in 0..3 {
            if step > 0 {
                let keep = table.len() * 2 / 3;
                table.truncate(keep);
                for (_, i) in table.iter_mut().skip(1).step_by(5) {
                    *i = (*i + 300) % 600;
                }
                if step == 2 {
                    // Without the covering /10, blocks have holes: entries that must read "no route".
                    table.remove(0);
                }
            }
            while table.len() < 400 {
                let len = 10 + (rnd() % 23) as u8;
                let a = 0x0a40_0000
                    | (rnd() as u32
                        & 0x003f_ffff
                        & if rnd() % 2 == 0 {
                            0x003f_00ff
                        } else {
                            0x003f_ffff
                        });
                let n = Ipv4Net {
                    addr: Ipv4Addr::from(a & Ipv4Net::mask(len)),
                    len,
                };
                if !table.iter().any(|(p, _)| *p == n) {
                    table.push((n, (rnd() % 600) as u16));
                }
            }
            let gateways: Vec<_> = table
                .iter()
                .map(|(n, i)| ((*n).into(), h.e0, nh_ip(*i).into()))
                .collect();
            let routes = router_ctl::fib::writer::route_entries(
                &h.ifaces,
                &[(pfx("10.1.0.0/24"), 1), (pfx("10.2.0.0/16"), h.e0)],
                &gateways,
                &[],
            );
            router_ctl::fib::writer::set_routes(&mut h.ebpf, &routes).unwrap();
            for k in 0..2000 {
                let dst = if k % 2 == 0 {
                    let (n, _) = table[(rnd() % table.len() as u64) as usize];
                    Ipv4Addr::from(n.network() | (rnd() as u32 & !Ipv4Net::mask(n.len)))
                } else {
                    Ipv4Addr::from(0x0a00_0000 | (rnd() as u32 & 0x00ff_ffff))
                };
                let best = table
                    .iter()
                    .filter(|(n, _)| n.contains(dst))
                    .max_by_key(|(n, _)| n.len);
                let ip = Ipv4::udp(SRC, dst.octets(), 64);
                let no_route = h.stats()[0].pass[why::NO_ROUTE];
                let (rc, out) = h.run(&udp_frame(IN_MAC, &ip));
                match best {
                    Some((_, i)) => {
                        assert_eq!(rc, XDP_REDIRECT, "step {step}: {dst}");
                        assert_eq!(out[0..6], nh_mac(*i), "step {step}: {dst}: wrong nexthop");
                    }
                    None if net("10.2.0.0/16").contains(dst)
                        || net("10.1.0.0/24").contains(dst) => {}
                    None => {
                        assert_eq!(rc, XDP_PASS, "step {step}: {dst} has no route");
                        let s = h.stats()[0].pass[why::NO_ROUTE];
                        assert_eq!(
                            s,
                            no_route + 1,
                            "step {step}: {dst} must be passed as no_route"
                        );
                    }
                }
            }
        }
    }
}

/// A group freed by one update and reused by a later one must not keep entries of its old life:
/// entries the new table leaves empty must read "no route".
#[test]
fn a_reused_group_holds_nothing_of_its_old_table() {
    for mut h in both() {
        let (e0, ifaces) = (h.e0, h.ifaces.clone());
        let install = |h: &mut Harness, gw: &[(&str, [u8; 4])]| {
            let g: Vec<_> = gw
                .iter()
                .map(|(n, nh)| (pfx(n), e0, IpAddr::from(*nh)))
                .collect();
            let r = router_ctl::fib::writer::route_entries(
                &ifaces,
                &[(pfx("10.1.0.0/24"), 1), (pfx("10.2.0.0/24"), e0)],
                &g,
                &[],
            );
            router_ctl::fib::writer::set_routes(&mut h.ebpf, &r).unwrap();
        };
        h.neigh(e0, [10, 2, 0, 41], [2, 0, 0, 0, 0, 41]);
        h.neigh(e0, [10, 2, 0, 42], [2, 0, 0, 0, 0, 42]);
        install(
            &mut h,
            &[
                ("10.64.0.0/10", [10, 2, 0, 41]),
                ("10.70.1.0/24", [10, 2, 0, 42]),
            ],
        );
        install(&mut h, &[]);
        // Five blocks need groups now: the lowest free numbers, among them the one 10.70 had, whose
        // entries all pointed at the /10's nexthop.
        let five = [
            ("10.90.1.0/24", [10, 2, 0, 42]),
            ("10.91.1.0/24", [10, 2, 0, 42]),
            ("10.92.1.0/24", [10, 2, 0, 42]),
            ("10.93.1.0/24", [10, 2, 0, 42]),
            ("10.94.1.0/24", [10, 2, 0, 42]),
        ];
        install(&mut h, &five);
        let (rc, out) = h.run(&udp_frame(IN_MAC, &Ipv4::udp(SRC, [10, 90, 1, 7], 64)));
        assert_eq!((rc, &out[0..6]), (XDP_REDIRECT, &[2u8, 0, 0, 0, 0, 42][..]));
        let holes = (90..=94u8).flat_map(|b| [[10, b, 2, 7], [10, b, 200, 1]]);
        for dst in holes.chain([[10, 70, 1, 1], [10, 64, 0, 1]]) {
            let before = h.stats()[0].pass[why::NO_ROUTE];
            let (rc, _) = h.run(&udp_frame(IN_MAC, &Ipv4::udp(SRC, dst, 64)));
            assert_eq!(rc, XDP_PASS, "{dst:?} has no route");
            assert_eq!(
                h.stats()[0].pass[why::NO_ROUTE],
                before + 1,
                "{dst:?} must pass as no_route"
            );
        }
    }
}

/// Several nexthops for one destination (ECMP): flows spread over both, each flow stays on one,
/// and every forwarded frame is byte-exact for the nexthop it took.
#[test]
fn ecmp_spreads_flows_and_keeps_each_on_one_nexthop() {
    for mut h in both() {
        let (e0, ifaces) = (h.e0, h.ifaces.clone());
        let (a, b) = ([10, 2, 0, 241], [10, 2, 0, 242]);
        let mac = |ip: [u8; 4]| [0x02, 0, 0, 0, 0x0e, ip[3]];
        h.neigh(e0, a, mac(a));
        h.neigh(e0, b, mac(b));
        let gw = [
            (pfx("10.20.0.0/16"), e0, IpAddr::from(a)),
            (pfx("10.20.0.0/16"), e0, IpAddr::from(b)),
        ];
        let routes = router_ctl::fib::writer::route_entries(
            &ifaces,
            &[(pfx("10.1.0.0/24"), 1), (pfx("10.2.0.0/24"), e0)],
            &gw,
            &[],
        );
        router_ctl::fib::writer::set_routes(&mut h.ebpf, &routes).unwrap();
        let frame = |sport: u16, ttl: u8, dst_mac: [u8; 6], src_mac: [u8; 6]| {
            let l4 = tests::frame::udp(sport, 53, &[7u8; 32]);
            let mut l3 = Ipv4::udp(SRC, [10, 20, 3, 4], ttl).header(l4.len());
            l3.extend_from_slice(&l4);
            ethernet(dst_mac, src_mac, 0x0800, &l3)
        };
        let mut per_nexthop = [0u32; 2];
        for sport in 1000..1256u16 {
            let mut chosen = None;
            for _ in 0..3 {
                let (rc, out) = h.run(&frame(sport, 64, IN_MAC, HOST_MAC));
                assert_eq!(rc, XDP_REDIRECT, "flow {sport}");
                let m: [u8; 6] = out[0..6].try_into().unwrap();
                assert!(m == mac(a) || m == mac(b), "flow {sport} went to {m:02x?}");
                assert_eq!(
                    out,
                    frame(sport, 63, m, OUT_MAC),
                    "flow {sport}: forwarded frame differs"
                );
                assert!(
                    chosen.is_none_or(|c| c == m),
                    "flow {sport} changed nexthop"
                );
                chosen = Some(m);
            }
            per_nexthop[(chosen.unwrap() == mac(b)) as usize] += 1;
        }
        assert!(
            per_nexthop.iter().all(|n| *n > 64),
            "flows are not spread: {per_nexthop:?}"
        );
        // Without ports (ICMP), flows are told apart by their addresses.
        let mut per_nexthop = [0u32; 2];
        for i in 0..64u8 {
            let mut ip = Ipv4::udp([172, 16, 100, 3], [10, 20, i, 1], 64);
            ip.protocol = 1;
            let l3 = {
                let mut h = ip.header(8);
                h.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
                h
            };
            let (rc, out) = h.run(&ethernet(IN_MAC, HOST_MAC, 0x0800, &l3));
            assert_eq!(rc, XDP_REDIRECT);
            per_nexthop[(out[0..6] == mac(b)) as usize] += 1;
        }
        assert!(
            per_nexthop.iter().all(|n| *n > 12),
            "ICMP flows are not spread: {per_nexthop:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6: the same properties as IPv4 above.

fn udp6_frame(dst_mac: [u8; 6], ip: &Ipv6) -> Vec<u8> {
    ipv6_udp(dst_mac, HOST_MAC, ip)
}

/// What the router must emit for `ip` sent to it: new MACs, hop limit − 1, nothing else.
fn forwarded6(dst_mac: [u8; 6], ip: &Ipv6) -> Vec<u8> {
    let mut out = ip.clone();
    out.hop_limit -= 1;
    ipv6_udp(dst_mac, OUT_MAC, &out)
}

#[test]
fn forwards_ipv6_to_a_connected_host_byte_exact() {
    for mut h in both() {
        let ip = Ipv6::udp(v6(SRC6), v6(DST6), 64);
        let input = udp6_frame(IN_MAC, &ip);
        let (rc, out) = h.run(&input);
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(out, forwarded6(NB_MAC, &ip), "forwarded frame differs");
        assert_eq!(&out[0..6], &NB_MAC, "destination MAC = the neighbour's");
        assert_eq!(&out[6..12], &OUT_MAC, "source MAC = the egress device's");
        assert_eq!(out[14 + 7], 63, "hop limit decremented");
        assert_eq!(
            &out[12..21],
            &input[12..21],
            "ethertype, version, class, flow, length"
        );
        assert_eq!(&out[22..], &input[22..], "addresses and payload untouched");
        let s = h.stats();
        assert_eq!((s[0].fwd_packets, s[0].fwd6_packets), (1, 1));
        assert_eq!(s[0].fwd6_bytes, input.len() as u64);
        assert_eq!(s[0].pass_packets(), 0);
        // IPv4 forwarded right after counts in the total only.
        let (rc, _) = h.run(&udp_frame(IN_MAC, &Ipv4::udp(SRC, DST, 64)));
        assert_eq!(rc, XDP_REDIRECT);
        let s = h.stats();
        assert_eq!((s[0].fwd_packets, s[0].fwd6_packets), (2, 1));
    }
}

#[test]
fn ipv6_extra_routes_use_the_longest_prefix_and_the_nexthop_mac() {
    for mut h in both() {
        for (dst, mac) in [
            ([0x2001, 0xdb8, 9, 1, 0, 0, 0, 1], NH1_MAC),
            ([0x2001, 0xdb8, 9, 9, 0, 0, 0, 7], NH2_MAC),
            (
                [0x2001, 0xdb8, 9, 9, 0xffff, 0xffff, 0xffff, 0xffff],
                NH2_MAC,
            ),
            (
                [0x2001, 0xdb8, 9, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff],
                NH1_MAC,
            ),
        ] {
            let ip = Ipv6::udp(v6(SRC6), v6(dst), 17);
            let (rc, out) = h.run(&udp6_frame(IN_MAC, &ip));
            assert_eq!(rc, XDP_REDIRECT, "to {dst:x?}");
            assert_eq!(out, forwarded6(mac, &ip), "to {dst:x?}");
        }
    }
}

/// A prefix up to /64 that an earlier build left in the LPM trie (which then held every IPv6
/// prefix) is removed once the range table holds the table: the trie is looked up in a /64
/// holding a longer prefix, where a stale shorter entry would answer instead of the table.
#[test]
fn ipv6_prefixes_an_earlier_build_left_in_the_lpm_trie_are_removed() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    for mut h in both() {
        let stale = Key::new(48, v6([0x2001, 0xdb8, 7, 0, 0, 0, 0, 0]));
        {
            let mut t: LpmTrie<_, [u8; 16], u32> =
                LpmTrie::try_from(h.ebpf.map_mut(map_names::FIB6).unwrap()).unwrap();
            t.insert(&stale, 1, 0).unwrap();
        }
        let (lo, e0) = (1, h.e0);
        let routes = router_ctl::fib::writer::route_entries(
            &h.ifaces,
            &[(pfx("2001:db8:1::/64"), lo), (pfx("2001:db8:2::/64"), e0)],
            &[(pfx("2001:db8:7:0:8000::/65"), e0, ip("2001:db8:2::fe"))],
            &[ip("2001:db8:2::1")],
        );
        router_ctl::fib::writer::set_routes(&mut h.ebpf, &routes).unwrap();
        let t: LpmTrie<_, [u8; 16], u32> =
            LpmTrie::try_from(h.ebpf.map(map_names::FIB6).unwrap()).unwrap();
        let mut keys: Vec<u32> = t.keys().map(|k| k.unwrap().prefix_len()).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![65, 128],
            "the LPM trie holds the /65 and the /128 local address"
        );
        let long = Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 7, 0, 0x8000, 0, 0, 7]), 64);
        let (rc, out) = h.run(&udp6_frame(IN_MAC, &long));
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(out, forwarded6(NH1_MAC, &long));
        let before = h.stats()[0].pass[why::NO_ROUTE];
        let other = udp6_frame(
            IN_MAC,
            &Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 7, 0, 0, 0, 0, 7]), 64),
        );
        let (rc, out) = h.run(&other);
        assert_eq!(
            (rc, &out),
            (XDP_PASS, &other),
            "the /64 beside the /65 has no route"
        );
        assert_eq!(h.stats()[0].pass[why::NO_ROUTE], before + 1);
    }
}

#[test]
fn every_ipv6_hop_limit_class_and_flow_is_forwarded_byte_exact() {
    for mut h in both() {
        let mut n = 0;
        for hop in 2..=255u8 {
            for (tc, flow) in [(0u8, 0u32), (0xb8, 0xfffff), (0xff, 0x12345)] {
                let mut ip = Ipv6::udp(v6(SRC6), v6(DST6), hop);
                ip.traffic_class = tc;
                ip.flow_label = flow ^ hop as u32;
                let (rc, out) = h.run(&udp6_frame(IN_MAC, &ip));
                assert_eq!(rc, XDP_REDIRECT);
                assert_eq!(out, forwarded6(NB_MAC, &ip), "hop {hop} tc {tc:#x}");
                n += 1;
            }
        }
        assert_eq!(h.stats()[0].fwd6_packets, n);
    }
}

#[test]
fn every_ipv6_pass_reason_is_counted_and_leaves_the_frame_untouched() {
    for mut h in both() {
        h.set_mtu_of_e0(1400);
        let ok = Ipv6::udp(v6(SRC6), v6(DST6), 64);
        let with = |f: &dyn Fn(&mut Ipv6)| {
            let mut ip = ok.clone();
            f(&mut ip);
            udp6_frame(IN_MAC, &ip)
        };
        let a = |g: [u16; 8]| v6(g);
        let mut long_payload = udp6_frame(IN_MAC, &ok);
        let too_long = (long_payload.len() - 14 - 40 + 1) as u16;
        long_payload[18..20].copy_from_slice(&too_long.to_be_bytes());
        let mut version4 = udp6_frame(IN_MAC, &ok);
        version4[14] = 0x45;
        // One byte over: 1400 − 40 − 8 = 1352 bytes of UDP payload fit exactly.
        let big = {
            let l4 = tests::frame::udp6(&ok.src, &ok.dst, 1, 2, &[0x5a; 1353]);
            let mut l3 = ok.header(l4.len());
            l3.extend_from_slice(&l4);
            ethernet(IN_MAC, HOST_MAC, 0x86dd, &l3)
        };
        let hop_by_hop = with(&|ip| {
            ip.next_header = 0;
            // Next header UDP, length 0 (8 bytes), router alert option, PadN.
            ip.ext = vec![17, 0, 5, 2, 0, 0, 1, 0];
        });
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            (
                "other unicast MAC",
                ipv6_udp([0x02, 9, 9, 9, 9, 9], HOST_MAC, &ok),
                why::NOT_OUR_MAC,
            ),
            (
                "multicast MAC",
                ipv6_udp([0x33, 0x33, 0, 0, 0, 1], HOST_MAC, &ok),
                why::BCAST_MCAST,
            ),
            (
                "multicast destination",
                with(&|ip| ip.dst = a([0xff02, 0, 0, 0, 0, 0, 0, 1])),
                why::BCAST_MCAST,
            ),
            (
                "global multicast destination",
                with(&|ip| ip.dst = a([0xff0e, 0, 0, 0, 0, 0, 0, 0x101])),
                why::BCAST_MCAST,
            ),
            (
                "router address",
                with(&|ip| ip.dst = a([0x2001, 0xdb8, 2, 0, 0, 0, 0, 1])),
                why::LOCAL_DEST,
            ),
            (
                "ingress router address",
                with(&|ip| ip.dst = a([0x2001, 0xdb8, 1, 0, 0, 0, 0, 1])),
                why::LOCAL_DEST,
            ),
            (
                "subnet-router anycast",
                with(&|ip| ip.dst = a([0x2001, 0xdb8, 2, 0, 0, 0, 0, 0])),
                why::LOCAL_DEST,
            ),
            (
                "hop limit 1",
                with(&|ip| ip.hop_limit = 1),
                why::TTL_EXCEEDED,
            ),
            (
                "hop limit 0",
                with(&|ip| ip.hop_limit = 0),
                why::TTL_EXCEEDED,
            ),
            ("hop-by-hop options", hop_by_hop, why::IP_OPTIONS),
            (
                "link-local source",
                with(&|ip| ip.src = a([0xfe80, 0, 0, 0, 0, 0, 0, 5])),
                why::LINK_LOCAL,
            ),
            (
                "link-local destination",
                with(&|ip| ip.dst = a([0xfe80, 0, 0, 0, 0, 0, 0, 5])),
                why::LINK_LOCAL,
            ),
            (
                "link-local destination fe bf",
                with(&|ip| ip.dst = a([0xfebf, 0, 0, 0, 0, 0, 0, 5])),
                why::LINK_LOCAL,
            ),
            (
                "multicast source",
                with(&|ip| ip.src = a([0xff02, 0, 0, 0, 0, 0, 0, 1])),
                why::MARTIAN,
            ),
            (
                "unspecified source",
                with(&|ip| ip.src = [0; 16]),
                why::MARTIAN,
            ),
            (
                "loopback destination",
                with(&|ip| ip.dst = a([0, 0, 0, 0, 0, 0, 0, 1])),
                why::MARTIAN,
            ),
            (
                "IPv4-mapped destination",
                with(&|ip| ip.dst = a([0, 0, 0, 0, 0, 0xffff, 0x0a02, 5])),
                why::MARTIAN,
            ),
            (
                "no route",
                with(&|ip| ip.dst = a([0x2001, 0xdb9, 0, 0, 0, 0, 0, 1])),
                why::NO_ROUTE,
            ),
            (
                "no neighbour",
                with(&|ip| ip.dst = a([0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x77])),
                why::NO_NEIGH,
            ),
            (
                "egress = ingress",
                with(&|ip| ip.dst = a([0x2001, 0xdb8, 1, 0, 0, 0, 0, 9])),
                why::SAME_IFACE,
            ),
            ("larger than the egress MTU", big, why::TOO_BIG),
            ("payload length > frame", long_payload, why::MALFORMED),
            ("version 4 in an IPv6 ethertype", version4, why::MALFORMED),
            (
                "egress not in the devmap",
                with(&|ip| ip.dst = a([0x2001, 0xdb8, 3, 0, 0, 0, 0, 5])),
                why::NO_TX_PORT,
            ),
        ];
        h.assert_each_passed(cases);
        // Exactly the MTU goes through.
        let l4 = tests::frame::udp6(&ok.src, &ok.dst, 1, 2, &[0x5a; 1352]);
        let mut l3 = ok.header(l4.len());
        l3.extend_from_slice(&l4);
        let (rc, out) = h.run(&ethernet(IN_MAC, HOST_MAC, 0x86dd, &l3));
        assert_eq!(rc, XDP_REDIRECT, "an IPv6 packet of exactly the MTU");
        assert_eq!(out[14 + 7], 63);
    }
}

#[test]
fn every_ipv6_truncation_is_passed_without_reading_past_the_end() {
    for mut h in both() {
        let full = udp6_frame(IN_MAC, &Ipv6::udp(v6(SRC6), v6(DST6), 64));
        // (An skb test run needs the whole network header.)
        let shortest = if h.prog == Prog::Tc { 54 } else { 14 };
        for len in shortest..full.len() {
            let frame = &full[..len];
            let before = h.stats()[0];
            let (rc, out) = h.run(frame);
            assert_eq!(rc, XDP_PASS, "{len}-byte truncation");
            assert_eq!(out, frame, "{len}-byte truncation changed");
            let after = h.stats()[0];
            assert_eq!(after.pass_packets() - before.pass_packets(), 1);
            assert_eq!(
                after.pass[why::MALFORMED] - before.pass[why::MALFORMED],
                1,
                "{len}-byte truncation is malformed"
            );
        }
    }
}

#[test]
fn ipv6_ecmp_spreads_flows_and_keeps_each_on_one_nexthop() {
    for mut h in both() {
        let (e0, ifaces) = (h.e0, h.ifaces.clone());
        let nh = |i: u16| [0x2001, 0xdb8, 2, 0, 0, 0, 0, 0xf0 + i];
        let mac = |i: u16| [0x02, 0, 0, 0, 0x0e, i as u8];
        for i in 0..3 {
            h.neigh6(e0, v6(nh(i)), mac(i));
        }
        let gw: Vec<_> = (0..3)
            .map(|i| {
                (
                    pfx("2001:db8:20::/48"),
                    e0,
                    IpAddr::from(Ipv6Addr::from(v6(nh(i)))),
                )
            })
            .collect();
        let routes = router_ctl::fib::writer::route_entries(
            &ifaces,
            &[(pfx("2001:db8:1::/64"), 1), (pfx("2001:db8:2::/64"), e0)],
            &gw,
            &[],
        );
        router_ctl::fib::writer::set_routes(&mut h.ebpf, &routes).unwrap();
        let mut per = [0u32; 3];
        for sport in 2000..2300u16 {
            let ip = Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 1]), 64);
            let frame = |hop: u8, dst: [u8; 6], src: [u8; 6]| {
                let mut ip = ip.clone();
                ip.hop_limit = hop;
                let l4 = tests::frame::udp6(&ip.src, &ip.dst, sport, 443, &[1u8; 16]);
                let mut l3 = ip.header(l4.len());
                l3.extend_from_slice(&l4);
                ethernet(dst, src, 0x86dd, &l3)
            };
            let mut chosen = None;
            for _ in 0..2 {
                let (rc, out) = h.run(&frame(64, IN_MAC, HOST_MAC));
                assert_eq!(rc, XDP_REDIRECT, "flow {sport}");
                let m: [u8; 6] = out[0..6].try_into().unwrap();
                let i = (0..3).find(|i| mac(*i) == m).expect("a member's MAC");
                assert_eq!(out, frame(63, m, OUT_MAC), "flow {sport}");
                assert!(
                    chosen.is_none_or(|c| c == i),
                    "flow {sport} changed nexthop"
                );
                chosen = Some(i);
            }
            per[chosen.unwrap() as usize] += 1;
        }
        assert!(per.iter().all(|n| *n > 50), "flows are not spread: {per:?}");
    }
}

/// The IPv6 table in the kernel's LPM trie, after changes, against a reference LPM.
#[test]
fn kernel_ipv6_lookup_equals_a_reference_lpm() {
    for mut h in both() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut rnd = move || rng.next();
        let nh = |i: u16| Ipv6Addr::from(v6([0x2001, 0xdb8, 2, 0, 0, 0, 1, i]));
        let nh_mac = |i: u16| [0x02, 0, 0, 0x66, (i >> 8) as u8, i as u8];
        for i in 0..200u16 {
            h.neigh6(h.e0, nh(i).octets(), nh_mac(i));
        }
        let mut table: Vec<(Ipv6Net, u16)> = Vec::new();
        for step in 0..3 {
            table.truncate(table.len() * 2 / 3);
            while table.len() < 300 {
                let len = 16 + (rnd() % 113) as u8;
                let a = (0x2001_0db8_0100u128 << 80)
                    | ((rnd() as u128 & 0xffff_ffff) << 64)
                    | ((rnd() as u128) & 0xff00_0000_0000_00ff);
                let n = Ipv6Net {
                    addr: Ipv6Addr::from(a & Ipv6Net::mask(len)),
                    len,
                };
                if !table.iter().any(|(p, _)| *p == n) {
                    table.push((n, (rnd() % 200) as u16));
                }
            }
            let gateways: Vec<_> = table
                .iter()
                .map(|(n, i)| ((*n).into(), h.e0, IpAddr::from(nh(*i))))
                .collect();
            let routes = router_ctl::fib::writer::route_entries(
                &h.ifaces,
                &[(pfx("2001:db8:1::/64"), 1), (pfx("2001:db8:2::/64"), h.e0)],
                &gateways,
                &[],
            );
            router_ctl::fib::writer::set_routes(&mut h.ebpf, &routes).unwrap();
            for k in 0..1500 {
                let d = if k % 2 == 0 {
                    let (n, _) = table[(rnd() % table.len() as u64) as usize];
                    let host = (((rnd() as u128) << 64) | rnd() as u128) & !Ipv6Net::mask(n.len);
                    Ipv6Addr::from(n.network() | host)
                } else {
                    Ipv6Addr::from((0x2001_0db8_0100u128 << 80) | ((rnd() as u128) << 64))
                };
                let best = table
                    .iter()
                    .filter(|(n, _)| n.contains(d))
                    .max_by_key(|(n, _)| n.len);
                let (rc, out) = h.run(&udp6_frame(IN_MAC, &Ipv6::udp(v6(SRC6), d.octets(), 64)));
                match best {
                    Some((_, i)) => {
                        assert_eq!(rc, XDP_REDIRECT, "step {step}: {d}");
                        assert_eq!(out[0..6], nh_mac(*i), "step {step}: {d}: wrong nexthop");
                    }
                    None => assert_eq!(rc, XDP_PASS, "step {step}: {d} has no route"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: random and mutated frames through the real program, against properties and a model
// of what the kernel's forwarding would do with each frame. Bounded by ROUTER_FUZZ_SECONDS
// for each of the two programs (default 10: 20 s in all); run longer by hand, e.g.
// ROUTER_FUZZ_SECONDS=600 cargo xtask test fuzz.

/// The harness as the reference model sees it (`tests::model`): lo (ingress), e0, and e1 (down,
/// no redirect slot), with the routes of `install_routes` and the neighbours of `harness`.
fn harness_model(h: &Harness) -> Model {
    let dev = |mac, mtu, redirect, verify_l4| model::Dev {
        mac,
        mtu,
        redirect,
        verify_l4,
    };
    let mtu = |i: u32| h.ifaces.iter().find(|(x, _)| *x == i).unwrap().1.mtu;
    // The checksum rule is XDP's only (the tc program keeps the skb's checksum state).
    let verify = |i: u32| {
        h.prog == Prog::Xdp
            && h.ifaces.iter().find(|(x, _)| *x == i).unwrap().1.flags
                & router_common::iface_flags::VERIFY_L4
                != 0
    };
    let mut m = Model {
        devs: vec![
            dev(IN_MAC, 1500, true, verify(1)),
            dev(OUT_MAC, mtu(h.e0), true, false),
            dev(E1_MAC, mtu(h.e1), false, false),
        ],
        own4: vec![[10, 1, 0, 1], [10, 2, 0, 1]],
        ..Model::default()
    };
    let gw = |d: usize, a: &str| Via::Gateway(d, model::Addr::parse(a));
    m.route("10.1.0.0/24", Via::Connected(0))
        .route("10.2.0.0/24", Via::Connected(1))
        .route("10.3.0.0/24", Via::Connected(2))
        .route("2001:db8:1::/64", Via::Connected(0))
        .route("2001:db8:2::/64", Via::Connected(1))
        .route("2001:db8:3::/64", Via::Connected(2))
        .route("10.9.0.0/16", gw(1, "10.2.0.254"))
        .route("10.9.9.0/24", gw(1, "10.2.0.253"))
        .route("2001:db8:9::/48", gw(1, "2001:db8:2::fe"))
        .route("2001:db8:9:9::/64", gw(1, "2001:db8:2::fd"));
    for local in [
        "10.1.0.1/32",
        "10.2.0.1/32",
        "10.2.0.255/32",
        "2001:db8:1::1/128",
        "2001:db8:2::1/128",
        "2001:db8:2::/128",
    ] {
        m.route(local, Via::Local);
    }
    m.neigh(1, "10.2.0.5", NB_MAC)
        .neigh(1, "10.2.0.254", NH1_MAC)
        .neigh(1, "10.2.0.253", NH2_MAC)
        .neigh(2, "10.3.0.5", NB_MAC)
        .neigh(0, "10.1.0.9", HOST_MAC)
        .neigh(1, "2001:db8:2::5", NB_MAC)
        .neigh(1, "2001:db8:2::fe", NH1_MAC)
        .neigh(1, "2001:db8:2::fd", NH2_MAC)
        .neigh(2, "2001:db8:3::5", NB_MAC)
        .neigh(0, "2001:db8:1::9", HOST_MAC);
    m
}

/// A frame that is valid, or nearly: the seeds the mutations start from.
fn seed_frame(rng: &mut Rng) -> Vec<u8> {
    let payload: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
    let dst_mac = rng.pick(&[IN_MAC, IN_MAC, IN_MAC, [0xff; 6], OUT_MAC]);
    if rng.below(2) == 0 {
        let dst = rng.pick(&[
            [10, 2, 0, 5],
            [10, 2, 0, 6],
            [10, 9, 1, 2],
            [10, 9, 9, 9],
            [10, 1, 0, 9],
            [10, 3, 0, 5],
            [10, 2, 0, 1],
            [10, 2, 0, 255],
            [192, 0, 2, 1],
            [224, 0, 0, 1],
            [127, 0, 0, 1],
            [240, 1, 2, 3],
            [255, 255, 255, 255],
        ]);
        let src = rng.pick(&[
            SRC,
            SRC,
            SRC,
            [10, 1, 0, 1],
            [0, 1, 2, 3],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
            [224, 0, 0, 9],
        ]);
        let mut ip = Ipv4::udp(src, dst, rng.pick(&[0, 1, 2, 64, 255]));
        ip.tos = rng.next() as u8;
        ip.id = rng.next() as u16;
        ip.flags_frag = rng.pick(&[0, 0x4000, 0x2000, 0x2001, 0x0001]);
        ip.protocol = rng.pick(&[1, 6, 17, 47, 255]);
        if rng.below(8) == 0 {
            ip.options = vec![1, 1, 1, 0];
        }
        let l4 = tests::frame::udp(rng.next() as u16, rng.next() as u16, &payload);
        let mut l3 = ip.header(l4.len());
        l3.extend_from_slice(&l4);
        ethernet(dst_mac, HOST_MAC, 0x0800, &l3)
    } else {
        let g = |a: u16, b: u16| [0x2001, 0xdb8, a, b, 0, 0, 0, 5];
        let dst = rng.pick(&[
            DST6,
            g(2, 0),
            g(9, 1),
            g(9, 9),
            g(1, 0),
            g(3, 0),
            [0x2001, 0xdb8, 2, 0, 0, 0, 0, 1],
            [0x2001, 0xdb9, 0, 0, 0, 0, 0, 1],
            [0xff02, 0, 0, 0, 0, 0, 0, 1],
            [0xfe80, 0, 0, 0, 0, 0, 0, 1],
        ]);
        let mut ip = Ipv6::udp(v6(SRC6), v6(dst), rng.pick(&[0, 1, 2, 64, 255]));
        ip.traffic_class = rng.next() as u8;
        ip.flow_label = rng.next() as u32;
        ip.next_header = rng.pick(&[17, 17, 6, 58, 0, 43, 44, 60]);
        if ip.next_header != 17 {
            ip.ext = vec![17, 0, 1, 4, 0, 0, 0, 0];
        }
        let l4 = tests::frame::udp6(&ip.src, &ip.dst, 1, 2, &payload);
        let mut l3 = ip.header(l4.len());
        l3.extend_from_slice(&l4);
        ethernet(dst_mac, HOST_MAC, 0x86dd, &l3)
    }
}

/// The seed, mutated: bytes set or flipped in the headers, the frame cut or padded, and
/// sometimes the IPv4 header checksum fixed up so that the mutation gets past it.
fn fuzz_frame(rng: &mut Rng) -> Vec<u8> {
    let mut f = seed_frame(rng);
    for _ in 0..rng.below(4) {
        let i = rng.below(f.len().min(80) as u64) as usize;
        match rng.below(3) {
            0 => f[i] ^= 1 << rng.below(8),
            1 => f[i] = rng.next() as u8,
            _ => f[i] = rng.pick(&[0, 1, 0x45, 0x60, 0xff, 0x80]),
        }
    }
    match rng.below(6) {
        0 => {
            let n = rng.below(f.len() as u64 + 1) as usize;
            f.truncate(n.max(14));
        }
        1 => f.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
        _ => {}
    }
    if rng.below(2) == 0 {
        tests::frame::fix_ipv4_checksum(&mut f);
    }
    f
}

#[test]
fn fuzzed_frames_keep_every_property() {
    for mut h in both() {
        // A small egress MTU, so that the MTU rule decides for some of the fuzzed frames; and
        // lo treated as a device fed by skbs, so that XDP verifies TCP and UDP checksums.
        h.set_mtu_of_e0(100);
        h.ifaces[0].1.flags = router_common::iface_flags::VERIFY_L4;
        datapath::set_ifaces(&mut h.ebpf, &h.ifaces, &[h.e1], &[]).unwrap();
        let model = harness_model(&h);
        let secs: u64 = std::env::var("ROUTER_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let seed = std::env::var("ROUTER_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x0bad_5eed_u64);
        let mut rng = Rng(seed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        // What the counters of the ingress device must say, frame by frame, from the model.
        let mut want = Stats::ZERO;
        let base = h.stats();
        let check_counters = |h: &Harness, want: &Stats| {
            let s = h.stats();
            let mut got = s[0];
            // Checked: a counter that went backwards fails here (release arithmetic wraps).
            let (b, grew) = (&base[0], tests::grew);
            got.pass_bytes = grew("pass_bytes", b.pass_bytes, got.pass_bytes);
            got.fwd_bytes = grew("fwd_bytes", b.fwd_bytes, got.fwd_bytes);
            got.fwd_packets = grew("fwd_packets", b.fwd_packets, got.fwd_packets);
            got.fwd6_packets = grew("fwd6_packets", b.fwd6_packets, got.fwd6_packets);
            got.fwd6_bytes = grew("fwd6_bytes", b.fwd6_bytes, got.fwd6_bytes);
            for (g, b) in got.pass.iter_mut().zip(b.pass) {
                *g = grew("a pass reason", b, *g);
            }
            assert_eq!(&got, want, "the ingress counters differ from the model's");
            assert_eq!(&s[1..], &base[1..], "other devices' counters moved");
        };
        let (mut runs, mut forwarded) = (0u64, 0u64);
        let mut reasons = [0u64; why::COUNT];
        while std::time::Instant::now() < deadline {
            let f = fuzz_frame(&mut rng);
            if h.prog == Prog::Tc && tc_refuses(&f) {
                continue;
            }
            let (rc, out) = h.run(&f);
            runs += 1;
            let what = || format!("frame #{runs} (seed {seed}): {f:02x?}");
            let len = f.len() as u64;
            match model.verdict(0, &f) {
                Verdict::Forward { dev, mac } => {
                    assert_eq!(rc, XDP_REDIRECT, "the model forwards it: {}", what());
                    let want_out = tests::model::forwarded(&f, mac, model.devs[dev].mac);
                    assert_eq!(out, want_out, "forwarded bytes: {}", what());
                    forwarded += 1;
                    let v6 = (f[12..14] == [0x86, 0xdd]) as u64;
                    want.fwd_packets += 1;
                    want.fwd_bytes += len;
                    want.fwd6_packets += v6;
                    want.fwd6_bytes += v6 * len;
                }
                Verdict::Pass(reason) => {
                    assert_eq!(
                        rc,
                        XDP_PASS,
                        "the model passes it ({}): {}",
                        why::NAMES[reason],
                        what()
                    );
                    assert_eq!(out, f, "a passed frame changed: {}", what());
                    want.pass[reason] += 1;
                    want.pass_bytes += len;
                    reasons[reason] += 1;
                }
            }
            if runs % 4096 == 0 {
                check_counters(&h, &want);
            }
        }
        check_counters(&h, &want);
        let spread: Vec<String> = why::NAMES
            .iter()
            .zip(reasons)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        eprintln!(
            "fuzz: {runs} frames in {secs} s, seed {seed}: {forwarded} forwarded, passed {}",
            spread.join(" ")
        );
        // The run reached both verdicts and most reasons.
        assert!(
            runs > 1000 && forwarded > runs / 100,
            "{runs} / {forwarded}"
        );
        assert!(
            spread.len() >= 14,
            "too few pass reasons reached: {spread:?}"
        );
    }
}

/// Padding after the IP packet is trimmed from a forwarded frame, as the kernel does.
#[test]
fn ethernet_padding_is_trimmed_when_forwarding() {
    for mut h in both() {
        let ip = Ipv4::udp(SRC, DST, 64);
        let mut input = udp_frame(IN_MAC, &ip);
        input.extend_from_slice(&[0xee; 13]);
        let (rc, out) = h.run(&input);
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(out, forwarded(NB_MAC, &ip));
        let ip6 = Ipv6::udp(v6(SRC6), v6(DST6), 64);
        let mut input = udp6_frame(IN_MAC, &ip6);
        input.extend_from_slice(&[0xee; 7]);
        let (rc, out) = h.run(&input);
        assert_eq!(rc, XDP_REDIRECT);
        assert_eq!(out, forwarded6(NB_MAC, &ip6));
    }
}

/// The three tables the route-change races switch between (both families): a /16 and a /48
/// through one nexthop; the same carved into /24s and /64s through it with the rest through
/// another; both nexthops as ECMP.
fn race_tables(e0: u32, ifaces: &[(u32, Iface)]) -> Vec<Vec<(IpNet, router_common::Route)>> {
    let connected = [
        (pfx("10.1.0.0/24"), 1),
        (pfx("10.2.0.0/24"), e0),
        (pfx("2001:db8:1::/64"), 1),
        (pfx("2001:db8:2::/64"), e0),
    ];
    let (nh1, nh2) = (ip("10.2.0.254"), ip("10.2.0.253"));
    let (nh1_6, nh2_6) = (ip("2001:db8:2::fe"), ip("2001:db8:2::fd"));
    let table = |gw: Vec<(IpNet, u32, IpAddr)>| {
        router_ctl::fib::writer::route_entries(ifaces, &connected, &gw, &[])
    };
    let carved: Vec<(IpNet, u32, IpAddr)> = (0..256u32)
        .step_by(3)
        .flat_map(|x| {
            [
                (pfx(&format!("10.9.{x}.0/24")), e0, nh1),
                (pfx(&format!("2001:db8:9:{x:x}::/64")), e0, nh1_6),
            ]
        })
        .chain([
            (pfx("10.9.0.0/16"), e0, nh2),
            (pfx("2001:db8:9::/48"), e0, nh2_6),
        ])
        .collect();
    vec![
        table(vec![
            (pfx("10.9.0.0/16"), e0, nh1),
            (pfx("2001:db8:9::/48"), e0, nh1_6),
        ]),
        table(carved),
        table(vec![
            (pfx("10.9.0.0/16"), e0, nh1),
            (pfx("10.9.0.0/16"), e0, nh2),
            (pfx("2001:db8:9::/48"), e0, nh1_6),
            (pfx("2001:db8:9::/48"), e0, nh2_6),
        ]),
    ]
}

/// Make-before-break: a route table change is never seen half-done. Three tables that route the
/// same destinations differently (a /16 through one nexthop; the /16 through the other with
/// /24s carved out, so that second-level groups come and go; an ECMP pair) are written in turn
/// as fast as the writer can, IPv4 and IPv6, while this thread runs frames through the program:
/// every frame must be forwarded to one of the nexthops, byte-exact; none may be passed for want
/// of a route, a nexthop or a group.
#[test]
fn route_changes_are_never_seen_half_done() {
    for mut h in both() {
        let (e0, ifaces) = (h.e0, h.ifaces.clone());
        let tables = race_tables(e0, &ifaces);
        router_ctl::fib::writer::set_routes(&mut h.ebpf, &tables[0]).unwrap();
        let mut writer = router_ctl::fib::writer::RouteTable::open(&mut h.ebpf).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let writes = std::thread::spawn(move || {
            let mut n = 0usize;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                writer.set(&tables[n % tables.len()]).unwrap();
                n += 1;
            }
            n
        });
        let frames: Vec<Vec<u8>> = (0..256u16)
            .flat_map(|x| {
                let ip4 = Ipv4::udp(SRC, [10, 9, x as u8, 7], 64);
                let ip6 = Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 9, x, 0, 0, 0, 7]), 64);
                [udp_frame(IN_MAC, &ip4), udp6_frame(IN_MAC, &ip6)]
            })
            .collect();
        let (runs, failure) = forward_to_nh1_or_nh2(&mut h, &frames);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let writes = writes.join().unwrap();
        if let Some(f) = failure {
            panic!("a lookup saw a table half-written ({writes} tables written): {f}");
        }
        eprintln!("make-before-break: {runs} frames, {writes} tables written, all forwarded");
        assert!(writes >= 30, "only {writes} tables written");
    }
}

/// Runs `frames` through the program for 3 s (while another thread changes routes): how many
/// ran, and the first that was not forwarded byte-exact to NH1 or NH2.
fn forward_to_nh1_or_nh2(h: &mut Harness, frames: &[Vec<u8>]) -> (usize, Option<String>) {
    let t0 = std::time::Instant::now();
    let mut runs = 0usize;
    while t0.elapsed() < std::time::Duration::from_secs(3) {
        for f in frames {
            let (rc, out) = h.run(f);
            runs += 1;
            let ok = rc == XDP_REDIRECT
                && [NH1_MAC, NH2_MAC]
                    .iter()
                    .any(|m| out == tests::model::forwarded(f, *m, OUT_MAC));
            if !ok {
                let s = h.stats()[0];
                let reasons: Vec<_> = why::NAMES
                    .iter()
                    .zip(s.pass)
                    .filter(|(_, n)| *n > 0)
                    .collect();
                return (
                    runs,
                    Some(format!(
                        "frame {runs} to {:02x?}: action {rc}, passed so far {reasons:?}",
                        &f[30..34]
                    )),
                );
            }
        }
    }
    (runs, None)
}

/// `fib::writer::set_routes` itself raced against lookups: each write opens the maps afresh,
/// reads the table back and writes the new one over it in place (`write_over`, what apply and
/// the daemon use below `KEEP_FROM_ROUTES` prefixes), cycling through the three layouts of
/// `route_changes_are_never_seen_half_done` from another process's view of the pinned maps.
/// Every frame must be forwarded to one of the nexthops, byte-exact.
#[test]
fn set_routes_rewrites_are_never_seen_half_done() {
    for prog in [Prog::Xdp, Prog::Tc] {
        eprintln!("--- program: {prog:?}");
        let id = format!("packet-race-{}-{prog:?}", std::process::id());
        struct Unpin(String);
        impl Drop for Unpin {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(router_ctl::state::bpf_dir(&self.0));
            }
        }
        let _unpin = Unpin(id.clone());
        let mut h = harness_with(|| {
            datapath::load_pinned(
                &id,
                router_ctl::fib::Capacity::default(),
                datapath::Programs::BOTH,
            )
            .expect("load the programs with pinned maps")
        });
        h.prog = prog;
        let (e0, ifaces) = (h.e0, h.ifaces.clone());
        let tables = race_tables(e0, &ifaces);
        assert!(tables
            .iter()
            .all(|t| t.len() < router_ctl::fib::writer::KEEP_FROM_ROUTES));
        router_ctl::fib::writer::set_routes(&mut h.ebpf, &tables[0]).unwrap();
        // The writer's own view of the maps, as another process (apply) opens them.
        let mut maps = datapath::open_maps(&id).expect("open the pinned maps");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let writes = std::thread::spawn(move || {
            let mut n = 1usize;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                router_ctl::fib::writer::set_routes(&mut maps, &tables[n % tables.len()]).unwrap();
                n += 1;
            }
            n - 1
        });
        let frames: Vec<Vec<u8>> = (0..256u16)
            .flat_map(|x| {
                let ip4 = Ipv4::udp(SRC, [10, 9, x as u8, 7], 64);
                let ip6 = Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 9, x, 0, 0, 0, 7]), 64);
                [udp_frame(IN_MAC, &ip4), udp6_frame(IN_MAC, &ip6)]
            })
            .collect();
        let (runs, failure) = forward_to_nh1_or_nh2(&mut h, &frames);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let writes = writes.join().unwrap();
        if let Some(f) = failure {
            panic!(
                "a lookup saw a table half-written by set_routes ({writes} tables written): {f}"
            );
        }
        eprintln!("set_routes: {runs} frames, {writes} tables written over, all forwarded");
        assert!(writes >= 30, "only {writes} tables written");
    }
}

/// Single routes added, replaced (also by an ECMP pair) and removed one batch at a time, as a
/// routing daemon feeds them, while this thread runs frames through the program: /24s and /25s
/// carved out of 10.9.0.0/16 and /64s out of 2001:db8:9::/48 come and go, so that second- and
/// third-level groups are created, emptied and freed. Every frame must be forwarded to one of
/// the nexthops, byte-exact; none may be passed for want of a route, a nexthop or a group.
#[test]
fn single_route_changes_are_never_seen_half_done() {
    for mut h in both() {
        let (e0, ifaces) = (h.e0, h.ifaces.clone());
        let connected = [
            (pfx("10.1.0.0/24"), 1),
            (pfx("10.2.0.0/24"), e0),
            (pfx("2001:db8:1::/64"), 1),
            (pfx("2001:db8:2::/64"), e0),
        ];
        let (nh1, nh2) = (ip("10.2.0.254"), ip("10.2.0.253"));
        let (nh1_6, nh2_6) = (ip("2001:db8:2::fe"), ip("2001:db8:2::fd"));
        let route = |net: &str, via: IpAddr| {
            router_ctl::fib::writer::route_entries(&ifaces, &[], &[(pfx(net), e0, via)], &[])[0].1
        };
        let base = router_ctl::fib::writer::route_entries(
            &ifaces,
            &connected,
            &[
                (pfx("10.9.0.0/16"), e0, nh1),
                (pfx("2001:db8:9::/48"), e0, nh1_6),
            ],
            &[],
        );
        // The changes, in rounds: add, replace (a pair in one round in four), remove. Eight
        // /24 blocks only, so that the frames meet each group while it is being created.
        let blocks = 8u32;
        let mut changes: Vec<Vec<(IpNet, Option<Vec<router_common::Route>>)>> = Vec::new();
        for round in 0..4u32 {
            for x in (round % 2..blocks).step_by(1 + round as usize % 2) {
                let (n24, n25) = (format!("10.9.{x}.0/24"), format!("10.9.{x}.128/25"));
                let n64 = format!("2001:db8:9:{x:x}::/64");
                let pair = |a, b| Some(vec![route(&n24, a), route(&n24, b)]);
                changes.push(vec![(pfx(&n24), Some(vec![route(&n24, nh2)]))]);
                changes.push(vec![(pfx(&n25), Some(vec![route(&n25, nh1)]))]);
                changes.push(vec![(pfx(&n64), Some(vec![route(&n64, nh2_6)]))]);
                changes.push(vec![(
                    pfx(&n24),
                    if round == 3 {
                        pair(nh1, nh2)
                    } else {
                        Some(vec![route(&n24, nh1)])
                    },
                )]);
            }
            for x in (round % 2..blocks).step_by(1 + round as usize % 2) {
                let (n24, n25) = (format!("10.9.{x}.0/24"), format!("10.9.{x}.128/25"));
                let n64 = format!("2001:db8:9:{x:x}::/64");
                // A batch of two: the /25 (its group goes) and the /64.
                changes.push(vec![(pfx(&n25), None), (pfx(&n64), None)]);
                changes.push(vec![(pfx(&n24), None)]);
            }
        }
        router_ctl::fib::writer::set_routes(&mut h.ebpf, &base).unwrap();
        let mut writer = router_ctl::fib::writer::RouteTable::open(&mut h.ebpf).unwrap();
        writer.set(&base).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let writes = std::thread::spawn(move || {
            let mut n = 0usize;
            let t = std::time::Instant::now();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                writer.change(&changes[n % changes.len()]).unwrap();
                n += 1;
            }
            (n, n as f64 / t.elapsed().as_secs_f64())
        });
        let frames: Vec<Vec<u8>> = (0..blocks as u16)
            .flat_map(|x| {
                let ip4 = Ipv4::udp(SRC, [10, 9, x as u8, 7], 64);
                let ip4b = Ipv4::udp(SRC, [10, 9, x as u8, 200], 64);
                let ip6 = Ipv6::udp(v6(SRC6), v6([0x2001, 0xdb8, 9, x, 0, 0, 0, 7]), 64);
                [
                    udp_frame(IN_MAC, &ip4),
                    udp_frame(IN_MAC, &ip4b),
                    udp6_frame(IN_MAC, &ip6),
                ]
            })
            .collect();
        let (runs, failure) = forward_to_nh1_or_nh2(&mut h, &frames);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (writes, rate) = writes.join().unwrap();
        if let Some(f) = failure {
            panic!("a lookup saw a change half-written ({writes} changes written): {f}");
        }
        eprintln!("single changes: {runs} frames, {writes} batches at {rate:.0}/s, all forwarded");
        assert!(writes >= 1000, "only {writes} batches written");
    }
}

/// A GSO packet is measured by its segments against the egress MTU (as the kernel's
/// skb_gso_validate_network_len does), never by its whole length: a 3 000-byte TCP super-packet
/// whose segments fit 1 500 bytes is forwarded whole by the tc program; one whose segments do
/// not is the kernel's. XDP never sees GSO packets: the same frame is too big there.
#[test]
fn gso_packets_are_measured_by_their_segments() {
    for mut h in both() {
        let payload = vec![0x5a; 2960];
        let mut ip = Ipv4::udp(SRC, DST, 64);
        ip.protocol = 6;
        let tcp = tests::corpus::tcp(&SRC, &DST, 40000, 80, 1, 1, 0x10, &payload);
        let mut l3 = ip.header(tcp.len());
        l3.extend_from_slice(&tcp);
        let frame = ethernet(IN_MAC, HOST_MAC, 0x0800, &l3);
        let mut out_ip = ip.clone();
        out_ip.ttl -= 1;
        let mut want = out_ip.header(tcp.len());
        want.extend_from_slice(&tcp);
        let want = ethernet(NB_MAC, OUT_MAC, 0x0800, &want);
        for (gso, fits) in [(1460, true), (1448, true), (1461, false), (0, false)] {
            let before = h.stats()[0];
            let (rc, out) = h.try_run_gso(&frame, gso).unwrap();
            let forwards = fits && h.prog == Prog::Tc;
            if forwards {
                assert_eq!(rc, XDP_REDIRECT, "segments of {gso} bytes fit");
                assert_eq!(out, want, "the super-packet forwarded whole");
            } else {
                assert_eq!(rc, XDP_PASS, "gso_size {gso}");
                assert_eq!(out, frame);
                assert_eq!(
                    h.stats()[0].pass[why::TOO_BIG] - before.pass[why::TOO_BIG],
                    1
                );
            }
        }
        // An IPv6 super-packet likewise.
        let ip6 = Ipv6 {
            next_header: 6,
            ..Ipv6::udp(v6(SRC6), v6(DST6), 64)
        };
        let tcp6 = tests::corpus::tcp(&ip6.src, &ip6.dst, 40000, 80, 1, 1, 0x10, &payload);
        let mut l3 = ip6.header(tcp6.len());
        l3.extend_from_slice(&tcp6);
        let frame = ethernet(IN_MAC, HOST_MAC, 0x86dd, &l3);
        for (gso, fits) in [(1440, true), (1441, false)] {
            let (rc, _) = h.try_run_gso(&frame, gso).unwrap();
            let forwards = fits && h.prog == Prog::Tc;
            assert_eq!(
                rc,
                if forwards { XDP_REDIRECT } else { XDP_PASS },
                "IPv6 gso_size {gso}"
            );
        }
    }
}

// ---- NAT ----

/// An IPv4 frame around the transport header + payload `l4` (checksum field zeroed by the
/// caller): the TCP, UDP (unless `udp_zero`) or ICMP checksum computed from scratch.
fn l4_frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &Ipv4, l4: &[u8], udp_zero: bool) -> Vec<u8> {
    let mut l4 = l4.to_vec();
    let at = match ip.protocol {
        6 => Some(16),
        17 if !udp_zero => Some(6),
        1 => Some(2),
        _ => None,
    };
    if let Some(at) = at {
        let mut sum_in = Vec::new();
        if ip.protocol != 1 {
            sum_in.extend_from_slice(&ip.src);
            sum_in.extend_from_slice(&ip.dst);
            sum_in.extend_from_slice(&[0, ip.protocol]);
            sum_in.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        sum_in.extend_from_slice(&l4);
        let mut c = tests::frame::checksum(&sum_in);
        if ip.protocol == 17 && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut l3 = ip.header(l4.len());
    l3.extend_from_slice(&l4);
    ethernet(dst_mac, src_mac, 0x0800, &l3)
}

/// A transport header + 32-byte payload: TCP (flags `tcp_flags`), UDP or ICMP echo request.
fn l4_of(proto: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(1))
        .collect();
    let mut l4 = match proto {
        6 => {
            let mut t = Vec::new();
            t.extend_from_slice(&sport.to_be_bytes());
            t.extend_from_slice(&dport.to_be_bytes());
            t.extend_from_slice(&0x0102_0304u32.to_be_bytes());
            t.extend_from_slice(&0x0506_0708u32.to_be_bytes());
            t.extend_from_slice(&[0x50, tcp_flags, 0x20, 0x00, 0, 0, 0, 0]);
            t
        }
        17 => tests::frame::udp(sport, dport, &[])[..8].to_vec(),
        // Echo request: identifier `sport`, sequence 7.
        _ => vec![8, 0, 0, 0, (sport >> 8) as u8, sport as u8, 0, 7],
    };
    if proto == 17 {
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    }
    l4.extend_from_slice(&payload);
    l4
}

impl Harness {
    /// NAT on, with e0 as the external device and `flows` (key → flow) in NAT_FLOWS.
    fn nat(&mut self, flows: &[(router_common::NatKey, router_common::NatFlow)]) {
        use aya::maps::HashMap;
        let mut ifaces = self.ifaces.clone();
        for (i, f) in ifaces.iter_mut() {
            if *i == self.e0 {
                f.flags |= router_common::iface_flags::EXTERNAL;
            }
        }
        datapath::set_ifaces(&mut self.ebpf, &ifaces, &[self.e1], &[]).unwrap();
        datapath::set_nat_conf(&mut self.ebpf, router_common::nat_conf::ON).unwrap();
        let mut m: HashMap<_, router_common::NatKey, router_common::NatFlow> =
            HashMap::try_from(self.ebpf.map_mut(map_names::NAT_FLOWS).unwrap()).unwrap();
        for (k, v) in flows {
            m.insert(k, v, 0).unwrap();
        }
        // The hint bits the controller sets for every key it writes.
        let mut hints: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(self.ebpf.map_mut(map_names::NAT_HINT).unwrap()).unwrap();
        for (k, _) in flows {
            let (w, bit) = router_common::nat::hint_bit(k);
            let old = hints.get(&w, 0).unwrap();
            hints.set(w, old | bit, 0).unwrap();
        }
    }

    /// The copy of `k` in NAT_FLOWS, if any.
    fn nat_copy(&mut self, k: &router_common::NatKey) -> Option<router_common::NatFlow> {
        let m: aya::maps::HashMap<_, router_common::NatKey, router_common::NatFlow> =
            aya::maps::HashMap::try_from(self.ebpf.map(map_names::NAT_FLOWS).unwrap()).unwrap();
        m.get(k, 0).ok()
    }

    /// NAT_GEN[slot].
    fn nat_gen(&mut self, slot: u32) -> u32 {
        let a: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.ebpf.map(map_names::NAT_GEN).unwrap()).unwrap();
        a.get(&slot, 0).unwrap()
    }

    /// The keys the program reported for a copy since the last call.
    fn nat_reports(&mut self) -> Vec<router_common::NatKey> {
        let mut r = aya::maps::RingBuf::try_from(self.ebpf.map_mut(map_names::NAT_MISSES).unwrap())
            .unwrap();
        let mut v = Vec::new();
        while let Some(item) = r.next() {
            assert_eq!(item.len(), 16, "a report is one NatKey");
            // SAFETY: 16 bytes, read unaligned.
            v.push(unsafe {
                std::ptr::read_unaligned(item.as_ptr() as *const router_common::NatKey)
            });
        }
        v
    }
}

fn nat_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> router_common::NatKey {
    router_common::NatKey {
        src,
        dst,
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

fn nat_flow(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    flags: u32,
) -> router_common::NatFlow {
    router_common::NatFlow {
        src,
        dst,
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        flags,
        slot: 0,
        gen: 0,
        used: 0,
        until: u64::MAX,
    }
}

/// Flows the kernel's conntrack set up, translated by the fast path exactly as a from-scratch
/// rewrite would: SNAT of TCP and UDP (with a checksum, and without: 0 stays 0), a floating
/// IP's inbound side with an ICMP echo identifier changed; TCP control segments, packets to
/// the gateway without a flow and fragments go to the kernel untouched, counted by reason.
#[test]
fn nat_flows_are_translated_byte_exact_and_the_rest_is_the_kernels() {
    use router_common::nat_flags as nf;
    const EXT: [u8; 4] = [10, 2, 0, 1];
    const FIP: [u8; 4] = [10, 2, 0, 20];
    for mut h in both() {
        h.nat(&[
            (
                nat_key(SRC, 40000, DST, 5201, 17),
                nat_flow(EXT, 61000, DST, 5201, nf::SRC),
            ),
            (
                nat_key(SRC, 40001, DST, 443, 6),
                nat_flow(EXT, 61001, DST, 443, nf::SRC),
            ),
            // ICMP echo: the identifier is the "source port", the "destination port" 0.
            (
                nat_key(SRC, 0x77, FIP, 0, 1),
                nat_flow(SRC, 0x4242, DST, 0, nf::DST | nf::SRC),
            ),
        ]);
        let cases: [(u8, u16, u16, u8, bool, [u8; 4], u16, [u8; 4], u16, u32); 4] = [
            (17, 40000, 5201, 0, false, EXT, 61000, DST, 5201, nf::SRC),
            (17, 40000, 5201, 0, true, EXT, 61000, DST, 5201, nf::SRC),
            (6, 40001, 443, 0x10, false, EXT, 61001, DST, 443, nf::SRC),
            (1, 0x77, 0, 0, false, SRC, 0x4242, DST, 0, nf::DST | nf::SRC),
        ];
        for (proto, sp, dp, fl, zero, nsrc, nsp, ndst, ndp, flags) in cases {
            let dst_in = if proto == 1 { FIP } else { DST };
            let ip_in = Ipv4 {
                protocol: proto,
                ..Ipv4::udp(SRC, dst_in, 64)
            };
            let input = l4_frame(IN_MAC, HOST_MAC, &ip_in, &l4_of(proto, sp, dp, fl), zero);
            let before = h.stats()[0];
            let (rc, out) = h.run(&input);
            assert_eq!(rc, XDP_REDIRECT, "{proto}/{sp} zero={zero}");
            let ip_out = Ipv4 {
                protocol: proto,
                ..Ipv4::udp(nsrc, ndst, 63)
            };
            let want = l4_frame(NB_MAC, OUT_MAC, &ip_out, &l4_of(proto, nsp, ndp, fl), zero);
            assert_eq!(
                out, want,
                "{:?}: {proto}/{sp} zero={zero} translated",
                h.prog
            );
            if zero {
                assert_eq!(&out[40..42], &[0, 0], "a UDP checksum of 0 stays 0");
            }
            let s = h.stats()[0];
            assert_eq!(
                s.nat_src_packets - before.nat_src_packets,
                (flags & nf::SRC != 0) as u64
            );
            assert_eq!(
                s.nat_dst_packets - before.nat_dst_packets,
                (flags & nf::DST != 0) as u64
            );
        }
        // To the kernel, untouched: a FIN of a known flow, a flow the kernel has not
        // decided yet (it would leave through the external device), a fragment towards it.
        let tcp = Ipv4 {
            protocol: 6,
            ..Ipv4::udp(SRC, DST, 64)
        };
        let fin = l4_frame(IN_MAC, HOST_MAC, &tcp, &l4_of(6, 40001, 443, 0x11), false);
        let unknown = l4_frame(
            IN_MAC,
            HOST_MAC,
            &Ipv4 {
                protocol: 17,
                ..Ipv4::udp(SRC, DST, 64)
            },
            &l4_of(17, 40009, 53, 0),
            false,
        );
        let frag = l4_frame(
            IN_MAC,
            HOST_MAC,
            &Ipv4 {
                flags_frag: 0x2000,
                ..Ipv4::udp(SRC, DST, 64)
            },
            &l4_of(17, 40000, 5201, 0),
            false,
        );
        for (frame, reason) in [
            (fin, why::NAT_TCP_CONTROL),
            (unknown, why::NAT_NO_FLOW),
            (frag, why::NAT_FRAGMENT),
        ] {
            let before = h.stats()[0];
            let (rc, out) = h.run(&frame);
            assert_eq!(
                (rc, &out),
                (XDP_PASS, &frame),
                "{:?}: {}",
                h.prog,
                why::NAMES[reason]
            );
            assert_eq!(
                h.stats()[0].pass[reason] - before.pass[reason],
                1,
                "{}",
                why::NAMES[reason]
            );
        }
    }
}

/// A connection's start or end retires its flow's copies in the program itself, and a copy
/// the program cannot trust is never used: a SYN of a known flow goes to the kernel, deletes
/// both directions' copies and moves the flow's generation on, so the next segment of that
/// tuple (a new connection from a reused client port, whose mapping conntrack picks anew) goes
/// to the kernel untranslated instead of leaving with the closed connection's port; a copy
/// written late, under the old generation, is deleted unused; a FIN from the other side
/// retires both copies too; a copy past its time is not used; a SYN without a copy moves its
/// slot's generation (a copy being taken then is void). Flows without a copy are reported
/// once they passed `COPY_AFTER` (UDP) or `COPY_AFTER_TCP` (TCP, control segments not
/// counted) packets in a second, once.
#[test]
fn nat_copies_are_retired_by_the_packets_that_end_them() {
    use router_common::{
        nat::{gen_slot, COPY_AFTER, COPY_AFTER_TCP, SEEN_REPORTS},
        nat_flags as nf, NatFlow,
    };
    const EXT: [u8; 4] = [10, 2, 0, 1];
    let tcp = |src, dst| Ipv4 {
        protocol: 6,
        ..Ipv4::udp(src, dst, 64)
    };
    let udp = |src, dst| Ipv4 {
        protocol: 17,
        ..Ipv4::udp(src, dst, 64)
    };
    for mut h in both() {
        let k = nat_key(SRC, 40001, DST, 443, 6);
        let back = nat_key(DST, 443, EXT, 61001, 6);
        let slot = gen_slot(&k);
        let out = NatFlow {
            slot,
            ..nat_flow(EXT, 61001, DST, 443, nf::SRC)
        };
        let ret = NatFlow {
            slot,
            ..nat_flow(DST, 443, SRC, 40001, nf::DST)
        };
        h.nat(&[(k, out), (back, ret)]);
        let seg = |flags: u8| {
            l4_frame(
                IN_MAC,
                HOST_MAC,
                &tcp(SRC, DST),
                &l4_of(6, 40001, 443, flags),
                false,
            )
        };
        let ack = seg(0x10);
        let translated = l4_frame(
            NB_MAC,
            OUT_MAC,
            &Ipv4 {
                protocol: 6,
                ..Ipv4::udp(EXT, DST, 63)
            },
            &l4_of(6, 61001, 443, 0x10),
            false,
        );
        let expect = |h: &mut Harness, frame: &[u8], rc: u32, want: &[u8], what: &str| {
            let (got_rc, got) = h.run(frame);
            assert_eq!((got_rc, got.as_slice()), (rc, want), "{:?}: {what}", h.prog);
        };
        let passed = |h: &mut Harness, frame: &[u8], reason: usize, what: &str| {
            let before = h.stats()[0].pass[reason];
            expect(h, frame, XDP_PASS, frame, what);
            assert_eq!(
                h.stats()[0].pass[reason] - before,
                1,
                "{:?}: {what}: counted as {}",
                h.prog,
                why::NAMES[reason]
            );
        };
        expect(
            &mut h,
            &ack,
            XDP_REDIRECT,
            &translated,
            "an ACK of a copied flow",
        );
        // A new connection from the same client port: its SYN retires the copies.
        passed(
            &mut h,
            &seg(0x02),
            why::NAT_TCP_CONTROL,
            "a SYN of a copied flow",
        );
        assert_eq!(h.nat_copy(&k), None, "{:?}: the copy is retired", h.prog);
        assert_eq!(
            h.nat_copy(&back),
            None,
            "{:?}: the other direction too",
            h.prog
        );
        assert_eq!(h.nat_gen(slot), 1, "{:?}: the generation moved on", h.prog);
        passed(&mut h, &ack, why::NAT_NO_FLOW, "the new connection's ACK");
        // A copy taken before the SYN and written after it: never used, and deleted.
        h.nat(&[(k, out), (back, ret)]);
        passed(
            &mut h,
            &ack,
            why::NAT_NO_FLOW,
            "a copy of the old generation",
        );
        assert_eq!(
            h.nat_copy(&k),
            None,
            "{:?}: the stale copy is deleted",
            h.prog
        );
        // A copy of the current generation is used; the server's FIN retires both.
        let (out1, ret1) = (NatFlow { gen: 1, ..out }, NatFlow { gen: 1, ..ret });
        h.nat(&[(k, out1), (back, ret1)]);
        expect(
            &mut h,
            &ack,
            XDP_REDIRECT,
            &translated,
            "a copy of the current generation",
        );
        // (The harness's frames all arrive on one device; which one does not matter here.)
        let fin_back = l4_frame(
            IN_MAC,
            NB_MAC,
            &tcp(DST, EXT),
            &l4_of(6, 443, 61001, 0x11),
            false,
        );
        passed(&mut h, &fin_back, why::NAT_TCP_CONTROL, "the server's FIN");
        assert_eq!(
            (h.nat_copy(&k), h.nat_copy(&back)),
            (None, None),
            "{:?}: a FIN retires both directions",
            h.prog
        );
        assert_eq!(h.nat_gen(slot), 2);
        // A copy past its time (the kernel's entry may be gone): not used.
        let u = nat_key(SRC, 40000, DST, 5201, 17);
        let expired = NatFlow {
            slot: gen_slot(&u),
            until: 1,
            ..nat_flow(EXT, 61000, DST, 5201, nf::SRC)
        };
        h.nat(&[(u, expired)]);
        let dgram = l4_frame(
            IN_MAC,
            HOST_MAC,
            &udp(SRC, DST),
            &l4_of(17, 40000, 5201, 0),
            false,
        );
        passed(&mut h, &dgram, why::NAT_NO_FLOW, "an expired copy");
        // A SYN without a copy moves its slot's generation; a SYN-ACK does not.
        let k2 = nat_key(SRC, 40002, DST, 443, 6);
        let g2 = h.nat_gen(gen_slot(&k2));
        let syn2 = l4_frame(
            IN_MAC,
            HOST_MAC,
            &tcp(SRC, DST),
            &l4_of(6, 40002, 443, 0x02),
            false,
        );
        passed(&mut h, &syn2, why::NAT_NO_FLOW, "a SYN without a copy");
        assert_eq!(h.nat_gen(gen_slot(&k2)), g2.wrapping_add(1), "{:?}", h.prog);
        let synack2 = l4_frame(
            IN_MAC,
            HOST_MAC,
            &tcp(SRC, DST),
            &l4_of(6, 40002, 443, 0x12),
            false,
        );
        passed(
            &mut h,
            &synack2,
            why::NAT_NO_FLOW,
            "a SYN-ACK without a copy",
        );
        assert_eq!(h.nat_gen(gen_slot(&k2)), g2.wrapping_add(1), "{:?}", h.prog);

        // Reports: each time a flow passed COPY_AFTER more packets (TCP: COPY_AFTER_TCP
        // between control segments, which start the count again), at most SEEN_REPORTS
        // times a second. (A try that straddles a second may report more: it is made again,
        // with another flow.)
        let _ = h.nat_reports();
        let second = || router_ctl::nat::monotonic_ns() >> 30;
        for (proto, flags, want) in [(17u8, 0u8, COPY_AFTER), (6, 0x10, COPY_AFTER_TCP)] {
            let want = want as u64;
            let mut done = false;
            for attempt in 0..3u16 {
                let sport = 41000 + proto as u16 * 10 + attempt;
                let ip = Ipv4 {
                    protocol: proto,
                    ..Ipv4::udp(SRC, DST, 64)
                };
                let key = nat_key(SRC, sport, DST, 80, proto);
                let seg =
                    |fl: u8| l4_frame(IN_MAC, HOST_MAC, &ip, &l4_of(proto, sport, 80, fl), false);
                let f = seg(flags);
                let t0 = second();
                if proto == 6 {
                    // Short connections from one client port, one after the other: a SYN,
                    // fewer segments than a report needs, a FIN; never reported, however
                    // many.
                    for _ in 0..4 {
                        h.run(&seg(0x02));
                        for _ in 0..want - 1 {
                            h.run(&f);
                        }
                        h.run(&seg(0x11));
                    }
                    h.run(&seg(0x02));
                    assert_eq!(
                        h.nat_reports(),
                        vec![],
                        "{:?}: short connections from one port are not added up",
                        h.prog
                    );
                }
                let mut at = Vec::new();
                for i in 1..=(SEEN_REPORTS + 2) * want {
                    h.run(&f);
                    for r in h.nat_reports() {
                        assert_eq!(r, key, "{:?}: the report names the flow", h.prog);
                        at.push(i);
                    }
                }
                if second() != t0 {
                    continue;
                }
                let expected: Vec<u64> = (1..=SEEN_REPORTS).map(|r| r * want).collect();
                assert_eq!(at, expected, "{:?}: proto {proto}: reported after", h.prog);
                done = true;
                break;
            }
            assert!(done, "three tries straddled a second");
        }
    }
}

/// A TCP header (sequence `seq`, acknowledgement `ack`, flags `flags`) + 32-byte payload.
fn tcp_seg(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut t = l4_of(6, sport, dport, flags);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t
}

impl Harness {
    /// Lets the program learn flows from their handshakes for `ns` after the SYN-ACK (0: off).
    fn nat_learn(&mut self, ns: u64) {
        let mut a: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(self.ebpf.map_mut(map_names::NAT_LEARN).unwrap()).unwrap();
        a.set(0, ns, 0).unwrap();
    }

    /// The flow the program learned for `k`, if its NAT_LEARNED slot holds it whole and valid
    /// now (as the program finds it).
    fn nat_learned(&mut self, k: &router_common::NatKey) -> Option<router_common::NatFlow> {
        let a: aya::maps::Array<_, router_common::LearnedFlow> =
            aya::maps::Array::try_from(self.ebpf.map(map_names::NAT_LEARNED).unwrap()).unwrap();
        let e = a.get(&router_common::nat::learn_slot(k), 0).unwrap();
        let whole = e.check == router_common::nat::learned_check(&e.key, &e.flow);
        let valid = self.nat_gen(e.flow.slot) == e.flow.gen
            && e.flow.until > router_ctl::nat::monotonic_ns();
        (e.key == *k && whole && valid).then_some(e.flow)
    }

    /// Writes `e` into its NAT_LEARNED slot as it is (check word included).
    fn nat_learned_set(&mut self, e: &router_common::LearnedFlow) {
        let mut a: aya::maps::Array<_, router_common::LearnedFlow> =
            aya::maps::Array::try_from(self.ebpf.map_mut(map_names::NAT_LEARNED).unwrap()).unwrap();
        a.set(router_common::nat::learn_slot(&e.key), *e, 0)
            .unwrap();
    }
}

/// The program learns a flow from the handshake the kernel translated, and only from one it
/// can prove: SYN, SYN-ACK and the client's first ACK all go to the kernel untouched, and
/// after that ACK both directions are in NAT_FLOWS exactly as the kernel mapped them, the
/// next segment leaves translated byte for byte, and the connection's FIN retires both. Not learned: an ACK that does not acknowledge the SYN-ACK's
/// sequence number (its sender never saw it), a SYN-ACK from another port of the server (a
/// forgery: neither side as the SYN had it), a second SYN-ACK after the first (the first
/// wins), a router with learning off or under foreign rules. A floating IP's handshake (the
/// server's side translated) is learned the same way.
#[test]
fn nat_flows_are_learned_from_the_handshakes_the_kernel_translates() {
    use router_common::{nat::gen_slot, nat_flags as nf, NatFlow};
    const EXT: [u8; 4] = [10, 2, 0, 1];
    const FIP: [u8; 4] = [10, 2, 0, 20];
    const HOLD: u64 = 5_000_000_000;
    let tcp = |src, dst| Ipv4 {
        protocol: 6,
        ..Ipv4::udp(src, dst, 64)
    };
    let seg = |src, sport, dst, dport, seq, ack, flags| {
        l4_frame(
            IN_MAC,
            HOST_MAC,
            &tcp(src, dst),
            &tcp_seg(sport, dport, seq, ack, flags),
            false,
        )
    };
    // A segment to DST:443 as the fast path sends it on after SNAT to EXT:`sport`.
    let snat_out = |sport, seq, ack, flags| {
        l4_frame(
            NB_MAC,
            OUT_MAC,
            &Ipv4 {
                protocol: 6,
                ..Ipv4::udp(EXT, DST, 63)
            },
            &tcp_seg(sport, 443, seq, ack, flags),
            false,
        )
    };
    for mut h in both() {
        h.nat(&[]);
        h.neigh(1, SRC, HOST_MAC);
        let passed = |h: &mut Harness, frame: &[u8], reason: usize, what: &str| {
            let before = h.stats()[0].pass[reason];
            let (rc, out) = h.run(frame);
            assert_eq!(
                (rc, out.as_slice()),
                (XDP_PASS, frame),
                "{:?}: {what}",
                h.prog
            );
            assert_eq!(
                h.stats()[0].pass[reason] - before,
                1,
                "{:?}: {what}: counted as {}",
                h.prog,
                why::NAMES[reason]
            );
        };
        // The three segments of a handshake, each to the kernel untouched and counted by its
        // reason: the client's SYN (key `k`, sequence `x`), the answer arriving under key `r`
        // (sequence `y`), the client's first ACK.
        let shake = |h: &mut Harness,
                     k: &router_common::NatKey,
                     r: &router_common::NatKey,
                     x: u32,
                     y: u32,
                     why_back: usize| {
            let s = |k: &router_common::NatKey, seq, ack, flags| {
                let p = |b: [u8; 2]| u16::from_be_bytes(b);
                seg(k.src, p(k.sport), k.dst, p(k.dport), seq, ack, flags)
            };
            passed(h, &s(k, x, 0, 0x02), why::NAT_NO_FLOW, "SYN");
            passed(h, &s(r, y, x + 1, 0x12), why_back, "SYN-ACK");
            passed(
                h,
                &s(k, x + 1, y + 1, 0x10),
                why::NAT_NO_FLOW,
                "the client's first ACK",
            );
        };
        // vm SRC:40003 → DST:443, the kernel's SNAT makes it EXT:61003.
        let (x, y) = (0x1111_0000u32, 0x2222_0000u32);
        let k = nat_key(SRC, 40003, DST, 443, 6);
        let back = nat_key(DST, 443, EXT, 61003, 6);
        let handshake = |h: &mut Harness, learn: bool| {
            shake(h, &k, &back, x, y, why::LOCAL_DEST);
            let copies = (h.nat_learned(&k).is_some(), h.nat_learned(&back).is_some());
            assert_eq!(copies, (learn, learn), "{:?}: learned: {learn}", h.prog);
        };
        // Off (the daemon's value without a liberal conntrack): nothing learned.
        h.nat_learn(0);
        handshake(&mut h, false);
        // Under foreign rules: nothing learned either.
        h.nat_learn(HOLD);
        datapath::set_nat_conf(&mut h.ebpf, router_common::nat_conf::GUARDED).unwrap();
        handshake(&mut h, false);
        datapath::set_nat_conf(&mut h.ebpf, router_common::nat_conf::ON).unwrap();

        // On: an ACK the SYN-ACK did not prompt learns nothing; the right one does.
        passed(
            &mut h,
            &seg(SRC, 40003, DST, 443, x, 0, 0x02),
            why::NAT_NO_FLOW,
            "SYN",
        );
        let gen = h.nat_gen(gen_slot(&k));
        let t0 = router_ctl::nat::monotonic_ns();
        passed(
            &mut h,
            &seg(DST, 443, EXT, 61003, y, x + 1, 0x12),
            why::LOCAL_DEST,
            "SYN-ACK",
        );
        // A second SYN-ACK to another port of the gateway: the first one stands.
        passed(
            &mut h,
            &seg(DST, 443, EXT, 61999, y, x + 1, 0x12),
            why::LOCAL_DEST,
            "a second SYN-ACK",
        );
        passed(
            &mut h,
            &seg(SRC, 40003, DST, 443, x + 1, y + 2, 0x10),
            why::NAT_NO_FLOW,
            "an ACK of another sequence number",
        );
        assert_eq!(
            h.nat_learned(&k),
            None,
            "{:?}: unproven, not learned",
            h.prog
        );
        passed(
            &mut h,
            &seg(SRC, 40003, DST, 443, x + 1, y + 1, 0x10),
            why::NAT_NO_FLOW,
            "the client's first ACK (still the kernel's: conntrack sees it)",
        );
        let t1 = router_ctl::nat::monotonic_ns();
        let slot = gen_slot(&k);
        let out = h
            .nat_learned(&k)
            .expect("the original direction is learned");
        let ret = h
            .nat_learned(&back)
            .expect("the reply direction is learned");
        assert!(
            out.until >= t0 + HOLD && out.until <= t1 + HOLD && ret.until == out.until,
            "{:?}: used until the SYN-ACK's time + NAT_LEARN: {} not in {}..{}",
            h.prog,
            out.until,
            t0 + HOLD,
            t1 + HOLD
        );
        assert_eq!(
            (out, ret),
            (
                NatFlow {
                    slot,
                    gen,
                    until: out.until,
                    ..nat_flow(EXT, 61003, DST, 443, nf::SRC)
                },
                NatFlow {
                    slot,
                    gen,
                    until: out.until,
                    ..nat_flow(DST, 443, SRC, 40003, nf::DST)
                }
            ),
            "{:?}: both directions as the kernel mapped them",
            h.prog
        );
        // Foreign rules appear: the learned flow is not used (the guard's own copies only).
        datapath::set_nat_conf(&mut h.ebpf, router_common::nat_conf::GUARDED).unwrap();
        passed(
            &mut h,
            &seg(SRC, 40003, DST, 443, x + 1, y + 1, 0x18),
            why::NAT_NO_FLOW,
            "a learned flow's segment under foreign rules",
        );
        datapath::set_nat_conf(&mut h.ebpf, router_common::nat_conf::ON).unwrap();
        // The request leaves through the fast path, translated.
        let (rc, got) = h.run(&seg(SRC, 40003, DST, 443, x + 1, y + 1, 0x18));
        let want = snat_out(61003, x + 1, y + 1, 0x18);
        assert_eq!((rc, got), (XDP_REDIRECT, want), "{:?}: the request", h.prog);
        // The server's FIN retires both directions and their hints.
        passed(
            &mut h,
            &seg(DST, 443, EXT, 61003, y + 1, x + 33, 0x11),
            why::NAT_TCP_CONTROL,
            "the server's FIN",
        );
        assert_eq!(
            (h.nat_learned(&k), h.nat_learned(&back)),
            (None, None),
            "{:?}: both directions retired",
            h.prog
        );
        passed(
            &mut h,
            &seg(SRC, 40003, DST, 443, x + 33, y + 2, 0x10),
            why::NAT_NO_FLOW,
            "the client's next segment",
        );

        // A SYN-ACK from another port of the server: neither side as the SYN had it.
        let (x2, y2) = (0x3333_0000u32, 0x4444_0000u32);
        let k2 = nat_key(SRC, 40004, DST, 443, 6);
        shake(
            &mut h,
            &k2,
            &nat_key(DST, 444, EXT, 61004, 6),
            x2,
            y2,
            why::LOCAL_DEST,
        );
        assert_eq!(h.nat_learned(&k2), None, "{:?}: a forged answer", h.prog);

        // A slot holding a mix of two flows (another processor's write under way): its check
        // word fails and the packet goes to the kernel untranslated.
        let k4 = nat_key(SRC, 40005, DST, 443, 6);
        let f4 = NatFlow {
            slot: gen_slot(&k4),
            gen: h.nat_gen(gen_slot(&k4)),
            until: u64::MAX,
            ..nat_flow(EXT, 61005, DST, 443, nf::SRC)
        };
        let whole = router_common::LearnedFlow {
            key: k4,
            flow: f4,
            check: router_common::nat::learned_check(&k4, &f4),
            _pad: 0,
        };
        let torn = router_common::LearnedFlow {
            flow: NatFlow {
                sport: 61006u16.to_be_bytes(),
                ..f4
            },
            ..whole
        };
        let data4 = seg(SRC, 40005, DST, 443, 1, 1, 0x10);
        h.nat_learned_set(&torn);
        passed(&mut h, &data4, why::NAT_NO_FLOW, "a torn learned flow");
        h.nat_learned_set(&whole);
        let (rc, got) = h.run(&data4);
        let want4 = snat_out(61005, 1, 1, 0x10);
        assert_eq!(
            (rc, got),
            (XDP_REDIRECT, want4),
            "{:?}: a whole one",
            h.prog
        );

        // A floating IP: DST:5000 → FIP:80 becomes DST:5000 → SRC:80.
        let (x3, y3) = (0x5555_0000u32, 0x6666_0000u32);
        let k3 = nat_key(DST, 5000, FIP, 80, 6);
        let back3 = nat_key(SRC, 80, DST, 5000, 6);
        shake(&mut h, &k3, &back3, x3, y3, why::NAT_NO_FLOW);
        // The generation the SYN left (the other two do not move it).
        let gen3 = h.nat_gen(gen_slot(&k3));
        let out3 = h.nat_learned(&k3).expect("learned");
        let slot3 = gen_slot(&k3);
        assert_eq!(
            (Some(out3), h.nat_learned(&back3)),
            (
                Some(NatFlow {
                    slot: slot3,
                    gen: gen3,
                    until: out3.until,
                    ..nat_flow(DST, 5000, SRC, 80, nf::DST)
                }),
                Some(NatFlow {
                    slot: slot3,
                    gen: gen3,
                    until: out3.until,
                    ..nat_flow(FIP, 80, DST, 5000, nf::SRC)
                })
            ),
            "{:?}: a floating IP's flow",
            h.prog
        );
    }
}

/// An ICMP error frame from `src` to `dst` (TTL 64) quoting `quoted` (an IPv4 packet, whole),
/// every checksum from scratch.
fn icmp_error_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ty: u8,
    code: u8,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(quoted);
    let c = tests::frame::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = Ipv4 {
        protocol: 1,
        ..Ipv4::udp(src, dst, ttl)
    };
    let mut l3 = ip.header(icmp.len());
    l3.extend_from_slice(&icmp);
    ethernet(dst_mac, src_mac, 0x0800, &l3)
}

/// The IPv4 packet (no Ethernet header) of `l4_frame`.
fn packet(ip: &Ipv4, l4: &[u8], udp_zero: bool) -> Vec<u8> {
    l4_frame([0; 6], [0; 6], ip, l4, udp_zero)[14..].to_vec()
}

/// ICMP errors about NAT flows, translated in the fast path as the kernel's conntrack would:
/// a port unreachable from the instance behind a floating IP (outer source and the quoted
/// destination become the floating IP), a time exceeded from a router on the way about an echo
/// (only the quoted packet changes), and a fragmentation needed about a whole TCP header (its
/// checksum updated too); every checksum equal to a from-scratch one.
#[test]
fn icmp_errors_about_nat_flows_are_translated_byte_exact() {
    use router_common::nat_flags as nf;
    const FIP: [u8; 4] = [10, 2, 0, 20];
    const ROUTER: [u8; 4] = [10, 1, 0, 9];
    for mut h in both() {
        // Flows that came in through the floating IP (DNAT to SRC); these are their reply
        // directions, SRC → DST, whose source the fast path turns back into the floating IP.
        h.nat(&[
            (
                nat_key(SRC, 7777, DST, 5201, 17),
                nat_flow(FIP, 7777, DST, 5201, nf::SRC),
            ),
            (
                nat_key(SRC, 0x99, DST, 0, 1),
                nat_flow(FIP, 0x99, DST, 0, nf::SRC),
            ),
            (
                nat_key(SRC, 8080, DST, 443, 6),
                nat_flow(FIP, 8080, DST, 443, nf::SRC),
            ),
        ]);
        let udp_in = |d| {
            packet(
                &Ipv4 {
                    protocol: 17,
                    ..Ipv4::udp(DST, d, 63)
                },
                &l4_of(17, 5201, 7777, 0),
                false,
            )
        };
        let echo = |d: [u8; 4]| {
            let mut l4 = l4_of(1, 0x99, 0, 0);
            l4[0] = 8;
            packet(
                &Ipv4 {
                    protocol: 1,
                    ..Ipv4::udp(DST, d, 1)
                },
                &l4,
                false,
            )
        };
        let tcp_in = |d| {
            packet(
                &Ipv4 {
                    protocol: 6,
                    ..Ipv4::udp(DST, d, 63)
                },
                &l4_of(6, 443, 8080, 0x10)[..20],
                false,
            )
        };
        let cases: [(&str, [u8; 4], u8, u8, Vec<u8>, Vec<u8>, [u8; 4], u64); 3] = [
            (
                "port unreachable from the instance",
                SRC,
                3,
                3,
                udp_in(SRC),
                udp_in(FIP),
                FIP,
                1,
            ),
            (
                "time exceeded from a router on the way",
                ROUTER,
                11,
                0,
                echo(SRC),
                echo(FIP),
                ROUTER,
                0,
            ),
            (
                "fragmentation needed about a whole TCP header",
                ROUTER,
                3,
                4,
                tcp_in(SRC),
                tcp_in(FIP),
                ROUTER,
                0,
            ),
        ];
        for (what, from, ty, code, quoted, quoted_out, from_out, src_translated) in cases {
            let input = icmp_error_frame(IN_MAC, HOST_MAC, from, DST, 64, ty, code, &quoted);
            let before = h.stats()[0];
            let (rc, out) = h.run(&input);
            assert_eq!(rc, XDP_REDIRECT, "{:?}: {what}", h.prog);
            let want = icmp_error_frame(NB_MAC, OUT_MAC, from_out, DST, 63, ty, code, &quoted_out);
            assert_eq!(out, want, "{:?}: {what} translated", h.prog);
            assert_eq!(
                h.stats()[0].nat_src_packets - before.nat_src_packets,
                src_translated,
                "{what}"
            );
        }
    }
}

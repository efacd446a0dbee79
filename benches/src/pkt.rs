//! Per-packet cost of the real program, as the kernel reports it (BPF_PROG_TEST_RUN `repeat`),
//! against the size of the routing table.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{HashMap, Map},
    programs::{TestRun, TestRunOptions},
    Ebpf,
};
use router_common::{map_names, Iface, Neigh, Neigh6Key, NeighKey};
use router_ctl::{config::IpNet, datapath};
use tests::frame::{ipv4_udp, ipv6_udp, Ipv4, Ipv6};

use crate::{
    stats::{summarize, Rng, Summary},
    table::{addr_in, addr_in6, random_table, random_table6},
};

pub const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
pub const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
const NEXTHOPS: u8 = 8;
/// Distinct destinations per run, each hitting a randomly chosen prefix of the table.
pub const DESTINATIONS: usize = 16384;
/// Each destination runs once: repeating one frame would keep its lookup path in the cache.
/// (With more repeats the frame stays forwardable: the neighbours' MAC is the ingress MAC.)
pub const REPEAT: u32 = 1;
/// The warm figure: each of `WARM_DESTINATIONS` destinations repeated this many times in a row.
/// (The kernel waits for an RCU grace period around every test run with repeat > 1, so few.)
pub const WARM_REPEAT: u32 = 64;
pub const WARM_DESTINATIONS: usize = 32;

#[derive(Debug, Clone)]
pub struct PktResult {
    pub routes: usize,
    /// IPv6 (the range table) rather than IPv4 (the 16-8-8 trie).
    pub ipv6: bool,
    /// The same measurement on a program that returns at once: the test-run timer's own cost,
    /// subtracted from the figures below.
    pub floor_ns: Summary,
    pub forward_ns: Summary,
    pub pass_ns: Summary,
    /// Forwarding with each destination repeated `WARM_REPEAT` times (its path cached).
    pub forward_warm_ns: Summary,
    pub install_s: f64,
    /// Peak resident memory of the process after building and installing the table.
    pub peak_rss_mib: f64,
    pub routes_memlock: u64,
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(i != 0, "no device {name}");
    Ok(i)
}

/// The kernel memory of a map, from its fdinfo (`memlock:`).
pub fn memlock(ebpf: &Ebpf, name: &str) -> Option<u64> {
    let fd = match ebpf.map(name)? {
        Map::LpmTrie(d)
        | Map::HashMap(d)
        | Map::PerCpuArray(d)
        | Map::Array(d)
        | Map::DevMapHash(d) => d.fd().as_fd().as_raw_fd(),
        _ => return None,
    };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs in a fresh network namespace on a thread of its own (the devmap needs real devices).
pub fn measure(routes: usize, runs: usize, ipv6: bool) -> Result<PktResult> {
    std::thread::spawn(move || measure_here(routes, runs, ipv6))
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

pub fn nexthop(i: usize, ipv6: bool) -> IpAddr {
    let i = (i % NEXTHOPS as usize) as u16;
    if ipv6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x100 + i))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 2, 0, 100 + i as u8))
    }
}

/// The router's program with a random table of `routes` prefixes (IPv4 or IPv6) through
/// `e0`, in the calling thread's (fresh) namespace: `e0` and its peer `e1`, up.
pub struct Bed {
    pub ebpf: Ebpf,
    pub table: Vec<IpNet>,
    pub e0: u32,
    pub install_s: f64,
    pub peak_rss_mib: f64,
    pub routes_memlock: u64,
}

/// A random table of `routes` prefixes (IPv4 or IPv6, from `seed`) through `e0`, as the
/// controller's writer would install it, in the calling thread's fresh namespace (`e0` and its
/// peer `e1`, up); ingress is ifindex 1 with `IN_MAC`.
pub struct Tables {
    pub e0: u32,
    pub table: Vec<IpNet>,
    pub ifaces: [(u32, Iface); 2],
    pub entries: Vec<(IpNet, router_common::Route)>,
}

impl Tables {
    pub fn here(routes: usize, seed: u64, ipv6: bool) -> Result<Tables> {
        tests::unshare_netns();
        tests::sh("ip link add e0 type veth peer name e1 && ip link set lo up && ip link set e0 up && ip link set e1 up");
        let e0 = ifindex("e0")?;
        let table: Vec<IpNet> = if ipv6 {
            random_table6(routes, seed)
                .into_iter()
                .map(IpNet::from)
                .collect()
        } else {
            random_table(routes, seed)
                .into_iter()
                .map(IpNet::from)
                .collect()
        };
        let gateways: Vec<(IpNet, u32, IpAddr)> = table
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, e0, nexthop(i, ipv6)))
            .collect();
        let iface = |mac, slot| Iface {
            mac,
            flags: 0,
            mtu: 1500,
            slot,
        };
        let ifaces = [(1, iface(IN_MAC, 0)), (e0, iface(OUT_MAC, 1))];
        let entries = router_ctl::fib::writer::route_entries(
            &ifaces,
            &[(connected(ipv6).parse().expect("a prefix"), e0)],
            &gateways,
            &[],
        );
        Ok(Tables {
            e0,
            table,
            ifaces,
            entries,
        })
    }
}

impl Bed {
    pub fn build(routes: usize, ipv6: bool) -> Result<Bed> {
        let Tables {
            e0,
            table,
            ifaces,
            entries,
        } = Tables::here(routes, 0x5eed ^ routes as u64, ipv6)?;
        let mut ebpf =
            datapath::load_unpinned_sized(router_ctl::fib::Capacity::for_table(&entries))?;
        datapath::set_ifaces(&mut ebpf, &ifaces, &[], &[])?;
        let t = Instant::now();
        router_ctl::fib::writer::set_routes(&mut ebpf, &entries)?;
        let install_s = t.elapsed().as_secs_f64();
        let peak_rss_mib = crate::ctl::peak_rss_mib();
        let routes_memlock = [
            map_names::FIB6,
            map_names::FIB6_L1,
            map_names::FIB6_NODES,
            map_names::FIB6_BLOCKS,
            map_names::FIB6_PFX,
            map_names::FIB_L1,
            map_names::FIB_L2,
            map_names::FIB_L3,
            map_names::NEXTHOPS,
        ]
        .iter()
        .map(|m| memlock(&ebpf, m).unwrap_or(0))
        .sum();
        Ok(Bed {
            ebpf,
            table,
            e0,
            install_s,
            peak_rss_mib,
            routes_memlock,
        })
    }
}

/// The subnet of `e0` the nexthops are in.
pub fn connected(ipv6: bool) -> &'static str {
    if ipv6 {
        "2001:db8:2::/64"
    } else {
        "10.2.0.0/24"
    }
}

fn measure_here(routes: usize, runs: usize, ipv6: bool) -> Result<PktResult> {
    let Bed {
        mut ebpf,
        table,
        e0,
        install_s,
        peak_rss_mib,
        routes_memlock,
    } = Bed::build(routes, ipv6)?;
    set_neighbours(&mut ebpf, e0, true, ipv6)?;

    let mut rng = Rng::new(42);
    let frames = frames_into(&table, DESTINATIONS, &mut rng);
    let floor_prog = bench_programs(&["bench_wire"])?;
    let wire = bench_program(&floor_prog, "bench_wire")?;
    let (mut fwd, mut pass, mut floor, mut warm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let f = run_frames(wire, &frames, 2, REPEAT)?;
        floor.push(f);
        fwd.push(run_frames(datapath::program(&mut ebpf)?, &frames, 4, REPEAT)? - f);
        let fw = run_frames(wire, &frames[..WARM_DESTINATIONS], 2, WARM_REPEAT)?;
        warm.push(
            run_frames(
                datapath::program(&mut ebpf)?,
                &frames[..WARM_DESTINATIONS],
                4,
                WARM_REPEAT,
            )? - fw,
        );
    }
    set_neighbours(&mut ebpf, e0, false, ipv6)?;
    for _ in 0..runs {
        let f = run_frames(wire, &frames, 2, REPEAT)?;
        pass.push(run_frames(datapath::program(&mut ebpf)?, &frames, 2, REPEAT)? - f);
    }
    Ok(PktResult {
        routes,
        ipv6,
        floor_ns: summarize(&floor),
        forward_ns: summarize(&fwd),
        pass_ns: summarize(&pass),
        forward_warm_ns: summarize(&warm),
        install_s,
        peak_rss_mib,
        routes_memlock,
    })
}

/// The benchmark helpers' object (router-ebpf/src/bench.rs) with the programs `names` loaded.
pub fn bench_programs(names: &[&str]) -> Result<Ebpf> {
    let mut ebpf = aya::EbpfLoader::new().load(datapath::BENCH_PROGRAM)?;
    for name in names {
        let p: &mut aya::programs::Xdp = ebpf
            .program_mut(name)
            .with_context(|| name.to_string())?
            .try_into()?;
        p.load()?;
    }
    Ok(ebpf)
}

/// One of the loaded helpers (see `bench_programs`).
pub fn bench_program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a aya::programs::Xdp> {
    Ok(ebpf
        .program(name)
        .with_context(|| name.to_string())?
        .try_into()?)
}

/// `n` UDP frames from the ingress side, each to a random address in a random prefix of `table`.
pub fn frames_into(table: &[IpNet], n: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let src_mac = [0x02, 0, 0, 0, 1, 5];
            match table[rng.below(table.len() as u64) as usize] {
                IpNet::V4(net) => ipv4_udp(
                    IN_MAC,
                    src_mac,
                    &Ipv4::udp([10, 1, 0, 5], addr_in(&net, rng).octets(), 255),
                ),
                IpNet::V6(net) => ipv6_udp(
                    IN_MAC,
                    src_mac,
                    &Ipv6::udp(
                        Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5).octets(),
                        addr_in6(&net, rng).octets(),
                        255,
                    ),
                ),
            }
        })
        .collect()
}

pub fn set_neighbours(ebpf: &mut Ebpf, e0: u32, present: bool, ipv6: bool) -> Result<()> {
    let n = Neigh {
        mac: IN_MAC,
        _pad: [0; 2],
    };
    if ipv6 {
        let mut m: HashMap<_, Neigh6Key, Neigh> =
            HashMap::try_from(ebpf.map_mut(map_names::NEIGHS6).context("NEIGHS6")?)?;
        for i in 0..NEXTHOPS as usize {
            let IpAddr::V6(a) = nexthop(i, true) else {
                unreachable!()
            };
            let k = Neigh6Key {
                ifindex: e0,
                addr: a.octets(),
            };
            if present {
                m.insert(k, n, 0)?;
            } else {
                m.remove(&k)?;
            }
        }
        return Ok(());
    }
    let mut m: HashMap<_, NeighKey, Neigh> =
        HashMap::try_from(ebpf.map_mut(map_names::NEIGHS).context("NEIGHS")?)?;
    for i in 0..NEXTHOPS {
        let k = NeighKey {
            ifindex: e0,
            addr: [10, 2, 0, 100 + i],
        };
        if present {
            m.insert(k, n, 0)?;
        } else {
            m.remove(&k)?;
        }
    }
    Ok(())
}

/// Mean ns per packet over all frames, each run `repeat` times; checks every return code.
pub fn run_frames(
    prog: &aya::programs::Xdp,
    frames: &[Vec<u8>],
    want: u32,
    repeat: u32,
) -> Result<f64> {
    let mut total = 0f64;
    for f in frames {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(f),
            repeat,
            ..Default::default()
        })?;
        ensure!(
            r.return_value == want,
            "expected action {want}, got {} (the benchmark would measure the wrong path)",
            r.return_value
        );
        total += r.duration.as_nanos() as f64;
    }
    Ok(total / frames.len() as f64)
}

/// What verifying TCP/UDP checksums costs the program (`iface_flags::VERIFY_L4`, set on a
/// device whose skbs forced XDP sees as frames: their checksums may be partial), on its own.
#[derive(Debug, Clone)]
pub struct VerifyCost {
    /// UDP payload bytes of the IPv6 frames.
    pub payload: usize,
    pub without_ns: Summary,
    pub with_ns: Summary,
}

pub fn verify_cost(runs: usize) -> Result<Vec<VerifyCost>> {
    std::thread::spawn(move || verify_here(runs))
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

/// The same IPv6 UDP frames (valid checksums) forwarded with the ingress device's flags
/// without and with `VERIFY_L4`, in turn within each run, above the test-run floor.
fn verify_here(runs: usize) -> Result<Vec<VerifyCost>> {
    let Bed {
        mut ebpf,
        table,
        e0,
        ..
    } = Bed::build(1, true)?;
    set_neighbours(&mut ebpf, e0, true, true)?;
    let floor_prog = bench_programs(&["bench_wire"])?;
    let wire = bench_program(&floor_prog, "bench_wire")?;
    let ifaces = |flags| {
        [
            (
                1,
                Iface {
                    mac: IN_MAC,
                    flags,
                    mtu: 1500,
                    slot: 0,
                },
            ),
            (
                e0,
                Iface {
                    mac: OUT_MAC,
                    flags: 0,
                    mtu: 1500,
                    slot: 1,
                },
            ),
        ]
    };
    let mut rng = Rng::new(9);
    let src = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5).octets();
    let mut res = Vec::new();
    for payload in [18usize, 1400] {
        let frames: Vec<Vec<u8>> = (0..DESTINATIONS / 4)
            .map(|_| {
                let IpNet::V6(net) = table[rng.below(table.len() as u64) as usize] else {
                    unreachable!("an IPv6 table")
                };
                let dst = addr_in6(&net, &mut rng).octets();
                let l4 = tests::frame::udp6(&src, &dst, 40000, 5201, &vec![0x5a; payload]);
                let mut l3 = Ipv6::udp(src, dst, 64).header(l4.len());
                l3.extend_from_slice(&l4);
                tests::frame::ethernet(IN_MAC, [0x02, 0, 0, 0, 1, 5], 0x86dd, &l3)
            })
            .collect();
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            for (flags, into) in [
                (0, &mut without),
                (router_common::iface_flags::VERIFY_L4, &mut with),
            ] {
                datapath::set_ifaces(&mut ebpf, &ifaces(flags), &[], &[])?;
                let f = run_frames(wire, &frames, 2, REPEAT)?;
                into.push(run_frames(datapath::program(&mut ebpf)?, &frames, 4, REPEAT)? - f);
            }
        }
        res.push(VerifyCost {
            payload,
            without_ns: summarize(&without),
            with_ns: summarize(&with),
        });
    }
    Ok(res)
}

/// The report's section.
pub fn verify_section(res: &[VerifyCost], runs: usize, date: &str) -> String {
    let mut md = format!(
        "<!-- verify -->\n## What verifying TCP/UDP checksums costs forced XDP\n\n{date}. On a device fed by skbs (a veth, a tap) with `hook = \"xdp\"`, the program verifies each TCP or UDP checksum before it forwards (`iface_flags::VERIFY_L4`: such a frame's checksum may be left to offload, which the frame no longer says). Here on its own: the same IPv6 UDP frames (valid checksums, one route) through the program with the ingress device's flag off and on, in turn within each of {runs} runs; ns per packet as BPF_PROG_TEST_RUN reports them above an immediate return. Medians (min–max).\n\n| UDP payload (bytes) | without verification (ns) | with (ns) | the verification (ns) |\n|---:|---|---|---|\n"
    );
    for r in res {
        md += &format!(
            "| {} | {} | {} | {:.1} |\n",
            r.payload,
            r.without_ns.fmt(1),
            r.with_ns.fmt(1),
            r.with_ns.median - r.without_ns.median
        );
    }
    md += "<!-- /verify -->\n";
    md
}

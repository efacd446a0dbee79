//! End-to-end forwarding on the seed topology, on one core: a live-frames generator in vm1 sends
//! 64-byte UDP frames to the router; an nftables ingress counter at vm3 counts what arrives.
//! Three data paths, interleaved in one run: the kernel (Neutron's way), this router, and a
//! "wire" program that redirects qr-a → qr-b with no lookup (the floor for an XDP router here).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, DevMapHash},
    programs::{links::FdLink, TestRun, TestRunAttrs, TestRunOptions, Xdp},
    EbpfLoader,
};
use router_ctl::{
    datapath,
    kernel::{link_in, netns},
    state,
};
use tests::{
    frame::{ethernet, udp, udp6, Ipv4, Ipv6},
    sh,
    topo::{in_ns, Seed},
};

use crate::stats::{summarize, Summary};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Kernel,
    Router,
    Wire,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Kernel => "kernel forwarding",
            Mode::Router => "this router (XDP)",
            Mode::Wire => "wire (XDP redirect, no lookup)",
        }
    }
}

pub struct E2eResult {
    pub ipv6: bool,
    pub flows: usize,
    /// Cores receiving: one generator per core, each into its own queue of the router's veth.
    pub cores: usize,
    /// With two cores: this router's Mpps ÷ its Mpps with one of the two generators, per round.
    pub router_over_one_core: Option<Summary>,
    /// Mpps per mode, and per-round ratios router/kernel and router/wire.
    pub mpps: Vec<(Mode, Summary)>,
    pub router_over_kernel: Summary,
    pub router_over_wire: Summary,
}

const FLOW_ROUTES: usize = 1000;
const PACKETS: u32 = 2_000_000;

fn flow_dst(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100 + (i / 256) as u8, (i % 256) as u8, 1)
}

/// The IPv6 flows: one /64 each, 2001:db8:1000::/64 onwards.
fn flow_dst6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x1000 + i as u16, 0, 0, 0, 0, 1)
}

fn link_mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let l = link_in(Some(ns), dev)?.with_context(|| format!("{dev} in {ns}"))?;
    l.mac()
}

/// Sets the XDP program of `dev` (router namespace) to `mode`.
fn set_mode(s: &Seed, mode: Mode) -> Result<()> {
    let id = s.ids.router_id.clone();
    let ns = s.ns();
    let (dev_a, dev_b) = (s.ids.dev_a(), s.ids.dev_b());
    let ifindex = |d: &str| -> Result<u32> { Ok(link_in(Some(&ns), d)?.context("device")?.index) };
    let (ia, ib) = (ifindex(&dev_a)?, ifindex(&dev_b)?);
    // Kernel mode: no programs; GRO on qr-a so that its veth takes the generator's frames.
    for dev in [&dev_a, &dev_b] {
        let _ = std::fs::remove_file(state::link_pin(&id, dev));
        let _ = std::fs::remove_file(state::tc_link_pin(&id, dev));
    }
    if mode == Mode::Kernel {
        sh(&format!(
            "ip netns exec {ns} ethtool -K {dev_a} gro on >/dev/null"
        ));
        return Ok(());
    }
    let cap = router_ctl::fib::Capacity::default();
    netns::run_in(&ns, move || {
        let mut ebpf = datapath::load_pinned(&id, cap, datapath::Programs::BOTH)?;
        datapath::attach_xdp(&mut ebpf, ib, &dev_b, &state::link_pin(&id, &dev_b))?;
        if mode == Mode::Router {
            datapath::attach_xdp(&mut ebpf, ia, &dev_a, &state::link_pin(&id, &dev_a))?;
            return Ok(());
        }
        let mut bench = EbpfLoader::new().load(datapath::BENCH_PROGRAM)?;
        DevMapHash::try_from(bench.map_mut("WIRE_PORT").context("WIRE_PORT")?)?
            .insert(0, ib, None, 0)?;
        let wire: &mut Xdp = bench
            .program_mut("bench_wire")
            .context("bench_wire")?
            .try_into()?;
        wire.load()?;
        let id_link = wire.attach_to_if_index(ia, aya::programs::XdpMode::Driver)?;
        let link: FdLink = wire.take_link(id_link)?.try_into()?;
        link.pin(state::link_pin(&id, &dev_a))?;
        Ok(())
    })
}

/// Packets counted by the sink at vm3.
fn sink_count(vm3: &str) -> Result<u64> {
    crate::skb::nft_count(vm3, "sink")
}

/// Loads the generator with one header template per flow.
fn load_generator(s: &Seed, flows: usize, ipv6: bool) -> Result<aya::Ebpf> {
    let qr_a = link_mac(&s.ns(), &s.ids.dev_a())?;
    let vm1_mac = link_mac(&s.vm1, &s.ids.tap_a())?;
    let mut gen = EbpfLoader::new().load(datapath::BENCH_PROGRAM)?;
    {
        let mut tpl: Array<_, [u8; 64]> =
            Array::try_from(gen.map_mut("GEN_FLOWS").context("GEN_FLOWS")?)?;
        for i in 0..flows {
            let sport = 40000 + (i % 1000) as u16;
            let f = if ipv6 {
                let dst = if flows == 1 {
                    Ipv6Addr::new(0x2001, 0xdb8, 0x101, 0, 0, 0, 0, 3)
                } else {
                    flow_dst6(i)
                };
                let src = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 3).octets();
                let l4 = udp6(&src, &dst.octets(), sport, 9, &[0u8; 2]);
                let mut l3 = Ipv6::udp(src, dst.octets(), 64).header(l4.len());
                l3.extend_from_slice(&l4);
                ethernet(qr_a, vm1_mac, 0x86dd, &l3)
            } else {
                let dst = if flows == 1 {
                    Ipv4Addr::new(172, 16, 101, 3)
                } else {
                    flow_dst(i)
                };
                let l4 = udp(sport, 9, &[0u8; 22]);
                let mut l3 = Ipv4::udp([172, 16, 100, 3], dst.octets(), 64).header(l4.len());
                l3.extend_from_slice(&l4);
                ethernet(qr_a, vm1_mac, 0x0800, &l3)
            };
            let b: [u8; 64] = f[..].try_into().context("a 64-byte template")?;
            tpl.set(i as u32, b, 0)?;
        }
    }
    Array::<_, u32>::try_from(gen.map_mut("GEN_CONF").context("GEN_CONF")?)?.set(
        0,
        flows as u32,
        0,
    )?;
    let p: &mut Xdp = gen
        .program_mut("bench_gen")
        .context("bench_gen")?
        .try_into()?;
    p.load()?;
    Ok(gen)
}

/// Route table rewrites while 1 000 flows are forwarded, and the effect of table size.
pub struct UpdatesUnderTraffic {
    pub updates_per_s: f64,
    pub mpps_during: f64,
    pub mpps_without: f64,
    /// This router with 1 000 flows: with the seed's table, with `BIG_TABLE` routes more,
    /// and per round big ÷ small.
    pub small_table: Summary,
    pub big_table: Summary,
    pub big_over_small: Summary,
    pub small_routes: usize,
    pub big_routes: usize,
}

pub const BIG_TABLE: usize = 1_000_000;

/// The definition's extra routes: each flow's /24 (IPv4) and /64 (IPv6) via vm3.
fn flow_routes() -> String {
    let mut routes: String = (0..FLOW_ROUTES)
        .map(|i| {
            format!(
                "[[router.route]]\ndestination = \"{}/24\"\nnexthop = \"172.16.101.3\"\n",
                Ipv4Addr::from(u32::from(flow_dst(i)) & !0xff)
            )
        })
        .collect();
    routes.extend((0..FLOW_ROUTES).map(|i| {
        format!(
            "[[router.route]]\ndestination = \"{}/64\"\nnexthop = \"2001:db8:101::3\"\n",
            Ipv6Addr::from(u128::from(flow_dst6(i)) & !0xffff_ffff_ffff_ffff)
        )
    }));
    routes
}

pub fn run(rounds: usize) -> Result<(Vec<E2eResult>, UpdatesUnderTraffic)> {
    let (s, gen_if) = bed(&flow_routes())?;
    let mut results = Vec::new();
    for (ipv6, flows) in [
        (false, 1usize),
        (false, FLOW_ROUTES),
        (true, 1),
        (true, FLOW_ROUTES),
    ] {
        results.push(compare(&s, gen_if, ipv6, flows, &[0], rounds)?);
    }
    let mpps_without = measure(&s, gen_if, FLOW_ROUTES)?;
    let (updates_per_s, mpps_during) = std::thread::scope(|sc| -> Result<(f64, f64)> {
        let traffic = sc.spawn(|| measure(&s, gen_if, FLOW_ROUTES));
        std::thread::sleep(std::time::Duration::from_millis(100));
        let ups = crate::ctl::route_updates_per_second(&s, 1.0)?;
        let mpps = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
        Ok((ups, mpps))
    })?;
    // The same 1 000 flows with a full-size table behind them: every random prefix also leads
    // to vm3, so whichever one a destination matches, the frame is delivered and counted.
    let (small, big) = tables(&s)?;
    let (mut sm, mut bg, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        install(&s, &small)?;
        let a = measure(&s, gen_if, FLOW_ROUTES)?;
        install(&s, &big)?;
        let b = measure(&s, gen_if, FLOW_ROUTES)?;
        eprintln!(
            "e2e: table size, round {}: {a:.3} Mpps with {} routes, {b:.3} Mpps with {} routes",
            round + 1,
            small.len(),
            big.len()
        );
        sm.push(a);
        bg.push(b);
        ratio.push(b / a);
    }
    install(&s, &small)?;
    Ok((
        results,
        UpdatesUnderTraffic {
            updates_per_s,
            mpps_during,
            mpps_without,
            small_table: summarize(&sm),
            big_table: summarize(&bg),
            big_over_small: summarize(&ratio),
            small_routes: small.len(),
            big_routes: big.len(),
        },
    ))
}

/// The seed (dual stack) with the flow routes `routes`, its neighbours known, vm3's sink; and
/// the generator's interface in vm1.
fn bed(routes: &str) -> Result<(Seed, u32)> {
    let mut s = Seed::up_dual_with(&format!("max_routes = {}", BIG_TABLE + 4096), routes);
    // The wire floor replaces the router's program on qr-a: its counters stop following.
    s.check_counters = false;
    s.prime_neighbours();
    s.prime_neighbours6();
    let tap_b = s.ids.tap_b();
    // XDP redirects into qr-b need its peer (vm3's veth) to take XDP frames: GRO on there, the
    // one tuning this section makes (the fixture leaves every veth at kernel defaults).
    sh(&format!(
        "ip netns exec {} ethtool -K {tap_b} gro on >/dev/null",
        s.vm3
    ));
    sh(&format!(
        "ip netns exec {vm3} nft add table netdev sink && \
         ip netns exec {vm3} nft add chain netdev sink in '{{ type filter hook ingress device \"{tap_b}\" priority 0; }}' && \
         ip netns exec {vm3} nft add rule netdev sink in udp dport 9 counter drop",
        vm3 = s.vm3
    ));
    let gen_if = link_in(Some(&s.vm1), &s.ids.tap_a())?
        .context("vm1 tap")?
        .index;
    Ok((s, gen_if))
}

/// Both cores receiving: the seed with two queues on each instance veth pair (as a NIC's RSS
/// spreads flows over queues), one generator pinned to each core sending into its own queue
/// of qr-a, 1 000 flows; the three data paths in turn within each round, and this router with
/// one of the generators only, for its scaling.
pub fn two_cores(rounds: usize) -> Result<Vec<E2eResult>> {
    tests::topo::VETH_QUEUES.store(2, std::sync::atomic::Ordering::Relaxed);
    let built = bed(&flow_routes());
    tests::topo::VETH_QUEUES.store(1, std::sync::atomic::Ordering::Relaxed);
    let (s, gen_if) = built?;
    [false, true]
        .into_iter()
        .map(|ipv6| compare(&s, gen_if, ipv6, FLOW_ROUTES, &[0, 1], rounds))
        .collect()
}

/// The three data paths in turn within each of `rounds` rounds, `flows` flows generated on
/// `cpus`; with more than one, this router with the first generator only too, for its scaling.
/// The router's programs are left attached.
fn compare(
    s: &Seed,
    gen_if: u32,
    ipv6: bool,
    flows: usize,
    cpus: &[usize],
    rounds: usize,
) -> Result<E2eResult> {
    let modes = [Mode::Kernel, Mode::Router, Mode::Wire];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let (mut rk, mut rw, mut r1) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut this = [0f64; 3];
        for (k, m) in modes.iter().enumerate() {
            set_mode(s, *m)?;
            let mpps = measure_on(s, gen_if, flows, ipv6, cpus)?;
            eprintln!(
                "e2e: {} {flows} flow(s) from {} core(s), round {}, {}: {mpps:.3} Mpps",
                if ipv6 { "IPv6" } else { "IPv4" },
                cpus.len(),
                round + 1,
                m.name()
            );
            samples[k].push(mpps);
            this[k] = mpps;
        }
        rk.push(this[1] / this[0]);
        rw.push(this[1] / this[2]);
        if cpus.len() > 1 {
            set_mode(s, Mode::Router)?;
            r1.push(this[1] / measure_on(s, gen_if, flows, ipv6, &cpus[..1])?);
        }
    }
    set_mode(s, Mode::Router)?;
    Ok(E2eResult {
        ipv6,
        flows,
        cores: cpus.len(),
        router_over_one_core: (cpus.len() > 1).then(|| summarize(&r1)),
        mpps: modes
            .iter()
            .zip(samples.iter())
            .map(|(m, v)| (*m, summarize(v)))
            .collect(),
        router_over_kernel: summarize(&rk),
        router_over_wire: summarize(&rw),
    })
}

type Entries = Vec<(router_ctl::config::IpNet, router_common::Route)>;

/// The router's own table (as apply made it) and the same plus `BIG_TABLE` random routes via vm3.
fn tables(s: &Seed) -> Result<(Entries, Entries)> {
    let st = state::RouterState::load(&s.ids.router_id)?.context("router state")?;
    let router_ctl::apply::Tables {
        ifaces,
        routes: small,
        ..
    } = router_ctl::apply::tables_of(&st)?;
    let b = st
        .interfaces
        .iter()
        .find(|i| i.device == s.ids.dev_b())
        .context("qr-b")?
        .ifindex;
    let vm3 = Ipv4Addr::new(172, 16, 101, 3);
    let flows: std::collections::HashSet<_> = small.iter().map(|(n, _)| *n).collect();
    let random: Vec<_> = crate::table::random_table(BIG_TABLE, 7)
        .into_iter()
        .map(router_ctl::config::IpNet::from)
        .filter(|n| !flows.contains(n))
        .map(|n| (n, b, vm3.into()))
        .collect();
    let mut big = small.clone();
    big.extend(router_ctl::fib::writer::route_entries(
        &ifaces,
        &[],
        &random,
        &[],
    ));
    Ok((small, big))
}

fn install(s: &Seed, entries: &Entries) -> Result<()> {
    let id = s.ids.router_id.clone();
    let e = entries.clone();
    netns::run_in(&s.ns(), move || {
        let mut ebpf = datapath::open_maps(&id)?;
        router_ctl::fib::writer::set_routes(&mut ebpf, &e)
    })
}

/// One measurement: Mpps delivered to vm3 while the generator, pinned to CPU 0 in vm1, sends
/// `PACKETS` frames as if received on vm1's interface (XDP_TX sends them to the router).
fn measure(s: &Seed, gen_if: u32, flows: usize) -> Result<f64> {
    measure_on(s, gen_if, flows, false, &[0])
}

/// Mpps delivered to vm3 with one generator pinned to each of `cpus`, started together, each
/// sending `PACKETS` frames of `flows` flows (IPv4 or IPv6); the time is the slowest one's.
fn measure_on(s: &Seed, gen_if: u32, flows: usize, ipv6: bool, cpus: &[usize]) -> Result<f64> {
    let before = sink_count(&s.vm3)?;
    let start = std::sync::Arc::new(std::sync::Barrier::new(cpus.len()));
    let mut threads = Vec::new();
    for &cpu in cpus {
        let gen = load_generator(s, flows, ipv6)?;
        let cell = std::sync::Arc::new(std::sync::Mutex::new(Some(gen)));
        let start = start.clone();
        threads.push(in_ns(&s.vm1, move || -> Result<f64> {
            crate::host::pin_to_cpu(cpu)?;
            let mut gen = cell.lock().unwrap().take().context("generator")?;
            let prog: &mut Xdp = gen
                .program_mut("bench_gen")
                .context("bench_gen")?
                .try_into()?;
            let frame = [0u8; 64];
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&64u32.to_ne_bytes());
            ctx[12..16].copy_from_slice(&gen_if.to_ne_bytes());
            start.wait();
            let t = Instant::now();
            prog.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: PACKETS,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            })
            .context("live-frames test run")?;
            Ok(t.elapsed().as_secs_f64())
        }));
    }
    let mut elapsed = 0f64;
    for t in threads {
        let e = t
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        elapsed = elapsed.max(e);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let got = sink_count(&s.vm3)? - before;
    Ok(got as f64 / elapsed / 1e6)
}

//! BENCHMARKS.md and its plot.

use std::fmt::Write as _;

use crate::{
    ctl::{ApplyScale, NeighLatency},
    e2e,
    pkt::PktResult,
    skb::{Path, Small, Tcp},
};

pub struct Report<'a> {
    pub runs: usize,
    pub pkt: &'a [PktResult],
    pub e2e: Option<&'a (Vec<e2e::E2eResult>, e2e::UpdatesUnderTraffic)>,
    pub neigh: Option<&'a NeighLatency>,
    pub tcp: Option<&'a [Tcp]>,
    pub small: Option<&'a [Small]>,
    pub apply: Option<&'a ApplyScale>,
    pub nat: Option<&'a crate::nat::NatBench>,
    pub conns: Option<&'a crate::conns::ConnBench>,
    pub updates: Option<&'a (
        Vec<crate::updates::UpdateRate>,
        crate::updates::BatchFigures,
    )>,
    pub probe: Option<&'a [crate::probe::Probe]>,
    pub fib: Option<&'a [crate::fib::FibResult]>,
    pub seconds: f64,
}

fn machine() -> Vec<(String, String)> {
    let sh = |c: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    vec![
        ("date".into(), sh("date -u '+%Y-%m-%d %H:%M UTC'")),
        ("kernel".into(), sh("uname -sr")),
        ("CPU".into(), sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-")),
        ("cores".into(), sh("nproc")),
        ("memory".into(), sh("free -g | awk '/Mem:/ {print $2 \" GiB\"}'")),
        ("virtualisation".into(), sh("systemd-detect-virt 2>/dev/null || (grep -q hypervisor /proc/cpuinfo && echo 'a hypervisor' || echo none)")),
    ]
}

fn dir_name(d: crate::nat::Dir) -> &'static str {
    match d {
        crate::nat::Dir::Snat => "vm1 → outside through SNAT",
        crate::nat::Dir::FloatingIp => "outside → vm3's floating IP",
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

impl Report<'_> {
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# Benchmarks\n\nWritten by `cargo xtask bench` ({:.0} s); every figure is the median of {} runs, with min–max in brackets. Numbers in this repository are only ever quoted from this file.\n", self.seconds, self.runs);
        let _ = writeln!(m, "| machine | |\n|---|---|");
        for (k, v) in machine() {
            let _ = writeln!(m, "| {k} | {v} |");
        }

        // Targets first (set for IPv4; IPv6 is reported beside them).
        let v4: Vec<&PktResult> = self.pkt.iter().filter(|p| !p.ipv6).collect();
        let v6: Vec<&PktResult> = self.pkt.iter().filter(|p| p.ipv6).collect();
        let one = v4.iter().copied().find(|p| p.routes == 1);
        let big = v4
            .iter()
            .copied()
            .max_by_key(|p| p.routes)
            .filter(|p| p.routes >= 1_000_000);
        let _ = writeln!(
            m,
            "\n## Targets\n\n| figure | target | measured | |\n|---|---|---|---|"
        );
        if let Some((res, _)) = self.e2e {
            for r in res {
                let rk = r.router_over_kernel.median;
                let rw = r.router_over_wire.median;
                let fam = match (r.ipv6, r.cores) {
                    (false, 1) => "IPv4".to_string(),
                    (true, 1) => "IPv6".to_string(),
                    (false, n) => format!("IPv4, {n} cores receiving"),
                    (true, n) => format!("IPv6, {n} cores receiving"),
                };
                let _ = writeln!(
                    m,
                    "| end-to-end {fam}, this router ÷ kernel forwarding, {} flow(s) | ≥ 1.5 | {} | {} |",
                    r.flows,
                    r.router_over_kernel.fmt(2),
                    verdict(rk >= 1.5)
                );
                let _ = writeln!(
                    m,
                    "| end-to-end {fam}, this router ÷ wire floor, {} flow(s) | ≥ 0.95 | {} | {} |",
                    r.flows,
                    r.router_over_wire.fmt(2),
                    verdict(rw >= 0.95)
                );
                if let Some(one) = &r.router_over_one_core {
                    let _ = writeln!(
                        m,
                        "| end-to-end {fam}: this router on {} cores ÷ on one (the fast path scales with cores) | ≥ 1.5 | {} | {} |",
                        r.cores,
                        one.fmt(2),
                        verdict(one.median >= 1.5)
                    );
                }
            }
        }
        for t in self.tcp.unwrap_or_default() {
            let _ = writeln!(
                m,
                "| bulk TCP vm1 → vm3 at kernel defaults, {} stream(s), this router (`auto`: tc) ÷ the kernel router | ≥ 1.0 (aim 1.1) | {} | {} |",
                t.streams,
                t.ratio.fmt(2),
                verdict(t.ratio.median >= 1.0)
            );
        }
        for sm in self.small.unwrap_or_default().iter().filter(|x| !x.tuned) {
            if let Some((_, g)) = sm.gain.iter().find(|(p, _)| *p == Path::Tc) {
                let _ = writeln!(m, "| small UDP from an skb sender, router-side CPU per packet, the kernel ÷ tc | ≥ 1.3 | {} | {} |", g.fmt(2), verdict(g.median >= 1.3));
            }
        }
        if let Some(n) = self.nat {
            for f in &n.frames {
                let _ = writeln!(m, "| NAT, established flows, 64-byte frames, {}, {} flow(s): this router (XDP) ÷ the kernel's NAT | ≥ 1.5 | {} | {} |", dir_name(f.dir), f.flows, f.xdp_over_kernel.fmt(2), verdict(f.xdp_over_kernel.median >= 1.5));
            }
            let _ = writeln!(m, "| NAT, bulk TCP through SNAT at kernel defaults: this router (`auto`: tc) ÷ the kernel's NAT | ≥ 1.0 | {} | {} |", n.tcp_ratio.fmt(2), verdict(n.tcp_ratio.median >= 1.0));
            let _ = writeln!(m, "| NAT, new TCP connections per second through SNAT: this router ÷ the kernel's NAT | ≥ 1.0 | {} | {} |", n.conn_ratio.fmt(2), verdict(n.conn_ratio.median >= 1.0));
        }
        if let Some(a) = self.apply {
            let _ = writeln!(
                m,
                "| `router-ctl apply` of 100 new routers (2 subnets each) | ≤ 2 s | {} s | {} |",
                a.hundred.fmt(2),
                verdict(a.hundred.median <= 2.0)
            );
            let _ = writeln!(
                m,
                "| unchanged re-apply of the 100 routers | ≤ 0.5 s | {} s | {} |",
                a.reapply_hundred.fmt(2),
                verdict(a.reapply_hundred.median <= 0.5)
            );
            let _ = writeln!(
                m,
                "| `router-ctl destroy` of the 100 routers | ≤ 1 s | {} s | {} |",
                a.destroy_hundred.fmt(2),
                verdict(a.destroy_hundred.median <= 1.0)
            );
            if let Some((n, first, _)) = a.big {
                let _ = writeln!(
                    m,
                    "| `router-ctl apply` of {n} new routers (one run) | ≤ 20 s | {first:.1} s | {} |",
                    verdict(first <= 20.0)
                );
            }
        }
        if let Some((rates, b)) = self.updates {
            for r in rates {
                let _ = writeln!(
                    m,
                    "| single-route changes per second under traffic, {} {} routes installed (each change its own commit) | ≥ 20 000 | {} | {} |",
                    r.routes,
                    if r.ipv6 { "IPv6" } else { "IPv4" },
                    r.changes_per_s.fmt(0),
                    verdict(r.changes_per_s.median >= 20000.0)
                );
            }
            let _ = writeln!(
                m,
                "| `router-ctl route batch` through the daemon, {} route changes on {} routes: changes per second (kernel, fast path, journal; one run) | ≥ 20 000 | {:.0} | {} |",
                b.changes, b.routes, b.changes_per_s, verdict(b.changes_per_s >= 20000.0)
            );
            let _ = writeln!(
                m,
                "| `router-ctl` peak RSS (VmHWM) installing {} routes with `route batch` (the real binary, one run) | ≤ 256 MiB | {:.0} MiB ({:.1} s) | {} |",
                b.routes, b.bulk_rss_mib, b.bulk_s, verdict(b.bulk_rss_mib <= 256.0)
            );
        }
        if let Some(t) = self.apply.and_then(|a| a.table.as_ref()) {
            let _ = writeln!(
                m,
                "| `router-ctl` peak RSS applying a definitions file of one router with {} extra routes (for comparison: the file path is not built for this) | — | {:.0} MiB ({:.1} s); one route changed: {:.0} MiB ({:.1} s) | — |",
                t.routes, t.first_rss_mib, t.first_s, t.again_rss_mib, t.again_s
            );
        }
        if let (Some(a), Some(b)) = (one, big) {
            let warm = b.forward_warm_ns.median / a.forward_warm_ns.median;
            let _ = writeln!(
                m,
                "| per-packet cost at {} routes ÷ at 1 route, warm (each destination {} times in a row) | ≤ 1.25 | {warm:.2} | {} |",
                b.routes,
                crate::pkt::WARM_REPEAT,
                verdict(warm <= 1.25)
            );
            if let Some((_, upd)) = self.e2e {
                let r = upd.big_over_small.median;
                let _ = writeln!(m, "| per-packet cost in live forwarding, 1 000 flows, {} ÷ {} routes (inverse of the Mpps ratio) | ≤ 1.25 | {:.2} | {} |", upd.big_routes, upd.small_routes, 1.0 / r, verdict(1.0 / r <= 1.25));
            }
            let _ = writeln!(
                m,
                "| install {} routes | ≤ 5 s | {:.2} s | {} |",
                b.routes,
                b.install_s,
                verdict(b.install_s <= 5.0)
            );
            let mib = b.routes_memlock as f64 / 1048576.0;
            let _ = writeln!(m, "| map memory at {} IPv4 routes (fdinfo memlock of the route maps) | ≤ 128 MiB | {mib:.1} MiB | {} |", b.routes, verdict(mib <= 128.0));
        }
        // Issue 14's IPv6 targets (the range table of `router-ctl/src/fib/six.rs`).
        let one6 = v6.iter().copied().find(|p| p.routes == 1);
        let big6 = v6
            .iter()
            .copied()
            .max_by_key(|p| p.routes)
            .filter(|p| p.routes >= 1_000_000);
        if let (Some(_), Some(b)) = (one6, big6) {
            let _ = writeln!(
                m,
                "| install {} IPv6 routes (issue 14) | ≤ 3 s | {:.2} s | {} |",
                b.routes,
                b.install_s,
                verdict(b.install_s <= 3.0)
            );
            let mib = b.routes_memlock as f64 / 1048576.0;
            let _ = writeln!(
                m,
                "| map memory at {} IPv6 routes (issue 14) | ≤ 256 MiB | {mib:.1} MiB | {} |",
                b.routes,
                verdict(mib <= 256.0)
            );
        }
        // Issue 25: our lookup against the kernel's FIB at the same size (see `crate::fib`).
        for ipv6 in [false, true] {
            let big = self
                .fib
                .unwrap_or_default()
                .iter()
                .filter(|r| r.ipv6 == ipv6)
                .max_by_key(|r| r.routes)
                .filter(|r| r.routes >= 1_000_000);
            if let Some(r) = big {
                for (what, ours, kernel) in [
                    ("cold", &r.ours_ns, &r.kernel_ns),
                    ("warm", &r.ours_warm_ns, &r.kernel_warm_ns),
                ] {
                    let ratio = ours.median / kernel.median;
                    let _ = writeln!(
                        m,
                        "| {} per-packet cost at {} routes, {what}: ours ÷ an XDP router on the kernel's FIB (`bpf_fib_lookup`), same routes, same run | ≤ 0.5 | {ratio:.2} | {} |",
                        if ipv6 { "IPv6" } else { "IPv4" },
                        r.routes,
                        verdict(ratio <= 0.5)
                    );
                }
            }
        }
        if let Some(n) = self.neigh {
            let _ = writeln!(
                m,
                "| neighbour change → fast path map | ≤ 10 ms median | {} ms | {} |",
                n.total_ms.fmt(2),
                verdict(n.total_ms.median <= 10.0)
            );
        }

        let _ = writeln!(m, "\n## Per-packet cost of the program\n\nBPF_PROG_TEST_RUN on the real program, ns per packet as the kernel reports it, with the test-run timer's own cost (a program that returns at once, measured on the same frames) subtracted. {} destinations, each in a randomly chosen prefix of the table; *cold*: each destination runs once, so nothing of its lookup path is left in the cache by the previous packet; *warm*: {} of them, each run {} times in a row. Tables are random, shaped like an Internet table (60 % /24, 20 % /22–/23, 17 % /16–/21, 1.5 % /8–/15, 1.5 % /25–/32) plus a default route; routes are installed by the controller's own code path.\n", crate::pkt::DESTINATIONS, crate::pkt::WARM_DESTINATIONS, crate::pkt::WARM_REPEAT);
        for (fam, rows) in [
            ("IPv4 (16-8-8 trie)", &v4),
            (
                "IPv6 (ranges under a 16-8-…-8 trie, the LPM trie for prefixes longer than /64)",
                &v6,
            ),
        ] {
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(m, "\n### {fam}\n\n| routes | forwarded, cold (ns) | passed to the kernel, cold (ns) | forwarded, warm (ns) | timer cost subtracted (ns) | install (s) | route map memory (MiB) | peak RSS of the installing process (MiB) |\n|---:|---|---|---|---|---:|---:|---:|");
            for p in rows.iter() {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.0} |",
                    p.routes,
                    p.forward_ns.fmt(1),
                    p.pass_ns.fmt(1),
                    p.forward_warm_ns.fmt(1),
                    p.floor_ns.fmt(1),
                    p.install_s,
                    p.routes_memlock as f64 / 1048576.0,
                    p.peak_rss_mib
                );
            }
            if let Some(a) = rows.iter().find(|p| p.routes == 1) {
                let _ = writeln!(
                    m,
                    "\nRatios to 1 route (cold forward / warm forward): {}",
                    rows.iter()
                        .map(|p| format!(
                            "{} routes {:.2} / {:.2}",
                            p.routes,
                            p.forward_ns.median / a.forward_ns.median,
                            p.forward_warm_ns.median / a.forward_warm_ns.median
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
        }
        if !v6.is_empty() {
            let _ = writeln!(m, "\nIPv6 tables are random too: a default route, 50 % /48, 30 % /29–/47, 17 % /49–/64, 3 % /65–/128, all in 2000::/3. IPv6 ÷ IPv4 forwarding cost at the same size (cold / warm): {}.", v6.iter().filter_map(|p6| {
                let p4 = v4.iter().find(|p| p.routes == p6.routes)?;
                Some(format!("{} routes {:.2} / {:.2}", p6.routes, p6.forward_ns.median / p4.forward_ns.median, p6.forward_warm_ns.median / p4.forward_warm_ns.median))
            }).collect::<Vec<_>>().join("; "));
        }
        if let Some(probe) = self.probe {
            let _ = writeln!(m, "\n### What one cold read costs\n\nOne read of an entry of a random 1 KiB group per frame (BPF_PROG_TEST_RUN, {} frames each run once, the timer's cost subtracted as above), the groups in a BPF array (memory from vmalloc, 4 KiB pages: a large table misses the TLB) or in a hash map without preallocation (elements from kmalloc, in the kernel's direct map, which huge pages cover; the lookup reads a bucket, then the element). Medians of {} runs.\n\n| groups | memory | array (ns) | hash (ns) |\n|---:|---:|---|---|", crate::pkt::DESTINATIONS, self.runs);
            for p in probe {
                let _ = writeln!(
                    m,
                    "| {} | {} KiB | {} | {} |",
                    p.groups,
                    p.groups,
                    p.array_ns.fmt(1),
                    p.hash_ns.fmt(1)
                );
            }
            let _ = writeln!(m, "\nA cold lookup costs the path it always takes plus one such read per level whose memory is not cached: IPv4 at a million routes reads its first level (256 KiB) and a second-level group (tens of MiB), IPv6 its first level, a group (about 8 MiB) and a block (about 75 MiB). With one route every read hits the cache. So no layout brings a table larger than the cache within 2× of a one-route table here: one read into 16 MiB alone costs more than the whole one-route lookup. Direct-mapped memory (the hash) saves the TLB misses but costs a second dependent miss (bucket, then element): slower at every size.");
        }
        let _ = writeln!(
            m,
            "\n![per-packet cost against routing-table size](bench-plot.svg)\n"
        );

        if let Some((res, upd)) = self.e2e {
            let _ = writeln!(m, "\n## End-to-end forwarding, one core and two\n\nSeed topology in namespaces (vm1 — qr-a | router | qr-b — vm3, veth pairs). A generator XDP program runs with BPF_F_TEST_XDP_LIVE_FRAMES in vm1, pinned to CPU 0, rewriting every header byte of each 64-byte UDP frame and transmitting it (XDP_TX) into the router; an nftables ingress rule at vm3 counts and drops what arrives. Mpps = frames counted at vm3 ÷ generator time; generation, forwarding and delivery all run on that one core. The three data paths run in turn within each round: the kernel forwarding in the router namespace (no XDP on the `qr-` devices, GRO on), this router, and a wire program redirecting qr-a → qr-b with no lookup and no rewrite. vm3's veth has GRO on (without it qr-b cannot take XDP redirects; the kernel and tc sections below run at kernel defaults). With 1 000 flows the destinations are spread over 1 000 /24 prefixes that extra routes send to vm3 as the nexthop.\n");
            let _ = writeln!(m, "IPv6 runs the same way on the same (dual-stack) ports: 64-byte UDP frames over IPv6 (a 2-byte payload), 1 000 flows over 1 000 /64 prefixes routed to vm3's IPv6 address.\n");
            let _ = writeln!(m, "Two cores receiving: the same seed with two queues on each instance veth pair (`numrxqueues 2`, as a NIC's RSS spreads flows over its queues), one generator pinned to each core, each sending into its own queue of qr-a; every data path then runs on both cores. \"router on 2 cores ÷ on one\" compares this router with both generators against the same topology with the first generator only, within each round.\n");
            let _ = writeln!(m, "| family | cores | flows | kernel (Mpps) | this router (Mpps) | wire (Mpps) | router ÷ kernel | router ÷ wire |\n|---|---:|---:|---|---|---|---|---|");
            for r in res {
                let g = |k: usize| r.mpps[k].1.fmt(3);
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    if r.ipv6 { "IPv6" } else { "IPv4" },
                    r.cores,
                    r.flows,
                    g(0),
                    g(1),
                    g(2),
                    r.router_over_kernel.fmt(2),
                    r.router_over_wire.fmt(2)
                );
            }
            // Where the router's share below the wire floor goes: its time per frame beyond
            // the wire program's, beside what the program itself costs per packet.
            let mut account = Vec::new();
            for r in res.iter().filter(|r| r.cores == 1 && r.flows > 1) {
                let (router, wire) = (r.mpps[1].1.median, r.mpps[2].1.median);
                if router <= 0.0 || wire <= 0.0 {
                    continue;
                }
                let extra = 1e3 / router - 1e3 / wire;
                let prog = self
                    .pkt
                    .iter()
                    .find(|p| p.ipv6 == r.ipv6 && p.routes == 1)
                    .map(|p| format!("{:.0} ns", p.forward_ns.median))
                    .unwrap_or_else(|| "—".into());
                account.push(format!(
                    "{}: {:.0} ns per frame for the wire path, {extra:.0} ns more for this router; the program's own cost per packet in BPF_PROG_TEST_RUN (1 route, cold, above an immediate return): {prog}",
                    if r.ipv6 { "IPv6" } else { "IPv4" },
                    1e3 / wire
                ));
            }
            if !account.is_empty() {
                let _ = writeln!(m, "\nWhere the share below the wire floor goes (one core, 1 000 flows; per-frame times are the inverse of the Mpps medians): {}. The difference is the program's own work (parse, lookup, neighbour, rewrite, counters, the NAT and policy checks): the machine offers no hardware performance counters (`perf stat -e cycles` is not supported here, so `bpftool prog profile` cannot run), and BPF_PROG_TEST_RUN is the finest clock available.", account.join("; "));
            }
            let _ = writeln!(m, "\nTable size under live traffic: the 1 000 flows through this router with the seed's table ({} entries: connected, local, the 1 000 flow routes) and with {} entries (plus {} random routes of the shape above, all via vm3), alternating within each round: {} Mpps against {} Mpps, ratio big ÷ small {}.", upd.small_routes, upd.big_routes, e2e::BIG_TABLE, upd.big_table.fmt(3), upd.small_table.fmt(3), upd.big_over_small.fmt(2));
            let _ = writeln!(m, "\nRoute updates under traffic (1 000 flows forwarded meanwhile): {:.0} table rewrites per second on the router of the end-to-end test (its 1 000 flow routes, maps sized for a million), each moving one /24 to another nexthop: the table is rebuilt in memory and only the changed entries are written; forwarding meanwhile {:.3} Mpps against {:.3} Mpps without updates.", upd.updates_per_s, upd.mpps_during, upd.mpps_without);
        }
        if let Some(tcp) = self.tcp {
            let _ = writeln!(m, "\n## Bulk TCP at kernel defaults\n\nThe seed topology plugged as Neutron plugs it: veth pairs whose instance ends keep the kernel's defaults (GRO off, checksum and segmentation offloads on), `qr-` devices plugged before `apply`, which chose tc on both (`auto`). iperf3 from vm1 to vm3 for 5 s, 1 and 8 parallel streams; in each round the kernel router (the router's programs detached, forwarding on) and this router run in turn on the same namespaces, taking turns going first. Gbit/s received. The third path forces XDP on both devices (`hook = \"xdp\"`), to show what `auto` avoids.\n\n| streams | kernel router (Gbit/s) | this router, `auto` = tc (Gbit/s) | tc ÷ kernel | forced XDP (Gbit/s) | XDP ÷ kernel |\n|---:|---|---|---|---|---|");
            for t in tcp {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} |",
                    t.streams,
                    t.kernel.fmt(2),
                    t.router.fmt(2),
                    t.ratio.fmt(2),
                    t.xdp.fmt(2),
                    t.xdp_ratio.fmt(2)
                );
            }
            let _ = writeln!(m, "\nAttaching XDP to a veth turns segmentation offload off on its peer (the instance's end), so the instance's stack cuts and checksums every segment itself; and at defaults vm3's veth cannot take XDP redirects (no GRO, no XDP program), so each segment is passed to the kernel (`no_xdp_xmit`): correct, but the kernel forwards ~1 500-byte packets instead of 64 KiB ones. This is why `auto` never picks XDP for a device fed by skbs.");
        }
        if let Some(small) = self.small {
            let _ = writeln!(m, "\n## Small UDP from an skb sender: the router's CPU per packet\n\nAn AF_PACKET socket in vm1 (pinned to CPU 0) sends {} 64-byte UDP frames (real IPv4 and UDP checksums) as fast as it can, in batches of 32; an nftables ingress rule in vm3 counts and drops them. With veths the whole path runs on the sending CPU, so the rates alone would not tell the data paths apart: the CPU time per frame is measured instead: the sending thread's and the softirq threads' run time as the scheduler accounts it (on veths the receive side of each device runs in the sender's context, as it leaves each system call), and the same sender with its frames dropped by an nftables rule at qr-a's ingress is subtracted. What is left is the router's side: from qr-a's ingress to vm3's sink. The hooks are set by `apply` with `hook = \"tc\"` or `hook = \"xdp\"` on both ports; the kernel runs with the programs detached.\n", crate::skb::FRAMES);
            for sm in small {
                let _ = writeln!(m, "\n{}\n\n| path | router-side CPU (ns per packet) | kernel ÷ path | delivered (lowest run) | carried by the fast path |\n|---|---|---|---|---|", if sm.tuned { "vm3's veth with GRO on (the tuning XDP redirects into qr-b need):" } else { "At kernel defaults:" });
                for (k, (p, ns)) in sm.ns.iter().enumerate() {
                    let _ = writeln!(
                        m,
                        "| {} | {} | {} | {:.1} % | {:.1} % |",
                        p.name(),
                        ns.fmt(0),
                        sm.gain[k].1.fmt(2),
                        sm.delivered[k].1 * 100.0,
                        sm.fast[k].1 * 100.0
                    );
                }
                let _ = writeln!(
                    m,
                    "\nSender and veth crossing alone (subtracted): {} ns per packet.",
                    sm.baseline.fmt(0)
                );
            }
            let _ = writeln!(m, "\nXDP on a veth fed by skbs converts every skb into an XDP buffer first, and at defaults its redirects into qr-b are impossible (vm3's veth has neither GRO nor XDP), so it hands every frame to the kernel (counted as `no_xdp_xmit`): never worse than the kernel, never better.");
        }
        if let Some(n) = self.nat {
            let _ = writeln!(m, "\n## NAT: SNAT and floating IPs beside the kernel's NAT\n\nThe seed plus an external network (`ext`, the upstream router 192.168.1.1; `out`, an outside host 203.0.113.5), the router with a gateway (192.168.1.10, SNAT on) and a floating IP 192.168.1.20 for vm3. Small frames: the XDP live-frames generator of the end-to-end section sends 64-byte UDP frames ({} per run) from vm1 to the outside host (through SNAT; counted and dropped by an nftables ingress rule on the upstream router's port) or from the upstream router's port to the floating IP (counted at vm3), after a warm-up of 20 000 frames that starts the flows (their first packets go through the kernel, whose conntrack decides the mapping the fast path then copies). Four data paths in turn in every round: the kernel's NAT (the router's programs detached; the nftables rules Neutron's agent would install), the same with an nftables flowtable (the kernel's own fast path for established flows), this router at tc (the generator's frames reach it as skbs) and in XDP. The devices frames are sent into have GRO on (what an XDP generator and XDP redirects into veths need; the same for every path). \"Translated\" is the share of the delivered frames the fast path translated (its counters).\n\n| direction | flows | kernel NAT (Mpps) | kernel + flowtable (Mpps) | tc (Mpps) | XDP (Mpps) | XDP ÷ kernel | tc ÷ kernel | XDP ÷ flowtable | translated by the fast path (XDP) |\n|---|---:|---|---|---|---|---|---|---|---|", crate::nat::PACKETS_PER_RUN);
            for f in &n.frames {
                let g = |mode| {
                    f.mpps
                        .iter()
                        .find(|(x, _)| *x == mode)
                        .map(|(_, s)| s.fmt(3))
                        .unwrap_or_else(|| "n/a".into())
                };
                use crate::nat::Mode;
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} % |",
                    dir_name(f.dir),
                    f.flows,
                    g(Mode::Kernel),
                    g(Mode::Flowtable),
                    g(Mode::Tc),
                    g(Mode::Xdp),
                    f.xdp_over_kernel.fmt(2),
                    f.tc_over_kernel.fmt(2),
                    f.xdp_over_flowtable
                        .as_ref()
                        .map(|x| x.fmt(2))
                        .unwrap_or_else(|| "n/a".into()),
                    f.fast_share * 100.0
                );
            }
            if let Some(why) = &n.flowtable_missing {
                let _ = writeln!(m, "\nThe flowtable anchor is missing: this kernel refused an nftables flowtable (`{why}`: it is built without `nf_flow_table`, and this machine loads no modules).");
            }
            let _ = writeln!(m, "\nBulk TCP through SNAT at kernel defaults (every device as plugged; `auto` chose tc), iperf3 vm1 → the outside host for 5 s, one stream, the kernel's NAT and this router taking turns going first: kernel {} Gbit/s, this router {} Gbit/s, ratio {}.\n\nNew TCP connections through SNAT: 1 000 connections from vm1 to the outside host one after the other (connect, accept, close with a reset), connections per second: kernel {}, this router {}, ratio {}. Every packet of such a connection goes through the kernel on both paths (its SYN, FIN and RST always do, and a flow is copied into the fast path only once it passed the kernel 8 TCP segments between two of them). What this router adds per connection is its program on each packet's way to the kernel: no conntrack event is asked for, and nothing is written to a map. Measured while building this (2026-12-05): 0.72–0.79 with every conntrack event sent to the daemon (issue 12's first version), about 0.9 with only the events the daemon used, 0.95 (0.84–0.97) with no event at all, copies on demand and every packet's lookup in the flow map (whose 4 MiB of buckets cost a cache miss per packet: 770 ns a packet in the tc program with BPF statistics on), then a hint bitmap in front of the flow map (445 ns).", n.tcp_kernel.fmt(2), n.tcp_router.fmt(2), n.tcp_ratio.fmt(2), n.conn_kernel.fmt(0), n.conn_router.fmt(0), n.conn_ratio.fmt(2));
        }
        if let Some(c) = self.conns {
            m += "\n";
            m += &conns_section(c, None);
        }
        if let Some(a) = self.apply {
            let _ = writeln!(m, "\n## `router-ctl apply` at scale\n\nThe `router-ctl` binary on a definitions file of N routers with two subnets each; apply creates each router's namespace and veth pairs, loads the tc program, attaches it to both devices and fills the maps; the daemon is started (or signalled) as usual. The unchanged re-apply runs 2 s after the first apply. Destroy removes them all with one `router-ctl destroy` call.\n\n| routers | first apply (s) | unchanged re-apply (s) | destroy (s) |\n|---:|---|---|---|\n| 1 | {} | | |\n| 100 | {} | {} | {} |", a.one.fmt(3), a.hundred.fmt(2), a.reapply_hundred.fmt(3), a.destroy_hundred.fmt(2));
            if let Some((n, first, again)) = a.big {
                let _ = writeln!(m, "| {n} | {first:.1} (one run) | {again:.2} | |");
            }
            let _ = writeln!(m, "\nRouters are applied by 16 workers at once. A new router's time goes mostly to the kernel: attaching a tcx link waits for an RCU grace period with the RTNL held (kernel/bpf/tcx.c), and so does detaching one; the section on attach modes below measures it per device. Two devices per router put a floor under apply and destroy that no parallelism, batching or ordering lowers (the RTNL serialises them all): 100 routers are 200 grace periods. The targets of 2 s for 100 routers, 20 s for 1 000 and 1 s for destroying 100 sit below that floor on this machine's 250 Hz tick. A legacy `cls_bpf` filter attaches in microseconds, but it lives in a `clsact` qdisc that any `tc` user may delete, and it cannot share a device with the `ingress` qdisc Neutron's own floating-IP QoS puts on `qg-` devices (neutron/agent/linux/l3_tc_lib.py); XDP on a veth takes skb traffic out of GSO. apply keeps tcx. Measured while building this: 100 routers took 10.4 s one at a time before the pool, veth creation in place and verifying only the programs in use, and 3.4 s after.");
            if let Some(t) = &a.table {
                let _ = writeln!(m, "
One router with {} extra routes (distinct /24s via one nexthop, `[[router.route]]` entries in the definitions file, 75 MB), through the real binary: first apply {:.1} s at {:.0} MiB peak RSS; the same file with one route changed {:.1} s at {:.0} MiB. The definitions file is read whole (the `toml` crate builds the document first) and every extra route is a kernel route installed one rtnetlink request at a time and a line of the JSON state: a table this size belongs in `route batch` (next section), not in the definition.", t.routes, t.first_s, t.first_rss_mib, t.again_s, t.again_rss_mib);
            }
        }
        if let Some((rates, b)) = self.updates {
            let _ = writeln!(m, "\n## Route changes one at a time\n\nThe route table is kept in memory as the maps hold it (`router-ctl/src/fib/live.rs`); a change writes only the entries its prefix covers, leaves first. *Under traffic*: a table of random routes of the shape above, installed by the controller's code path in a namespace of its own; one thread makes single-route changes as fast as it can, each its own commit (a new prefix added, then replaced, an existing one moved to another nexthop, later the new prefixes removed again, so that groups come and go), while this thread runs frames to destinations in the table through the XDP program (BPF_PROG_TEST_RUN); every frame must be forwarded, or the benchmark stops. {} rounds of 2 s each, then 2 s of the same frames without changes.\n\n| family | routes | changes per second | forwarding with changes (Mpps, test runs) | without (Mpps) |\n|---|---:|---|---|---|", self.runs.min(5));
            for r in rates {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} |",
                    if r.ipv6 { "IPv6" } else { "IPv4" },
                    r.routes,
                    r.changes_per_s.fmt(0),
                    r.fwd_mpps_with.fmt(3),
                    r.fwd_mpps_without.fmt(3)
                );
            }
            let _ = writeln!(m, "\n`router-ctl route batch` (the real binary) on a router created with `max_routes`, two subnets, no traffic: one batch of {} `add` lines (the table shape above, one nexthop) without a daemon: {:.1} s, peak RSS (VmHWM, read every 10 ms) {:.0} MiB, of which about 90 MiB are the route maps mapped into the process to be written (the kernel's map memory, counted in the process's RSS because it is mapped; only the part in use is mapped). Through the daemon, which keeps the table: a batch of {} `replace` lines, {:.0} changes per second into the kernel (pipelined rtnetlink requests), the fast path and the journal; one-line batches from the CLI (a process per change, through the daemon's socket): {} ms each; the daemon's peak RSS {:.0} MiB.", b.routes, b.bulk_s, b.bulk_rss_mib, b.changes, b.changes_per_s, b.one_line_ms.fmt(1), b.daemon_rss_mib);
        }
        if let Some(n) = self.neigh {
            let _ = writeln!(m, "\n## Neighbour latency\n\nA neighbour's MAC is changed over rtnetlink (RTM_NEWNEIGH, replace) from a thread in the router namespace, 20 times; the fast path's neighbour map is polled meanwhile. From sending the change to the map holding the new MAC (the daemon `router-ctl run` receives the kernel's event and updates the map): {} ms; the kernel's acknowledgement of the change alone arrives after {} ms.", n.total_ms.fmt(3), n.kernel_ack_ms.fmt(3));
        }
        m
    }

    /// Per-packet cost against routing-table size (log scale), as SVG.
    pub fn svg(&self) -> String {
        let (w, h, l, r, t, b) = (640.0, 400.0, 70.0, 20.0, 40.0, 60.0);
        let maxy = self
            .pkt
            .iter()
            .flat_map(|p| [p.forward_ns.max, p.pass_ns.max, p.forward_warm_ns.max])
            .fold(1.0f64, f64::max)
            * 1.1;
        let x = |routes: usize| l + ((routes.max(1) as f64).log10() / 6.0) * (w - l - r);
        let y = |ns: f64| t + (1.0 - ns / maxy) * (h - t - b);
        let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n");
        let _ = writeln!(s, "<text x='{}' y='22' text-anchor='middle' font-size='14'>Per-packet cost against routing-table size (median, min–max)</text>", w / 2.0);
        let _ = writeln!(s, "<line x1='{l}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{l}' y1='{t}' x2='{l}' y2='{}' stroke='black'/>", h - b, w - r, h - b, h - b);
        for e in 0..=6 {
            let xv = x(10usize.pow(e));
            let _ = writeln!(s, "<line x1='{xv}' y1='{}' x2='{xv}' y2='{}' stroke='black'/><text x='{xv}' y='{}' text-anchor='middle'>10^{e}</text>", h - b, h - b + 5.0, h - b + 20.0);
        }
        let step = if maxy > 1000.0 {
            200.0
        } else if maxy > 400.0 {
            100.0
        } else {
            50.0
        };
        let mut v = 0.0;
        while v <= maxy {
            let _ = writeln!(s, "<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='#ddd'/><text x='{}' y='{}' text-anchor='end'>{v:.0}</text>", l, y(v), w - r, y(v), l - 6.0, y(v) + 4.0);
            v += step;
        }
        let _ = writeln!(s, "<text x='{}' y='{}' text-anchor='middle'>routes installed</text><text x='18' y='{}' transform='rotate(-90 18 {})' text-anchor='middle'>ns per packet</text>", (l + w - r) / 2.0, h - 15.0, (t + h - b) / 2.0, (t + h - b) / 2.0);
        type Pick = fn(&PktResult) -> &crate::stats::Summary;
        let series: [(&str, &str, bool, Pick); 5] = [
            ("IPv4 forwarded, cold", "#c0392b", false, |p| &p.forward_ns),
            ("IPv4 passed to the kernel, cold", "#2471a3", false, |p| {
                &p.pass_ns
            }),
            ("IPv4 forwarded, warm", "#27ae60", false, |p| {
                &p.forward_warm_ns
            }),
            ("IPv6 forwarded, cold", "#8e44ad", true, |p| &p.forward_ns),
            ("IPv6 forwarded, warm", "#d68910", true, |p| {
                &p.forward_warm_ns
            }),
        ];
        for (k, (name, color, ipv6, pick)) in series.iter().enumerate() {
            let rows: Vec<&PktResult> = self.pkt.iter().filter(|p| p.ipv6 == *ipv6).collect();
            if rows.is_empty() {
                continue;
            }
            let dash = if *ipv6 { " stroke-dasharray='6 3'" } else { "" };
            let pts: Vec<String> = rows
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.routes), y(pick(p).median)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill='none' stroke='{color}' stroke-width='2'{dash} points='{}'/>",
                pts.join(" ")
            );
            for p in rows {
                let su = pick(p);
                let _ = writeln!(s, "<line x1='{0}' y1='{1}' x2='{0}' y2='{2}' stroke='{color}'/><circle cx='{0}' cy='{3}' r='3' fill='{color}'/>", x(p.routes), y(su.min), y(su.max), y(su.median));
            }
            let ly = t + 10.0 + 16.0 * k as f64;
            let _ = writeln!(s, "<line x1='{}' y1='{ly}' x2='{}' y2='{ly}' stroke='{color}' stroke-width='2'{dash}/><text x='{}' y='{}'>{name}</text>", l + 10.0, l + 30.0, l + 36.0, ly + 4.0);
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The request-shaped connections' section, between `<!-- conns -->` markers (so that
/// `--only-conns` can replace it in place).
/// The request-shaped connections' section; `date`: when it was measured, for a section run on
/// its own (a full report's date is at its top).
pub fn conns_section(c: &crate::conns::ConnBench, date: Option<&str>) -> String {
    let mut m = String::new();
    let measured = date
        .map(|d| format!("Measured {d}, on its own (`--only-conns`). "))
        .unwrap_or_default();
    let ports = match c.port_range {
        Some((lo, hi)) => { let n = hi as u32 - lo as u32 + 1; format!("The clients' namespaces use an ephemeral range of {n} ports ({lo}–{hi}, `net.ipv4.ip_local_port_range`), so that a port comes back within a fraction of a second, as it does at the default range for any client opening more than about 120 connections a second to one server (`connect()` takes the ports of one parity first, 14 116 of the default 28 232, and conntrack keeps a TIME_WAIT 120 s); before the first round every port has had a connection ({} per path through the kernel, 8 at a time).", 2 * n) }
        None => "The clients' namespaces keep the kernel's default ephemeral range, so whether a port comes back while its previous connection is still in conntrack depends on how many connections the run made to that destination before.".to_string(),
    };
    let hooks = c
        .hooks
        .iter()
        .map(|(d, h)| format!("{d} {h}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(m, "<!-- conns -->\n## Request-shaped connections: short TCP connections through the plain route, SNAT and a floating IP\n\n{measured}The NAT seed (the gateway 192.168.1.10 with SNAT, fully random ports as Neutron sets it; vm3's floating IP 192.168.1.20; the outside host 203.0.113.5), every device at kernel defaults. Many short TCP connections, an HTTP-like client and server in the benchmark itself: the client connects from a port the kernel chooses, sends a GET of 100 bytes, the server (80 threads per listener, on port 8080 in vm3 and on the outside host) answers {} bytes and closes first, the client reads to EOF and closes. The client keeps no TIME_WAIT, so its ports come back while the router's conntrack still holds their previous connection (TIME_WAIT, 120 s), as for every busy client. {ports} Paths: vm1 → vm3 (routed, no NAT), vm1 → the outside host (SNAT), the outside host → 192.168.1.20 (DNAT to vm3). Concurrency 1 or 64: that many client threads, each making connection after connection. Each run: {:.1} s of warm-up, then {:.1} s timed; connections per second count the connections completed (whole response, EOF) in the timed window; the other figures count the connections that ended after the warm-up (a connection still under way at the window's end is waited for: it is in them, not in the rate): latency connect to EOF (p50 and p99 of each run, then the median over rounds with min–max), *stalled* when it took over 1 s, *failed* when it erred or timed out (3 s to connect, 3 s per read or write), counted, never stopping the run; totals over the rounds. Two modes take turns in every round, which one goes first alternating: the kernel alone (the router's programs detached and the daemon stopped, as in the NAT section; NAT by nftables and conntrack) and this router applied as Neutron gives it (hooks `auto`: {hooks}); on the NAT paths a third, this router with learning from handshakes off (the router namespace's `nf_conntrack_tcp_be_liberal` set to 0 for those runs, which makes the daemon turn learning off: what learning is worth, in the same rounds), the three modes' order turning. {} round(s).\n", crate::conns::RESPONSE_BYTES, c.warmup, c.secs, c.rounds);
    let _ = writeln!(m, "| path | concurrency | kernel (conn/s) | this router (conn/s) | router ÷ kernel | per round | without learning (conn/s) | without learning ÷ kernel | kernel p50 / p99 (ms) | router p50 / p99 (ms) | stalled / failed of counted: kernel | this router | SYNs refused by the server's TIME_WAIT / resent by clients: kernel | this router | fast path per connection: forwarded, translated (share of packets received) |\n|---|---:|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let lat = |x: &crate::conns::Side| {
        if x.has_latency {
            format!("{} / {}", x.p50_ms.fmt(2), x.p99_ms.fmt(2))
        } else {
            "none completed".into()
        }
    };
    for f in &c.figures {
        let per_round = f
            .ratios
            .iter()
            .map(|r| {
                if r.is_finite() {
                    format!("{r:.2}")
                } else {
                    "n/a".into()
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let side =
            |x: &crate::conns::Side| format!("{} / {} of {}", x.stalled, x.failed, x.counted);
        let tcp = |x: &crate::conns::Side| format!("{} / {}", x.paws_tw, x.syn_retrans);
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}, {:.1} ({:.1} %) |",
            f.path.name(),
            f.concurrency,
            f.kernel.conn_s.fmt(0),
            f.router.conn_s.fmt(0),
            f.ratio.fmt(2),
            per_round,
            f.no_learn
                .as_ref()
                .map_or("—".to_string(), |(s, _)| s.conn_s.fmt(0)),
            f.no_learn
                .as_ref()
                .map_or("—".to_string(), |(_, r)| r.fmt(2)),
            lat(&f.kernel),
            lat(&f.router),
            side(&f.kernel),
            side(&f.router),
            tcp(&f.kernel),
            tcp(&f.router),
            f.fwd_per_conn,
            f.translated_per_conn,
            f.fwd_share * 100.0
        );
    }
    let _ = writeln!(m, "\nThe fast path's columns come from its own counters (`router-ctl stats`), read before and after each of this router's runs (warm-up included) and divided by the connections made: packets it forwarded and packets it translated (source or destination) per connection, and the share of the packets the router's devices received that it forwarded. A connection is about ten packets. The TCP columns are the kernel's counters (TcpExtPAWSTimewait in the server's namespace, TcpExtTCPSynRetrans in the clients'), over whole runs. The servers' namespaces keep no TIME_WAIT (`net.ipv4.tcp_max_tw_buckets=0`, a setting of the server hosts, not of the router or of any device): with fully random SNAT ports and one client address, a new connection otherwise often lands on a gateway port whose previous connection, from another client port, the server still holds in TIME_WAIT; this kernel gives every connection its own timestamp offset, so the new SYN's timestamp is as often older as newer than the one the TIME_WAIT remembers, an older one is refused (PAWS), and the client sends its SYN again a second later, with or without this router: in a first run with the servers' TIME_WAIT kept (2026-12-05), the kernel alone made 22–688 connections a second through SNAT at concurrency 1, against 8 000–9 000 through the floating IP. The router's conntrack keeps every closed connection in TIME_WAIT all the same (120 s), so client ports come back onto entries conntrack replaces.");
    if !c.prog_ns.is_empty() {
        let per = c
            .prog_ns
            .iter()
            .map(|(p, c, ns)| format!("{}, concurrency {c}: {ns:.0} ns", p.name()))
            .collect::<Vec<_>>()
            .join("; ");
        let _ = writeln!(m, "\nWhat the tc program costs a packet, in a run of its own after the rounds (BPF statistics on, which add two clock reads to every run): {per}. A program that returns at once costs 76–82 ns a packet measured so, and with it in place of the router's (the hooks attached, the daemon running; 2026-12-05, 5 rounds) the ratios were 1.01 (SNAT, concurrency 1 and 64) and 1.01 (floating IP, 64): what separates the NAT rows from 1.0 is the program's own work on the packets it hands to the kernel (reading a dozen cache lines of maps and its own code, cold between two packets of a short connection), not the hook or the daemon. That work went from 310–340 to about 225 ns a packet on 2026-12-05 (one cache line for a flow's count, none for FIN and RST, no payload pulled into an skb's head); the NAT rows did not move measurably with it. Since 2026-12-06 the NAT rows' figure also holds the work of learning flows from their handshakes (three records and two checked slots per connection) and of forwarding and translating the segments their learned flows carry (about four of ten; the routed rows, whose segments are all forwarded, show what forwarding alone costs).");
    }
    let _ = writeln!(m, "<!-- /conns -->");
    m
}

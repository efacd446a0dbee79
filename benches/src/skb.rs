//! Traffic as clouds send it, through the kernel router and through this router's hooks in the
//! same run: bulk TCP from sockets with default offloads (iperf3), and small UDP frames from an
//! AF_PACKET sender, skbs rather than XDP frames, with the router's CPU cost per packet.
//!
//! The seed topology is plugged as Neutron plugs it, at kernel defaults (GRO off on the
//! instances' veths, checksum and segmentation offloads on); `apply` chooses the hooks (tc on
//! veths). The data path is switched between runs by attaching or detaching the router's own
//! programs on both `qr-` devices.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context as _, Result};
use router_ctl::{kernel::link_in, state};
use tests::{
    frame::{checksum, ethernet, Ipv4},
    sh, sh_out,
    topo::{in_ns, Seed},
};

use crate::stats::{summarize, Summary};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// No program on the `qr-` devices: the kernel forwards (Neutron's way).
    Kernel,
    /// The router at tcx ingress (what `auto` picks on veths).
    Tc,
    /// The router forced to XDP on both devices.
    Xdp,
}

impl Path {
    pub fn name(&self) -> &'static str {
        match self {
            Path::Kernel => "kernel",
            Path::Tc => "tc",
            Path::Xdp => "xdp",
        }
    }
}

/// Puts `path` on both `qr-` devices of the seed: the router's programs detached for the
/// kernel, otherwise the router applied with `hook = "tc"` or `"xdp"` on both ports (so a
/// forced XDP runs exactly as an operator would get it, checksum verification included).
fn set_path(s: &mut Seed, path: Path) -> Result<()> {
    if path == Path::Kernel {
        for d in [s.ids.dev_a(), s.ids.dev_b()] {
            let _ = std::fs::remove_file(state::link_pin(&s.ids.router_id, &d));
            let _ = std::fs::remove_file(state::tc_link_pin(&s.ids.router_id, &d));
        }
        return Ok(());
    }
    let text = [&s.ids.port_a, &s.ids.port_b]
        .iter()
        .fold(s.ids.config(""), |t, p| {
            t.replace(
                &format!("port_id = \"{p}\"\n"),
                &format!("port_id = \"{p}\"\nhook = \"{}\"\n", path.name()),
            )
        });
    s.apply(&text);
    let want = path.name();
    let hooks = s.hooks();
    anyhow::ensure!(
        hooks.iter().all(|(_, h)| h == want),
        "asked for {want}, got {hooks:?}"
    );
    // Let the daemon see the devices' new XDP state before traffic starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Packets the fast path forwarded on qr-a (its own counters) since `before`.
fn forwarded_a(s: &Seed) -> u64 {
    s.forwarded(&s.ids.dev_a())
}

/// Seconds per iperf3 run.
const SECONDS: u32 = 5;

pub struct Tcp {
    pub streams: usize,
    pub kernel: Summary,
    /// This router as `auto` sets it up (tc on veths).
    pub router: Summary,
    pub ratio: Summary,
    /// This router forced to XDP on both devices, and ÷ the kernel.
    pub xdp: Summary,
    pub xdp_ratio: Summary,
}

/// Bulk TCP vm1 → vm3 with iperf3 (default offloads everywhere), `streams` parallel streams,
/// for `secs` seconds; Gbit/s received.
fn iperf(s: &Seed, streams: usize, secs: u32) -> Result<f64> {
    let out = sh_out(&format!(
        "ip netns exec {} iperf3 -c 172.16.101.3 -t {secs} -P {streams} -J",
        s.vm1
    ));
    if !out.status.success() {
        bail!(
            "iperf3 failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON without end.sum_received")
}

/// (a) TCP bulk, the kernel router against this router as `auto` sets it up, interleaved.
pub fn tcp(runs: usize) -> Result<Vec<Tcp>> {
    let mut s = Seed::up("");
    // Programs come and go between runs: the fixture's counter check does not apply.
    s.check_counters = false;
    s.prime_neighbours();
    let hooks = s.hooks();
    anyhow::ensure!(
        hooks.iter().all(|(_, h)| h == "tc"),
        "auto chose {hooks:?} on the seed's veths"
    );
    sh(&format!(
        "ip netns exec {} iperf3 -s -D -I /tmp/router-bench-iperf3.pid",
        s.vm3
    ));
    std::thread::sleep(Duration::from_millis(300));
    let res = (|| {
        let mut out = Vec::new();
        for streams in [1usize, 8] {
            let (mut k, mut r, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            let (mut x, mut xratio) = (Vec::new(), Vec::new());
            for round in 0..runs {
                // Kernel and tc take turns going first, so neither always runs on a machine
                // warmed (or tired) by the other.
                let mut gk = 0.0;
                let mut gr = 0.0;
                for first in [round % 2 == 0, round % 2 == 1] {
                    if first {
                        set_path(&mut s, Path::Kernel)?;
                        let f0 = s.forw_datagrams();
                        gk = iperf(&s, streams, SECONDS)?;
                        anyhow::ensure!(s.forw_datagrams() > f0, "the kernel did not forward");
                    } else {
                        set_path(&mut s, Path::Tc)?;
                        let (p0, f0) = (forwarded_a(&s), s.forw_datagrams());
                        gr = iperf(&s, streams, SECONDS)?;
                        let carried = forwarded_a(&s) - p0;
                        let by_kernel = s.forw_datagrams() - f0;
                        anyhow::ensure!(carried > 0, "the fast path carried nothing");
                        eprintln!(
                            "tcp: {streams} stream(s), round {}: this router {gr:.2} Gbit/s ({carried} packets in the fast path, {by_kernel} forwarded by the kernel)",
                            round + 1
                        );
                    }
                }
                eprintln!(
                    "tcp: {streams} stream(s), round {}: kernel {gk:.2} Gbit/s",
                    round + 1
                );
                set_path(&mut s, Path::Xdp)?;
                let p0 = forwarded_a(&s);
                let gx = iperf(&s, streams, SECONDS)?;
                eprintln!(
                    "tcp: {streams} stream(s), round {}: forced XDP {gx:.2} Gbit/s ({} packets in the fast path)",
                    round + 1,
                    forwarded_a(&s) - p0
                );
                k.push(gk);
                r.push(gr);
                ratio.push(gr / gk);
                x.push(gx);
                xratio.push(gx / gk);
            }
            out.push(Tcp {
                streams,
                kernel: summarize(&k),
                router: summarize(&r),
                ratio: summarize(&ratio),
                xdp: summarize(&x),
                xdp_ratio: summarize(&xratio),
            });
        }
        Ok(out)
    })();
    let _ = sh_out("kill $(cat /tmp/router-bench-iperf3.pid) 2>/dev/null");
    let _ = set_path(&mut s, Path::Tc);
    res
}

pub struct Small {
    /// Whether vm3's veth has GRO on (needed for XDP redirects into qr-b).
    pub tuned: bool,
    /// Router-side CPU ns per packet, per path.
    pub ns: Vec<(Path, Summary)>,
    /// Per round, kernel ÷ path.
    pub gain: Vec<(Path, Summary)>,
    /// Fraction of the sent frames counted at vm3, per path (lowest of the runs).
    pub delivered: Vec<(Path, f64)>,
    /// Frames the fast path forwarded ÷ frames sent, per path (median).
    pub fast: Vec<(Path, f64)>,
    /// Sender and veth crossing alone (frames dropped at qr-a's ingress), ns per packet.
    pub baseline: Summary,
}

pub const FRAMES: u64 = 600_000;

/// CPU time (ns) the scheduler has charged to a task: its `schedstat`'s first field.
fn runtime_ns(schedstat: &str) -> u64 {
    std::fs::read_to_string(schedstat)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time of the kernel's softirq threads (ksoftirqd/N), where softirq work goes when it is
/// not run on the way out of a system call.
fn ksoftirqd_ns() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            total += runtime_ns(&p.join("schedstat").to_string_lossy());
        }
    }
    total
}

/// A 64-byte UDP frame vm1 → vm3 with real IPv4 and UDP checksums.
fn frame(s: &Seed) -> Result<Vec<u8>> {
    let qr_a = link_in(Some(&s.ns()), &s.ids.dev_a())?
        .context("qr-a")?
        .mac()?;
    let vm1 = link_in(Some(&s.vm1), &s.ids.tap_a())?
        .context("vm1's veth")?
        .mac()?;
    let (src, dst) = (
        Ipv4Addr::new(172, 16, 100, 3),
        Ipv4Addr::new(172, 16, 101, 3),
    );
    let payload = [0x5au8; 18];
    let mut l4 = Vec::new();
    l4.extend_from_slice(&40000u16.to_be_bytes());
    l4.extend_from_slice(&9u16.to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(&payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let c = checksum(&pseudo);
    l4[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    let mut l3 = Ipv4::udp(src.octets(), dst.octets(), 64).header(l4.len());
    l3.extend_from_slice(&l4);
    let f = ethernet(qr_a, vm1, 0x0800, &l3);
    anyhow::ensure!(f.len() >= 60, "frame of {} bytes", f.len());
    Ok(f)
}

/// Sends `FRAMES` copies of `frame` from vm1's veth through an AF_PACKET socket as fast as it
/// can, in batches of 32 (sendmmsg), from a thread pinned to CPU 0 (unpaced: a paced sender's
/// sleeps and wake-ups cost more, and more unevenly, than the work measured). Returns the CPU ns spent meanwhile
/// by the sending thread (which, on veths, also runs the receive side of every device the frame
/// crosses: the softirq work raised by a transmit runs on the way out of the system call) and by
/// the softirq threads (the work deferred to them), as the scheduler accounts it.
fn send(s: &Seed, frame: Vec<u8>) -> Result<u64> {
    let ifindex = link_in(Some(&s.vm1), &s.ids.tap_a())?
        .context("vm1's veth")?
        .index;
    let k0 = ksoftirqd_ns();
    let sender = in_ns(&s.vm1, move || -> Result<u64> {
        crate::host::pin_to_cpu(0)?;
        let t0 = runtime_ns("/proc/thread-self/schedstat");
        // SAFETY: plain socket calls on a descriptor this function owns.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            if libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e).context("binding the AF_PACKET socket");
            }
            const BATCH: usize = 32;
            let mut iov = libc::iovec {
                iov_base: frame.as_ptr() as *mut _,
                iov_len: frame.len(),
            };
            let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|_| {
                    let mut m: libc::mmsghdr = std::mem::zeroed();
                    m.msg_hdr.msg_iov = &mut iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let mut sent = 0u64;
            while sent < FRAMES {
                let n = libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0);
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        continue;
                    }
                    libc::close(fd);
                    return Err(e).context("sendmmsg");
                }
                sent += n as u64;
            }
            libc::close(fd);
        }
        Ok(runtime_ns("/proc/thread-self/schedstat") - t0)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    std::thread::sleep(Duration::from_millis(100));
    Ok(sender + ksoftirqd_ns().saturating_sub(k0))
}

pub(crate) fn nft_sink(ns: &str, table: &str, dev: &str, action: &str) {
    sh(&format!(
        "ip netns exec {ns} nft add table netdev {table} && \
         ip netns exec {ns} nft add chain netdev {table} in '{{ type filter hook ingress device \"{dev}\" priority 0; }}' && \
         ip netns exec {ns} nft add rule netdev {table} in udp dport 9 counter {action}"
    ));
}

pub(crate) fn nft_count(ns: &str, table: &str) -> Result<u64> {
    let out = sh(&format!(
        "ip netns exec {ns} nft -j list table netdev {table}"
    ));
    let v: serde_json::Value = serde_json::from_str(&out)?;
    for item in v["nftables"].as_array().context("nft JSON")? {
        if let Some(c) = item.get("rule").and_then(|r| r["expr"].as_array()) {
            for e in c {
                if let Some(p) = e.get("counter").and_then(|c| c["packets"].as_u64()) {
                    return Ok(p);
                }
            }
        }
    }
    bail!("no counter in nftables table {table}")
}

/// (b) Small UDP frames from an skb-borne sender: the CPU the router's side costs per packet,
/// for the kernel, tc and XDP. Everything runs on CPU 0 (the sender is pinned there and the
/// veths deliver on the sending CPU); the busy time of the machine per packet, minus that of
/// the same sender whose frames are dropped at qr-a's ingress, is what routing them costs.
pub fn small_udp(runs: usize) -> Result<Vec<Small>> {
    let mut s = Seed::up("");
    s.check_counters = false;
    s.prime_neighbours();
    let f = frame(&s)?;
    nft_sink(&s.vm3, "sink", &s.ids.tap_b(), "drop");
    let paths = [Path::Kernel, Path::Tc, Path::Xdp];
    let mut out = Vec::new();
    for tuned in [false, true] {
        sh(&format!(
            "ip netns exec {} ethtool -K {} gro {} >/dev/null",
            s.vm3,
            s.ids.tap_b(),
            if tuned { "on" } else { "off" }
        ));
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut gain: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut delivered = vec![1.0f64; paths.len()];
        let mut fast: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut base = Vec::new();
        for round in 0..runs {
            // The floor: the sender and the veth crossing, frames dropped at qr-a's ingress.
            set_path(&mut s, Path::Kernel)?;
            nft_sink(&s.ns(), "floor", &s.ids.dev_a(), "drop");
            let b = send(&s, f.clone())? as f64 / FRAMES as f64;
            let dropped = nft_count(&s.ns(), "floor")?;
            sh(&format!(
                "ip netns exec {} nft delete table netdev floor",
                s.ns()
            ));
            anyhow::ensure!(
                dropped >= FRAMES * 99 / 100,
                "floor: {dropped} frames reached qr-a"
            );
            base.push(b);
            let mut this = [0f64; 3];
            for (k, p) in paths.iter().enumerate() {
                set_path(&mut s, *p)?;
                let (c0, f0) = (nft_count(&s.vm3, "sink")?, forwarded_a(&s));
                let busy = send(&s, f.clone())? as f64 / FRAMES as f64;
                let got = nft_count(&s.vm3, "sink")? - c0;
                let by_fast = forwarded_a(&s) - f0;
                let router = busy - b;
                eprintln!(
                    "small UDP{}: round {}, {}: {router:.0} ns per packet on the router's side ({busy:.0} in all, floor {b:.0}); {got} of {FRAMES} delivered, {by_fast} by the fast path",
                    if tuned { ", vm3's GRO on" } else { "" },
                    round + 1,
                    p.name()
                );
                ns[k].push(router);
                this[k] = router;
                delivered[k] = delivered[k].min(got as f64 / FRAMES as f64);
                fast[k].push(by_fast as f64 / FRAMES as f64);
            }
            for k in 0..paths.len() {
                gain[k].push(this[0] / this[k]);
            }
        }
        out.push(Small {
            tuned,
            ns: paths
                .iter()
                .zip(&ns)
                .map(|(p, v)| (*p, summarize(v)))
                .collect(),
            gain: paths
                .iter()
                .zip(&gain)
                .map(|(p, v)| (*p, summarize(v)))
                .collect(),
            delivered: paths.iter().copied().zip(delivered).collect(),
            fast: paths
                .iter()
                .zip(&fast)
                .map(|(p, v)| (*p, summarize(v).median))
                .collect(),
            baseline: summarize(&base),
        });
    }
    sh(&format!(
        "ip netns exec {} ethtool -K {} gro off >/dev/null",
        s.vm3,
        s.ids.tap_b()
    ));
    set_path(&mut s, Path::Tc)?;
    Ok(out)
}

//! What the pages of a table cost a cold lookup (issue 14, part 4): one read of a random 1 KiB
//! group in a BPF array (vmalloc'd, 4 KiB pages: a large table misses the TLB) against the same
//! read in a hash map without preallocation (elements kmalloc'd, in the kernel's direct map,
//! which huge pages cover), each with 1 group and with many, cold (each frame runs once).

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, HashMap},
    programs::Xdp,
    EbpfLoader,
};
use router_ctl::datapath;

use crate::stats::{summarize, Rng, Summary};

pub struct Probe {
    pub groups: u32,
    pub array_ns: Summary,
    pub hash_ns: Summary,
}

fn load(groups: u32) -> Result<aya::Ebpf> {
    let mut l = EbpfLoader::new();
    l.map_max_entries("PROBE_ARRAY", groups)
        .map_max_entries("PROBE_HASH", groups);
    let mut ebpf = l.load(datapath::BENCH_PROGRAM)?;
    for p in ["bench_probe_array", "bench_probe_hash", "bench_wire"] {
        let x: &mut Xdp = ebpf.program_mut(p).context("probe program")?.try_into()?;
        x.load()?;
    }
    let mut conf: Array<_, u32> = Array::try_from(ebpf.map_mut("GEN_CONF").context("GEN_CONF")?)?;
    conf.set(0, groups, 0)?;
    let mut a: Array<_, [u32; 256]> =
        Array::try_from(ebpf.map_mut("PROBE_ARRAY").context("PROBE_ARRAY")?)?;
    for g in 0..groups {
        a.set(g, [1u32; 256], 0)?;
    }
    let mut h: HashMap<_, u32, [u32; 256]> =
        HashMap::try_from(ebpf.map_mut("PROBE_HASH").context("PROBE_HASH")?)?;
    for g in 0..groups {
        h.insert(g, [1u32; 256], 0)?;
    }
    Ok(ebpf)
}

pub fn run(sizes: &[u32], runs: usize) -> Result<Vec<Probe>> {
    let mut rng = Rng::new(7);
    let frames: Vec<Vec<u8>> = (0..crate::pkt::DESTINATIONS)
        .map(|_| {
            let mut f = vec![0u8; 64];
            f[30..34].copy_from_slice(&(rng.next() as u32).to_be_bytes());
            f
        })
        .collect();
    let mut out = Vec::new();
    for &n in sizes {
        let mut ebpf = load(n)?;
        let (mut arr, mut hash) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let prog = |e: &mut aya::Ebpf, p: &str| -> Result<*mut Xdp> {
                let x: &mut Xdp = e.program_mut(p).context("probe program")?.try_into()?;
                Ok(x as *mut Xdp)
            };
            // SAFETY: three distinct programs of one object, used one at a time.
            let (w, a, h) = unsafe {
                (
                    &*prog(&mut ebpf, "bench_wire")?,
                    &*prog(&mut ebpf, "bench_probe_array")?,
                    &*prog(&mut ebpf, "bench_probe_hash")?,
                )
            };
            let f = crate::pkt::run_frames(w, &frames, 2, 1)?;
            arr.push(crate::pkt::run_frames(a, &frames, 1, 1)? - f);
            hash.push(crate::pkt::run_frames(h, &frames, 1, 1)? - f);
        }
        let p = Probe {
            groups: n,
            array_ns: summarize(&arr),
            hash_ns: summarize(&hash),
        };
        eprintln!(
            "probe: {} groups ({} MiB): array {} ns, hash {} ns",
            n,
            n / 1024,
            p.array_ns.fmt(1),
            p.hash_ns.fmt(1)
        );
        out.push(p);
    }
    Ok(out)
}

//! The kernel side of a router: loading the embedded programs, pinning their maps (checked
//! against `router_common::maps::ALL`), attaching them. The maps' contents are written by
//! `values` (devices, addresses, NAT configuration, counters), `neigh` (neighbours) and
//! `crate::fib::writer` (the route table).

mod neigh;
mod values;

pub use neigh::*;
pub use values::*;

use std::{os::fd::AsFd as _, path::Path};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Map, MapData},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions, TcAttachType},
        xdp::XdpLink,
        SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use router_common::{map_names, maps, PROGRAM_NAME, TC_PROGRAM_NAME};

use crate::{fib::Capacity, state};

/// The XDP program, built by build.rs and embedded in this binary.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router"));

/// Benchmark helpers (traffic generator, wire floor); see `router-ebpf/src/bench.rs`.
pub static BENCH_PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

/// The maps pinned per router (see `router_common::maps::ALL`).
fn pinned_maps() -> impl Iterator<Item = &'static maps::Spec> {
    maps::ALL.iter().filter(|m| m.keep != maps::Keep::Private)
}

/// A loader for the embedded object. The programs use no CO-RE relocations, so the kernel's
/// BTF is not read (parsing /sys/kernel/btf/vmlinux costs several milliseconds per load).
fn loader<'a>() -> EbpfLoader<'a> {
    let mut l = EbpfLoader::new();
    l.btf(None);
    l
}

/// Loads the program with private, unpinned maps (packet tests and benchmarks).
pub fn load_unpinned() -> Result<Ebpf> {
    load_unpinned_sized(Capacity::default())
}

/// Sizes the route table's maps.
fn size_maps(loader: &mut EbpfLoader<'_>, cap: Capacity) {
    loader.map_max_entries(map_names::FIB_L2, cap.l2_groups);
    loader.map_max_entries(map_names::FIB_L3, cap.l3_groups);
    loader.map_max_entries(map_names::NEXTHOPS, cap.nexthops);
    loader.map_max_entries(map_names::FIB6_NODES, cap.v6_nodes);
    loader.map_max_entries(map_names::FIB6_BLOCKS, cap.v6_blocks);
    loader.map_max_entries(map_names::FIB6_PFX, cap.v6_prefixes);
}

/// As `load_unpinned`, with route table maps of the given capacity.
pub fn load_unpinned_sized(cap: Capacity) -> Result<Ebpf> {
    let mut loader = loader();
    size_maps(&mut loader, cap);
    let mut ebpf = loader.load(PROGRAM).context("loading the eBPF object")?;
    load_programs(&mut ebpf, Programs::BOTH)?;
    Ok(ebpf)
}

/// A short fingerprint of the embedded eBPF object: a router whose attached programs were
/// loaded from an object with the same fingerprint needs no reload.
pub fn program_fingerprint() -> String {
    static FINGERPRINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FINGERPRINT
        .get_or_init(|| {
            // FNV-1a, 64 bits: enough to tell builds apart.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in PROGRAM {
                h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
            }
            format!("{h:016x}")
        })
        .clone()
}

/// Which of the two programs to hand to the verifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Programs {
    pub xdp: bool,
    pub tc: bool,
}

impl Programs {
    pub const BOTH: Programs = Programs {
        xdp: true,
        tc: true,
    };
    const NONE: Programs = Programs {
        xdp: false,
        tc: false,
    };
}

/// Loads the programs `progs` for `router_id`, reusing the maps pinned for it, or creating and
/// pinning them (with room for `cap`; maps that exist keep their size). Only the programs a
/// router's devices use are loaded: the verifier's time is most of a router's apply.
pub fn load_pinned(router_id: &str, cap: Capacity, progs: Programs) -> Result<Ebpf> {
    open_pinned_object(router_id, cap, progs)
}

/// The router's pinned maps, through the object, without handing the programs to the
/// verifier: for map updates when the attached programs stay.
pub fn open_maps(router_id: &str) -> Result<Ebpf> {
    open_pinned_object(router_id, Capacity::default(), Programs::NONE)
}

/// As `open_maps`, creating missing maps with room for `cap`.
pub fn open_pinned_object_sized(router_id: &str, cap: Capacity) -> Result<Ebpf> {
    open_pinned_object(router_id, cap, Programs::NONE)
}

fn open_pinned_object(router_id: &str, cap: Capacity, progs: Programs) -> Result<Ebpf> {
    let dir = state::bpf_dir(router_id);
    std::fs::create_dir_all(dir.join("links"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    check_pinned_layout(router_id, progs != Programs::NONE)?;
    // One loader per process (its creation parses the kernel's BTF): every use below sets the
    // size and pin path of every map it pins, so nothing carries over from a previous router.
    static PINNED: std::sync::Mutex<Option<EbpfLoader<'static>>> = std::sync::Mutex::new(None);
    let mut guard = PINNED.lock().unwrap_or_else(|e| e.into_inner());
    let loader = guard.get_or_insert_with(loader);
    size_maps(loader, cap);
    for m in pinned_maps() {
        loader.map_pin_path(m.name, dir.join(m.name));
    }
    let mut ebpf = loader.load(PROGRAM).with_context(|| {
        format!(
            "loading the eBPF object for router {router_id} (maps in {})",
            dir.display()
        )
    })?;
    drop(guard);
    load_programs(&mut ebpf, progs)?;
    Ok(ebpf)
}

/// The pinned maps of `router_id` whose layout (type, key and value size, flags, fixed
/// capacity) differs from this build's: (map, what differs).
fn layout_differences(router_id: &str) -> Result<Vec<(&'static maps::Spec, String)>> {
    let mut out = Vec::new();
    for m in pinned_maps() {
        let p = state::map_pin(router_id, m.name);
        if !p.exists() {
            continue;
        }
        let info = MapData::from_pin(&p)
            .with_context(|| format!("cannot open {}", p.display()))?
            .info()?;
        let mut diff = Vec::new();
        let ty = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        if ty != m.kind as u32 {
            diff.push(format!("type {ty}, not {:?}", m.kind));
        }
        if info.key_size() != m.key_size || info.value_size() != m.value_size {
            diff.push(format!(
                "{}-byte keys and {}-byte values, not {} and {}",
                info.key_size(),
                info.value_size(),
                m.key_size,
                m.value_size
            ));
        }
        // Flags the kernel adds by itself (e.g. for ring buffers) are not the build's choice.
        let flags = info.map_flags() & (maps::NO_PREALLOC | maps::MMAPABLE);
        if flags != m.flags {
            diff.push(format!("flags {flags:#x}, not {:#x}", m.flags));
        }
        if let maps::Capacity::Fixed(n) = m.capacity {
            if info.max_entries() != n {
                diff.push(format!("{} entries, not {n}", info.max_entries()));
            }
        }
        if !diff.is_empty() {
            out.push((m, diff.join(", ")));
        }
    }
    Ok(out)
}

/// True when every pinned map of `router_id` has this build's layout (the attached programs
/// can stay).
pub fn layout_current(router_id: &str) -> Result<bool> {
    Ok(layout_differences(router_id)?.is_empty())
}

/// Refuses maps pinned by a build whose map layout differs from this one's: the program would
/// read them wrongly (the verifier refuses it at best). A renewable map (counters, per-flow
/// counts) with another layout is unpinned when `renew` (the programs are being loaded again:
/// the loader creates it anew, and the running program keeps the old one until the new one
/// replaces it); without `renew` it is refused like the others.
fn check_pinned_layout(router_id: &str, renew: bool) -> Result<()> {
    for (m, diff) in layout_differences(router_id)? {
        let p = state::map_pin(router_id, m.name);
        if renew && m.keep == maps::Keep::Renewable && !cfg!(mutant = "no_map_renewal") {
            tracing::info!(router = router_id, map = m.name, differs = %diff, "a map pinned by an earlier build has another layout; replacing it with an empty one (the running program keeps the old one until the new program takes over)");
            std::fs::remove_file(&p).with_context(|| format!("cannot unpin {}", p.display()))?;
            continue;
        }
        anyhow::bail!(
            "map {} pinned at {} has {diff}: the router was set up by an incompatible build{}; run `router-ctl destroy {router_id}` and apply again",
            m.name,
            p.display(),
            if m.keep == maps::Keep::Renewable {
                " (`router-ctl apply` replaces this map)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Hands the programs `progs` (the XDP one, the tc one) to the kernel's verifier.
fn load_programs(ebpf: &mut Ebpf, progs: Programs) -> Result<()> {
    if progs.xdp {
        program(ebpf)?
            .load()
            .context("the kernel refused the XDP program")?;
    }
    if progs.tc {
        tc_program(ebpf)?
            .load()
            .context("the kernel refused the tc program")?;
    }
    Ok(())
}

/// The XDP program.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program '{PROGRAM_NAME}' missing from the object"))?
        .try_into()
        .context("program is not XDP")
}

/// The tc program: the same per-packet logic on skbs, at tcx ingress.
pub fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(TC_PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program '{TC_PROGRAM_NAME}' missing from the object"))?
        .try_into()
        .context("program is not a tc classifier")
}

/// Attaches the tc program at `device`'s tcx ingress (after any program there) through a
/// bpf_link pinned at `pin`; when a link is pinned there already, the program is swapped in
/// atomically, as for XDP. Must run inside the device's namespace.
pub fn attach_tc(ebpf: &mut Ebpf, device: &str, pin: &Path) -> Result<()> {
    let prog = tc_program(ebpf)?;
    let mut id = None;
    if pin.exists() {
        let pinned = PinnedLink::from_pin(pin)
            .with_context(|| format!("cannot open pinned link {}", pin.display()))?;
        let fd: FdLink = pinned.into();
        match SchedClassifierLink::try_from(fd) {
            Ok(link) => match prog.attach_to_link(link) {
                Ok(link_id) => id = Some(link_id),
                Err(e) => {
                    tracing::warn!(device, error = %e, "pinned tc link is stale; attaching anew")
                }
            },
            Err(_) => tracing::warn!(device, "pinned object is not a tcx link; attaching anew"),
        }
        std::fs::remove_file(pin).with_context(|| format!("cannot remove {}", pin.display()))?;
    }
    let id = match id {
        Some(id) => id,
        None => {
            // A new tcx link waits for an RCU grace period with the RTNL held.
            let _rtnl = crate::kernel::rtnl_section();
            prog.attach_with_options(
                device,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("cannot attach the tc program at tcx ingress of {device} (needs Linux 6.6 or later)"))?
        }
    };
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .context("tc link is not a bpf_link")?;
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    link.pin(pin)
        .with_context(|| format!("cannot pin the tc link at {}", pin.display()))?;
    Ok(())
}

/// The id of the program a pinned link at `pin` runs (None when nothing is pinned there).
pub fn linked_program(pin: &Path) -> Option<u32> {
    let link: FdLink = PinnedLink::from_pin(pin).ok()?.into();
    link.info().ok().map(|i| i.program_id())
}

/// Detaches whatever program a pinned link at `pin` holds (the pin is its last reference).
pub fn detach(pin: &Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", pin.display()))
        }
        _ => Ok(()),
    }
}

/// Attaches the XDP program to `ifindex` in native mode through a bpf_link pinned at `pin`; when
/// a link is pinned there already, the program is swapped in atomically (bpf_link_update), so
/// the device never goes without a program. Must run inside the device's namespace.
pub fn attach_xdp(ebpf: &mut Ebpf, ifindex: u32, device: &str, pin: &Path) -> Result<()> {
    let prog = program(ebpf)?;
    let mut id = None;
    if pin.exists() {
        let pinned = PinnedLink::from_pin(pin)
            .with_context(|| format!("cannot open pinned link {}", pin.display()))?;
        let fd: FdLink = pinned.into();
        // A link whose device went away is defunct: updating it fails, and we attach anew.
        match XdpLink::try_from(fd) {
            Ok(link) => match prog.attach_to_link(link) {
                Ok(link_id) => id = Some(link_id),
                Err(e) => {
                    tracing::warn!(device, error = %e, "pinned link is stale; attaching anew")
                }
            },
            Err(_) => tracing::warn!(device, "pinned object is not an XDP link; attaching anew"),
        }
        std::fs::remove_file(pin).with_context(|| format!("cannot remove {}", pin.display()))?;
    }
    let id = match id {
        Some(id) => id,
        None => prog.attach_to_if_index(ifindex, XdpMode::Driver).with_context(|| {
            format!("cannot attach XDP in native mode to {device} (ifindex {ifindex}); is another XDP program attached? `ip link show {device}` tells")
        })?,
    };
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .context("XDP link is not a bpf_link")?;
    link.pin(pin)
        .with_context(|| format!("cannot pin the XDP link at {}", pin.display()))?;
    Ok(())
}

/// Opens a map pinned for `router_id`.
pub fn open_pinned(router_id: &str, name: &str) -> Result<MapData> {
    let p = state::map_pin(router_id, name);
    MapData::from_pin(&p)
        .with_context(|| format!("cannot open map {} of router {router_id}", p.display()))
}

pub(crate) fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

pub(crate) fn clone_map(map: &MapData) -> Result<MapData> {
    let fd = map.fd().as_fd().try_clone_to_owned()?;
    Ok(MapData::from_fd(fd)?)
}

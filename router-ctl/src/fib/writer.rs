//! The route table's writer: a router's routes as map entries, written into its maps in
//! place or through the table kept in memory (`Live`), with a process-wide cache of large
//! tables.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData},
    Ebpf,
};
use router_common::{fib, map_names, route_kind, Iface, NhGroup, Route};

use crate::{
    config::IpNet,
    datapath::clone_map,
    fib::{self as fib_build, Capacity, Fib, Live, Table6},
};

/// The routes of one router: connected subnets, extra routes through a nexthop, and the
/// router's own addresses (for the kernel), both families. `ifaces` gives each egress device's
/// MAC and MTU.
pub fn route_entries(
    ifaces: &[(u32, Iface)],
    connected: &[(IpNet, u32)],
    gateways: &[(IpNet, u32, IpAddr)],
    locals: &[IpAddr],
) -> Vec<(IpNet, Route)> {
    let via = |ifindex: u32, kind: u32, nexthop: [u8; 16]| {
        let dev = ifaces.iter().find(|(i, _)| *i == ifindex).map(|(_, d)| *d);
        Route {
            ifindex,
            kind,
            nexthop,
            src_mac: dev.map(|d| d.mac).unwrap_or([0; 6]),
            _pad: [0; 2],
            // A device we do not know forwards nothing: every frame is larger than 0.
            mtu: dev.map(|d| d.mtu).unwrap_or(0),
            tx_port: dev.map(|d| d.slot).unwrap_or(router_common::MAX_IFACES),
        }
    };
    let mut v = Vec::new();
    for (net, ifindex) in connected {
        v.push((*net, via(*ifindex, route_kind::CONNECTED, [0; 16])));
    }
    for (net, ifindex, nh) in gateways {
        v.push((*net, via(*ifindex, route_kind::GATEWAY, nexthop_bytes(*nh))));
    }
    for ip in locals {
        v.push((
            IpNet::host(*ip),
            Route {
                kind: route_kind::LOCAL,
                ..Route::NONE
            },
        ));
    }
    v
}

/// `entries` with the namespace's routes the fast path does not carry, `kernel`, as routes for
/// the kernel: each replaces an entry of the same prefix, but a router's own address's.
pub fn with_kernel_routes(entries: Vec<(IpNet, Route)>, kernel: &[IpNet]) -> Vec<(IpNet, Route)> {
    let mut v: Vec<(IpNet, Route)> = entries
        .into_iter()
        .filter(|(n, r)| r.kind == route_kind::LOCAL || !kernel.contains(n))
        .collect();
    for net in kernel {
        if !v.iter().any(|(n, _)| n == net) {
            v.push((
                *net,
                Route {
                    kind: route_kind::KERNEL,
                    ..Route::NONE
                },
            ));
        }
    }
    v
}

/// `Route::nexthop` of an address: IPv4 in the first 4 bytes.
pub fn nexthop_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address in `Route::nexthop`, read as the family of the route it belongs to.
pub fn nexthop_addr(r: &Route, ipv6: bool) -> IpAddr {
    if ipv6 {
        IpAddr::V6(Ipv6Addr::from(r.nexthop))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            r.nexthop[0],
            r.nexthop[1],
            r.nexthop[2],
            r.nexthop[3],
        ))
    }
}

/// A shared, writable mapping of a BPF_F_MMAPABLE array (of groups, `[u32; 256]` elements, or
/// of other values made of u32 words), seen as one flat array of u32 entries. Only the part up to the highest entry used is mapped (it
/// grows in steps of 1 MiB): the mapped pages of a map count in the process's RSS, and groups are
/// numbered lowest first, so what is mapped follows the table, not the capacity.
struct Mapped {
    ptr: *mut u32,
    /// Entries in the map.
    len: usize,
    /// Entries mapped now.
    mapped: usize,
    fd: std::os::fd::OwnedFd,
    name: String,
}

impl Mapped {
    fn new(ebpf: &Ebpf, name: &str, words: u32) -> Result<Mapped> {
        let Some(Map::Array(data)) = ebpf.map(name) else {
            anyhow::bail!("map {name} is not an array");
        };
        let info = data.info()?;
        anyhow::ensure!(
            info.value_size() == words * 4,
            "map {name} does not hold values of {words} 32-bit words"
        );
        Ok(Mapped {
            ptr: std::ptr::null_mut(),
            len: info.max_entries() as usize * words as usize,
            mapped: 0,
            fd: data.fd().as_fd().try_clone_to_owned()?,
            name: name.to_string(),
        })
    }

    /// Maps at least the first `end` entries.
    fn reach(&mut self, end: usize) -> Result<()> {
        let end = end.min(self.len);
        if end <= self.mapped {
            return Ok(());
        }
        let step = 1 << 18; // entries: 1 MiB
        let want = end.div_ceil(step).saturating_mul(step).min(self.len);
        // The old mapping goes first: both at once would count twice in the RSS.
        if !self.ptr.is_null() {
            // SAFETY: unmaps the previous mapping, of `mapped` entries.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.mapped * 4) };
            self.ptr = std::ptr::null_mut();
            self.mapped = 0;
        }
        // SAFETY: maps the array's first `want` entries, which the kernel allows for
        // BPF_F_MMAPABLE arrays.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                want * 4,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot mmap map {}", self.name));
        }
        self.ptr = ptr as *mut u32;
        self.mapped = want;
        Ok(())
    }

    /// The array up to the highest of `groups`, with only `groups` read from the map (the rest
    /// left zero): what the table does not reference is never read, so the cost and the memory
    /// follow the table, not the capacity.
    fn read_groups(&mut self, groups: impl IntoIterator<Item = u32>) -> Result<Vec<u32>> {
        let groups: Vec<u32> = groups.into_iter().collect();
        self.read_elements(fib::GROUP_SIZE as usize, &groups)
    }

    /// Writes `new`'s groups `in_new`: a group the old table used too gets only its changed
    /// entries, a group it did not use is written whole (its stale content is not known).
    /// Each entry is one aligned 32-bit store.
    fn update_groups(
        &mut self,
        old: &[u32],
        new: &[u32],
        in_old: &BTreeSet<u32>,
        in_new: &BTreeSet<u32>,
    ) -> Result<()> {
        let n = fib::GROUP_SIZE as usize;
        self.reach(in_new.last().map_or(0, |g| (*g as usize + 1) * n))?;
        #[cfg(any(mutant = "break_before_make", mutant = "write_over_break_before_make"))]
        for g in in_new {
            // The fault: every entry that changes is emptied before it is written.
            let start = *g as usize * fib::GROUP_SIZE as usize;
            for i in start..(start + fib::GROUP_SIZE as usize).min(self.mapped) {
                if old.get(i).is_some_and(|o| *o != new[i]) {
                    // SAFETY: as below.
                    unsafe { std::ptr::write_volatile(self.ptr.add(i), 0) };
                }
            }
        }
        for g in in_new {
            let start = *g as usize * fib::GROUP_SIZE as usize;
            let fresh = !in_old.contains(g);
            for i in start..(start + fib::GROUP_SIZE as usize).min(self.mapped) {
                if fresh || old[i] != new[i] {
                    // SAFETY: i < mapped; aligned u32 in a shared mapping.
                    unsafe { std::ptr::write_volatile(self.ptr.add(i), new[i]) };
                }
            }
        }
        Ok(())
    }

    /// Writes entries (index, value) given by `each`, one aligned 32-bit store each.
    fn write_each(
        &mut self,
        end: usize,
        each: impl FnOnce(&mut dyn FnMut(u32, u32)),
    ) -> Result<()> {
        anyhow::ensure!(
            end <= self.len,
            "route table entry out of map {}",
            self.name
        );
        self.reach(end)?;
        let (ptr, mapped) = (self.ptr, self.mapped);
        each(&mut |i, v| {
            if (i as usize) < mapped {
                // SAFETY: i < mapped; an aligned u32 in the shared mapping.
                unsafe { std::ptr::write_volatile(ptr.add(i as usize), v) };
            }
        });
        Ok(())
    }

    /// Elements `at` (each `words` u32 words) read from the map, in a vector up to the highest
    /// of them (the rest zero).
    fn read_elements(&mut self, words: usize, at: &[u32]) -> Result<Vec<u32>> {
        let end = at
            .iter()
            .map(|i| (*i as usize + 1) * words)
            .max()
            .unwrap_or(0)
            .min(self.len);
        self.reach(end)?;
        let mut v = vec![0u32; end];
        for i in at {
            for w in *i as usize * words..((*i as usize + 1) * words).min(end) {
                // SAFETY: w < end <= mapped.
                v[w] = unsafe { std::ptr::read_volatile(self.ptr.add(w)) };
            }
        }
        Ok(v)
    }

    /// Words `start..end` (within the map) read from the map.
    fn read_range(&mut self, start: usize, end: usize) -> Result<Vec<u32>> {
        let end = end.min(self.len);
        self.reach(end)?;
        Ok((start.min(end)..end)
            // SAFETY: w < end <= mapped.
            .map(|w| unsafe { std::ptr::read_volatile(self.ptr.add(w)) })
            .collect())
    }

    /// Writes element `i` of `words.len()` words, one aligned 32-bit store each.
    fn write_element(&mut self, i: u32, words: &[u32]) -> Result<()> {
        let start = i as usize * words.len();
        let end = start + words.len();
        self.write_each(end, |f| {
            for (k, w) in words.iter().enumerate() {
                f((start + k) as u32, *w);
            }
        })
    }
}

fn block_words(b: &router_common::Block6) -> [u32; 24] {
    // SAFETY: Block6 is repr(C), 96 bytes of integers without padding (its layout test).
    unsafe { std::mem::transmute::<router_common::Block6, [u32; 24]>(*b) }
}

fn pfx_words(p: &router_common::Pfx6) -> [u32; 4] {
    // SAFETY: Pfx6 is repr(C), 16 bytes of integers without padding (its layout test).
    unsafe { std::mem::transmute::<router_common::Pfx6, [u32; 4]>(*p) }
}

const BLOCK_WORDS: usize = 24;
const PFX_WORDS: usize = 4;

// SAFETY: the mapping belongs to this value alone and lives until it is dropped; the kernel's
// shared memory may be written from any thread.
unsafe impl Send for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: unmaps what `reach` mapped.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.mapped * 4) };
        }
    }
}

/// Open handles on a router's route table maps. Mapping the big arrays costs time in proportion
/// to their size, so a caller making many updates keeps one of these.
pub struct RouteTable {
    l1: Mapped,
    l2: Mapped,
    l3: Mapped,
    l1_6: Mapped,
    nodes6: Mapped,
    blocks6: Mapped,
    pfx6: Mapped,
    nexthops: Array<MapData, Route>,
    groups: Array<MapData, NhGroup>,
    fib6: LpmTrie<MapData, [u8; 16], u32>,
    /// The descriptors `nexthops` and `groups` hold, for batched reads.
    nexthops_fd: std::os::fd::RawFd,
    groups_fd: std::os::fd::RawFd,
    /// The table as this process last wrote it (see `fib::Live`).
    live: Option<Live>,
    /// Prefixes up to /64 found in the LPM trie by the last read: left by a build that kept
    /// every IPv6 prefix there; removed once the range table holds them.
    legacy6: Vec<(u8, u128)>,
}

/// Every value of the array map `fd` (`n` entries of `T`) in one BPF_MAP_LOOKUP_BATCH call
/// instead of one system call per entry.
fn read_array<T: aya::Pod>(fd: std::os::fd::RawFd, n: u32) -> Result<Vec<T>> {
    #[repr(C)]
    #[derive(Default)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut keys = vec![0u32; n as usize];
    let mut values: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(n as usize);
    let mut next = 0u32;
    let mut attr = Batch {
        out_batch: &mut next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: n,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `count` keys and values into buffers of that size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut Batch,
            std::mem::size_of::<Batch>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // ENOENT: the batch reached the array's end, which is how reading it whole ends.
    if rc != 0 && err.raw_os_error() != Some(libc::ENOENT) {
        return Err(err).context("cannot read an array map in one batch");
    }
    anyhow::ensure!(
        attr.count == n,
        "batched read returned {} of {n} entries",
        attr.count
    );
    // SAFETY: the kernel filled all n values (checked above).
    unsafe { values.set_len(n as usize) };
    Ok(values
        .into_iter()
        .map(|v| unsafe { v.assume_init() })
        .collect())
}

impl RouteTable {
    pub fn open(ebpf: &mut Ebpf) -> Result<RouteTable> {
        let array = |name: &str| match ebpf.map(name) {
            Some(Map::Array(d)) => clone_map(d),
            _ => Err(anyhow!("map {name} is not an array")),
        };
        let nh = array(map_names::NEXTHOPS)?;
        let groups = array(map_names::NH_GROUPS)?;
        let (nexthops_fd, groups_fd) =
            (nh.fd().as_fd().as_raw_fd(), groups.fd().as_fd().as_raw_fd());
        let fib6 = match ebpf.map(map_names::FIB6) {
            Some(Map::LpmTrie(d)) => clone_map(d)?,
            _ => anyhow::bail!("map {} is not an LPM trie", map_names::FIB6),
        };
        Ok(RouteTable {
            fib6: LpmTrie::try_from(Map::LpmTrie(fib6))?,
            l1: Mapped::new(ebpf, map_names::FIB_L1, fib::GROUP_SIZE)?,
            l2: Mapped::new(ebpf, map_names::FIB_L2, fib::GROUP_SIZE)?,
            l3: Mapped::new(ebpf, map_names::FIB_L3, fib::GROUP_SIZE)?,
            l1_6: Mapped::new(ebpf, map_names::FIB6_L1, fib::GROUP_SIZE)?,
            nodes6: Mapped::new(ebpf, map_names::FIB6_NODES, fib::GROUP_SIZE)?,
            blocks6: Mapped::new(ebpf, map_names::FIB6_BLOCKS, BLOCK_WORDS as u32)?,
            pfx6: Mapped::new(ebpf, map_names::FIB6_PFX, PFX_WORDS as u32)?,
            nexthops: Array::try_from(Map::Array(nh))?,
            groups: Array::try_from(Map::Array(groups))?,
            nexthops_fd,
            groups_fd,
            live: None,
            legacy6: Vec::new(),
        })
    }

    /// The route table as it is in the maps (groups the table does not use read as zero).
    pub fn read(&mut self) -> Result<Fib> {
        let l1 = self
            .l1
            .read_groups(0..self.l1.len as u32 / fib::GROUP_SIZE)?;
        let used2 = fib_build::groups_used(&l1);
        let l2 = self.l2.read_groups(used2.iter().copied())?;
        let l3 = self
            .l3
            .read_groups(fib_build::groups_used_in(&l2, &used2))?;
        let nexthops = read_array::<Route>(self.nexthops_fd, self.nexthops.len())?
            .into_iter()
            .map(|r| (r != Route::NONE).then_some(r))
            .collect();
        let groups = read_array::<NhGroup>(self.groups_fd, self.groups.len())?
            .into_iter()
            .map(|g| (g.count != 0).then_some(g))
            .collect();
        let mut v6 = std::collections::BTreeMap::new();
        self.legacy6.clear();
        for kv in self.fib6.iter() {
            let (k, v) = kv.context("reading the IPv6 route table")?;
            let key = (k.prefix_len() as u8, u128::from_be_bytes(k.data()));
            if key.0 <= 64 {
                self.legacy6.push(key);
            }
            v6.insert(key, v);
        }
        let t6 = self.read6()?;
        for p in t6.pfx.iter().filter(|p| p.len_1 != 0) {
            v6.insert(((p.len_1 - 1) as u8, (p.addr as u128) << 64), p.val);
        }
        Ok(Fib {
            l1,
            l2,
            l3,
            nexthops,
            groups,
            v6,
            t6,
        })
    }

    /// The IPv6 table up to /64 as the maps hold it: the first level, the groups and blocks it
    /// references (the others read as zero), the prefix elements.
    fn read6(&mut self) -> Result<Table6> {
        use router_common::fib6::{BLOCK, INDEX, LONG, NODE};
        let l1 = self
            .l1_6
            .read_groups(0..self.l1_6.len as u32 / fib::GROUP_SIZE)?;
        let mut nodes: Vec<u32> = Vec::new();
        let mut node_ids: BTreeSet<u32> = BTreeSet::new();
        let mut block_ids: Vec<u32> = Vec::new();
        let mut level: Vec<u32> = l1.clone();
        loop {
            let mut next: BTreeSet<u32> = BTreeSet::new();
            for e in &level {
                if e & NODE != 0 && !node_ids.contains(&(e & INDEX)) {
                    next.insert(e & INDEX);
                } else if e & BLOCK != 0 {
                    block_ids.push(e & INDEX);
                }
            }
            if next.is_empty() {
                break;
            }
            node_ids.extend(next.iter().copied());
            nodes = self.nodes6.read_groups(node_ids.iter().copied())?;
            let n = fib::GROUP_SIZE as usize;
            level = next
                .iter()
                .flat_map(|g| {
                    nodes[*g as usize * n..(*g as usize + 1) * n]
                        .iter()
                        .copied()
                })
                .collect();
        }
        // The blocks the levels point to, then the blocks of lower 64 bits their ranges point to.
        let mut blocks: Vec<router_common::Block6> = Vec::new();
        for _ in 0..2 {
            block_ids.sort_unstable();
            block_ids.dedup();
            let words = self.blocks6.read_elements(BLOCK_WORDS, &block_ids)?;
            blocks = words
                .chunks_exact(BLOCK_WORDS)
                .map(|c| {
                    let mut a = [0u32; BLOCK_WORDS];
                    a.copy_from_slice(c);
                    // SAFETY: as in block_words, the other way.
                    unsafe { std::mem::transmute::<[u32; 24], router_common::Block6>(a) }
                })
                .collect();
            let low: Vec<u32> = block_ids
                .iter()
                .flat_map(|b| blocks[*b as usize].vals)
                .filter(|v| v & (BLOCK | LONG) == BLOCK | LONG)
                .map(|v| v & INDEX)
                .collect();
            block_ids.extend(low);
        }
        // The elements in use come first: read in steps of 64 Ki until an unused one.
        let mut pfx: Vec<router_common::Pfx6> = Vec::new();
        let step = 65536 * PFX_WORDS;
        let mut at = 0;
        'read: while at < self.pfx6.len {
            let words = self.pfx6.read_range(at, at + step)?;
            for c in words.chunks_exact(PFX_WORDS) {
                // SAFETY: as in pfx_words, the other way.
                let p = unsafe {
                    std::mem::transmute::<[u32; 4], router_common::Pfx6>([c[0], c[1], c[2], c[3]])
                };
                if p.len_1 == 0 {
                    break 'read;
                }
                pfx.push(p);
            }
            at += step;
        }
        Ok(Table6 {
            l1,
            nodes,
            blocks,
            pfx,
        })
    }

    /// Replaces the route table, make-before-break (see `fib`). With the table kept in memory
    /// from an earlier call, only the prefixes that differ are changed; otherwise the maps are
    /// read back and the table built over them, new nexthops first, then the levels from the
    /// leaves up.
    pub fn set(&mut self, entries: &[(IpNet, Route)]) -> Result<()> {
        if let Some(live) = self.live.as_mut() {
            let r = live.replace_all(entries);
            if r.is_err() {
                self.live = None;
            }
            r?;
            return self.commit();
        }
        let old = self.read()?;
        let cap = Capacity {
            l2_groups: (self.l2.len / fib::GROUP_SIZE as usize) as u32,
            l3_groups: (self.l3.len / fib::GROUP_SIZE as usize) as u32,
            nexthops: self.nexthops.len(),
            v6_nodes: (self.nodes6.len / fib::GROUP_SIZE as usize) as u32,
            v6_blocks: (self.blocks6.len / BLOCK_WORDS) as u32,
            v6_prefixes: (self.pfx6.len / PFX_WORDS) as u32,
        };
        let mut live = Live::build(entries, &old, cap)?;
        self.write_over(&old, &live.fib, live.table6())?;
        live.forget_writes();
        self.live = Some(live);
        if self.live.as_ref().is_some_and(Live::has_quarantine) {
            // Nexthops the old table used and this one does not: cleared once no lookup can
            // hold them, so that a process reading the maps back finds them free.
            fib_build::wait_for_lookups();
            if let Some(l) = self.live.as_mut() {
                l.release_quarantine();
            }
            self.commit()?;
        }
        Ok(())
    }

    /// Changes single prefixes of the table `set` wrote: `Some(routes)` adds or replaces the
    /// prefix, `None` removes it. All or nothing: on an error nothing is written (and the table
    /// is read back from the maps next time).
    pub fn change(&mut self, changes: &[(IpNet, Option<Vec<Route>>)]) -> Result<()> {
        let Some(live) = self.live.as_mut() else {
            anyhow::bail!("the route table was not set in this process yet");
        };
        let r = changes.iter().try_for_each(|(net, rs)| match rs {
            Some(rs) => live.set(*net, rs),
            None => live.remove(*net).map(|_| ()),
        });
        if r.is_err() {
            self.live = None;
        }
        r?;
        self.commit()
    }

    /// The table as this process last wrote it, if it keeps one.
    pub fn live(&self) -> Option<&Live> {
        self.live.as_ref()
    }

    pub fn live_mut(&mut self) -> Option<&mut Live> {
        self.live.as_mut()
    }

    /// Writes what the table in memory changed since the last commit, leaves first.
    fn commit(&mut self) -> Result<()> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let w = match live.take_writes() {
            Ok(w) => w,
            Err(e) => {
                self.live = None;
                return Err(e);
            }
        };
        for (i, r) in &w.nexthops {
            self.nexthops
                .set(*i, r, 0)
                .context("cannot write a nexthop")?;
        }
        for (i, g) in &w.groups {
            self.groups
                .set(*i, g, 0)
                .context("cannot write an ECMP group")?;
        }
        let key6 = |(len, a): &(u8, u128)| Key::new(*len as u32, a.to_be_bytes());
        for (k, v) in &w.v6_set {
            if cfg!(mutant = "break_before_make") {
                let _ = self.fib6.remove(&key6(k));
            }
            self.fib6
                .insert(&key6(k), v, 0)
                .context("cannot write an IPv6 route")?;
        }
        let fib = &live.fib;
        #[cfg(mutant = "break_before_make")]
        for (level, entries, values) in [
            (&mut self.l3, &w.l3, &fib.l3),
            (&mut self.l2, &w.l2, &fib.l2),
            (&mut self.l1, &w.l1, &fib.l1),
        ] {
            level.write_each(entries.end(), |f| entries.each(values, &mut |i, _| f(i, 0)))?;
        }
        #[cfg(not(mutant = "wrong_level_order"))]
        let order = [
            (&mut self.l3, &w.l3, &fib.l3),
            (&mut self.l2, &w.l2, &fib.l2),
            (&mut self.l1, &w.l1, &fib.l1),
        ];
        #[cfg(mutant = "wrong_level_order")]
        let order = [
            (&mut self.l1, &w.l1, &fib.l1),
            (&mut self.l2, &w.l2, &fib.l2),
            (&mut self.l3, &w.l3, &fib.l3),
        ];
        for (level, entries, values) in order {
            level.write_each(entries.end(), |f| entries.each(values, f))?;
        }
        // IPv6: fresh blocks and groups whole, then the entries that switch to them.
        let t6 = live.table6();
        let s = &w.six;
        for b in &s.blocks {
            self.blocks6
                .write_element(*b, &block_words(&t6.blocks[*b as usize]))?;
        }
        let n = fib::GROUP_SIZE as usize;
        for g in &s.nodes {
            let g = *g as usize;
            self.nodes6
                .write_element(g as u32, &t6.nodes[g * n..(g + 1) * n])?;
        }
        let end = s.node_entries.last().map_or(0, |i| *i as usize + 1);
        self.nodes6.write_each(end, |f| {
            for i in &s.node_entries {
                f(*i, t6.nodes[*i as usize]);
            }
        })?;
        let end = s.l1.last().map_or(0, |i| *i as usize + 1);
        self.l1_6.write_each(end, |f| {
            for i in &s.l1 {
                f(*i, t6.l1[*i as usize]);
            }
        })?;
        for k in &w.v6_del {
            match self.fib6.remove(&key6(k)) {
                Err(aya::maps::MapError::KeyNotFound) | Ok(()) => {}
                Err(e) => return Err(e).context("cannot remove an IPv6 route"),
            }
        }
        for p in &s.pfx {
            self.pfx6
                .write_element(*p, &pfx_words(&t6.pfx[*p as usize]))?;
        }
        Ok(())
    }

    /// Writes `new` over `old` (the maps' content): new and changed nexthops and groups, then
    /// the levels from the leaves up, then the IPv6 prefixes.
    fn write_over(&mut self, old: &Fib, new: &Fib, new6: &Table6) -> Result<()> {
        for (i, (o, n)) in old.nexthops.iter().zip(new.nexthops.iter()).enumerate() {
            if let Some(r) = n {
                if o.as_ref() != Some(r) {
                    self.nexthops
                        .set(i as u32, r, 0)
                        .context("cannot write a nexthop")?;
                }
            }
        }
        for (i, (o, n)) in old.groups.iter().zip(new.groups.iter()).enumerate() {
            if let Some(g) = n {
                if o.as_ref() != Some(g) {
                    self.groups
                        .set(i as u32, g, 0)
                        .context("cannot write an ECMP group")?;
                }
            }
        }
        let (old2, new2) = (
            fib_build::groups_used(&old.l1),
            fib_build::groups_used(&new.l1),
        );
        let (old3, new3) = (
            fib_build::groups_used_in(&old.l2, &old2),
            fib_build::groups_used_in(&new.l2, &new2),
        );
        self.l3.update_groups(&old.l3, &new.l3, &old3, &new3)?;
        self.l2.update_groups(&old.l2, &new.l2, &old2, &new2)?;
        let all: BTreeSet<u32> = (0..self.l1.len as u32 / fib::GROUP_SIZE).collect();
        let key6 = |(len, a): &(u8, u128)| Key::new(*len as u32, a.to_be_bytes());
        // IPv6 longer than /64 first (nothing points to them before the table below does).
        for (k, v) in new.v6.iter().filter(|(k, _)| k.0 > 64) {
            if old.v6.get(k) != Some(v) {
                if cfg!(mutant = "break_before_make") && old.v6.contains_key(k) {
                    self.fib6.remove(&key6(k))?;
                }
                self.fib6
                    .insert(&key6(k), v, 0)
                    .context("cannot write an IPv6 route")?;
            }
        }
        self.l1.update_groups(&old.l1, &new.l1, &all, &all)?;
        // IPv6 up to /64: blocks not in the old table (a block in both is the same), groups
        // (new ones whole, kept ones entry by entry), the first level.
        let (old_nodes, old_blocks) = old.t6.used();
        let (new_nodes, new_blocks) = new6.used();
        for b in &new_blocks {
            if old_blocks.binary_search(b).is_err()
                || old.t6.blocks.get(*b as usize) != Some(&new6.blocks[*b as usize])
            {
                self.blocks6
                    .write_element(*b, &block_words(&new6.blocks[*b as usize]))?;
            }
        }
        let n = fib::GROUP_SIZE as usize;
        let (old_nodes, new_nodes): (BTreeSet<u32>, BTreeSet<u32>) = (
            old_nodes.into_iter().collect(),
            new_nodes.into_iter().collect(),
        );
        let mut old_flat = old.t6.nodes.clone();
        old_flat.resize(old_flat.len().max(new6.nodes.len()), 0);
        let mut new_flat = new6.nodes.clone();
        new_flat.resize(new_flat.len().max(old_flat.len()).max(n), 0);
        old_flat.resize(new_flat.len(), 0);
        // New groups whole first: only entries of kept groups (which stay where they were)
        // and of the first level point to them.
        let fresh: BTreeSet<u32> = new_nodes.difference(&old_nodes).copied().collect();
        let kept: BTreeSet<u32> = new_nodes.intersection(&old_nodes).copied().collect();
        self.nodes6
            .update_groups(&old_flat, &new_flat, &old_nodes, &fresh)?;
        self.nodes6
            .update_groups(&old_flat, &new_flat, &old_nodes, &kept)?;
        self.l1_6.update_groups(&old.t6.l1, &new6.l1, &all, &all)?;
        for k in old
            .v6
            .keys()
            .filter(|k| k.0 > 64 && !new.v6.contains_key(k))
        {
            self.fib6
                .remove(&key6(k))
                .context("cannot remove an IPv6 route")?;
        }
        for k in std::mem::take(&mut self.legacy6) {
            match self.fib6.remove(&key6(&k)) {
                Err(aya::maps::MapError::KeyNotFound) | Ok(()) => {}
                Err(e) => return Err(e).context("cannot remove an IPv6 route"),
            }
        }
        let end = old.t6.pfx.len().max(new6.pfx.len());
        let none = router_common::Pfx6::default();
        for i in 0..end {
            let (o, n) = (
                old.t6.pfx.get(i).unwrap_or(&none),
                new6.pfx.get(i).unwrap_or(&none),
            );
            if o != n {
                self.pfx6.write_element(i as u32, &pfx_words(n))?;
            }
        }
        Ok(())
    }
}

/// Tables of at least this many prefixes stay in memory between the writes of one process
/// (the daemon, an agent), so that a change costs what it changes and never a read of the maps;
/// smaller ones are read back (a few milliseconds) and cost no memory between writes.
pub const KEEP_FROM_ROUTES: usize = 4096;

/// A router's table as this process last wrote it, with the token it left (see `token_path`).
struct Kept {
    map_id: u32,
    token: String,
    table: RouteTable,
}

static KEPT: std::sync::Mutex<std::collections::BTreeMap<String, Kept>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Every process that writes a router's route table leaves a token of its own here: a table
/// kept in memory is used again only while the token is still the one its process left, that
/// is when no other process (a CLI without a daemon) wrote the maps since.
fn token_path(router_id: &str) -> std::path::PathBuf {
    crate::state::run_dir().join("tables").join(router_id)
}

/// Runs `f` on router `router_id`'s route table: the one kept in memory when it is still what
/// the maps hold, else one opened on `ebpf`'s maps (read back on its first write). The table
/// is kept afterwards when it is large (`KEEP_FROM_ROUTES`) and `f` succeeded.
pub fn with_router_table<T>(
    router_id: &str,
    ebpf: &mut Ebpf,
    f: impl FnOnce(&mut RouteTable) -> Result<T>,
) -> Result<T> {
    let map_id = match ebpf.map(map_names::FIB_L1) {
        Some(Map::Array(d)) => d.info()?.id(),
        _ => anyhow::bail!("map {} is not an array", map_names::FIB_L1),
    };
    let path = token_path(router_id);
    let token = std::fs::read_to_string(&path).unwrap_or_default();
    let kept = {
        let mut all = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        // Tables of routers destroyed by another process (which removed their token) go.
        all.retain(|id, _| id == router_id || token_path(id).exists());
        all.remove(router_id)
    };
    let mut table = match kept {
        Some(k) if k.map_id == map_id && k.token == token && !cfg!(mutant = "stale_table_kept") => {
            k.table
        }
        Some(k) if cfg!(mutant = "stale_table_kept") && k.map_id == map_id => k.table,
        _ => RouteTable::open(ebpf)?,
    };
    let out = f(&mut table)?;
    let token = format!(
        "{}.{}",
        std::process::id(),
        TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, &token).with_context(|| format!("cannot write {}", path.display()))?;
    if table.live().is_some_and(|l| l.len() >= KEEP_FROM_ROUTES) {
        KEPT.lock().unwrap_or_else(|e| e.into_inner()).insert(
            router_id.to_string(),
            Kept {
                map_id,
                token,
                table,
            },
        );
    }
    Ok(out)
}

/// Forgets a router's kept table and token (the router is destroyed).
pub fn forget_router_table(router_id: &str) {
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(router_id);
    let _ = std::fs::remove_file(token_path(router_id));
}

/// Replaces router `router_id`'s route table (see `with_router_table`, `RouteTable::set`).
pub fn set_router_routes(
    router_id: &str,
    ebpf: &mut Ebpf,
    entries: &[(IpNet, Route)],
) -> Result<()> {
    with_router_table(router_id, ebpf, |t| t.set(entries))
}

/// The route table as it is in the maps.
pub fn read_fib(ebpf: &mut Ebpf) -> Result<Fib> {
    RouteTable::open(ebpf)?.read()
}

/// Replaces the route table (see `RouteTable::set`).
pub fn set_routes(ebpf: &mut Ebpf, entries: &[(IpNet, Route)]) -> Result<()> {
    RouteTable::open(ebpf)?.set(entries)
}

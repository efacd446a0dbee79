//! The maps, shared by both hooks (one object, one set of maps per router).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use router_common::{
    fib, fib6, nat, Block6, Iface, IfaceAt, LearnedFlow, NatFlow, NatKey, NatSyn, Neigh, Neigh6Key,
    NeighKey, NhGroup, Pfx6, Route, Stats, IFACE_INDEX_SLOTS, MAX_IFACES, MAX_LOCAL4,
    MAX_NAT_FLOWS, MAX_NEIGHS, STATS_SLOTS,
};

// The route table (see `router_common::fib`); the controller sizes L2, L3 and NEXTHOPS per router.
// Each array element is a group of 256 entries: array elements are 8-byte aligned, so single
// u32 elements would double the memory and break the flat mmap layout.
#[map(name = "FIB_L1")]
pub static FIB_L1: Array<[u32; 256]> =
    Array::with_max_entries(fib::L1_ENTRIES / 256, BPF_F_MMAPABLE);
#[map(name = "FIB_L2")]
pub static FIB_L2: Array<[u32; 256]> =
    Array::with_max_entries(fib::DEFAULT_L2_GROUPS, BPF_F_MMAPABLE);
#[map(name = "FIB_L3")]
pub static FIB_L3: Array<[u32; 256]> =
    Array::with_max_entries(fib::DEFAULT_L3_GROUPS, BPF_F_MMAPABLE);
#[map(name = "NEXTHOPS")]
pub static NEXTHOPS: Array<Route> = Array::with_max_entries(fib::DEFAULT_NEXTHOPS, 0);
#[map(name = "NH_GROUPS")]
pub static NH_GROUPS: Array<NhGroup> = Array::with_max_entries(fib::NH_GROUPS, 0);

// Hash maps the controller updates while the program reads them are not preallocated: a
// preallocated map recycles a replaced or deleted element at once, possibly for another key,
// while a program may still hold it; these are freed after an RCU grace period instead.
#[map(name = "NEIGHS")]
pub static NEIGHS: HashMap<NeighKey, Neigh> =
    HashMap::with_max_entries(MAX_NEIGHS, BPF_F_NO_PREALLOC);

// IPv6 routes up to /64 (see `router_common::fib6`); the controller sizes NODES, BLOCKS and PFX.
#[map(name = "FIB6_L1")]
pub static FIB6_L1: Array<[u32; 256]> =
    Array::with_max_entries(fib::L1_ENTRIES / 256, BPF_F_MMAPABLE);
#[map(name = "FIB6_NODES")]
pub static FIB6_NODES: Array<[u32; 256]> =
    Array::with_max_entries(fib6::DEFAULT_NODES, BPF_F_MMAPABLE);
#[map(name = "FIB6_BLOCKS")]
pub static FIB6_BLOCKS: Array<Block6> =
    Array::with_max_entries(fib6::DEFAULT_BLOCKS, BPF_F_MMAPABLE);
#[map(name = "FIB6_PFX")]
pub static FIB6_PFX: Array<Pfx6> = Array::with_max_entries(fib6::DEFAULT_PREFIXES, BPF_F_MMAPABLE);
// IPv6 prefixes longer than /64: the kernel's LPM trie, value = nexthop index + 1 (the same
// `NEXTHOPS` as IPv4).
#[map(name = "FIB6")]
pub static FIB6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(fib::MAX_ROUTES6, 0);
#[map(name = "NEIGHS6")]
pub static NEIGHS6: HashMap<Neigh6Key, Neigh> =
    HashMap::with_max_entries(MAX_NEIGHS, BPF_F_NO_PREALLOC);

#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_IFACES, BPF_F_NO_PREALLOC);
#[map(name = "IFACE_INDEX")]
pub static IFACE_INDEX: Array<IfaceAt> = Array::with_max_entries(IFACE_INDEX_SLOTS, 0);

/// XDP redirect targets: devices that are up and can take XDP frames (see `map_names`).
#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(MAX_IFACES, 0);
/// tc redirect targets: the ifindex of each device that is up, 0 otherwise.
#[map(name = "TC_PORTS")]
pub static TC_PORTS: Array<u32> = Array::with_max_entries(MAX_IFACES, 0);

// The router's own IPv4 addresses (see `router_common::map_names::LOCAL_BITS`).
#[map(name = "LOCAL_BITS")]
pub static LOCAL_BITS: Array<[u64; 1024]> = Array::with_max_entries(1, 0);
#[map(name = "LOCAL4")]
pub static LOCAL4: HashMap<u32, u32> = HashMap::with_max_entries(MAX_LOCAL4, BPF_F_NO_PREALLOC);

/// NAT flows, filled by the controller from the kernel's conntrack (see `nat`).
#[map(name = "NAT_FLOWS")]
pub static NAT_FLOWS: HashMap<NatKey, NatFlow> =
    HashMap::with_max_entries(MAX_NAT_FLOWS, BPF_F_NO_PREALLOC);
/// Flow generations (see `router_common::nat`).
#[map(name = "NAT_GEN")]
pub static NAT_GEN: Array<u32> = Array::with_max_entries(nat::GEN_SLOTS, 0);
/// Flows without a copy whose packets the kernel path got, and how many (see
/// `router_common::nat`).
#[map(name = "NAT_SEEN")]
pub static NAT_SEEN: Array<u64> = Array::with_max_entries(nat::SEEN_SLOTS, 0);
/// Which keys `NAT_FLOWS` may hold (see `router_common::map_names::NAT_HINT`).
#[map(name = "NAT_HINT")]
pub static NAT_HINT: Array<u64> = Array::with_max_entries(nat::HINT_WORDS, 0);
/// Flows for the controller to copy (`NatKey`s).
#[map(name = "NAT_MISSES")]
pub static NAT_MISSES: RingBuf = RingBuf::with_byte_size(nat::MISSES_BYTES, 0);
/// `router_common::nat_conf` bits.
#[map(name = "NAT_CONF")]
pub static NAT_CONF: Array<u32> = Array::with_max_entries(1, 0);
/// TCP handshakes under way through the kernel's NAT (see `router_common::nat`).
#[map(name = "NAT_SYNS")]
pub static NAT_SYNS: Array<NatSyn> = Array::with_max_entries(nat::SYN_SLOTS, 0);
/// How long a flow learned from its handshake may be used (ns; 0: no learning).
#[map(name = "NAT_LEARN")]
pub static NAT_LEARN: Array<u64> = Array::with_max_entries(1, 0);
/// Flows learned from their handshakes (see `router_common::nat`).
#[map(name = "NAT_LEARNED")]
pub static NAT_LEARNED: Array<LearnedFlow> = Array::with_max_entries(nat::LEARN_SLOTS, 0);
/// A per-CPU scratch entry: learned flows are built and checked there, off the stack.
#[map(name = "NAT_SCRATCH")]
pub static NAT_SCRATCH: PerCpuArray<LearnedFlow> = PerCpuArray::with_max_entries(1, 0);

/// A per-CPU scratch buffer: the XDP program copies TCP/UDP segments there to verify their
/// checksums (see `csum::l4_verifies`).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<[u8; 516]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

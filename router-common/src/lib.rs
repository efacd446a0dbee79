//! Types shared by the XDP program (`router-ebpf`) and the controller (`router-ctl`).
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each one is `#[repr(C)]`,
//! `Copy`, made of fixed-size integers and byte arrays only, and has no implicit padding: a key
//! with undefined padding bytes would miss lookups. `layout` tests at the bottom pin the sizes.
#![cfg_attr(not(test), no_std)]

/// Map names (the kernel keeps at most 15 characters).
pub mod map_names {
    /// The route table, a 16-8-8 multibit trie in three mmap-able arrays (see `fib`).
    pub const FIB_L1: &str = "FIB_L1";
    pub const FIB_L2: &str = "FIB_L2";
    pub const FIB_L3: &str = "FIB_L3";
    /// Array: nexthop index → `Route`.
    pub const NEXTHOPS: &str = "NEXTHOPS";
    /// Array: ECMP group index → `NhGroup`.
    pub const NH_GROUPS: &str = "NH_GROUPS";
    /// Hash: `NeighKey` → `Neigh` (IPv4 neighbours, from the kernel's ARP table).
    pub const NEIGHS: &str = "NEIGHS";
    /// The IPv6 route table for prefixes up to /64 (see `fib6`): a first level of 65 536
    /// entries, groups of 256 entries below it, and blocks of ranges.
    pub const FIB6_L1: &str = "FIB6_L1";
    pub const FIB6_NODES: &str = "FIB6_NODES";
    pub const FIB6_BLOCKS: &str = "FIB6_BLOCKS";
    /// Array of `Pfx6`: the IPv6 prefixes up to /64 themselves, for the controller to read the
    /// table back (the fast path never reads it).
    pub const FIB6_PFX: &str = "FIB6_PFX";
    /// LPM trie: (prefix length, IPv6 address) → nexthop index + 1 into `NEXTHOPS`, for the
    /// IPv6 prefixes longer than /64 only (looked up when `fib6::LONG` says one may match).
    pub const FIB6: &str = "FIB6";
    /// Hash: `Neigh6Key` → `Neigh` (IPv6 neighbours, from the kernel's ND table).
    pub const NEIGHS6: &str = "NEIGHS6";
    /// Hash: ifindex (u32) → `Iface`, one per `qr-` device of the router.
    pub const IFACES: &str = "IFACES";
    /// Array of `IFACE_INDEX_SLOTS` `IfaceAt`, indexed by `ifindex % IFACE_INDEX_SLOTS`: the
    /// same devices as `IFACES`, found without hashing; a device whose index collides with
    /// another's is found in `IFACES`.
    pub const IFACE_INDEX: &str = "IFACE_INDEX";
    /// Devmap (array): `Iface::slot` → ifindex, the targets of XDP redirects: the devices that
    /// are up and can take XDP-redirected frames now (NDO_XMIT).
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Array: `Iface::slot` → ifindex of the device when it is up (0: down), the targets of the
    /// tc program's redirects (an skb needs no NDO_XMIT).
    pub const TC_PORTS: &str = "TC_PORTS";
    /// Array of one `[u64; 1024]`: bit `a & 0xffff` set when some IPv4 address `a` of the router
    /// ends in those 16 bits; a cheap filter before `LOCAL4`.
    pub const LOCAL_BITS: &str = "LOCAL_BITS";
    /// Hash: IPv4 address (host order u32) → 1, the router's own addresses. A packet from one of
    /// them is a martian the kernel drops.
    pub const LOCAL4: &str = "LOCAL4";
    /// NAT flows the kernel's conntrack decided (`NatKey` → `NatFlow`), both directions.
    pub const NAT_FLOWS: &str = "NAT_FLOWS";
    /// One u32 of `nat_conf` bits.
    pub const NAT_CONF: &str = "NAT_CONF";
    /// Array of `nat::GEN_SLOTS` u32: a flow's generation, by `nat::gen_slot` of its original
    /// direction's key. The fast path moves a slot on at every connection start and end it
    /// sees; a `NatFlow` copied under another generation is never used (see `NatFlow::gen`).
    pub const NAT_GEN: &str = "NAT_GEN";
    /// Array of `nat::SEEN_SLOTS` u64: flows (by a fingerprint, in one of two slots each, see
    /// `nat::seen_slots`) the kernel path got packets of for want of a copy, and how many.
    pub const NAT_SEEN: &str = "NAT_SEEN";
    /// Array of `nat::HINT_WORDS` u64: bit `nat::hint_bit` of every key `NAT_FLOWS` holds is
    /// set (the controller sets it before it writes the entry, and clears only bits of keys it
    /// holds no entry for): the program looks a key up only when its bit is set, which spares
    /// the packets that go to the kernel a read of the hash map's buckets.
    pub const NAT_HINT: &str = "NAT_HINT";
    /// Ring buffer of `NatKey`s: flows the kernel path carried `nat::COPY_AFTER` times, for the
    /// controller to copy from conntrack.
    pub const NAT_MISSES: &str = "NAT_MISSES";
    /// Array of `nat::SYN_SLOTS` `NatSyn`, by `nat::syn_slot` of the client's initial sequence
    /// number: TCP handshakes the kernel is translating, followed by the fast path until the
    /// client's first ACK proves the mapping (see `nat`).
    pub const NAT_SYNS: &str = "NAT_SYNS";
    /// One u64: how long (ns) a flow learned from its handshake may be used after its SYN-ACK
    /// went by; 0: no learning. Written by the daemon from the namespace's conntrack timeouts.
    pub const NAT_LEARN: &str = "NAT_LEARN";
    /// Array of `nat::LEARN_SLOTS` `LearnedFlow`, by `nat::learn_slot` of the key: the flows
    /// the program learned, each direction in a slot of its own (a later flow of the same slot
    /// takes it; the kernel carries the one it displaced).
    pub const NAT_LEARNED: &str = "NAT_LEARNED";
    /// Per-CPU array: `Iface::slot` → `Stats`.
    pub const STATS: &str = "STATS";
}

/// Every map of the program, once: what pinning, the controller's layout check and a test
/// against the built object read (`router-ebpf/src/maps.rs` declares them; the test checks
/// that it declares exactly these).
pub mod maps {
    use super::{
        fib, fib6, map_names as n, nat, Block6, Iface, IfaceAt, LearnedFlow, NatFlow, NatKey,
        NatSyn, Neigh, Neigh6Key, NeighKey, NhGroup, Pfx6, Route, Stats, IFACE_INDEX_SLOTS,
        MAX_IFACES, MAX_LOCAL4, MAX_NAT_FLOWS, MAX_NEIGHS, STATS_SLOTS,
    };
    use core::mem::size_of;

    /// The kernel's map types the program uses (`bpf_map_type` values).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u32)]
    pub enum Kind {
        Hash = 1,
        Array = 2,
        PerCpuArray = 6,
        LpmTrie = 11,
        DevMap = 14,
        RingBuf = 27,
    }

    /// `BPF_F_NO_PREALLOC`: hash maps the controller changes while the program reads them
    /// (an element is freed after an RCU grace period, never reused under a reader).
    pub const NO_PREALLOC: u32 = 1;
    /// `BPF_F_MMAPABLE`: the route table's arrays, written through a mapping.
    pub const MMAPABLE: u32 = 1 << 10;

    /// How many entries a map has.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Capacity {
        Fixed(u32),
        /// Chosen by the controller when it creates the router's maps (the route table's
        /// size); the object's value is the default.
        Sized(u32),
    }

    impl Capacity {
        pub const fn entries(self) -> u32 {
            match self {
                Capacity::Fixed(n) | Capacity::Sized(n) => n,
            }
        }
    }

    /// What a map is to an upgrade.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Keep {
        /// Pinned per router; one pinned by a build with another layout refuses the router
        /// (its content is state the program and the controller share).
        Pinned,
        /// Pinned per router, but one pinned with another layout is replaced by an empty one
        /// when the programs are loaded again (counters, per-flow counts): the running
        /// program keeps its map until the new program takes over, so forwarding goes on.
        Renewable,
        /// Private to each loaded object (scratch space), never pinned.
        Private,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Spec {
        pub name: &'static str,
        pub kind: Kind,
        pub key_size: u32,
        pub value_size: u32,
        pub flags: u32,
        pub capacity: Capacity,
        pub keep: Keep,
    }

    const fn spec(
        name: &'static str,
        kind: Kind,
        key_size: usize,
        value_size: usize,
        flags: u32,
        capacity: Capacity,
        keep: Keep,
    ) -> Spec {
        Spec {
            name,
            kind,
            key_size: key_size as u32,
            value_size: value_size as u32,
            flags,
            capacity,
            keep,
        }
    }

    use Capacity::{Fixed, Sized};
    use Keep::{Pinned, Private, Renewable};
    use Kind::*;
    const GROUP: usize = 4 * fib::GROUP_SIZE as usize;

    pub const ALL: [Spec; 30] = [
        spec(
            n::FIB_L1,
            Array,
            4,
            GROUP,
            MMAPABLE,
            Fixed(fib::L1_ENTRIES / fib::GROUP_SIZE),
            Pinned,
        ),
        spec(
            n::FIB_L2,
            Array,
            4,
            GROUP,
            MMAPABLE,
            Sized(fib::DEFAULT_L2_GROUPS),
            Pinned,
        ),
        spec(
            n::FIB_L3,
            Array,
            4,
            GROUP,
            MMAPABLE,
            Sized(fib::DEFAULT_L3_GROUPS),
            Pinned,
        ),
        spec(
            n::NEXTHOPS,
            Array,
            4,
            size_of::<Route>(),
            0,
            Sized(fib::DEFAULT_NEXTHOPS),
            Pinned,
        ),
        spec(
            n::NH_GROUPS,
            Array,
            4,
            size_of::<NhGroup>(),
            0,
            Fixed(fib::NH_GROUPS),
            Pinned,
        ),
        spec(
            n::NEIGHS,
            Hash,
            size_of::<NeighKey>(),
            size_of::<Neigh>(),
            NO_PREALLOC,
            Fixed(MAX_NEIGHS),
            Pinned,
        ),
        spec(
            n::FIB6_L1,
            Array,
            4,
            GROUP,
            MMAPABLE,
            Fixed(fib::L1_ENTRIES / fib::GROUP_SIZE),
            Pinned,
        ),
        spec(
            n::FIB6_NODES,
            Array,
            4,
            GROUP,
            MMAPABLE,
            Sized(fib6::DEFAULT_NODES),
            Pinned,
        ),
        spec(
            n::FIB6_BLOCKS,
            Array,
            4,
            size_of::<Block6>(),
            MMAPABLE,
            Sized(fib6::DEFAULT_BLOCKS),
            Pinned,
        ),
        spec(
            n::FIB6_PFX,
            Array,
            4,
            size_of::<Pfx6>(),
            MMAPABLE,
            Sized(fib6::DEFAULT_PREFIXES),
            Pinned,
        ),
        spec(
            n::FIB6,
            LpmTrie,
            4 + 16,
            4,
            NO_PREALLOC,
            Fixed(fib::MAX_ROUTES6),
            Pinned,
        ),
        spec(
            n::NEIGHS6,
            Hash,
            size_of::<Neigh6Key>(),
            size_of::<Neigh>(),
            NO_PREALLOC,
            Fixed(MAX_NEIGHS),
            Pinned,
        ),
        spec(
            n::IFACES,
            Hash,
            4,
            size_of::<Iface>(),
            NO_PREALLOC,
            Fixed(MAX_IFACES),
            Pinned,
        ),
        spec(
            n::IFACE_INDEX,
            Array,
            4,
            size_of::<IfaceAt>(),
            0,
            Fixed(IFACE_INDEX_SLOTS),
            Pinned,
        ),
        spec(n::TX_PORTS, DevMap, 4, 8, 0, Fixed(MAX_IFACES), Pinned),
        spec(n::TC_PORTS, Array, 4, 4, 0, Fixed(MAX_IFACES), Pinned),
        spec(n::LOCAL_BITS, Array, 4, 8 * 1024, 0, Fixed(1), Pinned),
        spec(
            n::LOCAL4,
            Hash,
            4,
            4,
            NO_PREALLOC,
            Fixed(MAX_LOCAL4),
            Pinned,
        ),
        spec(
            n::NAT_FLOWS,
            Hash,
            size_of::<NatKey>(),
            size_of::<NatFlow>(),
            NO_PREALLOC,
            Fixed(MAX_NAT_FLOWS),
            Pinned,
        ),
        spec(n::NAT_GEN, Array, 4, 4, 0, Fixed(nat::GEN_SLOTS), Pinned),
        spec(
            n::NAT_SEEN,
            Array,
            4,
            8,
            0,
            Fixed(nat::SEEN_SLOTS),
            Renewable,
        ),
        spec(n::NAT_HINT, Array, 4, 8, 0, Fixed(nat::HINT_WORDS), Pinned),
        spec(
            n::NAT_MISSES,
            RingBuf,
            0,
            0,
            0,
            Fixed(nat::MISSES_BYTES),
            Renewable,
        ),
        spec(n::NAT_CONF, Array, 4, 4, 0, Fixed(1), Pinned),
        spec(
            n::NAT_SYNS,
            Array,
            4,
            size_of::<NatSyn>(),
            0,
            Fixed(nat::SYN_SLOTS),
            Renewable,
        ),
        spec(n::NAT_LEARN, Array, 4, 8, 0, Fixed(1), Pinned),
        spec(
            n::NAT_LEARNED,
            Array,
            4,
            size_of::<LearnedFlow>(),
            0,
            Fixed(nat::LEARN_SLOTS),
            Renewable,
        ),
        spec("SCRATCH", PerCpuArray, 4, 516, 0, Fixed(1), Private),
        spec(
            "NAT_SCRATCH",
            PerCpuArray,
            4,
            size_of::<LearnedFlow>(),
            0,
            Fixed(1),
            Private,
        ),
        spec(
            n::STATS,
            PerCpuArray,
            4,
            size_of::<Stats>(),
            0,
            Fixed(STATS_SLOTS),
            Renewable,
        ),
    ];

    /// The map named `name`.
    pub fn spec_of(name: &str) -> Option<&'static Spec> {
        ALL.iter().find(|s| s.name == name)
    }
}

/// Name of the XDP program inside the object.
pub const PROGRAM_NAME: &str = "router";
/// Name of the tc (tcx ingress) program inside the same object: the same per-packet logic on
/// skbs, sharing the maps.
pub const TC_PROGRAM_NAME: &str = "router_tc";

/// Capacity of the maps. A router has at most `MAX_IFACES` interfaces; slot `MAX_IFACES`
/// (the last one of `STATS`) counts frames seen on a device the router does not know.
pub const MAX_IFACES: u32 = 64;
pub const STATS_SLOTS: u32 = MAX_IFACES + 1;
pub const UNKNOWN_IFACE_SLOT: u32 = MAX_IFACES;
pub const MAX_NEIGHS: u32 = 1 << 16;
/// Size of `IFACE_INDEX` (a power of two).
pub const IFACE_INDEX_SLOTS: u32 = 4096;
/// Most IPv4 addresses of a router's namespace the fast path knows as its own.
pub const MAX_LOCAL4: u32 = 4096;

/// The route table: longest-prefix match in at most three dependent array reads, whatever the
/// table's size (a multibit trie with strides 16, 8, 8, in the spirit of DIR-24-8).
///
/// - `FIB_L1[dst >> 16]`, 65 536 entries;
/// - a `GROUP` entry points to 256 entries in `FIB_L2`, indexed by `(dst >> 8) & 0xff`;
/// - a `GROUP` entry there points to 256 entries in `FIB_L3`, indexed by `dst & 0xff`;
/// - any other entry is 0 (no route) or a nexthop index + 1 into `NEXTHOPS`.
///
/// The controller builds it by prefix expansion and writes it through mmap.
pub mod fib {
    pub const GROUP: u32 = 1 << 31;
    pub const L1_ENTRIES: u32 = 1 << 16;
    pub const GROUP_SIZE: u32 = 256;
    /// Capacity a router gets unless told otherwise (set per map at load time).
    pub const DEFAULT_L2_GROUPS: u32 = 1024;
    pub const DEFAULT_L3_GROUPS: u32 = 256;
    pub const DEFAULT_NEXTHOPS: u32 = 1024;
    pub const NH_GROUPS: u32 = 256;
    /// Most nexthops of one ECMP route.
    pub const MAX_PATHS: usize = 8;
    /// Capacity of the LPM trie of IPv6 prefixes longer than /64 (allocated per entry, so room
    /// costs nothing until used).
    pub const MAX_ROUTES6: u32 = 1 << 20;
}

/// The IPv6 route table: longest-prefix match on the upper 64 bits of the destination in at
/// most eight dependent reads (usually three), whatever the size of the table, with prefixes
/// longer than /64 in the kernel's LPM trie.
///
/// The upper 64 bits of the address space are cut into ranges of constant route (each prefix
/// up to /64 starts one and ends one). A chunk of that space, the 2^48 addresses under one of
/// `FIB6_L1`'s 65 536 entries or the 2^(64-b) under an entry of a group at depth b, is held by
/// its entry as:
/// - a value (nexthop index + 1, 0 for no route) when the whole chunk has one route;
/// - `BLOCK | i`: block `i` of `FIB6_BLOCKS`, the chunk's at most `RANGES` ranges as sorted
///   starts and values (three comparisons find the range);
/// - `NODE | g`: group `g` of `FIB6_NODES`, 256 entries for the next 8 bits (the chunk had more
///   ranges than a block holds).
///
/// A value with `LONG` set: some prefix longer than /64 lies in this /64. `LONG | BLOCK | i`:
/// block `i` holds the ranges of the lower 64 bits; `LONG | v`: look the address up in `FIB6`
/// first, and take `v` when it misses.
pub mod fib6 {
    pub const NODE: u32 = 1 << 31;
    pub const BLOCK: u32 = 1 << 30;
    pub const LONG: u32 = 1 << 29;
    /// The index or value bits of an entry.
    pub const INDEX: u32 = LONG - 1;
    /// Ranges in a block.
    pub const RANGES: usize = 8;
    /// Group levels below `FIB6_L1` (bits 16–64, 8 at a time).
    pub const DEPTH: u32 = 6;
    /// Capacity a router gets unless its table needs more (set per map at load time).
    pub const DEFAULT_NODES: u32 = 256;
    pub const DEFAULT_BLOCKS: u32 = 4096;
    pub const DEFAULT_PREFIXES: u32 = 4096;
}

/// A block of `FIB6_BLOCKS`: the ranges of one chunk, `starts` ascending (the first is the
/// chunk's first address; unused ones `u64::MAX`, with the last value repeated).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block6 {
    pub starts: [u64; fib6::RANGES],
    pub vals: [u32; fib6::RANGES],
}

/// An element of `FIB6_PFX`: one IPv6 prefix up to /64 and its value (`len_1` = length + 1;
/// 0: an unused element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pfx6 {
    pub addr: u64,
    pub len_1: u32,
    pub val: u32,
}

/// What a route does with a packet.
pub mod route_kind {
    /// Directly connected subnet: the destination itself is the neighbour.
    pub const CONNECTED: u32 = 0;
    /// Extra route: the neighbour is `Route::nexthop`.
    pub const GATEWAY: u32 = 1;
    /// One of the router's own addresses, or a subnet broadcast: for the kernel.
    pub const LOCAL: u32 = 2;
    /// Several extra routes to one destination (ECMP): `Route::tx_port` is an index into
    /// `NH_GROUPS`; a hash of the flow's 5-tuple picks the member.
    pub const ECMP: u32 = 3;
    /// A route of the namespace the fast path does not carry (blackhole, unreachable or
    /// prohibit; through a device that is not one of the router's ports): for the kernel
    /// (`pass_reason::KERNEL_ROUTE`). Every kind above `LOCAL` but `ECMP` is one.
    pub const KERNEL: u32 = 4;
}

/// An ECMP group: value of the `NH_GROUPS` map. `members[..count]` are `NEXTHOPS` indexes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhGroup {
    pub count: u32,
    pub members: [u32; fib::MAX_PATHS],
}

/// A nexthop: value of the `NEXTHOPS` map. It carries what the fast path needs of the egress
/// device too (its MAC and MTU), so that forwarding costs no second device lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Egress device.
    pub ifindex: u32,
    /// One of `route_kind`.
    pub kind: u32,
    /// Next hop (network byte order): an IPv4 address in the first 4 bytes (the rest zero) for
    /// IPv4 routes, an IPv6 address for IPv6 routes; unused for `CONNECTED` and `LOCAL`.
    pub nexthop: [u8; 16],
    /// The egress device's MAC: the source MAC of forwarded frames.
    pub src_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The egress device's MTU: the largest IPv4 total length (IPv6: header + payload) forwarded.
    pub mtu: u32,
    /// The egress device's index in `TX_PORTS` (its `Iface::slot`).
    pub tx_port: u32,
}

impl Route {
    /// An unused `NEXTHOPS` slot.
    pub const NONE: Route = Route {
        ifindex: 0,
        kind: 0,
        nexthop: [0; 16],
        src_mac: [0; 6],
        _pad: [0; 2],
        mtu: 0,
        tx_port: 0,
    };
}

/// Key of the `NEIGHS` map: a neighbour is an IPv4 address on one device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey {
    pub ifindex: u32,
    pub addr: [u8; 4],
}

/// Key of the `NEIGHS6` map: a neighbour is an IPv6 address on one device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh6Key {
    pub ifindex: u32,
    pub addr: [u8; 16],
}

/// Value of the `NEIGHS` and `NEIGHS6` maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neigh {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Bits of `Iface::flags`.
pub mod iface_flags {
    /// Frames arriving on this device through XDP may carry a partial TCP/UDP checksum (the
    /// device is fed by a local stack's skbs, as a veth or a tap is): the XDP program verifies
    /// TCP and UDP checksums and hands a frame whose checksum does not verify to the kernel,
    /// which keeps the skb's checksum state. Never set for the tc program, which keeps it too.
    pub const VERIFY_L4: u16 = 1;
    /// The external gateway's device (`qg-`): with NAT on, nothing leaves through it
    /// untranslated from the fast path.
    pub const EXTERNAL: u16 = 2;
    /// The namespace's kernel would not forward IPv4 arriving here as the maps say (forwarding
    /// off for this device, reverse-path filtering on, policy routing rules): every IPv4
    /// packet arriving on it goes to the kernel (`pass_reason::KERNEL_POLICY`).
    pub const KERNEL_V4: u16 = 4;
    /// The same for IPv6 (`net.ipv6.conf.all.forwarding` off, IPv6 disabled on the device,
    /// policy routing rules).
    pub const KERNEL_V6: u16 = 8;
}

/// Bits of the `NAT_CONF` value.
pub mod nat_conf {
    /// The router translates (a gateway with SNAT or floating IPs): packets are looked up in
    /// `NAT_FLOWS`, and those routed to an `EXTERNAL` device without a flow go to the kernel.
    pub const ON: u32 = 1;
    /// The namespace holds netfilter rules on the forwarding path that are not this project's
    /// (Neutron's iptables chains, an operator's): the fast path forwards only packets of flows
    /// the controller copied after the kernel had forwarded both directions under the current
    /// rules (every IPv4 packet is looked up in `NAT_FLOWS`, with or without translation);
    /// everything else, IPv6 included, goes to the kernel (`pass_reason::GUARDED`).
    pub const GUARDED: u32 = 2;
}

/// Most NAT flow entries per router (two per connection).
pub const MAX_NAT_FLOWS: u32 = 1 << 18;

/// How NAT flows reach the fast path, and how the fast path stops using them.
///
/// The kernel's conntrack decides every mapping; the fast path holds copies, which it gets
/// two ways.
///
/// **Learned from the handshake** (TCP, in the program, no daemon in the way): every segment
/// of a handshake the kernel translates goes to the kernel, and the program follows it in
/// `NAT_SYNS`, by the client's initial sequence number X, which translation leaves alone. The
/// SYN (key K, seq X) is recorded with its generation; the SYN-ACK that acknowledges X + 1,
/// from the SYN's server or to its client (SNAT leaves the server's side alone, a floating IP
/// the client's), arriving under key R with seq Y, gives the kernel's mapping (R reversed is
/// what K became); the client's first ACK (key K, seq X + 1, ack Y + 1) proves the kernel
/// forwarded that SYN-ACK to the client (nobody else knows Y), and writes both directions
/// (K → R reversed, R → K reversed) under the SYN's generation into `NAT_LEARNED`: one
/// cache-line slot each, by a hash of the key, with a check word over key and translation (a
/// slot read while another processor rewrites it fails the check), nothing allocated; a flow
/// that finds its slot taken displaces the older one, which goes back to the kernel.
/// That ACK still goes to the kernel (conntrack sees the connection established); the
/// segments after it are the fast path's, up to the first FIN or RST. A learned copy is used
/// for `NAT_LEARN` ns after the SYN-ACK went by at most: the daemon sets that below the
/// namespace's SYN_RECV and ESTABLISHED timeouts (the kernel's entry outlives it whether or
/// not that ACK reached conntrack) and below its refresh period (a flow the kernel forgot
/// meanwhile is not carried longer than a copy would be); a longer connection's later
/// segments go to the kernel again and are copied as below. Only with a liberal conntrack
/// (the segments in between did not move its window) and never under foreign rules.
///
/// **Copied on demand**: the fast path counts the packets it hands to the kernel for want of one, per flow
/// (`NAT_SEEN`: a fingerprint of the flow's key in one of the two slots of its 16-byte bucket,
/// one cache line), and reports the flow each time the count reaches `COPY_AFTER` (TCP:
/// `COPY_AFTER_TCP`), counting again from 0 (`NAT_MISSES`). A TCP SYN or SYN-ACK starts the
/// count again (a connection starts: a client reusing its port does not add its connections
/// up; FIN and RST leave the slot alone), and so does a pause longer than
/// `SEEN_IDLE`; at most `SEEN_REPORTS` reports per flow and second, so traffic the controller
/// does not copy (not NAT, say) costs it little however fast it comes. The controller then asks
/// conntrack for that tuple and copies it when it is a NAT flow the fast path may carry. A
/// short connection never gets that far and costs nothing but the kernel's own work.
///
/// A copy is used only while it is valid, which the program checks on every packet:
/// - its generation (`NatFlow::gen`) equals `NAT_GEN[NatFlow::slot]`: the program moves that
///   slot on when a TCP connection starts (a SYN, which may make conntrack replace a closed
///   connection's entry with a new mapping) and when a known flow's FIN or RST goes by (and
///   then deletes both directions' copies). The controller reads the slot before it asks
///   conntrack, so a copy taken before such a packet carries an old generation: no timing
///   of the controller can bring back a mapping the kernel replaced;
/// - the time (`NatFlow::until`) is before the kernel's entry can have expired: the
///   controller sets it from the entry's remaining timeout, and extends it only after giving
///   the kernel's entry a new timeout.
pub mod nat {
    use super::NatKey;

    /// Slots of `NAT_GEN` (a power of two).
    pub const GEN_SLOTS: u32 = 1 << 14;
    /// Slots of `NAT_SEEN` (a power of two).
    pub const SEEN_SLOTS: u32 = 1 << 14;
    /// Packets a UDP or ICMP echo flow passes to the kernel before it is reported (a power of
    /// two).
    pub const COPY_AFTER: u32 = 2;
    /// The same for TCP, between two control segments: a request and its answer stay below.
    pub const COPY_AFTER_TCP: u32 = 8;
    /// Words of `NAT_HINT` (a power of two; 64 bits each).
    pub const HINT_WORDS: u32 = 1 << 10;
    /// Bytes of `NAT_MISSES`.
    pub const MISSES_BYTES: u32 = 16 * 1024;
    /// Slots of `NAT_SYNS` (a power of two): handshakes under way at once (a handshake whose
    /// slot another one takes is not learned; the kernel carries it).
    pub const SYN_SLOTS: u32 = 1 << 12;
    /// Slots of `NAT_LEARNED` (a power of two).
    pub const LEARN_SLOTS: u32 = 1 << 11;
    /// `NatSyn::stage`: the SYN went by.
    pub const SYN_SEEN: u32 = 1;
    /// `NatSyn::stage`: its SYN-ACK went by.
    pub const SYN_ACK_SEEN: u32 = 2;
    /// `NAT_SEEN` entries: the flow's fingerprint in bits 48–63, the time of its last packet
    /// in bits 32–47 (units of 2^`SEEN_TIME_SHIFT` ns of CLOCK_MONOTONIC, about 16.8 ms), the
    /// reports made in the second (2^30 ns) of that packet in bits 8–15, the count in bits 0–7.
    pub const SEEN_TIME_SHIFT: u32 = 24;
    /// A pause longer than this many time units (about a second) starts over.
    pub const SEEN_IDLE: u64 = 64;
    /// Time units per second (2^30 ns): reports are counted per second.
    pub const SEEN_SECOND_SHIFT: u32 = 6;
    /// Reports per flow and second.
    pub const SEEN_REPORTS: u64 = 8;

    /// The key's 32 bits, mixed.
    #[inline(always)]
    fn mix(k: &NatKey) -> u32 {
        let w = |b: [u8; 4]| u32::from_ne_bytes(b);
        w(k.src)
            ^ w(k.dst).rotate_left(11)
            ^ w([k.sport[0], k.sport[1], k.dport[0], k.dport[1]]).rotate_left(22)
            ^ k.proto as u32
    }

    /// The `NAT_GEN` slot of a flow whose original direction has key `k`.
    #[inline(always)]
    pub fn gen_slot(k: &NatKey) -> u32 {
        mix(k).wrapping_mul(0x9e37_79b1) >> (32 - GEN_SLOTS.trailing_zeros())
    }

    /// The `NAT_HINT` word and bit of key `k`.
    #[inline(always)]
    pub fn hint_bit(k: &NatKey) -> (u32, u64) {
        let h = mix(k).wrapping_mul(0x27d4_eb2f) >> (32 - HINT_WORDS.trailing_zeros() - 6);
        (h >> 6, 1 << (h & 63))
    }

    /// The `NAT_LEARNED` slot of key `k`.
    #[inline(always)]
    pub fn learn_slot(k: &NatKey) -> u32 {
        mix(k).wrapping_mul(0xc2b2_ae35) >> (32 - LEARN_SLOTS.trailing_zeros())
    }

    /// The check word of a `LearnedFlow` holding `key` → `f` (`f.used` left out): an entry read
    /// while another processor rewrote it (a mix of two flows) fails it.
    #[inline(always)]
    pub fn learned_check(key: &NatKey, f: &super::NatFlow) -> u32 {
        let w = |b: [u8; 4]| u32::from_ne_bytes(b);
        // One word at a time (no array: the program's stack is small).
        let step = |h: u32, x: u32| (h ^ x).wrapping_mul(0x9e37_79b1).rotate_left(13);
        let mut h = step(0x2545_f491, w(key.src));
        h = step(h, w(key.dst));
        h = step(
            h,
            w([key.sport[0], key.sport[1], key.dport[0], key.dport[1]]),
        );
        h = step(h, key.proto as u32);
        h = step(h, w(f.src));
        h = step(h, w(f.dst));
        h = step(h, w([f.sport[0], f.sport[1], f.dport[0], f.dport[1]]));
        h = step(h, f.flags);
        h = step(h, f.slot);
        h = step(h, f.gen);
        h = step(h, f.until as u32);
        h = step(h, (f.until >> 32) as u32);
        // Never 0: an all-zero slot (never written) fails.
        h | 1
    }

    /// The `NAT_SYNS` slot of a handshake whose client chose initial sequence number `isn`.
    #[inline(always)]
    pub fn syn_slot(isn: u32) -> u32 {
        isn.wrapping_mul(0x9e37_79b1) >> (32 - SYN_SLOTS.trailing_zeros())
    }

    /// The two `NAT_SEEN` slots key `k` may have (the two halves of a 16-byte bucket: one
    /// cache line to read on the kernel's path), and its fingerprint there.
    #[inline(always)]
    pub fn seen_slots(k: &NatKey) -> (u32, u32, u64) {
        let a = mix(k).wrapping_mul(0x85eb_ca6b);
        let i = a >> (32 - SEEN_SLOTS.trailing_zeros());
        (i, i ^ 1, (a & 0xffff) as u64)
    }
}

/// Key of `NAT_FLOWS`: one direction of a flow as its packets arrive at the router, before
/// translation (network byte order). ICMP echo: `sport` is the identifier, `dport` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Bits of `NatFlow::flags`.
pub mod nat_flags {
    /// The source changes (SNAT, a floating IP's outbound side, a reply un-DNATed).
    pub const SRC: u32 = 1;
    /// The destination changes (a floating IP's inbound side, a reply un-SNATed).
    pub const DST: u32 = 2;
}

/// Value of `NAT_FLOWS`: the packet's addresses and ports after translation, as the kernel's
/// conntrack chose them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatFlow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// `nat_flags`.
    pub flags: u32,
    /// The flow's `NAT_GEN` slot (`nat::gen_slot` of its original direction's key), the same
    /// in both directions' entries.
    pub slot: u32,
    /// `NAT_GEN[slot]` when the controller read the flow from conntrack: the entry is valid
    /// while the slot still holds it.
    pub gen: u32,
    /// When the fast path last carried a packet of this direction (CLOCK_MONOTONIC ns,
    /// coarse; updated at most once a second): the controller refreshes the kernel's
    /// timeout of flows in use.
    pub used: u64,
    /// CLOCK_MONOTONIC ns before which the kernel's entry cannot have expired: the entry is
    /// not used from then on.
    pub until: u64,
}

/// Value of `NAT_SYNS`: a TCP handshake the kernel translates, as far as the fast path saw it
/// (see `nat`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatSyn {
    /// The SYN's key, as it arrived.
    pub key: NatKey,
    /// The SYN-ACK's key, as it arrived (from `nat::SYN_ACK_SEEN` on).
    pub reply: NatKey,
    /// The client's initial sequence number (the SYN's).
    pub isn: u32,
    /// The server's (the SYN-ACK's).
    pub reply_isn: u32,
    /// `NAT_GEN` of the SYN's slot once the SYN moved it on.
    pub gen: u32,
    /// 0 (empty or done), `nat::SYN_SEEN` or `nat::SYN_ACK_SEEN`.
    pub stage: u32,
    /// When the SYN-ACK went by (CLOCK_MONOTONIC ns, coarse).
    pub at: u64,
}

/// Value of `NAT_LEARNED`: one direction of a flow the program learned from its handshake.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedFlow {
    pub key: NatKey,
    /// As in `NAT_FLOWS` (`used` stays 0: the daemon refreshes no learned flow).
    pub flow: NatFlow,
    /// `nat::learned_check(key, flow)`.
    pub check: u32,
    pub _pad: u32,
}

/// Value of the `IFACES` map: what the fast path needs to know of a `qr-` device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub mac: [u8; 6],
    /// `iface_flags`.
    pub flags: u16,
    /// The device's MTU.
    pub mtu: u32,
    /// Index into `STATS`.
    pub slot: u32,
}

/// Value of the `IFACE_INDEX` array: a device and its ifindex (0: empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceAt {
    pub ifindex: u32,
    pub iface: Iface,
}

/// Why a frame was handed to the kernel (XDP_PASS). The values index `Stats::pass`; each reason
/// counts both families unless its name says otherwise.
pub mod pass_reason {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, anything else).
    pub const NOT_IP: usize = 0;
    pub const NOT_OUR_MAC: usize = 1;
    /// Broadcast or multicast MAC, or an IP multicast/broadcast destination.
    pub const BCAST_MCAST: usize = 2;
    /// Addressed to the router itself (one of its addresses, a subnet broadcast, IPv6
    /// subnet-router anycast).
    pub const LOCAL_DEST: usize = 3;
    /// TTL or hop limit ≤ 1: the kernel sends time exceeded.
    pub const TTL_EXCEEDED: usize = 4;
    /// IPv4 options or an IPv6 hop-by-hop options header.
    pub const IP_OPTIONS: usize = 5;
    pub const NO_ROUTE: usize = 6;
    pub const NO_NEIGH: usize = 7;
    pub const SAME_IFACE: usize = 8;
    pub const TOO_BIG: usize = 9;
    /// Truncated or inconsistent headers (the kernel drops these).
    pub const MALFORMED: usize = 10;
    pub const BAD_CHECKSUM: usize = 11;
    /// Source or destination the kernel does not forward (0/8, 127/8, class D/E sources;
    /// IPv6 ::/64, multicast sources).
    pub const MARTIAN: usize = 12;
    pub const UNKNOWN_IFACE: usize = 13;
    pub const NO_TX_PORT: usize = 14;
    /// IPv6 link-local (fe80::/10) source or destination: never routed.
    pub const LINK_LOCAL: usize = 15;
    /// The egress device is up but cannot take XDP-redirected frames now (a veth whose peer has
    /// neither GRO nor an XDP program; a device without XDP transmit): XDP hands the frame to
    /// the kernel.
    pub const NO_XDP_XMIT: usize = 16;
    /// A TCP or UDP checksum that does not verify, on a device where XDP may see partial
    /// checksums (`iface_flags::VERIFY_L4`): the kernel keeps the skb's checksum state.
    pub const L4_CHECKSUM: usize = 17;
    /// NAT is on and the packet would leave through the gateway untranslated: no flow for it
    /// yet (the kernel NATs it and conntrack decides the mapping).
    pub const NAT_NO_FLOW: usize = 18;
    /// TCP SYN, FIN or RST of a NAT flow: the kernel's conntrack must see it.
    pub const NAT_TCP_CONTROL: usize = 19;
    /// An IPv4 fragment that would leave through the gateway (no ports to translate by).
    pub const NAT_FRAGMENT: usize = 20;
    /// The namespace has netfilter rules on the forwarding path (`nat_conf::GUARDED`) and the
    /// packet's flow has no copy of the kernel's verdict: the kernel filters it.
    pub const GUARDED: usize = 21;
    /// The ingress device's family is the kernel's to decide (`iface_flags::KERNEL_V4`, `_V6`):
    /// forwarding off, reverse-path filtering, IPv6 disabled, policy routing rules.
    pub const KERNEL_POLICY: usize = 22;
    /// The longest prefix is a route of the namespace the fast path does not carry
    /// (`route_kind::KERNEL`).
    pub const KERNEL_ROUTE: usize = 23;
    pub const COUNT: usize = 24;

    /// Names used by the CLI and JSON output, indexed by reason.
    pub const NAMES: [&str; COUNT] = [
        "not_ip",
        "not_our_mac",
        "bcast_mcast",
        "local_dest",
        "ttl_exceeded",
        "ip_options",
        "no_route",
        "no_neigh",
        "same_iface",
        "too_big",
        "malformed",
        "bad_checksum",
        "martian",
        "unknown_iface",
        "no_tx_port",
        "link_local",
        "no_xdp_xmit",
        "l4_checksum",
        "nat_no_flow",
        "nat_tcp_control",
        "nat_fragment",
        "guarded",
        "kernel_policy",
        "kernel_route",
    ];
}

/// Per-device counters, one instance per CPU in the `STATS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Forwarded, both families.
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// The IPv6 part of the forwarded counts.
    pub fwd6_packets: u64,
    pub fwd6_bytes: u64,
    pub drop_packets: u64,
    pub pass_bytes: u64,
    /// Forwarded packets whose source (SNAT) or destination (DNAT) the fast path translated
    /// (a hairpin counts in both).
    pub nat_src_packets: u64,
    pub nat_dst_packets: u64,
    /// Room for counters a later build adds (each takes the first spare word): the value's
    /// size, and so the pinned map of a running router, stays as it is.
    pub spare: [u64; STATS_SPARE],
    /// By `pass_reason`; the words past `pass_reason::COUNT` are room for reasons a later
    /// build adds, for the same reason.
    pub pass: [u64; PASS_SLOTS],
}

/// Spare counter words in `Stats`.
pub const STATS_SPARE: usize = 8;
/// Pass-reason words in `Stats` (at least `pass_reason::COUNT`).
pub const PASS_SLOTS: usize = 48;
const _: () = assert!(pass_reason::COUNT <= PASS_SLOTS);

impl Stats {
    pub const ZERO: Stats = Stats {
        fwd_packets: 0,
        fwd_bytes: 0,
        fwd6_packets: 0,
        fwd6_bytes: 0,
        drop_packets: 0,
        pass_bytes: 0,
        nat_src_packets: 0,
        nat_dst_packets: 0,
        spare: [0; STATS_SPARE],
        pass: [0; PASS_SLOTS],
    };

    pub fn pass_packets(&self) -> u64 {
        self.pass.iter().sum()
    }

    pub fn add(&mut self, other: &Stats) {
        self.fwd_packets += other.fwd_packets;
        self.fwd_bytes += other.fwd_bytes;
        self.fwd6_packets += other.fwd6_packets;
        self.fwd6_bytes += other.fwd6_bytes;
        self.drop_packets += other.drop_packets;
        self.pass_bytes += other.pass_bytes;
        self.nat_src_packets += other.nat_src_packets;
        self.nat_dst_packets += other.nat_dst_packets;
        for (a, b) in self.spare.iter_mut().zip(other.spare.iter()) {
            *a += *b;
        }
        for (a, b) in self.pass.iter_mut().zip(other.pass.iter()) {
            *a += *b;
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, made of integers and byte arrays, with no padding
    // (checked by the `layout` tests).
    unsafe impl aya::Pod for Route {}
    unsafe impl aya::Pod for NhGroup {}
    unsafe impl aya::Pod for NeighKey {}
    unsafe impl aya::Pod for Neigh6Key {}
    unsafe impl aya::Pod for Neigh {}
    unsafe impl aya::Pod for Iface {}
    unsafe impl aya::Pod for IfaceAt {}
    unsafe impl aya::Pod for Stats {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatFlow {}
    unsafe impl aya::Pod for LearnedFlow {}
    unsafe impl aya::Pod for NatSyn {}
    unsafe impl aya::Pod for Block6 {}
    unsafe impl aya::Pod for Pfx6 {}
}

#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn no_padding() {
        assert_eq!(size_of::<Route>(), 40);
        assert_eq!(size_of::<NhGroup>(), 36);
        assert_eq!(size_of::<NeighKey>(), 8);
        assert_eq!(size_of::<Neigh6Key>(), 20);
        assert_eq!(size_of::<Neigh>(), 8);
        assert_eq!(size_of::<Iface>(), 16);
        assert_eq!(size_of::<IfaceAt>(), 20);
        // Never changes: a new counter takes a spare word, a new pass reason a free slot, so
        // an upgrade keeps the counters' pinned map (see `maps::ALL`).
        assert_eq!(size_of::<Stats>(), 512);
        assert_eq!(size_of::<NatKey>(), 16);
        assert_eq!(size_of::<NatFlow>(), 40);
        // Two keys, four u32, a u64: no padding.
        assert_eq!(size_of::<NatSyn>(), 56);
        // A cache line: a key, a flow, the check word and padding made explicit.
        assert_eq!(size_of::<LearnedFlow>(), 64);
        assert_eq!(size_of::<Block6>(), 96);
        assert_eq!(size_of::<Pfx6>(), 16);
    }
}

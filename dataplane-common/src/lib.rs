//! Types shared by the kernel programs (`dataplane-ebpf`) and the agent (`dataplane`).
//!
//! Every type that crosses the user/kernel boundary lives here, `#[repr(C)]`, with explicit
//! zeroed padding (implicit padding is stack garbage in the kernel and would split one key into
//! several map entries) and a compile-time size assertion. No bool, enum or Option inside map
//! keys or values: kernel and agent exchange plain integers.
#![no_std]

/// Names of the maps, as pinned under the agent's pin directory. A layout change gets a new
/// suffix (`_v2`) so that an upgraded agent never reads an old layout as a new one.
pub mod map_names {
    /// Per-CPU packet and byte counters per (interface, hook).
    pub const IFACE_STATS: &str = "dp_iface_stats_v1";
    /// Per-CPU drop counters indexed by [`crate::DropReason`].
    pub const DROPS: &str = "dp_drops_v2";
    /// Container endpoints by IPv4 address: where a packet for that address is delivered, and
    /// who it is for policy.
    pub const ENDPOINTS: &str = "dp_endpoints_v2";
    /// Policy rules compiled into lookups: (slot, selector kinds and values of both sides,
    /// protocol, port) -> the first matching rule's index and action (see [`crate::PolicyKey`]).
    pub const POLICY: &str = "dp_policy_v1";
    /// Address prefixes of the policies' CIDR selectors (LPM trie): an address's longest
    /// matching prefix is its CIDR class, the value CIDR keys of [`POLICY`] carry.
    pub const POLICY_PREFIXES: &str = "dp_policy_prefixes_v1";
    /// Which half of the policy maps is live, and which key shapes it holds
    /// ([`crate::PolicyMeta`]).
    pub const POLICY_META: &str = "dp_policy_meta_v1";
    /// Outside sources denied at XDP on the uplink (LPM trie of prefixes).
    pub const DENY_SOURCES: &str = "dp_deny_sources_v1";
    /// Connection tracking of established connections: one entry per direction (v2: entries
    /// carry [`crate::ct_state`]; only connections whose handshake completed live here).
    pub const CONNTRACK: &str = "dp_ct_v2";
    /// Connections not yet established (a TCP handshake under way, UDP not yet answered back),
    /// both directions, in an LRU map of their own: when it is full the oldest unestablished
    /// connection makes room, never an established one.
    pub const CONNTRACK_NEW: &str = "dp_ct_new_v1";
    /// First fragments of IPv4 datagrams seen lately: the ports later fragments stand for.
    pub const FRAGMENTS: &str = "dp_fragments_v1";
    /// Drop-event aggregation per (reason, source): what was already reported and what is
    /// pending (LRU).
    pub const DROP_AGGREGATES: &str = "dp_drop_agg_v1";
    /// Per-CPU token bucket that bounds drop events per second overall.
    pub const DROP_EVENT_BUDGET: &str = "dp_drop_budget_v1";
    /// Published ports: (host address, port, protocol) -> container address and port, or a
    /// service.
    pub const PORTS: &str = "dp_ports_v2";
    /// Service VIPs: (VIP, port, protocol) -> service id, algorithm, backend count.
    pub const SERVICES: &str = "dp_services_v1";
    /// Backends of services: (service id, index) -> address and port.
    pub const BACKENDS: &str = "dp_backends_v1";
    /// Maglev lookup tables, [`maglev_stride`] backend indexes per service id, flat. v2: the
    /// table size is a load-time setting (v1 had 1021 slots, fixed).
    pub const MAGLEV: &str = "dp_maglev_v2";
    /// Round-robin position per service (per CPU).
    pub const RR_POSITION: &str = "dp_rr_v1";
    /// Flow events (ring buffer): connections opened and closed, packets dropped. v2: events
    /// carry addresses of either family.
    pub const FLOW_EVENTS: &str = "dp_flow_events_v2";
    /// Flow events that found the ring buffer full, per CPU (the kernel does not count them).
    pub const FLOW_EVENTS_LOST: &str = "dp_flow_events_lost_v1";
    /// TCP flags of every packet the programs pass, per CPU, as Hubble's
    /// `hubble_tcp_flags_total` counts them (see [`crate::tcp_flag_count`]).
    pub const TCP_FLAGS: &str = "dp_tcp_flags_v1";
    /// The same for IPv6 packets (`hubble_tcp_flags_total{family="IPv6"}`).
    pub const TCP_FLAGS6: &str = "dp_tcp_flags6_v1";
    /// The host's own IPv4 addresses: which destinations "all host addresses" means.
    pub const LOCAL_ADDRS: &str = "dp_local_addrs_v1";
    /// Settings the agent writes at run time (uplink, masquerade address, port range).
    pub const CONFIG: &str = "dp_config_v5";
    /// Socket-level translations of host processes: (socket cookie, address the socket
    /// really talks to) -> the address it asked for, so that replies and getpeername() show
    /// the VIP or published port (LRU; written by the cgroup hooks only).
    pub const SOCK_REV_NAT: &str = "dp_sock_rev_nat_v1";
    /// Containers' network namespaces: netns cookie -> the container's address, whose
    /// sockets the cgroup hooks translate too (written by the reconciler only).
    pub const SOCK_NETNS: &str = "dp_sock_netns_v1";
    /// Connections a container's socket was translated for at connect()/sendmsg(), by
    /// (container address, backend address and port, protocol): the service address the
    /// socket asked for, so that the packet path tracks and reports the connection as the
    /// service's (LRU; written by the cgroup hooks only).
    pub const SOCK_LB: &str = "dp_sock_lb_v1";

    // IPv6: each family has its own maps (keys 2.5 times IPv4's; see `crate::Address`). Each
    // holds what its IPv4 namesake holds, keyed and valued by IPv6 addresses. The policy map,
    // its meta, the Maglev tables, round-robin positions and the config are family-free and
    // shared: a dual-stack service has one id (one Maglev table over its backends' indexes).
    pub const CONNTRACK6: &str = "dp_ct6_v1";
    pub const CONNTRACK6_NEW: &str = "dp_ct6_new_v1";
    pub const FRAGMENTS6: &str = "dp_fragments6_v1";
    pub const DROP_AGGREGATES6: &str = "dp_drop_agg6_v1";
    pub const ENDPOINTS6: &str = "dp_endpoints6_v1";
    pub const PORTS6: &str = "dp_ports6_v1";
    pub const LOCAL_ADDRS6: &str = "dp_local_addrs6_v1";
    pub const SERVICES6: &str = "dp_services6_v1";
    /// Backends' IPv6 addresses, at the same (service id, index) as in [`BACKENDS`].
    pub const BACKENDS6: &str = "dp_backends6_v1";
    pub const POLICY_PREFIXES6: &str = "dp_policy_prefixes6_v1";
    pub const DENY_SOURCES6: &str = "dp_deny_sources6_v1";
    pub const SOCK_REV_NAT6: &str = "dp_sock_rev_nat6_v1";
    pub const SOCK_LB6: &str = "dp_sock_lb6_v1";

    /// The IPv6 tc programs by hook number (a program array the IPv4 tc programs tail-call
    /// for IPv6 frames; written by the loader only).
    pub const PROGS6: &str = "dp_progs6_v2";
}

/// Load-time settings of the kernel programs (`Global`s, set through `EbpfLoader`).
pub mod globals {
    /// u8: 1 sends flow events (the default), 0 sends none.
    pub const FLOW_EVENTS_ON: &str = "FLOW_EVENTS_ON";
    /// u32: slots of each service's Maglev table (`--maglev-size`, a prime).
    pub const MAGLEV_SIZE: &str = "MAGLEV_SIZE";
}

/// Names of the kernel programs in the object file.
pub mod program_names {
    /// tc ingress on a container's host-side veth: traffic leaving the container.
    pub const CONTAINER_INGRESS: &str = "dp_container_ingress";
    /// tc ingress on the uplink: traffic from outside the host.
    pub const UPLINK_INGRESS: &str = "dp_uplink_ingress";
    /// tc egress on the uplink: traffic leaving the host.
    pub const UPLINK_EGRESS: &str = "dp_uplink_egress";
    /// XDP on the uplink: early decisions before a socket buffer exists.
    pub const UPLINK_XDP: &str = "dp_uplink_xdp";
    /// cgroup connect4: host processes connecting to a published port (what docker-proxy
    /// does for localhost), translated at the socket before any packet exists.
    pub const SOCK_CONNECT4: &str = "dp_sock_connect4";
    /// cgroup sendmsg4: each datagram of an unconnected UDP socket of a host process to a
    /// service VIP or a published port.
    pub const SOCK_SENDMSG4: &str = "dp_sock_sendmsg4";
    /// cgroup recvmsg4: the source of a reply to such a datagram back to the VIP or port.
    pub const SOCK_RECVMSG4: &str = "dp_sock_recvmsg4";
    /// cgroup getpeername4: a translated socket's peer as the process asked for it.
    pub const SOCK_GETPEERNAME4: &str = "dp_sock_getpeername4";
    /// cgroup connect6: the same for AF_INET6 sockets: `[::1]:PORT`, the host's IPv6
    /// addresses and v4-mapped ones (`::ffff:127.0.0.1`), to IPv4-only containers through a
    /// v4-mapped address.
    pub const SOCK_CONNECT6: &str = "dp_sock_connect6";
    /// cgroup sendmsg6: each datagram of an unconnected AF_INET6 UDP socket.
    pub const SOCK_SENDMSG6: &str = "dp_sock_sendmsg6";
    /// cgroup recvmsg6: a reply's source back to what an AF_INET6 socket asked for.
    pub const SOCK_RECVMSG6: &str = "dp_sock_recvmsg6";
    /// cgroup getpeername6: a translated AF_INET6 socket's peer as the process asked for it.
    pub const SOCK_GETPEERNAME6: &str = "dp_sock_getpeername6";
    /// The IPv6 halves of the tc programs, tail-called by them for each IPv6 frame (from
    /// [`crate::map_names::PROGS6`], at the index of their hook's number); never attached.
    pub const CONTAINER_INGRESS6: &str = "dp_container_ingress6";
    pub const UPLINK_INGRESS6: &str = "dp_uplink_ingress6";
    pub const UPLINK_EGRESS6: &str = "dp_uplink_egress6";
    /// NAT64 of published ports (IPv6 client, IPv4-only container), both directions:
    /// tail-called from [`crate::map_names::PROGS6`]'s slot [`crate::PROGS6_NAT64_SLOT`] by
    /// the IPv6 uplink ingress program (requests) and the IPv4 container ingress program
    /// (replies); never attached.
    pub const NAT64: &str = "dp_nat64";
    /// Where an IPv6 program hands a packet it drops (tail call, slot
    /// [`crate::PROGS6_DROP_SLOT`] of [`crate::map_names::PROGS6`]): counts the drop, sends its
    /// flow event and gives the verdict, on a stack of its own.
    pub const DROP6: &str = "dp_drop6";
    /// New IPv6 connections to a service (a container's to a VIP, or from outside to a port
    /// that leads to a service), tail-called by the two ingress IPv6 programs, at
    /// [`crate::PROGS6_BALANCE`] in the same array; never attached.
    pub const BALANCE6: &str = "dp_balance6";
    /// An IPv6 connection judged again after a policy change, tail-called by the IPv6
    /// programs at [`crate::PROGS6_REJUDGE_SLOT`] for the first packet of a tracked
    /// connection they see under a newer policy: it drops the packet (and the connection),
    /// or tail-calls the hook's program again; never attached.
    pub const REJUDGE6: &str = "dp_rejudge6";
}

/// The slot of [`program_names::DROP6`] in the IPv6 program array (the hooks' numbers take
/// 1-3).
pub const PROGS6_DROP_SLOT: u32 = 0;

/// The slot of [`program_names::NAT64`] in the IPv6 program array.
pub const PROGS6_NAT64_SLOT: u32 = 4;

/// The slot of [`program_names::BALANCE6`] in the IPv6 program array.
pub const PROGS6_BALANCE_SLOT: u32 = 5;

/// The slot of [`program_names::REJUDGE6`] in the IPv6 program array.
pub const PROGS6_REJUDGE_SLOT: u32 = 6;

/// Capacities of the maps (see the map declarations in `dataplane-ebpf/src/maps.rs` for the
/// reasoning behind each size).
pub mod capacity {
    /// Interfaces times hooks: a host with 1,000 containers has about 1,000 veths with one hook
    /// each plus the uplink's three hooks; 4096 leaves room for churn until the agent prunes.
    pub const IFACE_STATS: u32 = 4096;
    /// One entry per container interface; Docker's default address pools hold far fewer
    /// containers per host than this.
    pub const ENDPOINTS: u32 = 16384;
    /// Policy rules after expanding each rule's port list (a rule with three ports is three):
    /// a rule's index is its priority in the compiled lookups. The per-connection cost does
    /// not depend on it (a bounded number of lookups, see [`crate::PolicyMeta`]); what bounds
    /// it is the compiling time (about 10 ms per 10,000 rules) and the entries below.
    pub const POLICY_RULES: u32 = 65_536;
    /// Entries of the compiled policy per half (the map holds two halves: the live one and
    /// the one the next change is written into). A rule is one entry per value its selectors
    /// expand to: one for any, a network or an endpoint, one per label class a label selector
    /// matches, one per rule prefix nested in a CIDR (itself included). 131,072 is 10,000
    /// rules with a dozen expansions each; entries are allocated on use (BPF_F_NO_PREALLOC,
    /// about 80 bytes each with the hash table's own), so an idle host pays nothing.
    pub const POLICY_ENTRIES: u32 = 131_072;
    /// Distinct CIDR prefixes of the policies, per half (the trie holds two halves).
    pub const POLICY_PREFIXES: u32 = 16_384;
    /// Prefixes of the XDP deny list.
    pub const DENY_SOURCES: u32 = 16384;
    /// Two entries per translated connection. 262,144 entries = 131,072 connections, what
    /// Linux's nf_conntrack_max gives a host of this size; entries are allocated on use
    /// (BPF_F_NO_PREALLOC), so an idle host does not pay for the capacity. A plain hash, not
    /// LRU: LRU would silently evict a live connection's translation when full; a full plain
    /// hash refuses the new connection, which is counted (CT_MAP_INSERTION_FAILED).
    pub const CONNTRACK: u32 = 262_144;
    /// One entry per published (address, port, protocol); ranges take one entry per port.
    pub const PORTS: u32 = 65_536;
    /// Addresses of the host's interfaces.
    pub const LOCAL_ADDRS: u32 = 256;
    /// Services (VIP:port/protocol) by default; a load-time setting (`--max-services`) since the
    /// Maglev tables take `(MAGLEV_DEFAULT_SIZE + 1) * 4` bytes per possible service (64 KiB),
    /// allocated up front: 1,024 services = 64 MiB. More services want a smaller table
    /// (`--maglev-size 4093`: 16 KiB each, within 1% up to 40 backends).
    pub const SERVICES: u32 = 1024;
    /// Backends over all services (allocated on use).
    pub const BACKENDS: u32 = 65_536;
    /// Unestablished connections (two entries each) for a main table of `ct_max_entries`: a
    /// quarter of it, at least [`CONNTRACK_NEW_MIN`]. An LRU map is preallocated, so it costs
    /// its whole size at once (about 100 bytes an entry: 6.5 MiB at the default); a quarter is
    /// 32,768 handshakes under way, which a 340 kpps spoofed flood turns over in about 0.2 s: a
    /// legitimate handshake (one round trip) completes well before its entry is the oldest.
    pub fn conntrack_new(ct_max_entries: u32) -> u32 {
        (ct_max_entries / 4).max(CONNTRACK_NEW_MIN)
    }
    pub const CONNTRACK_NEW_MIN: u32 = 512;
    /// Datagrams in flight as fragments. Fragments of one datagram arrive within microseconds
    /// of each other; an LRU of 8,192 first fragments covers a few Gbit/s of 64 KiB datagrams
    /// with the oldest entry far older than any reassembly still wanted.
    pub const FRAGMENTS: u32 = 8192;
    /// (reason, source) pairs whose drop events are being aggregated (LRU: a spoofed flood
    /// evicts older sources; their pending counts are lost from the flow records only, never
    /// from the per-reason counters).
    pub const DROP_AGGREGATES: u32 = 4096;
    /// (socket, backend) pairs of host processes' translated sockets. One entry per
    /// connect() to a VIP or published port and per UDP socket and backend it sends to; LRU,
    /// preallocated (about 90 bytes an entry: 5.6 MiB). What an eviction costs: a UDP reply to
    /// a socket idle through 65,536 newer translations shows the backend as its source, and
    /// getpeername() the backend; the connection itself is not affected.
    pub const SOCK_REV_NAT: u32 = 65_536;
    /// Containers whose sockets the hooks translate: one entry per container (network
    /// namespace), so as many as endpoints.
    pub const SOCK_NETNS: u32 = ENDPOINTS;
    /// (container, backend) pairs recently translated at a container's socket. An entry
    /// only has to live from connect() to the connection's first packet (microseconds), and
    /// is rewritten by every new socket of the same pair; 65,536 pairs (about 70 bytes an
    /// entry: 4.5 MiB) hold every pair of 1,000 containers each talking to 65 backends at
    /// once. What an eviction costs: that connection is tracked and reported as a plain
    /// one to the backend (not as the service's); it works the same.
    pub const SOCK_LB: u32 = 65_536;
}

/// Slots of one service's Maglev table unless `--maglev-size` says otherwise (a load-time
/// setting: the programs read it from [`globals::MAGLEV_SIZE`]). Prime, as Maglev needs.
/// Cilium's default: each backend owns M/N slots off by at most one, so M > 100 x N keeps
/// every backend within 1% of its share up to 100 backends (16381 / 100 = 163.8 slots each,
/// one slot is 0.6%). A table costs (M + 1) x 4 bytes: 64 KiB per possible service.
pub const MAGLEV_DEFAULT_SIZE: u32 = 16381;
/// The largest table `--maglev-size` accepts (a prime: 2^17 - 1), 512 KiB per service; the
/// smallest, [`MAGLEV_MIN_SIZE`], still gives 30 backends a share each within a few percent.
pub const MAGLEV_MAX_SIZE: u32 = 131_071;
pub const MAGLEV_MIN_SIZE: u32 = 251;

/// Slots between the starts of two services' tables in the flat Maglev map of tables of
/// `size` slots. The map's elements are pairs of slots (`[u32; 2]`: BPF array elements are
/// 8-byte aligned, so single u32s would leave half of an mmap-ed map as padding); an even
/// stride (the size is an odd prime) keeps every table at the start of an element.
pub const fn maglev_stride(size: u32) -> u32 {
    size + 1
}

/// Elements (`[u32; 2]`) of the flat Maglev map for `max_services` services of tables of
/// `size` slots (ids start at 1: one spare table at id 0).
pub const fn maglev_elements(max_services: u32, size: u32) -> u64 {
    (max_services as u64 + 1) * maglev_stride(size) as u64 / 2
}

/// Whether `n` is prime (trial division: for the few sizes checked at start).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Load-balancing algorithms, as stored in [`ServiceInfo::algorithm`].
pub mod algorithm {
    /// Consistent hashing of the connection's 5-tuple through the Maglev table.
    pub const MAGLEV: u8 = 1;
    pub const RANDOM: u8 = 2;
    /// Per CPU: each CPU walks the backends in turn.
    pub const ROUND_ROBIN: u8 = 3;
    /// Consistent hashing of the client address only (client affinity), through the table.
    pub const SOURCE_HASH: u8 = 4;
}

/// Connection-tracking timeouts in seconds, by protocol and state (applied by the agent's
/// garbage collector against each entry's `last_seen_ns`). TCP follows Cilium's choices:
/// long for established, short once a FIN or RST was seen.
pub mod ct_timeout {
    pub const TCP_ESTABLISHED: u64 = 6 * 3600;
    /// Until the handshake completed (SYN_SENT, SYN_RECV). Linux gives SYN_RECV 60 s and
    /// SYN_SENT 120 s; 20 s here, because a client retransmits its SYN after 1, 3 and 7 s
    /// (each refreshes the entry) and a handshake whose answer took longer than that is not
    /// worth holding a slot for while a flood is on. The LRU table of unestablished connections
    /// makes room under pressure anyway; this timeout only frees slots when there is none.
    pub const TCP_SYN: u64 = 20;
    /// After FIN or RST in either direction.
    pub const TCP_CLOSING: u64 = 10;
    pub const UDP: u64 = 60;
    pub const ICMP: u64 = 30;
}

/// The hook a counter belongs to. Stored as a plain `u32` in [`IfaceStatsKey::hook`].
pub mod hook {
    pub const CONTAINER_INGRESS: u32 = 1;
    pub const UPLINK_INGRESS: u32 = 2;
    pub const UPLINK_EGRESS: u32 = 3;
    pub const UPLINK_XDP: u32 = 4;
    /// Not packet hooks (no counters): the cgroup socket hooks, in flow events and names.
    pub const SOCK_CONNECT4: u32 = 5;
    pub const SOCK_SENDMSG4: u32 = 6;
    pub const SOCK_RECVMSG4: u32 = 7;
    pub const SOCK_GETPEERNAME4: u32 = 8;
    pub const SOCK_CONNECT6: u32 = 9;
    pub const SOCK_SENDMSG6: u32 = 10;
    pub const SOCK_RECVMSG6: u32 = 11;
    pub const SOCK_GETPEERNAME6: u32 = 12;

    /// The hook's name as `dataplane status` prints it.
    pub fn name(hook: u32) -> &'static str {
        match hook {
            CONTAINER_INGRESS => "tc-ingress(container)",
            UPLINK_INGRESS => "tc-ingress(uplink)",
            UPLINK_EGRESS => "tc-egress(uplink)",
            UPLINK_XDP => "xdp(uplink)",
            SOCK_CONNECT4 => "cgroup-connect4",
            SOCK_SENDMSG4 => "cgroup-sendmsg4",
            SOCK_RECVMSG4 => "cgroup-recvmsg4",
            SOCK_GETPEERNAME4 => "cgroup-getpeername4",
            SOCK_CONNECT6 => "cgroup-connect6",
            SOCK_SENDMSG6 => "cgroup-sendmsg6",
            SOCK_RECVMSG6 => "cgroup-recvmsg6",
            SOCK_GETPEERNAME6 => "cgroup-getpeername6",
            _ => "unknown",
        }
    }
}

/// An address as the maps hold it: `u32` for IPv4, [`In6Addr`] for IPv6, both the wire's bytes
/// (network byte order). Each family has maps of its own (IPv4's keep their layout and size:
/// an IPv6 key is 2.5 times as big); the kernel code that does not care about the family is
/// generic over this, so there is one copy of it (see docs/DESIGN.md, "IPv6").
pub trait Address:
    Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug + 'static
{
    /// Explicit padding for structs whose addresses would leave implicit padding in one
    /// family: nothing for IPv4, 4 bytes for IPv6.
    type Pad: Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug + 'static;
    /// 4 or 6, as [`FlowEvent::family`] says it.
    const FAMILY: u8;
    /// The address in the family-neutral form of flow events (IPv4 as ::ffff:a.b.c.d).
    fn to_in6(self) -> In6Addr;
    /// Writes [`Address::to_in6`] into `out`, which must be all zero (a flow event just
    /// reserved and zeroed): IPv4 writes only the two words that are not, with no 16-byte
    /// copy on the stack (every frame of a program shares its 512 bytes).
    fn put_in6_zeroed(self, out: &mut In6Addr);
}

impl Address for u32 {
    type Pad = ();
    const FAMILY: u8 = 4;
    #[inline(always)]
    fn to_in6(self) -> In6Addr {
        In6Addr::mapped_v4(self)
    }
    #[inline(always)]
    fn put_in6_zeroed(self, out: &mut In6Addr) {
        out.0[2] = u32::to_be(0xffff);
        out.0[3] = self;
    }
}

/// An IPv6 address: its 16 bytes as on the wire, held as four u32 words so the programs
/// compare and checksum it a word at a time (each word is network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct In6Addr(pub [u32; 4]);

impl In6Addr {
    pub const UNSPECIFIED: In6Addr = In6Addr([0; 4]);

    pub const fn from_octets(o: [u8; 16]) -> Self {
        In6Addr([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    pub const fn octets(&self) -> [u8; 16] {
        let w = [
            self.0[0].to_ne_bytes(),
            self.0[1].to_ne_bytes(),
            self.0[2].to_ne_bytes(),
            self.0[3].to_ne_bytes(),
        ];
        [
            w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3], w[2][0],
            w[2][1], w[2][2], w[2][3], w[3][0], w[3][1], w[3][2], w[3][3],
        ]
    }

    pub const fn from_ipv6(addr: core::net::Ipv6Addr) -> Self {
        In6Addr::from_octets(addr.octets())
    }

    pub const fn to_ipv6(self) -> core::net::Ipv6Addr {
        core::net::Ipv6Addr::from_octets(self.octets())
    }

    /// ::ffff:a.b.c.d for the IPv4 address `v4` (network byte order).
    pub const fn mapped_v4(v4: u32) -> Self {
        In6Addr([0, 0, u32::to_be(0xffff), v4])
    }

    /// The IPv4 address (network byte order) this one maps, if it is ::ffff:a.b.c.d.
    pub const fn as_mapped_v4(&self) -> Option<u32> {
        if self.0[0] == 0 && self.0[1] == 0 && self.0[2] == u32::to_be(0xffff) {
            Some(self.0[3])
        } else {
            None
        }
    }

    /// The address as std knows it: an IPv4-mapped one as the IPv4 address it stands for.
    pub const fn to_ip(self) -> core::net::IpAddr {
        match self.as_mapped_v4() {
            Some(v4) => core::net::IpAddr::V4(core::net::Ipv4Addr::from_bits(u32::from_be(v4))),
            None => core::net::IpAddr::V6(self.to_ipv6()),
        }
    }

    /// Either family's address in this form (IPv4 mapped).
    pub const fn from_ip(addr: core::net::IpAddr) -> Self {
        match addr {
            core::net::IpAddr::V4(v4) => {
                In6Addr::mapped_v4(u32::from_be_bytes(v4.octets()).to_be())
            }
            core::net::IpAddr::V6(v6) => In6Addr::from_ipv6(v6),
        }
    }
}

impl Address for In6Addr {
    type Pad = u32;
    const FAMILY: u8 = 6;
    #[inline(always)]
    fn to_in6(self) -> In6Addr {
        self
    }
    #[inline(always)]
    fn put_in6_zeroed(self, out: &mut In6Addr) {
        *out = self;
    }
}

/// Key of the per-interface counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfaceStatsKey {
    pub ifindex: u32,
    /// One of the [`hook`] constants.
    pub hook: u32,
}

/// Packets and bytes seen; one value per CPU, summed by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Where packets for a container's address go, and who the container is for policy. The same
/// container has the same ids in both families' maps (one endpoint whatever its families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfoOf<A: Address> {
    /// The container's label class for policy: which label selectors of the policies its
    /// labels match, as one number (containers matching the same selectors share it; 0: it
    /// matches none). Compiled rules with a label selector are keyed by the classes it matches.
    pub label_class: u32,
    pub _pad_class: u32,
    /// Host-side veth of the container interface.
    pub ifindex: u32,
    /// The interface's network (1-based position in the agent's model).
    pub network_id: u32,
    /// The container (1-based position in the agent's model): the same for all its interfaces.
    pub endpoint_id: u32,
    pub mac: [u8; 6],
    /// [`net_flags`] of the interface's network.
    pub net_flags: u8,
    pub _pad: u8,
    /// The gateway of the interface's network in this family (the host's address on its
    /// bridge, network byte order): the source a hairpin connection of this container gets
    /// (0: none known, and hairpin connections go untranslated).
    pub gateway: A,
}

pub type EndpointInfo = EndpointInfoOf<u32>;
pub type EndpointInfo6 = EndpointInfoOf<In6Addr>;

/// Properties of a network, in [`EndpointInfo::net_flags`].
pub mod net_flags {
    /// `internal: true`: no traffic between the network and outside the host.
    pub const INTERNAL: u8 = 1;
    /// `icc: false`: containers of the network cannot reach each other.
    pub const NO_ICC: u8 = 2;
    /// `gateway_mode: routed`: connections out keep the container's address (no
    /// masquerade); published ports are opened on the container's own address (entries of
    /// the ports map keyed by it) and ICMP from outside reaches it.
    pub const ROUTED: u8 = 4;
    /// `gateway_mode: nat-unprotected`: hosts that route to the container's address reach
    /// every port of it.
    pub const UNPROTECTED: u8 = 8;
}

/// What a selector of a policy rule matches, in [`PolicyKey`]'s `*_kind`.
pub mod selector_kind {
    /// Everyone; the value is 0.
    pub const ANY: u8 = 0;
    /// `value` is a network id.
    pub const NETWORK: u8 = 1;
    /// `value` is an endpoint id.
    pub const ENDPOINT: u8 = 2;
    /// `value` is a label class ([`crate::EndpointInfo::label_class`]).
    pub const LABELS: u8 = 3;
    /// `value` is a CIDR class: the address's longest match in the prefix trie.
    pub const CIDR: u8 = 4;
    /// Kinds there are (a kind fits in 3 bits of a [`crate::PolicyMeta`] tuple).
    pub const COUNT: u8 = 5;
}

/// Key of the compiled policy (`dp_policy_v1`): one selector kind and value per side, the
/// protocol and destination port (network byte order; both 0 for a rule without ports), and
/// the half of the map it belongs to. A new connection looks up one key per shape
/// ([`PolicyMeta::tuples`]) and takes the lowest priority found: first match wins.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// 0 or 1: which half ([`PolicyMeta::slot`] says which is live).
    pub slot: u8,
    pub from_kind: u8,
    pub to_kind: u8,
    pub proto: u8,
    pub port: u16,
    pub _pad: u16,
    pub from_value: u32,
    pub to_value: u32,
}

/// What a compiled policy key decides: the first rule (lowest index) that produced it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// The rule's index in the policies' order (after port expansion): lower wins.
    pub priority: u32,
    /// [`policy_action`].
    pub action: u8,
    pub _pad: [u8; 3],
}

/// Key of the policy prefix trie: the half (network byte order, so it leads the compared
/// bits) and the address; `prefix_len` counts the half's 32 bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPrefixOf<A: Address> {
    pub slot: u32,
    pub addr: A,
}

pub type PolicyPrefix = PolicyPrefixOf<u32>;
pub type PolicyPrefix6 = PolicyPrefixOf<In6Addr>;

/// The most key shapes there are: (from kind, to kind, with a port or not).
pub const POLICY_MAX_TUPLES: usize = (selector_kind::COUNT as usize).pow(2) * 2;

/// Which half of the policy maps is live and what shapes of key it holds (array[1]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyMeta {
    /// The live half, 0 or 1.
    pub slot: u32,
    /// Live entries of `tuples`.
    pub tuple_count: u32,
    /// Bit 0: some key has a CIDR class as its source, bit 1 as its destination (the trie is
    /// looked up only then).
    pub cidr_sides: u32,
    pub _pad: u32,
    /// Key shapes present: bits 0-2 the source's kind, 3-5 the destination's, bit 6 set when
    /// the key carries the connection's protocol and port (0/0 otherwise). One lookup each.
    pub tuples: [u8; 64],
}

impl Default for PolicyMeta {
    fn default() -> Self {
        PolicyMeta {
            slot: 0,
            tuple_count: 0,
            cidr_sides: 0,
            _pad: 0,
            tuples: [0; 64],
        }
    }
}

/// Parts of a [`PolicyMeta::tuples`] byte.
pub mod policy_tuple {
    pub const KIND_BITS: u8 = 0b111;
    pub const TO_SHIFT: u8 = 3;
    pub const PORTED: u8 = 1 << 6;
}

/// [`PolicyVerdict::action`] values.
pub mod policy_action {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
}

/// Key of the XDP deny list (an LPM trie): the prefix length, then the address in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKeyOf<A: Address> {
    pub prefix_len: u32,
    pub addr: A,
}

pub type PrefixKey = PrefixKeyOf<u32>;
pub type PrefixKey6 = PrefixKeyOf<In6Addr>;

/// A connection as seen on the wire in one direction: the conntrack key. Addresses and ports
/// in network byte order, as in the packet. For ICMP echo, `sport` is the echo identifier and
/// `dport` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKeyOf<A: Address> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub type CtKey = CtKeyOf<u32>;
pub type CtKey6 = CtKeyOf<In6Addr>;

impl<A: Address> CtKeyOf<A> {
    /// The key in the family-neutral form of flow events (IPv4 addresses mapped).
    #[inline(always)]
    pub fn to_in6(&self) -> CtKey6 {
        CtKeyOf {
            saddr: self.saddr.to_in6(),
            daddr: self.daddr.to_in6(),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

impl CtKey6 {
    /// The IPv4 key a family-neutral one stands for, if both its addresses are IPv4-mapped.
    pub const fn as_v4(&self) -> Option<CtKey> {
        match (self.saddr.as_mapped_v4(), self.daddr.as_mapped_v4()) {
            (Some(saddr), Some(daddr)) => Some(CtKeyOf {
                saddr,
                daddr,
                sport: self.sport,
                dport: self.dport,
                proto: self.proto,
                _pad: [0; 3],
            }),
            _ => None,
        }
    }
}

/// Which translation created a conntrack entry; each hook acts only on the kinds it owns.
pub mod ct_origin {
    /// A published port: outside (or hairpin) client -> host address:port -> container.
    pub const PUBLISHED: u8 = 1;
    /// Masquerade: container -> outside, source rewritten to the host's address.
    pub const MASQUERADE: u8 = 2;
    /// A service VIP: container -> VIP:port -> a backend; replies come from the VIP.
    pub const SERVICE: u8 = 3;
    /// Not translated: a container's connection to another container or to the host, tracked
    /// for flow logs and policy.
    pub const PLAIN: u8 = 4;
}

/// What to rewrite in a packet matching the entry.
pub mod ct_rewrite {
    /// Nothing (a connection tracked without translation).
    pub const NONE: u8 = 0;
    /// Destination address and port (DNAT, or the reply of an SNAT).
    pub const DST: u8 = 1;
    /// Source address and port (SNAT, or the reply of a DNAT).
    pub const SRC: u8 = 2;
    /// Both, for a hairpin connection (a container's connection that its own translation sends
    /// back to itself: its own published port, or a VIP whose pick is the container itself):
    /// the source becomes `nat_addr`:`nat_port` and the destination the packet's own source
    /// address (the conntrack key's `saddr`, the container) at `CtEntry::hairpin_port`.
    /// Forward: source to the network's gateway and an allocated port, destination to the
    /// container's port; reply: source back to the published address (or VIP) and port,
    /// destination back to the client's port. Docker's MASQUERADE for `-s C -d C`.
    pub const HAIRPIN: u8 = 3;
    /// Nothing, because it was done at the socket: a container's connection that the cgroup
    /// hooks pointed at a backend at connect()/sendmsg(). The key's destination is already
    /// the backend; `nat_addr`:`nat_port` of the forward entry are the service address the
    /// socket asked for, for flow records only. Neither direction is rewritten (the socket
    /// itself is connected to the backend, so replies need no reverse translation).
    pub const SOCKET: u8 = 4;
    /// Both addresses and ports, and the address family: a published port reached over IPv6
    /// whose container has only IPv4 (NAT64). Both entries live in the IPv6 tables, the
    /// container's side keyed by IPv4-mapped addresses (::ffff:a.b.c.d); each direction's
    /// packet is rewritten to its entry's `peer` key reversed (the forward entry's peer is the
    /// reply key: source the network's gateway at an allocated port, destination the
    /// container; the reply entry's is the client's first packet: source the published
    /// address and port, destination the client). The forward entry's `nat_addr`:`nat_port`
    /// are the container's (mapped) address and port, for flow records, and its
    /// `hairpin_port` the allocated source port.
    pub const NAT64: u8 = 5;
}

/// How far a connection got, in [`CtEntry::state`] (the same in both of its entries).
/// Only [`ct_state::ESTABLISHED`] connections live in the main table; the others are in the
/// LRU table of unestablished connections.
pub mod ct_state {
    /// TCP: the client's SYN was seen, no answer yet. UDP/ICMP: one way only so far.
    pub const SYN_SENT: u8 = 1;
    /// TCP: the server answered with SYN-ACK. UDP/ICMP: the other side answered.
    pub const SYN_RECV: u8 = 2;
    /// TCP: the client's ACK after the SYN-ACK (the handshake completed). UDP/ICMP: the
    /// first side spoke again after an answer (Linux's "assured").
    pub const ESTABLISHED: u8 = 3;
}

/// TCP flags as stored in [`CtEntry::tcp_flags`] (the header's bits).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// One direction of a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryOf<A: Address> {
    /// Address and port to write (network byte order), into the field `rewrite` names.
    pub nat_addr: A,
    pub nat_port: u16,
    /// One of [`ct_rewrite`].
    pub rewrite: u8,
    /// One of [`ct_origin`].
    pub origin: u8,
    /// TCP flags seen in this direction (OR of every packet's).
    pub tcp_flags: u8,
    /// 1 for the reply direction of the connection.
    pub is_reply: u8,
    /// One of [`ct_state`].
    pub state: u8,
    /// ICMP: the type of this direction's first packet (8 echo request, 0 echo reply), for
    /// the records the agent makes from the entry; 0 for other protocols.
    pub icmp_type: u8,
    /// [`Config::policy_generation`] when the connection was last judged by policy; the next
    /// packet after a change has it judged again.
    pub policy_generation: u32,
    pub _pad_family: A::Pad,
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) of the first and the latest packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Updated without atomics from several CPUs: close enough for flow counters.
    pub packets: u64,
    pub bytes: u64,
    /// The key of the other direction, so both go together.
    pub peer: CtKeyOf<A>,
    /// On the reply entry of a TCP connection in SYN_RECV: the acknowledgement number (host
    /// order) the client's handshake ACK must carry (the SYN-ACK's sequence number + 1). A
    /// spoofing attacker never sees the SYN-ACK, so cannot complete the handshake blindly.
    pub handshake_ack: u32,
    /// [`ct_rewrite::HAIRPIN`] only: the destination port to write (the destination address
    /// being the packet's own source address). 0 otherwise.
    pub hairpin_port: u16,
    pub _pad2: u16,
}

pub type CtEntry = CtEntryOf<u32>;
pub type CtEntry6 = CtEntryOf<In6Addr>;

/// A datagram as each of its IPv4 fragments carries it (the fragment map's key): addresses
/// as on the wire at the hook (before any translation), protocol and IP identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// The IP header's identification field (network byte order).
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// An IPv6 datagram as each of its fragments carries it: addresses, the protocol after the
/// extension headers, and the fragment header's 32-bit identification (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey6 {
    pub saddr: In6Addr,
    pub daddr: In6Addr,
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// What the first fragment of a datagram was: its L4 ports (network byte order; for ICMP
/// echo the identifier as `sport`, `dport` 0), which the later fragments lack, and what
/// became of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub sport: u16,
    pub dport: u16,
    /// The [`DropReason`] the first fragment was dropped for, 0 when it went on.
    pub drop_reason: u8,
    pub _pad: [u8; 3],
}

/// Drop events are aggregated per (source, reason, hook).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropAggKeyOf<A: Address> {
    pub saddr: A,
    /// A [`DropReason`].
    pub reason: u8,
    /// One of [`hook`].
    pub hook: u8,
    pub _pad: u16,
}

pub type DropAggKey = DropAggKeyOf<u32>;
pub type DropAggKey6 = DropAggKeyOf<In6Addr>;

/// Drops of one (source, reason, hook) not yet reported, and when the last event went out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropAggValueOf<A: Address> {
    /// Drops since the last event (added atomically by every CPU).
    pub pending: u64,
    pub pending_bytes: u64,
    /// bpf_ktime_get_ns of the last event for this key.
    pub last_event_ns: u64,
    /// The latest dropped packet of the key, reported with the next event.
    pub tuple: CtKeyOf<A>,
    pub tcp_flags: u8,
    /// ICMP type and code of that packet (0 for other protocols).
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad: u8,
    pub ifindex: u32,
}

pub type DropAggValue = DropAggValueOf<u32>;
pub type DropAggValue6 = DropAggValueOf<In6Addr>;

/// Per-CPU token bucket for drop events (slot 0 of `dp_drop_budget_v1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropBudget {
    pub tokens: u64,
    pub refilled_ns: u64,
}

/// How drop events are limited: one event per (source, reason, hook) per
/// [`drop_events::INTERVAL_NS`] at most, carrying the count of drops it stands for, and at most
/// [`drop_events::PER_SEC_PER_CPU`] events a second per CPU overall (a spoofed flood has a new
/// source in every packet). The per-reason counters count every drop regardless.
pub mod drop_events {
    pub const INTERVAL_NS: u64 = 1_000_000_000;
    pub const PER_SEC_PER_CPU: u64 = 200;
    /// Bucket depth: a burst of distinct sources right after a quiet spell.
    pub const BURST: u64 = 200;
}

/// A published port as the kernel looks it up. `addr` 0 means every host address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKeyOf<A: Address> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

pub type PortKey = PortKeyOf<u32>;
pub type PortKey6 = PortKeyOf<In6Addr>;

/// Where a published port leads: a container address and port (network byte order), or, when
/// `is_service` is 1, a service's VIP and port, whose backend is picked per connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTargetOf<A: Address> {
    pub addr: A,
    pub port: u16,
    pub is_service: u8,
    pub _pad: u8,
}

pub type PortTarget = PortTargetOf<u32>;
pub type PortTarget6 = PortTargetOf<In6Addr>;

/// Key of the socket-level reverse translation: a socket (its cookie) and the address and port
/// it really talks to (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevNatKeyOf<A: Address> {
    pub cookie: u64,
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
    pub _pad_family: A::Pad,
}

pub type SockRevNatKey = SockRevNatKeyOf<u32>;
pub type SockRevNatKey6 = SockRevNatKeyOf<In6Addr>;

/// What a socket asked for (network byte order): the VIP or the host address and published
/// port its process sees as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatOf<A: Address> {
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
}

pub type SockRevNat = SockRevNatOf<u32>;
pub type SockRevNat6 = SockRevNatOf<In6Addr>;

/// A container's network namespace, as the socket hooks know it: the address its sockets'
/// connections leave from when not bound (its first interface's, network byte order), the
/// source identity policy judges them by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockNetns {
    pub addr: u32,
    /// The Docker Swarm overlay networks the container is on: bit `n - 1` for a service's
    /// `ServiceInfo::overlay` n.
    pub overlays: u32,
}

/// A connection a container's socket hook translated, before its first packet: (container
/// address, backend address and port, protocol), network byte order. No source port: the
/// kernel picks it after connect4 runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockLbKeyOf<A: Address> {
    pub saddr: A,
    pub daddr: A,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
}

pub type SockLbKey = SockLbKeyOf<u32>;
pub type SockLbKey6 = SockLbKeyOf<In6Addr>;

/// The service address (VIP and port, network byte order) the socket asked for, and when
/// (CLOCK_MONOTONIC ns): the packet path believes it only for a short while after.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbOf<A: Address> {
    pub time_ns: u64,
    pub vip: A,
    pub vip_port: u16,
    pub _pad: u16,
    pub _pad_family: A::Pad,
}

pub type SockLb = SockLbOf<u32>;
pub type SockLb6 = SockLbOf<In6Addr>;

/// A service VIP as the kernel looks it up (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyOf<A: Address> {
    pub vip: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

pub type ServiceKey = ServiceKeyOf<u32>;
pub type ServiceKey6 = ServiceKeyOf<In6Addr>;

/// A service: its id (1-based index of its Maglev table and round-robin slot), how many
/// backends it has (indexes `0..backend_count` in the backends map) and how it picks one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub id: u32,
    pub backend_count: u32,
    /// One of [`algorithm`].
    pub algorithm: u8,
    /// 0: anyone's. n: a Docker Swarm overlay network's VIP, translated only for sockets of
    /// containers on it (bit `n - 1` of their `SockNetns::overlays`); the socket hooks alone
    /// answer it.
    pub overlay: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub index: u32,
}

/// A backend: container address and target port (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOf<A: Address> {
    pub addr: A,
    pub port: u16,
    pub _pad: [u8; 2],
}

pub type Backend = BackendOf<u32>;
pub type Backend6 = BackendOf<In6Addr>;

/// Run-time settings, one element at index 0 of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The uplink's address masqueraded connections leave with (network byte order); 0 while
    /// the uplink has no address (masquerade then passes packets untranslated).
    pub masquerade_addr: u32,
    /// The uplink, where replies of published ports are sent straight to (see
    /// `translate.rs` in the kernel crate for why they cannot go through the host's stack).
    pub uplink_ifindex: u32,
    /// Source ports for masquerade, host byte order, inclusive. Kept apart from the host's own
    /// ephemeral range (32768-60999) so a translated port never meets a local socket's.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Bumped by the agent whenever rules or endpoints change, so that tracked connections
    /// are judged again (see `CtEntry::policy_generation`).
    pub policy_generation: u32,
    /// The network namespace the agent serves (SO_NETNS_COOKIE): socket hooks run for every
    /// process of their cgroup, and translate only connections made in this namespace.
    pub netns_cookie: u64,
    /// Policy rules (after port expansion) the policy maps were compiled from, for whoever
    /// reads the config; the programs go by [`PolicyMeta`].
    pub rule_count: u32,
    /// 1: tc ingress of the uplink drops the deny list's sources (XDP is not attached there:
    /// `--xdp auto` keeps XDP off uplinks that are not physical devices, where tc is cheaper).
    pub deny_at_tc: u32,
    /// The uplink's global IPv6 address masqueraded IPv6 connections leave with (NAT66); `::`
    /// while the uplink has none (IPv6 masquerade then passes packets untranslated).
    pub masquerade_addr6: In6Addr,
}

/// What a flow event reports, in [`FlowEvent::kind`].
pub mod flow_kind {
    /// A connection was tracked for the first time (its first packet passed).
    pub const NEW: u8 = 1;
    /// A TCP connection saw its first FIN or RST (counters of both directions so far).
    pub const CLOSE: u8 = 2;
    /// A packet was dropped (`drop_reason` says why).
    pub const DROP: u8 = 3;
    /// An ICMP echo connection's first answer (the echo reply), as that packet was: Hubble
    /// tells answered pings from unanswered ones by it (`hubble_icmp_total{type="EchoReply"}`).
    /// Only ICMP: a TCP answer is the SYN-ACK, which the per-packet flag counters count, and
    /// UDP answers get no event (a flood of answered datagrams would double the events).
    pub const REPLY: u8 = 4;
}

/// One flow event from the kernel (ring buffer), per connection or per drop, never per
/// forwarded packet, for both families: addresses in IPv6 form (IPv4 ones mapped,
/// ::ffff:a.b.c.d) and `family` saying which it was. Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// Counters of the connection's first direction, and of its replies.
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// The connection as its first packet was (before translation), or the dropped packet.
    pub tuple: CtKey6,
    /// Where the translation sent it (destination for DNAT/VIP, source for masquerade).
    pub nat_addr: In6Addr,
    pub nat_port: u16,
    /// One of [`flow_kind`].
    pub kind: u8,
    /// One of [`ct_origin`] (0 for drops).
    pub origin: u8,
    /// One of [`ct_rewrite`].
    pub rewrite: u8,
    /// TCP flags seen (both directions for CLOSE).
    pub tcp_flags: u8,
    /// A [`DropReason`] for DROP, else 0.
    pub drop_reason: u8,
    /// One of [`hook`]: where it happened.
    pub hook: u8,
    /// The interface it happened on.
    pub ifindex: u32,
    /// ICMP: the type and code of the packet the event is about (the first packet for NEW,
    /// the answer for REPLY, the dropped packet for DROP); 0 for other protocols.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// [`ct_rewrite::HAIRPIN`] only: the destination port (the destination address being the
    /// tuple's source); `nat_addr`:`nat_port` is then the translated source.
    pub hairpin_port: u16,
    /// 4 or 6: the family of the packet the event is about (a connection translated from
    /// one family to the other is reported in its first packet's).
    pub family: u8,
    pub _pad: [u8; 7],
}

/// Per-packet TCP flag counters (`dp_tcp_flags_v1`, a per-CPU array of u64): slot
/// `point * KINDS + kind`. Hubble's tcp metric counts, for each forwarded flow, FIN, SYN (without
/// ACK), SYN-ACK and RST (a FIN+ACK counts FIN; ACK, PSH and URG alone count nothing); the
/// programs count the same for every TCP packet they pass (not for the ones they drop, which
/// are not forwarded), each at one point only, although some cross two of our hooks.
pub mod tcp_flag_count {
    use crate::tcp_flag;

    pub const SYN: u32 = 0;
    pub const SYN_ACK: u32 = 1;
    pub const FIN: u32 = 2;
    pub const RST: u32 = 3;
    pub const KINDS: u32 = 4;

    /// Where a packet is counted. A container's packet is counted where it leaves the
    /// container (tc ingress of its veth), also when it goes on out of the uplink; a packet
    /// from outside where it arrives (tc ingress of the uplink); at tc egress of the uplink
    /// only the host's own packets (no ingress interface: every forwarded packet was counted
    /// where it came in). Packets a container sends to the host's own addresses are not
    /// counted, as the host's packets to a container cross none of our hooks: a connection
    /// between the host and a container is left out both ways rather than counted one way.
    pub const FROM_CONTAINER: u32 = 0;
    pub const FROM_OUTSIDE: u32 = 1;
    pub const FROM_HOST: u32 = 2;
    pub const POINTS: u32 = 3;
    pub const SLOTS: u32 = KINDS * POINTS;

    /// The names Hubble gives the kinds (`hubble_tcp_flags_total{flag}`).
    pub const NAMES: [&str; KINDS as usize] = ["SYN", "SYN-ACK", "FIN", "RST"];

    /// The kinds a packet with TCP `flags` counts for, as a bit set (bit `kind`).
    pub fn kinds(flags: u8) -> u32 {
        let mut kinds = 0;
        if flags & tcp_flag::SYN != 0 {
            kinds |= if flags & tcp_flag::ACK != 0 {
                1 << SYN_ACK
            } else {
                1 << SYN
            };
        }
        if flags & tcp_flag::FIN != 0 {
            kinds |= 1 << FIN;
        }
        if flags & tcp_flag::RST != 0 {
            kinds |= 1 << RST;
        }
        kinds
    }
}

/// Size of the flow ring buffer: at 128 bytes an event (with the ring's 8-byte header), 1 MiB
/// holds about 8,000 events between two reads of the agent (which reads every 50 ms at most,
/// and whenever 64 events wait).
pub const FLOW_RING_BYTES: u32 = 1 << 20;

/// Why a packet was dropped. One numbering for kernel counters, flow records and metric labels,
/// and it is Cilium's (bpf/lib/common.h `DROP_*`, flow.proto `DropReason`, which Hubble's
/// clients and dashboards read): the value is the number Hubble shows, [`DropReason::desc`] the
/// name. Values are Cilium's and never change; add reasons, with Cilium's numbers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Docker's isolation refused it with no user rule deciding (other network, `icc: false`,
    /// `internal`, routed from outside straight to a container): Cilium's default deny.
    PolicyDenied = 133,
    /// A header is truncated or inconsistent (IPv4 IHL < 5, total length beyond the packet).
    Malformed = 134,
    /// The connection table is full: no new translation could be recorded.
    CtMapInsertionFailed = 155,
    /// A service has no backend.
    ServiceBackendNotFound = 158,
    /// Masquerade found no free source port for the destination after its probes.
    NoMappingForNatMasquerade = 167,
    /// A later fragment of a datagram whose first fragment was not seen (or is too old): its
    /// translation and verdict are unknown, so it is never delivered.
    FragmentNotFound = 175,
    /// A TCP or UDP header the receiving kernel would drop anyway: TCP with SYN and FIN, with
    /// no flags, or with a data offset below 5; UDP whose length disagrees with the IP
    /// packet's. Dropped before it can create a conntrack entry.
    InvalidL4Header = 135,
    /// A user `deny` rule matched (Cilium: a deny policy).
    PolicyDeny = 181,
}

impl DropReason {
    /// Slots of the drop counter array: every reason's value is below this (Cilium's drop
    /// codes are one byte).
    pub const SLOTS: u32 = 256;
    pub const ALL: [DropReason; 8] = [
        DropReason::PolicyDenied,
        DropReason::Malformed,
        DropReason::CtMapInsertionFailed,
        DropReason::ServiceBackendNotFound,
        DropReason::NoMappingForNatMasquerade,
        DropReason::FragmentNotFound,
        DropReason::InvalidL4Header,
        DropReason::PolicyDeny,
    ];

    /// The reason as Hubble names it (flow.proto's `DropReason`, `drop_reason_desc`).
    pub fn desc(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "POLICY_DENIED",
            DropReason::Malformed => "INVALID_PACKET_DROPPED",
            DropReason::CtMapInsertionFailed => "CT_MAP_INSERTION_FAILED",
            DropReason::ServiceBackendNotFound => "SERVICE_BACKEND_NOT_FOUND",
            DropReason::NoMappingForNatMasquerade => "NO_MAPPING_FOR_NAT_MASQUERADE",
            DropReason::FragmentNotFound => "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
            DropReason::InvalidL4Header => "CT_TRUNCATED_OR_INVALID_HEADER",
            DropReason::PolicyDeny => "POLICY_DENY",
        }
    }

    /// The reason as Hubble's metrics and compact output write it (Cilium's
    /// `monitor/api.DropReason` text): `Policy denied`, `Service backend not found`, ...
    pub fn text(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "Policy denied",
            DropReason::Malformed => "Invalid packet",
            DropReason::CtMapInsertionFailed => "CT: Map insertion failed",
            DropReason::ServiceBackendNotFound => "Service backend not found",
            DropReason::NoMappingForNatMasquerade => "No mapping for NAT masquerade",
            DropReason::FragmentNotFound => "First logical datagram fragment not found",
            DropReason::InvalidL4Header => "CT: Truncated or invalid header",
            DropReason::PolicyDeny => "Policy denied by denylist",
        }
    }

    pub fn from_u32(value: u32) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| *r as u32 == value)
    }
}

const _: () = assert!((DropReason::PolicyDeny as u32) < DropReason::SLOTS);

const _: () = assert!(core::mem::size_of::<IfaceStatsKey>() == 8);
const _: () = assert!(core::mem::size_of::<IfaceStats>() == 16);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 32);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyVerdict>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyPrefix>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyMeta>() == 80);
const _: () = assert!(POLICY_MAX_TUPLES <= 64);
const _: () = assert!(core::mem::size_of::<PrefixKey>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 72);
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevNat>() == 8);
const _: () = assert!(core::mem::size_of::<SockNetns>() == 8);
const _: () = assert!(core::mem::size_of::<SockLbKey>() == 12);
const _: () = assert!(core::mem::size_of::<SockLb>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragEntry>() == 8);
const _: () = assert!(core::mem::size_of::<DropAggKey>() == 8);
const _: () = assert!(core::mem::size_of::<DropAggValue>() == 48);
const _: () = assert!(core::mem::size_of::<DropBudget>() == 16);
const _: () = assert!(core::mem::size_of::<PortTarget>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceInfo>() == 12);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 48);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 120);
const _: () = assert!(core::mem::size_of::<In6Addr>() == 16);
const _: () = assert!(core::mem::size_of::<EndpointInfo6>() == 44);
const _: () = assert!(core::mem::size_of::<PolicyPrefix6>() == 20);
const _: () = assert!(core::mem::size_of::<PrefixKey6>() == 20);
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);
const _: () = assert!(core::mem::size_of::<CtEntry6>() == 112);
const _: () = assert!(core::mem::size_of::<FragKey6>() == 40);
const _: () = assert!(core::mem::size_of::<DropAggKey6>() == 20);
const _: () = assert!(core::mem::size_of::<DropAggValue6>() == 72);
const _: () = assert!(core::mem::size_of::<PortKey6>() == 20);
const _: () = assert!(core::mem::size_of::<PortTarget6>() == 20);
const _: () = assert!(core::mem::size_of::<SockRevNatKey6>() == 32);
const _: () = assert!(core::mem::size_of::<SockRevNat6>() == 20);
const _: () = assert!(core::mem::size_of::<SockLbKey6>() == 36);
const _: () = assert!(core::mem::size_of::<SockLb6>() == 32);
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceStatsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IfaceStats {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::EndpointInfoOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::CtKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::CtEntryOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::PortKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::PortTargetOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::SockRevNatKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::SockRevNatOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockNetns {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::SockLbKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::SockLbOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::ServiceKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::BackendOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyVerdict {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::PolicyPrefixOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyMeta {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::PrefixKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::In6Addr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragEntry {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::DropAggKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: super::Address> aya::Pod for super::DropAggValueOf<A> {}
}

//! Every map of the dataplane, in one place, with its purpose and size. All are pinned by name
//! under the agent's pin directory so that an agent restart keeps them (and the connections they
//! describe).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf,
    },
};
use dataplane_common::{
    Backend, Backend6, BackendKey, Config, CtEntry, CtEntry6, CtKey, CtKey6, DropAggKey,
    DropAggKey6, DropAggValue, DropAggValue6, DropBudget, DropReason, EndpointInfo, EndpointInfo6,
    FLOW_RING_BYTES, FragEntry, FragKey, FragKey6, IfaceStats, IfaceStatsKey, In6Addr,
    MAGLEV_DEFAULT_SIZE, PolicyKey, PolicyMeta, PolicyPrefix, PolicyPrefix6, PolicyVerdict,
    PortKey, PortKey6, PortTarget, PortTarget6, ServiceInfo, ServiceKey, ServiceKey6, SockLb,
    SockLb6, SockLbKey, SockLbKey6, SockNetns, SockRevNat, SockRevNat6, SockRevNatKey,
    SockRevNatKey6, capacity, maglev_elements, tcp_flag_count,
};

/// Packets and bytes per (interface, hook); per-CPU so the hot path never contends.
#[map(name = "dp_iface_stats_v1")]
pub static IFACE_STATS: PerCpuHashMap<IfaceStatsKey, IfaceStats> =
    PerCpuHashMap::pinned(capacity::IFACE_STATS, 0);

/// Drops by reason (index = `DropReason as u32`, Cilium's drop codes, so 256 slots: 2 KiB
/// per CPU); per-CPU, summed by the agent. v2: the reasons took Cilium's numbers.
#[map(name = "dp_drops_v2")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::SLOTS, 0);

/// TCP flags of the packets the programs pass, per CPU (slot `point * KINDS + kind`, see
/// `tcp_flag_count`): 4 kinds (Hubble's SYN, SYN-ACK, FIN, RST) at 3 counting points, 12
/// counters, 96 bytes a CPU. Per packet, so it is a counter and never an event; written by the
/// programs only, summed by the agent into `hubble_tcp_flags_total`.
#[map(name = "dp_tcp_flags_v1")]
pub static TCP_FLAGS: PerCpuArray<u64> = PerCpuArray::pinned(tcp_flag_count::SLOTS, 0);

/// Container interfaces by IPv4 address (network byte order), written by the agent's
/// reconciler only.
/// The same for IPv6 packets: each family's counters apart, as Hubble's `family` label is.
#[map(name = "dp_tcp_flags6_v1")]
pub static TCP_FLAGS6: PerCpuArray<u64> = PerCpuArray::pinned(tcp_flag_count::SLOTS, 0);

#[map(name = "dp_endpoints_v2")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Conntrack of established connections, one entry per direction (see `capacity::CONNTRACK`
/// for the size and why it is a plain hash). A connection gets here only once its handshake
/// completed (moved from `CONNTRACK_NEW`), so a flood of SYNs from spoofed sources never
/// fills it. Written by the programs; the agent only deletes expired entries.
#[map(name = "dp_ct_v2")]
pub static CONNTRACK: HashMap<CtKey, CtEntry> =
    HashMap::pinned(capacity::CONNTRACK, BPF_F_NO_PREALLOC);

/// Conntrack of connections not yet established, both directions. LRU, so that when it is
/// full a new connection evicts the least recently used unestablished one (Linux's early
/// drop of unassured entries) instead of being refused: an attacker who can send SYNs but
/// not complete handshakes holds nothing for long. The agent sets its size from
/// `--ct-max-entries` (`capacity::conntrack_new`); LRU maps are preallocated.
#[map(name = "dp_ct_new_v1")]
pub static CONNTRACK_NEW: LruHashMap<CtKey, CtEntry> =
    LruHashMap::pinned(capacity::CONNTRACK_NEW_MIN, 0);

/// First fragments of recent IPv4 datagrams: the ports (and fate) the datagram's later
/// fragments, which carry no L4 header, stand for (Cilium's fragment map). LRU: entries are
/// never deleted, the oldest datagram makes room (see `capacity::FRAGMENTS`).
#[map(name = "dp_fragments_v1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Drop events not yet reported, per (source, reason, hook) (see `capacity::DROP_AGGREGATES`).
#[map(name = "dp_drop_agg_v1")]
pub static DROP_AGGREGATES: LruHashMap<DropAggKey, DropAggValue> =
    LruHashMap::pinned(capacity::DROP_AGGREGATES, 0);

/// Token bucket of drop events, per CPU (slot 0): bounds the events a flood of distinct
/// sources can make.
#[map(name = "dp_drop_budget_v1")]
pub static DROP_EVENT_BUDGET: PerCpuArray<DropBudget> = PerCpuArray::pinned(1, 0);

/// Published ports, written by the reconciler only.
#[map(name = "dp_ports_v2")]
pub static PORTS: HashMap<PortKey, PortTarget> = HashMap::pinned(capacity::PORTS, 0);

/// The host's own addresses (network byte order), written by the reconciler only.
#[map(name = "dp_local_addrs_v1")]
pub static LOCAL_ADDRS: HashMap<u32, u8> = HashMap::pinned(capacity::LOCAL_ADDRS, 0);

/// Run-time settings at index 0, written by the reconciler only.
#[map(name = "dp_config_v5")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Service VIPs, written by the reconciler only. The agent sets the size (`--max-services`).
#[map(name = "dp_services_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceInfo> = HashMap::pinned(capacity::SERVICES, 0);

/// Backends of every service, written by the reconciler only; allocated on use.
#[map(name = "dp_backends_v1")]
pub static BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

/// Maglev tables: slot `id * (M + 1) + h` holds a backend index of service `id`, two slots
/// per element, M = `--maglev-size` (16381 by default: 64 KiB a service). Flat and mmap-able
/// so the agent writes a whole table as memory, not M syscalls; its size follows
/// `--max-services` and `--maglev-size`, set at load (ids start at 1: one spare table).
#[map(name = "dp_maglev_v2")]
pub static MAGLEV: Array<[u32; 2]> = Array::pinned(
    maglev_elements(capacity::SERVICES, MAGLEV_DEFAULT_SIZE) as u32,
    BPF_F_MMAPABLE,
);

/// Round-robin position per service id, per CPU (no atomics on the hot path).
#[map(name = "dp_rr_v1")]
pub static RR_POSITION: PerCpuArray<u32> = PerCpuArray::pinned(capacity::SERVICES + 1, 0);

/// Flow events to the agent: one per new connection, per TCP close, per drop (never per
/// forwarded packet, so logging costs no throughput). See `FLOW_RING_BYTES` for the size.
#[map(name = "dp_flow_events_v2")]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(FLOW_RING_BYTES, 0);

/// Events that found the ring full (per CPU, slot 0): the kernel does not count failed
/// reserves, so the programs do, and the agent reports them.
#[map(name = "dp_flow_events_lost_v1")]
pub static FLOW_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// The compiled policy: (half, source kind and value, destination kind and value, protocol,
/// port) -> the first matching rule's index and action. Two halves (`PolicyKey::slot`): the
/// reconciler writes a change into the half not live, switches `POLICY_META`, then empties the
/// old half, so a connection is judged by one rule set or the other, never a mix. Each half
/// holds `capacity::POLICY_ENTRIES` (see there for the sizing); allocated on use. Written by
/// the reconciler only.
#[map(name = "dp_policy_v1")]
pub static POLICY: HashMap<PolicyKey, PolicyVerdict> =
    HashMap::pinned(capacity::POLICY_ENTRIES * 2, BPF_F_NO_PREALLOC);

/// The policies' CIDR prefixes, both halves (the half is the key's first 32 bits): an
/// address's longest match is its CIDR class. `capacity::POLICY_PREFIXES` per half; an LPM
/// trie is allocated on use (aya adds the flag). Written by the reconciler only.
#[map(name = "dp_policy_prefixes_v1")]
pub static POLICY_PREFIXES: LpmTrie<PolicyPrefix, u32> =
    LpmTrie::pinned(capacity::POLICY_PREFIXES * 2, 0);

/// The live half of the policy maps and the key shapes it has (index 0), written by the
/// reconciler only.
#[map(name = "dp_policy_meta_v1")]
pub static POLICY_META: Array<PolicyMeta> = Array::pinned(1, 0);

/// Outside source prefixes XDP drops on the uplink, written by the reconciler only.
#[map(name = "dp_deny_sources_v1")]
pub static DENY_SOURCES: LpmTrie<u32, u8> = LpmTrie::pinned(capacity::DENY_SOURCES, 0);

/// Socket-level translations of host processes, by (socket cookie, backend address and port):
/// the VIP or published port the socket asked for, which recvmsg4 and getpeername4 put back.
/// Written by the connect4 and sendmsg4 hooks only; LRU because nothing tells the programs
/// when a socket closes (see `capacity::SOCK_REV_NAT` for the size and what an eviction
/// costs).
#[map(name = "dp_sock_rev_nat_v1")]
pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, SockRevNat> =
    LruHashMap::pinned(capacity::SOCK_REV_NAT, 0);

/// Containers' network namespaces (netns cookie -> the container's address): sockets made in
/// one of them are translated by the cgroup hooks too, judged with the container as source.
/// Written by the reconciler only; one entry per container (`capacity::SOCK_NETNS`).
#[map(name = "dp_sock_netns_v1")]
pub static SOCK_NETNS: HashMap<u64, SockNetns> = HashMap::pinned(capacity::SOCK_NETNS, 0);

/// Containers' connections translated at the socket, between connect()/sendmsg() and their
/// first packet: the container veth's tc program finds the service address here, so it
/// tracks and reports the connection as the service's, untranslated. Written by the cgroup
/// hooks, read by tc; LRU (see `capacity::SOCK_LB` for the size and what an eviction costs).
#[map(name = "dp_sock_lb_v1")]
pub static SOCK_LB: LruHashMap<SockLbKey, SockLb> = LruHashMap::pinned(capacity::SOCK_LB, 0);

// IPv6: the same maps, keyed by IPv6 addresses (see `map_names`' IPv6 part for what is
// shared). Sizes as their IPv4 namesakes': the agent sets the same load-time sizes on both,
// and the maps allocated on use cost nothing until IPv6 traffic comes. The preallocated LRU
// ones cost their IPv4 namesake's count at about 1.6 times the bytes.

#[map(name = "dp_ct6_v1")]
pub static CONNTRACK6: HashMap<CtKey6, CtEntry6> =
    HashMap::pinned(capacity::CONNTRACK, BPF_F_NO_PREALLOC);

#[map(name = "dp_ct6_new_v1")]
pub static CONNTRACK6_NEW: LruHashMap<CtKey6, CtEntry6> =
    LruHashMap::pinned(capacity::CONNTRACK_NEW_MIN, 0);

#[map(name = "dp_fragments6_v1")]
pub static FRAGMENTS6: LruHashMap<FragKey6, FragEntry> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

#[map(name = "dp_drop_agg6_v1")]
pub static DROP_AGGREGATES6: LruHashMap<DropAggKey6, DropAggValue6> =
    LruHashMap::pinned(capacity::DROP_AGGREGATES, 0);

#[map(name = "dp_endpoints6_v1")]
pub static ENDPOINTS6: HashMap<In6Addr, EndpointInfo6> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map(name = "dp_ports6_v1")]
pub static PORTS6: HashMap<PortKey6, PortTarget6> = HashMap::pinned(capacity::PORTS, 0);

#[map(name = "dp_local_addrs6_v1")]
pub static LOCAL_ADDRS6: HashMap<In6Addr, u8> = HashMap::pinned(capacity::LOCAL_ADDRS, 0);

#[map(name = "dp_services6_v1")]
pub static SERVICES6: HashMap<ServiceKey6, ServiceInfo> = HashMap::pinned(capacity::SERVICES, 0);

#[map(name = "dp_backends6_v1")]
pub static BACKENDS6: HashMap<BackendKey, Backend6> =
    HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "dp_policy_prefixes6_v1")]
pub static POLICY_PREFIXES6: LpmTrie<PolicyPrefix6, u32> =
    LpmTrie::pinned(capacity::POLICY_PREFIXES * 2, 0);

#[map(name = "dp_deny_sources6_v1")]
pub static DENY_SOURCES6: LpmTrie<In6Addr, u8> = LpmTrie::pinned(capacity::DENY_SOURCES, 0);

#[map(name = "dp_sock_rev_nat6_v1")]
pub static SOCK_REV_NAT6: LruHashMap<SockRevNatKey6, SockRevNat6> =
    LruHashMap::pinned(capacity::SOCK_REV_NAT, 0);

#[map(name = "dp_sock_lb6_v1")]
pub static SOCK_LB6: LruHashMap<SockLbKey6, SockLb6> = LruHashMap::pinned(capacity::SOCK_LB, 0);

/// Per-CPU scratch space for the IPv6 programs: the new connection being tracked (about 150
/// bytes) does not fit on their stack (512 bytes for every frame together) beside the packet,
/// its key and conntrack's entry. Not pinned: it holds nothing from one program run to the
/// next.
#[map(name = "dp_scratch6")]
pub static NEW_CONNECTION6: PerCpuArray<crate::conntrack::NewConnectionOf<In6Addr>> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space of the IPv6 balancing program (`balance6.rs`): the packet it works
/// on. Not pinned, as `dp_scratch6`.
#[map(name = "dp_scratch6_pkt")]
pub static BALANCE6_PACKET: PerCpuArray<crate::balance6::Packet6> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space of the NAT64 program's ICMP error translation (`nat64.rs`): the
/// words of its checksum difference and the headers it writes, too big for the stack beside
/// the program's main frame. Not pinned, as `dp_scratch6`.
#[map(name = "dp_scratch64")]
pub static NAT64_ICMP: PerCpuArray<crate::nat64::IcmpScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU hand-over from an IPv6 program to the drop reporter it tail-calls
/// (`dp_drop6`): the verdict the program reached. A tail call, because the drop's flow event
/// (its aggregation and the event's frames) does not fit on the IPv6 programs' stack beside
/// their deepest chain. Not pinned: it holds nothing from one program run to the next.
#[map(name = "dp_drop6_next")]
pub static DROP6_NEXT: PerCpuArray<crate::translate6::PendingDrop> =
    PerCpuArray::with_max_entries(1, 0);

/// The IPv6 programs the IPv4 tc programs tail-call for each IPv6 frame, by hook number
/// (`dataplane_common::hook`: 1 container ingress, 2 uplink ingress, 3 uplink egress; slot 0
/// is the drop reporter, `dp_drop6`; slot 4 NAT64, `dp_nat64`, which the IPv4 container
/// program tail-calls too; 8 slots, v2: v1 had 4).
/// A tail call gives the IPv6 path the verifier's whole 512-byte stack: the IPv4 program's
/// main frame takes 392 of it. Pinned, so that across an agent restart the programs still
/// attached find IPv6 programs here until the new ones replace them; written by the loader
/// only. An empty slot (an older loader) leaves IPv6 frames passing untouched. Slot 5
/// (`PROGS6_BALANCE_SLOT`): the IPv6 ingress programs' own tail call, for new connections to a
/// service (`balance6.rs`).
#[map(name = "dp_progs6_v2")]
pub static PROGS6: ProgramArray = ProgramArray::pinned(8, 0);

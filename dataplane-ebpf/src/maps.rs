//! Every map of the dataplane, in one place, with its purpose and size. All are pinned by name
//! under the agent's pin directory so that an agent restart keeps them (and the connections they
//! describe).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};
use dataplane_common::{DropReason, EndpointInfo, IfaceStats, IfaceStatsKey, capacity};

/// Packets and bytes per (interface, hook); per-CPU so the hot path never contends.
#[map(name = "dp_iface_stats_v1")]
pub static IFACE_STATS: PerCpuHashMap<IfaceStatsKey, IfaceStats> =
    PerCpuHashMap::pinned(capacity::IFACE_STATS, 0);

/// Drops by reason (index = `DropReason as u32`); per-CPU, summed by the agent.
#[map(name = "dp_drops_v1")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::SLOTS, 0);

/// Container interfaces by IPv4 address (network byte order), written by the agent's
/// reconciler only.
#[map(name = "dp_endpoints_v1")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

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
    pub const DROPS: &str = "dp_drops_v1";
    /// Container endpoints by IPv4 address: where a packet for that address is delivered.
    pub const ENDPOINTS: &str = "dp_endpoints_v1";
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
}

/// Capacities of the maps (see the map declarations in `dataplane-ebpf/src/maps.rs` for the
/// reasoning behind each size).
pub mod capacity {
    /// Interfaces times hooks: a host with 1,000 containers has about 1,000 veths with one hook
    /// each plus the uplink's three hooks; 4096 leaves room for churn until the agent prunes.
    pub const IFACE_STATS: u32 = 4096;
    /// One entry per container interface; Docker's default address pools hold far fewer
    /// containers per host than this.
    pub const ENDPOINTS: u32 = 16384;
}

/// The hook a counter belongs to. Stored as a plain `u32` in [`IfaceStatsKey::hook`].
pub mod hook {
    pub const CONTAINER_INGRESS: u32 = 1;
    pub const UPLINK_INGRESS: u32 = 2;
    pub const UPLINK_EGRESS: u32 = 3;
    pub const UPLINK_XDP: u32 = 4;

    /// The hook's name as `dataplane status` prints it.
    pub fn name(hook: u32) -> &'static str {
        match hook {
            CONTAINER_INGRESS => "tc-ingress(container)",
            UPLINK_INGRESS => "tc-ingress(uplink)",
            UPLINK_EGRESS => "tc-egress(uplink)",
            UPLINK_XDP => "xdp(uplink)",
            _ => "unknown",
        }
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

/// Where packets for a container's address go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Host-side veth of the container interface.
    pub ifindex: u32,
    /// Index of the network in the agent's model (stable while the network exists).
    pub network_id: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Why a packet was dropped. One numbering for kernel counters, flow records and metric labels
/// (like Cilium's drop_reasons.h, shared with flow.proto). Values are stable: add, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header is truncated or inconsistent (IPv4 IHL < 5, total length beyond the packet).
    Malformed = 1,
    /// A policy rule denied the connection.
    PolicyDenied = 2,
    /// The connection table is full: no new translation could be recorded.
    CtMapInsertionFailed = 3,
    /// A service has no backend.
    NoServiceBackend = 4,
}

impl DropReason {
    /// Slots of the drop counter array: every reason's value is below this.
    pub const SLOTS: u32 = 16;
    pub const ALL: [DropReason; 4] = [
        DropReason::Malformed,
        DropReason::PolicyDenied,
        DropReason::CtMapInsertionFailed,
        DropReason::NoServiceBackend,
    ];

    /// The reason as Hubble names it (`drop_reason_desc`).
    pub fn desc(self) -> &'static str {
        match self {
            DropReason::Malformed => "INVALID_PACKET_DROPPED",
            DropReason::PolicyDenied => "POLICY_DENIED",
            DropReason::CtMapInsertionFailed => "CT_MAP_INSERTION_FAILED",
            DropReason::NoServiceBackend => "NO_SERVICE_BACKEND",
        }
    }

    pub fn from_u32(value: u32) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| *r as u32 == value)
    }
}

const _: () = assert!(core::mem::size_of::<IfaceStatsKey>() == 8);
const _: () = assert!(core::mem::size_of::<IfaceStats>() == 16);
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceStatsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IfaceStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointInfo {}
}

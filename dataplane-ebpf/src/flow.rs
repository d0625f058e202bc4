//! Flow events: what the agent turns into Hubble-style flow records. Emitted once per
//! connection (new, first close) and per drop; a full ring counts the loss instead.

use aya_ebpf::{Global, helpers::bpf_ktime_get_ns};
use dataplane_common::{CtEntry, CtKey, DropReason, FlowEvent, flow_kind};

use crate::maps::{CONNTRACK, FLOW_EVENTS, FLOW_EVENTS_LOST};

/// Whether flow events are sent at all: a load-time setting (`--flow-events off` on the agent),
/// so the cost of flow logging can be measured against none.
#[unsafe(no_mangle)]
static FLOW_EVENTS_ON: Global<u8> = Global::new(1);

#[inline(always)]
fn send(event: FlowEvent) {
    if FLOW_EVENTS_ON.load() == 0 {
        return;
    }
    if FLOW_EVENTS.output::<FlowEvent>(&event, 0).is_err()
        && let Some(lost) = FLOW_EVENTS_LOST.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot: no concurrent writer.
        unsafe { *lost += 1 };
    }
}

/// A connection was just tracked: `forward` is its first packet's key.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn new_connection(
    forward: &CtKey,
    origin: u8,
    rewrite: u8,
    nat_addr: u32,
    nat_port: u16,
    len: u32,
    tcp_flags: u8,
    hook: u32,
    ifindex: u32,
) {
    send(FlowEvent {
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        packets: 1,
        bytes: u64::from(len),
        tuple: *forward,
        nat_addr,
        nat_port,
        kind: flow_kind::NEW,
        origin,
        rewrite,
        tcp_flags,
        hook: hook as u8,
        ifindex,
        ..FlowEvent::default()
    });
}

/// `entry` (of `key`) just saw its connection's first FIN or RST. Reports the connection from
/// its forward side with both directions' counters. Reads fields through the map pointers
/// rather than copying entries around: fewer stack copies for the verifier to follow.
#[inline(always)]
pub fn closed(key: &CtKey, entry: *const CtEntry, hook: u32, ifindex: u32) {
    // SAFETY: `entry` and `peer` are map values from lookups in this program run.
    unsafe {
        let peer_key = (*entry).peer;
        let Some(peer) = CONNTRACK.get_ptr(&peer_key) else {
            return;
        };
        let (forward, reply, forward_key) = if (*entry).is_reply == 1 {
            (peer, entry, peer_key)
        } else {
            (entry, peer, *key)
        };
        send(FlowEvent {
            time_ns: bpf_ktime_get_ns(),
            packets: (*forward).packets,
            bytes: (*forward).bytes,
            reply_packets: (*reply).packets,
            reply_bytes: (*reply).bytes,
            tuple: forward_key,
            nat_addr: (*forward).nat_addr,
            nat_port: (*forward).nat_port,
            kind: flow_kind::CLOSE,
            origin: (*forward).origin,
            rewrite: (*forward).rewrite,
            tcp_flags: (*forward).tcp_flags | (*reply).tcp_flags,
            hook: hook as u8,
            ifindex,
            ..FlowEvent::default()
        });
    }
}

/// A packet is being dropped for `reason`: `tuple` and `tcp_flags` are what it was when it
/// arrived (zero where it could not be read).
#[inline(always)]
pub fn dropped(
    tuple: &CtKey,
    tcp_flags: u8,
    len: u32,
    reason: DropReason,
    hook: u32,
    ifindex: u32,
) {
    send(FlowEvent {
        // SAFETY: a helper without arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        packets: 1,
        bytes: u64::from(len),
        tuple: *tuple,
        kind: flow_kind::DROP,
        tcp_flags,
        drop_reason: reason as u8,
        hook: hook as u8,
        ifindex,
        ..FlowEvent::default()
    });
}

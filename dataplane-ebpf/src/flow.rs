//! Flow events: what the agent turns into Hubble-style flow records. Emitted once per
//! connection (new, first close) and for drops, aggregated; a full ring counts the loss
//! instead.
//!
//! Drops are where a flood lands, so their events are bounded twice: per (source, reason,
//! hook) at most one event per `drop_events::INTERVAL_NS`, carrying how many drops it stands
//! for (the others wait in `DROP_AGGREGATES` for the next event, or for the agent, which
//! collects what is left pending); and overall at most `drop_events::PER_SEC_PER_CPU` events a
//! second per CPU (a spoofed flood has a new source in every packet). The per-reason counters
//! (`stats::count_drop`) count every drop regardless.

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use dataplane_common::{
    Address, CtEntryOf, CtKeyOf, DropAggKeyOf, DropAggValueOf, DropReason, FlowEvent, drop_events,
    flow_kind, tcp_flag,
};

use crate::{
    family::Family,
    maps::{DROP_EVENT_BUDGET, FLOW_EVENTS, FLOW_EVENTS_LOST},
};

/// Whether flow events are sent at all: a load-time setting (`--flow-events off` on the agent),
/// so the cost of flow logging can be measured against none.
#[unsafe(no_mangle)]
static FLOW_EVENTS_ON: Global<u8> = Global::new(1);

#[inline(always)]
fn on() -> bool {
    FLOW_EVENTS_ON.load() != 0
}

/// Unread bytes in the ring from which an event wakes the agent. Below it no event wakes it:
/// the agent reads the ring on a tick (`flows::FLOW_TICK`, 50 ms) as well, so a quiet host's
/// events wait at most that long, and under load the agent wakes once per 64 events instead of
/// up to once per event (each wakeup is an epoll return and a thread handoff, which the
/// profile showed as a fifth of the agent's time at 3k new connections/s).
const WAKEUP_PENDING_BYTES: u64 = 64 * core::mem::size_of::<FlowEvent>() as u64;

/// Writes an event straight into the ring (zeroed, then filled by `fill`): no copy of it on
/// the stack, which every frame of a program shares (512 bytes).
#[inline(always)]
fn send(fill: impl FnOnce(&mut FlowEvent)) {
    match FLOW_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut slot) => {
            let event = slot.as_mut_ptr();
            // SAFETY: the reservation holds a whole FlowEvent; zeroing makes it a valid one
            // (plain integers) before `fill` writes its fields.
            unsafe {
                core::ptr::write_bytes(event, 0, 1);
                fill(&mut *event);
            }
            let wake = if FLOW_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_PENDING_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(u64::from(wake));
        }
        None => {
            if let Some(lost) = FLOW_EVENTS_LOST.get_ptr_mut(0) {
                // SAFETY: per-CPU slot: no concurrent writer.
                unsafe { *lost += 1 };
            }
        }
    }
}

/// Writes `key` into the (zeroed) event in its family-neutral form, with its family.
#[inline(always)]
fn put_tuple<A: Address>(e: &mut FlowEvent, key: &CtKeyOf<A>) {
    key.saddr.put_in6_zeroed(&mut e.tuple.saddr);
    key.daddr.put_in6_zeroed(&mut e.tuple.daddr);
    e.tuple.sport = key.sport;
    e.tuple.dport = key.dport;
    e.tuple.proto = key.proto;
    e.family = A::FAMILY;
}

/// A connection just tracked (or, for TCP, just established), as its first packet was (or,
/// from the socket hooks, as the process asked for it). Either family; the translation's
/// address is in the tuple's (an IPv6 socket's IPv4 peer as v4-mapped).
#[derive(Clone, Copy)]
pub struct NewFlowOf<A: Address> {
    pub forward: CtKeyOf<A>,
    pub origin: u8,
    pub rewrite: u8,
    pub nat_addr: A,
    pub nat_port: u16,
    pub hairpin_port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub tcp_flags: u8,
    /// ICMP type and code of the first packet (0 for other protocols).
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub hook: u32,
    pub ifindex: u32,
}

pub type NewFlow = NewFlowOf<u32>;

/// A connection was just tracked: `forward` is its first packet's key.
#[inline(always)]
pub fn new_connection<A: Address>(flow: &NewFlowOf<A>) {
    if !on() {
        return;
    }
    send(|e| {
        // SAFETY: a helper without arguments.
        e.time_ns = unsafe { bpf_ktime_get_ns() };
        e.packets = flow.packets;
        e.bytes = flow.bytes;
        put_tuple(e, &flow.forward);
        flow.nat_addr.put_in6_zeroed(&mut e.nat_addr);
        e.nat_port = flow.nat_port;
        e.hairpin_port = flow.hairpin_port;
        e.kind = flow_kind::NEW;
        e.origin = flow.origin;
        e.rewrite = flow.rewrite;
        e.tcp_flags = flow.tcp_flags;
        e.icmp_type = flow.icmp_type;
        e.icmp_code = flow.icmp_code;
        e.hook = flow.hook as u8;
        e.ifindex = flow.ifindex;
    });
}

/// The first answer of the ICMP echo connection whose reply entry is `entry` (under `key`, the
/// answer's own key as it arrived): an event of its own, as the answer was (its type and code,
/// the entry's counters and the translation back to the connection's first side).
#[inline(always)]
pub fn replied<A: Address>(
    key: &CtKeyOf<A>,
    entry: *const CtEntryOf<A>,
    icmp_type: u8,
    icmp_code: u8,
    hook: u32,
    ifindex: u32,
) {
    if !on() {
        return;
    }
    // SAFETY: a map value from a lookup in this program run.
    send(|e| unsafe {
        e.time_ns = bpf_ktime_get_ns();
        e.packets = (*entry).packets;
        e.bytes = (*entry).bytes;
        put_tuple(e, key);
        (*entry).nat_addr.put_in6_zeroed(&mut e.nat_addr);
        e.nat_port = (*entry).nat_port;
        e.kind = flow_kind::REPLY;
        e.origin = (*entry).origin;
        e.rewrite = (*entry).rewrite;
        e.icmp_type = icmp_type;
        e.icmp_code = icmp_code;
        e.hook = hook as u8;
        e.ifindex = ifindex;
    });
}

/// The TCP connection of the forward entry `entry` (under `key`) just completed its
/// handshake: its NEW event, sent now rather than at the SYN so that SYNs nobody
/// acknowledges (a spoofed flood) make no records. Reported as its first packet was (SYN).
#[inline(always)]
pub fn established<A: Address>(
    key: &CtKeyOf<A>,
    entry: *const CtEntryOf<A>,
    hook: u32,
    ifindex: u32,
) {
    if !on() {
        return;
    }
    // SAFETY: a map value from a lookup in this program run.
    send(|e| unsafe {
        e.time_ns = bpf_ktime_get_ns();
        e.packets = (*entry).packets;
        e.bytes = (*entry).bytes;
        put_tuple(e, key);
        (*entry).nat_addr.put_in6_zeroed(&mut e.nat_addr);
        e.nat_port = (*entry).nat_port;
        e.hairpin_port = (*entry).hairpin_port;
        e.kind = flow_kind::NEW;
        e.origin = (*entry).origin;
        e.rewrite = (*entry).rewrite;
        e.tcp_flags = tcp_flag::SYN;
        e.hook = hook as u8;
        e.ifindex = ifindex;
    });
}

/// `entry` (of `key`) just saw its connection's first FIN or RST. Reports the connection from
/// its forward side with both directions' counters. Reads fields through the map pointers
/// rather than copying entries around: fewer stack copies for the verifier to follow.
#[inline(never)]
pub fn closed<A: crate::family::Family>(
    key: &CtKeyOf<A>,
    entry: *const CtEntryOf<A>,
    hook: u32,
    ifindex: u32,
) {
    if !on() {
        return;
    }
    // SAFETY: `entry` and `peer` are map values from lookups in this program run.
    unsafe {
        let peer_key = (*entry).peer;
        let Some(peer) = crate::conntrack::lookup(&peer_key) else {
            return;
        };
        let (forward, reply, forward_key) = if (*entry).is_reply == 1 {
            (peer as *const CtEntryOf<A>, entry, peer_key)
        } else {
            (entry, peer as *const CtEntryOf<A>, *key)
        };
        send(|e| {
            e.time_ns = bpf_ktime_get_ns();
            e.packets = (*forward).packets;
            e.bytes = (*forward).bytes;
            e.reply_packets = (*reply).packets;
            e.reply_bytes = (*reply).bytes;
            put_tuple(e, &forward_key);
            (*forward).nat_addr.put_in6_zeroed(&mut e.nat_addr);
            e.nat_port = (*forward).nat_port;
            e.hairpin_port = (*forward).hairpin_port;
            e.kind = flow_kind::CLOSE;
            e.origin = (*forward).origin;
            e.rewrite = (*forward).rewrite;
            e.tcp_flags = (*forward).tcp_flags | (*reply).tcp_flags;
            e.hook = hook as u8;
            e.ifindex = ifindex;
        });
    }
}

/// A packet being dropped: what it was when it arrived (zero where it could not be read).
#[derive(Clone, Copy)]
pub struct DroppedOf<A: Address> {
    pub tuple: CtKeyOf<A>,
    pub tcp_flags: u8,
    /// ICMP type and code (0 for other protocols, and where the packet ends first).
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub len: u32,
    pub reason: DropReason,
    pub hook: u32,
    pub ifindex: u32,
}

pub type Dropped = DroppedOf<u32>;

/// Takes one event from this CPU's budget, refilled at `PER_SEC_PER_CPU` a second.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(budget) = DROP_EVENT_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot: no concurrent writer.
    unsafe {
        let elapsed = now.saturating_sub((*budget).refilled_ns);
        let refill = elapsed / (1_000_000_000 / drop_events::PER_SEC_PER_CPU);
        if refill > 0 {
            (*budget).tokens = ((*budget).tokens + refill).min(drop_events::BURST);
            (*budget).refilled_ns = now;
        }
        if (*budget).tokens == 0 {
            return false;
        }
        (*budget).tokens -= 1;
    }
    true
}

/// Counts the drop `d` towards its (source, reason, hook) and sends an event when that key's
/// interval has passed and the budget allows, carrying every drop since the key's last event.
#[inline(never)]
pub fn dropped<A: Family>(d: &DroppedOf<A>) {
    if !on() {
        return;
    }
    let key = DropAggKeyOf::<A> {
        saddr: d.tuple.saddr,
        reason: d.reason as u8,
        hook: d.hook as u8,
        _pad: 0,
    };
    let (now, packets, bytes) = match A::drop_aggregates().get_ptr_mut(&key) {
        Some(agg) => {
            // SAFETY: a map value from this program run's lookup, and clock helpers without
            // arguments. Plain adds (the BPF target has no atomic read-modify-write in Rust's
            // core): CPUs dropping for the same key at once may lose an increment, in the
            // records only; the counters are exact.
            unsafe {
                // Almost every drop of a flood lands within its key's interval: the coarse
                // clock (the last tick's time, no clock source read) is enough to tell, and
                // costs a fraction of the precise one. It lags by at most a tick, so an event
                // may come that much later than the interval.
                let coarse = bpf_ktime_get_coarse_ns();
                let recent = coarse.saturating_sub((*agg).last_event_ns) < drop_events::INTERVAL_NS;
                let now = if recent { 0 } else { bpf_ktime_get_ns() };
                if recent || !take_token(now) {
                    (*agg).pending += 1;
                    (*agg).pending_bytes += u64::from(d.len);
                    (*agg).tuple = d.tuple;
                    (*agg).tcp_flags = d.tcp_flags;
                    (*agg).icmp_type = d.icmp_type;
                    (*agg).icmp_code = d.icmp_code;
                    (*agg).ifindex = d.ifindex;
                    return;
                }
                // Increments racing with this reset are lost from the records only.
                let pending = (*agg).pending;
                let pending_bytes = (*agg).pending_bytes;
                (*agg).pending = 0;
                (*agg).pending_bytes = 0;
                (*agg).last_event_ns = now;
                (now, pending + 1, pending_bytes + u64::from(d.len))
            }
        }
        None => {
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let sent = take_token(now);
            let first = DropAggValueOf::<A> {
                pending: u64::from(!sent),
                pending_bytes: if sent { 0 } else { u64::from(d.len) },
                // Without a token the first drop waits: the next one may send it.
                last_event_ns: if sent {
                    now
                } else {
                    now.saturating_sub(drop_events::INTERVAL_NS)
                },
                tuple: d.tuple,
                tcp_flags: d.tcp_flags,
                icmp_type: d.icmp_type,
                icmp_code: d.icmp_code,
                _pad: 0,
                ifindex: d.ifindex,
            };
            let _ = A::drop_aggregates().insert(&key, &first, 0);
            if !sent {
                return;
            }
            (now, 1, u64::from(d.len))
        }
    };
    send_drop(d, now, packets, bytes);
}

/// The event of drops of `d`'s key. Out of line: `dropped`'s frame plus the container hook's
/// would pass the stack's 512 bytes with the event's writes in it.
#[inline(never)]
fn send_drop<A: Address>(d: &DroppedOf<A>, now: u64, packets: u64, bytes: u64) {
    send(|e| {
        put_tuple(e, &d.tuple);
        e.kind = flow_kind::DROP;
        e.tcp_flags = d.tcp_flags;
        e.icmp_type = d.icmp_type;
        e.icmp_code = d.icmp_code;
        e.drop_reason = d.reason as u8;
        e.hook = d.hook as u8;
        e.ifindex = d.ifindex;
        e.time_ns = now;
        e.packets = packets;
        e.bytes = bytes;
    });
}

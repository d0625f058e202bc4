//! The records the agent makes itself from its walk of the conntrack table: the end of
//! connections that expired without a close event, and the counters of connections still open
//! (every `--flow-report-interval`), so that long-lived flows show their traffic before they end.

use std::collections::{BTreeMap, HashSet};

use dataplane_common::{
    CtEntry, CtKey, DropAggKey, DropAggValue, FlowEvent, drop_events, flow_kind, tcp_flag,
};

use super::decode::{self, Event, IPPROTO_TCP, Kind};

fn closing(entry: &CtEntry) -> bool {
    entry.tcp_flags & (tcp_flag::FIN | tcp_flag::RST) != 0
}

/// Final records of the connections among `doomed` (keys the collector removes) that had no
/// close record from the kernel: UDP, ICMP, and TCP that never saw FIN or RST (an unanswered
/// SYN, an idle connection timing out).
pub fn ended(entries: &BTreeMap<CtKey, CtEntry>, doomed: &[CtKey], now_ns: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for key in doomed {
        let Some(forward) = entries.get(key).filter(|e| e.is_reply == 0) else {
            continue;
        };
        // Half a connection (its other entry gone) is cleanup, not a connection ending.
        let Some(reply) = entries.get(&forward.peer) else {
            continue;
        };
        if key.proto == IPPROTO_TCP && (closing(forward) || closing(reply)) {
            continue;
        }
        events.push(decode::from_conntrack(
            key,
            forward,
            Some(reply),
            Kind::End,
            now_ns,
        ));
    }
    events
}

/// Counter records of the connections open for at least `interval_ns` that saw traffic after
/// `since_ns` (the previous report), except those being removed or closing (their last word
/// is the close or end record).
pub fn updates(
    entries: &BTreeMap<CtKey, CtEntry>,
    doomed: &[CtKey],
    since_ns: u64,
    now_ns: u64,
    interval_ns: u64,
) -> Vec<Event> {
    let doomed: HashSet<&CtKey> = doomed.iter().collect();
    let mut events = Vec::new();
    for (key, forward) in entries {
        if forward.is_reply == 1 || doomed.contains(key) {
            continue;
        }
        let reply = entries.get(&forward.peer);
        let last_seen = forward
            .last_seen_ns
            .max(reply.map_or(0, |r| r.last_seen_ns));
        let active = last_seen > since_ns;
        let long_lived = now_ns.saturating_sub(forward.created_ns) >= interval_ns;
        let closed = closing(forward) || reply.is_some_and(closing);
        if active && long_lived && !closed {
            events.push(decode::from_conntrack(
                key,
                forward,
                reply,
                Kind::Update,
                now_ns,
            ));
        }
    }
    events
}

/// The drops the kernel aggregated and has not reported yet because no later drop of the
/// same (source, reason, hook) came after the key's interval: one DROP event per such key,
/// carrying the count, for the agent to publish and then remove the key (so that the kernel
/// starts the key afresh). Keys still within their interval are the kernel's to report.
pub fn pending_drops(
    entries: &BTreeMap<DropAggKey, DropAggValue>,
    now_ns: u64,
) -> Vec<(DropAggKey, FlowEvent)> {
    entries
        .iter()
        .filter(|(_, v)| {
            v.pending > 0 && now_ns.saturating_sub(v.last_event_ns) >= drop_events::INTERVAL_NS
        })
        .map(|(k, v)| {
            let event = FlowEvent {
                time_ns: now_ns,
                packets: v.pending,
                bytes: v.pending_bytes,
                tuple: v.tuple.to_in6(),
                family: 4,
                kind: flow_kind::DROP,
                tcp_flags: v.tcp_flags,
                icmp_type: v.icmp_type,
                icmp_code: v.icmp_code,
                drop_reason: k.reason,
                hook: k.hook,
                ifindex: v.ifindex,
                ..FlowEvent::default()
            };
            (*k, event)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_left_pending_are_reported_once_their_interval_passed() {
        let key = |saddr| DropAggKey {
            saddr,
            reason: 2,
            hook: 2,
            _pad: 0,
        };
        let value = |pending, last_event_ns| DropAggValue {
            pending,
            pending_bytes: pending * 60,
            last_event_ns,
            ..DropAggValue::default()
        };
        let s = drop_events::INTERVAL_NS;
        let entries = BTreeMap::from([
            (key(1), value(41, 10 * s)), // interval over: reported with its count
            (key(2), value(5, 12 * s)),  // still the kernel's to report
            (key(3), value(0, s)),       // nothing pending
        ]);
        let pending = pending_drops(&entries, 12 * s);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0, key(1));
        assert_eq!(pending[0].1.packets, 41);
        assert_eq!(pending[0].1.bytes, 41 * 60);
        assert_eq!(pending[0].1.kind, flow_kind::DROP);
        assert_eq!(pending[0].1.drop_reason, 2);
    }
    use crate::flows::decode::IPPROTO_UDP;

    const S: u64 = 1_000_000_000;

    /// A connection's two entries: created at 100 s, last packet at `last_seen_s`.
    fn connection(proto: u8, sport: u16, flags: u8, last_seen_s: u64) -> [(CtKey, CtEntry); 2] {
        let forward_key = CtKey {
            saddr: 1,
            daddr: 2,
            sport,
            dport: 80,
            proto,
            _pad: [0; 3],
        };
        let reply_key = CtKey {
            saddr: 2,
            daddr: 1,
            sport: 80,
            dport: sport,
            proto,
            _pad: [0; 3],
        };
        let forward = CtEntry {
            tcp_flags: flags,
            created_ns: 100 * S,
            last_seen_ns: last_seen_s * S,
            packets: 4,
            bytes: 400,
            peer: reply_key,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            is_reply: 1,
            created_ns: 100 * S,
            last_seen_ns: last_seen_s * S,
            packets: 3,
            bytes: 900,
            peer: forward_key,
            ..CtEntry::default()
        };
        [(forward_key, forward), (reply_key, reply)]
    }

    #[test]
    fn expired_connections_without_a_close_record_get_an_end_record() {
        let udp = connection(IPPROTO_UDP, 1, 0, 110);
        let syn_only = connection(IPPROTO_TCP, 2, tcp_flag::SYN, 110);
        let closed = connection(IPPROTO_TCP, 3, tcp_flag::SYN | tcp_flag::FIN, 110);
        let entries: BTreeMap<CtKey, CtEntry> = udp
            .iter()
            .chain(&syn_only)
            .chain(&closed)
            .copied()
            .collect();
        let doomed: Vec<CtKey> = entries.keys().copied().collect();
        let ended = ended(&entries, &doomed, 200 * S);
        let sports: Vec<u16> = ended.iter().map(|e| e.tuple.sport).collect();
        // By key order; the FIN-closed one had its record from the kernel.
        assert_eq!(sports, vec![u16::from_be(1), u16::from_be(2)]);
        assert!(ended.iter().all(|e| e.kind == Kind::End));
        assert_eq!(ended[0].counters.reply_bytes, 900);
        // Half a connection is not reported.
        let [(forward_key, forward), _] = udp;
        let half = BTreeMap::from([(forward_key, forward)]);
        assert!(super::ended(&half, &[forward_key], 200 * S).is_empty());
    }

    #[test]
    fn open_connections_report_their_counters_once_per_interval_when_active() {
        let busy = connection(IPPROTO_TCP, 1, tcp_flag::SYN | tcp_flag::ACK, 139);
        let idle = connection(IPPROTO_TCP, 2, tcp_flag::SYN | tcp_flag::ACK, 105);
        let closing = connection(IPPROTO_TCP, 3, tcp_flag::SYN | tcp_flag::RST, 139);
        let entries: BTreeMap<CtKey, CtEntry> =
            busy.iter().chain(&idle).chain(&closing).copied().collect();
        // Report at 140 s, the previous one at 110 s, every 30 s.
        let reported = updates(&entries, &[], 110 * S, 140 * S, 30 * S);
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].tuple.sport, u16::from_be(1));
        assert_eq!(reported[0].kind, Kind::Update);
        assert_eq!(reported[0].counters.packets, 4);
        // Too young: created 100 s, at 120 s with a 30 s interval.
        assert!(updates(&entries, &[], 110 * S, 120 * S, 30 * S).is_empty());
        // Being removed: no update.
        let doomed = vec![busy[0].0];
        assert!(updates(&entries, &doomed, 110 * S, 140 * S, 30 * S).is_empty());
    }
}

//! The records the agent makes itself from its walk of the conntrack table: the end of
//! connections that expired without a close event, and the counters of connections still open
//! (every `--flow-report-interval`), so that long-lived flows show their traffic before they end.

use std::collections::{BTreeMap, HashSet};

use dataplane_common::{
    Address, CtEntryOf, CtKeyOf, DropAggKeyOf, DropAggValueOf, FlowEvent, drop_events, flow_kind,
    tcp_flag,
};

use super::decode::{self, Event, IPPROTO_TCP, Kind, WireAddr};
use crate::kernel::conntrack::CtTable;

fn closing<A: Address>(entry: &CtEntryOf<A>) -> bool {
    entry.tcp_flags & (tcp_flag::FIN | tcp_flag::RST) != 0
}

/// Final records of the connections among `doomed` (keys the collector removes) that had no
/// close record from the kernel: UDP, ICMP, and TCP that never saw FIN or RST (an unanswered
/// SYN, an idle connection timing out). Of either family's tables.
pub fn ended<A: WireAddr>(entries: &CtTable<A>, doomed: &[CtKeyOf<A>], now_ns: u64) -> Vec<Event> {
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
pub fn updates<A: WireAddr>(
    entries: &CtTable<A>,
    doomed: &[CtKeyOf<A>],
    since_ns: u64,
    now_ns: u64,
    interval_ns: u64,
) -> Vec<Event> {
    let doomed: HashSet<&CtKeyOf<A>> = doomed.iter().collect();
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
/// starts the key afresh). Keys still within their interval are the kernel's to report. The
/// events are the kernel's form, of the family of the table.
pub fn pending_drops<A: Address>(
    entries: &BTreeMap<DropAggKeyOf<A>, DropAggValueOf<A>>,
    now_ns: u64,
) -> Vec<(DropAggKeyOf<A>, FlowEvent)> {
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
                family: A::FAMILY,
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
    use dataplane_common::{
        CtEntry, CtEntry6, CtKey, CtKey6, DropAggKey, DropAggKey6, DropAggValue, DropAggValue6,
        In6Addr,
    };

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
        let entries: CtTable<u32> = udp
            .iter()
            .chain(&syn_only)
            .chain(&closed)
            .copied()
            .collect();
        let mut doomed: Vec<CtKey> = entries.keys().copied().collect();
        doomed.sort();
        let ended = ended(&entries, &doomed, 200 * S);
        let sports: Vec<u16> = ended.iter().map(|e| e.tuple.sport).collect();
        // By key order; the FIN-closed one had its record from the kernel.
        assert_eq!(sports, vec![u16::from_be(1), u16::from_be(2)]);
        assert!(ended.iter().all(|e| e.kind == Kind::End));
        assert_eq!(ended[0].counters.reply_bytes, 900);
        // Half a connection is not reported.
        let [(forward_key, forward), _] = udp;
        let half: CtTable<u32> = [(forward_key, forward)].into_iter().collect();
        assert!(super::ended(&half, &[forward_key], 200 * S).is_empty());
    }

    #[test]
    fn open_connections_report_their_counters_once_per_interval_when_active() {
        let busy = connection(IPPROTO_TCP, 1, tcp_flag::SYN | tcp_flag::ACK, 139);
        let idle = connection(IPPROTO_TCP, 2, tcp_flag::SYN | tcp_flag::ACK, 105);
        let closing = connection(IPPROTO_TCP, 3, tcp_flag::SYN | tcp_flag::RST, 139);
        let entries: CtTable<u32> = busy.iter().chain(&idle).chain(&closing).copied().collect();
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

    #[test]
    fn ipv6_connections_and_drops_get_their_records_too() {
        let addr = |s: &str| In6Addr::from_ipv6(s.parse().unwrap());
        let forward_key = CtKey6 {
            saddr: addr("fd00:30:1::2"),
            daddr: addr("2001:db8::7"),
            sport: 5000u16.to_be(),
            dport: 53u16.to_be(),
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        };
        let reply_key = CtKey6 {
            saddr: forward_key.daddr,
            daddr: forward_key.saddr,
            sport: forward_key.dport,
            dport: forward_key.sport,
            ..forward_key
        };
        let entries: CtTable<dataplane_common::In6Addr> = [
            (
                forward_key,
                CtEntry6 {
                    created_ns: 100 * S,
                    last_seen_ns: 139 * S,
                    packets: 4,
                    peer: reply_key,
                    ..CtEntry6::default()
                },
            ),
            (
                reply_key,
                CtEntry6 {
                    is_reply: 1,
                    created_ns: 100 * S,
                    last_seen_ns: 139 * S,
                    packets: 3,
                    bytes: 900,
                    peer: forward_key,
                    ..CtEntry6::default()
                },
            ),
        ]
        .into_iter()
        .collect();
        let ended = ended(&entries, &[forward_key, reply_key], 200 * S);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].kind, Kind::End);
        assert_eq!(
            ended[0].tuple.saddr,
            "fd00:30:1::2".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(ended[0].tuple.sport, 5000);
        assert_eq!(ended[0].counters.reply_bytes, 900);
        let reported = updates(&entries, &[], 110 * S, 140 * S, 30 * S);
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].kind, Kind::Update);
        // A drop left pending in the IPv6 aggregates: an IPv6 event.
        let key = DropAggKey6 {
            saddr: forward_key.saddr,
            reason: dataplane_common::DropReason::PolicyDeny as u8,
            hook: 2,
            _pad: 0,
        };
        let value = DropAggValue6 {
            pending: 9,
            last_event_ns: 10 * drop_events::INTERVAL_NS,
            tuple: forward_key,
            ..DropAggValue6::default()
        };
        let pending = pending_drops(
            &BTreeMap::from([(key, value)]),
            12 * drop_events::INTERVAL_NS,
        );
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].1.family, 6);
        let event = decode::from_raw(&pending[0].1).unwrap();
        assert_eq!(
            event.tuple.daddr,
            "2001:db8::7".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(event.counters.packets, 9);
    }
}

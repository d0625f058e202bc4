//! The collector, the one agent-side writer of the maps the kernel programs fill. The programs
//! create and refresh conntrack entries; the collector removes both directions of a connection
//! once it has been idle for longer than its protocol and state allow
//! (`dataplane_common::ct_timeout`), in both tables: the main one (established connections)
//! and the LRU one of connections whose handshake is under way; it forgets the connections
//! translated to containers that went away; and it removes the drop aggregates whose pending
//! count has been reported. It decides how soon to look again from how full the main table is.
//! It writes through [`KernelFilled`] handles, which only [`super::Datapath::load`] makes, so no
//! other part of the agent can (see [`super::maps`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::Map;
use dataplane_common::{
    CtEntry, CtKey, DropAggKey, DropAggValue, ct_rewrite, ct_state, ct_timeout, tcp_flag,
};

use super::{
    DatapathError,
    maps::{Conntrack, ConntrackNew, DropAggregates, HashMapSpec, KernelFilled},
};

/// The maps the kernel programs fill, as [`super::Datapath::load`] hands them to the collector.
pub struct KernelFilledMaps {
    established: KernelFilled<Conntrack>,
    handshakes: KernelFilled<ConntrackNew>,
    drop_aggregates: KernelFilled<DropAggregates>,
}

impl KernelFilledMaps {
    pub(super) fn open(pin_dir: &Path) -> Result<KernelFilledMaps, DatapathError> {
        Ok(KernelFilledMaps {
            established: KernelFilled::open(pin_dir, Map::HashMap)?,
            handshakes: KernelFilled::open(pin_dir, Map::LruHashMap)?,
            drop_aggregates: KernelFilled::open(pin_dir, Map::LruHashMap)?,
        })
    }
}

/// The collector: owns the handles, counts what it removed, and knows when it is due.
pub struct Collector {
    maps: KernelFilledMaps,
    /// Conntrack entries removed as expired since the agent started.
    pub collected: u64,
    next_run: Instant,
}

/// One pass of the collector: what it read of both conntrack tables and the connections that
/// ended (expired entries that stand for a connection that was reported), and the drop
/// aggregates as they were.
pub struct Walk {
    pub entries: BTreeMap<CtKey, CtEntry>,
    pub removed: Vec<CtKey>,
    pub drop_aggregates: BTreeMap<DropAggKey, DropAggValue>,
    pub now_ns: u64,
}

impl Collector {
    pub fn new(maps: KernelFilledMaps) -> Collector {
        Collector {
            maps,
            collected: 0,
            next_run: Instant::now(),
        }
    }

    /// Whether a pass is due (see [`next_interval`]).
    pub fn due(&self) -> bool {
        Instant::now() >= self.next_run
    }

    /// Removes expired connections from both tables and decides when to look again; returns
    /// the walk (for the flow records of expired and long-lived connections, and of drops left
    /// pending).
    pub fn collect(&mut self) -> Walk {
        let started = Instant::now();
        let now_ns = monotonic_now_ns();
        let mut walk = Walk {
            entries: BTreeMap::new(),
            removed: Vec::new(),
            drop_aggregates: BTreeMap::new(),
            now_ns,
        };
        let (entries, doomed) = sweep(&mut self.maps.established, now_ns, &mut self.collected);
        let main_fill = entries.len() as f64 / f64::from(self.maps.established.capacity().max(1));
        walk.removed.extend(doomed);
        walk.entries.extend(entries);
        let (entries, doomed) = sweep(&mut self.maps.handshakes, now_ns, &mut self.collected);
        // A handshake that never completed was never reported (TCP is reported once
        // established): only the other protocols' ends are records.
        walk.removed
            .extend(doomed.into_iter().filter(|k| k.proto != IPPROTO_TCP));
        walk.entries.extend(entries);
        match self.maps.drop_aggregates.entries() {
            Ok(entries) => walk.drop_aggregates = entries,
            Err(e) => log::warn!("drop aggregates: {e}"),
        }
        let removed_share = walk.removed.len() as f64 / walk.entries.len().max(1) as f64;
        self.next_run = Instant::now() + next_interval(main_fill, removed_share, started.elapsed());
        walk
    }

    /// Removes the drop aggregates whose pending drops were just reported, so the kernel starts
    /// those keys afresh. (Drops it adds between the walk and this removal are lost from the
    /// records only; the per-reason counters have them.)
    pub fn forget_drop_aggregates<'a>(&mut self, keys: impl IntoIterator<Item = &'a DropAggKey>) {
        self.maps.drop_aggregates.remove_all(keys);
    }

    /// Removes the tracked connections translated to containers that went away, so their
    /// clients get a reset from whichever backend the next packet reaches instead of waiting
    /// on an address nobody answers any more.
    pub fn forget_translated_to(&mut self, addresses: &BTreeSet<u32>) {
        if addresses.is_empty() {
            return;
        }
        let removed = remove_translated(&mut self.maps.established, addresses)
            + remove_translated(&mut self.maps.handshakes, addresses);
        if removed > 0 {
            log::info!("removed {removed} conntrack entries of departed containers");
        }
    }
}

/// Removes the expired entries of `table` at `now_ns`, counting them in `collected`; returns
/// the table as read and the keys removed (nothing when it could not be read).
fn sweep<M: HashMapSpec<Key = CtKey, Value = CtEntry>>(
    table: &mut KernelFilled<M>,
    now_ns: u64,
    collected: &mut u64,
) -> (BTreeMap<CtKey, CtEntry>, Vec<CtKey>) {
    match table.entries() {
        Ok(entries) => {
            let doomed = expired(&entries, now_ns);
            *collected += table.remove_all(&doomed) as u64;
            (entries, doomed)
        }
        Err(e) => {
            log::warn!("conntrack gc: {e}");
            (BTreeMap::new(), Vec::new())
        }
    }
}

/// Removes from `table` both directions of every connection translated to one of `addresses`.
fn remove_translated<M: HashMapSpec<Key = CtKey, Value = CtEntry>>(
    table: &mut KernelFilled<M>,
    addresses: &BTreeSet<u32>,
) -> usize {
    match table.entries() {
        Ok(entries) => table.remove_all(&translated_to(&entries, addresses)),
        Err(e) => {
            log::warn!("conntrack: {e}");
            0
        }
    }
}

const NS_PER_SEC: u64 = 1_000_000_000;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Now on the clock the kernel stamps entries with (bpf_ktime_get_ns is CLOCK_MONOTONIC).
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

/// How long a connection may stay idle, given both of its directions.
pub fn timeout_secs(forward: &CtEntry, reply: Option<&CtEntry>, proto: u8) -> u64 {
    match proto {
        IPPROTO_TCP => {
            let flags = forward.tcp_flags | reply.map_or(0, |r| r.tcp_flags);
            // Established only once the handshake completed (the kernel moved the connection
            // to the main table): an answered SYN that nobody acknowledged (SYN_RECV, what a
            // spoofed flood leaves) keeps the short timeout.
            if flags & (tcp_flag::FIN | tcp_flag::RST) != 0 {
                ct_timeout::TCP_CLOSING
            } else if forward.state == ct_state::ESTABLISHED {
                ct_timeout::TCP_ESTABLISHED
            } else {
                ct_timeout::TCP_SYN
            }
        }
        IPPROTO_UDP => ct_timeout::UDP,
        _ => ct_timeout::ICMP,
    }
}

/// How old half a connection must be before it counts as an orphan: the kernel writes the two
/// directions one after the other, and a walk of the map can fall between the two writes.
const ORPHAN_GRACE_NS: u64 = 5 * NS_PER_SEC;

/// The keys to delete at `now_ns`: both directions of every expired connection, and entries
/// whose other direction is gone (half a connection translates nothing useful).
pub fn expired(entries: &BTreeMap<CtKey, CtEntry>, now_ns: u64) -> Vec<CtKey> {
    let mut doomed = Vec::new();
    let orphan = |entry: &CtEntry| {
        !entries.contains_key(&entry.peer)
            && now_ns.saturating_sub(entry.created_ns) > ORPHAN_GRACE_NS
    };
    for (key, entry) in entries {
        if entry.is_reply == 1 {
            // Judged together with its forward entry, unless that is gone.
            if orphan(entry) {
                doomed.push(*key);
            }
            continue;
        }
        let Some(reply) = entries.get(&entry.peer) else {
            if orphan(entry) {
                doomed.push(*key);
            }
            continue;
        };
        let reply = Some(reply);
        let last_seen = entry.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
        let idle = now_ns.saturating_sub(last_seen);
        if idle > timeout_secs(entry, reply, key.proto) * NS_PER_SEC {
            doomed.push(*key);
            doomed.push(entry.peer);
        }
    }
    doomed
}

/// How often the collector runs when the main table has room.
pub const GC_INTERVAL_RELAXED: Duration = Duration::from_secs(2);
/// How often it runs at most, when the main table is nearly full.
pub const GC_INTERVAL_PRESSED: Duration = Duration::from_millis(250);

/// How long until the next collection, from how full the main table is (`fill`, 0..1), what
/// share of its entries the last pass removed, and how long that pass took. The fuller the
/// table, the sooner expired entries must make room for new connections: every 2 s when
/// under half full, every 1 s above half or when the last pass found much to remove, every
/// 250 ms above 80%. Never sooner than four times the last walk, so that collecting a large
/// table costs at most a fifth of a core. (The table of unestablished connections needs no
/// hurry: it is LRU and makes room by itself.)
pub fn next_interval(fill: f64, removed_share: f64, last_walk: Duration) -> Duration {
    let wanted = if fill >= 0.8 {
        GC_INTERVAL_PRESSED
    } else if fill >= 0.5 || removed_share >= 0.1 {
        Duration::from_secs(1)
    } else {
        GC_INTERVAL_RELAXED
    };
    wanted.max(last_walk * 4)
}

/// Both directions of every connection translated to one of `addresses`.
fn translated_to(entries: &BTreeMap<CtKey, CtEntry>, addresses: &BTreeSet<u32>) -> Vec<CtKey> {
    let mut doomed = Vec::new();
    for (key, entry) in entries {
        let target = match entry.rewrite {
            ct_rewrite::DST => entry.nat_addr,
            // A hairpin goes back to its own source, in both directions.
            ct_rewrite::HAIRPIN => key.saddr,
            _ => continue,
        };
        if addresses.contains(&target) {
            doomed.push(*key);
            doomed.push(entry.peer);
        }
    }
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        proto: u8,
        fwd_flags: u8,
        reply_flags: u8,
        reply_packets: u64,
        last_seen_s: u64,
    ) -> BTreeMap<CtKey, CtEntry> {
        let fwd_key = CtKey {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            proto,
            _pad: [0; 3],
        };
        let reply_key = CtKey {
            saddr: 2,
            daddr: 9,
            sport: 4,
            dport: 7,
            proto,
            _pad: [0; 3],
        };
        let state = if reply_flags & ACK != 0 && fwd_flags & ACK != 0 {
            ct_state::ESTABLISHED
        } else {
            ct_state::SYN_SENT
        };
        let fwd = CtEntry {
            state,
            tcp_flags: fwd_flags,
            last_seen_ns: last_seen_s * NS_PER_SEC,
            packets: 1,
            peer: reply_key,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            state,
            tcp_flags: reply_flags,
            is_reply: 1,
            last_seen_ns: last_seen_s * NS_PER_SEC,
            packets: reply_packets,
            peer: fwd_key,
            ..CtEntry::default()
        };
        BTreeMap::from([(fwd_key, fwd), (reply_key, reply)])
    }

    const SYN: u8 = tcp_flag::SYN;
    const ACK: u8 = tcp_flag::ACK;

    #[test]
    fn timeouts_follow_protocol_and_tcp_state() {
        let at = |secs: u64| (1000 + secs) * NS_PER_SEC;
        // Established TCP lives for hours, a closed one for seconds, an unanswered SYN a minute.
        let established = pair(IPPROTO_TCP, SYN | ACK, SYN | ACK, 5, 1000);
        assert!(expired(&established, at(3600)).is_empty());
        assert_eq!(
            expired(&established, at(ct_timeout::TCP_ESTABLISHED + 1)).len(),
            2
        );
        let closed = pair(IPPROTO_TCP, SYN | ACK | tcp_flag::FIN, ACK, 5, 1000);
        assert!(expired(&closed, at(5)).is_empty());
        assert_eq!(expired(&closed, at(ct_timeout::TCP_CLOSING + 1)).len(), 2);
        let reset = pair(IPPROTO_TCP, SYN, tcp_flag::RST, 1, 1000);
        assert_eq!(expired(&reset, at(ct_timeout::TCP_CLOSING + 1)).len(), 2);
        let unanswered = pair(IPPROTO_TCP, SYN, 0, 0, 1000);
        assert!(expired(&unanswered, at(ct_timeout::TCP_SYN - 5)).is_empty());
        assert_eq!(expired(&unanswered, at(ct_timeout::TCP_SYN + 1)).len(), 2);
        // Answered but never acknowledged (SYN_RECV: a spoofed SYN's SYN-ACK): short.
        let mut half_open = pair(IPPROTO_TCP, SYN, SYN | ACK, 1, 1000);
        for entry in half_open.values_mut() {
            entry.state = ct_state::SYN_RECV;
        }
        assert!(expired(&half_open, at(ct_timeout::TCP_SYN - 1)).is_empty());
        assert_eq!(expired(&half_open, at(ct_timeout::TCP_SYN + 1)).len(), 2);
        let udp = pair(IPPROTO_UDP, 0, 0, 1, 1000);
        assert!(expired(&udp, at(ct_timeout::UDP - 1)).is_empty());
        assert_eq!(expired(&udp, at(ct_timeout::UDP + 1)).len(), 2);
    }

    #[test]
    fn collection_speeds_up_as_the_table_fills() {
        let walk = Duration::from_millis(5);
        assert_eq!(next_interval(0.1, 0.0, walk), GC_INTERVAL_RELAXED);
        assert_eq!(next_interval(0.6, 0.0, walk), Duration::from_secs(1));
        assert_eq!(next_interval(0.1, 0.5, walk), Duration::from_secs(1));
        assert_eq!(next_interval(0.95, 0.0, walk), GC_INTERVAL_PRESSED);
        // A walk that takes long is not repeated back to back.
        assert_eq!(
            next_interval(0.95, 0.0, Duration::from_millis(200)),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn connections_to_departed_backends_are_found_with_their_replies() {
        let mut entries = pair(IPPROTO_TCP, SYN, 0, 0, 1000);
        for entry in entries.values_mut() {
            if entry.is_reply == 0 {
                entry.rewrite = ct_rewrite::DST;
                entry.nat_addr = 42;
            }
        }
        assert_eq!(translated_to(&entries, &BTreeSet::from([42])).len(), 2);
        assert!(translated_to(&entries, &BTreeSet::from([43])).is_empty());
    }

    #[test]
    fn half_connections_are_removed() {
        let mut entries = pair(IPPROTO_TCP, SYN, 0, 0, 1000);
        let reply_key = *entries.keys().find(|k| k.saddr == 2).unwrap();
        entries.remove(&reply_key);
        // Not within the grace period (the kernel may be between its two writes)...
        assert!(expired(&entries, 2 * NS_PER_SEC).is_empty());
        // ...but after it.
        assert_eq!(expired(&entries, 1000 * NS_PER_SEC).len(), 1);
        let mut entries = pair(IPPROTO_TCP, SYN, 0, 0, 1000);
        let fwd_key = *entries.keys().find(|k| k.saddr == 1).unwrap();
        entries.remove(&fwd_key);
        assert_eq!(expired(&entries, 1000 * NS_PER_SEC), vec![reply_key]);
    }
}

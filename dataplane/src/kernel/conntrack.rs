//! Conntrack garbage collection, the one agent-side writer of the conntrack map. The kernel
//! programs create and refresh entries; the collector removes both directions of a connection
//! once it has been idle for longer than its protocol and state allow
//! (`dataplane_common::ct_timeout`), and the connections translated to containers that went
//! away. It writes through [`ConntrackTable`], a handle only [`super::Datapath::load`] makes,
//! so no other part of the agent can (see [`super::maps`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use dataplane_common::{CtEntry, CtKey, ct_rewrite, ct_timeout, tcp_flag};

use super::{
    DatapathError,
    maps::{Conntrack, HashMapSpec as _},
};

/// The agent's writable handle on the pinned conntrack map (its own file descriptor, apart from
/// the [`super::Datapath`]'s).
pub struct ConntrackTable {
    map: HashMap<MapData, CtKey, CtEntry>,
}

impl ConntrackTable {
    pub(super) fn open(pin_dir: &Path) -> Result<ConntrackTable, DatapathError> {
        let err = |source| DatapathError::Map {
            map: Conntrack::NAME,
            source,
        };
        let data = MapData::from_pin(pin_dir.join(Conntrack::NAME)).map_err(err)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(err)?;
        Ok(ConntrackTable { map })
    }

    /// Every entry of the table.
    pub fn entries(&self) -> Result<BTreeMap<CtKey, CtEntry>, DatapathError> {
        self.map
            .iter()
            .map(|entry| {
                entry.map_err(|source| DatapathError::Map {
                    map: Conntrack::NAME,
                    source,
                })
            })
            .collect()
    }

    /// Removes `keys`; keys already gone are not errors. Returns how many it removed.
    fn remove_all(&mut self, keys: &[CtKey]) -> usize {
        let mut removed = 0;
        for key in keys {
            match super::removed(Conntrack::NAME, self.map.remove(key)) {
                Ok(()) => removed += 1,
                Err(e) => log::warn!("conntrack: {e}"),
            }
        }
        removed
    }
}

/// The collector: owns the table handle and counts what it removed.
pub struct Collector {
    table: ConntrackTable,
    /// Entries removed as expired since the agent started.
    pub collected: u64,
}

/// One pass of the collector: the table as it was read and what was removed from it.
pub struct Walk {
    pub entries: BTreeMap<CtKey, CtEntry>,
    pub removed: Vec<CtKey>,
    pub now_ns: u64,
}

impl Collector {
    pub fn new(table: ConntrackTable) -> Collector {
        Collector {
            table,
            collected: 0,
        }
    }

    /// Removes expired connections; returns the walk (for the flow records of expired and
    /// long-lived connections), or None when the table could not be read.
    pub fn collect(&mut self) -> Option<Walk> {
        let entries = match self.table.entries() {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("conntrack gc: reading the table: {e}");
                return None;
            }
        };
        let now_ns = monotonic_now_ns();
        let removed = expired(&entries, now_ns);
        if !removed.is_empty() {
            log::debug!("conntrack gc removes {} entries", removed.len());
            self.collected += self.table.remove_all(&removed) as u64;
        }
        Some(Walk {
            entries,
            removed,
            now_ns,
        })
    }

    /// Removes the tracked connections translated to containers that went away, so their
    /// clients get a reset from whichever backend the next packet reaches instead of waiting
    /// on an address nobody answers any more.
    pub fn forget_translated_to(&mut self, addresses: &BTreeSet<u32>) {
        if addresses.is_empty() {
            return;
        }
        let entries = match self.table.entries() {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("conntrack: reading the table: {e}");
                return;
            }
        };
        let removed = self.table.remove_all(&translated_to(&entries, addresses));
        if removed > 0 {
            log::info!("removed {removed} conntrack entries of departed containers");
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
            let answered = reply.is_some_and(|r| r.packets > 0) || forward.is_reply == 1;
            if flags & (tcp_flag::FIN | tcp_flag::RST) != 0 {
                ct_timeout::TCP_CLOSING
            } else if answered {
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

/// Both directions of every connection translated to one of `addresses`.
fn translated_to(entries: &BTreeMap<CtKey, CtEntry>, addresses: &BTreeSet<u32>) -> Vec<CtKey> {
    let mut doomed = Vec::new();
    for (key, entry) in entries {
        if entry.rewrite == ct_rewrite::DST && addresses.contains(&entry.nat_addr) {
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
        let fwd = CtEntry {
            tcp_flags: fwd_flags,
            last_seen_ns: last_seen_s * NS_PER_SEC,
            packets: 1,
            peer: reply_key,
            ..CtEntry::default()
        };
        let reply = CtEntry {
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
        assert!(expired(&unanswered, at(30)).is_empty());
        assert_eq!(expired(&unanswered, at(ct_timeout::TCP_SYN + 1)).len(), 2);
        let udp = pair(IPPROTO_UDP, 0, 0, 1, 1000);
        assert!(expired(&udp, at(ct_timeout::UDP - 1)).is_empty());
        assert_eq!(expired(&udp, at(ct_timeout::UDP + 1)).len(), 2);
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

//! The collector, the one agent-side writer of the maps the kernel programs fill. The programs
//! create and refresh conntrack entries; the collector removes both directions of a connection
//! once it has been idle for longer than its protocol and state allow
//! (`dataplane_common::ct_timeout`), in both tables of both families (IPv4's and IPv6's maps
//! are apart, the code generic over the address, [`CtFamily`]): the main one (established
//! connections) and the LRU one of connections whose handshake is under way; it forgets the connections
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
    Address, CtEntryOf, CtKeyOf, DropAggKeyOf, DropAggValueOf, In6Addr, ct_rewrite, ct_state,
    ct_timeout, tcp_flag,
};

use super::{
    DatapathError,
    maps::{
        Conntrack, Conntrack6, Conntrack6New, ConntrackNew, DropAggregates, DropAggregates6,
        HashMapSpec, KernelFilled,
    },
};

/// A family's maps the kernel programs fill: IPv4's (`u32`) and IPv6's (`In6Addr`) are apart
/// (the kernel's `dp_ct_v1` and `dp_ct6_v1`, ...), the collector's code is one for both.
pub trait CtFamily: Address {
    /// Established connections.
    type Established: HashMapSpec<Key = CtKeyOf<Self>, Value = CtEntryOf<Self>>;
    /// Handshakes under way (LRU).
    type Handshakes: HashMapSpec<Key = CtKeyOf<Self>, Value = CtEntryOf<Self>>;
    type DropAggregates: HashMapSpec<Key = DropAggKeyOf<Self>, Value = DropAggValueOf<Self>>;
    /// This family's handles among both families'.
    fn tables(maps: &mut KernelFilledMaps) -> &mut Tables<Self>;
}

impl CtFamily for u32 {
    type Established = Conntrack;
    type Handshakes = ConntrackNew;
    type DropAggregates = DropAggregates;
    fn tables(maps: &mut KernelFilledMaps) -> &mut Tables<u32> {
        &mut maps.v4
    }
}

impl CtFamily for In6Addr {
    type Established = Conntrack6;
    type Handshakes = Conntrack6New;
    type DropAggregates = DropAggregates6;
    fn tables(maps: &mut KernelFilledMaps) -> &mut Tables<In6Addr> {
        &mut maps.v6
    }
}

/// One family's maps the kernel programs fill, as the collector holds them.
pub struct Tables<A: CtFamily> {
    established: KernelFilled<A::Established>,
    handshakes: KernelFilled<A::Handshakes>,
    drop_aggregates: KernelFilled<A::DropAggregates>,
}

impl<A: CtFamily> Tables<A> {
    fn open(pin_dir: &Path) -> Result<Tables<A>, DatapathError> {
        Ok(Tables {
            established: KernelFilled::open(pin_dir, Map::HashMap)?,
            handshakes: KernelFilled::open(pin_dir, Map::LruHashMap)?,
            drop_aggregates: KernelFilled::open(pin_dir, Map::LruHashMap)?,
        })
    }

    /// Removes the expired connections of both tables at `now_ns`; returns the walk of this
    /// family and how full its main table is (0..1).
    fn sweep(&mut self, now_ns: u64, collected: &mut u64) -> (FamilyWalk<A>, f64) {
        let mut walk = FamilyWalk::default();
        let (entries, doomed) = sweep(&mut self.established, now_ns, collected);
        let main_fill = entries.len() as f64 / f64::from(self.established.capacity().max(1));
        walk.removed.extend(doomed);
        walk.entries.extend(entries);
        let (entries, doomed) = sweep(&mut self.handshakes, now_ns, collected);
        // A handshake that never completed was never reported (TCP is reported once
        // established): only the other protocols' ends are records.
        walk.removed
            .extend(doomed.into_iter().filter(|k| k.proto != IPPROTO_TCP));
        walk.entries.extend(entries);
        match self.drop_aggregates.entries() {
            Ok(entries) => walk.drop_aggregates = entries,
            Err(e) => log::warn!("drop aggregates: {e}"),
        }
        (walk, main_fill)
    }

    fn forget_translated_to(&mut self, addresses: &BTreeSet<A>) -> usize {
        remove_translated(&mut self.established, addresses)
            + remove_translated(&mut self.handshakes, addresses)
    }
}

/// The maps the kernel programs fill, of both families, as [`super::Datapath::load`] hands
/// them to the collector.
pub struct KernelFilledMaps {
    v4: Tables<u32>,
    v6: Tables<In6Addr>,
}

impl KernelFilledMaps {
    pub(super) fn open(pin_dir: &Path) -> Result<KernelFilledMaps, DatapathError> {
        Ok(KernelFilledMaps {
            v4: Tables::open(pin_dir)?,
            v6: Tables::open(pin_dir)?,
        })
    }
}

/// The collector: owns the handles, counts what it removed, and knows when it is due.
pub struct Collector {
    maps: KernelFilledMaps,
    /// Conntrack entries removed as expired since the agent started (both families).
    pub collected: u64,
    next_run: Instant,
}

/// What one pass read of one family's tables: both conntrack tables, the connections that
/// ended (expired entries that stand for a connection that was reported), and the drop
/// aggregates as they were.
pub struct FamilyWalk<A: Address> {
    pub entries: CtTable<A>,
    pub removed: Vec<CtKeyOf<A>>,
    pub drop_aggregates: BTreeMap<DropAggKeyOf<A>, DropAggValueOf<A>>,
}

impl<A: Address> Default for FamilyWalk<A> {
    fn default() -> Self {
        FamilyWalk {
            entries: CtTable::default(),
            removed: Vec::new(),
            drop_aggregates: BTreeMap::new(),
        }
    }
}

/// A conntrack table as a walk read it. Hashed, not ordered: every entry is looked up by its
/// peer's key once or twice a walk, and at 100,000 entries an ordered map's inserts and
/// lookups (a key comparison per level) were a third of the agent's CPU under load.
pub type CtTable<A> = foldhash::HashMap<CtKeyOf<A>, CtEntryOf<A>>;

/// One pass of the collector, over both families.
pub struct Walk {
    pub v4: FamilyWalk<u32>,
    pub v6: FamilyWalk<In6Addr>,
    pub now_ns: u64,
}

impl Walk {
    /// Conntrack entries read, both tables of both families.
    pub fn entries(&self) -> usize {
        self.v4.entries.len() + self.v6.entries.len()
    }
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

    /// Removes expired connections from both tables of both families and decides when to
    /// look again; returns the walk (for the flow records of expired and long-lived
    /// connections, and of drops left pending).
    pub fn collect(&mut self) -> Walk {
        let started = Instant::now();
        let now_ns = monotonic_now_ns();
        let (v4, fill4) = self.maps.v4.sweep(now_ns, &mut self.collected);
        let (v6, fill6) = self.maps.v6.sweep(now_ns, &mut self.collected);
        let walk = Walk { v4, v6, now_ns };
        let removed = walk.v4.removed.len() + walk.v6.removed.len();
        let removed_share = removed as f64 / walk.entries().max(1) as f64;
        // The fuller family decides: its new connections are the ones refused first.
        let main_fill = fill4.max(fill6);
        self.next_run = Instant::now() + next_interval(main_fill, removed_share, started.elapsed());
        walk
    }

    /// Removes the drop aggregates whose pending drops were just reported, so the kernel starts
    /// those keys afresh. (Drops it adds between the walk and this removal are lost from the
    /// records only; the per-reason counters have them.)
    pub fn forget_drop_aggregates<'a, A: CtFamily>(
        &mut self,
        keys: impl IntoIterator<Item = &'a DropAggKeyOf<A>>,
    ) {
        A::tables(&mut self.maps).drop_aggregates.remove_all(keys);
    }

    /// Removes the tracked connections translated to containers that went away (their
    /// addresses of one family), so their clients get a reset from whichever backend the next
    /// packet reaches instead of waiting on an address nobody answers any more.
    pub fn forget_translated_to<A: CtFamily>(&mut self, addresses: &BTreeSet<A>) {
        if addresses.is_empty() {
            return;
        }
        let removed = A::tables(&mut self.maps).forget_translated_to(addresses);
        if removed > 0 {
            log::info!("removed {removed} conntrack entries of departed containers");
        }
    }
}

/// Removes the expired entries of `table` at `now_ns`, counting them in `collected`; returns
/// the table as read and the keys removed (nothing when it could not be read).
#[allow(clippy::type_complexity)]
fn sweep<A: Address, M: HashMapSpec<Key = CtKeyOf<A>, Value = CtEntryOf<A>>>(
    table: &mut KernelFilled<M>,
    now_ns: u64,
    collected: &mut u64,
) -> (CtTable<A>, Vec<CtKeyOf<A>>) {
    match table.entries() {
        Ok(entries) => {
            let doomed = expired(&entries, now_ns);
            *collected += table.remove_all(&doomed) as u64;
            (entries, doomed)
        }
        Err(e) => {
            log::warn!("conntrack gc: {e}");
            (CtTable::default(), Vec::new())
        }
    }
}

/// Removes from `table` both directions of every connection translated to one of `addresses`.
fn remove_translated<A: Address, M: HashMapSpec<Key = CtKeyOf<A>, Value = CtEntryOf<A>>>(
    table: &mut KernelFilled<M>,
    addresses: &BTreeSet<A>,
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
pub fn timeout_secs<A: Address>(
    forward: &CtEntryOf<A>,
    reply: Option<&CtEntryOf<A>>,
    proto: u8,
) -> u64 {
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
pub fn expired<A: Address>(entries: &CtTable<A>, now_ns: u64) -> Vec<CtKeyOf<A>> {
    let mut doomed = Vec::new();
    let orphan = |entry: &CtEntryOf<A>| {
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
fn translated_to<A: Address>(entries: &CtTable<A>, addresses: &BTreeSet<A>) -> Vec<CtKeyOf<A>> {
    let mut doomed = Vec::new();
    for (key, entry) in entries {
        let target = match entry.rewrite {
            ct_rewrite::DST => entry.nat_addr,
            // A hairpin goes back to its own source, in both directions.
            ct_rewrite::HAIRPIN => key.saddr,
            // NAT64 (IPv6 tables): the forward entry names the container (IPv4-mapped).
            ct_rewrite::NAT64 if entry.is_reply == 0 => entry.nat_addr,
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
    use dataplane_common::{CtEntry, CtEntry6, CtKey, CtKey6};

    use super::*;

    fn pair(
        proto: u8,
        fwd_flags: u8,
        reply_flags: u8,
        reply_packets: u64,
        last_seen_s: u64,
    ) -> CtTable<u32> {
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
        [(fwd_key, fwd), (reply_key, reply)].into_iter().collect()
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
    fn nat64_connections_to_departed_containers_are_found_by_their_mapped_address() {
        let container = In6Addr::mapped_v4(u32::from_be_bytes([172, 30, 1, 2]).to_be());
        let mut entries = pair6(IPPROTO_TCP, SYN, 1000);
        for entry in entries.values_mut() {
            entry.rewrite = ct_rewrite::NAT64;
            if entry.is_reply == 0 {
                entry.nat_addr = container;
            }
        }
        assert_eq!(
            translated_to(&entries, &BTreeSet::from([container])).len(),
            2
        );
        let other = In6Addr::mapped_v4(u32::from_be_bytes([172, 30, 1, 3]).to_be());
        assert!(translated_to(&entries, &BTreeSet::from([other])).is_empty());
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

    /// The same connection as [`pair`], over IPv6.
    fn pair6(proto: u8, flags: u8, last_seen_s: u64) -> CtTable<In6Addr> {
        let addr =
            |last: u8| In6Addr::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]);
        let fwd_key = CtKey6 {
            saddr: addr(1),
            daddr: addr(2),
            sport: 3,
            dport: 4,
            proto,
            _pad: [0; 3],
        };
        let reply_key = CtKey6 {
            saddr: addr(2),
            daddr: addr(9),
            sport: 4,
            dport: 7,
            proto,
            _pad: [0; 3],
        };
        let fwd = CtEntry6 {
            state: ct_state::ESTABLISHED,
            tcp_flags: flags,
            last_seen_ns: last_seen_s * NS_PER_SEC,
            packets: 1,
            peer: reply_key,
            rewrite: ct_rewrite::DST,
            nat_addr: addr(42),
            ..CtEntry6::default()
        };
        let reply = CtEntry6 {
            state: ct_state::ESTABLISHED,
            tcp_flags: flags,
            is_reply: 1,
            last_seen_ns: last_seen_s * NS_PER_SEC,
            packets: 1,
            peer: fwd_key,
            ..CtEntry6::default()
        };
        [(fwd_key, fwd), (reply_key, reply)].into_iter().collect()
    }

    #[test]
    fn ipv6_connections_expire_and_are_forgotten_as_ipv4_ones() {
        let at = |secs: u64| (1000 + secs) * NS_PER_SEC;
        for (v4, v6, timeout) in [
            (
                pair(IPPROTO_TCP, SYN | ACK, SYN | ACK, 5, 1000),
                pair6(IPPROTO_TCP, SYN | ACK, 1000),
                ct_timeout::TCP_ESTABLISHED,
            ),
            (
                pair(IPPROTO_UDP, 0, 0, 1, 1000),
                pair6(IPPROTO_UDP, 0, 1000),
                ct_timeout::UDP,
            ),
            (
                pair(58, 0, 0, 1, 1000),
                pair6(58, 0, 1000),
                ct_timeout::ICMP,
            ),
        ] {
            for secs in [timeout - 1, timeout + 1] {
                assert_eq!(
                    expired(&v6, at(secs)).len(),
                    expired(&v4, at(secs)).len(),
                    "after {secs} s"
                );
            }
            assert_eq!(expired(&v6, at(timeout + 1)).len(), 2);
        }
        let entries = pair6(IPPROTO_TCP, SYN, 1000);
        let departed = In6Addr::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 42]);
        assert_eq!(
            translated_to(&entries, &BTreeSet::from([departed])).len(),
            2
        );
        assert!(translated_to(&entries, &BTreeSet::from([In6Addr::UNSPECIFIED])).is_empty());
        // Half an IPv6 connection, after the grace period.
        let mut half = pair6(IPPROTO_UDP, 0, 1000);
        half.retain(|_, e| e.is_reply == 0);
        assert_eq!(expired(&half, 1000 * NS_PER_SEC).len(), 1);
    }

    /// The collector on a loaded datapath's real IPv6 tables (root; skipped otherwise): 3,000
    /// UDP connections written into `dp_ct6_v1` (6,000 entries, past one lookup batch), 1,000
    /// of them idle past the UDP timeout and 100 translated to a departed backend. One pass
    /// removes exactly the idle ones and reads the rest; the departed backend's go next.
    #[test]
    fn the_collector_walks_and_cleans_the_kernels_ipv6_tables() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading the kernel programs needs root");
            return;
        }
        let pin_dir =
            std::path::PathBuf::from(format!("/sys/fs/bpf/dp-unit-ct6-{}", std::process::id()));
        let (datapath, maps) = super::super::Datapath::load(&pin_dir, &Default::default())
            .unwrap_or_else(|e| {
                let _ = std::fs::remove_dir_all(&pin_dir);
                panic!("loading the kernel programs: {e}")
            });
        let mut collector = Collector::new(maps);
        let data =
            aya::maps::MapData::from_pin(pin_dir.join(dataplane_common::map_names::CONNTRACK6))
                .unwrap();
        let mut table: aya::maps::HashMap<_, CtKey6, CtEntry6> =
            aya::maps::HashMap::try_from(Map::HashMap(data)).unwrap();
        let now = monotonic_now_ns();
        let idle = now - (ct_timeout::UDP + 10) * NS_PER_SEC;
        let addr = |i: u16| {
            let mut o = [0u8; 16];
            o[0] = 0xfd;
            o[14..].copy_from_slice(&i.to_be_bytes());
            In6Addr::from_octets(o)
        };
        let departed = addr(60_000);
        for i in 0..3000u16 {
            let forward = CtKey6 {
                saddr: addr(i),
                daddr: addr(50_000),
                sport: (10_000 + i).to_be(),
                dport: 53u16.to_be(),
                proto: IPPROTO_UDP,
                _pad: [0; 3],
            };
            let reply = CtKey6 {
                saddr: forward.daddr,
                daddr: forward.saddr,
                sport: forward.dport,
                dport: forward.sport,
                ..forward
            };
            let seen = if i < 1000 { idle } else { now };
            let entry = CtEntry6 {
                created_ns: seen,
                last_seen_ns: seen,
                packets: 1,
                ..CtEntry6::default()
            };
            let translated = (2000..2100).contains(&i);
            table
                .insert(
                    forward,
                    CtEntry6 {
                        peer: reply,
                        rewrite: if translated { ct_rewrite::DST } else { 0 },
                        nat_addr: if translated {
                            departed
                        } else {
                            In6Addr::UNSPECIFIED
                        },
                        ..entry
                    },
                    0,
                )
                .unwrap();
            table
                .insert(
                    reply,
                    CtEntry6 {
                        peer: forward,
                        is_reply: 1,
                        ..entry
                    },
                    0,
                )
                .unwrap();
        }
        let started = Instant::now();
        let walk = collector.collect();
        let took = started.elapsed();
        eprintln!("one pass over 6,000 IPv6 entries: {took:?}");
        assert_eq!(walk.v6.entries.len(), 6000);
        assert_eq!(walk.v6.removed.len(), 2000);
        assert!(walk.v4.entries.is_empty());
        assert_eq!(collector.collected, 2000);
        let count = |t: &aya::maps::HashMap<_, CtKey6, CtEntry6>| t.keys().count();
        assert_eq!(count(&table), 4000);
        // Their end records: one per idle connection, IPv6 tuples.
        let ended = crate::flows::periodic::ended(&walk.v6.entries, &walk.v6.removed, walk.now_ns);
        assert_eq!(ended.len(), 1000);
        assert!(ended.iter().all(|e| e.tuple.saddr.is_ipv6()));
        collector.forget_translated_to(&BTreeSet::from([departed]));
        assert_eq!(count(&table), 3800);
        // IPv4's tables untouched by IPv6's departed addresses and the other way round.
        collector.forget_translated_to(&BTreeSet::from([42u32]));
        assert_eq!(count(&table), 3800);
        drop(collector);
        drop(table);
        drop(datapath);
        let _ = std::fs::remove_dir_all(&pin_dir);
    }
}

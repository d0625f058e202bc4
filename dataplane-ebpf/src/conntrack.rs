//! Connection tracking shared by published ports and masquerade (and, later, load balancing
//! and policy): lookup, creation of both directions at once, and per-packet accounting.
//! Entries expire in the agent's garbage collector (timeouts in `dataplane_common::ct_timeout`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{CtEntry, CtKey, ct_origin, ct_rewrite, tcp_flag};

use crate::{
    maps::{CONFIG, CONNTRACK},
    parse::{IPPROTO_ICMP, IPPROTO_TCP, Ipv4Packet, L4},
    policy::{self, Via},
};

/// BPF_NOEXIST: fail with -EEXIST when the key is present.
const BPF_NOEXIST: u64 = 1;
/// The error a full hash map gives on insert.
const E2BIG: i32 = 7;
const EEXIST: i32 = 17;

/// The key of a packet as it is on the wire.
#[inline(always)]
pub fn key_of(ip: &Ipv4Packet, l4: &L4) -> CtKey {
    CtKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: l4.sport,
        dport: l4.dport,
        proto: ip.protocol,
        _pad: [0; 3],
    }
}

/// The key the reply of a connection whose packets (`forward`) leave translated to the
/// destination `daddr`:`dport` and source `saddr`:`sport` will carry.
#[inline(always)]
pub fn reply_key(proto: u8, saddr: u32, sport: u16, daddr: u32, dport: u16) -> CtKey {
    if proto == IPPROTO_ICMP {
        // An echo reply keeps the request's identifier, in the same field.
        CtKey {
            saddr: daddr,
            daddr: saddr,
            sport,
            dport: 0,
            proto,
            _pad: [0; 3],
        }
    } else {
        CtKey {
            saddr: daddr,
            daddr: saddr,
            sport: dport,
            dport: sport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// The entry of `key`, if tracked. The pointer stays valid for this program run.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// Removes the connection whose entry is `key` if it has closed both ways (FIN each way, or a
/// RST), and says whether it did.
#[inline(always)]
pub fn retire_if_closed(key: &CtKey) -> bool {
    let Some(entry) = CONNTRACK.get_ptr(key) else {
        return false;
    };
    // SAFETY: map values from lookups in this program run.
    unsafe {
        let peer = (*entry).peer;
        let mine = (*entry).tcp_flags;
        let theirs = CONNTRACK.get_ptr(&peer).map_or(0, |p| (*p).tcp_flags);
        let closed = (mine | theirs) & tcp_flag::RST != 0
            || (mine & tcp_flag::FIN != 0 && theirs & tcp_flag::FIN != 0);
        if !closed {
            return false;
        }
        let _ = CONNTRACK.remove(&peer);
        let _ = CONNTRACK.remove(key);
    }
    true
}

/// The entry of the packet with `key`, unless the packet opens a new TCP connection on the
/// tuple of one that is closing (a SYN after FIN or RST, as a client reusing its source port
/// does): then the old connection's entries go, and the packet is a new connection, with its
/// own translation, policy judgement and flow record (Cilium's conntrack does the same).
#[inline(always)]
pub fn lookup_packet(key: &CtKey, tcp_flags: u8) -> Option<*mut CtEntry> {
    const CLOSING: u8 = tcp_flag::FIN | tcp_flag::RST;
    let entry = CONNTRACK.get_ptr_mut(key)?;
    if key.proto != IPPROTO_TCP || tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) != tcp_flag::SYN {
        return Some(entry);
    }
    // SAFETY: map values from lookups in this program run.
    unsafe {
        let peer = (*entry).peer;
        let closing = (*entry).tcp_flags & CLOSING != 0
            || CONNTRACK
                .get_ptr(&peer)
                .is_some_and(|p| (*p).tcp_flags & CLOSING != 0);
        if !closing {
            return Some(entry);
        }
        let _ = CONNTRACK.remove(&peer);
        let _ = CONNTRACK.remove(key);
    }
    None
}

/// Records a packet of `len` bytes with `tcp_flags` on the entry of `key`; the first FIN or
/// RST of a connection becomes a CLOSE flow event (seen at `hook` on `ifindex`).
#[inline(always)]
pub fn account(key: &CtKey, entry: *mut CtEntry, len: u32, tcp_flags: u8, hook: u32, ifindex: u32) {
    const CLOSING: u8 = tcp_flag::FIN | tcp_flag::RST;
    // SAFETY: `entry` came from a map lookup in this program run; map values stay valid
    // while the program runs. Concurrent CPUs may race on these plain adds: counters are
    // approximate by design (no atomics on the hot path).
    let before = unsafe {
        let before = (*entry).tcp_flags;
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        (*entry).packets += 1;
        (*entry).bytes += u64::from(len);
        (*entry).tcp_flags = before | tcp_flags;
        before
    };
    if tcp_flags & CLOSING != 0 && before & CLOSING == 0 {
        // SAFETY: as above; the peer is another value of the same map.
        let peer_closing = unsafe {
            CONNTRACK
                .get_ptr(&(*entry).peer)
                .is_some_and(|p| (*p).tcp_flags & CLOSING != 0)
        };
        if !peer_closing {
            crate::flow::closed(key, entry, hook, ifindex);
        }
    }
}

/// Why a connection could not be tracked.
pub enum CtError {
    /// The table is full.
    Full,
    /// The reply key is taken by another connection.
    Exists,
}

fn insert(key: &CtKey, entry: &CtEntry, flags: u64) -> Result<(), CtError> {
    match CONNTRACK.insert(key, entry, flags) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => Err(CtError::Exists),
        Err(e) if e == -E2BIG => Err(CtError::Full),
        // ENOMEM and the like: no room either.
        Err(_) => Err(CtError::Full),
    }
}

/// A new connection: `forward` is its first packet's key, rewritten by (`rewrite`, `nat_addr`,
/// `nat_port`); `reply` is the key its answers will carry, which get the inverse rewrite back
/// to (`orig_addr`, `orig_port`). The reply entry goes in first with NOEXIST, so two
/// connections can never share a reply key (masquerade probes the next port on `Exists`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    forward: &CtKey,
    reply: &CtKey,
    origin: u8,
    rewrite: u8,
    nat_addr: u32,
    nat_port: u16,
    orig_addr: u32,
    orig_port: u16,
    len: u32,
    tcp_flags: u8,
) -> Result<(), CtError> {
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: array element 0 always exists. New connections were judged just now.
    let generation = CONFIG
        .get_ptr(0)
        .map_or(0, |c| unsafe { (*c).policy_generation });
    let inverse = match rewrite {
        ct_rewrite::DST => ct_rewrite::SRC,
        ct_rewrite::SRC => ct_rewrite::DST,
        _ => ct_rewrite::NONE,
    };
    let reply_entry = CtEntry {
        nat_addr: orig_addr,
        nat_port: orig_port,
        rewrite: inverse,
        origin,
        tcp_flags: 0,
        is_reply: 1,
        _pad: [0; 2],
        policy_generation: generation,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        peer: *forward,
    };
    insert(reply, &reply_entry, BPF_NOEXIST)?;
    let forward_entry = CtEntry {
        nat_addr,
        nat_port,
        rewrite,
        origin,
        tcp_flags,
        is_reply: 0,
        _pad: [0; 2],
        policy_generation: generation,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(len),
        peer: *reply,
    };
    if let Err(e) = insert(forward, &forward_entry, 0) {
        // Never leave half a connection behind.
        let _ = CONNTRACK.remove(reply);
        return Err(e);
    }
    Ok(())
}

/// Whether the connection of `entry` (found under `key`) may go on: judged again by policy
/// when the policy changed since it was last judged (each entry remembers the generation).
/// A connection the new policy denies loses both entries; its packets are dropped from now on.
#[inline(always)]
pub fn still_allowed(key: &CtKey, entry: *mut CtEntry) -> bool {
    let Some(config) = CONFIG.get_ptr(0) else {
        return true;
    };
    // SAFETY: `entry`, `config` and the peer are map values from lookups in this program run.
    unsafe {
        let generation = (*config).policy_generation;
        if (*entry).policy_generation == generation {
            return true;
        }
        let peer_key = (*entry).peer;
        let Some(peer) = CONNTRACK.get_ptr_mut(&peer_key) else {
            return true; // half a connection: the GC removes it
        };
        let (forward_key, forward) = if (*entry).is_reply == 1 {
            (peer_key, peer)
        } else {
            (*key, entry)
        };
        // The destination as policy first saw it: after translation for DNAT.
        let (daddr, dport) = if (*forward).rewrite == ct_rewrite::DST {
            ((*forward).nat_addr, (*forward).nat_port)
        } else {
            (forward_key.daddr, forward_key.dport)
        };
        let via = if (*forward).origin == ct_origin::PUBLISHED {
            Via::Published
        } else {
            Via::Direct
        };
        if policy::allows(forward_key.saddr, daddr, forward_key.proto, dport, via) {
            (*entry).policy_generation = generation;
            (*peer).policy_generation = generation;
            true
        } else {
            let _ = CONNTRACK.remove(&peer_key);
            let _ = CONNTRACK.remove(key);
            false
        }
    }
}

//! Connection tracking shared by published ports, masquerade, load balancing and policy:
//! lookup, creation of both directions at once, per-packet accounting and the TCP handshake.
//! A new connection is tracked in an LRU table of its own (`CONNTRACK_NEW`) until its
//! handshake completed, then moved to the main table (`CONNTRACK`), so that connections an
//! attacker opens but never completes can only push each other out, never an established one.
//! Entries expire in the agent's garbage collector (timeouts in `dataplane_common::ct_timeout`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    CtEntry, CtEntry6, CtEntryOf, CtKey, CtKey6, CtKeyOf, ct_origin, ct_rewrite, ct_state, tcp_flag,
};

use crate::{
    family::Family,
    maps::CONFIG,
    parse::{IPPROTO_TCP, Ipv4Packet, L4},
    policy::Via,
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
pub fn reply_key<A: Family>(proto: u8, saddr: A, sport: u16, daddr: A, dport: u16) -> CtKeyOf<A> {
    if proto == A::ICMP {
        // An echo reply keeps the request's identifier, in the same field.
        CtKeyOf {
            saddr: daddr,
            daddr: saddr,
            sport,
            dport: 0,
            proto,
            _pad: [0; 3],
        }
    } else {
        CtKeyOf {
            saddr: daddr,
            daddr: saddr,
            sport: dport,
            dport: sport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// The entry of `key`, if tracked: established connections first (the common case of a
/// packet), then those whose handshake is under way. The pointer stays valid for this program
/// run.
#[inline(always)]
pub fn lookup<A: Family>(key: &CtKeyOf<A>) -> Option<*mut CtEntryOf<A>> {
    A::conntrack()
        .get_ptr_mut(key)
        .or_else(|| A::conntrack_new().get_ptr_mut(key))
}

/// Removes `key` from whichever table holds it.
#[inline(always)]
pub fn remove<A: Family>(key: &CtKeyOf<A>) {
    if A::conntrack().remove(key).is_err() {
        let _ = A::conntrack_new().remove(key);
    }
}

/// Removes the connection whose entry is `key` if its other entry is `forward` (the same
/// original tuple: a client reusing its own port after a close, or after the forward half was
/// evicted), and says whether it did. A tuple held by another connection, even a closed one,
/// stays taken: a closed connection's reply tuple is reserved for the original tuple that
/// owned it (see `nat::allocate_source_port`).
#[inline(always)]
pub fn reclaim_for<A: Family>(key: &CtKeyOf<A>, forward: &CtKeyOf<A>) -> bool {
    let Some(entry) = lookup(key) else {
        return false;
    };
    // SAFETY: a map value from a lookup in this program run.
    if unsafe { (*entry).peer } != *forward {
        return false;
    }
    remove(forward);
    remove(key);
    true
}

/// The entry of the packet with `key`, unless the packet opens a new TCP connection on the
/// tuple of one that is closing (a SYN after FIN or RST, as a client reusing its source port
/// does): then the old connection's entries go, and the packet is a new connection, with its
/// own translation, policy judgement and flow record (Cilium's conntrack does the same).
#[inline(always)]
pub fn lookup_packet<A: Family>(key: &CtKeyOf<A>, tcp_flags: u8) -> Option<*mut CtEntryOf<A>> {
    const CLOSING: u8 = tcp_flag::FIN | tcp_flag::RST;
    let entry = lookup(key)?;
    if key.proto != IPPROTO_TCP || tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) != tcp_flag::SYN {
        return Some(entry);
    }
    // SAFETY: map values from lookups in this program run.
    unsafe {
        let peer = (*entry).peer;
        let closing = (*entry).tcp_flags & CLOSING != 0
            || lookup(&peer).is_some_and(|p| (*p).tcp_flags & CLOSING != 0);
        if !closing {
            return Some(entry);
        }
        remove(&peer);
        remove(key);
    }
    None
}

/// A packet of a tracked connection, as conntrack accounts it.
#[derive(Clone, Copy)]
pub struct Seen {
    pub len: u32,
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers (host order; 0 for other protocols).
    pub seq: u32,
    pub ack_seq: u32,
    /// ICMP type and code (0 for other protocols): an echo connection's answer is reported.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Where it was seen (for the flow events of a close or of a completed handshake).
    pub hook: u32,
    pub ifindex: u32,
}

/// Records the packet `seen` on the entry of `key`; the first FIN or RST of a connection
/// becomes a CLOSE flow event, and a connection not yet established moves on through its
/// handshake (and into the main table once it completed).
#[inline(always)]
pub fn account<A: Family>(key: &CtKeyOf<A>, entry: *mut CtEntryOf<A>, seen: &Seen) {
    const CLOSING: u8 = tcp_flag::FIN | tcp_flag::RST;
    let tcp_flags = seen.tcp_flags;
    // SAFETY: `entry` came from a map lookup in this program run; map values stay valid
    // while the program runs. Concurrent CPUs may race on these plain adds: counters are
    // approximate by design (no atomics on the hot path).
    let (before, state) = unsafe {
        let before = (*entry).tcp_flags;
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        (*entry).packets += 1;
        (*entry).bytes += u64::from(seen.len);
        (*entry).tcp_flags = before | tcp_flags;
        (before, (*entry).state)
    };
    if tcp_flags & CLOSING != 0 && before & CLOSING == 0 {
        // SAFETY: as above; the peer is another value of the same tables.
        let peer_closing =
            unsafe { lookup(&(*entry).peer).is_some_and(|p| (*p).tcp_flags & CLOSING != 0) };
        if !peer_closing {
            crate::flow::closed(key, entry, seen.hook, seen.ifindex);
        }
    }
    if state != ct_state::ESTABLISHED {
        handshake(key, entry, state, seen);
    }
}

/// Moves a connection that is not yet established on by the packet `seen` of `entry`: the
/// answer (TCP: the SYN-ACK) makes it SYN_RECV; the first side's next packet after that (TCP:
/// an ACK without SYN or RST, the handshake's last step) makes it established, moving both of
/// its entries into the main table. Until then an attacker's spoofed SYNs, which are answered
/// but never acknowledged, occupy only the LRU table.
#[inline(never)]
fn handshake<A: Family>(key: &CtKeyOf<A>, entry: *mut CtEntryOf<A>, state: u8, seen: &Seen) {
    const SYN_ACK: u8 = tcp_flag::SYN | tcp_flag::ACK;
    let tcp = key.proto == IPPROTO_TCP;
    // SAFETY: map values from lookups in this program run.
    unsafe {
        let peer_key = (*entry).peer;
        if (*entry).is_reply == 1 {
            if state == ct_state::SYN_SENT && (!tcp || seen.tcp_flags & SYN_ACK == SYN_ACK) {
                (*entry).state = ct_state::SYN_RECV;
                (*entry).handshake_ack = seen.seq.wrapping_add(1);
                if let Some(peer) = A::conntrack_new().get_ptr_mut(&peer_key) {
                    (*peer).state = ct_state::SYN_RECV;
                }
                if key.proto == A::ICMP {
                    // The echo reply: a record of its own (once per connection).
                    (*entry).icmp_type = seen.icmp_type;
                    crate::flow::replied(
                        key,
                        entry,
                        seen.icmp_type,
                        seen.icmp_code,
                        seen.hook,
                        seen.ifindex,
                    );
                }
            }
            return;
        }
        if state != ct_state::SYN_RECV {
            return;
        }
        let Some(peer) = A::conntrack_new().get_ptr_mut(&peer_key) else {
            return; // evicted half: the connection stays where it is until it expires
        };
        // TCP: the handshake's ACK, acknowledging the SYN-ACK the server really sent.
        let completes = !tcp
            || (seen.tcp_flags & (tcp_flag::ACK | tcp_flag::SYN | tcp_flag::RST) == tcp_flag::ACK
                && seen.ack_seq == (*peer).handshake_ack);
        if !completes {
            return;
        }
        (*entry).state = ct_state::ESTABLISHED;
        (*peer).state = ct_state::ESTABLISHED;
        // Straight from the LRU's values into the main table (no copies on the stack).
        if A::conntrack().insert(&peer_key, &*peer, 0).is_err() {
            // The main table is full of established connections: this one goes on
            // unestablished (and may be evicted); none of theirs is touched.
            (*entry).state = ct_state::SYN_RECV;
            (*peer).state = ct_state::SYN_RECV;
            return;
        }
        if A::conntrack().insert(key, &*entry, 0).is_err() {
            let _ = A::conntrack().remove(&peer_key);
            (*entry).state = ct_state::SYN_RECV;
            (*peer).state = ct_state::SYN_RECV;
            return;
        }
        if tcp {
            // A TCP connection is reported when it exists: a flood of SYNs reports nothing.
            crate::flow::established(key, entry, seen.hook, seen.ifindex);
        }
        let _ = A::conntrack_new().remove(key);
        let _ = A::conntrack_new().remove(&peer_key);
    }
}

/// Why a connection could not be tracked.
pub enum CtError {
    /// The table is full.
    Full,
    /// The reply key is taken by another connection.
    Exists,
}

fn insert_new<A: Family>(
    key: &CtKeyOf<A>,
    entry: &CtEntryOf<A>,
    flags: u64,
) -> Result<(), CtError> {
    match A::conntrack_new().insert(key, entry, flags) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => Err(CtError::Exists),
        Err(e) if e == -E2BIG => Err(CtError::Full),
        // ENOMEM and the like: no room either.
        Err(_) => Err(CtError::Full),
    }
}

/// A new connection: `forward` is its first packet's key, rewritten by (`rewrite`, `nat_addr`,
/// `nat_port`); `reply` is the key its answers will carry, which get the inverse rewrite back
/// to (`orig_addr`, `orig_port`).
#[derive(Clone, Copy)]
pub struct NewConnectionOf<A: Family> {
    pub forward: CtKeyOf<A>,
    pub reply: CtKeyOf<A>,
    pub origin: u8,
    pub rewrite: u8,
    pub nat_addr: A,
    pub nat_port: u16,
    pub orig_addr: A,
    pub orig_port: u16,
    /// [`ct_rewrite::HAIRPIN`] only: the destination port each direction gets (forward: the
    /// container's port; reply: the client's own source port); 0 otherwise.
    pub hairpin_port: u16,
    pub reply_hairpin_port: u16,
    /// The first packet's length, TCP flags, ICMP type and code.
    pub len: u32,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

pub type NewConnection = NewConnectionOf<u32>;

/// Tracks `c` as not yet established (in the LRU table, which makes room by evicting the
/// oldest unestablished connection). The reply entry goes in first with NOEXIST, and a reply
/// key an established connection holds counts as taken, so two connections can never share a
/// reply key (masquerade probes the next port on `Exists`).
#[inline(never)]
pub fn create<A: Family>(c: &NewConnectionOf<A>) -> Result<(), CtError> {
    if A::conntrack().get_ptr(&c.reply).is_some() {
        return Err(CtError::Exists);
    }
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: array element 0 always exists. New connections were judged just now.
    let generation = CONFIG
        .get_ptr(0)
        .map_or(0, |c| unsafe { (*c).policy_generation });
    let inverse = match c.rewrite {
        ct_rewrite::DST => ct_rewrite::SRC,
        ct_rewrite::SRC => ct_rewrite::DST,
        // Both sides either way.
        ct_rewrite::HAIRPIN => ct_rewrite::HAIRPIN,
        _ => ct_rewrite::NONE,
    };
    // One entry on the stack, written twice: the reply direction, then the forward one (the
    // stack is 512 bytes for every frame of a program together).
    let mut entry = CtEntryOf {
        nat_addr: c.orig_addr,
        nat_port: c.orig_port,
        rewrite: inverse,
        origin: c.origin,
        tcp_flags: 0,
        is_reply: 1,
        state: ct_state::SYN_SENT,
        icmp_type: 0,
        policy_generation: generation,
        _pad_family: Default::default(),
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        peer: c.forward,
        handshake_ack: 0,
        hairpin_port: c.reply_hairpin_port,
        _pad2: 0,
    };
    insert_new(&c.reply, &entry, BPF_NOEXIST)?;
    entry.nat_addr = c.nat_addr;
    entry.nat_port = c.nat_port;
    entry.hairpin_port = c.hairpin_port;
    entry.rewrite = c.rewrite;
    entry.tcp_flags = c.tcp_flags;
    entry.icmp_type = c.icmp_type;
    entry.is_reply = 0;
    entry.packets = 1;
    entry.bytes = u64::from(c.len);
    entry.peer = c.reply;
    if let Err(e) = insert_new(&c.forward, &entry, 0) {
        // Never leave half a connection behind.
        let _ = A::conntrack_new().remove(&c.reply);
        return Err(e);
    }
    Ok(())
}

/// Whether the connection of `entry` (found under `key`) may go on: judged again by policy
/// when the policy changed since it was last judged (each entry remembers the generation).
/// A connection the new policy denies loses both entries; its packets are dropped from now on.
#[inline(always)]
pub fn still_allowed(key: &CtKey, entry: *mut CtEntry) -> bool {
    still_allowed_of::<u32, false>(key, entry)
}

/// As [`still_allowed`], for an IPv6 connection (a NAT64 one included: judged by its IPv4
/// container); the IPv6 programs judge again in a program of their own (`policy6::rejudge`).
#[inline(always)]
pub fn still_allowed6(key: &CtKey6, entry: *mut CtEntry6) -> bool {
    still_allowed_of::<dataplane_common::In6Addr, true>(key, entry)
}

#[inline(always)]
fn still_allowed_of<A: Family, const HALVES: bool>(
    key: &CtKeyOf<A>,
    entry: *mut CtEntryOf<A>,
) -> bool {
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
        // Half a connection (the table of handshakes, an LRU map, evicts one entry of a pair
        // under a flood; the collector may take one before the other). A forward entry goes:
        // its packets are new connections from now on, judged as such (IPv6 runs the hook
        // again at once; IPv4's caller translates this one packet by the entry it holds). A
        // reply entry has nothing to be judged by, and is marked judged (else each of its
        // packets would come back here: IPv6 would tail-call between the hook and the
        // re-judging until the kernel's limit) until the collector takes it. IPv4's (no
        // `HALVES`) judges in line, where a half connection merely goes on as it was: the
        // container program has no verifier budget left for these branches.
        let Some(peer) = lookup(&peer_key) else {
            if HALVES {
                if (*entry).is_reply == 1 {
                    (*entry).policy_generation = generation;
                } else {
                    remove(key);
                }
            }
            return true;
        };
        let (forward_key, forward) = if (*entry).is_reply == 1 {
            (peer_key, peer)
        } else {
            (*key, entry)
        };
        // The destination as policy first saw it: after translation for DNAT and NAT64 (the
        // container), a hairpin's is the client itself.
        let (daddr, dport) = match (*forward).rewrite {
            ct_rewrite::DST | ct_rewrite::NAT64 => ((*forward).nat_addr, (*forward).nat_port),
            ct_rewrite::HAIRPIN => (forward_key.saddr, (*forward).hairpin_port),
            _ => (forward_key.daddr, forward_key.dport),
        };
        let via = match (*forward).origin {
            ct_origin::PUBLISHED => Via::Published,
            ct_origin::PLAIN => A::plain_via(&forward_key.saddr),
            _ => Via::Direct,
        };
        if A::allows(&forward_key.saddr, &daddr, forward_key.proto, dport, via) {
            (*entry).policy_generation = generation;
            (*peer).policy_generation = generation;
            true
        } else {
            remove(&peer_key);
            remove(key);
            false
        }
    }
}

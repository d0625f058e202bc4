//! Policy: whether a new connection may exist. User rules first, in order, first match wins
//! (what Docker's DOCKER-USER chain is for); then Docker's own isolation: networks apart,
//! `internal` networks kept off the outside, `icc: false` networks without
//! container-to-container traffic, container addresses not routed to from outside. Judged once
//! per connection (conntrack remembers), again after a policy change.
//!
//! The rules arrive compiled (the agent's `reconcile/policy.rs`, docs/DESIGN.md "Policy
//! compiled into lookups"): each side of the connection is a few values (any, its network, its
//! endpoint, its label class, its CIDR class: the longest rule prefix covering its address),
//! and the map holds, per (source kind and value, destination kind and value, protocol and
//! port or none), the first rule producing that key. One lookup per key shape in use (at most
//! `POLICY_MAX_TUPLES`, however many rules), the lowest rule index found wins.

use aya_ebpf::{cty::c_void, helpers::bpf_loop, maps::lpm_trie::Key};
use dataplane_common::{
    DropReason, In6Addr, POLICY_MAX_TUPLES, PolicyKey, PolicyPrefix, PolicyPrefix6, net_flags,
    policy_action, policy_tuple, selector_kind,
};

use crate::{
    maps::{
        ENDPOINTS, ENDPOINTS6, LOCAL_ADDRS, LOCAL_ADDRS6, POLICY, POLICY_META, POLICY_PREFIXES,
        POLICY_PREFIXES6,
    },
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};

/// Who one side of a connection is: the values its selectors can be keyed by.
#[repr(C)]
#[derive(Clone, Copy)]
struct Who {
    network_id: u32,
    endpoint_id: u32,
    label_class: u32,
    /// Its CIDR class (0: no rule prefix covers the address).
    cidr_class: u32,
    container: u8,
    net_flags: u8,
    _pad: u16,
}

/// Fills `side` in place for `addr` (no temporary `Who` on the stack: the judgement's frame
/// is on the container hook's call chains).
#[inline(always)]
fn identify(addr: u32, slot: u32, cidr: bool, side: &mut Who) {
    if let Some(e) = ENDPOINTS.get_ptr(&addr) {
        // SAFETY: a map value from this program run's lookup; fields read one by one.
        unsafe {
            side.container = 1;
            side.network_id = (*e).network_id;
            side.endpoint_id = (*e).endpoint_id;
            side.label_class = (*e).label_class;
            side.net_flags = (*e).net_flags;
        }
    }
    if cidr {
        side.cidr_class = cidr_class(slot, addr);
    }
}

/// The CIDR class of `addr` in half `slot`: its longest match in the prefix trie, 0 for none.
/// Not inlined, so the trie's key lives in a short frame of its own rather than in judge's
/// (whose frame is on the container hook's call chains with the lookups' callback below it).
#[inline(never)]
fn cidr_class(slot: u32, addr: u32) -> u32 {
    let key = Key::new(
        64,
        PolicyPrefix {
            slot: slot.to_be(),
            addr,
        },
    );
    POLICY_PREFIXES.get(key).copied().unwrap_or(0)
}

/// As [`identify`], for an IPv6 address (its endpoint in `ENDPOINTS6`, its CIDR class in the
/// IPv6 prefix trie: classes are numbered across both families, so the policy map itself is
/// the same for both).
#[inline(always)]
fn identify6(addr: &In6Addr, slot: u32, cidr: bool, side: &mut Who) {
    // An IPv4-only container behind NAT64 (at its IPv4-mapped address) is what it is over
    // IPv4: its endpoint, the IPv4 prefixes its address falls in (`cidr_class6`).
    // The IPv4 key is the address's last word where it is (a copy would grow this frame,
    // which is on the IPv6 programs' deepest chain).
    // SAFETY: map values from this program run's lookups; fields read one by one.
    let found = match addr.as_mapped_v4() {
        Some(_) => ENDPOINTS.get_ptr(&addr.0[3]).map(|e| unsafe {
            (
                (*e).network_id,
                (*e).endpoint_id,
                (*e).label_class,
                (*e).net_flags,
            )
        }),
        None => ENDPOINTS6.get_ptr(addr).map(|e| unsafe {
            (
                (*e).network_id,
                (*e).endpoint_id,
                (*e).label_class,
                (*e).net_flags,
            )
        }),
    };
    if let Some((network_id, endpoint_id, label_class, net_flags)) = found {
        side.container = 1;
        side.network_id = network_id;
        side.endpoint_id = endpoint_id;
        side.label_class = label_class;
        side.net_flags = net_flags;
    }
    if cidr {
        side.cidr_class = cidr_class6(slot, addr);
    }
}

/// As [`cidr_class`], in the IPv6 trie (the half's 32 bits, then the 128 of the address); an
/// IPv4-mapped address in the IPv4 trie. Both keys in this one short frame: a call to
/// `cidr_class` from here would add a frame to the IPv6 programs' deepest chain.
#[inline(never)]
fn cidr_class6(slot: u32, addr: &In6Addr) -> u32 {
    if let Some(v4) = addr.as_mapped_v4() {
        let key = Key::new(
            64,
            PolicyPrefix {
                slot: slot.to_be(),
                addr: v4,
            },
        );
        return POLICY_PREFIXES.get(key).copied().unwrap_or(0);
    }
    let key = Key::new(
        160,
        PolicyPrefix6 {
            slot: slot.to_be(),
            addr: *addr,
        },
    );
    POLICY_PREFIXES6.get(key).copied().unwrap_or(0)
}

const NOBODY: Who = Who {
    network_id: 0,
    endpoint_id: 0,
    label_class: 0,
    cidr_class: 0,
    container: 0,
    net_flags: 0,
    _pad: 0,
};

/// The value `side` has for a selector of `kind`, if it has one (a non-container has no
/// network, endpoint or labels; an address no rule prefix covers no CIDR class).
#[inline(always)]
fn value_of(kind: u8, side: &Who) -> Option<u32> {
    match kind {
        selector_kind::ANY => Some(0),
        selector_kind::NETWORK if side.container != 0 => Some(side.network_id),
        selector_kind::ENDPOINT if side.container != 0 => Some(side.endpoint_id),
        selector_kind::LABELS if side.label_class != 0 => Some(side.label_class),
        selector_kind::CIDR if side.cidr_class != 0 => Some(side.cidr_class),
        _ => None,
    }
}

/// How a connection reaches its destination, which Docker's isolation cares about.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Straight to the address (container to container, container out, host to container).
    Direct,
    /// Through a published port of the host (the destination is the translated one).
    Published,
    /// Routed from outside the host straight to a container address.
    Routed,
}

/// The state of one judgement (bpf_loop's context).
#[repr(C)]
struct Lookups {
    from: Who,
    to: Who,
    /// The lowest rule index found so far (u32::MAX: none).
    priority: u32,
    dport: u16,
    proto: u8,
    slot: u8,
    /// The matching rule's action, 0 while none matched.
    action: u8,
    _pad: [u8; 3],
}

/// One key shape: bpf_loop calls it for shape `index` of the live half; never stops early
/// (a later shape may hold a lower rule index). Being a callback, the verifier checks it once,
/// however many call sites there are.
#[inline(never)]
unsafe extern "C" fn lookup_step(index: u64, lookups: *mut c_void) -> i64 {
    // SAFETY: `lookups` is the Lookups that judge() passed to bpf_loop.
    let walk = unsafe { &mut *lookups.cast::<Lookups>() };
    let Some(meta) = POLICY_META.get_ptr(0) else {
        return 1;
    };
    // Bounds the index for the verifier (the loop count is at most POLICY_MAX_TUPLES).
    let index = index as usize;
    if index >= POLICY_MAX_TUPLES {
        return 1;
    }
    // SAFETY: element 0 of the array always exists; index checked above.
    let tuple = unsafe { (*meta).tuples[index] };
    let from_kind = tuple & policy_tuple::KIND_BITS;
    let to_kind = (tuple >> policy_tuple::TO_SHIFT) & policy_tuple::KIND_BITS;
    let (Some(from_value), Some(to_value)) =
        (value_of(from_kind, &walk.from), value_of(to_kind, &walk.to))
    else {
        return 0;
    };
    let ported = tuple & policy_tuple::PORTED != 0;
    let key = PolicyKey {
        slot: walk.slot,
        from_kind,
        to_kind,
        proto: if ported { walk.proto } else { 0 },
        port: if ported { walk.dport } else { 0 },
        _pad: 0,
        from_value,
        to_value,
    };
    if let Some(verdict) = POLICY.get_ptr(&key) {
        // SAFETY: a map value from this program run's lookup.
        let (priority, action) = unsafe { ((*verdict).priority, (*verdict).action) };
        if priority < walk.priority {
            walk.priority = priority;
            walk.action = action;
        }
    }
    0
}

/// Whether a new connection from `saddr` to `daddr`:`dport` (the destination after any
/// translation) may exist.
#[inline(always)]
pub fn allows(saddr: u32, daddr: u32, proto: u8, dport: u16, via: Via) -> bool {
    check(saddr, daddr, proto, dport, via).is_ok()
}

/// As [`allows`], with why not: a user deny rule is Cilium's POLICY_DENY, Docker's isolation
/// (no rule decided) its default deny, POLICY_DENIED.
#[inline(always)]
pub fn check(saddr: u32, daddr: u32, proto: u8, dport: u16, via: Via) -> Result<(), DropReason> {
    let what = u32::from(dport) | u32::from(proto) << 16 | (via as u32) << 24;
    match judge(saddr, daddr, what) {
        JUDGED_ALLOW => Ok(()),
        JUDGED_DENY => Err(DropReason::PolicyDeny),
        _ => Err(DropReason::PolicyDenied),
    }
}

/// As [`check`], for a new IPv6 connection from `saddr` to `daddr`:`dport` (the destination
/// after any translation): the same rules (their CIDRs in the IPv6 trie) and the same
/// isolation, ICMPv6 standing for ICMP.
#[inline(always)]
pub fn check6(
    saddr: &In6Addr,
    daddr: &In6Addr,
    proto: u8,
    dport: u16,
    via: Via,
) -> Result<(), DropReason> {
    let what = u32::from(dport) | u32::from(proto) << 16 | (via as u32) << 24;
    match judge6(saddr, daddr, what) {
        JUDGED_ALLOW => Ok(()),
        JUDGED_DENY => Err(DropReason::PolicyDeny),
        _ => Err(DropReason::PolicyDenied),
    }
}

const JUDGED_ALLOW: u32 = 0;
const JUDGED_DENY: u32 = 1;
const JUDGED_ISOLATED: u32 = 2;

/// The judgement itself, a function of its own (not inlined): the lookups' context and both
/// sides' identities then live in this frame, once, instead of in every caller's, which keeps
/// the container hook's deepest call chain within the verifier's 512-byte combined stack.
/// Scalars only in and out (`what`: port, protocol << 16, via << 24), so the call is plain
/// registers.
#[inline(never)]
fn judge(saddr: u32, daddr: u32, what: u32) -> u32 {
    let dport = what as u16;
    let proto = (what >> 16) as u8;
    let via = match what >> 24 {
        0 => Via::Direct,
        1 => Via::Published,
        _ => Via::Routed,
    };
    // SAFETY: array element 0 always exists; fields read one by one.
    let (slot, count, cidr_sides) = POLICY_META.get_ptr(0).map_or((0, 0, 0), |m| unsafe {
        ((*m).slot, (*m).tuple_count, (*m).cidr_sides)
    });
    let mut walk = Lookups {
        from: NOBODY,
        to: NOBODY,
        priority: u32::MAX,
        dport,
        proto,
        slot: slot as u8,
        action: 0,
        _pad: [0; 3],
    };
    identify(saddr, slot, cidr_sides & 1 != 0, &mut walk.from);
    identify(daddr, slot, cidr_sides & 2 != 0, &mut walk.to);
    if count > 0 {
        // SAFETY: the callback and its context outlive the call; the kernel bounds the loop.
        unsafe {
            bpf_loop(
                count.min(POLICY_MAX_TUPLES as u32),
                lookup_step as *mut c_void,
                (&mut walk as *mut Lookups).cast(),
                0,
            )
        };
    }
    match walk.action {
        policy_action::ALLOW => JUDGED_ALLOW,
        policy_action::DENY => JUDGED_DENY,
        _ if isolation(&walk.from, &walk.to, daddr, via, walk.proto) => JUDGED_ALLOW,
        _ => JUDGED_ISOLATED,
    }
}

/// The judgement of an IPv6 connection, as [`judge`] (a frame of its own in the IPv6
/// programs, which have a stack of their own): the addresses by reference (the callers'
/// are in a map value, the per-CPU scratch: nothing of 16 bytes is copied onto the stack).
#[inline(never)]
fn judge6(saddr: &In6Addr, daddr: &In6Addr, what: u32) -> u32 {
    let dport = what as u16;
    let proto = (what >> 16) as u8;
    let via = match what >> 24 {
        0 => Via::Direct,
        1 => Via::Published,
        _ => Via::Routed,
    };
    // SAFETY: array element 0 always exists; fields read one by one.
    let (slot, count, cidr_sides) = POLICY_META.get_ptr(0).map_or((0, 0, 0), |m| unsafe {
        ((*m).slot, (*m).tuple_count, (*m).cidr_sides)
    });
    let mut walk = Lookups {
        from: NOBODY,
        to: NOBODY,
        priority: u32::MAX,
        dport,
        proto,
        slot: slot as u8,
        action: 0,
        _pad: [0; 3],
    };
    identify6(saddr, slot, cidr_sides & 1 != 0, &mut walk.from);
    identify6(daddr, slot, cidr_sides & 2 != 0, &mut walk.to);
    if count > 0 {
        // SAFETY: as in judge().
        unsafe {
            bpf_loop(
                count.min(POLICY_MAX_TUPLES as u32),
                lookup_step as *mut c_void,
                (&mut walk as *mut Lookups).cast(),
                0,
            )
        };
    }
    match walk.action {
        policy_action::ALLOW => JUDGED_ALLOW,
        policy_action::DENY => JUDGED_DENY,
        _ if isolation6(&walk.from, &walk.to, daddr, via, walk.proto) => JUDGED_ALLOW,
        _ => JUDGED_ISOLATED,
    }
}

/// Docker's isolation between two containers, (network, endpoint, flags) of the one that
/// sends and (network, endpoint) of the other: networks apart; within an `icc: false` network
/// only a container to itself. The same both ways, so it can be judged per packet too.
#[inline(always)]
fn containers_may_talk(from: (u32, u32, u8), to: (u32, u32)) -> bool {
    from.0 == to.0 && (from.2 & net_flags::NO_ICC == 0 || from.1 == to.1)
}

/// Docker's isolation, where no user rule decided.
#[inline(always)]
fn isolation(from: &Who, to: &Who, daddr: u32, via: Via, proto: u8) -> bool {
    if from.container != 0 && to.container != 0 {
        if via == Via::Published {
            // Published ports are for every network but internal ones, both ways: an internal
            // network's containers neither publish nor reach another container through the
            // host's published ports (Docker drops what leaves an internal bridge for another).
            return (from.net_flags | to.net_flags) & net_flags::INTERNAL == 0;
        }
        return containers_may_talk(
            (from.network_id, from.endpoint_id, from.net_flags),
            (to.network_id, to.endpoint_id),
        );
    }
    if from.container != 0 {
        // To the host or outside: internal networks stay on the host.
        return from.net_flags & net_flags::INTERNAL == 0 || LOCAL_ADDRS.get_ptr(&daddr).is_some();
    }
    if to.container != 0 {
        if via == Via::Direct {
            // The host's own processes (only the socket hooks judge those): the host is on
            // every bridge, internal ones too, as with Docker.
            return true;
        }
        if to.net_flags & net_flags::INTERNAL != 0 {
            return false;
        }
        if via != Via::Routed {
            return true;
        }
        // Routed to the container's address: closed in `nat` mode (Docker 28), open in
        // `nat-unprotected`; in `routed` mode open to ICMP (published ports come here as
        // published connections, not routed ones).
        return to.net_flags & net_flags::UNPROTECTED != 0
            || (to.net_flags & net_flags::ROUTED != 0 && proto == IPPROTO_ICMP);
    }
    true
}

/// As [`isolation`], for IPv6 (the host's IPv6 addresses, ICMPv6). A copy of its own rather
/// than one generic function: the IPv4 judgement's code stays what it was (its program's
/// stack is spent to the byte).
#[inline(always)]
fn isolation6(from: &Who, to: &Who, daddr: &In6Addr, via: Via, proto: u8) -> bool {
    if from.container != 0 && to.container != 0 {
        if via == Via::Published {
            return (from.net_flags | to.net_flags) & net_flags::INTERNAL == 0;
        }
        return containers_may_talk(
            (from.network_id, from.endpoint_id, from.net_flags),
            (to.network_id, to.endpoint_id),
        );
    }
    if from.container != 0 {
        return from.net_flags & net_flags::INTERNAL == 0 || LOCAL_ADDRS6.get_ptr(daddr).is_some();
    }
    if to.container != 0 {
        return outside_to_container(to, via, proto == IPPROTO_ICMPV6);
    }
    true
}

/// Docker's isolation for a connection to a container from a non-container (`icmp`: it is
/// the family's ICMP).
#[inline(always)]
fn outside_to_container(to: &Who, via: Via, icmp: bool) -> bool {
    if via == Via::Direct {
        // The host's own processes (only the socket hooks judge those): the host is on
        // every bridge, internal ones too, as with Docker.
        return true;
    }
    if to.net_flags & net_flags::INTERNAL != 0 {
        return false;
    }
    if via != Via::Routed {
        return true;
    }
    // Routed to the container's address: closed in `nat` mode (Docker 28), open in
    // `nat-unprotected`; in `routed` mode open to ICMP (published ports come here as
    // published connections, not routed ones).
    to.net_flags & net_flags::UNPROTECTED != 0 || (to.net_flags & net_flags::ROUTED != 0 && icmp)
}

//! Policy: whether a new connection may exist. User rules first, in order, first match wins
//! (what Docker's DOCKER-USER chain is for); then Docker's own isolation: networks apart,
//! `internal` networks kept off the outside, `icc: false` networks without
//! container-to-container traffic, container addresses not routed to from outside. Judged once
//! per connection (conntrack remembers), again after a policy change.

use aya_ebpf::{cty::c_void, helpers::bpf_loop};
use dataplane_common::{DropReason, PolicyRule, capacity, net_flags, policy_action, selector_kind};

use crate::{
    maps::{CONFIG, ENDPOINTS, LOCAL_ADDRS, POLICY_RULES},
    parse::IPPROTO_ICMP,
};

/// Who one side of a connection is.
#[repr(C)]
#[derive(Clone, Copy)]
struct Who {
    // Widest first: no padding inside, so two of these (the rule walk's context, on the
    // stack of a call frame) stay small.
    label_bits: u64,
    addr: u32,
    network_id: u32,
    endpoint_id: u32,
    container: bool,
    net_flags: u8,
}

/// Fills `side` in place for `addr` (no temporary `Who` on the stack: the walk's frame is on
/// the container hook's deepest call chain).
#[inline(always)]
fn identify(addr: u32, side: &mut Who) {
    side.addr = addr;
    if let Some(e) = ENDPOINTS.get_ptr(&addr) {
        // SAFETY: a map value from this program run's lookup; fields read one by one.
        unsafe {
            side.container = true;
            side.network_id = (*e).network_id;
            side.endpoint_id = (*e).endpoint_id;
            side.label_bits = (*e).label_bits;
            side.net_flags = (*e).net_flags;
        }
    }
}

const NOBODY: Who = Who {
    label_bits: 0,
    addr: 0,
    network_id: 0,
    endpoint_id: 0,
    container: false,
    net_flags: 0,
};

#[inline(always)]
fn selects(kind: u8, value: u32, mask: u32, side: &Who) -> bool {
    match kind {
        selector_kind::ANY => true,
        selector_kind::NETWORK => side.container && side.network_id == value,
        selector_kind::ENDPOINT => side.container && side.endpoint_id == value,
        selector_kind::LABELS => {
            side.container && value < 64 && (side.label_bits >> value) & 1 == 1
        }
        selector_kind::CIDR => side.addr & mask == value,
        _ => false,
    }
}

#[inline(always)]
fn rule_matches(rule: &PolicyRule, from: &Who, to: &Who, proto: u8, dport: u16) -> bool {
    (rule.proto == 0 || rule.proto == proto)
        && (rule.port == 0 || rule.port == dport)
        && selects(rule.from_kind, rule.from_value, rule.from_mask, from)
        && selects(rule.to_kind, rule.to_value, rule.to_mask, to)
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

/// The state of one walk over the rules (bpf_loop's context).
#[repr(C)]
struct RuleWalk {
    from: Who,
    to: Who,
    count: u32,
    dport: u16,
    proto: u8,
    /// The matching rule's action, 0 while none matched.
    action: u8,
}

/// One step of the walk: bpf_loop calls it for rule `index`; 1 stops the walk. Being a
/// callback, the verifier checks it once, however many rules and call sites there are.
#[inline(never)]
unsafe extern "C" fn rule_step(index: u64, walk: *mut c_void) -> i64 {
    // SAFETY: `walk` is the RuleWalk that allows() passed to bpf_loop.
    let walk = unsafe { &mut *walk.cast::<RuleWalk>() };
    let index = index as u32;
    if index >= walk.count {
        return 1;
    }
    let Some(rule) = POLICY_RULES.get(index) else {
        return 1;
    };
    if rule_matches(rule, &walk.from, &walk.to, walk.proto, walk.dport) {
        walk.action = rule.action;
        return 1;
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

const JUDGED_ALLOW: u32 = 0;
const JUDGED_DENY: u32 = 1;
const JUDGED_ISOLATED: u32 = 2;

/// The judgement itself, a function of its own (not inlined): the walk's context and both
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
    // SAFETY: array element 0 always exists.
    let count = CONFIG.get_ptr(0).map_or(0, |c| unsafe { (*c).rule_count });
    let mut walk = RuleWalk {
        from: NOBODY,
        to: NOBODY,
        count,
        dport,
        proto,
        action: 0,
    };
    identify(saddr, &mut walk.from);
    identify(daddr, &mut walk.to);
    if count > 0 {
        // SAFETY: the callback and its context outlive the call; the kernel bounds the loop.
        unsafe {
            bpf_loop(
                capacity::POLICY_RULES,
                rule_step as *mut c_void,
                (&mut walk as *mut RuleWalk).cast(),
                0,
            )
        };
    }
    match walk.action {
        policy_action::ALLOW => JUDGED_ALLOW,
        policy_action::DENY => JUDGED_DENY,
        _ if isolation(&walk.from, &walk.to, via, walk.proto) => JUDGED_ALLOW,
        _ => JUDGED_ISOLATED,
    }
}

/// Docker's isolation, where no user rule decided.
#[inline(always)]
fn isolation(from: &Who, to: &Who, via: Via, proto: u8) -> bool {
    if from.container && to.container {
        if via == Via::Published {
            // Published ports are for every network but internal ones, both ways: an internal
            // network's containers neither publish nor reach another container through the
            // host's published ports (Docker drops what leaves an internal bridge for another).
            return (from.net_flags | to.net_flags) & net_flags::INTERNAL == 0;
        }
        if from.network_id != to.network_id {
            return false;
        }
        return from.net_flags & net_flags::NO_ICC == 0 || from.endpoint_id == to.endpoint_id;
    }
    if from.container {
        // To the host or outside: internal networks stay on the host.
        return from.net_flags & net_flags::INTERNAL == 0
            || LOCAL_ADDRS.get_ptr(&to.addr).is_some();
    }
    if to.container {
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

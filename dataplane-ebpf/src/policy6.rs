//! Policy of the IPv6 programs: where a new IPv6 connection is judged (the user rules first,
//! then Docker's isolation: `policy::check6`, the same judgement as IPv4's), and the tracking
//! of the connections let through untranslated, so that their replies are known as replies
//! (never judged as connections of their own, never taken for something routed in from
//! outside). Called by `translate6::decide` for a packet no entry knows, and for a packet of a
//! connection tracked here.
//!
//! | hook | judged as (via) | tracked here |
//! |---|---|---|
//! | container veth ingress | the container's connection, to the address it goes to (direct); to a published port: the container it leads to (published) | to another container |
//! | uplink ingress | to a published port: the container it leads to (published); to a container's address: routed | routed ones let in |
//! | uplink egress | (judged at the container's veth) | a `routed` network's connection out |
//!
//! A container's connection out of a `nat` network is tracked by NAT66 (`translate6`), which
//! follows this judgement.
//!
//! A policy change reaches the connections already open: the first packet of one under the
//! new policy is judged again in a program of its own ([`rejudge`]).

use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::TcContext};
use dataplane_common::{
    CtEntry6, CtKey6, DropReason, In6Addr, PROGS6_REJUDGE_SLOT, PortKey6, ct_origin, ct_rewrite,
    hook, net_flags,
};

use crate::{
    conntrack,
    maps::{CONFIG, ENDPOINTS6, LOCAL_ADDRS6, NEW_CONNECTION6, PORTS6, PROGS6},
    parse::{IP6_DADDR_OFF, IP6_SADDR_OFF, IPPROTO_ICMPV6, parse_ipv6},
    policy::{self, Via},
    translate::{self, Hook, Verdict},
    translate6::{self, L4v6},
};

// The calls from the IPv6 programs pass scalars only (the packet's addresses are read again
// from its header here, where they are still as they arrived): a pointer to one of the
// caller's values would keep the whole value in the caller's frame, the programs' main frame,
// which is most of their 512-byte stack.

/// What a new connection's packet says, packed for [`new_connection`]: its ports, TCP flags,
/// ICMPv6 type and protocol.
#[inline(always)]
pub fn packed(protocol: u8, l4: &L4v6) -> u64 {
    u64::from(l4.sport)
        | u64::from(l4.dport) << 16
        | u64::from(l4.tcp_flags) << 32
        | u64::from(l4.icmp_type) << 40
        | u64::from(protocol) << 48
}

type Connection = conntrack::NewConnectionOf<In6Addr>;

// What the judgement of a new connection decided ([`judge_new`]): go on with the hook's
// translations, pass as it is, or drop (the reason in the bits above); and whether to track
// it here.
const GO_ON: u32 = 0;
const PASS: u32 = 1;
const DROP: u32 = 2;
const ACTION_BITS: u32 = 0xff;
const TRACK: u32 = 1 << 8;
const REASON_SHIFT: u32 = 16;

/// A packet no entry knows, at `hook` (`what`: [`packed`]): `Some(verdict)` when policy
/// decided its fate (dropped, or let through and tracked here), `None` for the hook's
/// translations to go on (NAT66, a published port) or for the packet to pass as before.
/// The judgement and the tracking are two calls made from here, each with its own short
/// frame, since either has deep calls below it (the rule lookups; conntrack's insertion).
#[inline(always)]
pub fn new_connection(ctx: &TcContext, hook: Hook, what: u64) -> Option<Verdict> {
    let outcome = judge_new(ctx, hook, what);
    if outcome & TRACK != 0 {
        track_untranslated(ctx, hook);
    }
    match outcome & ACTION_BITS {
        PASS => Some(Verdict::Pass),
        DROP => Some(Verdict::Drop(translate::recorded_drop(
            (outcome >> REASON_SHIFT) as u8,
        ))),
        _ => None,
    }
}

/// The judgement of a new connection at `hook`; the connection is put together in the
/// per-CPU scratch (`NEW_CONNECTION6`), not on the stack, for [`track_untranslated`].
#[inline(never)]
fn judge_new(ctx: &TcContext, hook: Hook, what: u64) -> u32 {
    let Some(c) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return GO_ON;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let c = unsafe { &mut *c };
    if load_addresses(ctx, &mut c.forward).is_none() {
        return GO_ON;
    }
    c.forward.sport = what as u16;
    c.forward.dport = (what >> 16) as u16;
    c.forward.proto = (what >> 48) as u8;
    c.forward._pad = [0; 3];
    c.tcp_flags = (what >> 32) as u8;
    c.icmp_type = (what >> 40) as u8;
    match hook {
        Hook::ContainerIngress => from_container(c),
        Hook::UplinkIngress => from_outside(c),
        Hook::UplinkEgress => leaving(c),
    }
}

#[inline(always)]
fn dropped(reason: DropReason) -> u32 {
    DROP | (reason as u32) << REASON_SHIFT
}

/// A container's new connection, judged at its own veth by where it goes (as IPv4 judges a
/// connection to another container there, and one out of the host where NAT tracks it: the
/// tuple is the same before NAT66); to a port published on the host, by the container it
/// leads to (a service's, by the backend `balance6` chooses). To another container it is tracked here; to the host it
/// is judged per packet (nothing tracks it: its replies cross no hook of ours); out of the
/// host NAT66 tracks it next, at the uplink.
#[inline(always)]
fn from_container(c: &mut Connection) -> u32 {
    if c.forward.proto != IPPROTO_ICMPV6 && ENDPOINTS6.get_ptr(&c.forward.daddr).is_none() {
        // To a port published on the host (`balance6` translates it): judged by where it
        // leads, as from outside.
        match published_target(c) {
            PUBLISHED_TO_CONTAINER => return to_published_container(c),
            PUBLISHED_TO_SERVICE => return GO_ON,
            _ => {}
        }
    }
    let key = &c.forward;
    if let Err(reason) = policy::check6(&key.saddr, &key.daddr, key.proto, key.dport, Via::Direct) {
        return dropped(reason);
    }
    if ENDPOINTS6.get_ptr(&key.daddr).is_some() {
        return GO_ON | TRACK;
    }
    GO_ON
}

/// A new connection from outside: to a published port, judged by the container it leads to
/// (the translation follows in `translate6`); routed straight to a container's address, by
/// Docker's isolation from outside (closed in `nat` mode, open in `nat-unprotected`, open to
/// ICMPv6 in `routed`) unless a user rule decides, and tracked when let in. Anything else is
/// for the host itself (its firewall's business, as with Docker).
#[inline(always)]
fn from_outside(c: &mut Connection) -> u32 {
    if c.forward.proto != IPPROTO_ICMPV6 {
        match published_target(c) {
            PUBLISHED_TO_CONTAINER => return to_published_container(c),
            // Judged by the backend the balancing program chooses (`balance6`).
            PUBLISHED_TO_SERVICE => return GO_ON,
            _ => {}
        }
    }
    let key = &c.forward;
    if ENDPOINTS6.get_ptr(&key.daddr).is_none() {
        return GO_ON;
    }
    match policy::check6(&key.saddr, &key.daddr, key.proto, key.dport, Via::Routed) {
        Ok(()) => PASS | TRACK,
        Err(reason) => dropped(reason),
    }
}

/// A new connection to a published port that leads to a container (`c.nat_addr`, found by
/// [`published_target`]), judged against that container.
#[inline(always)]
fn to_published_container(c: &Connection) -> u32 {
    let key = &c.forward;
    match policy::check6(
        &key.saddr,
        &c.nat_addr,
        key.proto,
        c.nat_port,
        Via::Published,
    ) {
        Ok(()) => GO_ON,
        Err(reason) => dropped(reason),
    }
}

const NOT_PUBLISHED: u32 = 0;
const PUBLISHED_TO_CONTAINER: u32 = 1;
const PUBLISHED_TO_SERVICE: u32 = 2;

/// Whether `c`'s destination is a published port, as `translate6` finds it (an exact
/// host-address binding, else one on every host address when the destination is one of the
/// host's own); the container's address and port go to `c.nat_addr` and `c.nat_port`. Out of
/// line: the ports map's key stays out of the caller's frame.
#[inline(never)]
fn published_target(c: &mut Connection) -> u32 {
    let mut port_key = PortKey6 {
        addr: c.forward.daddr,
        port: c.forward.dport,
        proto: c.forward.proto,
        _pad: 0,
    };
    let target = match PORTS6.get_ptr(&port_key) {
        Some(target) => target,
        None => {
            if LOCAL_ADDRS6.get_ptr(&port_key.addr).is_none() {
                return NOT_PUBLISHED;
            }
            port_key.addr = In6Addr::UNSPECIFIED;
            match PORTS6.get_ptr(&port_key) {
                Some(target) => target,
                None => return NOT_PUBLISHED,
            }
        }
    };
    // SAFETY: a map value from this program run's lookup, read field by field.
    unsafe {
        if (*target).is_service != 0 {
            return PUBLISHED_TO_SERVICE;
        }
        c.nat_addr = (*target).addr;
        c.nat_port = (*target).port;
    }
    PUBLISHED_TO_CONTAINER
}

/// A connection leaving through the uplink: a `routed` network's container keeps its address
/// (no NAT66) and is tracked here, so that the replies routed back to its address are known as
/// replies (isolation from outside would close the way in to them otherwise). Judged at the
/// container's veth already.
#[inline(always)]
fn leaving(c: &Connection) -> u32 {
    let Some(source) = ENDPOINTS6.get_ptr(&c.forward.saddr) else {
        return GO_ON;
    };
    // SAFETY: a map value from this program run's lookup.
    if unsafe { (*source).net_flags } & net_flags::ROUTED == 0 {
        return GO_ON;
    }
    PASS | TRACK
}

/// Tracks the connection [`judge_new`] put together in the scratch, let through as it is:
/// its entry makes its replies known as replies and gives its flow record. A full table
/// costs the record, not the connection (the packet does not depend on its entry). The
/// reply's key is written in place, field by field (no key on the stack).
#[inline(never)]
fn track_untranslated(ctx: &TcContext, hook: Hook) {
    let Some(c) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let c = unsafe { &mut *c };
    c.reply.saddr = c.forward.daddr;
    c.reply.daddr = c.forward.saddr;
    if c.forward.proto == IPPROTO_ICMPV6 {
        // An echo reply keeps the request's identifier, in the same field.
        c.reply.sport = c.forward.sport;
        c.reply.dport = 0;
    } else {
        c.reply.sport = c.forward.dport;
        c.reply.dport = c.forward.sport;
    }
    c.reply.proto = c.forward.proto;
    c.reply._pad = [0; 3];
    c.origin = ct_origin::PLAIN;
    c.rewrite = ct_rewrite::NONE;
    c.nat_addr = In6Addr::UNSPECIFIED;
    c.nat_port = 0;
    c.orig_addr = In6Addr::UNSPECIFIED;
    c.orig_port = 0;
    c.hairpin_port = 0;
    c.reply_hairpin_port = 0;
    c.len = ctx.len();
    c.icmp_code = 0;
    if conntrack::create(&*c).is_ok() {
        report(ctx, hook);
    }
}

/// The flow record of the connection just tracked; out of line, its event's fields built on
/// a frame of their own.
#[inline(never)]
fn report(ctx: &TcContext, hook: Hook) {
    translate6::report_new(ctx, hook);
}

/// What a tracked packet says, packed for [`tracked`]: TCP flags, ICMPv6 type, the hook's
/// number; and its sequence and acknowledgement numbers.
#[inline(always)]
pub fn packed_seen(hook: Hook, l4: &L4v6) -> (u32, u64) {
    (
        u32::from(l4.tcp_flags) | u32::from(l4.icmp_type) << 8 | hook.number() << 16,
        u64::from(l4.seq) << 32 | u64::from(l4.ack_seq),
    )
}

/// A packet of a connection tracked here (untranslated, `ct_origin::PLAIN`; `what` and
/// `seq_ack`: [`packed_seen`]): it passes as it is; accounted where its direction is seen
/// once (a container's veth, or the uplink's ingress for what comes from outside: every
/// packet of such a connection crosses exactly one of them), which also moves a TCP
/// connection through its handshake into the main table. Inlined: conntrack's calls below
/// it are deep, and its arguments are scalars (nothing of the caller's kept in memory).
#[inline(always)]
pub fn tracked(
    ctx: &TcContext,
    what: u32,
    seq_ack: u64,
    key: &CtKey6,
    entry: *mut CtEntry6,
) -> Verdict {
    let hook_number = what >> 16;
    if hook_number == hook::UPLINK_EGRESS {
        return Verdict::Pass;
    }
    let seen = conntrack::Seen {
        len: ctx.len(),
        tcp_flags: what as u8,
        seq: (seq_ack >> 32) as u32,
        ack_seq: seq_ack as u32,
        icmp_type: (what >> 8) as u8,
        icmp_code: 0,
        hook: hook_number,
        // SAFETY: `skb` points at the context the kernel passed to this program.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    };
    conntrack::account(key, entry, &seen);
    Verdict::Pass
}

/// Whether the connection of `entry` was last judged under an older policy than today's
/// (each entry remembers the generation it was judged under): its packet goes to
/// [`to_rejudge`] first.
#[inline(always)]
pub fn judged_before_the_change(entry: *const CtEntry6) -> bool {
    // SAFETY: array element 0 always exists; `entry` is a map value from a lookup in this
    // program run.
    CONFIG
        .get_ptr(0)
        .is_some_and(|c| unsafe { (*c).policy_generation != (*entry).policy_generation })
}

/// Tail-calls the program that judges an open connection again ([`rejudge`]), the hook in
/// the skb's control buffer (which a tail call keeps). Returns only when its slot is empty:
/// the packet then goes on under the judgement it had.
#[inline(always)]
pub fn to_rejudge(ctx: &TcContext, hook: Hook) {
    // SAFETY: `skb` points at the context the kernel passed to this program; tc programs
    // may write cb[]. A tail call with the program's own context; on failure it returns.
    unsafe {
        (*ctx.skb.skb).cb[0] = hook.number();
        let _ = PROGS6.tail_call(ctx, PROGS6_REJUDGE_SLOT);
    }
}

/// The program judging an open IPv6 connection again after a policy change (`dp_rejudge6`;
/// as IPv4's `conntrack::still_allowed`, which the IPv4 programs call in line): the packet's
/// connection found again, judged by the new rules and Docker's isolation, and either
/// dropped with both its entries gone (its flow record by the drop reporter; a first
/// fragment's fate recorded for the rest of its datagram), or let go on: its entries
/// remember the new generation, and the hook's program runs again from the start, now
/// finding nothing to judge. Nothing of the packet was changed before it came here.
#[inline(always)]
pub fn rejudge(ctx: &TcContext) -> Verdict {
    // SAFETY: as in `to_rejudge`.
    let number = unsafe { (*ctx.skb.skb).cb[0] };
    let hook = match number {
        hook::CONTAINER_INGRESS => Hook::ContainerIngress,
        hook::UPLINK_INGRESS => Hook::UplinkIngress,
        hook::UPLINK_EGRESS => Hook::UplinkEgress,
        _ => return Verdict::Pass,
    };
    let Some(ip) = parse_ipv6(ctx) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    let Some(l4) = translate6::parse_l4(ctx, &ip) else {
        return Verdict::Pass;
    };
    let key = translate6::key_of(&ip, &l4);
    if conntrack::lookup(&key).is_none_or(|entry| conntrack::still_allowed6(&key, entry)) {
        // SAFETY: a tail call with the program's own context, to the hook's IPv6 program.
        unsafe {
            let _ = PROGS6.tail_call(ctx, number);
        }
        return Verdict::Pass;
    }
    let verdict = Verdict::Drop(DropReason::PolicyDenied);
    if ip.is_first_fragment() {
        translate6::remember_first_fragment(&key, ip.id, &verdict);
    }
    translate6::hand_over_drop(ctx, hook, &verdict);
    verdict
}

/// A packet conntrack does not follow (neither TCP, UDP nor ICMPv6 echo, nor an ICMPv6
/// error about a tracked connection; `protocol`, the offset of its upper-layer header, and
/// whether it is a fragment): judged on its own, per packet, by the policy a new connection
/// would meet, as IPv4's are (Docker's isolation holds for every protocol): from a container,
/// everywhere; from outside, what is routed to a container's address. Neighbour discovery is
/// the link's own and passes. Not tracked, so nothing of these fills a table. Its addresses
/// go to the per-CPU scratch, as a new connection's.
#[inline(never)]
pub fn untracked(
    ctx: &TcContext,
    hook: Hook,
    protocol: u8,
    l4_offset: u32,
    fragment: bool,
) -> Verdict {
    let Some(c) = NEW_CONNECTION6.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: this CPU's element, used by this program run only.
    let key = unsafe { &mut (*c).forward };
    if load_addresses(ctx, key).is_none() {
        return Verdict::Pass;
    }
    let via = match hook {
        Hook::ContainerIngress => Via::Direct,
        Hook::UplinkIngress if ENDPOINTS6.get_ptr(&key.daddr).is_some() => Via::Routed,
        Hook::UplinkIngress | Hook::UplinkEgress => return Verdict::Pass,
    };
    // ICMPv6 types 133-137: router solicitation and advertisement, neighbour solicitation
    // and advertisement, redirect.
    if protocol == IPPROTO_ICMPV6
        && !fragment
        && ctx
            .load::<u8>(l4_offset as usize)
            .is_ok_and(|t| (133..=137).contains(&t))
    {
        return Verdict::Pass;
    }
    match policy::check6(&key.saddr, &key.daddr, protocol, 0, via) {
        Ok(()) => Verdict::Pass,
        Err(reason) => Verdict::Drop(reason),
    }
}

/// The packet's source and destination, as in its IPv6 header, into `key` (a map value:
/// loaded straight there, 16 bytes each, not through the stack).
#[inline(always)]
fn load_addresses(ctx: &TcContext, key: &mut CtKey6) -> Option<()> {
    let skb = ctx.skb.skb.cast::<c_void>();
    // SAFETY: the helper writes 16 bytes into each address (an In6Addr is 16 plain bytes);
    // the constant length is what the verifier needs to see.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            skb,
            IP6_SADDR_OFF as u32,
            core::ptr::addr_of_mut!(key.saddr).cast(),
            16,
        ) == 0
            && bpf_skb_load_bytes(
                skb,
                IP6_DADDR_OFF as u32,
                core::ptr::addr_of_mut!(key.daddr).cast(),
                16,
            ) == 0
    };
    loaded.then_some(())
}

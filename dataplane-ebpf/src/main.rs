//! Entry programs, one per hook. Each is thin: it calls into the module of each concern and maps
//! the outcome onto an explicit verdict.
#![no_std]
#![no_main]

mod balance6;
mod conntrack;
mod early;
mod family;
mod flow;
mod lb;
mod maps;
mod nat;
mod nat64;
mod parse;
mod policy;
mod policy6;
mod reject;
mod sock;
mod stats;
mod translate;
mod translate6;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use dataplane_common::{DropReason, hook};

use crate::translate::Verdict;

/// Verdict that hands the packet to the next program of the TCX chain (or to the stack when
/// there is none). `TC_ACT_OK` would skip programs attached after ours.
const TC_PASS: i32 = TC_ACT_UNSPEC;

#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` points at the context the kernel passed to this program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Runs the translations of `hook` and turns the outcome into a tc verdict, counting drops.
#[inline(always)]
fn tc_verdict(ctx: &TcContext, counter_hook: u32, hook: translate::Hook) -> i32 {
    stats::count_packet(skb_ifindex(ctx), counter_hook, ctx.len());
    tc_action(translate::handle(ctx, hook))
}

/// The tc action of a verdict, counting drops.
#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_PASS,
        Verdict::Drop(reason) => {
            stats::count_drop(reason);
            TC_ACT_SHOT
        }
        // SAFETY: a helper call with no parameters block (the kernel looks the neighbour up).
        Verdict::RedirectNeigh(ifindex) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        // SAFETY: plain helper call.
        Verdict::RedirectPeer(ifindex) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
        Verdict::Refuse(reason, ifindex) => {
            stats::count_drop(reason);
            // SAFETY: plain helper call; flags 0 sends out of (egress) `ifindex`.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
    }
}

/// Traffic leaving a container (tc ingress of its host-side veth).
#[classifier]
// Inlined into the entry point aya's macro wraps it in: an empty outer frame still counts 16
// bytes towards the verifier's 512-byte combined stack, and this program's deepest chain
// (this frame, conntrack::handshake, conntrack::create) needs them.
#[inline(always)]
pub fn dp_container_ingress(ctx: TcContext) -> i32 {
    tc_verdict(
        &ctx,
        hook::CONTAINER_INGRESS,
        translate::Hook::ContainerIngress,
    )
}

/// Traffic arriving from outside the host (tc ingress of the uplink).
#[classifier]
pub fn dp_uplink_ingress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, hook::UPLINK_INGRESS, translate::Hook::UplinkIngress)
}

/// Traffic leaving the host (tc egress of the uplink).
#[classifier]
pub fn dp_uplink_egress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, hook::UPLINK_EGRESS, translate::Hook::UplinkEgress)
}

/// IPv6 traffic of a container's veth: the IPv4 program's tail call for each IPv6 frame (see
/// `translate::ipv6`), which has counted the packet already. A program of its own, so that
/// the IPv6 path has the verifier's whole 512-byte stack (the IPv4 program's main frame takes
/// most of it).
#[classifier]
pub fn dp_container_ingress6(ctx: TcContext) -> i32 {
    tc_action(translate::handle6(&ctx, translate::Hook::ContainerIngress))
}

/// IPv6 traffic arriving on the uplink (tail call of `dp_uplink_ingress`).
#[classifier]
pub fn dp_uplink_ingress6(ctx: TcContext) -> i32 {
    tc_action(translate::handle6(&ctx, translate::Hook::UplinkIngress))
}

/// IPv6 traffic leaving through the uplink (tail call of `dp_uplink_egress`).
#[classifier]
pub fn dp_uplink_egress6(ctx: TcContext) -> i32 {
    tc_action(translate::handle6(&ctx, translate::Hook::UplinkEgress))
}

/// New IPv6 connections to a service: tail-called by `dp_container_ingress6` (a container's
/// connection to a VIP) and `dp_uplink_ingress6` (a published port leading to a service)
/// once conntrack missed, so that balancing has a 512-byte stack of its own.
#[classifier]
pub fn dp_balance6(ctx: TcContext) -> i32 {
    tc_action(balance6::handle(&ctx))
}

/// NAT64 of published ports, both directions (tail call of `dp_uplink_ingress6` for IPv6
/// requests, of `dp_container_ingress` for IPv4 replies; see `nat64.rs`).
#[classifier]
pub fn dp_rejudge6(ctx: TcContext) -> i32 {
    tc_action(policy6::rejudge(&ctx))
}

#[classifier]
pub fn dp_nat64(ctx: TcContext) -> i32 {
    tc_action(nat64::handle(&ctx))
}

/// The drop reporter of the IPv6 programs (tail-called by them, slot 0 of `dp_progs6_v2`; by
/// NAT64 for the IPv4 packets it drops too): the drop they decided on, its flow event (on this
/// program's own stack), and their verdict.
#[classifier]
pub fn dp_drop6(ctx: TcContext) -> i32 {
    tc_action(translate6::report_handed_over(&ctx))
}

/// Early path on the uplink, before a socket buffer exists: drops outside sources on the deny
/// list, IPv4 and IPv6 (attached only while a list has entries; see the agent's `--xdp`).
#[xdp]
pub fn dp_uplink_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: `ctx` points at the xdp_md the kernel passed to this program.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let len = (ctx.data_end() - ctx.data()) as u32;
    stats::count_packet(ifindex, hook::UPLINK_XDP, len);
    match early::at_xdp(&ctx) {
        early::Early::Denied(denied) => {
            stats::count_drop(DropReason::PolicyDeny);
            flow::dropped(&flow::Dropped {
                tuple: denied.tuple,
                tcp_flags: denied.tcp_flags,
                icmp_type: denied.icmp_type,
                icmp_code: denied.icmp_code,
                len,
                reason: DropReason::PolicyDeny,
                hook: hook::UPLINK_XDP,
                ifindex,
            });
            xdp_action::XDP_DROP
        }
        // IPv6 sources on the list: counted as IPv4's (IPv6 drops make no flow records yet).
        early::Early::Unread if early::denied6_at_xdp(&ctx) => {
            stats::count_drop(DropReason::PolicyDeny);
            xdp_action::XDP_DROP
        }
        early::Early::Allowed | early::Early::Unread => xdp_action::XDP_PASS,
    }
}

/// Host processes connecting to service VIPs and published ports (cgroup connect4): the
/// connection goes to the backend; refused when the service has no backend or policy denies.
#[cgroup_sock_addr(connect4)]
pub fn dp_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Forward::Connect4)
}

/// Each datagram of host processes' unconnected UDP sockets (cgroup sendmsg4), as connect4.
#[cgroup_sock_addr(sendmsg4)]
pub fn dp_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Forward::Sendmsg4)
}

/// Replies received by those sockets (cgroup recvmsg4): their source back to the VIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn dp_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// getpeername() of a translated socket (cgroup getpeername4): the VIP it connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn dp_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// Host processes' and containers' AF_INET6 sockets (cgroup connect6): to `[::1]:PORT`, the
/// host's IPv6 addresses and v4-mapped addresses, as connect4 (an IPv4 container through a
/// v4-mapped address).
#[cgroup_sock_addr(connect6)]
pub fn dp_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, sock::Forward::Connect6)
}

/// Each datagram of unconnected AF_INET6 UDP sockets (cgroup sendmsg6), as connect6 for
/// IPv6 destinations.
#[cgroup_sock_addr(sendmsg6)]
pub fn dp_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, sock::Forward::Sendmsg6)
}

/// Replies received by AF_INET6 sockets (cgroup recvmsg6): their source back to what the
/// socket asked for.
#[cgroup_sock_addr(recvmsg6)]
pub fn dp_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// getpeername() of a translated AF_INET6 socket (cgroup getpeername6).
#[cgroup_sock_addr(getpeername6)]
pub fn dp_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

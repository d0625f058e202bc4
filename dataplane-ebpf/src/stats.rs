//! Counters: per-interface traffic, per-reason drops and the TCP flags of passed packets.

use aya_ebpf::{bindings::__sk_buff, maps::PerCpuArray, programs::TcContext};
use dataplane_common::{DropReason, IfaceStats, IfaceStatsKey, In6Addr, hook, tcp_flag_count};

use crate::{
    maps::{DROPS, IFACE_STATS, LOCAL_ADDRS, LOCAL_ADDRS6, TCP_FLAGS, TCP_FLAGS6},
    parse::{IP_DADDR_OFF, IP6_DADDR_OFF},
};

/// Counts one packet of `len` bytes on `ifindex` at `hook`.
#[inline(always)]
pub fn count_packet(ifindex: u32, hook: u32, len: u32) {
    let key = IfaceStatsKey { ifindex, hook };
    match IFACE_STATS.get_ptr_mut(&key) {
        // SAFETY: a map value from the lookup just made; per-CPU, so no other CPU writes it
        // and a plain add is race free.
        Some(stats) => unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
        },
        None => {
            let first = IfaceStats {
                packets: 1,
                bytes: u64::from(len),
            };
            // A full map loses this interface's counts, not the packet; nothing more to do.
            let _ = IFACE_STATS.insert(&key, &first, 0);
        }
    }
}

/// Counts a drop for `reason`.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a map value from the lookup just made; a per-CPU slot has no concurrent
        // writer.
        unsafe { *counter += 1 };
    }
}

/// Where a TCP packet that `hook` passes is counted, if there (see `tcp_flag_count`'s
/// points): every packet once, although a container's packet leaving the host crosses two
/// of our hooks (its veth's, then the uplink's egress).
#[inline(always)]
fn tcp_flags_point(ctx: &TcContext, hook: u32, ipv6: bool) -> Option<u32> {
    match hook {
        hook::CONTAINER_INGRESS => {
            // The destination as the packet leaves the hook (after any translation: hairpin
            // traffic to the host's published port is addressed to a container by now).
            let to_host = if ipv6 {
                let daddr = In6Addr(ctx.load::<[u32; 4]>(IP6_DADDR_OFF).ok()?);
                LOCAL_ADDRS6.get_ptr(&daddr).is_some()
            } else {
                let daddr = ctx.load::<u32>(IP_DADDR_OFF).ok()?;
                LOCAL_ADDRS.get_ptr(&daddr).is_some()
            };
            if to_host {
                return None;
            }
            Some(tcp_flag_count::FROM_CONTAINER)
        }
        hook::UPLINK_INGRESS => Some(tcp_flag_count::FROM_OUTSIDE),
        hook::UPLINK_EGRESS => {
            // SAFETY: `skb` points at the context the kernel passed to this program.
            let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
            // A forwarded packet came in somewhere (a container's veth or bridge, the
            // uplink) and was counted there; the host's own packets came in nowhere.
            (ingress == 0).then_some(tcp_flag_count::FROM_HOST)
        }
        _ => None,
    }
}

/// Counts the TCP `flags` of a packet `hook` passed, as Hubble's tcp metric counts a
/// forwarded flow. Not inlined: its few bytes of stack are its own frame's, not the hook's.
#[inline(never)]
pub fn count_tcp_flags(skb: *mut __sk_buff, hook: u32, flags: u8) {
    count_tcp_flags_of(skb, hook, flags, false, &TCP_FLAGS);
}

/// [`count_tcp_flags`] for an IPv6 packet, in the IPv6 counters.
#[inline(never)]
pub fn count_tcp_flags6(skb: *mut __sk_buff, hook: u32, flags: u8) {
    count_tcp_flags_of(skb, hook, flags, true, &TCP_FLAGS6);
}

#[inline(always)]
fn count_tcp_flags_of(
    skb: *mut __sk_buff,
    hook: u32,
    flags: u8,
    ipv6: bool,
    counters: &PerCpuArray<u64>,
) {
    let kinds = tcp_flag_count::kinds(flags);
    if kinds == 0 {
        return;
    }
    let ctx = TcContext::new(skb);
    let Some(point) = tcp_flags_point(&ctx, hook, ipv6) else {
        return;
    };
    for kind in 0..tcp_flag_count::KINDS {
        if kinds & (1 << kind) == 0 {
            continue;
        }
        if let Some(counter) = counters.get_ptr_mut(point * tcp_flag_count::KINDS + kind) {
            // SAFETY: a map value from the lookup just made; a per-CPU slot has no
            // concurrent writer.
            unsafe { *counter += 1 };
        }
    }
}

//! Hostile input to the IPv6 paths that open connections are judged and hairpinned on: a
//! policy change meeting connections missing half their entries (as the LRU table of
//! handshakes leaves them under a flood) and packets of one connection at several hooks while
//! the generation moves; a container flooding and abusing its own published port.

use std::net::Ipv6Addr;

use dataplane_common::{CtKey6, DropReason, In6Addr};

use super::{
    ipv6::{frame6, publish6, v6, with_container6},
    packet::{TCP_ACK, TCP_SYN, tcp},
    programs::{TC_SHOT, loaded_or_skip, run_tc},
    translation::drops,
};
use crate::kernel::{Datapath, Hook};

const TC_REDIRECT: u32 = 7;

fn key6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> CtKey6 {
    CtKey6 {
        saddr: In6Addr::from_ipv6(src),
        daddr: In6Addr::from_ipv6(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// A policy generation later, the rules as they were.
fn bump_generation(dp: &mut Datapath) {
    let mut config = dp.config().unwrap();
    config.policy_generation += 1;
    dp.set_config(config).unwrap();
}

/// A connection one of whose two entries is gone (the table of handshakes evicted it, or the
/// collector took it) meets a policy change: its packets still go as they went (translated
/// by the entry left) when the rules allow it, and are dropped when they deny it (the entry
/// left judged on its own). Never passed on untranslated after a round of re-judging.
#[test]
fn ipv6_a_connection_missing_half_its_entries_is_judged_again_after_a_policy_change() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::policy_action;

    let mut t = loaded_or_skip!();
    let (host, client, a) = (v6("2001:db8::1"), v6("2001:db8::2"), v6("fd00:1::2"));
    let dp = t.get();
    with_container6(dp);
    publish6(dp, host, 8080, 6, 80);
    for port in [40000u16, 40001] {
        let syn = frame6(client, host, 6, &tcp(port, 8080, TCP_SYN, b""));
        assert_eq!(run_tc(dp, Hook::UplinkIngress, &syn).0, TC_REDIRECT);
        let syn_ack = frame6(a, client, 6, &tcp(80, port, TCP_SYN | TCP_ACK, b""));
        assert_eq!(run_tc(dp, Hook::ContainerIngress, &syn_ack).0, TC_REDIRECT);
    }
    // And container B's connection to the published port (translated at its veth by the
    // balancing program, a tail call further).
    let b = v6("fd00:1::3");
    dp.set::<crate::kernel::maps::Endpoints6>(
        In6Addr::from_ipv6(b),
        dataplane_common::EndpointInfo6 {
            ifindex: 2,
            network_id: 1,
            endpoint_id: 2,
            mac: [2, 0, 0, 0, 0, 3],
            ..Default::default()
        },
    )
    .unwrap();
    let syn = frame6(b, host, 6, &tcp(40002, 8080, TCP_SYN, b""));
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &syn).0, TC_REDIRECT);
    let syn_ack = frame6(a, b, 6, &tcp(80, 40002, TCP_SYN | TCP_ACK, b""));
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &syn_ack).0, TC_REDIRECT);
    // 40000 and B's lose their reply entries, 40001 its forward one.
    t.forget6(&key6(a, client, 80, 40000));
    t.forget6(&key6(client, host, 40001, 8080));
    t.forget6(&key6(a, b, 80, 40002));
    let dp = t.get();
    let request = frame6(client, host, 6, &tcp(40000, 8080, TCP_ACK, b"GET"));
    let reply = frame6(a, client, 6, &tcp(80, 40001, TCP_ACK, b"200"));
    let from_b = frame6(b, host, 6, &tcp(40002, 8080, TCP_ACK, b"GET"));
    let all = |dp: &mut Datapath| {
        [
            run_tc(dp, Hook::UplinkIngress, &request),
            run_tc(dp, Hook::ContainerIngress, &reply),
            run_tc(dp, Hook::ContainerIngress, &from_b),
        ]
    };
    let before = all(dp);
    assert_eq!(
        before[0].0, TC_REDIRECT,
        "the request, by its forward entry"
    );
    assert_eq!(before[2].0, TC_REDIRECT, "B's, by its forward entry");
    bump_generation(dp);
    for round in 0..3 {
        assert_eq!(all(dp), before, "round {round} after a change of nothing");
    }
    // Now a rule keeps the client off the container's port: the forward half, judged on its
    // own, is dropped.
    let rules = [Rule {
        action: policy_action::DENY,
        from: Side::Cidr6(u128::from(client), 128),
        to: Side::Any,
        port: Some((6, 80)),
    }];
    crate::reconcile::apply_policy(&tables(&rules, &[]), dp).unwrap();
    bump_generation(dp);
    let denied =
        |dp: &Datapath| drops(dp, DropReason::PolicyDenied) + drops(dp, DropReason::PolicyDeny);
    let before = denied(dp);
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &request).0, TC_SHOT);
    assert_eq!(denied(dp), before + 1);
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &request).0,
        TC_SHOT,
        "and stays so"
    );
}

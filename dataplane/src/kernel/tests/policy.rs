//! Packet tests of policy: each selector kind of the user rules (network, endpoint, labels,
//! CIDR, ports), first match wins, Docker's isolation where no rule decides, rule changes
//! reaching connections already tracked, and the XDP deny list.

use dataplane_common::{
    Config, DropReason, EndpointInfo, PolicyRule, PortKey, PortTarget, PrefixKey, net_flags,
    policy_action, selector_kind,
};

use super::{
    packet::{Ipv4Spec, TCP_ACK, TCP_SYN, ipv4_frame, tcp},
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
};
use crate::kernel::{Datapath, Hook};

const A: [u8; 4] = [172, 30, 1, 2]; // net 1, labels bit 0 (app=web), endpoint 1
const B: [u8; 4] = [172, 30, 1, 3]; // net 1, endpoint 2
const C: [u8; 4] = [172, 30, 2, 2]; // net 2 (internal), endpoint 3
const D: [u8; 4] = [172, 30, 3, 2]; // net 3 (icc off), endpoint 4
const E: [u8; 4] = [172, 30, 3, 3]; // net 3 (icc off), endpoint 5
const HOST: [u8; 4] = [192, 0, 2, 1];
const OUTSIDE: [u8; 4] = [192, 0, 2, 2];
const WORLD: [u8; 4] = [198, 51, 100, 7];
const TC_REDIRECT: u32 = 7;

fn be(ip: [u8; 4]) -> u32 {
    u32::from_be_bytes(ip).to_be()
}

fn host(dp: &mut Datapath) {
    let endpoints = [
        (A, 1, 1, 0b1, 0),
        (B, 1, 2, 0, 0),
        (C, 2, 3, 0, net_flags::INTERNAL),
        (D, 3, 4, 0, net_flags::NO_ICC),
        (E, 3, 5, 0, net_flags::NO_ICC),
    ];
    for (ip, network_id, endpoint_id, label_bits, flags) in endpoints {
        let info = EndpointInfo {
            label_bits,
            ifindex: 10 + endpoint_id,
            network_id,
            endpoint_id,
            mac: [2, 0, 0, 0, 0, endpoint_id as u8],
            net_flags: flags,
            ..Default::default()
        };
        dp.set::<crate::kernel::maps::Endpoints>(be(ip), info)
            .unwrap();
    }
    dp.set::<crate::kernel::maps::LocalAddrs>(be(HOST), 1u8)
        .unwrap();
    // 8080 published to C (internal), 8081 to D (icc off).
    for (port, to) in [(8080u16, C), (8081, D)] {
        let key = PortKey {
            addr: 0,
            port: port.to_be(),
            proto: 6,
            _pad: 0,
        };
        let target = PortTarget {
            addr: be(to),
            port: 80u16.to_be(),
            is_service: 0,
            _pad: 0,
        };
        dp.set::<crate::kernel::maps::Ports>(key, target).unwrap();
    }
    rules(dp, &[], 1);
}

fn rules(dp: &mut Datapath, rules: &[PolicyRule], generation: u32) {
    for (i, rule) in rules.iter().enumerate() {
        dp.set_rule(i as u32, *rule).unwrap();
    }
    dp.set_config(Config {
        masquerade_addr: be(HOST),
        uplink_ifindex: 1,
        snat_port_min: 20000,
        snat_port_max: 32767,
        policy_generation: generation,
        rule_count: rules.len() as u32,
        ..Config::default()
    })
    .unwrap();
}

fn rule(action: u8, from: (u8, u32, u32), to: (u8, u32, u32), port: u16) -> PolicyRule {
    PolicyRule {
        from_kind: from.0,
        to_kind: to.0,
        action,
        proto: if port == 0 { 0 } else { 6 },
        port: port.to_be(),
        _pad: 0,
        from_value: from.1,
        from_mask: from.2,
        to_value: to.1,
        to_mask: to.2,
    }
}

const ANY: (u8, u32, u32) = (selector_kind::ANY, 0, 0);

/// The verdict for a new TCP connection from `src` to `dst`:`port` at `hook`. Policy is about
/// pass or drop: a packet sent straight into a container (redirect) counts as passed.
fn verdict(
    dp: &mut Datapath,
    hook: Hook,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    port: u16,
) -> u32 {
    let frame = ipv4_frame(&Ipv4Spec::new(src, dst, 6), &tcp(sport, port, TCP_SYN, b""));
    match run_tc(dp, hook, &frame).0 {
        TC_REDIRECT if hook == Hook::ContainerIngress => TC_PASS,
        other => other,
    }
}

/// Drops by policy: a deny rule's (POLICY_DENY) and isolation's (POLICY_DENIED).
fn denied(dp: &Datapath) -> u64 {
    denied_for(dp, DropReason::PolicyDeny) + denied_for(dp, DropReason::PolicyDenied)
}

fn denied_for(dp: &Datapath, reason: DropReason) -> u64 {
    dp.drops()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
}

#[test]
fn docker_isolation_without_rules() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let c = Hook::ContainerIngress;
    assert_eq!(verdict(dp, c, A, B, 1000, 80), TC_PASS, "same network");
    assert_eq!(verdict(dp, c, A, C, 1001, 80), TC_SHOT, "another network");
    assert_eq!(
        verdict(dp, c, D, E, 1002, 80),
        TC_SHOT,
        "icc=false inside its network"
    );
    assert_eq!(
        verdict(dp, c, A, HOST, 1003, 22),
        TC_PASS,
        "a container to the host"
    );
    assert_eq!(
        verdict(dp, c, C, HOST, 1004, 22),
        TC_PASS,
        "internal still reaches the host"
    );
    assert_eq!(
        verdict(dp, c, A, HOST, 1011, 8081),
        TC_PASS,
        "a container to another network's published port"
    );
    assert_eq!(
        verdict(dp, c, C, HOST, 1012, 8081),
        TC_SHOT,
        "internal to another network's published port"
    );
    let e = Hook::UplinkEgress;
    assert_eq!(
        verdict(dp, e, A, WORLD, 1005, 443),
        TC_PASS,
        "masqueraded out"
    );
    assert_eq!(
        verdict(dp, e, C, WORLD, 1006, 443),
        TC_SHOT,
        "internal does not leave the host"
    );
    assert_eq!(
        verdict(dp, e, D, WORLD, 1007, 443),
        TC_PASS,
        "icc=false still reaches outside"
    );
    let u = Hook::UplinkIngress;
    assert_eq!(
        verdict(dp, u, OUTSIDE, HOST, 1008, 8081),
        TC_REDIRECT,
        "published, icc=false"
    );
    assert_eq!(
        verdict(dp, u, OUTSIDE, HOST, 1009, 8080),
        TC_SHOT,
        "published, but internal"
    );
    assert_eq!(
        verdict(dp, u, OUTSIDE, A, 1010, 80),
        TC_SHOT,
        "routed to a container address"
    );
    // Isolation with no rule deciding is Cilium's default deny.
    assert_eq!(denied_for(dp, DropReason::PolicyDenied), 6);
    assert_eq!(denied(dp), 6);
}

#[test]
fn each_selector_kind_and_ports_first_match_wins() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let c = Hook::ContainerIngress;
    rules(
        dp,
        &[
            // A may reach C on 5432 only (overrides network isolation, like DOCKER-USER).
            rule(
                policy_action::ALLOW,
                (selector_kind::ENDPOINT, 1, 0),
                (selector_kind::NETWORK, 2, 0),
                5432,
            ),
            // Nothing labelled app=web reaches B.
            rule(
                policy_action::DENY,
                (selector_kind::LABELS, 0, 0),
                (selector_kind::ENDPOINT, 2, 0),
                0,
            ),
            // Nobody reaches 198.51.100.0/24.
            rule(
                policy_action::DENY,
                ANY,
                (
                    selector_kind::CIDR,
                    be([198, 51, 100, 0]),
                    0xffff_ff00u32.to_be(),
                ),
                0,
            ),
            // D may reach E after all.
            rule(
                policy_action::ALLOW,
                (selector_kind::ENDPOINT, 4, 0),
                (selector_kind::ENDPOINT, 5, 0),
                0,
            ),
        ],
        2,
    );
    assert_eq!(
        verdict(dp, c, A, C, 2000, 5432),
        TC_PASS,
        "endpoint->network rule, its port"
    );
    assert_eq!(
        verdict(dp, c, A, C, 2001, 5433),
        TC_SHOT,
        "another port: isolation decides"
    );
    assert_eq!(
        verdict(dp, c, A, B, 2002, 80),
        TC_SHOT,
        "labels selector denies"
    );
    assert_eq!(
        verdict(dp, c, B, A, 2003, 80),
        TC_PASS,
        "the other way has no rule"
    );
    assert_eq!(
        verdict(dp, Hook::UplinkEgress, B, WORLD, 2004, 443),
        TC_SHOT,
        "cidr selector"
    );
    assert_eq!(
        verdict(dp, Hook::UplinkEgress, B, [198, 51, 101, 7], 2005, 443),
        TC_PASS
    );
    assert_eq!(
        verdict(dp, c, D, E, 2006, 80),
        TC_PASS,
        "allow before icc=false"
    );
    // Two packets met a deny rule (POLICY_DENY), one isolation (POLICY_DENIED).
    assert_eq!(denied_for(dp, DropReason::PolicyDeny), 2);
    assert_eq!(denied_for(dp, DropReason::PolicyDenied), 1);
}

#[test]
fn replies_pass_and_a_rule_change_reaches_tracked_connections() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let c = Hook::ContainerIngress;
    assert_eq!(verdict(dp, c, A, B, 3000, 80), TC_PASS);
    let reply = ipv4_frame(
        &Ipv4Spec::new(B, A, 6),
        &tcp(80, 3000, TCP_SYN | TCP_ACK, b""),
    );
    assert_eq!(
        run_tc(dp, c, &reply).0,
        TC_REDIRECT,
        "stateful: the reply passes (straight into A)"
    );
    // Now B denies everything from A: the tracked connection is judged again and cut.
    rules(
        dp,
        &[rule(
            policy_action::DENY,
            (selector_kind::ENDPOINT, 1, 0),
            (selector_kind::ENDPOINT, 2, 0),
            0,
        )],
        2,
    );
    let more = ipv4_frame(&Ipv4Spec::new(A, B, 6), &tcp(3000, 80, TCP_ACK, b"data"));
    assert_eq!(run_tc(dp, c, &more).0, TC_SHOT);
    assert!(
        dp.entries::<crate::kernel::maps::Conntrack>()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        run_tc(dp, c, &reply).0,
        TC_REDIRECT,
        "an untracked packet from B to A is B's own new connection"
    );
}

#[test]
fn xdp_drops_denied_outside_sources() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    dp.set_deny_source(
        PrefixKey {
            prefix_len: 24,
            addr: be([203, 0, 113, 0]),
        },
        true,
    )
    .unwrap();
    let run = |dp: &mut Datapath, src: [u8; 4]| {
        let frame = ipv4_frame(&Ipv4Spec::new(src, HOST, 6), &tcp(4000, 80, TCP_SYN, b""));
        let mut out = vec![0u8; frame.len() + 64];
        use aya::programs::{TestRun, TestRunOptions};
        dp.xdp()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap()
            .return_value
    };
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    assert_eq!(run(dp, [203, 0, 113, 9]), XDP_DROP);
    assert_eq!(run(dp, [203, 0, 114, 9]), XDP_PASS);
    // The deny list is made of deny rules: Cilium's POLICY_DENY, not the default deny.
    assert_eq!(denied_for(dp, DropReason::PolicyDeny), 1);
    assert_eq!(denied(dp), 1);
}

//! Packet tests of policy: each selector kind of the user rules (network, endpoint, labels,
//! CIDR, ports), first match wins, Docker's isolation where no rule decides, rule changes
//! reaching connections already tracked, and the XDP deny list.

use dataplane_common::{
    Config, DropReason, EndpointInfo, PortKey, PortTarget, PrefixKey, net_flags, policy_action,
};

use super::{
    packet::{Ipv4Spec, TCP_ACK, TCP_SYN, ipv4_frame, tcp},
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
};
use crate::{
    kernel::{Datapath, Hook},
    reconcile::policy::{Rule, Side, tables},
};

const A: [u8; 4] = [172, 30, 1, 2]; // net 1, label class 1 (app=web), endpoint 1
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
        (A, 1, 1, 1, 0),
        (B, 1, 2, 0, 0),
        (C, 2, 3, 0, net_flags::INTERNAL),
        (D, 3, 4, 0, net_flags::NO_ICC),
        (E, 3, 5, 0, net_flags::NO_ICC),
    ];
    for (ip, network_id, endpoint_id, label_class, flags) in endpoints {
        let info = EndpointInfo {
            label_class,
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

/// Compiles `rules` (label selector 0 matches class 1, A's) and applies them as the
/// reconciler does: into the half not live, then switched to.
fn rules(dp: &mut Datapath, rules: &[Rule], generation: u32) {
    let compiled = tables(rules, &[vec![1]]);
    crate::reconcile::apply_policy(&compiled, dp).unwrap();
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

fn rule(action: u8, from: Side, to: Side, port: u16) -> Rule {
    Rule {
        action,
        from,
        to,
        port: (port != 0).then_some((6, port)),
    }
}

fn cidr(addr: [u8; 4], len: u8) -> Side {
    Side::Cidr(u32::from_be_bytes(addr), len)
}

const ANY: Side = Side::Any;

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
                Side::Endpoint(1),
                Side::Network(2),
                5432,
            ),
            // Nothing labelled app=web reaches B.
            rule(policy_action::DENY, Side::Labels(0), Side::Endpoint(2), 0),
            // Nobody reaches 198.51.100.0/24.
            rule(policy_action::DENY, ANY, cidr([198, 51, 100, 0], 24), 0),
            // D may reach E after all.
            rule(
                policy_action::ALLOW,
                Side::Endpoint(4),
                Side::Endpoint(5),
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
            Side::Endpoint(1),
            Side::Endpoint(2),
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

/// First match wins between rules that overlap: a narrow deny before a broader allow, a
/// narrow allow before a broader deny, and a broader rule first, which then decides alone.
/// Each case is one Docker's isolation would decide the other way, so the rule is what shows.
#[test]
fn overlapping_rules_first_match_wins() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let c = Hook::ContainerIngress;
    let (allow, deny) = (policy_action::ALLOW, policy_action::DENY);
    rules(
        dp,
        &[
            // A -> network 2: 5432 denied, everything else allowed (isolation denies both).
            rule(deny, Side::Endpoint(1), Side::Network(2), 5432),
            rule(allow, Side::Endpoint(1), Side::Network(2), 0),
            // app=web -> B: 80 allowed, everything else denied (isolation allows both).
            rule(allow, Side::Labels(0), Side::Endpoint(2), 80),
            rule(deny, ANY, Side::Endpoint(2), 0),
        ],
        2,
    );
    assert_eq!(
        verdict(dp, c, A, C, 5000, 5432),
        TC_SHOT,
        "narrow deny first"
    );
    assert_eq!(
        verdict(dp, c, A, C, 5001, 80),
        TC_PASS,
        "then the broad allow"
    );
    assert_eq!(
        verdict(dp, c, A, B, 5002, 80),
        TC_PASS,
        "narrow allow first"
    );
    assert_eq!(
        verdict(dp, c, A, B, 5003, 81),
        TC_SHOT,
        "then the broad deny"
    );
    assert_eq!(denied_for(dp, DropReason::PolicyDeny), 2);
    // The broad rule first: it decides, the narrow one after it never does.
    rules(
        dp,
        &[
            rule(allow, ANY, Side::Endpoint(2), 0),
            rule(deny, Side::Labels(0), Side::Endpoint(2), 80),
            rule(deny, Side::Network(1), Side::Network(2), 0),
            rule(allow, Side::Endpoint(1), Side::Network(2), 80),
        ],
        3,
    );
    assert_eq!(verdict(dp, c, A, B, 5004, 80), TC_PASS, "broad allow first");
    assert_eq!(verdict(dp, c, A, C, 5005, 80), TC_SHOT, "broad deny first");
    assert_eq!(denied_for(dp, DropReason::PolicyDeny), 3);
    assert_eq!(denied_for(dp, DropReason::PolicyDenied), 0);
}

/// CIDR selectors whose prefixes nest (/8, /16, /24, /32): the first rule covering the address
/// wins, whatever its prefix length, on either side and with ports.
#[test]
fn overlapping_cidrs_of_different_lengths_first_match_wins() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let e = Hook::UplinkEgress;
    let c = Hook::ContainerIngress;
    let (allow, deny) = (policy_action::ALLOW, policy_action::DENY);
    rules(
        dp,
        &[
            // Longest first: the /32 denied, the rest of its /16 allowed, the /8 denied.
            rule(deny, ANY, cidr([198, 51, 100, 7], 32), 0),
            rule(allow, ANY, cidr([198, 51, 0, 0], 16), 0),
            rule(deny, ANY, cidr([198, 0, 0, 0], 8), 0),
            // Shortest first: all of 203/8 on 443 allowed, its /24 denied otherwise.
            rule(allow, ANY, cidr([203, 0, 0, 0], 8), 443),
            rule(deny, ANY, cidr([203, 0, 113, 0], 24), 0),
            // Both sides: the /24 of A and B may not reach 192.0.2.0/24 on 22; their /16 may
            // reach anything (across networks too, which isolation refuses).
            rule(
                deny,
                cidr([172, 30, 1, 0], 24),
                cidr([192, 0, 2, 0], 24),
                22,
            ),
            rule(allow, cidr([172, 30, 0, 0], 16), ANY, 0),
        ],
        2,
    );
    let cases = [
        ([198, 51, 100, 7], 443, TC_SHOT, "the /32 before its /16"),
        ([198, 51, 100, 8], 443, TC_PASS, "the /16 allow"),
        ([198, 52, 0, 1], 443, TC_SHOT, "the /8 deny"),
        (
            [203, 0, 113, 9],
            443,
            TC_PASS,
            "the /8 allow on its port first",
        ),
        ([203, 0, 113, 9], 80, TC_SHOT, "its /24 on another port"),
        (
            [203, 0, 114, 9],
            80,
            TC_PASS,
            "/8 allow is port 443 only; no rule: isolation",
        ),
    ];
    for (i, (dst, port, want, what)) in cases.into_iter().enumerate() {
        assert_eq!(
            verdict(dp, e, B, dst, 6000 + i as u16, port),
            want,
            "{what}"
        );
    }
    assert_eq!(
        verdict(dp, e, A, OUTSIDE, 6100, 22),
        TC_SHOT,
        "both sides, port 22"
    );
    assert_eq!(
        verdict(dp, e, A, OUTSIDE, 6101, 80),
        TC_PASS,
        "another port"
    );
    assert_eq!(
        verdict(dp, c, A, C, 6102, 80),
        TC_PASS,
        "the /16 allow across networks"
    );
    assert_eq!(
        verdict(dp, c, C, A, 6103, 80),
        TC_PASS,
        "C is in the /16 too"
    );
    assert_eq!(denied_for(dp, DropReason::PolicyDeny), 4);
}

/// 10,000 rules of every selector kind, none of them about the connections below but the
/// last ones: a rule deep in the list still decides, in order, and the programs look up a
/// handful of key shapes however many rules there are.
#[test]
fn ten_thousand_rules_keep_their_order() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let c = Hook::ContainerIngress;
    let (allow, deny) = (policy_action::ALLOW, policy_action::DENY);
    let mut list: Vec<Rule> = (0..10_000u32)
        .map(|i| {
            let other = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let port = 1000 + (i % 5000) as u16;
            match i % 4 {
                0 => rule(deny, cidr(other, 32), ANY, port),
                1 => rule(deny, Side::Endpoint(1), cidr(other, 32), 0),
                2 => rule(deny, Side::Network(2), Side::Endpoint(1), port),
                _ => rule(deny, Side::Labels(0), Side::Network(3), port),
            }
        })
        .collect();
    // Near the end: A may reach C (another network) on 80, then nobody reaches B.
    list[9_998] = rule(allow, Side::Endpoint(1), Side::Network(2), 80);
    list[9_999] = rule(deny, ANY, Side::Endpoint(2), 0);
    let started = std::time::Instant::now();
    rules(dp, &list, 2);
    eprintln!(
        "10,000 rules compiled and applied in {:?}",
        started.elapsed()
    );
    let meta = dp.policy_meta().unwrap();
    assert!(meta.tuple_count <= 6, "{} key shapes", meta.tuple_count);
    assert_eq!(verdict(dp, c, A, C, 7000, 80), TC_PASS, "rule 9,998");
    assert_eq!(verdict(dp, c, A, C, 7001, 81), TC_SHOT, "isolation");
    assert_eq!(verdict(dp, c, A, B, 7002, 80), TC_SHOT, "rule 9,999");
    assert_eq!(
        verdict(dp, c, B, A, 7003, 1002),
        TC_PASS,
        "no rule matches: isolation"
    );
    // An earlier rule (index 2, network 2 -> A on 1002) decides before the last ones.
    assert_eq!(verdict(dp, c, C, A, 7004, 1002), TC_SHOT, "rule 2");
    assert_eq!(
        verdict(dp, Hook::UplinkEgress, A, [10, 0, 0, 1], 7005, 80),
        TC_SHOT,
        "rule 1, a CIDR"
    );
    assert_eq!(denied_for(dp, DropReason::PolicyDeny), 3);
    assert_eq!(denied_for(dp, DropReason::PolicyDenied), 1);
}

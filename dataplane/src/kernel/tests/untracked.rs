//! Packet tests of what conntrack does not follow: IP protocols other than TCP, UDP and ICMP
//! (GRE here), ICMP messages that are neither echo nor an error about a tracked connection
//! (a timestamp request here), and ICMP errors about no connection we know. Docker's isolation
//! and its FORWARD chain hold for every protocol, so these are judged per packet by the same
//! policy as a new connection: between networks, out of internal networks, and routed from
//! outside to a container address (open only in `nat-unprotected`, and to ICMP in `routed`).

use dataplane_common::{Config, DropReason, EndpointInfo, net_flags};

use super::{
    packet::{Ipv4Spec, icmp_echo, icmp_error, ipv4_frame, udp},
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
    translation::drops,
};
use crate::kernel::{Datapath, Hook};

const A: [u8; 4] = [172, 30, 1, 2]; // net 1 (nat)
const B: [u8; 4] = [172, 30, 1, 3]; // net 1 (nat)
const C: [u8; 4] = [172, 30, 2, 2]; // net 2 (internal)
const D: [u8; 4] = [172, 30, 3, 2]; // net 3 (icc off)
const E: [u8; 4] = [172, 30, 3, 3]; // net 3 (icc off)
const R: [u8; 4] = [172, 30, 4, 2]; // net 4 (routed)
const U: [u8; 4] = [172, 30, 5, 2]; // net 5 (nat-unprotected)
const HOST: [u8; 4] = [192, 0, 2, 1];
const WORLD: [u8; 4] = [198, 51, 100, 7];
const TC_REDIRECT: u32 = 7;

const GRE: u8 = 47;
const ICMP: u8 = 1;
const ICMP_TIMESTAMP: u8 = 13;

fn be(ip: [u8; 4]) -> u32 {
    u32::from_be_bytes(ip).to_be()
}

fn host(dp: &mut Datapath) {
    let endpoints = [
        (A, 1, 1, 0),
        (B, 1, 2, 0),
        (C, 2, 3, net_flags::INTERNAL),
        (D, 3, 4, net_flags::NO_ICC),
        (E, 3, 5, net_flags::NO_ICC),
        (R, 4, 6, net_flags::ROUTED),
        (U, 5, 7, net_flags::UNPROTECTED),
    ];
    for (ip, network_id, endpoint_id, flags) in endpoints {
        let info = EndpointInfo {
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
    dp.set_config(Config {
        masquerade_addr: be(HOST),
        uplink_ifindex: 1,
        snat_port_min: 20000,
        snat_port_max: 32767,
        policy_generation: 1,
        ..Config::default()
    })
    .unwrap();
}

/// A GRE packet (a few bytes of payload: its header is not looked at).
fn gre(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    ipv4_frame(&Ipv4Spec::new(src, dst, GRE), &[0, 0, 0x08, 0, 1, 2, 3, 4])
}

/// An ICMP timestamp request, neither echo nor error.
fn timestamp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    ipv4_frame(
        &Ipv4Spec::new(src, dst, ICMP),
        &icmp_echo(ICMP_TIMESTAMP, 7, 1),
    )
}

/// A port unreachable from `src` to `dst` about a UDP datagram `dst` never sent through us.
fn stray_error(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let quoted = ipv4_frame(&Ipv4Spec::new(dst, src, 17), &udp(40000, 53, b"q"));
    ipv4_frame(&Ipv4Spec::new(src, dst, ICMP), &icmp_error(3, 3, &quoted))
}

/// (what, hook, source, destination, expected verdict).
type Case = (&'static str, Hook, [u8; 4], [u8; 4], u32);

/// Pass or drop: a packet sent straight on (redirect) counts as passed.
fn verdict(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> u32 {
    match run_tc(dp, hook, frame).0 {
        TC_REDIRECT => TC_PASS,
        other => other,
    }
}

#[test]
fn untracked_packets_are_judged_by_isolation_as_new_connections_are() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let (pass, shot) = (TC_PASS, TC_SHOT);
    #[rustfmt::skip]
    let cases: [Case; 18] = [
        // From a container (its interface's ingress hook).
        ("same network", Hook::ContainerIngress, A, B, pass),
        ("across networks", Hook::ContainerIngress, A, C, shot),
        ("internal to a nat network", Hook::ContainerIngress, C, A, shot),
        ("icc off", Hook::ContainerIngress, D, E, shot),
        ("nat network out", Hook::ContainerIngress, A, WORLD, pass),
        ("internal network out", Hook::ContainerIngress, C, WORLD, shot),
        ("internal network to the host", Hook::ContainerIngress, C, HOST, pass),
        ("container to the host", Hook::ContainerIngress, A, HOST, pass),
        ("icc-off container to its own address", Hook::ContainerIngress, D, D, pass),
        // Routed from outside (the uplink's ingress hook).
        ("outside to a nat network's container", Hook::UplinkIngress, WORLD, A, shot),
        ("outside to an internal container", Hook::UplinkIngress, WORLD, C, shot),
        ("outside to a routed container", Hook::UplinkIngress, WORLD, R, shot),
        ("outside to an unprotected container", Hook::UplinkIngress, WORLD, U, pass),
        ("outside to the host itself", Hook::UplinkIngress, WORLD, HOST, pass),
        ("outside to an address not ours", Hook::UplinkIngress, WORLD, [10, 9, 9, 9], pass),
        ("routed container out", Hook::ContainerIngress, R, WORLD, pass),
        ("unprotected container out", Hook::ContainerIngress, U, WORLD, pass),
        ("routed to unprotected", Hook::ContainerIngress, R, U, shot),
    ];
    for (what, hook, src, dst, expected) in cases {
        assert_eq!(verdict(dp, hook, &gre(src, dst)), expected, "GRE: {what}");
        // ICMP is let in to a routed network's containers (Docker opens it in routed mode).
        let icmp_expected = if hook == Hook::UplinkIngress && dst == R {
            pass
        } else {
            expected
        };
        assert_eq!(
            verdict(dp, hook, &timestamp(src, dst)),
            icmp_expected,
            "ICMP timestamp: {what}"
        );
    }
    // Every drop above was counted as Docker's isolation (no user rule decided).
    assert_eq!(drops(dp, DropReason::PolicyDenied), 15);
}

#[test]
fn icmp_errors_about_no_known_connection_are_judged_too() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // An outsider cannot reach a nat network's container with a forged error ...
    assert_eq!(
        verdict(dp, Hook::UplinkIngress, &stray_error(WORLD, A)),
        TC_SHOT
    );
    // ... nor one container another network's.
    assert_eq!(
        verdict(dp, Hook::ContainerIngress, &stray_error(A, C)),
        TC_SHOT
    );
    // Within a network, and to the host, errors pass as any packet would.
    assert_eq!(
        verdict(dp, Hook::ContainerIngress, &stray_error(A, B)),
        TC_PASS
    );
    assert_eq!(
        verdict(dp, Hook::UplinkIngress, &stray_error(WORLD, HOST)),
        TC_PASS
    );
    assert_eq!(drops(dp, DropReason::PolicyDenied), 2);
}

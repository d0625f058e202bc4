//! Packet tests of hostile traffic: the TCP handshake states and the two conntrack tables (a
//! spoofed SYN flood never displaces an established connection and never locks new ones out),
//! packets no stack accepts dropped before they are tracked, and IPv4 fragments translated
//! like their first fragment (or dropped and counted when it was not seen).

use dataplane_common::{CtEntry, CtKey, DropReason, ct_state, map_names};

use super::{
    packet::{
        Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, assert_reassembles, fix_ip_checksum,
        fragments, ipv4_frame, tcp, tcp_seq, tuple, udp,
    },
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
    translation::{
        CLIENT, HOST, SERVER, TC_REDIRECT, WEB1, WEB2, ct, delivered, drops, host, ip4, pass,
        redirected,
    },
};
use crate::kernel::{
    Datapath, Hook, LoadOptions,
    maps::{Conntrack, ConntrackNew},
};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

fn table(dp: &Datapath, name: &'static str) -> std::collections::BTreeMap<CtKey, CtEntry> {
    match name {
        map_names::CONNTRACK => dp.entries::<Conntrack>().unwrap(),
        map_names::CONNTRACK_NEW => dp.entries::<ConntrackNew>().unwrap(),
        other => panic!("{other} is not a conntrack table"),
    }
}

/// The states of the forward entry of the one connection from `sport`.
fn state_of(dp: &Datapath, sport: u16) -> Option<(u8, bool)> {
    for (name, established) in [
        (map_names::CONNTRACK, true),
        (map_names::CONNTRACK_NEW, false),
    ] {
        if let Some(entry) = table(dp, name)
            .into_iter()
            .find(|(k, e)| e.is_reply == 0 && k.sport == sport.to_be())
        {
            return Some((entry.1.state, established));
        }
    }
    None
}

/// A whole handshake through host:8080 from CLIENT:`sport`: SYN in, SYN-ACK out, ACK in.
fn handshake(dp: &mut Datapath, sport: u16) {
    let syn = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp_seq(sport, 8080, TCP_SYN, 100, 0),
    );
    delivered(dp, Hook::UplinkIngress, &syn);
    let synack = ipv4_frame(
        &Ipv4Spec::new(WEB1, CLIENT, 6),
        &tcp_seq(80, sport, TCP_SYN | TCP_ACK, 5000, 101),
    );
    redirected(dp, Hook::ContainerIngress, &synack);
    let ack = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp_seq(sport, 8080, TCP_ACK, 101, 5001),
    );
    delivered(dp, Hook::UplinkIngress, &ack);
}

#[test]
fn a_connection_is_established_only_by_the_handshakes_ack() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let syn = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp_seq(40000, 8080, TCP_SYN, 100, 0),
    );
    delivered(dp, Hook::UplinkIngress, &syn);
    assert_eq!(state_of(dp, 40000), Some((ct_state::SYN_SENT, false)));
    let synack = ipv4_frame(
        &Ipv4Spec::new(WEB1, CLIENT, 6),
        &tcp_seq(80, 40000, TCP_SYN | TCP_ACK, 5000, 101),
    );
    redirected(dp, Hook::ContainerIngress, &synack);
    assert_eq!(
        state_of(dp, 40000),
        Some((ct_state::SYN_RECV, false)),
        "answered, not established"
    );
    // A blind ACK (what a spoofing attacker can send: it never saw the SYN-ACK) is
    // translated like any packet of the connection but establishes nothing.
    let blind = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp_seq(40000, 8080, TCP_ACK, 101, 777),
    );
    delivered(dp, Hook::UplinkIngress, &blind);
    assert_eq!(state_of(dp, 40000), Some((ct_state::SYN_RECV, false)));
    let ack = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp_seq(40000, 8080, TCP_ACK, 101, 5001),
    );
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &ack),
        (ip4(CLIENT), ip4(WEB1), 40000, 80)
    );
    assert_eq!(state_of(dp, 40000), Some((ct_state::ESTABLISHED, true)));
    assert_eq!(
        table(dp, map_names::CONNTRACK).len(),
        2,
        "both directions moved"
    );
    assert!(table(dp, map_names::CONNTRACK_NEW).is_empty());
    // Established, it still translates both ways.
    let data = ipv4_frame(
        &Ipv4Spec::new(WEB1, CLIENT, 6),
        &tcp_seq(80, 40000, TCP_ACK, 5001, 101),
    );
    assert_eq!(
        redirected(dp, Hook::ContainerIngress, &data),
        (ip4(HOST), ip4(CLIENT), 8080, 40000)
    );
    // Masquerade goes through the same states (the server's SYN-ACK arrives on the uplink).
    let out = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp_seq(50000, 443, TCP_SYN, 1, 0),
    );
    let (_, _, port, _) = pass(dp, Hook::UplinkEgress, &out);
    assert_eq!(state_of(dp, 50000), Some((ct_state::SYN_SENT, false)));
    let synack = ipv4_frame(
        &Ipv4Spec::new(SERVER, HOST, 6),
        &tcp_seq(443, port, TCP_SYN | TCP_ACK, 9000, 2),
    );
    delivered(dp, Hook::UplinkIngress, &synack);
    let ack = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp_seq(50000, 443, TCP_ACK, 2, 9001),
    );
    pass(dp, Hook::UplinkEgress, &ack);
    assert_eq!(state_of(dp, 50000), Some((ct_state::ESTABLISHED, true)));
}

#[test]
fn a_syn_flood_never_displaces_established_connections_nor_locks_new_ones_out() {
    // The main table has room for exactly one connection.
    let mut t = loaded_or_skip!(&LoadOptions {
        ct_max_entries: 2,
        ..LoadOptions::default()
    });
    let dp = t.get();
    host(dp);
    handshake(dp, 40000);
    assert_eq!(state_of(dp, 40000), Some((ct_state::ESTABLISHED, true)));
    let capacity = dp.capacity::<ConntrackNew>().unwrap() as usize;
    // A spoofed flood: many more SYNs than the table of handshakes holds, each answered by
    // the container, none acknowledged.
    for i in 0..(capacity as u32 * 2) {
        let source = [10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        let syn = ipv4_frame(
            &Ipv4Spec::new(source, HOST, 6),
            &tcp_seq(1024 + (i % 50000) as u16, 8080, TCP_SYN, i, 0),
        );
        let (verdict, _) = run_tc(dp, Hook::UplinkIngress, &syn);
        assert_eq!(
            verdict, TC_REDIRECT,
            "flood SYN {i} is let in (the table makes room)"
        );
    }
    assert_eq!(drops(dp, DropReason::CtMapInsertionFailed), 0);
    assert!(table(dp, map_names::CONNTRACK_NEW).len() <= capacity);
    assert_eq!(
        state_of(dp, 40000),
        Some((ct_state::ESTABLISHED, true)),
        "the established connection is untouched"
    );
    let data = ipv4_frame(
        &Ipv4Spec::new(WEB1, CLIENT, 6),
        &tcp_seq(80, 40000, TCP_ACK, 5001, 101),
    );
    assert_eq!(
        redirected(dp, Hook::ContainerIngress, &data),
        (ip4(HOST), ip4(CLIENT), 8080, 40000)
    );
    // A new client still gets in and through its handshake, and a container still reaches
    // out; with the main table full, they go on translated from the table of handshakes.
    handshake(dp, 40001);
    assert!(state_of(dp, 40001).is_some());
    let out = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp(50000, 443, TCP_SYN, b""),
    );
    assert_eq!(pass(dp, Hook::UplinkEgress, &out).0, ip4(HOST));
    assert_eq!(table(dp, map_names::CONNTRACK).len(), 2);
}

#[test]
fn packets_no_stack_accepts_are_dropped_before_they_are_tracked() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let to_port = |flags: u8| {
        ipv4_frame(
            &Ipv4Spec::new(CLIENT, HOST, 6),
            &tcp(40000, 8080, flags, b""),
        )
    };
    let mut short_offset = to_port(TCP_SYN);
    short_offset[14 + 20 + 12] = 4 << 4;
    let mut udp_too_long = ipv4_frame(&Ipv4Spec::new(CLIENT, HOST, 17), &udp(5000, 5353, b"abc"));
    udp_too_long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&40u16.to_be_bytes());
    let mut udp_too_short = udp_too_long.clone();
    udp_too_short[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    let cases: [(&str, Vec<u8>); 6] = [
        ("TCP SYN+FIN", to_port(TCP_SYN | TCP_FIN)),
        ("TCP SYN+RST", to_port(TCP_SYN | TCP_RST)),
        ("TCP without flags", to_port(0)),
        ("TCP data offset 4", short_offset),
        ("UDP length beyond the packet", udp_too_long),
        ("UDP length below its header", udp_too_short),
    ];
    for (n, (description, frame)) in cases.iter().enumerate() {
        let (verdict, _) = run_tc(dp, Hook::UplinkIngress, frame);
        assert_eq!(verdict, TC_SHOT, "{description}");
        assert_eq!(
            drops(dp, DropReason::InvalidL4Header),
            n as u64 + 1,
            "{description} counted"
        );
        assert!(ct(dp).is_empty(), "{description} tracked nothing");
    }
    // A well-formed SYN still gets in.
    delivered(dp, Hook::UplinkIngress, &to_port(TCP_SYN));
}

/// A UDP datagram of `len` payload bytes from `src`:`sport` to `dst`:`dport`, in two
/// fragments split after 1,480 bytes of IP payload.
fn fragmented_udp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    len: usize,
) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let mut whole = ipv4_frame(&Ipv4Spec::new(src, dst, 17), &udp(sport, dport, &payload));
    // Fragmentable (ipv4_frame sets DF), same IP id in both parts.
    whole[14 + 6] = 0;
    fix_ip_checksum(&mut whole);
    fragments(&whole, 1480)
}

#[test]
fn every_fragment_gets_its_first_fragments_translation() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // Published UDP port: both fragments go to web1:53, the datagram stays whole and valid.
    let (first, later) = fragmented_udp(CLIENT, HOST, 7000, 5353, 4000);
    let (v1, out1) = run_tc(dp, Hook::UplinkIngress, &first);
    let (v2, out2) = run_tc(dp, Hook::UplinkIngress, &later);
    assert_eq!(
        (v1, v2),
        (TC_REDIRECT, TC_REDIRECT),
        "both delivered into web1"
    );
    assert_eq!(
        &out2[..6],
        &[2, 0, 0, 0, 0, 5],
        "the later one with web1's MAC too"
    );
    let whole = assert_reassembles(&out1, &out2);
    assert_eq!(tuple(&whole), (ip4(CLIENT), ip4(WEB1), 7000, 53));
    // web1's reply, fragmented by its kernel, leaves as host:5353 in both fragments.
    let (first, later) = fragmented_udp(WEB1, CLIENT, 53, 7000, 4000);
    let (v1, out1) = run_tc(dp, Hook::ContainerIngress, &first);
    let (v2, out2) = run_tc(dp, Hook::ContainerIngress, &later);
    assert_eq!((v1, v2), (TC_REDIRECT, TC_REDIRECT));
    let whole = assert_reassembles(&out1, &out2);
    assert_eq!(tuple(&whole), (ip4(HOST), ip4(CLIENT), 5353, 7000));
    // Masquerade: no fragment leaves with the container's own address.
    let (first, later) = fragmented_udp(WEB2, SERVER, 41000, 9999, 4000);
    let (v1, out1) = run_tc(dp, Hook::UplinkEgress, &first);
    let (v2, out2) = run_tc(dp, Hook::UplinkEgress, &later);
    assert_eq!((v1, v2), (TC_PASS, TC_PASS));
    let whole = assert_reassembles(&out1, &out2);
    let (src, dst, port, _) = tuple(&whole);
    assert_eq!((src, dst), (ip4(HOST), ip4(SERVER)));
    // And the server's fragmented answer comes back to web2 whole.
    let (first, later) = fragmented_udp(SERVER, HOST, 9999, port, 3000);
    let (v1, out1) = run_tc(dp, Hook::UplinkIngress, &first);
    let (v2, out2) = run_tc(dp, Hook::UplinkIngress, &later);
    assert_eq!((v1, v2), (TC_REDIRECT, TC_REDIRECT));
    let whole = assert_reassembles(&out1, &out2);
    assert_eq!(tuple(&whole), (ip4(SERVER), ip4(WEB2), 9999, 41000));
    assert_checksums(&whole);
}

#[test]
fn a_fragment_whose_first_was_not_seen_is_dropped_and_counted() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    let (first, later) = fragmented_udp(CLIENT, HOST, 7000, 5353, 4000);
    // Out of order: the later fragment first. It cannot be translated, so it is dropped.
    let (verdict, _) = run_tc(dp, Hook::UplinkIngress, &later);
    assert_eq!(verdict, TC_SHOT);
    assert_eq!(drops(dp, DropReason::FragmentNotFound), 1);
    // An orphan towards a container straight (no first fragment ever) is never delivered.
    let (_, orphan) = fragmented_udp(CLIENT, WEB1, 7000, 53, 2000);
    let (verdict, _) = run_tc(dp, Hook::UplinkIngress, &orphan);
    assert_eq!(verdict, TC_SHOT);
    assert_eq!(drops(dp, DropReason::FragmentNotFound), 2);
    // The first fragment then works, and so do later ones seen after it.
    let (v1, _) = run_tc(dp, Hook::UplinkIngress, &first);
    let (v2, out2) = run_tc(dp, Hook::UplinkIngress, &later);
    assert_eq!((v1, v2), (TC_REDIRECT, TC_REDIRECT));
    assert_eq!(tuple_addresses(&out2), (ip4(CLIENT), ip4(WEB1)));
    // A first fragment policy drops (routed from outside straight to a container, which
    // Docker's isolation refuses) takes its later fragments with it.
    let (first, later) = fragmented_udp(CLIENT, WEB1, 7001, 53, 2000);
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &first).0, TC_SHOT);
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &later).0, TC_SHOT);
    assert_eq!(drops(dp, DropReason::PolicyDenied), 2);
}

fn tuple_addresses(frame: &[u8]) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let t = tuple(frame);
    (t.0, t.1)
}

#[test]
fn without_xdp_the_deny_list_drops_at_tc_and_drop_events_are_aggregated() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    dp.set_deny_source(
        dataplane_common::PrefixKey {
            prefix_len: 24,
            addr: super::translation::be([203, 0, 113, 0]),
        },
        true,
    )
    .unwrap();
    let syn =
        |src: [u8; 4]| ipv4_frame(&Ipv4Spec::new(src, HOST, 6), &tcp(4000, 8080, TCP_SYN, b""));
    // XDP is on duty until the agent says otherwise: tc lets the denied source in.
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &syn([203, 0, 113, 9])).0,
        TC_REDIRECT
    );
    let mut config = dp.config().unwrap();
    config.deny_at_tc = 1;
    dp.set_config(config).unwrap();
    for _ in 0..1000 {
        assert_eq!(
            run_tc(dp, Hook::UplinkIngress, &syn([203, 0, 113, 9])).0,
            TC_SHOT
        );
    }
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &syn([203, 0, 114, 9])).0,
        TC_REDIRECT
    );
    assert_eq!(
        drops(dp, DropReason::PolicyDeny),
        1000,
        "every drop counted"
    );
    // One event went out for the source; the other 999 wait in its aggregate, to go with
    // the next event (or the agent) once the interval passed.
    let aggregates = dp.entries::<crate::kernel::maps::DropAggregates>().unwrap();
    assert_eq!(aggregates.len(), 1);
    let (key, value) = aggregates.into_iter().next().unwrap();
    assert_eq!(key.saddr, super::translation::be([203, 0, 113, 9]));
    assert_eq!(key.reason, DropReason::PolicyDeny as u8);
    assert_eq!(value.pending, 999);
    assert_eq!(
        value.tuple.dport,
        8080u16.to_be(),
        "the record says what was dropped"
    );
}

/// The deny list's early check at tc reads the frame's bytes directly: what a dropped
/// packet's record says must still be right (ports behind IPv4 options, TCP flags, no ports
/// for a later fragment), and what it cannot judge goes on to the full parse.
#[test]
fn the_early_deny_check_at_tc_records_what_was_dropped() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    dp.set_deny_source(
        dataplane_common::PrefixKey {
            prefix_len: 24,
            addr: super::translation::be([203, 0, 113, 0]),
        },
        true,
    )
    .unwrap();
    let mut config = dp.config().unwrap();
    config.deny_at_tc = 1;
    dp.set_config(config).unwrap();
    // A source of its own per case, so that each finds its own aggregate.
    let source = |n: u8| [203, 0, 113, n];
    let with_options = {
        let mut ip = Ipv4Spec::new(source(1), HOST, 6);
        ip.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: the ports start 4 bytes later
        ipv4_frame(&ip, &tcp(4001, 8080, TCP_SYN | TCP_ACK, b""))
    };
    let udp_frame = |n| {
        ipv4_frame(
            &Ipv4Spec::new(source(n), HOST, 17),
            &udp(5353, 53, &[0; 64]),
        )
    };
    let (_, later) = fragments(&udp_frame(3), 32);
    let not_ipv4 = {
        // Version 6 in an IPv4 frame: the full parse calls it malformed.
        let mut f = ipv4_frame(&Ipv4Spec::new(source(4), HOST, 17), &udp(5353, 53, b""));
        f[14] = 0x65;
        f
    };
    struct Case {
        what: &'static str,
        source: [u8; 4],
        frame: Vec<u8>,
        reason: DropReason,
        /// (source port, destination port, TCP flags) in the record.
        record: Option<(u16, u16, u8)>,
    }
    let cases = [
        Case {
            what: "TCP behind IPv4 options",
            source: source(1),
            frame: with_options,
            reason: DropReason::PolicyDeny,
            record: Some((4001, 8080, TCP_SYN | TCP_ACK)),
        },
        Case {
            what: "UDP",
            source: source(2),
            frame: udp_frame(2),
            reason: DropReason::PolicyDeny,
            record: Some((5353, 53, 0)),
        },
        Case {
            what: "a later fragment (no ports of its own)",
            source: source(3),
            frame: later,
            reason: DropReason::PolicyDeny,
            record: Some((0, 0, 0)),
        },
        Case {
            what: "a header that is not IPv4's",
            source: source(4),
            frame: not_ipv4,
            reason: DropReason::Malformed,
            record: None,
        },
    ];
    for case in cases {
        let before = drops(dp, case.reason);
        assert_eq!(
            run_tc(dp, Hook::UplinkIngress, &case.frame).0,
            TC_SHOT,
            "{}",
            case.what
        );
        assert_eq!(drops(dp, case.reason), before + 1, "{}", case.what);
        let Some((sport, dport, flags)) = case.record else {
            continue;
        };
        let saddr = super::translation::be(case.source);
        let aggregates = dp.entries::<crate::kernel::maps::DropAggregates>().unwrap();
        let (key, value) = aggregates
            .into_iter()
            .find(|(k, _)| k.saddr == saddr)
            .expect(case.what);
        assert_eq!(key.reason, DropReason::PolicyDeny as u8, "{}", case.what);
        assert_eq!(value.tuple.saddr, saddr, "{}", case.what);
        assert_eq!(
            value.tuple.daddr,
            super::translation::be(HOST),
            "{}",
            case.what
        );
        assert_eq!(
            (
                u16::from_be(value.tuple.sport),
                u16::from_be(value.tuple.dport),
                value.tcp_flags
            ),
            (sport, dport, flags),
            "{}",
            case.what
        );
    }
}

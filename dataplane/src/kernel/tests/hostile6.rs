//! Hostile input to the IPv6 paths that open connections are judged and hairpinned on: a
//! policy change meeting connections missing half their entries (as the LRU table of
//! handshakes leaves them under a flood) and packets of one connection at several hooks while
//! the generation moves; a container flooding and abusing its own published port.

use std::net::Ipv6Addr;

use dataplane_common::{CtKey6, DropReason, In6Addr};

use super::{
    ipv6::{frame6, publish6, v6, with_container6},
    packet::{TCP_ACK, TCP_SYN, tcp, tcp_seq},
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

const GATEWAY6: &str = "fd00:1::1";
const B6: &str = "fd00:1::3";
const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];

/// [`with_container6`]'s container A (`fd00:1::2`) and B (`fd00:1::3`) on one network with
/// gateway `fd00:1::1`; A's 80/tcp published on every host address at 8080 and 8081, its
/// 53/udp at 5353.
fn two_containers_and_a_published_port(dp: &mut Datapath) {
    with_container6(dp);
    for (addr, endpoint_id, mac) in [
        (v6("fd00:1::2"), 1, super::ipv6::CONTAINER_MAC),
        (v6(B6), 2, B_MAC),
    ] {
        dp.set::<crate::kernel::maps::Endpoints6>(
            In6Addr::from_ipv6(addr),
            dataplane_common::EndpointInfo6 {
                ifindex: endpoint_id,
                network_id: 1,
                endpoint_id,
                mac,
                gateway: In6Addr::from_ipv6(v6(GATEWAY6)),
                ..Default::default()
            },
        )
        .unwrap();
    }
    publish6(dp, Ipv6Addr::UNSPECIFIED, 8080, 6, 80);
    publish6(dp, Ipv6Addr::UNSPECIFIED, 8081, 6, 80);
    publish6(dp, Ipv6Addr::UNSPECIFIED, 5353, 17, 53);
}

/// Whether an IPv6 frame's payload length is the frame's and (unless it is a later
/// fragment) its TCP/UDP checksum is right over the pseudo-header.
fn sound6(frame: &[u8]) -> Result<(), String> {
    let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    if 14 + 40 + payload_len != frame.len() {
        return Err(format!(
            "payload length {payload_len} in {} bytes",
            frame.len()
        ));
    }
    let (src, dst, protocol, l4) = super::ipv6::upper_layer(frame);
    let Some(l4) = l4 else {
        return Ok(());
    };
    let sum = super::ipv6::pseudo_sum(src, dst, protocol, frame.len() - l4)
        + super::packet::sum_words(&frame[l4..]);
    if super::packet::csum_fold(sum) != 0 {
        return Err(format!("checksum of protocol {protocol} wrong"));
    }
    Ok(())
}

/// A container's hostile traffic on the IPv6 paths to ports published on the host: A to its
/// own ports (two of them leading to its port 80: the second connection from a source port
/// needs another gateway port) and its answers to the gateway, B to A's port and A's answers,
/// 4000 packets: TCP with any flags (SYN, RST, FIN, none, ...), UDP, a few source ports used
/// over and over, first and later fragments in any order, packets cut short, gateway ports
/// nobody was given. Whatever leaves changed is redirected with every checksum right, with
/// the addresses of its path (hairpin: gateway -> A, published address -> A; B's: B -> A,
/// published address -> B), and an answer to a gateway port goes to the source port and from
/// the published port that port was given for (an answer to B from the port B's latest
/// connection went to); nothing cut short leaves changed; drops are counted.
#[test]
fn hostile_packets_on_the_ipv6_hairpin_leave_translated_right_or_untouched() {
    use std::collections::BTreeMap;

    let mut t = loaded_or_skip!();
    let dp = t.get();
    two_containers_and_a_published_port(dp);
    let (host, a, b, gateway) = (v6("2001:db8::1"), v6("fd00:1::2"), v6(B6), v6(GATEWAY6));
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let total_drops = |dp: &Datapath| dp.drops().unwrap().iter().map(|(_, n)| n).sum::<u64>();
    let flags = [0x02u8, 0x12, 0x10, 0x04, 0x14, 0x11, 0x18, 0x00];
    // (protocol, gateway port) -> (published port, A's source port), from what left.
    let mut given: BTreeMap<(u8, u16), (u16, u16)> = BTreeMap::new();
    // (protocol, B's source port) -> the published port of its latest connection (one from
    // the same port to the other binding of A's port 80 replaces it: the same tuple at A).
    let mut latest: BTreeMap<(u8, u16), u16> = BTreeMap::new();
    let (mut changed, mut untouched, mut dropped) = (0, 0, 0);
    for round in 0..4000 {
        let udp = next() % 4 == 0;
        let protocol = if udp { 17u8 } else { 6 };
        let (published, inner) = match (udp, next() % 2) {
            (true, _) => (5353u16, 53u16),
            (false, 0) => (8080, 80),
            (false, _) => (8081, 80),
        };
        let port = 40000 + (next() % 4) as u16;
        let kind = next() % 4;
        let gateway_port = if next() % 4 == 0 || given.is_empty() {
            port
        } else {
            let ports: Vec<_> = given.keys().filter(|(p, _)| *p == protocol).collect();
            ports
                .get((next() % ports.len().max(1) as u64) as usize)
                .map_or(port, |k| k.1)
        };
        let (src, dst, sport, dport) = match kind {
            0 => (a, host, port, published),
            1 => (a, gateway, inner, gateway_port),
            2 => (b, host, port, published),
            _ => (a, b, inner, port),
        };
        let l4 = if udp {
            super::packet::udp(sport, dport, b"0123456789abcdef")
        } else {
            tcp(
                sport,
                dport,
                flags[(next() % 8) as usize],
                b"0123456789abcdef",
            )
        };
        let mut spec = super::ipv6::Ipv6Spec::new(src, dst, protocol);
        let shape = next() % 8;
        let mut l4 = l4;
        let id = 0x77 + (next() % 3) as u32;
        match shape {
            // A first fragment (its L4 length the whole datagram's).
            0 => {
                spec.ext.push(super::ipv6::fragment_header(0, true, id));
                if udp {
                    l4[4..6].copy_from_slice(&40u16.to_be_bytes());
                }
            }
            // A later one: data only.
            1 => {
                spec.ext.push(super::ipv6::fragment_header(3, false, id));
                l4 = vec![0x5a; 24];
            }
            _ => {}
        }
        let mut input = super::ipv6::ipv6_frame(&spec, &l4);
        let cut = next() % 10 == 0;
        if cut {
            let keep = 14 + 40 + (next() as usize % (input.len() - 54));
            input.truncate(keep);
        }
        let drops_before = total_drops(dp);
        let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &input);
        let what = format!("round {round}, kind {kind}, shape {shape}: {input:02x?}");
        assert!(
            [super::programs::TC_PASS, TC_SHOT, TC_REDIRECT].contains(&verdict),
            "verdict {verdict}, {what}"
        );
        if verdict == TC_SHOT {
            assert_eq!(
                total_drops(dp),
                drops_before + 1,
                "a drop not counted, {what}"
            );
            dropped += 1;
            continue;
        }
        if out[14..] == input[14..] {
            untouched += 1;
            continue;
        }
        changed += 1;
        assert!(!cut, "cut short, yet changed: {what}");
        assert_eq!(verdict, TC_REDIRECT, "changed, not redirected: {what}");
        if let Err(wrong) = sound6(&out) {
            panic!("{wrong}: {what}\n out {out:02x?}");
        }
        let (out_src, out_dst, _, l4_at) = super::ipv6::upper_layer(&out);
        let want = match kind {
            0 => (gateway, a),
            1 => (host, a),
            2 => (b, a),
            _ => (host, b),
        };
        assert_eq!((out_src, out_dst), want, "addresses, {what}");
        let mac = if want.1 == a {
            super::ipv6::CONTAINER_MAC
        } else {
            B_MAC
        };
        assert_eq!(out[..6], mac, "into the right container, {what}");
        let Some(l4_at) = l4_at else {
            continue; // a later fragment: no ports
        };
        let word = |o: usize| u16::from_be_bytes([out[l4_at + o], out[l4_at + o + 1]]);
        let ports = (word(0), word(2));
        match kind {
            0 => {
                assert_eq!(ports.1, inner, "to A's port, {what}");
                given.insert((protocol, ports.0), (published, port));
            }
            1 => {
                let owner = given.get(&(protocol, gateway_port));
                assert_eq!(
                    Some(&ports),
                    owner,
                    "an answer to gateway port {gateway_port} goes back to whom it was given, {what}"
                );
            }
            2 => {
                assert_eq!(ports, (port, inner), "B's ports kept, {what}");
                latest.insert((protocol, port), published);
            }
            _ => assert_eq!(
                Some(ports),
                latest.get(&(protocol, port)).map(|p| (*p, port)),
                "from the published port B's connection went to, {what}"
            ),
        }
    }
    let probed = given.iter().filter(|((_, g), (_, s))| g != s).count();
    let reasons: Vec<_> = dp
        .drops()
        .unwrap()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!(
        "IPv6 hairpin: {changed} translated, {untouched} untouched, {dropped} dropped \
         ({reasons:?}); {} gateway ports given, {probed} probed",
        given.len()
    );
    assert!(changed > 1000 && probed > 0);
}

/// A container flooding its own published port (and another container's connection to it)
/// with SYNs from ever new source ports, twice as many as the table of handshakes holds, with
/// the main table full: every SYN still goes round the hairpin (the LRU table makes room),
/// none is dropped for want of an entry, and the connections established before go on both
/// ways on the gateway port they had; a new hairpin handshake still completes.
#[test]
fn a_container_flooding_its_own_ipv6_port_never_displaces_established_connections() {
    use crate::kernel::LoadOptions;
    use dataplane_common::ct_state;

    // The main tables have room for exactly one connection each (its two entries).
    let mut t = loaded_or_skip!(&LoadOptions {
        ct_max_entries: 2,
        ..LoadOptions::default()
    });
    let dp = t.get();
    two_containers_and_a_published_port(dp);
    let (host, a, gateway) = (v6("2001:db8::1"), v6("fd00:1::2"), v6(GATEWAY6));
    let out = |dp: &mut Datapath, frame: Vec<u8>, what: &str| {
        let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &frame);
        assert_eq!(verdict, TC_REDIRECT, "{what}");
        super::ipv6::assert_checksums6(&out);
        let (src, dst, _, _) = super::ipv6::upper_layer(&out);
        (src, dst, super::ipv6::ports6(&out))
    };
    let handshake = |dp: &mut Datapath, port: u16| -> u16 {
        let syn = frame6(a, host, 6, &tcp_seq(port, 8080, TCP_SYN, 100, 0));
        let (_, _, (given, _)) = out(dp, syn, "the hairpin SYN");
        let syn_ack = frame6(
            a,
            gateway,
            6,
            &tcp_seq(80, given, TCP_SYN | TCP_ACK, 5000, 101),
        );
        assert_eq!(out(dp, syn_ack, "its SYN-ACK"), (host, a, (8080, port)));
        let ack = frame6(a, host, 6, &tcp_seq(port, 8080, TCP_ACK, 101, 5001));
        assert_eq!(out(dp, ack, "its ACK"), (gateway, a, (given, 80)));
        given
    };
    let given = handshake(dp, 40000);
    let established = |dp: &Datapath| {
        dp.entries::<crate::kernel::maps::Conntrack6>()
            .unwrap()
            .values()
            .filter(|e| e.state == ct_state::ESTABLISHED)
            .count()
    };
    assert_eq!(
        established(dp),
        2,
        "both directions moved to the main table"
    );
    let capacity = dp.capacity::<crate::kernel::maps::Conntrack6New>().unwrap();
    for i in 0..capacity * 2 {
        let port = 1024 + i as u16;
        let syn = frame6(a, host, 6, &tcp(port, 8080 + (i % 2) as u16, TCP_SYN, b""));
        let (src, dst, (_, to)) = out(dp, syn, &format!("flood SYN {i}"));
        assert_eq!((src, dst, to), (gateway, a, 80), "flood SYN {i}");
    }
    assert_eq!(drops(dp, DropReason::CtMapInsertionFailed), 0);
    assert_eq!(drops(dp, DropReason::NoMappingForNatMasquerade), 0);
    assert_eq!(
        established(dp),
        2,
        "the established connection is untouched"
    );
    let data = frame6(a, host, 6, &tcp(40000, 8080, TCP_ACK, b"GET"));
    assert_eq!(out(dp, data, "its data"), (gateway, a, (given, 80)));
    let answer = frame6(a, gateway, 6, &tcp(80, given, TCP_ACK, b"200"));
    assert_eq!(out(dp, answer, "its answer"), (host, a, (8080, 40000)));
    handshake(dp, 40001);
}

/// Open connections of every kind at every hook (a client from outside to a published port,
/// a container to another's published port, a hairpin, a masqueraded one out of the uplink)
/// while the policy generation moves under them: two datapaths get the same 3000 packets,
/// any TCP flags, one of them a new generation (the rules as they were) before one packet in
/// eight. Re-judging a connection the rules still allow changes nothing: every packet leaves
/// both alike (verdict and bytes). Then a rule keeps the outside client off the container in
/// both: its packets are dropped from then on, the container's to it are never the published
/// port's replies again, the others' connections go on alike.
#[test]
fn ipv6_policy_generations_moving_under_open_connections_change_nothing_the_rules_allow() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::policy_action;

    let (Some(mut t1), Some(mut t2)) = (
        super::programs::TestDatapath::load_with(&Default::default()),
        super::programs::TestDatapath::load_with(&Default::default()),
    ) else {
        return;
    };
    for t in [&mut t1, &mut t2] {
        two_containers_and_a_published_port(t.get());
    }
    let (host, a, b, gateway) = (v6("2001:db8::1"), v6("fd00:1::2"), v6(B6), v6(GATEWAY6));
    let (client, far) = (v6("2001:db8::2"), v6("2001:db8:9::9"));
    let mut state = 0x0dd_ba11_cafe_f00du64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let flags = [0x02u8, 0x12, 0x10, 0x18, 0x11, 0x04];
    // The hairpin's gateway port and the masquerade port, as the packets left.
    let (mut hairpin_port, mut masquerade_port) = (40002u16, 40003u16);
    let mut bumps = 0;
    let mut denied = false;
    let (mut translated, mut client_dropped) = (0, 0);
    for round in 0..3000 {
        if round == 2500 {
            // A rule keeping the client off the container's port 80, in both.
            let rules = [Rule {
                action: policy_action::DENY,
                from: Side::Cidr6(u128::from(client), 128),
                to: Side::Any,
                port: Some((6, 80)),
            }];
            for t in [&mut t1, &mut t2] {
                crate::reconcile::apply_policy(&tables(&rules, &[]), t.get()).unwrap();
                bump_generation(t.get());
            }
            denied = true;
        }
        if next() % 8 == 0 {
            bump_generation(t2.get());
            bumps += 1;
        }
        let f = flags[(next() % flags.len() as u64) as usize];
        let reply = next() % 2 == 0;
        let conn = next() % 4;
        let (hooks, src, dst, sport, dport): (&[Hook], _, _, _, _) = match (conn, reply) {
            (0, false) => (&[Hook::UplinkIngress], client, host, 40000, 8080),
            (0, true) => (&[Hook::ContainerIngress], a, client, 80, 40000),
            (1, false) => (&[Hook::ContainerIngress], b, host, 40001, 8080),
            (1, true) => (&[Hook::ContainerIngress], a, b, 80, 40001),
            (2, false) => (&[Hook::ContainerIngress], a, host, 40002, 8081),
            (2, true) => (&[Hook::ContainerIngress], a, gateway, 80, hairpin_port),
            (_, false) => (
                &[Hook::ContainerIngress, Hook::UplinkEgress],
                a,
                far,
                40003,
                443,
            ),
            (_, true) => (&[Hook::UplinkIngress], far, host, 443, masquerade_port),
        };
        let frame = frame6(src, dst, 6, &tcp(sport, dport, f, b"data"));
        for &hook in hooks {
            let one = run_tc(t1.get(), hook, &frame);
            let two = run_tc(t2.get(), hook, &frame);
            let what = format!("round {round} ({bumps} generations), {hook:?}, {frame:02x?}");
            assert_eq!(one, two, "the two datapaths part: {what}");
            if denied && conn == 0 && !reply {
                assert_eq!(one.0, TC_SHOT, "the denied client's connection: {what}");
                client_dropped += 1;
            }
            if denied && conn == 0 && reply && one.0 != TC_SHOT {
                // The connection is gone (its entries with it): what the container sends the
                // client now is a connection of its own, never the published port's reply.
                let (src, _, _, _) = super::ipv6::upper_layer(&one.1);
                assert_ne!(src, host, "the denied connection answered: {what}");
            }
            if one.1 != frame {
                translated += 1;
                let ports = super::ipv6::ports6(&one.1);
                match (conn, reply) {
                    (2, false) => hairpin_port = ports.0,
                    (3, false) if hook == Hook::UplinkEgress => masquerade_port = ports.0,
                    _ => {}
                }
            }
        }
    }
    eprintln!(
        "policy generations: {bumps} under open connections, {translated} packets translated, \
         {client_dropped} of the denied client dropped"
    );
    assert!(bumps > 300 && translated > 1500 && client_dropped > 30);
}

//! Packet tests of NAT64 for published ports: an IPv6 client to a port published on the
//! host's IPv6 addresses whose container has only IPv4. The request leaves as IPv4 (from the
//! container network's gateway, to the container), the reply as IPv6 (from the published
//! address and port, to the client); every IPv4 header checksum and TCP/UDP checksum (over
//! the pseudo-header of the family the packet leaves with) is verified.

use std::net::{Ipv4Addr, Ipv6Addr};

use dataplane_common::{
    Config, CtKey6, DropReason, EndpointInfo, In6Addr, PortKey6, PortTarget6, ct_rewrite,
};

use super::{
    ipv6::{Ipv6Spec, assert_checksums6, ipv6_frame, upper_layer, v6},
    packet::{
        ETH_LEN, Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, csum_fold, fix_ip_checksum,
        ipv4_frame, sum_words, tcp, tuple, udp,
    },
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
    translation::{TC_REDIRECT, be, drops},
};
use crate::kernel::{Datapath, Hook};

const CONTAINER: [u8; 4] = [172, 30, 1, 2];
const GATEWAY: [u8; 4] = [172, 30, 1, 1];
const CONTAINER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
const SNAT_RANGE: (u16, u16) = (20000, 32767);

fn host() -> Ipv6Addr {
    v6("2001:db8::1")
}

fn client() -> Ipv6Addr {
    v6("2001:db8::2")
}

/// An IPv4-only container (172.30.1.2, gateway 172.30.1.1, behind the test run's loopback),
/// the host's IPv6 address 2001:db8::1, and the container's port 80/tcp published on every
/// host address at 8080 and 53/udp at 5353 (as the reconciler writes them over IPv6: to the
/// container's IPv4-mapped address).
fn ipv4_only_container(dp: &mut Datapath) {
    dp.set::<crate::kernel::maps::Endpoints>(
        be(CONTAINER),
        EndpointInfo {
            ifindex: 1,
            network_id: 1,
            endpoint_id: 1,
            mac: CONTAINER_MAC,
            gateway: be(GATEWAY),
            ..EndpointInfo::default()
        },
    )
    .unwrap();
    dp.set::<crate::kernel::maps::LocalAddrs>(be(GATEWAY), 1u8)
        .unwrap();
    dp.set::<crate::kernel::maps::LocalAddrs6>(In6Addr::from_ipv6(host()), 1u8)
        .unwrap();
    for (port, proto, to) in [(8080u16, 6u8, 80u16), (5353, 17, 53)] {
        dp.set::<crate::kernel::maps::Ports6>(
            PortKey6 {
                addr: In6Addr::UNSPECIFIED,
                port: port.to_be(),
                proto,
                _pad: 0,
            },
            PortTarget6 {
                addr: In6Addr::mapped_v4(be(CONTAINER)),
                port: to.to_be(),
                is_service: 0,
                _pad: 0,
            },
        )
        .unwrap();
    }
    dp.set_config(Config {
        uplink_ifindex: 1,
        snat_port_min: SNAT_RANGE.0,
        snat_port_max: SNAT_RANGE.1,
        ..Config::default()
    })
    .unwrap();
}

/// A request from the client, through the uplink's ingress: delivered into the container as
/// IPv4, 20 bytes shorter, with valid checksums; its addresses and ports.
fn inward(dp: &mut Datapath, frame: &[u8], what: &str) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, frame);
    assert_eq!(verdict, TC_REDIRECT, "{what}: into the container");
    assert_eq!(&out[12..14], &0x0800u16.to_be_bytes(), "{what}: IPv4 now");
    assert_eq!(
        out.len(),
        frame.len() - 20,
        "{what}: the IPv4 header's 20 bytes shorter"
    );
    assert_eq!(&out[..6], &CONTAINER_MAC, "{what}: to the container's MAC");
    assert_eq!(out[ETH_LEN + 8], 64, "{what}: the hop limit as TTL");
    assert_checksums(&out);
    tuple(&out)
}

/// A reply from the container, through its veth's ingress: out of the uplink as IPv6, 20
/// bytes longer, with a valid checksum; its addresses and ports.
fn outward(dp: &mut Datapath, frame: &[u8], what: &str) -> (Ipv6Addr, Ipv6Addr, u16, u16) {
    let (verdict, out) = run_tc(dp, Hook::ContainerIngress, frame);
    assert_eq!(verdict, TC_REDIRECT, "{what}: out of the uplink");
    assert_eq!(&out[12..14], &0x86ddu16.to_be_bytes(), "{what}: IPv6 now");
    assert_eq!(out.len(), frame.len() + 20, "{what}: 20 bytes longer");
    assert_eq!(out[ETH_LEN + 7], 64, "{what}: the TTL as hop limit");
    assert_checksums6(&out);
    let (src, dst, _, l4) = upper_layer(&out);
    let l4 = l4.unwrap();
    let word = |at: usize| u16::from_be_bytes([out[at], out[at + 1]]);
    (src, dst, word(l4), word(l4 + 2))
}

fn from_client(protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv6_frame(&Ipv6Spec::new(client(), host(), protocol), l4)
}

fn from_container(protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_frame(&Ipv4Spec::new(CONTAINER, GATEWAY, protocol), l4)
}

#[test]
fn nat64_tcp_to_an_ipv4_only_container_and_its_replies_back_over_ipv6() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let container = Ipv4Addr::from(CONTAINER);
    let gateway = Ipv4Addr::from(GATEWAY);
    // The SYN: from the gateway at the client's own port (free), to the container's port.
    let syn = from_client(6, &tcp(40000, 8080, TCP_SYN, b""));
    assert_eq!(
        inward(dp, &syn, "SYN"),
        (gateway, container, 40000, 80),
        "SYN: from the gateway to the container"
    );
    // Tracked in the IPv6 tables: the client's side as it is, the container's IPv4-mapped.
    let mut tracked = dp.entries::<crate::kernel::maps::Conntrack6New>().unwrap();
    tracked.extend(dp.entries::<crate::kernel::maps::Conntrack6>().unwrap());
    let reply_key = CtKey6 {
        saddr: In6Addr::mapped_v4(be(CONTAINER)),
        daddr: In6Addr::mapped_v4(be(GATEWAY)),
        sport: 80u16.to_be(),
        dport: 40000u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let reply_entry = tracked
        .get(&reply_key)
        .expect("the container's side is tracked");
    assert_eq!(reply_entry.rewrite, ct_rewrite::NAT64);
    let forward = reply_entry.peer;
    assert_eq!(forward.saddr, In6Addr::from_ipv6(client()));
    let forward_entry = tracked.get(&forward).expect("the client's side is tracked");
    assert_eq!(forward_entry.rewrite, ct_rewrite::NAT64);
    assert_eq!(forward_entry.nat_addr, In6Addr::mapped_v4(be(CONTAINER)));
    assert_eq!(forward_entry.nat_port, 80u16.to_be());

    let syn_ack = from_container(6, &tcp(80, 40000, TCP_SYN | TCP_ACK, b""));
    assert_eq!(
        outward(dp, &syn_ack, "SYN-ACK"),
        (host(), client(), 8080, 40000),
        "SYN-ACK: from the published address and port, to the client"
    );
    let ack = from_client(6, &tcp(40000, 8080, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n"));
    assert_eq!(inward(dp, &ack, "data"), (gateway, container, 40000, 80));
    let data = from_container(6, &tcp(80, 40000, TCP_ACK, b"HTTP/1.0 200 OK\r\n\r\nhello"));
    assert_eq!(
        outward(dp, &data, "reply data"),
        (host(), client(), 8080, 40000)
    );

    // The container's own packets to its gateway that no NAT64 connection tracked, and a
    // client's to a port nobody published: untouched.
    let other = from_container(6, &tcp(80, 40001, TCP_SYN | TCP_ACK, b""));
    assert_eq!(
        run_tc(dp, Hook::ContainerIngress, &other),
        (TC_PASS, other.clone())
    );
    let unpublished = from_client(6, &tcp(40002, 9999, TCP_SYN, b""));
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &unpublished),
        (TC_PASS, unpublished.clone())
    );
}

#[test]
fn nat64_udp_both_ways_and_a_reply_without_checksum_is_dropped() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let container = Ipv4Addr::from(CONTAINER);
    let gateway = Ipv4Addr::from(GATEWAY);
    let query = from_client(17, &udp(40010, 5353, b"query"));
    assert_eq!(
        inward(dp, &query, "UDP query"),
        (gateway, container, 40010, 53)
    );
    let answer = from_container(17, &udp(53, 40010, b"answer"));
    assert_eq!(
        outward(dp, &answer, "UDP answer"),
        (host(), client(), 5353, 40010)
    );
    // A second datagram each way, on the tracked connection.
    let query = from_client(17, &udp(40010, 5353, b"again"));
    assert_eq!(
        inward(dp, &query, "second query"),
        (gateway, container, 40010, 53)
    );
    assert_eq!(
        outward(dp, &answer, "second answer"),
        (host(), client(), 5353, 40010)
    );
    // IPv6 has no checksum-less UDP: such a reply is dropped, and counted.
    let mut no_checksum = answer.clone();
    no_checksum[ETH_LEN + 20 + 6..ETH_LEN + 20 + 8].copy_from_slice(&[0, 0]);
    let before = drops(dp, DropReason::InvalidL4Header);
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &no_checksum).0, TC_SHOT);
    assert_eq!(drops(dp, DropReason::InvalidL4Header), before + 1);
    // Nor is one without checksum let in as IPv4 (where 0 would mean "not checked").
    let mut no_checksum = from_client(17, &udp(40011, 5353, b"query"));
    no_checksum[ETH_LEN + 40 + 6..ETH_LEN + 40 + 8].copy_from_slice(&[0, 0]);
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &no_checksum).0, TC_SHOT);
    assert_eq!(drops(dp, DropReason::InvalidL4Header), before + 2);
    // Each with its flow record, of its own family, as it arrived.
    use crate::flows::decode::{self, Kind};
    let dropped: Vec<_> = super::flows::events(dp)
        .iter()
        .map(|e| decode::from_raw(e).unwrap())
        .filter(|e| e.kind == Kind::Drop(DropReason::InvalidL4Header))
        .map(|e| {
            let t = e.tuple;
            (t.saddr, t.sport, t.daddr, t.dport, e.hook)
        })
        .collect();
    assert_eq!(
        dropped,
        [
            (
                container.into(),
                53,
                gateway.into(),
                40010,
                dataplane_common::hook::CONTAINER_INGRESS
            ),
            (
                client().into(),
                40011,
                host().into(),
                5353,
                dataplane_common::hook::UPLINK_INGRESS
            ),
        ]
    );
}

/// Two clients with the same source port: the first keeps its port at the gateway, the
/// second gets one probed from the masquerade range, and each one's replies reach it.
#[test]
fn nat64_clients_sharing_a_source_port_get_distinct_gateway_ports() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let (container, gateway) = (Ipv4Addr::from(CONTAINER), Ipv4Addr::from(GATEWAY));
    let other = v6("2001:db8::3");
    let first = from_client(6, &tcp(40000, 8080, TCP_SYN, b""));
    assert_eq!(
        inward(dp, &first, "first client"),
        (gateway, container, 40000, 80)
    );
    let second = ipv6_frame(
        &Ipv6Spec::new(other, host(), 6),
        &tcp(40000, 8080, TCP_SYN, b""),
    );
    let (_, _, probed, _) = inward(dp, &second, "second client");
    assert!(
        (SNAT_RANGE.0..=SNAT_RANGE.1).contains(&probed),
        "a probed port: {probed}"
    );
    for (port, client) in [(40000, client()), (probed, other)] {
        let reply = from_container(6, &tcp(80, port, TCP_SYN | TCP_ACK, b""));
        assert_eq!(
            outward(dp, &reply, "reply"),
            (host(), client, 8080, 40000),
            "the reply to gateway port {port}"
        );
    }
}

/// Thousands of packets both ways (IPv6 TCP with any flags and UDP from clients to the
/// published ports, some with an extension or fragment header; IPv4 answers from the
/// container to its gateway; some cut short, some with a wrong IPv4 header checksum):
/// whatever goes on translated has every checksum of the family it leaves as right, and a
/// packet cut short or with a wrong header checksum never goes on changed.
#[test]
fn random_packets_through_nat64_never_leave_with_a_wrong_checksum() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    // xorshift64*: the same packets on every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let clients = [client(), v6("2001:db8::3"), v6("2001:db8:9::9")];
    let client_ports = [40000u16, 40001, 40002];
    let (mut inward_changed, mut outward_changed) = (0, 0);
    for _ in 0..3000 {
        let protocol = if next() % 3 == 0 { 17u8 } else { 6 };
        let flags = next() as u8 & 0x3f;
        let client_port = client_ports[(next() % 3) as usize];
        let from_outside = next() % 2 == 0;
        let mut input = if from_outside {
            let published = if protocol == 6 { 8080 } else { 5353 };
            let l4 = if protocol == 6 {
                tcp(client_port, published, flags, b"data")
            } else {
                udp(client_port, published, b"datagram")
            };
            let src = clients[(next() % 3) as usize];
            let mut spec = Ipv6Spec::new(src, host(), protocol);
            match next() % 8 {
                0 => spec = spec.with(0),
                1 => {
                    let offset: u16 = if next() % 2 == 0 { 0 } else { 100 };
                    let word = (offset << 3) | (next() % 2) as u16;
                    let mut header = vec![0, 0];
                    header.extend_from_slice(&word.to_be_bytes());
                    header.extend_from_slice(&7u32.to_be_bytes());
                    spec.ext.push((44, header));
                }
                _ => {}
            }
            ipv6_frame(&spec, &l4)
        } else {
            let container_port = if protocol == 6 { 80 } else { 53 };
            let l4 = if protocol == 6 {
                tcp(container_port, client_port, flags, b"answer")
            } else {
                udp(container_port, client_port, b"answer")
            };
            from_container(protocol, &l4)
        };
        let cut = next() % 6 == 0;
        if cut {
            let fixed = ETH_LEN + if from_outside { 40 } else { 20 };
            let keep = fixed + (next() as usize % (input.len() - fixed));
            input.truncate(keep);
        }
        // A container's packet with a wrong IPv4 header checksum: as IPv6 (no header
        // checksum) it would arrive sound, so it must not be translated.
        let bad_header = !from_outside && next() % 10 == 0;
        if bad_header {
            input[ETH_LEN + 10] ^= 0x40;
        }
        let hook = if from_outside {
            Hook::UplinkIngress
        } else {
            Hook::ContainerIngress
        };
        let (verdict, out) = run_tc(dp, hook, &input);
        assert!(
            [TC_PASS, TC_SHOT, TC_REDIRECT].contains(&verdict),
            "{hook:?}: verdict {verdict} for {input:02x?}"
        );
        if verdict == TC_SHOT || out.get(ETH_LEN..) == input.get(ETH_LEN..) {
            continue;
        }
        assert!(
            !cut,
            "{hook:?}: a packet cut short went on changed: {input:02x?}"
        );
        assert!(
            !bad_header,
            "{hook:?}: a wrong IPv4 header checksum went on as IPv6: {input:02x?}"
        );
        if out[12..14] == 0x0800u16.to_be_bytes() {
            let offset = u16::from_be_bytes([out[ETH_LEN + 6], out[ETH_LEN + 7]]) & 0x1fff;
            if offset == 0 {
                assert_checksums(&out);
            } else {
                // A later fragment (of a datagram whose first fragment came before, with the
                // same identification): no L4 header of its own.
                let header = &out[ETH_LEN..ETH_LEN + 20];
                let sum = super::packet::sum_words(header);
                assert_eq!(super::packet::csum_fold(sum), 0, "IPv4 header checksum");
            }
            inward_changed += 1;
        } else {
            assert_checksums6(&out);
            outward_changed += 1;
        }
    }
    eprintln!("NAT64: {inward_changed} requests and {outward_changed} replies translated");
    assert!(inward_changed > 50 && outward_changed > 50);
}

/// A NAT64 connection is judged by the IPv4-only container it leads to, as it is over IPv4
/// (its endpoint; the client by its IPv6 address): a rule keeping one IPv6 prefix off the
/// container's port drops its SYN (`POLICY_DENY`), a client outside the prefix gets in.
#[test]
fn nat64_connections_are_judged_by_the_user_rules_against_their_container() {
    use crate::reconcile::policy::{Rule, Side, tables};
    use dataplane_common::policy_action;

    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let rules = [Rule {
        action: policy_action::DENY,
        from: Side::Cidr6(u128::from(client()), 128),
        to: Side::Endpoint(1),
        port: Some((6, 80)),
    }];
    crate::reconcile::apply_policy(&tables(&rules, &[]), dp).unwrap();
    let syn = from_client(6, &tcp(40000, 8080, TCP_SYN, b""));
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &syn),
        (TC_SHOT, syn.clone()),
        "the denied client"
    );
    assert_eq!(drops(dp, DropReason::PolicyDeny), 1);
    let neighbour = v6("2001:db8::3");
    let syn = ipv6_frame(
        &Ipv6Spec::new(neighbour, host(), 6),
        &tcp(40000, 8080, TCP_SYN, b""),
    );
    assert_eq!(
        inward(dp, &syn, "another client").1,
        Ipv4Addr::from(CONTAINER)
    );
}

/// Path MTU discovery through NAT64 (RFC 7915): an ICMPv6 error from the way to the client
/// about a reply it sent (as it left, from the published address) reaches the IPv4-only
/// container as the ICMPv4 error it would get were the path IPv4, from its gateway and about
/// its own packet (to the gateway at the allocated port): packet too big as "fragmentation
/// needed" with the MTU 20 bytes less, port unreachable and time exceeded likewise; one RFC
/// 7915 does not translate passes untouched. Every IPv4 header checksum (the quote's too) and
/// the ICMPv4 checksum verified.
#[test]
fn nat64_icmpv6_errors_reach_the_container_as_icmpv4_errors() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let (container, gateway) = (Ipv4Addr::from(CONTAINER), Ipv4Addr::from(GATEWAY));
    let syn = from_client(6, &tcp(40000, 8080, TCP_SYN, b""));
    inward(dp, &syn, "SYN");
    let syn_ack = from_container(6, &tcp(80, 40000, TCP_SYN | TCP_ACK, b""));
    let (verdict, reply) = run_tc(dp, Hook::ContainerIngress, &syn_ack);
    assert_eq!(verdict, TC_REDIRECT);
    let router = v6("2001:db8:ff::1");
    let error_about = |kind: u8, code: u8, mtu: u32| {
        ipv6_frame(
            &Ipv6Spec::new(router, host(), 58),
            &super::ipv6::icmp6_error(kind, code, mtu, &reply),
        )
    };
    for (kind, code, mtu, expected) in [
        (2u8, 0u8, 1280u32, (3u8, 4u8, 1260u16)),
        (1, 4, 0, (3, 3, 0)),
        (1, 0, 0, (3, 1, 0)),
        (3, 0, 0, (11, 0, 0)),
    ] {
        let frame = error_about(kind, code, mtu);
        let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &frame);
        let what = format!("ICMPv6 {kind}/{code}");
        assert_eq!(verdict, TC_REDIRECT, "{what}: into the container");
        assert_eq!(&out[12..14], &0x0800u16.to_be_bytes(), "{what}: IPv4 now");
        assert_eq!(out.len(), frame.len() - 40, "{what}: 40 bytes shorter");
        assert_eq!(&out[..6], &CONTAINER_MAC, "{what}");
        assert_checksums(&out);
        let (src, dst, _, _) = tuple(&out);
        assert_eq!((src, dst), (gateway, container), "{what}: outer addresses");
        assert_eq!(out[ETH_LEN + 9], 1, "{what}: ICMP");
        let icmp = &out[ETH_LEN + 20..];
        let next_hop_mtu = u16::from_be_bytes([icmp[6], icmp[7]]);
        assert_eq!((icmp[0], icmp[1], next_hop_mtu), expected, "{what}");
        // The quote: the container's own SYN-ACK, to the gateway at the client's port.
        let quote = &icmp[8..];
        let addr = |o: usize| Ipv4Addr::from(<[u8; 4]>::try_from(&quote[o..o + 4]).unwrap());
        let port = |o: usize| u16::from_be_bytes([quote[o], quote[o + 1]]);
        assert_eq!(
            (addr(12), addr(16), quote[9], port(20), port(22)),
            (container, gateway, 6, 80, 40000),
            "{what}: the quoted packet"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([quote[2], quote[3]])),
            syn_ack.len() - ETH_LEN,
            "{what}: the quoted packet's length as the container sent it"
        );
    }
    // A parameter problem about a header field: RFC 7915's pointer does not carry over.
    let frame = error_about(4, 0, 6);
    assert_eq!(
        run_tc(dp, Hook::UplinkIngress, &frame),
        (TC_PASS, frame.clone())
    );
}

/// The other way (RFC 7915): an IPv4-only container's ICMPv4 error about a NAT64 request it
/// got (its UDP port closed, above all) reaches the IPv6 client as the ICMPv6 error it would
/// get were the path IPv6, from the published address and about its own datagram (to the
/// published address and port); "fragmentation needed" as packet too big, 20 bytes more and
/// never under 1280; one RFC 7915 does not translate passes untouched. Every ICMPv6 checksum
/// (pseudo-header included) verified.
#[test]
fn nat64_icmpv4_errors_of_the_container_reach_the_client_as_icmpv6_errors() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let request = from_client(17, &udp(40000, 5353, b"query"));
    let (verdict, arrived) = run_tc(dp, Hook::UplinkIngress, &request);
    assert_eq!(verdict, TC_REDIRECT);
    let error_about = |kind: u8, code: u8, second: u32| {
        let mut message = vec![kind, code, 0, 0];
        message.extend_from_slice(&second.to_be_bytes());
        message.extend_from_slice(&arrived[ETH_LEN..]);
        ipv4_frame(&Ipv4Spec::new(CONTAINER, GATEWAY, 1), &message)
    };
    for (kind, code, second, expected) in [
        (3u8, 3u8, 0u32, (1u8, 4u8, 0u32)),
        (3, 4, 1400, (2, 0, 1420)),
        (3, 4, 576, (2, 0, 1280)),
        (3, 1, 0, (1, 0, 0)),
        (3, 13, 0, (1, 1, 0)),
        (3, 2, 0, (4, 1, 6)),
        (11, 0, 0, (3, 0, 0)),
    ] {
        let frame = error_about(kind, code, second);
        let (verdict, out) = run_tc(dp, Hook::ContainerIngress, &frame);
        let what = format!("ICMPv4 {kind}/{code}");
        assert_eq!(verdict, TC_REDIRECT, "{what}: out of the uplink");
        assert_eq!(&out[12..14], &0x86ddu16.to_be_bytes(), "{what}: IPv6 now");
        assert_eq!(out.len(), frame.len() + 40, "{what}: 40 bytes longer");
        assert_checksums6(&out);
        let (src, dst, protocol, l4) = upper_layer(&out);
        assert_eq!((src, dst, protocol), (host(), client(), 58), "{what}");
        let icmp = &out[l4.unwrap()..];
        let second = u32::from_be_bytes(icmp[4..8].try_into().unwrap());
        assert_eq!((icmp[0], icmp[1], second), expected, "{what}");
        // The quote: the client's own datagram, to the published address and port.
        let quote = &icmp[8..];
        let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&quote[o..o + 16]).unwrap());
        let port = |o: usize| u16::from_be_bytes([quote[o], quote[o + 1]]);
        assert_eq!(
            (
                quote[0] >> 4,
                quote[6],
                addr(8),
                addr(24),
                port(40),
                port(42)
            ),
            (6, 17, client(), host(), 40000, 5353),
            "{what}: the quoted datagram"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([quote[4], quote[5]])),
            request.len() - ETH_LEN - 40,
            "{what}: the quoted datagram's payload length as the client sent it"
        );
    }
    // A parameter problem (its pointer does not carry over), and an error about no NAT64
    // connection: untouched.
    let frame = error_about(12, 0, 0);
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &frame).0, TC_PASS);
    let mut other = error_about(3, 3, 0);
    other[ETH_LEN + 20 + 8 + 20] ^= 1; // the quoted source port (the gateway's) changed
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &other).0, TC_PASS);
}

/// A UDP datagram in IPv6 fragments (its sender split it; IPv6 routers never do) to an
/// IPv4-only container's published port: each fragment becomes an IPv4 fragment (RFC 7915:
/// the fragment header's offset and "more fragments" in IPv4's fields, DF clear, the
/// identification's low 16 bits), 28 bytes shorter, the first with its ports translated and
/// the second following it through the fragment map; reassembled, the datagram's UDP
/// checksum is valid over the IPv4 pseudo-header. A later fragment whose first never came
/// is dropped and counted.
#[test]
fn nat64_translates_ipv6_fragments_into_ipv4_fragments() {
    use super::packet::{csum_fold, l4_pseudo_sum, sum_words};

    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    let (container, gateway) = (Ipv4Addr::from(CONTAINER), Ipv4Addr::from(GATEWAY));
    // The whole datagram, its checksum computed over the IPv6 pseudo-header.
    let data: Vec<u8> = (0..32u8).collect();
    let whole = from_client(17, &udp(40030, 5353, &data));
    let datagram = whole[ETH_LEN + 40..].to_vec();
    let id = 0x0012_3456u32;
    let fragment = |offset: u16, more: bool, id: u32, bytes: &[u8]| {
        let mut spec = Ipv6Spec::new(client(), host(), 17);
        spec.ext
            .push(super::ipv6::fragment_header(offset, more, id));
        let mut frame = ipv6_frame(&spec, bytes);
        // The builder sums what it is given: put the datagram's own bytes back.
        let at = frame.len() - bytes.len();
        frame[at..].copy_from_slice(bytes);
        frame
    };
    let mut reassembled = Vec::new();
    let mut ids = Vec::new();
    for (what, offset, more, bytes) in [
        ("first fragment", 0u16, true, &datagram[..24]),
        ("later fragment", 3, false, &datagram[24..]),
    ] {
        let frame = fragment(offset, more, id, bytes);
        let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &frame);
        assert_eq!(verdict, TC_REDIRECT, "{what}: into the container");
        assert_eq!(&out[12..14], &0x0800u16.to_be_bytes(), "{what}: IPv4 now");
        assert_eq!(out.len(), frame.len() - 28, "{what}: 28 bytes shorter");
        assert_eq!(&out[..6], &CONTAINER_MAC, "{what}");
        let header = &out[ETH_LEN..ETH_LEN + 20];
        assert_eq!(
            csum_fold(sum_words(header)),
            0,
            "{what}: IPv4 header checksum"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([header[2], header[3]])),
            out.len() - ETH_LEN,
            "{what}: total length"
        );
        let fragment_word = u16::from_be_bytes([header[6], header[7]]);
        let expected = u16::from(more) << 13 | offset;
        assert_eq!(fragment_word, expected, "{what}: MF and offset, DF clear");
        ids.push(u16::from_be_bytes([header[4], header[5]]));
        let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
        let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
        assert_eq!((src, dst), (gateway, container), "{what}: addresses");
        reassembled.extend_from_slice(&out[ETH_LEN + 20..]);
    }
    assert_eq!(
        ids,
        [0x3456, 0x3456],
        "the identification's low 16 bits, alike"
    );
    let ports = (
        u16::from_be_bytes([reassembled[0], reassembled[1]]),
        u16::from_be_bytes([reassembled[2], reassembled[3]]),
    );
    assert_eq!(
        ports,
        (40030, 53),
        "from the gateway to the container's port"
    );
    assert_eq!(&reassembled[8..], &data[..], "the data untouched");
    let sum = l4_pseudo_sum(gateway, container, 17, reassembled.len()) + sum_words(&reassembled);
    assert_eq!(csum_fold(sum), 0, "the reassembled datagram's UDP checksum");
    // A later fragment of a datagram whose first never came.
    let before = drops(dp, DropReason::FragmentNotFound);
    let orphan = fragment(3, false, 0x0bad, &datagram[24..]);
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &orphan).0, TC_SHOT);
    assert_eq!(drops(dp, DropReason::FragmentNotFound), before + 1);
}

/// Whether the ones'-complement sum of `data` (plus `seed`, a pseudo-header's) checks.
fn sums_to_zero(seed: u32, data: &[u8]) -> bool {
    csum_fold(seed + sum_words(data)) == 0
}

/// What an ICMP error translated by NAT64 must be, whichever way: the checks of a translated
/// error frame (`out`), the message's checksum valid exactly when the original's was (a
/// corrupt message must stay detectable, a sound one must arrive sound). Err says what is
/// wrong.
fn check_translated_to_ipv4(out: &[u8], valid_in: bool, mtu6: u32) -> Result<(), String> {
    if out.get(12..14) != Some(&0x0800u16.to_be_bytes()[..]) || out.len() < ETH_LEN + 52 {
        return Err("not an IPv4 frame long enough for an ICMP error".into());
    }
    let ip = &out[ETH_LEN..];
    if ip[0] != 0x45 || !sums_to_zero(0, &ip[..20]) || ip[9] != 1 {
        return Err("outer IPv4 header: not 0x45, a wrong checksum or not ICMP".into());
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total_len < 52 || total_len > ip.len() {
        return Err(format!("total length {total_len} of {} bytes", ip.len()));
    }
    let icmp = &ip[20..total_len];
    if sums_to_zero(0, icmp) != valid_in {
        return Err(format!(
            "ICMPv4 checksum {} while the ICMPv6 one was {}",
            if valid_in { "wrong" } else { "right" },
            if valid_in { "right" } else { "wrong" }
        ));
    }
    if icmp[0] != 3 && icmp[0] != 11 {
        return Err(format!("ICMPv4 type {}", icmp[0]));
    }
    // Packet too big: 20 bytes less, from no less than IPv6's minimum (1280).
    let next_hop_mtu = u32::from(u16::from_be_bytes([icmp[6], icmp[7]]));
    if (icmp[0], icmp[1]) == (3, 4) && next_hop_mtu != (mtu6.max(1280) - 20).min(0xffff) {
        return Err(format!(
            "next-hop MTU {next_hop_mtu} for an IPv6 MTU of {mtu6}"
        ));
    }
    let quote = &icmp[8..];
    if quote[0] != 0x45 || !sums_to_zero(0, &quote[..20]) {
        return Err("quoted IPv4 header: not 0x45 or a wrong checksum".into());
    }
    let src_port = u16::from_be_bytes([quote[20], quote[21]]);
    if quote[12..16] != CONTAINER || quote[16..20] != GATEWAY || ![80, 53].contains(&src_port) {
        return Err("the quote is not the container's packet to its gateway".into());
    }
    Ok(())
}

fn check_translated_to_ipv6(out: &[u8], valid_in: bool, second4: u32) -> Result<(), String> {
    if out.get(12..14) != Some(&0x86ddu16.to_be_bytes()[..]) || out.len() < ETH_LEN + 92 {
        return Err("not an IPv6 frame long enough for an ICMPv6 error".into());
    }
    let ip = &out[ETH_LEN..];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 || ip[6] != 58 || payload_len < 52 || 40 + payload_len > ip.len() {
        return Err(format!(
            "IPv6 header: version {}, next header {}, payload {payload_len} of {} bytes",
            ip[0] >> 4,
            ip[6],
            ip.len()
        ));
    }
    let (src, dst, _, _) = upper_layer(out);
    if (src, dst) != (host(), client()) {
        return Err(format!("outer addresses {src} -> {dst}"));
    }
    let icmp = &ip[40..40 + payload_len];
    let seed = super::ipv6::pseudo_sum(src, dst, 58, payload_len);
    if sums_to_zero(seed, icmp) != valid_in {
        return Err(format!(
            "ICMPv6 checksum {} while the ICMPv4 one was {}",
            if valid_in { "wrong" } else { "right" },
            if valid_in { "right" } else { "wrong" }
        ));
    }
    if !(1..=4).contains(&icmp[0]) {
        return Err(format!("ICMPv6 type {}", icmp[0]));
    }
    // Packet too big: 20 bytes more than the next-hop MTU, and no less than 1280.
    let mtu = u32::from_be_bytes(icmp[4..8].try_into().unwrap());
    if icmp[0] == 2 && mtu != ((second4 & 0xffff) + 20).max(1280) {
        return Err(format!(
            "MTU {mtu} for a next-hop MTU of {}",
            second4 & 0xffff
        ));
    }
    let quote = &icmp[8..];
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&quote[o..o + 16]).unwrap());
    if quote[0] >> 4 != 6 || (addr(8), addr(24)) != (client(), host()) {
        return Err("the quote is not the client's packet to the published address".into());
    }
    Ok(())
}

/// Hostile ICMP errors both ways through NAT64, 4000 of them (RFC 7915's translation is
/// reached by anyone on the path to a client, and by the container): from the uplink, ICMPv6
/// messages of every type and code with any MTU (0, 1, 2^32 - 1, ...: translated never
/// under what IPv6's 1280 gives, which an IPv6 host would not go under either), quoting a tracked
/// NAT64 reply (TCP or UDP), an untracked one, one with an extension header, a wrong version
/// or another protocol, cut short at any length, behind an outer extension header, with a bad
/// checksum, a payload length shorter than the frame (trailing bytes), cut short; from the
/// container, ICMPv4 messages the same way damaged, with IP options outside or in the
/// quote, fragment bits, a wrong header checksum, a total length shorter than the frame.
/// Whatever leaves translated is a sound error of the other family about the connection, its
/// checksum right exactly when the original's was; nothing else leaves changed, and what is
/// dropped is counted.
#[test]
fn random_icmp_errors_through_nat64_leave_translated_right_or_untouched() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    ipv4_only_container(dp);
    // Two connections of each protocol, their packets as they left each way.
    let (verdict, tcp_arrived) = run_tc(
        dp,
        Hook::UplinkIngress,
        &from_client(6, &tcp(40000, 8080, TCP_SYN, b"")),
    );
    assert_eq!(verdict, TC_REDIRECT);
    let (verdict, tcp_reply) = run_tc(
        dp,
        Hook::ContainerIngress,
        &from_container(6, &tcp(80, 40000, TCP_SYN | TCP_ACK, b"")),
    );
    assert_eq!(verdict, TC_REDIRECT);
    let (verdict, udp_arrived) = run_tc(
        dp,
        Hook::UplinkIngress,
        &from_client(17, &udp(40000, 5353, b"query")),
    );
    assert_eq!(verdict, TC_REDIRECT);
    let (verdict, udp_reply) = run_tc(
        dp,
        Hook::ContainerIngress,
        &from_container(17, &udp(53, 40000, b"answer")),
    );
    assert_eq!(verdict, TC_REDIRECT);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let total_drops = |dp: &Datapath| dp.drops().unwrap().iter().map(|(_, n)| n).sum::<u64>();
    let seconds = [
        0u32,
        1,
        68,
        576,
        1279,
        1280,
        1300,
        1500,
        0xffff,
        0x1_0000,
        u32::MAX,
    ];
    let (mut to_ipv4, mut to_ipv6, mut untouched, mut dropped) = (0, 0, 0, 0);
    for round in 0..4000 {
        let from_outside = round % 2 == 0;
        let kind = if next() % 4 == 0 {
            next() as u8
        } else if from_outside {
            [1u8, 2, 3, 4][(next() % 4) as usize]
        } else {
            [3u8, 11, 12][(next() % 3) as usize]
        };
        let code = if next() % 4 == 0 {
            next() as u8
        } else {
            (next() % 6) as u8
        };
        let second = if next() % 4 == 0 {
            next() as u32
        } else {
            seconds[(next() % seconds.len() as u64) as usize]
        };
        // The quote, and whether it is one NAT64 translates (a tracked packet's headers in
        // full, up to its ports).
        let tracked = if from_outside {
            [&tcp_reply, &udp_reply]
        } else {
            [&tcp_arrived, &udp_arrived]
        }[(next() % 2) as usize];
        let mut quote = tracked[ETH_LEN..].to_vec();
        let fixed = if from_outside { 40 } else { 20 };
        let mut translatable = true;
        match next() % 8 {
            // Another client port: no connection.
            0 => {
                quote[fixed + 1] ^= 0x5a;
                translatable = false;
            }
            // A wrong version.
            1 => {
                quote[0] = (quote[0] & 0x0f) | ((next() as u8 % 16) << 4);
                translatable &= quote[0] >> 4 == if from_outside { 6 } else { 4 };
            }
            // Another protocol.
            2 => {
                let protocol = next() as u8;
                quote[if from_outside { 6 } else { 9 }] = protocol;
                translatable &= protocol == quote_protocol(tracked, from_outside);
            }
            // A quoted extension header (hop-by-hop options) or IP options (4 NOPs).
            3 => {
                if from_outside {
                    let (src, dst, protocol, l4) = upper_layer(tracked);
                    let spec = Ipv6Spec::new(src, dst, protocol).with(0);
                    quote = ipv6_frame(&spec, &tracked[l4.unwrap()..])[ETH_LEN..].to_vec();
                } else {
                    let mut spec = Ipv4Spec::new(GATEWAY, CONTAINER, quote[9]);
                    spec.options = vec![1, 1, 1, 1];
                    quote = ipv4_frame(&spec, &tracked[ETH_LEN + 20..])[ETH_LEN..].to_vec();
                }
                translatable = false;
            }
            _ => {}
        }
        if next() % 3 == 0 {
            let keep = (next() % (quote.len() as u64 + 1)) as usize;
            quote.truncate(keep);
            translatable &= keep >= fixed + 4;
        }
        let mut message = vec![kind, code, 0, 0];
        message.extend_from_slice(&second.to_be_bytes());
        message.extend_from_slice(&quote);
        translatable &= if from_outside {
            (kind == 1 && code <= 4) || kind == 2 || kind == 3 || (kind, code) == (4, 1)
        } else {
            kind == 11 || (kind == 3 && code <= 15)
        };
        let mut input = if from_outside {
            let mut spec = Ipv6Spec::new(v6("2001:db8:ff::1"), host(), 58);
            if next() % 10 == 0 {
                spec = spec.with(0);
                translatable = false;
            }
            ipv6_frame(&spec, &message)
        } else {
            let mut spec = Ipv4Spec::new(CONTAINER, GATEWAY, 1);
            if next() % 10 == 0 {
                spec.options = vec![1, 1, 1, 0];
                translatable = false;
            }
            ipv4_frame(&spec, &message)
        };
        // Damage to the outer packet.
        let l3 = ETH_LEN;
        let header = if from_outside { 40 } else { 20 };
        match next() % 10 {
            // A bad message checksum.
            0 => {
                let at = input.len() - message.len() + 2;
                input[at] ^= 1 << (next() % 8);
            }
            // A length field shorter than the frame: the bytes past it are no part of it.
            1 => {
                let real = input.len() - ETH_LEN - header;
                let claimed = (next() % (real as u64 + 1)) as u16;
                if from_outside {
                    input[l3 + 4..l3 + 6].copy_from_slice(&claimed.to_be_bytes());
                } else {
                    let total = claimed + header as u16;
                    input[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
                    fix_ip_checksum(&mut input);
                }
            }
            // Padding after the packet.
            2 => input.extend_from_slice(&[0xa5; 13]),
            // Cut short: the length fields claim more than there is.
            3 => {
                let keep = ETH_LEN + header + (next() as usize % (input.len() - ETH_LEN - header));
                input.truncate(keep);
                translatable = false;
            }
            // IPv4 only: a fragment, or a wrong header checksum.
            4 if !from_outside => {
                input[l3 + 6] |= 0x20;
                fix_ip_checksum(&mut input);
                translatable = false;
            }
            5 if !from_outside => input[l3 + 10] ^= 0x10,
            _ => {}
        }
        // The message's length as its header claims it; whether that covers what NAT64
        // rewrites (the ICMP header, the quoted header, the ports) and the message's checksum
        // is right over it (and, for IPv4, its header's): what a receiver checks.
        let (ihl, claimed) = if from_outside {
            (
                40,
                usize::from(u16::from_be_bytes([input[l3 + 4], input[l3 + 5]])),
            )
        } else {
            let ihl = usize::from(input[l3] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([input[l3 + 2], input[l3 + 3]]));
            (ihl, total.saturating_sub(ihl))
        };
        translatable &= claimed >= 8 + fixed + 4 && ETH_LEN + ihl + claimed <= input.len();
        let message_at = l3 + ihl;
        let valid_in = ETH_LEN + ihl + claimed <= input.len()
            && if from_outside {
                let addr = |o: usize| {
                    Ipv6Addr::from(<[u8; 16]>::try_from(&input[l3 + o..l3 + o + 16]).unwrap())
                };
                let seed = super::ipv6::pseudo_sum(addr(8), addr(24), 58, claimed);
                sums_to_zero(seed, &input[message_at..message_at + claimed])
            } else {
                sums_to_zero(0, &input[l3..l3 + ihl])
                    && sums_to_zero(0, &input[message_at..message_at + claimed])
            };
        let hook = if from_outside {
            Hook::UplinkIngress
        } else {
            Hook::ContainerIngress
        };
        let drops_before = total_drops(dp);
        let (verdict, out) = run_tc(dp, hook, &input);
        let what = format!("{hook:?} round {round}: {input:02x?}");
        assert!(
            [TC_PASS, TC_SHOT, TC_REDIRECT].contains(&verdict),
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
        if out.get(ETH_LEN..) == input.get(ETH_LEN..) {
            untouched += 1;
            continue;
        }
        assert!(
            translatable,
            "changed, but no error NAT64 translates: {what}"
        );
        assert_eq!(verdict, TC_REDIRECT, "translated, not redirected: {what}");
        let checked = if from_outside {
            to_ipv4 += 1;
            check_translated_to_ipv4(&out, valid_in, second)
        } else {
            to_ipv6 += 1;
            check_translated_to_ipv6(&out, valid_in, second)
        };
        if let Err(wrong) = checked {
            panic!("{wrong}: {what}\n out {out:02x?}");
        }
    }
    eprintln!(
        "NAT64 ICMP errors: {to_ipv4} to IPv4, {to_ipv6} to IPv6, {untouched} untouched, \
         {dropped} dropped"
    );
    assert!(to_ipv4 > 100 && to_ipv6 > 100 && untouched > 500);
}

/// The protocol of the packet `frame` (as it left) carries.
fn quote_protocol(frame: &[u8], ipv6: bool) -> u8 {
    frame[ETH_LEN + if ipv6 { 6 } else { 9 }]
}

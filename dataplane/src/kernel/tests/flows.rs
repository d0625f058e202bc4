//! Packet tests of what the programs report: the ICMP type and code of flow events (an echo's
//! request and its answer, dropped messages of any type), and the per-packet TCP flag
//! counters (Hubble's SYN, SYN-ACK, FIN, RST), each packet counted once even where it
//! crosses two hooks.

use aya::programs::{TestRun, TestRunOptions};
use dataplane_common::{
    Config, DropReason, EndpointInfo, FlowEvent, PrefixKey, flow_kind, tcp_flag_count,
};

use super::{
    packet::{
        Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, icmp_echo, icmp_error, ipv4_frame, tcp_seq,
    },
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
    translation::{
        CLIENT, HOST, SERVER, TC_REDIRECT, WEB1, WEB2, be, delivered, drops, host, ip4, pass,
    },
};
use crate::{
    flows::decode,
    kernel::{Datapath, Hook, TcpFlagTotals},
};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// A container on another network than web1's: Docker's isolation keeps them apart.
const OTHER_NET: [u8; 4] = [172, 30, 2, 2];
/// An outside source on the deny list.
const DENIED: [u8; 4] = [203, 0, 113, 9];

/// Every event the programs wrote so far (the ring can be taken once per datapath).
pub(super) fn events(dp: &mut Datapath) -> Vec<FlowEvent> {
    let mut ring = dp.take_flow_events().unwrap();
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(decode::copy_event(&item).unwrap());
    }
    events
}

/// Runs `hook` on `frame` as if it had come in on interface `ingress_ifindex` (the kernel's
/// `skb_iif`, which the uplink's egress looks at), through BPF_PROG_TEST_RUN's context.
fn run_tc_from(dp: &mut Datapath, hook: Hook, frame: &[u8], ingress_ifindex: u32) -> u32 {
    // struct __sk_buff (192 bytes); ingress_ifindex is the u32 at offset 36, every other
    // field zero (the kernel refuses a context with fields it does not take).
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let result = dp
        .classifier(hook)
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    assert_checksums(&out);
    result.return_value
}

#[test]
fn icmp_type_and_code_reach_the_flow_events() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    dp.set::<crate::kernel::maps::Endpoints>(
        be(OTHER_NET),
        EndpointInfo {
            ifindex: 7,
            network_id: 2,
            endpoint_id: 7,
            mac: [2, 0, 0, 0, 0, 7],
            ..Default::default()
        },
    )
    .unwrap();
    dp.set_deny_source(
        PrefixKey {
            prefix_len: 32,
            addr: be(DENIED),
        },
        true,
    )
    .unwrap();
    let config = Config {
        deny_at_tc: 1,
        ..dp.config().unwrap()
    };
    dp.set_config(config).unwrap();

    // web2 pings an outside server (masquerade), which answers.
    let ping = ipv4_frame(&Ipv4Spec::new(WEB2, SERVER, 1), &icmp_echo(8, 0x1234, 1));
    let (_, _, id, _) = pass(dp, Hook::UplinkEgress, &ping);
    let pong = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 1), &icmp_echo(0, id, 1));
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &pong),
        (ip4(SERVER), ip4(WEB2), 0x1234, 0x1234)
    );
    // The second round of the same ping is the same connection: no more events.
    let ping2 = ipv4_frame(&Ipv4Spec::new(WEB2, SERVER, 1), &icmp_echo(8, 0x1234, 2));
    pass(dp, Hook::UplinkEgress, &ping2);
    let pong2 = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 1), &icmp_echo(0, id, 2));
    delivered(dp, Hook::UplinkIngress, &pong2);
    // web1 pings a container of another network: isolation drops it.
    let across = ipv4_frame(&Ipv4Spec::new(WEB1, OTHER_NET, 1), &icmp_echo(8, 0x4321, 1));
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &across).0, TC_SHOT);
    // A denied source sends a host-unreachable (about some packet of the host's).
    let quoted = ipv4_frame(
        &Ipv4Spec::new(HOST, DENIED, 6),
        &tcp_seq(40000, 443, TCP_SYN, 1, 0),
    );
    let unreachable = ipv4_frame(&Ipv4Spec::new(DENIED, HOST, 1), &icmp_error(3, 1, &quoted));
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &unreachable).0, TC_SHOT);
    assert_eq!(drops(dp, DropReason::PolicyDenied), 1);
    assert_eq!(drops(dp, DropReason::PolicyDeny), 1);

    let seen: Vec<(u8, u8, u8, u8)> = events(dp)
        .iter()
        .map(|e| (e.kind, e.tuple.proto, e.icmp_type, e.icmp_code))
        .collect();
    assert_eq!(
        seen,
        [
            (flow_kind::NEW, 1, 8, 0),
            (flow_kind::REPLY, 1, 0, 0),
            (flow_kind::DROP, 1, 8, 0),
            (flow_kind::DROP, 1, 3, 1),
        ],
        "(kind, protocol, ICMP type, code) of every event"
    );
}

#[test]
fn the_reply_event_carries_the_answer_and_its_way_back() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // Container to container: tracked at web1's veth, answered at web2's.
    let ping = ipv4_frame(&Ipv4Spec::new(WEB1, WEB2, 1), &icmp_echo(8, 0x0777, 1));
    delivered(dp, Hook::ContainerIngress, &ping);
    let pong = ipv4_frame(&Ipv4Spec::new(WEB2, WEB1, 1), &icmp_echo(0, 0x0777, 1));
    delivered(dp, Hook::ContainerIngress, &pong);
    let events = events(dp);
    assert_eq!(events.len(), 2, "{events:?}");
    let reply = decode::from_raw(&events[1]).unwrap();
    assert_eq!(reply.kind, decode::Kind::Reply);
    assert_eq!(
        (reply.tuple.saddr, reply.tuple.daddr, reply.tuple.sport),
        (
            std::net::IpAddr::from(ip4(WEB2)),
            std::net::IpAddr::from(ip4(WEB1)),
            0x0777
        ),
        "the answer's own tuple"
    );
    assert_eq!((reply.icmp.icmp_type, reply.icmp.code), (0, 0));
    assert_eq!(
        reply.counters.packets, 1,
        "the answering direction's counters"
    );
}

/// A test datapath's flag counters at one counting point.
fn at(dp: &Datapath, point: u32) -> TcpFlagTotals {
    dp.tcp_flags_at(point).unwrap()
}

/// [SYN, SYN-ACK, FIN, RST]
const NONE: TcpFlagTotals = [0, 0, 0, 0];

#[test]
fn tcp_flags_are_counted_per_packet_once_each() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // A published port: the client's packets counted where they arrive, web1's where they
    // leave it.
    let from_client = |flags, seq, ack| {
        ipv4_frame(
            &Ipv4Spec::new(CLIENT, HOST, 6),
            &tcp_seq(41000, 8080, flags, seq, ack),
        )
    };
    let from_web1 = |flags, seq, ack| {
        ipv4_frame(
            &Ipv4Spec::new(WEB1, CLIENT, 6),
            &tcp_seq(80, 41000, flags, seq, ack),
        )
    };
    delivered(dp, Hook::UplinkIngress, &from_client(TCP_SYN, 100, 0));
    // The client retransmits its SYN: another packet, counted again (Hubble counts packets).
    delivered(dp, Hook::UplinkIngress, &from_client(TCP_SYN, 100, 0));
    let synack = from_web1(TCP_SYN | TCP_ACK, 5000, 101);
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &synack).0, TC_REDIRECT);
    delivered(dp, Hook::UplinkIngress, &from_client(TCP_ACK, 101, 5001));
    delivered(
        dp,
        Hook::UplinkIngress,
        &from_client(TCP_ACK | 0x08, 101, 5001),
    );
    delivered(
        dp,
        Hook::UplinkIngress,
        &from_client(TCP_FIN | TCP_ACK, 102, 5001),
    );
    let fin = from_web1(TCP_FIN | TCP_ACK, 5001, 103);
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &fin).0, TC_REDIRECT);
    delivered(dp, Hook::UplinkIngress, &from_client(TCP_RST, 103, 0));
    assert_eq!(
        at(dp, tcp_flag_count::FROM_OUTSIDE),
        [2, 0, 1, 1],
        "from outside: two SYNs, a FIN and a RST; ACK and PSH alone count nothing"
    );
    assert_eq!(
        at(dp, tcp_flag_count::FROM_CONTAINER),
        [0, 1, 1, 0],
        "from web1: the SYN-ACK and a FIN"
    );

    // Masquerade: web2's SYN crosses its veth's hook and then the uplink's egress, coming in
    // on the bridge (skb_iif 3 here): counted once, at the veth.
    let out = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp_seq(42000, 443, TCP_SYN, 1, 0),
    );
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &out).0, TC_PASS);
    assert_eq!(run_tc_from(dp, Hook::UplinkEgress, &out, 3), TC_PASS);
    assert_eq!(at(dp, tcp_flag_count::FROM_CONTAINER), [1, 1, 1, 0]);
    assert_eq!(at(dp, tcp_flag_count::FROM_HOST), NONE);
    // The host's own SYN (no ingress interface) is counted at the uplink's egress.
    let own = ipv4_frame(
        &Ipv4Spec::new(HOST, SERVER, 6),
        &tcp_seq(43000, 443, TCP_SYN, 1, 0),
    );
    assert_eq!(run_tc_from(dp, Hook::UplinkEgress, &own, 0), TC_PASS);
    assert_eq!(at(dp, tcp_flag_count::FROM_HOST), [1, 0, 0, 0]);

    // A container's packets to the host itself are not counted (the host's to it cross no
    // hook of ours), nor are dropped packets (Hubble counts forwarded flows).
    let to_host = ipv4_frame(
        &Ipv4Spec::new(WEB1, HOST, 6),
        &tcp_seq(44000, 22, TCP_SYN, 1, 0),
    );
    assert_eq!(run_tc(dp, Hook::ContainerIngress, &to_host).0, TC_PASS);
    let synfin = ipv4_frame(
        &Ipv4Spec::new(CLIENT, HOST, 6),
        &tcp_seq(45000, 8080, TCP_SYN | TCP_FIN, 1, 0),
    );
    assert_eq!(run_tc(dp, Hook::UplinkIngress, &synfin).0, TC_SHOT);
    assert_eq!(at(dp, tcp_flag_count::FROM_CONTAINER), [1, 1, 1, 0]);
    assert_eq!(at(dp, tcp_flag_count::FROM_OUTSIDE), [2, 0, 1, 1]);

    // Summed over the points, since this datapath was loaded: what the metric shows.
    assert_eq!(dp.tcp_flags(false).unwrap(), [4, 1, 2, 1]);
}

//! Packet tests of masquerade's choice of source port, as Linux's nf_nat makes it: the
//! container's own port when the tuple it makes is free; on a collision (another connection,
//! a socket of the host's) a port probed in the configured range; a closed connection's tuple
//! reserved for the original tuple that owned it (the far end may hold it in TIME_WAIT); a
//! connection of the host's own on a tuple one of ours holds translated itself. Each case
//! checks the verdict, the rewritten tuple and every checksum, and the replies reversed.

use std::net::{Ipv4Addr, TcpListener};

use dataplane_common::{DropReason, ct_origin, ct_rewrite};

use super::{
    packet::{Ipv4Spec, TCP_ACK, TCP_SYN, assert_checksums, ipv4_frame, tcp, tuple, udp},
    programs::{TC_PASS, TC_SHOT, loaded_or_skip, run_tc},
    translation::{HOST, SERVER, WEB1, WEB2, ct, delivered, drops, host, ip4, pass},
};
use crate::kernel::{Datapath, Hook};

const TCP_FIN: u8 = 0x01;
/// The range `translation::host` configures.
const SNAT_RANGE: (u16, u16) = (20000, 32767);

fn syn(from: [u8; 4], sport: u16) -> Vec<u8> {
    ipv4_frame(
        &Ipv4Spec::new(from, SERVER, 6),
        &tcp(sport, 443, TCP_SYN, b""),
    )
}

/// The server's answer to the host's `port`, as it arrives at the uplink.
fn answer(port: u16, flags: u8) -> Vec<u8> {
    ipv4_frame(
        &Ipv4Spec::new(SERVER, HOST, 6),
        &tcp(443, port, flags, b"answer"),
    )
}

/// Closes the masqueraded connection `from`:`sport` (left as the host's `port`) both ways.
fn close(dp: &mut Datapath, from: [u8; 4], sport: u16, port: u16) {
    let fin = ipv4_frame(
        &Ipv4Spec::new(from, SERVER, 6),
        &tcp(sport, 443, TCP_ACK | TCP_FIN, b""),
    );
    assert_eq!(pass(dp, Hook::UplinkEgress, &fin).2, port);
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &answer(port, TCP_ACK | TCP_FIN)),
        (ip4(SERVER), ip4(from), 443, sport)
    );
}

fn in_range(port: u16) -> bool {
    (SNAT_RANGE.0..=SNAT_RANGE.1).contains(&port)
}

#[test]
fn the_containers_own_port_is_kept_when_its_tuple_is_free() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // TCP, UDP and ICMP echo: the port (identifier) the container chose, outside the probed
    // range, kept; only the address is the host's.
    assert_eq!(
        pass(dp, Hook::UplinkEgress, &syn(WEB1, 45678)),
        (ip4(HOST), ip4(SERVER), 45678, 443)
    );
    let dns = ipv4_frame(&Ipv4Spec::new(WEB1, SERVER, 17), &udp(41000, 53, b"q"));
    assert_eq!(
        pass(dp, Hook::UplinkEgress, &dns),
        (ip4(HOST), ip4(SERVER), 41000, 53)
    );
    // The replies reversed: to the container and its port, checksums valid.
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &answer(45678, TCP_SYN | TCP_ACK)),
        (ip4(SERVER), ip4(WEB1), 443, 45678)
    );
    let reply = ipv4_frame(&Ipv4Spec::new(SERVER, HOST, 17), &udp(53, 41000, b"a"));
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &reply),
        (ip4(SERVER), ip4(WEB1), 53, 41000)
    );
    // The entries say the translation: source to host:45678, back to web1:45678.
    let entries = ct(dp);
    let forward = entries
        .iter()
        .find(|(k, e)| k.proto == 6 && e.is_reply == 0)
        .unwrap()
        .1;
    assert_eq!(
        (forward.origin, forward.rewrite, forward.nat_port),
        (ct_origin::MASQUERADE, ct_rewrite::SRC, 45678u16.to_be())
    );
}

#[test]
fn a_collision_is_probed_to_another_port_in_the_range() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    assert_eq!(pass(dp, Hook::UplinkEgress, &syn(WEB1, 45678)).2, 45678);
    // web2 uses the same port towards the same server: its tuple is web1's.
    let (src, dst, port, dport) = pass(dp, Hook::UplinkEgress, &syn(WEB2, 45678));
    assert_eq!((src, dst, dport), (ip4(HOST), ip4(SERVER), 443));
    assert!(in_range(port), "{port} probed in the masquerade range");
    // Towards another server the same port is a different tuple: kept.
    let elsewhere = ipv4_frame(
        &Ipv4Spec::new(WEB2, [198, 51, 100, 8], 6),
        &tcp(45678, 443, TCP_SYN, b""),
    );
    assert_eq!(pass(dp, Hook::UplinkEgress, &elsewhere).2, 45678);
    // Each reply back to its own container and port.
    for (port, container) in [(45678, WEB1), (port, WEB2)] {
        assert_eq!(
            delivered(dp, Hook::UplinkIngress, &answer(port, TCP_SYN | TCP_ACK)),
            (ip4(SERVER), ip4(container), 443, 45678)
        );
    }
    // The connection keeps its port for its later packets.
    let data = ipv4_frame(
        &Ipv4Spec::new(WEB2, SERVER, 6),
        &tcp(45678, 443, TCP_ACK, b"hello"),
    );
    let (verdict, out) = run_tc(dp, Hook::UplinkEgress, &data);
    assert_eq!(verdict, TC_PASS);
    assert_checksums(&out);
    assert_eq!(tuple(&out).2, port);
    assert!(out.ends_with(b"hello"));
}

#[test]
fn a_port_a_socket_of_the_host_holds_is_not_kept() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // A real listening socket of this namespace (the test's, where BPF_PROG_TEST_RUN runs the
    // program): the server's answer to it would go to the host's socket, so a container using
    // that port as its source gets another one. No packet is sent to it.
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let taken = listener.local_addr().unwrap().port();
    let (src, _, port, _) = pass(dp, Hook::UplinkEgress, &syn(WEB1, taken));
    assert_eq!(src, ip4(HOST));
    assert!(
        port != taken && in_range(port),
        "{port}: probed, not the host's {taken}"
    );
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &answer(port, TCP_SYN | TCP_ACK)),
        (ip4(SERVER), ip4(WEB1), 443, taken)
    );
    drop(listener);
}

#[test]
fn a_host_connection_on_a_kept_tuple_is_translated_itself() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    assert_eq!(pass(dp, Hook::UplinkEgress, &syn(WEB1, 45678)).2, 45678);
    // The host's own connect() chose the same port towards the same server (it cannot know of
    // ours): its connection leaves from a probed port instead, and its answers come back to
    // its own port, on to the host's stack (not into a container).
    let (src, _, port, _) = pass(dp, Hook::UplinkEgress, &syn(HOST, 45678));
    assert_eq!(src, ip4(HOST));
    assert!(in_range(port), "{port}");
    let (verdict, out) = run_tc(dp, Hook::UplinkIngress, &answer(port, TCP_SYN | TCP_ACK));
    assert_eq!(verdict, TC_PASS, "to the host's stack");
    assert_checksums(&out);
    assert_eq!(tuple(&out), (ip4(SERVER), ip4(HOST), 443, 45678));
    // web1's answers still reach web1.
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &answer(45678, TCP_SYN | TCP_ACK)),
        (ip4(SERVER), ip4(WEB1), 443, 45678)
    );
    // The host's other connections are neither translated nor tracked.
    let before = ct(dp).len();
    let own = syn(HOST, 45679);
    let (verdict, out) = run_tc(dp, Hook::UplinkEgress, &own);
    assert_eq!((verdict, &out), (TC_PASS, &own));
    assert_eq!(ct(dp).len(), before);
}

#[test]
fn a_closed_tuple_is_reserved_for_the_original_tuple_that_owned_it() {
    let mut t = loaded_or_skip!();
    let dp = t.get();
    host(dp);
    // One port to probe, so that where a connection may go is plain to see.
    let mut config = dp.config().unwrap();
    config.snat_port_min = 30000;
    config.snat_port_max = 30000;
    dp.set_config(config).unwrap();
    // web1:45678 keeps its port, and closes both ways; its entries stay for the closing
    // timeout, and the server may hold host:45678 in TIME_WAIT.
    assert_eq!(pass(dp, Hook::UplinkEgress, &syn(WEB1, 45678)).2, 45678);
    close(dp, WEB1, 45678, 45678);
    // web2 using the same port must not get the closed tuple: the server would take its SYN
    // for the old connection's. It gets the range's port.
    assert_eq!(pass(dp, Hook::UplinkEgress, &syn(WEB2, 45678)).2, 30000);
    // web1 reusing its own port (the same original tuple) gets its tuple back.
    assert_eq!(pass(dp, Hook::UplinkEgress, &syn(WEB1, 45678)).2, 45678);
    assert_eq!(
        delivered(dp, Hook::UplinkIngress, &answer(45678, TCP_SYN | TCP_ACK)),
        (ip4(SERVER), ip4(WEB1), 443, 45678)
    );
    // web2's connection closes; its tuple (host:30000) is now reserved for web2:45678. A
    // connection whose own port is 30000 collides with it, and the one port to probe is the
    // same reserved tuple: no mapping, rather than a tuple the server may hold.
    close(dp, WEB2, 45678, 30000);
    let (verdict, _) = run_tc(dp, Hook::UplinkEgress, &syn(WEB1, 30000));
    assert_eq!(verdict, TC_SHOT);
    assert_eq!(drops(dp, DropReason::NoMappingForNatMasquerade), 1);
    // web2's own reuse gets it back.
    assert_eq!(pass(dp, Hook::UplinkEgress, &syn(WEB2, 45678)).2, 30000);
}

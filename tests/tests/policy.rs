//! Isolation and policy on a namespaced host: a reachability matrix that behaves like Docker
//! (networks apart, a two-network container, internal and icc=false networks, the outside
//! client, published ports), then user rules applied while connections are open, and the XDP
//! deny list for outside sources.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use dataplane_tests::{Agent, Sandbox, StatusExt as _, attached_programs, has_program, in_netns};

const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
  - {name: back, bridge: br-back, subnet: 172.30.2.0/24, gateway: 172.30.2.1}
  - {name: vault, bridge: br-vault, subnet: 172.30.3.0/24, gateway: 172.30.3.1, internal: true}
  - {name: quiet, bridge: br-quiet, subnet: 172.30.4.0/24, gateway: 172.30.4.1, icc: false}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    labels: {app: client}
    interfaces: [{network: front, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
  - name: db
    interfaces: [{network: back, ip: 172.30.2.2, mac: "02:42:ac:1e:02:02", host_veth: veth-db}]
  - name: both
    interfaces:
      - {network: front, ip: 172.30.1.4, mac: "02:42:ac:1e:01:04", host_veth: veth-both1}
      - {network: back, ip: 172.30.2.4, mac: "02:42:ac:1e:02:04", host_veth: veth-both2}
  - name: secret
    interfaces: [{network: vault, ip: 172.30.3.2, mac: "02:42:ac:1e:03:02", host_veth: veth-secret}]
  - name: secret2
    interfaces: [{network: vault, ip: 172.30.3.3, mac: "02:42:ac:1e:03:03", host_veth: veth-secret2}]
  - name: q1
    interfaces: [{network: quiet, ip: 172.30.4.2, mac: "02:42:ac:1e:04:02", host_veth: veth-q1}]
  - name: q2
    interfaces: [{network: quiet, ip: 172.30.4.3, mac: "02:42:ac:1e:04:03", host_veth: veth-q2}]
services:
  - {name: web, vip: 10.96.0.20, port: 80, selector: {app: web}}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: q1, protocol: tcp, host_port: 8081, container_port: 80}
  - {endpoint: secret, protocol: tcp, host_port: 8082, container_port: 80}
"#;

const HOST: &str = "192.0.2.1";
const OUTSIDE: &str = "192.0.2.2";

/// A route on the outside client to every test network through the host, as a router in
/// front of the host would have.
fn route_outside_to_containers(sandbox: &Sandbox) {
    sandbox.exec_ok(
        "outside",
        &["ip", "route", "add", "172.30.0.0/16", "via", HOST],
    );
}

/// Whether a TCP connection from `from` to `addr`:`port` is answered by a server.
fn reaches(sandbox: &Sandbox, from: &str, addr: &str, port: u16) -> bool {
    let out = sandbox.exec(from, &["nc", "-w2", addr, &port.to_string()]);
    out.status.success() && !out.stdout.is_empty()
}

/// The cells of a reachability matrix (what, from, address, port, expected) whose outcome is
/// not the expected one, tried in parallel, each as "what: expected X, got Y".
fn unexpected(sandbox: &Sandbox, cells: &[(&str, &str, &str, u16, bool)]) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = cells
            .iter()
            .map(|(what, from, addr, port, expected)| {
                scope.spawn(move || {
                    let got = reaches(sandbox, from, addr, *port);
                    (got != *expected).then(|| format!("{what}: expected {expected}, got {got}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    })
}

#[test]
fn reachability_matrix_behaves_like_docker() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside("9999", None);
    // Give the outside client a route to the containers, to show it still cannot use it.
    route_outside_to_containers(&sandbox);

    let cells: Vec<(&str, &str, &str, u16, bool)> = vec![
        ("same network", "web2", "172.30.1.2", 80, true),
        ("other network", "web1", "172.30.2.2", 80, false),
        ("other network, back", "db", "172.30.1.2", 80, false),
        (
            "two-network container to front",
            "both",
            "172.30.1.2",
            80,
            true,
        ),
        (
            "two-network container to back",
            "both",
            "172.30.2.2",
            80,
            true,
        ),
        ("to the two-network container", "db", "172.30.2.4", 80, true),
        ("internal network out", "secret", OUTSIDE, 9999, false),
        (
            "icc=false inside its network",
            "q1",
            "172.30.4.3",
            80,
            false,
        ),
        ("icc=false out", "q1", OUTSIDE, 9999, true),
        ("icc=false to a published port", "q2", HOST, 8081, true),
        ("container out (masquerade)", "web1", OUTSIDE, 9999, true),
        ("outside to a published port", "outside", HOST, 8080, true),
        (
            "outside to a published port, icc=false",
            "outside",
            HOST,
            8081,
            true,
        ),
        (
            "outside to a published port, internal",
            "outside",
            HOST,
            8082,
            false,
        ),
        (
            "outside routed to a container address",
            "outside",
            "172.30.1.2",
            80,
            false,
        ),
        ("other network to a published port", "db", HOST, 8080, true),
        ("same network to a VIP", "web2", "10.96.0.20", 80, true),
        ("other network to a VIP", "db", "10.96.0.20", 80, false),
        (
            "inside an internal network",
            "secret",
            "172.30.3.3",
            80,
            true,
        ),
        (
            "internal to another network's published port",
            "secret",
            HOST,
            8080,
            false,
        ),
        (
            "internal to a published port through its gateway",
            "secret",
            "172.30.3.1",
            8080,
            false,
        ),
        (
            "internal to a published port through another gateway",
            "secret",
            "172.30.1.1",
            8080,
            false,
        ),
        (
            "internal to a VIP of another network",
            "secret",
            "10.96.0.20",
            80,
            false,
        ),
    ];
    let wrong = unexpected(&sandbox, &cells);
    assert!(
        wrong.is_empty(),
        "reachability differs from Docker's:\n{}",
        wrong.join("\n")
    );
    let status = agent.status();
    assert!(
        status.drops("POLICY_DENIED") >= 11,
        "every denial counted: {status:#?}"
    );
}

/// A container of an internal network reaching another network's container through a
/// published port of the host: refused as Docker refuses it, counted as isolation's drop
/// (POLICY_DENIED) and logged as a DROPPED flow that says so.
/// One of the network namespace's IP or ICMP counters (/proc/net/snmp, e.g. `Ip`
/// `InUnknownProtos`) in the namespace of `target`.
fn snmp(sandbox: &Sandbox, target: &str, group: &str, field: &str) -> u64 {
    let text = sandbox.exec_ok(target, &["cat", "/proc/net/snmp"]);
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names.split_whitespace().position(|n| n == field).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// What conntrack does not follow is isolated as Docker's FORWARD chain isolates every
/// protocol: raw IP of a protocol nothing handles (253, for experiments) and ICMP timestamp
/// requests (hping3), counted where they would arrive.
#[test]
fn other_protocols_and_icmp_types_are_isolated_too() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    route_outside_to_containers(&sandbox);
    let cases = [
        ("same network", "web1", "web2", "172.30.1.3", true),
        ("other network", "web1", "db", "172.30.2.2", false),
        ("icc off", "q1", "q2", "172.30.4.3", false),
        (
            "outside to a container address",
            "outside",
            "web1",
            "172.30.1.2",
            false,
        ),
    ];
    let before = agent.status().drops("POLICY_DENIED");
    let mut wrong = Vec::new();
    for (what, from, to, addr, arrives) in cases {
        for (kind, args, group, field) in [
            ("IP protocol 253", "--rawip -H 253", "Ip", "InUnknownProtos"),
            ("ICMP timestamp", "--icmp -C 13", "Icmp", "InTimestamps"),
        ] {
            let was = snmp(&sandbox, to, group, field);
            let mut cmd = vec!["hping3", "-q", "-c", "3", "-i", "u20000"];
            cmd.extend(args.split(' '));
            cmd.push(addr);
            sandbox.exec(from, &cmd);
            let got = snmp(&sandbox, to, group, field) - was;
            if (got >= 3) != arrives {
                wrong.push(format!("{kind}, {what}: {got} of 3 arrived"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", agent.log_text());
    // 3 cases refused, 2 kinds, 3 packets each: each counted as Docker's isolation.
    assert!(agent.status().drops("POLICY_DENIED") - before >= 18);
}

#[test]
fn an_internal_network_reaches_no_container_through_published_ports() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    assert!(
        reaches(&sandbox, "web2", HOST, 8080),
        "the port itself works"
    );
    let before = agent.status().drops("POLICY_DENIED");
    assert!(!reaches(&sandbox, "secret", HOST, 8080));
    agent.wait_for("the drop counted", |s| s.drops("POLICY_DENIED") > before);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = std::process::Command::new(dataplane_tests::dataplane_bin())
            .args(["observe", "-o", "json", "--verdict", "DROPPED", "--socket"])
            .arg(&agent.socket)
            .output()
            .expect("running dataplane observe");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let found = text.lines().any(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let flow = &record["flow"];
            flow["IP"]["source"] == "172.30.3.2"
                && flow["IP"]["destination"] == HOST
                && flow["l4"]["TCP"]["destination_port"] == 8080
                && flow["drop_reason_desc"] == "POLICY_DENIED"
                && flow["drop_reason"] == 133
        });
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no DROPPED record of secret to {HOST}:8080:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A keep-alive HTTP connection from `from` to `addr`.
fn keep_alive(sandbox: &Sandbox, from: &str, addr: &'static str) -> TcpStream {
    let stream = in_netns(&sandbox.netns(from), move || {
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
    })
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream
}

fn get(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn rules_apply_to_new_and_open_connections() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let mut open = keep_alive(&sandbox, "web2", "172.30.1.2:80");
    assert!(get(&mut open).unwrap().contains("web1"));

    // DOCKER-USER-like rules: web2 (by label) may not reach web1's port 80; db may reach web1
    // across networks after all.
    let rules = format!(
        "{SPEC}policies:\n  - {{name: no-client, action: deny, from: {{labels: {{app: client}}}}, to: {{endpoint: web1}}, ports: [\"80/tcp\"]}}\n  - {{name: db-to-web, action: allow, from: {{endpoint: db}}, to: {{network: front}}}}\n"
    );
    sandbox.write_state(&rules);
    agent.wait_for("rules applied", |s| {
        s.last_error.is_none() && s.find_map_entries("dp_ct_v2").is_some()
    });
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !reaches(&sandbox, "web2", "172.30.1.2", 80),
        "new connections denied"
    );
    assert!(
        reaches(&sandbox, "db", "172.30.1.2", 80),
        "an allow rule opens a path"
    );
    // Documented choice: a connection the new rules deny is cut too (judged again on its
    // next packet).
    assert!(get(&mut open).is_err(), "the open connection is cut");
    // Denied by a rule: Cilium's POLICY_DENY (POLICY_DENIED is the default deny).
    let status = agent.wait_for("denials counted", |s| {
        s.drops("POLICY_DENY") + s.drops("POLICY_DENIED") >= 2
    });
    assert!(status.last_error.is_none(), "{status:#?}");
}

#[test]
fn denied_outside_sources_drop_early() {
    // The sandbox's uplink is a veth: `--xdp auto` keeps XDP off it (the socket buffer
    // already exists there, and XDP would turn GRO off) and drops the deny list at tc ingress.
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    assert!(reaches(&sandbox, "outside", HOST, 8080));
    let host = sandbox.netns("host");
    sandbox.write_state(&format!(
        "{SPEC}policies:\n  - {{name: blocklist, action: deny, from: {{cidr: 192.0.2.2/32}}}}\n"
    ));
    let status = agent.wait_for("denials counted", |s| {
        // The deny list is user rules: Cilium's POLICY_DENY.
        !reaches(&sandbox, "outside", HOST, 8080) && s.drops("POLICY_DENY") > 0
    });
    assert!(status.last_error.is_none());
    assert!(
        !has_program(&attached_programs(&host, "eth0"), "dp_uplink_xdp"),
        "no XDP on a veth uplink"
    );
    // The list empties: the outside client is back.
    sandbox.write_state(SPEC);
    agent.wait_for("outside client back", |_| {
        reaches(&sandbox, "outside", HOST, 8080)
    });
}

const GATEWAY_MODES: &str = r#"
uplink: eth0
networks:
  - {name: nat, bridge: br-nat, subnet: 172.30.5.0/24, gateway: 172.30.5.1}
  - {name: open, bridge: br-open, subnet: 172.30.6.0/24, gateway: 172.30.6.1, gateway_mode: nat-unprotected}
  - {name: direct, bridge: br-direct, subnet: 172.30.7.0/24, gateway: 172.30.7.1, gateway_mode: routed}
  - {name: shut, bridge: br-shut, subnet: 172.30.8.0/24, gateway: 172.30.8.1, gateway_mode: isolated}
endpoints:
  - name: n1
    interfaces: [{network: nat, ip: 172.30.5.2, mac: "02:42:ac:1e:05:02", host_veth: veth-n1}]
  - name: o1
    interfaces: [{network: open, ip: 172.30.6.2, mac: "02:42:ac:1e:06:02", host_veth: veth-o1}]
  - name: r1
    interfaces: [{network: direct, ip: 172.30.7.2, mac: "02:42:ac:1e:07:02", host_veth: veth-r1}]
  - name: r2
    interfaces: [{network: direct, ip: 172.30.7.3, mac: "02:42:ac:1e:07:03", host_veth: veth-r2}]
  - name: s1
    interfaces: [{network: shut, ip: 172.30.8.2, mac: "02:42:ac:1e:08:02", host_veth: veth-s1}]
ports:
  - {endpoint: n1, protocol: tcp, host_port: 8090, container_port: 80}
  - {endpoint: r1, protocol: tcp, host_port: 8091, container_port: 8091}
  - {endpoint: s1, protocol: tcp, host_port: 8092, container_port: 80}
"#;

/// The address the outside server saw a connection from `from` come from.
fn seen_by_outside(sandbox: &Sandbox, from: &str) -> String {
    let out = sandbox.exec(from, &["nc", "-w2", OUTSIDE, "9999"]);
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    reply
        .strip_prefix("outside ")
        .and_then(|r| r.split_once(':'))
        .map(|(ip, _)| ip.to_owned())
        .unwrap_or_else(|| format!("no answer: {reply:?}"))
}

fn pings(sandbox: &Sandbox, from: &str, addr: &str) -> bool {
    sandbox
        .exec(from, &["ping", "-c1", "-W2", addr])
        .status
        .success()
}

/// Docker 28's gateway modes (issue 14.6): `nat` keeps container addresses closed to the
/// outside, `nat-unprotected` opens them, `routed` does not masquerade and opens published
/// ports on the container's own address (the host port unused), `isolated` is internal.
#[test]
fn gateway_modes_behave_like_docker_28() {
    let sandbox = Sandbox::up(GATEWAY_MODES);
    let agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside("9999", None);
    // The outside routes to the containers through the host, as a router in front would.
    route_outside_to_containers(&sandbox);
    let cells: Vec<(&str, &str, &str, u16, bool)> = vec![
        ("nat: published port", "outside", HOST, 8090, true),
        ("nat: container address", "outside", "172.30.5.2", 80, false),
        (
            "nat-unprotected: container address",
            "outside",
            "172.30.6.2",
            80,
            true,
        ),
        (
            "routed: published container port",
            "outside",
            "172.30.7.2",
            8091,
            true,
        ),
        (
            "routed: unpublished port",
            "outside",
            "172.30.7.2",
            80,
            false,
        ),
        (
            "routed: the host port is not used",
            "outside",
            HOST,
            8091,
            false,
        ),
        ("routed: between containers", "r2", "172.30.7.2", 80, true),
        ("isolated: published port", "outside", HOST, 8092, false),
        ("isolated: out", "s1", OUTSIDE, 9999, false),
    ];
    let wrong = unexpected(&sandbox, &cells);
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", agent.log_text());

    // Out: nat modes masquerade, routed keeps the container's address.
    assert_eq!(seen_by_outside(&sandbox, "n1"), HOST);
    assert_eq!(seen_by_outside(&sandbox, "o1"), HOST);
    assert_eq!(seen_by_outside(&sandbox, "r1"), "172.30.7.2");
    // ICMP from outside reaches routed containers, not nat ones.
    assert!(pings(&sandbox, "outside", "172.30.7.2"));
    assert!(!pings(&sandbox, "outside", "172.30.5.2"));
    // Refusals are counted as Docker's isolation (POLICY_DENIED).
    assert!(agent.status().drops("POLICY_DENIED") > 0);
}

/// The same networks dual-stack: over IPv6 too, containers of different networks do not reach
/// each other, and `icc: false` keeps the containers of one network apart, both ways; the same
/// network and a container on both networks reach each other (Docker's isolation over IPv6,
/// which Docker itself applies with `--ip6tables`, on by default since 27.0).
const SPEC6: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
  - {name: back, bridge: br-back, subnet6: "fd00:30:2::/64", gateway6: "fd00:30:2::1"}
  - {name: quiet, bridge: br-quiet, subnet6: "fd00:30:4::/64", gateway6: "fd00:30:4::1",
     icc: false}
  - {name: vault, bridge: br-vault, subnet6: "fd00:30:3::/64", gateway6: "fd00:30:3::1",
     internal: true}
endpoints:
  - name: secret
    interfaces: [{network: vault, ip6: "fd00:30:3::2", mac: "02:42:ac:1e:03:02", host_veth: veth-secret}]
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    interfaces: [{network: front, ip: 172.30.1.3, ip6: "fd00:30:1::3", mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
  - name: db
    interfaces: [{network: back, ip6: "fd00:30:2::2", mac: "02:42:ac:1e:02:02", host_veth: veth-db}]
  - name: both
    interfaces:
      - {network: front, ip: 172.30.1.4, ip6: "fd00:30:1::4", mac: "02:42:ac:1e:01:04", host_veth: veth-both1}
      - {network: back, ip6: "fd00:30:2::4", mac: "02:42:ac:1e:02:04", host_veth: veth-both2}
  - name: q1
    interfaces: [{network: quiet, ip6: "fd00:30:4::2", mac: "02:42:ac:1e:04:02", host_veth: veth-q1}]
  - name: q2
    interfaces: [{network: quiet, ip6: "fd00:30:4::3", mac: "02:42:ac:1e:04:03", host_veth: veth-q2}]
"#;

#[test]
fn ipv6_between_networks_is_isolated_as_ipv4() {
    let sandbox = Sandbox::up(SPEC6);
    let _agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside6("9999", None);
    // The outside client routes the containers' prefix back through the host, as a router
    // in front of the host would: a cell that must fail fails by isolation, not for want of
    // a route (the containers' connections out are masqueraded anyway, NAT66).
    sandbox.exec_ok(
        "outside",
        &[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:30::/32",
            "via",
            "2001:db8::1",
        ],
    );
    let cells: Vec<(&str, &str, &str, u16, bool)> = vec![
        ("to outside over IPv6", "db", "2001:db8::2", 9999, true),
        (
            "internal to outside over IPv6",
            "secret",
            "2001:db8::2",
            9999,
            false,
        ),
        ("same network over IPv6", "web2", "fd00:30:1::2", 80, true),
        ("same network over IPv4", "web2", "172.30.1.2", 80, true),
        ("other network over IPv6", "web1", "fd00:30:2::2", 80, false),
        (
            "other network over IPv6, back",
            "db",
            "fd00:30:1::2",
            80,
            false,
        ),
        (
            "two-network container to front",
            "both",
            "fd00:30:1::2",
            80,
            true,
        ),
        (
            "two-network container to back",
            "both",
            "fd00:30:2::2",
            80,
            true,
        ),
        ("icc: false over IPv6", "q1", "fd00:30:4::3", 80, false),
        (
            "icc: false over IPv6, back",
            "q2",
            "fd00:30:4::2",
            80,
            false,
        ),
    ];
    let wrong = unexpected(&sandbox, &cells);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

const SPEC_DUAL: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
endpoints:
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

const HOST6: &str = "2001:db8::1";
/// The outside client's second IPv6 address, next to the sandbox's 2001:db8::2.
const OUTSIDE6_OTHER: &str = "2001:db8::3";

/// Whether an HTTP request of the outside client, from its IPv6 address `from`, gets an
/// answer of web1 through the published port on the host's IPv6 address (curl -6).
fn curl6_from(sandbox: &Sandbox, from: &str) -> bool {
    let out = sandbox.exec(
        "outside",
        &[
            "curl",
            "-6",
            "-sS",
            "--max-time",
            "2",
            "--interface",
            from,
            &format!("http://[{HOST6}]:8080/"),
        ],
    );
    String::from_utf8_lossy(&out.stdout).starts_with("web1 ")
}

/// Whether a TCP connection of the outside client from `from` to the published port gets
/// through (nc -6 -z, another client than curl).
fn nc6_from(sandbox: &Sandbox, from: &str) -> bool {
    sandbox
        .exec(
            "outside",
            &["nc", "-6", "-z", "-w2", "-s", from, HOST6, "8080"],
        )
        .status
        .success()
}

#[test]
fn ipv6_rules_and_the_deny_list_judge_outside_clients() {
    let sandbox = Sandbox::up(SPEC_DUAL);
    let agent = Agent::start(&sandbox);
    // A keep-alive connection of the client (its only IPv6 address yet, so its source), open
    // before any rule.
    let mut open = keep_alive(&sandbox, "outside", "[2001:db8::1]:8080");
    assert!(get(&mut open).unwrap().contains("web1"));
    sandbox.exec_ok(
        "outside",
        &[
            "ip",
            "addr",
            "add",
            &format!("{OUTSIDE6_OTHER}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let (client, neighbour) = ("2001:db8::2", OUTSIDE6_OTHER);
    assert!(curl6_from(&sandbox, client), "the published port over IPv6");
    assert!(curl6_from(&sandbox, neighbour));

    // A rule with an IPv6 CIDR: the client may not reach web1's port 80 (the published
    // port leads there); its neighbour still may.
    sandbox.write_state(&format!(
        "{SPEC_DUAL}policies:\n  - {{name: no-client6, action: deny, from: {{cidr: \"2001:db8::2/128\"}}, to: {{endpoint: web1}}, ports: [\"80/tcp\"]}}\n"
    ));
    let status = agent.wait_for("the IPv6 rule applied", |s| {
        s.last_error.is_none() && !curl6_from(&sandbox, client) && s.drops("POLICY_DENY") > 0
    });
    assert!(status.last_error.is_none(), "{status:#?}");
    // As over IPv4: the open connection the new rule denies is cut (judged again on its next
    // packet).
    assert!(get(&mut open).is_err(), "the open IPv6 connection is cut");
    assert!(!nc6_from(&sandbox, client), "nc -6 is denied too");
    assert!(curl6_from(&sandbox, neighbour), "the neighbour passes");
    assert!(nc6_from(&sandbox, neighbour));

    // The deny list: every packet of the prefix dropped first thing on the uplink (a deny
    // from a source to everything); the neighbour outside the prefix passes.
    sandbox.write_state(&format!(
        "{SPEC_DUAL}policies:\n  - {{name: blocklist6, action: deny, from: {{cidr: \"2001:db8::2/128\"}}}}\n"
    ));
    let before = agent.status().drops("POLICY_DENY");
    agent.wait_for("the IPv6 deny list applied", |s| {
        !curl6_from(&sandbox, client) && s.drops("POLICY_DENY") > before
    });
    assert!(
        !sandbox
            .exec(
                "outside",
                &["ping", "-6", "-c1", "-W1", "-I", client, HOST6]
            )
            .status
            .success(),
        "the denied source's ping to the host too: the list is first thing"
    );
    assert!(curl6_from(&sandbox, neighbour), "the neighbour passes");

    // The list empties: the client is back.
    sandbox.write_state(SPEC_DUAL);
    agent.wait_for("the client back", |_| curl6_from(&sandbox, client));
}

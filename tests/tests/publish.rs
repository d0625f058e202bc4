//! Port publishing, masquerade and conntrack on a namespaced host with real clients (curl, nc,
//! iperf3 and sockets of the test itself) from the outside client and from containers.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

use dataplane_tests::{Agent, Sandbox, StatusExt as _, attached_programs, has_program, in_netns};
use serde_json::Value;

const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    interfaces: [{network: front, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: web1, protocol: udp, host_port: 5353, container_port: 80}
  - {endpoint: web1, protocol: tcp, host_port: "9000-9002", container_port: "7000-7002"}
  - {endpoint: web2, protocol: tcp, host_ip: 192.0.2.1, host_port: 9090, container_port: 80}
"#;

const HOST: &str = "192.0.2.1";
const OUTSIDE: &str = "192.0.2.2";
const GATEWAY: &str = "172.30.1.1";

fn curl(sandbox: &Sandbox, from: &str, url: &str) -> std::process::Output {
    sandbox.exec(from, &["curl", "-sS", "--max-time", "3", url])
}

/// A keep-alive HTTP connection of the outside client to a published port, made with the
/// test's own socket so it stays open across agent restarts and state edits.
struct KeepAlive(TcpStream);

impl KeepAlive {
    /// Connects and makes a first request at once (the sandbox's server answers a client that
    /// stays silent with one line and closes), checking who answered.
    fn open(sandbox: &Sandbox, addr: &'static str) -> KeepAlive {
        let stream = in_netns(&sandbox.netns("outside"), move || {
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
        })
        .expect("connecting through the published port");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut conn = KeepAlive(stream);
        let body = conn.get().expect("first request");
        assert!(body.starts_with(&format!("web1 {OUTSIDE}:")), "{body}");
        conn
    }

    /// One request and its response body.
    fn get(&mut self) -> std::io::Result<String> {
        self.0.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut buf = [0u8; 1024];
        let mut text = String::new();
        while !text.contains("\r\n\r\n") || !text.ends_with('\n') {
            let n = self.0.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
    }
}

#[test]
fn published_ports_reach_the_container_with_the_client_address() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);

    // TCP through curl: the container sees the outside client's own address.
    let out = curl(&sandbox, "outside", &format!("http://{HOST}:8080/"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.starts_with(&format!("web1 {OUTSIDE}:")), "{out:?}");
    // UDP through nc.
    let reply = sandbox.exec_ok(
        "outside",
        &["sh", "-c", &format!("echo hi | nc -u -w1 {HOST} 5353")],
    );
    assert!(
        reply.starts_with(&format!("web1 {OUTSIDE}:")),
        "udp reply: {reply:?}"
    );
    // A range: host port 9002 leads to container port 7002.
    let reply = sandbox.exec_ok("outside", &["nc", "-w3", HOST, "9002"]);
    assert!(
        reply.starts_with(&format!("web1 {OUTSIDE}:")),
        "range reply: {reply:?}"
    );

    // A binding on one host address does not answer on another address of the host.
    sandbox.exec_ok(
        "host",
        &["ip", "addr", "add", "192.0.2.3/24", "dev", "eth0"],
    );
    agent.wait_for("the new host address", |s| {
        s.map_entries("dp_local_addrs_v1") >= 4
    });
    let reply = sandbox.exec_ok("outside", &["nc", "-w3", HOST, "9090"]);
    assert!(reply.starts_with(&format!("web2 {OUTSIDE}:")), "{reply:?}");
    let refused = sandbox.exec("outside", &["nc", "-w3", "192.0.2.3", "9090"]);
    assert!(
        !refused.status.success(),
        "9090 is bound to {HOST} only: {refused:?}"
    );
    // ...while an all-addresses binding answers on the new one too.
    let out = curl(&sandbox, "outside", "http://192.0.2.3:8080/");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("web1 "),
        "{out:?}"
    );

    // Closed TCP connections leave the table (10 s after FIN, plus a GC round); the UDP flow
    // (two entries) stays for its 60 s.
    agent.wait_for_within(Duration::from_secs(25), "closed connections removed", |s| {
        // The UDP flow (one datagram, one answer) is not established: it waits in the table
        // of unestablished connections.
        s.map_entries("dp_ct_v2") + s.map_entries("dp_ct_new_v1") == 2
    });
}

#[test]
fn hairpin_a_container_reaches_a_published_port_of_its_host() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    let out = curl(&sandbox, "web2", &format!("http://{HOST}:8080/"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.starts_with("web1 172.30.1.3:"), "{out:?}");
}

/// A container's connection to its own published port (through a host address or its
/// gateway's) reaches it from the gateway, as with Docker's hairpin MASQUERADE, over TCP and
/// UDP; each is counted and logged with both translations, as a valid Hubble flow.
#[test]
fn hairpin_a_container_reaches_its_own_published_port_from_its_gateway() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let mut seen_ports = BTreeSet::new();
    for to in [HOST, GATEWAY] {
        for round in 0..3 {
            let out = curl(&sandbox, "web1", &format!("http://{to}:8080/"));
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(
                body.starts_with(&format!("web1 {GATEWAY}:")),
                "tcp to {to}:8080, round {round}: {out:?}"
            );
            seen_ports.insert(body.trim().rsplit(':').next().unwrap().to_owned());
            let reply = sandbox.exec_ok(
                "web1",
                &["sh", "-c", &format!("echo hi | nc -u -w1 {to} 5353")],
            );
            assert!(
                reply.starts_with(&format!("web1 {GATEWAY}:")),
                "udp to {to}:5353, round {round}: {reply:?}"
            );
        }
    }
    assert!(
        seen_ports.len() >= 2,
        "allocated source ports: {seen_ports:?}"
    );
    // Logged: one record per connection with its source translation, Hubble's fields.
    let records = wait_for_hairpin_records(&agent, 12);
    for record in &records {
        let flow = &record["flow"];
        assert_eq!(flow["verdict"], "FORWARDED", "{record}");
        assert_eq!(flow["IP"]["source"], "172.30.1.2", "{record}");
        assert_eq!(flow["IP"]["destination"], "172.30.1.2", "{record}");
        assert_eq!(flow["IP"]["source_xlated"], GATEWAY, "{record}");
        assert_eq!(flow["destination"]["pod_name"], "web1", "{record}");
        // A Hubble reader decodes the default form strictly.
        let line = serde_json::to_string(&without_extensions(record)).unwrap();
        let _: dataplane::hubble::api::observer::GetFlowsResponse = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a valid Hubble flow ({e}): {line}"));
    }
    let status = agent.status();
    assert_eq!(status.drops("NO_MAPPING_FOR_NAT_MASQUERADE"), 0);
}

/// The NEW records of hairpin connections (`translation.source_translated` set), once there
/// are `count` of them.
fn wait_for_hairpin_records(agent: &Agent, count: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = std::process::Command::new(dataplane_tests::dataplane_bin())
            .args([
                "observe",
                "-o",
                "json-extended",
                "--last",
                "1000",
                "--socket",
            ])
            .arg(&agent.socket)
            .output()
            .expect("running dataplane observe");
        let hairpins: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| {
                r["flow"]["connection"]["event"] == "new"
                    && r["flow"]["translation"]["source_translated"].is_string()
            })
            .collect();
        if hairpins.len() >= count {
            return hairpins;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {count} hairpin records:\n{}",
            hairpins.len(),
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A record as Hubble's readers get it: without our `translation` and `connection`.
fn without_extensions(record: &Value) -> Value {
    let mut record = record.clone();
    let flow = record["flow"].as_object_mut().unwrap();
    flow.remove("translation");
    flow.remove("connection");
    record
}

/// One datagram from an unconnected UDP socket (sendto/recvfrom); prints the reply's source
/// and the reply.
const UDP_SENDTO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
data, peer = s.recvfrom(512)
print("%s:%d %s" % (peer[0], peer[1], data.decode().strip()))
"#;

#[test]
fn host_processes_reach_published_ports_on_localhost_and_host_addresses() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    // What docker-proxy offers, done at connect(): the connection goes straight to the
    // container. From localhost it comes from the host's address on the container's bridge
    // (127.0.0.1 cannot leave the host; Docker's MASQUERADE of 127.0.0.0/8 gives the same).
    for url in ["http://127.0.0.1:8080/", "http://localhost:8080/"] {
        let out = curl(&sandbox, "host", url);
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.starts_with("web1 172.30.1.1:"), "{url}: {out:?}");
    }
    let reply = sandbox.exec_ok("host", &["sh", "-c", "echo hi | nc -u -w1 127.0.0.1 5353"]);
    assert!(reply.starts_with("web1 172.30.1.1:"), "udp: {reply:?}");
    // To one of the host's addresses it comes from that address, as with Docker's DNAT in
    // OUTPUT (the source stays the one chosen for the original destination).
    let out = curl(&sandbox, "host", "http://192.0.2.1:8080/");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.starts_with(&format!("web1 {HOST}:")), "{out:?}");
    let reply = sandbox.exec_ok("host", &["sh", "-c", "echo hi | nc -u -w1 192.0.2.1 5353"]);
    assert!(
        reply.starts_with(&format!("web1 {HOST}:")),
        "udp: {reply:?}"
    );
    // An unconnected UDP socket: the datagram leaves from the host's address too, and the
    // reply comes from the published port it was sent to.
    let reply = sandbox.exec_ok(
        "host",
        &["/usr/bin/python3", "-c", UDP_SENDTO, HOST, "5353"],
    );
    assert!(
        reply.starts_with(&format!("{HOST}:5353 web1 {HOST}:")),
        "unconnected udp: {reply:?}"
    );
    // Bound to 192.0.2.1 only: not on localhost.
    let out = curl(&sandbox, "host", "http://127.0.0.1:9090/");
    assert!(!out.status.success(), "{out:?}");
    let out = curl(&sandbox, "host", "http://192.0.2.1:9090/");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("web2 "),
        "{out:?}"
    );
}

/// One exchange from an AF_INET6 socket (`tcp`: connect, read the server's line; `udp`:
/// connect, send, receive; `sendto`: unconnected sendto/recvfrom); prints the peer as the
/// process sees it (getpeername, or the reply's source) and the reply. `v6only` sets
/// IPV6_V6ONLY first.
const INET6_EXCHANGE: &str = r#"
import socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind = socket.SOCK_STREAM if mode.startswith("tcp") else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if mode.endswith("v6only") else 0)
s.settimeout(5)
if mode.startswith("sendto"):
    s.sendto(b"hi", (addr, port))
    data, peer = s.recvfrom(512)
else:
    s.connect((addr, port))
    if kind == socket.SOCK_DGRAM:
        s.send(b"hi")
    data = s.recv(512)
    peer = s.getpeername()
print("%s %d %s" % (peer[0], peer[1], data.decode().strip()))
"#;

/// Runs [`INET6_EXCHANGE`] on the sandbox host (in its cgroup, where the socket hooks are).
fn inet6_exchange(sandbox: &Sandbox, mode: &str, addr: &str, port: &str) -> String {
    sandbox.exec_ok(
        "host",
        &["/usr/bin/python3", "-c", INET6_EXCHANGE, mode, addr, port],
    )
}

#[test]
fn host_processes_reach_published_ports_through_ipv6_sockets() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    // An AF_INET6 socket to a v4-mapped address is an IPv4 connection: translated as one, and
    // the process still sees the address it asked for (getpeername, a reply's source).
    let reply = inet6_exchange(&sandbox, "tcp", "::ffff:127.0.0.1", "8080");
    assert!(
        reply.starts_with("::ffff:127.0.0.1 8080 web1 172.30.1.1:"),
        "tcp: {reply:?}"
    );
    let reply = inet6_exchange(&sandbox, "tcp", &format!("::ffff:{HOST}"), "8080");
    assert!(
        reply.starts_with(&format!("::ffff:{HOST} 8080 web1 {HOST}:")),
        "tcp to the host's address: {reply:?}"
    );
    let reply = inet6_exchange(&sandbox, "udp", &format!("::ffff:{HOST}"), "5353");
    assert!(
        reply.starts_with(&format!("::ffff:{HOST} 5353 web1 {HOST}:")),
        "connected udp: {reply:?}"
    );
    // Unconnected: the kernel sends the datagram over IPv4 (sendmsg4 translates it), and the
    // reply reaches recvmsg6 from the container, put back as the port it was sent to.
    let reply = inet6_exchange(&sandbox, "sendto", &format!("::ffff:{HOST}"), "5353");
    assert!(
        reply.starts_with(&format!("::ffff:{HOST} 5353 web1 {HOST}:")),
        "unconnected udp: {reply:?}"
    );
    // curl makes AF_INET6 sockets for IPv6 literals.
    let out = curl(&sandbox, "host", "http://[::ffff:127.0.0.1]:8080/");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("web1 172.30.1.1:"),
        "{out:?}"
    );
    // Bound to 192.0.2.1 only: not on localhost, whatever the family.
    let out = sandbox.exec(
        "host",
        &[
            "/usr/bin/python3",
            "-c",
            INET6_EXCHANGE,
            "tcp",
            "::ffff:127.0.0.1",
            "9090",
        ],
    );
    assert!(!out.status.success(), "{out:?}");
}

/// The host's IPv6 address in the IPv6 tests, on the sandbox host's uplink.
const HOST6: &str = "2001:db8::1";

/// Gives the sandbox host IPv6 (the sandbox turns it off in its namespaces) and [`HOST6`] on
/// its uplink, and makes sure the agent counts it as the host's (`dp_local_addrs6_v1`, which
/// the reconciler fills from the host's addresses; written here too for an agent that
/// does not know IPv6 addresses yet).
fn give_the_host_ipv6(sandbox: &Sandbox, agent: &Agent) {
    let ns = format!("--net=/run/netns/{}", sandbox.netns("host"));
    for cmd in [
        &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"][..],
        &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"],
        &[
            "ip",
            "-6",
            "addr",
            "replace",
            "2001:db8::1/64",
            "dev",
            "eth0",
            "nodad",
        ],
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(&ns)
            .arg("--")
            .args(cmd)
            .output()
            .expect("nsenter");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }
    let key: Vec<String> = HOST6
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let map = agent.pin_dir.join("dp_local_addrs6_v1");
    let out = std::process::Command::new("bpftool")
        .args([
            "map",
            "update",
            "pinned",
            map.to_str().unwrap(),
            "key",
            "hex",
        ])
        .args(&key)
        .args(["value", "hex", "01"])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool: {out:?}");
}

#[test]
fn host_processes_reach_an_ipv4_container_on_ipv6_loopback_and_host_addresses() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    give_the_host_ipv6(&sandbox, &agent);
    // What docker-proxy serves on [::]:PORT for an IPv4-only container, done at connect():
    // the socket goes to the container's IPv4 address, v4-mapped, and the kernel connects it
    // over IPv4 (from the bridge's address, as docker-proxy's own connection comes); the
    // process still sees the address it asked for.
    for (addr, port, what) in [
        ("::1", "8080", "tcp"),
        ("::1", "5353", "udp"),
        (HOST6, "8080", "tcp"),
        (HOST6, "5353", "udp"),
    ] {
        let reply = inet6_exchange(&sandbox, what, addr, port);
        assert!(
            reply.starts_with(&format!("{addr} {port} web1 {GATEWAY}:")),
            "{what} to [{addr}]:{port}: {reply:?}"
        );
    }
    // Real clients: curl, and nc's connected UDP.
    for url in ["http://[::1]:8080/", "http://[2001:db8::1]:8080/"] {
        let out = curl(&sandbox, "host", url);
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&format!("web1 {GATEWAY}:")),
            "{url}: {out:?}"
        );
    }
    let reply = sandbox.exec_ok("host", &["sh", "-c", "echo hi | nc -6 -u -w1 ::1 5353"]);
    assert!(
        reply.starts_with(&format!("web1 {GATEWAY}:")),
        "nc: {reply:?}"
    );
    // An IPV6_V6ONLY socket cannot reach an IPv4 peer: left alone, it meets the host's own
    // [::1]:8080, where nothing listens (translated, it would fail with ENETUNREACH).
    let out = sandbox.exec(
        "host",
        &[
            "/usr/bin/python3",
            "-c",
            INET6_EXCHANGE,
            "tcp-v6only",
            "::1",
            "8080",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Connection refused"),
        "{out:?}"
    );
    // Bound to one IPv4 address only (9090): not on the host's IPv6 addresses; nor is an
    // address that is not the host's.
    for (addr, port) in [("::1", "9090"), (HOST6, "9090"), ("2001:db8::99", "8080")] {
        let out = sandbox.exec(
            "host",
            &["/usr/bin/python3", "-c", INET6_EXCHANGE, "tcp", addr, port],
        );
        assert!(!out.status.success(), "[{addr}]:{port}: {out:?}");
    }
}

#[test]
fn iperf3_through_a_published_port() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let with_iperf = format!(
        "{SPEC}  - {{endpoint: web1, protocol: tcp, host_port: 15201, container_port: 5201}}\n"
    );
    sandbox.write_state(&with_iperf);
    agent.wait_for("iperf port published", |s| {
        s.map_entries("dp_ports_v2") == 7
    });
    let mut server = sandbox.spawn(
        "web1",
        &["iperf3", "-s", "-1", "-p", "5201", "--forceflush"],
    );
    server.wait_for_line("Server listening");
    let out = sandbox.exec_ok(
        "outside",
        &["iperf3", "-c", HOST, "-p", "15201", "-t", "1", "-J"],
    );
    let report: Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let bits = report["end"]["sum_received"]["bits_per_second"].as_f64();
    assert!(bits.is_some_and(|b| b > 0.0), "{report:#}");
}

#[test]
fn masquerade_gives_containers_the_host_address_outside() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside("9999", Some("9999"));

    // From a port of web1's choosing: its tuple is free, so it is kept (as nf_nat keeps it).
    let reply = sandbox.exec_ok("web1", &["nc", "-w3", "-p", "40123", OUTSIDE, "9999"]);
    let seen = reply
        .trim()
        .strip_prefix("outside ")
        .expect("outside answered");
    let (addr, port) = seen.split_once(':').unwrap();
    assert_eq!(addr, HOST, "the outside sees the host's address");
    let port: u16 = port.parse().unwrap();
    assert_eq!(port, 40123, "the container's own source port, kept");
    let reply = sandbox.exec_ok(
        "web2",
        &["sh", "-c", &format!("echo hi | nc -u -w1 {OUTSIDE} 9999")],
    );
    assert!(reply.starts_with(&format!("outside {HOST}:")), "{reply:?}");
    sandbox.exec_ok("web2", &["ping", "-c2", "-i0.2", "-W2", OUTSIDE]);
}

#[test]
fn two_hundred_parallel_connections_from_colliding_source_ports() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside("9999", None);
    colliding_source_ports(&sandbox, &agent, "nc", OUTSIDE, HOST);
}

/// The same over IPv6 (NAT66): two dual-stack containers, the same 100 source ports each, to
/// one IPv6 server port.
#[test]
fn two_hundred_parallel_ipv6_connections_from_colliding_source_ports() {
    let sandbox = Sandbox::up(&spec_dual_two());
    let agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside6("9999", None);
    colliding_source_ports(&sandbox, &agent, "nc -6", OUTSIDE6, HOST6);
}

/// web1 and web2 each open 100 connections at once (`nc`: the client and its family), from
/// the same 100 source ports, to the same server port at `outside`: without port allocation
/// every pair would collide on the host. Every connection is answered, from `host` at 200
/// distinct ports: of each colliding pair the first keeps its own, the second gets one probed
/// in the masquerade range.
fn colliding_source_ports(sandbox: &Sandbox, agent: &Agent, nc: &str, outside: &str, host: &str) {
    let script =
        format!("seq 41000 41099 | xargs -P 100 -I{{}} {nc} -d -w5 -p {{}} {outside} 9999");
    let web1 = sandbox.spawn("web1", &["sh", "-c", &script]);
    let web2 = sandbox.spawn("web2", &["sh", "-c", &script]);
    let mut ports = BTreeSet::new();
    for background in [web1, web2] {
        let output = background.wait_output();
        let replies: Vec<&str> = output
            .lines()
            .filter(|l| l.starts_with("outside "))
            .collect();
        assert_eq!(replies.len(), 100, "every connection answered:\n{output}");
        for reply in replies {
            let (addr, port) = reply["outside ".len()..].trim().rsplit_once(':').unwrap();
            assert_eq!(addr.trim_start_matches('[').trim_end_matches(']'), host);
            ports.insert(port.parse::<u16>().unwrap());
        }
    }
    assert_eq!(ports.len(), 200, "200 distinct host ports");
    let kept = ports
        .iter()
        .filter(|p| (41000..=41099).contains(*p))
        .count();
    let probed = ports
        .iter()
        .filter(|p| (20000..=32767).contains(*p))
        .count();
    assert_eq!((kept, probed), (100, 100), "{ports:?}");
    let status = agent.status();
    assert_eq!(status.drops("NO_MAPPING_FOR_NAT_MASQUERADE"), 0);
    assert_eq!(status.drops("CT_MAP_INSERTION_FAILED"), 0);
}

#[test]
fn an_established_connection_survives_agent_kill_and_restart() {
    let sandbox = Sandbox::up(SPEC);
    let mut agent = Agent::start(&sandbox);
    let mut conn = KeepAlive::open(&sandbox, "192.0.2.1:8080");

    agent.stop("KILL");
    // The datapath keeps running without its agent: links and maps are pinned.
    let attached = attached_programs(&sandbox.netns("host"), "eth0");
    assert!(has_program(&attached, "dp_uplink_ingress"), "{attached:?}");
    assert!(
        conn.get().unwrap().starts_with("web1 "),
        "while the agent is down"
    );

    agent.restart();
    assert!(
        conn.get().unwrap().starts_with("web1 "),
        "after the restart"
    );
    // The restarted agent adopted the links rather than adding a second program.
    let attached = attached_programs(&sandbox.netns("host"), "eth0");
    assert_eq!(attached.len(), 2, "{attached:?}");
}

#[test]
fn removing_a_port_stops_new_connections_at_once() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let mut conn = KeepAlive::open(&sandbox, "192.0.2.1:8080");
    let without_8080 = SPEC.replace(
        "  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}\n",
        "",
    );
    sandbox.write_state(&without_8080);
    agent.wait_for("port removed", |s| s.map_entries("dp_ports_v2") == 5);
    let out = curl(&sandbox, "outside", &format!("http://{HOST}:8080/"));
    assert!(
        !out.status.success(),
        "new connections are refused: {out:?}"
    );
    // Documented choice: a connection already established keeps its translation until it ends.
    assert!(conn.get().unwrap().starts_with("web1 "));
}

#[test]
fn a_full_conntrack_table_still_admits_new_connections_and_keeps_the_established() {
    let sandbox = Sandbox::up(SPEC);
    // Room for two established connections.
    let agent = Agent::start_with(&sandbox, &["--ct-max-entries", "4"]);
    let mut first = KeepAlive::open(&sandbox, "192.0.2.1:8080");
    let mut second = KeepAlive::open(&sandbox, "192.0.2.1:8080");
    let status = agent.wait_for("two established connections", |s| {
        s.map_entries("dp_ct_v2") == 4
    });
    assert!(status.last_error.is_none());
    // A third connection does not fit the main table, yet works: it goes on from the table
    // of handshakes (where, under pressure, it could be evicted; an established one never).
    for _ in 0..3 {
        let out = curl(&sandbox, "outside", &format!("http://{HOST}:8080/"));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("web1 "),
            "{out:?}"
        );
    }
    let status = agent.status();
    assert_eq!(status.map_entries("dp_ct_v2"), 4);
    assert_eq!(status.drops("CT_MAP_INSERTION_FAILED"), 0);
    // The tracked connections are unaffected.
    assert!(first.get().unwrap().starts_with("web1 "));
    assert!(second.get().unwrap().starts_with("web1 "));
}

/// What a connected UDP socket in `netns` gets back for one datagram to `to`.
fn udp_exchange(sandbox: &Sandbox, netns: &str, to: &'static str) -> std::io::Result<usize> {
    in_netns(&sandbox.netns(netns), move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send(b"anyone?")?;
        socket.recv(&mut [0u8; 256])
    })
}

#[test]
fn icmp_errors_reach_the_clients_of_translated_connections() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    // A published UDP port whose container port nobody listens on: the container's "port
    // unreachable" must reach the client as coming from the address it used.
    let closed = format!(
        "{SPEC}  - {{endpoint: web1, protocol: udp, host_port: 6000, container_port: 6000}}\n"
    );
    sandbox.write_state(&closed);
    agent.wait_for("udp 6000 published", |s| s.map_entries("dp_ports_v2") == 7);
    let err = udp_exchange(&sandbox, "outside", "192.0.2.1:6000").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // Masquerade: the outside's "port unreachable" to the host reaches the container.
    let err = udp_exchange(&sandbox, "web1", "192.0.2.2:7777").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

/// A UDP datagram from the outside client to port 5353 on the host's IPv6 address reaches
/// `container`, which sees the client's own address.
fn udp6_through_published_port(sandbox: &Sandbox, container: &str) {
    let reply = sandbox.exec_ok(
        "outside",
        &["sh", "-c", &format!("echo hi | nc -6 -u -w1 {HOST6} 5353")],
    );
    assert!(
        reply.starts_with(&format!("{container} ")) && reply.contains(OUTSIDE6),
        "UDP over IPv6: {reply:?}"
    );
}

/// A UDP datagram from `container` to the outside server's port 9999 arrives from the host's
/// IPv6 address (NAT66) and is answered.
fn udp6_out_through_nat66(sandbox: &Sandbox, container: &str) {
    let reply = sandbox.exec_ok(
        container,
        &[
            "sh",
            "-c",
            &format!("echo hi | nc -6 -u -w1 {OUTSIDE6} 9999"),
        ],
    );
    assert!(
        reply.starts_with("outside ") && reply.contains(HOST6),
        "UDP out over IPv6: {reply:?}"
    );
}

/// The outside client's IPv6 address.
const OUTSIDE6: &str = "2001:db8::2";

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
  - {endpoint: web1, protocol: udp, host_port: 5353, container_port: 80}
"#;

#[test]
fn ipv6_published_ports_keep_the_client_address_and_nat66_gives_the_host_address() {
    let sandbox = Sandbox::up(SPEC_DUAL);
    let _agent = Agent::start(&sandbox);
    // The outside client has no route to the containers' prefix: only translation answers.
    let routes = sandbox.exec_ok("outside", &["ip", "-6", "route", "show"]);
    assert!(!routes.contains("fd00"), "{routes}");

    // From outside to the port on the host's IPv6 address: the container sees the client.
    let out = curl(&sandbox, "outside", &format!("http://[{HOST6}]:8080/"));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with("web1 ") && body.contains(OUTSIDE6),
        "TCP over IPv6: {out:?}"
    );
    udp6_through_published_port(&sandbox, "web1");

    // From the container out: the outside sees the host's IPv6 address (NAT66), with the
    // container's own source port (its tuple is free), and answers come back.
    let _server = sandbox.serve_outside6("9999", Some("9999"));
    let reply = sandbox.exec_ok(
        "web1",
        &["nc", "-6", "-w3", "-p", "40124", OUTSIDE6, "9999"],
    );
    assert!(
        reply.starts_with("outside ") && reply.contains(HOST6) && reply.contains("40124"),
        "TCP out over IPv6: {reply:?}"
    );
    udp6_out_through_nat66(&sandbox, "web1");
    sandbox.exec_ok("web1", &["ping", "-6", "-c2", "-i0.2", "-W2", OUTSIDE6]);
}

/// [`SPEC_DUAL`] with a second dual-stack container, web2.
fn spec_dual_two() -> String {
    SPEC_DUAL.replace(
        "ports:\n",
        "  - name: web2\n    interfaces: [{network: front, ip: 172.30.1.3, ip6: \"fd00:30:1::3\", mac: \"02:42:ac:1e:01:03\", host_veth: veth-web2}]\nports:\n",
    )
}

/// Containers reach ports published on their host's IPv6 address, as with Docker's DNAT of
/// what its bridges send to a host address: another container from its own address, the
/// port's own container from its gateway (a hairpin, Docker's MASQUERADE for `-s C -d C`), over
/// TCP and UDP; the hairpins logged with both translations, as valid Hubble flows.
#[test]
fn ipv6_containers_reach_published_ports_of_their_host_and_their_own() {
    const GATEWAY6: &str = "fd00:30:1::1";
    let sandbox = Sandbox::up(&spec_dual_two());
    let agent = Agent::start(&sandbox);
    let url = format!("http://[{HOST6}]:8080/");
    let out = sandbox.exec("web2", &["curl", "-6", "-sS", "--max-time", "3", &url]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with("web1 ") && body.contains("fd00:30:1::3"),
        "web2 to the published port, seen from its own address: {out:?}"
    );
    for round in 0..2 {
        let out = sandbox.exec("web1", &["curl", "-6", "-sS", "--max-time", "3", &url]);
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.starts_with("web1 ") && body.contains(GATEWAY6),
            "web1 to its own published port, round {round}: {out:?}"
        );
        let reply = sandbox.exec_ok(
            "web1",
            &["sh", "-c", &format!("echo hi | nc -6 -u -w1 {HOST6} 5353")],
        );
        assert!(
            reply.starts_with("web1 ") && reply.contains(GATEWAY6),
            "UDP to its own published port, round {round}: {reply:?}"
        );
    }
    let records = wait_for_hairpin_records(&agent, 4);
    for record in &records {
        let flow = &record["flow"];
        assert_eq!(flow["verdict"], "FORWARDED", "{record}");
        assert_eq!(flow["IP"]["ipVersion"], "IPv6", "{record}");
        assert_eq!(flow["IP"]["source"], "fd00:30:1::2", "{record}");
        assert_eq!(flow["IP"]["destination"], "fd00:30:1::2", "{record}");
        assert_eq!(flow["IP"]["source_xlated"], GATEWAY6, "{record}");
        assert_eq!(flow["destination"]["pod_name"], "web1", "{record}");
        let port = flow["l4"]["TCP"]["destination_port"]
            .as_u64()
            .or(flow["l4"]["UDP"]["destination_port"].as_u64());
        assert_eq!(port, Some(80), "the container's own port: {record}");
        let line = serde_json::to_string(&without_extensions(record)).unwrap();
        let _: dataplane::hubble::api::observer::GetFlowsResponse = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a valid Hubble flow ({e}): {line}"));
    }
}

/// iperf3 -6 through a published port (both ways: the container receiving, and sending with
/// -R, its segments translated at its veth and sent out of the uplink) and through NAT66 (the
/// container the client of an outside server).
#[test]
fn iperf3_over_ipv6_through_a_published_port_and_nat66() {
    let sandbox = Sandbox::up(SPEC_DUAL);
    let agent = Agent::start(&sandbox);
    sandbox.write_state(&format!(
        "{SPEC_DUAL}  - {{endpoint: web1, protocol: tcp, host_port: 15201, container_port: 5201}}\n"
    ));
    agent.wait_for("iperf port published", |s| {
        s.map_entries("dp_ports6_v1") == 3
    });
    let received = |report: &Value| report["end"]["sum_received"]["bits_per_second"].as_f64();
    for reverse in [false, true] {
        let mut server = sandbox.spawn(
            "web1",
            &["iperf3", "-s", "-1", "-p", "5201", "--forceflush"],
        );
        server.wait_for_line("Server listening");
        let mut args = vec!["iperf3", "-6", "-c", HOST6, "-p", "15201", "-t", "1", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = sandbox.exec_ok("outside", &args);
        let report: Value = serde_json::from_str(&out).expect("iperf3 JSON");
        assert!(
            received(&report).is_some_and(|b| b > 0.0),
            "reverse {reverse}: {report:#}"
        );
    }
    let mut server = sandbox.spawn(
        "outside",
        &["iperf3", "-s", "-1", "-p", "5202", "--forceflush"],
    );
    server.wait_for_line("Server listening");
    let out = sandbox.exec_ok(
        "web1",
        &[
            "iperf3", "-6", "-c", OUTSIDE6, "-p", "5202", "-t", "1", "-J",
        ],
    );
    let report: Value = serde_json::from_str(&out).expect("iperf3 JSON");
    assert!(received(&report).is_some_and(|b| b > 0.0), "{report:#}");
}

/// An IPv6-only network (subnet6 only), its container with ip6 only; one port bound to the
/// host's IPv6 address (host_ip), one to all of them.
const SPEC_V6ONLY: &str = r#"
uplink: eth0
networks:
  - {name: six, bridge: br-six, subnet6: "fd00:30:6::/64", gateway6: "fd00:30:6::1"}
endpoints:
  - name: web6
    interfaces: [{network: six, ip6: "fd00:30:6::2", mac: "02:42:ac:1e:06:02", host_veth: veth-web6}]
ports:
  - {endpoint: web6, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: web6, protocol: tcp, host_ip: "2001:db8::1", host_port: 8081, container_port: 80}
  - {endpoint: web6, protocol: udp, host_port: 5353, container_port: 80}
"#;

/// Published ports (to all host addresses and to host_ip 2001:db8::1) and NAT66 (TCP, UDP,
/// ping -6) for a container that has no IPv4 at all, with no route back from the outside: only
/// translation at the uplink can answer.
#[test]
fn an_ipv6_only_network_publishes_ports_and_is_masqueraded() {
    let sandbox = Sandbox::up(SPEC_V6ONLY);
    let _agent = Agent::start(&sandbox);
    let routes = sandbox.exec_ok("outside", &["ip", "-6", "route", "show"]);
    assert!(
        !routes.contains("fd00"),
        "the outside must not route back: {routes}"
    );
    let addrs = sandbox.exec_ok("outside", &["ip", "-6", "addr", "show"]);
    assert!(addrs.contains("2001:db8::2/64"), "{addrs}");

    for port in [8080, 8081] {
        let out = curl(&sandbox, "outside", &format!("http://[{HOST6}]:{port}/"));
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.starts_with("web6 ") && body.contains(OUTSIDE6),
            "TCP over IPv6 to {port}: {out:?}"
        );
    }
    udp6_through_published_port(&sandbox, "web6");

    let _server = sandbox.serve_outside6("9999", Some("9999"));
    let reply = sandbox.exec_ok("web6", &["nc", "-6", "-w3", OUTSIDE6, "9999"]);
    assert!(
        reply.starts_with("outside ") && reply.contains(HOST6),
        "TCP out over IPv6: {reply:?}"
    );
    udp6_out_through_nat66(&sandbox, "web6");
    let ping = sandbox.exec_ok("web6", &["ping", "-6", "-c3", "-i0.2", "-W2", OUTSIDE6]);
    assert!(ping.contains("3 received"), "{ping}");
}

/// Gives the outside client IPv6 and [`OUTSIDE6`] on its uplink side, for a host whose
/// networks have none (the sandbox turns IPv6 off in its namespaces then).
fn give_the_outside_ipv6(sandbox: &Sandbox) {
    for cmd in [
        &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"][..],
        &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"],
        &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"],
        &[
            "ip",
            "-6",
            "addr",
            "replace",
            "2001:db8::2/64",
            "dev",
            "eth0",
            "nodad",
        ],
    ] {
        sandbox.exec_ok("outside", cmd);
    }
}

/// What docker-proxy serves on [::]:PORT for an IPv4-only container, done in the kernel
/// (NAT64 at the uplink): a client from outside over IPv6 reaches the container, which sees
/// its network's gateway as the client (as docker-proxy's connections come), while the flow
/// record names the client's own IPv6 address. No docker-proxy runs here, so without NAT64
/// the host itself would refuse the connection.
#[test]
fn ipv6_clients_reach_an_ipv4_only_containers_published_port_through_nat64() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    give_the_host_ipv6(&sandbox, &agent);
    give_the_outside_ipv6(&sandbox);
    let addrs = sandbox.exec_ok("web1", &["ip", "addr", "show"]);
    assert!(
        !addrs.contains("inet6 fd") && !addrs.contains("2001:"),
        "IPv4 only: {addrs}"
    );

    for port in ["8080", "9000"] {
        let out = sandbox.exec(
            "outside",
            &[
                "curl",
                "-6",
                "-sS",
                "--max-time",
                "3",
                &format!("http://[{HOST6}]:{port}/"),
            ],
        );
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.starts_with(&format!("web1 {GATEWAY}:")),
            "TCP over IPv6 to an IPv4-only container's port {port}: {out:?}"
        );
    }
    let reply = sandbox.exec_ok(
        "outside",
        &["sh", "-c", &format!("echo hi | nc -6 -u -w1 {HOST6} 5353")],
    );
    assert!(
        reply.starts_with(&format!("web1 {GATEWAY}:")),
        "UDP over IPv6 to an IPv4-only container: {reply:?}"
    );

    // The records: the real client, over IPv6, to the published address, translated to the
    // container's IPv4 address.
    for (protocol, port, container_port) in [("TCP", 8080, 80), ("UDP", 5353, 80)] {
        let record = agent.wait_for_record(&format!("the NAT64 {protocol} flow"), |r| {
            let flow = &r["flow"];
            flow["connection"]["event"] == "new"
                && flow["IP"]["source"] == OUTSIDE6
                && flow["l4"][protocol].is_object()
        });
        let flow = &record["flow"];
        assert_eq!(flow["IP"]["ipVersion"], "IPv6", "{record:#}");
        assert_eq!(flow["verdict"], "FORWARDED", "{record:#}");
        assert_eq!(flow["destination"]["pod_name"], "web1", "{record:#}");
        assert_eq!(
            flow["l4"][protocol]["destination_port"], container_port,
            "{record:#}"
        );
        assert_eq!(flow["translation"]["kind"], "published_port", "{record:#}");
        assert_eq!(
            flow["translation"]["original"],
            format!("[{HOST6}]:{port}"),
            "{record:#}"
        );
        assert_eq!(
            flow["translation"]["translated"],
            format!("172.30.1.2:{container_port}"),
            "{record:#}"
        );
    }
}

/// Bulk TCP through NAT64 both ways (iperf3 -6, then -R): full-sized segments and GSO
/// packets translated between the families. The container's segments grow by 20 bytes going
/// out; sized by the client's IPv6 MSS, they still fit the uplink (a segment that did not
/// would be lost every time, and the transfer would stall). Retransmissions are not judged:
/// on this test bed they vary from run to run for IPv4 alike.
#[test]
fn iperf3_over_ipv6_to_an_ipv4_only_container_both_ways() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let with_iperf = format!(
        "{SPEC}  - {{endpoint: web1, protocol: tcp, host_port: 15201, container_port: 5201}}\n"
    );
    sandbox.write_state(&with_iperf);
    agent.wait_for("iperf port published", |s| {
        s.map_entries("dp_ports_v2") == 7
    });
    give_the_host_ipv6(&sandbox, &agent);
    give_the_outside_ipv6(&sandbox);
    for reverse in [false, true] {
        let mut server = sandbox.spawn(
            "web1",
            &["iperf3", "-s", "-1", "-p", "5201", "--forceflush"],
        );
        server.wait_for_line("Server listening");
        let mut cmd = vec!["iperf3", "-6", "-c", HOST6, "-p", "15201", "-t", "1", "-J"];
        if reverse {
            cmd.push("-R");
        }
        let out = sandbox.exec_ok("outside", &cmd);
        let report: Value = serde_json::from_str(&out).expect("iperf3 JSON");
        let received = report["end"]["sum_received"]["bytes"].as_f64();
        assert!(
            received.is_some_and(|b| b > 1e6),
            "reverse {reverse}: {report:#}"
        );
    }
}

/// A client behind a hop of a smaller MTU than the host's (1280, IPv6's minimum), in a
/// namespace of its own behind the outside one, which routes for it. The client advertises
/// the MSS of a 1500-byte LAN (`advmss`, as a client behind a tunnel does), so only path MTU
/// discovery keeps a container's big segments from being lost at the hop.
struct FarClient {
    netns: String,
}

const FAR6: &str = "2001:db8:f::2";

impl FarClient {
    fn behind(sandbox: &Sandbox) -> FarClient {
        // `{sandbox}-far`: the sandbox's drop removes every namespace named after it.
        let netns = format!("{}-far", sandbox.names().name());
        let outside = sandbox.netns("outside");
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&["netns", "add", &netns]);
        let far = FarClient { netns };
        let (o, f) = (outside.as_str(), far.netns.as_str());
        ip(&[
            "-n", o, "link", "add", "to-far", "mtu", "1280", "type", "veth", "peer", "name",
            "eth0", "mtu", "1280", "netns", f,
        ]);
        ip(&[
            "-n",
            o,
            "-6",
            "addr",
            "add",
            "2001:db8:f::1/64",
            "dev",
            "to-far",
            "nodad",
        ]);
        ip(&["-n", o, "link", "set", "to-far", "up"]);
        ip(&["-n", f, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            f,
            "-6",
            "addr",
            "add",
            "2001:db8:f::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", f, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            f,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:f::1",
            "advmss",
            "1440",
        ]);
        sandbox.exec_ok(
            "outside",
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        );
        sandbox.exec_ok(
            "host",
            &[
                "ip",
                "-6",
                "route",
                "add",
                "2001:db8:f::/64",
                "via",
                OUTSIDE6,
            ],
        );
        far
    }
}

impl FarClient {
    /// The bytes of a download from the published port 8080 on [`HOST6`], to its end.
    fn download(&self, size: usize) -> usize {
        in_netns(&self.netns, move || {
            let stream = TcpStream::connect_timeout(
                &format!("[{HOST6}]:8080").parse().unwrap(),
                Duration::from_secs(3),
            )
            .expect("the far client connecting to the published port");
            let got = bytes_until_close(stream, Duration::from_secs(10));
            assert!(got <= size);
            got
        })
    }
}

/// The container `name` serves one download of `size` bytes itself, on `bind` (its published
/// port's container port), in place of the sandbox's server; the client it saw.
fn serve_download(
    sandbox: &Sandbox,
    name: &str,
    bind: &'static str,
    size: usize,
) -> std::thread::JoinHandle<std::net::SocketAddr> {
    sandbox.stop_sandbox_server(name).unwrap();
    // The sandbox's server was signalled, not waited for: its port may take a moment to free.
    let listener = in_netns(&sandbox.netns(name), move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(bind) {
                Ok(listener) => return listener,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("binding {bind}: {e}"),
            }
        }
    });
    std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("the download's connection");
        // A stalled transfer must end the test, not hang it: the far end counts what came.
        stream
            .set_write_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let _ = stream.write_all(&vec![b'x'; size]);
        peer
    })
}

/// What a peer sends on a TCP connection, counted to its end (at most `timeout` of silence).
fn bytes_until_close(mut stream: TcpStream, timeout: Duration) -> usize {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let (mut total, mut buf) = (0, vec![0u8; 64 * 1024]);
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// Path MTU discovery through the translations: a router on the way to the client cannot
/// forward the container's 1500-byte packets onto its 1280-byte hop and says so (ICMPv6
/// "packet too big") to the address they came from, the host's. Translated back, the error
/// reaches the container, which lowers its path MTU and its segments get through: a published
/// port's download, and an upload through NAT66. Untranslated, both transfers stall.
#[test]
fn ipv6_path_mtu_discovery_works_through_a_published_port_and_nat66() {
    const SIZE: usize = 256 * 1024;
    let sandbox = Sandbox::up(SPEC_DUAL);
    let _agent = Agent::start(&sandbox);
    let far = FarClient::behind(&sandbox);
    let server = serve_download(&sandbox, "web1", "[::]:80", SIZE);
    let got = far.download(SIZE);
    let peer = server.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        FAR6,
        "the container sees the far client"
    );
    assert_eq!(got, SIZE, "the whole download crossed the 1280-byte hop");
    let route = sandbox.exec_ok("web1", &["ip", "-6", "route", "get", FAR6]);
    assert!(
        route.contains("mtu 1280"),
        "the container learnt the path MTU: {route}"
    );

    // The other way: the container uploads to the far client through NAT66.
    let listener = in_netns(&far.netns, || {
        std::net::TcpListener::bind("[::]:9000").expect("binding [::]:9000 in the far client")
    });
    let receiver = std::thread::spawn(move || {
        let (stream, peer) = listener.accept().expect("the upload's connection");
        (bytes_until_close(stream, Duration::from_secs(10)), peer)
    });
    in_netns(&sandbox.netns("web1"), || {
        let mut stream = TcpStream::connect_timeout(
            &format!("[{FAR6}]:9000").parse().unwrap(),
            Duration::from_secs(3),
        )
        .expect("web1 connecting to the far client");
        stream
            .set_write_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let _ = stream.write_all(&vec![b'y'; SIZE]);
    });
    let (received, peer) = receiver.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        HOST6,
        "masqueraded to the host's address"
    );
    assert_eq!(received, SIZE, "the whole upload crossed the 1280-byte hop");
}

/// What an IPv6 client's connected UDP socket gets for one datagram to [`HOST6`]:`port`: an
/// `answer`, `refused` (an ICMPv6 port unreachable came back) or `timeout`.
fn udp6_fate(sandbox: &Sandbox, port: u16) -> String {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.connect(('{HOST6}', {port}))\n\
         s.send(b'hi')\n\
         try:\n    s.recv(512)\n    print('answer')\n\
         except ConnectionRefusedError:\n    print('refused')\n\
         except socket.timeout:\n    print('timeout')\n"
    );
    sandbox
        .exec_ok("outside", &["/usr/bin/python3", "-c", &script])
        .trim()
        .to_owned()
}

/// An IPv4-only container's ICMP errors reach its IPv6 clients through NAT64: a datagram to
/// its published UDP port once nothing listens there is refused at once (the container's
/// ICMPv4 port unreachable, translated into ICMPv6's), where untranslated the client would
/// wait in vain. (docker-proxy answers nothing either way: it takes the datagram itself.)
#[test]
fn an_ipv4_only_containers_port_unreachable_reaches_the_ipv6_client_through_nat64() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    give_the_host_ipv6(&sandbox, &agent);
    give_the_outside_ipv6(&sandbox);
    assert_eq!(
        udp6_fate(&sandbox, 5353),
        "answer",
        "the container's server"
    );
    sandbox.stop_sandbox_server("web1").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let fate = udp6_fate(&sandbox, 5353);
        if fate == "refused" {
            break;
        }
        // The server was signalled, not waited for.
        assert!(
            fate == "answer" && std::time::Instant::now() < deadline,
            "the closed port: {fate}"
        );
    }
}

/// Fragmented UDP datagrams through NAT64: an IPv6 client's 4,000- and 60,000-byte
/// datagrams to an IPv4-only container's published UDP port, split into IPv6 fragments by
/// the client (IPv6 routers never split), arrive whole at the container as IPv4 fragments,
/// from its gateway; its short answers come back over IPv6. Untranslated, the fragments would
/// go to the host's own stack, which has no socket there. (The container's own datagrams
/// bigger than the uplink's MTU less 28 bytes would not fit as IPv6 fragments: README.)
#[test]
fn fragmented_udp_datagrams_reach_an_ipv4_only_container_through_nat64() {
    const SIZES: [usize; 2] = [4000, 60000];
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    give_the_host_ipv6(&sandbox, &agent);
    give_the_outside_ipv6(&sandbox);
    // The container answers each datagram with its size, in place of the sandbox's server
    // (signalled, not waited for: its port may take a moment to free).
    sandbox.stop_sandbox_server("web1").unwrap();
    let socket = in_netns(&sandbox.netns("web1"), || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::UdpSocket::bind("0.0.0.0:80") {
                Ok(socket) => return socket,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("binding 0.0.0.0:80/udp in web1: {e}"),
            }
        }
    });
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        for _ in SIZES {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                break;
            };
            let intact = buf[..n]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251) as u8);
            socket.send_to(n.to_string().as_bytes(), peer).unwrap();
            seen.push((n, intact, peer.ip().to_string()));
        }
        seen
    });
    in_netns(&sandbox.netns("outside"), || {
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        for size in SIZES {
            let datagram: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            socket
                .send_to(&datagram, format!("[{HOST6}]:5353"))
                .unwrap();
            let (n, _) = socket
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no answer to {size} bytes: {e}"));
            assert_eq!(
                String::from_utf8_lossy(&buf[..n]),
                size.to_string(),
                "the container got the {size} bytes whole"
            );
        }
    });
    let seen = server.join().unwrap();
    let expected: Vec<_> = SIZES
        .iter()
        .map(|n| (*n, true, GATEWAY.to_owned()))
        .collect();
    assert_eq!(seen, expected, "whole, intact, from the gateway");
    let status = agent.status();
    assert_eq!(
        status.drops("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND"),
        0,
        "{status:#?}"
    );
}

/// Path MTU discovery through NAT64: the far client behind the 1280-byte hop downloads from
/// an IPv4-only container through the published port over IPv6. The container's segments
/// follow the client's MSS (1440, for a 1500-byte IPv6 link) and leave as 1500-byte IPv6
/// packets, which the hop refuses with "packet too big" (MTU 1280) to the host's address. Translated into ICMPv4 "fragmentation
/// needed" (MTU 1260) about the container's own packet, it makes the container lower its path
/// MTU towards its gateway (which it sees as the client) and the download completes. Without
/// the translation it stalls.
#[test]
fn ipv6_path_mtu_discovery_works_through_nat64() {
    const SIZE: usize = 256 * 1024;
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    give_the_host_ipv6(&sandbox, &agent);
    give_the_outside_ipv6(&sandbox);
    let far = FarClient::behind(&sandbox);
    let server = serve_download(&sandbox, "web1", "0.0.0.0:80", SIZE);
    let got = far.download(SIZE);
    let peer = server.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        GATEWAY,
        "the IPv4-only container sees its gateway, as with docker-proxy"
    );
    assert_eq!(got, SIZE, "the whole download crossed the 1280-byte hop");
    let route = sandbox.exec_ok("web1", &["ip", "route", "get", GATEWAY]);
    assert!(
        route.contains("mtu 1260"),
        "the container learnt the path MTU less IPv4's 20 bytes: {route}"
    );
}

/// ICMPv6 errors forged by someone on the path to the client (who sees the connection's
/// segments, so its quotes carry a sequence number the container's TCP accepts), about a
/// live NAT64 download: packet too big with MTUs of 0, 1, 68, 1279 and 2^32 - 1, every
/// unreachable code, time exceeded, parameter problems, a bad checksum, quotes cut short and
/// one of no connection. The download completes whole, and the container's path MTU towards
/// its gateway is never under 1260 (IPv6's 1280 less 20: no IPv6 path is smaller, and an
/// IPv6 server would ignore such an MTU; translated as it came, 0 would have shrunk it to
/// Linux's floor of 552). The agent reports no error.
#[test]
fn forged_icmpv6_errors_about_a_live_nat64_download_leave_it_whole() {
    const SIZE: usize = 2 * 1024 * 1024;
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    give_the_host_ipv6(&sandbox, &agent);
    give_the_outside_ipv6(&sandbox);
    let server = serve_download(&sandbox, "web1", "0.0.0.0:80", SIZE);
    // The client and the forger, in the outside namespace. The client stops reading for 3 s
    // after its first bytes: its window closes, so the container has sent all it may and the
    // client's latest acknowledgement is the container's next sequence number, which the
    // forger quotes (a TCP takes an ICMP error only about a sequence number in its window).
    let script = format!(
        r#"
import socket, threading, time
from scapy.all import IPv6, TCP, ICMPv6PacketTooBig, ICMPv6DestUnreach, ICMPv6TimeExceeded, ICMPv6ParamProblem, Raw, send, sniff
got = [0]
def client():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(('::', 47001))
    s.connect(('{HOST6}', 8080))
    s.settimeout(15)
    first = True
    while True:
        data = s.recv(16384)
        if not data:
            break
        got[0] += len(data)
        if first:
            time.sleep(3)
            first = False
t = threading.Thread(target=client)
t.start()
time.sleep(1)
acks = sniff(iface='eth0', timeout=1, lfilter=lambda p: TCP in p and p[TCP].sport == 47001)
seq = max(p[TCP].ack for p in acks)
quote = IPv6(src='{HOST6}', dst='{OUTSIDE6}')/TCP(sport=8080, dport=47001, seq=seq, flags='A')
raw = bytes(quote)
errors = [ICMPv6PacketTooBig(mtu=m)/quote for m in (0, 1, 68, 1279, 0xffffffff)]
errors += [ICMPv6DestUnreach(code=c)/quote for c in range(7)]
errors += [ICMPv6TimeExceeded(code=c)/quote for c in (0, 1)]
errors += [ICMPv6ParamProblem(code=c, ptr=6)/quote for c in (0, 1, 2)]
errors += [ICMPv6PacketTooBig(mtu=0, cksum=0x1234)/quote]
errors += [ICMPv6PacketTooBig(mtu=0)/Raw(raw[:n]) for n in (0, 10, 40, 44, 47)]
errors += [ICMPv6PacketTooBig(mtu=0)/IPv6(src='{HOST6}', dst='{OUTSIDE6}')/TCP(sport=8080, dport=47002, seq=seq)]
for e in errors:
    send(IPv6(src='2001:db8::99', dst='{HOST6}')/e, iface='eth0', verbose=0)
t.join()
print(got[0])
"#
    );
    let got = sandbox.exec_ok("outside", &["/usr/bin/python3", "-c", &script]);
    server.join().unwrap();
    assert_eq!(
        got.trim(),
        SIZE.to_string(),
        "the whole download, through the forged errors"
    );
    let route = sandbox.exec_ok("web1", &["ip", "route", "get", GATEWAY]);
    // "mtu 1260", or "mtu lock 552" for an MTU Linux raised to its floor.
    let mtu = route
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .find_map(|w| w.parse::<u32>().ok());
    if let Some(mtu) = mtu {
        assert!(
            mtu >= 1260,
            "the container's path MTU went under IPv6's: {route}"
        );
    }
    assert!(
        route.contains("mtu 1260"),
        "the forged packet too big did reach the container (as 1260): {route}"
    );
    let status = agent.status();
    assert!(status.last_error.is_none(), "{status:#?}");
}

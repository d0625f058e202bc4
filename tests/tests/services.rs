//! Service VIPs on a namespaced host: balance over real backends, client affinity, stickiness
//! of a long-lived connection while backends come and go, immediate refusal without backends,
//! and a published port leading to a service.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use dataplane_tests::{Agent, Sandbox, StatusExt as _, docker::TestCgroup, in_netns};

const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: client
    interfaces: [{network: front, ip: 172.30.1.9, mac: "02:42:ac:1e:01:09", host_veth: veth-client}]
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
  - name: web3
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.4, mac: "02:42:ac:1e:01:04", host_veth: veth-web3}]
services:
  - {name: web, vip: 10.96.0.10, port: 80, selector: {app: web}}
  - {name: sticky, vip: 10.96.0.11, port: 80, selector: {app: web}, algorithm: source_hash}
  - {name: empty, vip: 10.96.0.12, port: 80, selector: {app: nothing}}
ports:
  - {service: web, protocol: tcp, host_port: 8000, container_port: 80}
"#;

/// One HTTP request on a fresh connection; the server's answer (`NAME PEER_IP:PORT`).
fn ask_full(addr: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// One HTTP request on a fresh connection; the name of the server that answered.
fn ask(addr: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// `count` connections from `netns` to `addr`, 8 at a time; how many each server answered.
fn spread(
    sandbox: &Sandbox,
    netns: &str,
    addr: &'static str,
    count: usize,
) -> BTreeMap<String, usize> {
    in_netns(&sandbox.netns(netns), move || {
        // Threads made here share this thread's namespace.
        let workers: Vec<_> = (0..8)
            .map(|w| {
                std::thread::spawn(move || {
                    let mut seen = BTreeMap::new();
                    for _ in (w..count).step_by(8) {
                        let name = ask(addr).expect("a connection through the VIP");
                        *seen.entry(name).or_insert(0) += 1;
                    }
                    seen
                })
            })
            .collect();
        let mut total = BTreeMap::new();
        for worker in workers {
            for (name, n) in worker.join().unwrap() {
                *total.entry(name).or_insert(0) += n;
            }
        }
        total
    })
}

#[test]
fn three_thousand_connections_spread_evenly_over_three_backends() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    let counts = spread(&sandbox, "client", "10.96.0.10:80", 3000);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        assert!(
            (900..=1100).contains(n),
            "{backend}: {n} of 3000, not within 10%: {counts:?}"
        );
    }
}

#[test]
fn source_hash_keeps_a_client_on_one_backend() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    let counts = spread(&sandbox, "client", "10.96.0.11:80", 50);
    assert_eq!(counts.len(), 1, "{counts:?}");
}

#[test]
fn a_published_port_leads_to_the_service() {
    let sandbox = Sandbox::up(SPEC);
    let _agent = Agent::start(&sandbox);
    let counts = spread(&sandbox, "outside", "192.0.2.1:8000", 300);
    assert_eq!(counts.len(), 3, "north-south balances too: {counts:?}");
}

#[test]
fn a_service_without_backends_refuses_at_once_and_counts_it() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let started = Instant::now();
    let err = in_netns(&sandbox.netns("client"), || ask("10.96.0.12:80")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not after retries"
    );
    agent.wait_for("a counted drop", |s| {
        s.drops("SERVICE_BACKEND_NOT_FOUND") >= 1
    });
}

/// A keep-alive connection of the client to the VIP.
struct KeepAlive(TcpStream);

impl KeepAlive {
    fn open(sandbox: &Sandbox) -> KeepAlive {
        let stream = in_netns(&sandbox.netns("client"), || {
            TcpStream::connect_timeout(&"10.96.0.10:80".parse().unwrap(), Duration::from_secs(3))
        })
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        KeepAlive(stream)
    }

    fn who(&mut self) -> std::io::Result<String> {
        self.0.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut buf = [0u8; 512];
        let mut text = String::new();
        while !(text.contains("\r\n\r\n") && text.ends_with('\n')) {
            let n = self.0.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        Ok(body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    }
}

#[test]
fn a_long_lived_connection_keeps_its_backend_while_others_come_and_go() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let mut conn = KeepAlive::open(&sandbox);
    let mine = conn.who().unwrap();
    let others: Vec<&str> = ["web1", "web2", "web3"]
        .into_iter()
        .filter(|w| *w != mine)
        .collect();

    // Another backend leaves the service (its label changes): my connection stays put.
    let relabelled = SPEC.replacen(
        &format!("  - name: {}\n    labels: {{app: web}}", others[0]),
        &format!("  - name: {}\n    labels: {{app: other}}", others[0]),
        1,
    );
    sandbox.write_state(&relabelled);
    agent.wait_for("two backends", |s| s.map_entries("dp_backends_v1") == 4);
    assert_eq!(conn.who().unwrap(), mine);
    // It comes back: still put.
    sandbox.write_state(SPEC);
    agent.wait_for("three backends", |s| s.map_entries("dp_backends_v1") == 6);
    assert_eq!(conn.who().unwrap(), mine);

    // My own backend's container goes away: the connection ends with a reset rather than
    // hanging on an address nobody answers.
    let mut lines: Vec<&str> = SPEC.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == format!("  - name: {mine}"))
        .expect("my backend in the spec");
    lines.drain(at..at + 3); // name, labels, interfaces
    let without_mine = lines.join("\n") + "\n";
    sandbox.write_state(&without_mine);
    agent.wait_for("my backend gone", |s| {
        !s.endpoint_names().contains(mine.as_str())
    });
    let after = conn.who();
    assert!(
        after.is_err(),
        "the connection to a departed backend ends: {after:?}"
    );
}

/// A backend calling its own service's VIP (a Compose service whose replicas call each other
/// by the service name): every call is answered, also when Maglev picks the caller itself,
/// which then sees the call come from its network's gateway (hairpin, as Docker does it).
#[test]
fn a_backend_calling_its_own_vip_is_answered_every_time() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let answers: Vec<String> = in_netns(&sandbox.netns("web1"), || {
        (0..30)
            .map(|i| ask_full("10.96.0.10:80").unwrap_or_else(|e| format!("call {i}: {e}")))
            .collect()
    });
    let answered: Vec<&String> = answers.iter().filter(|a| a.starts_with("web")).collect();
    assert_eq!(answered.len(), 30, "30 of 30 calls answered: {answers:#?}");
    let own: Vec<&&String> = answered.iter().filter(|a| a.starts_with("web1 ")).collect();
    assert!(
        !own.is_empty(),
        "Maglev picked the caller itself: {answers:#?}"
    );
    for answer in &own {
        assert!(
            answer.starts_with("web1 172.30.1.1:"),
            "from the gateway: {answer}"
        );
    }
    for answer in answered.iter().filter(|a| !a.starts_with("web1 ")) {
        assert!(
            answer.contains(" 172.30.1.2:"),
            "another backend sees the caller's own address: {answer}"
        );
    }
    let status = agent.status();
    assert_eq!(status.drops("NO_MAPPING_FOR_NAT_MASQUERADE"), 0);
}

// Host processes (in the sandbox host's cgroup, where the agent's socket hooks are) reach the
// VIPs too: translated at connect() and sendmsg(), balanced with the same Maglev tables.

/// [`SPEC`] with a UDP service over the same backends, and a policy line if given.
fn host_spec(policies: &str) -> String {
    SPEC.replacen(
        "ports:\n",
        "  - {name: dns, vip: 10.96.0.13, port: 53, protocol: udp, target_port: 80, \
         selector: {app: web}}\nports:\n",
        1,
    ) + policies
}

/// `count` HTTP requests from one curl in the host's cgroup, each on a new connection (the
/// server closes after `Connection: close`); who answered each, and whom it saw.
fn host_curl(sandbox: &Sandbox, url: &str, count: usize) -> Vec<(String, String)> {
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-H", "Connection: close"];
    cmd.extend(std::iter::repeat_n(url, count));
    let out = sandbox.exec_ok("host", &cmd);
    pairs(&out)
}

/// The `NAME ADDR:PORT` lines of the sandbox servers' replies, as (name, address seen).
fn pairs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?.to_owned();
            let seen = words.next()?.rsplit_once(':')?.0.to_owned();
            Some((name, seen))
        })
        .collect()
}

/// A Python client in the host's cgroup: `count` datagrams, each from a new unconnected UDP
/// socket (sendto/recvfrom), to `addr`:`port`; per reply the address it came from (what
/// recvfrom says) and the reply itself.
const UDP_CLIENT: &str = r#"
import socket, sys
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"hi", (addr, port))
    data, peer = s.recvfrom(512)
    print("%s:%d %s" % (peer[0], peer[1], data.decode().strip()))
    s.close()
"#;

fn host_udp(sandbox: &Sandbox, addr: &str, port: u16, count: usize) -> Vec<(String, String)> {
    let out = sandbox.exec_ok(
        "host",
        &[
            "/usr/bin/python3",
            "-c",
            UDP_CLIENT,
            addr,
            &port.to_string(),
            &count.to_string(),
        ],
    );
    // "PEER NAME ADDR:PORT": (peer, name)
    out.lines()
        .map(|l| {
            let mut words = l.split_whitespace();
            let peer = words.next().unwrap_or_default().to_owned();
            let name = words.next().unwrap_or_default().to_owned();
            (peer, name)
        })
        .collect()
}

#[test]
fn host_processes_reach_a_vip_over_tcp_spread_evenly_over_every_backend() {
    let sandbox = Sandbox::up(&host_spec(""));
    let agent = Agent::start(&sandbox);
    let answers = host_curl(&sandbox, "http://10.96.0.10/", 300);
    assert_eq!(answers.len(), 300, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    eprintln!("300 host connections to the VIP, per backend: {names:?}");
    assert_eq!(
        names.keys().copied().collect::<Vec<_>>(),
        ["web1", "web2", "web3"],
        "every backend over 300 connections: {names:?}"
    );
    // Even, as Maglev spreads them (100 each; 30 off is almost 4 standard deviations).
    for (backend, n) in &names {
        assert!((70..=130).contains(n), "{backend}: {n} of 300: {names:?}");
    }
    // Straight to the backend from the host's address on its bridge (no proxy, no NAT).
    assert!(
        answers.iter().all(|(_, seen)| seen == "172.30.1.1"),
        "{answers:?}"
    );
    // The flow record names the service and the backend, seen at the connect hook.
    let record = agent.wait_for_record("a host connection to the VIP", |r| {
        r["flow"]["destination_service"]["name"] == "web"
            && r["flow"]["source"]["labels"][0] == "reserved:host"
    });
    let flow = &record["flow"];
    assert_eq!(flow["verdict"], "FORWARDED", "{record}");
    assert!(
        flow["IP"]["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with("172.30.1.")),
        "{record}"
    );
    assert_eq!(flow["l4"]["TCP"]["destination_port"], 80, "{record}");
}

#[test]
fn host_processes_reach_a_udp_vip_and_the_reply_comes_from_the_vip() {
    let sandbox = Sandbox::up(&host_spec(""));
    let agent = Agent::start(&sandbox);
    // Unconnected sockets: sendmsg4 translates each datagram, recvmsg4 the reply's source.
    let replies = host_udp(&sandbox, "10.96.0.13", 53, 30);
    assert_eq!(replies.len(), 30, "{replies:?}");
    // One reverse entry per socket and backend, shown in the map fill levels.
    let status = agent.status();
    assert!(
        status.map_entries("dp_sock_rev_nat_v1") >= 30,
        "{:?}",
        status.maps
    );
    assert!(
        replies.iter().all(|(peer, _)| peer == "10.96.0.13:53"),
        "every reply from the VIP: {replies:?}"
    );
    let per_backend = per_name(replies.iter().map(|(_, n)| n.as_str()));
    eprintln!("30 host UDP sockets to the VIP, per backend: {per_backend:?}");
    let names: std::collections::BTreeSet<&str> = replies.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["web1", "web2", "web3"],
        "{replies:?}"
    );
    // getpeername() of a translated socket says the VIP (getpeername4).
    let peer = sandbox.exec_ok(
        "host",
        &[
            "/usr/bin/python3",
            "-c",
            "import socket; s = socket.create_connection(('10.96.0.10', 80), 5); \
             print('%s:%d' % s.getpeername())",
        ],
    );
    assert_eq!(peer.trim(), "10.96.0.10:80");
    // A connected UDP socket (nc -u connects): connect4 translates it.
    let reply = sandbox.exec_ok("host", &["sh", "-c", "echo hi | nc -u -w1 10.96.0.13 53"]);
    assert!(reply.starts_with("web"), "{reply:?}");
}

#[test]
fn a_vip_without_backends_refuses_host_processes_at_once_and_counts_it() {
    let sandbox = Sandbox::up(&host_spec(""));
    let agent = Agent::start(&sandbox);
    let started = Instant::now();
    let out = sandbox.exec(
        "host",
        &["curl", "-sS", "--max-time", "10", "http://10.96.0.12/"],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: could not connect: {out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after retries"
    );
    // The errno is ECONNREFUSED, as a container's client gets from the packet path's reset.
    let out = sandbox.exec(
        "host",
        &[
            "/usr/bin/python3",
            "-c",
            "import socket; socket.create_connection(('10.96.0.12', 80), 5)",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ConnectionRefusedError"), "{stderr}");
    agent.wait_for("a counted drop", |s| {
        s.drops("SERVICE_BACKEND_NOT_FOUND") >= 1
    });
    let record = agent.wait_for_record("the drop's record", |r| r["flow"]["verdict"] == "DROPPED");
    let flow = &record["flow"];
    assert_eq!(flow["drop_reason"], 158, "{record}");
    assert_eq!(flow["destination_service"]["name"], "empty", "{record}");
    assert_eq!(flow["IP"]["destination"], "10.96.0.12", "{record}");
    assert_eq!(flow["source"]["labels"][0], "reserved:host", "{record}");
}

#[test]
fn policy_judges_host_connections_to_a_vip_by_their_backend() {
    // Written against the service's backends (their labels), as for containers' connections:
    // the host is denied, over TCP and UDP alike.
    let policy = "policies:\n  - {name: no-web, action: deny, to: {labels: {app: web}}}\n";
    let sandbox = Sandbox::up(&host_spec(policy));
    let agent = Agent::start(&sandbox);
    let out = sandbox.exec(
        "host",
        &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"],
    );
    assert!(!out.status.success(), "{out:?}");
    let udp = sandbox.exec(
        "host",
        &[
            "/usr/bin/python3",
            "-c",
            UDP_CLIENT,
            "10.96.0.13",
            "53",
            "1",
        ],
    );
    assert!(!udp.status.success(), "{udp:?}");
    assert!(
        String::from_utf8_lossy(&udp.stderr).contains("PermissionError"),
        "{udp:?}"
    );
    agent.wait_for("policy drops counted", |s| s.drops("POLICY_DENY") >= 2);
    // Lifting the rule lets the host in again.
    sandbox.write_state(&host_spec(""));
    agent.wait_for("rule gone", |s| {
        s.drops("POLICY_DENY") >= 2 && s.last_error.is_none()
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while host_curl_once(&sandbox).is_none() {
        assert!(Instant::now() < deadline, "the host never got back in");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn host_curl_once(sandbox: &Sandbox) -> Option<String> {
    let out = sandbox.exec(
        "host",
        &["curl", "-sS", "--max-time", "5", "http://10.96.0.10/"],
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

// Containers' processes in a cgroup the agent's container hooks are attached to
// (`--container-cgroup`): their connections to VIPs are translated at connect() and
// sendmsg() too (the sandbox gives each endpoint's namespace in `netns`), judged with the
// container as source, and reported once, by the packet path, as the service's.

/// A cgroup of the test's own and the agent on `spec` with its container hooks there.
fn container_hooked(spec: &str, name: &str) -> (Sandbox, TestCgroup, Agent) {
    let sandbox = Sandbox::up(spec);
    let cgroup = TestCgroup::create(&dataplane_tests::unique_name(name)).unwrap();
    let agent = Agent::start_with(&sandbox, &["--container-cgroup", cgroup.path_str()]);
    (sandbox, cgroup, agent)
}

/// Runs `cmd` in endpoint `target`'s namespace as a process of `cgroup`.
fn in_container(sandbox: &Sandbox, cgroup: &TestCgroup, target: &str, cmd: &[&str]) -> Output {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{}", sandbox.netns(target)))
        .arg("--")
        .args(cmd);
    cgroup.enter(&mut command);
    command
        .stdin(Stdio::null())
        .output()
        .expect("running a command in a container's namespace")
}

fn in_container_ok(sandbox: &Sandbox, cgroup: &TestCgroup, target: &str, cmd: &[&str]) -> String {
    let out = in_container(sandbox, cgroup, target, cmd);
    assert!(out.status.success(), "{cmd:?} in {target}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`UDP_CLIENT`] in container `target`: `count` datagrams to `addr`:`port`, each from a
/// new unconnected socket; per reply (the address it came from, the server's name). Fails
/// unless every datagram was answered.
fn container_udp(
    sandbox: &Sandbox,
    cgroup: &TestCgroup,
    target: &str,
    addr: &str,
    port: u16,
    count: usize,
) -> Vec<(String, String)> {
    let (port, count_text) = (port.to_string(), count.to_string());
    let cmd = [
        "/usr/bin/python3",
        "-c",
        UDP_CLIENT,
        addr,
        &port,
        &count_text,
    ];
    let udp = in_container_ok(sandbox, cgroup, target, &cmd);
    let replies: Vec<(String, String)> = udp
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(peer, rest)| {
            let name = rest.split_whitespace().next().unwrap_or_default();
            (peer.to_owned(), name.to_owned())
        })
        .collect();
    assert_eq!(replies.len(), count, "{udp}");
    replies
}

fn per_name<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, usize> {
    names.fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n).or_insert(0) += 1;
        m
    })
}

/// An overlay network's VIP on every port, as the Docker source writes a Swarm VIP (here in
/// the state file): backends by address (web1's and web2's, reached by routing), each port
/// to itself, translated at connect()/sendmsg() for the sockets of a container on that
/// overlay only.
const OVERLAY_SERVICES: &str = concat!(
    "  - {name: far, vip: 10.96.0.20, port: 0, overlay: ov, addresses: {far1: 172.30.1.2, far2: 172.30.1.3}}\n",
    "  - {name: far-udp, vip: 10.96.0.20, port: 0, protocol: udp, overlay: ov, addresses: {far1: 172.30.1.2, far2: 172.30.1.3}}\n",
);

#[test]
fn an_overlay_vip_on_every_port_is_translated_for_the_containers_on_it_only() {
    let spec = host_spec("")
        .replacen(
            "  - name: client\n",
            "  - name: client\n    overlays: [ov]\n",
            1,
        )
        .replacen("services:\n", &format!("services:\n{OVERLAY_SERVICES}"), 1);
    let (sandbox, cgroup, agent) = container_hooked(&spec, "sock-overlay");
    agent.wait_for("the containers' namespaces known", |s| {
        s.map_entries("dp_sock_netns_v1") >= 4
    });
    // The client, on the overlay: every connection to one of the two addresses, which see
    // the client itself.
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-H", "Connection: close"];
    cmd.extend(std::iter::repeat_n("http://10.96.0.20/", 40));
    let answers = pairs(&in_container_ok(&sandbox, &cgroup, "client", &cmd));
    assert_eq!(answers.len(), 40, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    assert_eq!(
        names.keys().copied().collect::<Vec<_>>(),
        ["web1", "web2"],
        "{names:?}"
    );
    assert!(
        answers.iter().all(|(_, seen)| seen == "172.30.1.9"),
        "{answers:?}"
    );
    // Another port leads to that port of a backend, where nothing listens: refused at once
    // (a reset from the backend), not left to time out as an unanswered VIP is.
    let other = in_container(
        &sandbox,
        &cgroup,
        "client",
        &["curl", "-sS", "--max-time", "3", "http://10.96.0.20:81/"],
    );
    assert_eq!(
        other.status.code(),
        Some(7),
        "curl's 'could not connect': {other:?}"
    );
    // UDP, unconnected sockets: replies from the VIP, from both backends.
    let replies = container_udp(&sandbox, &cgroup, "client", "10.96.0.20", 80, 20);
    assert!(
        replies.iter().all(|(peer, _)| *peer == "10.96.0.20:80"),
        "{replies:?}"
    );
    assert_eq!(
        per_name(replies.iter().map(|(_, n)| n.as_str())).len(),
        2,
        "{replies:?}"
    );
    // The client's records name the service.
    agent.wait_for_record("a record of the client's connection naming far", |r| {
        r["flow"]["source"]["pod_name"] == "client"
            && r["flow"]["destination_service"]["name"] == "far"
    });

    // A container on no overlay and a host process: left alone, so the VIP (which is on no
    // interface) does not answer them.
    let web3 = in_container(
        &sandbox,
        &cgroup,
        "web3",
        &["curl", "-sS", "--max-time", "3", "http://10.96.0.20/"],
    );
    assert!(
        !web3.status.success(),
        "web3 reached the overlay's VIP: {web3:?}"
    );
    let host = sandbox.exec(
        "host",
        &["curl", "-sS", "--max-time", "3", "http://10.96.0.20/"],
    );
    assert!(
        !host.status.success(),
        "the host reached the overlay's VIP: {host:?}"
    );
}

#[test]
fn a_container_reaches_a_vip_translated_at_its_socket_over_tcp_and_udp() {
    let (sandbox, cgroup, agent) = container_hooked(&host_spec(""), "sock-container");
    let status = agent.wait_for("the client's namespace known", |s| {
        s.map_entries("dp_sock_netns_v1") >= 4
    });
    let on_cgroup = status
        .attached()
        .into_iter()
        .filter(|(target, _)| target == cgroup.path_str())
        .count();
    assert_eq!(
        on_cgroup,
        8,
        "the eight hooks (both families): {:?}",
        status.attached()
    );
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-H", "Connection: close"];
    cmd.extend(std::iter::repeat_n("http://10.96.0.10/", 150));
    let answers = pairs(&in_container_ok(&sandbox, &cgroup, "client", &cmd));
    assert_eq!(answers.len(), 150, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    eprintln!("150 container connections to the VIP, per backend: {names:?}");
    assert_eq!(
        names.keys().copied().collect::<Vec<_>>(),
        ["web1", "web2", "web3"],
        "{names:?}"
    );
    // Maglev over the socket cookies: 50 each; 25 off is 4 standard deviations.
    for (backend, n) in &names {
        assert!((25..=75).contains(n), "{backend}: {n} of 150: {names:?}");
    }
    // The backends see the container itself (no NAT on either path).
    assert!(
        answers.iter().all(|(_, seen)| seen == "172.30.1.9"),
        "{answers:?}"
    );
    // Translated at the socket: one reverse entry per connect(), and the packet path found
    // the service the socket asked for.
    let status = agent.status();
    assert!(
        status.map_entries("dp_sock_rev_nat_v1") >= 150,
        "{:?}",
        status.maps
    );
    assert!(
        status.map_entries("dp_sock_lb_v1") >= 3,
        "{:?}",
        status.maps
    );
    // UDP, unconnected sockets: each reply from the VIP (recvmsg4), every backend used.
    let replies = container_udp(&sandbox, &cgroup, "client", "10.96.0.13", 53, 30);
    assert!(
        replies.iter().all(|(peer, _)| *peer == "10.96.0.13:53"),
        "{replies:?}"
    );
    let names = per_name(replies.iter().map(|(_, n)| n.as_str()));
    eprintln!("30 container UDP sockets to the VIP, per backend: {names:?}");
    assert_eq!(names.len(), 3, "{names:?}");
    // getpeername() says the VIP.
    let peer = in_container_ok(
        &sandbox,
        &cgroup,
        "client",
        &[
            "/usr/bin/python3",
            "-c",
            "import socket; s = socket.create_connection(('10.96.0.10', 80), 5); \
             print('%s:%d' % s.getpeername())",
        ],
    );
    assert_eq!(peer.trim(), "10.96.0.10:80");

    // Flow records: one per connection, each naming the service and its backend, with the
    // container as source (as the packet path's records do).
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let records = agent.observe(&["--last", "1000"]);
        let new: Vec<serde_json::Value> = records
            .into_iter()
            .filter(|r| {
                r["flow"]["connection"]["event"] == "new"
                    && r["flow"]["source"]["pod_name"] == "client"
                    && r["flow"]["l4"]["TCP"].is_object()
            })
            .collect();
        if new.len() >= 151 || Instant::now() > deadline {
            break new;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        records.len(),
        151,
        "one record per connection (150 + getpeername's)"
    );
    for record in &records {
        let flow = &record["flow"];
        assert_eq!(flow["destination_service"]["name"], "web", "{record}");
        assert_eq!(flow["verdict"], "FORWARDED", "{record}");
        assert_eq!(flow["l4"]["TCP"]["destination_port"], 80, "{record}");
        assert!(
            ["web1", "web2", "web3"]
                .contains(&flow["destination"]["pod_name"].as_str().unwrap_or("")),
            "the backend: {record}"
        );
    }
    let udp_record = agent.wait_for_record("a UDP record naming the service", |r| {
        r["flow"]["source"]["pod_name"] == "client"
            && r["flow"]["destination_service"]["name"] == "dns"
    });
    assert!(
        udp_record["flow"]["IP"]["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with("172.30.1.")),
        "{udp_record}"
    );
    assert_eq!(status.drops("POLICY_DENIED"), 0);
}

#[test]
fn policy_denies_a_containers_vip_connection_at_its_socket() {
    // The client may not reach the web backends: refused at connect() (EPERM) and sendmsg(),
    // counted, and recorded with the container as source.
    let policy = "policies:\n  - {name: no-web, action: deny, from: {endpoint: client}, \
                  to: {labels: {app: web}}}\n";
    let (sandbox, cgroup, agent) = container_hooked(&host_spec(policy), "sock-deny");
    agent.wait_for("the client's namespace known", |s| {
        s.map_entries("dp_sock_netns_v1") >= 4
    });
    let tcp = in_container(
        &sandbox,
        &cgroup,
        "client",
        &[
            "/usr/bin/python3",
            "-c",
            "import socket; socket.create_connection(('10.96.0.10', 80), 5)",
        ],
    );
    assert!(
        String::from_utf8_lossy(&tcp.stderr).contains("PermissionError"),
        "refused at connect(): {tcp:?}"
    );
    let udp = in_container(
        &sandbox,
        &cgroup,
        "client",
        &[
            "/usr/bin/python3",
            "-c",
            UDP_CLIENT,
            "10.96.0.13",
            "53",
            "1",
        ],
    );
    assert!(
        String::from_utf8_lossy(&udp.stderr).contains("PermissionError"),
        "{udp:?}"
    );
    agent.wait_for("policy drops counted", |s| s.drops("POLICY_DENY") >= 2);
    let record = agent.wait_for_record("the drop's record", |r| {
        r["flow"]["verdict"] == "DROPPED" && r["flow"]["source"]["pod_name"] == "client"
    });
    assert_eq!(
        record["flow"]["drop_reason_desc"], "POLICY_DENY",
        "{record}"
    );
    // Another container, not denied, still gets through at its socket.
    let out = in_container_ok(
        &sandbox,
        &cgroup,
        "web1",
        &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"],
    );
    assert!(out.starts_with("web"), "{out}");
}

#[test]
fn without_the_container_hooks_the_packet_path_balances_the_same_clients() {
    // The same client process in a cgroup of its own, but the agent has no container
    // hooks: the VIP is translated per packet at the client's veth, as before.
    let sandbox = Sandbox::up(&host_spec(""));
    let cgroup = TestCgroup::create(&dataplane_tests::unique_name("sock-none")).unwrap();
    let agent = Agent::start(&sandbox);
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-H", "Connection: close"];
    cmd.extend(std::iter::repeat_n("http://10.96.0.10/", 60));
    let answers = pairs(&in_container_ok(&sandbox, &cgroup, "client", &cmd));
    assert_eq!(answers.len(), 60, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    assert_eq!(names.len(), 3, "{names:?}");
    let status = agent.status();
    assert_eq!(
        status.map_entries("dp_sock_rev_nat_v1"),
        0,
        "{:?}",
        status.maps
    );
    assert_eq!(status.map_entries("dp_sock_lb_v1"), 0, "{:?}", status.maps);
    let record = agent.wait_for_record("a record naming the service", |r| {
        r["flow"]["source"]["pod_name"] == "client"
            && r["flow"]["destination_service"]["name"] == "web"
    });
    assert_eq!(record["flow"]["verdict"], "FORWARDED", "{record}");
}

#[test]
fn host_processes_reach_a_vip_over_ipv6_sockets_its_ipv4_backends_v4_mapped() {
    // The web service gets an IPv6 VIP too, fd00::10: a dual-stack service (one id, one
    // Maglev table). Its backends have no IPv6 address: the reconciler gives them their
    // IPv4-mapped one in dp_backends6_v1, and they are reached over IPv4.
    let spec = SPEC.replace(
        "{name: web, vip: 10.96.0.10,",
        "{name: web, vip: 10.96.0.10, vip6: \"fd00::10\",",
    );
    assert_ne!(spec, SPEC, "the web service's line in SPEC changed");
    let sandbox = Sandbox::up(&spec);
    let _agent = Agent::start(&sandbox);
    let answers = host_curl(&sandbox, "http://[fd00::10]/", 60);
    assert_eq!(answers.len(), 60, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    assert_eq!(
        names.keys().copied().collect::<Vec<_>>(),
        ["web1", "web2", "web3"],
        "every backend over 60 connections: {names:?}"
    );
    assert!(
        answers.iter().all(|(_, seen)| seen == "172.30.1.1"),
        "{answers:?}"
    );
    // The socket still says the VIP it connected to.
    let script = "import socket\n\
        s = socket.create_connection(('fd00::10', 80), timeout=5)\n\
        p = s.getpeername()\n\
        print(p[0], p[1], s.recv(256).decode().strip())";
    let out = sandbox.exec_ok("host", &["/usr/bin/python3", "-c", script]);
    assert!(out.starts_with("fd00::10 80 web"), "{out:?}");
}

/// A dual-stack network: the client and two backends with IPv6 addresses too, a service with
/// an IPv6 VIP, and a port published on every host address (IPv6 included) leading to it.
const SPEC_DUAL: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
endpoints:
  - name: client
    interfaces: [{network: front, ip: 172.30.1.9, ip6: "fd00:30:1::9", mac: "02:42:ac:1e:01:09", host_veth: veth-client}]
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.3, ip6: "fd00:30:1::3", mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
services:
  - {name: web, vip: 10.96.0.10, vip6: "fd00::10", port: 80, selector: {app: web}}
  - {name: empty, vip: 10.96.0.12, vip6: "fd00::12", port: 80, selector: {app: nothing}}
ports:
  - {service: web, protocol: tcp, host_port: 8000, container_port: 80}
"#;

/// `count` HTTP requests over IPv6 from one curl in `target`'s namespace (not in a cgroup
/// the socket hooks are attached to), each on a new connection; (who answered, whom it saw).
fn curl6(sandbox: &Sandbox, target: &str, url: &str, count: usize) -> Vec<(String, String)> {
    let mut cmd = vec![
        "curl",
        "-6",
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Connection: close",
    ];
    cmd.extend(std::iter::repeat_n(url, count));
    pairs(&sandbox.exec_ok(target, &cmd))
}

#[test]
fn a_container_reaches_an_ipv6_vip_through_the_packet_path_and_outside_a_published_port() {
    let sandbox = Sandbox::up(SPEC_DUAL);
    let agent = Agent::start(&sandbox);
    // The client's processes are in no cgroup the socket hooks cover: its connections to the
    // VIP are translated per packet at its veth (tc), over IPv6.
    let answers = curl6(&sandbox, "client", "http://[fd00::10]/", 40);
    assert_eq!(answers.len(), 40, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    assert_eq!(
        names.keys().copied().collect::<Vec<_>>(),
        ["web1", "web2"],
        "both backends over 40 connections: {names:?}"
    );
    // The backends see the client itself (no NAT).
    assert!(
        answers
            .iter()
            .all(|(_, seen)| seen.contains("fd00:30:1::9")),
        "{answers:?}"
    );
    // Tracked at tc (IPv6 conntrack), nothing translated at a socket.
    let status = agent.status();
    assert!(status.map_entries("dp_ct6_v1") >= 2, "{:?}", status.maps);
    assert_eq!(status.map_entries("dp_sock_lb_v1"), 0, "{:?}", status.maps);
    // The flow record names the service and the backend, as IPv4's.
    let record = agent.wait_for_record("an IPv6 record naming the service", |r| {
        r["flow"]["source"]["pod_name"] == "client"
            && r["flow"]["destination_service"]["name"] == "web"
    });
    assert_eq!(record["flow"]["verdict"], "FORWARDED", "{record}");
    assert!(
        ["web1", "web2"].contains(
            &record["flow"]["destination"]["pod_name"]
                .as_str()
                .unwrap_or("")
        ),
        "the backend: {record}"
    );
    assert!(
        record["flow"]["IP"]["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with("fd00:30:1::")),
        "{record}"
    );

    // A backend calling its own VIP: answered every time, by itself too (hairpin: back
    // through its gateway).
    let answers = curl6(&sandbox, "web1", "http://[fd00::10]/", 20);
    assert_eq!(answers.len(), 20, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    assert!(names.contains_key("web1"), "{names:?}");

    // From outside, the port published on the host's IPv6 address leads to the service.
    let answers = curl6(&sandbox, "outside", "http://[2001:db8::1]:8000/", 30);
    assert_eq!(answers.len(), 30, "{answers:?}");
    let names = per_name(answers.iter().map(|(n, _)| n.as_str()));
    assert_eq!(names.len(), 2, "north-south balances too: {names:?}");
    assert!(
        answers.iter().all(|(_, seen)| seen.contains("2001:db8::2")),
        "the backends see the outside client: {answers:?}"
    );

    // A VIP without backends: refused at once (a reset from the VIP), and counted.
    let started = Instant::now();
    let out = sandbox.exec(
        "client",
        &[
            "/usr/bin/python3",
            "-c",
            "import socket; socket.create_connection(('fd00::12', 80), 5)",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ConnectionRefusedError"),
        "{out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused at once, not after retries"
    );
    agent.wait_for("the refusal counted", |s| {
        s.drops("SERVICE_BACKEND_NOT_FOUND") >= 1
    });
}

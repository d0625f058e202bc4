//! Flow logs on a namespaced host: known connections (a published port from outside, container
//! to container over TCP and UDP, a service VIP, masquerade to the outside) give exactly their
//! flows with the right ends, ports, verdicts and translations; a connection to a service
//! without backends gives a DROPPED flow with its reason; `observe` filters, follows, and the
//! JSON-lines export writes what it shows.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use dataplane_tests::{Agent, Sandbox, dataplane_bin, in_netns};
use serde_json::Value;

const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: client
    labels: {role: client}
    interfaces: [{network: front, ip: 172.30.1.9, mac: "02:42:ac:1e:01:09", host_veth: veth-client}]
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
services:
  - {name: web, vip: 10.96.0.10, port: 80, selector: {app: web}}
  - {name: empty, vip: 10.96.0.12, port: 80, selector: {app: nothing}}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

const HOST: &str = "192.0.2.1";
const OUTSIDE: &str = "192.0.2.2";
const CLIENT: &str = "172.30.1.9";
const WEB1: &str = "172.30.1.2";

/// `dataplane observe -o json-extended ARGS` against the agent: its records, with our
/// `connection` and `translation`.
fn observe(agent: &Agent, args: &[&str]) -> Vec<Value> {
    agent.observe(args)
}

fn observe_as(agent: &Agent, output: &str, args: &[&str]) -> Vec<Value> {
    agent.observe_as(output, args)
}

fn event(record: &Value) -> &str {
    record["flow"]["connection"]["event"].as_str().unwrap_or("")
}

/// Waits until the records of `observe --last 1000` satisfy `done`; returns them.
fn wait_for_records(agent: &Agent, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let records = observe(agent, &["--last", "1000"]);
        if done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; records:\n{}",
            records
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The port in a sandbox server's reply `NAME ADDR:PORT` (the client address it saw).
fn seen_port(reply: &str, name: &str, addr: &str) -> u16 {
    let seen = reply
        .trim()
        .strip_prefix(&format!("{name} {addr}:"))
        .unwrap_or_else(|| panic!("{name} answered {reply:?}, expected it to see {addr}"));
    seen.parse().unwrap()
}

/// What a NEW flow says, in a form to compare whole.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    verdict: String,
    protocol: String,
    source: String,
    source_port: u64,
    destination: String,
    destination_port: u64,
    direction: String,
    translation: Option<(String, String, String)>,
    service: Option<String>,
}

/// A container by its name, anything else by its address and reserved label.
fn end(endpoint: &Value, ip: &Value) -> String {
    match endpoint["pod_name"].as_str() {
        Some(name) => format!("{name} ({})", endpoint["namespace"].as_str().unwrap()),
        None => format!(
            "{} ({})",
            ip.as_str().unwrap(),
            endpoint["labels"][0].as_str().unwrap()
        ),
    }
}

fn seen(record: &Value) -> Seen {
    let flow = &record["flow"];
    let (protocol, l4) = flow["l4"]
        .as_object()
        .and_then(|o| o.iter().next())
        .expect("l4");
    Seen {
        verdict: flow["verdict"].as_str().unwrap().into(),
        protocol: protocol.clone(),
        source: end(&flow["source"], &flow["IP"]["source"]),
        source_port: l4["source_port"].as_u64().unwrap(),
        destination: end(&flow["destination"], &flow["IP"]["destination"]),
        destination_port: l4["destination_port"].as_u64().unwrap(),
        direction: flow["traffic_direction"].as_str().unwrap().into(),
        translation: flow.get("translation").map(|t| {
            (
                t["kind"].as_str().unwrap().into(),
                t["original"].as_str().unwrap().into(),
                t["translated"].as_str().unwrap().into(),
            )
        }),
        service: flow["destination_service"]["name"].as_str().map(Into::into),
    }
}

#[test]
fn known_connections_give_exactly_their_flows_and_a_drop_its_reason() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let _outside_server = sandbox.serve_outside("9999", None);

    // 1. From outside through the published port.
    let reply = sandbox.exec_ok(
        "outside",
        &["curl", "-sS", "--max-time", "3", "http://192.0.2.1:8080/"],
    );
    let published_port = seen_port(&reply, "web1", OUTSIDE);
    // 2. Container to container, TCP.
    let reply = sandbox.exec_ok("client", &["nc", "-w3", WEB1, "80"]);
    let tcp_port = seen_port(&reply, "web1", CLIENT);
    // 3. Through the service VIP.
    let reply = sandbox.exec_ok(
        "client",
        &["curl", "-sS", "--max-time", "3", "http://10.96.0.10/"],
    );
    let vip_port = seen_port(&reply, "web1", CLIENT);
    // 4. Masqueraded to the outside: its server says which host port it saw.
    let reply = sandbox.exec_ok("web1", &["nc", "-w3", OUTSIDE, "9999"]);
    let masquerade_port = seen_port(&reply, "outside", HOST);
    // 5. Container to container, UDP.
    let reply = sandbox.exec_ok(
        "client",
        &["sh", "-c", &format!("echo hi | nc -u -w1 {WEB1} 80")],
    );
    let udp_port = seen_port(&reply, "web1", CLIENT);
    // And a service without backends: refused, a drop.
    let refused = sandbox.exec(
        "client",
        &["curl", "-sS", "--max-time", "3", "http://10.96.0.12/"],
    );
    assert!(!refused.status.success(), "{refused:?}");

    let records = wait_for_records(&agent, "5 new flows, a drop and 4 closes", |r| {
        let count = |e: &str| r.iter().filter(|x| event(x) == e).count();
        count("new") >= 5 && count("drop") >= 1 && count("close") >= 4
    });
    let new: BTreeSet<Seen> = records
        .iter()
        .filter(|r| event(r) == "new")
        .map(seen)
        .collect();
    let tcp = |verdict: &str, source: &str, sport: u16, destination: &str, dport: u16| Seen {
        verdict: verdict.into(),
        protocol: "TCP".into(),
        source: source.into(),
        source_port: sport.into(),
        destination: destination.into(),
        destination_port: dport.into(),
        // Cilium's direction: arriving at a container is its INGRESS.
        direction: "INGRESS".into(),
        translation: None,
        service: None,
    };
    let masquerade_sport = new
        .iter()
        .find(|s| s.destination_port == 9999)
        .map(|s| s.source_port as u16)
        .expect("a flow to port 9999");
    let expected: BTreeSet<Seen> = [
        Seen {
            translation: Some((
                "published_port".into(),
                "192.0.2.1:8080".into(),
                "172.30.1.2:80".into(),
            )),
            ..tcp(
                "FORWARDED",
                "192.0.2.2 (reserved:world)",
                published_port,
                "web1 (front)",
                80,
            )
        },
        tcp("FORWARDED", "client (front)", tcp_port, "web1 (front)", 80),
        Seen {
            translation: Some((
                "service".into(),
                "10.96.0.10:80".into(),
                "172.30.1.2:80".into(),
            )),
            service: Some("web".into()),
            ..tcp("FORWARDED", "client (front)", vip_port, "web1 (front)", 80)
        },
        Seen {
            direction: "EGRESS".into(),
            translation: Some((
                "masquerade".into(),
                format!("172.30.1.2:{masquerade_sport}"),
                format!("192.0.2.1:{masquerade_port}"),
            )),
            ..tcp(
                "FORWARDED",
                "web1 (front)",
                masquerade_sport,
                "192.0.2.2 (reserved:world)",
                9999,
            )
        },
        Seen {
            protocol: "UDP".into(),
            ..tcp("FORWARDED", "client (front)", udp_port, "web1 (front)", 80)
        },
    ]
    .into_iter()
    .collect();
    assert_eq!(new, expected);
    assert_eq!(
        records.iter().filter(|r| event(r) == "new").count(),
        5,
        "exactly one new flow per connection"
    );

    // Identity from the model.
    let to_web1 = records
        .iter()
        .find(|r| event(r) == "new" && r["flow"]["destination"]["pod_name"] == "web1")
        .unwrap();
    assert_eq!(
        to_web1["flow"]["destination"]["labels"][0],
        "container:app=web"
    );
    assert!(to_web1["flow"]["destination"]["identity"].as_u64().unwrap() >= 256);
    assert!(to_web1["flow"]["destination"]["ID"].as_u64().unwrap() >= 1);
    assert_eq!(to_web1["flow"]["Type"], "L3_L4");
    assert_eq!(to_web1["flow"]["is_reply"], false);
    assert_eq!(to_web1["flow"]["IP"]["ipVersion"], "IPv4");

    // The drop.
    let drops: Vec<&Value> = records.iter().filter(|r| event(r) == "drop").collect();
    assert_eq!(drops.len(), 1, "{drops:?}");
    let drop = &drops[0]["flow"];
    assert_eq!(drop["verdict"], "DROPPED");
    assert_eq!(drop["drop_reason_desc"], "SERVICE_BACKEND_NOT_FOUND");
    assert_eq!(drop["drop_reason"], 158);
    assert_eq!(drop["source"]["pod_name"], "client");
    assert_eq!(drop["IP"]["destination"], "10.96.0.12");
    assert_eq!(drop["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(drop["destination_service"]["name"], "empty");
    assert_eq!(drop["event_type"]["type"], 1);

    // Each TCP connection's close carries both directions' counters.
    for close in records.iter().filter(|r| event(r) == "close") {
        let c = &close["flow"]["connection"];
        assert!(c["packets"].as_u64().unwrap() >= 2, "{close}");
        assert!(c["reply_packets"].as_u64().unwrap() >= 2, "{close}");
    }

    // Filters.
    let dropped = observe(&agent, &["--last", "100", "--verdict", "DROPPED"]);
    assert_eq!(dropped.len(), 1);
    let udp = observe(&agent, &["--last", "100", "--protocol", "udp"]);
    assert_eq!(udp.len(), 1);
    assert_eq!(udp[0]["flow"]["l4"]["UDP"]["source_port"], udp_port);
    let to_outside = observe(&agent, &["--last", "100", "--port", "9999"]);
    assert!(to_outside.iter().all(|r| seen(r).destination_port == 9999));
    assert_eq!(to_outside.len(), 2, "new and close");
    let published = observe(
        &agent,
        &["--last", "100", "--port", "8080", "--from", "world"],
    );
    assert_eq!(published.len(), 2, "new and close of the published port");
    let from_client = observe(
        &agent,
        &["--last", "100", "--from", "client", "--to", "web"],
    );
    assert!(
        from_client
            .iter()
            .all(|r| r["flow"]["destination_service"]["name"] == "web")
    );
    assert_eq!(from_client.len(), 2, "the VIP connection: new and close");
    let last_two = observe(&agent, &["--last", "2"]);
    assert_eq!(last_two.len(), 2);
    assert_eq!(
        last_two[1],
        *records.last().unwrap(),
        "the latest come last"
    );
    // A filter that can never match is refused, not silently empty.
    let out = Command::new(dataplane_bin())
        .args(["observe", "--verdict", "OK", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Compact output, one line per record.
    let out = Command::new(dataplane_bin())
        .args([
            "observe",
            "--last",
            "100",
            "--verdict",
            "dropped",
            "--socket",
        ])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim()
            .ends_with(" -> empty:80 (world) Service backend not found DROPPED (TCP Flags: SYN)")
            && text.contains(": front/client:")
            && text.lines().count() == 1,
        "{text}"
    );
}

/// `dataplane observe --follow` as a child whose lines arrive on a channel.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(agent: &Agent, args: &[&str]) -> Follower {
        let mut child = Command::new(dataplane_bin())
            .args(["observe", "--follow", "-o", "json-extended", "--socket"])
            .arg(&agent.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting observe --follow");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The next record, within `limit`.
    fn next(&self, limit: Duration) -> Option<Value> {
        self.lines
            .recv_timeout(limit)
            .ok()
            .map(|l| serde_json::from_str(&l).unwrap())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn follow_streams_new_records_with_periodic_counters_and_the_export_has_them() {
    let sandbox = Sandbox::up(SPEC);
    let log = sandbox.dir.join("flows.json");
    let agent = Agent::start_with(
        &sandbox,
        &[
            "--flow-log",
            log.to_str().unwrap(),
            "--flow-log-format",
            "extended",
            "--flow-report-interval",
            "2",
        ],
    );
    // A first connection, so that `--last 1` gives the follower a line to wait for: once it
    // came, the follower is subscribed.
    sandbox.exec_ok("client", &["nc", "-w3", WEB1, "80"]);
    wait_for_records(&agent, "the first flow", |r| !r.is_empty());
    let follower = Follower::start(&agent, &["--last", "1", "--from", "world"]);
    let all = Follower::start(&agent, &["--last", "1"]);
    // Neither is from the world: `--last` counts matching records only.
    assert!(follower.next(Duration::from_secs(2)).is_none());
    all.next(Duration::from_secs(5))
        .expect("the unfiltered follower's history line");

    // Not from the world: filtered out.
    sandbox.exec_ok("client", &["nc", "-w3", WEB1, "80"]);
    // A keep-alive connection from outside, busy for a few report intervals.
    let mut conn = in_netns(&sandbox.netns("outside"), || {
        TcpStream::connect_timeout(&"192.0.2.1:8080".parse().unwrap(), Duration::from_secs(3))
    })
    .expect("connecting to the published port");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let local_port = conn.local_addr().unwrap().port();
    let first = follower
        .next(Duration::from_secs(5))
        .expect("the new connection streamed");
    assert_eq!(event(&first), "new");
    assert_eq!(first["flow"]["l4"]["TCP"]["source_port"], local_port);
    assert_eq!(first["flow"]["destination"]["pod_name"], "web1");

    let deadline = Instant::now() + Duration::from_secs(8);
    let mut update = None;
    while update.is_none() && Instant::now() < deadline {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = conn.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("web1"));
        while let Some(record) = follower.next(Duration::from_millis(300)) {
            if event(&record) == "update" {
                update = Some(record);
            }
        }
    }
    let update = update.expect("a periodic counter record of the open connection");
    assert_eq!(update["flow"]["l4"]["TCP"]["source_port"], local_port);
    assert!(
        update["flow"]["connection"]["reply_packets"]
            .as_u64()
            .unwrap()
            >= 2
    );
    drop(conn);
    let close = std::iter::from_fn(|| follower.next(Duration::from_secs(5)))
        .find(|r| event(r) == "close")
        .expect("the close streamed");
    assert_eq!(close["flow"]["l4"]["TCP"]["source_port"], local_port);

    // The export has every record the agent made (all still in its history), as JSON lines.
    let history = observe(&agent, &["--last", "1000"]);
    let exported: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for record in history.iter().chain([&first, &update, &close]) {
        assert!(exported.contains(record), "{record} not in the flow log");
    }
    let status = agent.status();
    assert_eq!(status.flows.lost, 0);
    assert!(status.flows.events);
    assert_eq!(status.flows.followers, 2);
}

const HUBBLE_SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
  - {name: back, bridge: br-back, subnet: 172.30.2.0/24, gateway: 172.30.2.1}
endpoints:
  - name: client
    labels: {role: client}
    interfaces: [{network: front, ip: 172.30.1.9, mac: "02:42:ac:1e:01:09", host_veth: veth-client}]
  - name: web1
    labels: {app: web, com.docker.compose.project: shop, com.docker.compose.service: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: db
    labels: {app: db}
    interfaces: [{network: back, ip: 172.30.2.5, mac: "02:42:ac:1e:02:05", host_veth: veth-db}]
services:
  - {name: web, vip: 10.96.0.10, port: 80, selector: {app: web}}
  - {name: empty, vip: 10.96.0.12, port: 80, selector: {app: nothing}}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
policies:
  - {name: no-port-81, action: deny, from: {endpoint: client}, to: {endpoint: web1}, ports: ["81/tcp"]}
"#;

/// Decodes one Hubble JSON line strictly (unknown fields and enum values are errors) with
/// the types generated from dataplane/proto.
fn strict(line: &str) -> dataplane::hubble::api::observer::GetFlowsResponse {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a valid Hubble flow ({e}): {line}"))
}

/// Every kind of record (published port, container to container, service, masquerade, and
/// the drops a host can be made to show: a deny rule, Docker's isolation, a service without
/// backends), each valid against Hubble's schema in the default output and the flow log;
/// read back through the Hubble API with the project's own gRPC client, and with the real
/// `hubble` CLI when HUBBLE_BIN names one.
#[test]
fn every_kind_of_record_is_a_valid_hubble_flow_served_over_hubbles_api() {
    let sandbox = Sandbox::up(HUBBLE_SPEC);
    let log = sandbox.dir.join("hubble-flows.json");
    let hubble_socket = format!("/run/dataplane/{}.hubble.sock", sandbox.name);
    let agent = Agent::start_with(&sandbox, &["--flow-log", log.to_str().unwrap()]);
    let outside_server = sandbox.serve_outside("9999", None);
    let curl = |from: &str, url: &str| {
        sandbox.exec(from, &["curl", "-sS", "--max-time", "2", url]);
    };
    curl("outside", "http://192.0.2.1:8080/"); // published
    curl("client", "http://172.30.1.2/"); // container to container
    curl("client", "http://10.96.0.10/"); // service
    sandbox.exec_ok("web1", &["nc", "-w3", OUTSIDE, "9999"]); // masquerade
    curl("client", "http://172.30.1.2:81/"); // a deny rule: POLICY_DENY
    curl("client", "http://172.30.2.5/"); // another network: POLICY_DENIED
    curl("client", "http://10.96.0.12/"); // no backend: SERVICE_BACKEND_NOT_FOUND

    let reasons = |records: &[Value]| -> BTreeSet<String> {
        records
            .iter()
            .filter_map(|r| r["flow"]["drop_reason_desc"].as_str().map(Into::into))
            .collect()
    };
    let wanted: BTreeSet<String> = ["POLICY_DENY", "POLICY_DENIED", "SERVICE_BACKEND_NOT_FOUND"]
        .into_iter()
        .map(Into::into)
        .collect();
    wait_for_records(&agent, "the three drops and four connections", |r| {
        reasons(r) == wanted && r.iter().filter(|x| event(x) == "close").count() >= 4
    });

    // The default JSON: strict, and none of our extensions.
    let records = observe_as(&agent, "json", &["--last", "1000"]);
    for record in &records {
        let line = record.to_string();
        strict(&line);
        assert!(record["flow"].get("connection").is_none(), "{line}");
        assert!(record["flow"].get("translation").is_none(), "{line}");
        assert_ne!(record["flow"]["verdict"], "TRANSLATED", "{line}");
    }
    let numbers: BTreeSet<(String, u64)> = records
        .iter()
        .filter_map(|r| {
            Some((
                r["flow"]["drop_reason_desc"].as_str()?.to_owned(),
                r["flow"]["drop_reason"].as_u64()?,
            ))
        })
        .collect();
    assert_eq!(
        numbers,
        [
            ("POLICY_DENIED".to_owned(), 133),
            ("POLICY_DENY".to_owned(), 181),
            ("SERVICE_BACKEND_NOT_FOUND".to_owned(), 158)
        ]
        .into_iter()
        .collect()
    );
    // Masquerade in Hubble's own field; the service with its namespace; Compose's project
    // as the namespace and its service as the workload.
    let masqueraded = records
        .iter()
        .find(|r| r["flow"]["IP"]["source_xlated"] == HOST)
        .expect("a masqueraded flow with IP.source_xlated");
    assert_eq!(masqueraded["flow"]["source"]["pod_name"], "web1");
    assert_eq!(masqueraded["flow"]["traffic_direction"], "EGRESS");
    let to_service = records
        .iter()
        .find(|r| r["flow"]["destination_service"]["name"] == "web")
        .expect("a flow to the service");
    assert_eq!(
        to_service["flow"]["destination_service"]["namespace"],
        "shop"
    );
    assert_eq!(to_service["flow"]["destination"]["namespace"], "shop");
    assert_eq!(
        to_service["flow"]["destination"]["workloads"][0]["name"],
        "web"
    );
    // The flow log (default: Hubble's form) is as strict.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.lines().count() >= records.len());
    for line in logged.lines() {
        strict(line);
    }

    // The agent's gRPC stream, read with the project's own client.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (dropped, nodes, peer) = runtime.block_on(async {
        use dataplane::hubble::api::{
            flow::{FlowFilter, Verdict},
            observer::{GetFlowsRequest, GetNodesRequest, observer_client::ObserverClient},
            peer::{NotifyRequest, peer_client::PeerClient},
        };
        use tokio_stream::StreamExt as _;
        let path = hubble_socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:4244")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to the agent's Hubble socket");
        let mut client = ObserverClient::new(channel.clone());
        let dropped: Vec<_> = client
            .get_flows(GetFlowsRequest {
                number: 1000,
                whitelist: vec![FlowFilter {
                    verdict: vec![Verdict::Dropped as i32],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .map(Result::unwrap)
            .collect()
            .await;
        let nodes = client
            .get_nodes(GetNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        // peer.Peer/Notify, what Hubble Relay gathers hosts with: this host, announced at
        // once, and the stream stays open.
        let mut peers = PeerClient::new(channel)
            .notify(NotifyRequest {})
            .await
            .expect("peer.Peer/Notify")
            .into_inner();
        let peer = tokio::time::timeout(Duration::from_secs(10), peers.next())
            .await
            .expect("a peer notification within 10 s")
            .expect("the stream open")
            .expect("a notification");
        let more = tokio::time::timeout(Duration::from_millis(500), peers.next()).await;
        assert!(
            more.is_err(),
            "the stream stays open with no more peers: {more:?}"
        );
        (dropped, nodes, peer)
    });
    assert_eq!(
        (peer.name.as_str(), peer.address.as_str(), peer.r#type),
        (
            nodes[0].name.as_str(),
            format!("unix://{hubble_socket}").as_str(),
            dataplane::hubble::api::peer::ChangeNotificationType::PeerAdded as i32
        ),
        "the peer is this host, at the address the API listens on"
    );
    assert_eq!(
        dropped.len(),
        records
            .iter()
            .filter(|r| r["flow"]["verdict"] == "DROPPED")
            .count()
    );
    assert_eq!(nodes.len(), 1);

    // The real hubble CLI.
    let Some(hubble) = std::env::var_os("HUBBLE_BIN") else {
        eprintln!(
            "SKIPPED the hubble CLI part: HUBBLE_BIN is not set (the path of a `hubble` \
             binary)"
        );
        return;
    };
    let server = format!("unix://{hubble_socket}");
    let run = |args: &[&str]| {
        let out = Command::new(&hubble)
            .args(args)
            .output()
            .expect("running hubble");
        assert!(
            out.status.success(),
            "hubble {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, _) = run(&["status", "--server", &server]);
    assert!(
        status.contains("Healthcheck") && status.contains("Ok"),
        "{status}"
    );
    let (nodes, _) = run(&["list", "nodes", "--server", &server]);
    assert!(nodes.contains("Connected"), "{nodes}");
    let lines = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["observe", "--server", &server, "--last", "1000"];
        all.extend_from_slice(args);
        run(&all).0.lines().map(Into::into).collect()
    };
    assert_eq!(
        lines(&["--verdict", "DROPPED"]).len(),
        dropped.len(),
        "--verdict DROPPED"
    );
    for reason in &wanted {
        let found = lines(&["--drop-reason-desc", reason]);
        assert!(!found.is_empty(), "--drop-reason-desc {reason}");
    }
    let to_81 = lines(&["--to-port", "81"]);
    assert!(
        !to_81.is_empty()
            && to_81
                .iter()
                .all(|l| l.contains("Policy denied by denylist")),
        "{to_81:?}"
    );
    let from_client = lines(&["--from-pod", "front/client", "-o", "json"]);
    assert!(!from_client.is_empty());
    for line in &from_client {
        let record: Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["flow"]["source"]["pod_name"], "client", "{line}");
    }
    assert!(lines(&["--protocol", "udp"]).is_empty(), "no UDP was sent");
    assert_eq!(lines(&["--last", "2"]).len(), 2);
    // hubble reads our flow log as its own, without a warning.
    let (read, warnings) = run(&["observe", "--input-file", log.to_str().unwrap()]);
    assert!(!read.trim().is_empty());
    assert!(!warnings.to_lowercase().contains("warn"), "{warnings}");
    // --follow: a new connection arrives on the stream.
    let mut follow = Command::new(&hubble)
        .args([
            "observe",
            "--server",
            &server,
            "--follow",
            "--to-port",
            "80",
            "--from-pod",
            "front/client",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Until the follower is subscribed, connections may go unseen: retry a few.
    let mut followed = None;
    for _ in 0..10 {
        curl("client", "http://172.30.1.2/");
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            followed = Some(line);
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let followed = followed.expect("hubble observe --follow streamed a new connection");
    strict(&followed);
    drop(outside_server);
}

/// The ICMP type and code of the packet each record is about: a ping between containers and
/// one masqueraded to the outside each give an EchoRequest record (their first packet) and an
/// EchoReply record (the answer, `is_reply`); a message a denied source sends is dropped with
/// its own type and code. Hubble's JSON of each parses strictly.
#[test]
fn pings_give_request_and_reply_records_and_an_icmp_drop_its_own_type() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start_with(&sandbox, &["--flow-report-interval", "3600"]);
    sandbox.exec_ok("client", &["ping", "-c", "2", "-W", "3", WEB1]);
    sandbox.exec_ok("web1", &["ping", "-c", "2", "-W", "3", OUTSIDE]);
    let icmp = |r: &Value| r["flow"]["l4"].get("ICMPv4").cloned();
    // Records about a packet (not an expired connection's last counters).
    let packet = |r: &Value| matches!(event(r), "new" | "reply" | "drop");
    let records = wait_for_records(&agent, "two pings' requests and replies", |r| {
        r.iter().filter(|x| icmp(x).is_some() && packet(x)).count() >= 4
    });
    let pings: Vec<(String, String, u64, u64, bool, String, String)> = records
        .iter()
        .filter(|r| packet(r))
        .filter_map(|r| {
            let l4 = icmp(r)?;
            let flow = &r["flow"];
            Some((
                end(&flow["source"], &flow["IP"]["source"]),
                end(&flow["destination"], &flow["IP"]["destination"]),
                l4["type"].as_u64().unwrap_or(0),
                l4["code"].as_u64().unwrap_or(0),
                flow["is_reply"].as_bool().unwrap(),
                flow["traffic_direction"].as_str().unwrap().to_owned(),
                flow["Summary"].as_str().unwrap().to_owned(),
            ))
        })
        .collect();
    let outside = format!("{OUTSIDE} (reserved:world)");
    assert_eq!(
        pings,
        [
            (
                "client (front)".into(),
                "web1 (front)".into(),
                8,
                0,
                false,
                "INGRESS".into(),
                "ICMPv4 EchoRequest".into()
            ),
            (
                "web1 (front)".into(),
                "client (front)".into(),
                0,
                0,
                true,
                "INGRESS".into(),
                "ICMPv4 EchoReply".into()
            ),
            (
                "web1 (front)".into(),
                outside.clone(),
                8,
                0,
                false,
                "EGRESS".into(),
                "ICMPv4 EchoRequest".into()
            ),
            (
                outside,
                "web1 (front)".into(),
                0,
                0,
                true,
                "EGRESS".into(),
                "ICMPv4 EchoReply".into()
            ),
        ],
        "(source, destination, type, code, is_reply, direction, summary) of the ICMP records, \
         one request and one answer per ping (the second round is the same connection)"
    );
    for line in observe_lines(&agent, &["--last", "100", "--protocol", "icmp"]) {
        strict(&line);
    }

    // The outside goes on the deny list, then sends a port-unreachable to the host.
    sandbox.write_state(&format!(
        "{SPEC}policies:\n  - {{name: blocklist, action: deny, from: {{cidr: {OUTSIDE}/32}}}}\n"
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    let drop = loop {
        sandbox.exec(
            "outside",
            &[
                "hping3", "-q", "--icmp", "-C", "3", "-K", "3", "-c", "1", HOST,
            ],
        );
        let dropped = observe(&agent, &["--last", "100", "--verdict", "DROPPED"]);
        if let Some(drop) = dropped.into_iter().find(|r| icmp(r).is_some()) {
            break drop;
        }
        assert!(Instant::now() < deadline, "no ICMP drop record");
        std::thread::sleep(Duration::from_millis(300));
    };
    let flow = &drop["flow"];
    assert_eq!(flow["drop_reason_desc"], "POLICY_DENY");
    assert_eq!(flow["l4"]["ICMPv4"]["type"], 3);
    assert_eq!(flow["l4"]["ICMPv4"]["code"], 3);
    assert_eq!(flow["Summary"], "ICMPv4 DestinationUnreachable(Port)");
    assert_eq!(flow["IP"]["source"], OUTSIDE);
    for line in observe_lines(&agent, &["--last", "100", "--verdict", "DROPPED"]) {
        strict(&line);
    }
}

/// `dataplane observe -o json ARGS`: Hubble's lines as they are printed.
fn observe_lines(agent: &Agent, args: &[&str]) -> Vec<String> {
    let out = Command::new(dataplane_bin())
        .args(["observe", "-o", "json", "--socket"])
        .arg(&agent.socket)
        .args(args)
        .output()
        .expect("running dataplane observe");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

const SPEC_DUAL: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

/// IPv6 connections give the records IPv4's give: `ipVersion: IPv6`, and the same translation
/// fields for a published port (from outside over IPv6) and for masquerade (NAT66); an IPv6
/// packet dropped gives a DROPPED record with its reason.
#[test]
fn ipv6_connections_give_ipv6_flows_with_their_translations() {
    const HOST6: &str = "2001:db8::1";
    const OUTSIDE6: &str = "2001:db8::2";
    const WEB1_6: &str = "fd00:30:1::2";
    let sandbox = Sandbox::up(SPEC_DUAL);
    let agent = Agent::start(&sandbox);
    let _server = sandbox.serve_outside6("9999", None);

    let reply = sandbox.exec_ok(
        "outside",
        &[
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://[{HOST6}]:8080/"),
        ],
    );
    let published_port = seen_port(&reply, "web1", OUTSIDE6);
    let reply = sandbox.exec_ok("web1", &["nc", "-6", "-w3", OUTSIDE6, "9999"]);
    let masquerade_port = seen_port(&reply, "outside", HOST6);

    let records = wait_for_records(&agent, "2 new IPv6 flows", |r| {
        r.iter()
            .filter(|x| event(x) == "new" && x["flow"]["IP"]["ipVersion"] == "IPv6")
            .count()
            >= 2
    });
    let new: Vec<&Value> = records.iter().filter(|r| event(r) == "new").collect();
    assert!(
        new.iter().all(|r| r["flow"]["IP"]["ipVersion"] == "IPv6"),
        "{new:#?}"
    );
    let new: BTreeSet<Seen> = new.into_iter().map(seen).collect();
    let masquerade_sport = new
        .iter()
        .find(|s| s.destination_port == 9999)
        .map(|s| s.source_port)
        .expect("a flow to port 9999");
    let expected: BTreeSet<Seen> = [
        Seen {
            verdict: "FORWARDED".into(),
            protocol: "TCP".into(),
            source: format!("{OUTSIDE6} (reserved:world)"),
            source_port: published_port.into(),
            destination: "web1 (front)".into(),
            destination_port: 80,
            direction: "INGRESS".into(),
            translation: Some((
                "published_port".into(),
                format!("[{HOST6}]:8080"),
                format!("[{WEB1_6}]:80"),
            )),
            service: None,
        },
        Seen {
            verdict: "FORWARDED".into(),
            protocol: "TCP".into(),
            source: "web1 (front)".into(),
            source_port: masquerade_sport,
            destination: format!("{OUTSIDE6} (reserved:world)"),
            destination_port: 9999,
            direction: "EGRESS".into(),
            translation: Some((
                "masquerade".into(),
                format!("[{WEB1_6}]:{masquerade_sport}"),
                format!("[{HOST6}]:{masquerade_port}"),
            )),
            service: None,
        },
    ]
    .into_iter()
    .collect();
    assert_eq!(new, expected);

    // A drop over IPv6 (a SYN+FIN scan of the published port, from scapy): a DROPPED record
    // with its reason and the packet's IPv6 tuple.
    let script = format!(
        "from scapy.all import IPv6, TCP, send\n\
         send(IPv6(dst='{HOST6}')/TCP(sport=40999, dport=8080, flags='SF'), iface='eth0', verbose=0)\n"
    );
    sandbox.exec_ok("outside", &["/usr/bin/python3", "-c", &script]);
    let records = wait_for_records(&agent, "an IPv6 drop", |r| {
        r.iter().any(|x| x["flow"]["verdict"] == "DROPPED")
    });
    let drop = &records
        .iter()
        .find(|x| x["flow"]["verdict"] == "DROPPED")
        .unwrap()["flow"];
    assert_eq!(
        drop["drop_reason_desc"], "CT_TRUNCATED_OR_INVALID_HEADER",
        "{drop:#}"
    );
    assert_eq!(drop["IP"]["ipVersion"], "IPv6", "{drop:#}");
    assert_eq!(drop["IP"]["source"], OUTSIDE6, "{drop:#}");
    assert_eq!(drop["IP"]["destination"], HOST6, "{drop:#}");
    assert_eq!(drop["l4"]["TCP"]["source_port"], 40999, "{drop:#}");
}

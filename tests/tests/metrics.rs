//! /metrics scraped by a real Prometheus server (Debian's `prometheus` package), started by
//! the test in the sandbox's host namespace next to the agent, queried through its HTTP API
//! with PromQL after known traffic.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_tests::{Agent, Sandbox, in_netns, unique_name};
use serde_json::Value;

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
services:
  - {name: empty, vip: 10.96.0.12, port: 80, selector: {app: nothing}}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

/// Prometheus' own address, on the loopback of the sandbox's host namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";

/// A Prometheus server scraping the agent every second; killed and its storage removed on
/// drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    netns: String,
}

impl Prometheus {
    fn start(sandbox: &Sandbox) -> Prometheus {
        let dir = std::env::temp_dir().join(unique_name("dpprom"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: dataplane\n    static_configs:\n      \
             - targets: ['127.0.0.1:9965']\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let netns = sandbox.netns("host");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus (`cargo xtask setup` installs it)");
        let mut prometheus = Prometheus { child, dir, netns };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus
            .get("/-/ready")
            .is_none_or(|(status, _)| status != 200)
        {
            if let Some(status) = prometheus.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An HTTP GET from inside the host namespace: status and body.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let path = path.to_owned();
        in_netns(&self.netns, move || {
            let mut stream = TcpStream::connect(PROMETHEUS).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let (head, body) = response.split_once("\r\n\r\n")?;
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((status, body.to_owned()))
        })
    }

    /// An instant PromQL query: the result vector as (labels, value).
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let (status, body) = self
            .get(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .unwrap_or_else(|| panic!("querying {promql:?}: no answer"));
        assert_eq!(status, 200, "{promql}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        json["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value of `promql` (0 when the result is empty).
    fn value(&self, promql: &str) -> f64 {
        self.query(promql).first().map_or(0.0, |(_, v)| *v)
    }

    /// Waits until `promql`'s value is `expected`.
    fn wait_for(&self, promql: &str, expected: f64) {
        self.wait_until(promql, &format!("{expected}"), |v| v == expected);
    }

    /// Waits until `promql`'s value is at least `least` (where other packets than the test's
    /// may be counted too: retransmissions).
    fn wait_for_at_least(&self, promql: &str, least: f64) {
        self.wait_until(promql, &format!("at least {least}"), |v| v >= least);
    }

    fn wait_until(&self, promql: &str, expected: &str, done: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.value(promql);
            if done(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} = {value}, expected {expected}; all series now: {:?}",
                self.query("{job=\"dataplane\"}")
                    .iter()
                    .filter(|(m, _)| m["__name__"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("hubble_")))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_flow_and_drop_counters_after_known_traffic() {
    let sandbox = Sandbox::up(SPEC);
    // No periodic counter records during the test: every record below is one it makes.
    let _agent = Agent::start_with(&sandbox, &["--flow-report-interval", "3600"]);
    let prometheus = Prometheus::start(&sandbox);
    prometheus.wait_for("up{job=\"dataplane\"}", 1.0);

    // Three connections through the published port (each a new and a close record), two
    // refused by the service without backends (a drop each), one UDP exchange between
    // containers (a new record; it stays open).
    for _ in 0..3 {
        sandbox.exec_ok(
            "outside",
            &["curl", "-sS", "--max-time", "3", "http://192.0.2.1:8080/"],
        );
    }
    for _ in 0..2 {
        let refused = sandbox.exec(
            "client",
            &["curl", "-sS", "--max-time", "3", "http://10.96.0.12/"],
        );
        assert!(!refused.status.success());
    }
    sandbox.exec_ok("client", &["sh", "-c", "echo hi | nc -u -w1 172.30.1.2 80"]);
    // One ping between the containers (two rounds, one connection): a request record and an
    // answer record.
    sandbox.exec_ok("client", &["ping", "-c", "2", "-W", "3", "172.30.1.2"]);

    let by_verdict = "sum by (verdict) (hubble_flows_processed_total{verdict=\"%\"})";
    // Cilium's verdicts: traces are FORWARDED, translated or not.
    prometheus.wait_for(&by_verdict.replace('%', "FORWARDED"), 9.0);
    prometheus.wait_for(&by_verdict.replace('%', "DROPPED"), 2.0);
    prometheus.wait_for(&by_verdict.replace('%', "TRANSLATED"), 0.0);
    prometheus.wait_for(
        "sum(hubble_drop_total{reason=\"SERVICE_BACKEND_NOT_FOUND\",protocol=\"TCP\"})",
        2.0,
    );
    // The kernel's count agrees: nothing was added for lost events.
    prometheus.wait_for(
        "sum(hubble_drop_total{reason=\"SERVICE_BACKEND_NOT_FOUND\"})",
        2.0,
    );
    prometheus.wait_for(
        "sum(hubble_flows_processed_total{type=\"Trace\",subtype=\"to-endpoint\",\
         verdict=\"FORWARDED\",protocol=\"TCP\"})",
        6.0,
    );
    // Hubble's context labels, which the stock dashboards group by: the published port's
    // flows arrive at web1 in namespace `front` (its network), the drops leave `client`.
    prometheus.wait_for(
        "sum(hubble_flows_processed_total{destination_namespace=\"front\",protocol=\"TCP\"})",
        6.0,
    );
    prometheus.wait_for("sum(hubble_drop_total{source_namespace=\"front\"})", 2.0);
    // TCP flags per packet, counted by the kernel: each of the 3 connections has a SYN, a
    // SYN-ACK and a FIN (one each way, normally); the 2 refused SYNs were dropped, and Hubble
    // counts forwarded packets only. At least: a retransmission is a packet too.
    for (flag, least) in [("SYN", 3.0), ("SYN-ACK", 3.0), ("FIN", 3.0)] {
        prometheus.wait_for_at_least(
            &format!("sum(hubble_tcp_flags_total{{flag=\"{flag}\",family=\"IPv4\"}})"),
            least,
        );
    }
    eprintln!(
        "hubble_tcp_flags_total for 3 connections and 2 refused SYNs: {:?}",
        prometheus
            .query("sum by (flag) (hubble_tcp_flags_total)")
            .iter()
            .map(|(m, v)| (m["flag"].as_str().unwrap_or("").to_owned(), *v))
            .collect::<Vec<_>>()
    );
    assert!(
        prometheus.value("sum(hubble_tcp_flags_total{flag=\"SYN\"})") <= 4.0,
        "the refused SYNs are not counted (one retransmission allowed)"
    );
    // ICMP by Hubble's type names: the ping's request and its answer.
    prometheus.wait_for(
        "sum(hubble_icmp_total{family=\"IPv4\",type=\"EchoRequest\"})",
        1.0,
    );
    prometheus.wait_for(
        "sum(hubble_icmp_total{family=\"IPv4\",type=\"EchoReply\",source_namespace=\"front\"})",
        1.0,
    );
    prometheus.wait_for(
        "sum(hubble_port_distribution_total{protocol=\"TCP\",port=\"80\"})",
        3.0,
    );
    prometheus.wait_for(
        "sum(hubble_port_distribution_total{protocol=\"UDP\",port=\"80\"})",
        1.0,
    );
    prometheus.wait_for("dataplane_flow_events_lost_total", 0.0);
    // Both tables of each family: the established connections' and the handshakes' (a
    // quarter of it).
    for family in ["IPv4", "IPv6"] {
        prometheus.wait_for(
            &format!("dataplane_conntrack_capacity{{family=\"{family}\"}}"),
            (262_144 + 65_536) as f64,
        );
    }
    // Uplink ingress and egress and the two containers' veths (and the sandbox cgroup's
    // connect hook).
    prometheus.wait_for("dataplane_programs_attached >= bool 4", 1.0);
    prometheus.wait_for("dataplane_map_entries{map=\"dp_ports_v2\"}", 1.0);
    assert!(prometheus.value("dataplane_reconcile_duration_seconds_count") >= 1.0);
    assert_eq!(prometheus.value("dataplane_reconcile_errors_total"), 0.0);
}

/// [`SPEC`]'s host with IPv6 on its network: the published port reached over IPv6.
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

/// IPv6 packets are counted under their own family: the kernel's per-packet TCP flags of
/// connections over IPv6 in `hubble_tcp_flags_total{family="IPv6"}`, none of them under
/// IPv4's.
#[test]
fn prometheus_counts_ipv6_tcp_flags_under_their_family() {
    let sandbox = Sandbox::up(SPEC_DUAL);
    let _agent = Agent::start_with(&sandbox, &["--flow-report-interval", "3600"]);
    let prometheus = Prometheus::start(&sandbox);
    prometheus.wait_for("up{job=\"dataplane\"}", 1.0);
    for _ in 0..2 {
        sandbox.exec_ok(
            "outside",
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "http://[2001:db8::1]:8080/",
            ],
        );
    }
    for (flag, least) in [("SYN", 2.0), ("SYN-ACK", 2.0), ("FIN", 2.0)] {
        prometheus.wait_for_at_least(
            &format!("sum(hubble_tcp_flags_total{{flag=\"{flag}\",family=\"IPv6\"}})"),
            least,
        );
    }
    assert_eq!(
        prometheus.value("sum(hubble_tcp_flags_total{family=\"IPv4\"}) or vector(0)"),
        0.0,
        "no IPv4 TCP was sent"
    );
}

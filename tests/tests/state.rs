//! The state file as users edit it, and the agent's own safety: nothing half-written is ever
//! applied (an empty file, a slow two-part write, `cp`, an editor's rename, a FIFO), one agent
//! per pin dir, errors that clear and drift repair that never stops, and files too big or too
//! deep refused while the agent keeps answering. Throughout, a client outside polls a
//! published port every 100 ms and must never miss.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixStream,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane::control::status::Status;
use dataplane_tests::{Agent, Sandbox, StatusExt as _, dataplane_bin, in_netns};
use serde_json::Value;

const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
"#;

/// SPEC with port 8081 too: what the edits below write, so that their taking effect shows.
const WITH_8081: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: web1, protocol: tcp, host_port: 8081, container_port: 80}
"#;

/// One GET to HOST:port from the outside client's namespace (the calling thread must be in
/// it); true when web1 answered.
fn get(port: u16) -> Result<(), String> {
    let addr = format!("192.0.2.1:{port}").parse().unwrap();
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut buf = [0u8; 1024];
    while !(text.contains("\r\n\r\n") && text.ends_with('\n') && text.contains("web1")) {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("{e} after {text:?}"))?;
        if n == 0 {
            return Err(format!("closed after {text:?}"));
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

/// The client polling port 8080 every 100 ms from outside, for as long as it lives.
struct Poller {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<(u64, Vec<String>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(sandbox: &Sandbox) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new((0u64, Vec::new())));
        let netns = sandbox.netns("outside");
        // The first connection of a fresh sandbox may lose its SYN to neighbour resolution;
        // what is tested is what happens after it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_netns(&netns, || get(8080)).is_err() {
            assert!(Instant::now() < deadline, "port 8080 never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (s, r) = (stop.clone(), results.clone());
        let thread = std::thread::spawn(move || {
            in_netns(&netns, move || {
                let started = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    let outcome = get(8080);
                    let mut r = r.lock().unwrap();
                    r.0 += 1;
                    if let Err(e) = outcome {
                        r.1.push(format!("at {:?}: {e}", started.elapsed()));
                    }
                    drop(r);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        Poller {
            stop,
            results,
            thread: Some(thread),
        }
    }

    /// Stops polling and checks that no poll missed; returns how many there were.
    fn finish(mut self) -> u64 {
        while self.results.lock().unwrap().0 < 20 {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let (polls, misses) = self.results.lock().unwrap().clone();
        assert!(
            misses.is_empty(),
            "{} of {polls} polls missed: {misses:?}",
            misses.len()
        );

        eprintln!("{polls} polls of port 8080, none missed");
        polls
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn sha256_text(text: &str) -> String {
    let path = std::env::temp_dir().join(format!("sha-{}-{}", std::process::id(), text.len()));
    std::fs::write(&path, text).unwrap();
    let sha = sha256(&path);
    let _ = std::fs::remove_file(path);
    sha
}

fn in_force(status: &Status) -> &str {
    status
        .state
        .in_force
        .as_ref()
        .and_then(|v| v.sha256.as_deref())
        .unwrap_or("")
}

fn newer_reason(status: &Status) -> String {
    status
        .state
        .newer
        .as_ref()
        .map(|n| n.reason.clone())
        .unwrap_or_default()
}

/// `status` asked over the socket by the test itself (no process start), with its latency.
fn timed_status(agent: &Agent) -> (Duration, Status) {
    let started = Instant::now();
    let mut s = UnixStream::connect(&agent.socket).expect("agent socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"status\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    (started.elapsed(), serde_json::from_str(&reply).unwrap())
}

/// Waits until the state in force is `text`, and port 8081 answers when it has it.
fn wait_applied(agent: &Agent, text: &str, what: &str) {
    let sha = sha256_text(text);
    agent.wait_for_within(Duration::from_secs(30), what, |s| {
        in_force(s) == sha && s.last_error.is_none()
    });
}

#[test]
fn half_written_or_odd_files_are_never_applied() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let path = sandbox.state_file.clone();
    let original = std::fs::read_to_string(&path).unwrap();
    assert_eq!(in_force(&agent.status()), sha256(&path));
    let poller = Poller::start(&sandbox);

    // An empty file, as a failed `generate > state.yaml` leaves it: refused, ports stay.
    std::fs::File::create(&path).unwrap();
    let s = agent.wait_for_within(Duration::from_secs(30), "the empty file refused", |s| {
        newer_reason(s).contains("is empty")
    });
    assert!(s.last_error.as_deref().unwrap().contains("`{}`"), "{s:#?}");
    assert_eq!(in_force(&s), sha256_text(&original));

    // Written in two parts with a pause: the first part (everything before `ports:`, valid
    // YAML that would remove every port) must never be applied.
    let (head, tail) = WITH_8081.split_at(WITH_8081.find("ports:").unwrap());
    {
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(head.as_bytes()).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let s = agent.status();
        assert!(newer_reason(&s).contains("changing"), "mid-write: {s:#?}");
        file.write_all(tail.as_bytes()).unwrap();
    }
    wait_applied(&agent, WITH_8081, "the two-part write applied whole");
    in_netns(&sandbox.netns("outside"), || get(8081)).expect("8081 after the two-part write");

    // cp over the file (an in-place rewrite), then an editor's save: a temporary file renamed
    // into place, which is read at once rather than after settling.
    let copy = sandbox.dir.join("copy.yaml");
    std::fs::write(&copy, SPEC).unwrap();
    assert!(
        Command::new("cp")
            .arg(&copy)
            .arg(&path)
            .status()
            .unwrap()
            .success()
    );
    wait_applied(&agent, SPEC, "the cp applied");
    let tmp = sandbox.dir.join(".state.yaml.swp");
    std::fs::write(&tmp, WITH_8081).unwrap();
    let renamed = Instant::now();
    std::fs::rename(&tmp, &path).unwrap();
    wait_applied(&agent, WITH_8081, "the renamed file applied");
    eprintln!("a renamed file was in force after {:?}", renamed.elapsed());

    // A FIFO at the path (nobody writing to it) must not hang the reader.
    let fifo = sandbox.dir.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::rename(&fifo, &path).unwrap();
    let s = agent.wait_for_within(Duration::from_secs(30), "the FIFO refused", |s| {
        newer_reason(s).contains("not a regular file")
    });
    assert!(newer_reason(&s).contains("FIFO"), "{s:#?}");
    sandbox.write_state(SPEC);
    wait_applied(&agent, SPEC, "a good file after the FIFO");
    poller.finish();
}

/// SPEC with a second container, whose veth goes away while no agent runs.
const WITH_WEB2: &str = r#"
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
"#;

#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused_and_the_first_keeps_its_datapath() {
    let sandbox = Sandbox::up(WITH_WEB2);
    let mut agent = Agent::start(&sandbox);
    let poller = Poller::start(&sandbox);
    let first_pid = agent.pid().unwrap();
    let links_before = std::fs::read_dir(agent.pin_dir.join("links"))
        .unwrap()
        .count();
    let other_socket = sandbox.dir.join("second.sock");
    let started = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", sandbox.netns("host")))
        .arg("--")
        .arg(dataplane_bin())
        .args([
            "agent",
            "--cgroup",
            "none",
            "--metrics",
            "none",
            "--pin-dir",
        ])
        .arg(&agent.pin_dir)
        .arg("--socket")
        .arg(&other_socket)
        .arg("--state")
        .arg(&sandbox.state_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent ran: {stderr}");
    assert!(
        stderr.contains(&format!("in use by another agent (pid {first_pid})")),
        "{stderr}"
    );
    eprintln!("second agent refused in {:?}: {stderr}", started.elapsed());
    assert!(!other_socket.exists(), "the refused agent made its socket");
    let links_after = std::fs::read_dir(agent.pin_dir.join("links"))
        .unwrap()
        .count();
    assert_eq!(
        links_before, links_after,
        "the refused agent touched the link pins"
    );

    // The socket path is replaced only when it is a stale socket: a regular file there is
    // refused and left alone, and that failed start (on a pin dir of its own) leaves no pins.
    let own_pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-second", sandbox.name));
    let not_a_socket = sandbox.dir.join("not-a-socket");
    std::fs::write(&not_a_socket, "keep me").unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", sandbox.netns("host")))
        .arg("--")
        .arg(dataplane_bin())
        .args([
            "agent",
            "--cgroup",
            "none",
            "--metrics",
            "none",
            "--pin-dir",
        ])
        .arg(&own_pins)
        .arg("--socket")
        .arg(&not_a_socket)
        .arg("--state")
        .arg(&sandbox.state_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&not_a_socket).unwrap(), "keep me");
    let left = own_pins.exists();
    let _ = std::fs::remove_dir_all(&own_pins);
    assert!(!left, "the failed start left its pin directory");

    // The first agent dies hard; its pinned links keep the port published.
    agent.stop("KILL");
    std::thread::sleep(Duration::from_secs(2));
    poller.finish();

    // While no agent runs, web2's veth goes away: the next agent removes its link pin.
    let web2_pin = agent
        .pin_dir
        .join(format!("links/veth-web2@{}", "dp_container_ingress"));
    assert!(web2_pin.exists(), "no pin {}", web2_pin.display());
    sandbox.exec_ok("host", &["ip", "link", "del", "veth-web2"]);
    std::fs::write(&sandbox.state_file, SPEC).unwrap();
    agent.restart();
    assert!(!web2_pin.exists(), "the stale pin stayed");
    assert!(
        agent
            .log_text()
            .contains("its interface went away while no agent ran"),
        "{}",
        agent.log_text()
    );
    in_netns(&sandbox.netns("outside"), || get(8080)).expect("8080 after the restart");
}

#[test]
fn errors_clear_when_the_file_is_good_again_and_drift_repair_goes_on() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let path = sandbox.state_file.clone();
    let original = std::fs::read(&path).unwrap();
    let sha = sha256(&path);
    let poller = Poller::start(&sandbox);

    // One byte that is not UTF-8, renamed into place: refused at once.
    let mut bad = original.clone();
    bad.insert(1, 0xff);
    let tmp = sandbox.dir.join("bad.tmp");
    std::fs::write(&tmp, &bad).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    agent.wait_for_within(Duration::from_secs(30), "the bad byte refused", |s| {
        newer_reason(s).contains("not UTF-8")
    });
    // Gone for a moment, then back byte for byte.
    std::fs::remove_file(&path).unwrap();
    agent.wait_for_within(Duration::from_secs(30), "the missing file reported", |s| {
        newer_reason(s).contains("cannot read")
    });
    std::fs::write(&tmp, &original).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let s = agent.wait_for_within(Duration::from_secs(30), "the error cleared", |s| {
        s.last_error.is_none() && s.state.newer.is_none()
    });
    assert_eq!(in_force(&s), sha);
    poller.finish();

    // Drift repair works again: a published-port entry deleted by hand comes back.
    let map = agent.pin_dir.join("dp_ports_v2");
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .expect("bpftool");
    let entries: Value = serde_json::from_slice(&dump.stdout).expect("bpftool JSON");
    let entries = entries.as_array().unwrap();
    assert!(!entries.is_empty());
    for entry in entries {
        let key: Vec<String> = entry["key"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_owned())
            .collect();
        let out = Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(&map)
            .arg("key")
            .args(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(agent.status().map_entries("dp_ports_v2"), 0);
    agent.wait_for_within(Duration::from_secs(30), "the deleted entries back", |s| {
        s.map_entries("dp_ports_v2") as usize == entries.len()
    });
    in_netns(&sandbox.netns("outside"), || get(8080)).expect("8080 after the repair");
}

#[test]
fn huge_and_deep_files_are_refused_by_name_while_the_agent_answers() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    let poller = Poller::start(&sandbox);
    let slowest = |agent: &Agent, until: &dyn Fn(&Status) -> bool, what: &str| -> Duration {
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut slowest = Duration::ZERO;
        loop {
            let (took, status) = timed_status(agent);
            slowest = slowest.max(took);
            if until(&status) {
                return slowest;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // 100,000 published ports (50,000 each of tcp and udp): more than the ports map holds.
    let mut big = String::from(SPEC);
    for i in 0..100_000u32 {
        big.push_str(&format!(
            "  - {{endpoint: web1, protocol: {}, host_port: {}, container_port: 80}}\n",
            if i % 2 == 0 { "tcp" } else { "udp" },
            10_000 + i / 2
        ));
    }
    sandbox.write_state(&big);
    let took = slowest(
        &agent,
        &|s| newer_reason(s).contains("do not fit"),
        "the capacity error",
    );
    let reason = newer_reason(&agent.status());
    assert!(
        reason.contains("published port numbers")
            && reason.contains("holds 65536")
            && reason.contains("--max-ports"),
        "{reason}"
    );
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} while the file was handled"
    );
    eprintln!("100,000 ports refused; slowest status meanwhile {took:?}");

    // 250 KB of nesting, in the one field serde reads untagged (a port value).
    let depth = 125_000;
    let deep = format!(
        "{SPEC}  - {{endpoint: web1, protocol: udp, container_port: 80, host_port: {}{}}}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    sandbox.write_state(&deep);
    let took = slowest(
        &agent,
        &|s| newer_reason(s).contains("MAX_DEPTH"),
        "the depth error",
    );
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} while the file was handled"
    );
    eprintln!("deep file refused; slowest status meanwhile {took:?}");

    sandbox.write_state(SPEC);
    wait_applied(&agent, SPEC, "the good file after the refused ones");
    poller.finish();
}

/// A dual-stack network, an IPv6-only one, a dual-stack service and ports of each family.
const SPEC6: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1,
     subnet6: "fd00:30:1::/64", gateway6: "fd00:30:1::1"}
  - {name: six, bridge: br-six, subnet6: "fd00:30:2::/64", gateway6: "fd00:30:2::1"}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, ip6: "fd00:30:1::2", mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: only6
    labels: {app: web}
    interfaces: [{network: six, ip6: "fd00:30:2::2", mac: "02:42:ac:1e:02:02", host_veth: veth-only6}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: only6, protocol: tcp, host_ip: "::", host_port: 8086, container_port: 80}
services:
  - {name: web, vip: 10.96.0.10, vip6: "fd00:96::10", port: 80, selector: {app: web}}
policies:
  - {name: block6, action: deny, from: {cidr: "2001:db8:bad::/48"}}
"#;

#[test]
fn an_ipv6_state_file_is_applied_and_shown_in_status() {
    let sandbox = Sandbox::up(SPEC6);
    // The sandbox gave the containers their IPv6 addresses and routes.
    let addr = Command::new("ip")
        .args([
            "-n",
            &sandbox.netns("only6"),
            "-6",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&addr.stdout);
    assert!(text.contains("inet6 fd00:30:2::2/64"), "{text}");
    let route = Command::new("ip")
        .args([
            "-n",
            &sandbox.netns("only6"),
            "-6",
            "route",
            "show",
            "default",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&route.stdout);
    assert!(text.contains("via fd00:30:2::1 dev eth0"), "{text}");

    let agent = Agent::start(&sandbox);
    let s = agent.wait_for_within(Duration::from_secs(30), "the IPv6 state applied", |s| {
        s.last_applied_unix.is_some() && s.find_map_entries("dp_endpoints6").unwrap_or(0) == 2
    });
    assert_eq!(s.last_error, None);
    // web1 in both families' endpoint maps, only6 in the IPv6 one.
    assert_eq!(s.map_entries("dp_endpoints"), 1);
    // 8080 on every address: one entry per family; 8086 on :: only.
    assert_eq!(s.map_entries("dp_ports"), 1);
    assert_eq!(s.map_entries("dp_ports6"), 2);
    assert_eq!(s.map_entries("dp_services"), 1);
    assert_eq!(s.map_entries("dp_services6"), 1);
    // Two backends by index in each family (only6 has no IPv4 address, its index stays).
    assert_eq!(s.map_entries("dp_backends"), 2);
    assert_eq!(s.map_entries("dp_backends6"), 2);
    // The host's IPv6 addresses: ::1, the uplink's and the two gateways (no link-local).
    assert_eq!(s.map_entries("dp_local_addrs6"), 4);

    let row = |name: &str| s.endpoints.iter().find(|e| e.name == name).unwrap().clone();
    assert_eq!(
        (row("web1").ip.as_str(), row("web1").ip6.as_deref()),
        ("172.30.1.2", Some("fd00:30:1::2"))
    );
    assert_eq!(
        (row("only6").ip.as_str(), row("only6").ip6.as_deref()),
        ("", Some("fd00:30:2::2"))
    );
    let six = s.networks.iter().find(|n| n.name == "six").unwrap();
    assert_eq!(
        (six.subnet.as_deref(), six.subnet6.as_deref()),
        (None, Some("fd00:30:2::/64"))
    );
    assert_eq!(s.services[0].vip6.as_deref(), Some("fd00:96::10"));
    assert_eq!(s.ports[1].host_ip.as_deref(), Some("::"));
    // And as people read it.
    let out = Command::new(dataplane_bin())
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "fd00:30:1::2",
        "fd00:30:2::/64 gateway fd00:30:2::1",
        "[fd00:96::10]:80/tcp",
        "[::]:8086/tcp -> endpoint only6:80",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
}

//! The agent following a real Docker engine (`dataplane agent --docker`): dockerd 20.10 from
//! Debian in a namespace of its own with Docker's iptables and docker-proxy off, containers
//! from a busybox image, an outside client on a veth, real traffic (tests/src/docker.rs).

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Output,
    time::Duration,
};

use dataplane::control::status::Status;
use dataplane_bench::scenarios::{
    BRIDGE, NETWORK6,
    published_port6::{CONTAINER_IP6, PUBLISHED, docker_rules6},
};
use dataplane_tests::{
    Agent, StatusExt as _, dataplane_bin,
    docker::{DockerDataplane, Dockerd, HOST, HOST6, IMAGE, OUTSIDE, OUTSIDE6, TestCgroup},
};

/// Whether interface `name` exists in dockerd's namespace.
fn interface_exists(dockerd: &Dockerd, name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", &dockerd.name, "link", "show", "dev", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn attached_to(status: &Status, interface: &str) -> bool {
    status.attachments.iter().any(|a| a.interface == interface)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An httpd container answering `<name> <client address>` on /cgi-bin/who.
fn run_web(dockerd: &Dockerd, name: &str, extra: &[&str]) {
    // busybox as PID 1 ignores SIGTERM: stop (and dockerd's shutdown) would wait 10 s.
    let mut args = vec![
        "run",
        "-d",
        "--stop-timeout",
        "1",
        "--name",
        name,
        "--hostname",
        name,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
    dockerd.docker_ok(&args);
}

/// A container that only sleeps, to run clients in with `docker exec`.
fn run_client(dockerd: &Dockerd, name: &str, extra: &[&str]) {
    // busybox as PID 1 ignores SIGTERM: stop (and dockerd's shutdown) would wait 10 s.
    let mut args = vec![
        "run",
        "-d",
        "--stop-timeout",
        "1",
        "--name",
        name,
        "--hostname",
        name,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sleep", "3600"]);
    dockerd.docker_ok(&args);
}

/// GET /cgi-bin/who from the outside client: `<container> [::ffff:<client>]`, or the error.
fn who_from_outside(dockerd: &Dockerd, addr: &str) -> Result<String, String> {
    let out = dockerd.outside(&[
        "curl",
        "-sS",
        "--max-time",
        "3",
        &format!("http://{addr}/cgi-bin/who"),
    ]);
    if out.status.success() {
        Ok(text(&out))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Runs `count` GETs of /cgi-bin/who at `addr` from container `client`; the body lines.
fn who_from_container(dockerd: &Dockerd, client: &str, addr: &str, count: u32) -> Vec<String> {
    let (ip, port) = addr.split_once(':').unwrap();
    let script = format!(
        "for i in $(seq {count}); do \
           printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port} | tail -n 1; \
         done"
    );
    let out = dockerd.docker(&["exec", client, "sh", "-c", &script]);
    text(&out).lines().map(str::to_owned).collect()
}

/// The outside answers `outside <peer-ip>:<port>` on TCP 9999.
fn outside_server(dockerd: &Dockerd) -> dataplane_tests::Background {
    let bin = dataplane_bin();
    let mut server = dockerd.spawn_outside(&[
        bin.to_str().unwrap(),
        "sandbox",
        "serve",
        "--name",
        "outside",
        "--tcp",
        "9999",
    ]);
    server.wait_for_line("ready");
    server
}

/// The address the outside saw a connection from container `client` come from.
fn seen_outside(dockerd: &Dockerd, client: &str) -> String {
    let reply = dockerd.docker_ok(&["exec", client, "nc", "-w", "3", OUTSIDE, "9999"]);
    let seen = reply
        .strip_prefix("outside ")
        .unwrap_or_else(|| panic!("the outside did not answer {client}: {reply:?}"));
    seen.split_once(':').unwrap().0.to_owned()
}

#[test]
fn published_ports_reach_the_container_with_the_client_address() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    run_web(
        &dockerd,
        "web",
        &[
            "-p",
            "8080:80",
            "-p",
            "5353:53/udp",
            "-p",
            "9000-9002:7000-7002",
            "-p",
            &format!("{HOST}:9090:80"),
        ],
    );
    // 8080, 5353/udp, 9000-9002 and 9090 on one address: six ports in the map.
    agent.wait_for("web and its published ports", |s| {
        s.endpoint_names().contains("web") && s.map_entries("dp_ports") == 6
    });
    // Docker's own NAT is off: what answers is the dataplane.
    let nat = dockerd_iptables(&dockerd);
    assert!(
        !nat.contains("DOCKER"),
        "Docker installed NAT rules:\n{nat}"
    );

    let body = who_from_outside(&dockerd, &format!("{HOST}:8080")).unwrap();
    assert!(
        body.starts_with("web ") && body.contains(&format!(":{OUTSIDE}]")),
        "the container must see the outside client's address: {body:?}"
    );
    let body = who_from_outside(&dockerd, &format!("{HOST}:9090")).unwrap();
    assert!(body.contains(OUTSIDE), "{body:?}");
    // A port of the range: 9001 leads to 7001.
    dockerd.docker_ok(&[
        "exec", "-d", "web", "httpd", "-f", "-p", "7001", "-h", "/www",
    ]);
    let mut body = Err(String::new());
    for _ in 0..20 {
        body = who_from_outside(&dockerd, &format!("{HOST}:9001"));
        if body.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = body.expect("host port 9001 reaches container port 7001");
    assert!(
        body.starts_with("web ") && body.contains(OUTSIDE),
        "{body:?}"
    );
}

/// Docker's IPv6 networks (`docker network create --ipv6`): a published port answers the
/// outside client over IPv6 with the client's own address, where docker-proxy (Docker's
/// answer over IPv6 with `--userland-proxy`) shows the container its own address instead; the
/// same port over IPv4 still answers.
#[test]
fn a_published_port_over_ipv6_keeps_the_client_address() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    dockerd.docker_ok(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "172.31.6.0/24",
        "--subnet",
        "fd00:d0c:6::/64",
        "dual",
    ]);
    run_web(&dockerd, "web6", &["--network", "dual", "-p", "8080:80"]);
    agent.wait_for("web6", |s| s.endpoint_names().contains("web6"));
    let ip6 = dockerd.inspect(
        "web6",
        "{{.NetworkSettings.Networks.dual.GlobalIPv6Address}}",
    );
    assert!(
        ip6.starts_with("fd00:d0c:6:"),
        "web6 has no IPv6 address: {ip6:?}"
    );
    // curl -g: the brackets of the IPv6 address are not a glob.
    let url = format!("http://[{HOST6}]:8080/cgi-bin/who");
    let mut last = String::new();
    let mut body = None;
    for _ in 0..30 {
        let out = dockerd.outside(&["curl", "-g", "-sS", "--max-time", "3", &url]);
        if out.status.success() {
            body = Some(text(&out));
            break;
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = body.unwrap_or_else(|| {
        let log = agent.log_text();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!("[{HOST6}]:8080 did not answer over IPv6: {last}\n{tail:?}")
    });
    assert!(
        body.starts_with("web6 ") && body.contains(OUTSIDE6),
        "the container must see the outside client's IPv6 address: {body:?}"
    );
    let body = who_from_outside(&dockerd, &format!("{HOST}:8080")).unwrap();
    assert!(
        body.starts_with("web6 ") && body.contains(OUTSIDE),
        "{body:?}"
    );
}

/// The nat table of dockerd's namespace.
fn dockerd_iptables(dockerd: &Dockerd) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", dockerd.name))
        .args(["iptables", "-t", "nat", "-S"])
        .output()
        .expect("running iptables");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn outbound_traffic_from_containers_is_masqueraded() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    let _server = outside_server(&dockerd);
    dockerd.docker_ok(&["network", "create", "apps"]);
    run_client(&dockerd, "c1", &[]);
    run_client(&dockerd, "c2", &["--network", "apps"]);
    agent.wait_for("both clients", |s| {
        s.endpoint_names()
            .is_superset(&["c1".to_owned(), "c2".to_owned()].into())
    });
    assert_eq!(seen_outside(&dockerd, "c1"), HOST, "default bridge");
    assert_eq!(seen_outside(&dockerd, "c2"), HOST, "user network");
}

#[test]
fn containers_on_two_user_networks() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    let _server = outside_server(&dockerd);
    dockerd.docker_ok(&["network", "create", "front"]);
    dockerd.docker_ok(&["network", "create", "back"]);
    run_web(&dockerd, "alpha", &["--network", "front", "-p", "8081:80"]);
    run_web(&dockerd, "beta", &["--network", "back", "-p", "8082:80"]);
    let status = agent.wait_for("a and b", |s| {
        s.endpoint_names()
            .is_superset(&["alpha".to_owned(), "beta".to_owned()].into())
            && s.map_entries("dp_ports") == 2
    });

    // Each on its own network, with the veth Docker made for it, and the programs on it.
    for (name, network) in [("alpha", "front"), ("beta", "back")] {
        let interfaces = status.interfaces_of(name);
        assert_eq!(interfaces.len(), 1, "{interfaces:?}");
        let (net, ip, veth) = &interfaces[0];
        assert_eq!(net, network);
        let docker_ip = dockerd.inspect(
            name,
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        );
        assert_eq!(ip, &docker_ip);
        assert!(attached_to(&status, veth), "{veth} in {status:#?}");
    }
    // Both reachable from outside, both leave the host with its address.
    for (port, name) in [(8081, "alpha"), (8082, "beta")] {
        let body = who_from_outside(&dockerd, &format!("{HOST}:{port}")).unwrap();
        assert!(
            body.starts_with(&format!("{name} ")) && body.contains(OUTSIDE),
            "{body:?}"
        );
        assert_eq!(seen_outside(&dockerd, name), HOST);
    }
    // Isolated from each other (Docker's rule, done by the dataplane): alpha cannot reach
    // beta...
    let beta_ip = status.interfaces_of("beta")[0].1.clone();
    let reply = who_from_container(&dockerd, "alpha", &format!("{beta_ip}:80"), 1);
    assert!(
        reply.iter().all(|l| !l.starts_with("beta ")),
        "alpha reached beta across networks: {reply:?}"
    );
    // ...while beta's published port stays reachable from alpha, as with Docker.
    let reply = who_from_container(&dockerd, "alpha", &format!("{HOST}:8082"), 1);
    assert!(reply.iter().any(|l| l.starts_with("beta ")), "{reply:?}");

    // Connected to back as well, alpha gets a second interface (after the one it started on)
    // and reaches beta there; disconnected, it loses it again.
    dockerd.docker_ok(&["network", "connect", "back", "alpha"]);
    let status = agent.wait_for("alpha on both networks", |s| {
        s.interfaces_of("alpha").len() == 2
    });
    let networks: Vec<String> = status
        .interfaces_of("alpha")
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(networks, ["front", "back"]);
    let reply = who_from_container(&dockerd, "alpha", &format!("{beta_ip}:80"), 1);
    assert!(reply.iter().any(|l| l.starts_with("beta ")), "{reply:?}");
    dockerd.docker_ok(&["network", "disconnect", "back", "alpha"]);
    let status = agent.wait_for("alpha on front only", |s| {
        s.interfaces_of("alpha").len() == 1 && s.map_entries("dp_endpoints") == 2
    });

    // A removed container's veth goes, and with it its traffic rows in `status` (the kernel's
    // counters stay behind in their map; they are no interface's any more).
    let beta_veth = status.interfaces_of("beta")[0].2.clone();
    assert!(
        status.interfaces.iter().any(|c| c.interface == beta_veth),
        "beta's veth saw traffic: {status:#?}"
    );
    dockerd.docker_ok(&["rm", "-f", "beta"]);
    agent.wait_for("beta's traffic rows gone", |s| {
        !s.endpoint_names().contains("beta")
            && !s.interfaces.iter().any(|c| c.interface == beta_veth)
    });
}

#[test]
fn compose_style_service_balances_over_its_replicas() {
    let dockerd = Dockerd::start();
    // A one-address range: the VIP is known without asking the agent.
    let vip = "10.96.0.10";
    let agent = dockerd.agent(&["--service-vip-range", &format!("{vip}/32")]);
    let compose = [
        "-l",
        "com.docker.compose.project=shop",
        "-l",
        "com.docker.compose.service=web",
        "--expose",
        "80",
    ];
    run_web(&dockerd, "shop-web-1", &compose);
    run_web(&dockerd, "shop-web-2", &compose);
    run_client(&dockerd, "client", &[]);
    agent.wait_for("the service and its two backends", |s| {
        s.endpoint_names().len() == 3
            && s.map_entries("dp_services") >= 1
            && s.map_entries("dp_backends") >= 2
    });
    assert!(
        agent
            .log_text()
            .contains(&format!("shop_web {vip}:80/tcp -> 2 backends")),
        "{}",
        agent.log_text()
    );
    let seen = |count| -> BTreeSet<String> {
        who_from_container(&dockerd, "client", &format!("{vip}:80"), count)
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    let answered = seen(30);
    assert_eq!(
        answered,
        ["shop-web-1", "shop-web-2"].map(String::from).into(),
        "both replicas answer through {vip}:80"
    );

    // Any container joins a service with the documented label.
    run_web(
        &dockerd,
        "extra",
        &[
            "-l",
            "dataplane.service=shop_web",
            "-l",
            "dataplane.service.port=80",
        ],
    );
    agent.wait_for("the third backend", |s| {
        s.endpoint_names().contains("extra")
    });
    let answered = seen(45);
    assert!(answered.contains("extra"), "{answered:?}");
    assert_eq!(answered.len(), 3, "{answered:?}");

    // A stopped replica leaves the service.
    dockerd.docker_ok(&["stop", "shop-web-1"]);
    agent.wait_for("shop-web-1 gone", |s| {
        !s.endpoint_names().contains("shop-web-1")
    });
    let answered = seen(20);
    assert!(!answered.contains("shop-web-1"), "{answered:?}");
    assert!(answered.contains("shop-web-2"), "{answered:?}");
}

#[test]
fn a_compose_service_vip_is_reached_from_the_host() {
    let dockerd = Dockerd::start();
    // The host's processes of this test: a cgroup of its own for the socket hooks.
    let cgroup = TestCgroup::create(&dockerd.name).unwrap_or_else(|e| panic!("{e}"));
    let vip = "10.96.0.10";
    let agent = dockerd.agent(&[
        "--service-vip-range",
        &format!("{vip}/32"),
        "--cgroup",
        cgroup.path_str(),
    ]);
    let compose = [
        "-l",
        "com.docker.compose.project=shop",
        "-l",
        "com.docker.compose.service=web",
        "--expose",
        "80",
    ];
    run_web(&dockerd, "shop-web-1", &compose);
    run_web(&dockerd, "shop-web-2", &compose);
    agent.wait_for("the service and its two backends", |s| {
        s.map_entries("dp_services") >= 1 && s.map_entries("dp_backends") >= 2
    });
    // One curl, 30 connections (each a new socket: the hook balances per socket).
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-H", "Connection: close"];
    let url = format!("http://{vip}/cgi-bin/who");
    cmd.extend(std::iter::repeat_n(url.as_str(), 30));
    let out = dockerd.host(&cgroup, &cmd);
    assert!(out.status.success(), "{out:?}");
    let answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(answers.len(), 30, "{answers:?}");
    let seen: BTreeSet<&str> = answers.iter().map(String::as_str).collect();
    assert_eq!(
        seen,
        ["shop-web-1", "shop-web-2"].into(),
        "both replicas answer the host through {vip}:80"
    );
}

#[test]
fn stopping_a_container_removes_its_entries() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    run_web(&dockerd, "keep", &["-p", "8081:80"]);
    run_web(&dockerd, "gone", &["-p", "8082:80", "-p", "8083:80"]);
    let before = agent.wait_for("both containers", |s| {
        s.endpoint_names().len() == 2 && s.map_entries("dp_ports") == 3
    });
    let gone_veth = before.interfaces_of("gone")[0].2.clone();
    assert!(attached_to(&before, &gone_veth));
    let endpoints_before = before.map_entries("dp_endpoints");
    who_from_outside(&dockerd, &format!("{HOST}:8082")).unwrap();

    dockerd.docker_ok(&["stop", "gone"]);
    let after = agent.wait_for("gone's entries removed", |s| {
        s.endpoint_names() == ["keep".to_owned()].into()
            && s.map_entries("dp_ports") == 1
            && s.map_entries("dp_endpoints") == endpoints_before - 1
    });
    // Docker removed the veth, and with it the program on it.
    assert!(!interface_exists(&dockerd, &gone_veth));
    assert!(after.last_error.is_none(), "{after:#?}");
    assert!(who_from_outside(&dockerd, &format!("{HOST}:8082")).is_err());
    assert!(who_from_outside(&dockerd, &format!("{HOST}:8081")).is_ok());

    // Started again it comes back (on a new veth); removed, it leaves nothing.
    dockerd.docker_ok(&["start", "gone"]);
    agent.wait_for("gone back", |s| {
        s.endpoint_names().len() == 2 && s.map_entries("dp_ports") == 3
    });
    who_from_outside(&dockerd, &format!("{HOST}:8083")).unwrap();
    dockerd.docker_ok(&["rm", "-f", "gone"]);
    agent.wait_for("gone removed", |s| {
        s.endpoint_names().len() == 1
            && s.map_entries("dp_ports") == 1
            && s.map_entries("dp_endpoints") == endpoints_before - 1
    });
}

#[test]
fn agent_started_after_the_containers_picks_them_up() {
    let dockerd = Dockerd::start();
    dockerd.docker_ok(&["network", "create", "back"]);
    run_web(&dockerd, "alpha", &["-p", "8081:80"]);
    run_web(&dockerd, "beta", &["--network", "back", "-p", "8082:80"]);
    // The agent reads the engine before it applies anything: when it first answers, the
    // containers are there already.
    let agent: Agent = dockerd.agent(&[]);
    let status = agent.status();
    assert_eq!(
        status.endpoint_names(),
        ["alpha".to_owned(), "beta".to_owned()].into(),
        "{status:#?}"
    );
    assert_eq!(status.map_entries("dp_ports"), 2);
    assert_eq!(status.map_entries("dp_endpoints"), 2);
    // dockerd 20.10 speaks API 1.41, and the agent speaks the engine's own version.
    let log = agent.log_text();
    assert!(log.contains("speaking 1.41"), "{log}");
    for (port, name) in [(8081, "alpha"), (8082, "beta")] {
        let body = who_from_outside(&dockerd, &format!("{HOST}:{port}")).unwrap();
        assert!(
            body.starts_with(&format!("{name} ")) && body.contains(OUTSIDE),
            "{body:?}"
        );
    }
}

#[test]
fn dockerd_restarted_under_a_running_agent_ends_with_the_right_maps() {
    let mut dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    run_web(&dockerd, "keep", &["--restart", "always", "-p", "8081:80"]);
    run_web(&dockerd, "once", &["-p", "8082:80"]);
    let before = agent.wait_for("both containers", |s| {
        s.endpoint_names().len() == 2 && s.map_entries("dp_ports") == 2
    });
    let old_veth = before.interfaces_of("keep")[0].2.clone();

    // dockerd stops its containers on the way down; `keep` comes back with it, `once` not.
    let stopped = std::time::Instant::now();
    dockerd.stop();
    eprintln!("dockerd stopped in {:?}", stopped.elapsed());
    dockerd.spawn();
    let after = agent.wait_for_within(
        Duration::from_secs(30),
        "the state after the restart",
        |s| {
            s.endpoint_names() == ["keep".to_owned()].into()
                && s.map_entries("dp_ports") == 1
                && s.map_entries("dp_endpoints") == 1
                && s.last_error.is_none()
        },
    );
    let (_, ip, veth) = after.interfaces_of("keep")[0].clone();
    assert_ne!(veth, old_veth, "keep was restarted on a new veth");
    assert_eq!(
        ip,
        dockerd.inspect("keep", "{{.NetworkSettings.IPAddress}}")
    );
    assert!(attached_to(&after, &veth));
    assert!(!interface_exists(&dockerd, &old_veth));
    assert!(
        agent.log_text().contains("retrying"),
        "the agent noticed the lost engine"
    );
    let body = who_from_outside(&dockerd, &format!("{HOST}:8081")).unwrap();
    assert!(
        body.starts_with("keep ") && body.contains(OUTSIDE),
        "{body:?}"
    );
    assert!(who_from_outside(&dockerd, &format!("{HOST}:8082")).is_err());
}

/// How a request right after `docker run` returned ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FirstRequest {
    Answered,
    /// Refused or reset: the client knows at once and can retry.
    Refused,
    /// Nothing came back before the client gave up.
    Hung,
}

/// One GET from the outside, as a user's client would make it right after `docker run`.
fn first_request(dockerd: &Dockerd, addr: &str) -> (FirstRequest, String) {
    let out = dockerd.outside(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{addr}/cgi-bin/who"),
    ]);
    let kind = match out.status.code() {
        Some(0) => FirstRequest::Answered,
        // 7: connection refused; 52: empty reply; 56: reset while receiving.
        Some(7 | 52 | 56) => FirstRequest::Refused,
        _ => FirstRequest::Hung,
    };
    (kind, String::from_utf8_lossy(&out.stderr).trim().to_owned())
}

/// Issue 14.3: with `--userland-proxy=false` dockerd still listens on a published port (to
/// hold it), and until the agent has applied a new container its port leads to that socket,
/// which completes the handshake and never answers. A request made as soon as `docker run`
/// returns must be answered or refused at once, never left hanging.
#[test]
fn a_request_right_after_docker_run_never_hangs() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    // Load, as on a host that does other work: containers that spin.
    for i in 0..2 {
        dockerd.docker_ok(&[
            "run",
            "-d",
            "--stop-timeout",
            "1",
            "--name",
            &format!("busy{i}"),
            IMAGE,
            "sh",
            "-c",
            "while :; do :; done",
        ]);
    }
    let mut outcomes = Vec::new();
    for i in 0..30u16 {
        let port = 8100 + i;
        run_web(&dockerd, &format!("web{i}"), &["-p", &format!("{port}:80")]);
        let (kind, error) = first_request(&dockerd, &format!("{HOST}:{port}"));
        eprintln!("web{i}: {kind:?} {error}");
        outcomes.push(kind);
        if kind != FirstRequest::Answered {
            // Whatever the first one got, the port works once the agent has it.
            agent.wait_for(&format!("web{i} published"), |s| {
                s.endpoint_names().contains(&format!("web{i}"))
            });
            let mut answered = false;
            for _ in 0..20 {
                if first_request(&dockerd, &format!("{HOST}:{port}")).0 == FirstRequest::Answered {
                    answered = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(answered, "web{i} never answered on {port}");
        }
    }
    let count = |k| outcomes.iter().filter(|o| **o == k).count();
    eprintln!(
        "first requests: {} answered, {} refused or reset, {} hung",
        count(FirstRequest::Answered),
        count(FirstRequest::Refused),
        count(FirstRequest::Hung)
    );
    assert_eq!(count(FirstRequest::Hung), 0, "{outcomes:?}");
}

/// Issue 14.6: a network made with Docker 28's `gateway_mode_ipv4=routed` (dockerd 20.10
/// keeps it as a driver option; the agent reads it whatever the engine's version): the outside
/// reaches the container's published port on its own address, other ports stay closed, and
/// the container's connections out keep its address.
#[test]
fn a_routed_network_is_reached_directly() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    dockerd.docker_ok(&[
        "network",
        "create",
        "--subnet",
        "172.29.0.0/24",
        "-o",
        "com.docker.network.bridge.gateway_mode_ipv4=routed",
        "direct",
    ]);
    run_web(&dockerd, "web", &["--network", "direct", "-p", "8080:80"]);
    agent.wait_for("web published", |s| {
        s.endpoint_names().contains("web") && s.map_entries("dp_ports") == 1
    });
    let ip = dockerd.inspect("web", "{{.NetworkSettings.Networks.direct.IPAddress}}");
    let routed = dockerd.outside(&["ip", "route", "add", "172.29.0.0/24", "via", HOST]);
    assert!(routed.status.success(), "{routed:?}");
    let body = who_from_outside(&dockerd, &format!("{ip}:80")).unwrap();
    assert!(
        body.starts_with("web ") && body.contains(OUTSIDE),
        "the container is reached directly, with the client's address: {body:?}"
    );
    // The host port is not used in routed mode.
    assert!(who_from_outside(&dockerd, &format!("{HOST}:8080")).is_err());
    let _server = outside_server(&dockerd);
    run_client(&dockerd, "cli", &["--network", "direct"]);
    let cli_ip = dockerd.inspect("cli", "{{.NetworkSettings.Networks.direct.IPAddress}}");
    agent.wait_for("cli", |s| s.endpoint_names().contains("cli"));
    assert_eq!(
        seen_outside(&dockerd, "cli"),
        cli_ip,
        "routed: no masquerade"
    );
}

/// The address of container `name` on `network`.
fn address_on(dockerd: &Dockerd, name: &str, network: &str) -> String {
    dockerd.inspect(
        name,
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
    )
}

/// A container reaching its own published port, through the host's address and through its
/// gateway's, is answered and seen coming from its gateway: on Docker's own dataplane (its
/// hairpin MASQUERADE, or docker-proxy) and on ours alike. Another container of the network
/// reaching it the same way is seen with its own address by ours (as by Docker without
/// docker-proxy), with the gateway's by Docker's defaults (docker-proxy's socket).
#[test]
fn a_container_reaches_its_own_published_port_as_with_dockers_dataplane() {
    for docker_dataplane in [true, false] {
        let dockerd = Dockerd::start_with(docker_dataplane);
        let agent = (!docker_dataplane).then(|| dockerd.agent(&[]));
        dockerd.docker_ok(&["network", "create", "--subnet", "172.31.5.0/24", "apps"]);
        run_web(&dockerd, "web", &["--network", "apps", "-p", "8080:80"]);
        run_client(&dockerd, "peer", &["--network", "apps"]);
        if let Some(agent) = &agent {
            agent.wait_for("web, peer and the port", |s| {
                s.endpoint_names().len() == 2 && s.map_entries("dp_ports") == 1
            });
        }
        let peer = address_on(&dockerd, "peer", "apps");
        let seen = if docker_dataplane {
            "172.31.5.1"
        } else {
            &peer
        };
        let answers = who_from_container(&dockerd, "peer", &format!("{HOST}:8080"), 2);
        assert_eq!(
            answers,
            vec![format!("web [::ffff:{seen}]"); 2],
            "peer to web's published port"
        );
        let which = if docker_dataplane { "Docker's" } else { "ours" };
        for addr in [format!("{HOST}:8080"), "172.31.5.1:8080".to_owned()] {
            let answers = who_from_container(&dockerd, "web", &addr, 3);
            assert_eq!(
                answers,
                vec!["web [::ffff:172.31.5.1]"; 3],
                "{which}: web to its own port at {addr}"
            );
        }
        if let Some(agent) = &agent {
            assert_eq!(agent.status().drops("NO_MAPPING_FOR_NAT_MASQUERADE"), 0);
        }
    }
}

/// A container of an `--internal` network reaches no other network's container through the
/// host's published ports (through the host's address, its own gateway or the other
/// network's), while the containers of the internal network still reach each other: on
/// Docker's own dataplane and on ours, where each refusal is a counted POLICY_DENIED drop.
#[test]
fn an_internal_network_reaches_no_published_port_as_with_dockers_dataplane() {
    for docker_dataplane in [true, false] {
        let dockerd = Dockerd::start_with(docker_dataplane);
        let agent = (!docker_dataplane).then(|| dockerd.agent(&[]));
        dockerd.docker_ok(&["network", "create", "--subnet", "172.31.5.0/24", "apps"]);
        dockerd.docker_ok(&[
            "network",
            "create",
            "--internal",
            "--subnet",
            "172.31.6.0/24",
            "vault",
        ]);
        run_web(&dockerd, "web", &["--network", "apps", "-p", "8080:80"]);
        run_web(&dockerd, "keeper", &["--network", "vault"]);
        run_client(&dockerd, "secret", &["--network", "vault"]);
        if let Some(agent) = &agent {
            agent.wait_for("the three containers and the port", |s| {
                s.endpoint_names().len() == 3 && s.map_entries("dp_ports") == 1
            });
        }
        let which = if docker_dataplane { "Docker's" } else { "ours" };
        let before = agent.as_ref().map(|a| a.status().drops("POLICY_DENIED"));
        for addr in [
            format!("{HOST}:8080"),
            "172.31.6.1:8080".to_owned(),
            "172.31.5.1:8080".to_owned(),
        ] {
            let answers = who_from_container(&dockerd, "secret", &addr, 1);
            assert!(
                answers.iter().all(|a| !a.starts_with("web ")),
                "{which}: the internal network reached web through {addr}: {answers:?}"
            );
        }
        let keeper = address_on(&dockerd, "keeper", "vault");
        let secret = address_on(&dockerd, "secret", "vault");
        let answers = who_from_container(&dockerd, "secret", &format!("{keeper}:80"), 1);
        assert_eq!(
            answers,
            vec![format!("keeper [::ffff:{secret}]")],
            "{which}: inside the internal network"
        );
        if let (Some(agent), Some(before)) = (&agent, before) {
            agent.wait_for("three refusals counted", |s| {
                s.drops("POLICY_DENIED") >= before + 3
            });
        }
    }
}

#[test]
fn an_ipv6_network_its_addresses_and_ipv6_bindings_are_followed() {
    let dockerd = Dockerd::start();
    let agent = dockerd.agent(&[]);
    dockerd.docker_ok(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "172.28.0.0/16",
        "--subnet",
        "fd00:28::/64",
        "net6",
    ]);
    run_web(
        &dockerd,
        "web6",
        &["--network", "net6", "-p", "8080:80", "-p", "[::1]:8082:80"],
    );
    let s = agent.wait_for("web6 with its IPv6 address", |s| {
        s.endpoints
            .iter()
            .any(|e| e.name == "web6" && e.ip6.is_some())
            && s.ports.len() == 2
    });
    assert!(s.last_error.is_none(), "{s:#?}");
    let ip6 = dockerd.inspect(
        "web6",
        "{{.NetworkSettings.Networks.net6.GlobalIPv6Address}}",
    );
    let row = s.endpoints.iter().find(|e| e.name == "web6").unwrap();
    assert_eq!(row.ip6.as_deref(), Some(ip6.as_str()));
    assert!(ip6.starts_with("fd00:28::"), "{ip6}");
    let net = s.networks.iter().find(|n| n.name == "net6").unwrap();
    assert_eq!(
        (net.subnet6.as_deref(), net.gateway6.as_deref()),
        (Some("fd00:28::/64"), Some("fd00:28::1"))
    );
    // `-p 8080:80`, which dockerd lists on 0.0.0.0 and ::, is one port on every address of
    // both families; `[::1]:8082` one IPv6 address.
    let ports: BTreeSet<(Option<String>, String)> = s
        .ports
        .iter()
        .map(|p| (p.host_ip.clone(), p.host_port.clone()))
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([
            (None, "8080".to_owned()),
            (Some("::1".to_owned()), "8082".to_owned())
        ])
    );
    assert_eq!(s.map_entries("dp_endpoints6"), 1);
    assert_eq!(s.map_entries("dp_ports6"), 2);
    // Over IPv4 only 8080 (::1 is IPv6), on every address.
    assert_eq!(s.map_entries("dp_ports"), 1);
    // The container's veth has its program whatever the family.
    assert!(attached_to(&s, &row.host_veth));
}

/// `command` (iptables-save or ip6tables-save) in dockerd's namespace.
fn dockerd_save(dockerd: &Dockerd, command: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", dockerd.name))
        .arg(command)
        .output()
        .expect("running iptables-save");
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An iptables-save text as `TABLE :CHAIN POLICY` and `TABLE -A CHAIN ...` lines, tables and
/// chains sorted, each chain's rules in their order, counters and comments left out.
fn normalised_rules(save: &str) -> Vec<String> {
    let mut chains: BTreeMap<(String, String), (String, Vec<String>)> = BTreeMap::new();
    let mut table = String::new();
    for line in save.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            name.clone_into(&mut table);
        } else if let Some(declared) = line.strip_prefix(':') {
            let mut words = declared.split_whitespace();
            let (chain, policy) = (words.next().unwrap(), words.next().unwrap());
            chains
                .entry((table.clone(), chain.to_owned()))
                .or_default()
                .0 = policy.to_owned();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap();
            chains
                .entry((table.clone(), chain.to_owned()))
                .or_default()
                .1
                .push(format!("{table} -A {rule}"));
        }
    }
    chains
        .into_iter()
        .flat_map(|((table, chain), (policy, rules))| {
            std::iter::once(format!("{table} :{chain} {policy}")).chain(rules)
        })
        .collect()
}

#[track_caller]
fn assert_same_rules(real: &str, bench: &str, what: &str) {
    let (real, bench) = (normalised_rules(real), normalised_rules(bench));
    let missing: Vec<&String> = bench.iter().filter(|r| !real.contains(r)).collect();
    let extra: Vec<&String> = real.iter().filter(|r| !bench.contains(r)).collect();
    assert!(
        real == bench,
        "{what}: the bench's rules differ from dockerd's (if in neither's only, in their \
         order)\nin the bench's only: {missing:#?}\nin dockerd's only: {extra:#?}\n\
         dockerd's (in order): {real:#?}\nthe bench's: {bench:#?}"
    );
}

/// The bench's ip6tables baseline (`docker_rules6`, bench/src/scenarios/published_port6.rs) is
/// what a real dockerd installs: ip6tables on, docker-proxy off, the bench's network (bridge
/// name, subnets, container address), first a container with no published port
/// (masquerade6's rules), then one publishing the bench's ports (published-port6's). Every
/// table, chain, policy and rule, in each chain's order, on both sides.
#[test]
fn the_ip6tables_baseline_is_what_dockerd_installs() {
    let dockerd = Dockerd::start_as(DockerDataplane::RulesOnly);
    dockerd.docker_ok(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "172.31.0.0/24",
        "--subnet",
        NETWORK6,
        "-o",
        &format!("com.docker.network.bridge.name={BRIDGE}"),
        "bench",
    ]);
    let on_the_network = [
        "--network",
        "bench",
        "--ip",
        "172.31.0.2",
        "--ip6",
        CONTAINER_IP6,
    ];
    run_client(&dockerd, "cli", &on_the_network);
    assert_same_rules(
        &dockerd_save(&dockerd, "ip6tables-save"),
        &docker_rules6(&[]),
        "a container without ports (masquerade6)",
    );
    dockerd.docker_ok(&["rm", "-f", "cli"]);
    let published: Vec<String> = PUBLISHED.iter().map(|(h, c)| format!("{h}:{c}")).collect();
    let mut args = on_the_network.to_vec();
    for port in &published {
        args.extend(["-p", port]);
    }
    run_web(&dockerd, "srv", &args);
    assert_same_rules(
        &dockerd_save(&dockerd, "ip6tables-save"),
        &docker_rules6(&PUBLISHED),
        "a container publishing the bench's ports (published-port6)",
    );
}

//! The agent on a real (namespaced) host: programs attached where the state says, seeing real
//! traffic, following state-file edits, refusing bad ones, detaching on SIGTERM.

use dataplane_tests::{
    Agent, Sandbox, StatusExt as _, attached_programs, dataplane_bin, has_program,
};

const SPEC: &str = r#"
uplink: eth0
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
  - {name: back, bridge: br-back, subnet: 172.30.2.0/24, gateway: 172.30.2.1}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
  - name: db
    interfaces: [{network: back, ip: 172.30.2.2, mac: "02:42:ac:1e:02:02", host_veth: veth-db}]
"#;

#[test]
fn attached_programs_see_real_traffic() {
    let sandbox = Sandbox::up(SPEC);
    // XDP attaches only when it has work (--xdp auto); here it is asked for, to see it count.
    let agent = Agent::start_with(&sandbox, &["--xdp", "always"]);
    let status = agent.status();
    let attached = status.attached();
    for (interface, program) in [
        ("eth0", "dp_uplink_ingress"),
        ("eth0", "dp_uplink_egress"),
        ("eth0", "dp_uplink_xdp"),
        ("veth-web1", "dp_container_ingress"),
        ("veth-web2", "dp_container_ingress"),
        ("veth-db", "dp_container_ingress"),
    ] {
        assert!(
            attached.contains(&(interface.into(), program.into())),
            "{program} on {interface}: {attached:?}"
        );
    }
    // ...and the eight socket hooks (both families) on the sandbox's host cgroup.
    for hook in [
        "dp_sock_connect4",
        "dp_sock_sendmsg4",
        "dp_sock_recvmsg4",
        "dp_sock_getpeername4",
        "dp_sock_connect6",
        "dp_sock_sendmsg6",
        "dp_sock_recvmsg6",
        "dp_sock_getpeername6",
    ] {
        assert!(
            attached.iter().any(|(target, program)| target
                .ends_with(&format!("dataplane-sandbox-{}", sandbox.name))
                && program == hook),
            "{hook}: {attached:?}"
        );
    }
    assert_eq!(attached.len(), 14, "{attached:?}");
    assert_eq!(status.map_entries("dp_endpoints_v2"), 3);
    // The kernel agrees (bpftool, not the agent's own account).
    let seen = attached_programs(&sandbox.netns("host"), "veth-web1");
    assert!(
        has_program(&seen, "dp_container_ingress"),
        "kernel reports {seen:?}"
    );
    let seen = attached_programs(&sandbox.netns("host"), "eth0");
    for program in ["dp_uplink_xdp", "dp_uplink_ingress", "dp_uplink_egress"] {
        assert!(has_program(&seen, program), "kernel reports {seen:?}");
    }

    // Real traffic: 5 TCP exchanges web2 -> web1 (same network), pings from outside.
    for _ in 0..5 {
        let reply = sandbox.exec_ok("web2", &["nc", "-w2", "172.30.1.2", "80"]);
        assert!(reply.starts_with("web1 172.30.1.3:"), "reply: {reply}");
    }
    sandbox.exec_ok("outside", &["ping", "-c3", "-i0.2", "-W1", "192.0.2.1"]);

    let status = agent.wait_for("counters", |s| {
        s.packets("veth-web2", "tc-ingress(container)") >= 5 * 4
            && s.packets("veth-web1", "tc-ingress(container)") >= 5 * 3
            && s.packets("eth0", "tc-ingress(uplink)") >= 3
            && s.packets("eth0", "xdp(uplink)") >= 3
            && s.packets("eth0", "tc-egress(uplink)") >= 3
    });
    // db sent nothing: its counter stays at zero, so counts are per interface, not global.
    assert_eq!(
        status.packets("veth-db", "tc-ingress(container)"),
        0,
        "{status:#?}"
    );
}

#[test]
fn state_edits_apply_and_bad_edits_keep_the_last_good_state() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);

    // A good edit: db leaves; its veth loses the program, its map entry goes.
    let without_db = SPEC.split("  - name: db").next().unwrap().to_owned();
    sandbox.write_state(&without_db);
    let status = agent.wait_for("db removed", |s| s.map_entries("dp_endpoints_v2") == 2);
    assert!(!status.attached().iter().any(|(i, _)| i == "veth-db"));
    assert!(status.last_error.is_none(), "{status:#?}");
    let seen = attached_programs(&sandbox.netns("host"), "veth-db");
    assert!(seen.is_empty(), "kernel still reports {seen:?}");

    // Bad edits, each rejected with entry and field named, each leaving the last good state.
    let cases = [
        (
            without_db.replace(
                "network: front, ip: 172.30.1.3",
                "network: nowhere, ip: 172.30.1.3",
            ),
            "endpoints[web2].interfaces[0].network: unknown network \"nowhere\"",
        ),
        (
            without_db.replace("ip: 172.30.1.3", "ip: 172.30.1.2"),
            "endpoints[web2].interfaces[0].ip: duplicate IP 172.30.1.2",
        ),
        (
            without_db.replace("host_veth: veth-web2", "host_veth: veth-ghost"),
            "endpoints[web2].interfaces[0].host_veth: interface \"veth-ghost\" does not exist",
        ),
        (
            format!("{without_db}\n  - {{name: [oops\n"),
            "is not valid YAML/JSON",
        ),
    ];
    for (text, expected) in cases {
        sandbox.write_state(&text);
        let status = agent.wait_for(expected, |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains(expected))
        });
        assert_eq!(status.map_entries("dp_endpoints_v2"), 2, "{status:#?}");
        assert_eq!(status.attached().len(), 12, "{status:#?}");
        // Traffic still flows under the last good state.
        let reply = sandbox.exec_ok("web2", &["nc", "-w2", "172.30.1.2", "80"]);
        assert!(reply.starts_with("web1 "), "{reply}");
    }

    // Fixing the file clears the error and applies it.
    sandbox.write_state(SPEC);
    let status = agent.wait_for("db back", |s| {
        s.last_error.is_none() && s.map_entries("dp_endpoints_v2") == 3
    });
    assert!(
        status
            .attached()
            .contains(&("veth-db".into(), "dp_container_ingress".into()))
    );
}

#[test]
fn a_bad_state_file_at_start_is_refused_with_entry_and_field() {
    let sandbox = Sandbox::up(SPEC);
    let bad = SPEC.replace("subnet: 172.30.2.0/24", "subnet: 172.30.2.0/33");
    let path = sandbox.dir.join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", sandbox.netns("host")))
        .arg(dataplane_bin())
        .args(["agent", "--state"])
        .arg(&path)
        .args(["--pin-dir", &format!("/sys/fs/bpf/{}", sandbox.name)])
        .args(["--socket", &format!("/run/dataplane/{}.sock", sandbox.name)])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{}", sandbox.name));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("networks[back].subnet: prefix length \"33\" is not 0-32"),
        "{stderr}"
    );
}

#[test]
fn sigterm_detaches_and_a_restart_adopts_the_pinned_maps() {
    let sandbox = Sandbox::up(SPEC);
    let mut agent = Agent::start(&sandbox);
    sandbox.exec_ok("web2", &["nc", "-w2", "172.30.1.2", "80"]);
    let before = agent.wait_for("traffic counted", |s| {
        s.packets("veth-web2", "tc-ingress(container)") > 0
    });
    let counted = before.packets("veth-web2", "tc-ingress(container)");

    let exit = agent.stop("TERM");
    assert!(
        exit.success(),
        "agent exit on SIGTERM: {exit}\n{}",
        agent.log_text()
    );
    for interface in ["eth0", "veth-web1"] {
        let seen = attached_programs(&sandbox.netns("host"), interface);
        assert!(seen.is_empty(), "{interface} still has {seen:?}");
    }
    assert!(
        agent.pin_dir.join("dp_endpoints_v2").exists(),
        "maps stay pinned"
    );

    // SIGKILL leaves no chance to clean up; the next agent must still start on the same pins.
    agent.restart();
    let after = agent.status();
    assert!(
        after.packets("veth-web2", "tc-ingress(container)") >= counted,
        "counters survive the restart: {after:#?}"
    );
    agent.stop("KILL");
    agent.restart();
    let status = agent.status();
    assert_eq!(status.attached().len(), 13, "{status:#?}");
    assert_eq!(status.map_entries("dp_endpoints_v2"), 3);
}

#[test]
fn a_vanished_interface_is_reported_and_its_attachment_forgotten() {
    let sandbox = Sandbox::up(SPEC);
    let agent = Agent::start(&sandbox);
    // The container's veth goes away behind the agent's back (as when a container dies).
    sandbox.exec_ok("host", &["ip", "link", "del", "veth-db"]);
    let status = agent.wait_for("the missing interface reported", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("endpoints[db].interfaces[0].host_veth"))
    });
    assert!(
        !status
            .attached()
            .iter()
            .any(|(interface, _)| interface == "veth-db"),
        "no attachment record outlives its interface: {status:#?}"
    );
    // Everything else keeps working under the last good state.
    let reply = sandbox.exec_ok("web2", &["nc", "-w2", "172.30.1.2", "80"]);
    assert!(reply.starts_with("web1 "), "{reply}");
}

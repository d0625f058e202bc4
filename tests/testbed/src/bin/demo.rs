//! `cargo xtask demo` (which sets up and builds, then runs this as root): a host with two
//! networks and three containers in network namespaces, the agent attached to it, real
//! traffic, and what the agent saw. Built from the test bed like the tests and the bench.

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use testbed::{Agent, Error, Sandbox};

const NAME: &str = "dpdemo";
const SPEC: &str = r#"
networks:
  - {name: frontend, bridge: br-frontend, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
  - {name: backend, bridge: br-backend, subnet: 172.30.2.0/24, gateway: 172.30.2.1}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces: [{network: frontend, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
  - name: web2
    labels: {app: web}
    interfaces: [{network: frontend, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}]
  - name: db
    labels: {tier: db}
    interfaces: [{network: backend, ip: 172.30.2.2, mac: "02:42:ac:1e:02:02", host_veth: veth-db}]
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 80}
  - {endpoint: web2, protocol: udp, host_port: 5353, container_port: 53}
"#;

/// `==> [demo] ...`, as xtask prints its steps.
fn step(what: &str) {
    eprintln!("\x1b[1m==> [demo]\x1b[0m {what}");
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> testbed::Result<()> {
    if !testbed::is_root() {
        return Err(Error::Failed(
            "the demo loads kernel programs and creates network namespaces: run it as root \
             (sudo cargo xtask demo)"
                .into(),
        ));
    }
    let binary = testbed::dataplane_bin();
    // A demo interrupted earlier may have left its sandbox behind.
    testbed::sandbox::remove(&binary, NAME);
    let work = std::env::temp_dir().join(format!("{NAME}-{}", std::process::id()));

    step("building the sandbox: host, 2 networks, 3 containers, an outside client");
    let sandbox = Sandbox::create(&binary, NAME, SPEC, &work)?;
    step(&format!(
        "starting the agent in {} on {}",
        sandbox.netns("host"),
        sandbox.state_file.display()
    ));
    // Host processes of the sandbox live in a cgroup of their own; the agent's socket hook
    // (localhost to published ports) goes there, never on the real host's processes.
    let agent = Agent::on_state_file(&sandbox, &[])?;

    // The outside client runs a server too, so containers have something to reach outside.
    let outside_server = sandbox.serve_outside("9999", None);

    step("traffic (each server answers with its name and the client address it saw)");
    let curl = |url: &'static str| vec!["curl", "-sS", "--max-time", "3", url];
    let show = |what: &str, from: &str, cmd: &[&str]| show_line(&sandbox, what, from, cmd);
    show(
        "outside -> host:8080 -> web1:80 (published)",
        "outside",
        &curl("http://192.0.2.1:8080/"),
    );
    show(
        "outside -> host:5353/udp -> web2:53 (published)",
        "outside",
        &["sh", "-c", "echo hi | nc -u -w1 192.0.2.1 5353"],
    );
    show(
        "host process -> localhost:8080 (no proxy)",
        "host",
        &curl("http://127.0.0.1:8080/"),
    );
    show(
        "web2 -> host:8080 (hairpin)",
        "web2",
        &curl("http://192.0.2.1:8080/"),
    );
    show(
        "web1 -> outside:9999 (masquerade)",
        "web1",
        &["nc", "-w3", "192.0.2.2", "9999"],
    );
    show(
        "db -> outside (ping, masquerade)",
        "db",
        &["ping", "-c1", "-W2", "192.0.2.2"],
    );
    show(
        "web2 -> web1:80 (same network)",
        "web2",
        &["nc", "-w2", "172.30.1.2", "80"],
    );

    step("the flows it logged (`dataplane observe --last 20 -o compact`)");
    let socket = agent.socket.to_str().expect("UTF-8 path");
    run_shown(
        &binary,
        &[
            "observe", "--last", "20", "-o", "compact", "--socket", socket,
        ],
    )?;
    step("what the agent reports (`dataplane status`)");
    run_shown(&binary, &["status", "--socket", socket])?;
    step("done; removing the sandbox");
    // Drop order: the server, the agent (it detaches its programs), then the sandbox.
    drop(outside_server);
    drop(agent);
    drop(sandbox);
    Ok(())
}

/// Runs `dataplane ARGS` with its output on our terminal.
fn run_shown(binary: &Path, args: &[&str]) -> testbed::Result<()> {
    let status = Command::new(binary)
        .args(args)
        .status()
        .map_err(|e| Error::Failed(format!("dataplane {}: {e}", args.join(" "))))?;
    if !status.success() {
        return Err(Error::Failed(format!(
            "dataplane {} failed",
            args.join(" ")
        )));
    }
    Ok(())
}

/// One line: whether `cmd` from `from` succeeded, and the first line it printed.
fn show_line(sandbox: &Sandbox, what: &str, from: &str, cmd: &[&str]) {
    let o = sandbox.exec(from, cmd);
    let (ok, text) = (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
    );
    let mark = if ok { "ok  " } else { "FAIL" };
    println!("  {mark} {what:<50} {text}");
}

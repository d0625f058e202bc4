//! `cargo xtask demo`: a host with two networks and three containers in network namespaces,
//! the agent attached to it, real traffic, and what the agent saw.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::step;

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

/// Stops the agent and removes the sandbox and pins, also when the demo fails halfway.
struct Cleanup<'a> {
    binary: &'a Path,
    agent: Option<Child>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SIGTERM lets the agent detach its programs.
            let _ = Command::new("kill").arg(agent.id().to_string()).status();
            let _ = agent.wait();
        }
        let _ = Command::new(self.binary)
            .args(["sandbox", "down", "--name", NAME])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(pin_dir());
    }
}

fn pin_dir() -> String {
    format!("/sys/fs/bpf/{NAME}")
}

fn socket() -> String {
    format!("/run/dataplane/{NAME}.sock")
}

pub fn run(binary: &Path) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("{NAME}-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let spec = work.join("spec.yaml");
    std::fs::write(&spec, SPEC)?;

    let mut cleanup = Cleanup {
        binary,
        agent: None,
    };
    // A demo interrupted earlier may have left its sandbox behind.
    let _ = Command::new(binary)
        .args(["sandbox", "down", "--name", NAME])
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(pin_dir());

    step(
        "demo",
        "building the sandbox: host, 2 networks, 3 containers, an outside client",
    );
    let out = Command::new(binary)
        .args(["sandbox", "up"])
        .arg(&spec)
        .args(["--name", NAME])
        .output()
        .context("running dataplane sandbox up")?;
    if !out.status.success() {
        bail!(
            "sandbox up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let state = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .context("sandbox up printed no state file path")?
        .trim()
        .to_owned();

    step(
        "demo",
        &format!("starting the agent in {NAME}-host on {state}"),
    );
    // Host processes of the sandbox live in a cgroup of their own; the agent's socket hook
    // (localhost to published ports) goes there, never on the real host's processes.
    let cgroup = std::fs::read_to_string(format!("/run/dataplane/sandbox/{NAME}/cgroup"))
        .unwrap_or_else(|_| "none".into());
    let agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NAME}-host"))
        .arg("--")
        .arg(binary)
        .args([
            "agent",
            "--state",
            &state,
            "--pin-dir",
            &pin_dir(),
            "--socket",
            &socket(),
        ])
        .args(["--cgroup", cgroup.trim()])
        .stderr(std::fs::File::create(work.join("agent.log"))?)
        .spawn()
        .context("starting the agent")?;
    cleanup.agent = Some(agent);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Path::new(&socket()).exists() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not come up; see {}",
                work.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The outside client runs a server too, so containers have something to reach outside.
    let outside_server = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NAME}-out"))
        .arg("--")
        .arg(binary)
        .args(["sandbox", "serve", "--name", "outside", "--tcp", "9999"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting the outside server")?;
    let _outside_server = KillOnDrop(outside_server);
    std::thread::sleep(Duration::from_millis(300));

    step(
        "demo",
        "traffic (each server answers with its name and the client address it saw)",
    );
    let curl = |url: &'static str| vec!["curl", "-sS", "--max-time", "3", url];
    show(
        binary,
        "outside -> host:8080 -> web1:80 (published)",
        "outside",
        &curl("http://192.0.2.1:8080/"),
    );
    show(
        binary,
        "outside -> host:5353/udp -> web2:53 (published)",
        "outside",
        &["sh", "-c", "echo hi | nc -u -w1 192.0.2.1 5353"],
    );
    show(
        binary,
        "host process -> localhost:8080 (no proxy)",
        "host",
        &curl("http://127.0.0.1:8080/"),
    );
    show(
        binary,
        "web2 -> host:8080 (hairpin)",
        "web2",
        &curl("http://192.0.2.1:8080/"),
    );
    show(
        binary,
        "web1 -> outside:9999 (masquerade)",
        "web1",
        &["nc", "-w3", "192.0.2.2", "9999"],
    );
    show(
        binary,
        "db -> outside (ping, masquerade)",
        "db",
        &["ping", "-c1", "-W2", "192.0.2.2"],
    );
    show(
        binary,
        "web2 -> web1:80 (same network)",
        "web2",
        &["nc", "-w2", "172.30.1.2", "80"],
    );

    step(
        "demo",
        "the flows it logged (`dataplane observe --last 20 -o compact`)",
    );
    let observe = Command::new(binary)
        .args([
            "observe",
            "--last",
            "20",
            "-o",
            "compact",
            "--socket",
            &socket(),
        ])
        .status()?;
    if !observe.success() {
        bail!("dataplane observe failed");
    }

    step("demo", "what the agent reports (`dataplane status`)");
    let status = Command::new(binary)
        .args(["status", "--socket", &socket()])
        .status()?;
    if !status.success() {
        bail!("dataplane status failed");
    }
    step("demo", "done; removing the sandbox");
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn show(binary: &Path, what: &str, from: &str, cmd: &[&str]) {
    let out = Command::new(binary)
        .args(["sandbox", "exec", "--name", NAME, from, "--"])
        .args(cmd)
        .stdin(Stdio::null())
        .output();
    let (ok, text) = match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        ),
        Err(e) => (false, e.to_string()),
    };
    let mark = if ok { "ok  " } else { "FAIL" };
    println!("  {mark} {what:<50} {text}");
}

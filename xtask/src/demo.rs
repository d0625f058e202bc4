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

    step("demo", "traffic");
    show(
        binary,
        "web2 -> web1:80 (same network, TCP)",
        "web2",
        &["nc", "-w2", "172.30.1.2", "80"],
    );
    show(
        binary,
        "web1 -> web2:80 (same network, UDP)",
        "web1",
        &["sh", "-c", "echo hi | nc -u -w1 172.30.1.3 80"],
    );
    show(
        binary,
        "db -> web1:80 (other network, routed by the host)",
        "db",
        &["nc", "-w2", "172.30.1.2", "80"],
    );
    show(
        binary,
        "web1 -> host 192.0.2.1 (ping)",
        "web1",
        &["ping", "-c1", "-W1", "192.0.2.1"],
    );

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
    println!("  {mark} {what:<52} {text}");
}

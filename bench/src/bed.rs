//! A bed: one sandbox (testbed::Sandbox) plus what the bench starts in it (servers, the agent,
//! a path's own guards such as a dockerd). Dropping it stops them in reverse order and removes
//! the sandbox, its pins and socket, also when the bench fails halfway or is interrupted.

use std::{
    any::Any,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use dataplane::control::status::Status;
use testbed::{Agent, Captured, Process, Sandbox, interrupt, process::last_lines};

/// The client target of a host process in the sandbox host's cgroup.
pub use testbed::sandbox::HOST_CGROUP;

/// How long a server may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub enum Server {
    /// nginx answering `ok` (bed.rs writes its config), on IPv4.
    Nginx { target: &'static str, port: u16 },
    /// The same on IPv4 and IPv6 (a socket of each family: the IPv4 one is the same as
    /// `Nginx`'s, so that IPv4 scenarios are not changed by IPv6 ones).
    NginxDual { target: &'static str, port: u16 },
    /// `iperf3 -s`.
    Iperf3 { target: &'static str, port: u16 },
}

impl Server {
    pub fn target(&self) -> &'static str {
        match self {
            Server::Nginx { target, .. }
            | Server::NginxDual { target, .. }
            | Server::Iperf3 { target, .. } => target,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Server::Nginx { port, .. }
            | Server::NginxDual { port, .. }
            | Server::Iperf3 { port, .. } => *port,
        }
    }
}

pub struct Bed {
    pub name: String,
    /// Guards a path's setup handed over ([`Bed::keep`]), dropped first, last kept first.
    kept: Vec<Box<dyn Any>>,
    agent: Option<Agent>,
    /// Servers and other processes, stopped in reverse order after the agent.
    processes: Vec<Process>,
    sandbox: Sandbox,
}

impl Bed {
    /// `dataplane sandbox up SPEC --name NAME`, with `work` as the bed's temp dir.
    pub fn up(binary: &Path, name: &str, spec: &str, work: &Path) -> anyhow::Result<Bed> {
        let sandbox = Sandbox::create(binary, name, spec, work)?;
        Ok(Bed {
            name: name.to_owned(),
            kept: Vec::new(),
            agent: None,
            processes: Vec::new(),
            sandbox,
        })
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// A file in this bed's temp dir (removed with the bed).
    pub fn work_file(&self, name: &str) -> PathBuf {
        self.sandbox.work_file(name)
    }

    /// The state file the agent of this bed reads.
    pub fn state_file(&self) -> &Path {
        &self.sandbox.state_file
    }

    /// Runs a command in a target's namespace to completion (or `timeout`, or Ctrl-C).
    pub fn run(&self, target: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Captured> {
        Ok(self.sandbox.run(target, args, timeout)?)
    }

    /// Like `run`, failing unless the command succeeds.
    pub fn run_ok(&self, target: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        Ok(self.sandbox.run_ok(target, args, timeout)?)
    }

    /// Starts a long-running process in a target's namespace (stopped when the bed goes);
    /// returns its index for [`Bed::pid`].
    pub fn spawn(&mut self, what: &str, target: &str, args: &[&str]) -> anyhow::Result<usize> {
        let process = self.sandbox.spawn_logged(what, target, args)?;
        self.processes.push(process);
        Ok(self.processes.len() - 1)
    }

    /// The pid of a process `spawn` started (its index).
    pub fn pid(&self, index: usize) -> u32 {
        self.processes[index].pid()
    }

    /// Keeps `guard` until the bed goes, dropped before its processes are stopped (what a path
    /// set up that stopping them and removing the sandbox would not undo, e.g. a dockerd's
    /// containers and mounts).
    pub fn keep(&mut self, guard: impl Any) {
        self.kept.push(Box::new(guard));
    }

    /// Starts one of the scenario's servers and waits until it listens.
    pub fn start_server(&mut self, server: &Server) -> anyhow::Result<()> {
        // The sandbox runs its own tiny server on port 80 and on every published container
        // port of each endpoint; ours need those ports.
        self.sandbox.stop_sandbox_server(server.target())?;
        let index = match *server {
            Server::Nginx { target, port } | Server::NginxDual { target, port } => {
                let ipv6 = matches!(server, Server::NginxDual { .. });
                // One directory per server: a scenario may run several (scenarios/vip.rs).
                let dir = self.work_file(&format!("nginx-{target}-{port}"));
                fs::create_dir_all(&dir)?;
                let conf = dir.join("nginx.conf");
                fs::write(&conf, nginx_conf(&dir, port, ipv6))?;
                let conf = conf.to_string_lossy().into_owned();
                let error_log = dir.join("error.log").to_string_lossy().into_owned();
                let prefix = format!("{}/", dir.display());
                self.spawn(
                    &format!("nginx in {target}"),
                    target,
                    &[
                        "nginx",
                        "-p",
                        &prefix,
                        "-e",
                        &error_log,
                        "-c",
                        &conf,
                        "-g",
                        "daemon off;",
                    ],
                )?
            }
            // In the foreground rather than `-D`: a child of ours is one we can stop by pid.
            // iperf3 -s listens on IPv4 and IPv6 (one dual-stack socket) by itself.
            Server::Iperf3 { target, port } => self.spawn(
                "iperf3 server",
                target,
                &["iperf3", "-s", "-p", &port.to_string()],
            )?,
        };
        self.wait_listening(index, server.target(), server.port())
    }

    fn wait_listening(&mut self, index: usize, target: &str, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let filter = format!("sport = :{port}");
        loop {
            interrupt::check()?;
            self.processes[index].check_running()?;
            let out = self.run_ok(target, &["ss", "-Hltn", &filter], Duration::from_secs(5))?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not listen on port {port} after {START_TIMEOUT:?}",
                    self.processes[index].what()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the agent on the sandbox's state file, in the host namespace, as the tests do,
    /// and waits until it answers.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.start_agent_with(&[])
    }

    /// [`Bed::start_agent`] with more options for the agent.
    pub fn start_agent_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.agent = Some(Agent::on_state_file(&self.sandbox, extra)?);
        Ok(())
    }

    /// The agent with these options (and the bed's pin dir and socket) but no state file,
    /// e.g. following a Docker engine (`--docker SOCKET`).
    pub fn start_agent_args(&mut self, args: &[&str]) -> anyhow::Result<()> {
        self.agent = Some(Agent::in_sandbox(&self.sandbox, args)?);
        Ok(())
    }

    /// The status of the bed's agent.
    pub fn agent_status(&self) -> anyhow::Result<Status> {
        match &self.agent {
            Some(agent) => Ok(agent.read_status()?),
            None => bail!("no agent in bed {}", self.name),
        }
    }

    /// The pid of the agent this bed started.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().and_then(Agent::pid)
    }

    /// The last lines the agent logged, for failure reasons ("" without an agent).
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|agent| last_lines(agent.log_text().trim(), 5))
            .unwrap_or_default()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        while let Some(guard) = self.kept.pop() {
            drop(guard);
        }
        // The agent (started last) detaches its programs on SIGTERM first.
        drop(self.agent.take());
        while let Some(process) = self.processes.pop() {
            drop(process);
        }
        // Then the sandbox (its own Drop).
    }
}

/// nginx answering `ok` to everything on one port. One worker: with wrk's one thread that
/// fills the 2 cores, and the kernel's share of the work is what the paths differ in. Every
/// path it writes is in the bench's temp dir, so nothing under /etc or /var is used.
fn nginx_conf(dir: &Path, port: u16, ipv6: bool) -> String {
    let d = dir.display();
    let listen6 = if ipv6 {
        format!("\n        listen [::]:{port} ipv6only=on;")
    } else {
        String::new()
    };
    format!(
        r#"# Written by cargo xtask bench.
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    # wrk keeps its 32 connections open for the whole run: never close them.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port};{listen6}
        location / {{
            default_type text/plain;
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_conf_keeps_everything_in_its_dir() {
        let conf = nginx_conf(Path::new("/tmp/x"), 80, false);
        assert!(conf.contains("listen 80;"));
        assert!(!conf.contains("[::]"));
        let dual = nginx_conf(Path::new("/tmp/x"), 80, true);
        assert!(dual.contains("listen 80;\n        listen [::]:80 ipv6only=on;\n"));
        assert!(conf.contains("pid /tmp/x/nginx.pid;"));
        assert!(conf.contains("access_log off;"));
        let paths = [
            "pid ",
            "error_log ",
            "client_body_temp_path ",
            "scgi_temp_path ",
        ];
        for line in conf.lines().map(str::trim_start) {
            if paths.iter().any(|p| line.starts_with(p)) {
                assert!(line.contains(" /tmp/x/"), "{line}");
            }
        }
    }
}

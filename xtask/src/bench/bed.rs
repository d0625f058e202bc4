//! A test bed: one sandbox (`dataplane sandbox up`) plus the processes the bench starts in it
//! (servers, the agent). Dropping it stops them and removes the sandbox, its pins and socket,
//! also when the bench fails halfway or is interrupted.

use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{check_interrupted, interrupted, scenario::Server};

/// Where `dataplane sandbox` keeps one directory per sandbox (dataplane/src/sandbox.rs).
pub const SANDBOX_ROOT: &str = "/run/dataplane/sandbox";
/// The client target of a host process in the sandbox host's cgroup (see `Bed::netns`).
pub const HOST_CGROUP: &str = "host-cgroup";
/// How long a stopped process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// How long a server or the agent may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Bed {
    binary: PathBuf,
    pub name: String,
    work: PathBuf,
    /// Started by us, stopped in reverse order by Drop.
    children: Vec<Started>,
    /// Run first by Drop, in reverse order (what a path set up that stopping its processes
    /// and removing the sandbox would not undo, e.g. a dockerd's containers and mounts).
    teardown: Vec<Box<dyn FnOnce()>>,
}

struct Started {
    what: String,
    child: Child,
    log: PathBuf,
}

/// What a command printed, captured by `Bed::run`.
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// stderr (or stdout when stderr is empty), trimmed, for error messages.
    pub fn complaint(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let text = text.trim();
        if text.is_empty() {
            format!("{} with no output", self.status)
        } else {
            format!("{}: {}", self.status, last_lines(text, 5))
        }
    }
}

impl Bed {
    /// `dataplane sandbox up SPEC --name NAME`. The guard exists before the sandbox does, so a
    /// half-built sandbox (or one whose `up` was interrupted) is removed too.
    pub fn up(binary: &Path, name: &str, spec: &str, work: &Path) -> anyhow::Result<Bed> {
        fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let bed = Bed {
            binary: binary.to_owned(),
            name: name.to_owned(),
            work: work.to_owned(),
            children: Vec::new(),
            teardown: Vec::new(),
        };
        let spec_path = work.join("spec.yaml");
        fs::write(&spec_path, spec).with_context(|| format!("writing {}", spec_path.display()))?;
        let mut up = Command::new(binary);
        up.args(["sandbox", "up"])
            .arg(&spec_path)
            .args(["--name", name]);
        let out =
            run_timed(&mut up, Duration::from_secs(60)).context("running dataplane sandbox up")?;
        if !out.status.success() {
            bail!("dataplane sandbox up failed: {}", out.complaint());
        }
        Ok(bed)
    }

    /// A file in this bed's temp dir (removed with the bed).
    pub fn work_file(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// The namespace of a sandbox target: `host`, `outside` or an endpoint name; also
    /// `host-cgroup`: the host namespace, with commands in the sandbox host's cgroup.
    pub fn netns(&self, target: &str) -> String {
        match target {
            "outside" => format!("{}-out", self.name),
            HOST_CGROUP => format!("{}-host", self.name),
            other => format!("{}-{other}", self.name),
        }
    }

    pub fn netns_path(&self, target: &str) -> String {
        format!("/run/netns/{}", self.netns(target))
    }

    /// `nsenter --net=NS -- ARGS`: only the network namespace changes (not `ip netns exec`,
    /// which remounts /sys and would hide the shared bpffs from the agent).
    pub fn command_in(&self, target: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path(target)))
            .arg("--")
            .args(args);
        if target == HOST_CGROUP {
            // As `dataplane sandbox exec NAME host` runs commands: in the cgroup the sandbox
            // made for its host (where the agent's socket hook goes with --cgroup).
            if let Ok(cgroup) = fs::read_to_string(self.sandbox_dir().join("cgroup")) {
                let procs = PathBuf::from(cgroup.trim()).join("cgroup.procs");
                // SAFETY: the closure runs in the child between fork and exec and only writes
                // a file.
                unsafe {
                    cmd.pre_exec(move || fs::write(&procs, "0"));
                }
            }
        }
        cmd
    }

    /// The sandbox's own directory (its state file, the path of its host cgroup).
    pub fn sandbox_dir(&self) -> PathBuf {
        Path::new(SANDBOX_ROOT).join(&self.name)
    }

    /// The state file the agent of this bed reads.
    pub fn state_file(&self) -> PathBuf {
        self.sandbox_dir().join("state.yaml")
    }

    /// Runs a command in a target's namespace to completion (or `timeout`, or Ctrl-C).
    pub fn run(&self, target: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Captured> {
        run_timed(&mut self.command_in(target, args), timeout)
    }

    /// Like `run`, failing unless the command succeeds.
    pub fn run_ok(&self, target: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let out = self.run(target, args, timeout)?;
        if !out.status.success() {
            bail!("`{}` in {target}: {}", args.join(" "), out.complaint());
        }
        Ok(out.stdout)
    }

    /// Starts a long-running process in a target's namespace, in a process group of its own
    /// (Ctrl-C must not kill it before the clients; Drop stops it).
    pub fn spawn(&mut self, what: &str, target: &str, args: &[&str]) -> anyhow::Result<usize> {
        let log = self.work.join(format!("{}.log", what.replace(' ', "-")));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = self
            .command_in(target, args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.children.push(Started {
            what: what.to_owned(),
            child,
            log,
        });
        Ok(self.children.len() - 1)
    }

    /// Fails with the process's log if it has exited.
    fn check_running(&mut self, index: usize) -> anyhow::Result<()> {
        let started = &mut self.children[index];
        if let Some(status) = started.child.try_wait()? {
            let log = fs::read_to_string(&started.log).unwrap_or_default();
            bail!(
                "{} exited ({status}): {}",
                started.what,
                last_lines(log.trim(), 10)
            );
        }
        Ok(())
    }

    /// Starts one of the scenario's servers and waits until it listens.
    pub fn start_server(&mut self, server: &Server) -> anyhow::Result<()> {
        // The sandbox runs its own tiny server on port 80 and on every published container
        // port of each endpoint; ours need those ports.
        self.stop_sandbox_server(server.target())?;
        let index = match server {
            Server::Nginx { target, port } => {
                // One directory per server: a scenario may run several (scenarios/vip.rs).
                let dir = self.work.join(format!("nginx-{target}-{port}"));
                fs::create_dir_all(&dir)?;
                let conf = dir.join("nginx.conf");
                fs::write(&conf, nginx_conf(&dir, *port))?;
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
            check_interrupted()?;
            self.check_running(index)?;
            let out = self.run_ok(target, &["ss", "-Hltn", &filter], Duration::from_secs(5))?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not listen on port {port} after {START_TIMEOUT:?}",
                    self.children[index].what
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the `dataplane sandbox serve` in a target's namespace (found by its command line
    /// among the namespace's processes), and waits until it is gone so its ports are free.
    fn stop_sandbox_server(&self, target: &str) -> anyhow::Result<()> {
        let out = run_timed(
            Command::new("ip").args(["netns", "pids", &self.netns(target)]),
            Duration::from_secs(5),
        )?;
        let pids: Vec<i32> = out
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|pid| is_sandbox_server(*pid))
            .collect();
        terminate(&pids);
        Ok(())
    }

    /// Runs `f` when the bed goes, before its processes are stopped.
    pub fn on_teardown(&mut self, f: impl FnOnce() + 'static) {
        self.teardown.push(Box::new(f));
    }

    /// The pid of a process `spawn` started (its index).
    pub fn pid(&self, index: usize) -> u32 {
        self.children[index].child.id()
    }

    /// Starts the agent on the sandbox's state file, in the host namespace, the way the tests
    /// do (tests/src/lib.rs `Agent::spawn`), and waits until `dataplane status` answers.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.start_agent_with(&[])
    }

    /// [`Bed::start_agent`] with more options for the agent.
    pub fn start_agent_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let state = format!("{SANDBOX_ROOT}/{}/state.yaml", self.name);
        let mut args = vec!["--state", state.as_str()];
        args.extend_from_slice(extra);
        self.start_agent_args(&args)
    }

    /// The agent with these options (and the bed's pin dir and socket) but no state file,
    /// e.g. following a Docker engine (`--docker SOCKET`).
    pub fn start_agent_args(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let pin_dir = pin_dir(&self.name).to_string_lossy().into_owned();
        let socket = socket(&self.name);
        let socket_text = socket.to_string_lossy().into_owned();
        let binary = self.binary.to_string_lossy().into_owned();
        let mut args = vec![
            binary.as_str(),
            "agent",
            "--pin-dir",
            &pin_dir,
            "--socket",
            &socket_text,
        ];
        // The socket hook goes on the sandbox's own host cgroup (or none), never on the
        // machine's cgroup2 root, unless the scenario chose one itself.
        let cgroup = fs::read_to_string(self.sandbox_dir().join("cgroup"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "none".to_owned());
        if !extra.contains(&"--cgroup") {
            args.extend(["--cgroup", cgroup.as_str()]);
        }
        args.extend_from_slice(extra);
        let index = self.spawn("agent", "host", &args)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_interrupted()?;
            self.check_running(index)?;
            let answered = run_timed(
                Command::new(&self.binary)
                    .args(["status", "--json", "--socket"])
                    .arg(&socket),
                Duration::from_secs(5),
            )
            .is_ok_and(|out| out.status.success());
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not answer `dataplane status` within {START_TIMEOUT:?}: {}",
                    self.agent_log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `dataplane status --json` of the bed's agent.
    pub fn agent_status(&self) -> anyhow::Result<serde_json::Value> {
        let out = run_timed(
            Command::new(&self.binary)
                .args(["status", "--json", "--socket"])
                .arg(socket(&self.name)),
            Duration::from_secs(10),
        )?;
        if !out.status.success() {
            bail!("dataplane status: {}", out.complaint());
        }
        serde_json::from_str(&out.stdout).context("dataplane status --json is not JSON")
    }

    /// The pid of the agent this bed started (nsenter execs it, so it is the child's).
    pub fn agent_pid(&self) -> Option<u32> {
        self.children
            .iter()
            .find(|c| c.what == "agent")
            .map(|c| c.child.id())
    }

    /// The last lines the agent logged, for failure reasons ("" without an agent).
    pub fn agent_log(&self) -> String {
        self.children
            .iter()
            .find(|c| c.what == "agent")
            .and_then(|c| fs::read_to_string(&c.log).ok())
            .map(|log| last_lines(log.trim(), 5))
            .unwrap_or_default()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for teardown in std::mem::take(&mut self.teardown).into_iter().rev() {
            teardown();
        }
        // Reverse order: the agent (started last) detaches its programs on SIGTERM first.
        let mut children = std::mem::take(&mut self.children);
        children.reverse();
        for started in &mut children {
            let pid = started.child.id() as i32;
            terminate(&[pid]);
            let _ = started.child.wait();
        }
        remove_sandbox(&self.binary, &self.name);
        let _ = fs::remove_dir_all(&self.work);
    }
}

/// `sandbox down` (which also ends any process still in its namespaces), then the agent's pin
/// dir and socket. Used by Drop and for sandboxes an earlier, killed run left behind.
pub fn remove_sandbox(binary: &Path, name: &str) {
    let down = Command::new(binary)
        .args(["sandbox", "down", "--name", name])
        .stdin(Stdio::null())
        .output();
    match down {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "warning: sandbox down --name {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("warning: sandbox down --name {name}: {e}"),
    }
    let _ = fs::remove_dir_all(pin_dir(name));
    let _ = fs::remove_file(socket(name));
}

fn pin_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{name}"))
}

fn socket(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/dataplane/{name}.sock"))
}

/// nginx answering `ok` to everything on one port. One worker: with wrk's one thread that
/// fills the 2 cores, and the kernel's share of the work is what the paths differ in. Every
/// path it writes is in the bench's temp dir, so nothing under /etc or /var is used.
fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
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
        listen {port};
        location / {{
            default_type text/plain;
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

fn is_sandbox_server(pid: i32) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w == [b"sandbox".as_slice(), b"serve".as_slice()])
}

fn is_alive(pid: i32) -> bool {
    // A zombie holds no namespace and no port; only the state letter after the name tells.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// SIGTERM, TERM_GRACE to go, then SIGKILL; returns once they are gone (or a second later).
fn terminate(pids: &[i32]) {
    let signal = |pid: i32, sig| {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, sig);
        }
    };
    for &pid in pids {
        signal(pid, libc::SIGTERM);
    }
    let wait = |limit: Duration| {
        let deadline = Instant::now() + limit;
        while pids.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    };
    wait(TERM_GRACE);
    for &pid in pids.iter().filter(|p| is_alive(**p)) {
        signal(pid, libc::SIGKILL);
    }
    wait(Duration::from_secs(1));
}

/// Runs a command to completion with its output captured; kills it when `timeout` passes or a
/// signal interrupts the bench (the clients run in our process group and get Ctrl-C
/// themselves, but SIGTERM reaches only us).
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Captured> {
    let line = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    // Readers on threads: a child that fills a pipe while we only poll its exit would block.
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (stdout.join(), stderr.join());
            check_interrupted()?;
            bail!("`{line}` did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Captured {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_conf_keeps_everything_in_its_dir() {
        let conf = nginx_conf(Path::new("/tmp/x"), 80);
        assert!(conf.contains("listen 80;"));
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

    #[test]
    fn last_lines_joins_the_tail() {
        assert_eq!(last_lines("a\nb\nc", 2), "b | c");
        assert_eq!(last_lines("", 2), "");
    }
}

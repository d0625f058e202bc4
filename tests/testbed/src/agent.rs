//! `dataplane agent` in a namespace, with a pin directory and control socket named after its
//! sandbox (or engine), so agents run side by side; stopped on drop, its pins and socket
//! removed. Its status is read over the control socket as the typed
//! [`dataplane::control::status::Status`].

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use dataplane::{control::status::Status, kernel::DEFAULT_PIN_DIR, sandbox::netns_path};

use crate::{
    Error, Result, interrupt,
    process::{Process, Stdout},
    sandbox::Sandbox,
};

/// How long an agent may take to answer after start (a few seconds when idle; 45-57 s was
/// measured on a 2-core machine at load 10, where the verifier's work on every program, about
/// a million instructions for the container hook, waits for a CPU).
const START_TIMEOUT: Duration = Duration::from_secs(150);

pub struct Agent {
    binary: PathBuf,
    netns: String,
    /// The options after `--pin-dir` and `--socket`, kept for [`Agent::restart`].
    args: Vec<String>,
    process: Option<Process>,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// The pin dir and socket of the agent named `name`: beside the defaults
/// (`/sys/fs/bpf/{name}`, `/run/dataplane/{name}.sock`).
pub fn paths(name: &str) -> (PathBuf, PathBuf) {
    let pin_root = Path::new(DEFAULT_PIN_DIR)
        .parent()
        .expect("the default pin dir has a parent");
    let socket_dir = Path::new(dataplane::control::DEFAULT_SOCKET)
        .parent()
        .expect("the default socket has a parent");
    (pin_root.join(name), socket_dir.join(format!("{name}.sock")))
}

/// Removes what an agent named `name` leaves when it is killed: its pins and socket.
pub fn remove_files(name: &str) {
    let (pin_dir, socket) = paths(name);
    let _ = std::fs::remove_dir_all(pin_dir);
    let _ = std::fs::remove_file(socket);
}

impl Agent {
    /// Starts `binary agent --pin-dir P --socket S ARGS` in namespace `netns` with the pins
    /// and socket of `name` (see [`paths`]) and its output appended to `log`, and waits until
    /// it answers on its socket.
    pub fn launch(
        binary: &Path,
        netns: &str,
        name: &str,
        log: PathBuf,
        args: &[&str],
    ) -> Result<Agent> {
        let (pin_dir, socket) = paths(name);
        let mut agent = Agent {
            binary: binary.to_owned(),
            netns: netns.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            process: None,
            pin_dir,
            socket,
            log,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// The agent of a sandbox, in its host namespace, with `args`. Its socket hook goes on
    /// the sandbox's host cgroup (or nowhere), never on the machine's, unless `args` picks one.
    pub fn in_sandbox(sandbox: &Sandbox, args: &[&str]) -> Result<Agent> {
        let cgroup = sandbox.host_cgroup().unwrap_or_else(|| "none".to_owned());
        let mut all = Vec::new();
        if !args.contains(&"--cgroup") {
            all.extend(["--cgroup", cgroup.as_str()]);
        }
        all.extend_from_slice(args);
        Agent::launch(
            sandbox.binary(),
            &sandbox.netns("host"),
            &sandbox.name,
            sandbox.work_file("agent.log"),
            &all,
        )
    }

    /// [`Agent::in_sandbox`] on the sandbox's state file, with `extra` options.
    pub fn on_state_file(sandbox: &Sandbox, extra: &[&str]) -> Result<Agent> {
        let state = sandbox.state_file.to_str().expect("UTF-8 path");
        let mut args = vec!["--state", state];
        args.extend_from_slice(extra);
        Agent::in_sandbox(sandbox, &args)
    }

    /// For tests: the agent on the sandbox's state file; panics with its log if it fails.
    pub fn start(sandbox: &Sandbox) -> Agent {
        Agent::start_with(sandbox, &[])
    }

    /// For tests: [`Agent::start`] with more options.
    pub fn start_with(sandbox: &Sandbox, extra: &[&str]) -> Agent {
        Agent::on_state_file(sandbox, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    fn spawn(&mut self) -> Result<()> {
        // nsenter --net, not `ip netns exec`: the latter remounts /sys and hides the shared
        // bpffs where the maps are pinned.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.netns)))
            .arg("--")
            .arg(&self.binary)
            .arg("agent")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args);
        self.process = Some(Process::spawn(
            "agent",
            &mut cmd,
            Stdout::Log(self.log.clone()),
        )?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            interrupt::check()?;
            if let Some(process) = self.process.as_mut()
                && let Err(exited) = process.check_running()
            {
                self.process = None;
                return Err(exited);
            }
            if self.read_status().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Failed(format!(
                    "the agent did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's status, read over its control socket.
    pub fn read_status(&self) -> Result<Status> {
        let reply = dataplane::control::request(&self.socket, "status")
            .map_err(|e| Error::Failed(format!("{e:#}")))?;
        serde_json::from_str(&reply)
            .map_err(|e| Error::Failed(format!("the agent's status is not a Status: {e}")))
    }

    /// For tests: [`Agent::read_status`], panicking with the agent's log.
    pub fn status(&self) -> Status {
        self.read_status()
            .unwrap_or_else(|e| panic!("status failed: {e}; agent log:\n{}", self.log_text()))
    }

    /// For tests: waits until `check` holds for the status (10 s), or panics with the last
    /// status seen.
    pub fn wait_for(&self, what: &str, check: impl Fn(&Status) -> bool) -> Status {
        self.wait_for_within(Duration::from_secs(10), what, check)
    }

    /// [`Agent::wait_for`] with a time limit of its own.
    pub fn wait_for_within(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status:#?}\nagent log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// For tests: `dataplane observe -o json-extended ARGS` against this agent, one JSON
    /// value per record (panics if it fails).
    pub fn observe(&self, args: &[&str]) -> Vec<serde_json::Value> {
        self.observe_as("json-extended", args)
    }

    /// For tests: `dataplane observe -o OUTPUT ARGS` (a JSON form) against this agent.
    pub fn observe_as(&self, output: &str, args: &[&str]) -> Vec<serde_json::Value> {
        let out = Command::new(&self.binary)
            .args(["observe", "-o", output, "--socket"])
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running dataplane observe");
        assert!(
            out.status.success(),
            "observe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// For tests: waits (15 s) until the records of `observe --last 1000` hold one that
    /// `wanted` accepts; returns it.
    pub fn wait_for_record(
        &self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let records = self.observe(&["--last", "1000"]);
            if let Some(found) = records.iter().find(|r| wanted(r)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; records:\n{}",
                records
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pid of the agent (nsenter execs it, so it is the child's); None once stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Stops the agent with `signal` (`TERM`, `INT` or `KILL`) and waits for it to exit.
    pub fn stop(&mut self, signal: &str) -> ExitStatus {
        let signal = match signal {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "KILL" => libc::SIGKILL,
            other => panic!("no signal {other:?} here"),
        };
        let mut process = self.process.take().expect("agent is running");
        process
            .signal_and_wait(signal)
            .expect("waiting for the agent")
    }

    /// Starts the agent again after [`Agent::stop`], with the same options, pins and socket.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "the agent is running");
        self.spawn().unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first (Process's Drop): the agent detaches its programs.
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_file(&self.socket);
    }
}

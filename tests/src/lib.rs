//! Harness for whole-host tests: a sandbox (host, containers and an outside client as network
//! namespaces) and an agent running in its host namespace, each with unique names so tests run
//! in parallel, and each removed on drop, also when the test fails.
//!
//! Tests panic with a message rather than return errors.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod docker;

/// The `dataplane` binary under test: $DATAPLANE_BIN, or the one cargo built next to this
/// test executable (target/debug/deps/<test> -> target/debug/dataplane).
pub fn dataplane_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("DATAPLANE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .join("dataplane");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A name no other test (in this or a parallel process) uses. Short, because namespace names
/// show up in interface names of some tools.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A sandbox built by `dataplane sandbox up`, torn down on drop.
pub struct Sandbox {
    pub name: String,
    /// The state file the sandbox wrote for the agent.
    pub state_file: PathBuf,
    pub dir: PathBuf,
}

impl Sandbox {
    /// Builds the host described by `spec` (a state file's text).
    pub fn up(spec: &str) -> Sandbox {
        let name = unique_name("dpt");
        let dir = std::env::temp_dir().join(format!("{name}-test"));
        std::fs::create_dir_all(&dir).unwrap();
        let spec_path = dir.join("spec.yaml");
        std::fs::write(&spec_path, spec).unwrap();
        let out = Command::new(dataplane_bin())
            .args(["sandbox", "up"])
            .arg(&spec_path)
            .args(["--name", &name])
            .output()
            .expect("running dataplane sandbox up");
        // Construct first so that a failure below still tears down.
        let mut sandbox = Sandbox {
            name,
            state_file: PathBuf::new(),
            dir,
        };
        assert!(
            out.status.success(),
            "sandbox up failed: {}",
            output_text(&out)
        );
        let state = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("sandbox up prints the state file path")
            .trim()
            .to_owned();
        sandbox.state_file = PathBuf::from(state);
        sandbox
    }

    /// The namespace of `target`: an endpoint, `host`, or `outside` (the sandbox calls the
    /// outside client's namespace `{name}-out`).
    pub fn netns(&self, target: &str) -> String {
        let target = if target == "outside" { "out" } else { target };
        format!("{}-{target}", self.name)
    }

    /// Runs `cmd` in the namespace of `target` (an endpoint, `host` or `outside`).
    pub fn exec(&self, target: &str, cmd: &[&str]) -> Output {
        Command::new(dataplane_bin())
            .args(["sandbox", "exec", "--name", &self.name, target, "--"])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("running dataplane sandbox exec")
    }

    /// Like [`Sandbox::exec`], but the command must succeed; returns its stdout.
    pub fn exec_ok(&self, target: &str, cmd: &[&str]) -> String {
        let out = self.exec(target, cmd);
        assert!(
            out.status.success(),
            "{target}: {cmd:?} failed: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Replaces the state file the agent follows.
    pub fn write_state(&self, text: &str) {
        // Write then rename, as editors and config tools do, so the agent never reads half a file.
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.state_file).unwrap();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let out = Command::new(dataplane_bin())
            .args(["sandbox", "down", "--name", &self.name])
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("sandbox down {} failed: {}", self.name, output_text(&out));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An agent running in a sandbox's host namespace with its own pin directory and socket.
pub struct Agent {
    pub(crate) child: Option<Child>,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent on the sandbox's state file and waits until it answers.
    pub fn start(sandbox: &Sandbox) -> Agent {
        Agent::start_with(sandbox, &[])
    }

    pub fn start_with(sandbox: &Sandbox, extra: &[&str]) -> Agent {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", sandbox.name));
        let socket = PathBuf::from(format!("/run/dataplane/{}.sock", sandbox.name));
        let log = sandbox.dir.join("agent.log");
        let mut agent = Agent {
            child: None,
            pin_dir,
            socket,
            log,
        };
        agent.spawn(sandbox, extra);
        agent
    }

    fn spawn(&mut self, sandbox: &Sandbox, extra: &[&str]) {
        // The socket hook goes on the sandbox's own host cgroup, never on the real host's.
        let cgroup =
            std::fs::read_to_string(format!("/run/dataplane/sandbox/{}/cgroup", sandbox.name))
                .unwrap_or_else(|_| "none".into());
        let state = sandbox.state_file.to_str().expect("UTF-8 path");
        let mut args = vec!["--cgroup", cgroup.trim(), "--state", state];
        args.extend_from_slice(extra);
        self.launch(&sandbox.netns("host"), &args);
    }

    /// Starts `dataplane agent` with this agent's pin dir and socket and `args` in network
    /// namespace `netns`, and waits until it answers (or panics with its log).
    pub fn launch(&mut self, netns: &str, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // nsenter --net, not `ip netns exec`: the latter remounts /sys and hides the shared
        // bpffs where the maps are pinned.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(dataplane_bin())
            .arg("agent")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "the agent exited ({status}) during start:\n{}",
                    self.log_text()
                );
            }
            if self.try_status().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's process id (to read its CPU time from /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let out = Command::new(dataplane_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The agent's status as JSON.
    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed; agent log:\n{}", self.log_text()))
    }

    /// Waits until `check` holds for the status, or panics with the last status seen.
    pub fn wait_for(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_within(Duration::from_secs(10), what, check)
    }

    /// [`Agent::wait_for`] with a time limit of its own.
    pub fn wait_for_within(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status:#}\nagent log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agent with `signal` (e.g. "TERM", "KILL") and waits for it to exit.
    pub fn stop(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent is running");
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        child.wait().unwrap()
    }

    /// Starts the agent again after [`Agent::stop`], on the same pins and socket.
    pub fn restart(&mut self, sandbox: &Sandbox) {
        self.spawn(sandbox, &[]);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop("TERM");
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Runs `f` on a thread inside network namespace `netns` and returns its result. Sockets made
/// there keep their namespace when handed back, so a test can hold a connection of the
/// outside client open while it restarts the agent.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd as _;

    let netns_path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let netns_file = std::fs::File::open(&netns_path).expect("namespace file");
        // SAFETY: a valid namespace fd; setns affects only this thread.
        let rc = unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {netns_path}");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A process started in a sandbox namespace, killed on drop.
pub struct Background(Child);

/// Reading what the agent's status JSON says.
pub mod status {
    use serde_json::Value;

    /// Entries in the map `name`.
    pub fn map_entries(status: &Value, name: &str) -> u64 {
        status["maps"]
            .as_array()
            .expect("maps in status")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("map {name} in status"))["entries"]
            .as_u64()
            .expect("entries")
    }

    /// Drops counted for `reason` (its Hubble name).
    pub fn drops(status: &Value, reason: &str) -> u64 {
        status["drops"][reason].as_u64().unwrap_or(0)
    }
}

impl Sandbox {
    /// Runs the sandbox's name server in the outside client's namespace on `tcp` (and `udp`)
    /// ports, so containers have something outside to reach; it answers
    /// `outside <peer-address>:<port>`. Ready when this returns.
    pub fn serve_outside(&self, tcp: &str, udp: Option<&str>) -> Background {
        let bin = dataplane_bin();
        let mut cmd = vec![
            bin.to_str().expect("UTF-8 path"),
            "sandbox",
            "serve",
            "--name",
            "outside",
            "--tcp",
            tcp,
        ];
        if let Some(udp) = udp {
            cmd.extend(["--udp", udp]);
        }
        let mut server = self.spawn("outside", &cmd);
        server.wait_for_line("ready");
        server
    }

    /// Starts `cmd` in the namespace of `target` without waiting for it.
    pub fn spawn(&self, target: &str, cmd: &[&str]) -> Background {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns(target)))
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a background command");
        Background(child)
    }
}

impl Background {
    /// Waits until the process prints a line containing `text` (e.g. a "ready" line).
    pub fn wait_for_line(&mut self, text: &str) {
        use std::io::BufRead as _;
        let stdout = self.0.stdout.take().expect("stdout is piped");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let text = text.to_owned();
        let found = std::thread::spawn(move || lines.any(|l| l.is_ok_and(|l| l.contains(&text))));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !found.is_finished() {
            assert!(
                Instant::now() < deadline,
                "background command printed no ready line"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            found.join().unwrap(),
            "background command ended before its ready line"
        );
    }
}

impl Background {
    /// Waits for the process to end and returns what it printed.
    pub fn wait_output(mut self) -> String {
        use std::io::Read as _;
        let mut text = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            let _ = stdout.read_to_string(&mut text);
        }
        let _ = self.0.wait();
        text
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Names of the BPF programs the kernel has attached to `interface` in namespace `netns`
/// (TCX ingress and egress, and XDP), asked of the kernel directly rather than of the agent.
/// The kernel keeps the first 15 characters of a program's name.
pub fn attached_programs(netns: &str, interface: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};

    let interface = interface.to_owned();
    in_netns(netns, move || {
        let mut names = Vec::new();
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok((_, programs)) = SchedClassifier::query_tcx(&interface, direction) {
                names.extend(
                    programs
                        .iter()
                        .filter_map(|p| p.name_as_str().map(str::to_owned)),
                );
            }
        }
        let link = Command::new("ip")
            .args(["link", "show", "dev", &interface])
            .output()
            .expect("running ip link");
        let link = String::from_utf8_lossy(&link.stdout);
        if let Some(rest) = link.split("prog/xdp").nth(1)
            && let Some(name) = rest.split_whitespace().skip_while(|w| *w != "name").nth(1)
        {
            names.push(name.to_owned());
        }
        names
    })
}

/// Whether `program` is among `attached` (comparing the 15 characters the kernel keeps).
pub fn has_program(attached: &[String], program: &str) -> bool {
    let kept = &program[..program.len().min(15)];
    attached.iter().any(|name| name == kept)
}

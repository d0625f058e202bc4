//! A sandbox built by `dataplane sandbox up` (dataplane/src/sandbox), torn down on drop, and the
//! commands and processes run in its namespaces.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use dataplane::sandbox::{Names, netns_path};

use crate::{
    Error, Result, agent, io,
    process::{self, Captured, Process, Stdout, output_text, run_timed},
};

/// The target of a host process in the sandbox host's cgroup, where the agent's socket hook
/// is (`dataplane sandbox exec NAME host` runs commands there too); plain `host` is the host's
/// namespace without it.
pub const HOST_CGROUP: &str = "host-cgroup";
/// How long `sandbox up` may take (a few hundred ms when idle; the machine is shared).
const UP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Sandbox {
    pub name: String,
    /// The state file the sandbox wrote for the agent.
    pub state_file: PathBuf,
    /// Our work directory (the spec, logs, files of the processes started), removed on drop.
    pub dir: PathBuf,
    names: Names,
    binary: PathBuf,
    /// Targets whose commands join a cgroup of the caller's ([`Sandbox::join_cgroup`]).
    cgroups: std::sync::Mutex<Vec<(String, PathBuf)>>,
}

impl Sandbox {
    /// `dataplane sandbox up SPEC --name NAME` with `spec` (a state file's text) written to
    /// `work`. The guard exists before the sandbox does, so a half-built sandbox (or one whose
    /// `up` was interrupted) is removed too.
    pub fn create(binary: &Path, name: &str, spec: &str, work: &Path) -> Result<Sandbox> {
        let names = Names::new(name).map_err(|e| Error::Failed(format!("{e:#}")))?;
        fs::create_dir_all(work).map_err(io(format!("creating {}", work.display())))?;
        let sandbox = Sandbox {
            name: name.to_owned(),
            state_file: names.state_path(),
            dir: work.to_owned(),
            names,
            binary: binary.to_owned(),
            cgroups: std::sync::Mutex::new(Vec::new()),
        };
        let spec_path = work.join("spec.yaml");
        fs::write(&spec_path, spec).map_err(io(format!("writing {}", spec_path.display())))?;
        let mut up = Command::new(binary);
        up.args(["sandbox", "up"])
            .arg(&spec_path)
            .args(["--name", name]);
        run_timed(&mut up, UP_TIMEOUT)?.ok("dataplane sandbox up")?;
        Ok(sandbox)
    }

    /// For tests: [`Sandbox::create`] with a unique name, the `dataplane` binary cargo built
    /// and a temp dir; panics (with [`crate::NEEDS_ROOT`] when not root).
    #[track_caller]
    pub fn up(spec: &str) -> Sandbox {
        crate::require_root();
        let name = crate::unique_name("dpt");
        let work = std::env::temp_dir().join(format!("{name}-test"));
        Sandbox::create(&crate::dataplane_bin(), &name, spec, &work)
            .unwrap_or_else(|e| panic!("sandbox up failed: {e}"))
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The names and files `sandbox up` made (its directory, cgroup file, namespaces).
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// A file in our work dir (removed with the sandbox).
    pub fn work_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The namespace of `target`: an endpoint, `host` (or [`HOST_CGROUP`]), or `outside`.
    pub fn netns(&self, target: &str) -> String {
        match target {
            HOST_CGROUP => self.names.host_ns(),
            other => self.names.target_ns(other),
        }
    }

    /// The host's cgroup the sandbox made for the agent's socket hook (`--cgroup`), if any.
    pub fn host_cgroup(&self) -> Option<String> {
        fs::read_to_string(self.names.cgroup_path_file())
            .ok()
            .map(|c| c.trim().to_owned())
    }

    /// `nsenter --net=NS -- ARGS`: only the network namespace changes (not `ip netns exec`,
    /// which remounts /sys and would hide the shared bpffs from the agent). With
    /// [`HOST_CGROUP`] the command also joins the host's cgroup.
    pub fn command_in(&self, target: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.netns(target))))
            .arg("--")
            .args(args);
        let joined = self
            .cgroups
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|(t, _)| t == target).map(|(_, p)| p.clone()));
        let cgroup = match joined {
            Some(cgroup) => Some(cgroup),
            None if target == HOST_CGROUP => self.host_cgroup().map(PathBuf::from),
            None => None,
        };
        if let Some(cgroup) = cgroup {
            let procs = cgroup.join("cgroup.procs");
            // SAFETY: the closure runs in the child between fork and exec and only writes a
            // file.
            unsafe {
                cmd.pre_exec(move || fs::write(&procs, "0"));
            }
        }
        cmd
    }

    /// From now on the commands [`Sandbox::command_in`] makes for `target` (an endpoint, as
    /// a container's processes) join `cgroup` (one of the caller's, e.g. where the agent's
    /// container hooks are: `--container-cgroup`).
    pub fn join_cgroup(&self, target: &str, cgroup: &Path) {
        if let Ok(mut cgroups) = self.cgroups.lock() {
            cgroups.retain(|(t, _)| t != target);
            cgroups.push((target.to_owned(), cgroup.to_owned()));
        }
    }

    /// Runs a command in a target's namespace to completion (or `timeout`, or Ctrl-C).
    pub fn run(&self, target: &str, args: &[&str], timeout: Duration) -> Result<Captured> {
        run_timed(&mut self.command_in(target, args), timeout)
    }

    /// Like [`Sandbox::run`], failing unless the command succeeds; returns its stdout.
    pub fn run_ok(&self, target: &str, args: &[&str], timeout: Duration) -> Result<String> {
        self.run(target, args, timeout)?
            .ok(&format!("`{}` in {target}", args.join(" ")))
    }

    /// Runs `cmd` as `dataplane sandbox exec` does (host commands in the host's cgroup).
    pub fn exec(&self, target: &str, cmd: &[&str]) -> Output {
        Command::new(&self.binary)
            .args(["sandbox", "exec", "--name", &self.name, target, "--"])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("running dataplane sandbox exec")
    }

    /// For tests: like [`Sandbox::exec`], but the command must succeed; returns its stdout.
    pub fn exec_ok(&self, target: &str, cmd: &[&str]) -> String {
        let out = self.exec(target, cmd);
        assert!(
            out.status.success(),
            "{target}: {cmd:?} failed: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// For tests: starts `cmd` in the namespace of `target` with its stdout piped, without
    /// waiting for it.
    pub fn spawn(&self, target: &str, cmd: &[&str]) -> Process {
        Process::spawn(
            &cmd.join(" "),
            &mut self.command_in(target, cmd),
            Stdout::Piped,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a long-running process in a target's namespace with its output in
    /// `{dir}/{what}.log`.
    pub fn spawn_logged(&self, what: &str, target: &str, args: &[&str]) -> Result<Process> {
        let log = self.work_file(&format!("{}.log", what.replace(' ', "-")));
        Process::spawn(what, &mut self.command_in(target, args), Stdout::Log(log))
    }

    /// Runs the sandbox's name server in the outside client's namespace on `tcp` (and `udp`)
    /// ports, so containers have something outside to reach; it answers
    /// `outside <peer-address>:<port>`. Ready when this returns.
    pub fn serve_outside(&self, tcp: &str, udp: Option<&str>) -> Process {
        self.serve_outside_on(tcp, udp, false)
    }

    /// [`Sandbox::serve_outside`], listening on [::] too (`--ipv6`), for IPv6 networks'
    /// connections out (NAT66) and IPv6 clients.
    pub fn serve_outside6(&self, tcp: &str, udp: Option<&str>) -> Process {
        self.serve_outside_on(tcp, udp, true)
    }

    fn serve_outside_on(&self, tcp: &str, udp: Option<&str>, ipv6: bool) -> Process {
        let bin = self.binary.to_str().expect("UTF-8 path");
        let mut cmd = vec![bin, "sandbox", "serve", "--name", "outside", "--tcp", tcp];
        if let Some(udp) = udp {
            cmd.extend(["--udp", udp]);
        }
        if ipv6 {
            cmd.push("--ipv6");
        }
        let mut server = self.spawn("outside", &cmd);
        server.wait_for_line("ready");
        server
    }

    /// Replaces the state file the agent follows.
    pub fn write_state_file(&self, text: &str) -> Result<()> {
        // Write then rename, as editors and config tools do, so the agent never reads half a
        // file.
        let tmp = self.state_file.with_extension("yaml.tmp");
        fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &self.state_file)
            .map_err(io(format!("renaming to {}", self.state_file.display())))
    }

    /// For tests: [`Sandbox::write_state_file`], panicking.
    pub fn write_state(&self, text: &str) {
        self.write_state_file(text)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops the `dataplane sandbox serve` in a target's namespace (found by its command line
    /// among the namespace's processes) and waits until it is gone, so its ports are free for
    /// a server of our own.
    pub fn stop_sandbox_server(&self, target: &str) -> Result<()> {
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
        process::terminate(&pids);
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        down(&self.binary, &self.name);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `sandbox down` (which also ends any process still in its namespaces), then the pin dir and
/// socket of an agent named after it. Used by Drop and for sandboxes an earlier, killed run
/// left behind.
pub fn remove(binary: &Path, name: &str) {
    down(binary, name);
    agent::remove_files(name);
}

fn down(binary: &Path, name: &str) {
    let out = Command::new(binary)
        .args(["sandbox", "down", "--name", name])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("sandbox down {name} failed: {}", output_text(&out)),
        Err(e) => eprintln!("sandbox down {name}: {e}"),
    }
}

fn is_sandbox_server(pid: i32) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w == [b"sandbox".as_slice(), b"serve".as_slice()])
}

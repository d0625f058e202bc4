//! A real Docker engine (Debian's dockerd 20.10) in a network namespace, for tests and the
//! bench. [`Engine`] is the engine itself: data-root, exec-root, socket, config and logs in one
//! directory of its own, its containers' cgroups under one parent of its own, and on drop
//! everything it leaves removed (containers, dockerd, containerd and shims, cgroups, mounts,
//! the directory), also when a test fails. [`Dockerd`] is the tests' fixture: an engine in a
//! namespace of its own with an outside client on a veth and a busybox image:
//!
//! ```text
//!  {NAME}-out                  {NAME} (dockerd's "host")
//!  eth0 192.0.2.2/24 ── veth ── eth0 192.0.2.1/24 (uplink)   docker0, br-*, container veths
//! ```

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use dataplane::sandbox::{OUTSIDE_IP, UPLINK_HOST_IP, netns_path};

use crate::{
    Agent, Error, Result, interrupt, io,
    process::{self, Captured, Process, Stdout, output_text, run_timed},
};

/// How long dockerd may take to answer after start (measured: about 0.5 s on an idle machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a docker CLI call may take (a `run` on the loaded machine: a few seconds).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd gets to stop its containers and exit on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of Docker's own dataplane an engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerDataplane {
    /// `--iptables=false --userland-proxy=false`: the agent follows the engine.
    Off,
    /// As installed: its iptables rules and docker-proxy.
    On,
    /// Its iptables and ip6tables rules (`"ip6tables": true`, under `"experimental": true`
    /// in 20.10) with `--userland-proxy=false`: the layout the bench's ip6tables baseline
    /// copies.
    RulesOnly,
}

/// `true` is Docker's dataplane as installed, `false` none of it.
impl From<bool> for DockerDataplane {
    fn from(on: bool) -> Self {
        if on {
            DockerDataplane::On
        } else {
            DockerDataplane::Off
        }
    }
}

/// One dockerd in an existing network namespace.
pub struct Engine {
    pub netns: String,
    /// Everything of this engine lives here: data-root, exec-root, socket, logs, image roots.
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// `--cgroup-parent`: its containers' cgroups, found and removed on drop.
    cgroup_parent: String,
    /// Docker's own dataplane: on, off, or its rules without docker-proxy.
    docker_dataplane: DockerDataplane,
    process: Option<Process>,
    /// A UTS namespace of its own with this hostname (a swarm's nodes are told apart by it).
    hostname: Option<String>,
    /// How long the last start took until the engine answered.
    pub started_in: Duration,
}

/// The docker CLI against the engine that [`Engine::start`] started on a directory, for code
/// that does not own the engine (a bench workload while the bench's bed holds it).
pub struct Cli {
    dir: PathBuf,
}

impl Cli {
    pub fn of(dir: &Path) -> Cli {
        Cli {
            dir: dir.to_owned(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args)
            // The CLI's own config (contexts, credentials) stays in this engine's directory.
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs the docker CLI (within a minute).
    pub fn docker(&self, args: &[&str]) -> Result<Captured> {
        run_timed(&mut self.command(args), CLI_TIMEOUT)
    }

    /// Like [`Cli::docker`], failing unless it succeeds; its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        let out = self
            .docker(args)?
            .ok(&format!("docker {}", args.join(" ")))?;
        Ok(out.trim().to_owned())
    }
}

impl Engine {
    /// Starts dockerd in `netns` with everything of it in `dir` and its containers' cgroups
    /// under `cgroup_parent`; Docker's iptables rules and docker-proxy on or off. Returns once
    /// the engine answers.
    pub fn start(
        netns: &str,
        dir: &Path,
        cgroup_parent: &str,
        docker_dataplane: bool,
    ) -> Result<Engine> {
        Engine::start_as(netns, dir, cgroup_parent, docker_dataplane.into())
    }

    /// [`Engine::start`] with any [`DockerDataplane`].
    pub fn start_as(
        netns: &str,
        dir: &Path,
        cgroup_parent: &str,
        docker_dataplane: DockerDataplane,
    ) -> Result<Engine> {
        Engine::launch(netns, dir, cgroup_parent, docker_dataplane, None)
    }

    /// [`Engine::start_as`] in a UTS namespace of its own named `hostname`: what a swarm
    /// node calls itself (`docker node ls`, the tasks' node).
    pub fn start_node(
        netns: &str,
        dir: &Path,
        cgroup_parent: &str,
        docker_dataplane: DockerDataplane,
        hostname: &str,
    ) -> Result<Engine> {
        Engine::launch(netns, dir, cgroup_parent, docker_dataplane, Some(hostname))
    }

    fn launch(
        netns: &str,
        dir: &Path,
        cgroup_parent: &str,
        docker_dataplane: DockerDataplane,
        hostname: Option<&str>,
    ) -> Result<Engine> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        // A daemon config of its own, so a /etc/docker/daemon.json of the machine cannot turn
        // Docker's iptables back on.
        let config = if docker_dataplane == DockerDataplane::RulesOnly {
            "{\"experimental\": true, \"ip6tables\": true}\n"
        } else {
            "{}\n"
        };
        std::fs::write(dir.join("daemon.json"), config)
            .map_err(io("writing the engine's daemon.json"))?;
        // The guard first: an engine that fails to answer is removed all the same.
        let mut engine = Engine {
            netns: netns.to_owned(),
            dir: dir.to_owned(),
            socket: dir.join("docker.sock"),
            cgroup_parent: cgroup_parent.to_owned(),
            docker_dataplane,
            process: None,
            hostname: hostname.map(str::to_owned),
            started_in: Duration::ZERO,
        };
        engine.spawn()?;
        Ok(engine)
    }

    /// Starts dockerd (again, on the same directories) and waits until it answers.
    pub fn spawn(&mut self) -> Result<()> {
        assert!(self.process.is_none(), "dockerd is running");
        let (iptables, proxy) = match self.docker_dataplane {
            DockerDataplane::Off => ("false", "false"),
            DockerDataplane::On => ("true", "true"),
            DockerDataplane::RulesOnly => ("true", "false"),
        };
        let started = Instant::now();
        // nsenter --net, not `ip netns exec`: the latter remounts /sys and dockerd then fails
        // with "Devices cgroup isn't mounted".
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.netns)))
            .arg("--");
        if let Some(hostname) = &self.hostname {
            // unshare and sh exec: the pid stays dockerd's.
            cmd.args(["unshare", "--uts", "--", "sh", "-c"])
                .arg("hostname \"$0\" && exec \"$@\"")
                .arg(hostname);
        }
        cmd.args(["dockerd", "--data-root"])
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg(format!("--iptables={iptables}"))
            .arg(format!("--userland-proxy={proxy}"))
            .args(["--cgroup-parent", &self.cgroup_parent]);
        let process = self.process.insert(
            Process::spawn(
                "dockerd",
                &mut cmd,
                Stdout::Log(self.dir.join("dockerd.log")),
            )
            .map_err(|e| {
                Error::Failed(format!(
                    "{e} (apt-get install docker.io; cargo xtask setup does)"
                ))
            })?,
        );
        let deadline = Instant::now() + START_TIMEOUT;
        while !ping(&self.socket) {
            interrupt::check()?;
            process.check_running()?;
            if Instant::now() > deadline {
                return Err(Error::Failed(format!(
                    "dockerd did not answer within {START_TIMEOUT:?}: {}",
                    process.log_tail(30)
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.started_in = started.elapsed();
        Ok(())
    }

    /// Stops dockerd with SIGTERM (it stops its containers) and waits for it to exit (SIGKILL
    /// after 30 s).
    pub fn stop(&mut self) {
        let Some(process) = self.process.take() else {
            return;
        };
        let pid = process.pid() as i32;
        // SAFETY: signalling the dockerd this engine started, by pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while process::is_alive(pid) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if process::is_alive(pid) {
            eprintln!(
                "dockerd in {} did not stop within {STOP_TIMEOUT:?}",
                self.netns
            );
        }
        // Process's Drop kills it if it still runs, and reaps it.
        drop(process);
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// The end of dockerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The docker CLI against this engine.
    pub fn command(&self, args: &[&str]) -> Command {
        Cli::of(&self.dir).command(args)
    }

    /// Runs the docker CLI (within a minute).
    pub fn docker(&self, args: &[&str]) -> Result<Captured> {
        Cli::of(&self.dir).docker(args)
    }

    /// Like [`Engine::docker`], failing unless it succeeds; its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        Cli::of(&self.dir).docker_ok(args)
    }

    /// `docker import` of the directory `root` as image `tag` (no image can be pulled here).
    pub fn import_image(&self, root: &Path, tag: &str) -> Result<()> {
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io("running tar"))?;
        let out = self
            .command(&["import", "-", tag])
            .stdin(tar.stdout.take().expect("tar's stdout is piped"))
            .output()
            .map_err(io("running docker import"))?;
        if !tar.wait().map_err(io("waiting for tar"))?.success() {
            return Err(Error::Failed(format!("tar of {} failed", root.display())));
        }
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "docker import: {}",
                output_text(&out)
            )));
        }
        Ok(())
    }

    /// Removes the containers while the engine runs, then the engine.
    fn remove_containers_and_stop(&mut self) {
        if self.is_running()
            && let Ok(ids) = self.docker(&["ps", "-aq"])
        {
            let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        self.stop();
    }
}

impl Engine {
    /// The cgroup (v2) its containers' cgroups are under (`--cgroup-parent`), once it has
    /// made it (with its first container): for the agent's `--container-cgroup`.
    pub fn containers_cgroup(&self) -> Option<PathBuf> {
        process::cgroup_dirs(&self.cgroup_parent)
            .into_iter()
            .filter(|dir| dir.file_name().is_some_and(|n| *n == *self.cgroup_parent))
            .min_by_key(|dir| dir.components().count())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // 1. Containers, while the engine still runs; 2. the engine.
        self.remove_containers_and_stop();
        // 3. Anything left in this engine's cgroups (containers whose shim died with it), and
        // its containerd and shims, found by the exec-root in their command line.
        let cgroups = process::cgroup_dirs(&self.cgroup_parent);
        process::kill_all(cgroups.iter().flat_map(|dir| process::cgroup_pids(dir)));
        let exec_root = self.dir.join("exec").display().to_string();
        process::kill_all(process::processes_mentioning(&exec_root));
        thread::sleep(Duration::from_millis(200));
        for dir in &cgroups {
            let _ = std::fs::remove_dir(dir);
        }
        // 4. Mounts under its directory (overlays, network namespace files), deepest first.
        process::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the engine on `socket` answers `GET /_ping`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.ends_with("OK")
}

/// Copies a file to the same path under `root` (an image's root), following symlinks.
pub fn copy_into(root: &Path, file: &Path) -> Result<()> {
    let relative = file.strip_prefix("/").unwrap_or(file);
    let target = root.join(relative);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    std::fs::copy(file, &target).map_err(io(format!("copying {}", file.display())))?;
    Ok(())
}

/// The shared libraries (and the loader) a binary needs, from ldd: what an image made of the
/// host's own binaries must hold.
pub fn libraries(binary: &str) -> Result<Vec<PathBuf>> {
    let out = run_timed(Command::new("ldd").arg(binary), Duration::from_secs(10))?
        .ok(&format!("ldd {binary}"))?;
    Ok(out
        .lines()
        .filter_map(|line| {
            // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The tests' fixture.

/// The uplink address of dockerd's namespace and the outside client's (TEST-NET-1).
pub const HOST: &str = UPLINK_HOST_IP;
pub const OUTSIDE: &str = OUTSIDE_IP;
/// The same two over IPv6 (the documentation prefix, on the same veth).
pub const HOST6: &str = "2001:db8::1";
pub const OUTSIDE6: &str = "2001:db8::2";
/// The image every test container runs: busybox with httpd and a CGI that answers
/// `<hostname> <client address>` on `/cgi-bin/who`.
pub const IMAGE: &str = "bb:latest";
/// Applets linked in the image.
const APPLETS: &[&str] = &[
    "sh", "httpd", "nc", "wget", "sleep", "ip", "cat", "echo", "hostname", "printf", "ls", "ps",
    "kill", "mkdir", "seq", "true", "tail", "grep",
];
const WHO_CGI: &str =
    "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$(hostname) $REMOTE_ADDR\"\n";

/// Network namespaces made by `ip netns add`, deleted on drop (last made first).
pub(crate) struct Namespaces(pub(crate) Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A dockerd in namespace `name` with Docker's own dataplane off, an outside client in
/// `{name}-out`, and [`IMAGE`]. Methods panic (a test fixture).
pub struct Dockerd {
    pub name: String,
    pub outside: String,
    // Field order is drop order: the engine goes before its namespaces.
    engine: Engine,
    _namespaces: Namespaces,
}

pub(crate) fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?}: {}",
        output_text(&out)
    );
}

impl Dockerd {
    /// Namespaces, veth, dockerd (Docker's own dataplane off), and the busybox image.
    #[track_caller]
    pub fn start() -> Dockerd {
        Dockerd::start_with(false)
    }

    /// Like [`Dockerd::start`], with Docker's own dataplane (its iptables rules and
    /// docker-proxy) on or off: the same scenario on both, to compare.
    #[track_caller]
    pub fn start_with(docker_dataplane: bool) -> Dockerd {
        Dockerd::start_as(docker_dataplane.into())
    }

    /// Like [`Dockerd::start`], with any [`DockerDataplane`].
    #[track_caller]
    pub fn start_as(docker_dataplane: DockerDataplane) -> Dockerd {
        crate::require_root();
        let name = crate::unique_name("dkr");
        let outside = format!("{name}-out");
        let namespaces = build_namespaces(&name, &outside);
        let dir = std::env::temp_dir().join(format!("{name}-docker"));
        let engine = Engine::start_as(&name, &dir, &name, docker_dataplane)
            .unwrap_or_else(|e| panic!("starting dockerd: {e}"));
        eprintln!("dockerd {name} answered after {:?}", engine.started_in);
        let dockerd = Dockerd {
            name,
            outside,
            engine,
            _namespaces: namespaces,
        };
        make_image(&dockerd.engine);
        dockerd
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Starts dockerd again after [`Dockerd::stop`].
    pub fn spawn(&mut self) {
        self.engine
            .spawn()
            .unwrap_or_else(|e| panic!("restarting dockerd: {e}"));
        eprintln!(
            "dockerd {} answered after {:?}",
            self.name, self.engine.started_in
        );
    }

    pub fn stop(&mut self) {
        self.engine.stop();
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.engine
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("running the docker CLI")
    }

    /// Like [`Dockerd::docker`], but it must succeed; returns its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker inspect -f FORMAT target`.
    pub fn inspect(&self, target: &str, format: &str) -> String {
        self.docker_ok(&["inspect", "-f", format, target])
    }

    fn in_outside(&self, cmd: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", netns_path(&self.outside)))
            .arg("--")
            .args(cmd);
        command
    }

    /// Runs `cmd` in the outside client's namespace.
    pub fn outside(&self, cmd: &[&str]) -> Output {
        self.in_outside(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("running a command in the outside namespace")
    }

    /// Runs `cmd` as a process of the host: in dockerd's namespace, in `cgroup`.
    pub fn host(&self, cgroup: &crate::cgroup::TestCgroup, cmd: &[&str]) -> Output {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", netns_path(&self.name)))
            .arg("--")
            .args(cmd);
        cgroup.enter(&mut command);
        command
            .stdin(Stdio::null())
            .output()
            .expect("running a host command in dockerd's namespace")
    }

    /// Starts `cmd` in the outside client's namespace without waiting for it.
    pub fn spawn_outside(&self, cmd: &[&str]) -> Process {
        Process::spawn(&cmd.join(" "), &mut self.in_outside(cmd), Stdout::Piped)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the agent in dockerd's namespace, following this engine, with pins and a socket
    /// of its own; `extra` goes after the other arguments.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        let socket = self.engine.socket.display().to_string();
        let mut args = vec!["--docker", &socket, "--uplink", "eth0"];
        // The socket hooks go nowhere unless the test gives a cgroup of its own.
        if !extra.contains(&"--cgroup") {
            args.extend(["--cgroup", "none"]);
        }
        args.extend_from_slice(extra);
        Agent::launch(
            &crate::dataplane_bin(),
            &self.name,
            &self.name,
            self.engine.dir.join("agent.log"),
            &args,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `bb:latest` from /bin/busybox of busybox-static, with /www/index.html ("hello") and
/// /www/cgi-bin/who.
pub(crate) fn make_image(engine: &Engine) {
    let root = engine.dir.join("image");
    for sub in ["bin", "www/cgi-bin", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static; cargo xtask setup does)");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "hello\n").unwrap();
    let cgi = root.join("www/cgi-bin/who");
    std::fs::write(&cgi, WHO_CGI).unwrap();
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).unwrap();
    engine
        .import_image(&root, IMAGE)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// dockerd's namespace and the outside client's, joined by a veth made inside dockerd's and
/// moved straight to the outside one: no name ever appears in the root namespace.
fn build_namespaces(host: &str, out: &str) -> Namespaces {
    let mut made = Namespaces(Vec::new());
    for ns in [host, out] {
        run(
            "creating a namespace",
            Command::new("ip").args(["netns", "add", ns]),
        );
        made.0.push(ns.to_owned());
    }
    let ip = |ns: &str, args: &[&str]| {
        run("ip", Command::new("ip").arg("-n").arg(ns).args(args));
    };
    ip(host, &["link", "set", "lo", "up"]);
    ip(out, &["link", "set", "lo", "up"]);
    ip(
        host,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", out,
        ],
    );
    ip(host, &["addr", "add", &format!("{HOST}/24"), "dev", "eth0"]);
    ip(
        out,
        &["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"],
    );
    // nodad: usable at once, not after duplicate address detection's second.
    ip(
        host,
        &[
            "addr",
            "add",
            &format!("{HOST6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip(
        out,
        &[
            "addr",
            "add",
            &format!("{OUTSIDE6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip(host, &["link", "set", "eth0", "up"]);
    ip(out, &["link", "set", "eth0", "up"]);
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        // Replies to published ports may leave by another interface than the request came in
        // on (the dataplane redirects); strict reverse-path filtering drops them.
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        run(
            "sysctl",
            Command::new("ip")
                .args(["netns", "exec", host, "sysctl", "-q", "-w"])
                .arg(format!("{key}={value}")),
        );
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_of_sh_include_libc_and_the_loader() {
        let Ok(libs) = libraries("/bin/sh") else {
            return; // no ldd on this machine
        };
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")));
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux"))
        );
    }
}

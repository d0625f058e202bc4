//! A real Docker engine for tests (shared/TOOLCHAIN.md, "A real Docker engine on this
//! machine"): Debian's dockerd started in a network namespace of its own, with Docker's
//! iptables and docker-proxy off so the dataplane is the only one, an outside client namespace
//! on a veth, and an image made from busybox-static. Everything it starts or creates is
//! removed on drop, also when the test fails:
//!
//! ```text
//!  {NAME}-out                  {NAME} (dockerd's "host")
//!  eth0 192.0.2.2/24 ── veth ── eth0 192.0.2.1/24 (uplink)   docker0, br-*, container veths
//! ```

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{Agent, Background, output_text, unique_name};

/// The uplink address of dockerd's namespace and the outside client's (TEST-NET-1).
pub const HOST: &str = "192.0.2.1";
pub const OUTSIDE: &str = "192.0.2.2";
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
/// How long dockerd may take to answer after start (measured: about 0.5 s on an idle machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A dockerd in namespace `name`, with an outside client in `{name}-out`.
pub struct Dockerd {
    pub name: String,
    pub outside: String,
    /// Everything of this engine lives here: data-root, exec-root, socket, logs, image root.
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    /// Namespaces made so far (removed on drop).
    namespaces: Vec<String>,
    /// How long the last start took until the engine answered.
    pub started_in: Duration,
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?}: {}",
        output_text(&out)
    );
    out
}

impl Dockerd {
    /// Namespaces, veth, dockerd, and the busybox image.
    pub fn start() -> Dockerd {
        let name = unique_name("dkr");
        let dir = std::env::temp_dir().join(format!("{name}-docker"));
        let mut dockerd = Dockerd {
            outside: format!("{name}-out"),
            socket: dir.join("docker.sock"),
            dir,
            name,
            child: None,
            namespaces: Vec::new(),
            started_in: Duration::ZERO,
        };
        dockerd.build_namespaces();
        std::fs::create_dir_all(&dockerd.dir).unwrap();
        // An empty daemon config of its own, so a /etc/docker/daemon.json of the machine
        // cannot turn Docker's iptables back on.
        std::fs::write(dockerd.dir.join("daemon.json"), "{}\n").unwrap();
        dockerd.spawn();
        dockerd.make_image();
        dockerd
    }

    fn build_namespaces(&mut self) {
        for ns in [self.name.clone(), self.outside.clone()] {
            run(
                "creating a namespace",
                Command::new("ip").args(["netns", "add", &ns]),
            );
            self.namespaces.push(ns);
        }
        let (host, out) = (self.name.as_str(), self.outside.as_str());
        let ip = |ns: &str, args: &[&str]| {
            run("ip", Command::new("ip").arg("-n").arg(ns).args(args));
        };
        ip(host, &["link", "set", "lo", "up"]);
        ip(out, &["link", "set", "lo", "up"]);
        // Made inside dockerd's namespace, the peer moved straight to the outside one: no name
        // ever appears in the root namespace.
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
        ip(host, &["link", "set", "eth0", "up"]);
        ip(out, &["link", "set", "eth0", "up"]);
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            // Replies to published ports may leave by another interface than the request
            // came in on (the dataplane redirects); strict reverse-path filtering drops them.
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
    }

    /// Starts dockerd (again, on the same directories) and waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "dockerd is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let started = Instant::now();
        // nsenter --net, not `ip netns exec`: the latter remounts /sys and dockerd then fails
        // with "Devices cgroup isn't mounted". setsid keeps it out of the test's process group.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .args(["setsid", "dockerd"])
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--iptables=false", "--userland-proxy=false"])
            // Containers' cgroups under one of this engine's own, found and removed on drop.
            .args(["--cgroup-parent", &self.name])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd (apt-get install docker.io; cargo xtask setup does)");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.ping() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "dockerd exited ({status}) during start:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within {START_TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.started_in = started.elapsed();
        eprintln!("dockerd {} answered after {:?}", self.name, self.started_in);
    }

    /// Whether the engine answers `GET /_ping`.
    fn ping(&self) -> bool {
        let Ok(mut stream) = UnixStream::connect(&self.socket) else {
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

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `bb:latest` from /bin/busybox of busybox-static, with /www/index.html ("hello") and
    /// /www/cgi-bin/who.
    fn make_image(&self) {
        let root = self.dir.join("image");
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
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("running tar");
        let out = self
            .docker_command(&["import", "-", IMAGE])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .expect("running docker import");
        assert!(
            tar.wait().unwrap().success(),
            "tar of the image root failed"
        );
        assert!(out.status.success(), "docker import: {}", output_text(&out));
    }

    fn docker_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            // The CLI's own config (contexts, credentials) stays in this engine's directory.
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_command(args)
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

    /// Runs `cmd` in the outside client's namespace.
    pub fn outside(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.outside))
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("running a command in the outside namespace")
    }

    /// Starts `cmd` in the outside client's namespace without waiting for it.
    pub fn spawn_outside(&self, cmd: &[&str]) -> Background {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.outside))
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a background command outside");
        Background(child)
    }

    /// Starts the agent in dockerd's namespace, following this engine, with pins and a socket
    /// of its own; `extra` goes after the other arguments.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        let socket = self.socket.display().to_string();
        let mut args = vec![
            "--docker",
            socket.as_str(),
            "--uplink",
            "eth0",
            "--cgroup",
            "none",
        ];
        args.extend_from_slice(extra);
        Agent::start_in(&self.name, &self.name, self.dir.join("agent.log"), &args)
    }

    /// Stops dockerd with SIGTERM (it stops its containers) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("dockerd {} did not stop within 30 s; killing it", self.name);
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cgroup directories of this engine's containers (`--cgroup-parent`), in every
    /// hierarchy, deepest first.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, name: &str, depth: u32, found: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                if entry.file_name() == name {
                    // The parent and every cgroup below it, children before parents.
                    let mut stack = vec![path.clone()];
                    let mut all = Vec::new();
                    while let Some(p) = stack.pop() {
                        if let Ok(children) = std::fs::read_dir(&p) {
                            stack.extend(
                                children
                                    .flatten()
                                    .filter(|c| c.file_type().is_ok_and(|t| t.is_dir()))
                                    .map(|c| c.path()),
                            );
                        }
                        all.push(p);
                    }
                    all.reverse();
                    found.extend(all);
                } else if depth > 0 {
                    walk(&path, name, depth - 1, found);
                }
            }
        }
        let mut found = Vec::new();
        walk(Path::new("/sys/fs/cgroup"), &self.name, 5, &mut found);
        found
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // 1. Containers, while the engine still runs; 2. the engine.
        if self.child.is_some() {
            let ids = self.docker(&["ps", "-aq"]);
            let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
            self.stop();
        }
        // 3. Anything left in this engine's cgroups (containers whose shim died with it).
        let cgroups = self.cgroup_dirs();
        for dir in &cgroups {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: a pid read from this engine's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // ...and its containerd and shims, found by the exec-root in their command line.
        let exec_root = self.dir.join("exec").display().to_string();
        for pid in processes_mentioning(&exec_root) {
            // SAFETY: a pid whose command line names this engine's own directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
        for dir in &cgroups {
            let _ = std::fs::remove_dir(dir);
        }
        // 4. Mounts under its directory (overlays, network namespace files), deepest first.
        unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        // 5. The namespaces.
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Pids of the processes whose command line contains `text`.
fn processes_mentioning(text: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
        })
        .collect()
}

/// Unmounts (lazily) every mount point at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes spaces and such as \040; our paths have none.
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let Ok(c_point) = std::ffi::CString::new(point.clone()) else {
            continue;
        };
        // SAFETY: a NUL-terminated path; MNT_DETACH only detaches this mount.
        if unsafe { libc::umount2(c_point.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!("umount {point}: {}", std::io::Error::last_os_error());
        }
    }
}

impl Agent {
    /// Starts an agent in network namespace `netns` with pin dir `/sys/fs/bpf/{name}`, socket
    /// `/run/dataplane/{name}.sock` and `args`, and waits until it answers.
    pub fn start_in(netns: &str, name: &str, log: PathBuf, args: &[&str]) -> Agent {
        let mut agent = Agent {
            child: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            socket: PathBuf::from(format!("/run/dataplane/{name}.sock")),
            log,
        };
        agent.launch(netns, args);
        agent
    }
}

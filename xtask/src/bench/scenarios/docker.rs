//! `docker` (issue 8): Docker's own dataplane for real. A dockerd 20.10 (Debian's docker.io)
//! runs in the sandbox's host namespace and starts the server container itself, `docker run
//! -p 8080:80 -p 15201:5201`; the outside client measures through the published port:
//!
//! - `docker`: dockerd as installed: its iptables rules (DNAT, MASQUERADE, FORWARD chains) and
//!   docker-proxy (which outside clients do not reach: the DNAT catches them first);
//! - `dataplane`: dockerd with `--iptables=false --userland-proxy=false` and our agent following
//!   it (`--docker SOCKET`), which publishes the ports from what the engine reports;
//! - `plain`: dockerd with iptables off, the container unpublished, the outside routing to the
//!   container's address (upper bound).
//!
//! No image can be pulled here, so the container's image is made on the spot (`docker import`)
//! from the host's own files: busybox-static for a shell, and the same nginx and iperf3 the
//! other scenarios run, with the shared libraries they load, so the servers match the rest of
//! the bench.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{HOST_IP, IPERF_1, WRK, addr};
use crate::bench::{
    bed::{Bed, run_timed},
    scenario::{PathDef, Scenario, Targets, Workload},
};

/// The sandbox is only the host and the outside client: dockerd makes its own bridge
/// (docker0, 172.17.0.0/16) and container.
const SPEC: &str = r#"# Written by cargo xtask bench (scenario docker).
uplink: eth0
"#;

const IMAGE: &str = "dpbench:latest";
const CONTAINER: &str = "srv";
/// How long dockerd may take to answer after start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// No new-connection workload here (the other scenarios have it), to keep the full run short.
static WORKLOADS: [Workload; 2] = [Workload::Custom(&WRK), Workload::Custom(&IPERF_1)];

pub fn scenario() -> Scenario {
    Scenario {
        name: "docker",
        title: "outside client -> host port 8080 / 15201 -> nginx / iperf3 in a container that \
                a real dockerd 20.10 started (docker run -p 8080:80 -p 15201:5201)",
        spec: SPEC,
        servers: &[],
        client: "outside",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "plain",
                description: "dockerd with --iptables=false, the container not published; the \
                              outside routes to its address (upper bound)",
                setup: plain_setup,
            },
            PathDef {
                name: "docker",
                description: "dockerd as installed: its own iptables rules and docker-proxy",
                setup: docker_setup,
            },
            PathDef {
                name: "dataplane",
                description: "dockerd with --iptables=false --userland-proxy=false, our agent \
                              following it (--docker)",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn plain_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = Engine::start(bed, false)?;
    engine.run_server(bed, false)?;
    let ip = engine.container_ip(bed)?;
    bed.run_ok(
        "outside",
        &["ip", "route", "add", "172.17.0.0/16", "via", HOST_IP],
        Duration::from_secs(5),
    )?;
    Ok(Targets {
        http: addr(&ip, 80),
        iperf: addr(&ip, 5201),
    })
}

fn docker_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = Engine::start(bed, true)?;
    engine.run_server(bed, true)?;
    Ok(published())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = Engine::start(bed, false)?;
    let socket = engine.socket.to_string_lossy().into_owned();
    bed.start_agent_args(&["--docker", &socket, "--uplink", "eth0", "--cgroup", "none"])?;
    engine.run_server(bed, true)?;
    Ok(published())
}

fn published() -> Targets {
    Targets {
        http: addr(HOST_IP, 8080),
        iperf: addr(HOST_IP, 15201),
    }
}

/// One dockerd in the sandbox's host namespace, with everything of it in one directory.
struct Engine {
    dir: PathBuf,
    socket: PathBuf,
}

impl Engine {
    /// Starts dockerd (Docker's iptables and docker-proxy on or off), registers its removal
    /// with the bed, waits until it answers and imports the image.
    fn start(bed: &mut Bed, docker_dataplane: bool) -> anyhow::Result<Engine> {
        let dir = bed.work_file("docker");
        std::fs::create_dir_all(&dir)?;
        // An empty config of its own: a /etc/docker/daemon.json of the machine must not apply.
        std::fs::write(dir.join("daemon.json"), "{}\n")?;
        let engine = Engine {
            socket: dir.join("docker.sock"),
            dir,
        };
        let cgroup_parent = format!("{}-docker", bed.name);
        let flag = |on: bool| if on { "true" } else { "false" };
        let args = [
            "dockerd".to_string(),
            "--data-root".into(),
            engine.path("data"),
            "--exec-root".into(),
            engine.path("exec"),
            "--pidfile".into(),
            engine.path("docker.pid"),
            "--config-file".into(),
            engine.path("daemon.json"),
            "-H".into(),
            format!("unix://{}", engine.socket.display()),
            format!("--iptables={}", flag(docker_dataplane)),
            format!("--userland-proxy={}", flag(docker_dataplane)),
            // Containers' cgroups under one of this engine's own, found and removed at the end.
            "--cgroup-parent".into(),
            cgroup_parent.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let index = bed.spawn("dockerd", "host", &args)?;
        let pid = bed.pid(index);
        {
            let (dir, socket) = (engine.dir.clone(), engine.socket.clone());
            bed.on_teardown(move || remove_engine(&dir, &socket, pid, &cgroup_parent));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while !engine
            .docker(&["version"])
            .is_ok_and(|o| o.status.success())
        {
            crate::bench::check_interrupted()?;
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(bed.work_file("dockerd.log")).unwrap_or_default();
                bail!(
                    "dockerd did not answer within {START_TIMEOUT:?}: {}",
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        engine.import_image()?;
        Ok(engine)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            // The CLI's own config (contexts, credentials) stays in this engine's directory.
            .env("DOCKER_CONFIG", self.dir.join("cli"));
        cmd
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<crate::bench::bed::Captured> {
        run_timed(&mut self.command(args), Duration::from_secs(60))
    }

    fn docker_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.docker(args)?;
        if !out.status.success() {
            bail!("docker {}: {}", args.join(" "), out.complaint());
        }
        Ok(out.stdout.trim().to_owned())
    }

    /// busybox, nginx and iperf3 with their libraries, a passwd for nginx's workers and an
    /// nginx config like bed.rs's, as a flat image.
    fn import_image(&self) -> anyhow::Result<()> {
        let root = self.dir.join("image");
        for sub in ["bin", "tmp", "etc/nginx"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        copy_into(&root, Path::new("/bin/busybox"))
            .context("/bin/busybox (apt-get install busybox-static; cargo xtask setup does)")?;
        std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
        for binary in ["/usr/sbin/nginx", "/usr/bin/iperf3"] {
            copy_into(&root, Path::new(binary))?;
            for library in libraries(binary)? {
                copy_into(&root, &library)?;
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
        )?;
        std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
        std::fs::write(root.join("etc/nginx/bench.conf"), NGINX_CONF)?;
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("running tar")?;
        let out = self
            .command(&["import", "-", IMAGE])
            .stdin(tar.stdout.take().context("tar's stdout")?)
            .output()
            .context("running docker import")?;
        if !tar.wait()?.success() {
            bail!("tar of the image root failed");
        }
        if !out.status.success() {
            bail!(
                "docker import: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The server container: iperf3 in the background, nginx in the foreground.
    fn run_server(&self, bed: &Bed, publish: bool) -> anyhow::Result<()> {
        let mut args = vec!["run", "-d", "--stop-timeout", "1", "--name", CONTAINER];
        if publish {
            args.extend(["-p", "8080:80", "-p", "15201:5201"]);
        }
        args.extend([
            IMAGE,
            "/bin/sh",
            "-c",
            "/usr/bin/iperf3 -s -p 5201 -D && exec /usr/sbin/nginx -c /etc/nginx/bench.conf",
        ]);
        self.docker_ok(&args)?;
        // Both servers listen before any client comes.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            crate::bench::check_interrupted()?;
            let pid = self.docker_ok(&["inspect", "-f", "{{.State.Pid}}", CONTAINER])?;
            let listening = run_timed(
                Command::new("nsenter")
                    .arg(format!("--net=/proc/{pid}/ns/net"))
                    .args(["ss", "-Hltn"]),
                Duration::from_secs(5),
            )?
            .stdout;
            if listening.contains(":80 ") && listening.contains(":5201 ") {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = self.docker(&["logs", CONTAINER]).map(|o| o.stderr);
                bail!(
                    "the server container does not listen on 80 and 5201 after \
                     {START_TIMEOUT:?}: {} (sandbox {})",
                    logs.unwrap_or_default().trim(),
                    bed.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn container_ip(&self, _bed: &Bed) -> anyhow::Result<String> {
        let ip = self.docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", CONTAINER])?;
        if ip.is_empty() {
            bail!("container {CONTAINER} has no address");
        }
        Ok(ip)
    }
}

/// nginx as bed.rs runs it (one worker, `ok`, keep-alive without limit), inside the container.
const NGINX_CONF: &str = r#"# Written by cargo xtask bench (scenario docker).
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path /tmp/client_body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 80;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
"#;

/// The shared libraries (and the loader) a binary needs, from ldd.
fn libraries(binary: &str) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("ldd {binary}"))?;
    if !out.status.success() {
        bail!("ldd {binary} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
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

/// Copies a file to the same path under `root`, following symlinks.
fn copy_into(root: &Path, file: &Path) -> anyhow::Result<()> {
    let relative = file.strip_prefix("/").unwrap_or(file);
    let target = root.join(relative);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(file, &target).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Everything an engine leaves: its containers (removed while it runs), dockerd itself,
/// containerd and shims (found by the engine's directory in their command line), its
/// containers' cgroups, and the mounts under its directory.
fn remove_engine(dir: &Path, socket: &Path, pid: u32, cgroup_parent: &str) {
    let docker = |args: &[&str]| {
        run_timed(
            Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .args(args)
                .env("DOCKER_CONFIG", dir.join("cli")),
            Duration::from_secs(30),
        )
    };
    if let Ok(out) = docker(&["ps", "-aq"]) {
        let ids: Vec<&str> = out.stdout.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = docker(&args);
        }
    }
    // SAFETY: kill(2) on the pid of the dockerd this bed started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}/exe")).exists()
        && !is_zombie(pid)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let exec_root = dir.join("exec").display().to_string();
    for other in processes_mentioning(&exec_root) {
        // SAFETY: a process whose command line names this engine's own directory.
        unsafe { libc::kill(other, libc::SIGKILL) };
    }
    let cgroups = cgroup_dirs(cgroup_parent);
    for cgroup in &cgroups {
        if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
            for p in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: a process in this engine's own cgroup.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for cgroup in &cgroups {
        let _ = std::fs::remove_dir(cgroup);
    }
    unmount_below(dir);
    let _ = std::fs::remove_dir_all(dir);
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z")
    })
}

/// Pids of processes whose command line contains `text` (a directory only we use).
fn processes_mentioning(text: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
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

/// The cgroup directories named `name` (dockerd's --cgroup-parent) in every hierarchy under
/// /sys/fs/cgroup (v1 controllers, or the unified one), with everything below, deepest first.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    for root in roots {
        let top = root.join(name);
        if !top.is_dir() {
            continue;
        }
        let mut stack = vec![top];
        let mut all = Vec::new();
        while let Some(dir) = stack.pop() {
            if let Ok(children) = std::fs::read_dir(&dir) {
                stack.extend(
                    children
                        .flatten()
                        .filter(|c| c.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|c| c.path()),
                );
            }
            all.push(dir);
        }
        all.reverse();
        found.extend(all);
    }
    found
}

/// Detaches every mount at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let Ok(c_point) = std::ffi::CString::new(point) else {
            continue;
        };
        // SAFETY: a NUL-terminated path; MNT_DETACH only detaches this mount.
        unsafe { libc::umount2(c_point.as_ptr(), libc::MNT_DETACH) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_of_nginx_include_libc_and_the_loader() {
        let Ok(libs) = libraries("/usr/sbin/nginx") else {
            return; // no nginx or ldd on this machine
        };
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")));
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux"))
        );
    }
}

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
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::{
    dockerd::{Engine, copy_into, libraries},
    process::run_timed,
};

use super::{HOST_IP, IPERF_1, WRK, socket_addr};
use crate::bed::Bed;
use crate::client::Targets;
use crate::framework::scenario::PathDef;
use crate::framework::scenario::Scenario;
use crate::framework::workload::Workload;

/// The sandbox is only the host and the outside client: dockerd makes its own bridge
/// (docker0, 172.17.0.0/16) and container.
const SPEC: &str = r#"# Written by cargo xtask bench (scenario docker).
uplink: eth0
"#;

pub(super) const IMAGE: &str = "dpbench:latest";
const CONTAINER: &str = "srv";
/// How long the server container may take to listen.
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
    let engine = start_engine(bed, false)?;
    run_server(&engine, bed, false)?;
    let ip = engine.docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", CONTAINER])?;
    if ip.is_empty() {
        bail!("container {CONTAINER} has no address");
    }
    bed.keep(engine);
    bed.run_ok(
        "outside",
        &["ip", "route", "add", "172.17.0.0/16", "via", HOST_IP],
        Duration::from_secs(5),
    )?;
    Ok(Targets {
        http: socket_addr(&ip, 80),
        iperf: socket_addr(&ip, 5201),
    })
}

fn docker_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = start_engine(bed, true)?;
    run_server(&engine, bed, true)?;
    bed.keep(engine);
    Ok(published())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = start_engine(bed, false)?;
    let socket = engine.socket.to_string_lossy().into_owned();
    bed.start_agent_args(&["--docker", &socket, "--uplink", "eth0", "--cgroup", "none"])?;
    run_server(&engine, bed, true)?;
    bed.keep(engine);
    Ok(published())
}

fn published() -> Targets {
    Targets {
        http: socket_addr(HOST_IP, 8080),
        iperf: socket_addr(HOST_IP, 15201),
    }
}

/// dockerd in the sandbox's host namespace (Docker's iptables and docker-proxy on or off),
/// answering, with the image imported. The engine is a guard: on an error here it removes
/// itself; the setups hand it to the bed once the path is up.
pub(super) fn start_engine(bed: &Bed, docker_dataplane: bool) -> anyhow::Result<Engine> {
    let engine = Engine::start(
        &bed.sandbox().netns("host"),
        &bed.work_file("docker"),
        &format!("{}-docker", bed.name),
        docker_dataplane,
    )?;
    import_image(&engine)?;
    Ok(engine)
}

/// busybox, nginx and iperf3 with their libraries, a passwd for nginx's workers and an nginx
/// config like bed.rs's, as a flat image.
fn import_image(engine: &Engine) -> anyhow::Result<()> {
    let root = engine.dir.join("image");
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
    Ok(engine.import_image(&root, IMAGE)?)
}

/// The server container: iperf3 in the background, nginx in the foreground; returns once both
/// listen.
fn run_server(engine: &Engine, bed: &Bed, publish: bool) -> anyhow::Result<()> {
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
    engine.docker_ok(&args)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        testbed::interrupt::check()?;
        let pid = engine.docker_ok(&["inspect", "-f", "{{.State.Pid}}", CONTAINER])?;
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
            let logs = engine.docker(&["logs", CONTAINER]).map(|o| o.stderr);
            bail!(
                "the server container does not listen on 80 and 5201 after {START_TIMEOUT:?}: \
                 {} (sandbox {})",
                logs.unwrap_or_default().trim(),
                bed.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
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

//! Installs what a new machine of this project's kind lacks (see docs/DESIGN.md section 11), and
//! skips what is present. Each step says what it does; a failure names the step.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{run_checked, step};

/// Debian packages for building the kernel programs (bpf-linker links against LLVM 22).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Debian packages the tests, the demo and the bench drive: namespaces, links and `ss`
/// (iproute2), nsenter (util-linux), traffic (curl, netcat, iperf3, ping), process tools
/// (procps); for `cargo xtask bench` also the HTTP load generator (wrk), the server it loads
/// (nginx-light: the bench starts it in a sandbox namespace with a config of its own; the
/// packaged service does not start on install here, as this machine kind has no init system
/// and a policy-rc.d that refuses service starts), and iptables for the baseline that loads
/// Docker's rules (the bench uses it only inside a sandbox namespace).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "procps",
    "iputils-ping",
    "curl",
    "netcat-openbsd",
    "iperf3",
    "wrk",
    "nginx-light",
    "iptables",
    // A real Prometheus server that tests/tests/metrics.rs starts in a sandbox namespace to
    // scrape the agent's /metrics (the packaged service does not start here, as for nginx).
    "prometheus",
    // bpftool: tests/tests/state.rs deletes a map entry by hand to show drift repair.
    "bpftool",
    // A real Docker engine (dockerd 20.10, API 1.41, with containerd and runc) that
    // tests/tests/docker.rs starts in a namespace of its own, and busybox-static, whose
    // /bin/busybox those tests turn into the containers' image with `docker import` (no image
    // can be pulled here). The packaged docker service does not start here, as for nginx; the
    // tests also use iptables (above) to check that Docker installed no NAT rules.
    "docker.io",
    "busybox-static",
    // trafgen, the packet generator of the bench's xdp-drop scenario (a UDP flood from the
    // outside namespace at the sandbox host's uplink); the bench also runs docker.io's
    // docker-proxy (above) standalone in its localhost scenario.
    "netsniff-ng",
    // tests/tests/hostile.rs: a bounded spoofed SYN flood and a drop flood (hping3), and
    // hand-made IPv4 fragments (scapy, for /usr/bin/python3).
    "hping3",
    "python3-scapy",
];

/// The toolchain aya-build compiles the kernel programs with (`-Z build-std=core`).
const BPF_TOOLCHAIN: &str = "nightly";

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    step("setup", "done");
    Ok(())
}

/// PATH with cargo's bin directory first, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> OsString {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin");
    let mut paths = vec![cargo_bin];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).expect("PATH entries contain no ':'")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .chain(TEST_PACKAGES)
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step("setup: apt", "Debian packages present");
        return Ok(());
    }
    step("setup: apt", &format!("installing {}", missing.join(" ")));
    run_checked(
        Command::new("apt-get").args(["update", "-q"]),
        "setup: apt-get update (needs root and the Debian mirror)",
    )?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
        "setup: apt-get install",
    )
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = output(
        Command::new("rustup").args(["toolchain", "list"]),
        "setup: rustup",
    )?;
    if !toolchains.lines().any(|l| l.starts_with(BPF_TOOLCHAIN)) {
        step(
            "setup: rustup",
            "installing the nightly toolchain (minimal profile)",
        );
        run_checked(
            Command::new("rustup").args([
                "toolchain",
                "install",
                BPF_TOOLCHAIN,
                "--profile",
                "minimal",
            ]),
            "setup: rustup toolchain install nightly",
        )?;
    }
    let components = output(
        Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            BPF_TOOLCHAIN,
        ]),
        "setup: rustup component list",
    )?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("setup: rustup", "rust-src for nightly present");
        return Ok(());
    }
    step(
        "setup: rustup",
        "adding rust-src to nightly (for -Z build-std=core)",
    );
    run_checked(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", BPF_TOOLCHAIN]),
        "setup: rustup component add rust-src",
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        step("setup: bpf-linker", "present");
        return Ok(());
    }
    // bpf-linker 0.13 defaults to LLVM 23, which Debian does not have; build it against 22.
    step(
        "setup: bpf-linker",
        "building bpf-linker against Debian's LLVM 22 (about a minute on 2 cores)",
    );
    let llvm = "/usr/lib/llvm-22";
    let mut path = OsString::from(format!("{llvm}/bin:"));
    path.push(path_with_cargo_bin());
    run_checked(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", llvm)
            .env("PATH", path),
        "setup: cargo install bpf-linker",
    )
}

fn output(cmd: &mut Command, step_name: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("step `{step_name}`: cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "step `{step_name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

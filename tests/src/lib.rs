//! What the whole-host tests share beyond the test bed (tests/testbed, re-exported here): the
//! kernel's own view of what is attached where, asked directly rather than of the agent.
//!
//! These tests need root: `sudo cargo xtask test` (or `cargo xtask test -- FILTER`) runs them.

use std::process::Command;

pub use testbed::{
    Agent, NEEDS_ROOT, Process as Background, Sandbox, StatusExt, dataplane_bin, in_netns,
    unique_name,
};

/// The dockerd harness (testbed::dockerd).
pub mod docker {
    pub use testbed::{
        cgroup::TestCgroup,
        dockerd::{DockerDataplane, Dockerd, HOST, HOST6, IMAGE, OUTSIDE, OUTSIDE6},
    };
}

/// The Docker Swarm harness (testbed::swarm).
pub mod swarm {
    pub use testbed::swarm::{IMAGE, NETWORK, Node, OUTSIDE, Swarm};
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

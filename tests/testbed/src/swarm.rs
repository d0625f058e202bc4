//! A real Docker Swarm for tests: three (or more) dockerd 20.10, each a node in a network
//! namespace (and UTS namespace, for its hostname) of its own, on one test network whose
//! bridge lives in a namespace of its own, which is also the outside client's:
//!
//! ```text
//!  {NAME}n1 (node1, manager)   {NAME}n2 (node2)        {NAME}n3 (node3)
//!  eth0 198.51.100.1           eth0 198.51.100.2       eth0 198.51.100.3
//!     │                           │                       │
//!     p1 ──────────────────────── br0 ─────────────────── p3   {NAME} (the test network)
//!                                 198.51.100.254 (the outside client)
//! ```
//!
//! Node 1 runs `docker swarm init`, the others join it as workers. Docker's own iptables rules
//! and docker-proxy are off (as for the agent's tests): overlay networks (VXLAN, UDP 4789
//! between the nodes' eth0) and Docker's DNS do not need them. Every node has [`IMAGE`]
//! (imported, no registry: services need `--no-resolve-image`). On drop the services go
//! first (so no manager reschedules what the engines remove), then every engine with all it
//! made, then the namespaces.

use std::{
    process::{Command, Output, Stdio},
    time::Instant,
};

use dataplane::sandbox::netns_path;

pub use crate::dockerd::IMAGE;
use crate::dockerd::{DockerDataplane, Engine, Namespaces, make_image, run};

/// The test network's prefix; node `i` (from 1) is `.i`, the outside client `.254`.
pub const NETWORK: &str = "198.51.100";
pub const OUTSIDE: &str = "198.51.100.254";

/// One node: an engine in a namespace of its own.
pub struct Node {
    /// Its network namespace.
    pub netns: String,
    /// Its hostname, which is also its swarm node name.
    pub hostname: String,
    /// Its address on the test network (the swarm's advertise address).
    pub addr: String,
    pub engine: Engine,
}

impl Node {
    /// The docker CLI against this node; it must succeed. Its stdout, trimmed.
    #[track_caller]
    pub fn docker_ok(&self, args: &[&str]) -> String {
        self.engine
            .docker_ok(args)
            .unwrap_or_else(|e| panic!("{}: {e}", self.hostname))
    }

    /// The docker CLI against this node, whatever its outcome.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.engine
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("running the docker CLI")
    }
}

/// A swarm of `nodes.len()` nodes; `nodes[0]` is the (only) manager. Methods panic (a test
/// fixture).
pub struct Swarm {
    pub name: String,
    // Field order is drop order: the engines go before their namespaces.
    pub nodes: Vec<Node>,
    _namespaces: Namespaces,
}

impl Swarm {
    /// Namespaces, bridge, one dockerd per node with the image, and the swarm formed.
    #[track_caller]
    pub fn start(count: usize) -> Swarm {
        crate::require_root();
        assert!((1..=9).contains(&count), "1 to 9 nodes");
        let name = crate::unique_name("swm");
        let namespaces = build_network(&name, count);
        let mut swarm = Swarm {
            name: name.clone(),
            nodes: Vec::new(),
            _namespaces: namespaces,
        };
        let started = Instant::now();
        for i in 1..=count {
            let netns = format!("{name}n{i}");
            let hostname = format!("node{i}");
            let dir = std::env::temp_dir().join(format!("{netns}-docker"));
            let engine = Engine::start_node(&netns, &dir, &netns, DockerDataplane::Off, &hostname)
                .unwrap_or_else(|e| panic!("starting dockerd of {hostname}: {e}"));
            make_image(&engine);
            swarm.nodes.push(Node {
                netns,
                hostname,
                addr: format!("{NETWORK}.{i}"),
                engine,
            });
        }
        eprintln!(
            "{count} dockerd answered with the image after {:?}",
            started.elapsed()
        );
        let formed = Instant::now();
        let manager = &swarm.nodes[0];
        manager.docker_ok(&["swarm", "init", "--advertise-addr", &manager.addr]);
        let token = manager.docker_ok(&["swarm", "join-token", "-q", "worker"]);
        let join = format!("{}:2377", manager.addr);
        for node in &swarm.nodes[1..] {
            node.docker_ok(&[
                "swarm",
                "join",
                "--advertise-addr",
                &node.addr,
                "--token",
                &token,
                &join,
            ]);
        }
        eprintln!("swarm {name} formed in {:?}", formed.elapsed());
        swarm
    }

    pub fn manager(&self) -> &Node {
        &self.nodes[0]
    }

    /// The node whose advertise address is `addr`.
    pub fn node_at(&self, addr: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.addr == addr)
    }

    /// Runs `cmd` in the outside client's namespace (on the test network's bridge).
    pub fn outside(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&self.name)))
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("running a command in the outside namespace")
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        // Services first, on the manager: tasks the engines remove later are not restarted.
        if let Some(manager) = self.nodes.first()
            && manager.engine.is_running()
            && let Ok(ids) = manager.engine.docker(&["service", "ls", "-q"])
        {
            let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["service", "rm"];
                args.extend(ids);
                let _ = manager.engine.docker(&args);
            }
        }
        // Then the workers' engines, the manager's last (Engine's drop), then the namespaces.
        while let Some(node) = self.nodes.pop() {
            drop(node);
        }
    }
}

/// The test network's namespace `name` with bridge br0 (and the outside client's address on
/// it), and one namespace per node joined to it by a veth made in the bridge's namespace and
/// moved straight to the node's: no name ever appears in the root namespace.
fn build_network(name: &str, count: usize) -> Namespaces {
    let mut made = Namespaces(Vec::new());
    let add = |made: &mut Namespaces, ns: &str| {
        run(
            "creating a namespace",
            Command::new("ip").args(["netns", "add", ns]),
        );
        made.0.push(ns.to_owned());
    };
    let ip = |ns: &str, args: &[&str]| {
        run("ip", Command::new("ip").arg("-n").arg(ns).args(args));
    };
    add(&mut made, name);
    ip(name, &["link", "set", "lo", "up"]);
    ip(name, &["link", "add", "br0", "type", "bridge"]);
    ip(
        name,
        &["addr", "add", &format!("{OUTSIDE}/24"), "dev", "br0"],
    );
    ip(name, &["link", "set", "br0", "up"]);
    for i in 1..=count {
        let node = format!("{name}n{i}");
        add(&mut made, &node);
        ip(&node, &["link", "set", "lo", "up"]);
        let port = format!("p{i}");
        ip(
            name,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &node,
            ],
        );
        ip(name, &["link", "set", &port, "master", "br0", "up"]);
        ip(
            &node,
            &["addr", "add", &format!("{NETWORK}.{i}/24"), "dev", "eth0"],
        );
        ip(&node, &["link", "set", "eth0", "up"]);
    }
    made
}

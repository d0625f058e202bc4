//! `dataplane sandbox`: a whole container host built from network namespaces, for demos and
//! tests (docs/DESIGN.md sections 4 and 6).
//!
//! From a state file it builds Docker's topology (section 4) without Docker and without touching
//! the root network namespace (docs/DESIGN.md section 9):
//!
//! ```text
//!  {NAME}-out            {NAME}-host                                  {NAME}-{endpoint}
//!  eth0 192.0.2.2 ── veth ── uplink 192.0.2.1   bridge per network ── veth ── eth{j}
//!  (outside client)          ip_forward=1       gateway/prefix               ip/prefix, MAC
//! ```
//!
//! Every endpoint namespace runs `dataplane sandbox serve` (see `server.rs`), so tests can
//! check who answered and which source address it saw. Everything the sandbox owns lives under
//! `/run/dataplane/sandbox/{NAME}/` (spec, state file for the agent, server pids, logs, the
//! namespaces it made), which is what `down` and `exec` read back.
//!
//! Shells out to iproute2 and nsenter rather than speaking netlink: the sandbox is a test
//! fixture, and commands a person can copy from an error message are worth more than speed.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::model::{Endpoint, Model, PortTarget, Protocol, StateFile};

pub mod server;

/// Where each sandbox keeps its files, one directory per sandbox name.
pub const SANDBOX_ROOT: &str = "/run/dataplane/sandbox";
/// Where `ip netns add` puts namespace handles (iproute2's NETNS_RUN_DIR).
pub const NETNS_DIR: &str = "/run/netns";
/// The host's uplink address and the outside client's, on TEST-NET-1 (RFC 5737): documentation
/// addresses that can never clash with anything real, and both live in our namespaces only.
const UPLINK_HOST_CIDR: &str = "192.0.2.1/24";
const OUTSIDE_CIDR: &str = "192.0.2.2/24";
/// The uplink's IPv6 addresses (documentation prefix), given when a network has subnet6.
const UPLINK_HOST_CIDR6: &str = "2001:db8::1/64";
const OUTSIDE_CIDR6: &str = "2001:db8::2/64";
/// The same addresses without the prefix, for clients (the tests, the bench).
pub const UPLINK_HOST_IP: &str = "192.0.2.1";
pub const OUTSIDE_IP: &str = "192.0.2.2";
pub const UPLINK_HOST_IP6: &str = "2001:db8::1";
pub const OUTSIDE_IP6: &str = "2001:db8::2";
/// Host uplink name when the spec names none (Docker hosts' usual default-route interface).
const DEFAULT_UPLINK: &str = "eth0";
/// Every container serves port 80 over TCP and UDP, whatever the spec publishes.
const ALWAYS_SERVED: u16 = 80;
/// A published range can be large; each served port costs the server a thread.
const MAX_PORTS_PER_ENTRY: u32 = 64;
/// How long `up` waits for every server to bind its ports.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `down` waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(1);

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Build the host described by a state file: networks, containers, outside client.
    Up {
        /// State file (YAML or JSON) describing networks, endpoints, ports and services.
        spec: PathBuf,
        /// Sandbox name; every namespace is prefixed with it, so sandboxes can run side by side.
        #[arg(long, default_value = "dp")]
        name: String,
        /// Also write the state file for the agent here (it always goes to the sandbox dir).
        #[arg(long)]
        state_out: Option<PathBuf>,
    },
    /// Remove a sandbox: its processes, namespaces and files. Succeeds if there is nothing.
    Down {
        #[arg(long, default_value = "dp")]
        name: String,
    },
    /// Run a command inside a sandbox namespace: an endpoint's, `host` or `outside`.
    Exec {
        #[arg(long, default_value = "dp")]
        name: String,
        /// An endpoint name, `host` or `outside`.
        target: String,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// The per-container server the sandbox starts (internal).
    #[command(hide = true)]
    Serve(server::ServeArgs),
}

pub fn run(command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::Up {
            spec,
            name,
            state_out,
        } => {
            let state = up(&spec, &name, state_out.as_deref())?;
            println!("{}", state.display());
            Ok(())
        }
        SandboxCommand::Down { name } => down(&name),
        SandboxCommand::Exec {
            name,
            target,
            command,
        } => {
            let code = exec(&name, &target, &command)?;
            std::process::exit(code);
        }
        SandboxCommand::Serve(args) => server::run(args),
    }
}

// ---------------------------------------------------------------------------------------------
// Names and files.

/// Names of everything one sandbox owns: its directory and files, its namespaces. Public so
/// that the test bed (tests/testbed) finds them where `up` put them instead of spelling the
/// paths again.
pub struct Names {
    name: String,
    dir: PathBuf,
}

impl Names {
    pub fn new(name: &str) -> anyhow::Result<Names> {
        check_name("sandbox name", name)?;
        Ok(Names {
            name: name.to_string(),
            dir: Path::new(SANDBOX_ROOT).join(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `{SANDBOX_ROOT}/{name}`: spec, state file, server pids and logs, the cgroup's path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup (v2) the host's processes of `exec host` run in, and the one the agent's
    /// socket hook is meant for (`--cgroup`); None where the host has no cgroup2. A cgroup of
    /// its own keeps the sandbox from touching the processes of the real host.
    fn host_cgroup(&self) -> Option<PathBuf> {
        crate::kernel::netdev::cgroup2_root()
            .map(|root| Path::new(&root).join(format!("dataplane-sandbox-{}", self.name)))
    }

    /// The file in which `up` wrote the path of the host's cgroup (absent without cgroup2).
    pub fn cgroup_path_file(&self) -> PathBuf {
        self.dir.join("cgroup")
    }

    pub fn host_ns(&self) -> String {
        format!("{}-host", self.name)
    }

    pub fn outside_ns(&self) -> String {
        format!("{}-out", self.name)
    }

    pub fn endpoint_ns(&self, endpoint: &str) -> String {
        format!("{}-{endpoint}", self.name)
    }

    /// The namespace of an `exec` target: `host`, `outside` or an endpoint's name (not checked
    /// against the spec here; `exec` does).
    pub fn target_ns(&self, target: &str) -> String {
        match target {
            "host" => self.host_ns(),
            "outside" => self.outside_ns(),
            endpoint => self.endpoint_ns(endpoint),
        }
    }

    /// The namespaces a spec calls for, host and outside first.
    fn namespaces(&self, spec: &StateFile) -> Vec<String> {
        let mut all = vec![self.host_ns(), self.outside_ns()];
        all.extend(spec.endpoints.iter().map(|e| self.endpoint_ns(&e.name)));
        all
    }

    fn spec_path(&self) -> PathBuf {
        self.dir.join("spec.yaml")
    }

    /// The state file `up` wrote for the agent (the spec with the uplink filled in).
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.yaml")
    }

    /// `endpoint pid` lines, one per server started.
    fn pids_path(&self) -> PathBuf {
        self.dir.join("pids")
    }

    /// One namespace per line, appended as each is created, so `down` after a failed `up`
    /// removes exactly what was made, and other sandboxes' sweeps leave these alone.
    fn namespaces_path(&self) -> PathBuf {
        self.dir.join("namespaces")
    }

    fn log_path(&self, endpoint: &str) -> PathBuf {
        self.dir.join(format!("serve-{endpoint}.log"))
    }

    /// The spec as `up` saved it; `None` when there is no sandbox of this name.
    fn saved_spec(&self) -> anyhow::Result<Option<StateFile>> {
        let path = self.spec_path();
        match fs::read_to_string(&path) {
            Ok(text) => StateFile::parse(&text)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn record(&self, path: &Path, line: &str) -> anyhow::Result<()> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))
    }
}

/// Sandbox and endpoint names become namespace and file names, so they get Docker's container
/// name rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 64;
    if !ok {
        bail!(
            "{what} {name:?} must be 1-64 characters of letters, digits, '_', '.' or '-', \
             starting with a letter or digit"
        );
    }
    Ok(())
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Namespaces that exist now (`ip netns list` reads the same directory).
fn existing_namespaces() -> BTreeSet<String> {
    fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The handle of namespace `ns` (for `nsenter --net=` and setns).
pub fn netns_path(ns: &str) -> String {
    format!("{NETNS_DIR}/{ns}")
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------------------------
// Running commands.

/// Runs a command to completion; on failure the error names the step, the command line, the
/// exit status and what the command printed on stderr.
fn run_step(step: &str, command: &mut Command) -> anyhow::Result<String> {
    let line = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{step}: cannot run `{line}`"))?;
    if !output.status.success() {
        bail!(
            "{step}: `{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip -n NS ARGS...`
fn ip_in(ns: &str, step: &str, args: &[&str]) -> anyhow::Result<()> {
    run_step(step, Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

/// Sets a sysctl inside a namespace. `ip netns exec` is fine here: sysctl needs no shared
/// mounts (unlike the agent, which must see the shared bpffs and so uses nsenter).
fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run_step(
        &format!("setting {key}={value} in {ns}"),
        Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}")),
    )
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// up

/// Builds the sandbox and returns the path of the state file for the agent. On failure,
/// removes whatever it had built.
fn up(spec_path: &Path, name: &str, state_out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let sandbox = Names::new(name)?;
    let (spec, model) = Model::load(spec_path)?;
    for endpoint in &model.endpoints {
        check_name("endpoint name", &endpoint.name).with_context(|| {
            format!("endpoint {:?} cannot be a sandbox container", endpoint.name)
        })?;
        // `host` and `outside` are exec targets, and `{NAME}-host`/`{NAME}-out` are taken.
        if matches!(endpoint.name.as_str(), "host" | "out" | "outside") {
            bail!(
                "endpoint {:?}: the sandbox reserves the names host, out and outside",
                endpoint.name
            );
        }
    }
    let exists =
        || anyhow::anyhow!("sandbox {name} exists; run `dataplane sandbox down --name {name}`");
    let existing = existing_namespaces();
    if sandbox.dir.exists() || existing.contains(&sandbox.host_ns()) {
        return Err(exists());
    }
    // Someone else's namespace with one of our names: refuse before creating anything, so the
    // cleanup of a failed `up` can never delete it.
    if let Some(taken) = sandbox
        .namespaces(&spec)
        .into_iter()
        .find(|ns| existing.contains(ns))
    {
        bail!("namespace {taken} already exists; choose another --name or remove it");
    }
    fs::create_dir_all(SANDBOX_ROOT).with_context(|| format!("creating {SANDBOX_ROOT}"))?;
    // create_dir (not _all) is the lock: of two `up`s racing for one name, one fails here.
    fs::create_dir(&sandbox.dir).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            exists()
        } else {
            anyhow::Error::new(e).context(format!("creating {}", sandbox.dir.display()))
        }
    })?;
    let built = make_host_cgroup(&sandbox)
        .and_then(|()| build(&sandbox, spec_path, &spec, &model, state_out));
    match built {
        Ok(state) => Ok(state),
        Err(e) => {
            if let Err(cleanup) = down_quietly(&sandbox) {
                log::error!("cleaning up after the failed sandbox up: {cleanup:#}");
            }
            Err(e.context(format!(
                "sandbox up {name} failed (what it had built is removed)"
            )))
        }
    }
}

/// Everything `up` makes, in order: the host and outside namespaces joined by the uplink, a
/// bridge per network, each endpoint on its veths, the servers (ready), then the state file for
/// the agent.
fn build(
    sandbox: &Names,
    spec_path: &Path,
    spec: &StateFile,
    model: &Model,
    state_out: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    fs::copy(spec_path, sandbox.spec_path())
        .with_context(|| format!("copying the spec to {}", sandbox.spec_path().display()))?;
    let uplink = model.uplink.as_deref().unwrap_or(DEFAULT_UPLINK);
    build_host(sandbox, uplink, has_ipv6(model))?;
    build_bridges(&sandbox.host_ns(), model)?;
    for endpoint in &model.endpoints {
        build_endpoint(sandbox, model, endpoint)?;
    }
    let mut children = Vec::new();
    for endpoint in &model.endpoints {
        children.push(start_server(sandbox, model, endpoint)?);
    }
    wait_for_servers(sandbox, &mut children)?;
    let state = write_state(sandbox, spec, uplink, state_out)?;
    print_summary(sandbox, model, uplink);
    Ok(state)
}

/// Whether any network of the model has IPv6.
fn has_ipv6(model: &Model) -> bool {
    model.networks.iter().any(|n| n.subnet6.is_some())
}

/// The host's namespace (forwarding on, no strict reverse-path filter) and the outside
/// client's, joined by the uplink veth pair; with IPv6 on both when `ipv6` (a network has
/// subnet6).
fn build_host(sandbox: &Names, uplink: &str, ipv6: bool) -> anyhow::Result<()> {
    let host = sandbox.host_ns();
    let outside = sandbox.outside_ns();
    add_namespace(sandbox, &host, ipv6)?;
    add_namespace(sandbox, &outside, ipv6)?;
    if ipv6 {
        sysctl_in(&host, "net.ipv6.conf.all.forwarding", "1")?;
    }
    ip_in(
        &host,
        "bringing up lo in the host namespace",
        &["link", "set", "lo", "up"],
    )?;
    ip_in(
        &outside,
        "bringing up lo in the outside namespace",
        &["link", "set", "lo", "up"],
    )?;
    sysctl_in(&host, "net.ipv4.ip_forward", "1")?;
    // Replies to published ports may come back on another interface than the request went out
    // of (the dataplane redirects); strict reverse-path filtering would drop them.
    sysctl_in(&host, "net.ipv4.conf.all.rp_filter", "0")?;
    sysctl_in(&host, "net.ipv4.conf.default.rp_filter", "0")?;

    // The uplink: made inside the host namespace, peer moved straight to the outside one, so
    // no name ever appears in the root namespace.
    ip_in(
        &host,
        "creating the uplink veth pair",
        &[
            "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", &outside,
        ],
    )?;
    ip_in(
        &host,
        "addressing the host uplink",
        &["addr", "add", UPLINK_HOST_CIDR, "dev", uplink],
    )?;
    ip_in(
        &host,
        "bringing up the host uplink",
        &["link", "set", uplink, "up"],
    )?;
    ip_in(
        &outside,
        "addressing the outside client",
        &["addr", "add", OUTSIDE_CIDR, "dev", "eth0"],
    )?;
    ip_in(
        &outside,
        "bringing up the outside client",
        &["link", "set", "eth0", "up"],
    )?;
    if ipv6 {
        // nodad: usable at once (duplicate address detection would hold them for a second
        // or so, and there is nobody else on these links).
        ip_in(
            &host,
            "addressing the host uplink (IPv6)",
            &[
                "-6",
                "addr",
                "add",
                UPLINK_HOST_CIDR6,
                "dev",
                uplink,
                "nodad",
            ],
        )?;
        ip_in(
            &outside,
            "addressing the outside client (IPv6)",
            &["-6", "addr", "add", OUTSIDE_CIDR6, "dev", "eth0", "nodad"],
        )?;
    }
    Ok(())
}

/// One bridge per network in the host namespace, with the network's gateway address.
fn build_bridges(host: &str, model: &Model) -> anyhow::Result<()> {
    for network in &model.networks {
        let step = format!(
            "creating bridge {} for network {}",
            network.bridge, network.name
        );
        ip_in(
            host,
            &step,
            &["link", "add", &network.bridge, "type", "bridge"],
        )?;
        if let (Some(gateway), Some(subnet)) = (network.gateway, network.subnet) {
            let gateway = format!("{gateway}/{}", subnet.prefix_len);
            ip_in(
                host,
                &step,
                &["addr", "add", &gateway, "dev", &network.bridge],
            )?;
        }
        if let (Some(gateway6), Some(subnet6)) = (network.gateway6, network.subnet6) {
            let gateway6 = format!("{gateway6}/{}", subnet6.prefix_len);
            ip_in(
                host,
                &step,
                &[
                    "-6",
                    "addr",
                    "add",
                    &gateway6,
                    "dev",
                    &network.bridge,
                    "nodad",
                ],
            )?;
        }
        ip_in(host, &step, &["link", "set", &network.bridge, "up"])?;
    }
    Ok(())
}

/// The spec with the uplink filled in, as the agent's state file in the sandbox's directory
/// (and at `--state-out`); returns its path.
fn write_state(
    sandbox: &Names,
    spec: &StateFile,
    uplink: &str,
    state_out: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let mut state = spec.clone();
    state.uplink = Some(uplink.to_string());
    // Each endpoint's namespace, for the agent's socket hooks on containers (an endpoint's
    // own `netns` stays).
    for endpoint in &mut state.endpoints {
        if endpoint.netns.is_none() {
            endpoint.netns = Some(netns_path(&sandbox.endpoint_ns(&endpoint.name)));
        }
    }
    let yaml = state.to_yaml();
    fs::write(sandbox.state_path(), &yaml)
        .with_context(|| format!("writing the state file {}", sandbox.state_path().display()))?;
    if let Some(path) = state_out {
        fs::write(path, &yaml)
            .with_context(|| format!("writing the state file to --state-out {}", path.display()))?;
    }
    Ok(sandbox.state_path())
}

/// What was built, for people: namespaces, addresses, bridges, served ports.
fn print_summary(sandbox: &Names, model: &Model, uplink: &str) {
    println!(
        "sandbox {}: host namespace {} (uplink {uplink} {UPLINK_HOST_CIDR}), outside \
         namespace {} (eth0 {OUTSIDE_CIDR})",
        sandbox.name,
        sandbox.host_ns(),
        sandbox.outside_ns()
    );
    for network in &model.networks {
        let mut families = Vec::new();
        if let (Some(subnet), Some(gateway)) = (network.subnet, network.gateway) {
            families.push(format!("{subnet} gateway {gateway}"));
        }
        if let (Some(subnet6), Some(gateway6)) = (network.subnet6, network.gateway6) {
            families.push(format!("{subnet6} gateway {gateway6}"));
        }
        println!(
            "  network {}: bridge {} {}",
            network.name,
            network.bridge,
            families.join(", ")
        );
    }
    for endpoint in &model.endpoints {
        let addresses: Vec<String> = endpoint
            .interfaces
            .iter()
            .map(|i| {
                let addresses: Vec<String> =
                    i.ip.map(|ip| ip.to_string())
                        .into_iter()
                        .chain(i.ip6.map(|ip| ip.to_string()))
                        .collect();
                format!("{} on {}", addresses.join(" "), i.network)
            })
            .collect();
        let (tcp, udp) = served_ports(model, &endpoint.name);
        println!(
            "  endpoint {}: namespace {}, {}; serving tcp {} udp {}",
            endpoint.name,
            sandbox.endpoint_ns(&endpoint.name),
            addresses.join(", "),
            port_list(&tcp),
            port_list(&udp)
        );
    }
}

/// A namespace, with IPv6 on only when `ipv6`.
fn add_namespace(sandbox: &Names, ns: &str, ipv6: bool) -> anyhow::Result<()> {
    run_step(
        &format!("creating namespace {ns}"),
        Command::new("ip").args(["netns", "add", ns]),
    )?;
    sandbox.record(&sandbox.namespaces_path(), ns)?;
    // Docker disables IPv6 in containers on networks without it; doing the same keeps
    // neighbour discovery and MLD chatter out of the flows tests count where IPv6 is not
    // used.
    if !ipv6 && Path::new("/proc/sys/net/ipv6").exists() {
        sysctl_in(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl_in(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
    }
    Ok(())
}

/// The endpoint's namespace and one veth pair per interface, host end on the network's bridge.
fn build_endpoint(sandbox: &Names, model: &Model, endpoint: &Endpoint) -> anyhow::Result<()> {
    let host = sandbox.host_ns();
    let ns = sandbox.endpoint_ns(&endpoint.name);
    let ipv6 = endpoint.interfaces.iter().any(|i| i.ip6.is_some());
    add_namespace(sandbox, &ns, ipv6)?;
    ip_in(
        &ns,
        &format!("bringing up lo in {ns}"),
        &["link", "set", "lo", "up"],
    )?;
    for (j, interface) in endpoint.interfaces.iter().enumerate() {
        let network = model
            .network(&interface.network)
            .context("the model guarantees every interface's network exists")?;
        let inner = format!("eth{j}");
        let step = format!(
            "connecting endpoint {} ({inner}) to network {} via {}",
            endpoint.name, network.name, interface.host_veth
        );
        ip_in(
            &host,
            &step,
            &[
                "link",
                "add",
                &interface.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
                "netns",
                &ns,
            ],
        )?;
        ip_in(
            &host,
            &step,
            &[
                "link",
                "set",
                &interface.host_veth,
                "master",
                &network.bridge,
            ],
        )?;
        ip_in(&host, &step, &["link", "set", &interface.host_veth, "up"])?;
        ip_in(
            &ns,
            &step,
            &[
                "link",
                "set",
                &inner,
                "address",
                &format_mac(&interface.mac),
            ],
        )?;
        if let (Some(ip), Some(subnet)) = (interface.ip, network.subnet) {
            let address = format!("{ip}/{}", subnet.prefix_len);
            ip_in(&ns, &step, &["addr", "add", &address, "dev", &inner])?;
        }
        if let (Some(ip6), Some(subnet6)) = (interface.ip6, network.subnet6) {
            let address = format!("{ip6}/{}", subnet6.prefix_len);
            ip_in(
                &ns,
                &step,
                &["-6", "addr", "add", &address, "dev", &inner, "nodad"],
            )?;
        }
        ip_in(&ns, &step, &["link", "set", &inner, "up"])?;
    }
    // The default route of each family: through the first interface that has an address of
    // that family (for IPv4 the first interface, as Docker does).
    let gateways = |family: u8| {
        endpoint.interfaces.iter().enumerate().find_map(|(j, i)| {
            let network = model.network(&i.network)?;
            let gateway = match family {
                4 => i.ip.and(network.gateway).map(|g| g.to_string()),
                _ => i.ip6.and(network.gateway6).map(|g| g.to_string()),
            }?;
            Some((format!("eth{j}"), gateway))
        })
    };
    for (family, flag) in [(4, "-4"), (6, "-6")] {
        if let Some((dev, gateway)) = gateways(family) {
            ip_in(
                &ns,
                &format!(
                    "adding the IPv{family} default route of endpoint {}",
                    endpoint.name
                ),
                &[
                    flag, "route", "add", "default", "via", &gateway, "dev", &dev,
                ],
            )?;
        }
    }
    Ok(())
}

/// The ports an endpoint's server listens on: (tcp, udp). Port 80 always; every container port
/// of a published port that leads to it (directly or through a service it backs); every
/// service target port it backs.
fn served_ports(model: &Model, endpoint: &str) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let mut tcp = BTreeSet::from([ALWAYS_SERVED]);
    let mut udp = BTreeSet::from([ALWAYS_SERVED]);
    let backs = |service: &str| {
        model
            .services
            .iter()
            .any(|s| s.name == service && s.backends.iter().any(|b| b == endpoint))
    };
    let mut add = |protocol: Protocol, first: u16, count: u32| {
        let set = match protocol {
            Protocol::Tcp => &mut tcp,
            Protocol::Udp => &mut udp,
        };
        for offset in 0..count.min(MAX_PORTS_PER_ENTRY) {
            if let Ok(port) = u16::try_from(u32::from(first) + offset) {
                set.insert(port);
            }
        }
    };
    for port in &model.ports {
        let leads_here = match &port.target {
            PortTarget::Endpoint(e) => e == endpoint,
            PortTarget::Service(s) => backs(s),
        };
        if leads_here {
            add(
                port.protocol,
                port.container_ports.first,
                port.container_ports.len(),
            );
        }
    }
    for service in &model.services {
        if service.backends.iter().any(|b| b == endpoint) {
            add(service.protocol, service.target_port, 1);
        }
    }
    (tcp, udp)
}

fn port_list(ports: &BTreeSet<u16>) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts `dataplane sandbox serve` in the endpoint's namespace as a detached daemon and
/// records its pid. nsenter, not `ip netns exec`: nothing but the network namespace changes,
/// and nsenter execs the command, so the pid recorded is the server's own.
fn start_server(
    sandbox: &Names,
    model: &Model,
    endpoint: &Endpoint,
) -> anyhow::Result<(String, Child)> {
    let step = format!("starting the server of endpoint {}", endpoint.name);
    let exe =
        std::env::current_exe().with_context(|| format!("{step}: finding this executable"))?;
    let log_path = sandbox.log_path(&endpoint.name);
    let log = fs::File::create(&log_path)
        .with_context(|| format!("{step}: creating {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("{step}: duplicating the log file handle"))?;
    let (tcp, udp) = served_ports(model, &endpoint.name);
    let child = Command::new("nsenter")
        .arg(format!(
            "--net={}",
            netns_path(&sandbox.endpoint_ns(&endpoint.name))
        ))
        .arg("--")
        .arg(&exe)
        .args(["sandbox", "serve", "--name", &endpoint.name, "--tcp"])
        .arg(port_list(&tcp))
        .arg("--udp")
        .arg(port_list(&udp))
        .args(
            endpoint
                .interfaces
                .iter()
                .any(|i| i.ip6.is_some())
                .then_some("--ipv6"),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C or a test harness killing our group leaves it running
        // until `down`.
        .process_group(0)
        .spawn()
        .with_context(|| format!("{step}: cannot run nsenter"))?;
    sandbox.record(
        &sandbox.pids_path(),
        &format!("{} {}", endpoint.name, child.id()),
    )?;
    Ok((endpoint.name.clone(), child))
}

/// Waits until every server has said it is ready (bound all its ports), so traffic right after
/// `up` finds them listening. A server that exits instead fails `up` with its log.
fn wait_for_servers(sandbox: &Names, children: &mut [(String, Child)]) -> anyhow::Result<()> {
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    let mut waiting: Vec<usize> = (0..children.len()).collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for i in waiting {
            let (endpoint, child) = &mut children[i];
            let log_path = sandbox.log_path(endpoint);
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            if log.lines().any(|l| l == format!("{endpoint}: ready")) {
                continue;
            }
            if let Some(status) = child.try_wait().context("checking a server process")? {
                bail!(
                    "starting the server of endpoint {endpoint}: it exited ({status}) and \
                     said:\n{}",
                    log.trim_end()
                );
            }
            still.push(i);
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let late: Vec<&str> = waiting.iter().map(|i| children[*i].0.as_str()).collect();
            bail!(
                "starting the servers: {} not ready after {:?} (logs in {})",
                late.join(", "),
                SERVER_READY_TIMEOUT,
                sandbox.dir.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// down

/// Creates the host's cgroup and records its path in `{dir}/cgroup` for the agent's
/// `--cgroup` (tests and the demo read it there).
fn make_host_cgroup(sandbox: &Names) -> anyhow::Result<()> {
    let Some(cgroup) = sandbox.host_cgroup() else {
        return Ok(());
    };
    fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    fs::write(sandbox.cgroup_path_file(), cgroup.display().to_string())
        .with_context(|| format!("writing {}", sandbox.cgroup_path_file().display()))
}

fn down(name: &str) -> anyhow::Result<()> {
    let sandbox = Names::new(name)?;
    let removed = down_quietly(&sandbox)?;
    if removed.is_empty() {
        println!("sandbox {name}: nothing to remove");
    } else {
        for item in removed {
            println!("removed {item}");
        }
    }
    Ok(())
}

/// Removes everything of the sandbox and says what it removed. Every step runs even if an
/// earlier one failed, so one stuck piece does not leave the rest behind; the first error is
/// returned at the end.
fn down_quietly(sandbox: &Names) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut first_error: Option<anyhow::Error> = None;
    let mut note = |result: anyhow::Result<()>| {
        if let Err(e) = result {
            log::warn!("{e:#}");
            first_error.get_or_insert(e);
        }
    };

    let namespaces = namespaces_to_remove(sandbox);

    // Servers first, by pid, checking that the pid still is our server (pids get reused).
    let mut victims = Vec::new();
    for line in read_lines(&sandbox.pids_path()) {
        let Some((endpoint, pid)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if is_our_server(pid, endpoint) {
            victims.push(pid);
            removed.push(format!("server of {endpoint} (pid {pid})"));
        }
    }
    // Then whatever else still runs in our namespaces (an agent, a stray client), except us.
    let me = std::process::id() as i32;
    for ns in &namespaces {
        match namespace_pids(ns) {
            Ok(pids) => {
                for pid in pids {
                    if pid != me && !victims.contains(&pid) {
                        victims.push(pid);
                        removed.push(format!("process {pid} in {ns}"));
                    }
                }
            }
            Err(e) => note(Err(e)),
        }
    }
    // And whatever runs in the host's cgroup (commands of `exec host`).
    let cgroup = sandbox.host_cgroup().filter(|c| c.exists());
    if let Some(cgroup) = &cgroup {
        for pid in read_lines(&cgroup.join("cgroup.procs")) {
            if let Ok(pid) = pid.trim().parse::<i32>()
                && pid != me
                && !victims.contains(&pid)
            {
                victims.push(pid);
                removed.push(format!("process {pid} in {}", cgroup.display()));
            }
        }
    }
    terminate(&victims);
    if let Some(cgroup) = &cgroup {
        match fs::remove_dir(cgroup) {
            Ok(()) => removed.push(format!("cgroup {}", cgroup.display())),
            Err(e) => note(Err(e).with_context(|| format!("removing cgroup {}", cgroup.display()))),
        }
    }

    for ns in &namespaces {
        let result = run_step(
            &format!("deleting namespace {ns}"),
            Command::new("ip").args(["netns", "del", ns]),
        );
        match result {
            Ok(_) => removed.push(format!("namespace {ns}")),
            Err(e) => note(Err(e)),
        }
    }

    if sandbox.dir.exists() {
        match fs::remove_dir_all(&sandbox.dir) {
            Ok(()) => removed.push(format!("directory {}", sandbox.dir.display())),
            Err(e) => note(Err(e).with_context(|| format!("removing {}", sandbox.dir.display()))),
        }
    }
    match first_error {
        Some(e) => Err(e.context(format!("sandbox down {}", sandbox.name))),
        None => Ok(removed),
    }
}

/// The sandbox's namespaces that exist now: the ones it recorded making, the ones its spec
/// calls for, and (in case the files are gone) any `{NAME}-*` that another existing sandbox
/// does not claim (sandbox `a` must not sweep away sandbox `a-b`'s `a-b-host`).
fn namespaces_to_remove(sandbox: &Names) -> Vec<String> {
    let existing = existing_namespaces();
    let mut wanted: BTreeSet<String> = read_lines(&sandbox.namespaces_path()).into_iter().collect();
    if let Ok(Some(spec)) = sandbox.saved_spec() {
        wanted.extend(sandbox.namespaces(&spec));
    }
    wanted.insert(sandbox.host_ns());
    wanted.insert(sandbox.outside_ns());
    let claimed_by_others: BTreeSet<String> = fs::read_dir(SANDBOX_ROOT)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name() != sandbox.name.as_str())
                .flat_map(|e| read_lines(&e.path().join("namespaces")))
                .collect()
        })
        .unwrap_or_default();
    let prefix = format!("{}-", sandbox.name);
    wanted.extend(
        existing
            .iter()
            .filter(|ns| ns.starts_with(&prefix) && !claimed_by_others.contains(*ns))
            .cloned(),
    );
    wanted
        .into_iter()
        .filter(|ns| existing.contains(ns))
        .collect()
}

/// Whether `pid` is still the `sandbox serve` started for `endpoint`.
fn is_our_server(pid: i32, endpoint: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w == [b"sandbox".as_slice(), b"serve".as_slice()])
        && args
            .windows(2)
            .any(|w| w == [b"--name".as_slice(), endpoint.as_bytes()])
}

fn namespace_pids(ns: &str) -> anyhow::Result<Vec<i32>> {
    let out = run_step(
        &format!("listing processes in namespace {ns}"),
        Command::new("ip").args(["netns", "pids", ns]),
    )?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Alive and not a zombie (a zombie holds no namespace and cannot be killed further). Public
/// for the test bed (tests/testbed), which stops its processes the same way.
pub fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGTERM, up to TERM_GRACE for them to go, then SIGKILL.
fn terminate(pids: &[i32]) {
    terminate_within(pids, TERM_GRACE);
}

/// SIGTERM, up to `grace` for them to go, then SIGKILL; returns once they are gone (or `grace`
/// later).
pub fn terminate_within(pids: &[i32], grace: Duration) {
    for pid in pids {
        signal(*pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| is_alive(**p)) {
        signal(*pid, libc::SIGKILL);
    }
    // Give SIGKILL a moment so the namespaces are free when we delete them.
    let deadline = Instant::now() + grace;
    while pids.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// exec

/// Runs `command` in the target's namespace and returns its exit code (128 + signal number when
/// a signal ended it, as shells report).
fn exec(name: &str, target: &str, command: &[String]) -> anyhow::Result<i32> {
    let sandbox = Names::new(name)?;
    let spec = sandbox.saved_spec()?.with_context(|| {
        format!("sandbox {name} does not exist; run `dataplane sandbox up SPEC --name {name}`")
    })?;
    let ns = match target {
        "host" => sandbox.host_ns(),
        "outside" => sandbox.outside_ns(),
        endpoint if spec.endpoints.iter().any(|e| e.name == endpoint) => {
            sandbox.endpoint_ns(endpoint)
        }
        _ => {
            let mut valid = String::from("host, outside");
            for e in &spec.endpoints {
                let _ = write!(valid, ", {}", e.name);
            }
            bail!("sandbox {name} has no target {target:?}; valid targets: {valid}");
        }
    };
    if !Path::new(&netns_path(&ns)).exists() {
        bail!(
            "namespace {ns} of sandbox {name} is gone; run `dataplane sandbox down --name {name}` \
             and up again"
        );
    }
    let (program, args) = command.split_first().context("no command given")?;
    let mut nsenter = Command::new("nsenter");
    nsenter
        .arg(format!("--net={}", netns_path(&ns)))
        .arg("--")
        .arg(program)
        .args(args);
    // The host's processes run in the sandbox's host cgroup, where the agent's socket hook
    // (localhost and host-address access to published ports) is attached.
    if target == "host"
        && let Some(cgroup) = sandbox.host_cgroup().filter(|c| c.exists())
    {
        let procs = cgroup.join("cgroup.procs");
        // SAFETY: the closure runs in the child between fork and exec and only writes a file.
        unsafe {
            nsenter.pre_exec(move || fs::write(&procs, "0"));
        }
    }
    let status = nsenter
        .status()
        .with_context(|| format!("running nsenter for {target} ({ns})"))?;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
networks:
  - {name: frontend, bridge: br-frontend, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: web1
    labels: {app: web}
    interfaces:
      - {network: frontend, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}
  - name: web2
    labels: {app: web}
    interfaces:
      - {network: frontend, ip: 172.30.1.3, mac: "02:42:ac:1e:01:03", host_veth: veth-web2}
ports:
  - {endpoint: web1, protocol: tcp, host_port: 8080, container_port: 8080}
  - {endpoint: web1, protocol: udp, host_port: "9000-9099", container_port: "7000-7099"}
  - {service: api, protocol: tcp, host_port: 8443, container_port: 443}
services:
  - {name: web, vip: 10.96.0.10, port: 80, protocol: udp, target_port: 5353, selector: {app: web}}
  - {name: api, vip: 10.96.0.11, port: 443, endpoints: [web2]}
"#;

    fn model() -> Model {
        Model::from_spec(&StateFile::parse(SPEC).unwrap()).unwrap()
    }

    #[test]
    fn served_ports_cover_published_and_service_ports() {
        let model = model();
        let (tcp, udp) = served_ports(&model, "web1");
        assert_eq!(tcp, BTreeSet::from([80, 8080]));
        let mut expected_udp: BTreeSet<u16> = (7000..7064).collect();
        expected_udp.extend([80, 5353]);
        assert_eq!(udp, expected_udp, "ranges are capped at 64 ports");
        let (tcp, udp) = served_ports(&model, "web2");
        assert_eq!(tcp, BTreeSet::from([80, 443]));
        assert_eq!(udp, BTreeSet::from([80, 5353]));
    }

    #[test]
    fn names_follow_dockers_container_name_rule() {
        for good in ["dp", "sbt1", "a.b_c-d", "0"] {
            check_name("n", good).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name("n", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_addresses_are_the_cidrs_addresses() {
        assert_eq!(UPLINK_HOST_CIDR, format!("{UPLINK_HOST_IP}/24"));
        assert_eq!(OUTSIDE_CIDR, format!("{OUTSIDE_IP}/24"));
    }

    #[test]
    fn namespace_names_are_prefixed_with_the_sandbox() {
        let sandbox = Names::new("sbt").unwrap();
        let spec = StateFile::parse(SPEC).unwrap();
        assert_eq!(
            sandbox.namespaces(&spec),
            vec!["sbt-host", "sbt-out", "sbt-web1", "sbt-web2"]
        );
        assert_eq!(
            format_mac(&[2, 0x42, 0xac, 0x1e, 1, 0xff]),
            "02:42:ac:1e:01:ff"
        );
    }
}

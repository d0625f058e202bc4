//! `dataplane agent`: loads the kernel programs, keeps them attached and their maps in line with
//! the desired state its sources hand it (the state file, Docker), and answers local clients.
//! The main loop never reads or parses a file: sources do that on threads of their own.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

mod status;

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    control::{self, DEFAULT_SOCKET, status as report},
    flows::{self, metrics},
    kernel::{
        DEFAULT_PIN_DIR, Datapath, LoadOptions,
        conntrack::{self, Collector},
        netdev,
        pin_lock::{PinLock, StartRecord},
        sockets,
    },
    model::Model,
    reconcile::{HostSettings, ReconcileError, Reconciler},
    source::{docker, state_file},
};

/// How often the kernel state is re-checked against the model in force (an interface that
/// came back with a new index gets its programs again, a new host address is learnt, a map
/// entry removed by hand comes back). Not more often: with tens of thousands of entries a
/// re-check reads every map, and doing that three times a second cost a visible share of a
/// core in the scale bench. It runs whatever the sources say: a refused newer state never
/// stops the repair of the one in force.
const DRIFT_CHECK_INTERVAL: Duration = Duration::from_secs(3);
/// How often the agent checks whether the conntrack collector is due (its own interval adapts
/// to how full the table is: `conntrack::next_interval`). The shortest timeout is 10 s, so
/// entries live at most a couple of seconds past theirs.
const GC_TICK: Duration = conntrack::GC_INTERVAL_PRESSED;

/// When the uplink gets the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Only while it has work (early drops for the uplink's deny list), and only on an uplink
    /// whose driver is a NIC's (ETHTOOL_GDRVINFO): on a virtual device (veth, bridge, vxlan,
    /// macvlan, tun, ...) the socket buffer exists before XDP runs, and an XDP program on a
    /// veth uplink, even one that passes everything, turns off GRO aggregation there
    /// (measured with `cargo xtask bench`: a no-op program took iperf3 through a published
    /// port from ~18 to ~3.4 Gbit/s). There the deny list is enforced at tc ingress instead.
    Auto,
    Always,
    Never,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Declarative state file (YAML or JSON); changes to it apply while the agent runs.
    #[arg(long)]
    state: Option<PathBuf>,
    #[command(flatten)]
    docker: docker::DockerArgs,
    /// Interface facing the outside (overrides `uplink:` of the state file; default: the
    /// interface of the default route).
    #[arg(long)]
    uplink: Option<String>,
    /// Directory on bpffs where the maps are pinned (kept across restarts).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Control socket for `dataplane status` and other local clients.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Capacity of the connection-tracking table (two entries per connection); takes effect
    /// when the table is created, not on one already pinned.
    #[arg(long, default_value_t = dataplane_common::capacity::CONNTRACK)]
    ct_max_entries: u32,
    /// How many services (VIP:port/protocol) the maps hold; each possible service reserves a
    /// Maglev table of (--maglev-size + 1) x 4 bytes, allocated up front (64 KiB at the
    /// default size: 1,024 services = 64 MiB). Takes effect when the maps are created.
    #[arg(long, default_value_t = dataplane_common::capacity::SERVICES)]
    max_services: u32,
    /// Slots of each service's Maglev table, a prime from 251 to 131071. Each backend owns
    /// M/N slots give or take one: the default keeps every backend of up to 100 within 1% of
    /// its share (Cilium's default); 1021 costs 4 KiB a service and is within 1% up to 10
    /// backends. Takes effect when the maps are created (a pinned map keeps its size).
    #[arg(long, default_value_t = dataplane_common::MAGLEV_DEFAULT_SIZE,
          value_parser = parse_maglev_size)]
    maglev_size: u32,
    /// Capacity of the published-ports map: one entry per port number, protocol and host
    /// address (a range of 100 ports is 100). Takes effect when the map is created.
    #[arg(long, default_value_t = dataplane_common::capacity::PORTS)]
    max_ports: u32,
    /// cgroup (v2) whose processes reach service VIPs and published ports (on the host's
    /// addresses and on localhost) through socket-level translation: connect4, sendmsg4,
    /// recvmsg4 and getpeername4 hooks (default: the cgroup2 root, i.e. every process; only
    /// sockets of the agent's network namespace are translated). `none` turns it off.
    #[arg(long)]
    cgroup: Option<String>,
    /// cgroup (v2) of the containers whose connections to service VIPs are translated at
    /// connect()/sendmsg() (socket-level load balancing), the same four hooks: Docker's
    /// cgroup parent, e.g. `system.slice` (systemd driver) or `docker` (cgroupfs driver);
    /// a relative path is under the cgroup2 mount. Only sockets of containers' network
    /// namespaces (learnt from each endpoint's `netns`) and of the agent's are translated.
    /// Not needed when it lies under `--cgroup` (the default, the root, covers every
    /// container). Default: none.
    #[arg(long)]
    container_cgroup: Option<String>,
    /// When to attach the XDP program to the uplink.
    #[arg(long, value_enum, default_value = "auto")]
    xdp: XdpMode,
    #[command(flatten)]
    flows: flows::FlowArgs,
}

/// `--maglev-size`: a prime within the bounds the programs and the map allow.
fn parse_maglev_size(text: &str) -> Result<u32, String> {
    let size: u32 = text
        .parse()
        .map_err(|e| format!("{text:?} is not a number: {e}"))?;
    // The map's own bound (with --max-services) is checked at load.
    crate::kernel::check_maglev_size(size, 0)?;
    Ok(size)
}

struct Agent {
    /// The only writer of the kernel's maps and links (it owns the datapath).
    reconciler: Reconciler,
    /// The only writer of the conntrack maps besides the kernel.
    collector: Collector,
    args: AgentArgs,
    last_error: Option<String>,
    /// Why the state in force could not be re-applied at the last drift repair (an
    /// interface it names went away); cleared by the next repair or state that applies.
    repair_error: Option<String>,
    /// Which state is in force, a newer one that is not (and why), warnings.
    state: report::StateStatus,
    reconciles: u64,
    last_applied_unix: Option<u64>,
    /// See [`AgentArgs::cgroup`]; None when off or when the host has no cgroup2.
    cgroup: Option<String>,
    /// See [`AgentArgs::container_cgroup`]; None when off or under `cgroup`.
    container_cgroup: Option<String>,
    netns_cookie: u64,
    /// Flow records: history, followers, export, metrics.
    flows: flows::Pipeline,
    /// The Docker source's Swarm view, for `status`.
    swarm: docker::SwarmFeed,
}

/// The containers' cgroup to attach the socket hooks to (`--container-cgroup`): a relative
/// path is under the cgroup2 mount; none when off, and none when it is `host_cgroup` or
/// lies under it (the hooks there already run for its processes).
fn container_cgroup(arg: Option<&str>, host_cgroup: Option<&str>) -> Option<String> {
    let arg = arg.filter(|a| *a != "none" && !a.is_empty())?;
    let path = if arg.starts_with('/') {
        std::path::PathBuf::from(arg)
    } else {
        let Some(root) = netdev::cgroup2_root() else {
            log::warn!("no cgroup2 mounted: --container-cgroup {arg} is ignored");
            return None;
        };
        std::path::Path::new(&root).join(arg)
    };
    if let Some(host) = host_cgroup
        && path.starts_with(host)
    {
        log::info!(
            "--container-cgroup {} lies under --cgroup {host}, whose socket hooks cover it",
            path.display()
        );
        return None;
    }
    Some(path.display().to_string())
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // One agent per pin dir: the lock first, before anything is pinned or attached.
    let pin_dir_existed = args.pin_dir.exists();
    crate::kernel::prepare_pin_dir(&args.pin_dir)?;
    let _lock = PinLock::acquire(&args.pin_dir)?;
    for pin in Datapath::remove_stale_link_pins(&args.pin_dir) {
        log::info!(
            "removed {}: its interface went away while no agent ran",
            pin.display()
        );
    }
    let record = StartRecord::take(&args.pin_dir);
    let args_pin_dir = args.pin_dir.clone();
    let (mut agent, mut sources, listener) = match start(args).await {
        Ok(started) => started,
        Err(err) => {
            // Whatever this start pinned goes; what an earlier agent left stays.
            for path in record.undo() {
                log::info!("failed start: removed {}", path.display());
            }
            if !pin_dir_existed {
                // Only when empty: what an earlier agent left is never removed.
                let _ = std::fs::remove_dir(&args_pin_dir);
            }
            return Err(err);
        }
    };
    let _socket_file = control::SocketFile::new(agent.args.socket.clone());
    let (requests_tx, mut requests) = mpsc::channel::<control::Request>(16);
    tokio::spawn(control::serve(listener, requests_tx));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut drift_tick = tokio::time::interval(DRIFT_CHECK_INTERVAL);
    let mut gc_tick = tokio::time::interval(GC_TICK);
    log::info!(
        "agent running; control socket {}",
        agent.args.socket.display()
    );
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = drift_tick.tick() => agent.repair_drift(),
            _ = gc_tick.tick() => {
                if agent.collector.due() {
                    agent.collect_garbage();
                }
            }
            event = next_state(&mut sources.state) => agent.on_state_file(event),
            published = sources.docker.next_model() => agent.apply_from(
                "docker",
                Version::default(),
                published.model,
                published.notes,
            ),
            Some(request) = requests.recv() => {
                let reply = agent.handle(&request);
                let _ = request.reply.send(reply);
            }
            Some(events) = sources.flow_events.recv() => agent.flows.ingest(events),
        }
    }
    log::info!(
        "stopping: detaching programs (maps stay pinned in {})",
        agent.args.pin_dir.display()
    );
    agent.reconciler.detach_all();
    Ok(())
}

/// Which version of its source a state is: the state file's hash and modification time
/// (none for Docker).
#[derive(Debug, Default)]
struct Version {
    sha256: Option<String>,
    modified_unix: Option<u64>,
}

/// What the main loop listens to besides clients and signals.
struct Sources {
    state: Option<state_file::Source>,
    docker: docker::Source,
    flow_events: mpsc::Receiver<Vec<dataplane_common::FlowEvent>>,
}

async fn next_state(state: &mut Option<state_file::Source>) -> state_file::Event {
    match state {
        Some(source) => source.next().await,
        None => std::future::pending().await,
    }
}

/// Loads and attaches everything and applies the first state; any error ends the start.
async fn start(args: AgentArgs) -> anyhow::Result<(Agent, Sources, tokio::net::UnixListener)> {
    let mut docker = docker::Source::start(&args.docker);
    let mut state = args.state.clone().map(state_file::Source::start);
    let (initial, version, notes) = match &mut state {
        Some(source) => {
            let reading = source.first().await;
            let model = reading.result?;
            let version = Version {
                sha256: reading.sha256,
                modified_unix: reading.modified_unix,
            };
            (model, version, Vec::new())
        }
        None => {
            let first = docker.first_model(docker::FIRST_SYNC_WAIT).await;
            (first.model, Version::default(), first.notes)
        }
    };
    let options = LoadOptions {
        ct_max_entries: args.ct_max_entries,
        max_services: args.max_services,
        flow_events: args.flows.events_on(),
        max_ports: args.max_ports,
        maglev_size: args.maglev_size,
    };
    let (mut datapath, conntrack) = Datapath::load(&args.pin_dir, &options)?;
    let flow_events = flows::spawn_reader(datapath.take_flow_events()?)?;
    let (metrics, registry) = metrics::Metrics::new();
    if let metrics::Listen(Some(addr)) = args.flows.metrics {
        let listener = metrics::bind(addr).await?;
        tokio::spawn(metrics::serve(listener, std::sync::Arc::new(registry)));
        log::info!("metrics on http://{addr}/metrics");
    }
    let flow_pipeline = flows::Pipeline::new(&args.flows, metrics)?;
    crate::hubble::spawn(&args.flows.hubble, &args.socket, flow_pipeline.hub()).await?;
    log::info!(
        "kernel programs loaded; maps pinned under {}",
        args.pin_dir.display()
    );
    let cgroup = match args.cgroup.as_deref() {
        Some("none") => None,
        Some(path) => Some(path.to_owned()),
        None => {
            let root = netdev::cgroup2_root();
            if root.is_none() {
                log::warn!(
                    "no cgroup2 mounted: host processes cannot reach service VIPs and \
                     published ports"
                );
            }
            root
        }
    };
    let container_cgroup = container_cgroup(args.container_cgroup.as_deref(), cgroup.as_deref());
    let netns_cookie = netdev::netns_cookie().context("reading this network namespace's cookie")?;
    let listener = control::bind(&args.socket)?;
    let source = if args.state.is_some() {
        "file"
    } else {
        "docker"
    };
    let mut agent = Agent {
        reconciler: Reconciler::new(datapath),
        collector: Collector::new(conntrack),
        args,
        last_error: None,
        repair_error: None,
        state: report::StateStatus::default(),
        reconciles: 0,
        last_applied_unix: None,
        cgroup,
        container_cgroup,
        netns_cookie,
        flows: flow_pipeline,
        swarm: docker.swarm(),
    };
    // The first state must apply: an agent that cannot start says why and exits.
    agent
        .apply(source, version, initial, notes)
        .context("applying the initial state")?;
    Ok((
        agent,
        Sources {
            state,
            docker,
            flow_events,
        },
        listener,
    ))
}

impl Agent {
    /// Where the agent is, for `model`: the uplink (--uplink, else the state file's, else the
    /// default route's interface), the cgroup and the namespace.
    fn host_settings(&self, model: &Model) -> Result<HostSettings, ReconcileError> {
        let uplink = self
            .args
            .uplink
            .clone()
            .or_else(|| model.uplink.clone())
            .or_else(netdev::default_route_interface)
            .ok_or(ReconcileError::NoUplink)?;
        let xdp = match self.args.xdp {
            XdpMode::Always => Some(true),
            XdpMode::Never => Some(false),
            // On a NIC, XDP while the deny list has entries; on a virtual uplink never (the
            // deny list is then enforced at tc ingress, which is cheaper there).
            XdpMode::Auto if netdev::xdp_saves_work(&uplink) => None,
            XdpMode::Auto => Some(false),
        };
        Ok(HostSettings {
            uplink,
            cgroup: self.cgroup.clone(),
            container_cgroup: self.container_cgroup.clone(),
            netns_cookie: self.netns_cookie,
            xdp,
        })
    }

    /// Applies `model` from `source` (`notes`: what the source noticed making it, shown as
    /// warnings); on failure the last good state stays in force.
    fn apply(
        &mut self,
        source: &str,
        version: Version,
        model: Model,
        notes: Vec<String>,
    ) -> Result<(), ReconcileError> {
        let host_addrs: Vec<std::net::IpAddr> = netdev::ipv4_addresses()
            .into_iter()
            .map(|(_, a)| a.into())
            .chain(netdev::ipv6_addresses().into_iter().map(|(_, a)| a.into()))
            .collect();
        let mut warnings = model.check_host(&host_addrs)?;
        warnings.extend(model.warnings());
        warnings.extend(notes);
        self.reconcile_in(model, true)?;
        for w in &warnings {
            if !self.state.warnings.contains(w) {
                log::warn!("{source} state: {w}");
            }
        }
        self.state.warnings = warnings;
        self.state.in_force = Some(report::StateVersion {
            source: source.to_owned(),
            sha256: version.sha256,
            modified_unix: version.modified_unix,
            applied_unix: state_file::unix_now(),
            applied_unix_micros: state_file::unix_now_micros(),
        });
        self.state.newer = None;
        self.last_error = None;
        self.repair_error = None;
        Ok(())
    }

    /// Applies `model` from a source, recording a refusal.
    fn apply_from(&mut self, source: &str, version: Version, model: Model, notes: Vec<String>) {
        let sha256 = version.sha256.clone();
        if let Err(e) = self.apply(source, version, model, notes) {
            self.reject(sha256, e.to_string());
        }
    }

    /// Brings the kernel to `model` through the reconciler (which keeps the last good state in
    /// force when it fails); `new` when it is a new state rather than a repair of the one in
    /// force.
    fn reconcile_in(&mut self, model: Model, new: bool) -> Result<(), ReconcileError> {
        let started = std::time::Instant::now();
        let result = self
            .host_settings(&model)
            .and_then(|host| self.reconciler.apply(model, host));
        self.flows
            .metrics()
            .reconciled(started.elapsed(), result.is_ok());
        let applied = result?;
        if !applied.changes.is_empty() {
            let what = if new {
                "applied state"
            } else {
                "repaired drift"
            };
            log::info!("{what} in {:?}: {:?}", started.elapsed(), applied.changes);
            self.reconciles += 1;
        }
        if let Some(model) = self.reconciler.applied() {
            self.flows.set_model(model);
        }
        self.collector.forget_translated_to(&applied.departed);
        // NAT64 connections are in the IPv6 tables, to the container's IPv4-mapped address.
        let mut departed6 = applied.departed6.clone();
        departed6.extend(
            applied
                .departed
                .iter()
                .map(|addr| dataplane_common::In6Addr::mapped_v4(*addr)),
        );
        self.collector.forget_translated_to(&departed6);
        // Only dockerd holds published ports with a socket of its own; a state file's ports
        // have no placeholder to reset.
        let placeholders = if self.args.docker.docker.is_some() {
            &applied.published_tcp
        } else {
            &BTreeSet::new()
        };
        match sockets::reset_placeholder_connections(placeholders) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "reset {n} connection(s) that reached the host on newly published ports \
                 {:?} before they were published",
                applied.published_tcp
            ),
            Err(e) => log::warn!("resetting connections on newly published ports: {e}"),
        }
        self.last_applied_unix = Some(state_file::unix_now());
        Ok(())
    }

    fn on_state_file(&mut self, event: state_file::Event) {
        match event {
            state_file::Event::Pending { reason, since_unix } => {
                // Keeps the hash of a refused version until a newer one is read.
                self.state.newer = Some(report::NewerState {
                    sha256: None,
                    since_unix,
                    reason,
                });
            }
            state_file::Event::Read(reading) => match reading.result {
                Ok(model) => {
                    log::info!(
                        "state file changed (sha256 {}); applying",
                        reading.sha256.as_deref().unwrap_or("-")
                    );
                    let version = Version {
                        sha256: reading.sha256,
                        modified_unix: reading.modified_unix,
                    };
                    self.apply_from("file", version, model, Vec::new());
                }
                Err(e) => self.reject(reading.sha256, e.to_string()),
            },
        }
    }

    /// Re-applies the state in force, which writes only what differs from the kernel. Runs
    /// whether or not a newer state was refused.
    fn repair_drift(&mut self) {
        let Some(model) = self.reconciler.applied().cloned() else {
            return;
        };
        match self.reconcile_in(model, false) {
            Ok(()) => self.repair_error = None,
            Err(e) => {
                let e = e.to_string();
                if self.repair_error.as_ref() != Some(&e) {
                    log::warn!("repairing drift from the state in force: {e}");
                }
                self.repair_error = Some(e);
            }
        }
    }

    /// Removes expired connections from the conntrack tables; the same walk gives the flow
    /// records of expired and long-lived connections, and of drops left pending.
    fn collect_garbage(&mut self) {
        let walk = self.collector.collect();
        // Drops the kernel aggregated but had no later drop to report them with; before the
        // metrics refresh below, as drop accounting counts kernel drops without a record one
        // refresh later as unattributed, and these records are the late ones.
        let pending4 = flows::periodic::pending_drops(&walk.v4.drop_aggregates, walk.now_ns);
        let pending6 = flows::periodic::pending_drops(&walk.v6.drop_aggregates, walk.now_ns);
        if !pending4.is_empty() || !pending6.is_empty() {
            self.collector
                .forget_drop_aggregates(pending4.iter().map(|(key, _)| key));
            self.collector
                .forget_drop_aggregates(pending6.iter().map(|(key, _)| key));
            let events = pending4.into_iter().map(|(_, event)| event);
            self.flows
                .ingest(events.chain(pending6.into_iter().map(|(_, e)| e)).collect());
        }
        self.flows
            .after_conntrack_walk(self.reconciler.datapath(), &walk);
    }

    fn reject(&mut self, sha256: Option<String>, error: String) {
        log::error!("state not applied, keeping the last good state: {error}");
        self.state.newer = Some(report::NewerState {
            sha256,
            since_unix: state_file::unix_now(),
            reason: error.clone(),
        });
        self.last_error = Some(error);
    }

    fn handle(&mut self, request: &control::Request) -> String {
        let command = request.command.as_str();
        if let Some(observe) = command
            .strip_prefix("observe")
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
        {
            return self.flows.observe(observe, &request.stream);
        }
        match command {
            "status" => match self.status() {
                Ok(s) => serde_json::to_string(&s).expect("status serialises"),
                Err(e) => format!("{{\"error\": {:?}}}", e.to_string()),
            },
            other => format!("{{\"error\": \"unknown request {other:?}\"}}"),
        }
    }
}

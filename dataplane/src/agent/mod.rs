//! `dataplane agent`: loads the kernel programs, keeps them attached and their maps in line with
//! the desired state, follows changes to the state file, and answers local clients.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

mod status;

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    control::{self, DEFAULT_SOCKET},
    flows::{self, metrics},
    kernel::{
        DEFAULT_PIN_DIR, Datapath, LoadOptions,
        conntrack::{self, Collector},
        netdev,
    },
    model::{Model, StateError},
    reconcile::{HostSettings, ReconcileError, Reconciler},
    source::docker,
};

/// How often the state file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(300);
/// Every this many polls the kernel state is re-checked against the model (an interface that
/// came back with a new index gets its programs again, a new host address is learnt). Not at
/// every poll: with tens of thousands of entries a re-check reads every map, and doing that
/// three times a second cost a visible share of a core in the scale bench.
const DRIFT_CHECK_EVERY: u64 = 10;
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
    /// 4 KiB Maglev table. Takes effect when the maps are created.
    #[arg(long, default_value_t = dataplane_common::capacity::SERVICES)]
    max_services: u32,
    /// cgroup (v2) whose processes reach published ports on the host's addresses and on
    /// localhost through socket-level translation (default: the cgroup2 root, i.e. every
    /// process; only connections made in the agent's network namespace are translated).
    /// `none` turns it off.
    #[arg(long)]
    cgroup: Option<String>,
    /// When to attach the XDP program to the uplink.
    #[arg(long, value_enum, default_value = "auto")]
    xdp: XdpMode,
    #[command(flatten)]
    flows: flows::FlowArgs,
}

struct Agent {
    /// The only writer of the kernel's maps and links (it owns the datapath).
    reconciler: Reconciler,
    /// The only writer of the conntrack map besides the kernel.
    collector: Collector,
    args: AgentArgs,
    /// Text of the state file when it was last read, to notice edits.
    seen_text: Option<String>,
    last_error: Option<String>,
    reconciles: u64,
    last_applied_unix: Option<u64>,
    /// See [`AgentArgs::cgroup`]; None when off or when the host has no cgroup2.
    cgroup: Option<String>,
    netns_cookie: u64,
    /// Polls of the state file so far (see DRIFT_CHECK_EVERY).
    polls: u64,
    /// Flow records: history, followers, export, metrics.
    flows: flows::Pipeline,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let mut docker = docker::Source::start(&args.docker);
    let initial = match &args.state {
        Some(path) => Model::load(path)?.1,
        None => docker.first_model(docker::FIRST_SYNC_WAIT).await,
    };
    let options = LoadOptions {
        ct_max_entries: args.ct_max_entries,
        max_services: args.max_services,
        flow_events: args.flows.events_on(),
    };
    let (mut datapath, conntrack) = Datapath::load(&args.pin_dir, &options)?;
    let mut flow_events = flows::spawn_reader(datapath.take_flow_events()?)?;
    let (metrics, registry) = metrics::Metrics::new();
    if let metrics::Listen(Some(addr)) = args.flows.metrics {
        let listener = metrics::bind(addr).await?;
        tokio::spawn(metrics::serve(listener, std::sync::Arc::new(registry)));
        log::info!("metrics on http://{addr}/metrics");
    }
    let flow_pipeline = flows::Pipeline::new(&args.flows, metrics)?;
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
                log::warn!("no cgroup2 mounted: host processes cannot reach published ports");
            }
            root
        }
    };
    let netns_cookie = netdev::netns_cookie().context("reading this network namespace's cookie")?;
    let listener = control::bind(&args.socket)?;
    let _socket_file = control::SocketFile(args.socket.clone());
    let seen_text = args
        .state
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let mut agent = Agent {
        reconciler: Reconciler::new(datapath),
        collector: Collector::new(conntrack),
        args,
        seen_text,
        last_error: None,
        reconciles: 0,
        last_applied_unix: None,
        cgroup,
        netns_cookie,
        polls: 0,
        flows: flow_pipeline,
    };
    // The first state must apply: an agent that cannot start says why and exits.
    agent.apply(initial).context("applying the initial state")?;

    let (requests_tx, mut requests) = mpsc::channel::<control::Request>(16);
    tokio::spawn(control::serve(listener, requests_tx));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    let mut gc_tick = tokio::time::interval(GC_TICK);
    log::info!(
        "agent running; control socket {}",
        agent.args.socket.display()
    );
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => agent.poll(),
            _ = gc_tick.tick() => {
                if agent.collector.due() {
                    agent.collect_garbage();
                }
            }
            model = docker.next_model() => {
                if let Err(e) = agent.apply(model) {
                    agent.reject(e.to_string());
                }
            }
            Some(request) = requests.recv() => {
                let reply = agent.handle(&request);
                let _ = request.reply.send(reply);
            }
            Some(events) = flow_events.recv() => agent.flows.ingest(events),
        }
    }
    log::info!(
        "stopping: detaching programs (maps stay pinned in {})",
        agent.args.pin_dir.display()
    );
    agent.reconciler.detach_all();
    Ok(())
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
            netns_cookie: self.netns_cookie,
            xdp,
        })
    }

    /// Applies `model` (the reconciler keeps the last good state in force when it fails).
    fn apply(&mut self, model: Model) -> Result<(), ReconcileError> {
        let started = std::time::Instant::now();
        let result = self
            .host_settings(&model)
            .and_then(|host| self.reconciler.apply(model, host));
        self.flows
            .metrics()
            .reconciled(started.elapsed(), result.is_ok());
        let applied = result?;
        if !applied.changes.is_empty() {
            log::info!(
                "applied state in {:?}: {:?}",
                started.elapsed(),
                applied.changes
            );
            self.reconciles += 1;
        }
        if let Some(model) = self.reconciler.applied() {
            self.flows.set_model(model);
        }
        self.last_error = None;
        self.collector.forget_translated_to(&applied.departed);
        self.last_applied_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        Ok(())
    }

    /// Picks up edits of the state file and repairs drift (e.g. a recreated interface).
    fn poll(&mut self) {
        if let Some(path) = self.args.state.clone() {
            match std::fs::read_to_string(&path) {
                Ok(text) if Some(&text) != self.seen_text.as_ref() => {
                    self.seen_text = Some(text);
                    match Model::load(&path) {
                        Ok((_, model)) => {
                            log::info!("state file {} changed; applying", path.display());
                            if let Err(e) = self.apply(model) {
                                self.reject(e.to_string());
                            }
                        }
                        Err(e) => self.reject(e.to_string()),
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let e = StateError::Read {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    };
                    if self.last_error.as_deref() != Some(&e.to_string()) {
                        self.reject(e.to_string());
                    }
                    return;
                }
            }
        }
        self.polls += 1;
        if self.last_error.is_none() && self.polls.is_multiple_of(DRIFT_CHECK_EVERY) {
            // Same model; apply() only writes what differs from the kernel.
            if let Some(model) = self.reconciler.applied().cloned()
                && let Err(e) = self.apply(model)
            {
                self.reject(e.to_string());
            }
        }
    }

    /// Removes expired connections from the conntrack table; the same walk gives the flow
    /// records of expired and long-lived connections.
    fn collect_garbage(&mut self) {
        let walk = self.collector.collect();
        self.flows
            .after_conntrack_walk(self.reconciler.datapath(), &walk);
    }

    fn reject(&mut self, error: String) {
        log::error!("state not applied, keeping the last good state: {error}");
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

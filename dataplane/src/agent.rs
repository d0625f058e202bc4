//! `dataplane agent`: loads the kernel programs, keeps them attached and their maps in line with
//! the desired state, follows changes to the state file, and answers local clients.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use dataplane_common::{CtEntry, CtKey, DropAggKey, DropAggValue, hook, map_names};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    control::{
        self, DEFAULT_SOCKET,
        status::{self, Status},
    },
    flows::{self, metrics},
    kernel::{DEFAULT_PIN_DIR, Datapath, LoadOptions, conntrack, netdev},
    model::{Model, StateError},
    reconcile::{self as reconciler, HostSettings, ReconcileError},
    source::docker,
};

const IPPROTO_TCP: u8 = 6;

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
    datapath: Datapath,
    args: AgentArgs,
    /// The last state that was applied in full.
    applied: Model,
    uplink: String,
    /// Text of the state file when it was last read, to notice edits.
    seen_text: Option<String>,
    last_error: Option<String>,
    reconciles: u64,
    last_applied_unix: Option<u64>,
    /// See [`AgentArgs::cgroup`]; None when off or when the host has no cgroup2.
    cgroup: Option<String>,
    netns_cookie: u64,
    /// Conntrack entries removed by the garbage collector since start.
    ct_collected: u64,
    /// When the collector runs next.
    next_gc: std::time::Instant,
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
    let mut datapath = Datapath::load(&args.pin_dir, &options)?;
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
        datapath,
        uplink: String::new(),
        args,
        applied: Model::default(),
        seen_text,
        last_error: None,
        reconciles: 0,
        last_applied_unix: None,
        cgroup,
        netns_cookie,
        ct_collected: 0,
        next_gc: std::time::Instant::now(),
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
                if std::time::Instant::now() >= agent.next_gc {
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
    agent.datapath.detach_all();
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

    fn reconcile(
        &mut self,
        model: &Model,
    ) -> Result<(String, reconciler::Changes), ReconcileError> {
        // Interfaces that went away (a container stopped) took their links with them.
        for gone in self.datapath.prune_vanished() {
            log::info!("{gone}: the interface is gone, and its attachment with it");
        }
        let host = self.host_settings(model)?;
        let desired = reconciler::desired(model, &host, &self.datapath)?;
        let changes = reconciler::apply(&desired, &mut self.datapath)?;
        Ok((host.uplink, changes))
    }

    /// Applies `model`; on failure re-applies the last good state so nothing is left half done.
    fn apply(&mut self, model: Model) -> Result<(), ReconcileError> {
        let started = std::time::Instant::now();
        let result = self.reconcile(&model);
        self.flows
            .metrics()
            .reconciled(started.elapsed(), result.is_ok());
        match result {
            Ok((uplink, changes)) => {
                if !changes.is_empty() {
                    log::info!("applied state in {:?}: {changes:?}", started.elapsed());
                    self.reconciles += 1;
                }
                self.uplink = uplink;
                let gone = conntrack::departed_addresses(&self.applied, &model);
                self.applied = model;
                self.flows.set_model(&self.applied);
                self.last_error = None;
                if !gone.is_empty() {
                    self.reset_connections_to(&gone);
                }
                self.last_applied_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                Ok(())
            }
            Err(err) => {
                if self.last_applied_unix.is_some() {
                    let last_good = self.applied.clone();
                    if let Err(e) = self.reconcile(&last_good) {
                        log::warn!("re-applying the last good state: {e}");
                    }
                }
                Err(err)
            }
        }
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
        if self.last_error.is_none() && self.polls % DRIFT_CHECK_EVERY == 0 {
            // Same model; apply() only writes what differs from the kernel.
            let model = self.applied.clone();
            if let Err(e) = self.apply(model) {
                self.reject(e.to_string());
            }
        }
    }

    /// Removes the tracked connections translated to containers that went away, so their
    /// clients get a reset from whichever backend the next packet reaches instead of waiting
    /// on an address nobody answers any more.
    fn reset_connections_to(&mut self, addresses: &std::collections::BTreeSet<u32>) {
        let mut removed = 0;
        for table in [map_names::CONNTRACK, map_names::CONNTRACK_NEW] {
            let entries = match self.datapath.entries::<CtKey, CtEntry>(table) {
                Ok(entries) => entries,
                Err(e) => {
                    log::warn!("conntrack: reading {table}: {e}");
                    continue;
                }
            };
            let doomed = conntrack::translated_to(&entries, addresses);
            for key in &doomed {
                if let Err(e) = self.datapath.remove::<CtKey, CtEntry>(table, *key) {
                    log::warn!("conntrack: {e}");
                }
            }
            removed += doomed.len();
        }
        if removed > 0 {
            log::info!("removed {removed} conntrack entries of departed containers");
        }
    }

    /// Removes expired connections from both conntrack tables (established, and the LRU one
    /// of handshakes under way), and decides when to look again.
    fn collect_garbage(&mut self) {
        let started = std::time::Instant::now();
        let now = conntrack::monotonic_now_ns();
        let mut walked = BTreeMap::new();
        let mut ended = Vec::new();
        let mut main_fill = (0, 1);
        for table in [map_names::CONNTRACK, map_names::CONNTRACK_NEW] {
            let entries = match self.datapath.entries::<CtKey, CtEntry>(table) {
                Ok(entries) => entries,
                Err(e) => {
                    log::warn!("conntrack gc: reading {table}: {e}");
                    continue;
                }
            };
            let doomed = conntrack::expired(&entries, now);
            for key in &doomed {
                if let Err(e) = self.datapath.remove::<CtKey, CtEntry>(table, *key) {
                    log::warn!("conntrack gc: {e}");
                }
            }
            self.ct_collected += doomed.len() as u64;
            if table == map_names::CONNTRACK {
                let capacity = self.datapath.conntrack_capacity().unwrap_or(1).max(1);
                main_fill = (entries.len(), capacity as usize);
                ended.extend(doomed);
            } else {
                // A handshake that never completed was never reported (TCP is reported once
                // established): only the other protocols' ends are records.
                ended.extend(doomed.into_iter().filter(|k| k.proto != IPPROTO_TCP));
            }
            walked.extend(entries);
        }
        // Before the metrics refresh below: drop accounting counts kernel drops without a
        // record one refresh later as unattributed, and these records are the late ones.
        self.report_pending_drops(now);
        // The same walk gives the flow records of expired and long-lived connections.
        self.flows
            .after_conntrack_walk(&self.datapath, &walked, &ended, now);
        let fill = main_fill.0 as f64 / main_fill.1 as f64;
        let removed_share = ended.len() as f64 / walked.len().max(1) as f64;
        self.next_gc = std::time::Instant::now()
            + conntrack::next_interval(fill, removed_share, started.elapsed());
    }

    /// Publishes the drops the kernel aggregated but had no later drop to report them with.
    fn report_pending_drops(&mut self, now: u64) {
        let name = map_names::DROP_AGGREGATES;
        let entries = match self.datapath.entries::<DropAggKey, DropAggValue>(name) {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("drop aggregates: {e}");
                return;
            }
        };
        let pending = flows::periodic::pending_drops(&entries, now);
        if pending.is_empty() {
            return;
        }
        let mut events = Vec::with_capacity(pending.len());
        for (key, event) in pending {
            // Drops the kernel adds between this read and the removal are lost from the
            // records (the counters have them).
            if let Err(e) = self.datapath.remove::<DropAggKey, DropAggValue>(name, key) {
                log::warn!("drop aggregates: {e}");
            }
            events.push(event);
        }
        self.flows.ingest(events);
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

    fn status(&self) -> anyhow::Result<Status> {
        let attachments = self
            .datapath
            .attachments()
            .into_iter()
            .map(|(interface, hook, ifindex)| status::Attachment {
                interface,
                ifindex,
                hook: hook::name(hook.number()).to_owned(),
                program: hook.program().to_owned(),
            })
            .collect();
        let maps = self
            .datapath
            .map_fill()?
            .into_iter()
            .map(|m| status::MapFill {
                name: m.name.to_owned(),
                entries: m.entries,
                capacity: m.capacity,
            })
            .collect();
        let interfaces = self
            .datapath
            .iface_stats()?
            .into_iter()
            .map(|(key, stats)| status::InterfaceCounters {
                interface: netdev::ifname(key.ifindex)
                    .unwrap_or_else(|| format!("ifindex {}", key.ifindex)),
                ifindex: key.ifindex,
                hook: hook::name(key.hook).to_owned(),
                packets: stats.packets,
                bytes: stats.bytes,
            })
            .collect();
        let endpoints = self
            .applied
            .endpoints
            .iter()
            .flat_map(|e| {
                e.interfaces.iter().map(|i| status::EndpointRow {
                    name: e.name.clone(),
                    network: i.network.clone(),
                    ip: i.ip.to_string(),
                    host_veth: i.host_veth.clone(),
                })
            })
            .collect();
        let drops = self
            .datapath
            .drops()?
            .into_iter()
            .map(|(reason, count)| (reason.desc().to_owned(), count))
            .collect();
        Ok(Status {
            pin_dir: self.datapath.pin_dir().display().to_string(),
            state_file: self.args.state.as_ref().map(|p| p.display().to_string()),
            uplink: self.uplink.clone(),
            attachments,
            maps,
            interfaces,
            endpoints,
            drops,
            reconciles: self.reconciles,
            ct_collected: self.ct_collected,
            last_applied_unix: self.last_applied_unix,
            last_error: self.last_error.clone(),
            flows: self.flow_status(),
        })
    }

    fn flow_status(&self) -> status::FlowStatus {
        let stats = self.flows.stats();
        status::FlowStatus {
            events: self.args.flows.events_on(),
            lost: self.datapath.flow_events_lost().unwrap_or(0),
            records: stats.records,
            history: stats.history,
            followers: stats.followers,
        }
    }
}

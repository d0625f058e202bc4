//! Flow logging (docs/DESIGN.md section 7): the kernel's flow events in, Hubble-style records
//! out, to the history that `dataplane observe` reads, to its followers, to the JSON-lines
//! export and to the metrics.
//!
//! ```text
//!  FLOW_EVENTS ring ──> reader task ──batches──> Pipeline (the agent's main loop):
//!  (kernel: new, close, drop)                     decode, identity from the model, record
//!                                                   ──> history (observe --last)
//!  conntrack walk of the GC (every 2 s) ────────>   ──> followers (observe --follow)
//!  (agent: update every 30 s, end when expired)     ──> --flow-log (JSON lines)
//!                                                   ──> metrics
//! ```
//!
//! The reader task only copies events out of the ring, so the ring is drained even while the
//! main loop is busy; the main loop owns the model, so identity is always the applied state's.

pub mod clock;
pub mod decode;
pub mod export;
pub mod filter;
pub mod history;
pub mod hub;
pub mod metrics;
pub mod periodic;
pub mod record;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use dataplane_common::FlowEvent;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    kernel::{
        Datapath,
        conntrack::Walk,
        maps::{Conntrack, Conntrack6, Conntrack6New, ConntrackNew, LocalAddrs, LocalAddrs6},
    },
    model::Model,
};
use export::FlowLog;
use filter::ObserveRequest;
use history::{Basis, Stored};
use hub::Hub;
use metrics::Metrics;
use record::Identities;

/// Every how many conntrack walks (one per GC round, 2 s) the fill level of every map is read
/// for the metrics; counting a map walks it, so not on every round.
const MAP_FILL_EVERY: u32 = 5;
/// Events handed from the reader task to the main loop at once, at most.
const MAX_BATCH: usize = 4096;
/// Batches waiting for the main loop; when they are all taken, the reader stops draining and
/// the ring fills, where a loss is counted (never silent).
const BATCH_QUEUE: usize = 64;

/// on | off
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The form of flow records written out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Hubble's flows, nothing else (strictly valid against flow.proto).
    Hubble,
    /// Hubble's flows plus `flow.connection` and `flow.translation`.
    Extended,
}

/// The agent's flow and metrics options.
#[derive(clap::Args, Debug, Clone)]
pub struct FlowArgs {
    /// Whether the kernel programs send flow events (off measures what logging costs; metrics
    /// from the kernel's counters stay). Takes effect when the programs are loaded.
    #[arg(long, value_enum, default_value = "on")]
    pub flow_events: OnOff,
    /// Write every flow record as a JSON line to this file (rotated by size), or `-` for
    /// stdout.
    #[arg(long, value_name = "PATH|-")]
    pub flow_log: Option<String>,
    /// Size at which the flow log file is rotated (PATH -> PATH.1 -> PATH.2 ...).
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    pub flow_log_max_bytes: u64,
    /// Rotated flow log files kept.
    #[arg(long, default_value_t = 3)]
    pub flow_log_keep: u32,
    /// Recent flow records kept for `dataplane observe --last N`.
    #[arg(long, default_value_t = 10_000)]
    pub flow_history: usize,
    /// Every how many seconds a connection still open gets a record with its counters so far
    /// (`"connection": {"event": "update"}`).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub flow_report_interval: u64,
    /// The form of the --flow-log lines: `hubble` (valid Hubble flows, what Hubble's tools
    /// read) or `extended` (with our `connection` and `translation` fields).
    #[arg(long, value_enum, default_value = "hubble")]
    pub flow_log_format: LogFormat,
    /// Where /metrics is served (Prometheus), or `none`.
    #[arg(long, default_value = "127.0.0.1:9965", value_parser = crate::flows::metrics::parse_listen)]
    pub metrics: crate::flows::metrics::Listen,
    #[command(flatten)]
    pub hubble: crate::hubble::HubbleArgs,
}

impl FlowArgs {
    pub fn events_on(&self) -> bool {
        self.flow_events == OnOff::On
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("the flow event ring buffer: {0}")]
    Ring(#[source] std::io::Error),
}

/// How often the ring is read when no wakeup came: the longest a flow event waits on a quiet
/// host (the kernel programs wake the agent only for a batch of events).
pub const FLOW_TICK: Duration = Duration::from_millis(50);

/// Reads the flow-event ring buffer from its own task and hands the events on in batches.
pub fn spawn_reader(ring: RingBuf<MapData>) -> Result<mpsc::Receiver<Vec<FlowEvent>>, FlowError> {
    // SAFETY: the ring buffer owns its map's fd and keeps it open, unchanged, for as long as
    // it lives, and it moves into (and dies with) the AsyncFd.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| FlowError::Ring(e.into()))?;
    let (tx, rx) = mpsc::channel(BATCH_QUEUE);
    tokio::spawn(async move {
        let mut reported_bad = false;
        loop {
            // The kernel wakes the reader only once 64 events wait (see the kernel's
            // `WAKEUP_PENDING_BYTES`), so fewer than that are picked up on this tick.
            let ready = tokio::time::timeout(FLOW_TICK, fd.readable_mut()).await;
            let mut batch = Vec::new();
            match ready {
                Ok(Ok(mut guard)) => {
                    drain(guard.get_inner_mut(), &mut batch, &mut reported_bad);
                    guard.clear_ready();
                }
                Ok(Err(e)) => {
                    log::error!("flow events: waiting on the ring buffer: {e}; flow logging stops");
                    return;
                }
                Err(_elapsed) => {}
            }
            drain(fd.get_mut(), &mut batch, &mut reported_bad);
            // Handed on as read (no copy), in parts of at most MAX_BATCH.
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(MAX_BATCH));
                if tx.send(std::mem::replace(&mut batch, rest)).await.is_err() {
                    return; // the agent is stopping
                }
            }
        }
    });
    Ok(rx)
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<FlowEvent>, reported_bad: &mut bool) {
    while let Some(item) = ring.next() {
        match decode::copy_event(&item) {
            Ok(event) => batch.push(event),
            Err(e) => {
                if !*reported_bad {
                    log::warn!("flow events: {e} (kernel programs of another version?)");
                    *reported_bad = true;
                }
            }
        }
    }
}

/// A client of `observe --follow`.
struct Follower {
    request: ObserveRequest,
    lines: mpsc::Sender<String>,
    skipped: u64,
}

/// Counts for `dataplane status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlowStats {
    pub records: u64,
    pub history: usize,
    pub followers: usize,
    pub undecodable: u64,
}

pub struct Pipeline {
    /// What records are written from: the identities of `model` and `host_addrs`.
    basis: Arc<Basis>,
    /// Records made with `basis` (written out, if still pending, when it changes).
    made_with_basis: usize,
    /// The model the identities were built from, and the host's addresses.
    model: Model,
    host_addrs: Vec<IpAddr>,
    ifnames: HashMap<u32, Arc<str>>,
    hub: Arc<Hub>,
    followers: Vec<Follower>,
    log: Option<FlowLog>,
    log_format: LogFormat,
    log_failing: bool,
    metrics: Metrics,
    last_report_ns: u64,
    report_interval: Duration,
    walks: u32,
    stats: FlowStats,
}

fn node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

impl Pipeline {
    pub fn new(args: &FlowArgs, metrics: Metrics) -> Result<Pipeline, FlowError> {
        let log = match &args.flow_log {
            Some(target) => {
                let log = FlowLog::open(target, args.flow_log_max_bytes, args.flow_log_keep)?;
                log::info!(
                    "flow records go to {} as JSON lines",
                    if target == "-" { "stdout" } else { target }
                );
                Some(log)
            }
            None => None,
        };
        let node_name = node_name();
        Ok(Pipeline {
            hub: Arc::new(Hub::new(args.flow_history, node_name.clone())),
            basis: Arc::new(Basis {
                identities: Identities::default(),
                clock: clock::Clock::now(),
                node_name,
            }),
            made_with_basis: 0,
            model: Model::default(),
            host_addrs: Vec::new(),
            ifnames: HashMap::new(),
            followers: Vec::new(),
            log,
            log_format: args.flow_log_format,
            log_failing: false,
            metrics,
            last_report_ns: crate::kernel::conntrack::monotonic_now_ns(),
            report_interval: Duration::from_secs(args.flow_report_interval.max(1)),
            walks: 0,
            stats: FlowStats::default(),
        })
    }

    /// What Hubble's API serves from.
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn stats(&self) -> FlowStats {
        FlowStats {
            history: self.hub.len(),
            followers: self.followers.len(),
            ..self.stats
        }
    }

    /// The model just applied: identities follow it (rebuilt only when it changed).
    pub fn set_model(&mut self, model: &Model) {
        if *model != self.model {
            self.model = model.clone();
            self.renew_basis();
            // Interfaces come and go with containers.
            self.ifnames.clear();
        }
    }

    fn set_host_addrs(&mut self, mut addrs: Vec<IpAddr>) {
        addrs.sort();
        if addrs != self.host_addrs {
            self.host_addrs = addrs;
            self.renew_basis();
        }
    }

    /// Identities from the model and the host's addresses as they are now. The records still
    /// pending are written out with the identities they were made under first, so no record
    /// names what was applied after its event, and the old identities are not kept alive.
    fn renew_basis(&mut self) {
        self.hub.write_latest(self.made_with_basis);
        self.made_with_basis = 0;
        self.basis = Arc::new(Basis {
            identities: Identities::new(&self.model, self.host_addrs.iter().copied()),
            clock: self.basis.clock,
            node_name: self.basis.node_name.clone(),
        });
    }

    /// Events from the kernel.
    pub fn ingest(&mut self, events: Vec<FlowEvent>) {
        for raw in &events {
            match decode::from_raw(raw) {
                Ok(event) => self.publish(&event),
                Err(e) => {
                    if self.stats.undecodable == 0 {
                        log::warn!("flow events: {e} (kernel programs of another version?)");
                    }
                    self.stats.undecodable += 1;
                }
            }
        }
        self.flush_log();
    }

    fn ifname(&mut self, ifindex: u32) -> Option<Arc<str>> {
        if ifindex == 0 {
            return None;
        }
        if let Some(name) = self.ifnames.get(&ifindex) {
            return Some(name.clone());
        }
        let name: Arc<str> = crate::kernel::netdev::ifname(ifindex)?.into();
        self.ifnames.insert(ifindex, name.clone());
        Some(name)
    }

    /// Counts the event's record and keeps it; it is written out here only when the flow log
    /// or a follower needs it now, else when someone reads it (see [`Stored`]).
    fn publish(&mut self, event: &decode::Event) {
        let ifname = self.ifname(event.ifindex);
        self.metrics
            .record(&record::classify(event, &self.basis.identities));
        self.stats.records += 1;
        self.made_with_basis += 1;
        let stored = Arc::new(Stored::of_event(*event, self.basis.clone(), ifname));
        if let Some(log) = &mut self.log {
            let line = stored.line(self.log_format == LogFormat::Extended);
            match log.write_line(line) {
                Ok(()) => self.log_failing = false,
                Err(e) => {
                    if !self.log_failing {
                        log::warn!("flow log: {e}; records are skipped until it works again");
                    }
                    self.log_failing = true;
                }
            }
        }
        self.followers.retain_mut(|f| {
            if !f.request.filter.matches(stored.flow()) {
                return !f.lines.is_closed();
            }
            match f.lines.try_send(stored.line(f.request.extended).to_owned()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if f.skipped == 0 {
                        log::warn!(
                            "an `observe --follow` client reads too slowly; records are \
                             skipped for it"
                        );
                    }
                    f.skipped += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.hub.push(stored);
    }

    fn flush_log(&mut self) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.flush()
            && !self.log_failing
        {
            log::warn!("flow log: {e}");
            self.log_failing = true;
        }
    }

    /// After each conntrack walk of the garbage collector (the table as read, the keys it
    /// removed, when): the final record of expired connections that had no close event, every
    /// report interval the counters of connections still open, and the kernel-side metrics.
    /// Both families' tables, the same way.
    pub fn after_conntrack_walk(&mut self, datapath: &Datapath, walk: &Walk) {
        let now_ns = walk.now_ns;
        let mut events = periodic::ended(&walk.v4.entries, &walk.v4.removed, now_ns);
        events.extend(periodic::ended(&walk.v6.entries, &walk.v6.removed, now_ns));
        let interval = self.report_interval.as_nanos() as u64;
        if now_ns.saturating_sub(self.last_report_ns) >= interval {
            let since = std::mem::replace(&mut self.last_report_ns, now_ns);
            events.extend(periodic::updates(
                &walk.v4.entries,
                &walk.v4.removed,
                since,
                now_ns,
                interval,
            ));
            events.extend(periodic::updates(
                &walk.v6.entries,
                &walk.v6.removed,
                since,
                now_ns,
                interval,
            ));
        }
        for event in &events {
            self.publish(event);
        }
        self.flush_log();
        self.refresh_kernel_metrics(datapath, [walk.v4.entries.len(), walk.v6.entries.len()]);
    }

    /// `conntrack_entries`: IPv4's and IPv6's.
    fn refresh_kernel_metrics(&mut self, datapath: &Datapath, conntrack_entries: [usize; 2]) {
        let [v4, v6] = conntrack_entries;
        let (capacity4, capacity6) = self.metrics_ct_capacity(datapath);
        self.metrics
            .conntrack(decode::IpFamily::V4, v4 as u64, capacity4);
        self.metrics
            .conntrack(decode::IpFamily::V6, v6 as u64, capacity6);
        match datapath.flow_events_lost() {
            Ok(lost) => self.metrics.flow_events_lost(lost),
            Err(e) => log::debug!("metrics: {e}"),
        }
        match datapath.drops() {
            Ok(drops) => self.metrics.kernel_drops(&drops),
            Err(e) => log::debug!("metrics: {e}"),
        }
        for (family, ipv6) in [(decode::IpFamily::V4, false), (decode::IpFamily::V6, true)] {
            match datapath.tcp_flags(ipv6) {
                Ok(flags) => self.metrics.kernel_tcp_flags(family, &flags),
                Err(e) => log::debug!("metrics: {e}"),
            }
        }
        self.metrics.programs_attached(datapath.attachments().len());
        if self.walks.is_multiple_of(MAP_FILL_EVERY) {
            match datapath.map_fill() {
                Ok(fill) => {
                    for map in fill {
                        self.metrics.map_fill(map.name, map.entries, map.capacity);
                    }
                }
                Err(e) => log::debug!("metrics: {e}"),
            }
            let v4 = datapath.entries::<LocalAddrs>().map(|addrs| {
                addrs
                    .keys()
                    .map(|a| IpAddr::V4(Ipv4Addr::from(u32::from_be(*a))))
                    .collect::<Vec<_>>()
            });
            let v6 = datapath
                .entries::<LocalAddrs6>()
                .map(|addrs| addrs.keys().map(|a| IpAddr::V6(a.to_ipv6())).collect());
            match (v4, v6) {
                (Ok(mut addrs), Ok(v6)) => {
                    addrs.extend::<Vec<_>>(v6);
                    self.set_host_addrs(addrs);
                }
                (Err(e), _) | (_, Err(e)) => {
                    log::debug!("flows: reading the host's addresses: {e}")
                }
            }
        }
        self.walks = self.walks.wrapping_add(1);
    }

    /// Both IPv4 conntrack tables' capacity (established and handshakes under way), as the
    /// walk's IPv4 entries are counted; `dataplane_map_entries` has each table on its own,
    /// IPv6's too.
    /// Both tables of each family, IPv4's and IPv6's: established connections and handshakes.
    fn metrics_ct_capacity(&self, datapath: &Datapath) -> (u64, u64) {
        let main = datapath
            .capacity::<Conntrack>()
            .map_or(u64::from(dataplane_common::capacity::CONNTRACK), u64::from);
        let main6 = datapath
            .capacity::<Conntrack6>()
            .map_or(u64::from(dataplane_common::capacity::CONNTRACK), u64::from);
        (
            main + datapath.capacity::<ConntrackNew>().map_or(0, u64::from),
            main6 + datapath.capacity::<Conntrack6New>().map_or(0, u64::from),
        )
    }

    /// `observe {json}` from the control socket: the reply (the latest matching records, one
    /// JSON line each), and with `follow` the client stays subscribed through `lines`.
    pub fn observe(&mut self, request: &str, lines: &mpsc::Sender<String>) -> String {
        let request = match ObserveRequest::parse(request) {
            Ok(r) => r,
            Err(e) => return serde_json::json!({ "error": e.to_string() }).to_string() + "\n",
        };
        let mut reply = String::new();
        for stored in self
            .hub
            .last(|flow| request.filter.matches(flow), request.history())
        {
            reply.push_str(stored.line(request.extended));
            reply.push('\n');
        }
        if request.follow {
            self.followers.push(Follower {
                request,
                lines: lines.clone(),
                skipped: 0,
            });
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        flows: FlowArgs,
    }

    /// Records are written when read, but with the identities in force when their event
    /// came: a model applied in between does not rename the ends of earlier connections.
    #[test]
    fn a_record_names_the_identities_in_force_when_its_event_came() {
        let args = Cli::try_parse_from(["agent", "--metrics", "none"])
            .unwrap()
            .flows;
        let mut pipeline = Pipeline::new(&args, Metrics::new().0).unwrap();
        let raw = decode::tests::raw_event(
            dataplane_common::flow_kind::NEW,
            decode::IPPROTO_TCP,
            ("172.30.1.9", 5000),
            ("172.30.1.2", 80),
        );
        pipeline.ingest(vec![raw]);
        let spec = crate::model::StateFile::parse(
            r#"
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
endpoints:
  - name: web1
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:42:ac:1e:01:02", host_veth: veth-web1}]
"#,
        )
        .unwrap();
        pipeline.set_model(&Model::from_spec(&spec).unwrap());
        pipeline.ingest(vec![raw]);
        let records = pipeline.hub().last(|_| true, 10);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].flow().destination().labels, ["reserved:world"]);
        assert_eq!(records[1].flow().destination().pod_name, "web1");
        assert_eq!(pipeline.stats().records, 2);
    }

    #[test]
    fn the_agent_options_parse_with_their_defaults() {
        let defaults = Cli::try_parse_from(["agent"]).unwrap().flows;
        assert!(defaults.events_on());
        assert_eq!(defaults.flow_log, None);
        assert_eq!(defaults.flow_log_max_bytes, 10 * 1024 * 1024);
        assert_eq!(defaults.flow_log_keep, 3);
        assert_eq!(defaults.flow_history, 10_000);
        assert_eq!(
            defaults.metrics,
            crate::flows::metrics::Listen(Some("127.0.0.1:9965".parse().unwrap()))
        );
        let set = Cli::try_parse_from([
            "agent",
            "--flow-events",
            "off",
            "--flow-log",
            "-",
            "--metrics",
            "none",
        ])
        .unwrap()
        .flows;
        assert!(!set.events_on());
        assert_eq!(set.flow_log.as_deref(), Some("-"));
        assert_eq!(set.metrics, crate::flows::metrics::Listen(None));
        assert!(Cli::try_parse_from(["agent", "--metrics", "9965"]).is_err());
    }
}

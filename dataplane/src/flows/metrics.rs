//! Prometheus metrics (docs/DESIGN.md section 8) and the `/metrics` endpoint.
//!
//! Hubble's names and labels, so existing dashboards work, derived from the flow records:
//! `hubble_flows_processed_total{type,subtype,verdict,protocol}`,
//! `hubble_drop_total{reason,protocol}`, `hubble_icmp_total{family,type}` (family `IPv4` or
//! `IPv6`, type gopacket's name of the message as Hubble has it),
//! `hubble_port_distribution_total{protocol,port}`; `hubble_tcp_flags_total{flag,family}` from
//! the kernel's per-packet counters (the records come per connection, Hubble counts packets);
//! and the agent's own `dataplane_*` from the kernel maps and the reconciler.
//!
//! `hubble_drop_total` has two sources, so that it counts every drop and still agrees with the
//! flows: each drop record counts under its protocol (like Hubble, which derives it from
//! flows), and the kernel's per-reason counters (the DROPS map, which counts a drop also when
//! its event found the ring full or flow events are off) add what the records missed under
//! `protocol="Unknown L4"`. A kernel count is trusted only one refresh later (2 s), so an event
//! still on its way is not counted twice. Summed over `protocol`, the counter is the kernel's
//! count since the agent started.
//!
//! The endpoint is served by axum over hyper (the HTTP stack tonic's gRPC server of the Hubble
//! API uses too): GET /metrics speaks OpenMetrics to clients that ask for it (Prometheus does)
//! and the classic text format 0.0.4 to everything else, encoded by prometheus-client.

use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};

use axum::http::{HeaderMap, StatusCode, header};
use dataplane_common::DropReason;
use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use dataplane_common::tcp_flag_count;

use crate::{
    flows::{
        decode::IpFamily,
        record::{self, ConnectionEvent, Facts, L4, Verdict},
    },
    kernel::TcpFlagTotals,
};

type Labels<const N: usize> = [(&'static str, Cow<'static, str>); N];

/// Hubble's context labels (its `labelsContext=source_namespace,source_workload,
/// destination_namespace,destination_workload`), which the stock dashboards group by.
type Context = [(&'static str, Cow<'static, str>); 4];

/// The context of a drop the kernel counted without a record: unknown ends.
const NO_CONTEXT: Context = [
    ("source_namespace", Cow::Borrowed("")),
    ("source_workload", Cow::Borrowed("")),
    ("destination_namespace", Cow::Borrowed("")),
    ("destination_workload", Cow::Borrowed("")),
];

fn context(facts: &Facts<'_>) -> Context {
    let (source, destination) = facts.ends();
    [
        ("source_namespace", Cow::Owned(source.namespace.clone())),
        ("source_workload", Cow::Owned(source.workload().to_owned())),
        (
            "destination_namespace",
            Cow::Owned(destination.namespace.clone()),
        ),
        (
            "destination_workload",
            Cow::Owned(destination.workload().to_owned()),
        ),
    ]
}

fn with<const N: usize, const M: usize>(
    labels: [(&'static str, Cow<'static, str>); N],
    context: &Context,
) -> [(&'static str, Cow<'static, str>); M] {
    std::array::from_fn(|i| {
        if i < N {
            labels[i].clone()
        } else {
            context[i - N].clone()
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for /metrics on {addr}: {source} (another agent in this network \
         namespace? give --metrics another address, or `--metrics none`)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Per reason (indexed by `DropReason as usize`).
type PerReason = [u64; DropReason::SLOTS as usize];

/// Per-reason drop counts: what records counted, what was added for lost events, and the
/// kernel's counters (since the agent started) at the previous refresh.
struct DropAccounting {
    /// Kernel counters when the agent started (the DROPS map is pinned and keeps counting
    /// across agent restarts; these metrics start at zero like any process's).
    baseline: Option<PerReason>,
    previous: PerReason,
    recorded: PerReason,
    unattributed: PerReason,
}

impl Default for DropAccounting {
    fn default() -> DropAccounting {
        DropAccounting {
            baseline: None,
            previous: [0; DropReason::SLOTS as usize],
            recorded: [0; DropReason::SLOTS as usize],
            unattributed: [0; DropReason::SLOTS as usize],
        }
    }
}

/// The metric handles the agent updates. The registry they are in goes to the HTTP server.
pub struct Metrics {
    flows_processed: Family<Labels<8>, Counter>,
    drops: Family<Labels<6>, Counter>,
    tcp_flags: Family<Labels<6>, Counter>,
    icmp: Family<Labels<6>, Counter>,
    ports: Family<Labels<6>, Counter>,
    lost_events: Family<Labels<1>, Counter>,
    conntrack_entries: Family<Labels<1>, Gauge>,
    conntrack_capacity: Family<Labels<1>, Gauge>,
    map_entries: Family<Labels<1>, Gauge>,
    map_capacity: Family<Labels<1>, Gauge>,
    flow_events_lost: Counter,
    reconcile_duration: Histogram,
    reconcile_errors: Counter,
    programs_attached: Gauge,
    drop_accounting: DropAccounting,
    /// The kernel's TCP flag totals counted already, per family (`IpFamily as usize`).
    tcp_flags_seen: [TcpFlagTotals; 2],
}

impl Metrics {
    pub fn new() -> (Metrics, Registry) {
        let mut registry = Registry::default();
        let metrics = Metrics {
            flows_processed: Family::default(),
            drops: Family::default(),
            tcp_flags: Family::default(),
            icmp: Family::default(),
            ports: Family::default(),
            lost_events: Family::default(),
            conntrack_entries: Family::default(),
            conntrack_capacity: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            flow_events_lost: Counter::default(),
            // 0.5 ms .. ~4 s: a no-op pass takes about a millisecond, a large change seconds.
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            reconcile_errors: Counter::default(),
            programs_attached: Gauge::default(),
            drop_accounting: DropAccounting::default(),
            tcp_flags_seen: [[0; tcp_flag_count::KINDS as usize]; 2],
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "hubble_flows_processed",
            "Total number of flows processed",
            metrics.flows_processed.clone(),
        );
        registry.register("hubble_drop", "Number of drops", metrics.drops.clone());
        registry.register(
            "hubble_tcp_flags",
            "TCP flag occurrences",
            metrics.tcp_flags.clone(),
        );
        registry.register("hubble_icmp", "ICMP messages by type", metrics.icmp.clone());
        registry.register(
            "hubble_lost_events",
            "Number of lost events",
            metrics.lost_events.clone(),
        );
        registry.register(
            "hubble_port_distribution",
            "Numbers of packets distributed by destination port",
            metrics.ports.clone(),
        );
        registry.register(
            "dataplane_conntrack_entries",
            "Entries in a family's connection-tracking tables (two per connection)",
            metrics.conntrack_entries.clone(),
        );
        registry.register(
            "dataplane_conntrack_capacity",
            "Capacity of a family's connection-tracking tables",
            metrics.conntrack_capacity.clone(),
        );
        registry.register(
            "dataplane_map_entries",
            "Entries in each BPF map",
            metrics.map_entries.clone(),
        );
        registry.register(
            "dataplane_map_capacity",
            "Capacity of each BPF map",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "dataplane_flow_events_lost",
            "Flow events the kernel could not write because the ring buffer was full, since \
             the ring was created",
            metrics.flow_events_lost.clone(),
        );
        registry.register(
            "dataplane_reconcile_duration_seconds",
            "Duration of reconcile passes (applying a state and the periodic drift checks)",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "dataplane_reconcile_errors",
            "Reconcile passes that failed (the last good state stayed in force)",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "dataplane_programs_attached",
            "Kernel programs attached (interface hooks and the cgroup hook)",
            metrics.programs_attached.clone(),
        );
        (metrics, registry)
    }

    /// Counts a flow record, from what it says ([`record::Facts`]: the record itself is only
    /// written when someone reads it).
    pub fn record(&mut self, facts: &Facts<'_>) {
        let protocol = facts.protocol();
        let dropped = facts.verdict == Verdict::Dropped;
        let subtype = facts.point.map_or("", |p| p.short_name());
        let cx = context(facts);
        self.flows_processed
            .get_or_create(&with(
                [
                    ("protocol", protocol.into()),
                    ("type", if dropped { "Drop" } else { "Trace" }.into()),
                    ("subtype", subtype.into()),
                    ("verdict", facts.verdict.name().into()),
                ],
                &cx,
            ))
            .inc();
        if let Some(reason) = facts.drop_reason {
            self.drops
                .get_or_create(&with(
                    [
                        ("reason", reason.desc().into()),
                        ("protocol", protocol.into()),
                    ],
                    &cx,
                ))
                .inc();
            self.drop_accounting.recorded[reason as usize] += 1;
        }
        // TCP flags are not counted from records (which come per connection) but per packet
        // by the kernel: see `kernel_tcp_flags`. ICMP is counted per record about a packet:
        // an echo's request (NEW) and its answer (REPLY), and dropped packets, with their own
        // type and code.
        let about_a_packet = matches!(
            facts.event,
            ConnectionEvent::New | ConnectionEvent::Reply | ConnectionEvent::Drop
        );
        // Hubble's family and type text per ICMP version (gopacket's names of each).
        let icmp = match facts.l4 {
            Some(L4::Icmpv4 { icmp_type, code }) => Some((
                "IPv4",
                record::icmpv4_type_code(icmp_type as u8, code as u8),
            )),
            Some(L4::Icmpv6 { icmp_type, code }) => Some((
                "IPv6",
                record::icmpv6_type_code(icmp_type as u8, code as u8),
            )),
            _ => None,
        };
        if let Some((family, name)) = icmp
            && about_a_packet
        {
            self.icmp
                .get_or_create(&with(
                    [("family", family.into()), ("type", Cow::Owned(name))],
                    &cx,
                ))
                .inc();
        }
        if facts.event == ConnectionEvent::New
            && let Some((_, port)) = facts.l4.and_then(|l4| l4.ports())
        {
            self.ports
                .get_or_create(&with(
                    [
                        ("protocol", protocol.into()),
                        ("port", Cow::Owned(port.to_string())),
                    ],
                    &cx,
                ))
                .inc();
        }
    }

    /// The kernel's drop counters (totals since the map was created), read every refresh.
    pub fn kernel_drops(&mut self, totals: &[(DropReason, u64)]) {
        let acc = &mut self.drop_accounting;
        let mut now: PerReason = [0; DropReason::SLOTS as usize];
        for (reason, total) in totals {
            now[*reason as usize] = *total;
        }
        let Some(baseline) = acc.baseline else {
            acc.baseline = Some(now);
            return;
        };
        for reason in DropReason::ALL {
            let i = reason as usize;
            let missing = acc.previous[i].saturating_sub(acc.recorded[i] + acc.unattributed[i]);
            if missing > 0 {
                acc.unattributed[i] += missing;
                self.drops
                    .get_or_create(&with(
                        [
                            ("reason", reason.desc().into()),
                            ("protocol", "Unknown L4".into()),
                        ],
                        &NO_CONTEXT,
                    ))
                    .inc_by(missing);
            }
        }
        for i in 0..now.len() {
            acc.previous[i] = now[i].saturating_sub(baseline[i]);
        }
    }

    /// The kernel's per-packet TCP flag counters of one family's packets (totals per kind
    /// since the agent loaded the programs, summed over CPUs and counting points), read every
    /// refresh. Hubble's labels; the context labels are empty: the kernel counts packets, not
    /// workloads.
    pub fn kernel_tcp_flags(&mut self, family: IpFamily, totals: &TcpFlagTotals) {
        let seen = &mut self.tcp_flags_seen[family as usize];
        for (kind, name) in tcp_flag_count::NAMES.iter().enumerate() {
            let new = totals[kind].saturating_sub(seen[kind]);
            if new > 0 {
                seen[kind] = totals[kind];
                self.tcp_flags
                    .get_or_create(&with(
                        [
                            ("flag", (*name).into()),
                            ("family", family.hubble_name().into()),
                        ],
                        &NO_CONTEXT,
                    ))
                    .inc_by(new);
            }
        }
    }

    /// The kernel's count of lost flow events (a total since the ring was created).
    pub fn flow_events_lost(&self, total: u64) {
        let seen = self.flow_events_lost.get();
        if total > seen {
            self.flow_events_lost.inc_by(total - seen);
            // Hubble's name for events its source's ring could not take.
            self.lost_events
                .get_or_create(&[("source", "perf_event_ring_buffer".into())])
                .inc_by(total - seen);
        }
    }

    /// One family's conntrack fill (`family` IPv4 or IPv6, as Hubble names them).
    pub fn conntrack(&self, family: IpFamily, entries: u64, capacity: u64) {
        let labels = [("family", family.hubble_name().into())];
        self.conntrack_entries
            .get_or_create(&labels)
            .set(entries as i64);
        self.conntrack_capacity
            .get_or_create(&labels)
            .set(capacity as i64);
    }

    pub fn map_fill(&self, name: &'static str, entries: u32, capacity: u32) {
        self.map_entries
            .get_or_create(&[("map", name.into())])
            .set(i64::from(entries));
        self.map_capacity
            .get_or_create(&[("map", name.into())])
            .set(i64::from(capacity));
    }

    pub fn programs_attached(&self, count: usize) {
        self.programs_attached.set(count as i64);
    }

    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconcile_duration.observe(took.as_secs_f64());
        if !ok {
            self.reconcile_errors.inc();
        }
    }
}

/// Where `/metrics` is served (`--metrics ADDR`), or nowhere (`--metrics none`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

pub fn parse_listen(text: &str) -> Result<Listen, String> {
    if text == "none" {
        return Ok(Listen(None));
    }
    text.parse()
        .map(|addr| Listen(Some(addr)))
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:9965"))
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `/metrics` from `registry` until the agent stops, with axum (hyper) like the
/// Hubble API's gRPC server: HTTP/1.1 parsing, keep-alive and HEAD are the library's.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape_handler))
        .route(
            "/",
            axum::routing::get(|| async { "dataplane agent: metrics at /metrics\n" }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try /metrics\n") })
        .with_state(registry);
    if let Err(e) = axum::serve(listener, app).await {
        log::error!("metrics: {e}; /metrics stops");
    }
}

async fn scrape_handler(
    axum::extract::State(registry): axum::extract::State<Arc<Registry>>,
    headers: HeaderMap,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.to_ascii_lowercase()
                .contains("application/openmetrics-text")
        });
    let (status, content_type, body) = respond(openmetrics, &registry);
    (status, [(header::CONTENT_TYPE, content_type)], body)
}

/// The scrape: OpenMetrics to clients that ask for it (Prometheus does), the classic text
/// format 0.0.4 to everything else.
fn respond(openmetrics: bool, registry: &Registry) -> (StatusCode, &'static str, String) {
    let mut body = String::new();
    let (content_type, encoded) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text::encode(&mut body, registry),
        )
    } else {
        (
            prometheus_text::CONTENT_TYPE,
            prometheus_text::encode(&mut body, registry),
        )
    };
    match encoded {
        Ok(()) => (StatusCode::OK, content_type, body),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding the metrics failed\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{
        decode::{self, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, tests::raw_event},
        record::{self, Identities},
    };

    /// Counts the record of a decoded event, with an empty identity table.
    fn count(metrics: &mut Metrics, event: &decode::Event) {
        metrics.record(&record::classify(event, &Identities::default()));
    }

    fn flow(kind: u8, proto: u8, flags: u8, reason: Option<DropReason>) -> decode::Event {
        let mut raw = raw_event(kind, proto, ("192.0.2.2", 5000), ("192.0.2.9", 80));
        raw.tcp_flags = flags;
        raw.reply_packets = u64::from(kind == flow_kind::CLOSE);
        if let Some(reason) = reason {
            raw.drop_reason = reason as u8;
        }
        decode::from_raw(&raw).unwrap()
    }

    fn scrape(registry: &Registry) -> String {
        let (status, content_type, body) = respond(false, registry);
        assert_eq!(status, StatusCode::OK);
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        body
    }

    use dataplane_common::{flow_kind, tcp_flag};

    fn icmp_flow(kind: u8, icmp_type: u8, code: u8, reason: Option<DropReason>) -> decode::Event {
        let mut raw = raw_event(kind, IPPROTO_ICMP, ("192.0.2.2", 7), ("192.0.2.9", 0));
        raw.icmp_type = icmp_type;
        raw.icmp_code = code;
        if let Some(reason) = reason {
            raw.drop_reason = reason as u8;
        }
        decode::from_raw(&raw).unwrap()
    }

    const EMPTY: &str = "source_namespace=\"\",source_workload=\"\",destination_namespace=\"\",destination_workload=\"\"";

    #[test]
    fn records_become_hubbles_metrics() {
        let (mut metrics, registry) = Metrics::new();
        count(
            &mut metrics,
            &flow(flow_kind::NEW, IPPROTO_TCP, tcp_flag::SYN, None),
        );
        count(
            &mut metrics,
            &flow(
                flow_kind::CLOSE,
                IPPROTO_TCP,
                tcp_flag::SYN | tcp_flag::ACK | tcp_flag::FIN,
                None,
            ),
        );
        count(&mut metrics, &flow(flow_kind::NEW, IPPROTO_UDP, 0, None));
        count(
            &mut metrics,
            &flow(
                flow_kind::DROP,
                IPPROTO_TCP,
                tcp_flag::SYN,
                Some(DropReason::ServiceBackendNotFound),
            ),
        );
        let text = scrape(&registry);
        for line in [
            format!(
                "hubble_flows_processed_total{{protocol=\"TCP\",type=\"Trace\",subtype=\"to-network\",verdict=\"FORWARDED\",{EMPTY}}} 2"
            ),
            format!(
                "hubble_flows_processed_total{{protocol=\"UDP\",type=\"Trace\",subtype=\"to-network\",verdict=\"FORWARDED\",{EMPTY}}} 1"
            ),
            format!(
                "hubble_flows_processed_total{{protocol=\"TCP\",type=\"Drop\",subtype=\"\",verdict=\"DROPPED\",{EMPTY}}} 1"
            ),
            format!(
                "hubble_drop_total{{reason=\"SERVICE_BACKEND_NOT_FOUND\",protocol=\"TCP\",{EMPTY}}} 1"
            ),
            format!("hubble_port_distribution_total{{protocol=\"TCP\",port=\"80\",{EMPTY}}} 1"),
            format!("hubble_port_distribution_total{{protocol=\"UDP\",port=\"80\",{EMPTY}}} 1"),
        ] {
            assert!(text.contains(&line), "missing {line} in:\n{text}");
        }
        // Flags come from the kernel's per-packet counters, never from records (which come
        // per connection).
        assert!(!text.contains("hubble_tcp_flags_total{"), "{text}");
    }

    #[test]
    fn icmp_is_counted_by_its_real_type_and_code() {
        let (mut metrics, registry) = Metrics::new();
        // Two pings (each a request and its answer), one unanswered, and a dropped
        // port-unreachable; an expired echo connection's last record is no packet.
        for _ in 0..2 {
            count(&mut metrics, &icmp_flow(flow_kind::NEW, 8, 0, None));
            count(&mut metrics, &icmp_flow(flow_kind::REPLY, 0, 0, None));
        }
        count(&mut metrics, &icmp_flow(flow_kind::NEW, 8, 0, None));
        count(
            &mut metrics,
            &icmp_flow(flow_kind::DROP, 3, 3, Some(DropReason::PolicyDeny)),
        );
        let text = scrape(&registry);
        for line in [
            format!("hubble_icmp_total{{family=\"IPv4\",type=\"EchoRequest\",{EMPTY}}} 3"),
            format!("hubble_icmp_total{{family=\"IPv4\",type=\"EchoReply\",{EMPTY}}} 2"),
            format!(
                "hubble_icmp_total{{family=\"IPv4\",type=\"DestinationUnreachable(Port)\",{EMPTY}}} 1"
            ),
        ] {
            assert!(text.contains(&line), "missing {line} in:\n{text}");
        }
    }

    #[test]
    fn icmpv6_is_counted_under_its_family_with_its_own_names() {
        let (mut metrics, registry) = Metrics::new();
        let flow = |kind, proto, icmp_type, code| {
            let mut event = decode::tests::event(kind, proto, ("fd00::2", 7), ("fd00::9", 0));
            event.icmp = decode::Icmp { icmp_type, code };
            event
        };
        count(
            &mut metrics,
            &flow(decode::Kind::New, IPPROTO_ICMPV6, 128, 0),
        );
        count(
            &mut metrics,
            &flow(decode::Kind::Reply, IPPROTO_ICMPV6, 129, 0),
        );
        count(
            &mut metrics,
            &flow(
                decode::Kind::Drop(DropReason::PolicyDeny),
                IPPROTO_ICMPV6,
                1,
                4,
            ),
        );
        // An ICMPv4 message of the same type numbers is another family's.
        count(&mut metrics, &flow(decode::Kind::New, IPPROTO_ICMP, 3, 3));
        count(&mut metrics, &flow(decode::Kind::New, IPPROTO_TCP, 0, 0));
        let text = scrape(&registry);
        for line in [
            format!("hubble_icmp_total{{family=\"IPv6\",type=\"EchoRequest\",{EMPTY}}} 1"),
            format!("hubble_icmp_total{{family=\"IPv6\",type=\"EchoReply\",{EMPTY}}} 1"),
            format!(
                "hubble_icmp_total{{family=\"IPv6\",type=\"DestinationUnreachable(PortUnreachable)\",{EMPTY}}} 1"
            ),
            format!(
                "hubble_icmp_total{{family=\"IPv4\",type=\"DestinationUnreachable(Port)\",{EMPTY}}} 1"
            ),
            format!(
                "hubble_flows_processed_total{{protocol=\"ICMPv6\",type=\"Trace\",subtype=\"to-network\",verdict=\"FORWARDED\",{EMPTY}}} 2"
            ),
            format!("hubble_drop_total{{reason=\"POLICY_DENY\",protocol=\"ICMPv6\",{EMPTY}}} 1"),
            format!("hubble_port_distribution_total{{protocol=\"TCP\",port=\"0\",{EMPTY}}} 1"),
        ] {
            assert!(text.contains(&line), "missing {line} in:\n{text}");
        }
    }

    #[test]
    fn tcp_flags_follow_the_kernels_per_packet_counters() {
        let (mut metrics, registry) = Metrics::new();
        // [SYN, SYN-ACK, FIN, RST] since the agent loaded the programs.
        metrics.kernel_tcp_flags(IpFamily::V4, &[0, 0, 0, 0]);
        assert!(!scrape(&registry).contains("hubble_tcp_flags_total{"));
        metrics.kernel_tcp_flags(IpFamily::V4, &[3, 2, 4, 0]);
        metrics.kernel_tcp_flags(IpFamily::V4, &[5, 2, 4, 1]);
        // The other family's packets, counted apart.
        metrics.kernel_tcp_flags(IpFamily::V6, &[7, 0, 0, 0]);
        let text = scrape(&registry);
        for line in [
            format!("hubble_tcp_flags_total{{flag=\"SYN\",family=\"IPv4\",{EMPTY}}} 5"),
            format!("hubble_tcp_flags_total{{flag=\"SYN-ACK\",family=\"IPv4\",{EMPTY}}} 2"),
            format!("hubble_tcp_flags_total{{flag=\"FIN\",family=\"IPv4\",{EMPTY}}} 4"),
            format!("hubble_tcp_flags_total{{flag=\"RST\",family=\"IPv4\",{EMPTY}}} 1"),
            format!("hubble_tcp_flags_total{{flag=\"SYN\",family=\"IPv6\",{EMPTY}}} 7"),
        ] {
            assert!(text.contains(&line), "missing {line} in:\n{text}");
        }
    }

    #[test]
    fn kernel_drops_without_records_count_as_unknown_one_refresh_later() {
        let (mut metrics, registry) = Metrics::new();
        // Before the agent: 100 drops, never counted.
        metrics.kernel_drops(&[(DropReason::PolicyDenied, 100)]);
        // Three more; one record arrives.
        let drop = flow(
            flow_kind::DROP,
            IPPROTO_TCP,
            tcp_flag::SYN,
            Some(DropReason::PolicyDenied),
        );
        count(&mut metrics, &drop);
        metrics.kernel_drops(&[(DropReason::PolicyDenied, 103)]);
        assert!(!scrape(&registry).contains("protocol=\"Unknown L4\""));
        // A second record arrives late; the third never does.
        count(&mut metrics, &drop);
        metrics.kernel_drops(&[(DropReason::PolicyDenied, 103)]);
        let text = scrape(&registry);
        assert!(
            text.contains("hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\",source_namespace=\"\",source_workload=\"\",destination_namespace=\"\",destination_workload=\"\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"Unknown L4\",source_namespace=\"\",source_workload=\"\",destination_namespace=\"\",destination_workload=\"\"} 1"),
            "{text}"
        );
        // Nothing new: nothing added.
        metrics.kernel_drops(&[(DropReason::PolicyDenied, 103)]);
        assert!(
            scrape(&registry).contains("hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"Unknown L4\",source_namespace=\"\",source_workload=\"\",destination_namespace=\"\",destination_workload=\"\"} 1")
        );
    }

    #[test]
    fn gauges_and_the_lost_counter_follow_the_kernel() {
        let (metrics, registry) = Metrics::new();
        metrics.flow_events_lost(5);
        metrics.flow_events_lost(7);
        metrics.conntrack(IpFamily::V4, 10, 262_144);
        metrics.conntrack(IpFamily::V6, 4, 131_072);
        metrics.map_fill("dp_ports_v2", 3, 65_536);
        metrics.programs_attached(4);
        metrics.reconciled(Duration::from_millis(3), true);
        metrics.reconciled(Duration::from_millis(3), false);
        let text = scrape(&registry);
        for line in [
            "dataplane_flow_events_lost_total 7",
            "hubble_lost_events_total{source=\"perf_event_ring_buffer\"} 7",
            "dataplane_conntrack_entries{family=\"IPv4\"} 10",
            "dataplane_conntrack_capacity{family=\"IPv4\"} 262144",
            "dataplane_conntrack_entries{family=\"IPv6\"} 4",
            "dataplane_conntrack_capacity{family=\"IPv6\"} 131072",
            "dataplane_map_entries{map=\"dp_ports_v2\"} 3",
            "dataplane_map_capacity{map=\"dp_ports_v2\"} 65536",
            "dataplane_programs_attached 4",
            "dataplane_reconcile_errors_total 1",
            "dataplane_reconcile_duration_seconds_count 2",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn http_answers_openmetrics_when_asked_and_refuses_the_rest() {
        let (_metrics, registry) = Metrics::new();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(registry)));
        // A plain HTTP/1.1 exchange, as a scraper does it.
        let get = |request: String| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await.unwrap();
            reply
        };
        let reply = get(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;\
             version=1.0.0\r\nConnection: close\r\n\r\n"
                .into(),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{reply}"
        );
        assert!(reply.ends_with("# EOF\n"), "{reply}");
        let reply =
            get("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await;
        assert!(reply.contains("text/plain; version=0.0.4"), "{reply}");
        assert!(reply.contains("dataplane_programs_attached 0"), "{reply}");
        let reply = get("GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await;
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        let reply = get(
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .into(),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
        assert_eq!(parse_listen("none"), Ok(Listen(None)));
        assert_eq!(
            parse_listen("127.0.0.1:9965"),
            Ok(Listen(Some("127.0.0.1:9965".parse().unwrap())))
        );
        assert!(parse_listen("localhost").is_err());
    }
}

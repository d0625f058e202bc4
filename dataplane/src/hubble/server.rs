//! observer.Observer, peer.Peer and grpc.health.v1.Health over tonic, on a Unix socket or TCP.

use std::{pin::Pin, sync::Arc};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{broadcast, mpsc},
};
use tokio_stream::{
    Stream,
    wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream},
};
use tonic::{Request, Response, Status};

use super::{
    Listen,
    api::{
        flow::{self, LostEvent, LostEventSource},
        observer::{
            self, GetFlowsRequest, GetFlowsResponse, GetNodesRequest, GetNodesResponse, Node,
            ServerStatusRequest, ServerStatusResponse,
            observer_server::{Observer, ObserverServer},
        },
        peer::{
            ChangeNotification, ChangeNotificationType, NotifyRequest,
            peer_server::{Peer, PeerServer},
        },
        relay::NodeState,
    },
    filter,
};
use crate::flows::{history::Stored, hub::Hub};

/// Responses a GetFlows client may have waiting; beyond, the server waits for it (history)
/// or it misses records, and is told how many (follow).
const STREAM_QUEUE: usize = 256;
/// What this server says it is (`hubble status`, `hubble list nodes`).
pub const VERSION: &str = concat!("dataplane ", env!("CARGO_PKG_VERSION"));

pub enum Incoming {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Binds `listen`; None when it is `none`. A Unix socket left by an agent that is gone is
/// replaced; one that answers is another agent's, and refused.
pub async fn bind(listen: &Listen) -> std::io::Result<Option<Incoming>> {
    match listen {
        Listen::Off => Ok(None),
        Listen::Tcp(addr) => Ok(Some(Incoming::Tcp(TcpListener::bind(addr).await?))),
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process serves this socket",
                ));
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            Ok(Some(Incoming::Unix(UnixListener::bind(path)?)))
        }
    }
}

/// Serves until the agent stops.
pub async fn serve(incoming: Incoming, hub: Arc<Hub>, advertise: String) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ObserverServer<Api>>().await;
    health.set_serving::<PeerServer<Api>>().await;
    // The name `hubble status` asks the health service about (Cilium's
    // pkg/hubble/api/v1.ObserverServiceName).
    health
        .set_service_status(
            "hubble.server.Observer",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let api = Api { hub, advertise };
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ObserverServer::new(api.clone()))
        .add_service(PeerServer::new(api));
    let result = match incoming {
        Incoming::Tcp(listener) => {
            router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        }
        Incoming::Unix(listener) => {
            router
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await
        }
    };
    if let Err(e) = result {
        log::error!("Hubble API: {e}; it stops");
    }
}

#[derive(Clone)]
pub struct Api {
    hub: Arc<Hub>,
    advertise: String,
}

/// A stored record as Hubble's response, decoded once from its Hubble JSON line.
pub fn response_of(stored: &Stored) -> Option<&GetFlowsResponse> {
    stored
        .proto
        .get_or_init(
            || match serde_json::from_str::<GetFlowsResponse>(stored.json()) {
                Ok(response) => Some(Box::new(response)),
                Err(e) => {
                    log::warn!("Hubble API: a record does not decode as a Hubble flow: {e}");
                    None
                }
            },
        )
        .as_deref()
}

fn flow_of(stored: &Stored) -> Option<&flow::Flow> {
    match response_of(stored)?.response_types.as_ref()? {
        observer::get_flows_response::ResponseTypes::Flow(flow) => Some(flow),
        _ => None,
    }
}

fn nanos(ts: &pbjson_types::Timestamp) -> i128 {
    i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos)
}

/// What one GetFlows request selects.
struct Selection {
    request: GetFlowsRequest,
}

impl Selection {
    fn new(request: GetFlowsRequest) -> Result<Selection, Status> {
        for f in request.whitelist.iter().chain(&request.blacklist) {
            filter::check(f).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        // A field mask asks for less of each flow; whole flows are what it would select
        // from, so they answer it too (the hubble CLI sends one for its compact output).
        Ok(Selection { request })
    }

    fn selects(&self, flow: &flow::Flow) -> bool {
        let time = flow.time.as_ref().map_or(0, nanos);
        self.request.since.as_ref().is_none_or(|s| time >= nanos(s))
            && self.request.until.as_ref().is_none_or(|u| time <= nanos(u))
            && filter::selects(&self.request.whitelist, &self.request.blacklist, flow)
    }

    /// How many history records: `number`, or with only a time window all of them in it.
    fn history_count(&self) -> usize {
        let r = &self.request;
        if r.number == 0 && (r.since.is_some() || r.until.is_some()) {
            usize::MAX
        } else {
            usize::try_from(r.number).unwrap_or(usize::MAX)
        }
    }

    /// Whether following should stop: past `until`.
    fn past_until(&self, flow: &flow::Flow) -> bool {
        match (&self.request.until, &flow.time) {
            (Some(until), Some(time)) => nanos(time) > nanos(until),
            _ => false,
        }
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;
type PeerStream = Pin<Box<dyn Stream<Item = Result<ChangeNotification, Status>> + Send>>;

fn lost(hub: &Hub, count: u64) -> GetFlowsResponse {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    GetFlowsResponse {
        response_types: Some(observer::get_flows_response::ResponseTypes::LostEvents(
            LostEvent {
                source: LostEventSource::HubbleRingBuffer as i32,
                num_events_lost: count,
                cpu: None,
                first: None,
                last: None,
            },
        )),
        node_name: hub.node_name().to_owned(),
        time: Some(pbjson_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
    }
}

async fn stream_flows(
    hub: Arc<Hub>,
    selection: Selection,
    tx: mpsc::Sender<Result<GetFlowsResponse, Status>>,
) {
    let selects = |stored: &Stored| flow_of(stored).is_some_and(|f| selection.selects(f));
    let (records, live) = hub.snapshot(
        |_| true,
        usize::MAX,
        selection.request.first,
        selection.request.follow,
    );
    // Filters are Hubble's, on the decoded flow; the history is walked from the end that
    // `first` asks for and cut at `number`.
    let wanted = selection.history_count();
    let mut chosen: Vec<&Arc<Stored>> = if selection.request.first {
        records.iter().filter(|s| selects(s)).take(wanted).collect()
    } else {
        let mut latest: Vec<&Arc<Stored>> = records
            .iter()
            .rev()
            .filter(|s| selects(s))
            .take(wanted)
            .collect();
        latest.reverse();
        latest
    };
    if !selection.request.follow && selection.request.number == 0 && wanted != usize::MAX {
        chosen.clear();
    }
    for stored in chosen {
        if let Some(response) = response_of(stored)
            && tx.send(Ok(response.clone())).await.is_err()
        {
            return;
        }
    }
    let Some(mut live) = live else {
        return;
    };
    loop {
        tokio::select! {
            () = tx.closed() => return,
            next = live.recv() => match next {
                Ok(stored) => {
                    let Some(flow) = flow_of(&stored) else { continue };
                    if selection.past_until(flow) {
                        return;
                    }
                    if selection.selects(flow)
                        && let Some(response) = response_of(&stored)
                        && tx.send(Ok(response.clone())).await.is_err()
                    {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(count)) => {
                    if tx.send(Ok(lost(&hub, count))).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

impl Api {
    fn node(&self) -> Node {
        Node {
            name: self.hub.node_name().to_owned(),
            version: VERSION.to_owned(),
            address: self.advertise.clone(),
            state: NodeState::NodeConnected as i32,
            tls: Some(observer::Tls {
                enabled: false,
                server_name: String::new(),
            }),
            uptime_ns: self.hub.uptime_ns(),
            num_flows: self.hub.len() as u64,
            max_flows: self.hub.capacity() as u64,
            seen_flows: self.hub.seen(),
        }
    }
}

#[tonic::async_trait]
impl Observer for Api {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let selection = Selection::new(request.into_inner())?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(stream_flows(self.hub.clone(), selection, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        Ok(Response::new(GetNodesResponse {
            nodes: vec![self.node()],
        }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let uptime_ns = self.hub.uptime_ns();
        let seen = self.hub.seen();
        Ok(Response::new(ServerStatusResponse {
            num_flows: self.hub.len() as u64,
            max_flows: self.hub.capacity() as u64,
            seen_flows: seen,
            uptime_ns,
            num_connected_nodes: Some(pbjson_types::UInt32Value { value: 1 }),
            num_unavailable_nodes: Some(pbjson_types::UInt32Value { value: 0 }),
            unavailable_nodes: Vec::new(),
            version: VERSION.to_owned(),
            flows_rate: seen as f64 / (uptime_ns.max(1) as f64 / 1e9),
        }))
    }
}

#[tonic::async_trait]
impl Peer for Api {
    type NotifyStream = PeerStream;

    /// This host is the one node: announced once, and the stream stays open (Relay takes a
    /// closed one as the peer service failing).
    async fn notify(
        &self,
        _request: Request<NotifyRequest>,
    ) -> Result<Response<PeerStream>, Status> {
        let added = ChangeNotification {
            name: self.hub.node_name().to_owned(),
            address: self.advertise.clone(),
            r#type: ChangeNotificationType::PeerAdded as i32,
            tls: None,
        };
        let stream =
            tokio_stream::StreamExt::chain(tokio_stream::once(Ok(added)), tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dataplane_common::{ct_origin, ct_rewrite, flow_kind};
    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::{
        flows::{
            clock::Clock,
            decode::{self, IPPROTO_TCP, IPPROTO_UDP, tests::raw_event},
            record::{self, Context, Identities},
        },
        hubble::api::{
            flow::{FlowFilter, Verdict},
            observer::{get_flows_response::ResponseTypes, observer_client::ObserverClient},
            peer::peer_client::PeerClient,
        },
    };

    fn stored(raw: &dataplane_common::FlowEvent) -> Arc<Stored> {
        let record = record::build(
            &decode::from_raw(raw).unwrap(),
            &Context {
                identities: &Identities::default(),
                clock: &Clock::with_offset(1_700_000_000_000_000_000),
                node_name: "node1",
                ifname: None,
            },
        );
        Arc::new(Stored::new(record))
    }

    fn tcp(sport: u16) -> Arc<Stored> {
        stored(&raw_event(
            flow_kind::NEW,
            IPPROTO_TCP,
            ("192.0.2.2", sport),
            ("192.0.2.9", 80),
        ))
    }

    fn dropped(sport: u16) -> Arc<Stored> {
        let mut raw = raw_event(
            flow_kind::DROP,
            IPPROTO_UDP,
            ("192.0.2.2", sport),
            ("192.0.2.9", 53),
        );
        raw.drop_reason = dataplane_common::DropReason::PolicyDeny as u8;
        raw.origin = ct_origin::PLAIN;
        raw.rewrite = ct_rewrite::NONE;
        stored(&raw)
    }

    fn sport(response: &GetFlowsResponse) -> u32 {
        let Some(ResponseTypes::Flow(flow)) = &response.response_types else {
            panic!("not a flow: {response:?}");
        };
        match flow.l4.as_ref().unwrap().protocol.as_ref().unwrap() {
            Protocol::Tcp(t) => t.source_port,
            Protocol::Udp(u) => u.source_port,
            other => panic!("{other:?}"),
        }
    }

    use crate::hubble::api::flow::layer4::Protocol;

    /// The server on a Unix socket, read with the generated client (tonic over the same
    /// socket): history with Hubble's filters, last N, follow, status, nodes, peers.
    #[tokio::test]
    async fn the_api_serves_history_filters_follow_status_nodes_and_peers() {
        let dir = std::env::temp_dir().join(format!("dp-hubble-test-{}", std::process::id()));
        let path = dir.join("hubble.sock");
        let hub = Arc::new(Hub::new(100, "node1".into()));
        for port in 1000..1005 {
            hub.push(tcp(port));
        }
        hub.push(dropped(2000));
        let incoming = bind(&Listen::Unix(path.clone())).await.unwrap().unwrap();
        tokio::spawn(serve(incoming, hub.clone(), "unix:///test".into()));
        // A second server on a live socket is refused, not silently replacing it.
        assert!(bind(&Listen::Unix(path.clone())).await.is_err());
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        let mut observer = ObserverClient::new(channel.clone());

        // The last 3, oldest first.
        let last3: Vec<u32> = observer
            .get_flows(GetFlowsRequest {
                number: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .map(|r| sport(&r.unwrap()))
            .collect()
            .await;
        assert_eq!(last3, vec![1003, 1004, 2000]);
        // Hubble's filters: verdict and port (whitelist), protocol (blacklist).
        let request = GetFlowsRequest {
            number: 100,
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Forwarded as i32],
                source_port: vec!["1001".into(), "1002".into()],
                ..Default::default()
            }],
            blacklist: vec![FlowFilter {
                source_port: vec!["1002".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let found: Vec<u32> = observer
            .get_flows(request)
            .await
            .unwrap()
            .into_inner()
            .map(|r| sport(&r.unwrap()))
            .collect()
            .await;
        assert_eq!(found, vec![1001]);
        let drops: Vec<GetFlowsResponse> = observer
            .get_flows(GetFlowsRequest {
                number: 100,
                whitelist: vec![FlowFilter {
                    drop_reason_desc: vec![flow::DropReason::PolicyDeny as i32],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(drops.len(), 1);
        assert_eq!(drops[0].node_name, "node1");
        // Follow: what comes after the request, filtered.
        let mut follow = observer
            .get_flows(GetFlowsRequest {
                follow: true,
                whitelist: vec![FlowFilter {
                    protocol: vec!["tcp".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The stream is open once the first response header came; give the task a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        hub.push(dropped(2001));
        hub.push(tcp(1100));
        let next = tokio::time::timeout(Duration::from_secs(10), follow.next())
            .await
            .expect("a followed flow")
            .unwrap()
            .unwrap();
        assert_eq!(sport(&next), 1100);

        let status = observer
            .server_status(ServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (status.num_flows, status.max_flows, status.seen_flows),
            (8, 100, 8)
        );
        let nodes = observer
            .get_nodes(GetNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, "node1");
        assert_eq!(nodes[0].state, NodeState::NodeConnected as i32);
        let mut peers = PeerClient::new(channel)
            .notify(NotifyRequest {})
            .await
            .unwrap()
            .into_inner();
        let added = peers.next().await.unwrap().unwrap();
        assert_eq!(
            (added.name.as_str(), added.address.as_str(), added.r#type),
            (
                "node1",
                "unix:///test",
                ChangeNotificationType::PeerAdded as i32
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Records of both families, served to the real `hubble` CLI (HUBBLE_BIN): it prints our
    /// IPv6 flows (`IP.ipVersion: IPv6`, `ICMPv6` l4) and its IPv6 filters (addresses,
    /// prefixes, `--ipv6`, `--protocol icmpv6`) reach them through our server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hubble_cli_reads_ipv6_flows_and_filters_them() {
        let Some(hubble) = std::env::var_os("HUBBLE_BIN") else {
            eprintln!("SKIPPED: HUBBLE_BIN is not set (the path of a `hubble` binary)");
            return;
        };
        let stored_event = |event: &decode::Event| {
            let record = record::build(
                event,
                &Context {
                    identities: &Identities::default(),
                    clock: &Clock::with_offset(1_700_000_000_000_000_000),
                    node_name: "node1",
                    ifname: None,
                },
            );
            Arc::new(Stored::new(record))
        };
        let mut records = vec![tcp(1000)];
        records.push(stored_event(&decode::tests::event(
            decode::Kind::New,
            IPPROTO_TCP,
            ("2001:db8::2", 41234),
            ("fd00:30:1::2", 80),
        )));
        let mut ping = decode::tests::event(
            decode::Kind::New,
            decode::IPPROTO_ICMPV6,
            ("fd00:30:1::9", 77),
            ("2001:db8:ffff::7", 0),
        );
        ping.icmp = decode::Icmp {
            icmp_type: 128,
            code: 0,
        };
        records.push(stored_event(&ping));
        records.push(stored_event(&decode::tests::event(
            decode::Kind::Drop(dataplane_common::DropReason::PolicyDenied),
            IPPROTO_UDP,
            ("fd00:30:1::9", 5000),
            ("fd00:30:1::2", 53),
        )));
        let hub = Arc::new(Hub::new(100, "node1".into()));
        for stored in &records {
            hub.push(stored.clone());
        }
        let dir = std::env::temp_dir().join(format!("dp-hubble6-test-{}", std::process::id()));
        let path = dir.join("hubble.sock");
        let incoming = bind(&Listen::Unix(path.clone())).await.unwrap().unwrap();
        tokio::spawn(serve(incoming, hub, "unix:///test".into()));
        let server = format!("unix://{}", path.display());
        let hubble_bin = hubble.clone();
        let observe = move |args: &[&str]| -> Vec<String> {
            let out = std::process::Command::new(&hubble)
                .args(["observe", "--server", &server, "--last", "100"])
                .args(args)
                .output()
                .expect("running hubble");
            assert!(
                out.status.success(),
                "hubble observe {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(Into::into)
                .collect()
        };
        let (json, by_filter, compact) = tokio::task::spawn_blocking(move || {
            let json = observe(&["-o", "json"]);
            let by_filter: Vec<(&str, usize)> = [
                ("--ipv6", observe(&["--ipv6"]).len()),
                ("-4", observe(&["-4"]).len()),
                ("--ip-version v6", observe(&["--ip-version", "v6"]).len()),
                (
                    "--from-ip prefix",
                    observe(&["--from-ip", "fd00:30:1::/64"]).len(),
                ),
                (
                    "--to-ip address",
                    observe(&["--to-ip", "fd00:30:1::2"]).len(),
                ),
                ("--ip", observe(&["--ip", "2001:db8::/32"]).len()),
                (
                    "--protocol icmpv6",
                    observe(&["--protocol", "icmpv6"]).len(),
                ),
                ("--protocol icmp", observe(&["--protocol", "icmp"]).len()),
                (
                    "--not --ipv6",
                    observe(&["--not", "--ip-version", "v6"]).len(),
                ),
            ]
            .into_iter()
            .collect();
            (json, by_filter, observe(&["-o", "compact"]))
        })
        .await
        .unwrap();
        assert_eq!(json.len(), 4, "{json:?}");
        let versions: Vec<String> = json
            .iter()
            .map(|line| {
                let response: GetFlowsResponse = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("hubble's JSON is no valid flow: {e}: {line}"));
                let Some(observer::get_flows_response::ResponseTypes::Flow(flow)) =
                    response.response_types
                else {
                    panic!("not a flow: {line}");
                };
                flow.ip.unwrap().ip_version().as_str_name().to_owned()
            })
            .collect();
        assert_eq!(versions, vec!["IPv4", "IPv6", "IPv6", "IPv6"]);
        assert!(
            json[2].contains(r#""ICMPv6":{"type":128}"#),
            "hubble's own JSON of the ping: {}",
            json[2]
        );
        assert_eq!(
            by_filter,
            vec![
                ("--ipv6", 3),
                ("-4", 1),
                ("--ip-version v6", 3),
                ("--from-ip prefix", 2),
                ("--to-ip address", 2),
                ("--ip", 2),
                ("--protocol icmpv6", 1),
                ("--protocol icmp", 1),
                ("--not --ipv6", 1),
            ]
        );
        // hubble writes an IPv6 end with its port as [address]:port, as our compact form:
        // `dataplane observe` prints hubble's lines.
        assert!(
            compact[1].contains("[2001:db8::2]:41234 (world) -> [fd00:30:1::2]:80 (world)"),
            "{compact:?}"
        );
        assert!(compact[2].contains("ICMPv6 EchoRequest"), "{compact:?}");
        let ours: Vec<String> = records
            .iter()
            .map(|s| crate::flows::record::compact(s.record()))
            .collect();
        assert_eq!(compact, ours);
        // hubble reads a flow log of them (`--flow-log`'s lines) as its own, without a warning.
        let log = dir.join("flows.json");
        let lines: String = records
            .iter()
            .map(|s| format!("{}\n", s.line(false)))
            .collect();
        std::fs::write(&log, lines).unwrap();
        let out = std::process::Command::new(&hubble_bin)
            .arg("observe")
            .arg("--input-file")
            .arg(&log)
            .args(["--ipv6", "-o", "json"])
            .output()
            .expect("running hubble");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.to_lowercase().contains("warn"), "{stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

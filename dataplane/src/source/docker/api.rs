//! The Docker Engine API through [`bollard`], on the engine's unix socket only (bollard is built
//! without TLS, SSH or TCP).
//!
//! What bollard does for us: the HTTP/1.1 client (hyper, on the agent's tokio runtime), the
//! typed models of the Engine API (`bollard::models`, generated from the engine's own API
//! description), error bodies turned into messages, and the `/events` stream decoded object by
//! object. What stays here:
//! - API version negotiation ([`choose_version`]): the engine's own version from `GET
//!   /version`, capped at the newest the agent's models know ([`NEWEST_API_VERSION`], bollard's)
//!   and refused below [`OLDEST_API_VERSION`] or below the engine's `MinAPIVersion` (Docker
//!   29.0-29.2 refuse anything below 1.44; dockerd 20.10 speaks 1.41). bollard 0.21 has a
//!   `negotiate_version` but sends no version in its request paths (so the engine answers in
//!   its newest version, whatever the client's models are); the client below puts the chosen
//!   `/vX.Y` in front of each path itself, unless a path already carries one.
//! - the narrow views of the engine's objects that [`super::convert`] reads (only the fields it
//!   uses, empty where the engine sent nothing), built from bollard's models.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use bollard::{
    Docker,
    errors::Error as BollardError,
    models,
    query_parameters::{
        EventsOptionsBuilder, InspectContainerOptions, InspectNetworkOptionsBuilder,
        ListContainersOptions, ListNodesOptions, ListServicesOptions,
    },
};
use futures_util::{Stream, StreamExt as _};

/// An Engine API version, major.minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    pub fn parse(text: &str) -> Option<ApiVersion> {
        let (major, minor) = text.trim().split_once('.')?;
        Some(ApiVersion(major.parse().ok()?, minor.parse().ok()?))
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// The newest version the agent's models describe: bollard's (its models are generated from
/// that version of the API). A newer engine is spoken to in this one.
pub const NEWEST_API_VERSION: ApiVersion = ApiVersion(
    bollard::API_DEFAULT_VERSION.major_version as u32,
    bollard::API_DEFAULT_VERSION.minor_version as u32,
);
/// Every field the agent reads exists since this version.
pub const OLDEST_API_VERSION: ApiVersion = ApiVersion(1, 24);
/// How long one request may take until the engine's answer starts (bollard's timeout; the
/// event stream's body is not limited by it).
const REQUEST_TIMEOUT_SECS: u64 = 15;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot connect to the Docker engine at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: BollardError,
    },
    #[error("{what}: {source}")]
    Api { what: String, source: BollardError },
    #[error(
        "the engine speaks API {engine} (at least {engine_min}); this agent speaks \
         {OLDEST_API_VERSION} to {NEWEST_API_VERSION}"
    )]
    Version { engine: String, engine_min: String },
}

impl DockerError {
    /// The engine does not know the object (e.g. a container removed meanwhile).
    pub fn is_not_found(&self) -> bool {
        self.status_code() == Some(404)
    }

    /// A swarm worker's answer to a manager's request (`/nodes`, `/services`, `/tasks`): HTTP
    /// 503 "This node is not a swarm manager..." (fixture `worker-services.json`).
    pub fn is_not_a_manager(&self) -> bool {
        self.status_code() == Some(503)
    }

    fn status_code(&self) -> Option<u16> {
        match self {
            DockerError::Api {
                source: BollardError::DockerResponseServerError { status_code, .. },
                ..
            } => Some(*status_code),
            _ => None,
        }
    }
}

fn api(what: impl Into<String>) -> impl FnOnce(BollardError) -> DockerError {
    let what = what.into();
    move |source| DockerError::Api { what, source }
}

/// The version to speak to an engine whose newest is `engine` and oldest `engine_min` (absent
/// before API 1.25): its own, capped at [`NEWEST_API_VERSION`].
pub fn choose_version(engine: &str, engine_min: Option<&str>) -> Result<ApiVersion, DockerError> {
    let refused = || DockerError::Version {
        engine: engine.to_owned(),
        engine_min: engine_min.unwrap_or("?").to_owned(),
    };
    let newest = ApiVersion::parse(engine).ok_or_else(refused)?;
    let chosen = newest.min(NEWEST_API_VERSION);
    let min = match engine_min {
        Some(text) => Some(ApiVersion::parse(text).ok_or_else(refused)?),
        None => None,
    };
    if chosen < OLDEST_API_VERSION || min.is_some_and(|min| chosen < min) {
        return Err(refused());
    }
    Ok(chosen)
}

/// Puts `/v{version}` in front of a request's path, unless it already has a version.
fn versioned(mut request: bollard::BollardRequest, version: ApiVersion) -> bollard::BollardRequest {
    let uri = request.uri().clone();
    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let has_version = path_and_query
        .strip_prefix("/v")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    if has_version {
        return request;
    }
    let mut parts = uri.into_parts();
    match format!("/v{version}{path_and_query}").parse() {
        Ok(new) => {
            parts.path_and_query = Some(new);
            if let Ok(new_uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = new_uri;
            }
        }
        Err(e) => log::warn!("docker: cannot version the path {path_and_query}: {e}"),
    }
    request
}

/// The engine's API on a unix socket, in the version settled by [`Client::connect`].
#[derive(Debug, Clone)]
pub struct Client {
    docker: Docker,
    socket: PathBuf,
    version: ApiVersion,
    /// The engine's own newest version, as it said.
    engine_version: String,
}

impl Client {
    /// Connects, asks the engine for its versions (`GET /version`, unversioned, which every
    /// engine answers) and settles the one to speak.
    pub async fn connect(socket: &Path) -> Result<Client, DockerError> {
        let connect_error = |source| DockerError::Connect {
            socket: socket.to_owned(),
            source,
        };
        let docker = Docker::connect_with_unix(
            &socket.to_string_lossy(),
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(connect_error)?;
        let answer = docker.version().await.map_err(connect_error)?;
        let engine_version = answer.api_version.unwrap_or_default();
        let version = choose_version(&engine_version, answer.min_api_version.as_deref())?;
        let docker = docker.with_request_modifier(move |request| versioned(request, version));
        Ok(Client {
            docker,
            socket: socket.to_owned(),
            version,
            engine_version,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The version spoken.
    pub fn version(&self) -> ApiVersion {
        self.version
    }

    /// The engine's newest version.
    pub fn engine_version(&self) -> &str {
        &self.engine_version
    }

    /// Running containers (`GET /containers/json`).
    pub async fn containers(&self) -> Result<Vec<ContainerSummary>, DockerError> {
        let list = self
            .docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .map_err(api("listing containers"))?;
        Ok(list.into_iter().map(ContainerSummary::from).collect())
    }

    pub async fn inspect_container(&self, id: &str) -> Result<ContainerInspect, DockerError> {
        self.docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map(ContainerInspect::from)
            .map_err(api(format!("inspecting container {id}")))
    }

    pub async fn networks(&self) -> Result<Vec<NetworkInspect>, DockerError> {
        let list = self
            .docker
            .list_networks(None)
            .await
            .map_err(api("listing networks"))?;
        Ok(list.into_iter().map(NetworkInspect::from).collect())
    }

    /// The engine's place in a swarm (`GET /info`); None when it is in none (or the engine
    /// says nothing of Swarm).
    pub async fn swarm_membership(&self) -> Result<Option<SwarmMembership>, DockerError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(api("reading the engine's info"))?;
        let Some(swarm) = info.swarm else {
            return Ok(None);
        };
        let state = swarm
            .local_node_state
            .map(|s| s.to_string())
            .unwrap_or_default();
        if state != "active" {
            return Ok(None);
        }
        Ok(Some(SwarmMembership {
            node_id: swarm.node_id.unwrap_or_default(),
            node_name: info.name.unwrap_or_default(),
            node_addr: swarm.node_addr.unwrap_or_default(),
            manager: swarm.control_available.unwrap_or_default(),
        }))
    }

    /// An overlay network with its services and their tasks on every node (`GET
    /// /networks/{id}?verbose=true`, which managers and workers both answer).
    pub async fn inspect_overlay(&self, id: &str) -> Result<OverlayInspect, DockerError> {
        let options = InspectNetworkOptionsBuilder::new().verbose(true).build();
        self.docker
            .inspect_network(id, Some(options))
            .await
            .map(OverlayInspect::from)
            .map_err(api(format!("inspecting network {id}")))
    }

    /// The swarm's nodes (`GET /nodes`); None on a worker (503).
    pub async fn swarm_nodes(&self) -> Result<Option<Vec<SwarmNodeInfo>>, DockerError> {
        match self.docker.list_nodes(None::<ListNodesOptions>).await {
            Ok(list) => Ok(Some(list.into_iter().map(SwarmNodeInfo::from).collect())),
            Err(e) => manager_only(e, "listing the swarm's nodes"),
        }
    }

    /// The swarm's services (`GET /services`); None on a worker (503).
    pub async fn swarm_services(&self) -> Result<Option<Vec<SwarmServiceInfo>>, DockerError> {
        match self.docker.list_services(None::<ListServicesOptions>).await {
            Ok(list) => Ok(Some(list.into_iter().map(SwarmServiceInfo::from).collect())),
            Err(e) => manager_only(e, "listing the swarm's services"),
        }
    }

    /// The event stream of containers and networks, from `since` on (the engine replays what
    /// it keeps of the past). Reading it is cancel-safe; the request is sent when it is first
    /// polled. It ends when the engine ends it (e.g. it is shutting down).
    pub fn events(
        &self,
        since: std::time::SystemTime,
    ) -> impl Stream<Item = Result<Event, DockerError>> + Unpin + use<> {
        // Services and nodes only come on a manager; a worker's stream has none of them.
        let filters = HashMap::from([("type", vec!["container", "network", "service", "node"])]);
        let since = since
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since = format!("{}.{:09}", since.as_secs(), since.subsec_nanos());
        let options = EventsOptionsBuilder::new()
            .since(&since)
            .filters(&filters)
            .build();
        self.docker
            .events(Some(options))
            .map(|item| item.map(Event::from).map_err(api("the event stream")))
    }
}

/// A manager-only request's error: None for a worker's 503, else the error.
fn manager_only<T>(e: BollardError, what: &str) -> Result<Option<T>, DockerError> {
    let e = api(what)(e);
    if e.is_not_a_manager() {
        Ok(None)
    } else {
        Err(e)
    }
}

// ---------------------------------------------------------------------------------------------
// The views convert reads: bollard's models without the Options (absent = empty).

fn map(m: Option<HashMap<String, String>>) -> BTreeMap<String, String> {
    m.unwrap_or_default().into_iter().collect()
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    /// "container", "network", ...
    pub kind: String,
    pub action: String,
    pub actor: Actor,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Actor {
    pub id: String,
    pub attributes: BTreeMap<String, String>,
}

impl From<models::EventMessage> for Event {
    fn from(m: models::EventMessage) -> Event {
        let actor = m.actor.unwrap_or_default();
        Event {
            kind: m.typ.map(|t| t.to_string()).unwrap_or_default(),
            action: m.action.unwrap_or_default(),
            actor: Actor {
                id: actor.id.unwrap_or_default(),
                attributes: map(actor.attributes),
            },
        }
    }
}

/// An entry of `GET /containers/json` (running containers).
#[derive(Debug, Clone, Default)]
pub struct ContainerSummary {
    pub id: String,
}

impl From<models::ContainerSummary> for ContainerSummary {
    fn from(m: models::ContainerSummary) -> ContainerSummary {
        ContainerSummary {
            id: m.id.unwrap_or_default(),
        }
    }
}

/// `GET /containers/{id}/json`.
#[derive(Debug, Clone, Default)]
pub struct ContainerInspect {
    /// With a leading '/'.
    pub name: String,
    pub state: ContainerState,
    pub config: ContainerConfig,
    pub host_config: HostConfig,
    pub network_settings: NetworkSettings,
}

impl From<models::ContainerInspectResponse> for ContainerInspect {
    fn from(m: models::ContainerInspectResponse) -> ContainerInspect {
        let state = m.state.unwrap_or_default();
        let config = m.config.unwrap_or_default();
        let settings = m.network_settings.unwrap_or_default();
        ContainerInspect {
            name: m.name.unwrap_or_default(),
            state: ContainerState {
                running: state.running.unwrap_or_default(),
                pid: state
                    .pid
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or_default(),
            },
            config: ContainerConfig {
                labels: map(config.labels),
                exposed_ports: config.exposed_ports.unwrap_or_default(),
            },
            host_config: HostConfig {
                network_mode: m
                    .host_config
                    .and_then(|h| h.network_mode)
                    .unwrap_or_default(),
            },
            network_settings: NetworkSettings {
                sandbox_key: settings.sandbox_key.unwrap_or_default(),
                ports: ports(settings.ports),
                networks: settings
                    .networks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, e)| (name, EndpointSettings::from(e)))
                    .collect(),
            },
        }
    }
}

/// `NetworkSettings.Ports` as convert reads it.
pub fn ports(m: Option<models::PortMap>) -> BTreeMap<String, Option<Vec<PortBinding>>> {
    m.unwrap_or_default()
        .into_iter()
        .map(|(key, bindings)| {
            let bindings = bindings.map(|list| {
                list.into_iter()
                    .map(|b| PortBinding {
                        host_ip: b.host_ip.unwrap_or_default(),
                        host_port: b.host_port.unwrap_or_default(),
                    })
                    .collect()
            });
            (key, bindings)
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct ContainerState {
    pub running: bool,
    pub pid: u32,
}

#[derive(Debug, Clone, Default)]
pub struct ContainerConfig {
    pub labels: BTreeMap<String, String>,
    /// "80/tcp", ...
    pub exposed_ports: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// "default" (the `bridge` network), a network name, "host", "none", "container:ID".
    pub network_mode: String,
}

#[derive(Debug, Clone, Default)]
pub struct NetworkSettings {
    /// The container's network namespace as a file (a bind mount under dockerd's exec-root).
    pub sandbox_key: String,
    /// "80/tcp" -> bindings; None for a port that is exposed but not published.
    pub ports: BTreeMap<String, Option<Vec<PortBinding>>>,
    /// By network name.
    pub networks: BTreeMap<String, EndpointSettings>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortBinding {
    /// "" or "0.0.0.0" for every address, "::" for every IPv6 address.
    pub host_ip: String,
    pub host_port: String,
}

#[derive(Debug, Clone, Default)]
pub struct EndpointSettings {
    pub network_id: String,
    pub ip_address: String,
    pub gateway: String,
    /// "" when the network has no IPv6 (`GlobalIPv6Address`, `IPv6Gateway`).
    pub global_ipv6_address: String,
    pub ipv6_gateway: String,
    pub mac_address: String,
}

impl From<models::EndpointSettings> for EndpointSettings {
    fn from(m: models::EndpointSettings) -> EndpointSettings {
        EndpointSettings {
            network_id: m.network_id.unwrap_or_default(),
            ip_address: m.ip_address.unwrap_or_default(),
            gateway: m.gateway.unwrap_or_default(),
            global_ipv6_address: m.global_ipv6_address.unwrap_or_default(),
            ipv6_gateway: m.ipv6_gateway.unwrap_or_default(),
            mac_address: m.mac_address.unwrap_or_default(),
        }
    }
}

/// An entry of `GET /networks`.
#[derive(Debug, Clone, Default)]
pub struct NetworkInspect {
    pub name: String,
    pub id: String,
    /// RFC 3339; orders networks by age.
    pub created: String,
    pub driver: String,
    pub internal: bool,
    pub config_only: bool,
    /// `docker network create --ipv6`.
    pub enable_ipv6: bool,
    pub ipam: Vec<IpamConfig>,
    pub options: BTreeMap<String, String>,
}

impl From<models::Network> for NetworkInspect {
    fn from(m: models::Network) -> NetworkInspect {
        NetworkInspect {
            name: m.name.unwrap_or_default(),
            id: m.id.unwrap_or_default(),
            created: m.created.unwrap_or_default(),
            driver: m.driver.unwrap_or_default(),
            internal: m.internal.unwrap_or_default(),
            config_only: m.config_only.unwrap_or_default(),
            enable_ipv6: m.enable_ipv6.unwrap_or_default(),
            ipam: m
                .ipam
                .and_then(|i| i.config)
                .unwrap_or_default()
                .into_iter()
                .map(|c| IpamConfig {
                    subnet: c.subnet.unwrap_or_default(),
                    gateway: c.gateway.unwrap_or_default(),
                })
                .collect(),
            options: map(m.options),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct IpamConfig {
    pub subnet: String,
    pub gateway: String,
}

// ---------------------------------------------------------------------------------------------
// The views the Swarm view (super::swarm) reads.

/// `GET /info`'s `Swarm`, of an engine in a swarm.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwarmMembership {
    pub node_id: String,
    /// The engine's `Name`: its hostname, which is its node name.
    pub node_name: String,
    /// The node's address in the swarm (its advertise address).
    pub node_addr: String,
    /// `ControlAvailable`: a manager, which answers `/nodes`, `/services` and `/tasks`.
    pub manager: bool,
}

/// `GET /networks/{id}?verbose=true` of a swarm-scope network.
#[derive(Debug, Clone, Default)]
pub struct OverlayInspect {
    pub name: String,
    pub id: String,
    /// The routing mesh's network (`ingress`).
    pub ingress: bool,
    pub subnets: Vec<String>,
    pub options: BTreeMap<String, String>,
    /// By service name; "" gathers what is no service's (the nodes' `ingress-endpoint`s,
    /// containers attached by hand).
    pub services: BTreeMap<String, OverlayService>,
}

/// A service's entry in a verbose network listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlayService {
    /// Its VIP on this network; `<nil>` for a dnsrr service.
    pub vip: String,
    /// Only on `ingress`: "Target: 80, Publish: 8080".
    pub ports: Vec<String>,
    pub tasks: Vec<OverlayTask>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlayTask {
    /// `SERVICE.SLOT.TASKID` (`SERVICE.NODEID.TASKID` for a global service).
    pub name: String,
    /// The task's address on this network.
    pub endpoint_ip: String,
    /// `Info["Host IP"]`: the address of the task's node.
    pub host_ip: String,
}

impl From<models::NetworkInspect> for OverlayInspect {
    fn from(m: models::NetworkInspect) -> OverlayInspect {
        let services = m
            .services
            .unwrap_or_default()
            .into_iter()
            .map(|(name, value)| {
                // bollard leaves the entries as JSON; a malformed one is an empty service.
                let info: models::ServiceInfo = serde_json::from_value(value).unwrap_or_default();
                let tasks = info
                    .tasks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| OverlayTask {
                        name: t.name.unwrap_or_default(),
                        endpoint_ip: t.endpoint_ip.unwrap_or_default(),
                        host_ip: t
                            .info
                            .unwrap_or_default()
                            .remove("Host IP")
                            .unwrap_or_default(),
                    })
                    .collect();
                let service = OverlayService {
                    vip: info.vip.unwrap_or_default(),
                    ports: info.ports.unwrap_or_default(),
                    tasks,
                };
                (name, service)
            })
            .collect();
        OverlayInspect {
            name: m.name.unwrap_or_default(),
            id: m.id.unwrap_or_default(),
            ingress: m.ingress.unwrap_or_default(),
            subnets: m
                .ipam
                .and_then(|i| i.config)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.subnet)
                .collect(),
            options: map(m.options),
            services,
        }
    }
}

/// An entry of a manager's `GET /nodes`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwarmNodeInfo {
    pub id: String,
    pub hostname: String,
    pub addr: String,
    /// "manager" or "worker".
    pub role: String,
    /// "active", "pause" or "drain".
    pub availability: String,
    /// "ready", "down", "disconnected" or "unknown".
    pub state: String,
    pub leader: bool,
}

impl From<models::Node> for SwarmNodeInfo {
    fn from(m: models::Node) -> SwarmNodeInfo {
        let spec = m.spec.unwrap_or_default();
        let status = m.status.unwrap_or_default();
        SwarmNodeInfo {
            id: m.id.unwrap_or_default(),
            hostname: m.description.and_then(|d| d.hostname).unwrap_or_default(),
            addr: status.addr.unwrap_or_default(),
            role: spec.role.map(|r| r.to_string()).unwrap_or_default(),
            availability: spec.availability.map(|a| a.to_string()).unwrap_or_default(),
            state: status.state.map(|s| s.to_string()).unwrap_or_default(),
            leader: m.manager_status.and_then(|s| s.leader).unwrap_or_default(),
        }
    }
}

/// An entry of a manager's `GET /services`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwarmServiceInfo {
    pub id: String,
    pub name: String,
    /// "vip" (the default when the spec says nothing) or "dnsrr".
    pub endpoint_mode: String,
    /// Replicas of a replicated service; None for a global one (or a job).
    pub replicas: Option<u64>,
    pub ports: Vec<ServicePort>,
    /// (network id, address with prefix length) of each VIP.
    pub vips: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePort {
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    pub target: u16,
    pub published: u16,
    /// "ingress" (the routing mesh) or "host".
    pub publish_mode: String,
}

impl From<models::Service> for SwarmServiceInfo {
    fn from(m: models::Service) -> SwarmServiceInfo {
        let spec = m.spec.unwrap_or_default();
        let endpoint = m.endpoint.unwrap_or_default();
        let endpoint_mode = spec
            .endpoint_spec
            .and_then(|e| e.mode)
            .map(|mode| mode.to_string())
            .filter(|mode| !mode.is_empty())
            .unwrap_or_else(|| "vip".to_owned());
        SwarmServiceInfo {
            id: m.id.unwrap_or_default(),
            name: spec.name.unwrap_or_default(),
            endpoint_mode,
            replicas: spec
                .mode
                .and_then(|mode| mode.replicated)
                .and_then(|r| r.replicas)
                .and_then(|n| u64::try_from(n).ok()),
            ports: endpoint
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| ServicePort {
                    protocol: p
                        .protocol
                        .map(|p| p.to_string())
                        .filter(|p| !p.is_empty())
                        .unwrap_or_else(|| "tcp".to_owned()),
                    target: p
                        .target_port
                        .and_then(|n| u16::try_from(n).ok())
                        .unwrap_or(0),
                    published: p
                        .published_port
                        .and_then(|n| u16::try_from(n).ok())
                        .unwrap_or(0),
                    publish_mode: p
                        .publish_mode
                        .map(|m| m.to_string())
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| "ingress".to_owned()),
                })
                .collect(),
            vips: endpoint
                .virtual_ips
                .unwrap_or_default()
                .into_iter()
                .map(|v| (v.network_id.unwrap_or_default(), v.addr.unwrap_or_default()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_chosen() {
        let v = |t: &str| ApiVersion::parse(t).unwrap();
        // dockerd 20.10: its own 1.41.
        assert_eq!(choose_version("1.41", Some("1.12")).unwrap(), v("1.41"));
        // Docker 29.0-29.2: newest 1.51/1.52, oldest 1.44: its own, never below 1.44.
        assert_eq!(choose_version("1.52", Some("1.44")).unwrap(), v("1.52"));
        // Newer than the agent knows: the agent's newest, if the engine still speaks it.
        assert_eq!(
            choose_version("1.99", Some("1.44")).unwrap(),
            NEWEST_API_VERSION
        );
        assert!(choose_version("1.99", Some("1.90")).is_err());
        // Older than every field the agent reads, or no version at all.
        assert!(choose_version("1.23", None).is_err());
        assert!(choose_version("", None).is_err());
        assert!(choose_version("1.41", Some("x")).is_err());
        assert_eq!(NEWEST_API_VERSION.to_string(), "1.53");
    }

    #[test]
    fn paths_get_the_version_once() {
        let request = |uri: &str| {
            let mut r = bollard::BollardRequest::new(http_body_util::Either::Left(
                http_body_util::Full::new(bytes::Bytes::new()),
            ));
            *r.uri_mut() = uri.parse().unwrap();
            r
        };
        let v = ApiVersion(1, 41);
        let out = versioned(request("unix://2f72756e/containers/json?all=false"), v);
        assert_eq!(
            out.uri().to_string(),
            "unix://2f72756e/v1.41/containers/json?all=false"
        );
        let again = versioned(out, ApiVersion(1, 44));
        assert_eq!(
            again.uri().to_string(),
            "unix://2f72756e/v1.41/containers/json?all=false"
        );
        let out = versioned(request("unix://2f72756e/version"), v);
        assert_eq!(out.uri().path(), "/v1.41/version");
    }

    /// A stand-in engine on a unix socket, speaking API `min` to `max` the way dockerd does:
    /// `GET /version` (versioned or not) tells its versions, a versioned path outside
    /// [min, max] is refused with 400, the lists are empty. Returns the socket and the paths
    /// it was asked for.
    async fn fake_engine(
        name: &str,
        max: &'static str,
        min: &'static str,
    ) -> (PathBuf, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
        let dir = std::env::temp_dir().join(format!("dataplane-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).await.unwrap() == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    log.lock().unwrap().push(path.clone());
                    let (max_v, min_v) = (ApiVersion::parse(max), ApiVersion::parse(min));
                    let asked_version = path
                        .strip_prefix("/v")
                        .and_then(|rest| ApiVersion::parse(rest.split('/').next()?));
                    let route = match asked_version {
                        Some(_) => path.splitn(3, '/').nth(2).map(|r| format!("/{r}")),
                        None => Some(path.clone()),
                    }
                    .unwrap_or_default();
                    let (status, body) = match asked_version {
                        Some(v) if Some(v) < min_v => (
                            "400 Bad Request",
                            format!(
                                r#"{{"message":"client version {v} is too old. Minimum supported API version is {min}, please upgrade your client to a newer version"}}"#
                            ),
                        ),
                        Some(v) if Some(v) > max_v => (
                            "400 Bad Request",
                            format!(
                                r#"{{"message":"client version {v} is too new. Maximum supported API version is {max}"}}"#
                            ),
                        ),
                        _ if route == "/version" => (
                            "200 OK",
                            format!(
                                r#"{{"Version":"fake","ApiVersion":"{max}","MinAPIVersion":"{min}","Os":"linux"}}"#
                            ),
                        ),
                        _ if route.starts_with("/containers/json") || route == "/networks" => {
                            ("200 OK", "[]".to_owned())
                        }
                        _ => (
                            "404 Not Found",
                            r#"{"message":"page not found"}"#.to_owned(),
                        ),
                    };
                    let mut stream = reader.into_inner();
                    let response = format!(
                        "HTTP/1.1 {status}\r\nApi-Version: {max}\r\nContent-Type: \
                         application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (socket, asked)
    }

    /// Connects to a fake engine and lists its containers and networks; the paths asked.
    async fn talk_to(
        name: &str,
        max: &'static str,
        min: &'static str,
    ) -> (ApiVersion, Vec<String>) {
        let (socket, asked) = fake_engine(name, max, min).await;
        let client = Client::connect(&socket).await.unwrap();
        client.containers().await.unwrap();
        client.networks().await.unwrap();
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
        let paths = asked.lock().unwrap().clone();
        (client.version(), paths)
    }

    #[tokio::test]
    async fn negotiates_with_a_1_41_engine() {
        let (version, paths) = talk_to("api-1.41", "1.41", "1.12").await;
        assert_eq!(version, ApiVersion(1, 41));
        assert_eq!(
            paths,
            ["/version", "/v1.41/containers/json", "/v1.41/networks"]
        );
    }

    #[tokio::test]
    async fn negotiates_with_an_engine_whose_minimum_is_1_44() {
        // Docker 29.0-29.2: refuses /v1.41 (the version the agent used to pin).
        let (version, paths) = talk_to("api-1.52", "1.52", "1.44").await;
        assert_eq!(version, ApiVersion(1, 52));
        assert_eq!(
            paths,
            ["/version", "/v1.52/containers/json", "/v1.52/networks"]
        );
        // Newer than the agent: its newest.
        let (version, paths) = talk_to("api-1.99", "1.99", "1.44").await;
        assert_eq!(version, NEWEST_API_VERSION);
        assert_eq!(paths[1], format!("/v{NEWEST_API_VERSION}/containers/json"));
    }

    #[tokio::test]
    async fn refuses_an_engine_it_cannot_speak_to() {
        let (socket, _) = fake_engine("api-1.99-min", "1.99", "1.90").await;
        let err = Client::connect(&socket).await.unwrap_err();
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
        assert!(matches!(err, DockerError::Version { .. }), "{err}");
        assert!(err.to_string().contains("at least 1.90"), "{err}");
    }
}

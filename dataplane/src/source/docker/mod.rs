//! The Docker source (`dataplane agent --docker [SOCKET]`): follows a Docker engine through its
//! API and turns what it reports into the one [`Model`] (docs/DESIGN.md section 2). It only
//! produces models; the agent applies them like edits of a state file, so the reconciler stays
//! the only writer of maps.
//!
//! How it follows the engine:
//! 0. ask the engine its API versions and settle the one to speak (see [`api`]);
//! 1. open the event stream (containers and networks) from a second before step 2, so nothing
//!    that happens during step 2 is missed;
//! 2. full sync: list networks and running containers, inspect each container and find the
//!    host-side end of each of its interfaces (see [`links`]);
//! 3. on each relevant event (container start, die, destroy, rename; network create, destroy,
//!    connect, disconnect) mark what changed and re-read only that, publishing a new model if
//!    it differs: the first event after a quiet spell at once (with the events already
//!    queued), the ones that follow within 100 ms gathered into one re-read at its end, except
//!    a container start, which is never kept waiting (a new container's ports are applied as
//!    soon as the engine says it started);
//! 4. when the stream is lost (dockerd stopped or restarted), reconnect with backoff (100 ms
//!    doubling to 5 s) and start again at step 1. Meanwhile the last model stays in force.
//!
//! The mapping from engine objects to the state file is in [`convert`].
//!
//! Beside the model it keeps the Swarm view ([`swarm`]) of a node in a swarm: re-read after
//! the full sync, after each batch of events that may change it, and every [`SWARM_REFRESH`];
//! when the engine errs or cannot be reached, the last view stays, marked with the error.

mod api;
mod convert;
mod links;
mod swarm;

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::{FutureExt as _, StreamExt as _};
use tokio::{sync::watch, time::Instant};

use crate::model::{Cidr, Model, StateFile};
use api::{Client, DockerError, Event};
pub use api::{ServicePort, SwarmMembership, SwarmNodeInfo, SwarmServiceInfo};
use convert::{Container, Inputs, VipAllocator};
pub use swarm::{MeshPort, Overlay, OverlayServiceView, SwarmView, TaskView};

pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_SERVICE_VIP_RANGE: &str = "10.96.0.0/16";
/// Events are gathered this long after the first one before the engine is re-read, so that a
/// `docker compose up` of many containers makes one new model, not one per event.
const DEBOUNCE: Duration = Duration::from_millis(100);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the Swarm view is re-read besides on events. A worker's engine sends no event
/// when a task on another node starts, stops or moves, while its network listing follows
/// within the gossip's delay (about a second, measured after scaling and draining): every
/// 2 s shows such a change within a few seconds, for one `/info`, one `/networks` and one
/// verbose inspect per overlay (and `/nodes`, `/services` on a manager) per period, a few
/// milliseconds on the engine's unix socket. Not in a swarm it is one `/info`.
pub const SWARM_REFRESH: Duration = Duration::from_secs(2);
/// How long the agent waits at start for the engine's state before it applies an empty one.
pub const FIRST_SYNC_WAIT: Duration = Duration::from_secs(10);

/// Command-line options of the Docker source (flattened into `dataplane agent`).
#[derive(clap::Args, Debug, Clone)]
pub struct DockerArgs {
    /// Follow a Docker engine on this socket instead of a state file: its networks, running
    /// containers, published ports and Compose services become the desired state
    /// [default when given without a value: /var/run/docker.sock].
    #[arg(
        long,
        value_name = "SOCKET",
        num_args = 0..=1,
        default_missing_value = DEFAULT_DOCKER_SOCKET,
        conflicts_with = "state"
    )]
    pub docker: Option<PathBuf>,
    /// With --docker: the range VIPs of Compose services (and of containers labelled
    /// `dataplane.service=NAME`) are taken from.
    #[arg(long, value_name = "CIDR", default_value = DEFAULT_SERVICE_VIP_RANGE, value_parser = Cidr::parse)]
    pub service_vip_range: Cidr,
}

/// The agent's end of the Docker source: new models as the engine changes. Without --docker
/// it never yields one.
pub struct Source {
    models: Option<watch::Receiver<Option<Published>>>,
    swarm: SwarmFeed,
}

/// The latest Swarm view, for whoever shows it (the agent's status); a clone reads the same.
#[derive(Clone, Default)]
pub struct SwarmFeed(Option<watch::Receiver<Option<SwarmView>>>);

impl SwarmFeed {
    /// The view now: None without --docker or when the node is in no swarm.
    pub fn current(&self) -> Option<SwarmView> {
        self.0.as_ref().and_then(|rx| rx.borrow().clone())
    }
}

/// A model the engine's state makes, with what the source noticed while making it (an entry
/// left out, a VIP range moved): the agent shows these in `dataplane status`.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub model: Model,
    pub notes: Vec<String>,
}

impl Source {
    /// Starts following the engine when --docker was given (on the current tokio runtime).
    pub fn start(args: &DockerArgs) -> Source {
        let Some(socket) = &args.docker else {
            return Source {
                models: None,
                swarm: SwarmFeed::default(),
            };
        };
        let (tx, rx) = watch::channel(None);
        let (swarm_tx, swarm_rx) = watch::channel(None);
        log::info!(
            "following the Docker engine at {}; service VIPs from {}",
            socket.display(),
            args.service_vip_range
        );
        tokio::spawn(follow(
            socket.clone(),
            VipAllocator::new(args.service_vip_range),
            tx,
            swarm_tx,
        ));
        Source {
            models: Some(rx),
            swarm: SwarmFeed(Some(swarm_rx)),
        }
    }

    /// The Swarm view as it is read.
    pub fn swarm(&self) -> SwarmFeed {
        self.swarm.clone()
    }

    /// The engine's state once it has been read, waiting at most `limit`; an empty model
    /// without --docker or when the engine did not answer in time (the first model that comes
    /// later is then delivered by [`Source::next_model`]).
    pub async fn first_model(&mut self, limit: Duration) -> Published {
        let Some(rx) = &mut self.models else {
            return Published::default();
        };
        let first = tokio::time::timeout(limit, async {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                if let Some(model) = rx.borrow_and_update().clone() {
                    return Some(model);
                }
            }
        })
        .await;
        match first {
            Ok(Some(model)) => model,
            _ => {
                log::warn!(
                    "the Docker engine's state was not read within {limit:?}; starting with an \
                     empty state and applying the engine's when it answers"
                );
                Published::default()
            }
        }
    }

    /// The next model the engine's state makes; pends forever without --docker.
    pub async fn next_model(&mut self) -> Published {
        if let Some(rx) = &mut self.models {
            while rx.changed().await.is_ok() {
                if let Some(model) = rx.borrow_and_update().clone() {
                    return model;
                }
            }
            // The follower ended (it never does on its own): nothing more will come.
            self.models = None;
        }
        std::future::pending().await
    }
}

/// What the source knows of the engine, kept across event batches and reconnects.
struct Engine {
    networks: Vec<api::NetworkInspect>,
    /// Running containers by id.
    containers: BTreeMap<String, Container>,
    vips: VipAllocator,
    /// The last state file published, to publish only changes.
    published: Option<StateFile>,
    /// Notes of the last build, to log each only when it first appears.
    notes: BTreeSet<String>,
    /// Full syncs done.
    syncs: u64,
    /// The last Swarm view read well: its overlays' service VIPs are in the model.
    swarm: Option<SwarmView>,
}

/// What a batch of events asks to re-read.
#[derive(Debug, Default, PartialEq)]
struct Dirty {
    networks: bool,
    containers: BTreeSet<String>,
    /// The Swarm view: a local task or network changed, or (on a manager) a service or node.
    swarm: bool,
}

impl Dirty {
    /// Notes what `event` changes; false when it changes nothing the model is made of.
    fn note(&mut self, event: &Event) -> bool {
        match (event.kind.as_str(), event.action.as_str()) {
            (
                "container",
                "start" | "die" | "destroy" | "rename" | "restart" | "pause" | "unpause",
            ) => {
                if event.actor.id.is_empty() {
                    return false;
                }
                self.containers.insert(event.actor.id.clone());
                self.swarm = true;
                true
            }
            ("network", "create" | "destroy" | "remove") => {
                self.networks = true;
                self.swarm = true;
                true
            }
            ("service" | "node", _) => {
                self.swarm = true;
                true
            }
            ("network", "connect" | "disconnect") => {
                self.networks = true;
                self.swarm = true;
                if let Some(container) = event.actor.attributes.get("container") {
                    self.containers.insert(container.clone());
                }
                true
            }
            _ => false,
        }
    }
}

async fn follow(
    socket: PathBuf,
    vips: VipAllocator,
    tx: watch::Sender<Option<Published>>,
    swarm: watch::Sender<Option<SwarmView>>,
) {
    let mut engine = Engine {
        networks: Vec::new(),
        containers: BTreeMap::new(),
        vips,
        published: None,
        notes: BTreeSet::new(),
        syncs: 0,
        swarm: None,
    };
    let mut backoff = RECONNECT_MIN;
    let mut last_error = String::new();
    loop {
        let syncs_before = engine.syncs;
        let error = session(&socket, &mut engine, &tx, &swarm).await;
        if engine.syncs > syncs_before {
            // It had been working: the first retry comes quickly again, and the same error
            // as before the last success is news again.
            backoff = RECONNECT_MIN;
            last_error.clear();
        }
        let message = error.to_string();
        swarm_stale(&swarm, &message);
        if message != last_error {
            log::warn!(
                "docker: {message}; retrying (backoff {RECONNECT_MIN:?} doubling to \
                 {RECONNECT_MAX:?}), the last state stays in force meanwhile"
            );
            last_error = message;
        } else {
            log::debug!("docker: {message}; retrying in {backoff:?}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Why a session with the engine ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("the engine ended the event stream (stopped or restarting?)")]
    StreamEnded,
}

/// One connection's worth of following: stream, full sync, then event batches until the
/// stream is lost; returns why it ended.
async fn session(
    socket: &Path,
    engine: &mut Engine,
    tx: &watch::Sender<Option<Published>>,
    swarm: &watch::Sender<Option<SwarmView>>,
) -> SessionEnd {
    let Err(end) = session_inner(socket, engine, tx, swarm).await;
    end
}

/// Events that make a container serve: handled at once even inside a gather window, since
/// until then a connection to its published port reaches dockerd's placeholder socket.
fn starts_serving(event: &Event) -> bool {
    event.kind == "container" && matches!(event.action.as_str(), "start" | "restart" | "unpause")
}

async fn session_inner(
    socket: &Path,
    engine: &mut Engine,
    tx: &watch::Sender<Option<Published>>,
    swarm: &watch::Sender<Option<SwarmView>>,
) -> Result<Infallible, SessionEnd> {
    let client = Client::connect(socket).await?;
    // The stream asks for events since a second before the full sync: the engine replays what
    // it keeps of the recent past, so nothing that happens during the sync is missed however
    // late the stream's request reaches it (the engine runs on this host's clock). Events the
    // sync already saw only cause a re-read.
    let mut events = client.events(std::time::SystemTime::now() - Duration::from_secs(1));

    let started = std::time::Instant::now();
    full_sync(&client, engine).await?;
    engine.syncs += 1;
    log::info!(
        "docker: engine at {} (API {}, speaking {}) read in {:?}: {} networks, {} running \
         containers",
        client.socket().display(),
        client.engine_version(),
        client.version(),
        started.elapsed(),
        engine.networks.len(),
        engine.containers.len()
    );
    publish(engine, tx);
    follow_swarm(&client, engine, tx, swarm).await;
    let mut swarm_tick = tokio::time::interval_at(Instant::now() + SWARM_REFRESH, SWARM_REFRESH);
    swarm_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // The first event after a quiet spell is handled at once, with whatever else is already
    // queued; the events that follow within DEBOUNCE of that re-read are gathered into one
    // more. A container that starts serving is never kept waiting (see starts_serving).
    let mut dirty = Dirty::default();
    let mut deadline: Option<Instant> = None;
    let mut quiet_after = Instant::now();
    loop {
        let now_due = tokio::select! {
            item = events.next() => {
                let event = next_event(item)?;
                if !dirty.note(&event) {
                    continue;
                }
                log::debug!("docker: {} {} {}", event.kind, event.action, event.actor.id);
                if starts_serving(&event) || Instant::now() >= quiet_after {
                    true
                } else {
                    deadline.get_or_insert(quiet_after);
                    false
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => true,
            _ = swarm_tick.tick() => {
                follow_swarm(&client, engine, tx, swarm).await;
                continue;
            }
        };
        if now_due {
            // Whatever is queued already joins this re-read.
            while let Some(item) = events.next().now_or_never() {
                dirty.note(&next_event(item)?);
            }
            deadline = None;
            let dirty = std::mem::take(&mut dirty);
            let swarm_dirty = dirty.swarm;
            refresh(&client, engine, dirty).await?;
            publish(engine, tx);
            if swarm_dirty {
                follow_swarm(&client, engine, tx, swarm).await;
            }
            quiet_after = Instant::now() + DEBOUNCE;
        }
    }
}

fn next_event(item: Option<Result<Event, DockerError>>) -> Result<Event, SessionEnd> {
    match item {
        Some(Ok(event)) => Ok(event),
        Some(Err(e)) => Err(e.into()),
        None => Err(SessionEnd::StreamEnded),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads the Swarm view, hands it on, and publishes a model with its service VIPs when they
/// changed. On an error the last view stays (in the model too), marked with it.
async fn follow_swarm(
    client: &Client,
    engine: &mut Engine,
    tx: &watch::Sender<Option<Published>>,
    swarm: &watch::Sender<Option<SwarmView>>,
) {
    read_swarm(client, swarm).await;
    let view = swarm.borrow();
    if view.as_ref().is_none_or(|v| v.error.is_none())
        && overlays_of(&engine.swarm) != overlays_of(&view)
    {
        engine.swarm = view.clone();
        drop(view);
        publish(engine, tx);
    }
}

fn overlays_of(view: &Option<SwarmView>) -> Option<&Vec<Overlay>> {
    view.as_ref().map(|v| &v.networks)
}

/// Reads the Swarm view and hands it on; on an error the last view stays, marked with it.
async fn read_swarm(client: &Client, tx: &watch::Sender<Option<SwarmView>>) {
    match swarm_view(client).await {
        Ok(view) => {
            let unchanged = {
                let current = tx.borrow();
                match (current.as_ref(), view.as_ref()) {
                    (Some(a), Some(b)) => {
                        SwarmView {
                            read_unix: b.read_unix,
                            error: None,
                            ..a.clone()
                        } == *b
                    }
                    (None, None) => true,
                    _ => false,
                }
            };
            if !unchanged {
                log::info!("docker: {}", swarm_summary(view.as_ref()));
            }
            tx.send_replace(view);
        }
        Err(e) => swarm_stale(tx, &e.to_string()),
    }
}

/// Marks the view in hand as the last good one: the engine could not say more (`error`).
fn swarm_stale(tx: &watch::Sender<Option<SwarmView>>, error: &str) {
    tx.send_if_modified(|view| match view {
        Some(view) if view.error.as_deref() != Some(error) => {
            log::warn!("docker: the Swarm view could not be read ({error}); keeping the last");
            view.error = Some(error.to_owned());
            true
        }
        _ => false,
    });
}

/// The swarm as this node's engine says: None when the node is in none.
async fn swarm_view(client: &Client) -> Result<Option<SwarmView>, DockerError> {
    let Some(node) = client.swarm_membership().await? else {
        return Ok(None);
    };
    let mut overlays = Vec::new();
    for network in client.networks().await? {
        if network.driver != "overlay" {
            continue;
        }
        match client.inspect_overlay(&network.id).await {
            Ok(overlay) => overlays.push(overlay),
            // Removed since the list.
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    // A worker answers these with 503 (None); one demoted meanwhile too.
    let (nodes, services) = if node.manager {
        (client.swarm_nodes().await?, client.swarm_services().await?)
    } else {
        (None, None)
    };
    Ok(Some(swarm::build(
        node,
        overlays,
        nodes,
        services,
        super::state_file::unix_now(),
    )))
}

/// "swarm view: node2 (worker), 2 overlays, web 3 tasks, ..." for the log.
fn swarm_summary(view: Option<&SwarmView>) -> String {
    let Some(view) = view else {
        return "not in a swarm".to_owned();
    };
    let services: Vec<String> = view
        .networks
        .iter()
        .flat_map(|n| {
            n.services
                .iter()
                .map(move |s| format!("{}/{} {} tasks", n.name, s.name, s.tasks.len()))
        })
        .collect();
    format!(
        "swarm view: {} ({}), {} overlay networks{}",
        view.node.node_name,
        if view.node.manager {
            "manager"
        } else {
            "worker"
        },
        view.networks.len(),
        if services.is_empty() {
            String::new()
        } else {
            format!(": {}", services.join(", "))
        }
    )
}

async fn full_sync(client: &Client, engine: &mut Engine) -> Result<(), DockerError> {
    engine.networks = client.networks().await?;
    let mut containers = BTreeMap::new();
    for summary in client.containers().await? {
        if let Some(container) = load_container(client, &summary.id).await? {
            containers.insert(summary.id, container);
        }
    }
    engine.containers = containers;
    Ok(())
}

async fn refresh(client: &Client, engine: &mut Engine, dirty: Dirty) -> Result<(), DockerError> {
    if dirty.networks {
        engine.networks = client.networks().await?;
    }
    for id in dirty.containers {
        match load_container(client, &id).await? {
            Some(container) => engine.containers.insert(id, container),
            None => engine.containers.remove(&id),
        };
    }
    Ok(())
}

/// Inspects a container and finds its veths; None when it is gone or not running.
async fn load_container(client: &Client, id: &str) -> Result<Option<Container>, DockerError> {
    let inspect = match client.inspect_container(id).await {
        Ok(inspect) => inspect,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    if !inspect.state.running || inspect.state.pid == 0 {
        return Ok(None);
    }
    let pid = inspect.state.pid;
    let sandbox_key = PathBuf::from(&inspect.network_settings.sandbox_key);
    let found = tokio::task::spawn_blocking(move || host_veths(pid, &sandbox_key))
        .await
        .unwrap_or_else(|e| Err(format!("finding the veths failed: {e}")));
    let (host_veths, veth_error) = match found {
        Ok(map) => (map, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    Ok(Some(Container {
        inspect,
        host_veths,
        veth_error,
    }))
}

/// Host-side veth names of a container's interfaces, by the container end's MAC: the pair
/// whose ends name each other's ifindex in IFLA_LINK.
fn host_veths(pid: u32, sandbox_key: &Path) -> Result<BTreeMap<[u8; 6], String>, String> {
    let proc_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let inside = match links::links_in(&proc_ns) {
        Ok(links) => links,
        Err(proc_error) if !sandbox_key.as_os_str().is_empty() => links::links_in(sandbox_key)
            .map_err(|e| {
                format!(
                    "reading its interfaces through {} ({proc_error}) and {} ({e}) failed",
                    proc_ns.display(),
                    sandbox_key.display()
                )
            })?,
        Err(e) => {
            return Err(format!(
                "reading its interfaces through {}: {e}",
                proc_ns.display()
            ));
        }
    };
    let here = links::links_here().map_err(|e| format!("reading the agent's interfaces: {e}"))?;
    let mut found = BTreeMap::new();
    let mut unmatched = Vec::new();
    for link in &inside {
        let (Some(mac), Some(peer)) = (link.mac, link.peer_index) else {
            continue;
        };
        if peer == link.index || link.name == "lo" {
            continue;
        }
        match here
            .iter()
            .find(|h| h.index == peer && h.peer_index == Some(link.index))
        {
            Some(host) => {
                found.insert(mac, host.name.clone());
            }
            None => unmatched.push(format!("{} (peer ifindex {peer})", link.name)),
        }
    }
    if found.is_empty() && !unmatched.is_empty() {
        return Err(format!(
            "the host ends of {} are not in the agent's network namespace (run the agent in \
             dockerd's)",
            unmatched.join(", ")
        ));
    }
    Ok(found)
}

/// Builds the state file from what the engine said, and sends the model when it changed.
fn publish(engine: &mut Engine, tx: &watch::Sender<Option<Published>>) {
    let exists = |name: &str| crate::kernel::netdev::ifindex(name).is_some();
    let built = convert::build(
        &Inputs {
            networks: &engine.networks,
            containers: &engine.containers,
            interface_exists: &exists,
            swarm: engine.swarm.as_ref(),
        },
        &mut engine.vips,
    );
    let mut notes = built.notes;
    let changed = engine.published.as_ref() != Some(&built.spec);
    let result = if changed {
        Some(convert::validate(built.spec.clone(), &mut notes))
    } else {
        None
    };
    let notes: BTreeSet<String> = notes.into_iter().collect();
    for note in notes.difference(&engine.notes) {
        log::warn!("docker: {note}");
    }
    engine.notes = notes;
    match result {
        None => {}
        Some(Ok(model)) => {
            log::info!(
                "docker: new state: {} networks, {} endpoints, {} published ports, {} services{}",
                model.networks.len(),
                model.endpoints.len(),
                model.ports.len(),
                model.services.len(),
                services_summary(&model)
            );
            engine.published = Some(built.spec);
            tx.send_replace(Some(Published {
                model,
                notes: engine.notes.iter().cloned().collect(),
            }));
        }
        Some(Err(e)) => {
            log::error!("docker: the engine's state makes no valid model, keeping the last: {e}");
            engine.published = Some(built.spec);
        }
    }
}

/// " (web 10.96.0.7:80/tcp -> 2 backends, ...)" for the log: how people find the VIPs.
fn services_summary(model: &Model) -> String {
    if model.services.is_empty() {
        return String::new();
    }
    let list: Vec<String> = model
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {}:{}/{} -> {} backends",
                s.name,
                s.vip.map(|v| v.to_string()).unwrap_or_default(),
                s.port,
                s.protocol,
                s.backends.len() + s.remote.len()
            )
        })
        .collect();
    format!(" ({})", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, action: &str, id: &str, attrs: &[(&str, &str)]) -> Event {
        Event {
            kind: kind.into(),
            action: action.into(),
            actor: api::Actor {
                id: id.into(),
                attributes: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        }
    }

    #[test]
    fn events_mark_what_to_re_read() {
        let mut dirty = Dirty::default();
        assert!(dirty.note(&event("container", "start", "c1", &[])));
        assert!(dirty.note(&event("container", "die", "c2", &[("exitCode", "0")])));
        assert!(!dirty.note(&event("container", "create", "c3", &[])));
        assert!(!dirty.note(&event("container", "exec_start: sh -c true", "c1", &[])));
        assert!(!dirty.note(&event("container", "health_status: healthy", "c1", &[])));
        assert!(!dirty.networks);
        assert!(dirty.note(&event(
            "network",
            "connect",
            "n1",
            &[("container", "c4"), ("name", "net1"), ("type", "bridge")]
        )));
        assert_eq!(
            dirty,
            Dirty {
                networks: true,
                containers: ["c1", "c2", "c4"].iter().map(|s| s.to_string()).collect(),
                swarm: true,
            }
        );
        let mut dirty = Dirty::default();
        assert!(dirty.note(&event("network", "destroy", "n1", &[])));
        assert!(dirty.networks && dirty.containers.is_empty());
        // A manager's service and node events change only the Swarm view.
        let mut dirty = Dirty::default();
        assert!(dirty.note(&event("service", "update", "s1", &[("name", "web")])));
        assert!(dirty.note(&event("node", "update", "n1", &[])));
        assert_eq!(
            dirty,
            Dirty {
                swarm: true,
                ..Dirty::default()
            }
        );
    }

    #[test]
    fn flags_parse() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[arg(long)]
            state: Option<PathBuf>,
            #[arg(long)]
            uplink: Option<String>,
            #[command(flatten)]
            docker: DockerArgs,
        }
        let cli = Cli::try_parse_from(["x", "--docker", "--uplink", "eth0"]).unwrap();
        assert_eq!(
            cli.docker.docker,
            Some(PathBuf::from(DEFAULT_DOCKER_SOCKET))
        );
        assert_eq!(cli.uplink.as_deref(), Some("eth0"));
        assert_eq!(
            cli.docker.service_vip_range.to_string(),
            DEFAULT_SERVICE_VIP_RANGE
        );
        let cli = Cli::try_parse_from([
            "x",
            "--docker",
            "/tmp/d.sock",
            "--service-vip-range",
            "10.200.0.0/24",
        ])
        .unwrap();
        assert_eq!(cli.docker.docker, Some(PathBuf::from("/tmp/d.sock")));
        assert_eq!(cli.docker.service_vip_range.to_string(), "10.200.0.0/24");
        assert!(Cli::try_parse_from(["x", "--docker", "--state", "f.yaml"]).is_err());
        assert!(Cli::try_parse_from(["x", "--service-vip-range", "10.0.0.1/8"]).is_err());
        let cli = Cli::try_parse_from(["x", "--state", "f.yaml"]).unwrap();
        assert!(cli.docker.docker.is_none());
    }
}

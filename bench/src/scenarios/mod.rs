//! The scenarios, one file each: a published port (`published-port`, issue 3) and flow logging
//! on and off (`flow-logging`, issue 6); service VIPs (`vip`, `vip-outside`), scale
//! (`scale-ports`, `scale-services`), the XDP deny list (`xdp-drop`), outbound masquerade
//! (`masquerade`), localhost to a published port (`localhost`) and a real Docker engine
//! (`docker`) of issues 4, 5 and 8; new connections during a spoofed SYN flood (`syn-flood`,
//! issue 12); a container's port right after `docker run` (`docker-start`, issue 14); a
//! published port and masquerade over IPv6 (`published-port6`, `masquerade6`, issue 15).
//! [`all`] lists them in the order they run.
//!
//! What they share lives here: workloads whose runs are capped at [`MAX_SECS`] (so that the
//! whole full run stays within about 35 minutes on 2 cores), the metrics they add, and helpers
//! for iptables rule sets, the agent's status and its CPU time.

mod docker;
mod docker_start;
pub mod drop_gen;
mod flow_logging;
mod localhost;
mod masquerade;
mod masquerade6;
mod memory;
pub mod probe;
mod published_port;
pub mod published_port6;
mod scale;
mod scale_policy;
mod syn_flood;
mod vip;
mod xdp_drop;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use dataplane::control::status::Status;
use testbed::StatusExt as _;

use crate::bed::Bed;
use crate::client;
use crate::client::Targets;
use crate::framework::Durations;
use crate::framework::metric::Better;
use crate::framework::metric::HTTP_P50;
use crate::framework::metric::HTTP_P99;
use crate::framework::metric::HTTP_RPS;
use crate::framework::metric::Metric;
use crate::framework::metric::TCP_1;
use crate::framework::scenario::Scenario;
use crate::framework::workload::CustomWorkload;

pub fn all() -> Vec<Scenario> {
    vec![
        published_port::scenario(),
        flow_logging::scenario(),
        vip::vip(),
        vip::vip_outside(),
        scale::ports(),
        scale::services(),
        scale_policy::scenario(),
        xdp_drop::scenario(),
        syn_flood::scenario(),
        masquerade::scenario(),
        localhost::scenario(),
        docker::scenario(),
        docker_start::scenario(),
        published_port6::scenario(),
        masquerade6::scenario(),
    ]
}

/// Longest wrk or iperf3 run of these scenarios (the full run's 5 s and --quick's 3 s are
/// both within it).
pub const MAX_SECS: u32 = 5;

fn secs(durations: Durations) -> u32 {
    durations.wrk_secs.min(MAX_SECS)
}

/// How long the latency probe runs: a request takes a hundred to a few hundred microseconds,
/// so 2 s give several thousand samples, enough for a p99.
fn probe_secs(durations: Durations) -> u32 {
    durations.wrk_secs.min(2)
}

/// The sandbox's network, as in the published-port scenario (so `published_port::docker_rules`
/// applies): bridge br-bench, 172.31.0.0/24, the host at .1.
pub const NETWORK: &str = "172.31.0.0/24";
pub const BRIDGE: &str = "br-bench";
/// The sandbox host's uplink address and the outside client's.
pub use dataplane::sandbox::{OUTSIDE_IP, UPLINK_HOST_IP as HOST_IP};
/// The same over IPv6 (the sandbox gives them when a network has `subnet6`), and the IPv6
/// scenarios' network: a ULA prefix, as Docker's IPv6 networks usually have.
pub use dataplane::sandbox::{OUTSIDE_IP6, UPLINK_HOST_IP6 as HOST_IP6};
pub const NETWORK6: &str = "fd00:31::/64";

pub fn addr(ip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.parse().expect("constant IPv4 address"), port)
}

/// A client target of either family (`ip` an IPv4 or IPv6 address without brackets).
pub fn socket_addr(ip: &str, port: u16) -> SocketAddr {
    let ip: IpAddr = ip.parse().expect("constant IP address");
    SocketAddr::new(ip, port)
}

/// The path a bed was built for: sandboxes are named `dpbench-PID-PATH` (run.rs).
pub fn path_of(bed: &Bed) -> &str {
    bed.name.splitn(3, '-').nth(2).unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Metrics these scenarios add.

pub static NEWCONN_RPS: Metric = Metric {
    key: "http_new_conn_requests_per_sec",
    label: "HTTP requests/s, new connection each",
    short: "new-conn req/s",
    unit: "req/s",
    better: Better::Higher,
};
pub static NEWCONN_P50: Metric = Metric {
    key: "http_new_conn_latency_p50_ms",
    label: "HTTP latency p50, new connection, handshake included",
    short: "p50",
    unit: "ms",
    better: Better::Lower,
};
pub static NEWCONN_P99: Metric = Metric {
    key: "http_new_conn_latency_p99_ms",
    label: "HTTP latency p99, new connection, handshake included",
    short: "p99",
    unit: "ms",
    better: Better::Lower,
};

// ---------------------------------------------------------------------------------------------
// Workloads: the ones of scenario.rs, with runs capped at MAX_SECS.

/// `wrk -t1 -c32`, keep-alive: requests/s, p50, p99 (after a 1 s warm-up).
pub static WRK: CustomWorkload = CustomWorkload {
    label: "wrk",
    metrics: &[&HTTP_RPS, &HTTP_P50, &HTTP_P99],
    run: run_wrk,
};

/// `wrk -t1 -c32 -H 'Connection: close'`: every request a new TCP connection, so every request
/// pays for what a path does per connection (rule walks, backend choice, conntrack setup):
/// requests/s. Then the latency probe (probe.rs): one request at a time on a new connection,
/// timed from connect() on (wrk's latency starts after the handshake, where that work is
/// done): p50 and p99.
pub static WRK_NEW_CONN: CustomWorkload = CustomWorkload {
    label: "wrk new conns",
    metrics: &[&NEWCONN_RPS, &NEWCONN_P50, &NEWCONN_P99],
    run: run_wrk_new_conn,
};

/// `iperf3 -P 1`: Gbit/s received.
pub static IPERF_1: CustomWorkload = CustomWorkload {
    label: "iperf3 1 stream",
    metrics: &[&TCP_1],
    run: run_iperf_1,
};

fn run_wrk(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    wrk_keep_alive(bed, client, targets, &[], durations)
}

/// The keep-alive workload's metrics; with `spread`, one wrk thread per address of it
/// instead of one thread to `targets.http`.
pub fn wrk_keep_alive(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    spread: &[SocketAddr],
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let url = format!("http://{}/", targets.http);
    let run = |secs| {
        client::wrk_threads(
            bed,
            client,
            &url,
            spread,
            secs,
            client::WRK_CONNECTIONS,
            false,
        )
    };
    run(durations.warmup_secs).context("warm-up")?;
    let r = run(secs(durations))?;
    Ok(vec![
        (&HTTP_RPS, r.requests_per_sec),
        (&HTTP_P50, r.p50_us / 1000.0),
        (&HTTP_P99, r.p99_us / 1000.0),
    ])
}

/// Concurrency of the new-connection workloads.
pub const NEW_CONN_CONCURRENCY: u32 = 32;

fn run_wrk_new_conn(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    wrk_new_conn(bed, client, targets, &[], durations)
}

/// The new-connection workload's metrics; with `spread`, wrk runs one thread per address of
/// it (the latency probe, one request at a time, still goes to `targets.http`).
pub fn wrk_new_conn(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    spread: &[SocketAddr],
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let url = format!("http://{}/", targets.http);
    let before = agent_drops(bed);
    let r = client::wrk_threads(
        bed,
        client,
        &url,
        spread,
        secs(durations),
        NEW_CONN_CONCURRENCY,
        true,
    )?;
    let p = probe::probe(bed, client, targets.http, probe_secs(durations))?;
    note_trouble(bed, before, &p);
    Ok(vec![
        (&NEWCONN_RPS, r.requests_per_sec),
        (&NEWCONN_P50, p.p50_us / 1000.0),
        (&NEWCONN_P99, p.p99_us / 1000.0),
    ])
}

/// A measured run of wrk with a new connection per request (no warm-up: there is no
/// connection to warm, and the keep-alive workload before it warmed the servers).
pub fn new_conn_wrk(
    bed: &Bed,
    client: &str,
    url: &str,
    durations: Durations,
) -> anyhow::Result<client::WrkResult> {
    client::wrk_with(
        bed,
        client,
        url,
        secs(durations),
        NEW_CONN_CONCURRENCY,
        true,
    )
}

fn run_iperf_1(
    bed: &Bed,
    client: &str,
    targets: &Targets,
    durations: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let bps = client::iperf3(bed, client, targets.iperf, 1, secs(durations))?;
    Ok(vec![(&TCP_1, bps / 1e9)])
}

// ---------------------------------------------------------------------------------------------
// iptables.

/// Loads `rules` with `iptables-restore` in the sandbox's host namespace; returns how long
/// the command took (start of the process to its exit).
pub fn iptables_restore(bed: &Bed, file: &str, rules: &str) -> anyhow::Result<Duration> {
    iptables_restore_family(bed, "iptables-restore", file, rules)
}

/// [`iptables_restore`] with `command` (`iptables-restore` or `ip6tables-restore`).
pub fn iptables_restore_family(
    bed: &Bed,
    command: &str,
    file: &str,
    rules: &str,
) -> anyhow::Result<Duration> {
    let path = bed.work_file(file);
    std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
    let started = Instant::now();
    bed.run_ok(
        "host",
        &[command, &path.to_string_lossy()],
        Duration::from_secs(600),
    )
    .with_context(|| format!("{command} {file}"))?;
    Ok(started.elapsed())
}

/// A service as kube-proxy (iptables mode) programs it.
pub struct KubeService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<SocketAddrV4>,
    /// The NodePort on the host's addresses, if any.
    pub node_port: Option<u16>,
}

/// Where kube-proxy's `--cluster-cidr` would be: the containers' network (traffic from outside
/// it to a VIP is masqueraded).
const CLUSTER_CIDR: &str = NETWORK;

/// The nat table kube-proxy 1.2x writes in iptables mode for `services`, in that order in
/// KUBE-SERVICES (which every new connection walks until a rule matches): per service a
/// KUBE-SVC chain that picks a backend with `-m statistic --mode random` (probability 1/n,
/// then 1/(n-1), ...), a KUBE-SEP chain per backend that DNATs (and marks hairpin traffic for
/// masquerade), and for NodePorts a KUBE-EXT chain that marks for masquerade (the default
/// `externalTrafficPolicy: Cluster`). Chain names are made from the service index, not
/// kube-proxy's hashes.
pub fn kube_proxy_rules(services: &[KubeService]) -> String {
    let mut chains = String::new();
    let mut portals = String::new();
    let mut nodeports = String::new();
    let mut bodies = String::new();
    for (i, s) in services.iter().enumerate() {
        let svc = format!("KUBE-SVC-{i:08X}");
        let comment = format!("bench/{}", s.name);
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            portals,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp \
             --dport {} -j {svc}",
            s.vip, s.port
        );
        if let Some(node_port) = s.node_port {
            let ext = format!("KUBE-EXT-{i:08X}");
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                nodeports,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{comment}\" -m tcp --dport \
                 {node_port} -j {ext}"
            );
            let _ = writeln!(
                bodies,
                "-A {ext} -m comment --comment \"masquerade traffic for {comment} external \
                 destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}"
            );
        }
        let _ = writeln!(
            bodies,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{comment} \
             cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            s.vip, s.port
        );
        let n = s.backends.len();
        for (j, backend) in s.backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:08X}{j:02X}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let statistic = if j + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (n - j) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                bodies,
                "-A {svc} -m comment --comment \"{comment} -> {backend}\"{statistic} -j {sep}"
            );
            let _ = writeln!(
                bodies,
                "-A {sep} -s {}/32 -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"{comment}\" -m tcp -j DNAT \
                 --to-destination {backend}",
                backend.ip()
            );
        }
    }
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
{chains}-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
{portals}-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
{nodeports}{bodies}COMMIT
"
    )
}

// ---------------------------------------------------------------------------------------------
// The agent.

/// Entries of the agent's map `name` (or `name_vN`), from its status.
pub fn map_entries(status: &Status, name: &str) -> anyhow::Result<u64> {
    status
        .find_map_entries(name)
        .map(u64::from)
        .with_context(|| format!("the agent's status has no map {name}"))
}

/// The agent's drop counters by reason (None without an agent).
pub fn agent_drops(bed: &Bed) -> Option<std::collections::BTreeMap<String, u64>> {
    bed.agent_pid()?;
    Some(bed.agent_status().ok()?.drops)
}

/// Says on the progress line what went wrong during a run that still counts: requests of the
/// probe that failed, and packets the agent dropped since `before`.
pub fn note_trouble(
    bed: &Bed,
    before: Option<std::collections::BTreeMap<String, u64>>,
    probe: &probe::ProbeResult,
) {
    let mut notes = Vec::new();
    if probe.errors > 0 {
        notes.push(format!(
            "{} of {} probe requests failed",
            probe.errors,
            probe.requests + probe.errors
        ));
    }
    if let (Some(before), Some(after)) = (before, agent_drops(bed)) {
        for (reason, count) in after {
            let new = count.saturating_sub(before.get(&reason).copied().unwrap_or(0));
            if new > 0 {
                notes.push(format!("agent dropped {new} {reason}"));
            }
        }
    }
    if !notes.is_empty() {
        eprint!("({}) ", notes.join(", "));
    }
}

/// User plus system CPU time of a process (all its threads), from /proc.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {} of /proc/{pid}/stat", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / hz))
}

/// Measures the share of one core a process used while `f` ran (100 = one whole core).
pub fn cpu_share_during<T>(
    pid: Option<u32>,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<f64>)> {
    let before = pid.map(cpu_time).transpose()?;
    let started = Instant::now();
    let value = f()?;
    let wall = started.elapsed().as_secs_f64();
    let share = match (pid, before) {
        (Some(pid), Some(before)) => {
            let used = cpu_time(pid)?.saturating_sub(before).as_secs_f64();
            Some(100.0 * used / wall.max(1e-3))
        }
        _ => None,
    };
    Ok((value, share))
}

/// Writes the agent's state file the way an editor that saves atomically does (a temp file
/// renamed over it), so that the agent never reads half a file.
pub fn write_state(bed: &Bed, text: &str) -> anyhow::Result<()> {
    Ok(bed.sandbox().write_state_file(text)?)
}

/// Polls the agent's status until `done` says the state is in the maps; fails on an error the
/// agent reports or after `timeout`. Returns the status that showed it.
pub fn wait_applied(
    bed: &Bed,
    timeout: Duration,
    done: impl Fn(&Status) -> anyhow::Result<bool>,
) -> anyhow::Result<Status> {
    let deadline = Instant::now() + timeout;
    loop {
        testbed::interrupt::check()?;
        let status = bed.agent_status()?;
        if let Some(error) = &status.last_error {
            bail!("the agent refused the state: {error}");
        }
        if done(&status)? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent had not applied the state after {timeout:?}: {}",
                bed.agent_log()
            );
        }
        // Each look is one `status`, which the agent answers on the loop that also applies
        // states, and which counts every map's entries (milliseconds): looking too often would
        // delay the very apply being timed. The time itself is the agent's own record, not
        // when a look saw it, so a coarser look costs the measure nothing.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `text` as the agent's state file and waits until `done`; returns how long it took
/// from the write to the agent's maps written, by the agent's own clock of the apply
/// (`in_force.applied_unix_micros`, the same host's clock as the write's).
pub fn timed_apply(
    bed: &Bed,
    text: &str,
    timeout: Duration,
    done: impl Fn(&Status) -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let written = dataplane::source::state_file::unix_now_micros();
    write_state(bed, text)?;
    let status = wait_applied(bed, timeout, |s| {
        let applied = s
            .state
            .in_force
            .as_ref()
            .map_or(0, |v| v.applied_unix_micros);
        Ok(applied >= written && done(s)?)
    })?;
    let applied = status.state.in_force.map_or(0, |v| v.applied_unix_micros);
    Ok(Duration::from_micros(applied - written))
}

/// The duration in the agent's last `applied state in 1.234ms: ...` log line.
pub fn last_reconcile(log: &str) -> Option<Duration> {
    let line = log.rsplit("applied state in ").next()?;
    if !log.contains("applied state in ") {
        return None;
    }
    let text = line.split(':').next()?.trim();
    parse_debug_duration(text)
}

/// A `Duration`'s Debug text (`1.5s`, `12.3ms`, `800µs`, `10ns`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" | "us" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_goal_names_a_path_and_a_metric_of_its_scenario() {
        for scenario in all() {
            let names: Vec<&str> = scenario.paths.iter().map(|p| p.name).collect();
            assert!(names.contains(&scenario.subject), "{}", scenario.name);
            let metrics = scenario.metrics();
            for goal in scenario.targets {
                assert!(names.contains(&goal.baseline), "{}", goal.baseline);
                assert!(metrics.iter().any(|m| m.key == goal.metric.key));
            }
        }
    }

    #[test]
    fn kube_proxy_rules_walk_services_in_order_and_split_backends() {
        let backends = |ips: &[&str]| ips.iter().map(|ip| addr(ip, 80)).collect();
        let rules = kube_proxy_rules(&[
            KubeService {
                name: "a".into(),
                vip: "10.100.0.1".parse().unwrap(),
                port: 80,
                backends: backends(&["172.31.0.3"]),
                node_port: None,
            },
            KubeService {
                name: "web".into(),
                vip: "10.96.0.10".parse().unwrap(),
                port: 80,
                backends: backends(&["172.31.0.3", "172.31.0.4", "172.31.0.5"]),
                node_port: Some(8080),
            },
        ]);
        let a = rules.find("-d 10.100.0.1/32").unwrap();
        let web = rules.find("-d 10.96.0.10/32").unwrap();
        assert!(a < web);
        assert!(rules.contains("--probability 0.33333333333 -j KUBE-SEP-0000000100"));
        assert!(rules.contains("--probability 0.50000000000 -j KUBE-SEP-0000000101"));
        assert!(rules.contains("-j KUBE-SEP-0000000102\n"));
        assert!(rules.contains("--to-destination 172.31.0.5:80"));
        assert!(rules.contains("--dport 8080 -j KUBE-EXT-00000001"));
        assert!(rules.ends_with("COMMIT\n"));
        // Every chain jumped to is declared.
        for jump in rules.split("-j ").skip(1) {
            let target = jump.split_whitespace().next().unwrap();
            if target.starts_with("KUBE-") {
                assert!(rules.contains(&format!(":{target} - [0:0]")), "{target}");
            }
        }
    }

    #[test]
    fn reconcile_time_is_read_from_the_log() {
        let log = "[x INFO dataplane::agent] applied state in 12.5ms: Changes { a: 1 } | \
                   [y INFO dataplane::agent] state file changed; applying | \
                   [z INFO dataplane::agent] applied state in 1.25s: Changes { b: 2 }";
        assert_eq!(last_reconcile(log), Some(Duration::from_millis(1250)));
        assert_eq!(
            parse_debug_duration("800µs"),
            Some(Duration::from_micros(800))
        );
        assert_eq!(last_reconcile("nothing"), None);
    }

    #[test]
    fn path_is_the_rest_of_the_sandbox_name() {
        assert_eq!(
            "dpbench-12-iptables-raw".splitn(3, '-').nth(2),
            Some("iptables-raw")
        );
    }
}

//! `dataplane status`: asks the agent for its [`Status`] and prints it for people.

use std::path::Path;

use anyhow::Context as _;

use crate::control::{self, status::Status};

/// Asks the agent on `socket` for its status and prints it.
pub fn print(socket: &Path, json: bool) -> anyhow::Result<()> {
    let reply = control::request(socket, "status")?;
    if json {
        println!("{reply}");
        return Ok(());
    }
    let status: Status = serde_json::from_str(&reply).context("decoding the agent's status")?;
    print!("{}", render(&status));
    Ok(())
}

/// Seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
fn time(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "uplink: {}   pin dir: {}", s.uplink, s.pin_dir);
    let _ = writeln!(
        out,
        "state: {}   reconciles: {}   expired connections removed: {}",
        s.state_file.as_deref().unwrap_or("(none)"),
        s.reconciles,
        s.ct_collected
    );
    let st = &s.state;
    match &st.in_force {
        Some(v) => {
            let _ = writeln!(
                out,
                "in force: {} state{}, applied {}{}",
                v.source,
                v.sha256
                    .as_deref()
                    .map(|h| format!(" sha256 {h}"))
                    .unwrap_or_default(),
                time(v.applied_unix),
                v.modified_unix
                    .map(|m| format!(" (file modified {})", time(m)))
                    .unwrap_or_default(),
            );
        }
        None => {
            let _ = writeln!(out, "in force: nothing yet");
        }
    }
    if let Some(n) = &st.newer {
        let _ = writeln!(
            out,
            "newer state{} since {} not in force: {}",
            n.sha256
                .as_deref()
                .map(|h| format!(" sha256 {h}"))
                .unwrap_or_default(),
            time(n.since_unix),
            n.reason
        );
    } else if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last error (last good state still in force): {e}");
    }
    for w in &st.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(out, "\nATTACHED PROGRAMS");
    for a in &s.attachments {
        let _ = writeln!(
            out,
            "  {:<16} ifindex {:<5} {:<22} {}",
            a.interface, a.ifindex, a.hook, a.program
        );
    }
    let _ = writeln!(out, "\nMAPS");
    for m in &s.maps {
        let pct = if m.capacity == 0 {
            0.0
        } else {
            100.0 * f64::from(m.entries) / f64::from(m.capacity)
        };
        let _ = writeln!(
            out,
            "  {:<24} {:>7} / {:<7} ({pct:.1}%)",
            m.name, m.entries, m.capacity
        );
    }
    let _ = writeln!(out, "\nNETWORKS");
    for n in &s.networks {
        let families: Vec<String> = [(&n.subnet, &n.gateway), (&n.subnet6, &n.gateway6)]
            .into_iter()
            .filter_map(|(subnet, gateway)| {
                Some(format!(
                    "{} gateway {}",
                    subnet.as_deref()?,
                    gateway.as_deref().unwrap_or("-")
                ))
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:<16} {:<16} {}",
            n.name,
            n.bridge,
            families.join(", ")
        );
    }
    let _ = writeln!(out, "\nENDPOINTS");
    for e in &s.endpoints {
        let ip = if e.ip.is_empty() { "-" } else { e.ip.as_str() };
        let _ = writeln!(
            out,
            "  {:<16} {:<12} {:<16} {:<24} {}",
            e.name,
            e.network,
            ip,
            e.ip6.as_deref().unwrap_or("-"),
            e.host_veth
        );
    }
    let _ = writeln!(out, "\nSERVICES");
    for v in &s.services {
        // Port 0: every port (a Swarm VIP).
        let port = match v.port {
            0 => "*".to_owned(),
            p => p.to_string(),
        };
        let addresses: Vec<String> = v
            .vip
            .iter()
            .map(|a| format!("{a}:{port}"))
            .chain(v.vip6.iter().map(|a| format!("[{a}]:{port}")))
            .collect();
        let _ = writeln!(
            out,
            "  {:<16} {}/{} -> {}",
            v.name,
            addresses.join(" "),
            v.protocol,
            v.backends.join(", ")
        );
    }
    let _ = writeln!(out, "\nPUBLISHED PORTS");
    for p in &s.ports {
        let host = match p.host_ip.as_deref() {
            None => "*".to_owned(),
            Some(ip) if ip.contains(':') => format!("[{ip}]"),
            Some(ip) => ip.to_owned(),
        };
        let _ = writeln!(
            out,
            "  {host}:{}/{} -> {}:{}",
            p.host_port, p.protocol, p.target, p.container_port
        );
    }
    if let Some(swarm) = &s.swarm {
        render_swarm(&mut out, swarm);
    }
    let _ = writeln!(out, "\nTRAFFIC SEEN BY THE PROGRAMS");
    for c in &s.interfaces {
        let _ = writeln!(
            out,
            "  {:<16} {:<22} {:>10} packets {:>12} bytes",
            c.interface, c.hook, c.packets, c.bytes
        );
    }
    let _ = writeln!(out, "\nDROPS");
    for (reason, count) in &s.drops {
        let _ = writeln!(out, "  {reason:<28} {count}");
    }
    let f = &s.flows;
    let _ = writeln!(out, "\nFLOWS");
    let _ = writeln!(
        out,
        "  events {}   lost (ring full) {}   records {}   in history {}   followers {}",
        if f.events { "on" } else { "off" },
        f.lost,
        f.records,
        f.history,
        f.followers
    );
    out
}

/// The SWARM section: this node, its overlays' services with their tasks on every node, and
/// a manager's nodes and services.
fn render_swarm(out: &mut String, s: &crate::control::status::SwarmStatus) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "\nSWARM");
    let _ = writeln!(
        out,
        "  node {} ({}) {}   id {}   read {}",
        s.node,
        s.role,
        s.node_addr,
        s.node_id,
        time(s.read_unix)
    );
    if let Some(e) = &s.error {
        let _ = writeln!(
            out,
            "  the engine could not be read since (the last view is shown): {e}"
        );
    }
    for n in &s.networks {
        let _ = writeln!(
            out,
            "  network {}{} {}{}",
            n.name,
            if n.ingress { " (routing mesh)" } else { "" },
            n.subnets.join(", "),
            n.vni.map(|v| format!(" vni {v}")).unwrap_or_default()
        );
        for v in &n.services {
            let ports = if v.ports.is_empty() {
                String::new()
            } else {
                format!("   ports {}", v.ports.join(", "))
            };
            let _ = writeln!(
                out,
                "    {:<16} VIP {}{ports}",
                v.name,
                v.vip.as_deref().unwrap_or("none (dnsrr)")
            );
            for t in &v.tasks {
                let _ = writeln!(
                    out,
                    "      {:<40} {:<16} on {}",
                    t.name,
                    t.ip.as_deref().unwrap_or("-"),
                    match &t.node {
                        Some(node) => format!("{node} ({})", t.node_addr),
                        None => t.node_addr.clone(),
                    }
                );
            }
        }
    }
    if let Some(nodes) = &s.nodes {
        let _ = writeln!(out, "  nodes");
        for n in nodes {
            let _ = writeln!(
                out,
                "    {:<16} {:<16} {:<8} {:<8} {}{}",
                n.name,
                n.addr,
                n.role,
                n.state,
                n.availability,
                if n.leader { " leader" } else { "" }
            );
        }
    }
    if let Some(services) = &s.services {
        let _ = writeln!(out, "  services");
        for v in services {
            let _ = writeln!(
                out,
                "    {:<16} {:<6} {:<12} {}",
                v.name,
                v.mode,
                v.replicas
                    .map(|r| format!("{r} replicas"))
                    .unwrap_or_else(|| "global".to_owned()),
                v.ports.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_state_in_force_and_a_refused_newer_one_are_printed() {
        let status: super::Status = serde_json::from_value(serde_json::json!({
            "pin_dir": "/sys/fs/bpf/dp", "state_file": "/etc/state.yaml", "uplink": "eth0",
            "attachments": [], "maps": [], "interfaces": [], "endpoints": [], "drops": {},
            "reconciles": 1, "ct_collected": 0, "last_applied_unix": 0,
            "last_error": "state file /etc/state.yaml is empty",
            "state": {
                "in_force": {"source": "file", "sha256": "ab12", "modified_unix": 60,
                             "applied_unix": 61},
                "newer": {"sha256": "cd34", "since_unix": 120,
                          "reason": "state file /etc/state.yaml is empty"},
                "warnings": ["ports[0].host_ip: 192.0.2.9 is not an address of this host"]
            }
        }))
        .unwrap();
        let text = super::render(&status);
        assert!(
            text.contains(
                "in force: file state sha256 ab12, applied 1970-01-01 00:01:01 UTC (file \
                 modified 1970-01-01 00:01:00 UTC)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "newer state sha256 cd34 since 1970-01-01 00:02:00 UTC not in force: state \
                 file /etc/state.yaml is empty"
            ),
            "{text}"
        );
        assert!(
            text.contains("warning: ports[0].host_ip: 192.0.2.9"),
            "{text}"
        );
    }

    #[test]
    fn ipv6_addresses_of_networks_endpoints_services_and_ports_are_printed() {
        let status: super::Status = serde_json::from_value(serde_json::json!({
            "pin_dir": "/sys/fs/bpf/dp", "state_file": null, "uplink": "eth0",
            "attachments": [], "maps": [], "interfaces": [], "drops": {},
            "endpoints": [
                {"name": "web1", "network": "front", "ip": "172.30.1.2",
                 "ip6": "fd00:30:1::2", "host_veth": "veth-web1"},
                {"name": "six", "network": "only6", "ip": "", "ip6": "fd00:30:2::2",
                 "host_veth": "veth-six"}
            ],
            "networks": [
                {"name": "front", "bridge": "br-front", "subnet": "172.30.1.0/24",
                 "gateway": "172.30.1.1", "subnet6": "fd00:30:1::/64",
                 "gateway6": "fd00:30:1::1"},
                {"name": "only6", "bridge": "br-six", "subnet": null, "gateway": null,
                 "subnet6": "fd00:30:2::/64", "gateway6": "fd00:30:2::1"}
            ],
            "services": [{"name": "web", "vip": "10.96.0.10", "vip6": "fd00:96::10",
                          "port": 80, "protocol": "tcp", "backends": ["web1"]}],
            "ports": [
                {"target": "endpoint web1", "protocol": "tcp", "host_ip": null,
                 "host_port": "8080", "container_port": "80"},
                {"target": "endpoint six", "protocol": "udp", "host_ip": "::",
                 "host_port": "5353", "container_port": "53"}
            ],
            "reconciles": 1, "ct_collected": 0, "last_applied_unix": null,
            "last_error": null
        }))
        .unwrap();
        let text = super::render(&status);
        for expected in [
            "front            br-front         172.30.1.0/24 gateway 172.30.1.1, \
             fd00:30:1::/64 gateway fd00:30:1::1",
            "only6            br-six           fd00:30:2::/64 gateway fd00:30:2::1",
            "web1             front        172.30.1.2       fd00:30:1::2",
            "six              only6        -                fd00:30:2::2",
            "web              10.96.0.10:80 [fd00:96::10]:80/tcp -> web1",
            "*:8080/tcp -> endpoint web1:80",
            "[::]:5353/udp -> endpoint six:53",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn the_swarm_view_is_printed() {
        let status: super::Status = serde_json::from_value(serde_json::json!({
            "pin_dir": "/sys/fs/bpf/dp", "state_file": null, "uplink": "eth0",
            "attachments": [], "maps": [], "interfaces": [], "endpoints": [], "drops": {},
            "reconciles": 1, "ct_collected": 0, "last_applied_unix": null, "last_error": null,
            "swarm": {
                "node": "node1", "node_id": "05tn", "node_addr": "10.99.0.1", "role": "manager",
                "read_unix": 60, "error": "cannot connect to the Docker engine",
                "networks": [
                    {"name": "ingress", "id": "tif5", "ingress": true,
                     "subnets": ["10.0.0.0/24"], "vni": 4096,
                     "services": [{"name": "web", "vip": "10.0.0.5", "ports": ["8080->80"],
                                   "tasks": []}]},
                    {"name": "ov1", "id": "rmk5", "ingress": false,
                     "subnets": ["10.0.1.0/24"], "vni": 4097,
                     "services": [
                         {"name": "rr", "vip": null, "ports": [], "tasks": []},
                         {"name": "web", "vip": "10.0.1.2", "ports": [], "tasks": [
                             {"name": "web.1.jss2", "ip": "10.0.1.3", "node_addr": "10.99.0.2",
                              "node": "node2"},
                             {"name": "web.2.p72p", "ip": "10.0.1.4", "node_addr": "10.99.0.3",
                              "node": null}
                         ]}
                     ]}
                ],
                "nodes": [{"name": "node1", "id": "05tn", "addr": "10.99.0.1",
                           "role": "manager", "state": "ready", "availability": "active",
                           "leader": true}],
                "services": [{"name": "web", "id": "hajk", "mode": "vip", "replicas": 3,
                              "ports": ["8080->80/tcp (ingress)"]}]
            }
        }))
        .unwrap();
        let text = super::render(&status);
        for expected in [
            "node node1 (manager) 10.99.0.1   id 05tn   read 1970-01-01 00:01:00 UTC",
            "the engine could not be read since (the last view is shown): cannot connect",
            "network ingress (routing mesh) 10.0.0.0/24 vni 4096",
            "web              VIP 10.0.0.5   ports 8080->80",
            "rr               VIP none (dnsrr)",
            "web.1.jss2                               10.0.1.3         on node2 (10.99.0.2)",
            "web.2.p72p                               10.0.1.4         on 10.99.0.3",
            "node1            10.99.0.1        manager  ready    active leader",
            "web              vip    3 replicas   8080->80/tcp (ingress)",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::time(1_796_083_200 + 3661), "2026-12-01 01:01:01 UTC");
    }
}

//! `dataplane status`: what the agent reports about the kernel side, and how it is printed.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pin_dir: String,
    pub state_file: Option<String>,
    pub uplink: String,
    pub attachments: Vec<Attachment>,
    pub maps: Vec<MapFill>,
    pub interfaces: Vec<InterfaceCounters>,
    pub endpoints: Vec<EndpointRow>,
    /// Drops by Hubble reason name.
    pub drops: BTreeMap<String, u64>,
    pub reconciles: u64,
    /// Conntrack entries removed as expired since the agent started.
    pub ct_collected: u64,
    /// Seconds since the Unix epoch of the last successful apply.
    pub last_applied_unix: Option<u64>,
    /// Why the latest state could not be applied (the last good state stays in force).
    pub last_error: Option<String>,
    #[serde(default)]
    pub flows: FlowStatus,
}

/// Flow logging: events from the kernel and the records made of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowStatus {
    /// Whether the kernel programs send flow events (`--flow-events`).
    pub events: bool,
    /// Events the kernel could not write because the ring buffer was full, since the ring
    /// was created (it is pinned: agent restarts keep counting).
    pub lost: u64,
    /// Records made since the agent started, records in its history, `observe --follow`
    /// clients.
    pub records: u64,
    pub history: usize,
    pub followers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub hook: String,
    pub program: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u32,
    pub capacity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceCounters {
    /// Name now, or `ifindex N` when the interface is gone.
    pub interface: String,
    pub ifindex: u32,
    pub hook: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRow {
    pub name: String,
    pub network: String,
    pub ip: String,
    pub host_veth: String,
}

/// Asks the agent on `socket` for its status and prints it.
pub fn print(socket: &Path, json: bool) -> anyhow::Result<()> {
    let reply = crate::control::request(socket, "status")?;
    if json {
        println!("{reply}");
        return Ok(());
    }
    let status: Status = serde_json::from_str(&reply).context("decoding the agent's status")?;
    print!("{}", render(&status));
    Ok(())
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
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last error (last good state still in force): {e}");
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
    let _ = writeln!(out, "\nENDPOINTS");
    for e in &s.endpoints {
        let _ = writeln!(
            out,
            "  {:<16} {:<12} {:<16} {}",
            e.name, e.network, e.ip, e.host_veth
        );
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

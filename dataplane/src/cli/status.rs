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

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
    fn times_print_as_utc() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::time(1_796_083_200 + 3661), "2026-12-01 01:01:01 UTC");
    }
}

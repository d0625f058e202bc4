//! A latency probe that includes the TCP handshake: requests one at a time, each on a new
//! connection, timed from `connect()` to the end of the response. wrk starts its clock when
//! it writes the request, after the handshake; but a translating path does its per-connection
//! work (walking iptables' nat rules, choosing a backend, creating conntrack entries) on the
//! SYN, so wrk's latency never shows it. This does.
//!
//! It runs as `dataplane-bench probe ADDR SECS` (a hidden subcommand) in the client's namespace,
//! like the other clients, so that it is also in the client's cgroup where that matters.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::bed::Bed;

/// Requests that may fail (of all made) before the run does not count. A failed request (a
/// connect that timed out after the SYN was dropped and resent) is a latency the path caused,
/// so up to this share it is counted, with the time it took, rather than failing the run.
const MAX_ERROR_SHARE: f64 = 0.10;
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, PartialEq)]
pub struct ProbeResult {
    /// Requests answered with a 200, and requests that failed.
    pub requests: u64,
    pub errors: u64,
    /// Over all requests, failed ones with the time until they failed.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The probe's side: runs for `secs` and prints one `XTASK_PROBE ...` line.
pub fn main(addr: SocketAddr, secs: u32) -> anyhow::Result<()> {
    let (result, last_error) = measure(addr, Duration::from_secs(secs.into()));
    println!(
        "XTASK_PROBE requests={} errors={} p50_us={:.1} p99_us={:.1}",
        result.requests, result.errors, result.p50_us, result.p99_us
    );
    if let Some(error) = last_error {
        eprintln!("last error: {error}");
    }
    Ok(())
}

/// Requests one after the other for `duration`; the last error seen, if any.
fn measure(addr: SocketAddr, duration: Duration) -> (ProbeResult, Option<String>) {
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let deadline = Instant::now() + duration;
    let mut samples = Vec::new();
    let mut errors = 0u64;
    let mut last_error = None;
    let mut reply = Vec::with_capacity(512);
    while Instant::now() < deadline {
        let started = Instant::now();
        let result = (|| -> std::io::Result<bool> {
            let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.set_nodelay(true)?;
            stream.write_all(request.as_bytes())?;
            reply.clear();
            stream.read_to_end(&mut reply)?;
            Ok(reply.starts_with(b"HTTP/1.1 200"))
        })();
        let took = started.elapsed().as_secs_f64() * 1e6;
        samples.push(took);
        match result {
            Ok(true) => {}
            Ok(false) => {
                errors += 1;
                last_error = Some(format!(
                    "answer {:?}",
                    String::from_utf8_lossy(&reply[..reply.len().min(40)])
                ));
            }
            Err(e) => {
                errors += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if samples.is_empty() {
            0.0
        } else {
            samples[((samples.len() - 1) as f64 * q).round() as usize]
        }
    };
    let result = ProbeResult {
        requests: samples.len() as u64 - errors,
        errors,
        p50_us: pick(0.50),
        p99_us: pick(0.99),
    };
    (result, last_error)
}

/// Runs the probe from `client` against `target` for `secs`.
pub fn probe(
    bed: &Bed,
    client: &str,
    target: SocketAddr,
    secs: u32,
) -> anyhow::Result<ProbeResult> {
    // Our own binary through /proc: it still runs when a build beside the bench replaced
    // target/release/dataplane-bench (the path then names a deleted file).
    let exe = format!("/proc/{}/exe", std::process::id());
    let out = bed.run(
        client,
        &[&exe, "probe", &target.to_string(), &secs.to_string()],
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    if !out.status.success() {
        bail!("latency probe to {target}: {}", out.complaint());
    }
    let result = parse(&out.stdout).with_context(|| format!("latency probe to {target}"))?;
    if result.requests == 0 {
        bail!(
            "latency probe to {target}: no request completed ({} errors: {})",
            result.errors,
            out.stderr.trim()
        );
    }
    if result.errors as f64 > MAX_ERROR_SHARE * (result.requests + result.errors) as f64 {
        bail!(
            "latency probe to {target}: {} of {} requests failed ({})",
            result.errors,
            result.requests + result.errors,
            out.stderr.trim()
        );
    }
    Ok(result)
}

fn parse(stdout: &str) -> anyhow::Result<ProbeResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("XTASK_PROBE "))
        .with_context(|| format!("no XTASK_PROBE line in {:?}", stdout.trim()))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("no {name} in {line:?}"))?
            .parse()
            .with_context(|| format!("{name} in {line:?}"))
    };
    Ok(ProbeResult {
        requests: field("requests")? as u64,
        errors: field("errors")? as u64,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_line_is_parsed() {
        let r = parse("XTASK_PROBE requests=9000 errors=2 p50_us=210.5 p99_us=480.0\n").unwrap();
        assert_eq!(
            r,
            ProbeResult {
                requests: 9000,
                errors: 2,
                p50_us: 210.5,
                p99_us: 480.0
            }
        );
        assert!(parse("nothing").is_err());
    }

    #[test]
    fn probe_measures_a_local_server() {
        // A server on loopback that answers every connection with a 200 and closes.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 256];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            }
        });
        let (r, error) = measure(addr, Duration::from_millis(200));
        assert!(r.requests > 10, "{r:?} {error:?}");
        assert_eq!(r.errors, 0);
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us);
    }
}

//! The clients: curl for the functional check, wrk and iperf3 for the measurements, and the
//! parsing of what they report.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use testbed::interrupt;

use crate::bed::Bed;

/// Where a path's clients connect for each server, of either family (an IPv6 address shows
/// in brackets, as a URL wants it).
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub http: SocketAddr,
    pub iperf: SocketAddr,
}

/// Connections wrk keeps open, by default on one thread (the other core serves).
pub const WRK_CONNECTIONS: u32 = 32;
/// Extra time a client gets beyond its own duration before it is killed.
const CLIENT_SLACK: Duration = Duration::from_secs(20);
/// How long the functional check keeps trying (an agent may still be writing its maps).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// A run where more than this share of requests saw a socket error does not count.
const MAX_ERROR_SHARE: f64 = 0.01;

/// wrk's `done` hook prints exact counters and microsecond percentiles, instead of the rounded
/// and unit-suffixed text of its normal report.
const WRK_SCRIPT: &str = r#"-- Written by cargo xtask bench: one line it parses.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "XTASK_BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

/// One request through the path must be answered `ok` before any measurement.
pub fn functional_check(bed: &Bed, client: &str, targets: &Targets) -> anyhow::Result<()> {
    let url = format!("http://{}/", targets.http);
    let deadline = Instant::now() + CHECK_TIMEOUT;
    loop {
        interrupt::check()?;
        let out = bed.run(
            client,
            &["curl", "-sS", "--max-time", "2", &url],
            Duration::from_secs(10),
        )?;
        if out.status.success() && out.stdout.trim() == "ok" {
            return Ok(());
        }
        if Instant::now() > deadline {
            let got = if out.status.success() {
                format!("answered {:?} instead of \"ok\"", out.stdout.trim())
            } else {
                out.complaint()
            };
            let agent = bed.agent_log();
            let agent = if agent.is_empty() {
                String::new()
            } else {
                format!(" (agent log: {agent})")
            };
            bail!("functional check: `curl {url}` from {client}: {got}{agent}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[derive(Debug, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub socket_errors: u64,
}

pub fn wrk(bed: &Bed, client: &str, url: &str, secs: u32) -> anyhow::Result<WrkResult> {
    wrk_with(bed, client, url, secs, WRK_CONNECTIONS, false)
}

/// wrk with `connections` open at a time; with `close`, every request asks the server to
/// close its connection (`Connection: close`), so each request is a new connection and
/// requests/s is new connections/s.
pub fn wrk_with(
    bed: &Bed,
    client: &str,
    url: &str,
    secs: u32,
    connections: u32,
    close: bool,
) -> anyhow::Result<WrkResult> {
    wrk_threads(bed, client, url, &[], secs, connections, close)
}

/// [`wrk_with`], and with `threads` one wrk thread per address of it, each thread's
/// connections to its own address (the URL's path and Host header go to all; `connections`
/// rounded up to a multiple of the threads): a client that spreads its load over several
/// servers the way a load balancer would, without one. No `threads`: one thread to the URL.
pub fn wrk_threads(
    bed: &Bed,
    client: &str,
    url: &str,
    threads: &[SocketAddr],
    secs: u32,
    connections: u32,
    close: bool,
) -> anyhow::Result<WrkResult> {
    let thread_count = threads.len().max(1) as u32;
    // wrk gives each thread connections / threads: round up so that none is short.
    let connections = connections.div_ceil(thread_count) * thread_count;
    let script = bed.work_file("wrk-report.lua");
    std::fs::write(&script, wrk_script(threads))?;
    let mut args = vec![
        "wrk".to_string(),
        format!("-t{thread_count}"),
        format!("-c{connections}"),
        format!("-d{secs}s"),
        "--latency".into(),
        "-s".into(),
        script.to_string_lossy().into_owned(),
    ];
    if close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(url.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = bed.run(
        client,
        &args,
        Duration::from_secs(secs.into()) + CLIENT_SLACK,
    )?;
    if !out.status.success() {
        bail!("wrk {url}: {}", out.complaint());
    }
    parse_wrk(&out.stdout).with_context(|| format!("wrk {url}"))
}

/// The report hook, and with `threads` a `setup` hook that gives wrk's n-th thread the n-th
/// address (wrk calls `setup` once per thread, in order, before any connects).
fn wrk_script(threads: &[SocketAddr]) -> String {
    if threads.is_empty() {
        return WRK_SCRIPT.to_string();
    }
    let addrs: Vec<String> = threads
        .iter()
        .map(|a| format!("{{\"{}\", \"{}\"}}", a.ip(), a.port()))
        .collect();
    format!(
        "{WRK_SCRIPT}local addrs = {{{}}}\nlocal next_thread = 1\n\
         setup = function(thread)\n  \
         local a = addrs[next_thread]\n  \
         thread.addr = wrk.lookup(a[1], a[2])[1]\n  \
         next_thread = next_thread + 1\n\
         end\n",
        addrs.join(", ")
    )
}

fn parse_wrk(stdout: &str) -> anyhow::Result<WrkResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("XTASK_BENCH "))
        .with_context(|| format!("no XTASK_BENCH line in its output: {}", stdout.trim()))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("no {name} in {line:?}"))?
            .parse()
            .with_context(|| format!("{name} in {line:?}"))
    };
    let requests = field("requests")?;
    let duration_us = field("duration_us")?;
    let socket_errors = field("connect")? + field("read")? + field("write")? + field("timeout")?;
    let bad_status = field("status")?;
    if requests == 0 || duration_us == 0 {
        bail!("no request completed ({socket_errors} socket errors)");
    }
    if bad_status > 0 {
        bail!("{bad_status} of {requests} responses were not 2xx/3xx");
    }
    if socket_errors as f64 > requests as f64 * MAX_ERROR_SHARE {
        bail!("{socket_errors} socket errors in {requests} requests");
    }
    Ok(WrkResult {
        requests,
        requests_per_sec: requests as f64 / (duration_us as f64 / 1e6),
        p50_us: field("p50_us")? as f64,
        p99_us: field("p99_us")? as f64,
        socket_errors,
    })
}

/// `iperf3 -c` for `secs` with `streams` parallel streams; returns the bits/s the server
/// received (what arrived, not what the client managed to send).
pub fn iperf3(
    bed: &Bed,
    client: &str,
    target: SocketAddr,
    streams: u32,
    secs: u32,
) -> anyhow::Result<f64> {
    let mut args = vec!["iperf3".to_string()];
    if target.is_ipv6() {
        args.push("-6".into());
    }
    args.extend([
        "-c".into(),
        target.ip().to_string(),
        "-p".into(),
        target.port().to_string(),
        "-t".into(),
        secs.to_string(),
        "-P".into(),
        streams.to_string(),
        "-J".into(),
        // Milliseconds: a path that drops the SYN fails fast instead of after minutes.
        "--connect-timeout".into(),
        "3000".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = bed.run(
        client,
        &args,
        Duration::from_secs(secs.into()) + CLIENT_SLACK,
    )?;
    // With -J, iperf3 reports its errors in the JSON too, also when it exits non-zero.
    match parse_iperf3(&out.stdout) {
        Ok(bps) if out.status.success() => Ok(bps),
        Ok(_) => bail!("iperf3 to {target}: {}", out.complaint()),
        Err(e) if out.stdout.trim().is_empty() => {
            bail!("iperf3 to {target}: {} ({e:#})", out.complaint())
        }
        Err(e) => Err(e.context(format!("iperf3 to {target}"))),
    }
}

fn parse_iperf3(stdout: &str) -> anyhow::Result<f64> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("its output is not JSON")?;
    if let Some(error) = json.get("error").and_then(|e| e.as_str()) {
        bail!("{error}");
    }
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(|v| v.as_f64())
        .context("no end.sum_received.bits_per_second in its JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_line_is_parsed() {
        let out = "Running 3s test @ http://x/\nXTASK_BENCH requests=300000 duration_us=3000000 \
                   p50_us=290 p99_us=812 connect=0 read=1 write=0 status=0 timeout=0\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 300_000);
        assert_eq!(r.requests_per_sec, 100_000.0);
        assert_eq!((r.p50_us, r.p99_us), (290.0, 812.0));
        assert_eq!(r.socket_errors, 1);
    }

    #[test]
    fn wrk_failures_are_named() {
        let line = |requests: u32, connect: u32, status: u32| {
            format!(
                "XTASK_BENCH requests={requests} duration_us=3000000 p50_us=0 p99_us=0 \
                 connect={connect} read=0 write=0 status={status} timeout=0"
            )
        };
        let err = |text: String| format!("{:#}", parse_wrk(&text).unwrap_err());
        assert!(err(line(0, 96, 0)).contains("no request completed (96 socket errors)"));
        assert!(err(line(1000, 0, 3)).contains("3 of 1000 responses were not 2xx/3xx"));
        assert!(err(line(1000, 50, 0)).contains("50 socket errors in 1000 requests"));
        assert!(err("garbage".into()).contains("no XTASK_BENCH line"));
    }

    #[test]
    fn a_spread_script_gives_each_thread_its_address() {
        assert_eq!(wrk_script(&[]), WRK_SCRIPT);
        let threads: Vec<SocketAddr> = ["172.31.0.3:80", "[fd00::4]:8080"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let script = wrk_script(&threads);
        assert!(script.starts_with(WRK_SCRIPT));
        assert!(script.contains(r#"local addrs = {{"172.31.0.3", "80"}, {"fd00::4", "8080"}}"#));
        assert!(script.contains("thread.addr = wrk.lookup(a[1], a[2])[1]"));
    }

    #[test]
    fn iperf3_json_is_parsed() {
        let ok = r#"{"start": {}, "end": {"sum_received": {"bits_per_second": 1.38e10}}}"#;
        assert_eq!(parse_iperf3(ok).unwrap(), 1.38e10);
        let failed = r#"{"start": {}, "error": "unable to connect to server: Connection refused"}"#;
        assert_eq!(
            format!("{:#}", parse_iperf3(failed).unwrap_err()),
            "unable to connect to server: Connection refused"
        );
    }
}

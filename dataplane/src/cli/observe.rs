//! `dataplane observe`: the agent's flow records, like `hubble observe`: the latest ones, or
//! following new ones as they come, as JSON lines or one compact line each, filtered by
//! verdict, source, destination, port, protocol and IP family.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    control::DEFAULT_SOCKET,
    flows::{
        filter::{Filter, ObserveRequest},
        record::{self, Record},
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line per flow: time, ends, where it went, verdict, flags, translation.
    Compact,
    /// Hubble's flows as `hubble observe -o json` prints them (valid against flow.proto).
    Json,
    /// As `json`, plus our `flow.connection` (event and counters) and `flow.translation`.
    JsonExtended,
}

#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    /// Keep printing new flows as they come (until interrupted).
    #[arg(short = 'f', long)]
    follow: bool,
    /// Print the last N matching flows first (default 20; with --follow none).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    #[arg(short = 'o', long, value_enum, default_value = "compact")]
    output: Output,
    /// Only flows with this verdict: FORWARDED, TRANSLATED or DROPPED.
    #[arg(long)]
    verdict: Option<String>,
    /// Only flows from this container (name), IP address or CIDR prefix (IPv4 or IPv6),
    /// `host` or `world`.
    #[arg(long, value_name = "NAME")]
    from: Option<String>,
    /// Only flows to this container (name), service (name), IP address or CIDR prefix (IPv4
    /// or IPv6), `host` or `world`.
    #[arg(long, value_name = "NAME")]
    to: Option<String>,
    /// Only flows with this IP address or CIDR prefix (IPv4 or IPv6) at either end.
    #[arg(long, value_name = "ADDR|CIDR")]
    ip: Option<String>,
    /// Only flows with this port at either end (or as a translated address's port, e.g. a
    /// published port).
    #[arg(long)]
    port: Option<u16>,
    /// Only flows of this protocol: tcp, udp, icmp (ICMPv4 and ICMPv6), icmpv4 or icmpv6.
    #[arg(long)]
    protocol: Option<String>,
    /// Only IPv4 flows.
    #[arg(short = '4', long, conflicts_with = "ipv6")]
    ipv4: bool,
    /// Only IPv6 flows.
    #[arg(short = '6', long)]
    ipv6: bool,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

impl ObserveArgs {
    fn request(&self) -> ObserveRequest {
        ObserveRequest {
            follow: self.follow,
            last: self.last,
            extended: self.output != Output::Json,
            filter: Filter {
                verdict: self.verdict.clone(),
                from: self.from.clone(),
                to: self.to.clone(),
                ip: self.ip.clone(),
                port: self.port,
                protocol: self.protocol.clone(),
                ip_version: match (self.ipv4, self.ipv6) {
                    (true, _) => Some("4".into()),
                    (_, true) => Some("6".into()),
                    _ => None,
                },
            },
        }
    }
}

/// What the agent sent instead of records.
#[derive(serde::Deserialize)]
struct AgentError {
    error: String,
}

pub fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let request = args.request();
    request.filter.check()?;
    let mut stream = UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "cannot reach the agent on {} (is `dataplane agent` running? give --socket if it \
             uses another)",
            args.socket.display()
        )
    })?;
    if !args.follow {
        // The history comes at once; a silent agent is a stuck one.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    }
    let line = serde_json::to_string(&request).context("encoding the request")?;
    writeln!(stream, "observe {line}").context("sending the request")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the agent's reply")?;
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(AgentError { error }) = serde_json::from_str(&line) {
            bail!("the agent refused the request: {error}");
        }
        let text = match args.output {
            Output::Json | Output::JsonExtended => line,
            Output::Compact => {
                let record: Record = serde_json::from_str(&line)
                    .with_context(|| format!("a record the agent sent is not valid: {line}"))?;
                record::compact(&record)
            }
        };
        // A closed stdout (`| head`) ends the command quietly.
        if writeln!(out, "{text}").is_err() || (args.follow && out.flush().is_err()) {
            return Ok(());
        }
    }
    Ok(())
}

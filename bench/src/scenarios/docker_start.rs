//! `docker-start` (issue 14.3): how long after `docker run -d -p` returns a new container's
//! port answers a client outside the host, Docker's own dataplane against ours, over 30 starts
//! on a host that already runs 15 idle containers.
//!
//! With Docker's own dataplane the iptables rules are in place before `docker run` returns,
//! so the time is nginx's own start. With ours the agent learns of the container from the
//! engine's event stream and publishes its port then; until it has, dockerd's placeholder
//! socket holds the port (`--userland-proxy=false` still listens on it) and the agent resets
//! the connections that reached it once the port is published. The client does what a
//! user's retrying client does: a refused or reset attempt is tried again at once, an attempt
//! that gets no answer within a second counts as hung and is tried again too. Times are from
//! `docker run` returning to the first HTTP answer; the client runs on a thread of this
//! process inside the outside namespace, so no process start is in the time.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::dockerd::{Cli, Engine};

use super::docker::{IMAGE, start_engine};
use super::{HOST_IP, socket_addr};
use crate::bed::Bed;
use crate::client::Targets;
use crate::framework::Durations;
use crate::framework::metric::{Better, Metric};
use crate::framework::scenario::{PathDef, Scenario};
use crate::framework::workload::{CustomWorkload, Workload};

const SPEC: &str = r#"# Written by cargo xtask bench (scenario docker-start).
uplink: eth0
"#;

/// Starts measured per workload run, and idle containers the host runs meanwhile.
const STARTS: u16 = 30;
const IDLE: usize = 15;
const FIRST_PORT: u16 = 8100;
/// One attempt's limit: an attempt without an answer by then has hung.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// When a start counts as failed.
const GIVE_UP: Duration = Duration::from_secs(20);

pub static START_P50: Metric = Metric {
    key: "start_to_answer_p50_ms",
    label: "docker run returned -> first answer, median",
    short: "p50",
    unit: "ms",
    better: Better::Lower,
};
pub static START_P99: Metric = Metric {
    key: "start_to_answer_p99_ms",
    label: "docker run returned -> first answer, p99",
    short: "p99",
    unit: "ms",
    better: Better::Lower,
};
pub static REFUSED: Metric = Metric {
    key: "start_attempts_refused",
    label: "attempts refused or reset before the answer (per 30 starts)",
    short: "refused",
    unit: "attempts",
    better: Better::Lower,
};
pub static HUNG: Metric = Metric {
    key: "start_attempts_hung",
    label: "attempts left without an answer for 1 s (per 30 starts)",
    short: "hung",
    unit: "attempts",
    better: Better::Lower,
};

static STARTS_WORKLOAD: CustomWorkload = CustomWorkload {
    label: "30 docker runs",
    metrics: &[&START_P50, &START_P99, &REFUSED, &HUNG],
    run,
};

static WORKLOADS: [Workload; 1] = [Workload::Custom(&STARTS_WORKLOAD)];

pub fn scenario() -> Scenario {
    Scenario {
        name: "docker-start",
        title: "docker run -d -p PORT:80 (nginx) on a host with 15 idle containers, then at once \
                a request from the outside: time until it is answered",
        spec: SPEC,
        servers: &[],
        client: "outside",
        workloads: &WORKLOADS,
        paths: vec![
            PathDef {
                name: "docker",
                description: "dockerd as installed: its own iptables rules and docker-proxy",
                setup: docker_setup,
            },
            PathDef {
                name: "dataplane",
                description: "dockerd with --iptables=false --userland-proxy=false, our agent \
                              following it (--docker)",
                setup: dataplane_setup,
            },
        ],
        subject: "dataplane",
        targets: &[],
    }
}

fn docker_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = start_engine(bed, true)?;
    run_idle(&engine)?;
    bed.keep(engine);
    Ok(targets())
}

fn dataplane_setup(bed: &mut Bed) -> anyhow::Result<Targets> {
    let engine = start_engine(bed, false)?;
    let socket = engine.socket.to_string_lossy().into_owned();
    bed.start_agent_args(&["--docker", &socket, "--uplink", "eth0", "--cgroup", "none"])?;
    run_idle(&engine)?;
    bed.keep(engine);
    Ok(targets())
}

/// The functional check's container, published on this port: it shows the path publishes
/// before any start is timed.
const CHECK_PORT: u16 = 8099;

fn targets() -> Targets {
    Targets {
        http: socket_addr(HOST_IP, CHECK_PORT),
        iperf: socket_addr(HOST_IP, CHECK_PORT),
    }
}

/// The idle containers, and the functional check's nginx.
fn run_idle(engine: &Engine) -> anyhow::Result<()> {
    engine.docker_ok(&[
        "run",
        "-d",
        "--stop-timeout",
        "1",
        "--name",
        "check",
        "-p",
        &format!("{CHECK_PORT}:80"),
        IMAGE,
        "/usr/sbin/nginx",
        "-c",
        "/etc/nginx/bench.conf",
    ])?;
    for i in 0..IDLE {
        engine.docker_ok(&[
            "run",
            "-d",
            "--stop-timeout",
            "1",
            "--name",
            &format!("idle{i}"),
            IMAGE,
            "/bin/sh",
            "-c",
            "exec sleep 3600",
        ])?;
    }
    Ok(())
}

/// How one start went for the client.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct FirstAnswer {
    pub after: Duration,
    pub refused: u32,
    pub hung: u32,
}

/// What one attempt got.
enum Attempt {
    Answered,
    Refused,
    Hung,
}

fn attempt(addr: SocketAddr) -> Attempt {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT) else {
        // Refused (RST to the SYN) or no SYN-ACK within the limit.
        return Attempt::Refused;
    };
    let _ = stream.set_read_timeout(Some(ATTEMPT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(ATTEMPT_TIMEOUT));
    if stream
        .write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        .is_err()
    {
        return Attempt::Refused;
    }
    let mut head = [0u8; 5];
    match stream.read_exact(&mut head) {
        Ok(()) if &head == b"HTTP/" => Attempt::Answered,
        Ok(()) => Attempt::Refused,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Attempt::Hung
        }
        Err(_) => Attempt::Refused,
    }
}

/// Tries `addr` until it answers, from the calling thread's namespace.
fn until_answered(addr: SocketAddr, started: Instant) -> anyhow::Result<FirstAnswer> {
    let mut answer = FirstAnswer::default();
    loop {
        match attempt(addr) {
            Attempt::Answered => {
                answer.after = started.elapsed();
                return Ok(answer);
            }
            Attempt::Refused => answer.refused += 1,
            Attempt::Hung => answer.hung += 1,
        }
        if started.elapsed() > GIVE_UP {
            bail!("{addr} did not answer within {GIVE_UP:?}: {answer:?}");
        }
        // A retrying client does not spin: a millisecond between attempts.
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn run(
    bed: &Bed,
    client: &str,
    _: &Targets,
    _: Durations,
) -> anyhow::Result<Vec<(&'static Metric, f64)>> {
    let engine = Cli::of(&bed.work_file("docker"));
    let netns = bed.sandbox().netns(client);
    let mut answers = Vec::new();
    for i in 0..STARTS {
        testbed::interrupt::check()?;
        let port = FIRST_PORT + i;
        let name = format!("start{i}");
        engine.docker_ok(&[
            "run",
            "-d",
            "--stop-timeout",
            "1",
            "--name",
            &name,
            "-p",
            &format!("{port}:80"),
            IMAGE,
            "/usr/sbin/nginx",
            "-c",
            "/etc/nginx/bench.conf",
        ])?;
        let started = Instant::now();
        let addr = SocketAddr::new(HOST_IP.parse().expect("address"), port);
        let answer = testbed::in_netns(&netns, move || until_answered(addr, started));
        engine.docker_ok(&["rm", "-f", &name])?;
        answers.push(answer.with_context(|| format!("start {i}"))?);
    }
    Ok(summarise(&answers))
}

/// The metrics of one run's starts.
pub fn summarise(answers: &[FirstAnswer]) -> Vec<(&'static Metric, f64)> {
    let mut ms: Vec<f64> = answers
        .iter()
        .map(|a| a.after.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let quantile = |q: f64| -> f64 {
        if ms.is_empty() {
            return f64::NAN;
        }
        // Nearest rank: the smallest value with at least q of the samples at or below it.
        let rank = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
        ms[rank - 1]
    };
    vec![
        (&START_P50, quantile(0.50)),
        (&START_P99, quantile(0.99)),
        (&REFUSED, answers.iter().map(|a| f64::from(a.refused)).sum()),
        (&HUNG, answers.iter().map(|a| f64::from(a.hung)).sum()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_and_attempts_add_up() {
        let answers: Vec<FirstAnswer> = (1..=30)
            .map(|i| FirstAnswer {
                after: Duration::from_millis(i),
                refused: u32::from(i % 2 == 0),
                hung: u32::from(i == 30),
            })
            .collect();
        let got: Vec<(&str, f64)> = summarise(&answers)
            .into_iter()
            .map(|(m, v)| (m.key, v))
            .collect();
        assert_eq!(
            got,
            [
                (START_P50.key, 15.0),
                (START_P99.key, 30.0),
                (REFUSED.key, 15.0),
                (HUNG.key, 1.0)
            ]
        );
        assert!(summarise(&[])[0].1.is_nan());
    }
}

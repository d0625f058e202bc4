//! The runner: every selected scenario against its baselines, side by side in one run.
//!
//! Every path of a scenario gets a fresh sandbox of network namespaces (bed.rs), all of a
//! scenario's sandboxes are up at once, and the runs are interleaved (run 1 of every path, then
//! run 2, ...) so that the noise of this shared 2-core machine (about +-20%) lands on every
//! path alike: only ratios within one run are worth comparing. Results: a table on stdout, and
//! under bench/results/ a JSON file per run, latest.json, latest.svg (chart) and latest.md (the
//! table as Markdown, for bench/README.md).
//!
//! Nothing here touches the root network namespace: servers, clients, iptables rules and the
//! agent all live in the sandbox's namespaces, which are removed at the end, on error and on
//! Ctrl-C (a Drop guard per sandbox; SIGINT/SIGTERM only set a flag that the waits check,
//! testbed::interrupt).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use testbed::interrupt;

use crate::{
    bed::Bed,
    client::{self, Targets},
    framework::{
        Durations,
        scenario::{PathDef, Scenario},
    },
    report::{
        RunReport,
        results::{Machine, PathResult, ScenarioResult, now_utc},
    },
    step, workspace_root,
};
/// Sandbox names start with this, then our pid, then the path: a later run can tell which
/// sandboxes were left behind by a run that died (its pid is gone) and remove them.
const NAME_PREFIX: &str = "dpbench";

/// Runs every scenario, or those named in `only`.
pub fn run(binary: &Path, quick: bool, only: &[String]) -> anyhow::Result<()> {
    let scenarios = select(crate::scenarios::all(), only)?;
    interrupt::install_handlers();
    check_tools()?;
    sweep_stale(binary);

    let durations = Durations::new(quick);
    let work = std::env::temp_dir().join(format!("{NAME_PREFIX}-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = run_in(binary, quick, durations, &work, scenarios, only);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The scenarios named in `only` (all when empty), or which names exist.
fn select(all: Vec<Scenario>, only: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if let Some(unknown) = only.iter().find(|n| !all.iter().any(|s| &s.name == n)) {
        bail!(
            "no scenario {unknown:?}; there are {}",
            all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|s| only.is_empty() || only.iter().any(|n| n == s.name))
        .collect())
}

fn run_in(
    binary: &Path,
    quick: bool,
    durations: Durations,
    work: &Path,
    selected: Vec<Scenario>,
    only: &[String],
) -> anyhow::Result<()> {
    let started = now_utc();
    let machine = Machine::collect();
    step(
        "bench",
        &format!(
            "{} mode: {} runs of wrk {} s (after {} s warm-up) and iperf3 {} s per path; \
             load average {}",
            if quick { "quick" } else { "full" },
            durations.runs,
            durations.wrk_secs,
            durations.warmup_secs,
            durations.iperf_secs,
            machine.loadavg_start
        ),
    );

    // Builds or tests running beside the bench take cores from it (there are 2): say so, since
    // the numbers of such a run are noisier (ratios within it still compare like with like).
    let load: f64 = machine
        .loadavg_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load > 0.5 * machine.nproc as f64 {
        step(
            "bench",
            &format!(
                "warning: load average {load:.2} on {} cores before starting: something else is                  running; expect noisier numbers",
                machine.nproc
            ),
        );
    }

    let mut scenarios = Vec::new();
    for scenario in selected {
        interrupt::check()?;
        scenarios.push(run_scenario(binary, &scenario, durations, work)?);
    }

    let report = RunReport::new(started, quick, durations, machine, scenarios);
    println!();
    print!("{}", report.text_table());
    let dir = workspace_root().join("bench").join("results");
    // A run of some scenarios leaves the full run's latest.* alone.
    let latest = if only.is_empty() {
        "latest".to_owned()
    } else {
        format!("latest-{}", only.join("-"))
    };
    let written = report.write(&dir, &latest)?;
    step(
        "bench",
        &format!(
            "results: {}",
            written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}

/// One prepared path: its sandbox (None once it failed) and where clients connect.
struct Live {
    name: &'static str,
    bed: Option<Bed>,
    targets: Option<Targets>,
    error: Option<String>,
    result: PathResult,
}

fn run_scenario(
    binary: &Path,
    scenario: &Scenario,
    durations: Durations,
    work: &Path,
) -> anyhow::Result<ScenarioResult> {
    step(
        "bench",
        &format!("scenario {}: {}", scenario.name, scenario.title),
    );
    // Build every path's sandbox first; a path that cannot be built or fails its functional
    // check is reported as FAILED and the others still run.
    let mut live = Vec::new();
    for path in &scenario.paths {
        interrupt::check()?;
        let name = format!("{NAME_PREFIX}-{}-{}", std::process::id(), path.name);
        step(
            "bench",
            &format!("path {}: {} (sandbox {name})", path.name, path.description),
        );
        let prepared = prepare(binary, scenario, path, &name, work);
        interrupt::check()?;
        let (bed, targets, error) = match prepared {
            Ok((bed, targets)) => (Some(bed), Some(targets), None),
            Err(e) => {
                let reason = format!("{e:#}");
                eprintln!("    FAILED: {reason}");
                (None, None, Some(reason))
            }
        };
        live.push(Live {
            name: path.name,
            bed,
            targets,
            error,
            result: PathResult::new(path.name, path.description, scenario.metrics()),
        });
    }

    // Interleaved: for each workload and run, every live path in turn.
    let ok_paths = live.iter().filter(|l| l.bed.is_some()).count();
    let total = scenario.workloads.len() * durations.runs * ok_paths;
    let mut done = 0;
    let started = Instant::now();
    for workload in scenario.workloads {
        for run in 1..=durations.runs {
            for path in live.iter_mut() {
                let (Some(bed), Some(targets)) = (&path.bed, &path.targets) else {
                    continue;
                };
                interrupt::check()?;
                done += 1;
                eprint!(
                    "{} {:<10} {:<16} run {run}/{} ... ",
                    progress(done, total, started),
                    path.name,
                    workload.label(),
                    durations.runs,
                );
                let outcome = workload.run(bed, scenario.client, targets, durations);
                // End the progress line before the error goes out.
                interrupt::check().inspect_err(|_| eprintln!())?;
                match outcome {
                    Ok(values) => {
                        eprintln!("{}", crate::framework::metric::describe_values(&values));
                        path.result.record(&values);
                    }
                    Err(e) => {
                        let reason = format!("{e:#}");
                        eprintln!("FAILED: {reason}");
                        path.result.record_failure(workload.metric_keys(), &reason);
                    }
                }
            }
        }
    }
    eprintln!(
        "{done} measurements in {}",
        fmt_secs(started.elapsed().as_secs())
    );

    // Stop servers and agents, remove the sandboxes (the guards' Drop), then summarise.
    let mut results = Vec::new();
    for mut path in live {
        drop(path.bed.take());
        if let Some(error) = path.error {
            path.result.fail(&error);
        }
        results.push(path.result);
    }
    Ok(ScenarioResult::new(scenario, results))
}

/// A fresh sandbox for one path with the scenario's servers running, the path's translation in
/// place, and one request through it answered.
fn prepare(
    binary: &Path,
    scenario: &Scenario,
    path: &PathDef,
    name: &str,
    work: &Path,
) -> anyhow::Result<(Bed, Targets)> {
    let mut bed = Bed::up(binary, name, scenario.spec, &work.join(name))?;
    for server in scenario.servers {
        bed.start_server(server)?;
    }
    let targets =
        (path.setup)(&mut bed).with_context(|| format!("setting up path {}", path.name))?;
    client::functional_check(&bed, scenario.client, &targets)?;
    Ok((bed, targets))
}

/// `[ 3/27] #####-------- ETA 1m20s`
fn progress(done: usize, total: usize, started: Instant) -> String {
    const WIDTH: usize = 20;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
    let width = total.to_string().len();
    // The measurement about to run is not finished yet: estimate from those before it.
    let finished = done.saturating_sub(1);
    let eta = if finished == 0 || done > total {
        String::from("ETA   ?  ")
    } else {
        let per = started.elapsed().as_secs_f64() / finished as f64;
        let left = (per * (total - finished) as f64) as u64;
        format!("ETA {:>5}", fmt_secs(left))
    };
    format!("[{done:>width$}/{total}] {bar} {eta}")
}

fn fmt_secs(secs: u64) -> String {
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// The programs the bench drives; `cargo xtask setup` installs them (setup.rs).
fn check_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        "wrk",
        "iperf3",
        "nginx",
        "iptables-restore",
        "curl",
        "nsenter",
        "ip",
    ]
    .into_iter()
    .filter(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    if !missing.is_empty() {
        bail!(
            "missing {}; `cargo xtask setup` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Removes sandboxes (with their processes), pins, sockets and temp dirs that an earlier bench
/// left when it was killed (SIGKILL runs no Drop): those named `dpbench-PID[-*]` whose PID no
/// longer runs.
fn sweep_stale(binary: &Path) {
    let stale = |dir: &Path| -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| stale_pid(name).is_some())
            .collect()
    };
    for name in stale(Path::new(dataplane::sandbox::SANDBOX_ROOT)) {
        step(
            "bench",
            &format!("removing sandbox {name} left by an earlier run"),
        );
        testbed::sandbox::remove(binary, &name);
    }
    let tmp = std::env::temp_dir();
    for name in stale(&tmp) {
        let _ = std::fs::remove_dir_all(tmp.join(name));
    }
}

/// The pid in a `dpbench-PID` or `dpbench-PID-path` name, if that process is gone.
fn stale_pid(name: &str) -> Option<u32> {
    let pid: u32 = name
        .strip_prefix(NAME_PREFIX)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    let gone = pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists();
    gone.then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_fills_and_estimates() {
        let start = Instant::now();
        assert!(progress(1, 27, start).starts_with("[ 1/27] --------------------"));
        assert!(progress(14, 27, start).starts_with("[14/27] ##########----------"));
        assert!(progress(1, 27, start).ends_with("ETA   ?  "));
        assert!(progress(27, 27, start).contains("####################"));
        assert_eq!(
            progress(0, 0, start),
            "[0/0] #################### ETA   ?  "
        );
    }

    #[test]
    fn only_names_of_gone_runs_are_stale() {
        // pid 0 is never a process directory; our own pid is alive.
        assert_eq!(stale_pid("dpbench-0-plain"), Some(0));
        assert_eq!(stale_pid("dpbench-0"), Some(0));
        assert_eq!(
            stale_pid(&format!("dpbench-{}-plain", std::process::id())),
            None
        );
        assert_eq!(stale_pid("dpbench-x-plain"), None);
        assert_eq!(stale_pid("dpbenchmark-0"), None);
        assert_eq!(stale_pid("dbg"), None);
    }

    #[test]
    fn scenarios_are_selected_by_name() -> anyhow::Result<()> {
        let names = |only: &[&str]| {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            select(crate::scenarios::all(), &only)
                .map(|v| v.iter().map(|s| s.name).collect::<Vec<_>>())
        };
        assert_eq!(names(&[])?.len(), crate::scenarios::all().len());
        assert_eq!(names(&[])?[..2], ["published-port", "flow-logging"]);
        assert_eq!(names(&["flow-logging"])?, vec!["flow-logging"]);
        assert_eq!(names(&["vip", "localhost"])?, vec!["vip", "localhost"]);
        let err = format!("{:#}", names(&["nope"]).unwrap_err());
        assert!(
            err.contains("there are published-port, flow-logging, vip"),
            "{err}"
        );
        Ok(())
    }
}

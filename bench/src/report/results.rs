//! Results: statistics per metric and path, ratios against the baselines, and the machine they
//! were measured on (serialized as the run's JSON).

use std::{collections::BTreeMap, process::Command};

use serde::Serialize;

use crate::framework::{
    Durations,
    metric::{Better, Metric},
    scenario::Scenario,
};

/// Bumped when the JSON's shape changes incompatibly.
const SCHEMA: u32 = 1;

#[derive(Serialize)]
pub struct RunReport {
    pub schema: u32,
    pub started: String,
    pub finished: String,
    pub quick: bool,
    pub durations: Durations,
    pub clients: Clients,
    pub machine: Machine,
    pub scenarios: Vec<ScenarioResult>,
}

/// How the clients were run (constant, recorded so that results stay self-describing).
#[derive(Serialize)]
pub struct Clients {
    pub wrk: &'static str,
    pub iperf3: &'static str,
    pub nginx: &'static str,
    pub order: &'static str,
}

#[derive(Serialize)]
pub struct Machine {
    pub kernel: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub os: String,
    /// The machine is shared: a high load average means noisier numbers.
    pub loadavg_start: String,
    pub loadavg_end: String,
    /// The workspace's commit, `+dirty` when it has uncommitted changes.
    pub git_commit: String,
    pub tools: BTreeMap<&'static str, String>,
}

impl Machine {
    pub fn collect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let commit = command_line("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = !command_line("git", &["status", "--porcelain"]).is_empty();
        let mut tools = BTreeMap::new();
        tools.insert("wrk", command_line("wrk", &["-v"]));
        tools.insert("iperf3", command_line("iperf3", &["--version"]));
        tools.insert("nginx", command_line("nginx", &["-v"]));
        tools.insert("iptables", command_line("iptables", &["-V"]));
        Machine {
            kernel: command_line("uname", &["-r"]),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field(&cpuinfo, "model name"),
            mem_total: field(&meminfo, "MemTotal")
                .strip_suffix(" kB")
                .and_then(|kib| kib.trim().parse::<f64>().ok())
                .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
                .unwrap_or_default(),
            os: os_name(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            git_commit: format!("{commit}{}", if dirty { "+dirty" } else { "" }),
            tools,
        }
    }
}

/// `Debian GNU/Linux 12 (bookworm)`, from os-release's PRETTY_NAME.
fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// First line of a command's output (stdout, else stderr: `nginx -v` prints on stderr).
fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(crate::workspace_root())
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `2025-01-31T12:00:00Z`
pub fn now_utc() -> String {
    command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

#[derive(Serialize)]
pub struct ScenarioResult {
    pub name: &'static str,
    pub title: &'static str,
    pub client: &'static str,
    pub subject: &'static str,
    pub paths: Vec<PathResult>,
    pub ratios: Vec<Ratio>,
}

#[derive(Serialize)]
pub struct PathResult {
    pub name: &'static str,
    pub description: &'static str,
    /// Set when the path could not be built or failed its functional check; nothing of it
    /// was measured then.
    pub error: Option<String>,
    pub metrics: Vec<MetricResult>,
}

#[derive(Serialize)]
pub struct MetricResult {
    #[serde(skip)]
    pub metric: &'static Metric,
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Every successful run's value, in order.
    pub runs: Vec<f64>,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// The first failed run's reason; a metric with any failed run gets no median.
    pub error: Option<String>,
}

impl PathResult {
    pub fn new(
        name: &'static str,
        description: &'static str,
        metrics: Vec<&'static Metric>,
    ) -> PathResult {
        PathResult {
            name,
            description,
            error: None,
            metrics: metrics
                .into_iter()
                .map(|metric| MetricResult {
                    metric,
                    key: metric.key,
                    label: metric.label,
                    unit: metric.unit,
                    higher_is_better: metric.better == Better::Higher,
                    runs: Vec::new(),
                    median: None,
                    min: None,
                    max: None,
                    error: None,
                })
                .collect(),
        }
    }

    pub fn record(&mut self, values: &[(&'static Metric, f64)]) {
        for (metric, value) in values {
            if let Some(m) = self.metrics.iter_mut().find(|m| m.key == metric.key) {
                m.runs.push(*value);
                m.update();
            }
        }
    }

    pub fn record_failure(&mut self, keys: Vec<&'static str>, reason: &str) {
        for m in self.metrics.iter_mut().filter(|m| keys.contains(&m.key)) {
            m.error.get_or_insert_with(|| reason.to_string());
            m.update();
        }
    }

    pub fn fail(&mut self, reason: &str) {
        self.error = Some(reason.to_string());
    }

    pub fn metric(&self, key: &str) -> Option<&MetricResult> {
        self.metrics.iter().find(|m| m.key == key)
    }
}

impl MetricResult {
    fn update(&mut self) {
        let ok = self.error.is_none() && !self.runs.is_empty();
        self.median = ok.then(|| median(&self.runs));
        self.min = ok.then(|| self.runs.iter().copied().fold(f64::INFINITY, f64::min));
        self.max = ok.then(|| self.runs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// subject/baseline of one metric's medians; for lower-is-better metrics (latency) inverted,
/// baseline/subject, so that above 1 always means the subject did better.
#[derive(Serialize)]
pub struct Ratio {
    pub metric: &'static str,
    pub subject: &'static str,
    pub baseline: &'static str,
    pub value: Option<f64>,
    pub inverted: bool,
    /// The goal for this ratio, if the issues set one, and whether it was met.
    pub goal: Option<f64>,
    pub goal_source: Option<&'static str>,
    pub met: Option<bool>,
}

impl ScenarioResult {
    pub fn new(scenario: &Scenario, paths: Vec<PathResult>) -> ScenarioResult {
        let mut result = ScenarioResult {
            name: scenario.name,
            title: scenario.title,
            client: scenario.client,
            subject: scenario.subject,
            paths,
            ratios: Vec::new(),
        };
        let subject = result.path(scenario.subject);
        let mut ratios = Vec::new();
        for metric in scenario.metrics() {
            for baseline in result.baselines() {
                let median_of = |path: Option<&PathResult>| {
                    path.filter(|p| p.error.is_none())
                        .and_then(|p| p.metric(metric.key))
                        .and_then(|m| m.median)
                };
                let (s, b) = (median_of(subject), median_of(result.path(baseline)));
                let inverted = metric.better == Better::Lower;
                let value = match (s, b) {
                    (Some(s), Some(b)) if inverted && s > 0.0 => Some(b / s),
                    (Some(s), Some(b)) if !inverted && b > 0.0 => Some(s / b),
                    _ => None,
                };
                let goal = scenario
                    .targets
                    .iter()
                    .find(|g| g.metric.key == metric.key && g.baseline == baseline);
                ratios.push(Ratio {
                    metric: metric.key,
                    subject: scenario.subject,
                    baseline,
                    value,
                    inverted,
                    goal: goal.map(|g| g.min),
                    goal_source: goal.map(|g| g.source),
                    met: goal.and_then(|g| value.map(|v| v >= g.min)),
                });
            }
        }
        result.ratios = ratios;
        result
    }

    pub fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }

    /// The paths the subject is compared with, nearest competitor first (the reverse of the
    /// order they are listed in, which runs from the upper bound towards the subject).
    pub fn baselines(&self) -> Vec<&'static str> {
        self.paths
            .iter()
            .rev()
            .map(|p| p.name)
            .filter(|n| *n != self.subject)
            .collect()
    }

    pub fn ratio(&self, metric: &str, baseline: &str) -> Option<&Ratio> {
        self.ratios
            .iter()
            .find(|r| r.metric == metric && r.baseline == baseline)
    }

    /// Every metric of the scenario, from the first path (all paths have the same).
    pub fn metrics(&self) -> Vec<&'static Metric> {
        self.paths
            .first()
            .map(|p| p.metrics.iter().map(|m| m.metric).collect())
            .unwrap_or_default()
    }
}

impl RunReport {
    pub fn new(
        started: String,
        quick: bool,
        durations: Durations,
        mut machine: Machine,
        scenarios: Vec<ScenarioResult>,
    ) -> RunReport {
        machine.loadavg_end = loadavg();
        RunReport {
            schema: SCHEMA,
            started,
            finished: now_utc(),
            quick,
            durations,
            clients: Clients {
                wrk: "wrk -t1 -c32 --latency, after a warm-up run; req/s = requests / duration",
                iperf3: "iperf3 -c -P 1 and -P 4; bits/s received by the server",
                nginx: "nginx 1 worker, access_log off, return 200 \"ok\\n\", keep-alive",
                order: "all paths' sandboxes up at once; each run goes through every path in \
                        turn (run 1 of all paths, then run 2, ...)",
            },
            machine,
            scenarios,
        }
    }

    /// When and on what: date, OS, kernel, cores, CPU, memory.
    pub fn machine_line(&self) -> String {
        let m = &self.machine;
        format!(
            "{} {}, kernel {}, {} cores ({}), {} RAM",
            self.started, m.os, m.kernel, m.nproc, m.cpu_model, m.mem_total
        )
    }

    /// How busy the machine was, and which code was measured.
    pub fn load_line(&self) -> String {
        let m = &self.machine;
        format!(
            "load average {} at start, {} at end; commit {}",
            m.loadavg_start, m.loadavg_end, m.git_commit
        )
    }
}

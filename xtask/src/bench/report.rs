//! Results: statistics per metric and path, ratios against the baselines, and the outputs (a
//! text table, Markdown for bench/README.md, JSON, and the SVG chart in svg.rs).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    Durations,
    scenario::{Better, Metric, Scenario},
    svg,
};

/// Bumped when the JSON's shape changes incompatibly.
const SCHEMA: u32 = 1;
/// Failure reasons longer than this are cut in table cells; the whole text follows the table.
const CELL_REASON_CHARS: usize = 36;

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

    /// The table as rows of cells: header first.
    fn rows(&self, markdown: bool) -> Vec<Vec<String>> {
        let mut header = vec!["metric".to_string()];
        header.extend(self.paths.iter().map(|p| p.name.to_string()));
        let baselines = self.baselines();
        header.extend(baselines.iter().map(|b| format!("{}/{b}", self.subject)));
        let mut rows = vec![header];
        for metric in self.metrics() {
            let mut row = vec![format!("{} ({})", metric.label, metric.unit)];
            for path in &self.paths {
                row.push(self.cell(path, metric.key, markdown));
            }
            for baseline in &baselines {
                row.push(match self.ratio(metric.key, baseline) {
                    Some(r) => ratio_cell(r),
                    None => "-".into(),
                });
            }
            rows.push(row);
        }
        rows
    }

    fn cell(&self, path: &PathResult, key: &str, markdown: bool) -> String {
        let failed = |reason: &str| {
            let reason = reason.replace('|', "/").replace('\n', " ");
            if markdown {
                format!("FAILED: {reason}")
            } else {
                format!("FAILED: {}", shorten(&reason, CELL_REASON_CHARS))
            }
        };
        if let Some(error) = &path.error {
            return failed(error);
        }
        let Some(m) = path.metric(key) else {
            return "-".into();
        };
        if let Some(error) = &m.error {
            return failed(error);
        }
        match (m.median, m.min, m.max) {
            (Some(median), Some(min), Some(max)) => format!(
                "{} [{}-{}]",
                m.metric.format_bare(median),
                m.metric.format_bare(min),
                m.metric.format_bare(max)
            ),
            _ => "-".into(),
        }
    }

    /// Every failure reason in full, for below the table.
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for path in &self.paths {
            if let Some(error) = &path.error {
                out.push(format!("{}: FAILED: {error}", path.name));
            }
            for m in &path.metrics {
                if let Some(error) = &m.error {
                    out.push(format!("{} {}: FAILED: {error}", path.name, m.label));
                }
            }
        }
        out
    }

    fn goal_lines(&self) -> Vec<String> {
        self.ratios
            .iter()
            .filter_map(|r| {
                let goal = r.goal?;
                let label = self
                    .metrics()
                    .into_iter()
                    .find(|m| m.key == r.metric)
                    .map_or(r.metric, |m| m.label);
                let verdict = match (r.value, r.met) {
                    (Some(v), Some(true)) => format!("{v:.2}x: met"),
                    (Some(v), _) => format!("{v:.2}x: MISSED"),
                    (None, _) => "not measured".into(),
                };
                Some(format!(
                    "{label} {}/{} >= {goal:.2}x ({}): {verdict}",
                    r.subject,
                    r.baseline,
                    r.goal_source.unwrap_or("")
                ))
            })
            .collect()
    }
}

fn ratio_cell(r: &Ratio) -> String {
    match (r.value, r.goal, r.met) {
        (Some(v), Some(goal), Some(met)) => format!(
            "{v:.2}x ({} {goal:.2})",
            if met { "goal met, >=" } else { "MISSED goal" }
        ),
        (Some(v), _, _) => format!("{v:.2}x"),
        (None, _, _) => "-".into(),
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}...", text.chars().take(max).collect::<String>())
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

    fn mode(&self) -> String {
        format!(
            "{}: median of {} runs [min-max]; wrk {} s after a {} s warm-up, iperf3 {} s",
            if self.quick { "quick" } else { "full" },
            self.durations.runs,
            self.durations.wrk_secs,
            self.durations.warmup_secs,
            self.durations.iperf_secs
        )
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

    pub fn text_table(&self) -> String {
        let mut out = String::new();
        for s in &self.scenarios {
            let _ = writeln!(out, "{}: {}", s.name, s.title);
            let _ = writeln!(out, "{}", self.mode());
            let _ = writeln!(out, "{}", self.machine_line());
            let _ = writeln!(out, "{}\n", self.load_line());
            let rows = s.rows(false);
            let columns = rows[0].len();
            let widths: Vec<usize> = (0..columns)
                .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
                .collect();
            for row in &rows {
                let line: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(cell, w)| format!("{cell:<w$}"))
                    .collect();
                let _ = writeln!(out, "{}", line.join("  ").trim_end());
            }
            let _ = writeln!(
                out,
                "\nratios compare medians; for latency they are inverted ({}/x is x/{}), so \
                 above 1 always means {} did better.",
                s.subject, s.subject, s.subject
            );
            for line in s.goal_lines() {
                let _ = writeln!(out, "goal: {line}");
            }
            for line in s.failures() {
                let _ = writeln!(out, "{line}");
            }
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for s in &self.scenarios {
            let _ = writeln!(out, "### {}\n", s.name);
            let _ = writeln!(out, "{}.\n", s.title);
            let _ = writeln!(
                out,
                "{}. {}; {}.\n",
                self.mode(),
                self.machine_line(),
                self.load_line()
            );
            let rows = s.rows(true);
            for (i, row) in rows.iter().enumerate() {
                let _ = writeln!(out, "| {} |", row.join(" | "));
                if i == 0 {
                    let _ = writeln!(out, "|{}", "---|".repeat(row.len()));
                }
            }
            out.push('\n');
            let _ = writeln!(
                out,
                "Ratios compare medians; latency ratios are inverted, so above 1 always means \
                 {} did better.\n",
                s.subject
            );
            for line in s.goal_lines() {
                let _ = writeln!(out, "- goal: {line}");
            }
            for line in s.failures() {
                let _ = writeln!(out, "- {}", line.replace('|', "/"));
            }
            out.push('\n');
        }
        out
    }

    /// Writes `<timestamp>.json`, `latest.json`, `latest.svg` and `latest.md` to `dir`.
    /// Writes `<start stamp>.json` and `{latest}.json|.svg|.md` into `dir`.
    pub fn write(&self, dir: &Path, latest: &str) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)? + "\n";
        let stamp: String = self
            .started
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        let files = [
            (format!("{stamp}.json"), json.clone()),
            (format!("{latest}.json"), json),
            (format!("{latest}.svg"), svg::chart(self)),
            (format!("{latest}.md"), self.markdown()),
        ];
        let mut written = Vec::new();
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::bench::scenario;

    /// A finished report of the published-port scenario with made-up numbers, dataplane failed.
    pub fn sample() -> RunReport {
        let scenario = scenario::all().remove(0);
        let mut paths = Vec::new();
        for (path, scale) in [("plain", 1.0), ("iptables", 0.8), ("dataplane", 0.0)] {
            let def = scenario.paths.iter().find(|p| p.name == path).unwrap();
            let mut result = PathResult::new(def.name, def.description, scenario.metrics());
            if scale == 0.0 {
                result.fail(
                    "functional check: `curl http://192.0.2.1:8080/` from outside: <refused>",
                );
            }
            for run in 0..3 {
                let f = scale * (1.0 + run as f64 / 20.0);
                result.record(&[
                    (&scenario::HTTP_RPS, 100_000.0 * f),
                    (&scenario::HTTP_P50, 0.3 / f.max(0.1)),
                    (&scenario::HTTP_P99, 1.0 / f.max(0.1)),
                    (&scenario::TCP_1, 14.0 * f),
                    (&scenario::TCP_4, 28.0 * f),
                ]);
            }
            paths.push(result);
        }
        let machine = Machine {
            kernel: "6.18".into(),
            nproc: 2,
            cpu_model: "Test CPU".into(),
            mem_total: "1 kB".into(),
            os: "Debian".into(),
            loadavg_start: "0.1 0.1 0.1".into(),
            loadavg_end: String::new(),
            git_commit: "abc".into(),
            tools: BTreeMap::new(),
        };
        let mut report = RunReport::new(
            "2025-01-31T12:00:00Z".into(),
            true,
            Durations::new(true),
            machine,
            vec![ScenarioResult::new(&scenario, paths)],
        );
        report.finished = "2025-01-31T12:03:00Z".into();
        report
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn a_failed_run_leaves_the_metric_without_a_median() {
        let mut path = PathResult::new("p", "d", vec![&scenario::HTTP_RPS, &scenario::TCP_1]);
        path.record(&[(&scenario::HTTP_RPS, 1.0), (&scenario::TCP_1, 2.0)]);
        path.record_failure(vec![scenario::TCP_1.key], "refused");
        assert_eq!(
            path.metric(scenario::HTTP_RPS.key).unwrap().median,
            Some(1.0)
        );
        assert_eq!(path.metric(scenario::TCP_1.key).unwrap().median, None);
    }

    #[test]
    fn ratios_need_both_medians_and_invert_latency() {
        let report = sample();
        let s = &report.scenarios[0];
        assert_eq!(s.baselines(), ["iptables", "plain"]);
        let r = s.ratio(scenario::HTTP_RPS.key, "iptables").unwrap();
        assert_eq!((r.value, r.goal, r.met), (None, Some(1.25), None));
        assert!(s.ratio(scenario::HTTP_P99.key, "plain").unwrap().inverted);
    }

    #[test]
    fn table_shows_failed_cells_and_the_full_reason() {
        let text = sample().text_table();
        assert!(
            text.contains("FAILED: functional check: `curl http://192.0..."),
            "{text}"
        );
        assert!(
            text.contains("dataplane: FAILED: functional check"),
            "{text}"
        );
        assert!(text.contains("105.0k [100.0k-110.0k]"), "{text}");
        assert!(text.contains("not measured"), "{text}");
        let md = sample().markdown();
        assert!(
            md.contains("| metric | plain | iptables | dataplane |"),
            "{md}"
        );
    }

    #[test]
    fn json_has_the_machine_and_every_path() {
        let json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["machine"]["nproc"], 2);
        assert_eq!(json["durations"]["runs"], 3);
        let paths = json["scenarios"][0]["paths"].as_array().unwrap();
        assert_eq!(paths.len(), 3);
        assert_eq!(paths[0]["metrics"][0]["runs"].as_array().unwrap().len(), 3);
        assert!(
            paths[2]["error"]
                .as_str()
                .unwrap()
                .starts_with("functional check")
        );
    }
}

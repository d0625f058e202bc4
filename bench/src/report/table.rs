//! The run as tables: plain text for the terminal, Markdown for bench/README.md.

use std::fmt::Write as _;

use super::results::{PathResult, Ratio, RunReport, ScenarioResult};

/// Failure reasons longer than this are cut in table cells; the whole text follows the table.
const CELL_REASON_CHARS: usize = 36;

impl ScenarioResult {
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
}

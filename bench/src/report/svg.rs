//! The chart: per scenario one panel per metric, one bar per path at its median with a
//! min-max whisker, the ratios under each panel. Hand-written SVG: no dependency, and the
//! file opens in any browser.

use std::fmt::Write as _;

use super::results::{RunReport, ScenarioResult};

const PANEL_W: f64 = 220.0;
const PANEL_GAP: f64 = 24.0;
const MARGIN: f64 = 24.0;
const HEADER_H: f64 = 112.0;
/// Panels per row: a scenario with more metrics wraps onto further rows.
const PANELS_PER_ROW: usize = 6;
/// Panel title, plot and path labels of one row, before its ratio lines.
const ROW_H: f64 = 300.0;
/// The scenario's title above its first row.
const TITLE_H: f64 = 30.0;
const PLOT_TOP: f64 = 64.0;
const PLOT_H: f64 = 190.0;
const AXIS_W: f64 = 44.0;
const BAR_W: f64 = 34.0;
const LINE_H: f64 = 16.0;
/// Failure reasons are cut to this many characters in the chart (the JSON has them whole).
const REASON_CHARS: usize = 150;

fn color(path: &str, index: usize) -> &'static str {
    match path {
        "plain" => "#9e9e9e",
        "iptables" | "ip6tables" => "#e07b39",
        "dataplane" => "#2f6db5",
        _ => ["#5a9e5a", "#a05fb0", "#c9a227"][index % 3],
    }
}

pub fn chart(report: &RunReport) -> String {
    let panels = report
        .scenarios
        .iter()
        .map(|s| s.metrics().len())
        .max()
        .unwrap_or(1)
        .clamp(1, PANELS_PER_ROW) as f64;
    let width = MARGIN * 2.0 + panels * PANEL_W + (panels - 1.0) * PANEL_GAP;
    let failures: usize = report
        .scenarios
        .iter()
        .map(|s| failure_lines(s).len())
        .sum();
    let height = HEADER_H
        + report.scenarios.iter().map(scenario_height).sum::<f64>()
        + failures as f64 * LINE_H
        + MARGIN;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    text(
        &mut svg,
        MARGIN,
        34.0,
        20,
        "bold",
        "#222",
        "start",
        &format!(
            "cargo xtask bench{}",
            if report.quick { " --quick" } else { "" }
        ),
    );
    text(
        &mut svg,
        MARGIN,
        58.0,
        13,
        "normal",
        "#333",
        "start",
        &format!(
            "median of {} runs, whiskers min-max; wrk {} s, iperf3 {} s per run; ratios compare \
             medians, latency ratios inverted (above 1 = better)",
            report.durations.runs, report.durations.wrk_secs, report.durations.iperf_secs
        ),
    );
    text(
        &mut svg,
        MARGIN,
        78.0,
        12,
        "normal",
        "#666",
        "start",
        &report.machine_line(),
    );
    text(
        &mut svg,
        MARGIN,
        94.0,
        12,
        "normal",
        "#666",
        "start",
        &report.load_line(),
    );

    let mut y = HEADER_H;
    for scenario in &report.scenarios {
        scenario_block(&mut svg, scenario, y);
        y += scenario_height(scenario);
    }
    for scenario in &report.scenarios {
        for line in failure_lines(scenario) {
            text(&mut svg, MARGIN, y, 12, "normal", "#b00020", "start", &line);
            y += LINE_H;
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn failure_lines(scenario: &ScenarioResult) -> Vec<String> {
    let mut lines = Vec::new();
    for path in &scenario.paths {
        let reason = path
            .error
            .as_ref()
            .or_else(|| path.metrics.iter().find_map(|m| m.error.as_ref()));
        if let Some(reason) = reason {
            let mut line = format!("{} {}: FAILED: {reason}", scenario.name, path.name);
            if line.chars().count() > REASON_CHARS {
                line = line.chars().take(REASON_CHARS).collect::<String>() + "...";
            }
            lines.push(line);
        }
    }
    lines
}

/// One row of panels with its ratio lines (one per baseline).
fn row_height(scenario: &ScenarioResult) -> f64 {
    ROW_H + scenario.baselines().len() as f64 * LINE_H + 12.0
}

fn scenario_height(scenario: &ScenarioResult) -> f64 {
    let rows = scenario.metrics().len().div_ceil(PANELS_PER_ROW).max(1);
    TITLE_H + rows as f64 * row_height(scenario)
}

fn scenario_block(svg: &mut String, scenario: &ScenarioResult, top: f64) {
    text(
        svg,
        MARGIN,
        top + 18.0,
        15,
        "bold",
        "#222",
        "start",
        &format!("{}: {}", scenario.name, scenario.title),
    );
    for (i, metric) in scenario.metrics().into_iter().enumerate() {
        let left = MARGIN + (i % PANELS_PER_ROW) as f64 * (PANEL_W + PANEL_GAP);
        let panel_top = top + TITLE_H + (i / PANELS_PER_ROW) as f64 * row_height(scenario);
        // Long titles (scale's `N=1000: requests/s, ...`) take two lines.
        let title = format!("{} ({})", metric.label, metric.unit);
        let lines = title_lines(&title);
        for (k, line) in lines.iter().enumerate() {
            text(
                svg,
                left + PANEL_W / 2.0,
                panel_top + 14.0 + k as f64 * 14.0,
                if lines.len() > 1 { 12 } else { 13 },
                "bold",
                "#222",
                "middle",
                line,
            );
        }
        text(
            svg,
            left + PANEL_W / 2.0,
            panel_top + 30.0 + (lines.len() - 1) as f64 * 12.0,
            11,
            "normal",
            "#666",
            "middle",
            if metric.better == crate::framework::metric::Better::Higher {
                "higher is better"
            } else {
                "lower is better"
            },
        );

        // Scale: 0 to a round number above every path's max.
        let top_value = scenario
            .paths
            .iter()
            .filter(|p| p.error.is_none())
            .filter_map(|p| p.metric(metric.key).and_then(|m| m.max))
            .fold(0.0, f64::max);
        let scale_max = nice_ceiling(top_value * 1.08);
        let plot_top = panel_top + PLOT_TOP;
        let plot_bottom = plot_top + PLOT_H;
        let plot_left = left + AXIS_W;
        let plot_w = PANEL_W - AXIS_W;
        let y_of = |v: f64| plot_bottom - (v / scale_max).clamp(0.0, 1.0) * PLOT_H;
        for tick in 0..=4 {
            let v = scale_max * f64::from(tick) / 4.0;
            let y = y_of(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{plot_left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/>"##,
                left + PANEL_W
            );
            text(
                svg,
                plot_left - 4.0,
                y + 4.0,
                10,
                "normal",
                "#666",
                "end",
                &metric.format_bare(v),
            );
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{plot_left:.1}" y1="{plot_bottom:.1}" x2="{:.1}" y2="{plot_bottom:.1}" stroke="#888"/>"##,
            left + PANEL_W
        );

        let slots = scenario.paths.len().max(1) as f64;
        for (j, path) in scenario.paths.iter().enumerate() {
            let center = plot_left + plot_w * (j as f64 + 0.5) / slots;
            let x = center - BAR_W / 2.0;
            let m = path.metric(metric.key);
            let stats = m.and_then(|m| Some((m.median?, m.min?, m.max?)));
            match (path.error.is_none(), stats) {
                (true, Some((median, min, max))) => {
                    let y = y_of(median);
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{BAR_W}" height="{:.1}" fill="{}"><title>{}: median {}, min {}, max {}</title></rect>"#,
                        plot_bottom - y,
                        color(path.name, j),
                        escape(path.name),
                        metric.format(median),
                        metric.format(min),
                        metric.format(max)
                    );
                    let (y_min, y_max) = (y_of(min), y_of(max));
                    let _ = writeln!(
                        svg,
                        r##"<path d="M{center:.1} {y_min:.1}V{y_max:.1}M{:.1} {y_min:.1}h10M{:.1} {y_max:.1}h10" stroke="#222" fill="none"/>"##,
                        center - 5.0,
                        center - 5.0
                    );
                    text(
                        svg,
                        center,
                        y_max - 5.0,
                        10,
                        "normal",
                        "#222",
                        "middle",
                        &metric.format_bare(median),
                    );
                }
                // Measured on no run and failed on none: the metric does not exist for this
                // path (the agent's CPU of an iptables path) or was skipped (--quick).
                (true, None) if m.is_none_or(|m| m.runs.is_empty() && m.error.is_none()) => {
                    text(
                        svg,
                        center,
                        plot_bottom - 8.0,
                        11,
                        "normal",
                        "#888",
                        "middle",
                        "n/a",
                    );
                }
                _ => {
                    let _ = writeln!(
                        svg,
                        r##"<rect x="{x:.1}" y="{:.1}" width="{BAR_W}" height="{:.1}" fill="#fdecee" stroke="#b00020" stroke-dasharray="4 3"/>"##,
                        plot_bottom - PLOT_H * 0.6,
                        PLOT_H * 0.6
                    );
                    let _ = writeln!(
                        svg,
                        r##"<text x="{center:.1}" y="{:.1}" font-size="12" font-weight="bold" fill="#b00020" text-anchor="middle" transform="rotate(-90 {center:.1} {:.1})">FAILED</text>"##,
                        plot_bottom - PLOT_H * 0.3 + 4.0,
                        plot_bottom - PLOT_H * 0.3
                    );
                }
            }
            text(
                svg,
                center,
                plot_bottom + 16.0,
                11,
                "normal",
                "#222",
                "middle",
                path.name,
            );
        }

        let mut y = plot_bottom + 38.0;
        for baseline in scenario.baselines() {
            let ratio = scenario.ratio(metric.key, baseline);
            let (value, fill) = match ratio.and_then(|r| r.value.map(|v| (v, r.met))) {
                Some((v, Some(true))) => (format!("{v:.2}x (goal met)"), "#1b7a1b"),
                Some((v, Some(false))) => (format!("{v:.2}x (goal missed)"), "#b00020"),
                Some((v, None)) => (format!("{v:.2}x"), "#222"),
                None => ("-".to_string(), "#666"),
            };
            text(
                svg,
                left + PANEL_W / 2.0,
                y,
                11,
                "normal",
                fill,
                "middle",
                &format!("{}/{baseline}: {value}", scenario.subject),
            );
            y += LINE_H;
        }
    }
}

/// A panel title in lines that fit the panel: split after `N=...:`, then at the space nearest
/// the middle of what is still too long.
fn title_lines(title: &str) -> Vec<String> {
    const MAX_CHARS: usize = 32;
    let halve = |line: &str| -> Vec<String> {
        if line.chars().count() <= MAX_CHARS {
            return vec![line.to_string()];
        }
        let middle = line.len() / 2;
        match line
            .match_indices(' ')
            .map(|(i, _)| i)
            .min_by_key(|i| i.abs_diff(middle))
        {
            Some(i) => vec![line[..i].to_string(), line[i + 1..].to_string()],
            None => vec![line.to_string()],
        }
    };
    if title.chars().count() <= MAX_CHARS {
        return vec![title.to_string()];
    }
    match title.split_once(": ") {
        Some((first, rest)) => {
            let mut lines = vec![format!("{first}:")];
            lines.extend(halve(rest));
            lines
        }
        None => halve(title),
    }
}

#[allow(clippy::too_many_arguments)]
fn text(
    svg: &mut String,
    x: f64,
    y: f64,
    size: u32,
    weight: &str,
    fill: &str,
    anchor: &str,
    content: &str,
) {
    let _ = writeln!(
        svg,
        r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" font-weight="{weight}" fill="{fill}" text-anchor="{anchor}">{}</text>"#,
        escape(content)
    );
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The smallest round number (1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6 or 8 times a power of ten: each
/// splits into 4 readable ticks) that is at least `v`; 1 for nothing.
fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(v.log10().floor());
    [1.0, 1.2, 1.6, 2.0, 2.4, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * power)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    #[test]
    fn long_titles_take_two_lines() {
        assert_eq!(
            title_lines("HTTP requests/s (req/s)"),
            ["HTTP requests/s (req/s)"]
        );
        assert_eq!(
            title_lines("N=1000: latency p99, handshake included (ms)"),
            ["N=1000:", "latency p99, handshake", "included (ms)"]
        );
        assert_eq!(
            title_lines("N=10: agent reconcile (its log) (ms)"),
            ["N=10:", "agent reconcile (its log) (ms)"]
        );
        assert_eq!(
            title_lines("HTTP latency p50, new connection, handshake included (ms)").len(),
            2
        );
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(87_000.0), 100_000.0);
        assert_eq!(nice_ceiling(136_500.0), 160_000.0);
        assert_eq!(nice_ceiling(13.8), 16.0);
        assert_eq!(nice_ceiling(0.42), 0.5);
        assert_eq!(nice_ceiling(2.2), 2.4);
        assert_eq!(nice_ceiling(10.0), 10.0);
    }

    #[test]
    fn chart_is_one_svg_with_a_bar_per_measured_path_and_escaped_text() {
        let svg = chart(&sample());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        // 5 metrics x 2 measured paths with a median bar; the failed one drawn as FAILED.
        assert_eq!(svg.matches("<title>").count(), 10);
        assert_eq!(svg.matches(">FAILED</text>").count(), 5);
        assert!(svg.contains("&lt;refused&gt;"));
        assert!(!svg.contains("<refused>"));
    }
}

//! The report of a run: results (results.rs, also the JSON), tables (table.rs) and the chart
//! (svg.rs), written under bench/results/.

pub mod results;
mod svg;
mod table;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub use results::RunReport;

impl RunReport {
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
    use std::collections::BTreeMap;

    use super::{
        results::{Machine, PathResult, ScenarioResult, median},
        *,
    };
    use crate::framework::{Durations, metric as scenario};

    /// A finished report of the published-port scenario with made-up numbers, dataplane failed.
    pub fn sample() -> RunReport {
        let scenario = crate::scenarios::all().remove(0);
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

//! The framework: what a scenario is ([`scenario`]), how a path is measured ([`workload`]) and
//! what is measured ([`metric`]), and how long ([`Durations`]). It knows no scenario; the
//! runner (run.rs) takes the list from scenarios/.

pub mod metric;
pub mod scenario;
pub mod workload;

/// How long each measurement runs, and how often it is repeated.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Durations {
    /// Repetitions of every measurement; the report gives their median, min and max. Three
    /// also with --quick: one run says nothing about the spread on a noisy machine.
    pub runs: usize,
    pub wrk_secs: u32,
    /// A short wrk run before every measured one, so connections, caches and conntrack are
    /// warm; its numbers are thrown away.
    pub warmup_secs: u32,
    pub iperf_secs: u32,
    /// `--quick`: scenarios may also skip their largest sizes (scale skips 50,000).
    pub quick: bool,
}

impl Durations {
    pub fn new(quick: bool) -> Durations {
        // Full runs were 10 s; 5 s keeps the whole run of all scenarios near 25 minutes on
        // 2 cores (bench/README.md), with 3 runs still giving a median and a spread.
        let secs = if quick { 3 } else { 5 };
        Durations {
            runs: 3,
            wrk_secs: secs,
            warmup_secs: 1,
            iperf_secs: secs,
            quick,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_keeps_three_runs() {
        assert_eq!(Durations::new(true).runs, 3);
        assert_eq!(Durations::new(true).wrk_secs, 3);
        assert_eq!(Durations::new(false).iperf_secs, 5);
    }
}

//! What a workload measures: a metric's key, label, unit and which way is better, and the
//! metrics the built-in workloads produce.

use std::fmt::Write as _;

/// `52.1k req/s, p50 0.41 ms, p99 1.20 ms`
pub fn describe_values(values: &[(&'static Metric, f64)]) -> String {
    let mut out = String::new();
    for (i, (metric, value)) in values.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if !metric.short.is_empty() {
            let _ = write!(out, "{} ", metric.short);
        }
        out.push_str(&metric.format(*value));
    }
    out
}

#[derive(Debug, PartialEq)]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug)]
pub struct Metric {
    /// Key in the JSON (`http_rps`).
    pub key: &'static str,
    /// Row label in the table and chart.
    pub label: &'static str,
    /// Prefix in progress lines.
    pub short: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

impl Metric {
    /// The value with its unit, for progress lines.
    pub fn format(&self, value: f64) -> String {
        match self.unit {
            "req/s" | "conn/s" => self.format_bare(value),
            unit => format!("{} {unit}", self.format_bare(value)),
        }
    }

    /// The value alone, for table cells whose row names the unit.
    pub fn format_bare(&self, value: f64) -> String {
        match self.unit {
            "req/s" | "conn/s" if value >= 1000.0 => format!("{:.1}k", value / 1000.0),
            "req/s" | "conn/s" => format!("{value:.0}"),
            "ms" => format!("{value:.3}"),
            _ => format!("{value:.2}"),
        }
    }
}

pub static HTTP_RPS: Metric = Metric {
    key: "http_requests_per_sec",
    label: "HTTP requests/s",
    short: "req/s",
    unit: "req/s",
    better: Better::Higher,
};
pub static HTTP_P50: Metric = Metric {
    key: "http_latency_p50_ms",
    label: "HTTP latency p50",
    short: "p50",
    unit: "ms",
    better: Better::Lower,
};
pub static HTTP_P99: Metric = Metric {
    key: "http_latency_p99_ms",
    label: "HTTP latency p99",
    short: "p99",
    unit: "ms",
    better: Better::Lower,
};
pub static TCP_1: Metric = Metric {
    key: "tcp_1_stream_gbps",
    label: "TCP 1 stream",
    short: "",
    unit: "Gbit/s",
    better: Better::Higher,
};
pub static TCP_4: Metric = Metric {
    key: "tcp_4_streams_gbps",
    label: "TCP 4 streams",
    short: "",
    unit: "Gbit/s",
    better: Better::Higher,
};

pub static NEW_CONNS: Metric = Metric {
    key: "new_connections_per_sec_no_loss",
    label: "New conns/s, none lost",
    short: "conn/s",
    unit: "conn/s",
    better: Better::Higher,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_described_with_units() {
        let text = describe_values(&[(&HTTP_RPS, 52_130.0), (&HTTP_P99, 1.2)]);
        assert_eq!(text, "req/s 52.1k, p99 1.200 ms");
        assert_eq!(describe_values(&[(&TCP_1, 13.456)]), "13.46 Gbit/s");
        assert_eq!(describe_values(&[(&NEW_CONNS, 8_300.0)]), "conn/s 8.3k");
    }
}

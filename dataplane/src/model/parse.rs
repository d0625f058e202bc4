//! Reading a state file's bytes into a [`StateFile`], bounded: the file's size, the YAML's
//! nesting, nodes and aliases, and the number of entries are each capped, and going over a cap
//! is an error that names it. The caps are far above any real host (a thousand containers
//! with a few ports each is well under a megabyte) and low enough that a hostile or broken
//! file costs the agent at most a second or so of one thread.
//!
//! The YAML crate is serde-saphyr: serde_yaml is deprecated and unmaintained, and
//! serde-saphyr enforces a budget while it parses (depth, nodes, events, aliases, anchors), so
//! a deeply nested or alias-bomb file is refused before it is built in memory.

use serde_saphyr::{Budget, Options, budget::BudgetBreach};

use super::{PortRange, StateFile};

/// Largest state file read, in bytes.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// Deepest nesting of YAML collections. The schema itself needs 5 (state, endpoints, an
/// endpoint, its interfaces, an interface).
pub const MAX_DEPTH: usize = 16;
/// Most YAML nodes (scalars, sequences and mappings). A published port is about 9.
pub const MAX_NODES: usize = 4_000_000;
/// Most aliases (`*name`) and anchors (`&name`): the schema needs none; a few are allowed for
/// shared label sets. Aliases are what "billion laughs" files are made of.
pub const MAX_ALIASES: usize = 1024;
/// Most entries in one top-level list (networks, endpoints, ports, services, policies).
pub const MAX_LIST_ENTRIES: usize = 262_144;
/// Most published port numbers, with ranges expanded (each is a map entry per protocol).
pub const MAX_PORT_NUMBERS: u64 = 1 << 20;
/// Most policy rules with port lists expanded (a policy with three ports is three rules):
/// what the kernel's compiled policy is built for (`capacity::POLICY_RULES`). A policy is
/// about 12 YAML nodes, so even this many are far within MAX_NODES; the cap is checked
/// before validation so that a huge list costs no model.
pub const MAX_POLICY_RULES: u64 = dataplane_common::capacity::POLICY_RULES as u64;

/// Why a text is not a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseFailure {
    /// Empty or only whitespace: what a failed `generate > state.yaml` leaves.
    Empty,
    /// One of the caps above. `limit` is its name, `max` its value.
    Limit {
        limit: &'static str,
        max: u64,
        found: String,
    },
    /// Not YAML/JSON of this schema (with line and column).
    Syntax(String),
}

impl std::fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseFailure::Empty => {
                f.write_str("the file is empty (an empty state is written `{}`)")
            }
            ParseFailure::Limit { limit, max, found } => {
                write!(f, "{found}, over the limit {limit} = {max}")
            }
            ParseFailure::Syntax(message) => f.write_str(message),
        }
    }
}

fn options() -> Options {
    let mut budget = Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    budget.max_nodes = MAX_NODES;
    budget.max_events = 2 * MAX_NODES;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ALIASES;
    budget.max_documents = 1;
    budget.max_total_scalar_bytes = MAX_FILE_BYTES;
    budget.max_reader_input_bytes = Some(MAX_FILE_BYTES);
    let mut options = Options::default();
    options.budget = Some(budget);
    options
}

/// The cap a budget breach of serde-saphyr is, by our name for it.
fn breach(breach: &BudgetBreach) -> Option<ParseFailure> {
    let limit = |limit, max: usize, found: String| ParseFailure::Limit {
        limit,
        max: max as u64,
        found,
    };
    Some(match breach {
        BudgetBreach::Depth { depth } => limit(
            "MAX_DEPTH",
            MAX_DEPTH,
            format!("YAML nested {depth} levels deep"),
        ),
        BudgetBreach::Nodes { nodes } => {
            limit("MAX_NODES", MAX_NODES, format!("{nodes} YAML nodes"))
        }
        BudgetBreach::Events { events } => limit(
            "MAX_NODES",
            MAX_NODES,
            format!("{events} YAML parser events"),
        ),
        BudgetBreach::Aliases { aliases } => limit(
            "MAX_ALIASES",
            MAX_ALIASES,
            format!("{aliases} YAML aliases"),
        ),
        BudgetBreach::Anchors { anchors } => limit(
            "MAX_ALIASES",
            MAX_ALIASES,
            format!("{anchors} YAML anchors"),
        ),
        BudgetBreach::ScalarBytes { total_scalar_bytes } => limit(
            "MAX_FILE_BYTES",
            MAX_FILE_BYTES,
            format!("{total_scalar_bytes} bytes of scalars"),
        ),
        BudgetBreach::Documents { documents } => {
            limit("documents", 1, format!("{documents} YAML documents"))
        }
        _ => return None,
    })
}

/// Parses YAML or JSON (JSON is YAML) under the caps, then checks the entry counts.
pub fn parse(text: &str) -> Result<StateFile, ParseFailure> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ParseFailure::Limit {
            limit: "MAX_FILE_BYTES",
            max: MAX_FILE_BYTES as u64,
            found: format!("{} bytes", text.len()),
        });
    }
    if text.trim().is_empty() {
        return Err(ParseFailure::Empty);
    }
    let spec: StateFile = serde_saphyr::from_str_with_options(text, options()).map_err(|e| {
        if let serde_saphyr::Error::Budget { breach: b, .. } = e.without_snippet()
            && let Some(failure) = breach(b)
        {
            return failure;
        }
        let message = e.to_string();
        // The scanner's own cap on flow nesting (`[[[[`) trips before the budget's depth.
        if message.contains("recursion limit exceeded") {
            return ParseFailure::Limit {
                limit: "MAX_DEPTH",
                max: MAX_DEPTH as u64,
                found: "YAML nested deeper".into(),
            };
        }
        ParseFailure::Syntax(message)
    })?;
    check_counts(&spec)?;
    Ok(spec)
}

fn check_counts(spec: &StateFile) -> Result<(), ParseFailure> {
    for (list, len) in [
        ("networks", spec.networks.len()),
        ("endpoints", spec.endpoints.len()),
        ("ports", spec.ports.len()),
        ("services", spec.services.len()),
        ("policies", spec.policies.len()),
    ] {
        if len > MAX_LIST_ENTRIES {
            return Err(ParseFailure::Limit {
                limit: "MAX_LIST_ENTRIES",
                max: MAX_LIST_ENTRIES as u64,
                found: format!("{len} entries in {list}"),
            });
        }
    }
    // Ranges are expanded into one map entry per port; bound the work before validation.
    let numbers: u64 = spec
        .ports
        .iter()
        .map(|p| {
            PortRange::parse(&p.host_port)
                .map(|r| u64::from(r.len()))
                .unwrap_or(1)
        })
        .sum();
    if numbers > MAX_PORT_NUMBERS {
        return Err(ParseFailure::Limit {
            limit: "MAX_PORT_NUMBERS",
            max: MAX_PORT_NUMBERS,
            found: format!("{numbers} published port numbers (ranges expanded)"),
        });
    }
    let rules: u64 = spec
        .policies
        .iter()
        .map(|p| p.ports.len().max(1) as u64)
        .sum();
    if rules > MAX_POLICY_RULES {
        return Err(ParseFailure::Limit {
            limit: "MAX_POLICY_RULES",
            max: MAX_POLICY_RULES,
            found: format!("{rules} policy rules (port lists expanded)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_of(text: &str) -> &'static str {
        match parse(text) {
            Err(ParseFailure::Limit { limit, .. }) => limit,
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[test]
    fn empty_is_refused_and_braces_are_the_empty_state() {
        assert_eq!(parse(""), Err(ParseFailure::Empty));
        assert_eq!(parse(" \n\t\n"), Err(ParseFailure::Empty));
        assert_eq!(parse("{}").unwrap(), StateFile::default());
        assert!(parse("").unwrap_err().to_string().contains("`{}`"));
    }

    #[test]
    fn deep_nesting_names_max_depth_quickly() {
        // A port value is read untagged (a number or a text), the one place serde takes any
        // shape: where a deep structure would get built before the type is checked.
        let port = |value: String| {
            format!(
                "ports:\n  - endpoint: a\n    protocol: tcp\n    container_port: 80\n    host_port: {value}\n"
            )
        };
        let deep = port(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)));
        let started = std::time::Instant::now();
        assert_eq!(limit_of(&deep), "MAX_DEPTH");
        let block = port(format!("\n      {}1", "- ".repeat(50_000)));
        assert_eq!(limit_of(&block), "MAX_DEPTH");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        let err = parse(&deep).unwrap_err().to_string();
        assert!(err.contains("MAX_DEPTH = 16"), "{err}");
    }

    #[test]
    fn alias_bombs_name_max_aliases() {
        // A few shared label sets are fine; more aliases than MAX_ALIASES are not.
        let endpoints = |n: usize| -> String {
            let mut text = String::from("endpoints:\n  - {name: e0, labels: &l {app: web}}\n");
            for i in 1..=n {
                text.push_str(&format!("  - {{name: e{i}, labels: *l}}\n"));
            }
            text
        };
        assert_eq!(
            parse(&endpoints(3)).unwrap().endpoints[3].labels["app"],
            "web"
        );
        assert_eq!(limit_of(&endpoints(MAX_ALIASES + 1)), "MAX_ALIASES");
    }

    #[test]
    fn size_and_entry_counts_are_capped() {
        let big = format!("uplink: eth0\n#{}\n", "x".repeat(MAX_FILE_BYTES));
        assert_eq!(limit_of(&big), "MAX_FILE_BYTES");
        let many: String = std::iter::once("policies:\n".to_string())
            .chain((0..=MAX_LIST_ENTRIES).map(|_| "- {name: p, action: deny}\n".into()))
            .collect();
        assert_eq!(limit_of(&many), "MAX_LIST_ENTRIES");
        let ranges: String = std::iter::once("ports:\n".to_string())
            .chain((0..17).map(|_| {
                "- {endpoint: e, protocol: tcp, host_port: 1-65535, container_port: 1-65535}\n"
                    .into()
            }))
            .collect();
        assert_eq!(limit_of(&ranges), "MAX_PORT_NUMBERS");
        let rules = |n: u64| -> String {
            std::iter::once("policies:\n".to_string())
                .chain((0..n / 4).map(|i| {
                    format!("- {{name: p{i}, action: deny, ports: [1/tcp, 2/tcp, 3/tcp, 4/udp]}}\n")
                }))
                .collect()
        };
        assert_eq!(
            parse(&rules(MAX_POLICY_RULES)).unwrap().policies.len(),
            16_384
        );
        assert_eq!(limit_of(&rules(MAX_POLICY_RULES + 4)), "MAX_POLICY_RULES");
    }

    #[test]
    fn twenty_thousand_ports_parse_within_the_caps() {
        // (The namespace test applies 100,000; unoptimised, parsing those takes ~20 s.)
        let text: String = std::iter::once("ports:\n".to_string())
            .chain((0..20_000).map(|i| {
                format!(
                    "  - {{endpoint: web1, protocol: {}, host_port: {}, container_port: 80}}\n",
                    if i % 2 == 0 { "tcp" } else { "udp" },
                    10_000 + i / 2
                )
            }))
            .collect();
        let started = std::time::Instant::now();
        let spec = parse(&text).unwrap();
        assert_eq!(spec.ports.len(), 20_000);
        eprintln!("20,000 ports parsed in {:?}", started.elapsed());
    }
}

//! Hubble's flow filters (flow.FlowFilter) applied to our flows, with Hubble's meaning: a
//! filter matches when every field it sets matches, a field matches when any of its values
//! does; a request's flows match any whitelist filter (or there is none) and no blacklist one.
//! Filters on what our flows never carry (L7, DNS names, UUIDs, trace IDs, clusters other than
//! the empty one) match nothing, as they would in Hubble for flows without that data.

use super::api::flow::{self, Flow, FlowFilter, layer4::Protocol};
use crate::flows::filter::AddrMatch;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("CEL expressions are not supported by this server")]
    Cel,
    #[error("{field} {value:?}: {why}")]
    Value {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// `ns/name-prefix`, `ns/` (the whole namespace) or `name-prefix` (any namespace).
fn matches_named(selector: &str, namespace: &str, name: &str) -> bool {
    match selector.split_once('/') {
        Some((ns, prefix)) => {
            ns == namespace && !name.is_empty() && name.starts_with(prefix)
                || (ns == namespace && prefix.is_empty())
        }
        None => !name.is_empty() && name.starts_with(selector),
    }
}

/// An address or a CIDR prefix of either family (refused by [`check`] when it is neither).
fn matches_ip(selector: &str, ip: &str) -> bool {
    AddrMatch::parse(selector).is_some_and(|m| m.matches_text(ip))
}

/// A label without its source (`container:app=web` -> `app=web`; `reserved:host` stays).
fn without_source(label: &str) -> &str {
    match label.split_once(':') {
        Some((source, rest)) if source != "reserved" => rest,
        _ => label,
    }
}

/// A label selector as Hubble's CLI sends it: terms separated by commas, each `key=value`,
/// `key!=value`, `key` or `!key`; keys may carry a source (`any:app`, `reserved:host`).
fn matches_labels(selector: &str, labels: &[String]) -> bool {
    let labels: Vec<(&str, Option<&str>)> = labels
        .iter()
        .map(|l| {
            let l = without_source(l);
            match l.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (l, None),
            }
        })
        .collect();
    let key = |k: &str| -> String {
        let k = k.trim();
        let k = k.strip_prefix("any:").unwrap_or(k);
        without_source(k).to_owned()
    };
    selector.split(',').all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            let k = key(k);
            !labels
                .iter()
                .any(|(lk, lv)| *lk == k && *lv == Some(v.trim()))
        } else if let Some((k, v)) = term.split_once('=') {
            let k = key(k);
            let v = v.trim().trim_start_matches('=');
            labels.iter().any(|(lk, lv)| *lk == k && *lv == Some(v))
        } else if let Some(k) = term.strip_prefix('!') {
            let k = key(k);
            !labels.iter().any(|(lk, _)| *lk == k)
        } else {
            let k = key(term);
            labels.iter().any(|(lk, _)| *lk == k)
        }
    })
}

/// Hubble's protocol names (`tcp`, `udp`, `icmp`, `icmpv4`, ...).
fn protocol_name(flow: &Flow) -> Option<&'static str> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(_) => Some("tcp"),
        Protocol::Udp(_) => Some("udp"),
        Protocol::IcmPv4(_) => Some("icmpv4"),
        Protocol::IcmPv6(_) => Some("icmpv6"),
    }
}

fn ports(flow: &Flow) -> Option<(u32, u32)> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        _ => None,
    }
}

/// `name`, or a pattern with `*` standing for any run of characters (Hubble's node names).
fn matches_glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

fn any<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

/// Refuses what could never be evaluated (rather than answering as if it matched).
pub fn check(filter: &FlowFilter) -> Result<(), FilterError> {
    if filter
        .experimental
        .as_ref()
        .is_some_and(|e| !e.cel_expression.is_empty())
    {
        return Err(FilterError::Cel);
    }
    // As Hubble refuses them (`invalid IP address in filter`, `invalid CIDR in filter`).
    for (field, values) in [
        ("source_ip", &filter.source_ip),
        ("source_ip_xlated", &filter.source_ip_xlated),
        ("destination_ip", &filter.destination_ip),
    ] {
        if let Some(v) = values.iter().find(|v| AddrMatch::parse(v).is_none()) {
            return Err(FilterError::Value {
                field,
                value: v.clone(),
                why: if v.contains('/') {
                    "not a CIDR prefix"
                } else {
                    "not an IP address"
                },
            });
        }
    }
    for (field, values) in [
        ("source_port", &filter.source_port),
        ("destination_port", &filter.destination_port),
    ] {
        if let Some(v) = values.iter().find(|v| v.parse::<u16>().is_err()) {
            return Err(FilterError::Value {
                field,
                value: v.clone(),
                why: "not a port number",
            });
        }
    }
    Ok(())
}

/// Whether `flow` matches `filter` (every set field).
pub fn matches(filter: &FlowFilter, flow: &Flow) -> bool {
    let none = flow::Endpoint::default();
    let source = flow.source.as_ref().unwrap_or(&none);
    let destination = flow.destination.as_ref().unwrap_or(&none);
    let ip = flow.ip.clone().unwrap_or_default();
    let (sport, dport) = ports(flow).unzip();
    let service = |s: &Option<flow::Service>| s.clone().unwrap_or_default();
    let (src_svc, dst_svc) = (
        service(&flow.source_service),
        service(&flow.destination_service),
    );
    let flags = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => t.flags,
        _ => None,
    };
    let never = |values: &[String]| values.is_empty();
    let workload = |wanted: &flow::Workload, endpoint: &flow::Endpoint| {
        endpoint.workloads.iter().any(|w| {
            (wanted.name.is_empty() || w.name == wanted.name)
                && (wanted.kind.is_empty() || w.kind == wanted.kind)
        })
    };
    never(&filter.uuid)
        && any(&filter.source_ip, |s| matches_ip(s, &ip.source))
        && any(&filter.source_ip_xlated, |s| {
            matches_ip(s, &ip.source_xlated)
        })
        && any(&filter.source_pod, |s| {
            matches_named(s, &source.namespace, &source.pod_name)
        })
        && never(&filter.source_fqdn)
        && any(&filter.source_label, |s| matches_labels(s, &source.labels))
        && any(&filter.source_service, |s| {
            matches_named(s, &src_svc.namespace, &src_svc.name)
        })
        && any(&filter.source_workload, |w| workload(w, source))
        && any(&filter.source_cluster_name, |c| *c == source.cluster_name)
        && any(&filter.destination_ip, |s| matches_ip(s, &ip.destination))
        && any(&filter.destination_pod, |s| {
            matches_named(s, &destination.namespace, &destination.pod_name)
        })
        && never(&filter.destination_fqdn)
        && any(&filter.destination_label, |s| {
            matches_labels(s, &destination.labels)
        })
        && any(&filter.destination_service, |s| {
            matches_named(s, &dst_svc.namespace, &dst_svc.name)
        })
        && any(&filter.destination_workload, |w| workload(w, destination))
        && any(&filter.destination_cluster_name, |c| {
            *c == destination.cluster_name
        })
        && any(&filter.traffic_direction, |d| *d == flow.traffic_direction)
        && any(&filter.verdict, |v| *v == flow.verdict)
        && any(&filter.drop_reason_desc, |r| *r == flow.drop_reason_desc)
        && any(&filter.interface, |i| {
            flow.interface.as_ref().is_some_and(|fi| {
                (i.index == 0 || i.index == fi.index) && (i.name.is_empty() || i.name == fi.name)
            })
        })
        && any(&filter.event_type, |e| {
            flow.event_type.is_some_and(|t| {
                t.r#type == e.r#type && (!e.match_sub_type || t.sub_type == e.sub_type)
            })
        })
        && never(&filter.http_status_code)
        && any(&filter.protocol, |p| {
            let p = p.to_ascii_lowercase();
            let name = protocol_name(flow);
            // `icmp` is either family's, as in Hubble.
            name == Some(p.as_str()) || (p == "icmp" && matches!(name, Some("icmpv4" | "icmpv6")))
        })
        && any(&filter.source_port, |p| {
            p.parse::<u32>().ok().is_some_and(|p| sport == Some(p))
        })
        && any(&filter.destination_port, |p| {
            p.parse::<u32>().ok().is_some_and(|p| dport == Some(p))
        })
        && any(&filter.reply, |r| {
            flow.is_reply.is_some_and(|is| is.value == *r)
        })
        && never(&filter.dns_query)
        && any(&filter.source_identity, |i| *i == source.identity)
        && any(&filter.destination_identity, |i| *i == destination.identity)
        && never(&filter.http_method)
        && never(&filter.http_path)
        && never(&filter.http_url)
        && filter.http_header.is_empty()
        && any(&filter.tcp_flags, |want| {
            flags.is_some_and(|have| {
                (!want.fin || have.fin)
                    && (!want.syn || have.syn)
                    && (!want.rst || have.rst)
                    && (!want.psh || have.psh)
                    && (!want.ack || have.ack)
                    && (!want.urg || have.urg)
                    && (!want.ece || have.ece)
                    && (!want.cwr || have.cwr)
                    && (!want.ns || have.ns)
            })
        })
        && any(&filter.node_name, |n| matches_glob(n, &flow.node_name))
        && filter.node_labels.is_empty()
        && any(&filter.ip_version, |v| {
            flow.ip.as_ref().is_some_and(|ip| ip.ip_version == *v)
        })
        && never(&filter.trace_id)
        && filter.ip_trace_id.is_empty()
        && any(&filter.encrypted, |e| {
            flow.ip.as_ref().is_some_and(|ip| ip.encrypted == *e)
        })
}

/// A request's filters: any whitelist one (or none given) and no blacklist one.
pub fn selects(whitelist: &[FlowFilter], blacklist: &[FlowFilter], flow: &Flow) -> bool {
    (whitelist.is_empty() || whitelist.iter().any(|f| matches(f, flow)))
        && !blacklist.iter().any(|f| matches(f, flow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_labels_and_globs_match_as_in_hubble() {
        assert!(matches_named("front/web", "front", "web1"));
        assert!(matches_named("front/", "front", "web1"));
        assert!(!matches_named("back/web", "front", "web1"));
        assert!(matches_named("web", "front", "web1"));
        assert!(!matches_named("web", "front", ""));
        assert!(matches_ip("172.30.1.0/24", "172.30.1.9"));
        assert!(!matches_ip("172.30.2.0/24", "172.30.1.9"));
        assert!(matches_ip("172.30.1.9", "172.30.1.9"));
        assert!(!matches_ip("172.30.1.9", ""));
        assert!(matches_ip("fd00:30:1::/64", "fd00:30:1::9"));
        assert!(matches_ip("fd00:30:1::9", "fd00:30:1::9"));
        assert!(matches_ip("fd00:30:1:0:0::9", "fd00:30:1::9"));
        assert!(!matches_ip("fd00:30:2::/64", "fd00:30:1::9"));
        assert!(!matches_ip("::/0", "172.30.1.9"));
        assert!(!matches_ip("0.0.0.0/0", "fd00:30:1::9"));
        let labels = vec![
            "container:app=web".to_owned(),
            "container:tier=front".into(),
        ];
        assert!(matches_labels("app=web", &labels));
        assert!(matches_labels("any:app=web,tier", &labels));
        assert!(matches_labels("container:app=web", &labels));
        assert!(!matches_labels("app=db", &labels));
        assert!(matches_labels("!db", &labels));
        assert!(matches_labels("app!=db", &labels));
        assert!(matches_labels(
            "reserved:host",
            &["reserved:host".to_owned()]
        ));
        assert!(!matches_labels(
            "reserved:world",
            &["reserved:host".to_owned()]
        ));
        assert!(matches_glob("node*", "node1"));
        assert!(matches_glob("*1", "node1"));
        assert!(!matches_glob("host*", "node1"));
        assert!(matches_glob("node1", "node1"));
    }

    fn flow_of(ip: (&str, &str), version: flow::IpVersion, l4: Protocol) -> Flow {
        Flow {
            ip: Some(flow::Ip {
                source: ip.0.into(),
                destination: ip.1.into(),
                ip_version: version as i32,
                ..Default::default()
            }),
            l4: Some(flow::Layer4 { protocol: Some(l4) }),
            ..Default::default()
        }
    }

    #[test]
    fn ipv6_flows_match_hubbles_address_family_and_protocol_filters() {
        let v6 = flow_of(
            ("fd00:30:1::9", "2001:db8::7"),
            flow::IpVersion::IPv6,
            Protocol::IcmPv6(flow::IcmPv6 {
                r#type: 128,
                code: 0,
            }),
        );
        let v4 = flow_of(
            ("172.30.1.9", "192.0.2.7"),
            flow::IpVersion::IPv4,
            Protocol::IcmPv4(flow::IcmPv4 { r#type: 8, code: 0 }),
        );
        let cases: [(FlowFilter, bool, bool); 8] = [
            (
                FlowFilter {
                    source_ip: vec!["fd00:30:1::/48".into()],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                FlowFilter {
                    destination_ip: vec!["192.0.2.7".into(), "2001:db8::7".into()],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                FlowFilter {
                    ip_version: vec![flow::IpVersion::IPv6 as i32],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                FlowFilter {
                    ip_version: vec![flow::IpVersion::IPv4 as i32],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                FlowFilter {
                    protocol: vec!["icmp".into()],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                FlowFilter {
                    protocol: vec!["ICMPv6".into()],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                FlowFilter {
                    protocol: vec!["icmpv4".into()],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                FlowFilter {
                    source_ip: vec!["::/0".into()],
                    protocol: vec!["icmpv6".into()],
                    ..Default::default()
                },
                false,
                true,
            ),
        ];
        for (filter, on_v4, on_v6) in cases {
            check(&filter).unwrap();
            assert_eq!(matches(&filter, &v4), on_v4, "{filter:?} on IPv4");
            assert_eq!(matches(&filter, &v6), on_v6, "{filter:?} on IPv6");
        }
        // What Hubble refuses, refused.
        for (bad, field) in [
            (
                FlowFilter {
                    source_ip: vec!["fd00::/129".into()],
                    ..Default::default()
                },
                "source_ip",
            ),
            (
                FlowFilter {
                    destination_ip: vec!["fd00::zz".into()],
                    ..Default::default()
                },
                "destination_ip",
            ),
        ] {
            let err = check(&bad).unwrap_err();
            assert!(
                matches!(err, FilterError::Value { field: f, .. } if f == field),
                "{err}"
            );
        }
    }
}

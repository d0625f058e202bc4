//! What `dataplane observe` asks the agent for: history, following, and the filters records
//! must match (all of them). Sent as JSON after the word `observe` on the control socket.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::record::{Endpoint, Flow, LABEL_HOST, LABEL_WORLD, Verdict};

/// How many records `observe` prints when it neither follows nor says `--last`.
pub const DEFAULT_LAST: usize = 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("--verdict {0:?}: expected FORWARDED, DROPPED or TRANSLATED")]
    Verdict(String),
    #[error("--protocol {0:?}: expected tcp, udp, icmp (both families), icmpv4 or icmpv6")]
    Protocol(String),
    #[error("IP version {0:?}: expected 4 or 6")]
    IpVersion(String),
    #[error("--ip {0:?}: expected an IP address or a CIDR prefix (IPv4 or IPv6)")]
    Ip(String),
    #[error("the observe request is not valid: {0}")]
    Request(String),
}

/// Filters of one request; `None` matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// The source: a container name, an IP address or CIDR prefix of either family, `host` or
    /// `world`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The destination: a container name, an IP address or CIDR prefix of either family, a
    /// service name, `host` or `world`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Either end's address, an IP address or CIDR prefix of either family (`hubble observe
    /// --ip`). Refused when it is neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Either end's port, or the port of the translation's original or translated address
    /// (so `--port 8080` finds the connections to a published port 8080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The IP family: `4` or `6` (also `v4`, `ipv6`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<String>,
}

/// A whole request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserveRequest {
    /// Keep the connection open and send new matching records as they come.
    #[serde(default)]
    pub follow: bool,
    /// How many of the latest matching records to send first (default: [`DEFAULT_LAST`]
    /// without `follow`, none with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    /// Send the extended form (with `connection` and `translation`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
    #[serde(default)]
    pub filter: Filter,
}

impl ObserveRequest {
    pub fn parse(text: &str) -> Result<ObserveRequest, FilterError> {
        let request: ObserveRequest = if text.trim().is_empty() {
            ObserveRequest::default()
        } else {
            serde_json::from_str(text).map_err(|e| FilterError::Request(e.to_string()))?
        };
        request.filter.check()?;
        Ok(request)
    }

    /// How many history records to send before following.
    pub fn history(&self) -> usize {
        self.last
            .unwrap_or(if self.follow { 0 } else { DEFAULT_LAST })
    }
}

fn parse_verdict(text: &str) -> Option<Verdict> {
    match text.to_ascii_uppercase().as_str() {
        "FORWARDED" => Some(Verdict::Forwarded),
        "DROPPED" => Some(Verdict::Dropped),
        "TRANSLATED" => Some(Verdict::Translated),
        _ => None,
    }
}

/// Hubble's protocol names for what the user wrote: `icmp` is either family's, as in Hubble.
fn parse_protocol(text: &str) -> Option<&'static [&'static str]> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Some(&["TCP"]),
        "udp" => Some(&["UDP"]),
        "icmp" => Some(&["ICMPv4", "ICMPv6"]),
        "icmpv4" => Some(&["ICMPv4"]),
        "icmpv6" => Some(&["ICMPv6"]),
        _ => None,
    }
}

/// Hubble's name of the IP version the user wrote.
fn parse_ip_version(text: &str) -> Option<&'static str> {
    match text.to_ascii_lowercase().as_str() {
        "4" | "v4" | "ipv4" => Some("IPv4"),
        "6" | "v6" | "ipv6" => Some("IPv6"),
        _ => None,
    }
}

/// An address or a CIDR prefix of either family as filters take them (`172.30.1.9`,
/// `2001:db8::/32`). The host bits of a prefix are ignored, as Hubble's filters (Go's
/// `net.ParseCIDR`) ignore them; an address matches only its own family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrMatch {
    addr: IpAddr,
    len: u8,
}

fn bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl AddrMatch {
    pub fn parse(text: &str) -> Option<AddrMatch> {
        let (addr, len) = match text.split_once('/') {
            None => {
                let addr: IpAddr = text.parse().ok()?;
                (addr, bits(addr))
            }
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().ok()?;
                let len: u8 = len.parse().ok().filter(|l| *l <= bits(addr))?;
                (addr, len)
            }
        };
        Some(AddrMatch { addr, len })
    }

    pub fn matches(&self, ip: IpAddr) -> bool {
        // The top `len` bits of `a` and `b` (of `width` bits) are the same.
        fn same_prefix(a: u128, b: u128, len: u8, width: u8) -> bool {
            len == 0 || (a ^ b) >> (width - len) == 0
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.len,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.len, 128)
            }
            _ => false,
        }
    }

    /// Whether the address a record writes (`ip`, empty for none) matches.
    pub fn matches_text(&self, ip: &str) -> bool {
        ip.parse().is_ok_and(|ip| self.matches(ip))
    }
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// Whether `who` names this end (`ip` is its address).
fn names(who: &str, endpoint: &Endpoint, ip: &str) -> bool {
    AddrMatch::parse(who).is_some_and(|m| m.matches_text(ip))
        || (endpoint.is_container() && endpoint.pod_name == who)
        || (who == "host" && endpoint.has_label(LABEL_HOST))
        || (who == "world" && endpoint.has_label(LABEL_WORLD))
}

impl Filter {
    /// Refuses values that could never match, so a typo is an error rather than silence.
    pub fn check(&self) -> Result<(), FilterError> {
        if let Some(v) = &self.verdict
            && parse_verdict(v).is_none()
        {
            return Err(FilterError::Verdict(v.clone()));
        }
        if let Some(p) = &self.protocol
            && parse_protocol(p).is_none()
        {
            return Err(FilterError::Protocol(p.clone()));
        }
        if let Some(v) = &self.ip_version
            && parse_ip_version(v).is_none()
        {
            return Err(FilterError::IpVersion(v.clone()));
        }
        if let Some(ip) = &self.ip
            && AddrMatch::parse(ip).is_none()
        {
            return Err(FilterError::Ip(ip.clone()));
        }
        Ok(())
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        if let Some(v) = &self.verdict
            && parse_verdict(v) != Some(flow.verdict)
        {
            return false;
        }
        if let Some(p) = &self.protocol
            && !parse_protocol(p).is_some_and(|names| names.contains(&flow.protocol()))
        {
            return false;
        }
        if let Some(v) = &self.ip_version
            && parse_ip_version(v) != Some(flow.ip_version())
        {
            return false;
        }
        if let Some(ip) = &self.ip
            && !AddrMatch::parse(ip).is_some_and(|m| {
                m.matches_text(flow.source_ip()) || m.matches_text(flow.destination_ip())
            })
        {
            return false;
        }
        if let Some(from) = &self.from
            && !names(from, flow.source(), flow.source_ip())
        {
            return false;
        }
        if let Some(to) = &self.to {
            let service = flow
                .destination_service
                .as_ref()
                .is_some_and(|s| &s.name == to);
            if !service && !names(to, flow.destination(), flow.destination_ip()) {
                return false;
            }
        }
        if let Some(port) = self.port {
            let l4 = flow.ports().is_some_and(|(s, d)| s == port || d == port);
            let translated = flow.translation.as_ref().is_some_and(|t| {
                port_of(&t.original) == Some(port) || port_of(&t.translated) == Some(port)
            });
            if !l4 && !translated {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record::{
        Connection, EventType, Ip, L4, Service, TcpFlags, Translation, Verdict,
    };

    fn flow() -> Flow {
        Flow {
            time: String::new(),
            verdict: Verdict::Forwarded,
            drop_reason: None,
            ip: Some(Ip {
                source: "192.0.2.2".into(),
                source_xlated: String::new(),
                destination: "172.30.1.2".into(),
                ip_version: "IPv4".into(),
            }),
            l4: Some(L4::Tcp {
                source_port: 41234,
                destination_port: 80,
                flags: TcpFlags::default(),
            }),
            source: Some(Endpoint {
                identity: 2,
                labels: vec![LABEL_WORLD.into()],
                ..Endpoint::default()
            }),
            destination: Some(Endpoint {
                namespace: "front".into(),
                pod_name: "web1".into(),
                ..Endpoint::default()
            }),
            flow_type: "L3_L4".into(),
            node_name: String::new(),
            event_type: EventType {
                event_type: 4,
                sub_type: 0,
            },
            destination_service: Some(Service {
                name: "web".into(),
                namespace: String::new(),
            }),
            traffic_direction: "INGRESS".into(),
            trace_observation_point: None,
            trace_reason: None,
            drop_reason_desc: None,
            is_reply: false,
            interface: None,
            summary: String::new(),
            translation: Some(Translation {
                original: "192.0.2.1:8080".into(),
                translated: "172.30.1.2:80".into(),
                kind: "published_port".into(),
                source_translated: String::new(),
            }),
            connection: Some(Connection::default()),
        }
    }

    fn filter(json: &str) -> Filter {
        ObserveRequest::parse(&format!("{{\"filter\": {json}}}"))
            .unwrap()
            .filter
    }

    #[test]
    fn every_filter_must_match() {
        let f = flow();
        let cases = [
            ("{}", true),
            (r#"{"verdict": "forwarded"}"#, true),
            (r#"{"verdict": "translated"}"#, false),
            (r#"{"verdict": "DROPPED"}"#, false),
            (r#"{"protocol": "tcp"}"#, true),
            (r#"{"protocol": "udp"}"#, false),
            (r#"{"from": "world"}"#, true),
            (r#"{"from": "192.0.2.2"}"#, true),
            (r#"{"from": "web1"}"#, false),
            (r#"{"to": "web1"}"#, true),
            (r#"{"to": "web"}"#, true),
            (r#"{"to": "host"}"#, false),
            (r#"{"port": 80}"#, true),
            (r#"{"port": 41234}"#, true),
            (r#"{"port": 8080}"#, true),
            (r#"{"port": 9999}"#, false),
            (r#"{"to": "web1", "port": 80, "protocol": "tcp"}"#, true),
            (r#"{"to": "web1", "port": 80, "protocol": "udp"}"#, false),
        ];
        for (json, expected) in cases {
            assert_eq!(filter(json).matches(&f), expected, "{json}");
        }
    }

    /// An IPv6 flow: an ICMPv6 echo from a container to the outside.
    fn flow6() -> Flow {
        let mut f = flow();
        f.ip = Some(Ip {
            source: "fd00:30:1::2".into(),
            source_xlated: "2001:db8::1".into(),
            destination: "2001:db8:ffff::7".into(),
            ip_version: "IPv6".into(),
        });
        f.l4 = Some(L4::Icmpv6 {
            icmp_type: 128,
            code: 0,
        });
        f.source = f.destination.take();
        f.destination = Some(Endpoint {
            identity: 2,
            labels: vec![LABEL_WORLD.into()],
            ..Endpoint::default()
        });
        f.destination_service = None;
        f.translation = None;
        f
    }

    #[test]
    fn addresses_and_prefixes_of_both_families_match_their_own_family() {
        let f = flow();
        let f6 = flow6();
        let cases = [
            (r#"{"from": "192.0.2.0/24"}"#, true, false),
            (r#"{"from": "192.0.2.2/32"}"#, true, false),
            (r#"{"from": "192.0.3.0/24"}"#, false, false),
            (r#"{"from": "0.0.0.0/0"}"#, true, false),
            (r#"{"from": "fd00:30:1::2"}"#, false, true),
            // Written otherwise, the same address.
            (r#"{"from": "FD00:30:1:0::2"}"#, false, true),
            (r#"{"from": "fd00:30:1::/64"}"#, false, true),
            (r#"{"from": "fd00:30:1::1/64"}"#, false, true),
            (r#"{"from": "fd00:30:2::/64"}"#, false, false),
            (r#"{"from": "::/0"}"#, false, true),
            (r#"{"to": "2001:db8::/32"}"#, false, true),
            (r#"{"to": "world"}"#, false, true),
            (r#"{"from": "web1"}"#, false, true),
            (r#"{"from": "fd00:30:1::2/129"}"#, false, false),
            (r#"{"protocol": "icmp"}"#, false, true),
            (r#"{"protocol": "icmpv6"}"#, false, true),
            (r#"{"protocol": "icmpv4"}"#, false, false),
            (r#"{"protocol": "tcp"}"#, true, false),
            (r#"{"ip_version": "6"}"#, false, true),
            (r#"{"ip_version": "ipv4"}"#, true, false),
            (r#"{"ip_version": "v6", "from": "web1"}"#, false, true),
            (r#"{"ip": "2001:db8:ffff::/48"}"#, false, true),
            (r#"{"ip": "fd00:30:1::2"}"#, false, true),
            (r#"{"ip": "172.30.1.2"}"#, true, false),
            (r#"{"ip": "192.0.2.2"}"#, true, false),
            (r#"{"ip": "10.0.0.0/8"}"#, false, false),
        ];
        for (json, v4, v6) in cases {
            assert_eq!(filter(json).matches(&f), v4, "{json} on the IPv4 flow");
            assert_eq!(filter(json).matches(&f6), v6, "{json} on the IPv6 flow");
        }
        assert_eq!(
            ObserveRequest::parse(r#"{"filter": {"ip_version": "5"}}"#),
            Err(FilterError::IpVersion("5".into()))
        );
        assert_eq!(
            ObserveRequest::parse(r#"{"filter": {"ip": "web1"}}"#),
            Err(FilterError::Ip("web1".into()))
        );
        let m = AddrMatch::parse("2001:db8::/32").unwrap();
        assert!(m.matches("2001:db8:ffff::1".parse().unwrap()));
        assert!(!m.matches("2001:db9::1".parse().unwrap()));
        assert!(!m.matches("32.1.13.184".parse().unwrap()));
        assert!(
            AddrMatch::parse("::ffff:0:0/96")
                .unwrap()
                .matches("::ffff:1.2.3.4".parse().unwrap())
        );
        assert!(
            !AddrMatch::parse("::ffff:0:0/96")
                .unwrap()
                .matches("1.2.3.4".parse().unwrap())
        );
        assert!(AddrMatch::parse("2001:db8::/x").is_none());
        assert!(AddrMatch::parse("10.0.0.0/33").is_none());
    }

    #[test]
    fn requests_default_and_refuse_what_cannot_match() {
        let plain = ObserveRequest::parse("").unwrap();
        assert_eq!(plain.history(), DEFAULT_LAST);
        let follow = ObserveRequest::parse(r#"{"follow": true}"#).unwrap();
        assert_eq!(follow.history(), 0);
        let last = ObserveRequest::parse(r#"{"follow": true, "last": 5}"#).unwrap();
        assert_eq!(last.history(), 5);
        assert_eq!(
            ObserveRequest::parse(r#"{"filter": {"verdict": "ok"}}"#),
            Err(FilterError::Verdict("ok".into()))
        );
        assert_eq!(
            ObserveRequest::parse(r#"{"filter": {"protocol": "sctp"}}"#),
            Err(FilterError::Protocol("sctp".into()))
        );
        assert!(matches!(
            ObserveRequest::parse(r#"{"filter": {"colour": "red"}}"#),
            Err(FilterError::Request(_))
        ));
    }
}

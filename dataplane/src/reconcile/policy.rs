//! Compiling the model's policies into what the kernel looks up (docs/DESIGN.md "Policy
//! compiled into lookups"): an ordered list of rules (a rule with several ports becomes one
//! rule per port), each rule's selectors expanded into the values a connection's side can
//! have (any, a network, an endpoint, a label class, a CIDR class), and one map entry per
//! (source kind and value, destination kind and value, protocol and port) holding the first
//! rule that produced it. The kernel looks up one key per key shape in use and takes the
//! lowest rule index: the order of the rules survives compilation. Also the deny list XDP
//! drops outside sources with.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dataplane_common::{
    POLICY_MAX_TUPLES, PolicyKey, PolicyMeta, PolicyVerdict, PrefixKey, capacity, policy_action,
    policy_tuple, selector_kind,
};

use crate::model::{Action, Cidr, Cidr6, IpCidr, Model, Selector};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "policies[{policy}]: the policies expand to more than {max} rules (one per port); \
         use fewer ports or rules"
    )]
    TooManyRules { policy: String, max: u32 },
}

/// One side of a rule, as the kernel keys it. Ids are 1-based positions in the model (as in
/// `EndpointInfo`); a CIDR is (address in host byte order, prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Any,
    Network(u32),
    Endpoint(u32),
    /// Index into [`Compiled::label_selectors`].
    Labels(u32),
    Cidr(u32, u8),
    /// An IPv6 prefix: (address as a number, prefix length).
    Cidr6(u128, u8),
}

/// One rule after port expansion; its index in the list is its priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// [`policy_action`].
    pub action: u8,
    pub from: Side,
    pub to: Side,
    /// (IP protocol, port in host byte order); None: every protocol and port.
    pub port: Option<(u8, u16)>,
}

/// What the policy maps hold for one rule set (keys with half 0; the reconciler puts them
/// into whichever half it writes).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tables {
    pub entries: BTreeMap<PolicyKey, PolicyVerdict>,
    /// (prefix length, address in network byte order) -> CIDR class.
    pub prefixes: BTreeMap<(u8, u32), u32>,
    /// The IPv6 prefixes: (prefix length, address) -> CIDR class. Classes are numbered
    /// across both families (the policy map itself does not know families).
    pub prefixes6: BTreeMap<(u8, std::net::Ipv6Addr), u32>,
    /// Key shapes present ([`PolicyMeta::tuples`]), sorted.
    pub tuples: Vec<u8>,
    /// [`PolicyMeta::cidr_sides`].
    pub cidr_sides: u32,
}

impl Tables {
    /// The meta entry that makes these tables live in half `slot`.
    pub fn meta(&self, slot: u32) -> PolicyMeta {
        let mut meta = PolicyMeta {
            slot,
            tuple_count: self.tuples.len() as u32,
            cidr_sides: self.cidr_sides,
            ..PolicyMeta::default()
        };
        meta.tuples[..self.tuples.len()].copy_from_slice(&self.tuples);
        meta
    }
}

/// The kernel's view of the policies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub rules: Vec<Rule>,
    /// Distinct label selectors, in order of first use.
    pub label_selectors: Vec<BTreeMap<String, String>>,
    /// The label class of each endpoint (by position in the model; 0: its labels match no
    /// selector). Endpoints that match the same selectors share a class.
    pub endpoint_classes: Vec<u32>,
    pub tables: Tables,
    /// Outside source prefixes dropped at XDP.
    pub deny_sources: Vec<PrefixKey>,
    /// The IPv6 ones: (prefix length, address).
    pub deny_sources6: Vec<(u8, std::net::Ipv6Addr)>,
}

fn be(addr: std::net::Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// A rule's prefix of either family, ordered IPv4 first, each by (length, address): the
/// order CIDR classes are numbered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Prefix {
    V4(u8, u32),
    V6(u8, u128),
}

impl Prefix {
    fn of(side: &Side) -> Option<Prefix> {
        match *side {
            Side::Cidr(addr, len) => Some(Prefix::V4(len, addr & mask(len))),
            Side::Cidr6(addr, len) => Some(Prefix::V6(len, addr & mask6(len))),
            _ => None,
        }
    }

    /// This prefix shortened to `len` bits (None past its own length).
    fn outer(self, len: u8) -> Option<Prefix> {
        match self {
            Prefix::V4(own, addr) => (len <= own).then(|| Prefix::V4(len, addr & mask(len))),
            Prefix::V6(own, addr) => (len <= own).then(|| Prefix::V6(len, addr & mask6(len))),
        }
    }

    fn len(self) -> u8 {
        match self {
            Prefix::V4(len, _) | Prefix::V6(len, _) => len,
        }
    }
}

pub fn compile(model: &Model) -> Result<Compiled, PolicyError> {
    let mut compiled = Compiled::default();
    let network_ids: HashMap<&str, u32> = model
        .networks
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i as u32 + 1))
        .collect();
    let endpoint_ids: HashMap<&str, u32> = model
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), i as u32 + 1))
        .collect();
    let mut selector_ids: HashMap<&BTreeMap<String, String>, u32> = HashMap::new();
    for policy in &model.policies {
        let mut side = |selector| match selector {
            &Selector::Any => Side::Any,
            Selector::Network(name) => Side::Network(network_ids[name.as_str()]),
            Selector::Endpoint(name) => Side::Endpoint(endpoint_ids[name.as_str()]),
            Selector::Labels(labels) => {
                let next = selector_ids.len() as u32;
                let id = *selector_ids.entry(labels).or_insert_with(|| {
                    compiled.label_selectors.push(labels.clone());
                    next
                });
                Side::Labels(id)
            }
            Selector::Cidr(IpCidr::V4(cidr)) => {
                Side::Cidr(u32::from(cidr.network()), cidr.prefix_len)
            }
            Selector::Cidr(IpCidr::V6(cidr)) => {
                Side::Cidr6(u128::from(cidr.network()), cidr.prefix_len)
            }
        };
        let from = side(&policy.from);
        let to = side(&policy.to);
        let action = match policy.action {
            Action::Allow => policy_action::ALLOW,
            Action::Deny => policy_action::DENY,
        };
        let rule = |port| Rule {
            action,
            from,
            to,
            port,
        };
        if policy.ports.is_empty() {
            compiled.rules.push(rule(None));
        } else {
            for (port, proto) in &policy.ports {
                compiled.rules.push(rule(Some((proto.number(), *port))));
            }
        }
        if compiled.rules.len() > capacity::POLICY_RULES as usize {
            return Err(PolicyError::TooManyRules {
                policy: policy.name.clone(),
                max: capacity::POLICY_RULES,
            });
        }
    }
    let (endpoint_classes, selector_classes) = label_classes(model, &compiled.label_selectors);
    compiled.endpoint_classes = endpoint_classes;
    compiled.tables = tables(&compiled.rules, &selector_classes);
    (compiled.deny_sources, compiled.deny_sources6) = deny_sources(model);
    Ok(compiled)
}

/// Every endpoint's label class, and for each label selector the classes it matches. A class
/// is a distinct set of matched selectors, numbered from 1 in endpoint order. Selectors are
/// found through an index by label, so this is linear in the labels, not selectors x
/// endpoints.
fn label_classes(
    model: &Model,
    selectors: &[BTreeMap<String, String>],
) -> (Vec<u32>, Vec<Vec<u32>>) {
    let mut by_label: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
    let mut match_all = Vec::new();
    for (i, selector) in selectors.iter().enumerate() {
        // A selector is found through its first label (every label of it must match anyway).
        match selector.iter().next() {
            Some((k, v)) => by_label
                .entry((k.as_str(), v.as_str()))
                .or_default()
                .push(i as u32),
            None => match_all.push(i as u32),
        }
    }
    let mut classes: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut selector_classes = vec![Vec::new(); selectors.len()];
    let endpoint_classes = model
        .endpoints
        .iter()
        .map(|endpoint| {
            let mut matched: Vec<u32> = match_all.clone();
            for (k, v) in &endpoint.labels {
                for &i in by_label
                    .get(&(k.as_str(), v.as_str()))
                    .into_iter()
                    .flatten()
                {
                    if crate::model::labels_match(&selectors[i as usize], &endpoint.labels) {
                        matched.push(i);
                    }
                }
            }
            if matched.is_empty() {
                return 0;
            }
            matched.sort_unstable();
            matched.dedup();
            let next = classes.len() as u32 + 1;
            *classes.entry(matched.clone()).or_insert_with(|| {
                for &i in &matched {
                    selector_classes[i as usize].push(next);
                }
                next
            })
        })
        .collect();
    (endpoint_classes, selector_classes)
}

/// The policy maps' content for `rules` in order. `selector_classes[i]`: the label classes
/// label selector `i` matches. Stops adding entries once there are more than a half of the
/// map holds (the capacity check then refuses the state, naming the map).
pub fn tables(rules: &[Rule], selector_classes: &[Vec<u32>]) -> Tables {
    let mut tables = Tables::default();
    // CIDR classes: every distinct prefix of the rules, numbered from 1 in (length, address)
    // order. An address's class is its longest matching prefix, so a CIDR selector matches
    // exactly the classes of the prefixes nested in it (itself included): the rule is
    // expanded to those.
    let prefixes: BTreeSet<Prefix> = rules
        .iter()
        .flat_map(|r| [r.from, r.to])
        .filter_map(|side| Prefix::of(&side))
        .collect();
    let class_of: HashMap<Prefix, u32> = prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i as u32 + 1))
        .collect();
    let mut nested: HashMap<Prefix, Vec<u32>> = HashMap::new();
    for (&prefix, &class) in &class_of {
        for outer in 0..=prefix.len() {
            if let Some(key) = prefix.outer(outer)
                && class_of.contains_key(&key)
            {
                nested.entry(key).or_default().push(class);
            }
        }
    }
    for (&prefix, &class) in &class_of {
        match prefix {
            Prefix::V4(len, addr) => {
                tables.prefixes.insert((len, addr.to_be()), class);
            }
            Prefix::V6(len, addr) => {
                tables
                    .prefixes6
                    .insert((len, std::net::Ipv6Addr::from(addr)), class);
            }
        }
    }
    let values = |side: &Side| -> (u8, Vec<u32>) {
        match *side {
            Side::Any => (selector_kind::ANY, vec![0]),
            Side::Network(id) => (selector_kind::NETWORK, vec![id]),
            Side::Endpoint(id) => (selector_kind::ENDPOINT, vec![id]),
            Side::Labels(i) => (
                selector_kind::LABELS,
                selector_classes
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_default(),
            ),
            Side::Cidr(..) | Side::Cidr6(..) => (
                selector_kind::CIDR,
                nested[&Prefix::of(side).expect("a CIDR side")].clone(),
            ),
        }
    };
    let full = capacity::POLICY_ENTRIES as usize;
    let mut tuples = BTreeSet::new();
    'rules: for (priority, rule) in rules.iter().enumerate() {
        let (from_kind, from_values) = values(&rule.from);
        let (to_kind, to_values) = values(&rule.to);
        let (proto, port) = rule.port.unwrap_or((0, 0));
        let verdict = PolicyVerdict {
            priority: priority as u32,
            action: rule.action,
            _pad: [0; 3],
        };
        for &from_value in &from_values {
            for &to_value in &to_values {
                let key = PolicyKey {
                    slot: 0,
                    from_kind,
                    to_kind,
                    proto,
                    port: port.to_be(),
                    _pad: 0,
                    from_value,
                    to_value,
                };
                // First match wins: an earlier rule's entry for the same key stays.
                tables.entries.entry(key).or_insert(verdict);
                if tables.entries.len() > full {
                    break 'rules;
                }
            }
        }
        if !from_values.is_empty() && !to_values.is_empty() {
            let ported = if rule.port.is_some() {
                policy_tuple::PORTED
            } else {
                0
            };
            tuples.insert(from_kind | to_kind << policy_tuple::TO_SHIFT | ported);
            if from_kind == selector_kind::CIDR {
                tables.cidr_sides |= 1;
            }
            if to_kind == selector_kind::CIDR {
                tables.cidr_sides |= 2;
            }
        }
    }
    tables.tuples = tuples.into_iter().collect();
    debug_assert!(tables.tuples.len() <= POLICY_MAX_TUPLES);
    tables
}

/// A deny of a source prefix towards everything, on every port, is decided before a socket
/// buffer exists. Only if no earlier rule could allow that source: first match wins, and XDP
/// would otherwise pre-empt an earlier allow.
fn deny_sources(model: &Model) -> (Vec<PrefixKey>, Vec<(u8, std::net::Ipv6Addr)>) {
    let (mut deny, mut deny6) = (Vec::new(), Vec::new());
    let mut allowed_before = false;
    for policy in &model.policies {
        if let (Action::Deny, Selector::Cidr(cidr), Selector::Any, true, false) = (
            policy.action,
            &policy.from,
            &policy.to,
            policy.ports.is_empty(),
            allowed_before,
        ) {
            match cidr {
                IpCidr::V4(cidr) => deny.push(prefix_key(cidr)),
                IpCidr::V6(cidr) => deny6.push(prefix6(cidr)),
            }
        }
        allowed_before |= policy.action == Action::Allow;
    }
    (deny, deny6)
}

fn prefix_key(cidr: &Cidr) -> PrefixKey {
    PrefixKey {
        prefix_len: u32::from(cidr.prefix_len),
        addr: be(cidr.network()),
    }
}

fn prefix6(cidr: &Cidr6) -> (u8, std::net::Ipv6Addr) {
    (cidr.prefix_len, cidr.network())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StateFile;

    const STATE: &str = r#"
networks:
  - {name: front, bridge: br-front, subnet: 172.30.1.0/24, gateway: 172.30.1.1}
  - {name: back, bridge: br-back, subnet: 172.30.2.0/24, gateway: 172.30.2.1}
endpoints:
  - name: web
    labels: {app: web}
    interfaces: [{network: front, ip: 172.30.1.2, mac: "02:00:00:00:01:02", host_veth: veth-web}]
  - name: db
    labels: {tier: db, app: pg}
    interfaces: [{network: back, ip: 172.30.2.2, mac: "02:00:00:00:02:02", host_veth: veth-db}]
policies:
  - {name: web-to-db, action: allow, from: {endpoint: web}, to: {labels: {tier: db}}, ports: ["5432/tcp", "5433/tcp"]}
  - {name: no-db, action: deny, from: {network: front}, to: {labels: {tier: db}}}
  - {name: blocklist, action: deny, from: {cidr: 203.0.113.0/24}}
"#;

    fn compiled(text: &str) -> (Model, Compiled) {
        let model = Model::from_spec(&StateFile::parse(text).unwrap()).unwrap();
        let c = compile(&model).unwrap();
        (model, c)
    }

    #[test]
    fn rules_expand_ports_and_keep_their_order() {
        let (_, c) = compiled(STATE);
        assert_eq!(c.rules.len(), 4);
        let ports: Vec<Option<(u8, u16)>> = c.rules.iter().map(|r| r.port).collect();
        assert_eq!(ports, vec![Some((6, 5432)), Some((6, 5433)), None, None]);
        assert_eq!(c.rules[0].action, policy_action::ALLOW);
        assert_eq!(c.rules[0].from, Side::Endpoint(1));
        assert_eq!(c.rules[2].from, Side::Network(1));
        assert_eq!(
            c.rules[3].from,
            Side::Cidr(u32::from_be_bytes([203, 0, 113, 0]), 24)
        );
        // One entry per rule here (each selector has one value), each its rule's index.
        let priorities: Vec<u32> = c.tables.entries.values().map(|v| v.priority).collect();
        assert_eq!(priorities.len(), 4);
        assert_eq!(
            c.tables.prefixes,
            BTreeMap::from([((24, u32::from_be_bytes([203, 0, 113, 0]).to_be()), 1)])
        );
        assert_eq!(c.tables.cidr_sides, 1);
    }

    #[test]
    fn endpoints_matching_the_same_selectors_share_a_label_class() {
        let text = STATE.replace(
            "policies:",
            "  - name: db2\n    labels: {tier: db, app: other}\n    interfaces: [{network: back, ip: 172.30.2.3, mac: \"02:00:00:00:02:03\", host_veth: veth-db2}]\npolicies:",
        );
        let (_, c) = compiled(&text);
        assert_eq!(
            c.label_selectors.len(),
            1,
            "one selector, shared by two rules"
        );
        assert_eq!(c.endpoint_classes, vec![0, 1, 1]);
    }

    #[test]
    fn a_cidr_selector_covers_the_classes_of_the_prefixes_nested_in_it() {
        let cidr = |a: [u8; 4], len| Side::Cidr(u32::from_be_bytes(a), len);
        let rule = |action, from| Rule {
            action,
            from,
            to: Side::Any,
            port: None,
        };
        let rules = [
            rule(policy_action::DENY, cidr([10, 1, 2, 3], 32)),
            rule(policy_action::ALLOW, cidr([10, 0, 0, 0], 8)),
            rule(policy_action::DENY, cidr([10, 1, 0, 0], 16)),
            rule(policy_action::DENY, cidr([192, 168, 0, 0], 16)),
        ];
        let t = tables(&rules, &[]);
        // Classes by (length, address): 10/8 = 1, 10.1/16 = 2, 192.168/16 = 3, the /32 = 4.
        let by_class: BTreeMap<u32, Vec<u32>> =
            t.entries.iter().fold(BTreeMap::new(), |mut m, (k, v)| {
                m.entry(k.from_value).or_default().push(v.priority);
                m
            });
        assert_eq!(by_class[&4], vec![0], "the /32 itself: rule 0 first");
        assert_eq!(
            by_class[&2],
            vec![1],
            "10.1/16: the /8 allow comes before it"
        );
        assert_eq!(by_class[&1], vec![1]);
        assert_eq!(by_class[&3], vec![3]);
        assert_eq!(t.tuples, vec![selector_kind::CIDR]);
    }

    #[test]
    fn ipv6_prefixes_get_classes_after_the_ipv4_ones_and_nest_within_their_family() {
        let v6 = |t: &str| u128::from(t.parse::<std::net::Ipv6Addr>().unwrap());
        let rule = |action, from| Rule {
            action,
            from,
            to: Side::Any,
            port: None,
        };
        let rules = [
            rule(policy_action::DENY, Side::Cidr6(v6("2001:db8:1::"), 48)),
            rule(policy_action::ALLOW, Side::Cidr6(v6("2001:db8::"), 32)),
            rule(
                policy_action::DENY,
                Side::Cidr(u32::from_be_bytes([10, 0, 0, 0]), 8),
            ),
            // ::/0 covers every IPv6 prefix, never an IPv4 one.
            rule(policy_action::DENY, Side::Cidr6(0, 0)),
        ];
        let t = tables(&rules, &[]);
        // IPv4 first: 10/8 = 1; then IPv6 by (length, address): ::/0 = 2, /32 = 3, /48 = 4.
        assert_eq!(
            t.prefixes,
            BTreeMap::from([((8, u32::from_be_bytes([10, 0, 0, 0]).to_be()), 1)])
        );
        let p6 = |t: &str| t.parse::<std::net::Ipv6Addr>().unwrap();
        assert_eq!(
            t.prefixes6,
            BTreeMap::from([
                ((0, p6("::")), 2),
                ((32, p6("2001:db8::")), 3),
                ((48, p6("2001:db8:1::")), 4)
            ])
        );
        let by_class: BTreeMap<u32, Vec<u32>> =
            t.entries.iter().fold(BTreeMap::new(), |mut m, (k, v)| {
                m.entry(k.from_value).or_default().push(v.priority);
                m
            });
        assert_eq!(by_class[&4], vec![0], "the /48 itself first");
        assert_eq!(by_class[&3], vec![1], "the /32 allow");
        assert_eq!(
            by_class[&2],
            vec![3],
            "::/0 covers only itself of what is left"
        );
        assert_eq!(by_class[&1], vec![2], "10/8: no IPv6 prefix covers it");
        assert_eq!(t.cidr_sides, 1);
    }

    #[test]
    fn ipv6_source_denies_go_to_the_ipv6_deny_list() {
        let text = STATE.split("policies:").next().unwrap().to_owned()
            + "policies:\n  - {name: b6, action: deny, from: {cidr: \"2001:db8:bad::/48\"}}\n  - {name: b4, action: deny, from: {cidr: 203.0.113.0/24}}\n";
        let (_, c) = compiled(&text);
        assert_eq!(
            c.deny_sources6,
            vec![(48, "2001:db8:bad::".parse().unwrap())]
        );
        assert_eq!(c.deny_sources.len(), 1);
    }

    #[test]
    fn ten_thousand_rules_compile_fast_into_one_shape() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| Rule {
                action: policy_action::DENY,
                from: Side::Cidr(0x0a00_0000 | i, 32),
                to: Side::Any,
                port: Some((6, 1 + (i % 1000) as u16)),
            })
            .collect();
        let t = tables(&rules, &[]);
        assert_eq!(t.entries.len(), 10_000);
        assert_eq!(t.prefixes.len(), 10_000);
        assert_eq!(t.tuples, vec![selector_kind::CIDR | policy_tuple::PORTED]);
    }

    #[test]
    fn a_source_deny_goes_to_xdp_only_when_nothing_before_could_allow_it() {
        let (_, c) = compiled(STATE);
        assert!(c.deny_sources.is_empty(), "web-to-db (allow) comes first");
        let only_deny = STATE
            .split("  - {name: web-to-db")
            .next()
            .unwrap()
            .to_owned()
            + "  - {name: blocklist, action: deny, from: {cidr: 203.0.113.0/24}}\n";
        let (_, c) = compiled(&only_deny);
        assert_eq!(
            c.deny_sources,
            vec![PrefixKey {
                prefix_len: 24,
                addr: u32::from_be_bytes([203, 0, 113, 0]).to_be()
            }]
        );
    }
}

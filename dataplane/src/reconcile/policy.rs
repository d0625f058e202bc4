//! Compiling the model's policies into what the kernel evaluates: an ordered list of rules
//! (a rule with several ports becomes one rule per port), label selectors as bits that each
//! endpoint carries, and the deny list XDP drops outside sources with.

use std::collections::BTreeMap;

use dataplane_common::{PolicyRule, PrefixKey, capacity, policy_action, selector_kind};

use crate::model::{Action, Cidr, Model, Selector};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "policies[{policy}]: the policies use more than 64 distinct label selectors; \
         combine some"
    )]
    TooManyLabelSelectors { policy: String },
    #[error(
        "policies[{policy}]: the policies expand to more than {max} rules (one per port); \
         use fewer ports or rules"
    )]
    TooManyRules { policy: String, max: u32 },
}

/// The kernel's view of the policies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub rules: Vec<PolicyRule>,
    /// Label selectors in bit order: endpoint bit `i` is set when its labels match `[i]`.
    pub label_selectors: Vec<BTreeMap<String, String>>,
    /// Outside source prefixes dropped at XDP.
    pub deny_sources: Vec<PrefixKey>,
}

impl Compiled {
    /// The label bits of an endpoint with `labels`.
    pub fn label_bits(&self, labels: &BTreeMap<String, String>) -> u64 {
        self.label_selectors
            .iter()
            .enumerate()
            .filter(|(_, selector)| crate::model::labels_match(selector, labels))
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }
}

fn be(addr: std::net::Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

fn mask(cidr: &Cidr) -> u32 {
    let host_order = if cidr.prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(cidr.prefix_len))
    };
    host_order.to_be()
}

pub fn compile(model: &Model) -> Result<Compiled, PolicyError> {
    let mut compiled = Compiled::default();
    for policy in &model.policies {
        let mut side = |selector: &Selector| -> Result<(u8, u32, u32), PolicyError> {
            Ok(match selector {
                Selector::Any => (selector_kind::ANY, 0, 0),
                Selector::Network(name) => {
                    let id = model.networks.iter().position(|n| &n.name == name);
                    (selector_kind::NETWORK, id.expect("validated") as u32 + 1, 0)
                }
                Selector::Endpoint(name) => {
                    let id = model.endpoints.iter().position(|e| &e.name == name);
                    (
                        selector_kind::ENDPOINT,
                        id.expect("validated") as u32 + 1,
                        0,
                    )
                }
                Selector::Labels(labels) => {
                    let bit = match compiled.label_selectors.iter().position(|l| l == labels) {
                        Some(bit) => bit,
                        None if compiled.label_selectors.len() < 64 => {
                            compiled.label_selectors.push(labels.clone());
                            compiled.label_selectors.len() - 1
                        }
                        None => {
                            return Err(PolicyError::TooManyLabelSelectors {
                                policy: policy.name.clone(),
                            });
                        }
                    };
                    (selector_kind::LABELS, bit as u32, 0)
                }
                Selector::Cidr(cidr) => (selector_kind::CIDR, be(cidr.network()), mask(cidr)),
            })
        };
        let (from_kind, from_value, from_mask) = side(&policy.from)?;
        let (to_kind, to_value, to_mask) = side(&policy.to)?;
        let action = match policy.action {
            Action::Allow => policy_action::ALLOW,
            Action::Deny => policy_action::DENY,
        };
        let rule = |proto: u8, port: u16| PolicyRule {
            from_kind,
            to_kind,
            action,
            proto,
            port: port.to_be(),
            _pad: 0,
            from_value,
            from_mask,
            to_value,
            to_mask,
        };
        if policy.ports.is_empty() {
            compiled.rules.push(rule(0, 0));
        } else {
            for (port, proto) in &policy.ports {
                compiled.rules.push(rule(proto.number(), *port));
            }
        }
        if compiled.rules.len() > capacity::POLICY_RULES as usize {
            return Err(PolicyError::TooManyRules {
                policy: policy.name.clone(),
                max: capacity::POLICY_RULES,
            });
        }
        // A deny of a source prefix towards everything, on every port, is decided before a
        // socket buffer exists. Only if no earlier rule could allow that source: first match
        // wins, and XDP would otherwise pre-empt an earlier allow.
        if let (Action::Deny, Selector::Cidr(cidr), Selector::Any, true) = (
            policy.action,
            &policy.from,
            &policy.to,
            policy.ports.is_empty(),
        ) {
            let shadowed = model
                .policies
                .iter()
                .take_while(|p| p.name != policy.name)
                .any(|p| p.action == Action::Allow);
            if !shadowed {
                compiled.deny_sources.push(PrefixKey {
                    prefix_len: u32::from(cidr.prefix_len),
                    addr: be(cidr.network()),
                });
            }
        }
    }
    Ok(compiled)
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
        let ports: Vec<u16> = c.rules.iter().map(|r| u16::from_be(r.port)).collect();
        assert_eq!(ports, vec![5432, 5433, 0, 0]);
        assert_eq!(c.rules[0].action, policy_action::ALLOW);
        assert_eq!(
            (c.rules[0].from_kind, c.rules[0].from_value),
            (selector_kind::ENDPOINT, 1)
        );
        assert_eq!(
            (c.rules[2].from_kind, c.rules[2].from_value),
            (selector_kind::NETWORK, 1)
        );
        let cidr = &c.rules[3];
        assert_eq!(cidr.from_kind, selector_kind::CIDR);
        assert_eq!(
            cidr.from_value,
            u32::from_be_bytes([203, 0, 113, 0]).to_be()
        );
        assert_eq!(cidr.from_mask, 0xffff_ff00u32.to_be());
    }

    #[test]
    fn label_selectors_become_bits_endpoints_carry() {
        let (model, c) = compiled(STATE);
        assert_eq!(
            c.label_selectors.len(),
            1,
            "one distinct selector, shared by two rules"
        );
        assert_eq!(c.label_bits(&model.endpoints[1].labels), 1);
        assert_eq!(c.label_bits(&model.endpoints[0].labels), 0);
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

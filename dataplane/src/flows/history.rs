//! The agent's memory of recent flows, for `dataplane observe --last N`: a bounded ring, the
//! oldest record going when a new one comes (like Hubble's ring buffer of flows).

use std::{
    collections::VecDeque,
    sync::{Arc, OnceLock},
};

use super::record::{Flow, Record};

/// A record and its JSON lines, each serialised once, when a reader first asks for it: most
/// records are never read (the history turns over, nobody follows), and serialising both
/// forms of every record was the largest part of the agent's CPU under load.
#[derive(Debug)]
pub struct Stored {
    pub record: Record,
    /// Hubble's form.
    json: OnceLock<String>,
    /// With our extensions.
    extended: OnceLock<String>,
    /// Hubble's API response of this record, decoded from `json` when first asked for.
    pub proto: OnceLock<Option<Box<crate::hubble::api::observer::GetFlowsResponse>>>,
}

impl Stored {
    pub fn new(record: Record) -> Stored {
        Stored {
            record,
            json: OnceLock::new(),
            extended: OnceLock::new(),
            proto: OnceLock::new(),
        }
    }

    /// With a line already made (the flow log needed it), so it is not made twice.
    pub fn with_line(record: Record, extended: bool, line: String) -> Stored {
        let stored = Stored::new(record);
        let cell = if extended {
            &stored.extended
        } else {
            &stored.json
        };
        let _ = cell.set(line);
        stored
    }

    /// Hubble's JSON line.
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| self.record.clone().hubble_json())
    }

    /// The JSON line with our extensions.
    pub fn extended(&self) -> &str {
        self.extended.get_or_init(|| self.record.extended_json())
    }

    pub fn line(&self, extended: bool) -> &str {
        if extended {
            self.extended()
        } else {
            self.json()
        }
    }
}

pub struct History {
    records: VecDeque<Arc<Stored>>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            records: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
        }
    }

    pub fn push(&mut self, stored: Arc<Stored>) {
        if self.capacity == 0 {
            return;
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        self.records.push_back(stored);
    }

    /// The latest `n` records matching `filter`, oldest first.
    pub fn last(&self, filter: impl Fn(&Flow) -> bool, n: usize) -> Vec<Arc<Stored>> {
        let mut found: Vec<Arc<Stored>> = self
            .records
            .iter()
            .rev()
            .filter(|s| filter(&s.record.flow))
            .take(n)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    /// The first `n` records matching `filter`, oldest first.
    pub fn first(&self, filter: impl Fn(&Flow) -> bool, n: usize) -> Vec<Arc<Stored>> {
        self.records
            .iter()
            .filter(|s| filter(&s.record.flow))
            .take(n)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::filter::Filter;
    use crate::flows::{
        clock::Clock,
        decode::{self, IPPROTO_TCP, IPPROTO_UDP, tests::raw_event},
        record::{self, Context, Identities},
    };

    fn stored(proto: u8, sport: u16) -> Arc<Stored> {
        let raw = raw_event(
            dataplane_common::flow_kind::NEW,
            proto,
            ("192.0.2.2", sport),
            ("192.0.2.9", 80),
        );
        let record = record::build(
            &decode::from_raw(&raw).unwrap(),
            &Context {
                identities: &Identities::default(),
                clock: &Clock::with_offset(0),
                node_name: "n",
                ifname: None,
            },
        );
        Arc::new(Stored::new(record))
    }

    fn sport(s: &Stored) -> u16 {
        s.record.flow.ports().unwrap().0
    }

    #[test]
    fn the_oldest_goes_and_the_last_come_in_order() {
        let mut history = History::new(3);
        for port in 1..=5 {
            history.push(stored(IPPROTO_TCP, port));
        }
        assert_eq!(history.len(), 3);
        let all: Vec<u16> = history
            .last(|f| Filter::default().matches(f), 10)
            .iter()
            .map(|s| sport(s))
            .collect();
        assert_eq!(all, vec![3, 4, 5]);
        let two: Vec<u16> = history
            .last(|f| Filter::default().matches(f), 2)
            .iter()
            .map(|s| sport(s))
            .collect();
        assert_eq!(two, vec![4, 5]);
    }

    #[test]
    fn last_counts_matching_records_only() {
        let mut history = History::new(10);
        history.push(stored(IPPROTO_UDP, 1));
        history.push(stored(IPPROTO_TCP, 2));
        history.push(stored(IPPROTO_UDP, 3));
        history.push(stored(IPPROTO_TCP, 4));
        let udp = Filter {
            protocol: Some("udp".into()),
            ..Filter::default()
        };
        let found: Vec<u16> = history
            .last(|f| udp.matches(f), 5)
            .iter()
            .map(|s| sport(s))
            .collect();
        assert_eq!(found, vec![1, 3]);
    }
}

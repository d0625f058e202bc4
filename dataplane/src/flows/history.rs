//! The agent's memory of recent flows, for `dataplane observe --last N`: a bounded ring, the
//! oldest record going when a new one comes (like Hubble's ring buffer of flows).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, OnceLock},
};

use super::{
    clock::Clock,
    decode::Event,
    record::{self, Context, Flow, Identities, Record},
};

/// What records are written from besides their events, shared by every record made while it
/// held: the identities of the model in force, the clock, the node's name. A new one comes
/// with each model the agent applies.
#[derive(Debug)]
pub struct Basis {
    pub identities: Identities,
    pub clock: Clock,
    pub node_name: String,
}

/// An event not written out as a record yet, with what it will be written from.
#[derive(Debug)]
struct Pending {
    event: Event,
    basis: Arc<Basis>,
    ifname: Option<Arc<str>>,
}

/// A flow record, written from its event when a reader first asks for it, and its JSON lines,
/// each serialised once, when first asked for: most records are never read (the history turns
/// over, nobody follows), and writing every record out (its strings, its endpoints' labels)
/// was most of the agent's CPU under load. What every event needs at once, the metrics, comes
/// from [`record::classify`] without the record.
#[derive(Debug)]
pub struct Stored {
    record: OnceLock<Record>,
    /// Until the record is written; then taken, so an old [`Basis`] is not kept alive.
    pending: Mutex<Option<Pending>>,
    /// Hubble's form.
    json: OnceLock<String>,
    /// With our extensions.
    extended: OnceLock<String>,
    /// Hubble's API response of this record, decoded from `json` when first asked for.
    pub proto: OnceLock<Option<Box<crate::hubble::api::observer::GetFlowsResponse>>>,
}

impl Stored {
    /// A record written already.
    pub fn new(record: Record) -> Stored {
        Stored {
            record: OnceLock::from(record),
            pending: Mutex::new(None),
            json: OnceLock::new(),
            extended: OnceLock::new(),
            proto: OnceLock::new(),
        }
    }

    /// The record of `event`, written when first read.
    pub fn of_event(event: Event, basis: Arc<Basis>, ifname: Option<Arc<str>>) -> Stored {
        Stored {
            record: OnceLock::new(),
            pending: Mutex::new(Some(Pending {
                event,
                basis,
                ifname,
            })),
            json: OnceLock::new(),
            extended: OnceLock::new(),
            proto: OnceLock::new(),
        }
    }

    pub fn record(&self) -> &Record {
        if let Some(record) = self.record.get() {
            return record;
        }
        // A panic while writing a record leaves nothing half-done behind the lock.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Pending {
            event,
            basis,
            ifname,
        }) = pending.take()
        {
            let record = record::build(
                &event,
                &Context {
                    identities: &basis.identities,
                    clock: &basis.clock,
                    node_name: &basis.node_name,
                    ifname: ifname.as_deref(),
                },
            );
            let _ = self.record.set(record);
        }
        drop(pending);
        self.record.get().expect("a record is written or pending")
    }

    pub fn flow(&self) -> &Flow {
        &self.record().flow
    }

    /// Hubble's JSON line.
    pub fn json(&self) -> &str {
        self.json
            .get_or_init(|| self.record().clone().hubble_json())
    }

    /// The JSON line with our extensions.
    pub fn extended(&self) -> &str {
        self.extended.get_or_init(|| self.record().extended_json())
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
            .filter(|s| filter(s.flow()))
            .take(n)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    /// Writes out the records among the latest `n` still pending, so that they no longer hold
    /// on to the basis they were made with (see [`Stored::record`]).
    pub fn write_latest(&self, n: usize) {
        for stored in self.records.iter().rev().take(n) {
            stored.record();
        }
    }

    /// The first `n` records matching `filter`, oldest first.
    pub fn first(&self, filter: impl Fn(&Flow) -> bool, n: usize) -> Vec<Arc<Stored>> {
        self.records
            .iter()
            .filter(|s| filter(s.flow()))
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
        s.flow().ports().unwrap().0
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
    fn written_records_let_go_of_the_basis_they_were_made_with() {
        let basis = Arc::new(Basis {
            identities: Identities::default(),
            clock: Clock::with_offset(0),
            node_name: "n".into(),
        });
        let mut history = History::new(10);
        for sport in 1..=3 {
            let raw = raw_event(
                dataplane_common::flow_kind::NEW,
                IPPROTO_TCP,
                ("192.0.2.2", sport),
                ("192.0.2.9", 80),
            );
            let event = decode::from_raw(&raw).unwrap();
            history.push(Arc::new(Stored::of_event(event, basis.clone(), None)));
        }
        assert_eq!(Arc::strong_count(&basis), 4);
        history.write_latest(2);
        assert_eq!(Arc::strong_count(&basis), 2);
        let sports: Vec<u16> = history
            .last(|_| true, 10)
            .iter()
            .map(|s| sport(s))
            .collect();
        assert_eq!(sports, vec![1, 2, 3]);
        assert_eq!(Arc::strong_count(&basis), 1);
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

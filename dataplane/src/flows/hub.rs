//! What the Hubble API (crate::hubble) serves from, shared between the main loop that makes
//! records and the server's tasks: the history of recent flows, and every new one as it comes
//! (a broadcast channel; a subscriber that falls behind is told how many it missed).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::sync::broadcast;

use super::{
    history::{History, Stored},
    record::Flow,
};

/// Records a live subscriber may have waiting before it misses some.
const LIVE_QUEUE: usize = 4096;

pub struct Hub {
    history: Mutex<History>,
    live: broadcast::Sender<Arc<Stored>>,
    seen: AtomicU64,
    started: Instant,
    node_name: String,
}

impl Hub {
    pub fn new(capacity: usize, node_name: String) -> Hub {
        Hub {
            history: Mutex::new(History::new(capacity)),
            live: broadcast::Sender::new(LIVE_QUEUE),
            seen: AtomicU64::new(0),
            started: Instant::now(),
            node_name,
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        // A panic while holding it leaves a history that is still whole (push is one step).
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, stored: Arc<Stored>) {
        let mut history = self.history();
        history.push(stored.clone());
        self.seen.fetch_add(1, Ordering::Relaxed);
        // Sent while the history is locked, so that a subscriber that took the history and
        // subscribed under the same lock sees each record exactly once.
        let _no_subscriber = self.live.send(stored);
    }

    /// See [`History::write_latest`].
    pub fn write_latest(&self, n: usize) {
        self.history().write_latest(n);
    }

    pub fn last(&self, filter: impl Fn(&Flow) -> bool, n: usize) -> Vec<Arc<Stored>> {
        self.history().last(filter, n)
    }

    /// The history's records (`first` the oldest `n`, else the latest `n`) matching `filter`,
    /// and with `follow` a subscription to what comes after them.
    pub fn snapshot(
        &self,
        filter: impl Fn(&Flow) -> bool,
        n: usize,
        first: bool,
        follow: bool,
    ) -> (Vec<Arc<Stored>>, Option<broadcast::Receiver<Arc<Stored>>>) {
        let history = self.history();
        let records = if first {
            history.first(filter, n)
        } else {
            history.last(filter, n)
        };
        (records, follow.then(|| self.live.subscribe()))
    }

    pub fn len(&self) -> usize {
        self.history().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.history().capacity()
    }

    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    pub fn uptime_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

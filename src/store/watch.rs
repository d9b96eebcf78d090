//! The watch hub: every applied batch of changes is published once, as shared events,
//! to whoever listens. Publishing never waits: a listener that falls more than the
//! channel's capacity behind learns that it lagged and catches up from the store's
//! history instead (etcd's synced and unsynced watcher groups).

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::store::mvcc::RangeEnd;

/// Batches kept for listeners that are behind, before they must read history instead.
const HUB_CAPACITY: usize = 4096;

/// The changes of the revisions `from..=to`, in revision order.
#[derive(Debug)]
pub struct EventBatch {
    pub from: i64,
    pub to: i64,
    /// Every event of those revisions, or None when the store jumped there without
    /// them (a snapshot was installed): listeners must read the history.
    pub events: Option<Vec<Event>>,
}

/// The publishing side, owned by the store.
pub struct WatchHub {
    tx: broadcast::Sender<Arc<EventBatch>>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self { tx: broadcast::channel(HUB_CAPACITY).0 }
    }
}

impl WatchHub {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventBatch>> {
        self.tx.subscribe()
    }

    pub(crate) fn publish(&self, batch: EventBatch) {
        // No listener is not an error.
        let _ = self.tx.send(Arc::new(batch));
    }
}

/// The keys one watcher covers: etcd's key and range_end.
#[derive(Clone, Debug)]
pub struct KeyRange {
    pub key: bytes::Bytes,
    pub end: RangeEnd,
}

impl KeyRange {
    pub fn new(key: bytes::Bytes, range_end: &[u8]) -> Self {
        Self { end: RangeEnd::from_request(range_end), key }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        self.end.contains(&self.key, k)
    }
}

pub fn put_event(kv: KeyValue) -> Event {
    Event { r#type: EventType::Put as i32, kv: Some(kv), prev_kv: None }
}

pub fn delete_event(key: bytes::Bytes, rev: i64) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue { key, mod_revision: rev, ..Default::default() }),
        prev_kv: None,
    }
}

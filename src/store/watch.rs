//! The watch hub: every applied batch of changes is published once, as shared events,
//! to whoever listens. Publishing never waits: a listener that falls more than the
//! channel's capacity behind learns that it lagged and catches up from the store's
//! history instead (etcd's synced and unsynced watcher groups).

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message;
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
    /// Each event's protobuf encoding, made by the first listener that needs it and
    /// shared by all the others.
    encoded: Vec<OnceLock<Bytes>>,
}

impl EventBatch {
    pub fn new(from: i64, to: i64, events: Option<Vec<Event>>) -> Self {
        let encoded = events.as_ref().map_or(0, Vec::len);
        Self { from, to, events, encoded: (0..encoded).map(|_| OnceLock::new()).collect() }
    }

    /// The protobuf encoding of event `i` (an index into `events`).
    pub fn encoded(&self, i: usize) -> &Bytes {
        self.encoded[i].get_or_init(|| match &self.events {
            Some(events) => Bytes::from(events[i].encode_to_vec()),
            None => Bytes::new(),
        })
    }
}

/// The publishing side, owned by the store.
#[derive(Clone)]
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

    /// A place for batches to wait until the writes that made them are answered.
    pub(crate) fn hold(&self) -> Held {
        Held { hub: self.clone(), batches: Vec::new() }
    }
}

/// Applied batches not yet published: they go out, in order, when this is dropped. The
/// Raft driver answers the writers first, so a put's reply does not wait behind the
/// work of handing its events to every watcher.
pub struct Held {
    hub: WatchHub,
    batches: Vec<EventBatch>,
}

impl Held {
    pub(crate) fn push(&mut self, batch: EventBatch) {
        self.batches.push(batch);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for batch in self.batches.drain(..) {
            self.hub.publish(batch);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Held batches reach listeners only when let go, all of them, in the order made.
    #[test]
    fn held_batches_go_out_in_order_when_dropped() {
        let hub = WatchHub::default();
        let mut rx = hub.subscribe();
        let mut held = hub.hold();
        held.push(EventBatch::new(1, 1, Some(vec![delete_event("a".into(), 1)])));
        held.push(EventBatch::new(2, 3, None));
        assert!(rx.try_recv().is_err(), "nothing is published while held");
        drop(held);
        let got: Vec<(i64, i64)> = std::iter::from_fn(|| rx.try_recv().ok()).map(|b| (b.from, b.to)).collect();
        assert_eq!(got, vec![(1, 1), (2, 3)]);
    }
}

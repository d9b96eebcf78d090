//! The Watch service: one bidirectional stream carries many watchers.
//!
//! Each stream runs one task. It listens to the store's watch hub, where every applied
//! batch of changes is published once, and hands each watcher the events on its keys.
//! A watcher is *synced* while the hub's batches reach it without a gap; one that
//! starts in the past, or whose stream fell behind the hub (a slow client), is
//! *unsynced* and reads the history from the store in bounded steps until it reaches
//! the present. Writes never wait for watchers: the hub drops what a slow stream
//! cannot take, and that stream catches up from storage.
//!
//! Every watcher holds the next revision it needs; an event below it is never sent
//! again, and a batch that starts above it sends the watcher to the history first, so
//! events arrive in revision order, once, with no gap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::Streaming;

use super::auth::Credentials;
use super::watch_wire::{Outgoing, SharedEventsBuilder, SharedHeader};
use super::Ctx;
use crate::pb::etcdserverpb::watch_create_request::FilterType;
use crate::pb::etcdserverpb::{watch_request, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::pb::mvccpb::{event::EventType, Event};
use crate::store::mvcc::NEVER_COMPACTED;
use crate::store::watch::{EventBatch, KeyRange};
use crate::store::MvccError;

/// Events read from the history per step, for all of a stream's unsynced watchers.
const CATCH_UP_EVENTS: usize = 1000;
/// Runs of responses queued towards one client before its stream stops reading the hub.
const STREAM_QUEUE: usize = 4;
/// A run of responses ends when it has this many, or this many bytes of events.
const RUN_RESPONSES: usize = 128;
const RUN_BYTES: usize = 1 << 20;

pub struct WatchService {
    ctx: Ctx,
    progress_every: Duration,
    max_response_bytes: usize,
    /// Streams open now.
    streams: prometheus::IntGauge,
    headers: Arc<SharedHeader>,
}

impl WatchService {
    pub fn new(ctx: Ctx, progress_every: Duration, max_response_bytes: usize, streams: prometheus::IntGauge) -> Self {
        Self { ctx, progress_every, max_response_bytes, streams, headers: Arc::default() }
    }
}

/// Counts a stream as open while it lives.
struct Open(prometheus::IntGauge);

impl Open {
    fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        Open(g.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl WatchService {
    /// Serves one watch stream: its task runs until the client or the member goes.
    /// Its watchers are checked against the permissions of the user `credentials` name.
    /// Returns the runs of responses it sends.
    pub fn open(&self, incoming: Streaming<WatchRequest>, credentials: Credentials) -> mpsc::Receiver<Vec<Outgoing>> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        // Subscribe before anything is read from the store, so no batch falls between.
        let hub = self.ctx.store.subscribe();
        let stream = WatchStream {
            ctx: self.ctx.clone(),
            credentials,
            tx,
            run: Vec::new(),
            run_bytes: 0,
            max_response_bytes: self.max_response_bytes,
            watchers: BTreeMap::new(),
            by_key: HashMap::new(),
            ranged: BTreeSet::new(),
            next_auto: 0,
            hub_at: self.ctx.store.revision(),
            deliveries: Vec::new(),
            behind: false,
            headers: self.headers.clone(),
        };
        let open = Open::new(&self.streams);
        let progress_every = self.progress_every;
        tokio::spawn(async move {
            stream.run(incoming, hub, progress_every).await;
            drop(open);
        });
        rx
    }
}

struct Watcher {
    range: KeyRange,
    single_key: bool,
    /// The next revision this watcher needs.
    next: i64,
    synced: bool,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    /// No events went out since the last progress tick.
    quiet: bool,
}

impl Watcher {
    fn wants(&self, ev: &Event) -> bool {
        let Some(kv) = &ev.kv else { return false };
        if kv.mod_revision < self.next || !self.range.contains(&kv.key) {
            return false;
        }
        match EventType::try_from(ev.r#type) {
            Ok(EventType::Put) => !self.no_put,
            Ok(EventType::Delete) => !self.no_delete,
            Err(_) => false,
        }
    }
}

struct WatchStream {
    ctx: Ctx,
    credentials: Credentials,
    /// Responses go out in runs: all that one step of the stream made, in order, as one
    /// message on the channel rather than one each.
    tx: mpsc::Sender<Vec<Outgoing>>,
    run: Vec<Outgoing>,
    run_bytes: usize,
    max_response_bytes: usize,
    watchers: BTreeMap<i64, Watcher>,
    /// Single-key watchers by key, so an event finds them without visiting every watcher.
    by_key: HashMap<Bytes, Vec<i64>>,
    /// The other watchers.
    ranged: BTreeSet<i64>,
    next_auto: i64,
    /// The newest revision the hub has brought this stream.
    hub_at: i64,
    /// A batch's deliveries, (watcher, event index, the watcher's responses are its
    /// own), kept between batches for its room.
    deliveries: Vec<(i64, usize, bool)>,
    /// Some watcher may be unsynced: set whenever one becomes so, cleared when a look
    /// finds none (rather than looking at every watcher at every step).
    behind: bool,
    headers: Arc<SharedHeader>,
}

/// The client went away.
struct Gone;

impl WatchStream {
    async fn run(
        mut self,
        mut incoming: Streaming<WatchRequest>,
        mut hub: broadcast::Receiver<Arc<EventBatch>>,
        progress_every: Duration,
    ) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let ctx = self.ctx.clone();
        let stopped = ctx.stopped();
        tokio::pin!(stopped);
        loop {
            if self.behind {
                self.behind = self.watchers.values().any(|w| !w.synced);
            }
            let behind = self.behind;
            let step = tokio::select! {
                biased;
                _ = &mut stopped => return,
                _ = self.tx.closed() => return,
                req = incoming.message() => match req {
                    Ok(Some(req)) => self.on_request(req).await,
                    // The client closed its side, or the stream broke.
                    Ok(None) | Err(_) => return,
                },
                batch = hub.recv() => match batch {
                    Ok(b) => self.on_batch(&b).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // The hub dropped batches this stream had not taken: every
                        // watcher reads the history from where it stands.
                        self.unsync_all();
                        Ok(())
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => self.on_progress_tick().await,
                _ = std::future::ready(()), if behind => self.catch_up().await,
            };
            if step.is_err() || self.flush().await.is_err() {
                return;
            }
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        self.ctx.header(Some(ResponseHeader { revision, ..Default::default() }))
    }

    /// Adds a response to the current run, which leaves when the step ends or it is full.
    async fn send(&mut self, resp: impl Into<Outgoing>) -> Result<(), Gone> {
        let resp = resp.into();
        self.run_bytes += resp.size();
        self.run.push(resp);
        if self.run.len() >= RUN_RESPONSES || self.run_bytes >= RUN_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        if self.run.is_empty() {
            return Ok(());
        }
        self.run_bytes = 0;
        // The next run is likely as long: room for it now rather than growing it.
        let room = self.run.len();
        let run = std::mem::replace(&mut self.run, Vec::with_capacity(room));
        self.tx.send(run).await.map_err(|_| Gone)
    }

    async fn on_request(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                // Cancelling an unknown watcher is answered with nothing, as etcd does.
                if self.remove(c.watch_id) {
                    let resp = WatchResponse {
                        header: self.header(self.ctx.store.revision()),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    self.send(resp).await?;
                }
                Ok(())
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => self.progress_all().await,
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), Gone> {
        let current = self.ctx.store.revision();
        let refuse = |reason: &str| WatchResponse {
            header: self.header(current),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        // An empty key is the smallest key, "\0".
        let key = if c.key.is_empty() { Bytes::from_static(&[0]) } else { c.key.clone() };
        let permitted =
            self.ctx.caller_of(&self.credentials).await.and_then(|who| self.ctx.require_read(&who, &key, &c.range_end));
        if let Err(e) = permitted {
            // etcd's words: the gRPC error as Go prints it (a missing user, a token no
            // longer valid, or a range not permitted).
            return self.send(refuse(&format!("rpc error: code = {:?} desc = {}", e.code(), e.message()))).await;
        }
        let bounded = c.range_end.len() > 1 || (c.range_end.len() == 1 && c.range_end[0] != 0);
        if bounded && key.as_ref() >= c.range_end.as_ref() {
            return self.send(refuse("mvcc: watcher range is empty")).await;
        }
        let id = if c.watch_id == 0 {
            while self.watchers.contains_key(&self.next_auto) {
                self.next_auto += 1;
            }
            self.next_auto += 1;
            self.next_auto - 1
        } else if self.watchers.contains_key(&c.watch_id) {
            return self.send(refuse("mvcc: duplicate watch ID provided on the WatchStream")).await;
        } else {
            c.watch_id
        };
        let next = match c.start_revision {
            0 => current + 1,
            // As etcd: from before the first revision is compacted once anything is, and
            // from the next revision until then.
            r if r < 0 && self.ctx.store.compact_revision() == NEVER_COMPACTED => current + 1,
            r => r,
        };
        let w = Watcher {
            single_key: c.range_end.is_empty(),
            range: KeyRange::new(key.clone(), &c.range_end),
            next,
            // A start in the past reads the history first.
            synced: next > current,
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            fragment: c.fragment,
            progress_notify: c.progress_notify,
            quiet: true,
        };
        self.behind |= !w.synced;
        if w.single_key {
            self.by_key.entry(key).or_default().push(id);
        } else {
            self.ranged.insert(id);
        }
        self.watchers.insert(id, w);
        self.send(WatchResponse { header: self.header(current), watch_id: id, created: true, ..Default::default() })
            .await
    }

    fn remove(&mut self, id: i64) -> bool {
        let Some(w) = self.watchers.remove(&id) else { return false };
        self.ranged.remove(&id);
        if w.single_key {
            if let Some(ids) = self.by_key.get_mut(&w.range.key) {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    self.by_key.remove(&w.range.key);
                }
            }
        }
        true
    }

    fn unsync_all(&mut self) {
        self.behind = true;
        let from = self.hub_at + 1;
        for w in self.watchers.values_mut() {
            if w.synced {
                w.synced = false;
                w.next = w.next.max(from);
            }
        }
    }

    /// Hands a batch from the hub to the synced watchers it concerns.
    async fn on_batch(&mut self, b: &Arc<EventBatch>) -> Result<(), Gone> {
        if b.to <= self.hub_at {
            return Ok(());
        }
        let events = match &b.events {
            Some(events) if b.from <= self.hub_at + 1 => events,
            // A gap, or a jump by snapshot: the history has what is missing.
            _ => {
                self.unsync_all();
                self.hub_at = b.to;
                return Ok(());
            }
        };
        self.hub_at = b.to;
        // Which of the batch's events each synced watcher gets, by index: gathered in the
        // events' order, then grouped by watcher (the sort is stable, so each watcher's
        // events stay in order).
        let mut deliveries = std::mem::take(&mut self.deliveries);
        deliveries.clear();
        for (i, ev) in events.iter().enumerate() {
            let Some(kv) = &ev.kv else { continue };
            let keyed = self.by_key.get(&kv.key).map(Vec::as_slice).unwrap_or_default();
            for id in keyed.iter().chain(&self.ranged) {
                if let Some(w) = self.watchers.get_mut(id) {
                    if w.synced && w.wants(ev) {
                        w.quiet = false;
                        deliveries.push((*id, i, w.prev_kv || w.fragment));
                    }
                }
            }
        }
        deliveries.sort_by_key(|&(id, _, _)| id);
        // A synced watcher's `next` is left where it was: below `hub_at` it means nothing,
        // and `unsync_all` moves it up before it is used again.
        // Plain watchers' responses share the batch's encoded events; the others' are
        // built for each alone: previous values are looked up, and a large response may
        // be split.
        let mut shared = SharedEventsBuilder::new(b.clone(), deliveries.len());
        let mut plain = Vec::with_capacity(deliveries.len());
        let mut own = Vec::new();
        for group in deliveries.chunk_by(|a, b| a.0 == b.0) {
            let (id, _, alone) = group[0];
            if alone {
                own.push(group);
            } else {
                plain.push((id, shared.take(group.iter().map(|&(_, i, _)| i))));
            }
        }
        let sent = self.send_batch(shared, plain, own, events, b.to).await;
        self.deliveries = deliveries;
        sent
    }

    async fn send_batch(
        &mut self,
        shared: SharedEventsBuilder,
        plain: Vec<(i64, std::ops::Range<usize>)>,
        own: Vec<&[(i64, usize, bool)]>,
        events: &[Event],
        revision: i64,
    ) -> Result<(), Gone> {
        if !plain.is_empty() {
            let header = self.headers.encoded(self.header(revision).unwrap_or_default());
            let shared = shared.finish(header);
            for (watch_id, picks) in plain {
                self.send(Outgoing::Events { shared: shared.clone(), watch_id, picks }).await?;
            }
        }
        for group in own {
            let mine = group.iter().map(|&(_, i, _)| events[i].clone()).collect();
            self.deliver(group[0].0, mine, revision).await?;
        }
        Ok(())
    }

    /// One bounded step of reading the history for the unsynced watchers.
    async fn catch_up(&mut self) -> Result<(), Gone> {
        let store = self.ctx.store.clone();
        let compacted = store.compact_revision();
        let lost: Vec<i64> =
            self.watchers.iter().filter(|(_, w)| !w.synced && w.next < compacted).map(|(id, _)| *id).collect();
        for id in lost {
            self.remove(id);
            let resp = WatchResponse {
                header: self.header(store.revision()),
                watch_id: id,
                canceled: true,
                compact_revision: compacted,
                ..Default::default()
            };
            self.send(resp).await?;
        }
        let Some(from) = self.watchers.values().filter(|w| !w.synced).map(|w| w.next).min() else { return Ok(()) };
        let current = store.revision();
        if from > current {
            for w in self.watchers.values_mut().filter(|w| !w.synced) {
                w.synced = true;
            }
            return Ok(());
        }
        let read = tokio::task::spawn_blocking(move || store.events(None, from, current, CATCH_UP_EVENTS)).await;
        let (events, covered) = match read {
            Ok(Ok(r)) => r,
            // Compacted meanwhile: the next step cancels whom it concerns.
            Ok(Err(MvccError::Compacted)) => return Ok(()),
            // A snapshot is replacing the store: its history is read once it is in.
            Ok(Err(MvccError::Installing)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the watch history failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        let ids: Vec<i64> =
            self.watchers.iter().filter(|(_, w)| !w.synced && w.next <= covered).map(|(id, _)| *id).collect();
        for id in ids {
            let Some(w) = self.watchers.get_mut(&id) else { continue };
            let mine: Vec<Event> = events.iter().filter(|e| w.wants(e)).cloned().collect();
            w.next = covered + 1;
            w.synced = covered >= current;
            if !mine.is_empty() {
                self.deliver(id, mine, covered).await?;
            }
        }
        Ok(())
    }

    /// Sends one watcher its events (with previous values if asked), fragmented if asked
    /// and too large for one response.
    async fn deliver(&mut self, id: i64, mut events: Vec<Event>, revision: i64) -> Result<(), Gone> {
        let Some(w) = self.watchers.get_mut(&id) else { return Ok(()) };
        w.quiet = false;
        let (prev_kv, fragment) = (w.prev_kv, w.fragment);
        if prev_kv {
            let store = self.ctx.store.clone();
            for ev in &mut events {
                let Some(kv) = &ev.kv else { continue };
                let created = ev.r#type == EventType::Put as i32 && kv.create_revision == kv.mod_revision;
                if !created {
                    ev.prev_kv = store.get_at(&kv.key, kv.mod_revision - 1);
                }
            }
        }
        let resp = WatchResponse { header: self.header(revision), watch_id: id, events, ..Default::default() };
        if !fragment || resp.encoded_len() < self.max_response_bytes || resp.events.len() < 2 {
            return self.send(resp).await;
        }
        let mut rest = resp.events.into_iter().peekable();
        while rest.peek().is_some() {
            let mut part = WatchResponse {
                header: resp.header,
                watch_id: id,
                fragment: true,
                events: Vec::new(),
                ..Default::default()
            };
            let mut size = part.encoded_len();
            while let Some(ev) = rest.peek() {
                let len = ev.encoded_len() + 8;
                if !part.events.is_empty() && size + len >= self.max_response_bytes {
                    break;
                }
                size += len;
                part.events.extend(rest.next());
            }
            part.fragment = rest.peek().is_some();
            self.send(part).await?;
        }
        Ok(())
    }

    /// WatchProgressRequest: once every watcher is synced, the current revision, for all.
    /// As etcd's, a watcher from a revision still to come is synced.
    async fn progress_all(&mut self) -> Result<(), Gone> {
        let current = self.ctx.store.revision();
        if self.watchers.is_empty() || self.watchers.values().any(|w| !w.synced) {
            return Ok(());
        }
        self.send(WatchResponse { header: self.header(current), watch_id: -1, ..Default::default() }).await
    }

    /// progress_notify: a watcher that got no events since the last tick hears the
    /// current revision, if it is synced.
    async fn on_progress_tick(&mut self) -> Result<(), Gone> {
        let current = self.ctx.store.revision();
        let mut due = Vec::new();
        for (id, w) in self.watchers.iter_mut().filter(|(_, w)| w.progress_notify) {
            if w.quiet && w.synced && w.next <= current + 1 {
                due.push(*id);
            }
            w.quiet = true;
        }
        for id in due {
            self.send(WatchResponse { header: self.header(current), watch_id: id, ..Default::default() }).await?;
        }
        Ok(())
    }
}

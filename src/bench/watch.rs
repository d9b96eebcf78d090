//! `meshkv bench watch`: W watchers over S streams on K keys, P puts at a set rate, and a
//! checker: every watcher must get every put on its key exactly once, in revision order.
//! Some streams can be left stalled (never read) to show that they slow nobody.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::conn::Conn;
use super::{BenchConfig, Record};
use crate::pb::etcdserverpb::{watch_request, PutRequest, WatchCreateRequest, WatchRequest};

#[derive(Clone, Debug)]
pub struct WatchBenchConfig {
    pub watchers: usize,
    pub streams: usize,
    pub keys: usize,
    pub puts: usize,
    /// Puts per second (open loop); none: `put_clients` put as fast as they can.
    pub rate: Option<f64>,
    pub put_clients: usize,
    /// Streams whose watchers see every key and which are never read.
    pub stalled: usize,
}

#[derive(Debug)]
pub struct WatchReport {
    pub events: u64,
    pub seconds: f64,
    pub put_seconds: f64,
    pub latency: Histogram<u64>,
    /// Events out of order or repeated.
    pub disorder: u64,
    /// Watchers that got fewer (or more) events than there were puts on their key.
    pub wrong_counts: u64,
    pub put_errors: u64,
    pub put_count: u64,
}

impl WatchReport {
    /// Throughput is events delivered per second; latency is put sent to event received.
    pub fn record(&self, cfg: &BenchConfig) -> Record {
        let mut r = Record::new(cfg, "watch", self.events, Duration::from_secs_f64(self.seconds), &self.latency);
        r.errors = self.put_errors + self.disorder + self.wrong_counts;
        r.extra.insert("puts".into(), self.put_count as f64);
        r.extra.insert("puts_per_sec".into(), self.put_count as f64 / self.put_seconds.max(1e-9));
        r.extra.insert("put_errors".into(), self.put_errors as f64);
        r.extra.insert("disorder".into(), self.disorder as f64);
        r.extra.insert("wrong_counts".into(), self.wrong_counts as f64);
        r
    }
}

/// Per watcher of one stream: the last revision it got and how many events.
type Seen = Arc<Mutex<Vec<(i64, u64)>>>;

fn key(k: usize) -> Bytes {
    Bytes::from(format!("watch-bench/{k:06}"))
}

/// Opens a stream with the given watchers (key index per watcher); returns the requests'
/// sender (kept open) and the responses.
async fn open(
    ch: Conn,
    keys: &[Option<usize>],
) -> Result<(mpsc::Sender<WatchRequest>, tonic::Streaming<crate::pb::etcdserverpb::WatchResponse>), tonic::Status> {
    // Every create request is queued before the call: a server may send no response
    // headers (etcd does not) until it has something to say.
    let (tx, rx) = mpsc::channel(keys.len().max(1));
    for (i, k) in keys.iter().enumerate() {
        let (key, range_end) = match k {
            Some(k) => (key(*k), Bytes::new()),
            None => (Bytes::from_static(b"watch-bench/"), Bytes::from_static(b"watch-bench0")),
        };
        let create = WatchCreateRequest { key, range_end, watch_id: i as i64 + 1, ..Default::default() };
        let _ = tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await;
    }
    let mut resp = ch.watch().watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut created = 0;
    while created < keys.len() {
        match resp.message().await? {
            Some(r) if r.created => created += 1,
            Some(_) => {}
            None => return Err(tonic::Status::unavailable("watch stream ended")),
        }
    }
    Ok((tx, resp))
}

pub async fn run(chans: Vec<Conn>, cfg: WatchBenchConfig) -> Result<WatchReport, tonic::Status> {
    let keys = cfg.keys.max(1);
    let streams = cfg.streams.max(1);
    let per_stream = cfg.watchers.div_ceil(streams);
    // Puts on each key, and when each put (by its value) was sent.
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; cfg.puts]));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let events = Arc::new(AtomicU64::new(0));
    // When the newest event arrived: the run ends with the last event, not when the
    // waiting loop below next looks.
    let last_event = Arc::new(Mutex::new(None::<Instant>));
    let disorder = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    // Per stream: the key of each watcher, and what it saw.
    let mut seen: Vec<Seen> = Vec::new();
    let mut watcher_keys: Vec<Vec<usize>> = Vec::new();
    let mut held = Vec::new();
    let mut w = 0usize;
    for s in 0..streams {
        let n = per_stream.min(cfg.watchers.saturating_sub(w));
        if n == 0 {
            break;
        }
        let ks: Vec<usize> = (w..w + n).map(|i| i % keys).collect();
        w += n;
        let (tx, mut resp) =
            open(chans[s % chans.len()].clone(), &ks.iter().map(|k| Some(*k)).collect::<Vec<_>>()).await?;
        held.push(tx);
        let state = Arc::new(Mutex::new(vec![(0i64, 0u64); n]));
        seen.push(state.clone());
        watcher_keys.push(ks);
        let (sent, latency, events, disorder, last_event) =
            (sent.clone(), latency.clone(), events.clone(), disorder.clone(), last_event.clone());
        readers.push(tokio::spawn(async move {
            while let Ok(Some(r)) = resp.message().await {
                let now = Instant::now();
                if !r.events.is_empty() {
                    let mut last = last_event.lock().unwrap_or_else(|e| e.into_inner());
                    *last = (*last).max(Some(now));
                }
                let i = (r.watch_id - 1) as usize;
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                let Some((last, count)) = st.get_mut(i) else { continue };
                for ev in &r.events {
                    let Some(kv) = &ev.kv else { continue };
                    if kv.mod_revision <= *last {
                        disorder.fetch_add(1, Ordering::Relaxed);
                    }
                    *last = kv.mod_revision;
                    *count += 1;
                    events.fetch_add(1, Ordering::Relaxed);
                    let seq: usize =
                        std::str::from_utf8(&kv.value).ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
                    if let Some(Some(t)) = sent.lock().unwrap_or_else(|e| e.into_inner()).get(seq) {
                        let _ = latency
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(now.duration_since(*t).as_micros() as u64);
                    }
                }
            }
        }));
    }
    // Stalled streams: watching every key, never read.
    for s in 0..cfg.stalled {
        let (tx, resp) = open(chans[s % chans.len()].clone(), &[None]).await?;
        held.push(tx);
        std::mem::forget(resp);
    }

    // The puts: open loop at the rate asked, or as fast as `put_clients` clients go.
    let start = Instant::now();
    let mut per_key = vec![0u64; keys];
    for seq in 0..cfg.puts {
        per_key[seq % keys] += 1;
    }
    let put_errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut puts = Vec::new();
    for c in 0..cfg.put_clients.max(1) {
        let mut kv = chans[c % chans.len()].kv();
        let (errors, next, sent) = (put_errors.clone(), next.clone(), sent.clone());
        let (total, rate) = (cfg.puts, cfg.rate);
        puts.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(seq as f64 / rate.max(1e-3));
                    tokio::time::sleep_until(due.into()).await;
                }
                sent.lock().unwrap_or_else(|e| e.into_inner())[seq] = Some(Instant::now());
                let req =
                    PutRequest { key: key(seq % keys), value: Bytes::from(seq.to_string()), ..Default::default() };
                if kv.put(req).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for p in puts {
        let _ = p.await;
    }
    let put_seconds = start.elapsed().as_secs_f64();
    // Wait until every watcher has everything (or a deadline).
    let expected: u64 = watcher_keys.iter().flatten().map(|k| per_key[*k]).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    while events.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = events.load(Ordering::Relaxed) >= expected;
    let last = *last_event.lock().unwrap_or_else(|e| e.into_inner());
    let seconds = match last {
        Some(t) if done => t.duration_since(start),
        _ => start.elapsed(),
    }
    .as_secs_f64();
    let mut wrong_counts = 0;
    for (state, ks) in seen.iter().zip(&watcher_keys) {
        let st = state.lock().unwrap_or_else(|e| e.into_inner());
        wrong_counts += st.iter().zip(ks).filter(|((_, count), k)| *count != per_key[**k]).count() as u64;
    }
    for r in readers {
        r.abort();
    }
    drop(held);
    let latency = latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(WatchReport {
        events: events.load(Ordering::Relaxed),
        seconds,
        put_seconds,
        latency,
        disorder: disorder.load(Ordering::Relaxed),
        wrong_counts,
        put_errors: put_errors.load(Ordering::Relaxed),
        put_count: cfg.puts as u64,
    })
}

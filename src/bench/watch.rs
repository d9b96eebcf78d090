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

/// What one stream's reader saw, kept by the reader alone (locked once per response,
/// never by another reader): per watcher the last revision it got and how many events,
/// the put-to-event latencies, when the newest event arrived.
struct Seen {
    watchers: Vec<(i64, u64)>,
    latency: Histogram<u64>,
    last_event: Option<Instant>,
}

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
    // When each put (by its value) was sent, in nanoseconds after `start` (0: not yet).
    let start = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..cfg.puts).map(|_| AtomicU64::new(0)).collect());
    let events = Arc::new(AtomicU64::new(0));
    let disorder = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    // Per stream: the key of each watcher, and what its reader saw.
    let mut seen: Vec<Arc<Mutex<Seen>>> = Vec::new();
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
        let state = Arc::new(Mutex::new(Seen {
            watchers: vec![(0i64, 0u64); n],
            latency: Histogram::<u64>::new(3).expect("histogram"),
            last_event: None,
        }));
        seen.push(state.clone());
        watcher_keys.push(ks);
        let (sent, events, disorder) = (sent.clone(), events.clone(), disorder.clone());
        readers.push(tokio::spawn(async move {
            while let Ok(Some(r)) = resp.message().await {
                let now = Instant::now();
                let since_start = now.duration_since(start).as_nanos() as u64;
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                let st = &mut *st;
                if !r.events.is_empty() {
                    st.last_event = Some(now);
                }
                let i = (r.watch_id - 1) as usize;
                let Some((last, count)) = st.watchers.get_mut(i) else { continue };
                let (mut got, mut out_of_order) = (0, 0);
                for ev in &r.events {
                    let Some(kv) = &ev.kv else { continue };
                    if kv.mod_revision <= *last {
                        out_of_order += 1;
                    }
                    *last = kv.mod_revision;
                    got += 1;
                    let seq: usize =
                        std::str::from_utf8(&kv.value).ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
                    match sent.get(seq).map(|t| t.load(Ordering::Relaxed)) {
                        Some(at) if at > 0 => {
                            let _ = st.latency.record(since_start.saturating_sub(at) / 1000);
                        }
                        _ => {}
                    }
                }
                *count += got;
                if out_of_order > 0 {
                    disorder.fetch_add(out_of_order, Ordering::Relaxed);
                }
                // Last: the waiting loop below reads the state once this says all came.
                events.fetch_add(got, Ordering::Relaxed);
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
                sent[seq].store((start.elapsed().as_nanos() as u64).max(1), Ordering::Relaxed);
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
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let (mut last, mut wrong_counts) = (None::<Instant>, 0);
    for (state, ks) in seen.iter().zip(&watcher_keys) {
        let st = state.lock().unwrap_or_else(|e| e.into_inner());
        wrong_counts += st.watchers.iter().zip(ks).filter(|((_, count), k)| *count != per_key[**k]).count() as u64;
        let _ = latency.add(&st.latency);
        last = last.max(st.last_event);
    }
    let seconds = match last {
        Some(t) if done => t.duration_since(start),
        _ => start.elapsed(),
    }
    .as_secs_f64();
    for r in readers {
        r.abort();
    }
    drop(held);
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

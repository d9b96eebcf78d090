//! `meshkv bench watch`: W watchers over S streams on K keys, P puts at a set rate, and a
//! checker: every watcher must get every put on its key exactly once, in revision order.
//! Some streams can be left stalled (never read) to show that they slow nobody.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hdrhistogram::Histogram;
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;

use super::conn::{Conn, Shards};
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
    /// From the first put to the last event.
    pub seconds: f64,
    /// Making the watchers, before the first put.
    pub open_seconds: f64,
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
        r.extra.insert("open_seconds".into(), self.open_seconds);
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

/// What the checker needs of a WatchResponse, read straight off the wire: the message
/// itself (header, keys, values) is never built, so the load generator's share of the
/// machine it shares with the server stays small.
#[derive(Debug, Default, PartialEq)]
struct Skim {
    watch_id: i64,
    created: bool,
    /// Per event: its mod_revision and the put's sequence number (its value).
    events: Vec<(i64, Option<usize>)>,
}

/// Reads one length-delimited field's bytes.
fn take<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::try_from(decode_varint(b).ok()?).ok()?;
    if n > b.len() {
        return None;
    }
    let (field, rest) = b.split_at(n);
    *b = rest;
    Some(field)
}

/// Skips a field the checker has no use for.
fn skip(b: &mut &[u8], tag: u32, wire: WireType) -> Option<()> {
    skip_field(wire, tag, b, DecodeContext::default()).ok()
}

impl Skim {
    fn read(mut b: &[u8]) -> Option<Skim> {
        let mut s = Skim::default();
        while !b.is_empty() {
            match decode_key(&mut b).ok()? {
                (2, WireType::Varint) => s.watch_id = decode_varint(&mut b).ok()? as i64,
                (3, WireType::Varint) => s.created = decode_varint(&mut b).ok()? != 0,
                (11, WireType::LengthDelimited) => s.events.push(Self::event(take(&mut b)?)?),
                (tag, wire) => skip(&mut b, tag, wire)?,
            }
        }
        Some(s)
    }

    /// An Event's kv (field 2): its mod_revision (3) and value (5).
    fn event(mut b: &[u8]) -> Option<(i64, Option<usize>)> {
        let (mut rev, mut seq) = (0, None);
        while !b.is_empty() {
            match decode_key(&mut b).ok()? {
                (2, WireType::LengthDelimited) => {
                    let mut kv = take(&mut b)?;
                    while !kv.is_empty() {
                        match decode_key(&mut kv).ok()? {
                            (3, WireType::Varint) => rev = decode_varint(&mut kv).ok()? as i64,
                            (5, WireType::LengthDelimited) => {
                                seq = std::str::from_utf8(take(&mut kv)?).ok().and_then(|v| v.parse().ok())
                            }
                            (tag, wire) => skip(&mut kv, tag, wire)?,
                        }
                    }
                }
                (tag, wire) => skip(&mut b, tag, wire)?,
            }
        }
        Some((rev, seq))
    }
}

/// Writes WatchRequests as prost does; reads responses as [`Skim`]s.
struct SkimCodec;

struct SkimDecoder;

impl Decoder for SkimDecoder {
    type Item = Skim;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Skim>, Status> {
        // The message is contiguous in tonic's buffer.
        let n = src.remaining();
        let skim = Skim::read(&src.chunk()[..n.min(src.chunk().len())]);
        src.advance(n);
        skim.map(Some).ok_or_else(|| Status::internal("malformed WatchResponse"))
    }
}

impl Codec for SkimCodec {
    type Encode = WatchRequest;
    type Decode = Skim;
    type Encoder = tonic_prost::ProstEncoder<WatchRequest>;
    type Decoder = SkimDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SkimDecoder
    }
}

fn key(k: usize) -> Bytes {
    Bytes::from(format!("watch-bench/{k:06}"))
}

/// Opens a stream with the given watchers (key index per watcher); returns the requests'
/// sender (kept open) and the responses.
async fn open(
    ch: Conn,
    keys: &[Option<usize>],
) -> Result<(mpsc::Sender<WatchRequest>, tonic::Streaming<Skim>), Status> {
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
    let mut grpc = ch.grpc();
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let mut resp = grpc.streaming(tonic::Request::new(ReceiverStream::new(rx)), path, SkimCodec).await?.into_inner();
    let mut created = 0;
    while created < keys.len() {
        match resp.message().await? {
            Some(r) if r.created => created += 1,
            Some(_) => {}
            None => return Err(Status::unavailable("watch stream ended")),
        }
    }
    Ok((tx, resp))
}

/// Runs the watch workload over `chans`, made by `shards`: each stream's reader and each
/// putting client run beside their connection.
pub async fn run(shards: &Shards, chans: Vec<Conn>, cfg: WatchBenchConfig) -> Result<WatchReport, Status> {
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
        readers.push(shards.of_conn(s % chans.len()).spawn(async move {
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
                for (rev, seq) in &r.events {
                    if *rev <= *last {
                        out_of_order += 1;
                    }
                    *last = *rev;
                    got += 1;
                    match seq.and_then(|seq| sent.get(seq)).map(|t| t.load(Ordering::Relaxed)) {
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

    // Events per second count from the first put, with every watcher in place: the
    // watchers' making is timed on its own.
    let open_seconds = start.elapsed().as_secs_f64();
    let puts_began = Instant::now();
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
        puts.push(shards.of_conn(c % chans.len()).spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                if let Some(rate) = rate {
                    let due = puts_began + Duration::from_secs_f64(seq as f64 / rate.max(1e-3));
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
    let put_seconds = puts_began.elapsed().as_secs_f64();
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
        Some(t) if done => t.duration_since(puts_began),
        _ => puts_began.elapsed(),
    }
    .as_secs_f64();
    for r in readers {
        r.abort();
    }
    drop(held);
    Ok(WatchReport {
        events: events.load(Ordering::Relaxed),
        seconds,
        open_seconds,
        put_seconds,
        latency,
        disorder: disorder.load(Ordering::Relaxed),
        wrong_counts,
        put_errors: put_errors.load(Ordering::Relaxed),
        put_count: cfg.puts as u64,
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::Skim;
    use crate::pb::etcdserverpb::{ResponseHeader, WatchResponse};
    use crate::pb::mvccpb::KeyValue;
    use crate::store::watch::{delete_event, put_event};

    #[test]
    fn skim_reads_what_the_checker_needs_and_rejects_garbage() {
        let put = |rev: i64, value: &'static [u8]| {
            put_event(KeyValue {
                key: "watch-bench/000001".into(),
                value: bytes::Bytes::from_static(value),
                create_revision: 2,
                mod_revision: rev,
                version: 1,
                lease: 7,
            })
        };
        let mut with_prev = put(9, b"41");
        with_prev.prev_kv = Some(KeyValue { mod_revision: 8, value: "40".into(), ..Default::default() });
        let r = WatchResponse {
            header: Some(ResponseHeader { cluster_id: 1, member_id: 2, revision: 12, raft_term: 3 }),
            watch_id: 5,
            created: true,
            cancel_reason: "none".into(),
            events: vec![put(7, b"17"), with_prev, delete_event("k".into(), 10), put(11, b"not a number")],
            ..Default::default()
        };
        let s = Skim::read(&r.encode_to_vec()).expect("reads");
        let want =
            Skim { watch_id: 5, created: true, events: vec![(7, Some(17)), (9, Some(41)), (10, None), (11, None)] };
        assert_eq!(s, want);
        let bytes = r.encode_to_vec();
        assert_eq!(Skim::read(&bytes[..bytes.len() - 3]), None, "a cut message is refused");
    }
}

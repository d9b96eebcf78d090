//! `meshkv bench`: an etcd v3 load generator that works against any endpoints (meshkv or
//! etcd), in the manner of etcd's tools/benchmark. Latencies go into HDR histograms;
//! errors are counted and reported, never hidden.
//!
//! Load is closed loop (each client keeps one request in flight) unless a rate is given:
//! then request `n` is due at `start + n / rate`, and its latency counts from when it was
//! due, so a server that falls behind is charged for the queue it causes.

pub mod conn;
pub mod fsync;
pub mod mesh;
pub mod record;
pub mod watch;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::Status;

use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::lease_client::LeaseClient;
use crate::pb::etcdserverpb::{
    compare, request_op, Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use conn::{Conn, ConnError, Shards};
pub use record::Record;

/// What to run and how hard.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub endpoints: Vec<String>,
    /// gRPC connections, shared round-robin by the clients.
    pub conns: usize,
    /// Concurrent clients, each with one request in flight.
    pub clients: usize,
    /// Requests in all, unless `duration` is set.
    pub total: usize,
    /// Run for this long instead of a number of requests.
    pub duration: Option<Duration>,
    /// Requests per second over all clients (open loop); none: as fast as they go.
    pub rate: Option<f64>,
    pub key_size: usize,
    pub val_size: usize,
    /// Distinct keys written; 0 means `total` (for reads and txn-mixed: 1,000).
    pub key_space: usize,
    pub sequential_keys: bool,
    /// `name:password` to sign in as, when the endpoints have authentication on.
    pub user: Option<String>,
    /// The system under test (say "meshkv" or "etcd"), carried into the record.
    pub label: String,
    /// What this run measures, for grouping rounds (default: the workload's name).
    pub case: String,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            conns: 1,
            clients: 1,
            total: 1000,
            duration: None,
            rate: None,
            key_size: 8,
            val_size: 256,
            key_space: 0,
            sequential_keys: false,
            user: None,
            label: String::new(),
            case: String::new(),
        }
    }
}

/// The request-response workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Put,
    RangeLinearizable,
    RangeSerializable,
    /// Kubernetes' update: read a key, then write it in a Txn comparing its mod revision;
    /// a failed comparison is a conflict (counted, not an error).
    TxnMixed,
    /// One lease's life: grant, one keep-alive on the client's stream, revoke.
    Lease,
}

impl Workload {
    pub fn parse(s: &str) -> Option<Workload> {
        Some(match s {
            "put" => Workload::Put,
            "range" => Workload::RangeLinearizable,
            "range-serializable" => Workload::RangeSerializable,
            "txn-mixed" => Workload::TxnMixed,
            "lease" => Workload::Lease,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::RangeLinearizable => "range",
            Workload::RangeSerializable => "range-serializable",
            Workload::TxnMixed => "txn-mixed",
            Workload::Lease => "lease",
        }
    }
}

/// Microseconds, from 1 µs to a minute, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn key_space(cfg: &BenchConfig, workload: Workload) -> usize {
    match (cfg.key_space, workload) {
        (0, Workload::Put) => cfg.total.max(1),
        (0, _) => 1000,
        (n, _) => n,
    }
}

fn key_for(cfg: &BenchConfig, space: usize, n: usize) -> Bytes {
    let k = if cfg.sequential_keys { n % space } else { (n.wrapping_mul(2_654_435_761)) % space };
    // Zero-padded to the key size; a key space too large for it makes longer keys.
    Bytes::from(format!("{k:0width$}", width = cfg.key_size.max(1)))
}

/// One client: its stubs and, for the lease workload, its keep-alive stream.
struct Client {
    kv: KvClient<Conn>,
    lease: LeaseClient<Conn>,
    keepalive: Option<(mpsc::Sender<LeaseKeepAliveRequest>, tonic::Streaming<LeaseKeepAliveResponse>)>,
}

/// What one request came to, when the server answered.
enum Outcome {
    Done,
    Conflict,
}

impl Client {
    fn new(conn: &Conn) -> Client {
        Client { kv: conn.kv().max_decoding_message_size(usize::MAX), lease: conn.lease(), keepalive: None }
    }

    async fn op(&mut self, workload: Workload, key: Bytes, value: &Bytes) -> Result<Outcome, Status> {
        match workload {
            Workload::Put => {
                self.kv.put(PutRequest { key, value: value.clone(), ..Default::default() }).await?;
            }
            Workload::RangeLinearizable | Workload::RangeSerializable => {
                let serializable = workload == Workload::RangeSerializable;
                self.kv.range(RangeRequest { key, serializable, ..Default::default() }).await?;
            }
            Workload::TxnMixed => {
                let got = self.kv.range(RangeRequest { key: key.clone(), ..Default::default() }).await?.into_inner();
                let rev = got.kvs.first().map_or(0, |kv| kv.mod_revision);
                let txn = TxnRequest {
                    compare: vec![Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Mod as i32,
                        key: key.clone(),
                        target_union: Some(compare::TargetUnion::ModRevision(rev)),
                        range_end: Bytes::new(),
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest { key, ..Default::default() })),
                    }],
                };
                if !self.kv.txn(txn).await?.into_inner().succeeded {
                    return Ok(Outcome::Conflict);
                }
            }
            Workload::Lease => {
                let id = self.lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
                let req = LeaseKeepAliveRequest { id };
                let closed = |_| Status::unavailable("keep-alive stream closed");
                match &self.keepalive {
                    Some((tx, _)) => tx.send(req).await.map_err(closed)?,
                    None => {
                        // The first request goes in before the call: a server may send no
                        // response headers (etcd does not) until it answers one.
                        let (tx, rx) = mpsc::channel(1);
                        tx.send(req).await.map_err(closed)?;
                        let resp = self.lease.lease_keep_alive(ReceiverStream::new(rx)).await?.into_inner();
                        self.keepalive = Some((tx, resp));
                    }
                }
                let resp = &mut self.keepalive.as_mut().expect("opened above").1;
                match resp.message().await {
                    Ok(Some(r)) if r.ttl > 0 => {}
                    Ok(Some(_)) => return Err(Status::not_found("etcdserver: requested lease not found")),
                    Ok(None) => {
                        self.keepalive = None;
                        return Err(Status::unavailable("keep-alive stream ended"));
                    }
                    Err(e) => {
                        self.keepalive = None;
                        return Err(e);
                    }
                }
                self.lease.lease_revoke(LeaseRevokeRequest { id }).await?;
            }
        }
        Ok(Outcome::Done)
    }
}

/// Per client: latencies, counts and the first error.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    errors: u64,
    conflicts: u64,
    first_error: Option<String>,
}

/// Runs one workload to completion; `progress` hears how many requests are done.
pub async fn run(
    cfg: &BenchConfig,
    workload: Workload,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Record, ConnError> {
    let shards = Shards::new(cfg.conns)?;
    let chans = shards.connect(&cfg.endpoints, cfg.conns, cfg.user.as_deref()).await?;
    let space = key_space(cfg, workload);
    let value = Bytes::from(vec![b'v'; cfg.val_size]);
    if matches!(workload, Workload::RangeLinearizable | Workload::RangeSerializable | Workload::TxnMixed) {
        // Reads need something to read: one pass of puts over the key space.
        let load = BenchConfig {
            total: space,
            duration: None,
            rate: None,
            sequential_keys: true,
            key_space: space,
            clients: cfg.clients.clamp(1, 100),
            ..cfg.clone()
        };
        let (tallies, _) = drive(&load, Workload::Put, &shards, &chans, &value, Arc::new(|_| {})).await;
        if let Some(e) = tallies.iter().find_map(|t| t.first_error.clone()) {
            tracing::warn!(error = %e, "loading the keys to read failed");
        }
    }
    let (tallies, elapsed) = drive(cfg, workload, &shards, &chans, &value, Arc::new(progress)).await;
    let mut latency = histogram();
    let (mut ok, mut errors, mut conflicts, mut first_error) = (0, 0, 0, None);
    for t in tallies {
        let _ = latency.add(&t.latency);
        ok += t.ok;
        errors += t.errors;
        conflicts += t.conflicts;
        first_error = first_error.or(t.first_error);
    }
    let mut rec = Record::new(cfg, workload.name(), ok, elapsed, &latency);
    rec.errors = errors;
    rec.conflicts = conflicts;
    rec.first_error = first_error;
    Ok(rec)
}

async fn drive(
    cfg: &BenchConfig,
    workload: Workload,
    shards: &Shards,
    chans: &[Conn],
    value: &Bytes,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> (Vec<Tally>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let space = key_space(cfg, workload);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.clients);
    for i in 0..cfg.clients.max(1) {
        // A client runs beside its connection.
        let mut client = Client::new(&chans[i % chans.len()]);
        let cfg = cfg.clone();
        let (next, done, progress, value) = (next.clone(), done.clone(), progress.clone(), value.clone());
        tasks.push(shards.of_conn(i % chans.len()).spawn(async move {
            let mut t = Tally { latency: histogram(), ok: 0, errors: 0, conflicts: 0, first_error: None };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let sent = match cfg.rate {
                    Some(rate) => start + Duration::from_secs_f64(n as f64 / rate.max(1e-3)),
                    None => Instant::now(),
                };
                let over = match cfg.duration {
                    Some(d) => sent.duration_since(start) >= d,
                    None => n >= cfg.total,
                };
                if over {
                    break;
                }
                if cfg.rate.is_some() {
                    tokio::time::sleep_until(sent.into()).await;
                }
                match client.op(workload, key_for(&cfg, space, n), &value).await {
                    Ok(outcome) => {
                        t.ok += 1;
                        if let Outcome::Conflict = outcome {
                            t.conflicts += 1;
                        }
                        let _ = t.latency.record((sent.elapsed().as_micros() as u64).max(1));
                    }
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 256 == 0 {
                    progress(d);
                }
            }
            t
        }));
    }
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(t) => tallies.push(t),
            Err(e) => tallies.push(Tally {
                latency: histogram(),
                ok: 0,
                errors: 1,
                conflicts: 0,
                first_error: Some(format!("client task failed: {e}")),
            }),
        }
    }
    (tallies, start.elapsed())
}

/// Waits until the first endpoint answers a linearizable read (a member is up and has a
/// leader); returns the milliseconds that took, or an error after `timeout`.
pub async fn ready(cfg: &BenchConfig, timeout: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let ep = cfg.endpoints.first().ok_or_else(|| anyhow::anyhow!("no endpoint"))?;
    let url = if ep.contains("://") { ep.clone() } else { format!("http://{ep}") };
    let endpoint =
        Endpoint::from_shared(url)?.connect_timeout(Duration::from_millis(200)).timeout(Duration::from_secs(2));
    loop {
        if let Ok(ch) = endpoint.connect().await {
            let req = RangeRequest { key: Bytes::from_static(b"meshkv-bench-ready"), ..Default::default() };
            if KvClient::new(ch).range(req).await.is_ok() {
                return Ok(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if start.elapsed() > timeout {
            anyhow::bail!("{ep} did not answer a read within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

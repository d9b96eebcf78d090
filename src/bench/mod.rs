//! `meshkv bench`: an etcd v3 load generator that works against any endpoints (meshkv or
//! etcd), in the manner of etcd's tools/benchmark. Latencies go into HDR histograms;
//! errors are counted and reported, never hidden.

pub mod mesh;
pub mod watch;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::{PutRequest, RangeRequest};

/// What to run and how hard.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub endpoints: Vec<String>,
    /// gRPC connections, shared round-robin by the clients.
    pub conns: usize,
    /// Concurrent clients, each with one request in flight.
    pub clients: usize,
    pub total: usize,
    pub key_size: usize,
    pub val_size: usize,
    /// Distinct keys written; 0 means `total`.
    pub key_space: usize,
    pub sequential_keys: bool,
}

/// The workloads this build knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Put,
    RangeLinearizable,
    RangeSerializable,
}

/// The outcome of one run.
#[derive(Debug)]
pub struct Report {
    pub workload: Workload,
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    pub first_error: Option<String>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// One JSON object on one line.
    pub fn json_line(&self) -> String {
        format!(
            "{{\"workload\":\"{:?}\",\"ok\":{},\"errors\":{},\"seconds\":{:.3},\"ops_per_sec\":{:.1},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
            self.workload,
            self.ok,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0
        )
    }

    /// A markdown table row, after [`Report::table_header`].
    pub fn table_row(&self) -> String {
        format!(
            "| {:?} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            self.workload,
            self.ok,
            self.errors,
            self.throughput(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0
        )
    }

    pub fn table_header() -> &'static str {
        "| workload | ok | errors | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    }
}

fn key_for(cfg: &BenchConfig, n: usize) -> Bytes {
    let space = if cfg.key_space == 0 { cfg.total.max(1) } else { cfg.key_space };
    let k = if cfg.sequential_keys { n % space } else { (n.wrapping_mul(2_654_435_761)) % space };
    // Zero-padded to the key size; a key space too large for it makes longer keys.
    Bytes::from(format!("{k:0width$}", width = cfg.key_size.max(1)))
}

/// Connects `cfg.conns` channels spread over the endpoints.
pub async fn connect(cfg: &BenchConfig) -> Result<Vec<Channel>, tonic::transport::Error> {
    let mut chans = Vec::with_capacity(cfg.conns.max(1));
    for i in 0..cfg.conns.max(1) {
        let ep = &cfg.endpoints[i % cfg.endpoints.len()];
        let url = if ep.contains("://") { ep.clone() } else { format!("http://{ep}") };
        chans.push(Endpoint::from_shared(url)?.tcp_nodelay(true).connect().await?);
    }
    Ok(chans)
}

/// Runs one workload to completion.
pub async fn run(
    cfg: &BenchConfig,
    workload: Workload,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Report, tonic::transport::Error> {
    let chans = connect(cfg).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(progress);
    let value = Bytes::from(vec![b'v'; cfg.val_size]);
    if workload != Workload::Put {
        // Reads need something to read: one pass of puts over the key space.
        let mut c = KvClient::new(chans[0].clone());
        let space = if cfg.key_space == 0 { 1000 } else { cfg.key_space };
        for n in 0..space {
            let _ = c
                .put(PutRequest {
                    key: key_for(&BenchConfig { key_space: space, ..cfg.clone() }, n),
                    value: value.clone(),
                    ..Default::default()
                })
                .await;
        }
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.clients);
    for i in 0..cfg.clients.max(1) {
        let mut client = KvClient::new(chans[i % chans.len()].clone()).max_decoding_message_size(usize::MAX);
        let cfg = cfg.clone();
        let (next, done, progress, value) = (next.clone(), done.clone(), progress.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= cfg.total {
                    break;
                }
                let key = key_for(&cfg, n);
                let t = Instant::now();
                let res = match workload {
                    Workload::Put => {
                        client.put(PutRequest { key, value: value.clone(), ..Default::default() }).await.map(|_| ())
                    }
                    Workload::RangeLinearizable | Workload::RangeSerializable => client
                        .range(RangeRequest {
                            key,
                            serializable: workload == Workload::RangeSerializable,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                };
                match res {
                    Ok(()) => {
                        ok += 1;
                        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 1000 == 0 {
                    progress(d);
                }
            }
            (h, ok, errors, first_error)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        if let Ok((h, o, e, fe)) = t.await {
            let _ = latency.add(&h);
            ok += o;
            errors += e;
            if first_error.is_none() {
                first_error = fe;
            }
        }
    }
    Ok(Report { workload, ok, errors, elapsed: start.elapsed(), latency, first_error })
}

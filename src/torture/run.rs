//! The harness: N real `meshkv` members on loopback, concurrent clients on a small key
//! space, faults from a seeded schedule, and the checks at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

use super::check::{self, Input, Op, Output};
use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::pb::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, HashKvRequest, PutRequest, RangeRequest, RequestOp,
    StatusRequest, TxnRequest,
};

/// Faults the schedule draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9, then restart.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Pause,
    /// Cut one member off from the others at the mesh, then heal.
    Partition,
}

#[derive(Clone, Debug)]
pub struct TortureConfig {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub members: usize,
    pub clients: usize,
    pub keys: usize,
    pub duration: Duration,
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// Extra flags for every member (for example a deliberately broken read path).
    pub member_args: Vec<String>,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub ops: usize,
    pub unknown: usize,
    pub faults: usize,
    /// Faults injected, by kind.
    pub by_kind: BTreeMap<String, usize>,
    /// Keys whose history is not linearizable, with the file holding the shortest failing history.
    pub violations: Vec<(String, PathBuf)>,
    /// HashKV per member at one revision, when they disagree.
    pub hash_mismatch: Option<Vec<u32>>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.hash_mismatch.is_none()
    }
}

struct Member {
    name: String,
    client_port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl Member {
    fn start(&mut self, cfg: &TortureConfig) -> std::io::Result<()> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(cfg.dir.join(format!("{}.log", self.name)))?;
        let child = Command::new(&cfg.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

async fn channel(ep: &str) -> Option<Channel> {
    Endpoint::from_shared(ep.to_string())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

fn block_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("block-{name}"))
}

/// Runs the harness; the report says what the checks found.
pub async fn run(cfg: TortureConfig) -> std::io::Result<Report> {
    std::fs::create_dir_all(&cfg.dir)?;
    let names: Vec<String> = (0..cfg.members).map(|i| format!("m{i}")).collect();
    let peer_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let mut members: Vec<Member> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let client_port = free_port();
            let mut args: Vec<String> = vec![
                "--name".into(),
                n.clone(),
                "--data-dir".into(),
                cfg.dir.join(n).display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{client_port}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{}", peer_ports[i]),
                "--join".into(),
                format!("127.0.0.1:{}", peer_ports[(i + 1) % names.len()]),
                "--bootstrap-expect".into(),
                names.len().to_string(),
                "--mesh-block-file".into(),
                block_file(&cfg.dir, n).display().to_string(),
                "--snapshot-count".into(),
                "500".into(),
            ];
            args.extend(cfg.member_args.iter().cloned());
            Member { name: n.clone(), client_port, child: None, args }
        })
        .collect();
    for m in &mut members {
        std::fs::write(block_file(&cfg.dir, &m.name), "")?;
        m.start(&cfg)?;
    }
    let endpoints: Vec<String> = members.iter().map(Member::endpoint).collect();
    wait_for_leader(&endpoints, Duration::from_secs(60)).await;

    let start = Instant::now();
    let now_us = move || start.elapsed().as_micros() as u64;
    let deadline = start + cfg.duration;
    let history: Arc<Mutex<BTreeMap<String, Vec<Op>>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let (endpoints, history, keys) = (endpoints.clone(), history.clone(), cfg.keys);
        let seed = cfg.seed.wrapping_mul(31).wrapping_add(c as u64);
        tasks.push(tokio::spawn(async move { client_loop(c, seed, endpoints, keys, deadline, history, now_us).await }));
    }

    // The fault schedule.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut faults = 0;
    let mut by_kind = BTreeMap::new();
    let quiet_at = deadline - Duration::from_secs(3).min(cfg.duration / 4);
    while !cfg.faults.is_empty() && Instant::now() + Duration::from_secs(4) < quiet_at {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        let i = rng.random_range(0..members.len());
        let hold = Duration::from_millis(rng.random_range(1000..3000));
        let fault = cfg.faults[rng.random_range(0..cfg.faults.len())];
        faults += 1;
        *by_kind.entry(format!("{fault:?}").to_lowercase()).or_insert(0) += 1;
        tracing::info!(?fault, member = %members[i].name, ?hold, "fault");
        match fault {
            Fault::Kill => {
                members[i].kill9();
                tokio::time::sleep(hold).await;
                members[i].start(&cfg)?;
            }
            Fault::Pause => {
                members[i].signal(libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                members[i].signal(libc::SIGCONT);
            }
            Fault::Partition => {
                let others: Vec<String> =
                    members.iter().filter(|m| m.name != members[i].name).map(|m| m.name.clone()).collect();
                std::fs::write(block_file(&cfg.dir, &members[i].name), others.join("\n"))?;
                for o in &others {
                    std::fs::write(block_file(&cfg.dir, o), &members[i].name)?;
                }
                tokio::time::sleep(hold).await;
                for m in &members {
                    std::fs::write(block_file(&cfg.dir, &m.name), "")?;
                }
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }

    // Final reads of every key, then the checks.
    wait_for_leader(&endpoints, Duration::from_secs(30)).await;
    {
        let mut kv = None;
        for ep in &endpoints {
            if let Some(ch) = channel(ep).await {
                kv = Some(KvClient::new(ch));
                break;
            }
        }
        if let Some(mut kv) = kv {
            for k in 0..cfg.keys {
                let key = format!("k{k}");
                let invoke = now_us();
                if let Ok(r) = kv.range(RangeRequest { key: Bytes::from(key.clone()), ..Default::default() }).await {
                    let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    let op = Op {
                        client: usize::MAX,
                        input: Input::Read,
                        output: Some(Output::Read(v)),
                        invoke,
                        complete: Some(now_us()),
                    };
                    history.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().push(op);
                }
            }
        }
    }
    let mut report = Report { faults, by_kind, ..Default::default() };
    let history = history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (key, ops) in &history {
        report.ops += ops.len();
        report.unknown += ops.iter().filter(|o| o.output.is_none()).count();
        if !check::linearizable(ops, None) {
            let shortest = check::shrink(ops, None);
            let path = cfg.dir.join(format!("violation-{key}.txt"));
            let mut text =
                format!("seed {}\nkey {key}\nshortest failing history ({} ops):\n", cfg.seed, shortest.len());
            for o in &shortest {
                text.push_str(&format!("{o:?}\n"));
            }
            std::fs::write(&path, text)?;
            report.violations.push((key.clone(), path));
        }
    }
    report.hash_mismatch = compare_hashes(&endpoints).await;
    for m in &mut members {
        m.signal(libc::SIGCONT);
        m.kill9();
    }
    Ok(report)
}

async fn wait_for_leader(endpoints: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for ep in endpoints {
            if let Some(ch) = channel(ep).await {
                if let Ok(s) = MaintenanceClient::new(ch).status(StatusRequest {}).await {
                    if s.into_inner().leader != 0 {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// HashKV on every member at one revision, once all have applied it; None if equal.
async fn compare_hashes(endpoints: &[String]) -> Option<Vec<u32>> {
    let mut rev = 0;
    for ep in endpoints {
        if let Some(ch) = channel(ep).await {
            if let Ok(r) =
                KvClient::new(ch).range(RangeRequest { key: Bytes::from_static(b"k"), ..Default::default() }).await
            {
                rev = rev.max(r.into_inner().header.map_or(0, |h| h.revision));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut hashes = Vec::new();
    for ep in endpoints {
        loop {
            let h = match channel(ep).await {
                Some(ch) => MaintenanceClient::new(ch).hash_kv(HashKvRequest { revision: rev }).await.ok(),
                None => None,
            };
            if let Some(h) = h {
                hashes.push(h.into_inner().hash);
                break;
            }
            if Instant::now() > deadline {
                hashes.push(0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (!hashes.iter().all(|h| *h == hashes[0])).then_some(hashes)
}

async fn client_loop(
    id: usize,
    seed: u64,
    endpoints: Vec<String>,
    keys: usize,
    deadline: Instant,
    history: Arc<Mutex<BTreeMap<String, Vec<Op>>>>,
    now_us: impl Fn() -> u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut member = id % endpoints.len();
    let mut kv: Option<KvClient<Channel>> = None;
    let mut n = 0u64;
    while Instant::now() < deadline {
        if kv.is_none() {
            kv = channel(&endpoints[member]).await.map(KvClient::new);
            if kv.is_none() {
                member = (member + 1) % endpoints.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let Some(c) = kv.as_mut() else { continue };
        let key = format!("k{}", rng.random_range(0..keys));
        n += 1;
        let value = format!("c{id}-{n}");
        let roll = rng.random_range(0..100);
        let invoke = now_us();
        let (input, output, failed) = if roll < 35 {
            let r = c.range(RangeRequest { key: Bytes::from(key.clone()), ..Default::default() }).await;
            match r {
                Ok(r) => {
                    let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    (Input::Read, Some(Output::Read(v)), false)
                }
                // A failed read changed nothing: it is not part of the history.
                Err(_) => (Input::Read, None, true),
            }
        } else if roll < 75 {
            let r = c
                .put(PutRequest {
                    key: Bytes::from(key.clone()),
                    value: Bytes::from(value.clone()),
                    ..Default::default()
                })
                .await;
            (Input::Write(value), r.ok().map(|_| Output::Written), false)
        } else if roll < 95 {
            // Compare-and-set against the value this client last saw, if any.
            let expect = history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .and_then(|ops| {
                    ops.iter().rev().find_map(|o| match (&o.input, &o.output) {
                        (Input::Write(v), Some(Output::Written)) => Some(v.clone()),
                        _ => None,
                    })
                })
                .unwrap_or_default();
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: Bytes::from(key.clone()),
                    target_union: Some(compare::TargetUnion::Value(Bytes::from(expect.clone()))),
                    range_end: Bytes::new(),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: Bytes::from(key.clone()),
                        value: Bytes::from(value.clone()),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            let r = c.txn(txn).await;
            (Input::Cas { expect, new: value }, r.ok().map(|r| Output::Cas(r.into_inner().succeeded)), false)
        } else {
            let r = c.delete_range(DeleteRangeRequest { key: Bytes::from(key.clone()), ..Default::default() }).await;
            (Input::Delete, r.ok().map(|_| Output::Deleted), false)
        };
        let complete = output.as_ref().map(|_| now_us());
        if output.is_none() {
            // Try another member next time: this one may be down or cut off.
            kv = None;
            member = (member + 1) % endpoints.len();
        }
        if failed {
            continue;
        }
        let op = Op { client: id, input, output, invoke, complete };
        history.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().push(op);
    }
}

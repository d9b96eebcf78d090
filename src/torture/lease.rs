//! The lease workload: holders that grant a lease, put two keys on it in one Txn, and
//! keep it alive through whichever member they pick, at random intervals, some of them
//! longer than the TTL, so that leases run out as well as live.
//!
//! What a holder checks is the promise a lock or an election rests on: a lease never
//! ends before its TTL has run from the last keep-alive that renewed it. A keep-alive
//! sent at `t` and answered with a TTL means the leader renewed it at some time after
//! `t`, so a lease found gone (its keys missing, or a keep-alive answered with TTL 0)
//! at a time before `t + TTL` ended too soon. And the keys of a lease go together: a
//! read never finds one of the two without the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::lease_client::LeaseClient;
use crate::pb::etcdserverpb::{
    request_op, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};

/// The TTL holders ask for; members raise it to their minimum (one and a half election
/// timeouts) where that is more, and the holders go by the TTL they are granted.
const TTL: i64 = 3;
/// Longest any one call may take before its outcome counts as unknown.
pub(super) const CALL: Duration = Duration::from_secs(1);

/// What the holders did and found.
#[derive(Debug, Default)]
pub struct LeaseLog {
    pub granted: usize,
    pub renewed: usize,
    /// Leases found gone after their TTL ran out, as they may be.
    pub expired: usize,
    pub problems: Vec<String>,
}

/// The key prefix of holder `holder`'s `n`-th lease (never a client key: see
/// `run::is_client_key`).
fn prefix(holder: usize, n: u64) -> String {
    format!("lease-{holder}-{n}/")
}

/// The end of the range of every key under `prefix`.
fn prefix_end(prefix: &str) -> Bytes {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    Bytes::from(end)
}

/// Channels to the members, made once each and remade after a failure.
#[derive(Default)]
pub(super) struct Channels {
    open: HashMap<String, Channel>,
    /// Their calls may wait (the caller bounds each); otherwise each fails after
    /// `CALL`.
    patient: bool,
}

impl Channels {
    /// Channels whose calls may wait as long as their caller lets them.
    pub(super) fn patient() -> Self {
        Self { patient: true, ..Default::default() }
    }

    pub(super) async fn get(&mut self, ep: &str) -> Option<Channel> {
        if let Some(c) = self.open.get(ep) {
            return Some(c.clone());
        }
        let c = super::run::connect(ep, (!self.patient).then_some(CALL)).await?;
        self.open.insert(ep.to_string(), c.clone());
        Some(c)
    }

    pub(super) fn forget(&mut self, ep: &str) {
        self.open.remove(ep);
    }
}

/// The client URL of a member chosen at random.
pub(super) fn pick(endpoints: &RwLock<Vec<String>>, rng: &mut StdRng) -> String {
    let eps = endpoints.read().unwrap_or_else(|e| e.into_inner());
    eps[rng.random_range(0..eps.len().max(1))].clone()
}

/// Runs one call with a deadline: its answer, or None if it failed or took too long.
pub(super) async fn call<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<T> {
    tokio::time::timeout(limit, f).await.ok()?.ok().map(tonic::Response::into_inner)
}

/// Keeps a lease alive through random members, three times a TTL, until aborted.
async fn keep(lease: i64, ttl: Duration, endpoints: Arc<RwLock<Vec<String>>>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::default();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let ep = pick(&endpoints, &mut rng);
        let Some(ch) = channels.get(&ep).await else { continue };
        match keep_alive(ch, lease).await {
            Some(0) => return,
            Some(_) => {}
            None => channels.forget(&ep),
        }
    }
}

/// A lease a contender (a locker, a candidate) holds for one turn, granted through a
/// member picked at random and kept alive through random members by a helper.
pub(super) struct Session {
    /// The member that granted it, and a channel to it.
    pub ep: String,
    pub ch: Channel,
    pub lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

impl Session {
    /// A lease of `ttl` seconds (or the members' minimum), or None after a pause if the
    /// member picked did not grant one.
    pub async fn start(
        channels: &mut Channels,
        endpoints: &Arc<RwLock<Vec<String>>>,
        rng: &mut StdRng,
        ttl: i64,
    ) -> Option<Session> {
        let ep = pick(endpoints, rng);
        let granted = match channels.get(&ep).await {
            Some(ch) => call(CALL, LeaseClient::new(ch.clone()).lease_grant(LeaseGrantRequest { ttl, id: 0 }))
                .await
                .map(|g| (ch, g)),
            None => None,
        };
        let Some((ch, granted)) = granted else {
            channels.forget(&ep);
            tokio::time::sleep(Duration::from_millis(100)).await;
            return None;
        };
        let every = Duration::from_secs(granted.ttl.max(1) as u64);
        let keeper = tokio::spawn(keep(granted.id, every, endpoints.clone(), rng.random()));
        Some(Session { ep, ch, lease: granted.id, keeper })
    }

    /// Stops keeping the lease alive and revokes it through a member picked at random.
    /// What it holds goes with it; a lease that outlives a failed revoke runs out.
    pub async fn end(self, channels: &mut Channels, endpoints: &RwLock<Vec<String>>, rng: &mut StdRng) {
        self.keeper.abort();
        if let Some(ch) = channels.get(&pick(endpoints, rng)).await {
            let _ = call(CALL, LeaseClient::new(ch).lease_revoke(LeaseRevokeRequest { id: self.lease })).await;
        }
    }
}

/// One lease as its holder knows it.
struct Held {
    id: i64,
    n: u64,
    ttl: Duration,
    /// When the last call that renewed it (or granted it) was sent: it lives at least
    /// until `renewed + ttl`.
    renewed: Instant,
}

/// How a check of a held lease came out.
enum Found {
    Alive,
    Gone,
    /// The call failed: nothing is known.
    Unknown,
}

/// One holder, until `deadline`.
pub async fn holder(
    holder: usize,
    seed: u64,
    endpoints: Arc<RwLock<Vec<String>>>,
    deadline: Instant,
    log: Arc<Mutex<LeaseLog>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::default();
    let mut n = 0u64;
    let pick = |rng: &mut StdRng| pick(&endpoints, rng);
    let record = |f: &dyn Fn(&mut LeaseLog)| f(&mut log.lock().unwrap_or_else(|e| e.into_inner()));
    while Instant::now() < deadline {
        n += 1;
        let ep = pick(&mut rng);
        let Some(held) = grant_with_keys(&mut channels, &ep, holder, n).await else {
            channels.forget(&ep);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        record(&|l| l.granted += 1);
        let mut held = held;
        loop {
            // Mostly well inside the TTL, as a client keeping its lease does; now and
            // then past it, so that leases also run out, and near it.
            let ttl = held.ttl.as_secs_f64();
            let wait = if rng.random_range(0..100) < 85 {
                rng.random_range(0.05..0.4) * ttl
            } else {
                rng.random_range(0.6..1.4) * ttl
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            if Instant::now() >= deadline {
                return;
            }
            let ep = pick(&mut rng);
            let Some(ch) = channels.get(&ep).await else { continue };
            let sent = Instant::now();
            let found = if rng.random_range(0..100) < 70 {
                match keep_alive(ch, held.id).await {
                    Some(ttl) if ttl > 0 => {
                        held.renewed = sent;
                        held.ttl = Duration::from_secs(ttl as u64);
                        record(&|l| l.renewed += 1);
                        Found::Alive
                    }
                    Some(_) => Found::Gone,
                    None => Found::Unknown,
                }
            } else {
                match keys_of(ch, &prefix(holder, held.n)).await {
                    Some(2) => Found::Alive,
                    Some(0) => Found::Gone,
                    Some(k) => {
                        let p = format!("lease {:x}: a read found {k} of its 2 keys", held.id);
                        record(&|l| l.problems.push(p.clone()));
                        Found::Alive
                    }
                    None => Found::Unknown,
                }
            };
            match found {
                Found::Alive => {}
                Found::Unknown => channels.forget(&ep),
                Found::Gone => {
                    let at = Instant::now();
                    let due = held.renewed + held.ttl;
                    if at < due {
                        let p = format!(
                            "lease {:x} ended {:.3} s early: found gone {:.3} s after a call that gave it {} s (through {ep})",
                            held.id,
                            (due - at).as_secs_f64(),
                            (at - held.renewed).as_secs_f64(),
                            held.ttl.as_secs()
                        );
                        tracing::warn!("{p}");
                        record(&|l| l.problems.push(p.clone()));
                    } else {
                        record(&|l| l.expired += 1);
                    }
                    break;
                }
            }
        }
    }
}

/// Grants a lease through `ep` and puts the holder's two keys on it in one Txn. None if
/// either call failed: that lease is left to run out.
async fn grant_with_keys(channels: &mut Channels, ep: &str, holder: usize, n: u64) -> Option<Held> {
    let ch = channels.get(ep).await?;
    let sent = Instant::now();
    let grant = LeaseClient::new(ch.clone()).lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 }).await.ok()?;
    let grant = grant.into_inner();
    let p = prefix(holder, n);
    let put = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: Bytes::from(format!("{p}{k}")),
            value: Bytes::from_static(b"held"),
            lease: grant.id,
            ..Default::default()
        })),
    };
    let txn = TxnRequest { compare: vec![], success: vec![put("a"), put("b")], failure: vec![] };
    KvClient::new(ch).txn(txn).await.ok()?;
    Some(Held { id: grant.id, n, ttl: Duration::from_secs(grant.ttl.max(0) as u64), renewed: sent })
}

/// One keep-alive on a stream of its own: the TTL answered (0: the lease is gone), or
/// None if the call failed.
pub(super) async fn keep_alive(ch: Channel, id: i64) -> Option<i64> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id }).await.ok()?;
    let call = async {
        let mut stream =
            LeaseClient::new(ch).lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.ok()?;
        stream.get_mut().message().await.ok().flatten().map(|r| r.ttl)
    };
    let ttl = tokio::time::timeout(CALL, call).await.ok().flatten();
    drop(tx);
    ttl
}

/// How many keys a linearizable read finds under `prefix`; None if the call failed.
async fn keys_of(ch: Channel, prefix: &str) -> Option<usize> {
    let req = RangeRequest {
        key: Bytes::from(prefix.to_string()),
        range_end: prefix_end(prefix),
        count_only: true,
        ..Default::default()
    };
    let r = KvClient::new(ch).range(req).await.ok()?;
    Some(r.into_inner().count as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_just_past_its_keys() {
        assert_eq!(prefix(2, 7), "lease-2-7/");
        assert_eq!(prefix_end("lease-2-7/"), Bytes::from_static(b"lease-2-70"));
        assert!(!super::super::run::is_client_key(&prefix(0, 1)));
    }
}

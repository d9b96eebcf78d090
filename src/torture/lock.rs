//! The lock workload: lockers take one lock in turns through etcd's Lock service, each
//! attempt under a lease of its own that a helper keeps alive through random members.
//! While it holds the lock, a locker reads a counter (linearizably, through any member)
//! and writes one more, in a Txn guarded by its lock key's existence: the fenced
//! read-modify-write that a lock exists to protect.
//!
//! What a locker checks: the guarded write's previous value (`prev_kv`) is the value it
//! read under the lock. Anything else means the counter changed between the read and the
//! write while this locker held the lock: two holders at once, or a read that missed a
//! write acknowledged before it. A guarded write refused (its lock key gone, because its
//! lease ran out under the faults) is what fencing is for, and is counted, not a problem.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::lease::{call, pick, Channels, Session, CALL};
use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::{
    compare, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::pb::v3lockpb::lock_client::LockClient;
use crate::pb::v3lockpb::{LockRequest, UnlockRequest};

/// The lock's name (never a client key: see `run::is_client_key`).
const NAME: &str = "lock/torture";
/// The counter its holders add to.
const COUNTER: &str = "lock-counter";
/// The TTL of a locker's lease; members raise it to their minimum where that is more.
const TTL: i64 = 3;
/// Longest a Lock call may wait for the lock.
const WAIT: Duration = Duration::from_secs(10);

/// What the lockers did and found.
#[derive(Debug, Default)]
pub struct LockLog {
    pub acquired: usize,
    /// Guarded writes that took effect, each checked against the value read.
    pub fenced_writes: usize,
    /// Guarded writes refused: the lock was gone (its lease ran out) by then.
    pub refused: usize,
    pub problems: Vec<String>,
}

/// One locker, until `deadline`.
pub async fn locker(seed: u64, endpoints: Arc<RwLock<Vec<String>>>, deadline: Instant, log: Arc<Mutex<LockLog>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::patient();
    let pick = |rng: &mut StdRng| pick(&endpoints, rng);
    let record = |f: &dyn Fn(&mut LockLog)| f(&mut log.lock().unwrap_or_else(|e| e.into_inner()));
    while Instant::now() < deadline {
        let Some(session) = Session::start(&mut channels, &endpoints, &mut rng, TTL).await else { continue };
        let lock = LockRequest { name: Bytes::from_static(NAME.as_bytes()), lease: session.lease };
        if let Some(held) = call(WAIT, LockClient::new(session.ch.clone()).lock(lock)).await {
            record(&|l| l.acquired += 1);
            let pause = Duration::from_millis(rng.random_range(0..50));
            let (read_at, write_at) = (pick(&mut rng), pick(&mut rng));
            let outcome = fenced_add(&mut channels, &held.key, &read_at, pause, &write_at).await;
            match outcome {
                Fenced::Added => record(&|l| l.fenced_writes += 1),
                Fenced::Refused => record(&|l| l.refused += 1),
                Fenced::Changed { read, was } => {
                    let p = format!(
                        "under the lock {}, a read through {read_at} found the counter at {read}, but a guarded write through {write_at} found it at {was}",
                        String::from_utf8_lossy(&held.key)
                    );
                    tracing::warn!("{p}");
                    record(&|l| l.problems.push(p.clone()));
                }
                Fenced::Unknown => {}
            }
            if let Some(ch) = channels.get(&pick(&mut rng)).await {
                let _ = call(CALL, LockClient::new(ch).unlock(UnlockRequest { key: held.key })).await;
            }
        } else {
            channels.forget(&session.ep);
        }
        session.end(&mut channels, &endpoints, &mut rng).await;
    }
}

/// How a guarded write came out.
enum Fenced {
    Added,
    /// The lock key was gone: the write did nothing.
    Refused,
    /// The write took effect, but the counter was not what the read under the lock found.
    Changed {
        read: u64,
        was: u64,
    },
    /// A call failed: nothing is known.
    Unknown,
}

/// Reads the counter through `read_at`, waits `pause`, then through `write_at` writes it
/// one more if the lock key `key` still exists.
async fn fenced_add(channels: &mut Channels, key: &Bytes, read_at: &str, pause: Duration, write_at: &str) -> Fenced {
    let value = |v: &[u8]| std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let Some(ch) = channels.get(read_at).await else { return Fenced::Unknown };
    let read = RangeRequest { key: Bytes::from_static(COUNTER.as_bytes()), ..Default::default() };
    let Some(read) = call(CALL, KvClient::new(ch).range(read)).await else {
        channels.forget(read_at);
        return Fenced::Unknown;
    };
    let read = read.kvs.first().map_or(0, |kv| value(&kv.value));
    tokio::time::sleep(pause).await;
    let Some(ch) = channels.get(write_at).await else { return Fenced::Unknown };
    let txn = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Greater as i32,
            target: compare::CompareTarget::Version as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::Version(0)),
            range_end: Bytes::new(),
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: Bytes::from_static(COUNTER.as_bytes()),
                value: Bytes::from((read + 1).to_string()),
                prev_kv: true,
                ..Default::default()
            })),
        }],
        failure: vec![],
    };
    let Some(resp) = call(CALL, KvClient::new(ch).txn(txn)).await else {
        channels.forget(write_at);
        return Fenced::Unknown;
    };
    if !resp.succeeded {
        return Fenced::Refused;
    }
    let was = resp.responses.first().and_then(|r| match &r.response {
        Some(response_op::Response::ResponsePut(p)) => Some(p.prev_kv.as_ref().map_or(0, |kv| value(&kv.value))),
        _ => None,
    });
    match was {
        Some(was) if was == read => Fenced::Added,
        Some(was) => Fenced::Changed { read, was },
        None => Fenced::Unknown,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lock_and_its_counter_are_not_client_keys() {
        assert!(!super::super::run::is_client_key(super::NAME));
        assert!(!super::super::run::is_client_key(super::COUNTER));
    }
}

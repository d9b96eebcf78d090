//! Differential test against real etcd: seeded random sequences of KV and lease calls
//! (ranges with every option, puts, deletes, transactions with nested ones, compactions,
//! lease grants and revokes, valid or not), each sent to a fresh etcd and a fresh meshkv.
//! Every answer must be the same: the header's revision and the whole body, or the
//! error's code and message. On a difference it prints the calls that led there.

mod common;

use std::fmt::Debug;

use bytes::Bytes;
use common::*;
use meshkv::pb::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, CompactionRequest, Compare,
    DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
    RequestOp, ResponseHeader, TxnRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

const KEYS: [&str; 10] = ["a", "a/1", "a/2", "a/3", "b", "c", "d", "e", "f", "z"];
const LEASES: [i64; 3] = [7, 8, 9];

#[derive(Clone, Debug)]
enum Call {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    Grant(LeaseGrantRequest),
    Revoke(LeaseRevokeRequest),
    TimeToLive(LeaseTimeToLiveRequest),
}

struct Server {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// The parts of a header that two servers share: the revision alone.
fn same_header(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        *h = ResponseHeader { revision: h.revision, ..Default::default() };
    }
}

fn shown<T: Debug>(r: Result<tonic::Response<T>, tonic::Status>, strip: impl FnOnce(&mut T)) -> String {
    match r {
        Ok(r) => {
            let mut r = r.into_inner();
            strip(&mut r);
            format!("{r:?}")
        }
        Err(s) => format!("error {:?}: {}", s.code(), s.message()),
    }
}

impl Server {
    async fn connect(endpoint: String) -> Self {
        let ch = Channel::from_shared(endpoint).unwrap().connect().await.unwrap();
        Self { kv: KvClient::new(ch.clone()), lease: LeaseClient::new(ch) }
    }

    /// The answer to `call`, as text to compare.
    async fn call(&mut self, call: &Call) -> String {
        match call.clone() {
            Call::Range(r) => shown(self.kv.range(r).await, |r| same_header(&mut r.header)),
            Call::Put(r) => shown(self.kv.put(r).await, |r| same_header(&mut r.header)),
            Call::Delete(r) => shown(self.kv.delete_range(r).await, |r| same_header(&mut r.header)),
            Call::Txn(r) => shown(self.kv.txn(r).await, |r| {
                same_header(&mut r.header);
                for op in &mut r.responses {
                    strip_op(op);
                }
            }),
            Call::Compact(r) => shown(self.kv.compact(r).await, |r| same_header(&mut r.header)),
            Call::Grant(r) => shown(self.lease.lease_grant(r).await, |r| same_header(&mut r.header)),
            Call::Revoke(r) => shown(self.lease.lease_revoke(r).await, |r| same_header(&mut r.header)),
            // What is left of a lease runs on each server's clock: only whether any is.
            Call::TimeToLive(r) => shown(self.lease.lease_time_to_live(r).await, |r| {
                same_header(&mut r.header);
                r.ttl = r.ttl.signum();
            }),
        }
    }
}

/// The headers inside a Txn's answers, nested ones too.
fn strip_op(op: &mut meshkv::pb::etcdserverpb::ResponseOp) {
    use meshkv::pb::etcdserverpb::response_op::Response;
    match &mut op.response {
        Some(Response::ResponseRange(r)) => same_header(&mut r.header),
        Some(Response::ResponsePut(r)) => same_header(&mut r.header),
        Some(Response::ResponseDeleteRange(r)) => same_header(&mut r.header),
        Some(Response::ResponseTxn(r)) => {
            same_header(&mut r.header);
            for op in &mut r.responses {
                strip_op(op);
            }
        }
        None => {}
    }
}

/// Random calls over a small key space, so that they meet each other's keys.
struct Gen {
    rng: StdRng,
    /// The newest revision an answer told of.
    revision: i64,
}

impl Gen {
    fn key(&mut self) -> Bytes {
        match self.rng.random_range(0..40) {
            0 => Bytes::new(),
            _ => Bytes::from_static(KEYS[self.rng.random_range(0..KEYS.len())].as_bytes()),
        }
    }

    /// A range end for `key`: none (the key alone), "\0" (from the key on), the prefix's
    /// end, or any key (before `key` too).
    fn range_end(&mut self, key: &[u8]) -> Bytes {
        match self.rng.random_range(0..6) {
            0 | 1 => Bytes::new(),
            2 => Bytes::from_static(&[0]),
            3 => {
                let mut end = key.to_vec();
                match end.last_mut() {
                    Some(b) => *b += 1,
                    None => end.push(0),
                }
                end.into()
            }
            _ => Bytes::from_static(KEYS[self.rng.random_range(0..KEYS.len())].as_bytes()),
        }
    }

    fn value(&mut self) -> Bytes {
        let n = self.rng.random_range(0..4);
        (0..n).map(|_| b"xyz"[self.rng.random_range(0..3)]).collect::<Vec<u8>>().into()
    }

    /// A revision near the newest: 0 (the newest), compacted ones, future ones.
    fn revision(&mut self) -> i64 {
        match self.rng.random_range(0..4) {
            0 => 0,
            _ => self.rng.random_range(-1..=self.revision + 2),
        }
    }

    fn lease(&mut self) -> i64 {
        match self.rng.random_range(0..4) {
            0 => LEASES[self.rng.random_range(0..LEASES.len())],
            1 => 12345,
            _ => 0,
        }
    }

    fn range(&mut self) -> RangeRequest {
        let key = self.key();
        let small = |g: &mut Self| if g.rng.random_bool(0.8) { 0 } else { g.revision() };
        RangeRequest {
            range_end: self.range_end(&key),
            key,
            limit: if self.rng.random_bool(0.6) { 0 } else { self.rng.random_range(-1..4) },
            revision: if self.rng.random_bool(0.6) { 0 } else { self.revision() },
            sort_order: self.rng.random_range(0..3),
            sort_target: self.rng.random_range(0..5),
            serializable: self.rng.random_bool(0.3),
            keys_only: self.rng.random_bool(0.2),
            count_only: self.rng.random_bool(0.1),
            min_mod_revision: small(self),
            max_mod_revision: small(self),
            min_create_revision: small(self),
            max_create_revision: small(self),
        }
    }

    fn put(&mut self) -> PutRequest {
        let ignore_value = self.rng.random_bool(0.1);
        let ignore_lease = self.rng.random_bool(0.1);
        PutRequest {
            key: self.key(),
            value: if ignore_value && self.rng.random_bool(0.7) { Bytes::new() } else { self.value() },
            lease: if ignore_lease && self.rng.random_bool(0.7) { 0 } else { self.lease() },
            prev_kv: self.rng.random_bool(0.3),
            ignore_value,
            ignore_lease,
        }
    }

    fn delete(&mut self) -> DeleteRangeRequest {
        let key = self.key();
        DeleteRangeRequest { range_end: self.range_end(&key), key, prev_kv: self.rng.random_bool(0.4) }
    }

    fn compare(&mut self) -> Compare {
        let key = self.key();
        let target = self.rng.random_range(0..5);
        let union = match target {
            0 => compare::TargetUnion::Version(self.rng.random_range(0..4)),
            1 => compare::TargetUnion::CreateRevision(self.rng.random_range(0..=self.revision + 1)),
            2 => compare::TargetUnion::ModRevision(self.rng.random_range(0..=self.revision + 1)),
            3 => compare::TargetUnion::Value(self.value()),
            _ => compare::TargetUnion::Lease(self.lease()),
        };
        Compare {
            result: self.rng.random_range(0..4),
            target,
            range_end: if self.rng.random_bool(0.2) { self.range_end(&key) } else { Bytes::new() },
            key,
            target_union: Some(union),
        }
    }

    fn op(&mut self, depth: u32) -> RequestOp {
        let request = match self.rng.random_range(0..10) {
            0..=2 => request_op::Request::RequestRange(self.range()),
            3..=6 => request_op::Request::RequestPut(self.put()),
            7 | 8 => request_op::Request::RequestDeleteRange(self.delete()),
            _ if depth < 2 => request_op::Request::RequestTxn(self.txn(depth + 1)),
            _ => request_op::Request::RequestPut(self.put()),
        };
        RequestOp { request: Some(request) }
    }

    fn txn(&mut self, depth: u32) -> TxnRequest {
        let n = |g: &mut Self| g.rng.random_range(0..4);
        let compare = (0..n(self)).map(|_| self.compare()).collect();
        let success = (0..n(self)).map(|_| self.op(depth)).collect();
        let failure = (0..n(self)).map(|_| self.op(depth)).collect();
        TxnRequest { compare, success, failure }
    }

    fn call(&mut self) -> Call {
        match self.rng.random_range(0..100) {
            0..=24 => Call::Range(self.range()),
            25..=49 => Call::Put(self.put()),
            50..=59 => Call::Delete(self.delete()),
            60..=84 => Call::Txn(self.txn(0)),
            85..=87 => {
                Call::Compact(CompactionRequest { revision: self.revision(), physical: self.rng.random_bool(0.5) })
            }
            88..=92 => Call::Grant(LeaseGrantRequest {
                id: LEASES[self.rng.random_range(0..LEASES.len())],
                ttl: [60, 90, 300][self.rng.random_range(0..3)],
            }),
            93..=95 => Call::Revoke(LeaseRevokeRequest { id: LEASES[self.rng.random_range(0..LEASES.len())] }),
            _ => Call::TimeToLive(LeaseTimeToLiveRequest { id: self.lease(), keys: self.rng.random_bool(0.5) }),
        }
    }
}

/// Whether `p` ends within a few seconds.
fn exits(p: &mut Proc) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if p.child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// Runs `calls` random calls from `seed` against both servers; how many were compared.
/// etcd 3.4 crashes on some of them (a Txn that deletes a key, then puts it with
/// `ignore_lease`): the run ends there, once meshkv is seen to go on serving.
async fn same_answers(seed: u64, calls: usize) -> usize {
    let dir = tempdir();
    let mut etcd_proc = start_etcd(&dir.path().join("etcd"));
    let meshkv = start_meshkv(&dir.path().join("meshkv"), &[]);
    let mut etcd = Server::connect(etcd_proc.endpoint()).await;
    let mut meshkv = Server::connect(meshkv.endpoint()).await;
    let mut g = Gen { rng: StdRng::seed_from_u64(seed), revision: 1 };
    let mut done: Vec<String> = Vec::new();
    for _ in 0..calls {
        let call = g.call();
        let want = etcd.call(&call).await;
        let got = meshkv.call(&call).await;
        if want.starts_with("error Unknown: transport error") && exits(&mut etcd_proc) {
            println!("seed {seed}: etcd crashed at call {} on {call:?}; meshkv answered {got}", done.len());
            let range = Call::Range(RangeRequest { key: Bytes::from_static(b"a"), ..Default::default() });
            let after = meshkv.call(&range).await;
            assert!(!after.starts_with("error"), "meshkv serves on after it: {after}");
            return done.len();
        }
        if want != got {
            let last: Vec<&String> = done.iter().rev().take(20).rev().collect();
            panic!(
                "seed {seed}, call {}: {call:?}\netcd:   {want}\nmeshkv: {got}\nthe calls before it:\n{}",
                done.len(),
                last.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(rev) = want.split("revision: ").nth(1).and_then(|r| r.split([',', ' ']).next()) {
            g.revision = g.revision.max(rev.parse().unwrap_or(0));
        }
        done.push(format!("{call:?} -> {want}"));
    }
    done.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_calls_get_the_answers_etcd_gives() {
    const CALLS: usize = 400;
    let seeds: u64 = std::env::var("DIFF_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let mut compared = 0;
    for seed in 1..=seeds {
        compared += same_answers(seed, CALLS).await;
    }
    assert!(compared * 10 >= seeds as usize * CALLS * 9, "only {compared} calls compared");
}

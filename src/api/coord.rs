//! What the Lock and Election services share, as etcd's `concurrency` package builds
//! them: each contender writes `<prefix>/<lease in hex>` under its lease, and its turn
//! comes when every key under the prefix created before its own is gone.

use bytes::Bytes;
use tonic::{Code, Status};

use super::auth::Caller;
use super::Ctx;
use crate::pb::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, TxnResponse,
};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::pb::mvccpb::KeyValue;
use crate::store::mvcc::WriteResponse;

/// The TTL of the lease a contender gets when it names none, as etcd's sessions do.
const SESSION_TTL: i64 = 60;

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    // All 0xff: every key from the prefix on.
    Bytes::from_static(&[0])
}

/// What failed inside a lock or election call, as etcd hands it on: its lock and
/// election servers are clients of their own member, and pass a failed call's error on
/// as a plain one, which reaches the caller with its message and the code Unknown.
pub fn handed_on(s: Status) -> Status {
    match s.code() {
        Code::Unknown => s,
        _ => Status::new(Code::Unknown, s.message()),
    }
}

/// Sends `t` as a client's Txn: checked as the KV service checks one, then written.
pub async fn txn(ctx: &Ctx, caller: &Caller, t: TxnRequest) -> Result<TxnResponse, Status> {
    super::validate::txn(&t, ctx.max_txn_ops)?;
    match ctx.propose(caller, Write::Txn(t)).await? {
        WriteResponse::Txn(r) => Ok(r),
        _ => Err(Status::internal("etcdserver: unexpected apply result for txn")),
    }
}

pub fn create_revision_is(key: &Bytes, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.clone(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        range_end: Bytes::new(),
    }
}

pub fn put_op(key: &Bytes, value: Bytes, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.clone(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

fn get_op(key: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest { key: key.clone(), ..Default::default() })),
    }
}

/// A lease for a contender that named none: granted here, never kept alive.
pub async fn session_lease(ctx: &Ctx, caller: &Caller, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    let id = super::lease::new_lease_id();
    match ctx.propose(caller, Write::LeaseGrant(LeaseGrantRequest { ttl: SESSION_TTL, id })).await? {
        WriteResponse::LeaseGrant(r) => Ok(r.id),
        _ => Err(Status::internal("etcdserver: unexpected apply result for lease grant")),
    }
}

/// A contender's key under a prefix, as [`enter`] left it.
pub struct Entered {
    /// The key as it stands.
    pub kv: KeyValue,
    /// Whether this call created it.
    pub created: bool,
    /// The lease it is under: the one asked for, or a new one if none was.
    pub lease: i64,
    /// The store's revision once the call's write was applied: its answer's, as etcd's
    /// mutex and election answer with their transaction's header.
    pub revision: i64,
}

/// Writes the contender's key under `prefix` with `lease` (a new one if 0) unless it is
/// there already; the caller must be allowed to read every contender's key.
pub async fn enter(ctx: &Ctx, caller: &Caller, prefix: &[u8], lease: i64, value: Bytes) -> Result<Entered, Status> {
    require_read_contenders(ctx, caller, prefix)?;
    let lease = session_lease(ctx, caller, lease).await?;
    let mut k = prefix.to_vec();
    k.push(b'/');
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    let key = Bytes::from(k);
    let r = txn(
        ctx,
        caller,
        TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put_op(&key, value, lease)],
            failure: vec![get_op(&key)],
        },
    )
    .await?;
    let rev = r.header.as_ref().map_or(0, |h| h.revision);
    if r.succeeded {
        let kv = KeyValue { key, create_revision: rev, mod_revision: rev, version: 1, lease, value: Bytes::new() };
        return Ok(Entered { kv, created: true, lease, revision: rev });
    }
    let kv = r
        .responses
        .into_iter()
        .find_map(|op| match op.response {
            Some(response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
            _ => None,
        })
        .ok_or_else(|| Status::new(Code::Unavailable, "etcdserver: lost the contender's key; try again"))?;
    Ok(Entered { kv, created: false, lease, revision: rev })
}

/// Requires the caller to be allowed to read every contender's key under `prefix`,
/// as etcd's lock and election, which read them with the caller's token, do.
pub fn require_read_contenders(ctx: &Ctx, caller: &Caller, prefix: &[u8]) -> Result<(), Status> {
    let mut p = prefix.to_vec();
    p.push(b'/');
    ctx.require_read(caller, &p, &prefix_end(&p))
}

/// The key under `prefix` created first (or last before `max_create`, when given).
pub fn first_or_last(ctx: &Ctx, prefix: &[u8], last_before: Option<i64>) -> Result<Option<KeyValue>, Status> {
    Ok(read_first_or_last(ctx, prefix, last_before)?.0)
}

/// [`first_or_last`], and the revision of the store it was read from.
fn read_first_or_last(ctx: &Ctx, prefix: &[u8], last_before: Option<i64>) -> Result<(Option<KeyValue>, i64), Status> {
    let mut p = prefix.to_vec();
    p.push(b'/');
    let req = RangeRequest {
        range_end: prefix_end(&p),
        key: Bytes::from(p),
        limit: 1,
        sort_target: range_request::SortTarget::Create as i32,
        sort_order: if last_before.is_some() {
            range_request::SortOrder::Descend as i32
        } else {
            range_request::SortOrder::Ascend as i32
        },
        max_create_revision: last_before.unwrap_or(0),
        serializable: true,
        ..Default::default()
    };
    let r = ctx.store.range(&req)?;
    Ok((r.kvs.into_iter().next(), r.header.map_or(0, |h| h.revision)))
}

/// Whether `key` still exists with the given create revision, in the local store.
pub fn still_there(ctx: &Ctx, key: &Bytes, create_revision: i64) -> Result<bool, Status> {
    let r = ctx.store.range(&RangeRequest { key: key.clone(), serializable: true, ..Default::default() })?;
    Ok(r.kvs.first().is_some_and(|kv| kv.create_revision == create_revision))
}

/// Waits until every key under `prefix` created before `my_rev` is deleted. Returns
/// the revision at which none was left, if there was one to wait for: etcd's mutex then
/// answers with it, where it answers with its transaction's otherwise.
pub async fn wait_turn(ctx: &Ctx, prefix: &[u8], my_rev: i64) -> Result<Option<i64>, Status> {
    if ctx.unsafe_no_wait_turn {
        return Ok(None);
    }
    // Subscribe first: a deletion between the check and the wait is not missed.
    let mut hub = ctx.store.subscribe();
    let mut waited = false;
    loop {
        let before = match read_first_or_last(ctx, prefix, Some(my_rev - 1))? {
            (Some(kv), _) => kv,
            (None, revision) => return Ok(waited.then_some(revision)),
        };
        waited = true;
        while still_there(ctx, &before.key, before.create_revision)? {
            let batch = tokio::select! {
                b = hub.recv() => b,
                _ = ctx.stopped() => return Err(Status::new(Code::Unavailable, "etcdserver: server stopped")),
            };
            match batch {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(Status::new(Code::Unavailable, "etcdserver: server stopped"))
                }
            }
        }
    }
}

/// Deletes the key when dropped unless disarmed: a contender whose client gave up
/// while waiting leaves no key behind.
pub struct Withdraw {
    ctx: Option<Ctx>,
    key: Bytes,
}

impl Withdraw {
    pub fn new(ctx: &Ctx, key: Bytes) -> Self {
        Self { ctx: Some(ctx.clone()), key }
    }

    pub fn disarm(mut self) {
        self.ctx = None;
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            let key = self.key.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let req = crate::pb::etcdserverpb::DeleteRangeRequest { key, ..Default::default() };
                    let _ = ctx.raft.propose(Write::DeleteRange(req)).await;
                });
            }
        }
    }
}

//! The v3election service: leader election on a name, as etcd's server-side election.
//! Candidates queue by the creation of their keys; the oldest key is the leader, and
//! its value is what the leader proclaims.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::auth::Caller;
use super::coord::{self, Withdraw};
use super::Ctx;
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, RequestOp, ResponseHeader, TxnRequest};
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};
use crate::store::watch::{EventBatch, KeyRange};

pub struct ElectionService {
    ctx: Ctx,
}

impl ElectionService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

fn not_leader() -> Status {
    Status::new(Code::Unknown, "election: not leader")
}

fn leader_key(l: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    l.ok_or_else(|| Status::new(Code::Unknown, "\"leader\" field must be provided"))
}

/// `l`, with a lease of its own if it names none: etcd's Proclaim and Resign act in a
/// session on the leader key's lease, and a session without one grants a new lease
/// (never kept alive), under which Proclaim writes.
async fn session(ctx: &Ctx, caller: &Caller, l: LeaderKey) -> Result<LeaderKey, Status> {
    let lease = coord::session_lease(ctx, caller, l.lease).await?;
    Ok(LeaderKey { lease, ..l })
}

/// Sets the leader's value, if it still leads.
async fn proclaim(ctx: &Ctx, caller: &Caller, l: &LeaderKey, value: Bytes) -> Result<i64, Status> {
    let r = coord::txn(
        ctx,
        caller,
        TxnRequest {
            compare: vec![coord::create_revision_is(&l.key, l.rev)],
            success: vec![coord::put_op(&l.key, value, l.lease)],
            failure: vec![],
        },
    )
    .await?;
    if !r.succeeded {
        return Err(not_leader());
    }
    Ok(r.header.map_or(0, |h| h.revision))
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, request: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let answer: Result<_, Status> = async {
            let ctx = &self.ctx;
            let caller = ctx.caller(&request).await?;
            let req = request.into_inner();
            let coord::Entered { kv, created, lease, revision } =
                coord::enter(ctx, &caller, &req.name, req.lease, req.value.clone()).await?;
            let withdraw = Withdraw::new(ctx, kv.key.clone());
            let leader = LeaderKey { name: req.name.clone(), key: kv.key.clone(), rev: kv.create_revision, lease };
            if !created && kv.value != req.value {
                // Campaigning again with another value proclaims it. etcd's answer
                // still tells the revision its first transaction left.
                proclaim(ctx, &caller, &leader, req.value.clone()).await?;
            }
            coord::wait_turn(ctx, &req.name, kv.create_revision).await?;
            if !coord::still_there(ctx, &kv.key, kv.create_revision)? {
                return Err(Status::new(Code::Unknown, "session expired"));
            }
            withdraw.disarm();
            let header = ctx.header(Some(ResponseHeader { revision, ..Default::default() }));
            Ok(Response::new(CampaignResponse { header, leader: Some(leader) }))
        }
        .await;
        answer.map_err(coord::handed_on)
    }

    async fn proclaim(&self, request: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let answer: Result<_, Status> = async {
            let caller = self.ctx.caller(&request).await?;
            let req = request.into_inner();
            let l = session(&self.ctx, &caller, leader_key(req.leader)?).await?;
            let revision = proclaim(&self.ctx, &caller, &l, req.value).await?;
            Ok(Response::new(ProclaimResponse {
                header: self.ctx.header(Some(ResponseHeader { revision, ..Default::default() })),
            }))
        }
        .await;
        answer.map_err(coord::handed_on)
    }

    async fn leader(&self, request: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let answer: Result<_, Status> = async {
            let caller = self.ctx.caller(&request).await?;
            let name = request.into_inner().name;
            coord::require_read_contenders(&self.ctx, &caller, &name)?;
            self.ctx.raft.read_index().await?;
            let kv = coord::first_or_last(&self.ctx, &name, None)?
                .ok_or_else(|| Status::new(Code::Unknown, "election: no leader"))?;
            Ok(Response::new(LeaderResponse { header: self.ctx.header(None), kv: Some(kv) }))
        }
        .await;
        answer.map_err(coord::handed_on)
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<LeaderResponse>>, Status> {
        let caller = self.ctx.caller(&request).await?;
        let name = request.into_inner().name;
        coord::require_read_contenders(&self.ctx, &caller, &name)?;
        // Listen before the first read, so no change after it is missed; and read
        // linearizably, as etcd's Get is: an observer that reconnects through another
        // member never sees an older leader than it saw before.
        let hub = self.ctx.store.subscribe();
        self.ctx.raft.read_index().await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(follow(self.ctx.clone(), name, hub, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(&self, request: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let answer: Result<_, Status> = async {
            let caller = self.ctx.caller(&request).await?;
            let l = session(&self.ctx, &caller, leader_key(request.into_inner().leader)?).await?;
            let delete = RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: l.key.clone(),
                    ..Default::default()
                })),
            };
            let r = coord::txn(
                &self.ctx,
                &caller,
                TxnRequest {
                    compare: vec![coord::create_revision_is(&l.key, l.rev)],
                    success: vec![delete],
                    failure: vec![],
                },
            )
            .await?;
            Ok(Response::new(ResignResponse { header: self.ctx.header(r.header) }))
        }
        .await;
        answer.map_err(coord::handed_on)
    }
}

type Observed = mpsc::Sender<Result<LeaderResponse, Status>>;

/// Most events one read of the history passes on while an observer catches up.
const CATCH_UP_EVENTS: usize = 4096;

/// Tells an observer of election `name` who leads, as etcd's Observe does: the leader's
/// key as it is now, then every value that leader proclaims, in order, until its key is
/// deleted; then the next leader. Ends when the observer goes or the member stops.
async fn follow(ctx: Ctx, name: Bytes, mut hub: broadcast::Receiver<Arc<EventBatch>>, tx: Observed) {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    // The leader's key as last sent.
    let mut sent: Option<KeyValue> = None;
    loop {
        let leader = match coord::first_or_last(&ctx, &name, None) {
            Ok(kv) => kv,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let following = leader.is_some();
        if let Some(kv) = leader {
            if sent.as_ref().is_none_or(|s| newer(&kv, s)) {
                if !deliver(&ctx, &tx, &kv).await {
                    return;
                }
                sent = Some(kv);
            }
        }
        // Until the leader's key goes (or, with no leader, a candidate comes): each
        // value the leader proclaims.
        let mut next = Next::Wait;
        while let Next::Wait = next {
            let batch = tokio::select! {
                _ = ctx.stopped() => return,
                _ = tx.closed() => return,
                b = hub.recv() => b,
            };
            next = match batch {
                Ok(b) => match &b.events {
                    Some(events) => pass_on(&ctx, &tx, &prefix, following, events, &mut sent).await,
                    // The store jumped ahead without its events (a snapshot came in):
                    // the stream ends, as etcd's does when its watch breaks, rather than
                    // skip values.
                    None => Next::End,
                },
                Err(broadcast::error::RecvError::Lagged(_)) if following => {
                    catch_up(&ctx, &tx, &prefix, &mut sent).await
                }
                Err(broadcast::error::RecvError::Lagged(_)) => Next::Reread,
                Err(broadcast::error::RecvError::Closed) => Next::End,
            };
        }
        if let Next::End = next {
            return;
        }
    }
}

/// What an observer does after a batch of changes.
enum Next {
    /// Waits for more: the leader is still the one it follows.
    Wait,
    /// Reads who leads afresh.
    Reread,
    /// Stops: the observer went, or what it missed is no longer known.
    End,
}

/// Whether `kv` is a later leader, or a later value of the leader, than `sent`.
fn newer(kv: &KeyValue, sent: &KeyValue) -> bool {
    (kv.create_revision, kv.mod_revision) > (sent.create_revision, sent.mod_revision)
}

/// Sends `kv` with the store's revision in the header, as etcd's Observe answers with its
/// Get's header or its watch's.
async fn deliver(ctx: &Ctx, tx: &Observed, kv: &KeyValue) -> bool {
    tx.send(Ok(LeaderResponse { header: ctx.header(None), kv: Some(kv.clone()) })).await.is_ok()
}

/// Passes on the values `events` give the leader last sent, if `following` it; says
/// whether the observer waits for more or must read who leads afresh.
async fn pass_on(
    ctx: &Ctx,
    tx: &Observed,
    prefix: &[u8],
    following: bool,
    events: &[Event],
    sent: &mut Option<KeyValue>,
) -> Next {
    for e in events {
        let Some(kv) = &e.kv else { continue };
        let Some(leader) = sent.as_ref().filter(|_| following) else {
            // No leader: the first candidate to come is read afresh.
            if kv.key.starts_with(prefix) {
                return Next::Reread;
            }
            continue;
        };
        if kv.key != leader.key {
            continue;
        }
        if e.r#type == EventType::Delete as i32 {
            if kv.mod_revision > leader.mod_revision {
                return Next::Reread;
            }
        } else if kv.create_revision == leader.create_revision && newer(kv, leader) {
            if !deliver(ctx, tx, kv).await {
                return Next::End;
            }
            *sent = Some(kv.clone());
        }
    }
    Next::Wait
}

/// An observer that fell behind the changes passes on the leader's values from the
/// history instead, up to now.
async fn catch_up(ctx: &Ctx, tx: &Observed, prefix: &[u8], sent: &mut Option<KeyValue>) -> Next {
    let Some(leader) = sent.as_ref() else { return Next::Reread };
    let range = KeyRange::new(leader.key.clone(), &[]);
    let (mut from, to) = (leader.mod_revision + 1, ctx.store.revision());
    while from <= to {
        let (store, range) = (ctx.store.clone(), range.clone());
        let read = tokio::task::spawn_blocking(move || store.events(Some(&range), from, to, CATCH_UP_EVENTS)).await;
        // Compacted, or a snapshot coming in: the stream ends rather than skip values.
        let Ok(Ok((events, covered))) = read else { return Next::End };
        match pass_on(ctx, tx, prefix, true, &events, sent).await {
            Next::Wait => from = covered + 1,
            next => return next,
        }
    }
    Next::Wait
}

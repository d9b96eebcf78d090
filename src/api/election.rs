//! The v3election service: leader election on a name, as etcd's server-side election.
//! Candidates queue by the creation of their keys; the oldest key is the leader, and
//! its value is what the leader proclaims.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::auth::Caller;
use super::coord::{self, Withdraw};
use super::Ctx;
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, RequestOp, ResponseHeader, TxnRequest};
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};

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
        let ctx = &self.ctx;
        let caller = ctx.caller(&request)?;
        let req = request.into_inner();
        coord::require_read_contenders(ctx, &caller, &req.name)?;
        let lease = coord::session_lease(ctx, &caller, req.lease).await?;
        let (kv, created) = coord::enter(ctx, &caller, &req.name, lease, req.value.clone()).await?;
        let withdraw = Withdraw::new(ctx, kv.key.clone());
        let leader = LeaderKey { name: req.name.clone(), key: kv.key.clone(), rev: kv.create_revision, lease };
        let mut revision = kv.mod_revision;
        if !created && kv.value != req.value {
            // Campaigning again with another value proclaims it.
            revision = proclaim(ctx, &caller, &leader, req.value.clone()).await?;
        }
        coord::wait_turn(ctx, &req.name, kv.create_revision).await?;
        if !coord::still_there(ctx, &kv.key, kv.create_revision)? {
            return Err(Status::new(Code::Unknown, "session expired"));
        }
        withdraw.disarm();
        let header = ctx.header(Some(ResponseHeader { revision, ..Default::default() }));
        Ok(Response::new(CampaignResponse { header, leader: Some(leader) }))
    }

    async fn proclaim(&self, request: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let caller = self.ctx.caller(&request)?;
        let req = request.into_inner();
        let l = leader_key(req.leader)?;
        let revision = proclaim(&self.ctx, &caller, &l, req.value).await?;
        Ok(Response::new(ProclaimResponse {
            header: self.ctx.header(Some(ResponseHeader { revision, ..Default::default() })),
        }))
    }

    async fn leader(&self, request: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let caller = self.ctx.caller(&request)?;
        let name = request.into_inner().name;
        coord::require_read_contenders(&self.ctx, &caller, &name)?;
        self.ctx.raft.read_index().await?;
        let kv = coord::first_or_last(&self.ctx, &name, None)?
            .ok_or_else(|| Status::new(Code::Unknown, "election: no leader"))?;
        Ok(Response::new(LeaderResponse { header: self.ctx.header(None), kv: Some(kv) }))
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<LeaderResponse>>, Status> {
        let caller = self.ctx.caller(&request)?;
        let name = request.into_inner().name;
        coord::require_read_contenders(&self.ctx, &caller, &name)?;
        let ctx = self.ctx.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut hub = ctx.store.subscribe();
            let mut last: Option<(Bytes, i64)> = None;
            loop {
                let now = match coord::first_or_last(&ctx, &name, None) {
                    Ok(kv) => kv,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if let Some(kv) = now {
                    let seen = (kv.key.clone(), kv.mod_revision);
                    if last.as_ref() != Some(&seen) {
                        last = Some(seen);
                        let resp = LeaderResponse { header: ctx.header(None), kv: Some(kv) };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = ctx.stopped() => return,
                    _ = tx.closed() => return,
                    b = hub.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = b { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(&self, request: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let caller = self.ctx.caller(&request)?;
        let l = leader_key(request.into_inner().leader)?;
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
}

//! The v3lock service: a distributed mutex on a name, as etcd's server-side lock.
//! `Lock` returns once the caller owns the lock; the key it returns is the ownership,
//! held until `Unlock` deletes it or the lease ends.

use tonic::{Code, Request, Response, Status};

use super::coord::{self, Withdraw};
use super::Ctx;
use crate::pb::etcdserverpb::{DeleteRangeRequest, ResponseHeader};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::pb::v3lockpb::lock_server::Lock;
use crate::pb::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use crate::store::mvcc::WriteResponse;

pub struct LockService {
    ctx: Ctx,
}

impl LockService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let answer: Result<_, Status> = async {
            let ctx = &self.ctx;
            let caller = ctx.caller(&request).await?;
            let req = request.into_inner();
            let entered = coord::enter(ctx, &caller, &req.name, req.lease, bytes::Bytes::new()).await?;
            let kv = entered.kv;
            // If the caller gives up while waiting, its key goes, as etcd's mutex does.
            let withdraw = Withdraw::new(ctx, kv.key.clone());
            let waited = coord::wait_turn(ctx, &req.name, kv.create_revision).await?;
            if !coord::still_there(ctx, &kv.key, kv.create_revision)? {
                return Err(Status::new(Code::Unknown, "session expired"));
            }
            withdraw.disarm();
            let revision = waited.unwrap_or(entered.revision);
            let header = ctx.header(Some(ResponseHeader { revision, ..Default::default() }));
            Ok(Response::new(LockResponse { header, key: kv.key }))
        }
        .await;
        answer.map_err(coord::handed_on)
    }

    async fn unlock(&self, request: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let answer: Result<_, Status> = async {
            let caller = self.ctx.caller(&request).await?;
            let key = request.into_inner().key;
            let delete = DeleteRangeRequest { key, ..Default::default() };
            super::validate::delete_range(&delete)?;
            let delete = Write::DeleteRange(delete);
            match self.ctx.propose(&caller, delete).await? {
                WriteResponse::DeleteRange(r) => {
                    Ok(Response::new(UnlockResponse { header: self.ctx.header(r.header) }))
                }
                _ => Err(Status::internal("etcdserver: unexpected apply result for unlock")),
            }
        }
        .await;
        answer.map_err(coord::handed_on)
    }
}

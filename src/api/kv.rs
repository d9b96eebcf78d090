//! The KV service: Range, Put, DeleteRange, Txn and Compact.

use tonic::{Request, Response, Status};

use super::auth::{Caller, Credentials};
use super::{validate, Ctx};
use crate::pb::etcdserverpb::kv_server::Kv;
use crate::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::store::mvcc::WriteResponse;

pub struct KvService {
    ctx: Ctx,
}

impl KvService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }

    async fn write(&self, caller: &Caller, w: Write) -> Result<WriteResponse, Status> {
        self.ctx.propose(caller, w).await
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("etcdserver: unexpected apply result for {what}"))
}

/// As etcd's, each call checks the request's form before the caller's token: a request
/// both malformed and sent with a token no longer valid is told what is wrong with it.
#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let who = Credentials::of(&request);
        let req = request.into_inner();
        validate::range(&req)?;
        let caller = self.ctx.caller_of(&who).await?;
        self.ctx.require_read(&caller, &req.key, &req.range_end)?;
        if !req.serializable && !self.ctx.unsafe_no_read_index {
            self.ctx.raft.read_index().await?;
        }
        let mut resp = self.ctx.store.range(&req)?;
        resp.header = self.ctx.header(resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = Credentials::of(&request);
        let req = request.into_inner();
        validate::put(&req)?;
        let caller = self.ctx.caller_of(&who).await?;
        match self.write(&caller, Write::Put(req)).await? {
            WriteResponse::Put(mut resp) => {
                resp.header = self.ctx.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = Credentials::of(&request);
        let req = request.into_inner();
        validate::delete_range(&req)?;
        let caller = self.ctx.caller_of(&who).await?;
        match self.write(&caller, Write::DeleteRange(req)).await? {
            WriteResponse::DeleteRange(mut resp) => {
                resp.header = self.ctx.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("delete")),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = Credentials::of(&request);
        let req = request.into_inner();
        validate::txn(&req, self.ctx.max_txn_ops)?;
        let caller = self.ctx.caller_of(&who).await?;
        match self.write(&caller, Write::Txn(req)).await? {
            WriteResponse::Txn(mut resp) => {
                resp.header = self.ctx.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        // Compaction runs inside the apply, so it is physical by the time it answers,
        // whatever the request's `physical` flag asks.
        let caller = self.ctx.caller(&request).await?;
        let req = request.into_inner();
        match self.write(&caller, Write::Compaction(req)).await? {
            WriteResponse::Compaction(mut resp) => {
                resp.header = self.ctx.header(resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}

//! The Maintenance service: Status (for `etcdctl endpoint status` and health checks),
//! Hash and HashKV, Alarm, Defragment and MoveLeader.

use tonic::{Code, Request, Response, Status};

use super::Ctx;
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest, HashKvResponse, HashRequest,
    HashResponse, MoveLeaderRequest, MoveLeaderResponse, StatusRequest, StatusResponse,
};

pub struct MaintenanceService {
    ctx: Ctx,
}

impl MaintenanceService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let raft = self.ctx.raft.status();
        let size = self.ctx.store.engine().size_bytes() as i64;
        let mut errors = Vec::new();
        if raft.leader() == 0 {
            errors.push("etcdserver: no leader".to_string());
        }
        Ok(Response::new(StatusResponse {
            header: self.ctx.header(None),
            version: crate::ETCD_COMPAT_VERSION.to_string(),
            db_size: size,
            leader: raft.leader(),
            raft_index: raft.commit_index(),
            raft_term: raft.term(),
            raft_applied_index: self.ctx.store.applied_index(),
            errors,
            db_size_in_use: size,
            is_learner: raft.is_learner(),
        }))
    }

    async fn alarm(&self, _: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // No alarm is ever raised yet: the space quota arrives with the NOSPACE alarm.
        Ok(Response::new(AlarmResponse { header: self.ctx.header(None), alarms: vec![] }))
    }

    async fn defragment(&self, _: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        let engine = self.ctx.store.engine().clone();
        tokio::task::spawn_blocking(move || engine.compact_all()).await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(DefragmentResponse { header: self.ctx.header(None) }))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let store = self.ctx.store.clone();
        let (hash, _, _) = tokio::task::spawn_blocking(move || store.hash_kv(0))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(HashResponse { header: self.ctx.header(None), hash }))
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let rev = request.into_inner().revision;
        let store = self.ctx.store.clone();
        let (hash, _, compact_revision) = tokio::task::spawn_blocking(move || store.hash_kv(rev))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(HashKvResponse { header: self.ctx.header(None), hash, compact_revision }))
    }

    async fn move_leader(&self, request: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = request.into_inner().target_id;
        let raft = self.ctx.raft.status();
        let m = raft.membership();
        if !m.voters.contains(&target) {
            return Err(Status::new(Code::NotFound, "etcdserver: member not found"));
        }
        if raft.leader() != self.ctx.id.member_id {
            return Err(Status::new(Code::FailedPrecondition, "etcdserver: not leader"));
        }
        self.ctx.raft.transfer_leader(target)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while raft.leader() != target {
            if std::time::Instant::now() > deadline {
                return Err(Status::new(
                    Code::Unavailable,
                    "etcdserver: request timed out, leader transfer took too long",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(Response::new(MoveLeaderResponse { header: self.ctx.header(None) }))
    }
}

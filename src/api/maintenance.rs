//! The Maintenance service: Status (for `etcdctl endpoint status` and health checks),
//! Hash and HashKV, Alarm, Snapshot (backups), Defragment and MoveLeader.

use tonic::{Code, Request, Response, Status};

use super::auth::Credentials;
use super::Ctx;
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{
    alarm_request, AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, ResponseHeader,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::store::backup;
use crate::store::mvcc::WriteResponse;

pub struct MaintenanceService {
    ctx: Ctx,
}

impl MaintenanceService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }

    /// Defragment, Snapshot, Hash, HashKV and MoveLeader are for the root role once
    /// authentication is on, refused in etcd's auth package's words.
    async fn require_admin(&self, who: Credentials) -> Result<(), Status> {
        if !self.ctx.store.auth_enabled() {
            return Ok(());
        }
        let caller = self.ctx.caller_of(&who).await?;
        self.ctx.store.auth().check_admin(caller.name()).map_err(super::auth::maintenance_refused)
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
        errors.extend(self.ctx.store.alarms(AlarmType::None).iter().map(alarm_text));
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

    /// Lists alarms (a linearizable read of the alarms applied), or raises or clears one
    /// through Raft: the answer then holds the alarm changed, none if nothing changed.
    async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let caller = self.ctx.caller(&request).await?;
        let req = request.into_inner();
        let alarms = if req.action == alarm_request::AlarmAction::Get as i32 {
            self.ctx.raft.read_index().await?;
            self.ctx.store.alarms(AlarmType::try_from(req.alarm).unwrap_or(AlarmType::None))
        } else {
            match self.ctx.propose(&caller, Write::Alarm(req)).await? {
                WriteResponse::Alarm(r) => r.alarms,
                _ => return Err(Status::internal("etcdserver: unexpected apply result for alarm")),
            }
        };
        Ok(Response::new(AlarmResponse { header: self.ctx.header(None), alarms }))
    }

    async fn defragment(&self, request: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.require_admin(Credentials::of(&request)).await?;
        let engine = self.ctx.store.engine().clone();
        tokio::task::spawn_blocking(move || engine.compact_all()).await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(DefragmentResponse { header: self.ctx.header(None) }))
    }

    /// The store as of now, as a backup (`etcdctl snapshot save`; restored by
    /// `meshkv snapshot restore`), streamed in chunks as it is read.
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<SnapshotResponse>>, Status> {
        self.require_admin(Credentials::of(&request)).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let engine = self.ctx.store.engine().clone();
        let mut out = Chunks { tx, header: self.ctx.header(None), buf: Vec::new(), sent: 0, total: 0 };
        tokio::task::spawn_blocking(move || {
            let written = backup::write(&engine, |total| {
                out.total = total;
                &mut out
            });
            if let Err(e) = written {
                tracing::warn!(error = %e, "a snapshot for a client was not sent whole");
                let _ = out.tx.blocking_send(Err(Status::internal(format!("etcdserver: snapshot: {e}"))));
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.require_admin(Credentials::of(&request)).await?;
        let store = self.ctx.store.clone();
        let (hash, _, _) = tokio::task::spawn_blocking(move || store.hash_kv(0))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(HashResponse { header: self.ctx.header(None), hash }))
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.require_admin(Credentials::of(&request)).await?;
        let rev = request.into_inner().revision;
        let store = self.ctx.store.clone();
        let (hash, _, compact_revision) = tokio::task::spawn_blocking(move || store.hash_kv(rev))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(HashKvResponse { header: self.ctx.header(None), hash, compact_revision }))
    }

    async fn move_leader(&self, request: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.require_admin(Credentials::of(&request)).await?;
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

/// An alarm as etcd's Status lists it among its errors.
fn alarm_text(a: &AlarmMember) -> String {
    let name = AlarmType::try_from(a.alarm).map_or("NONE", |t| t.as_str_name());
    format!("memberID:{} alarm:{} ", a.member_id, name)
}

/// A backup's bytes as snapshot messages of `CHUNK_BYTES`, sent as they fill; the last
/// one, sent at the flush, says no bytes remain.
struct Chunks {
    tx: tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
    header: Option<ResponseHeader>,
    buf: Vec<u8>,
    sent: u64,
    /// The database's length: what `remaining_bytes` counts down from, as etcd's does
    /// (the SHA-256 that ends a backup is not counted).
    total: u64,
}

const CHUNK_BYTES: usize = 32 << 10;

impl Chunks {
    /// Sends what is buffered; nothing when that is nothing, but for a first message.
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() && self.header.is_none() {
            return Ok(());
        }
        let blob = std::mem::take(&mut self.buf);
        self.sent += blob.len() as u64;
        let remaining_bytes = self.total.saturating_sub(self.sent);
        let msg = SnapshotResponse { header: self.header.take(), remaining_bytes, blob: blob.into() };
        self.tx.blocking_send(Ok(msg)).map_err(|_| std::io::Error::other("the client went away"))
    }
}

impl std::io::Write for Chunks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

//! The etcd v3 gRPC services. Each handler runs: validate → (ReadIndex or proposal) →
//! local store read → response header. One file per etcd service.

pub mod access;
pub mod admin;
pub mod auth;
pub mod authority;
pub mod cluster;
pub mod compactor;
pub mod conn;
pub mod coord;
pub mod corruption;
pub mod election;
pub mod error;
pub mod gateway;
pub mod grpc_health;
pub mod http;
pub mod kv;
pub mod leader;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod metrics;
pub mod quota;
pub mod unary_wire;
pub mod validate;
pub mod watch;
pub mod watch_wire;

use std::sync::Arc;

use tonic::Status;

use crate::mesh::Mesh;
use crate::pb::etcdserverpb::{alarm_request, AlarmRequest, AlarmType, ResponseHeader};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::raft::RaftHandle;
use crate::store::mvcc::WriteResponse;
use crate::store::MvccStore;

/// Who this member is, as clients see it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub member_id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

/// What every service shares: identity, the Raft handle and the store.
#[derive(Clone)]
pub struct Ctx {
    pub id: Arc<Identity>,
    pub raft: RaftHandle,
    pub store: Arc<MvccStore>,
    pub mesh: Mesh,
    pub max_txn_ops: usize,
    pub quota: Arc<quota::Quota>,
    /// Deliberately broken: linearizable reads skip ReadIndex (test-only).
    pub unsafe_no_read_index: bool,
    /// Deliberately broken: Lock and Campaign return without waiting their turn
    /// (test-only).
    pub unsafe_no_wait_turn: bool,
    /// The way to the leader, for the calls only it can answer.
    pub leader: Arc<leader::LeaderLink>,
    /// Set when the member stops: long-lived streams and waits end.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl Ctx {
    /// Resolves once the member is stopping.
    pub async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// Proposes a client's write as `caller` and waits for its outcome. A write the
    /// space quota has no room for is refused, and raises NOSPACE for this member, as
    /// etcd's quota does.
    pub async fn propose(&self, caller: &auth::Caller, w: Write) -> Result<WriteResponse, Status> {
        if !self.quota.admits(crate::store::alarm::cost(&w)) {
            self.raise_nospace().await;
            return Err(error::no_space());
        }
        Ok(self.raft.propose_as(w, Some(caller.name())).await?)
    }

    async fn raise_nospace(&self) {
        let me = self.id.member_id;
        if self.store.alarms(AlarmType::Nospace).iter().any(|a| a.member_id == me) {
            return;
        }
        let raise = AlarmRequest {
            action: alarm_request::AlarmAction::Activate as i32,
            member_id: me,
            alarm: AlarmType::Nospace as i32,
        };
        if let Err(e) = self.raft.propose(Write::Alarm(raise)).await {
            tracing::warn!(error = %e, "raising the NOSPACE alarm failed");
        }
    }

    /// Completes a header: cluster, member and term; the revision of `partial` is kept,
    /// or the store's newest when it has none.
    pub fn header(&self, partial: Option<ResponseHeader>) -> Option<ResponseHeader> {
        let revision = match partial {
            Some(h) if h.revision != 0 => h.revision,
            _ => self.store.revision(),
        };
        Some(ResponseHeader {
            cluster_id: self.raft.status().cluster_id(),
            member_id: self.id.member_id,
            revision,
            raft_term: self.raft.status().term(),
        })
    }
}

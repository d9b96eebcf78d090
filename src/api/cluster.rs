//! The Cluster service. Membership is Raft's (who votes, who learns); peer URLs come
//! from the mesh topology and client URLs from the member directory each member
//! gossips.

use std::collections::HashMap;

use tonic::{Code, Request, Response, Status};

use super::Ctx;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use crate::pb::meshkvpb::LeaderMethod;
use crate::raft::directory::{self, Directory};
use crate::raft::RaftError;

#[derive(Clone)]
pub struct ClusterService {
    ctx: Ctx,
}

impl ClusterService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }

    /// Promotes learner `id`, here on the leader or by the leader: only the leader knows
    /// how far the learner has come, and it decides, as etcd's does. `forwarded`: a
    /// follower's call, not passed on again.
    pub(super) async fn promote(&self, id: u64, forwarded: bool) -> Result<MemberPromoteResponse, Status> {
        match self.ctx.raft.change_membership(crate::raft::membership::Change::Promote { id }).await {
            Ok(()) => Ok(MemberPromoteResponse { header: self.ctx.header(None), members: self.members() }),
            Err(RaftError::NotLeader) if !forwarded => {
                let req = MemberPromoteRequest { id };
                let resp: MemberPromoteResponse =
                    self.ctx.leader.call(&self.ctx, LeaderMethod::MemberPromote, &req).await?;
                Ok(MemberPromoteResponse { header: self.ctx.header(None), members: resp.members })
            }
            Err(RaftError::NotLeader) => Err(Status::new(Code::Unavailable, "etcdserver: leader changed")),
            Err(e) => Err(e.into()),
        }
    }

    /// Every member, voters first, each in id order.
    pub fn members(&self) -> Vec<Member> {
        let m = self.ctx.raft.status().membership();
        let status = self.ctx.mesh.status();
        let mut peer_addr: HashMap<String, String> =
            status.peers.iter().map(|p| (p.name.clone(), p.addr.clone())).collect();
        peer_addr.insert(status.name.clone(), status.addr.clone());
        let member = |id: u64, is_learner: bool| {
            let name = m.names.get(&id).cloned().unwrap_or_default();
            let client_ur_ls = if id == self.ctx.id.member_id {
                self.ctx.id.client_urls.clone()
            } else {
                self.ctx
                    .mesh
                    .with_channel::<Directory, _>(directory::CHANNEL, |d| d.client_urls(&name))
                    .unwrap_or_default()
            };
            let peer_ur_ls =
                peer_addr.get(&name).filter(|a| !a.is_empty()).map(|a| vec![format!("http://{a}")]).unwrap_or_default();
            Member { id, name, peer_ur_ls, client_ur_ls, is_learner }
        };
        let mut voters = m.voters.clone();
        voters.sort_unstable();
        let mut learners = m.learners.clone();
        learners.sort_unstable();
        voters.iter().map(|&id| member(id, false)).chain(learners.iter().map(|&id| member(id, true))).collect()
    }
}

fn joined_through_the_mesh() -> Status {
    Status::new(
        Code::FailedPrecondition,
        "etcdserver: meshkv members join through the mesh: start the new member with --join <any member's peer address>; it is added as a learner and promoted by the cluster",
    )
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, _: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse { header: self.ctx.header(None), members: self.members() }))
    }

    async fn member_add(&self, request: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        self.ctx.require_admin(&request).await?;
        Err(joined_through_the_mesh())
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.ctx.require_admin(&request).await?;
        Err(Status::new(
            Code::FailedPrecondition,
            "etcdserver: meshkv members announce their own peer addresses through the mesh; restart the member with new --listen-peer-urls",
        ))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.ctx.require_admin(&request).await?;
        let id = request.into_inner().id;
        self.ctx.raft.change_membership(crate::raft::membership::Change::Remove { id, rejoin: false }).await?;
        Ok(Response::new(MemberRemoveResponse { header: self.ctx.header(None), members: self.members() }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.ctx.require_admin(&request).await?;
        Ok(Response::new(self.promote(request.get_ref().id, false).await?))
    }
}

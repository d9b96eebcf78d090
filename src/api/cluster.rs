//! The Cluster service. A member lists itself; adding, removing and promoting members
//! come with multi-member clusters and answer UNIMPLEMENTED until then.

use tonic::{Request, Response, Status};

use super::Ctx;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::{Member, MemberListRequest, MemberListResponse};

pub struct ClusterService {
    ctx: Ctx,
}

impl ClusterService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, _: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let id = &self.ctx.id;
        let me = Member {
            id: id.member_id,
            name: id.name.clone(),
            peer_ur_ls: id.peer_urls.clone(),
            client_ur_ls: id.client_urls.clone(),
            is_learner: false,
        };
        Ok(Response::new(MemberListResponse { header: self.ctx.header(None), members: vec![me] }))
    }
}

//! The Auth service. Authentication is off: status says so, and authenticating answers
//! as etcd does when auth is not enabled. User and role management is not built yet and
//! answers UNIMPLEMENTED.

use tonic::{Code, Request, Response, Status};

use super::Ctx;
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::{AuthStatusRequest, AuthStatusResponse, AuthenticateRequest, AuthenticateResponse};

pub struct AuthService {
    ctx: Ctx,
}

impl AuthService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_status(&self, _: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        Ok(Response::new(AuthStatusResponse { header: self.ctx.header(None), enabled: false, auth_revision: 0 }))
    }

    async fn authenticate(&self, _: Request<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        Err(Status::new(Code::FailedPrecondition, "etcdserver: authentication is not enabled"))
    }
}

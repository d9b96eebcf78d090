//! gRPC's health service (`grpc.health.v1.Health`), which etcd registers on its client
//! URLs: `grpc_health_probe`, Kubernetes' gRPC probes and load balancers ask it. As
//! etcd's, it knows the server as a whole (the service ""), which serves while the
//! member runs: a member without a leader or under an alarm still answers, as the
//! process is alive (`/health` and `/readyz` tell those apart). Any other service name is
//! unknown: Check answers NOT_FOUND "unknown service", Watch SERVICE_UNKNOWN.

use futures::StreamExt;
use tonic::{Request, Response, Status};

use crate::pb::grpc_health::health_check_response::ServingStatus;
use crate::pb::grpc_health::health_server::Health;
use crate::pb::grpc_health::{HealthCheckRequest, HealthCheckResponse};

use super::Ctx;

pub struct HealthService {
    ctx: Ctx,
}

impl HealthService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: status.into() }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        match request.into_inner().service.as_str() {
            "" => Ok(Response::new(answer(ServingStatus::Serving))),
            _ => Err(Status::not_found("unknown service")),
        }
    }

    /// The status now; the stream then stays open, with nothing more to say, until the
    /// client leaves or the member stops.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<HealthCheckResponse>>, Status> {
        let status = match request.into_inner().service.as_str() {
            "" => ServingStatus::Serving,
            _ => ServingStatus::ServiceUnknown,
        };
        let ctx = self.ctx.clone();
        let now = futures::stream::once(async move { Ok(answer(status)) });
        let until_stopped = futures::stream::once(async move { ctx.stopped().await }).filter_map(|()| async { None });
        Ok(Response::new(Box::pin(now.chain(until_stopped))))
    }
}

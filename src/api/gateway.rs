//! etcd's JSON gateway on the client URLs: `POST /v3/kv/range` and the other unary calls,
//! with the request and response as protobuf's JSON mapping under the proto's own field
//! names (bytes in base64, 64-bit integers as strings, defaults left out), as etcd's
//! grpc-gateway writes them:
//!
//! ```text
//! curl -X POST http://127.0.0.1:2379/v3/kv/put -d '{"key":"Zm9v","value":"YmFy"}'
//! {"header":{"cluster_id":"…","member_id":"…","revision":"2","raft_term":"2"}}
//! ```
//!
//! A failed call answers with the HTTP status grpc-gateway gives its gRPC code and
//! `{"error":…,"message":…,"code":…}`. Each call goes to the same service the gRPC route
//! serves, in the same process. The streaming calls (watch, lease keep-alive, snapshot,
//! observe) are gRPC only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Status};

use super::auth::AuthService;
use super::cluster::ClusterService;
use super::election::ElectionService;
use super::kv::KvService;
use super::lease::{LeaseService, Lessor};
use super::lock::LockService;
use super::maintenance::MaintenanceService;
use super::Ctx;
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::kv_server::Kv;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3lockpb::lock_server::Lock;

/// The services the gateway's calls go to.
struct Services {
    kv: KvService,
    lease: LeaseService,
    cluster: ClusterService,
    maintenance: MaintenanceService,
    auth: AuthService,
    lock: LockService,
    election: ElectionService,
}

/// Routes `$path` to `$service.$method`, through JSON.
macro_rules! unary {
    ($router:expr, $services:expr, $($path:literal => $service:ident.$method:ident),+ $(,)?) => {{
        let mut r = $router;
        $(
            let s = $services.clone();
            let handler = move |body: Bytes| {
                let s = s.clone();
                async move { call(&body, |req| async move { s.$service.$method(tonic::Request::new(req)).await }).await }
            };
            r = r.route($path, post(handler).fallback(method_not_allowed));
        )+
        r
    }};
}

/// The gateway's routes: every unary call of etcd's services under its `/v3/…` path
/// (etcd 3.4's older lease paths under `/v3/kv/lease/…` too).
pub fn router(ctx: Ctx, lessor: Arc<Lessor>, election_timeout: Duration) -> axum::Router {
    let s = Arc::new(Services {
        kv: KvService::new(ctx.clone()),
        lease: LeaseService::new(ctx.clone(), lessor, election_timeout),
        cluster: ClusterService::new(ctx.clone()),
        maintenance: MaintenanceService::new(ctx.clone()),
        auth: AuthService::new(ctx.clone()),
        lock: LockService::new(ctx.clone()),
        election: ElectionService::new(ctx),
    });
    let r = unary!(axum::Router::new(), s,
        "/v3/kv/range" => kv.range,
        "/v3/kv/put" => kv.put,
        "/v3/kv/deleterange" => kv.delete_range,
        "/v3/kv/txn" => kv.txn,
        "/v3/kv/compaction" => kv.compact,
        "/v3/lease/grant" => lease.lease_grant,
        "/v3/lease/revoke" => lease.lease_revoke,
        "/v3/kv/lease/revoke" => lease.lease_revoke,
        "/v3/lease/timetolive" => lease.lease_time_to_live,
        "/v3/kv/lease/timetolive" => lease.lease_time_to_live,
        "/v3/lease/leases" => lease.lease_leases,
        "/v3/kv/lease/leases" => lease.lease_leases,
        "/v3/cluster/member/add" => cluster.member_add,
        "/v3/cluster/member/remove" => cluster.member_remove,
        "/v3/cluster/member/update" => cluster.member_update,
        "/v3/cluster/member/list" => cluster.member_list,
        "/v3/cluster/member/promote" => cluster.member_promote,
    );
    let r = unary!(r, s,
        "/v3/maintenance/alarm" => maintenance.alarm,
        "/v3/maintenance/status" => maintenance.status,
        "/v3/maintenance/defragment" => maintenance.defragment,
        "/v3/maintenance/hash" => maintenance.hash,
        "/v3/maintenance/transfer-leadership" => maintenance.move_leader,
        "/v3/maintenance/downgrade" => maintenance.downgrade,
        "/v3/auth/enable" => auth.auth_enable,
        "/v3/auth/disable" => auth.auth_disable,
        "/v3/auth/status" => auth.auth_status,
        "/v3/auth/authenticate" => auth.authenticate,
        "/v3/auth/user/add" => auth.user_add,
        "/v3/auth/user/get" => auth.user_get,
        "/v3/auth/user/list" => auth.user_list,
        "/v3/auth/user/delete" => auth.user_delete,
        "/v3/auth/user/changepw" => auth.user_change_password,
        "/v3/auth/user/grant" => auth.user_grant_role,
        "/v3/auth/user/revoke" => auth.user_revoke_role,
    );
    unary!(r, s,
        "/v3/auth/role/add" => auth.role_add,
        "/v3/auth/role/get" => auth.role_get,
        "/v3/auth/role/list" => auth.role_list,
        "/v3/auth/role/delete" => auth.role_delete,
        "/v3/auth/role/grant" => auth.role_grant_permission,
        "/v3/auth/role/revoke" => auth.role_revoke_permission,
        "/v3/lock/lock" => lock.lock,
        "/v3/lock/unlock" => lock.unlock,
        "/v3/election/campaign" => election.campaign,
        "/v3/election/proclaim" => election.proclaim,
        "/v3/election/leader" => election.leader,
        "/v3/election/resign" => election.resign,
    )
}

/// One call: the request from `body` (empty: every field its default), its answer as JSON.
async fn call<Req, Resp, Fut>(body: &[u8], f: impl FnOnce(Req) -> Fut) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        Req::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return failed(&Status::invalid_argument(e.to_string())),
        }
    };
    match f(req).await {
        Ok(resp) => match serde_json::to_vec(resp.get_ref()) {
            Ok(json) => answer(StatusCode::OK, json),
            Err(e) => failed(&Status::internal(e.to_string())),
        },
        Err(status) => failed(&status),
    }
}

async fn method_not_allowed() -> Response {
    super::http::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n".into())
}

fn answer(status: StatusCode, json: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A failed call as grpc-gateway answers it, its fields in the same order.
#[derive(Serialize)]
struct Failure<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

fn failed(status: &Status) -> Response {
    let body = Failure { error: status.message(), message: status.message(), code: status.code() as i32 };
    answer(http_status(status.code()), serde_json::to_vec(&body).unwrap_or_default())
}

/// grpc-gateway's HTTP status for a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

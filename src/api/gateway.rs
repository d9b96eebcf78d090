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
//! `{"error":…,"message":…,"code":…}`. Each unary call goes to the same service the gRPC
//! route serves, in the same process, and is counted in the gRPC metrics as the call of
//! that method it stands for (a body that is not JSON makes no call), as etcd counts its
//! gateway's: a gRPC client of its own member. The streaming calls (`/v3/watch`,
//! `/v3/lease/keepalive`, `/v3/maintenance/snapshot`, `/v3/election/observe`) go through
//! the gRPC routes themselves, counted there: the JSON requests
//! of the body (one or more) go in as gRPC messages, and each message that comes back
//! goes out as a line, `{"result":…}`, for as long as the HTTP client stays.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use bytes::{Buf, BufMut, BytesMut};
use futures::StreamExt as _;
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tonic::{Code, Status};
use tower::ServiceExt as _;

use super::auth::AuthService;
use super::cluster::ClusterService;
use super::election::ElectionService;
use super::kv::KvService;
use super::lease::{LeaseService, Lessor};
use super::lock::LockService;
use super::maintenance::MaintenanceService;
use super::metrics::{MethodCalls, Metrics};
use super::Ctx;
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::kv_server::Kv;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, SnapshotRequest, SnapshotResponse, WatchRequest, WatchResponse,
};
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3electionpb::{LeaderRequest, LeaderResponse};
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

/// Routes `$path` to `$service.$method`, through JSON, counted as a call of the gRPC
/// method of that name.
macro_rules! unary {
    ($router:expr, $services:expr, $metrics:expr, $($path:literal => $service:ident.$method:ident),+ $(,)?) => {{
        let mut r = $router;
        $(
            let s = $services.clone();
            let calls = method_calls($metrics, stringify!($method));
            let handler = move |headers: HeaderMap, body: Bytes| {
                let (s, calls) = (s.clone(), calls.clone());
                async move {
                    call(&body, &calls, |req| async move { s.$service.$method(with_token(req, &headers)).await }).await
                }
            };
            r = r.route($path, post(handler).fallback(method_not_allowed));
        )+
        r
    }};
}

/// Which way a streaming call streams.
#[derive(Clone, Copy, PartialEq)]
enum Streams {
    /// The client's requests stay open while its HTTP client stays: etcd's Watch goes on
    /// after its client's side ends, so the gateway's watch does.
    Both,
    /// The requests, then the client's side ends, as etcd's gateway ends it with the
    /// HTTP body: the server answers each and ends (keep-alive), or streams its answers
    /// to the one request (snapshot, observe; the server takes the request only then).
    Answers,
}

/// Routes `$path` to the gRPC method `$grpc` of `$routes`, streaming `$way`.
macro_rules! streaming {
    ($router:expr, $routes:expr, $($path:literal => $grpc:literal: $req:ty => $resp:ty, $way:expr);+ $(;)?) => {{
        let mut r = $router;
        $(
            let routes = $routes.clone();
            let handler = move |headers: HeaderMap, body: Bytes| {
                stream::<$req, $resp>(routes.clone(), $grpc, $way, headers, body)
            };
            r = r.route($path, post(handler).fallback(method_not_allowed));
        )+
        r
    }};
}

/// The gateway's routes: every call of etcd's services under its `/v3/…` path (etcd
/// 3.4's older lease paths under `/v3/kv/lease/…` too); the streaming ones go through
/// `grpc`, the routes of the gRPC services.
pub fn router(
    ctx: Ctx,
    lessor: Arc<Lessor>,
    election_timeout: Duration,
    bcrypt_cost: u32,
    grpc: axum::Router,
    metrics: &Metrics,
) -> axum::Router {
    let s = Arc::new(Services {
        kv: KvService::new(ctx.clone()),
        lease: LeaseService::new(ctx.clone(), lessor, election_timeout),
        cluster: ClusterService::new(ctx.clone()),
        maintenance: MaintenanceService::new(ctx.clone()),
        auth: AuthService::new(ctx.clone(), bcrypt_cost),
        lock: LockService::new(ctx.clone()),
        election: ElectionService::new(ctx),
    });
    let r = unary!(axum::Router::new(), s, metrics,
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
    let r = unary!(r, s, metrics,
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
    let r = streaming!(r, grpc,
        "/v3/watch" => "/etcdserverpb.Watch/Watch": WatchRequest => WatchResponse, Streams::Both;
        "/v3/lease/keepalive" => "/etcdserverpb.Lease/LeaseKeepAlive": LeaseKeepAliveRequest => LeaseKeepAliveResponse,
            Streams::Answers;
        "/v3/maintenance/snapshot" => "/etcdserverpb.Maintenance/Snapshot": SnapshotRequest => SnapshotResponse,
            Streams::Answers;
        "/v3/election/observe" => "/v3electionpb.Election/Observe": LeaderRequest => LeaderResponse, Streams::Answers;
    );
    unary!(r, s, metrics,
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

/// A call's message with the token of the HTTP request's `Authorization` header, as
/// etcd's gateway passes it on.
fn with_token<T>(msg: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        r.metadata_mut().insert("token", token);
    }
    r
}

/// The counters of the gRPC method a service method is named for in Rust
/// ("user_change_password": UserChangePassword).
fn method_calls(metrics: &Metrics, method: &str) -> MethodCalls {
    let name: String = method
        .split('_')
        .flat_map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase()).into_iter().chain(c)
        })
        .collect();
    metrics.method_calls(&name).unwrap_or_else(|| panic!("{method} is not a method of the protos"))
}

/// One call: the request from `body` (empty: every field its default), its answer as JSON;
/// counted as a call of `calls`' method once the request is read.
async fn call<Req, Resp, Fut>(body: &[u8], calls: &MethodCalls, f: impl FnOnce(Req) -> Fut) -> Response
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
    let counting = calls.start();
    let answer = f(req).await;
    counting.finish_with(answer.as_ref().map_or_else(Status::code, |_| Code::Ok));
    match answer {
        Ok(resp) => match serde_json::to_vec(resp.get_ref()) {
            Ok(json) => super::http::json(StatusCode::OK, json),
            Err(e) => failed(&Status::internal(e.to_string())),
        },
        Err(status) => failed(&status),
    }
}

/// A streaming call through `grpc`: the requests in `body`, the answers as they come.
async fn stream<Req, Resp>(
    grpc: axum::Router,
    path: &'static str,
    way: Streams,
    headers: HeaderMap,
    body: Bytes,
) -> Response
where
    Req: DeserializeOwned + prost::Message,
    Resp: Serialize + prost::Message + Default + 'static,
{
    let mut frames = Vec::new();
    for req in serde_json::Deserializer::from_slice(&body).into_iter::<Req>() {
        match req {
            Ok(req) => frames.push(grpc_frame(&req)),
            Err(e) => return failed(&Status::invalid_argument(e.to_string())),
        }
    }
    // The requests, then nothing until the HTTP client goes: its answer's stream holds
    // `left`, and once that is dropped the call's request stream fails, which ends the call.
    // A call that streams answers only ends its requests at once.
    let (left, gone) = oneshot::channel::<()>();
    let requests = futures::stream::iter(frames.into_iter().map(|f| Ok(Frame::data(f))));
    let requests = if way == Streams::Both {
        requests
            .chain(futures::stream::once(async move {
                let _ = gone.await;
                Err(std::io::Error::other("the gateway's client went"))
            }))
            .boxed()
    } else {
        requests.boxed()
    };
    let mut call = axum::http::Request::new(Body::new(StreamBody::new(requests)));
    *call.method_mut() = axum::http::Method::POST;
    *call.uri_mut() = axum::http::Uri::from_static(path);
    call.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    call.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(token) = headers.get(header::AUTHORIZATION) {
        call.headers_mut().insert("token", token.clone());
    }
    let answer = match grpc.oneshot(call).await {
        Ok(answer) => answer,
        Err(never) => match never {},
    };
    if let Some(status) = Status::from_header_map(answer.headers()).filter(|s| s.code() != Code::Ok) {
        return failed(&status);
    }
    let lines = futures::stream::unfold(
        (answer.into_body(), BytesMut::new(), Some(left)),
        |(mut body, mut buf, left)| async move {
            left.as_ref()?;
            loop {
                if let Some(msg) = take_grpc_message(&mut buf) {
                    let line = match Resp::decode(msg) {
                        Ok(resp) => result_line(&resp),
                        Err(e) => error_line(&Status::internal(e.to_string())),
                    };
                    return Some((Ok::<_, std::io::Error>(line), (body, buf, left)));
                }
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => buf.extend_from_slice(&data),
                        Err(frame) => {
                            let status = frame.trailers_ref().and_then(Status::from_header_map);
                            let end = status.filter(|s| s.code() != Code::Ok).map(|s| error_line(&s));
                            return end.map(|line| (Ok(line), (body, buf, None)));
                        }
                    },
                    Some(Err(e)) => return Some((Ok(error_line(&Status::internal(e.to_string()))), (body, buf, None))),
                    None => return None,
                }
            }
        },
    );
    super::http::json(StatusCode::OK, Body::from_stream(lines))
}

/// `msg` as a gRPC message frame: not compressed, its length, its bytes.
fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    msg.encode(&mut out).expect("room reserved");
    out.freeze()
}

/// The first whole gRPC message in `buf`, taken out of it.
fn take_grpc_message(buf: &mut BytesMut) -> Option<Bytes> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

/// One answer of a stream, as grpc-gateway writes it: `{"result":…}` and a newline.
fn result_line(resp: &impl Serialize) -> Bytes {
    #[derive(Serialize)]
    struct Result<'a, T> {
        result: &'a T,
    }
    let mut line = serde_json::to_vec(&Result { result: resp }).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

/// A stream's failure, as grpc-gateway writes it.
fn error_line(status: &Status) -> Bytes {
    let http = http_status(status.code());
    let body = serde_json::json!({ "error": {
        "grpc_code": status.code() as i32,
        "http_code": http.as_u16(),
        "message": status.message(),
        "http_status": http.canonical_reason().unwrap_or_default(),
    }});
    let mut line = body.to_string().into_bytes();
    line.push(b'\n');
    line.into()
}

async fn method_not_allowed() -> Response {
    super::http::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n".into())
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
    super::http::json(http_status(status.code()), serde_json::to_vec(&body).unwrap_or_default())
}

/// grpc-gateway's HTTP status for a gRPC code, as etcd's gateway (grpc-gateway v1) maps them.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
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

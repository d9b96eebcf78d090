//! The member's plain HTTP endpoints, served beside gRPC on every client URL (HTTP/1.1
//! or HTTP/2) and alone on `--listen-metrics-urls`, as etcd serves them:
//!
//! - `/health`: `{"health":"true","reason":""}`, or 503 with `"false"` and why: an alarm
//!   (`?exclude=NOSPACE` passes over one), no leader (unless `?serializable=true`), or a
//!   read that fails or times out.
//! - `/livez` (a serializable read) and `/readyz` (no CORRUPT alarm, a serializable and
//!   a linearizable read, not a learner): `ok`, or 503 with each check's outcome; `?verbose` lists the checks,
//!   `?exclude=NAME` skips one, `/livez/NAME` runs one alone.
//! - `/version`: `{"etcdserver":…,"etcdcluster":…}`.
//! - `/metrics`: Prometheus' text format, under etcd's metric names.
//!
//! Anything else gets 404, except gRPC requests (by their content type), which get
//! gRPC's own "unimplemented".

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::{any, MethodRouter};

use super::metrics::Metrics;
use super::Ctx;
use crate::pb::etcdserverpb::{AlarmType, RangeRequest};

/// A check of `/livez` or `/readyz`, by its name in etcd.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    DataCorruption,
    SerializableRead,
    LinearizableRead,
    NonLearner,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
            Check::NonLearner => "non_learner",
        }
    }
}

const LIVEZ: &[Check] = &[Check::SerializableRead];
const READYZ: &[Check] = &[Check::DataCorruption, Check::SerializableRead, Check::LinearizableRead, Check::NonLearner];

/// The plain endpoints of one member, shared by every listener that serves them.
pub struct Http {
    ctx: Ctx,
    metrics: Arc<Metrics>,
}

impl Http {
    pub fn new(ctx: Ctx, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { ctx, metrics })
    }

    /// The endpoints' routes; what none of them matches goes to the router's fallback
    /// ([`not_found`] where nothing else is served).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        let mut r = axum::Router::new()
            .route("/health", handle(self, |ep, req| async move { ep.health(&req).await }))
            .route("/version", handle(self, |ep, _| async move { ep.version() }))
            .route("/metrics", handle(self, |ep, _| async move { ep.metrics() }));
        for (path, checks) in [("/livez", LIVEZ), ("/readyz", READYZ)] {
            r = r.route(path, handle(self, move |ep, req| async move { ep.probe(&req, path, checks).await }));
            for &check in checks {
                let one = move |ep: Arc<Http>, req: Parts| async move { ep.probe(&req, path, &[check]).await };
                r = r.route(&format!("{path}/{}", check.name()), handle(self, one));
            }
        }
        r
    }
}

/// Any method: the endpoints answer the ones they refuse themselves, as etcd does.
fn handle<F, Fut>(ep: &Arc<Http>, f: F) -> MethodRouter
where
    F: Fn(Arc<Http>, Parts) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let ep = ep.clone();
    any(move |req: Request| f(ep.clone(), req.into_parts().0))
}

/// What matches no route: 404, or gRPC's "unimplemented" to a gRPC request.
pub async fn not_found(req: Request) -> Response {
    let grpc = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let (parts, ()) = tonic::Status::unimplemented("").into_http::<()>().into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    text(StatusCode::NOT_FOUND, "404 page not found\n".into())
}

/// A plain-text answer, as Go's `http.Error` writes it.
pub(super) fn text(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// A JSON answer.
pub(super) fn json(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn method_not_allowed() -> Response {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n".into());
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    resp
}

/// The values of the query parameter `name`, decoded where they need it.
fn query<'a>(req: &'a Parts, name: &'a str) -> impl Iterator<Item = String> + 'a {
    req.uri.query().unwrap_or("").split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn has_query(req: &Parts, name: &str) -> bool {
    query(req, name).next().is_some()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Http {
    /// A read of one key, as the checks of etcd's health endpoints make.
    async fn read(&self, serializable: bool) -> Result<(), String> {
        if !serializable {
            self.ctx.raft.read_index().await.map_err(|e| tonic::Status::from(e).message().to_string())?;
        }
        let req = RangeRequest { key: "health".into(), keys_only: true, limit: 1, ..Default::default() };
        self.ctx.store.range(&req).map(|_| ()).map_err(|e| tonic::Status::from(e).message().to_string())
    }

    async fn health(&self, req: &Parts) -> Response {
        if req.method != Method::GET {
            return method_not_allowed();
        }
        let serializable = query(req, "serializable").any(|v| v == "true");
        let excluded: Vec<String> = query(req, "exclude").collect();
        let alarm = self.ctx.store.alarms(AlarmType::None).into_iter().find_map(|a| {
            let name = AlarmType::try_from(a.alarm).map_or("UNKNOWN", |t| t.as_str_name());
            (!excluded.iter().any(|e| e == name)).then_some(name)
        });
        let reason = if let Some(name) = alarm {
            Some(format!("ALARM {name}"))
        } else if !serializable && self.ctx.raft.status().leader() == 0 {
            Some("RAFT NO LEADER".to_string())
        } else {
            self.read(serializable).await.err().map(|e| format!("RANGE ERROR:{e}"))
        };
        let healthy = reason.is_none();
        let body = serde_json::json!({ "health": healthy.to_string(), "reason": reason.unwrap_or_default() });
        if healthy {
            self.metrics.health_success.inc();
            text(StatusCode::OK, body.to_string())
        } else {
            self.metrics.health_failures.inc();
            tracing::warn!(answer = %body, "serving /health false");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{body}\n"))
        }
    }

    /// `/livez` or `/readyz` (`path`), running `checks` less those excluded.
    async fn probe(&self, req: &Parts, path: &str, checks: &[Check]) -> Response {
        if req.method != Method::GET {
            return method_not_allowed();
        }
        let excluded: Vec<String> = query(req, "exclude").collect();
        let mut report = String::new();
        let mut failed = false;
        for &check in checks.iter().filter(|c| !excluded.iter().any(|e| e == c.name())) {
            let outcome = match check {
                Check::DataCorruption => match self.ctx.store.alarms(AlarmType::Corrupt).is_empty() {
                    true => Ok(()),
                    false => Err("alarm activated: CORRUPT".to_string()),
                },
                Check::SerializableRead => self.read(true).await,
                Check::LinearizableRead => self.read(false).await,
                Check::NonLearner => match self.ctx.raft.status().is_learner() {
                    false => Ok(()),
                    true => Err("not supported for learner".to_string()),
                },
            };
            match outcome {
                Ok(()) => report.push_str(&format!("[+]{} ok\n", check.name())),
                Err(e) => {
                    failed = true;
                    report.push_str(&format!("[-]{} failed: {e}\n", check.name()));
                }
            }
        }
        if failed {
            tracing::warn!(path, report = %report.trim_end(), "health check failed");
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("{report}\n"));
        }
        if !has_query(req, "verbose") {
            report.clear();
        }
        text(StatusCode::OK, format!("{report}ok\n"))
    }

    fn version(&self) -> Response {
        let v = crate::ETCD_COMPAT_VERSION;
        let cluster = v.rsplit_once('.').map_or(v, |(minor, _)| minor);
        json(StatusCode::OK, serde_json::json!({ "etcdserver": v, "etcdcluster": format!("{cluster}.0") }).to_string())
    }

    fn metrics(&self) -> Response {
        match self.metrics.exposition(&self.ctx) {
            Ok((content_type, buf)) => {
                let mut resp = Response::new(Body::from(buf));
                if let Ok(v) = HeaderValue::from_str(content_type) {
                    resp.headers_mut().insert(header::CONTENT_TYPE, v);
                }
                resp
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the metrics: {e}\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Parts {
        axum::http::Request::builder().uri(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn query_values_are_found_by_name_and_decoded() {
        let req = parts("/readyz?verbose&exclude=linearizable%5Fread&exclude=a+b&excluded=no");
        assert_eq!(query(&req, "exclude").collect::<Vec<_>>(), ["linearizable_read", "a b"]);
        assert!(has_query(&req, "verbose"));
        assert!(!has_query(&req, "serializable"));
        assert_eq!(percent_decode("%4"), "%4", "a cut escape stays as it is");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }
}

//! etcd's access control of the plain-HTTP requests on the client URLs (the JSON gateway
//! and the plain endpoints; gRPC requests pass by it, as they pass by etcd's):
//!
//! - `--host-whitelist`: a request that did not come over TLS must name one of these
//!   hosts in its `Host` (or HTTP/2 `:authority`), or it is answered 421 Misdirected
//!   Request. This stops a web page from reaching a member on a private address
//!   through a DNS name it controls (DNS rebinding, CVE-2018-5702).
//! - `--cors`: the origins a browser's scripts may call from. Every answer carries etcd's
//!   CORS headers, `Access-Control-Allow-Origin: *` when any origin may (the default),
//!   or the request's `Origin` when it is one of those listed. A preflight (`OPTIONS`)
//!   is answered 200 on any path.
//! - A gateway request (`/v3/…`) over TLS whose client certificate names a user (its
//!   common name) is refused 400 while authentication is on with `--client-cert-auth`:
//!   etcd's gateway does not take a certificate's name as its user, and meshkv's does
//!   not pretend to. Such a client sends a token.
//!
//! The gateway's older prefix, `/v3beta/`, is served as `/v3/` ([`v3beta`]).

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Version};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower::ServiceExt as _;

use super::http::text;
use crate::store::MvccStore;
use crate::tls::ClientInfo;

/// A list of etcd's `--cors` or `--host-whitelist`: any, when it is empty or holds `*`.
#[derive(Clone, Debug)]
struct Allowed(Option<HashSet<String>>);

impl Allowed {
    fn new(list: &[String]) -> Self {
        let names: HashSet<String> =
            list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).map(String::from).collect();
        Allowed((!names.is_empty() && !names.contains("*")).then_some(names))
    }

    fn any(&self) -> bool {
        self.0.is_none()
    }

    fn admits(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|names| names.contains(name))
    }
}

/// The access rules of one member's client URLs.
#[derive(Clone)]
pub struct Access {
    origins: Allowed,
    hosts: Allowed,
    /// Whether client certificates name users (`--client-cert-auth`).
    client_cert_auth: bool,
    store: Arc<MvccStore>,
}

impl Access {
    pub fn new(cors: &[String], host_whitelist: &[String], client_cert_auth: bool, store: Arc<MvccStore>) -> Self {
        Access { origins: Allowed::new(cors), hosts: Allowed::new(host_whitelist), client_cert_auth, store }
    }

    /// `router` with these rules in front of each of its routes and its fallback.
    pub fn guard(&self, router: axum::Router) -> axum::Router {
        whole_bodies(router.layer(middleware::from_fn_with_state(Arc::new(self.clone()), check)))
    }
}

/// Most a plain HTTP/2 request's body is read up to before its answer; the gateway takes
/// less (axum's 2 MiB) and answers beyond that itself.
const WHOLE_BODY_LIMIT: usize = 4 << 20;

/// `router` with each plain HTTP/2 request's body read whole before it is answered. An
/// endpoint that needs no body (`/health`, a 404) drops it unread, and HTTP/2 then
/// resets the stream the client is still sending on, often before the answer leaves:
/// curl, for one, reports a stream error rather than the answer. HTTP/1.1 has no such
/// stream, and gRPC's calls read their own.
pub fn whole_bodies(router: axum::Router) -> axum::Router {
    router.layer(middleware::from_fn(read_whole))
}

async fn read_whole(req: Request, next: Next) -> Response {
    if req.version() != Version::HTTP_2 || is_grpc(&req) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, WHOLE_BODY_LIMIT).await {
        Ok(whole) => next.run(Request::from_parts(parts, Body::from(whole))).await,
        Err(e) if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) => {
            let why = "Failed to buffer the request body: length limit exceeded\n";
            text(StatusCode::PAYLOAD_TOO_LARGE, why.into())
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "the request's body broke off\n".into()),
    }
}

async fn check(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    if is_grpc(&req) {
        return next.run(req).await;
    }
    let client = req.extensions().get::<ClientInfo>();
    let tls = client.is_some_and(|c| c.tls);
    if !tls {
        let host = hostname(authority(&req));
        if !access.hosts.admits(host) {
            tracing::warn!(host, "refused a plain-HTTP request naming a host not in --host-whitelist");
            return text(StatusCode::MISDIRECTED_REQUEST, misdirected(host));
        }
    } else if access.client_cert_auth
        && ["/v3/", "/v3beta/"].iter().any(|p| req.uri().path().starts_with(p))
        && client.and_then(|c| c.cert_name.as_deref()).is_some_and(|n| !n.is_empty())
        && access.store.auth_enabled()
    {
        let why = "CommonName of client sending a request against gateway will be ignored and not used as expected\n";
        return text(StatusCode::BAD_REQUEST, why.into());
    }
    let origin = if access.origins.any() {
        Some(HeaderValue::from_static("*"))
    } else {
        req.headers().get(header::ORIGIN).filter(|o| o.to_str().is_ok_and(|o| access.origins.admits(o))).cloned()
    };
    let mut resp = if req.method() == Method::OPTIONS { Response::new(Body::empty()) } else { next.run(req).await };
    if let Some(origin) = origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"));
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("accept, content-type, authorization"));
    }
    resp
}

/// A gRPC request, which etcd hands to its gRPC server before any of these checks: HTTP/2
/// with gRPC's content type. (A browser's page speaks HTTP/1.1 to a plain-HTTP URL; the
/// content type alone lets it pass nothing.)
fn is_grpc(req: &Request) -> bool {
    req.version() == Version::HTTP_2
        && req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The host and port the request names: HTTP/2's `:authority`, or HTTP/1.1's `Host`.
fn authority(req: &Request) -> &str {
    match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""),
    }
}

/// The host of `host[:port]`, as Go's `net.SplitHostPort` finds it (brackets of an IPv6
/// address dropped); the whole of what it cannot split.
fn hostname(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once("]:") {
            Some((host, _)) if !host.contains(']') => host,
            _ => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => authority,
    }
}

fn misdirected(host: &str) -> String {
    format!(
        "\nmeshkv received your request, but the Host header was unrecognized.\n\n\
         To fix this, choose one of the following options:\n\
         - Enable TLS, then any HTTPS request will be allowed.\n\
         - Add the hostname you want to use to the whitelist in settings.\n  \
         - e.g. meshkv --host-whitelist {host:?}\n\n\
         This requirement has been added to help prevent \"DNS Rebinding\" attacks (CVE-2018-5702).\n\n"
    )
}

/// `router`'s `/v3/…` routes under etcd's older prefix too, `/v3beta/…`, as etcd
/// 3.4 serves them.
pub fn v3beta(router: axum::Router) -> axum::Router {
    let v3 = router.clone().fallback(super::http::not_found);
    router.route(
        "/v3beta/{*rest}",
        axum::routing::any(move |mut req: Request| {
            let v3 = v3.clone();
            async move {
                let path = req.uri().path_and_query().map_or("", |p| p.as_str());
                let moved = format!("/v3/{}", path.strip_prefix("/v3beta/").unwrap_or(path));
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = moved.parse().ok();
                if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
                v3.oneshot(req).await.unwrap_or_else(|e| match e {})
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_found_as_go_finds_it() {
        assert_eq!(hostname("example.com:2379"), "example.com");
        assert_eq!(hostname("example.com"), "example.com");
        assert_eq!(hostname("127.0.0.1:2379"), "127.0.0.1");
        assert_eq!(hostname("[::1]:2379"), "::1");
        assert_eq!(hostname("[::1]"), "[::1]");
        assert_eq!(hostname("::1"), "::1");
        assert_eq!(hostname(""), "");
    }

    #[test]
    fn an_empty_list_or_a_star_admits_anyone() {
        let list = |l: &[&str]| Allowed::new(&l.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(list(&[]).any() && list(&[""]).any() && list(&["a", "*"]).any());
        let some = list(&["localhost", " example.com "]);
        assert!(!some.any());
        assert!(some.admits("localhost") && some.admits("example.com"));
        assert!(!some.admits("127.0.0.1") && !some.admits(""));
    }
}

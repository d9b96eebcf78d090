//! The member's Prometheus metrics, under etcd's names: the Raft driver's counters and
//! timings, gauges read from the member's state at each scrape, the health checks'
//! counts, the process' own, and every gRPC call by method and outcome (etcd's
//! `grpc_server_started_total` and `grpc_server_handled_total`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use super::Ctx;

/// The member's metrics: the Raft driver's own counters and timings, and gauges read from
/// the member's state at each scrape.
pub struct Metrics {
    registry: Registry,
    has_leader: IntGauge,
    is_leader: IntGauge,
    is_learner: IntGauge,
    committed: IntGauge,
    applied: IntGauge,
    db_size: IntGauge,
    keys: IntGauge,
    revision: IntGauge,
    compact_revision: IntGauge,
    leases: IntGauge,
    cluster_version: IntGauge,
    pub health_success: IntCounter,
    pub health_failures: IntCounter,
    /// Watch streams open now (gRPC and the gateway's).
    pub watch_streams: IntGauge,
    grpc: Arc<GrpcCounters>,
}

impl Metrics {
    pub fn new(ctx: &Ctx) -> Arc<Self> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("a valid metric name");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid metric name");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        // Labelled once, with a value of 1, as etcd's.
        let labelled = |name: &str, help: &str, label: &str, value: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("a valid metric name");
            g.with_label_values(&[value]).set(1);
            registry.register(Box::new(g)).expect("registered once");
        };
        labelled(
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
            "server_id",
            &format!("{:x}", ctx.id.member_id),
        );
        labelled(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version.",
            "server_version",
            crate::ETCD_COMPAT_VERSION,
        );
        let raft = &ctx.raft.status().metrics;
        for c in [raft.leader_changes.clone(), raft.proposals_failed.clone(), raft.proposals_retried.clone()] {
            registry.register(Box::new(c)).expect("registered once");
        }
        for h in [raft.wal_fsync.clone(), raft.backend_commit.clone()] {
            registry.register(Box::new(h)).expect("registered once");
        }
        // Set once, as etcd sets it (and not at all without a quota).
        if let Some(limit) = ctx.quota.limit() {
            gauge("etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes.").set(limit as i64);
        }
        let grpc = Arc::new(GrpcCounters::new(&registry));
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("registered once");
        Arc::new(Self {
            has_leader: gauge("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not."),
            is_leader: gauge("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise."),
            is_learner: gauge(
                "etcd_server_is_learner",
                "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            ),
            committed: gauge(
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
            ),
            applied: gauge("etcd_server_proposals_applied_total", "The total number of consensus proposals applied."),
            db_size: gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            keys: gauge("etcd_debugging_mvcc_keys_total", "Total number of keys."),
            revision: gauge("etcd_debugging_mvcc_current_revision", "The current revision of store."),
            compact_revision: gauge(
                "etcd_debugging_mvcc_compact_revision",
                "The revision of the last compaction in store.",
            ),
            leases: gauge("etcd_debugging_lease_total", "The number of leases granted and not yet revoked or expired."),
            cluster_version: gauge(
                "meshkv_cluster_version",
                "The mesh protocol every member speaks, which entries may use (0: none raised yet).",
            ),
            health_success: counter("etcd_server_health_success", "The total number of successful health checks"),
            health_failures: counter("etcd_server_health_failures", "The total number of failed health checks"),
            watch_streams: gauge("etcd_debugging_mvcc_watch_stream_total", "Total number of watch streams."),
            grpc,
            registry,
        })
    }

    /// The text exposition after a refresh: its content type and bytes.
    pub fn exposition(&self, ctx: &Ctx) -> Result<(&'static str, Vec<u8>), prometheus::Error> {
        self.refresh(ctx);
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok((prometheus::TEXT_FORMAT, buf))
    }

    /// A layer for the gRPC routes that counts each call as it starts and as it ends,
    /// and logs a unary call that takes longer than `warn_unary` to answer (zero: none),
    /// as etcd's --warning-unary-request-duration.
    pub fn grpc_layer(&self, warn_unary: Duration) -> GrpcLayer {
        GrpcLayer(self.grpc.clone(), warn_unary)
    }

    /// The counters of the gRPC method grpc-go names `method` ("Put"), for calls that reach
    /// its service without passing the gRPC routes (the JSON gateway's); no two of etcd's
    /// services have a method of the same name.
    pub fn method_calls(&self, method: &str) -> Option<MethodCalls> {
        let path = GRPC_METHODS.iter().find(|m| m.2 == method)?.0;
        self.grpc.methods.get(path).cloned().map(MethodCalls)
    }

    fn refresh(&self, ctx: &Ctx) {
        let raft = ctx.raft.status();
        let leader = raft.leader();
        self.has_leader.set(i64::from(leader != 0));
        self.is_leader.set(i64::from(leader != 0 && leader == ctx.id.member_id));
        self.is_learner.set(i64::from(raft.is_learner()));
        self.committed.set(raft.commit_index() as i64);
        self.applied.set(ctx.store.applied_index() as i64);
        self.db_size.set(ctx.store.engine().size_bytes() as i64);
        self.keys.set(ctx.store.key_count() as i64);
        self.revision.set(ctx.store.revision());
        self.compact_revision.set(ctx.store.compact_revision().max(0));
        self.leases.set(ctx.store.leases().len() as i64);
        self.cluster_version.set(i64::from(ctx.store.cluster_version()));
    }
}

include!(concat!(env!("OUT_DIR"), "/grpc_methods.rs"));

/// One method's counters, made ahead (at zero, as etcd's are) so that a call only finds
/// them: by its path, among the methods the protos declare; other paths are not counted.
struct MethodCounters {
    started: IntCounter,
    handled: [IntCounter; CODES.len()],
    /// The method's path, when it is unary (its answer is one message).
    unary: Option<&'static str>,
}

struct GrpcCounters {
    methods: HashMap<&'static str, Arc<MethodCounters>>,
}

impl GrpcCounters {
    fn new(registry: &Registry) -> Self {
        let started = IntCounterVec::new(
            Opts::new("grpc_server_started_total", "Total number of RPCs started on the server."),
            &["grpc_type", "grpc_service", "grpc_method"],
        )
        .expect("a valid metric name");
        let handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        )
        .expect("a valid metric name");
        let methods = GRPC_METHODS
            .iter()
            .map(|&(path, service, method, kind)| {
                let counters = MethodCounters {
                    started: started.with_label_values(&[kind, service, method]),
                    handled: CODES.map(|code| handled.with_label_values(&[kind, service, method, code])),
                    unary: (kind == "unary").then_some(path),
                };
                (path, Arc::new(counters))
            })
            .collect();
        registry.register(Box::new(started)).expect("registered once");
        registry.register(Box::new(handled)).expect("registered once");
        Self { methods }
    }
}

/// gRPC's status codes by number, as grpc-go names them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// One method's counters, for counting its calls one by one.
#[derive(Clone)]
pub struct MethodCalls(Arc<MethodCounters>);

impl MethodCalls {
    /// A call of the method, counted as started.
    pub fn start(&self) -> Call {
        self.0.started.inc();
        Call(Some(self.0.clone()))
    }
}

/// One call being counted, until its status is known; dropped before it is, counted as
/// Canceled (its client went), as grpc-go counts it.
pub struct Call(Option<Arc<MethodCounters>>);

impl Call {
    /// The call of a request to `path`, counted as started, if it is a known method.
    fn start(counters: &GrpcCounters, path: &str) -> Option<Call> {
        counters.methods.get(path).map(|m| MethodCalls(m.clone()).start())
    }

    /// The method's path, if it is unary.
    fn unary(&self) -> Option<&'static str> {
        self.0.as_ref()?.unary
    }

    /// Counts the call handled with `code` (an index into [`CODES`]), if it is not yet.
    fn handled(&mut self, code: usize) {
        if let Some(c) = self.0.take().as_ref().and_then(|m| m.handled.get(code)) {
            c.inc();
        }
    }

    /// Counts the call handled with `code`.
    pub fn finish_with(mut self, code: tonic::Code) {
        self.handled(code_index(i32::from(code)));
    }

    /// The code in `headers`' `grpc-status`, if they carry one.
    fn code_in(headers: &axum::http::HeaderMap) -> Option<usize> {
        let n: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        Some(code_index(n))
    }

    /// Counts the call handled when its status is known: at once when the response's
    /// headers carry it (a call that failed before answering), else from the trailers
    /// its body ends with.
    fn finish(mut self, resp: Response) -> Response {
        if let Some(code) = Self::code_in(resp.headers()) {
            self.handled(code);
            return resp;
        }
        resp.map(|inner| Body::new(Counted { inner, call: self }))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.handled[CANCELED].inc();
        }
    }
}

/// The index into [`CODES`] of gRPC's status code `n`; Unknown for a code it has not.
fn code_index(n: i32) -> usize {
    usize::try_from(n).ok().filter(|&i| i < CODES.len()).unwrap_or(UNKNOWN)
}

/// A response body that counts its call once its trailers pass (or, should it end or
/// be dropped without them, as grpc-go would: Unknown, or Canceled by the client).
struct Counted {
    inner: Body,
    call: Call,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(Call::code_in) {
                    self.call.handled(code);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.call.handled(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts every gRPC call of the routes it wraps, and logs slow unary ones.
#[derive(Clone)]
pub struct GrpcLayer(Arc<GrpcCounters>, Duration);

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = CountGrpc<S>;

    fn layer(&self, inner: S) -> CountGrpc<S> {
        CountGrpc { inner, counters: self.0.clone(), warn_unary: self.1 }
    }
}

#[derive(Clone)]
pub struct CountGrpc<S> {
    inner: S,
    counters: Arc<GrpcCounters>,
    warn_unary: Duration,
}

impl<S> tower::Service<Request> for CountGrpc<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // A handler dropped before it answers (its client reset the call, or went) is
        // counted as Canceled by the call's drop, as grpc-go's handler would return it.
        let call = Call::start(&self.counters, req.uri().path());
        let warn = self.warn_unary;
        let timed = call.as_ref().and_then(Call::unary).filter(|_| !warn.is_zero()).map(|m| (m, Instant::now()));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            if let Some((method, at)) = timed {
                let took = at.elapsed();
                if took > warn {
                    tracing::warn!(method, ?took, expected_duration = ?warn, "request stats: a unary request took too long");
                }
            }
            Ok(match call {
                Some(call) => call.finish(resp),
                None => resp,
            })
        })
    }
}

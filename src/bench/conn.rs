//! The load generator's gRPC connections: an HTTP/2 connection whose request handle is
//! called by the clients directly.
//!
//! tonic's `Channel` puts a queue and a task in front of the connection, so each request
//! wakes one more task, and the connection writes each request as it reaches it: one
//! system call per request. Here the clients hand their requests to the connection's own
//! handle, and the connection (through [`Coalesced`]) writes what its clients sent in the
//! same turn together, as etcd's Go client does. The load generator then spends less of
//! the machine it shares with the server.
//!
//! [`Shards`] go further: each connection lives on one of a few threads, each running a
//! single-threaded runtime, with the clients that use it. A request and its answer then
//! never pass between threads (no wake of another thread, no contention on the
//! connection's lock), which costs the shared machine less and adds less to the
//! latencies measured.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response, Uri};

use crate::api::conn::Coalesced;
use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::lease_client::LeaseClient;

/// One HTTP/2 connection to an endpoint; clones share it.
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Body>,
    origin: Uri,
    /// An auth token sent with every request, as etcd's clients send theirs.
    token: Option<tonic::codegen::http::HeaderValue>,
}

pub type ConnError = anyhow::Error;

impl Conn {
    /// Connects to `endpoint` (`host:port` or `http://host:port`).
    pub async fn connect(endpoint: &str) -> Result<Conn, ConnError> {
        let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let origin: Uri = url.parse()?;
        let host = origin
            .host()
            .ok_or_else(|| anyhow::anyhow!("endpoint {endpoint}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host, origin.port_u16().unwrap_or(2379))).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) =
            http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(Coalesced::new(tcp))).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "bench connection closed");
            }
        });
        Ok(Conn { send, origin, token: None })
    }

    /// Signs in as `user` with `password`; every request on this connection (and its
    /// clones) then carries the token.
    pub async fn sign_in(&mut self, user: &str, password: &str) -> Result<(), ConnError> {
        let mut auth = crate::pb::etcdserverpb::auth_client::AuthClient::with_origin(self.clone(), self.origin.clone());
        let req = crate::pb::etcdserverpb::AuthenticateRequest { name: user.into(), password: password.into() };
        let token = auth.authenticate(req).await?.into_inner().token;
        self.token = Some(token.parse()?);
        Ok(())
    }

    pub fn kv(&self) -> KvClient<Conn> {
        KvClient::with_origin(self.clone(), self.origin.clone())
    }

    pub fn lease(&self) -> LeaseClient<Conn> {
        LeaseClient::with_origin(self.clone(), self.origin.clone())
    }

    /// A bare gRPC client on this connection, for calls with a codec of their own.
    pub fn grpc(&self) -> tonic::client::Grpc<Conn> {
        tonic::client::Grpc::with_origin(self.clone(), self.origin.clone())
    }
}

impl tower::Service<Request<Body>> for Conn {
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if let Some(t) = &self.token {
            req.headers_mut().insert("token", t.clone());
        }
        Box::pin(self.send.send_request(req))
    }
}

/// Threads that each run a single-threaded runtime; connection `i` and its clients go to
/// thread `i` modulo their number. The threads end when this is dropped.
pub struct Shards {
    handles: Vec<Handle>,
    _stop: Vec<oneshot::Sender<()>>,
}

impl Shards {
    /// One thread per core, but no more than there are connections.
    pub fn new(conns: usize) -> std::io::Result<Shards> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n = conns.clamp(1, cores);
        let (mut handles, mut stops) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new().name(format!("bench-{i}")).spawn(move || {
                let _ = rt.block_on(stopped);
            })?;
        }
        Ok(Shards { handles, _stop: stops })
    }

    /// The runtime of connection `i` and of the clients that use it.
    pub fn of_conn(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Connects `conns` connections spread over the endpoints, each on its thread.
    /// With `user` (`name:password`), each connection signs in first.
    pub async fn connect(
        &self,
        endpoints: &[String],
        conns: usize,
        user: Option<&str>,
    ) -> Result<Vec<Conn>, ConnError> {
        let mut out = Vec::with_capacity(conns.max(1));
        for i in 0..conns.max(1) {
            let ep = endpoints[i % endpoints.len()].clone();
            let user = user.map(|u| u.split_once(':').unwrap_or((u, "")));
            let user = user.map(|(n, p)| (n.to_string(), p.to_string()));
            let conn = async move {
                let mut c = Conn::connect(&ep).await?;
                if let Some((name, password)) = user {
                    c.sign_in(&name, &password).await?;
                }
                Ok::<_, ConnError>(c)
            };
            out.push(self.of_conn(i).spawn(conn).await??);
        }
        Ok(out)
    }
}

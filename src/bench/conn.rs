//! The load generator's gRPC connections: an HTTP/2 connection whose request handle is
//! called by the clients directly.
//!
//! tonic's `Channel` puts a queue and a task in front of the connection, so each request
//! wakes one more task, and the connection writes each request as it reaches it: one
//! system call per request. Here the clients hand their requests to the HTTP/2
//! connection's own handle (h2's, with no dispatch task of hyper's between), and the
//! connection (through [`Coalesced`]) writes what its clients sent in the same turn
//! together, as etcd's Go client does. The load generator then spends less of the
//! machine it shares with the server.
//!
//! A unary call's one message is handed to its stream at once, ending it, when its body
//! has it ready; only a body still streaming (a watch, keep-alives) gets a task that
//! forwards what follows.
//!
//! [`Shards`] go further: each connection lives on one of a few threads, each running a
//! single-threaded runtime, with the clients that use it. A request and its answer then
//! never pass between threads (no wake of another thread, no contention on the
//! connection's lock), which costs the shared machine less and adds less to the
//! latencies measured.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response, Uri};

use crate::api::conn::Coalesced;
use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::lease_client::LeaseClient;

/// Flow-control windows as hyper's client sets them: a watch's events are not held back
/// waiting for the client's window updates.
const STREAM_WINDOW_BYTES: u32 = 2 << 20;
const CONN_WINDOW_BYTES: u32 = 5 << 20;

/// One HTTP/2 connection to an endpoint; clones share it.
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Bytes>,
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
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONN_WINDOW_BYTES)
            .handshake(Coalesced::new(tcp))
            .await?;
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
    type Response = Response<Incoming>;
    type Error = ConnError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (mut parts, mut body) = req.into_parts();
        if let Some(t) = &self.token {
            parts.headers.insert("token", t.clone());
        }
        let mut send = self.send.clone();
        Box::pin(async move {
            // What the body has ready now goes with the request; a body that ends there
            // (a unary call's) ends the stream with it.
            let mut ready = Vec::new();
            let ended = loop {
                match body.frame().now_or_never() {
                    Some(None) => break true,
                    Some(Some(frame)) => ready.push(frame.map_err(|e| anyhow::anyhow!("request body: {e}"))?),
                    None => break false,
                }
            };
            let head = Request::from_parts(parts, ());
            let (response, mut stream) = send.send_request(head, ended && ready.is_empty())?;
            let count = ready.len();
            for (i, frame) in ready.into_iter().enumerate() {
                send_frame(&mut stream, frame, ended && i + 1 == count)?;
            }
            if !ended {
                tokio::spawn(forward(body, stream));
            }
            Ok(response.await?.map(Incoming))
        })
    }
}

/// Hands one frame of a request body to its stream.
fn send_frame(stream: &mut SendStream<Bytes>, frame: Frame<Bytes>, end: bool) -> Result<(), h2::Error> {
    match frame.into_data() {
        Ok(data) => stream.send_data(data, end),
        Err(frame) => match frame.into_trailers() {
            Ok(trailers) => stream.send_trailers(trailers),
            Err(_) => Ok(()),
        },
    }
}

/// Forwards the rest of a streaming request body, then ends the stream.
async fn forward(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if send_frame(&mut stream, frame, false).is_err() {
                    return;
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "bench request body failed");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
        }
    }
}

/// A response body read from its HTTP/2 stream, giving the window back as it is read.
pub struct Incoming(RecvStream);

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let recv = &mut self.0;
        if !recv.is_end_stream() {
            match recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        match recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
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

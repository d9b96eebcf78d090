//! The KV service's unary calls, routed by hand rather than through tonic's generated
//! server.
//!
//! Range, Put, DeleteRange, Txn and Compact are most of what clients send. tonic's path
//! for one of them boxes the request body into a decoding stream, the answer into a
//! one-message stream and an encoding body, and builds the trailers from a status; here
//! the request's message is read from the body's frames and decoded once, the answer is
//! encoded once into a single DATA frame, gRPC's prefix included, and the trailers are
//! the fixed OK status. The wire is the same: the same path, size limit, compression
//! refusal and error statuses (worded as tonic words them), and the service's own
//! `Kv` methods answer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prost::Message;
use tonic::codegen::{http, StdError};
use tonic::server::NamedService;
use tonic::Status;

use super::kv::KvService;
use super::watch_wire::identity_only;
use crate::pb::etcdserverpb::kv_server::Kv;

/// A gRPC message's prefix: the compressed flag and the length.
const PREFIX_BYTES: usize = 5;

/// The KV service as the router takes it.
#[derive(Clone)]
pub struct KvServer {
    service: Arc<KvService>,
    max_decoding_message_size: usize,
}

impl KvServer {
    pub fn new(service: KvService, max_decoding_message_size: usize) -> Self {
        Self { service: Arc::new(service), max_decoding_message_size }
    }
}

impl NamedService for KvServer {
    const NAME: &'static str = "etcdserverpb.KV";
}

type Answer = http::Response<tonic::body::Body>;

impl<B> tower::Service<http::Request<B>> for KvServer
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let kv = self.service.clone();
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/etcdserverpb.KV/Range" => unary(req, limit, |r| kv.range(r)).await,
                "/etcdserverpb.KV/Put" => unary(req, limit, |r| kv.put(r)).await,
                "/etcdserverpb.KV/DeleteRange" => unary(req, limit, |r| kv.delete_range(r)).await,
                "/etcdserverpb.KV/Txn" => unary(req, limit, |r| kv.txn(r)).await,
                "/etcdserverpb.KV/Compact" => unary(req, limit, |r| kv.compact(r)).await,
                _ => Status::unimplemented("").into_http(),
            })
        })
    }
}

/// One unary call: the request's message read and decoded, `call` answered, its answer
/// encoded; an error at any step answers with its status alone, as tonic answers it.
async fn unary<B, Req, Resp, F, Fut>(req: http::Request<B>, limit: usize, call: F) -> Answer
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    if let Err(status) = identity_only(req.headers()) {
        return status.into_http();
    }
    let (parts, body) = req.into_parts();
    let message = match read_message(body, limit).await {
        Ok(m) => m,
        Err(status) => return status.into_http(),
    };
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    match call(request).await {
        Ok(resp) => {
            let (metadata, message, extensions) = resp.into_parts();
            let mut answer = http::Response::new(tonic::body::Body::new(OneMessage::new(&message)));
            *answer.headers_mut() = metadata.into_headers();
            *answer.extensions_mut() = extensions;
            answer.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            answer
        }
        Err(status) => status.into_http(),
    }
}

/// Reads a request body to its end and decodes its message, checking what tonic's
/// decoder checks, with its words: the compressed flag, the size limit, a body cut
/// short, a body with no message. Messages after the first are decoded and dropped,
/// as tonic drops them.
async fn read_message<B, M>(body: B, limit: usize) -> Result<M, Status>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
    M: Message + Default,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    let mut first = None;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.put(data);
                    while let Some(m) = next_message::<M>(&mut buf, limit)? {
                        first.get_or_insert(m);
                    }
                }
            }
            Some(Err(e)) => {
                let status = Status::from_error(e.into());
                // A client that cancels its request leaves what it sent, as tonic reads it.
                if status.code() == tonic::Code::Cancelled {
                    break;
                }
                return Err(status);
            }
            None => break,
        }
    }
    if !buf.is_empty() {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    first.ok_or_else(|| Status::internal("Missing request message."))
}

/// Takes one whole message off the front of `buf`, if it holds one.
fn next_message<M: Message + Default>(buf: &mut BytesMut, limit: usize) -> Result<Option<M>, Status> {
    if buf.len() < PREFIX_BYTES {
        return Ok(None);
    }
    match buf[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
            )))
        }
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > limit {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {limit} bytes"
        )));
    }
    if buf.len() < PREFIX_BYTES + len {
        return Ok(None);
    }
    buf.advance(PREFIX_BYTES);
    // Its own bytes: the message's byte fields are slices of them, and keep no more
    // alive than the message.
    let bytes = buf.split_to(len).freeze();
    M::decode(bytes).map(Some).map_err(|e| Status::internal(e.to_string()))
}

/// A unary answer's body: its message as one DATA frame, then the OK status.
struct OneMessage {
    data: Option<Bytes>,
    ended: bool,
}

impl OneMessage {
    fn new(message: &impl Message) -> Self {
        let len = message.encoded_len();
        let mut buf = BytesMut::with_capacity(PREFIX_BYTES + len);
        buf.put_u8(0);
        buf.put_u32(len as u32);
        message.encode_raw(&mut buf);
        Self { data: Some(buf.freeze()), ended: false }
    }
}

impl Body for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::PutRequest;
    use http_body_util::{Full, StreamBody};

    fn framed(message: &impl Message) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
        out.extend_from_slice(&message.encode_to_vec());
        out
    }

    async fn read(chunks: Vec<Vec<u8>>, limit: usize) -> Result<PutRequest, Status> {
        let frames = chunks.into_iter().map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        read_message(StreamBody::new(futures::stream::iter(frames)), limit).await
    }

    /// A message is read whole however the body's frames cut it.
    #[tokio::test]
    async fn a_message_is_read_across_frames() {
        let put =
            PutRequest { key: Bytes::from_static(b"k"), value: Bytes::from(vec![7u8; 300]), ..Default::default() };
        let wire = framed(&put);
        for cut in [1, 3, 5, 6, wire.len() - 1] {
            let (a, b) = wire.split_at(cut);
            assert_eq!(read(vec![a.to_vec(), b.to_vec()], 1 << 20).await.expect("read"), put, "cut at {cut}");
        }
        let got: PutRequest = read_message(Full::new(Bytes::from(wire.clone())), 1 << 20).await.expect("one frame");
        assert_eq!(got, put);
    }

    /// What tonic's own decoder answers for the same body.
    async fn tonic_reads(chunks: Vec<Vec<u8>>, limit: usize) -> Result<Option<PutRequest>, Status> {
        let frames = chunks.into_iter().map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        let body = StreamBody::new(futures::stream::iter(frames));
        let decoder = tonic_prost::ProstDecoder::<PutRequest>::default();
        let mut stream = tonic::Streaming::new_request(decoder, body, None, Some(limit));
        let first = stream.message().await?;
        while stream.message().await?.is_some() {}
        Ok(first)
    }

    /// Bad bodies get the statuses tonic's decoder gives them, in its words.
    #[tokio::test]
    async fn bad_bodies_are_refused_as_tonic_refuses_them() {
        let put =
            PutRequest { key: Bytes::from_static(b"k"), value: Bytes::from(vec![7u8; 300]), ..Default::default() };
        let wire = framed(&put);
        let mut compressed = wire.clone();
        compressed[0] = 1;
        let mut bad_flag = wire.clone();
        bad_flag[0] = 7;
        let mut garbage = vec![0u8, 0, 0, 0, 2];
        garbage.extend_from_slice(&[0xff, 0xff]);
        let mut second_bad = wire.clone();
        second_bad.extend_from_slice(&garbage);
        let cases: Vec<(&str, Vec<Vec<u8>>, usize)> = vec![
            ("too large", vec![wire.clone()], 100),
            ("cut short", vec![wire[..wire.len() - 1].to_vec()], 1 << 20),
            ("prefix cut short", vec![wire[..3].to_vec()], 1 << 20),
            ("compressed", vec![compressed], 1 << 20),
            ("bad flag", vec![bad_flag], 1 << 20),
            ("undecodable", vec![garbage], 1 << 20),
            ("a bad second message", vec![second_bad], 1 << 20),
        ];
        for (what, chunks, limit) in cases {
            let ours = read(chunks.clone(), limit).await.expect_err(what);
            let theirs = tonic_reads(chunks, limit).await.expect_err(what);
            assert_eq!((ours.code(), ours.message()), (theirs.code(), theirs.message()), "{what}");
        }
        // tonic's unary server words an empty body itself.
        assert_eq!(tonic_reads(vec![], 1 << 20).await.expect("no error"), None);
        let err = read(vec![], 1 << 20).await.expect_err("empty");
        assert_eq!((err.code(), err.message()), (tonic::Code::Internal, "Missing request message."));
    }

    /// The answer is one gRPC message, then the OK status, then the end.
    #[tokio::test]
    async fn the_answer_is_one_message_then_an_ok_status() {
        let put = PutRequest { key: Bytes::from_static(b"k"), ..Default::default() };
        let mut body = OneMessage::new(&put);
        let data = body.frame().await.expect("a frame").expect("no error").into_data().expect("data");
        assert_eq!(data.as_ref(), framed(&put).as_slice());
        let trailers = body.frame().await.expect("a frame").expect("no error").into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }
}

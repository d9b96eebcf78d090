//! How watch responses reach the wire.
//!
//! A put seen by a thousand watchers is a thousand responses that differ only in their
//! watch id. Each event is encoded once, by the first stream that needs it, and the
//! same bytes go into every response of every stream that carries it; a response is
//! then a copy of a few encoded parts, not a protobuf message built and encoded again
//! per watcher. A stream's responses to one batch share one allocation: each names its
//! events by a range in it.
//!
//! The Watch service is routed here by hand rather than through tonic's generated
//! server: the same path and limits, requests read as prost reads them, and a response
//! body of its own that writes the responses waiting on a stream straight into one DATA
//! frame, gRPC's message prefixes included, and ends with tonic's OK trailers.

use std::convert::Infallible;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::{http, StdError};
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};

use super::watch::WatchService;
use crate::pb::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use crate::store::watch::EventBatch;

/// The gRPC path of etcd's one watch method.
const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";
/// Field numbers in etcd's WatchResponse.
const HEADER_FIELD: u32 = 1;
const WATCH_ID_FIELD: u32 = 2;
const EVENTS_FIELD: u32 = 11;

/// One response for the client.
pub enum Outgoing {
    /// Built as a message (created, canceled, progress, fragments, previous values).
    Message(WatchResponse),
    /// Events for one watcher from parts encoded once for the batch: its `picks` in
    /// the batch's [`SharedEvents`].
    Events { shared: Arc<SharedEvents>, watch_id: i64, picks: Range<usize> },
}

impl Outgoing {
    /// The response's protobuf encoding.
    fn write(&self, dst: &mut impl BufMut) {
        match self {
            Outgoing::Message(m) => m.encode_raw(dst),
            Outgoing::Events { shared, watch_id, picks } => {
                dst.put_slice(&shared.header);
                if *watch_id != 0 {
                    prost::encoding::int64::encode(WATCH_ID_FIELD, watch_id, dst);
                }
                for &i in &shared.picks[picks.clone()] {
                    let event = shared.batch.encoded(i);
                    prost::encoding::encode_key(EVENTS_FIELD, prost::encoding::WireType::LengthDelimited, dst);
                    prost::encoding::encode_varint(event.len() as u64, dst);
                    dst.put_slice(event);
                }
            }
        }
    }

    /// The length of [`Self::write`]'s bytes.
    fn encoded_len(&self) -> usize {
        use prost::encoding::{encoded_len_varint, key_len};
        match self {
            Outgoing::Message(m) => m.encoded_len(),
            Outgoing::Events { shared, watch_id, picks } => {
                let id = if *watch_id != 0 { prost::encoding::int64::encoded_len(WATCH_ID_FIELD, watch_id) } else { 0 };
                let events: usize = shared.picks[picks.clone()]
                    .iter()
                    .map(|&i| {
                        let n = shared.batch.encoded(i).len();
                        key_len(EVENTS_FIELD) + encoded_len_varint(n as u64) + n
                    })
                    .sum();
                shared.header.len() + id + events
            }
        }
    }

    /// About the bytes the response holds apart from what it shares with others.
    pub fn size(&self) -> usize {
        match self {
            Outgoing::Message(m) => m.encoded_len(),
            Outgoing::Events { picks, .. } => 16 + 8 * picks.len(),
        }
    }
}

impl From<WatchResponse> for Outgoing {
    fn from(r: WatchResponse) -> Self {
        Outgoing::Message(r)
    }
}

/// What a batch's plain responses on one stream carry: the header, as WatchResponse
/// field 1, and the batch's events they take.
pub struct SharedEvents {
    header: Bytes,
    batch: Arc<EventBatch>,
    /// The events of every response, one response's after another's, by index.
    picks: Vec<usize>,
}

/// Gathers a batch's plain responses: [`Self::take`] each response's events, then
/// [`Self::finish`] once to share them.
pub struct SharedEventsBuilder {
    batch: Arc<EventBatch>,
    picks: Vec<usize>,
}

impl SharedEventsBuilder {
    /// `picks`: about how many events the responses will take in all.
    pub fn new(batch: Arc<EventBatch>, picks: usize) -> Self {
        Self { batch, picks: Vec::with_capacity(picks) }
    }

    /// Adds the events at `indices` as one response's; returns its picks.
    pub fn take(&mut self, indices: impl Iterator<Item = usize>) -> Range<usize> {
        let from = self.picks.len();
        for i in indices {
            // Encoded here, on the stream's task, rather than while the writer waits.
            self.batch.encoded(i);
            self.picks.push(i);
        }
        from..self.picks.len()
    }

    /// `header`: as made by [`SharedHeader::encoded`].
    pub fn finish(self, header: Bytes) -> Arc<SharedEvents> {
        Arc::new(SharedEvents { header, batch: self.batch, picks: self.picks })
    }
}

/// The header of the newest batch's responses as WatchResponse field 1, encoded by the
/// first stream that sends one and copied by the others.
#[derive(Default)]
pub struct SharedHeader(std::sync::Mutex<Option<(ResponseHeader, Bytes)>>);

impl SharedHeader {
    pub fn encoded(&self, header: ResponseHeader) -> Bytes {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((h, b)) if *h == header => b.clone(),
            _ => {
                let mut b = BytesMut::with_capacity(header.encoded_len() + 2);
                prost::encoding::message::encode(HEADER_FIELD, &header, &mut b);
                let b = b.freeze();
                *last = Some((header, b.clone()));
                b
            }
        }
    }
}

/// Bytes gathered from waiting runs before they leave as one DATA frame.
const FRAME_BYTES: usize = 32 << 10;

/// The response body of one watch stream. Its task sends responses in runs; the runs
/// that are ready leave together as one DATA frame of gRPC messages, written straight
/// from their parts, and the body ends with an OK status in its trailers once the task
/// is gone, as tonic's own body would end it.
pub struct OutgoingBody {
    rx: mpsc::Receiver<Vec<Outgoing>>,
    ended: bool,
}

impl OutgoingBody {
    pub fn new(rx: mpsc::Receiver<Vec<Outgoing>>) -> Self {
        Self { rx, ended: false }
    }
}

/// Appends `resp` as one gRPC message: not compressed, its length, its bytes.
fn put_message(resp: &Outgoing, buf: &mut BytesMut) {
    let at = buf.len();
    buf.put_bytes(0, 5);
    resp.write(buf);
    let len = (buf.len() - at - 5) as u32;
    buf[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut buf = BytesMut::new();
        while buf.len() < FRAME_BYTES {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(run)) => {
                    buf.reserve(run.iter().map(|r| r.encoded_len() + 5).sum());
                    for resp in &run {
                        put_message(resp, &mut buf);
                    }
                }
                // What was gathered leaves first; the next poll sees the end again.
                Poll::Ready(None) if buf.is_empty() => {
                    self.ended = true;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(None) => break,
                Poll::Pending if buf.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(Frame::data(buf.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The Watch service as the router takes it.
#[derive(Clone)]
pub struct WatchServer {
    service: Arc<WatchService>,
    max_decoding_message_size: usize,
}

impl WatchServer {
    pub fn new(service: WatchService, max_decoding_message_size: usize) -> Self {
        Self { service: Arc::new(service), max_decoding_message_size }
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "etcdserverpb.Watch";
}

/// What tonic's server answers to a request in a compression it does not take: this
/// member takes none.
pub(super) fn identity_only(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(()),
        Some(other) => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(other)
            ));
            status
                .metadata_mut()
                .insert("grpc-accept-encoding", tonic::metadata::MetadataValue::from_static("identity"));
            Err(status)
        }
    }
}

impl<B> tower::Service<http::Request<B>> for WatchServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    /// As tonic's streaming server does it, with the body above in place of tonic's.
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return std::future::ready(Ok(Status::unimplemented("").into_http()));
        }
        if let Err(status) = identity_only(req.headers()) {
            return std::future::ready(Ok(status.into_http()));
        }
        let limit = self.max_decoding_message_size;
        let request = Request::from_http(req.map(|body| {
            Streaming::new_request(tonic_prost::ProstDecoder::<WatchRequest>::default(), body, None, Some(limit))
        }));
        let credentials = super::auth::Credentials::of(&request);
        let rx = self.service.open(request.into_inner(), credentials);
        let mut resp = http::Response::new(tonic::body::Body::new(OutgoingBody::new(rx)));
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::mvccpb::KeyValue;
    use crate::store::watch::{delete_event, put_event};

    /// The parts, put together, are the message prost would have written.
    #[test]
    fn shared_parts_read_back_as_the_response() {
        let events = vec![
            put_event(KeyValue {
                key: Bytes::from_static(b"a"),
                value: Bytes::from(vec![7u8; 300]),
                create_revision: 2,
                mod_revision: 5,
                version: 3,
                lease: 0,
            }),
            delete_event(Bytes::from_static(b"b"), 6),
        ];
        let header = ResponseHeader { cluster_id: 1, member_id: 2, revision: 6, raft_term: 3 };
        let batch = Arc::new(EventBatch::new(5, 6, Some(events.clone())));
        let mut builder = SharedEventsBuilder::new(batch, 12);
        let ids = [0i64, 1, -1, i64::MAX];
        let picks: Vec<_> = ids.iter().map(|_| builder.take([0, 1, 0].into_iter())).collect();
        let shared = builder.finish(SharedHeader::default().encoded(header));
        for (watch_id, picks) in ids.into_iter().zip(picks) {
            let out = Outgoing::Events { shared: shared.clone(), watch_id, picks };
            let mut written = BytesMut::new();
            out.write(&mut written);
            assert_eq!(out.encoded_len(), written.len());
            let back = WatchResponse::decode(written.freeze()).expect("decodes");
            let want = WatchResponse {
                header: Some(header),
                watch_id,
                events: vec![events[0].clone(), events[1].clone(), events[0].clone()],
                ..Default::default()
            };
            assert_eq!(back, want);
        }
    }

    /// The shared header is the newest one asked for, whichever stream asks.
    #[test]
    fn the_shared_header_follows_the_newest_batch() {
        let shared = SharedHeader::default();
        let at = |revision| ResponseHeader { cluster_id: 1, member_id: 2, revision, raft_term: 3 };
        let decode = |b: Bytes| WatchResponse::decode(b).expect("decodes").header;
        let first = shared.encoded(at(5));
        assert_eq!(shared.encoded(at(5)).as_ptr(), first.as_ptr(), "encoded once");
        assert_eq!(decode(first), Some(at(5)));
        assert_eq!(decode(shared.encoded(at(6))), Some(at(6)));
        assert_eq!(decode(shared.encoded(ResponseHeader { raft_term: 4, ..at(6) })).map(|h| h.raft_term), Some(4));
    }

    /// Reads gRPC messages back from the body's data: flag 0, big-endian length, bytes.
    fn messages(mut data: &[u8]) -> Vec<WatchResponse> {
        let mut out = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0, "never compressed");
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            out.push(WatchResponse::decode(&data[5..5 + len]).expect("decodes"));
            data = &data[5 + len..];
        }
        out
    }

    /// Waiting runs leave together, as gRPC messages in the order they were sent; with
    /// nothing waiting the body waits; once the stream's task is gone the body ends with
    /// an OK status, as tonic's would.
    #[tokio::test]
    async fn runs_leave_as_grpc_messages_in_order_then_an_ok_status() {
        use http_body_util::BodyExt;
        let (tx, rx) = mpsc::channel(4);
        let mut body = OutgoingBody::new(rx);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending(), "nothing sent yet");

        let resp = |id| Outgoing::Message(WatchResponse { watch_id: id, ..Default::default() });
        let event = put_event(KeyValue { key: Bytes::from_static(b"k"), mod_revision: 4, ..Default::default() });
        let batch = Arc::new(EventBatch::new(4, 4, Some(vec![event.clone()])));
        let mut builder = SharedEventsBuilder::new(batch, 1);
        let picks = builder.take([0].into_iter());
        let header = ResponseHeader { revision: 4, ..Default::default() };
        let shared = builder.finish(SharedHeader::default().encoded(header));
        tx.send(vec![resp(1), Outgoing::Events { shared, watch_id: 2, picks }]).await.unwrap();
        tx.send(vec![]).await.unwrap();
        tx.send(vec![resp(3)]).await.unwrap();
        let first = body.frame().await.expect("a frame").expect("no error").into_data().expect("data");
        let got = messages(&first);
        assert_eq!(got.iter().map(|m| m.watch_id).collect::<Vec<_>>(), vec![1, 2, 3], "one frame, in order");
        assert_eq!(got[1].events, vec![event]);
        assert_eq!(got[1].header, Some(header));

        tx.send(vec![resp(4)]).await.unwrap();
        drop(tx);
        let second = body.frame().await.expect("a frame").expect("no error").into_data().expect("data");
        assert_eq!(messages(&second).iter().map(|m| m.watch_id).collect::<Vec<_>>(), vec![4]);
        let trailers = body.frame().await.expect("a frame").expect("no error").into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    /// A request in a compression this member does not take is refused as tonic refuses
    /// it; identity, or none named, is taken.
    #[test]
    fn only_uncompressed_requests_are_taken() {
        let mut h = http::HeaderMap::new();
        assert!(identity_only(&h).is_ok());
        h.insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        assert!(identity_only(&h).is_ok());
        h.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let status = identity_only(&h).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(status.message(), "Content is compressed with `gzip` which isn't supported");
    }
}

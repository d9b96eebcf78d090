//! How watch responses reach the wire.
//!
//! A put seen by a thousand watchers is a thousand responses that differ only in their
//! watch id. Each event is encoded once, by the first stream that needs it, and the
//! same bytes go into every response of every stream that carries it; a response is
//! then a copy of a few encoded parts, not a protobuf message built and encoded again
//! per watcher. A stream's responses to one batch share one allocation: each names its
//! events by a range in it.
//!
//! tonic's generated server fixes the codec to prost's, so the Watch service is routed
//! here by hand: the same path and limits, with a codec that writes either kind of
//! response and reads requests as prost does.

use std::convert::Infallible;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

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

/// The responses of one watch stream: the stream's task sends them in runs, and they
/// leave one by one for the codec, which writes those that are ready into one frame.
pub struct OutgoingStream {
    rx: mpsc::Receiver<Vec<Outgoing>>,
    run: std::vec::IntoIter<Outgoing>,
}

impl OutgoingStream {
    pub fn new(rx: mpsc::Receiver<Vec<Outgoing>>) -> Self {
        Self { rx, run: Vec::new().into_iter() }
    }
}

impl Stream for OutgoingStream {
    type Item = Result<Outgoing, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(resp) = self.run.next() {
                return Poll::Ready(Some(Ok(resp)));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(run) => self.run = run.into_iter(),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Writes both kinds of response; reads WatchRequests.
#[derive(Default)]
pub struct WatchCodec;

pub struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(dst);
        Ok(())
    }
}

impl Codec for WatchCodec {
    type Encode = Outgoing;
    type Decode = WatchRequest;
    type Encoder = OutgoingEncoder;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
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

struct Call(Arc<WatchService>);

impl StreamingService<WatchRequest> for Call {
    type Response = Outgoing;
    type ResponseStream = OutgoingStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<WatchRequest>>) -> Self::Future {
        let service = self.0.clone();
        let credentials = super::auth::Credentials::of(&request);
        Box::pin(async move { Ok(Response::new(service.open(request.into_inner(), credentials))) })
    }
}

impl<B> tower::Service<http::Request<B>> for WatchServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let call = Call(self.service.clone());
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(WatchCodec).apply_max_message_size_config(Some(limit), None);
            Ok(grpc.streaming(call, req).await)
        })
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

    /// Runs leave as single responses, in the order they were sent, and the stream ends
    /// when its task is gone.
    #[tokio::test]
    async fn runs_leave_one_response_at_a_time_in_order() {
        use tokio_stream::StreamExt;
        let (tx, rx) = mpsc::channel(4);
        let mut out = OutgoingStream::new(rx);
        let resp = |id| Outgoing::Message(WatchResponse { watch_id: id, ..Default::default() });
        tx.send(vec![resp(1), resp(2), resp(3)]).await.unwrap();
        tx.send(vec![]).await.unwrap();
        tx.send(vec![resp(4)]).await.unwrap();
        drop(tx);
        let mut ids = Vec::new();
        while let Some(item) = out.next().await {
            match item.expect("no error") {
                Outgoing::Message(m) => ids.push(m.watch_id),
                Outgoing::Events { .. } => panic!("only messages were sent"),
            }
        }
        assert_eq!(ids, vec![1, 2, 3, 4]);
    }
}

//! The mesh wire format, pure: [`Msg`] ↔ protobuf frames, and the framing of the
//! decrypted byte stream (`u32` big-endian length, then the frame). Every length is
//! checked before it is trusted; bad input is an error, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use super::node::Msg;
use super::peer::{PeerInfo, PeerName};
use crate::pb::meshkvpb::{frame, Broadcast, Frame, Gossip, Heartbeat, PeerEntry, Topology, Unicast};

/// Largest frame accepted from a peer.
pub const MAX_FRAME: usize = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("frame without a body")]
    Empty,
}

/// A decoded frame: a mesh message, or a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Heartbeat,
    Msg(Msg),
}

fn entry(p: &PeerInfo) -> PeerEntry {
    PeerEntry {
        name: p.name.to_string(),
        uid: p.uid,
        nickname: p.nickname.clone(),
        version: p.version,
        addr: p.addr.clone(),
        conns: p.conns.keys().map(|c| c.to_string()).collect(),
    }
}

fn info(e: PeerEntry) -> PeerInfo {
    PeerInfo {
        name: PeerName::from(e.name),
        uid: e.uid,
        nickname: e.nickname,
        version: e.version,
        addr: e.addr,
        conns: e.conns.into_iter().map(|c| (PeerName::from(c), ())).collect(),
    }
}

/// Encodes a message as a length-prefixed frame.
pub fn encode(m: &Msg) -> Bytes {
    let body = match m {
        Msg::Topology(ps) => frame::Body::Topology(Topology { peers: ps.iter().map(entry).collect() }),
        Msg::Gossip { channel, payload } => {
            frame::Body::Gossip(Gossip { channel: channel.clone(), payload: payload.clone() })
        }
        Msg::Broadcast { channel, src, payload } => frame::Body::Broadcast(Broadcast {
            channel: channel.clone(),
            src: src.to_string(),
            payload: payload.clone(),
        }),
        Msg::Unicast { src, dst, hops, bulk, payload } => frame::Body::Unicast(Unicast {
            src: src.to_string(),
            dst: dst.to_string(),
            hops: u32::from(*hops),
            bulk: *bulk,
            payload: payload.clone(),
        }),
    };
    encode_frame(&Frame { body: Some(body) })
}

/// A heartbeat frame.
pub fn heartbeat() -> Bytes {
    encode_frame(&Frame { body: Some(frame::Body::Heartbeat(Heartbeat {})) })
}

pub fn encode_frame(f: &impl Message) -> Bytes {
    let len = f.encoded_len();
    let mut b = BytesMut::with_capacity(4 + len);
    b.put_u32(len as u32);
    f.encode(&mut b).expect("BytesMut grows as needed");
    b.freeze()
}

/// Decodes one frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Incoming, WireError> {
    let f = Frame::decode(body).map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(match f.body.ok_or(WireError::Empty)? {
        frame::Body::Heartbeat(_) => Incoming::Heartbeat,
        frame::Body::Topology(t) => Incoming::Msg(Msg::Topology(t.peers.into_iter().map(info).collect())),
        frame::Body::Gossip(g) => Incoming::Msg(Msg::Gossip { channel: g.channel, payload: g.payload }),
        frame::Body::Broadcast(b) => {
            Incoming::Msg(Msg::Broadcast { channel: b.channel, src: PeerName::from(b.src), payload: b.payload })
        }
        frame::Body::Unicast(u) => Incoming::Msg(Msg::Unicast {
            src: PeerName::from(u.src),
            dst: PeerName::from(u.dst),
            hops: u8::try_from(u.hops).unwrap_or(u8::MAX),
            bulk: u.bulk,
            payload: u.payload,
        }),
    })
}

/// Splits a byte stream into frames.
#[derive(Default)]
pub struct Framer {
    buf: BytesMut,
}

impl Framer {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let mut p = PeerInfo::new("a", 9);
        p.conns.insert(PeerName::from("b"), ());
        p.addr = "127.0.0.1:1".into();
        let msgs = vec![
            Msg::Topology(vec![p]),
            Msg::Gossip { channel: "c".into(), payload: Bytes::from_static(b"x") },
            Msg::Broadcast { channel: "c".into(), src: "a".into(), payload: Bytes::from_static(b"y") },
            Msg::Unicast { src: "a".into(), dst: "b".into(), hops: 3, bulk: true, payload: Bytes::from_static(b"z") },
        ];
        let mut f = Framer::default();
        for m in &msgs {
            f.push(&encode(m));
        }
        f.push(&heartbeat());
        for m in msgs {
            assert_eq!(decode(&f.next_frame().unwrap().unwrap()).unwrap(), Incoming::Msg(m));
        }
        assert_eq!(decode(&f.next_frame().unwrap().unwrap()).unwrap(), Incoming::Heartbeat);
        assert_eq!(f.next_frame().unwrap(), None);
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut f = Framer::default();
        f.push(&u32::MAX.to_be_bytes());
        assert_eq!(f.next_frame(), Err(WireError::TooLarge(u32::MAX as usize)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut f = Framer::default();
            for c in chunks {
                f.push(&c);
                while let Ok(Some(frame)) = f.next_frame() {
                    let _ = decode(&frame);
                }
            }
        }

        #[test]
        fn truncated_frames_never_decode_wrongly(cut in 0usize..40) {
            let m = Msg::Unicast { src: "src".into(), dst: "dst".into(), hops: 1, bulk: false, payload: Bytes::from_static(b"payload!") };
            let full = encode(&m);
            let cut = cut.min(full.len() - 1);
            let mut f = Framer::default();
            f.push(&full[..cut]);
            prop_assert_eq!(f.next_frame(), Ok(None));
        }
    }
}

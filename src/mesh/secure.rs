//! The encrypted channel between two peers: a Noise `NNpsk0` handshake keyed by the
//! cluster secret, then AES-256-GCM over chunks of at most 64 KiB, each sent as
//! `u16` big-endian length + ciphertext.
//!
//! With `psk0` the very first handshake message is authenticated by the secret: a
//! responder that does not share it fails to decrypt that message and closes the
//! connection without answering, and an initiator that does not share it receives
//! nothing. Either way the stranger learns nothing about the mesh. After the handshake
//! both ends send an encrypted [`Hello`] (protocol version, cluster, name, UID).

use std::sync::Arc;

use blake2::{Blake2s256, Digest};
use bytes::Bytes;
use prost::Message;
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{encode_frame, Framer, WireError};
use crate::pb::meshkvpb::Hello;

/// 2: AES-256-GCM (hardware AES on every x86-64 and ARMv8 server) instead of ChaCha20.
/// 3: Raft entries may be bound to a leader's term (`InternalRequest.leader_term`); a
/// member of version 2 would apply what the others drop, and their stores would differ.
///
/// A version that changes what Raft entries carry uses the change only once the cluster
/// version (`InternalRequest.cluster_version`, raised by the leader once every member
/// speaks it) has reached it.
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest protocol this build still meshes with. A build that moves
/// [`PROTOCOL_VERSION`] on keeps this where it was, so that a cluster can be upgraded one
/// member at a time: the new members speak the old protocol with the old ones.
pub const MIN_PROTOCOL_VERSION: u32 = 3;
const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
const TAG_LEN: usize = 16;
const MAX_NOISE_MSG: usize = 65535;
const MAX_CHUNK: usize = MAX_NOISE_MSG - TAG_LEN;

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed (wrong or missing mesh secret?): {0}")]
    Handshake(snow::Error),
    #[error("decryption failed: {0}")]
    Decrypt(snow::Error),
    #[error("encryption failed: {0}")]
    Encrypt(snow::Error),
    #[error("bad chunk of {0} bytes")]
    BadChunk(usize),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("undecodable hello: {0}")]
    Hello(String),
    #[error(
        "peer speaks mesh protocols {min} to {max}, this member {my_min} to {my_max}: one of the two is \
         too old for the other"
    )]
    Version { min: u32, max: u32, my_min: u32, my_max: u32 },
    #[error("peer belongs to cluster {theirs:?}, not {ours:?}")]
    Cluster { theirs: String, ours: String },
    #[error("connection is closed")]
    Closed,
}

/// The 32-byte Noise pre-shared key for a cluster: from the secret file's contents, or
/// (without one) from the cluster name alone — encrypted, but open to anyone who knows
/// the name.
pub fn derive_psk(secret: Option<&[u8]>, cluster: &str) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(b"meshkv mesh psk v1\0");
    h.update(cluster.as_bytes());
    h.update([0]);
    if let Some(s) = secret {
        h.update(s);
    }
    h.finalize().into()
}

/// Encrypts outgoing data. One per connection, owned by its writer.
pub struct Sealer {
    t: Arc<StatelessTransportState>,
    nonce: u64,
    buf: Vec<u8>,
}

impl Sealer {
    /// Appends `plain`, encrypted and chunked, to `out`.
    pub fn seal_into(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        for chunk in plain.chunks(MAX_CHUNK) {
            self.buf.resize(chunk.len() + TAG_LEN, 0);
            let n = self.t.write_message(self.nonce, chunk, &mut self.buf).map_err(SecureError::Encrypt)?;
            self.nonce += 1;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&self.buf[..n]);
        }
        Ok(())
    }
}

/// Decrypts incoming data and splits it into frames. One per connection, owned by its reader.
pub struct Opener {
    t: Arc<StatelessTransportState>,
    nonce: u64,
    framer: Framer,
    cipher: Vec<u8>,
    plain: Vec<u8>,
}

impl Opener {
    /// Reads until one whole frame has arrived and returns its body.
    pub async fn read_frame<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Bytes, SecureError> {
        loop {
            if let Some(f) = self.framer.next_frame()? {
                return Ok(f);
            }
            let mut len = [0u8; 2];
            match r.read_exact(&mut len).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(SecureError::Closed),
                Err(e) => return Err(e.into()),
            }
            let len = u16::from_be_bytes(len) as usize;
            if len <= TAG_LEN {
                return Err(SecureError::BadChunk(len));
            }
            self.cipher.resize(len, 0);
            r.read_exact(&mut self.cipher).await?;
            self.plain.resize(len, 0);
            let n = self.t.read_message(self.nonce, &self.cipher, &mut self.plain).map_err(SecureError::Decrypt)?;
            self.nonce += 1;
            self.framer.push(&self.plain[..n]);
        }
    }
}

async fn write_msg<S: AsyncWrite + Unpin>(s: &mut S, m: &[u8]) -> Result<(), SecureError> {
    let mut b = Vec::with_capacity(2 + m.len());
    b.extend_from_slice(&(m.len() as u16).to_be_bytes());
    b.extend_from_slice(m);
    s.write_all(&b).await?;
    Ok(())
}

async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, SecureError> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SecureError::Closed
        } else {
            e.into()
        }
    })?;
    let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut m).await?;
    Ok(m)
}

/// The result of a successful handshake.
pub struct Established {
    pub sealer: Sealer,
    pub opener: Opener,
    pub remote: Hello,
    /// The protocol the two speak: the newest both know.
    pub version: u32,
}

/// The protocol the peers that sent `mine` and `theirs` speak: the newest both know, if
/// they know one in common.
pub fn agree(mine: &Hello, theirs: &Hello) -> Result<u32, SecureError> {
    let range = |h: &Hello| {
        // A peer from before ranges names only the one it speaks.
        let min = if h.min_protocol_version == 0 { h.protocol_version } else { h.min_protocol_version };
        (min, h.protocol_version)
    };
    let ((my_min, my_max), (min, max)) = (range(mine), range(theirs));
    let version = max.min(my_max);
    if version < min.max(my_min) {
        return Err(SecureError::Version { min, max, my_min, my_max });
    }
    Ok(version)
}

/// Runs the Noise handshake and the Hello exchange on `s`. The caller bounds it in time.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    initiator: bool,
    psk: &[u8; 32],
    mine: &Hello,
) -> Result<Established, SecureError> {
    let params = PATTERN.parse().map_err(SecureError::Handshake)?;
    let builder = snow::Builder::new(params).psk(0, psk).map_err(SecureError::Handshake)?;
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }
        .map_err(SecureError::Handshake)?;
    let mut buf = vec![0u8; MAX_NOISE_MSG];
    let mut scratch = vec![0u8; MAX_NOISE_MSG];
    if initiator {
        let n = hs.write_message(&[], &mut buf).map_err(SecureError::Handshake)?;
        write_msg(s, &buf[..n]).await?;
        let m = read_msg(s).await?;
        hs.read_message(&m, &mut scratch).map_err(SecureError::Handshake)?;
    } else {
        let m = read_msg(s).await?;
        hs.read_message(&m, &mut scratch).map_err(SecureError::Handshake)?;
        let n = hs.write_message(&[], &mut buf).map_err(SecureError::Handshake)?;
        write_msg(s, &buf[..n]).await?;
    }
    let t = Arc::new(hs.into_stateless_transport_mode().map_err(SecureError::Handshake)?);
    let mut sealer = Sealer { t: t.clone(), nonce: 0, buf: Vec::new() };
    let mut opener = Opener { t, nonce: 0, framer: Framer::default(), cipher: Vec::new(), plain: Vec::new() };
    let mut out = Vec::new();
    sealer.seal_into(&encode_frame(mine), &mut out)?;
    s.write_all(&out).await?;
    let body = opener.read_frame(s).await?;
    let remote = Hello::decode(body.as_ref()).map_err(|e| SecureError::Hello(e.to_string()))?;
    let version = agree(mine, &remote)?;
    if remote.cluster != mine.cluster {
        return Err(SecureError::Cluster { theirs: remote.cluster, ours: mine.cluster.clone() });
    }
    Ok(Established { sealer, opener, remote, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str, cluster: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            cluster: cluster.into(),
            name: name.into(),
            uid: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn shared_secret_connects_and_wrong_secret_learns_nothing() {
        let good = derive_psk(Some(b"s3cret"), "c");
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let (ha, hb) = (hello("a", "c"), hello("b", "c"));
        let (ra, rb) = tokio::join!(handshake(&mut a, true, &good, &ha), handshake(&mut b, false, &good, &hb));
        let (mut ea, mut eb) = (ra.unwrap(), rb.unwrap());
        assert_eq!((ea.remote.name.as_str(), eb.remote.name.as_str()), ("b", "a"));
        // A frame larger than one chunk survives the trip.
        let big = vec![7u8; 200_000];
        let mut out = Vec::new();
        ea.sealer
            .seal_into(
                &encode_frame(&crate::pb::meshkvpb::Gossip { channel: "x".into(), payload: big.clone().into() }),
                &mut out,
            )
            .unwrap();
        a.write_all(&out).await.unwrap();
        let body = eb.opener.read_frame(&mut b).await.unwrap();
        let g = crate::pb::meshkvpb::Gossip::decode(body.as_ref()).unwrap();
        assert_eq!(g.payload.len(), big.len());
        let _ = &mut ea;

        let bad = derive_psk(Some(b"guess"), "c");
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let responder =
            tokio::spawn(async move { handshake(&mut b, false, &good, &hello("b", "c")).await.map(|e| e.remote) });
        let initiator = handshake(&mut a, true, &bad, &hello("intruder", "c")).await;
        assert!(responder.await.unwrap().is_err(), "the responder refuses a wrong secret");
        assert!(initiator.is_err(), "and the intruder gets no hello back");
    }

    #[tokio::test]
    async fn other_clusters_are_refused() {
        let k = derive_psk(None, "c");
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let (ha, hb) = (hello("a", "c"), hello("b", "d"));
        let (ra, _) = tokio::join!(handshake(&mut a, true, &k, &ha), handshake(&mut b, false, &k, &hb));
        assert!(matches!(ra, Err(SecureError::Cluster { .. })));
    }

    /// Both ends of a handshake between `a` and `b`: the protocol each agreed on.
    async fn versions(a: Hello, b: Hello) -> (Result<u32, SecureError>, Result<u32, SecureError>) {
        let k = derive_psk(None, "c");
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let (ra, rb) = tokio::join!(handshake(&mut x, true, &k, &a), handshake(&mut y, false, &k, &b));
        (ra.map(|e| e.version), rb.map(|e| e.version))
    }

    #[tokio::test]
    async fn a_newer_peer_that_still_speaks_our_protocol_meshes_in_it() {
        let newer = Hello { protocol_version: PROTOCOL_VERSION + 1, ..hello("b", "c") };
        let (ra, _) = versions(hello("a", "c"), newer).await;
        assert_eq!(ra.unwrap(), PROTOCOL_VERSION);
        // Its side of the same handshake.
        let newer = Hello { protocol_version: PROTOCOL_VERSION + 1, ..hello("b", "c") };
        assert_eq!(agree(&newer, &hello("a", "c")).unwrap(), PROTOCOL_VERSION);
    }

    #[tokio::test]
    async fn peers_without_a_protocol_in_common_are_refused() {
        let too_new = Hello {
            protocol_version: PROTOCOL_VERSION + 2,
            min_protocol_version: PROTOCOL_VERSION + 1,
            ..hello("b", "c")
        };
        let (ra, _) = versions(hello("a", "c"), too_new).await;
        assert!(matches!(ra, Err(SecureError::Version { min, .. }) if min == PROTOCOL_VERSION + 1));
        // A peer from before ranges names one protocol: older than ours is refused.
        let older = Hello { protocol_version: MIN_PROTOCOL_VERSION - 1, min_protocol_version: 0, ..hello("b", "c") };
        let (ra, _) = versions(hello("a", "c"), older).await;
        let message = ra.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.starts_with(&format!("peer speaks mesh protocols {0} to {0},", MIN_PROTOCOL_VERSION - 1)),
            "{message}"
        );
    }
}

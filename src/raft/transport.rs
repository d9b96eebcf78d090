//! Raft messages over the mesh. Raft ids are derived from mesh peer names
//! ([`member_id`]), so a message to id N goes to the mesh peer whose name hashes to N,
//! and a restart is the same member. Votes and heartbeats travel as control datagrams;
//! appends with entries and snapshots as bulk. Beside Raft, members ask each other for
//! the hash of their store (the corruption check), and followers send the leader the
//! calls only it can answer (leader calls: a lease's clock, a learner's progress).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::sync::{mpsc, oneshot};

use super::node::{RaftHandle, Transport};
use super::snapshot::{Incoming, Outgoing, SstSink, CFS};
use crate::mesh::{MeshConn, PeerName, Priority};
use crate::pb::meshkvpb::{
    LeaderAnswer, LeaderCall, PeerHash, PeerHashRequest, SnapshotChunk, SnapshotChunkRequest, SnapshotDescriptor,
};
use crate::store::mvcc::{MvccError, MvccStore};

/// First byte of every datagram: what follows.
const TAG_RAFT: u8 = 0;
const TAG_CHUNK_REQUEST: u8 = 1;
const TAG_CHUNK: u8 = 2;
/// From a voter to a member the cluster removed, which may never see its removal commit.
const TAG_REMOVED: u8 = 3;
/// From a member to its leader: my log ends at this index, before entries you count as
/// mine; I lost my data, and this is my incarnation now (two u64, big-endian).
const TAG_LOST_LOG: u8 = 4;
/// A Raft message from a member that started with no data (it joined, or lost its
/// data): its incarnation (u64, big-endian), then the message. The receiver can tell
/// whether its log has taken that start of the member into the cluster.
const TAG_RAFT_OF: u8 = 5;
/// The hash of the store at a revision, asked ([`PeerHashRequest`]) and answered ([`PeerHash`]).
const TAG_HASH_REQUEST: u8 = 6;
const TAG_HASH: u8 = 7;
/// A call a follower sends the leader, and its answer.
const TAG_LEADER_CALL: u8 = 8;
const TAG_LEADER_ANSWER: u8 = 9;
/// From the leader to a member it will not add because the cluster runs a newer mesh
/// protocol than that member's build speaks: the cluster version (u32, big-endian).
const TAG_CLUSTER_VERSION: u8 = 10;
/// Most leader calls answered at once; more are dropped (their callers time out).
const MAX_LEADER_CALLS: usize = 1024;
/// Hash requests a member holds at most: one hashing, the rest waiting.
const MAX_HASH_REQUESTS: usize = 9;

/// A member id from a name: stable across restarts, never zero (raft-rs reserves 0).
pub fn member_id(name: &str) -> u64 {
    // FNV-1a, 64 bit: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// A datagram between members' Raft transports.
#[derive(Debug, Clone, PartialEq)]
pub enum Datagram {
    /// A Raft message, and its sender's incarnation (0: one that started with its data).
    Raft(Message, u64),
    ChunkRequest(SnapshotChunkRequest),
    Chunk(SnapshotChunk),
    Removed,
    LostLog {
        last_index: u64,
        incarnation: u64,
    },
    HashRequest(PeerHashRequest),
    Hash(PeerHash),
    LeaderCall(LeaderCall),
    LeaderAnswer(LeaderAnswer),
    ClusterVersion(u32),
}

/// Answers the calls followers send this member as their leader (the API's services).
pub trait LeaderCalls: Send + Sync + 'static {
    fn answer(&self, call: LeaderCall) -> futures::future::BoxFuture<'static, LeaderAnswer>;
}

/// Decodes a datagram; anything malformed is an error, never a panic.
pub fn decode_datagram(data: &[u8]) -> Result<Datagram, String> {
    let (&tag, body) = data.split_first().ok_or("empty datagram")?;
    match tag {
        TAG_RAFT => Message::parse_from_bytes(body).map(|m| Datagram::Raft(m, 0)).map_err(|e| e.to_string()),
        TAG_RAFT_OF => {
            let (incarnation, m) = body.split_at_checked(8).ok_or("a raft datagram too short for its incarnation")?;
            let incarnation = u64::from_be_bytes(incarnation.try_into().unwrap_or_default());
            Message::parse_from_bytes(m).map(|m| Datagram::Raft(m, incarnation)).map_err(|e| e.to_string())
        }
        TAG_CHUNK_REQUEST => SnapshotChunkRequest::decode(body).map(Datagram::ChunkRequest).map_err(|e| e.to_string()),
        TAG_CHUNK => SnapshotChunk::decode(body).map(Datagram::Chunk).map_err(|e| e.to_string()),
        TAG_REMOVED => Ok(Datagram::Removed),
        TAG_LOST_LOG => match <[u8; 16]>::try_from(body) {
            Ok(b) => Ok(Datagram::LostLog {
                last_index: u64::from_be_bytes(b[..8].try_into().unwrap_or_default()),
                incarnation: u64::from_be_bytes(b[8..].try_into().unwrap_or_default()),
            }),
            Err(_) => Err(format!("a lost-log datagram of {} bytes", body.len())),
        },
        TAG_HASH_REQUEST => PeerHashRequest::decode(body).map(Datagram::HashRequest).map_err(|e| e.to_string()),
        TAG_HASH => PeerHash::decode(body).map(Datagram::Hash).map_err(|e| e.to_string()),
        TAG_LEADER_CALL => LeaderCall::decode(body).map(Datagram::LeaderCall).map_err(|e| e.to_string()),
        TAG_LEADER_ANSWER => LeaderAnswer::decode(body).map(Datagram::LeaderAnswer).map_err(|e| e.to_string()),
        TAG_CLUSTER_VERSION => match <[u8; 4]>::try_from(body) {
            Ok(b) => Ok(Datagram::ClusterVersion(u32::from_be_bytes(b))),
            Err(_) => Err(format!("a cluster-version datagram of {} bytes", body.len())),
        },
        t => Err(format!("unknown datagram tag {t}")),
    }
}

/// Sends Raft messages as MeshConn datagrams, and moves snapshot data beside them.
pub struct MeshTransport {
    conn: MeshConn,
    names: RwLock<HashMap<u64, PeerName>>,
    pub dropped: AtomicU64,
    /// This start's incarnation when it started with no data, else 0; sent with every
    /// Raft message.
    incarnation: AtomicU64,
    outgoing: Arc<Outgoing>,
    incoming: Arc<Incoming>,
    /// Snapshot fetches under way: snapshot id → where its chunks go.
    fetching: Mutex<HashMap<u64, mpsc::Sender<SnapshotChunk>>>,
    /// The store whose hash others ask for; one hash is computed at a time, and a few
    /// more requests wait (the rest are dropped, as a busy member's would be).
    store: Arc<MvccStore>,
    hashing: Arc<tokio::sync::Semaphore>,
    held: Arc<tokio::sync::Semaphore>,
    /// Hash requests under way: request id → where the answers go.
    asking: Mutex<HashMap<u64, mpsc::Sender<(PeerName, PeerHash)>>>,
    /// What answers leader calls here, once the API has started; held by the server
    /// (it holds Raft handles, which must not outlive the server through the driver's
    /// own transport).
    answerer: OnceLock<Weak<dyn LeaderCalls>>,
    answering: Arc<tokio::sync::Semaphore>,
    /// Leader calls under way: call id → where the answer goes.
    calling: Mutex<HashMap<u64, oneshot::Sender<LeaderAnswer>>>,
}

fn tagged(tag: u8, body: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(body.len() + 1);
    v.push(tag);
    v.extend_from_slice(body);
    v.into()
}

impl MeshTransport {
    pub fn new(conn: MeshConn, outgoing: Arc<Outgoing>, incoming: Arc<Incoming>, store: Arc<MvccStore>) -> Arc<Self> {
        Arc::new(Self {
            conn,
            names: RwLock::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
            outgoing,
            incoming,
            fetching: Mutex::new(HashMap::new()),
            store,
            hashing: Arc::new(tokio::sync::Semaphore::new(1)),
            held: Arc::new(tokio::sync::Semaphore::new(MAX_HASH_REQUESTS)),
            asking: Mutex::new(HashMap::new()),
            answerer: OnceLock::new(),
            answering: Arc::new(tokio::sync::Semaphore::new(MAX_LEADER_CALLS)),
            calling: Mutex::new(HashMap::new()),
        })
    }

    /// Where this member's answers to leader calls come from (set once).
    pub fn answer_leader_calls(&self, answerer: Weak<dyn LeaderCalls>) {
        let _ = self.answerer.set(answerer);
    }

    /// Sends `call` to the member `to` over the mesh and waits for its answer, at most
    /// `timeout`; None when none comes (the member is not reachable, or gone).
    pub async fn call(&self, to: &str, mut call: LeaderCall, timeout: Duration) -> Option<LeaderAnswer> {
        let id = rand::random::<u64>();
        call.id = id;
        let (tx, rx) = oneshot::channel();
        self.calling.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let sent = self.conn.send_to(to, tagged(TAG_LEADER_CALL, &call.encode_to_vec()), Priority::Control).is_ok();
        let answer = match sent {
            true => tokio::time::timeout(timeout, rx).await.ok().and_then(Result::ok),
            false => None,
        };
        self.calling.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        answer
    }

    /// Answers a follower's call on a task of its own; a call that finds no answerer, or
    /// too many under way, is dropped.
    fn on_leader_call(self: &Arc<Self>, src: PeerName, call: LeaderCall) {
        let answerer = self.answerer.get().and_then(Weak::upgrade);
        let (Some(answerer), Ok(held)) = (answerer, self.answering.clone().try_acquire_owned()) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _held = held;
            let answer = answerer.answer(call).await;
            if me.conn.send_to(&src, tagged(TAG_LEADER_ANSWER, &answer.encode_to_vec()), Priority::Control).is_err() {
                me.dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    fn on_leader_answer(&self, answer: LeaderAnswer) {
        if let Some(tx) = self.calling.lock().unwrap_or_else(|e| e.into_inner()).remove(&answer.id) {
            let _ = tx.send(answer);
        }
    }

    /// Asks each of `members` (id, name) for the hash of its store at `revision`, and
    /// returns the answers that come before `timeout`, by member id. A member the mesh
    /// cannot reach yet is waited for, within the same time.
    pub async fn peer_hashes(
        &self,
        members: &[(u64, String)],
        revision: i64,
        timeout: Duration,
    ) -> Vec<(u64, PeerHash)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let id = rand::random::<u64>();
        let (tx, mut rx) = mpsc::channel(members.len().max(1));
        self.asking.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let request = tagged(TAG_HASH_REQUEST, &PeerHashRequest { id, revision }.encode_to_vec());
        let mut unasked: Vec<PeerName> = members.iter().map(|(_, n)| PeerName::from(n.as_str())).collect();
        let mut answers: HashMap<u64, PeerHash> = HashMap::new();
        while answers.len() < members.len() && tokio::time::Instant::now() < deadline {
            let reachable = self.conn.mesh().reachable_peers();
            unasked.retain(|n| {
                !(reachable.contains(n) && self.conn.send_to(n, request.clone(), Priority::Control).is_ok())
            });
            let wait = match unasked.is_empty() {
                true => deadline,
                false => deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)),
            };
            match tokio::time::timeout_at(wait, rx.recv()).await {
                Ok(Some((from, h))) if h.id == id => {
                    answers.insert(member_id(&from), h);
                }
                Ok(_) | Err(_) => {}
            }
        }
        self.asking.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let asked: Vec<u64> = members.iter().map(|(id, _)| *id).collect();
        answers.into_iter().filter(|(m, _)| asked.contains(m)).collect()
    }

    /// Answers a member's hash request, one hash at a time: a hash reads the whole store.
    fn on_hash_request(self: &Arc<Self>, src: PeerName, req: PeerHashRequest) {
        let Ok(held) = self.held.clone().try_acquire_owned() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _held = held; // released when the answer is sent
            let Ok(_turn) = me.hashing.clone().acquire_owned().await else { return };
            let store = me.store.clone();
            let hashed = tokio::task::spawn_blocking(move || (store.hash_kv(req.revision), store.revision())).await;
            let Ok((hashed, current)) = hashed else { return };
            let mut answer = PeerHash { id: req.id, current_revision: current, ..Default::default() };
            match hashed {
                Ok((hash, revision, compacted)) => {
                    answer.hash = hash;
                    answer.revision = revision;
                    answer.compact_revision = compacted;
                }
                Err(e @ (MvccError::FutureRev | MvccError::Compacted | MvccError::Installing)) => {
                    answer.error = e.to_string()
                }
                Err(e) => {
                    tracing::warn!(error = %e, asker = %src, "the store's hash could not be computed");
                    answer.error = e.to_string();
                }
            }
            if me.conn.send_to(&src, tagged(TAG_HASH, &answer.encode_to_vec()), Priority::Control).is_err() {
                me.dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    fn on_hash(&self, src: PeerName, h: PeerHash) {
        let tx = self.asking.lock().unwrap_or_else(|e| e.into_inner()).get(&h.id).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send((src, h));
        }
    }

    /// Set once the driver has started, before any message is received or sent.
    pub fn set_incarnation(&self, incarnation: u64) {
        self.incarnation.store(incarnation, Ordering::Relaxed);
    }

    fn name_of(&self, id: u64) -> Option<PeerName> {
        if let Some(n) = self.names.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Some(n.clone());
        }
        let peers = self.conn.mesh().reachable_peers();
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        for p in peers {
            names.insert(member_id(&p), p);
        }
        names.get(&id).cloned()
    }

    /// Feeds datagrams from the mesh to the Raft driver until the mesh shuts down.
    pub async fn receive(self: Arc<Self>, raft: RaftHandle) {
        let expiry = tokio::spawn({
            let (me, raft) = (self.clone(), raft.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    for (id, to) in me.outgoing.expire(Duration::from_secs(30)) {
                        tracing::warn!(id = format!("{id:x}"), to = format!("{to:x}"), "snapshot transfer abandoned");
                        let _ = raft.report_snapshot(to, SnapshotStatus::Failure);
                    }
                }
            }
        });
        while let Some((src, data)) = self.conn.recv_from().await {
            match decode_datagram(&data) {
                Ok(Datagram::Raft(m, incarnation)) => self.on_raft(&raft, src, m, incarnation),
                Ok(Datagram::ChunkRequest(r)) => self.on_chunk_request(&raft, src, r),
                Ok(Datagram::Chunk(c)) => self.on_chunk(c),
                Ok(Datagram::Removed) => {
                    // Only a voter of our cluster may say so.
                    if raft.status().membership().voters.contains(&member_id(&src)) {
                        raft.status().removed.store(true, Ordering::Release);
                    }
                }
                Ok(Datagram::LostLog { last_index, incarnation }) => {
                    let _ = raft.lost_log(member_id(&src), last_index, incarnation);
                }
                Ok(Datagram::HashRequest(r)) => self.on_hash_request(src, r),
                Ok(Datagram::Hash(h)) => self.on_hash(src, h),
                Ok(Datagram::LeaderCall(c)) => self.on_leader_call(src, c),
                Ok(Datagram::LeaderAnswer(a)) => self.on_leader_answer(a),
                Ok(Datagram::ClusterVersion(v)) => {
                    let _ = raft.cluster_version_told(member_id(&src), v);
                }
                Err(e) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%src, error = %e, "undecodable datagram dropped");
                }
            }
        }
        expiry.abort();
    }

    fn on_chunk_request(&self, raft: &RaftHandle, src: PeerName, req: SnapshotChunkRequest) {
        let chunk = self.outgoing.chunk(&req);
        if self.outgoing.delivered(req.id) {
            // The member has everything; raft-rs may go on with it once it answers.
            let _ = raft.report_snapshot(member_id(&src), SnapshotStatus::Finish);
        }
        if self.conn.send_to(&src, tagged(TAG_CHUNK, &chunk.encode_to_vec()), Priority::Bulk).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_chunk(&self, chunk: SnapshotChunk) {
        let tx = self.fetching.lock().unwrap_or_else(|e| e.into_inner()).get(&chunk.id).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(chunk);
        }
    }

    /// Holds a MsgSnapshot back until its data is fetched, then hands it to Raft.
    fn on_snapshot(self: &Arc<Self>, raft: &RaftHandle, src: PeerName, msg: Message, incarnation: u64) {
        let Ok(desc) = SnapshotDescriptor::decode(msg.get_snapshot().data.as_ref()) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (tx, rx) = mpsc::channel(8);
        {
            let mut f = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            if f.contains_key(&desc.id) {
                return;
            }
            f.insert(desc.id, tx);
        }
        tracing::info!(id = format!("{:x}", desc.id), from = %src, "fetching a snapshot");
        let (me, raft) = (self.clone(), raft.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let id = desc.id;
            let staging = me.incoming.staging(id);
            let res = me.fetch(&desc, &staging, rx).await;
            me.fetching.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            match res {
                Ok(bytes) => {
                    tracing::info!(
                        id = format!("{id:x}"), from = %src, bytes, secs = started.elapsed().as_secs_f64(),
                        "snapshot fetched; installing"
                    );
                    me.incoming.mark_fetched(id, staging);
                    let _ = raft.step(msg, incarnation);
                }
                Err(e) => {
                    tracing::warn!(id = format!("{id:x}"), from = %src, error = %e, "snapshot fetch failed");
                    let _ = std::fs::remove_dir_all(&staging);
                }
            }
        });
    }

    /// Pulls every record of the snapshot into SST files under `staging`; returns bytes.
    async fn fetch(
        &self,
        desc: &SnapshotDescriptor,
        staging: &std::path::Path,
        mut rx: mpsc::Receiver<SnapshotChunk>,
    ) -> Result<u64, String> {
        let _ = std::fs::remove_dir_all(staging);
        let mut total = 0u64;
        for cf in 0..CFS.len() as u32 {
            let mut sink = SstSink::new(staging, cf).map_err(|e| e.to_string())?;
            let mut last: Option<Bytes> = None;
            loop {
                let req = SnapshotChunkRequest {
                    id: desc.id,
                    cf,
                    after: last.clone().unwrap_or_default(),
                    from_start: last.is_none(),
                };
                let mut chunk = None;
                for _attempt in 0..5 {
                    let _ = self.conn.send_to(
                        &desc.source,
                        tagged(TAG_CHUNK_REQUEST, &req.encode_to_vec()),
                        Priority::Control,
                    );
                    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                        Ok(Some(c)) if c.cf == cf => {
                            chunk = Some(c);
                            break;
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) => return Err("fetch cancelled".into()),
                        Err(_) => continue,
                    }
                }
                let chunk = chunk.ok_or("the sender stopped answering")?;
                if chunk.unknown {
                    return Err("the sender no longer has this snapshot".into());
                }
                for (k, v) in chunk.keys.into_iter().zip(chunk.values) {
                    if last.as_ref().is_some_and(|l| k <= *l) {
                        continue; // a repeated chunk
                    }
                    total += (k.len() + v.len()) as u64;
                    last = Some(k.clone());
                    sink.push(k, v).map_err(|e| e.to_string())?;
                }
                if chunk.done {
                    break;
                }
            }
            sink.finish().map_err(|e| e.to_string())?;
        }
        Ok(total)
    }

    fn on_raft(self: &Arc<Self>, raft: &RaftHandle, src: PeerName, msg: Message, incarnation: u64) {
        // A peer speaks only for itself.
        if msg.from != member_id(&src) || msg.to != raft.status().id {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.names.write().unwrap_or_else(|e| e.into_inner()).insert(msg.from, src.clone());
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.on_snapshot(raft, src, msg, incarnation);
            return;
        }
        if raft.step(msg, incarnation).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Transport for MeshTransport {
    fn send(&self, msg: Message) {
        let Some(name) = self.name_of(msg.to) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let bulk = msg.get_msg_type() == MessageType::MsgSnapshot
            || (msg.get_msg_type() == MessageType::MsgAppend && !msg.entries.is_empty());
        let prio = if bulk { Priority::Bulk } else { Priority::Control };
        let data = match msg.write_to_bytes() {
            Ok(d) => d,
            Err(_) => return,
        };
        let datagram = match self.incarnation.load(Ordering::Relaxed) {
            0 => tagged(TAG_RAFT, &data),
            i => {
                let mut v = Vec::with_capacity(data.len() + 9);
                v.push(TAG_RAFT_OF);
                v.extend_from_slice(&i.to_be_bytes());
                v.extend_from_slice(&data);
                v.into()
            }
        };
        if self.conn.send_to(&name, datagram, prio).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn tell_removed(&self, id: u64) {
        if let Some(name) = self.name_of(id) {
            let _ = self.conn.send_to(&name, tagged(TAG_REMOVED, &[]), Priority::Control);
        }
    }

    fn tell_cluster_version(&self, to: u64, version: u32) {
        if let Some(name) = self.name_of(to) {
            let _ = self.conn.send_to(&name, tagged(TAG_CLUSTER_VERSION, &version.to_be_bytes()), Priority::Control);
        }
    }

    fn tell_lost_log(&self, to: u64, last_index: u64, incarnation: u64) {
        if let Some(name) = self.name_of(to) {
            let mut body = last_index.to_be_bytes().to_vec();
            body.extend_from_slice(&incarnation.to_be_bytes());
            let _ = self.conn.send_to(&name, tagged(TAG_LOST_LOG, &body), Priority::Control);
        }
    }

    fn incarnation(&self, name: &str) -> Option<u64> {
        let directory = self
            .conn
            .mesh()
            .with_channel::<super::directory::Directory, _>(super::directory::CHANNEL, |d| d.incarnation(name));
        directory.flatten()
    }

    fn protocol(&self, name: &str) -> Option<u32> {
        let directory = self
            .conn
            .mesh()
            .with_channel::<super::directory::Directory, _>(super::directory::CHANNEL, |d| d.protocol(name));
        directory.flatten()
    }

    fn cluster_seen(&self) -> u64 {
        self.conn.mesh().cluster_seen()
    }

    fn reachable(&self) -> Vec<(u64, String)> {
        self.conn.mesh().reachable_peers().into_iter().map(|p| (member_id(&p), p.to_string())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn raft_messages_round_trip() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 7;
        m.to = 9;
        m.term = 3;
        let d = tagged(TAG_RAFT, &m.write_to_bytes().unwrap());
        assert_eq!(decode_datagram(&d), Ok(Datagram::Raft(m.clone(), 0)));
        let mut of = vec![TAG_RAFT_OF];
        of.extend_from_slice(&7u64.to_be_bytes());
        of.extend_from_slice(&m.write_to_bytes().unwrap());
        assert_eq!(decode_datagram(&of), Ok(Datagram::Raft(m, 7)));
        assert!(decode_datagram(&[TAG_RAFT_OF, 1, 2]).is_err());
        assert!(decode_datagram(&[]).is_err());
        assert!(decode_datagram(&[9, 1, 2]).is_err());
    }

    #[test]
    fn a_lost_log_names_its_last_index_and_incarnation_in_exactly_sixteen_bytes() {
        let mut body = 1234u64.to_be_bytes().to_vec();
        body.extend_from_slice(&99u64.to_be_bytes());
        let d = tagged(TAG_LOST_LOG, &body);
        assert_eq!(decode_datagram(&d), Ok(Datagram::LostLog { last_index: 1234, incarnation: 99 }));
        assert!(decode_datagram(&[TAG_LOST_LOG, 1, 2]).is_err());
        assert!(decode_datagram(&tagged(TAG_LOST_LOG, &[0; 17])).is_err());
    }

    #[test]
    fn a_cluster_version_is_exactly_four_bytes() {
        assert_eq!(decode_datagram(&tagged(TAG_CLUSTER_VERSION, &4u32.to_be_bytes())), Ok(Datagram::ClusterVersion(4)));
        assert!(decode_datagram(&[TAG_CLUSTER_VERSION, 0, 4]).is_err());
        assert!(decode_datagram(&tagged(TAG_CLUSTER_VERSION, &[0; 5])).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_datagram(&data);
        }

        #[test]
        fn arbitrary_bodies_behind_every_tag_never_panic(tag in 0u8..=TAG_CLUSTER_VERSION + 1, body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut d = vec![tag];
            d.extend(body);
            let _ = decode_datagram(&d);
        }
    }
}

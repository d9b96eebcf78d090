//! Raft messages over the mesh. Raft ids are derived from mesh peer names
//! ([`member_id`]), so a message to id N goes to the mesh peer whose name hashes to N,
//! and a restart is the same member. Votes and heartbeats travel as control datagrams;
//! appends with entries and snapshots as bulk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use super::node::{RaftHandle, Transport};
use crate::mesh::{MeshConn, PeerName, Priority};

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

/// Sends Raft messages as MeshConn datagrams.
pub struct MeshTransport {
    conn: MeshConn,
    names: RwLock<HashMap<u64, PeerName>>,
    pub dropped: AtomicU64,
}

impl MeshTransport {
    pub fn new(conn: MeshConn) -> Arc<Self> {
        Arc::new(Self { conn, names: RwLock::new(HashMap::new()), dropped: AtomicU64::new(0) })
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
        while let Some((src, data)) = self.conn.recv_from().await {
            let msg = match Message::parse_from_bytes(&data) {
                Ok(m) => m,
                Err(e) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%src, error = %e, "undecodable raft message dropped");
                    continue;
                }
            };
            // A peer speaks only for itself.
            if msg.from != member_id(&src) || msg.to != raft.status().id {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.names.write().unwrap_or_else(|e| e.into_inner()).insert(msg.from, src);
            if raft.step(msg).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
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
        if self.conn.send_to(&name, data.into(), prio).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reachable(&self) -> Vec<(u64, String)> {
        self.conn.mesh().reachable_peers().into_iter().map(|p| (member_id(&p), p.to_string())).collect()
    }
}

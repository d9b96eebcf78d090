//! The tokio edge of the mesh: it owns the sockets and drives the pure [`Node`].
//!
//! Tasks: one accept loop; one connection maker; one ticker (anti-entropy, topology
//! garbage collection); and per connection a reader and a writer. The `Node` sits behind
//! a std `Mutex` that is held only to feed it one event and take its output, never
//! across an await or a socket write; output is then encoded and queued outside it.
//!
//! Each connection has two bounded queues, control and bulk; the writer always drains
//! control first, so heartbeats and votes never wait behind snapshot chunks. A full
//! queue drops the frame and counts it: nobody ever blocks on a slow peer. A peer whose
//! connection is silent for `dead_after` (heartbeats go every `heartbeat`) is dropped
//! and reported down.
//!
//! Lock order: `conns` before `node`; neither is held while the other is taken by
//! the same task except in `register`/`unregister`, which take `conns` then `node`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::gossip::GossipData;
use super::node::{Msg, Node, NodeConfig};
use super::peer::{PeerInfo, PeerName};
use super::secure::{self, Established, Opener, Sealer, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::wire::{self, Incoming};
use crate::pb::meshkvpb::{Founder, Hello};

/// How a mesh peer runs.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub name: String,
    pub nickname: String,
    /// Peers of other clusters are refused at the handshake.
    pub cluster: String,
    /// The newest mesh protocol this peer speaks: [`PROTOCOL_VERSION`], or more in an
    /// upgrade drill that plays a newer build.
    pub protocol: u32,
    /// The id of the data cluster this peer serves, 0 while it has none. Peers whose
    /// non-zero id differs are refused: they hold another cluster's data.
    pub cluster_id: Arc<AtomicU64>,
    /// Contents of the cluster secret file; None encrypts with a key anyone can derive.
    pub secret: Option<Vec<u8>>,
    /// Where to accept peers (port 0 picks one); None accepts nobody.
    pub listen: Option<SocketAddr>,
    /// The address other peers dial for us; defaults to the bound listen address.
    pub advertise: Option<String>,
    /// Peers to dial at start (host:port).
    pub join: Vec<String>,
    /// The connection maker dials until this many connections are up.
    pub max_conns: usize,
    /// Connections beyond this are refused, inbound ones included.
    pub hard_max_conns: usize,
    pub heartbeat: Duration,
    /// Silence after which a connection is dropped and its peer reported down.
    pub dead_after: Duration,
    pub gossip_interval: Duration,
    pub handshake_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Largest MeshConn datagram.
    pub max_datagram: usize,
    pub inbox: usize,
    pub control_queue: usize,
    pub bulk_queue: usize,
    pub node: NodeConfig,
}

impl MeshConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            nickname: String::new(),
            cluster: "meshkv".into(),
            protocol: PROTOCOL_VERSION,
            cluster_id: Arc::new(AtomicU64::new(0)),
            secret: None,
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            advertise: None,
            join: Vec::new(),
            max_conns: 8,
            hard_max_conns: 24,
            heartbeat: Duration::from_millis(400),
            dead_after: Duration::from_secs(2),
            gossip_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_datagram: super::wire::MAX_FRAME - 4096,
            inbox: 8192,
            control_queue: 4096,
            bulk_queue: 512,
            node: NodeConfig::default(),
        }
    }
}

/// Priority class of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Small and urgent (votes, heartbeats): never waits behind bulk.
    Control,
    /// Large or deferrable (log entries, snapshot chunks).
    Bulk,
}

/// Why a datagram was not sent. Like UDP, a sent datagram may still be lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("datagram of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("no route to peer {0}")]
    NoRoute(String),
    #[error("queue towards the peer is full; datagram dropped")]
    QueueFull,
    #[error("mesh is shut down")]
    Closed,
}

#[derive(Default, Debug)]
struct Counters {
    inbox_full: AtomicU64,
    queue_full: AtomicU64,
    too_large: AtomicU64,
    bad_frames: AtomicU64,
    refused: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
}

struct ConnHandle {
    id: u64,
    uid: u64,
    outbound: bool,
    addr: String,
    /// The protocol the two ends agreed on.
    protocol: u32,
    since: Instant,
    control: mpsc::Sender<Bytes>,
    bulk: mpsc::Sender<Bytes>,
    close: watch::Sender<bool>,
}

struct Backoff {
    next: Instant,
    delay: Duration,
}

struct Inner {
    cfg: MeshConfig,
    me: PeerName,
    uid: u64,
    psk: [u8; 32],
    addr: String,
    node: Mutex<Node>,
    conns: RwLock<HashMap<PeerName, ConnHandle>>,
    dialing: Mutex<HashSet<String>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// Addresses seen in the topology, kept after their peers are forgotten so that a
    /// healed partition can reconnect; with when they were last seen.
    address_book: Mutex<HashMap<String, Instant>>,
    inbox: mpsc::Sender<(PeerName, Bytes)>,
    blocked: RwLock<HashSet<PeerName>>,
    /// Peers whose frames are dropped on arrival, heartbeats excepted: one-way loss.
    deaf_to: RwLock<HashSet<PeerName>>,
    counters: Counters,
    next_conn: AtomicU64,
    /// A cluster id a peer reported at its handshake (0: none seen yet).
    cluster_seen: AtomicU64,
    /// The founders a peer named at its handshake along with its cluster id.
    founders_seen: Mutex<Vec<Founder>>,
    /// The founders this peer formed its cluster with, sent at every handshake.
    founders: Mutex<Vec<Founder>>,
    stop: watch::Sender<bool>,
}

/// A running mesh peer. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
    inbox: Arc<tokio::sync::Mutex<mpsc::Receiver<(PeerName, Bytes)>>>,
}

/// One known peer, as `Mesh::status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub uid: u64,
    pub nickname: String,
    pub addr: String,
    /// The neighbour datagrams to this peer go through (itself when directly linked).
    pub next_hop: Option<String>,
    pub connections: Vec<String>,
}

/// One live connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnStatus {
    pub peer: String,
    pub addr: String,
    pub outbound: bool,
    /// The mesh protocol the two ends speak.
    pub protocol: u32,
    pub up_for: Duration,
}

/// A snapshot of the mesh as this peer sees it.
#[derive(Clone, Debug)]
pub struct MeshStatus {
    pub name: String,
    pub uid: u64,
    pub addr: String,
    pub peers: Vec<PeerStatus>,
    pub connections: Vec<ConnStatus>,
    /// Per channel ("topology", "unicast", gossip channels): (messages, bytes) sent and received.
    pub sent: Vec<(String, u64, u64)>,
    pub received: Vec<(String, u64, u64)>,
    pub relayed: u64,
    /// Drops by cause.
    pub drops: Vec<(&'static str, u64)>,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub frames_in: u64,
    pub bytes_in: u64,
}

impl MeshStatus {
    /// Names of the peers reachable from here, ourselves excluded.
    pub fn reachable(&self) -> Vec<String> {
        self.peers.iter().filter(|p| p.next_hop.is_some()).map(|p| p.name.clone()).collect()
    }
}

/// The mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot listen for peers on {addr}: {err}")]
    Listen { addr: SocketAddr, err: std::io::Error },
    #[error("peer name must not be empty")]
    EmptyName,
}

impl Mesh {
    /// Starts a mesh peer with the given gossip channels.
    pub async fn start(cfg: MeshConfig, channels: Vec<(String, Box<dyn GossipData>)>) -> Result<Self, MeshError> {
        if cfg.name.is_empty() {
            return Err(MeshError::EmptyName);
        }
        let listener = match cfg.listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|err| MeshError::Listen { addr: a, err })?),
            None => None,
        };
        let bound = listener.as_ref().and_then(|l| l.local_addr().ok());
        let addr = cfg.advertise.clone().or_else(|| bound.map(|b| b.to_string())).unwrap_or_default();
        let uid: u64 = rand::rng().random::<u64>().max(1);
        let mut info = PeerInfo::new(cfg.name.as_str(), uid);
        info.nickname = cfg.nickname.clone();
        info.addr = addr.clone();
        let mut node = Node::new(info, cfg.node.clone(), rand::rng().random());
        for (name, data) in channels {
            node.add_channel(&name, data);
        }
        let (inbox_tx, inbox_rx) = mpsc::channel(cfg.inbox);
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            psk: secure::derive_psk(cfg.secret.as_deref(), &cfg.cluster),
            me: PeerName::from(cfg.name.as_str()),
            uid,
            addr,
            node: Mutex::new(node),
            conns: RwLock::new(HashMap::new()),
            dialing: Mutex::new(HashSet::new()),
            backoff: Mutex::new(HashMap::new()),
            address_book: Mutex::new(HashMap::new()),
            inbox: inbox_tx,
            blocked: RwLock::new(HashSet::new()),
            deaf_to: RwLock::new(HashSet::new()),
            counters: Counters::default(),
            next_conn: AtomicU64::new(1),
            cluster_seen: AtomicU64::new(0),
            founders_seen: Mutex::new(Vec::new()),
            founders: Mutex::new(Vec::new()),
            stop,
            cfg,
        });
        let mesh = Mesh { inner, inbox: Arc::new(tokio::sync::Mutex::new(inbox_rx)) };
        if let Some(l) = listener {
            tokio::spawn(mesh.clone().accept_loop(l));
        }
        tokio::spawn(mesh.clone().maker_loop());
        tokio::spawn(mesh.clone().tick_loop());
        tracing::info!(name = %mesh.inner.me, uid = format!("{uid:x}"), addr = %mesh.inner.addr, "mesh peer started");
        Ok(mesh)
    }

    pub fn name(&self) -> &PeerName {
        &self.inner.me
    }

    pub fn uid(&self) -> u64 {
        self.inner.uid
    }

    /// Peers reachable from here, ourselves excluded.
    pub fn reachable_peers(&self) -> Vec<PeerName> {
        self.inner.node.lock().unwrap_or_else(|e| e.into_inner()).reachable()
    }

    /// The id of a formed cluster that a peer named at its handshake, 0 if none has: a
    /// fresh member that sees one joins it rather than forming a cluster.
    pub fn cluster_seen(&self) -> u64 {
        self.inner.cluster_seen.load(Ordering::Acquire)
    }

    /// The members a peer formed its cluster with, sorted, if it names this very peer
    /// (its name and this process's uid) among them: this peer was seen by the others
    /// when they formed it, and is a founder. None otherwise: a fresh peer under a
    /// founder's name that started again later (its data lost) is not one.
    pub fn founded_with_me(&self) -> Option<Vec<String>> {
        let founders = self.inner.founders_seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !founders.iter().any(|f| *f.name == *self.inner.me && f.uid == self.inner.uid) {
            return None;
        }
        let mut names: Vec<String> = founders.into_iter().map(|f| f.name).collect();
        names.sort();
        Some(names)
    }

    /// Records that this peer is forming a cluster with `names` (itself among them):
    /// every later handshake names them with the uids they run under now. Call it
    /// before the cluster id is set.
    pub fn set_founders(&self, names: &[String]) {
        let node = self.inner.node.lock().unwrap_or_else(|e| e.into_inner());
        let topo = node.topology();
        let founders = names
            .iter()
            .filter_map(|n| match n.as_str() == self.inner.me.as_ref() {
                true => Some(Founder { name: n.clone(), uid: self.inner.uid }),
                false => topo.get(n).map(|p| Founder { name: n.clone(), uid: p.uid }),
            })
            .collect();
        *self.inner.founders.lock().unwrap_or_else(|e| e.into_inner()) = founders;
    }

    /// The address peers dial to reach us.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    pub fn max_datagram(&self) -> usize {
        self.inner.cfg.max_datagram
    }

    /// Stops every task and closes every connection.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        for c in self.inner.conns.read().unwrap_or_else(|e| e.into_inner()).values() {
            let _ = c.close.send(true);
        }
    }

    fn stopped(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// Runs `f` on the node, then sends what it produced.
    fn drive<R>(&self, f: impl FnOnce(&mut Node) -> R) -> R {
        let (r, out, datagrams) = {
            let mut node = self.inner.node.lock().unwrap_or_else(|e| e.into_inner());
            let r = f(&mut node);
            (r, node.take_out(), node.take_datagrams())
        };
        self.dispatch(out);
        for d in datagrams {
            if self.inner.inbox.try_send(d).is_err() {
                self.inner.counters.inbox_full.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn dispatch(&self, out: Vec<(PeerName, Msg)>) {
        if out.is_empty() {
            return;
        }
        let conns = self.inner.conns.read().unwrap_or_else(|e| e.into_inner());
        for (to, m) in out {
            let Some(c) = conns.get(&to) else { continue };
            let frame = wire::encode(&m);
            let q = if m.is_bulk() { &c.bulk } else { &c.control };
            if q.try_send(frame).is_err() {
                self.inner.counters.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    // ---- gossip channels ----

    /// Runs `f` on a channel's data (to read it, or change it and return a delta to
    /// broadcast).
    pub fn with_channel<T: GossipData, R>(&self, channel: &str, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let mut node = self.inner.node.lock().unwrap_or_else(|e| e.into_inner());
        node.channel_mut::<T>(channel).map(f)
    }

    /// Sends a channel delta made here to every peer.
    pub fn broadcast(&self, channel: &str, delta: Bytes) {
        self.drive(|n| n.broadcast(channel, delta));
    }

    // ---- datagrams ----

    /// Sends a best-effort datagram to `peer`, relayed if there is no direct link.
    pub fn send_to(&self, peer: &str, data: Bytes, prio: Priority) -> Result<(), SendError> {
        if data.len() > self.inner.cfg.max_datagram {
            self.inner.counters.too_large.fetch_add(1, Ordering::Relaxed);
            return Err(SendError::TooLarge(data.len()));
        }
        if self.stopped() {
            return Err(SendError::Closed);
        }
        if peer == self.inner.me.as_ref() {
            return self.inner.inbox.try_send((self.inner.me.clone(), data)).map_err(|_| {
                self.inner.counters.inbox_full.fetch_add(1, Ordering::Relaxed);
                SendError::QueueFull
            });
        }
        let dst = PeerName::from(peer);
        let before = self.inner.counters.queue_full.load(Ordering::Relaxed);
        self.drive(|n| n.send_to(&dst, data, prio == Priority::Bulk))
            .map_err(|_| SendError::NoRoute(peer.to_string()))?;
        if self.inner.counters.queue_full.load(Ordering::Relaxed) != before {
            return Err(SendError::QueueFull);
        }
        Ok(())
    }

    /// Waits for the next datagram for this peer: (source, payload). None once shut down.
    pub async fn recv_from(&self) -> Option<(PeerName, Bytes)> {
        let mut rx = self.inbox.lock().await;
        let mut stop = self.inner.stop.subscribe();
        tokio::select! {
            d = rx.recv() => d,
            _ = wait_true(&mut stop) => None,
        }
    }

    // ---- fault injection (tests, failure drills) ----

    /// Silently drops all traffic to and from `peer`, as a network cut would: its
    /// connection goes quiet, times out, and new ones are refused, until unblocked.
    pub fn block(&self, peer: &str) {
        self.inner.blocked.write().unwrap_or_else(|e| e.into_inner()).insert(PeerName::from(peer));
    }

    pub fn unblock(&self, peer: &str) {
        self.inner.blocked.write().unwrap_or_else(|e| e.into_inner()).remove(peer);
    }

    fn is_blocked(&self, peer: &str) -> bool {
        self.inner.blocked.read().unwrap_or_else(|e| e.into_inner()).contains(peer)
    }

    /// One-way loss: drops every frame `peer` sends here except heartbeats, so the link
    /// stays up while what travels on it from that side is lost. Traffic the other way flows.
    pub fn deafen(&self, peer: &str) {
        self.inner.deaf_to.write().unwrap_or_else(|e| e.into_inner()).insert(PeerName::from(peer));
    }

    pub fn undeafen(&self, peer: &str) {
        self.inner.deaf_to.write().unwrap_or_else(|e| e.into_inner()).remove(peer);
    }

    fn is_deaf_to(&self, peer: &str) -> bool {
        self.inner.deaf_to.read().unwrap_or_else(|e| e.into_inner()).contains(peer)
    }

    // ---- status ----

    pub fn status(&self) -> MeshStatus {
        let conns: Vec<ConnStatus> = {
            let conns = self.inner.conns.read().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<ConnStatus> = conns
                .iter()
                .map(|(p, c)| ConnStatus {
                    peer: p.to_string(),
                    addr: c.addr.clone(),
                    outbound: c.outbound,
                    protocol: c.protocol,
                    up_for: c.since.elapsed(),
                })
                .collect();
            v.sort_by(|a, b| a.peer.cmp(&b.peer));
            v
        };
        let mut node = self.inner.node.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers: Vec<PeerStatus> = node
            .topology()
            .peers()
            .filter(|p| p.name != self.inner.me)
            .map(|p| PeerStatus {
                name: p.name.to_string(),
                uid: p.uid,
                nickname: p.nickname.clone(),
                addr: p.addr.clone(),
                next_hop: None,
                connections: p.conns.keys().map(|c| c.to_string()).collect(),
            })
            .collect();
        for p in &mut peers {
            p.next_hop = node.routes().next_hop(&p.name).map(|h| h.to_string());
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let st = node.stats().clone();
        let c = &self.inner.counters;
        MeshStatus {
            name: self.inner.me.to_string(),
            uid: self.inner.uid,
            addr: self.inner.addr.clone(),
            peers,
            connections: conns,
            sent: st.sent.iter().map(|(k, (m, b))| (k.clone(), *m, *b)).collect(),
            received: st.received.iter().map(|(k, (m, b))| (k.clone(), *m, *b)).collect(),
            relayed: st.relayed,
            drops: vec![
                ("inbox_full", c.inbox_full.load(Ordering::Relaxed)),
                ("queue_full", c.queue_full.load(Ordering::Relaxed)),
                ("too_large", c.too_large.load(Ordering::Relaxed)),
                ("no_route", st.dropped_no_route),
                ("hop_limit", st.dropped_hops),
                ("bad_frames", c.bad_frames.load(Ordering::Relaxed)),
                ("bad_gossip", st.bad_gossip),
                ("refused_connections", c.refused.load(Ordering::Relaxed)),
            ],
            frames_out: c.frames_out.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            frames_in: c.frames_in.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
        }
    }

    // ---- tasks ----

    async fn accept_loop(self, listener: TcpListener) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, remote)) => {
                        let m = self.clone();
                        tokio::spawn(async move { m.run_conn(s, false, remote.to_string()).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a peer failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = wait_true(&mut stop) => return,
            }
        }
    }

    async fn tick_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut t = tokio::time::interval(self.inner.cfg.gossip_interval);
        loop {
            tokio::select! {
                _ = t.tick() => self.drive(|n| n.tick()),
                _ = wait_true(&mut stop) => return,
            }
        }
    }

    /// Addresses worth dialing now.
    fn dial_targets(&self) -> Vec<String> {
        let (connected_names, connected_addrs, n_conns) = {
            let conns = self.inner.conns.read().unwrap_or_else(|e| e.into_inner());
            let names: HashSet<PeerName> = conns.keys().cloned().collect();
            let addrs: HashSet<String> = conns.values().map(|c| c.addr.clone()).collect();
            (names, addrs, conns.len())
        };
        if n_conns >= self.inner.cfg.max_conns {
            return Vec::new();
        }
        let now = Instant::now();
        let mut book = self.inner.address_book.lock().unwrap_or_else(|e| e.into_inner());
        let mut known: Vec<(String, Option<PeerName>)> = Vec::new();
        {
            let node = self.inner.node.lock().unwrap_or_else(|e| e.into_inner());
            for p in node.topology().peers() {
                if p.name != self.inner.me && !p.addr.is_empty() {
                    book.insert(p.addr.clone(), now);
                    known.push((p.addr.clone(), Some(p.name.clone())));
                }
            }
        }
        book.retain(|_, seen| now.duration_since(*seen) < Duration::from_secs(600));
        let in_topology: HashSet<String> = known.iter().map(|(a, _)| a.clone()).collect();
        known.extend(book.keys().filter(|a| !in_topology.contains(*a)).map(|a| (a.clone(), None)));
        known.extend(self.inner.cfg.join.iter().map(|a| (a.clone(), None)));
        drop(book);
        let dialing = self.inner.dialing.lock().unwrap_or_else(|e| e.into_inner());
        let backoff = self.inner.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = known
            .into_iter()
            .filter(|(a, name)| {
                *a != self.inner.addr
                    && !connected_addrs.contains(a)
                    && !name.as_ref().is_some_and(|n| connected_names.contains(n))
                    && !dialing.contains(a)
                    && backoff.get(a).is_none_or(|b| b.next <= now)
            })
            .map(|(a, _)| a)
            .collect();
        out.sort();
        out.dedup();
        let room = self.inner.cfg.max_conns - n_conns;
        // Spread the choice so that large meshes do not all dial the same few peers.
        let mut rng = rand::rng();
        while out.len() > room {
            let i = rng.random_range(0..out.len());
            out.swap_remove(i);
        }
        out
    }

    async fn maker_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut t = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = t.tick() => {}
                _ = wait_true(&mut stop) => return,
            }
            for addr in self.dial_targets() {
                self.inner.dialing.lock().unwrap_or_else(|e| e.into_inner()).insert(addr.clone());
                let m = self.clone();
                tokio::spawn(async move {
                    let ok = m.dial(&addr).await;
                    m.inner.dialing.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
                    let mut b = m.inner.backoff.lock().unwrap_or_else(|e| e.into_inner());
                    if ok {
                        b.remove(&addr);
                    } else {
                        let cfg = &m.inner.cfg;
                        let delay = b.get(&addr).map_or(cfg.backoff_min, |x| (x.delay * 2).min(cfg.backoff_max));
                        let jitter = rand::rng().random_range(0.75..1.25);
                        b.insert(addr.clone(), Backoff { next: Instant::now() + delay.mul_f64(jitter), delay });
                    }
                });
            }
        }
    }

    /// Dials `addr` and runs the connection; true if it was established.
    async fn dial(&self, addr: &str) -> bool {
        let connect = tokio::time::timeout(self.inner.cfg.handshake_timeout, TcpStream::connect(addr)).await;
        match connect {
            Ok(Ok(s)) => {
                let m = self.clone();
                let addr = addr.to_string();
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move { m.run_conn_notify(s, true, addr, Some(tx)).await });
                rx.await.unwrap_or(false)
            }
            _ => false,
        }
    }

    async fn run_conn(&self, s: TcpStream, outbound: bool, addr: String) {
        self.run_conn_notify(s, outbound, addr, None).await
    }

    /// Handshakes, registers, and serves one connection until it ends.
    async fn run_conn_notify(
        &self,
        mut s: TcpStream,
        outbound: bool,
        addr: String,
        up: Option<tokio::sync::oneshot::Sender<bool>>,
    ) {
        let _ = s.set_nodelay(true);
        let hello = Hello {
            protocol_version: self.inner.cfg.protocol,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            cluster: self.inner.cfg.cluster.clone(),
            name: self.inner.me.to_string(),
            uid: self.inner.uid,
            nickname: self.inner.cfg.nickname.clone(),
            addr: self.inner.addr.clone(),
            // The cluster id first: founders are set before it, so a hello that names a
            // cluster names its founders too.
            cluster_id: self.inner.cfg.cluster_id.load(Ordering::Acquire),
            founders: self.inner.founders.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        let hs = tokio::time::timeout(
            self.inner.cfg.handshake_timeout,
            secure::handshake(&mut s, outbound, &self.inner.psk, &hello),
        )
        .await;
        let est = match hs {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                if let secure::SecureError::Version { .. } = e {
                    // An operator's mistake to be told of, unlike a stranger's knock.
                    tracing::warn!(%addr, error = %e, "refusing mesh peer");
                } else {
                    tracing::debug!(%addr, error = %e, "mesh handshake failed");
                }
                if let Some(up) = up {
                    let _ = up.send(false);
                }
                return;
            }
            Err(_) => {
                self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "mesh handshake timed out");
                if let Some(up) = up {
                    let _ = up.send(false);
                }
                return;
            }
        };
        let Established { sealer, opener, remote, version } = est;
        let peer = PeerName::from(remote.name.as_str());
        // Inbound connections are known by the address the peer advertises.
        let addr = if outbound || remote.addr.is_empty() { addr } else { remote.addr.clone() };
        let ours = self.inner.cfg.cluster_id.load(Ordering::Relaxed);
        if ours != 0 && remote.cluster_id != 0 && remote.cluster_id != ours {
            self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %addr, %peer,
                "refusing mesh peer: it belongs to cluster {:x}, this member to cluster {ours:x}; \
                 a member's data dir cannot move between clusters",
                remote.cluster_id
            );
            if let Some(up) = up {
                let _ = up.send(false);
            }
            return;
        }
        let refuse = if peer == self.inner.me {
            Some("it is ourselves")
        } else if peer.is_empty() {
            Some("it has no name")
        } else if self.is_blocked(&peer) {
            Some("it is blocked")
        } else {
            None
        };
        if refuse.is_none() && remote.cluster_id != 0 {
            if !remote.founders.is_empty() {
                *self.inner.founders_seen.lock().unwrap_or_else(|e| e.into_inner()) = remote.founders.clone();
            }
            self.inner.cluster_seen.store(remote.cluster_id, Ordering::Release);
        }
        if let Some(why) = refuse {
            self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%addr, %peer, why, "mesh connection refused");
            if let Some(up) = up {
                let _ = up.send(false);
            }
            return;
        }
        let Some((id, control_rx, bulk_rx, close_rx)) =
            self.register(&peer, remote.uid, outbound, addr.clone(), version)
        else {
            if let Some(up) = up {
                // A duplicate of a connection we keep: the peer is reachable all the same.
                let _ = up.send(true);
            }
            return;
        };
        if let Some(up) = up {
            let _ = up.send(true);
        }
        tracing::info!(%peer, %addr, outbound, protocol = version, "mesh connection up");
        let (r, w) = s.into_split();
        let writer =
            tokio::spawn(self.clone().write_loop(w, sealer, peer.clone(), control_rx, bulk_rx, close_rx.clone()));
        // Buffered: a batch of sealed chunks arrives in one read, not two reads a chunk.
        let r = tokio::io::BufReader::with_capacity(128 * 1024, r);
        self.read_loop(r, opener, peer.clone(), close_rx).await;
        writer.abort();
        self.unregister(&peer, id);
        tracing::info!(%peer, "mesh connection down");
    }

    /// Records a new connection; None if an existing one to the same peer wins.
    #[allow(clippy::type_complexity)]
    fn register(
        &self,
        peer: &PeerName,
        uid: u64,
        outbound: bool,
        addr: String,
        protocol: u32,
    ) -> Option<(u64, mpsc::Receiver<Bytes>, mpsc::Receiver<Bytes>, watch::Receiver<bool>)> {
        let mut conns = self.inner.conns.write().unwrap_or_else(|e| e.into_inner());
        let mut replaced = false;
        if let Some(old) = conns.get(peer) {
            if old.uid == uid {
                // Two connections between the same two peers: both ends keep the one
                // dialed by the peer whose name sorts first.
                let old_dialed_by_smaller = old.outbound == (self.inner.me < *peer);
                if old_dialed_by_smaller {
                    return None;
                }
            }
            // A restarted peer (new UID), or the duplicate that loses: the old one goes.
            let _ = old.close.send(true);
            replaced = true;
        } else if conns.len() >= self.inner.cfg.hard_max_conns {
            self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let (control, control_rx) = mpsc::channel(self.inner.cfg.control_queue);
        let (bulk, bulk_rx) = mpsc::channel(self.inner.cfg.bulk_queue);
        let (close, close_rx) = watch::channel(false);
        let since = Instant::now();
        conns.insert(peer.clone(), ConnHandle { id, uid, outbound, addr, protocol, since, control, bulk, close });
        drop(conns);
        self.drive(|n| {
            if replaced {
                // The neighbour may be a new incarnation: let it have everything again.
                n.connection_down(peer);
            }
            n.connection_up(peer.clone())
        });
        Some((id, control_rx, bulk_rx, close_rx))
    }

    fn unregister(&self, peer: &PeerName, id: u64) {
        let mut conns = self.inner.conns.write().unwrap_or_else(|e| e.into_inner());
        if conns.get(peer).is_some_and(|c| c.id == id) {
            conns.remove(peer);
            drop(conns);
            self.drive(|n| n.connection_down(peer));
        }
    }

    async fn read_loop(
        &self,
        mut r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
        mut opener: Opener,
        peer: PeerName,
        mut close: watch::Receiver<bool>,
    ) {
        let dead_after = self.inner.cfg.dead_after;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(dead_after, opener.read_frame(&mut r)) => f,
                _ = wait_true(&mut close) => return,
            };
            let body = match frame {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "mesh connection closed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, after = ?dead_after, "mesh peer silent; dropping the connection");
                    return;
                }
            };
            if self.is_blocked(&peer) {
                continue;
            }
            self.inner.counters.frames_in.fetch_add(1, Ordering::Relaxed);
            self.inner.counters.bytes_in.fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
            match wire::decode(&body) {
                Ok(Incoming::Heartbeat) => {}
                Ok(Incoming::Msg(_)) if self.is_deaf_to(&peer) => {}
                Ok(Incoming::Msg(m)) => self.drive(|n| n.handle(&peer, m)),
                Err(e) => {
                    self.inner.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, "undecodable mesh frame; closing");
                    return;
                }
            }
        }
    }

    async fn write_loop(
        self,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        mut sealer: Sealer,
        peer: PeerName,
        mut control: mpsc::Receiver<Bytes>,
        mut bulk: mpsc::Receiver<Bytes>,
        mut close: watch::Receiver<bool>,
    ) {
        let mut hb = tokio::time::interval(self.inner.cfg.heartbeat);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut plain = Vec::with_capacity(64 * 1024);
        const BATCH: usize = 256 * 1024;
        loop {
            out.clear();
            let first = tokio::select! {
                biased;
                _ = wait_true(&mut close) => return,
                f = control.recv() => match f { Some(f) => f, None => return },
                _ = hb.tick() => wire::heartbeat(),
                f = bulk.recv() => match f { Some(f) => f, None => return },
            };
            // One plaintext for the whole batch, sealed in as few chunks as fit: the
            // reader's framer finds the frames again whatever the chunk boundaries.
            // Control first, then bulk, up to one batch per write.
            plain.clear();
            plain.extend_from_slice(&first);
            let mut frames = 1u64;
            while plain.len() < BATCH {
                let Ok(f) = control.try_recv().or_else(|_| bulk.try_recv()) else { break };
                plain.extend_from_slice(&f);
                frames += 1;
            }
            if self.is_blocked(&peer) {
                continue;
            }
            if sealer.seal_into(&plain, &mut out).is_err() {
                return;
            }
            self.inner.counters.frames_out.fetch_add(frames, Ordering::Relaxed);
            self.inner.counters.bytes_out.fetch_add(plain.len() as u64, Ordering::Relaxed);
            if w.write_all(&out).await.is_err() {
                return;
            }
            hb.reset();
        }
    }
}

/// Resolves once the flag is set (or its sender is gone).
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Connects a mesh as a datagram socket: the face the Raft layer sees.
#[derive(Clone)]
pub struct MeshConn {
    mesh: Mesh,
}

impl MeshConn {
    pub fn new(mesh: Mesh) -> Self {
        Self { mesh }
    }

    /// Sends a best-effort datagram; errors say why it was not even sent.
    pub fn send_to(&self, peer: &str, data: Bytes, prio: Priority) -> Result<(), SendError> {
        self.mesh.send_to(peer, data, prio)
    }

    /// The next datagram for us: (source peer, payload).
    pub async fn recv_from(&self) -> Option<(PeerName, Bytes)> {
        self.mesh.recv_from().await
    }

    pub fn max_datagram(&self) -> usize {
        self.mesh.max_datagram()
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }
}

//! The pure mesh node: topology, routes and gossip channels of one peer, as a state
//! machine. Events go in (a connection came up or down, a message arrived, a tick, a
//! local send); messages to neighbours come out of [`Node::take_out`] and datagrams for
//! this peer out of [`Node::take_datagrams`]. No sockets, no clock, no threads: the
//! simulator and the tokio edge drive the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::SeedableRng;

use super::gossip::GossipData;
use super::peer::{PeerInfo, PeerName};
use super::routes::Routes;
use super::topology::Topology;

/// Tuning of the gossip.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Neighbours each channel's full state goes to at every tick (anti-entropy).
    pub gossip_fanout: usize,
    /// Ticks between sending the whole topology to one random neighbour.
    pub topology_every: u64,
    /// Hops after which a relayed datagram is dropped.
    pub max_hops: u8,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self { gossip_fanout: 3, topology_every: 10, max_hops: 32 }
    }
}

/// What neighbours say to each other.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// Topology entries: a delta, or everything for a new neighbour.
    Topology(Vec<PeerInfo>),
    /// A channel's state, neighbour to neighbour (anti-entropy, or a new neighbour).
    Gossip { channel: String, payload: Bytes },
    /// A channel's delta from `src`, forwarded down `src`'s spanning tree.
    Broadcast { channel: String, src: PeerName, payload: Bytes },
    /// A datagram from `src` to `dst`, relayed hop by hop.
    Unicast { src: PeerName, dst: PeerName, hops: u8, bulk: bool, payload: Bytes },
}

impl Msg {
    /// Bytes this message takes on the wire, near enough for accounting.
    pub fn wire_size(&self) -> usize {
        4 + match self {
            Msg::Topology(ps) => ps.iter().map(PeerInfo::wire_size).sum(),
            Msg::Gossip { channel, payload } => channel.len() + payload.len() + 4,
            Msg::Broadcast { channel, src, payload } => channel.len() + src.len() + payload.len() + 6,
            Msg::Unicast { src, dst, payload, .. } => src.len() + dst.len() + payload.len() + 8,
        }
    }

    /// Control messages go ahead of bulk ones.
    pub fn is_bulk(&self) -> bool {
        matches!(self, Msg::Unicast { bulk: true, .. })
    }
}

/// Counters of what a node sent, received, relayed and dropped.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    /// Per channel ("topology", "unicast", or a gossip channel's name): messages and bytes.
    pub sent: BTreeMap<String, (u64, u64)>,
    pub received: BTreeMap<String, (u64, u64)>,
    pub relayed: u64,
    pub dropped_no_route: u64,
    pub dropped_hops: u64,
    pub bad_gossip: u64,
}

/// A datagram could not be sent: no route to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no route to peer {0}")]
pub struct NoRoute(pub PeerName);

fn channel_of(m: &Msg) -> &str {
    match m {
        Msg::Topology(_) => "topology",
        Msg::Gossip { channel, .. } | Msg::Broadcast { channel, .. } => channel,
        Msg::Unicast { .. } => "unicast",
    }
}

/// One peer's mesh state.
pub struct Node {
    cfg: NodeConfig,
    topo: Topology,
    routes: Option<Routes>,
    neighbours: BTreeSet<PeerName>,
    channels: BTreeMap<String, Box<dyn GossipData>>,
    rng: StdRng,
    ticks: u64,
    out: Vec<(PeerName, Msg)>,
    datagrams: Vec<(PeerName, Bytes)>,
    stats: NodeStats,
}

impl Node {
    pub fn new(me: PeerInfo, cfg: NodeConfig, seed: u64) -> Self {
        Self {
            cfg,
            topo: Topology::new(me),
            routes: None,
            neighbours: BTreeSet::new(),
            channels: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
            ticks: 0,
            out: Vec::new(),
            datagrams: Vec::new(),
            stats: NodeStats::default(),
        }
    }

    pub fn name(&self) -> &PeerName {
        self.topo.my_name()
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    pub fn neighbours(&self) -> &BTreeSet<PeerName> {
        &self.neighbours
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Registers a gossip channel.
    pub fn add_channel(&mut self, name: &str, data: Box<dyn GossipData>) {
        self.channels.insert(name.to_string(), data);
    }

    /// A channel's data, for its owner to read or change (then [`Node::broadcast`] the delta).
    pub fn channel_mut<T: GossipData>(&mut self, name: &str) -> Option<&mut T> {
        self.channels.get_mut(name).and_then(|d| d.as_any_mut().downcast_mut::<T>())
    }

    pub fn channel<T: GossipData>(&self, name: &str) -> Option<&T> {
        self.channels.get(name).and_then(|d| d.as_any().downcast_ref::<T>())
    }

    pub fn routes(&mut self) -> &mut Routes {
        let topo = &self.topo;
        self.routes.get_or_insert_with(|| Routes::compute(topo))
    }

    /// Peers reachable over confirmed connections (ourselves excluded).
    pub fn reachable(&mut self) -> Vec<PeerName> {
        let mut v: Vec<PeerName> = self.routes().reachable().cloned().collect();
        v.sort();
        v
    }

    /// Messages to send: (neighbour, message).
    pub fn take_out(&mut self) -> Vec<(PeerName, Msg)> {
        std::mem::take(&mut self.out)
    }

    /// Datagrams that arrived for this peer: (source, payload).
    pub fn take_datagrams(&mut self) -> Vec<(PeerName, Bytes)> {
        std::mem::take(&mut self.datagrams)
    }

    fn send(&mut self, to: PeerName, m: Msg) {
        let e = self.stats.sent.entry(channel_of(&m).to_string()).or_default();
        e.0 += 1;
        e.1 += m.wire_size() as u64;
        self.out.push((to, m));
    }

    fn topology_changed(&mut self) {
        self.routes = None;
    }

    fn announce(&mut self, delta: Vec<PeerInfo>, except: Option<&PeerName>) {
        if delta.is_empty() {
            return;
        }
        let to: Vec<PeerName> = self.neighbours.iter().filter(|n| Some(*n) != except).cloned().collect();
        for n in to {
            self.send(n, Msg::Topology(delta.clone()));
        }
    }

    /// A connection to `peer` is established (after its handshake).
    pub fn connection_up(&mut self, peer: PeerName) {
        if !self.neighbours.insert(peer.clone()) {
            return;
        }
        let me = self.topo.update_me(|m| {
            m.conns.insert(peer.clone(), ());
        });
        self.topology_changed();
        // The new neighbour gets everything; the others hear of the new link.
        self.send(peer.clone(), Msg::Topology(self.topo.all()));
        self.announce(vec![me], Some(&peer));
        let full: Vec<(String, Bytes)> = self.channels.iter().map(|(k, d)| (k.clone(), d.encode())).collect();
        for (channel, payload) in full {
            self.send(peer.clone(), Msg::Gossip { channel, payload });
        }
    }

    /// The connection to `peer` is gone.
    pub fn connection_down(&mut self, peer: &PeerName) {
        if !self.neighbours.remove(peer) {
            return;
        }
        let me = self.topo.update_me(|m| {
            m.conns.remove(peer);
        });
        self.topo.gc();
        self.topology_changed();
        self.announce(vec![me], None);
    }

    /// Handles a message from neighbour `from`.
    pub fn handle(&mut self, from: &PeerName, m: Msg) {
        let e = self.stats.received.entry(channel_of(&m).to_string()).or_default();
        e.0 += 1;
        e.1 += m.wire_size() as u64;
        match m {
            Msg::Topology(updates) => {
                let merged = self.topo.merge(updates);
                if merged.delta.is_empty() {
                    return;
                }
                self.topology_changed();
                let mine = self.name().clone();
                let (own, others): (Vec<PeerInfo>, Vec<PeerInfo>) =
                    merged.delta.into_iter().partition(|p| p.name == mine);
                self.announce(others, Some(from));
                self.announce(own, None);
            }
            Msg::Gossip { channel, payload } => {
                if let Some(news) = self.merge_channel(&channel, &payload) {
                    // News to us is news to others: pass it on as our own broadcast.
                    self.broadcast(&channel, news);
                }
            }
            Msg::Broadcast { channel, src, payload } => {
                let _ = self.merge_channel(&channel, &payload);
                self.forward_broadcast(channel, src, payload);
            }
            Msg::Unicast { src, dst, hops, bulk, payload } => {
                if dst == *self.name() {
                    self.datagrams.push((src, payload));
                } else if hops >= self.cfg.max_hops {
                    self.stats.dropped_hops += 1;
                } else {
                    self.stats.relayed += 1;
                    self.route(Msg::Unicast { src, dst, hops: hops + 1, bulk, payload });
                }
            }
        }
    }

    fn merge_channel(&mut self, channel: &str, payload: &[u8]) -> Option<Bytes> {
        let data = self.channels.get_mut(channel)?;
        match data.merge(payload) {
            Ok(news) => news,
            Err(e) => {
                self.stats.bad_gossip += 1;
                tracing::debug!(channel, error = %e, "gossip dropped");
                None
            }
        }
    }

    fn forward_broadcast(&mut self, channel: String, src: PeerName, payload: Bytes) {
        let kids: Vec<PeerName> = {
            let topo = &self.topo;
            let routes = self.routes.get_or_insert_with(|| Routes::compute(topo));
            routes.broadcast_children(topo, &src).to_vec()
        };
        for k in kids {
            if self.neighbours.contains(&k) {
                self.send(k, Msg::Broadcast { channel: channel.clone(), src: src.clone(), payload: payload.clone() });
            }
        }
    }

    /// Sends a channel delta made here to every peer, down our spanning tree.
    pub fn broadcast(&mut self, channel: &str, delta: Bytes) {
        let me = self.name().clone();
        self.forward_broadcast(channel.to_string(), me, delta);
    }

    fn route(&mut self, m: Msg) {
        let Msg::Unicast { dst, .. } = &m else { return };
        let hop = self.routes().next_hop(dst).cloned();
        match hop {
            Some(h) if self.neighbours.contains(&h) => self.send(h, m),
            _ => self.stats.dropped_no_route += 1,
        }
    }

    /// Sends a datagram to `dst`, relayed if there is no direct link.
    pub fn send_to(&mut self, dst: &PeerName, payload: Bytes, bulk: bool) -> Result<(), NoRoute> {
        if self.routes().next_hop(dst).is_none() {
            self.stats.dropped_no_route += 1;
            return Err(NoRoute(dst.clone()));
        }
        let src = self.name().clone();
        self.route(Msg::Unicast { src, dst: dst.clone(), hops: 0, bulk, payload });
        Ok(())
    }

    /// Periodic work: anti-entropy for every channel, now and then the whole topology,
    /// and forgetting unreachable peers.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.topo.gc().into_iter().next().is_some() {
            self.topology_changed();
        }
        if self.neighbours.is_empty() {
            return;
        }
        let states: Vec<(String, Bytes)> = self.channels.iter().map(|(k, d)| (k.clone(), d.encode())).collect();
        for (channel, payload) in states {
            let to: Vec<PeerName> =
                self.neighbours.iter().cloned().choose_multiple(&mut self.rng, self.cfg.gossip_fanout);
            for n in to {
                self.send(n, Msg::Gossip { channel: channel.clone(), payload: payload.clone() });
            }
        }
        if self.cfg.topology_every > 0 && self.ticks % self.cfg.topology_every == 0 {
            if let Some(n) = self.neighbours.iter().cloned().choose(&mut self.rng) {
                self.send(n, Msg::Topology(self.topo.all()));
            }
        }
    }

    /// Per-neighbour counts of messages waiting in `out`, for tests of fan-out.
    pub fn pending_by_neighbour(&self) -> HashMap<PeerName, usize> {
        let mut m = HashMap::new();
        for (n, _) in &self.out {
            *m.entry(n.clone()).or_default() += 1;
        }
        m
    }
}

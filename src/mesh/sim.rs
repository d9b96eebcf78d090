//! A deterministic, in-process mesh: many [`Node`]s linked by an in-memory network
//! under virtual time. Each round delivers every message sent in the round before (one
//! hop per round), so rounds measure how far gossip has to travel; every byte is
//! counted. Links can be cut and restored, and peers restarted, to test convergence.

use std::collections::{BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::gossip::GossipData;
use super::node::{Msg, Node, NodeConfig};
use super::peer::{PeerInfo, PeerName};

/// A simulated mesh.
pub struct Sim {
    pub nodes: Vec<Node>,
    names: Vec<PeerName>,
    index: HashMap<PeerName, usize>,
    links: BTreeSet<(usize, usize)>,
    in_flight: Vec<(usize, usize, Msg)>,
    rng: StdRng,
    cfg: NodeConfig,
    /// Rounds run so far.
    pub round: u64,
    /// Bytes and messages delivered so far.
    pub bytes: u64,
    pub messages: u64,
    /// Every Broadcast delivery: (receiver, source, payload).
    pub broadcasts_seen: Vec<(usize, PeerName, Bytes)>,
    /// Every datagram delivered: (receiver, source, payload).
    pub datagrams: Vec<(usize, PeerName, Bytes)>,
    /// Run a tick on every node each this many rounds (0: never).
    pub tick_every: u64,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// `n` peers named p0000…, not yet linked.
    pub fn new(n: usize, seed: u64, cfg: NodeConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let names: Vec<PeerName> = (0..n).map(|i| PeerName::from(format!("p{i:04}"))).collect();
        let nodes = names
            .iter()
            .map(|nm| Node::new(PeerInfo::new(nm.clone(), rng.random()), cfg.clone(), rng.random()))
            .collect();
        let index = names.iter().enumerate().map(|(i, nm)| (nm.clone(), i)).collect();
        Self {
            nodes,
            names,
            index,
            links: BTreeSet::new(),
            in_flight: Vec::new(),
            rng,
            cfg,
            round: 0,
            bytes: 0,
            messages: 0,
            broadcasts_seen: Vec::new(),
            datagrams: Vec::new(),
            tick_every: 0,
        }
    }

    pub fn name(&self, i: usize) -> &PeerName {
        &self.names[i]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn degree(&self, i: usize) -> usize {
        self.links.iter().filter(|(a, b)| *a == i || *b == i).count()
    }

    /// Links a random connected graph: a random tree, then random extra links, with at
    /// most `max_degree` links per peer and about `target_degree` on average.
    pub fn link_random(&mut self, target_degree: usize, max_degree: usize) {
        let n = self.len();
        let mut deg = vec![0usize; n];
        for i in 1..n {
            loop {
                let j = self.rng.random_range(0..i);
                if deg[j] < max_degree {
                    self.link(i, j);
                    deg[i] += 1;
                    deg[j] += 1;
                    break;
                }
            }
        }
        let extra = (n * target_degree / 2).saturating_sub(n - 1);
        let mut tries = 0;
        let mut added = 0;
        while added < extra && tries < extra * 20 {
            tries += 1;
            let (a, b) = (self.rng.random_range(0..n), self.rng.random_range(0..n));
            if a == b || deg[a] >= max_degree || deg[b] >= max_degree || self.links.contains(&key(a, b)) {
                continue;
            }
            self.link(a, b);
            deg[a] += 1;
            deg[b] += 1;
            added += 1;
        }
    }

    /// Establishes a connection between `a` and `b` (both ends learn at once).
    pub fn link(&mut self, a: usize, b: usize) {
        if a == b || !self.links.insert(key(a, b)) {
            return;
        }
        let (na, nb) = (self.names[a].clone(), self.names[b].clone());
        self.nodes[a].connection_up(nb);
        self.nodes[b].connection_up(na);
        self.collect(a);
        self.collect(b);
    }

    /// Cuts the connection between `a` and `b`; messages in flight on it are lost.
    pub fn unlink(&mut self, a: usize, b: usize) {
        if !self.links.remove(&key(a, b)) {
            return;
        }
        self.in_flight.retain(|(f, t, _)| key(*f, *t) != key(a, b));
        let (na, nb) = (self.names[a].clone(), self.names[b].clone());
        self.nodes[a].connection_down(&nb);
        self.nodes[b].connection_down(&na);
        self.collect(a);
        self.collect(b);
    }

    /// Cuts every link between `side` and the rest; returns the cut links.
    pub fn partition(&mut self, side: &HashSet<usize>) -> Vec<(usize, usize)> {
        let cut: Vec<(usize, usize)> =
            self.links.iter().filter(|(a, b)| side.contains(a) != side.contains(b)).copied().collect();
        for (a, b) in &cut {
            self.unlink(*a, *b);
        }
        cut
    }

    /// Restarts peer `i`: a new incarnation (new UID, fresh state) with the same name and
    /// the same links, which come back after the old ones dropped.
    pub fn restart(&mut self, i: usize, channels: impl FnOnce(&mut Node)) -> u64 {
        let links: Vec<(usize, usize)> = self.links.iter().filter(|(a, b)| *a == i || *b == i).copied().collect();
        for (a, b) in &links {
            self.unlink(*a, *b);
        }
        let uid = self.rng.random();
        let mut node = Node::new(PeerInfo::new(self.names[i].clone(), uid), self.cfg.clone(), self.rng.random());
        channels(&mut node);
        self.nodes[i] = node;
        for (a, b) in links {
            self.link(a, b);
        }
        uid
    }

    fn collect(&mut self, i: usize) {
        for (to, m) in self.nodes[i].take_out() {
            if let Some(&j) = self.index.get(&to) {
                if self.links.contains(&key(i, j)) {
                    self.in_flight.push((i, j, m));
                }
            }
        }
    }

    /// Runs one round; returns the number of messages delivered.
    pub fn step(&mut self) -> usize {
        self.round += 1;
        let batch = std::mem::take(&mut self.in_flight);
        let n = batch.len();
        for (from, to, m) in batch {
            self.bytes += m.wire_size() as u64;
            self.messages += 1;
            if let Msg::Broadcast { src, payload, .. } = &m {
                self.broadcasts_seen.push((to, src.clone(), payload.clone()));
            }
            let from_name = self.names[from].clone();
            self.nodes[to].handle(&from_name, m);
            for (src, payload) in self.nodes[to].take_datagrams() {
                self.datagrams.push((to, src, payload));
            }
            self.collect(to);
        }
        if self.tick_every > 0 && self.round % self.tick_every == 0 {
            for i in 0..self.len() {
                self.nodes[i].tick();
                self.collect(i);
            }
        }
        n
    }

    /// Runs rounds until nothing is in flight (or `max` rounds); returns rounds run.
    pub fn run_until_quiet(&mut self, max: u64) -> u64 {
        let start = self.round;
        while !self.in_flight.is_empty() && self.round - start < max {
            self.step();
        }
        self.round - start
    }

    /// Runs exactly `rounds` rounds.
    pub fn run(&mut self, rounds: u64) {
        for _ in 0..rounds {
            self.step();
        }
    }

    /// Whether every peer's topology view is the same and covers every peer.
    pub fn converged(&self) -> bool {
        let f = self.nodes[0].topology().fingerprint();
        self.nodes.iter().all(|n| n.topology().len() == self.len() && n.topology().fingerprint() == f)
    }

    /// Whether the peers in `group` agree with each other and see exactly `group`.
    pub fn converged_within(&self, group: &HashSet<usize>) -> bool {
        let Some(&first) = group.iter().next() else { return true };
        let f = self.nodes[first].topology().fingerprint();
        group
            .iter()
            .all(|&i| self.nodes[i].topology().len() == group.len() && self.nodes[i].topology().fingerprint() == f)
    }

    /// The connected components of the current links.
    pub fn components(&self) -> Vec<HashSet<usize>> {
        let mut comp: Vec<Option<usize>> = vec![None; self.len()];
        let mut out: Vec<HashSet<usize>> = Vec::new();
        for start in 0..self.len() {
            if comp[start].is_some() {
                continue;
            }
            let id = out.len();
            let mut set = HashSet::new();
            let mut stack = vec![start];
            comp[start] = Some(id);
            while let Some(p) = stack.pop() {
                set.insert(p);
                for &(a, b) in &self.links {
                    let q = if a == p {
                        b
                    } else if b == p {
                        a
                    } else {
                        continue;
                    };
                    if comp[q].is_none() {
                        comp[q] = Some(id);
                        stack.push(q);
                    }
                }
            }
            out.push(set);
        }
        out
    }

    /// Adds a gossip channel to every peer.
    pub fn add_channel(&mut self, name: &str, make: impl Fn() -> Box<dyn GossipData>) {
        for n in &mut self.nodes {
            n.add_channel(name, make());
        }
    }

    /// Lets peer `i` act: runs `f` on its node and sends what it produced.
    pub fn act<R>(&mut self, i: usize, f: impl FnOnce(&mut Node) -> R) -> R {
        let r = f(&mut self.nodes[i]);
        self.collect(i);
        r
    }
}

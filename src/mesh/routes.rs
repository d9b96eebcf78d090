//! Routes, recomputed whenever the topology changes.
//!
//! Unicast: the next hop towards every reachable peer, by breadth-first search from us
//! over confirmed connections (both ends list each other). Broadcast: for each source, a
//! spanning tree by breadth-first search from that source; a peer forwards a broadcast
//! only to its children in the source's tree. Neighbours are visited in name order, so
//! every peer with the same view computes the same trees, and a broadcast on a stable
//! topology reaches each peer exactly once.

use std::collections::{HashMap, VecDeque};

use super::peer::PeerName;
use super::topology::Topology;

/// Unicast next hops, and broadcast children per source (computed on first use).
#[derive(Debug, Default)]
pub struct Routes {
    next_hop: HashMap<PeerName, PeerName>,
    children: HashMap<PeerName, Vec<PeerName>>,
}

/// Parent of every peer reached by a breadth-first search from `root`.
fn bfs(topo: &Topology, root: &PeerName, mut visit: impl FnMut(&PeerName, &PeerName)) {
    let mut seen = std::collections::HashSet::new();
    let mut queue = VecDeque::new();
    seen.insert(root.clone());
    queue.push_back(root.clone());
    while let Some(p) = queue.pop_front() {
        for n in topo.neighbours(&p) {
            if seen.insert(n.clone()) {
                visit(n, &p);
                queue.push_back(n.clone());
            }
        }
    }
}

impl Routes {
    pub fn compute(topo: &Topology) -> Self {
        let me = topo.my_name().clone();
        let mut parent: HashMap<PeerName, PeerName> = HashMap::new();
        let mut order = Vec::new();
        bfs(topo, &me, |n, p| {
            parent.insert(n.clone(), p.clone());
            order.push(n.clone());
        });
        let mut next_hop = HashMap::new();
        // BFS order: a node's parent is resolved before the node.
        for n in order {
            let p = &parent[&n];
            let hop = if *p == me { n.clone() } else { next_hop.get(p).cloned().unwrap_or_else(|| n.clone()) };
            next_hop.insert(n, hop);
        }
        Self { next_hop, children: HashMap::new() }
    }

    /// The neighbour to hand a datagram for `dst` to.
    pub fn next_hop(&self, dst: &str) -> Option<&PeerName> {
        self.next_hop.get(dst)
    }

    pub fn reachable(&self) -> impl Iterator<Item = &PeerName> {
        self.next_hop.keys()
    }

    /// Our children in the spanning tree of broadcasts from `src`.
    pub fn broadcast_children(&mut self, topo: &Topology, src: &PeerName) -> &[PeerName] {
        let me = topo.my_name().clone();
        self.children.entry(src.clone()).or_insert_with(|| {
            let mut kids = Vec::new();
            bfs(topo, src, |n, p| {
                if *p == me {
                    kids.push(n.clone());
                }
            });
            kids
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peer::PeerInfo;

    /// A line a - b - c - d, each knowing the whole topology.
    fn line(me: &str) -> Topology {
        let links = [("a", vec!["b"]), ("b", vec!["a", "c"]), ("c", vec!["b", "d"]), ("d", vec!["c"])];
        let infos: Vec<PeerInfo> = links
            .iter()
            .map(|(n, cs)| {
                let mut p = PeerInfo::new(*n, 1);
                p.conns = cs.iter().map(|c| (PeerName::from(*c), ())).collect();
                p
            })
            .collect();
        let mut t = Topology::new(infos.iter().find(|p| p.name.as_ref() == me).unwrap().clone());
        t.merge(infos);
        t
    }

    #[test]
    fn unicast_next_hops_follow_shortest_paths() {
        let t = line("a");
        let r = Routes::compute(&t);
        assert_eq!(r.next_hop("d").map(|s| s.as_ref()), Some("b"));
        assert_eq!(r.next_hop("b").map(|s| s.as_ref()), Some("b"));
        assert_eq!(r.next_hop("a"), None);
        let t = line("c");
        let r = Routes::compute(&t);
        assert_eq!(r.next_hop("a").map(|s| s.as_ref()), Some("b"));
    }

    #[test]
    fn broadcast_trees_forward_away_from_the_source() {
        let t = line("b");
        let mut r = Routes::compute(&t);
        assert_eq!(r.broadcast_children(&t, &PeerName::from("a")), [PeerName::from("c")]);
        assert!(r.broadcast_children(&t, &PeerName::from("c")).iter().map(|s| s.as_ref()).eq(["a"]));
    }
}

//! The topology CRDT: every peer's latest [`PeerInfo`], merged by highest version.
//!
//! Merging returns the delta — the entries that improved this view — which is all that
//! is gossiped onward, so a change costs one small message per link, not the world.
//! Entries about peers no longer reachable from us are forgotten (garbage collected),
//! and an update about an old incarnation of ourselves is answered by bumping our own
//! version above it, so the live incarnation wins everywhere.

use std::collections::{HashMap, VecDeque};

use super::peer::{PeerInfo, PeerName};

/// One peer's view of the mesh.
#[derive(Clone, Debug)]
pub struct Topology {
    me: PeerName,
    peers: HashMap<PeerName, PeerInfo>,
}

/// What a merge changed.
#[derive(Debug, Default)]
pub struct Merged {
    /// Entries that improved our view (our own re-announcement included): forward these.
    pub delta: Vec<PeerInfo>,
}

impl Topology {
    pub fn new(me: PeerInfo) -> Self {
        let name = me.name.clone();
        let mut peers = HashMap::new();
        peers.insert(name.clone(), me);
        Self { me: name, peers }
    }

    pub fn me(&self) -> &PeerInfo {
        &self.peers[&self.me]
    }

    pub fn my_name(&self) -> &PeerName {
        &self.me
    }

    pub fn get(&self, name: &str) -> Option<&PeerInfo> {
        self.peers.get(name)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.values()
    }

    /// Every entry: the full state sent to a new neighbour.
    pub fn all(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self.peers.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Changes our own entry and bumps its version; returns it, to announce.
    pub fn update_me(&mut self, f: impl FnOnce(&mut PeerInfo)) -> PeerInfo {
        let me = self.peers.get_mut(&self.me).expect("own entry is never removed");
        f(me);
        me.version += 1;
        me.clone()
    }

    /// Merges entries from a neighbour.
    pub fn merge(&mut self, updates: Vec<PeerInfo>) -> Merged {
        let mut out = Merged::default();
        for u in updates {
            if u.name == self.me {
                let me = &self.peers[&self.me];
                let stale_self =
                    (u.uid != me.uid && u.version >= me.version) || (u.uid == me.uid && u.version > me.version);
                if stale_self {
                    // Someone holds an entry for our name that beats ours (an old incarnation,
                    // or our own from before a restart): outbid it.
                    let v = u.version;
                    out.delta.push(self.update_me(|m| m.version = m.version.max(v)));
                }
                continue;
            }
            let better = match self.peers.get(&u.name) {
                None => true,
                Some(cur) => u.version > cur.version || (u.version == cur.version && u.uid > cur.uid),
            };
            if better {
                self.peers.insert(u.name.clone(), u.clone());
                out.delta.push(u);
            }
        }
        out
    }

    /// Whether `a` and `b` both list a connection to each other.
    pub fn confirmed(&self, a: &str, b: &str) -> bool {
        let ab = self.peers.get(a).is_some_and(|p| p.conns.contains_key(b));
        let ba = self.peers.get(b).is_some_and(|p| p.conns.contains_key(a));
        ab && ba
    }

    /// Confirmed neighbours of `name`, in name order.
    pub fn neighbours<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a PeerName> + 'a {
        let own = self.peers.get(name);
        let name: PeerName = name.into();
        own.into_iter()
            .flat_map(|p| p.conns.keys())
            .filter(move |n| self.peers.get(n.as_ref()).is_some_and(|q| q.conns.contains_key(name.as_ref())))
    }

    /// Forgets peers that cannot be reached from us over confirmed connections;
    /// returns their names.
    pub fn gc(&mut self) -> Vec<PeerName> {
        let mut seen = std::collections::HashSet::new();
        let mut queue = VecDeque::new();
        seen.insert(self.me.clone());
        queue.push_back(self.me.clone());
        while let Some(p) = queue.pop_front() {
            let next: Vec<PeerName> = self.neighbours(&p).cloned().collect();
            for n in next {
                if seen.insert(n.clone()) {
                    queue.push_back(n);
                }
            }
        }
        let gone: Vec<PeerName> = self.peers.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for g in &gone {
            self.peers.remove(g);
        }
        gone
    }

    /// A fingerprint of (name, uid, version) over every entry: equal on two peers when
    /// their views agree.
    pub fn fingerprint(&self) -> u64 {
        let mut entries: Vec<(&str, u64, u64)> =
            self.peers.values().map(|p| (p.name.as_ref(), p.uid, p.version)).collect();
        entries.sort_unstable();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (n, u, v) in entries {
            for b in n.bytes().chain(u.to_le_bytes()).chain(v.to_le_bytes()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, uid: u64, version: u64, conns: &[&str]) -> PeerInfo {
        let mut p = PeerInfo::new(name, uid);
        p.version = version;
        p.conns = conns.iter().map(|c| (PeerName::from(*c), ())).collect();
        p
    }

    #[test]
    fn merge_keeps_the_highest_version_and_returns_only_news() {
        let mut t = Topology::new(info("a", 1, 1, &[]));
        let d = t.merge(vec![info("b", 7, 3, &["a"]), info("c", 8, 1, &[])]);
        assert_eq!(d.delta.len(), 2);
        let d = t.merge(vec![info("b", 7, 2, &[]), info("b", 7, 3, &["a"])]);
        assert!(d.delta.is_empty(), "old or equal versions are no news");
        let d = t.merge(vec![info("b", 7, 4, &[])]);
        assert_eq!(d.delta.len(), 1);
        assert!(t.get("b").unwrap().conns.is_empty());
    }

    #[test]
    fn an_old_incarnation_of_ourselves_is_outbid() {
        // We restarted as uid 2; a neighbour still holds our old entry at version 9.
        let mut t = Topology::new(info("a", 2, 1, &[]));
        let d = t.merge(vec![info("a", 1, 9, &["x"])]);
        assert_eq!(d.delta.len(), 1);
        let me = t.me();
        assert_eq!((me.uid, me.version), (2, 10));
        assert!(me.conns.is_empty());
        // Merged elsewhere, the new incarnation now wins.
        let mut other = Topology::new(info("z", 5, 1, &[]));
        other.merge(vec![info("a", 1, 9, &["x"])]);
        other.merge(d.delta);
        assert_eq!(other.get("a").unwrap().uid, 2);
    }

    #[test]
    fn unreachable_peers_are_forgotten() {
        let mut t = Topology::new(info("a", 1, 1, &["b"]));
        t.merge(vec![
            info("b", 1, 1, &["a", "c"]),
            info("c", 1, 1, &["b"]),
            info("d", 1, 1, &["e"]),
            info("e", 1, 1, &["d"]),
        ]);
        let mut gone = t.gc();
        gone.sort();
        assert_eq!(gone, vec![PeerName::from("d"), PeerName::from("e")]);
        assert_eq!(t.len(), 3);
        // A one-sided connection is not a path.
        t.merge(vec![info("c", 1, 2, &[])]);
        t.gc();
        assert_eq!(t.len(), 2);
    }
}

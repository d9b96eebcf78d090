//! Leases as the replicated state sees them: which exist, their granted TTL, the time
//! left at the leader's last checkpoint, and which keys each holds. When a lease runs out
//! is not part of it: only the leader keeps time, and it revokes through Raft like any
//! other write.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

/// etcd's largest lease TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

#[derive(Debug, Clone, Default)]
pub struct LeaseEntry {
    pub ttl: i64,
    /// Seconds left at the last checkpoint; 0: none stands.
    pub remaining: i64,
    /// The Raft index of the grant, if this member applied it since it started (0 if it
    /// was read from disk): a new leader tells the leases it inherits by it.
    pub granted_at: u64,
    pub keys: BTreeSet<Bytes>,
}

/// Every lease and the keys attached to it.
#[derive(Debug, Default)]
pub struct LeaseTable {
    leases: HashMap<i64, LeaseEntry>,
    /// The lease of each key that has one.
    key_lease: HashMap<Bytes, i64>,
}

impl LeaseTable {
    /// Builds the table from lease records (id, TTL, remaining at the last checkpoint) and
    /// the lease of each live key.
    pub fn rebuild(records: impl IntoIterator<Item = (i64, i64, i64)>, key_lease: HashMap<Bytes, i64>) -> Self {
        let mut leases: HashMap<i64, LeaseEntry> = records
            .into_iter()
            .map(|(id, ttl, remaining)| (id, LeaseEntry { ttl, remaining, ..Default::default() }))
            .collect();
        let mut kept = HashMap::with_capacity(key_lease.len());
        for (key, id) in key_lease {
            if let Some(l) = leases.get_mut(&id) {
                l.keys.insert(key.clone());
                kept.insert(key, id);
            }
        }
        Self { leases, key_lease: kept }
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    pub fn get(&self, id: i64) -> Option<&LeaseEntry> {
        self.leases.get(&id)
    }

    /// Every lease: (id, granted TTL, seconds left at the last checkpoint or 0).
    pub fn all(&self) -> Vec<(i64, i64, i64)> {
        let mut v: Vec<_> = self.leases.iter().map(|(id, l)| (*id, l.ttl, l.remaining)).collect();
        v.sort_unstable();
        v
    }

    /// Every lease, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &LeaseEntry)> {
        self.leases.iter().map(|(id, l)| (*id, l))
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Records a lease granted by the entry at Raft index `at`.
    pub fn grant(&mut self, id: i64, ttl: i64, at: u64) {
        self.leases.insert(id, LeaseEntry { ttl, granted_at: at, ..Default::default() });
    }

    /// Records the time left at a checkpoint (0 clears it); the lease's TTL, None if there
    /// is no such lease.
    pub fn checkpoint(&mut self, id: i64, remaining: i64) -> Option<i64> {
        let l = self.leases.get_mut(&id)?;
        l.remaining = remaining;
        Some(l.ttl)
    }

    /// Removes the lease; returns the keys it held.
    pub fn revoke(&mut self, id: i64) -> BTreeSet<Bytes> {
        let keys = self.leases.remove(&id).map(|l| l.keys).unwrap_or_default();
        for k in &keys {
            self.key_lease.remove(k);
        }
        keys
    }

    /// Records that `key` now has `lease` (0: none), detaching it from any other.
    pub fn attach(&mut self, key: &Bytes, lease: i64) {
        if self.key_lease.get(key) == Some(&lease) {
            return;
        }
        self.detach(key);
        if lease == 0 {
            return;
        }
        // Kept as a copy of its own bytes: `key` is a slice of the buffer it was decoded
        // from, which would otherwise stay alive as long as the key holds the lease.
        let key = Bytes::copy_from_slice(key);
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.insert(key.clone());
        }
        self.key_lease.insert(key, lease);
    }

    /// Records that `key` was deleted.
    pub fn detach(&mut self, key: &[u8]) {
        if let Some(old) = self.key_lease.remove(key) {
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_move_between_leases_and_leave_with_their_deletion() {
        let mut t = LeaseTable::default();
        t.grant(1, 10, 1);
        t.grant(2, 20, 2);
        let k = Bytes::from_static(b"k");
        t.attach(&k, 1);
        assert!(t.get(1).unwrap().keys.contains(&k));
        t.attach(&k, 2);
        assert!(t.get(1).unwrap().keys.is_empty());
        assert!(t.get(2).unwrap().keys.contains(&k));
        t.attach(&k, 0);
        assert!(t.get(2).unwrap().keys.is_empty());
        t.attach(&k, 1);
        t.detach(&k);
        assert!(t.get(1).unwrap().keys.is_empty());
        t.attach(&k, 1);
        assert_eq!(t.revoke(1).into_iter().collect::<Vec<_>>(), vec![k.clone()]);
        assert!(!t.contains(1));
        // A later put of the key with no lease finds nothing to detach.
        t.attach(&k, 0);
        assert_eq!(t.all(), vec![(2, 20, 0)]);
    }

    #[test]
    fn an_attached_key_does_not_keep_the_buffer_it_was_decoded_from() {
        let mut t = LeaseTable::default();
        t.grant(1, 10, 1);
        let entry = Bytes::from(vec![b'k'; 4096]);
        t.attach(&entry.slice(0..2), 1);
        assert!(entry.is_unique(), "the table holds a copy of the key, not a slice of the entry");
        assert!(t.get(1).unwrap().keys.contains(&Bytes::from_static(b"kk")));
    }

    #[test]
    fn rebuild_drops_attachments_to_leases_that_are_gone() {
        let mut key_lease = HashMap::new();
        key_lease.insert(Bytes::from_static(b"a"), 7);
        key_lease.insert(Bytes::from_static(b"b"), 8);
        let t = LeaseTable::rebuild([(7, 30, 12)], key_lease);
        assert_eq!(t.get(7).unwrap().remaining, 12);
        assert_eq!(t.get(7).unwrap().keys.len(), 1);
        assert!(!t.contains(8));
    }
}

//! The in-memory key index: for every key, its generations of revisions.
//!
//! A generation runs from a creation to a deletion (the tombstone). Values are not kept
//! here; they live in RocksDB under their revision. The index is rebuilt from RocksDB at
//! start, so it is never written to disk itself.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::revision::Revision;

/// One life of a key: created at `created`, changed at each of `revs`, ended by `tombstone`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Generation {
    /// Main revision of the creation; kept even after compaction trims `revs`.
    created: i64,
    /// Version of `revs[0]`; the version of `revs[i]` is `ver_base + i`.
    ver_base: i64,
    revs: Vec<Revision>,
    tombstone: Option<Revision>,
}

/// What the index knows of a key at a revision.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KeyAt {
    pub modified: Revision,
    pub created: i64,
    pub version: i64,
}

/// A revision entry that compaction removed, to delete from storage.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub rev: Revision,
    pub tombstone: bool,
}

/// Starts a key's new generation. Most keys only ever have one, so the list grows by
/// exactly one: a `Vec`'s first push would make room for four (256 bytes a key).
fn begin(gens: &mut Vec<Generation>, g: Generation) {
    gens.reserve_exact(1);
    gens.push(g);
}

/// Key → generations, ordered by key.
#[derive(Default, Debug)]
pub struct KeyIndex {
    keys: BTreeMap<Bytes, Vec<Generation>>,
}

/// The end of a key range as etcd encodes it in `range_end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeEnd {
    /// Empty `range_end`: the key alone.
    Single,
    /// `"\0"`: every key from `key` on.
    Unbounded,
    /// `[key, end)`.
    Before(Bytes),
}

impl RangeEnd {
    pub fn from_request(range_end: &[u8]) -> Self {
        match range_end {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            end => RangeEnd::Before(Bytes::copy_from_slice(end)),
        }
    }

    /// Whether `k` lies in the range starting at `start`.
    pub fn contains(&self, start: &[u8], k: &[u8]) -> bool {
        match self {
            RangeEnd::Single => k == start,
            RangeEnd::Unbounded => k >= start,
            RangeEnd::Before(end) => k >= start && k < end.as_ref(),
        }
    }
}

impl Generation {
    fn at(&self, rev: i64) -> Option<KeyAt> {
        let n = self.revs.partition_point(|r| r.main <= rev);
        let i = n.checked_sub(1)?;
        Some(KeyAt { modified: self.revs[i], created: self.created, version: self.ver_base + i as i64 })
    }
}

fn key_at(gens: &[Generation], rev: i64) -> Option<KeyAt> {
    for g in gens.iter().rev() {
        if let Some(t) = g.tombstone {
            if t.main <= rev {
                return None;
            }
        }
        if let Some(found) = g.at(rev) {
            return Some(found);
        }
    }
    None
}

impl KeyIndex {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key as of main revision `rev`, if it existed then.
    pub fn get(&self, key: &[u8], rev: i64) -> Option<KeyAt> {
        self.keys.get(key).and_then(|g| key_at(g, rev))
    }

    /// Visits the keys in `[start, end)` that existed at `rev`, in key order, until `f`
    /// returns false.
    pub fn range(&self, start: &[u8], end: &RangeEnd, rev: i64, mut f: impl FnMut(&Bytes, KeyAt) -> bool) {
        if let RangeEnd::Single = end {
            if let Some((k, g)) = self.keys.get_key_value(start) {
                if let Some(at) = key_at(g, rev) {
                    f(k, at);
                }
            }
            return;
        }
        let upper = match end {
            RangeEnd::Before(e) if e.as_ref() <= start => return,
            RangeEnd::Before(e) => Bound::Excluded(e.as_ref()),
            _ => Bound::Unbounded,
        };
        let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(start), upper);
        for (k, g) in self.keys.range::<[u8], _>(bounds) {
            if let Some(at) = key_at(g, rev) {
                if !f(k, at) {
                    return;
                }
            }
        }
    }

    /// Calls `f` with the generations of `key`, made empty if it is new. A new key is
    /// stored as a copy of its own bytes: `key` is usually a slice of a larger buffer (the
    /// Raft entry or the stored value it was decoded from), which the index would
    /// otherwise keep alive for as long as the key exists.
    fn with_generations<R>(&mut self, key: Bytes, f: impl FnOnce(&mut Vec<Generation>) -> R) -> R {
        if let Some(gens) = self.keys.get_mut(&key) {
            return f(gens);
        }
        f(self.keys.entry(Bytes::copy_from_slice(&key)).or_default())
    }

    /// Records a put of `key` at `rev`; returns the key's version after it.
    pub fn put(&mut self, key: Bytes, rev: Revision) -> KeyAt {
        self.with_generations(key, |gens| match gens.last_mut() {
            Some(g) if g.tombstone.is_none() => {
                g.revs.push(rev);
                KeyAt { modified: rev, created: g.created, version: g.ver_base + g.revs.len() as i64 - 1 }
            }
            _ => {
                begin(gens, Generation { created: rev.main, ver_base: 1, revs: vec![rev], tombstone: None });
                KeyAt { modified: rev, created: rev.main, version: 1 }
            }
        })
    }

    /// Records a put read back from storage, where compaction may have removed the
    /// generation's earlier revisions: `created` and `version` come from the stored value.
    pub fn restore_put(&mut self, key: Bytes, rev: Revision, created: i64, version: i64) {
        self.with_generations(key, |gens| match gens.last_mut() {
            Some(g) if g.tombstone.is_none() => g.revs.push(rev),
            _ => begin(gens, Generation { created, ver_base: version, revs: vec![rev], tombstone: None }),
        })
    }

    /// Ends the key's live generation at `rev`. Returns false if the key was not live.
    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        match self.keys.get_mut(key).and_then(|g| g.last_mut()) {
            Some(g) if g.tombstone.is_none() => {
                g.tombstone = Some(rev);
                true
            }
            _ => false,
        }
    }

    /// Forgets history at and below main revision `rev`, keeping for every key the
    /// newest revision at or below it (so reads at `rev` still work). Returns the
    /// revision entries that storage may delete.
    pub fn compact(&mut self, rev: i64) -> Vec<Dropped> {
        let mut dropped = Vec::new();
        self.keys.retain(|_, gens| {
            gens.retain_mut(|g| {
                if matches!(g.tombstone, Some(t) if t.main <= rev) {
                    dropped.extend(g.revs.iter().map(|&r| Dropped { rev: r, tombstone: false }));
                    if let Some(t) = g.tombstone {
                        dropped.push(Dropped { rev: t, tombstone: true });
                    }
                    return false;
                }
                let n = g.revs.partition_point(|r| r.main <= rev);
                if n > 1 {
                    dropped.extend(g.revs.drain(..n - 1).map(|r| Dropped { rev: r, tombstone: false }));
                    g.ver_base += n as i64 - 1;
                }
                true
            });
            !gens.is_empty()
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn versions_and_generations() {
        let mut ix = KeyIndex::default();
        let k = Bytes::from_static(b"a");
        ix.put(k.clone(), r(2));
        ix.put(k.clone(), r(3));
        assert!(ix.tombstone(b"a", r(4)));
        assert!(!ix.tombstone(b"a", r(5)));
        let at = ix.put(k.clone(), r(6));
        assert_eq!(at, KeyAt { modified: r(6), created: 6, version: 1 });
        assert_eq!(ix.get(b"a", 1), None);
        assert_eq!(ix.get(b"a", 3), Some(KeyAt { modified: r(3), created: 2, version: 2 }));
        assert_eq!(ix.get(b"a", 4), None);
        assert_eq!(ix.get(b"a", 5), None);
        assert_eq!(ix.get(b"a", 9).map(|a| a.version), Some(1));
    }

    #[test]
    fn a_new_key_does_not_keep_the_buffer_it_was_decoded_from() {
        let mut ix = KeyIndex::default();
        let entry = Bytes::from(vec![7u8; 4096]);
        ix.put(entry.slice(10..13), r(2));
        ix.restore_put(entry.slice(20..23), r(3), 3, 1);
        ix.put(entry.slice(10..13), r(4));
        assert!(entry.is_unique(), "the index holds copies of the keys, not slices of the entry");
        assert_eq!(ix.get(&[7, 7, 7], 9).map(|a| a.version), Some(3));
    }

    #[test]
    fn a_key_has_room_for_the_generations_it_has_and_no_more() {
        let mut ix = KeyIndex::default();
        let k = Bytes::from_static(b"k");
        ix.put(k.clone(), r(2));
        ix.restore_put(Bytes::from_static(b"j"), r(3), 3, 1);
        assert_eq!(ix.keys[&k].capacity(), 1);
        assert_eq!(ix.keys[b"j".as_slice()].capacity(), 1);
        ix.tombstone(b"k", r(4));
        ix.put(k.clone(), r(5));
        assert!(ix.keys[&k].capacity() <= 2);
        assert_eq!(ix.get(b"k", 9), Some(KeyAt { modified: r(5), created: 5, version: 1 }));
    }

    #[test]
    fn compaction_keeps_what_reads_at_the_compacted_revision_need() {
        let mut ix = KeyIndex::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        ix.put(a.clone(), r(2));
        ix.put(a.clone(), r(3));
        ix.put(b.clone(), r(4));
        ix.tombstone(b"b", r(5));
        ix.put(a.clone(), r(6));
        let dropped = ix.compact(5);
        assert_eq!(
            dropped,
            vec![
                Dropped { rev: r(2), tombstone: false },
                Dropped { rev: r(4), tombstone: false },
                Dropped { rev: r(5), tombstone: true },
            ]
        );
        assert_eq!(ix.get(b"a", 5), Some(KeyAt { modified: r(3), created: 2, version: 2 }));
        assert_eq!(ix.get(b"a", 6).map(|a| a.version), Some(3));
        assert_eq!(ix.get(b"b", 5), None);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn range_bounds() {
        let mut ix = KeyIndex::default();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            ix.put(Bytes::from(k.to_string()), r(i as i64 + 2));
        }
        let collect = |end: RangeEnd, start: &[u8]| {
            let mut v = Vec::new();
            ix.range(start, &end, 10, |k, _| {
                v.push(String::from_utf8_lossy(k).into_owned());
                true
            });
            v
        };
        assert_eq!(collect(RangeEnd::Single, b"b"), ["b"]);
        assert_eq!(collect(RangeEnd::Unbounded, b"b"), ["b", "c"]);
        assert_eq!(collect(RangeEnd::Before(Bytes::from_static(b"c")), b"a"), ["a", "b"]);
        assert!(collect(RangeEnd::Before(Bytes::from_static(b"a")), b"b").is_empty());
    }
}

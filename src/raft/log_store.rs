//! `raft::Storage` on RocksDB: the Raft log, HardState and ConfState of one member.
//!
//! Only the Raft driver thread touches a `LogStore`. Writes go into a caller's
//! `WriteBatch` (so one Ready becomes one synced write) and update the cached bounds at
//! once; the driver writes the batch before it calls `advance`, which is the first time
//! raft-rs can read the new entries back.

use std::collections::BTreeMap;
use std::sync::RwLock;

use prost::Message as _;

use protobuf::Message as ProtobufMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use crate::store::engine::{Engine, EngineError, CF_RAFT_LOG, CF_RAFT_STATE};

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_MEMBERS: &[u8] = b"members";
/// Index and term of the last entry removed from the front of the log.
const KEY_TRUNCATED: &[u8] = b"truncated";

#[derive(Clone, Debug, Default)]
struct Bounds {
    hard_state: HardState,
    conf_state: ConfState,
    members: BTreeMap<u64, String>,
    removed: Vec<u64>,
    /// Member id → the incarnation of its data that joined (members with one).
    incarnations: BTreeMap<u64, u64>,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    last_term: u64,
    /// The newest entries, contiguous and ending at `last_index` when not empty: what
    /// raft-rs reads back to send to followers and to check terms, served without
    /// touching RocksDB on the driver thread.
    recent: std::collections::VecDeque<Entry>,
    recent_bytes: usize,
}

/// Bounds of the recent-entry cache.
const RECENT_ENTRIES: usize = 4096;
const RECENT_BYTES: usize = 16 << 20;

/// What making a snapshot needs beyond the log: where checkpoints are served from, and
/// who we are.
pub struct SnapshotSource {
    pub outgoing: std::sync::Arc<super::snapshot::Outgoing>,
    pub name: String,
    pub cluster_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The Raft log and state of one member, in RocksDB.
pub struct LogStore {
    engine: Engine,
    bounds: RwLock<Bounds>,
    source: Option<SnapshotSource>,
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

fn corrupt(what: String) -> EngineError {
    EngineError::Corrupt { cf: CF_RAFT_LOG, what }
}

impl LogStore {
    /// Opens the log, reading its bounds and state from `engine`.
    pub fn open(engine: Engine) -> Result<Self, EngineError> {
        let db = engine.db();
        let state_cf = engine.cf(CF_RAFT_STATE);
        let mut b = Bounds::default();
        if let Some(v) = db.get_cf(state_cf, KEY_HARD_STATE)? {
            b.hard_state = <HardState as ProtobufMessage>::parse_from_bytes(&v)
                .map_err(|e| corrupt(format!("hard state: {e}")))?;
        }
        if let Some(v) = db.get_cf(state_cf, KEY_CONF_STATE)? {
            b.conf_state = <ConfState as ProtobufMessage>::parse_from_bytes(&v)
                .map_err(|e| corrupt(format!("conf state: {e}")))?;
        }
        if let Some(v) = db.get_cf(state_cf, KEY_MEMBERS)? {
            let m = crate::pb::meshkvpb::Members::decode(v.as_slice()).map_err(|e| corrupt(format!("members: {e}")))?;
            b.incarnations = m.members.iter().filter(|r| r.incarnation != 0).map(|r| (r.id, r.incarnation)).collect();
            b.members = m.members.into_iter().map(|r| (r.id, r.name)).collect();
            b.removed = m.removed;
        }
        if let Some(v) = db.get_cf(state_cf, KEY_TRUNCATED)? {
            if v.len() != 16 {
                return Err(corrupt(format!("truncated state is {} bytes", v.len())));
            }
            b.truncated_index = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            b.truncated_term = u64::from_be_bytes(v[8..].try_into().unwrap_or_default());
        }
        b.last_index = b.truncated_index;
        b.last_term = b.truncated_term;
        if let Some(item) = db.iterator_cf(engine.cf(CF_RAFT_LOG), IteratorMode::End).next() {
            let (_, v) = item?;
            let e = Entry::parse_from_bytes(&v).map_err(|e| corrupt(format!("last entry: {e}")))?;
            b.last_index = e.index;
            b.last_term = e.term;
        }
        Ok(Self { engine, bounds: RwLock::new(b), source: None })
    }

    /// Lets this log make snapshots for members that fell behind it.
    pub fn with_snapshots(mut self, source: SnapshotSource) -> Self {
        self.source = Some(source);
        self
    }

    /// The Raft state keys of a log restarted at an installed snapshot: the snapshot's
    /// point as the truncation point, a HardState committed up to it, its configuration
    /// and members. Written by the snapshot install together with the store's data.
    pub fn snapshot_state(
        &self,
        meta: &raft::eraftpb::SnapshotMetadata,
        members: &crate::pb::meshkvpb::Members,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut truncated = Vec::with_capacity(16);
        truncated.extend_from_slice(&meta.index.to_be_bytes());
        truncated.extend_from_slice(&meta.term.to_be_bytes());
        let mut hs = self.hard_state();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        vec![
            (KEY_TRUNCATED.to_vec(), truncated),
            (KEY_HARD_STATE.to_vec(), hs.write_to_bytes().unwrap_or_default()),
            (KEY_CONF_STATE.to_vec(), meta.get_conf_state().write_to_bytes().unwrap_or_default()),
            (KEY_MEMBERS.to_vec(), members.encode_to_vec()),
        ]
    }

    /// Reads the log's state from disk again, after a snapshot install rewrote it.
    pub fn reload(&self) -> Result<(), EngineError> {
        let fresh = Self::open(self.engine.clone())?;
        let b = fresh.read().clone();
        *self.write() = b;
        Ok(())
    }

    /// The lowest log index of a snapshot this member is serving to a member not yet
    /// caught up to it: the log is not compacted past it meanwhile.
    pub fn snapshot_pin(&self, caught_up: impl Fn(u64, u64) -> bool) -> Option<u64> {
        self.source.as_ref().and_then(|src| src.outgoing.pinned(caught_up))
    }

    fn make_snapshot(&self, to: u64) -> Result<Snapshot, EngineError> {
        let Some(src) = &self.source else { return Err(corrupt("no snapshot source".into())) };
        let id: u64 = rand::random();
        src.outgoing.create(&self.engine, id, to)?;
        type Read = (u64, i64, i64, u32, ConfState, crate::pb::meshkvpb::Members);
        let read = |db: &rocksdb::DB| -> Result<Read, EngineError> {
            let get = |cf: &str, k: &[u8]| -> Result<Option<Vec<u8>>, EngineError> {
                let h = db.cf_handle(cf).ok_or_else(|| corrupt(format!("checkpoint lacks {cf}")))?;
                Ok(db.get_cf(h, k)?)
            };
            let u = |v: Option<Vec<u8>>| v.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
            let applied = u(get(crate::store::engine::CF_META, b"applied_index")?);
            let revision = u(get(crate::store::engine::CF_META, b"revision")?) as i64;
            let compacted = u(get(crate::store::engine::CF_META, b"compact_revision")?) as i64;
            let cluster_version =
                u(get(crate::store::engine::CF_META, crate::store::mvcc::META_CLUSTER_VERSION)?) as u32;
            let cs = match get(CF_RAFT_STATE, KEY_CONF_STATE)? {
                Some(v) => <ConfState as ProtobufMessage>::parse_from_bytes(&v).map_err(|e| corrupt(e.to_string()))?,
                None => ConfState::default(),
            };
            let members = match get(CF_RAFT_STATE, KEY_MEMBERS)? {
                Some(v) => crate::pb::meshkvpb::Members::decode(v.as_slice()).map_err(|e| corrupt(e.to_string()))?,
                None => Default::default(),
            };
            Ok((applied, revision, compacted, cluster_version, cs, members))
        };
        let (applied, revision, compacted, cluster_version, cs, members) =
            src.outgoing.with(id, read).ok_or_else(|| corrupt("checkpoint vanished".into()))??;
        let term = raft::Storage::term(self, applied).map_err(|e| corrupt(e.to_string()))?;
        src.outgoing.set_index(id, applied);
        let desc = crate::pb::meshkvpb::SnapshotDescriptor {
            id,
            source: src.name.clone(),
            revision: revision.max(1),
            compact_revision: compacted,
            cluster_id: src.cluster_id.load(std::sync::atomic::Ordering::Acquire),
            members: Some(members),
            cluster_version,
        };
        let mut snap = Snapshot { data: desc.encode_to_vec().into(), ..Default::default() };
        let m = snap.mut_metadata();
        m.index = applied;
        m.term = term;
        m.set_conf_state(cs);
        tracing::info!(
            to = format!("{to:x}"),
            index = applied,
            id = format!("{id:x}"),
            "snapshot made for a member behind the log"
        );
        Ok(snap)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Bounds> {
        self.bounds.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Bounds> {
        self.bounds.write().unwrap_or_else(|e| e.into_inner())
    }

    /// True when the member has never been given a configuration.
    pub fn is_fresh(&self) -> bool {
        let b = self.read();
        b.conf_state.voters.is_empty() && b.conf_state.learners.is_empty() && b.last_index == 0
    }

    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    /// Member names by Raft id.
    pub fn members(&self) -> BTreeMap<u64, String> {
        self.read().members.clone()
    }

    /// Members removed from the cluster by a client.
    pub fn removed(&self) -> Vec<u64> {
        self.read().removed.clone()
    }

    /// The incarnation each member joined with, where known.
    pub fn incarnations(&self) -> BTreeMap<u64, u64> {
        self.read().incarnations.clone()
    }

    /// The incarnation member `id` joined with, where known.
    pub fn incarnation(&self, id: u64) -> Option<u64> {
        self.read().incarnations.get(&id).copied()
    }

    pub fn set_membership(
        &self,
        batch: &mut WriteBatch,
        members: BTreeMap<u64, String>,
        removed: Vec<u64>,
        mut incarnations: BTreeMap<u64, u64>,
    ) {
        incarnations.retain(|id, _| members.contains_key(id));
        let m = crate::pb::meshkvpb::Members {
            members: members
                .iter()
                .map(|(id, name)| crate::pb::meshkvpb::MemberRecord {
                    id: *id,
                    name: name.clone(),
                    incarnation: incarnations.get(id).copied().unwrap_or(0),
                })
                .collect(),
            removed: removed.clone(),
        };
        batch.put_cf(self.engine.cf(CF_RAFT_STATE), KEY_MEMBERS, m.encode_to_vec());
        let mut b = self.write();
        b.members = members;
        b.removed = removed;
        b.incarnations = incarnations;
    }

    pub fn last_index_cached(&self) -> u64 {
        self.read().last_index
    }

    pub fn first_index_cached(&self) -> u64 {
        self.read().truncated_index + 1
    }

    /// Appends `ents`, replacing any conflicting tail.
    pub fn append(&self, batch: &mut WriteBatch, ents: &[Entry]) {
        let (Some(first), Some(last)) = (ents.first(), ents.last()) else {
            return;
        };
        let cf = self.engine.cf(CF_RAFT_LOG);
        let mut b = self.write();
        for e in ents {
            batch.put_cf(cf, log_key(e.index), e.write_to_bytes().unwrap_or_default());
        }
        if last.index < b.last_index {
            // A new leader overwrote our tail: what followed it is no longer ours.
            batch.delete_range_cf(cf, log_key(last.index + 1), log_key(b.last_index + 1));
        }
        debug_assert!(first.index <= b.last_index + 1, "log gap");
        b.last_index = last.index;
        b.last_term = last.term;
        while b.recent.back().is_some_and(|e| e.index >= first.index) {
            let e = b.recent.pop_back().expect("checked");
            b.recent_bytes -= e.data.len();
        }
        if b.recent.back().is_some_and(|e| e.index + 1 != first.index) {
            b.recent.clear();
            b.recent_bytes = 0;
        }
        for e in ents {
            b.recent_bytes += e.data.len();
            b.recent.push_back(e.clone());
        }
        while b.recent.len() > RECENT_ENTRIES || (b.recent_bytes > RECENT_BYTES && b.recent.len() > 1) {
            let e = b.recent.pop_front().expect("not empty");
            b.recent_bytes -= e.data.len();
        }
    }

    /// Entries `low..high` from the cache, if it holds all of them within `max_size`
    /// (at least one entry, as raft-rs expects).
    fn cached(&self, low: u64, high: u64, max_size: u64) -> Option<Vec<Entry>> {
        let b = self.read();
        let first = b.recent.front()?.index;
        if low < first || high > b.last_index + 1 || low >= high {
            return None;
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for e in b.recent.range((low - first) as usize..(high - first) as usize) {
            size += e.compute_size() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    pub fn set_hard_state(&self, batch: &mut WriteBatch, hs: &HardState) {
        batch.put_cf(self.engine.cf(CF_RAFT_STATE), KEY_HARD_STATE, hs.write_to_bytes().unwrap_or_default());
        self.write().hard_state = hs.clone();
    }

    pub fn set_commit(&self, batch: &mut WriteBatch, commit: u64) {
        let mut hs = self.hard_state();
        if hs.commit != commit {
            hs.commit = commit;
            self.set_hard_state(batch, &hs);
        }
    }

    pub fn set_conf_state(&self, batch: &mut WriteBatch, cs: &ConfState) {
        batch.put_cf(self.engine.cf(CF_RAFT_STATE), KEY_CONF_STATE, cs.write_to_bytes().unwrap_or_default());
        self.write().conf_state = cs.clone();
    }

    /// Drops the entries before `index` (which must be applied): their effect lives in
    /// the store, and the log must not grow without end.
    pub fn compact(&self, batch: &mut WriteBatch, index: u64) -> Result<(), raft::Error> {
        let first = self.first_index_cached();
        if index <= first {
            return Ok(());
        }
        let term = raft::Storage::term(self, index - 1)?;
        let cf = self.engine.cf(CF_RAFT_LOG);
        batch.delete_range_cf(cf, log_key(first), log_key(index));
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&(index - 1).to_be_bytes());
        v.extend_from_slice(&term.to_be_bytes());
        batch.put_cf(self.engine.cf(CF_RAFT_STATE), KEY_TRUNCATED, v);
        let mut b = self.write();
        b.truncated_index = index - 1;
        b.truncated_term = term;
        while b.recent.front().is_some_and(|e| e.index < index) {
            let e = b.recent.pop_front().expect("checked");
            b.recent_bytes -= e.data.len();
        }
        Ok(())
    }

    fn get_entry(&self, index: u64) -> Result<Entry, raft::Error> {
        let v = self
            .engine
            .db()
            .get_pinned_cf(self.engine.cf(CF_RAFT_LOG), log_key(index))
            .map_err(storage_err)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        Entry::parse_from_bytes(&v).map_err(storage_err)
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let b = self.read();
        Ok(RaftState { hard_state: b.hard_state.clone(), conf_state: b.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        {
            let b = self.read();
            if low <= b.truncated_index {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            if high > b.last_index + 1 {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
        }
        if let Some(out) = self.cached(low, high, max_size) {
            return Ok(out);
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(log_key(high).to_vec());
        let iter = self.engine.db().iterator_cf_opt(
            self.engine.cf(CF_RAFT_LOG),
            opts,
            IteratorMode::From(&log_key(low), rocksdb::Direction::Forward),
        );
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for item in iter {
            let (_, v) = item.map_err(storage_err)?;
            let e = Entry::parse_from_bytes(&v).map_err(storage_err)?;
            size += v.len() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            if e.index != low + out.len() as u64 {
                return Err(storage_err(format!("raft log hole at {}", low + out.len() as u64)));
            }
            out.push(e);
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        {
            let b = self.read();
            if idx == b.truncated_index {
                return Ok(b.truncated_term);
            }
            if idx < b.truncated_index {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            if idx > b.last_index {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            if idx == b.last_index {
                return Ok(b.last_term);
            }
            if let Some(first) = b.recent.front().map(|e| e.index) {
                if idx >= first {
                    return Ok(b.recent[(idx - first) as usize].term);
                }
            }
        }
        Ok(self.get_entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_cached())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_cached())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match self.make_snapshot(to) {
            Ok(s) if s.get_metadata().index >= request_index => Ok(s),
            Ok(_) => Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a snapshot yet");
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8].into(), ..Default::default() }
    }

    #[test]
    fn append_overwrite_compact_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let log = LogStore::open(engine.clone()).unwrap();
        assert!(log.is_fresh());
        let mut batch = WriteBatch::default();
        log.append(&mut batch, &(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        engine.write(batch, true).unwrap();
        // A new leader replaces entries 4 and 5.
        let mut batch = WriteBatch::default();
        log.append(&mut batch, &[entry(4, 2)]);
        engine.write(batch, true).unwrap();
        assert_eq!(log.last_index().unwrap(), 4);
        assert_eq!(log.term(4).unwrap(), 2);
        assert_eq!(log.term(3).unwrap(), 1);
        let got = log.entries(2, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [2, 3, 4]);

        let mut batch = WriteBatch::default();
        log.compact(&mut batch, 3).unwrap();
        engine.write(batch, true).unwrap();
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(log.term(2).unwrap(), 1);
        assert!(log.entries(2, 4, None, GetEntriesContext::empty(false)).is_err());

        drop(log);
        let log = LogStore::open(engine).unwrap();
        assert_eq!((log.first_index().unwrap(), log.last_index().unwrap()), (3, 4));
        assert_eq!(log.term(4).unwrap(), 2);
        assert_eq!(log.term(2).unwrap(), 1);
    }

    proptest::proptest! {
        /// Whatever appends, overwrites and compactions happen, the entries and terms
        /// served from the recent-entry cache are what a reopened log reads from RocksDB.
        #[test]
        fn the_cache_agrees_with_the_disk(steps in proptest::collection::vec((0u64..40, 1u64..6, 0u8..4), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let engine = Engine::open(dir.path()).unwrap();
            let log = LogStore::open(engine.clone()).unwrap();
            let mut term = 1;
            for (back, n, what) in steps {
                let mut batch = WriteBatch::default();
                let (first, last) = (log.first_index_cached(), log.last_index_cached());
                if what == 0 && last > first {
                    log.compact(&mut batch, first + back % (last - first)).unwrap();
                } else {
                    // Append after the tail, or (a new leader) overwrite part of it.
                    term += u64::from(what == 1);
                    let start = (last + 1).saturating_sub(if what == 1 { back } else { 0 }).max(first).max(1);
                    log.append(&mut batch, &(start..start + n).map(|i| entry(i, term)).collect::<Vec<_>>());
                }
                engine.write(batch, true).unwrap();
            }
            let disk = LogStore::open(engine.clone()).unwrap();
            let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
            proptest::prop_assert_eq!((first, last), (disk.first_index().unwrap(), disk.last_index().unwrap()));
            for low in first..=last {
                let ctx = || GetEntriesContext::empty(false);
                proptest::prop_assert_eq!(log.term(low).unwrap(), disk.term(low).unwrap());
                proptest::prop_assert_eq!(
                    log.entries(low, last + 1, None, ctx()).unwrap(),
                    disk.entries(low, last + 1, None, ctx()).unwrap()
                );
                proptest::prop_assert_eq!(
                    log.entries(low, last + 1, Some(3), ctx()).unwrap(),
                    disk.entries(low, last + 1, Some(3), ctx()).unwrap()
                );
            }
        }
    }
}

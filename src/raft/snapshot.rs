//! Snapshots: how a member that fell behind the log (or a new one) gets the state.
//!
//! The Raft snapshot itself is small: its metadata (index, term, ConfState) and a
//! [`SnapshotDescriptor`]. The key-value data travels beside it, pulled in chunks over
//! the mesh as bulk datagrams, so heartbeats keep flowing during a transfer:
//!
//! 1. The leader's log storage is asked for a snapshot: it makes a RocksDB checkpoint
//!    (hard links, consistent at the applied index) and registers it in [`Outgoing`].
//! 2. The follower's transport sees the MsgSnapshot, holds it back, and pulls every
//!    record of the snapshot's column families in order, writing them to SST files in a
//!    staging directory ([`fetch`]); one chunk in flight is the flow control.
//! 3. Only then does raft-rs get the MsgSnapshot; when its Ready carries the snapshot,
//!    the driver installs it ([`install`]): an install marker is synced, the column
//!    families are cleared and the SST files ingested, then the meta keys are written
//!    and the marker removed. A crash in between redoes the install at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rocksdb::{IngestExternalFileOptions, IteratorMode, Options, SstFileWriter, WriteBatch, DB};

use crate::pb::meshkvpb::{SnapshotChunk, SnapshotChunkRequest};
use crate::store::engine::{
    Engine, EngineError, CF_ALARM, CF_AUTH, CF_KV, CF_LEASE, CF_META, CF_RAFT_LOG, CF_RAFT_STATE,
};
use crate::store::mvcc::META_INSTALLING;

/// Column families a snapshot carries, by index on the wire.
pub const CFS: [&str; 4] = [CF_KV, CF_LEASE, CF_AUTH, CF_ALARM];
const CHUNK_BYTES: usize = 1 << 20;
const SST_BYTES: usize = 64 << 20;

fn making(dir: &std::path::Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io { what: format!("making {}", dir.display()), source }
}

struct Served {
    db: DB,
    path: PathBuf,
    last_used: Instant,
    to: u64,
    /// The log index the checkpoint covers, once read from it.
    index: Option<u64>,
    /// The member asked for the last chunk: it has everything.
    delivered: bool,
}

/// Leader side: checkpoints being served, by snapshot id.
pub struct Outgoing {
    dir: PathBuf,
    served: Mutex<HashMap<u64, Served>>,
}

impl Outgoing {
    pub fn new(dir: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir, served: Mutex::new(HashMap::new()) }
    }

    /// Checkpoints the engine for member `to`; the caller reads the applied index it
    /// covers from the checkpoint.
    pub fn create(&self, engine: &Engine, id: u64, to: u64) -> Result<(), EngineError> {
        std::fs::create_dir_all(&self.dir).map_err(making(&self.dir))?;
        let path = self.dir.join(format!("{id:016x}"));
        let _ = std::fs::remove_dir_all(&path);
        rocksdb::checkpoint::Checkpoint::new(engine.db())?.create_checkpoint(&path)?;
        let mut names = vec!["default"];
        names.extend(crate::store::engine::ALL_CFS);
        let db = DB::open_cf_for_read_only(&Options::default(), &path, names, false)?;
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.insert(id, Served { db, path, last_used: Instant::now(), to, index: None, delivered: false });
        Ok(())
    }

    /// Records the log index snapshot `id` covers: the log keeps what follows it while the
    /// snapshot is served (see [`Outgoing::pinned`]).
    pub fn set_index(&self, id: u64, index: u64) {
        if let Some(s) = self.served.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&id) {
            s.index = Some(index);
        }
    }

    /// The lowest log index of a snapshot being served to a member that has not caught up
    /// to it (`caught_up(member, index)`). A member that fetches a snapshot then needs the
    /// entries right after it: were they compacted away meanwhile, it would be sent
    /// another snapshot, and when a transfer takes longer than the log takes to move past
    /// what it keeps, a new member never catches up. A served snapshot pins the log from
    /// its index on until its member has it, or the transfer is forgotten (idle for the
    /// expiry).
    pub fn pinned(&self, caught_up: impl Fn(u64, u64) -> bool) -> Option<u64> {
        let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.values().filter_map(|s| s.index.filter(|&i| !caught_up(s.to, i))).min()
    }

    /// Runs `f` on the checkpoint of snapshot `id`.
    pub fn with<R>(&self, id: u64, f: impl FnOnce(&DB) -> R) -> Option<R> {
        let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.get(&id).map(|s| f(&s.db))
    }

    /// The next chunk of a transfer.
    pub fn chunk(&self, req: &SnapshotChunkRequest) -> SnapshotChunk {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = SnapshotChunk { id: req.id, cf: req.cf, ..Default::default() };
        let (Some(s), Some(cf_name)) = (served.get_mut(&req.id), CFS.get(req.cf as usize)) else {
            out.unknown = true;
            return out;
        };
        s.last_used = Instant::now();
        let Some(cf) = s.db.cf_handle(cf_name) else {
            out.unknown = true;
            return out;
        };
        let mode = if req.from_start {
            IteratorMode::Start
        } else {
            IteratorMode::From(&req.after, rocksdb::Direction::Forward)
        };
        let mut size = 0;
        out.done = true;
        for item in s.db.iterator_cf(cf, mode) {
            let Ok((k, v)) = item else {
                out.unknown = true;
                return out;
            };
            if !req.from_start && k.as_ref() == req.after.as_ref() {
                continue;
            }
            if size >= CHUNK_BYTES {
                out.done = false;
                break;
            }
            size += k.len() + v.len() + 8;
            out.keys.push(Bytes::from(k.into_vec()));
            out.values.push(Bytes::from(v.into_vec()));
        }
        s.delivered |= out.done && req.cf as usize == CFS.len() - 1;
        out
    }

    /// Forgets a finished transfer.
    pub fn finish(&self, id: u64) {
        if let Some(s) = self.served.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
            drop(s.db);
            let _ = std::fs::remove_dir_all(&s.path);
        }
    }

    /// Forgets the transfers nobody asked anything of for `idle`; returns those of them
    /// that stopped before the end, (snapshot id, member), to report failed.
    pub fn expire(&self, idle: Duration) -> Vec<(u64, u64)> {
        let stale: Vec<(u64, u64, bool)> = {
            let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
            served
                .iter()
                .filter(|(_, s)| s.last_used.elapsed() > idle)
                .map(|(id, s)| (*id, s.to, s.delivered))
                .collect()
        };
        for (id, _, _) in &stale {
            self.finish(*id);
        }
        stale.into_iter().filter(|(_, _, delivered)| !delivered).map(|(id, to, _)| (id, to)).collect()
    }

    /// Whether the member of snapshot `id` has fetched all of it.
    pub fn delivered(&self, id: u64) -> bool {
        self.served.lock().unwrap_or_else(|e| e.into_inner()).get(&id).is_some_and(|s| s.delivered)
    }
}

/// Follower side: staging directories of fetched snapshots, by snapshot id.
pub struct Incoming {
    pub dir: PathBuf,
    fetched: Mutex<HashMap<u64, PathBuf>>,
}

impl Incoming {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, fetched: Mutex::new(HashMap::new()) }
    }

    pub fn staging(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}"))
    }

    pub fn mark_fetched(&self, id: u64, path: PathBuf) {
        self.fetched.lock().unwrap_or_else(|e| e.into_inner()).insert(id, path);
    }

    pub fn take(&self, id: u64) -> Option<PathBuf> {
        self.fetched.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
    }
}

/// Writes fetched records of one column family into SST files under `dir`.
pub struct SstSink {
    dir: PathBuf,
    cf: u32,
    opts: Options,
    pending: Vec<(Bytes, Bytes)>,
    pending_bytes: usize,
    files: usize,
}

impl SstSink {
    pub fn new(dir: &Path, cf: u32) -> Result<Self, EngineError> {
        let cf_dir = dir.join(cf.to_string());
        std::fs::create_dir_all(&cf_dir).map_err(making(&cf_dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cf,
            opts: Options::default(),
            pending: Vec::new(),
            pending_bytes: 0,
            files: 0,
        })
    }

    pub fn push(&mut self, k: Bytes, v: Bytes) -> Result<(), EngineError> {
        self.pending_bytes += k.len() + v.len();
        self.pending.push((k, v));
        if self.pending_bytes >= SST_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(self.cf.to_string()).join(format!("{:06}.sst", self.files));
        let mut w = SstFileWriter::create(&self.opts);
        w.open(&path)?;
        for (k, v) in self.pending.drain(..) {
            w.put(k, v)?;
        }
        w.finish()?;
        self.files += 1;
        self.pending_bytes = 0;
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), EngineError> {
        self.flush()
    }
}

/// Encodes a chunk request as a transport datagram body.
pub fn encode_request(r: &SnapshotChunkRequest) -> Vec<u8> {
    r.encode_to_vec()
}

/// Replaces the snapshot's column families with the staged SST files, recording the
/// staging directory first so that a crash midway is finished at the next start.
///
/// `meta` are the `meta` keys that go with the data; `raft_state` are the Raft state keys
/// of the log restarted at the snapshot (the log itself is emptied). All of it is
/// recorded with the marker, so that the store and the log can never disagree after a
/// crash: an interrupted install is finished by [`recover`] before either opens.
pub fn install(
    engine: &Engine,
    staging: &Path,
    meta: &[(&[u8], Vec<u8>)],
    raft_state: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), EngineError> {
    begin_install(engine, staging, meta, raft_state)?;
    finish_install(engine, staging)
}

/// The first, synced step of an install: the marker and everything to write at the end.
pub fn begin_install(
    engine: &Engine,
    staging: &Path,
    meta: &[(&[u8], Vec<u8>)],
    raft_state: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), EngineError> {
    let mut mark = WriteBatch::default();
    mark.put_cf(engine.cf(CF_META), META_INSTALLING, staging.as_os_str().as_encoded_bytes());
    for (k, v) in meta {
        mark.put_cf(engine.cf(CF_META), [PENDING_META, k].concat(), v);
    }
    for (k, v) in raft_state {
        mark.put_cf(engine.cf(CF_META), [PENDING_RAFT, k.as_slice()].concat(), v);
    }
    engine.write(mark, true)
}

const PENDING_META: &[u8] = b"pending_meta_";
const PENDING_RAFT: &[u8] = b"pending_raft_";

fn finish_install(engine: &Engine, staging: &Path) -> Result<(), EngineError> {
    let db = engine.db();
    let mut clear = WriteBatch::default();
    for name in CFS {
        clear.delete_range_cf(engine.cf(name), [0u8; 0].as_slice(), [0xffu8; 64].as_slice());
    }
    engine.write(clear, true)?;
    for (i, name) in CFS.iter().enumerate() {
        let dir = staging.join(i.to_string());
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => continue,
        };
        files.sort();
        if files.is_empty() {
            continue;
        }
        let opts = IngestExternalFileOptions::default();
        db.ingest_external_file_cf_opts(engine.cf(name), &opts, files)?;
    }
    // The meta keys that go with the data and the restarted Raft log, in one batch with
    // the marker's removal.
    let mut done = WriteBatch::default();
    let meta_cf = engine.cf(CF_META);
    let raft_cf = engine.cf(CF_RAFT_STATE);
    done.delete_range_cf(engine.cf(CF_RAFT_LOG), [0u8; 0].as_slice(), [0xffu8; 16].as_slice());
    for item in db.prefix_iterator_cf(meta_cf, b"pending_") {
        let (k, v) = item?;
        if let Some(key) = k.strip_prefix(PENDING_META) {
            done.put_cf(meta_cf, key, &v);
        } else if let Some(key) = k.strip_prefix(PENDING_RAFT) {
            done.put_cf(raft_cf, key, &v);
        } else {
            break;
        }
        done.delete_cf(meta_cf, k);
    }
    done.delete_cf(meta_cf, META_INSTALLING);
    engine.write(done, true)?;
    let _ = std::fs::remove_dir_all(staging);
    Ok(())
}

/// Finishes an install a crash interrupted. Runs before the store opens.
pub fn recover(engine: &Engine) -> Result<(), EngineError> {
    let Some(v) = engine.db().get_cf(engine.cf(CF_META), META_INSTALLING)? else { return Ok(()) };
    let staging = PathBuf::from(String::from_utf8_lossy(&v).into_owned());
    tracing::warn!(staging = %staging.display(), "finishing a snapshot install interrupted by a crash");
    finish_install(engine, &staging)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::log_store::LogStore;
    use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};
    use raft::Storage;

    /// Regression: a member killed in the middle of installing a snapshot restarted with
    /// the store at the snapshot but the Raft log still behind it, and raft-rs refused to
    /// start ("hs.commit is out of range"). The log's new state now rides with the install.
    #[test]
    fn an_install_interrupted_by_a_crash_is_finished_whole() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        {
            let engine = Engine::open(&dir.path().join("db")).unwrap();
            let log = LogStore::open(engine.clone()).unwrap();
            let mut batch = WriteBatch::default();
            let ents: Vec<Entry> = (1..=10).map(|i| Entry { index: i, term: 1, ..Default::default() }).collect();
            log.append(&mut batch, &ents);
            let hs = HardState { term: 1, commit: 10, ..Default::default() };
            log.set_hard_state(&mut batch, &hs);
            batch.put_cf(engine.cf(CF_META), b"applied_index", 10u64.to_be_bytes());
            engine.write(batch, true).unwrap();

            let mut sink = SstSink::new(&staging, 0).unwrap();
            sink.push(Bytes::from_static(b"k1"), Bytes::from_static(b"v1")).unwrap();
            sink.finish().unwrap();
            let mut meta = SnapshotMetadata { index: 20, term: 2, ..Default::default() };
            meta.set_conf_state(ConfState { voters: vec![1], ..Default::default() });
            let members = crate::pb::meshkvpb::Members {
                members: vec![crate::pb::meshkvpb::MemberRecord { id: 1, name: "a".into(), incarnation: 7 }],
                removed: vec![],
            };
            let state = log.snapshot_state(&meta, &members);
            begin_install(&engine, &staging, &[(b"applied_index", 20u64.to_be_bytes().to_vec())], &state).unwrap();
            // The process dies here.
        }
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        recover(&engine).unwrap();
        let log = LogStore::open(engine.clone()).unwrap();
        assert_eq!(engine.get_u64(CF_META, b"applied_index").unwrap(), Some(20));
        assert_eq!((log.first_index().unwrap(), log.last_index().unwrap()), (21, 20));
        assert_eq!(log.term(20).unwrap(), 2);
        let hs = log.hard_state();
        assert_eq!((hs.commit, hs.term), (20, 2));
        assert_eq!(log.conf_state().voters, vec![1]);
        assert_eq!(log.members().get(&1).map(String::as_str), Some("a"));
        assert_eq!(log.incarnations().get(&1), Some(&7), "the incarnation a member joined with comes with it");
        assert_eq!(engine.db().get_cf(engine.cf(CF_KV), b"k1").unwrap().as_deref(), Some(&b"v1"[..]));
        assert!(engine.db().get_cf(engine.cf(CF_META), META_INSTALLING).unwrap().is_none());
    }

    /// Regression (torture, seed 23): a watcher that asked a member for the history while
    /// the member was installing a snapshot read the store between the install's clearing
    /// of the old data and its ingesting the new, found nothing, and was told it had all
    /// revisions up to the member's revision. Its next events began past them. The
    /// history (and HashKV) now answer `Installing` until the install is whole.
    #[test]
    fn the_history_is_not_read_from_a_store_half_installed() {
        use crate::pb::etcdserverpb::PutRequest;
        use crate::pb::meshkvpb::{internal_request, InternalRequest};
        use crate::store::mvcc::{MvccError, MvccStore};

        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let store = MvccStore::open(engine.clone()).unwrap();
        let put = |i: u64| {
            let req = PutRequest { key: format!("k{i}").into(), value: Bytes::from_static(b"v"), ..Default::default() };
            let req = InternalRequest { request: Some(internal_request::Request::Put(req)), ..Default::default() };
            store.apply(&[(i, Some(req))]).unwrap();
        };
        (1..=5).for_each(put);
        assert_eq!(store.revision(), 6);
        let (events, covered) = store.events(None, 1, 6, 1000).unwrap();
        assert_eq!((events.len(), covered), (5, 6));

        // An install under way: its marker is written, the old data cleared, the new
        // not yet ingested.
        let staging = dir.path().join("staging");
        begin_install(&engine, &staging, &[(b"applied_index", 9u64.to_be_bytes().to_vec())], &[]).unwrap();
        let mut clear = WriteBatch::default();
        clear.delete_range_cf(engine.cf(CF_KV), [0u8; 0].as_slice(), [0xffu8; 64].as_slice());
        engine.write(clear, true).unwrap();
        assert!(matches!(store.events(None, 1, 6, 1000), Err(MvccError::Installing)));
        assert!(matches!(store.hash_kv(0), Err(MvccError::Installing)));
    }

    /// While a snapshot replaces the store, until the index is rebuilt from it, a read
    /// whose value is gone is told to try again (Unavailable), not that its revision was
    /// compacted; once the install is whole, the same read is answered.
    #[test]
    fn a_read_during_an_install_is_told_to_try_again() {
        use crate::pb::etcdserverpb::{PutRequest, RangeRequest};
        use crate::pb::meshkvpb::{internal_request, InternalRequest};
        use crate::store::mvcc::{MvccError, MvccStore};

        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let store = MvccStore::open(engine.clone()).unwrap();
        let req = PutRequest { key: Bytes::from_static(b"k"), value: Bytes::from_static(b"v"), ..Default::default() };
        let req = InternalRequest { request: Some(internal_request::Request::Put(req)), ..Default::default() };
        store.apply(&[(1, Some(req))]).unwrap();
        let get = RangeRequest { key: Bytes::from_static(b"k"), ..Default::default() };
        let rows: Vec<_> =
            engine.db().iterator_cf(engine.cf(CF_KV), rocksdb::IteratorMode::Start).map(|r| r.unwrap()).collect();
        store
            .replace_with(|| {
                let mut clear = WriteBatch::default();
                clear.delete_range_cf(engine.cf(CF_KV), [0u8; 0].as_slice(), [0xffu8; 64].as_slice());
                engine.write(clear, true)?;
                assert!(matches!(store.range(&get), Err(MvccError::Installing)));
                assert!(matches!(store.events(None, 1, 2, 1000), Err(MvccError::Installing)));
                let mut ingest = WriteBatch::default();
                for (k, v) in &rows {
                    ingest.put_cf(engine.cf(CF_KV), k, v);
                }
                engine.write(ingest, true)
            })
            .unwrap();
        assert_eq!(store.range(&get).unwrap().kvs[0].value, Bytes::from_static(b"v"));
        assert_eq!(store.events(None, 1, 2, 1000).unwrap().0.len(), 1);
    }

    /// A transfer whose member fetched every chunk is forgotten quietly once idle; one that
    /// stopped part way is reported failed, so that Raft sends another.
    #[test]
    fn only_transfers_that_stopped_part_way_are_reported_failed() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let mut batch = WriteBatch::default();
        batch.put_cf(engine.cf(CF_KV), b"k", b"v");
        engine.write(batch, true).unwrap();
        let outgoing = Outgoing::new(dir.path().join("out"));
        outgoing.create(&engine, 1, 10).unwrap();
        outgoing.create(&engine, 2, 20).unwrap();
        for cf in 0..CFS.len() as u32 {
            let chunk = outgoing.chunk(&SnapshotChunkRequest { id: 1, cf, from_start: true, ..Default::default() });
            assert!(chunk.done && !chunk.unknown);
            assert_eq!(outgoing.delivered(1), cf as usize == CFS.len() - 1);
        }
        outgoing.chunk(&SnapshotChunkRequest { id: 2, cf: 0, from_start: true, ..Default::default() });
        assert!(!outgoing.delivered(2));
        assert_eq!(outgoing.expire(Duration::ZERO), vec![(2, 20)]);
        assert!(outgoing.chunk(&SnapshotChunkRequest { id: 1, cf: 0, ..Default::default() }).unknown, "forgotten");
        assert!(!dir.path().join("out").join(format!("{:016x}", 1)).exists(), "its checkpoint is removed");
    }

    #[test]
    fn a_served_snapshot_pins_the_log_until_its_member_has_it() {
        use crate::raft::log_store::SnapshotSource;
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&dir.path().join("db")).unwrap();
        let outgoing = Arc::new(Outgoing::new(dir.path().join("out")));
        let source =
            SnapshotSource { outgoing: outgoing.clone(), name: "a".into(), cluster_id: Arc::new(AtomicU64::new(1)) };
        let log = LogStore::open(engine.clone()).unwrap().with_snapshots(source);
        let applied = |i: u64| {
            let mut batch = WriteBatch::default();
            batch.put_cf(engine.cf(CF_META), b"applied_index", i.to_be_bytes());
            engine.write(batch, true).unwrap();
        };
        let mut batch = WriteBatch::default();
        let ents: Vec<Entry> = (1..=30).map(|i| Entry { index: i, term: 1, ..Default::default() }).collect();
        log.append(&mut batch, &ents);
        log.set_hard_state(&mut batch, &HardState { term: 1, commit: 30, ..Default::default() });
        engine.write(batch, true).unwrap();
        applied(25);
        let behind = |_: u64, _: u64| false;
        assert_eq!(log.snapshot_pin(behind), None);

        assert_eq!(log.snapshot(20, 2).unwrap().get_metadata().index, 25);
        assert_eq!(log.snapshot_pin(behind), Some(25));
        applied(28);
        assert_eq!(log.snapshot(26, 3).unwrap().get_metadata().index, 28);
        assert_eq!(log.snapshot_pin(behind), Some(25), "the oldest transfer holds the log");
        // Member 2 has its snapshot: only member 3's still holds the log.
        assert_eq!(log.snapshot_pin(|to, i| to == 2 && i == 25), Some(28));
        assert_eq!(log.snapshot_pin(|_, _| true), None);

        let mut gone = outgoing.expire(Duration::ZERO);
        gone.sort_unstable_by_key(|(_, to)| *to);
        assert_eq!(gone.iter().map(|(_, to)| *to).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(log.snapshot_pin(behind), None);
    }
}

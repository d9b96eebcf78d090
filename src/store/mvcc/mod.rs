//! The MVCC key-value store: etcd's revisioned key space on RocksDB.
//!
//! Every change gets a revision `(main, sub)`; one request (a Put, a DeleteRange that
//! deletes something, or a Txn with changes) takes one `main`. Values live in the `kv`
//! column family under their revision, tombstones included; the in-memory [`KeyIndex`]
//! maps keys to revisions and is rebuilt from the column family at start.
//!
//! Concurrency: one writer (the Raft apply loop) and many readers. The index sits behind
//! a std `RwLock` held only for in-memory work, never across I/O on a shared path or an
//! await. Readers read at `current`, which is published only after the batch holding
//! every value up to it is written, so a reader never sees a revision whose value is
//! not yet in RocksDB, even while the writer has already indexed newer ones.

pub mod index;
pub mod revision;

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use bytes::Bytes;
use prost::Message;
use rocksdb::{IteratorMode, WriteBatch};

use crate::pb::etcdserverpb::{
    alarm_request, compare, range_request, request_op, response_op, AlarmMember, AlarmRequest, AlarmResponse,
    AlarmType, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::pb::meshkvpb::{internal_request, InternalRequest, LeaseRecord};
use crate::pb::mvccpb::{Event, KeyValue};
use crate::store::alarm::{self, AlarmSet, Refusal, Refusals};
use crate::store::auth::{AuthError, AuthState, Tokens};
use crate::store::engine::{Engine, EngineError, CF_ALARM, CF_AUTH, CF_KV, CF_LEASE, CF_META};
use crate::store::lease::LeaseTable;
use crate::store::watch::{delete_event, put_event, EventBatch, Held, KeyRange, WatchHub};

pub use index::{KeyAt, KeyIndex, RangeEnd};
pub use revision::Revision;

pub(crate) const META_APPLIED: &[u8] = b"applied_index";
pub(crate) const META_REVISION: &[u8] = b"revision";
pub(crate) const META_COMPACTED: &[u8] = b"compact_revision";
/// The compact revision of a store never compacted, as etcd's: a compaction at 0 is
/// taken once, and HashKV says -1.
pub const NEVER_COMPACTED: i64 = -1;
/// The cluster version: the mesh protocol every member speaks, which entries may use.
pub const META_CLUSTER_VERSION: &[u8] = b"cluster_version";
/// Meta key set while a Raft snapshot replaces the store: its staging directory. The
/// store's column families are then neither the old state nor the new one.
pub const META_INSTALLING: &[u8] = b"snapshot_installing";

/// Why a request against the store failed. The API maps each to etcd's gRPC error.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error("key not found")]
    KeyNotFound,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("corrupt value at revision {0:?}: {1}")]
    Corrupt(Revision, String),
    /// The NOSPACE alarm is raised: writes that take space are refused.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// The CORRUPT alarm is raised: every write is refused.
    #[error("corrupt cluster")]
    CorruptAlarm,
    /// Refused by authentication, or an auth change that does not hold.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A Raft snapshot is replacing the store: what it holds is not one state yet.
    #[error("a snapshot is being installed")]
    Installing,
}

impl From<Refusal> for MvccError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NoSpace => MvccError::NoSpace,
            Refusal::Corrupt => MvccError::CorruptAlarm,
        }
    }
}

/// The outcome of applying one write.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    Alarm(AlarmResponse),
    /// An auth change made.
    Auth,
    /// An entry with nothing to apply (such as a new leader's empty entry).
    Empty,
}

/// Values written by the batch being applied, not yet in RocksDB.
type Pending = HashMap<Revision, KeyValue>;

/// The revisioned key-value store of one member.
pub struct MvccStore {
    engine: Engine,
    index: RwLock<KeyIndex>,
    /// Newest revision whose values are all in RocksDB: what readers see.
    current: AtomicI64,
    compacted: AtomicI64,
    applied: AtomicU64,
    /// The cluster version applied (0: none yet).
    cluster_version: AtomicU32,
    /// Lock order: `index` before `leases`.
    leases: RwLock<LeaseTable>,
    alarms: RwLock<AlarmSet>,
    /// What `alarms` refuses, read by every write.
    refusals: Refusals,
    /// Users, roles and permissions. Lock order: after `index` and `leases`.
    auth: RwLock<AuthState>,
    /// Whether authentication is on, read by every request.
    auth_on: AtomicBool,
    tokens: Tokens,
    hub: WatchHub,
    /// Set while a snapshot replaces the store's data, until the index is rebuilt from
    /// it: a value the index names may be missing meanwhile.
    replacing: AtomicBool,
}

/// The state of one write request while it is applied.
struct WriteTxn {
    /// The main revision this request takes if it changes anything.
    main: i64,
    /// Next sub revision; > 0 once something changed.
    sub: i64,
    /// What it changed, for watchers.
    events: Vec<Event>,
}

impl WriteTxn {
    fn changed(&self) -> bool {
        self.sub > 0
    }
    /// The revision reads inside the request see: its own changes included.
    fn read_rev(&self) -> i64 {
        if self.changed() {
            self.main
        } else {
            self.main - 1
        }
    }
    fn next(&mut self) -> Revision {
        let r = Revision::new(self.main, self.sub);
        self.sub += 1;
        r
    }
}

/// One request being applied: the state it changes.
struct Apply<'a> {
    ix: &'a mut KeyIndex,
    leases: &'a mut LeaseTable,
    batch: &'a mut WriteBatch,
    pending: &'a mut Pending,
    w: &'a mut WriteTxn,
}

/// What a store reads back from disk at start.
struct Loaded {
    index: KeyIndex,
    current: i64,
    compacted: i64,
    applied: u64,
    cluster_version: u32,
    leases: LeaseTable,
    alarms: AlarmSet,
    auth: AuthState,
}

fn lock_poisoned() -> ! {
    // A panic while holding the index lock leaves it inconsistent with RocksDB; the
    // member cannot go on serving from it.
    panic!("key index lock poisoned by an earlier panic")
}

impl MvccStore {
    /// Opens the store on `engine`, rebuilding the key index from the `kv` column family.
    pub fn open(engine: Engine) -> Result<Self, MvccError> {
        Self::open_with(engine, Tokens::default())
    }

    /// Opens the store with `tokens` for the tokens its auth changes hand out.
    pub fn open_with(engine: Engine, tokens: Tokens) -> Result<Self, MvccError> {
        let l = Self::load_all(&engine)?;
        let refusals = Refusals::default();
        refusals.set(&l.alarms);
        Ok(Self {
            engine,
            index: RwLock::new(l.index),
            current: AtomicI64::new(l.current),
            compacted: AtomicI64::new(l.compacted),
            applied: AtomicU64::new(l.applied),
            cluster_version: AtomicU32::new(l.cluster_version),
            leases: RwLock::new(l.leases),
            alarms: RwLock::new(l.alarms),
            refusals,
            auth_on: AtomicBool::new(l.auth.enabled()),
            auth: RwLock::new(l.auth),
            tokens,
            hub: WatchHub::default(),
            replacing: AtomicBool::new(false),
        })
    }

    /// Runs `install`, which replaces the store's data under it, then reloads the store
    /// from what it wrote. Meanwhile readers that miss a value, and the watch history,
    /// are answered `Installing` (try again) rather than told the value was compacted or
    /// the history empty.
    pub fn replace_with(&self, install: impl FnOnce() -> Result<(), EngineError>) -> Result<(), EngineError> {
        self.replacing.store(true, Ordering::Release);
        let done =
            install().and_then(|()| self.reload().map_err(|e| EngineError::Corrupt { cf: "kv", what: e.to_string() }));
        self.replacing.store(false, Ordering::Release);
        done
    }

    /// Why a value the index names is not in the store.
    fn missing(&self) -> MvccError {
        if self.replacing.load(Ordering::Acquire) {
            MvccError::Installing
        } else {
            // Compaction removed it between the index look-up and the read.
            MvccError::Compacted
        }
    }

    /// Reloads everything from disk, after a snapshot replaced it.
    pub fn reload(&self) -> Result<(), MvccError> {
        let l = Self::load_all(&self.engine)?;
        let before = self.revision();
        let mut ix = self.index.write().unwrap_or_else(|_| lock_poisoned());
        *ix = l.index;
        *self.leases.write().unwrap_or_else(|_| lock_poisoned()) = l.leases;
        let mut alarms = self.alarms.write().unwrap_or_else(|_| lock_poisoned());
        self.refusals.set(&l.alarms);
        *alarms = l.alarms;
        drop(alarms);
        let mut auth = self.auth.write().unwrap_or_else(|_| lock_poisoned());
        self.auth_on.store(l.auth.enabled(), Ordering::Release);
        *auth = l.auth;
        drop(auth);
        self.current.store(l.current, Ordering::Release);
        self.compacted.store(l.compacted, Ordering::Release);
        self.applied.store(l.applied, Ordering::Release);
        self.cluster_version.store(l.cluster_version, Ordering::Release);
        drop(ix);
        if l.current > before {
            // The events in between came with the snapshot, not one by one.
            self.hub.publish(EventBatch::new(before + 1, l.current, None));
        }
        Ok(())
    }

    fn load_all(engine: &Engine) -> Result<Loaded, MvccError> {
        let applied = engine.get_u64(CF_META, META_APPLIED)?.unwrap_or(0);
        let mut current = engine.get_u64(CF_META, META_REVISION)?.unwrap_or(1) as i64;
        let compacted = engine.get_u64(CF_META, META_COMPACTED)?.map_or(NEVER_COMPACTED, |c| c as i64);
        let cluster_version = engine.get_u64(CF_META, META_CLUSTER_VERSION)?.unwrap_or(0) as u32;
        let mut index = KeyIndex::default();
        let mut key_lease = HashMap::new();
        let db = engine.db();
        for item in db.iterator_cf(engine.cf(CF_KV), IteratorMode::Start) {
            let (k, v) = item.map_err(EngineError::from)?;
            let (rev, tombstone) = Revision::from_key(&k)
                .ok_or_else(|| EngineError::Corrupt { cf: CF_KV, what: format!("bad revision key {k:?}") })?;
            let kv = KeyValue::decode(v.as_ref()).map_err(|e| MvccError::Corrupt(rev, e.to_string()))?;
            if tombstone {
                key_lease.remove(&kv.key);
                index.tombstone(&kv.key, rev);
            } else {
                if kv.lease != 0 {
                    key_lease.insert(kv.key.clone(), kv.lease);
                } else {
                    key_lease.remove(&kv.key);
                }
                index.restore_put(kv.key, rev, kv.create_revision, kv.version);
            }
            current = current.max(rev.main);
        }
        let mut records = Vec::new();
        for item in db.iterator_cf(engine.cf(CF_LEASE), IteratorMode::Start) {
            let (k, v) = item.map_err(EngineError::from)?;
            let r = LeaseRecord::decode(v.as_ref())
                .map_err(|e| EngineError::Corrupt { cf: CF_LEASE, what: format!("lease {k:?}: {e}") })?;
            records.push((r.id, r.ttl, r.remaining_ttl));
        }
        let leases = LeaseTable::rebuild(records, key_lease);
        let keys = db.iterator_cf(engine.cf(CF_ALARM), IteratorMode::Start).map(|item| item.map(|(k, _)| k));
        let keys = keys.collect::<Result<Vec<_>, _>>().map_err(EngineError::from)?;
        let alarms = AlarmSet::from_keys(keys.iter().map(|k| k.as_ref()))
            .map_err(|what| EngineError::Corrupt { cf: CF_ALARM, what })?;
        let records = db.iterator_cf(engine.cf(CF_AUTH), IteratorMode::Start);
        let records = records.collect::<Result<Vec<_>, _>>().map_err(EngineError::from)?;
        let auth = AuthState::load(records).map_err(|what| EngineError::Corrupt { cf: CF_AUTH, what })?;
        Ok(Loaded { index, current, compacted, applied, cluster_version, leases, alarms, auth })
    }

    /// Listens to every change applied from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<std::sync::Arc<EventBatch>> {
        self.hub.subscribe()
    }

    /// The alarms raised of one type, or all for [`AlarmType::None`].
    pub fn alarms(&self, alarm: AlarmType) -> Vec<AlarmMember> {
        self.alarms.read().unwrap_or_else(|_| lock_poisoned()).list(alarm)
    }

    /// Users, roles and permissions, for reading. Not to be held across an await.
    pub fn auth(&self) -> RwLockReadGuard<'_, AuthState> {
        self.auth.read().unwrap_or_else(|_| lock_poisoned())
    }

    /// Whether authentication is on: one atomic load.
    pub fn auth_enabled(&self) -> bool {
        self.auth_on.load(Ordering::Acquire)
    }

    /// The tokens this member knows.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The leases, for reading.
    pub fn leases(&self) -> RwLockReadGuard<'_, LeaseTable> {
        self.leases.read().unwrap_or_else(|_| lock_poisoned())
    }

    /// The events of revisions `from..=to` on keys in `range` (None: every key), read
    /// from the history, in revision order. Stops after about `max` events, at the end
    /// of a revision; returns the events and the last revision they fully cover.
    pub fn events(
        &self,
        range: Option<&KeyRange>,
        from: i64,
        to: i64,
        max: usize,
    ) -> Result<(Vec<Event>, i64), MvccError> {
        // One point in time of the store: a snapshot being installed clears the history
        // and ingests the new one, and what a read finds half way is no history at all.
        if self.replacing.load(Ordering::Acquire) {
            return Err(MvccError::Installing);
        }
        let db = self.engine.db();
        let view = db.snapshot();
        let (current, compacted) = self.settled(&view)?;
        if from < compacted.max(self.compact_revision()) {
            return Err(MvccError::Compacted);
        }
        let to = to.min(self.revision()).min(current);
        let mut out = Vec::new();
        let start = Revision::new(from, 0).to_key(false);
        let iter = view.iterator_cf(self.engine.cf(CF_KV), IteratorMode::From(&start, rocksdb::Direction::Forward));
        let (mut scanned, mut main, mut covered) = (0usize, 0i64, to);
        for item in iter {
            let (k, v) = item.map_err(EngineError::from)?;
            let Some((rev, tombstone)) = Revision::from_key(&k) else { continue };
            if rev.main > to {
                break;
            }
            if rev.main != main {
                // A revision ends here; a revision is never split between two reads.
                if scanned >= max {
                    covered = rev.main - 1;
                    break;
                }
                main = rev.main;
            }
            scanned += 1;
            let kv = KeyValue::decode(v.as_ref()).map_err(|e| MvccError::Corrupt(rev, e.to_string()))?;
            if range.is_some_and(|r| !r.contains(&kv.key)) {
                continue;
            }
            out.push(if tombstone { delete_event(kv.key, rev.main) } else { put_event(kv) });
        }
        Ok((out, covered))
    }

    /// The key as it was at revision `rev`, if it existed then and is still in the history.
    pub fn get_at(&self, key: &[u8], rev: i64) -> Option<KeyValue> {
        if rev < self.compact_revision() || rev <= 0 {
            return None;
        }
        let at = self.index.read().unwrap_or_else(|_| lock_poisoned()).get(key, rev)?;
        self.load(at.modified, None).ok()
    }

    /// The newest revision. A fresh store is at revision 1, as etcd's is.
    pub fn revision(&self) -> i64 {
        self.current.load(Ordering::Acquire)
    }

    /// The revision of the last compaction, [`NEVER_COMPACTED`] before any.
    pub fn compact_revision(&self) -> i64 {
        self.compacted.load(Ordering::Acquire)
    }

    /// The Raft index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The applied index a crash now would leave: that of the last flush of the store's
    /// column families. The Raft log must keep every entry after it.
    pub fn durable_applied_index(&self) -> Result<u64, EngineError> {
        Ok(self.engine.get_u64_persisted(CF_META, META_APPLIED)?.unwrap_or(0))
    }

    /// Starts a flush of what the store has applied; see
    /// [`durable_applied_index`](Self::durable_applied_index).
    pub fn start_flush(&self) -> Result<(), EngineError> {
        self.engine.flush_store()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Number of live keys at the newest revision.
    pub fn key_count(&self) -> usize {
        let rev = self.revision();
        let ix = self.index.read().unwrap_or_else(|_| lock_poisoned());
        let mut n = 0;
        ix.range(&[0], &RangeEnd::Unbounded, rev, |_, _| {
            n += 1;
            true
        });
        n + usize::from(ix.get(&[], rev).is_some())
    }

    fn check_read_rev(&self, requested: i64, current: i64) -> Result<i64, MvccError> {
        if requested <= 0 {
            return Ok(current);
        }
        if requested > current {
            return Err(MvccError::FutureRev);
        }
        if requested < self.compact_revision() {
            return Err(MvccError::Compacted);
        }
        Ok(requested)
    }

    fn load(&self, rev: Revision, pending: Option<&Pending>) -> Result<KeyValue, MvccError> {
        if let Some(kv) = pending.and_then(|p| p.get(&rev)) {
            return Ok(kv.clone());
        }
        let raw =
            self.engine.db().get_pinned_cf(self.engine.cf(CF_KV), rev.to_key(false)).map_err(EngineError::from)?;
        match raw {
            Some(v) => KeyValue::decode(v.as_ref()).map_err(|e| MvccError::Corrupt(rev, e.to_string())),
            None => Err(self.missing()),
        }
    }

    fn load_many(&self, found: &[(Bytes, KeyAt)], pending: Option<&Pending>) -> Result<Vec<KeyValue>, MvccError> {
        if pending.is_none() && found.len() > 1 {
            let cf = self.engine.cf(CF_KV);
            let keys: Vec<_> = found.iter().map(|(_, at)| (cf, at.modified.to_key(false))).collect();
            let mut out = Vec::with_capacity(found.len());
            for (res, (_, at)) in self.engine.db().multi_get_cf(keys).into_iter().zip(found) {
                match res.map_err(EngineError::from)? {
                    Some(v) => out.push(
                        KeyValue::decode(v.as_ref()).map_err(|e| MvccError::Corrupt(at.modified, e.to_string()))?,
                    ),
                    None => return Err(self.missing()),
                }
            }
            return Ok(out);
        }
        found.iter().map(|(_, at)| self.load(at.modified, pending)).collect()
    }

    /// Serves a Range at the newest revision (or the one it asks for).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let current = self.revision();
        let rev = self.check_read_rev(req.revision, current)?;
        let (found, count) = {
            let ix = self.index.read().unwrap_or_else(|_| lock_poisoned());
            select(&ix, req, rev)
        };
        self.finish_range(req, found, count, current, None)
    }

    /// Filters, sorts, truncates and loads a range selection; `header_rev` is the
    /// revision the response header reports.
    fn finish_range(
        &self,
        req: &RangeRequest,
        mut found: Vec<(Bytes, KeyAt)>,
        count: usize,
        header_rev: i64,
        pending: Option<&Pending>,
    ) -> Result<RangeResponse, MvccError> {
        let header = Some(ResponseHeader { revision: header_rev, ..Default::default() });
        if req.count_only {
            return Ok(RangeResponse { header, kvs: vec![], more: false, count: count as i64 });
        }
        found.retain(|(_, at)| {
            (req.max_mod_revision == 0 || at.modified.main <= req.max_mod_revision)
                && (req.min_mod_revision == 0 || at.modified.main >= req.min_mod_revision)
                && (req.max_create_revision == 0 || at.created <= req.max_create_revision)
                && (req.min_create_revision == 0 || at.created >= req.min_create_revision)
        });
        let target = range_request::SortTarget::try_from(req.sort_target).unwrap_or(range_request::SortTarget::Key);
        let mut order = range_request::SortOrder::try_from(req.sort_order).unwrap_or(range_request::SortOrder::None);
        if target != range_request::SortTarget::Key && order == range_request::SortOrder::None {
            // Results come in key order already; any other target sorts ascending by default.
            order = range_request::SortOrder::Ascend;
        }
        let limit = usize::try_from(req.limit).unwrap_or(0);
        let mut more = false;
        let mut kvs = if target == range_request::SortTarget::Value && order != range_request::SortOrder::None {
            let mut kvs = self.load_many(&found, pending)?;
            kvs.sort_by(|a, b| directed(a.value.cmp(&b.value), order));
            if limit > 0 && kvs.len() > limit {
                kvs.truncate(limit);
                more = true;
            }
            kvs
        } else {
            if order != range_request::SortOrder::None {
                use range_request::SortTarget as T;
                found.sort_by(|(ka, a), (kb, b)| {
                    let c = match target {
                        T::Key | T::Value => ka.cmp(kb),
                        T::Version => a.version.cmp(&b.version),
                        T::Create => a.created.cmp(&b.created),
                        // The revision alone, as etcd's mod_revision: keys written by
                        // one Txn tie, and stay in key order, as etcd's sort leaves them.
                        T::Mod => a.modified.main.cmp(&b.modified.main),
                    };
                    directed(c, order)
                });
            }
            if limit > 0 && found.len() > limit {
                found.truncate(limit);
                more = true;
            }
            self.load_many(&found, pending)?
        };
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        Ok(RangeResponse { header, kvs, more, count: count as i64 })
    }

    /// Applies committed entries `(raft index, request)` in one RocksDB batch, in order,
    /// and returns each entry's outcome. The batch also records the applied index, so a
    /// replay after a crash starts exactly after the last entry it holds.
    pub fn apply(
        &self,
        entries: &[(u64, Option<InternalRequest>)],
    ) -> Result<Vec<Result<WriteResponse, MvccError>>, MvccError> {
        self.apply_held(entries).map(|(out, _published_on_drop)| out)
    }

    /// As [`apply`](Self::apply), but the batches' events reach watchers only when the
    /// returned [`Held`] is dropped (also on error: what was written is published).
    pub fn apply_held(
        &self,
        entries: &[(u64, Option<InternalRequest>)],
    ) -> Result<(Vec<Result<WriteResponse, MvccError>>, Held), MvccError> {
        let mut held = self.hub.hold();
        let Some(&(last_index, _)) = entries.last() else {
            return Ok((Vec::new(), held));
        };
        let mut batch = WriteBatch::default();
        let mut pending = Pending::with_capacity(entries.len());
        let mut events = Vec::new();
        let mut rev = self.revision();
        let mut out = Vec::with_capacity(entries.len());
        for (index, req) in entries {
            if *index <= self.applied_index() {
                // Already applied before a restart: replay must not apply twice.
                out.push(Ok(WriteResponse::Empty));
                continue;
            }
            let Some((req, from)) = req.as_ref().and_then(|r| Some((r.request.as_ref()?, r))) else {
                out.push(Ok(WriteResponse::Empty));
                continue;
            };
            // The user a client's request comes from; none for the members' own.
            let user = (!from.by_member).then_some(from.user.as_str());
            if let Err(refused) = self.refusals.check(req) {
                out.push(Err(refused.into()));
                continue;
            }
            if let internal_request::Request::Compaction(c) = req {
                // Readers must never see the index compacted past the revision they read
                // at, so what came before is published first.
                let before = std::mem::take(&mut events);
                self.commit(std::mem::take(&mut batch), rev, *index - 1, None, before, &mut held)?;
                pending.clear();
                let mut ix = self.index.write().unwrap_or_else(|_| lock_poisoned());
                let res = self.compact(&mut ix, &mut batch, c, rev, self.compact_revision());
                drop(ix);
                let ok = res.is_ok();
                self.commit(std::mem::take(&mut batch), rev, *index, ok.then_some(c.revision), Vec::new(), &mut held)?;
                out.push(res.map(WriteResponse::Compaction));
                continue;
            }
            let mut w = WriteTxn { main: rev + 1, sub: 0, events: Vec::new() };
            let res = {
                let mut ix = self.index.write().unwrap_or_else(|_| lock_poisoned());
                let ix = &mut *ix;
                let mut leases = self.leases.write().unwrap_or_else(|_| lock_poisoned());
                let leases = &mut *leases;
                let mut a = Apply { ix, leases, batch: &mut batch, pending: &mut pending, w: &mut w };
                let allowed = match user {
                    Some(user) if self.auth_enabled() => self.authorize(&a, req, user),
                    _ => Ok(()),
                };
                allowed.and_then(|()| match req {
                    internal_request::Request::Put(p) => self
                        .check_lease(&a, p)
                        .and_then(|()| self.check_put(&a, p, rev))
                        .and_then(|()| self.put(&mut a, p))
                        .map(WriteResponse::Put),
                    internal_request::Request::DeleteRange(d) => {
                        self.delete_range(&mut a, d).map(WriteResponse::DeleteRange)
                    }
                    internal_request::Request::Txn(t) => self.txn(&mut a, t).map(WriteResponse::Txn),
                    internal_request::Request::LeaseGrant(g) => {
                        self.lease_grant(&mut a, g, rev, *index).map(WriteResponse::LeaseGrant)
                    }
                    internal_request::Request::LeaseRevoke(r) => {
                        self.lease_revoke(&mut a, r).map(WriteResponse::LeaseRevoke)
                    }
                    internal_request::Request::Alarm(r) => Ok(WriteResponse::Alarm(self.alarm(&mut a, r))),
                    internal_request::Request::LeaseCheckpoint(c) => {
                        self.lease_checkpoint(&mut a, c);
                        Ok(WriteResponse::Empty)
                    }
                    internal_request::Request::Auth(r) => self.change_auth(&mut a, r, user),
                    internal_request::Request::ClusterVersion(v) => {
                        self.raise_cluster_version(&mut a, *v);
                        Ok(WriteResponse::Empty)
                    }
                    internal_request::Request::Compaction(_) => unreachable!("handled above"),
                })
            };
            if w.changed() {
                rev = w.main;
                events.append(&mut w.events);
            }
            out.push(res);
        }
        self.commit(batch, rev, last_index, None, events, &mut held)?;
        Ok((out, held))
    }

    /// Writes an applied batch with the applied index and revision, publishes it to
    /// readers, then hands its events to `held` for the watchers.
    fn commit(
        &self,
        mut batch: WriteBatch,
        rev: i64,
        applied: u64,
        compacted: Option<i64>,
        events: Vec<Event>,
        held: &mut Held,
    ) -> Result<(), MvccError> {
        let meta = self.engine.cf(CF_META);
        batch.put_cf(meta, META_APPLIED, applied.to_be_bytes());
        batch.put_cf(meta, META_REVISION, (rev as u64).to_be_bytes());
        if let Some(c) = compacted {
            batch.put_cf(meta, META_COMPACTED, (c as u64).to_be_bytes());
        }
        // Not in RocksDB's WAL: the Raft log is synced, and the applied index rides in this
        // batch, so what a crash loses since the last flush is applied again from the log.
        self.engine.write_unlogged(batch)?;
        let before = self.current.swap(rev, Ordering::AcqRel);
        self.applied.store(applied, Ordering::Release);
        if let Some(c) = compacted {
            self.compacted.store(c, Ordering::Release);
        }
        if rev > before {
            held.push(EventBatch::new(before + 1, rev, Some(events)));
        }
        Ok(())
    }

    /// Checks a client's write against its user's permissions as they stand at this
    /// entry, as etcd's apply does.
    fn authorize(&self, a: &Apply, req: &internal_request::Request, user: &str) -> Result<(), MvccError> {
        use internal_request::Request as R;
        let auth = self.auth.read().unwrap_or_else(|_| lock_poisoned());
        // Root may write every key: a lease's keys, perhaps many, are not walked for it.
        let writes_all_keys_of = |lease: i64| {
            if auth.is_admin(user) {
                return Ok(());
            }
            let mut keys = a.leases.get(lease).map(|l| &l.keys).into_iter().flatten();
            keys.try_for_each(|key| auth.check(user, crate::store::auth::Access::Write, key, &[]))
        };
        match req {
            R::Put(p) => {
                auth.check_put(user, p)?;
                // As etcd: a lease is given to a key only by a user who could revoke it.
                writes_all_keys_of(p.lease)?;
            }
            R::DeleteRange(d) => auth.check_delete(user, d)?,
            R::Txn(t) => auth.check_txn(user, t)?,
            // Revoking deletes the lease's keys: each must be writable.
            R::LeaseRevoke(r) => writes_all_keys_of(r.id)?,
            R::Compaction(_)
            | R::LeaseGrant(_)
            | R::LeaseCheckpoint(_)
            | R::Alarm(_)
            | R::Auth(_)
            | R::ClusterVersion(_) => {}
        }
        Ok(())
    }

    /// Raises the cluster version to `v`; a lower or equal one changes nothing.
    fn raise_cluster_version(&self, a: &mut Apply, v: u32) {
        if v > self.cluster_version() {
            a.batch.put_cf(self.engine.cf(CF_META), META_CLUSTER_VERSION, u64::from(v).to_be_bytes());
            self.cluster_version.store(v, Ordering::Release);
        }
    }

    /// The cluster version: the mesh protocol every member speaks (0: none raised yet).
    pub fn cluster_version(&self) -> u32 {
        self.cluster_version.load(Ordering::Acquire)
    }

    fn change_auth(
        &self,
        a: &mut Apply,
        r: &crate::pb::meshkvpb::AuthRequest,
        user: Option<&str>,
    ) -> Result<WriteResponse, MvccError> {
        let Some(change) = r.request.as_ref() else { return Ok(WriteResponse::Empty) };
        let mut auth = self.auth.write().unwrap_or_else(|_| lock_poisoned());
        auth.apply(change, user, a.batch, self.engine.cf(CF_AUTH), &self.tokens)?;
        self.auth_on.store(auth.enabled(), Ordering::Release);
        Ok(WriteResponse::Auth)
    }

    /// Raises, clears or lists alarms, as etcd's apply does: the answer holds the alarm
    /// changed (none if nothing changed) or, for a GET, the alarms of the type asked.
    fn alarm(&self, a: &mut Apply, r: &AlarmRequest) -> AlarmResponse {
        let mut alarms = self.alarms.write().unwrap_or_else(|_| lock_poisoned());
        let kind = AlarmType::try_from(r.alarm).unwrap_or(AlarmType::None);
        let member = AlarmMember { member_id: r.member_id, alarm: kind as i32 };
        let cf = self.engine.cf(CF_ALARM);
        let changed = match alarm_request::AlarmAction::try_from(r.action) {
            Ok(alarm_request::AlarmAction::Get) => {
                return AlarmResponse { header: None, alarms: alarms.list(kind) };
            }
            Ok(alarm_request::AlarmAction::Activate) if kind != AlarmType::None => {
                let first = !alarms.has(kind);
                let changed = alarms.activate(r.member_id, kind);
                if changed {
                    a.batch.put_cf(cf, alarm::key(r.member_id, kind), []);
                    if first {
                        tracing::warn!(alarm = kind.as_str_name(), from = format!("{:x}", r.member_id), "alarm raised");
                    }
                }
                changed
            }
            Ok(alarm_request::AlarmAction::Deactivate) => {
                let changed = alarms.deactivate(r.member_id, kind);
                if changed {
                    a.batch.delete_cf(cf, alarm::key(r.member_id, kind));
                    if !alarms.has(kind) {
                        tracing::warn!(
                            alarm = kind.as_str_name(),
                            from = format!("{:x}", r.member_id),
                            "alarm disarmed"
                        );
                    }
                }
                changed
            }
            _ => false,
        };
        self.refusals.set(&alarms);
        AlarmResponse { header: None, alarms: if changed { vec![member] } else { Vec::new() } }
    }

    fn lease_grant(
        &self,
        a: &mut Apply,
        g: &LeaseGrantRequest,
        rev: i64,
        index: u64,
    ) -> Result<LeaseGrantResponse, MvccError> {
        if a.leases.contains(g.id) {
            return Err(MvccError::LeaseExists);
        }
        a.leases.grant(g.id, g.ttl, index);
        let record = LeaseRecord { id: g.id, ttl: g.ttl, remaining_ttl: 0 };
        a.batch.put_cf(self.engine.cf(CF_LEASE), g.id.to_be_bytes(), record.encode_to_vec());
        Ok(LeaseGrantResponse {
            header: Some(ResponseHeader { revision: rev, ..Default::default() }),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        })
    }

    /// Records the leader's checkpoints of time left; leases revoked meanwhile are
    /// skipped. No revision: nothing a client reads changes.
    fn lease_checkpoint(&self, a: &mut Apply, c: &LeaseCheckpointRequest) {
        for cp in &c.checkpoints {
            let remaining_ttl = cp.remaining_ttl.max(0);
            if let Some(ttl) = a.leases.checkpoint(cp.id, remaining_ttl) {
                let record = LeaseRecord { id: cp.id, ttl, remaining_ttl };
                a.batch.put_cf(self.engine.cf(CF_LEASE), cp.id.to_be_bytes(), record.encode_to_vec());
            }
        }
    }

    /// Removes a lease and deletes every key it holds, all in one revision.
    fn lease_revoke(&self, a: &mut Apply, r: &LeaseRevokeRequest) -> Result<LeaseRevokeResponse, MvccError> {
        if !a.leases.contains(r.id) {
            return Err(MvccError::LeaseNotFound);
        }
        for key in a.leases.revoke(r.id) {
            if a.ix.get(&key, a.w.read_rev()).is_some() {
                self.tombstone(a, key);
            }
        }
        a.batch.delete_cf(self.engine.cf(CF_LEASE), r.id.to_be_bytes());
        Ok(LeaseRevokeResponse { header: Some(ResponseHeader { revision: a.w.read_rev(), ..Default::default() }) })
    }

    fn tombstone(&self, a: &mut Apply, key: Bytes) {
        let rev = a.w.next();
        a.ix.tombstone(&key, rev);
        a.leases.detach(&key);
        let tomb = KeyValue { key: key.clone(), mod_revision: rev.main, ..Default::default() };
        a.batch.put_cf(self.engine.cf(CF_KV), rev.to_key(true), tomb.encode_to_vec());
        a.w.events.push(delete_event(key, rev.main));
    }

    /// Checks a Put against the state at `rev` before anything is written: etcd fails
    /// the whole request (and a whole Txn) on these, in this order in a Txn. A Put alone
    /// checks its lease first ([`check_lease`](Self::check_lease)), as etcd's does.
    fn check_put(&self, a: &Apply, p: &PutRequest, rev: i64) -> Result<(), MvccError> {
        if (p.ignore_value || p.ignore_lease) && a.ix.get(&p.key, rev).is_none() {
            return Err(MvccError::KeyNotFound);
        }
        self.check_lease(a, p)
    }

    fn check_lease(&self, a: &Apply, p: &PutRequest) -> Result<(), MvccError> {
        if p.lease != 0 && !a.leases.contains(p.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        Ok(())
    }

    fn put(&self, a: &mut Apply, p: &PutRequest) -> Result<PutResponse, MvccError> {
        // The previous value is read only when the request needs it: most puts do not,
        // and the read may have to go to disk.
        let needs_prev = p.prev_kv || p.ignore_value || p.ignore_lease;
        let prev = match needs_prev.then(|| a.ix.get(&p.key, a.w.read_rev())).flatten() {
            Some(at) => Some(self.load(at.modified, Some(a.pending))?),
            None => None,
        };
        let rev = a.w.next();
        let at = a.ix.put(p.key.clone(), rev);
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: at.created,
            mod_revision: rev.main,
            version: at.version,
            value: match (&prev, p.ignore_value) {
                (Some(prev), true) => prev.value.clone(),
                _ => p.value.clone(),
            },
            lease: match (&prev, p.ignore_lease) {
                (Some(prev), true) => prev.lease,
                _ => p.lease,
            },
        };
        a.leases.attach(&kv.key, kv.lease);
        a.batch.put_cf(self.engine.cf(CF_KV), rev.to_key(false), kv.encode_to_vec());
        a.pending.insert(rev, kv.clone());
        a.w.events.push(put_event(kv));
        Ok(PutResponse {
            header: Some(ResponseHeader { revision: rev.main, ..Default::default() }),
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete_range(&self, a: &mut Apply, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse, MvccError> {
        let end = RangeEnd::from_request(&d.range_end);
        let mut found = Vec::new();
        a.ix.range(&d.key, &end, a.w.read_rev(), |k, at| {
            found.push((k.clone(), at));
            true
        });
        let prev_kvs = if d.prev_kv { self.load_many(&found, Some(a.pending))? } else { Vec::new() };
        let deleted = found.len() as i64;
        for (key, _) in found {
            self.tombstone(a, key);
        }
        Ok(DeleteRangeResponse {
            header: Some(ResponseHeader { revision: a.w.read_rev(), ..Default::default() }),
            deleted,
            prev_kvs,
        })
    }

    fn compare(&self, a: &Apply, c: &Compare, rev: i64) -> Result<bool, MvccError> {
        let end = match c.range_end.as_ref() {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            e => RangeEnd::Before(Bytes::copy_from_slice(e)),
        };
        let mut found = Vec::new();
        a.ix.range(&c.key, &end, rev, |k, at| {
            found.push((k.clone(), at));
            true
        });
        let target = compare::CompareTarget::try_from(c.target).unwrap_or(compare::CompareTarget::Version);
        if found.is_empty() {
            // A missing key compares as zero values, but its value cannot be compared.
            return Ok(target != compare::CompareTarget::Value && compare_kv(c, &KeyValue::default()));
        }
        let kvs = self.load_many(&found, Some(a.pending))?;
        Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
    }

    /// Decides every branch of a Txn (nested ones included) against the state before it,
    /// as etcd does: whether each Txn on the chosen path succeeds, in the order they run.
    fn txn_path(&self, a: &Apply, t: &TxnRequest, rev: i64, path: &mut Vec<bool>) -> Result<(), MvccError> {
        let mut ok = true;
        for c in &t.compare {
            if !self.compare(a, c, rev)? {
                ok = false;
                break;
            }
        }
        path.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
                self.txn_path(a, inner, rev, path)?;
            }
        }
        Ok(())
    }

    /// Checks the puts (`puts`) or the ranges on a Txn's chosen path before any op runs.
    /// etcd checks every put first, then every range, so a bad lease is told before a
    /// compacted revision.
    fn check_path(
        &self,
        a: &Apply,
        t: &TxnRequest,
        rev: i64,
        path: &mut impl Iterator<Item = bool>,
        puts: bool,
    ) -> Result<(), MvccError> {
        let ok = path.next().unwrap_or(false);
        for op in if ok { &t.success } else { &t.failure } {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) if puts => self.check_put(a, p, rev)?,
                Some(request_op::Request::RequestRange(r)) if !puts => {
                    // etcd's check takes a negative revision for one below the oldest it
                    // keeps, once anything is compacted (a Range alone reads the newest).
                    if r.revision < 0 && r.revision < self.compact_revision() {
                        return Err(MvccError::Compacted);
                    }
                    self.check_read_rev(r.revision, rev)?;
                }
                Some(request_op::Request::RequestTxn(inner)) => self.check_path(a, inner, rev, path, puts)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn txn(&self, a: &mut Apply, t: &TxnRequest) -> Result<TxnResponse, MvccError> {
        let mut path = Vec::new();
        let rev = a.w.main - 1;
        self.txn_path(a, t, rev, &mut path)?;
        for puts in [true, false] {
            self.check_path(a, t, rev, &mut path.iter().copied(), puts)?;
        }
        let mut path = path.into_iter();
        let mut resp = self.run_txn(a, t, &mut path)?;
        resp.header = Some(ResponseHeader { revision: a.w.read_rev(), ..Default::default() });
        Ok(resp)
    }

    fn run_txn(
        &self,
        a: &mut Apply,
        t: &TxnRequest,
        path: &mut std::vec::IntoIter<bool>,
    ) -> Result<TxnResponse, MvccError> {
        let succeeded = path.next().unwrap_or(false);
        let ops: &[RequestOp] = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    let rev = if r.revision > 0 { r.revision } else { a.w.read_rev() };
                    let (found, count) = select(a.ix, r, rev);
                    Some(response_op::Response::ResponseRange(self.finish_range(
                        r,
                        found,
                        count,
                        a.w.read_rev(),
                        Some(a.pending),
                    )?))
                }
                Some(request_op::Request::RequestPut(p)) => Some(response_op::Response::ResponsePut(self.put(a, p)?)),
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    Some(response_op::Response::ResponseDeleteRange(self.delete_range(a, d)?))
                }
                Some(request_op::Request::RequestTxn(inner)) => {
                    // etcd gives a nested Txn's answer an empty header.
                    let mut r = self.run_txn(a, inner, path)?;
                    r.header = Some(ResponseHeader::default());
                    Some(response_op::Response::ResponseTxn(r))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse { header: None, succeeded, responses })
    }

    fn compact(
        &self,
        ix: &mut KeyIndex,
        batch: &mut WriteBatch,
        c: &CompactionRequest,
        current: i64,
        compacted: i64,
    ) -> Result<CompactionResponse, MvccError> {
        if c.revision <= compacted {
            return Err(MvccError::Compacted);
        }
        if c.revision > current {
            return Err(MvccError::FutureRev);
        }
        let cf = self.engine.cf(CF_KV);
        for d in ix.compact(c.revision) {
            batch.delete_cf(cf, d.rev.to_key(d.tombstone));
        }
        Ok(CompactionResponse { header: Some(ResponseHeader { revision: current, ..Default::default() }) })
    }

    /// The revision and compact revision a point in time of the store holds, or
    /// `Installing` while a snapshot is replacing its data there.
    fn settled(&self, view: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>) -> Result<(i64, i64), MvccError> {
        let meta = |key: &[u8]| -> Result<Option<i64>, MvccError> {
            let v = view.get_cf(self.engine.cf(CF_META), key).map_err(EngineError::from)?;
            Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(|b| u64::from_be_bytes(b) as i64))
        };
        if view.get_cf(self.engine.cf(CF_META), META_INSTALLING).map_err(EngineError::from)?.is_some() {
            return Err(MvccError::Installing);
        }
        Ok((meta(META_REVISION)?.unwrap_or(1), meta(META_COMPACTED)?.unwrap_or(NEVER_COMPACTED)))
    }

    /// A CRC-32 over every stored revision up to `rev` (0: the newest), for comparing
    /// members' stores. Returns the hash, the revision it covers and the compact revision.
    /// It reads one point in time of the store, so that a write or a compaction applied
    /// meanwhile cannot make two members that agree hash differently.
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), MvccError> {
        let db = self.engine.db();
        let view = db.snapshot();
        let (current, compacted) = self.settled(&view)?;
        let rev = match rev {
            r if r <= 0 => current,
            r if r > current => return Err(MvccError::FutureRev),
            r if r < compacted => return Err(MvccError::Compacted),
            r => r,
        };
        let mut h = crc32fast::Hasher::new();
        let upper = Revision::new(rev + 1, 0).to_key(false);
        for item in view.iterator_cf(self.engine.cf(CF_KV), IteratorMode::Start) {
            let (k, v) = item.map_err(EngineError::from)?;
            if k.as_ref() >= upper.as_slice() {
                break;
            }
            h.update(&k);
            h.update(&v);
        }
        Ok((h.finalize(), rev, compacted))
    }
}

fn directed(c: CmpOrdering, order: range_request::SortOrder) -> CmpOrdering {
    if order == range_request::SortOrder::Descend {
        c.reverse()
    } else {
        c
    }
}

/// The keys a Range covers at `rev`, in key order, and how many there are.
fn select(ix: &KeyIndex, req: &RangeRequest, rev: i64) -> (Vec<(Bytes, KeyAt)>, usize) {
    let end = RangeEnd::from_request(&req.range_end);
    let mut found = Vec::new();
    let mut count = 0usize;
    // Without sorting or filtering, one more than the limit tells `more`; the count
    // still covers the whole range. As etcd does, only an order asks for the whole range
    // to sort: a target without one sorts the first keys up to one more than the limit.
    let unsorted = req.sort_order == 0
        && req.min_mod_revision == 0
        && req.max_mod_revision == 0
        && req.min_create_revision == 0
        && req.max_create_revision == 0;
    let keep = if req.count_only {
        0
    } else if unsorted && req.limit > 0 {
        usize::try_from(req.limit).unwrap_or(usize::MAX).saturating_add(1)
    } else {
        usize::MAX
    };
    ix.range(&req.key, &end, rev, |k, at| {
        count += 1;
        if found.len() < keep {
            found.push((k.clone(), at));
        }
        true
    });
    (found, count)
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::TargetUnion as U;
    let target = compare::CompareTarget::try_from(c.target).unwrap_or(compare::CompareTarget::Version);
    let ord = match target {
        compare::CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(U::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        compare::CompareTarget::Version => kv.version.cmp(&match c.target_union {
            Some(U::Version(v)) => v,
            _ => 0,
        }),
        compare::CompareTarget::Create => kv.create_revision.cmp(&match c.target_union {
            Some(U::CreateRevision(v)) => v,
            _ => 0,
        }),
        compare::CompareTarget::Mod => kv.mod_revision.cmp(&match c.target_union {
            Some(U::ModRevision(v)) => v,
            _ => 0,
        }),
        compare::CompareTarget::Lease => kv.lease.cmp(&match c.target_union {
            Some(U::Lease(v)) => v,
            _ => 0,
        }),
    };
    match compare::CompareResult::try_from(c.result).unwrap_or(compare::CompareResult::Equal) {
        compare::CompareResult::Equal => ord == CmpOrdering::Equal,
        compare::CompareResult::NotEqual => ord != CmpOrdering::Equal,
        compare::CompareResult::Greater => ord == CmpOrdering::Greater,
        compare::CompareResult::Less => ord == CmpOrdering::Less,
    }
}

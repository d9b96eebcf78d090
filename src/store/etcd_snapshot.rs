//! etcd's snapshots: restored into a new meshkv data dir (the way over from etcd), and
//! written from meshkv's store (the backups `etcdctl snapshot save` takes from a member,
//! which etcd's own tools then read, and restore into etcd: the way back).
//!
//! An etcd snapshot is the bbolt database of etcd's store (`etcdctl snapshot save`
//! against etcd writes it followed by its SHA-256; the `member/snap/db` file of a stopped
//! member is the database alone). Its buckets map onto meshkv's column families:
//!
//! | etcd bucket | key → value | meshkv |
//! | --- | --- | --- |
//! | `key` | main (8 BE) `_` sub (8 BE) [`t`] → `mvccpb.KeyValue` | `kv`: main · sub [`t`] → the same KeyValue |
//! | `lease` | id (8 BE) → `leasepb.Lease` (id, TTL, remaining TTL) | `lease`: id → `LeaseRecord` (id, TTL, remaining TTL) |
//! | `meta` | `scheduledCompactRev`, `finishedCompactRev` → a revision | `meta`: `compact_revision`, `revision` |
//! | `auth`, `authUsers`, `authRoles` | enabled, revision; name → `authpb.User` / `authpb.Role` | `auth` |
//!
//! The rest (members, the cluster, alarms, the consistent index) belongs to the etcd
//! cluster the snapshot came from; a restore starts a new cluster, as etcd's does. The
//! revision goes on from the newest in the snapshot (or its compaction, if that is
//! later), as etcd's does after a restore. A compaction etcd had scheduled but not finished
//! is finished here: what it would remove is not written.
//!
//! Written from meshkv, the same buckets hold the same things, and `meta` holds the
//! applied index as etcd's `consistent_index`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};

use bytes::Bytes;
use prost::Message;

use super::auth;
use super::backup::{BackupError, Hashing, Restored, Writer, ALIGN, SUM_BYTES};
use rocksdb::{IteratorMode, ReadOptions};

use super::bolt::{Bolt, BoltError, BoltWriter, Layout};
use super::engine::{Engine, EngineError, CF_AUTH, CF_KV, CF_LEASE, CF_META};
use super::mvcc::revision::Revision;
use crate::pb::authpb::{Role, User};
use crate::pb::meshkvpb::LeaseRecord;
use crate::pb::mvccpb::KeyValue;

/// etcd's revision keys: main, `_`, sub, and `t` for a deletion.
const ETCD_REV_LEN: usize = 17;

/// etcd's `leasepb.Lease`.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdLease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

fn damaged(what: impl Into<String>) -> BackupError {
    BackupError::Damaged(what.into())
}

impl From<BoltError> for BackupError {
    fn from(e: BoltError) -> Self {
        match e {
            BoltError::Io(e) => BackupError::Io(e),
            e => BackupError::Damaged(e.to_string()),
        }
    }
}

/// etcd's revision key as a revision and whether it deleted its key.
fn etcd_revision(k: &[u8]) -> Option<(Revision, bool)> {
    let tombstone = match k.len() {
        ETCD_REV_LEN => false,
        n if n == ETCD_REV_LEN + 1 && k[ETCD_REV_LEN] == b't' => true,
        _ => return None,
    };
    if k[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(k[0..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
    (main >= 0 && sub >= 0).then_some((Revision::new(main, sub), tombstone))
}

/// The length of the database in `file`, after checking the SHA-256 that follows it when
/// there is one, as `etcdctl snapshot restore` does.
fn database_len(file: &mut File, skip_hash_check: bool) -> Result<u64, BackupError> {
    // etcd's convention, as for meshkv's own backups: a SHA-256 after a database whose
    // size is a multiple of 512.
    let (align, sum_bytes) = (ALIGN as u64, SUM_BYTES as u64);
    let size = file.metadata()?.len();
    if size % align != sum_bytes {
        if !skip_hash_check {
            return Err(BackupError::MissingHash);
        }
        return Ok(size);
    }
    let len = size - sum_bytes;
    let mut database = Hashing::new(Read::take(&mut *file, len));
    std::io::copy(&mut database, &mut std::io::sink())?;
    let (_, digest) = database.finish();
    let mut sum = [0u8; SUM_BYTES];
    file.read_exact(&mut sum)?;
    if digest != sum {
        return Err(BackupError::HashMismatch { expected: hex(&sum), got: hex(&digest) });
    }
    Ok(len)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes the store held in the etcd snapshot `file` through `out`.
pub(super) fn restore(mut file: File, out: &mut Writer, skip_hash_check: bool) -> Result<Restored, BackupError> {
    let len = database_len(&mut file, skip_hash_check)?;
    let db = Bolt::open(file, len)?;
    let keys = db.bucket(b"key")?.ok_or_else(|| damaged("an etcd snapshot without its key bucket"))?;

    let mut scheduled = 0i64;
    let mut finished = 0i64;
    if let Some(meta) = db.bucket(b"meta")? {
        db.walk::<BackupError>(&meta, &mut |k, v, _| {
            let slot = match k {
                b"scheduledCompactRev" => &mut scheduled,
                b"finishedCompactRev" => &mut finished,
                _ => return Ok(()),
            };
            // A revision, or its main part alone.
            let main = v.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes);
            *slot = main.filter(|m| *m >= 0).ok_or_else(|| damaged("a compaction revision"))?;
            Ok(())
        })?;
    }
    let compacted = scheduled.max(finished);

    // A compaction that was scheduled but had not finished: per key, the newest revision
    // at or below it is what it keeps (unless that deleted the key); older ones go.
    let mut kept: HashMap<Bytes, (Revision, bool)> = HashMap::new();
    if scheduled > finished {
        db.walk::<BackupError>(&keys, &mut |k, v, _| {
            let (rev, tombstone) = etcd_revision(k).ok_or_else(|| damaged(format!("a revision key {k:?}")))?;
            if rev.main <= scheduled {
                let kv = KeyValue::decode(v).map_err(|e| damaged(format!("revision {}: {e}", rev.main)))?;
                kept.insert(kv.key, (rev, tombstone));
            }
            Ok(())
        })?;
    }

    let mut done = Restored::default();
    let mut newest = 0i64;
    db.walk::<BackupError>(&keys, &mut |k, v, _| {
        let (rev, tombstone) = etcd_revision(k).ok_or_else(|| damaged(format!("a revision key {k:?}")))?;
        let kv = KeyValue::decode(v).map_err(|e| damaged(format!("revision {}: {e}", rev.main)))?;
        newest = newest.max(rev.main);
        if rev.main <= scheduled && scheduled > finished && kept.get(&kv.key) != Some(&(rev, false)) {
            return Ok(());
        }
        let value = if tombstone { KeyValue { key: kv.key, mod_revision: rev.main, ..Default::default() } } else { kv };
        out.put(CF_KV, &rev.to_key(tombstone), &value.encode_to_vec())?;
        done.records += 1;
        Ok(())
    })?;

    if let Some(leases) = db.bucket(b"lease")? {
        db.walk::<BackupError>(&leases, &mut |k, v, _| {
            let l = EtcdLease::decode(v).map_err(|e| damaged(format!("lease {k:?}: {e}")))?;
            out.put(
                CF_LEASE,
                &l.id.to_be_bytes(),
                &LeaseRecord { id: l.id, ttl: l.ttl, remaining_ttl: l.remaining_ttl }.encode_to_vec(),
            )?;
            done.records += 1;
            Ok(())
        })?;
    }

    done.records += restore_auth(&db, out)?;

    // A store with no writes yet is at revision 1, as etcd's is.
    done.revision = u64::try_from(newest.max(compacted)).unwrap_or(0).max(1);
    out.put(CF_META, super::mvcc::META_REVISION, &done.revision.to_be_bytes())?;
    if compacted > 0 {
        out.put(CF_META, super::mvcc::META_COMPACTED, &(compacted as u64).to_be_bytes())?;
    }
    Ok(done)
}

/// Writes the store `read` sees (its options name one RocksDB snapshot, so that two runs
/// see the same) as etcd's database, to `out`; `layout` from a run to `io::sink()`.
pub(super) fn export(
    engine: &Engine,
    read: &dyn Fn() -> ReadOptions,
    out: impl Write,
    layout: Option<Layout>,
) -> Result<Layout, BackupError> {
    let db = engine.db();
    let mut w = BoltWriter::new(out, layout)?;

    // etcd's buckets, each in its key order: `auth` (authEnabled, authRevision), then the
    // roles and the users, each under its name.
    let mut auth_rows = Vec::new();
    each_row(engine, read, CF_AUTH, &mut |k, v| {
        auth_rows.push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    w.begin(b"auth")?;
    for (name, etcd_name) in [(auth::KEY_ENABLED, &b"authEnabled"[..]), (auth::KEY_REVISION, b"authRevision")] {
        if let Some((_, v)) = auth_rows.iter().find(|(k, _)| k == name) {
            w.put(etcd_name, v)?;
        }
    }
    for (bucket, prefix) in [(&b"authRoles"[..], auth::ROLE_PREFIX), (b"authUsers", auth::USER_PREFIX)] {
        w.begin(bucket)?;
        for (k, v) in &auth_rows {
            if let Some(name) = k.strip_prefix(prefix) {
                w.put(name, v)?;
            }
        }
    }

    w.begin(b"key")?;
    each_row(engine, read, CF_KV, &mut |k, v| {
        let (rev, tombstone) = Revision::from_key(k)
            .ok_or_else(|| EngineError::Corrupt { cf: CF_KV, what: format!("bad revision key {k:?}") })?;
        w.put(&etcd_key(rev, tombstone), v)?;
        Ok(())
    })?;

    w.begin(b"lease")?;
    each_row(engine, read, CF_LEASE, &mut |k, v| {
        let l = LeaseRecord::decode(v)
            .map_err(|e| EngineError::Corrupt { cf: CF_LEASE, what: format!("lease {k:?}: {e}") })?;
        w.put(k, &EtcdLease { id: l.id, ttl: l.ttl, remaining_ttl: l.remaining_ttl }.encode_to_vec())?;
        Ok(())
    })?;

    let meta = |key: &[u8]| -> Result<u64, BackupError> {
        let v = db.get_cf_opt(engine.cf(CF_META), key, &read()).map_err(EngineError::from)?;
        Ok(v.and_then(|v| v.as_slice().try_into().ok()).map(u64::from_be_bytes).unwrap_or(0))
    };
    let compacted = meta(super::mvcc::META_COMPACTED)?;
    w.begin(b"meta")?;
    w.put(b"consistent_index", &meta(super::mvcc::META_APPLIED)?.to_be_bytes())?;
    if compacted > 0 {
        let at = etcd_key(Revision::new(compacted as i64, 0), false);
        w.put(b"finishedCompactRev", &at)?;
        w.put(b"scheduledCompactRev", &at)?;
    }
    Ok(w.finish()?)
}

type Row<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), BackupError> + 'a;

/// Calls `f` for every row of `cf` that `read` sees, in key order.
fn each_row(
    engine: &Engine,
    read: &dyn Fn() -> ReadOptions,
    cf: &'static str,
    f: &mut Row<'_>,
) -> Result<(), BackupError> {
    for item in engine.db().iterator_cf_opt(engine.cf(cf), read(), IteratorMode::Start) {
        let (k, v) = item.map_err(EngineError::from)?;
        f(&k, &v)?;
    }
    Ok(())
}

/// etcd's key for a revision: main, `_`, sub, and `t` for a deletion.
fn etcd_key(rev: Revision, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(ETCD_REV_LEN + 1);
    k.extend_from_slice(&rev.main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&rev.sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// Users, roles and whether authentication is on; the number of records written.
fn restore_auth(db: &Bolt, out: &mut Writer) -> Result<u64, BackupError> {
    let mut records = Vec::new();
    if let Some(b) = db.bucket(b"auth")? {
        db.walk::<BackupError>(&b, &mut |k, v, _| {
            match k {
                b"authEnabled" => records.push(auth::enabled_record(v.first() == Some(&1))),
                b"authRevision" => {
                    let rev = v.try_into().map(u64::from_be_bytes).map_err(|_| damaged("the auth revision"))?;
                    records.push(auth::revision_record(rev));
                }
                _ => {}
            }
            Ok(())
        })?;
    }
    type Decode = fn(&[u8]) -> Result<(Vec<u8>, Vec<u8>), prost::DecodeError>;
    let named: [(&[u8], &str, Decode); 2] = [
        (b"authUsers", "user", |v| User::decode(v).map(|u| auth::user_record(&u))),
        (b"authRoles", "role", |v| Role::decode(v).map(|r| auth::role_record(&r))),
    ];
    for (bucket, what, decode) in named {
        if let Some(b) = db.bucket(bucket)? {
            db.walk::<BackupError>(&b, &mut |k, v, _| {
                let bad = |e| damaged(format!("{what} {:?}: {e}", String::from_utf8_lossy(k)));
                records.push(decode(v).map_err(bad)?);
                Ok(())
            })?;
        }
    }
    for (k, v) in &records {
        out.put(CF_AUTH, k, v)?;
    }
    Ok(records.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::bolt::build;
    use crate::store::Engine;
    use rocksdb::IteratorMode;
    use std::io::Write;

    fn rev_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
        etcd_key(Revision::new(main, sub), tombstone)
    }

    fn put(key: &str, main: i64, created: i64, version: i64) -> (Vec<u8>, Vec<u8>) {
        let kv = KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from(format!("{key}@{main}")),
            create_revision: created,
            mod_revision: main,
            version,
            lease: 0,
        };
        (rev_key(main, 0, false), kv.encode_to_vec())
    }

    fn delete(key: &str, main: i64) -> (Vec<u8>, Vec<u8>) {
        let kv = KeyValue { key: Bytes::copy_from_slice(key.as_bytes()), ..Default::default() };
        (rev_key(main, 0, true), kv.encode_to_vec())
    }

    /// An etcd store: a@2,3,5; b@4, deleted @6; c@7; a lease; auth on with one user.
    /// Compaction scheduled at 6, finished at 3.
    fn snapshot() -> Vec<u8> {
        let mut keys = vec![put("a", 2, 2, 1), put("a", 3, 2, 2), put("b", 4, 4, 1), put("a", 5, 2, 3)];
        keys.extend([delete("b", 6), put("c", 7, 7, 1)]);
        let lease = EtcdLease { id: 77, ttl: 30, remaining_ttl: 12 };
        let user = User {
            name: Bytes::from("alice"),
            password: Bytes::from("$2a$10$hash"),
            roles: vec!["r".into()],
            options: None,
        };
        let meta = |m: i64| rev_key(m, 0, false)[..17].to_vec();
        build::database(&[
            (
                b"auth",
                vec![(b"authEnabled".to_vec(), vec![1]), (b"authRevision".to_vec(), 9u64.to_be_bytes().to_vec())],
            ),
            (b"authUsers", vec![(b"alice".to_vec(), user.encode_to_vec())]),
            (b"key", keys),
            (b"lease", vec![(77i64.to_be_bytes().to_vec(), lease.encode_to_vec())]),
            (
                b"meta",
                vec![
                    (b"consistent_index".to_vec(), 40u64.to_be_bytes().to_vec()),
                    (b"finishedCompactRev".to_vec(), meta(3)),
                    (b"scheduledCompactRev".to_vec(), meta(6)),
                ],
            ),
        ])
    }

    fn with_sum(db: &[u8]) -> Vec<u8> {
        [db, ring::digest::digest(&ring::digest::SHA256, db).as_ref()].concat()
    }

    fn restore(bytes: &[u8], skip_hash_check: bool) -> (tempfile::TempDir, Result<Restored, BackupError>) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let done = crate::store::backup::restore_file(f, &dir.path().join("d"), skip_hash_check);
        (dir, done)
    }

    #[test]
    fn an_etcd_store_comes_over_with_its_history_leases_users_and_unfinished_compaction() {
        let (dir, done) = restore(&with_sum(&snapshot()), false);
        let done = done.unwrap();
        assert_eq!(done.revision, 7);
        let engine = Engine::open(&dir.path().join("d")).unwrap();
        let rows: Vec<_> = engine
            .db()
            .iterator_cf(engine.cf(CF_KV), IteratorMode::Start)
            .map(|r| {
                let (k, v) = r.unwrap();
                let (rev, tomb) = Revision::from_key(&k).unwrap();
                let kv = KeyValue::decode(v.as_ref()).unwrap();
                (String::from_utf8(kv.key.to_vec()).unwrap(), rev.main, tomb, kv.version)
            })
            .collect();
        // The compaction to 6 finished: a keeps 5, b (deleted at 6) is gone, c stays.
        assert_eq!(rows, [("a".to_string(), 5, false, 3), ("c".to_string(), 7, false, 1)]);
        assert_eq!(engine.get_u64(CF_META, super::super::mvcc::META_REVISION).unwrap(), Some(7));
        assert_eq!(engine.get_u64(CF_META, super::super::mvcc::META_COMPACTED).unwrap(), Some(6));
        let lease = engine.db().get_cf(engine.cf(CF_LEASE), 77i64.to_be_bytes()).unwrap().unwrap();
        assert_eq!(LeaseRecord::decode(lease.as_slice()).unwrap(), LeaseRecord { id: 77, ttl: 30, remaining_ttl: 12 });
        let auth: Vec<_> =
            engine.db().iterator_cf(engine.cf(CF_AUTH), IteratorMode::Start).map(|r| r.unwrap()).collect();
        let state = auth::AuthState::load(auth).unwrap();
        assert!(state.enabled());
        assert_eq!(state.revision(), 9);
        assert_eq!(state.user("alice").unwrap().roles, ["r"]);
    }

    #[test]
    fn an_empty_etcd_store_is_at_revision_one() {
        let (_dir, done) = restore(&with_sum(&build::database(&[(b"key", Vec::new())])), false);
        assert_eq!(done.unwrap(), Restored { records: 0, revision: 1 });
    }

    #[test]
    fn a_snapshot_without_its_hash_or_with_a_wrong_one_is_refused_and_leaves_nothing() {
        let db = snapshot();
        let (dir, done) = restore(&db, false);
        assert_eq!(done.unwrap_err().to_string(), "snapshot missing hash but --skip-hash-check=false");
        assert!(!dir.path().join("d").exists());
        let (_, done) = restore(&db, true);
        assert_eq!(done.unwrap().revision, 7, "a db file is taken when told to skip the hash");
        let mut bad = with_sum(&db);
        bad[5000] ^= 1;
        let (dir, done) = restore(&bad, false);
        assert!(done.unwrap_err().to_string().starts_with("expected sha256 "));
        assert!(!dir.path().join("d").exists());
    }

    #[test]
    fn etcd_revision_keys_are_read_and_odd_ones_refused() {
        let mut k = Vec::new();
        k.extend_from_slice(&300i64.to_be_bytes());
        k.push(b'_');
        k.extend_from_slice(&2i64.to_be_bytes());
        assert_eq!(etcd_revision(&k), Some((Revision::new(300, 2), false)));
        k.push(b't');
        assert_eq!(etcd_revision(&k), Some((Revision::new(300, 2), true)));
        k[17] = b'x';
        assert_eq!(etcd_revision(&k), None);
        k.pop();
        k[8] = b'-';
        assert_eq!(etcd_revision(&k), None);
        assert_eq!(etcd_revision(b"short"), None);
    }
}

//! The RocksDB engine: one database per member, one column family per concern.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `raft_log` | entry index (u64 BE) | `eraftpb::Entry` |
//! | `raft_state` | `hard_state`, `conf_state`, `truncated` | protobuf / fixed bytes |
//! | `kv` | revision (main, sub), plus `t` for a tombstone | `mvccpb::KeyValue` |
//! | `meta` | `applied_index`, `revision`, `compact_revision`, `cluster_id`, `member_id` | u64 / i64 BE |
//! | `lease` | lease id (i64 BE) | `meshkvpb::LeaseRecord` |
//! | `alarm` | member id (u64 BE), alarm type (i32 BE) | empty |
//!
//! `raft_state` also keeps `wal_lap`: the Raft driver's writes to `raft_log` and
//! `raft_state` skip RocksDB's WAL and are made durable by the Raft log's own file
//! (`crate::raft::wal`).
//!
//! The store's applied writes (`STORE_CFS`) skip RocksDB's WAL too, as etcd's backend
//! keeps its consistent index: each applied batch carries the applied index, and the
//! column families are flushed atomically, so what a crash leaves on disk is the state
//! at one applied index, and the Raft log (which keeps every entry after the
//! [`persisted`](Engine::get_u64_persisted) applied index) applies the rest again at
//! start. Writes that are not replayable from the log (membership, snapshot installs,
//! the member's identity) go through RocksDB's WAL and are synced.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_KV: &str = "kv";
pub const CF_META: &str = "meta";
pub const CF_LEASE: &str = "lease";
pub const CF_AUTH: &str = "auth";
pub const CF_ALARM: &str = "alarm";

/// The memory all memtables may use together.
const DB_WRITE_BUFFER_BYTES: usize = 64 << 20;
/// RocksDB's own WAL carries only rare writes (membership, snapshot marks): the log and
/// the store skip it. Its size bounds the disk space RocksDB reserves for each new WAL
/// file, which would otherwise be the whole memtable budget, reserved again after every
/// flush.
const MAX_TOTAL_WAL_BYTES: u64 = 4 << 20;

pub const ALL_CFS: [&str; 7] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_KV, CF_META, CF_LEASE, CF_AUTH, CF_ALARM];

/// The column families the store's applied writes go to: etcd's backend. Their size is
/// the database size that `Status` reports and the space quota limits.
pub const STORE_CFS: [&str; 5] = [CF_KV, CF_META, CF_LEASE, CF_AUTH, CF_ALARM];

/// Failure of the storage engine. Always fatal for the request; the member keeps running.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {what}")]
    Corrupt { cf: &'static str, what: String },
    /// A file beside RocksDB (the Raft log's, a snapshot's, the data dir) could not be
    /// made, read or written: a full disk, say. Nothing in it is known to be damaged.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The data needs a newer build than this one.
    #[error("{0}")]
    Unsupported(String),
}

/// A shared handle on the member's RocksDB database.
#[derive(Clone)]
pub struct Engine {
    db: Arc<DB>,
}

impl Engine {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // All memtables together stay under this: the largest is flushed when they reach
        // it, so memory does not grow with the number of column families.
        opts.set_db_write_buffer_size(DB_WRITE_BUFFER_BYTES);
        opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Writes that skip the WAL are only as durable as the flush that takes them to an
        // SST file; flushing every column family in one step keeps what a crash leaves
        // consistent across them.
        opts.set_atomic_flush(true);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if *name == CF_RAFT_LOG {
                // The log is written once and trimmed from the front; a larger buffer means
                // most entries are deleted before they ever reach an SST file.
                cf.set_write_buffer_size(64 << 20);
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Self { db: Arc::new(db) })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    /// The column family handle; every name in `ALL_CFS` exists once the DB is open.
    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is created at open"))
    }

    /// Writes a batch; `sync` makes it durable (fsync of the WAL) before returning.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Writes a batch without RocksDB's WAL: it reaches the disk with the next flush of its
    /// column families (a crash before then loses it whole).
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Starts flushing the store's column families together and returns at once.
    pub fn flush_store(&self) -> Result<(), EngineError> {
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(false);
        let cfs: Vec<&ColumnFamily> = STORE_CFS.iter().map(|name| self.cf(name)).collect();
        self.db.flush_cfs_opt(&cfs, &fo)?;
        Ok(())
    }

    pub fn get_u64(&self, cf: &'static str, key: &[u8]) -> Result<Option<u64>, EngineError> {
        decode_u64(cf, key, self.db.get_pinned_cf(self.cf(cf), key)?)
    }

    /// As [`get_u64`](Self::get_u64), but only what a crash would leave: the value in
    /// SST files, not in memtables written without the WAL.
    pub fn get_u64_persisted(&self, cf: &'static str, key: &[u8]) -> Result<Option<u64>, EngineError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_read_tier(rocksdb::ReadTier::Persisted);
        decode_u64(cf, key, self.db.get_pinned_cf_opt(self.cf(cf), key, &ro)?)
    }

    /// The store's bytes, SST files plus memtables, over its column families (the Raft
    /// log, like etcd's WAL, is not counted).
    pub fn size_bytes(&self) -> u64 {
        STORE_CFS
            .iter()
            .map(|name| {
                let cf = self.cf(name);
                let sst = self.db.property_int_value_cf(cf, "rocksdb.total-sst-files-size").ok().flatten().unwrap_or(0);
                let mem =
                    self.db.property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables").ok().flatten().unwrap_or(0);
                sst + mem
            })
            .sum()
    }
}

fn decode_u64(
    cf: &'static str,
    key: &[u8],
    value: Option<rocksdb::DBPinnableSlice<'_>>,
) -> Result<Option<u64>, EngineError> {
    match value {
        None => Ok(None),
        Some(v) => {
            let b: [u8; 8] = v.as_ref().try_into().map_err(|_| EngineError::Corrupt {
                cf,
                what: format!("{} is {} bytes, not 8", String::from_utf8_lossy(key), v.len()),
            })?;
            Ok(Some(u64::from_be_bytes(b)))
        }
    }
}

impl Engine {
    /// Compacts every column family fully, reclaiming the space of deleted data.
    pub fn compact_all(&self) {
        for name in ALL_CFS {
            self.db.compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// What trimming the Raft log relies on: a write that skips the WAL counts as
    /// persisted only once a flush of the store has taken it to a table file, and that
    /// flush takes every column family of the store together.
    #[test]
    fn unlogged_writes_are_persisted_by_a_flush_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        b.put_cf(e.cf(CF_META), b"applied_index", 7u64.to_be_bytes());
        b.put_cf(e.cf(CF_KV), b"k", b"v");
        b.put_cf(e.cf(CF_RAFT_LOG), 1u64.to_be_bytes(), b"entry");
        e.write_unlogged(b).unwrap();
        assert_eq!(e.get_u64(CF_META, b"applied_index").unwrap(), Some(7));
        assert_eq!(e.get_u64_persisted(CF_META, b"applied_index").unwrap(), None);

        e.flush_store().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.get_u64_persisted(CF_META, b"applied_index").unwrap() != Some(7) {
            assert!(Instant::now() < deadline, "the flush never reached the table files");
            std::thread::sleep(Duration::from_millis(5));
        }
        let table_files = |cf| e.db().property_int_value_cf(e.cf(cf), "rocksdb.num-files-at-level0").unwrap();
        assert_eq!(table_files(CF_KV), Some(1), "the kv column family was flushed with meta");
        assert_eq!(table_files(CF_RAFT_LOG), Some(0), "the Raft log's column family stays in its memtable");
    }
}

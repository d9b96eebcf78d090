//! Backups: what `etcdctl snapshot save` receives from a member, and how
//! `meshkv snapshot restore` makes the data dir of a new cluster from it.
//!
//! A backup is the store as of one applied batch (a RocksDB snapshot) written as etcd
//! writes its own: etcd's bbolt database (`etcd_snapshot`), followed by its SHA-256. So
//! `etcdctl snapshot status` reads a meshkv backup, and `etcdctl snapshot restore` makes
//! an etcd data dir of it; `meshkv snapshot restore` takes it, or any etcd snapshot. It
//! holds every key-value revision, the leases, users and roles, and the revision
//! counters. The Raft state, the alarms and the member's identity are left out: a
//! restore starts a new cluster, as etcd's does.
//!
//! Backups from earlier versions of meshkv, in its own format, still restore:
//!
//! ```text
//! "meshkv-backup 1\n"
//! record*    kind (u8) · key length (u32 BE) · value length (u32 BE) · key · value
//! end        0xff · zeros up to a multiple of 512 bytes · SHA-256 of every byte before it
//! ```
//!
//! where `kind` is the column family (`kv`, `lease`, `auth`) or [`META`] for the
//! revision and the compact revision.

use std::io::{self, Read, Write};
use std::path::Path;

use rocksdb::{ReadOptions, WriteBatch};

use crate::store::engine::{Engine, EngineError, CF_AUTH, CF_KV, CF_LEASE, CF_META};

const MAGIC: &[u8] = b"meshkv-backup 1\n";
/// The column families a backup carries, by their kind byte.
const CFS: [&str; 3] = [CF_KV, CF_LEASE, CF_AUTH];
/// Kind of the records that go to the `meta` column family.
const META: u8 = 0xfe;
const END: u8 = 0xff;
/// The checksum follows zeros up to a multiple of this.
pub(super) const ALIGN: usize = 512;
pub(super) const SUM_BYTES: usize = 32;
/// The meta keys a backup carries.
const META_KEYS: [&[u8]; 2] = [super::mvcc::META_REVISION, super::mvcc::META_COMPACTED];
/// Records written to the new store per batch.
const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "not a meshkv backup (it does not start with {:?}) nor an etcd snapshot (a bbolt database)",
        String::from_utf8_lossy(MAGIC)
    )]
    NotABackup,
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    #[error("expected sha256 {expected}, got {got}")]
    HashMismatch { expected: String, got: String },
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("{0} already holds a data dir; restore into a new one")]
    NotEmpty(String),
}

/// Writes a backup of `engine`'s store, as of now: etcd's database, laid out once to
/// learn where its pages fall and its length, then written, then its SHA-256, to the
/// writer `sized` gives for that length (the database's, without the SHA-256: what
/// etcd's `remaining_bytes` counts down).
pub fn write<W: Write>(engine: &Engine, sized: impl FnOnce(u64) -> W) -> Result<(), BackupError> {
    let view = engine.db().snapshot();
    let read = || {
        let mut o = ReadOptions::default();
        o.set_snapshot(&view);
        o
    };
    let layout = super::etcd_snapshot::export(engine, &read, io::sink(), None)?;
    let mut out = Hashing::new(sized(layout.bytes()));
    super::etcd_snapshot::export(engine, &read, &mut out, Some(layout))?;
    let (mut inner, digest) = out.finish();
    inner.write_all(&digest)?;
    inner.flush()?;
    Ok(())
}

#[cfg(test)]
fn record(out: &mut impl Write, kind: u8, k: &[u8], v: &[u8]) -> io::Result<()> {
    let len = |n: usize| u32::try_from(n).map_err(|_| io::Error::other("a record over 4 GiB"));
    out.write_all(&[kind])?;
    out.write_all(&len(k.len())?.to_be_bytes())?;
    out.write_all(&len(v.len())?.to_be_bytes())?;
    out.write_all(k)?;
    out.write_all(v)
}

/// What a restore wrote.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    pub records: u64,
    pub revision: u64,
}

/// Makes a new data dir at `dir` holding the store of the backup read from `input`.
/// Nothing is left at `dir` if the backup turns out damaged.
pub fn restore(input: impl Read, dir: &Path) -> Result<Restored, BackupError> {
    into_new_dir(dir, |out| restore_from(input, out))
}

/// As [`restore`], from `file`, which is either a meshkv backup or a snapshot of etcd's
/// (`etcdctl snapshot save` against etcd, or an etcd member's `db` file). An etcd
/// snapshot's SHA-256 is checked, as `etcdctl snapshot restore` checks it; one without
/// (a `db` file) is taken only with `skip_hash_check`.
pub fn restore_file(mut file: std::fs::File, dir: &Path, skip_hash_check: bool) -> Result<Restored, BackupError> {
    let mut head = [0u8; 32];
    io::Seek::rewind(&mut file)?;
    let n = io::Read::read(&mut file, &mut head)?;
    let head = &head[..n];
    io::Seek::rewind(&mut file)?;
    if super::bolt::looks_like_bolt(head) {
        into_new_dir(dir, |out| super::etcd_snapshot::restore(file, out, skip_hash_check))
    } else {
        restore(file, dir)
    }
}

/// Runs `fill` on a new store at `dir`, then makes it durable; removes `dir` if it fails.
fn into_new_dir(
    dir: &Path,
    fill: impl FnOnce(&mut Writer) -> Result<Restored, BackupError>,
) -> Result<Restored, BackupError> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(BackupError::NotEmpty(dir.display().to_string()));
    }
    let result = (|| {
        let mut out = Writer { engine: Engine::open(dir)?, batch: WriteBatch::default() };
        let done = fill(&mut out)?;
        out.engine.write(std::mem::take(&mut out.batch), true)?;
        out.engine.flush_store()?;
        Ok(done)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// Writes a restored store in batches.
pub(super) struct Writer {
    engine: Engine,
    batch: WriteBatch,
}

impl Writer {
    pub(super) fn put(&mut self, cf: &'static str, k: &[u8], v: &[u8]) -> Result<(), BackupError> {
        self.batch.put_cf(self.engine.cf(cf), k, v);
        if self.batch.size_in_bytes() >= BATCH_BYTES {
            self.engine.write(std::mem::take(&mut self.batch), false)?;
        }
        Ok(())
    }
}

fn restore_from(input: impl Read, out: &mut Writer) -> Result<Restored, BackupError> {
    let mut input = Hashing::new(io::BufReader::new(input));
    let mut magic = [0u8; MAGIC.len()];
    input.read_exact(&mut magic).map_err(|_| BackupError::NotABackup)?;
    if magic != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let damaged = |what: &str| BackupError::Damaged(what.to_string());
    let mut done = Restored::default();
    loop {
        let mut kind = [0u8];
        input.read_exact(&mut kind).map_err(|_| damaged("it ends before its checksum"))?;
        if kind[0] == END {
            break;
        }
        let mut lens = [0u8; 8];
        input.read_exact(&mut lens).map_err(|_| damaged("a record is cut short"))?;
        let klen = u32::from_be_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
        let vlen = u32::from_be_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
        let mut k = Vec::new();
        let mut v = Vec::new();
        (&mut input).take(klen as u64).read_to_end(&mut k)?;
        (&mut input).take(vlen as u64).read_to_end(&mut v)?;
        if k.len() != klen || v.len() != vlen {
            return Err(damaged("a record is cut short"));
        }
        let cf = match kind[0] {
            META if META_KEYS.contains(&k.as_slice()) => {
                if k == META_KEYS[0] {
                    done.revision = v.as_slice().try_into().map(u64::from_be_bytes).map_err(|_| damaged("revision"))?;
                }
                CF_META
            }
            META => return Err(damaged("an unknown meta key")),
            i => *CFS.get(i as usize).ok_or_else(|| damaged("a record of an unknown kind"))?,
        };
        out.put(cf, &k, &v)?;
        done.records += 1;
    }
    // Zeros, then the checksum: at most ALIGN - 1 + SUM_BYTES bytes, all read here.
    let pad = (ALIGN - input.count % ALIGN) % ALIGN;
    let mut zeros = vec![0u8; pad];
    input.read_exact(&mut zeros).map_err(|_| damaged("it ends before its checksum"))?;
    if zeros.iter().any(|&b| b != 0) {
        return Err(damaged("its padding is not zeros"));
    }
    let (mut rest, digest) = input.finish();
    let mut sum = [0u8; SUM_BYTES];
    rest.read_exact(&mut sum).map_err(|_| damaged("its checksum is cut short"))?;
    if sum != digest {
        return Err(damaged("its checksum does not match its contents"));
    }
    if rest.read(&mut [0u8; 1])? != 0 {
        return Err(damaged("bytes follow its checksum"));
    }
    Ok(done)
}

/// A reader or writer that hashes (SHA-256) and counts every byte that passes.
pub(super) struct Hashing<T> {
    inner: T,
    hash: ring::digest::Context,
    count: usize,
}

impl<T> Hashing<T> {
    pub(super) fn new(inner: T) -> Self {
        Self { inner, hash: ring::digest::Context::new(&ring::digest::SHA256), count: 0 }
    }

    pub(super) fn finish(self) -> (T, [u8; SUM_BYTES]) {
        let mut sum = [0u8; SUM_BYTES];
        sum.copy_from_slice(self.hash.finish().as_ref());
        (self.inner, sum)
    }

    fn passed(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.count += bytes.len();
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.passed(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.passed(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mvcc::revision::Revision;

    /// A backup in the format of earlier versions: one key, the revision counter.
    fn old_backup() -> Vec<u8> {
        let mut out = Hashing::new(Vec::new());
        out.write_all(MAGIC).unwrap();
        record(&mut out, 0, &Revision::new(5, 0).to_key(false), b"kv").unwrap();
        record(&mut out, META, META_KEYS[0], &5u64.to_be_bytes()).unwrap();
        out.write_all(&[END]).unwrap();
        let pad = (ALIGN - out.count % ALIGN) % ALIGN;
        out.write_all(&vec![0; pad]).unwrap();
        let (mut bytes, digest) = out.finish();
        bytes.extend_from_slice(&digest);
        bytes
    }

    #[test]
    fn backups_of_earlier_versions_still_restore() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&old_backup()).unwrap();
        let done = restore_file(f, &dir.path().join("d"), false).unwrap();
        assert_eq!(done, Restored { records: 2, revision: 5 });
        let engine = Engine::open(&dir.path().join("d")).unwrap();
        let kv = engine.db().get_cf(engine.cf(CF_KV), Revision::new(5, 0).to_key(false)).unwrap();
        assert_eq!(kv.as_deref(), Some(&b"kv"[..]));
        let mut bad = old_backup();
        bad[42] ^= 1; // in the value
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bad).unwrap();
        let err = restore_file(f, &dir.path().join("e"), false).unwrap_err();
        assert!(err.to_string().contains("checksum does not match"), "{err}");
    }
}

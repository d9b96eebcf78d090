//! The space quota, etcd's `--quota-backend-bytes`: a write that would take the store
//! past it is refused before it reaches Raft, and the member raises the NOSPACE alarm,
//! which makes every member refuse such writes until an operator disarms it (after a
//! compaction and a defragment have made room).
//!
//! What a write costs is etcd's estimate ([`crate::store::alarm::cost`]): a put its key
//! and value plus 256 bytes, a Txn the puts of its larger branch, a lease grant 64
//! bytes; anything else nothing. The
//! store's size is read from RocksDB at most every 100 ms: like etcd's, the quota is a
//! bound the store may pass by what that interval writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::Engine;

/// The quota when none is given, as etcd's.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// Above this etcd warns that the quota is larger than it recommends.
pub const MAX_RECOMMENDED_QUOTA_BYTES: u64 = 8 << 30;
/// How old a size may be before a write measures again.
const SIZE_MAX_AGE: Duration = Duration::from_millis(100);

pub struct Quota {
    /// None: no quota.
    limit: Option<u64>,
    engine: Engine,
    epoch: Instant,
    size: AtomicU64,
    /// When `size` was measured, in nanoseconds after `epoch` (0: never).
    measured: AtomicU64,
}

impl Quota {
    /// The quota of `--quota-backend-bytes`: 0 takes the default, a negative value
    /// turns the quota off.
    pub fn new(bytes: i64, engine: Engine) -> Self {
        let limit = match bytes {
            0 => Some(DEFAULT_QUOTA_BYTES),
            b if b < 0 => None,
            b => Some(b as u64),
        };
        Self { limit, engine, epoch: Instant::now(), size: AtomicU64::new(0), measured: AtomicU64::new(0) }
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether a write costing `cost` fits. Writes that cost nothing always do.
    pub fn admits(&self, cost: u64) -> bool {
        match self.limit {
            Some(limit) if cost > 0 => self.size() + cost < limit,
            _ => true,
        }
    }

    /// The store's size, measured at most `SIZE_MAX_AGE` ago.
    fn size(&self) -> u64 {
        let now = (self.epoch.elapsed().as_nanos() as u64).max(1);
        let measured = self.measured.load(Ordering::Acquire);
        if measured == 0 || now.saturating_sub(measured) > SIZE_MAX_AGE.as_nanos() as u64 {
            // Racing writers may both measure; either answer is fresh.
            self.size.store(self.engine.size_bytes(), Ordering::Release);
            self.measured.store(now, Ordering::Release);
        }
        self.size.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_admits_what_fits_and_anything_free() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let size = engine.size_bytes();
        let q = Quota::new(size as i64 + 1000, engine.clone());
        assert!(q.admits(999));
        assert!(!q.admits(1000), "etcd admits only what stays under the quota");
        assert!(q.admits(0));
        assert!(Quota::new(-1, engine.clone()).admits(u64::MAX / 2));
        assert_eq!(Quota::new(0, engine).limit(), Some(DEFAULT_QUOTA_BYTES));
    }
}

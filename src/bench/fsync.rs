//! `meshkv bench fsync`: this disk's latency for what a commit costs at least: append a
//! small record to a log file and fdatasync it, as a write-ahead log does.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use super::{histogram, BenchConfig, Record};

/// `count` appends of `size` bytes, each followed by fdatasync, in a file made in `dir`
/// (removed afterwards).
pub fn run(cfg: &BenchConfig, dir: &Path, count: usize, size: usize) -> std::io::Result<Record> {
    let path = dir.join(format!(".meshkv-fsync-{}", std::process::id()));
    let result = (|| -> std::io::Result<_> {
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
        let buf = vec![0x5au8; size.max(1)];
        let mut h = histogram();
        let start = Instant::now();
        for _ in 0..count.max(1) {
            let t = Instant::now();
            f.write_all(&buf)?;
            f.sync_data()?;
            let _ = h.record((t.elapsed().as_micros() as u64).max(1));
        }
        Ok((h, start.elapsed()))
    })();
    let _ = std::fs::remove_file(&path);
    let (h, elapsed) = result?;
    let cfg = BenchConfig { clients: 1, rate: None, ..cfg.clone() };
    Ok(Record::new(&cfg, "fsync", h.len(), elapsed, &h))
}

#[cfg(test)]
mod tests {
    #[test]
    fn syncs_are_timed_and_the_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = super::run(&Default::default(), dir.path(), 20, 512).unwrap();
        assert_eq!(r.ok, 20);
        assert!(r.p50_ms > 0.0 && r.max_ms >= r.p50_ms);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

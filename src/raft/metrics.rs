//! What the driver counts and times as it runs, under etcd's metric names; the API
//! registers these with its Prometheus registry and serves them.

use prometheus::{exponential_buckets, Histogram, HistogramOpts, IntCounter};

pub struct RaftMetrics {
    /// Times the leader this member knows of became another one (none does not count).
    pub leader_changes: IntCounter,
    /// Client writes that failed to commit: refused, dropped, timed out.
    pub proposals_failed: IntCounter,
    /// Client writes proposed again after a leader change lost them.
    pub proposals_retried: IntCounter,
    /// Each sync of the Raft log's file.
    pub wal_fsync: Histogram,
    /// Each batch of committed entries written to the store.
    pub backend_commit: Histogram,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("a valid metric name")
}

/// etcd's buckets for disk latencies: 1 ms to 8 s, doubling.
fn disk_seconds(name: &str, help: &str) -> Histogram {
    let buckets = exponential_buckets(0.001, 2.0, 14).expect("valid buckets");
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("a valid metric name")
}

impl Default for RaftMetrics {
    fn default() -> Self {
        Self {
            leader_changes: counter("etcd_server_leader_changes_seen_total", "The number of leader changes seen."),
            proposals_failed: counter(
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
            ),
            proposals_retried: counter(
                "meshkv_server_proposals_retried_total",
                "The total number of proposals a leader change lost and that were proposed again.",
            ),
            wal_fsync: disk_seconds(
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by WAL.",
            ),
            backend_commit: disk_seconds(
                "etcd_disk_backend_commit_duration_seconds",
                "The latency distributions of commit called by backend.",
            ),
        }
    }
}

impl std::fmt::Debug for RaftMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftMetrics")
            .field("leader_changes", &self.leader_changes.get())
            .field("proposals_failed", &self.proposals_failed.get())
            .finish_non_exhaustive()
    }
}

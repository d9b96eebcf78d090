//! etcd's flags that ask for nothing meshkv must do differently: taken, so that an etcd
//! command line, `ETCD_*` environment or config file starts meshkv as it started etcd.
//! A value that asks for what meshkv does not do is refused when running without it
//! would be unsafe or surprising (a v2 proxy, self-made certificates), and otherwise logged
//! as a warning once the member starts.

use std::time::Duration;

use clap::ArgAction;
use meshkv::config::parse_duration_or_zero;

use crate::parse_bool;

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "etcd's flags, taken for compatibility")]
pub struct EtcdFlags {
    /// etcd's choice of logger, zap or capnslog: meshkv has one, structured as zap's.
    #[arg(long, default_value = "zap", value_parser = ["zap", "capnslog"])]
    pub logger: String,
    /// Where the log goes, comma-separated: default (or stderr), stdout, or file paths;
    /// systemd/journal writes to stderr, which the journal keeps under systemd.
    #[arg(long, default_value = "default", value_delimiter = ',')]
    pub log_outputs: Vec<String>,
    /// Debug-level logging (etcd's older spelling of --log-level=debug).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub debug: bool,
    /// basic or extensive: meshkv's /metrics always has its histograms.
    #[arg(long, default_value = "basic", value_parser = ["basic", "extensive"])]
    pub metrics: String,
    /// The least time etcd asks clients to leave between their pings: meshkv answers
    /// every ping and closes no connection for pinging often, so any value is taken.
    #[arg(long, default_value = "5s", value_parser = parse_duration_or_zero)]
    pub grpc_keepalive_min_time: Duration,
    /// Per-package log levels of etcd's capnslog: meshkv has --log-level.
    #[arg(long)]
    pub log_package_levels: Option<String>,
    /// etcd's count of snapshot files kept: meshkv writes none.
    #[arg(long)]
    pub max_snapshots: Option<u64>,
    /// etcd's count of WAL files kept: meshkv's Raft log is one file, rewritten in place.
    #[arg(long)]
    pub max_wals: Option<u64>,
    /// bbolt's batching: meshkv's store (RocksDB) commits each applied batch.
    #[arg(long)]
    pub backend_batch_interval: Option<String>,
    /// bbolt's batching: meshkv's store (RocksDB) commits each applied batch.
    #[arg(long)]
    pub backend_batch_limit: Option<u64>,
    /// bbolt's freelist, array or map: meshkv's store is RocksDB.
    #[arg(long, value_parser = ["array", "map"])]
    pub experimental_backend_bbolt_freelist_type: Option<String>,
    /// etcd's revisions deleted per compaction batch: meshkv deletes a compaction's
    /// revisions in one write to its store.
    #[arg(long)]
    pub experimental_compaction_batch_limit: Option<u64>,
    /// etcd's fast-forward of election ticks at start: a meshkv member campaigns once an
    /// election timeout passes without a leader.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool)]
    pub initial_election_tick_advance: Option<bool>,
    /// Go's profiler: meshkv has none (profile it with perf).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub enable_pprof: bool,
    /// etcd's v2 API: meshkv serves v3 only.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub enable_v2: bool,
    /// etcd's v2 emulation on the v3 store: meshkv serves v3 only.
    #[arg(long)]
    pub experimental_enable_v2v3: Option<String>,
    /// etcd's v2 proxy mode: only off.
    #[arg(long, default_value = "off", value_parser = ["off", "readonly", "on"])]
    pub proxy: String,
    /// A v2 proxy setting, taken with --proxy=off.
    #[arg(long)]
    pub proxy_failure_wait: Option<u64>,
    /// A v2 proxy setting, taken with --proxy=off.
    #[arg(long)]
    pub proxy_refresh_interval: Option<u64>,
    /// A v2 proxy setting, taken with --proxy=off.
    #[arg(long)]
    pub proxy_dial_timeout: Option<u64>,
    /// A v2 proxy setting, taken with --proxy=off.
    #[arg(long)]
    pub proxy_write_timeout: Option<u64>,
    /// A v2 proxy setting, taken with --proxy=off.
    #[arg(long)]
    pub proxy_read_timeout: Option<u64>,
    /// Self-made client certificates: only false (give --cert-file and --key-file).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub auto_tls: bool,
}

impl EtcdFlags {
    /// What to tell the operator about these flags once logging runs (warnings), or
    /// why the member must not start.
    pub fn notes(&self) -> Result<Vec<String>, String> {
        if self.proxy != "off" {
            return Err(format!("--proxy={}: meshkv does not run as etcd's v2 proxy; only --proxy=off", self.proxy));
        }
        if self.auto_tls {
            return Err("--auto-tls: meshkv does not make its own certificates; give --cert-file and --key-file".into());
        }
        let mut notes = Vec::new();
        let mut no_effect = |flag: &str, why: &str| notes.push(format!("--{flag} has no effect: {why}"));
        let given = [
            ("log-package-levels", self.log_package_levels.is_some(), "meshkv's log level is --log-level"),
            ("max-snapshots", self.max_snapshots.is_some(), "meshkv writes no snapshot files"),
            ("max-wals", self.max_wals.is_some(), "meshkv's Raft log is one file, rewritten in place"),
            ("backend-batch-interval", self.backend_batch_interval.is_some(), "meshkv commits each applied batch"),
            ("backend-batch-limit", self.backend_batch_limit.is_some(), "meshkv commits each applied batch"),
            (
                "experimental-backend-bbolt-freelist-type",
                self.experimental_backend_bbolt_freelist_type.is_some(),
                "meshkv's store is RocksDB",
            ),
            (
                "experimental-compaction-batch-limit",
                self.experimental_compaction_batch_limit.is_some(),
                "meshkv deletes a compaction's revisions in one write to its store",
            ),
            (
                "initial-election-tick-advance",
                self.initial_election_tick_advance.is_some(),
                "a meshkv member campaigns once an election timeout passes without a leader",
            ),
            ("enable-pprof", self.enable_pprof, "meshkv has no Go profiler; profile it with perf"),
            ("enable-v2", self.enable_v2, "meshkv serves etcd's v3 API only; v2 requests are answered 404"),
            (
                "experimental-enable-v2v3",
                self.experimental_enable_v2v3.as_deref().is_some_and(|v| !v.is_empty()),
                "meshkv serves etcd's v3 API only",
            ),
        ];
        for (flag, set, why) in given {
            if set {
                no_effect(flag, why);
            }
        }
        Ok(notes)
    }
}

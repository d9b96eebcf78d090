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
    /// The validity of self-made certificates: meshkv makes none.
    #[arg(long)]
    pub self_signed_cert_validity: Option<u64>,
    /// A certificate for the member's own client connections: meshkv's members call each
    /// other over the mesh, never through a client URL.
    #[arg(long)]
    pub client_cert_file: Option<String>,
    /// The key of --client-cert-file.
    #[arg(long)]
    pub client_key_file: Option<String>,
    /// SO_REUSEADDR on the listeners: meshkv's always have it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub socket_reuse_address: bool,
    /// SO_REUSEPORT on the listeners: meshkv's do not share their ports.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub socket_reuse_port: bool,
    /// Skip fsync: meshkv always makes its log durable.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub unsafe_no_fsync: bool,
    /// etcd's rotation of its log file: rotate meshkv's with logrotate (copytruncate).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub enable_log_rotation: bool,
    /// etcd's rotation settings, with --enable-log-rotation.
    #[arg(long)]
    pub log_rotation_config_json: Option<String>,
    /// etcd's log format, json or console: meshkv writes one format.
    #[arg(long, value_parser = ["json", "console"])]
    pub log_format: Option<String>,
    /// The phase of etcd's v2 store deprecation: meshkv has no v2 store.
    #[arg(long)]
    pub v2_deprecation: Option<String>,
    /// etcd's hash check of compacted revisions: meshkv's leader compares the members'
    /// hashes with --experimental-corrupt-check-time.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub experimental_compact_hash_check_enabled: bool,
    /// How often etcd's compaction hash check runs.
    #[arg(long)]
    pub experimental_compact_hash_check_time: Option<String>,
    /// Log entries etcd keeps for a slow follower after a snapshot: meshkv keeps
    /// --snapshot-count.
    #[arg(long, alias = "snapshot-catchup-entries")]
    pub experimental_snapshot_catchup_entries: Option<u64>,
    /// etcd's wait for the cluster before serving: a meshkv member serves at once.
    #[arg(long)]
    pub experimental_wait_cluster_ready_timeout: Option<String>,
    /// bbolt's defragmentation at start: RocksDB compacts by itself.
    #[arg(long, alias = "bootstrap-defrag-threshold-megabytes")]
    pub experimental_bootstrap_defrag_threshold_megabytes: Option<u64>,
    /// bbolt's pages locked in memory: meshkv's store is RocksDB.
    #[arg(long, alias = "memory-mlock", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = parse_bool, default_value = "false")]
    pub experimental_memory_mlock: bool,
    /// etcd's shared read buffer for write transactions.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool)]
    pub experimental_txn_mode_write_with_shared_buffer: Option<bool>,
    /// etcd stops serving gRPC health during a defragmentation: meshkv keeps serving.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    pub experimental_stop_grpc_service_on_defrag: bool,
    /// How often etcd checks a downgrade: meshkv has no downgrade to check.
    #[arg(long, alias = "downgrade-check-time")]
    pub experimental_downgrade_check_time: Option<String>,
    /// OpenTelemetry traces: meshkv exports none.
    #[arg(long, alias = "enable-distributed-tracing", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool, default_value = "false")]
    pub experimental_enable_distributed_tracing: bool,
    /// Where traces would go, with --experimental-enable-distributed-tracing.
    #[arg(long, alias = "distributed-tracing-address")]
    pub experimental_distributed_tracing_address: Option<String>,
    /// The traces' service name.
    #[arg(long, alias = "distributed-tracing-service-name")]
    pub experimental_distributed_tracing_service_name: Option<String>,
    /// The traces' instance id.
    #[arg(long, alias = "distributed-tracing-instance-id")]
    pub experimental_distributed_tracing_instance_id: Option<String>,
    /// The traces' sampling rate.
    #[arg(long, alias = "distributed-tracing-sampling-rate")]
    pub experimental_distributed_tracing_sampling_rate: Option<u64>,
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
            (
                "client-cert-file",
                self.client_cert_file.is_some() || self.client_key_file.is_some(),
                "meshkv's members call each other over the mesh, never through a client URL",
            ),
            ("socket-reuse-port", self.socket_reuse_port, "meshkv's listeners do not share their ports"),
            ("unsafe-no-fsync", self.unsafe_no_fsync, "meshkv always makes its Raft log durable"),
            (
                "enable-log-rotation",
                self.enable_log_rotation || self.log_rotation_config_json.is_some(),
                "rotate meshkv's log file with logrotate's copytruncate",
            ),
            ("log-format", self.log_format.is_some(), "meshkv writes its log in one format"),
            (
                "experimental-compact-hash-check-enabled",
                self.experimental_compact_hash_check_enabled || self.experimental_compact_hash_check_time.is_some(),
                "meshkv's leader compares the members' hashes every --experimental-corrupt-check-time",
            ),
            (
                "experimental-snapshot-catchup-entries",
                self.experimental_snapshot_catchup_entries.is_some(),
                "meshkv keeps --snapshot-count entries of its log for followers that lag",
            ),
            (
                "experimental-wait-cluster-ready-timeout",
                self.experimental_wait_cluster_ready_timeout.is_some(),
                "a meshkv member serves at once, answering what needs a leader once there is one",
            ),
            (
                "experimental-bootstrap-defrag-threshold-megabytes",
                self.experimental_bootstrap_defrag_threshold_megabytes.is_some(),
                "meshkv's store (RocksDB) compacts by itself",
            ),
            ("experimental-memory-mlock", self.experimental_memory_mlock, "meshkv's store is RocksDB"),
            (
                "experimental-txn-mode-write-with-shared-buffer",
                self.experimental_txn_mode_write_with_shared_buffer.is_some(),
                "meshkv's store is RocksDB",
            ),
            (
                "experimental-stop-grpc-service-on-defrag",
                self.experimental_stop_grpc_service_on_defrag,
                "meshkv keeps serving during a defragmentation",
            ),
            (
                "experimental-downgrade-check-time",
                self.experimental_downgrade_check_time.is_some(),
                "meshkv has no cluster downgrade to check",
            ),
            (
                "experimental-enable-distributed-tracing",
                self.experimental_enable_distributed_tracing,
                "meshkv exports no OpenTelemetry traces",
            ),
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

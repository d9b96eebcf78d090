//! The `meshkv` binary: flags → `Config` → `server::run`.

mod etcd_flags;

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

// The allocator: fewer cycles than glibc's malloc on the many small, short-lived buffers of
// gRPC and Raft (measured in docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use meshkv::config::{parse_duration, parse_duration_or_zero, AutoCompaction, Config};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::EnvFilter;

/// meshkv: an etcd-v3-compatible key-value store. With no flags it serves one member
/// with data in ./default.meshkv on 127.0.0.1:2379.
#[derive(Parser, Debug)]
#[command(name = "meshkv", version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Load-test any etcd v3 endpoints (meshkv or etcd).
    Bench(Box<BenchArgs>),
    /// Show the cluster (members, roles, leader, applied index) and the mesh (peers,
    /// routes, connections) as a running member sees them.
    Status(StatusArgs),
    /// Run real members under faults and check the clients' histories for linearizability.
    Torture(TortureArgs),
    /// Backups: `etcdctl snapshot save FILE` writes one from a running member.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
}

#[derive(clap::Subcommand, Debug)]
enum SnapshotAction {
    /// Make the data dir of a new one-member cluster from a backup: every key and its
    /// history, the leases and the revisions, on a new Raft log.
    Restore(RestoreArgs),
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// The backup, as `etcdctl snapshot save` wrote it from a meshkv member; or etcd's:
    /// saved from etcd the same way, or the `member/snap/db` file of a stopped etcd member.
    file: PathBuf,
    /// The new data dir (it must not exist, or be empty); default `<name>.meshkv`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The name of the member that will serve it.
    #[arg(long, default_value = "default")]
    name: String,
    /// Take an etcd snapshot that has no SHA-256 at its end (an etcd member's `db` file).
    #[arg(long)]
    skip_hash_check: bool,
}

fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.unwrap_or_else(|| PathBuf::from(format!("{}.meshkv", args.name)));
    let file = std::fs::File::open(&args.file).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let done = meshkv::store::backup::restore_file(file, &dir, args.skip_hash_check)?;
    println!(
        "restored {} records at revision {} into {}; start it with: meshkv --name {} --data-dir {}",
        done.records,
        done.revision,
        dir.display(),
        args.name,
        dir.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct TortureArgs {
    /// Members to run (3 or 5).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Keys the clients share (few, so that operations conflict).
    #[arg(long, default_value_t = 4)]
    keys: usize,
    /// Lease holders: each keeps a lease with two keys alive at random intervals, and
    /// checks that no lease ends before its TTL has run from its last renewal.
    #[arg(long, default_value_t = 3)]
    leases: usize,
    /// Lockers: each takes one lock in turns through the Lock service, under a lease, and
    /// checks that a counter it guards with the lock changes only by its own write.
    #[arg(long, default_value_t = 3)]
    lockers: usize,
    /// Candidates: each campaigns in one election under a lease, proclaims a few values
    /// once elected and resigns; two observers follow it through Observe. Checks one
    /// leader at a time, leaders told in order, and no proclaimed value missed.
    #[arg(long, default_value_t = 3)]
    candidates: usize,
    /// Seconds of load and faults.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seed of the fault schedule and the clients' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Faults to draw from: kill, pause, partition, one-way, net-partition (root: members
    /// then run in network namespaces), snapshot-leader-kill, join, replace, wipe (a lost
    /// disk); or "all".
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,pause,partition,one-way,snapshot-leader-kill,join,replace"
    )]
    faults: Vec<String>,
    /// Directory for data, logs and violation reports, kept after the run [default: a new
    /// temporary one, removed if the run passes].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Extra flags for every member, space-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    member_args: String,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// A member's client endpoint (host:port or http://host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoint: String,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Workload: put, range (linearizable), range-serializable, txn-mixed, lease, watch,
    /// mesh (MeshConn datagrams), fsync (this disk); or `report FILE...` to make the
    /// table of medians (and --plot) from JSON lines, or `ready` to time how long until the
    /// endpoint answers a read.
    #[arg(default_value = "put")]
    workload: String,
    /// report: files of JSON lines written by --json.
    inputs: Vec<PathBuf>,
    /// Comma-separated endpoints (host:port or http://host:port).
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 10)]
    conns: usize,
    /// Concurrent clients, each with one request in flight (watch: clients putting).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Requests in all (watch: puts; fsync: syncs), unless --duration is given.
    #[arg(long, default_value_t = 10_000)]
    total: usize,
    /// Seconds to run for, instead of --total (mesh: seconds per measurement, default 3).
    #[arg(long)]
    duration: Option<f64>,
    /// Requests per second over all clients, open loop (watch: puts per second).
    /// Without it, the clients go as fast as the server answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes (fsync: bytes appended per sync).
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys (0: as many as requests; reads and txn-mixed: 1,000).
    #[arg(long, default_value_t = 0)]
    key_space: usize,
    /// Write keys in order rather than spread over the key space.
    #[arg(long)]
    sequential_keys: bool,
    /// Sign in as name:password, for endpoints with authentication on (every workload but
    /// mesh and fsync).
    #[arg(long)]
    user: Option<String>,
    /// watch: watchers, spread over --streams streams; each watches one of --key-space keys.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// watch: gRPC watch streams carrying the watchers.
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// watch: extra streams watching every key that are never read.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// The system under test, recorded in the JSON line (say meshkv or etcd).
    #[arg(long, default_value = "")]
    label: String,
    /// What this run measures, for grouping rounds in `report` [default: the workload].
    #[arg(long, default_value = "")]
    case: String,
    /// Append the JSON line to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency by percentile to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// fsync: the directory to sync a file in (the disk under test).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// ready: give up after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Name of this member and mesh peer; its member id is derived from it [default: the
    /// name kept in the data dir, else "default" for a lone member, else generated].
    #[arg(long)]
    name: Option<String>,
    /// Directory of this member's data [default: <name>.meshkv, or default.meshkv].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Comma-separated URLs to serve clients on.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    listen_client_urls: Vec<String>,
    /// Comma-separated client URLs to advertise to clients [default: the listen URLs].
    #[arg(long, value_delimiter = ',')]
    advertise_client_urls: Vec<String>,
    /// Comma-separated URLs to serve /metrics and the health endpoints on, besides the
    /// client URLs.
    #[arg(long, value_delimiter = ',')]
    listen_metrics_urls: Vec<String>,
    /// Comma-separated URLs to serve the HTTP endpoints and the JSON gateway on instead
    /// of the client URLs, which then serve gRPC only.
    #[arg(long, value_delimiter = ',')]
    listen_client_http_urls: Vec<String>,
    /// Most learners at once: a member that joins waits while there are as many
    /// [default: no limit].
    #[arg(long, alias = "experimental-max-learners")]
    max_learners: Option<usize>,
    /// Serve the JSON gateway (/v3/…).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "true")]
    enable_grpc_gateway: bool,
    /// Comma-separated URLs to serve mesh peers on.
    #[arg(long, default_value = "http://127.0.0.1:2380", value_delimiter = ',')]
    listen_peer_urls: Vec<String>,
    /// The peer URL other members dial to reach this one [default: the bound listen address].
    #[arg(long)]
    advertise_peer_urls: Option<String>,
    /// Comma-separated mesh peers to join (host:port); any one member will do.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
    /// Name of the cluster; mesh peers of another cluster are refused.
    #[arg(long, default_value = "meshkv")]
    cluster_name: String,
    /// File with the shared mesh secret; peers without it are refused before they learn anything.
    #[arg(long)]
    mesh_secret_file: Option<PathBuf>,
    /// Form a new cluster once this many fresh members (this one included) see each other.
    #[arg(long, default_value_t = 0)]
    bootstrap_expect: usize,
    /// Voters to keep; members beyond them stay learners (serializable reads, watches).
    #[arg(long, default_value_t = 3)]
    voters: usize,
    /// Seconds a voter may be unreachable before a caught-up learner replaces it.
    #[arg(long, default_value_t = 30.0)]
    dead_member_timeout: f64,
    /// Applied Raft entries kept in the log; a member further behind gets a snapshot.
    #[arg(long, default_value_t = 10_000)]
    snapshot_count: u64,
    /// Failure drills: drop all mesh traffic to and from these peers (comma-separated
    /// names), as if the network between them were cut.
    #[arg(long, value_delimiter = ',')]
    mesh_block_peers: Vec<String>,
    /// Deliberately broken: answer linearizable reads from the local store with no
    /// ReadIndex. Exists only to show that the torture checks catch it.
    #[arg(long, hide = true)]
    unsafe_no_read_index: bool,
    /// Deliberately broken: as leader, end leases at half their TTL. Exists only to show
    /// that the torture's lease check catches it.
    #[arg(long, hide = true)]
    unsafe_lease_half_ttl: bool,
    /// Deliberately broken: Lock and Campaign return without waiting for the holders and
    /// candidates before them. Exists only to show that the torture's lock and election
    /// checks catch it.
    #[arg(long, hide = true)]
    unsafe_no_wait_turn: bool,
    /// Upgrade drills: announce mesh protocols up to N, as a newer build would, so that
    /// a cluster can be upgraded (and refused a downgrade) between two protocols.
    #[arg(long, hide = true, value_name = "N")]
    drill_mesh_protocol: Option<u32>,
    /// Failure drills: a file naming peers, one per line, whose mesh traffic is dropped both
    /// ways (`peer`) or only on arrival here (`<peer`, a one-way loss); re-read every 200 ms,
    /// so partitions can come and go while the member runs.
    #[arg(long)]
    mesh_block_file: Option<PathBuf>,
    /// Largest client request accepted, in bytes; larger writes get "etcdserver: request is too large".
    #[arg(long, default_value_t = 1536 * 1024)]
    max_request_bytes: usize,
    /// Most operations accepted in one transaction.
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// The store's space quota in bytes: a write that would pass it is refused and raises
    /// the NOSPACE alarm. 0 takes the default, 2 GiB; a negative value turns it off.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    quota_backend_bytes: i64,
    /// The kind of auth token handed out, as etcd's: `simple`, or
    /// `jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256,ttl=5m` (signed tokens any member
    /// with the public key checks; sign-method RS*, PS*, ES256/384, or HS* with the secret
    /// in priv-key).
    #[arg(long, default_value = "simple", value_parser = parse_auth_token)]
    auth_token: AuthToken,
    /// Seconds a simple auth token lives without use.
    #[arg(long, default_value_t = 300)]
    auth_token_ttl: u64,
    /// bcrypt's cost (4 to 31) for the passwords of new users and changed passwords.
    #[arg(long, default_value_t = 10)]
    bcrypt_cost: u32,
    /// The certificate (PEM, with its chain) served on https:// client and metrics URLs.
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The CAs (PEM) that sign the clients' certificates, for --client-cert-auth.
    #[arg(long)]
    trusted_ca_file: Option<PathBuf>,
    /// Requires every client on an https:// URL to show a certificate signed by a CA of
    /// --trusted-ca-file.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    client_cert_auth: bool,
    /// Revocation lists (PEM) of client certificates: a client showing a revoked
    /// certificate is refused (with --client-cert-auth).
    #[arg(long)]
    client_crl_file: Option<PathBuf>,
    /// The TLS 1.2 cipher suites offered to clients, comma-separated, by Go's names
    /// (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, …); TLS 1.3's are all kept, as etcd's are
    /// [default: all of rustls's].
    #[arg(long, value_delimiter = ',')]
    cipher_suites: Vec<String>,
    /// A host name every client certificate must be valid for (a DNS name or IP address
    /// among its subject alternative names), with --client-cert-auth.
    #[arg(long)]
    client_cert_allowed_hostname: Option<String>,
    /// The lowest TLS version served: TLS1.2 or TLS1.3.
    #[arg(long, default_value = "TLS1.2")]
    tls_min_version: String,
    /// The highest TLS version served: TLS1.2 or TLS1.3 [default: TLS1.3].
    #[arg(long, default_value = "")]
    tls_max_version: String,
    /// Time between Raft heartbeats, in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Time without a leader before a member starts an election, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// How often watchers that asked for progress notifications hear the current revision
    /// (a duration: 500ms, 5s, 10m).
    #[arg(long, alias = "experimental-watch-progress-notify-interval", default_value = "10m", value_parser = parse_duration)]
    watch_progress_notify_interval: Duration,
    /// Before serving, compare the store's hash with the other members' and refuse to
    /// start if they differ where they should agree.
    #[arg(long, alias = "experimental-initial-corrupt-check", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool, default_value = "false")]
    initial_corrupt_check: bool,
    /// How often the leader compares the members' hashes and raises the CORRUPT alarm for
    /// one that differs (a duration: 1m, 2h); 0 for never.
    #[arg(long, alias = "experimental-corrupt-check-time", default_value = "0s", value_parser = parse_duration_or_zero)]
    corrupt_check_time: Duration,
    /// The leader records the time left of leases longer than the interval through Raft,
    /// so that a new leader counts them on from there rather than from their whole TTL.
    #[arg(long, alias = "experimental-enable-lease-checkpoint", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool, default_value = "true")]
    lease_checkpoint: bool,
    /// How often the leader records the time left of leases (a duration).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    lease_checkpoint_interval: Duration,
    /// etcd 3.5's switch to keep lease checkpoints in the store: meshkv always keeps them
    /// there, so either value is taken and changes nothing.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "true")]
    experimental_enable_lease_checkpoint_persist: bool,
    /// How --auto-compaction-retention counts: periodic (time) or revision.
    #[arg(long, default_value = "periodic")]
    auto_compaction_mode: String,
    /// History the leader keeps when it compacts by itself: 0 (it does not), hours or a
    /// duration (30m, 1h30m) in periodic mode, revisions in revision mode.
    #[arg(long, default_value = "0")]
    auto_compaction_retention: String,
    /// A YAML file of flags, as etcd's: keys are the flags' names (the TLS ones under
    /// client-transport-security). Environment variables are then not read.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Refuse to remove a voter when the voters left that this member reaches would be
    /// fewer than a quorum.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "true")]
    strict_reconfig_check: bool,
    /// Raft's pre-vote phase: a member cut off from the others asks whether it could
    /// win an election before it raises its term, so it does not depose a working leader
    /// when it comes back.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "true")]
    pre_vote: bool,
    /// How long a client connection may be idle before the member pings it (a
    /// duration); 0 for never.
    #[arg(long, default_value = "2h", value_parser = parse_duration_or_zero)]
    grpc_keepalive_interval: Duration,
    /// How long the member waits for the answer to its ping before it closes the
    /// connection.
    #[arg(long, default_value = "20s", value_parser = parse_duration_or_zero)]
    grpc_keepalive_timeout: Duration,
    /// Most concurrent calls one client connection may have open.
    #[arg(long, default_value_t = u32::MAX)]
    max_concurrent_streams: u32,
    /// Applying committed entries that takes longer than this is logged as a warning.
    #[arg(long, alias = "experimental-warning-apply-duration", default_value = "100ms", value_parser = parse_duration)]
    warning_apply_duration: Duration,
    /// A unary call that takes longer than this to answer is logged as a warning (0:
    /// never).
    #[arg(long, alias = "experimental-warning-unary-request-duration", default_value = "300ms",
          value_parser = parse_duration_or_zero)]
    warning_unary_request_duration: Duration,
    /// Origins whose scripts may call the HTTP endpoints and the JSON gateway
    /// (comma-separated; * for any): the answers carry CORS headers for them.
    #[arg(long, default_value = "*", value_delimiter = ',')]
    cors: Vec<String>,
    /// Host names a plain-HTTP request may name in its Host header (comma-separated; *
    /// for any); others are answered 421. Requests over TLS are not checked.
    #[arg(long, default_value = "*", value_delimiter = ',')]
    host_whitelist: Vec<String>,
    /// For a cluster that lost its quorum for good: this member drops what was not
    /// committed, removes every other member and starts a new cluster (a new cluster
    /// id) with its data. Others join it again only with empty data dirs. Start it
    /// without this flag afterwards.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set,
          value_parser = parse_bool, default_value = "false")]
    force_new_cluster: bool,
    /// Log level: debug, info, warn or error.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// etcd's other flags: accepted where meshkv can do what they ask.
    #[command(flatten)]
    etcd: etcd_flags::EtcdFlags,
}

/// A boolean as etcd's flags take it (Go's): `--flag`, `--flag=true`, `--flag=false`, and
/// the other spellings Go accepts.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("parse error: {s:?} is not a boolean")),
    }
}

/// etcd's --auth-token: `simple`, or `jwt` with its options.
#[derive(Clone, Debug)]
struct AuthToken(Option<meshkv::store::jwt::JwtOptions>);

/// etcd's --auth-token: the kind, then options after a comma.
fn parse_auth_token(s: &str) -> Result<AuthToken, String> {
    let (kind, opts) = s.split_once(',').unwrap_or((s, ""));
    match kind {
        "simple" => Ok(AuthToken(None)),
        "jwt" => meshkv::store::jwt::JwtOptions::parse(opts, parse_duration)
            .map(|o| AuthToken(Some(o)))
            .map_err(|e| e.to_string()),
        _ => Err(format!("unknown token kind {kind:?}; use simple or jwt")),
    }
}

impl ServeArgs {
    fn into_config(self) -> Result<Config, String> {
        let auto_compaction = AutoCompaction::parse(&self.auto_compaction_mode, &self.auto_compaction_retention)?;
        Ok(Config {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(format!("{}.meshkv", self.name.as_deref().unwrap_or("default")))),
            name: self.name.unwrap_or_default(),
            join: self.join,
            advertise_peer_url: self.advertise_peer_urls,
            cluster_name: self.cluster_name,
            mesh_secret_file: self.mesh_secret_file,
            bootstrap_expect: self.bootstrap_expect,
            voters: self.voters,
            dead_member_timeout: Duration::from_secs_f64(self.dead_member_timeout.max(0.0)),
            snapshot_count: self.snapshot_count.max(1),
            mesh_block_peers: self.mesh_block_peers,
            mesh_block_file: self.mesh_block_file,
            unsafe_no_read_index: self.unsafe_no_read_index,
            unsafe_lease_half_ttl: self.unsafe_lease_half_ttl,
            unsafe_no_wait_turn: self.unsafe_no_wait_turn,
            mesh_protocol: self.drill_mesh_protocol.unwrap_or(meshkv::mesh::secure::PROTOCOL_VERSION),
            listen_client_urls: self.listen_client_urls,
            advertise_client_urls: self.advertise_client_urls,
            listen_metrics_urls: self.listen_metrics_urls,
            listen_client_http_urls: self.listen_client_http_urls.into_iter().filter(|u| !u.is_empty()).collect(),
            enable_grpc_gateway: self.enable_grpc_gateway,
            max_learners: self.max_learners,
            listen_peer_urls: self.listen_peer_urls,
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            quota_backend_bytes: self.quota_backend_bytes,
            auth_token_ttl: Duration::from_secs(self.auth_token_ttl),
            jwt: self.auth_token.0,
            bcrypt_cost: self.bcrypt_cost,
            tls: meshkv::tls::TlsFiles {
                cert_file: self.cert_file,
                key_file: self.key_file,
                trusted_ca_file: self.trusted_ca_file,
                client_cert_auth: self.client_cert_auth,
                client_crl_file: self.client_crl_file,
                cipher_suites: self.cipher_suites.into_iter().filter(|c| !c.trim().is_empty()).collect(),
                client_cert_allowed_hostname: self.client_cert_allowed_hostname.filter(|h| !h.is_empty()),
                min_version: self.tls_min_version,
                max_version: self.tls_max_version,
            },
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval),
            election_timeout: Duration::from_millis(self.election_timeout),
            watch_progress_notify_interval: self.watch_progress_notify_interval,
            auto_compaction,
            initial_corrupt_check: self.initial_corrupt_check,
            corrupt_check_time: self.corrupt_check_time,
            lease_checkpoint: self.lease_checkpoint,
            lease_checkpoint_interval: self.lease_checkpoint_interval,
            strict_reconfig_check: self.strict_reconfig_check,
            pre_vote: self.pre_vote,
            grpc_keepalive_interval: self.grpc_keepalive_interval,
            grpc_keepalive_timeout: self.grpc_keepalive_timeout,
            max_concurrent_streams: self.max_concurrent_streams,
            warning_apply_duration: self.warning_apply_duration,
            warning_unary_request_duration: self.warning_unary_request_duration,
            cors: self.cors,
            host_whitelist: self.host_whitelist,
            force_new_cluster: self.force_new_cluster,
            log_level: if self.etcd.debug { "debug".into() } else { self.log_level },
        })
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use meshkv::bench::{self, record, BenchConfig, Workload};
    // Output piped into `head` ends quietly, as a command-line tool's should.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.workload == "mesh" {
        let seconds = args.duration.unwrap_or(3.0);
        let results = rt.block_on(bench::mesh::run(std::time::Duration::from_secs_f64(seconds)));
        println!("{}", bench::mesh::MeshBench::table_header());
        for r in results {
            println!("{}", r.table_row());
        }
        return Ok(());
    }
    if args.workload == "report" {
        let mut records = Vec::new();
        for f in &args.inputs {
            let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            records.extend(record::parse_lines(&text));
        }
        anyhow::ensure!(!records.is_empty(), "no records in {:?}", args.inputs);
        let summaries = record::summarize(&records);
        let has = |l: &str| summaries.iter().any(|s| s.label == l);
        if has("meshkv") && has("etcd") {
            println!("{}", record::ratio_table(&summaries, "meshkv", "etcd"));
        }
        println!("{}", record::median_table(&summaries));
        print!("{}", record::fsync_lines(&summaries));
        if let Some(p) = &args.plot {
            record::plot_svg(p, &summaries).map_err(|e| anyhow::anyhow!("plot {}: {e}", p.display()))?;
        }
        return Ok(());
    }
    let cfg = BenchConfig {
        endpoints: args.endpoints.clone(),
        conns: args.conns,
        clients: args.clients,
        total: args.total,
        duration: args.duration.map(std::time::Duration::from_secs_f64),
        rate: args.rate,
        key_size: args.key_size,
        val_size: args.val_size,
        key_space: args.key_space,
        sequential_keys: args.sequential_keys,
        user: args.user.clone(),
        label: args.label.clone(),
        case: args.case.clone(),
    };
    if args.workload == "ready" {
        let ms = rt.block_on(bench::ready(&cfg, std::time::Duration::from_secs_f64(args.timeout)))?;
        println!("{{\"ready_ms\":{ms:.1}}}");
        return Ok(());
    }
    let cpu_before = record::CpuTimes::now();
    let mut report = match args.workload.as_str() {
        "fsync" => bench::fsync::run(&cfg, &args.dir, args.total, args.val_size)?,
        "watch" => {
            let wcfg = bench::watch::WatchBenchConfig {
                watchers: args.watchers,
                streams: args.streams,
                keys: args.key_space.max(1),
                puts: args.total,
                rate: args.rate,
                put_clients: args.clients,
                stalled: args.stalled,
            };
            let r = rt.block_on(async {
                let shards = bench::conn::Shards::new(cfg.conns)?;
                let chans = shards.connect(&cfg.endpoints, cfg.conns, cfg.user.as_deref()).await?;
                anyhow::Ok(bench::watch::run(&shards, chans, wcfg).await?)
            })?;
            r.record(&cfg)
        }
        other => {
            let Some(workload) = Workload::parse(other) else {
                anyhow::bail!(
                    "unknown workload {other:?}: put, range, range-serializable, txn-mixed, lease, watch, mesh, fsync, report or ready"
                );
            };
            let bar = match cfg.duration {
                Some(d) => indicatif::ProgressBar::new(d.as_secs()),
                None => indicatif::ProgressBar::new(cfg.total as u64),
            };
            let b = bar.clone();
            let timed = cfg.duration.is_some();
            let start = std::time::Instant::now();
            let rec = rt.block_on(bench::run(&cfg, workload, move |n| {
                b.set_position(if timed { start.elapsed().as_secs() } else { n })
            }))?;
            bar.finish_and_clear();
            rec
        }
    };
    if let (Some(before), Some(after)) = (cpu_before, record::CpuTimes::now()) {
        report.steal_pct = after.steal_pct_since(&before);
    }
    println!("{}", report.json_line());
    println!("{}\n{}", record::Record::table_header(), report.table_row());
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{}", report.json_line())?;
    }
    if let Some(p) = &args.plot {
        record::plot_svg(p, &record::summarize(std::slice::from_ref(&report)))
            .map_err(|e| anyhow::anyhow!("plot {}: {e}", p.display()))?;
    }
    if let Some(e) = &report.first_error {
        eprintln!("first error: {e}");
    }
    if report.workload == "watch"
        && report.extra.get("disorder").copied().unwrap_or(0.0)
            + report.extra.get("wrong_counts").copied().unwrap_or(0.0)
            > 0.0
    {
        anyhow::bail!("watchers missed, repeated or reordered events");
    }
    Ok(())
}

fn url(ep: &str) -> String {
    if ep.contains("://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    use meshkv::pb::etcdserverpb::{cluster_client::ClusterClient, maintenance_client::MaintenanceClient};
    use meshkv::pb::etcdserverpb::{MemberListRequest, StatusRequest};
    use meshkv::pb::meshkvpb::{admin_client::AdminClient, MeshStatusRequest};
    let ch = tonic::transport::Endpoint::from_shared(url(&args.endpoint))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let members =
        ClusterClient::new(ch.clone()).member_list(MemberListRequest { linearizable: false }).await?.into_inner();
    println!("cluster {:x}", members.header.as_ref().map_or(0, |h| h.cluster_id));
    println!(
        "{:<18} {:<16} {:<8} {:>6} {:>10} {:>10}  CLIENT URL",
        "ID", "NAME", "ROLE", "TERM", "RAFT INDEX", "APPLIED"
    );
    for m in &members.members {
        let client = m.client_ur_ls.first().cloned().unwrap_or_default();
        let st = async {
            let ch = tonic::transport::Endpoint::from_shared(url(&client))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(3))
                .connect()
                .await?;
            anyhow::Ok(MaintenanceClient::new(ch).status(StatusRequest {}).await?.into_inner())
        }
        .await;
        match st {
            Ok(s) => {
                let role = if s.leader == m.id {
                    "leader"
                } else if m.is_learner {
                    "learner"
                } else {
                    "voter"
                };
                println!(
                    "{:<18x} {:<16} {:<8} {:>6} {:>10} {:>10}  {client}",
                    m.id, m.name, role, s.raft_term, s.raft_index, s.raft_applied_index
                );
            }
            Err(e) => {
                let role = if m.is_learner { "learner" } else { "voter" };
                println!("{:<18x} {:<16} {:<8} unreachable: {e}", m.id, m.name, role);
            }
        }
    }
    let mesh = AdminClient::new(ch).mesh_status(MeshStatusRequest {}).await?.into_inner();
    println!("cluster version {} (the mesh protocol every member speaks)", mesh.cluster_version);
    println!();
    println!("mesh peer {} ({:x}) at {}", mesh.name, mesh.uid, mesh.addr);
    println!("{:<16} {:<22} {:<16}  LINKS", "PEER", "ADDRESS", "NEXT HOP");
    for p in &mesh.peers {
        let hop = if p.next_hop.is_empty() { "unreachable".to_string() } else { p.next_hop.clone() };
        println!("{:<16} {:<22} {:<16}  {}", p.name, p.addr, hop, p.connections.join(","));
    }
    let connections: Vec<String> =
        mesh.connections.iter().map(|c| format!("{} (protocol {})", c.peer, c.protocol)).collect();
    println!("connections: {}", connections.join(", "));
    let drops: Vec<String> =
        mesh.drops.iter().filter(|d| d.messages > 0).map(|d| format!("{}={}", d.name, d.messages)).collect();
    println!("relayed: {}  drops: {}", mesh.relayed, if drops.is_empty() { "none".into() } else { drops.join(" ") });
    Ok(())
}

fn torture(args: TortureArgs) -> anyhow::Result<()> {
    use meshkv::torture::run::{self, Fault, TortureConfig};
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("info"))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let faults = args
        .faults
        .iter()
        .filter(|f| !f.is_empty())
        .flat_map(|f| match f.as_str() {
            "all" => Fault::ALL.iter().map(|f| Ok(*f)).collect(),
            name => vec![Fault::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                anyhow::anyhow!("unknown fault {name:?}: one of {}, or all", known.join(", "))
            })],
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if faults.contains(&Fault::NetPartition) {
        if let Some(why) = meshkv::torture::netns::Netns::unavailable() {
            anyhow::bail!("the net-partition fault cannot run here: {why}");
        }
    }
    // A directory the user named is theirs to keep; a temporary one goes once the run passes.
    let (dir, temporary) = match args.dir {
        Some(d) => (d, false),
        None => (std::env::temp_dir().join(format!("meshkv-torture-{}-{}", args.seed, std::process::id())), true),
    };
    let cfg = TortureConfig {
        binary: std::env::current_exe()?,
        dir: dir.clone(),
        members: args.members,
        clients: args.clients,
        keys: args.keys,
        leases: args.leases,
        lockers: args.lockers,
        candidates: args.candidates,
        duration: Duration::from_secs_f64(args.duration),
        seed: args.seed,
        faults,
        member_args: args.member_args.split_whitespace().map(String::from).collect(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(run::run(cfg))?;
    println!(
        "seed {}: {} operations ({} with unknown outcome), {} faults {:?}, {} keys not linearizable, hashes {}",
        args.seed,
        report.ops,
        report.unknown,
        report.faults,
        report.by_kind,
        report.violations.len(),
        match &report.hash_mismatch {
            None => "agree".to_string(),
            Some(h) => format!("DISAGREE {h:?}"),
        }
    );
    for (key, path) in &report.violations {
        println!("violation on {key}: {}", path.display());
    }
    println!("watch: {} events, {} problems", report.watch_events, report.watch_problems.len());
    let l = &report.leases;
    println!(
        "leases: {} granted, {} renewals, {} ran out, {} problems",
        l.granted,
        l.renewed,
        l.expired,
        l.problems.len()
    );
    for p in l.problems.iter().take(20) {
        println!("lease problem: {p}");
    }
    let l = &report.locks;
    println!(
        "locks: {} acquired, {} guarded writes, {} refused (lock lost), {} problems",
        l.acquired,
        l.fenced_writes,
        l.refused,
        l.problems.len()
    );
    for p in l.problems.iter().take(20) {
        println!("lock problem: {p}");
    }
    let e = &report.elections;
    println!(
        "elections: {} won, {} proclaimed, {} refused (leadership lost), {} told to observers, {} problems",
        e.won,
        e.proclaimed,
        e.refused,
        e.told,
        e.problems.len()
    );
    for p in e.problems.iter().take(20) {
        println!("election problem: {p}");
    }
    for name in &report.unreplaced {
        println!("liveness: the dead voter {name} was not replaced in time");
    }
    for p in report.watch_problems.iter().take(20) {
        println!("watch problem: {p}");
    }
    if !report.answered() {
        anyhow::bail!("no operation was answered: the members never served; data and logs in {}", dir.display());
    }
    if !report.ok() {
        anyhow::bail!("torture found problems (see above); data and logs in {}", dir.display());
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// What reading the environment or a config file has to say once logging runs: (a
/// warning?, the words).
type Notes = Vec<(bool, String)>;

/// A setting from outside the command line: the flag it names (as written there), what
/// to call it in messages, and its value.
struct Setting {
    flag: String,
    named: String,
    value: String,
}

/// Where settings besides the command line come from.
enum Source<'a> {
    /// etcd's `ETCD_<FLAG>` variables.
    Env,
    /// `--config-file`, etcd's YAML.
    File(&'a std::path::Path),
}

/// etcd's flags that meshkv has no use for, with what to give instead: refused on the
/// command line with this advice rather than as an unknown argument.
const ETCD_ONLY: &[(&str, &str)] = &[
    ("initial-cluster", MESH_FORMS_THE_CLUSTER),
    ("initial-cluster-state", MESH_FORMS_THE_CLUSTER),
    ("initial-cluster-token", MESH_FORMS_THE_CLUSTER),
    ("discovery", MESH_FORMS_THE_CLUSTER),
    ("discovery-srv", MESH_FORMS_THE_CLUSTER),
    ("discovery-srv-name", MESH_FORMS_THE_CLUSTER),
    ("discovery-fallback", MESH_FORMS_THE_CLUSTER),
    ("discovery-proxy", MESH_FORMS_THE_CLUSTER),
    ("initial-advertise-peer-urls", "meshkv's flag is --advertise-peer-urls"),
    ("peer-cert-file", PEERS_ON_THE_MESH),
    ("peer-key-file", PEERS_ON_THE_MESH),
    ("peer-trusted-ca-file", PEERS_ON_THE_MESH),
    ("peer-client-cert-auth", PEERS_ON_THE_MESH),
    ("peer-auto-tls", PEERS_ON_THE_MESH),
    ("peer-crl-file", PEERS_ON_THE_MESH),
    ("peer-cert-allowed-cn", PEERS_ON_THE_MESH),
    ("peer-cert-allowed-hostname", PEERS_ON_THE_MESH),
    ("experimental-peer-skip-client-san-verification", PEERS_ON_THE_MESH),
    ("peer-client-cert-file", PEERS_ON_THE_MESH),
    ("peer-client-key-file", PEERS_ON_THE_MESH),
    ("wal-dir", "meshkv keeps its Raft log in --data-dir"),
];
const MESH_FORMS_THE_CLUSTER: &str = "meshkv members find each other through the mesh, with no static member \
     list: give --join (host:port of any member) and, to form a new cluster, --bootstrap-expect N";
const PEERS_ON_THE_MESH: &str =
    "peers do not speak TLS; their traffic is encrypted by the mesh: give --mesh-secret-file";

/// The first of etcd's flags meshkv has no use for on the command line, and its advice.
fn etcd_only_flag<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Option<String> {
    args.iter().find_map(|a| {
        let a = a.as_ref().to_str()?.strip_prefix("--")?;
        let name = a.split_once('=').map_or(a, |(n, _)| n);
        let (flag, advice) = ETCD_ONLY.iter().find(|(f, _)| *f == name)?;
        Some(format!("--{flag} is etcd's: {advice}"))
    })
}

/// The flags a static cluster is set up with. meshkv members find each other through
/// the mesh; set, these would be left unread and each member would start alone.
const STATIC_CLUSTER: [&str; 3] = ["initial-cluster", "discovery", "discovery-srv"];

/// Turns `settings` into the arguments to add to the command line. A setting whose flag
/// the command line also gives is an error, one that names no flag a warning (as etcd
/// has it), one that gives a static cluster an error.
fn flags_from(
    cmd: &clap::Command,
    given: &clap::ArgMatches,
    source: &Source,
    settings: Vec<Setting>,
) -> Result<(Vec<String>, Notes), String> {
    let (mut args, mut notes) = (Vec::new(), Notes::new());
    for Setting { flag, named, value } in settings {
        let arg = cmd.get_arguments().find(|a| {
            a.get_long() == Some(flag.as_str()) || a.get_all_aliases().is_some_and(|al| al.contains(&flag.as_str()))
        });
        let Some(arg) = arg.filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)) else {
            if STATIC_CLUSTER.contains(&flag.as_str()) && !value.is_empty() {
                return Err(format!("{named}: {MESH_FORMS_THE_CLUSTER}"));
            }
            notes.push((
                true,
                match source {
                    Source::Env => format!("unrecognized environment variable {named}={value}"),
                    Source::File(f) => format!("config file {}: unknown key {named} ignored", f.display()),
                },
            ));
            continue;
        };
        if given.value_source(arg.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine) {
            return Err(match source {
                Source::Env => format!(
                    "conflicting environment variable {named:?} is shadowed by corresponding command-line flag \
                     (either unset environment variable or disable flag)"
                ),
                Source::File(f) => format!("--{flag} is given both on the command line and in {}", f.display()),
            });
        }
        // A boolean: a flag of its own, or one that takes `=true` or `=false` as etcd's
        // do (and may be on by default, so false is said).
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let boolean = switch || arg.get_num_args().is_some_and(|n| n.min_values() == 0 && n.max_values() == 1);
        if boolean {
            match value.as_str() {
                "" => {}
                v => match parse_bool(v) {
                    Ok(true) => args.push(format!("--{flag}")),
                    Ok(false) if switch => {}
                    Ok(false) => args.push(format!("--{flag}=false")),
                    Err(_) => return Err(format!("{named}={value:?}: expected true or false")),
                },
            }
        } else if !value.is_empty() {
            args.push(format!("--{flag}={value}"));
        }
        if let Source::Env = source {
            notes.push((false, format!("recognized and used environment variable {named}={value}")));
        }
    }
    Ok((args, notes))
}

/// etcd's environment variables: `ETCD_<FLAG>`, the flag's name in capitals with `_` for
/// `-` (ETCD_DATA_DIR, ETCD_LISTEN_CLIENT_URLS), in order of their names.
fn env_settings(env: impl IntoIterator<Item = (String, String)>) -> Vec<Setting> {
    let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("ETCD_")).collect();
    vars.sort();
    vars.into_iter()
        .map(|(named, value)| Setting {
            flag: named["ETCD_".len()..].to_ascii_lowercase().replace('_', "-"),
            named,
            value,
        })
        .collect()
}

/// etcd's config file: YAML whose keys are the flags' names, with the TLS flags under
/// `client-transport-security`. `peer-transport-security` has no meshkv flags (the mesh
/// encrypts peers' traffic) and is reported as unknown, as every other key is.
fn file_settings(yaml: &str) -> Result<Vec<Setting>, String> {
    use serde_yaml_ng::Value;
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::Null => Some(String::new()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            Value::Sequence(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>().map(|v| v.join(",")),
            _ => None,
        }
    }
    let doc: Value = serde_yaml_ng::from_str(yaml).map_err(|e| format!("not YAML: {e}"))?;
    let Value::Mapping(top) = doc else {
        return Err("expected a mapping of flag names to values".into());
    };
    let mut settings = Vec::new();
    for (key, value) in &top {
        let key = key.as_str().ok_or("keys must be flag names")?;
        match value {
            Value::Mapping(inner) if key == "client-transport-security" => {
                for (k, v) in inner {
                    let k = k.as_str().ok_or("keys must be flag names")?;
                    let value = scalar(v).ok_or_else(|| format!("{key}.{k}: expected a value"))?;
                    settings.push(Setting { flag: k.to_string(), named: format!("{key}.{k}"), value });
                }
            }
            Value::Mapping(_) => {
                settings.push(Setting { flag: key.to_string(), named: key.to_string(), value: "{…}".into() })
            }
            v => {
                let value = scalar(v).ok_or_else(|| format!("{key}: expected a value"))?;
                settings.push(Setting { flag: key.to_string(), named: key.to_string(), value });
            }
        }
    }
    Ok(settings)
}

/// The flags the environment or `--config-file` adds to the command line, as etcd reads
/// them: with a config file, the file (and no environment variable); else the
/// environment.
fn flags_beyond_the_command_line(
    cmd: &clap::Command,
    given: &clap::ArgMatches,
    config_file: Option<&std::path::Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Vec<String>, Notes), String> {
    let Some(file) = config_file else {
        return flags_from(cmd, given, &Source::Env, env_settings(env));
    };
    let text = std::fs::read_to_string(file).map_err(|e| format!("--config-file {}: {e}", file.display()))?;
    let settings = file_settings(&text).map_err(|e| format!("--config-file {}: {e}", file.display()))?;
    let (args, mut notes) = flags_from(cmd, given, &Source::File(file), settings)?;
    notes.insert(
        0,
        (false, format!("loaded server configuration from {}; environment variables are not read", file.display())),
    );
    Ok((args, notes))
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(advice) = etcd_only_flag(&argv) {
        anyhow::bail!("{advice}");
    }
    let cmd = Cli::command();
    let given = cmd.clone().get_matches();
    let mut cli = Cli::from_arg_matches(&given).unwrap_or_else(|e| e.exit());
    let mut env_notes = Notes::new();
    if cli.command.is_none() {
        let vars = std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        let (extra, notes) = flags_beyond_the_command_line(&cmd, &given, cli.serve.config_file.as_deref(), vars)
            .map_err(anyhow::Error::msg)?;
        if !extra.is_empty() {
            let argv = std::env::args_os().chain(extra.into_iter().map(Into::into));
            cli = Cli::from_arg_matches(&cmd.get_matches_from(argv)).unwrap_or_else(|e| e.exit());
        }
        env_notes = notes;
    }
    match cli.command {
        Some(Command::Bench(args)) => return bench(*args),
        Some(Command::Status(args)) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            return rt.block_on(status(args));
        }
        Some(Command::Torture(args)) => return torture(args),
        Some(Command::Snapshot { action: SnapshotAction::Restore(args) }) => return restore(args),
        None => {}
    }
    if !cli.serve.experimental_enable_lease_checkpoint_persist {
        env_notes.push((true, "lease checkpoints are always kept in the store; persist=false changes nothing".into()));
    }
    if !cli.serve.client_cert_auth {
        let given = [
            ("client-crl-file", cli.serve.client_crl_file.is_some()),
            (
                "client-cert-allowed-hostname",
                cli.serve.client_cert_allowed_hostname.as_ref().is_some_and(|h| !h.is_empty()),
            ),
        ];
        for (flag, _) in given.iter().filter(|(_, set)| *set) {
            env_notes.push((
                true,
                format!("--{flag} has no effect without --client-cert-auth: clients show no certificate"),
            ));
        }
    }
    env_notes.extend(cli.serve.etcd.notes().map_err(anyhow::Error::msg)?.into_iter().map(|n| (true, n)));
    let (writer, to_terminal) = log_writer(&cli.serve.etcd.log_outputs)?;
    let cfg = cli.serve.into_config().map_err(anyhow::Error::msg)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(to_terminal).with_writer(writer).init();
    for (warn, words) in env_notes {
        if warn {
            tracing::warn!("{words}");
        } else {
            tracing::info!("{words}");
        }
    }
    if let Err(e) = cfg.validate() {
        anyhow::bail!("{e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(meshkv::server::run(cfg, shutdown_signal(), |_| {}))?;
    Ok(())
}

/// Where the log goes, as etcd's --log-outputs: `default` and `stderr` (and
/// `systemd/journal`, which keeps a service's stderr) to stderr, `stdout`, or files,
/// appended to; several at once. Whether it is all one terminal (for colours).
fn log_writer(outputs: &[String]) -> anyhow::Result<(BoxMakeWriter, bool)> {
    use std::io::IsTerminal;
    let mut writers: Vec<BoxMakeWriter> = Vec::new();
    let mut terminal = true;
    let mut seen = std::collections::HashSet::new();
    for out in outputs.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let out = match out {
            "default" | "stderr" | "systemd/journal" => "stderr",
            o => o,
        };
        if !seen.insert(out.to_string()) {
            continue;
        }
        writers.push(match out {
            "stderr" => {
                terminal &= std::io::stderr().is_terminal();
                BoxMakeWriter::new(std::io::stderr)
            }
            "stdout" => {
                terminal &= std::io::stdout().is_terminal();
                BoxMakeWriter::new(std::io::stdout)
            }
            path => {
                terminal = false;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| anyhow::anyhow!("--log-outputs {path}: {e}"))?;
                BoxMakeWriter::new(std::sync::Arc::new(file))
            }
        });
    }
    let mut writers = writers.into_iter();
    let Some(first) = writers.next() else { return Ok((BoxMakeWriter::new(std::io::stderr), false)) };
    Ok((writers.fold(first, |all, w| BoxMakeWriter::new(all.and(w))), terminal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beyond(argv: &[&str], file: Option<&str>, env: &[(&str, &str)]) -> Result<(Vec<String>, Notes), String> {
        let cmd = Cli::command();
        let given = cmd.clone().try_get_matches_from(std::iter::once("meshkv").chain(argv.iter().copied())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.conf.yml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let file_named = |s: String| s.replace(&path.display().to_string(), "FILE");
        flags_beyond_the_command_line(&cmd, &given, file.map(|_| path.as_path()), env)
            .map(|(args, notes)| (args, notes.into_iter().map(|(w, s)| (w, file_named(s))).collect()))
            .map_err(file_named)
    }

    #[test]
    fn etcd_environment_variables_set_the_flags_the_command_line_leaves_out() {
        let (args, notes) = beyond(
            &["--name", "a"],
            None,
            &[
                ("ETCD_DATA_DIR", "/var/lib/a"),
                ("ETCD_CLIENT_CERT_AUTH", "true"),
                ("ETCD_AUTO_COMPACTION_RETENTION", "1h"),
                ("ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", "5s"),
                ("ETCD_INITIAL_CLUSTER_STATE", "new"),
                ("ETCDCTL_API", "3"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--auto-compaction-retention=1h",
                "--client-cert-auth",
                "--data-dir=/var/lib/a",
                "--experimental-watch-progress-notify-interval=5s"
            ]
        );
        let warned: Vec<&str> = notes.iter().filter(|(w, _)| *w).map(|(_, s)| s.as_str()).collect();
        assert_eq!(warned, ["unrecognized environment variable ETCD_INITIAL_CLUSTER_STATE=new"]);
        assert_eq!(notes.len(), 5);
        let (args, notes) = beyond(&[], None, &[("ETCD_FOO_BAR", "1"), ("ETCD_CLIENT_CERT_AUTH", "false")]).unwrap();
        assert_eq!(args, ["--client-cert-auth=false"]);
        assert_eq!(notes[0], (false, "recognized and used environment variable ETCD_CLIENT_CERT_AUTH=false".into()));
        assert_eq!(notes[1], (true, "unrecognized environment variable ETCD_FOO_BAR=1".into()));
    }

    #[test]
    fn boolean_flags_take_a_value_as_etcds_do() {
        let cfg = |extra: &[&str]| {
            let mut argv = vec!["meshkv"];
            argv.extend_from_slice(extra);
            let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            cli.serve.into_config()
        };
        for (given, want) in [
            (&["--client-cert-auth"][..], true),
            (&["--client-cert-auth=true"], true),
            (&["--client-cert-auth=false"], false),
            (&[], false),
        ] {
            assert_eq!(cfg(given).unwrap().tls.client_cert_auth, want, "{given:?}");
        }
        let c = cfg(&["--experimental-initial-corrupt-check=true", "--experimental-corrupt-check-time=2h"]).unwrap();
        assert!(c.initial_corrupt_check);
        assert_eq!(c.corrupt_check_time, Duration::from_secs(7200));
        assert_eq!(cfg(&[]).unwrap().corrupt_check_time, Duration::ZERO, "no periodic check unless asked");
        assert_eq!(cfg(&["--experimental-corrupt-check-time=0"]).unwrap().corrupt_check_time, Duration::ZERO);
        assert!(cfg(&["--client-cert-auth=yes"]).unwrap_err().contains("is not a boolean"));
        assert!(cfg(&["--experimental-enable-lease-checkpoint-persist=true"]).unwrap().lease_checkpoint);
        assert!(!cfg(&["--experimental-enable-lease-checkpoint=false"]).unwrap().lease_checkpoint);
        let (args, _) = beyond(&[], None, &[("ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", "True")]).unwrap();
        assert_eq!(args, ["--experimental-initial-corrupt-check"]);
    }

    #[test]
    fn etcd_environment_variables_that_conflict_or_set_a_static_cluster_are_refused() {
        let e = beyond(&["--name", "a"], None, &[("ETCD_NAME", "b")]).unwrap_err();
        assert_eq!(
            e,
            "conflicting environment variable \"ETCD_NAME\" is shadowed by corresponding command-line flag \
             (either unset environment variable or disable flag)"
        );
        let e = beyond(&[], None, &[("ETCD_INITIAL_CLUSTER", "a=http://10.0.0.1:2380")]).unwrap_err();
        assert!(e.starts_with("ETCD_INITIAL_CLUSTER: meshkv members find each other through the mesh"), "{e}");
        let e = beyond(&[], None, &[("ETCD_CLIENT_CERT_AUTH", "yes")]).unwrap_err();
        assert!(e.contains("expected true or false"), "{e}");
    }

    /// A file as etcd's sample config writes one, in part.
    const ETCD_CONF: &str = "
name: 'm1'
data-dir: /var/lib/m1
snapshot-count: 10000
heartbeat-interval: 100
election-timeout: 1000
listen-client-urls: http://localhost:2379
initial-cluster:
initial-cluster-state: 'new'
client-transport-security:
  cert-file:
  key-file:
  client-cert-auth: false
  trusted-ca-file:
  auto-tls: false
peer-transport-security:
  cert-file:
auto-compaction-retention: 1
";

    #[test]
    fn etcds_config_file_sets_the_flags_and_the_environment_is_not_read() {
        let (args, notes) = beyond(&["--config-file", "x"], Some(ETCD_CONF), &[("ETCD_NAME", "ignored")]).unwrap();
        assert_eq!(
            args,
            [
                "--name=m1",
                "--data-dir=/var/lib/m1",
                "--snapshot-count=10000",
                "--heartbeat-interval=100",
                "--election-timeout=1000",
                "--listen-client-urls=http://localhost:2379",
                "--client-cert-auth=false",
                "--auto-tls=false",
                "--auto-compaction-retention=1"
            ]
        );
        let warned: Vec<&str> = notes.iter().filter(|(w, _)| *w).map(|(_, s)| s.as_str()).collect();
        let unknown = ["initial-cluster", "initial-cluster-state", "peer-transport-security"];
        assert_eq!(warned, unknown.map(|k| format!("config file FILE: unknown key {k} ignored")), "{notes:?}");
        assert_eq!(
            notes[0],
            (false, "loaded server configuration from FILE; environment variables are not read".into())
        );
    }

    /// The keys of etcd 3.4's sample config file that are not in `ETCD_CONF`.
    const ETCD_SAMPLE_REST: &str = "
max-snapshots: 5
max-wals: 5
cors:
discovery-fallback: 'proxy'
strict-reconfig-check: false
enable-v2: true
enable-pprof: true
proxy: 'off'
proxy-failure-wait: 5000
proxy-read-timeout: 0
debug: false
logger: zap
log-outputs: [stderr]
force-new-cluster: false
";

    #[test]
    fn etcds_sample_config_file_starts_a_member_with_its_settings() {
        let (args, notes) = beyond(&["--config-file", "x"], Some(ETCD_SAMPLE_REST), &[]).unwrap();
        assert_eq!(
            args,
            [
                "--max-snapshots=5",
                "--max-wals=5",
                "--strict-reconfig-check=false",
                "--enable-v2",
                "--enable-pprof",
                "--proxy=off",
                "--proxy-failure-wait=5000",
                "--proxy-read-timeout=0",
                "--debug=false",
                "--logger=zap",
                "--log-outputs=stderr",
                "--force-new-cluster=false"
            ]
        );
        let warned: Vec<&str> = notes.iter().filter(|(w, _)| *w).map(|(_, s)| s.as_str()).collect();
        let unknown = ["discovery-fallback"];
        assert_eq!(warned, unknown.map(|k| format!("config file FILE: unknown key {k} ignored")), "{notes:?}");
        let argv = std::iter::once("meshkv").chain(args.iter().map(String::as_str));
        let serve = Cli::try_parse_from(argv).unwrap().serve;
        assert!(!serve.strict_reconfig_check, "false from the file turns off what is on by default");
        let said = serve.etcd.notes().unwrap();
        assert!(said.iter().any(|n| n.starts_with("--enable-v2 has no effect")), "{said:?}");
        assert!(said.iter().any(|n| n.starts_with("--max-wals has no effect")), "{said:?}");
    }

    /// etcd 3.5's server flags (and 3.6's names for some): each is taken, and those that
    /// ask for something meshkv does not do are named in a warning.
    #[test]
    fn etcd_35s_server_flags_are_taken() {
        let line = [
            "meshkv",
            "--tls-min-version=TLS1.2",
            "--tls-max-version=TLS1.3",
            "--listen-client-http-urls=http://127.0.0.1:0",
            "--enable-grpc-gateway=true",
            "--experimental-max-learners=1",
            "--self-signed-cert-validity=1",
            "--client-cert-file=c.pem",
            "--client-key-file=c.key",
            "--socket-reuse-address=true",
            "--socket-reuse-port=true",
            "--unsafe-no-fsync",
            "--enable-log-rotation",
            "--log-rotation-config-json={}",
            "--experimental-warning-unary-request-duration=300ms",
            "--v2-deprecation=not-yet",
            "--experimental-compact-hash-check-enabled",
            "--experimental-compact-hash-check-time=1m",
            "--experimental-snapshot-catchup-entries=5000",
            "--experimental-wait-cluster-ready-timeout=5s",
            "--experimental-bootstrap-defrag-threshold-megabytes=0",
            "--experimental-memory-mlock=false",
            "--experimental-txn-mode-write-with-shared-buffer=true",
            "--experimental-stop-grpc-service-on-defrag=false",
            "--experimental-downgrade-check-time=5s",
            "--experimental-enable-distributed-tracing=false",
            "--experimental-distributed-tracing-address=localhost:4317",
            "--experimental-distributed-tracing-service-name=etcd",
            "--experimental-distributed-tracing-sampling-rate=0",
        ];
        let serve = Cli::try_parse_from(line).unwrap().serve;
        assert_eq!(serve.max_learners, Some(1));
        let notes = serve.etcd.notes().unwrap();
        let warned: Vec<&str> = notes.iter().map(|n| n.split(" has no effect").next().unwrap()).collect();
        assert_eq!(
            warned,
            [
                "--client-cert-file",
                "--socket-reuse-port",
                "--unsafe-no-fsync",
                "--enable-log-rotation",
                "--experimental-compact-hash-check-enabled",
                "--experimental-snapshot-catchup-entries",
                "--experimental-wait-cluster-ready-timeout",
                "--experimental-bootstrap-defrag-threshold-megabytes",
                "--experimental-txn-mode-write-with-shared-buffer",
                "--experimental-downgrade-check-time"
            ]
        );
        assert_eq!(
            etcd_only_flag(&["meshkv", "--peer-client-cert-file", "p.pem"]),
            Some(format!("--peer-client-cert-file is etcd's: {PEERS_ON_THE_MESH}"))
        );
    }

    #[test]
    fn etcds_flags_meshkv_has_no_use_for_are_refused_with_what_to_give_instead() {
        assert_eq!(
            etcd_only_flag(&["meshkv", "--name", "a", "--initial-cluster=a=http://10.0.0.1:2380"]),
            Some(format!("--initial-cluster is etcd's: {MESH_FORMS_THE_CLUSTER}"))
        );
        assert_eq!(
            etcd_only_flag(&["meshkv", "--peer-cert-file", "p.pem"]),
            Some(format!("--peer-cert-file is etcd's: {PEERS_ON_THE_MESH}"))
        );
        assert_eq!(etcd_only_flag(&["meshkv", "--name", "initial-cluster", "--data-dir", "d"]), None);
        assert_eq!(etcd_only_flag(&["meshkv", "--initial-cluster-x"]), None);
    }

    #[test]
    fn etcds_config_file_refuses_what_it_cannot_honour() {
        let e = beyond(&["--config-file", "x", "--name", "b"], Some("name: a\n"), &[]).unwrap_err();
        assert_eq!(e, "--name is given both on the command line and in FILE");
        let e = beyond(&["--config-file", "x"], Some("initial-cluster: a=http://10.0.0.1:2380\n"), &[]).unwrap_err();
        assert!(e.starts_with("initial-cluster: meshkv members find each other"), "{e}");
        let e = beyond(&["--config-file", "x"], Some("name: [a, {b: c}]\n"), &[]).unwrap_err();
        assert_eq!(e, "--config-file FILE: name: expected a value");
        let e = beyond(&["--config-file", "x"], Some("- a\n"), &[]).unwrap_err();
        assert_eq!(e, "--config-file FILE: expected a mapping of flag names to values");
    }
}

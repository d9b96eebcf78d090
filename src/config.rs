//! Server configuration: a plain struct with etcd's defaults and a `validate()` that
//! says what is wrong. The command line (in `main.rs`) only fills it in.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Everything a member needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Name of this member and mesh peer; the member id is derived from it, so it is
    /// stable. Empty: the name kept in the data dir, else "default" for a lone member,
    /// else a generated one (kept in the data dir from then on).
    pub name: String,
    /// Where RocksDB keeps this member's data.
    pub data_dir: PathBuf,
    /// URLs to serve clients on (http://host:port).
    pub listen_client_urls: Vec<String>,
    /// Client URLs told to clients (member list); defaults to the listen URLs.
    pub advertise_client_urls: Vec<String>,
    /// URLs to serve only `/metrics` and the health endpoints on, as etcd's
    /// --listen-metrics-urls (the client URLs serve them too).
    pub listen_metrics_urls: Vec<String>,
    /// Where the plain-HTTP endpoints and the JSON gateway are served instead of on the
    /// client URLs, which then serve gRPC only (etcd's --listen-client-http-urls).
    pub listen_client_http_urls: Vec<String>,
    /// Serve the JSON gateway (etcd's --enable-grpc-gateway, on by default).
    pub enable_grpc_gateway: bool,
    /// Most learners at once, as etcd's --experimental-max-learners; None: no limit.
    pub max_learners: Option<usize>,
    /// URLs the member serves peers (the mesh) on.
    pub listen_peer_urls: Vec<String>,
    /// The peer URL other members dial (as etcd's --initial-advertise-peer-urls);
    /// defaults to the bound listen address.
    pub advertise_peer_url: Option<String>,
    /// Mesh peers to join (host:port); any one member of the cluster will do.
    pub join: Vec<String>,
    /// Peers of other clusters are refused at the mesh handshake.
    pub cluster_name: String,
    /// File holding the shared mesh secret; peers without it are refused.
    pub mesh_secret_file: Option<PathBuf>,
    /// A fresh member waits until this many members (itself included) see each other in
    /// the mesh, then they form a new cluster together. 0 or 1: no waiting.
    pub bootstrap_expect: usize,
    /// Voters the cluster keeps; further members stay learners.
    pub voters: usize,
    /// A voter unreachable this long is replaced by a caught-up learner.
    pub dead_member_timeout: Duration,
    /// Applied entries kept in the Raft log behind the applied index; a member further
    /// behind catches up from a snapshot (as etcd's --snapshot-count).
    pub snapshot_count: u64,
    /// Failure drills: mesh peers whose traffic is dropped, as if the link were cut.
    pub mesh_block_peers: Vec<String>,
    /// Failure drills: a file naming (one per line) peers whose traffic is dropped,
    /// re-read while the member runs.
    pub mesh_block_file: Option<PathBuf>,
    /// Deliberately broken read path (linearizable reads served locally), for showing
    /// that the fault harness catches stale reads. Never for real use.
    pub unsafe_no_read_index: bool,
    /// Deliberately broken lease clock (leases end at half their TTL), for showing that
    /// the fault harness catches leases that end too soon. Never for real use.
    pub unsafe_lease_half_ttl: bool,
    /// Deliberately broken Lock and Campaign (they return without waiting for the holders
    /// and candidates before), for showing that the fault harness catches a lock held
    /// twice and two leaders at once. Never for real use.
    pub unsafe_no_wait_turn: bool,
    /// The newest mesh protocol this member announces: its build's, or another in an
    /// upgrade drill that plays a newer build beside older ones.
    pub mesh_protocol: u32,
    /// Largest request accepted, in bytes, as etcd's --max-request-bytes.
    pub max_request_bytes: usize,
    /// Most operations in one Txn, as etcd's --max-txn-ops.
    pub max_txn_ops: usize,
    /// Certificates for `https://` client (and metrics) URLs, as etcd's --cert-file,
    /// --key-file, --trusted-ca-file and --client-cert-auth.
    pub tls: crate::tls::TlsFiles,
    /// The store's space quota, as etcd's --quota-backend-bytes: 0 for the default
    /// (2 GiB), negative for none.
    pub quota_backend_bytes: i64,
    /// How long an auth token lives without use, as etcd's --auth-token-ttl.
    pub auth_token_ttl: Duration,
    /// JWT tokens (`--auth-token jwt,…`); None: etcd's simple tokens.
    pub jwt: Option<crate::store::jwt::JwtOptions>,
    /// bcrypt's cost for the passwords of new users, as etcd's --bcrypt-cost.
    pub bcrypt_cost: u32,
    /// Time between Raft heartbeats.
    pub heartbeat_interval: Duration,
    /// Time without a leader before an election.
    pub election_timeout: Duration,
    /// How often a watcher that asked for progress notifications hears the revision.
    pub watch_progress_notify_interval: Duration,
    /// The leader compacts the history by itself, as etcd's --auto-compaction-mode and
    /// --auto-compaction-retention; None: only clients compact.
    pub auto_compaction: Option<AutoCompaction>,
    /// Compare the store's hash with the other members' before serving, as etcd's
    /// --experimental-initial-corrupt-check.
    pub initial_corrupt_check: bool,
    /// How often the leader compares the members' hashes, as etcd's
    /// --experimental-corrupt-check-time; zero: never.
    pub corrupt_check_time: Duration,
    /// The leader checkpoints the time left of long leases through Raft, so that a new
    /// leader does not start them over (etcd's --experimental-enable-lease-checkpoint;
    /// on by default here, and kept in the store).
    pub lease_checkpoint: bool,
    /// How often it does, as etcd's (five minutes).
    pub lease_checkpoint_interval: Duration,
    /// Refuse to remove a voter when the voters left that this member reaches would be
    /// fewer than a quorum, as etcd's --strict-reconfig-check (on by default).
    pub strict_reconfig_check: bool,
    /// Raft's pre-vote phase, as etcd's --pre-vote (on by default here).
    pub pre_vote: bool,
    /// How long a client connection may be idle before the member pings it, as etcd's
    /// --grpc-keepalive-interval (2 h); zero for never.
    pub grpc_keepalive_interval: Duration,
    /// How long the member waits for a ping's answer before it closes the connection,
    /// as etcd's --grpc-keepalive-timeout (20 s).
    pub grpc_keepalive_timeout: Duration,
    /// Most concurrent streams (calls) one client connection may have open, as etcd's
    /// --max-concurrent-streams.
    pub max_concurrent_streams: u32,
    /// Applying a batch of entries that takes longer is logged as a warning, as etcd's
    /// --experimental-warning-apply-duration (100 ms).
    pub warning_apply_duration: Duration,
    /// A unary gRPC call that takes longer to answer is logged as a warning, as etcd's
    /// --experimental-warning-unary-request-duration (300 ms); zero: never.
    pub warning_unary_request_duration: Duration,
    /// The origins whose scripts may call the plain-HTTP endpoints and the JSON gateway,
    /// as etcd's --cors; empty or `*`: any.
    pub cors: Vec<String>,
    /// The host names a plain-HTTP request (not over TLS) may name, as etcd's
    /// --host-whitelist; empty or `*`: any.
    pub host_whitelist: Vec<String>,
    /// etcd's --force-new-cluster: a member whose cluster lost its quorum for good starts
    /// as the only member of a new cluster, with its data.
    pub force_new_cluster: bool,
    pub log_level: String,
}

/// How much history the leader keeps when it compacts by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this long a stretch of history.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

impl AutoCompaction {
    /// etcd's two flags: `mode` is `periodic` or `revision`; `retention` is 0 (off), a
    /// whole number (hours for `periodic`, revisions for `revision`), or for `periodic`
    /// a duration (`30m`, `1h30m`). The errors are etcd's.
    pub fn parse(mode: &str, retention: &str) -> Result<Option<Self>, String> {
        let revision = match mode {
            "periodic" => false,
            "revision" => true,
            _ => return Err(format!("unknown auto-compaction-mode {mode:?}; use periodic or revision")),
        };
        let r = retention.trim();
        if let Ok(n) = r.parse::<u32>() {
            return Ok(match (n, revision) {
                (0, _) => None,
                (n, true) => Some(Self::Revision(n.into())),
                (n, false) => Some(Self::Periodic(Duration::from_secs(u64::from(n) * 3600))),
            });
        }
        let bad = |why: String| format!("error parsing CompactionRetention: {why}");
        if revision {
            return Err(bad(format!("{r:?} is not a whole number of revisions")));
        }
        if r.parse::<f64>().is_ok() {
            return Err(bad(format!("invalid duration {r:?}: hours must be whole; else give a unit (30m, 1h30m)")));
        }
        parse_duration(r).map(|d| Some(Self::Periodic(d))).map_err(bad)
    }
}

/// A duration as etcd's flags take it, in Go's form: numbers with units, as in 500ms,
/// 10s, 1h30m (units ns, us, ms, s, m, h); a bare number is seconds. Must be positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let invalid = |why: &str| format!("invalid duration {s:?}{why}");
    let secs = match s.parse::<f64>() {
        Ok(n) => n,
        Err(_) => {
            let (mut secs, mut rest) = (0.0, s);
            while !rest.is_empty() {
                let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
                let (n, tail) = rest.split_at(digits);
                let letters = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
                let (unit, tail) = tail.split_at(letters);
                let n: f64 = n.parse().map_err(|_| invalid(""))?;
                secs += n * match unit {
                    "ns" => 1e-9,
                    "us" | "µs" => 1e-6,
                    "ms" => 1e-3,
                    "s" => 1.0,
                    "m" => 60.0,
                    "h" => 3600.0,
                    _ => return Err(invalid(": use ns, us, ms, s, m or h")),
                };
                rest = tail;
            }
            secs
        }
    };
    if !(secs > 0.0 && secs.is_finite() && secs < 1e12) {
        return Err(invalid(": must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// As [`parse_duration`], where zero (`0`, `0s`) means "never".
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let number = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == 'µ');
    match number.parse::<f64>().is_ok_and(|n| n == 0.0) {
        true => Ok(Duration::ZERO),
        false => parse_duration(s),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "default".into(),
            data_dir: PathBuf::from("default.meshkv"),
            listen_client_urls: vec!["http://127.0.0.1:2379".into()],
            advertise_client_urls: vec![],
            listen_metrics_urls: vec![],
            listen_client_http_urls: vec![],
            enable_grpc_gateway: true,
            max_learners: None,
            listen_peer_urls: vec!["http://127.0.0.1:2380".into()],
            advertise_peer_url: None,
            join: vec![],
            cluster_name: "meshkv".into(),
            mesh_secret_file: None,
            bootstrap_expect: 0,
            voters: 3,
            dead_member_timeout: Duration::from_secs(30),
            snapshot_count: 10_000,
            mesh_block_peers: vec![],
            mesh_block_file: None,
            unsafe_no_read_index: false,
            unsafe_lease_half_ttl: false,
            unsafe_no_wait_turn: false,
            mesh_protocol: crate::mesh::secure::PROTOCOL_VERSION,
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            quota_backend_bytes: 0,
            auth_token_ttl: crate::store::auth::DEFAULT_TOKEN_TTL,
            jwt: None,
            bcrypt_cost: crate::api::auth::DEFAULT_BCRYPT_COST,
            tls: Default::default(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            watch_progress_notify_interval: Duration::from_secs(600),
            auto_compaction: None,
            initial_corrupt_check: false,
            corrupt_check_time: Duration::ZERO,
            lease_checkpoint: true,
            lease_checkpoint_interval: Duration::from_secs(300),
            strict_reconfig_check: true,
            pre_vote: true,
            grpc_keepalive_interval: Duration::from_secs(2 * 3600),
            grpc_keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: u32::MAX,
            warning_apply_duration: Duration::from_millis(100),
            warning_unary_request_duration: Duration::from_millis(300),
            cors: Vec::new(),
            host_whitelist: Vec::new(),
            force_new_cluster: false,
            log_level: "info".into(),
        }
    }
}

/// A configuration that cannot run, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    TlsVersion(String),
    #[error("--voters must be at least 1")]
    ZeroVoters,
    #[error("--drill-mesh-protocol {0} is older than the oldest protocol this build speaks ({1})")]
    DrillProtocol(u32, u32),
    #[error("--bootstrap-expect {0} needs --join, so the members can find each other")]
    BootstrapWithoutJoin(usize),
    #[error("--cluster-name must not be empty")]
    EmptyClusterName,
    #[error("--join {0:?}: expected host:port")]
    BadJoin(String),
    #[error("{flag}: {url:?} is not a URL this member can listen on: {why}")]
    BadUrl { flag: &'static str, url: String, why: String },
    #[error("--max-request-bytes must be at least 1")]
    ZeroRequestBytes,
    #[error("--max-txn-ops must be at least 1")]
    ZeroTxnOps,
    #[error("--election-timeout ({election} ms) must be at least 5 times --heartbeat-interval ({heartbeat} ms)")]
    Timeouts { election: u128, heartbeat: u128 },
    #[error("--log-level must be one of debug, info, warn, error (got {0:?})")]
    LogLevel(String),
    #[error("{flag} {url}: TLS needs --cert-file and --key-file")]
    TlsWithoutCertificate { flag: &'static str, url: String },
    #[error("--client-cert-auth needs --trusted-ca-file, the CAs that sign the clients' certificates")]
    ClientAuthWithoutCa,
    #[error(
        "--listen-peer-urls {0}: peers do not speak TLS; their traffic is encrypted by the mesh (--mesh-secret-file)"
    )]
    TlsPeer(String),
    #[error("--bcrypt-cost {0}: must be between 4 and 31")]
    BcryptCost(u32),
    #[error("--auth-token-ttl must be at least 1 second")]
    ZeroTokenTtl,
}

/// Whether a listen URL asks for TLS.
pub fn is_https(url: &str) -> bool {
    url.starts_with("https://")
}

/// Resolves `http://host:port` to socket addresses.
pub fn parse_listen_url(flag: &'static str, url: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let bad = |why: &str| ConfigError::BadUrl { flag, url: url.to_string(), why: why.to_string() };
    let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
        return Err(bad("expected http://host:port or https://host:port"));
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err(bad("a listen URL has no path"));
    }
    let addrs: Vec<SocketAddr> = hostport.to_socket_addrs().map_err(|e| bad(&e.to_string()))?.collect();
    if addrs.is_empty() {
        return Err(bad("the host resolves to no address"));
    }
    Ok(addrs)
}

impl Config {
    /// Checks the configuration as a whole.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster_name.is_empty() {
            return Err(ConfigError::EmptyClusterName);
        }
        if self.voters == 0 {
            return Err(ConfigError::ZeroVoters);
        }
        if self.bootstrap_expect > 1 && self.join.is_empty() {
            return Err(ConfigError::BootstrapWithoutJoin(self.bootstrap_expect));
        }
        for j in &self.join {
            let hostport = j.strip_prefix("http://").unwrap_or(j);
            if hostport.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(ConfigError::BadJoin(j.clone()));
            }
        }
        for u in &self.listen_client_urls {
            parse_listen_url("--listen-client-urls", u)?;
        }
        for u in &self.listen_peer_urls {
            parse_listen_url("--listen-peer-urls", u)?;
            if is_https(u) {
                return Err(ConfigError::TlsPeer(u.clone()));
            }
        }
        let urls = [
            ("--listen-client-urls", &self.listen_client_urls),
            ("--listen-metrics-urls", &self.listen_metrics_urls),
            ("--listen-client-http-urls", &self.listen_client_http_urls),
        ];
        for (flag, list) in urls {
            if let Some(url) = list.iter().find(|u| is_https(u)) {
                if self.tls.cert_file.is_none() || self.tls.key_file.is_none() {
                    return Err(ConfigError::TlsWithoutCertificate { flag, url: url.clone() });
                }
            }
        }
        if self.tls.client_cert_auth && self.tls.trusted_ca_file.is_none() {
            return Err(ConfigError::ClientAuthWithoutCa);
        }
        self.tls.versions().map_err(|e| ConfigError::TlsVersion(e.to_string()))?;
        for u in &self.listen_metrics_urls {
            parse_listen_url("--listen-metrics-urls", u)?;
        }
        for u in &self.listen_client_http_urls {
            parse_listen_url("--listen-client-http-urls", u)?;
        }
        if self.max_request_bytes == 0 {
            return Err(ConfigError::ZeroRequestBytes);
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError::ZeroTxnOps);
        }
        if self.election_timeout < self.heartbeat_interval * 5 || self.heartbeat_interval.is_zero() {
            return Err(ConfigError::Timeouts {
                election: self.election_timeout.as_millis(),
                heartbeat: self.heartbeat_interval.as_millis(),
            });
        }
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(ConfigError::BcryptCost(self.bcrypt_cost));
        }
        if self.auth_token_ttl.is_zero() {
            return Err(ConfigError::ZeroTokenTtl);
        }
        if !matches!(self.log_level.as_str(), "debug" | "info" | "warn" | "error" | "trace") {
            return Err(ConfigError::LogLevel(self.log_level.clone()));
        }
        let oldest = crate::mesh::secure::MIN_PROTOCOL_VERSION;
        if self.mesh_protocol < oldest {
            return Err(ConfigError::DrillProtocol(self.mesh_protocol, oldest));
        }
        Ok(())
    }

    /// The client URLs to advertise: the given ones, else the listen URLs.
    pub fn client_urls(&self) -> Vec<String> {
        if self.advertise_client_urls.is_empty() {
            self.listen_client_urls.clone()
        } else {
            self.advertise_client_urls.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_explain_themselves() {
        assert!(Config::default().validate().is_ok());
        let c = Config { listen_client_urls: vec!["127.0.0.1:2379".into()], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("expected http://host:port"));
        let c = Config { listen_client_urls: vec!["https://127.0.0.1:2379".into()], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("TLS needs --cert-file and --key-file"));
        let c = Config { listen_peer_urls: vec!["https://127.0.0.1:2380".into()], ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::TlsPeer(_))));
        let c = Config { election_timeout: Duration::from_millis(200), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Timeouts { .. })));
        let c = Config { mesh_protocol: 2, ..Default::default() };
        let says = "--drill-mesh-protocol 2 is older than the oldest protocol this build speaks (3)";
        assert_eq!(c.validate().unwrap_err().to_string(), says);
        assert_eq!(parse_listen_url("x", "http://127.0.0.1:0").unwrap().len(), 1);
    }
}

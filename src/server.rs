//! Wires a member together: engine → store → Raft driver → gRPC services, and stops them
//! in the reverse order.
//!
//! Shutdown: the signal stops the gRPC listeners (in-flight requests finish); dropping
//! the last Raft handle ends the driver thread after its current turn; RocksDB closes
//! when the last engine handle goes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::service::Routes;
use tonic::transport::Server;

use crate::api::{self, Ctx, Identity};
use crate::config::{is_https, parse_listen_url, Config, ConfigError};
use crate::mesh::{GossipData, Mesh, MeshConn};
use crate::pb::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer,
};
use crate::pb::v3electionpb::election_server::ElectionServer;
use crate::pb::v3lockpb::lock_server::LockServer;
use crate::raft::directory::{self, Directory};
use crate::raft::{member_id, node, Bootstrap, MeshTransport, RaftConfig, Transport};
use crate::store::engine::{Engine, EngineError, CF_META};
use crate::store::mvcc::META_CLUSTER_VERSION;
use crate::store::{MvccError, MvccStore};

/// gRPC framing and field overhead allowed on top of --max-request-bytes, as etcd does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

const META_CLUSTER_ID: &[u8] = b"cluster_id";
const META_MEMBER_ID: &[u8] = b"member_id";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the data dir: {0}")]
    Engine(#[from] EngineError),
    #[error("cannot open the store: {0}")]
    Store(#[from] MvccError),
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: SocketAddr, err: std::io::Error },
    #[error("the data dir belongs to member {stored:x}, not to member {wanted:x} named {name:?}: start with the name it was created with, or use another --data-dir")]
    MemberMismatch { stored: u64, wanted: u64, name: String },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot read --mesh-secret-file {path}: {err}")]
    Secret { path: String, err: std::io::Error },
    #[error("--mesh-secret-file {0} is empty")]
    EmptySecret(String),
    #[error("cannot keep the member name in {path}: {err}")]
    NameFile { path: String, err: std::io::Error },
    #[error(transparent)]
    Mesh(#[from] crate::mesh::runtime::MeshError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Jwt(#[from] crate::store::jwt::JwtError),
    /// The initial corruption check found this member's data unlike the others'.
    #[error("{0}")]
    Inconsistent(String),
    /// The Raft driver failed while serving.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// The member's name: given, or kept in the data dir from an earlier start, or
/// "default" for a lone member, or generated (a member that joins others needs a
/// name of its own). Whatever is chosen is kept in the data dir.
fn resolve_name(cfg: &Config) -> Result<String, ServerError> {
    let path = cfg.data_dir.join("name");
    let err = |err| ServerError::NameFile { path: path.display().to_string(), err };
    let kept = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(e)),
    };
    let name = if !cfg.name.is_empty() {
        cfg.name.clone()
    } else if let Some(k) = kept.clone() {
        k
    } else if cfg.join.is_empty() {
        "default".to_string()
    } else {
        format!("meshkv-{:08x}", rand::random::<u32>())
    };
    if kept.as_deref() != Some(name.as_str()) {
        std::fs::write(&path, format!("{name}\n")).map_err(err)?;
    }
    Ok(name)
}

async fn start_mesh(cfg: &Config, name: &str, cluster_id: Arc<AtomicU64>) -> Result<Mesh, ServerError> {
    let secret = match &cfg.mesh_secret_file {
        Some(p) => {
            let s = std::fs::read(p).map_err(|err| ServerError::Secret { path: p.display().to_string(), err })?;
            if s.iter().all(u8::is_ascii_whitespace) {
                return Err(ServerError::EmptySecret(p.display().to_string()));
            }
            Some(s)
        }
        None => None,
    };
    let listen = match cfg.listen_peer_urls.first() {
        Some(u) => parse_listen_url("--listen-peer-urls", u)?.first().copied(),
        None => None,
    };
    let mut mc = crate::mesh::MeshConfig::new(name);
    mc.nickname = name.to_string();
    mc.cluster = cfg.cluster_name.clone();
    mc.protocol = cfg.mesh_protocol;
    mc.secret = secret;
    mc.listen = listen;
    mc.join = cfg.join.iter().map(|j| j.strip_prefix("http://").unwrap_or(j).to_string()).collect();
    // Peers known before a restart, so that a member finds its cluster again without --join.
    for a in std::fs::read_to_string(cfg.data_dir.join(PEERS_FILE)).unwrap_or_default().lines() {
        let a = a.trim().to_string();
        if !a.is_empty() && !mc.join.contains(&a) {
            mc.join.push(a);
        }
    }
    mc.cluster_id = cluster_id;
    mc.advertise = cfg
        .advertise_peer_url
        .as_deref()
        .map(|u| u.strip_prefix("http://").unwrap_or(u).trim_end_matches('/').to_string());
    let channels: Vec<(String, Box<dyn GossipData>)> =
        vec![(directory::CHANNEL.to_string(), Box::new(Directory::default()))];
    let mesh = Mesh::start(mc, channels).await?;
    for p in &cfg.mesh_block_peers {
        tracing::warn!(peer = %p, "failure drill: all mesh traffic with this peer is dropped");
        mesh.block(p);
    }
    if let Some(path) = cfg.mesh_block_file.clone() {
        tokio::spawn(follow_block_file(mesh.clone(), path));
    }
    tokio::spawn(remember_peers(mesh.clone(), cfg.data_dir.join(PEERS_FILE)));
    tracing::info!("mesh peer {name} listening on {}", mesh.addr());
    Ok(mesh)
}

/// Where a member keeps the addresses of the peers it has seen.
const PEERS_FILE: &str = "peers";

/// Keeps the addresses of the mesh peers seen lately in `path`, for the next start.
async fn remember_peers(mesh: Mesh, path: std::path::PathBuf) {
    let mut last = String::new();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let mut addrs: Vec<String> =
            mesh.status().peers.into_iter().map(|p| p.addr).filter(|a| !a.is_empty()).collect();
        addrs.sort();
        addrs.dedup();
        let text = addrs.join("\n");
        if !addrs.is_empty() && text != last {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path)).is_ok() {
                last = text;
            }
        }
    }
}

/// Failure drills: follows the drill file at `path` as it changes. Each line names a peer:
/// `peer` drops all mesh traffic with it, both ways; `<peer` drops what arrives from it
/// (heartbeats excepted), a one-way loss.
async fn follow_block_file(mesh: Mesh, path: std::path::PathBuf) {
    type Drill = std::collections::BTreeSet<(bool, String)>;
    let mut active: Drill = Default::default();
    loop {
        let wanted: Drill = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| match l.strip_prefix('<') {
                Some(p) => (true, p.trim().to_string()),
                None => (false, l.to_string()),
            })
            .collect();
        for (one_way, p) in wanted.difference(&active) {
            if *one_way {
                tracing::warn!(peer = %p, "failure drill: mesh traffic from this peer is now dropped");
                mesh.deafen(p);
            } else {
                tracing::warn!(peer = %p, "failure drill: mesh traffic with this peer is now dropped");
                mesh.block(p);
            }
        }
        for (one_way, p) in active.difference(&wanted) {
            tracing::warn!(peer = %p, one_way, "failure drill: mesh traffic with this peer flows again");
            if *one_way {
                mesh.undeafen(p);
            } else {
                mesh.unblock(p);
            }
        }
        active = wanted;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Reads this member's ids; on a fresh data dir, decides how its Raft group starts
/// (alone, with the members it waited for, or by joining) and records the ids.
async fn identity(engine: &Engine, cfg: &Config, mesh: &Mesh) -> Result<(u64, u64, Bootstrap), ServerError> {
    let wanted = member_id(&cfg.name);
    let stored_member = engine.get_u64(CF_META, META_MEMBER_ID)?;
    let stored_cluster = engine.get_u64(CF_META, META_CLUSTER_ID)?.unwrap_or(0);
    if let Some(m) = stored_member {
        if m != wanted {
            return Err(ServerError::MemberMismatch { stored: m, wanted, name: cfg.name.clone() });
        }
        // Raft state exists: how it started no longer matters.
        return Ok((stored_cluster, m, Bootstrap::Join));
    }
    let (cluster, bootstrap) = if cfg.bootstrap_expect > 1 {
        let names = wait_for_peers(cfg, mesh).await;
        if names.is_empty() {
            // A member whose data was lost comes back fresh: it must not found its
            // cluster a second time.
            tracing::info!("the mesh peers belong to a formed cluster; joining it");
            (0, Bootstrap::Join)
        } else if names.contains(&cfg.name) {
            let mut h = blake2::Blake2s256::default();
            blake2::Digest::update(&mut h, cfg.cluster_name.as_bytes());
            for n in &names {
                blake2::Digest::update(&mut h, [0]);
                blake2::Digest::update(&mut h, n.as_bytes());
            }
            let d = blake2::Digest::finalize(h);
            let cluster = u64::from_be_bytes(d[..8].try_into().unwrap_or_default()).max(1);
            tracing::info!(members = ?names, "forming a new cluster");
            mesh.set_founders(&names);
            (cluster, Bootstrap::Voters(names.iter().map(|n| (member_id(n), n.clone())).collect()))
        } else {
            tracing::info!(members = ?names, "a new cluster forms without this member; joining it");
            (0, Bootstrap::Join)
        }
    } else if !cfg.join.is_empty() {
        (0, Bootstrap::Join)
    } else {
        (rand::random::<u64>().max(1), Bootstrap::Single)
    };
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(engine.cf(CF_META), META_MEMBER_ID, wanted.to_be_bytes());
    if cluster != 0 {
        batch.put_cf(engine.cf(CF_META), META_CLUSTER_ID, cluster.to_be_bytes());
    }
    engine.write(batch, true)?;
    Ok((cluster, wanted, bootstrap))
}

/// The space quota, logged as etcd logs it.
fn quota(bytes: i64, store: &MvccStore) -> api::quota::Quota {
    let q = api::quota::Quota::new(bytes, store.engine().clone());
    match q.limit() {
        None => tracing::warn!("disabling backend quota"),
        Some(limit) => {
            if limit > api::quota::MAX_RECOMMENDED_QUOTA_BYTES {
                tracing::warn!(
                    quota_size_bytes = limit,
                    quota_maximum_size_bytes = api::quota::MAX_RECOMMENDED_QUOTA_BYTES,
                    "quota exceeds the maximum value"
                );
            }
            tracing::info!(quota_size_bytes = limit, "enabled backend quota");
        }
    }
    q
}

/// A bound client or metrics listener, and its TLS if its URL is https.
struct Listener {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listener {
    fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

async fn bind(
    flag: &'static str,
    urls: &[String],
    acceptor: &Option<tokio_rustls::TlsAcceptor>,
) -> Result<Vec<Listener>, ServerError> {
    let mut out = Vec::new();
    for url in urls {
        for addr in parse_listen_url(flag, url)? {
            let listener = TcpListener::bind(addr).await.map_err(|err| ServerError::Listen { addr, err })?;
            out.push(Listener { listener, tls: acceptor.clone().filter(|_| is_https(url)) });
        }
    }
    Ok(out)
}

/// Waits until `--bootstrap-expect` members see each other; returns the names of the
/// members that form the cluster: the first N in name order, so every member that waited
/// picks the same ones. No names if a peer turns out to be a member of a formed cluster
/// that was not formed with this member.
async fn wait_for_peers(cfg: &Config, mesh: &Mesh) -> Vec<String> {
    let n = cfg.bootstrap_expect;
    tracing::info!("waiting for {} more members to form a cluster", n - 1);
    loop {
        if mesh.cluster_seen() != 0 {
            // Peers that saw this member formed the cluster with it before it saw them
            // all: it is a founder too. Any other fresh member, one whose data was lost
            // among them, joins.
            return mesh.founded_with_me().filter(|names| names.len() == n).unwrap_or_default();
        }
        let mut names: Vec<String> = mesh.reachable_peers().iter().map(|p| p.to_string()).collect();
        if names.len() + 1 >= n {
            names.push(cfg.name.clone());
            names.sort();
            names.truncate(n);
            return names;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs a member until `shutdown` resolves. `on_ready` receives the bound client
/// addresses once every listener is up (useful when a port was 0).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&[SocketAddr]),
) -> Result<(), ServerError> {
    cfg.validate()?;
    // Keys are read before anything is created, so that a wrong path leaves nothing behind.
    let jwt = cfg.jwt.as_ref().map(crate::store::jwt::Jwt::load).transpose()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| EngineError::Io { what: format!("making {}", cfg.data_dir.display()), source })?;
    let mut cfg = cfg;
    cfg.name = resolve_name(&cfg)?;
    if cfg.unsafe_no_read_index {
        tracing::error!("--unsafe-no-read-index: linearizable reads are NOT linearizable on this member");
    }
    if cfg.unsafe_lease_half_ttl {
        tracing::error!("--unsafe-lease-half-ttl: this member, as leader, ends leases at half their TTL");
    }
    if cfg.mesh_protocol != crate::mesh::secure::PROTOCOL_VERSION {
        tracing::warn!(
            protocol = cfg.mesh_protocol,
            "upgrade drill: this member announces another mesh protocol than its build's"
        );
    }
    if cfg.unsafe_no_wait_turn {
        tracing::error!("--unsafe-no-wait-turn: this member gives locks and leadership that others may hold");
    }
    let needs_tls = cfg
        .listen_client_urls
        .iter()
        .chain(&cfg.listen_metrics_urls)
        .chain(&cfg.listen_client_http_urls)
        .any(|u| is_https(u));
    let acceptor = match needs_tls {
        true => Some(tokio_rustls::TlsAcceptor::from(cfg.tls.server_config()?)),
        false => None,
    };
    let listeners = bind("--listen-client-urls", &cfg.listen_client_urls, &acceptor).await?;
    let metrics_listeners = bind("--listen-metrics-urls", &cfg.listen_metrics_urls, &acceptor).await?;
    let http_listeners = bind("--listen-client-http-urls", &cfg.listen_client_http_urls, &acceptor).await?;
    let url_of =
        |l: &Listener| l.local_addr().map(|a| format!("{}://{a}", if l.tls.is_some() { "https" } else { "http" }));
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr()).collect();
    let client_urls: Vec<String> = listeners.iter().filter_map(url_of).collect();
    let metrics_urls: Vec<String> = metrics_listeners.iter().filter_map(url_of).collect();
    let http_urls: Vec<String> = http_listeners.iter().filter_map(url_of).collect();
    if cfg.advertise_client_urls.is_empty() {
        // Advertise where clients can really connect (a port of 0 was chosen at bind).
        cfg.advertise_client_urls = client_urls.clone();
    }
    let engine = Engine::open(&cfg.data_dir)?;
    // Never downgraded: entries of a newer protocol may already be in the log.
    let cluster_version = engine.get_u64(CF_META, META_CLUSTER_VERSION)?.unwrap_or(0) as u32;
    if cluster_version > cfg.mesh_protocol {
        return Err(node::too_old(cluster_version, cfg.mesh_protocol).into());
    }
    let mut stored_cluster = engine.get_u64(CF_META, META_CLUSTER_ID)?.unwrap_or(0);
    let force_new_cluster = cfg.force_new_cluster && stored_cluster != 0;
    if force_new_cluster {
        // In use before the mesh starts: the old cluster's members, which may hold
        // entries this member never had, are refused as another cluster's from the first
        // handshake. It is stored with the forced changes to the log, in one write.
        let new = rand::random::<u64>().max(1);
        tracing::warn!(
            old = format!("{stored_cluster:x}"),
            new = format!("{new:x}"),
            "--force-new-cluster: a new cluster id"
        );
        stored_cluster = new;
    } else if cfg.force_new_cluster {
        tracing::warn!("--force-new-cluster has no effect: this data dir holds no cluster yet");
    }
    let cluster_id = Arc::new(AtomicU64::new(stored_cluster));
    let mesh = start_mesh(&cfg, &cfg.name, cluster_id.clone()).await?;
    let (cluster, member_id, bootstrap) = identity(&engine, &cfg, &mesh).await?;
    let cluster = if force_new_cluster { stored_cluster } else { cluster };
    cluster_id.store(cluster, Ordering::Release);
    crate::raft::snapshot::recover(&engine)?;
    let tokens = crate::store::auth::Tokens::new(cfg.auth_token_ttl).with_jwt(jwt);
    let store = Arc::new(MvccStore::open_with(engine.clone(), tokens)?);
    tracing::info!(
        name = %cfg.name, member = format!("{member_id:x}"), cluster = format!("{cluster:x}"),
        revision = store.revision(), applied = store.applied_index(), "store opened"
    );

    let mut rcfg = RaftConfig::new(member_id, cfg.name.clone());
    rcfg.tick = cfg.heartbeat_interval;
    rcfg.election_ticks = (cfg.election_timeout.as_millis() / cfg.heartbeat_interval.as_millis()).max(2) as usize;
    rcfg.max_request_bytes = cfg.max_request_bytes;
    rcfg.membership.voters = cfg.voters;
    rcfg.membership.max_learners = cfg.max_learners.unwrap_or(usize::MAX);
    rcfg.log_keep = cfg.snapshot_count;
    // A member whose store may differ from the others' must not lead (and send it in
    // snapshots) before the check has compared them.
    rcfg.hold_campaigns = cfg.initial_corrupt_check;
    rcfg.membership.dead_member_timeout = cfg.dead_member_timeout;
    rcfg.strict_reconfig_check = cfg.strict_reconfig_check;
    rcfg.pre_vote = cfg.pre_vote;
    rcfg.warning_apply_duration = cfg.warning_apply_duration;
    rcfg.force_new_cluster = force_new_cluster;
    rcfg.protocol = cfg.mesh_protocol;
    let snapshots = node::Snapshots {
        outgoing: Arc::new(crate::raft::snapshot::Outgoing::new(cfg.data_dir.join("snap-out"))),
        incoming: Arc::new(crate::raft::snapshot::Incoming::new(cfg.data_dir.join("snap-in"))),
    };
    let transport = MeshTransport::new(
        MeshConn::new(mesh.clone()),
        snapshots.outgoing.clone(),
        snapshots.incoming.clone(),
        store.clone(),
    );
    let started = node::start(
        rcfg,
        engine.clone(),
        store.clone(),
        Some(transport.clone() as Arc<dyn Transport>),
        bootstrap,
        cluster_id,
        snapshots,
    )?;
    transport.set_incarnation(started.incarnation);
    tokio::spawn(transport.clone().receive(started.handle.clone()));
    // Where this member serves, and which start of its data this is.
    let entry = |d: &mut Directory| d.publish(&cfg.name, cfg.client_urls(), started.incarnation, cfg.mesh_protocol);
    if let Some(d) = mesh.with_channel::<Directory, _>(directory::CHANNEL, entry) {
        mesh.broadcast(directory::CHANNEL, d);
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = Ctx {
        stop: stop_rx.clone(),
        id: Arc::new(Identity {
            member_id,
            name: cfg.name.clone(),
            peer_urls: cfg.listen_peer_urls.clone(),
            client_urls: cfg.client_urls(),
        }),
        raft: started.handle,
        store: store.clone(),
        mesh: mesh.clone(),
        max_txn_ops: cfg.max_txn_ops,
        quota: Arc::new(quota(cfg.quota_backend_bytes, &store)),
        unsafe_no_read_index: cfg.unsafe_no_read_index,
        unsafe_no_wait_turn: cfg.unsafe_no_wait_turn,
        leader: api::leader::LeaderLink::new(transport.clone()),
    };

    let raft_status = ctx.raft.clone();
    let status = ctx.raft.shared_status();
    tokio::spawn(async move {
        let removed = async {
            while !raft_status.status().removed.load(Ordering::Acquire) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            tracing::error!("this member was removed from the cluster; stopping");
        };
        // A driver that failed serves nothing more: the process ends, and says why.
        let failed = async {
            while raft_status.status().failure().is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = removed => {}
            _ = failed => {}
        }
        let _ = stop_tx.send(true);
    });
    let decode_limit = cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let checkpoints = cfg.lease_checkpoint.then_some(cfg.lease_checkpoint_interval);
    let lessor = api::lease::Lessor::start(ctx.clone(), cfg.election_timeout, checkpoints, cfg.unsafe_lease_half_ttl);
    // Held here while the member serves: the transport, which the Raft driver holds,
    // keeps only a weak reference to it and its Raft handles.
    let answerer = api::leader::Answerer::new(ctx.clone(), lessor.clone(), cfg.election_timeout);
    transport.answer_leader_calls(Arc::downgrade(&(answerer.clone() as Arc<dyn crate::raft::transport::LeaderCalls>)));
    if let Some(mode) = cfg.auto_compaction {
        api::compactor::start(ctx.clone(), mode);
    }
    if cfg.initial_corrupt_check {
        api::corruption::initial_check(&ctx, &transport).await.map_err(ServerError::Inconsistent)?;
        let _ = ctx.raft.campaign();
    }
    if !cfg.corrupt_check_time.is_zero() {
        api::corruption::start(ctx.clone(), transport.clone(), cfg.corrupt_check_time);
    }
    let metrics = api::metrics::Metrics::new(&ctx);
    let http = api::http::Http::new(ctx.clone(), metrics.clone());
    let mut grpc = Routes::builder();
    grpc.add_service(api::unary_wire::KvServer::new(api::kv::KvService::new(ctx.clone()), decode_limit))
        .add_service(api::watch_wire::WatchServer::new(
            api::watch::WatchService::new(
                ctx.clone(),
                cfg.watch_progress_notify_interval,
                cfg.max_request_bytes,
                metrics.watch_streams.clone(),
            ),
            decode_limit,
        ))
        .add_service(
            LeaseServer::new(api::lease::LeaseService::new(ctx.clone(), lessor.clone(), cfg.election_timeout))
                .max_decoding_message_size(decode_limit),
        )
        .add_service(ClusterServer::new(api::cluster::ClusterService::new(ctx.clone())))
        .add_service(MaintenanceServer::new(api::maintenance::MaintenanceService::new(ctx.clone())))
        .add_service(AuthServer::new(api::auth::AuthService::new(ctx.clone(), cfg.bcrypt_cost)))
        .add_service(LockServer::new(api::lock::LockService::new(ctx.clone())))
        .add_service(ElectionServer::new(api::election::ElectionService::new(ctx.clone())))
        .add_service(crate::pb::meshkvpb::admin_server::AdminServer::new(api::admin::AdminService::new(ctx.clone())))
        .add_service(crate::pb::grpc_health::health_server::HealthServer::new(api::grpc_health::HealthService::new(
            ctx.clone(),
        )));
    // The plain endpoints and the JSON gateway beside gRPC, as etcd serves them on its
    // client URLs.
    // The gateway's calls are counted as gRPC calls, as etcd's gateway, a gRPC client of
    // its own member, is: the streaming ones go through the counted gRPC routes, the unary
    // ones count themselves.
    let grpc = grpc.routes().into_axum_router().layer(metrics.grpc_layer(cfg.warning_unary_request_duration));
    let gateway = api::gateway::router(
        ctx.clone(),
        lessor.clone(),
        cfg.election_timeout,
        cfg.bcrypt_cost,
        grpc.clone(),
        &metrics,
    );
    let access = api::access::Access::new(&cfg.cors, &cfg.host_whitelist, cfg.tls.client_cert_auth, ctx.store.clone());
    let plain = match cfg.enable_grpc_gateway {
        true => http.router().merge(api::access::v3beta(gateway)),
        false => http.router(),
    };
    let plain = access.guard(plain);
    let unknown = access.guard(axum::Router::new().fallback(api::http::not_found));
    // With --listen-client-http-urls, the client URLs serve gRPC alone and those URLs
    // the rest, as etcd's do.
    let (client_routes, http_routes) = match http_listeners.is_empty() {
        true => (Routes::from(grpc.merge(plain).fallback_service(unknown)), None),
        false => {
            (Routes::from(grpc.fallback_service(unknown.clone())), Some(Routes::from(plain.fallback_service(unknown))))
        }
    };
    let metrics_routes = Routes::from(api::access::whole_bodies(http.router().fallback(api::http::not_found)));
    let mut servers = Vec::new();
    let listening = listeners
        .into_iter()
        .map(|l| (l, &client_routes))
        .chain(metrics_listeners.into_iter().map(|l| (l, &metrics_routes)))
        .chain(http_listeners.into_iter().filter_map(|l| Some((l, http_routes.as_ref()?))));
    for (listener, routes) in listening {
        // HTTP/1.1 too, for the plain endpoints: probes and scrapers speak it.
        let keepalive = (!cfg.grpc_keepalive_interval.is_zero()).then_some(cfg.grpc_keepalive_interval);
        let router = Server::builder()
            .tcp_nodelay(true)
            .accept_http1(true)
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout((!cfg.grpc_keepalive_timeout.is_zero()).then_some(cfg.grpc_keepalive_timeout))
            // Unlimited (etcd's default, math.MaxUint32) is h2's own default: not sent.
            .max_concurrent_streams((cfg.max_concurrent_streams != u32::MAX).then_some(cfg.max_concurrent_streams))
            .add_routes(routes.clone());
        let mut stop = stop_rx.clone();
        let incoming = crate::tls::incoming(listener.listener, listener.tls)
            .map(|conn| conn.map(|c| api::conn::Coalesced::serving(api::authority::LenientAuthority::new(c))));
        servers.push(tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    for u in &metrics_urls {
        tracing::info!("serving metrics and health on {u}");
    }
    for u in &http_urls {
        tracing::info!("serving client HTTP (health, metrics, the JSON gateway) on {u}");
    }
    // Only the servers may keep Raft handles now: the driver stops once they are gone.
    drop((client_routes, metrics_routes, http_routes, http, ctx, lessor));
    // Ready once this member is in its own configuration, as etcd is once it published
    // itself: before, it would list no members and could serve nothing.
    let mut stopped = stop_rx.clone();
    let member = async {
        while !status.is_member() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        _ = member => {
            for u in &client_urls {
                tracing::info!("ready to serve client requests on {u}");
            }
            on_ready(&bound);
        }
        _ = stopped.wait_for(|s| *s) => {}
    }

    for s in servers {
        match s.await {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "client listener task failed"),
        }
    }
    drop(answerer);
    tracing::info!("client listeners stopped; stopping raft");
    mesh.shutdown();
    // Joined off the runtime's threads: the tasks still holding Raft handles must be
    // able to run to their end, or the driver never sees its queue close.
    let thread = started.thread;
    if !matches!(tokio::task::spawn_blocking(move || thread.join()).await, Ok(Ok(()))) {
        tracing::error!("raft driver panicked");
    }
    match status.failure() {
        Some(why) => Err(ServerError::Stopped(why)),
        None => Ok(()),
    }
}

//! Wires a member together: engine → store → Raft driver → gRPC services, and stops them
//! in the reverse order.
//!
//! Shutdown: the signal stops the gRPC listeners (in-flight requests finish); dropping
//! the last Raft handle ends the driver thread after its current turn; RocksDB closes
//! when the last engine handle goes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::api::{self, Ctx, Identity};
use crate::config::{parse_listen_url, Config, ConfigError};
use crate::pb::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::pb::v3electionpb::election_server::ElectionServer;
use crate::pb::v3lockpb::lock_server::LockServer;
use crate::raft::{node, RaftConfig};
use crate::store::engine::{Engine, EngineError, CF_META};
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

async fn start_mesh(cfg: &Config, name: &str) -> Result<crate::mesh::Mesh, ServerError> {
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
    mc.secret = secret;
    mc.listen = listen;
    mc.join = cfg.join.iter().map(|j| j.strip_prefix("http://").unwrap_or(j).to_string()).collect();
    let mesh = crate::mesh::Mesh::start(mc, Vec::new()).await?;
    tracing::info!("mesh peer {name} listening on {}", mesh.addr());
    Ok(mesh)
}

/// A member id from a name: stable across restarts, never zero (raft-rs reserves 0).
pub fn member_id_from_name(name: &str) -> u64 {
    // FNV-1a, 64 bit: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// Reads this member's cluster and member ids, creating them on a fresh data dir.
fn identity(engine: &Engine, cfg: &Config) -> Result<(u64, u64), ServerError> {
    let wanted = member_id_from_name(&cfg.name);
    let stored_member = engine.get_u64(CF_META, META_MEMBER_ID)?;
    let stored_cluster = engine.get_u64(CF_META, META_CLUSTER_ID)?;
    match (stored_member, stored_cluster) {
        (Some(m), _) if m != wanted => Err(ServerError::MemberMismatch { stored: m, wanted, name: cfg.name.clone() }),
        (Some(m), Some(c)) => Ok((c, m)),
        _ => {
            let cluster = rand::random::<u64>().max(1);
            let mut batch = rocksdb::WriteBatch::default();
            batch.put_cf(engine.cf(CF_META), META_MEMBER_ID, wanted.to_be_bytes());
            batch.put_cf(engine.cf(CF_META), META_CLUSTER_ID, cluster.to_be_bytes());
            engine.write(batch, true)?;
            Ok((cluster, wanted))
        }
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
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| EngineError::Corrupt { cf: "data dir", what: format!("{}: {e}", cfg.data_dir.display()) })?;
    let mut cfg = cfg;
    cfg.name = resolve_name(&cfg)?;
    let engine = Engine::open(&cfg.data_dir)?;
    let (cluster_id, member_id) = identity(&engine, &cfg)?;
    let store = Arc::new(MvccStore::open(engine.clone())?);
    tracing::info!(
        name = %cfg.name, member = format!("{member_id:x}"), cluster = format!("{cluster_id:x}"),
        revision = store.revision(), applied = store.applied_index(), "store opened"
    );

    let mut rcfg = RaftConfig::new(member_id);
    rcfg.tick = cfg.heartbeat_interval;
    rcfg.election_ticks = (cfg.election_timeout.as_millis() / cfg.heartbeat_interval.as_millis()).max(2) as usize;
    rcfg.max_request_bytes = cfg.max_request_bytes;
    let started = node::start(rcfg, engine.clone(), store.clone())?;

    let ctx = Ctx {
        id: Arc::new(Identity {
            cluster_id,
            member_id,
            name: cfg.name.clone(),
            peer_urls: cfg.listen_peer_urls.clone(),
            client_urls: cfg.client_urls(),
        }),
        raft: started.handle,
        store,
        max_txn_ops: cfg.max_txn_ops,
    };

    // The mesh carries no Raft traffic while the cluster is one member; it runs so that
    // peers can find this member.
    let mesh = start_mesh(&cfg, &cfg.name).await?;

    let mut listeners = Vec::new();
    for url in &cfg.listen_client_urls {
        for addr in parse_listen_url("--listen-client-urls", url)? {
            let l = TcpListener::bind(addr).await.map_err(|err| ServerError::Listen { addr, err })?;
            listeners.push(l);
        }
    }
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let decode_limit = cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let mut servers = Vec::new();
    for listener in listeners {
        let router = Server::builder()
            .tcp_nodelay(true)
            .add_service(KvServer::new(api::kv::KvService::new(ctx.clone())).max_decoding_message_size(decode_limit))
            .add_service(WatchServer::new(api::watch::WatchService).max_decoding_message_size(decode_limit))
            .add_service(LeaseServer::new(api::lease::LeaseService).max_decoding_message_size(decode_limit))
            .add_service(ClusterServer::new(api::cluster::ClusterService::new(ctx.clone())))
            .add_service(MaintenanceServer::new(api::maintenance::MaintenanceService::new(ctx.clone())))
            .add_service(AuthServer::new(api::auth::AuthService::new(ctx.clone())))
            .add_service(LockServer::new(api::lock::LockService))
            .add_service(ElectionServer::new(api::election::ElectionService));
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    drop(ctx);
    for a in &bound {
        tracing::info!("ready to serve client requests on http://{a}");
    }
    on_ready(&bound);

    for s in servers {
        match s.await {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "client listener task failed"),
        }
    }
    tracing::info!("client listeners stopped; stopping raft");
    mesh.shutdown();
    if started.thread.join().is_err() {
        tracing::error!("raft driver panicked");
    }
    Ok(())
}

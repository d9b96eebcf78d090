//! meshkv: an etcd-v3-compatible key-value store whose Raft traffic rides a gossip mesh.
//!
//! The request path:
//! `api` (tonic services) → `raft` (proposals, ReadIndex) → `store` (MVCC on RocksDB).
//! Lower layers never call upward: `store` knows nothing of Raft or gRPC, and `raft`
//! knows nothing of gRPC.

pub mod api;
pub mod bench;
pub mod config;
pub mod mesh;
pub mod pb;
pub mod raft;
pub mod server;
pub mod store;
pub mod tls;
pub mod torture;

/// The etcd version meshkv reports in Maintenance.Status. Clients such as Kubernetes
/// read it to decide which features (for example watch progress requests) to use.
pub const ETCD_COMPAT_VERSION: &str = "3.5.17";

//! Durable state of one member: the RocksDB engine, the MVCC key-value store on it, its
//! leases, and the hub that publishes its changes to watchers.
//!
//! This layer owns bytes on disk and their meaning. It must never touch the network or
//! an async runtime: callers (the Raft driver, the API) hand it plain requests.

pub mod alarm;
pub mod auth;
pub mod backup;
pub mod bolt;
pub mod engine;
pub mod etcd_snapshot;
pub mod jwt;
pub mod lease;
pub mod mvcc;
pub mod watch;

pub use engine::{Engine, EngineError};
pub use mvcc::{MvccError, MvccStore};

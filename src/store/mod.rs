//! Durable state of one member: the RocksDB engine and the MVCC key-value store on it.
//!
//! This layer owns bytes on disk and their meaning. It must never touch the network or
//! an async runtime: callers (the Raft driver, the API) hand it plain requests.

pub mod engine;
pub mod mvcc;

pub use engine::{Engine, EngineError};
pub use mvcc::{MvccError, MvccStore};

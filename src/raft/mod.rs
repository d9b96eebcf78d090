//! Consensus: the Raft driver (raft-rs `RawNode` and its Ready loop) and the Raft log
//! storage on RocksDB.
//!
//! The API hands this layer writes and read-index requests through a [`RaftHandle`];
//! committed writes are applied to the store here, and each proposer is answered with
//! the outcome of its own entry.

pub mod log_store;
pub mod logger;
pub mod node;

pub use node::{RaftConfig, RaftHandle, RaftStatus, Started};

use crate::store::MvccError;

/// Why a proposal or a read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("request is too large")]
    TooLarge,
    #[error("too many requests")]
    TooManyRequests,
    #[error("server stopped")]
    Stopped,
    #[error("no leader")]
    NoLeader,
    #[error("request timed out")]
    Timeout,
    #[error(transparent)]
    Apply(#[from] MvccError),
}

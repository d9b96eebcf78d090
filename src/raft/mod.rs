//! Consensus: the Raft driver (raft-rs `RawNode` and its Ready loop) and the Raft log
//! storage on RocksDB, made durable by a write-ahead file of its own (`wal`).
//!
//! The API hands this layer writes and read-index requests through a [`RaftHandle`];
//! committed writes are applied to the store here, and each proposer is answered with
//! the outcome of its own entry.

pub mod directory;
pub mod log_store;
pub mod logger;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod snapshot;
pub mod transport;
pub mod wal;

pub use metrics::RaftMetrics;
pub use node::{Bootstrap, Membership, RaftConfig, RaftHandle, RaftStatus, Started, Transport};
pub use transport::{member_id, MeshTransport};

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
    #[error("member not found")]
    MemberNotFound,
    #[error("can only promote a learner member")]
    NotLearner,
    /// A learner too far behind the leader's log to be promoted.
    #[error("can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// A membership change that would leave fewer active voters than a quorum.
    #[error("unhealthy cluster")]
    Unhealthy,
    /// Only the leader can judge this (how far a learner has caught up).
    #[error("not leader")]
    NotLeader,
    #[error(transparent)]
    Apply(#[from] MvccError),
}

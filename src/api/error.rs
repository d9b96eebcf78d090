//! etcd's error messages and gRPC codes, in one place. Every error that reaches a client
//! passes through here, so the words match what etcd clients test for.

use tonic::{Code, Status};

use crate::raft::RaftError;
use crate::store::MvccError;

/// A request rejected before it reaches Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("key is not provided")]
    EmptyKey,
    /// An empty operation in a Txn: etcd answers "key not found".
    #[error("key not found")]
    EmptyOp,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("too many operations in txn request")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
}

fn etcd(code: Code, msg: &str) -> Status {
    Status::new(code, format!("etcdserver: {msg}"))
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        etcd(Code::InvalidArgument, &e.to_string())
    }
}

impl From<MvccError> for Status {
    fn from(e: MvccError) -> Self {
        match e {
            MvccError::Compacted => etcd(Code::OutOfRange, "mvcc: required revision has been compacted"),
            MvccError::FutureRev => etcd(Code::OutOfRange, "mvcc: required revision is a future revision"),
            MvccError::KeyNotFound => etcd(Code::InvalidArgument, "key not found"),
            MvccError::LeaseNotFound => etcd(Code::NotFound, "requested lease not found"),
            MvccError::LeaseExists => etcd(Code::FailedPrecondition, "lease already exists"),
            MvccError::NoSpace => no_space(),
            MvccError::CorruptAlarm => etcd(Code::DataLoss, "corrupt cluster"),
            MvccError::Auth(e) => e.into(),
            MvccError::Installing => {
                etcd(Code::Unavailable, "a snapshot is being installed on this member; try again shortly")
            }
            e @ (MvccError::Engine(_) | MvccError::Corrupt(..)) => {
                tracing::error!(error = %e, "storage error");
                Status::new(Code::Internal, format!("etcdserver: {e}"))
            }
        }
    }
}

/// A write refused for the space quota, before Raft or by the NOSPACE alarm.
pub fn no_space() -> Status {
    etcd(Code::ResourceExhausted, "mvcc: database space exceeded")
}

impl From<RaftError> for Status {
    fn from(e: RaftError) -> Self {
        match e {
            RaftError::TooLarge => etcd(Code::InvalidArgument, "request is too large"),
            RaftError::TooManyRequests => etcd(Code::ResourceExhausted, "too many requests"),
            RaftError::Stopped => etcd(Code::Unavailable, "server stopped"),
            RaftError::NoLeader => etcd(Code::Unavailable, "no leader"),
            RaftError::Timeout => etcd(Code::Unavailable, "request timed out"),
            RaftError::MemberNotFound => etcd(Code::NotFound, "member not found"),
            RaftError::NotLearner => etcd(Code::FailedPrecondition, "can only promote a learner member"),
            RaftError::LearnerNotReady => {
                etcd(Code::FailedPrecondition, "can only promote a learner member which is in sync with leader")
            }
            RaftError::Unhealthy => etcd(Code::Unavailable, "unhealthy cluster"),
            RaftError::NotLeader => etcd(Code::FailedPrecondition, "not leader"),
            RaftError::Apply(e) => e.into(),
        }
    }
}

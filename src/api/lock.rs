//! The v3lock Lock service. It is built on leases, and answers UNIMPLEMENTED until they
//! exist.

use crate::pb::v3lockpb::lock_server::Lock;

pub struct LockService;

#[tonic::async_trait]
impl Lock for LockService {}

//! The Lease service. Leases arrive with the coordination API; until then every call
//! answers UNIMPLEMENTED.

use crate::pb::etcdserverpb::lease_server::Lease;

pub struct LeaseService;

#[tonic::async_trait]
impl Lease for LeaseService {}

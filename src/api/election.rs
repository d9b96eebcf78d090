//! The v3election Election service. It is built on leases and watches, and answers
//! UNIMPLEMENTED until they exist.

use crate::pb::v3electionpb::election_server::Election;

pub struct ElectionService;

#[tonic::async_trait]
impl Election for ElectionService {}

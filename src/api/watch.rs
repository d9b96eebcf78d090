//! The Watch service. Watches arrive with the coordination API; until then every call
//! answers UNIMPLEMENTED, as the generated default methods do.

use crate::pb::etcdserverpb::watch_server::Watch;

pub struct WatchService;

#[tonic::async_trait]
impl Watch for WatchService {}

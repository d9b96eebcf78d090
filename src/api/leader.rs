//! A channel to the leader's client URL, for the calls only the leader can answer (a
//! lease's clock, a learner's progress). A request sent through it carries
//! [`FORWARDED`], so a member that is no longer leader when it arrives does not send it
//! on again.

use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::Ctx;
use crate::raft::directory::{self, Directory};

/// Metadata on a request a follower forwarded to the leader: it is never forwarded again.
pub const FORWARDED: &str = "meshkv-forwarded";

/// The leader's channel, kept while the leader's URL stays the same.
#[derive(Default)]
pub struct LeaderLink {
    cached: Mutex<Option<(String, Channel)>>,
}

impl LeaderLink {
    /// A channel to the current leader's first client URL.
    pub fn channel(&self, ctx: &Ctx) -> Result<Channel, Status> {
        let status = ctx.raft.status();
        let leader = status.leader();
        if leader == 0 {
            return Err(Status::new(Code::Unavailable, "etcdserver: no leader"));
        }
        let name = status.membership().names.get(&leader).cloned().unwrap_or_default();
        let url = ctx
            .mesh
            .with_channel::<Directory, _>(directory::CHANNEL, |d| d.client_urls(&name))
            .unwrap_or_default()
            .into_iter()
            .next()
            .ok_or_else(|| Status::new(Code::Unavailable, "etcdserver: leader changed"))?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((u, ch)) = &*cached {
            if *u == url {
                return Ok(ch.clone());
            }
        }
        let ch = Endpoint::from_shared(url.clone())
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        *cached = Some((url, ch.clone()));
        Ok(ch)
    }
}

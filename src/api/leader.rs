//! The calls only the leader can answer (a lease's clock, a learner's progress), sent to
//! it over the mesh: encrypted and authenticated by the mesh, whatever the client URLs
//! ask of a client (TLS, a certificate), and relayed where two members cannot reach each
//! other directly. The leader answers them as its own services would, with what the
//! follower had applied known to it first; a member that is no longer leader when a
//! call arrives answers `not leader`, and does not pass it on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use prost::Message;
use tonic::{Code, Status};

use super::cluster::ClusterService;
use super::lease::{LeaseService, Lessor};
use super::Ctx;
use crate::pb::etcdserverpb::{LeaseKeepAliveRequest, LeaseTimeToLiveRequest, MemberPromoteRequest};
use crate::pb::meshkvpb::{LeaderAnswer, LeaderCall, LeaderMethod};
use crate::raft::transport::{LeaderCalls, MeshTransport};

/// How long a follower waits for the leader's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The way to the leader.
pub struct LeaderLink {
    transport: Arc<MeshTransport>,
}

impl LeaderLink {
    pub fn new(transport: Arc<MeshTransport>) -> Arc<Self> {
        Arc::new(Self { transport })
    }

    /// Calls `method` on the current leader with `request`: its response, or its error.
    pub async fn call<Resp: Message + Default>(
        &self,
        ctx: &Ctx,
        method: LeaderMethod,
        request: &impl Message,
    ) -> Result<Resp, Status> {
        let status = ctx.raft.status();
        let leader = status.leader();
        if leader == 0 {
            return Err(Status::new(Code::Unavailable, "etcdserver: no leader"));
        }
        let Some(name) = status.membership().names.get(&leader).cloned() else {
            return Err(Status::new(Code::Unavailable, "etcdserver: leader changed"));
        };
        let call = LeaderCall {
            id: 0,
            method: method.into(),
            request: request.encode_to_vec().into(),
            applied: ctx.store.applied_index(),
        };
        // Given up once this member sees another leader, or none: a lost leader would
        // otherwise hold the call for the whole timeout.
        let deposed = async {
            while ctx.raft.status().leader() == leader {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let answer = tokio::select! {
            answer = self.transport.call(&name, call, CALL_TIMEOUT) => answer,
            _ = deposed => return Err(Status::new(Code::Unavailable, "etcdserver: leader changed")),
        };
        let Some(answer) = answer else {
            return Err(Status::new(Code::Unavailable, "etcdserver: request timed out"));
        };
        if answer.code != 0 {
            return Err(Status::new(Code::from(answer.code), answer.message));
        }
        Resp::decode(answer.response).map_err(|e| Status::internal(format!("the leader's answer: {e}")))
    }
}

/// The leader's side: each call answered by the service that answers its method.
pub struct Answerer {
    lease: LeaseService,
    cluster: ClusterService,
}

impl Answerer {
    pub fn new(ctx: Ctx, lessor: Arc<Lessor>, election_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            lease: LeaseService::new(ctx.clone(), lessor, election_timeout),
            cluster: ClusterService::new(ctx),
        })
    }
}

/// `call`'s request decoded, handed to `f`, and its outcome as an answer.
async fn answered<Req, Resp, Fut>(call: &LeaderCall, f: impl FnOnce(Req) -> Fut) -> Result<Vec<u8>, Status>
where
    Req: Message + Default,
    Resp: Message,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let req = Req::decode(call.request.as_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(f(req).await?.encode_to_vec())
}

impl LeaderCalls for Answerer {
    fn answer(&self, call: LeaderCall) -> BoxFuture<'static, LeaderAnswer> {
        let (lease, cluster) = (self.lease.clone(), self.cluster.clone());
        async move {
            let applied = call.applied;
            let outcome = match LeaderMethod::try_from(call.method) {
                Ok(LeaderMethod::LeaseKeepAlive) => {
                    answered(&call, |r: LeaseKeepAliveRequest| lease.keep_alive_once(r.id, Some(applied))).await
                }
                Ok(LeaderMethod::LeaseTimeToLive) => {
                    answered(&call, |r: LeaseTimeToLiveRequest| lease.time_to_live(r, Some(applied))).await
                }
                Ok(LeaderMethod::MemberPromote) => {
                    answered(&call, |r: MemberPromoteRequest| cluster.promote(r.id, true)).await
                }
                _ => Err(Status::unimplemented(format!("leader call {}", call.method))),
            };
            match outcome {
                Ok(response) => LeaderAnswer { id: call.id, response: response.into(), ..Default::default() },
                Err(s) => LeaderAnswer {
                    id: call.id,
                    code: s.code() as i32,
                    message: s.message().into(),
                    ..Default::default()
                },
            }
        }
        .boxed()
    }
}

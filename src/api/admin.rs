//! meshkv's own Admin service: the mesh as this member sees it, for `meshkv status`.

use tonic::{Request, Response, Status};

use super::Ctx;
use crate::pb::meshkvpb::admin_server::Admin;
use crate::pb::meshkvpb::{Counter, MeshConnection, MeshPeer, MeshStatusRequest, MeshStatusResponse};

pub struct AdminService {
    ctx: Ctx,
}

impl AdminService {
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn mesh_status(&self, _: Request<MeshStatusRequest>) -> Result<Response<MeshStatusResponse>, Status> {
        let s = self.ctx.mesh.status();
        let counters = |v: &[(String, u64, u64)]| {
            v.iter()
                .map(|(name, messages, bytes)| Counter { name: name.clone(), messages: *messages, bytes: *bytes })
                .collect()
        };
        Ok(Response::new(MeshStatusResponse {
            name: s.name.clone(),
            uid: s.uid,
            addr: s.addr.clone(),
            peers: s
                .peers
                .iter()
                .map(|p| MeshPeer {
                    name: p.name.clone(),
                    uid: p.uid,
                    addr: p.addr.clone(),
                    next_hop: p.next_hop.clone().unwrap_or_default(),
                    connections: p.connections.clone(),
                })
                .collect(),
            connections: s
                .connections
                .iter()
                .map(|c| MeshConnection {
                    peer: c.peer.clone(),
                    addr: c.addr.clone(),
                    outbound: c.outbound,
                    up_seconds: c.up_for.as_secs_f64(),
                    protocol: c.protocol,
                })
                .collect(),
            sent: counters(&s.sent),
            received: counters(&s.received),
            drops: s.drops.iter().map(|(k, v)| Counter { name: k.to_string(), messages: *v, bytes: 0 }).collect(),
            relayed: s.relayed,
            cluster_version: self.ctx.store.cluster_version(),
        }))
    }
}

//! The Lease service, and the lessor that keeps lease time on the leader.
//!
//! Which leases exist and which keys they hold is replicated state (`store::lease`):
//! grants and revokes go through Raft. Time is not: only the leader tracks when each
//! lease runs out, and it revokes an expired lease through Raft like any other write, so
//! every member deletes its keys at the same revision. KeepAlive and TimeToLive need
//! that clock, so a follower forwards them to the leader. When a member becomes leader
//! and has applied what its predecessors committed, every lease starts over with its
//! full TTL plus an election timeout — etcd's rule — so a lease kept alive through a
//! leader change never expires for it; only leases granted in its own term get no more
//! than their TTL.
//!
//! A leader deposed without knowing it yet (paused, stalled, cut off) keeps a clock
//! that no longer counts. It renews only within an election timeout of a quorum
//! confirming it, and its revokes and checkpoints are proposed as decisions of its term
//! (`RaftHandle::propose_as_leader`), which no member applies in a later one.
//!
//! With checkpoints (etcd's `--experimental-enable-lease-checkpoint`, on by default
//! here), the leader records through Raft, every interval (five minutes), the time left
//! of each lease longer than the interval, and a new leader starts such a lease over
//! from that time rather than from its whole TTL: a lease nobody renews runs out even
//! if the leader changes more often than its TTL. A renewal clears the lease's
//! checkpoint first (one Raft entry, only when one stands), or a leader change could
//! count the renewed lease from the older, shorter time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::Ctx;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::pb::meshkvpb::LeaderMethod;
use crate::store::lease::MAX_LEASE_TTL;
use crate::store::mvcc::WriteResponse;

/// How often the leader looks for expired leases.
const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Clock {
    /// The term in which this member last became leader; None while it is not.
    primary_term: Option<u64>,
    expiry: HashMap<i64, Instant>,
    /// Revokes proposed and not yet applied, with when they were proposed.
    revoking: HashMap<i64, Instant>,
    /// When the leader next records checkpoints.
    next_checkpoint: Option<Instant>,
    /// Leases whose checkpoint is proposed and not yet known applied.
    checkpointing: std::collections::HashSet<i64>,
}

/// Checkpoints in one Raft entry at most, as etcd's.
const CHECKPOINT_BATCH: usize = 1000;

/// Keeps lease time on the leader.
pub struct Lessor {
    ctx: Ctx,
    /// Added to every lease's TTL when this member becomes leader.
    extend: Duration,
    /// How often the leader checkpoints the time left of leases; None: never.
    checkpoint: Option<Duration>,
    /// Deliberately broken (`--unsafe-lease-half-ttl`): leases end at half their TTL.
    half_ttl: bool,
    clock: Arc<Mutex<Clock>>,
}

impl Lessor {
    /// Starts the lessor's clock; it runs until the runtime stops.
    pub fn start(ctx: Ctx, election_timeout: Duration, checkpoint: Option<Duration>, half_ttl: bool) -> Arc<Self> {
        let me = Arc::new(Self { ctx, extend: election_timeout, checkpoint, half_ttl, clock: Arc::default() });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                me.tick();
            }
        });
        me
    }

    /// How long `secs` of a lease's TTL last on this clock.
    fn span(&self, secs: i64) -> Duration {
        let span = Duration::from_secs(secs.max(0) as u64);
        if self.half_ttl {
            span / 2
        } else {
            span
        }
    }

    /// The term in which this member leads, while it does.
    fn leading_term(&self) -> Option<u64> {
        self.ctx.raft.status().leading_term()
    }

    fn is_leader(&self) -> bool {
        self.leading_term().is_some()
    }

    /// While this member leads and has applied every entry its predecessors committed
    /// (their grants, renewals' cleared checkpoints, checkpoints): its term, and the Raft
    /// index its own entries start at. Before then its store may lack the last
    /// checkpoints, and a clock started from it would give leases time back.
    fn caught_up(&self) -> Option<(u64, u64)> {
        let (term, from) = self.ctx.raft.status().leading_from()?;
        (self.ctx.store.applied_index() + 1 >= from).then_some((term, from))
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the clock in line with the leases that exist: new ones start their TTL now,
    /// revoked ones are forgotten. On becoming leader (of `term`, its entries from index
    /// `from`), all start over: those an earlier leader granted, which it may have renewed
    /// up to the moment it was deposed, with an election timeout more.
    fn sync(&self, clock: &mut Clock, (term, from): (u64, u64), now: Instant) {
        let leases = self.ctx.store.leases();
        if clock.primary_term != Some(term) {
            clock.primary_term = Some(term);
            clock.revoking.clear();
            clock.checkpointing.clear();
            clock.next_checkpoint = self.checkpoint.map(|every| now + every);
            clock.expiry = leases
                .iter()
                .map(|(id, l)| {
                    let extend = if l.granted_at < from { self.extend } else { Duration::ZERO };
                    // A checkpoint stands only where checkpoints are on: one left from a
                    // start with them would otherwise never be cleared by renewals.
                    let left = match l.remaining > 0 && self.checkpoint.is_some() {
                        true => l.remaining.min(l.ttl),
                        false => l.ttl,
                    };
                    (id, now + extend + self.span(left))
                })
                .collect();
            return;
        }
        for (id, l) in leases.iter() {
            clock.expiry.entry(id).or_insert_with(|| now + self.span(l.ttl));
        }
        if clock.expiry.len() != leases.len() {
            clock.expiry.retain(|id, _| leases.contains(*id));
            clock.revoking.retain(|id, _| leases.contains(*id));
        }
    }

    fn tick(&self) {
        // A new leader keeps no time until it has applied its predecessors' entries.
        let Some(lead) = self.caught_up() else {
            if !self.is_leader() {
                let mut clock = self.clock();
                if clock.primary_term.is_some() {
                    *clock = Clock::default();
                }
            }
            return;
        };
        let term = lead.0;
        let now = Instant::now();
        let expired: Vec<i64> = {
            let mut clock = self.clock();
            self.sync(&mut clock, lead, now);
            let Clock { expiry, revoking, .. } = &mut *clock;
            let due: Vec<i64> = expiry
                .iter()
                .filter(|(id, at)| {
                    **at <= now && revoking.get(id).is_none_or(|t| now.duration_since(*t) > Duration::from_secs(3))
                })
                .map(|(id, _)| *id)
                .collect();
            for id in &due {
                revoking.insert(*id, now);
            }
            due
        };
        for id in expired {
            let raft = self.ctx.raft.clone();
            tokio::spawn(async move {
                // Only as this term's leader: a leader deposed unawares finds leases run
                // out that the next leader renewed.
                let revoke = Write::LeaseRevoke(LeaseRevokeRequest { id });
                if let Err(e) = raft.propose_as_leader(revoke, term).await {
                    tracing::debug!(lease = format!("{id:x}"), error = %e, "revoking an expired lease failed; will retry");
                }
            });
        }
        self.checkpoint_due(term);
    }

    /// On the leader, once an interval: proposes the time left of every lease longer than
    /// the interval that has run some of its TTL, in batches.
    fn checkpoint_due(&self, term: u64) {
        let Some(every) = self.checkpoint else { return };
        let now = Instant::now();
        let batch: Vec<LeaseCheckpoint> = {
            let mut clock = self.clock();
            if clock.next_checkpoint.is_none_or(|at| now < at) {
                return;
            }
            clock.next_checkpoint = Some(now + every);
            let leases = self.ctx.store.leases().all();
            let mut batch = Vec::new();
            for (id, ttl, _) in leases {
                let Some(at) = clock.expiry.get(&id) else { continue };
                if (ttl as u64) <= every.as_secs() || *at <= now {
                    continue;
                }
                let left = at.duration_since(now).as_secs_f64().ceil() as i64;
                if left < ttl {
                    batch.push(LeaseCheckpoint { id, remaining_ttl: left });
                }
            }
            clock.checkpointing.extend(batch.iter().map(|c| c.id));
            batch
        };
        for chunk in batch.chunks(CHECKPOINT_BATCH) {
            let (raft, clock) = (self.ctx.raft.clone(), self.clock.clone());
            let ids: Vec<i64> = chunk.iter().map(|c| c.id).collect();
            let req = LeaseCheckpointRequest { checkpoints: chunk.to_vec() };
            tokio::spawn(async move {
                if let Err(e) = raft.propose_as_leader(Write::LeaseCheckpoint(req), term).await {
                    tracing::debug!(error = %e, "lease checkpoints not recorded; the next interval tries again");
                }
                let mut clock = clock.lock().unwrap_or_else(|e| e.into_inner());
                for id in ids {
                    clock.checkpointing.remove(&id);
                }
            });
        }
    }

    /// Before a renewal on the leader: clears the lease's checkpoint if one stands or is
    /// on its way, so that a later leader counts the renewed lease from its whole TTL.
    async fn clear_checkpoint(&self, id: i64) -> Result<(), Status> {
        if self.checkpoint.is_none() {
            return Ok(());
        }
        let stands = self.ctx.store.leases().get(id).is_some_and(|l| l.remaining > 0);
        if !stands && !self.clock().checkpointing.contains(&id) {
            return Ok(());
        }
        let clear = LeaseCheckpointRequest { checkpoints: vec![LeaseCheckpoint { id, remaining_ttl: 0 }] };
        self.ctx.raft.propose(Write::LeaseCheckpoint(clear)).await.map_err(Status::from)?;
        Ok(())
    }

    /// KeepAlive on the leader: the lease's TTL starts over. 0 if it does not exist or
    /// already ran out.
    fn renew(&self, id: i64) -> Result<i64, Status> {
        let Some(ttl) = self.ctx.store.leases().get(id).map(|l| l.ttl) else { return Ok(0) };
        let now = Instant::now();
        let mut clock = self.clock();
        let at = self.expiry_of(&mut clock, id, ttl, now)?;
        if *at <= now {
            return Ok(0);
        }
        *at = now + self.span(ttl);
        Ok(ttl)
    }

    /// Whole seconds left, on the leader; None if there is no such lease.
    fn remaining(&self, id: i64) -> Result<Option<i64>, Status> {
        let Some(ttl) = self.ctx.store.leases().get(id).map(|l| l.ttl) else { return Ok(None) };
        let now = Instant::now();
        let mut clock = self.clock();
        let at = self.expiry_of(&mut clock, id, ttl, now)?;
        Ok(Some(at.saturating_duration_since(now).as_secs() as i64))
    }

    /// One existing lease's expiry, without visiting every lease unless this member has
    /// just become leader. Called once [`LeaseService::answers_here`] found this member a
    /// leader caught up; an error if it no longer is.
    fn expiry_of<'c>(&self, clock: &'c mut Clock, id: i64, ttl: i64, now: Instant) -> Result<&'c mut Instant, Status> {
        let lead = self.caught_up().ok_or_else(|| Status::new(Code::Unavailable, "etcdserver: leader changed"))?;
        if clock.primary_term != Some(lead.0) {
            self.sync(clock, lead, now);
        }
        Ok(clock.expiry.entry(id).or_insert_with(|| now + self.span(ttl)))
    }
}

#[derive(Clone)]
pub struct LeaseService {
    ctx: Ctx,
    lessor: Arc<Lessor>,
    /// etcd's minimum TTL: one and a half election timeouts, rounded up to a second.
    min_ttl: i64,
    /// How long a follower tries to reach a leader for a renewal or a TimeToLive while
    /// the leader changes: etcd's request timeout, 5 s and two election timeouts.
    forward_within: Duration,
}

impl LeaseService {
    pub fn new(ctx: Ctx, lessor: Arc<Lessor>, election_timeout: Duration) -> Self {
        let min_ttl = (election_timeout.as_secs_f64() * 1.5).ceil().max(1.0) as i64;
        Self { ctx, lessor, min_ttl, forward_within: Duration::from_secs(5) + 2 * election_timeout }
    }

    /// Calls `method` on the leader with `req`, for a call this member does not answer
    /// itself; while the leader cannot be reached (it is lost, deposed, or a new one is
    /// still being elected) tries again every 50 ms, as etcd's followers do, until
    /// [`Self::forward_within`] has passed since `since`, or until this member answers
    /// the call itself (`Ok(None)`): it has become the leader.
    async fn forward<Resp: prost::Message + Default>(
        &self,
        method: LeaderMethod,
        req: &impl prost::Message,
        since: tokio::time::Instant,
    ) -> Result<Option<Resp>, Status> {
        loop {
            match self.ctx.leader.call(&self.ctx, method, req).await {
                Err(s) if s.code() == Code::Unavailable && since.elapsed() < self.forward_within => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if self.answers_here(None).await? {
                        return Ok(None);
                    }
                }
                r => return r.map(Some),
            }
        }
    }

    /// Whether this member answers a call that needs the leader's clock itself (it
    /// leads, has applied what its predecessors committed, and a quorum confirmed it
    /// lately: [`Self::leads_confirmed`]) or sends it to the leader. `forwarded`: a follower's call, with what that follower had applied,
    /// which the leader waits (a little) to have applied too; such a call is refused by a
    /// member that no longer leads, never sent on again.
    async fn answers_here(&self, forwarded: Option<u64>) -> Result<bool, Status> {
        if forwarded.is_none() {
            self.wait_leader().await?;
        }
        if let Some(applied) = forwarded {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.ctx.store.applied_index() < applied && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let not_leader = || Status::new(Code::Unavailable, "etcdserver: not leader");
        if !self.lessor.is_leader() {
            return match forwarded {
                Some(_) => Err(not_leader()),
                None => Ok(false),
            };
        }
        if self.leads_confirmed().await? {
            return Ok(true);
        }
        // Deposed while it could not hear of it: the leader it now knows answers.
        match forwarded.is_none() && !self.lessor.is_leader() && self.ctx.raft.status().leader() != 0 {
            true => Ok(false),
            false => Err(not_leader()),
        }
    }

    /// Waits for a leader, as etcd's waitLeader does: a call made while one is elected (at
    /// start, or after the leader's loss) is answered once there is one, and refused
    /// only after two election timeouts without, as a write is.
    async fn wait_leader(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + 2 * self.lessor.extend;
        while self.ctx.raft.status().leader() == 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::new(Code::Unavailable, "etcdserver: no leader"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Whether a quorum confirmed this member as leader within the last election
    /// timeout, asking it now if not. A renewal promises the client the lease's TTL from
    /// now; a leader deposed without knowing it (paused, stalled, cut off) would promise
    /// time the new leader does not give. A leader elected after a confirmation started
    /// every lease over with its TTL plus one election timeout when it was elected, so a
    /// renewal within an election timeout of a confirmation promises no more than that.
    /// Linearizable reads confirm the leader as they go; without them a renewal asks at
    /// most about once an election timeout.
    async fn leads_confirmed(&self) -> Result<bool, Status> {
        // A new leader answers once it has applied what its predecessors committed: the
        // ReadIndex round waits for that.
        let fresh = || {
            let at = self.ctx.raft.status().leadership_confirmed_at();
            at.is_some_and(|at| at.elapsed() < self.lessor.extend) && self.lessor.caught_up().is_some()
        };
        if fresh() {
            return Ok(true);
        }
        self.ctx.raft.read_index().await.map_err(Status::from)?;
        Ok(fresh())
    }

    /// One KeepAlive, answered here on the leader or by the leader; `forwarded`: a
    /// follower's call, with what it had applied.
    pub(super) async fn keep_alive_once(
        &self,
        id: i64,
        forwarded: Option<u64>,
    ) -> Result<LeaseKeepAliveResponse, Status> {
        let since = tokio::time::Instant::now();
        if !self.answers_here(forwarded).await? {
            let req = LeaseKeepAliveRequest { id };
            if let Some(resp) = self.forward(LeaderMethod::LeaseKeepAlive, &req, since).await? {
                return Ok(resp);
            }
        }
        // The header is taken before the renewal, as etcd does: a lease revoked at some
        // revision is never seen renewed at a later one.
        let header = self.ctx.header(None);
        self.lessor.clear_checkpoint(id).await?;
        let ttl = self.lessor.renew(id)?;
        Ok(LeaseKeepAliveResponse { header, id, ttl })
    }

    /// TimeToLive, answered here on the leader or by the leader, as KeepAlive.
    pub(super) async fn time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
        forwarded: Option<u64>,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        let since = tokio::time::Instant::now();
        if !self.answers_here(forwarded).await? {
            let resp: Option<LeaseTimeToLiveResponse> =
                self.forward(LeaderMethod::LeaseTimeToLive, &req, since).await?;
            if let Some(mut resp) = resp {
                // As etcd: the revision the leader answered at, in this member's header.
                resp.header = self.ctx.header(resp.header);
                return Ok(resp);
            }
        }
        let header = self.ctx.header(None);
        let entry = self.ctx.store.leases().get(req.id).cloned();
        let (Some(entry), Some(ttl)) = (entry, self.lessor.remaining(req.id)?) else {
            return Ok(LeaseTimeToLiveResponse { header, id: req.id, ttl: -1, ..Default::default() });
        };
        let keys = if req.keys { entry.keys.into_iter().collect() } else { Vec::new() };
        Ok(LeaseTimeToLiveResponse { header, id: req.id, ttl, granted_ttl: entry.ttl, keys })
    }
}

/// A lease id chosen by the server: positive, and always sixteen hex digits, as etcd's
/// ids are (clients print them with %016x, some with plain %x).
pub fn new_lease_id() -> i64 {
    ((rand::random::<u64>() >> 4) | (1 << 60)) as i64
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, request: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.ctx.caller(&request).await?;
        let mut req = request.into_inner();
        if req.ttl > MAX_LEASE_TTL {
            return Err(Status::new(Code::OutOfRange, "etcdserver: too large lease TTL"));
        }
        req.ttl = req.ttl.max(self.min_ttl);
        if req.id == 0 {
            req.id = new_lease_id();
        }
        match self.ctx.propose(&caller, Write::LeaseGrant(req)).await? {
            WriteResponse::LeaseGrant(mut r) => {
                r.header = self.ctx.header(r.header);
                Ok(Response::new(r))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result for lease grant")),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.ctx.caller(&request).await?;
        match self.ctx.propose(&caller, Write::LeaseRevoke(request.into_inner())).await? {
            WriteResponse::LeaseRevoke(mut r) => {
                r.header = self.ctx.header(r.header);
                Ok(Response::new(r))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result for lease revoke")),
        }
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<LeaseKeepAliveResponse>>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    _ = me.ctx.stopped() => return,
                    _ = tx.closed() => return,
                    r = incoming.message() => r,
                };
                let Ok(Some(req)) = req else { return };
                let resp = me.keep_alive_once(req.id, None).await;
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(self.time_to_live(request.into_inner(), None).await?))
    }

    async fn lease_leases(&self, _: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let leases = self.ctx.store.leases().all().into_iter().map(|(id, _, _)| LeaseStatus { id }).collect();
        Ok(Response::new(LeaseLeasesResponse { header: self.ctx.header(None), leases }))
    }
}

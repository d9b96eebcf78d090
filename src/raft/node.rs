//! The Raft driver: the `RawNode` and raft-rs's Ready loop, run by a thread of its own,
//! or, while that thread is idle on a member alone, by the client task whose write or
//! read arrives (see `Shared`). Either way one turn runs at a time, under the driver's
//! lock.
//!
//! Each turn of the loop, in the order raft-rs requires:
//! 1. take every queued command (proposals, read requests), so that all the writes that
//!    arrived while the last sync ran share the next Ready: this is the group commit;
//! 2. tick the node when a tick interval has passed;
//! 3. on a Ready: send its messages; apply its committed entries; persist its entries
//!    and HardState in one write, synced in the Raft log's file (`wal`); send its
//!    persisted messages; `advance`;
//!    then apply what the light ready commits and `advance_apply`.
//!
//! Applying a committed entry answers the member's own proposer, found by the proposal
//! id inside the entry. Linearizable reads are batched: all read requests of one turn
//! share one ReadIndex, and each is answered once the store has applied that index.
//!
//! A turn never waits on a client: replies go through oneshot channels whose
//! receivers may be gone, and every queue it owns is bounded by deadlines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType};
use raft::{RawNode, StateRole};
use rocksdb::WriteBatch;
use tokio::sync::oneshot;

use super::log_store::LogStore;
use super::membership::{self, Change, Controller, MembershipConfig, View};
use super::wal::LogWal;
use super::{logger, RaftError};
use crate::pb::meshkvpb::{internal_request, InternalRequest, MemberContext, SnapshotDescriptor};
use crate::store::engine::{Engine, EngineError, CF_META};
use crate::store::mvcc::{MvccError, MvccStore, WriteResponse, META_CLUSTER_VERSION};

/// Tuning of the Raft driver.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// This member's Raft id.
    pub id: u64,
    /// This member's name (its id derives from it).
    pub name: String,
    pub membership: MembershipConfig,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Largest encoded write accepted, as etcd's --max-request-bytes.
    pub max_request_bytes: usize,
    /// How long a client waits for its write or read before "request timed out".
    pub request_timeout: Duration,
    /// Commands queued towards the driver before new ones are refused.
    pub queue_depth: usize,
    /// Applied entries kept in the log before the front is trimmed.
    pub log_keep: u64,
    /// Start without campaigning, until [`RaftHandle::campaign`] allows it: the member
    /// takes part (it votes and keeps the log) but does not lead, as while its store is
    /// checked against the others'.
    pub hold_campaigns: bool,
    /// As etcd's --strict-reconfig-check: refuse to remove a voter when the voters left
    /// that this member can reach would be fewer than a quorum.
    pub strict_reconfig_check: bool,
    /// Raft's pre-vote phase (etcd's --pre-vote): a member cut off from the others asks
    /// whether it could win before it raises its term, so it does not depose a working
    /// leader when it comes back.
    pub pre_vote: bool,
    /// Applying a batch of committed entries that takes longer is logged as a warning
    /// (etcd's --experimental-warning-apply-duration).
    pub warning_apply_duration: Duration,
    /// etcd's --force-new-cluster: at start, a member with a log drops its uncommitted
    /// entries and commits the removal of every other member ([`force_new_cluster`]).
    pub force_new_cluster: bool,
    /// The newest mesh protocol this member speaks: as leader it raises the cluster
    /// version to what every member speaks, and it stops rather than apply a cluster
    /// version newer than this.
    pub protocol: u32,
}

impl RaftConfig {
    pub fn new(id: u64, name: impl Into<String>) -> Self {
        Self {
            id,
            name: name.into(),
            membership: MembershipConfig::default(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_request_bytes: 1536 * 1024,
            request_timeout: Duration::from_secs(7),
            queue_depth: 16 * 1024,
            log_keep: 10_000,
            hold_campaigns: false,
            strict_reconfig_check: true,
            pre_vote: true,
            warning_apply_duration: Duration::from_millis(100),
            force_new_cluster: false,
            protocol: crate::mesh::secure::PROTOCOL_VERSION,
        }
    }
}

/// The Raft group as this member last applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Member names by id.
    pub names: BTreeMap<u64, String>,
}

/// What the driver publishes for the API to read without asking it.
#[derive(Debug, Default)]
pub struct RaftStatus {
    pub id: u64,
    term: AtomicU64,
    leader: AtomicU64,
    /// The term while this member is its leader; 0 while it is not. One value, so that a
    /// reader never pairs a term with a leader of another term.
    leading: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    is_learner: AtomicBool,
    /// This member is the group's only member.
    alone: AtomicBool,
    /// Commands the driver's last turn took: more than one means concurrent clients.
    last_batch: AtomicU64,
    membership: RwLock<Membership>,
    /// The cluster's id; 0 until a joining member is added and learns it.
    pub cluster_id: Arc<AtomicU64>,
    /// Set once this member applied its own removal.
    pub removed: AtomicBool,
    /// Why the driver stopped, once it failed (its storage, or a log it cannot follow).
    failure: Mutex<Option<String>>,
    pub metrics: super::RaftMetrics,
    /// The term and the time of the newest ReadIndex round this member asked as leader
    /// that a quorum answered.
    confirmed: Mutex<Option<(u64, Instant)>>,
    /// The term this member last became leader in, and the index of its first entry in
    /// it: once that is applied, so is everything earlier leaders committed.
    led_from: Mutex<(u64, u64)>,
}

impl RaftStatus {
    /// Why the driver stopped, once it failed: this member serves nothing more.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn membership(&self) -> Membership {
        self.membership.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn is_learner(&self) -> bool {
        self.is_learner.load(Ordering::Acquire)
    }
    /// This member is in the configuration it applied, as a voter or a learner: a fresh
    /// member once it applied its founding entries, a joiner once it was added.
    pub fn is_member(&self) -> bool {
        let m = self.membership.read().unwrap_or_else(|e| e.into_inner());
        m.voters.contains(&self.id) || m.learners.contains(&self.id)
    }
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id.load(Ordering::Acquire)
    }
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Acquire)
    }
    /// The term in which this member leads, while it does (by its own account).
    pub fn leading_term(&self) -> Option<u64> {
        Some(self.leading.load(Ordering::Acquire)).filter(|&t| t != 0)
    }
    pub fn commit_index(&self) -> u64 {
        self.commit.load(Ordering::Acquire)
    }
    pub fn last_index(&self) -> u64 {
        self.last_index.load(Ordering::Acquire)
    }

    /// While this member leads: its term, and the index of its first entry in it (the
    /// empty entry a new leader appends). Every entry an earlier leader committed comes
    /// before it.
    pub fn leading_from(&self) -> Option<(u64, u64)> {
        let term = self.leading_term()?;
        let (t, index) = *self.led_from.lock().unwrap_or_else(|e| e.into_inner());
        (t == term).then_some((term, index))
    }

    fn confirm_leadership(&self, term: u64, asked: Instant) {
        let mut c = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none_or(|(t, at)| (t, at) < (term, asked)) {
            *c = Some((term, asked));
        }
    }

    /// While this member leads: when a quorum last confirmed it (the newest ReadIndex
    /// round it asked in its current term that a quorum answered). A member that leads
    /// by its own account but has no recent confirmation may have been deposed without
    /// hearing of it yet: paused, stalled or cut off.
    pub fn leadership_confirmed_at(&self) -> Option<Instant> {
        let term = self.leading_term()?;
        let c = *self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        c.and_then(|(t, at)| (t == term).then_some(at))
    }
}

/// One ReadIndex round in flight.
struct Round {
    waiters: Vec<Waiter<()>>,
    asked: Instant,
    /// The term, if this member asked it as leader.
    led: Option<u64>,
}

type WriteReply = oneshot::Sender<Result<WriteResponse, RaftError>>;
type ReadReply = oneshot::Sender<Result<(), RaftError>>;

enum Command {
    Propose {
        id: u64,
        data: Bytes,
        reply: WriteReply,
        deadline: Instant,
    },
    Read {
        reply: ReadReply,
        deadline: Instant,
    },
    /// A message from another member, with the incarnation it sent (0: none).
    Step(Box<Message>, u64),
    TransferLeader(u64),
    ChangeMembership {
        change: Change,
        reply: ReadReply,
        deadline: Instant,
    },
    ReportSnapshot(u64, raft::SnapshotStatus),
    /// Lets this member campaign for leadership (see [`RaftConfig::hold_campaigns`]).
    Campaign,
    /// A member says its log ends at `last_index`, before what the leader told it to
    /// commit, and that it started again as `incarnation`.
    LostLog {
        from: u64,
        last_index: u64,
        incarnation: u64,
    },
    /// A member says the cluster runs mesh protocol `version`.
    ClusterVersion {
        from: u64,
        version: u32,
    },
}

/// Carries Raft messages to other members.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msg: Message);
    /// Peers reachable now: (member id, name).
    fn reachable(&self) -> Vec<(u64, String)>;
    /// Tells a member the cluster removed that it is out.
    fn tell_removed(&self, id: u64);
    /// Tells a member the leader will not add that the cluster runs mesh protocol
    /// `version`, newer than its build speaks.
    fn tell_cluster_version(&self, to: u64, version: u32);
    /// Tells the leader `to` that this member's log ends at `last_index`, before entries
    /// the leader counts as replicated here: this member lost its data, and started
    /// again as `incarnation`.
    fn tell_lost_log(&self, to: u64, last_index: u64, incarnation: u64);
    /// The incarnation the member `name` announces (0: it started with a configuration),
    /// None while it has announced nothing.
    fn incarnation(&self, name: &str) -> Option<u64>;
    /// The newest mesh protocol the member `name` announces it speaks, None while it has
    /// announced nothing.
    fn protocol(&self, name: &str) -> Option<u32>;
    /// The cluster id the peers this member reached belong to (0: none seen).
    fn cluster_seen(&self) -> u64;
}

/// How Raft starts on a fresh data dir.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// A cluster of this member alone.
    Single,
    /// A new cluster of exactly these members: (id, name).
    Voters(Vec<(u64, String)>),
    /// Waits to be added to an existing cluster by its leader.
    Join,
}

/// The driver, shared by its thread and the tasks that hand it client requests.
///
/// The thread parks while there is nothing to do. On a member alone in its group, a
/// client's write or read that finds it parked runs the driver's turn itself, on its
/// own thread: a lone write then costs one sync and no hand-off between threads (two
/// wake-ups of idle CPUs, each costing tens of microseconds on a virtual machine).
/// Only after a turn of one command: under load the thread can park between group
/// commits, and the next group commit stays on it.
struct Shared {
    driver: Mutex<Driver>,
    status: Arc<RaftStatus>,
    /// The thread is parked (or about to park) with nothing queued that it knows of.
    idle: AtomicBool,
    /// The driver failed (its storage, or a log it cannot follow) and serves nothing
    /// more: `status.failure()` says why; this flag is what every turn and send reads.
    stopped: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Driver> {
        self.driver.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alone(&self) -> bool {
        self.status.alone.load(Ordering::Acquire)
    }

    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Runs one turn; false once the driver is done (its queue closed or its storage
    /// failed).
    fn turn(&self, d: &mut Driver) -> bool {
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        match d.turn() {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(error = %e, "this member stops serving");
                *self.status.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                self.stopped.store(true, Ordering::Release);
                d.fail();
                self.wake();
                false
            }
        }
    }
}

/// The API's way into Raft: cheap to clone, safe to use from any task.
#[derive(Clone)]
pub struct RaftHandle {
    tx: SyncSender<Command>,
    shared: Arc<Shared>,
    status: Arc<RaftStatus>,
    next_id: Arc<AtomicU64>,
    max_request_bytes: usize,
    request_timeout: Duration,
}

impl RaftHandle {
    pub fn status(&self) -> &RaftStatus {
        &self.status
    }

    /// The status, to be read after every handle is gone.
    pub fn shared_status(&self) -> Arc<RaftStatus> {
        self.status.clone()
    }

    /// Proposes the member's own write (no user's permissions apply) and waits until
    /// this member has applied it.
    pub async fn propose(&self, request: internal_request::Request) -> Result<WriteResponse, RaftError> {
        self.propose_as(request, None).await
    }

    /// Proposes a write for a client's `user` ("" for a client that named none), whose
    /// permissions are checked when it is applied; `None` for the member's own writes.
    pub async fn propose_as(
        &self,
        request: internal_request::Request,
        user: Option<&str>,
    ) -> Result<WriteResponse, RaftError> {
        let (user, by_member) = match user {
            Some(u) => (u.to_string(), false),
            None => (String::new(), true),
        };
        self.propose_request(InternalRequest { request: Some(request), user, by_member, ..Default::default() }).await
    }

    /// Proposes a decision this member took as the leader of `term` (a lease's expiry or
    /// checkpoint): applied only if it is committed in `term`, or else it fails with
    /// [`RaftError::NotLeader`] and changes nothing.
    pub async fn propose_as_leader(
        &self,
        request: internal_request::Request,
        term: u64,
    ) -> Result<WriteResponse, RaftError> {
        let req = InternalRequest { request: Some(request), by_member: true, leader_term: term, ..Default::default() };
        self.propose_request(req).await
    }

    async fn propose_request(&self, mut req: InternalRequest) -> Result<WriteResponse, RaftError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let data = Bytes::from(req.encode_to_vec());
        if data.len() > self.max_request_bytes {
            return Err(RaftError::TooLarge);
        }
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + self.request_timeout;
        let outcome = async {
            self.send_client(Command::Propose { id, data, reply, deadline })?;
            self.wait(rx).await?
        }
        .await;
        if matches!(&outcome, Err(e) if !matches!(e, RaftError::Apply(_))) {
            self.status.metrics.proposals_failed.inc();
        }
        outcome
    }

    /// Waits until this member's store reflects every write committed before the call:
    /// a read served after it is linearizable.
    pub async fn read_index(&self) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + self.request_timeout;
        self.send_client(Command::Read { reply, deadline })?;
        self.wait(rx).await?
    }

    /// Hands the driver a message from another member, which sent its incarnation with
    /// it (0 for one that started with its data).
    pub fn step(&self, msg: Message, incarnation: u64) -> Result<(), RaftError> {
        self.send(Command::Step(Box::new(msg), incarnation))
    }

    /// Proposes a membership change and waits until this member has applied it.
    pub async fn change_membership(&self, change: Change) -> Result<(), RaftError> {
        let m = self.status.membership();
        let (id, must_be_learner) = match &change {
            Change::AddLearner { id, .. } => (*id, false),
            Change::Promote { id } => (*id, true),
            Change::Remove { id, .. } => (*id, false),
        };
        let known = m.voters.contains(&id) || m.learners.contains(&id);
        if !matches!(change, Change::AddLearner { .. }) && !known {
            return Err(RaftError::MemberNotFound);
        }
        if must_be_learner && !m.learners.contains(&id) {
            return Err(RaftError::NotLearner);
        }
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + self.request_timeout;
        self.send(Command::ChangeMembership { change, reply, deadline })?;
        self.wait(rx).await?
    }

    /// Tells the leader how sending a snapshot to `to` went.
    pub fn report_snapshot(&self, to: u64, status: raft::SnapshotStatus) -> Result<(), RaftError> {
        self.send(Command::ReportSnapshot(to, status))
    }

    /// Hands the driver a member's word that its log ends at `last_index`.
    pub fn lost_log(&self, from: u64, last_index: u64, incarnation: u64) -> Result<(), RaftError> {
        self.send(Command::LostLog { from, last_index, incarnation })
    }

    /// Member `from` says the cluster runs mesh protocol `version`: a leader that will not
    /// add this member, whose build is older. Believed from a voter, or from any peer by a
    /// member that is in no configuration yet; the driver then stops, saying why.
    pub fn cluster_version_told(&self, from: u64, version: u32) -> Result<(), RaftError> {
        self.send(Command::ClusterVersion { from, version })
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.send(Command::TransferLeader(to))
    }

    /// Lets a member started with [`RaftConfig::hold_campaigns`] campaign.
    pub fn campaign(&self) -> Result<(), RaftError> {
        self.send(Command::Campaign)
    }

    fn queue(&self, cmd: Command) -> Result<(), RaftError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(RaftError::Stopped);
        }
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => RaftError::TooManyRequests,
            TrySendError::Disconnected(_) => RaftError::Stopped,
        })
    }

    fn send(&self, cmd: Command) -> Result<(), RaftError> {
        self.queue(cmd)?;
        self.shared.wake();
        Ok(())
    }

    /// Queues a client's write or read; if the driver's thread is idle and this member
    /// is alone, runs the turn here rather than waking it. Only on a multi-threaded
    /// runtime, where the other workers keep serving while this one syncs. With peers,
    /// a turn can hold this worker while the mesh's traffic waits on it: three members,
    /// 100 clients, lost throughput that way, so they always hand over.
    fn send_client(&self, cmd: Command) -> Result<(), RaftError> {
        self.queue(cmd)?;
        // Only a lone client: with many, the turn is a group commit that would hold this
        // worker through the sync while the replies it should write wait. The cheap
        // checks first: with peers or under load, nothing more is looked up.
        let lone = self.status.last_batch.load(Ordering::Relaxed) <= 1;
        if self.shared.alone()
            && lone
            && self.shared.idle.load(Ordering::Acquire)
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            if let Ok(mut d) = self.shared.driver.try_lock() {
                self.shared.turn(&mut d);
                return Ok(());
            }
        }
        self.shared.wake();
        Ok(())
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, RaftError> {
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(RaftError::Stopped),
            Err(_) => Err(RaftError::Timeout),
        }
    }
}

/// Where snapshots are served from and fetched to.
#[derive(Clone)]
pub struct Snapshots {
    pub outgoing: Arc<super::snapshot::Outgoing>,
    pub incoming: Arc<super::snapshot::Incoming>,
}

/// A running driver: the handle for the API and the thread to join at shutdown.
pub struct Started {
    pub handle: RaftHandle,
    pub thread: JoinHandle<()>,
    /// Drawn when the log holds no configuration yet (a member that joins, or one that
    /// lost its data): the member announces it, and the change that adds it carries it.
    /// 0 for a member that starts with a configuration.
    pub incarnation: u64,
}

struct Waiter<T> {
    reply: oneshot::Sender<Result<T, RaftError>>,
    deadline: Instant,
}

/// A client's write from when the driver takes it until it is applied.
struct Write {
    waiter: Waiter<WriteResponse>,
    /// The encoded `InternalRequest`, kept to propose it again if a leader loses it.
    data: Bytes,
    sent: Sent,
}

/// Where a write stands with the leaders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Waiting to be proposed (held, or never sent).
    No,
    /// Handed to the leader of this term: this member's own log if it leads, else the
    /// leader it forwarded the write to. An entry enters a log only in the term of the
    /// leader that appends it, and a leader takes a forwarded write only when it was
    /// sent in its own term. So once this member applies an entry of a later term, an
    /// entry for the write either was applied before it or can never be committed.
    InTerm(u64),
    /// A snapshot installed since may hold it: never proposed again.
    Unknown,
}

struct Driver {
    cfg: RaftConfig,
    node: RawNode<LogStore>,
    engine: Engine,
    store: Arc<MvccStore>,
    status: Arc<RaftStatus>,
    rx: Receiver<Command>,
    /// Commands taken since the last turn ended.
    handled: u64,
    last_tick: Instant,
    /// Where the Raft log's writes are made durable.
    wal: LogWal,
    writes: HashMap<u64, Write>,
    /// Proposals taken this turn, proposed together at its end.
    proposals: Vec<Proposal>,
    /// On the leader: entries followers forwarded this turn, with the term they were
    /// taken in, proposed with `proposals`.
    forwarded: Vec<(u64, Entry)>,
    /// The term of the last entry applied: when it grows, writes handed to a leader in
    /// an earlier term and not applied are lost and are proposed again.
    applied_term: u64,
    /// On the leader: the commit index the followers were last sent.
    commit_sent: u64,
    /// Proposals made while there was no leader, retried once there is one.
    stalled: Vec<Proposal>,
    /// Reads waiting for the next ReadIndex round.
    reads_new: Vec<Waiter<()>>,
    /// Reads whose ReadIndex round is in flight, by round.
    reads_asked: HashMap<u64, Round>,
    /// Membership changes asked by clients: (member id, change type) → waiter.
    conf_waiters: Vec<(u64, ConfChangeType, Waiter<()>)>,
    /// Reads that know their index and wait for the store to apply it.
    reads_ready: Vec<(u64, Vec<Waiter<()>>)>,
    next_read_ctx: u64,
    /// A commit index raft-rs advanced in a light ready, persisted with the next write.
    commit_to_save: Option<u64>,
    /// The applied index when a flush of the store was asked for, until it is on disk.
    store_flush: Option<u64>,
    transport: Option<Arc<dyn Transport>>,
    controller: Controller,
    /// On the leader: members that said their log ends at an index, and when.
    lost_reports: HashMap<u64, (u64, Instant)>,
    /// On the leader: the incarnation each such member said it started again as (the
    /// member directory may not have brought it yet when the member is added back).
    reported_incarnations: HashMap<u64, u64>,
    /// When this member last told a leader that it lost its log.
    lost_told: Option<Instant>,
    /// This start's incarnation (`Started::incarnation`).
    incarnation: u64,
    /// On the leader: the cluster version it last proposed, and when.
    version_asked: Option<(u32, Instant)>,
    /// On the leader: members not added because their build is older than the cluster
    /// version, already warned of.
    too_old_warned: HashSet<u64>,
    /// Why this member stops, told by a leader that will not add it: ends the next turn.
    refused: Option<EngineError>,
    ticks: u64,
    campaign_soon: bool,
    no_leader_since: Option<Instant>,
    incoming: Arc<super::snapshot::Incoming>,
}

/// Opens the Raft log, bootstraps a one-member configuration on a fresh data dir, and
/// starts the driver thread.
pub fn start(
    cfg: RaftConfig,
    engine: Engine,
    store: Arc<MvccStore>,
    transport: Option<Arc<dyn Transport>>,
    bootstrap: Bootstrap,
    cluster_id: Arc<AtomicU64>,
    snapshots: Snapshots,
) -> Result<Started, EngineError> {
    let (mut wal, replayed) = LogWal::open(engine.clone(), engine.db().path())?;
    if replayed > 0 {
        tracing::info!(records = replayed, "raft log writes replayed from its write-ahead file");
    }
    let log = LogStore::open(engine.clone())?.with_snapshots(super::log_store::SnapshotSource {
        outgoing: snapshots.outgoing.clone(),
        name: cfg.name.clone(),
        cluster_id: cluster_id.clone(),
    });
    let applied = store.applied_index();
    let mut batch = WriteBatch::default();
    let incarnation = match log.is_fresh() && matches!(bootstrap, Bootstrap::Join) {
        true => rand::random::<u64>().max(1),
        false => 0,
    };
    if log.is_fresh() {
        let voters = match &bootstrap {
            Bootstrap::Single => vec![(cfg.id, cfg.name.clone())],
            Bootstrap::Voters(v) => v.clone(),
            Bootstrap::Join => vec![],
        };
        if !voters.is_empty() {
            // As etcd does: the founding members enter the log as its first entries, the
            // same on every founder, committed at term 1. A member that joins later
            // replays them and so learns the whole group.
            let entries: Vec<Entry> = voters
                .iter()
                .enumerate()
                .map(|(i, (id, name))| {
                    let ctx = MemberContext {
                        name: name.clone(),
                        cluster_id: cluster_id.load(Ordering::Acquire),
                        ..Default::default()
                    };
                    conf_entry(1, i as u64 + 1, ConfChangeType::AddNode, *id, &ctx)
                })
                .collect();
            log.append(&mut batch, &entries);
            let hs = raft::eraftpb::HardState { term: 1, commit: entries.len() as u64, ..Default::default() };
            log.set_hard_state(&mut batch, &hs);
        }
    }
    if log.hard_state().commit < applied && applied <= log.last_index_cached() {
        // The store applied entries whose commit index had not reached the disk yet;
        // applied entries were committed, so the commit index catches up.
        log.set_commit(&mut batch, applied);
    }
    if cfg.force_new_cluster && !log.is_fresh() {
        let ctx = MemberContext {
            name: cfg.name.clone(),
            cluster_id: cluster_id.load(Ordering::Acquire),
            ..Default::default()
        };
        force_new_cluster(&log, &mut batch, cfg.id, &ctx);
        batch.put_cf(engine.cf(CF_META), b"cluster_id", ctx.cluster_id.to_be_bytes());
    }
    if !batch.is_empty() {
        engine.write(batch, true)?;
    }
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: cfg.pre_vote,
        // The leader tells followers a new commit index with its next appends, or once
        // per turn when it has none to send (`tell_commit`), rather than on every ack.
        skip_bcast_commit: true,
        ..Default::default()
    };
    let only_voter = log.conf_state().voters == [cfg.id] && log.conf_state().learners.is_empty();
    let mut node = RawNode::new(&raft_cfg, log, &logger::logger())
        .map_err(|e| EngineError::Corrupt { cf: "raft_state", what: e.to_string() })?;
    if only_voter {
        // Nobody else can win; waiting out an election timeout would only delay start.
        let _ = node.campaign();
    }
    let (tx, rx) = mpsc::sync_channel(cfg.queue_depth);
    let status = Arc::new(RaftStatus { id: cfg.id, cluster_id, ..Default::default() });
    wal.time_syncs(status.metrics.wal_fsync.clone());
    let cfg_membership = cfg.membership.clone();
    let driver = Driver {
        cfg,
        node,
        engine,
        store,
        status: status.clone(),
        rx,
        handled: 0,
        last_tick: Instant::now(),
        wal,
        writes: HashMap::new(),
        proposals: Vec::new(),
        forwarded: Vec::new(),
        applied_term: 0,
        commit_sent: 0,
        stalled: Vec::new(),
        reads_new: Vec::new(),
        reads_asked: HashMap::new(),
        reads_ready: Vec::new(),
        conf_waiters: Vec::new(),
        next_read_ctx: 1,
        commit_to_save: None,
        store_flush: None,
        transport,
        controller: Controller::new(cfg_membership),
        lost_reports: HashMap::new(),
        reported_incarnations: HashMap::new(),
        version_asked: None,
        too_old_warned: HashSet::new(),
        refused: None,
        lost_told: None,
        incarnation,
        ticks: 0,
        campaign_soon: false,
        no_leader_since: None,
        incoming: snapshots.incoming.clone(),
    };
    driver.publish_membership();
    let (max_request_bytes, request_timeout) = (driver.cfg.max_request_bytes, driver.cfg.request_timeout);
    let next_id = proposal_id_base(driver.cfg.id);
    let shared = Arc::new(Shared {
        driver: Mutex::new(driver),
        status: status.clone(),
        idle: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
        thread: OnceLock::new(),
    });
    let on_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || run(on_thread))
        .map_err(|source| EngineError::Io { what: "starting the raft thread".into(), source })?;
    let _ = shared.thread.set(thread.thread().clone());
    let handle = RaftHandle {
        tx,
        shared,
        status,
        next_id: Arc::new(AtomicU64::new(next_id)),
        max_request_bytes,
        request_timeout,
    };
    Ok(Started { handle, thread, incarnation })
}

/// A configuration change of one member as a log entry of its own.
fn conf_entry(term: u64, index: u64, change: ConfChangeType, node_id: u64, ctx: &MemberContext) -> Entry {
    let mut cc = ConfChange::default();
    cc.set_change_type(change);
    cc.node_id = node_id;
    cc.context = ctx.encode_to_vec().into();
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryConfChange);
    e.term = term;
    e.index = index;
    e.data = cc.write_to_bytes().unwrap_or_default().into();
    e
}

/// etcd's --force-new-cluster, for a member whose cluster lost its quorum for good:
/// the log's uncommitted tail is dropped, and the changes that leave this member the
/// only voter are appended at the commit index, committed (etcd does the same). They
/// are applied as the member starts, like any committed entries, and it then elects
/// itself. The others are removed as the cluster removes dead members (`rejoin`): a
/// member of the old cluster comes back only with an empty data dir, since the caller
/// also gives this member a new cluster id, which the mesh holds the old ones to.
/// Returns how many changes were appended.
fn force_new_cluster(log: &LogStore, batch: &mut WriteBatch, me: u64, ctx: &MemberContext) -> usize {
    let mut hs = log.hard_state();
    let cs = log.conf_state();
    let mut index = hs.commit;
    let mut next = || {
        index += 1;
        index
    };
    let mut entries = Vec::new();
    if !cs.voters_outgoing.is_empty() {
        // A joint configuration is left first: the removals below are simple changes.
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.term = hs.term;
        e.index = next();
        e.data = ConfChangeV2::default().write_to_bytes().unwrap_or_default().into();
        entries.push(e);
    }
    if !cs.voters.contains(&me) {
        entries.push(conf_entry(hs.term, next(), ConfChangeType::AddNode, me, ctx));
    }
    let mut others: Vec<u64> =
        cs.voters.iter().chain(&cs.voters_outgoing).chain(&cs.learners).chain(&cs.learners_next).copied().collect();
    others.sort_unstable();
    others.dedup();
    let rejoin = MemberContext { rejoin: true, ..Default::default() };
    for id in others.into_iter().filter(|id| *id != me) {
        entries.push(conf_entry(hs.term, next(), ConfChangeType::RemoveNode, id, &rejoin));
    }
    let dropped = log.last_index_cached().saturating_sub(hs.commit);
    tracing::warn!(
        removed = entries.len(),
        uncommitted_dropped = dropped,
        "--force-new-cluster: this member is made the only voter of a new cluster; \
         start it without the flag from now on, or each start does this again"
    );
    if let Some(last) = entries.last() {
        hs.commit = last.index;
        log.append(batch, &entries);
        log.set_hard_state(batch, &hs);
    }
    entries.len()
}

/// How long a leader waits for the cluster version it proposed before proposing it again.
const VERSION_RETRY: Duration = Duration::from_secs(5);

/// The newest protocol every member speaks: the oldest of the newest each speaks; None
/// while one has announced nothing.
pub fn common_protocol(protocols: impl IntoIterator<Item = Option<u32>>) -> Option<u32> {
    protocols.into_iter().try_fold(u32::MAX, |common, p| Some(common.min(p?)))
}

/// What stops a member whose cluster moved to a protocol newer than it speaks.
pub fn too_old(cluster: u32, speaks: u32) -> EngineError {
    EngineError::Unsupported(format!(
        "the cluster runs mesh protocol {cluster} and this member's build speaks up to {speaks}: \
         run a build that speaks {cluster} (a cluster is never downgraded)"
    ))
}

/// Proposal ids are unique across members and restarts: the low 16 bits of the member
/// id, then the start time in milliseconds, then a counter (as etcd's idutil).
fn proposal_id_base(member: u64) -> u64 {
    let millis =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    ((member & 0xffff) << 48) | ((millis & 0xff_ffff_ffff) << 8)
}

/// Most commands taken in one turn, so a flood of proposals cannot starve ticks.
const MAX_COMMANDS_PER_TURN: usize = 8192;

/// A flush of the store is started after this many times `log_keep` entries applied past
/// those the log keeps (fewer, larger SST files than a flush per `log_keep`), and at
/// least every `STORE_FLUSH_MAX` entries: what a crash makes the log apply again.
const STORE_FLUSH_EVERY: u64 = 4;
const STORE_FLUSH_MAX: u64 = 40_000;

/// Largest total of entry bytes in one proposal message. A turn's proposals go to Raft
/// in as few messages as this allows: the leader then sends one append per follower for
/// all of them, and a follower forwards them to the leader in one message.
const MAX_PROPOSAL_BATCH_BYTES: usize = 1 << 20;

/// A write waiting to enter the log, by its proposal id (its data is in `writes`).
type Proposal = u64;

/// The driver's thread: a turn whenever a command is queued or a tick is due.
fn run(shared: Arc<Shared>) {
    let mut wait = Duration::ZERO;
    loop {
        let mut d = if shared.alone() {
            // Parked without the lock, so that a client's task can take the turn.
            shared.idle.store(true, Ordering::Release);
            // Returns at once if woken since the last park: nothing queued is missed.
            std::thread::park_timeout(wait);
            shared.idle.store(false, Ordering::Release);
            let mut d = shared.lock();
            // A wake whose command a client's turn already took, with no tick due, is
            // no reason for a turn.
            if d.last_tick.elapsed() < d.cfg.tick {
                match d.rx.try_recv() {
                    Ok(cmd) => d.handle(cmd),
                    Err(TryRecvError::Empty) => {
                        wait = d.cfg.tick.saturating_sub(d.last_tick.elapsed());
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            d
        } else {
            // With peers every turn is this thread's: it waits on the queue itself.
            let mut d = shared.lock();
            match d.rx.recv_timeout(wait) {
                Ok(cmd) => d.handle(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            d
        };
        if !shared.turn(&mut d) {
            break;
        }
        wait = d.cfg.tick.saturating_sub(d.last_tick.elapsed());
    }
    tracing::info!("raft driver stopped");
}

impl Driver {
    /// One turn: the queued commands, a tick if due, then the Ready. False once every
    /// handle is gone.
    fn turn(&mut self) -> Result<bool, EngineError> {
        let mut open = true;
        for _ in 0..MAX_COMMANDS_PER_TURN {
            match self.rx.try_recv() {
                Ok(cmd) => self.handle(cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if let Some(why) = self.refused.take() {
            return Err(why);
        }
        if self.last_tick.elapsed() >= self.cfg.tick {
            self.last_tick = Instant::now();
            // A follower's ticks count towards its next campaign; held, it has none.
            if !self.cfg.hold_campaigns || self.node.raft.state == StateRole::Leader {
                self.node.tick();
            }
            self.ticks += 1;
            self.expire(self.last_tick);
            if self.ticks % 5 == 0 {
                self.control_membership(self.last_tick);
                self.raise_cluster_version(self.last_tick);
            }
        }
        let mut proposals = std::mem::take(&mut self.proposals);
        if self.node.raft.leader_id != raft::INVALID_ID && !self.stalled.is_empty() {
            let mut stalled = std::mem::take(&mut self.stalled);
            stalled.append(&mut proposals);
            proposals = stalled;
        }
        self.propose(proposals);
        self.tell_commit();
        self.ask_read_index();
        // The turn may commit more (this member's own sync counts): the followers
        // hear of it at once, not with the next turn's appends.
        self.on_ready()?;
        self.tell_commit();
        self.on_ready()?;
        self.status.last_batch.store(std::mem::take(&mut self.handled), Ordering::Relaxed);
        Ok(open)
    }

    /// Storage failed: every waiting client hears that this member stopped.
    fn fail(&mut self) {
        self.writes.clear();
        self.reads_new.clear();
        self.reads_asked.clear();
        self.reads_ready.clear();
        self.conf_waiters.clear();
        self.proposals.clear();
        self.stalled.clear();
        while self.rx.try_recv().is_ok() {}
    }

    fn handle(&mut self, cmd: Command) {
        self.handled += 1;
        match cmd {
            Command::Propose { id, data, reply, deadline } => {
                self.writes.insert(id, Write { waiter: Waiter { reply, deadline }, data, sent: Sent::No });
                self.proposals.push(id);
            }
            Command::Read { reply, deadline } => self.reads_new.push(Waiter { reply, deadline }),
            Command::Step(m, incarnation) if self.answers_for_lost_data(&m, incarnation) => {
                tracing::debug!(
                    recorded = ?self.node.raft.raft_log.store().incarnation(m.from),
                    from = format!("{:x}", m.from),
                    incarnation,
                    kind = ?m.get_msg_type(),
                    "answer of a member not yet taken back since it lost its data dropped"
                );
            }
            // Writes forwarded by a member, with the term it sent them in (0 from raft-rs's
            // own forwarding: membership changes, and members of older builds).
            Command::Step(mut m, _) if m.get_msg_type() == MessageType::MsgPropose && m.term != 0 => {
                let r = &self.node.raft;
                if r.state == StateRole::Leader && m.term == r.term {
                    let term = r.term;
                    self.forwarded.extend(m.take_entries().into_iter().map(|e| (term, e)));
                } else {
                    // Sent to the leader of another term: its sender proposes it again
                    // once it applies an entry of a later term.
                    tracing::debug!(
                        from = format!("{:x}", m.from),
                        term = m.term,
                        "forwarded write of another term dropped"
                    );
                }
            }
            Command::Step(mut m, _)
                if m.get_msg_type() == MessageType::MsgPropose && self.node.raft.state == StateRole::Leader =>
            {
                let term = self.node.raft.term;
                self.forwarded.extend(m.take_entries().into_iter().map(|e| (term, e)));
            }
            Command::Step(m, _) if self.refuse(&m) => {}
            Command::Step(m, _) => {
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "raft message rejected");
                }
            }
            Command::TransferLeader(to) if self.cfg.hold_campaigns && to == self.cfg.id => {
                tracing::info!("leadership not taken while campaigns are held");
            }
            Command::TransferLeader(to) => self.node.transfer_leader(to),
            Command::ReportSnapshot(to, status) => self.node.report_snapshot(to, status),
            Command::Campaign => self.cfg.hold_campaigns = false,
            Command::ChangeMembership { change, reply, deadline } => {
                if let Err(e) = self.admissible(&change) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let (t, id) = self.propose_change(change);
                self.conf_waiters.push((id, t, Waiter { reply, deadline }));
            }
            Command::LostLog { from, last_index, incarnation } => {
                if self.node.raft.state == StateRole::Leader {
                    self.lost_reports.insert(from, (last_index, Instant::now()));
                    self.reported_incarnations.insert(from, incarnation);
                }
            }
            Command::ClusterVersion { from, version } => {
                let voters = &self.node.raft.prs().conf().to_conf_state().voters;
                if version > self.cfg.protocol && (voters.is_empty() || voters.contains(&from)) {
                    self.refused = Some(too_old(version, self.cfg.protocol));
                }
            }
        }
    }

    /// An answer from a member that started with no data, in a start this member's log
    /// has not taken into the cluster (a member that lost its data and is not yet added
    /// back). Its acknowledgements and votes would speak for promises the member it was
    /// made and no longer remembers: counted by a leader that has not heard of the loss
    /// (one cut off from the others, say), they could commit what the others overwrote.
    fn answers_for_lost_data(&self, m: &Message, incarnation: u64) -> bool {
        incarnation != 0
            && matches!(
                m.get_msg_type(),
                MessageType::MsgAppendResponse
                    | MessageType::MsgHeartbeatResponse
                    | MessageType::MsgRequestVoteResponse
                    | MessageType::MsgRequestPreVoteResponse
            )
            && self.node.raft.raft_log.store().incarnation(m.from) != Some(incarnation)
    }

    /// Messages this member must not step. A heartbeat that commits past the end of
    /// the log comes from a leader that counts entries this member acknowledged and no
    /// longer has: its data was lost (raft-rs would panic). The leader hears so and
    /// has the cluster add it again. And a member that started with no configuration
    /// in its log (one that joins, or came back empty) does not vote until its log
    /// shows it added in this incarnation: whatever it acknowledged or voted for
    /// before is gone with its data, and the configurations it replays until then
    /// may still count it as the voter it was.
    fn refuse(&mut self, m: &Message) -> bool {
        match m.get_msg_type() {
            MessageType::MsgHeartbeat if m.commit > self.node.raft.raft_log.last_index() => {
                let last = self.node.raft.raft_log.last_index();
                let now = Instant::now();
                if self.lost_told.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(500)) {
                    if self.lost_told.is_none() {
                        tracing::error!(
                            leader = format!("{:x}", m.from),
                            commit = m.commit,
                            last_index = last,
                            "the leader counts log entries this member no longer has: its data was lost; \
                             waiting for the cluster to add it again"
                        );
                    }
                    self.lost_told = Some(now);
                    if let Some(t) = &self.transport {
                        t.tell_lost_log(m.from, last, self.incarnation);
                    }
                }
                true
            }
            // A leader handing over its lead: not taken while campaigns are held.
            MessageType::MsgTimeoutNow => self.cfg.hold_campaigns,
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
                self.incarnation != 0
                    && self.node.raft.raft_log.store().incarnation(self.cfg.id) != Some(self.incarnation)
            }
            _ => false,
        }
    }

    /// etcd's checks on a membership change a client asked for: a learner is promoted
    /// only once it holds nine tenths of the leader's log (judged by the leader), and
    /// with the strict check a voter is removed only if the voters left that this member
    /// can reach still make a quorum (removing one that cannot be reached takes nothing
    /// from the quorum).
    fn admissible(&self, change: &Change) -> Result<(), RaftError> {
        let r = &self.node.raft;
        match change {
            Change::Promote { id } => {
                if r.state != StateRole::Leader {
                    return Err(RaftError::NotLeader);
                }
                let matched = r.prs().get(*id).map_or(0, |p| p.matched);
                if !membership::in_sync(matched, r.raft_log.last_index()) {
                    return Err(RaftError::LearnerNotReady);
                }
                Ok(())
            }
            Change::Remove { id, .. } if self.cfg.strict_reconfig_check => {
                let voters = r.prs().conf().to_conf_state().voters;
                let reachable: Vec<u64> = self
                    .transport
                    .as_ref()
                    .map_or_else(Vec::new, |t| t.reachable().into_iter().map(|(id, _)| id).collect());
                if membership::quorum_kept_without(*id, self.cfg.id, &voters, &reachable) {
                    Ok(())
                } else {
                    Err(RaftError::Unhealthy)
                }
            }
            _ => Ok(()),
        }
    }

    /// Proposes one membership change; returns what to watch for when it applies.
    fn propose_change(&mut self, change: Change) -> (ConfChangeType, u64) {
        let names = self.node.raft.raft_log.store().members();
        let known = |id: u64| names.get(&id).cloned().unwrap_or_default();
        let (change_type, node_id, name, rejoin) = match change {
            Change::AddLearner { id, name } => (ConfChangeType::AddLearnerNode, id, name, false),
            Change::Promote { id } => (ConfChangeType::AddNode, id, known(id), false),
            Change::Remove { id, rejoin } => (ConfChangeType::RemoveNode, id, known(id), rejoin),
        };
        let incarnation = match change_type {
            ConfChangeType::AddLearnerNode => self.incarnation_of(node_id, &name),
            _ => 0,
        };
        tracing::info!(
            ?change_type,
            member = format!("{node_id:x}"),
            %name,
            rejoin,
            incarnation,
            "proposing a membership change"
        );
        let ctx = MemberContext { name, cluster_id: self.status.cluster_id(), rejoin, incarnation }.encode_to_vec();
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type);
        cc.node_id = node_id;
        cc.context = ctx.into();
        if let Err(e) = self.node.propose_conf_change(vec![], cc) {
            tracing::debug!(error = %e, "membership change not proposed");
        }
        (change_type, node_id)
    }

    /// The incarnation member `id` announces: its directory entry's, or what it reported
    /// with its lost log if the directory has not brought a newer one yet.
    fn incarnation_of(&self, id: u64, name: &str) -> u64 {
        let announced = self.transport.as_ref().and_then(|t| t.incarnation(name)).unwrap_or(0);
        match announced {
            0 => self.reported_incarnations.get(&id).copied().unwrap_or(0),
            u => u,
        }
    }

    /// On the leader: lets the membership controller propose the next change.
    fn control_membership(&mut self, now: Instant) {
        let Some(transport) = self.transport.clone() else { return };
        let r = &self.node.raft;
        if r.state != StateRole::Leader {
            return;
        }
        let cs = r.prs().conf().to_conf_state();
        let mut view = View {
            me: self.cfg.id,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            reachable: transport.reachable(),
            matched: r.prs().iter().map(|(id, p)| (*id, p.matched)).collect(),
            last_index: r.raft_log.last_index(),
            pending_conf_change: r.pending_conf_index > r.raft_log.applied,
            removed: self.node.raft.raft_log.store().removed(),
            lost: Vec::new(),
            too_old: Vec::new(),
        };
        self.lost_reports.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(5));
        view.lost = self
            .lost_reports
            .iter()
            .filter(|(id, (last, _))| view.matched.get(id).is_some_and(|m| m > last))
            .map(|(id, _)| *id)
            .collect();
        // A member that announces an incarnation other than the one it joined with
        // started again from an empty data dir.
        let log = self.node.raft.raft_log.store();
        let joined = log.incarnations();
        for (id, name) in log.members() {
            let announced = self.incarnation_of(id, &name);
            if announced != 0 && joined.get(&id) != Some(&announced) && !view.lost.contains(&id) {
                view.lost.push(id);
            }
        }
        for (id, _) in &view.reachable {
            if view.removed.contains(id) {
                transport.tell_removed(*id);
            }
        }
        // A newcomer whose build is older than the cluster version could not apply the
        // log: it is not added, and hears why (every half second while it stays).
        let version = self.store.cluster_version();
        let members: Vec<u64> = view.voters.iter().chain(&view.learners).copied().collect();
        for (id, name) in &view.reachable {
            let Some(speaks) = transport.protocol(name).filter(|p| *p < version) else { continue };
            if members.contains(id) {
                continue;
            }
            view.too_old.push(*id);
            transport.tell_cluster_version(*id, version);
            if self.too_old_warned.insert(*id) {
                tracing::warn!(
                    member = %name,
                    speaks,
                    cluster_version = version,
                    "a member whose build is older than the cluster version is not added"
                );
            }
        }
        self.too_old_warned.retain(|id| view.too_old.contains(id));
        match self.controller.decide(now, &view) {
            // A newcomer is added once it has announced its incarnation.
            Some(Change::AddLearner { name, .. }) if transport.incarnation(&name).is_none() => {}
            Some(change) => {
                if let Change::Remove { id, .. } = &change {
                    // Its reports speak of the progress the removal discards.
                    self.lost_reports.remove(id);
                }
                self.propose_change(change);
            }
            None => {}
        }
    }

    /// On the leader: raises the cluster version once every member announces a newer
    /// protocol than it, so that entries may use that protocol's formats; a member that
    /// has announced nothing holds it where it is. Proposed again if not applied soon.
    fn raise_cluster_version(&mut self, now: Instant) {
        let Some(transport) = self.transport.clone() else { return };
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        let names = self.node.raft.raft_log.store().members();
        let cs = self.node.raft.prs().conf().to_conf_state();
        let protocols = cs.voters.iter().chain(&cs.learners).map(|id| match *id == self.cfg.id {
            true => Some(self.cfg.protocol),
            false => names.get(id).and_then(|name| transport.protocol(name)),
        });
        let Some(v) = common_protocol(protocols) else { return };
        let current = self.store.cluster_version();
        if v <= current || self.version_asked.is_some_and(|(asked, at)| asked == v && now - at < VERSION_RETRY) {
            return;
        }
        self.version_asked = Some((v, now));
        tracing::info!(
            from = current,
            to = v,
            "every member speaks a newer mesh protocol; raising the cluster version"
        );
        let req = InternalRequest {
            request: Some(internal_request::Request::ClusterVersion(v)),
            by_member: true,
            ..Default::default()
        };
        if let Err(e) = self.node.propose(vec![], req.encode_to_vec()) {
            tracing::debug!(error = %e, "cluster version not proposed");
        }
    }

    /// Installs a snapshot whose data the transport fetched: the store's column families
    /// are replaced, the log restarts at the snapshot, and the store reloads.
    fn install_snapshot(&mut self, snap: &raft::eraftpb::Snapshot) -> Result<(), EngineError> {
        let started = Instant::now();
        let desc = SnapshotDescriptor::decode(snap.data.as_ref())
            .map_err(|e| EngineError::Corrupt { cf: "snapshot", what: e.to_string() })?;
        let staging = self.incoming.take(desc.id).ok_or_else(|| EngineError::Corrupt {
            cf: "snapshot",
            what: format!("snapshot {:x} was not fetched", desc.id),
        })?;
        // The log's records so far describe the log the snapshot replaces: they go to
        // RocksDB now and are never replayed over it.
        self.wal.next_lap()?;
        if desc.cluster_version > self.cfg.protocol {
            return Err(too_old(desc.cluster_version, self.cfg.protocol));
        }
        let meta = snap.get_metadata();
        let mut keys: Vec<(&[u8], Vec<u8>)> = vec![
            (b"applied_index", meta.index.to_be_bytes().to_vec()),
            (b"revision", (desc.revision as u64).to_be_bytes().to_vec()),
            (b"compact_revision", (desc.compact_revision as u64).to_be_bytes().to_vec()),
            (META_CLUSTER_VERSION, u64::from(desc.cluster_version).to_be_bytes().to_vec()),
        ];
        if desc.cluster_id != 0 && self.status.cluster_id() == 0 {
            keys.push((b"cluster_id", desc.cluster_id.to_be_bytes().to_vec()));
            self.status.cluster_id.store(desc.cluster_id, Ordering::Release);
        }
        let log = self.node.raft.raft_log.store();
        let raft_state = log.snapshot_state(meta, &desc.members.unwrap_or_default());
        self.store.replace_with(|| {
            super::snapshot::install(&self.engine, &staging, &keys, &raft_state)?;
            log.reload()
        })?;
        // The writes handed to a leader may be in the snapshot: applied, but never seen
        // here. Proposing them again could apply them twice; their clients time out.
        for w in self.writes.values_mut() {
            if matches!(w.sent, Sent::InTerm(_)) {
                w.sent = Sent::Unknown;
            }
        }
        self.applied_term = self.applied_term.max(meta.term);
        self.publish_membership();
        tracing::info!(
            index = meta.index,
            revision = self.store.revision(),
            secs = started.elapsed().as_secs_f64(),
            "snapshot installed"
        );
        Ok(())
    }

    fn publish_membership(&self) {
        let log = self.node.raft.raft_log.store();
        let cs = log.conf_state();
        let m = Membership { voters: cs.voters.clone(), learners: cs.learners.clone(), names: log.members() };
        self.status.is_learner.store(m.learners.contains(&self.cfg.id), Ordering::Release);
        let alone = m.voters == [self.cfg.id] && m.learners.is_empty();
        self.status.alone.store(alone, Ordering::Release);
        *self.status.membership.write().unwrap_or_else(|e| e.into_inner()) = m;
    }

    /// Proposes the entries followers forwarded this turn, then this member's writes, in
    /// as few messages as [`MAX_PROPOSAL_BATCH_BYTES`] allows. Writes that cannot go to
    /// a leader (none yet) wait in `stalled`; forwarded entries taken in an earlier term
    /// are dropped, and their members propose them again.
    fn propose(&mut self, proposals: Vec<Proposal>) {
        let r = &self.node.raft;
        let term = (r.state == StateRole::Leader).then_some(r.term);
        let forwarded = std::mem::take(&mut self.forwarded);
        let writes = &self.writes;
        let entries: Vec<(Entry, Option<Proposal>)> = forwarded
            .into_iter()
            .filter(|(t, _)| Some(*t) == term)
            .map(|(_, e)| (e, None))
            .chain(
                // A write whose client stopped waiting is not proposed.
                proposals.into_iter().filter_map(|id| {
                    let data = writes.get(&id)?.data.clone();
                    Some((Entry { data, ..Default::default() }, Some(id)))
                }),
            )
            .collect();
        let (mut batch, mut mine, mut bytes) = (Vec::new(), Vec::new(), 0);
        for (entry, proposal) in entries {
            if !batch.is_empty() && bytes + entry.data.len() > MAX_PROPOSAL_BATCH_BYTES {
                self.step_proposals(std::mem::take(&mut batch), std::mem::take(&mut mine));
                bytes = 0;
            }
            bytes += entry.data.len();
            batch.push(entry);
            mine.extend(proposal);
        }
        self.step_proposals(batch, mine);
    }

    fn step_proposals(&mut self, entries: Vec<Entry>, mine: Vec<Proposal>) {
        if entries.is_empty() {
            return;
        }
        // What RawNode::propose builds for one entry, here for many.
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.cfg.id;
        m.set_entries(entries.into());
        let r = &self.node.raft;
        let (term, leader) = (r.term, r.leader_id);
        let sent = match r.state {
            StateRole::Leader => match self.node.step(m) {
                // On the leader the appends just sent carry the commit index.
                Ok(()) => {
                    self.commit_sent = self.node.raft.raft_log.committed;
                    true
                }
                Err(e) => {
                    tracing::debug!(error = %e, count = mine.len(), "proposals held until there is a leader");
                    false
                }
            },
            // Forwarded here rather than by raft-rs, so as to carry the term the leader
            // must still be in to take them (see `Sent::InTerm`).
            StateRole::Follower if leader != raft::INVALID_ID => {
                m.to = leader;
                m.term = term;
                self.send(vec![m]);
                true
            }
            _ => false,
        };
        if !sent {
            self.stalled.extend(mine);
            return;
        }
        for id in mine {
            if let Some(w) = self.writes.get_mut(&id) {
                w.sent = Sent::InTerm(term);
            }
        }
    }

    /// After applying entries up to `term`: the writes handed to a leader in an earlier
    /// term and still not applied never will be, and are proposed again, in the order
    /// their clients sent them.
    fn propose_lost_again(&mut self, term: u64) {
        if term <= self.applied_term {
            return;
        }
        self.applied_term = term;
        let mut lost: Vec<u64> = self
            .writes
            .iter_mut()
            .filter(|(_, w)| matches!(w.sent, Sent::InTerm(t) if t < term))
            .map(|(id, w)| {
                w.sent = Sent::No;
                *id
            })
            .collect();
        if lost.is_empty() {
            return;
        }
        lost.sort_unstable();
        tracing::info!(count = lost.len(), term, "writes lost with a leader change proposed again");
        self.status.metrics.proposals_retried.inc_by(lost.len() as u64);
        self.stalled.extend(lost);
    }

    /// On the leader: sends the followers a commit index they have not heard yet (with
    /// whatever entries they still miss).
    fn tell_commit(&mut self) {
        let r = &mut self.node.raft;
        if r.state == StateRole::Leader && r.raft_log.committed > self.commit_sent {
            self.commit_sent = r.raft_log.committed;
            r.bcast_append();
        }
    }

    fn ask_read_index(&mut self) {
        let r = &self.node.raft;
        if self.reads_new.is_empty() || r.leader_id == raft::INVALID_ID {
            return;
        }
        if r.state == StateRole::Leader && !r.commit_to_current_term() {
            // raft-rs drops a ReadIndex until the leader has committed in its term.
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let batch = std::mem::take(&mut self.reads_new);
        let led = (r.state == StateRole::Leader).then_some(r.term);
        self.reads_asked.insert(ctx, Round { waiters: batch, asked: Instant::now(), led });
        // The leader keeps one pending round per context: it must be unique across the
        // members, or a follower's round that meets another member's with the same number
        // is dropped and only asked again half an election timeout later.
        let mut c = Vec::with_capacity(16);
        c.extend_from_slice(&self.cfg.id.to_be_bytes());
        c.extend_from_slice(&ctx.to_be_bytes());
        self.node.read_index(c);
    }

    /// Fails every request whose client has stopped waiting, so nothing here grows
    /// without bound when a round or an entry is lost.
    fn expire(&mut self, now: Instant) {
        // A request that waited two election timeouts without a leader would wait in vain
        // (the member has had none for that long too): tell its client now rather than at
        // its deadline. One that came later still waits out its two: a member that has
        // had no leader since it started may be about to elect one.
        if self.node.raft.leader_id == raft::INVALID_ID {
            let since = *self.no_leader_since.get_or_insert(now);
            let patience = self.cfg.tick * (2 * self.cfg.election_ticks) as u32;
            // Each waiter's deadline is its arrival and the request timeout.
            let request_timeout = self.cfg.request_timeout;
            let waited_in_vain = |deadline: Instant| {
                let arrived = deadline.checked_sub(request_timeout).unwrap_or(since).max(since);
                now.saturating_duration_since(arrived) > patience
            };
            let writes = &mut self.writes;
            self.stalled.retain(|id| match writes.get(id) {
                Some(w) if waited_in_vain(w.waiter.deadline) => {
                    if let Some(w) = writes.remove(id) {
                        let _ = w.waiter.reply.send(Err(RaftError::NoLeader));
                    }
                    false
                }
                Some(_) => true,
                None => false,
            });
            let (failed, waiting): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.reads_new).into_iter().partition(|w| waited_in_vain(w.deadline));
            self.reads_new = waiting;
            for w in failed {
                let _ = w.reply.send(Err(RaftError::NoLeader));
            }
        } else {
            self.no_leader_since = None;
        }
        self.writes.retain(|_, w| w.waiter.deadline > now);
        self.conf_waiters.retain(|(_, _, w)| w.deadline > now);
        let writes = &self.writes;
        self.stalled.retain(|id| writes.contains_key(id));
        // A round can be lost (a leader change drops it silently): ask again.
        let retry = self.cfg.tick * self.cfg.election_ticks as u32 / 2;
        let lost: Vec<u64> =
            self.reads_asked.iter().filter(|(_, round)| now - round.asked > retry).map(|(k, _)| *k).collect();
        for ctx in lost {
            if let Some(round) = self.reads_asked.remove(&ctx) {
                self.reads_new.extend(round.waiters);
            }
        }
        self.reads_new.retain(|w| w.deadline > now);
        for (_, ws) in &mut self.reads_ready {
            ws.retain(|w| w.deadline > now);
        }
        self.reads_ready.retain(|(_, ws)| !ws.is_empty());
    }

    fn send(&mut self, msgs: Vec<Message>) {
        match &self.transport {
            Some(t) => {
                for m in msgs {
                    t.send(m);
                }
            }
            None if !msgs.is_empty() => tracing::trace!(count = msgs.len(), "raft messages with no transport"),
            None => {}
        }
    }

    fn on_ready(&mut self) -> Result<(), EngineError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        // Before anything is applied and answered: a reply's header carries the term.
        self.publish();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        self.apply(rd.take_committed_entries())?;
        let compact_to = self.compactable(self.node.raft.raft_log.store().first_index_cached())?;

        let mut batch = WriteBatch::default();
        let log = self.node.raft.raft_log.store();
        log.append(&mut batch, rd.entries());
        // As etcd's MustSync: new entries, a new term or a vote must be on disk before
        // anyone hears of them; a commit index alone need not be (it is learned again
        // from the leader, and the WAL keeps it in order with what follows).
        let mut sync = !rd.entries().is_empty();
        if let Some(hs) = rd.hs() {
            let before = log.hard_state();
            sync |= hs.term != before.term || hs.vote != before.vote;
            log.set_hard_state(&mut batch, hs);
            self.commit_to_save = None;
        } else if let Some(c) = self.commit_to_save.take() {
            log.set_commit(&mut batch, c);
        }
        if let Some(upto) = compact_to {
            log.compact(&mut batch, upto).map_err(|e| EngineError::Corrupt { cf: "raft_log", what: e.to_string() })?;
        }
        if !batch.is_empty() {
            self.wal.write(batch, sync)?;
        }
        for rs in rd.take_read_states() {
            let ctx = match rs.request_ctx.split_at_checked(8) {
                Some((id, n)) if id == self.cfg.id.to_be_bytes() => n.try_into().map(u64::from_be_bytes).unwrap_or(0),
                _ => 0,
            };
            if let Some(round) = self.reads_asked.remove(&ctx) {
                let r = &self.node.raft;
                // The leader's own round: a quorum heard from it as leader after it was
                // asked, so no other leader can have been elected before then.
                if round.led == Some(r.term) && r.state == StateRole::Leader {
                    self.status.confirm_leadership(r.term, round.asked);
                }
                self.reads_ready.push((rs.index, round.waiters));
            }
        }
        self.send(rd.take_persisted_messages());

        let mut light = self.node.advance(rd);
        if let Some(c) = light.commit_index() {
            self.commit_to_save = Some(c);
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        if std::mem::take(&mut self.campaign_soon) {
            let _ = self.node.campaign();
        }
        self.release_reads();
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let r = &self.node.raft;
        self.status.term.store(r.term, Ordering::Release);
        let leading = if r.state == StateRole::Leader { r.term } else { 0 };
        if leading != 0 {
            let mut from = self.status.led_from.lock().unwrap_or_else(|e| e.into_inner());
            if from.0 != leading {
                // Becoming leader appended an empty entry of the new term, perhaps with
                // proposals after it: the first entry of the term is that one.
                let mut first = r.raft_log.last_index();
                while r.raft_log.term(first - 1).is_ok_and(|t| t == leading) {
                    first -= 1;
                }
                *from = (leading, first);
            }
        }
        self.status.leading.store(leading, Ordering::Release);
        let was = self.status.leader.swap(r.leader_id, Ordering::AcqRel);
        if r.leader_id != 0 && r.leader_id != was {
            self.status.metrics.leader_changes.inc();
        }
        self.status.commit.store(r.raft_log.committed, Ordering::Release);
        self.status.last_index.store(r.raft_log.last_index(), Ordering::Release);
        if r.state == StateRole::Leader && r.leader_id != self.cfg.id {
            tracing::warn!("leader state without own id");
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), EngineError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut reqs = Vec::with_capacity(entries.len());
        // A deposed leader's decisions that reached a later term: applied as no-ops.
        let mut fenced = Vec::new();
        for e in &entries {
            let req = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => None,
                EntryType::EntryNormal => match InternalRequest::decode(e.data.as_ref()) {
                    Ok(r) if r.leader_term != 0 && r.leader_term != e.term => {
                        tracing::info!(
                            index = e.index,
                            decided = r.leader_term,
                            term = e.term,
                            "dropped a decision of an earlier term's leader"
                        );
                        fenced.push(r.id);
                        None
                    }
                    Ok(r) => {
                        if let Some(internal_request::Request::ClusterVersion(v)) = r.request {
                            if v > self.cfg.protocol {
                                return Err(too_old(v, self.cfg.protocol));
                            }
                        }
                        Some(r)
                    }
                    Err(err) => {
                        tracing::error!(index = e.index, error = %err, "undecodable entry skipped");
                        None
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(e)?;
                    None
                }
            };
            reqs.push((e.index, req));
        }
        let started = Instant::now();
        let (results, held) = self.store.apply_held(&reqs).map_err(|e| match e {
            MvccError::Engine(e) => e,
            e => EngineError::Corrupt { cf: "kv", what: e.to_string() },
        })?;
        let took = started.elapsed();
        self.status.metrics.backend_commit.observe(took.as_secs_f64());
        if took > self.cfg.warning_apply_duration {
            tracing::warn!(
                ?took,
                expected = ?self.cfg.warning_apply_duration,
                entries = reqs.len(),
                "apply request took too long"
            );
        }
        for ((_, req), res) in reqs.into_iter().zip(results) {
            let Some(req) = req else { continue };
            if let Some(w) = self.writes.remove(&req.id) {
                let _ = w.waiter.reply.send(res.map_err(RaftError::Apply));
            }
        }
        for id in fenced {
            if let Some(w) = self.writes.remove(&id) {
                let _ = w.waiter.reply.send(Err(RaftError::NotLeader));
            }
        }
        self.propose_lost_again(entries.last().map_or(0, |e| e.term));
        // The writers' tasks are woken first; the watchers' streams after them.
        drop(held);
        self.release_reads();
        Ok(())
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Result<(), EngineError> {
        let cc = if e.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&e.data).map(raft_proto::ConfChangeI::into_v2)
        } else {
            ConfChangeV2::parse_from_bytes(&e.data)
        };
        let cc = match cc {
            Ok(cc) => cc,
            Err(err) => {
                tracing::error!(index = e.index, error = %err, "undecodable configuration change skipped");
                return Ok(());
            }
        };
        let ctx = MemberContext::decode(cc.context.as_ref()).unwrap_or_default();
        match self.node.apply_conf_change(&cc) {
            Ok(cs) => {
                let mut batch = WriteBatch::default();
                let log = self.node.raft.raft_log.store();
                log.set_conf_state(&mut batch, &cs);
                let mut names = log.members();
                let mut removed = log.removed();
                let mut incarnations = log.incarnations();
                for c in &cc.changes {
                    match c.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            if !ctx.name.is_empty() {
                                names.insert(c.node_id, ctx.name.clone());
                            }
                            if ctx.incarnation != 0 {
                                incarnations.insert(c.node_id, ctx.incarnation);
                            }
                            removed.retain(|r| *r != c.node_id);
                        }
                        ConfChangeType::RemoveNode if ctx.rejoin => {
                            // The cluster's own removal: added back when it is reachable.
                            names.remove(&c.node_id);
                            incarnations.remove(&c.node_id);
                            if c.node_id == self.cfg.id {
                                tracing::warn!("this member was removed by the cluster; it is added back as a learner");
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            names.remove(&c.node_id);
                            incarnations.remove(&c.node_id);
                            if !removed.contains(&c.node_id) {
                                removed.push(c.node_id);
                            }
                            if c.node_id == self.cfg.id {
                                tracing::error!("this member was removed from the cluster");
                                self.status.removed.store(true, Ordering::Release);
                            }
                        }
                    }
                }
                log.set_membership(&mut batch, names, removed, incarnations);
                for c in &cc.changes {
                    let (t, id) = (c.get_change_type(), c.node_id);
                    let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.conf_waiters)
                        .into_iter()
                        .partition(|(wid, wt, _)| *wid == id && *wt == t);
                    self.conf_waiters = waiting;
                    for (_, _, w) in done {
                        let _ = w.reply.send(Ok(()));
                    }
                }
                if ctx.cluster_id != 0 && self.status.cluster_id() == 0 {
                    // A joining member learns its cluster when it is added: from the peers
                    // that add it, for the log's first changes may carry the id a cluster
                    // had before --force-new-cluster gave it a new one.
                    let seen = self.transport.as_ref().map_or(0, |t| t.cluster_seen());
                    let cluster = if seen != 0 { seen } else { ctx.cluster_id };
                    batch.put_cf(self.engine.cf(CF_META), b"cluster_id", cluster.to_be_bytes());
                    self.status.cluster_id.store(cluster, Ordering::Release);
                    tracing::info!(cluster = format!("{cluster:x}"), "joined the cluster");
                }
                self.engine.write(batch, true)?;
                self.publish_membership();
                // The only voter: nobody else can win, so no need to wait out a timeout
                // (once the change is applied: raft-rs will not campaign before).
                self.campaign_soon =
                    cs.voters == [self.cfg.id] && cs.learners.is_empty() && self.node.raft.state != StateRole::Leader;
                Ok(())
            }
            Err(err) => {
                tracing::warn!(index = e.index, error = %err, "configuration change rejected");
                Ok(())
            }
        }
    }

    /// The index the log may be compacted to (the first entry it keeps), if it is time.
    ///
    /// The store's writes reach the disk only when its column families are flushed, so
    /// an entry leaves the log only once the flushed state covers it; the last `log_keep`
    /// entries stay for followers that lag. A flush is started every few `log_keep`
    /// entries (at most `STORE_FLUSH_MAX`) and, once done, lets the log shed what it
    /// covers.
    ///
    /// A snapshot being served pins the log from its index on until its member's progress
    /// reaches it: the member needs the entries after it once it has installed it.
    fn compactable(&mut self, first: u64) -> Result<Option<u64>, EngineError> {
        let keep = self.cfg.log_keep;
        let applied = self.store.applied_index();
        if applied < first + keep + (STORE_FLUSH_EVERY * keep).min(STORE_FLUSH_MAX) {
            return Ok(None);
        }
        // A member gone from the group, or whose progress reached the snapshot, has it.
        let prs = self.node.raft.prs();
        let caught_up = |to: u64, index: u64| prs.get(to).is_none_or(|p| p.matched >= index);
        let pin = self.node.raft.raft_log.store().snapshot_pin(caught_up).map_or(u64::MAX, |i| i + 1);
        if pin <= first {
            return Ok(None);
        }
        let Some(asked) = self.store_flush else {
            self.store.start_flush()?;
            self.store_flush = Some(applied);
            return Ok(None);
        };
        let durable = self.store.durable_applied_index()?;
        if durable < asked {
            return Ok(None);
        }
        self.store_flush = None;
        Ok(Some((durable + 1).min(applied - keep).min(pin)))
    }

    fn release_reads(&mut self) {
        let applied = self.store.applied_index();
        self.reads_ready.retain_mut(|(index, waiters)| {
            if *index > applied {
                return true;
            }
            for w in waiters.drain(..) {
                let _ = w.reply.send(Ok(()));
            }
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::{ConfState, HardState};
    use raft::Storage as _;

    use super::*;

    /// A log of `last` normal entries at term 2, committed to `commit`, in `conf`; then
    /// forced for member 1. What raft-rs makes of it: the configuration once the
    /// committed entries are applied, and whether member 1 then elects itself.
    fn forced(conf: ConfState, commit: u64, last: u64) -> (Vec<Entry>, ConfState, StateRole) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let log = LogStore::open(engine.clone()).unwrap();
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry> =
            (1..=last).map(|index| Entry { index, term: 2, data: vec![1].into(), ..Default::default() }).collect();
        log.append(&mut batch, &entries);
        log.set_conf_state(&mut batch, &conf);
        log.set_hard_state(&mut batch, &HardState { term: 2, vote: 2, commit, ..Default::default() });
        let ctx = MemberContext { name: "a".into(), cluster_id: 7, ..Default::default() };
        force_new_cluster(&log, &mut batch, 1, &ctx);
        engine.write(batch, true).unwrap();
        let appended =
            log.entries(commit + 1, log.last_index_cached() + 1, None, raft::GetEntriesContext::empty(false));
        let appended = appended.unwrap();

        let cfg = raft::Config { id: 1, applied: commit, ..Default::default() };
        let mut node = RawNode::new(&cfg, log, &logger::logger()).unwrap();
        let mut cs = conf;
        while node.has_ready() {
            let mut rd = node.ready();
            for e in rd.take_committed_entries() {
                if e.get_entry_type() == EntryType::EntryConfChange {
                    let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
                    cs = node.apply_conf_change(&cc).unwrap();
                } else if e.get_entry_type() == EntryType::EntryConfChangeV2 {
                    cs = node.apply_conf_change(&ConfChangeV2::parse_from_bytes(&e.data).unwrap()).unwrap();
                }
            }
            let mut light = node.advance(rd);
            light.take_committed_entries();
            node.advance_apply();
        }
        node.campaign().unwrap();
        let _ = node.ready();
        (appended, cs, node.raft.state)
    }

    fn changes(entries: &[Entry]) -> Vec<(u64, ConfChangeType, u64, bool)> {
        entries
            .iter()
            .map(|e| match e.get_entry_type() {
                EntryType::EntryConfChangeV2 => (e.index, ConfChangeType::AddNode, 0, false),
                _ => {
                    let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
                    let ctx = MemberContext::decode(cc.context.as_ref()).unwrap();
                    (e.index, cc.get_change_type(), cc.node_id, ctx.rejoin)
                }
            })
            .collect()
    }

    #[test]
    fn a_forced_voter_drops_the_uncommitted_tail_and_removes_the_others() {
        let conf = ConfState { voters: vec![1, 2, 3], learners: vec![4], ..Default::default() };
        let (appended, cs, role) = forced(conf, 7, 10);
        use ConfChangeType::RemoveNode;
        assert_eq!(changes(&appended), [(8, RemoveNode, 2, true), (9, RemoveNode, 3, true), (10, RemoveNode, 4, true)]);
        assert!(appended.iter().all(|e| e.term == 2), "the entries at 8..10 are the forced ones, at the log's term");
        assert_eq!((cs.voters, cs.learners), (vec![1], vec![]));
        assert_eq!(role, StateRole::Leader);
    }

    #[test]
    fn a_forced_learner_in_a_joint_configuration_leaves_it_and_becomes_the_voter() {
        let conf =
            ConfState { voters: vec![2, 3], voters_outgoing: vec![2, 3, 5], learners: vec![1], ..Default::default() };
        let (appended, cs, role) = forced(conf, 5, 5);
        use ConfChangeType::{AddNode, RemoveNode};
        assert_eq!(
            changes(&appended),
            [
                (6, AddNode, 0, false),
                (7, AddNode, 1, false),
                (8, RemoveNode, 2, true),
                (9, RemoveNode, 3, true),
                (10, RemoveNode, 5, true)
            ]
        );
        assert_eq!((cs.voters, cs.learners, cs.voters_outgoing), (vec![1], vec![], vec![]));
        assert_eq!(role, StateRole::Leader);
    }

    /// A lone member on the data in `dir`, and its term once it leads.
    async fn lone_leader(dir: &std::path::Path) -> (Started, Arc<MvccStore>, u64) {
        let engine = Engine::open(dir).unwrap();
        let store = Arc::new(MvccStore::open(engine.clone()).unwrap());
        let mut cfg = RaftConfig::new(1, "m".to_string());
        cfg.tick = Duration::from_millis(10);
        let snapshots = Snapshots {
            outgoing: Arc::new(super::super::snapshot::Outgoing::new(dir.join("snap-out"))),
            incoming: Arc::new(super::super::snapshot::Incoming::new(dir.join("snap-in"))),
        };
        let cluster_id = Arc::new(AtomicU64::new(7));
        let started = start(cfg, engine, store.clone(), None, Bootstrap::Single, cluster_id, snapshots).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let term = loop {
            if let Some(t) = started.handle.status().leading_term() {
                break t;
            }
            assert!(Instant::now() < deadline, "the lone member never led");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        (started, store, term)
    }

    /// A decision proposed as the leader of a term is applied only in an entry of that
    /// term: proposed for another, it fails and the store does not change.
    #[tokio::test]
    async fn a_leaders_decision_is_applied_only_in_its_own_term() {
        use crate::pb::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest};
        let dir = tempfile::tempdir().unwrap();
        let (started, store, term) = lone_leader(dir.path()).await;
        let raft = started.handle;
        let grant = internal_request::Request::LeaseGrant(LeaseGrantRequest { ttl: 60, id: 5 });
        raft.propose(grant).await.unwrap();
        let revoke = || internal_request::Request::LeaseRevoke(LeaseRevokeRequest { id: 5 });
        let applied = store.applied_index();
        let stale = raft.propose_as_leader(revoke(), term - 1).await;
        assert!(matches!(stale, Err(RaftError::NotLeader)), "{stale:?}");
        assert!(store.leases().get(5).is_some(), "an earlier term's decision changed nothing");
        assert!(store.applied_index() > applied, "its entry was applied, as a no-op");
        raft.propose_as_leader(revoke(), term).await.unwrap();
        assert!(store.leases().get(5).is_none(), "this term's decision is applied");
    }

    #[test]
    fn the_cluster_version_is_what_every_member_speaks() {
        assert_eq!(common_protocol([Some(3), Some(4), Some(4)]), Some(3));
        assert_eq!(common_protocol([Some(4), Some(4)]), Some(4));
        assert_eq!(common_protocol([Some(4), None]), None, "one that announced nothing holds it");
    }

    /// A leader knows where its own entries start: everything an earlier leader wrote
    /// comes before, and what it grants comes after. The lessor waits for the first to
    /// be applied, and tells inherited leases by the second.
    #[tokio::test]
    async fn a_new_leader_knows_where_its_own_entries_start() {
        use crate::pb::etcdserverpb::LeaseGrantRequest;
        let grant = |id| internal_request::Request::LeaseGrant(LeaseGrantRequest { ttl: 60, id });
        let dir = tempfile::tempdir().unwrap();
        let (started, store, first_term) = lone_leader(dir.path()).await;
        started.handle.propose(grant(5)).await.unwrap();
        let before = store.applied_index();
        let (_, from) = started.handle.status().leading_from().unwrap();
        assert!(from <= store.leases().get(5).unwrap().granted_at, "the grant is the leader's own entry");
        drop(started.handle);
        started.thread.join().unwrap();
        drop(store);

        let (started, store, term) = lone_leader(dir.path()).await;
        assert!(term > first_term);
        let (led, from) = started.handle.status().leading_from().unwrap();
        assert_eq!(led, term);
        assert!(from > before, "its own entries start at {from}, after the earlier term's last at {before}");
        assert_eq!(store.leases().get(5).unwrap().granted_at, 0, "read from disk: an earlier term's");
        started.handle.propose(grant(6)).await.unwrap();
        assert!(store.leases().get(6).unwrap().granted_at >= from, "granted in its own term");
        assert!(store.applied_index() >= from);
    }
}

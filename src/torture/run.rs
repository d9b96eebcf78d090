//! The harness: N real `meshkv` members on loopback (or on hosts of their own in network
//! namespaces), concurrent clients on a small key space, faults from a seeded schedule,
//! and the checks at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

use super::check::{self, Input, Op, Output};
use super::election::{self, ElectionLog};
use super::lease::{self, LeaseLog};
use super::lock::{self, LockLog};
use super::netns::Netns;
use super::ports::free_port;
use crate::pb::etcdserverpb::cluster_client::ClusterClient;
use crate::pb::etcdserverpb::kv_client::KvClient;
use crate::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::pb::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, HashKvRequest, MemberListRequest, PutRequest, RangeRequest,
    RequestOp, StatusRequest, StatusResponse, TxnRequest,
};
use crate::raft::transport::member_id;

/// Faults the schedule draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9, then restart.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Pause,
    /// Cut one member off from the others at the mesh, then heal.
    Partition,
    /// One member drops what one other sends it (heartbeats excepted), at the mesh.
    OneWay,
    /// A real network partition between namespaces: one member's routes to the others
    /// blackholed, or its link pulled. Runs members in network namespaces (root only).
    NetPartition,
    /// A follower falls behind while down; as the leader streams it a snapshot, the
    /// leader is killed.
    SnapshotLeaderKill,
    /// A new member joins under load (and stays as a learner or voter).
    Join,
    /// A voter dies for good and the cluster replaces it with a learner.
    Replace,
    /// kill -9, the data dir deleted (a lost disk), then restart under the same name.
    Wipe,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Partition,
        Fault::OneWay,
        Fault::NetPartition,
        Fault::SnapshotLeaderKill,
        Fault::Join,
        Fault::Replace,
        Fault::Wipe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::OneWay => "one-way",
            Fault::NetPartition => "net-partition",
            Fault::SnapshotLeaderKill => "snapshot-leader-kill",
            Fault::Join => "join",
            Fault::Replace => "replace",
            Fault::Wipe => "wipe",
        }
    }

    pub fn parse(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }
}

#[derive(Clone, Debug)]
pub struct TortureConfig {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub members: usize,
    pub clients: usize,
    pub keys: usize,
    /// Lease holders (see `lease`).
    pub leases: usize,
    /// Clients that take one lock in turns (see `lock`).
    pub lockers: usize,
    /// Candidates in one election, followed by observers (see `election`).
    pub candidates: usize,
    pub duration: Duration,
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// Extra flags for every member (for example a deliberately broken read path).
    pub member_args: Vec<String>,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub ops: usize,
    pub unknown: usize,
    pub faults: usize,
    /// Faults injected, by kind.
    pub by_kind: BTreeMap<String, usize>,
    /// Keys whose history is not linearizable, with the file holding the shortest failing history.
    pub violations: Vec<(String, PathBuf)>,
    /// HashKV per member at one revision, when they disagree.
    pub hash_mismatch: Option<Vec<u32>>,
    /// Events a resuming watcher saw, and what was wrong with them.
    pub watch_events: usize,
    pub watch_problems: Vec<String>,
    /// Voters killed for good that the cluster did not replace in time: the membership
    /// controller's promise, broken.
    pub unreplaced: Vec<String>,
    /// What the lease holders did, and leases that ended too soon or lost half their keys.
    pub leases: LeaseLog,
    /// What the lockers did, and counters that changed under a held lock.
    pub locks: LockLog,
    /// What the candidates and observers did, and two leaders at once, leaders told out
    /// of order, values an observer missed.
    pub elections: ElectionLog,
}

impl Report {
    /// Nothing wrong was found, and something was checked: a run in which no operation
    /// got an answer (members that never served) proves nothing.
    pub fn ok(&self) -> bool {
        self.answered()
            && self.violations.is_empty()
            && self.hash_mismatch.is_none()
            && self.watch_problems.is_empty()
            && self.unreplaced.is_empty()
            && self.leases.problems.is_empty()
            && self.locks.problems.is_empty()
            && self.elections.problems.is_empty()
    }

    /// Some operation's outcome is known.
    pub fn answered(&self) -> bool {
        self.ops > self.unknown
    }
}

/// Raft entries between snapshots on every member: small, so that members that fall
/// behind are sent snapshots often.
const SNAPSHOT_COUNT: u64 = 500;
/// How long a voter may be gone before it is replaced: longer than any fault holds one.
const DEAD_MEMBER_SECS: u64 = 10;

struct Member {
    index: usize,
    name: String,
    endpoint: String,
    peer_addr: String,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// Killed for good (replaced): no longer part of the cluster.
    retired: bool,
}

impl Member {
    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }
}

pub(super) async fn channel(ep: &str) -> Option<Channel> {
    connect(ep, Some(Duration::from_secs(1))).await
}

/// A channel to `ep` whose calls each fail after `timeout` (None: calls that may wait).
pub(super) async fn connect(ep: &str, timeout: Option<Duration>) -> Option<Channel> {
    let endpoint = Endpoint::from_shared(ep.to_string()).ok()?.connect_timeout(Duration::from_millis(500));
    match timeout {
        Some(t) => endpoint.timeout(t),
        None => endpoint,
    }
    .connect()
    .await
    .ok()
}

async fn status(ep: &str) -> Option<StatusResponse> {
    let ch = channel(ep).await?;
    MaintenanceClient::new(ch).status(StatusRequest {}).await.ok().map(|r| r.into_inner())
}

fn block_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("block-{name}"))
}

/// The members and the network they run on.
struct Cluster {
    cfg: TortureConfig,
    members: Vec<Member>,
    netns: Option<Netns>,
    /// Client endpoints of the members in the cluster, shared with the clients.
    endpoints: Arc<RwLock<Vec<String>>>,
    /// Voters killed for good and not replaced in time. Once there is one, no other voter
    /// is killed for good: a second would take the quorum, and the rest of the run with it.
    unreplaced: Vec<String>,
}

impl Cluster {
    /// Creates member `index` (not started); founders wait for each other, others join.
    fn add_member(&mut self, founders: Option<usize>, join: &str) -> std::io::Result<usize> {
        let index = self.members.len();
        let name = format!("m{index}");
        let (host, client_port, peer_port) = match &mut self.netns {
            Some(n) => {
                n.add_host(index)?;
                // A host of its own: its ports cannot collide with anyone's.
                (n.addr(index), 2379, 2380)
            }
            None => ("127.0.0.1".to_string(), free_port(), free_port()),
        };
        let data_dir = self.cfg.dir.join(&name);
        let mut args: Vec<String> = [
            "--name",
            &name,
            "--data-dir",
            &data_dir.display().to_string(),
            "--listen-client-urls",
            &format!("http://{host}:{client_port}"),
            "--listen-peer-urls",
            &format!("http://{host}:{peer_port}"),
            "--mesh-block-file",
            &block_file(&self.cfg.dir, &name).display().to_string(),
            "--snapshot-count",
            &SNAPSHOT_COUNT.to_string(),
            "--voters",
            &self.cfg.members.to_string(),
            "--dead-member-timeout",
            &DEAD_MEMBER_SECS.to_string(),
            "--log-level",
            "info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !join.is_empty() {
            args.extend(["--join".to_string(), join.to_string()]);
        }
        if let Some(n) = founders {
            args.extend(["--bootstrap-expect".to_string(), n.to_string()]);
        }
        args.extend(self.cfg.member_args.iter().cloned());
        std::fs::write(block_file(&self.cfg.dir, &name), "")?;
        self.members.push(Member {
            index,
            log: self.cfg.dir.join(format!("{name}.log")),
            name,
            endpoint: format!("http://{host}:{client_port}"),
            peer_addr: format!("{host}:{peer_port}"),
            data_dir,
            args,
            child: None,
            retired: false,
        });
        Ok(index)
    }

    fn start(&mut self, i: usize) -> std::io::Result<()> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log)?;
        let mut cmd = match &self.netns {
            Some(n) => n.command(m.index, &self.cfg.binary),
            None => std::process::Command::new(&self.cfg.binary),
        };
        let child =
            cmd.args(&m.args).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        self.members.iter().filter(|m| !m.retired).map(|m| m.index).collect()
    }

    fn publish_endpoints(&self) {
        let eps = self.members.iter().filter(|m| !m.retired).map(|m| m.endpoint.clone()).collect();
        *self.endpoints.write().unwrap_or_else(|e| e.into_inner()) = eps;
    }

    fn by_id(&self, id: u64) -> Option<usize> {
        self.members.iter().find(|m| !m.retired && member_id(&m.name) == id).map(|m| m.index)
    }

    /// The member the others follow, as the first member that answers says.
    async fn leader(&self) -> Option<usize> {
        for i in self.live() {
            if let Some(s) = status(&self.members[i].endpoint).await {
                if s.leader != 0 {
                    return self.by_id(s.leader);
                }
            }
        }
        None
    }

    /// The cluster's members as one that answers lists them: (name, is_learner).
    async fn member_list(&self) -> Option<Vec<(String, bool)>> {
        self.member_list_from(self.live()).await
    }

    /// The member list as the first of `members` that answers sees it.
    async fn member_list_from(&self, members: Vec<usize>) -> Option<Vec<(String, bool)>> {
        for i in members {
            if let Some(ch) = channel(&self.members[i].endpoint).await {
                if let Ok(r) = ClusterClient::new(ch).member_list(MemberListRequest { linearizable: false }).await {
                    return Some(r.into_inner().members.into_iter().map(|m| (m.name, m.is_learner)).collect());
                }
            }
        }
        None
    }

    /// Waits until `cond` holds of the member list, up to `timeout`.
    async fn wait_members(&self, timeout: Duration, cond: impl Fn(&[(String, bool)]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.member_list().await.is_some_and(|l| cond(&l)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Starts a new member that joins through a live one; true once it is in the list
    /// and answers.
    async fn join(&mut self, rng: &mut StdRng) -> std::io::Result<Option<usize>> {
        let live = self.live();
        let via = self.members[live[rng.random_range(0..live.len())]].peer_addr.clone();
        let i = self.add_member(None, &via)?;
        self.start(i)?;
        let name = self.members[i].name.clone();
        let joined = self.wait_members(Duration::from_secs(30), |l| l.iter().any(|(n, _)| *n == name)).await;
        if !joined {
            tracing::warn!(member = %name, "the new member did not join in time");
            return Ok(None);
        }
        self.publish_endpoints();
        Ok(Some(i))
    }

    /// Writes filler under keys of their own so that snapshots take a while to send.
    async fn ballast(&self, bytes: usize) {
        let Some(ep) = self.endpoints.read().unwrap_or_else(|e| e.into_inner()).first().cloned() else { return };
        let Some(ch) = channel(&ep).await else { return };
        let mut kv = KvClient::new(ch);
        let value = Bytes::from(vec![b'b'; 64 * 1024]);
        for n in 0..bytes / value.len() {
            let req =
                PutRequest { key: Bytes::from(format!("ballast/{n:05}")), value: value.clone(), ..Default::default() };
            for _ in 0..10 {
                if kv.put(req.clone()).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Injects one fault on member `i`, holds it, and undoes it. Returns the name it is
    /// counted under.
    async fn inject(&mut self, fault: Fault, i: usize, hold: Duration, rng: &mut StdRng) -> std::io::Result<String> {
        let name = self.members[i].name.clone();
        tracing::info!(fault = fault.name(), member = %name, ?hold, "fault");
        match fault {
            Fault::Kill => {
                self.members[i].kill9();
                tokio::time::sleep(hold).await;
                self.start(i)?;
            }
            Fault::Pause => {
                self.members[i].signal(libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                self.members[i].signal(libc::SIGCONT);
            }
            Fault::Partition => {
                let others: Vec<String> =
                    self.live().into_iter().filter(|&o| o != i).map(|o| self.members[o].name.clone()).collect();
                std::fs::write(block_file(&self.cfg.dir, &name), others.join("\n"))?;
                for o in &others {
                    std::fs::write(block_file(&self.cfg.dir, o), &name)?;
                }
                tokio::time::sleep(hold).await;
                self.clear_blocks()?;
            }
            Fault::OneWay => {
                let others: Vec<usize> = self.live().into_iter().filter(|&o| o != i).collect();
                if let Some(&o) = others.get(rng.random_range(0..others.len().max(1))) {
                    // i no longer hears o; o hears i.
                    std::fs::write(block_file(&self.cfg.dir, &name), format!("<{}", self.members[o].name))?;
                    tokio::time::sleep(hold).await;
                    self.clear_blocks()?;
                }
            }
            Fault::NetPartition => {
                let others: Vec<usize> = self.live().into_iter().filter(|&o| o != i).collect();
                let isolate = rng.random_bool(0.5);
                if let Some(n) = &mut self.netns {
                    if isolate {
                        n.isolate(i)?;
                    } else {
                        n.cut(i, &others)?;
                    }
                    tokio::time::sleep(hold).await;
                    n.heal()?;
                }
                return Ok(if isolate { "net-isolate" } else { "net-partition" }.to_string());
            }
            Fault::SnapshotLeaderKill => return self.snapshot_leader_kill(hold, rng).await,
            Fault::Join => {
                if self.live().len() >= self.cfg.members + 2 {
                    // Enough spares: a kill instead keeps the member count bounded.
                    return Box::pin(self.inject(Fault::Kill, i, hold, rng)).await;
                }
                self.join(rng).await?;
            }
            Fault::Replace => return self.replace(rng).await,
            Fault::Wipe => return self.wipe(i, hold).await,
        }
        Ok(fault.name().to_string())
    }

    fn clear_blocks(&self) -> std::io::Result<()> {
        for m in &self.members {
            std::fs::write(block_file(&self.cfg.dir, &m.name), "")?;
        }
        Ok(())
    }

    /// Kills a follower until the log has moved well past it, restarts it, and kills the
    /// leader as soon as the follower starts fetching the snapshot it is sent.
    async fn snapshot_leader_kill(&mut self, hold: Duration, rng: &mut StdRng) -> std::io::Result<String> {
        let Some(leader) = self.leader().await else { return Ok("snapshot-leader-kill-no-leader".into()) };
        let followers: Vec<usize> = self.live().into_iter().filter(|&o| o != leader).collect();
        if followers.is_empty() {
            return Ok("snapshot-no-follower".into());
        }
        let f = followers[rng.random_range(0..followers.len())];
        self.members[f].kill9();
        let ep = self.members[leader].endpoint.clone();
        let from = status(&ep).await.map_or(0, |s| s.raft_index);
        // The leader sheds its log only once it has applied several times what it keeps
        // past its last shed (a store flush comes first), so the follower needs a
        // snapshot only when the log has moved that far past it: six times what it keeps
        // covers any point in that cycle.
        let deadline = Instant::now() + Duration::from_secs(12);
        while Instant::now() < deadline {
            if status(&ep).await.is_some_and(|s| s.raft_index > from + 6 * SNAPSHOT_COUNT) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let offset = self.members[f].log_len();
        self.start(f)?;
        // The follower names its snapshot's sender in its log.
        let tail = |m: &Member| {
            let log = std::fs::read(&m.log).unwrap_or_default();
            String::from_utf8_lossy(log.get(offset as usize..).unwrap_or_default()).into_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sender = None;
        while sender.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            sender = tail(&self.members[f])
                .lines()
                .find(|l| l.contains("fetching a snapshot"))
                .and_then(|l| l.split("from=").nth(1))
                .and_then(|s| s.split_whitespace().next())
                .map(str::to_string);
        }
        let Some(sender) = sender else { return Ok("snapshot-not-sent".into()) };
        let Some(s) = self.members.iter().position(|m| !m.retired && m.name == sender) else {
            return Ok("snapshot-not-sent".into());
        };
        tracing::info!(follower = %self.members[f].name, sender = %sender, "killing the snapshot's sender");
        self.members[s].kill9();
        // Counted as caught mid-transfer only if the follower had not finished fetching.
        let late = tail(&self.members[f]).contains("snapshot fetched");
        tokio::time::sleep(hold).await;
        self.start(s)?;
        Ok(if late { "snapshot-leader-kill-late".into() } else { Fault::SnapshotLeaderKill.name().to_string() })
    }

    /// The voters the members keep: their --voters, 3 unless the member args say.
    fn voter_target(&self) -> usize {
        let args = &self.cfg.member_args;
        let given = args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--voters") {
            Some("") => args.get(i + 1).and_then(|v| v.parse().ok()),
            Some(v) => v.strip_prefix('=').and_then(|v| v.parse().ok()),
            None => None,
        });
        given.unwrap_or(3)
    }

    /// Member `i` loses its disk and starts again under its name; waits until the
    /// cluster is whole again (as many voters as before, the member back in the list
    /// and holding what was applied before it lost its disk), so that the next fault is
    /// not a second lost disk while the first is still being restored: losing two of
    /// three voters' disks loses the quorum, as it would etcd's. A voter may come back
    /// as a learner: when a learner stood by, the cluster promotes it in the emptied
    /// voter's place, and the member that returns then stands by in turn.
    async fn wipe(&mut self, i: usize, hold: Duration) -> std::io::Result<String> {
        let Some(list) = self.member_list().await else { return Ok("wipe-no-answer".into()) };
        // No more than the cluster keeps: while a dead voter's replacement is under way
        // the list can hold one voter more, which the cluster then removes.
        let want = list.iter().filter(|(_, learner)| !learner).count().min(self.voter_target());
        let was_learner = list.iter().any(|(n, learner)| *n == self.members[i].name && *learner);
        let mut applied = 0;
        for o in self.live() {
            if let Some(s) = status(&self.members[o].endpoint).await {
                applied = applied.max(s.raft_applied_index);
            }
        }
        self.members[i].kill9();
        std::fs::remove_dir_all(&self.members[i].data_dir)?;
        tokio::time::sleep(hold).await;
        self.start(i)?;
        let name = self.members[i].name.clone();
        let endpoint = self.members[i].endpoint.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        // A voter is removed, taken back as a learner, and promoted once caught up (unless
        // a learner took its place); the others' member list shows it gone or a learner
        // for a moment, which is watched closely.
        let others: Vec<usize> = self.live().into_iter().filter(|&o| o != i).collect();
        let mut reset = was_learner;
        let mut whole = false;
        while !whole && Instant::now() < deadline {
            let list = self.member_list_from(others.clone()).await;
            reset |= list.as_ref().is_some_and(|l| !l.iter().any(|(n, learner)| *n == name && !learner));
            let s = status(&endpoint).await;
            reset |= s.as_ref().is_some_and(|s| s.is_learner);
            let restored = s.is_some_and(|s| s.raft_applied_index >= applied);
            whole = reset
                && restored
                && list.is_some_and(|l| {
                    l.iter().any(|(n, _)| *n == name) && l.iter().filter(|(_, learner)| !learner).count() >= want
                });
            if !whole {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if !whole {
            tracing::warn!(member = %name, "the cluster did not take the emptied member back in time");
            return Ok("wipe-not-restored".into());
        }
        Ok(Fault::Wipe.name().to_string())
    }

    /// Makes sure a learner stands by, then kills a voter for good and waits until the
    /// cluster has replaced it.
    async fn replace(&mut self, rng: &mut StdRng) -> std::io::Result<String> {
        if !self.unreplaced.is_empty() {
            return Ok("replace-skipped".into());
        }
        let Some(list) = self.member_list().await else { return Ok("replace-no-answer".into()) };
        if !list.iter().any(|(_, learner)| *learner) && self.join(rng).await?.is_none() {
            return Ok("replace-join-failed".into());
        }
        // A learner is promoted only once caught up; the replacement waits for that anyway.
        let Some(list) = self.member_list().await else { return Ok("replace-no-answer".into()) };
        let voters: Vec<usize> = list
            .iter()
            .filter(|(_, learner)| !learner)
            .filter_map(|(n, _)| self.members.iter().position(|m| !m.retired && m.name == *n))
            .collect();
        if voters.is_empty() {
            return Ok("replace-no-voter".into());
        }
        let v = voters[rng.random_range(0..voters.len())];
        let name = self.members[v].name.clone();
        tracing::info!(member = %name, "killing a voter for good");
        self.members[v].kill9();
        self.members[v].retired = true;
        self.publish_endpoints();
        let want = voters.len();
        let replaced = self
            .wait_members(Duration::from_secs(DEAD_MEMBER_SECS + 30), |l| {
                !l.iter().any(|(n, _)| *n == name) && l.iter().filter(|(_, learner)| !learner).count() >= want
            })
            .await;
        if !replaced {
            tracing::warn!(member = %name, "the dead voter was not replaced in time");
            self.unreplaced.push(name);
            return Ok("replace-timed-out".into());
        }
        let _ = std::fs::remove_dir_all(&self.members[v].data_dir);
        Ok(Fault::Replace.name().to_string())
    }
}

/// Runs the harness; the report says what the checks found.
pub async fn run(cfg: TortureConfig) -> std::io::Result<Report> {
    std::fs::create_dir_all(&cfg.dir)?;
    let netns = if cfg.faults.contains(&Fault::NetPartition) { Some(Netns::new()?) } else { None };
    let mut cluster =
        Cluster { cfg: cfg.clone(), members: Vec::new(), netns, endpoints: Arc::default(), unreplaced: Vec::new() };
    let n = cfg.members;
    // Founders each name the next one as the peer to join through.
    let hosts: Vec<String> = match &cluster.netns {
        Some(ns) => (0..n).map(|i| format!("{}:2380", ns.addr(i))).collect(),
        None => Vec::new(),
    };
    for i in 0..n {
        let idx = cluster.add_member(Some(n), hosts.get((i + 1) % n).map_or("", |s| s.as_str()))?;
        debug_assert_eq!(idx, i);
    }
    if cluster.netns.is_none() {
        // Ports were picked as members were made: point each at the next one now.
        for i in 0..n {
            let next = cluster.members[(i + 1) % n].peer_addr.clone();
            cluster.members[i].args.extend(["--join".to_string(), next]);
        }
    }
    for i in 0..n {
        cluster.start(i)?;
    }
    cluster.publish_endpoints();
    let founders = cluster.endpoints.read().unwrap_or_else(|e| e.into_inner()).clone();
    wait_for_leader(&founders, Duration::from_secs(60)).await;
    if cfg.faults.contains(&Fault::SnapshotLeaderKill) {
        cluster.ballast(32 << 20).await;
    }

    let start = Instant::now();
    let now_us = move || start.elapsed().as_micros() as u64;
    let deadline = start + cfg.duration;
    let history: Arc<Mutex<BTreeMap<String, Vec<Op>>>> = Arc::default();
    let watch_log: Arc<Mutex<Vec<WatchEvent>>> = Arc::default();
    let watcher = tokio::spawn(watch_loop(cluster.endpoints.clone(), watch_log.clone()));
    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let (endpoints, history, keys) = (cluster.endpoints.clone(), history.clone(), cfg.keys);
        let seed = cfg.seed.wrapping_mul(31).wrapping_add(c as u64);
        tasks.push(tokio::spawn(async move { client_loop(c, seed, endpoints, keys, deadline, history, now_us).await }));
    }
    let lease_log: Arc<Mutex<LeaseLog>> = Arc::default();
    for h in 0..cfg.leases {
        let (endpoints, log) = (cluster.endpoints.clone(), lease_log.clone());
        let seed = cfg.seed.wrapping_mul(37).wrapping_add(h as u64);
        tasks.push(tokio::spawn(lease::holder(h, seed, endpoints, deadline, log)));
    }
    let lock_log: Arc<Mutex<LockLog>> = Arc::default();
    for l in 0..cfg.lockers {
        let (endpoints, log) = (cluster.endpoints.clone(), lock_log.clone());
        let seed = cfg.seed.wrapping_mul(41).wrapping_add(l as u64);
        tasks.push(tokio::spawn(lock::locker(seed, endpoints, deadline, log)));
    }
    let election_log: Arc<Mutex<ElectionLog>> = Arc::default();
    for c in 0..cfg.candidates {
        let (endpoints, log) = (cluster.endpoints.clone(), election_log.clone());
        let seed = cfg.seed.wrapping_mul(43).wrapping_add(c as u64);
        tasks.push(tokio::spawn(election::candidate(c, seed, endpoints, deadline, log)));
    }
    for o in 0..if cfg.candidates > 0 { election::OBSERVERS } else { 0 } {
        let (endpoints, log) = (cluster.endpoints.clone(), election_log.clone());
        let seed = cfg.seed.wrapping_mul(47).wrapping_add(o as u64);
        tasks.push(tokio::spawn(election::observer(o, seed, endpoints, deadline, log)));
    }

    // The fault schedule.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut faults = 0;
    let mut by_kind = BTreeMap::new();
    let mut deck: Vec<Fault> = Vec::new();
    let quiet_at = deadline - Duration::from_secs(3).min(cfg.duration / 4);
    while !cfg.faults.is_empty() && Instant::now() + Duration::from_secs(4) < quiet_at {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        let live = cluster.live();
        let i = live[rng.random_range(0..live.len())];
        let hold = Duration::from_millis(rng.random_range(1000..3000));
        // Faults come in shuffled rounds, each kind once a round: every kind gets its turn.
        if deck.is_empty() {
            deck = cfg.faults.clone();
            deck.shuffle(&mut rng);
        }
        let Some(fault) = deck.pop() else { break };
        let kind = cluster.inject(fault, i, hold, &mut rng).await?;
        faults += 1;
        *by_kind.entry(kind).or_insert(0) += 1;
    }
    for t in tasks {
        let _ = t.await;
    }

    // Final reads of every key, then the checks.
    let endpoints = cluster.endpoints.read().unwrap_or_else(|e| e.into_inner()).clone();
    wait_for_leader(&endpoints, Duration::from_secs(30)).await;
    {
        let mut kv = None;
        for ep in &endpoints {
            if let Some(ch) = channel(ep).await {
                kv = Some(KvClient::new(ch));
                break;
            }
        }
        if let Some(mut kv) = kv {
            for k in 0..cfg.keys {
                let key = format!("k{k}");
                let invoke = now_us();
                if let Ok(r) = kv.range(RangeRequest { key: Bytes::from(key.clone()), ..Default::default() }).await {
                    let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    let op = Op {
                        client: usize::MAX,
                        input: Input::Read,
                        output: Some(Output::Read(v)),
                        invoke,
                        complete: Some(now_us()),
                    };
                    history.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().push(op);
                }
            }
        }
    }
    let leases = std::mem::take(&mut *lease_log.lock().unwrap_or_else(|e| e.into_inner()));
    let locks = std::mem::take(&mut *lock_log.lock().unwrap_or_else(|e| e.into_inner()));
    let mut elections = std::mem::take(&mut *election_log.lock().unwrap_or_else(|e| e.into_inner()));
    elections.check();
    let unreplaced = std::mem::take(&mut cluster.unreplaced);
    let mut report = Report { faults, by_kind, unreplaced, leases, locks, elections, ..Default::default() };
    let history = history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (key, ops) in &history {
        report.ops += ops.len();
        report.unknown += ops.iter().filter(|o| o.output.is_none()).count();
        if !check::linearizable(ops, None) {
            let shortest = check::shrink(ops, None);
            let path = cfg.dir.join(format!("violation-{key}.txt"));
            let mut text =
                format!("seed {}\nkey {key}\nshortest failing history ({} ops):\n", cfg.seed, shortest.len());
            for o in &shortest {
                text.push_str(&format!("{o:?}\n"));
            }
            std::fs::write(&path, text)?;
            report.violations.push((key.clone(), path));
        }
    }
    // Agreement among the members the cluster lists (a replaced one is gone).
    let listed = cluster.member_list().await.unwrap_or_default();
    let in_cluster: Vec<String> = cluster
        .members
        .iter()
        .filter(|m| !m.retired && listed.iter().any(|(n, _)| *n == m.name))
        .map(|m| m.endpoint.clone())
        .collect();
    report.hash_mismatch = compare_hashes(&in_cluster).await;
    // The watcher must reach the final revision, then agree with the clients' history.
    let last = final_revision(&in_cluster).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while watch_log.lock().unwrap_or_else(|e| e.into_inner()).last().map_or(0, |e| e.rev) < last
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher.abort();
    let events = watch_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.watch_events = events.len();
    report.watch_problems = check_watch(&events, &history, last);
    for m in &mut cluster.members {
        m.signal(libc::SIGCONT);
        m.kill9();
    }
    Ok(report)
}

/// One event as the torture watcher saw it.
#[derive(Clone, Debug)]
struct WatchEvent {
    rev: i64,
    key: String,
    /// None for a deletion.
    value: Option<String>,
}

/// Watches every key from revision 1 on, through whichever member answers, resuming
/// after the last revision it got whenever its stream breaks. The ballast's values are
/// not kept.
async fn watch_loop(endpoints: Arc<RwLock<Vec<String>>>, log: Arc<Mutex<Vec<WatchEvent>>>) {
    use crate::pb::etcdserverpb::watch_client::WatchClient;
    use crate::pb::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
    let mut member = 0usize;
    loop {
        let ep = {
            let eps = endpoints.read().unwrap_or_else(|e| e.into_inner());
            eps[member % eps.len().max(1)].clone()
        };
        member += 1;
        let next = log.lock().unwrap_or_else(|e| e.into_inner()).last().map_or(1, |e| e.rev + 1);
        let Some(ch) = channel(&ep).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Every key, so that every revision after the first has an event to show.
        let create = WatchCreateRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: next,
            ..Default::default()
        };
        let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
        // Keep the request side open for as long as the stream lives.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(req).await;
        // The ballast's history comes in responses of tens of megabytes, as etcd sends it.
        let mut client = WatchClient::new(ch).max_decoding_message_size(usize::MAX);
        let resp = match client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(member = %ep, from = next, error = %e, "the watcher could not watch");
                continue;
            }
        };
        let mut stream = resp.into_inner();
        loop {
            // A member that stops answering (paused, cut off) is left after a while.
            let msg = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
            let r = match msg {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::info!(member = %ep, error = %e, "the watcher's stream broke");
                    break;
                }
                Err(_) => break,
            };
            if r.canceled {
                tracing::info!(member = %ep, reason = %r.cancel_reason, compact = r.compact_revision, "watch canceled");
                break;
            }
            if let Some(first) = r.events.first().and_then(|e| e.kv.as_ref()) {
                let expected = log.lock().unwrap_or_else(|e| e.into_inner()).last().map_or(2, |e| e.rev + 1);
                if first.mod_revision > expected {
                    tracing::warn!(member = %ep, expected, got = first.mod_revision, "the watcher skipped revisions");
                }
            }
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            for ev in r.events {
                let Some(kv) = ev.kv else { continue };
                let delete = ev.r#type == crate::pb::mvccpb::event::EventType::Delete as i32;
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let value = (!delete && is_client_key(&key)).then(|| String::from_utf8_lossy(&kv.value).into_owned());
                log.push(WatchEvent { rev: kv.mod_revision, key, value });
            }
        }
        drop(tx);
    }
}

/// The newest revision among the members.
async fn final_revision(endpoints: &[String]) -> i64 {
    let mut rev = 0;
    for ep in endpoints {
        if let Some(s) = status(ep).await {
            rev = rev.max(s.header.map_or(0, |h| h.revision));
        }
    }
    rev
}

/// The keys the clients write (the rest is ballast).
pub(super) fn is_client_key(key: &str) -> bool {
    key.starts_with('k')
}

/// Watch guarantees: revisions never go back and no event comes twice; every revision
/// from the first write to the last has its events (nothing compacts during a run, and
/// every revision is made by a write of at least one key); every event on a client's
/// key is a write some client made; every acknowledged write is among the events.
fn check_watch(events: &[WatchEvent], history: &BTreeMap<String, Vec<Op>>, last: i64) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut prev = 0;
    // Revisions missing between one event and the next, as (first, last) of each gap; a
    // watcher that stops short is told below.
    let mut gaps = Vec::new();
    // The store starts at revision 1, so the first write makes revision 2.
    let mut expected = 2;
    for e in events {
        if e.rev < prev {
            problems.push(format!("revision {} after {prev}", e.rev));
        }
        if e.rev > expected {
            gaps.push((expected, e.rev - 1));
        }
        expected = expected.max(e.rev + 1);
        prev = e.rev;
        if !seen.insert((e.rev, e.key.clone())) {
            problems.push(format!("event on {} at {} twice", e.key, e.rev));
        }
    }
    let missing: i64 = gaps.iter().map(|(a, b)| b - a + 1).sum();
    if missing > 0 {
        let shown: Vec<String> = gaps.iter().take(10).map(|(a, b)| format!("{a}..={b}")).collect();
        let noun = if missing == 1 { "revision" } else { "revisions" };
        problems.push(format!("{missing} {noun} never reached the watcher: {}", shown.join(", ")));
    }
    let written: std::collections::HashSet<(String, String)> = history
        .iter()
        .flat_map(|(k, ops)| {
            ops.iter().filter_map(move |o| match &o.input {
                Input::Write(v) | Input::Cas { new: v, .. } => Some((k.clone(), v.clone())),
                _ => None,
            })
        })
        .collect();
    let put: std::collections::HashSet<(String, String)> =
        events.iter().filter_map(|e| e.value.clone().map(|v| (e.key.clone(), v))).collect();
    for p in put.difference(&written) {
        problems.push(format!("event {p:?} that no client wrote"));
    }
    if prev < last {
        problems.push(format!("the watcher reached revision {prev}, not {last}"));
        return problems;
    }
    for (k, ops) in history {
        for o in ops {
            let acked = match (&o.input, &o.output) {
                (Input::Write(v), Some(Output::Written)) | (Input::Cas { new: v, .. }, Some(Output::Cas(true))) => {
                    Some(v)
                }
                _ => None,
            };
            if let Some(v) = acked {
                if !put.contains(&(k.clone(), v.clone())) {
                    problems.push(format!("acknowledged write {k}={v} never seen by the watcher"));
                }
            }
        }
    }
    problems
}

async fn wait_for_leader(endpoints: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for ep in endpoints {
            if let Some(ch) = channel(ep).await {
                if let Ok(s) = MaintenanceClient::new(ch).status(StatusRequest {}).await {
                    if s.into_inner().leader != 0 {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// HashKV on every member at one revision, once all have applied it; None if equal.
async fn compare_hashes(endpoints: &[String]) -> Option<Vec<u32>> {
    let mut rev = 0;
    for ep in endpoints {
        if let Some(ch) = channel(ep).await {
            if let Ok(r) =
                KvClient::new(ch).range(RangeRequest { key: Bytes::from_static(b"k"), ..Default::default() }).await
            {
                rev = rev.max(r.into_inner().header.map_or(0, |h| h.revision));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut hashes = Vec::new();
    for ep in endpoints {
        loop {
            let h = match channel(ep).await {
                Some(ch) => MaintenanceClient::new(ch).hash_kv(HashKvRequest { revision: rev }).await.ok(),
                None => None,
            };
            if let Some(h) = h {
                hashes.push(h.into_inner().hash);
                break;
            }
            if Instant::now() > deadline {
                hashes.push(0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (!hashes.iter().all(|h| *h == hashes[0])).then_some(hashes)
}

async fn client_loop(
    id: usize,
    seed: u64,
    endpoints: Arc<RwLock<Vec<String>>>,
    keys: usize,
    deadline: Instant,
    history: Arc<Mutex<BTreeMap<String, Vec<Op>>>>,
    now_us: impl Fn() -> u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut member = id;
    let mut kv: Option<KvClient<Channel>> = None;
    let mut n = 0u64;
    while Instant::now() < deadline {
        if kv.is_none() {
            let ep = {
                let eps = endpoints.read().unwrap_or_else(|e| e.into_inner());
                eps[member % eps.len().max(1)].clone()
            };
            kv = channel(&ep).await.map(KvClient::new);
            if kv.is_none() {
                member += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let Some(c) = kv.as_mut() else { continue };
        let key = format!("k{}", rng.random_range(0..keys));
        n += 1;
        let value = format!("c{id}-{n}");
        let roll = rng.random_range(0..100);
        let invoke = now_us();
        let (input, output, failed) = if roll < 35 {
            let r = c.range(RangeRequest { key: Bytes::from(key.clone()), ..Default::default() }).await;
            match r {
                Ok(r) => {
                    let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    (Input::Read, Some(Output::Read(v)), false)
                }
                // A failed read changed nothing: it is not part of the history.
                Err(_) => (Input::Read, None, true),
            }
        } else if roll < 75 {
            let r = c
                .put(PutRequest {
                    key: Bytes::from(key.clone()),
                    value: Bytes::from(value.clone()),
                    ..Default::default()
                })
                .await;
            (Input::Write(value), r.ok().map(|_| Output::Written), false)
        } else if roll < 95 {
            // Compare-and-set against the value this client last saw, if any.
            let expect = history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .and_then(|ops| {
                    ops.iter().rev().find_map(|o| match (&o.input, &o.output) {
                        (Input::Write(v), Some(Output::Written)) => Some(v.clone()),
                        _ => None,
                    })
                })
                .unwrap_or_default();
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: Bytes::from(key.clone()),
                    target_union: Some(compare::TargetUnion::Value(Bytes::from(expect.clone()))),
                    range_end: Bytes::new(),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: Bytes::from(key.clone()),
                        value: Bytes::from(value.clone()),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            let r = c.txn(txn).await;
            (Input::Cas { expect, new: value }, r.ok().map(|r| Output::Cas(r.into_inner().succeeded)), false)
        } else {
            let r = c.delete_range(DeleteRangeRequest { key: Bytes::from(key.clone()), ..Default::default() }).await;
            (Input::Delete, r.ok().map(|_| Output::Deleted), false)
        };
        let complete = output.as_ref().map(|_| now_us());
        if output.is_none() {
            // Try another member next time: this one may be down or cut off.
            kv = None;
            member += 1;
        }
        if failed {
            continue;
        }
        let op = Op { client: id, input, output, invoke, complete };
        history.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().push(op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(rev: i64, key: &str, value: &str) -> WatchEvent {
        WatchEvent { rev, key: key.into(), value: Some(value.into()) }
    }

    fn written(writes: &[(&str, &str)]) -> BTreeMap<String, Vec<Op>> {
        let mut h: BTreeMap<String, Vec<Op>> = BTreeMap::new();
        for (i, (k, v)) in writes.iter().enumerate() {
            let op = Op {
                client: 0,
                input: Input::Write(v.to_string()),
                output: Some(Output::Written),
                invoke: i as u64 * 2,
                complete: Some(i as u64 * 2 + 1),
            };
            h.entry(k.to_string()).or_default().push(op);
        }
        h
    }

    #[test]
    fn every_revision_in_order_once_passes() {
        let h = written(&[("k1", "a"), ("k2", "b")]);
        let ballast = WatchEvent { rev: 2, key: "ballast/00000".into(), value: None };
        let events = vec![ballast, put(3, "k1", "a"), put(4, "k2", "b")];
        assert_eq!(check_watch(&events, &h, 4), Vec::<String>::new());
    }

    #[test]
    fn a_revision_nobody_acknowledged_that_never_arrives_is_a_gap() {
        // k2=b was not acknowledged (say its client timed out) but took revision 3.
        let mut h = written(&[("k1", "a"), ("k2", "b"), ("k1", "c")]);
        h.get_mut("k2").unwrap()[0].output = None;
        let events = vec![put(2, "k1", "a"), put(4, "k1", "c")];
        let problems = check_watch(&events, &h, 4);
        assert_eq!(problems, vec!["1 revision never reached the watcher: 3..=3".to_string()]);
    }

    #[test]
    fn events_out_of_order_or_twice_are_caught() {
        let h = written(&[("k1", "a"), ("k2", "b")]);
        let twice = vec![put(2, "k1", "a"), put(2, "k1", "a"), put(3, "k2", "b")];
        assert_eq!(check_watch(&twice, &h, 3), vec!["event on k1 at 2 twice".to_string()]);
        let back = vec![put(3, "k2", "b"), put(2, "k1", "a")];
        assert!(check_watch(&back, &h, 3).iter().any(|p| p == "revision 2 after 3"));
    }

    #[test]
    fn a_watcher_that_stops_short_is_caught() {
        let h = written(&[("k1", "a"), ("k2", "b")]);
        let problems = check_watch(&[put(2, "k1", "a")], &h, 3);
        assert_eq!(problems, vec!["the watcher reached revision 2, not 3".to_string()]);
    }
}

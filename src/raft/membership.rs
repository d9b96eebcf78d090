//! The membership controller: the leader's policy for who is in the Raft group.
//!
//! Pure: it sees a [`View`] (members, their replication progress, which peers the mesh
//! can reach) and returns at most one configuration change, which the driver proposes.
//! Raft allows one change in flight, so the controller waits while one is pending.
//!
//! - A mesh peer of our cluster that is not a member is added as a learner.
//! - While voters are fewer than wanted, a caught-up learner is promoted.
//! - A voter unreachable for longer than the dead-member timeout is replaced: first a
//!   caught-up learner is promoted, then the dead voter is removed. Removing a dead voter
//!   never lowers the number of live voters, so quorum is never lost by it; a member
//!   partitioned for less than the timeout is never touched.
//! - A learner unreachable for longer than the timeout is removed.
//! - A member that lost its data (it came back with an empty log, where the leader
//!   counts entries it had acknowledged) is removed at once and, like the dead ones
//!   above, added again as a learner when the mesh reaches it. Until then it cannot
//!   follow the leader, and the acknowledgements and votes it gave before are void.
//!   Only members removed by a client stay out.
//! - A peer whose build is older than the cluster version is never added.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the controller wants.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Voters to keep (etcd clusters have 3 or 5).
    pub voters: usize,
    pub dead_member_timeout: Duration,
    /// A learner within this many entries of the leader's last index is caught up.
    pub caught_up_lag: u64,
    /// Most learners at once (etcd's --experimental-max-learners): a newcomer waits
    /// while there are as many.
    pub max_learners: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self { voters: 3, dead_member_timeout: Duration::from_secs(30), caught_up_lag: 64, max_learners: usize::MAX }
    }
}

/// The leader's view of the group.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub me: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Peers the mesh reaches now: (member id, name).
    pub reachable: Vec<(u64, String)>,
    /// Highest log index known to be replicated on each member.
    pub matched: HashMap<u64, u64>,
    pub last_index: u64,
    pub pending_conf_change: bool,
    /// Members removed by a client: never added back on their own.
    pub removed: Vec<u64>,
    /// Members whose log ends before what the leader counts as replicated on them: they
    /// lost their data.
    pub lost: Vec<u64>,
    /// Peers whose build speaks an older mesh protocol than the cluster version: never
    /// added (they could not apply the log).
    pub too_old: Vec<u64>,
}

/// One configuration change to propose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddLearner {
        id: u64,
        name: String,
    },
    Promote {
        id: u64,
    },
    /// `rejoin`: the cluster's own removal; the member is added again as a learner
    /// when the mesh reaches it (a client's MemberRemove passes false: it stays out).
    Remove {
        id: u64,
        rejoin: bool,
    },
}

/// Keeps, between calls, since when each member has been unreachable.
#[derive(Debug, Default)]
pub struct Controller {
    cfg: MembershipConfig,
    unreachable_since: HashMap<u64, Instant>,
}

impl Controller {
    pub fn new(cfg: MembershipConfig) -> Self {
        Self { cfg, unreachable_since: HashMap::new() }
    }

    /// Decides the next change, if any.
    pub fn decide(&mut self, now: Instant, v: &View) -> Option<Change> {
        let reachable: HashMap<u64, &str> = v.reachable.iter().map(|(id, n)| (*id, n.as_str())).collect();
        let members: Vec<u64> = v.voters.iter().chain(&v.learners).copied().collect();
        self.unreachable_since.retain(|id, _| members.contains(id) && !reachable.contains_key(id));
        for &m in &members {
            if m != v.me && !reachable.contains_key(&m) {
                self.unreachable_since.entry(m).or_insert(now);
            }
        }
        if v.pending_conf_change {
            return None;
        }
        if let Some(&id) = v.lost.iter().filter(|id| members.contains(id) && **id != v.me).min() {
            return Some(Change::Remove { id, rejoin: true });
        }
        let dead = |id: u64| {
            self.unreachable_since.get(&id).is_some_and(|t| now.duration_since(*t) >= self.cfg.dead_member_timeout)
        };
        let caught_up = |id: u64| {
            reachable.contains_key(&id)
                && v.matched.get(&id).is_some_and(|m| m + self.cfg.caught_up_lag >= v.last_index)
        };
        let live_voters = v.voters.iter().filter(|&&id| !dead(id)).count();
        let mut learners: Vec<u64> = v.learners.clone();
        learners.sort_unstable();

        // Replace dead voters: promote first, then remove.
        if v.voters.iter().any(|&id| dead(id)) {
            if live_voters < self.cfg.voters {
                if let Some(&l) = learners.iter().find(|&&l| caught_up(l)) {
                    return Some(Change::Promote { id: l });
                }
            }
            if v.voters.len() > self.cfg.voters || live_voters >= self.cfg.voters {
                if let Some(&d) = v.voters.iter().filter(|&&id| dead(id)).min() {
                    return Some(Change::Remove { id: d, rejoin: true });
                }
            }
        }
        if let Some(&l) = learners.iter().find(|&&l| dead(l)) {
            return Some(Change::Remove { id: l, rejoin: true });
        }
        // Grow to the wanted number of voters.
        if v.voters.len() < self.cfg.voters {
            if let Some(&l) = learners.iter().find(|&&l| caught_up(l)) {
                return Some(Change::Promote { id: l });
            }
        }
        // Add newcomers as learners, one at a time, in name order.
        if v.learners.len() >= self.cfg.max_learners {
            return None;
        }
        let mut newcomers: Vec<&(u64, String)> = v
            .reachable
            .iter()
            .filter(|(id, _)| !members.contains(id) && !v.removed.contains(id) && !v.too_old.contains(id))
            .collect();
        newcomers.sort_by(|a, b| a.1.cmp(&b.1));
        newcomers.first().map(|(id, name)| Change::AddLearner { id: *id, name: name.clone() })
    }
}

/// Whether a learner whose log reaches `matched` is close enough to the leader's
/// `last_index` to be promoted: nine tenths of it, as etcd asks.
pub fn in_sync(matched: u64, last_index: u64) -> bool {
    matched as u128 * 10 >= last_index as u128 * 9
}

/// Whether removing `removed` leaves a quorum of the voters left among those active:
/// member `me` and the members it can reach. etcd's strict reconfiguration check: a
/// learner, or a voter that cannot be reached, takes nothing from the active quorum.
pub fn quorum_kept_without(removed: u64, me: u64, voters: &[u64], reachable: &[u64]) -> bool {
    if !voters.contains(&removed) {
        return true;
    }
    let active: Vec<u64> = voters.iter().copied().filter(|v| *v == me || reachable.contains(v)).collect();
    if removed != me && !active.contains(&removed) {
        return true;
    }
    let quorum_left = (voters.len() - 1) / 2 + 1;
    active.len() > quorum_left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_is_removed_only_if_the_active_voters_left_make_a_quorum() {
        // Three voters, all reachable: any one can go (two of two left).
        assert!(quorum_kept_without(2, 1, &[1, 2, 3], &[2, 3]));
        // 3 is down: removing 2 would leave 1 active of two voters.
        assert!(!quorum_kept_without(2, 1, &[1, 2, 3], &[2]));
        // Nor may this member remove itself then.
        assert!(!quorum_kept_without(1, 1, &[1, 2, 3], &[2]));
        // The one that is down can go: two active of two left.
        assert!(quorum_kept_without(3, 1, &[1, 2, 3], &[2]));
        // Five voters, two down: removing a third active one leaves two of four.
        assert!(!quorum_kept_without(2, 1, &[1, 2, 3, 4, 5], &[2, 3]));
        // Five voters, one down: three active of four left.
        assert!(quorum_kept_without(2, 1, &[1, 2, 3, 4, 5], &[2, 3, 4]));
        // Learners never count.
        assert!(quorum_kept_without(9, 1, &[1, 2, 3], &[]));
        // The last voter cannot remove itself.
        assert!(!quorum_kept_without(1, 1, &[1], &[]));
    }

    #[test]
    fn a_learner_is_in_sync_at_nine_tenths_of_the_leaders_log() {
        assert!(in_sync(90, 100));
        assert!(!in_sync(89, 100));
        assert!(in_sync(0, 0));
        assert!(!in_sync(0, 5));
        assert!(in_sync(u64::MAX, u64::MAX));
    }

    fn view(voters: &[u64], learners: &[u64], reachable: &[u64]) -> View {
        View {
            me: 1,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            reachable: reachable.iter().map(|id| (*id, format!("n{id}"))).collect(),
            matched: [1, 2, 3, 4, 5].iter().map(|id| (*id, 100)).collect(),
            last_index: 100,
            pending_conf_change: false,
            removed: vec![],
            lost: vec![],
            too_old: vec![],
        }
    }

    #[test]
    fn newcomers_become_learners_then_voters_up_to_the_target() {
        let mut c = Controller::new(MembershipConfig::default());
        let now = Instant::now();
        assert_eq!(c.decide(now, &view(&[1], &[], &[2, 3, 4])), Some(Change::AddLearner { id: 2, name: "n2".into() }));
        assert_eq!(c.decide(now, &view(&[1], &[2], &[2, 3, 4])), Some(Change::Promote { id: 2 }));
        assert_eq!(
            c.decide(now, &view(&[1, 2, 3], &[], &[2, 3, 4])),
            Some(Change::AddLearner { id: 4, name: "n4".into() })
        );
        assert_eq!(c.decide(now, &view(&[1, 2, 3], &[4], &[2, 3, 4])), None, "three voters are enough");
        let mut gone = view(&[1, 2, 3], &[], &[2, 3, 4]);
        gone.removed = vec![4];
        assert_eq!(c.decide(now, &gone), None, "a removed member is not added back");
        let mut pending = view(&[1], &[], &[2]);
        pending.pending_conf_change = true;
        assert_eq!(c.decide(now, &pending), None);
    }

    #[test]
    fn a_newcomer_older_than_the_cluster_version_is_passed_over() {
        let mut c = Controller::new(MembershipConfig::default());
        let now = Instant::now();
        let mut old = view(&[1, 2, 3], &[], &[2, 3, 4, 5]);
        old.too_old = vec![4];
        assert_eq!(c.decide(now, &old), Some(Change::AddLearner { id: 5, name: "n5".into() }), "the next one is added");
        old.reachable.retain(|(id, _)| *id != 5);
        assert_eq!(c.decide(now, &old), None);
    }

    #[test]
    fn newcomers_wait_while_there_are_max_learners() {
        let mut c = Controller::new(MembershipConfig { max_learners: 1, ..Default::default() });
        let now = Instant::now();
        let full = view(&[1, 2, 3], &[4], &[2, 3, 4, 5]);
        assert_eq!(c.decide(now, &full), None, "one learner already");
        assert_eq!(
            c.decide(now, &view(&[1, 2, 3], &[], &[2, 3, 5])),
            Some(Change::AddLearner { id: 5, name: "n5".into() })
        );
        let mut unlimited = Controller::new(MembershipConfig::default());
        assert_eq!(unlimited.decide(now, &full), Some(Change::AddLearner { id: 5, name: "n5".into() }));
    }

    #[test]
    fn a_dead_voter_is_replaced_only_after_the_timeout() {
        let cfg = MembershipConfig { dead_member_timeout: Duration::from_secs(10), ..Default::default() };
        let mut c = Controller::new(cfg);
        let t0 = Instant::now();
        // Voter 3 drops out of reach; learner 4 is caught up.
        assert_eq!(c.decide(t0, &view(&[1, 2, 3], &[4], &[2, 4])), None);
        assert_eq!(
            c.decide(t0 + Duration::from_secs(9), &view(&[1, 2, 3], &[4], &[2, 4])),
            None,
            "a short partition is tolerated"
        );
        let later = t0 + Duration::from_secs(11);
        assert_eq!(c.decide(later, &view(&[1, 2, 3], &[4], &[2, 4])), Some(Change::Promote { id: 4 }));
        assert_eq!(c.decide(later, &view(&[1, 2, 3, 4], &[], &[2, 4])), Some(Change::Remove { id: 3, rejoin: true }));
        assert_eq!(c.decide(later, &view(&[1, 2, 4], &[], &[2, 4])), None);
    }

    #[test]
    fn a_member_that_lost_its_data_is_removed_at_once_and_added_back_as_a_learner() {
        let mut c = Controller::new(MembershipConfig::default());
        let now = Instant::now();
        let mut wiped = view(&[1, 2, 3], &[], &[2, 3]);
        wiped.lost = vec![3];
        assert_eq!(c.decide(now, &wiped), Some(Change::Remove { id: 3, rejoin: true }), "no timeout to wait for");
        // Back, empty, and not removed by a client: a newcomer like any other.
        assert_eq!(c.decide(now, &view(&[1, 2], &[], &[2, 3])), Some(Change::AddLearner { id: 3, name: "n3".into() }));
        let mut pending = wiped.clone();
        pending.pending_conf_change = true;
        assert_eq!(c.decide(now, &pending), None, "one change at a time");
        let mut me = view(&[1, 2, 3], &[], &[2, 3]);
        me.lost = vec![1, 9];
        assert_eq!(c.decide(now, &me), None, "never the leader itself, nor a stranger");
    }

    #[test]
    fn a_returning_member_resets_its_clock() {
        let cfg = MembershipConfig { dead_member_timeout: Duration::from_secs(10), ..Default::default() };
        let mut c = Controller::new(cfg);
        let t0 = Instant::now();
        c.decide(t0, &view(&[1, 2, 3], &[4], &[2, 4]));
        c.decide(t0 + Duration::from_secs(8), &view(&[1, 2, 3], &[4], &[2, 3, 4]));
        assert_eq!(c.decide(t0 + Duration::from_secs(12), &view(&[1, 2, 3], &[4], &[2, 4])), None);
    }
}

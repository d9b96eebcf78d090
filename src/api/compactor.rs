//! Compaction of the key-value history by the leader itself, as etcd's
//! `--auto-compaction-mode` and `--auto-compaction-retention`, so that history does not
//! grow without bound where no client compacts.
//!
//! - `periodic`, keeping a retention R: every tenth of R (of an hour at most) each
//!   member notes the current revision, leader or not. The leader compacts to the
//!   revision noted R ago: first once it has been noting for R, then every R (every hour
//!   at most).
//! - `revision`, keeping R revisions: every five minutes the leader compacts to R
//!   revisions before the current one.
//!
//! A compaction is an ordinary Raft entry, applied by every member. Compacting to a
//! revision already compacted is skipped; one that fails is tried at the next step.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::AutoCompaction;
use crate::pb::etcdserverpb::CompactionRequest;
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::raft::RaftError;
use crate::store::mvcc::MvccError;

use super::Ctx;

/// How often revision mode looks, as etcd's.
const REVISION_EVERY: Duration = Duration::from_secs(300);
/// Steps per periodic interval, as etcd's.
const STEPS_PER_INTERVAL: u32 = 10;

/// When to compact and to what, apart from clocks and Raft.
#[derive(Debug)]
pub struct Schedule {
    mode: AutoCompaction,
    /// Periodic: the revisions noted, oldest first, spanning the retention.
    noted: VecDeque<i64>,
    /// Periodic: since when the next compaction is counted, and how long it waits.
    since: Instant,
    wait: Duration,
    /// Revision: the revision last compacted to.
    last: i64,
}

impl Schedule {
    pub fn new(mode: AutoCompaction, now: Instant) -> Self {
        let wait = match mode {
            AutoCompaction::Periodic(r) => r,
            AutoCompaction::Revision(_) => Duration::ZERO,
        };
        Self { mode, noted: VecDeque::new(), since: now, wait, last: 0 }
    }

    /// Time between steps.
    pub fn step_every(&self) -> Duration {
        match self.mode {
            AutoCompaction::Periodic(r) => r.min(Duration::from_secs(3600)) / STEPS_PER_INTERVAL,
            AutoCompaction::Revision(_) => REVISION_EVERY,
        }
    }

    /// One step, with the store's current revision: the revision the leader should
    /// compact to now, if any. Every member steps; only a leader is answered.
    pub fn step(&mut self, now: Instant, revision: i64, leader: bool) -> Option<i64> {
        match self.mode {
            AutoCompaction::Periodic(retention) => {
                self.noted.push_back(revision);
                // The steps within the retention, and the one that starts it.
                let keep = (retention.as_nanos() / self.step_every().as_nanos().max(1)) as usize + 1;
                while self.noted.len() > keep {
                    self.noted.pop_front();
                }
                if !leader || now.duration_since(self.since) < self.wait {
                    return None;
                }
                self.noted.front().copied()
            }
            AutoCompaction::Revision(keep) => {
                let to = revision - keep;
                (leader && to > 0 && to != self.last).then_some(to)
            }
        }
    }

    /// The store is compacted to `revision` (by this step, or before it).
    pub fn compacted(&mut self, now: Instant, revision: i64) {
        if let AutoCompaction::Periodic(retention) = self.mode {
            self.since = now;
            self.wait = retention.min(Duration::from_secs(3600));
        }
        self.last = revision;
    }
}

/// Runs the schedule on this member until it stops.
pub fn start(ctx: Ctx, mode: AutoCompaction) {
    tokio::spawn(async move {
        let mut schedule = Schedule::new(mode, Instant::now());
        let mut tick = tokio::time::interval(schedule.step_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(?mode, "automatic compaction on");
        loop {
            tokio::select! {
                _ = ctx.stopped() => return,
                _ = tick.tick() => {}
            }
            let leader = ctx.raft.status().leader() == ctx.id.member_id;
            let Some(to) = schedule.step(Instant::now(), ctx.store.revision(), leader) else { continue };
            if to <= ctx.store.compact_revision() {
                schedule.compacted(Instant::now(), to);
                continue;
            }
            let started = Instant::now();
            match ctx.raft.propose(Write::Compaction(CompactionRequest { revision: to, physical: false })).await {
                Ok(_) | Err(RaftError::Apply(MvccError::Compacted)) => {
                    tracing::info!(revision = to, took = ?started.elapsed(), "automatic compaction done");
                    schedule.compacted(Instant::now(), to);
                }
                Err(e) => tracing::warn!(revision = to, error = %e, "automatic compaction failed; will retry"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps a schedule every `step_every` for `steps` steps, the revision growing by
    /// 10 a step; the compactions it asks for, as (step, revision).
    fn run(mode: AutoCompaction, steps: u32, leader: impl Fn(u32) -> bool) -> Vec<(u32, i64)> {
        let t0 = Instant::now();
        let mut s = Schedule::new(mode, t0);
        let every = s.step_every();
        let mut asked = Vec::new();
        for i in 0..steps {
            let now = t0 + every * i;
            if let Some(to) = s.step(now, 1 + 10 * i as i64, leader(i)) {
                asked.push((i, to));
                s.compacted(now, to);
            }
        }
        asked
    }

    #[test]
    fn periodic_keeps_the_retention_and_compacts_once_per_retention() {
        // 10 minutes: a step a minute; the first compaction after 10 minutes, to the
        // revision of step 0; then every 10 minutes, to the revision 10 minutes old.
        let asked = run(AutoCompaction::Periodic(Duration::from_secs(600)), 31, |_| true);
        assert_eq!(asked, vec![(10, 1), (20, 101), (30, 201)]);
    }

    #[test]
    fn periodic_over_an_hour_compacts_hourly_keeping_the_whole_retention() {
        // 2 hours: a step every 6 minutes, 21 revisions kept; the first compaction at
        // 2 hours (step 20) to the start, then every hour (10 steps) to 2 hours back.
        let asked = run(AutoCompaction::Periodic(Duration::from_secs(7200)), 41, |_| true);
        assert_eq!(asked, vec![(20, 1), (30, 101), (40, 201)]);
    }

    #[test]
    fn only_a_leader_compacts_and_a_new_one_uses_what_it_noted_as_a_follower() {
        let asked = run(AutoCompaction::Periodic(Duration::from_secs(600)), 31, |i| i >= 25);
        assert_eq!(asked, vec![(25, 151)]);
    }

    #[test]
    fn revision_mode_keeps_that_many_revisions_every_five_minutes() {
        let mode = AutoCompaction::Revision(25);
        assert_eq!(Schedule::new(mode, Instant::now()).step_every(), Duration::from_secs(300));
        // Revision 1, 11, 21: nothing to compact yet; then 31 - 25 = 6, 16, ...
        assert_eq!(run(mode, 6, |_| true), vec![(3, 6), (4, 16), (5, 26)]);
        assert!(run(mode, 6, |_| false).is_empty());
        // Nothing written since the last compaction: not asked again.
        let t0 = Instant::now();
        let mut s = Schedule::new(mode, t0);
        assert_eq!(s.step(t0, 100, true), Some(75));
        s.compacted(t0, 75);
        assert_eq!(s.step(t0 + REVISION_EVERY, 100, true), None);
    }

    #[test]
    fn flags_parse_as_etcd_reads_them() {
        use AutoCompaction::*;
        let p = AutoCompaction::parse;
        assert_eq!(p("periodic", "0"), Ok(None));
        assert_eq!(p("revision", "0"), Ok(None));
        assert_eq!(p("periodic", "1"), Ok(Some(Periodic(Duration::from_secs(3600)))));
        assert_eq!(p("periodic", "1h30m"), Ok(Some(Periodic(Duration::from_secs(5400)))));
        assert_eq!(p("periodic", "500ms"), Ok(Some(Periodic(Duration::from_millis(500)))));
        assert_eq!(p("revision", "1000"), Ok(Some(Revision(1000))));
        assert_eq!(p("daily", "1").unwrap_err(), "unknown auto-compaction-mode \"daily\"; use periodic or revision");
        for (mode, bad) in [("periodic", "abc"), ("periodic", "-1"), ("periodic", "1.5"), ("revision", "5m")] {
            let e = p(mode, bad).unwrap_err();
            assert!(e.starts_with("error parsing CompactionRetention: ") && e.contains(bad), "{mode} {bad}: {e}");
        }
    }
}

//! The election workload: candidates campaign on one election through etcd's Election
//! service, each under a lease of its own that a helper keeps alive through random
//! members. Once elected, a candidate proclaims a few values through random members and
//! resigns. Observers follow the election through Observe, each stream through a random
//! member for a few seconds, then through another.
//!
//! What is checked, after the run:
//! - **One leader at a time.** A candidate wins only once every earlier candidate's key
//!   is gone, and a proclaim succeeds only while the proclaimer's key exists. So a leader
//!   whose proclaim, sent after a later candidate won, succeeds was leading beside it.
//! - **Leaders in order.** An observer is never told of an earlier leader, or an earlier
//!   value of the leader, than one it was told of before: along one stream, and across
//!   its streams through different members (Observe starts with a linearizable read).
//! - **Nothing missed.** A stream tells every value a leader proclaimed after the first
//!   value it told of that leader, until it tells of another leader; each value as it
//!   was proclaimed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::lease::{call, pick, Channels, Session, CALL};
use crate::pb::v3electionpb::election_client::ElectionClient;
use crate::pb::v3electionpb::{CampaignRequest, LeaderKey, LeaderRequest, ProclaimRequest, ResignRequest};

/// The election's name (never a client key: see `run::is_client_key`).
const NAME: &str = "election/torture";
/// The TTL of a candidate's lease; members raise it to their minimum where that is more.
const TTL: i64 = 3;
/// Longest a Campaign call may wait to win.
const WAIT: Duration = Duration::from_secs(10);
/// Values a leader proclaims before it resigns.
const PROCLAIMS: usize = 3;
/// Observers following the election.
pub const OBSERVERS: usize = 2;

/// What the candidates and observers did and found.
#[derive(Debug, Default)]
pub struct ElectionLog {
    pub won: usize,
    /// Proclaims that took effect.
    pub proclaimed: usize,
    /// Proclaims refused: the leader's key was gone (its lease ran out) by then.
    pub refused: usize,
    /// Values told to observers.
    pub told: usize,
    pub problems: Vec<String>,
    terms: Vec<Term>,
    streams: Vec<Stream>,
}

/// One candidate's time as leader, as it knows it.
#[derive(Debug)]
struct Term {
    key: Bytes,
    /// Its key's create revision: candidates win in its order.
    rev: i64,
    /// When its Campaign returned.
    won: Instant,
    proclaims: Vec<Proclaim>,
}

/// A proclaim that took effect.
#[derive(Debug)]
struct Proclaim {
    sent: Instant,
    value: Bytes,
    revision: i64,
}

/// One Observe stream and what it told, in order.
#[derive(Debug)]
struct Stream {
    observer: usize,
    member: String,
    told: Vec<Told>,
}

#[derive(Debug)]
struct Told {
    key: Bytes,
    create: i64,
    modified: i64,
    value: Bytes,
}

impl Told {
    fn at(&self) -> (i64, i64) {
        (self.create, self.modified)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl ElectionLog {
    /// Checks what the candidates and observers recorded; fills `problems`.
    pub fn check(&mut self) {
        let mut problems = two_leaders(&self.terms);
        problems.extend(out_of_order(&self.streams));
        problems.extend(missed(&self.terms, &self.streams));
        self.told = self.streams.iter().map(|s| s.told.len()).sum();
        for p in &problems {
            tracing::warn!("{p}");
        }
        self.problems.extend(problems);
    }
}

/// Leaders whose proclaim, sent after a later candidate had won, took effect.
fn two_leaders(terms: &[Term]) -> Vec<String> {
    let mut by_rev: Vec<&Term> = terms.iter().collect();
    by_rev.sort_by_key(|t| t.rev);
    // For each term, the first win among the candidates after it.
    let mut first_later: Vec<Option<&Term>> = vec![None; by_rev.len()];
    let mut first: Option<&Term> = None;
    for (i, t) in by_rev.iter().enumerate().rev() {
        first_later[i] = first;
        if first.is_none_or(|f| t.won < f.won) {
            first = Some(t);
        }
    }
    let mut problems = Vec::new();
    for (t, later) in by_rev.iter().zip(first_later) {
        let Some(later) = later else { continue };
        for p in t.proclaims.iter().filter(|p| p.sent > later.won) {
            problems.push(format!(
                "two leaders: {} (created at {}) proclaimed {} at revision {}, sent {} ms after {} (created at {}) won",
                text(&t.key),
                t.rev,
                text(&p.value),
                p.revision,
                (p.sent - later.won).as_millis(),
                text(&later.key),
                later.rev
            ));
        }
    }
    problems
}

/// Observers told of an earlier leader, or an earlier value, than one before.
fn out_of_order(streams: &[Stream]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut last: HashMap<usize, (i64, i64)> = HashMap::new();
    for s in streams {
        for (i, t) in s.told.iter().enumerate() {
            let before = last.get(&s.observer).copied();
            // A new stream may begin with the value the last one ended with.
            let backwards = before.is_some_and(|b| if i == 0 { t.at() < b } else { t.at() <= b });
            if backwards {
                problems.push(format!(
                    "observer {} through {} was told of {} at (created {}, modified {}) after (created {}, modified {})",
                    s.observer,
                    s.member,
                    text(&t.key),
                    t.create,
                    t.modified,
                    before.map_or(0, |b| b.0),
                    before.map_or(0, |b| b.1)
                ));
            }
            last.insert(s.observer, t.at());
        }
    }
    problems
}

/// Proclaimed values a stream skipped, or told otherwise than proclaimed.
fn missed(terms: &[Term], streams: &[Stream]) -> Vec<String> {
    let by_key: HashMap<&Bytes, &Term> = terms.iter().map(|t| (&t.key, t)).collect();
    let mut problems = Vec::new();
    for s in streams {
        for (i, t) in s.told.iter().enumerate() {
            let Some(term) = by_key.get(&t.key).filter(|term| term.rev == t.create) else { continue };
            if let Some(p) = term.proclaims.iter().find(|p| p.revision == t.modified && p.value != t.value) {
                problems.push(format!(
                    "observer {} through {} was told {} at revision {}, where {} was proclaimed",
                    s.observer,
                    s.member,
                    text(&t.value),
                    t.modified,
                    text(&p.value)
                ));
            }
            // What the stream told next: until then, each later value of this leader.
            let Some(next) = s.told.get(i + 1) else { continue };
            let until = if next.key == t.key && next.create == t.create { next.modified } else { i64::MAX };
            for p in term.proclaims.iter().filter(|p| p.revision > t.modified && p.revision < until) {
                problems.push(format!(
                    "observer {} through {} was not told {} (revision {}) between revisions {} and {}",
                    s.observer,
                    s.member,
                    text(&p.value),
                    p.revision,
                    t.modified,
                    next.modified
                ));
            }
        }
    }
    problems
}

/// Adds to the log: one short critical section per record.
fn record(log: &Mutex<ElectionLog>, f: impl FnOnce(&mut ElectionLog)) {
    f(&mut log.lock().unwrap_or_else(|e| e.into_inner()));
}

/// One candidate, `c`, until `deadline`.
pub async fn candidate(
    c: usize,
    seed: u64,
    endpoints: Arc<RwLock<Vec<String>>>,
    deadline: Instant,
    log: Arc<Mutex<ElectionLog>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::patient();
    let pick = |rng: &mut StdRng| pick(&endpoints, rng);
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let Some(session) = Session::start(&mut channels, &endpoints, &mut rng, TTL).await else { continue };
        let value = |k: usize| Bytes::from(format!("c{c}-{n}-{k}"));
        let name = Bytes::from_static(NAME.as_bytes());
        let campaign = CampaignRequest { name, lease: session.lease, value: value(0) };
        match call(WAIT, ElectionClient::new(session.ch.clone()).campaign(campaign)).await.and_then(|r| r.leader) {
            Some(leader) => {
                let mut term =
                    Term { key: leader.key.clone(), rev: leader.rev, won: Instant::now(), proclaims: vec![] };
                for k in 1..=PROCLAIMS {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
                    let at = pick(&mut rng);
                    let Some(ch) = channels.get(&at).await else { continue };
                    let (sent, value) = (Instant::now(), value(k));
                    let req = ProclaimRequest { leader: Some(leader.clone()), value: value.clone() };
                    let answer = tokio::time::timeout(CALL, ElectionClient::new(ch).proclaim(req)).await;
                    match answer {
                        Ok(Ok(r)) => {
                            let revision = r.into_inner().header.map_or(0, |h| h.revision);
                            term.proclaims.push(Proclaim { sent, value, revision });
                        }
                        Ok(Err(s)) if s.message().contains("not leader") => {
                            record(&log, |l| l.refused += 1);
                            break;
                        }
                        // Its outcome is unknown: it checks nothing.
                        _ => channels.forget(&at),
                    }
                }
                resign(&mut channels, &pick(&mut rng), leader).await;
                record(&log, |l| {
                    l.won += 1;
                    l.proclaimed += term.proclaims.len();
                    l.terms.push(term);
                });
            }
            None => channels.forget(&session.ep),
        }
        session.end(&mut channels, &endpoints, &mut rng).await;
    }
}

async fn resign(channels: &mut Channels, at: &str, leader: LeaderKey) {
    if let Some(ch) = channels.get(at).await {
        let req = ResignRequest { leader: Some(leader) };
        if call(CALL, ElectionClient::new(ch).resign(req)).await.is_none() {
            channels.forget(at);
        }
    }
}

/// One observer, `o`, until `deadline`: streams through random members, a few seconds
/// each.
pub async fn observer(
    o: usize,
    seed: u64,
    endpoints: Arc<RwLock<Vec<String>>>,
    deadline: Instant,
    log: Arc<Mutex<ElectionLog>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut channels = Channels::patient();
    while Instant::now() < deadline {
        let member = pick(&endpoints, &mut rng);
        let until = (Instant::now() + Duration::from_millis(rng.random_range(2000..8000))).min(deadline);
        let Some(ch) = channels.get(&member).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = ElectionClient::new(ch);
        let observe = client.observe(LeaderRequest { name: Bytes::from_static(NAME.as_bytes()) });
        let Ok(Ok(stream)) = tokio::time::timeout(CALL, observe).await else {
            channels.forget(&member);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let mut told = Vec::new();
        while let Ok(Ok(Some(r))) = tokio::time::timeout_at(until.into(), stream.message()).await {
            if let Some(kv) = r.kv {
                told.push(Told { key: kv.key, create: kv.create_revision, modified: kv.mod_revision, value: kv.value });
            }
        }
        if Instant::now() < until {
            // The stream broke or ended early: the member may be gone.
            channels.forget(&member);
        }
        record(&log, |l| l.streams.push(Stream { observer: o, member, told }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(key: &str, rev: i64, won: Instant, proclaims: &[(Instant, &str, i64)]) -> Term {
        Term {
            key: Bytes::from(key.to_string()),
            rev,
            won,
            proclaims: proclaims
                .iter()
                .map(|&(sent, v, revision)| Proclaim { sent, value: Bytes::from(v.to_string()), revision })
                .collect(),
        }
    }

    fn stream(observer: usize, told: &[(&str, i64, i64, &str)]) -> Stream {
        Stream {
            observer,
            member: "m".into(),
            told: told
                .iter()
                .map(|&(k, create, modified, v)| Told {
                    key: Bytes::from(k.to_string()),
                    create,
                    modified,
                    value: Bytes::from(v.to_string()),
                })
                .collect(),
        }
    }

    #[test]
    fn the_election_is_not_a_client_key() {
        assert!(!super::super::run::is_client_key(NAME));
    }

    #[test]
    fn a_leader_that_proclaims_after_a_later_one_won_is_caught() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // a leads, then b wins once a is gone: a's proclaims before b won are fine.
        let fine = [term("e/a", 10, ms(0), &[(ms(5), "a1", 11)]), term("e/b", 12, ms(20), &[(ms(25), "b1", 14)])];
        assert!(two_leaders(&fine).is_empty());
        // a proclaims after b won: two leaders.
        let two = [term("e/a", 10, ms(0), &[(ms(30), "a1", 15)]), term("e/b", 12, ms(20), &[])];
        let problems = two_leaders(&two);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("e/a (created at 10) proclaimed a1") && problems[0].contains("after e/b"));
    }

    #[test]
    fn an_observer_told_of_an_earlier_leader_is_caught() {
        let fine = [stream(0, &[("e/a", 10, 10, "a0"), ("e/a", 10, 11, "a1")]), stream(0, &[("e/a", 10, 11, "a1")])];
        assert!(out_of_order(&fine).is_empty());
        let back = [stream(0, &[("e/b", 12, 12, "b0")]), stream(0, &[("e/a", 10, 11, "a1")])];
        assert_eq!(out_of_order(&back).len(), 1);
        let twice = [stream(0, &[("e/a", 10, 11, "a1"), ("e/a", 10, 11, "a1")])];
        assert_eq!(out_of_order(&twice).len(), 1);
    }

    #[test]
    fn a_stream_that_skips_a_proclaimed_value_or_changes_it_is_caught() {
        let t = Instant::now();
        let terms = [term("e/a", 10, t, &[(t, "a1", 11), (t, "a2", 12)]), term("e/b", 13, t, &[])];
        let whole =
            [stream(0, &[("e/a", 10, 10, "a0"), ("e/a", 10, 11, "a1"), ("e/a", 10, 12, "a2"), ("e/b", 13, 13, "b0")])];
        assert!(missed(&terms, &whole).is_empty());
        // A stream that starts late, or stops, misses nothing it could have told.
        let partial = [stream(0, &[("e/a", 10, 12, "a2")]), stream(1, &[("e/a", 10, 10, "a0")])];
        assert!(missed(&terms, &partial).is_empty());
        let skipped = [stream(0, &[("e/a", 10, 10, "a0"), ("e/a", 10, 12, "a2")])];
        assert_eq!(missed(&terms, &skipped).len(), 1);
        let skipped_to_next = [stream(0, &[("e/a", 10, 11, "a1"), ("e/b", 13, 13, "b0")])];
        assert_eq!(missed(&terms, &skipped_to_next).len(), 1);
        let changed = [stream(0, &[("e/a", 10, 11, "a9")])];
        assert_eq!(missed(&terms, &changed).len(), 1);
    }
}

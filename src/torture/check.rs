//! A linearizability checker for single-key register histories, in the manner of
//! Wing & Gong's search as porcupine does it: operations are taken in invocation order;
//! at each step any operation that was invoked before the earliest pending return may be
//! linearized next, if the model accepts its result; dead ends backtrack, and states
//! already explored (set of linearized operations + register value) are cached.
//!
//! Operations whose outcome is unknown (the client timed out) return at infinity with no
//! constraint on their result: the search may linearize them anywhere after their
//! invocation, or last — which is the same as never, for what any read observed.

use std::collections::{BTreeSet, HashSet};

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Read,
    Write(String),
    /// Compare-and-set: if the value is `expect`, set `new`.
    Cas {
        expect: String,
        new: String,
    },
    Delete,
}

/// What it got back; None when unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    Read(Option<String>),
    Written,
    Cas(bool),
    Deleted,
}

/// One operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: usize,
    pub input: Input,
    pub output: Option<Output>,
    /// Times in any monotonic unit.
    pub invoke: u64,
    pub complete: Option<u64>,
}

/// Applies `input` to `state` and checks `output`; returns the new state if they fit.
fn step(state: &Option<String>, input: &Input, output: &Option<Output>) -> Option<Option<String>> {
    match (input, output) {
        (Input::Read, Some(Output::Read(v))) => (v == state).then(|| state.clone()),
        (Input::Read, None) => Some(state.clone()),
        (Input::Write(v), Some(Output::Written) | None) => Some(Some(v.clone())),
        (Input::Delete, Some(Output::Deleted) | None) => Some(None),
        (Input::Cas { expect, new }, Some(Output::Cas(ok))) => {
            let holds = state.as_deref() == Some(expect.as_str());
            (holds == *ok).then(|| if holds { Some(new.clone()) } else { state.clone() })
        }
        (Input::Cas { expect, new }, None) => {
            // Unknown: it may have applied (if it could) or not; the search tries both by
            // applying when possible; the "not applied" branch is linearizing it last.
            Some(if state.as_deref() == Some(expect.as_str()) { Some(new.clone()) } else { state.clone() })
        }
        _ => None,
    }
}

/// A fixed pseudo-random 128-bit tag per operation index (splitmix64), so the set of
/// linearized operations hashes incrementally (Zobrist hashing) for the cache.
fn tag(i: usize) -> (u64, u64) {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (mix(i as u64), mix(i as u64 ^ 0xdead_beef_cafe_f00d))
}

/// The stand-in for every value no operation can tell apart: never read back and never
/// expected by a compare-and-set. Such values behave the same in every state, so writing
/// any of them is the same operation, which keeps the search small when many writes have
/// unknown outcomes.
const UNOBSERVED: &str = "\u{0}unobserved";

/// Replaces values nobody observed with [`UNOBSERVED`].
fn canonical(ops: &[Op], initial: &Option<String>) -> Vec<Op> {
    let mut seen: HashSet<&str> = HashSet::new();
    for o in ops {
        if let Some(Output::Read(Some(v))) = &o.output {
            seen.insert(v);
        }
        if let Input::Cas { expect, .. } = &o.input {
            seen.insert(expect);
        }
    }
    if let Some(v) = initial {
        seen.insert(v);
    }
    let map = |v: &String| if seen.contains(v.as_str()) { v.clone() } else { UNOBSERVED.to_string() };
    ops.iter()
        .map(|o| {
            let input = match &o.input {
                Input::Write(v) => Input::Write(map(v)),
                Input::Cas { expect, new } => Input::Cas { expect: expect.clone(), new: map(new) },
                other => other.clone(),
            };
            Op { input, ..o.clone() }
        })
        .collect()
}

/// How many operations of each class of unknown outcome a search path has used.
type Usage = std::collections::BTreeMap<usize, u32>;

/// Explored states: (known operations' hash, value) with the usages seen there.
type Cache = std::collections::HashMap<((u64, u64), Option<String>), Vec<Usage>>;

fn dominates(a: &Usage, b: &Usage) -> bool {
    // `a` used no more of any class than `b`: whatever `b` can still do, `a` can too.
    a.iter().all(|(c, n)| b.get(c).is_some_and(|m| n <= m))
}

/// Whether the history (of one key, starting from `initial`) is linearizable.
///
/// The search tries operations with a known outcome first and those with an unknown one
/// last, since a timed-out write usually did not need to happen for what was read.
/// Unknown-outcome operations with the same input form a class: once invoked they stay
/// available to the end, so which of them a path used does not matter, only how many.
/// A search state is the set of known operations linearized (a Zobrist hash), the
/// register's value and that count per class; a state is skipped when one with the same
/// set and value and no more used of any class was explored already.
pub fn linearizable(ops: &[Op], initial: Option<String>) -> bool {
    let mut ops = canonical(ops, &initial);
    ops.sort_by_key(|o| o.invoke);
    let ret = |o: &Op| o.complete.unwrap_or(u64::MAX);
    // Order of trial: (unknown outcome, index).
    let key = |i: usize, o: &Op| (o.complete.is_none(), i);
    let mut class_of: std::collections::HashMap<Input, usize> = std::collections::HashMap::new();
    let class: Vec<usize> = ops
        .iter()
        .map(|o| {
            let next = class_of.len();
            if o.complete.is_none() {
                *class_of.entry(o.input.clone()).or_insert(next)
            } else {
                usize::MAX
            }
        })
        .collect();
    // The rank of each unknown operation in its class, by invocation: the r-th may be
    // used only by a path that used fewer than r of the class.
    let mut seen_in_class: std::collections::HashMap<usize, u32> = Default::default();
    let rank: Vec<u32> = class
        .iter()
        .map(|c| {
            let r = seen_in_class.entry(*c).or_insert(0);
            *r += 1;
            *r
        })
        .collect();
    let mut pending: BTreeSet<(bool, usize)> = ops.iter().enumerate().map(|(i, o)| key(i, o)).collect();
    // Known operations by return: the search is done when none is left.
    let mut returns: BTreeSet<(u64, usize)> =
        ops.iter().enumerate().filter(|(_, o)| o.complete.is_some()).map(|(i, o)| (ret(o), i)).collect();
    let mut hash = (0u64, 0u64);
    let mut usage = Usage::new();
    let mut cache: Cache = Default::default();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut state = initial;
    let mut next_try = (false, 0usize);
    loop {
        let Some(&(min_ret, _)) = returns.first() else { return true };
        let mut chosen = None;
        let mut it = pending.range(next_try..).peekable();
        while let Some(&(unknown, i)) = it.next() {
            if ops[i].invoke > min_ret {
                if unknown {
                    break;
                }
                // The rest of the known ones were invoked later still: on to the unknown.
                it = pending.range((true, 0)..).peekable();
                continue;
            }
            if unknown && usage.get(&class[i]).copied().unwrap_or(0) >= rank[i] {
                continue;
            }
            let Some(s2) = step(&state, &ops[i].input, &ops[i].output) else { continue };
            let (h2, u2) = if unknown {
                if s2 == state {
                    // Changes nothing: skipping it leaves more to use later.
                    continue;
                }
                let mut u2 = usage.clone();
                *u2.entry(class[i]).or_insert(0) += 1;
                (hash, u2)
            } else {
                let t = tag(i);
                ((hash.0 ^ t.0, hash.1 ^ t.1), usage.clone())
            };
            let seen = cache.entry((h2, s2.clone())).or_default();
            if seen.iter().any(|u| dominates(u, &u2)) {
                continue;
            }
            seen.push(u2.clone());
            chosen = Some((i, s2, h2, u2));
            break;
        }
        if let Some((i, s2, h2, u2)) = chosen {
            stack.push((i, std::mem::replace(&mut state, s2)));
            if ops[i].complete.is_some() {
                pending.remove(&key(i, &ops[i]));
                returns.remove(&(ret(&ops[i]), i));
            }
            hash = h2;
            usage = u2;
            next_try = (false, 0);
            continue;
        }
        // Backtrack.
        let Some((last, prev)) = stack.pop() else { return false };
        if ops[last].complete.is_none() {
            if let Some(n) = usage.get_mut(&class[last]) {
                *n -= 1;
                if *n == 0 {
                    usage.remove(&class[last]);
                }
            }
        } else {
            pending.insert(key(last, &ops[last]));
            returns.insert((ret(&ops[last]), last));
            let t = tag(last);
            hash = (hash.0 ^ t.0, hash.1 ^ t.1);
        }
        state = prev;
        let (u, i) = key(last, &ops[last]);
        next_try = (u, i + 1);
    }
}

/// The shortest prefix (by completion order) of a failing history that still fails,
/// for a report a person can read.
pub fn shrink(ops: &[Op], initial: Option<String>) -> Vec<Op> {
    let mut sorted: Vec<Op> = ops.to_vec();
    sorted.sort_by_key(|o| o.invoke);
    let mut lo = 1;
    let mut hi = sorted.len();
    while lo < hi {
        let mid = (lo + hi) / 2;
        if linearizable(&sorted[..mid], initial.clone()) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    sorted.truncate(hi);
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, input: Input, output: Option<Output>, invoke: u64, complete: Option<u64>) -> Op {
        Op { client, input, output, invoke, complete }
    }
    fn w(v: &str) -> Input {
        Input::Write(v.into())
    }
    fn r(v: Option<&str>) -> Option<Output> {
        Some(Output::Read(v.map(String::from)))
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        let h = vec![
            op(0, w("a"), Some(Output::Written), 0, Some(10)),
            op(1, Input::Read, r(Some("a")), 2, Some(5)),
            op(2, Input::Read, r(None), 3, Some(6)),
        ];
        assert!(linearizable(&h, None));
    }

    #[test]
    fn a_stale_read_is_caught() {
        let h = vec![
            op(0, w("a"), Some(Output::Written), 0, Some(1)),
            op(0, w("b"), Some(Output::Written), 2, Some(3)),
            op(1, Input::Read, r(Some("a")), 4, Some(5)),
        ];
        assert!(!linearizable(&h, None));
        assert_eq!(shrink(&h, None).len(), 3);
    }

    #[test]
    fn a_lost_write_is_caught() {
        let h = vec![op(0, w("a"), Some(Output::Written), 0, Some(1)), op(1, Input::Read, r(None), 2, Some(3))];
        assert!(!linearizable(&h, None));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        let took = vec![op(0, w("a"), None, 0, None), op(1, Input::Read, r(Some("a")), 5, Some(6))];
        assert!(linearizable(&took, None));
        let did_not = vec![op(0, w("a"), None, 0, None), op(1, Input::Read, r(None), 5, Some(6))];
        assert!(linearizable(&did_not, None));
        // But not back and forth.
        let flip = vec![
            op(0, w("a"), None, 0, None),
            op(1, Input::Read, r(Some("a")), 5, Some(6)),
            op(1, Input::Read, r(None), 7, Some(8)),
        ];
        assert!(!linearizable(&flip, None));
    }

    #[test]
    fn compare_and_set_results_must_fit() {
        let cas = |e: &str, n: &str| Input::Cas { expect: e.into(), new: n.into() };
        let ok = vec![
            op(0, w("a"), Some(Output::Written), 0, Some(1)),
            op(1, cas("a", "b"), Some(Output::Cas(true)), 2, Some(3)),
            op(2, cas("a", "c"), Some(Output::Cas(false)), 4, Some(5)),
            op(0, Input::Read, r(Some("b")), 6, Some(7)),
        ];
        assert!(linearizable(&ok, None));
        let both_won = vec![
            op(0, w("a"), Some(Output::Written), 0, Some(1)),
            op(1, cas("a", "b"), Some(Output::Cas(true)), 2, Some(5)),
            op(2, cas("a", "c"), Some(Output::Cas(true)), 2, Some(5)),
        ];
        assert!(!linearizable(&both_won, None));
    }

    #[test]
    fn many_unknown_writes_stay_tractable() {
        // Every third write times out; none of them is ever read back.
        let mut h = Vec::new();
        for i in 0..3_000u64 {
            let lost = i % 3 == 0;
            let out = if lost { None } else { Some(Output::Written) };
            let done = if lost { None } else { Some(i * 10 + 12) };
            h.push(op((i % 6) as usize, w(&format!("v{i}")), out, i * 10, done));
            if !lost {
                h.push(op(
                    ((i + 1) % 6) as usize,
                    Input::Read,
                    r(Some(&format!("v{i}"))),
                    i * 10 + 13,
                    Some(i * 10 + 15),
                ));
            }
        }
        assert!(linearizable(&h, None));
        // And a stale read among them is still caught.
        h.push(op(7, Input::Read, r(Some("v1")), 10_000_000, Some(10_000_001)));
        assert!(!linearizable(&h, None));
    }

    #[test]
    fn an_unknown_write_may_explain_a_failed_compare_and_set() {
        let cas = |e: &str, n: &str| Input::Cas { expect: e.into(), new: n.into() };
        let h = vec![
            op(0, w("a"), Some(Output::Written), 0, Some(1)),
            op(1, w("lost"), None, 2, None),
            op(2, cas("a", "b"), Some(Output::Cas(false)), 3, Some(4)),
            op(0, w("c"), Some(Output::Written), 5, Some(6)),
            op(1, Input::Read, r(Some("c")), 7, Some(8)),
        ];
        assert!(linearizable(&h, None));
        // Without the unknown write, the failed compare-and-set cannot be explained.
        let without: Vec<Op> = h.iter().filter(|o| o.complete.is_some()).cloned().collect();
        assert!(!linearizable(&without, None));
    }

    #[test]
    fn very_long_histories_stay_tractable() {
        let mut h = Vec::new();
        for i in 0..100_000u64 {
            h.push(op((i % 6) as usize, w(&i.to_string()), Some(Output::Written), i * 10, Some(i * 10 + 12)));
            h.push(op(((i + 1) % 6) as usize, Input::Read, r(Some(&i.to_string())), i * 10 + 13, Some(i * 10 + 15)));
        }
        assert!(linearizable(&h, None));
    }

    #[test]
    fn long_histories_stay_tractable() {
        // 400 sequential writes and reads by 4 clients, overlapping in pairs.
        let mut h = Vec::new();
        for i in 0..200u64 {
            h.push(op((i % 4) as usize, w(&i.to_string()), Some(Output::Written), i * 10, Some(i * 10 + 6)));
            h.push(op(((i + 1) % 4) as usize, Input::Read, r(Some(&i.to_string())), i * 10 + 7, Some(i * 10 + 9)));
        }
        assert!(linearizable(&h, None));
    }
}

//! The fault harness in its short, seeded form: three real members under kill -9,
//! SIGSTOP/SIGCONT, mesh partitions and one-way loss, leader kills during snapshot
//! transfers, members joining and being replaced, and (as root) real network partitions
//! between namespaces; every client history is checked for linearizability and every
//! member's HashKV compared. And proof that the checks bite: deliberately broken builds
//! (linearizable reads served locally, leases ended early, a lock or a leadership given to
//! two) fail them.

mod common;

use std::process::Command;

/// One run at a time: runs side by side pick their members' ports from the free ones,
/// and a run whose members never start could find another run's member on a port it
/// chose, and check that cluster's history against its own.
static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn torture(args: &[&str]) -> (bool, String) {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(common::meshkv_bin()).arg("torture").args(args).env("RUST_LOG", "warn").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn summary_of(text: &str, seed: &str) -> String {
    text.lines().find(|l| l.starts_with(&format!("seed {seed}:"))).unwrap_or_default().to_string()
}

/// A run of `seconds` under `faults` with `seed` that must pass with every key's
/// history linearizable and every member's HashKV equal; its summary line and output.
fn linearizable_run(seconds: &str, seed: &str, faults: &str) -> (String, String) {
    let dir = common::tempdir();
    let d = dir.path().join("run").display().to_string();
    let (ok, text) = torture(&["--duration", seconds, "--seed", seed, "--faults", faults, "--dir", &d]);
    let summary = summary_of(&text, seed);
    println!("{summary}");
    assert!(ok, "{text}");
    assert!(summary.contains("0 keys not linearizable") && summary.contains("hashes agree"), "{summary}");
    (summary, text)
}

#[test]
fn seeded_short_run_under_every_mesh_fault_is_linearizable() {
    let faults = "kill,pause,partition,one-way,snapshot-leader-kill,join,replace";
    let (summary, text) = linearizable_run("100", "1", faults);
    let watch = text.lines().find(|l| l.starts_with("watch:")).unwrap_or_default();
    println!("{watch}");
    assert!(watch.ends_with(" 0 problems") && !watch.starts_with("watch: 0 events"), "{text}");
    for kind in ["\"kill\"", "\"pause\"", "\"partition\"", "\"one-way\"", "\"replace\"", "\"snapshot-leader-kill"] {
        assert!(summary.contains(kind), "the run injected {kind}: {summary}");
    }
    let leases = text.lines().find(|l| l.starts_with("leases:")).unwrap_or_default();
    println!("{leases}");
    assert!(leases.ends_with(" 0 problems") && !leases.contains(" 0 renewals"), "{text}");
    let locks = text.lines().find(|l| l.starts_with("locks:")).unwrap_or_default();
    println!("{locks}");
    assert!(locks.ends_with(" 0 problems") && !locks.contains(" 0 guarded writes"), "{text}");
    let elections = text.lines().find(|l| l.starts_with("elections:")).unwrap_or_default();
    println!("{elections}");
    let busy = !elections.contains(" 0 proclaimed") && !elections.contains(" 0 told");
    assert!(elections.ends_with(" 0 problems") && busy, "{text}");
}

#[test]
fn network_namespace_partitions_keep_the_history_linearizable() {
    if let Some(why) = meshkv::torture::netns::Netns::unavailable() {
        println!("skipped: {why}");
        return;
    }
    let (summary, _) = linearizable_run("45", "6", "net-partition,kill");
    assert!(summary.contains("\"net-partition\"") && summary.contains("\"net-isolate\""), "{summary}");
}

/// Members lose their disks (killed, data dir deleted, started again under their name)
/// between plain kills: the cluster takes each back and no acknowledged write is lost.
#[test]
fn members_that_lose_their_disks_lose_no_acknowledged_write() {
    let (summary, text) = linearizable_run("45", "3", "wipe,kill");
    assert!(summary.contains("\"wipe\""), "the run lost disks: {summary}");
    let watch = text.lines().find(|l| l.starts_with("watch:")).unwrap_or_default();
    assert!(watch.ends_with(" 0 problems"), "{text}");
}

/// A run of `seconds` under `faults` with `seed` on members started with the
/// deliberately broken `flag`, which must fail; its output and the run's directory.
fn broken_run(seconds: &str, seed: &str, faults: &str, flag: &str) -> (String, tempfile::TempDir) {
    let dir = common::tempdir();
    let d = dir.path().join("run").display().to_string();
    let args = ["--duration", seconds, "--seed", seed, "--faults", faults, "--member-args", flag, "--dir", &d];
    let (ok, text) = torture(&args);
    assert!(!ok, "the broken build passed: {text}");
    (text, dir)
}

#[test]
fn a_build_that_skips_read_index_is_caught() {
    let (text, dir) = broken_run("15", "2", "partition", "--unsafe-no-read-index");
    assert!(text.contains("violation on k"), "{text}");
    let report = std::fs::read_dir(dir.path().join("run"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("violation-"));
    let body = std::fs::read_to_string(report.expect("a violation report").path()).unwrap();
    assert!(body.starts_with("seed 2\n") && body.contains("shortest failing history"), "{body}");
}

/// Members whose leases end at half their TTL fail the lease check: a keep-alive or a
/// read finds a lease gone while its TTL, counted from the call that last renewed it,
/// has not run out.
#[test]
fn a_build_that_ends_leases_early_is_caught() {
    let (text, _dir) = broken_run("20", "4", "", "--unsafe-lease-half-ttl");
    assert!(text.contains("lease problem: lease ") && text.contains(" s early: found gone "), "{text}");
    let summary = summary_of(&text, "4");
    assert!(summary.contains("0 keys not linearizable") && summary.contains("hashes agree"), "{summary}");
}

/// Members whose Lock and Campaign do not wait for the holders and candidates before fail
/// the lock check (a locker's guarded write finds the counter changed since it read it
/// under the lock) and the election check (a leader proclaims after a later one won).
#[test]
fn a_build_that_gives_a_lock_or_a_leadership_to_two_is_caught() {
    let (text, _dir) = broken_run("15", "5", "", "--unsafe-no-wait-turn");
    assert!(text.contains("lock problem: under the lock ") && text.contains(" found it at "), "{text}");
    assert!(text.contains("election problem: two leaders: "), "{text}");
    let summary = summary_of(&text, "5");
    assert!(summary.contains("0 keys not linearizable") && summary.contains("hashes agree"), "{summary}");
}

/// A run whose members never serve checks nothing, and says so instead of passing.
#[test]
fn a_run_in_which_nothing_is_answered_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("run").display().to_string();
    let (ok, text) = torture(&[
        "--duration",
        "3",
        "--seed",
        "3",
        "--faults",
        "pause",
        "--dir",
        &d,
        "--member-args",
        "--no-such-flag",
    ]);
    assert!(!ok, "a run without members passed: {text}");
    assert!(text.contains("seed 3: 0 operations") && text.contains("no operation was answered"), "{text}");
}

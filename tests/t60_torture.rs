//! The fault harness in its short, seeded form: three real members under kill -9,
//! SIGSTOP/SIGCONT and mesh partitions, with every client history checked for
//! linearizability and every member's HashKV compared. And proof that the checks bite:
//! a deliberately broken build (linearizable reads served locally) fails them.

mod common;

use std::process::Command;

fn torture(args: &[&str]) -> (bool, String) {
    let out = Command::new(common::meshkv_bin()).arg("torture").args(args).env("RUST_LOG", "warn").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn seeded_short_run_under_kill_pause_and_partition_is_linearizable() {
    let dir = common::tempdir();
    let d = dir.path().join("run").display().to_string();
    let (ok, text) = torture(&["--duration", "75", "--seed", "1", "--faults", "kill,pause,partition", "--dir", &d]);
    let summary = text.lines().find(|l| l.starts_with("seed 1:")).unwrap_or_default().to_string();
    println!("{summary}");
    assert!(ok, "{text}");
    assert!(summary.contains("0 keys not linearizable") && summary.contains("hashes agree"), "{summary}");
    for kind in ["\"kill\"", "\"pause\"", "\"partition\""] {
        assert!(summary.contains(kind), "the run injected {kind}: {summary}");
    }
}

#[test]
fn a_build_that_skips_read_index_is_caught() {
    let dir = common::tempdir();
    let d = dir.path().join("run").display().to_string();
    let (ok, text) = torture(&[
        "--duration",
        "15",
        "--seed",
        "2",
        "--faults",
        "partition",
        "--member-args",
        "--unsafe-no-read-index",
        "--dir",
        &d,
    ]);
    assert!(!ok, "the broken build passed: {text}");
    assert!(text.contains("violation on k"), "{text}");
    let report = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("violation-"));
    let body = std::fs::read_to_string(report.expect("a violation report").path()).unwrap();
    assert!(body.starts_with("seed 2\n") && body.contains("shortest failing history"), "{body}");
}

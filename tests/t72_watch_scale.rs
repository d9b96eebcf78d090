//! Ten thousand watchers on one member under a thousand puts a second, two streams of
//! them stalled: `meshkv bench watch` checks that every running watcher gets every event
//! on its key exactly once and in order, and the member's memory stays bounded.

mod common;

use std::process::Command;

use common::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_watchers_get_every_event_once_in_order() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let out = Command::new(meshkv_bin())
        .args(["bench", "watch", "--endpoints", &server.client_addr])
        .args(["--watchers", "10000", "--streams", "20", "--key-space", "100"])
        .args(["--total", "5000", "--rate", "1000", "--stalled", "2", "--conns", "4"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{text}");
    let records = meshkv::bench::record::parse_lines(&text);
    let r = records.iter().find(|r| r.workload == "watch").expect("a report line");
    assert_eq!(r.ok, 500_000, "100 watchers a key, 50 puts a key, 100 keys: {r:?}");
    assert_eq!((r.extra["disorder"], r.extra["wrong_counts"], r.extra["put_errors"]), (0.0, 0.0, 0.0), "{r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
    let rss = rss_kib(server.child.id());
    println!("member RSS after the run: {} MiB", rss / 1024);
    assert!(rss > 0 && rss < 1024 * 1024, "memory stays bounded with stalled watchers: {rss} KiB");
}

//! Ten thousand watchers on one member under a thousand puts a second, two streams of
//! them stalled: `meshkv bench watch` checks that every running watcher gets every event
//! on its key exactly once and in order, and the member's memory stays bounded.

mod common;

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
    let args = ["watch", "--watchers", "10000", "--streams", "20", "--key-space", "100", "--total", "5000"];
    let r =
        bench_record(&server.client_addr, &[&args[..], &["--rate", "1000", "--stalled", "2", "--conns", "4"]].concat());
    assert_eq!(r.ok, 500_000, "100 watchers a key, 50 puts a key, 100 keys: {r:?}");
    assert_eq!((r.extra["disorder"], r.extra["wrong_counts"], r.extra["put_errors"]), (0.0, 0.0, 0.0), "{r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
    let rss = rss_kib(server.child.id());
    println!("member RSS after the run: {} MiB", rss / 1024);
    assert!(rss > 0 && rss < 1024 * 1024, "memory stays bounded with stalled watchers: {rss} KiB");
}

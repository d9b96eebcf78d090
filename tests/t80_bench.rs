//! `meshkv bench` against a real member: every workload runs, its counts match what the
//! server holds afterwards, open-loop rate and duration are kept, and `report` turns the
//! JSON lines of two systems into the ratio table and a plot.

mod common;

use std::process::Command;

use common::*;
use meshkv::bench::record::parse_lines;

fn count(endpoint: &str, prefix: &str) -> u64 {
    let out = etcdctl(endpoint, &["get", prefix, "--prefix", "--limit", "1", "-w", "json"], None);
    assert_eq!(out.status, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["count"].as_u64().unwrap_or(0)
}

#[test]
fn every_workload_runs_and_its_counts_are_what_the_server_holds() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let ep = server.client_addr.clone();

    // 300 puts over 300 distinct keys of 6 bytes: the server holds exactly those.
    let put = bench_record(
        &ep,
        &["put", "--total", "300", "--key-space", "300", "--key-size", "6", "--clients", "8", "--conns", "2"],
    );
    assert_eq!((put.ok, put.errors), (300, 0), "{put:?}");
    assert_eq!(count(&ep, "0"), 300, "every put landed on its own key");
    assert!(put.p50_ms > 0.0 && put.p50_ms <= put.p99_ms && put.p99_ms <= put.max_ms, "{put:?}");

    for w in ["range", "range-serializable", "lease"] {
        let r = bench_record(&ep, &[w, "--total", "200", "--clients", "4", "--conns", "2", "--key-space", "50"]);
        assert_eq!((r.ok, r.errors), (200, 0), "{w}: {r:?}");
    }
    // One client runs on a single thread: its connection and its keep-alive stream too.
    for w in ["put", "lease"] {
        let r = bench_record(&ep, &[w, "--total", "50", "--clients", "1", "--conns", "1", "--key-space", "50"]);
        assert_eq!((r.ok, r.errors), (50, 0), "{w}, one client: {r:?}");
    }
    // Every lease was revoked again.
    let leases = etcdctl(&ep, &["lease", "list"], None);
    assert!(leases.stdout.starts_with("found 0 leases"), "{leases:?}");

    // Eight clients updating one key with compare-and-swap must collide.
    let txn = bench_record(
        &ep,
        &["txn-mixed", "--total", "400", "--clients", "8", "--conns", "2", "--key-space", "1", "--key-size", "3"],
    );
    assert_eq!((txn.ok, txn.errors), (400, 0), "{txn:?}");
    assert!(txn.conflicts > 0 && txn.conflicts < 400, "some updates lost the race: {txn:?}");
    let got = etcdctl(&ep, &["get", "000", "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&got.stdout).unwrap();
    let version = v["kvs"][0]["version"].as_u64().unwrap();
    // The loading pass wrote the key once; every successful update once more.
    assert_eq!(version, 1 + 400 - txn.conflicts, "successful updates are exactly the writes: {txn:?}");

    let watch = bench_record(
        &ep,
        &["watch", "--watchers", "100", "--streams", "4", "--key-space", "5", "--total", "200", "--clients", "4"],
    );
    assert_eq!((watch.ok, watch.errors), (100 * 200 / 5, 0), "20 watchers a key, 40 puts a key: {watch:?}");
}

#[test]
fn rate_and_duration_are_kept_and_report_compares_two_systems() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let ep = server.client_addr.clone();

    // Open loop: 150 requests due at 100 a second take a second and a half at least.
    let paced = bench_record(&ep, &["put", "--total", "150", "--rate", "100", "--clients", "4", "--conns", "1"]);
    assert_eq!(paced.ok, 150);
    assert!(paced.seconds >= 1.45 && paced.ops_per_sec <= 104.0, "{paced:?}");
    // Duration instead of a count.
    let timed = bench_record(&ep, &["range-serializable", "--duration", "1.5", "--clients", "1", "--conns", "1"]);
    assert!(timed.seconds >= 1.45 && timed.seconds < 5.0 && timed.ok > 10, "{timed:?}");

    let out = dir.path().join("runs.jsonl");
    let json = out.to_str().unwrap();
    for (label, n) in [("meshkv", "120"), ("etcd", "60"), ("meshkv", "120"), ("etcd", "60")] {
        bench_record(
            &ep,
            &["put", "--total", n, "--clients", "2", "--conns", "1", "--label", label, "--case", "put", "--json", json],
        );
    }
    let svg = dir.path().join("lat.svg");
    let rep =
        Command::new(meshkv_bin()).args(["bench", "report", json, "--plot", svg.to_str().unwrap()]).output().unwrap();
    let table = String::from_utf8_lossy(&rep.stdout);
    assert!(rep.status.success(), "{table}{}", String::from_utf8_lossy(&rep.stderr));
    assert!(table.contains("| case | rounds | meshkv ops/s | etcd ops/s | meshkv/etcd |"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("| put | 2 |")), "two rounds of each: {table}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("meshkv") && plot.contains("etcd"), "{plot}");
}

#[test]
fn fsync_is_measured_on_the_disk_asked() {
    let dir = tempdir();
    let out = Command::new(meshkv_bin())
        .args(["bench", "fsync", "--total", "50", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let r = parse_lines(&String::from_utf8_lossy(&out.stdout)).remove(0);
    assert_eq!((r.workload.as_str(), r.ok), ("fsync", 50));
    assert!(r.p50_ms > 0.0, "{r:?}");
}

#[test]
fn with_user_the_bench_signs_in_and_without_its_requests_are_refused() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &["--bcrypt-cost", "4"]);
    let ep = server.client_addr.clone();
    enable_auth(&ep, "bench:bpw", "");
    let signed_in =
        bench_record(&ep, &["put", "--total", "200", "--clients", "4", "--conns", "2", "--user", "bench:bpw"]);
    assert_eq!((signed_in.ok, signed_in.errors), (200, 0), "{signed_in:?}");
    let read = bench_record(&ep, &["range", "--total", "100", "--clients", "2", "--conns", "1", "--user", "bench:bpw"]);
    assert_eq!((read.ok, read.errors), (100, 0), "{read:?}");
    // Without a user every request is refused, and counted as an error.
    let anonymous = bench_record(&ep, &["put", "--total", "50", "--clients", "2", "--conns", "1"]);
    assert_eq!((anonymous.ok, anonymous.errors), (0, 50), "{anonymous:?}");
    assert!(anonymous.first_error.as_deref().is_some_and(|e| e.contains("user name is empty")), "{anonymous:?}");
}

//! Acknowledged writes survive SIGKILL: 1,000 puts from 20 concurrent clients, a kill -9,
//! a restart on the same data dir, and every key is there at its acknowledged revision.
//! Once with the defaults (nothing flushed, the whole log applied again), once with a
//! short log (`--snapshot-count 20`): the store is flushed and the log trimmed many times
//! during the run, so the restart applies again only what the last flush did not cover.
//! A member whose disk fills stops, saying why, and keeps every write it acknowledged.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use etcd_client::{Client, GetOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill() {
    puts_survive_sigkill(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill_with_a_short_log() {
    puts_survive_sigkill(&["--snapshot-count", "20"]).await;
}

async fn puts_survive_sigkill(flags: &[&str]) {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut server = start_meshkv(&data, flags);
    let endpoint = server.endpoint();

    let mut tasks = Vec::new();
    for client in 0..20 {
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([endpoint], None).await.unwrap();
            let mut acked = Vec::new();
            for i in 0..50 {
                let key = format!("durable/{client:02}/{i:02}");
                let r = c.put(key.clone(), format!("value-{client}-{i}"), None).await.unwrap();
                acked.push((key, r.header().unwrap().revision()));
            }
            acked
        }));
    }
    let mut acked = BTreeMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 1000);
    let revs: std::collections::BTreeSet<i64> = acked.values().copied().collect();
    assert_eq!(revs.len(), 1000, "every put got its own revision");
    let last = *revs.iter().max().unwrap();

    server.kill9();
    let server = start_meshkv(&data, flags);
    let mut c = Client::connect([server.endpoint()], None).await.unwrap();
    let all = c.get("durable/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(all.count(), 1000);
    let got: BTreeMap<String, (i64, String)> = all
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), (kv.mod_revision(), kv.value_str().unwrap().to_string())))
        .collect();
    for (key, rev) in &acked {
        let (got_rev, value) = &got[key];
        assert_eq!(got_rev, rev, "{key} kept its acknowledged revision");
        let parts: Vec<&str> = key.split('/').collect();
        let (client, i): (u32, u32) = (parts[1].parse().unwrap(), parts[2].parse().unwrap());
        assert_eq!(value, &format!("value-{client}-{i}"));
    }
    assert_eq!(all.header().unwrap().revision(), last, "the store revision survives");
    let next = c.put("after-restart", "x", None).await.unwrap();
    assert_eq!(next.header().unwrap().revision(), last + 1, "the revision counter goes on");

    // A second, clean restart keeps the same state too.
    drop(c);
    let mut server = server;
    assert!(server.terminate().is_some_and(|s| s.success()), "orderly exit on SIGTERM");
    let server = start_meshkv(&data, flags);
    let mut c = Client::connect([server.endpoint()], None).await.unwrap();
    let g = c.get("after-restart", None).await.unwrap();
    assert_eq!(g.kvs()[0].mod_revision(), last + 1);
}

/// A member whose disk fills stops and says why, as etcd exits when it cannot write: the
/// writes it acknowledged are all kept. While the disk is still full it does not start,
/// and once there is room it serves them all and takes new writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_member_and_loses_no_acknowledged_write() {
    const VALUE: usize = 256 << 10;
    let dir = tempdir();
    let data = dir.path().join("disk");
    // Room for a fresh member (its Raft log file takes 64 MiB) and a few flushes.
    let disk = match SmallDisk::mount(&data, 96) {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let mut server = start_meshkv(&data, &[]);
    let mut c = Client::connect([server.endpoint()], None).await.unwrap();
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..1000u64 {
        match c.put(format!("full/{i:04}"), noise(i, VALUE), None).await {
            Ok(_) => acked.push(i),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("the disk filled");
    wait_until("the member to stop", Duration::from_secs(30), || server.child.try_wait().unwrap().is_some());
    let log = server.log();
    assert!(!server.child.wait().unwrap().success(), "{log}");
    assert!(log.contains("stopped: ") && log.contains("No space left on device"), "{refused}\n{log}");

    let mut args = vec!["--data-dir".to_string(), data.display().to_string()];
    args.extend(
        ["--listen-client-urls", "http://127.0.0.1:0", "--listen-peer-urls", "http://127.0.0.1:0"].map(String::from),
    );
    let said = refused_at_start(&args, &[]);
    assert!(said.contains("No space left on device"), "{said}");

    disk.resize(512);
    let server = start_meshkv(&data, &[]);
    let mut c = Client::connect([server.endpoint()], None).await.unwrap();
    let all = c.get("full/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert!(all.count() as usize >= acked.len(), "{} keys, {} acknowledged", all.count(), acked.len());
    for i in &acked {
        let got = c.get(format!("full/{i:04}"), None).await.unwrap();
        assert!(got.kvs().first().is_some_and(|kv| kv.value() == noise(*i, VALUE)), "full/{i:04} kept its value");
    }
    c.put("after", "room", None).await.unwrap();
}

//! Backups: `etcdctl snapshot save` from a running member, `meshkv snapshot restore` into
//! a new data dir, and a member started on it serves the same keys, history and
//! revisions (HashKV agrees), keeps the leases and the compaction, and takes new writes
//! after them, on a Raft log of its own. A damaged backup is refused and leaves nothing
//! behind. A snapshot of real etcd's restores the same way: the way over from etcd.

mod common;

use std::process::Command;

use common::*;
use etcd_client::{Client, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

fn restore(file: &std::path::Path, dir: &std::path::Path) -> std::process::Output {
    restore_with(file, dir, &[])
}

fn restore_with(file: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut c = Command::new(meshkv_bin());
    c.args(["snapshot", "restore"]).arg(file).arg("--data-dir").arg(dir).args(extra);
    c.output().unwrap()
}

type Row = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

fn rows(kvs: &[etcd_client::KeyValue]) -> Vec<Row> {
    kvs.iter()
        .map(|kv| {
            (kv.key().to_vec(), kv.value().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version(), kv.lease())
        })
        .collect()
}

async fn as_user(endpoint: &str, user: &str, password: &str) -> Result<Client, etcd_client::Error> {
    Client::connect([endpoint], Some(ConnectOptions::new().with_user(user, password))).await
}

/// What a server holds, read through `c`: every key at each of `revs`, and every event from
/// `from` up to `to`, with its key, value and revisions.
async fn history(c: &mut Client, revs: &[i64], from: i64, to: i64) -> (Vec<Vec<Row>>, Vec<(bool, Row)>) {
    let mut at = Vec::new();
    for &rev in revs {
        let opts = GetOptions::new().with_all_keys().with_revision(rev);
        at.push(rows(c.get("", Some(opts)).await.unwrap().kvs()));
    }
    let mut stream = c.watch("", Some(WatchOptions::new().with_all_keys().with_start_revision(from))).await.unwrap();
    let mut events = Vec::new();
    let got = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(resp) = stream.message().await.unwrap() {
            for ev in resp.events() {
                let kv = ev.kv().unwrap();
                events.push((ev.event_type() == EventType::Delete, rows(std::slice::from_ref(kv))[0].clone()));
                if kv.mod_revision() >= to {
                    return;
                }
            }
        }
    })
    .await;
    assert!(got.is_ok(), "the watch reached revision {to}: {} events", events.len());
    (at, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_snapshot_restores_into_a_new_member_with_the_same_history() {
    let dir = tempdir();
    let original = start_meshkv(&dir.path().join("a"), &[]);
    let mut c = Client::connect([original.endpoint()], None).await.unwrap();
    for i in 0..400u64 {
        c.put(format!("k/{:02}", i % 50), noise(i, 1024), None).await.unwrap();
    }
    c.delete("k/07", None).await.unwrap();
    let compact_at = c.put("k/marker", "m", None).await.unwrap().header().unwrap().revision();
    c.put("k/marker", "n", None).await.unwrap();
    c.compact(compact_at, None).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("leased", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let rev = c.get("k/", None).await.unwrap().header().unwrap().revision();
    let hash = c.hash_kv(rev).await.unwrap().hash();
    let everything = c.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();

    let file = dir.path().join("backup.db");
    let saved = etcdctl(&original.client_addr, &["snapshot", "save", file.to_str().unwrap()], None);
    assert_eq!(saved.status, 0, "{saved:?}");
    assert!(saved.stdout.contains(&format!("Snapshot saved at {}", file.display())), "{saved:?}");

    // Each message tells how many of the database's bytes are still to come, as etcd's
    // do (the SHA-256 after them is not counted).
    let mut stream = c.snapshot().await.unwrap();
    let mut told = Vec::new();
    let mut total = 0u64;
    while let Some(m) = stream.message().await.unwrap() {
        total += m.blob().len() as u64;
        told.push((total, m.remaining_bytes()));
    }
    assert!(told.len() > 2 && total % 512 == 32, "{} messages, {total} bytes", told.len());
    assert!(told.iter().all(|&(sent, left)| left == (total - 32).saturating_sub(sent)), "{told:?}");

    let restored_dir = dir.path().join("b");
    let out = restore(&file, &restored_dir);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains(&format!("at revision {rev} ")), "{out:?}");
    let again = restore(&file, &restored_dir);
    assert!(!again.status.success(), "a restore over a data dir is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a data dir"), "{again:?}");

    let restored = start_meshkv(&restored_dir, &[]);
    let mut r = Client::connect([restored.endpoint()], None).await.unwrap();
    let status = r.status().await.unwrap();
    let header = status.header().unwrap();
    assert_eq!(header.revision(), rev);
    let before = c.status().await.unwrap().raft_index();
    assert!(status.raft_index() < 10 && before > 400, "a new Raft log: {} against {before}", status.raft_index());
    assert_eq!(r.hash_kv(rev).await.unwrap().hash(), hash, "the same history");
    let back = r.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    assert_eq!(rows(back.kvs()), rows(everything.kvs()), "every key with its revisions and versions");
    // History after the compaction is there, and what it removed is gone as before.
    let old = r.get("k/marker", Some(GetOptions::new().with_revision(compact_at))).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"m");
    let gone = r.get("k/00", Some(GetOptions::new().with_revision(compact_at - 1))).await.unwrap_err();
    assert!(gone.to_string().contains("required revision has been compacted"), "{gone}");
    let ttl = r.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease is kept: {ttl:?}");
    assert_eq!(r.put("new", "w", None).await.unwrap().header().unwrap().revision(), rev + 1);

    // Damaged or cut short: refused, nothing left behind.
    let bytes = std::fs::read(&file).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x40;
    let cut = bytes[..bytes.len() - 40].to_vec();
    for (name, damaged, said) in
        [("flipped", flipped, "expected sha256 "), ("cut", cut, "snapshot missing hash but --skip-hash-check=false")]
    {
        let bad = dir.path().join(name);
        std::fs::write(&bad, damaged).unwrap();
        let target = dir.path().join(format!("{name}.meshkv"));
        let out = restore(&bad, &target);
        assert!(!out.status.success(), "{name}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(said), "{name}: {out:?}");
        assert!(!target.exists(), "{name}: nothing is left behind");
    }
}

/// A backup of meshkv's is etcd's kind of snapshot: `etcdctl snapshot status` reads it,
/// and real etcd, started on what `etcdctl snapshot restore` makes of it, serves the
/// same keys at every revision since the compaction, the same events, the lease with
/// its keys and the users with their passwords and permissions: the way back to etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshkv_backup_restores_into_real_etcd() {
    let dir = tempdir();
    let member = start_meshkv(&dir.path().join("m"), &[]);
    let m = member.endpoint();
    let mut c = Client::connect([m.as_str()], None).await.unwrap();
    for i in 0..1200u64 {
        let len = if i % 300 == 0 { 12_000 } else { 80 };
        c.put(format!("k/{:03}", i % 200), noise(i, len), None).await.unwrap();
    }
    c.delete("k/00", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    let compact_at = c.put("k/marker", "m", None).await.unwrap().header().unwrap().revision();
    let txn = Txn::new().and_then([TxnOp::put("t/a", "1", None), TxnOp::delete("k/150", None)]);
    c.txn(txn).await.unwrap();
    c.compact(compact_at, None).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("leased", "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let rev = c.put("k/last", "z", None).await.unwrap().header().unwrap().revision();
    enable_auth(&member.client_addr, "alice:alicepw", "k/");
    let mut root = as_user(&m, "root", "rootpw").await.unwrap();
    let revs = [compact_at, compact_at + 1, rev - 1, rev];
    let before = history(&mut root, &revs, compact_at + 1, rev).await;

    let file = dir.path().join("meshkv.snapshot");
    let saved =
        etcdctl(&member.client_addr, &["--user", "root:rootpw", "snapshot", "save", file.to_str().unwrap()], None);
    assert_eq!(saved.status, 0, "{saved:?}");
    let status = etcdctl("", &["snapshot", "status", file.to_str().unwrap(), "-w", "json"], None);
    assert_eq!(status.status, 0, "{status:?}");
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["revision"], rev, "{status}");

    let etcd_dir = dir.path().join("etcd");
    let restored =
        etcdctl("", &["snapshot", "restore", file.to_str().unwrap(), "--data-dir", etcd_dir.to_str().unwrap()], None);
    assert_eq!(restored.status, 0, "{restored:?}");
    let etcd = start_etcd(&etcd_dir);
    let e = format!("http://{}", etcd.client_addr);
    let mut eroot = as_user(&e, "root", "rootpw").await.unwrap();
    assert_serves(&mut eroot, &before, &revs, (compact_at, rev), lease, &["leased"]).await;
    let mut alice = as_user(&e, "alice", "alicepw").await.unwrap();
    let denied = alice.put("t/x", "no", None).await.unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    assert_eq!(alice.put("k/new", "w", None).await.unwrap().header().unwrap().revision(), rev + 1);
}

/// What a store restored from a backup must serve, read through `root`: `before` (the
/// original's [`history`] over `revs` and from just after `compact_at` to `rev`), the
/// compaction, and `lease` with `keys` attached.
async fn assert_serves(
    root: &mut Client,
    before: &(Vec<Vec<Row>>, Vec<(bool, Row)>),
    revs: &[i64],
    (compact_at, rev): (i64, i64),
    lease: i64,
    keys: &[&str],
) {
    let after = history(root, revs, compact_at + 1, rev).await;
    assert_eq!(after.0, before.0, "every key at each revision since the compaction");
    assert_eq!(after.1, before.1, "the events since the compaction");
    let gone = root.get("k/", Some(GetOptions::new().with_prefix().with_revision(compact_at - 1))).await.unwrap_err();
    assert!(gone.to_string().contains("required revision has been compacted"), "{gone}");
    let ttl = root.lease_time_to_live(lease, Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())).await;
    let ttl = ttl.unwrap();
    assert!(ttl.ttl() > 0 && ttl.granted_ttl() == 600, "{ttl:?}");
    let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    assert_eq!(ttl.keys(), keys);
}

/// A snapshot of real etcd (`etcdctl snapshot save` against etcd) restored into meshkv:
/// the keys at every revision since etcd's compaction, a watch's events from there, the
/// lease with its keys, and the users and roles with their passwords and permissions are
/// etcd's; new writes go on from etcd's revision. An etcd member's `db` file, without the
/// hash, is taken only with `--skip-hash-check`, as etcdctl takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_restores_into_meshkv_with_its_history_leases_and_users() {
    let dir = tempdir();
    let mut etcd = start_etcd(&dir.path().join("etcd"));
    let endpoint = format!("http://{}", etcd.client_addr);
    let mut e = Client::connect([endpoint.as_str()], None).await.unwrap();
    // Enough keys for branch pages in etcd's key bucket, some values over a page.
    for i in 0..1500u64 {
        let len = if i % 250 == 0 { 20_000 } else { 100 };
        e.put(format!("k/{:03}", i % 300), noise(i, len), None).await.unwrap();
    }
    e.delete("k/007", None).await.unwrap();
    e.delete("k/01", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    let txn =
        Txn::new().and_then([TxnOp::put("t/a", "1", None), TxnOp::put("t/b", "2", None), TxnOp::delete("k/020", None)]);
    e.txn(txn).await.unwrap();
    let compact_at = e.put("k/marker", "m", None).await.unwrap().header().unwrap().revision();
    for i in 0..100u64 {
        e.put(format!("k/{:03}", i * 3), noise(i, 50), None).await.unwrap();
    }
    e.compact(compact_at, None).await.unwrap();
    let lease = e.lease_grant(600, None).await.unwrap().id();
    for k in ["leased/1", "leased/2"] {
        e.put(k, "v", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    }
    e.delete("t/a", None).await.unwrap();
    let rev = e.put("k/last", "z", None).await.unwrap().header().unwrap().revision();
    enable_auth(&etcd.client_addr, "alice:alicepw", "k/");

    let mut root = as_user(&endpoint, "root", "rootpw").await.unwrap();
    let revs = [compact_at, compact_at + 1, compact_at + 50, rev - 3, rev];
    let before = history(&mut root, &revs, compact_at + 1, rev).await;
    assert_eq!(before.1.len() as i64, rev - compact_at, "one event a revision after the compaction");
    let file = dir.path().join("etcd.snapshot");
    let saved =
        etcdctl(&etcd.client_addr, &["--user", "root:rootpw", "snapshot", "save", file.to_str().unwrap()], None);
    assert_eq!(saved.status, 0, "{saved:?}");

    let restored_dir = dir.path().join("m");
    let out = restore(&file, &restored_dir);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("at revision {rev} ")), "{out:?}");
    let member = start_meshkv(&restored_dir, &[]);
    let m = member.endpoint();
    let mut mroot = as_user(&m, "root", "rootpw").await.unwrap();
    assert_serves(&mut mroot, &before, &revs, (compact_at, rev), lease, &["leased/1", "leased/2"]).await;

    // Users, roles and passwords: alice reads and writes under k/ only.
    let mut alice = as_user(&m, "alice", "alicepw").await.unwrap();
    let mine = alice.get("k/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(mine.count(), before.0[4].iter().filter(|r| r.0.starts_with(b"k/")).count() as i64);
    let denied = alice.put("t/x", "no", None).await.unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let wrong = as_user(&m, "alice", "nope").await.err().expect("a wrong password is refused");
    assert!(wrong.to_string().contains("authentication failed, invalid user ID or password"), "{wrong}");
    assert_eq!(alice.put("k/new", "w", None).await.unwrap().header().unwrap().revision(), rev + 1);

    // The member's own file, without the hash etcdctl adds.
    etcd.kill9();
    let db = dir.path().join("etcd/member/snap/db");
    let plain = dir.path().join("p");
    let out = restore(&db, &plain);
    assert!(!out.status.success() && !plain.exists(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("snapshot missing hash but --skip-hash-check=false"),
        "{out:?}"
    );
    let out = restore_with(&db, &plain, &["--skip-hash-check"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("at revision {rev} ")), "{out:?}");
}

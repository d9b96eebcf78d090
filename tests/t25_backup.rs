//! Backups: `etcdctl snapshot save` from a running member, `meshkv snapshot restore` into
//! a new data dir, and a member started on it serves the same keys, history and
//! revisions (HashKV agrees), keeps the leases and the compaction, and takes new writes
//! after them, on a Raft log of its own. A damaged backup is refused and leaves nothing
//! behind.

mod common;

use std::process::Command;

use common::*;
use etcd_client::{Client, GetOptions, PutOptions};

fn restore(file: &std::path::Path, dir: &std::path::Path) -> std::process::Output {
    Command::new(meshkv_bin()).args(["snapshot", "restore"]).arg(file).arg("--data-dir").arg(dir).output().unwrap()
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
    let fields = |kvs: &[etcd_client::KeyValue]| -> Vec<_> {
        kvs.iter()
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                    kv.lease(),
                )
            })
            .collect()
    };
    assert_eq!(fields(back.kvs()), fields(everything.kvs()), "every key with its revisions and versions");
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
    for (name, damaged) in [("flipped", flipped), ("cut", bytes[..bytes.len() - 40].to_vec())] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, damaged).unwrap();
        let target = dir.path().join(format!("{name}.meshkv"));
        let out = restore(&bad, &target);
        assert!(!out.status.success(), "{name}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("the backup is damaged"), "{name}: {out:?}");
        assert!(!target.exists(), "{name}: nothing is left behind");
    }
}

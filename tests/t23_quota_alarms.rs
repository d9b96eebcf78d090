//! The space quota and alarms, told by what clients see, against meshkv and Debian's
//! etcd side by side: a member past its --quota-backend-bytes refuses writes that take
//! space with etcd's error and raises NOSPACE; `etcdctl alarm list` and `endpoint status`
//! show it; reads, deletes and compaction go on; after a compaction and a defragment,
//! `etcdctl alarm disarm` lets writes in again. The CORRUPT alarm refuses every write.
//! On meshkv alone: the alarm outlives a restart, and the health endpoints report it.
//! Automatic compaction (--auto-compaction-retention) keeps history within its window
//! and drops what is older, on both systems alike.

mod common;

use std::time::{Duration, Instant};

use common::*;
use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions,
};

const QUOTA: &str = "4194304";

fn status_of(e: etcd_client::Error) -> tonic::Status {
    match e {
        etcd_client::Error::GRpcStatus(s) => s,
        other => panic!("not a gRPC status: {other:?}"),
    }
}

/// Puts 8 KiB values under `fill/` until one is refused; returns how many went in and
/// the refusal as "code: message".
async fn fill(c: &mut Client) -> (usize, String) {
    for i in 0..4000 {
        if let Err(e) = c.put(format!("fill/{i:05}"), noise(i, 8192), None).await {
            let s = status_of(e);
            return (i as usize, format!("{:?}: {}", s.code(), s.message()));
        }
    }
    panic!("4000 puts of 8 KiB all fit in a quota of {QUOTA} bytes");
}

/// Runs etcdctl; what it prints with the member's id in decimal replaced by ID (less the
/// client library's own log lines, which carry times and random names).
fn ctl(endpoint: &str, id: u64, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args, None);
    let text = format!("{}{}", out.stdout, out.stderr).replace(&id.to_string(), "ID");
    text.lines().filter(|l| !l.starts_with("{\"level\":")).map(|l| format!("{l}\n")).collect()
}

/// What `endpoint status` lists among the member's errors.
fn status_errors(endpoint: &str, id: u64) -> String {
    let out = etcdctl(endpoint, &["endpoint", "status", "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    v[0]["Status"]["errors"].to_string().replace(&id.to_string(), "ID")
}

/// One system's part up to the alarm: fills it and records what clients then see.
async fn over_quota(endpoint: &str, t: &mut Vec<String>) -> u64 {
    let mut c = Client::connect([format!("http://{endpoint}")], None).await.unwrap();
    let id = c.status().await.unwrap().header().unwrap().member_id();
    let (puts, refused) = fill(&mut c).await;
    assert!(puts > 100, "only {puts} puts of 8 KiB fit under {QUOTA} bytes");
    t.push(format!("fill refused: {refused}"));
    t.push(format!("alarm list: {}", ctl(endpoint, id, &["alarm", "list"])));
    id
}

/// The rest: what works and what does not under NOSPACE, then the way out.
async fn under_alarm_and_out(endpoint: &str, id: u64, t: &mut Vec<String>) {
    let mut c = Client::connect([format!("http://{endpoint}")], None).await.unwrap();
    t.push(format!("status errors: {}", status_errors(endpoint, id)));
    t.push(format!("small put: {}", ctl(endpoint, id, &["put", "tiny", "x"])));
    t.push(format!("lease grant: {}", ctl(endpoint, id, &["lease", "grant", "60"])));
    let read_txn = Txn::new()
        .when([Compare::version("fill/00000", CompareOp::Greater, 0)])
        .and_then([TxnOp::get("fill/00000", None)]);
    let r = c.txn(read_txn).await.map(|r| r.succeeded());
    t.push(format!("read-only txn: {r:?}"));
    let put_txn = Txn::new().and_then([TxnOp::put("tiny", "x", None)]);
    let r = c.txn(put_txn).await.map_err(|e| status_of(e).message().to_string());
    t.push(format!("txn with a put: {:?}", r.map(|r| r.succeeded())));
    let got = c.get("fill/00000", None).await.unwrap();
    t.push(format!("get: {} bytes", got.kvs()[0].value().len()));
    let deleted = c.delete("fill/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    assert!(deleted.deleted() > 100, "{deleted:?}");
    let rev = deleted.header().unwrap().revision().to_string();
    t.push(format!("compact: {}", ctl(endpoint, id, &["compact", &rev]).replace(&rev, "REV")));
    let defrag = ctl(endpoint, id, &["defrag"]);
    t.push(format!("defrag: {}", defrag.split('[').next().unwrap_or_default()));
    // Room again, but the alarm still holds until it is disarmed.
    t.push(format!("put before disarm: {}", ctl(endpoint, id, &["put", "tiny", "x"])));
    t.push(format!("disarm: {}", ctl(endpoint, id, &["alarm", "disarm"])));
    t.push(format!("alarm list: {}", ctl(endpoint, id, &["alarm", "list"])));
    t.push(format!("put after disarm: {}", ctl(endpoint, id, &["put", "tiny", "x"])));
    t.push(format!("status errors: {}", status_errors(endpoint, id)));

    // CORRUPT, raised through the API: no write at all, reads go on, disarm clears it.
    let mut me = AlarmOptions::new();
    me.with_member(id);
    let raised = c.alarm(AlarmAction::Activate, AlarmType::Corrupt, Some(me.clone())).await.unwrap();
    t.push(format!("corrupt raised: {:?}", raised.alarms().iter().map(|a| a.alarm()).collect::<Vec<_>>()));
    t.push(format!("put: {}", ctl(endpoint, id, &["put", "tiny", "y"])));
    t.push(format!("delete: {}", ctl(endpoint, id, &["del", "tiny"])));
    t.push(format!("get: {}", ctl(endpoint, id, &["get", "tiny", "--print-value-only"])));
    t.push(format!("disarm: {}", ctl(endpoint, id, &["alarm", "disarm"])));
    t.push(format!("delete after disarm: {}", ctl(endpoint, id, &["del", "tiny"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_and_corrupt_alarms_behave_as_etcds() {
    let quota = ["--quota-backend-bytes", QUOTA];

    let etcd_dir = tempdir();
    let etcd = start_etcd_with(etcd_dir.path(), &quota);
    let mut want = Vec::new();
    let etcd_id = over_quota(&etcd.client_addr, &mut want).await;
    under_alarm_and_out(&etcd.client_addr, etcd_id, &mut want).await;
    drop(etcd);

    let dir = tempdir();
    let mut p = start_meshkv(dir.path(), &quota);
    let mut got = Vec::new();
    let id = over_quota(&p.client_addr, &mut got).await;
    let client = p.endpoint();
    let health = |q: &str| curl(&format!("{client}/health{q}"), &[]);
    let h = health("");
    assert_eq!((h.status, h.body.as_str()), (503, "{\"health\":\"false\",\"reason\":\"ALARM NOSPACE\"}\n"), "{h:?}");
    assert_eq!(health("?exclude=NOSPACE").status, 200, "NOSPACE excluded");
    let ready = curl(&format!("{client}/readyz"), &[]);
    assert_eq!((ready.status, ready.body.as_str()), (200, "ok\n"), "NOSPACE is no corruption");
    let scraped = curl(&format!("{client}/metrics"), &[]).body;
    assert_eq!(metric(&scraped, "etcd_server_quota_backend_bytes"), Some(4194304.0));

    // The alarm is part of the store: it holds after a restart.
    assert!(p.terminate().is_some_and(|s| s.success()), "{}", p.log());
    let mut p = start_meshkv(dir.path(), &quota);
    assert_eq!(ctl(&p.client_addr, id, &["alarm", "list"]), "memberID:ID alarm:NOSPACE \n", "after the restart");
    under_alarm_and_out(&p.client_addr, id, &mut got).await;
    assert_eq!(got, want, "meshkv (left) against etcd (right)");
    let log = p.log();
    assert!(log.contains("alarm raised") && log.contains("alarm disarmed"), "{log}");

    // While CORRUPT holds, readiness fails and says why.
    let mut c = Client::connect([p.endpoint()], None).await.unwrap();
    let mut me = AlarmOptions::new();
    me.with_member(id);
    c.alarm(AlarmAction::Activate, AlarmType::Corrupt, Some(me.clone())).await.unwrap();
    let client = p.endpoint();
    let ready = curl(&format!("{client}/readyz"), &[]);
    assert_eq!(ready.status, 503);
    assert!(ready.body.starts_with("[-]data_corruption failed: alarm activated: CORRUPT\n"), "{:?}", ready.body);
    let h = curl(&format!("{client}/health"), &[]);
    assert_eq!(h.body, "{\"health\":\"false\",\"reason\":\"ALARM CORRUPT\"}\n");
    c.alarm(AlarmAction::Deactivate, AlarmType::Corrupt, Some(me)).await.unwrap();
    wait_until("ready again", Duration::from_secs(10), || curl(&format!("{client}/readyz"), &[]).status == 200);
    p.terminate();
}

/// Puts a key every 50 ms until a read at its first revision is refused as compacted;
/// then asks a watch from revision 1 what the store is compacted to. Returns the
/// refusal, and checks the window: the compaction kept every revision written within
/// the last `retention` (the leader compacts to a revision it noted that long ago).
async fn compacted_by_itself(endpoint: &str, retention: Duration) -> String {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut sent: Vec<(Instant, i64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let at = Instant::now();
        let rev = c.put("auto", sent.len().to_string(), None).await.unwrap().header().unwrap().revision();
        sent.push((at, rev));
        if let Err(e) = c.get("auto", Some(GetOptions::new().with_revision(sent[0].1))).await {
            let s = status_of(e);
            break format!("{:?}: {}", s.code(), s.message());
        }
        assert!(Instant::now() < deadline, "{endpoint}: revision {} was never compacted", sent[0].1);
        // The pace of the writes, not a wait for an outcome.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut events = c.watch("auto", Some(WatchOptions::new().with_start_revision(1))).await.unwrap();
    let compacted = loop {
        let r = events.message().await.unwrap().expect("a watch from a compacted revision is told so");
        if r.compact_revision() != 0 {
            break r.compact_revision();
        }
    };
    let answered = Instant::now();
    let written_before_window = sent.iter().filter(|(at, _)| *at + retention <= answered).map(|(_, r)| *r).max();
    assert!(
        compacted > sent[0].1 && written_before_window.is_some_and(|r| compacted <= r),
        "{endpoint}: compacted to {compacted}; revisions written within the last {retention:?} must stay \
         (the last one written before: {written_before_window:?}; writes: {sent:?})"
    );
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_compaction_keeps_its_window_and_drops_older_history_as_etcd_does() {
    let dir = tempdir();
    let flags = ["--auto-compaction-retention", "2s"];
    let m = start_meshkv(&dir.path().join("meshkv"), &flags);
    let e = start_etcd_with(&dir.path().join("etcd"), &flags);
    let retention = Duration::from_secs(2);
    let (m_endpoint, e_endpoint) = (m.endpoint(), e.endpoint());
    let (ours, etcds) =
        tokio::join!(compacted_by_itself(&m_endpoint, retention), compacted_by_itself(&e_endpoint, retention));
    assert_eq!(ours, "OutOfRange: etcdserver: mvcc: required revision has been compacted");
    assert_eq!(ours, etcds);
}

#[test]
fn automatic_compaction_flags_are_refused_at_start_in_etcds_words() {
    let dir = tempdir();
    let run = |args: &[&str]| refused_at_start_in(dir.path(), args);
    let err = run(&["--auto-compaction-mode", "daily", "--auto-compaction-retention", "1"]);
    assert!(err.contains("unknown auto-compaction-mode \"daily\""), "{err}");
    let err = run(&["--auto-compaction-retention", "abc"]);
    assert!(err.contains("error parsing CompactionRetention: invalid duration \"abc\""), "{err}");
    let err = run(&["--auto-compaction-mode", "revision", "--auto-compaction-retention", "5m"]);
    assert!(err.contains("error parsing CompactionRetention: \"5m\" is not a whole number of revisions"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

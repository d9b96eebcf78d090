//! The KV scenarios through the Rust `etcd-client` crate, against the real binary,
//! including the calls Kubernetes' storage layer makes.

mod common;

use common::*;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tonic::Code;

async fn connect(p: &Proc) -> Client {
    Client::connect([p.endpoint()], None).await.expect("connect")
}

fn status_of(e: etcd_client::Error) -> tonic::Status {
    match e {
        etcd_client::Error::GRpcStatus(s) => s,
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

fn keys(kvs: &[etcd_client::KeyValue]) -> Vec<String> {
    kvs.iter().map(|kv| kv.key_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_scenarios_through_etcd_client() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let mut c = connect(&server).await;

    // Put and get; headers carry the cluster, member, revision and term.
    let r = c.put("foo", "bar", None).await.unwrap();
    let h = r.header().unwrap();
    assert_eq!(h.revision(), 2);
    assert!(h.cluster_id() != 0 && h.member_id() != 0 && h.raft_term() >= 1, "{h:?}");
    let r = c.put("foo", "bar2", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"bar");
    let g = c.get("foo", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!((kv.value(), kv.create_revision(), kv.mod_revision(), kv.version()), (&b"bar2"[..], 2, 3, 2));
    assert_eq!(g.header().unwrap().revision(), 3);
    assert_eq!(c.get("foo", Some(GetOptions::new().with_serializable())).await.unwrap().kvs().len(), 1);

    // Prefix, from-key, explicit range, limit with more and count.
    for (k, v) in [("/app/a", "1"), ("/app/b", "2"), ("/app/c", "30"), ("/apq", "4")] {
        c.put(k, v, None).await.unwrap();
    }
    let g = c.get("/app", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(keys(g.kvs()), ["/app/a", "/app/b", "/app/c"]);
    let g = c.get("/app/b", Some(GetOptions::new().with_from_key())).await.unwrap();
    assert_eq!(keys(g.kvs()), ["/app/b", "/app/c", "/apq", "foo"]);
    let g = c.get("/app/a", Some(GetOptions::new().with_range("/app/c"))).await.unwrap();
    assert_eq!(keys(g.kvs()), ["/app/a", "/app/b"]);
    let g = c.get("/app", Some(GetOptions::new().with_prefix().with_limit(2))).await.unwrap();
    assert_eq!((keys(g.kvs()).len(), g.more(), g.count()), (2, true, 3));
    let g = c.get("/app", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!((g.kvs().len(), g.count()), (0, 3));
    let g = c.get("/app", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert!(g.kvs().iter().all(|kv| kv.value().is_empty()));

    // Sorting, and revision filters.
    c.put("/app/a", "9", None).await.unwrap();
    let g = c
        .get("/app", Some(GetOptions::new().with_prefix().with_sort(SortTarget::Mod, SortOrder::Descend)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["/app/a", "/app/c", "/app/b"]);
    let g = c
        .get("/app", Some(GetOptions::new().with_prefix().with_sort(SortTarget::Value, SortOrder::Ascend)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["/app/b", "/app/c", "/app/a"]);
    let g = c
        .get("/app", Some(GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Descend).with_limit(1)))
        .await
        .unwrap();
    assert_eq!((keys(g.kvs()), g.more(), g.count()), (vec!["/app/c".to_string()], true, 3));
    let g = c.get("/app", Some(GetOptions::new().with_prefix().with_min_mod_revision(6))).await.unwrap();
    assert_eq!(keys(g.kvs()), ["/app/a", "/app/c"]);
    let g = c.get("/app", Some(GetOptions::new().with_prefix().with_max_create_revision(5))).await.unwrap();
    assert_eq!(keys(g.kvs()), ["/app/a", "/app/b"]);

    // History.
    let g = c.get("foo", Some(GetOptions::new().with_revision(2))).await.unwrap();
    assert_eq!(g.kvs()[0].value(), b"bar");
    let g = c.get("/app/a", Some(GetOptions::new().with_revision(3))).await.unwrap();
    assert!(g.kvs().is_empty());
    let e = status_of(c.get("foo", Some(GetOptions::new().with_revision(1000))).await.unwrap_err());
    assert_eq!((e.code(), e.message()), (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision"));

    // Deletes.
    let d = c.delete("/app/a", Some(DeleteOptions::new().with_prev_key())).await.unwrap();
    assert_eq!((d.deleted(), d.prev_kvs()[0].value()), (1, &b"9"[..]));
    let d = c.delete("/app/a", None).await.unwrap();
    assert_eq!(d.deleted(), 0);
    let rev_before = d.header().unwrap().revision();
    let d = c.delete("/app", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    assert_eq!((d.deleted(), d.header().unwrap().revision()), (2, rev_before + 1));

    // Txn: compares on every target, nested txns, one revision per txn.
    let rev = c.get("foo", None).await.unwrap().kvs()[0].mod_revision();
    let t = Txn::new()
        .when([
            Compare::mod_revision("foo", CompareOp::Equal, rev),
            Compare::version("foo", CompareOp::Greater, 1),
            Compare::create_revision("foo", CompareOp::Less, rev + 1),
            Compare::value("foo", CompareOp::NotEqual, "zzz"),
            Compare::lease("foo", CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put("t1", "a", None),
            TxnOp::put("t2", "b", None),
            TxnOp::get("t1", None),
            TxnOp::txn(
                Txn::new()
                    .when([Compare::version("t1", CompareOp::Equal, 0)])
                    .and_then([TxnOp::put("t3", "x", None)])
                    .or_else([TxnOp::put("t4", "y", None)]),
            ),
        ])
        .or_else([TxnOp::put("t1", "else", None)]);
    let r = c.txn(t).await.unwrap();
    assert!(r.succeeded());
    let txn_rev = r.header().unwrap().revision();
    let resps = r.op_responses();
    match &resps[2] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"a", "reads inside a txn see its writes"),
        other => panic!("unexpected {other:?}"),
    }
    match &resps[3] {
        TxnOpResponse::Txn(t) => assert!(t.succeeded(), "nested compares see the state before the txn"),
        other => panic!("unexpected {other:?}"),
    }
    for k in ["t1", "t2", "t3"] {
        assert_eq!(c.get(k, None).await.unwrap().kvs()[0].mod_revision(), txn_rev);
    }
    assert!(c.get("t4", None).await.unwrap().kvs().is_empty());
    let r = c
        .txn(Txn::new().when([Compare::value("missing", CompareOp::Equal, "")]).or_else([TxnOp::get("t1", None)]))
        .await
        .unwrap();
    assert!(!r.succeeded(), "a value compare on a missing key fails");
    assert_eq!(r.header().unwrap().revision(), txn_rev, "a read-only txn takes no revision");

    let e = status_of(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)])).await.unwrap_err(),
    );
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "etcdserver: duplicate key given in txn request"));
    let many: Vec<TxnOp> = (0..129).map(|i| TxnOp::put(format!("m{i}"), "v", None)).collect();
    let e = status_of(c.txn(Txn::new().and_then(many)).await.unwrap_err());
    assert_eq!(e.message(), "etcdserver: too many operations in txn request");

    // Compaction.
    let now = c.put("c", "1", None).await.unwrap().header().unwrap().revision();
    c.compact(now - 1, Some(CompactionOptions::new().with_physical())).await.unwrap();
    let e = status_of(c.get("foo", Some(GetOptions::new().with_revision(now - 2))).await.unwrap_err());
    assert_eq!((e.code(), e.message()), (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"));
    assert!(c.get("foo", Some(GetOptions::new().with_revision(now - 1))).await.is_ok());
    let e = status_of(c.compact(now - 1, None).await.unwrap_err());
    assert_eq!(e.message(), "etcdserver: mvcc: required revision has been compacted");

    // Bad input.
    let e = status_of(c.put("", "v", None).await.unwrap_err());
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "etcdserver: key is not provided"));
    let e = status_of(c.put("big", vec![b'x'; 1_600_000], None).await.unwrap_err());
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "etcdserver: request is too large"));
    let e = status_of(c.put("foo", "v", Some(PutOptions::new().with_lease(77))).await.unwrap_err());
    assert_eq!((e.code(), e.message()), (Code::NotFound, "etcdserver: requested lease not found"));
    let e = status_of(c.put("nokey", "", Some(PutOptions::new().with_ignore_value())).await.unwrap_err());
    assert_eq!(e.message(), "etcdserver: key not found");
    assert_eq!(c.get("big", None).await.unwrap().kvs().len(), 0, "a refused write leaves nothing behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_storage_calls() {
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let mut c = connect(&server).await;
    let key = "/registry/pods/default/p1";

    // Create: succeeds once, then fails without writing.
    let create = |v: &'static str| {
        Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(key, v, None)])
    };
    let r = c.txn(create("v1")).await.unwrap();
    assert!(r.succeeded());
    let created_rev = r.header().unwrap().revision();
    let r = c.txn(create("v1-again")).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(r.header().unwrap().revision(), created_rev);

    // Update with a stale revision returns the current object from the else branch.
    let update = |rev: i64, v: &'static str| {
        Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key, v, None)])
            .or_else([TxnOp::get(key, None)])
    };
    let r = c.txn(update(created_rev, "v2")).await.unwrap();
    assert!(r.succeeded());
    let updated_rev = r.header().unwrap().revision();
    let r = c.txn(update(created_rev, "v3")).await.unwrap();
    assert!(!r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => {
            assert_eq!((g.kvs()[0].value(), g.kvs()[0].mod_revision()), (&b"v2"[..], updated_rev))
        }
        other => panic!("unexpected {other:?}"),
    }

    // Delete guarded the same way.
    let r = c
        .txn(
            Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, updated_rev)])
                .and_then([TxnOp::delete(key, None)])
                .or_else([TxnOp::get(key, None)]),
        )
        .await
        .unwrap();
    assert!(r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 1),
        other => panic!("unexpected {other:?}"),
    }

    // Paged list at a fixed revision, resumed from the last key + "\0"; count ignores the limit.
    for i in 0..25 {
        c.put(format!("/registry/cm/ns/{i:02}"), "x", None).await.unwrap();
    }
    let list_rev = c.put("/registry/cm/other", "x", None).await.unwrap().header().unwrap().revision();
    c.put("/registry/cm/ns/99", "after", None).await.unwrap();
    let prefix = "/registry/cm/ns/";
    let mut seen = Vec::new();
    let mut start = prefix.as_bytes().to_vec();
    loop {
        let g = c
            .get(
                start.clone(),
                Some(GetOptions::new().with_range("/registry/cm/ns0").with_limit(10).with_revision(list_rev)),
            )
            .await
            .unwrap();
        assert_eq!(g.count(), 25 - seen.len() as i64, "count covers the rest of the range, not the page");
        seen.extend(keys(g.kvs()));
        if !g.more() {
            break;
        }
        start = g.kvs().last().unwrap().key().to_vec();
        start.push(0);
    }
    let want: Vec<String> = (0..25).map(|i| format!("/registry/cm/ns/{i:02}")).collect();
    assert_eq!(seen, want);

    let g = c.get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!((g.count(), g.kvs().len()), (26, 0));

    // Status reports an etcd version Kubernetes accepts, and the raft state.
    let s = c.status().await.unwrap();
    let v: Vec<u32> = s.version().split('.').map(|p| p.parse().unwrap()).collect();
    assert!(v >= vec![3, 5, 13], "version {}", s.version());
    assert_eq!(s.leader(), s.header().unwrap().member_id());
    assert!(s.raft_index() > 0);
}

/// etcd's --max-concurrent-streams: a connection holds that many calls open at once; the
/// next waits until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_max_concurrent_streams_calls() {
    use meshkv::pb::etcdserverpb::watch_client::WatchClient;
    use meshkv::pb::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
    use std::time::Duration;
    let dir = tempdir();
    let p = start_meshkv(dir.path(), &["--max-concurrent-streams=2"]);
    let ch = tonic::transport::Endpoint::from_shared(p.endpoint()).unwrap().connect().await.unwrap();
    let open = |key: &'static str| {
        let mut client = WatchClient::new(ch.clone());
        async move {
            let create = WatchCreateRequest { key: key.into(), ..Default::default() };
            let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(req).await.unwrap();
            let mut stream = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
            let created = stream.message().await.unwrap().unwrap();
            assert!(created.created);
            (tx, stream)
        }
    };
    let first = open("a").await;
    let _second = open("b").await;
    let third = tokio::spawn(open("c"));
    // That nothing happens can only be watched for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third call on the connection waits");
    drop(first);
    let waited = tokio::time::timeout(Duration::from_secs(10), third).await;
    assert!(waited.is_ok_and(|r| r.is_ok()), "it goes once the first ends");
}

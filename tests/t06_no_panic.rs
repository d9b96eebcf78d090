//! No input from the network makes meshkv panic: arbitrary (even nonsensical) requests go
//! through the same checks and store code the server runs, and garbage on the client
//! port leaves the real server serving.

mod common;

use std::io::Write;

use bytes::Bytes;
use meshkv::api::validate;
use meshkv::pb::etcdserverpb::{
    compare, request_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use meshkv::pb::meshkvpb::{internal_request::Request, InternalRequest};
use meshkv::store::{Engine, MvccStore};
use proptest::prelude::*;
use prost::Message;

fn bytes_any() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        Just(Bytes::from_static(b"\0")),
        proptest::collection::vec(any::<u8>(), 0..4).prop_map(Bytes::from),
    ]
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        bytes_any(),
        bytes_any(),
        any::<i64>(),
        any::<i64>(),
        any::<i32>(),
        any::<i32>(),
        any::<bool>(),
        any::<bool>(),
        any::<[i64; 4]>(),
    )
        .prop_map(|(key, range_end, limit, revision, sort_order, sort_target, keys_only, count_only, mm)| {
            RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order,
                sort_target,
                serializable: true,
                keys_only,
                count_only,
                min_mod_revision: mm[0],
                max_mod_revision: mm[1],
                min_create_revision: mm[2],
                max_create_revision: mm[3],
            }
        })
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (bytes_any(), bytes_any(), prop_oneof![Just(0i64), any::<i64>()], any::<bool>(), any::<bool>(), any::<bool>())
        .prop_map(|(key, value, lease, prev_kv, ignore_value, ignore_lease)| PutRequest {
            key,
            value,
            lease,
            prev_kv,
            ignore_value,
            ignore_lease,
        })
}

fn del_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (bytes_any(), bytes_any(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn cmp() -> impl Strategy<Value = Compare> {
    (any::<i32>(), any::<i32>(), bytes_any(), bytes_any(), any::<i64>(), 0u8..6).prop_map(
        |(result, target, key, range_end, n, which)| {
            let target_union = match which {
                0 => None,
                1 => Some(compare::TargetUnion::Version(n)),
                2 => Some(compare::TargetUnion::CreateRevision(n)),
                3 => Some(compare::TargetUnion::ModRevision(n)),
                4 => Some(compare::TargetUnion::Value(Bytes::from(n.to_be_bytes().to_vec()))),
                _ => Some(compare::TargetUnion::Lease(n)),
            };
            Compare { result, target, key, target_union, range_end }
        },
    )
}

fn txn_req() -> impl Strategy<Value = TxnRequest> {
    let leaf = prop_oneof![
        Just(RequestOp { request: None }),
        range_req().prop_map(|r| RequestOp { request: Some(request_op::Request::RequestRange(r)) }),
        put_req().prop_map(|r| RequestOp { request: Some(request_op::Request::RequestPut(r)) }),
        del_req().prop_map(|r| RequestOp { request: Some(request_op::Request::RequestDeleteRange(r)) }),
    ];
    let ops = leaf.prop_recursive(3, 24, 4, |inner| {
        (
            proptest::collection::vec(cmp(), 0..3),
            proptest::collection::vec(inner.clone(), 0..4),
            proptest::collection::vec(inner, 0..4),
        )
            .prop_map(|(compare, success, failure)| RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest { compare, success, failure })),
            })
    });
    (
        proptest::collection::vec(cmp(), 0..3),
        proptest::collection::vec(ops.clone(), 0..5),
        proptest::collection::vec(ops, 0..5),
    )
        .prop_map(|(compare, success, failure)| TxnRequest { compare, success, failure })
}

#[derive(Debug, Clone)]
enum Input {
    Range(RangeRequest),
    Put(PutRequest),
    Del(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(i64),
    Raw(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        range_req().prop_map(Input::Range),
        put_req().prop_map(Input::Put),
        del_req().prop_map(Input::Del),
        txn_req().prop_map(Input::Txn),
        any::<i64>().prop_map(Input::Compact),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Input::Raw),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_requests_never_panic(inputs in proptest::collection::vec(input(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let store = MvccStore::open(Engine::open(dir.path()).unwrap()).unwrap();
        let mut index = 0;
        for i in inputs {
            // What the API would propose after its checks; requests it refuses stop there.
            let write = match i {
                Input::Range(r) => { if validate::range(&r).is_ok() { let _ = store.range(&r); } None }
                Input::Put(p) => validate::put(&p).ok().map(|()| Request::Put(p)),
                Input::Del(d) => validate::delete_range(&d).ok().map(|()| Request::DeleteRange(d)),
                Input::Txn(t) => validate::txn(&t, 128).ok().map(|()| Request::Txn(t)),
                Input::Compact(revision) => Some(Request::Compaction(CompactionRequest { revision, physical: false })),
                // Bytes off the wire that happen to decode as a Raft entry's payload.
                Input::Raw(b) => InternalRequest::decode(b.as_slice()).ok().and_then(|r| r.request),
            };
            if let Some(w) = write {
                index += 1;
                store.apply(&[(index, Some(InternalRequest { id: 0, request: Some(w), ..Default::default() }))]).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_client_port_leaves_the_server_serving() {
    let dir = common::tempdir();
    let server = common::start_meshkv(&dir.path().join("data"), &[]);
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0u8; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    ] {
        let mut s = std::net::TcpStream::connect(&server.client_addr).unwrap();
        let _ = s.write_all(garbage);
        drop(s);
    }
    let mut c = etcd_client::Client::connect([server.endpoint()], None).await.unwrap();
    c.put("still", "here", None).await.unwrap();
    assert_eq!(c.get("still", None).await.unwrap().kvs()[0].value(), b"here");
}

//! Property test: the MVCC store on real RocksDB against a plain in-memory model of
//! etcd's semantics (puts, range deletes, txns, compaction, reads at old revisions),
//! including reopening the store, which rebuilds its key index from disk.

use std::collections::BTreeMap;

use bytes::Bytes;
use meshkv::pb::etcdserverpb::{
    compare, request_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use meshkv::pb::meshkvpb::{internal_request::Request, InternalRequest};
use meshkv::store::mvcc::WriteResponse;
use meshkv::store::{Engine, MvccError, MvccStore};
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq)]
struct Kv {
    value: Vec<u8>,
    create: i64,
    modified: i64,
    version: i64,
}

/// The model: the whole key space at every revision.
struct Model {
    states: Vec<BTreeMap<Vec<u8>, Kv>>, // states[rev]
    compacted: i64,
}

impl Model {
    fn new() -> Self {
        Self { states: vec![BTreeMap::new(), BTreeMap::new()], compacted: meshkv::store::mvcc::NEVER_COMPACTED }
    }
    fn rev(&self) -> i64 {
        self.states.len() as i64 - 1
    }
    fn now(&self) -> &BTreeMap<Vec<u8>, Kv> {
        self.states.last().unwrap()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u8),
    Delete(u8, Option<u8>),
    /// If `key`'s version equals `version`: put each of `puts`; else delete `del`.
    Txn {
        key: u8,
        version: i64,
        puts: Vec<(u8, u8)>,
        del: u8,
    },
    Compact(i64),
    Range {
        key: u8,
        end: Option<u8>,
        rev: i64,
        limit: i64,
    },
    Reopen,
}

fn key(k: u8) -> Vec<u8> {
    vec![b'a' + k]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..6, proptest::option::of(0u8..7)).prop_map(|(k, e)| Op::Delete(k, e)),
        2 => (0u8..6, 0i64..3, proptest::collection::btree_map(0u8..6, any::<u8>(), 0..3), 0u8..6)
            .prop_map(|(key, version, puts, del)| Op::Txn { key, version, puts: puts.into_iter().collect(), del }),
        1 => (0i64..40).prop_map(Op::Compact),
        3 => (0u8..6, proptest::option::of(0u8..7), 0i64..40, 0i64..3)
            .prop_map(|(key, end, rev, limit)| Op::Range { key, end, rev, limit }),
        1 => Just(Op::Reopen),
    ]
}

fn in_range(k: &[u8], start: u8, end: Option<u8>) -> bool {
    match end {
        None => k == key(start).as_slice(),
        Some(e) => k >= key(start).as_slice() && k < key(e).as_slice(),
    }
}

fn range_end(end: Option<u8>) -> Bytes {
    end.map(|e| Bytes::from(key(e))).unwrap_or_default()
}

fn put_model(m: &mut BTreeMap<Vec<u8>, Kv>, k: Vec<u8>, v: u8, rev: i64) {
    let prev = m.get(&k).cloned();
    m.insert(
        k,
        Kv {
            value: vec![v],
            create: prev.as_ref().map_or(rev, |p| p.create),
            modified: rev,
            version: prev.map_or(1, |p| p.version + 1),
        },
    );
}

fn apply(store: &MvccStore, index: &mut u64, req: Request) -> Result<WriteResponse, MvccError> {
    *index += 1;
    let mut out =
        store.apply(&[(*index, Some(InternalRequest { id: 0, request: Some(req), ..Default::default() }))]).unwrap();
    out.pop().unwrap()
}

fn check_all(store: &MvccStore, model: &Model) {
    let r = store
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            ..Default::default()
        })
        .unwrap();
    let got: BTreeMap<Vec<u8>, Kv> = r
        .kvs
        .iter()
        .map(|kv| {
            (
                kv.key.to_vec(),
                Kv {
                    value: kv.value.to_vec(),
                    create: kv.create_revision,
                    modified: kv.mod_revision,
                    version: kv.version,
                },
            )
        })
        .collect();
    assert_eq!(&got, model.now());
    assert_eq!(store.revision(), model.rev());
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::open(Engine::open(dir.path()).unwrap()).unwrap();
    let mut model = Model::new();
    let mut index = 0u64;
    for op in ops {
        match op {
            Op::Put(k, v) => {
                let r = apply(
                    &store,
                    &mut index,
                    Request::Put(PutRequest { key: key(k).into(), value: vec![v].into(), ..Default::default() }),
                );
                let mut next = model.now().clone();
                put_model(&mut next, key(k), v, model.rev() + 1);
                model.states.push(next);
                match r.unwrap() {
                    WriteResponse::Put(p) => assert_eq!(p.header.unwrap().revision, model.rev()),
                    other => panic!("{other:?}"),
                }
            }
            Op::Delete(k, end) => {
                let r = apply(
                    &store,
                    &mut index,
                    Request::DeleteRange(DeleteRangeRequest {
                        key: key(k).into(),
                        range_end: range_end(end),
                        prev_kv: false,
                    }),
                );
                let mut next = model.now().clone();
                let before = next.len();
                next.retain(|kk, _| !in_range(kk, k, end));
                let deleted = (before - next.len()) as i64;
                if deleted > 0 {
                    model.states.push(next);
                }
                match r.unwrap() {
                    WriteResponse::DeleteRange(d) => {
                        assert_eq!(d.deleted, deleted);
                        assert_eq!(d.header.unwrap().revision, model.rev());
                    }
                    other => panic!("{other:?}"),
                }
            }
            Op::Txn { key: ck, version, puts, del } => {
                let cmp = Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Version as i32,
                    key: key(ck).into(),
                    target_union: Some(compare::TargetUnion::Version(version)),
                    range_end: Bytes::new(),
                };
                let success = puts
                    .iter()
                    .map(|(k, v)| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: key(*k).into(),
                            value: vec![*v].into(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let failure = vec![RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key: key(del).into(),
                        ..Default::default()
                    })),
                }];
                let r = apply(&store, &mut index, Request::Txn(TxnRequest { compare: vec![cmp], success, failure }));
                let holds = model.now().get(&key(ck)).map_or(0, |kv| kv.version) == version;
                let mut next = model.now().clone();
                let rev = model.rev() + 1;
                let changed = if holds {
                    for (k, v) in &puts {
                        put_model(&mut next, key(*k), *v, rev);
                    }
                    !puts.is_empty()
                } else {
                    next.remove(&key(del)).is_some()
                };
                if changed {
                    model.states.push(next);
                }
                match r.unwrap() {
                    WriteResponse::Txn(t) => {
                        assert_eq!(t.succeeded, holds);
                        assert_eq!(t.header.unwrap().revision, model.rev());
                    }
                    other => panic!("{other:?}"),
                }
            }
            Op::Compact(rev) => {
                let r =
                    apply(&store, &mut index, Request::Compaction(CompactionRequest { revision: rev, physical: true }));
                if rev <= model.compacted {
                    assert!(matches!(r, Err(MvccError::Compacted)), "{r:?}");
                } else if rev > model.rev() {
                    assert!(matches!(r, Err(MvccError::FutureRev)), "{r:?}");
                } else {
                    r.unwrap();
                    model.compacted = rev;
                }
            }
            Op::Range { key: k, end, rev, limit } => {
                let req = RangeRequest {
                    key: key(k).into(),
                    range_end: range_end(end),
                    revision: rev,
                    limit,
                    ..Default::default()
                };
                let r = store.range(&req);
                if rev > model.rev() {
                    assert!(matches!(r, Err(MvccError::FutureRev)), "{r:?}");
                } else if rev > 0 && rev < model.compacted {
                    assert!(matches!(r, Err(MvccError::Compacted)), "{r:?}");
                } else {
                    let r = r.unwrap();
                    let at = if rev > 0 { rev } else { model.rev() };
                    let want: Vec<(Vec<u8>, Kv)> = model.states[at as usize]
                        .iter()
                        .filter(|(kk, _)| in_range(kk, k, end))
                        .map(|(kk, v)| (kk.clone(), v.clone()))
                        .collect();
                    assert_eq!(r.count, want.len() as i64);
                    let shown = if limit > 0 { want.len().min(limit as usize) } else { want.len() };
                    assert_eq!(r.more, shown < want.len());
                    let got: Vec<(Vec<u8>, Kv)> = r
                        .kvs
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.to_vec(),
                                Kv {
                                    value: kv.value.to_vec(),
                                    create: kv.create_revision,
                                    modified: kv.mod_revision,
                                    version: kv.version,
                                },
                            )
                        })
                        .collect();
                    assert_eq!(got, want[..shown].to_vec(), "range {k} {end:?} at {at}");
                    assert_eq!(r.header.unwrap().revision, model.rev());
                }
            }
            Op::Reopen => {
                drop(store);
                store = MvccStore::open(Engine::open(dir.path()).unwrap()).unwrap();
                assert_eq!(store.applied_index(), index);
                assert_eq!(store.compact_revision(), model.compacted);
            }
        }
        check_all(&store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn mvcc_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}

#[test]
fn replayed_entries_are_not_applied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(Engine::open(dir.path()).unwrap()).unwrap();
    let put = |v: &'static str| {
        Some(InternalRequest {
            id: 0,
            request: Some(Request::Put(PutRequest {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(v.as_bytes()),
                ..Default::default()
            })),
            ..Default::default()
        })
    };
    store.apply(&[(1, put("a")), (2, put("b"))]).unwrap();
    assert_eq!(store.revision(), 3);
    // After a restart Raft may hand back entries the store already holds.
    store.apply(&[(2, put("b")), (3, put("c"))]).unwrap();
    assert_eq!(store.revision(), 4);
    let r = store.range(&RangeRequest { key: Bytes::from_static(b"k"), ..Default::default() }).unwrap();
    assert_eq!((r.kvs[0].version, r.kvs[0].value.as_ref()), (3, &b"c"[..]));
}

/// A lease checkpoint records the time left with the lease, takes no revision, survives
/// a restart, is cleared by a checkpoint of 0, and skips a lease that is gone.
#[test]
fn lease_checkpoints_are_kept_with_the_lease_and_take_no_revision() {
    use meshkv::pb::etcdserverpb::{LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest};
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(Engine::open(dir.path()).unwrap()).unwrap();
    let mut index = 0;
    let checkpoint = |id, remaining_ttl| {
        Request::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints: vec![LeaseCheckpoint { id, remaining_ttl }] })
    };
    apply(&store, &mut index, Request::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 600 })).unwrap();
    let rev = store.revision();
    apply(&store, &mut index, checkpoint(7, 420)).unwrap();
    apply(&store, &mut index, checkpoint(8, 100)).unwrap();
    assert_eq!(store.revision(), rev);
    assert_eq!(store.leases().get(7).map(|l| (l.ttl, l.remaining)), Some((600, 420)));
    drop(store);
    let store = MvccStore::open(Engine::open(dir.path()).unwrap()).unwrap();
    assert_eq!(store.leases().all(), vec![(7, 600, 420)], "kept across a restart, and no lease 8");
    apply(&store, &mut index, checkpoint(7, 0)).unwrap();
    assert_eq!(store.leases().get(7).map(|l| l.remaining), Some(0));
}

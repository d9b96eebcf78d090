//! Alarms, as etcd raises them: a member that finds its database over the space quota
//! raises NOSPACE, and from then on every member refuses writes that take space until an
//! operator disarms it; CORRUPT refuses every write. An alarm is set and cleared by a
//! Raft entry, so every member changes its mind at the same index, and it is kept in the
//! `alarm` column family, so it outlives restarts and travels in snapshots.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::pb::etcdserverpb::{
    request_op, AlarmMember, AlarmType, LeaseGrantRequest, PutRequest, RequestOp, TxnRequest,
};
use crate::pb::meshkvpb::internal_request::Request;

/// The alarms raised, by member and type.
#[derive(Debug, Default)]
pub struct AlarmSet {
    raised: BTreeSet<(u64, i32)>,
}

impl AlarmSet {
    /// The set as the `alarm` column family keeps it.
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, String> {
        let mut raised = BTreeSet::new();
        for k in keys {
            raised.insert(decode_key(k).ok_or_else(|| format!("bad alarm key {k:?}"))?);
        }
        Ok(Self { raised })
    }

    /// Raises `alarm` for `member`; false if it was already raised.
    pub fn activate(&mut self, member: u64, alarm: AlarmType) -> bool {
        self.raised.insert((member, alarm as i32))
    }

    /// Clears `alarm` for `member`; false if it was not raised.
    pub fn deactivate(&mut self, member: u64, alarm: AlarmType) -> bool {
        self.raised.remove(&(member, alarm as i32))
    }

    /// The alarms of one type, or all of them for [`AlarmType::None`], by member.
    pub fn list(&self, alarm: AlarmType) -> Vec<AlarmMember> {
        self.raised
            .iter()
            .filter(|&&(_, t)| alarm == AlarmType::None || t == alarm as i32)
            .map(|&(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }

    pub fn has(&self, alarm: AlarmType) -> bool {
        self.raised.iter().any(|&(_, t)| t == alarm as i32)
    }

    /// The refusals the set implies, for [`Refusals`].
    fn refusals(&self) -> u8 {
        let mut r = 0;
        if self.has(AlarmType::Nospace) {
            r |= NOSPACE;
        }
        if self.has(AlarmType::Corrupt) {
            r |= CORRUPT;
        }
        r
    }
}

/// An alarm's key in the `alarm` column family.
pub fn key(member: u64, alarm: AlarmType) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&member.to_be_bytes());
    k[8..].copy_from_slice(&(alarm as i32).to_be_bytes());
    k
}

fn decode_key(k: &[u8]) -> Option<(u64, i32)> {
    let member = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let alarm = i32::from_be_bytes(k.get(8..)?.try_into().ok()?);
    AlarmType::try_from(alarm).ok()?;
    Some((member, alarm))
}

const NOSPACE: u8 = 1;
const CORRUPT: u8 = 2;

/// Why an alarm refuses a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoSpace,
    Corrupt,
}

/// What the raised alarms refuse, readable without a lock on every write.
#[derive(Debug, Default)]
pub struct Refusals(AtomicU8);

impl Refusals {
    pub fn set(&self, alarms: &AlarmSet) {
        self.0.store(alarms.refusals(), Ordering::Release);
    }

    /// Whether `req` may be applied: with CORRUPT raised no write is, with NOSPACE none
    /// that takes space (a put, a Txn that could put, a lease grant). Alarms themselves
    /// always are, or nothing could disarm them, and so are auth changes, or no user
    /// could sign in to disarm them, and lease checkpoints, which keep-alives need (etcd
    /// does not refuse them either), and the cluster version, which takes no space.
    pub fn check(&self, req: &Request) -> Result<(), Refusal> {
        let r = self.0.load(Ordering::Acquire);
        let always = matches!(
            req,
            Request::Alarm(_) | Request::Auth(_) | Request::LeaseCheckpoint(_) | Request::ClusterVersion(_)
        );
        if r == 0 || always {
            return Ok(());
        }
        if r & CORRUPT != 0 {
            return Err(Refusal::Corrupt);
        }
        if r & NOSPACE != 0 && cost(req) > 0 {
            return Err(Refusal::NoSpace);
        }
        Ok(())
    }
}

const KV_OVERHEAD: u64 = 256;
const LEASE_OVERHEAD: u64 = 64;

/// The space a write may take, as etcd's quota estimates it: what NOSPACE refuses and the
/// space quota charges. Nested Txns' puts count with their branch (etcd counts only the
/// top level's; a nested put takes space just the same).
pub fn cost(req: &Request) -> u64 {
    match req {
        Request::Put(p) => cost_put(p),
        Request::Txn(t) => cost_txn(t),
        Request::LeaseGrant(g) => cost_lease_grant(g),
        _ => 0,
    }
}

pub fn cost_put(p: &PutRequest) -> u64 {
    KV_OVERHEAD + p.key.len() as u64 + p.value.len() as u64
}

/// The puts of the costlier branch; nested Txns' puts count with their branch.
pub fn cost_txn(t: &TxnRequest) -> u64 {
    let branch = |ops: &[RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => cost_put(p),
                Some(request_op::Request::RequestTxn(inner)) => cost_txn(inner),
                _ => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

pub fn cost_lease_grant(_: &LeaseGrantRequest) -> u64 {
    LEASE_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::RangeRequest;

    fn put(key: &str, value_len: usize) -> PutRequest {
        PutRequest { key: key.to_string().into(), value: vec![0; value_len].into(), ..Default::default() }
    }

    fn op(r: request_op::Request) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn writes_cost_what_etcd_charges() {
        assert_eq!(cost_put(&put("abc", 100)), 359);
        let txn = TxnRequest {
            success: vec![
                op(request_op::Request::RequestPut(put("a", 10))),
                op(request_op::Request::RequestRange(RangeRequest::default())),
            ],
            failure: vec![op(request_op::Request::RequestTxn(TxnRequest {
                success: vec![op(request_op::Request::RequestPut(put("b", 20)))],
                failure: vec![op(request_op::Request::RequestPut(put("c", 50)))],
                ..Default::default()
            }))],
            ..Default::default()
        };
        assert_eq!(cost_txn(&txn), 256 + 1 + 50, "the failure branch's nested put is the costlier");
        assert_eq!(cost_txn(&TxnRequest::default()), 0);
        assert_eq!(cost_lease_grant(&LeaseGrantRequest::default()), 64);
    }

    #[test]
    fn alarms_round_trip_through_their_keys_and_list_by_type() {
        let mut set = AlarmSet::default();
        assert!(set.activate(7, AlarmType::Nospace));
        assert!(!set.activate(7, AlarmType::Nospace), "raised twice");
        assert!(set.activate(3, AlarmType::Corrupt));
        let keys = [key(7, AlarmType::Nospace), key(3, AlarmType::Corrupt)];
        let back = AlarmSet::from_keys(keys.iter().map(|k| k.as_slice())).unwrap();
        assert_eq!(back.list(AlarmType::None), set.list(AlarmType::None));
        assert_eq!(back.list(AlarmType::Nospace), vec![AlarmMember { member_id: 7, alarm: AlarmType::Nospace as i32 }]);
        assert!(AlarmSet::from_keys([b"short".as_slice()]).is_err());
        assert!(set.deactivate(7, AlarmType::Nospace));
        assert!(!set.deactivate(7, AlarmType::Nospace));
        assert!(!set.has(AlarmType::Nospace));
    }

    #[test]
    fn nospace_refuses_only_writes_that_take_space_and_corrupt_refuses_all() {
        let refusals = Refusals::default();
        let put = Request::Put(PutRequest { key: "k".into(), ..Default::default() });
        let read_txn = Request::Txn(TxnRequest {
            success: vec![op(request_op::Request::RequestRange(RangeRequest::default()))],
            ..Default::default()
        });
        let nested_put = Request::Txn(TxnRequest {
            failure: vec![op(request_op::Request::RequestTxn(TxnRequest {
                success: vec![op(request_op::Request::RequestPut(PutRequest::default()))],
                ..Default::default()
            }))],
            ..Default::default()
        });
        let delete = Request::DeleteRange(Default::default());
        let disarm = Request::Alarm(Default::default());
        assert_eq!(refusals.check(&put), Ok(()));

        let mut set = AlarmSet::default();
        set.activate(1, AlarmType::Nospace);
        refusals.set(&set);
        assert_eq!(refusals.check(&put), Err(Refusal::NoSpace));
        assert_eq!(refusals.check(&nested_put), Err(Refusal::NoSpace));
        assert_eq!(refusals.check(&read_txn), Ok(()));
        assert_eq!(refusals.check(&delete), Ok(()));

        set.activate(2, AlarmType::Corrupt);
        refusals.set(&set);
        assert_eq!(refusals.check(&delete), Err(Refusal::Corrupt));
        assert_eq!(refusals.check(&disarm), Ok(()));
    }
}

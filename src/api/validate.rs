//! Request checks done before a proposal, with etcd's rules (its v3rpc `check*`).

use bytes::Bytes;

use super::error::RequestError;
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest};

pub fn range(r: &RangeRequest) -> Result<(), RequestError> {
    if r.key.is_empty() {
        return Err(RequestError::EmptyKey);
    }
    Ok(())
}

pub fn put(r: &PutRequest) -> Result<(), RequestError> {
    if r.key.is_empty() {
        return Err(RequestError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(RequestError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(RequestError::LeaseProvided);
    }
    Ok(())
}

pub fn delete_range(r: &DeleteRangeRequest) -> Result<(), RequestError> {
    if r.key.is_empty() {
        return Err(RequestError::EmptyKey);
    }
    Ok(())
}

/// Checks a Txn: op counts (at every level, against what the parent left), keys, and
/// that no branch writes one key twice.
pub fn txn(r: &TxnRequest, max_ops: usize) -> Result<(), RequestError> {
    txn_ops(r, max_ops)?;
    writes(&r.success)?;
    writes(&r.failure)?;
    Ok(())
}

fn txn_ops(r: &TxnRequest, max_ops: usize) -> Result<(), RequestError> {
    let n = r.compare.len().max(r.success.len()).max(r.failure.len());
    if n > max_ops {
        return Err(RequestError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(RequestError::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        request_op(op, max_ops - n)?;
    }
    Ok(())
}

fn request_op(op: &RequestOp, max_ops: usize) -> Result<(), RequestError> {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => range(r),
        Some(request_op::Request::RequestPut(r)) => put(r),
        Some(request_op::Request::RequestDeleteRange(r)) => delete_range(r),
        Some(request_op::Request::RequestTxn(r)) => txn_ops(r, max_ops),
        None => Err(RequestError::EmptyOp),
    }
}

/// A deleted interval `[start, end)`; `end` None is the single key.
struct Deleted {
    start: Bytes,
    end: Option<Bytes>,
}

impl Deleted {
    /// As etcd's check sees it: the range end is compared as the bytes it is, so a
    /// delete "from the key on" (an end of "\0") covers no put, and the Txn deletes, then
    /// puts, in its order, as etcd's does.
    fn covers(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.start.as_ref(),
            Some(e) => k >= self.start.as_ref() && k < e.as_ref(),
        }
    }
}

/// The puts and deletes of one list of ops, nested Txns included; an error if a key is
/// put twice or put and deleted (etcd's `checkIntervals`). The two branches of a nested
/// Txn may put the same key, since only one of them runs.
fn writes(ops: &[RequestOp]) -> Result<(Vec<Bytes>, Vec<Deleted>), RequestError> {
    let mut dels: Vec<Deleted> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                Some(Deleted { start: d.key.clone(), end: (!d.range_end.is_empty()).then(|| d.range_end.clone()) })
            }
            _ => None,
        })
        .collect();
    let mut puts: Vec<Bytes> = Vec::new();
    let clash = |puts: &[Bytes], dels: &[Deleted], k: &Bytes| puts.contains(k) || dels.iter().any(|d| d.covers(k));
    for op in ops {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, dels_then) = writes(&t.success)?;
        let (puts_else, dels_else) = writes(&t.failure)?;
        for k in &puts_then {
            if clash(&puts, &dels, k) {
                return Err(RequestError::DuplicateKey);
            }
            puts.push(k.clone());
        }
        for k in &puts_else {
            let from_then = puts_then.contains(k);
            if (puts.contains(k) && !from_then) || dels.iter().any(|d| d.covers(k)) {
                return Err(RequestError::DuplicateKey);
            }
            if !from_then {
                puts.push(k.clone());
            }
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(request_op::Request::RequestPut(p)) = &op.request else { continue };
        if clash(&puts, &dels, &p.key) {
            return Err(RequestError::DuplicateKey);
        }
        puts.push(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_op(k: &'static str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: Bytes::from_static(k.as_bytes()),
                ..Default::default()
            })),
        }
    }
    fn del_op(k: &'static str, end: &'static str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::from_static(k.as_bytes()),
                range_end: Bytes::from_static(end.as_bytes()),
                ..Default::default()
            })),
        }
    }
    fn txn_op(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp { request: Some(request_op::Request::RequestTxn(TxnRequest { compare: vec![], success, failure })) }
    }
    fn check(success: Vec<RequestOp>) -> Result<(), RequestError> {
        txn(&TxnRequest { compare: vec![], success, failure: vec![] }, 128)
    }

    #[test]
    fn duplicate_writes_are_refused_as_etcd_does() {
        assert_eq!(check(vec![put_op("a"), put_op("a")]), Err(RequestError::DuplicateKey));
        assert_eq!(check(vec![put_op("b"), del_op("a", "c")]), Err(RequestError::DuplicateKey));
        assert_eq!(check(vec![put_op("c"), del_op("a", "c")]), Ok(()));
        assert_eq!(check(vec![del_op("a", ""), del_op("a", "")]), Ok(()));
        assert_eq!(check(vec![txn_op(vec![put_op("a")], vec![put_op("a")])]), Ok(()));
        assert_eq!(check(vec![put_op("a"), txn_op(vec![put_op("a")], vec![])]), Err(RequestError::DuplicateKey));
        assert_eq!(check(vec![del_op("a", "c"), txn_op(vec![], vec![put_op("b")])]), Err(RequestError::DuplicateKey));
        // etcd compares a range end of "\0" as a byte string, below every key: a delete
        // from a key on clashes with no put.
        assert_eq!(check(vec![del_op("a", "\0"), txn_op(vec![], vec![put_op("z")])]), Ok(()));
        assert_eq!(check(vec![put_op("b"), del_op("a", "\0")]), Ok(()));
    }

    #[test]
    fn op_limits_and_empty_keys() {
        let many: Vec<RequestOp> = (0..129).map(|_| del_op("a", "")).collect();
        assert_eq!(check(many), Err(RequestError::TooManyOps));
        assert_eq!(check(vec![RequestOp { request: None }]), Err(RequestError::EmptyOp));
        assert_eq!(check(vec![del_op("", "")]), Err(RequestError::EmptyKey));
    }
}

//! The corruption check, as etcd's `--experimental-initial-corrupt-check` and
//! `--experimental-corrupt-check-time`: members compare hashes of their key-value stores,
//! which agree at any revision when nothing went wrong.
//!
//! - At start, before serving clients, a member asks every other member for the hash of
//!   its store at this member's revision. A hash that differs where both have compacted
//!   to the same revision means this member's data is not the cluster's: it refuses to
//!   start ("found data inconsistency with peers").
//! - Every period, the leader hashes its store, asks the others for theirs at that
//!   revision, confirms it still leads (a linearizable read) and hashes again. A member
//!   whose hash differs at the same compact revision, or which claims a revision or a
//!   compact revision beyond the leader's, is corrupt: the leader raises the CORRUPT
//!   alarm for it, which stops the cluster from serving reads and writes until an
//!   operator restores the member and disarms the alarm. So does a leader whose own two
//!   hashes of the same revision differ.
//!
//! Members that do not answer, are behind (a future revision to them) or have compacted
//! past the revision asked are skipped, as etcd skips them.

use std::time::Duration;

use crate::pb::etcdserverpb::{alarm_request, AlarmRequest, AlarmType};
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::pb::meshkvpb::PeerHash;
use crate::raft::transport::MeshTransport;

use super::Ctx;

/// How long a member's answer is waited for, as etcd's request timeout.
const ASK_TIMEOUT: Duration = Duration::from_secs(7);

/// One hash of a member's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hash {
    pub hash: u32,
    pub revision: i64,
    pub compact_revision: i64,
}

/// The members whose answers show their store differs from this member's `local`.
pub fn initial_mismatches(local: Hash, peers: &[(u64, PeerHash)]) -> Vec<u64> {
    peers
        .iter()
        .filter(|(_, p)| p.error.is_empty())
        .filter(|(_, p)| p.hash != local.hash && p.compact_revision == local.compact_revision)
        .map(|(id, _)| *id)
        .collect()
}

/// The first member found corrupt by the leader `me`, which hashed `first` before asking
/// the others and `second` after confirming it leads.
pub fn periodic_mismatch(me: u64, first: Hash, second: Hash, peers: &[(u64, PeerHash)]) -> Option<u64> {
    if second.hash != first.hash
        && second.revision == first.revision
        && second.compact_revision == first.compact_revision
    {
        return Some(me);
    }
    peers.iter().filter(|(_, p)| p.error.is_empty()).find_map(|(id, p)| {
        let ahead = p.current_revision > second.revision || p.compact_revision > second.compact_revision;
        let differs = p.compact_revision == first.compact_revision && p.hash != first.hash;
        (ahead || differs).then_some(*id)
    })
}

async fn hash_now(ctx: &Ctx) -> Result<Hash, String> {
    let store = ctx.store.clone();
    let (hash, revision, compact_revision) = tokio::task::spawn_blocking(move || store.hash_kv(0))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Hash { hash, revision, compact_revision })
}

/// The other members of the cluster, by id and name.
fn others(ctx: &Ctx) -> Vec<(u64, String)> {
    let m = ctx.raft.status().membership();
    m.names.into_iter().filter(|(id, _)| *id != ctx.id.member_id).collect()
}

/// etcd's initial check: an error when this member's data differs from a peer's.
pub async fn initial_check(ctx: &Ctx, transport: &MeshTransport) -> Result<(), String> {
    let me = format!("{:x}", ctx.id.member_id);
    tracing::info!(member = %me, "starting initial corruption check");
    let local = hash_now(ctx).await.map_err(|e| format!("{me} failed to fetch hash ({e})"))?;
    let members = others(ctx);
    let peers = transport.peer_hashes(&members, local.revision, ASK_TIMEOUT).await;
    for (id, name) in &members {
        match peers.iter().find(|(p, _)| p == id).map(|(_, h)| h) {
            None => tracing::warn!(peer = %name, "no hash from the peer in time; not checked"),
            Some(h) if !h.error.is_empty() => {
                tracing::warn!(peer = %name, error = %h.error, revision = local.revision, "cannot compare hashes")
            }
            Some(h) if h.hash != local.hash && h.compact_revision != local.compact_revision => tracing::warn!(
                peer = %name, local_compact_revision = local.compact_revision,
                peer_compact_revision = h.compact_revision, "found different compact revision values from the peer"
            ),
            Some(_) => {}
        }
    }
    let bad = initial_mismatches(local, &peers);
    for id in &bad {
        let name = members.iter().find(|(m, _)| m == id).map_or("", |(_, n)| n.as_str());
        let h = peers.iter().find(|(p, _)| p == id).map(|(_, h)| h.hash).unwrap_or_default();
        tracing::error!(
            peer = %name, revision = local.revision, compact_revision = local.compact_revision,
            local_hash = local.hash, peer_hash = h, "found different hash values from the peer"
        );
    }
    if !bad.is_empty() {
        return Err(format!("{me} found data inconsistency with peers"));
    }
    let checked = peers.iter().filter(|(_, p)| p.error.is_empty()).count();
    tracing::info!(member = %me, peers_checked = checked, "initial corruption checking passed; no corruption");
    Ok(())
}

/// etcd's periodic check, every `every`, run by the leader.
pub fn start(ctx: Ctx, transport: std::sync::Arc<MeshTransport>, every: Duration) {
    tokio::spawn(async move {
        tracing::info!(?every, "periodic corruption check on");
        loop {
            tokio::select! {
                _ = ctx.stopped() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if ctx.raft.status().leader() != ctx.id.member_id {
                continue;
            }
            if let Err(e) = check(&ctx, &transport).await {
                tracing::warn!(error = %e, "corruption check not done");
            }
        }
    });
}

async fn check(ctx: &Ctx, transport: &MeshTransport) -> Result<(), String> {
    let first = hash_now(ctx).await?;
    let members = others(ctx);
    let peers = transport.peer_hashes(&members, first.revision, ASK_TIMEOUT).await;
    ctx.raft.read_index().await.map_err(|e| e.to_string())?;
    let second = hash_now(ctx).await?;
    let Some(bad) = periodic_mismatch(ctx.id.member_id, first, second, &peers) else {
        let checked = peers.iter().filter(|(_, p)| p.error.is_empty()).count();
        tracing::info!(peers_checked = checked, "finished peer corruption check");
        return Ok(());
    };
    let name = ctx.raft.status().membership().names.get(&bad).cloned().unwrap_or_default();
    tracing::error!(
        member = format!("{bad:x}"), %name, revision = first.revision, compact_revision = first.compact_revision,
        hash = first.hash, peers = ?peers, "found a member whose data differs; raising the CORRUPT alarm"
    );
    let alarm = AlarmRequest {
        action: alarm_request::AlarmAction::Activate as i32,
        member_id: bad,
        alarm: AlarmType::Corrupt as i32,
    };
    ctx.raft.propose(Write::Alarm(alarm)).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hash: u32, revision: i64, compact_revision: i64) -> Hash {
        Hash { hash, revision, compact_revision }
    }

    fn peer(hash: u32, current: i64, compacted: i64, error: &str) -> PeerHash {
        PeerHash {
            id: 1,
            revision: current,
            current_revision: current,
            compact_revision: compacted,
            hash,
            error: error.into(),
        }
    }

    #[test]
    fn at_start_only_a_different_hash_at_the_same_compact_revision_is_a_mismatch() {
        let local = h(7, 100, 10);
        let peers = vec![
            (2, peer(7, 120, 10, "")),
            (3, peer(8, 120, 10, "")),
            (4, peer(8, 120, 50, "")),
            (5, peer(0, 0, 0, "mvcc: required revision has been compacted")),
        ];
        assert_eq!(initial_mismatches(local, &peers), vec![3]);
    }

    #[test]
    fn the_leader_finds_a_differing_member_and_ignores_those_it_cannot_compare() {
        let (first, second) = (h(7, 100, 10), h(9, 105, 10));
        assert_eq!(periodic_mismatch(1, first, second, &[(2, peer(7, 100, 10, ""))]), None);
        assert_eq!(periodic_mismatch(1, first, second, &[(2, peer(6, 100, 10, ""))]), Some(2));
        // Compacted further than the one asked: its hash covers other revisions.
        assert_eq!(periodic_mismatch(1, first, h(9, 105, 20), &[(2, peer(6, 100, 20, ""))]), None);
        assert_eq!(
            periodic_mismatch(1, first, second, &[(2, peer(0, 0, 0, "mvcc: required revision is a future revision"))]),
            None
        );
    }

    #[test]
    fn a_member_ahead_of_the_leader_is_corrupt_and_so_is_a_leader_whose_hash_moves() {
        let (first, second) = (h(7, 100, 10), h(7, 100, 10));
        assert_eq!(periodic_mismatch(1, first, second, &[(2, peer(7, 101, 10, ""))]), Some(2));
        assert_eq!(periodic_mismatch(1, first, second, &[(2, peer(7, 100, 11, ""))]), Some(2));
        assert_eq!(periodic_mismatch(1, first, h(8, 100, 10), &[(2, peer(7, 100, 10, ""))]), Some(1));
    }
}

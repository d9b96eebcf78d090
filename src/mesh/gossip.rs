//! Gossip channels carry user data that implements [`GossipData`]: a state that can be
//! encoded whole and merged, where merging reports the delta (what was news). The mesh
//! broadcasts a local delta at once, sends the full state to a few random neighbours
//! now and then (anti-entropy), and sends it whole to every new neighbour.

use std::any::Any;
use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

/// Data from a peer that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable gossip: {0}")]
pub struct GossipError(pub String);

/// State replicated by a gossip channel. Merging must be commutative, associative and
/// idempotent (a CRDT), since the same data may arrive many times, in any order.
pub trait GossipData: Any + Send {
    /// The whole state.
    fn encode(&self) -> Bytes;
    /// Merges a state or delta from a peer; returns the encoded part of it that was news
    /// here, or None when nothing changed.
    fn merge(&mut self, data: &[u8]) -> Result<Option<Bytes>, GossipError>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// An increment-only counter (G-Counter): one count per peer, the total is the sum, and
/// a merge keeps each peer's highest count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GCounter {
    counts: BTreeMap<String, u64>,
}

impl GCounter {
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Adds `n` to `me`'s count; returns the delta to broadcast.
    pub fn increment(&mut self, me: &str, n: u64) -> Bytes {
        let c = self.counts.entry(me.to_string()).or_default();
        *c += n;
        encode_counts([(me, *c)])
    }

    fn decode(mut data: &[u8]) -> Result<Vec<(String, u64)>, GossipError> {
        let mut out = Vec::new();
        let err = |what: &str| GossipError(format!("g-counter: {what}"));
        while !data.is_empty() {
            if data.len() < 2 {
                return Err(err("truncated name length"));
            }
            let n = u16::from_be_bytes([data[0], data[1]]) as usize;
            data = &data[2..];
            if data.len() < n + 8 {
                return Err(err("truncated entry"));
            }
            let name = std::str::from_utf8(&data[..n]).map_err(|_| err("name is not UTF-8"))?.to_string();
            let mut count = [0u8; 8];
            count.copy_from_slice(&data[n..n + 8]);
            out.push((name, u64::from_be_bytes(count)));
            data = &data[n + 8..];
        }
        Ok(out)
    }
}

fn encode_counts<'a>(entries: impl IntoIterator<Item = (&'a str, u64)>) -> Bytes {
    let mut b = BytesMut::new();
    for (name, count) in entries {
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        b.put_u16(name.len() as u16);
        b.put_slice(name);
        b.put_u64(count);
    }
    b.freeze()
}

impl GossipData for GCounter {
    fn encode(&self) -> Bytes {
        encode_counts(self.counts.iter().map(|(k, v)| (k.as_str(), *v)))
    }

    fn merge(&mut self, data: &[u8]) -> Result<Option<Bytes>, GossipError> {
        let mut news = Vec::new();
        for (name, count) in Self::decode(data)? {
            let cur = self.counts.entry(name.clone()).or_default();
            if count > *cur {
                *cur = count;
                news.push((name, count));
            }
        }
        Ok((!news.is_empty()).then(|| encode_counts(news.iter().map(|(k, v)| (k.as_str(), *v)))))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g_counter_merges_to_the_highest_count_per_peer() {
        let mut a = GCounter::default();
        let mut b = GCounter::default();
        let da = a.increment("a", 3);
        b.increment("b", 2);
        assert_eq!(b.merge(&da).unwrap(), Some(da.clone()));
        assert_eq!(b.merge(&da).unwrap(), None, "merging twice is no news");
        assert_eq!(a.merge(&b.encode()).unwrap().map(|d| GCounter::decode(&d).unwrap()), Some(vec![("b".into(), 2)]));
        assert_eq!((a.total(), b.total()), (5, 5));
        assert!(a.merge(&[0, 5, b'x']).is_err());
    }
}

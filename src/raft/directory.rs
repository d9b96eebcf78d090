//! The member directory: a gossip channel in which each member publishes its client URLs,
//! so that MemberList can tell clients where every member serves, and its incarnation
//! (see `node::Started::incarnation`), so that the leader can tell a member that lost
//! its data, and the newest mesh protocol it speaks, so that the leader can raise the
//! cluster version once every member speaks it. Each member writes only its own entry,
//! with a version that grows; a merge keeps the highest version per name.

use std::any::Any;
use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;

use crate::mesh::gossip::{GossipData, GossipError};

/// The channel's name in the mesh.
pub const CHANNEL: &str = "directory";

#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint64, tag = "2")]
    version: u64,
    #[prost(string, repeated, tag = "3")]
    client_urls: Vec<String>,
    #[prost(uint64, tag = "4")]
    incarnation: u64,
    /// 0 from builds before entries carried it, which all spoke protocol 3.
    #[prost(uint32, tag = "5")]
    protocol: u32,
}

/// The protocol of the builds whose entries name none.
const UNNAMED_PROTOCOL: u32 = 3;

#[derive(Clone, PartialEq, prost::Message)]
struct Entries {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<Entry>,
}

/// Member name → its newest entry.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    entries: BTreeMap<String, Entry>,
}

fn encode<'a>(it: impl Iterator<Item = &'a Entry>) -> Bytes {
    Entries { entries: it.cloned().collect() }.encode_to_vec().into()
}

impl Directory {
    /// Sets our own entry; returns the delta to broadcast.
    pub fn publish(&mut self, name: &str, client_urls: Vec<String>, incarnation: u64, protocol: u32) -> Bytes {
        let version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
            .max(self.entries.get(name).map_or(0, |e| e.version + 1));
        let e = Entry { name: name.to_string(), version, client_urls, incarnation, protocol };
        self.entries.insert(name.to_string(), e.clone());
        encode(std::iter::once(&e))
    }

    pub fn client_urls(&self, name: &str) -> Vec<String> {
        self.entries.get(name).map(|e| e.client_urls.clone()).unwrap_or_default()
    }

    /// The incarnation `name` announced, None if it has announced nothing.
    pub fn incarnation(&self, name: &str) -> Option<u64> {
        self.entries.get(name).map(|e| e.incarnation)
    }

    /// The newest mesh protocol `name` announced it speaks, None if it has announced
    /// nothing.
    pub fn protocol(&self, name: &str) -> Option<u32> {
        self.entries.get(name).map(|e| if e.protocol == 0 { UNNAMED_PROTOCOL } else { e.protocol })
    }
}

impl GossipData for Directory {
    fn encode(&self) -> Bytes {
        encode(self.entries.values())
    }

    fn merge(&mut self, data: &[u8]) -> Result<Option<Bytes>, GossipError> {
        let incoming = Entries::decode(data).map_err(|e| GossipError(e.to_string()))?;
        let mut news = BTreeMap::new();
        for e in incoming.entries {
            if self.entries.get(&e.name).is_none_or(|cur| e.version > cur.version) {
                self.entries.insert(e.name.clone(), e.clone());
                news.insert(e.name.clone(), e);
            }
        }
        Ok((!news.is_empty()).then(|| encode(news.values())))
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
    fn the_newest_entry_of_a_member_wins_with_its_incarnation() {
        let mut here = Directory::default();
        let mut there = Directory::default();
        assert_eq!(there.incarnation("a"), None, "nothing announced yet");
        let first = here.publish("a", vec!["http://a:2379".into()], 0, 3);
        let second = here.publish("a", vec!["http://a:2379".into()], 42, 4);
        assert!(there.merge(&second).unwrap().is_some());
        assert_eq!(there.merge(&first).unwrap(), None, "an older entry changes nothing");
        assert_eq!(there.incarnation("a"), Some(42));
        assert_eq!(there.protocol("a"), Some(4), "and the protocol it speaks now");
        assert_eq!(there.client_urls("a"), vec!["http://a:2379".to_string()]);
        let mut third = Directory::default();
        third.merge(&there.encode()).unwrap();
        assert_eq!(third.incarnation("a"), Some(42), "the whole directory carries it");
        assert!(there.merge(b"\xff\xff").is_err(), "garbage is an error, not a panic");
    }

    #[test]
    fn an_entry_from_before_protocols_were_announced_speaks_protocol_3() {
        let old = Entries { entries: vec![Entry { name: "old".into(), version: 1, ..Default::default() }] };
        let mut d = Directory::default();
        d.merge(&old.encode_to_vec()).unwrap();
        assert_eq!(d.protocol("old"), Some(3));
        assert_eq!(d.protocol("unknown"), None);
    }
}

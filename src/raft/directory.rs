//! The member directory: a gossip channel in which each member publishes its client URLs,
//! so that MemberList can tell clients where every member serves. Each member writes only
//! its own entry, with a version that grows; a merge keeps the highest version per name.

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
}

#[derive(Clone, PartialEq, prost::Message)]
struct Entries {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<Entry>,
}

/// Member name → (version, client URLs).
#[derive(Clone, Debug, Default)]
pub struct Directory {
    entries: BTreeMap<String, (u64, Vec<String>)>,
}

fn encode<'a>(it: impl Iterator<Item = (&'a String, &'a (u64, Vec<String>))>) -> Bytes {
    Entries { entries: it.map(|(n, (v, u))| Entry { name: n.clone(), version: *v, client_urls: u.clone() }).collect() }
        .encode_to_vec()
        .into()
}

impl Directory {
    /// Sets our own entry; returns the delta to broadcast.
    pub fn publish(&mut self, name: &str, client_urls: Vec<String>) -> Bytes {
        let version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
            .max(self.entries.get(name).map_or(0, |e| e.0 + 1));
        self.entries.insert(name.to_string(), (version, client_urls));
        encode(self.entries.iter().filter(|(n, _)| n.as_str() == name))
    }

    pub fn client_urls(&self, name: &str) -> Vec<String> {
        self.entries.get(name).map(|e| e.1.clone()).unwrap_or_default()
    }
}

impl GossipData for Directory {
    fn encode(&self) -> Bytes {
        encode(self.entries.iter())
    }

    fn merge(&mut self, data: &[u8]) -> Result<Option<Bytes>, GossipError> {
        let incoming = Entries::decode(data).map_err(|e| GossipError(e.to_string()))?;
        let mut news = BTreeMap::new();
        for e in incoming.entries {
            if self.entries.get(&e.name).is_none_or(|cur| e.version > cur.0) {
                self.entries.insert(e.name.clone(), (e.version, e.client_urls.clone()));
                news.insert(e.name, (e.version, e.client_urls));
            }
        }
        Ok((!news.is_empty()).then(|| encode(news.iter())))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

//! Peer identity: a stable name, a UID drawn at every start (so a restart is a new
//! incarnation), a nickname for people, and the versioned list of the peer's connections.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A peer's stable name. Cheap to clone: topology holds many copies.
pub type PeerName = Arc<str>;

/// What a peer says about itself: merged everywhere by highest version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: PeerName,
    /// Drawn at every start: a different UID under the same name is a restart.
    pub uid: u64,
    pub nickname: String,
    /// Raised by the peer itself whenever anything here changes.
    pub version: u64,
    /// Where the peer accepts mesh connections (host:port), empty if it does not.
    pub addr: String,
    /// Peers this one has an established connection to.
    pub conns: BTreeMap<PeerName, ()>,
}

impl PeerInfo {
    pub fn new(name: impl Into<PeerName>, uid: u64) -> Self {
        Self {
            name: name.into(),
            uid,
            nickname: String::new(),
            version: 1,
            addr: String::new(),
            conns: BTreeMap::new(),
        }
    }

    /// Approximate size on the wire, for accounting.
    pub fn wire_size(&self) -> usize {
        self.name.len()
            + self.nickname.len()
            + self.addr.len()
            + 24
            + self.conns.keys().map(|k| k.len() + 2).sum::<usize>()
    }
}

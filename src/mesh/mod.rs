//! The gossip mesh: a peer-to-peer substrate with a datagram socket on top.
//!
//! A library in its own right, in the manner of weaveworks/mesh: it knows nothing of
//! etcd or Raft. Peers connect over authenticated, encrypted TCP, gossip a versioned
//! topology (a CRDT), route unicast datagrams over shortest paths (relaying where there
//! is no direct link) and broadcasts over a spanning tree per source, and carry named
//! gossip channels of user data.
//!
//! The core is pure: [`node::Node`] is a state machine that takes events (a connection
//! came up or went down, a message arrived, a tick) and returns the messages to send.
//! It has no sockets and no clock, so the simulator in [`sim`] can run a thousand peers
//! in one process under virtual time. The tokio edge that owns sockets drives the same
//! `Node`.

pub mod gossip;
pub mod node;
pub mod peer;
pub mod routes;
pub mod runtime;
pub mod secure;
pub mod sim;
pub mod topology;
pub mod wire;

pub use gossip::{GCounter, GossipData};
pub use node::{Msg, Node, NodeConfig};
pub use peer::{PeerInfo, PeerName};
pub use runtime::{Mesh, MeshConfig, MeshConn, MeshStatus, Priority, SendError};
pub use topology::Topology;

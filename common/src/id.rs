//! Identities of overlay participants.
//!
//! Architecture invariant: a peer's identity is its [`NodeId`] (carried in every datagram
//! header, authenticated by a later protocol version), never the UDP source address alone.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// Identity of a bootstrapper, server, node or client.
///
/// Servers and nodes get a *stable* id from the bootstrapper (derived from their topology
/// address, so it survives restarts and topology reloads); clients pick a random one at start.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The id the bootstrapper assigns to the host at `ip`: FNV-1a (64 bit) over a domain tag
    /// and the address bytes. Stable across restarts, reloads and machines.
    pub fn for_ip(ip: IpAddr) -> NodeId {
        let tag = b"pessi-node-id/v1".iter().copied();
        NodeId(match ip {
            IpAddr::V4(v4) => crate::rng::fnv1a64(tag.chain(v4.octets())),
            IpAddr::V6(v6) => crate::rng::fnv1a64(tag.chain(v6.octets())),
        })
    }

    /// A random id, for clients (which are not in the topology).
    pub fn random() -> NodeId {
        NodeId(crate::rng::Rng::from_entropy().next_u64())
    }
}

/// The identity a relay keys its per-peer state by (routes, liveness, subscriptions, NACK rate
/// limits): the sender id of the datagram header, bound to an authenticated key by a later
/// protocol version. The UDP address is only where to send (see `PeerTable`s of the relay and
/// the client).
pub type PeerId = NodeId;

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:016x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ids_are_stable_and_distinct() {
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(NodeId::for_ip(a), NodeId::for_ip(a));
        assert_ne!(NodeId::for_ip(a), NodeId::for_ip(b));
        // Pinned: changing the derivation would change every deployed node's id.
        assert_eq!(NodeId::for_ip(a).to_string().len(), 16);
    }
}

//! Who is at which address: the one map from a peer's identity ([`PeerId`], the sender id of
//! every datagram header) to the UDP address its datagrams come from and ours go to. Every
//! per-peer table of the relay is keyed by `PeerId`; this is where a datagram's sender is
//! checked against what is known of its address before anything else looks at it.
//!
//! Rules ([`PeerTable::check`]):
//! * A *pinned* peer (an overlay host whose address the topology gives: a neighbour, or a
//!   relay named on a flood path) is only accepted from its address, and its address only
//!   speaks for it: a datagram from a pinned address with another sender id, or with a pinned
//!   id from another address, is a [`Check::Mismatch`] (dropped and counted by the caller).
//! * An unpinned peer (a client, or a non-neighbour subscriber) is learned when the caller keeps
//!   state about it ([`PeerTable::learn`]). A new id at its address means it restarted (clients
//!   pick a random id at start): [`Check::Replaced`] names the old id, whose state the caller
//!   drops. A known id from a new address has moved ([`Check::Moved`]); the table follows it.
//!
//! Without authentication (a later protocol version binds ids to keys) this stops stray and
//! misconfigured senders and keeps a peer's state apart from its address, not a determined
//! spoofer.

use crate::id::PeerId;
use crate::map::Map;
use std::net::SocketAddr;

/// What [`PeerTable::check`] says of a datagram's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The id is known at this address.
    Known,
    /// Neither the id nor the address is known: accepted (the caller [`learn`](PeerTable::learn)s
    /// it if it keeps state).
    New,
    /// The address belonged to another unpinned id (the peer restarted with a new id): the
    /// table now maps the address to the new id; the caller drops the old one's state.
    Replaced(PeerId),
    /// A known unpinned id from a new address: the table follows it.
    Moved(SocketAddr),
    /// The id or the address is pinned to something else: drop the datagram.
    Mismatch,
}

/// Counters of a [`PeerTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Datagrams whose sender id does not match what is pinned for its address (or whose
    /// pinned id came from another address).
    pub mismatched: u64,
    /// Unpinned peers replaced at their address by a new id.
    pub replaced: u64,
    /// Unpinned peers that moved to another address.
    pub moved: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr: SocketAddr,
    pinned: bool,
}

/// Peer id ↔ address (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    by_id: Map<PeerId, Entry>,
    by_addr: Map<SocketAddr, PeerId>,
    stats: PeerStats,
}

impl PeerTable {
    /// An empty table.
    pub fn new() -> PeerTable {
        PeerTable::default()
    }

    /// Pins `id` to `addr` (an overlay host of the topology). Replaces whatever was known of
    /// either.
    pub fn pin(&mut self, id: PeerId, addr: SocketAddr) {
        self.insert(id, addr, true);
    }

    /// Learns an unpinned peer (one the caller keeps state about). No effect on a pinned id or
    /// a pinned address.
    pub fn learn(&mut self, id: PeerId, addr: SocketAddr) {
        if self.by_id.get(&id).is_some_and(|e| e.pinned) || self.pinned_addr(addr) {
            return;
        }
        self.insert(id, addr, false);
    }

    /// Unpins `id` (no longer a neighbour); it stays known until [`forget`](Self::forget).
    pub fn unpin(&mut self, id: PeerId) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.pinned = false;
        }
    }

    /// Forgets an unpinned peer (the caller keeps no state about it any more).
    pub fn forget(&mut self, id: PeerId) {
        if let Some(e) = self.by_id.get(&id).copied() {
            if !e.pinned {
                self.by_id.remove(&id);
                if self.by_addr.get(&e.addr) == Some(&id) {
                    self.by_addr.remove(&e.addr);
                }
            }
        }
    }

    /// Checks the sender id of a datagram from `from` (see the module docs); updates the table
    /// for [`Check::Replaced`] and [`Check::Moved`].
    pub fn check(&mut self, from: SocketAddr, sender: PeerId) -> Check {
        let at_addr = self.by_addr.get(&from).copied();
        let of_id = self.by_id.get(&sender).copied();
        match (at_addr, of_id) {
            (Some(id), _) if id == sender => Check::Known,
            (Some(id), _) => {
                let pinned = self.by_id.get(&id).is_some_and(|e| e.pinned);
                if pinned || of_id.is_some_and(|e| e.pinned) {
                    self.stats.mismatched += 1;
                    return Check::Mismatch;
                }
                self.by_id.remove(&id);
                self.stats.replaced += 1;
                self.insert(sender, from, false);
                Check::Replaced(id)
            }
            (None, Some(e)) if e.pinned => {
                self.stats.mismatched += 1;
                Check::Mismatch
            }
            (None, Some(e)) => {
                self.stats.moved += 1;
                self.insert(sender, from, false);
                Check::Moved(e.addr)
            }
            (None, None) => Check::New,
        }
    }

    /// [`check`](Self::check) for a sender whose id the session layer has authenticated (its
    /// key): the address is only where it is now, so a known id, pinned or not, that comes
    /// from a new address has moved (the table follows it and keeps its pin), and a new id at
    /// the address of an unpinned one replaced it (a restarted viewer). Never a mismatch.
    pub fn check_authenticated(&mut self, from: SocketAddr, sender: PeerId) -> Check {
        let at_addr = self.by_addr.get(&from).copied();
        let of_id = self.by_id.get(&sender).copied();
        match (at_addr, of_id) {
            (Some(id), _) if id == sender => Check::Known,
            (_, Some(e)) => {
                self.stats.moved += 1;
                self.insert(sender, from, e.pinned);
                Check::Moved(e.addr)
            }
            (Some(id), None) => {
                if self.by_id.get(&id).is_some_and(|e| e.pinned) {
                    // Another member's address: it keeps it until it is heard from elsewhere.
                    return Check::New;
                }
                self.by_id.remove(&id);
                self.stats.replaced += 1;
                self.insert(sender, from, false);
                Check::Replaced(id)
            }
            (None, None) => Check::New,
        }
    }

    /// Where `id` is (`None`: unknown).
    pub fn addr(&self, id: PeerId) -> Option<SocketAddr> {
        self.by_id.get(&id).map(|e| e.addr)
    }

    /// Who is at `addr` (`None`: nobody known).
    pub fn id(&self, addr: SocketAddr) -> Option<PeerId> {
        self.by_addr.get(&addr).copied()
    }

    /// Whether `id` is pinned.
    pub fn is_pinned(&self, id: PeerId) -> bool {
        self.by_id.get(&id).is_some_and(|e| e.pinned)
    }

    /// Peers known.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The counters.
    pub fn stats(&self) -> PeerStats {
        self.stats
    }

    fn pinned_addr(&self, addr: SocketAddr) -> bool {
        self.by_addr
            .get(&addr)
            .is_some_and(|id| self.by_id.get(id).is_some_and(|e| e.pinned))
    }

    fn insert(&mut self, id: PeerId, addr: SocketAddr, pinned: bool) {
        if let Some(old) = self.by_id.get(&id).copied() {
            if old.addr != addr && self.by_addr.get(&old.addr) == Some(&id) {
                self.by_addr.remove(&old.addr);
            }
        }
        if let Some(other) = self.by_addr.get(&addr).copied() {
            if other != id {
                self.by_id.remove(&other);
            }
        }
        self.by_id.insert(id, Entry { addr, pinned });
        self.by_addr.insert(addr, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;

    fn a(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 8010))
    }

    #[test]
    fn a_pinned_host_is_only_itself_and_only_at_its_address() {
        let mut t = PeerTable::new();
        t.pin(NodeId(2), a(2));
        assert_eq!(t.check(a(2), NodeId(2)), Check::Known);
        assert_eq!(
            t.check(a(2), NodeId(9)),
            Check::Mismatch,
            "another id at its address"
        );
        assert_eq!(
            t.check(a(7), NodeId(2)),
            Check::Mismatch,
            "its id from elsewhere"
        );
        assert_eq!(t.stats().mismatched, 2);
        assert_eq!(t.addr(NodeId(2)), Some(a(2)));
        assert_eq!(t.check(a(7), NodeId(7)), Check::New);
        t.learn(NodeId(9), a(2));
        assert_eq!(
            t.id(a(2)),
            Some(NodeId(2)),
            "learning cannot take a pinned address"
        );
    }

    #[test]
    fn a_client_that_restarts_or_moves_is_followed() {
        let mut t = PeerTable::new();
        t.learn(NodeId(50), a(50));
        assert_eq!(t.check(a(50), NodeId(50)), Check::Known);
        // Restarted on the same port with a new random id.
        assert_eq!(t.check(a(50), NodeId(51)), Check::Replaced(NodeId(50)));
        assert_eq!(t.addr(NodeId(50)), None);
        assert_eq!(t.id(a(50)), Some(NodeId(51)));
        // Moved to another port.
        assert_eq!(t.check(a(60), NodeId(51)), Check::Moved(a(50)));
        assert_eq!(t.addr(NodeId(51)), Some(a(60)));
        assert_eq!(t.id(a(50)), None);
        t.forget(NodeId(51));
        assert!(t.is_empty());
        let s = t.stats();
        assert_eq!((s.replaced, s.moved, s.mismatched), (1, 1, 0));
    }

    #[test]
    fn unpinning_lets_a_former_neighbour_be_forgotten() {
        let mut t = PeerTable::new();
        t.pin(NodeId(3), a(3));
        t.forget(NodeId(3));
        assert_eq!(
            t.addr(NodeId(3)),
            Some(a(3)),
            "pinned peers are not forgotten"
        );
        t.unpin(NodeId(3));
        t.forget(NodeId(3));
        assert_eq!(t.addr(NodeId(3)), None);
        assert_eq!(t.id(a(3)), None);
    }

    #[test]
    fn authenticated_peers_move_with_their_pin_and_replace_unpinned_ones() {
        let a = |n: u8| SocketAddr::from(([127, 0, 0, n], 8010));
        let mut t = PeerTable::new();
        t.pin(NodeId(1), a(1));
        // A member (authenticated) from a new address: followed, still pinned.
        assert_eq!(t.check_authenticated(a(9), NodeId(1)), Check::Moved(a(1)));
        assert_eq!(t.addr(NodeId(1)), Some(a(9)));
        t.learn(NodeId(1), a(10));
        assert_eq!(t.addr(NodeId(1)), Some(a(9)), "still pinned");
        // A viewer, then another id at its address (it restarted).
        assert_eq!(t.check_authenticated(a(20), NodeId(7)), Check::New);
        t.learn(NodeId(7), a(20));
        assert_eq!(
            t.check_authenticated(a(20), NodeId(8)),
            Check::Replaced(NodeId(7))
        );
        assert_eq!(t.id(a(20)), Some(NodeId(8)));
        // Never a mismatch, even at a pinned address.
        assert_eq!(t.check_authenticated(a(9), NodeId(5)), Check::New);
        assert_eq!(t.id(a(9)), Some(NodeId(1)));
    }
}

//! [`ClientHost`]: the whole client protocol without I/O — the [`ClientCore`] (PoP choice,
//! subscriptions, jitter buffers) on top of a [`Link`] (decoding, the reliable channel), with a
//! [`PeerTable`] that binds each PoP's address to the id in its datagrams' header. A driver (the
//! tokio [`engine`](crate::engine), or a simulation) feeds it received datagrams and due timers
//! and sends what [`ClientHost::poll_transmit`] hands out; it reads no clock and owns no socket.
//!
//! A datagram whose sender id contradicts what is known for its address is dropped before it is
//! decoded further and counted ([`HostStats::peer_mismatch`]); a PoP that restarts (new id on
//! the same address) replaces its former self.
//!
//! The core names a PoP by the address the user gave (`--servers`); everything below it is
//! keyed by the PoP's id: the host binds each configured PoP to the id its first datagram
//! carries, and translates both ways, so a PoP heard from a new address (same id) is still the
//! same PoP to the core, with its reliable state, and is answered at its new address.

use crate::core::{Action, ClientCore, CoreConfig};
use crate::stats::StatEvent;
use bytes::Bytes;
use common::keys::PublicKey;
use common::link::{Incoming, Link, LinkStats};
use common::peers::{Check, PeerTable};
use common::reliable::ReliableConfig;
use common::secure::SecureEvent;
use common::wire::ChannelId;
use common::{NodeId, PeerId};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{debug, info, warn};

/// A video datagram that reached a stream (for the driver's arrival statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The stream's channel.
    pub channel: ChannelId,
    /// The PoP it came from.
    pub pop: SocketAddr,
    /// It starts a keyframe.
    pub keyframe: bool,
}

/// Counters of a [`ClientHost`] beyond its link's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Datagrams dropped because their sender id did not match their address.
    pub peer_mismatch: u64,
}

/// The client's protocol and datagram layer (see the module docs).
#[derive(Debug)]
pub struct ClientHost {
    core: ClientCore,
    link: Link,
    peers: PeerTable,
    /// The configured PoP (the core's name for it) of each PoP id, and back.
    named: HashMap<PeerId, SocketAddr>,
    ids: HashMap<SocketAddr, PeerId>,
    events: VecDeque<StatEvent>,
    stats: HostStats,
    /// PoP keys learned on first use, for the owner to remember.
    learned: VecDeque<(SocketAddr, PublicKey)>,
    /// PoPs whose pinned key was learned on an earlier run, and where it is kept.
    remembered: HashMap<SocketAddr, String>,
}

impl ClientHost {
    /// A client of `pops`, identified by `id` (random per start) whose reliable messages carry
    /// `session`.
    pub fn new(
        cfg: CoreConfig,
        pops: &[SocketAddr],
        id: NodeId,
        session: u64,
        reliable: ReliableConfig,
        now: Instant,
    ) -> ClientHost {
        ClientHost {
            core: ClientCore::new(cfg, pops, now),
            link: Link::new(id, session, reliable),
            peers: PeerTable::new(),
            named: HashMap::new(),
            ids: HashMap::new(),
            events: VecDeque::new(),
            stats: HostStats::default(),
            learned: VecDeque::new(),
            remembered: HashMap::new(),
        }
    }

    /// This host with a session layer: every datagram to a PoP is sealed, after a handshake
    /// with the PoP (its key pinned in `secure` with `add_pop`, or learned); what does not
    /// authenticate is dropped.
    pub fn with_secure(mut self, mut secure: common::secure::Secure) -> ClientHost {
        for pop in self.core.pop_addrs() {
            if secure.pop_key(pop).is_none() {
                secure.add_pop(pop, None);
            }
        }
        self.link.set_secure(secure);
        self
    }

    /// Says that the key pinned for `pop` was learned on an earlier run and is kept in
    /// `file` (what a refusal then tells the user to edit).
    pub fn remembered_key(&mut self, pop: SocketAddr, file: String) {
        self.remembered.insert(pop, file);
    }

    /// A PoP key learned on first use, to remember for the next runs.
    pub fn poll_learned_key(&mut self) -> Option<(SocketAddr, PublicKey)> {
        self.learned.pop_front()
    }

    /// The protocol state (views, problems, play/stop).
    pub fn core(&self) -> &ClientCore {
        &self.core
    }

    /// Calls `f` on the core at `now`, then queues what it decided (play, stop, stop_all).
    pub fn with_core<R>(&mut self, now: Instant, f: impl FnOnce(&mut ClientCore) -> R) -> R {
        let r = f(&mut self.core);
        self.drain_actions(now);
        r
    }

    /// Starts playing `name`; false if it already plays.
    pub fn play(&mut self, now: Instant, name: &str) -> bool {
        self.with_core(now, |c| c.play(now, name))
    }

    /// Stops `name`; false if it was not playing.
    pub fn stop(&mut self, now: Instant, name: &str, reason: &str) -> bool {
        self.with_core(now, |c| c.stop(now, name, reason))
    }

    /// Feeds one received datagram; returns the video arrival it was, if it reached a stream.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: impl Into<bytes::BytesMut>,
    ) -> Option<Arrival> {
        let Some(plain) = self.link.open(now, from, bytes) else {
            self.drain_incoming(now);
            self.drain_actions(now);
            return None;
        };
        if let Ok(h) = common::wire::decode_header(&plain) {
            let check = if self.link.is_secure() {
                self.peers.check_authenticated(from, h.sender)
            } else {
                self.peers.check(from, h.sender)
            };
            match check {
                Check::Known => {}
                Check::New => {
                    self.peers.learn(h.sender, from);
                    if self.core.is_pop(from) && !self.ids.contains_key(&from) {
                        self.named.insert(h.sender, from);
                        self.ids.insert(from, h.sender);
                    }
                }
                Check::Moved(old) => {
                    // Same PoP (its id), new address: its state follows it.
                    debug!(pop = %h.sender, %old, new = %from, "PoP moved");
                    self.peers.learn(h.sender, from);
                }
                Check::Replaced(old) => {
                    debug!(pop = %from, %old, new = %h.sender, "PoP restarted (new id)");
                    self.link.forget_peer(old);
                    self.peers.forget(old);
                    self.peers.learn(h.sender, from);
                    if let Some(name) = self.named.remove(&old) {
                        self.named.insert(h.sender, name);
                        self.ids.insert(name, h.sender);
                    }
                }
                Check::Mismatch => {
                    self.stats.peer_mismatch += 1;
                    if self.stats.peer_mismatch.is_power_of_two() {
                        warn!(%from, sender = %h.sender, count = self.stats.peer_mismatch,
                            "datagram whose sender id does not match its address dropped");
                    }
                    return None;
                }
            }
        }
        self.link.handle_plain(now, from, plain);
        let arrival = self.drain_incoming(now);
        self.drain_actions(now);
        arrival
    }

    /// Hands what the link decoded to the core; returns the video arrival, if any.
    fn drain_incoming(&mut self, now: Instant) -> Option<Arrival> {
        let mut arrival = None;
        while let Some(item) = self.link.poll_incoming() {
            match item {
                Incoming::Message {
                    from, sender, msg, ..
                } => {
                    let from = self.name(sender, from);
                    self.core.handle_message(now, from, msg)
                }
                Incoming::Video {
                    from,
                    sender,
                    frame,
                } => {
                    let from = self.name(sender, from);
                    // The payload stays in the buffer it was received in.
                    let packet = frame.into_packet();
                    let keyframe = crate::core::is_keyframe(packet.flags, &packet.payload);
                    if let Some(channel) = self.core.handle_video(now, from, packet) {
                        arrival = Some(Arrival {
                            channel,
                            pop: from,
                            keyframe,
                        });
                    }
                }
                Incoming::TimedOut { peer, .. } => self.timed_out(now, peer),
                Incoming::Secure(ev) => self.secure_event(now, ev),
            }
        }
        arrival
    }

    /// What the session layer says about a PoP.
    fn secure_event(&mut self, now: Instant, ev: SecureEvent) {
        match ev {
            SecureEvent::AccessDenied { pop } => {
                warn!(%pop, "access denied by the PoP: it requires a viewer key (--viewer-key) \
                    and ours is missing or wrong");
                self.core.refused(
                    now,
                    pop,
                    "access denied: the PoP requires a viewer key (--viewer-key) and ours is \
                     missing or wrong"
                        .to_owned(),
                );
            }
            SecureEvent::PopKeyMismatch { pop, pinned, got } => {
                warn!(%pop, %pinned, %got, "the PoP's key is not the one pinned; refused");
                let why = match self.remembered.get(&pop) {
                    Some(file) => format!(
                        "the PoP proved key {got}, but it proved {pinned} when this client \
                         first used it (kept in {file}); refused, in case another host \
                         impersonates it. If its key really changed, delete its line from \
                         {file}"
                    ),
                    None => format!(
                        "the PoP proved key {got}, but {pinned} is pinned for it (--servers \
                         ip#key); refused. If its key really changed, update the pin"
                    ),
                };
                self.core.refused(now, pop, why);
            }
            SecureEvent::PopKey { pop, key } => {
                info!(%pop, %key, "PoP key learned (pin it with --servers {}#{key})", pop.ip());
                self.learned.push_back((pop, key));
            }
            SecureEvent::Up { .. } => {}
        }
    }

    /// The core's name of the PoP `sender` (its configured address), or `from` for a sender
    /// that is not a configured PoP.
    fn name(&self, sender: PeerId, from: SocketAddr) -> SocketAddr {
        self.named.get(&sender).copied().unwrap_or(from)
    }

    /// A reliable message to `peer` was never acknowledged.
    fn timed_out(&mut self, now: Instant, peer: PeerId) {
        debug!(%peer, "reliable message not acknowledged");
        if let Some(&name) = self.named.get(&peer) {
            self.core.handle_timed_out(now, name);
        }
    }

    /// Runs what is due at `now` (the core's timers, the reliable channel's retransmissions).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.link.handle_timeout(now);
        while let Some(item) = self.link.poll_incoming() {
            match item {
                Incoming::TimedOut { peer, .. } => self.timed_out(now, peer),
                Incoming::Secure(ev) => self.secure_event(now, ev),
                _ => {}
            }
        }
        if now >= self.core.poll_timeout() {
            self.core.handle_timeout(now);
        }
        self.drain_actions(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Instant {
        let t = self.core.poll_timeout();
        self.link.poll_timeout().map_or(t, |l| l.min(t))
    }

    /// The next datagram to send, in the order decided.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.link.poll_transmit()
    }

    /// The next event for the log, stats file and GUI.
    pub fn poll_event(&mut self) -> Option<StatEvent> {
        self.events.pop_front()
    }

    /// The next payload for a stream's sinks.
    pub fn poll_output(&mut self) -> Option<(ChannelId, Bytes)> {
        self.core.poll_output()
    }

    /// This host's counters.
    pub fn stats(&self) -> HostStats {
        self.stats
    }

    /// The datagram layer's counters.
    pub fn link_stats(&self) -> LinkStats {
        self.link.stats()
    }

    /// Moves the core's sends into the link and its events into the queue.
    fn drain_actions(&mut self, now: Instant) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::SendUnreliable { to, msg } => {
                    // Before its first datagram the PoP's id is unknown: the session layer
                    // finds it by its configured address.
                    let id = self.ids.get(&to).copied();
                    let at = id.and_then(|id| self.peers.addr(id)).unwrap_or(to);
                    let id = id.unwrap_or(NodeId(0));
                    if let Err(e) = self.link.send_unreliable(now, id, at, msg) {
                        debug!(%to, error = %e, "cannot encode");
                    }
                }
                Action::SendReliable { to, msg } => {
                    // Reliable state is the PoP's (by id); before its first datagram told us
                    // its id, a reliable message goes once (the core repeats what matters).
                    let sent = match self.ids.get(&to).copied() {
                        Some(id) => {
                            let at = self.peers.addr(id).unwrap_or(to);
                            self.link.send_reliable(now, id, at, msg).map(drop)
                        }
                        None => {
                            debug!(pop = %to, "PoP not heard from yet; sent unreliably");
                            self.link.send_unreliable(now, NodeId(0), to, msg)
                        }
                    };
                    if let Err(e) = sent {
                        debug!(%to, error = %e, "cannot encode");
                    }
                }
                Action::Event(ev) => self.events.push_back(ev),
            }
        }
    }
}

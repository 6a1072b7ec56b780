//! Reliable, exactly-once delivery of control [`Message`]s over UDP: an I/O-free state machine.
//!
//! [`ReliableEndpoint`] is fed `(now, event)` — received datagrams
//! ([`ReliableEndpoint::handle_datagram`]) and expired timers
//! ([`ReliableEndpoint::handle_timeout`]) — and asked what to do next:
//! [`ReliableEndpoint::poll_transmit`] (encoded datagrams to send),
//! [`ReliableEndpoint::poll_timeout`] (when to call `handle_timeout` next) and
//! [`ReliableEndpoint::poll_event`] (what the application must hear about). It never reads a
//! clock or touches a socket, so it is tested with a fake clock and a seeded lossy link
//! (`tests/reliable_sim.rs`); [`crate::transport`] drives it with tokio.
//!
//! # Protocol
//!
//! * Every message travels in a [`Body::Reliable`] carrying the sender's *session* (random per
//!   process start) and a message id that increases per `(session, destination)` from 0.
//! * The receiver answers with [`Body::Ack`] (session + up to [`limits::ACK_IDS`] ids). Acks
//!   for a peer are batched: all ids received while handling datagrams leave in as few Ack
//!   datagrams as possible at the next `poll_transmit` — without added delay, so the RTT is not
//!   inflated.
//! * Unacknowledged messages are retransmitted when their deadline passes. The first timeout is
//!   the peer's RTO (RFC 6298, sampled only from messages never retransmitted — Karn's
//!   algorithm); each retransmission of a message doubles that message's timeout, capped at
//!   [`ReliableConfig::max_rto`]. After [`ReliableConfig::max_retries`] retransmissions without
//!   an ack, the message is dropped and [`Event::TimedOut`] is raised: the application decides
//!   (typically declares the peer dead and calls [`ReliableEndpoint::forget_peer`]).
//! * At most [`ReliableConfig::max_in_flight`] messages per peer are unacknowledged, and no
//!   message more than [`ReliableConfig::dup_window`] ids above the oldest unacknowledged one is
//!   transmitted (so the receiver's duplicate window never has to forget a message the sender is
//!   still retrying); further sends wait in a queue and go out as acks (or timeouts) free slots.
//! * Every per-peer state (send ids, in-flight messages, receive window, RTT) is keyed by the
//!   peer's id ([`PeerId`]: the sender id of the datagram header, checked against its address
//!   by the caller's `PeerTable`), never by its address: the address is only where to send, and
//!   a peer that moves keeps its state (retransmissions and acks follow it to the address it was
//!   last heard from or sent to).
//! * The receiver keeps, per `(peer, sender session)`, a duplicate window: every id below
//!   a contiguous *base* has been delivered, plus a bounded set of delivered ids above it. A
//!   retransmitted duplicate is re-acked (its first ack may have been lost) but not delivered
//!   again. A new session from the same peer (it restarted) replaces the receive state;
//!   the old session is *retired*: its late datagrams are dropped without ack or delivery, so
//!   they cannot switch the state back and make the new session's ids deliverable twice.
//! * Acks carry the session of the messages they acknowledge; an ack for another session than
//!   ours (a previous run of this process, or garbage) is ignored.
//!
//! # Delivery order
//!
//! Messages are delivered exactly once, **in arrival order, not in send order**: a message
//! whose first transmission was lost is delivered after later ones that got through. Protocols
//! on top must not rely on ordering between reliable messages (they carry their own sequence
//! numbers where order matters, e.g. flood rounds).
//!
//! # Bounds
//!
//! Per peer: `max_in_flight` unacked messages, `dup_window` remembered ids above the base, a few
//! retired sessions. When more than `dup_window` ids above the base are remembered (the sender
//! gave up on the message at the base, or uses a larger window than ours, or we forgot the peer
//! while it kept sending), the base
//! is advanced past the oldest remembered id; ids skipped that way become *ambiguous*
//! (delivered long ago, or never seen): if they show up later they are dropped **without** ack,
//! so an ack always means "delivered" — the sender then times out rather than believe a lost
//! message was delivered.

use crate::id::{NodeId, PeerId};
use crate::map::Map;
use crate::rtt::RttEstimator;
use crate::wire::{limits, Body, Datagram, Message, WireError};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{debug, trace};

/// Clock granularity `G` of RFC 6298: the RTO is at least `SRTT + G`. Our clock (`Instant`) is
/// far finer; 1 ms keeps a tiny RTTVAR on loopback from producing a zero margin.
pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(1);

/// How many past sessions of one peer are remembered (and their datagrams ignored).
const RETIRED_SESSIONS: usize = 4;

/// Tuning of a [`ReliableEndpoint`]. [`Default`] suits the overlay (LAN / loopback links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReliableConfig {
    /// Retransmission timeout before any RTT sample of the peer exists. Default 200 ms: far above
    /// any LAN/loopback RTT (so no spurious retransmission on a fresh link), far below RFC 6298's
    /// 1 s, which is meant for the open Internet.
    pub initial_rto: Duration,
    /// Lower bound of the computed RTO. Default 50 ms: loopback RTTs are tens of µs, so the RTO
    /// would otherwise be ~1 ms and any scheduling hiccup of a busy host (or a GC-like pause of
    /// the receiving process) would cause spurious retransmissions.
    pub min_rto: Duration,
    /// Upper bound of the RTO and of the per-message exponential backoff. Default 2 s.
    pub max_rto: Duration,
    /// Retransmissions of one message before giving up with [`Event::TimedOut`]. Default 8: with
    /// the defaults and a measured RTT a dead peer is reported after ≈ 9 s
    /// (50+100+…+1600 ms, then 3 × 2 s); with the 200 ms initial RTO after ≈ 13 s.
    pub max_retries: u32,
    /// Unacknowledged messages per peer; further sends are queued. Default 256.
    pub max_in_flight: usize,
    /// Delivered ids remembered above the contiguous base per `(peer, session)`. Default 4096.
    pub dup_window: usize,
}

impl Default for ReliableConfig {
    fn default() -> Self {
        ReliableConfig {
            initial_rto: Duration::from_millis(200),
            min_rto: Duration::from_millis(50),
            max_rto: Duration::from_secs(2),
            max_retries: 8,
            max_in_flight: 256,
            dup_window: 4096,
        }
    }
}

impl ReliableConfig {
    /// The same configuration with nonsensical values repaired (no zero limits, `min_rto ≤
    /// max_rto`), so that no configuration can make the endpoint misbehave.
    fn sanitized(mut self) -> Self {
        self.max_in_flight = self.max_in_flight.max(1);
        self.dup_window = self.dup_window.max(1);
        self.min_rto = self.min_rto.max(Duration::from_micros(1));
        self.max_rto = self.max_rto.max(self.min_rto);
        self.initial_rto = self.initial_rto.clamp(self.min_rto, self.max_rto);
        self
    }
}

/// The RTT estimate of one peer (RFC 6298), exposed as a link cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimate {
    /// Smoothed RTT.
    pub srtt: Duration,
    /// RTT variation.
    pub rttvar: Duration,
    /// Current retransmission timeout for new messages: `SRTT + max(G, 4·RTTVAR)`, clamped to
    /// `[min_rto, max_rto]`.
    pub rto: Duration,
    /// Smallest RTT sample seen.
    pub min_rtt: Duration,
    /// Number of samples taken.
    pub samples: u64,
}

/// Something the application must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A reliable message, delivered exactly once, in arrival order (not necessarily the order
    /// the peer sent in: a retransmitted message arrives after later ones).
    Message {
        /// Address it came from.
        from: SocketAddr,
        /// The sender's id, from the datagram header (the key of its state).
        sender: PeerId,
        /// Its message id (per sender session and destination).
        id: u64,
        /// The message.
        msg: Message,
    },
    /// Message `id` to `peer` was retransmitted `max_retries` times without an ack and dropped.
    /// It may or may not have been delivered (the acks may be what got lost). The application
    /// decides, e.g. declares the peer dead.
    TimedOut {
        /// The peer.
        peer: PeerId,
        /// The message id that [`ReliableEndpoint::send`] returned.
        id: u64,
    },
    /// `peer` acknowledged message `id`: it has been delivered to the peer's application.
    Acked {
        /// The peer.
        peer: PeerId,
        /// The message id that [`ReliableEndpoint::send`] returned.
        id: u64,
    },
}

/// Counters of a [`ReliableEndpoint`] since it was created (plus two gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReliableStats {
    /// Reliable messages transmitted for the first time.
    pub sent: u64,
    /// Retransmissions (datagrams, not messages).
    pub retransmitted: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages given up on ([`Event::TimedOut`]).
    pub timed_out: u64,
    /// Messages delivered to the application ([`Event::Message`]).
    pub delivered: u64,
    /// Received duplicates of delivered messages (re-acked, not delivered).
    pub duplicates_dropped: u64,
    /// Received messages dropped without ack: from a retired session of their peer, or below a
    /// force-advanced duplicate window (see the module docs), or with the reserved id `u64::MAX`.
    pub stale_dropped: u64,
    /// Ack datagrams sent.
    pub acks_sent: u64,
    /// Acks ignored: for another session than ours.
    pub acks_ignored: u64,
    /// Datagrams that failed to decode, other than another protocol version.
    pub malformed: u64,
    /// Datagrams of another protocol version ([`WireError::Version`]).
    pub wrong_version: u64,
    /// Gauge: messages currently unacknowledged (all peers).
    pub in_flight: usize,
    /// Gauge: messages currently waiting for a free in-flight slot (all peers).
    pub queued: usize,
}

/// The RTO of an estimate: `SRTT + max(G, 4·RTTVAR)` clamped to `[min_rto, max_rto]`.
fn rto(rtt: &RttEstimator, cfg: &ReliableConfig) -> Duration {
    rtt.rto(CLOCK_GRANULARITY).clamp(cfg.min_rto, cfg.max_rto)
}

/// An unacknowledged message.
#[derive(Debug)]
struct InFlight {
    /// The encoded datagram, resent as is.
    bytes: Bytes,
    /// First transmission (for the RTT sample).
    sent_at: Instant,
    /// When it is retransmitted (or given up); also its key in the timer set.
    deadline: Instant,
    /// Its current timeout (doubles per retransmission).
    timeout: Duration,
    /// Retransmissions so far (Karn: sampled only if 0).
    retransmits: u32,
    /// It waited below us before it could leave (the session layer's handshake): its ack
    /// time is no RTT sample either.
    waited: bool,
}

/// What the duplicate window says about a received id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Never delivered: deliver and ack.
    Fresh,
    /// Delivered before: re-ack, do not deliver.
    Duplicate,
    /// Below a force-advanced base: maybe never delivered; neither ack nor deliver.
    Ambiguous,
}

/// Receive state for one sender session.
#[derive(Debug)]
struct RecvWindow {
    session: u64,
    /// Every id below `base` is settled (delivered, or ambiguous if below `forced_below`).
    base: u64,
    /// Ids below this one may have been skipped by a forced advance.
    forced_below: u64,
    /// Delivered ids ≥ `base` (never contains `base` itself).
    above: BTreeSet<u64>,
}

impl RecvWindow {
    fn new(session: u64) -> RecvWindow {
        RecvWindow {
            session,
            base: 0,
            forced_below: 0,
            above: BTreeSet::new(),
        }
    }

    /// Classifies `id` and records it as delivered if fresh. `id < u64::MAX` (checked by the
    /// caller), so `id + 1` never overflows.
    fn receive(&mut self, id: u64, window: usize) -> Seen {
        if id < self.base {
            return if id < self.forced_below {
                Seen::Ambiguous
            } else {
                Seen::Duplicate
            };
        }
        if !self.above.insert(id) {
            return Seen::Duplicate;
        }
        self.advance();
        while self.above.len() > window {
            // Forget: everything up to the oldest remembered id is now "settled"; the gaps
            // skipped become ambiguous.
            if let Some(oldest) = self.above.pop_first() {
                self.base = oldest + 1;
                self.forced_below = self.base;
                self.advance();
            }
        }
        Seen::Fresh
    }

    fn advance(&mut self) {
        while self.above.first() == Some(&self.base) {
            self.above.pop_first();
            self.base += 1;
        }
    }
}

/// Everything known about one peer.
#[derive(Debug, Default)]
struct Peer {
    /// Where to send to it: the address it was last sent to or heard from (`None` for a peer
    /// only forgotten so far).
    addr: Option<SocketAddr>,
    /// Next message id to this peer.
    next_id: u64,
    /// Unacknowledged messages by id (ordered: the first is the oldest, which bounds the span
    /// of ids in flight, see [`can_launch`]).
    in_flight: BTreeMap<u64, InFlight>,
    /// Encoded messages waiting for an in-flight slot.
    queue: VecDeque<(u64, Bytes)>,
    /// RTT estimate, once sampled.
    rtt: Option<RttEstimator>,
    /// Receive state of the peer's current session.
    recv: Option<RecvWindow>,
    /// The peer's previous sessions, newest last.
    retired: VecDeque<u64>,
    /// Session of the ids in `pending_acks`.
    ack_session: u64,
    /// Ids to acknowledge at the next `poll_transmit`.
    pending_acks: Vec<u64>,
    /// Whether this peer is in `ack_order`.
    ack_queued: bool,
}

/// The reliable-delivery state machine of one process (all peers). See the module docs.
#[derive(Debug)]
pub struct ReliableEndpoint {
    local: NodeId,
    session: u64,
    cfg: ReliableConfig,
    peers: Map<PeerId, Peer>,
    /// Retransmission deadlines: `(deadline, peer, id)`, removed exactly when the message is
    /// acked, retransmitted (re-inserted) or dropped, so the first element is always live.
    timers: BTreeSet<(Instant, PeerId, u64)>,
    /// Data and retransmissions to send, in order, with their peer.
    transmit: VecDeque<(PeerId, Bytes)>,
    /// Peers with pending acks, in the order they became pending.
    ack_order: VecDeque<PeerId>,
    events: VecDeque<Event>,
    stats: ReliableStats,
}

impl ReliableEndpoint {
    /// An endpoint for the process `local`, whose reliable messages carry `session` (pick it at
    /// random per process start, e.g. `Rng::from_entropy().next_u64()`).
    pub fn new(local: NodeId, session: u64, cfg: ReliableConfig) -> Self {
        ReliableEndpoint {
            local,
            session,
            cfg: cfg.sanitized(),
            peers: Map::default(),
            timers: BTreeSet::new(),
            transmit: VecDeque::new(),
            ack_order: VecDeque::new(),
            events: VecDeque::new(),
            stats: ReliableStats::default(),
        }
    }

    /// This endpoint's session.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// This endpoint's node id (the sender of its datagrams).
    pub fn local(&self) -> NodeId {
        self.local
    }

    /// The (sanitized) configuration in use.
    pub fn config(&self) -> &ReliableConfig {
        &self.cfg
    }

    /// Queues `msg` for reliable delivery to `peer` at `addr` (from now on its address, also for
    /// the retransmissions of earlier messages) and returns its message id (the id later
    /// named by [`Event::Acked`] or [`Event::TimedOut`]). It is transmitted at the next
    /// [`poll_transmit`](Self::poll_transmit) unless `max_in_flight` messages to `peer` are
    /// unacknowledged, in which case it waits for a free slot.
    ///
    /// Fails only if the message does not fit in one datagram ([`WireError::TooLarge`]); the
    /// message is then not sent and no id is consumed.
    pub fn send(
        &mut self,
        now: Instant,
        peer: PeerId,
        addr: SocketAddr,
        msg: Message,
    ) -> Result<u64, WireError> {
        let p = self.peers.entry(peer).or_default();
        p.addr = Some(addr);
        let id = p.next_id;
        let bytes = Datagram::new(
            self.local,
            Body::Reliable {
                session: self.session,
                id,
                msg,
            },
        )
        .encode()?;
        p.next_id += 1;
        if p.queue.is_empty() && can_launch(&self.cfg, p, id) {
            launch(
                &self.cfg,
                &mut self.timers,
                &mut self.transmit,
                &mut self.stats,
                now,
                peer,
                p,
                id,
                bytes,
            );
        } else {
            trace!(%peer, id, queued = p.queue.len() + 1, "reliable message queued");
            p.queue.push_back((id, bytes));
        }
        Ok(id)
    }

    /// Feeds a datagram received from `from`; its state is the header sender's, whose address
    /// becomes `from` (the caller has checked the sender against its address). It is decoded
    /// once: reliable messages and acks are
    /// consumed here (acks generated, duplicates suppressed, RTT sampled; see
    /// [`poll_event`](Self::poll_event)); any other datagram ([`Body::Unreliable`],
    /// [`Body::Video`]) is returned for the caller to handle, so nothing is decoded twice.
    ///
    /// A datagram that does not decode is counted ([`ReliableStats::malformed`] or
    /// [`ReliableStats::wrong_version`]) and returned as `Err`; the state is otherwise unchanged.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<Option<Datagram>, WireError> {
        let d = match Datagram::decode(bytes) {
            Ok(d) => d,
            Err(e) => {
                self.count_rejected(&e);
                return Err(e);
            }
        };
        match d.body {
            Body::Reliable { session, id, msg } => {
                self.on_reliable(from, d.header.sender, session, id, msg);
                Ok(None)
            }
            Body::Ack { session, ids } => {
                self.on_ack(now, from, d.header.sender, session, &ids);
                Ok(None)
            }
            Body::Unreliable(_) | Body::Video(_) => Ok(Some(d)),
        }
    }

    /// Counts a datagram that did not decode (another version, or malformed), refused by
    /// this endpoint or by its caller's own parser.
    pub fn count_rejected(&mut self, e: &WireError) {
        if matches!(e, WireError::Version { .. }) {
            self.stats.wrong_version += 1;
        } else {
            self.stats.malformed += 1;
        }
    }

    fn on_reliable(
        &mut self,
        from: SocketAddr,
        sender: NodeId,
        session: u64,
        id: u64,
        msg: Message,
    ) {
        if id == u64::MAX {
            // Reserved (never generated: a sender would need 2^64 messages); refusing it keeps
            // the window arithmetic overflow-free.
            self.stats.stale_dropped += 1;
            return;
        }
        let p = self.peers.entry(sender).or_default();
        p.addr = Some(from);
        if p.retired.contains(&session) {
            trace!(peer = %sender, session, id, "message of a retired session dropped");
            self.stats.stale_dropped += 1;
            return;
        }
        let window = match &mut p.recv {
            Some(w) if w.session == session => w,
            slot => {
                if let Some(old) = slot.take() {
                    debug!(peer = %sender, %from, old_session = old.session, new_session = session,
                        "peer started a new session (restarted); receive state reset");
                    if p.retired.len() == RETIRED_SESSIONS {
                        p.retired.pop_front();
                    }
                    p.retired.push_back(old.session);
                }
                slot.insert(RecvWindow::new(session))
            }
        };
        match window.receive(id, self.cfg.dup_window) {
            Seen::Fresh => {
                self.stats.delivered += 1;
                self.events.push_back(Event::Message {
                    from,
                    sender,
                    id,
                    msg,
                });
            }
            Seen::Duplicate => {
                trace!(peer = %sender, id, "duplicate re-acked");
                self.stats.duplicates_dropped += 1;
            }
            Seen::Ambiguous => {
                debug!(peer = %sender, id, "message below a forced window base dropped unacked");
                self.stats.stale_dropped += 1;
                return;
            }
        }
        if p.ack_session != session {
            // Pending acks of an older session are useless to the restarted peer.
            p.pending_acks.clear();
            p.ack_session = session;
        }
        p.pending_acks.push(id);
        if !p.ack_queued {
            p.ack_queued = true;
            self.ack_order.push_back(sender);
        }
    }

    fn on_ack(&mut self, now: Instant, from: SocketAddr, peer: PeerId, session: u64, ids: &[u64]) {
        if session != self.session {
            trace!(%peer, session, "ack for another session ignored");
            self.stats.acks_ignored += 1;
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.addr = Some(from);
        for &id in ids {
            let Some(f) = p.in_flight.remove(&id) else {
                continue; // already acked (duplicate ack) or given up
            };
            self.timers.remove(&(f.deadline, peer, id));
            if f.retransmits == 0 && !f.waited {
                let r = now.saturating_duration_since(f.sent_at);
                RttEstimator::sample(&mut p.rtt, r);
            }
            self.stats.acked += 1;
            self.events.push_back(Event::Acked { peer, id });
        }
        fill_slots(
            &self.cfg,
            &mut self.timers,
            &mut self.transmit,
            &mut self.stats,
            now,
            peer,
            p,
        );
    }

    /// Retransmits every message whose deadline is at or before `now`, and gives up (raising
    /// [`Event::TimedOut`]) on those already retransmitted `max_retries` times. Cheap when
    /// nothing is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&key) = self.timers.first() {
            let (deadline, peer, id) = key;
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            let Some(f) = p.in_flight.get_mut(&id) else {
                continue;
            };
            if f.retransmits >= self.cfg.max_retries {
                p.in_flight.remove(&id);
                debug!(%peer, id, retries = self.cfg.max_retries, "reliable message timed out");
                self.stats.timed_out += 1;
                self.events.push_back(Event::TimedOut { peer, id });
                fill_slots(
                    &self.cfg,
                    &mut self.timers,
                    &mut self.transmit,
                    &mut self.stats,
                    now,
                    peer,
                    p,
                );
            } else {
                f.retransmits += 1;
                f.timeout = (f.timeout * 2).min(self.cfg.max_rto);
                f.deadline = now + f.timeout;
                trace!(%peer, id, retransmit = f.retransmits, timeout_ms = f.timeout.as_millis() as u64,
                    "retransmitting");
                self.timers.insert((f.deadline, peer, id));
                self.transmit.push_back((peer, f.bytes.clone()));
                self.stats.retransmitted += 1;
            }
        }
    }

    /// The earliest retransmission deadline: call [`handle_timeout`](Self::handle_timeout) then.
    /// `None` when nothing is unacknowledged.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|&(t, _, _)| t)
    }

    /// The next datagram to send: first pending acks (batched per peer, up to
    /// [`limits::ACK_IDS`] ids each), then data and retransmissions in order. Call until `None`
    /// after every `send`, `handle_datagram` and `handle_timeout`. Each goes to the peer's
    /// current address.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.poll_transmit_to().map(|(_, a, b)| (a, b))
    }

    /// [`poll_transmit`](Self::poll_transmit) with the peer each datagram is for (the session
    /// layer seals it for that peer).
    pub fn poll_transmit_to(&mut self) -> Option<(PeerId, SocketAddr, Bytes)> {
        while let Some(&peer) = self.ack_order.front() {
            let Some(p) = self.peers.get_mut(&peer) else {
                self.ack_order.pop_front();
                continue;
            };
            let n = p.pending_acks.len().min(limits::ACK_IDS);
            if n == 0 {
                p.ack_queued = false;
                self.ack_order.pop_front();
                continue;
            }
            let ids: Vec<u64> = p.pending_acks.drain(..n).collect();
            if p.pending_acks.is_empty() {
                p.ack_queued = false;
                self.ack_order.pop_front();
            }
            let ack = Datagram::new(
                self.local,
                Body::Ack {
                    session: p.ack_session,
                    ids,
                },
            );
            let Some(addr) = p.addr else { continue };
            match ack.encode() {
                Ok(bytes) => {
                    self.stats.acks_sent += 1;
                    return Some((peer, addr, bytes));
                }
                // Cannot happen (ACK_IDS varints fit a datagram); never panic anyway.
                Err(e) => debug!(%peer, error = %e, "ack not encodable, dropped"),
            }
        }
        while let Some((peer, bytes)) = self.transmit.pop_front() {
            if let Some(addr) = self.peers.get(&peer).and_then(|p| p.addr) {
                return Some((peer, addr, bytes));
            }
        }
        None
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The messages to `peer` now in flight waited for something below us (a handshake of
    /// the session layer) before they left: their acks give no RTT sample (like Karn's rule
    /// for retransmissions), so a handshake's wait or retries never inflate the RTT, the RTO
    /// and the failure detector's timeouts built on it.
    pub fn no_rtt_samples_in_flight(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            for f in p.in_flight.values_mut() {
                f.waited = true;
            }
        }
    }

    /// The RTT estimate of `peer`, once at least one ack of a never-retransmitted message was
    /// received from it.
    pub fn rtt(&self, peer: PeerId) -> Option<RttEstimate> {
        let rtt = self.peers.get(&peer)?.rtt?;
        Some(RttEstimate {
            srtt: rtt.srtt(),
            rttvar: rtt.rttvar(),
            rto: rto(&rtt, &self.cfg),
            min_rtt: rtt.min_rtt(),
            samples: rtt.samples(),
        })
    }

    /// Drops every piece of state about `peer` (declared dead): unacked and queued messages
    /// (without events), receive window, pending acks, RTT estimate. If it comes back, it is a
    /// new peer: our ids to it continue (they are per session, never reused), its messages are
    /// accepted afresh.
    pub fn forget_peer(&mut self, peer: PeerId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        for (id, f) in &p.in_flight {
            self.timers.remove(&(f.deadline, peer, *id));
        }
        self.transmit.retain(|(to, _)| *to != peer);
        self.ack_order.retain(|to| *to != peer);
        debug!(%peer, dropped_in_flight = p.in_flight.len(), dropped_queued = p.queue.len(),
            "peer forgotten");
        // Keep the id counter: a forgotten-then-returning peer must not see old ids again under
        // our (unchanged) session, or it would suppress them as duplicates.
        self.peers.insert(
            peer,
            Peer {
                next_id: p.next_id,
                addr: p.addr,
                ..Peer::default()
            },
        );
    }

    /// Counters since creation, plus the current in-flight and queued totals.
    pub fn stats(&self) -> ReliableStats {
        let mut s = self.stats;
        s.in_flight = self.peers.values().map(|p| p.in_flight.len()).sum();
        s.queued = self.peers.values().map(|p| p.queue.len()).sum();
        s
    }
}

/// Starts the first transmission of message `id` to `peer`.
#[allow(clippy::too_many_arguments)]
fn launch(
    cfg: &ReliableConfig,
    timers: &mut BTreeSet<(Instant, PeerId, u64)>,
    transmit: &mut VecDeque<(PeerId, Bytes)>,
    stats: &mut ReliableStats,
    now: Instant,
    peer: PeerId,
    p: &mut Peer,
    id: u64,
    bytes: Bytes,
) {
    let timeout = p.rtt.map_or(cfg.initial_rto, |r| rto(&r, cfg));
    let deadline = now + timeout;
    timers.insert((deadline, peer, id));
    transmit.push_back((peer, bytes.clone()));
    p.in_flight.insert(
        id,
        InFlight {
            bytes,
            sent_at: now,
            waited: false,
            deadline,
            timeout,
            retransmits: 0,
        },
    );
    stats.sent += 1;
}

/// Launches queued messages to `peer` while it has free in-flight slots.
fn fill_slots(
    cfg: &ReliableConfig,
    timers: &mut BTreeSet<(Instant, PeerId, u64)>,
    transmit: &mut VecDeque<(PeerId, Bytes)>,
    stats: &mut ReliableStats,
    now: Instant,
    peer: PeerId,
    p: &mut Peer,
) {
    while let Some(&(id, _)) = p.queue.front() {
        if !can_launch(cfg, p, id) {
            break;
        }
        let Some((id, bytes)) = p.queue.pop_front() else {
            break;
        };
        launch(cfg, timers, transmit, stats, now, peer, p, id, bytes);
    }
}

/// Whether message `id` may be transmitted now: fewer than `max_in_flight` messages are
/// unacknowledged, and `id` is less than `dup_window` above the oldest unacknowledged one.
///
/// The second condition is the sender's half of the duplicate window: the receiver's base is
/// never below our oldest unacked id (everything older was acked, hence delivered), so with the
/// same `dup_window` on both sides the receiver never has to force its window forward (which
/// would make a still-retried message undeliverable) while we keep retrying.
fn can_launch(cfg: &ReliableConfig, p: &Peer, id: u64) -> bool {
    p.in_flight.len() < cfg.max_in_flight
        && p.in_flight
            .first_key_value()
            .map(|(&oldest, _)| id.saturating_sub(oldest) < cfg.dup_window as u64)
            .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rto_is_clamped_both_ways() {
        let cfg = ReliableConfig {
            min_rto: Duration::from_millis(1),
            ..ReliableConfig::default()
        };
        let r = RttEstimator::new(Duration::from_millis(100));
        assert_eq!(rto(&r, &cfg), Duration::from_millis(300));
        assert_eq!(
            rto(&RttEstimator::new(Duration::from_secs(10)), &cfg),
            cfg.max_rto
        );
        let tiny = RttEstimator::new(Duration::from_micros(10));
        assert_eq!(
            rto(&tiny, &ReliableConfig::default()),
            Duration::from_millis(50)
        );
        assert_eq!(
            rto(&tiny, &cfg),
            Duration::from_micros(10) + CLOCK_GRANULARITY
        );
    }

    #[test]
    fn window_delivers_once_and_forgets_boundedly() {
        let mut w = RecvWindow::new(1);
        assert_eq!(w.receive(1, 4), Seen::Fresh);
        assert_eq!(w.receive(1, 4), Seen::Duplicate);
        assert_eq!(w.receive(0, 4), Seen::Fresh);
        assert_eq!((w.base, w.above.len()), (2, 0));
        assert_eq!(w.receive(0, 4), Seen::Duplicate);
        // 2 is missing; 3..=7 arrive: the set would hold 5 > 4 ids, so the base jumps past 3.
        for id in 3..=7 {
            assert_eq!(w.receive(id, 4), Seen::Fresh);
        }
        assert_eq!(w.base, 8);
        assert!(w.above.is_empty());
        assert_eq!(w.receive(2, 4), Seen::Ambiguous);
        assert_eq!(w.receive(3, 4), Seen::Ambiguous);
        assert_eq!(w.receive(5, 4), Seen::Duplicate);
        assert_eq!(w.receive(8, 4), Seen::Fresh);
        assert_eq!(w.receive(8, 4), Seen::Duplicate);
    }

    #[test]
    fn sanitized_config_has_no_zero_limits() {
        let c = ReliableConfig {
            max_in_flight: 0,
            dup_window: 0,
            min_rto: Duration::from_secs(5),
            max_rto: Duration::from_secs(1),
            ..ReliableConfig::default()
        }
        .sanitized();
        assert_eq!((c.max_in_flight, c.dup_window), (1, 1));
        assert!(c.min_rto <= c.max_rto);
        assert!(c.initial_rto >= c.min_rto && c.initial_rto <= c.max_rto);
    }
}

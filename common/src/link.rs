//! The sans-IO half of a host's UDP transport: every datagram a host receives is fed to
//! [`Link::handle_datagram`] and decoded once; reliable messages and acks go through the
//! [`ReliableEndpoint`] (acks, duplicates, retransmission, RTT); what the application must
//! handle comes out of [`Link::poll_incoming`] as [`Incoming`] items, in order; what must be
//! sent comes out of [`Link::poll_transmit`], grouped by destination (each destination's
//! datagrams in the order they were decided; the order across destinations is free).
//!
//! A `Link` reads no clock (every call that needs the time takes `now`) and owns no socket: a
//! driver (the tokio [`Transport`](crate::transport::Transport), the relay's driver, or a
//! simulation) moves datagrams between it and the network. Datagrams of another protocol
//! version are dropped with one warning per peer; malformed ones are dropped and counted.
//!
//! With a session layer ([`Link::with_secure`], the default of every daemon) each datagram is
//! sealed for its peer on the way out and must authenticate on the way in
//! ([`Link::open`]: handshakes are answered there, anything else that does not authenticate
//! is dropped and counted by reason); the sender id of what comes out is then the
//! authenticated peer. Without one (tests, the benchmark's plaintext runs) datagrams are the
//! version-1 format as they are.
//!
//! Data handed to [`Link::send_bytes`] (video, the bulk of what a relay sends) is sealed when
//! it is polled, not when it is queued, and what is queued is grouped by destination first:
//! a relay that fans a burst of datagrams out to many peers can send the first peers' copies
//! (one GSO message each) while the later ones are not sealed yet, instead of sealing the
//! whole burst before anything leaves.

use crate::id::{NodeId, PeerId};
use crate::reliable::{Event, ReliableConfig, ReliableEndpoint, ReliableStats, RttEstimate};
use crate::secure::{Secure, SecureEvent, SecureStats};
use crate::wire::{Body, Datagram, Message, OncePerPeer, VideoFrame, WireError, PROTOCOL_VERSION};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{debug, warn};

/// What a [`Link`] hands to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A control message: reliable ones exactly once (in arrival order), unreliable ones as
    /// they come.
    Message {
        /// Source address.
        from: SocketAddr,
        /// Sender id from the datagram header.
        sender: NodeId,
        /// The message.
        msg: Message,
        /// Whether it came through the reliable channel.
        reliable: bool,
    },
    /// A video datagram, parsed in place (its payload never copied).
    Video {
        /// Source address.
        from: SocketAddr,
        /// Sender id from the datagram header.
        sender: NodeId,
        /// The datagram.
        frame: VideoFrame,
    },
    /// Something the session layer reports (a session up, a PoP's key, access denied).
    Secure(SecureEvent),
    /// A reliable message to `peer` was never acknowledged (see [`Event::TimedOut`]).
    TimedOut {
        /// The peer.
        peer: PeerId,
        /// The id [`Link::send_reliable`] returned.
        id: u64,
    },
}

/// Counters of a [`Link`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// The reliable channel's counters (including malformed and other-version datagrams).
    pub reliable: ReliableStats,
    /// Datagrams fed to [`Link::handle_datagram`].
    pub datagrams_in: u64,
    /// Datagrams handed out by [`Link::poll_transmit`].
    pub datagrams_out: u64,
    /// The session layer's counters (zero without one).
    pub secure: SecureStats,
}

/// A datagram queued by a [`Link`].
#[derive(Debug)]
enum Out {
    /// Ready to go (plaintext runs, or sealed already).
    Ready(SocketAddr, Bytes),
    /// Data to seal for `peer` when it is polled.
    Seal {
        now: Instant,
        peer: PeerId,
        addr: SocketAddr,
        bytes: Bytes,
    },
}

impl Out {
    fn destination(&self) -> SocketAddr {
        match self {
            Out::Ready(to, _) | Out::Seal { addr: to, .. } => *to,
        }
    }
}

/// The decoding and reliable-delivery state of one host (all peers). See the module docs.
#[derive(Debug)]
pub struct Link {
    endpoint: ReliableEndpoint,
    other_version: OncePerPeer,
    incoming: VecDeque<Incoming>,
    /// What to send, in the order decided until [`Link::poll_transmit`] groups it.
    transmit: VecDeque<Out>,
    /// Whether `transmit` got entries since it was last grouped by destination.
    ungrouped: bool,
    /// What the session layer produced for the entry being sealed, handed out first.
    sealed: VecDeque<(SocketAddr, Bytes)>,
    secure: Option<Secure>,
    /// The latest time we were given (sealing needs one; the reliable channel's output is
    /// collected at the next call that brings a time).
    now: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    /// A link for the process `local`, whose reliable messages carry `session` (random per
    /// process start).
    pub fn new(local: NodeId, session: u64, cfg: ReliableConfig) -> Link {
        Link {
            endpoint: ReliableEndpoint::new(local, session, cfg),
            other_version: OncePerPeer::default(),
            incoming: VecDeque::new(),
            transmit: VecDeque::new(),
            ungrouped: false,
            sealed: VecDeque::new(),
            secure: None,
            now: None,
            stats: LinkStats::default(),
        }
    }

    /// This link with a session layer: every datagram is sealed for its peer and must
    /// authenticate (see the module docs).
    pub fn with_secure(mut self, secure: Secure) -> Link {
        self.secure = Some(secure);
        self
    }

    /// Puts a session layer under this link (before any traffic).
    pub fn set_secure(&mut self, secure: Secure) {
        self.secure = Some(secure);
    }

    /// The session layer, if any.
    pub fn secure(&self) -> Option<&Secure> {
        self.secure.as_ref()
    }

    /// The session layer, if any (to add members or PoPs).
    pub fn secure_mut(&mut self) -> Option<&mut Secure> {
        self.secure.as_mut()
    }

    /// Whether datagrams are sealed and authenticated.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// Opens a received datagram: with a session layer, authenticates and decrypts it (a
    /// handshake is answered through [`poll_transmit`](Self::poll_transmit), what does not
    /// authenticate is dropped and counted) and returns the version-1 datagram inside, whose
    /// sender is the authenticated peer; without one, returns the bytes as they are. Feed what
    /// it returns to [`handle_plain`](Self::handle_plain) (after checking the sender). The
    /// datagram is opened in its own buffer (no copy).
    pub fn open(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: impl Into<BytesMut>,
    ) -> Option<BytesMut> {
        let Some(sec) = self.secure.as_mut() else {
            return Some(bytes.into());
        };
        self.stats.datagrams_in += 1;
        let opened = sec.handle_datagram(now, from, bytes);
        self.collect_at(now);
        opened.map(|o| o.plaintext)
    }

    /// Our node id (the sender of every datagram).
    pub fn local(&self) -> NodeId {
        self.endpoint.local()
    }

    /// The reliable session of this process.
    pub fn session(&self) -> u64 {
        self.endpoint.session()
    }

    /// Feeds one received datagram: [`open`](Self::open), then
    /// [`handle_plain`](Self::handle_plain).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: impl Into<BytesMut>) {
        if let Some(plain) = self.open(now, from, bytes) {
            self.handle_plain(now, from, plain);
        }
    }

    /// Feeds one opened (version-1) datagram. What the application must handle is queued for
    /// [`poll_incoming`](Self::poll_incoming); acks it calls for, for
    /// [`poll_transmit`](Self::poll_transmit). Video is parsed in place
    /// ([`VideoFrame`]); everything else is decoded.
    pub fn handle_plain(&mut self, now: Instant, from: SocketAddr, bytes: BytesMut) {
        if self.secure.is_none() {
            self.stats.datagrams_in += 1;
        }
        let len = bytes.len();
        let decoded = match VideoFrame::parse(bytes) {
            Ok(Ok(frame)) => {
                self.incoming.push_back(Incoming::Video {
                    from,
                    sender: frame.sender(),
                    frame,
                });
                Ok(None)
            }
            Ok(Err(other)) => self.endpoint.handle_datagram(now, from, &other),
            Err(e) => {
                self.endpoint.count_rejected(&e);
                Err(e)
            }
        };
        match decoded {
            Ok(None) => {}
            Ok(Some(d)) => {
                let sender = d.header.sender;
                match d.body {
                    Body::Unreliable(msg) => self.incoming.push_back(Incoming::Message {
                        from,
                        sender,
                        msg,
                        reliable: false,
                    }),
                    // Parsed in place above; consumed by the endpoint: never returned.
                    Body::Video(_) | Body::Reliable { .. } | Body::Ack { .. } => {}
                }
            }
            Err(WireError::Version { got }) => {
                if self.other_version.first(from) {
                    warn!(peer = %from, peer_version = got, our_version = PROTOCOL_VERSION,
                        "peer speaks another protocol version; its datagrams are dropped \
                         (logged once per peer)");
                }
            }
            Err(e) => {
                debug!(peer = %from, len, error = %e, "malformed datagram dropped")
            }
        }
        self.collect_at(now);
    }

    /// Fires the reliable channel's due retransmissions and timeouts, and the session
    /// layer's handshake retries and expiries.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        if let Some(s) = self.secure.as_mut() {
            s.handle_timeout(now);
        }
        self.collect_at(now);
    }

    /// The next deadline of the reliable channel or the session layer (`None`: nothing).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let r = self.endpoint.poll_timeout();
        match (r, self.secure.as_ref().and_then(Secure::poll_timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends `msg` reliably to `peer` at `addr`; returns its message id (named again by
    /// [`Incoming::TimedOut`] if it is never acknowledged). The reliable state is the peer's,
    /// wherever it is: `addr` is only where this and later (re)transmissions go.
    pub fn send_reliable(
        &mut self,
        now: Instant,
        peer: PeerId,
        addr: SocketAddr,
        msg: Message,
    ) -> Result<u64, WireError> {
        let id = self.endpoint.send(now, peer, addr, msg)?;
        self.collect_at(now);
        Ok(id)
    }

    /// Sends `msg` once to `peer` at `addr`, without acknowledgement.
    pub fn send_unreliable(
        &mut self,
        now: Instant,
        peer: PeerId,
        addr: SocketAddr,
        msg: Message,
    ) -> Result<(), WireError> {
        let bytes = Datagram::new(self.local(), Body::Unreliable(msg)).encode()?;
        self.send_bytes(now, peer, addr, bytes);
        Ok(())
    }

    /// Sends an already encoded datagram to `peer` at `addr` (video is encoded once for every
    /// subscriber; with a session layer it is then sealed per peer).
    pub fn send_bytes(&mut self, now: Instant, peer: PeerId, addr: SocketAddr, bytes: Bytes) {
        self.collect_at(now);
        if self.secure.is_some() {
            // Sealed when polled (see the module docs).
            self.push(Out::Seal {
                now,
                peer,
                addr,
                bytes,
            });
        } else {
            self.push(Out::Ready(addr, bytes));
        }
    }

    fn push(&mut self, out: Out) {
        self.transmit.push_back(out);
        self.ungrouped = true;
    }

    /// The RTT estimate of `peer` (`None` before the first sample).
    pub fn rtt(&self, peer: PeerId) -> Option<RttEstimate> {
        self.endpoint.rtt(peer)
    }

    /// Drops all reliable state about `peer` (declared dead); see
    /// [`ReliableEndpoint::forget_peer`].
    pub fn forget_peer(&mut self, peer: PeerId) {
        self.endpoint.forget_peer(peer);
    }

    /// The next item for the application, in order.
    pub fn poll_incoming(&mut self) -> Option<Incoming> {
        self.incoming.pop_front()
    }

    /// Whether items wait in [`poll_incoming`](Self::poll_incoming).
    pub fn has_incoming(&self) -> bool {
        !self.incoming.is_empty()
    }

    /// The next datagram to send: what is queued comes out grouped by destination (a stable
    /// sort: each destination's datagrams in the order decided), data sealed as it comes out.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        loop {
            if let Some(t) = self.sealed.pop_front() {
                self.stats.datagrams_out += 1;
                return Some(t);
            }
            self.collect();
            if self.ungrouped {
                self.ungrouped = false;
                self.transmit
                    .make_contiguous()
                    .sort_by_key(|o| o.destination());
            }
            match self.transmit.pop_front()? {
                Out::Ready(to, bytes) => {
                    self.stats.datagrams_out += 1;
                    return Some((to, bytes));
                }
                Out::Seal {
                    now,
                    peer,
                    addr,
                    bytes,
                } => {
                    let s = self.secure.as_mut().expect("queued for sealing");
                    s.send(now, peer, addr, bytes);
                    // (Events of the session layer wait for the next collect.)
                    while let Some(t) = s.poll_transmit() {
                        self.sealed.push_back(t);
                    }
                }
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> LinkStats {
        let mut s = self.stats;
        s.reliable = self.endpoint.stats();
        if let Some(sec) = &self.secure {
            s.secure = sec.stats();
        }
        s
    }

    /// [`collect`](Self::collect), sealing at `now`.
    fn collect_at(&mut self, now: Instant) {
        self.now = Some(now);
        self.collect();
    }

    /// Moves the session layer's datagrams (sealed data, handshakes) and events into our
    /// queues.
    fn collect_secure(&mut self) {
        let Some(s) = self.secure.as_mut() else {
            return;
        };
        while let Some((to, bytes)) = s.poll_transmit() {
            self.transmit.push_back(Out::Ready(to, bytes));
            self.ungrouped = true;
        }
        while let Some(ev) = s.poll_event() {
            if let SecureEvent::Up { peer: Some(p), .. } = ev {
                // What we sent it so far waited for the handshake: no RTT samples from it.
                self.endpoint.no_rtt_samples_in_flight(p);
            }
            self.incoming.push_back(Incoming::Secure(ev));
        }
    }

    /// Moves the endpoint's transmits (data, retransmissions, acks; sealed when there is a
    /// session layer) and events into our queues, keeping the order in which they were
    /// decided.
    fn collect(&mut self) {
        while let Some((peer, addr, bytes)) = self.endpoint.poll_transmit_to() {
            match self.secure.as_mut() {
                // Every call that produces output brings a time first; never in clear.
                Some(s) => match self.now {
                    Some(now) => s.send(now, peer, addr, bytes),
                    None => debug_assert!(false, "sealing needs a time"),
                },
                None => self.push(Out::Ready(addr, bytes)),
            }
        }
        self.collect_secure();
        while let Some(ev) = self.endpoint.poll_event() {
            let item = match ev {
                Event::Message {
                    from, sender, msg, ..
                } => Incoming::Message {
                    from,
                    sender,
                    msg,
                    reliable: true,
                },
                Event::TimedOut { peer, id } => Incoming::TimedOut { peer, id },
                Event::Acked { .. } => continue,
            };
            self.incoming.push_back(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 8010))
    }

    /// Two links exchanging everything they transmit, on a fake clock.
    fn exchange(a: &mut Link, b: &mut Link, now: Instant) {
        loop {
            let mut moved = false;
            while let Some((to, bytes)) = a.poll_transmit() {
                assert_eq!(to, addr(2));
                b.handle_datagram(now, addr(1), &bytes[..]);
                moved = true;
            }
            while let Some((to, bytes)) = b.poll_transmit() {
                assert_eq!(to, addr(1));
                a.handle_datagram(now, addr(2), &bytes[..]);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    #[test]
    fn a_message_that_waited_for_a_handshake_gives_no_rtt_sample() {
        use crate::keys::{KeyPair, Secret};
        use crate::secure::{SecureConfig, RETRY_FIRST};
        let t0 = Instant::now();
        let net = Secret::random();
        let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
        let member =
            |k: &KeyPair, seed| Secure::new(SecureConfig::member(k.clone(), net.clone(), 1, seed));
        // (An initial RTO longer than the handshake retry, so that Karn's rule is not what
        // keeps the sample out.)
        let slow = ReliableConfig {
            initial_rto: Duration::from_secs(1),
            ..ReliableConfig::default()
        };
        let mut a = Link::new(NodeId(1), 11, slow).with_secure(member(&ka, 1));
        let mut b = Link::new(NodeId(2), 22, ReliableConfig::default()).with_secure(member(&kb, 2));
        a.secure_mut().unwrap().set_member(NodeId(2), kb.public);
        // b does not know a yet (the bootstrapper's directory has not reached it): a's first
        // initiation is refused, its retry 200 ms later succeeds and the queued message leaves.
        a.send_reliable(t0, NodeId(2), addr(2), Message::ListChannels)
            .unwrap();
        exchange(&mut a, &mut b, t0);
        assert!(b.poll_incoming().is_none());
        b.secure_mut().unwrap().set_member(NodeId(1), ka.public);
        let t1 = t0 + RETRY_FIRST;
        a.handle_timeout(t1);
        exchange(&mut a, &mut b, t1);
        assert!(std::iter::from_fn(|| b.poll_incoming()).any(|i| matches!(
            i,
            Incoming::Message {
                msg: Message::ListChannels,
                ..
            }
        )));
        let st = a.stats().reliable;
        assert_eq!(
            (st.acked, st.retransmitted),
            (1, 0),
            "acked, never resent: {st:?}"
        );
        // The 200 ms it waited are not a round trip of this link.
        assert!(a.rtt(NodeId(2)).is_none(), "{:?}", a.rtt(NodeId(2)));
        // The next message samples the link as it is.
        a.send_reliable(t1, NodeId(2), addr(2), Message::ListChannels)
            .unwrap();
        exchange(&mut a, &mut b, t1 + Duration::from_millis(1));
        let r = a.rtt(NodeId(2)).expect("sampled");
        assert!(r.srtt <= Duration::from_millis(1), "{r:?}");
    }

    #[test]
    fn data_is_sealed_as_it_is_polled_grouped_by_destination() {
        use crate::keys::{KeyPair, Secret};
        use crate::secure::SecureConfig;
        let t0 = Instant::now();
        let net = Secret::random();
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect();
        let mut links: Vec<Link> = (0..3u8)
            .map(|i| {
                let sc = SecureConfig::member(keys[i as usize].clone(), net.clone(), 1, i.into());
                let mut l = Link::new(NodeId(i.into()), i.into(), ReliableConfig::default())
                    .with_secure(Secure::new(sc));
                for (j, k) in keys.iter().enumerate() {
                    if j != i as usize {
                        l.secure_mut()
                            .unwrap()
                            .set_member(NodeId(j as u64), k.public);
                    }
                }
                l
            })
            .collect();
        let at = |i: usize| addr(i as u8 + 1);
        // Link 0 is a relay with two subscribers (links 1 and 2): sessions first.
        for j in [1, 2] {
            links[0]
                .send_reliable(t0, NodeId(j as u64), at(j), Message::ListChannels)
                .unwrap();
        }
        loop {
            let mut moved = false;
            for i in 0..3 {
                while let Some((to, bytes)) = links[i].poll_transmit() {
                    let j = (0..3).find(|&j| at(j) == to).expect("a known address");
                    links[j].handle_datagram(t0, at(i), &bytes[..]);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        for l in &mut links {
            while l.poll_incoming().is_some() {}
        }
        // A burst of two datagrams fanned out to both, in the order a relay decides it
        // (encoded once, as video is).
        let video = |n: u8| {
            Datagram::new(
                NodeId(0),
                Body::Unreliable(Message::Ping { nonce: n.into() }),
            )
            .encode()
            .unwrap()
        };
        let sealed = |l: &Link| l.stats().secure.sealed;
        let before = sealed(&links[0]);
        for n in [1, 2] {
            for j in [1, 2] {
                links[0].send_bytes(t0, NodeId(j as u64), at(j), video(n));
            }
        }
        assert_eq!(
            sealed(&links[0]),
            before,
            "nothing sealed before it is polled"
        );
        let mut out = Vec::new();
        while let Some((to, bytes)) = links[0].poll_transmit() {
            out.push((to, bytes));
            assert_eq!(
                sealed(&links[0]),
                before + out.len() as u64,
                "one seal per poll"
            );
        }
        let order: Vec<SocketAddr> = out.iter().map(|(to, _)| *to).collect();
        assert_eq!(
            order,
            vec![at(1), at(1), at(2), at(2)],
            "grouped by destination"
        );
        // Each subscriber opens its copies in the order sent.
        let mut next = [1u8; 3];
        for (to, bytes) in out {
            let j = (0..3).find(|&j| at(j) == to).unwrap();
            let plain = links[j].open(t0, at(0), &bytes[..]).expect("authenticates");
            assert_eq!(&plain[..], &video(next[j])[..]);
            next[j] += 1;
        }
    }

    #[test]
    fn reliable_and_unreliable_messages_arrive_once_and_acks_sample_the_rtt() {
        let t0 = Instant::now();
        let mut a = Link::new(NodeId(1), 11, ReliableConfig::default());
        let mut b = Link::new(NodeId(2), 22, ReliableConfig::default());
        let id = a
            .send_reliable(t0, NodeId(2), addr(2), Message::ListChannels)
            .unwrap();
        a.send_unreliable(t0, NodeId(2), addr(2), Message::Ping { nonce: 5 })
            .unwrap();
        // Delivered 10 ms later, answered at once.
        let t1 = t0 + Duration::from_millis(10);
        exchange(&mut a, &mut b, t1);
        let got: Vec<Incoming> = std::iter::from_fn(|| b.poll_incoming()).collect();
        assert_eq!(
            got,
            vec![
                Incoming::Message {
                    from: addr(1),
                    sender: NodeId(1),
                    msg: Message::ListChannels,
                    reliable: true
                },
                Incoming::Message {
                    from: addr(1),
                    sender: NodeId(1),
                    msg: Message::Ping { nonce: 5 },
                    reliable: false
                },
            ]
        );
        assert_eq!(id, 0);
        assert!(a.rtt(NodeId(2)).is_some(), "the ack sampled the RTT");
        assert!(a.poll_incoming().is_none());
        assert_eq!(a.poll_timeout(), None, "nothing left in flight");
    }

    #[test]
    fn garbage_and_other_versions_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut b = Link::new(NodeId(2), 22, ReliableConfig::default());
        b.handle_datagram(t0, addr(1), &[0xffu8; 3][..]);
        let mut other = Datagram::new(NodeId(1), Body::Unreliable(Message::ListChannels))
            .encode()
            .unwrap()
            .to_vec();
        other[2] = PROTOCOL_VERSION.wrapping_add(1);
        b.handle_datagram(t0, addr(1), &other[..]);
        assert!(b.poll_incoming().is_none());
        let s = b.stats();
        assert_eq!(s.datagrams_in, 2);
        assert_eq!(s.reliable.malformed + s.reliable.wrong_version, 2);
    }

    #[test]
    fn an_unacknowledged_message_times_out() {
        let t0 = Instant::now();
        let mut a = Link::new(NodeId(1), 11, ReliableConfig::default());
        let id = a
            .send_reliable(t0, NodeId(2), addr(2), Message::ListChannels)
            .unwrap();
        let mut t = t0;
        let mut timed_out = false;
        for _ in 0..10_000 {
            while a.poll_transmit().is_some() {}
            let Some(d) = a.poll_timeout() else { break };
            t = t.max(d);
            a.handle_timeout(t);
            if let Some(Incoming::TimedOut { peer, id: i }) = a.poll_incoming() {
                assert_eq!((peer, i), (NodeId(2), id));
                timed_out = true;
                break;
            }
        }
        assert!(timed_out);
    }
}

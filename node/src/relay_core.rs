//! The relay's core: every decision of a relay (routing from floods, subscriptions, upstream
//! choice and healing, secondary upstreams, the GOP cache, per-hop loss recovery, heartbeats and
//! timers) and its datagram layer (decoding, the reliable channel: a [`Link`]) in one
//! synchronous struct that reads no clock, does no I/O and knows nothing of tokio (no
//! channels, no tasks).
//!
//! A driver (the tokio one in [`crate::relay`], or a simulation) feeds it events with their
//! time: [`RelayCore::handle_datagram`] for every received datagram,
//! [`RelayCore::handle_timeout`] when [`RelayCore::poll_timeout`] has come, and the server's
//! commands ([`RelayCore::set_local`], [`RelayCore::local_video`]) and topology edits
//! ([`RelayCore::set_neighbours`]); after each, it sends what [`RelayCore::poll_transmit`]
//! yields, in order (one encoded `Bytes` and its destinations), and handles what
//! [`RelayCore::poll_event`] yields (local demand). The log lines and the video path are
//! described in [`crate::relay`].

use crate::choice;
use crate::gop::{GopCache, GopConfig, Pushed};
use crate::routing::{FloodOrigin, FloodStats, RoutingConfig, RoutingTable, DEFAULT_LINK_COST};
use crate::subscriptions::{SubAction, Subscriptions, Upstream};
use bytes::{Bytes, BytesMut};
use common::failure::FailureConfig;
use common::feed::{Feed, Role};
use common::keys::PublicKey;
use common::link::Incoming;
use common::link::Link;
use common::map::Map;
use common::nack::{Arrival, NackConfig, NackTracker, RetransmitBuffer, RetransmitConfig};
use common::peers::{Check, PeerTable};
use common::reliable::ReliableConfig;
use common::wire::{
    limits, video_flags, with_video_flag, Body, ChannelId, ChannelInfo, Datagram, Flood, Message,
    PathHop, VideoFrame, VideoPacket,
};
use common::PeerId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Tuning of a [`Relay`](crate::relay::Relay). [`Default`] is the protocol's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// How often a server floods its channels. Default 1 s.
    pub flood_interval: Duration,
    /// Routes not refreshed for this long are dropped. Default 3.5 s.
    pub route_ttl: Duration,
    /// Liveness of neighbours and upstreams: a heartbeat (unreliable `Ping`) to each every
    /// `heartbeat_interval`; any datagram from a peer counts as heard; a peer silent for
    /// `max(k × heartbeat_interval, 2·SRTT + 4·RTTVAR)` is dead and its channels move at once;
    /// one that came back is not chosen as upstream for `hold_down` unless it is the only
    /// route. Default: 200 ms, k = 6 (1.2 s), 2 s ([`RoutingConfig::default`]); a peer that
    /// feeds us is watched by the fast detector instead (`fast_interval` 25 ms, 150 ms).
    pub failure: FailureConfig,
    /// A subscriber silent this long is dropped. Default 5 s.
    pub subscriber_timeout: Duration,
    /// How often one of the heartbeats to a live peer is sent reliably instead, so that its
    /// acknowledgement feeds the RTT estimate (link cost, liveness timeout). Default 500 ms.
    pub ping_interval: Duration,
    /// An upstream that sent nothing of a channel for this long is sent `Subscribe` again (it
    /// may have lost our subscription). Default 2 s.
    pub resubscribe_after: Duration,
    /// A better route replaces a working one only if it costs at most this percentage of the
    /// current one. Default 80 (hysteresis against RTT jitter).
    pub switch_percent: u64,
    /// …and is at least this much cheaper: on a LAN or loopback, paths differ by fractions of a
    /// millisecond that are noise (a busy host's RTT spikes), not a reason to move a stream.
    /// Default 2 ms.
    pub switch_min_gain: Duration,
    /// Capacity of the handle → engine command queue. Default 1024.
    pub command_queue: usize,
    /// Bounds of the per-channel GOP cache (instant start for new subscribers).
    pub gop: GopConfig,
    /// Per-hop loss recovery (see the module docs): keep a [`RetransmitBuffer`] per channel
    /// sent and answer subscribers' `Nack`s; NACK gaps in the video from our upstream. `false`
    /// (CLI `--no-recovery`) disables both, for comparison. Default true.
    pub recovery: bool,
    /// Latency budget of a gap at this hop: a missing seq is NACKed upstream until this long
    /// after its gap was detected, then given up ([`NackConfig::deadline`]). Default 150 ms
    /// (the client adds its own 200 ms budget).
    pub recovery_deadline: Duration,
    /// Bounds and rate limits of the per-channel retransmission buffers.
    pub retransmit: RetransmitConfig,
    /// Upstreams per received channel (`--redundancy`, 1 or 2). With 2, each channel is also
    /// subscribed at a *secondary* upstream, on a path disjoint from the primary's where the
    /// routes allow, and the two are merged by seq (see the module docs). Default 1.
    pub redundancy: u8,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            flood_interval: Duration::from_secs(1),
            route_ttl: Duration::from_millis(3500),
            failure: RoutingConfig::default().failure,
            subscriber_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_millis(500),
            resubscribe_after: Duration::from_secs(2),
            switch_percent: 80,
            switch_min_gain: Duration::from_millis(2),
            command_queue: 1024,
            gop: GopConfig::default(),
            recovery: true,
            recovery_deadline: Duration::from_millis(150),
            retransmit: RetransmitConfig::default(),
            redundancy: 1,
        }
    }
}

impl RelayConfig {
    /// The defaults, with what the daemons' shared flags change (`--no-recovery`).
    pub fn from_args(args: &common::host::OverlayArgs) -> RelayConfig {
        RelayConfig {
            recovery: !args.no_recovery,
            redundancy: args.redundancy.clamp(1, 2),
            ..RelayConfig::default()
        }
    }
}

/// Counters and state of a relay, for tests and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Flood counters of the routing table.
    pub floods: FloodStats,
    /// Floods this host originated (servers).
    pub floods_originated: u64,
    /// Video datagrams received.
    pub video_in: u64,
    /// Video datagrams sent (one per subscriber per datagram).
    pub video_out: u64,
    /// Local video chunks the server handed in.
    pub local_video_in: u64,
    /// Video from a peer that is not our upstream for its channel (dropped).
    pub video_not_upstream: u64,
    /// Messages that make no sense (e.g. a flood from a non-neighbour, local video for a
    /// channel that is not local, unencodable data), dropped.
    pub malformed: u64,
    /// Messages we do not expect (e.g. `Channels` or `Nack`), dropped.
    pub unexpected: u64,
    /// Upstreams declared dead while feeding channels.
    pub upstream_losses: u64,
    /// Channels moved to another upstream (healing or a better route).
    pub resubscriptions: u64,
    /// Catastrophic fallbacks (subscriptions to a dead node's parent).
    pub fallbacks: u64,
    /// Sends skipped because no address was known for the peer (a bug if ever non-zero).
    pub no_address: u64,
    /// Datagrams dropped because their sender id does not match what is pinned for their
    /// address (see `common::peers`).
    pub peer_mismatch: u64,
    /// Subscribes refused (subscriber limits).
    pub subscribes_refused: u64,
    /// Routes currently held.
    pub routes: usize,
    /// Per watched channel, its subscribers.
    pub subscribers: BTreeMap<ChannelId, Vec<SocketAddr>>,
    /// Per watched channel, its upstream (absent: none yet).
    pub upstreams: BTreeMap<ChannelId, Upstream>,
    /// GOP bursts sent to new subscribers.
    pub gop_bursts: u64,
    /// Datagrams sent in GOP bursts (also counted in `video_out`).
    pub gop_burst_datagrams: u64,
    /// GOPs that outgrew the cache bounds (cache emptied until the next keyframe).
    pub gop_overflows: u64,
    /// Bytes currently held by the GOP caches.
    pub gop_bytes_cached: usize,
    /// Datagrams currently held by the GOP caches.
    pub gop_datagrams_cached: usize,
    /// Datagrams flagged `FROM_CACHE` received that were not newer than what we had already
    /// forwarded (a new upstream's burst after a switch), dropped.
    pub gop_behind: u64,
    /// `Nack`s received from subscribers (answered from the retransmission buffer).
    pub nacks_in: u64,
    /// `Nack`s received from peers that are not subscribers of the channel, or while recovery
    /// is disabled (dropped; also counted in `unexpected`).
    pub nacks_ignored: u64,
    /// Seqs requested by those `Nack`s.
    pub nack_seqs_in: u64,
    /// Datagrams retransmitted in answer (also counted in `video_out`).
    pub retransmitted: u64,
    /// `Nack`s sent to our upstreams.
    pub nacks_out: u64,
    /// Seqs in those `Nack`s (a seq NACKed three times counts three).
    pub nack_seqs_out: u64,
    /// Missing seqs from upstream that arrived in time (forwarded; [`Arrival::Recovered`]).
    pub recovered: u64,
    /// Missing seqs given up (deadline passed, or the tracker was reset).
    pub given_up: u64,
    /// Video datagrams from the upstream already received (dropped).
    pub video_duplicates: u64,
    /// Video datagrams from the upstream whose gap was already given up (dropped).
    pub video_too_old: u64,
    /// Seq jumps from the upstream that restarted the tracker and cleared the buffer.
    pub recovery_resets: u64,
    /// Datagrams currently held by the retransmission buffers.
    pub retransmit_datagrams: usize,
    /// Per channel received through two upstreams (`redundancy` 2), its secondary upstream.
    pub secondaries: BTreeMap<ChannelId, SocketAddr>,
    /// Secondary upstreams subscribed.
    pub secondary_subscribes: u64,
    /// Secondaries that became primary (the primary died or a better route goes through it).
    pub promotions: u64,
    /// Datagrams delivered first by the secondary upstream (forwarded; the primary's copy,
    /// if it comes, is a duplicate).
    pub secondary_first: u64,
}

/// What the core tells its driver besides transmits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A server's own channel got its first subscriber (`watched`) or lost its last one.
    LocalDemand {
        /// The channel.
        channel: ChannelId,
        /// Whether someone watches it now.
        watched: bool,
    },
}

/// What the host asks of its relay core ([`RelayCore::handle_command`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Server: the channels this host originates ([`RelayCore::set_local`]).
    SetLocal(Vec<ChannelInfo>),
    /// Server: one chunk of a local channel's MPEG-TS ([`RelayCore::local_video`]).
    LocalVideo {
        /// The channel.
        channel: ChannelId,
        /// Normally 1316 bytes (7 TS packets).
        payload: Bytes,
        /// It starts a keyframe.
        keyframe: bool,
    },
    /// The bootstrapper pushed a new neighbour list ([`RelayCore::set_neighbours`]).
    SetNeighbours(Vec<PathHop>),
    /// The overlay's members and their static keys (from the bootstrapper): who may open a
    /// session with us, and whom we can open one with. Replaces the previous list.
    SetMembers(Vec<(PeerId, PublicKey)>),
}

/// A catastrophic fallback in force for a channel.
#[derive(Debug, Clone)]
struct Fallback {
    /// The flood path (origin first) the parent was taken from.
    path: Vec<PathHop>,
    /// The host we subscribed to.
    parent: PeerId,
}

/// The [`NackTracker`] of one channel from one upstream.
struct Tracked {
    upstream: PeerId,
    srtt: Option<Duration>,
    tracker: NackTracker,
}

/// Everything the core keeps about one channel (its subscribers and primary upstream are in
/// [`Subscriptions`]). Created when the channel is first heard of; the fields of a received
/// channel are emptied when it stops being received.
#[derive(Default)]
struct Channel {
    /// Its name (for listing while routes are gone but video still flows).
    name: Option<String>,
    /// The neighbour of its best route, as last logged.
    best_via: Option<PeerId>,
    /// Next seq of a local channel (servers).
    local_seq: u64,
    /// The catastrophic fallback in force, if any.
    fallback: Option<Fallback>,
    /// Former upstream, accepted until the new one's first datagram.
    previous: Option<PeerId>,
    /// Its upstreams as subscribed: the primary (the node upstream of [`Subscriptions`]) and
    /// the secondary (`redundancy` 2), with their stall timing.
    feed: Feed<PeerId>,
    /// Gap tracking of the current upstream (the address it tracks, the RTT last fed to it).
    /// With `recovery`, or `redundancy` 2 (for the merge).
    tracker: Option<Tracked>,
    /// What we sent recently, to answer NACKs. Only with `recovery`.
    retx: Option<RetransmitBuffer>,
    /// The current GOP, for a new subscriber's instant start.
    gop: Option<GopCache>,
}

/// A peer as logged: its address, or its id when no address is known.
struct At(Option<SocketAddr>, PeerId);

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => write!(f, "{}", self.1),
        }
    }
}

/// One datagram to send (in plaintext runs, a video datagram's fan-out is the same `Bytes`
/// to every subscriber).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The destination.
    pub to: SocketAddr,
    /// The datagram.
    pub bytes: Bytes,
}

/// The relay's decisions: routing, subscriptions, upstream choice and healing, GOP caches,
/// loss recovery, timers, and its [`Link`]. Synchronous and clock-free: fed each event's time
/// by the driver, it queues what to send ([`RelayCore::poll_transmit`]).
pub struct RelayCore {
    pub(crate) me: PathHop,
    pub(crate) cfg: RelayConfig,
    /// The time of the event being handled (given by the driver), so decisions read no clock.
    pub(crate) t: Instant,
    /// Decoding, the reliable channel, and the datagrams to send in order.
    link: Link,
    /// Where each peer is: every other table is keyed by [`PeerId`]; addresses come from
    /// here (pinned for overlay hosts, learned for clients).
    peers: PeerTable,
    pub(crate) routing: RoutingTable,
    subs: Subscriptions,
    origin: FloodOrigin,
    local: Vec<ChannelInfo>,
    /// Per channel heard of, everything we keep about it (see [`Channel`]); its subscribers
    /// and primary upstream are in `subs`.
    channels: Map<ChannelId, Channel>,
    /// Overflows of GOP caches since removed (for the stats).
    gop_overflows_removed: u64,
    link_cost: Map<PeerId, Duration>,
    /// Events for the driver ([`Event`]).
    events: VecDeque<Event>,
    /// Rate limit of `Unsubscribe`s to peers that send unwanted video.
    unwanted: Map<(ChannelId, PeerId), Instant>,
    next_flood: Instant,
    next_ping: Instant,
    next_heartbeat: Instant,
    next_stats: Instant,
    nonce: u64,
    /// Where a local channel's numbering starts (random per process: two replicas of a channel,
    /// or a restarted server, never number alike, so a viewer moved from one to another sees a
    /// new stream, not duplicates of what it played).
    seq_start: u64,
    stats: RelayStats,
    /// A switch of `channel` to `to` that is the promotion of its secondary (read by `apply`).
    promoting: Option<(ChannelId, PeerId)>,
    /// The peers heartbeated every `failure.fast_interval` (every upstream in use).
    fast: Vec<PeerId>,
    next_fast_heartbeat: Instant,
    /// When the periodic checks (`housekeeping`) are next due: the earliest of their
    /// deadlines ([`RelayCore::housekeeping_deadline`]).
    next_housekeeping: Instant,
    /// Scratch list of a fan-out's subscribers.
    fan_out_list: Vec<PeerId>,
}

impl RelayCore {
    /// A core for host `me` with its topology `neighbours`, started at `t`. `seed` is the
    /// driver's randomness (the core draws none of its own, so a simulation can replay it).
    pub fn new(
        me: PathHop,
        neighbours: &[PathHop],
        cfg: RelayConfig,
        t: Instant,
        seed: u64,
    ) -> RelayCore {
        let routing = RoutingTable::new(
            t,
            me,
            neighbours,
            RoutingConfig {
                route_ttl: cfg.route_ttl,
                failure: cfg.failure,
                ..RoutingConfig::default()
            },
        );
        // A random start, so a restarted server is not taken for a duplicate of its old self;
        // 2^32 rounds of headroom before wrapping.
        let mut rng = common::rng::Rng::seeded(seed);
        let first_seq = rng.next_u64() >> 32;
        // The reliable channel's session: a restarted host is told apart from its old self.
        let session = rng.next_u64();
        // 2^40 values: far apart, and 2^24 × 2^40 of headroom before wrapping.
        let seq_start = rng.next_u64() >> 24;
        RelayCore {
            me,
            t,
            link: Link::new(me.id, session, ReliableConfig::default()),
            peers: {
                let mut peers = PeerTable::new();
                for n in neighbours.iter().filter(|n| n.id != me.id) {
                    peers.pin(n.id, n.addr);
                }
                peers
            },
            routing,
            subs: Subscriptions::new(cfg.subscriber_timeout),
            origin: FloodOrigin::new(me, first_seq),
            local: Vec::new(),
            channels: Map::default(),
            gop_overflows_removed: 0,
            link_cost: Map::default(),
            events: VecDeque::new(),
            unwanted: Map::default(),
            next_flood: t,
            next_ping: t,
            next_heartbeat: t,
            next_stats: t + cfg.flood_interval,
            nonce: 0,
            seq_start,
            stats: RelayStats::default(),
            promoting: None,
            fast: Vec::new(),
            next_fast_heartbeat: t,
            next_housekeeping: t,
            fan_out_list: Vec::new(),
            cfg,
        }
    }

    /// The next datagram to send: grouped by destination, each destination's in the order
    /// decided; video is sealed for its subscriber as it is polled (see [`common::link`]), so
    /// a driver can hand the first subscribers' copies to the kernel before the last ones are
    /// sealed.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let (to, bytes) = self.link.poll_transmit()?;
        Some(Transmit { to, bytes })
    }

    /// Feeds one datagram received from `from` at `now`.
    /// The datagram is opened, parsed and (video) forwarded in its own buffer: hand over the
    /// one it was received in.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: impl Into<BytesMut>) {
        self.t = now;
        // With a session layer, only what authenticates comes out (its sender is the
        // authenticated peer); handshakes are answered inside.
        let Some(plain) = self.link.open(now, from, bytes) else {
            self.drain_link();
            return;
        };
        // The sender id is checked against its address before anything is decoded further
        // (a datagram whose header does not decode is counted by the link). An authenticated
        // peer may come from anywhere (its address is only where it is now).
        if let Ok(h) = common::wire::decode_header(&plain) {
            let check = if self.link.is_secure() {
                self.peers.check_authenticated(from, h.sender)
            } else {
                self.peers.check(from, h.sender)
            };
            match check {
                Check::Known | Check::New => {}
                Check::Moved(old) => {
                    // Its state (reliable channel included) is keyed by its id: it follows.
                    debug!(peer = %h.sender, %old, new = %from, "peer moved");
                }
                Check::Replaced(old) => {
                    // A client restarted on the same address with a new id: its former self
                    // is gone.
                    debug!(peer = %from, old = %old, new = %h.sender, "peer replaced");
                    let actions = self.subs.drop_peer(old);
                    self.apply(actions);
                    self.link.forget_peer(old);
                }
                Check::Mismatch => {
                    self.stats.peer_mismatch += 1;
                    if self.stats.peer_mismatch.is_power_of_two() {
                        warn!(%from, sender = %h.sender, count = self.stats.peer_mismatch,
                            "datagram whose sender id does not match its address dropped");
                    }
                    return;
                }
            }
        }
        self.link.handle_plain(now, from, plain);
        self.drain_link();
    }

    /// A peer for the logs: its address when known (what an operator recognises).
    fn at(&self, p: PeerId) -> At {
        At(self.peers.addr(p), p)
    }

    /// Hands what the link decoded (and reliable timeouts) to the decisions; after anything
    /// but video, the periodic checks' deadline is recomputed.
    fn drain_link(&mut self) {
        let mut control = false;
        while let Some(item) = self.link.poll_incoming() {
            control |= !matches!(item, Incoming::Video { .. });
            self.incoming_item(item);
        }
        if control {
            self.refresh_deadline();
        }
    }

    /// The counters of the datagram layer (decoding, reliable channel).
    pub fn link_stats(&self) -> common::link::LinkStats {
        self.link.stats()
    }

    /// This host's id and address.
    pub fn me(&self) -> PathHop {
        self.me
    }

    /// The state of `channel`, created on first use.
    fn ch(&mut self, channel: ChannelId) -> &mut Channel {
        self.channels.entry(channel).or_default()
    }

    /// The state of `channel`, if it was ever heard of.
    fn chan(&self, channel: ChannelId) -> Option<&Channel> {
        self.channels.get(&channel)
    }

    /// Forgets what was sent of `channel` (GOP cache, retransmission buffer): it stopped
    /// flowing, and its sequence numbers may restart.
    fn forget_sent(&mut self, channel: ChannelId) {
        let c = self.ch(channel);
        let gop = c.gop.take();
        c.retx = None;
        if let Some(g) = gop {
            self.gop_overflows_removed += g.overflows();
        }
    }

    /// Carries out what the host asks: the one entry for everything that is neither a datagram
    /// nor a timer.
    pub fn handle_command(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::SetLocal(channels) => self.set_local(now, channels),
            Command::LocalVideo {
                channel,
                payload,
                keyframe,
            } => self.local_video(now, channel, payload, keyframe),
            Command::SetNeighbours(n) => self.set_neighbours(now, n),
            Command::SetMembers(m) => {
                if let Some(s) = self.link.secure_mut() {
                    s.set_members(&m);
                }
            }
        }
        self.drain_link();
    }

    /// This relay with a session layer (see `common::secure`): from now on every datagram is
    /// sealed and must authenticate; members come with [`Command::SetMembers`].
    pub fn with_secure(mut self, secure: common::secure::Secure) -> RelayCore {
        self.link.set_secure(secure);
        self
    }

    /// The bootstrapper pushed a new neighbour list (the topology was edited): a new
    /// neighbour gets our floods and heartbeats from now on (a server floods at once); a
    /// removed one is treated as dead for us: its subscriptions go, the channels it fed move
    /// to another route, and it is watched no more. Channels that do not use a changed link
    /// are not touched.
    pub fn set_neighbours(&mut self, now: Instant, neighbours: Vec<PathHop>) {
        self.t = now;
        let t = self.t;
        let (added, removed) = self.routing.set_neighbours(t, &neighbours);
        if added.is_empty() && removed.is_empty() {
            return;
        }
        info!(
            added = ?added.iter().map(|n| n.addr).collect::<Vec<_>>(),
            removed = ?removed.iter().filter_map(|p| self.peers.addr(*p)).collect::<Vec<_>>(),
            "neighbours changed"
        );
        for n in &neighbours {
            if n.id != self.me.id {
                self.peers.pin(n.id, n.addr);
            }
        }
        for peer in removed {
            self.link_cost.remove(&peer);
            self.peer_dead(t, peer, "link removed from the topology");
            self.peers.unpin(peer);
            self.forget_if_unused(peer);
            if !self.feeding_hosts().contains(&peer) {
                self.routing.unwatch(peer);
            }
        }
        if !added.is_empty() {
            self.next_flood = t;
            self.flood_if_due(t);
        }
        self.reconcile(t);
        self.refresh_deadline();
    }

    // ----- commands from the handle -------------------------------------------------------

    /// Server only: the channels this host originates (see
    /// [`Relay::set_local_channels`](crate::relay::Relay::set_local_channels)).
    pub fn set_local(&mut self, now: Instant, mut channels: Vec<ChannelInfo>) {
        self.t = now;
        channels.sort_by_key(|c| c.id);
        channels.dedup_by_key(|c| c.id);
        if channels.len() > limits::CHANNELS {
            warn!(
                count = channels.len(),
                max = limits::CHANNELS,
                "too many local channels; only the first are announced"
            );
            channels.truncate(limits::CHANNELS);
        }
        for c in &channels {
            self.ch(c.id).name = Some(c.name.clone());
        }
        let ids: Vec<ChannelId> = channels.iter().map(|c| c.id).collect();
        info!(channels = ?channels.iter().map(|c| &c.name).collect::<Vec<_>>(), "local channels");
        let gone: Vec<ChannelId> = self
            .local
            .iter()
            .map(|c| c.id)
            .filter(|id| !ids.contains(id))
            .collect();
        for id in gone {
            self.forget_sent(id);
        }
        self.local = channels;
        let actions = self.subs.set_local(&ids);
        for id in &ids {
            self.ch(*id).fallback = None;
            self.ch(*id).previous = None;
            self.drop_tracker(*id);
        }
        self.apply(actions);
        self.next_flood = self.t;
        self.flood_if_due(self.t);
        self.refresh_deadline();
    }

    /// The counters and subscription state.
    pub fn stats(&self) -> RelayStats {
        let mut s = self.stats.clone();
        s.floods = self.routing.stats();
        s.routes = self.routing.routes().count();
        let gops = || self.channels.values().filter_map(|c| c.gop.as_ref());
        s.gop_overflows = self.gop_overflows_removed + gops().map(GopCache::overflows).sum::<u64>();
        s.gop_bytes_cached = gops().map(GopCache::bytes).sum();
        s.gop_datagrams_cached = gops().map(GopCache::len).sum();
        s.given_up += self
            .channels
            .values()
            .filter_map(|c| c.tracker.as_ref())
            .map(|t| t.tracker.stats().given_up)
            .sum::<u64>();
        s.retransmit_datagrams = self
            .channels
            .values()
            .filter_map(|c| c.retx.as_ref())
            .map(RetransmitBuffer::len)
            .sum();
        s.secondaries = self
            .channels
            .iter()
            .filter_map(|(k, c)| c.feed.secondary().map(|v| (k, v)))
            .filter_map(|(c, s)| Some((*c, self.peers.addr(s.peer)?)))
            .collect();
        for (ch, (subs, up)) in self.subs.snapshot() {
            let subs = subs
                .into_iter()
                .filter_map(|p| self.peers.addr(p))
                .collect();
            s.subscribers.insert(ch, subs);
            if let Some(up) = up {
                s.upstreams.insert(ch, up);
            }
        }
        s
    }

    /// The local channels watched now (a new demand receiver starts from them).
    pub fn demanded_local(&self) -> Vec<ChannelId> {
        self.subs.demanded_local()
    }

    /// The next event for the driver (local demand changes), in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Server only: one chunk of a local channel's MPEG-TS (see
    /// [`Relay::send_local_video`](crate::relay::Relay::send_local_video)).
    pub fn local_video(
        &mut self,
        now: Instant,
        channel: ChannelId,
        payload: Bytes,
        keyframe: bool,
    ) {
        self.t = now;
        self.stats.local_video_in += 1;
        if !self.subs.is_local(channel) {
            self.stats.malformed += 1;
            return;
        }
        let start = self.seq_start;
        let seq = &mut self.ch(channel).local_seq;
        if *seq == 0 {
            *seq = start;
        }
        let packet = VideoPacket {
            channel,
            seq: *seq,
            flags: if keyframe { video_flags::KEYFRAME } else { 0 },
            payload,
        };
        *seq += 1;
        // Encoded even without subscribers (the server only plays watched channels anyway), so
        // the GOP cache is complete when the first one arrives.
        let (seq, keyframe) = (packet.seq, keyframe);
        match Datagram::new(self.me.id, Body::Video(packet)).encode() {
            Ok(bytes) => {
                let t = self.t;
                self.cache(t, channel, seq, keyframe, bytes.clone());
                self.remember(t, channel, seq, &bytes);
                self.fan_out(channel, bytes)
            }
            Err(e) => {
                self.stats.malformed += 1;
                debug!(%channel, error = %e, "local video chunk cannot be encoded; dropped");
            }
        }
    }

    /// Records a datagram about to be sent in the channel's GOP cache.
    fn cache(&mut self, t: Instant, channel: ChannelId, seq: u64, keyframe: bool, bytes: Bytes) {
        let cfg = self.cfg.gop;
        let cache = self
            .ch(channel)
            .gop
            .get_or_insert_with(|| GopCache::new(cfg));
        if cache.push(t, seq, keyframe, bytes) == Pushed::Overflow {
            debug!(%channel, seq, "GOP larger than the cache; not cached until the next keyframe");
        }
    }

    /// Records a datagram about to be sent to the subscribers of `channel` in its
    /// retransmission buffer (with recovery on).
    fn remember(&mut self, t: Instant, channel: ChannelId, seq: u64, bytes: &Bytes) {
        if !self.cfg.recovery {
            return;
        }
        let cfg = self.cfg.retransmit.clone();
        self.ch(channel)
            .retx
            .get_or_insert_with(|| RetransmitBuffer::new(cfg))
            .insert(t, seq, bytes.clone());
    }

    /// Forgets the gap tracking of `channel` (its upstream changed or went away); what it was
    /// still missing counts as given up.
    fn drop_tracker(&mut self, channel: ChannelId) {
        if let Some(mut t) = self.ch(channel).tracker.take() {
            t.tracker.reset();
            self.stats.given_up += t.tracker.stats().given_up;
        }
    }

    /// Classifies a datagram of `channel` from its current upstream `from`; false if it must be
    /// dropped (duplicate, or too late for this hop). Always true without recovery.
    fn track(&mut self, t: Instant, from: PeerId, channel: ChannelId, seq: u64) -> bool {
        if !self.tracking() {
            return true;
        }
        let from_secondary = self
            .chan(channel)
            .is_some_and(|c| c.feed.role(from) == Some(Role::Secondary));
        if !from_secondary
            && self
                .chan(channel)
                .and_then(|c| c.tracker.as_ref())
                .is_some_and(|tr| tr.upstream != from)
        {
            self.drop_tracker(channel);
        }
        let srtt = self.link_cost.get(&from).copied();
        let deadline = self.cfg.recovery_deadline;
        let tr = self.ch(channel).tracker.get_or_insert_with(|| {
            let mut tracker = NackTracker::new(NackConfig {
                deadline,
                ..NackConfig::default()
            });
            if let Some(r) = srtt {
                tracker.set_rtt(r);
            }
            Tracked {
                upstream: from,
                srtt,
                tracker,
            }
        });
        match tr.tracker.on_packet(t, seq) {
            Arrival::New => {
                if from_secondary {
                    self.stats.secondary_first += 1;
                }
                true
            }
            Arrival::Recovered => {
                self.stats.recovered += 1;
                true
            }
            Arrival::Duplicate => {
                self.stats.video_duplicates += 1;
                false
            }
            Arrival::TooOld => {
                self.stats.video_too_old += 1;
                false
            }
            Arrival::Reset => {
                self.stats.recovery_resets += 1;
                if let Some(b) = self.ch(channel).retx.as_mut() {
                    b.clear();
                }
                true
            }
        }
    }

    /// A subscriber's NACK: sends it (only it) what the buffer still holds of `seqs`.
    fn nack(&mut self, t: Instant, from: PeerId, channel: ChannelId, seqs: &[u64]) {
        if !self.cfg.recovery || !self.subs.is_subscriber(from, channel) {
            self.stats.nacks_ignored += 1;
            self.stats.unexpected += 1;
            return;
        }
        self.stats.nacks_in += 1;
        self.stats.nack_seqs_in += seqs.len().min(limits::NACK_SEQS) as u64;
        let Some(buf) = self.ch(channel).retx.as_mut() else {
            return;
        };
        for (_, bytes) in buf.handle_nack(t, from, seqs) {
            self.stats.retransmitted += 1;
            self.stats.video_out += 1;
            // Flagged RETRANSMIT (a copy with one byte changed, no re-encoding) so receivers can
            // count the recovery overhead.
            let bytes = with_video_flag(&bytes, video_flags::RETRANSMIT).unwrap_or(bytes);
            self.out_bytes(from, bytes);
        }
    }

    /// Whether video from upstreams goes through a [`NackTracker`]: for recovery, or to merge
    /// two upstreams (duplicates dropped) even without recovery.
    fn tracking(&self) -> bool {
        self.cfg.recovery || self.cfg.redundancy >= 2
    }

    /// Sends the due NACKs of every channel to its current upstream (unreliably); expires the
    /// retransmission buffers. Without recovery, only expires the trackers' gaps (no NACK).
    fn poll_nacks(&mut self, t: Instant) {
        if !self.tracking() {
            return;
        }
        for b in self.channels.values_mut().filter_map(|c| c.retx.as_mut()) {
            b.expire(t);
        }
        let mut out: Vec<(PeerId, ChannelId, Vec<u64>)> = Vec::new();
        let mut stale = Vec::new();
        for (&ch, tr) in self
            .channels
            .iter_mut()
            .filter_map(|(k, c)| c.tracker.as_mut().map(|v| (k, v)))
        {
            if self.subs.upstream(ch) != Some(Upstream::Node(tr.upstream)) {
                stale.push(ch);
                continue;
            }
            while let Some(seqs) = tr.tracker.poll_nacks(t) {
                out.push((tr.upstream, ch, seqs));
            }
        }
        for ch in stale {
            self.drop_tracker(ch);
        }
        if !self.cfg.recovery {
            return;
        }
        for (up, channel, seqs) in out {
            self.stats.nacks_out += 1;
            self.stats.nack_seqs_out += seqs.len() as u64;
            self.out_unreliable(up, Message::Nack { channel, seqs });
        }
    }

    /// Sends a new subscriber the cached GOP of `channel` (flagged `FROM_CACHE`), if any. Must
    /// be called in the same task turn as the subscription is recorded, before the next live
    /// datagram, so that burst and live are contiguous.
    fn send_burst(&mut self, t: Instant, to: PeerId, channel: ChannelId) {
        let Some(cache) = self.chan(channel).and_then(|c| c.gop.as_ref()) else {
            return;
        };
        let burst: Vec<Bytes> = cache
            .burst(t)
            .filter_map(|b| with_video_flag(b, video_flags::FROM_CACHE))
            .collect();
        if burst.is_empty() {
            return;
        }
        let bytes: usize = burst.iter().map(Bytes::len).sum();
        debug!(%channel, peer = %self.at(to), datagrams = burst.len(), bytes, "gop burst");
        self.stats.gop_bursts += 1;
        self.stats.gop_burst_datagrams += burst.len() as u64;
        for b in burst {
            self.stats.video_out += 1;
            self.out_bytes(to, b);
        }
    }

    /// Sends one encoded video datagram to every subscriber of `channel`.
    fn fan_out(&mut self, channel: ChannelId, bytes: Bytes) {
        // (A list kept between calls: no allocation per datagram.)
        let mut subscribers = std::mem::take(&mut self.fan_out_list);
        subscribers.extend(self.subs.subscribers(channel));
        for &s in &subscribers {
            self.stats.video_out += 1;
            self.out_bytes(s, bytes.clone());
        }
        subscribers.clear();
        self.fan_out_list = subscribers;
    }

    // ----- what the network sends ---------------------------------------------------------

    pub(crate) fn incoming_item(&mut self, item: Incoming) {
        let t = self.t;
        match item {
            Incoming::Message {
                from, sender, msg, ..
            } => {
                self.heard(t, sender);
                self.message(t, from, sender, msg);
            }
            Incoming::Video {
                from,
                sender,
                frame,
            } => {
                self.heard(t, sender);
                self.video(t, from, sender, frame);
            }
            Incoming::Secure(ev) => debug!(?ev, "session layer"),
            Incoming::TimedOut { peer, .. } => {
                if self.routing.is_neighbour(peer) || self.feeding_hosts().contains(&peer) {
                    if self.routing.is_alive(peer) {
                        self.routing.mark_dead(peer);
                        self.peer_dead(t, peer, "reliable message timed out");
                    }
                } else {
                    // A client or non-neighbour subscriber that stopped acknowledging.
                    let actions = self.subs.drop_peer(peer);
                    self.apply(actions);
                    self.out_forget(peer);
                    self.forget_if_unused(peer);
                }
            }
        }
    }

    /// Liveness and soft-state refresh for any datagram from `from`.
    fn heard(&mut self, t: Instant, from: PeerId) {
        self.subs.touch(t, from);
        if self.routing.heard_from(t, from) {
            info!(peer = %self.at(from), "neighbour up");
            self.reconcile(t);
        }
    }

    /// A control message from peer `sender`, whose datagram came from `addr` (where answers
    /// that keep no state go).
    fn message(&mut self, t: Instant, addr: SocketAddr, from: PeerId, msg: Message) {
        match msg {
            Message::Flood(flood) => self.flood(t, from, flood),
            Message::Subscribe { channel } => {
                self.peers.learn(from, addr);
                let fresh = !self.subs.is_subscriber(from, channel);
                let hint = if self.subs.upstream(channel).is_none() {
                    self.choose(channel, &[from]).map(|r| r.via)
                } else {
                    None
                };
                match self.subs.subscribe(t, from, channel, hint) {
                    Ok(actions) => {
                        if fresh {
                            info!(%channel, peer = %self.at(from), "subscriber added");
                            self.send_burst(t, from, channel);
                        }
                        self.apply(actions);
                        if self.subs.upstream(channel).is_none() {
                            self.reconcile(t);
                        }
                    }
                    Err(e) => {
                        self.stats.subscribes_refused += 1;
                        debug!(%channel, peer = %addr, error = %e, "subscribe refused");
                        self.forget_if_unused(from);
                    }
                }
            }
            Message::Unsubscribe { channel }
                if self.subs.upstream(channel) == Some(Upstream::Node(from))
                    || self.chan(channel).is_some_and(|c| c.feed.has(from)) =>
            {
                // Our upstream cannot feed the channel any more (it lost every route to it):
                // its routes to it are withdrawn and the channel moves elsewhere.
                self.routing.withdraw(channel, from);
                if self
                    .chan(channel)
                    .and_then(|c| c.feed.secondary())
                    .map(|s| s.peer)
                    == Some(from)
                {
                    self.drop_secondary(channel, "it has no route");
                } else {
                    self.stats.upstream_losses += 1;
                    warn!(%channel, upstream = %self.at(from), reason = "it has no route",
                        "upstream lost");
                    self.ch(channel).previous = None;
                    self.heal(t, channel, from);
                }
            }
            Message::Unsubscribe { channel } => {
                if self.subs.is_subscriber(from, channel) {
                    info!(%channel, peer = %addr, "subscriber removed");
                }
                let actions = self.subs.unsubscribe(from, channel);
                self.apply(actions);
                self.forget_if_unused(from);
            }
            Message::ListChannels => self.list_channels(from, addr),
            Message::Ping { nonce } => {
                // A neighbour we heartbeat ourselves hears from us every heartbeat interval
                // anyway: no pong (half the control traffic of an idle link). Everyone else
                // gets one: clients, non-neighbour peers, and our subscribers, which may
                // heartbeat us faster than we them (we are their feed).
                if !self.routing.is_neighbour(from) || self.subs.is_peer(from) {
                    self.reply(from, addr, Message::Pong { nonce });
                }
            }
            Message::Pong { .. } => {}
            Message::Goodbye => {
                debug!(peer = %addr, "goodbye");
                let actions = self.subs.drop_peer(from);
                self.apply(actions);
                if (self.routing.is_neighbour(from) || self.feeding_hosts().contains(&from))
                    && self.routing.is_alive(from)
                {
                    self.routing.mark_dead(from);
                    self.peer_dead(t, from, "goodbye");
                }
                self.forget_if_unused(from);
            }
            Message::Nack { channel, seqs } => self.nack(t, from, channel, &seqs),
            Message::Channels { .. } => self.stats.unexpected += 1,
        }
    }

    fn flood(&mut self, t: Instant, from: PeerId, flood: Flood) {
        if !self.routing.is_neighbour(from) {
            self.stats.malformed += 1;
            return;
        }
        let cost = self
            .link_cost
            .get(&from)
            .copied()
            .unwrap_or(DEFAULT_LINK_COST);
        let verdict = self.routing.handle_flood(t, from, &flood, cost);
        if let Some(fwd) = verdict.forward {
            match Datagram::new(self.me.id, Body::Unreliable(Message::Flood(fwd))).encode() {
                Ok(bytes) => {
                    for to in verdict.to {
                        self.out_bytes(to, bytes.clone());
                    }
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    debug!(error = %e, "flood cannot be forwarded (too large)");
                }
            }
        }
        let mut changed = false;
        for info in &flood.channels {
            let c = self.ch(info.id);
            if c.name.is_none() {
                c.name = Some(info.name.clone());
            }
            if let Some(best) = self.routing.best_route(info.id, &[]) {
                match self.ch(info.id).best_via.replace(best.via) {
                    None => info!(channel = %info.id, name = %info.name, via = %self.at(best.via),
                        cost_us = best.cost_us, hops = best.hops, "channel available"),
                    // Equal-cost paths trade places as RTTs wobble: that changes nothing we do
                    // unless the channel is watched (then `reconcile` decides, with
                    // hysteresis, and logs a move as "resubscribed").
                    Some(old) if old != best.via => {
                        debug!(channel = %info.id, name = %info.name, via = %self.at(best.via),
                            cost_us = best.cost_us, hops = best.hops, "best route changed");
                        changed |= self.subs.is_watched(info.id);
                    }
                    Some(_) => {}
                }
            }
        }
        if changed || flood.channels.iter().any(|c| self.needs_upstream(c.id)) {
            self.reconcile(t);
        }
    }

    fn needs_upstream(&self, channel: ChannelId) -> bool {
        self.subs.is_watched(channel) && self.subs.upstream(channel).is_none()
    }

    fn list_channels(&mut self, peer: PeerId, to: SocketAddr) {
        let mut all: BTreeMap<ChannelId, String> = BTreeMap::new();
        for c in &self.local {
            all.insert(c.id, c.name.clone());
        }
        for c in self.routing.channels() {
            all.entry(c.id).or_insert(c.name);
        }
        // Channels still flowing to us (e.g. through a fallback) while their routes are gone.
        for (ch, _) in self.subs.snapshot() {
            if let Some(name) = self.chan(ch).and_then(|c| c.name.as_ref()) {
                all.entry(ch).or_insert_with(|| name.clone());
            }
        }
        let list: Vec<ChannelInfo> = all
            .into_iter()
            .map(|(id, name)| ChannelInfo { id, name })
            .collect();
        let pages: Vec<&[ChannelInfo]> = if list.is_empty() {
            vec![&[]]
        } else {
            list.chunks(limits::CHANNELS).collect()
        };
        let n = u16::try_from(pages.len()).unwrap_or(u16::MAX);
        for (i, page) in pages.into_iter().enumerate().take(n as usize) {
            let msg = Message::Channels {
                page: i as u16,
                pages: n,
                channels: page.to_vec(),
            };
            self.reply(peer, to, msg);
        }
    }

    /// A video datagram from peer `from`, whose datagram came from `addr`.
    fn video(&mut self, t: Instant, addr: SocketAddr, from: PeerId, frame: VideoFrame) {
        self.stats.video_in += 1;
        let ch = frame.channel();
        let accepted = match self.subs.upstream(ch) {
            Some(Upstream::Node(u)) if u == from => {
                self.ch(ch).previous = None;
                true
            }
            Some(Upstream::Node(_)) => self.chan(ch).is_some_and(|c| {
                c.previous == Some(from) || c.feed.role(from) == Some(Role::Secondary)
            }),
            _ => false,
        };
        if !accepted {
            self.stats.video_not_upstream += 1;
            // Tell a sender that feeds us for nothing to stop (rate-limited), unless it is a
            // transition in progress.
            if !self.subs.is_watched(ch) || self.subs.is_local(ch) {
                let due = self
                    .unwanted
                    .get(&(ch, from))
                    .is_none_or(|l| t.saturating_duration_since(*l) >= Duration::from_secs(1));
                if due {
                    if self.unwanted.len() > 1024 {
                        self.unwanted.clear();
                    }
                    self.unwanted.insert((ch, from), t);
                    self.reply(from, addr, Message::Unsubscribe { channel: ch });
                }
            }
            return;
        }
        // (The merge is the tracker's; the feed's numbering check is the client's concern.)
        let from_secondary = self
            .ch(ch)
            .feed
            .on_video(t, from, frame.seq())
            .map(|v| v.role)
            == Some(Role::Secondary);
        if frame.flags() & video_flags::FROM_CACHE != 0
            && self
                .chan(ch)
                .and_then(|c| c.gop.as_ref())
                .is_some_and(|g| g.is_behind(frame.seq()))
        {
            // A new upstream's burst overlapping what we already forwarded.
            self.stats.gop_behind += 1;
            return;
        }
        let (seq, keyframe) = (frame.seq(), frame.flags() & video_flags::KEYFRAME != 0);
        // Gap tracking of the current upstream only (the former one's last datagrams during a
        // switch are forwarded as before).
        let tracked = from_secondary || self.subs.upstream(ch) == Some(Upstream::Node(from));
        if tracked && !self.track(t, from, ch, seq) {
            return;
        }
        // Forwarded in the buffer it arrived in, our id written into its header: the payload
        // is neither copied nor re-encoded (only sealed per subscriber).
        let bytes = frame.restamp(self.me.id);
        self.cache(t, ch, seq, keyframe, bytes.clone());
        self.remember(t, ch, seq, &bytes);
        self.fan_out(ch, bytes)
    }

    // ----- subscriptions, upstream choice, healing ------------------------------------------

    /// Carries out subscription actions.
    fn apply(&mut self, actions: Vec<SubAction>) {
        let t = self.t;
        for a in actions {
            match a {
                SubAction::Subscribe(channel, up) if self.promoting == Some((channel, up)) => {
                    // The secondary became primary (in `switch`): same origin, same seqs,
                    // already flowing; the merge goes on (no new Subscribe, the tracker keeps
                    // its state).
                    self.promoting = None;
                    info!(%channel, upstream = %self.at(up), "subscribe upstream");
                    let srtt = self.link_cost.get(&up).copied();
                    if let Some(tr) = self.ch(channel).tracker.as_mut() {
                        tr.upstream = up;
                        if let Some(r) = srtt {
                            tr.srtt = Some(r);
                            tr.tracker.set_rtt(r);
                        }
                    }
                }
                SubAction::Subscribe(channel, up) => {
                    info!(%channel, upstream = %self.at(up), "subscribe upstream");
                    // A new upstream (maybe another replica, another seq space).
                    self.drop_tracker(channel);
                    self.ch(channel).feed.set_primary(up, t);
                    if !self.routing.is_neighbour(up) {
                        self.routing.watch(t, up);
                    }
                    self.out_reliable(up, Message::Subscribe { channel });
                }
                SubAction::Unsubscribe(channel, up) => {
                    info!(%channel, upstream = %self.at(up), "unsubscribe upstream");
                    if !self.subs.is_watched(channel) {
                        self.forget_sent(channel);
                    }
                    if self.subs.upstream(channel).is_none() {
                        self.drop_tracker(channel);
                        self.drop_secondary(channel, "channel not received");
                        self.ch(channel).fallback = None;
                        self.ch(channel).previous = None;
                        self.ch(channel).feed.clear();
                    }
                    if self.routing.is_alive(up) {
                        self.out_reliable(up, Message::Unsubscribe { channel });
                    }
                }
                SubAction::LocalDemand(channel, watched) => {
                    info!(%channel, watched, "local demand");
                    if !watched {
                        self.forget_sent(channel);
                    }
                    self.events
                        .push_back(Event::LocalDemand { channel, watched });
                }
            }
        }
        self.unwatch_unused(t);
    }

    /// Every host that feeds us a channel: primary and secondary upstreams.
    fn feeding_hosts(&self) -> BTreeSet<PeerId> {
        let mut ups = self.subs.upstream_hosts();
        ups.extend(
            self.channels
                .values()
                .filter_map(|c| c.feed.secondary())
                .map(|s| s.peer),
        );
        ups
    }

    /// Stops watching non-neighbour hosts that are no longer upstream of anything; makes the
    /// feeding hosts (and only them) fast peers of the failure detector.
    fn unwatch_unused(&mut self, t: Instant) {
        let ups = self.feeding_hosts();
        for a in self.routing.watched_non_neighbours() {
            if !ups.contains(&a) {
                self.routing.unwatch(a);
            }
        }
        self.fast = self.routing.set_fast_peers(t, &ups);
    }

    /// Drops the secondary upstream of `channel`, if any (`Unsubscribe` if it is alive).
    fn drop_secondary(&mut self, channel: ChannelId, reason: &str) {
        let Some(s) = self.ch(channel).feed.clear_secondary() else {
            return;
        };
        info!(%channel, upstream = %self.at(s.peer), reason, "unsubscribe secondary");
        if self.routing.is_alive(s.peer) {
            self.out_reliable(s.peer, Message::Unsubscribe { channel });
        }
        self.unwatch_unused(self.t);
    }

    /// The best route for a secondary upstream of `channel` whose primary is `primary`: same
    /// origin (same seqs), another neighbour, not a subscriber; a path sharing no relay with the
    /// primary's is preferred (then cost). `None` if there is no such route.
    fn choose_secondary(
        &self,
        t: Instant,
        channel: ChannelId,
        primary: PeerId,
    ) -> Option<(crate::routing::Route, bool)> {
        let prim = self.routing.route_via(channel, primary)?;
        choice::secondary(&prim, self.routing.routes(), self.me.id, |r| {
            !self.subs.is_subscriber(r.via, channel) && self.routing.is_usable(t, r.via)
        })
    }

    /// With `redundancy` 2: gives every received channel with a primary upstream (not a
    /// fallback) a live secondary, and drops secondaries that no longer qualify.
    fn reconcile_secondaries(&mut self, t: Instant) {
        if self.cfg.redundancy < 2 {
            return;
        }
        let mut chans: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(_, c)| c.feed.secondary().is_some())
            .map(|(k, _)| k)
            .copied()
            .collect();
        chans.extend(self.subs.wanted());
        chans.sort();
        chans.dedup();
        for ch in chans {
            let primary = match self.subs.upstream(ch) {
                Some(Upstream::Node(p)) if self.chan(ch).is_none_or(|c| c.fallback.is_none()) => {
                    Some(p)
                }
                _ => None,
            };
            let Some(primary) = primary.filter(|_| self.subs.is_watched(ch)) else {
                self.drop_secondary(ch, "no primary");
                continue;
            };
            if let Some(s) = self
                .chan(ch)
                .and_then(|c| c.feed.secondary())
                .map(|s| s.peer)
            {
                let keep = s != primary
                    && self.routing.is_alive(s)
                    && !self.subs.is_subscriber(s, ch)
                    && self.routing.route_via(ch, s).is_some();
                if keep {
                    continue;
                }
                self.drop_secondary(ch, "no longer a way to the channel");
            }
            let Some((route, disjoint)) = self.choose_secondary(t, ch, primary) else {
                continue;
            };
            info!(channel = %ch, upstream = %self.at(route.via), disjoint, cost_us = route.cost_us,
                "subscribe secondary");
            self.stats.secondary_subscribes += 1;
            self.ch(ch).feed.set_secondary(route.via, t);
            self.unwatch_unused(t);
            self.out_reliable(route.via, Message::Subscribe { channel: ch });
        }
    }

    /// The best route for `channel`, never through one of its subscribers (that would be a
    /// loop) nor through `exclude`.
    fn choose(&self, channel: ChannelId, exclude: &[PeerId]) -> Option<crate::routing::Route> {
        let mut ex: Vec<PeerId> = self.subs.subscribers(channel).collect();
        ex.extend_from_slice(exclude);
        self.routing.best_usable_route(self.t, channel, &ex)
    }

    /// Moves `channel` to `to` (from its current upstream).
    fn switch(&mut self, channel: ChannelId, to: PeerId, cost_us: u64, reason: &str) {
        let from = match self.subs.upstream(channel) {
            Some(Upstream::Node(u)) => Some(u),
            _ => None,
        };
        if from == Some(to) {
            return;
        }
        let mut actions = self.subs.set_upstream(channel, Some(to));
        let mut swapped = false;
        if self
            .chan(channel)
            .is_some_and(|c| c.feed.role(to) == Some(Role::Secondary))
        {
            self.stats.promotions += 1;
            self.promoting = Some((channel, to));
            // A live former primary stays on as the secondary (the two swap roles).
            let keep = from.filter(|f| self.routing.is_alive(*f));
            if let Some(f) = keep {
                actions.retain(|a| *a != SubAction::Unsubscribe(channel, f));
                swapped = true;
            }
            self.ch(channel).feed.promote(keep.is_some());
        }
        if let Some(f) = from {
            info!(%channel, from = %self.at(f), to = %self.at(to), cost_us, reason, "resubscribed");
            self.stats.resubscriptions += 1;
            if !swapped && self.routing.is_alive(f) {
                self.ch(channel).previous = Some(f);
            }
        }
        self.ch(channel).fallback = None;
        self.apply(actions);
    }

    /// A watched peer died: every channel it fed moves elsewhere; its subscriptions go.
    fn peer_dead(&mut self, t: Instant, peer: PeerId, reason: &str) {
        info!(peer = %self.at(peer), reason, "neighbour down");
        self.out_forget(peer);
        let actions = self.subs.drop_peer(peer);
        self.apply(actions);
        let lost_secondaries: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(_, c)| c.feed.role(peer) == Some(Role::Secondary))
            .map(|(id, _)| *id)
            .collect();
        for ch in lost_secondaries {
            warn!(channel = %ch, upstream = %self.at(peer), reason, "secondary lost");
            self.ch(ch).feed.clear_secondary();
        }
        self.unwatch_unused(t);
        for ch in self.subs.fed_by(peer) {
            self.stats.upstream_losses += 1;
            warn!(channel = %ch, upstream = %self.at(peer), reason, "upstream lost");
            self.ch(ch).previous = None;
            self.heal(t, ch, peer);
        }
    }

    /// Finds a new upstream for `channel`, whose upstream `dead` died.
    fn heal(&mut self, t: Instant, channel: ChannelId, dead: PeerId) {
        if let Some(s) = self
            .chan(channel)
            .and_then(|c| c.feed.secondary())
            .map(|s| s.peer)
        {
            if s != dead && self.routing.is_alive(s) {
                let cost = self.routing.route_via(channel, s).map_or(0, |r| r.cost_us);
                self.switch(channel, s, cost, "secondary promoted");
                return;
            }
        }
        if let Some(r) = self.choose(channel, &[dead]) {
            self.switch(channel, r.via, r.cost_us, "upstream lost");
            return;
        }
        // Catastrophic: no neighbour has a route. Go to the dead node's own upstream, taken
        // from the last flood path seen through it (or, if the dead one was itself a fallback
        // parent, from the path that fallback came from).
        let path = match self.chan(channel).and_then(|c| c.fallback.as_ref()) {
            Some(fb) if fb.parent == dead => Some(fb.path.clone()),
            _ => self.routing.upstream_of(dead, channel),
        };
        let parent = path.as_ref().and_then(|path| {
            choice::fallback_parent(path, dead, self.me, |a| self.routing.is_alive(a))
        });
        match (parent, path) {
            (Some(p), Some(path)) => {
                warn!(%channel, dead = %self.at(dead), parent = %p.addr, "catastrophic fallback");
                self.stats.fallbacks += 1;
                // An overlay host named on a flood path: its address is what the path says.
                if !self.routing.is_neighbour(p.id) {
                    self.peers.pin(p.id, p.addr);
                }
                self.routing.watch(t, p.id);
                let actions = self.subs.set_upstream(channel, Some(p.id));
                self.ch(channel).fallback = Some(Fallback { path, parent: p.id });
                self.apply(actions);
            }
            _ => {
                warn!(%channel, dead = %self.at(dead), "no route");
                let actions = self.subs.set_upstream(channel, None);
                self.ch(channel).fallback = None;
                self.apply(actions);
                // Our relay subscribers are told we cannot feed them, so they move at once
                // rather than when their routes through us expire (viewers stay subscribed:
                // they get the channel again as soon as a route comes back).
                let subs: Vec<PeerId> = self
                    .subs
                    .subscribers(channel)
                    .filter(|s| self.routing.is_neighbour(*s))
                    .collect();
                for sub in subs {
                    info!(%channel, peer = %self.at(sub), "subscriber dropped: no route");
                    self.out_reliable(sub, Message::Unsubscribe { channel });
                    let actions = self.subs.unsubscribe(sub, channel);
                    self.apply(actions);
                }
            }
        }
    }

    /// Makes every watched channel's upstream match the routes: a channel without upstream
    /// gets the best route; a fallback gives way to a normal route as soon as one exists; a
    /// working upstream gives way to a clearly better route (or to any route if its own route
    /// is gone).
    fn reconcile(&mut self, t: Instant) {
        for ch in self.subs.wanted() {
            let best = self.choose(ch, &[]);
            match self.subs.upstream(ch) {
                Some(Upstream::Local) => {}
                None => {
                    if let Some(b) = best {
                        self.switch(ch, b.via, b.cost_us, "route found");
                    }
                }
                Some(Upstream::Node(u)) => {
                    if !self.routing.is_alive(u) {
                        self.heal(t, ch, u);
                        continue;
                    }
                    let Some(b) = best else { continue };
                    if b.via == u {
                        continue;
                    }
                    if self.chan(ch).is_some_and(|c| c.fallback.is_some()) {
                        self.switch(ch, b.via, b.cost_us, "normal route back");
                        continue;
                    }
                    match self.routing.route_via(ch, u) {
                        None => self.switch(ch, b.via, b.cost_us, "route via upstream gone"),
                        Some(cur) => {
                            let h = choice::Hysteresis {
                                switch_percent: self.cfg.switch_percent,
                                min_gain: self.cfg.switch_min_gain,
                            };
                            if let Some(why) = choice::should_move(&cur, &b, h) {
                                self.switch(ch, b.via, b.cost_us, why.reason());
                            }
                        }
                    }
                }
            }
        }
    }

    // ----- timers -------------------------------------------------------------------------

    /// When the driver must call [`handle_timeout`](Self::handle_timeout) next: the earliest
    /// real deadline, the periodic checks' ([`housekeeping_deadline`](Self::housekeeping_deadline))
    /// or, sooner, a NACK due from a channel's [`NackTracker`] or a retransmission of the
    /// reliable channel. There is no fixed tick.
    pub fn poll_timeout(&self) -> Instant {
        self.channels
            .values()
            .filter_map(|c| c.tracker.as_ref()?.tracker.poll_timeout())
            .chain(self.link.poll_timeout())
            .fold(self.next_housekeeping, Instant::min)
    }

    /// The earliest deadline of the periodic checks: our next flood (servers), heartbeat
    /// round, fast heartbeat (upstreams in use), a peer's death if it stays silent, a route's
    /// or a subscriber's expiry, the end of a hold-down, a stalled upstream's resubscription,
    /// the flood statistics line. In the past if one of them is overdue.
    fn housekeeping_deadline(&self) -> Instant {
        let t = self.t;
        [
            Some(self.next_stats),
            Some(self.next_heartbeat),
            (!self.local.is_empty()).then_some(self.next_flood),
            (!self.fast.is_empty()).then_some(self.next_fast_heartbeat),
            self.routing.poll_timeout(),
            self.routing.next_expiry(),
            self.routing.next_hold_down_end(t),
            self.subs.next_expiry(),
            self.next_stall(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next_heartbeat)
    }

    /// Recomputes when the periodic checks are due, after an event that may have brought a
    /// deadline closer (a control message, a timeout, a command). Video does not.
    fn refresh_deadline(&mut self) {
        self.next_housekeeping = self.housekeeping_deadline();
    }

    /// Timers due at `now`: the reliable channel's retransmissions, the periodic checks if
    /// their time has come, NACKs in any case.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.t = now;
        self.link.handle_timeout(now);
        self.drain_link();
        if self.t >= self.next_housekeeping {
            self.housekeeping();
            // Every deadline the checks handle lies ahead now; the floor only guards against
            // a check that would stay overdue (which would make the driver spin).
            let next = self.housekeeping_deadline();
            debug_assert!(next > self.t, "a periodic check stayed overdue");
            self.next_housekeeping = next.max(self.t + Duration::from_millis(1));
        } else {
            let t = self.t;
            self.poll_nacks(t);
        }
    }

    fn housekeeping(&mut self) {
        let t = self.t;
        self.routing.set_load(self.subs.load());
        self.routing.expire(t);
        for peer in self.routing.poll_dead(t) {
            self.peer_dead(t, peer, "silent");
        }
        let expired = self.subs.expire(t);
        for (channel, peer) in &expired.dropped {
            info!(%channel, peer = %self.at(*peer), "subscriber expired");
        }
        self.apply(expired.actions);
        for (_, peer) in expired.dropped {
            self.forget_if_unused(peer);
        }
        self.flood_if_due(t);
        if t >= self.next_heartbeat {
            self.next_heartbeat = t + self.cfg.failure.heartbeat_interval;
            let reliable = t >= self.next_ping;
            if reliable {
                self.next_ping = t + self.cfg.ping_interval;
            }
            self.ping(t, reliable);
        } else if t >= self.next_fast_heartbeat {
            self.fast_heartbeats();
        }
        if t >= self.next_fast_heartbeat {
            self.next_fast_heartbeat = t + self.cfg.failure.fast_interval;
        }
        self.reconcile(t);
        self.reconcile_secondaries(t);
        self.resubscribe_stalled(t);
        self.poll_nacks(t);
        if t >= self.next_stats {
            self.next_stats = t + self.cfg.flood_interval;
            let s = self.routing.stats();
            debug!(
                received = s.received,
                forwarded = s.forwarded,
                messages_out = s.messages_out,
                suppressed = s.suppressed,
                loops = s.loops,
                originated = self.stats.floods_originated,
                routes = self.routing.routes().count(),
                "flood_stats"
            );
        }
    }

    fn flood_if_due(&mut self, t: Instant) {
        if self.local.is_empty() || t < self.next_flood {
            return;
        }
        self.next_flood = t + self.cfg.flood_interval;
        let flood = self.origin.next_flood(&self.local, self.subs.load());
        match Datagram::new(self.me.id, Body::Unreliable(Message::Flood(flood))).encode() {
            Ok(bytes) => {
                self.stats.floods_originated += 1;
                let to: Vec<PeerId> = self.routing.neighbours().iter().map(|n| n.id).collect();
                for n in to {
                    self.out_bytes(n, bytes.clone());
                }
            }
            Err(e) => {
                self.stats.malformed += 1;
                warn!(error = %e, "flood too large to send; shorten channel names");
            }
        }
    }

    /// Heartbeats: pings neighbours and every upstream that is not a neighbour (the pings also
    /// keep our subscriptions there alive). Unreliable, except on `reliable` rounds where live
    /// peers get a reliable ping whose ack feeds the RTT estimate; then the cached link costs
    /// and the liveness timeouts are refreshed from it. Dead peers get unreliable pings, to
    /// notice a return.
    fn ping(&mut self, _t: Instant, reliable: bool) {
        let mut targets: Vec<PeerId> = self.routing.neighbours().iter().map(|n| n.id).collect();
        for u in self.feeding_hosts() {
            if !targets.contains(&u) {
                targets.push(u);
            }
        }
        for p in targets {
            self.nonce = self.nonce.wrapping_add(1);
            let msg = Message::Ping { nonce: self.nonce };
            if !reliable {
                self.out_unreliable(p, msg);
                continue;
            }
            if self.routing.is_alive(p) {
                self.out_reliable(p, msg);
            } else {
                self.out_unreliable(p, msg);
            }
            if let Some(r) = self.link.rtt(p) {
                self.rtt_sample(p, r.srtt, r.rttvar);
            }
        }
    }

    /// A new RTT estimate of the link to `p` (from the reliable channel): link cost, liveness
    /// timeout, and the NACK timing of the channels it feeds.
    fn rtt_sample(&mut self, p: PeerId, srtt: Duration, rttvar: Duration) {
        self.link_cost.insert(p, srtt.max(Duration::from_micros(1)));
        self.routing.rtt_sample(p, srtt, rttvar);
        for tr in self
            .channels
            .values_mut()
            .filter_map(|c| c.tracker.as_mut())
        {
            if tr.upstream == p && tr.srtt != Some(srtt) {
                tr.srtt = Some(srtt);
                tr.tracker.set_rtt(srtt);
            }
        }
    }

    // ----- what goes out (sent by the driver, in order, after each event) ------------------

    // Every send to a peer goes to its address in the peer table; a peer without one (never
    // happens for a peer we keep state about) is skipped and counted.

    /// The address of `to`, or `None` (counted) if none is known.
    fn addr_of(&mut self, to: PeerId) -> Option<SocketAddr> {
        let a = self.peers.addr(to);
        if a.is_none() {
            self.stats.no_address += 1;
            debug!(peer = %to, "no address known for the peer; not sent");
        }
        a
    }

    fn out_bytes(&mut self, to: PeerId, bytes: Bytes) {
        if let Some(a) = self.addr_of(to) {
            self.link.send_bytes(self.t, to, a, bytes);
        }
    }

    fn out_reliable(&mut self, to: PeerId, msg: Message) {
        let Some(a) = self.addr_of(to) else {
            return;
        };
        if let Err(e) = self.link.send_reliable(self.t, to, a, msg) {
            self.stats.malformed += 1;
            debug!(peer = %a, error = %e, "message cannot be encoded; not sent");
        }
    }

    fn out_unreliable(&mut self, to: PeerId, msg: Message) {
        if let Some(a) = self.addr_of(to) {
            self.reply(to, a, msg);
        }
    }

    /// Sends `msg` once to an address (answers that keep no state: pongs, channel lists).
    fn reply(&mut self, peer: PeerId, to: SocketAddr, msg: Message) {
        if let Err(e) = self.link.send_unreliable(self.t, peer, to, msg) {
            self.stats.malformed += 1;
            debug!(peer = %to, error = %e, "message cannot be encoded; not sent");
        }
    }

    fn out_forget(&mut self, peer: PeerId) {
        self.link.forget_peer(peer);
    }

    /// Forgets the address of a peer we keep no state about any more (not for overlay hosts
    /// of the topology, whose addresses are pinned).
    fn forget_if_unused(&mut self, peer: PeerId) {
        if !self.subs.is_peer(peer)
            && !self.feeding_hosts().contains(&peer)
            && !self.routing.is_neighbour(peer)
        {
            self.peers.forget(peer);
        }
    }

    /// The heartbeats of fast peers (every upstream in use) between two ordinary rounds:
    /// unreliable pings every `failure.fast_interval`, whose pongs keep them alive (see
    /// `common::failure`, "Fast peers"). Dead ones are left to the ordinary rounds.
    fn fast_heartbeats(&mut self) {
        let t = self.t;
        // Half an interval: the pong to our last ping, a round trip after it, is no proof.
        let quiet = self.cfg.failure.fast_interval / 2;
        for p in self.fast.clone() {
            if !self.routing.is_alive(p) {
                continue;
            }
            // A feed that sent something within the interval (video, as it does tens to
            // hundreds of times a second) proves itself: no heartbeat, and no pong to wake us.
            // The heartbeats resume as soon as it falls silent, so a dead feed is still found
            // `fast_k` intervals after its last datagram.
            if self
                .routing
                .last_heard(p)
                .is_some_and(|h| t.saturating_duration_since(h) < quiet)
            {
                continue;
            }
            self.nonce = self.nonce.wrapping_add(1);
            self.out_unreliable(p, Message::Ping { nonce: self.nonce });
        }
    }

    /// When an upstream in use (primary or secondary) that stays silent is next sent
    /// `Subscribe` again ([`resubscribe_stalled`](Self::resubscribe_stalled)).
    fn next_stall(&self) -> Option<Instant> {
        let after = self.cfg.resubscribe_after;
        self.channels
            .values()
            .filter_map(|c| c.feed.next_stall(after, |p| self.routing.is_alive(p)))
            .min()
    }

    /// Re-sends `Subscribe` to an upstream that has sent nothing of a channel for a while.
    fn resubscribe_stalled(&mut self, t: Instant) {
        let after = self.cfg.resubscribe_after;
        let routing = &self.routing;
        let mut stalled = Vec::new();
        for (ch, c) in self.channels.iter_mut() {
            for u in c.feed.poll_stalled(t, after, |p| routing.is_alive(p)) {
                stalled.push((*ch, u));
            }
        }
        for (channel, u) in stalled {
            debug!(%channel, upstream = %self.at(u), "no video lately; subscribe again");
            self.out_reliable(u, Message::Subscribe { channel });
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core driven directly with a fake clock: no socket, no runtime, no sleeping.
    use super::*;
    use crate::routing::FloodOrigin;
    use std::collections::HashMap;

    use crate::testutil::hop;

    fn chan() -> ChannelInfo {
        ChannelInfo {
            id: ChannelId::of_name("live"),
            name: "live".into(),
        }
    }

    /// A relay `me` = 4 between a server 1 (through neighbours 2 and 3) and a client. The
    /// neighbours and the client are played by [`Link`]s: what the core sends them is
    /// delivered (acks come back at once) while they are `answering`.
    struct Bench {
        core: RelayCore,
        t: Instant,
        origin: FloodOrigin,
        client: SocketAddr,
        peers: HashMap<SocketAddr, Link>,
        /// Neighbours (2, 3) that receive and answer; the client always does.
        answering: Vec<u8>,
        /// Everything the core sent since the last [`sent`](Self::sent), decoded.
        log: Vec<(SocketAddr, Datagram)>,
    }

    impl Bench {
        fn new() -> Bench {
            let t = Instant::now();
            let core = RelayCore::new(hop(4), &[hop(2), hop(3)], RelayConfig::default(), t, 7);
            let client = SocketAddr::from(([127, 0, 0, 20], 5000));
            let mut peers = HashMap::new();
            for (id, addr) in [(2, hop(2).addr), (3, hop(3).addr), (99, client)] {
                peers.insert(
                    addr,
                    Link::new(common::NodeId(id), id, ReliableConfig::default()),
                );
            }
            Bench {
                core,
                t,
                origin: FloodOrigin::new(hop(1), 1),
                client,
                peers,
                answering: vec![2, 3],
                log: Vec::new(),
            }
        }

        /// Moves what the core sent to the answering peers and their acks back, at `self.t`;
        /// a datagram to a peer is lost with probability `loss`.
        fn pump(&mut self, loss: f64, rng: &mut common::rng::Rng) {
            let t = self.t;
            while let Some(tx) = self.core.poll_transmit() {
                let d = Datagram::decode(&tx.bytes).expect("the core sends valid datagrams");
                for to in [tx.to] {
                    self.log.push((to, d.clone()));
                    let answers =
                        to == self.client || self.answering.iter().any(|n| hop(*n).addr == to);
                    if !answers || rng.chance(loss) {
                        continue;
                    }
                    let Some(peer) = self.peers.get_mut(&to) else {
                        continue;
                    };
                    peer.handle_datagram(t, hop(4).addr, &tx.bytes[..]);
                    while peer.poll_incoming().is_some() {}
                    let back: Vec<Bytes> =
                        std::iter::from_fn(|| peer.poll_transmit().map(|(_, b)| b)).collect();
                    for b in back {
                        self.core.handle_datagram(t, to, &b[..]);
                    }
                }
            }
        }

        /// `from` sends `msg` to the core, reliably or not.
        fn deliver_as(&mut self, from: SocketAddr, msg: Message, reliable: bool) {
            let t = self.t;
            let peer = self.peers.get_mut(&from).expect("a known peer");
            if reliable {
                peer.send_reliable(t, hop(4).id, hop(4).addr, msg).unwrap();
            } else {
                peer.send_unreliable(t, hop(4).id, hop(4).addr, msg)
                    .unwrap();
            }
            let out: Vec<Bytes> =
                std::iter::from_fn(|| peer.poll_transmit().map(|(_, b)| b)).collect();
            for b in out {
                self.core.handle_datagram(t, from, &b[..]);
            }
            self.pump(0.0, &mut common::rng::Rng::seeded(0));
        }

        fn deliver(&mut self, from: PathHop, msg: Message) {
            self.deliver_as(from.addr, msg, false);
        }

        /// The client subscribes to `channel`.
        fn subscribe(&mut self, channel: ChannelId) {
            self.deliver_as(self.client, Message::Subscribe { channel }, true);
        }

        /// One flood round of the server, arriving through `via` (2 or 3).
        fn flood_via(&mut self, vias: &[u8]) {
            let f = self.origin.next_flood(&[chan()], 0);
            for v in vias {
                let mut g = f.clone();
                g.path.push(hop(*v));
                self.deliver(hop(*v), Message::Flood(g));
            }
        }

        /// Advances the fake clock by `d` in 25 ms steps with only `alive` answering, running
        /// the core's timers.
        fn advance(&mut self, d: Duration, alive: &[u8]) {
            self.advance_lossy(d, alive, 0.0, &mut common::rng::Rng::seeded(0));
        }

        /// [`advance`](Self::advance), losing each datagram to a neighbour (and each pong)
        /// with probability `loss`.
        fn advance_lossy(
            &mut self,
            d: Duration,
            alive: &[u8],
            loss: f64,
            rng: &mut common::rng::Rng,
        ) {
            self.answering = alive.to_vec();
            let end = self.t + d;
            while self.t < end {
                self.t += Duration::from_millis(25);
                for n in alive {
                    if !rng.chance(loss) {
                        self.deliver(hop(*n), Message::Pong { nonce: 0 });
                    }
                }
                self.core.handle_timeout(self.t);
                self.pump(loss, rng);
            }
        }

        /// Every datagram sent since the last call, decoded, with its destination.
        fn sent(&mut self) -> Vec<(SocketAddr, Datagram)> {
            self.pump(0.0, &mut common::rng::Rng::seeded(0));
            std::mem::take(&mut self.log)
        }
    }

    fn subscribes(out: &[(SocketAddr, Datagram)]) -> Vec<SocketAddr> {
        out.iter()
            .filter_map(|(to, d)| match &d.body {
                Body::Reliable {
                    msg: Message::Subscribe { .. },
                    ..
                } => Some(*to),
                _ => None,
            })
            .collect()
    }

    /// A subscriber makes the core subscribe upstream at once; when that upstream falls
    /// silent the core declares it dead on the fast-peer timeout and moves the channel to the
    /// other neighbour, all on the fake clock.
    #[test]
    fn subscribes_upstream_and_fails_over_on_a_fake_clock() {
        let mut b = Bench::new();
        b.flood_via(&[2, 3]);
        b.sent();
        b.subscribe(chan().id);
        let first = subscribes(&b.sent());
        assert_eq!(first.len(), 1, "one upstream subscription");
        let up = first[0];
        let other = if up == hop(2).addr { 3 } else { 2 };
        // Both neighbours answer for a while: nothing moves.
        b.advance(Duration::from_secs(1), &[2, 3]);
        assert!(subscribes(&b.sent()).is_empty());
        // The upstream goes silent; the other keeps answering (and flooding).
        let t0 = b.t;
        let mut moved_at = None;
        for _ in 0..40 {
            b.advance(Duration::from_millis(25), &[other]);
            b.flood_via(&[other]);
            if subscribes(&b.sent()).contains(&hop(other).addr) {
                moved_at = Some(b.t - t0);
                break;
            }
        }
        let moved_at = moved_at.expect("the channel moved to the other neighbour");
        // The fast-peer timeout is 150 ms (6 × 25 ms heartbeats); timers run every 25 ms.
        assert!(
            moved_at <= Duration::from_millis(200),
            "moved after {moved_at:?} of silence"
        );
        assert_eq!(b.core.stats.upstream_losses, 1);
    }

    /// Zero-copy forwarding: the datagram a subscriber gets is the very buffer the upstream's
    /// arrived in (our id written into its header, the payload neither copied nor
    /// re-encoded); a NACKed one goes back flagged RETRANSMIT, everything else unchanged.
    #[test]
    fn video_is_forwarded_in_the_buffer_it_arrived_in() {
        let mut b = Bench::new();
        b.flood_via(&[2, 3]);
        b.sent();
        b.subscribe(chan().id);
        let up = subscribes(&b.sent())[0];
        let up_id = if up == hop(2).addr {
            hop(2).id
        } else {
            hop(3).id
        };
        let packet = |seq: u64| VideoPacket {
            channel: chan().id,
            seq,
            flags: video_flags::KEYFRAME,
            payload: Bytes::from(vec![0x47; 1316]),
        };
        let wire = Datagram::new(up_id, Body::Video(packet(500)))
            .encode()
            .unwrap();
        let arrived = BytesMut::from(&wire[..]);
        let at = arrived.as_ptr();
        b.core.handle_datagram(b.t, up, arrived);
        let tx = b.core.poll_transmit().expect("forwarded");
        assert_eq!(tx.to, b.client);
        assert_eq!(
            tx.bytes.as_ptr(),
            at,
            "forwarded from another buffer: copied"
        );
        let d = Datagram::decode(&tx.bytes).unwrap();
        assert_eq!(d, Datagram::new(hop(4).id, Body::Video(packet(500))));
        // The client missed it: the retransmission is a copy flagged RETRANSMIT.
        b.t += Duration::from_millis(30);
        b.deliver_as(
            b.client,
            Message::Nack {
                channel: chan().id,
                seqs: vec![500],
            },
            false,
        );
        let again: Vec<_> = b
            .sent()
            .into_iter()
            .filter(|(to, d)| *to == b.client && matches!(d.body, Body::Video(_)))
            .collect();
        let mut want = packet(500);
        want.flags |= video_flags::RETRANSMIT;
        assert_eq!(
            again,
            vec![(b.client, Datagram::new(hop(4).id, Body::Video(want)))]
        );
    }

    /// Identity is the header's id, not the address: a datagram from a neighbour's address
    /// with another id is dropped and counted (it neither floods nor subscribes), and a
    /// client that restarts on the same port with a new id replaces its former self (whose
    /// subscription goes) instead of being taken for it.
    #[test]
    fn a_sender_id_that_does_not_match_its_address_is_dropped_and_a_restarted_client_replaced() {
        let mut b = Bench::new();
        b.flood_via(&[2, 3]);
        b.sent();
        // An impostor at neighbour 2's address.
        let mut impostor = Link::new(common::NodeId(666), 1, ReliableConfig::default());
        impostor
            .send_reliable(
                b.t,
                hop(4).id,
                hop(4).addr,
                Message::Subscribe { channel: chan().id },
            )
            .unwrap();
        while let Some((_, bytes)) = impostor.poll_transmit() {
            b.core.handle_datagram(b.t, hop(2).addr, &bytes[..]);
        }
        assert_eq!(b.core.stats().peer_mismatch, 1);
        assert!(
            b.core.stats().subscribers.is_empty(),
            "the impostor subscribed nothing"
        );
        assert!(subscribes(&b.sent()).is_empty());
        // The real client subscribes, then restarts on the same address with a new id.
        b.subscribe(chan().id);
        assert_eq!(b.core.stats().subscribers[&chan().id], vec![b.client]);
        let client = b.client;
        b.peers.insert(
            client,
            Link::new(common::NodeId(100), 100, ReliableConfig::default()),
        );
        b.subscribe(chan().id);
        let s = b.core.stats();
        assert_eq!(
            s.subscribers[&chan().id],
            vec![b.client],
            "one subscriber, the new one"
        );
        let ids: Vec<PeerId> = b.core.subs.subscribers(chan().id).collect();
        assert_eq!(ids, vec![common::NodeId(100)]);
        assert_eq!(s.peer_mismatch, 1);
        assert_eq!(s.no_address, 0);
    }

    /// 10 % loss on both links for ten simulated minutes is no reason to fail over: the
    /// upstream in use (a fast peer, heartbeated every 25 ms) is dead only after 150 ms without
    /// a single answer. Deterministic (seeded loss, fake clock): the real-socket test of the
    /// same scenario depends on the machine's load.
    #[test]
    fn ten_percent_loss_is_no_reason_to_fail_over() {
        let mut b = Bench::new();
        b.flood_via(&[2, 3]);
        b.subscribe(chan().id);
        assert_eq!(subscribes(&b.sent()).len(), 1);
        let mut rng = common::rng::Rng::seeded(10);
        for _ in 0..600 {
            b.advance_lossy(Duration::from_secs(1), &[2, 3], 0.10, &mut rng);
            b.flood_via(&[2, 3]);
            b.sent();
        }
        assert_eq!(b.core.stats.upstream_losses, 0);
        assert_eq!(b.core.stats.resubscriptions, 0);
    }
}

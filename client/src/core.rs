//! The client's protocol logic as an I/O-free state machine: PoP liveness and RTT, channel lists
//! (union over live PoPs), PoP selection and failover, and per-stream state (sequence tracking,
//! counters). Fed `(now, event)`; what it wants done comes out of
//! [`poll_action`](ClientCore::poll_action); it wants to be called again at
//! [`poll_timeout`](ClientCore::poll_timeout). Tested with a fake clock.
//!
//! # Rules
//!
//! * Every PoP is pinged every [`CoreConfig::ping_interval`] (100 ms; unreliable `Ping`, nonce
//!   → the `Instant` it was sent). A `Pong` gives an RTT sample, smoothed (SRTT 1/8, RTTVAR
//!   1/4, as RFC 6298). The pings are also the keep-alive of our subscriptions at that PoP.
//! * Liveness is a [`FailureDetector`]: anything from a PoP (pong, list, video) counts as
//!   heard; a PoP is *up* from its first pong; it is *down* when nothing came from it for
//!   `max(pop_timeout, 2·SRTT + 4·RTTVAR)` (never answered counts from start), where
//!   [`CoreConfig::pop_timeout`] = k × `ping_interval` (800 ms: k = 8, no false "down" at 10 %
//!   loss, see `common::failure`). A down PoP is *up* again after
//!   [`CoreConfig::recover_pongs`] pongs, so one stray pong does not bring it back, and is not
//!   chosen for a stream during [`CoreConfig::hold_down`] unless it is the only candidate.
//! * Fast PoPs (sub-second failover): a PoP that currently *feeds* a stream (we are subscribed
//!   there and its video has arrived since) is a fast peer of the detector
//!   ([`FailureDetector::set_fast`]): it is pinged every [`CoreConfig::fast_interval`] (25 ms)
//!   instead of every `ping_interval`, and it is down after
//!   `max(fast_timeout, 2·SRTT + 4·RTTVAR)` of silence ([`CoreConfig::fast_timeout`], 150 ms =
//!   6 × 25 ms). Its video counts as heard, so at 10 % loss a false "down" needs 150 ms without
//!   a single datagram or pong. When it stops feeding any stream (stop, failover) it is normal
//!   again. So the death of a PoP in use is noticed in ~150 ms and the stream moves at once;
//!   a PoP not in use keeps the 800 ms timeout (and its cheaper pings).
//! * `ListChannels` goes to every up PoP every [`CoreConfig::list_interval`] (and at once when
//!   it comes up). A PoP's list is replaced when every page of an answer has arrived; a down
//!   PoP's list is forgotten. The channel list is the union, by name, over up PoPs.
//! * Play: subscribe (reliable) at the up PoP with the lowest smoothed RTT that lists the
//!   channel (the stream's *primary*). Until one lists it the stream waits. Right after start,
//!   selection waits up to [`CoreConfig::settle`] for every PoP to answer, so the first choice
//!   is informed.
//! * Redundancy ([`CoreConfig::redundancy`], `--redundancy 2`): a stream is also subscribed
//!   at the next best up PoP that lists it (its *secondary*; never one in its hold-down), as
//!   soon as one qualifies (`path_added`). Video of both is merged by `seq` into the stream's
//!   one jitter buffer (or [`SeqTracker`] with latency 0): a datagram is lost for the viewer
//!   only if both paths lost it, duplicates never reach the sinks (counted in `duplicates`).
//!   NACKs go to the primary. When one of the two goes down the stream simply continues from
//!   the other (`path_lost`; no reset, no `source_changed`), which becomes the primary, and a
//!   replacement secondary is subscribed when another PoP qualifies. Cache bursts
//!   (`FROM_CACHE`) of a PoP joining a playing stream are old copies: with latency 0 those
//!   older than the duplicate window are dropped (counted as duplicates).
//! * Failover: when the primary of a stream goes down and it has no secondary, the stream
//!   subscribes at the next best up PoP that lists it (and unsubscribes, best effort, from the
//!   old one); that is a `source_changed`. A stream stays at a working PoP even if another
//!   becomes faster, so a recovered PoP never takes a stream back (no flapping; with
//!   redundancy it may become a secondary again, after its hold-down).
//! * A subscribed path that receives nothing for [`CoreConfig::stall_resubscribe`] re-sends
//!   its `Subscribe` (the PoP may have restarted and forgotten us).
//! * Video is accepted only from the stream's PoPs (primary and secondary). With a latency
//!   ([`CoreConfig::latency`], `--latency`, default 200 ms) it goes through the stream's
//!   [`Playout`] (NACK recovery to the primary, jitter buffer; see [`crate::playout`]) and only
//!   what that releases, in `seq` order, comes out of [`poll_output`](ClientCore::poll_output)
//!   for the sinks. With latency 0 it is passed through at once after duplicate suppression by
//!   `seq` ([`SeqTracker`]). Both are reset on a source change (what the jitter buffer held is
//!   released first), never when a stream loses one of two paths.

use crate::playout::{Playout, PlayoutCounters};
use crate::seq::SeqTracker;
use crate::stats::StatEvent;
use bytes::Bytes;
use common::failure::{FailureConfig, FailureDetector};
use common::feed::Feed;
use common::rtt::RttEstimator;
use common::ts::{datagram_packets, ContinuityChecker};
use common::wire::{video_flags, ChannelId, ChannelInfo, Message, VideoPacket};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Timing of the client's protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    /// Ping (heartbeat) period per PoP. Default 100 ms.
    pub ping_interval: Duration,
    /// `ListChannels` period per up PoP.
    pub list_interval: Duration,
    /// Nothing from a PoP for this long (rounded up to whole ping intervals; longer on a link
    /// whose `2·SRTT + 4·RTTVAR` exceeds it): the PoP is down. Default 800 ms (k = 8).
    pub pop_timeout: Duration,
    /// A PoP that was down and came back is not chosen for a stream for this long, unless it
    /// is the only candidate. Default 2 s.
    pub hold_down: Duration,
    /// Pongs a down PoP must answer before it counts as up again.
    pub recover_pongs: u32,
    /// Period of the per-stream `stats` events.
    pub stats_interval: Duration,
    /// How long after start the first choice of PoP may wait for every PoP to answer.
    pub settle: Duration,
    /// Re-send `Subscribe` when a subscribed stream has received nothing for this long.
    pub stall_resubscribe: Duration,
    /// Jitter-buffer latency (`--latency`); zero: video passes straight through (no
    /// reordering, no recovery). Default 200 ms.
    pub latency: Duration,
    /// NACK lost datagrams to the PoP (`--no-recovery` clears it). Default true.
    pub recovery: bool,
    /// Ping period of a PoP that feeds a stream (a *fast* peer, see the module doc). Default
    /// 25 ms.
    pub fast_interval: Duration,
    /// Nothing from a PoP that feeds a stream for this long (rounded up to whole
    /// `fast_interval`s; longer if `2·SRTT + 4·RTTVAR` is): it is down. Default 150 ms (6 ×
    /// 25 ms).
    pub fast_timeout: Duration,
    /// PoPs each stream is subscribed at (`--redundancy`): 1, or 2 for two paths merged by
    /// `seq` (values outside 1..=2 are clamped). Default 1.
    pub redundancy: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            ping_interval: Duration::from_millis(100),
            list_interval: Duration::from_secs(1),
            pop_timeout: Duration::from_millis(800),
            hold_down: Duration::from_secs(2),
            recover_pongs: 2,
            stats_interval: Duration::from_secs(1),
            settle: Duration::from_millis(700),
            stall_resubscribe: Duration::from_secs(2),
            latency: Duration::from_millis(200),
            recovery: true,
            fast_interval: Duration::from_millis(25),
            fast_timeout: Duration::from_millis(150),
            redundancy: 1,
        }
    }
}

/// Liveness of a PoP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopStatus {
    /// Not answered yet (and not yet timed out).
    Unknown,
    /// Answering pings.
    Up,
    /// Silent for its timeout ([`CoreConfig::pop_timeout`] or more).
    Down,
}

/// What the core wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `msg` once (Ping, ListChannels).
    SendUnreliable {
        /// Destination PoP.
        to: SocketAddr,
        /// The message.
        msg: Message,
    },
    /// Send `msg` through the reliable channel (Subscribe, Unsubscribe).
    SendReliable {
        /// Destination PoP.
        to: SocketAddr,
        /// The message.
        msg: Message,
    },
    /// Report an event (log, stats file, GUI).
    Event(StatEvent),
}

#[derive(Debug, Clone)]
struct Pop {
    addr: SocketAddr,
    status: PopStatus,
    /// RTT of its pongs.
    rtt: Option<RttEstimator>,
    /// Pongs since it went down.
    pongs_since_down: u32,
    channels: Vec<ChannelInfo>,
    channels_at: Option<Instant>,
    /// Pages of the answer being assembled.
    pages: Vec<Option<Vec<ChannelInfo>>>,
}

impl Pop {
    /// Smoothed RTT of its pongs, once one came.
    fn srtt(&self) -> Option<Duration> {
        self.rtt.map(|r| r.srtt())
    }

    fn lists(&self, name: &str) -> Option<ChannelId> {
        // A channel's id is the hash of its name (streams are keyed by it); an entry that
        // disagrees is not that channel.
        self.channels
            .iter()
            .find(|c| c.name == name && c.id == ChannelId::of_name(name))
            .map(|c| c.id)
    }
}

/// Most pages of a `Channels` answer we assemble.
const MAX_PAGES: u16 = 256;

#[derive(Debug)]
struct Stream {
    /// Its channel's name (what the user asked for; the key is `ChannelId::of_name(name)`).
    name: String,
    channel: Option<ChannelId>,
    /// Where it is subscribed: the primary first (NACKs, `pop` of the stats), then the
    /// secondary (`--redundancy 2`). Empty: waiting for a PoP that lists it.
    feed: Feed<SocketAddr>,
    /// The PoP it lost (waiting for another one), to report `source_changed` when found.
    lost_pop: Option<SocketAddr>,
    played: bool,
    first_packet: bool,
    seq: SeqTracker,
    /// `None`: pass-through (latency 0).
    playout: Option<Playout>,
    cc: ContinuityChecker,
    packets: u64,
    bytes: u64,
    source_changes: u64,
    /// Datagrams received per PoP, every copy (duplicates, retransmissions, cache bursts).
    received: BTreeMap<SocketAddr, u64>,
    /// Cache-burst copies older than the duplicate window, dropped (pass-through only).
    stale: u64,
    /// Since when the stream has had no PoP (play, or its last path lost); `None` while it
    /// has one. Refreshed on every timer (see [`ClientCore::problems`]).
    waiting_since: Option<Instant>,
}

impl Stream {
    fn primary(&self) -> Option<SocketAddr> {
        self.feed.primary().map(|p| p.peer)
    }

    fn pops(&self) -> Vec<SocketAddr> {
        self.feed.peers()
    }

    fn has(&self, pop: SocketAddr) -> bool {
        self.feed.has(pop)
    }
}

/// Something that keeps the user from watching ([`ClientCore::problems`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No PoP answers pings (none ever did, or every one went down at `since`).
    NoPop {
        /// Since when.
        since: Instant,
    },
    /// A stream waits for a PoP, and no up PoP lists it.
    NotOffered {
        /// The stream.
        stream: String,
        /// Since when it has had no PoP.
        since: Instant,
        /// What the up PoPs do offer.
        offered: Vec<String>,
    },
    /// A PoP refused us (wrong viewer key), or proved another key than the one pinned; shown
    /// while no PoP answers.
    Refused {
        /// The PoP.
        pop: SocketAddr,
        /// Why, in words.
        why: String,
        /// Since when.
        since: Instant,
    },
}

impl Problem {
    /// Since when it holds.
    pub fn since(&self) -> Instant {
        match self {
            Problem::NoPop { since }
            | Problem::NotOffered { since, .. }
            | Problem::Refused { since, .. } => *since,
        }
    }
}

/// A read-only view of one PoP (GUI, logs).
#[derive(Debug, Clone, PartialEq)]
pub struct PopView {
    /// Address.
    pub addr: SocketAddr,
    /// Liveness.
    pub status: PopStatus,
    /// Smoothed RTT.
    pub rtt: Option<Duration>,
    /// Channels it lists.
    pub channels: usize,
}

/// A read-only view of one stream (GUI, exit summary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamView {
    /// Channel name.
    pub name: String,
    /// Current source, the primary (`None`: waiting for a PoP that lists it).
    pub pop: Option<SocketAddr>,
    /// Every PoP feeding it, primary first (two with `--redundancy 2`).
    pub pops: Vec<SocketAddr>,
    /// Datagrams kept.
    pub packets: u64,
    /// Payload bytes kept.
    pub bytes: u64,
    /// Sequence numbers lost for the viewer: skipped by the jitter buffer (after recovery);
    /// with `--latency 0`, sequence gaps.
    pub lost: u64,
    /// TS packets lost by continuity counter.
    pub cc_lost: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Source changes.
    pub source_changes: u64,
    /// Recovery and jitter-buffer counters (zero with `--latency 0`).
    pub playout: PlayoutCounters,
}

/// What the GUI shows: a copy of the core's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Time since start.
    pub uptime: Duration,
    /// Every PoP, in `--servers` order.
    pub pops: Vec<PopView>,
    /// Union of the up PoPs' channel names, sorted.
    pub channels: Vec<String>,
    /// Playing streams, by name.
    pub streams: Vec<StreamView>,
    /// Messages for the user (player missing, player exited...), oldest first.
    pub notices: Vec<String>,
    /// What keeps the user from watching now (no PoP answering, a stream nobody offers), in
    /// words; shown as errors by the window.
    pub problems: Vec<String>,
}

/// The client state machine. See the module doc.
#[derive(Debug)]
pub struct ClientCore {
    cfg: CoreConfig,
    start: Instant,
    pops: Vec<Pop>,
    /// Playing streams, keyed by `ChannelId::of_name(name)` (no string on the video path).
    streams: BTreeMap<ChannelId, Stream>,
    /// Nonce → (PoP index, sent at).
    pings: HashMap<u64, (usize, Instant)>,
    nonce: u64,
    next_ping: Instant,
    /// Pings of the fast PoPs (those feeding a stream).
    next_fast_ping: Instant,
    next_list: Instant,
    next_stats: Instant,
    union: BTreeSet<String>,
    /// PoP liveness.
    liveness: FailureDetector<SocketAddr>,
    actions: VecDeque<Action>,
    /// Payloads for the sinks, in order per stream.
    output: VecDeque<(ChannelId, Bytes)>,
    /// The latest `now` we were given.
    now: Instant,
    /// Since when no PoP has been up (from the start until the first pong, and after every
    /// PoP went down); `None` while one is up. Refreshed on every timer.
    no_pop_since: Option<Instant>,
    /// PoPs that refused us, why and since when (cleared when one answers).
    refused: BTreeMap<SocketAddr, (String, Instant)>,
}

impl ClientCore {
    /// A core for `pops` (in `--servers` order), started at `now`.
    pub fn new(cfg: CoreConfig, pops: &[SocketAddr], now: Instant) -> ClientCore {
        let mut seen = BTreeSet::new();
        let pops = pops
            .iter()
            .filter(|a| seen.insert(**a))
            .map(|&addr| Pop {
                addr,
                status: PopStatus::Unknown,
                rtt: None,
                pongs_since_down: 0,
                channels: Vec::new(),
                channels_at: None,
                pages: Vec::new(),
            })
            .collect::<Vec<Pop>>();
        let interval = cfg.ping_interval.max(Duration::from_millis(1));
        let fast_interval = cfg.fast_interval.max(Duration::from_millis(1));
        let mut liveness = FailureDetector::new(FailureConfig {
            heartbeat_interval: interval,
            k: periods(cfg.pop_timeout, interval),
            hold_down: cfg.hold_down,
            fast_interval,
            fast_k: periods(cfg.fast_timeout, fast_interval),
        });
        for p in &pops {
            liveness.watch(now, p.addr);
        }
        ClientCore {
            liveness,
            next_ping: now,
            next_fast_ping: now,
            next_list: now + cfg.list_interval,
            next_stats: now + cfg.stats_interval,
            cfg,
            start: now,
            pops,
            streams: BTreeMap::new(),
            pings: HashMap::new(),
            nonce: 0,
            union: BTreeSet::new(),
            actions: VecDeque::new(),
            output: VecDeque::new(),
            now,
            no_pop_since: Some(now),
            refused: BTreeMap::new(),
        }
    }

    /// When the core started (`t_ms` = 0).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next payload for a stream's sinks (released by its jitter buffer), if any. Drain it
    /// after every `handle_*` call.
    pub fn poll_output(&mut self) -> Option<(ChannelId, Bytes)> {
        self.output.pop_front()
    }

    /// The configured PoPs.
    pub fn pop_addrs(&self) -> Vec<SocketAddr> {
        self.pops.iter().map(|p| p.addr).collect()
    }

    /// Whether `addr` is one of the configured PoPs.
    pub fn is_pop(&self, addr: SocketAddr) -> bool {
        self.pops.iter().any(|p| p.addr == addr)
    }

    /// The PoP at `pop` refused us (`why`, in words); reported while no PoP answers, until it
    /// answers.
    pub fn refused(&mut self, now: Instant, pop: SocketAddr, why: String) {
        self.refused.entry(pop).or_insert((why, now));
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_ping.min(self.next_list).min(self.next_stats);
        if let Some(d) = self.liveness.poll_timeout() {
            t = t.min(d);
        }
        if self.pops.iter().any(|p| self.liveness.is_fast(p.addr)) {
            t = t.min(self.next_fast_ping);
        }
        for s in self.streams.values() {
            if let Some(d) = s.feed.next_stall(self.cfg.stall_resubscribe, |_| true) {
                t = t.min(d);
            }
            if s.feed.is_empty() && !self.settled() {
                t = t.min(self.start + self.cfg.settle);
            }
            if let Some(d) = s.playout.as_ref().and_then(Playout::poll_timeout) {
                t = t.min(d);
            }
        }
        t
    }

    /// Timers: pings, liveness, channel lists, stalls, periodic stats.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if now >= self.next_fast_ping {
            // Fast PoPs (feeding a stream) are pinged every fast_interval while they are
            // silent: video within the interval proves them alive (no ping, no pong to
            // handle), and the pings resume as soon as it stops, so a dead PoP is still found
            // `fast_timeout` after its last datagram...
            // (Half an interval: the pong to our last ping, a round trip after it, does not
            // count as video.)
            let period = self.liveness.config().fast_interval;
            for i in 0..self.pops.len() {
                let a = self.pops[i].addr;
                let fed = self
                    .liveness
                    .last_heard(a)
                    .is_some_and(|h| now.saturating_duration_since(h) < period / 2);
                if self.liveness.is_fast(a) && !fed {
                    self.ping(i, now);
                }
            }
            self.next_fast_ping = advance(self.next_fast_ping, period, now);
        }
        if now >= self.next_ping {
            // ...and every PoP every ping_interval (the RTT samples, and the PoP keeps our
            // subscriptions while it hears from us).
            for i in 0..self.pops.len() {
                self.ping(i, now);
            }
            self.next_ping = advance(self.next_ping, self.cfg.ping_interval, now);
            let keep = self.cfg.pop_timeout * 4;
            self.pings
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < keep);
        }
        let mut went_down = Vec::new();
        let dead = self.liveness.poll_dead(now);
        for p in &mut self.pops {
            if p.status != PopStatus::Down && dead.contains(&p.addr) {
                p.status = PopStatus::Down;
                p.pongs_since_down = 0;
                p.channels.clear();
                p.channels_at = None;
                p.pages.clear();
                went_down.push(p.addr);
                self.actions.push_back(Action::Event(StatEvent::Pop {
                    pop: p.addr,
                    rtt_ms: p.srtt().map(ms),
                    up: false,
                }));
            }
        }
        if now >= self.next_list {
            for p in &self.pops {
                if p.status == PopStatus::Up {
                    self.actions.push_back(Action::SendUnreliable {
                        to: p.addr,
                        msg: Message::ListChannels,
                    });
                }
            }
            self.next_list = advance(self.next_list, self.cfg.list_interval, now);
        }
        if !went_down.is_empty() {
            self.update_union();
            self.fail_over(&went_down);
        }
        self.assign_waiting();
        let ids: Vec<ChannelId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.playout.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.pump(now, id);
        }
        // Stalled subscriptions: re-send Subscribe.
        let stall = self.cfg.stall_resubscribe;
        for s in self.streams.values_mut() {
            let Some(channel) = s.channel else {
                continue;
            };
            for pop in s.feed.poll_stalled(now, stall, |_| true) {
                self.actions.push_back(Action::SendReliable {
                    to: pop,
                    msg: Message::Subscribe { channel },
                });
            }
        }
        self.update_fast(now);
        self.update_waiting(now);
        if now >= self.next_stats {
            for s in self.streams.values() {
                if let Some(pop) = s.primary() {
                    self.actions
                        .push_back(Action::Event(stats_event(&s.name, pop, s)));
                }
            }
            self.next_stats = advance(self.next_stats, self.cfg.stats_interval, now);
        }
    }

    /// Sends a `Ping` to PoP `i`.
    fn ping(&mut self, i: usize, now: Instant) {
        self.nonce += 1;
        self.pings.insert(self.nonce, (i, now));
        self.actions.push_back(Action::SendUnreliable {
            to: self.pops[i].addr,
            msg: Message::Ping { nonce: self.nonce },
        });
    }

    /// A PoP is fast while it feeds a stream (see the module doc).
    fn update_fast(&mut self, now: Instant) {
        for p in &self.pops {
            let feeds = self.streams.values().any(|s| s.feed.feeds(p.addr));
            if feeds != self.liveness.is_fast(p.addr) {
                self.liveness.set_fast(now, p.addr, feeds);
            }
        }
    }

    /// A control message from `from`.
    pub fn handle_message(&mut self, now: Instant, from: SocketAddr, msg: Message) {
        self.tick(now);
        self.liveness.heard(now, from);
        match msg {
            Message::Pong { nonce } => self.pong(now, from, nonce),
            Message::Channels {
                page,
                pages,
                channels,
            } => self.channels(now, from, page, pages, channels),
            _ => {}
        }
    }

    fn pong(&mut self, now: Instant, from: SocketAddr, nonce: u64) {
        let Some(&(i, sent)) = self.pings.get(&nonce) else {
            return;
        };
        if self.pops[i].addr != from {
            return;
        }
        self.pings.remove(&nonce);
        self.refused.remove(&from);
        let sample = now.saturating_duration_since(sent);
        let p = &mut self.pops[i];
        RttEstimator::sample(&mut p.rtt, sample);
        if let Some(r) = p.rtt {
            self.liveness.rtt_sample(p.addr, r.srtt(), r.rttvar());
        }
        let comes_up = match p.status {
            PopStatus::Up => false,
            PopStatus::Unknown => true,
            PopStatus::Down => {
                p.pongs_since_down += 1;
                p.pongs_since_down >= self.cfg.recover_pongs
            }
        };
        if comes_up {
            p.status = PopStatus::Up;
            let addr = p.addr;
            self.actions.push_back(Action::Event(StatEvent::Pop {
                pop: addr,
                rtt_ms: p.srtt().map(ms),
                up: true,
            }));
            self.actions.push_back(Action::SendUnreliable {
                to: addr,
                msg: Message::ListChannels,
            });
        }
    }

    fn channels(
        &mut self,
        now: Instant,
        from: SocketAddr,
        page: u16,
        pages: u16,
        channels: Vec<ChannelInfo>,
    ) {
        let Some(p) = self.pops.iter_mut().find(|p| p.addr == from) else {
            return;
        };
        if p.status != PopStatus::Up || pages > MAX_PAGES || (pages > 0 && page >= pages) {
            return;
        }
        if pages == 0 {
            p.pages.clear();
            p.channels.clear();
        } else {
            if p.pages.len() != usize::from(pages) {
                p.pages = vec![None; usize::from(pages)];
            }
            p.pages[usize::from(page)] = Some(channels);
            if p.pages.iter().any(Option::is_none) {
                return;
            }
            p.channels = p.pages.drain(..).flatten().flatten().collect();
        }
        p.channels_at = Some(now);
        self.update_union();
        self.assign_waiting();
    }

    /// A video datagram from `from`. Returns the stream's channel if the datagram is taken (from
    /// one of the stream's PoPs, not a duplicate or too late); what goes to the sinks comes out
    /// of [`poll_output`](Self::poll_output), and NACKs out of
    /// [`poll_action`](Self::poll_action).
    pub fn handle_video(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: VideoPacket,
    ) -> Option<ChannelId> {
        self.tick(now);
        self.liveness.heard(now, from);
        let srtt = self
            .pops
            .iter()
            .find(|p| p.addr == from)
            .and_then(Pop::srtt);
        let id = packet.channel;
        let s = self
            .streams
            .get_mut(&id)
            .filter(|s| s.channel == Some(id) && s.has(from))?;
        let primary = s.primary() == Some(from);
        *s.received.entry(from).or_default() += 1;
        // Another origin's numbering (a replica, not the same stream): not merged while the
        // primary delivers.
        let newly_fed = !s.feed.feeds(from);
        let mismatch = s
            .feed
            .on_video(now, from, packet.seq)
            .is_some_and(|v| v.mismatched);
        let taken = match &mut s.playout {
            _ if mismatch => false,
            None => {
                // A joining PoP's cache burst replays what the other path already gave us.
                let stale = packet.flags & video_flags::FROM_CACHE != 0
                    && s.feed.len() > 1
                    && s.seq.is_behind_window(packet.seq);
                if stale {
                    s.stale += 1;
                }
                let ok = !stale && s.seq.push(packet.seq).accept();
                if ok {
                    deliver(id, s, packet.payload, &mut self.output);
                }
                ok
            }
            Some(p) => {
                if let (true, Some(rtt)) = (primary, srtt) {
                    p.set_rtt(rtt);
                }
                let key = is_keyframe(packet.flags, &packet.payload);
                let retransmit = packet.flags & video_flags::RETRANSMIT != 0;
                p.push(now, packet.seq, key, retransmit, packet.payload)
            }
        };
        if newly_fed {
            self.update_fast(now);
        }
        if !taken {
            return None;
        }
        let s = self.streams.get_mut(&id).expect("found above");
        if !s.first_packet {
            s.first_packet = true;
            self.actions
                .push_back(Action::Event(StatEvent::FirstPacket {
                    stream: s.name.clone(),
                    pop: from,
                }));
        }
        self.pump(now, id);
        Some(id)
    }

    /// Releases what the stream's jitter buffer has due to the sinks and sends its due NACKs.
    fn pump(&mut self, now: Instant, id: ChannelId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(mut p) = s.playout.take() else {
            return;
        };
        while let Some(b) = p.poll_release(now) {
            deliver(id, s, b, &mut self.output);
        }
        while let Some(seqs) = p.poll_nacks(now) {
            if let (Some(to), Some(channel)) = (s.primary(), s.channel) {
                self.actions.push_back(Action::SendUnreliable {
                    to,
                    msg: Message::Nack { channel, seqs },
                });
            }
        }
        s.playout = Some(p);
    }

    /// A reliable message to `peer` was never acknowledged. The liveness of PoPs is judged by
    /// pings alone, so this only makes the next stall check re-send a `Subscribe` sooner.
    pub fn handle_timed_out(&mut self, now: Instant, peer: SocketAddr) {
        self.tick(now);
        let stall = self.cfg.stall_resubscribe;
        for s in self.streams.values_mut() {
            s.feed.expedite(peer, now, stall);
        }
    }

    /// Starts playing `name` (no-op if it is already playing). Returns whether it is new.
    pub fn play(&mut self, now: Instant, name: &str) -> bool {
        self.tick(now);
        let id = ChannelId::of_name(name);
        if self.streams.contains_key(&id) {
            return false;
        }
        self.streams.insert(
            id,
            Stream {
                name: name.to_string(),
                channel: None,
                feed: Feed::new(),
                lost_pop: None,
                played: false,
                first_packet: false,
                seq: SeqTracker::new(),
                playout: (!self.cfg.latency.is_zero())
                    .then(|| Playout::new(self.cfg.latency, self.cfg.recovery)),
                cc: ContinuityChecker::new(),
                packets: 0,
                bytes: 0,
                source_changes: 0,
                received: BTreeMap::new(),
                stale: 0,
                waiting_since: Some(now),
            },
        );
        self.assign_waiting();
        true
    }

    /// Stops `name`: unsubscribes and reports `stop` (with final `stats` if it had a source).
    /// Returns whether it was playing.
    pub fn stop(&mut self, now: Instant, name: &str, reason: &str) -> bool {
        self.tick(now);
        let id = ChannelId::of_name(name);
        let Some(mut s) = self.streams.remove(&id) else {
            return false;
        };
        // What the jitter buffer holds still goes to the sinks.
        if let Some(mut p) = s.playout.take() {
            p.reset(now);
            while let Some(b) = p.poll_release(now) {
                deliver(id, &mut s, b, &mut self.output);
            }
            s.playout = Some(p);
        }
        if let (Some(pop), Some(channel)) = (s.primary(), s.channel) {
            self.actions
                .push_back(Action::Event(stats_event(name, pop, &s)));
            for pop in s.feed.peers() {
                self.actions.push_back(Action::SendReliable {
                    to: pop,
                    msg: Message::Unsubscribe { channel },
                });
            }
        }
        self.actions.push_back(Action::Event(StatEvent::Stop {
            stream: name.to_string(),
            pop: s.primary(),
            reason: reason.to_string(),
        }));
        self.update_fast(now);
        true
    }

    /// Stops every stream (at exit).
    pub fn stop_all(&mut self, now: Instant, reason: &str) {
        let names: Vec<String> = self.playing();
        for n in names {
            self.stop(now, &n, reason);
        }
    }

    /// The name of the playing stream of channel `id`.
    pub fn name_of(&self, id: ChannelId) -> Option<&str> {
        self.streams.get(&id).map(|s| s.name.as_str())
    }

    /// Names of the playing streams.
    pub fn playing(&self) -> Vec<String> {
        self.streams.values().map(|s| s.name.clone()).collect()
    }

    /// What keeps the user from watching, and since when: no PoP answering, or a stream that
    /// no up PoP offers. The engine reports them (GUI) or gives up after a while (headless).
    /// Ages are measured on the timer granularity (`ping_interval` at worst).
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(since) = self.no_pop_since {
            if self.refused.is_empty() {
                out.push(Problem::NoPop { since });
            }
            for (pop, (why, at)) in &self.refused {
                out.push(Problem::Refused {
                    pop: *pop,
                    why: why.clone(),
                    since: since.min(*at),
                });
            }
        }
        let any_list = self
            .pops
            .iter()
            .any(|p| p.status == PopStatus::Up && p.channels_at.is_some());
        for s in self.streams.values() {
            let Some(since) = s.waiting_since else {
                continue;
            };
            // Only once some up PoP has answered a list: before that we do not know yet.
            if any_list && !self.union.contains(&s.name) {
                out.push(Problem::NotOffered {
                    stream: s.name.clone(),
                    since,
                    offered: self.union.iter().cloned().collect(),
                });
            }
        }
        out
    }

    fn update_waiting(&mut self, now: Instant) {
        if self.pops.iter().any(|p| p.status == PopStatus::Up) {
            self.no_pop_since = None;
        } else {
            self.no_pop_since.get_or_insert(now);
        }
        for s in self.streams.values_mut() {
            if s.feed.is_empty() {
                s.waiting_since.get_or_insert(now);
            } else {
                s.waiting_since = None;
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// The union of the up PoPs' channel names.
    pub fn channel_names(&self) -> Vec<String> {
        self.union.iter().cloned().collect()
    }

    /// A copy of the state for the GUI and the exit summary.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut streams: Vec<StreamView> = self
            .streams
            .values()
            .map(|s| StreamView {
                name: s.name.clone(),
                pop: s.primary(),
                pops: s.pops(),
                packets: s.packets,
                bytes: s.bytes,
                lost: lost(s),
                cc_lost: s.cc.lost(),
                duplicates: duplicates(s),
                source_changes: s.source_changes,
                playout: counters(s),
            })
            .collect();
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            uptime: now.saturating_duration_since(self.start),
            pops: self
                .pops
                .iter()
                .map(|p| PopView {
                    addr: p.addr,
                    status: p.status,
                    rtt: p.srtt(),
                    channels: p.channels.len(),
                })
                .collect(),
            channels: self.channel_names(),
            streams,
            notices: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn update_union(&mut self) {
        let union: BTreeSet<String> = self
            .pops
            .iter()
            .filter(|p| p.status == PopStatus::Up)
            .flat_map(|p| p.channels.iter().map(|c| c.name.clone()))
            .collect();
        if union != self.union {
            self.union = union;
            self.actions.push_back(Action::Event(StatEvent::Streams {
                names: self.union.iter().cloned().collect(),
            }));
        }
    }

    /// Whether the first choice may be made: every PoP has answered a list or is down, or the
    /// settle time is over.
    fn settled(&self) -> bool {
        self.pops.iter().all(|p| match p.status {
            PopStatus::Down => true,
            PopStatus::Up => p.channels_at.is_some(),
            PopStatus::Unknown => false,
        })
    }

    /// The up PoP with the lowest RTT that lists `name`, other than those in `exclude` (ties:
    /// `--servers` order); a PoP in its hold-down (down not long ago) only if no other one
    /// lists it, and never if `usable_only`.
    fn best_pop(
        &self,
        name: &str,
        exclude: &[SocketAddr],
        usable_only: bool,
    ) -> Option<(SocketAddr, ChannelId)> {
        self.pops
            .iter()
            .filter(|p| p.status == PopStatus::Up && !exclude.contains(&p.addr))
            .filter(|p| !usable_only || self.liveness.is_usable(self.now, p.addr))
            .filter_map(|p| p.lists(name).map(|id| (p, id)))
            .min_by_key(|(p, _)| {
                (
                    !self.liveness.is_usable(self.now, p.addr),
                    p.srtt().unwrap_or(Duration::MAX),
                )
            })
            .map(|(p, id)| (p.addr, id))
    }

    fn fail_over(&mut self, down: &[SocketAddr]) {
        for (&id, s) in &mut self.streams {
            let Some(primary) = s.primary() else {
                continue;
            };
            let lost: Vec<SocketAddr> = s
                .feed
                .peers()
                .into_iter()
                .filter(|p| down.contains(p))
                .collect();
            if lost.is_empty() {
                continue;
            }
            for &p in &lost {
                // A lost primary's secondary is promoted.
                s.feed.remove(p);
            }
            for &old in &lost {
                if let Some(channel) = s.channel {
                    // Best effort: if the PoP is only cut off for a while, stop it sending to
                    // us.
                    self.actions.push_back(Action::SendReliable {
                        to: old,
                        msg: Message::Unsubscribe { channel },
                    });
                }
            }
            match s.feed.primary().copied() {
                // Every path lost: a source change when another PoP is found.
                None => s.lost_pop = Some(primary),
                // The survivor numbers the stream differently (another origin): a source change
                // to it.
                Some(p) if p.mismatched && lost.contains(&primary) => {
                    let to = p.peer;
                    restart(id, s, self.now, &mut self.output);
                    s.source_changes += 1;
                    self.actions
                        .push_back(Action::Event(StatEvent::SourceChanged {
                            stream: s.name.clone(),
                            from: primary,
                            to,
                        }));
                }
                // The other path carries on (it is the primary now): nothing to reset.
                Some(p) => {
                    let survivor = p.peer;
                    for pop in lost {
                        self.actions.push_back(Action::Event(StatEvent::PathLost {
                            stream: s.name.clone(),
                            pop,
                            primary: survivor,
                        }));
                    }
                }
            }
        }
        // The streams that lost their PoP subscribe elsewhere now if possible (the settle delay
        // applies only to the first choice).
        self.assign(true);
    }

    fn assign_waiting(&mut self) {
        self.assign(false);
    }

    /// Subscribes every stream without a PoP at the best candidate, and, with redundancy, every
    /// stream with fewer paths than that at the best other usable candidates.
    fn assign(&mut self, failover: bool) {
        let redundancy = self.cfg.redundancy.clamp(1, 2);
        let ids: Vec<ChannelId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.feed.len() < redundancy)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let s = &self.streams[&id];
            let name = s.name.clone();
            // Never played: wait until every PoP has had its chance to answer.
            if !s.played && !failover && !self.settled() && !self.settle_over() {
                continue;
            }
            if s.feed.is_empty() {
                let Some((pop, channel)) = self.best_pop(&name, &[], false) else {
                    continue;
                };
                self.subscribe_primary(id, pop, channel);
            }
            while self.streams[&id].feed.len() < redundancy {
                let have = self.streams[&id].pops();
                let Some((pop, channel)) = self.best_pop(&name, &have, true) else {
                    break;
                };
                let now = self.now;
                let s = self.streams.get_mut(&id).expect("listed above");
                s.feed.add(pop, now);
                self.actions.push_back(Action::SendReliable {
                    to: pop,
                    msg: Message::Subscribe { channel },
                });
                self.actions.push_back(Action::Event(StatEvent::PathAdded {
                    stream: name.clone(),
                    pop,
                }));
            }
        }
    }

    /// A stream without a PoP subscribes at `pop`: a `play`, or a `source_changed` (its
    /// sequence tracking and jitter buffer restart).
    fn subscribe_primary(&mut self, id: ChannelId, pop: SocketAddr, channel: ChannelId) {
        let now = self.now;
        let s = self.streams.get_mut(&id).expect("caller checked");
        s.feed.add(pop, now);
        s.channel = Some(channel);
        restart(id, s, now, &mut self.output);
        self.actions.push_back(Action::SendReliable {
            to: pop,
            msg: Message::Subscribe { channel },
        });
        let ev = match (s.played, s.lost_pop.take()) {
            (false, _) => {
                s.played = true;
                StatEvent::Play {
                    stream: s.name.clone(),
                    pop,
                }
            }
            (true, from) => {
                s.source_changes += 1;
                StatEvent::SourceChanged {
                    stream: s.name.clone(),
                    from: from.unwrap_or(pop),
                    to: pop,
                }
            }
        };
        self.actions.push_back(Action::Event(ev));
    }

    fn settle_over(&self) -> bool {
        self.now >= self.start + self.cfg.settle
    }
}

/// A source change: what the jitter buffer held goes to the sinks, then sequence tracking and
/// the jitter buffer start afresh.
fn restart(id: ChannelId, s: &mut Stream, now: Instant, output: &mut VecDeque<(ChannelId, Bytes)>) {
    s.seq.reset();
    if let Some(mut p) = s.playout.take() {
        p.reset(now);
        while let Some(b) = p.poll_release(now) {
            deliver(id, s, b, output);
        }
        s.playout = Some(p);
    }
    s.cc.reset_pids();
}

fn stats_event(name: &str, pop: SocketAddr, s: &Stream) -> StatEvent {
    let c = counters(s);
    StatEvent::Stats {
        stream: name.to_string(),
        pop,
        packets: s.packets,
        bytes: s.bytes,
        lost: lost(s),
        cc_lost: s.cc.lost(),
        duplicates: duplicates(s),
        source_changes: s.source_changes,
        late: c.late,
        skipped: c.skipped,
        recovered: c.recovered,
        nacks: c.nacks,
        retransmitted: c.retransmitted,
        pops: s.pops(),
        received: s.received.clone(),
    }
}

fn counters(s: &Stream) -> PlayoutCounters {
    s.playout
        .as_ref()
        .map(Playout::counters)
        .unwrap_or_default()
}

/// Lost for the viewer: skipped by the jitter buffer, or sequence gaps in pass-through.
fn lost(s: &Stream) -> u64 {
    match &s.playout {
        Some(p) => p.counters().skipped,
        None => s.seq.lost(),
    }
}

fn duplicates(s: &Stream) -> u64 {
    match &s.playout {
        Some(p) => p.counters().duplicates,
        None => s.seq.duplicates() + s.stale,
    }
}

/// Hands a payload to the stream's sinks: counts it and checks TS continuity (in release
/// order; TS-level duplicates are counted by the checker and passed through).
fn deliver(id: ChannelId, s: &mut Stream, b: Bytes, output: &mut VecDeque<(ChannelId, Bytes)>) {
    s.packets += 1;
    s.bytes += b.len() as u64;
    for pkt in datagram_packets(&b).flatten() {
        s.cc.push(&pkt);
    }
    output.push_back((id, b));
}

/// Whether a decoder can start at this datagram: the server's `KEYFRAME` flag, or a random
/// access point starting a video PES (audio packets carry the indicator too).
pub fn is_keyframe(flags: u8, payload: &[u8]) -> bool {
    flags & video_flags::KEYFRAME != 0
        || payload.chunks(188).any(|c| {
            common::ts::TsPacket::parse(c).is_ok_and(|p| {
                p.random_access_indicator()
                    && p.payload_unit_start()
                    && matches!(p.payload(), [0, 0, 1, id, ..] if id & 0xF0 == 0xE0)
            })
        })
}

/// How many `interval`s (at least one) cover `timeout`.
fn periods(timeout: Duration, interval: Duration) -> u32 {
    let n = timeout
        .as_nanos()
        .div_ceil(interval.as_nanos().max(1))
        .max(1);
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The next deadline of a periodic timer: one period on, or one period from `now` if it fell
/// behind (no burst of catch-up ticks).
fn advance(deadline: Instant, period: Duration, now: Instant) -> Instant {
    let next = deadline + period;
    if next <= now {
        now + period
    } else {
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 8010))
    }

    fn info(name: &str) -> ChannelInfo {
        ChannelInfo {
            id: ChannelId::of_name(name),
            name: name.into(),
        }
    }

    /// A fake PoP of the simulation.
    struct FakePop {
        addr: SocketAddr,
        rtt: Duration,
        alive: bool,
        channels: Vec<ChannelInfo>,
        /// Loss of every unreliable datagram (pings, pongs, lists, video), each way.
        loss: f64,
        /// Channels we are subscribed to there (the reliable channel never loses).
        subs: BTreeSet<ChannelId>,
    }

    impl FakePop {
        fn new(a: SocketAddr, rtt_ms: u64, channels: &[&str]) -> FakePop {
            FakePop {
                addr: a,
                rtt: Duration::from_millis(rtt_ms),
                alive: true,
                channels: channels.iter().map(|n| info(n)).collect(),
                loss: 0.0,
                subs: BTreeSet::new(),
            }
        }
    }

    /// What a fake PoP sends the core.
    enum Msg {
        Ctl(Message),
        Video(VideoPacket),
    }

    /// A live channel at the origin: every PoP subscribed to it relays each datagram (same
    /// seq everywhere), after half its RTT, losing it with its `loss`.
    struct Origin {
        name: String,
        interval: Duration,
        next_at: Instant,
        seq: u64,
        /// A keyframe every this many datagrams.
        gop: u64,
    }

    /// Discrete-event simulation: the core plus fake PoPs answering after their RTT.
    struct Sim {
        core: ClientCore,
        now: Instant,
        pops: Vec<FakePop>,
        /// (deliver at, from, message)
        inflight: Vec<(Instant, SocketAddr, Msg)>,
        origin: Option<Origin>,
        rng: common::rng::Rng,
        events: Vec<(Instant, StatEvent)>,
        reliable: Vec<(SocketAddr, Message)>,
        /// NACKs sent: (to, seqs).
        nacks: Vec<(SocketAddr, Vec<u64>)>,
        /// What reached the sinks.
        output: Vec<(ChannelId, Bytes)>,
        /// Pings sent, per PoP.
        pings: BTreeMap<SocketAddr, u64>,
    }

    impl Sim {
        fn new(pops: Vec<FakePop>) -> Sim {
            Sim::with(CoreConfig::default(), pops)
        }

        fn with(cfg: CoreConfig, pops: Vec<FakePop>) -> Sim {
            let now = Instant::now();
            let addrs: Vec<SocketAddr> = pops.iter().map(|p| p.addr).collect();
            Sim {
                core: ClientCore::new(cfg, &addrs, now),
                now,
                pops,
                inflight: Vec::new(),
                origin: None,
                rng: common::rng::Rng::seeded(7),
                events: Vec::new(),
                reliable: Vec::new(),
                nacks: Vec::new(),
                output: Vec::new(),
                pings: BTreeMap::new(),
            }
        }

        fn pop(&mut self, a: SocketAddr) -> &mut FakePop {
            self.pops.iter_mut().find(|p| p.addr == a).unwrap()
        }

        fn collect(&mut self) {
            while let Some(o) = self.core.poll_output() {
                self.output.push(o);
            }
            while let Some(a) = self.core.poll_action() {
                match a {
                    Action::SendUnreliable {
                        to,
                        msg: Message::Nack { seqs, .. },
                    } => self.nacks.push((to, seqs)),
                    Action::SendUnreliable { to, msg } => {
                        if matches!(msg, Message::Ping { .. }) {
                            *self.pings.entry(to).or_default() += 1;
                        }
                        let p = self.pops.iter().find(|p| p.addr == to).unwrap();
                        if !p.alive || self.rng.chance(p.loss) || self.rng.chance(p.loss) {
                            continue;
                        }
                        let reply = match msg {
                            Message::Ping { nonce } => Message::Pong { nonce },
                            Message::ListChannels => Message::Channels {
                                page: 0,
                                pages: 1,
                                channels: p.channels.clone(),
                            },
                            other => panic!("unexpected {other:?}"),
                        };
                        self.inflight.push((self.now + p.rtt, to, Msg::Ctl(reply)));
                    }
                    Action::SendReliable { to, msg } => {
                        let p = self.pops.iter_mut().find(|p| p.addr == to).unwrap();
                        if p.alive {
                            match &msg {
                                Message::Subscribe { channel } => {
                                    p.subs.insert(*channel);
                                }
                                Message::Unsubscribe { channel } => {
                                    p.subs.remove(channel);
                                }
                                _ => {}
                            }
                        }
                        self.reliable.push((to, msg));
                    }
                    Action::Event(e) => self.events.push((self.now, e)),
                }
            }
        }

        /// Runs the simulation until `now + d`.
        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            loop {
                self.collect();
                let next_msg = self.inflight.iter().map(|m| m.0).min();
                let next_video = self.origin.as_ref().map(|o| o.next_at);
                let next = [next_msg, next_video, Some(self.core.poll_timeout())]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap();
                if next > end {
                    self.now = end;
                    break;
                }
                self.now = self.now.max(next);
                if next_msg == Some(next) {
                    let i = self.inflight.iter().position(|m| m.0 == next).unwrap();
                    let (_, from, msg) = self.inflight.remove(i);
                    // A PoP that died drops what it had in flight too.
                    if self.pops.iter().any(|p| p.addr == from && p.alive) {
                        match msg {
                            Msg::Ctl(m) => self.core.handle_message(self.now, from, m),
                            Msg::Video(v) => {
                                self.core.handle_video(self.now, from, v);
                            }
                        }
                    }
                } else if next_video == Some(next) {
                    self.origin_tick();
                } else {
                    self.core.handle_timeout(self.now);
                }
            }
            self.collect();
        }

        fn play(&mut self, name: &str) {
            self.core.play(self.now, name);
            self.collect();
        }

        /// Starts the origin of channel `name`: a datagram every `interval`, seq from 1000.
        fn live(&mut self, name: &str, interval: Duration) {
            self.origin = Some(Origin {
                name: name.to_owned(),
                interval,
                next_at: self.now,
                seq: 1000,
                gop: 25,
            });
        }

        fn origin_tick(&mut self) {
            let o = self.origin.as_mut().unwrap();
            let id = ChannelId::of_name(&o.name);
            let packet = numbered(&o.name, o.seq, o.seq.is_multiple_of(o.gop), 0);
            o.seq += 1;
            o.next_at += o.interval;
            for p in &self.pops {
                if p.alive && p.subs.contains(&id) && !self.rng.chance(p.loss) {
                    let v = Msg::Video(packet.clone());
                    self.inflight.push((self.now + p.rtt / 2, p.addr, v));
                }
            }
        }

        /// The seqs the sinks got, in order.
        fn output_seqs(&self) -> Vec<u64> {
            self.output.iter().map(|(_, b)| seq_of(b)).collect()
        }

        fn source_changes(&self) -> Vec<(SocketAddr, SocketAddr)> {
            self.events
                .iter()
                .filter_map(|(_, e)| match e {
                    StatEvent::SourceChanged { from, to, .. } => Some((*from, *to)),
                    _ => None,
                })
                .collect()
        }

        fn subscribes(&self) -> Vec<SocketAddr> {
            self.reliable
                .iter()
                .filter(|(_, m)| matches!(m, Message::Subscribe { .. }))
                .map(|(a, _)| *a)
                .collect()
        }

        fn stream_pop(&self, name: &str) -> Option<SocketAddr> {
            self.core.streams[&ChannelId::of_name(name)].primary()
        }

        fn stream_pops(&self, name: &str) -> Vec<SocketAddr> {
            self.core.streams[&ChannelId::of_name(name)].pops()
        }
    }

    fn two_pops() -> Sim {
        Sim::new(vec![
            FakePop::new(addr(2), 30, &["news", "sport"]),
            FakePop::new(addr(3), 5, &["news", "film"]),
        ])
    }

    fn video(name: &str, seq: u64) -> VideoPacket {
        VideoPacket {
            channel: ChannelId::of_name(name),
            seq,
            flags: video_flags::KEYFRAME,
            payload: Bytes::from(vec![0x47; 188]),
        }
    }

    #[test]
    fn pops_come_up_and_rtt_is_measured() {
        let mut sim = two_pops();
        sim.run_for(Duration::from_secs(3));
        let snap = sim.core.snapshot(sim.now);
        assert!(snap.pops.iter().all(|p| p.status == PopStatus::Up));
        assert_eq!(snap.pops[0].rtt, Some(Duration::from_millis(30)));
        assert_eq!(snap.pops[1].rtt, Some(Duration::from_millis(5)));
        // Pinged every 100 ms: 31 pings each in [0, 3 s].
        assert_eq!(sim.core.nonce, 62);
    }

    #[test]
    fn channel_list_is_the_union_over_live_pops() {
        let mut sim = two_pops();
        sim.run_for(Duration::from_secs(2));
        assert_eq!(sim.core.channel_names(), ["film", "news", "sport"]);
        let last_streams = |sim: &Sim| {
            sim.events
                .iter()
                .rev()
                .find_map(|(_, e)| match e {
                    StatEvent::Streams { names } => Some(names.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(last_streams(&sim), ["film", "news", "sport"]);
        sim.pop(addr(3)).alive = false;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.core.channel_names(), ["news", "sport"]);
        assert_eq!(last_streams(&sim), ["news", "sport"]);
        let downs: Vec<_> = sim
            .events
            .iter()
            .filter(|(_, e)| matches!(e, StatEvent::Pop { up: false, .. }))
            .collect();
        assert_eq!(downs.len(), 1);
    }

    #[test]
    fn best_rtt_is_chosen() {
        let mut sim = two_pops();
        sim.play("news");
        assert!(sim.subscribes().is_empty(), "waits for the PoPs to answer");
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.subscribes(), [addr(3)]);
        assert_eq!(sim.stream_pop("news"), Some(addr(3)));
        assert!(sim.events.iter().any(|(_, e)| matches!(e,
            StatEvent::Play { stream, pop } if stream == "news" && *pop == addr(3))));
        // A channel only the slower PoP has is played from there.
        sim.play("sport");
        assert_eq!(sim.stream_pop("sport"), Some(addr(2)));
    }

    #[test]
    fn pop_down_moves_to_next_best_and_reports_it() {
        let mut sim = two_pops();
        sim.play("news");
        sim.run_for(Duration::from_secs(2));
        assert_eq!(sim.stream_pop("news"), Some(addr(3)));
        sim.pop(addr(3)).alive = false;
        let died = sim.now;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.stream_pop("news"), Some(addr(2)));
        assert_eq!(sim.source_changes(), [(addr(3), addr(2))]);
        let mut subs = sim.subscribes();
        subs.dedup(); // (re-sent while no video came: see stalled_subscription_is_renewed)
        assert_eq!(subs, [addr(3), addr(2)]);
        // Detected within pop_timeout (800 ms) of the last pong (at most a ping period before
        // the death), then moved at once.
        let at = sim
            .events
            .iter()
            .find(|(_, e)| matches!(e, StatEvent::SourceChanged { .. }))
            .unwrap()
            .0;
        assert!(at - died <= Duration::from_millis(800), "{:?}", at - died);
        // Best effort unsubscribe from the dead PoP.
        assert!(sim
            .reliable
            .iter()
            .any(|(a, m)| *a == addr(3) && matches!(m, Message::Unsubscribe { .. })));
        assert_eq!(sim.core.snapshot(sim.now).streams[0].source_changes, 1);
    }

    #[test]
    fn recovered_pop_does_not_take_the_stream_back() {
        let mut sim = two_pops();
        sim.play("news");
        sim.run_for(Duration::from_secs(2));
        sim.pop(addr(3)).alive = false;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.stream_pop("news"), Some(addr(2)));
        sim.pop(addr(3)).alive = true;
        // One pong is not enough to be up again.
        sim.run_for(Duration::from_millis(60));
        assert_eq!(
            sim.core.snapshot(sim.now).pops[1].status,
            PopStatus::Down,
            "one pong does not bring it back"
        );
        sim.run_for(Duration::from_secs(10));
        assert_eq!(sim.core.snapshot(sim.now).pops[1].status, PopStatus::Up);
        assert_eq!(sim.stream_pop("news"), Some(addr(2)), "no flapping back");
        assert_eq!(sim.source_changes().len(), 1);
        // ...but when the current one dies, the recovered one is used again.
        sim.pop(addr(2)).alive = false;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(
            sim.source_changes(),
            [(addr(3), addr(2)), (addr(2), addr(3))]
        );
    }

    #[test]
    fn a_stream_waits_while_no_live_pop_lists_it() {
        let mut sim = two_pops();
        sim.play("weather");
        sim.run_for(Duration::from_secs(2));
        assert!(sim.subscribes().is_empty());
        assert_eq!(sim.stream_pop("weather"), None);
        sim.pop(addr(2)).channels.push(info("weather"));
        sim.run_for(Duration::from_millis(1100));
        assert_eq!(sim.subscribes(), [addr(2)]);
        // Its only PoP dies: it waits again, and resumes (source_changed) when one lists it.
        sim.pop(addr(2)).alive = false;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.stream_pop("weather"), None);
        sim.pop(addr(3)).channels.push(info("weather"));
        sim.run_for(Duration::from_millis(1100));
        assert_eq!(sim.stream_pop("weather"), Some(addr(3)));
        assert_eq!(sim.source_changes(), [(addr(2), addr(3))]);
    }

    /// Streams are keyed by `ChannelId::of_name(name)`: a PoP listing a name under another id
    /// does not offer that channel (its video could never reach the stream).
    #[test]
    fn a_listed_id_that_is_not_the_names_hash_is_not_that_channel() {
        let mut sim = two_pops();
        sim.pop(addr(2)).channels.push(ChannelInfo {
            id: ChannelId::of_name("something else"),
            name: "weird".into(),
        });
        sim.play("weird");
        sim.run_for(Duration::from_secs(2));
        assert!(sim.subscribes().is_empty());
        assert_eq!(sim.core.name_of(ChannelId::of_name("weird")), Some("weird"));
    }

    /// The problems a user is told about: a stream nobody offers (named, with what is offered),
    /// and no PoP answering (from the start, and again after every PoP died).
    #[test]
    fn problems_name_what_keeps_the_user_from_watching() {
        let mut sim = two_pops();
        let t0 = sim.now;
        // Before any pong: no PoP answers, since the start.
        assert_eq!(sim.core.problems(), [Problem::NoPop { since: t0 }]);
        sim.play("news");
        sim.play("nosuch");
        sim.run_for(Duration::from_secs(2));
        let p = sim.core.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        match &p[0] {
            Problem::NotOffered {
                stream,
                since,
                offered,
            } => {
                assert_eq!(stream, "nosuch");
                assert_eq!(*since, t0);
                assert_eq!(offered, &["film", "news", "sport"]);
            }
            other => panic!("{other:?}"),
        }
        // Offered after all: no problem any more.
        sim.pop(addr(3)).channels.push(info("nosuch"));
        sim.run_for(Duration::from_millis(1100));
        assert!(sim.core.problems().is_empty(), "{:?}", sim.core.problems());
        // Every PoP dies: no PoP answers, since about when they were declared down; the
        // streams wait, but whether they are offered is unknown (no list), so only NoPop.
        sim.pop(addr(2)).alive = false;
        sim.pop(addr(3)).alive = false;
        let died = sim.now;
        sim.run_for(Duration::from_secs(3));
        let p = sim.core.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(matches!(p[0], Problem::NoPop { .. }), "{p:?}");
        let since = p[0].since();
        assert!(
            since > died && since < died + Duration::from_secs(2),
            "{p:?}"
        );
    }

    fn two_pops_with(cfg: CoreConfig) -> Sim {
        let mut sim = two_pops();
        let pops = std::mem::take(&mut sim.pops);
        Sim::with(cfg, pops)
    }

    fn seq_of(b: &Bytes) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    /// A datagram whose payload starts with its seq (keyframe flag on request).
    fn numbered(name: &str, seq: u64, key: bool, flags: u8) -> VideoPacket {
        VideoPacket {
            channel: ChannelId::of_name(name),
            seq,
            flags: flags | if key { video_flags::KEYFRAME } else { 0 },
            payload: Bytes::from(seq.to_be_bytes().to_vec()),
        }
    }

    #[test]
    fn jitter_buffer_reorders_nacks_and_counts() {
        let mut sim = two_pops();
        sim.play("news");
        sim.run_for(Duration::from_secs(1));
        let a = addr(3);
        let t = sim.now;
        // 100 is the keyframe; 103 is lost, 102 and 101 swapped, 101 duplicated.
        for (seq, key) in [
            (100, true),
            (102, false),
            (101, false),
            (101, false),
            (104, false),
        ] {
            sim.core.handle_video(t, a, numbered("news", seq, key, 0));
        }
        sim.collect();
        let got: Vec<u64> = sim.output.iter().map(|(_, b)| seq_of(b)).collect();
        assert_eq!(got, [100, 101, 102]);
        // The gap is NACKed to the stream's PoP after the reorder delay...
        sim.run_for(Duration::from_millis(10));
        assert_eq!(sim.nacks, [(a, vec![103])]);
        // ...and the retransmission fills it.
        let now = sim.now;
        sim.core.handle_video(
            now,
            a,
            numbered("news", 103, false, video_flags::RETRANSMIT),
        );
        sim.collect();
        let got: Vec<u64> = sim.output.iter().map(|(_, b)| seq_of(b)).collect();
        assert_eq!(got, [100, 101, 102, 103, 104]);
        let v = &sim.core.snapshot(now).streams[0];
        assert_eq!((v.packets, v.lost, v.duplicates), (5, 0, 1));
        // 101 (a late original) and 103 filled gaps.
        assert_eq!(
            (
                v.playout.recovered,
                v.playout.nacks,
                v.playout.retransmitted
            ),
            (2, 1, 1)
        );
        // A gap never repaired is skipped after the latency (the core's timer does it), and
        // the retransmission arriving after that is late.
        sim.core
            .handle_video(now, a, numbered("news", 106, false, 0));
        sim.run_for(Duration::from_millis(199));
        assert_eq!(sim.output.len(), 5);
        sim.run_for(Duration::from_millis(2));
        assert_eq!(seq_of(&sim.output.last().unwrap().1), 106);
        let now = sim.now;
        assert!(sim
            .core
            .handle_video(now, a, numbered("news", 105, false, 0))
            .is_none());
        let v = &sim.core.snapshot(now).streams[0];
        assert_eq!((v.lost, v.playout.skipped, v.playout.late), (1, 1, 1));
        assert!(v.playout.nacks > 1);
        sim.collect();
        sim.events.clear();
        sim.run_for(Duration::from_secs(1));
        let stats = sim
            .events
            .iter()
            .find_map(|(_, e)| match e {
                StatEvent::Stats {
                    skipped, recovered, ..
                } => Some((*skipped, *recovered)),
                _ => None,
            })
            .unwrap();
        assert_eq!(stats, (1, 2));
    }

    #[test]
    fn no_recovery_sends_no_nacks_and_source_change_flushes() {
        let mut sim = two_pops_with(CoreConfig {
            recovery: false,
            ..CoreConfig::default()
        });
        sim.play("news");
        sim.run_for(Duration::from_secs(1));
        let (a, b) = (addr(3), addr(2));
        let t = sim.now;
        for seq in [10, 12, 13] {
            sim.core
                .handle_video(t, a, numbered("news", seq, seq == 10, 0));
        }
        sim.run_for(Duration::from_millis(50));
        assert!(sim.nacks.is_empty());
        assert_eq!(sim.output.len(), 1);
        // The PoP dies: its held datagrams are released at the source change (11 skipped).
        sim.pop(a).alive = false;
        sim.run_for(Duration::from_secs(2));
        assert_eq!(sim.stream_pop("news"), Some(b));
        let got: Vec<u64> = sim.output.iter().map(|(_, b)| seq_of(b)).collect();
        assert_eq!(got, [10, 12, 13]);
        // The replica numbers differently; it starts at its keyframe.
        let now = sim.now;
        for seq in [5_000_001, 5_000_000] {
            sim.core
                .handle_video(now, b, numbered("news", seq, seq == 5_000_000, 0));
        }
        sim.collect();
        let got: Vec<u64> = sim.output.iter().map(|(_, b)| seq_of(b)).collect();
        assert_eq!(got, [10, 12, 13, 5_000_000, 5_000_001]);
        assert_eq!(sim.core.snapshot(now).streams[0].lost, 1);
    }

    #[test]
    fn video_is_deduplicated_counted_and_reset_on_source_change() {
        // Pass-through (--latency 0): the old behaviour.
        let mut sim = two_pops_with(CoreConfig {
            latency: Duration::ZERO,
            ..CoreConfig::default()
        });
        sim.play("news");
        sim.run_for(Duration::from_secs(1));
        let (a, b) = (addr(3), addr(2));
        let now = sim.now;
        let mut got = 0;
        for seq in [100, 101, 101, 103, 102, 100] {
            if sim.core.handle_video(now, a, video("news", seq)).is_some() {
                got += 1;
            }
        }
        assert_eq!(got, 4);
        // Not from the stream's PoP, or not a channel we play: ignored.
        assert!(sim.core.handle_video(now, b, video("news", 104)).is_none());
        assert!(sim.core.handle_video(now, a, video("film", 1)).is_none());
        sim.collect();
        let firsts = sim
            .events
            .iter()
            .filter(|(_, e)| matches!(e, StatEvent::FirstPacket { .. }))
            .count();
        assert_eq!(firsts, 1);
        let v = &sim.core.snapshot(now).streams[0];
        assert_eq!(
            (v.packets, v.bytes, v.lost, v.duplicates),
            (4, 4 * 188, 0, 2)
        );
        sim.core.handle_video(now, a, video("news", 110));
        assert_eq!(sim.core.snapshot(now).streams[0].lost, 6);
        // Failover to a replica with an unrelated numbering: not a loss.
        sim.pop(a).alive = false;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.stream_pop("news"), Some(b));
        assert!(sim
            .core
            .handle_video(sim.now, b, video("news", 5))
            .is_some());
        assert!(sim
            .core
            .handle_video(sim.now, b, video("news", 6))
            .is_some());
        assert_eq!(sim.core.snapshot(sim.now).streams[0].lost, 6);
    }

    #[test]
    fn periodic_stats_and_stop() {
        let mut sim = two_pops();
        sim.play("news");
        sim.run_for(Duration::from_secs(4));
        let stats = sim
            .events
            .iter()
            .filter(|(_, e)| matches!(e, StatEvent::Stats { .. }))
            .count();
        assert!((3..=4).contains(&stats), "{stats}");
        assert!(sim.core.stop(sim.now, "news", "user"));
        sim.collect();
        assert!(sim
            .reliable
            .iter()
            .any(|(a, m)| *a == addr(3) && matches!(m, Message::Unsubscribe { .. })));
        assert!(matches!(
            sim.events.last().unwrap().1,
            StatEvent::Stop { .. }
        ));
        assert!(!sim.core.stop(sim.now, "news", "user"));
    }

    #[test]
    fn stalled_subscription_is_renewed() {
        let mut sim = two_pops();
        sim.play("news");
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.subscribes().len(), 1);
        // No video at all for a while: Subscribe is re-sent every stall period.
        sim.run_for(Duration::from_millis(4100));
        assert_eq!(sim.subscribes(), [addr(3), addr(3), addr(3)]);
    }

    #[test]
    fn paged_channel_lists_are_assembled() {
        let mut sim = Sim::new(vec![FakePop::new(addr(2), 1, &[])]);
        sim.run_for(Duration::from_millis(100));
        let a = addr(2);
        let page = |p: u16, n: &str| Message::Channels {
            page: p,
            pages: 2,
            channels: vec![info(n)],
        };
        sim.core.handle_message(sim.now, a, page(1, "b"));
        assert!(sim.core.channel_names().is_empty());
        sim.core.handle_message(sim.now, a, page(0, "a"));
        assert_eq!(sim.core.channel_names(), ["a", "b"]);
        // Out-of-range and absurd page counts are ignored.
        sim.core.handle_message(
            sim.now,
            a,
            Message::Channels {
                page: 3,
                pages: 2,
                channels: vec![],
            },
        );
        assert_eq!(sim.core.channel_names(), ["a", "b"]);
        // A pong from an address we did not ping is ignored.
        sim.core
            .handle_message(sim.now, addr(9), Message::Pong { nonce: 1 });
    }

    fn event_time(sim: &Sim, f: impl Fn(&StatEvent) -> bool) -> Option<Instant> {
        sim.events.iter().find(|(_, e)| f(e)).map(|(t, _)| *t)
    }

    #[test]
    fn the_pop_in_use_is_pinged_fast_and_its_death_moves_the_stream_in_150_ms() {
        let mut sim = two_pops();
        sim.play("news");
        sim.live("news", Duration::from_millis(10));
        sim.run_for(Duration::from_secs(2));
        let (used, other) = (addr(3), addr(2));
        assert_eq!(sim.stream_pop("news"), Some(used));
        assert!(sim.core.liveness.is_fast(used) && !sim.core.liveness.is_fast(other));
        // One second: its video (every 10 ms) proves the PoP in use alive, so it gets only
        // the regular pings, like the other (~10 each, 2 per 0.5 s round... at 100 ms here).
        sim.pings.clear();
        sim.run_for(Duration::from_secs(1));
        assert!((9..=11).contains(&sim.pings[&used]), "{:?}", sim.pings);
        assert!((9..=11).contains(&sim.pings[&other]), "{:?}", sim.pings);
        // A silent feed is pinged fast again: ~40 pings in a second.
        sim.origin.as_mut().unwrap().interval = Duration::from_secs(3600);
        sim.run_for(Duration::from_millis(100));
        sim.pings.clear();
        sim.run_for(Duration::from_secs(1));
        assert!((38..=41).contains(&sim.pings[&used]), "{:?}", sim.pings);
        let o = sim.origin.as_mut().unwrap();
        (o.interval, o.next_at) = (Duration::from_millis(10), sim.now);
        sim.run_for(Duration::from_millis(500));
        assert_eq!(
            sim.stream_pop("news"),
            Some(used),
            "a silent but live feed stays"
        );
        sim.pop(used).alive = false;
        let died = sim.now;
        sim.run_for(Duration::from_secs(1));
        let at = event_time(&sim, |e| matches!(e, StatEvent::SourceChanged { .. })).unwrap();
        // Its last datagram came at most one video interval before it died.
        let took = at - died;
        assert!(
            took >= Duration::from_millis(135) && took <= Duration::from_millis(200),
            "{took:?}"
        );
        assert_eq!(sim.source_changes(), [(used, other)]);
        // The dead one is normal again (slow pings while it is down), the new one fast.
        assert!(!sim.core.liveness.is_fast(used));
        assert!(sim.core.liveness.is_fast(other));
        assert!(sim.output.len() > 250);
        // Stopping the stream makes it normal too.
        sim.core.stop(sim.now, "news", "user");
        sim.collect();
        assert!(!sim.core.liveness.is_fast(other));
    }

    #[test]
    fn a_pop_not_in_use_keeps_the_normal_timeout() {
        let mut sim = two_pops();
        sim.play("news");
        sim.live("news", Duration::from_millis(10));
        sim.run_for(Duration::from_secs(2));
        assert_eq!(sim.stream_pop("news"), Some(addr(3)));
        sim.pop(addr(2)).alive = false;
        let died = sim.now;
        sim.run_for(Duration::from_secs(2));
        let at = event_time(
            &sim,
            |e| matches!(e, StatEvent::Pop { pop, up: false, .. } if *pop == addr(2)),
        )
        .unwrap();
        // 800 ms after its last pong (at most a ping period and its RTT before the death).
        let took = at - died;
        assert!(
            took >= Duration::from_millis(670) && took <= Duration::from_millis(800),
            "{took:?}"
        );
        assert!(sim.source_changes().is_empty());
    }

    #[test]
    fn no_false_failover_at_ten_percent_loss_with_video_flowing() {
        for redundancy in [1, 2] {
            let mut sim = two_pops_with(CoreConfig {
                redundancy,
                ..CoreConfig::default()
            });
            for p in &mut sim.pops {
                p.loss = 0.10;
            }
            sim.rng = common::rng::Rng::seeded(1000 + redundancy as u64);
            sim.play("news");
            // 50 datagrams/s, 10 % lost each (and every ping, pong and list, each way).
            sim.live("news", Duration::from_millis(20));
            sim.run_for(Duration::from_secs(600));
            let downs = sim
                .events
                .iter()
                .filter(|(_, e)| matches!(e, StatEvent::Pop { up: false, .. }))
                .count();
            assert_eq!(downs, 0, "redundancy {redundancy}");
            assert!(sim.source_changes().is_empty());
            assert!(sim.core.liveness.is_fast(addr(3)));
            assert!(sim.output.len() > 20_000, "{}", sim.output.len());
        }
    }

    fn missing(seqs: &[u64]) -> u64 {
        let (first, last) = (seqs[0], *seqs.last().unwrap());
        last - first + 1 - seqs.len() as u64
    }

    #[test]
    fn redundancy_two_merges_two_lossy_paths() {
        for latency in [Duration::from_millis(200), Duration::ZERO] {
            let mut sim = two_pops_with(CoreConfig {
                redundancy: 2,
                recovery: false,
                latency,
                ..CoreConfig::default()
            });
            for p in &mut sim.pops {
                p.loss = 0.10;
            }
            sim.play("news");
            sim.live("news", Duration::from_millis(5));
            sim.run_for(Duration::from_secs(60));
            assert_eq!(sim.stream_pops("news"), [addr(3), addr(2)]);
            assert!(event_time(&sim, |e| matches!(e,
                StatEvent::PathAdded { pop, .. } if *pop == addr(2)))
            .is_some());
            let mut got = sim.output_seqs();
            if latency.is_zero() {
                // Pass-through: a copy from the slower path filling a gap comes out late.
                got.sort_unstable();
            }
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "in order, no duplicates"
            );
            let merged = missing(&got);
            let v = &sim.core.snapshot(sim.now).streams[0];
            assert_eq!(v.lost, merged, "latency {latency:?}");
            assert_eq!(v.pops, [addr(3), addr(2)]);
            // Each path alone lost ~10 %; merged, ~1 %.
            let s = &sim.core.streams[&ChannelId::of_name("news")];
            let sent = got.last().unwrap() - 1000 + 1;
            for p in [addr(2), addr(3)] {
                let path_lost = sent - s.received[&p];
                assert!(path_lost > sent / 20, "{p}: {path_lost} of {sent}");
                assert!(merged * 4 < path_lost, "merged {merged}, {p} {path_lost}");
            }
            assert!(merged > 0 && merged < sent / 50, "{merged} of {sent}");
            eprintln!(
                "latency {latency:?}: {sent} sent, lost {} / {} on the paths, {merged} merged",
                sent - s.received[&addr(3)],
                sent - s.received[&addr(2)]
            );
            // Every copy that arrived twice was dropped and counted (with a jitter buffer, a
            // few more were not delivered: before the first keyframe, or still held).
            let received: u64 = s.received.values().sum();
            let undelivered = received - got.len() as u64 - v.duplicates;
            assert!(v.duplicates > sent / 2, "{}", v.duplicates);
            if latency.is_zero() {
                assert_eq!(undelivered, 0);
            } else {
                assert!(undelivered < 100, "{undelivered}");
            }
            assert!(sim.source_changes().is_empty());
            // Stop: unsubscribed at both.
            sim.core.stop(sim.now, "news", "user");
            sim.collect();
            for p in [addr(2), addr(3)] {
                assert!(sim
                    .reliable
                    .iter()
                    .any(|(a, m)| *a == p && matches!(m, Message::Unsubscribe { .. })));
            }
        }
    }

    #[test]
    fn redundancy_two_loses_nothing_when_a_pop_dies() {
        let mut sim = Sim::with(
            CoreConfig {
                redundancy: 2,
                ..CoreConfig::default()
            },
            vec![
                FakePop::new(addr(2), 30, &["news"]),
                FakePop::new(addr(3), 5, &["news"]),
                FakePop::new(addr(4), 20, &["news"]),
            ],
        );
        sim.play("news");
        sim.live("news", Duration::from_millis(5));
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.stream_pops("news"), [addr(3), addr(4)]);
        assert!(sim.core.liveness.is_fast(addr(3)) && sim.core.liveness.is_fast(addr(4)));
        assert!(!sim.core.liveness.is_fast(addr(2)));
        // The primary dies.
        sim.pop(addr(3)).alive = false;
        let died = sim.now;
        sim.run_for(Duration::from_secs(3));
        let at = event_time(&sim, |e| matches!(e, StatEvent::PathLost { .. })).unwrap();
        assert!(at - died <= Duration::from_millis(200), "{:?}", at - died);
        assert!(sim.events.iter().any(|(_, e)| matches!(e,
            StatEvent::PathLost { pop, primary, .. } if *pop == addr(3) && *primary == addr(4))));
        // The survivor is the primary, the third PoP the new secondary; no source change.
        assert_eq!(sim.stream_pops("news"), [addr(4), addr(2)]);
        assert!(sim.source_changes().is_empty());
        let got = sim.output_seqs();
        assert!(
            got.windows(2).all(|w| w[1] == w[0] + 1),
            "no seq lost or repeated"
        );
        let v = &sim.core.snapshot(sim.now).streams[0];
        assert_eq!((v.lost, v.source_changes), (0, 0));
        assert!(got.len() > 1000);
        // The secondary dies too: still nothing lost, and no PoP left to add.
        sim.pop(addr(2)).alive = false;
        sim.run_for(Duration::from_secs(2));
        assert_eq!(sim.stream_pops("news"), [addr(4)]);
        let got = sim.output_seqs();
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
        // The first one recovers: it comes back as a secondary after its hold-down.
        sim.pop(addr(3)).alive = true;
        sim.run_for(Duration::from_secs(3));
        assert_eq!(
            sim.stream_pops("news"),
            [addr(4), addr(3)],
            "back as a secondary"
        );
        assert!(sim.source_changes().is_empty());
    }

    #[test]
    fn a_second_path_is_added_when_another_pop_lists_the_channel() {
        let mut sim = two_pops_with(CoreConfig {
            redundancy: 2,
            ..CoreConfig::default()
        });
        sim.play("sport");
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.stream_pops("sport"), [addr(2)]);
        sim.pop(addr(3)).channels.push(info("sport"));
        sim.run_for(Duration::from_millis(1100));
        assert_eq!(sim.stream_pops("sport"), [addr(2), addr(3)]);
        let mut subs = sim.subscribes();
        subs.dedup(); // (re-sent while no video came)
        assert_eq!(subs[..2], [addr(2), addr(3)]);
    }

    #[test]
    fn a_joining_pops_cache_burst_is_not_replayed_in_pass_through() {
        let mut sim = two_pops_with(CoreConfig {
            redundancy: 2,
            latency: Duration::ZERO,
            ..CoreConfig::default()
        });
        sim.play("news");
        sim.run_for(Duration::from_secs(1));
        let (a, b) = (addr(3), addr(2));
        assert_eq!(sim.stream_pops("news"), [a, b]);
        let t = sim.now;
        for seq in 1000..1400 {
            sim.core.handle_video(t, a, numbered("news", seq, false, 0));
        }
        // The other PoP's GOP cache, then its live datagrams.
        for seq in 1100..1400 {
            let p = numbered("news", seq, false, video_flags::FROM_CACHE);
            sim.core.handle_video(t, b, p);
        }
        for seq in 1400..1410 {
            sim.core.handle_video(t, b, numbered("news", seq, false, 0));
            sim.core.handle_video(t, a, numbered("news", seq, false, 0));
        }
        sim.collect();
        let got = sim.output_seqs();
        assert_eq!(got, (1000..1410).collect::<Vec<u64>>());
        let v = &sim.core.snapshot(t).streams[0];
        assert_eq!((v.lost, v.duplicates), (0, 300 + 10));
    }

    #[test]
    fn a_secondary_numbered_by_another_origin_is_not_merged() {
        let mut sim = two_pops_with(CoreConfig {
            redundancy: 2,
            recovery: false,
            ..CoreConfig::default()
        });
        sim.play("news");
        sim.run_for(Duration::from_secs(1));
        let (a, b) = (addr(3), addr(2));
        assert_eq!(sim.stream_pops("news"), [a, b]);
        for i in 0..50 {
            let t = sim.now;
            sim.core
                .handle_video(t, a, numbered("news", 100 + i, i.is_multiple_of(25), 0));
            sim.core.handle_video(
                t,
                b,
                numbered("news", 9_000_000 + i, i.is_multiple_of(25), 0),
            );
            sim.run_for(Duration::from_millis(5));
        }
        assert_eq!(sim.output_seqs(), (100..150).collect::<Vec<u64>>());
        let feed = &sim.core.streams[&ChannelId::of_name("news")].feed;
        assert!(feed.secondary().unwrap().mismatched);
        // The primary dies: the survivor's numbering is a new start (a source change).
        sim.pop(a).alive = false;
        sim.run_for(Duration::from_millis(300));
        assert_eq!(sim.stream_pops("news"), [b]);
        assert_eq!(sim.source_changes(), [(a, b)]);
        for i in 50..60 {
            let t = sim.now;
            sim.core.handle_video(
                t,
                b,
                numbered("news", 9_000_000 + i, i.is_multiple_of(25), 0),
            );
            sim.run_for(Duration::from_millis(5));
        }
        let got = sim.output_seqs();
        assert_eq!(got[50..], (9_000_050..9_000_060).collect::<Vec<u64>>());
    }
}

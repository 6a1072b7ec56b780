//! The relay engine: one tokio task that owns a host's [`Transport`] (from [`Joined`]), its
//! [`RoutingTable`] and [`Subscriptions`], and every timer (floods, pings, expiry, healing).
//!
//! Decisions and I/O are split: the engine's handlers (`command`, `incoming_item`,
//! `set_neighbours`, `housekeeping`) are synchronous, read no clock (the driver sets the
//! event's time once, `Engine::t`) and only queue what is to be sent (`Out`); the driver
//! (`Engine::run`, `Engine::flush`) reads the clock, sends the queue in order after each
//! event and feeds back the reliable channel's RTT estimates. This is the seam along which the
//! I/O-free relay core is being extracted.
//! Nodes run it with no local channel; servers also announce their own channels and feed their
//! video through the [`Relay`] handle.
//!
//! # Log lines (info unless said otherwise; fields in parentheses)
//!
//! * `"channel available"` (`channel`, `name`, `via`, `cost_us`, `hops`): the first route to a
//!   channel. Later changes of its best route are logged at debug (`"best route changed"`)
//!   and acted on only for watched channels (a move is logged as `"resubscribed"`).
//! * `"neighbours changed"` (`added`, `removed`): the bootstrapper pushed a topology edit.
//! * `"subscriber added"` / `"subscriber removed"` / `"subscriber expired"` (`channel`, `peer`).
//! * `"subscribe upstream"` / `"unsubscribe upstream"` (`channel`, `upstream`).
//! * `"local demand"` (`channel`, `watched`): a server's own channel became (un)watched.
//! * `"neighbour down"` / `"neighbour up"` (`peer`).
//! * `"upstream lost"` (warn; `channel`, `upstream`, `reason`), then either
//!   `"resubscribed"` (`channel`, `from`, `to`, `cost_us`, `reason`) or
//!   `"catastrophic fallback"` (warn; `channel`, `dead`, `parent`) or `"no route"` (warn).
//! * `"gop burst"` (debug; `channel`, `peer`, `datagrams`, `bytes`): a new subscriber was sent
//!   the channel's GOP cache (see [`crate::gop`]) before the live datagrams.
//! * `"flood_stats"` (debug, once per flood interval: `received`, `forwarded`, `messages_out`,
//!   `suppressed`, `loops`).
//!
//! Every line is inside the span `relay{node=<addr>}`.
//!
//! # Video path and GOP cache
//!
//! Every video datagram a relay sends (its own channels' on a server, the forwarded ones on a
//! node) is encoded once, pushed into the channel's [`GopCaches`] and sent to every subscriber.
//! A *new* subscriber of a channel first gets the cached GOP (from the last keyframe on, each
//! datagram flagged [`video_flags::FROM_CACHE`]) in the same task turn as its `Subscribe` is
//! handled, so the next live datagram follows the burst with no gap and no duplicate. A node
//! that starts receiving a channel for a new subscriber gets its upstream's burst, forwards it
//! and caches it. A datagram flagged `FROM_CACHE` that is not newer than what the relay already
//! forwarded (the burst of a new upstream after a switch) is dropped, so existing subscribers
//! never see sequence numbers go back. The cache of a channel is forgotten when the channel
//! stops being watched.
//!
//! # Loss recovery (per-hop NACK)
//!
//! With [`RelayConfig::recovery`] (the default; `--no-recovery` turns it off), every datagram
//! sent live to a channel's subscribers (the same encoded `Bytes`) also goes into the channel's
//! [`RetransmitBuffer`]; a `Nack` from a subscriber of the channel is answered from it, to that
//! subscriber only, flagged `RETRANSMIT` (one decode + encode per resend, a few % of the
//! traffic) so receivers can count the recovery overhead. A node tracks the video of each channel from its
//! current upstream with a [`NackTracker`] (deadline [`RelayConfig::recovery_deadline`]):
//! duplicates and datagrams whose gap was given up are dropped, new and recovered ones are
//! forwarded and buffered (so recovery also fills downstream gaps), a seq jump (reset) clears
//! the buffer. Due NACKs are sent (unreliably) to the upstream on every tick; the tracker's RTT
//! is the transport's SRTT of the upstream, refreshed on the reliable-ping rounds. A change of
//! upstream drops the tracker. See `report/protocol.md`, "Loss recovery".

use crate::gop::GopConfig;
use crate::relay_core::{Out, RelayCore};
use crate::routing::{FloodStats, RoutingConfig};
use crate::subscriptions::Upstream;
use bytes::Bytes;
use common::failure::FailureConfig;
use common::host::Joined;
use common::nack::RetransmitConfig;
use common::transport::{Incoming, Transport};
use common::wire::{ChannelId, ChannelInfo, PathHop};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

/// Tuning of a [`Relay`]. [`Default`] is the protocol's values.
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
    /// route. Default: 100 ms, k = 6, 2 s ([`RoutingConfig::default`]).
    pub failure: FailureConfig,
    /// A subscriber silent this long is dropped. Default 5 s.
    pub subscriber_timeout: Duration,
    /// How often one of the heartbeats to a live peer is sent reliably instead, so that its
    /// acknowledgement feeds the RTT estimate (link cost, liveness timeout). Default 500 ms.
    pub ping_interval: Duration,
    /// Granularity of the timers (expiry, death detection, reconciliation). Default 25 ms.
    pub tick: Duration,
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
            tick: Duration::from_millis(25),
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

pub(crate) enum Command {
    SetLocal(Vec<ChannelInfo>, oneshot::Sender<()>),
    Video {
        channel: ChannelId,
        payload: Bytes,
        keyframe: bool,
    },
    Stats(oneshot::Sender<RelayStats>),
    Demand(mpsc::Sender<(ChannelId, bool)>),
}

/// Handle to a running relay engine. Cheap to clone; every method is a no-op (or returns
/// defaults) once the engine has stopped.
#[derive(Debug, Clone)]
pub struct Relay {
    cmd: mpsc::Sender<Command>,
    local: PathHop,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::SetLocal(..) => "SetLocal",
            Command::Video { .. } => "Video",
            Command::Stats(_) => "Stats",
            Command::Demand(_) => "Demand",
        })
    }
}

/// Capacity of each local-demand channel.
const DEMAND_QUEUE: usize = 1024;

impl Relay {
    /// Starts the engine on the current tokio runtime. It runs until `shutdown` is cancelled
    /// (the transport of `joined` stops on its own token), then waits for the transport task.
    pub fn spawn(
        joined: Joined,
        cfg: RelayConfig,
        shutdown: CancellationToken,
    ) -> (Relay, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.command_queue.max(1));
        let me = PathHop {
            id: joined.me.id,
            addr: joined.me.addr,
        };
        let span = info_span!("relay", node = %me.addr);
        let engine = Engine::new(joined, cfg, rx);
        let task = tokio::spawn(engine.run(shutdown).instrument(span));
        (Relay { cmd: tx, local: me }, task)
    }

    /// This host's id and overlay address.
    pub fn local(&self) -> PathHop {
        self.local
    }

    /// Server only: the channels this host originates, flooded with `origin` = own id every
    /// flood interval (the first flood leaves at once). Replaces the previous set; removed
    /// channels stop being announced and their subscribers are dropped. At most
    /// [`limits::CHANNELS`] are announced. Returns once the engine has applied it.
    pub async fn set_local_channels(&self, channels: Vec<ChannelInfo>) {
        let (reply, rx) = oneshot::channel();
        if self
            .cmd
            .send(Command::SetLocal(channels, reply))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Server only: a new receiver of demand for local channels: `(channel, true)` when its
    /// first subscriber arrives, `(channel, false)` when its last leaves. Each call returns a
    /// new receiver that first gets `(channel, true)` for every local channel watched at the
    /// time it is registered, then every transition (so nothing is missed whenever it is
    /// called). Events are dropped (and logged) if the receiver lags by more than 1024. Call it
    /// within the tokio runtime (it spawns a task if the command queue happens to be full).
    pub fn local_demand(&self) -> mpsc::Receiver<(ChannelId, bool)> {
        let (tx, rx) = mpsc::channel(DEMAND_QUEUE);
        match self.cmd.try_send(Command::Demand(tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(c)) => {
                let cmd = self.cmd.clone();
                tokio::spawn(async move {
                    let _ = cmd.send(c).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        rx
    }

    /// Server only: one chunk (normally 1316 bytes, 7 TS packets) of a local channel's MPEG-TS.
    /// The relay assigns the channel's next sequence number (from 0), sets
    /// [`video_flags::KEYFRAME`] if `keyframe`, encodes the datagram once and sends the same
    /// `Bytes` to every subscriber. Chunks of a channel that is not local are counted as
    /// malformed and dropped. Waits only if the engine's queue is full.
    pub async fn send_local_video(&self, channel: ChannelId, payload: Bytes, keyframe: bool) {
        let _ = self
            .cmd
            .send(Command::Video {
                channel,
                payload,
                keyframe,
            })
            .await;
    }

    /// The engine's counters and subscription state (defaults if it has stopped).
    pub async fn stats(&self) -> RelayStats {
        let (reply, rx) = oneshot::channel();
        if self.cmd.send(Command::Stats(reply)).await.is_err() {
            return RelayStats::default();
        }
        rx.await.unwrap_or_default()
    }
}

/// The driver: owns the transport (and through it the socket), reads the clock once per event,
/// feeds the [`RelayCore`] and sends what it queued.
struct Engine {
    core: RelayCore,
    transport: Transport,
    incoming: mpsc::Receiver<Incoming>,
    transport_task: JoinHandle<()>,
    cmd_rx: mpsc::Receiver<Command>,
    /// Neighbour lists pushed by the bootstrapper (topology edits).
    neighbour_updates: mpsc::Receiver<Vec<PathHop>>,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Engine {
    fn new(joined: Joined, cfg: RelayConfig, cmd_rx: mpsc::Receiver<Command>) -> Engine {
        let me = PathHop {
            id: joined.me.id,
            addr: joined.me.addr,
        };
        Engine {
            core: RelayCore::new(me, &joined.me.neighbours, cfg, now()),
            transport: joined.transport,
            incoming: joined.incoming,
            transport_task: joined.task,
            cmd_rx,
            neighbour_updates: joined.neighbour_updates,
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        info!(
            id = %self.core.me.id,
            neighbours = ?self.core.routing.neighbours().iter().map(|n| n.addr).collect::<Vec<_>>(),
            "relay started"
        );
        let mut tick = tokio::time::interval(self.core.cfg.tick.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        let mut updates_open = true;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = self.cmd_rx.recv(), if commands_open => match cmd {
                    Some(c) => {
                        self.core.t = now();
                        self.core.command(c);
                        self.flush().await;
                    }
                    None => commands_open = false,
                },
                n = self.neighbour_updates.recv(), if updates_open => match n {
                    Some(n) => {
                        self.core.t = now();
                        self.core.set_neighbours(n);
                        self.flush().await;
                    }
                    None => updates_open = false,
                },
                item = self.incoming.recv() => match item {
                    Some(item) => {
                        self.core.t = now();
                        self.core.incoming_item(item);
                        self.flush().await;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    self.core.t = now();
                    self.core.housekeeping();
                    self.flush().await;
                }
            }
        }
        info!("relay stopped");
        shutdown.cancel();
        let _ = (&mut self.transport_task).await;
    }

    /// The driver's half of an event: sends what the decisions queued, in order, then feeds
    /// the RTT estimates asked for back in.
    async fn flush(&mut self) {
        while let Some(o) = self.core.poll_transmit() {
            let r = match o {
                Out::Bytes(to, b) => self.transport.send_bytes(to, b).await,
                Out::Reliable(to, m) => self.transport.send_reliable(to, m).await.map(drop),
                Out::Unreliable(to, m) => self.transport.send_unreliable(to, m).await,
                Out::Forget(p) => self.transport.forget_peer(p).await,
            };
            if let Err(e) = r {
                debug!(error = %e, "not sent");
            }
        }
        for p in self.core.take_rtt_due() {
            if let Ok(Some(rtt)) = self.transport.rtt(p).await {
                self.core.rtt_sample(p, rtt.srtt, rtt.rttvar);
            }
        }
    }
}

//! The relay's driver: one tokio task that owns a host's UDP socket (from [`Joined`]) and its
//! [`RelayCore`] (every decision and the reliable channel, I/O-free). It reads the clock once
//! per event, feeds the core (a received datagram, a due timer, a command of the [`Relay`]
//! handle, a topology edit), then sends what the core polled through the send path (the
//! `--impair` shim or straight to the socket), and sleeps until the core's or the shim's next
//! deadline. Nodes run it with no local channel; servers also announce their own channels and
//! feed their video through the [`Relay`] handle.
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
//! node) is encoded once, pushed into the channel's [`GopCache`](crate::gop::GopCache) and sent to every subscriber.
//! A *new* subscriber of a channel first gets the cached GOP (from the last keyframe on, each
//! datagram flagged [`video_flags::FROM_CACHE`](common::wire::video_flags::FROM_CACHE)) in the same task turn as its `Subscribe` is
//! handled, so the next live datagram follows the burst with no gap and no duplicate. A node
//! that starts receiving a channel for a new subscriber gets its upstream's burst, forwards it
//! and caches it. A datagram flagged `FROM_CACHE` that is not newer than what the relay already
//! forwarded (the burst of a new upstream after a switch) is dropped, so existing subscribers
//! never see sequence numbers go back. The cache of a channel is forgotten when the channel
//! stops being watched.
//!
//! # Loss recovery (per-hop NACK)
//!
//! With [`RelayConfig::recovery`](crate::relay_core::RelayConfig::recovery) (the default; `--no-recovery` turns it off), every datagram
//! sent live to a channel's subscribers (the same encoded `Bytes`) also goes into the channel's
//! [`RetransmitBuffer`](common::nack::RetransmitBuffer); a `Nack` from a subscriber of the channel is answered from it, to that
//! subscriber only, flagged `RETRANSMIT` (one decode + encode per resend, a few % of the
//! traffic) so receivers can count the recovery overhead. A node tracks the video of each channel from its
//! current upstream with a [`NackTracker`](common::nack::NackTracker) (deadline [`RelayConfig::recovery_deadline`](crate::relay_core::RelayConfig::recovery_deadline)):
//! duplicates and datagrams whose gap was given up are dropped, new and recovered ones are
//! forwarded and buffered (so recovery also fills downstream gaps), a seq jump (reset) clears
//! the buffer. NACKs are sent (unreliably) to the upstream when due: the driver sleeps until
//! the core's `poll_timeout`, the earlier of the periodic checks and the trackers' own
//! deadlines (`NackTracker::poll_timeout`). The tracker's RTT is the reliable channel's SRTT of the
//! upstream, refreshed on the reliable-ping rounds. A change of
//! upstream drops the tracker. See `report/protocol.md`, "Loss recovery".

use crate::relay_core::{Command as CoreCommand, Event, RelayCore};
pub use crate::relay_core::{RelayConfig, RelayStats};
use bytes::Bytes;
use common::host::Joined;
use common::port::Port;
use common::secure::{Secure, SecureConfig};
use common::wire::{ChannelId, ChannelInfo, Member, PathHop};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

/// What the handle asks of the engine.
enum Command {
    SetLocal(Vec<ChannelInfo>, oneshot::Sender<()>),
    Video {
        channel: ChannelId,
        payload: Bytes,
        keyframe: bool,
    },
    Stats(oneshot::Sender<RelayStats>),
    Demand(mpsc::Sender<(ChannelId, bool)>),
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

/// Handle to a running relay engine. Cheap to clone; every method is a no-op (or returns
/// defaults) once the engine has stopped.
#[derive(Debug, Clone)]
pub struct Relay {
    cmd: mpsc::Sender<Command>,
    local: PathHop,
}

/// Capacity of each local-demand channel.
const DEMAND_QUEUE: usize = 1024;

impl Relay {
    /// Starts the engine on the current tokio runtime. It runs until `shutdown` is cancelled.
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
    /// [`limits::CHANNELS`](common::wire::limits::CHANNELS) are announced. Returns once the engine has applied it.
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
    /// The relay assigns the channel's next sequence number (from a random start), sets
    /// [`video_flags::KEYFRAME`](common::wire::video_flags::KEYFRAME) if `keyframe`, encodes the datagram once and sends the same
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

/// The driver: owns the socket and the send path, reads the clock once per event, feeds the
/// [`RelayCore`] and sends what it polled.
struct Engine {
    core: RelayCore,
    port: Port,
    cmd_rx: mpsc::Receiver<Command>,
    /// Neighbour lists and member directories pushed by the bootstrapper (topology edits,
    /// hosts registering their keys).
    neighbour_updates: mpsc::Receiver<(Vec<PathHop>, Vec<Member>)>,
    /// Receivers of local demand ([`Relay::local_demand`]).
    demand: Vec<mpsc::Sender<(ChannelId, bool)>>,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Datagrams handled per wake-up at most beyond the first (then the driver sends and looks at
/// its timers and commands again).
const RECV_BURST: usize = 63;

/// The bootstrapper's member directory as the core takes it.
fn members(m: &[Member]) -> Vec<(common::PeerId, common::keys::PublicKey)> {
    m.iter().map(|m| (m.id, m.key)).collect()
}

impl Engine {
    fn new(joined: Joined, cfg: RelayConfig, cmd_rx: mpsc::Receiver<Command>) -> Engine {
        let me = PathHop {
            id: joined.me.id,
            addr: joined.me.addr,
        };
        let seed = common::rng::Rng::from_entropy().next_u64();
        let mut core = RelayCore::new(me, &joined.me.neighbours, cfg, now(), seed);
        if !joined.plaintext {
            // Every datagram sealed and authenticated: members by their static keys (the
            // directory from the bootstrapper), viewers by the handshake (and the viewer
            // secret when the PoP requires one).
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            let mut sc = SecureConfig::member(
                joined.keys.identity.clone(),
                joined.keys.network.clone(),
                stamp,
                seed,
            );
            if let Some(v) = joined.viewer_secret.clone() {
                sc.viewer_secret = Some(v);
            }
            core = core.with_secure(Secure::new(sc));
            core.handle_command(now(), CoreCommand::SetMembers(members(&joined.me.members)));
        }
        Engine {
            core,
            port: Port::new(joined.socket, joined.shim),
            cmd_rx,
            neighbour_updates: joined.neighbour_updates,
            demand: Vec::new(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        info!(
            id = %self.core.me.id,
            neighbours = ?self.core.routing.neighbours().iter().map(|n| n.addr).collect::<Vec<_>>(),
            "relay started"
        );
        let timer = tokio::time::sleep_until(self.deadline().into());
        tokio::pin!(timer);
        let mut commands_open = true;
        let mut updates_open = true;
        loop {
            timer.as_mut().reset(self.deadline().into());
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = self.cmd_rx.recv(), if commands_open => match cmd {
                    Some(c) => {
                        let t = now();
                        self.command(t, c);
                        // A burst of local video (a playout quantum) is one batched fan-out.
                        for _ in 0..RECV_BURST {
                            let Ok(c) = self.cmd_rx.try_recv() else { break };
                            self.command(t, c);
                        }
                    }
                    None => commands_open = false,
                },
                n = self.neighbour_updates.recv(), if updates_open => match n {
                    Some((n, m)) => {
                        self.core.handle_command(now(), CoreCommand::SetMembers(members(&m)));
                        self.core.handle_command(now(), CoreCommand::SetNeighbours(n));
                    }
                    None => updates_open = false,
                },
                r = self.port.recv() => if let Some((from, bytes)) = r {
                    let t = now();
                    self.core.handle_datagram(t, from, bytes);
                    // Whatever else is already waiting, before sending (one wake-up per burst).
                    for _ in 0..RECV_BURST {
                        let Some((from, bytes)) = self.port.try_recv() else { break };
                        self.core.handle_datagram(t, from, bytes);
                    }
                },
                _ = &mut timer => self.core.handle_timeout(now()),
            }
            self.flush().await;
        }
        info!("relay stopped");
    }

    /// The earlier of the core's and the send path's next deadlines.
    fn deadline(&self) -> Instant {
        let core = self.core.poll_timeout();
        self.port.poll_timeout().map_or(core, |s| s.min(core))
    }

    /// A request of the handle: the core's part, then the reply.
    fn command(&mut self, t: Instant, c: Command) {
        match c {
            Command::SetLocal(channels, reply) => {
                self.core.handle_command(t, CoreCommand::SetLocal(channels));
                let _ = reply.send(());
            }
            Command::Video {
                channel,
                payload,
                keyframe,
            } => self.core.handle_command(
                t,
                CoreCommand::LocalVideo {
                    channel,
                    payload,
                    keyframe,
                },
            ),
            Command::Stats(reply) => {
                let _ = reply.send(self.core.stats());
            }
            Command::Demand(tx) => {
                for ch in self.core.demanded_local() {
                    let _ = tx.try_send((ch, true));
                }
                self.demand.push(tx);
            }
        }
    }

    /// The driver's half of an event: sends what the core decided, in order, through the send
    /// path, and delivers its events (local demand).
    async fn flush(&mut self) {
        let t = now();
        // The core hands its datagrams out grouped by destination, sealing each as it is
        // polled: a large fan-out goes to the kernel in growing slices, cut between two
        // destinations (a peer's run stays one GSO message), so the first peers' copies leave
        // while the later ones are still being sealed.
        let mut slice = common::batch::FIRST_SLICE;
        let mut queued = 0;
        let mut last = None;
        while let Some(tx) = self.core.poll_transmit() {
            if queued >= slice && last != Some(tx.to) {
                self.port.flush(t).await;
                queued = 0;
                slice = common::batch::next_slice(slice);
            }
            last = Some(tx.to);
            queued += 1;
            self.port.push(t, tx.to, tx.bytes);
        }
        self.port.flush(t).await;
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::LocalDemand { channel, watched } => {
                    self.demand.retain(|tx| match tx.try_send((channel, watched)) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            warn!(%channel, watched, "local demand receiver lags; event dropped");
                            true
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    });
                }
            }
        }
    }
}

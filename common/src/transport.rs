//! The tokio driver of a [`Link`] (decoding and the reliable channel): one task owns the UDP socket and the state
//! machine; the rest of the process talks to it through a cheap-to-clone [`Transport`] handle
//! (commands over an `mpsc` channel) and receives what arrives as [`Incoming`] items.
//!
//! No state is shared across tasks (no `Arc<Mutex>`), no lock is held across an `.await`, and
//! there is one timer (the state machine's earliest deadline), not a sleeping task per packet.
//!
//! # Send path hook
//!
//! Every outgoing datagram (reliable data, retransmissions, acks, unreliable messages and
//! pre-encoded video) passes through a [`SendShim`] before reaching the socket. The default,
//! [`Direct`], sends at once. The impairment shim (seeded loss / delay for tests and
//! demonstrations) plugs in here via [`Transport::spawn_with_shim`]: it holds datagrams back and
//! the driver wakes up at its [`SendShim::poll_timeout`].
//!
//! # Backpressure
//!
//! The driver never waits for the application: received items go into an internal queue that is
//! forwarded to the [`Incoming`] channel as the application reads it. While that queue holds
//! [`TransportConfig::max_pending_incoming`] items, the driver stops reading the socket (the
//! kernel buffer fills and drops; the reliable layer retransmits) but keeps serving commands and
//! timers — so an application that awaits a `send_reliable` before reading its incoming channel
//! cannot deadlock the driver.

use crate::id::{NodeId, PeerId};
use crate::link::Link;
use crate::reliable::{ReliableConfig, ReliableStats, RttEstimate};
use crate::rng::Rng;
use crate::wire::{Body, Datagram, Message, WireError};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Tuning of a [`Transport`].
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The reliable channel's tuning.
    pub reliable: ReliableConfig,
    /// Capacity of the command channel (handle → driver). Default 1024.
    pub command_queue: usize,
    /// Capacity of the [`Incoming`] channel (driver → application). Default 1024.
    pub incoming_queue: usize,
    /// Received items the driver buffers beyond the channel before it stops reading the socket.
    /// Default 4096.
    pub max_pending_incoming: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            reliable: ReliableConfig::default(),
            command_queue: 1024,
            incoming_queue: 1024,
            max_pending_incoming: 4096,
        }
    }
}

pub use crate::link::Incoming;

/// Why a [`Transport`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The driver task has stopped (shutdown, or it was dropped).
    #[error("transport task has stopped")]
    Closed,
    /// The message could not be encoded (too large for one datagram).
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Counters of a transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// The reliable channel's counters (including malformed and other-version datagrams).
    pub reliable: ReliableStats,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Datagrams handed to the socket successfully.
    pub datagrams_out: u64,
    /// `send_to` failures (logged at debug, never fatal).
    pub send_errors: u64,
    /// `recv_from` failures (e.g. ICMP port unreachable reported as `ECONNREFUSED`).
    pub recv_errors: u64,
    /// Items not delivered because the [`Incoming`] receiver was dropped.
    pub incoming_dropped: u64,
}

use crate::port::Port;
pub use crate::port::{Direct, SendShim};

enum Command {
    SendReliable {
        peer: PeerId,
        addr: SocketAddr,
        msg: Message,
        reply: oneshot::Sender<Result<u64, WireError>>,
    },
    SendBytes {
        peer: PeerId,
        addr: SocketAddr,
        bytes: Bytes,
    },
    Rtt {
        peer: PeerId,
        reply: oneshot::Sender<Option<RttEstimate>>,
    },
    Stats {
        reply: oneshot::Sender<TransportStats>,
    },
    ForgetPeer {
        peer: PeerId,
    },
}

/// Handle to a running transport driver. Cheap to clone (an `mpsc::Sender`); every method fails
/// with [`TransportError::Closed`] once the driver has stopped.
#[derive(Debug, Clone)]
pub struct Transport {
    local: NodeId,
    local_addr: SocketAddr,
    cmd: mpsc::Sender<Command>,
}

impl Transport {
    /// Spawns the driver for `socket` on the current tokio runtime, with a random session and the
    /// [`Direct`] send path. Returns the handle, the receiver of [`Incoming`] items, and the
    /// driver task, which ends when `shutdown` is cancelled (or when every handle and the
    /// receiver are dropped).
    pub fn spawn(
        socket: UdpSocket,
        local: NodeId,
        cfg: TransportConfig,
        shutdown: CancellationToken,
    ) -> io::Result<(Transport, mpsc::Receiver<Incoming>, JoinHandle<()>)> {
        let session = Rng::from_entropy().next_u64();
        Self::spawn_with_shim(
            socket,
            local,
            session,
            cfg,
            shutdown,
            Box::new(Direct::default()),
        )
    }

    /// Like [`spawn`](Self::spawn) with a session layer: every datagram sealed and
    /// authenticated (a test peer speaking to real daemons).
    pub fn spawn_secure(
        socket: UdpSocket,
        local: NodeId,
        cfg: TransportConfig,
        secure: crate::secure::Secure,
        shutdown: CancellationToken,
    ) -> io::Result<(Transport, mpsc::Receiver<Incoming>, JoinHandle<()>)> {
        let session = Rng::from_entropy().next_u64();
        Self::spawn_full(
            socket,
            local,
            session,
            cfg,
            shutdown,
            Box::new(Direct::default()),
            Some(secure),
        )
    }

    /// Like [`spawn`](Self::spawn) with an explicit reliable `session` and send-path `shim`
    /// (the hook where the impairment shim is plugged in).
    pub fn spawn_with_shim(
        socket: UdpSocket,
        local: NodeId,
        session: u64,
        cfg: TransportConfig,
        shutdown: CancellationToken,
        shim: Box<dyn SendShim>,
    ) -> io::Result<(Transport, mpsc::Receiver<Incoming>, JoinHandle<()>)> {
        Self::spawn_full(socket, local, session, cfg, shutdown, shim, None)
    }

    fn spawn_full(
        socket: UdpSocket,
        local: NodeId,
        session: u64,
        cfg: TransportConfig,
        shutdown: CancellationToken,
        shim: Box<dyn SendShim>,
        secure: Option<crate::secure::Secure>,
    ) -> io::Result<(Transport, mpsc::Receiver<Incoming>, JoinHandle<()>)> {
        let local_addr = socket.local_addr()?;
        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.command_queue.max(1));
        let (in_tx, in_rx) = mpsc::channel(cfg.incoming_queue.max(1));
        let mut link = Link::new(local, session, cfg.reliable.clone());
        if let Some(s) = secure {
            link.set_secure(s);
        }
        let driver = Driver {
            port: Port::new(socket, shim),
            link,
            cmd_rx,
            incoming: in_tx,
            pending: VecDeque::new(),
            max_pending: cfg.max_pending_incoming.max(1),
            stats: TransportStats::default(),
            local_addr,
        };
        let task = tokio::spawn(driver.run(shutdown));
        Ok((
            Transport {
                local,
                local_addr,
                cmd: cmd_tx,
            },
            in_rx,
            task,
        ))
    }

    /// Our node id (the sender of every datagram).
    pub fn local_id(&self) -> NodeId {
        self.local
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Sends `msg` reliably to `peer` at `addr`; returns its message id (named again by
    /// [`Incoming::TimedOut`] if it is never acknowledged).
    pub async fn send_reliable(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        msg: Message,
    ) -> Result<u64, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::SendReliable {
            peer,
            addr,
            msg,
            reply,
        })
        .await?;
        Ok(rx.await.map_err(|_| TransportError::Closed)??)
    }

    /// Sends `msg` once to `peer` at `addr`, without acknowledgement. Encoded by the caller's
    /// task.
    pub async fn send_unreliable(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        msg: Message,
    ) -> Result<(), TransportError> {
        let bytes = Datagram::new(self.local, Body::Unreliable(msg)).encode()?;
        self.send_bytes(peer, addr, bytes).await
    }

    /// Sends an already encoded datagram to `peer` at `addr` (the data path encodes a video
    /// datagram once and hands the same `Bytes` for every subscriber). The peer's id picks its
    /// session when there is a session layer; a PoP not heard from yet is found by its address.
    pub async fn send_bytes(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        bytes: Bytes,
    ) -> Result<(), TransportError> {
        self.command(Command::SendBytes { peer, addr, bytes }).await
    }

    /// The RTT estimate of `peer` (`None` before the first sample).
    pub async fn rtt(&self, peer: PeerId) -> Result<Option<RttEstimate>, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Rtt { peer, reply }).await?;
        rx.await.map_err(|_| TransportError::Closed)
    }

    /// The driver's counters.
    pub async fn stats(&self) -> Result<TransportStats, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Stats { reply }).await?;
        rx.await.map_err(|_| TransportError::Closed)
    }

    /// Drops all reliable state about `peer` (declared dead); see
    /// [`Link::forget_peer`].
    pub async fn forget_peer(&self, peer: PeerId) -> Result<(), TransportError> {
        self.command(Command::ForgetPeer { peer }).await
    }

    async fn command(&self, c: Command) -> Result<(), TransportError> {
        self.cmd.send(c).await.map_err(|_| TransportError::Closed)
    }
}

/// The task that owns the socket and the state machine.
struct Driver {
    port: Port,
    link: Link,
    cmd_rx: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<Incoming>,
    /// Items waiting for room in `incoming`.
    pending: VecDeque<Incoming>,
    max_pending: usize,
    stats: TransportStats,
    local_addr: SocketAddr,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Driver {
    async fn run(mut self, shutdown: CancellationToken) {
        let far_future = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far_future());
        tokio::pin!(sleep);
        let mut commands_open = true;
        // A second sender for `reserve()`, so the permit does not borrow `self`.
        let incoming = self.incoming.clone();
        info!(addr = %self.local_addr, session = self.link.session(), "transport started");
        loop {
            let deadline = [self.link.poll_timeout(), self.port.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            if let Some(d) = deadline {
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            }
            let incoming_open = !self.incoming.is_closed();
            if !commands_open && !incoming_open {
                debug!(addr = %self.local_addr, "every handle dropped; transport stops");
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                permit = incoming.reserve(), if !self.pending.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(item) = self.pending.pop_front() {
                            permit.send(item);
                        }
                    }
                    Err(_) => {
                        self.stats.incoming_dropped += self.pending.len() as u64;
                        self.pending.clear();
                    }
                },
                cmd = self.cmd_rx.recv(), if commands_open => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => commands_open = false,
                },
                r = self.port.recv(), if self.pending.len() < self.max_pending => {
                    if let Some((from, bytes)) = r {
                        self.link.handle_datagram(now(), from, bytes);
                    }
                }
                _ = &mut sleep, if deadline.is_some() => {}
            }
            // Whatever woke us: fire due timers (cheap if none), collect events, send.
            let t = now();
            self.link.handle_timeout(t);
            self.collect_incoming();
            self.flush(t).await;
        }
        info!(addr = %self.local_addr, "transport stopped");
    }

    fn command(&mut self, cmd: Command) {
        let t = now();
        match cmd {
            Command::SendReliable {
                peer,
                addr,
                msg,
                reply,
            } => {
                let _ = reply.send(self.link.send_reliable(t, peer, addr, msg));
            }
            // A plaintext link: the peer id would only pick a session.
            Command::SendBytes { peer, addr, bytes } => self.link.send_bytes(t, peer, addr, bytes),
            Command::Rtt { peer, reply } => {
                let _ = reply.send(self.link.rtt(peer));
            }
            Command::Stats { reply } => {
                let p = self.port.stats();
                let mut s = self.stats;
                s.reliable = self.link.stats().reliable;
                s.datagrams_in = p.datagrams_in;
                s.datagrams_out = p.datagrams_out;
                s.send_errors = p.send_errors;
                s.recv_errors = p.recv_errors;
                let _ = reply.send(s);
            }
            Command::ForgetPeer { peer } => self.link.forget_peer(peer),
        }
    }

    fn collect_incoming(&mut self) {
        while let Some(item) = self.link.poll_incoming() {
            self.deliver(item);
        }
    }

    fn deliver(&mut self, item: Incoming) {
        if self.incoming.is_closed() {
            self.stats.incoming_dropped += 1;
            return;
        }
        // Keep order: only bypass the queue when it is empty.
        if self.pending.is_empty() {
            match self.incoming.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => self.pending.push_back(item),
                Err(mpsc::error::TrySendError::Closed(_)) => self.stats.incoming_dropped += 1,
            }
        } else {
            self.pending.push_back(item);
        }
    }

    async fn flush(&mut self, t: Instant) {
        while let Some((peer, bytes)) = self.link.poll_transmit() {
            self.port.push(t, peer, bytes);
        }
        self.port.flush(t).await;
    }
}

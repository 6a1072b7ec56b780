//! [`Port`]: the one owner of a host's UDP socket and its send path. Every driver (the
//! [`Transport`](crate::transport::Transport), the relay's, the client's) receives through
//! [`Port::recv`] and sends by [`Port::push`]ing datagrams, then [`Port::flush`]ing them: they go
//! through the [`SendShim`] (straight through with [`Direct`], or the `--impair` shim, which may
//! drop, delay, duplicate or reorder them) to the socket. Errors are counted, logged at debug and
//! never fatal; receive errors that persist do not spin.

use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::wire::MAX_DATAGRAM_LEN;

/// The send-path hook: every outgoing datagram is `push`ed here, and whatever `poll_transmit`
/// yields goes to the socket. An implementation may drop, delay, duplicate or reorder (the
/// impairment shim), as long as it is an I/O-free state machine on `Instant`s.
pub trait SendShim: Send + 'static {
    /// Accepts a datagram for `peer` at `now`.
    fn push(&mut self, now: Instant, peer: SocketAddr, bytes: Bytes);
    /// The next datagram due at or before `now`, if any.
    fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Bytes)>;
    /// When the next held-back datagram becomes due (`None` if nothing is held back).
    fn poll_timeout(&self) -> Option<Instant>;
}

/// The default [`SendShim`]: sends everything at once, unchanged.
#[derive(Debug, Default)]
pub struct Direct {
    queue: VecDeque<(SocketAddr, Bytes)>,
}

impl SendShim for Direct {
    fn push(&mut self, _now: Instant, peer: SocketAddr, bytes: Bytes) {
        self.queue.push_back((peer, bytes));
    }
    fn poll_transmit(&mut self, _now: Instant) -> Option<(SocketAddr, Bytes)> {
        self.queue.pop_front()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

/// The impairment shim plugs into the send path as-is (`--impair`).
impl SendShim for crate::impair::Impairment {
    fn push(&mut self, now: Instant, peer: SocketAddr, bytes: Bytes) {
        crate::impair::Impairment::push(self, now, peer, bytes)
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Bytes)> {
        crate::impair::Impairment::poll_transmit(self, now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        crate::impair::Impairment::poll_timeout(self)
    }
}

/// Counters of a [`Port`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Datagrams handed to the socket successfully.
    pub datagrams_out: u64,
    /// `send_to` failures (logged at debug, never fatal).
    pub send_errors: u64,
    /// `recv_from` failures (e.g. ICMP port unreachable reported as `ECONNREFUSED`).
    pub recv_errors: u64,
}

/// A host's UDP socket and send path (see the module docs).
pub struct Port {
    socket: UdpSocket,
    shim: Box<dyn SendShim>,
    /// One byte more than the largest valid datagram, so an oversize one is detected as such.
    buf: Box<[u8]>,
    stats: PortStats,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("socket", &self.socket)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Port {
    /// The socket, sending through `shim`.
    pub fn new(socket: UdpSocket, shim: Box<dyn SendShim>) -> Port {
        Port {
            socket,
            shim,
            buf: vec![0u8; MAX_DATAGRAM_LEN + 1].into_boxed_slice(),
            stats: PortStats::default(),
        }
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next received datagram; `None` after a receive error (counted; ICMP errors of
    /// earlier sends to dead peers, which Linux reports on a later receive, at debug; any other
    /// logged, with a pause so a persistent error does not spin). Cancel-safe.
    pub async fn recv(&mut self) -> Option<(SocketAddr, &[u8])> {
        match self.socket.recv_from(&mut self.buf).await {
            Ok((n, from)) => {
                self.stats.datagrams_in += 1;
                Some((from, &self.buf[..n]))
            }
            Err(e) => {
                self.stats.recv_errors += 1;
                match e.kind() {
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                        debug!(error = %e, "recv_from: ICMP error of an earlier send, ignored");
                    }
                    _ => {
                        warn!(error = %e, "recv_from failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                None
            }
        }
    }

    /// A datagram already waiting in the socket, without waiting (`None`: none). A driver
    /// drains a burst with it after [`recv`](Self::recv) before flushing, so a flood of
    /// datagrams costs one wake-up per burst, not per datagram.
    pub fn try_recv(&mut self) -> Option<(SocketAddr, &[u8])> {
        match self.socket.try_recv_from(&mut self.buf) {
            Ok((n, from)) => {
                self.stats.datagrams_in += 1;
                Some((from, &self.buf[..n]))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                self.stats.recv_errors += 1;
                debug!(error = %e, "try_recv_from failed");
                None
            }
        }
    }

    /// Queues a datagram for `to` (sent by the next [`flush`](Self::flush)).
    pub fn push(&mut self, now: Instant, to: SocketAddr, bytes: Bytes) {
        self.shim.push(now, to, bytes);
    }

    /// Sends every queued datagram the send path releases at `now`.
    pub async fn flush(&mut self, now: Instant) {
        while let Some((peer, bytes)) = self.shim.poll_transmit(now) {
            match self.socket.send_to(&bytes, peer).await {
                Ok(_) => self.stats.datagrams_out += 1,
                Err(e) => {
                    self.stats.send_errors += 1;
                    debug!(%peer, error = %e, "send_to failed, datagram dropped");
                }
            }
        }
    }

    /// When the send path next releases a held-back datagram (the `--impair` shim's delays).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.shim.poll_timeout()
    }

    /// The counters.
    pub fn stats(&self) -> PortStats {
        self.stats
    }
}

//! [`Port`]: the one owner of a host's UDP socket and its send path. Every driver (the
//! [`Transport`](crate::transport::Transport), the relay's, the client's) receives through
//! [`Port::recv`] and sends by [`Port::push`]ing datagrams, then [`Port::flush`]ing them: they go
//! through the [`SendShim`] (straight through with [`Direct`], or the `--impair` shim, which may
//! drop, delay, duplicate or reorder them) to the socket. Errors are counted, logged at debug and
//! never fatal; receive errors that persist do not spin.
//!
//! Below the shim, I/O is batched ([`crate::batch`]): what a flush releases goes to the kernel
//! grouped by destination, [`BATCH`] messages per `sendmmsg`, a run to one peer as one UDP
//! GSO message, and receives are UDP GRO where the kernel takes it (a run of datagrams from one
//! peer in one receive, cut back into its datagrams), else up to [`BATCH`] waiting datagrams
//! per `recvmmsg`, handed out one by one by [`Port::recv`] and [`Port::try_recv`], each in its
//! own buffer (a piece of the batch's shared chunk: nothing is copied on the way in).

use crate::batch::{RecvBatch, SendBatch, BATCH};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::Interest;
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
    /// Send system calls (`sendmmsg`), each carrying up to [`BATCH`] datagrams.
    pub send_calls: u64,
    /// Receive system calls that returned datagrams (`recvmmsg`, or `recvmsg` with GRO).
    pub recv_calls: u64,
}

/// A host's UDP socket and send path (see the module docs).
pub struct Port {
    socket: UdpSocket,
    shim: Box<dyn SendShim>,
    /// Received datagrams, each buffer one byte more than the largest valid datagram, so an
    /// oversize one is detected as such.
    rx: RecvBatch,
    tx: SendBatch,
    /// Released by the shim, not yet taken by the kernel.
    out: Vec<(SocketAddr, Bytes)>,
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
        let rx = RecvBatch::with_gro(MAX_DATAGRAM_LEN + 1, &socket);
        Port {
            socket,
            shim,
            rx,
            tx: SendBatch::default(),
            out: Vec::with_capacity(BATCH),
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
    pub async fn recv(&mut self) -> Option<(SocketAddr, BytesMut)> {
        while self.rx.is_empty() {
            if let Err(e) = self.socket.readable().await {
                self.recv_error(&e).await;
                return None;
            }
            match self.fill() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.recv_error(&e).await;
                    return None;
                }
            }
        }
        self.rx.pop()
    }

    /// One `recvmmsg` (or, with GRO, one `recvmsg`) into the receive batch.
    fn fill(&mut self) -> io::Result<()> {
        let (socket, rx) = (&self.socket, &mut self.rx);
        let n = socket.try_io(Interest::READABLE, || rx.recv(socket))?;
        self.stats.recv_calls += 1;
        self.stats.datagrams_in += n as u64;
        Ok(())
    }

    async fn recv_error(&mut self, e: &io::Error) {
        self.stats.recv_errors += 1;
        match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                debug!(error = %e, "recv: ICMP error of an earlier send, ignored");
            }
            _ => {
                warn!(error = %e, "recv failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// A datagram already waiting (received with the last batch, or in the socket), without
    /// waiting (`None`: none). A driver drains a burst with it after [`recv`](Self::recv)
    /// before flushing, so a flood of datagrams costs one wake-up per burst, not per datagram.
    pub fn try_recv(&mut self) -> Option<(SocketAddr, BytesMut)> {
        if self.rx.is_empty() {
            match self.fill() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    self.stats.recv_errors += 1;
                    debug!(error = %e, "recv failed");
                    return None;
                }
            }
        }
        self.rx.pop()
    }

    /// Queues a datagram for `to` (sent by the next [`flush`](Self::flush)).
    pub fn push(&mut self, now: Instant, to: SocketAddr, bytes: Bytes) {
        self.shim.push(now, to, bytes);
    }

    /// Sends every queued datagram the send path releases at `now`, grouped by destination,
    /// up to [`BATCH`] messages per system call (a run to one peer is one GSO message). A datagram the kernel refuses is counted and dropped (logged at debug); a full
    /// send buffer is waited out.
    pub async fn flush(&mut self, now: Instant) {
        while let Some(d) = self.shim.poll_transmit(now) {
            self.out.push(d);
        }
        if self.out.is_empty() {
            return;
        }
        // Grouped by destination (a stable sort: each peer's datagrams keep their order), so
        // that a burst to one peer is one GSO message; the order across peers is free.
        self.out.sort_by_key(|(to, _)| *to);
        let mut done = 0;
        while done < self.out.len() {
            let (socket, tx, out) = (&self.socket, &mut self.tx, &self.out);
            match socket.try_io(Interest::WRITABLE, || tx.send(socket, &out[done..])) {
                Ok(n) => {
                    self.stats.send_calls += 1;
                    self.stats.datagrams_out += n as u64;
                    done += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.socket.writable().await {
                        debug!(error = %e, "socket not writable; datagrams dropped");
                        self.stats.send_errors += (self.out.len() - done) as u64;
                        done = self.out.len();
                    }
                }
                Err(e) => {
                    self.stats.send_errors += 1;
                    debug!(peer = %self.out[done].0, error = %e, "send failed, datagram dropped");
                    done += 1;
                }
            }
        }
        self.out.clear();
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

//! The bootstrap protocol's framing and its client side ([`fetch_neighbours`]).
//!
//! A server or node opens a TCP connection *from its own overlay IP* to the bootstrapper,
//! sends one [`BootstrapRequest`] and reads one [`BootstrapResponse`]. A frame is a 4-byte
//! big-endian length and its content; lengths above [`MAX_FRAME_LEN`] are refused before
//! anything is allocated.
//!
//! The exchange is authenticated and encrypted with the network key: a Noise
//! `XNpsk3_25519_ChaChaPoly_BLAKE2s` handshake (three frames: the host's ephemeral key, the
//! bootstrapper's, then the host's static key and the request, under the network key as PSK),
//! and the answer as one Noise transport message. So the bootstrapper learns the host's static
//! key with proof that the host holds it (it registers it for the host's address, and hands
//! it to the others as a [`Member`]), and neither side accepts anything from outside the
//! network: a wrong network key fails the handshake ([`FrameError::Auth`]). The request and
//! answer inside are a wire header and a bincode body (see [`crate::wire`]).

use crate::id::NodeId;
use crate::keys::{KeyPair, PublicKey, Secret};
use crate::rng::Rng;
use crate::wire::{
    decode_as, encode_with_limit, BootstrapRequest, BootstrapResponse, Header, Member, PathHop,
    WireError, MAX_FRAME_LEN,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

/// How long one bootstrap exchange (connect, request, answer) may take, on either side.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed early.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The length prefix announced more than the cap.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced length.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The frame did not decode.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// The handshake or a message did not authenticate.
    #[error("authentication failed: {0}")]
    Auth(&'static str),
}

/// What a host proves itself with to the bootstrapper and the overlay: its static key pair
/// and the network key.
#[derive(Debug, Clone)]
pub struct HostKeys {
    /// The host's static key pair.
    pub identity: KeyPair,
    /// The network key (shared by members and the bootstrapper).
    pub network: Secret,
}

const BOOT_PATTERN: &str = "Noise_XNpsk3_25519_ChaChaPoly_BLAKE2s";
const BOOT_PROLOGUE: &[u8] = b"pessi-streamer v2 bootstrap";
/// Largest Noise message (the spec's limit); a payload is 16 bytes less.
const NOISE_MAX: usize = 65535;

async fn write_raw<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), FrameError> {
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

async fn read_raw<R: AsyncRead + Unpin>(r: &mut R, max_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let size = u32::from_be_bytes(len) as usize;
    if size > max_len {
        return Err(FrameError::TooLarge {
            size,
            limit: max_len,
        });
    }
    let mut buf = vec![0u8; size];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

fn noise(e: snow::Error) -> FrameError {
    match e {
        snow::Error::Decrypt => FrameError::Auth("wrong network key?"),
        _ => FrameError::Auth("malformed handshake"),
    }
}

/// The host's side of one secured exchange on `s`: handshake, request, answer.
pub async fn client_exchange<S>(
    s: &mut S,
    keys: &HostKeys,
    request: &BootstrapRequest,
) -> Result<BootstrapResponse, FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = snow::Builder::new(BOOT_PATTERN.parse().expect("valid"))
        .prologue(BOOT_PROLOGUE)
        .and_then(|b| b.local_private_key(&keys.identity.private.0))
        .and_then(|b| b.psk(3, &keys.network.0))
        .and_then(|b| b.build_initiator())
        .map_err(noise)?;
    let mut buf = vec![0u8; NOISE_MAX];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    write_raw(s, &buf[..n]).await?;
    let msg2 = read_raw(s, 1024).await?;
    let mut payload = vec![0u8; NOISE_MAX];
    hs.read_message(&msg2, &mut payload).map_err(noise)?;
    let req = encode_with_limit(&Header::new(NodeId(0)), request, NOISE_MAX - 16)?;
    let n = hs.write_message(&req, &mut buf).map_err(noise)?;
    write_raw(s, &buf[..n]).await?;
    let mut transport = hs.into_transport_mode().map_err(noise)?;
    // The bootstrapper verifies the network key in our last handshake message and closes the
    // connection without a word if it is not its own.
    let answer = read_raw(s, MAX_FRAME_LEN).await.map_err(|e| match e {
        FrameError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => FrameError::Auth(
            "the bootstrapper closed the connection at our key: wrong network key?",
        ),
        other => other,
    })?;
    let n = transport
        .read_message(&answer, &mut payload)
        .map_err(|_| FrameError::Auth("the bootstrapper's answer does not authenticate"))?;
    let (_, resp): (Header, BootstrapResponse) = decode_as(&payload[..n])?;
    Ok(resp)
}

/// The bootstrapper's side of a secured exchange, up to the request: returns the host's
/// static key (proven), its request, and the session to answer on ([`server_answer`]).
pub async fn server_accept<S>(
    s: &mut S,
    network: &Secret,
) -> Result<(PublicKey, BootstrapRequest, snow::TransportState), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = snow::Builder::new(BOOT_PATTERN.parse().expect("valid"))
        .prologue(BOOT_PROLOGUE)
        .and_then(|b| b.psk(3, &network.0))
        .and_then(|b| b.build_responder())
        .map_err(noise)?;
    let mut payload = vec![0u8; NOISE_MAX];
    let msg1 = read_raw(s, 1024).await?;
    hs.read_message(&msg1, &mut payload).map_err(noise)?;
    let mut buf = vec![0u8; 1024];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    write_raw(s, &buf[..n]).await?;
    let msg3 = read_raw(s, MAX_FRAME_LEN).await?;
    let n = hs.read_message(&msg3, &mut payload).map_err(noise)?;
    let key = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or(FrameError::Auth("no static key"))?;
    let (_, request): (Header, BootstrapRequest) = decode_as(&payload[..n])?;
    let transport = hs.into_transport_mode().map_err(noise)?;
    Ok((key, request, transport))
}

/// The bootstrapper's answer on a session from [`server_accept`].
pub async fn server_answer<S>(
    s: &mut S,
    transport: &mut snow::TransportState,
    response: &BootstrapResponse,
) -> Result<(), FrameError>
where
    S: AsyncWrite + Unpin,
{
    let plain = encode_with_limit(&Header::new(NodeId(0)), response, NOISE_MAX - 16)?;
    let mut buf = vec![0u8; NOISE_MAX];
    let n = transport.write_message(&plain, &mut buf).map_err(noise)?;
    write_raw(s, &buf[..n]).await
}

/// Writes one plaintext frame: length prefix, header, body (the content of the messages
/// inside a bootstrap session).
pub async fn write_frame<W, B>(w: &mut W, header: &Header, body: &B) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    B: Serialize,
{
    write_raw(w, &encode_with_limit(header, body, MAX_FRAME_LEN)?).await
}

/// Reads one plaintext frame, whatever the split of the bytes over TCP segments. A length
/// above `max_len` is refused before allocating.
pub async fn read_frame<R, B>(r: &mut R, max_len: usize) -> Result<(Header, B), FrameError>
where
    R: AsyncRead + Unpin,
    B: DeserializeOwned,
{
    Ok(decode_as(&read_raw(r, max_len).await?)?)
}

/// What the bootstrapper told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbours {
    /// Our stable id.
    pub id: NodeId,
    /// Our overlay address.
    pub addr: SocketAddr,
    /// Our neighbours and their overlay addresses.
    pub neighbours: Vec<PathHop>,
    /// The members whose keys are known (neighbours included once they registered).
    pub members: Vec<Member>,
}

/// Why [`fetch_neighbours`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Our own IP cannot be bound (not an address of this machine?).
    #[error("cannot bind local address {ip}: {source}")]
    Bind {
        /// The IP we tried to speak from.
        ip: IpAddr,
        /// Why.
        source: io::Error,
    },
    /// The bootstrapper could not be reached.
    #[error("cannot connect to the bootstrapper at {addr}: {source}")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The exchange did not finish within [`IO_TIMEOUT`].
    #[error("the bootstrapper at {0} did not answer within {IO_TIMEOUT:?}")]
    Timeout(SocketAddr),
    /// The exchange failed midway.
    #[error("bootstrap exchange with {addr} failed: {source}")]
    Frame {
        /// The bootstrapper.
        addr: SocketAddr,
        /// What went wrong.
        source: FrameError,
    },
    /// The bootstrapper refused us (e.g. our IP is not in the topology). Not retried.
    #[error("the bootstrapper refused: {0}")]
    Refused(String),
    /// Shutdown was requested while waiting to retry.
    #[error("cancelled")]
    Cancelled,
}

impl FetchError {
    /// Whether the bootstrapper did not accept our network key (or we not its).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            FetchError::Frame {
                source: FrameError::Auth(_),
                ..
            }
        )
    }

    /// Whether trying again later may help (network trouble), as opposed to a definite answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchError::Connect { .. } | FetchError::Timeout(_) | FetchError::Frame { .. }
        )
    }
}

/// One attempt: connect from `local_ip` to `bootstrapper`, ask, and return the answer.
pub async fn fetch_neighbours(
    bootstrapper: SocketAddr,
    local_ip: IpAddr,
    keys: &HostKeys,
) -> Result<Neighbours, FetchError> {
    match exchange(
        bootstrapper,
        local_ip,
        keys,
        &BootstrapRequest::Neighbours,
        IO_TIMEOUT,
    )
    .await?
    {
        BootstrapResponse::Neighbours {
            id,
            addr,
            neighbours,
            members,
        } => Ok(Neighbours {
            id,
            addr,
            neighbours,
            members,
        }),
        BootstrapResponse::Refused { reason } => Err(FetchError::Refused(reason)),
    }
}

/// One request/answer exchange from `local_ip`, all of it within `deadline`.
async fn exchange(
    bootstrapper: SocketAddr,
    local_ip: IpAddr,
    keys: &HostKeys,
    request: &BootstrapRequest,
    deadline: Duration,
) -> Result<BootstrapResponse, FetchError> {
    let socket = match local_ip {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|source| FetchError::Bind {
        ip: local_ip,
        source,
    })?;
    socket
        .bind(SocketAddr::new(local_ip, 0))
        .map_err(|source| FetchError::Bind {
            ip: local_ip,
            source,
        })?;
    let exchange = async {
        let mut stream =
            socket
                .connect(bootstrapper)
                .await
                .map_err(|source| FetchError::Connect {
                    addr: bootstrapper,
                    source,
                })?;
        let frame_err = |source| FetchError::Frame {
            addr: bootstrapper,
            source,
        };
        client_exchange(&mut stream, keys, request)
            .await
            .map_err(frame_err)
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| FetchError::Timeout(bootstrapper))?
}

/// How long the bootstrapper holds a [`BootstrapRequest::Watch`] whose answer did not change
/// before answering anyway (the host then asks again). Keeps idle connections few and short
/// enough for NATs and firewalls, and a restarted bootstrapper is found within this time.
pub const WATCH_HOLD: Duration = Duration::from_secs(25);

impl Neighbours {
    /// The bootstrapper's answer this came from (for [`BootstrapResponse::digest`]).
    pub fn to_response(&self) -> BootstrapResponse {
        BootstrapResponse::Neighbours {
            id: self.id,
            addr: self.addr,
            neighbours: self.neighbours.clone(),
            members: self.members.clone(),
        }
    }
}

/// Keeps a long-poll [`BootstrapRequest::Watch`] open with the bootstrapper (from `local_ip`)
/// and sends every new neighbour list on the returned channel, starting from `initial` (what
/// the host joined with): topology edits reach running hosts within a moment of the
/// bootstrapper reloading its file. A host the topology no longer lists gets an empty list (and
/// its neighbours back if it is listed again). Network trouble is retried with backoff; the
/// task ends on `shutdown` or when the receiver is dropped.
pub fn watch_neighbours(
    bootstrapper: SocketAddr,
    local_ip: IpAddr,
    keys: HostKeys,
    initial: &Neighbours,
    shutdown: CancellationToken,
) -> tokio::sync::mpsc::Receiver<(Vec<PathHop>, Vec<Member>)> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut known = initial.to_response().digest();
    let mut current = (initial.neighbours.clone(), initial.members.clone());
    tokio::spawn(async move {
        let new_backoff = || {
            Backoff::new(
                Duration::from_millis(500),
                Duration::from_secs(30),
                Rng::from_entropy(),
            )
        };
        let mut backoff = new_backoff();
        let mut failing = false;
        loop {
            let request = BootstrapRequest::Watch { known };
            let started = tokio::time::Instant::now();
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = exchange(bootstrapper, local_ip, &keys, &request, WATCH_HOLD + IO_TIMEOUT) => r,
            };
            let wait = match r {
                Ok(resp) => {
                    if failing {
                        tracing::info!(%bootstrapper, "bootstrapper reachable again");
                    }
                    failing = false;
                    backoff = new_backoff();
                    let digest = resp.digest();
                    let unchanged = digest == known;
                    known = digest;
                    let next = match resp {
                        BootstrapResponse::Neighbours {
                            neighbours,
                            members,
                            ..
                        } => (neighbours, members),
                        BootstrapResponse::Refused { reason } => {
                            tracing::warn!(%bootstrapper, "the topology no longer lists us: {reason}");
                            (Vec::new(), current.1.clone())
                        }
                    };
                    if next != current {
                        current = next.clone();
                        if tx.send(next).await.is_err() {
                            return;
                        }
                    }
                    // An answer that changed nothing and came at once (a bootstrapper that
                    // does not hold): do not spin.
                    (unchanged && started.elapsed() < Duration::from_secs(1))
                        .then_some(Duration::from_secs(1))
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    if failing {
                        tracing::debug!(%bootstrapper, error = %e, retry_in = ?wait, "topology watch failed");
                    } else {
                        tracing::warn!(%bootstrapper, error = %e, retry_in = ?wait,
                            "topology watch failed; topology edits wait until it is back");
                    }
                    failing = true;
                    Some(wait)
                }
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    });
    rx
}

/// Like [`fetch_neighbours`], retrying transient failures with jittered exponential backoff
/// (0.5 s doubling to a 30 s cap) until it succeeds, is refused, or `shutdown` fires. Three
/// authentication failures in a row (a wrong network key) end it with that error.
pub async fn fetch_neighbours_retrying(
    bootstrapper: SocketAddr,
    local_ip: IpAddr,
    keys: &HostKeys,
    shutdown: &CancellationToken,
) -> Result<Neighbours, FetchError> {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(30),
        Rng::from_entropy(),
    );
    let mut auth_failures = 0;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Err(FetchError::Cancelled),
            r = fetch_neighbours(bootstrapper, local_ip, keys) => r,
        };
        if !attempt.as_ref().is_err_and(FetchError::is_auth) {
            auth_failures = 0;
        }
        match attempt {
            Err(e)
                if e.is_auth() && {
                    auth_failures += 1;
                    auth_failures >= 3
                } =>
            {
                return Err(e)
            }
            Err(e) if e.is_transient() => {
                let wait = backoff.next_delay();
                tracing::warn!(%bootstrapper, error = %e, retry_in = ?wait, "bootstrap failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(FetchError::Cancelled),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            other => return other,
        }
    }
}

/// Jittered exponential backoff: the n-th delay is uniform in `[base/2, base]` where `base`
/// starts at `initial` and doubles up to `cap` ("equal jitter": spreads retries of many
/// daemons restarted together, never waits less than half the nominal delay).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    rng: Rng,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `cap`, jittered by `rng`.
    pub fn new(initial: Duration, cap: Duration, rng: Rng) -> Backoff {
        Backoff {
            base: initial.min(cap),
            cap,
            rng,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let half = self.base / 2;
        let jitter = half.mul_f64(self.rng.next_f64());
        let d = half + jitter;
        self.base = (self.base * 2).min(self.cap);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
            Rng::seeded(3),
        );
        let mut nominal = Duration::from_millis(500);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(30));
        }
        // After enough attempts it sits at the cap (jittered in [15 s, 30 s]).
        let d = b.next_delay();
        assert!(d >= Duration::from_secs(15) && d <= Duration::from_secs(30));
        // Two daemons with different seeds do not retry in lockstep.
        let mut x = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Rng::seeded(1),
        );
        let mut y = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Rng::seeded(2),
        );
        assert_ne!(x.next_delay(), y.next_delay());
    }

    #[tokio::test]
    async fn frames_survive_any_split_and_refuse_oversize() {
        let (mut a, mut b) = tokio::io::duplex(7); // tiny buffer: many partial reads/writes
        let h = Header::new(NodeId(9));
        let resp = BootstrapResponse::Refused {
            reason: "x".repeat(300),
        };
        let r2 = resp.clone();
        let w = tokio::spawn(async move { write_frame(&mut a, &h, &r2).await });
        let (h2, got): (Header, BootstrapResponse) =
            read_frame(&mut b, MAX_FRAME_LEN).await.unwrap();
        w.await.unwrap().unwrap();
        assert_eq!((h2, got), (h, resp));

        let mut big: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
        let e = read_frame::<_, BootstrapResponse>(&mut big, MAX_FRAME_LEN)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
    }
}

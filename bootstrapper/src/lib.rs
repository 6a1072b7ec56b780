//! # bootstrapper — hands every server and node its neighbours
//!
//! A TCP service: a host connects *from its overlay IP*, sends one request frame and gets its
//! stable [`NodeId`] and neighbour list from the topology file, or a clear refusal when its IP is
//! not in the topology. The topology is watched: a valid edit applies to later requests, an
//! invalid one is logged and the previous topology stays in force.
//!
//! Robustness: every connection has one deadline for the whole exchange ([`Config::io_timeout`],
//! 5 s), so a client that sends a byte a second, or nothing, is dropped; frames are size-capped;
//! connections beyond [`Config::max_connections`] are closed at once rather than starving the
//! process of file descriptors; none of this blocks the accept loop.

use common::bootstrap::{read_frame, write_frame, FrameError, IO_TIMEOUT, WATCH_HOLD};
use common::topology::Topology;
use common::wire::{
    BootstrapRequest, BootstrapResponse, Header, PathHop, DEFAULT_PORT, MAX_FRAME_LEN,
};
use common::NodeId;
use notify::{RecursiveMode, Watcher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

/// Runtime settings of the bootstrapper.
#[derive(Debug, Clone)]
pub struct Config {
    /// Deadline for a whole exchange (read request, write answer). Protects against slow-loris
    /// clients and dead peers.
    pub io_timeout: Duration,
    /// Most connections served at once; more are closed at once (each costs a descriptor).
    pub max_connections: usize,
    /// The UDP port the overlay hosts listen on, used to build neighbour addresses.
    pub overlay_port: u16,
    /// How long a host's `Watch` (long poll for topology edits) is held when its answer does
    /// not change; then it is answered unchanged and the host asks again. Must stay below the
    /// hosts' own wait ([`WATCH_HOLD`] + [`IO_TIMEOUT`]).
    pub watch_hold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            io_timeout: IO_TIMEOUT,
            max_connections: 4096,
            overlay_port: DEFAULT_PORT,
            watch_hold: WATCH_HOLD,
        }
    }
}

/// Why the bootstrapper could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapperError {
    /// The topology file could not be loaded or is invalid (the message names the file, the
    /// line and the offending entry).
    #[error("{0}")]
    Topology(common::topology::TopologyError),
    /// The file watcher could not be set up.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The file.
        path: PathBuf,
        /// Why.
        source: notify::Error,
    },
}

/// Loads and validates the topology file, logging its warnings.
pub fn load_topology(path: &Path) -> Result<Topology, BootstrapperError> {
    let (topology, warnings) = Topology::load(path).map_err(BootstrapperError::Topology)?;
    for w in &warnings {
        warn!(path = %path.display(), "topology: {w}");
    }
    Ok(topology)
}

/// Keeps the file watcher alive; dropping it stops watching.
pub struct TopologyWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Watches `path` and publishes every valid new version of the topology on the returned
/// channel; an invalid version is logged and ignored (the previous one stays in force).
///
/// The parent directory is watched, not the file, so editors that save by writing a new file and
/// renaming it over the old one are followed too. Bursts of events are coalesced (100 ms).
pub fn watch_topology(
    path: &Path,
    initial: Topology,
    shutdown: CancellationToken,
) -> Result<(watch::Receiver<Arc<Topology>>, TopologyWatch), BootstrapperError> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|n| n.to_owned());
    let watch_err = |source| BootstrapperError::Watch {
        path: path.to_owned(),
        source,
    };
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                let ours = ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_owned()) == file_name);
                if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                    let _ = ev_tx.send(());
                }
            }
            Err(e) => warn!(error = %e, "topology watcher error"),
        })
        .map_err(watch_err)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_err)?;
    let path = path.to_owned();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = ev_rx.recv() => if ev.is_none() { break },
            }
            // Coalesce the burst of events one save produces.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while ev_rx.try_recv().is_ok() {}
            if !path.exists() {
                warn!(path = %path.display(), "topology file is gone; keeping the current topology");
                continue;
            }
            match load_topology(&path) {
                Ok(t) => {
                    if *tx.borrow().as_ref() == t {
                        debug!(path = %path.display(), "topology file touched, content unchanged");
                    } else {
                        info!(path = %path.display(), hosts = t.len(), links = t.edge_count(), "topology reloaded");
                        tx.send_replace(Arc::new(t));
                    }
                }
                Err(e) => {
                    error!("rejected topology change, keeping the previous topology: {e}")
                }
            }
        }
    });
    Ok((rx, TopologyWatch { _watcher: watcher }))
}

/// The answer for a host at `ip` under `topology`.
pub fn answer(topology: &Topology, ip: IpAddr, overlay_port: u16) -> BootstrapResponse {
    match topology.neighbours(ip) {
        Some(neighbours) => BootstrapResponse::Neighbours {
            id: NodeId::for_ip(ip),
            addr: SocketAddr::new(ip, overlay_port),
            neighbours: neighbours
                .iter()
                .map(|&n| PathHop {
                    id: NodeId::for_ip(n),
                    addr: SocketAddr::new(n, overlay_port),
                })
                .collect(),
        },
        None => BootstrapResponse::Refused {
            reason: format!(
                "{ip} is not in the topology (connect from an address listed in the topology file)"
            ),
        },
    }
}

/// Serves bootstrap requests on `listener` until `shutdown` fires, answering from the latest
/// topology published on `topology`. Returns after in-flight exchanges finish (each is bounded
/// by the I/O timeout).
pub async fn run(
    listener: TcpListener,
    topology: watch::Receiver<Arc<Topology>>,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    info!(%local, "bootstrapper listening");
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%peer, limit = config.max_connections, "too many connections; closing");
            drop(stream);
            continue;
        };
        let topo = topology.clone();
        let cfg = config.clone();
        let stop = shutdown.clone();
        let span = tracing::info_span!("conn", %peer);
        tasks.spawn(
            async move {
                if let Err(e) = serve(stream, peer, topo, &cfg, stop).await {
                    debug!(error = %e, "exchange failed");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    tasks.close();
    tasks.wait().await;
    info!("bootstrapper stopped");
    Ok(())
}

/// Why an exchange with a host ended early.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    /// Reading the request or writing the answer failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading the request or writing the answer took longer than the deadline.
    #[error("no complete exchange within {0:?}; dropped")]
    Timeout(Duration),
}

/// One exchange: the request is read and the answer written each within `io_timeout`
/// (slow-loris clients are dropped); a `Watch` waits in between, up to `watch_hold`, for the
/// host's answer to change.
async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut topology: watch::Receiver<Arc<Topology>>,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let deadline = |d| ServeError::Timeout(d);
    let (_, request): (Header, BootstrapRequest) =
        tokio::time::timeout(cfg.io_timeout, read_frame(&mut stream, MAX_FRAME_LEN))
            .await
            .map_err(|_| deadline(cfg.io_timeout))??;
    let ip = canonical_ip(peer.ip());
    let current = |t: &watch::Receiver<Arc<Topology>>| answer(&t.borrow(), ip, cfg.overlay_port);
    let response = match request {
        BootstrapRequest::Neighbours => {
            let r = current(&topology);
            match &r {
                BootstrapResponse::Neighbours { neighbours, .. } => {
                    info!(%ip, neighbours = neighbours.len(), "answered")
                }
                BootstrapResponse::Refused { reason } => warn!(%ip, "refused: {reason}"),
            }
            r
        }
        BootstrapRequest::Watch { known } => {
            topology.mark_unchanged();
            let mut r = current(&topology);
            let hold = tokio::time::sleep(cfg.watch_hold);
            tokio::pin!(hold);
            while r.digest() == known {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut hold => break,
                    changed = topology.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        r = current(&topology);
                    }
                }
            }
            if r.digest() == known {
                debug!(%ip, "watch: unchanged");
            } else {
                match &r {
                    BootstrapResponse::Neighbours { neighbours, .. } => {
                        info!(%ip, neighbours = ?neighbours.iter().map(|n| n.addr).collect::<Vec<_>>(), "pushed new neighbours")
                    }
                    BootstrapResponse::Refused { reason } => warn!(%ip, "pushed: {reason}"),
                }
            }
            r
        }
    };
    let write = async {
        write_frame(&mut stream, &Header::new(NodeId(0)), &response).await?;
        use tokio::io::AsyncWriteExt;
        let _ = stream.shutdown().await;
        Ok::<_, FrameError>(())
    };
    tokio::time::timeout(cfg.io_timeout, write)
        .await
        .map_err(|_| deadline(cfg.io_timeout))??;
    Ok(())
}

/// An IPv4 peer seen through an IPv6 socket (`::ffff:a.b.c.d`) is the IPv4 host.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

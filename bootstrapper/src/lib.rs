//! # bootstrapper — hands every server and node its neighbours
//!
//! A TCP service: a host connects *from its overlay IP*, sends one request frame and gets its
//! stable [`NodeId`] and neighbour list from the topology file, or a clear refusal when its IP is
//! not in the topology. The topology is watched: a valid edit applies to later requests, an
//! invalid one is logged and the previous topology stays in force.
//!
//! Security: every exchange is a Noise handshake under the network key (see
//! `common::bootstrap`): a host without the network key gets nothing. The handshake proves the
//! host's static key; the bootstrapper registers it for the host's address (first use) and
//! hands every host the keys of the members ([`answer`]), so hosts authenticate each other.
//! A host whose key differs from the one pinned in the topology (`[keys]`), or from the one
//! its address registered before, is refused with a message naming both keys.
//!
//! Robustness: every connection has one deadline for the whole exchange ([`Config::io_timeout`],
//! 5 s), so a client that sends a byte a second, or nothing, is dropped; frames are size-capped;
//! connections beyond [`Config::max_connections`] are closed at once rather than starving the
//! process of file descriptors; none of this blocks the accept loop.

use common::bootstrap::{server_accept, server_answer, FrameError, IO_TIMEOUT, WATCH_HOLD};
use common::keys::{PublicKey, Secret};
use common::topology::Topology;
use common::wire::{BootstrapRequest, BootstrapResponse, Member, PathHop, DEFAULT_PORT};
use common::NodeId;
use notify::{RecursiveMode, Watcher};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
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
    /// The network key: only hosts that hold it are answered.
    pub network: Secret,
}

impl Config {
    /// Defaults with the network key `network`.
    pub fn new(network: Secret) -> Config {
        Config {
            io_timeout: IO_TIMEOUT,
            max_connections: 4096,
            overlay_port: DEFAULT_PORT,
            watch_hold: WATCH_HOLD,
            network,
        }
    }
}

/// The static keys hosts registered (address → key, first use), and a counter that moves on
/// every new registration (held `Watch`es then answer with the new member list).
#[derive(Debug)]
pub struct Registry {
    keys: Mutex<HashMap<IpAddr, PublicKey>>,
    version: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            keys: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
        }
    }
}

impl Registry {
    /// Registers `key` for `ip` under `topology`, or says why it is refused: it differs from
    /// the key the topology pins for `ip`, or from the one `ip` registered before (unless the
    /// topology now pins the new one).
    pub fn register(&self, topology: &Topology, ip: IpAddr, key: PublicKey) -> Result<(), String> {
        let pinned = topology.pinned_key(ip);
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match (pinned, keys.get(&ip)) {
            (Some(p), _) if p != key => {
                return Err(format!(
                    "{ip} presents key {key}, but the topology pins {p} for it: refused (if \
                     this host's key really changed, update its entry in the topology's [keys])"
                ))
            }
            (None, Some(&old)) if old != key => {
                return Err(format!(
                    "{ip} presents key {key}, but registered key {old} earlier: refused (if \
                     this host's key really changed, pin the new key in the topology's [keys], \
                     or restart the bootstrapper)"
                ))
            }
            _ => {}
        }
        if keys.insert(ip, key) != Some(key) {
            drop(keys);
            info!(%ip, %key, "host key registered");
            self.version.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    /// The key of `ip`: pinned by the topology, else registered.
    pub fn key(&self, topology: &Topology, ip: IpAddr) -> Option<PublicKey> {
        topology.pinned_key(ip).or_else(|| {
            self.keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&ip)
                .copied()
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
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

/// The answer for a host at `ip` under `topology`: its id, its neighbours, and every member
/// whose key is known.
pub fn answer(
    topology: &Topology,
    registry: &Registry,
    ip: IpAddr,
    overlay_port: u16,
) -> BootstrapResponse {
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
            members: topology
                .hosts()
                .filter_map(|h| {
                    registry.key(topology, h).map(|key| Member {
                        id: NodeId::for_ip(h),
                        key,
                    })
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
    let registry = Arc::new(Registry::default());
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
        let reg = registry.clone();
        let span = tracing::info_span!("conn", %peer);
        tasks.spawn(
            async move {
                match serve(stream, peer, topo, &reg, &cfg, stop).await {
                    Err(ServeError::Frame(FrameError::Auth(why))) => {
                        warn!("authentication failed from {peer}: {why}; not answered")
                    }
                    Err(e) => debug!(error = %e, "exchange failed"),
                    Ok(()) => {}
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
    registry: &Registry,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let deadline = |d| ServeError::Timeout(d);
    let (key, request, mut session) =
        tokio::time::timeout(cfg.io_timeout, server_accept(&mut stream, &cfg.network))
            .await
            .map_err(|_| deadline(cfg.io_timeout))??;
    let ip = canonical_ip(peer.ip());
    let mut registrations = registry.subscribe();
    let refusal = {
        let t = topology.borrow();
        if t.neighbours(ip).is_some() {
            registry.register(&t, ip, key).err()
        } else {
            None
        }
    };
    let current =
        |t: &watch::Receiver<Arc<Topology>>| answer(&t.borrow(), registry, ip, cfg.overlay_port);
    let response = match (refusal, request) {
        (Some(reason), _) => {
            warn!(%ip, "refused: {reason}");
            BootstrapResponse::Refused { reason }
        }
        (None, BootstrapRequest::Neighbours) => {
            let r = current(&topology);
            match &r {
                BootstrapResponse::Neighbours { neighbours, .. } => {
                    info!(%ip, neighbours = neighbours.len(), "answered")
                }
                BootstrapResponse::Refused { reason } => warn!(%ip, "refused: {reason}"),
            }
            r
        }
        (None, BootstrapRequest::Watch { known }) => {
            topology.mark_unchanged();
            registrations.mark_unchanged();
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
                    changed = registrations.changed() => {
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
        server_answer(&mut stream, &mut session, &response).await?;
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

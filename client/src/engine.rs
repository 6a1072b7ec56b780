//! The tokio driver of [`ClientCore`]: one task owns the core, talks to the network through the
//! [`Transport`] (which alone owns the UDP socket), feeds the sinks ([`Outputs`]), writes the
//! `--stats` file and publishes a [`Snapshot`] for the GUI on a `watch` channel. The GUI (or the
//! headless main) sends [`Command`]s over an `mpsc` channel; nobody waits for anybody.

use crate::core::{CoreConfig, Problem, Snapshot, StreamView};
use crate::graphics::{self, Facts, OpenGl};
use crate::host::ClientHost;
use crate::outputs::{record_path, Outputs, PlayerError, PlayerExit, PlayerKind};
use crate::stats::{StatEvent, StatsWriter};
use common::impair::{ImpairConfig, Impairment};
use common::keys::KnownPops;
use common::port::{Direct, Port, SendShim};
use common::reliable::ReliableConfig;
use common::secure::{Secure, SecureConfig};
use common::wire::ChannelId;
use common::NodeId;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the engine needs to run.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The PoPs (`--servers` × `--port`).
    pub pops: Vec<SocketAddr>,
    /// PoP keys pinned with `--servers IP#KEY`.
    pub pinned: Vec<(SocketAddr, common::keys::PublicKey)>,
    /// PoP keys learned on first use, checked ever after (`--known-pops`; `None`: learned for
    /// this run only).
    pub known_pops: Option<PathBuf>,
    /// The viewer secret to present (`--viewer-key`).
    pub viewer_secret: Option<common::keys::Secret>,
    /// Benchmark only: no session layer.
    pub plaintext: bool,
    /// Local UDP address.
    pub bind: SocketAddr,
    /// Give up (the summary's `failure`) when a [`Problem`] lasts this long; `None`: never
    /// (the window shows problems instead).
    pub give_up: Option<Duration>,
    /// Impairment of outgoing traffic (testing aid).
    pub impair: ImpairConfig,
    /// Player per stream.
    pub player: PlayerKind,
    /// The user's extra player options (`--player-arg`), after the client's own.
    pub player_args: Vec<String>,
    /// Streams to play at start.
    pub streams: Vec<String>,
    /// Record the TS here (suffixed by the stream name when several streams are recorded).
    pub record: Option<PathBuf>,
    /// Re-send the TS as plain UDP here (stream `i` in order of play to port + `i`).
    pub output: Option<SocketAddr>,
    /// JSON-lines stats file.
    pub stats: Option<PathBuf>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Protocol timing.
    pub core: CoreConfig,
}

/// Sent to the engine by the GUI or the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start playing a channel.
    Play(String),
    /// Stop it.
    Stop(String),
}

/// Why the engine could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The local UDP socket.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The stats file.
    #[error("cannot create the stats file {path}: {source}")]
    Stats {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The local UDP socket's address.
    #[error("cannot read the local address of the UDP socket: {0}")]
    LocalAddr(#[source] io::Error),
    /// The known-PoPs file.
    #[error("--known-pops: {0}")]
    KnownPops(#[source] common::keys::KeyError),
}

/// What the engine did, for the exit summary.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Every stream played, with its final counters (a stream played twice appears twice).
    pub streams: Vec<StreamView>,
    /// Why the engine gave up ([`EngineConfig::give_up`]), if it did: what the user must fix.
    pub failure: Option<String>,
}

/// The channels between the engine and its controller.
#[derive(Debug)]
pub struct EngineHandles {
    /// Commands to the engine.
    pub commands: mpsc::UnboundedSender<Command>,
    /// The latest snapshot.
    pub snapshot: watch::Receiver<Snapshot>,
}

/// Everything [`run`] needs besides its config.
#[derive(Debug)]
pub struct EngineChannels {
    commands: mpsc::UnboundedReceiver<Command>,
    snapshot: watch::Sender<Snapshot>,
}

/// Creates the command and snapshot channels.
pub fn channels() -> (EngineHandles, EngineChannels) {
    let (ctx, crx) = mpsc::unbounded_channel();
    let (stx, srx) = watch::channel(Snapshot::default());
    (
        EngineHandles {
            commands: ctx,
            snapshot: srx,
        },
        EngineChannels {
            commands: crx,
            snapshot: stx,
        },
    )
}

/// How often the GUI snapshot is refreshed at most.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);
/// Most notices kept for the GUI.
const MAX_NOTICES: usize = 8;

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Engine {
    cfg: EngineConfig,
    host: ClientHost,
    port: Port,
    stats: Option<StatsWriter>,
    /// Sinks per playing stream, keyed by channel (looked up for every datagram).
    outputs: HashMap<ChannelId, Outputs>,
    generation: u64,
    exits_tx: mpsc::UnboundedSender<PlayerExit>,
    recorded: BTreeSet<PathBuf>,
    record_owner: Option<String>,
    udp_out: Option<Arc<UdpSocket>>,
    udp_streams: Vec<String>,
    notices: Vec<String>,
    player_missing_told: bool,
    /// The player's options after the client's own: video output, then `--player-arg`s.
    player_args: Vec<String>,
    summary: Summary,
    /// Per stream: when its last datagram arrived and whether a keyframe came (stats events).
    arrivals: HashMap<ChannelId, (Instant, bool)>,
    /// Per PoP, the local address our datagrams leave from (or why there is none), for the
    /// messages that tell a user what to check.
    /// PoP keys learned on first use (`--known-pops`).
    known_pops: Option<KnownPops>,
    sources: HashMap<SocketAddr, String>,
}

/// Runs the client until `shutdown` is cancelled (ctrl-c, window closed) or `--duration` is
/// over; then unsubscribes, closes every sink (players are killed) and returns the summary.
pub async fn run(
    cfg: EngineConfig,
    chans: EngineChannels,
    shutdown: CancellationToken,
) -> Result<Summary, EngineError> {
    let EngineChannels {
        mut commands,
        snapshot,
    } = chans;
    let start = now();
    let known_pops = match (&cfg.known_pops, cfg.plaintext) {
        (Some(path), false) => Some(KnownPops::load(path).map_err(EngineError::KnownPops)?),
        _ => None,
    };
    let socket = UdpSocket::bind(cfg.bind)
        .await
        .map_err(|source| EngineError::Bind {
            addr: cfg.bind,
            source,
        })?;
    let stats = match &cfg.stats {
        Some(path) => {
            Some(
                StatsWriter::create(path, start).map_err(|source| EngineError::Stats {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let shim: Box<dyn SendShim> = if cfg.impair.is_passthrough() {
        Box::new(Direct::default())
    } else {
        warn!(impair = %cfg.impair, "TESTING AID: impairing outgoing traffic");
        Box::new(Impairment::new(cfg.impair.clone(), start))
    };
    let port = Port::new(socket, shim);
    let local = port.local_addr().map_err(EngineError::LocalAddr)?;
    let sources: HashMap<SocketAddr, String> = cfg
        .pops
        .iter()
        .map(|&pop| (pop, source_towards(local, pop)))
        .collect();
    info!(%local, pops = ?cfg.pops, "client started");
    for (pop, from) in &sources {
        debug!(%pop, from, "route to PoP");
    }
    let udp_out = match cfg.output {
        Some(to) => {
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            match UdpSocket::bind(any).await {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    warn!(error = %e, "cannot open the --output socket; no UDP output");
                    None
                }
            }
        }
        None => None,
    };
    let player_args = player_options(cfg.player, &cfg.player_args).await;
    let (exits_tx, mut exits_rx) = mpsc::unbounded_channel();
    let mut e = Engine {
        player_args,
        host: {
            let seed = common::rng::Rng::from_entropy().next_u64();
            let host = ClientHost::new(
                cfg.core.clone(),
                &cfg.pops,
                NodeId::random(),
                seed,
                ReliableConfig::default(),
                start,
            );
            if cfg.plaintext {
                host
            } else {
                let mut sec = Secure::new(SecureConfig::viewer(cfg.viewer_secret.clone(), seed));
                for (pop, key) in &cfg.pinned {
                    sec.add_pop(*pop, Some(*key));
                }
                // Keys met before hold for PoPs not pinned on the command line.
                let mut remembered = Vec::new();
                if let Some(known) = &known_pops {
                    for &pop in &cfg.pops {
                        if let (None, Some(key)) = (sec.pop_key(pop), known.get(pop)) {
                            sec.add_pop(pop, Some(key));
                            remembered.push(pop);
                        }
                    }
                }
                let mut host = host.with_secure(sec);
                if let Some(known) = &known_pops {
                    for pop in remembered {
                        host.remembered_key(pop, known.path().display().to_string());
                    }
                }
                host
            }
        },
        cfg,
        known_pops,
        port,
        stats,
        outputs: HashMap::new(),
        generation: 0,
        exits_tx,
        recorded: BTreeSet::new(),
        record_owner: None,
        udp_out,
        udp_streams: Vec::new(),
        notices: Vec::new(),
        player_missing_told: false,
        summary: Summary::default(),
        arrivals: HashMap::new(),
        sources,
    };
    for s in e.cfg.streams.clone() {
        e.play(start, &s).await;
    }
    let deadline = e
        .cfg
        .duration
        .map(|d| tokio::time::Instant::from_std(start + d));
    let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(e.deadline()));
    tokio::pin!(sleep);
    let mut commands_open = true;
    let mut last_snapshot = start;
    loop {
        sleep
            .as_mut()
            .reset(tokio::time::Instant::from_std(e.deadline()));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = sleep_until_opt(deadline) => {
                info!("--duration is over");
                break;
            }
            Some(exit) = exits_rx.recv() => e.player_exited(exit).await,
            cmd = commands.recv(), if commands_open => match cmd {
                Some(Command::Play(name)) => e.play(now(), &name).await,
                Some(Command::Stop(name)) => e.stop(now(), &name, "user").await,
                None => commands_open = false,
            },
            r = e.port.recv() => if let Some((from, bytes)) = r {
                let t = now();
                if let Some(a) = e.host.handle_datagram(t, from, bytes) {
                    e.arrival(t, a.channel, a.pop, a.keyframe);
                }
            },
            _ = &mut sleep => e.host.handle_timeout(now()),
        }
        e.drain_actions().await;
        let t = now();
        if t >= last_snapshot + SNAPSHOT_EVERY {
            last_snapshot = t;
            snapshot.send_replace(e.snapshot(t));
            if let Some(failure) = e.gave_up(t) {
                tracing::error!("{failure}");
                e.summary.failure = Some(failure);
                break;
            }
        }
    }
    // Shutdown: tell the controller (the GUI closes its window), unsubscribe everywhere, close
    // sinks.
    shutdown.cancel();
    let t = now();
    for name in e.host.core().playing() {
        e.record_summary(t, &name);
    }
    e.host.with_core(t, |c| c.stop_all(t, "exit"));
    e.drain_actions().await;
    for (_, o) in e.outputs.drain() {
        o.close().await;
    }
    snapshot.send_replace(e.snapshot(now()));
    // Give the Unsubscribes a moment to leave (best effort; PoPs also time us out): their
    // acknowledgements, or the reliable channel's retransmissions.
    let grace = now() + Duration::from_millis(100);
    while now() < grace {
        let wake = e.deadline().min(grace);
        tokio::select! {
            r = e.port.recv() => if let Some((from, bytes)) = r {
                e.host.handle_datagram(now(), from, bytes);
            },
            _ = tokio::time::sleep_until(wake.into()) => e.host.handle_timeout(now()),
        }
        e.send().await;
    }
    Ok(e.summary)
}

/// The local address datagrams to `pop` leave from (the kernel's route choice for a socket
/// bound like ours), or why none does.
fn source_towards(local: SocketAddr, pop: SocketAddr) -> String {
    let probe = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).and_then(|s| {
        s.connect(pop)?;
        s.local_addr()
    });
    match probe {
        Ok(a) => SocketAddr::new(a.ip(), local.port()).to_string(),
        Err(e) => format!("{local} (which cannot reach {pop}: {e})"),
    }
}

/// The player's options after the client's own: for mpv, the video output that works on this
/// desktop ([`crate::graphics`]: without a GPU mpv's default leaves a black window), unless the
/// user chose one; then the user's `--player-arg`s, last so that they win.
async fn player_options(kind: PlayerKind, user: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if kind == PlayerKind::Mpv {
        if graphics::user_chooses_output(user) {
            info!(player_args = ?user, "mpv video output: as chosen by --player-arg");
        } else {
            let gl = OpenGl::from_facts(&Facts::gather().await);
            info!(options = ?gl.mpv_args(), "mpv video output: {}", gl.describe());
            out = gl.mpv_args();
        }
    }
    out.extend(user.iter().cloned());
    out
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Engine {
    async fn play(&mut self, now: Instant, name: &str) {
        if !self.host.play(now, name) {
            return;
        }
        info!(stream = name, "play requested");
        self.generation += 1;
        let mut o = Outputs::new(self.generation);
        match o.start_player(
            self.cfg.player,
            &self.player_args,
            name,
            self.exits_tx.clone(),
        ) {
            Ok(()) => {}
            Err(PlayerError::NotFound(msg)) => {
                if !self.player_missing_told {
                    self.player_missing_told = true;
                    warn!("{msg}");
                    self.notice(msg);
                }
                info!(
                    stream = name,
                    "no player for this stream; it is still recorded and counted"
                );
            }
            Err(err) => {
                warn!(stream = name, error = %err, "no player");
                self.notice(err.to_string());
            }
        }
        if let Some(path) = self.cfg.record.clone() {
            // With at most one --stream, the first stream recorded owns the plain path; every
            // other stream (or every stream, with several --stream) gets a suffixed one.
            let plain = self.cfg.streams.len() <= 1
                && self.record_owner.get_or_insert_with(|| name.to_string()) == name;
            let path = record_path(&path, name, !plain);
            // Truncated at its first opening in this run, appended to when played again.
            let truncate = self.recorded.insert(path.clone());
            if let Err(err) = o.start_record(path.clone(), truncate).await {
                warn!(path = %path.display(), error = %err, "cannot record");
                self.notice(format!("cannot record to {}: {err}", path.display()));
            }
        }
        if let (Some(sock), Some(to)) = (&self.udp_out, self.cfg.output) {
            let i = match self.udp_streams.iter().position(|s| s == name) {
                Some(i) => i,
                None => {
                    self.udp_streams.push(name.to_string());
                    self.udp_streams.len() - 1
                }
            };
            let to = SocketAddr::new(to.ip(), to.port().wrapping_add(i as u16));
            info!(stream = name, %to, "re-sending as plain UDP");
            o.start_udp(sock.clone(), to);
        }
        if let Some(old) = self.outputs.insert(ChannelId::of_name(name), o) {
            old.close().await;
        }
    }

    async fn stop(&mut self, now: Instant, name: &str, reason: &str) {
        self.record_summary(now, name);
        self.arrivals.remove(&ChannelId::of_name(name));
        if self.host.stop(now, name, reason) {
            info!(stream = name, reason, "stream stopped");
        }
        self.write_output();
        if let Some(o) = self.outputs.remove(&ChannelId::of_name(name)) {
            o.close().await;
        }
    }

    async fn player_exited(&mut self, exit: PlayerExit) {
        let current = self
            .outputs
            .get(&ChannelId::of_name(&exit.stream))
            .is_some_and(|o| o.generation() == exit.generation);
        if !current {
            return;
        }
        info!(stream = %exit.stream, status = %exit.status, "player exited; stopping the stream");
        self.notice(format!(
            "player of {} exited ({})",
            exit.stream, exit.status
        ));
        self.stop(now(), &exit.stream, "player exited").await;
    }

    fn record_summary(&mut self, now: Instant, name: &str) {
        if let Some(v) = self
            .host
            .core()
            .snapshot(now)
            .streams
            .into_iter()
            .find(|s| s.name == name)
        {
            self.summary.streams.push(v);
        }
    }

    /// Hands what the core released (in order per stream) to the sinks.
    fn write_output(&mut self) {
        while let Some((id, payload)) = self.host.poll_output() {
            if let Some(o) = self.outputs.get_mut(&id) {
                o.write(&payload);
            }
        }
    }

    async fn drain_actions(&mut self) {
        self.write_output();
        while let Some(ev) = self.host.poll_event() {
            self.event(ev);
        }
        while let Some((pop, key)) = self.host.poll_learned_key() {
            if let Some(known) = &mut self.known_pops {
                match known.remember(pop, key) {
                    Ok(()) => info!(%pop, %key, file = %known.path().display(),
                        "PoP key learned and remembered: this PoP must prove it from now on"),
                    Err(e) => warn!(%pop, error = %e, "cannot remember the PoP's key"),
                }
            }
        }
        self.send().await;
    }

    /// Sends what the host decided, through the send path.
    async fn send(&mut self) {
        let t = now();
        while let Some((to, bytes)) = self.host.poll_transmit() {
            self.port.push(t, to, bytes);
        }
        self.port.flush(t).await;
    }

    /// The earlier of the host's and the send path's next deadlines.
    fn deadline(&self) -> Instant {
        let host = self.host.poll_timeout();
        self.port.poll_timeout().map_or(host, |p| p.min(host))
    }

    /// Stats of arrivals: the first keyframe, and silences ended (`gap`).
    fn arrival(&mut self, now: Instant, id: ChannelId, pop: SocketAddr, key: bool) {
        let (last, keyed) = self.arrivals.entry(id).or_insert((now, false));
        let gap = now.saturating_duration_since(*last);
        *last = now;
        let first_key = key && !*keyed;
        *keyed |= key;
        if gap <= crate::stats::GAP_EVENT_MIN && !first_key {
            return;
        }
        let Some(name) = self.host.core().name_of(id).map(str::to_owned) else {
            return;
        };
        if gap > crate::stats::GAP_EVENT_MIN {
            self.event(StatEvent::Gap {
                stream: name.clone(),
                pop,
                gap_ms: (gap.as_secs_f64() * 1e4).round() / 10.0,
            });
        }
        if first_key {
            self.event(StatEvent::FirstKeyframe { stream: name, pop });
        }
    }

    fn event(&mut self, ev: StatEvent) {
        match &ev {
            StatEvent::Stats { .. } => debug!(?ev, "stats"),
            StatEvent::SourceChanged { stream, from, to } => {
                warn!(stream, %from, %to, "source changed")
            }
            StatEvent::Pop {
                pop,
                rtt_ms,
                up: false,
            } => {
                let from = self.sources.get(pop).map_or("?", String::as_str);
                warn!(%pop, from, ?rtt_ms, "PoP down")
            }
            StatEvent::Pop { pop, rtt_ms, .. } => info!(%pop, ?rtt_ms, "PoP up"),
            StatEvent::Streams { names } => info!(?names, "channels"),
            StatEvent::Play { stream, pop } => info!(stream, %pop, "subscribed"),
            StatEvent::FirstPacket { stream, pop } => info!(stream, %pop, "first packet"),
            StatEvent::FirstKeyframe { stream, pop } => info!(stream, %pop, "first keyframe"),
            StatEvent::Gap { stream, gap_ms, .. } => info!(stream, gap_ms, "gap in the stream"),
            StatEvent::PathAdded { stream, pop } => info!(stream, %pop, "second PoP subscribed"),
            StatEvent::PathLost {
                stream,
                pop,
                primary,
            } => warn!(stream, %pop, %primary, "one of two PoPs lost; continuing from the other"),
            StatEvent::Stop { .. } => {}
        }
        if let Some(w) = &mut self.stats {
            if let Err(e) = w.write(now(), &ev) {
                warn!(error = %e, "cannot write the stats file; no more stats");
                self.stats = None;
            }
        }
    }

    fn notice(&mut self, msg: String) {
        if self.notices.len() == MAX_NOTICES {
            self.notices.remove(0);
        }
        self.notices.push(msg);
    }

    fn snapshot(&self, now: Instant) -> Snapshot {
        let mut s = self.host.core().snapshot(now);
        s.notices = self.notices.clone();
        s.problems = self
            .host
            .core()
            .problems()
            .iter()
            .map(|p| self.describe(now, p))
            .collect();
        s
    }

    /// The problem that has lasted [`EngineConfig::give_up`], described, if any.
    fn gave_up(&self, now: Instant) -> Option<String> {
        let limit = self.cfg.give_up?;
        self.host
            .core()
            .problems()
            .iter()
            .find(|p| now.saturating_duration_since(p.since()) >= limit)
            .map(|p| format!("giving up: {}", self.describe(now, p)))
    }

    /// A problem in words, with what to check.
    fn describe(&self, now: Instant, p: &Problem) -> String {
        let secs = now.saturating_duration_since(p.since()).as_secs_f64();
        match p {
            Problem::NoPop { .. } => {
                let tried: Vec<String> = self
                    .cfg
                    .pops
                    .iter()
                    .map(|pop| {
                        let from = self.sources.get(pop).map_or("?", String::as_str);
                        format!("{pop} from {from}")
                    })
                    .collect();
                format!(
                    "no PoP has answered for {secs:.0} s (pinged {}). Check that a node runs \
                     there (and that it joined the overlay: TCP {} to the bootstrapper), that \
                     UDP {} is open between this machine and the PoP in both directions, and \
                     that --bind (now {}) is an address the PoP can reach",
                    tried.join(", "),
                    common::wire::DEFAULT_PORT,
                    self.cfg
                        .pops
                        .first()
                        .map_or(common::wire::DEFAULT_PORT, |p| p.port()),
                    self.cfg.bind,
                )
            }
            Problem::NotOffered {
                stream, offered, ..
            } => {
                let offered = if offered.is_empty() {
                    "none".to_owned()
                } else {
                    offered.join(", ")
                };
                format!(
                    "{stream:?} is not offered by any live PoP (waited {secs:.0} s; channels \
                     offered: {offered})"
                )
            }
            Problem::Refused { pop, why, .. } => format!("PoP {pop}: {why}"),
        }
    }
}

//! The command line.

use crate::core::CoreConfig;
use crate::engine::EngineConfig;
use crate::outputs::PlayerKind;
use common::impair::ImpairConfig;
use common::wire::DEFAULT_PORT;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A Pessi Streamer client: picks the best point of presence by RTT, plays channels in mpv or
/// ffplay, fails over when its PoP stops answering.
#[derive(Debug, Clone, clap::Parser)]
#[command(version)]
pub struct Args {
    /// Points of presence (overlay nodes), comma-separated: IPs, host names or `host:port`
    /// (e.g. `10.0.0.5,relay2.lan:8010,[fd00::5]:8010`); `--port` is the default port. Append
    /// `#KEY` (the PoP's public key, 64 hex digits, as its log prints) to pin it: a PoP that
    /// proves another key is refused. Without a pin, the key is learned at the first
    /// handshake and kept in `--known-pops` for the next runs.
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// The viewer secret (a key file) of PoPs that admit only viewers who present it (their
    /// --viewer-key). Without it, only open PoPs admit us ("access denied" otherwise).
    #[arg(long, env = "PESSI_VIEWER_KEY", value_name = "FILE")]
    pub viewer_key: Option<PathBuf>,
    /// Where the keys of the PoPs met are kept (trust on first use, as SSH's known_hosts):
    /// a PoP not pinned with `IP#KEY` must prove the key it proved the first time, or is
    /// refused. Default: `known-pops` in the key directory ($PESSI_KEY_DIR, else
    /// $XDG_CONFIG_HOME/pessi-streamer, else ~/.config/pessi-streamer).
    #[arg(long, env = "PESSI_KNOWN_POPS", value_name = "FILE")]
    pub known_pops: Option<PathBuf>,
    /// Benchmark only: talk to PoPs in clear.
    #[arg(long, hide = true)]
    pub bench_plaintext: bool,
    /// UDP port of the overlay (for `--servers` entries without a port).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Local UDP address (port 0 = any free port). Default: any address of this machine
    /// (`0.0.0.0:0`, or `[::]:0` for IPv6 PoPs), which reaches PoPs on loopback and on other
    /// hosts alike; give one to pick the interface (e.g. `10.0.0.9:0`).
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Headless: give up with an error (non-zero exit) when no PoP has answered, or a requested
    /// stream has been offered by no live PoP, for this long (e.g. `10s`; `0` waits forever).
    /// The window shows these problems instead.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub give_up: Duration,
    /// TESTING AID: impair outgoing traffic (same grammar as the daemons' `--impair`).
    #[arg(long = "impair", value_name = "SPEC")]
    pub impair: Vec<String>,
    /// Video player per stream.
    #[arg(long, value_enum, default_value = "mpv")]
    pub video_player: PlayerKind,
    /// Extra option for the video player (repeatable), passed after the client's own so that
    /// it wins, e.g. `--player-arg=--vo=x11` (mpv) or `--player-arg=-vf --player-arg=hflip`
    /// (ffplay).
    #[arg(long = "player-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub player_args: Vec<String>,
    /// Play this channel at start (repeatable). It starts as soon as a live PoP lists it.
    #[arg(long = "stream", value_name = "NAME")]
    pub streams: Vec<String>,
    /// No window (implied when neither DISPLAY nor WAYLAND_DISPLAY is set).
    #[arg(long)]
    pub headless: bool,
    /// Write the received MPEG-TS here; with several streams, `<stem>-<stream>.<ext>`.
    #[arg(long, value_name = "FILE.ts")]
    pub record: Option<PathBuf>,
    /// Re-send the TS as plain 1316-byte UDP datagrams (`ffplay udp://IP:PORT` plays it);
    /// a second stream goes to PORT+1, and so on.
    #[arg(long, value_name = "udp://IP:PORT", value_parser = parse_udp_url)]
    pub output: Option<SocketAddr>,
    /// Exit after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Write events and per-stream counters as JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    /// A PoP silent for this long (or `2·SRTT + 4·RTTVAR` if longer) is down; it is pinged
    /// every 100 ms (e.g. `800ms`, `2s`). A PoP feeding a stream is pinged every 25 ms instead
    /// and is down after 150 ms of silence.
    #[arg(long, default_value = "800ms", value_parser = humantime::parse_duration)]
    pub pop_timeout: Duration,
    /// Jitter-buffer latency: datagrams are reordered and lost ones recovered (NACKs to the
    /// PoP) within this delay (e.g. `200ms`); `0` passes video straight through.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Do not NACK lost datagrams (the jitter buffer still reorders).
    #[arg(long)]
    pub no_recovery: bool,
    /// PoPs per stream: 1, or 2 to receive each stream from the two best PoPs at once, merged
    /// by sequence number (a datagram is lost only if both lose it; losing a PoP loses
    /// nothing).
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_redundancy)]
    pub redundancy: usize,
}

/// Parses `--redundancy`: 1 or 2.
pub fn parse_redundancy(s: &str) -> Result<usize, String> {
    match s.trim() {
        "1" => Ok(1),
        "2" => Ok(2),
        _ => Err(format!(
            "{s:?} is not supported: use 1 (one PoP per stream) or 2 (two PoPs per stream, \
             merged by sequence number)"
        )),
    }
}

/// Parses `udp://IP:PORT`.
pub fn parse_udp_url(s: &str) -> Result<SocketAddr, String> {
    let rest = s
        .strip_prefix("udp://")
        .ok_or_else(|| format!("expected udp://IP:PORT, got {s:?}"))?;
    rest.parse()
        .map_err(|e| format!("expected udp://IP:PORT, got {s:?}: {e}"))
}

/// Why the arguments are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// `--impair`.
    #[error("invalid --impair: {0}")]
    Impair(String),
    /// `--duration`.
    #[error("invalid --duration {0}: must be a positive number of seconds")]
    Duration(f64),
    /// `--viewer-key`.
    #[error("--viewer-key: {0}")]
    ViewerKey(String),
    /// A `--servers` entry.
    #[error("invalid --servers entry {entry:?}: {reason}")]
    Server {
        /// The entry.
        entry: String,
        /// What is wrong.
        reason: String,
    },
}

/// Resolves one `--servers` entry: `IP`, `IP:PORT`, `[IPv6]:PORT`, `HOST` or `HOST:PORT`
/// (`port` when none is given). A host name resolving to several addresses gives the first
/// IPv4 one (the overlay's hosts bind one address each), else the first.
pub fn resolve_server(entry: &str, port: u16) -> Result<SocketAddr, ArgsError> {
    let e = entry.trim();
    let err = |reason: String| ArgsError::Server {
        entry: entry.to_owned(),
        reason,
    };
    if e.is_empty() {
        return Err(err("empty".into()));
    }
    if let Ok(a) = e.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = e.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let (host, port) = match e.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| err(format!("{p:?} is not a port number")))?,
        ),
        None => (e, port),
    };
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|x| err(format!("cannot resolve {host:?}: {x}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| err(format!("{host:?} has no address")))
}

/// The default local address for `pops`: any address of the PoPs' family, any port.
pub fn default_bind(pops: &[SocketAddr]) -> SocketAddr {
    if !pops.is_empty() && pops.iter().all(SocketAddr::is_ipv6) {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    }
}

impl Args {
    /// Whether to run without a window, and why (for the log).
    pub fn headless_reason(&self) -> Option<&'static str> {
        if self.headless {
            return Some("--headless");
        }
        let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
        if !set("DISPLAY") && !set("WAYLAND_DISPLAY") {
            return Some("neither DISPLAY nor WAYLAND_DISPLAY is set");
        }
        None
    }

    /// The engine's configuration.
    pub fn engine_config(&self) -> Result<EngineConfig, ArgsError> {
        let impair =
            ImpairConfig::parse_many(&self.impair).map_err(|e| ArgsError::Impair(e.to_string()))?;
        let duration = match self.duration {
            None => None,
            Some(d) if d.is_finite() && d > 0.0 => Some(Duration::from_secs_f64(d)),
            Some(d) => return Err(ArgsError::Duration(d)),
        };
        let mut streams = Vec::new();
        for s in &self.streams {
            if !streams.contains(s) {
                streams.push(s.clone());
            }
        }
        let mut pops = Vec::new();
        let mut pinned = Vec::new();
        for s in &self.servers {
            let (host, key) = match s.rsplit_once('#') {
                Some((h, k)) => (
                    h,
                    Some(
                        common::keys::PublicKey::parse(k).map_err(|_| ArgsError::Server {
                            entry: s.clone(),
                            reason: format!("{k:?} after '#' is not a public key (64 hex digits)"),
                        })?,
                    ),
                ),
                None => (s.as_str(), None),
            };
            let a = resolve_server(host, self.port)?;
            pops.push(a);
            if let Some(k) = key {
                pinned.push((a, k));
            }
        }
        let viewer_secret = match &self.viewer_key {
            Some(p) => {
                Some(common::keys::load(p).map_err(|e| ArgsError::ViewerKey(e.to_string()))?)
            }
            None => None,
        };
        Ok(EngineConfig {
            bind: self.bind.unwrap_or_else(|| default_bind(&pops)),
            pops,
            pinned,
            known_pops: Some(
                self.known_pops
                    .clone()
                    .unwrap_or_else(common::keys::KnownPops::default_path),
            ),
            viewer_secret,
            plaintext: self.bench_plaintext,
            give_up: (!self.give_up.is_zero()).then_some(self.give_up),
            impair,
            player: self.video_player,
            player_args: self.player_args.clone(),
            streams,
            record: self.record.clone(),
            output: self.output,
            stats: self.stats.clone(),
            duration,
            core: CoreConfig {
                pop_timeout: self.pop_timeout,
                latency: self.latency,
                recovery: !self.no_recovery,
                redundancy: self.redundancy,
                ..CoreConfig::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn servers_take_ips_ports_and_host_names() {
        let r = |s: &str| resolve_server(s, 8010);
        assert_eq!(r("127.0.0.5").unwrap(), "127.0.0.5:8010".parse().unwrap());
        assert_eq!(
            r("127.0.0.5:9000").unwrap(),
            "127.0.0.5:9000".parse().unwrap()
        );
        assert_eq!(r("[::1]:9000").unwrap(), "[::1]:9000".parse().unwrap());
        assert_eq!(r("::1").unwrap(), "[::1]:8010".parse().unwrap());
        assert_eq!(r("localhost").unwrap(), "127.0.0.1:8010".parse().unwrap());
        assert_eq!(
            r("localhost:8011").unwrap(),
            "127.0.0.1:8011".parse().unwrap()
        );
        let e = r("localhost:http").unwrap_err().to_string();
        assert!(
            e.contains("\"localhost:http\"") && e.contains("port"),
            "{e}"
        );
        let e = r("no-such-host.invalid").unwrap_err().to_string();
        assert!(e.contains("cannot resolve"), "{e}");
        assert_eq!(
            default_bind(&["[::1]:8010".parse().unwrap()]),
            "[::]:0".parse().unwrap()
        );
        let a = Args::try_parse_from([
            "client",
            "--servers",
            "localhost,127.0.0.3:8011",
            "--bind",
            "127.0.0.9:0",
            "--give-up",
            "0",
        ])
        .unwrap();
        let c = a.engine_config().unwrap();
        assert_eq!(
            c.pops,
            [
                "127.0.0.1:8010".parse().unwrap(),
                "127.0.0.3:8011".parse().unwrap()
            ]
        );
        assert_eq!(c.bind, "127.0.0.9:0".parse().unwrap());
        assert_eq!(c.give_up, None);
    }

    #[test]
    fn parses_the_documented_flags() {
        let a = Args::try_parse_from([
            "client",
            "--servers",
            "127.0.0.2,127.0.0.3",
            "--video-player",
            "none",
            "--stream",
            "a",
            "--stream",
            "b",
            "--output",
            "udp://127.0.0.1:5000",
            "--duration",
            "2.5",
            "--pop-timeout",
            "2s",
        ])
        .unwrap();
        let c = a.engine_config().unwrap();
        assert_eq!(c.pops.len(), 2);
        assert_eq!(c.pops[0].port(), DEFAULT_PORT);
        assert_eq!(c.player, PlayerKind::None);
        assert_eq!(c.streams, ["a", "b"]);
        assert_eq!(c.output, Some("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(c.duration, Some(Duration::from_millis(2500)));
        assert_eq!(c.core.pop_timeout, Duration::from_secs(2));
        assert_eq!(c.core.latency, Duration::from_millis(200));
        assert!(c.core.recovery);
        assert_eq!(c.core.redundancy, 1);
        let a = Args::try_parse_from([
            "client",
            "--servers",
            "127.0.0.2",
            "--latency",
            "0ms",
            "--no-recovery",
        ])
        .unwrap();
        let c = a.engine_config().unwrap();
        assert_eq!(c.core.latency, Duration::ZERO);
        assert!(!c.core.recovery);
        assert!(parse_udp_url("127.0.0.1:5").is_err());
        assert_eq!(
            c.bind,
            "0.0.0.0:0".parse().unwrap(),
            "default bind: any address"
        );
        assert_eq!(c.give_up, Some(Duration::from_secs(10)));
        let a = Args::try_parse_from(["client", "--servers", "127.0.0.2", "--redundancy", "2"])
            .unwrap();
        assert_eq!(a.engine_config().unwrap().core.redundancy, 2);
        let a = Args::try_parse_from([
            "client",
            "--servers",
            "127.0.0.2",
            "--player-arg=--vo=x11",
            "--player-arg",
            "--fs",
            "--player-arg",
            "-vf",
        ])
        .unwrap();
        assert_eq!(
            a.engine_config().unwrap().player_args,
            ["--vo=x11", "--fs", "-vf"]
        );
        for bad in ["0", "3", "two"] {
            let e = Args::try_parse_from(["client", "--servers", "127.0.0.2", "--redundancy", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--redundancy") && e.contains("use 1"), "{e}");
        }
    }

    #[test]
    fn the_default_bind_reaches_the_pops() {
        let bind = |s: &[&str]| {
            let pops: Vec<SocketAddr> =
                s.iter().map(|x| resolve_server(x, 8010).unwrap()).collect();
            default_bind(&pops).to_string()
        };
        // Any address: loopback PoPs are reached from 127.0.0.1, others from the interface
        // that routes to them.
        assert_eq!(bind(&["127.0.0.5", "127.0.0.4"]), "0.0.0.0:0");
        assert_eq!(bind(&["::1"]), "[::]:0");
        assert_eq!(bind(&["10.77.3.5"]), "0.0.0.0:0");
        assert_eq!(bind(&["127.0.0.5", "10.77.3.5"]), "0.0.0.0:0");
        assert_eq!(bind(&["2001:db8::5"]), "[::]:0");
        let a = Args::try_parse_from(["client", "--servers", "10.0.0.2", "--bind", "10.0.0.9:0"])
            .unwrap();
        assert_eq!(
            a.engine_config().unwrap().bind,
            "10.0.0.9:0".parse().unwrap()
        );
    }
}

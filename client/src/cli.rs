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
    /// Points of presence (overlay nodes), comma-separated IPs.
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<IpAddr>,
    /// UDP port of the overlay.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Local UDP address (port 0 = any free port). The default reaches loopback PoPs; use
    /// 0.0.0.0:0 (or an overlay address) for PoPs on other hosts.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind: SocketAddr,
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
        Ok(EngineConfig {
            pops: self
                .servers
                .iter()
                .map(|ip| SocketAddr::new(*ip, self.port))
                .collect(),
            bind: self.bind,
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
}

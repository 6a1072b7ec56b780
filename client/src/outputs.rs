//! Where a stream's MPEG-TS goes: the video player's stdin, a recording file, a plain UDP
//! output. Each sink is its own task fed by a bounded channel, so a slow player never stalls
//! the network loop (datagrams that do not fit are dropped and counted) nor the other sinks.
//!
//! # Players
//!
//! * `mpv` (default): `mpv --no-terminal --force-window=immediate --title=<name>
//!   --profile=low-latency --cache=no --demuxer-lavf-format=mpegts
//!   --demuxer-lavf-probesize=32768 --demuxer-lavf-analyzeduration=0.1 -`. `low-latency` turns
//!   off mpv's demuxer/decoder buffering and audio-sync waiting; `--cache=no` stops it from
//!   building a read-ahead cache on the pipe; forcing the `mpegts` demuxer skips format
//!   probing; the small probe size/duration stop libavformat from reading seconds of a live
//!   stream to "analyse" it. This is safe because the relays' GOP cache makes every stream
//!   start with PAT/PMT + an IDR frame (SPS/PPS in band), so the H.264 and AAC parameters are
//!   in the first packets; audio is still found (checked with a 2 Mb/s H.264 + AAC clip).
//!   We do *not* pass `--untimed`: without the jitter buffer of a later issue it would show
//!   frames as they come, i.e. jerky.
//! * `ffplay`: `ffplay -hide_banner -loglevel warning -window_title <name> -fflags nobuffer
//!   -flags low_delay -framedrop -f mpegts -probesize 32768 -analyzeduration 100000 -i -`.
//!   `nobuffer`/`low_delay` cut demuxer and decoder delay; the probe limits stop the probing
//!   early while still finding the AAC parameters (`-probesize 32 -analyzeduration 0` often
//!   starts without audio; note that `-analyzeduration 0` means libavformat's default, 5 s).
//!
//! Measured (stream on stdin starting at a keyframe datagram, 640×360 H.264 GOP 3 s + AAC,
//! 2 Mb/s, fed in real time after a burst; 3 runs each, on a busy 2-core machine):
//!
//! | time to first frame | join at the keyframe (burst 1) | join 1.5 s into the GOP (burst 280) |
//! |---|---|---|
//! | mpv, no options | 0.96–1.07 s | 0.70–0.85 s |
//! | mpv, low-latency + cache=no + mpegts | 0.34–0.63 s | 0.59–0.90 s |
//! | mpv, the options above | 0.15–0.44 s | 0.34–0.49 s |
//! | libavformat (ffprobe), defaults (ffplay's demuxer) | 5.17–5.19 s | 3.79–3.83 s |
//! | libavformat, nobuffer + low_delay + 32768/100000 | 3.15–3.16 s | 1.77–1.79 s |
//!
//! libavformat (ffprobe/ffmpeg, hence ffplay) still holds the first video frame until about
//! 3 s of stream have been read even with these options (it waits for a valid DTS on every
//! stream); mpv does not. mpv is the default player for that reason.
//! * `none`: no player (record, re-send and count only).
//!
//! After these flags come, for mpv, the video-output options chosen by [`crate::graphics`]
//! (without a GPU mpv's default output leaves a black window: `--vo=x11` then), and last the
//! user's `--player-arg`s, so that theirs win (mpv and ffplay keep an option's last value).
//!
//! A player that is not installed is reported once with how to get it, and the stream goes on
//! being recorded and counted. When the player exits (the user closed its window) the engine
//! stops that stream. A closed pipe is not an error for the client.
//!
//! Every child is spawned by [`child_command`]: killed when its handle is dropped and, on
//! Linux, when the client dies (`PR_SET_PDEATHSIG`), so no player outlives the client.

use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Datagrams queued per sink before new ones are dropped (~1.3 MB, a few seconds of video).
pub const SINK_QUEUE: usize = 1024;

/// Which video player to start for each stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlayerKind {
    /// mpv, reading the TS from stdin.
    Mpv,
    /// ffplay (FFmpeg), reading the TS from stdin.
    Ffplay,
    /// No player.
    None,
}

impl PlayerKind {
    /// Program name and arguments for stream `name`, `extra` (the video-output options and the
    /// user's `--player-arg`s) after ours and before the input, so they win; `None` for
    /// [`PlayerKind::None`].
    pub fn command_line(self, name: &str, extra: &[String]) -> Option<(&'static str, Vec<String>)> {
        let args: Vec<&str> = match self {
            PlayerKind::None => return None,
            PlayerKind::Mpv => vec![
                "--no-terminal",
                "--force-window=immediate",
                "--profile=low-latency",
                "--cache=no",
                "--demuxer-lavf-format=mpegts",
                "--demuxer-lavf-probesize=32768",
                "--demuxer-lavf-analyzeduration=0.1",
            ],
            PlayerKind::Ffplay => vec![
                "-hide_banner",
                "-loglevel",
                "warning",
                "-fflags",
                "nobuffer",
                "-flags",
                "low_delay",
                "-framedrop",
                "-f",
                "mpegts",
                "-probesize",
                "32768",
                "-analyzeduration",
                "100000",
            ],
        };
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        match self {
            PlayerKind::Mpv => {
                args.push(format!("--title=Pessi Streamer: {name}"));
                args.extend(extra.iter().cloned());
                args.push("-".into());
                Some(("mpv", args))
            }
            PlayerKind::Ffplay => {
                args.extend(["-window_title".into(), format!("Pessi Streamer: {name}")]);
                args.extend(extra.iter().cloned());
                args.extend(["-i".into(), "-".into()]);
                Some(("ffplay", args))
            }
            PlayerKind::None => None,
        }
    }

    /// What to tell the user when the program is not installed.
    pub fn missing_message(self) -> String {
        match self {
            PlayerKind::Mpv => "mpv not found: install it with `sudo apt-get install mpv`, or use \
                                --video-player ffplay / none"
                .into(),
            PlayerKind::Ffplay => "ffplay not found: install it with `sudo apt-get install \
                                   ffmpeg`, or use --video-player mpv / none"
                .into(),
            PlayerKind::None => String::new(),
        }
    }
}

/// Why a player could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PlayerError {
    /// The program is not installed (not on `PATH`).
    #[error("{0}")]
    NotFound(String),
    /// Any other spawn failure.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Sent by a player task when its player has exited by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerExit {
    /// The stream it was playing.
    pub stream: String,
    /// Which opening of the stream it belonged to (see [`Outputs::generation`]).
    pub generation: u64,
    /// The exit status, as text.
    pub status: String,
}

/// The sinks of one stream.
#[derive(Debug)]
pub struct Outputs {
    generation: u64,
    player: Option<mpsc::Sender<Bytes>>,
    record: Option<mpsc::Sender<Bytes>>,
    udp: Option<(Arc<UdpSocket>, SocketAddr)>,
    tasks: Vec<JoinHandle<()>>,
    dropped: u64,
}

impl Outputs {
    /// No sinks (yet).
    pub fn new(generation: u64) -> Outputs {
        Outputs {
            generation,
            player: None,
            record: None,
            udp: None,
            tasks: Vec::new(),
            dropped: 0,
        }
    }

    /// Which opening of the stream this is: a player exit of an earlier one is ignored.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Datagrams dropped because a sink's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Starts the player for `stream`. When it exits by itself, a [`PlayerExit`] is sent on
    /// `exits`.
    pub fn start_player(
        &mut self,
        kind: PlayerKind,
        extra: &[String],
        stream: &str,
        exits: mpsc::UnboundedSender<PlayerExit>,
    ) -> Result<(), PlayerError> {
        let Some((program, args)) = kind.command_line(stream, extra) else {
            return Ok(());
        };
        self.spawn_player(program, &args, &kind.missing_message(), stream, exits)
    }

    fn spawn_player(
        &mut self,
        program: &'static str,
        args: &[String],
        missing: &str,
        stream: &str,
        exits: mpsc::UnboundedSender<PlayerExit>,
    ) -> Result<(), PlayerError> {
        let mut cmd = common::runtime::child_command(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PlayerError::NotFound(missing.to_string()),
            _ => PlayerError::Spawn { program, source: e },
        })?;
        info!(
            stream,
            player = program,
            pid = child.id(),
            ?args,
            "player started"
        );
        let mut stdin = child.stdin.take();
        let (tx, mut rx) = mpsc::channel::<Bytes>(SINK_QUEUE);
        let stream = stream.to_string();
        let generation = self.generation;
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    data = rx.recv() => match data {
                        // Stream stopped: dropping `child` kills the player.
                        None => return,
                        Some(b) => if let Some(w) = stdin.as_mut() {
                            if let Err(e) = w.write_all(&b).await {
                                // Broken pipe: the player is going away; its exit is reported
                                // by `wait` below.
                                debug!(stream, error = %e, "player stdin closed");
                                stdin = None;
                            }
                        },
                    },
                    status = child.wait() => {
                        let status = match status {
                            Ok(s) => s.to_string(),
                            Err(e) => e.to_string(),
                        };
                        let _ = exits.send(PlayerExit { stream, generation, status });
                        return;
                    }
                }
            }
        }));
        self.player = Some(tx);
        Ok(())
    }

    /// Records to `path` (truncated if `truncate`, else appended to).
    pub async fn start_record(&mut self, path: PathBuf, truncate: bool) -> io::Result<()> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(truncate)
            .append(!truncate)
            .open(&path)
            .await?;
        info!(path = %path.display(), "recording");
        let (tx, mut rx) = mpsc::channel::<Bytes>(SINK_QUEUE);
        self.tasks.push(tokio::spawn(async move {
            let mut w = tokio::io::BufWriter::new(file);
            while let Some(b) = rx.recv().await {
                if let Err(e) = w.write_all(&b).await {
                    warn!(path = %path.display(), error = %e, "recording failed; stopped");
                    return;
                }
            }
            if let Err(e) = w.flush().await {
                warn!(path = %path.display(), error = %e, "recording flush failed");
            }
        }));
        self.record = Some(tx);
        Ok(())
    }

    /// Re-sends every datagram payload to `to` as a plain UDP datagram.
    pub fn start_udp(&mut self, socket: Arc<UdpSocket>, to: SocketAddr) {
        self.udp = Some((socket, to));
    }

    /// Hands one payload to every sink without waiting.
    pub fn write(&mut self, payload: &Bytes) {
        for tx in [&self.player, &self.record].into_iter().flatten() {
            if tx.try_send(payload.clone()).is_err() {
                self.dropped += 1;
            }
        }
        if let Some((sock, to)) = &self.udp {
            if sock.try_send_to(payload, *to).is_err() {
                self.dropped += 1;
            }
        }
    }

    /// Closes every sink, lets the recording flush, and kills the player.
    pub async fn close(mut self) {
        self.player = None;
        self.record = None;
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), t).await;
        }
    }
}

/// The recording path of `stream`: `path` itself when it is the only stream recorded,
/// otherwise `<stem>-<stream>.<ext>` beside it (the name made file-safe).
pub fn record_path(path: &Path, stream: &str, suffix: bool) -> PathBuf {
    if !suffix {
        return path.to_path_buf();
    }
    let safe: String = stream
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{safe}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{safe}"),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_paths() {
        let p = Path::new("/tmp/out.ts");
        assert_eq!(record_path(p, "news", false), p);
        assert_eq!(
            record_path(p, "news/hd 1", true),
            Path::new("/tmp/out-news_hd_1.ts")
        );
    }

    #[test]
    fn player_command_lines() {
        let extra = ["--vo=x11".to_string(), "--cache=yes".to_string()];
        let (p, a) = PlayerKind::Ffplay
            .command_line("x", &["-vf".into(), "hflip".into()])
            .unwrap();
        assert_eq!(p, "ffplay");
        assert_eq!(a[a.len() - 4..], ["-vf", "hflip", "-i", "-"]);
        let (p, a) = PlayerKind::Mpv.command_line("x", &[]).unwrap();
        assert_eq!(p, "mpv");
        assert!(a.contains(&"--profile=low-latency".to_string()));
        assert_eq!(a.last().unwrap(), "-");
        // The extra options come after ours (mpv keeps the last value) and before the input.
        let (_, b) = PlayerKind::Mpv.command_line("x", &extra).unwrap();
        assert_eq!(b[..a.len() - 1], a[..a.len() - 1]);
        assert_eq!(b[a.len() - 1..], ["--vo=x11", "--cache=yes", "-"]);
        assert!(PlayerKind::None.command_line("x", &extra).is_none());
        assert!(PlayerKind::Mpv
            .missing_message()
            .contains("apt-get install mpv"));
    }

    #[tokio::test]
    async fn missing_player_is_reported_clearly() {
        let mut o = Outputs::new(0);
        let (tx, _rx) = mpsc::unbounded_channel();
        let err = o
            .spawn_player("pessi-no-such-player", &[], "install it", "s", tx)
            .unwrap_err();
        assert!(matches!(err, PlayerError::NotFound(ref m) if m == "install it"));
    }

    #[tokio::test]
    async fn player_exit_is_reported_and_broken_pipe_is_harmless() {
        let mut o = Outputs::new(7);
        let (tx, mut rx) = mpsc::unbounded_channel();
        // `true` exits at once without reading its stdin.
        o.spawn_player("true", &[], "", "s", tx).unwrap();
        for _ in 0..100 {
            o.write(&Bytes::from(vec![0x47; 1316]));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let exit = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.stream, "s");
        assert_eq!(exit.generation, 7);
        o.close().await;
    }
}

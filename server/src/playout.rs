//! The playout task: plays a cached TS file forever, paced by its PCR ([`Pacer`]), as one
//! continuous stream (timestamps and continuity counters rewritten at every loop).
//!
//! The file is read in 64 KiB chunks only as far ahead as the pacer needs (one PCR anchor,
//! ~300 ms), so multi-GB files cost no memory; small files stay in the OS page cache, so no
//! copy is kept in memory. The task sleeps until the next datagram is due
//! (`tokio::time::sleep_until`), but wakes at most once per [`PACE_QUANTUM`] and then sends
//! everything due, so its cost is a timer wake-up per burst.

use crate::pacer::{Pacer, PacerConfig, PacerStats};
use crate::Chunk;
use common::ts::{TsError, TsSplitter, TS_PACKET_LEN};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Datagrams are sent at most this late, in bursts of what fell due meanwhile (a 2.8 Mb/s
/// channel: about 3 datagrams every 10 ms instead of one every 3.8 ms). The viewer's jitter
/// buffer (200 ms) absorbs it; it saves two thirds of the wake-ups of every host downstream.
pub const PACE_QUANTUM: std::time::Duration = std::time::Duration::from_millis(10);

/// Where a channel's datagrams go.
pub trait ChunkSink: Send + 'static {
    /// Delivers one datagram; returns false when the receiver is gone (the task then stops).
    fn send(&mut self, chunk: Chunk) -> impl Future<Output = bool> + Send;
}

impl ChunkSink for mpsc::Sender<Chunk> {
    async fn send(&mut self, chunk: Chunk) -> bool {
        mpsc::Sender::send(self, chunk).await.is_ok()
    }
}

/// Errors ending a playout.
#[derive(Debug, Error)]
pub enum PlayoutError {
    /// The cached file cannot be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file contains no TS packets.
    #[error("{0}: no MPEG-TS packets in file")]
    Empty(PathBuf),
    /// A packet could not be processed.
    #[error("{file}: {source}")]
    Ts {
        /// The file.
        file: PathBuf,
        /// The parse error.
        source: TsError,
    },
}

/// Plays cached TS files.
#[derive(Debug)]
pub struct Playout;

impl Playout {
    /// Starts playing `path` (a TS file from the transcode cache) in a loop as channel
    /// `channel`, sending each 1316-byte datagram to `sink` when due. Stops when `cancel`
    /// fires or the sink's receiver is dropped; returns the pacer's counters.
    pub fn start(
        channel: String,
        path: PathBuf,
        sink: impl ChunkSink,
        cancel: CancellationToken,
    ) -> JoinHandle<Result<PacerStats, PlayoutError>> {
        tokio::spawn(async move {
            let r = play(&channel, &path, sink, &cancel).await;
            match &r {
                Ok(s) => info!(channel, file = %path.display(), datagrams = s.datagrams,
                               loops = s.loops, rebases = s.rebases, "playout stopped"),
                Err(e) => tracing::warn!(channel, error = %e, "playout failed"),
            }
            r
        })
    }
}

const READ_CHUNK: usize = TS_PACKET_LEN * 348; // ≈ 64 KiB

async fn play(
    channel: &str,
    path: &Path,
    mut sink: impl ChunkSink,
    cancel: &CancellationToken,
) -> Result<PacerStats, PlayoutError> {
    let io = |source| PlayoutError::Io {
        file: path.to_path_buf(),
        source,
    };
    let ts = |source| PlayoutError::Ts {
        file: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    info!(channel, file = %path.display(), "playout starts");
    let mut pacer = Pacer::new(Instant::now(), PacerConfig::default());
    let mut splitter = TsSplitter::strict();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut packets_this_pass = 0u64;
    let mut last_wake: Option<Instant> = None;
    loop {
        while pacer.needs_input() {
            let n = tokio::select! {
                _ = cancel.cancelled() => return Ok(pacer.stats()),
                n = file.read(&mut buf) => n.map_err(io)?,
            };
            if n == 0 {
                splitter.finish();
            } else {
                splitter.push(&buf[..n]);
            }
            for p in splitter.drain() {
                pacer.push(&p).map_err(ts)?;
                packets_this_pass += 1;
            }
            if n == 0 {
                if packets_this_pass == 0 {
                    return Err(PlayoutError::Empty(path.to_path_buf()));
                }
                debug!(channel, loops = pacer.stats().loops + 1, "playout loops");
                pacer.end_of_loop();
                file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
                splitter = TsSplitter::strict();
                packets_this_pass = 0;
            }
        }
        let Some(due) = pacer.poll_timeout() else {
            continue;
        };
        // At most one wake-up per quantum: what falls due meanwhile goes out together (one
        // send call here, one wake-up and one batched fan-out at every relay downstream).
        let wake = last_wake.map_or(due, |w| due.max(w + PACE_QUANTUM));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(pacer.stats()),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
        }
        let now = Instant::now();
        last_wake = Some(now);
        while let Some(d) = pacer.poll(now) {
            let chunk = Chunk {
                payload: d.payload,
                keyframe: d.keyframe,
            };
            if !sink.send(chunk).await {
                return Ok(pacer.stats());
            }
        }
    }
}

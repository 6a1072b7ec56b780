//! # server — turns a folder of videos (and live inputs) into paced MPEG-TS channels
//!
//! * [`ffmpeg`]: finds `ffmpeg`/`ffprobe`, picks an H.264 encoder that really opens.
//! * [`transcode`]: validates files with ffprobe and transcodes each once into a stream-ready
//!   MPEG-TS kept in a cache.
//! * [`pacer`]: I/O-free PCR pacing, loop timestamp rewriting and keyframe-aligned datagrams.
//! * [`playout`]: the tokio task playing a cached file forever, paced.
//! * [`live`]: ffmpeg encoding a live input (lavfi, URL, device) straight to datagrams.
//! * [`catalog`]: watches the videos folder and reports added/removed/replaced files.
//! * [`manager`]: [`ChannelManager`] ties them together for `main.rs`.

pub mod catalog;
pub mod ffmpeg;
pub mod live;
pub mod manager;
pub mod pacer;
pub mod playout;
pub mod transcode;

use bytes::Bytes;

/// One 1316-byte datagram of a channel's TS, as produced by playout and live sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// 7 TS packets.
    pub payload: Bytes,
    /// The datagram starts a keyframe (with the PAT/PMT before it): the relay's GOP cache can
    /// start here and `video_flags::KEYFRAME` should be set.
    pub keyframe: bool,
}
pub use manager::{ChannelChunk, ChannelManager, ManagerConfig};

/// Runs an origin server until `shutdown`: the channel manager's channels are announced by the
/// relay (floods), the relay's demand starts and stops their playout, and their datagrams go to
/// the relay, which numbers them and fans them out to the subscribers.
pub async fn serve(
    joined: common::host::Joined,
    manager: ChannelManager,
    mut chunks: tokio::sync::mpsc::Receiver<ChannelChunk>,
    relay_cfg: node::RelayConfig,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (relay, relay_task) = node::Relay::spawn(joined, relay_cfg, shutdown.clone());
    let mut demand = relay.local_demand();
    let mut changes = manager.changes();
    relay
        .set_local_channels(changes.borrow_and_update().clone())
        .await;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            chunk = chunks.recv() => match chunk {
                Some(c) => relay.send_local_video(c.channel, c.payload, c.keyframe).await,
                None => break,
            },
            d = demand.recv() => match d {
                Some((channel, watched)) => manager.set_watched(channel, watched),
                None => break,
            },
            r = changes.changed() => {
                if r.is_err() {
                    break;
                }
                let list = changes.borrow_and_update().clone();
                let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
                tracing::info!(count = list.len(), channels = ?names, "channels announced");
                relay.set_local_channels(list).await;
            }
        }
    }
    shutdown.cancel();
    let _ = relay_task.await;
}

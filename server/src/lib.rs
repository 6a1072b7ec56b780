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

//! `server` — serves the videos of a folder (and live sources) as channels of the overlay:
//! the channel manager (catalog, transcode cache, paced playout, live ffmpeg) feeds the relay
//! engine, which announces the channels in floods and sends them to whoever subscribes.

use anyhow::Context;
use clap::Parser;
use common::host::{join_overlay, OverlayArgs};
use server::{ChannelManager, ManagerConfig};
use std::path::PathBuf;

/// A Pessi Streamer server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    overlay: OverlayArgs,
    /// Folder whose video files (recursively) are served as channels, named by their path
    /// without extension (`sports/match.mp4` → `sports/match`).
    #[arg(long, required_unless_present = "source")]
    videos: Option<PathBuf>,
    /// A live channel, `NAME=INPUT`: `lavfi:GRAPH[|AUDIO_GRAPH]` (e.g.
    /// `test=lavfi:testsrc2=size=640x360:rate=25|sine=frequency=440`), or any ffmpeg input
    /// (URL, device, file). Repeatable.
    #[arg(long = "source", value_name = "NAME=INPUT", value_parser = parse_source)]
    source: Vec<(String, String)>,
    /// Keyframe interval in seconds (also how quickly a new viewer gets a picture).
    #[arg(long, default_value_t = 1.0)]
    keyint: f64,
    /// Transcode cache folder [default: VIDEOS/.pessi-cache].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// TESTING AID: play every channel even if nobody watches it (and log the output rate).
    #[arg(long, hide = true)]
    watch_all: bool,
}

fn parse_source(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, i)) if !n.is_empty() && !i.is_empty() => Ok((n.to_string(), i.to_string())),
        _ => Err(format!("expected NAME=INPUT, got {s:?}")),
    }
}

// One thread (the relay engine, playout pacing and ffmpeg pipes are light async tasks): nothing to hand between worker threads, no futex wake-ups at
// rest (issue 10).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    // FFmpeg is installed when missing (as root; else asked on a terminal, or the command is
    // printed), as on a fresh lab machine started by hand.
    common::setup::ensure(&[common::setup::FFMPEG])?;
    let shutdown = common::runtime::shutdown_on_signals();
    let cfg = ManagerConfig {
        videos: args.videos.clone(),
        cache_dir: args.cache_dir.clone(),
        sources: args.source.clone(),
        keyint_secs: args.keyint,
    };
    let (manager, chunks) = ChannelManager::start(cfg, shutdown.clone())
        .await
        .context("cannot start the channels")?;
    if args.watch_all {
        let m = manager.clone();
        let mut changes = manager.changes();
        tokio::spawn(async move {
            loop {
                for c in changes.borrow_and_update().iter() {
                    m.set_watched(c.id, true);
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let joined = join_overlay(&args.overlay, &shutdown).await?;
    server::serve(
        joined,
        manager,
        chunks,
        node::RelayConfig::from_args(&args.overlay),
        shutdown,
    )
    .await;
    Ok(())
}

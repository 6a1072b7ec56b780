//! `server` — serves the videos of a folder (and live sources) as channels. For now it runs
//! the channel manager (catalog, transcode cache, paced playout) beside its overlay membership;
//! sending the channels' datagrams to the overlay arrives with the relay glue.

use anyhow::Context;
use clap::Parser;
use common::host::{join_overlay, probe_neighbours, OverlayArgs};
use server::{ChannelManager, ManagerConfig};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    let shutdown = common::runtime::shutdown_on_signals();
    let cfg = ManagerConfig {
        videos: args.videos.clone(),
        cache_dir: args.cache_dir.clone(),
        sources: args.source.clone(),
        keyint_secs: args.keyint,
    };
    let (manager, mut chunks) = ChannelManager::start(cfg, shutdown.clone())
        .await
        .context("cannot start the channels")?;
    let mut changes = manager.changes();
    let watch_all = args.watch_all;
    let m = manager.clone();
    tokio::spawn(async move {
        loop {
            let list = changes.borrow_and_update().clone();
            let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
            tracing::info!(count = list.len(), channels = ?names, "channels");
            if watch_all {
                for c in &list {
                    m.set_watched(c.id, true);
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let (mut n, mut kf, mut since) = (0u64, 0u64, Instant::now());
        while let Some(c) = chunks.recv().await {
            n += 1;
            kf += u64::from(c.keyframe);
            if since.elapsed() >= Duration::from_secs(10) {
                let kbps = n as f64 * c.payload.len() as f64 * 8.0
                    / 1000.0
                    / since.elapsed().as_secs_f64();
                tracing::info!(datagrams = n, keyframes = kf, kbps = kbps as u64, "output");
                (n, kf, since) = (0, 0, Instant::now());
            }
        }
    });
    let joined = join_overlay(&args.overlay, &shutdown).await?;
    probe_neighbours(joined, Duration::from_secs(1), shutdown).await;
    Ok(())
}

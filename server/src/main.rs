//! `server` — serves the videos of a folder as live channels. For now it checks its folder,
//! joins the overlay and keeps its links measured; encoding and playout arrive with the
//! streaming milestone.

use anyhow::Context;
use clap::Parser;
use common::host::{join_overlay, probe_neighbours, OverlayArgs};
use std::path::PathBuf;
use std::time::Duration;

/// A Pessi Streamer server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    overlay: OverlayArgs,
    /// Folder whose video files are served as channels.
    #[arg(long)]
    videos: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    let entries = std::fs::read_dir(&args.videos)
        .with_context(|| format!("cannot read the videos folder {}", args.videos.display()))?
        .count();
    tracing::info!(folder = %args.videos.display(), entries, "videos folder");
    let shutdown = common::runtime::shutdown_on_signals();
    let joined = join_overlay(&args.overlay, &shutdown).await?;
    probe_neighbours(joined, Duration::from_secs(1), shutdown).await;
    Ok(())
}

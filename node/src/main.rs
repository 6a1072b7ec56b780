//! `node` — an overlay relay. For now it joins the overlay (neighbours from the bootstrapper)
//! and keeps its links measured; relaying streams arrives with the streaming milestone.

use clap::Parser;
use common::host::{join_overlay, probe_neighbours, OverlayArgs};
use std::time::Duration;

/// A Pessi Streamer relay node.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    overlay: OverlayArgs,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    let shutdown = common::runtime::shutdown_on_signals();
    let joined = join_overlay(&args.overlay, &shutdown).await?;
    probe_neighbours(joined, Duration::from_secs(1), shutdown).await;
    Ok(())
}

//! `node` — an overlay relay: joins the overlay (neighbours from the bootstrapper) and runs the
//! relay engine (`node::relay`) with no local channel until SIGTERM / ctrl-c.

use clap::Parser;
use common::host::{join_overlay, OverlayArgs};
use node::{Relay, RelayConfig};

/// A Pessi Streamer relay node.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    overlay: OverlayArgs,
}

// One thread (the relay engine owns its socket and core in one task): nothing to hand between worker threads, no futex wake-ups at
// rest (issue 10).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    let shutdown = common::runtime::shutdown_on_signals();
    let joined = join_overlay(&args.overlay, &shutdown).await?;
    let (_relay, task) = Relay::spawn(joined, RelayConfig::from_args(&args.overlay), shutdown);
    task.await?;
    Ok(())
}

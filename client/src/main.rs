//! `client` — watch channels through the best point of presence (see the `client` library).
//!
//! The tokio runtime runs on its own worker threads; the main thread runs the egui window (which
//! must own the main thread) or, headless, just waits for the engine.

use anyhow::Context;
use clap::Parser;
use client::cli::Args;
use client::engine::{self, Summary};
use tracing::{info, warn};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    let mut cfg = args.engine_config()?;
    let headless = args.headless_reason();
    if headless.is_none() {
        // The window shows problems and lets the user act; only headless runs give up.
        cfg.give_up = None;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let shutdown = rt.block_on(async { common::runtime::shutdown_on_signals() });
    let (handles, chans) = engine::channels();
    let engine_task = rt.spawn(engine::run(cfg, chans, shutdown.clone()));

    match headless {
        Some(reason) => info!(reason, "headless: no window"),
        None => {
            let commands = handles.commands.clone();
            match client::gui::run(handles, shutdown.clone(), rt.handle().clone()) {
                Ok(()) => info!("window closed"),
                Err(e) => {
                    warn!(error = %e, "cannot open the window; going on headless (ctrl-c stops)");
                    // The engine runs on without commands until ctrl-c / --duration.
                    drop(commands);
                    let summary = rt.block_on(engine_task)??;
                    return finish(&summary);
                }
            }
            shutdown.cancel();
            drop(commands);
        }
    }
    let summary = rt.block_on(engine_task)??;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    finish(&summary)
}

/// Logs the summary; an engine that gave up is an error (non-zero exit).
fn finish(summary: &Summary) -> anyhow::Result<()> {
    log_summary(summary);
    match &summary.failure {
        Some(f) => anyhow::bail!("{f}"),
        None => Ok(()),
    }
}

fn log_summary(s: &Summary) {
    if s.streams.is_empty() {
        info!("summary: no stream played");
    }
    for v in &s.streams {
        info!(
            stream = %v.name,
            pop = ?v.pop.map(|p| p.to_string()),
            packets = v.packets,
            bytes = v.bytes,
            lost = v.lost,
            cc_lost = v.cc_lost,
            duplicates = v.duplicates,
            source_changes = v.source_changes,
            skipped = v.playout.skipped,
            late = v.playout.late,
            recovered = v.playout.recovered,
            nacks = v.playout.nacks,
            retransmitted = v.playout.retransmitted,
            "summary"
        );
    }
}

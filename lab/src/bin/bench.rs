//! `bench` — the benchmark: `cargo run --release -p lab --bin bench -- [--quick] [--out report/]`.
//! See lab/src/bench.rs and the README's *Benchmarks* section.

use clap::Parser;
use lab::bench::{self, Config};
use lab::process::Binaries;
use std::path::PathBuf;

/// Measures time to first frame, delivery under loss and failover gap with the real binaries
/// on loopback; writes `<out>/runs/*.json`, `<out>/RESULTS.md` and PNG plots.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The short variant: 3 repetitions, 15 s loss runs with 1 seed, 5 failover trials.
    #[arg(long)]
    quick: bool,
    /// Output folder (RESULTS.md, plots, runs/).
    #[arg(long, default_value = "report")]
    out: PathBuf,
    /// Experiments to run (comma-separated): ttff, loss, loss-off (the loss runs again with
    /// `--no-recovery` everywhere), failover, failover-r2 (the failover trials again with
    /// `--redundancy 2` on every daemon), catastrophic (two relays killed in a row, the second
    /// death healed by the catastrophic fallback).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ttff,loss,loss-off,failover,failover-r2,catastrophic"
    )]
    only: Vec<String>,
    /// TTFF repetitions per keyframe interval (default 10, 3 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Failover trials (default 20, 5 with --quick).
    #[arg(long)]
    trials: Option<usize>,
    /// Seconds per loss run (default 60, 15 with --quick).
    #[arg(long)]
    loss_secs: Option<u64>,
    /// Name of this variant in the tables, e.g. `no-recovery`.
    #[arg(long, default_value = "default")]
    label: String,
    /// Extra argument for every client (repeatable), e.g. `--client-arg=--no-recovery`.
    #[arg(long = "client-arg", allow_hyphen_values = true)]
    client_args: Vec<String>,
    /// Extra argument for every server and node (repeatable).
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
    /// Start nothing: rewrite RESULTS.md and the plots from `<out>/runs/*.json` of an earlier
    /// run (give the same `--quick`/`--label` as that run).
    #[arg(long)]
    replot: bool,
    /// Folder for the processes' logs (one subfolder per trial).
    #[arg(long, default_value = "target/bench")]
    log_dir: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    // Children inherit it: error reports without backtraces in the logs.
    std::env::set_var("RUST_BACKTRACE", "0");
    let mut cfg = Config::new(args.quick, args.out);
    cfg.experiments = args.only;
    cfg.label = args.label;
    cfg.client_args = args.client_args;
    cfg.daemon_args = args.daemon_args;
    cfg.log_dir = args.log_dir;
    if let Some(r) = args.reps {
        cfg.reps = r;
    }
    if let Some(t) = args.trials {
        cfg.trials = t;
    }
    if let Some(s) = args.loss_secs {
        cfg.loss_secs = s;
    }
    if args.replot {
        bench::replot(&cfg)?;
        return Ok(());
    }
    lab::build_siblings()?;
    let bins = Binaries::locate()?;
    let shutdown = common::runtime::shutdown_on_signals();
    tokio::select! {
        r = bench::run(&cfg, &bins) => { r?; }
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    }
    println!(
        "{}",
        std::fs::read_to_string(cfg.out.join("RESULTS.md")).unwrap_or_default()
    );
    Ok(())
}

//! `cost` — whole-process costs of the real daemons: `cargo run --release -p lab --bin cost --
//! [--quick] [--out DIR] [--only idle,watched,memory,hop,scale] [--label NAME]`. See lab/src/cost.rs.

use clap::Parser;
use lab::cost::{self, Config};
use lab::process::Binaries;
use std::path::PathBuf;
use std::time::Duration;

/// Measures CPU (% of a core) and memory (RSS) of the bootstrapper, servers, relays and
/// clients from /proc, idle and carrying streams; writes `<out>/runs/cost-*.json` and
/// `<out>/COST.md`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The short variant: 10 s measurement windows instead of 30 s.
    #[arg(long)]
    quick: bool,
    /// Output folder (COST.md, runs/) [default: target/cost of the repository].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder for the processes' logs and the generated media (kept across runs, so the
    /// server transcodes its clip once) [default: target/cost-logs of the repository].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Experiments to run (comma-separated): idle (the 4×5 grid, nobody watching), watched
    /// (one channel through three relays to a client), memory (ten channels through two
    /// relays to ten clients), hop (the added latency of one relay with 1, 10 and 100
    /// children; needs root), scale (the 100-relay random overlay with 20 viewers: CPU, RSS,
    /// control traffic per link; needs root).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,watched,memory,hop,scale"
    )]
    only: Vec<String>,
    /// Name of this variant in the tables and file names, e.g. `before`, `after`.
    #[arg(long, default_value = "default")]
    label: String,
    /// Extra argument for every server and node (repeatable).
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
    /// Settling time before each window, in seconds.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Window length in seconds [default: 30, 10 with --quick].
    #[arg(long)]
    window: Option<u64>,
    /// Start nothing: rewrite COST.md from `<out>/runs/cost-*.json`.
    #[arg(long)]
    rerender: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    // Children inherit it: error reports without backtraces in the logs.
    std::env::set_var("RUST_BACKTRACE", "0");
    let out = args.out.unwrap_or_else(cost::default_out);
    let log_dir = args.log_dir.unwrap_or_else(cost::default_log_dir);
    let mut cfg = Config::new(args.quick, out, log_dir);
    cfg.experiments = args.only;
    cfg.label = args.label;
    cfg.daemon_args = args.daemon_args;
    cfg.warmup = Duration::from_secs(args.warmup);
    if let Some(w) = args.window {
        cfg.window = Duration::from_secs(w.max(1));
    }
    if !args.rerender {
        lab::build_siblings()?;
        let bins = Binaries::locate()?;
        let shutdown = common::runtime::shutdown_on_signals();
        tokio::select! {
            r = cost::run(&cfg, &bins) => { r?; }
            _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
        }
    } else {
        cost::rewrite_report(&cfg.out)?;
    }
    let path = cfg.out.join("COST.md");
    println!("{}", std::fs::read_to_string(&path).unwrap_or_default());
    eprintln!("written: {}", path.display());
    Ok(())
}

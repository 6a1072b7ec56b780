//! `lab` — runs a whole Pessi Streamer overlay on this machine: `cargo run --release -p lab`.

use clap::Parser;
use lab::overlay::{Lab, LabOptions};
use lab::process::Binaries;
use lab::scenario::Scenario;
use lab::stats::Summary;
use lab::{Media, Plan};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Runs a whole overlay locally: bootstrapper, servers and relay nodes on their 127.0.0.x
/// addresses from a topology file (or each in its own network namespace with --netns), then a
/// client (a window if a display is available, headless with a running summary otherwise).
/// Ctrl-C stops everything, child processes included.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Topology file [default: topologies/neighbours.toml of the repository the lab was built
    /// from, else next to the executable].
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Hosts that run a server (default: the first host of the topology).
    #[arg(long, value_delimiter = ',')]
    servers: Vec<IpAddr>,
    /// The client's points of presence (default: the hosts farthest from the servers).
    #[arg(long, value_delimiter = ',')]
    pops: Vec<IpAddr>,
    /// Videos folder served by every server. Without it (and without --source) the servers play
    /// a built-in test channel named `demo`.
    #[arg(long)]
    videos: Option<PathBuf>,
    /// Live source `NAME=INPUT` for the servers (repeatable), e.g. `cam=/dev/video0`.
    #[arg(long = "source")]
    sources: Vec<String>,
    /// Streams the client plays at start (default: `demo` when the built-in channel is used).
    #[arg(long = "stream")]
    streams: Vec<String>,
    /// No window: the client runs headless and the lab prints a summary every 5 s.
    #[arg(long)]
    headless: bool,
    /// Player of the client: mpv, ffplay, none, or auto (mpv if installed, else ffplay; none
    /// when headless).
    #[arg(long, default_value = "auto")]
    video_player: String,
    /// Scenario file (timed kills, restarts, impairments); see lab/src/scenario.rs.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Stop after this long (e.g. `30s`); default: run until ctrl-c.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Folder for the processes' logs, the client's stats and the bootstrapper's copy of the
    /// topology [default: target/lab of the repository the lab was built from, else lab-logs
    /// next to the executable].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Bootstrapper IP (default: a 127.0.0.x address not in the topology).
    #[arg(long, conflicts_with = "netns")]
    bootstrapper_ip: Option<IpAddr>,
    /// Real separate hosts: every host (bootstrapper, servers, nodes, client) in its own network
    /// namespace on a private bridge, at lab addresses (10.77.N.x) mapped from the topology's.
    /// Needs root and `ip netns` (iproute2).
    #[arg(long)]
    netns: bool,
    /// Port of the bootstrapper (TCP) and of the overlay hosts (UDP).
    #[arg(long, default_value_t = common::wire::DEFAULT_PORT)]
    port: u16,
    /// Do not start a client.
    #[arg(long)]
    no_client: bool,
    /// Extra argument for the client (repeatable), e.g. `--client-arg=--latency=300ms`, or
    /// `--client-arg=--player-arg=--vo=x11` for an option of the player.
    #[arg(long = "client-arg", allow_hyphen_values = true)]
    client_args: Vec<String>,
    /// Do not run `cargo build` for the other binaries first.
    #[arg(long)]
    no_build: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    if args.netns {
        lab::netns::check_support()?;
    }
    let shutdown = common::runtime::shutdown_on_signals();
    // What the demo needs, installed when missing: FFmpeg, and mpv when a player will open a
    // window (a display, a client, and the player `auto` or `mpv`).
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    let display = set("DISPLAY") || set("WAYLAND_DISPLAY");
    let no_window = args.headless || args.no_client;
    let mut needs = vec![common::setup::FFMPEG];
    if display && !no_window && matches!(args.video_player.as_str(), "auto" | "mpv") {
        needs.push(common::setup::MPV);
    }
    common::setup::ensure(&needs)?;
    if !args.no_build {
        lab::build_siblings()?;
    }
    let bins = Binaries::locate()?;
    let scenario = match &args.scenario {
        Some(p) => Scenario::load(p)?,
        None => Scenario::default(),
    };
    let topology = args.topology.clone().unwrap_or_else(lab::default_topology);
    let log_dir = args.log_dir.clone().unwrap_or_else(lab::default_log_dir);
    let plan = Plan::new(
        topology,
        args.servers.clone(),
        args.pops.clone(),
        args.bootstrapper_ip,
        args.port,
    )?;
    let media = Media {
        videos: args.videos.clone(),
        sources: args.sources.clone(),
    };
    let opts = LabOptions {
        netns: args.netns,
        media: media.clone(),
        impair: scenario.impair.clone(),
    };
    let mut lab = Lab::new(plan, bins, log_dir.clone(), opts)?;
    let plan = lab.plan();
    info!(
        servers = ?plan.servers,
        nodes = plan.nodes.len(),
        pops = ?plan.pops,
        bootstrapper = %plan.bootstrapper,
        "starting the overlay"
    );
    let result = run(&args, &log_dir, &media, &scenario, &mut lab, &shutdown).await;
    lab.shutdown(Duration::from_secs(3)).await;
    let stats = log_dir.join("client-stats.jsonl");
    if stats.exists() {
        println!("\n== summary ==\n{}", Summary::load(&stats));
    }
    println!("logs: {}", log_dir.display());
    result
}

async fn run(
    args: &Args,
    log_dir: &Path,
    media: &Media,
    scenario: &Scenario,
    lab: &mut Lab,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    lab.start().await?;
    // Let the first flood rounds build the tree before the client asks for channels.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let stats_path = log_dir.join("client-stats.jsonl");
    let _ = std::fs::remove_file(&stats_path);
    let display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let headless = args.headless || !display;
    if !args.no_client {
        let plan = lab.plan();
        let mut c: Vec<OsString> = vec![
            "--servers".into(),
            lab.addr_list(&plan.pops).into(),
            "--port".into(),
            plan.bootstrapper.port().to_string().into(),
            "--stats".into(),
            stats_path.clone().into(),
            "--video-player".into(),
            player(&args.video_player, headless).into(),
            // Headless, the client gives up (and the lab stops) when nothing can be watched for
            // this long: generous for a first start on a slow machine and for scenarios that
            // take PoPs down for a while (`--client-arg=--give-up=…` overrides it).
            "--give-up".into(),
            "60s".into(),
        ];
        let streams: Vec<String> =
            if args.streams.is_empty() && media.videos.is_none() && media.sources.is_empty() {
                vec![lab::DEMO_CHANNEL.to_owned()]
            } else {
                args.streams.clone()
            };
        for s in streams {
            c.push("--stream".into());
            c.push(s.into());
        }
        if headless {
            if !args.headless {
                info!("no display (DISPLAY/WAYLAND_DISPLAY unset): the client runs headless");
            }
            c.push("--headless".into());
        }
        c.extend(args.client_args.iter().map(OsString::from));
        lab.spawn_client("client", c)?;
    }

    let t0 = Instant::now();
    let duration = args.duration.or(scenario.duration);
    let mut steps = scenario.steps.iter().peekable();
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    loop {
        let next_step = steps.peek().map(|s| t0 + s.at);
        let deadline = [next_step, duration.map(|d| t0 + d)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep_until_opt(deadline) => {
                let now = Instant::now();
                if duration.is_some_and(|d| now >= t0 + d) {
                    info!("duration reached");
                    break;
                }
                while let Some(step) = steps.next_if(|s| now >= t0 + s.at) {
                    lab.step(step).await?;
                }
            }
            _ = report.tick() => {
                let sup = lab.supervisor();
                for (name, status) in sup.exited() {
                    warn!(process = %name, %status, log = %sup.log_path(&name).display(), "process exited");
                    if name == "client" {
                        info!("the client exited; stopping the overlay");
                        return Ok(());
                    }
                }
                if headless && !args.no_client {
                    println!("{}", Summary::load(&stats_path));
                }
            }
        }
    }
    Ok(())
}

/// The player to give the client: `auto` picks mpv, else ffplay, else none (with a hint); with
/// no display (headless) `auto` means none: a player could not open a window.
fn player(choice: &str, headless: bool) -> String {
    if choice != "auto" {
        return choice.to_owned();
    }
    if headless {
        return "none".to_owned();
    }
    for p in ["mpv", "ffplay"] {
        if common::setup::on_path(p) {
            return p.to_owned();
        }
    }
    warn!(
        "neither mpv nor ffplay found: install one (`sudo apt-get install mpv`) to see the video"
    );
    "none".to_owned()
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

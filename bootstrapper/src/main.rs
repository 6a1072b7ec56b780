//! `bootstrapper` — tells every server and node its neighbours (see the library docs).

use anyhow::Context;
use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Hands every server and node of the overlay its id and neighbour list from a TOML topology.
///
/// The topology file maps each host IP to its neighbours' IPs, e.g.
/// `"127.0.0.2" = ["127.0.0.1", "127.0.0.3"]`. It is watched: valid edits apply to later
/// requests, invalid edits are logged and ignored.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// IP address to listen on.
    #[arg(
        long = "bind-ip",
        visible_alias = "bind_ip",
        env = "BOOTSTRAPPER_IP",
        default_value = "127.0.0.1"
    )]
    bind_ip: IpAddr,
    /// TCP port to listen on.
    #[arg(long, default_value_t = common::wire::DEFAULT_PORT)]
    port: u16,
    /// Topology file (default: the repository's `topologies/neighbours.toml`, wherever the
    /// bootstrapper is started from).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP port of the overlay hosts, used in the neighbour addresses handed out.
    #[arg(long, default_value_t = common::wire::DEFAULT_PORT)]
    overlay_port: u16,
    /// Deadline for reading a host's request, and for writing the answer (e.g. `5s`, `500ms`).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    io_timeout: Duration,
    /// Most connections served at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// The network key, the same file as on every host (created on first use; hosts started
    /// on this machine find it at the same default path). Default: network.key in the key
    /// directory ($PESSI_KEY_DIR, else ~/.config/pessi-streamer).
    #[arg(long, env = "PESSI_NETWORK_KEY", value_name = "FILE")]
    network_key: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    // One thread: the bootstrapper answers a handful of requests and long-polls (issue 10:
    // a daemon at rest must cost next to nothing; no worker threads to wake).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async_main(args))
}

async fn async_main(args: Args) -> anyhow::Result<()> {
    let shutdown = common::runtime::shutdown_on_signals();
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| common::runtime::shipped_file("topologies/neighbours.toml"));
    let topology = bootstrapper::load_topology(&config_path)
        .context("cannot start without a valid topology")?;
    tracing::info!(
        path = %config_path.display(),
        hosts = topology.len(),
        links = topology.edge_count(),
        "topology loaded"
    );
    let (topology, _watch) =
        bootstrapper::watch_topology(&config_path, topology, shutdown.clone())?;
    let addr = SocketAddr::new(args.bind_ip, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let net_path = args
        .network_key
        .clone()
        .unwrap_or_else(common::keys::default_network_key);
    let (network, created) = common::keys::load_or_create(&net_path)?;
    if created {
        tracing::warn!(file = %net_path.display(),
            "network key created: copy this file to every host of the overlay (--network-key)");
    } else {
        tracing::info!(file = %net_path.display(), "network key");
    }
    let config = bootstrapper::Config {
        io_timeout: args.io_timeout,
        max_connections: args.max_connections,
        overlay_port: args.overlay_port,
        ..bootstrapper::Config::new(network)
    };
    bootstrapper::run(listener, topology, config, shutdown)
        .await
        .context("bootstrapper failed")
}

//! `client` — watches channels through the best point of presence. For now it measures the RTT
//! to each PoP given with `--servers` and prints it; channel lists, the GUI and playback arrive
//! with the streaming milestone.

use anyhow::Context;
use clap::Parser;
use common::impair::{ImpairConfig, Impairment};
use common::transport::{Direct, Incoming, SendShim, Transport, TransportConfig};
use common::wire::{Message, DEFAULT_PORT};
use common::NodeId;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A Pessi Streamer client.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Points of presence (overlay nodes) to use, comma-separated IPs.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<IpAddr>,
    /// UDP port of the overlay.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Local address to bind (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// TESTING AID: impair outgoing traffic (same grammar as the daemons' `--impair`).
    #[arg(long = "impair", value_name = "SPEC")]
    impair: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::runtime::init_tracing();
    let shutdown = common::runtime::shutdown_on_signals();
    let impair = ImpairConfig::parse_many(&args.impair).context("invalid --impair")?;
    let socket = tokio::net::UdpSocket::bind(args.bind)
        .await
        .with_context(|| format!("cannot bind {}", args.bind))?;
    let shim: Box<dyn SendShim> = if impair.is_passthrough() {
        Box::new(Direct::default())
    } else {
        Box::new(Impairment::new(impair, Instant::now()))
    };
    let (transport, mut incoming, task) = Transport::spawn_with_shim(
        socket,
        NodeId::random(),
        common::rng::Rng::from_entropy().next_u64(),
        TransportConfig::default(),
        shutdown.clone(),
        shim,
    )?;
    let pops: Vec<SocketAddr> = args
        .servers
        .iter()
        .map(|ip| SocketAddr::new(*ip, args.port))
        .collect();
    let mut sent: HashMap<u64, (SocketAddr, Instant)> = HashMap::new();
    let mut rtt: HashMap<SocketAddr, (Duration, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut report = tokio::time::interval(Duration::from_secs(2));
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            item = incoming.recv() => match item {
                None => break,
                Some(Incoming::Message { from, msg: Message::Pong { nonce }, .. }) => {
                    if let Some((to, at)) = sent.remove(&nonce) {
                        if to == from {
                            rtt.insert(from, (at.elapsed(), Instant::now()));
                        }
                    }
                }
                Some(_) => {}
            },
            _ = tick.tick() => {
                sent.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(5));
                for p in &pops {
                    nonce += 1;
                    sent.insert(nonce, (*p, Instant::now()));
                    let _ = transport.send_unreliable(*p, Message::Ping { nonce }).await;
                }
            }
            _ = report.tick() => {
                for p in &pops {
                    match rtt.get(p) {
                        Some((r, at)) if at.elapsed() < Duration::from_secs(2) => {
                            tracing::info!(pop = %p, rtt = ?r, "PoP")
                        }
                        _ => tracing::info!(pop = %p, "PoP not answering"),
                    }
                }
            }
        }
    }
    let _ = task.await;
    Ok(())
}

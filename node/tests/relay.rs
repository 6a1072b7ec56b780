//! The relay end to end over loopback: the real bootstrapper `run()` in-process, real `node`
//! binaries, a fake server in-process (`join_overlay` + `Relay` with a local channel fed with
//! numbered chunks every 10 ms) and a fake client (a `Transport` speaking the wire protocol).
//!
//! The decisions (failover with redundancy 1 and 2, the catastrophic chain, loss recovery) are
//! tested on a fake clock by the `sim` crate's scenarios; what stays here needs the real
//! processes: a chain streaming in order (and a silent client dropped), and topology edits
//! pushed by the real bootstrapper to running hosts.
//!
//! Address blocks: 127.0.51.* (chain), 127.0.59.* (topology edited while the stream runs).

mod support;

use bytes::Bytes;
use common::host::{join_overlay, OverlayArgs};
use common::wire::{ChannelId, ChannelInfo};
use common::NodeId;
use node::{Relay, RelayConfig};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{start_bootstrapper, start_bootstrapper_editable, Daemon, Video};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CHANNEL: &str = "testcard";

/// The in-process server: a relay with one local channel, fed a numbered 1316-byte chunk
/// every 10 ms (chunk `i` carries `i` in its first 8 bytes, and gets sequence number
/// `start + i`, `start` random).
struct Server {
    relay: Relay,
    demand: mpsc::Receiver<(ChannelId, bool)>,
}

async fn start_server(
    ip: &str,
    port: u16,
    prefix: &str,
    bootstrapper_port: u16,
    shutdown: &CancellationToken,
) -> Server {
    start_server_impaired(ip, port, prefix, bootstrapper_port, vec![], shutdown).await
}

/// [`start_server`] with `--impair` rules on its sends.
async fn start_server_impaired(
    ip: &str,
    port: u16,
    prefix: &str,
    bootstrapper_port: u16,
    impair: Vec<String>,
    shutdown: &CancellationToken,
) -> Server {
    start_server_with(ip, port, prefix, bootstrapper_port, impair, false, shutdown).await
}

/// [`start_server_impaired`], with `--no-recovery` if `no_recovery`.
async fn start_server_with(
    ip: &str,
    port: u16,
    prefix: &str,
    bootstrapper_port: u16,
    impair: Vec<String>,
    no_recovery: bool,
    shutdown: &CancellationToken,
) -> Server {
    let args = OverlayArgs {
        ip: ip.parse().unwrap(),
        port,
        bootstrapper: format!("{prefix}.250").parse().unwrap(),
        bootstrapper_port,
        impair,
        no_recovery,
        redundancy: 1,
        key: Some(support::key_files(ip.parse().unwrap()).0),
        network_key: Some(support::key_files(ip.parse().unwrap()).1),
        viewer_key: None,
        bench_plaintext: false,
    };
    let joined = join_overlay(&args, shutdown).await.unwrap();
    let (relay, _task) = Relay::spawn(joined, RelayConfig::from_args(&args), shutdown.clone());
    let demand = relay.local_demand();
    relay
        .set_local_channels(vec![ChannelInfo {
            id: ChannelId::of_name(CHANNEL),
            name: CHANNEL.into(),
        }])
        .await;
    let feeder = relay.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut i = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let mut chunk = vec![0x47u8; 1316];
                    chunk[..8].copy_from_slice(&i.to_le_bytes());
                    feeder.send_local_video(ChannelId::of_name(CHANNEL), Bytes::from(chunk), i.is_multiple_of(50)).await;
                    i += 1;
                }
            }
        }
    });
    Server { relay, demand }
}

/// A fake client of [`CHANNEL`].
async fn start_client(ip: &str, pop: SocketAddr, shutdown: &CancellationToken) -> support::Client {
    support::Client::start(ip, pop, CHANNEL, shutdown).await
}

/// Asserts sequence numbers are increasing, follow the payload counters (from the server's
/// random start), and the stream is nearly complete; returns the longest silence between two
/// datagrams.
fn check_stream(v: &[Video], pop_id: NodeId) -> Duration {
    assert!(!v.is_empty());
    let mut gap = Duration::ZERO;
    for w in v.windows(2) {
        assert!(
            w[1].seq > w[0].seq,
            "out of order: {} then {}",
            w[0].seq,
            w[1].seq
        );
        gap = gap.max(w[1].arrival - w[0].arrival);
    }
    let start = v[0].seq - v[0].counter();
    for d in v {
        assert_eq!(
            d.seq,
            start + d.counter(),
            "the server's sequence numbers are kept end to end"
        );
        assert_eq!(
            d.sender, pop_id,
            "the PoP re-stamps the header with its own id"
        );
    }
    gap
}

fn pop_id(ip: &str) -> NodeId {
    NodeId::for_ip(ip.parse::<IpAddr>().unwrap())
}

#[test]
fn chain_streams_in_order_and_a_silent_client_is_dropped() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    const P: &str = "127.0.51";
    const PORT: u16 = 18051;
    let (bport, bshut) = start_bootstrapper(
        &rt,
        P,
        "\"127.0.51.1\" = [\"127.0.51.2\"]\n\
         \"127.0.51.2\" = [\"127.0.51.1\", \"127.0.51.3\"]\n\
         \"127.0.51.3\" = [\"127.0.51.2\"]\n",
        PORT,
    );
    let shutdown = CancellationToken::new();
    let mut n1 = Daemon::start("127.0.51.2", PORT, P, bport);
    let mut n2 = Daemon::start("127.0.51.3", PORT, P, bport);
    let mut server = rt.block_on(start_server("127.0.51.1", PORT, P, bport, &shutdown));
    let pop: SocketAddr = format!("127.0.51.3:{PORT}").parse().unwrap();
    let mut client = rt.block_on(start_client("127.0.51.200", pop, &shutdown));
    let listed = rt.block_on(client.list_and_subscribe(Duration::from_secs(30)));
    println!("chain: channel listed at the PoP after {listed:?}");
    let stream = rt.block_on(client.receive(200, Duration::from_secs(30)));
    assert_eq!(stream.len(), 200, "stream stalled");
    let gap = check_stream(&stream, pop_id("127.0.51.3"));
    let span = stream.last().unwrap().seq - stream[0].seq + 1;
    println!(
        "chain: 200 datagrams in order, seq {}..={}, {} lost, longest gap {gap:?}",
        stream[0].seq,
        stream.last().unwrap().seq,
        span - 200
    );
    assert!(span <= 220, "too many lost: {span} sent for 200 received");
    n2.expect(
        &["subscriber added", "127.0.51.200"],
        Duration::from_secs(5),
    );
    n2.expect(
        &["subscribe upstream", "127.0.51.2:18051"],
        Duration::from_secs(5),
    );
    n1.expect(
        &["subscribe upstream", "127.0.51.1:18051"],
        Duration::from_secs(5),
    );
    let ch = ChannelId::of_name(CHANNEL);
    rt.block_on(async {
        let d = tokio::time::timeout(Duration::from_secs(5), server.demand.recv()).await;
        assert_eq!(d.unwrap(), Some((ch, true)));
    });
    let stats = rt.block_on(server.relay.stats());
    assert!(
        stats.floods_originated > 0 && stats.video_out > 0,
        "{stats:?}"
    );

    // The client goes silent: its PoP drops it (5 s), unsubscribes upstream, and so on up to
    // the server, whose channel becomes unwatched.
    client.stop_pings();
    let t0 = Instant::now();
    n2.expect(
        &["subscriber expired", "127.0.51.200"],
        Duration::from_secs(20),
    );
    n2.expect(
        &["unsubscribe upstream", "127.0.51.2:18051"],
        Duration::from_secs(5),
    );
    n1.expect(
        &["subscriber removed", "127.0.51.3:18051"],
        Duration::from_secs(10),
    );
    rt.block_on(async {
        let d = tokio::time::timeout(Duration::from_secs(10), server.demand.recv()).await;
        assert_eq!(d.unwrap(), Some((ch, false)));
    });
    println!(
        "chain: silent client dropped and demand released after {:?}",
        t0.elapsed()
    );
    let stats = rt.block_on(server.relay.stats());
    assert!(stats.subscribers.is_empty(), "{stats:?}");
    shutdown.cancel();
    bshut.cancel();
    n1.drain();
}

#[test]
fn topology_edits_reach_running_hosts() {
    let p = "127.0.59";
    let port = 18059;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let topo = |text: &str| Arc::new(common::topology::Topology::parse(text).unwrap().0);
    let chain = format!(
        "\"{p}.1\" = [\"{p}.2\"]\n\"{p}.2\" = [\"{p}.1\", \"{p}.3\"]\n\"{p}.3\" = [\"{p}.2\"]\n"
    );
    let (bport, bshut, edit) = start_bootstrapper_editable(&rt, p, &chain, port);
    let shutdown = CancellationToken::new();
    let _server = rt.block_on(start_server(&format!("{p}.1"), port, p, bport, &shutdown));
    let mut relay = Daemon::start(&format!("{p}.2"), port, p, bport);
    let mut pop = Daemon::start(&format!("{p}.3"), port, p, bport);
    let pop_addr: SocketAddr = format!("{p}.3:{port}").parse().unwrap();
    let mut client = rt.block_on(start_client(&format!("{p}.20"), pop_addr, &shutdown));
    rt.block_on(client.list_and_subscribe(Duration::from_secs(20)));
    let before = rt.block_on(client.receive(100, Duration::from_secs(30)));
    assert_eq!(before.len(), 100, "stream never started");
    pop.expect(
        &["subscribe upstream", &format!("{p}.2:")],
        Duration::from_secs(5),
    );

    // Edit 1: host .4 added, linked to the PoP only (a leaf: no path to the server but
    // through the PoP, so whatever the RTTs, the stream has no reason to move).
    edit.send_replace(topo(&format!(
        "\"{p}.1\" = [\"{p}.2\"]\n\"{p}.2\" = [\"{p}.1\", \"{p}.3\"]\n\
         \"{p}.3\" = [\"{p}.2\", \"{p}.4\"]\n\"{p}.4\" = [\"{p}.3\"]\n"
    )));
    let mut added = Daemon::start(&format!("{p}.4"), port, p, bport);
    pop.expect(
        &["neighbours changed", &format!("added=[{p}.4:{port}]")],
        Duration::from_secs(10),
    );
    added.expect(
        &["channel available", CHANNEL, &format!("via={p}.3:")],
        Duration::from_secs(10),
    );
    let middle = rt.block_on(client.receive(100, Duration::from_secs(30)));
    assert_eq!(middle.len(), 100);
    pop.drain();
    assert!(
        !pop.seen().iter().any(|l| l.contains("resubscribed")),
        "adding a link moved a stream that does not use it: {:?}",
        pop.seen()
    );

    // Edit 2: a link .1 – .4 added and the link .2 – .3 (in use) removed: the PoP moves the
    // channel to .4.
    edit.send_replace(topo(&format!(
        "\"{p}.1\" = [\"{p}.2\", \"{p}.4\"]\n\"{p}.2\" = [\"{p}.1\"]\n\
         \"{p}.3\" = [\"{p}.4\"]\n\"{p}.4\" = [\"{p}.1\", \"{p}.3\"]\n"
    )));
    pop.expect(
        &["neighbours changed", &format!("removed=[{p}.2:{port}]")],
        Duration::from_secs(10),
    );
    // At once if a flood through .4 has already arrived ("resubscribed"), else with the next
    // flood round (after "no route"): either way a subscription at .4.
    pop.expect(
        &["subscribe upstream", &format!("upstream={p}.4:{port}")],
        Duration::from_secs(10),
    );
    relay.expect(
        &["neighbours changed", &format!("removed=[{p}.3:{port}]")],
        Duration::from_secs(10),
    );
    let after = rt.block_on(client.receive(300, Duration::from_secs(30)));
    assert_eq!(
        after.len(),
        300,
        "stream did not continue over the new path"
    );
    let mut all = before;
    all.extend(middle);
    all.extend(after);
    check_stream(&all, pop_id(&format!("{p}.3")));
    shutdown.cancel();
    bshut.cancel();
}

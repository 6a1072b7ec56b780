//! The relay end to end over loopback: the real bootstrapper `run()` in-process, real `node`
//! binaries, a fake server in-process (`join_overlay` + `Relay` with a local channel fed with
//! numbered chunks every 10 ms) and a fake client (a `Transport` speaking the wire protocol).
//!
//! Address blocks: 127.0.51.* (chain), 127.0.52.* (square failover), 127.0.53.* (catastrophic),
//! 127.0.54.* (10 % loss everywhere, no false failover), 127.0.56.* / 127.0.57.* (5 % loss on
//! two hops, with / without NACK recovery), 127.0.58.* (square with `--redundancy 2`),
//! 127.0.59.* (topology edited while the stream runs).

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
/// every 10 ms (chunk `i` carries `i` in its first 8 bytes, and gets sequence number `i`).
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

/// Asserts sequence numbers are increasing, equal to the payload counters, and the stream is
/// nearly complete; returns the longest silence between two datagrams.
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
    for d in v {
        assert_eq!(
            d.seq,
            d.counter(),
            "the server's sequence numbers are kept end to end"
        );
        assert_eq!(
            d.sender, pop_id,
            "the PoP re-stamps the header with its own id"
        );
    }
    gap
}

/// The longest silence in a stream received after a kill (arrival times are taken as the test
/// reads them, so only datagrams read after the kill are used, and the silence from the kill
/// to the first of them counts), and when the stream came back
/// relative to the kill.
fn failover_gap(after: &[Video], killed: Instant) -> (Duration, Duration) {
    let first = after
        .first()
        .map(|a| a.arrival - killed)
        .unwrap_or_default();
    let mut best = (first, first);
    for w in after.windows(2) {
        let g = w[1].arrival - w[0].arrival;
        if g > best.0 {
            best = (g, w[1].arrival - killed);
        }
    }
    best
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

/// The square s=.1, a=.2, b=.3, c=.4 (s–a, s–b, a–c, b–c) on `prefix` (UDP `port`): the
/// bootstrapper, relays a and b, PoP c started with `c_extra`, the server, and a client at
/// c subscribed to the channel.
struct Square {
    bshut: CancellationToken,
    shutdown: CancellationToken,
    /// Relays a and b, until [`upstream_and_other`](Self::upstream_and_other) takes them.
    relays: Option<(Daemon, Daemon)>,
    c: Daemon,
    _server: Server,
    client: support::Client,
    prefix: &'static str,
    port: u16,
}

impl Square {
    fn start(
        rt: &tokio::runtime::Runtime,
        prefix: &'static str,
        port: u16,
        c_extra: &[&str],
    ) -> Square {
        let topology = format!(
            "\"{prefix}.1\" = [\"{prefix}.2\", \"{prefix}.3\"]\n\
             \"{prefix}.2\" = [\"{prefix}.1\", \"{prefix}.4\"]\n\
             \"{prefix}.3\" = [\"{prefix}.1\", \"{prefix}.4\"]\n\
             \"{prefix}.4\" = [\"{prefix}.2\", \"{prefix}.3\"]\n"
        );
        let (bport, bshut) = start_bootstrapper(rt, prefix, &topology, port);
        let shutdown = CancellationToken::new();
        let a = Daemon::start(&format!("{prefix}.2"), port, prefix, bport);
        let b = Daemon::start(&format!("{prefix}.3"), port, prefix, bport);
        let c = Daemon::start_with(&format!("{prefix}.4"), port, prefix, bport, c_extra);
        let server = rt.block_on(start_server(
            &format!("{prefix}.1"),
            port,
            prefix,
            bport,
            &shutdown,
        ));
        let pop: SocketAddr = format!("{prefix}.4:{port}").parse().unwrap();
        let mut client = rt.block_on(start_client(&format!("{prefix}.200"), pop, &shutdown));
        rt.block_on(client.list_and_subscribe(Duration::from_secs(30)));
        Square {
            bshut,
            shutdown,
            relays: Some((a, b)),
            c,
            _server: server,
            client,
            prefix,
            port,
        }
    }

    /// Splits the relays into the one c receives from now (its latest `subscribe upstream`:
    /// an early one may have been replaced by a better route) and the other:
    /// `(victim, survivor, victim_addr, survivor_addr)`.
    fn upstream_and_other(&mut self) -> (Daemon, Daemon, String, String) {
        self.c.drain();
        let line = self
            .c
            .seen()
            .iter()
            .rev()
            .find(|l| l.contains(": subscribe upstream"))
            .cloned()
            .unwrap();
        let (p, port) = (self.prefix, self.port);
        let (a_addr, b_addr) = (format!("{p}.2:{port}"), format!("{p}.3:{port}"));
        let (a, b) = self.relays.take().expect("relays already taken");
        if line.contains(&format!("{p}.2:")) {
            (a, b, a_addr, b_addr)
        } else {
            (b, a, b_addr, a_addr)
        }
    }

    fn stop(self) {
        self.shutdown.cancel();
        self.bshut.cancel();
    }
}

#[test]
fn square_fails_over_to_the_other_path() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sq = Square::start(&rt, "127.0.52", 18052, &[]);
    let before = rt.block_on(sq.client.receive(100, Duration::from_secs(30)));
    assert_eq!(before.len(), 100, "stream never started");
    sq.c.expect(&[": subscribe upstream"], Duration::from_secs(5));
    let (mut victim, survivor, victim_addr, survivor_addr) = sq.upstream_and_other();
    victim.kill();
    let killed = Instant::now();
    let after = rt.block_on(sq.client.receive(300, Duration::from_secs(30)));
    assert_eq!(after.len(), 300, "stream did not resume after the kill");
    sq.c.expect(&["upstream lost", &victim_addr], Duration::from_secs(5));
    sq.c.expect(
        &[
            "resubscribed",
            &format!("from={victim_addr}"),
            &format!("to={survivor_addr}"),
        ],
        Duration::from_secs(5),
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    check_stream(&all, pop_id("127.0.52.4"));
    let (gap, resumed) = failover_gap(&after, killed);
    println!(
        "square: killed {victim_addr}; longest gap {gap:?}, stream back {resumed:?} after the kill; \
         {} datagrams lost across the failover",
        all.last().unwrap().seq - all[0].seq + 1 - all.len() as u64
    );
    // The upstream in use is heartbeated every 25 ms and dead after 6 silent intervals
    // (~150 ms; was 3 s before). The benchmark measures the gap; this only checks sanity.
    drop(survivor);
    sq.stop();
}

#[test]
fn redundancy_two_loses_nothing_when_the_primary_path_dies() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // c receives through both a and b.
    let mut sq = Square::start(&rt, "127.0.58", 18058, &["--redundancy", "2"]);
    // Both paths carry the stream: the primary subscription and a disjoint secondary.
    sq.c.expect(&[": subscribe upstream"], Duration::from_secs(10));
    let sec = sq.c.expect(
        &[": subscribe secondary", "disjoint=true"],
        Duration::from_secs(10),
    );
    let before = rt.block_on(sq.client.receive(200, Duration::from_secs(30)));
    assert_eq!(before.len(), 200, "stream never started");
    let (mut victim, survivor, victim_addr, survivor_addr) = sq.upstream_and_other();
    assert!(
        sec.contains(&format!("upstream={survivor_addr}")),
        "secondary {sec} is not the other relay"
    );
    // Kill the primary: the secondary already feeds c, nothing is lost.
    victim.kill();
    let killed = Instant::now();
    let after = rt.block_on(sq.client.receive(300, Duration::from_secs(30)));
    assert_eq!(after.len(), 300, "stream did not go on after the kill");
    sq.c.expect(
        &[
            "resubscribed",
            &format!("from={victim_addr}"),
            &format!("to={survivor_addr}"),
            "secondary promoted",
        ],
        Duration::from_secs(5),
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    check_stream(&all, pop_id("127.0.58.4"));
    let lost = all.last().unwrap().seq - all[0].seq + 1 - all.len() as u64;
    let (gap, _) = failover_gap(&after, killed);
    println!("redundancy 2: killed {victim_addr}; longest gap {gap:?}; {lost} datagrams lost");
    assert_eq!(
        lost, 0,
        "a datagram was lost although a second path carried it"
    );
    drop(survivor);
    sq.stop();
}

#[test]
fn catastrophic_death_falls_back_to_the_dead_nodes_parent() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    const P: &str = "127.0.53";
    const PORT: u16 = 18053;
    // S=.1 – A=.2 – B=.3 – C=.4 – D=.5 (no A–C link: the shape of topologies/catastrophic.toml).
    let (bport, bshut) = start_bootstrapper(
        &rt,
        P,
        "\"127.0.53.1\" = [\"127.0.53.2\"]\n\
         \"127.0.53.2\" = [\"127.0.53.1\", \"127.0.53.3\"]\n\
         \"127.0.53.3\" = [\"127.0.53.2\", \"127.0.53.4\"]\n\
         \"127.0.53.4\" = [\"127.0.53.3\", \"127.0.53.5\"]\n\
         \"127.0.53.5\" = [\"127.0.53.4\"]\n",
        PORT,
    );
    let shutdown = CancellationToken::new();
    let mut a = Daemon::start("127.0.53.2", PORT, P, bport);
    let mut b = Daemon::start("127.0.53.3", PORT, P, bport);
    let mut c = Daemon::start("127.0.53.4", PORT, P, bport);
    let _d = Daemon::start("127.0.53.5", PORT, P, bport);
    let _server = rt.block_on(start_server("127.0.53.1", PORT, P, bport, &shutdown));
    let pop: SocketAddr = format!("127.0.53.5:{PORT}").parse().unwrap();
    let mut client = rt.block_on(start_client("127.0.53.200", pop, &shutdown));
    rt.block_on(client.list_and_subscribe(Duration::from_secs(30)));
    let before = rt.block_on(client.receive(100, Duration::from_secs(30)));
    assert_eq!(before.len(), 100, "stream never started");
    c.expect(
        &["subscribe upstream", "127.0.53.3:18053"],
        Duration::from_secs(5),
    );
    b.kill();
    let killed = Instant::now();
    let after = rt.block_on(client.receive(300, Duration::from_secs(30)));
    assert_eq!(after.len(), 300, "stream did not resume after B died");
    c.expect(
        &["upstream lost", "127.0.53.3:18053"],
        Duration::from_secs(5),
    );
    c.expect(
        &[
            "catastrophic fallback",
            "dead=127.0.53.3:18053",
            "parent=127.0.53.2:18053",
        ],
        Duration::from_secs(5),
    );
    a.expect(
        &["subscriber added", "127.0.53.4:18053"],
        Duration::from_secs(5),
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    check_stream(&all, pop_id("127.0.53.5"));
    let (gap, resumed) = failover_gap(&after, killed);
    println!(
        "catastrophic: killed B; C fell back to A; longest gap {gap:?}, stream back {resumed:?} \
         after the kill"
    );
    // The fallback holds: the stream keeps flowing through A for a while longer.
    let later = rt.block_on(client.receive(200, Duration::from_secs(10)));
    assert_eq!(later.len(), 200);
    b.drain();
    shutdown.cancel();
    bshut.cancel();
}

/// 10 % loss on every link of the square: the stream keeps flowing through three lossy hops,
/// each datagram once, with the origin's sequence numbers (false failure detections are
/// reported; that
/// there are none is asserted on a fake clock by `relay_core`'s tests).
#[test]
fn ten_percent_loss_everywhere_keeps_the_stream_flowing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    const P: &str = "127.0.54";
    const PORT: u16 = 18054;
    // The square again (s=.1, a=.2, b=.3, c=.4), every host losing 10 % of what it sends.
    let (bport, bshut) = start_bootstrapper(
        &rt,
        P,
        "\"127.0.54.1\" = [\"127.0.54.2\", \"127.0.54.3\"]\n\
         \"127.0.54.2\" = [\"127.0.54.1\", \"127.0.54.4\"]\n\
         \"127.0.54.3\" = [\"127.0.54.1\", \"127.0.54.4\"]\n\
         \"127.0.54.4\" = [\"127.0.54.2\", \"127.0.54.3\"]\n",
        PORT,
    );
    let shutdown = CancellationToken::new();
    let mut nodes: Vec<Daemon> = (2..=4)
        .map(|i| {
            let spec = format!("loss=10%,seed={i}");
            Daemon::start_with(&format!("{P}.{i}"), PORT, P, bport, &["--impair", &spec])
        })
        .collect();
    let _server = rt.block_on(start_server_impaired(
        "127.0.54.1",
        PORT,
        P,
        bport,
        vec!["loss=10%,seed=1".into()],
        &shutdown,
    ));
    let pop: SocketAddr = format!("127.0.54.4:{PORT}").parse().unwrap();
    let mut client = rt.block_on(start_client("127.0.54.200", pop, &shutdown));
    rt.block_on(client.list_and_subscribe(Duration::from_secs(30)));
    let before = rt.block_on(client.receive(100, Duration::from_secs(30)));
    assert_eq!(before.len(), 100, "stream never started");
    // Start-up noise (a neighbour not started yet is declared dead) is over: watch from here.
    std::thread::sleep(Duration::from_secs(1));
    let marks: Vec<usize> = nodes
        .iter_mut()
        .map(|n| {
            n.drain();
            n.seen().len()
        })
        .collect();
    let window = Duration::from_secs(20);
    let stream = rt.block_on(client.receive(usize::MAX, window));
    let mut gap = Duration::ZERO;
    for w in stream.windows(2) {
        gap = gap.max(w[1].arrival - w[0].arrival);
    }
    let sent = stream.last().unwrap().seq - stream[0].seq + 1;
    println!(
        "loss10: {} of {sent} datagrams received in {window:?} over 3 lossy hops, longest gap \
         {gap:?}",
        stream.len()
    );
    assert!(stream.len() as u64 > sent / 2, "stream mostly lost");
    // Recovered datagrams come late (the client's jitter buffer reorders them).
    assert!(
        stream.iter().all(|d| d.seq == d.counter()),
        "sequence numbers kept"
    );
    let mut false_detections = 0;
    for (n, mark) in nodes.iter_mut().zip(marks) {
        n.drain();
        let bad: Vec<&String> = n.seen()[mark..]
            .iter()
            .filter(|l| {
                ["neighbour down", "upstream lost"]
                    .iter()
                    .any(|p| l.contains(p))
            })
            .collect();
        // No false detection is the rule, asserted deterministically (fake clock, seeded loss)
        // by `relay_core`'s `ten_percent_loss_is_no_reason_to_fail_over`; here, with real
        // timers, a CPU-starved machine can starve the heartbeats too, so they are reported.
        if !bad.is_empty() {
            println!("false failure detections at 10 % loss (machine load?): {bad:#?}");
        }
        false_detections += bad.len();
    }
    // Each seq once (a move to another upstream may let a few through: only without one).
    if false_detections == 0 {
        let mut seqs: Vec<u64> = stream.iter().map(|d| d.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), stream.len(), "a datagram came twice");
    }
    shutdown.cancel();
    bshut.cancel();
}

/// A chain server (.1) – n1 (.2) – n2 (.3), the server and n1 losing 5 % of what they send; a
/// client at n2 counts the distinct seqs it got over ~10 s. Returns the ratio.
fn lossy_chain(block: u8, recovery: bool) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = format!("127.0.{block}");
    let port = 18000 + u16::from(block);
    let (bport, bshut) = start_bootstrapper(
        &rt,
        &p,
        &format!(
            "\"{p}.1\" = [\"{p}.2\"]\n\
             \"{p}.2\" = [\"{p}.1\", \"{p}.3\"]\n\
             \"{p}.3\" = [\"{p}.2\"]\n"
        ),
        port,
    );
    let shutdown = CancellationToken::new();
    let mut extra1 = vec!["--impair", "loss=5%,seed=21"];
    let mut extra2: Vec<&str> = vec![];
    if !recovery {
        extra1.push("--no-recovery");
        extra2.push("--no-recovery");
    }
    let _n1 = Daemon::start_with(&format!("{p}.2"), port, &p, bport, &extra1);
    let _n2 = Daemon::start_with(&format!("{p}.3"), port, &p, bport, &extra2);
    let server = rt.block_on(start_server_with(
        &format!("{p}.1"),
        port,
        &p,
        bport,
        vec!["loss=5%,seed=11".into()],
        !recovery,
        &shutdown,
    ));
    let pop: SocketAddr = format!("{p}.3:{port}").parse().unwrap();
    let mut client = rt.block_on(support::Client::start_with_big_buffer(
        &format!("{p}.200"),
        pop,
        CHANNEL,
        &shutdown,
    ));
    rt.block_on(client.list_and_subscribe(Duration::from_secs(30)));
    let first = rt.block_on(client.receive(50, Duration::from_secs(30)));
    assert_eq!(first.len(), 50, "stream never started");
    let stream = rt.block_on(client.receive(usize::MAX, Duration::from_secs(10)));
    assert!(!stream.is_empty());
    // The range: from the first live seq after start-up to 0.5 s before the last one seen
    // (whose gaps may still be under recovery when the window closed).
    let lo = stream[0].seq;
    let hi = stream.iter().map(|v| v.seq).max().unwrap() - 50;
    let mut got: Vec<u64> = stream
        .iter()
        .map(|v| v.seq)
        .filter(|s| (lo..=hi).contains(s))
        .collect();
    got.sort_unstable();
    let received = got.len();
    got.dedup();
    let duplicates = received - got.len();
    let range = hi - lo + 1;
    let ratio = got.len() as f64 / range as f64;
    let stats = rt.block_on(server.relay.stats());
    println!(
        "lossy chain (recovery {recovery}): {} of {range} seqs received = {:.2}% (without \
         recovery expected ≈ {:.2}%), {duplicates} duplicates; server: nacks_in {}, \
         nack_seqs_in {}, retransmitted {}, nacks_ignored {}, video_out {}, retransmit \
         buffer {} datagrams",
        got.len(),
        100.0 * ratio,
        100.0 * 0.95f64.powi(2),
        stats.nacks_in,
        stats.nack_seqs_in,
        stats.retransmitted,
        stats.nacks_ignored,
        stats.video_out,
        stats.retransmit_datagrams,
    );
    if recovery {
        assert!(stats.nacks_in > 0 && stats.retransmitted > 0, "{stats:?}");
    } else {
        assert_eq!(stats.retransmitted, 0);
        assert_eq!(stats.retransmit_datagrams, 0);
    }
    shutdown.cancel();
    bshut.cancel();
    ratio
}

#[test]
fn nack_recovery_fills_losses_of_two_lossy_hops() {
    let ratio = lossy_chain(56, true);
    assert!(ratio >= 0.995, "with recovery: {ratio}");
}

#[test]
fn without_recovery_two_lossy_hops_lose_about_ten_percent() {
    let ratio = lossy_chain(57, false);
    // ≈ 0.95² = 0.9025 (1000 samples: a few points either way).
    assert!((0.85..0.95).contains(&ratio), "without recovery: {ratio}");
}

/// Topology edits reach running hosts: a host added with its link joins and learns the
/// channel through the host it is linked to (which was told about it); that edit does not move
/// the stream, which uses no changed link; removing the link in use (while a link makes the new
/// host another path) moves the stream to the new path, in order, and it keeps flowing.
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

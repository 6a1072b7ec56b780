//! The tokio driver over real loopback UDP sockets.

use bytes::Bytes;
use common::id::NodeId;
use common::reliable::ReliableConfig;
use common::transport::{Incoming, Transport, TransportConfig, TransportError};
use common::wire::{Body, ChannelId, Datagram, Message, VideoPacket, PROTOCOL_VERSION};
use std::collections::HashSet;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

async fn spawn(
    id: u64,
    cfg: TransportConfig,
    shutdown: &CancellationToken,
) -> (
    Transport,
    mpsc::Receiver<Incoming>,
    tokio::task::JoinHandle<()>,
) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    Transport::spawn(socket, NodeId(id), cfg, shutdown.clone()).unwrap()
}

async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no item within 10 s")
        .expect("channel open")
}

#[tokio::test]
async fn transports_exchange_reliable_and_video_and_shrug_off_garbage() {
    let shutdown = CancellationToken::new();
    let (ta, mut ra, ja) = spawn(1, TransportConfig::default(), &shutdown).await;
    let (tb, mut rb, jb) = spawn(2, TransportConfig::default(), &shutdown).await;
    let (a, b) = (ta.local_addr(), tb.local_addr());
    let (ia, ib) = (ta.local_id(), tb.local_id());

    // Garbage and another protocol version from a third socket, before and during the exchange.
    let rogue = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = Datagram::new(NodeId(3), Body::Unreliable(Message::Goodbye))
        .encode()
        .unwrap();
    let mut other_version = valid.to_vec();
    other_version[2] = PROTOCOL_VERSION + 1;
    let mut truncated = valid.to_vec();
    truncated.pop();
    let garbage: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        vec![0xFF; 2000],
        truncated,
        b"PS".to_vec(),
    ];
    for g in &garbage {
        rogue.send_to(g, b).await.unwrap();
    }
    for _ in 0..3 {
        rogue.send_to(&other_version, b).await.unwrap();
    }

    const N: u64 = 300;
    let mut ids = HashSet::new();
    for i in 0..N {
        ids.insert(
            ta.send_reliable(ib, b, Message::Ping { nonce: i })
                .await
                .unwrap(),
        );
        if i.is_multiple_of(3) {
            tb.send_reliable(ia, a, Message::Pong { nonce: i })
                .await
                .unwrap();
        }
    }
    assert_eq!(ids.len() as u64, N);
    // One encoding, sent several times (as to several subscribers).
    let video = Datagram::new(
        NodeId(1),
        Body::Video(VideoPacket {
            channel: ChannelId::of_name("news"),
            seq: 7,
            flags: 0,
            payload: Bytes::from(vec![0x47; 1316]),
        }),
    )
    .encode()
    .unwrap();
    for _ in 0..5 {
        ta.send_bytes(ib, b, video.clone()).await.unwrap();
    }
    ta.send_unreliable(ib, b, Message::ListChannels)
        .await
        .unwrap();
    for g in &garbage {
        rogue.send_to(g, b).await.unwrap();
    }

    // B gets every reliable message once, the video and the unreliable message.
    let (mut pings, mut videos, mut unreliable) = (HashSet::new(), 0, 0);
    while pings.len() < N as usize || videos < 5 || unreliable < 1 {
        match next(&mut rb).await {
            Incoming::Message {
                from,
                sender,
                msg: Message::Ping { nonce },
                reliable: true,
            } => {
                assert_eq!((from, sender), (a, NodeId(1)));
                assert!(pings.insert(nonce), "ping {nonce} twice");
            }
            Incoming::Message {
                msg: Message::ListChannels,
                reliable: false,
                ..
            } => unreliable += 1,
            Incoming::Video {
                from,
                sender,
                frame,
            } => {
                assert_eq!((from, sender, frame.seq()), (a, NodeId(1), 7));
                videos += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut pongs = HashSet::new();
    while pongs.len() < N.div_ceil(3) as usize {
        match next(&mut ra).await {
            Incoming::Message {
                msg: Message::Pong { nonce },
                reliable: true,
                ..
            } => assert!(pongs.insert(nonce)),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Nothing else (no duplicates) shortly after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rb.try_recv().is_err());
    assert!(ra.try_recv().is_err());

    let sb = tb.stats().await.unwrap();
    assert_eq!(sb.reliable.wrong_version, 3);
    assert_eq!(sb.reliable.malformed, 2 * garbage.len() as u64);
    assert_eq!(sb.reliable.delivered, N);
    let sa = ta.stats().await.unwrap();
    assert_eq!(sa.reliable.acked, N);
    assert_eq!(sa.reliable.in_flight, 0);
    let rtt = ta.rtt(ib).await.unwrap().expect("sampled");
    assert!(
        rtt.samples > 0 && rtt.srtt < Duration::from_millis(500),
        "{rtt:?}"
    );
    eprintln!(
        "loopback: A→B {N} reliable, {} retransmitted, SRTT {:?}, min RTT {:?}; B counted {} \
         malformed + {} other-version datagrams",
        sa.reliable.retransmitted,
        rtt.srtt,
        rtt.min_rtt,
        sb.reliable.malformed,
        sb.reliable.wrong_version
    );

    // Shutdown via the token ends both tasks; the handles then report Closed.
    shutdown.cancel();
    timeout(Duration::from_secs(2), ja).await.unwrap().unwrap();
    timeout(Duration::from_secs(2), jb).await.unwrap().unwrap();
    assert_eq!(
        ta.send_reliable(ib, b, Message::Goodbye).await,
        Err(TransportError::Closed)
    );
    assert!(matches!(ta.stats().await, Err(TransportError::Closed)));
}

#[tokio::test]
async fn dead_peer_times_out_and_the_loop_survives_icmp_errors() {
    let shutdown = CancellationToken::new();
    let cfg = TransportConfig {
        reliable: ReliableConfig {
            initial_rto: Duration::from_millis(20),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_millis(40),
            max_retries: 3,
            ..ReliableConfig::default()
        },
        ..TransportConfig::default()
    };
    let (ta, mut ra, ja) = spawn(1, cfg.clone(), &shutdown).await;
    let (tb, mut rb, _jb) = spawn(2, cfg, &shutdown).await;
    // A port nobody listens on (ICMP port unreachable for every send).
    let dead = UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let id = ta
        .send_reliable(NodeId(99), dead, Message::Goodbye)
        .await
        .unwrap();
    match next(&mut ra).await {
        Incoming::TimedOut { peer, id: got } => assert_eq!((peer, got), (NodeId(99), id)),
        other => panic!("unexpected {other:?}"),
    }
    // Still alive and working.
    ta.send_reliable(tb.local_id(), tb.local_addr(), Message::ListChannels)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut rb).await,
        Incoming::Message {
            msg: Message::ListChannels,
            reliable: true,
            ..
        }
    ));
    let s = ta.stats().await.unwrap();
    assert_eq!(s.reliable.timed_out, 1);
    assert_eq!(s.reliable.retransmitted, 3);
    shutdown.cancel();
    timeout(Duration::from_secs(2), ja).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_slow_reader_loses_nothing_and_cannot_deadlock_the_driver() {
    let shutdown = CancellationToken::new();
    let small = TransportConfig {
        incoming_queue: 1,
        max_pending_incoming: 2,
        ..TransportConfig::default()
    };
    let (ta, _ra, _ja) = spawn(1, TransportConfig::default(), &shutdown).await;
    let (tb, mut rb, _jb) = spawn(2, small, &shutdown).await;
    const N: u64 = 100;
    for i in 0..N {
        ta.send_reliable(tb.local_id(), tb.local_addr(), Message::Ping { nonce: i })
            .await
            .unwrap();
    }
    // B does not read yet but its driver still answers commands.
    tokio::time::sleep(Duration::from_millis(200)).await;
    timeout(Duration::from_secs(1), tb.stats())
        .await
        .expect("driver responsive")
        .unwrap();
    let mut got = HashSet::new();
    while got.len() < N as usize {
        if let Incoming::Message {
            msg: Message::Ping { nonce },
            ..
        } = next(&mut rb).await
        {
            assert!(got.insert(nonce));
        }
    }
    shutdown.cancel();
}

#[tokio::test]
async fn dropping_every_handle_and_the_receiver_ends_the_task() {
    let shutdown = CancellationToken::new();
    let (t, r, j) = spawn(1, TransportConfig::default(), &shutdown).await;
    drop(t);
    drop(r);
    timeout(Duration::from_secs(2), j).await.unwrap().unwrap();
}

/// Captured log output (this test's thread only).
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test] // current-thread runtime: the driver runs on this thread, under this subscriber
async fn another_protocol_version_is_warned_once_per_peer() {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let shutdown = CancellationToken::new();
    let (tb, _rb, _jb) = spawn(2, TransportConfig::default(), &shutdown).await;
    let mut other = Datagram::new(NodeId(3), Body::Unreliable(Message::Goodbye))
        .encode()
        .unwrap()
        .to_vec();
    other[2] = PROTOCOL_VERSION + 4;
    let r1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..5 {
        r1.send_to(&other, tb.local_addr()).await.unwrap();
        r2.send_to(&other, tb.local_addr()).await.unwrap();
        r1.send_to(b"junk", tb.local_addr()).await.unwrap();
    }
    // Wait until all 15 datagrams were processed.
    timeout(Duration::from_secs(5), async {
        loop {
            let s = tb.stats().await.unwrap();
            if s.datagrams_in >= 15 {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, r) in lines.iter().zip([&r1, &r2]) {
        let peer = r.local_addr().unwrap().to_string();
        assert!(line.contains("WARN") && line.contains(&peer), "{line}");
        assert!(
            line.contains(&format!("peer_version={}", PROTOCOL_VERSION + 4))
                && line.contains(&format!("our_version={PROTOCOL_VERSION}")),
            "{line}"
        );
    }
    shutdown.cancel();
}

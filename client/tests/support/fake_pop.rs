//! Fake PoPs for tests and demos: a `common::transport::Transport` speaking the wire protocol
//! that answers pings and channel lists, accepts subscriptions and streams a real H.264/AAC
//! clip made by ffmpeg. Shared by `tests/headless.rs` and `examples/fake_pops.rs`.

#![allow(dead_code)]

use bytes::Bytes;
use common::keys::{KeyPair, Secret};
use common::secure::{Secure, SecureConfig};
use common::transport::{Incoming, Transport, TransportConfig};
use common::ts::{DatagramChunker, TsSplitter};
use common::wire::{Body, ChannelId, ChannelInfo, Datagram, Message, VideoPacket};
use common::NodeId;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub const CHANNEL: &str = "clip";

/// A 2-second H.264/AAC clip cut into 1316-byte datagram payloads (made once per test binary).
pub fn clip() -> Arc<Vec<Bytes>> {
    static CLIP: OnceLock<Arc<Vec<Bytes>>> = OnceLock::new();
    CLIP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.ts");
        let status = std::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=160x120:rate=25",
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:sample_rate=48000",
                "-t",
                "2",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-g",
                "25",
                "-c:a",
                "aac",
                "-f",
                "mpegts",
            ])
            .arg(&path)
            .status()
            .expect("ffmpeg is installed (scripts/test.sh installs it)");
        assert!(status.success());
        let ts = std::fs::read(&path).unwrap();
        let mut splitter = TsSplitter::strict();
        splitter.push(&ts);
        splitter.finish();
        let mut chunker = DatagramChunker::new();
        let mut out = Vec::new();
        while let Some(p) = splitter.pop() {
            let pkt = common::ts::TsPacket::parse(&p).unwrap();
            if let Some(d) = chunker.push(&pkt) {
                out.push(d);
            }
        }
        out.extend(chunker.flush());
        assert!(out.len() > 50, "clip too short: {} datagrams", out.len());
        Arc::new(out)
    })
    .clone()
}

/// A fake PoP: answers pings (after `pong_delay`) and channel lists, accepts subscriptions and
/// streams the clip to its subscribers every 5 ms. `alive = false` makes it silent.
/// It answers `Nack`s by resending the datagrams asked for (flagged `RETRANSMIT`).
pub struct FakePop {
    pub addr: SocketAddr,
    pub alive: Arc<AtomicBool>,
    /// Payloads sent to subscribers, in order (including those dropped on first send).
    pub sent: Arc<Mutex<Vec<Bytes>>>,
    /// Seqs resent in answer to NACKs.
    pub resent: Arc<Mutex<Vec<u64>>>,
    stop: CancellationToken,
}

impl FakePop {
    pub async fn start(
        addr: SocketAddr,
        pong_delay: Duration,
        seq0: u64,
        looping: bool,
    ) -> FakePop {
        FakePop::start_lossy(addr, pong_delay, seq0, looping, 1, 0).await
    }

    /// Like [`FakePop::start`], but a non-looping PoP sends the clip `rounds` times, and every
    /// `drop_every`-th datagram (not the very last) is not sent the first time (0: none
    /// dropped); a NACK gets it.
    pub async fn start_lossy(
        addr: SocketAddr,
        pong_delay: Duration,
        seq0: u64,
        looping: bool,
        rounds: usize,
        drop_every: usize,
    ) -> FakePop {
        let keys = KeyPair::generate();
        FakePop::start_keyed(addr, pong_delay, seq0, looping, rounds, drop_every, keys).await
    }

    /// Like [`FakePop::start_lossy`], with the static key pair `keys`.
    pub async fn start_keyed(
        addr: SocketAddr,
        pong_delay: Duration,
        seq0: u64,
        looping: bool,
        rounds: usize,
        drop_every: usize,
        keys: KeyPair,
    ) -> FakePop {
        let socket = UdpSocket::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = CancellationToken::new();
        // A PoP as the real ones are: viewers open a session with it (it has a static key and
        // admits every viewer).
        let secure = Secure::new(SecureConfig::member(
            keys,
            Secret::random(),
            1,
            u64::from(addr.port()),
        ));
        let (transport, mut incoming, _task) = Transport::spawn_secure(
            socket,
            NodeId::for_ip(addr.ip()),
            TransportConfig::default(),
            secure,
            stop.clone(),
        )
        .unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let subscribers = Arc::new(Mutex::new(BTreeSet::<(NodeId, SocketAddr)>::new()));
        let resent = Arc::new(Mutex::new(Vec::new()));
        // seq → the datagram flagged RETRANSMIT.
        let store = Arc::new(Mutex::new(HashMap::<u64, Bytes>::new()));
        let channel = ChannelId::of_name(CHANNEL);
        {
            let (t, alive, subs, stop, store, resent) = (
                transport.clone(),
                alive.clone(),
                subscribers.clone(),
                stop.clone(),
                store.clone(),
                resent.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let item = tokio::select! {
                        _ = stop.cancelled() => return,
                        i = incoming.recv() => match i { Some(i) => i, None => return },
                    };
                    if !alive.load(Ordering::SeqCst) {
                        continue;
                    }
                    let Incoming::Message {
                        from, sender, msg, ..
                    } = item
                    else {
                        continue;
                    };
                    match msg {
                        Message::Ping { nonce } => {
                            let t = t.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(pong_delay).await;
                                let _ = t
                                    .send_unreliable(sender, from, Message::Pong { nonce })
                                    .await;
                            });
                        }
                        Message::ListChannels => {
                            let _ = t
                                .send_unreliable(
                                    sender,
                                    from,
                                    Message::Channels {
                                        page: 0,
                                        pages: 1,
                                        channels: vec![ChannelInfo {
                                            id: channel,
                                            name: CHANNEL.into(),
                                        }],
                                    },
                                )
                                .await;
                        }
                        Message::Subscribe { channel: c } if c == channel => {
                            subs.lock().unwrap().insert((sender, from));
                        }
                        Message::Unsubscribe { channel: c } if c == channel => {
                            subs.lock().unwrap().remove(&(sender, from));
                        }
                        Message::Nack { channel: c, seqs } if c == channel => {
                            for seq in seqs {
                                let d = store.lock().unwrap().get(&seq).cloned();
                                if let Some(d) = d {
                                    resent.lock().unwrap().push(seq);
                                    let _ = t.send_bytes(sender, from, d).await;
                                }
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
        {
            let (alive, sent, stop) = (alive.clone(), sent.clone(), stop.clone());
            let clip = clip();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                let mut i = 0usize;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let subs: Vec<(NodeId, SocketAddr)> =
                        subscribers.lock().unwrap().iter().copied().collect();
                    if !alive.load(Ordering::SeqCst) || subs.is_empty() {
                        continue;
                    }
                    let total = clip.len() * rounds;
                    if i >= total && !looping {
                        continue;
                    }
                    let payload = clip[i % clip.len()].clone();
                    let seq = seq0 + i as u64;
                    let encode = |flags| {
                        Datagram::new(
                            NodeId::for_ip(addr.ip()),
                            Body::Video(VideoPacket {
                                channel,
                                seq,
                                flags,
                                payload: payload.clone(),
                            }),
                        )
                        .encode()
                        .unwrap()
                    };
                    let bytes = encode(0);
                    {
                        let mut st = store.lock().unwrap();
                        st.insert(seq, encode(common::wire::video_flags::RETRANSMIT));
                        st.remove(&seq.wrapping_sub(1000));
                    }
                    let dropped = drop_every > 0
                        && (i + 1).is_multiple_of(drop_every)
                        && (looping || i + 1 < total);
                    if !dropped {
                        for (id, s) in subs {
                            let _ = transport.send_bytes(id, s, bytes.clone()).await;
                        }
                    }
                    sent.lock().unwrap().push(payload);
                    i += 1;
                }
            });
        }
        FakePop {
            addr,
            alive,
            sent,
            resent,
            stop,
        }
    }
}

impl Drop for FakePop {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

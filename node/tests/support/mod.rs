//! The harness shared by the loopback tests (`join.rs`, `relay.rs`, `gop.rs`): the real
//! bootstrapper `run()` in-process, a real `node` process whose log lines can be awaited, and
//! a fake client speaking the wire protocol.
#![allow(dead_code)]

use bytes::Bytes;
use common::secure::{Secure, SecureConfig};
use common::topology::Topology;
use common::transport::{Incoming, Transport, TransportConfig};
use common::wire::{ChannelId, Message};
use common::NodeId;

fn rand_seed() -> u64 {
    common::rng::Rng::from_entropy().next_u64()
}
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The key directory of this test process's hosts (host keys, the network key), shared by
/// the in-process bootstrapper, in-process servers and the `node` processes.
pub fn key_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("pessi-test-keys-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// The network key of [`key_dir`].
pub fn network_key() -> common::keys::Secret {
    common::keys::load_or_create(&key_dir().join("network.key"))
        .unwrap()
        .0
}

/// `--key` / `--network-key` of the host at `ip` in [`key_dir`].
pub fn key_files(ip: std::net::IpAddr) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        common::keys::default_host_key_in(key_dir(), ip),
        key_dir().join("network.key"),
    )
}

/// Starts the bootstrapper on `<prefix>.250` (ephemeral port) for `topology`, telling nodes to
/// use `overlay_port`; returns its port and the token that stops it.
pub fn start_bootstrapper(
    rt: &tokio::runtime::Runtime,
    prefix: &str,
    topology: &str,
    overlay_port: u16,
) -> (u16, CancellationToken) {
    let (port, shutdown, tx) = start_bootstrapper_editable(rt, prefix, topology, overlay_port);
    std::mem::forget(tx);
    (port, shutdown)
}

/// [`start_bootstrapper`], also returning the sender through which a test publishes an edited
/// topology (what the file watcher does when the file changes).
pub fn start_bootstrapper_editable(
    rt: &tokio::runtime::Runtime,
    prefix: &str,
    topology: &str,
    overlay_port: u16,
) -> (
    u16,
    CancellationToken,
    tokio::sync::watch::Sender<Arc<Topology>>,
) {
    let (topology, _) = Topology::parse(topology).unwrap();
    let shutdown = CancellationToken::new();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(format!("{prefix}.250:0")))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(topology));
    rt.spawn(bootstrapper::run(
        listener,
        rx,
        bootstrapper::Config {
            overlay_port,
            ..bootstrapper::Config::new(network_key())
        },
        shutdown.clone(),
    ));
    (port, shutdown, tx)
}

/// A real `node` process (bootstrapper at `<prefix>.250`) whose stderr lines are collected;
/// killed when dropped.
pub struct Daemon {
    child: Child,
    lines: std_mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    pub fn start(ip: &str, port: u16, prefix: &str, bootstrapper_port: u16) -> Daemon {
        Daemon::start_with(ip, port, prefix, bootstrapper_port, &[])
    }

    /// [`start`](Self::start) with extra arguments (e.g. `--impair`).
    pub fn start_with(
        ip: &str,
        port: u16,
        prefix: &str,
        bootstrapper_port: u16,
        extra: &[&str],
    ) -> Daemon {
        Daemon::spawn(ip, port, prefix, bootstrapper_port, extra, "info")
    }

    /// [`start`](Self::start) logging at `warn` only (for tests that read no log lines).
    pub fn start_quiet(ip: &str, port: u16, prefix: &str, bootstrapper_port: u16) -> Daemon {
        Daemon::spawn(ip, port, prefix, bootstrapper_port, &[], "warn")
    }

    fn spawn(
        ip: &str,
        port: u16,
        prefix: &str,
        bootstrapper_port: u16,
        extra: &[&str],
        log: &str,
    ) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_node"))
            .args(["--ip", ip, "--port", &port.to_string()])
            .args(extra)
            .args(["--bootstrapper", &format!("{prefix}.250")])
            .args(["--bootstrapper-port", &bootstrapper_port.to_string()])
            .env("RUST_LOG", log)
            .env("PESSI_KEY_DIR", key_dir())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std_mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing every one of `parts` (lines already seen count too).
    pub fn expect(&mut self, parts: &[&str], within: Duration) -> String {
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l.clone();
        }
        self.expect_next(parts, within)
    }

    /// Waits for a log line containing every one of `parts` among the lines not read yet (so
    /// successive calls check the order of the lines).
    pub fn expect_next(&mut self, parts: &[&str], within: Duration) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line.clone());
                if parts.iter().all(|p| line.contains(p)) {
                    return line;
                }
            }
        }
        panic!(
            "no line with {parts:?} within {within:?}; saw:\n{}",
            self.seen.join("\n")
        );
    }

    /// Collects the lines written so far.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// The lines read so far (by [`expect`](Self::expect) or [`drain`](Self::drain)).
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Kills the process (SIGKILL) without waiting for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Sends SIGTERM and waits for the process to exit; panics after `within`.
    pub fn sigterm_and_wait(mut self, within: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > within {
                let _ = self.child.kill();
                panic!("node did not stop within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // RELAY_TEST_LOGS=1 prints every daemon's log (for diagnosing a failure or timing).
        if std::env::var_os("RELAY_TEST_LOGS").is_some() {
            self.drain();
            for l in &self.seen {
                println!("{l}");
            }
        }
    }
}

/// One video datagram as a [`Client`] received it.
#[derive(Clone, Debug)]
pub struct Video {
    /// When the test read it.
    pub arrival: Instant,
    pub seq: u64,
    pub flags: u8,
    pub payload: Bytes,
    /// The id in the header (the PoP's: it re-stamps it).
    pub sender: NodeId,
}

impl Video {
    /// The little-endian counter in the first 8 bytes of the payload.
    pub fn counter(&self) -> u64 {
        let mut c = [0u8; 8];
        c.copy_from_slice(&self.payload[..8]);
        u64::from_le_bytes(c)
    }
}

/// A fake client of one channel: pings its PoP every 0.5 s (soft state, until
/// [`stop_pings`](Self::stop_pings)), lists until the channel is offered, subscribes, and
/// records every video datagram.
pub struct Client {
    transport: Transport,
    incoming: mpsc::Receiver<Incoming>,
    pop: SocketAddr,
    channel: &'static str,
    stop_pings: CancellationToken,
}

impl Client {
    pub async fn start(
        ip: &str,
        pop: SocketAddr,
        channel: &'static str,
        shutdown: &CancellationToken,
    ) -> Client {
        Client::spawn(ip, pop, channel, false, shutdown).await
    }

    /// [`start`](Self::start) with the daemons' large socket receive buffer.
    pub async fn start_with_big_buffer(
        ip: &str,
        pop: SocketAddr,
        channel: &'static str,
        shutdown: &CancellationToken,
    ) -> Client {
        Client::spawn(ip, pop, channel, true, shutdown).await
    }

    async fn spawn(
        ip: &str,
        pop: SocketAddr,
        channel: &'static str,
        big_buffer: bool,
        shutdown: &CancellationToken,
    ) -> Client {
        let socket = tokio::net::UdpSocket::bind(format!("{ip}:0"))
            .await
            .unwrap();
        if big_buffer {
            common::host::grow_receive_buffer(&socket, common::host::RECEIVE_BUFFER);
        }
        // A viewer: a session with its PoP (whose key it learns), like the real client.
        let mut secure = Secure::new(SecureConfig::viewer(None, rand_seed()));
        secure.add_pop(pop, None);
        let (transport, incoming, _task) = Transport::spawn_secure(
            socket,
            NodeId::random(),
            TransportConfig::default(),
            secure,
            shutdown.clone(),
        )
        .unwrap();
        let stop_pings = shutdown.child_token();
        let (t, stop) = (transport.clone(), stop_pings.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut nonce = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        nonce += 1;
                        let _ = t.send_unreliable(NodeId(0), pop, Message::Ping { nonce }).await;
                    }
                }
            }
        });
        Client {
            transport,
            incoming,
            pop,
            channel,
            stop_pings,
        }
    }

    /// Stops the pings: the PoP should drop this client.
    pub fn stop_pings(&self) {
        self.stop_pings.cancel();
    }

    /// Lists channels until the PoP offers ours, then subscribes; returns how long it took.
    pub async fn list_and_subscribe(&mut self, within: Duration) -> Duration {
        let t0 = Instant::now();
        let name = self.channel;
        let ch = ChannelId::of_name(name);
        let mut got_pong = false;
        loop {
            assert!(
                t0.elapsed() < within,
                "{} never listed {name} (pong seen: {got_pong})",
                self.pop
            );
            self.transport
                .send_unreliable(NodeId(0), self.pop, Message::ListChannels)
                .await
                .unwrap();
            let until = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(Some(item)) = tokio::time::timeout_at(until, self.incoming.recv()).await {
                match item {
                    Incoming::Message {
                        msg: Message::Pong { .. },
                        ..
                    } => got_pong = true,
                    Incoming::Message {
                        msg:
                            Message::Channels {
                                channels,
                                page,
                                pages,
                            },
                        sender,
                        ..
                    } => {
                        assert!(page < pages);
                        if channels.iter().any(|c| c.id == ch && c.name == name) {
                            self.transport
                                .send_reliable(sender, self.pop, Message::Subscribe { channel: ch })
                                .await
                                .unwrap();
                            return t0.elapsed();
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Receives video until `n` datagrams arrived (or `within` passed).
    pub async fn receive(&mut self, n: usize, within: Duration) -> Vec<Video> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Incoming::Video { sender, frame, .. })) => {
                    let packet = frame.into_packet();
                    assert_eq!(packet.channel, ChannelId::of_name(self.channel));
                    out.push(Video {
                        arrival: Instant::now(),
                        seq: packet.seq,
                        flags: packet.flags,
                        payload: packet.payload,
                        sender,
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        out
    }
}

//! Bootstrapper integration tests: the library's `run()` on real loopback sockets (each test on
//! its own 127.0.N.x block so they run in parallel), and the real binary for start-up failures.

use bootstrapper::{watch_topology, Config};
use common::bootstrap::{FetchError, HostKeys, Neighbours};
use common::keys::{KeyPair, Secret};
use common::topology::Topology;
use common::NodeId;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The tests' network key.
fn net() -> Secret {
    Secret([5; 32])
}

/// The keys of the host at `ip` (a fixed key pair per address).
fn keys(ip: IpAddr) -> HostKeys {
    let mut k = [1u8; 32];
    let s = ip.to_string();
    for (i, b) in s.bytes().enumerate() {
        k[i % 32] ^= b.wrapping_mul(i as u8 + 7);
    }
    HostKeys {
        identity: KeyPair::from_private(Secret(k)),
        network: net(),
    }
}

/// Asks as the host at `me`, with its keys.
async fn fetch_neighbours(b: SocketAddr, me: IpAddr) -> Result<Neighbours, FetchError> {
    common::bootstrap::fetch_neighbours(b, me, &keys(me)).await
}

/// Chain a – b – c on block `127.0.<net>.x`.
fn chain_toml(net: u8) -> String {
    format!(
        "\"127.0.{net}.1\" = [\"127.0.{net}.2\"]\n\
         \"127.0.{net}.2\" = [\"127.0.{net}.1\", \"127.0.{net}.3\"]\n\
         \"127.0.{net}.3\" = [\"127.0.{net}.2\"]\n"
    )
}

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(
    net: u8,
    topology: watch::Receiver<Arc<Topology>>,
    shutdown: CancellationToken,
) -> Running {
    let listener = TcpListener::bind((ip(&format!("127.0.{net}.250")), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(bootstrapper::run(
        listener,
        topology,
        Config::new(self::net()),
        shutdown.clone(),
    ));
    Running {
        addr,
        shutdown,
        task,
    }
}

async fn start_static(net: u8) -> Running {
    let (t, _) = Topology::parse(&chain_toml(net)).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(t));
    // Keep the sender alive for the test's duration.
    std::mem::forget(_tx);
    start(net, rx, CancellationToken::new()).await
}

/// A raw TCP connection from `from` to the bootstrapper.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

fn request_frame() -> Vec<u8> {
    let body = common::wire::encode_with_limit(
        &common::wire::Header::new(NodeId(0)),
        &common::wire::BootstrapRequest::Neighbours,
        common::wire::MAX_FRAME_LEN,
    )
    .unwrap();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// Reads until EOF (or error) and returns what came, with a generous cap on waiting.
async fn read_to_close(s: &mut TcpStream, cap: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let r = tokio::time::timeout(cap, s.read_to_end(&mut out)).await;
    (out, r.is_ok())
}

#[tokio::test]
async fn answers_a_host_with_its_id_and_neighbours() {
    let b = start_static(31).await;
    let n = fetch_neighbours(b.addr, ip("127.0.31.2")).await.unwrap();
    assert_eq!(n.id, NodeId::for_ip(ip("127.0.31.2")));
    assert_eq!(n.addr, "127.0.31.2:8010".parse().unwrap());
    let got: Vec<SocketAddr> = n.neighbours.iter().map(|h| h.addr).collect();
    assert_eq!(
        got,
        vec![
            "127.0.31.1:8010".parse::<SocketAddr>().unwrap(),
            "127.0.31.3:8010".parse().unwrap()
        ]
    );
    assert_eq!(n.neighbours[0].id, NodeId::for_ip(ip("127.0.31.1")));
    // Stable: asking again gives the same id.
    let again = fetch_neighbours(b.addr, ip("127.0.31.2")).await.unwrap();
    assert_eq!(again, n);
    b.stop().await;
}

#[tokio::test]
async fn unknown_address_is_refused_clearly() {
    let b = start_static(32).await;
    let e = fetch_neighbours(b.addr, ip("127.0.32.77"))
        .await
        .unwrap_err();
    match &e {
        FetchError::Refused(reason) => {
            assert!(
                reason.contains("127.0.32.77 is not in the topology"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(!e.is_transient());
    b.stop().await;
}

#[tokio::test]
async fn request_split_into_single_bytes_is_answered() {
    let b = start_static(33).await;
    let me = ip("127.0.33.3");
    let s = connect_from(me, b.addr).await;
    s.set_nodelay(true).unwrap();
    // The host's side runs on one end of a pipe; its bytes reach the bootstrapper one at a
    // time (5 ms apart), the answers come back as they are.
    let (mut ours, theirs) = tokio::io::duplex(1 << 16);
    let (mut tcp_r, mut tcp_w) = s.into_split();
    let (mut pipe_r, mut pipe_w) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut byte = [0u8; 1];
        while pipe_r.read_exact(&mut byte).await.is_ok() {
            if tcp_w.write_all(&byte).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tcp_r, &mut pipe_w).await;
    });
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        common::bootstrap::client_exchange(
            &mut ours,
            &keys(me),
            &common::wire::BootstrapRequest::Neighbours,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    match resp {
        common::wire::BootstrapResponse::Neighbours { id, neighbours, .. } => {
            assert_eq!(id, NodeId::for_ip(ip("127.0.33.3")));
            assert_eq!(neighbours.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    b.stop().await;
}

#[tokio::test]
async fn oversize_frame_is_dropped_and_others_still_served() {
    let b = start_static(34).await;
    let mut s = connect_from(ip("127.0.34.1"), b.addr).await;
    // Claims a 1 GiB frame: must be refused at once, without allocating it.
    s.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    s.write_all(&[0u8; 64]).await.unwrap();
    let (answer, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed && answer.is_empty(), "oversize frame got {answer:?}");
    // Garbage of the right size with a bad magic: dropped too.
    let mut s = connect_from(ip("127.0.34.1"), b.addr).await;
    s.write_all(&[0, 0, 0, 12]).await.unwrap();
    s.write_all(b"GARBAGEGARBA").await.unwrap();
    let (answer, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed && answer.is_empty());
    fetch_neighbours(b.addr, ip("127.0.34.2")).await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn slow_loris_and_silent_clients_are_dropped_within_the_timeout() {
    let b = start_static(35).await;
    let addr = b.addr;
    let t0 = Instant::now();
    // Silent client: connects and sends nothing.
    let silent = tokio::spawn(async move {
        let mut s = connect_from(ip("127.0.35.1"), addr).await;
        let (_, closed) = read_to_close(&mut s, Duration::from_secs(15)).await;
        (closed, t0.elapsed())
    });
    // Slow loris: one byte per second of a valid request, never finishing in time.
    let mut s = connect_from(ip("127.0.35.2"), addr).await;
    let frame = request_frame();
    let mut dropped_at = None;
    for byte in frame.iter().cycle().take(30) {
        if s.write_all(&[*byte]).await.is_err() {
            dropped_at = Some(t0.elapsed());
            break;
        }
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                dropped_at = Some(t0.elapsed());
                break;
            }
            Ok(Ok(_)) => panic!("slow loris got an answer"),
            Err(_) => {}
        }
    }
    // Dropped before its request could complete (a byte a second: ~16 s), and not before the
    // 5 s deadline (how late after it is a matter of load: not asserted).
    let dropped_at = dropped_at.expect("slow loris was never dropped");
    assert!(dropped_at >= Duration::from_millis(4500), "{dropped_at:?}");
    let (closed, at) = silent.await.unwrap();
    assert!(closed, "silent client never dropped ({at:?})");
    b.stop().await;
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_stop_it_serving() {
    let b = start_static(36).await;
    let mut idle = Vec::new();
    for i in 0..1000u32 {
        let from = ip(&format!("127.0.36.{}", 10 + i % 200));
        idle.push(connect_from(from, b.addr).await);
    }
    let t0 = Instant::now();
    let n = fetch_neighbours(b.addr, ip("127.0.36.1")).await.unwrap();
    assert_eq!(n.id, NodeId::for_ip(ip("127.0.36.1")));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "answer took {:?} behind 1000 idle connections",
        t0.elapsed()
    );
    drop(idle);
    b.stop().await;
}

async fn wait_for<F: FnMut() -> bool>(mut f: F, within: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

fn write_file(path: &Path, text: &str) {
    // Write to a temporary name and rename, as editors do.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn reload_applies_valid_changes_and_keeps_the_old_topology_on_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topo.toml");
    write_file(&path, &chain_toml(37));
    let shutdown = CancellationToken::new();
    let initial = bootstrapper::load_topology(&path).unwrap();
    let (rx, _guard) = watch_topology(&path, initial, shutdown.clone()).unwrap();
    let b = start(37, rx.clone(), shutdown).await;
    let me = ip("127.0.37.3");
    assert_eq!(
        fetch_neighbours(b.addr, me).await.unwrap().neighbours.len(),
        1
    );

    // Invalid edit (a self-loop): rejected, previous topology still answered.
    write_file(
        &path,
        &format!("{}\"127.0.37.4\" = [\"127.0.37.4\"]\n", chain_toml(37)),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rx.borrow().len(), 3, "invalid topology was applied");
    assert_eq!(
        fetch_neighbours(b.addr, me).await.unwrap().neighbours.len(),
        1
    );

    // Valid edit: host .3 gains neighbour .4, which is new.
    write_file(
        &path,
        "\"127.0.37.1\" = [\"127.0.37.2\"]\n\
         \"127.0.37.2\" = [\"127.0.37.1\", \"127.0.37.3\"]\n\
         \"127.0.37.3\" = [\"127.0.37.2\", \"127.0.37.4\"]\n\
         \"127.0.37.4\" = [\"127.0.37.3\"]\n",
    );
    assert!(
        wait_for(|| rx.borrow().len() == 4, Duration::from_secs(5)).await,
        "valid change not applied"
    );
    let n = fetch_neighbours(b.addr, me).await.unwrap();
    assert_eq!(n.neighbours.len(), 2);
    assert!(fetch_neighbours(b.addr, ip("127.0.37.4")).await.is_ok());
    b.stop().await;
}

/// A `Watch` is held while the host's answer is unchanged, answered as soon as an edit of the
/// file changes it (the push that makes edits reach running hosts), and answered unchanged
/// after the hold time; a host whose answer did change is answered at once.
#[tokio::test]
async fn a_watch_is_answered_when_an_edit_changes_the_hosts_neighbours() {
    use common::bootstrap::{watch_neighbours, Neighbours};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topo.toml");
    write_file(&path, &chain_toml(38));
    let shutdown = CancellationToken::new();
    let initial = bootstrapper::load_topology(&path).unwrap();
    let (rx, _guard) = watch_topology(&path, initial, shutdown.clone()).unwrap();
    let listener = TcpListener::bind((ip("127.0.38.250"), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = Config {
        watch_hold: Duration::from_millis(300),
        ..Config::new(net())
    };
    let task = tokio::spawn(bootstrapper::run(listener, rx, cfg, shutdown.clone()));
    let (h1, h3) = (ip("127.0.38.1"), ip("127.0.38.3"));
    fetch_neighbours(addr, h1).await.unwrap();
    let n3: Neighbours = fetch_neighbours(addr, h3).await.unwrap();
    // Asked again after .3 registered its key (which changed .1's member list).
    let n1: Neighbours = fetch_neighbours(addr, h1).await.unwrap();
    assert_eq!(n1.members.len(), 2);
    let mut up1 = watch_neighbours(addr, h1, keys(h1), &n1, shutdown.clone());
    let mut up3 = watch_neighbours(addr, h3, keys(h3), &n3, shutdown.clone());
    // Several hold periods pass: nothing is pushed (unchanged answers are not news).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(up1.try_recv().is_err() && up3.try_recv().is_err());

    // Host .4 added, linked to .3 and .1; .2 unchanged.
    write_file(
        &path,
        "\"127.0.38.1\" = [\"127.0.38.2\", \"127.0.38.4\"]\n\
         \"127.0.38.2\" = [\"127.0.38.1\", \"127.0.38.3\"]\n\
         \"127.0.38.3\" = [\"127.0.38.2\", \"127.0.38.4\"]\n\
         \"127.0.38.4\" = [\"127.0.38.1\", \"127.0.38.3\"]\n",
    );
    let addrs = |v: (Vec<common::wire::PathHop>, Vec<common::wire::Member>)| -> Vec<IpAddr> {
        v.0.iter().map(|h| h.addr.ip()).collect()
    };
    let got = tokio::time::timeout(Duration::from_secs(10), up3.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(addrs(got), [ip("127.0.38.2"), ip("127.0.38.4")]);
    let got = tokio::time::timeout(Duration::from_secs(10), up1.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(addrs(got), [ip("127.0.38.2"), ip("127.0.38.4")]);

    // Link .3 – .2 removed: .3 hears of it.
    write_file(
        &path,
        "\"127.0.38.1\" = [\"127.0.38.2\", \"127.0.38.4\"]\n\
         \"127.0.38.2\" = [\"127.0.38.1\"]\n\
         \"127.0.38.3\" = [\"127.0.38.4\"]\n\
         \"127.0.38.4\" = [\"127.0.38.1\", \"127.0.38.3\"]\n",
    );
    let got = tokio::time::timeout(Duration::from_secs(10), up3.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(addrs(got), [ip("127.0.38.4")]);
    // .1 did not change: nothing for it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(up1.try_recv().is_err());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// The network key gates everything: a host with another one gets no answer (the handshake
/// fails); a host presenting another key than the one pinned in the topology, or than the one
/// its address registered, is refused with both keys named; the members' keys are handed out.
#[tokio::test]
async fn keys_are_checked_registered_and_handed_out() {
    let net_no = 40;
    let (a, b2, c) = (ip("127.0.40.1"), ip("127.0.40.2"), ip("127.0.40.3"));
    let mut topo = Topology::parse(&chain_toml(net_no)).unwrap().0;
    topo.pin_key(c, keys(c).identity.public);
    let (_tx, rx) = watch::channel(Arc::new(topo));
    std::mem::forget(_tx);
    let b = start(net_no, rx, CancellationToken::new()).await;
    // Another network key: the handshake fails, nothing is answered.
    let stranger = HostKeys {
        network: Secret([6; 32]),
        ..keys(a)
    };
    let e = common::bootstrap::fetch_neighbours(b.addr, a, &stranger)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Frame { .. }), "{e}");
    // .1 registers; .3 is pinned: both are members, .2 not yet.
    let n = fetch_neighbours(b.addr, a).await.unwrap();
    let ids: Vec<NodeId> = n.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, [NodeId::for_ip(a), NodeId::for_ip(c)]);
    assert_eq!(n.members[0].key, keys(a).identity.public);
    // .1 with a new key: refused, naming both.
    let changed = HostKeys {
        identity: KeyPair::from_private(Secret([42; 32])),
        network: net(),
    };
    match common::bootstrap::fetch_neighbours(b.addr, a, &changed).await {
        Err(FetchError::Refused(r)) => assert!(
            r.contains(&changed.identity.public.to_string())
                && r.contains(&keys(a).identity.public.to_string())
                && r.contains("registered"),
            "{r}"
        ),
        other => panic!("{other:?}"),
    }
    // .3 with a key that is not its pin: refused.
    match common::bootstrap::fetch_neighbours(b.addr, c, &changed).await {
        Err(FetchError::Refused(r)) => assert!(r.contains("pins"), "{r}"),
        other => panic!("{other:?}"),
    }
    // The rest still works.
    assert_eq!(fetch_neighbours(b.addr, b2).await.unwrap().members.len(), 3);
    b.stop().await;
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bootstrapper")
}

#[test]
fn malformed_topology_at_start_exits_nonzero_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "\"127.0.38.1\" = [\"127.0.38.2\"]\n\"127.0.38.2\" = [\"127.0.38.1\", \"127.0.38.300\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["--bind-ip", "127.0.38.250", "--port", "0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a bad topology");
    assert!(
        stderr.contains("line 2") && stderr.contains("127.0.38.300"),
        "{stderr}"
    );

    // Broken TOML syntax: toml's own line/column are kept.
    std::fs::write(&path, "\"127.0.38.1\" = [\"127.0.38.2\"\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["--bind_ip", "127.0.38.250", "--port", "0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 1"), "{stderr}");

    // Missing file: named.
    let out = std::process::Command::new(bin())
        .args(["--port", "0", "--config", "/nonexistent/topo.toml"])
        .env("BOOTSTRAPPER_IP", "127.0.38.250")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/topo.toml"));
}

#[test]
fn the_binary_serves_the_default_topology_and_stops_on_sigterm() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // Its network key at the default path of a fresh key directory (as on a new machine).
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin())
        .current_dir(root)
        .env("PESSI_KEY_DIR", dir.path())
        .args(["--bind-ip", "127.0.39.250", "--port", "18010"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // 127.0.0.2 is in topologies/neighbours.toml; retry while the binary starts.
    let got = rt.block_on(async {
        for _ in 0..100 {
            let Ok(network) = common::keys::load(&dir.path().join("network.key")) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let k = HostKeys {
                network,
                ..keys(ip("127.0.0.2"))
            };
            let at = "127.0.39.250:18010".parse().unwrap();
            match common::bootstrap::fetch_neighbours(at, ip("127.0.0.2"), &k).await {
                Ok(n) => return Some(n),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        None
    });
    // SIGTERM: it must exit by itself, promptly and successfully.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("bootstrapper ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let n = got.expect("the bootstrapper binary never answered");
    assert_eq!(
        n.neighbours.len(),
        3,
        "127.0.0.2 has 3 neighbours in the default topology"
    );
    assert!(status.success(), "exit status {status}");
}

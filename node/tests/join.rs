//! The real `node` binary joins an overlay served by the real bootstrapper `run()`, measures its
//! links (with `--impair` on), refuses to start when it is not in the topology, and stops
//! promptly on SIGTERM.

use common::topology::Topology;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Starts the bootstrapper on 127.0.40.250 (ephemeral port) for the chain .1 – .2 – .3.
fn start_bootstrapper(rt: &tokio::runtime::Runtime) -> (u16, CancellationToken) {
    let (topology, _) = Topology::parse(
        "\"127.0.40.1\" = [\"127.0.40.2\"]\n\
         \"127.0.40.2\" = [\"127.0.40.1\", \"127.0.40.3\"]\n\
         \"127.0.40.3\" = [\"127.0.40.2\"]\n",
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.40.250:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(topology));
    std::mem::forget(tx);
    rt.spawn(bootstrapper::run(
        listener,
        rx,
        bootstrapper::Config {
            overlay_port: 18040,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    (port, shutdown)
}

struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    fn start(ip: &str, bootstrapper_port: u16, extra: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_node"))
            .args(["--ip", ip, "--port", "18040"])
            .args(["--bootstrapper", "127.0.40.250"])
            .args(["--bootstrapper-port", &bootstrapper_port.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
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

    /// Waits for a log line containing every one of `parts`.
    fn expect(&mut self, parts: &[&str], within: Duration) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
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

    fn sigterm_and_wait(mut self, within: Duration) -> std::process::ExitStatus {
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

#[test]
fn nodes_join_measure_links_and_stop_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port, shutdown) = start_bootstrapper(&rt);
    let mut a = Daemon::start(
        "127.0.40.2",
        port,
        &["--impair", "loss=10%,delay=5ms,seed=3"],
    );
    let mut b = Daemon::start("127.0.40.3", port, &[]);
    a.expect(
        &["joined the overlay", "127.0.40.1:18040", "127.0.40.3:18040"],
        Duration::from_secs(10),
    );
    a.expect(&["TESTING AID", "loss=10%"], Duration::from_secs(5));
    b.expect(
        &["joined the overlay", "127.0.40.2:18040"],
        Duration::from_secs(10),
    );
    // Each sees the other through reliable pings (through a's 10 % loss).
    a.expect(
        &["neighbour up", "127.0.40.3:18040"],
        Duration::from_secs(10),
    );
    b.expect(
        &["neighbour up", "127.0.40.2:18040"],
        Duration::from_secs(10),
    );
    assert!(a.sigterm_and_wait(Duration::from_secs(5)).success());
    assert!(b.sigterm_and_wait(Duration::from_secs(5)).success());
    shutdown.cancel();
}

#[test]
fn a_node_outside_the_topology_is_refused_and_exits() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port, shutdown) = start_bootstrapper(&rt);
    let out = Command::new(env!("CARGO_BIN_EXE_node"))
        .args(["--ip", "127.0.40.9", "--port", "18040"])
        .args([
            "--bootstrapper",
            "127.0.40.250",
            "--bootstrapper-port",
            &port.to_string(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("127.0.40.9 is not in the topology"),
        "{stderr}"
    );
    shutdown.cancel();
}

#[test]
fn a_bad_impair_spec_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_node"))
        .args(["--ip", "127.0.40.8", "--impair", "loss=150%"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("loss=150%"), "{stderr}");
}

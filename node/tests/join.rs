//! The real `node` binary joins an overlay served by the real bootstrapper `run()`, measures its
//! links (with `--impair` on), refuses to start when it is not in the topology, and stops
//! promptly on SIGTERM.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{start_bootstrapper, Daemon};

const P: &str = "127.0.40";
const PORT: u16 = 18040;

/// The chain .1 – .2 – .3 (bootstrapper on .250).
const CHAIN: &str = "\"127.0.40.1\" = [\"127.0.40.2\"]\n\
                     \"127.0.40.2\" = [\"127.0.40.1\", \"127.0.40.3\"]\n\
                     \"127.0.40.3\" = [\"127.0.40.2\"]\n";

#[test]
fn nodes_join_measure_links_and_stop_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port, shutdown) = start_bootstrapper(&rt, P, CHAIN, PORT);
    let mut a = Daemon::start_with(
        "127.0.40.2",
        PORT,
        P,
        port,
        &["--impair", "loss=10%,delay=5ms,seed=3"],
    );
    let mut b = Daemon::start("127.0.40.3", PORT, P, port);
    a.expect_next(
        &["joined the overlay", "127.0.40.1:18040", "127.0.40.3:18040"],
        Duration::from_secs(10),
    );
    a.expect_next(&["TESTING AID", "loss=10%"], Duration::from_secs(5));
    b.expect_next(
        &["joined the overlay", "127.0.40.2:18040"],
        Duration::from_secs(10),
    );
    // Each sees the other through reliable pings (through a's 10 % loss).
    a.expect_next(
        &["neighbour up", "127.0.40.3:18040"],
        Duration::from_secs(10),
    );
    b.expect_next(
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
    let (port, shutdown) = start_bootstrapper(&rt, P, CHAIN, PORT);
    let out = Command::new(env!("CARGO_BIN_EXE_node"))
        .env("PESSI_KEY_DIR", support::key_dir())
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

/// A node with another network key than the bootstrapper's is refused with a message that
/// says so and names the key file, and exits.
#[test]
fn a_node_with_another_network_key_is_refused_and_exits() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port, shutdown) = start_bootstrapper(&rt, P, CHAIN, PORT);
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_node"))
        .env("PESSI_KEY_DIR", other.path())
        .args(["--ip", "127.0.40.2", "--port", "18041"])
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
        stderr.contains("wrong network key") && stderr.contains("network.key"),
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

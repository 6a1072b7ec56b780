//! End-to-end tests of the real client binary, headless, against fake PoPs living in the test
//! process (a `common::transport::Transport` on 127.0.6x.* speaking the wire protocol) that
//! stream real MPEG-TS made by ffmpeg.

#[path = "support/fake_pop.rs"]
mod fake_pop;

use common::keys::KeyPair;
use fake_pop::{FakePop, CHANNEL};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Runs the client binary with `args` (plus `--headless`); returns (success, stderr).
async fn run_client(args: &[String], path_env: Option<&Path>) -> (bool, String) {
    // Its keys (the PoP keys it learns) stay with this run, not in the user's config.
    let keys = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_client"));
    cmd.arg("--headless")
        .args(args)
        .env("RUST_LOG", "info")
        .env("PESSI_KEY_DIR", keys.path())
        .kill_on_drop(true);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("client exits by itself after --duration")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn events(stats: &Path) -> Vec<Value> {
    std::fs::read_to_string(stats)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn of_kind<'a>(ev: &'a [Value], kind: &str) -> Vec<&'a Value> {
    ev.iter().filter(|e| e["event"] == kind).collect()
}

fn common_args(pops: &[&FakePop], dir: &Path, duration: &str) -> (Vec<String>, PathBuf, PathBuf) {
    let stats = dir.join("stats.jsonl");
    let record = dir.join("rec.ts");
    let servers: Vec<String> = pops.iter().map(|p| p.addr.ip().to_string()).collect();
    let args = vec![
        "--servers".into(),
        servers.join(","),
        "--port".into(),
        pops[0].addr.port().to_string(),
        "--stream".into(),
        CHANNEL.into(),
        "--stats".into(),
        stats.display().to_string(),
        "--record".into(),
        record.display().to_string(),
        "--duration".into(),
        duration.into(),
    ];
    (args, stats, record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plays_records_and_reports_stats() {
    let pop = FakePop::start("127.0.61.1:0".parse().unwrap(), Duration::ZERO, 1000, false).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut args, stats, record) = common_args(&[&pop], dir.path(), "4");
    args.extend(["--video-player".into(), "none".into()]);
    let (ok, stderr) = run_client(&args, None).await;
    assert!(ok, "client failed:\n{stderr}");
    let ev = events(&stats);
    let streams = of_kind(&ev, "streams");
    assert_eq!(streams[0]["names"], serde_json::json!([CHANNEL]), "{ev:?}");
    let play = of_kind(&ev, "play");
    assert_eq!(play.len(), 1, "{ev:?}");
    assert_eq!(play[0]["pop"], pop.addr.to_string());
    assert_eq!(of_kind(&ev, "first_packet").len(), 1, "{ev:?}");
    let pops = of_kind(&ev, "pop");
    assert_eq!(pops[0]["up"], true);
    let stats_ev = of_kind(&ev, "stats");
    assert!(stats_ev.len() >= 3, "{ev:?}");
    let sent = pop.sent.lock().unwrap().clone();
    let last = stats_ev.last().unwrap();
    assert_eq!(last["packets"], sent.len() as u64, "{ev:?}");
    assert_eq!(last["lost"], 0);
    assert_eq!(
        last["bytes"],
        sent.iter().map(|b| b.len() as u64).sum::<u64>()
    );
    assert_eq!(of_kind(&ev, "stop")[0]["reason"], "exit");
    // The recording is exactly the payload bytes sent, in order.
    let recorded = std::fs::read(&record).unwrap();
    let expected: Vec<u8> = sent.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(recorded.len(), expected.len());
    assert!(recorded == expected, "recording differs from what was sent");
    assert!(stderr.contains("summary"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_next_pop_and_keeps_receiving() {
    let a = FakePop::start("127.0.62.1:0".parse().unwrap(), Duration::ZERO, 0, true).await;
    // The second PoP is slower (pongs 20 ms late) and numbers its packets differently (a replica).
    let b_addr = SocketAddr::new("127.0.62.2".parse().unwrap(), a.addr.port());
    let b = FakePop::start(b_addr, Duration::from_millis(20), 5_000_000, true).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut args, stats, _record) = common_args(&[&b, &a], dir.path(), "7");
    args.extend(["--video-player".into(), "none".into()]);
    let client = tokio::spawn(async move { run_client(&args, None).await });
    // Kill A once the client receives from it.
    let stats2 = stats.clone();
    tokio::time::timeout(Duration::from_secs(5), async move {
        while of_kind(&events(&stats2), "first_packet").is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("first packet within 5 s");
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.alive.store(false, Ordering::SeqCst);
    let (ok, stderr) = client.await.unwrap();
    assert!(ok, "client failed:\n{stderr}");
    let ev = events(&stats);
    let play = of_kind(&ev, "play");
    assert_eq!(play[0]["pop"], a.addr.to_string(), "best RTT first: {ev:?}");
    let changed = of_kind(&ev, "source_changed");
    assert_eq!(changed.len(), 1, "{ev:?}");
    assert_eq!(changed[0]["from"], a.addr.to_string());
    assert_eq!(changed[0]["to"], b.addr.to_string());
    let t_change = changed[0]["t_ms"].as_u64().unwrap();
    let down = of_kind(&ev, "pop")
        .into_iter()
        .find(|e| e["up"] == false)
        .expect("a pop event with up=false");
    assert_eq!(down["pop"], a.addr.to_string());
    // Stats after the change come from B and keep growing.
    let after: Vec<&Value> = of_kind(&ev, "stats")
        .into_iter()
        .filter(|e| e["t_ms"].as_u64().unwrap() > t_change)
        .collect();
    assert!(after.len() >= 2, "{ev:?}");
    assert!(after.iter().all(|e| e["pop"] == b.addr.to_string()));
    let first = after[0]["packets"].as_u64().unwrap();
    let last = after.last().unwrap()["packets"].as_u64().unwrap();
    assert!(
        last > first + 100,
        "still receiving after failover: {first} → {last}"
    );
    // The replica's unrelated numbering is not counted as loss.
    assert_eq!(after.last().unwrap()["lost"], 0, "{ev:?}");
    assert!(!b.sent.lock().unwrap().is_empty());
    assert!(stderr.contains("source changed"), "{stderr}");
}

/// Every 20th datagram is dropped on first send; the fake PoP answers NACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_datagrams_are_recovered_by_nacks() {
    let pop = FakePop::start_lossy(
        "127.0.64.1:0".parse().unwrap(),
        Duration::ZERO,
        0,
        false,
        4,
        20,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mut args, stats, record) = common_args(&[&pop], dir.path(), "4");
    args.extend(["--video-player".into(), "none".into()]);
    let (ok, stderr) = run_client(&args, None).await;
    assert!(ok, "client failed:\n{stderr}");
    let ev = events(&stats);
    let sent = pop.sent.lock().unwrap().clone();
    assert!(sent.len() >= 200, "{}", sent.len());
    assert!(!pop.resent.lock().unwrap().is_empty(), "no NACK answered");
    let last = *of_kind(&ev, "stats").last().unwrap();
    eprintln!("last stats: {last}");
    assert!(
        last["recovered"].as_u64().unwrap() >= (sent.len() / 20) as u64 - 1,
        "{last}"
    );
    assert!(last["nacks"].as_u64().unwrap() > 0, "{last}");
    assert!(last["retransmitted"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["skipped"], 0, "{last}");
    assert_eq!(last["lost"], 0, "{last}");
    assert_eq!(last["packets"], sent.len() as u64, "{last}");
    let recorded = std::fs::read(&record).unwrap();
    let expected: Vec<u8> = sent.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(recorded.len(), expected.len());
    assert!(recorded == expected, "recording differs from what was sent");
}

/// The same loss with `--no-recovery`: the jitter buffer skips the holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recovery_lost_datagrams_are_skipped() {
    let pop = FakePop::start_lossy(
        "127.0.65.1:0".parse().unwrap(),
        Duration::ZERO,
        0,
        false,
        4,
        20,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mut args, stats, record) = common_args(&[&pop], dir.path(), "4");
    args.extend([
        "--video-player".into(),
        "none".into(),
        "--no-recovery".into(),
    ]);
    let (ok, stderr) = run_client(&args, None).await;
    assert!(ok, "client failed:\n{stderr}");
    let ev = events(&stats);
    let sent = pop.sent.lock().unwrap().clone();
    assert!(pop.resent.lock().unwrap().is_empty());
    let last = *of_kind(&ev, "stats").last().unwrap();
    eprintln!("last stats: {last}");
    let dropped = (sent.len() / 20) as u64;
    assert_eq!(last["skipped"], dropped, "{last}");
    assert_eq!(last["lost"], dropped, "{last}");
    assert_eq!(last["nacks"], 0, "{last}");
    assert_eq!(last["recovered"], 0, "{last}");
    assert_eq!(last["packets"], sent.len() as u64 - dropped, "{last}");
    let recorded = std::fs::read(&record).unwrap();
    assert!(recorded.len() < sent.iter().map(|b| b.len()).sum::<usize>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_mpv_is_reported_and_the_stream_goes_on() {
    let pop = FakePop::start("127.0.63.1:0".parse().unwrap(), Duration::ZERO, 0, true).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let (mut args, stats, record) = common_args(&[&pop], dir.path(), "2");
    args.extend(["--video-player".into(), "mpv".into()]);
    let (ok, stderr) = run_client(&args, Some(empty.path())).await;
    assert!(ok, "client failed:\n{stderr}");
    assert!(
        stderr.contains("mpv not found: install it with `sudo apt-get install mpv`"),
        "{stderr}"
    );
    let ev = events(&stats);
    assert_eq!(of_kind(&ev, "first_packet").len(), 1, "{ev:?}");
    assert!(std::fs::metadata(&record).unwrap().len() > 0);
}

/// Failures are said: a stream no live PoP offers, and a PoP where nothing answers, are errors
/// naming what is wrong (the stream and what is offered; the addresses used and what to check),
/// with a non-zero exit after `--give-up`, well before `--duration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_nobody_offers_and_a_silent_pop_are_errors() {
    let pop = FakePop::start("127.0.61.6:0".parse().unwrap(), Duration::ZERO, 1000, false).await;
    let port = pop.addr.port().to_string();
    let base = |servers: &str, stream: &str| -> Vec<String> {
        [
            "--servers",
            servers,
            "--port",
            &port,
            "--stream",
            stream,
            "--video-player",
            "none",
            "--give-up",
            "2s",
            "--duration",
            "25",
        ]
        .map(String::from)
        .to_vec()
    };
    let (ok, stderr) = run_client(&base("127.0.61.6", "nosuch"), None).await;
    assert!(!ok, "a stream nobody offers must fail:\n{stderr}");
    assert!(
        stderr.contains("\"nosuch\" is not offered by any live PoP")
            && stderr.contains(&format!("channels offered: {CHANNEL}")),
        "{stderr}"
    );
    // Nothing listens on 127.0.61.7: the message names both ends and what to check. The PoP
    // is given as host:port, which --servers accepts.
    let silent = format!("127.0.61.7:{port}");
    let (ok, stderr) = run_client(&base(&silent, CHANNEL), None).await;
    assert!(!ok, "no PoP answering must fail:\n{stderr}");
    assert!(
        stderr.contains("no PoP has answered")
            && stderr.contains(&format!("pinged {silent} from 127.0.0.1:"))
            && stderr.contains("UDP")
            && stderr.contains("--bind"),
        "{stderr}"
    );
}

/// Trust on first use: the client remembers the key its PoP proved, and refuses a PoP at the
/// same address that proves another one later (naming the file to edit), unless the user
/// pins the new key; the other PoPs keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_whose_key_changed_since_the_first_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known-pops");
    let at: SocketAddr = "127.0.61.9:8010".parse().unwrap();
    let args = |servers: &str| -> Vec<String> {
        [
            "--servers",
            servers,
            "--stream",
            CHANNEL,
            "--video-player",
            "none",
            "--give-up",
            "3s",
            "--duration",
            "4",
            "--known-pops",
            known.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let first = KeyPair::generate();
    let pop = FakePop::start_keyed(at, Duration::ZERO, 1000, true, 1, 0, first.clone()).await;
    let (ok, stderr) = run_client(&args("127.0.61.9"), None).await;
    assert!(ok, "first use plays:\n{stderr}");
    let text = std::fs::read_to_string(&known).unwrap();
    assert!(text.contains(&format!("{at} {}", first.public)), "{text}");
    drop(pop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Same address, another key (an impostor, or a reinstalled host).
    let second = KeyPair::generate();
    let _pop = FakePop::start_keyed(at, Duration::ZERO, 1000, true, 1, 0, second.clone()).await;
    let (ok, stderr) = run_client(&args("127.0.61.9"), None).await;
    assert!(!ok, "a changed key must be refused:\n{stderr}");
    assert!(
        stderr.contains(&format!("proved key {}", second.public))
            && stderr.contains(&first.public.to_string())
            && stderr.contains(&format!("delete its line from {}", known.display())),
        "{stderr}"
    );
    // The user vouches for the new key: pinned on the command line, it plays.
    let (ok, stderr) = run_client(&args(&format!("127.0.61.9#{}", second.public)), None).await;
    assert!(ok, "the pinned new key plays:\n{stderr}");
}

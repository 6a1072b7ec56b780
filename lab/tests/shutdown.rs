//! No child process (ffmpeg, daemons started by the lab) outlives its parent: after SIGTERM of
//! the lab (clean stop) and after SIGKILL of the lab (the kernel's parent-death signal).

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every descendant of `root` (by walking /proc's parent links).
fn descendants(root: u32) -> BTreeSet<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (after "pid (comm) state") is the parent pid; comm may contain spaces.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(ppid) = rest.split(' ').nth(1).and_then(|s| s.parse::<u32>().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (c, pp) in &parent_of {
            if *pp == p && out.insert(*c) {
                frontier.push(*c);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose (its parent has not reaped it yet).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()) != Some('Z'))
        .unwrap_or(false)
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn run_lab_until_streaming(net: u8, dir: &std::path::Path) -> (std::process::Child, BTreeSet<u32>) {
    support::require_ffmpeg();
    let topo = dir.join("topology.toml");
    std::fs::write(
        &topo,
        format!(
            "\"127.0.{net}.1\" = [\"127.0.{net}.2\"]\n\"127.0.{net}.2\" = [\"127.0.{net}.1\", \"127.0.{net}.3\"]\n\"127.0.{net}.3\" = [\"127.0.{net}.2\"]\n"
        ),
    )
    .unwrap();
    let logs = dir.join("logs");
    let child = Command::new(env!("CARGO_BIN_EXE_lab"))
        // The default player choice: with --headless the lab must not start one (it would exit
        // without a display and stop the stream).
        .args(["--no-build", "--headless"])
        .arg("--topology")
        .arg(&topo)
        .args(["--bootstrapper-ip", &format!("127.0.{net}.250")])
        .arg("--log-dir")
        .arg(&logs)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the demo channel reaches the client: ffmpeg, server, nodes, client all up.
    let stats = logs.join("client-stats.jsonl");
    let t0 = Instant::now();
    loop {
        let s = lab::stats::Summary::load(&stats);
        if s.streams
            .get(lab::DEMO_CHANNEL)
            .is_some_and(|d| d.packets > 300)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the demo never streamed; summary: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let tree = descendants(child.id());
    let names: BTreeSet<String> = tree.iter().map(|p| comm(*p)).collect();
    for expected in ["bootstrapper", "server", "node", "client", "ffmpeg"] {
        assert!(
            names.contains(expected),
            "no {expected} among the lab's processes: {names:?}"
        );
    }
    (child, tree)
}

fn assert_all_gone(tree: &BTreeSet<u32>, within: Duration) {
    let t0 = Instant::now();
    loop {
        let left: Vec<(u32, String)> = tree
            .iter()
            .filter(|p| alive(**p))
            .map(|p| (*p, comm(*p)))
            .collect();
        if left.is_empty() {
            return;
        }
        if t0.elapsed() > within {
            for (p, _) in &left {
                unsafe { libc::kill(*p as i32, libc::SIGKILL) };
            }
            panic!("processes outlived the lab: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_stops_every_child_process() {
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, tree) = run_lab_until_streaming(81, dir.path());
    unsafe { libc::kill(lab.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = lab.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "lab ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "lab exit status {status}");
    assert_all_gone(&tree, Duration::from_secs(5));
}

#[test]
fn sigkill_of_the_lab_takes_every_child_down() {
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, tree) = run_lab_until_streaming(82, dir.path());
    lab.kill().unwrap();
    lab.wait().unwrap();
    assert_all_gone(&tree, Duration::from_secs(10));
}

//! Harness for the end-to-end tests: real binaries (from `target/<profile>/`, built by
//! `cargo test --workspace`), real FFmpeg clips, loopback addresses. Each test uses its own
//! `127.0.N.x` block so tests run in parallel.

#![allow(dead_code)]

use lab::overlay::{Lab, LabOptions};
use lab::process::Binaries;
use lab::stats::Summary;
use lab::{Media, Plan};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running overlay and its scratch folder.
pub struct Overlay {
    /// Drives the supervisor's child processes.
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    /// The overlay's processes (the lab the demo runs).
    pub lab: Lab,
    pub bins: Binaries,
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Fails clearly when ffmpeg is missing (CI installs it; never skip silently).
pub fn require_ffmpeg() {
    let ok = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "ffmpeg is required by the end-to-end tests: `sudo apt-get install ffmpeg` (scripts/test.sh does it)"
    );
}

/// Makes a `secs`-second H.264/AAC clip with a keyframe every second.
pub fn make_clip(path: &Path, secs: u32, pattern: &str) {
    require_ffmpeg();
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("{pattern}=size=320x240:rate=25:duration={secs}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!(
            "sine=frequency=440:sample_rate=48000:duration={secs}"
        ))
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg failed making {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Overlay {
    /// Writes `topology` and starts the bootstrapper, the servers (serving `media`) and every
    /// other host as a node.
    pub fn start(topology: &str, servers: &[&str], media: Media) -> Overlay {
        Overlay::start_with(topology, servers, media, |_| None)
    }

    /// Like [`Overlay::start`], with `--impair` per host.
    pub fn start_with(
        topology: &str,
        servers: &[&str],
        media: Media,
        impair: impl Fn(IpAddr) -> Option<String>,
    ) -> Overlay {
        // Children inherit it: error reports without backtraces are what a user reads.
        std::env::set_var("RUST_BACKTRACE", "0");
        let dir = tempfile::tempdir().unwrap();
        let topo = dir.path().join("topology.toml");
        std::fs::write(&topo, topology).unwrap();
        let servers: Vec<IpAddr> = servers.iter().map(|s| ip(s)).collect();
        let plan = Plan::new(topo, servers, vec![], None, 8010).unwrap();
        let bins = Binaries::locate().expect("binaries (run `cargo test --workspace`)");
        let opts = LabOptions {
            netns: false,
            media,
            impair: plan
                .topology
                .hosts()
                .filter_map(|h| impair(h).map(|spec| (h, spec)))
                .collect(),
        };
        let rt = runtime();
        let _g = rt.enter();
        let mut lab = Lab::new(plan, bins.clone(), dir.path().join("logs"), opts).unwrap();
        rt.block_on(lab.start()).unwrap();
        drop(_g);
        Overlay { rt, dir, lab, bins }
    }

    /// Starts a headless client with `--stats` into the scratch folder; returns the stats path.
    pub fn client(&mut self, name: &str, pops: &[&str], extra: &[&str]) -> PathBuf {
        let stats = self.dir.path().join(format!("{name}-stats.jsonl"));
        let pops: Vec<String> = pops.iter().map(|p| p.to_string()).collect();
        let mut args = lab::headless_client_args(&pops, &stats);
        args.extend(extra.iter().map(OsString::from));
        let _g = self.rt.enter();
        self.lab
            .supervisor()
            .spawn(name, self.bins.path("client"), args)
            .unwrap();
        stats
    }

    /// Path for a scratch file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The log of process `name` so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.lab.log_path(name)).unwrap_or_default()
    }

    /// All logs, for failure messages.
    pub fn all_logs(&self) -> String {
        logs_in(&self.dir.path().join("logs"))
    }

    /// Kills (SIGKILL) the process `name`.
    pub fn kill(&mut self, name: &str) {
        self.rt.block_on(self.lab.supervisor().kill(name)).unwrap();
    }

    /// Restarts the process `name` (same arguments).
    pub fn restart(&mut self, name: &str) {
        let _g = self.rt.enter();
        self.rt
            .block_on(self.lab.supervisor().restart(name, &[]))
            .unwrap();
    }

    /// Waits until `pred` holds for the stats file at `stats`, or panics with the logs.
    pub fn wait_stats(
        &self,
        stats: &Path,
        within: Duration,
        what: &str,
        pred: impl Fn(&Summary) -> bool,
    ) -> Summary {
        wait_stats_in(stats, &self.dir.path().join("logs"), within, what, pred)
    }

    /// Waits until the log of `name` contains every one of `parts` on one line.
    pub fn wait_log(&self, name: &str, parts: &[&str], within: Duration) -> String {
        self.wait_log_after(name, 0, parts, within)
    }

    /// Lines in the log of `name` so far (to wait for lines written after now).
    pub fn log_lines(&self, name: &str) -> usize {
        self.log(name).lines().count()
    }

    /// Like [`Overlay::wait_log`], ignoring the first `skip` lines.
    pub fn wait_log_after(
        &self,
        name: &str,
        skip: usize,
        parts: &[&str],
        within: Duration,
    ) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self
                .log(name)
                .lines()
                .skip(skip)
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.to_owned();
            }
            if t0.elapsed() > within {
                panic!(
                    "timed out after {within:?} waiting for {parts:?} in the log of {name}; logs:{}",
                    self.all_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops everything (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        self.rt
            .block_on(self.lab.supervisor().stop_all(Duration::from_secs(5)));
    }
}

/// The head and tail of every log in `dir`, for failure messages.
/// Waits until `pred` holds for the stats file at `stats`, or panics with every log in `logs`.
pub fn wait_stats_in(
    stats: &Path,
    logs: &Path,
    within: Duration,
    what: &str,
    pred: impl Fn(&Summary) -> bool,
) -> Summary {
    let t0 = Instant::now();
    loop {
        let s = Summary::load(stats);
        if pred(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for: {what}\nsummary:\n{s}\nlogs:{}",
            logs_in(logs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The log line a node writes when it subscribes upstream for a channel (names the upstream).
pub const UPSTREAM_LINE: &str = ": subscribe upstream";

/// The upstream a node's log `text` names in its latest subscription, without the port.
pub fn latest_upstream(text: &str) -> Option<String> {
    let line = text.lines().rev().find(|l| l.contains(UPSTREAM_LINE))?;
    let at = line.find("upstream=")? + "upstream=".len();
    line[at..].split([' ', ':']).next().map(str::to_owned)
}

pub fn logs_in(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "\n===== {} ({} lines)\n",
                p.display(),
                lines.len()
            ));
            let head = lines.len().min(15);
            for l in &lines[..head] {
                out.push_str(l);
                out.push('\n');
            }
            if lines.len() > head + 25 {
                out.push_str("[...]\n");
            }
            for l in &lines[head.max(lines.len().saturating_sub(25))..] {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// A runtime for the supervisor's child processes.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Keeps a recorded MPEG-TS from its first keyframe to just before its last one (a recording
/// stopped mid-frame ends with a truncated frame, which is not a streaming error) and asks FFmpeg
/// to decode all of it; returns FFmpeg's error output (empty = clean) and the bytes kept.
pub fn decode_errors_between_keyframes(rec: &Path) -> (String, usize) {
    let data = std::fs::read(rec).unwrap();
    let keyframes: Vec<usize> = data
        .chunks(188)
        .enumerate()
        .filter(|(_, c)| common::ts::TsPacket::parse(c).is_ok_and(|p| p.random_access_indicator()))
        .map(|(i, _)| i * 188)
        .collect();
    assert!(
        keyframes.len() >= 2,
        "fewer than two keyframes in {} ({} bytes)",
        rec.display(),
        data.len()
    );
    let kept = &data[keyframes[0]..*keyframes.last().unwrap()];
    let cut = rec.with_extension("cut.ts");
    std::fs::write(&cut, kept).unwrap();
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&cut)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        kept.len(),
    )
}

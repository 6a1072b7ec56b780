//! The benchmark (`cargo run --release -p lab --bin bench`): time to first frame, delivery
//! ratio under loss, failover gap, with the real release binaries on loopback.
//!
//! Each trial starts its own overlay through the same [`Plan`]/[`Supervisor`] code as the lab,
//! runs headless clients with `--stats`, reads their JSON lines, and stops every process it
//! started, also when the trial fails (a failed trial is recorded, never a crash). Results:
//! one JSON file per run in `<out>/runs/`, a summary `<out>/RESULTS.md` and PNG plots in `<out>/`.
//!
//! Experiments use their own address blocks (`127.0.91.x` TTFF, `127.0.92.x` loss,
//! `127.0.93.x` failover) and run one after the other (the machine has 2 cores).

use crate::process::{Binaries, Supervisor};
use crate::stats::{StreamSummary, Summary};
use crate::{Media, Plan};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The channel every experiment watches (a live lavfi test pattern, encoded while watched).
const CHANNEL: &str = "live";

/// What to run and how long.
#[derive(Debug, Clone)]
pub struct Config {
    /// The short variant (3 repetitions, 15 s loss runs, 1 seed, 5 failover trials).
    pub quick: bool,
    /// Where RESULTS.md, the plots and `runs/` go.
    pub out: PathBuf,
    /// Where the processes' logs go (one folder per trial).
    pub log_dir: PathBuf,
    /// Experiments to run: `ttff`, `loss`, `loss-off` (the loss runs again with
    /// `--no-recovery` on every process, labelled `no-recovery`), `failover`, `failover-r2` (the
    /// same with `--redundancy 2` on every daemon), `catastrophic` (two deaths in a row, the
    /// second healed by the catastrophic fallback).
    pub experiments: Vec<String>,
    /// TTFF repetitions per keyframe interval.
    pub reps: usize,
    /// Keyframe intervals (s) for TTFF.
    pub keyints: Vec<f64>,
    /// Length of one loss run.
    pub loss_secs: u64,
    /// Seeds of the loss runs.
    pub seeds: Vec<u64>,
    /// Failover trials.
    pub trials: usize,
    /// Extra arguments for every client (e.g. a future `--no-recovery`).
    pub client_args: Vec<String>,
    /// Extra arguments for every server and node.
    pub daemon_args: Vec<String>,
    /// Name of this variant in the tables (e.g. `baseline`, `no-recovery`, `recovery`).
    pub label: String,
}

impl Config {
    /// Defaults of the full (`quick = false`) or short benchmark.
    pub fn new(quick: bool, out: PathBuf) -> Config {
        Config {
            quick,
            out,
            log_dir: PathBuf::from("target/bench"),
            experiments: [
                "ttff",
                "loss",
                "loss-off",
                "failover",
                "failover-r2",
                "catastrophic",
            ]
            .map(String::from)
            .to_vec(),
            reps: if quick { 3 } else { 10 },
            keyints: vec![1.0, 4.0],
            loss_secs: if quick { 15 } else { 60 },
            seeds: if quick { vec![1] } else { vec![1, 2, 3] },
            trials: if quick { 5 } else { 20 },
            client_args: vec![],
            daemon_args: vec![],
            label: "default".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and tables (unit-tested).

/// The `p`-th percentile (0–100) of `values`, linear interpolation between closest ranks (as
/// numpy's default); `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// n, p50, p95, max of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Dist {
    /// Sample size.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Largest value.
    pub max: f64,
}

impl Dist {
    /// The distribution of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Dist> {
        Some(Dist {
            n: values.len(),
            p50: percentile(values, 50.0)?,
            p95: percentile(values, 95.0)?,
            max: percentile(values, 100.0)?,
        })
    }
}

/// A Markdown table.
pub fn md_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", headers.join(" | "));
    let _ = writeln!(
        s,
        "|{}|",
        headers.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// `PASS`, `FAIL`, or `n/a` when there is nothing to judge.
pub fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "PASS".into(),
        Some(false) => "**FAIL**".into(),
        None => "n/a".into(),
    }
}

/// A failover gap: silences up to 100 ms are not reported by the client, so they read
/// "< 100 ms".
fn gap_ms(v: Option<f64>) -> String {
    match v {
        Some(g) if g <= 100.0 => "< 100 ms".into(),
        _ => ms(v),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} ms"))
}

// ---------------------------------------------------------------------------------------------
// Per-run records (one JSON file each).

/// One TTFF repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TtffRun {
    /// Variant label.
    pub label: String,
    /// Server `--keyint` (s).
    pub keyint_s: f64,
    /// Repetition.
    pub rep: usize,
    /// Whether every measurement was taken.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Client `play` → `first_packet`.
    pub req_first_packet_ms: Option<f64>,
    /// Client `play` → `first_keyframe`.
    pub req_first_keyframe_ms: Option<f64>,
    /// Client `play` → the reader (ffmpeg) decoded its first picture and exited.
    pub play_first_picture_ms: Option<f64>,
    /// Client process start → the reader exited.
    pub start_first_picture_ms: Option<f64>,
}

/// One loss run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossRun {
    /// Variant label.
    pub label: String,
    /// The condition (`--impair` without the seed), `none` for 0 %.
    pub condition: String,
    /// Nominal loss rate per link (%).
    pub loss_pct: f64,
    /// Seed.
    pub seed: u64,
    /// Measured seconds after the first packet.
    pub secs: u64,
    /// Whether the stream played.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Datagrams received (unique).
    pub packets: u64,
    /// Datagrams never received (sequence gaps).
    pub lost: u64,
    /// TS packets lost by continuity counter.
    pub cc_lost: u64,
    /// packets / (packets + lost).
    pub delivered_ratio: Option<f64>,
    /// Retransmitted datagrams received (0 until the client reports them).
    pub retransmitted: u64,
    /// retransmitted / packets (%).
    pub overhead_pct: f64,
    /// PoP changes during the run.
    pub source_changes: usize,
    /// Channels a relay moved because it declared their upstream dead (`upstream lost` lines
    /// in the nodes' logs): false failovers, since no host dies in these runs.
    pub false_failovers: usize,
}

/// One failover trial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverRun {
    /// Variant label.
    pub label: String,
    /// Trial.
    pub trial: usize,
    /// Whether the trial ran to its end (kill done, outcome observed).
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// `--redundancy` of the daemons (1: plain failover; 2: a second path already flows).
    pub redundancy: u8,
    /// `square` (one relay killed; also the runs written before this field existed) or
    /// `catastrophic` (the relay in use killed, then the one that took over: the gap measured is
    /// the second one's).
    #[serde(default = "square")]
    pub scenario: String,
    /// The relay killed.
    pub killed: Option<String>,
    /// Whether the stream came back (100 more datagrams within 20 s).
    pub recovered: bool,
    /// Longest silence ending after the kill (ms); `None` if none exceeded 100 ms.
    pub gap_ms: Option<f64>,
    /// Datagrams lost from the kill to the end of the trial.
    pub lost: u64,
}

fn square() -> String {
    "square".into()
}

// ---------------------------------------------------------------------------------------------
// One overlay per trial.

/// An overlay of one trial: its supervisor and plan. Always [`Lab::stop`] it.
struct Lab {
    sup: Supervisor,
    plan: Plan,
    bins: Binaries,
    dir: PathBuf,
    client_args: Vec<String>,
}

impl Lab {
    /// Writes the topology into a fresh `dir` (no process started yet).
    fn new(
        bins: &Binaries,
        cfg: &Config,
        dir: PathBuf,
        topology: &str,
        server: &str,
        pop: &str,
    ) -> anyhow::Result<Lab> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let topo = dir.join("topology.toml");
        std::fs::write(&topo, topology)?;
        let plan = Plan::new(topo, vec![server.parse()?], vec![pop.parse()?], None, 8010)?;
        Ok(Lab {
            sup: Supervisor::new(dir.join("logs"))?,
            plan,
            bins: bins.clone(),
            dir,
            client_args: cfg.client_args.clone(),
        })
    }

    /// Starts the bootstrapper, the server (a live test channel) and the nodes; `impair` gives
    /// each host's `--impair`; `extra` goes to every daemon.
    async fn start(
        &mut self,
        server_extra: &[String],
        extra: &[String],
        impair: impl Fn(usize, IpAddr) -> Option<String>,
    ) -> anyhow::Result<()> {
        let media = Media {
            videos: None,
            sources: vec![format!("{CHANNEL}={}", crate::DEMO_SOURCE)],
        };
        self.sup.spawn(
            "bootstrapper",
            self.bins.path("bootstrapper"),
            crate::bootstrapper_args(&self.plan),
        )?;
        crate::wait_for_tcp(self.plan.bootstrapper, Duration::from_secs(20)).await?;
        let mut i = 0;
        for ip in self.plan.servers.clone() {
            let mut a = crate::server_args(&self.plan, ip, &media, impair(i, ip).as_deref());
            a.extend(server_extra.iter().chain(extra).map(OsString::from));
            self.sup.spawn(
                &crate::process_name("server", ip),
                self.bins.path("server"),
                a,
            )?;
            i += 1;
        }
        for ip in self.plan.nodes.clone() {
            let mut a = crate::host_args(&self.plan, ip, impair(i, ip).as_deref());
            a.extend(extra.iter().map(OsString::from));
            self.sup
                .spawn(&crate::process_name("node", ip), self.bins.path("node"), a)?;
            i += 1;
        }
        // Let the floods build the routes before a client asks.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(())
    }

    /// Starts a headless client watching the channel at the plan's PoP; returns its stats file.
    fn client(&mut self, name: &str, extra: &[String]) -> anyhow::Result<PathBuf> {
        let stats = self.dir.join(format!("{name}-stats.jsonl"));
        let pops: Vec<String> = self.plan.pops.iter().map(|p| p.to_string()).collect();
        let mut a = crate::headless_client_args(&pops, &stats);
        a.extend(["--stream".into(), CHANNEL.into()]);
        a.extend(extra.iter().chain(&self.client_args).map(OsString::from));
        self.sup.spawn(name, self.bins.path("client"), a)?;
        Ok(stats)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.sup.log_path(name)).unwrap_or_default()
    }

    async fn stop(mut self) {
        self.sup.stop_all(Duration::from_secs(3)).await;
    }
}

/// Polls the stats file until `pred` holds on the channel's summary, up to `within`.
async fn wait_stream(
    stats: &Path,
    within: Duration,
    pred: impl Fn(&StreamSummary) -> bool,
) -> Option<StreamSummary> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = Summary::load(stats).streams.get(CHANNEL) {
            if pred(s) {
                return Some(s.clone());
            }
        }
        if t0.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stream_now(stats: &Path) -> StreamSummary {
    Summary::load(stats)
        .streams
        .get(CHANNEL)
        .cloned()
        .unwrap_or_default()
}

fn save<T: Serialize>(out: &Path, name: &str, run: &T) {
    let dir = out.join("runs");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}.json"));
    match serde_json::to_string_pretty(run) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&path, text) {
                warn!(path = %path.display(), error = %e, "cannot write a run result");
            }
        }
        Err(e) => warn!(error = %e, "cannot serialise a run result"),
    }
}

/// Whether something listens on UDP `port` (IPv4), from `/proc/net/udp`.
fn udp_bound(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/udp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&suffix))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Experiment 1: time to first frame.

const LINE_TOPOLOGY: &str = r#"
"127.0.B.1" = ["127.0.B.2"]
"127.0.B.2" = ["127.0.B.1", "127.0.B.3"]
"127.0.B.3" = ["127.0.B.2", "127.0.B.4"]
"127.0.B.4" = ["127.0.B.3"]
"#;

fn block(topology: &str, b: u8) -> String {
    topology.replace(".B.", &format!(".{b}."))
}

/// TTFF for one keyframe interval: one overlay (server, two relays, PoP), a resident client
/// keeping the channel flowing to the PoP (a warm channel, the case a GOP cache speeds up), then
/// `reps` times: an ffmpeg reader on a UDP port, a new client with `--output` to it.
async fn ttff(cfg: &Config, bins: &Binaries, keyint: f64) -> Vec<TtffRun> {
    let tag = format!("ttff-k{keyint}");
    let mut lab = match Lab::new(
        bins,
        cfg,
        cfg.log_dir.join(&tag),
        &block(LINE_TOPOLOGY, 91),
        "127.0.91.1",
        "127.0.91.4",
    ) {
        Ok(l) => l,
        Err(e) => return vec![failed_ttff(cfg, keyint, 0, &e)],
    };
    let runs = ttff_body(cfg, &mut lab, keyint).await;
    lab.stop().await;
    let runs = runs.unwrap_or_else(|e| vec![failed_ttff(cfg, keyint, 0, &e)]);
    for r in &runs {
        save(&cfg.out, &format!("{tag}-{}-{}", cfg.label, r.rep), r);
    }
    runs
}

fn failed_ttff(cfg: &Config, keyint: f64, rep: usize, e: &anyhow::Error) -> TtffRun {
    warn!(keyint, rep, error = %format!("{e:#}"), "TTFF run failed");
    TtffRun {
        label: cfg.label.clone(),
        keyint_s: keyint,
        rep,
        ok: false,
        error: Some(format!("{e:#}")),
        req_first_packet_ms: None,
        req_first_keyframe_ms: None,
        play_first_picture_ms: None,
        start_first_picture_ms: None,
    }
}

async fn ttff_body(cfg: &Config, lab: &mut Lab, keyint: f64) -> anyhow::Result<Vec<TtffRun>> {
    lab.start(
        &["--keyint".into(), keyint.to_string()],
        &cfg.daemon_args,
        |_, _| None,
    )
    .await?;
    let resident = lab.client("resident", &[])?;
    wait_stream(&resident, Duration::from_secs(60), |s| s.packets > 100)
        .await
        .context("the resident client got no stream within 60 s")?;
    let mut runs = Vec::new();
    for rep in 0..cfg.reps {
        let r = ttff_rep(lab, keyint, rep).await;
        let run = match r {
            Ok(mut run) => {
                run.label = cfg.label.clone();
                run
            }
            Err(e) => failed_ttff(cfg, keyint, rep, &e),
        };
        info!(?run, "TTFF");
        runs.push(run);
        // Let the next repetition start at a random point of the GOP.
        tokio::time::sleep(Duration::from_millis(300 + 137 * rep as u64 % 700)).await;
    }
    Ok(runs)
}

async fn ttff_rep(lab: &mut Lab, keyint: f64, rep: usize) -> anyhow::Result<TtffRun> {
    let port = 19_000 + (keyint as u16) * 100 + rep as u16;
    let reader = format!("reader-{rep}");
    let client = format!("client-{rep}");
    // The player stand-in: decodes one picture from the client's UDP output, then exits.
    let args: Vec<OsString> = [
        "-hide_banner",
        "-loglevel",
        "error",
        "-threads",
        "1",
        "-probesize",
        "32768",
        "-analyzeduration",
        "0",
        "-i",
        &format!("udp://127.0.0.1:{port}"),
        "-frames:v",
        "1",
        "-f",
        "null",
        "-",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    lab.sup.spawn(&reader, PathBuf::from("ffmpeg"), args)?;
    let t = Instant::now();
    while !udp_bound(port) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(5),
            "ffmpeg did not bind UDP {port}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let stats = lab.client(
        &client,
        &["--output".into(), format!("udp://127.0.0.1:{port}")],
    )?;
    let mut picture = None;
    while t0.elapsed() < Duration::from_secs(20) {
        let done = lab.sup.exited();
        if let Some((_, status)) = done.iter().find(|(n, _)| *n == reader) {
            anyhow::ensure!(status.success(), "ffmpeg reader failed: {status}");
            picture = Some(t0.elapsed());
            break;
        }
        anyhow::ensure!(!done.iter().any(|(n, _)| *n == client), "the client exited");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let s = wait_stream(&stats, Duration::from_secs(3), |s| {
        s.first_keyframe_ms.is_some()
    })
    .await
    .unwrap_or_else(|| stream_now(&stats));
    lab.sup.stop(&client, Duration::from_secs(2)).await?;
    lab.sup.stop(&reader, Duration::from_secs(1)).await?;
    let since_play = |t: Option<u64>| s.play_ms.zip(t).map(|(p, t)| t.saturating_sub(p) as f64);
    let pic_ms = picture.map(|d| d.as_secs_f64() * 1e3);
    let play_pic = s.play_ms.zip(pic_ms).map(|(p, t)| t - p as f64);
    let mut missing = Vec::new();
    if s.first_packet_ms.is_none() {
        missing.push("first packet");
    }
    if s.first_keyframe_ms.is_none() {
        missing.push("first keyframe");
    }
    if play_pic.is_none() {
        missing.push("first picture within 20 s");
    }
    Ok(TtffRun {
        label: String::new(),
        keyint_s: keyint,
        rep,
        ok: missing.is_empty(),
        error: (!missing.is_empty()).then(|| format!("missing: {}", missing.join(", "))),
        req_first_packet_ms: since_play(s.first_packet_ms),
        req_first_keyframe_ms: since_play(s.first_keyframe_ms),
        play_first_picture_ms: play_pic,
        start_first_picture_ms: pic_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// Experiment 2: delivery ratio vs loss.

/// The loss conditions: (label, nominal %, impair spec without seed).
pub fn loss_conditions() -> Vec<(String, f64, Option<String>)> {
    vec![
        ("0 %".into(), 0.0, None),
        ("1 %".into(), 1.0, Some("loss=1%".into())),
        ("5 %".into(), 5.0, Some("loss=5%".into())),
        ("10 %".into(), 10.0, Some("loss=10%".into())),
        (
            "1 %, bursts of 2".into(),
            1.0,
            Some("loss=1%,burst=2".into()),
        ),
    ]
}

async fn loss_run(
    cfg: &Config,
    bins: &Binaries,
    cond: &(String, f64, Option<String>),
    seed: u64,
) -> LossRun {
    let (name, pct, spec) = cond;
    let slug: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let tag = format!("loss-{slug}-s{seed}-{}", cfg.label);
    let mut run = LossRun {
        label: cfg.label.clone(),
        condition: spec.clone().unwrap_or_else(|| "none".into()),
        loss_pct: *pct,
        seed,
        secs: cfg.loss_secs,
        ok: false,
        error: None,
        packets: 0,
        lost: 0,
        cc_lost: 0,
        delivered_ratio: None,
        retransmitted: 0,
        overhead_pct: 0.0,
        source_changes: 0,
        false_failovers: 0,
    };
    let r: anyhow::Result<(StreamSummary, usize)> = async {
        let mut lab = Lab::new(
            bins,
            cfg,
            cfg.log_dir.join(&tag),
            &block(LINE_TOPOLOGY, 92),
            "127.0.92.1",
            "127.0.92.4",
        )?;
        // Every host gets its own seed, so the links lose different datagrams.
        let spec_for = |i: usize| {
            spec.as_ref()
                .map(|s| format!("{s},seed={}", seed * 100 + i as u64))
        };
        let body = async {
            lab.start(&[], &cfg.daemon_args, |i, _| spec_for(i)).await?;
            let extra: Vec<String> = spec_for(99)
                .map(|s| vec!["--impair".into(), s])
                .unwrap_or_default();
            let stats = lab.client("client", &extra)?;
            wait_stream(&stats, Duration::from_secs(60), |s| {
                s.first_packet_ms.is_some()
            })
            .await
            .context("no first packet within 60 s")?;
            tokio::time::sleep(Duration::from_secs(cfg.loss_secs)).await;
            // The last `stats` line is at most 1 s old.
            let downs = lab
                .plan
                .nodes
                .iter()
                .map(|ip| {
                    lab.log(&crate::process_name("node", *ip))
                        .matches("upstream lost")
                        .count()
                })
                .sum::<usize>();
            Ok::<_, anyhow::Error>((stream_now(&stats), downs))
        }
        .await;
        lab.stop().await;
        body
    }
    .await;
    match r {
        Ok((s, downs)) => {
            run.false_failovers = downs;
            run.packets = s.packets;
            run.lost = s.lost;
            run.cc_lost = s.cc_lost;
            run.source_changes = s.source_changes.len();
            run.retransmitted = s.retransmitted.unwrap_or(0);
            if s.packets + s.lost > 0 {
                run.ok = true;
                run.delivered_ratio = Some(s.packets as f64 / (s.packets + s.lost) as f64);
                run.overhead_pct = 100.0 * run.retransmitted as f64 / s.packets.max(1) as f64;
            } else {
                run.error = Some("no stats line with counters".into());
            }
        }
        Err(e) => run.error = Some(format!("{e:#}")),
    }
    info!(?run, "loss run");
    save(&cfg.out, &tag, &run);
    run
}

// ---------------------------------------------------------------------------------------------
// Experiment 3: failover gap.

const SQUARE_TOPOLOGY: &str = r#"
"127.0.93.1" = ["127.0.93.2", "127.0.93.3"]
"127.0.93.2" = ["127.0.93.1", "127.0.93.4"]
"127.0.93.3" = ["127.0.93.1", "127.0.93.4"]
"127.0.93.4" = ["127.0.93.2", "127.0.93.3"]
"#;

/// The default topology's shape (`topologies/neighbours.toml`): S1 – N1 – {N2, N3} – N4.
const CATASTROPHIC_TOPOLOGY: &str = r#"
"127.0.94.1" = ["127.0.94.2"]
"127.0.94.2" = ["127.0.94.1", "127.0.94.3", "127.0.94.4"]
"127.0.94.3" = ["127.0.94.2", "127.0.94.5"]
"127.0.94.4" = ["127.0.94.2", "127.0.94.5"]
"127.0.94.5" = ["127.0.94.3", "127.0.94.4"]
"#;

/// The log line a node writes when it subscribes upstream (names `upstream=IP:PORT`).
const UPSTREAM_LINE: &str = ": subscribe upstream";

/// The upstream named by the latest subscription line of a node's log.
pub fn upstream_of(log: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains(UPSTREAM_LINE))?;
    let at = line.find("upstream=")? + "upstream=".len();
    line[at..].split([' ', ':']).next().map(str::to_owned)
}

/// The relay `pop` (a node's IP) takes the channel from now, read from its log: one of `relays`.
fn pop_upstream(lab: &Lab, pop: &str, relays: &[&str]) -> anyhow::Result<String> {
    let name = crate::process_name("node", pop.parse()?);
    let relay = upstream_of(&lab.log(&name)).context("no upstream in the PoP's log")?;
    anyhow::ensure!(
        relays.contains(&relay.as_str()),
        "the PoP's upstream is {relay}, not one of {relays:?}"
    );
    Ok(relay)
}

/// One failover trial: `scenario` `square` (kill the relay the PoP's channel comes through) or
/// `catastrophic` (S1 – N1 – {N2, N3} – N4: kill the relay in use, wait for the stream to come
/// back through the other, kill that one too: N4 is left with no neighbour that has a route and
/// falls back to the dead relay's parent N1; the second death's gap is measured).
async fn failover_trial(
    cfg: &Config,
    bins: &Binaries,
    trial: usize,
    redundancy: u8,
    scenario: &str,
) -> FailoverRun {
    let catastrophic = scenario == "catastrophic";
    let tag = if catastrophic {
        format!("failover-catastrophic-{trial}")
    } else {
        format!("failover-r{redundancy}-{trial}")
    };
    let mut daemon_args = cfg.daemon_args.clone();
    if redundancy > 1 {
        daemon_args.extend(["--redundancy".into(), redundancy.to_string()]);
    }
    let mut run = FailoverRun {
        label: cfg.label.clone(),
        trial,
        redundancy,
        scenario: scenario.into(),
        ok: false,
        error: None,
        killed: None,
        recovered: false,
        gap_ms: None,
        lost: 0,
    };
    let r: anyhow::Result<()> = async {
        let (topology, p) = if catastrophic {
            (CATASTROPHIC_TOPOLOGY, "127.0.94")
        } else {
            (SQUARE_TOPOLOGY, "127.0.93")
        };
        let pop = format!("{p}.{}", if catastrophic { 5 } else { 4 });
        let relays = if catastrophic {
            [format!("{p}.3"), format!("{p}.4")]
        } else {
            [format!("{p}.2"), format!("{p}.3")]
        };
        let relays: Vec<&str> = relays.iter().map(String::as_str).collect();
        let mut lab = Lab::new(
            bins,
            cfg,
            cfg.log_dir.join(&tag),
            topology,
            &format!("{p}.1"),
            &pop,
        )?;
        let body = async {
            lab.start(&[], &daemon_args, |_, _| None).await?;
            let t_client = Instant::now();
            let stats = lab.client("client", &[])?;
            wait_stream(&stats, Duration::from_secs(60), |s| s.packets > 100)
                .await
                .context("no stream within 60 s")?;
            // 1–2 s more, seeded by the trial: the live encoder starts with the first viewer,
            // so a fixed delay would kill at the same point of the GOP in every trial.
            let phase = common::rng::Rng::seeded(trial as u64 + 1).below(1000);
            tokio::time::sleep(Duration::from_millis(1000 + phase)).await;
            let mut relay = pop_upstream(&lab, &pop, &relays)?;
            if catastrophic {
                // The first death: a plain failover to the other relay.
                lab.sup
                    .kill(&crate::process_name("node", relay.parse()?))
                    .await?;
                let first = relay.clone();
                let before = stream_now(&stats);
                wait_stream(&stats, Duration::from_secs(20), |s| {
                    s.packets > before.packets + 100
                })
                .await
                .context("no stream after the first death")?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                relay = pop_upstream(&lab, &pop, &relays)?;
                anyhow::ensure!(relay != first, "the PoP still names the dead relay");
                run.killed = Some(format!("{first}, then "));
            }
            let before = stream_now(&stats);
            let kill_ms = t_client.elapsed().as_millis() as u64;
            lab.sup
                .kill(&crate::process_name("node", relay.parse()?))
                .await?;
            run.killed = Some(run.killed.take().unwrap_or_default() + &relay);
            let recovered = wait_stream(&stats, Duration::from_secs(20), |s| {
                s.packets > before.packets + 100
            })
            .await;
            run.recovered = recovered.is_some();
            // One more `stats` line for the final lost count.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let after = stream_now(&stats);
            run.lost = after.lost.saturating_sub(before.lost);
            // Gap ends are in the client's clock (t_ms from its start), kill_ms in ours (from
            // its spawn): the client starts up to a few hundred ms after its spawn, so a gap
            // ending up to 500 ms "before" the kill in our clock may still be the failover's
            // (a steady loopback stream has no other silence over 100 ms).
            run.gap_ms = after
                .gaps
                .iter()
                .filter(|(end, _)| *end + 500 >= kill_ms)
                .map(|(_, g)| *g)
                .reduce(f64::max);
            if !run.recovered {
                // Still silent: the gap is at least the time since the kill.
                run.gap_ms = Some(t_client.elapsed().as_millis() as f64 - kill_ms as f64);
            }
            Ok(())
        }
        .await;
        lab.stop().await;
        body
    }
    .await;
    match r {
        Ok(()) => run.ok = true,
        Err(e) => run.error = Some(format!("{e:#}")),
    }
    info!(?run, "failover trial");
    save(&cfg.out, &format!("{tag}-{}", cfg.label), &run);
    run
}

// ---------------------------------------------------------------------------------------------
// Runner and report.

/// Everything measured by one invocation.
#[derive(Debug, Default)]
pub struct Results {
    /// TTFF repetitions.
    pub ttff: Vec<TtffRun>,
    /// Loss runs.
    pub loss: Vec<LossRun>,
    /// Failover trials.
    pub failover: Vec<FailoverRun>,
}

/// Reads the per-run JSON files of an earlier run from `<out>/runs/` (no process started) and
/// writes RESULTS.md and the plots again (e.g. after a change to the tables or plots). `cfg`
/// should carry the flags of that run (`--quick`, `--label`); a file that does not parse is
/// skipped with a warning.
pub fn replot(cfg: &Config) -> anyhow::Result<Results> {
    fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "not a run result; skipped");
                None
            }
        }
    }
    let dir = cfg.out.join("runs");
    let mut res = Results::default();
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !name.ends_with(".json") {
            continue;
        }
        if name.starts_with("ttff-") {
            res.ttff.extend(load::<TtffRun>(&path));
        } else if name.starts_with("loss-") {
            res.loss.extend(load::<LossRun>(&path));
        } else if name.starts_with("failover-") {
            res.failover.extend(load::<FailoverRun>(&path));
        }
    }
    let conds: Vec<String> = loss_conditions()
        .into_iter()
        .map(|(_, _, spec)| spec.unwrap_or_else(|| "none".into()))
        .collect();
    let cond_index = |c: &str| conds.iter().position(|x| x == c).unwrap_or(usize::MAX);
    res.ttff.sort_by(|a, b| {
        (a.keyint_s, a.rep)
            .partial_cmp(&(b.keyint_s, b.rep))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    // The protected variant first, as the runner does.
    res.loss.sort_by_key(|r| {
        (
            r.label == "no-recovery",
            r.label.clone(),
            cond_index(&r.condition),
            r.seed,
        )
    });
    res.failover
        .sort_by_key(|r| (r.scenario != "square", r.redundancy, r.trial));
    let mut cfg = cfg.clone();
    if let Some(r) = res.loss.first() {
        cfg.loss_secs = r.secs;
    }
    let mut keyints: Vec<f64> = res.ttff.iter().map(|r| r.keyint_s).collect();
    keyints.dedup();
    if !keyints.is_empty() {
        cfg.keyints = keyints;
    }
    write_report(&cfg, &res)?;
    Ok(res)
}

/// Writes RESULTS.md and the plots of `res` into `cfg.out`.
fn write_report(cfg: &Config, res: &Results) -> anyhow::Result<()> {
    let md = render_results(cfg, res);
    std::fs::write(cfg.out.join("RESULTS.md"), md)?;
    if let Err(e) = crate::bench_plots::all(&cfg.out, res) {
        warn!(error = %format!("{e:#}"), "plots failed");
    }
    Ok(())
}

/// Runs the configured experiments, one after the other, and writes the report.
pub async fn run(cfg: &Config, bins: &Binaries) -> anyhow::Result<Results> {
    std::fs::create_dir_all(cfg.out.join("runs"))?;
    let mut res = Results::default();
    let want = |e: &str| cfg.experiments.iter().any(|x| x == e);
    if want("ttff") {
        for k in &cfg.keyints {
            info!(keyint = k, "experiment: time to first frame");
            res.ttff.extend(ttff(cfg, bins, *k).await);
        }
    }
    let mut off = cfg.clone();
    off.label = "no-recovery".into();
    off.client_args.push("--no-recovery".into());
    off.daemon_args.push("--no-recovery".into());
    for (name, variant) in [("loss", cfg), ("loss-off", &off)] {
        if !want(name) {
            continue;
        }
        for cond in loss_conditions() {
            for seed in &variant.seeds {
                info!(condition = %cond.0, seed, label = %variant.label, "experiment: delivery under loss");
                res.loss.push(loss_run(variant, bins, &cond, *seed).await);
            }
        }
    }
    for (name, redundancy, scenario) in [
        ("failover", 1, "square"),
        ("failover-r2", 2, "square"),
        ("catastrophic", 1, "catastrophic"),
    ] {
        if want(name) {
            for t in 0..cfg.trials {
                info!(trial = t, redundancy, scenario, "experiment: failover");
                res.failover
                    .push(failover_trial(cfg, bins, t, redundancy, scenario).await);
            }
        }
    }
    write_report(cfg, &res)?;
    Ok(res)
}

/// Whether a distribution meets a goal.
type Judge = fn(&Dist) -> bool;

/// A TTFF metric: name, value of a run, goal text, judgement.
type Metric = (
    &'static str,
    fn(&TtffRun) -> Option<f64>,
    &'static str,
    Option<Judge>,
);

fn ttff_metrics() -> [Metric; 3] {
    [
        (
            "request → first packet",
            |r| r.req_first_packet_ms,
            "—",
            None,
        ),
        (
            "request → first keyframe",
            |r| r.req_first_keyframe_ms,
            "≤ 50 ms (p95)",
            Some(|d| d.p95 <= 50.0),
        ),
        (
            "Play → first picture",
            |r| r.play_first_picture_ms,
            "≤ 300 ms p50, ≤ 500 ms p95",
            Some(|d| d.p50 <= 300.0 && d.p95 <= 500.0),
        ),
    ]
}

/// Goal per loss condition label: minimum delivered ratio.
fn loss_goal(condition: &str) -> Option<f64> {
    match condition {
        "loss=5%" => Some(0.999),
        "loss=10%" => Some(0.99),
        "loss=1%,burst=2" => Some(1.0),
        _ => None,
    }
}

/// Aggregates of the loss runs per (label, condition): (label, condition, runs).
pub fn loss_groups(runs: &[LossRun]) -> Vec<(String, String, Vec<&LossRun>)> {
    let mut out: Vec<(String, String, Vec<&LossRun>)> = Vec::new();
    for r in runs {
        match out
            .iter_mut()
            .find(|(l, c, _)| *l == r.label && *c == r.condition)
        {
            Some(g) => g.2.push(r),
            None => out.push((r.label.clone(), r.condition.clone(), vec![r])),
        }
    }
    out
}

/// RESULTS.md.
pub fn render_results(cfg: &Config, res: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark results\n");
    let _ = writeln!(
        s,
        "Produced by `cargo run --release -p lab --bin bench --{}` (variant `{}`), on {} CPU(s); \
         every process of the overlay runs on this one machine over loopback. Method and caveats: \
         README, section *Benchmarks*; raw runs: `runs/` (not committed).\n",
        if cfg.quick { " --quick" } else { "" },
        cfg.label,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    if !res.ttff.is_empty() {
        let _ = writeln!(
            s,
            "## Time to first frame\n\nServer → relay → relay → PoP → client (`127.0.91.x`), a \
             resident client keeps the channel flowing to the PoP (warm channel); each repetition \
             starts a new client with `--output udp://…` read by `ffmpeg -frames:v 1` (the \
             player stand-in). `request` = the client's `play` event (Subscribe sent).\n"
        );
        let mut rows = Vec::new();
        for k in &cfg.keyints {
            let runs: Vec<&TtffRun> = res.ttff.iter().filter(|r| r.keyint_s == *k).collect();
            for (name, get, goal, judge) in ttff_metrics() {
                let v: Vec<f64> = runs.iter().filter_map(|r| get(r)).collect();
                let d = Dist::of(&v);
                rows.push(vec![
                    format!("{k} s"),
                    name.to_owned(),
                    format!("{}/{}", v.len(), runs.len()),
                    ms(d.map(|d| d.p50)),
                    ms(d.map(|d| d.p95)),
                    ms(d.map(|d| d.max)),
                    goal.to_owned(),
                    match judge {
                        Some(j) => verdict(d.map(|d| j(&d))),
                        None => "—".into(),
                    },
                ]);
            }
        }
        s += &md_table(
            &[
                "keyint", "metric", "n", "p50", "p95", "max", "goal", "result",
            ],
            &rows,
        );
        s.push('\n');
    }
    if !res.loss.is_empty() {
        let _ = writeln!(
            s,
            "## Delivery ratio under loss\n\nServer → relay → relay → PoP → client \
             (`127.0.92.x`), `--impair` on every send path (server, nodes, client), {} s per run \
             after the first packet. Delivered = datagrams received / (received + lost), where \
             lost = sequence numbers the client's jitter buffer had to skip (never received, or \
             too late for its latency budget; the server numbers every datagram). Variants with \
             `--no-recovery` show what the same impairment costs without per-hop NACKs. False \
             failovers: `upstream lost` lines in the relays' logs (a channel moved because its \
             upstream was declared dead), summed over the runs; no host dies in these runs, so \
             every one would be false.\n",
            cfg.loss_secs
        );
        let mut rows = Vec::new();
        for (label, cond, runs) in loss_groups(&res.loss) {
            let ok: Vec<&&LossRun> = runs.iter().filter(|r| r.ok).collect();
            let ratios: Vec<f64> = ok.iter().filter_map(|r| r.delivered_ratio).collect();
            let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            let ratio = mean(&ratios);
            let min = ratios.iter().copied().reduce(f64::min);
            let lost: Vec<f64> = ok.iter().map(|r| r.lost as f64).collect();
            let cc: Vec<f64> = ok.iter().map(|r| r.cc_lost as f64).collect();
            let over: Vec<f64> = ok.iter().map(|r| r.overhead_pct).collect();
            let downs: usize = ok.iter().map(|r| r.false_failovers).sum();
            let goal = loss_goal(&cond);
            let reference = label == "no-recovery";
            rows.push(vec![
                cond.clone(),
                label,
                format!("{}/{}", ok.len(), runs.len()),
                ratio.map_or("-".into(), |r| format!("{:.3} %", r * 100.0)),
                min.map_or("-".into(), |r| format!("{:.3} %", r * 100.0)),
                mean(&lost).map_or("-".into(), |v| format!("{v:.0}")),
                mean(&cc).map_or("-".into(), |v| format!("{v:.0}")),
                mean(&over).map_or("-".into(), |v| format!("{v:.2} %")),
                downs.to_string(),
                goal.map_or("—".into(), |g| format!("≥ {} %", g * 100.0)),
                match goal {
                    // The unprotected run is the reference the goal is not meant for.
                    Some(_) if reference => "(reference)".into(),
                    Some(g) => verdict(min.map(|m| m >= g)),
                    None => "—".into(),
                },
            ]);
        }
        s += &md_table(
            &[
                "impairment (per link)",
                "variant",
                "runs ok",
                "delivered (mean)",
                "delivered (worst run)",
                "lost datagrams (mean)",
                "TS packets lost by CC (mean)",
                "retransmission overhead",
                "false failovers (all runs)",
                "goal",
                "result",
            ],
            &rows,
        );
        s.push('\n');
    }
    if !res.failover.is_empty() {
        let _ = writeln!(
            s,
            "## Failover gap\n\nSquare (`127.0.93.x`): server S, relays A and B, PoP C, client on \
             C. Each trial starts a fresh overlay, kills (SIGKILL) the relay the PoP subscribed \
             through 1–2 s after the stream started (a different point of the GOP in each \
             trial), and measures the longest silence in the datagrams *arriving* at the client \
             that ends after the kill (the client's `gap` events, > 100 ms; none = under 100 ms, \
             counted as 100 ms), and the datagrams lost for the viewer (skipped by its jitter \
             buffer). The player is fed through the 200 ms jitter buffer, so an arrival gap \
             whose datagrams come later (from the new upstream's GOP cache) within the budget \
             is not seen at all. Redundancy 1: the PoP detects the dead relay (25 ms \
             heartbeats to the upstream in use, dead after 150 ms) and resubscribes at the \
             other. Redundancy 2 (`--redundancy 2` on the daemons): the PoP already receives \
             the channel through both relays and merges them by sequence number.\n\n\
             Catastrophic (`127.0.94.x`, the default topology's shape S1 – N1 – {{N2, N3}} – N4, \
             client on N4): the relay N4 takes the channel from is killed, the stream comes \
             back through the other one, which is killed in turn: no neighbour of N4 has a \
             route any more, and N4 falls back to the dead relay's parent N1, learned from the \
             floods (the *catastrophic fallback*). The gap is the second death's.\n"
        );
        let mut rows = Vec::new();
        for (scenario, redundancy) in [("square", 1u8), ("square", 2), ("catastrophic", 1)] {
            let all: Vec<&FailoverRun> = res
                .failover
                .iter()
                .filter(|r| r.redundancy == redundancy && r.scenario == scenario)
                .collect();
            if all.is_empty() {
                continue;
            }
            let ok: Vec<&&FailoverRun> = all.iter().filter(|r| r.ok).collect();
            let gaps: Vec<f64> = ok.iter().map(|r| r.gap_ms.unwrap_or(100.0)).collect();
            let d = Dist::of(&gaps);
            let lost: Vec<f64> = ok.iter().map(|r| r.lost as f64).collect();
            let ld = Dist::of(&lost);
            let recovered = ok.iter().filter(|r| r.recovered).count();
            let all_recovered = !ok.is_empty() && recovered == all.len();
            let (goal, pass) = if scenario == "catastrophic" {
                (
                    "≤ 300 ms (p95), all recover",
                    d.map(|d| d.p95 <= 300.0 && all_recovered),
                )
            } else if redundancy == 1 {
                (
                    "≤ 200 ms (p95), all recover",
                    d.map(|d| d.p95 <= 200.0 && all_recovered),
                )
            } else {
                (
                    "0 lost, all recover",
                    ld.map(|l| l.max == 0.0 && all_recovered),
                )
            };
            rows.push(vec![
                scenario.into(),
                redundancy.to_string(),
                format!("{}/{}", ok.len(), all.len()),
                format!("{recovered}/{}", ok.len()),
                gap_ms(d.map(|d| d.p50)),
                gap_ms(d.map(|d| d.p95)),
                gap_ms(d.map(|d| d.max)),
                ld.map_or("-".into(), |d| format!("{:.0} / {:.0}", d.p50, d.max)),
                goal.into(),
                verdict(pass),
            ]);
        }
        s += &md_table(
            &[
                "scenario",
                "redundancy",
                "trials ok",
                "recovered",
                "gap p50",
                "gap p95",
                "gap max",
                "lost datagrams p50 / max",
                "goal",
                "result",
            ],
            &rows,
        );
        s.push('\n');
        let rows: Vec<Vec<String>> = res
            .failover
            .iter()
            .map(|r| {
                vec![
                    r.scenario.clone(),
                    r.redundancy.to_string(),
                    r.trial.to_string(),
                    r.killed.clone().unwrap_or("-".into()),
                    if r.ok {
                        r.gap_ms.map_or("< 100 ms".into(), |g| format!("{g:.0} ms"))
                    } else {
                        "-".into()
                    },
                    r.recovered.to_string(),
                    r.lost.to_string(),
                    r.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        s += &md_table(
            &[
                "scenario",
                "redundancy",
                "trial",
                "killed",
                "gap",
                "recovered",
                "lost",
                "error",
            ],
            &rows,
        );
        s.push('\n');
    }
    let failed: Vec<String> = res
        .ttff
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            format!(
                "TTFF keyint {} s rep {}: {}",
                r.keyint_s,
                r.rep,
                r.error.clone().unwrap_or_default()
            )
        })
        .chain(res.loss.iter().filter(|r| !r.ok).map(|r| {
            format!(
                "loss {} seed {}: {}",
                r.condition,
                r.seed,
                r.error.clone().unwrap_or_default()
            )
        }))
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "## Failed runs\n");
        for f in failed {
            let _ = writeln!(s, "- {f}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Plots: `ttff.png`, `delivery.png`, `failover.png`, `overhead.png`."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        let p95 = percentile(&v, 95.0).unwrap();
        assert!((p95 - 3.85).abs() < 1e-9, "{p95}");
        let d = Dist::of(&(1..=20).map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!((d.n, d.p50, d.max), (20, 10.5, 20.0));
        assert!((d.p95 - 19.05).abs() < 1e-9);
    }

    #[test]
    fn tables_and_verdicts_render() {
        let t = md_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
        assert_eq!(verdict(Some(true)), "PASS");
        assert_eq!(verdict(Some(false)), "**FAIL**");
        assert_eq!(verdict(None), "n/a");
    }

    #[test]
    fn upstream_is_read_from_the_latest_subscription() {
        let log = "x: subscribe upstream channel=1 upstream=127.0.93.2:8010\n\
                   y: subscribe upstream channel=1 upstream=127.0.93.3:8010\nz: other";
        assert_eq!(upstream_of(log).as_deref(), Some("127.0.93.3"));
        assert_eq!(upstream_of("nothing"), None);
    }

    #[test]
    fn replot_reads_the_runs_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::new(true, dir.path().to_path_buf());
        let run = FailoverRun {
            label: "default".into(),
            trial: 0,
            redundancy: 2,
            scenario: square(),
            ok: true,
            error: None,
            killed: Some("127.0.93.2".into()),
            recovered: true,
            gap_ms: None,
            lost: 0,
        };
        save(dir.path(), "failover-r2-0-default", &run);
        save(
            dir.path(),
            "failover-r2-1-default",
            &FailoverRun { trial: 1, ..run },
        );
        std::fs::write(dir.path().join("runs/junk.json"), "{}").unwrap();
        std::fs::write(dir.path().join("runs/loss-broken.json"), "{").unwrap();
        let res = replot(&cfg).unwrap();
        assert_eq!(res.failover.len(), 2);
        assert!(res.loss.is_empty() && res.ttff.is_empty());
        let md = std::fs::read_to_string(dir.path().join("RESULTS.md")).unwrap();
        assert!(
            md.contains("| 2 | 2/2 | 2/2 | < 100 ms | < 100 ms | < 100 ms | 0 / 0 | 0 lost, all recover | PASS |"),
            "{md}"
        );
        assert!(dir.path().join("failover.png").exists());
    }

    #[test]
    fn results_render_goals_and_verdicts() {
        let cfg = Config::new(true, PathBuf::from("report"));
        let ttff = (0..3)
            .map(|rep| TtffRun {
                label: "baseline".into(),
                keyint_s: 1.0,
                rep,
                ok: true,
                error: None,
                req_first_packet_ms: Some(10.0),
                req_first_keyframe_ms: Some(400.0 + rep as f64),
                play_first_picture_ms: Some(200.0),
                start_first_picture_ms: Some(250.0),
            })
            .collect();
        let loss = vec![LossRun {
            label: "baseline".into(),
            condition: "loss=5%".into(),
            loss_pct: 5.0,
            seed: 1,
            secs: 15,
            ok: true,
            error: None,
            packets: 900,
            lost: 100,
            cc_lost: 700,
            delivered_ratio: Some(0.9),
            retransmitted: 0,
            overhead_pct: 0.0,
            source_changes: 0,
            false_failovers: 0,
        }];
        let plain = FailoverRun {
            label: "baseline".into(),
            trial: 0,
            redundancy: 1,
            scenario: square(),
            ok: true,
            error: None,
            killed: Some("127.0.93.2".into()),
            recovered: true,
            gap_ms: Some(250.0),
            lost: 12,
        };
        let failover = vec![
            plain.clone(),
            FailoverRun {
                redundancy: 2,
                gap_ms: None,
                lost: 3,
                ..plain
            },
        ];
        let md = render_results(
            &cfg,
            &Results {
                ttff,
                loss,
                failover,
            },
        );
        assert!(md.contains("| 1 s | request → first keyframe | 3/3 | 401 ms | 402 ms | 402 ms | ≤ 50 ms (p95) | **FAIL** |"), "{md}");
        assert!(md.contains("| 1 s | Play → first picture | 3/3 | 200 ms | 200 ms | 200 ms | ≤ 300 ms p50, ≤ 500 ms p95 | PASS |"), "{md}");
        assert!(md.contains("| loss=5% | baseline | 1/1 | 90.000 % | 90.000 % | 100 | 700 | 0.00 % | 0 | ≥ 99.9 % | **FAIL** |"), "{md}");
        assert!(
            md.contains(
                "| square | 1 | 1/1 | 1/1 | 250 ms | 250 ms | 250 ms | 12 / 12 | ≤ 200 ms (p95), all recover | **FAIL** |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| square | 2 | 1/1 | 1/1 | < 100 ms | < 100 ms | < 100 ms | 3 / 3 | 0 lost, all recover | **FAIL** |"
            ),
            "{md}"
        );
    }
}

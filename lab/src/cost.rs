//! Whole-process costs (`cargo run --release -p lab --bin cost`): CPU time and memory of the
//! real release daemons, read from `/proc/<pid>/stat` and `/proc/<pid>/status`, so the relay's
//! data path can be compared before and after a rewrite.
//!
//! Each experiment starts its own overlay of real processes with the lab's [`Plan`] and
//! [`Supervisor`], lets it settle (warm-up), then measures over a window: CPU = (utime + stime)
//! grown over the window, in clock ticks ÷ `sysconf(_SC_CLK_TCK)`, ÷ wall seconds × 100 (% of
//! one core; all threads of the process); RSS = `VmRSS` (sampled every second: the last and the
//! largest value) and `VmHWM` (the peak since the process started). Children of a daemon (the
//! server's ffmpeg) are found by their parent pid and reported apart, approximately.
//!
//! * `idle` — the 4×5 grid (`topologies/grid4x5.toml`, moved to `127.0.96.x`): 20 relays, two
//!   servers with their default (live, encoded only while watched) channel, nobody watching.
//! * `watched` — one pre-encoded channel (a generated 720p clip with film-grain noise, so the
//!   encoder spends its whole budget, transcoded once by the server into its cache: ≈ 2.5 Mb/s
//!   video + 128 kb/s audio + TS) watched by one headless client through server → relay →
//!   relay → PoP (`127.0.97.x`).
//! * `memory` — ten channels (the same cached clip under ten names) watched by ten clients
//!   through server → relay → PoP (`127.0.98.x`): both relays carry ten streams.
//! * `hop` — the added latency of one hop (`crate::hop`: kernel timestamps of each datagram
//!   into the relay and of each child's copy out of it) and the relay's CPU, with 1, then 10,
//!   then 100 headless clients watching the cached clip at the relay (server → relay,
//!   `127.0.99.x`).
//! * `scale` — the 100-relay random overlay of the simulation harness
//!   (`common::topology::RandomOverlay`, seed 1: 100 relays, three servers with one channel
//!   each, 20 viewers each at its own PoP), all real processes, the 20 viewers headless
//!   clients: every process's CPU and RSS, what the viewers got, and the control traffic per
//!   link (every datagram shorter than a video datagram, counted on `lo` by a packet socket:
//!   root).
//!
//! One JSON file per run in `<out>/runs/cost-<experiment>-<label>.json`; `<out>/COST.md` is
//! rendered from every such file found, so runs with another `--label` (after a rewrite) show
//! next to the earlier ones.

use crate::bench::{md_table, percentile, verdict};
use crate::process::{Binaries, Supervisor};
use crate::stats::{Line, Summary};
use crate::{Media, Plan};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The experiments, in the order they run.
pub const EXPERIMENTS: [&str; 5] = ["idle", "watched", "memory", "hop", "scale"];

/// Goal of the issue: CPU of each idle daemon (% of a core).
pub const IDLE_GOAL_PCT: f64 = 0.2;
/// Goal: CPU of the server with one watched 3 Mb/s channel.
pub const SERVER_GOAL_PCT: f64 = 2.0;
/// Goal: CPU of each relay carrying one 3 Mb/s channel.
pub const RELAY_GOAL_PCT: f64 = 1.0;
/// Goal: RSS of a node carrying ten streams (MB, 10⁶ bytes).
pub const MEMORY_GOAL_MB: f64 = 30.0;
/// Goal: added latency per hop, median and 99th percentile (ms).
pub const HOP_GOAL_MS: (f64, f64) = (0.2, 1.0);
/// Goal: control traffic per link, as a share of a 5 Mb/s stream's bytes (%).
pub const CONTROL_GOAL_PCT: f64 = 1.0;
/// Children of the relay in the `hop` experiment, one window each.
pub const HOP_CHILDREN: [usize; 3] = [1, 10, 100];

/// Channels of the `memory` experiment.
const MEMORY_STREAMS: usize = 10;

/// What to run and how long.
#[derive(Debug, Clone)]
pub struct Config {
    /// The short variant (10 s windows).
    pub quick: bool,
    /// Where COST.md and `runs/` go.
    pub out: PathBuf,
    /// Where the processes' logs (one folder per experiment) and the generated media go.
    pub log_dir: PathBuf,
    /// Experiments to run (see [`EXPERIMENTS`]).
    pub experiments: Vec<String>,
    /// Name of this variant in the tables (e.g. `before`, `after`).
    pub label: String,
    /// Extra arguments for every server and node.
    pub daemon_args: Vec<String>,
    /// Settling time before a window (after the streams started, when any).
    pub warmup: Duration,
    /// Measurement window.
    pub window: Duration,
}

impl Config {
    /// Defaults: 10 s warm-up, 30 s windows (10 s with `quick`).
    pub fn new(quick: bool, out: PathBuf, log_dir: PathBuf) -> Config {
        Config {
            quick,
            out,
            log_dir,
            experiments: EXPERIMENTS.map(String::from).to_vec(),
            label: "default".into(),
            daemon_args: vec![],
            warmup: Duration::from_secs(10),
            window: Duration::from_secs(if quick { 10 } else { 30 }),
        }
    }
}

/// `<repo>/target/cost` (else `cost` in the current folder): the default output folder.
pub fn default_out() -> PathBuf {
    common::runtime::repo_root()
        .map(|r| r.join("target").join("cost"))
        .unwrap_or_else(|| PathBuf::from("cost"))
}

/// `<repo>/target/cost-logs` (else `cost-logs`): the default log folder.
pub fn default_log_dir() -> PathBuf {
    common::runtime::repo_root()
        .map(|r| r.join("target").join("cost-logs"))
        .unwrap_or_else(|| PathBuf::from("cost-logs"))
}

// ---------------------------------------------------------------------------------------------
// /proc (unit-tested parsers).

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat` times).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// What `/proc/<pid>/stat` says about CPU time and parentage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcStat {
    /// Parent pid.
    pub ppid: u32,
    /// utime + stime of the process (all its threads), clock ticks.
    pub ticks: u64,
    /// cutime + cstime: children it has waited for, clock ticks.
    pub child_ticks: u64,
}

/// Parses the content of `/proc/<pid>/stat` (the command name, in parentheses, may hold
/// spaces and parentheses: the fields start after the last `)`).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: n(1)? as u32,
        ticks: n(11)? + n(12)?,
        child_ticks: n(13)? + n(14)?,
    })
}

/// `/proc/<pid>/stat`, if the process exists.
pub fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Resident memory from `/proc/<pid>/status`, in kB (KiB, as the kernel writes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mem {
    /// `VmRSS`: resident now.
    pub rss_kb: u64,
    /// `VmHWM`: the largest RSS since the process started.
    pub hwm_kb: u64,
}

/// Parses the content of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Option<Mem> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Mem {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:").unwrap_or(0),
    })
}

/// `/proc/<pid>/status`, if the process exists (and is not a zombie).
pub fn read_status(pid: u32) -> Option<Mem> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// kB (KiB) → MB (10⁶ bytes).
fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

/// Every process of the machine: pid → stat (one pass over `/proc`).
fn all_stats() -> BTreeMap<u32, ProcStat> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(s) = read_stat(pid) {
            out.insert(pid, s);
        }
    }
    out
}

/// The descendants of `root` in `stats` (children, their children…).
pub fn descendants(stats: &BTreeMap<u32, ProcStat>, root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, s) in stats {
            if s.ppid == p && !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Records.

/// The cost of one process over the window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcCost {
    /// Supervisor name (`node-127.0.96.7`, `client`…).
    pub name: String,
    /// `bootstrapper`, `server`, `relay` or `client`.
    pub role: String,
    /// Its place, e.g. `hop 1`, `PoP`.
    pub note: String,
    /// Process id.
    pub pid: u32,
    /// CPU seconds (user + system) spent in the window.
    pub cpu_s: f64,
    /// `cpu_s` / window × 100: % of one core.
    pub cpu_pct: f64,
    /// Approximate CPU of its descendants (ffmpeg…) in the window, % of one core: those
    /// alive at the end (from when first seen) plus children reaped in the window (whole life).
    pub children_cpu_pct: f64,
    /// Descendants seen in the window (`pid comm`).
    pub children: Vec<String>,
    /// `VmRSS` at the end of the window (MB).
    pub rss_mb: f64,
    /// Largest `VmRSS` sampled in the window (every second).
    pub rss_max_mb: f64,
    /// `VmHWM` at the end: the peak since the process started.
    pub hwm_mb: f64,
}

/// A watched stream over the window, from its client's stats lines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRate {
    /// Channel.
    pub stream: String,
    /// Client process name.
    pub client: String,
    /// Payload (MPEG-TS) bit rate at the client over the window, Mb/s (10⁶ bit/s).
    pub mbps: Option<f64>,
    /// Datagrams played in the window.
    pub packets: u64,
    /// Datagrams lost in the window.
    pub lost: u64,
}

/// One experiment's run (one JSON file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostRun {
    /// `idle`, `watched` or `memory`.
    pub experiment: String,
    /// Variant label.
    pub label: String,
    /// Whether it was the short variant.
    pub quick: bool,
    /// When it ran (RFC 3339, UTC).
    pub recorded: String,
    /// Whether the window was measured.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Settling time before the window (s).
    pub warmup_s: f64,
    /// Window length, measured (s).
    pub window_s: f64,
    /// `sysconf(_SC_CLK_TCK)`.
    pub clk_tck: u64,
    /// `/proc/loadavg` at the start and the end of the window.
    pub loadavg: Vec<String>,
    /// What ran where.
    pub setup: String,
    /// Extra daemon arguments of the variant.
    pub daemon_args: Vec<String>,
    /// Every measured process.
    pub procs: Vec<ProcCost>,
    /// Watched streams.
    pub streams: Vec<StreamRate>,
    /// Anything worth knowing about the run.
    pub notes: Vec<String>,
    /// Per-hop latency windows (`hop` only).
    #[serde(default)]
    pub hops: Vec<HopWindow>,
    /// The same figure for a raw forwarder on the same machine (`hop` only;
    /// [`crate::hop::raw_floor`]): the floor under the relay's.
    #[serde(default)]
    pub hop_floor: Vec<HopWindow>,
    /// Control traffic per link (`scale` only).
    #[serde(default)]
    pub control: Option<ControlTraffic>,
}

/// Control traffic over the window (`scale`): bytes/s of UDP payload per directed link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlTraffic {
    /// Directed links between overlay hosts (both ends on port 8010) that carried control.
    pub overlay_links: usize,
    /// Their control bytes/s: median, 90th percentile, largest.
    pub overlay_median: f64,
    /// 90th percentile.
    pub overlay_p90: f64,
    /// Largest, and which link.
    pub overlay_max: f64,
    /// The link with the most.
    pub overlay_max_link: String,
    /// Directed links between a client and its PoP.
    pub viewer_links: usize,
    /// Their control bytes/s: median and largest.
    pub viewer_median: f64,
    /// Largest.
    pub viewer_max: f64,
    /// Datagrams the capture dropped.
    pub capture_drops: u64,
}

/// One window of the `hop` experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopWindow {
    /// Clients watching at the relay.
    pub children: usize,
    /// Datagrams into the relay between the anchors.
    pub inputs: usize,
    /// (datagram, child) pairs measured.
    pub samples: usize,
    /// Added latency, median / 99th percentile / largest (ms).
    pub p50_ms: Option<f64>,
    /// 99th percentile (ms).
    pub p99_ms: Option<f64>,
    /// Largest (ms).
    pub max_ms: Option<f64>,
    /// Latency of each datagram's first copy out (wake-up and processing without the
    /// fan-out's spread): median and 99th percentile (ms).
    #[serde(default)]
    pub first_p50_ms: Option<f64>,
    /// 99th percentile of the first copy (ms).
    #[serde(default)]
    pub first_p99_ms: Option<f64>,
    /// Children whose copies did not match the inputs one for one (left out).
    pub unmatched: usize,
    /// Datagrams the capture socket dropped.
    pub capture_drops: u64,
    /// The relay's CPU in the window (% of a core).
    pub relay_cpu_pct: f64,
    /// All clients' CPU together (% of a core).
    pub clients_cpu_pct: f64,
}

impl CostRun {
    fn new(cfg: &Config, experiment: &str, setup: &str) -> CostRun {
        CostRun {
            experiment: experiment.into(),
            label: cfg.label.clone(),
            quick: cfg.quick,
            recorded: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ok: false,
            error: None,
            warmup_s: cfg.warmup.as_secs_f64(),
            window_s: 0.0,
            clk_tck: clock_ticks(),
            loadavg: vec![],
            setup: setup.into(),
            daemon_args: cfg.daemon_args.clone(),
            procs: vec![],
            streams: vec![],
            notes: vec![],
            hops: vec![],
            hop_floor: vec![],
            control: None,
        }
    }

    fn of_role(&self, role: &str) -> Vec<&ProcCost> {
        self.procs.iter().filter(|p| p.role == role).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// A process to measure.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    role: String,
    note: String,
    pid: u32,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// CPU and memory of `targets` over `window` (RSS sampled every second). Fails if one of them
/// is gone at the start or the end.
async fn measure(targets: &[Target], window: Duration) -> anyhow::Result<(Vec<ProcCost>, f64)> {
    let tck = clock_ticks() as f64;
    let t0 = Instant::now();
    let mut first = Vec::new();
    for t in targets {
        let s = read_stat(t.pid)
            .with_context(|| format!("{} (pid {}) is not running", t.name, t.pid))?;
        first.push(s);
    }
    let mut rss_max = vec![0u64; targets.len()];
    // Per target: descendant pid → (comm, ticks first seen, ticks last seen).
    let mut kids: Vec<BTreeMap<u32, (String, u64, u64)>> = vec![BTreeMap::new(); targets.len()];
    loop {
        let all = all_stats();
        for (i, t) in targets.iter().enumerate() {
            if let Some(m) = read_status(t.pid) {
                rss_max[i] = rss_max[i].max(m.rss_kb);
            }
            for d in descendants(&all, t.pid) {
                let ticks = all[&d].ticks + all[&d].child_ticks;
                kids[i]
                    .entry(d)
                    .or_insert_with(|| (comm(d), ticks, ticks))
                    .2 = ticks;
            }
        }
        let e = t0.elapsed();
        if e >= window {
            break;
        }
        tokio::time::sleep((window - e).min(Duration::from_secs(1))).await;
    }
    let mut out = Vec::new();
    let mut last = Vec::new();
    for t in targets {
        let s = read_stat(t.pid)
            .with_context(|| format!("{} (pid {}) exited during the window", t.name, t.pid))?;
        last.push((s, read_status(t.pid).unwrap_or_default()));
    }
    let wall = t0.elapsed().as_secs_f64();
    let all = all_stats();
    for (i, t) in targets.iter().enumerate() {
        let (s1, m) = last[i];
        let s0 = first[i];
        let cpu_s = s1.ticks.saturating_sub(s0.ticks) as f64 / tck;
        let alive: u64 = kids[i]
            .iter()
            .filter(|(pid, _)| all.get(pid).is_some_and(|s| s.ppid != 1))
            .map(|(_, (_, a, b))| b.saturating_sub(*a))
            .sum();
        let reaped = s1.child_ticks.saturating_sub(s0.child_ticks);
        let children_cpu_pct = (alive + reaped) as f64 / tck / wall * 100.0;
        out.push(ProcCost {
            name: t.name.clone(),
            role: t.role.clone(),
            note: t.note.clone(),
            pid: t.pid,
            cpu_s,
            cpu_pct: cpu_s / wall * 100.0,
            children_cpu_pct,
            children: kids[i]
                .iter()
                .map(|(pid, (c, _, _))| format!("{pid} {c}"))
                .collect(),
            rss_mb: kb_to_mb(m.rss_kb),
            rss_max_mb: kb_to_mb(rss_max[i].max(m.rss_kb)),
            hwm_mb: kb_to_mb(m.hwm_kb),
        });
    }
    Ok((out, wall))
}

/// The last `stats` line of `stream` in a client's stats file: (t_ms, bytes, packets, lost).
fn last_stats(path: &Path, stream: &str) -> Option<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| l.event == "stats" && l.stream.as_deref() == Some(stream))
        .map(|l| {
            (
                l.t_ms,
                l.bytes.unwrap_or(0),
                l.packets.unwrap_or(0),
                l.lost.unwrap_or(0),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// An overlay of one experiment.

/// A chain `a.b.c.1 – a.b.c.2 – … – a.b.c.n` (a topology file's text).
fn chain(block: u8, n: u8) -> String {
    let mut s = String::new();
    for i in 1..=n {
        let mut nb = Vec::new();
        if i > 1 {
            nb.push(format!("\"127.0.{block}.{}\"", i - 1));
        }
        if i < n {
            nb.push(format!("\"127.0.{block}.{}\"", i + 1));
        }
        let _ = writeln!(s, "\"127.0.{block}.{i}\" = [{}]", nb.join(", "));
    }
    s
}

/// An overlay: its supervisor and plan. Always [`Overlay::stop`] it.
struct Overlay {
    sup: Supervisor,
    plan: Plan,
    bins: Binaries,
    dir: PathBuf,
    /// Client name → (stream, stats file).
    clients: Vec<(String, String, PathBuf)>,
}

impl Overlay {
    /// Writes `topology` into a fresh `dir` and plans it (nothing started yet).
    fn new(
        bins: &Binaries,
        dir: PathBuf,
        topology: &str,
        servers: &[&str],
        pops: &[&str],
    ) -> anyhow::Result<Overlay> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let topo = dir.join("topology.toml");
        std::fs::write(&topo, topology)?;
        let parse = |v: &[&str]| v.iter().map(|s| s.parse()).collect::<Result<Vec<_>, _>>();
        let plan = Plan::new(topo, parse(servers)?, parse(pops)?, None, 8010)?;
        let sup = Supervisor::new(dir.join("logs"))?;
        // One network key for the overlay, before any host starts.
        common::keys::load_or_create(&sup.key_dir().join("network.key"))?;
        Ok(Overlay {
            sup,
            plan,
            bins: bins.clone(),
            dir,
            clients: vec![],
        })
    }

    /// Starts the bootstrapper, the servers (`media`, plus `server_extra`) and the nodes;
    /// `extra` goes to every server and node.
    async fn start(
        &mut self,
        media: &Media,
        server_extra: &[OsString],
        extra: &[String],
    ) -> anyhow::Result<()> {
        self.start_with(&|_| media.clone(), server_extra, extra)
            .await
    }

    /// [`start`](Self::start), each server serving `media_of(its address)`.
    async fn start_with(
        &mut self,
        media_of: &dyn Fn(std::net::IpAddr) -> Media,
        server_extra: &[OsString],
        extra: &[String],
    ) -> anyhow::Result<()> {
        self.sup.spawn(
            "bootstrapper",
            self.bins.path("bootstrapper"),
            crate::bootstrapper_args(&self.plan),
        )?;
        crate::wait_for_tcp(self.plan.bootstrapper, Duration::from_secs(20)).await?;
        for ip in self.plan.servers.clone() {
            let mut a = crate::server_args(&self.plan, ip, &media_of(ip), None);
            a.extend(server_extra.iter().cloned());
            a.extend(extra.iter().map(OsString::from));
            self.sup.spawn(
                &crate::process_name("server", ip),
                self.bins.path("server"),
                a,
            )?;
        }
        for ip in self.plan.nodes.clone() {
            let mut a = crate::host_args(&self.plan, ip, None);
            a.extend(extra.iter().map(OsString::from));
            self.sup
                .spawn(&crate::process_name("node", ip), self.bins.path("node"), a)?;
        }
        Ok(())
    }

    /// Starts a headless client watching `stream` at the plan's PoPs.
    fn client(&mut self, name: &str, stream: &str) -> anyhow::Result<()> {
        let pops: Vec<String> = self.plan.pops.iter().map(|p| p.to_string()).collect();
        self.client_at(name, stream, &pops)
    }

    /// Starts a headless client watching `stream` at `pops`.
    fn client_at(&mut self, name: &str, stream: &str, pops: &[String]) -> anyhow::Result<()> {
        let stats = self.dir.join(format!("{name}-stats.jsonl"));
        let mut a = crate::headless_client_args(pops, &stats);
        a.extend(["--stream".into(), stream.into()]);
        a.extend(["--give-up".into(), "60s".into()]);
        self.sup.spawn(name, self.bins.path("client"), a)?;
        self.clients
            .push((name.to_owned(), stream.to_owned(), stats));
        Ok(())
    }

    /// Waits until every client's stream has played datagrams, up to `within`; returns the
    /// streams that did not.
    async fn wait_streams(&mut self, within: Duration) -> anyhow::Result<Vec<String>> {
        let t0 = Instant::now();
        loop {
            self.check_alive()?;
            let missing: Vec<String> = self
                .clients
                .iter()
                .filter(|(_, stream, stats)| {
                    Summary::load(stats)
                        .streams
                        .get(stream)
                        .is_none_or(|s| s.packets == 0)
                })
                .map(|(_, stream, _)| stream.clone())
                .collect();
            if missing.is_empty() || t0.elapsed() > within {
                return Ok(missing);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails naming the processes that exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        let gone = self.sup.exited();
        anyhow::ensure!(
            gone.is_empty(),
            "exited: {}",
            gone.iter()
                .map(|(n, s)| format!("{n} ({s})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    /// The bootstrapper, servers, nodes (with `note_of`) and clients, with their pids.
    fn targets(&self, note_of: impl Fn(&str) -> String) -> anyhow::Result<Vec<Target>> {
        let mut names: Vec<(String, &str)> = vec![("bootstrapper".into(), "bootstrapper")];
        names.extend(
            self.plan
                .servers
                .iter()
                .map(|ip| (crate::process_name("server", *ip), "server")),
        );
        names.extend(
            self.plan
                .nodes
                .iter()
                .map(|ip| (crate::process_name("node", *ip), "relay")),
        );
        names.extend(self.clients.iter().map(|(n, _, _)| (n.clone(), "client")));
        names
            .into_iter()
            .map(|(name, role)| {
                let pid = self
                    .sup
                    .pid(&name)
                    .with_context(|| format!("{name} is not running"))?;
                Ok(Target {
                    note: note_of(&name),
                    name,
                    role: role.into(),
                    pid,
                })
            })
            .collect()
    }

    /// Each client's last stats line (t_ms, bytes, packets, lost), at the start of a window.
    fn stream_marks(&self) -> Vec<Option<(u64, u64, u64, u64)>> {
        self.clients
            .iter()
            .map(|(_, stream, stats)| last_stats(stats, stream))
            .collect()
    }

    /// Each client's stream over the window that started at `before` ([`stream_marks`]).
    ///
    /// [`stream_marks`]: Self::stream_marks
    fn stream_rates(&self, before: Vec<Option<(u64, u64, u64, u64)>>) -> Vec<StreamRate> {
        self.clients
            .iter()
            .zip(before)
            .map(|((client, stream, stats), b)| {
                let a = last_stats(stats, stream);
                let (mbps, packets, lost) = match (b, a) {
                    (Some(b), Some(a)) if a.0 > b.0 => (
                        Some((a.1 - b.1) as f64 * 8.0 / ((a.0 - b.0) as f64 / 1e3) / 1e6),
                        a.2.saturating_sub(b.2),
                        a.3.saturating_sub(b.3),
                    ),
                    _ => (None, 0, 0),
                };
                StreamRate {
                    stream: stream.clone(),
                    client: client.clone(),
                    mbps,
                    packets,
                    lost,
                }
            })
            .collect()
    }

    /// Warm-up, then the window: processes' costs and streams' rates into `run`.
    async fn measure_into(
        &mut self,
        cfg: &Config,
        run: &mut CostRun,
        note_of: impl Fn(&str) -> String,
    ) -> anyhow::Result<()> {
        tokio::time::sleep(cfg.warmup).await;
        self.check_alive()?;
        let targets = self.targets(note_of)?;
        let before = self.stream_marks();
        run.loadavg.push(loadavg());
        info!(experiment = %run.experiment, processes = targets.len(), window = ?cfg.window, "measuring");
        let (procs, wall) = measure(&targets, cfg.window).await?;
        run.loadavg.push(loadavg());
        run.procs = procs;
        run.window_s = wall;
        run.streams = self.stream_rates(before);
        self.check_alive()?;
        for p in run.procs.iter().filter(|p| !p.children.is_empty()) {
            run.notes.push(format!(
                "{} had child processes in the window ({}): ≈ {:.2} % of a core",
                p.name,
                p.children.join(", "),
                p.children_cpu_pct
            ));
        }
        Ok(())
    }

    /// Stops every process (last started first), then checks none of the measured ones is
    /// left.
    async fn stop(mut self, measured: &[ProcCost]) {
        self.sup.stop_all(Duration::from_secs(3)).await;
        for p in measured {
            if read_status(p.pid).is_some() {
                warn!(process = %p.name, pid = p.pid, "still running after the stop");
            }
        }
    }
}

/// Runs `body` on a fresh overlay, always stops it, records the outcome in `run`.
async fn with_overlay<F>(run: &mut CostRun, ov: anyhow::Result<Overlay>, body: F)
where
    F: AsyncFnOnce(&mut Overlay, &mut CostRun) -> anyhow::Result<()>,
{
    let mut ov = match ov {
        Ok(o) => o,
        Err(e) => {
            run.error = Some(format!("{e:#}"));
            return;
        }
    };
    let r = body(&mut ov, run).await;
    ov.stop(&run.procs).await;
    match r {
        Ok(()) => run.ok = true,
        Err(e) => {
            warn!(experiment = %run.experiment, error = %format!("{e:#}"), "run failed");
            run.error = Some(format!("{e:#}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Media: a generated clip, transcoded once by the server into a cache kept across runs.

/// Name of the generated clip (the server's source file).
const CLIP: &str = "clip.mp4";

/// Generates `<media>/src/clip.mp4` if missing: 20 s of 1280×720 25 fps test pattern with
/// temporal noise (so the server's 2.5 Mb/s encode is not starved of detail) and a 440 Hz
/// tone. A new clip empties the transcode cache.
async fn ensure_clip(media: &Path) -> anyhow::Result<PathBuf> {
    let src = media.join("src");
    let clip = src.join(CLIP);
    if clip.is_file() {
        return Ok(clip);
    }
    std::fs::create_dir_all(&src)?;
    let _ = std::fs::remove_dir_all(media.join("cache"));
    let tmp = src.join(format!(".{CLIP}.tmp.mp4"));
    info!(clip = %clip.display(), "generating the source clip (once)");
    let status = common::runtime::child_command("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=1280x720:rate=25,format=yuv420p,noise=alls=12:allf=t",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=48000",
            "-t",
            "20",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-qp",
            "18",
            "-c:a",
            "aac",
            "-b:a",
            "128k",
        ])
        .arg(&tmp)
        .status()
        .await
        .context("cannot run ffmpeg to generate the clip")?;
    anyhow::ensure!(
        status.success(),
        "ffmpeg failed to generate the clip: {status}"
    );
    std::fs::rename(&tmp, &clip)?;
    Ok(clip)
}

/// A fresh videos folder `<media>/<name>/` holding `<channel>.mp4` → the clip (symbolic links:
/// the server's cache is keyed by the canonical path, so every channel shares one transcode).
fn videos_folder(
    media: &Path,
    name: &str,
    clip: &Path,
    channels: &[String],
) -> anyhow::Result<PathBuf> {
    let dir = media.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let target = clip.canonicalize()?;
    for c in channels {
        std::os::unix::fs::symlink(&target, dir.join(format!("{c}.mp4")))?;
    }
    Ok(dir)
}

/// Waits until the server's transcode cache holds the clip: a finished `.ts` in `cache`, no
/// temporary file, and no transcode under way in `log`. Up to `within`.
async fn wait_cache(cache: &Path, log: &Path, within: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut said = false;
    loop {
        let names: Vec<String> = std::fs::read_dir(cache)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let done = names
            .iter()
            .any(|n| n.ends_with(".ts") && !n.starts_with('.'));
        let tmp = names.iter().any(|n| n.ends_with(".tmp"));
        let l = std::fs::read_to_string(log).unwrap_or_default();
        let busy = l.matches("transcoding starts").count() > l.matches("transcoding done").count();
        if done && !tmp && !busy {
            return Ok(());
        }
        if !said && t0.elapsed() > Duration::from_secs(3) {
            info!("waiting for the server to transcode the clip into its cache (first run only)");
            said = true;
        }
        anyhow::ensure!(
            t0.elapsed() < within,
            "the clip is not in the server's cache after {within:?} (see {})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The experiments.

/// Runs the configured experiments one after the other, saves each run, writes COST.md.
pub async fn run(cfg: &Config, bins: &Binaries) -> anyhow::Result<Vec<CostRun>> {
    let mut runs = Vec::new();
    for e in EXPERIMENTS {
        if !cfg.experiments.iter().any(|x| x == e) {
            continue;
        }
        info!(experiment = e, label = %cfg.label, "cost experiment");
        let run = match e {
            "idle" => idle(cfg, bins).await,
            "watched" => watched(cfg, bins).await,
            "hop" => hop(cfg, bins).await,
            "scale" => scale(cfg, bins).await,
            _ => memory(cfg, bins).await,
        };
        save(&cfg.out, &run)?;
        runs.push(run);
    }
    for x in &cfg.experiments {
        if !EXPERIMENTS.contains(&x.as_str()) {
            warn!(experiment = %x, "unknown experiment (idle, watched, memory, hop, scale)");
        }
    }
    rewrite_report(&cfg.out)?;
    Ok(runs)
}

/// Idle: the 4×5 grid with both servers' default channels, nobody watching.
async fn idle(cfg: &Config, bins: &Binaries) -> CostRun {
    let mut run = CostRun::new(
        cfg,
        "idle",
        "topologies/grid4x5.toml at 127.0.96.x: bootstrapper, servers .100 and .101 (default \
         live channel, encoded only while watched), 20 relays; no client",
    );
    let ov = std::fs::read_to_string(common::runtime::shipped_file("topologies/grid4x5.toml"))
        .context("cannot read topologies/grid4x5.toml")
        .and_then(|t| {
            Overlay::new(
                bins,
                cfg.log_dir.join("idle"),
                &t.replace("127.0.1.", "127.0.96."),
                &["127.0.96.100", "127.0.96.101"],
                &[],
            )
        });
    with_overlay(&mut run, ov, async |ov, run| {
        ov.start(&Media::default(), &[], &cfg.daemon_args).await?;
        ov.measure_into(cfg, run, |_| String::new()).await
    })
    .await;
    run
}

/// Watched: one pre-encoded channel, server → relay → relay → PoP → client.
async fn watched(cfg: &Config, bins: &Binaries) -> CostRun {
    let mut run = CostRun::new(
        cfg,
        "watched",
        "chain at 127.0.97.x: server .1 → relay .2 → relay .3 → PoP .4 → one headless client; \
         channel `clip` = a generated 720p25 clip (noisy test pattern + tone), transcoded once \
         by the server into its cache (2.5 Mb/s video, 128 kb/s AAC), played out from it",
    );
    let (videos, ov) = cached_chain(cfg, bins, "watched", "one", &["clip".into()], 97, 4).await;
    with_overlay(&mut run, ov, async |ov, run| {
        start_cached(cfg, ov, videos, "server-127.0.97.1").await?;
        ov.client("client", "clip")?;
        let missing = ov.wait_streams(Duration::from_secs(60)).await?;
        anyhow::ensure!(missing.is_empty(), "the client got no datagram within 60 s");
        ov.measure_into(cfg, run, |name| match name {
            "node-127.0.97.2" => "hop 1".into(),
            "node-127.0.97.3" => "hop 2".into(),
            "node-127.0.97.4" => "hop 3, PoP".into(),
            _ => String::new(),
        })
        .await
    })
    .await;
    run
}

/// The generated clip under the names `channels` (videos folder `folder` in the media
/// directory), and the chain `127.0.<block>.1 … .<n>` (server first, PoP last) in
/// `<log dir>/<dir>`; the folder is `None` when the clip could not be made.
async fn cached_chain(
    cfg: &Config,
    bins: &Binaries,
    dir: &str,
    folder: &str,
    channels: &[String],
    block: u8,
    n: u8,
) -> (Option<PathBuf>, anyhow::Result<Overlay>) {
    let media = cfg.log_dir.join("media");
    let prepared = async {
        let clip = ensure_clip(&media).await?;
        let videos = videos_folder(&media, folder, &clip, channels)?;
        let ov = Overlay::new(
            bins,
            cfg.log_dir.join(dir),
            &chain(block, n),
            &[&format!("127.0.{block}.1")],
            &[&format!("127.0.{block}.{n}")],
        )?;
        Ok::<_, anyhow::Error>((videos, ov))
    }
    .await;
    match prepared {
        Ok((v, o)) => (Some(v), Ok(o)),
        Err(e) => (None, Err(e)),
    }
}

/// Starts `ov` with the server playing `videos` from the shared cache, and waits until the
/// server (process `server`) has taken its cache and the floods have built the routes.
async fn start_cached(
    cfg: &Config,
    ov: &mut Overlay,
    videos: Option<PathBuf>,
    server: &str,
) -> anyhow::Result<()> {
    let m = Media {
        videos,
        sources: vec![],
    };
    start_cached_with(cfg, ov, &|_| m.clone(), server).await
}

/// [`start_cached`], each server playing `media_of(its address)`.
async fn start_cached_with(
    cfg: &Config,
    ov: &mut Overlay,
    media_of: &dyn Fn(std::net::IpAddr) -> Media,
    server: &str,
) -> anyhow::Result<()> {
    let cache = cfg.log_dir.join("media").join("cache");
    ov.start_with(
        media_of,
        &["--cache-dir".into(), cache.clone().into()],
        &cfg.daemon_args,
    )
    .await?;
    let log = ov.sup.log_path(server);
    wait_cache(&cache, &log, Duration::from_secs(600)).await?;
    // Let the server take the cache (its transcode job runs one file at a time) and the
    // floods build the routes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// Memory: ten channels watched by ten clients, server → relay → PoP.
async fn memory(cfg: &Config, bins: &Binaries) -> CostRun {
    let mut run = CostRun::new(
        cfg,
        "memory",
        &format!(
            "chain at 127.0.98.x: server .1 (ten channels ch00…ch09, the cached clip of \
             `watched` under ten names) → relay .2 → PoP .3 → {MEMORY_STREAMS} headless \
             clients, one per channel: both relays carry {MEMORY_STREAMS} streams"
        ),
    );
    let channels: Vec<String> = (0..MEMORY_STREAMS).map(|i| format!("ch{i:02}")).collect();
    let (videos, ov) = cached_chain(cfg, bins, "memory", "ten", &channels, 98, 3).await;
    with_overlay(&mut run, ov, async |ov, run| {
        start_cached(cfg, ov, videos, "server-127.0.98.1").await?;
        for c in &channels {
            ov.client(&format!("client-{c}"), c)?;
        }
        let missing = ov.wait_streams(Duration::from_secs(60)).await?;
        if !missing.is_empty() {
            run.notes.push(format!(
                "no datagram within 60 s for {} (measured anyway)",
                missing.join(", ")
            ));
        }
        ov.measure_into(cfg, run, |name| match name {
            "node-127.0.98.2" => "hop 1".into(),
            "node-127.0.98.3" => "hop 2, PoP".into(),
            _ => String::new(),
        })
        .await
    })
    .await;
    run
}

/// Hop: the added latency of one relay with 1, 10 and 100 children.
async fn hop(cfg: &Config, bins: &Binaries) -> CostRun {
    let mut run = CostRun::new(
        cfg,
        "hop",
        "server .1 → relay .2 at 127.0.99.x, the relay the PoP of 1, then 10, then 100 headless \
         clients watching `clip` (the cached clip of `watched`); latency from kernel timestamps \
         on lo (each datagram into the relay → each child's copy out of it, matched in order \
         between quiet gaps), CPU over the same window",
    );
    // The floor first, on a quiet machine: a raw forwarder to as many receiver threads.
    let window = cfg.window.min(Duration::from_secs(10));
    for n in HOP_CHILDREN {
        info!(children = n, window = ?window, "measuring a raw forwarder (the floor)");
        let floor = tokio::task::spawn_blocking(move || {
            crate::hop::raw_floor([127, 0, 96, 0].into(), n, window)
        })
        .await;
        match floor {
            Ok(Ok((m, capture_drops))) => run.hop_floor.push(hop_window(n, &m, capture_drops)),
            Ok(Err(e)) => run.notes.push(format!("raw forwarder, {n} children: {e}")),
            Err(e) => run.notes.push(format!("raw forwarder, {n} children: {e}")),
        }
    }
    let (videos, ov) = cached_chain(cfg, bins, "hop", "one", &["clip".into()], 99, 2).await;
    with_overlay(&mut run, ov, async |ov, run| {
        start_cached(cfg, ov, videos, "server-127.0.99.1").await?;
        let relay = std::net::SocketAddrV4::new([127, 0, 99, 2].into(), 8010);
        let upstream = std::net::SocketAddrV4::new([127, 0, 99, 1].into(), 8010);
        for n in HOP_CHILDREN {
            while ov.clients.len() < n {
                let i = ov.clients.len();
                ov.client(&format!("client-{i:03}"), "clip")?;
            }
            let missing = ov.wait_streams(Duration::from_secs(60)).await?;
            anyhow::ensure!(
                missing.is_empty(),
                "{} of {n} clients got no datagram within 60 s",
                missing.len()
            );
            tokio::time::sleep(cfg.warmup).await;
            ov.check_alive()?;
            let targets = ov.targets(|name| match name {
                "node-127.0.99.2" => format!("{n} children"),
                _ => String::new(),
            })?;
            run.loadavg.push(loadavg());
            let capture = crate::hop::Capture::start(relay, upstream)
                .context("cannot capture on lo (the hop experiment needs root)")?;
            info!(children = n, window = ?window, "measuring the hop");
            let measured = measure(&targets, window).await;
            let (seen, capture_drops) = capture.stop()?;
            let (procs, wall) = measured?;
            run.loadavg.push(loadavg());
            let m = crate::hop::match_hop(&seen, relay, upstream);
            if m.unmatched > 0 {
                run.notes.push(format!(
                    "{n} children: {} left out, their copies between the anchors {:?} for {} \
                     datagrams in",
                    m.unmatched, m.unmatched_copies, m.inputs
                ));
            }
            let cpu = |role: &str| -> f64 {
                procs
                    .iter()
                    .filter(|p| p.role == role)
                    .map(|p| p.cpu_pct)
                    .sum()
            };
            run.hops.push(HopWindow {
                relay_cpu_pct: cpu("relay"),
                clients_cpu_pct: cpu("client"),
                ..hop_window(n, &m, capture_drops)
            });
            run.procs = procs;
            run.window_s = wall;
        }
        Ok(())
    })
    .await;
    run
}

/// The latency figures of one matched window (no CPU figures).
fn hop_window(children: usize, m: &crate::hop::Matched, capture_drops: u64) -> HopWindow {
    let ms: Vec<f64> = m.latencies.iter().map(|&ns| ns as f64 / 1e6).collect();
    let first: Vec<f64> = m.first.iter().map(|&ns| ns as f64 / 1e6).collect();
    HopWindow {
        children,
        inputs: m.inputs,
        samples: ms.len(),
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        max_ms: percentile(&ms, 100.0),
        first_p50_ms: percentile(&first, 50.0),
        first_p99_ms: percentile(&first, 99.0),
        unmatched: m.unmatched,
        capture_drops,
        relay_cpu_pct: 0.0,
        clients_cpu_pct: 0.0,
    }
}

/// Scale: the simulation harness's 100-relay random overlay, all real processes.
async fn scale(cfg: &Config, bins: &Binaries) -> CostRun {
    let g = common::topology::RandomOverlay::new(1, 100, 3, 20);
    let mut run = CostRun::new(
        cfg,
        "scale",
        "the 100-relay random overlay of the simulation harness (seed 1: 100 relays at \
         127.0.70.x, average degree 3.5; servers 127.0.75.1–3, each serving one channel ch0–ch2, \
         the cached clip of `watched`; 20 headless clients, each at its own PoP watching a \
         random channel), 124 processes; control = every UDP datagram shorter than a video \
         datagram, counted on lo",
    );
    let media = cfg.log_dir.join("media");
    let prepared = async {
        let clip = ensure_clip(&media).await?;
        let mut folders = BTreeMap::new();
        for (s, (ip, _)) in g.servers.iter().enumerate() {
            let ch = format!("ch{s}");
            let v = videos_folder(&media, &format!("scale-{ch}"), &clip, &[ch])?;
            folders.insert(*ip, v);
        }
        let servers: Vec<String> = g.servers.iter().map(|(ip, _)| ip.to_string()).collect();
        let servers: Vec<&str> = servers.iter().map(String::as_str).collect();
        let ov = Overlay::new(bins, cfg.log_dir.join("scale"), &g.to_toml(), &servers, &[])?;
        Ok::<_, anyhow::Error>((folders, ov))
    }
    .await;
    let (folders, ov) = match prepared {
        Ok((f, o)) => (f, Ok(o)),
        Err(e) => (BTreeMap::new(), Err(e)),
    };
    with_overlay(&mut run, ov, async |ov, run| {
        let media_of = |ip: std::net::IpAddr| Media {
            videos: folders.get(&ip).cloned(),
            sources: vec![],
        };
        start_cached_with(cfg, ov, &media_of, "server-127.0.75.1").await?;
        // Floods cross the overlay (up to ten hops) once a second.
        tokio::time::sleep(Duration::from_secs(5)).await;
        for (v, (pop, ch)) in g.viewers.iter().enumerate() {
            ov.client_at(
                &format!("client-{v:02}"),
                &format!("ch{ch}"),
                &[pop.to_string()],
            )?;
        }
        let missing = ov.wait_streams(Duration::from_secs(60)).await?;
        anyhow::ensure!(
            missing.is_empty(),
            "no datagram within 60 s for {}",
            missing.join(", ")
        );
        tokio::time::sleep(cfg.warmup).await;
        ov.check_alive()?;
        let targets = ov.targets(|_| String::new())?;
        let before = ov.stream_marks();
        run.loadavg.push(loadavg());
        let capture = crate::hop::Capture::control()
            .context("cannot capture on lo (the scale experiment needs root)")?;
        info!(processes = targets.len(), window = ?cfg.window, "measuring the overlay");
        let measured = measure(&targets, cfg.window).await;
        let (seen, capture_drops) = capture.stop()?;
        let (procs, wall) = measured?;
        run.loadavg.push(loadavg());
        run.procs = procs;
        run.window_s = wall;
        run.streams = ov.stream_rates(before);
        let hosts: std::collections::HashSet<std::net::IpAddr> = g
            .relays
            .iter()
            .copied()
            .chain(g.servers.iter().map(|(ip, _)| *ip))
            .collect();
        let overlay = |a: &std::net::SocketAddrV4| {
            a.port() == common::wire::DEFAULT_PORT && hosts.contains(&(*a.ip()).into())
        };
        let mut per_link: BTreeMap<(std::net::SocketAddrV4, std::net::SocketAddrV4), u64> =
            BTreeMap::new();
        for x in &seen {
            *per_link.entry((x.src, x.dst)).or_default() += u64::from(x.len);
        }
        let rate = |b: u64| b as f64 / wall;
        let mut ov_rates: Vec<(f64, String)> = vec![];
        let mut viewer_rates: Vec<f64> = vec![];
        for ((src, dst), b) in &per_link {
            if overlay(src) && overlay(dst) {
                ov_rates.push((rate(*b), format!("{src} → {dst}")));
            } else if overlay(src) || overlay(dst) {
                viewer_rates.push(rate(*b));
            }
        }
        let v: Vec<f64> = ov_rates.iter().map(|r| r.0).collect();
        let worst = ov_rates
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .cloned()
            .unwrap_or_default();
        run.control = Some(ControlTraffic {
            overlay_links: v.len(),
            overlay_median: percentile(&v, 50.0).unwrap_or(0.0),
            overlay_p90: percentile(&v, 90.0).unwrap_or(0.0),
            overlay_max: worst.0,
            overlay_max_link: worst.1,
            viewer_links: viewer_rates.len(),
            viewer_median: percentile(&viewer_rates, 50.0).unwrap_or(0.0),
            viewer_max: percentile(&viewer_rates, 100.0).unwrap_or(0.0),
            capture_drops,
        });
        ov.check_alive()
    })
    .await;
    run
}

// ---------------------------------------------------------------------------------------------
// Results.

fn run_path(out: &Path, experiment: &str, label: &str) -> PathBuf {
    out.join("runs")
        .join(format!("cost-{experiment}-{label}.json"))
}

fn save(out: &Path, run: &CostRun) -> anyhow::Result<()> {
    let path = run_path(out, &run.experiment, &run.label);
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    std::fs::write(&path, serde_json::to_string_pretty(run)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    info!(path = %path.display(), ok = run.ok, "run saved");
    Ok(())
}

/// Every `runs/cost-*.json` in `out` (unreadable files skipped), by experiment then label.
pub fn load_runs(out: &Path) -> Vec<CostRun> {
    let mut runs: Vec<CostRun> = std::fs::read_dir(out.join("runs"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("cost-") && n.ends_with(".json")
                })
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| serde_json::from_str(&t).ok())
                .collect()
        })
        .unwrap_or_default();
    let order = |e: &str| EXPERIMENTS.iter().position(|x| *x == e).unwrap_or(9);
    runs.sort_by(|a, b| {
        (order(&a.experiment), &a.recorded, &a.label).cmp(&(
            order(&b.experiment),
            &b.recorded,
            &b.label,
        ))
    });
    runs
}

/// Rewrites `<out>/COST.md` from every run in `<out>/runs/`.
pub fn rewrite_report(out: &Path) -> anyhow::Result<()> {
    let md = render(&load_runs(out));
    std::fs::create_dir_all(out)?;
    let path = out.join("COST.md");
    std::fs::write(&path, md).with_context(|| format!("cannot write {}", path.display()))
}

fn pct(v: f64) -> String {
    format!("{v:.3} %")
}

fn mb(v: f64) -> String {
    format!("{v:.1} MB")
}

fn row(figure: impl Into<String>, value: String, goal: &str, result: String) -> Vec<String> {
    vec![figure.into(), value, goal.into(), result]
}

/// "median / max (n)" of a role's CPU, and the max.
fn role_cpu(procs: &[&ProcCost]) -> Option<(String, f64)> {
    let v: Vec<f64> = procs.iter().map(|p| p.cpu_pct).collect();
    let max = percentile(&v, 100.0)?;
    let med = percentile(&v, 50.0)?;
    Some(if v.len() == 1 {
        (pct(max), max)
    } else {
        (
            format!("{} / {} (n = {})", pct(med), pct(max), v.len()),
            max,
        )
    })
}

fn role_rss(procs: &[&ProcCost]) -> Option<String> {
    let v: Vec<f64> = procs.iter().map(|p| p.rss_max_mb).collect();
    let max = percentile(&v, 100.0)?;
    let med = percentile(&v, 50.0)?;
    Some(if v.len() == 1 {
        mb(max)
    } else {
        format!("{} / {} (n = {})", mb(med), mb(max), v.len())
    })
}

fn bitrate(streams: &[StreamRate]) -> String {
    let v: Vec<f64> = streams.iter().filter_map(|s| s.mbps).collect();
    if v.is_empty() {
        return "-".into();
    }
    format!("{:.2} Mb/s", v.iter().sum::<f64>())
}

fn render_idle(r: &CostRun) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let goal = format!("≤ {IDLE_GOAL_PCT} % each");
    for (role, label) in [
        ("bootstrapper", "bootstrapper CPU"),
        ("server", "server CPU, median / max"),
        ("relay", "relay node CPU, median / max"),
    ] {
        if let Some((v, max)) = role_cpu(&r.of_role(role)) {
            rows.push(row(label, v, &goal, verdict(Some(max <= IDLE_GOAL_PCT))));
        }
    }
    let daemons: Vec<&ProcCost> = r.procs.iter().filter(|p| p.role != "client").collect();
    if let Some(hot) = daemons
        .iter()
        .max_by(|a, b| a.cpu_pct.total_cmp(&b.cpu_pct))
    {
        rows.push(row(
            "hottest daemon",
            format!("{} ({})", pct(hot.cpu_pct), hot.name),
            &goal,
            verdict(Some(hot.cpu_pct <= IDLE_GOAL_PCT)),
        ));
    }
    let total: f64 = daemons.iter().map(|p| p.cpu_pct).sum();
    let n = daemons.len();
    rows.push(row(
        format!("whole overlay CPU ({n} daemons)"),
        pct(total),
        &format!(
            "≤ {:.1} % ({n} × {IDLE_GOAL_PCT} %)",
            n as f64 * IDLE_GOAL_PCT
        ),
        verdict(Some(total <= n as f64 * IDLE_GOAL_PCT)),
    ));
    for (role, label) in [
        ("bootstrapper", "bootstrapper RSS"),
        ("server", "server RSS, median / max"),
        ("relay", "relay node RSS, median / max"),
    ] {
        if let Some(v) = role_rss(&r.of_role(role)) {
            rows.push(row(label, v, "—", "—".into()));
        }
    }
    rows
}

fn render_watched(r: &CostRun) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let lost: u64 = r.streams.iter().map(|s| s.lost).sum();
    let packets: u64 = r.streams.iter().map(|s| s.packets).sum();
    rows.push(row(
        "stream bit rate at the client (TS payload)",
        bitrate(&r.streams),
        "≈ 3 Mb/s",
        "—".into(),
    ));
    rows.push(row(
        "datagrams played / lost in the window",
        format!("{packets} / {lost}"),
        "—",
        "—".into(),
    ));
    for s in r.of_role("server") {
        rows.push(row(
            "server CPU",
            pct(s.cpu_pct),
            &format!("≤ {SERVER_GOAL_PCT} %"),
            verdict(Some(s.cpu_pct <= SERVER_GOAL_PCT)),
        ));
        if !s.children.is_empty() {
            rows.push(row(
                "server's child processes CPU (ffmpeg)",
                pct(s.children_cpu_pct),
                "—",
                "—".into(),
            ));
        }
    }
    for p in r.of_role("relay") {
        rows.push(row(
            format!(
                "relay {} ({}) CPU",
                p.name.trim_start_matches("node-"),
                p.note
            ),
            pct(p.cpu_pct),
            &format!("≤ {RELAY_GOAL_PCT} %"),
            verdict(Some(p.cpu_pct <= RELAY_GOAL_PCT)),
        ));
    }
    for p in r.of_role("client") {
        rows.push(row("client CPU", pct(p.cpu_pct), "—", "—".into()));
    }
    for p in r.of_role("bootstrapper") {
        rows.push(row("bootstrapper CPU", pct(p.cpu_pct), "—", "—".into()));
    }
    for p in &r.procs {
        let what = match p.role.as_str() {
            "relay" => format!(
                "relay {} ({}) RSS",
                p.name.trim_start_matches("node-"),
                p.note
            ),
            other => format!("{other} RSS"),
        };
        rows.push(row(what, mb(p.rss_max_mb), "—", "—".into()));
    }
    rows
}

fn render_hop(r: &CostRun) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    let (g50, g99) = HOP_GOAL_MS;
    for h in &r.hops {
        let ok = match (h.p50_ms, h.p99_ms) {
            (Some(a), Some(b)) => Some(a <= g50 && b <= g99),
            _ => None,
        };
        rows.push(row(
            format!(
                "added latency per hop, {} children: p50 / p99 / max (ms)",
                h.children
            ),
            format!(
                "{} / {} / {} ({} samples, {} datagrams{}{})",
                ms(h.p50_ms),
                ms(h.p99_ms),
                ms(h.max_ms),
                h.samples,
                h.inputs,
                if h.unmatched > 0 {
                    format!(", {} children unmatched", h.unmatched)
                } else {
                    String::new()
                },
                if h.capture_drops > 0 {
                    format!(", {} capture drops", h.capture_drops)
                } else {
                    String::new()
                }
            ),
            &format!("≤ {g50} / {g99}"),
            verdict(ok),
        ));
        rows.push(row(
            format!(
                "… its first copy out, {} children: p50 / p99 (ms)",
                h.children
            ),
            format!("{} / {}", ms(h.first_p50_ms), ms(h.first_p99_ms)),
            "—",
            "—".into(),
        ));
        rows.push(row(
            format!("relay CPU, {} children (clients together)", h.children),
            format!("{} ({})", pct(h.relay_cpu_pct), pct(h.clients_cpu_pct)),
            "—",
            "—".into(),
        ));
        if let Some(f) = r.hop_floor.iter().find(|f| f.children == h.children) {
            rows.push(row(
                format!(
                    "… floor: a raw forwarder (no crypto, same I/O path) to {} receiver \
                     threads: p50 / p99 / max (first copy p50) (ms)",
                    f.children
                ),
                format!(
                    "{} / {} / {} ({})",
                    ms(f.p50_ms),
                    ms(f.p99_ms),
                    ms(f.max_ms),
                    ms(f.first_p50_ms)
                ),
                "—",
                "—".into(),
            ));
        }
    }
    rows
}

fn render_scale(r: &CostRun) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let lost: u64 = r.streams.iter().map(|s| s.lost).sum();
    let packets: u64 = r.streams.iter().map(|s| s.packets).sum();
    let playing = r
        .streams
        .iter()
        .filter(|s| s.mbps.is_some_and(|m| m > 0.0))
        .count();
    rows.push(row(
        "viewers playing / datagrams played / lost in the window",
        format!("{playing} of {} / {packets} / {lost}", r.streams.len()),
        "20 / — / 0",
        verdict(Some(playing == 20 && lost == 0)),
    ));
    if let Some(c) = &r.control {
        // 1 % of a 5 Mb/s stream, in bytes/s.
        let goal = 5e6 / 8.0 * CONTROL_GOAL_PCT / 100.0;
        let share = |b: f64| format!("{b:.0} B/s ({:.3} %)", b / (5e6 / 8.0) * 100.0);
        rows.push(row(
            format!(
                "control per overlay link ({} directed links), median / p90",
                c.overlay_links
            ),
            format!("{} / {}", share(c.overlay_median), share(c.overlay_p90)),
            &format!("< {goal:.0} B/s (1 % of 5 Mb/s)"),
            verdict(Some(c.overlay_p90 < goal)),
        ));
        rows.push(row(
            "control on the busiest overlay link",
            format!("{} ({})", share(c.overlay_max), c.overlay_max_link),
            &format!("< {goal:.0} B/s"),
            verdict(Some(c.overlay_max < goal)),
        ));
        rows.push(row(
            format!(
                "control per viewer link ({} directed), median / max",
                c.viewer_links
            ),
            format!("{} / {}", share(c.viewer_median), share(c.viewer_max)),
            "—",
            "—".into(),
        ));
        if c.capture_drops > 0 {
            rows.push(row(
                "datagrams the capture dropped",
                c.capture_drops.to_string(),
                "0",
                verdict(Some(false)),
            ));
        }
    }
    for (role, label) in [
        ("relay", "relay CPU, median / max"),
        ("server", "server CPU, median / max"),
        ("client", "client CPU, median / max"),
    ] {
        if let Some((v, _)) = role_cpu(&r.of_role(role)) {
            rows.push(row(label, v, "—", "—".into()));
        }
    }
    let total: f64 = r.procs.iter().map(|p| p.cpu_pct).sum();
    rows.push(row(
        format!("all {} processes together, CPU", r.procs.len()),
        pct(total),
        "< 200 % (the machine)",
        verdict(Some(total < 200.0)),
    ));
    if let Some(v) = role_rss(&r.of_role("relay")) {
        rows.push(row("relay RSS, median / max", v, "—", "—".into()));
    }
    rows
}

fn render_memory(r: &CostRun) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let playing = r
        .streams
        .iter()
        .filter(|s| s.mbps.is_some_and(|m| m > 0.0))
        .count();
    rows.push(row(
        "streams through each relay (playing)",
        format!("{} ({playing})", r.streams.len()),
        &format!("{MEMORY_STREAMS}"),
        verdict(Some(playing == MEMORY_STREAMS)),
    ));
    rows.push(row(
        "total bit rate at the clients",
        bitrate(&r.streams),
        "—",
        "—".into(),
    ));
    let goal = format!("≤ {MEMORY_GOAL_MB} MB");
    for p in r.of_role("relay") {
        let n = p.name.trim_start_matches("node-");
        rows.push(row(
            format!("relay {n} ({}) RSS, max in window", p.note),
            mb(p.rss_max_mb),
            &goal,
            verdict(Some(p.rss_max_mb <= MEMORY_GOAL_MB)),
        ));
        rows.push(row(
            format!("relay {n} peak RSS since start (VmHWM)"),
            mb(p.hwm_mb),
            &goal,
            verdict(Some(p.hwm_mb <= MEMORY_GOAL_MB)),
        ));
        rows.push(row(
            format!("relay {n} CPU"),
            pct(p.cpu_pct),
            "—",
            "—".into(),
        ));
    }
    for s in r.of_role("server") {
        rows.push(row(
            "server RSS, max in window",
            mb(s.rss_max_mb),
            "—",
            "—".into(),
        ));
        rows.push(row("server CPU", pct(s.cpu_pct), "—", "—".into()));
    }
    let clients = r.of_role("client");
    if let Some(v) = role_rss(&clients) {
        rows.push(row("client RSS, median / max", v, "—", "—".into()));
    }
    if let Some((v, _)) = role_cpu(&clients) {
        rows.push(row("client CPU, median / max", v, "—", "—".into()));
    }
    rows
}

/// COST.md: one table per experiment and label.
pub fn render(runs: &[CostRun]) -> String {
    let mut s = String::from(
        "# Whole-process costs\n\n\
         Written by `cargo run --release -p lab --bin cost` (lab/src/cost.rs) from every \
         `runs/cost-*.json` here. The real release binaries on loopback; CPU = user + system \
         time of the process (all threads) from `/proc/<pid>/stat` over the window ÷ wall time, \
         in % of one core (resolution: one clock tick ÷ window, e.g. 0.1 % for 10 s at 100 \
         ticks/s); RSS from `/proc/<pid>/status` (`VmRSS` sampled every second, largest value; \
         `VmHWM` = peak since start), MB = 10⁶ bytes. Medians and maxima are over the \
         processes of a role. Other work shares the machine: CPU *time* is robust to that, \
         but timers and wake-ups may cost a little more than on an idle machine.\n\n",
    );
    for r in runs {
        let _ = writeln!(
            s,
            "## {} — `{}`{}\n",
            r.experiment,
            r.label,
            if r.quick { " (quick)" } else { "" }
        );
        let _ = writeln!(
            s,
            "{}. Warm-up {:.0} s, window {:.1} s, {} ticks/s, recorded {}, load average {}{}.\n",
            r.setup,
            r.warmup_s,
            r.window_s,
            r.clk_tck,
            r.recorded,
            r.loadavg.join(" → "),
            if r.daemon_args.is_empty() {
                String::new()
            } else {
                format!(", daemon arguments `{}`", r.daemon_args.join(" "))
            }
        );
        if !r.ok {
            let _ = writeln!(
                s,
                "**Run failed:** {}\n",
                r.error.as_deref().unwrap_or("unknown")
            );
        }
        let rows = match r.experiment.as_str() {
            _ if r.procs.is_empty() => vec![],
            "idle" => render_idle(r),
            "watched" => render_watched(r),
            "hop" => render_hop(r),
            "scale" => render_scale(r),
            _ => render_memory(r),
        };
        if !rows.is_empty() {
            s += &md_table(&["figure", "value", "goal", "result"], &rows);
            s.push('\n');
        }
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !r.notes.is_empty() {
            s.push('\n');
        }
    }
    if runs.is_empty() {
        s += "No runs yet.\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let text = "4242 (tokio (rt) x) S 17 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 70 3 4 20 0 5 0 123 456789 1234 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            s,
            ProcStat {
                ppid: 17,
                ticks: 320,
                child_ticks: 7
            }
        );
        assert_eq!(parse_stat("12 (x) S 1"), None);
        let me = read_stat(std::process::id()).unwrap();
        assert!(me.ppid > 0);
        assert!(clock_ticks() > 0);
    }

    #[test]
    fn status_gives_rss_and_peak() {
        let text = "Name:\tnode\nVmPeak:\t  900000 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            parse_status(text),
            Some(Mem {
                rss_kb: 10240,
                hwm_kb: 20480
            })
        );
        assert_eq!(parse_status("Name:\tzombie\n"), None);
        let me = read_status(std::process::id()).unwrap();
        assert!(me.rss_kb > 0 && me.hwm_kb >= me.rss_kb);
        assert!((kb_to_mb(1000) - 1.024).abs() < 1e-9);
    }

    #[test]
    fn descendants_follow_parent_pids() {
        let st = |ppid| ProcStat {
            ppid,
            ..Default::default()
        };
        let all: BTreeMap<u32, ProcStat> = [
            (10, st(1)),
            (11, st(10)),
            (12, st(11)),
            (13, st(1)),
            (14, st(10)),
        ]
        .into();
        let mut d = descendants(&all, 10);
        d.sort();
        assert_eq!(d, vec![11, 12, 14]);
        assert!(descendants(&all, 13).is_empty());
    }

    #[test]
    fn chains_link_neighbours_both_ways() {
        let t = chain(97, 3);
        let (topo, warnings) = common::topology::Topology::parse(&t).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(topo.len(), 3);
        assert_eq!(topo.edge_count(), 2);
    }

    fn proc(name: &str, role: &str, cpu: f64, rss: f64) -> ProcCost {
        ProcCost {
            name: name.into(),
            role: role.into(),
            note: String::new(),
            pid: 1,
            cpu_s: 0.0,
            cpu_pct: cpu,
            children_cpu_pct: 0.0,
            children: vec![],
            rss_mb: rss,
            rss_max_mb: rss,
            hwm_mb: rss,
        }
    }

    #[test]
    fn reports_render_goals_and_read_back() {
        let cfg = Config::new(true, PathBuf::from("x"), PathBuf::from("y"));
        let mut idle = CostRun::new(&cfg, "idle", "grid");
        idle.ok = true;
        idle.procs = vec![
            proc("bootstrapper", "bootstrapper", 0.01, 5.0),
            proc("server-a", "server", 0.1, 12.0),
            proc("node-a", "relay", 0.1, 8.0),
            proc("node-b", "relay", 0.3, 9.0),
        ];
        let mut mem = CostRun::new(&cfg, "memory", "chain");
        mem.ok = true;
        let mut relay = proc("node-127.0.98.2", "relay", 3.0, 25.0);
        relay.note = "hop 1".into();
        relay.hwm_mb = 31.0;
        mem.procs = vec![relay];
        mem.streams = (0..10)
            .map(|i| StreamRate {
                stream: format!("ch{i:02}"),
                client: format!("client-ch{i:02}"),
                mbps: Some(3.0),
                packets: 10,
                lost: 0,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &mem).unwrap();
        save(dir.path(), &idle).unwrap();
        std::fs::write(dir.path().join("runs/cost-broken-x.json"), "{").unwrap();
        rewrite_report(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("COST.md")).unwrap();
        assert!(
            md.find("## idle").unwrap() < md.find("## memory").unwrap(),
            "{md}"
        );
        assert!(
            md.contains("| relay node CPU, median / max | 0.200 % / 0.300 % (n = 2) | ≤ 0.2 % each | **FAIL** |"),
            "{md}"
        );
        assert!(md.contains("| hottest daemon | 0.300 % (node-b) |"), "{md}");
        assert!(
            md.contains("| whole overlay CPU (4 daemons) | 0.510 % | ≤ 0.8 % (4 × 0.2 %) | PASS |"),
            "{md}"
        );
        assert!(
            md.contains("| streams through each relay (playing) | 10 (10) | 10 | PASS |"),
            "{md}"
        );
        assert!(
            md.contains("| total bit rate at the clients | 30.00 Mb/s |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| relay 127.0.98.2 (hop 1) RSS, max in window | 25.0 MB | ≤ 30 MB | PASS |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| relay 127.0.98.2 peak RSS since start (VmHWM) | 31.0 MB | ≤ 30 MB | **FAIL** |"
            ),
            "{md}"
        );
    }
}

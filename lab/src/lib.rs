//! # lab — a whole Pessi Streamer overlay on one machine
//!
//! Reads a topology, gives each host a role (servers, relay nodes, the client's PoPs), starts the
//! real binaries on their `127.0.0.x` addresses — bootstrapper, servers, nodes, then a client —
//! and supervises them. Without videos the server plays a built-in test channel (an FFmpeg test
//! pattern with a running clock and a tone), so the demo needs no files. A scenario file can kill,
//! restart and impair hosts at given times, for the tests and benchmarks.
//!
//! With `--netns` ([`netns`], [`overlay::Lab`]) every host runs in its own network namespace on
//! a private bridge instead, as on separate machines.

pub mod bench;
pub mod bench_plots;
pub mod cost;
pub mod hop;
pub mod netns;
pub mod overlay;
pub mod process;
pub mod scenario;
pub mod stats;

use anyhow::Context;
use common::topology::{Topology, TopologyError};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the built-in test channel.
pub const DEMO_CHANNEL: &str = "demo";

/// The built-in live source: a test pattern with a frame counter and clock, and a 440 Hz tone
/// (the server's `--source NAME=lavfi:VIDEO|AUDIO` syntax).
pub const DEMO_SOURCE: &str =
    "lavfi:testsrc2=size=640x360:rate=25|sine=frequency=440:sample_rate=48000";

/// Who runs where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The topology file (handed to the bootstrapper).
    pub topology_path: PathBuf,
    /// Its content.
    pub topology: Topology,
    /// Where the bootstrapper listens (TCP).
    pub bootstrapper: SocketAddr,
    /// Hosts that run a server.
    pub servers: Vec<IpAddr>,
    /// Hosts that run a relay node (every other host).
    pub nodes: Vec<IpAddr>,
    /// The client's points of presence.
    pub pops: Vec<IpAddr>,
    /// Where each host of the topology file really is, when not at its own address (`--netns`:
    /// its namespace's address). Hosts not listed are at their own address.
    pub addresses: BTreeMap<IpAddr, IpAddr>,
}

impl Plan {
    /// Builds a plan: `servers` defaults to the first host of the file, `pops` to the hosts
    /// farthest (in hops) from any server, so the stream crosses the most relays.
    pub fn new(
        topology_path: PathBuf,
        servers: Vec<IpAddr>,
        pops: Vec<IpAddr>,
        bootstrapper_ip: Option<IpAddr>,
        port: u16,
    ) -> anyhow::Result<Plan> {
        let (topology, warnings) = Topology::load(&topology_path)?;
        for w in warnings {
            tracing::warn!("topology: {w}");
        }
        let servers = if servers.is_empty() {
            vec![topology.hosts().next().context("empty topology")?]
        } else {
            servers
        };
        for s in servers.iter().chain(&pops) {
            anyhow::ensure!(
                topology.contains(*s),
                "{s} is not a host of {}",
                topology_path.display()
            );
        }
        let nodes: Vec<IpAddr> = topology.hosts().filter(|h| !servers.contains(h)).collect();
        let pops = if pops.is_empty() {
            farthest_from(&topology, &servers)
        } else {
            pops
        };
        anyhow::ensure!(!pops.is_empty(), "no host can serve as the client's PoP");
        let bootstrapper_ip = match bootstrapper_ip {
            Some(ip) => ip,
            None => free_loopback_ip(&topology)?,
        };
        Ok(Plan {
            topology_path,
            topology,
            bootstrapper: SocketAddr::new(bootstrapper_ip, port),
            servers,
            nodes,
            pops,
            addresses: BTreeMap::new(),
        })
    }

    /// The address host `host` (named as in the topology file) has in the lab: its own on
    /// loopback, its namespace's with `--netns`.
    pub fn addr(&self, host: IpAddr) -> IpAddr {
        self.addresses.get(&host).copied().unwrap_or(host)
    }

    /// The topology with every host at its lab address ([`Plan::addr`]): what the bootstrapper
    /// serves.
    pub fn lab_topology(&self) -> Topology {
        Topology::from_adjacency(self.topology.hosts().map(|h| {
            let n = self.topology.neighbours(h).unwrap_or(&[]);
            (self.addr(h), n.iter().map(|x| self.addr(*x)).collect())
        }))
    }
}

/// Why a host cannot be added to a topology.
#[derive(Debug, thiserror::Error)]
pub enum AddHostError {
    /// The host is already in the topology.
    #[error("{0} is already a host of the topology")]
    Exists(IpAddr),
    /// A link goes to a host that is not in the topology.
    #[error("cannot link {host} to {link}: {link} is not a host of the topology")]
    UnknownLink {
        /// The host being added.
        host: IpAddr,
        /// The link's other end.
        link: IpAddr,
    },
    /// The result does not validate.
    #[error(transparent)]
    Invalid(#[from] TopologyError),
}

/// `topology` with `host` added, linked both ways to every host of `links` (appended to their
/// neighbour lists); validated.
pub fn with_host(
    topology: &Topology,
    host: IpAddr,
    links: &[IpAddr],
) -> Result<Topology, AddHostError> {
    if topology.contains(host) {
        return Err(AddHostError::Exists(host));
    }
    if let Some(link) = links.iter().find(|l| !topology.contains(**l)) {
        return Err(AddHostError::UnknownLink { host, link: *link });
    }
    let mut own: Vec<IpAddr> = Vec::new();
    for l in links {
        if !own.contains(l) {
            own.push(*l);
        }
    }
    let t = Topology::from_adjacency(
        topology
            .hosts()
            .map(|h| {
                let mut n = topology.neighbours(h).unwrap_or(&[]).to_vec();
                if own.contains(&h) {
                    n.push(host);
                }
                (h, n)
            })
            .chain([(host, own.clone())]),
    );
    t.validate()?;
    Ok(t)
}

/// Writes `text` to `path` atomically: into a temporary file next to it, then renamed over it,
/// so a reader (the bootstrapper's watcher) never sees half a file.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The default topology: `topologies/neighbours.toml` of the repository the lab was built from,
/// else next to the executable (whatever the current directory).
pub fn default_topology() -> PathBuf {
    common::runtime::shipped_file("topologies/neighbours.toml")
}

/// The default folder for logs and stats: `target/lab` of the repository the lab was built
/// from, else `lab-logs` next to the executable.
pub fn default_log_dir() -> PathBuf {
    match common::runtime::repo_root() {
        Some(r) => r.join("target").join("lab"),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("lab-logs")))
            .unwrap_or_else(|| PathBuf::from("lab-logs")),
    }
}

/// Hosts at the largest hop distance from the nearest server (servers excluded).
pub fn farthest_from(topology: &Topology, servers: &[IpAddr]) -> Vec<IpAddr> {
    let mut dist: HashMap<IpAddr, usize> = HashMap::new();
    let mut queue: VecDeque<IpAddr> = servers.iter().copied().collect();
    for s in servers {
        dist.insert(*s, 0);
    }
    while let Some(h) = queue.pop_front() {
        let d = dist[&h];
        for n in topology.neighbours(h).unwrap_or(&[]) {
            if !dist.contains_key(n) {
                dist.insert(*n, d + 1);
                queue.push_back(*n);
            }
        }
    }
    let max = dist
        .iter()
        .filter(|(h, _)| !servers.contains(h))
        .map(|(_, d)| *d)
        .max();
    let mut out: Vec<IpAddr> = dist
        .iter()
        .filter(|(h, d)| Some(**d) == max && !servers.contains(h))
        .map(|(h, _)| *h)
        .collect();
    out.sort();
    out
}

/// An address for the bootstrapper that is not a host of `topology`: the highest free one in
/// the /24 of the topology's first IPv4 host (`127.0.0.254` for the default topology), so labs
/// on different address blocks do not collide.
fn free_loopback_ip(topology: &Topology) -> anyhow::Result<IpAddr> {
    let taken: BTreeSet<IpAddr> = topology.hosts().collect();
    let [a, b, c] = topology
        .hosts()
        .find_map(|h| match h {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Some([o[0], o[1], o[2]])
            }
            IpAddr::V6(_) => None,
        })
        .unwrap_or([127, 0, 0]);
    (1..=254u8)
        .rev()
        .map(|i| IpAddr::from([a, b, c, i]))
        .find(|ip| !taken.contains(ip))
        .with_context(|| format!("no free {a}.{b}.{c}.x address for the bootstrapper"))
}

/// What the servers serve.
#[derive(Debug, Clone, Default)]
pub struct Media {
    /// A videos folder (every server serves it), if any.
    pub videos: Option<PathBuf>,
    /// Live sources `NAME=INPUT` (the built-in demo channel when neither is given).
    pub sources: Vec<String>,
}

/// Process names used by the supervisor (and by scenario files).
pub fn process_name(role: &str, ip: IpAddr) -> String {
    format!("{role}-{ip}")
}

/// Arguments of the bootstrapper (it serves `plan.topology_path`).
pub fn bootstrapper_args(plan: &Plan) -> Vec<OsString> {
    vec![
        "--bind-ip".into(),
        plan.bootstrapper.ip().to_string().into(),
        "--port".into(),
        plan.bootstrapper.port().to_string().into(),
        "--config".into(),
        plan.topology_path.clone().into(),
    ]
}

/// Arguments shared by servers and nodes.
pub fn host_args(plan: &Plan, ip: IpAddr, impair: Option<&str>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--ip".into(),
        plan.addr(ip).to_string().into(),
        "--bootstrapper".into(),
        plan.bootstrapper.ip().to_string().into(),
        "--bootstrapper-port".into(),
        plan.bootstrapper.port().to_string().into(),
    ];
    if let Some(spec) = impair {
        a.push("--impair".into());
        a.push(spec.into());
    }
    a
}

/// Arguments of a server.
pub fn server_args(plan: &Plan, ip: IpAddr, media: &Media, impair: Option<&str>) -> Vec<OsString> {
    let mut a = host_args(plan, ip, impair);
    if let Some(v) = &media.videos {
        a.push("--videos".into());
        a.push(v.clone().into());
    }
    let sources: Vec<String> = if media.videos.is_none() && media.sources.is_empty() {
        vec![format!("{DEMO_CHANNEL}={DEMO_SOURCE}")]
    } else {
        media.sources.clone()
    };
    for s in sources {
        a.push("--source".into());
        a.push(s.into());
    }
    a
}

/// Arguments of a headless client without a player, watching `pops` and writing its stats to
/// `stats` (the tests' and the benchmark's client).
pub fn headless_client_args(pops: &[String], stats: &std::path::Path) -> Vec<OsString> {
    vec![
        "--servers".into(),
        pops.join(",").into(),
        "--headless".into(),
        "--video-player".into(),
        "none".into(),
        "--stats".into(),
        stats.into(),
    ]
}

/// Waits until `addr` accepts TCP connections (the bootstrapper is up), up to `within`.
pub async fn wait_for_tcp(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if t0.elapsed() > within {
            anyhow::bail!("nothing listens on {addr} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When started by `cargo run`, builds the other binaries of the workspace (same profile) so
/// the demo is one command. Skipped when not run through cargo.
pub fn build_siblings() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "release");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "bootstrapper",
        "-p",
        "server",
        "-p",
        "node",
        "-p",
        "client",
    ]);
    if release {
        cmd.arg("--release");
    }
    tracing::info!(
        "building the overlay's binaries (cargo build{})",
        if release { " --release" } else { "" }
    );
    let status = cmd.status().context("running cargo build")?;
    anyhow::ensure!(
        status.success(),
        "cargo build of the overlay's binaries failed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../topologies")).join(name)
    }

    #[test]
    fn default_plan_of_the_shipped_topology() {
        let p = Plan::new(topo("neighbours.toml"), vec![], vec![], None, 8010).unwrap();
        assert_eq!(p.servers, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.nodes.len(), 4);
        // 127.0.0.5 is three hops from the server: the farthest.
        assert_eq!(p.pops, vec!["127.0.0.5".parse::<IpAddr>().unwrap()]);
        assert!(!p.topology.contains(p.bootstrapper.ip()));
        assert_eq!(
            p.bootstrapper.ip(),
            "127.0.0.254".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn grid_pops_are_the_far_corner() {
        let s: IpAddr = "127.0.1.100".parse().unwrap();
        let p = Plan::new(topo("grid4x5.toml"), vec![s], vec![], None, 8010).unwrap();
        assert_eq!(p.pops, vec!["127.0.1.101".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.nodes.len(), 21);
    }

    #[test]
    fn a_host_is_added_with_links_both_ways() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let p = Plan::new(topo("neighbours.toml"), vec![], vec![], None, 8010).unwrap();
        let t = with_host(
            &p.topology,
            ip("127.0.0.6"),
            &[ip("127.0.0.5"), ip("127.0.0.4")],
        )
        .unwrap();
        assert_eq!(t.len(), 6);
        assert_eq!(
            t.neighbours(ip("127.0.0.6")).unwrap(),
            [ip("127.0.0.5"), ip("127.0.0.4")]
        );
        assert!(t
            .neighbours(ip("127.0.0.5"))
            .unwrap()
            .contains(&ip("127.0.0.6")));
        assert!(t
            .neighbours(ip("127.0.0.4"))
            .unwrap()
            .contains(&ip("127.0.0.6")));
        assert_eq!(t.edge_count(), p.topology.edge_count() + 2);
        // What is written reads back the same.
        let (back, warnings) = Topology::parse(&t.to_toml_string()).unwrap();
        assert_eq!(back, t);
        assert!(warnings.is_empty(), "{warnings:?}");
        let e = with_host(&p.topology, ip("127.0.0.2"), &[ip("127.0.0.5")]).unwrap_err();
        assert!(e.to_string().contains("already a host"), "{e}");
        let e = with_host(&p.topology, ip("127.0.0.6"), &[ip("127.0.0.9")]).unwrap_err();
        assert!(e.to_string().contains("127.0.0.9 is not a host"), "{e}");
    }

    #[test]
    fn lab_addresses_translate_the_topology() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut p = Plan::new(topo("neighbours.toml"), vec![], vec![], None, 8010).unwrap();
        assert_eq!(p.lab_topology(), p.topology);
        for (i, h) in p
            .topology
            .hosts()
            .collect::<Vec<_>>()
            .into_iter()
            .enumerate()
        {
            p.addresses
                .insert(h, IpAddr::from([10, 77, 3, i as u8 + 1]));
        }
        let t = p.lab_topology();
        assert_eq!(p.addr(ip("127.0.0.1")), ip("10.77.3.1"));
        assert_eq!(t.neighbours(ip("10.77.3.1")).unwrap(), [ip("10.77.3.2")]);
        assert_eq!(t.edge_count(), p.topology.edge_count());
        let args = host_args(&p, ip("127.0.0.2"), None);
        assert_eq!(args[1], OsString::from("10.77.3.2"));
    }

    #[test]
    fn default_paths_do_not_depend_on_the_current_directory() {
        assert!(default_topology().is_absolute());
        assert!(
            default_topology().is_file(),
            "{}",
            default_topology().display()
        );
        assert!(default_log_dir().is_absolute());
        assert!(default_log_dir().ends_with("target/lab"));
    }

    #[test]
    fn unknown_hosts_are_named() {
        let e = Plan::new(
            topo("neighbours.toml"),
            vec!["127.0.0.99".parse().unwrap()],
            vec![],
            None,
            8010,
        )
        .unwrap_err();
        assert!(e.to_string().contains("127.0.0.99 is not a host"), "{e}");
    }
}

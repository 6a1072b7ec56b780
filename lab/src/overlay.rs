//! A running lab, on loopback or with every host in its own network namespace (`--netns`): the
//! operations the `lab` binary and the end-to-end tests share.
//!
//! [`Lab::new`] prepares the hosts' addresses (with `--netns`: the lab network, one namespace
//! per topology host and one for the bootstrapper, each host mapped to a lab address) and
//! writes the bootstrapper's own copy of the topology (at lab addresses) into the log folder, so
//! the lab can edit it while the overlay runs without touching the user's file.
//! [`Lab::start`] starts the bootstrapper, the servers and the nodes; [`Lab::spawn_client`]
//! starts a client (in a namespace of its own with `--netns`); [`Lab::add_host`] adds a host
//! while the overlay runs; [`Lab::step`] runs a scenario step; [`Lab::shutdown`] stops every
//! process and removes the lab network (dropping the `Lab` does too, less gently).

use crate::netns::{LabNet, NetHost};
use crate::process::{Binaries, Supervisor};
use crate::scenario::{Action, Step};
use crate::{Media, Plan};
use anyhow::Context;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// File name of the bootstrapper's copy of the topology, in the log folder.
pub const BOOTSTRAPPER_TOPOLOGY: &str = "bootstrapper-topology.toml";

/// How long a new host may wait for the bootstrapper to know it (file reload).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the bootstrapper may take to listen.
const BOOTSTRAPPER_START: Duration = Duration::from_secs(20);

/// How to run a lab.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Every host (bootstrapper, servers, nodes, clients) in its own network namespace.
    pub netns: bool,
    /// What the servers serve.
    pub media: Media,
    /// `--impair` per host (named as in the topology file).
    pub impair: BTreeMap<IpAddr, String>,
}

/// The namespaces of a `--netns` lab.
struct Net {
    /// Per topology host (named as in the topology file).
    hosts: BTreeMap<IpAddr, NetHost>,
    /// The bootstrapper's.
    bootstrapper: NetHost,
    /// Per client process name.
    clients: BTreeMap<String, NetHost>,
    /// The bridge and namespaces; removed when dropped.
    net: LabNet,
}

/// A lab: its plan (at lab addresses), its processes and, with `--netns`, its network.
pub struct Lab {
    plan: Plan,
    /// Before `net`: dropping it kills the processes before their namespaces are removed.
    sup: Supervisor,
    bins: Binaries,
    opts: LabOptions,
    net: Option<Net>,
}

impl Lab {
    /// Prepares a lab for `plan` with logs in `log_dir`: with `opts.netns`, creates the lab
    /// network and a namespace for every host of the topology and for the bootstrapper (logging
    /// which lab address each host got); in any case writes the bootstrapper's copy of the
    /// topology (at lab addresses) to `<log_dir>/bootstrapper-topology.toml` and points
    /// `plan.topology_path` at it. Starts nothing.
    pub fn new(
        mut plan: Plan,
        bins: Binaries,
        log_dir: PathBuf,
        opts: LabOptions,
    ) -> anyhow::Result<Lab> {
        let sup = Supervisor::new(log_dir.clone())?;
        let net = if opts.netns {
            let mut net = LabNet::create().context("cannot create the lab network")?;
            let mut hosts = BTreeMap::new();
            for h in plan.topology.hosts().collect::<Vec<_>>() {
                let nh = net.add_host().context("cannot create a lab host")?;
                info!(host = %h, lab_address = %nh.addr, netns = %nh.netns, "lab address");
                plan.addresses.insert(h, nh.addr.into());
                hosts.insert(h, nh);
            }
            let b = net.add_host().context("cannot create a lab host")?;
            info!(lab_address = %b.addr, netns = %b.netns, "lab address of the bootstrapper");
            plan.bootstrapper = SocketAddr::new(b.addr.into(), plan.bootstrapper.port());
            info!(
                subnet = %net.subnet(),
                bridge = %net.bridge(),
                this_machine = %net.bridge_addr(),
                "every host runs in its own network namespace"
            );
            if opts.impair.values().any(|s| s.contains("to=")) {
                warn!("--netns: `to=` in an impairment names a peer by its lab address");
            }
            Some(Net {
                hosts,
                bootstrapper: b,
                clients: BTreeMap::new(),
                net,
            })
        } else {
            None
        };
        plan.topology_path = log_dir.join(BOOTSTRAPPER_TOPOLOGY);
        let lab = Lab {
            plan,
            sup,
            bins,
            opts,
            net,
        };
        lab.write_topology()?;
        // One network key for the run, before any host starts.
        common::keys::load_or_create(&lab.sup.key_dir().join("network.key"))?;
        Ok(lab)
    }

    /// The plan: topology (as in the user's file), roles, lab addresses.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The supervisor of the lab's processes (kill, restart, logs…).
    pub fn supervisor(&mut self) -> &mut Supervisor {
        &mut self.sup
    }

    /// The log file of process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.sup.log_path(name)
    }

    /// The file the bootstrapper serves (the lab's copy of the topology).
    pub fn topology_path(&self) -> &Path {
        &self.plan.topology_path
    }

    /// The lab network, with `--netns`.
    pub fn network(&self) -> Option<&LabNet> {
        self.net.as_ref().map(|n| &n.net)
    }

    /// The address `host` (named as in the topology file) has in the lab.
    pub fn addr(&self, host: IpAddr) -> IpAddr {
        self.plan.addr(host)
    }

    /// The lab addresses of `hosts`, comma-separated (a client's `--servers`).
    pub fn addr_list(&self, hosts: &[IpAddr]) -> String {
        hosts
            .iter()
            .map(|h| self.addr(*h).to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The supervisor's name of the process running `host`: `server-<host>` or `node-<host>`.
    pub fn process_of(&self, host: IpAddr) -> String {
        let role = if self.plan.servers.contains(&host) {
            "server"
        } else {
            "node"
        };
        crate::process_name(role, host)
    }

    /// The namespace file of `host`, with `--netns`.
    pub fn netns_of(&self, host: IpAddr) -> Option<PathBuf> {
        self.net
            .as_ref()
            .and_then(|n| n.hosts.get(&host))
            .map(NetHost::path)
    }

    /// Starts the bootstrapper (and waits until it listens), then the servers and the nodes.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let ns = self.net.as_ref().map(|n| n.bootstrapper.path());
        self.sup.spawn_in(
            "bootstrapper",
            self.bins.path("bootstrapper"),
            crate::bootstrapper_args(&self.plan),
            ns,
        )?;
        crate::wait_for_tcp(self.plan.bootstrapper, BOOTSTRAPPER_START)
            .await
            .context("the bootstrapper did not start (see its log)")?;
        for s in self.plan.servers.clone() {
            self.spawn_host(s)?;
        }
        for n in self.plan.nodes.clone() {
            self.spawn_host(n)?;
        }
        Ok(())
    }

    /// Starts the server or node of `host` (in its namespace with `--netns`).
    fn spawn_host(&mut self, host: IpAddr) -> anyhow::Result<()> {
        let impair = self.opts.impair.get(&host).map(String::as_str);
        let (role, args) = if self.plan.servers.contains(&host) {
            let a = crate::server_args(&self.plan, host, &self.opts.media, impair);
            ("server", a)
        } else {
            ("node", crate::host_args(&self.plan, host, impair))
        };
        let ns = self.netns_of(host);
        self.sup.spawn_in(
            &crate::process_name(role, host),
            self.bins.path(role),
            args,
            ns,
        )
    }

    /// Starts a client named `name` with `args` (which name the PoPs at their lab addresses,
    /// see [`Lab::addr_list`]); with `--netns` it runs in a namespace of its own (the same one
    /// if it is started again under the same name).
    pub fn spawn_client(&mut self, name: &str, args: Vec<OsString>) -> anyhow::Result<()> {
        let ns = match &mut self.net {
            Some(n) => {
                let host = match n.clients.get(name) {
                    Some(h) => h.clone(),
                    None => {
                        let h = n.net.add_host().context("cannot create a lab host")?;
                        info!(client = name, lab_address = %h.addr, netns = %h.netns, "lab address of a client");
                        n.clients.insert(name.to_owned(), h.clone());
                        h
                    }
                };
                Some(host.path())
            }
            None => None,
        };
        self.sup.spawn_in(name, self.bins.path("client"), args, ns)
    }

    /// Adds `host` to the running overlay, linked (both directions) to every host of `links`:
    /// with `--netns` creates its namespace; edits the bootstrapper's copy of the topology
    /// (written to a temporary file, then renamed over it); waits until the bootstrapper has
    /// reloaded it (it answers the new host); then starts a node there, with `impair` if given.
    pub async fn add_host(
        &mut self,
        host: IpAddr,
        links: &[IpAddr],
        impair: Option<&str>,
    ) -> anyhow::Result<()> {
        let topology = crate::with_host(&self.plan.topology, host, links)?;
        anyhow::ensure!(
            self.net.is_some() || host != self.plan.bootstrapper.ip(),
            "{host} is the bootstrapper's address"
        );
        if let Some(n) = &mut self.net {
            let h = n.net.add_host().context("cannot create a lab host")?;
            info!(%host, lab_address = %h.addr, netns = %h.netns, "lab address");
            self.plan.addresses.insert(host, h.addr.into());
            n.hosts.insert(host, h);
        }
        self.plan.topology = topology;
        self.plan.nodes.push(host);
        if let Some(spec) = impair {
            self.opts.impair.insert(host, spec.to_owned());
        }
        self.write_topology()?;
        info!(%host, lab_address = %self.addr(host), ?links, "host added to the bootstrapper's topology");
        self.wait_known(host).await?;
        self.spawn_host(host)
    }

    /// Writes the topology at lab addresses to the bootstrapper's file, atomically.
    fn write_topology(&self) -> anyhow::Result<()> {
        let path = &self.plan.topology_path;
        crate::write_atomically(path, &self.plan.lab_topology().to_toml_string())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Waits until the bootstrapper answers `host` (asking from `host`'s address, in its
    /// namespace with `--netns`) with its neighbours: it has reloaded its topology.
    async fn wait_known(&self, host: IpAddr) -> anyhow::Result<()> {
        let links = self.plan.topology.neighbours(host).map_or(0, <[_]>::len);
        let bootstrapper = self.plan.bootstrapper;
        let addr = self.addr(host);
        let ns = self.netns_of(host);
        let t0 = Instant::now();
        // Asked as the host itself (its own key files), so the registration is its.
        let dir = self.sup.key_dir();
        let keys = common::host::load_keys(
            addr,
            Some(&common::keys::default_host_key_in(&dir, addr)),
            Some(&dir.join("network.key")),
        )?;
        let answer = crate::netns::run_in(ns.as_deref(), move || -> anyhow::Result<usize> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                loop {
                    let tried =
                        common::bootstrap::fetch_neighbours(bootstrapper, addr, &keys).await;
                    match tried {
                        Ok(n) if n.neighbours.len() == links => return Ok(n.neighbours.len()),
                        Ok(_) | Err(_) if t0.elapsed() < RELOAD_TIMEOUT => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Ok(n) => anyhow::bail!(
                            "the bootstrapper gives {addr} {} neighbours, not {links}",
                            n.neighbours.len()
                        ),
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        })
        .await?
        .with_context(|| {
            format!("the bootstrapper did not take the new host {host} within {RELOAD_TIMEOUT:?}")
        })?;
        info!(%host, neighbours = answer, after = ?t0.elapsed(), "the bootstrapper knows the new host");
        Ok(())
    }

    /// Runs one scenario step.
    pub async fn step(&mut self, step: &Step) -> anyhow::Result<()> {
        let name = self.process_of(step.host);
        info!(at = ?step.at, action = ?step.action, host = %step.host, "scenario step");
        match step.action {
            Action::Kill => self.sup.kill(&name).await,
            Action::Stop => self.sup.stop(&name, Duration::from_secs(3)).await,
            Action::Restart => {
                let extra: Vec<String> = step
                    .impair
                    .iter()
                    .flat_map(|s| ["--impair".to_owned(), s.clone()])
                    .collect();
                self.sup.restart(&name, &extra).await
            }
            Action::Add => {
                self.add_host(step.host, &step.links, step.impair.as_deref())
                    .await
            }
        }
    }

    /// Stops every process (last started first: SIGTERM, SIGKILL after `grace`), then removes
    /// the lab network.
    pub async fn shutdown(&mut self, grace: Duration) {
        self.sup.stop_all(grace).await;
        if let Some(mut n) = self.net.take() {
            n.net.teardown();
        }
    }
}

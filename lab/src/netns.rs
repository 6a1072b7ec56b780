//! Real separate hosts on one machine: every host of a lab in its own Linux network namespace.
//!
//! A [`LabNet`] is one bridge in the root namespace (`pb<pid>`, address `10.77.N.254/24`) and,
//! per host, a namespace `pessi<pid>-h<i>` joined to the bridge by a veth pair (`pv<pid>h<i>`
//! in the root namespace, enslaved to the bridge; `eth0` inside, with `10.77.N.<i+1>/24`; `lo`
//! up). `N` is picked so that no address or route of the machine overlaps `10.77.N.0/24`. The
//! bridge's `.254` lets the lab itself (and anyone on the machine) reach every host.
//!
//! Names carry the lab's pid, so several labs coexist; everything is removed by
//! [`LabNet::teardown`] (also on drop), and [`remove_stale`] (also done by [`LabNet::create`])
//! removes what a lab that died without cleaning up (its pid no longer alive) left behind.
//!
//! Processes are put into a host's namespace by [`enter_in_child`]: `setns(CLONE_NEWNET)` in a
//! `pre_exec` hook, so they stay direct children of the lab (and die with it).
//!
//! Needs root and iproute2 with `ip netns` ([`check_support`] says which is missing).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use tracing::{debug, info, warn};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The first two octets of every lab subnet (`10.77.N.0/24`).
const BASE: [u8; 2] = [10, 77];

/// The last octet of the bridge's (root namespace's) address.
const BRIDGE_HOST: u8 = 254;

/// Hosts a lab network holds: `.1` to `.253`.
pub const MAX_HOSTS: usize = 253;

/// One lab network per process at a time (its interface names carry only the pid).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Why a lab network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Not running as root.
    #[error(
        "--netns needs root: it creates network namespaces, a bridge and veth pairs (try \
         `sudo`); the plain loopback lab (without --netns) needs neither root nor `ip netns`"
    )]
    NotRoot,
    /// `ip netns` does not work here.
    #[error(
        "--netns needs a working `ip netns` (iproute2, network namespaces allowed): {reason}; \
         the plain loopback lab (without --netns) needs neither root nor `ip netns`"
    )]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Command {
        /// Its arguments.
        args: String,
        /// What it printed on stderr (or its exit status).
        stderr: String,
    },
    /// `ip` could not be started.
    #[error("cannot run `ip` (install iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    /// Every `10.77.N.0/24` overlaps something on this machine.
    #[error("no free 10.77.N.0/24 subnet: every one overlaps an address or route of this machine")]
    NoSubnet,
    /// More than [`MAX_HOSTS`] hosts.
    #[error("a lab network holds at most {MAX_HOSTS} hosts")]
    Full,
    /// This process already has a lab network.
    #[error("this process already runs a lab network (one at a time per process)")]
    AlreadyActive,
    /// A namespace file could not be opened.
    #[error("cannot open the network namespace {}: {source}", path.display())]
    Open {
        /// `/run/netns/<name>`.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `ip args…`; returns its stdout.
fn ip<S: AsRef<str>>(args: &[S]) -> Result<String, NetnsError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new("ip")
        .args(&args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(NetnsError::Command {
            args: args.join(" "),
            stderr: if stderr.is_empty() {
                out.status.to_string()
            } else {
                stderr
            },
        })
    }
}

/// Checks that lab networks can be made here: root, and `ip netns add`/`del` really work (a
/// probe namespace is created and removed).
pub fn check_support() -> Result<(), NetnsError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(NetnsError::NotRoot);
    }
    static PROBE: AtomicU32 = AtomicU32::new(0);
    let probe = format!(
        "pessi{}-probe{}",
        std::process::id(),
        PROBE.fetch_add(1, Ordering::Relaxed)
    );
    let unavailable = |e: NetnsError| NetnsError::Unavailable {
        reason: e.to_string(),
    };
    ip(&["netns", "add", &probe]).map_err(unavailable)?;
    let tried = ip(&["-n", &probe, "link", "set", "lo", "up"]);
    let _ = ip(&["netns", "del", &probe]);
    tried.map_err(unavailable)?;
    Ok(())
}

/// One host of a lab network: a namespace and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHost {
    /// Namespace name (`pessi<pid>-h<i>`), as `ip netns` lists it.
    pub netns: String,
    /// Its address on the lab network.
    pub addr: Ipv4Addr,
    /// The root namespace's end of its veth pair (`pv<pid>h<i>`).
    pub veth: String,
}

impl NetHost {
    /// `/run/netns/<name>`, the file [`enter_in_child`] opens.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }
}

/// A bridge and the namespaces attached to it; removed by [`LabNet::teardown`] or on drop.
#[derive(Debug)]
pub struct LabNet {
    pid: u32,
    bridge: String,
    subnet: [u8; 3],
    hosts: Vec<NetHost>,
    torn_down: bool,
}

impl LabNet {
    /// Removes what crashed labs left ([`remove_stale`]), picks a free `10.77.N.0/24`, and
    /// creates the bridge `pb<pid>` with `10.77.N.254/24`, up.
    pub fn create() -> Result<LabNet, NetnsError> {
        if ACTIVE.swap(true, Ordering::SeqCst) {
            return Err(NetnsError::AlreadyActive);
        }
        let pid = std::process::id();
        // From here on, dropping `net` removes whatever was made.
        let mut net = LabNet {
            pid,
            bridge: format!("pb{pid}"),
            subnet: [BASE[0], BASE[1], 0],
            hosts: Vec::new(),
            torn_down: false,
        };
        remove_leftovers(Some(pid));
        if let Some(sysctl) = bridge_netfilter() {
            info!(
                "{sysctl} = 1: bridged traffic goes through iptables; if the hosts cannot reach \
                 each other, look for a FORWARD rule that drops it"
            );
        }
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        // Two labs starting at once could pick the same subnet: start at a pid-dependent N, and
        // after taking one, check that no other interface took it too.
        let start = (pid % 256) as u8;
        for k in 0..=255u8 {
            let n = start.wrapping_add(k);
            let subnet = (Ipv4Addr::new(BASE[0], BASE[1], n, 0), 24);
            if in_use(&machine_networks()?, subnet, None) {
                continue;
            }
            let cidr = format!("{}/24", Ipv4Addr::new(BASE[0], BASE[1], n, BRIDGE_HOST));
            ip(&["addr", "add", &cidr, "dev", &net.bridge])?;
            if in_use(&machine_networks()?, subnet, Some(&net.bridge)) {
                ip(&["addr", "del", &cidr, "dev", &net.bridge])?;
                continue;
            }
            net.subnet = [BASE[0], BASE[1], n];
            info!(bridge = %net.bridge, subnet = %net.subnet(), "lab network created");
            return Ok(net);
        }
        Err(NetnsError::NoSubnet)
    }

    /// The lab subnet, `10.77.N.0/24`.
    pub fn subnet(&self) -> String {
        format!(
            "{}/24",
            Ipv4Addr::from([self.subnet[0], self.subnet[1], self.subnet[2], 0])
        )
    }

    /// The bridge's address (the root namespace on the lab network).
    pub fn bridge_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from([self.subnet[0], self.subnet[1], self.subnet[2], BRIDGE_HOST])
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The hosts made so far, in order.
    pub fn hosts(&self) -> &[NetHost] {
        &self.hosts
    }

    /// Creates the next host: its namespace (`lo` up), a veth pair to the bridge and the next
    /// address.
    pub fn add_host(&mut self) -> Result<NetHost, NetnsError> {
        let i = self.hosts.len();
        if i >= MAX_HOSTS {
            return Err(NetnsError::Full);
        }
        let host = NetHost {
            netns: format!("pessi{}-h{i}", self.pid),
            addr: Ipv4Addr::from([self.subnet[0], self.subnet[1], self.subnet[2], i as u8 + 1]),
            veth: format!("pv{}h{i}", self.pid),
        };
        ip(&["netns", "add", &host.netns])?;
        // Recorded at once, so a failure below still removes the namespace.
        self.hosts.push(host.clone());
        let ns = host.netns.as_str();
        ip(&[
            "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["link", "set", &host.veth, "master", &self.bridge, "up"])?;
        let cidr = format!("{}/24", host.addr);
        ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        debug!(netns = ns, addr = %host.addr, "lab host created");
        Ok(host)
    }

    /// Removes every namespace, veth pair and the bridge (idempotent; errors are logged).
    /// Processes still running inside a namespace keep it alive until they exit.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for h in &self.hosts {
            // Deleting one end of a veth pair deletes both.
            let _ = ip(&["link", "del", &h.veth]);
            if let Err(e) = ip(&["netns", "del", &h.netns]) {
                warn!(error = %e, "cannot remove a lab namespace");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            warn!(error = %e, "cannot remove the lab bridge");
        }
        info!(bridge = %self.bridge, hosts = self.hosts.len(), "lab network removed");
        ACTIVE.store(false, Ordering::SeqCst);
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Makes the child started by `cmd` enter the network namespace at `netns` (a file under
/// `/run/netns`) before it runs its program: `setns(CLONE_NEWNET)` in a `pre_exec` hook. Other
/// hooks (e.g. `common::runtime::child_command`'s parent-death signal) still run.
pub fn enter_in_child(cmd: &mut tokio::process::Command, netns: &Path) -> Result<(), NetnsError> {
    // Opened here (O_CLOEXEC: the program does not inherit it), kept open by the hook.
    let file = File::open(netns).map_err(|source| NetnsError::Open {
        path: netns.to_owned(),
        source,
    })?;
    // SAFETY: `setns` is async-signal-safe and touches no memory of ours; the file descriptor
    // stays valid because the hook owns `file`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered the network namespace at `netns` (the lab's own
/// when `None`), so the sockets `f` opens live there; returns what `f` returns, without blocking
/// the caller's runtime. The thread ends with `f`, so no other code runs in that namespace.
pub async fn run_in<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = match netns {
        Some(path) => Some(File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?),
        None => None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        if let Some(file) = file {
            // SAFETY: setns on this (new, short-lived) thread only; the fd is valid (owned).
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(std::io::Error::last_os_error()));
                return;
            }
        }
        let _ = tx.send(Ok(f()));
    });
    let path = netns.map(Path::to_owned).unwrap_or_default();
    match rx.await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(source)) => Err(NetnsError::Open { path, source }),
        Err(_) => Err(NetnsError::Open {
            path,
            source: std::io::Error::other("the thread running in the namespace panicked"),
        }),
    }
}

/// Removes the namespaces, bridges and veth pairs of labs whose pid is no longer alive (a lab
/// that crashed or was killed with SIGKILL); returns their names.
pub fn remove_stale() -> Vec<String> {
    remove_leftovers(None)
}

/// [`remove_stale`], and also the names carrying `own` (this process's pid, when it has no lab
/// network yet: they can only be those of a dead process that had the same pid).
fn remove_leftovers(own: Option<u32>) -> Vec<String> {
    let stale = |name: &str| owner_pid(name).is_some_and(|p| Some(p) == own || !alive(p));
    let mut removed = Vec::new();
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|p| !alive(p)) && ip(&["netns", "del", &name]).is_ok() {
                removed.push(name);
            }
        }
    }
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        for name in link_names(&links) {
            if stale(&name) && ip(&["link", "del", &name]).is_ok() {
                removed.push(name);
            }
        }
    }
    if !removed.is_empty() {
        info!(
            ?removed,
            "removed what labs that are no longer running left behind"
        );
    }
    removed
}

/// The pid in a name this module makes (`pessi<pid>-h<i>`, `pessi<pid>-probe<k>`, `pb<pid>`,
/// `pv<pid>h<i>`), or `None` for any other name.
pub fn owner_pid(name: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (pid, rest_ok) = if let Some(r) = name.strip_prefix("pessi") {
        let (pid, rest) = r.split_once('-')?;
        let ok = rest
            .strip_prefix('h')
            .or_else(|| rest.strip_prefix("probe"))
            .is_some_and(digits);
        (pid, ok)
    } else if let Some(r) = name.strip_prefix("pb") {
        (r, true)
    } else if let Some(r) = name.strip_prefix("pv") {
        let (pid, i) = r.split_once('h')?;
        (pid, digits(i))
    } else {
        return None;
    };
    if rest_ok && digits(pid) {
        pid.parse().ok()
    } else {
        None
    }
}

/// Whether process `pid` is running (a zombie, dead but not yet reaped, is not).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S …`: the state follows the last `)` (comm may contain one).
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Interface names in `ip -o link show` output (`2: name@peer: <…>`).
fn link_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// An IPv4 network (address, prefix length) and, when it is an interface's address, the
/// interface.
type Network = (Ipv4Addr, u8, Option<String>);

/// The IPv4 networks of this machine (root namespace): interface addresses and routes.
fn machine_networks() -> Result<Vec<Network>, NetnsError> {
    let mut out = parse_addrs(&ip(&["-o", "-4", "addr", "show"])?);
    out.extend(parse_routes(&ip(&["-4", "route", "show", "table", "all"])?));
    Ok(out)
}

/// `ip -o -4 addr show` lines: `2: eth0    inet 172.17.0.2/16 brd … scope global eth0`.
fn parse_addrs(text: &str) -> Vec<Network> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let dev = w.nth(1)?.to_owned();
            let cidr = w.skip_while(|t| *t != "inet").nth(1)?;
            let (a, p) = parse_cidr(cidr)?;
            Some((a, p, Some(dev)))
        })
        .collect()
}

/// `ip -4 route show table all` lines: `[type] PREFIX …` (`default`, `10.0.0.0/8`,
/// `local 127.0.0.1 …`).
fn parse_routes(text: &str) -> Vec<Network> {
    const TYPES: [&str; 8] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "blackhole",
        "unreachable",
        "prohibit",
        "throw",
    ];
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().peekable();
            if w.peek().is_some_and(|t| TYPES.contains(t)) {
                w.next();
            }
            let (a, p) = parse_cidr(w.next()?)?;
            Some((a, p, None))
        })
        .collect()
}

/// `a.b.c.d/len` or `a.b.c.d` (= /32); `default` is not a network here (it overlaps every
/// subnet but takes no addresses).
fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse().ok().filter(|p| *p <= 32)?),
        None => (s, 32),
    };
    Some((a.parse().ok()?, p))
}

/// Whether two networks overlap.
fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a.0) & mask == u32::from(b.0) & mask
}

/// Whether `subnet` overlaps any of `networks`, ignoring the address of interface `ours`
/// (and its connected route, which has the same prefix).
fn in_use(networks: &[Network], subnet: (Ipv4Addr, u8), ours: Option<&str>) -> bool {
    let ours_prefixes: Vec<(Ipv4Addr, u8)> = networks
        .iter()
        .filter(|(_, _, dev)| ours.is_some() && dev.as_deref() == ours)
        .map(|(a, p, _)| (*a, *p))
        .collect();
    networks.iter().any(|(a, p, dev)| {
        if ours.is_some() && dev.as_deref() == ours {
            return false;
        }
        if dev.is_none() && ours_prefixes.iter().any(|o| overlaps(*o, (*a, *p))) {
            // A route to (or through) our own address: ours, unless another interface has an
            // address there too, which the address lines show.
            return false;
        }
        overlaps((*a, *p), subnet)
    })
}

/// The `bridge-nf-call-iptables` sysctl, when it is on (bridged frames go through iptables).
fn bridge_netfilter() -> Option<&'static str> {
    const SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    std::fs::read_to_string(SYSCTL)
        .ok()
        .filter(|v| v.trim() == "1")
        .map(|_| "net.bridge.bridge-nf-call-iptables")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_recognised_with_their_pid() {
        assert_eq!(owner_pid("pessi1234-h0"), Some(1234));
        assert_eq!(owner_pid("pessi1234-h12"), Some(1234));
        assert_eq!(owner_pid("pessi99-probe3"), Some(99));
        assert_eq!(owner_pid("pb4194304"), Some(4_194_304));
        assert_eq!(owner_pid("pv4194304h252"), Some(4_194_304));
        for other in [
            "eth0",
            "pessi-h1",
            "pessi12-x1",
            "pb",
            "pbr0",
            "pv12",
            "pv12h",
            "pvh1",
        ] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
        // Every link name fits in IFNAMSIZ - 1 = 15 bytes, even for the largest pid.
        assert!(format!("pv{}h{}", 4_194_304, MAX_HOSTS - 1).len() <= 15);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn link_names_are_read_from_ip_output() {
        let text = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536\n\
                    7: pv42h0@if2: <BROADCAST,MULTICAST,UP> mtu 1500 master pb42\n\
                    8: pb42: <BROADCAST> mtu 1500\n";
        assert_eq!(link_names(text), ["lo", "pv42h0", "pb42"]);
    }

    #[test]
    fn a_subnet_is_in_use_when_anything_overlaps_it() {
        let addrs = parse_addrs(
            "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
             2: eth0    inet 10.77.5.3/16 brd 10.77.255.255 scope global eth0\n\
             9: pb7    inet 10.77.9.254/24 brd 10.77.9.255 scope global pb7\n",
        );
        assert_eq!(addrs.len(), 3);
        let routes = parse_routes(
            "default via 172.17.0.1 dev eth0\n\
             10.77.9.0/24 dev pb7 proto kernel scope link src 10.77.9.254\n\
             local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1\n\
             broadcast 10.78.0.255 dev x table local\n",
        );
        assert_eq!(routes.len(), 3, "{routes:?}");
        let net = |n: u8| (Ipv4Addr::new(10, 77, n, 0), 24);
        // eth0's /16 covers every 10.77.N.
        assert!(in_use(&addrs, net(200), None));
        let mut no_eth0 = addrs.clone();
        no_eth0.retain(|(_, _, d)| d.as_deref() != Some("eth0"));
        no_eth0.extend(routes);
        assert!(!in_use(&no_eth0, net(200), None));
        assert!(in_use(&no_eth0, net(9), None));
        // Our own bridge's address and route do not count against us.
        assert!(!in_use(&no_eth0, net(9), Some("pb7")));
        assert!(overlaps((Ipv4Addr::new(10, 0, 0, 0), 8), net(3)));
        assert!(!overlaps((Ipv4Addr::new(10, 78, 0, 0), 16), net(3)));
    }
}

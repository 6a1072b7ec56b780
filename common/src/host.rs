//! What every overlay daemon (server, node) does to join: its shared command-line flags, binding
//! its UDP socket, asking the bootstrapper for its id and neighbours, and building the optional
//! impairment shim of its send path. The socket is then owned by the relay's driver.

use crate::bootstrap::{
    fetch_neighbours_retrying, watch_neighbours, FetchError, HostKeys, Neighbours,
};
use crate::impair::{ImpairConfig, Impairment};
use crate::keys::{KeyPair, Secret};
use crate::transport::{Direct, SendShim};
use crate::wire::DEFAULT_PORT;
use anyhow::Context;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Flags shared by every overlay daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct OverlayArgs {
    /// This host's overlay IP address; it must be a host of the bootstrapper's topology.
    #[arg(long)]
    pub ip: IpAddr,
    /// UDP port of the overlay (every host uses the same one).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// IP address of the bootstrapper.
    #[arg(long, env = "BOOTSTRAPPER_IP", default_value = "127.0.0.1")]
    pub bootstrapper: IpAddr,
    /// TCP port of the bootstrapper.
    #[arg(long, env = "BOOTSTRAPPER_PORT", default_value_t = DEFAULT_PORT)]
    pub bootstrapper_port: u16,
    /// TESTING AID: impair this host's outgoing UDP traffic, e.g.
    /// `loss=5%,delay=20ms,jitter=5ms,dup=1%,reorder=2%,seed=7`; `to=IP` limits a rule to one
    /// peer; repeat the flag or separate rules with `;`. Keys: loss, burst, ge, delay, jitter,
    /// dup, reorder, gap, corrupt, blackout=AT+DUR[/EVERY], seed, to.
    #[arg(long = "impair", value_name = "SPEC")]
    pub impair: Vec<String>,
    /// Disable per-hop loss recovery (no NACKs sent, none answered), e.g. to measure what it
    /// brings.
    #[arg(long)]
    pub no_recovery: bool,
    /// Hitless failover: receive every channel through this many upstreams (1 or 2) on
    /// different paths where the topology allows, merged by sequence number (SMPTE 2022-7
    /// style). Costs one more copy of each watched channel on the links of the second path.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub redundancy: u8,
    /// This host's static key (private, 64 hex digits; created with mode 0600 on first use).
    /// Default: host-<ip>.key in the key directory ($PESSI_KEY_DIR, else
    /// ~/.config/pessi-streamer).
    #[arg(long, env = "PESSI_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The network key, the same file on every host of the overlay and on the bootstrapper
    /// (created on first use). Default: network.key in the key directory.
    #[arg(long, env = "PESSI_NETWORK_KEY", value_name = "FILE")]
    pub network_key: Option<PathBuf>,
    /// As a PoP, admit only viewers who present this secret (a key file, e.g. from `keygen
    /// --secret FILE`; viewers pass the same file to the client's --viewer-key). Default: open
    /// to every viewer who completes the handshake.
    #[arg(long, env = "PESSI_VIEWER_KEY", value_name = "FILE")]
    pub viewer_key: Option<PathBuf>,
    /// Benchmark only: the data path in clear (the benchmark's plaintext comparison).
    #[arg(long, hide = true)]
    pub bench_plaintext: bool,
}

/// Loads this host's key pair and the network key (`--key`, `--network-key`, or the default
/// files, created on first use), logging where they are and what to copy.
pub fn load_keys(
    ip: IpAddr,
    key: Option<&Path>,
    network: Option<&Path>,
) -> anyhow::Result<HostKeys> {
    let key_path = key.map_or_else(|| crate::keys::default_host_key(ip), Path::to_path_buf);
    let (private, created) = crate::keys::load_or_create(&key_path)?;
    let identity = KeyPair::from_private(private);
    info!(file = %key_path.display(), public = %identity.public, created,
        "host key (pin it in the topology's [keys] to refuse impostors)");
    let net_path = network.map_or_else(crate::keys::default_network_key, Path::to_path_buf);
    let (network, created) = crate::keys::load_or_create(&net_path)?;
    if created {
        warn!(file = %net_path.display(),
            "network key created: copy this file to every host of the overlay and to the \
             bootstrapper (--network-key) before they start");
    } else {
        info!(file = %net_path.display(), "network key");
    }
    Ok(HostKeys { identity, network })
}

/// The viewer secret of `--viewer-key`, if given (it must exist).
pub fn load_viewer_secret(path: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    path.map(|p| crate::keys::load(p).context("--viewer-key: the viewer secret file must exist"))
        .transpose()
}

impl OverlayArgs {
    /// The bootstrapper's address.
    pub fn bootstrapper_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bootstrapper, self.bootstrapper_port)
    }

    /// The parsed `--impair` rules.
    pub fn impair_config(&self) -> anyhow::Result<ImpairConfig> {
        ImpairConfig::parse_many(&self.impair).context("invalid --impair")
    }
}

/// A daemon that has joined the overlay.
pub struct Joined {
    /// Our id, address and neighbours, as the bootstrapper told us.
    pub me: Neighbours,
    /// The overlay socket, bound to `ip:port`.
    pub socket: UdpSocket,
    /// The send path: [`Direct`], or the `--impair` shim.
    pub shim: Box<dyn SendShim>,
    /// Our neighbour list and the member directory each time a topology edit or a host's
    /// registration changes them (pushed by the bootstrapper, see [`watch_neighbours`]).
    pub neighbour_updates: mpsc::Receiver<(Vec<crate::wire::PathHop>, Vec<crate::wire::Member>)>,
    /// Our keys.
    pub keys: HostKeys,
    /// As a PoP, the secret viewers must present (`None`: open to every viewer).
    pub viewer_secret: Option<Secret>,
    /// Benchmark only: no session layer on the data path.
    pub plaintext: bool,
}

/// Binds `ip:port`, fetches our neighbours (retrying while the bootstrapper is unreachable) and
/// builds the send path, with the `--impair` shim if one was given.
pub async fn join_overlay(
    args: &OverlayArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Joined> {
    let impair = args.impair_config()?;
    let bind = SocketAddr::new(args.ip, args.port);
    let socket = UdpSocket::bind(bind).await.with_context(|| {
        format!(
            "cannot bind UDP {bind} (is {} an address of this machine, and the port free?)",
            args.ip
        )
    })?;
    grow_receive_buffer(&socket, RECEIVE_BUFFER);
    let keys = load_keys(args.ip, args.key.as_deref(), args.network_key.as_deref())?;
    let viewer_secret = load_viewer_secret(args.viewer_key.as_deref())?;
    let me =
        match fetch_neighbours_retrying(args.bootstrapper_addr(), args.ip, &keys, shutdown).await {
            Ok(me) => me,
            Err(e) if e.is_auth() => {
                anyhow::bail!(
                    "the bootstrapper at {} does not accept this host's network key ({}): {e}. \
                 Copy the network key file of the bootstrapper's machine here (--network-key)",
                    args.bootstrapper_addr(),
                    args.network_key
                        .clone()
                        .unwrap_or_else(crate::keys::default_network_key)
                        .display()
                )
            }
            Err(FetchError::Refused(reason)) => {
                anyhow::bail!(
                    "the bootstrapper at {} refused {}: {reason}",
                    args.bootstrapper_addr(),
                    args.ip
                )
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot get neighbours from the bootstrapper at {}",
                        args.bootstrapper_addr()
                    )
                })
            }
        };
    info!(
        id = %me.id,
        addr = %me.addr,
        neighbours = ?me.neighbours.iter().map(|h| h.addr).collect::<Vec<_>>(),
        "joined the overlay"
    );
    let shim: Box<dyn SendShim> = if impair.is_passthrough() {
        Box::new(Direct::default())
    } else {
        warn!(impair = %impair, "TESTING AID: impairing outgoing traffic");
        Box::new(Impairment::new(impair, Instant::now()))
    };
    let neighbour_updates = watch_neighbours(
        args.bootstrapper_addr(),
        args.ip,
        keys.clone(),
        &me,
        shutdown.clone(),
    );
    if args.bench_plaintext {
        warn!("BENCHMARK ONLY: the data path is not encrypted");
    }
    Ok(Joined {
        me,
        socket,
        shim,
        neighbour_updates,
        keys,
        viewer_secret,
        plaintext: args.bench_plaintext,
    })
}

/// Receive buffer asked for overlay sockets: a relay sends a new subscriber a whole GOP at once
/// (`node::gop`, up to ~1 MB for a 3 s GOP at 2.5 Mb/s), which the kernel's default (~208 KB)
/// would partly drop. The kernel caps it at `net.core.rmem_max`.
pub const RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// Best effort: asks for a `bytes` receive buffer on `socket` (Linux; a no-op elsewhere).
/// Returns the size the kernel granted, if known.
pub fn grow_receive_buffer(socket: &UdpSocket, bytes: usize) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` is an open socket for the duration of the call; the option value is a
        // c_int on the stack whose size we pass.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&want as *const libc::c_int).cast(),
                len,
            );
            let mut got: libc::c_int = 0;
            let mut got_len = len;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&mut got as *mut libc::c_int).cast(),
                &mut got_len,
            ) == 0
            {
                return usize::try_from(got).ok();
            }
        }
        None
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, bytes);
        None
    }
}

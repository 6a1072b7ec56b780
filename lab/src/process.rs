//! Supervision of the overlay's processes: start, crash (SIGKILL), restart, and a clean stop
//! (SIGTERM, then SIGKILL after a grace period). Every child dies with the lab.

use anyhow::Context;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::Child;
use tracing::{info, warn};

/// Where the overlay's binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The binaries next to this executable (`target/<profile>/`, also when running from
    /// `target/<profile>/deps/` as a test), or in `$PESSI_BIN_DIR`.
    pub fn locate() -> anyhow::Result<Binaries> {
        if let Some(dir) = std::env::var_os("PESSI_BIN_DIR") {
            return Binaries::in_dir(PathBuf::from(dir));
        }
        let exe = std::env::current_exe().context("cannot find the lab's own executable")?;
        let mut dir = exe
            .parent()
            .map(Path::to_path_buf)
            .context("executable without a folder")?;
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        Binaries::in_dir(dir)
    }

    /// The binaries in `dir`; fails naming the first one missing.
    pub fn in_dir(dir: PathBuf) -> anyhow::Result<Binaries> {
        let b = Binaries { dir };
        for name in ["bootstrapper", "server", "node", "client"] {
            let p = b.path(name);
            if !p.is_file() {
                anyhow::bail!(
                    "{} not found: build the overlay first with `cargo build --release --workspace` \
                     (or `cargo build --workspace` for a debug lab), or set PESSI_BIN_DIR",
                    p.display()
                );
            }
        }
        Ok(b)
    }

    /// Path of binary `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One supervised process.
struct Proc {
    program: PathBuf,
    args: Vec<OsString>,
    /// The network namespace it runs in (`/run/netns/<name>`), if not the lab's own.
    netns: Option<PathBuf>,
    child: Option<Child>,
    log: PathBuf,
}

/// Starts, kills, restarts and stops named processes. Their stdout and stderr go to
/// `<log_dir>/<name>.log` (appended across restarts).
pub struct Supervisor {
    log_dir: PathBuf,
    procs: BTreeMap<String, Proc>,
    /// Start order, so stopping goes the other way (clients first, bootstrapper last).
    order: Vec<String>,
}

impl Supervisor {
    /// A supervisor writing logs into `log_dir` (created if needed).
    pub fn new(log_dir: PathBuf) -> anyhow::Result<Supervisor> {
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create the log folder {}", log_dir.display()))?;
        Ok(Supervisor {
            log_dir,
            procs: BTreeMap::new(),
            order: Vec::new(),
        })
    }

    /// Where the processes keep their keys (see [`key_dir`]).
    pub fn key_dir(&self) -> PathBuf {
        key_dir(&self.log_dir)
    }

    /// The log file of process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir
            .join(format!("{}.log", name.replace([' ', '/', ':'], "-")))
    }

    /// Starts `program args…` under `name`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: PathBuf,
        args: Vec<OsString>,
    ) -> anyhow::Result<()> {
        self.spawn_in(name, program, args, None)
    }

    /// Starts `program args…` under `name` inside the network namespace `netns` (a file such
    /// as `/run/netns/<name>`, see [`crate::netns`]), or in the lab's own when `None`. Restarts
    /// go into the same namespace.
    pub fn spawn_in(
        &mut self,
        name: &str,
        program: PathBuf,
        args: Vec<OsString>,
        netns: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        let log = self.log_path(name);
        let mut p = Proc {
            program,
            args,
            netns,
            child: None,
            log,
        };
        start(name, &mut p)?;
        self.procs.insert(name.to_owned(), p);
        self.order.retain(|n| n != name);
        self.order.push(name.to_owned());
        Ok(())
    }

    /// Kills `name` abruptly (SIGKILL), as a crash would.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.get(name)?;
        if let Some(mut c) = p.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
            info!(process = name, "killed (SIGKILL)");
        }
        Ok(())
    }

    /// Stops `name` cleanly (SIGTERM, SIGKILL after `grace`).
    pub async fn stop(&mut self, name: &str, grace: Duration) -> anyhow::Result<()> {
        if let Some(c) = self.get(name)?.child.take() {
            terminate(name, c, grace).await;
        }
        Ok(())
    }

    /// Restarts `name` with its original arguments plus `extra` (e.g. `--impair …`). Stops it
    /// first (SIGTERM) if it runs.
    pub async fn restart(&mut self, name: &str, extra: &[String]) -> anyhow::Result<()> {
        let p = self
            .procs
            .get_mut(name)
            .with_context(|| format!("no process {name}"))?;
        if let Some(c) = p.child.take() {
            terminate(name, c, Duration::from_secs(3)).await;
        }
        let mut args = p.args.clone();
        args.extend(extra.iter().map(OsString::from));
        let mut tmp = Proc {
            program: p.program.clone(),
            args,
            netns: p.netns.clone(),
            child: None,
            log: p.log.clone(),
        };
        start(name, &mut tmp)?;
        p.child = tmp.child;
        Ok(())
    }

    /// Processes that exited on their own since the last call, with their status.
    pub fn exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut out = Vec::new();
        for (name, p) in &mut self.procs {
            if let Some(c) = &mut p.child {
                if let Ok(Some(status)) = c.try_wait() {
                    out.push((name.clone(), status));
                    p.child = None;
                }
            }
        }
        out
    }

    /// Whether `name` is running.
    pub fn is_running(&self, name: &str) -> bool {
        self.procs.get(name).is_some_and(|p| p.child.is_some())
    }

    /// The process id of `name` while it runs (for reading `/proc/<pid>/…`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name)?.child.as_ref()?.id()
    }

    /// Stops everything, last started first: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop_all(&mut self, grace: Duration) {
        for name in self.order.clone().iter().rev() {
            if let Some(c) = self.procs.get_mut(name).and_then(|p| p.child.take()) {
                terminate(name, c, grace).await;
            }
        }
    }

    fn get(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.procs
            .get_mut(name)
            .with_context(|| format!("no process {name}"))
    }
}

/// Where the lab's hosts keep their keys: `<log_dir>/keys` (or `$PESSI_KEY_DIR` if set).
pub fn key_dir(log_dir: &std::path::Path) -> PathBuf {
    std::env::var_os("PESSI_KEY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| log_dir.join("keys"))
}

fn start(name: &str, p: &mut Proc) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .with_context(|| format!("cannot open {}", p.log.display()))?;
    let log2 = log.try_clone()?;
    let mut cmd = common::runtime::child_command(&p.program);
    // The lab's hosts keep their keys (host keys, the network key) with the lab's logs, so a
    // run never touches the user's own keys and every run starts a fresh network.
    if std::env::var_os("PESSI_KEY_DIR").is_none() {
        if let Some(dir) = p.log.parent() {
            cmd.env("PESSI_KEY_DIR", key_dir(dir));
        }
    }
    if let Some(ns) = &p.netns {
        crate::netns::enter_in_child(&mut cmd, ns)
            .with_context(|| format!("cannot start {name} in its network namespace"))?;
    }
    let child = cmd
        .args(&p.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .with_context(|| format!("cannot start {} ({})", name, p.program.display()))?;
    match &p.netns {
        Some(ns) => {
            info!(process = name, pid = child.id(), netns = %ns.display(), log = %p.log.display(), "started")
        }
        None => info!(process = name, pid = child.id(), log = %p.log.display(), "started"),
    }
    p.child = Some(child);
    Ok(())
}

async fn terminate(name: &str, mut c: Child, grace: Duration) {
    if let Some(pid) = c.id() {
        // SAFETY: sending a signal to a child we own; no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(grace, c.wait()).await {
        Ok(Ok(status)) => info!(process = name, %status, "stopped"),
        _ => {
            warn!(
                process = name,
                "did not stop within {grace:?} of SIGTERM; killing"
            );
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

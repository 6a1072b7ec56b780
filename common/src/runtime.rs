//! Process plumbing shared by every binary: logging set-up and shutdown on ctrl-c / SIGTERM.

use tokio_util::sync::CancellationToken;

/// Installs the `tracing` subscriber: human-readable lines on stderr, filtered by `RUST_LOG`
/// (default `info`). Safe to call more than once (later calls do nothing).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A token cancelled on the first ctrl-c (SIGINT) or SIGTERM. Long tasks select on
/// `token.cancelled()` and child processes are killed when it fires, so nothing outlives us.
/// Must be called inside a tokio runtime.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// A `tokio::process::Command` for a child that must not outlive us: it is killed when its
/// handle is dropped, and (Linux) the kernel sends it SIGKILL if this process dies, even by
/// SIGKILL. Note: `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits, so
/// spawn from long-lived threads (tokio workers or the main thread), not from `spawn_blocking`.
/// Stdin is null; callers set stdin/stdout/stderr as they need.
pub fn child_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    #[cfg(target_os = "linux")]
    let parent = std::process::id() as libc::pid_t;
    #[cfg(target_os = "linux")]
    // SAFETY: `prctl` and `getppid` are async-signal-safe; nothing else runs between fork and
    // exec here.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then we must not run at all.
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "parent exited before the child started",
                ));
            }
            Ok(())
        });
    }
    cmd
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[tokio::test]
    async fn child_command_runs_and_kills_on_drop() {
        let out = super::child_command("true").status().await.unwrap();
        assert!(out.success());
        let child = super::child_command("sleep").arg("30").spawn().unwrap();
        let pid = child.id().unwrap();
        drop(child);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // The zombie is reaped by tokio's orphan queue; the process must no longer be running.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "still running: {stat}"
        );
    }
}

/// The repository this binary was built from, if it is still there (a checkout with
/// `topologies/`), canonicalized.
pub fn repo_root() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("topologies")
        .is_dir()
        .then(|| root.canonicalize().unwrap_or(root))
}

/// Where a file shipped with the project (`rel`, relative to the repository root, e.g.
/// `topologies/neighbours.toml`) is, whatever the current directory: in the repository this
/// binary was built from if it is still there, else next to the executable or up to three
/// folders above it (`target/release/` → the repository; an installed tree), else `rel`
/// itself (relative to the current directory, as a last resort).
pub fn shipped_file(rel: &str) -> std::path::PathBuf {
    let mut candidates: Vec<std::path::PathBuf> =
        repo_root().map(|r| r.join(rel)).into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).take(4).map(|d| d.join(rel)));
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .unwrap_or_else(|| rel.into())
}

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

/// A [`tokio::process::Command`] for a child process that must not outlive us: it is killed
/// when its handle is dropped (`kill_on_drop`), and on Linux the kernel also sends it SIGKILL
/// when our process dies, however it dies (`prctl(PR_SET_PDEATHSIG, SIGKILL)` in `pre_exec`).
/// Stdin is null; callers set stdout/stderr as they need.
pub fn child_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, _exit), allocating nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then we are orphaned.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
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

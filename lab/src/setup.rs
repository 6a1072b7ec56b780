//! What the demo needs on this machine, installed when missing, so that the README's first
//! command alone brings up moving video on a fresh Debian machine with Rust: FFmpeg (the
//! servers encode with it; required) and, when a display is available, mpv (the player;
//! optional: without it the client falls back to ffplay, or to no player).
//!
//! * root: `apt-get install -y` (non-interactive), logged;
//! * not root, on a terminal: asks once (y/N), then `sudo apt-get install -y`;
//! * otherwise: prints the exact command, stops if FFmpeg is missing, goes on without mpv.
//!
//! `apt-get` is not started with `common::runtime::child_command`: killing a package
//! installation half-way leaves dpkg's database half-configured, so it runs to completion even
//! if we are stopped (ctrl-c reaches it through the terminal, and apt-get stops cleanly).

use anyhow::{bail, Context};
use std::io::{BufRead, IsTerminal, Write};
use std::process::Command;
use tracing::{info, warn};

/// A Debian package the demo may need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Need {
    /// The package.
    package: &'static str,
    /// Why the demo wants it.
    why: &'static str,
    /// Whether the demo cannot run without it.
    required: bool,
}

/// What to do about the missing packages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Run the installation (with `sudo` when not root).
    Install { sudo: bool },
    /// Ask on the terminal, then install with `sudo`.
    Ask,
    /// Tell the user which command to run.
    Tell,
}

fn decide(root: bool, terminal: bool, apt: bool) -> Action {
    match (apt, root, terminal) {
        (false, _, _) => Action::Tell,
        (true, true, _) => Action::Install { sudo: false },
        (true, false, true) => Action::Ask,
        (true, false, false) => Action::Tell,
    }
}

fn missing(on_path: impl Fn(&str) -> bool, want_player: bool) -> Vec<Need> {
    let mut out = Vec::new();
    if !on_path("ffmpeg") || !on_path("ffprobe") {
        out.push(Need {
            package: "ffmpeg",
            why: "the servers encode the video with it",
            required: true,
        });
    }
    if want_player && !on_path("mpv") {
        out.push(Need {
            package: "mpv",
            why: "the player (else ffplay, with a slower start)",
            required: false,
        });
    }
    out
}

fn command_text(needs: &[Need]) -> String {
    let names: Vec<&str> = needs.iter().map(|n| n.package).collect();
    format!("sudo apt-get install -y {}", names.join(" "))
}

/// Installs what the demo needs and is missing (see the module documentation): mpv too when
/// the client will open a player (`video_player` `auto` or `mpv`, not `no_window`, and a display
/// is available). Fails only when FFmpeg is still missing at the end.
pub fn ensure(video_player: &str, no_window: bool) -> anyhow::Result<()> {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    let display = set("DISPLAY") || set("WAYLAND_DISPLAY");
    let want_player = display && !no_window && matches!(video_player, "auto" | "mpv");
    let needs = missing(on_path, want_player);
    if needs.is_empty() {
        return Ok(());
    }
    for n in &needs {
        warn!(
            package = n.package,
            "{} is not installed: {}", n.package, n.why
        );
    }
    let cmd = command_text(&needs);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let terminal = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    let apt = on_path("apt-get");
    match decide(root, terminal, apt) {
        Action::Install { sudo } => install(&needs, sudo)?,
        Action::Ask => {
            eprint!("Install them now with `{cmd}`? [y/N] ");
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut answer)
                .context("reading the answer")?;
            if matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
                install(&needs, true)?;
            } else {
                info!("not installing; run `{cmd}` to install them later");
            }
        }
        Action::Tell if apt => warn!("to install them, run: {cmd}"),
        Action::Tell => {
            let names: Vec<&str> = needs.iter().map(|n| n.package).collect();
            warn!(
                "no apt-get here: install {} with your package manager",
                names.join(" ")
            );
        }
    }
    let still = missing(on_path, want_player);
    if still.iter().any(|n| n.required) {
        bail!(
            "ffmpeg is needed by the servers and was not found on PATH: install it with \
             `sudo apt-get install -y ffmpeg` (Debian/Ubuntu)"
        );
    }
    if !still.is_empty() {
        warn!("going on without mpv: the client uses ffplay if installed, else no player");
    }
    Ok(())
}

/// `apt-get install -y` the packages (after `apt-get update` if the first attempt fails, as
/// on a machine whose package lists were never downloaded).
fn install(needs: &[Need], sudo: bool) -> anyhow::Result<()> {
    let names: Vec<&str> = needs.iter().map(|n| n.package).collect();
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let (program, mut full) = if sudo {
            ("sudo", vec!["apt-get"])
        } else {
            ("apt-get", vec![])
        };
        full.extend_from_slice(args);
        info!("running: {program} {}", full.join(" "));
        let status = Command::new(program)
            .args(&full)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("starting {program}"))?;
        Ok(status.success())
    };
    let mut install = vec!["install", "-y"];
    install.extend(&names);
    if apt(&install)? {
        return Ok(());
    }
    warn!("apt-get install failed; updating the package lists and trying again");
    if apt(&["update"])? && apt(&install)? {
        return Ok(());
    }
    warn!("could not install {}", names.join(" "));
    Ok(())
}

/// Whether `program` is an executable on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_installs_a_terminal_asks_otherwise_tells() {
        assert_eq!(decide(true, false, true), Action::Install { sudo: false });
        assert_eq!(decide(true, true, true), Action::Install { sudo: false });
        assert_eq!(decide(false, true, true), Action::Ask);
        assert_eq!(decide(false, false, true), Action::Tell);
        assert_eq!(decide(true, true, false), Action::Tell);
    }

    #[test]
    fn what_is_missing_and_the_command() {
        let nothing = |_: &str| false;
        let all = |_: &str| true;
        let no_mpv = |p: &str| p != "mpv";
        let needs = missing(nothing, true);
        assert_eq!(
            needs.iter().map(|n| n.package).collect::<Vec<_>>(),
            ["ffmpeg", "mpv"]
        );
        assert!(needs[0].required && !needs[1].required);
        assert_eq!(command_text(&needs), "sudo apt-get install -y ffmpeg mpv");
        // No player wanted (headless, or no display): only ffmpeg.
        assert_eq!(missing(nothing, false).len(), 1);
        assert!(missing(all, true).is_empty());
        assert_eq!(missing(no_mpv, true)[0].package, "mpv");
        assert!(missing(no_mpv, false).is_empty());
        // ffprobe alone missing still means the ffmpeg package.
        assert_eq!(
            missing(|p: &str| p != "ffprobe", false)[0].package,
            "ffmpeg"
        );
    }
}

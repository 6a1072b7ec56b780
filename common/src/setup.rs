//! Programs the project runs (FFmpeg for the servers, a player for the client), installed when
//! missing, so that the README's first command alone brings up moving video on a fresh Debian
//! machine with Rust, and a server started by hand on a fresh lab machine installs FFmpeg (as
//! the original project promised):
//!
//! * root: `apt-get install -y` (non-interactive), logged;
//! * not root, on a terminal: asks once (y/N), then `sudo apt-get install -y`;
//! * otherwise: prints the exact command; fails if something required is still missing.
//!
//! `apt-get` is not started with [`crate::runtime::child_command`]: killing a package
//! installation half-way leaves dpkg's database half-configured, so it runs to completion even
//! if we are stopped (ctrl-c reaches it through the terminal, and apt-get stops cleanly).

use std::io::{BufRead, IsTerminal, Write};
use std::process::Command;
use tracing::{info, warn};

/// A Debian package the project may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The package.
    pub package: &'static str,
    /// The programs it provides that we run (all must be on PATH).
    pub programs: &'static [&'static str],
    /// Why we want it (for the log).
    pub why: &'static str,
    /// Whether we cannot run without it.
    pub required: bool,
}

/// FFmpeg (`ffmpeg`, `ffprobe`): the servers encode and probe with it.
pub const FFMPEG: Need = Need {
    package: "ffmpeg",
    programs: &["ffmpeg", "ffprobe"],
    why: "the servers encode the video with it",
    required: true,
};

/// mpv, the client's default player (else ffplay, with a slower start).
pub const MPV: Need = Need {
    package: "mpv",
    programs: &["mpv"],
    why: "the player (else ffplay, with a slower start)",
    required: false,
};

/// Why [`ensure`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A required package is still missing.
    #[error("{package} is needed ({why}) and was not found on PATH: install it with `{command}` (Debian/Ubuntu)")]
    Missing {
        /// The package.
        package: &'static str,
        /// Why it is needed.
        why: &'static str,
        /// The command that installs it.
        command: String,
    },
    /// Reading the answer on the terminal failed.
    #[error("reading the answer: {0}")]
    Terminal(#[from] std::io::Error),
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

fn missing(on_path: impl Fn(&str) -> bool, wanted: &[Need]) -> Vec<Need> {
    wanted
        .iter()
        .filter(|n| !n.programs.iter().all(|p| on_path(p)))
        .copied()
        .collect()
}

fn command_text(needs: &[Need]) -> String {
    let names: Vec<&str> = needs.iter().map(|n| n.package).collect();
    format!("sudo apt-get install -y {}", names.join(" "))
}

/// Installs what of `wanted` is missing (see the module documentation). Fails only when a
/// required package is still missing at the end; an optional one is logged.
pub fn ensure(wanted: &[Need]) -> Result<(), SetupError> {
    let needs = missing(on_path, wanted);
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
        Action::Install { sudo } => install(&needs, sudo),
        Action::Ask => {
            eprint!("Install them now with `{cmd}`? [y/N] ");
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            if matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
                install(&needs, true);
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
    let still = missing(on_path, wanted);
    if let Some(n) = still.iter().find(|n| n.required) {
        return Err(SetupError::Missing {
            package: n.package,
            why: n.why,
            command: command_text(std::slice::from_ref(n)),
        });
    }
    for n in &still {
        warn!(package = n.package, "going on without {}", n.package);
    }
    Ok(())
}

/// `apt-get install -y` the packages (after `apt-get update` if the first attempt fails, as
/// on a machine whose package lists were never downloaded). Failures are logged; [`ensure`]
/// checks the result.
fn install(needs: &[Need], sudo: bool) {
    let names: Vec<&str> = needs.iter().map(|n| n.package).collect();
    let apt = |args: &[&str]| -> bool {
        let (program, mut full) = if sudo {
            ("sudo", vec!["apt-get"])
        } else {
            ("apt-get", vec![])
        };
        full.extend_from_slice(args);
        info!("running: {program} {}", full.join(" "));
        match Command::new(program)
            .args(&full)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
        {
            Ok(status) => status.success(),
            Err(e) => {
                warn!("cannot start {program}: {e}");
                false
            }
        }
    };
    let mut install = vec!["install", "-y"];
    install.extend(&names);
    if apt(&install) {
        return;
    }
    warn!("apt-get install failed; updating the package lists and trying again");
    if apt(&["update"]) && apt(&install) {
        return;
    }
    warn!("could not install {}", names.join(" "));
}

/// Whether `program` is an executable on PATH.
pub fn on_path(program: &str) -> bool {
    find_on_path(program).is_some()
}

/// Finds an executable called `name` in the directories of `PATH`.
pub fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
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
        let needs = missing(nothing, &[FFMPEG, MPV]);
        assert_eq!(
            needs.iter().map(|n| n.package).collect::<Vec<_>>(),
            ["ffmpeg", "mpv"]
        );
        assert!(needs[0].required && !needs[1].required);
        assert_eq!(command_text(&needs), "sudo apt-get install -y ffmpeg mpv");
        assert_eq!(missing(nothing, &[FFMPEG]).len(), 1);
        assert!(missing(all, &[FFMPEG, MPV]).is_empty());
        assert_eq!(missing(no_mpv, &[FFMPEG, MPV])[0].package, "mpv");
        assert!(missing(no_mpv, &[FFMPEG]).is_empty());
        // ffprobe alone missing still means the ffmpeg package.
        assert_eq!(
            missing(|p: &str| p != "ffprobe", &[FFMPEG])[0].package,
            "ffmpeg"
        );
        let e = SetupError::Missing {
            package: "ffmpeg",
            why: FFMPEG.why,
            command: command_text(&[FFMPEG]),
        }
        .to_string();
        assert!(e.contains("sudo apt-get install -y ffmpeg"), "{e}");
    }
}

//! Does this desktop draw with a GPU? And so, which video output mpv should use.
//!
//! # Why mpv needs help without a GPU
//!
//! Without a GPU (Xvfb, most VMs, VNC/RDP remote desktops) OpenGL is Mesa's software renderer
//! (`llvmpipe`). mpv's default output, `gpu`, refuses a software renderer while it probes
//! ("Suspected software renderer or indirect context") and goes on probing its other contexts:
//! `drm`, then the Vulkan ones. Probing the Vulkan `displayvk` context closes file descriptor 0
//! (mpv 0.35.1 with Mesa 22.3's software Vulkan, Debian 12: after `--vo=gpu,x11
//! --gpu-context=displayvk`, fd 0 is a socket; after any other context it is still the pipe).
//! Descriptor 0 is the pipe we feed the stream through: the next X11 connection reuses the
//! number, mpv's demuxer reads from the X socket and waits forever. The window that
//! `--force-window=immediate` opened stays solid black, and mpv no longer answers SIGTERM.
//! Any output mpv tries after `gpu` comes too late.
//!
//! Measured under Xvfb (llvmpipe, 2 cores; 640×360 25 fps H.264 on stdin; mpv CPU over 8 s):
//!
//! | mpv options | picture | first frame | CPU |
//! |---|---|---|---|
//! | (none) | black window, stdin closed | never | 0 % |
//! | `--vo=x11` | yes | 0.22 s | 11 % |
//! | `--vo=sdl` | yes | 0.53 s | 17 % |
//! | `--gpu-sw=yes` (so `gpu` on llvmpipe) | yes | 0.31 s | 27 % |
//! | `--vo=gpu,gpu-next,vdpau,wlshm,xv,x11,` | no: `gpu` probes `displayvk` first | never | 0 % |
//!
//! So, with the first answer that applies:
//!
//! * software OpenGL for sure ([`OpenGl::Software`]: `LIBGL_ALWAYS_SOFTWARE`, a software
//!   `GALLIUM_DRIVER`, `glxinfo -B` naming a software renderer, or no GPU device at all):
//!   `--vo=x11,wlshm,` — the cheapest output that works (`wlshm` is its Wayland counterpart; the
//!   trailing comma lets mpv go on with its own list if both fail) and `--gpu-sw=yes` for
//!   that case;
//! * a GPU renderer confirmed by `glxinfo -B` ([`OpenGl::Hardware`]): nothing — mpv's choice;
//! * a GPU device but the renderer unknown ([`OpenGl::Unknown`]: `glxinfo` is not installed,
//!   e.g. a desktop, or a remote desktop on a machine with a GPU): `--gpu-sw=yes` only. With a
//!   working GPU, mpv's first context is a hardware one and the option changes nothing; if that
//!   context turns out to be software, mpv uses it (27 % CPU above) instead of probing on to
//!   `displayvk` and the black window.
//!
//! The user's own `--player-arg`s come after these and win (mpv keeps the last value).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// What draws OpenGL here, with the evidence (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenGl {
    /// A software renderer (llvmpipe, softpipe, swrast…), or no GPU at all.
    Software(String),
    /// A GPU renderer, as reported by `glxinfo -B`.
    Hardware(String),
    /// A GPU device exists but the renderer could not be asked.
    Unknown(String),
}

/// What [`OpenGl::from_facts`] decides from (gathered by [`Facts::gather`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// `LIBGL_ALWAYS_SOFTWARE`.
    pub libgl_always_software: Option<String>,
    /// `GALLIUM_DRIVER`.
    pub gallium_driver: Option<String>,
    /// The output of `glxinfo -B`, when it ran successfully.
    pub glxinfo: Option<String>,
    /// GPU device nodes: `/dev/dri/card*`, `/dev/dri/renderD*`, `/dev/nvidia*`.
    pub gpu_devices: Vec<PathBuf>,
}

/// How long `glxinfo -B` may take.
const GLXINFO_TIMEOUT: Duration = Duration::from_secs(2);

impl Facts {
    /// Reads the environment and `/dev`, and runs `glxinfo -B` if it is installed and a display
    /// is set.
    pub async fn gather() -> Facts {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let glxinfo = if env("DISPLAY").is_some() {
            glxinfo().await
        } else {
            None
        };
        Facts {
            libgl_always_software: env("LIBGL_ALWAYS_SOFTWARE"),
            gallium_driver: env("GALLIUM_DRIVER"),
            glxinfo,
            gpu_devices: gpu_devices(Path::new("/dev")),
        }
    }
}

async fn glxinfo() -> Option<String> {
    let mut cmd = common::runtime::child_command("glxinfo");
    cmd.arg("-B").stdout(Stdio::piped()).stderr(Stdio::null());
    let out = tokio::time::timeout(GLXINFO_TIMEOUT, cmd.output())
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GPU device nodes under `dev` (`dri/card*`, `dri/renderD*`, `nvidia*`), sorted.
pub fn gpu_devices(dev: &Path) -> Vec<PathBuf> {
    let list = |dir: &Path, prefixes: &[&str]| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        prefixes.iter().any(|p| name.starts_with(p))
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = list(&dev.join("dri"), &["card", "renderD"]);
    out.extend(list(dev, &["nvidia"]));
    out.sort();
    out
}

/// The renderer named by `glxinfo -B` and whether it is a software one.
pub fn glxinfo_renderer(text: &str) -> Option<(String, bool)> {
    let renderer = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("OpenGL renderer string:"))?
        .trim()
        .to_owned();
    let lower = renderer.to_ascii_lowercase();
    let software = ["llvmpipe", "softpipe", "swrast", "software", "lavapipe"]
        .iter()
        .any(|s| lower.contains(s))
        || text.lines().any(|l| l.trim() == "Accelerated: no");
    Some((renderer, software))
}

impl OpenGl {
    /// Decides from `facts`, strongest evidence first.
    pub fn from_facts(facts: &Facts) -> OpenGl {
        if let Some(v) = &facts.libgl_always_software {
            if !matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "false" | "no") {
                return OpenGl::Software(format!("LIBGL_ALWAYS_SOFTWARE={v}"));
            }
        }
        if let Some(v) = &facts.gallium_driver {
            if matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "llvmpipe" | "softpipe" | "swr"
            ) {
                return OpenGl::Software(format!("GALLIUM_DRIVER={v}"));
            }
        }
        if let Some((renderer, software)) = facts.glxinfo.as_deref().and_then(glxinfo_renderer) {
            let why = format!("glxinfo -B: OpenGL renderer {renderer:?}");
            return if software {
                OpenGl::Software(why)
            } else {
                OpenGl::Hardware(why)
            };
        }
        match facts.gpu_devices.first() {
            None => OpenGl::Software(
                "no GPU device (/dev/dri/card*, /dev/dri/renderD*, /dev/nvidia*)".into(),
            ),
            Some(d) => OpenGl::Unknown(format!(
                "GPU device {} present, renderer unknown (no glxinfo)",
                d.display()
            )),
        }
    }

    /// mpv options for this renderer (see the module documentation).
    pub fn mpv_args(&self) -> Vec<String> {
        match self {
            OpenGl::Software(_) => vec!["--vo=x11,wlshm,".into(), "--gpu-sw=yes".into()],
            OpenGl::Hardware(_) => vec![],
            OpenGl::Unknown(_) => vec!["--gpu-sw=yes".into()],
        }
    }

    /// One line for the log: the output chosen and why.
    pub fn describe(&self) -> String {
        match self {
            OpenGl::Software(why) => {
                format!("software OpenGL ({why}): mpv uses --vo=x11 (software scaling)")
            }
            OpenGl::Hardware(why) => format!("GPU OpenGL ({why}): mpv chooses its output"),
            OpenGl::Unknown(why) => format!(
                "{why}: mpv chooses its output, --gpu-sw=yes in case its OpenGL is software"
            ),
        }
    }
}

/// Whether the user's player arguments already choose mpv's video output.
pub fn user_chooses_output(player_args: &[String]) -> bool {
    player_args.iter().any(|a| {
        let name = a.split('=').next().unwrap_or(a);
        matches!(name, "--vo" | "--gpu-sw" | "--gpu-context" | "--gpu-api")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XVFB: &str = "name of display: :99\ndisplay: :99  screen: 0\ndirect rendering: Yes\n\
        Extended renderer info (GLX_MESA_query_renderer):\n    Vendor: Mesa/X.org (0xffffffff)\n\
        \x20   Device: llvmpipe (LLVM 15.0.6, 256 bits) (0xffffffff)\n    Accelerated: no\n\
        OpenGL vendor string: Mesa/X.org\n\
        OpenGL renderer string: llvmpipe (LLVM 15.0.6, 256 bits)\n";
    const INTEL: &str = "direct rendering: Yes\n    Accelerated: yes\n\
        OpenGL vendor string: Intel\nOpenGL renderer string: Mesa Intel(R) UHD Graphics 620 (KBL GT2)\n";

    #[test]
    fn glxinfo_output_is_read() {
        assert_eq!(
            glxinfo_renderer(XVFB),
            Some(("llvmpipe (LLVM 15.0.6, 256 bits)".into(), true))
        );
        assert_eq!(
            glxinfo_renderer(INTEL),
            Some(("Mesa Intel(R) UHD Graphics 620 (KBL GT2)".into(), false))
        );
        assert_eq!(glxinfo_renderer("Error: unable to open display"), None);
    }

    #[test]
    fn evidence_is_weighed_strongest_first() {
        let gpu = vec![PathBuf::from("/dev/dri/renderD128")];
        let facts = |glx: Option<&str>, devs: &[PathBuf]| Facts {
            glxinfo: glx.map(String::from),
            gpu_devices: devs.to_vec(),
            ..Facts::default()
        };
        // No GPU device and nothing else known: software.
        let none = OpenGl::from_facts(&facts(None, &[]));
        assert!(matches!(none, OpenGl::Software(_)), "{none:?}");
        assert_eq!(none.mpv_args(), ["--vo=x11,wlshm,", "--gpu-sw=yes"]);
        // A device, renderer unknown: mpv's choice, software allowed.
        let unknown = OpenGl::from_facts(&facts(None, &gpu));
        assert!(matches!(unknown, OpenGl::Unknown(_)), "{unknown:?}");
        assert_eq!(unknown.mpv_args(), ["--gpu-sw=yes"]);
        // glxinfo beats the device list, both ways.
        let remote = OpenGl::from_facts(&facts(Some(XVFB), &gpu));
        assert!(matches!(remote, OpenGl::Software(ref w) if w.contains("llvmpipe")));
        let hw = OpenGl::from_facts(&facts(Some(INTEL), &[]));
        assert!(matches!(hw, OpenGl::Hardware(ref w) if w.contains("UHD")));
        assert!(hw.mpv_args().is_empty());
        // Environment variables beat glxinfo.
        let mut f = facts(Some(INTEL), &gpu);
        f.libgl_always_software = Some("1".into());
        assert!(matches!(OpenGl::from_facts(&f), OpenGl::Software(ref w) if w.contains("LIBGL")));
        f.libgl_always_software = Some("0".into());
        assert!(matches!(OpenGl::from_facts(&f), OpenGl::Hardware(_)));
        f.gallium_driver = Some("llvmpipe".into());
        assert!(matches!(OpenGl::from_facts(&f), OpenGl::Software(ref w) if w.contains("GALLIUM")));
    }

    #[test]
    fn gpu_devices_are_found() {
        let dev = tempfile::tempdir().unwrap();
        assert!(gpu_devices(dev.path()).is_empty());
        std::fs::create_dir(dev.path().join("dri")).unwrap();
        for f in [
            "dri/by-path",
            "dri/renderD128",
            "dri/card0",
            "nvidia0",
            "null",
        ] {
            std::fs::write(dev.path().join(f), "").unwrap();
        }
        let found = gpu_devices(dev.path());
        let names: Vec<_> = found
            .iter()
            .map(|p| p.strip_prefix(dev.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            [
                PathBuf::from("dri/card0"),
                PathBuf::from("dri/renderD128"),
                PathBuf::from("nvidia0")
            ]
        );
    }

    #[test]
    fn the_users_output_wins() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(user_chooses_output(&s(&["--vo=gpu"])));
        assert!(user_chooses_output(&s(&["--fs", "--vo", "x11"])));
        assert!(user_chooses_output(&s(&["--gpu-sw=no"])));
        assert!(!user_chooses_output(&s(&["--fs", "--volume=50"])));
    }
}

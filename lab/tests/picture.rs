//! A picture on the screen, without a GPU: the demo's channel (the live test pattern of a real
//! server, through a relay) played by the real client, which starts mpv as it always does, on
//! an Xvfb display (software OpenGL only). Screenshots of the player window (`xwd`, parsed here)
//! must be colourful and must change: moving video, not the black window of issue 14.
//!
//! Needs Xvfb, mpv, xwd (x11-apps) and ffmpeg; `scripts/test.sh` installs them. When one is
//! missing the test fails under CI (`CI=true`) and otherwise says why and passes.

mod support;

use common::runtime::child_command;
use lab::Media;
use std::collections::HashSet;
use std::ffi::OsString;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::AsyncBufReadExt;

/// The player window's title (`client::outputs`).
const TITLE: &str = "Pessi Streamer: live";
/// Distinct colours a frame of testsrc2 shows at least (thousands in practice; a black or
/// grey window has a handful).
const MIN_COLOURS: usize = 500;
/// Share of pixels that differ between two frames 1 s apart (testsrc2's moving bar, clock and
/// counter change several percent of them).
const MIN_CHANGED: f64 = 0.01;

/// The tools this test runs, with their Debian packages.
const TOOLS: [(&str, &str); 4] = [
    ("Xvfb", "xvfb"),
    ("mpv", "mpv"),
    ("xwd", "x11-apps"),
    ("ffmpeg", "ffmpeg"),
];

use common::setup::on_path;

/// An RGB screenshot.
#[derive(Debug)]
struct Image {
    width: usize,
    height: usize,
    /// 0xRRGGBB per pixel, row by row.
    pixels: Vec<u32>,
}

impl Image {
    /// Parses an XWD file (X Window Dump, as written by `xwd`): a header of 25 big-endian
    /// 32-bit fields, the window name, the colour map, then the pixels in Z format.
    fn from_xwd(data: &[u8]) -> Result<Image, String> {
        let field = |i: usize| -> Result<u32, String> {
            data.get(i * 4..i * 4 + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("XWD header cut short ({} bytes)", data.len()))
        };
        let header_size = field(0)? as usize;
        let (version, format) = (field(1)?, field(2)?);
        if version != 7 || format != 2 {
            return Err(format!(
                "not a Z-format XWD v7 file (version {version}, format {format})"
            ));
        }
        let width = field(4)? as usize;
        let height = field(5)? as usize;
        let byte_order = field(7)?; // 0: least significant byte first
        let bits_per_pixel = field(11)? as usize;
        let bytes_per_line = field(12)? as usize;
        let masks = [field(14)?, field(15)?, field(16)?];
        let ncolors = field(19)? as usize;
        if bits_per_pixel != 32 && bits_per_pixel != 24 {
            return Err(format!("{bits_per_pixel} bits per pixel is not supported"));
        }
        let start = header_size + ncolors * 12;
        let end = start + height * bytes_per_line;
        let raster = data
            .get(start..end)
            .ok_or_else(|| format!("XWD pixels cut short: {} < {end} bytes", data.len()))?;
        let bytes = bits_per_pixel / 8;
        let channel = |v: u32, mask: u32| -> u32 {
            if mask == 0 {
                return 0;
            }
            let shifted = (v & mask) >> mask.trailing_zeros();
            let bits = mask.count_ones();
            // Scale to 8 bits whatever the mask's width.
            if bits >= 8 {
                shifted >> (bits - 8)
            } else {
                shifted << (8 - bits)
            }
        };
        let mut pixels = Vec::with_capacity(width * height);
        for row in raster.chunks_exact(bytes_per_line) {
            for px in row[..width * bytes].chunks_exact(bytes) {
                let mut v = 0u32;
                for (k, b) in px.iter().enumerate() {
                    v |= if byte_order == 0 {
                        u32::from(*b) << (8 * k)
                    } else {
                        u32::from(*b) << (8 * (bytes - 1 - k))
                    };
                }
                let [r, g, b] = masks.map(|m| channel(v, m));
                pixels.push(r << 16 | g << 8 | b);
            }
        }
        Ok(Image {
            width,
            height,
            pixels,
        })
    }

    fn distinct_colours(&self) -> usize {
        self.pixels.iter().collect::<HashSet<_>>().len()
    }

    /// Share of pixels that differ from `other` (of the same size).
    fn changed(&self, other: &Image) -> f64 {
        assert_eq!((self.width, self.height), (other.width, other.height));
        let n = self
            .pixels
            .iter()
            .zip(&other.pixels)
            .filter(|(a, b)| a != b)
            .count();
        n as f64 / self.pixels.len().max(1) as f64
    }
}

/// An Xvfb server on a free display number (it picks one and tells us: `-displayfd 1`),
/// killed when dropped and, if the test process dies, by the kernel.
struct Xvfb {
    display: String,
    _child: tokio::process::Child,
}

impl Xvfb {
    async fn start() -> Xvfb {
        let mut cmd = child_command("Xvfb");
        cmd.args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1280x720x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("starting Xvfb");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let n = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("Xvfb tells its display number within 20 s")
            .expect("reading Xvfb's display number")
            .expect("Xvfb exited before telling its display number");
        Xvfb {
            display: format!(":{}", n.trim()),
            _child: child,
        }
    }
}

/// A screenshot of the window named `name` on `display`, or why there is none (yet).
async fn screenshot(display: &str, name: &str) -> Result<Image, String> {
    let out = child_command("xwd")
        .args(["-silent", "-display", display, "-name", name])
        .output()
        .await
        .map_err(|e| format!("running xwd: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Image::from_xwd(&out.stdout)
}

/// Whether process `pid` is still running (a zombie is not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|t| !t.trim_start().starts_with('Z'))
    })
}

#[test]
fn the_demo_plays_moving_video_on_a_display_without_gpu() {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(t, _)| !on_path(t))
        .map(|(t, p)| format!("{t} (package {p})"))
        .collect();
    if !missing.is_empty() {
        let msg = format!(
            "the picture test needs {}: `sudo apt-get install -y ffmpeg mpv xvfb x11-apps` \
             (scripts/test.sh installs them)",
            missing.join(", ")
        );
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    }
    let t0 = Instant::now();
    let mut o = Overlay::start(
        r#"
"127.0.79.1" = ["127.0.79.2"]
"127.0.79.2" = ["127.0.79.1"]
"#,
        &["127.0.79.1"],
        Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
    );
    let xvfb = o.rt.block_on(Xvfb::start());
    // The client, as the lab starts it with a display, minus its own window (`--headless`: only
    // the player is tested). It and the mpv it starts see the Xvfb display.
    std::env::set_var("DISPLAY", &xvfb.display);
    std::env::remove_var("WAYLAND_DISPLAY");
    let stats = o.path("client-stats.jsonl");
    let args: Vec<OsString> = [
        "--servers",
        "127.0.79.2",
        "--stats",
        stats.to_str().unwrap(),
        "--video-player",
        "mpv",
        "--stream",
        "live",
        "--headless",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    {
        let _g = o.rt.enter();
        let client = o.bins.path("client");
        o.lab.supervisor().spawn("client", client, args).unwrap();
    }
    let started = o.wait_log(
        "client",
        &["player started", "mpv"],
        Duration::from_secs(20),
    );
    let pid: u32 = started
        .split("pid=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {started:?}"));
    let output = o.wait_log("client", &["mpv video output"], Duration::from_secs(1));
    eprintln!("{output}");

    // Wait for the window to show the test pattern.
    let deadline = Instant::now() + Duration::from_secs(40);
    let (first, colours) = loop {
        let shot = o.rt.block_on(screenshot(&xvfb.display, TITLE));
        let last = match shot {
            Ok(img) => {
                let c = img.distinct_colours();
                if c >= MIN_COLOURS {
                    break (img, c);
                }
                format!("{}×{} window with {c} colours", img.width, img.height)
            }
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!(
                "no picture in the player window after 40 s (last: {last}); logs:{}",
                o.all_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let first_at = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let second =
        o.rt.block_on(screenshot(&xvfb.display, TITLE))
            .expect("second screenshot");
    let changed = first.changed(&second);
    eprintln!(
        "player window {}×{}: {colours} colours, then {} colours and {:.1} % of pixels changed \
         1 s later; picture {:.1} s after the start",
        first.width,
        first.height,
        second.distinct_colours(),
        changed * 100.0,
        first_at.as_secs_f64()
    );
    assert!(
        second.distinct_colours() >= MIN_COLOURS,
        "the picture went away: {} colours",
        second.distinct_colours()
    );
    assert!(
        changed >= MIN_CHANGED,
        "the video does not move: {:.2} % of pixels changed in 1 s",
        changed * 100.0
    );

    // Nothing outlives the test: stopping the client stops its player, then Xvfb goes.
    o.stop();
    let t = Instant::now();
    while running(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!running(pid), "mpv (pid {pid}) outlived the client");
    drop(xvfb);
}

#[test]
fn xwd_files_are_parsed() {
    // A 3×2 window, 32 bits per pixel, LSB first, 8-bit masks, no colour map, rows padded
    // to 16 bytes.
    let mut header = [0u32; 25];
    header[0] = 100 + 4; // header + "win\0"
    header[1] = 7;
    header[2] = 2;
    header[3] = 24;
    header[4] = 3;
    header[5] = 2;
    header[11] = 32;
    header[12] = 16;
    header[14] = 0xff0000;
    header[15] = 0x00ff00;
    header[16] = 0x0000ff;
    let mut data: Vec<u8> = header.iter().flat_map(|v| v.to_be_bytes()).collect();
    data.extend(b"win\0");
    for row in [[0x112233u32, 0x445566, 0x112233], [0, 0xffffff, 0x0000ff]] {
        for px in row {
            data.extend(px.to_le_bytes());
        }
        data.extend([0xee; 4]); // padding
    }
    let img = Image::from_xwd(&data).unwrap();
    assert_eq!((img.width, img.height), (3, 2));
    assert_eq!(
        img.pixels,
        [0x112233, 0x445566, 0x112233, 0, 0xffffff, 0x0000ff]
    );
    assert_eq!(img.distinct_colours(), 5);
    let mut other = Image::from_xwd(&data).unwrap();
    assert_eq!(img.changed(&other), 0.0);
    other.pixels[0] = 1;
    assert!((img.changed(&other) - 1.0 / 6.0).abs() < 1e-9);
    // MSB first, 16-bit masks scaled to 8 bits.
    header[7] = 1;
    header[11] = 32;
    header[14] = 0xffff_0000;
    header[15] = 0x0000_ff00;
    header[16] = 0x0000_00ff;
    let mut data: Vec<u8> = header.iter().flat_map(|v| v.to_be_bytes()).collect();
    data.extend(b"win\0");
    for _ in 0..2 {
        for _ in 0..3 {
            data.extend(0xabcd_1234u32.to_be_bytes());
        }
        data.extend([0; 4]);
    }
    let img = Image::from_xwd(&data).unwrap();
    assert_eq!(img.pixels[0], 0xab1234);
    assert!(Image::from_xwd(&data[..120]).is_err());
    assert!(Image::from_xwd(b"junk").is_err());
}

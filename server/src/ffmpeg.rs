//! Finding `ffmpeg`/`ffprobe`, choosing an H.264 encoder that actually works on this machine,
//! and the encoder arguments shared by the transcode cache and live sources.

use common::runtime::child_command;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::OnceCell;
use tracing::{debug, info};

/// How to install FFmpeg, repeated in every "not found" error.
pub const INSTALL_HINT: &str = "install FFmpeg: `sudo apt-get install ffmpeg` on Debian/Ubuntu, \
     `sudo dnf install ffmpeg` on Fedora, `brew install ffmpeg` on macOS";

/// H.264 encoders tried in order (hardware first); `libx264` is the fallback.
pub const ENCODER_CANDIDATES: &[&str] = &[
    "h264_nvenc",
    "h264_qsv",
    "h264_vaapi",
    "h264_videotoolbox",
    "h264_amf",
    "libx264",
];

/// The software encoder used when no candidate works.
pub const FALLBACK_ENCODER: &str = "libx264";

/// Errors locating or running FFmpeg.
#[derive(Debug, Error)]
pub enum FfmpegError {
    /// `ffmpeg` or `ffprobe` is not on `PATH`.
    #[error("`{program}` not found on PATH; {INSTALL_HINT}")]
    NotFound {
        /// The missing program.
        program: &'static str,
    },
    /// Running a program failed.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Paths of the FFmpeg tools.
#[derive(Debug, Clone)]
pub struct Ffmpeg {
    /// The `ffmpeg` executable.
    pub ffmpeg: PathBuf,
    /// The `ffprobe` executable.
    pub ffprobe: PathBuf,
    encoder: Arc<OnceCell<String>>,
}

pub use common::setup::find_on_path;

impl Ffmpeg {
    /// Finds `ffmpeg` and `ffprobe` on `PATH`; the error says how to install them.
    pub fn discover() -> Result<Ffmpeg, FfmpegError> {
        let ffmpeg = find_on_path("ffmpeg").ok_or(FfmpegError::NotFound { program: "ffmpeg" })?;
        let ffprobe =
            find_on_path("ffprobe").ok_or(FfmpegError::NotFound { program: "ffprobe" })?;
        debug!(ffmpeg = %ffmpeg.display(), ffprobe = %ffprobe.display(), "found FFmpeg");
        Ok(Ffmpeg {
            ffmpeg,
            ffprobe,
            encoder: Arc::default(),
        })
    }

    /// The H.264 encoders this ffmpeg build lists (`ffmpeg -encoders`).
    pub async fn listed_encoders(&self) -> Result<Vec<String>, FfmpegError> {
        let out = child_command(&self.ffmpeg)
            .args(["-hide_banner", "-encoders"])
            .stderr(Stdio::null())
            .output()
            .await
            .map_err(|source| FfmpegError::Spawn {
                program: self.ffmpeg.clone(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let flags = words.next()?;
                let name = words.next()?;
                (flags.starts_with('V') && flags.len() == 6).then(|| name.to_string())
            })
            .collect())
    }

    /// Whether `encoder` can really encode: opens it on one tiny lavfi frame, with the same
    /// arguments the transcoder uses.
    pub async fn encoder_works(&self, encoder: &str) -> bool {
        let mut cmd = child_command(&self.ffmpeg);
        cmd.args(["-hide_banner", "-nostdin", "-v", "error"])
            .args(hw_input_args(encoder))
            .args(["-f", "lavfi", "-i", "color=size=64x64:duration=0.1"])
            .args(["-frames:v", "1", "-vf"])
            .arg(video_filter(encoder, 64, 64))
            .arg("-c:v")
            .arg(encoder)
            .args(["-f", "null", "-"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match cmd.output().await {
            Ok(out) if out.status.success() => true,
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                let reason = err.lines().next().unwrap_or("").trim().to_string();
                info!(
                    encoder,
                    reason, "H.264 encoder listed but unusable; skipped"
                );
                false
            }
            Err(e) => {
                info!(encoder, error = %e, "cannot run ffmpeg to test encoder; skipped");
                false
            }
        }
    }

    /// The first of `candidates` that is listed by `ffmpeg -encoders` and opens successfully,
    /// else [`FALLBACK_ENCODER`]. Not cached (see [`h264_encoder`](Self::h264_encoder)).
    pub async fn choose_encoder_from(&self, candidates: &[&str]) -> String {
        let listed = self.listed_encoders().await.unwrap_or_default();
        for &c in candidates {
            if !listed.iter().any(|l| l == c) {
                debug!(
                    encoder = c,
                    "H.264 encoder not in this ffmpeg build; skipped"
                );
                continue;
            }
            if self.encoder_works(c).await {
                return c.to_string();
            }
        }
        FALLBACK_ENCODER.to_string()
    }

    /// The H.264 encoder to use, chosen once per [`Ffmpeg`] (clones share the choice) from
    /// [`ENCODER_CANDIDATES`].
    pub async fn h264_encoder(&self) -> String {
        self.encoder
            .get_or_init(|| async {
                let e = self.choose_encoder_from(ENCODER_CANDIDATES).await;
                info!(encoder = %e, "H.264 encoder chosen");
                e
            })
            .await
            .clone()
    }
}

/// Arguments placed before the inputs (hardware device set-up).
pub fn hw_input_args(encoder: &str) -> Vec<String> {
    match encoder {
        "h264_vaapi" => vec!["-vaapi_device".into(), "/dev/dri/renderD128".into()],
        _ => Vec::new(),
    }
}

/// The video filter chain: bound the size to `max_w`×`max_h` keeping the aspect ratio, even
/// dimensions, 4:2:0 (plus the upload for VAAPI).
pub fn video_filter(encoder: &str, max_w: u32, max_h: u32) -> String {
    let scale = format!(
        "scale=w='min({max_w},iw)':h='min({max_h},ih)':force_original_aspect_ratio=decrease:force_divisible_by=2"
    );
    match encoder {
        "h264_vaapi" => format!("{scale},format=nv12,hwupload"),
        _ => format!("{scale},format=yuv420p"),
    }
}

/// Encoder settings shared by the transcode cache and live sources.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeSettings {
    /// The ffmpeg H.264 encoder name (see [`Ffmpeg::h264_encoder`]).
    pub encoder: String,
    /// Keyframe interval in seconds (`--keyint`).
    pub keyint_secs: f64,
    /// Largest output width.
    pub max_width: u32,
    /// Largest output height.
    pub max_height: u32,
    /// Target video bitrate in kbit/s (peaks bounded to 1.25× by the VBV).
    pub video_kbps: u32,
    /// AAC bitrate in kbit/s.
    pub audio_kbps: u32,
}

impl EncodeSettings {
    /// Defaults (≤ 1280×720, 2.5 Mbit/s video, 128 kbit/s audio) for `encoder` and `keyint_secs`.
    pub fn new(encoder: impl Into<String>, keyint_secs: f64) -> EncodeSettings {
        EncodeSettings {
            encoder: encoder.into(),
            keyint_secs,
            max_width: 1280,
            max_height: 720,
            video_kbps: 2500,
            audio_kbps: 128,
        }
    }

    /// A stable string of everything that changes the output (part of the cache key).
    pub fn fingerprint(&self) -> String {
        format!(
            "v2;{};k{};{}x{};{}k;{}k",
            self.encoder,
            self.keyint_secs,
            self.max_width,
            self.max_height,
            self.video_kbps,
            self.audio_kbps
        )
    }

    /// Output arguments for video: filter, encoder, rate control, fixed GOP of
    /// `fps × keyint` frames with no scene-cut keyframes and no B-frames (PTS = DTS, lower
    /// latency), `live` adds zero-latency tuning for libx264.
    pub fn video_args(&self, fps: f64, live: bool) -> Vec<String> {
        let gop = ((fps * self.keyint_secs).round() as u64).max(1);
        let mut a: Vec<String> = vec![
            "-vf".into(),
            video_filter(&self.encoder, self.max_width, self.max_height),
            "-c:v".into(),
            self.encoder.clone(),
        ];
        if self.encoder == "libx264" {
            a.extend(["-preset".into(), "veryfast".into()]);
            if live {
                a.extend(["-tune".into(), "zerolatency".into()]);
            }
        }
        a.extend([
            "-b:v".into(),
            format!("{}k", self.video_kbps),
            "-maxrate".into(),
            format!("{}k", self.video_kbps * 5 / 4),
            "-bufsize".into(),
            format!("{}k", self.video_kbps * 2),
            "-g".into(),
            gop.to_string(),
            "-keyint_min".into(),
            gop.to_string(),
            "-sc_threshold".into(),
            "0".into(),
            "-bf".into(),
            "0".into(),
            "-force_key_frames".into(),
            format!("expr:gte(t,n_forced*{})", self.keyint_secs),
        ]);
        a
    }

    /// Output arguments for audio: AAC, 48 kHz stereo.
    pub fn audio_args(&self) -> Vec<String> {
        vec![
            "-c:a".into(),
            "aac".into(),
            "-b:a".into(),
            format!("{}k", self.audio_kbps),
            "-ar".into(),
            "48000".into(),
            "-ac".into(),
            "2".into(),
        ]
    }

    /// Muxer arguments: MPEG-TS with PAT/PMT repeated.
    pub fn mux_args() -> Vec<String> {
        ["-f", "mpegts", "-mpegts_flags", "+resend_headers"]
            .map(String::from)
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unusable_and_unknown_encoders_fall_back_to_libx264() {
        let ff = Ffmpeg::discover().expect("ffmpeg is installed for tests");
        // On this (GPU-less) machine h264_nvenc is listed but cannot open; the bogus name is
        // not listed at all. Either way libx264 must be chosen.
        let chosen = ff
            .choose_encoder_from(&["h264_nvenc", "no_such_encoder_x", "libx264"])
            .await;
        assert_eq!(chosen, "libx264");
        assert!(!ff.encoder_works("no_such_encoder_x").await);
        assert!(ff.encoder_works("libx264").await);
        let listed = ff.listed_encoders().await.unwrap();
        assert!(listed.iter().any(|e| e == "libx264"), "{listed:?}");
        // Cached: the second call returns the same without re-probing.
        let a = ff.h264_encoder().await;
        let b = ff.clone().h264_encoder().await;
        assert_eq!(a, b);
    }

    #[test]
    fn missing_program_error_says_how_to_install() {
        let e = FfmpegError::NotFound { program: "ffmpeg" }.to_string();
        assert!(e.contains("sudo apt-get install ffmpeg"), "{e}");
    }
}

//! Validation with ffprobe and the transcode cache: each video file is transcoded once into a
//! stream-ready MPEG-TS (H.264 with a fixed keyframe interval, no B-frames, ≤ 1280×720 4:2:0;
//! AAC 48 kHz stereo, silence added when the file has no audio; PAT/PMT repeated).
//!
//! Cache layout: `<cache dir>/<path hash>-<key hash>.ts`, where the path hash is FNV-1a of the
//! canonical source path and the key hash covers (canonical path, size, mtime, encoder
//! settings). A file is written as `.<name>.<pid>.tmp` and renamed when complete, so a crash never
//! leaves a half file under a valid name; entries for older versions of the same source (same
//! path hash) are deleted once a new one is complete. The default cache dir is
//! `<videos>/.pessi-cache/` (hidden, so the folder watcher ignores it).

use crate::ffmpeg::{hw_input_args, EncodeSettings, Ffmpeg};
use common::rng::fnv1a64;
use common::runtime::child_command;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Name of the default cache folder inside the videos folder.
pub const CACHE_DIR_NAME: &str = ".pessi-cache";

/// Why a file cannot become a channel. Every variant names the file.
#[derive(Debug, Error)]
pub enum TranscodeError {
    /// The file cannot be read (permissions, vanished...).
    #[error("{file}: cannot read: {source}")]
    Unreadable {
        /// The file.
        file: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// ffprobe could not parse it: not a media file, or corrupt.
    #[error("{file}: not a readable video (ffprobe: {reason})")]
    NotMedia {
        /// The file.
        file: PathBuf,
        /// ffprobe's first error line.
        reason: String,
    },
    /// It is a media file without a usable video stream (audio only, a still image, text).
    #[error("{file}: no video stream to play ({reason})")]
    NoVideo {
        /// The file.
        file: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// ffmpeg failed while transcoding (corrupt data, unsupported codec...).
    #[error("{file}: transcoding failed: {reason}")]
    Ffmpeg {
        /// The file.
        file: PathBuf,
        /// The last lines ffmpeg printed on stderr.
        reason: String,
    },
    /// A cache I/O operation failed.
    #[error("{file}: cache error: {source}")]
    Cache {
        /// The cache file involved.
        file: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Cancelled by shutdown.
    #[error("{0}: transcoding cancelled")]
    Cancelled(PathBuf),
}

/// What ffprobe says about a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeInfo {
    /// Duration in seconds.
    pub duration: f64,
    /// Video width.
    pub width: u32,
    /// Video height.
    pub height: u32,
    /// Frame rate of the video stream (average, else nominal), if known.
    pub fps: Option<f64>,
    /// Whether there is an audio stream.
    pub has_audio: bool,
    /// Video codec name.
    pub video_codec: String,
}

/// Codecs ffprobe reports as "video" for things that are not (ANSI art of text files...).
const NOT_REALLY_VIDEO: &[&str] = &["ansi", "bintext", "xbin", "idf", "tty"];

fn parse_rate(s: &str) -> Option<f64> {
    let (n, d) = s.split_once('/').unwrap_or((s, "1"));
    let (n, d): (f64, f64) = (n.parse().ok()?, d.parse().ok()?);
    (d > 0.0 && n > 0.0).then(|| n / d)
}

/// Validates `file` with ffprobe: it must be a readable media file with a real video stream
/// and a duration of at least 0.2 s.
pub async fn probe(ffmpeg: &Ffmpeg, file: &Path) -> Result<ProbeInfo, TranscodeError> {
    // Readability first, for a precise error.
    std::fs::File::open(file).map_err(|source| TranscodeError::Unreadable {
        file: file.to_path_buf(),
        source,
    })?;
    let out = child_command(&ffmpeg.ffprobe)
        .args(["-v", "error", "-show_entries"])
        .arg("stream=codec_type,codec_name,width,height,avg_frame_rate,r_frame_rate:format=duration,format_name")
        .args(["-of", "flat"])
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|source| TranscodeError::Unreadable {
            file: ffmpeg.ffprobe.clone(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let reason = stderr.lines().last().unwrap_or("unknown error").trim();
        return Err(TranscodeError::NotMedia {
            file: file.to_path_buf(),
            reason: reason.to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k == key).then(|| v.trim_matches('"').to_string())
        })
    };
    let no_video = |reason: String| TranscodeError::NoVideo {
        file: file.to_path_buf(),
        reason,
    };
    let mut video = None;
    let mut has_audio = false;
    for i in 0.. {
        let Some(kind) = get(&format!("streams.stream.{i}.codec_type")) else {
            break;
        };
        let codec = get(&format!("streams.stream.{i}.codec_name")).unwrap_or_default();
        match kind.as_str() {
            "audio" => has_audio = true,
            "video" if video.is_none() && !NOT_REALLY_VIDEO.contains(&codec.as_str()) => {
                video = Some((i, codec))
            }
            _ => {}
        }
    }
    let format = get("format.format_name").unwrap_or_default();
    let Some((vi, video_codec)) = video else {
        return Err(no_video(format!("format {format}")));
    };
    let num = |k: &str| get(&format!("streams.stream.{vi}.{k}")).and_then(|v| v.parse().ok());
    let duration: f64 = get("format.duration")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    if duration < 0.2 {
        return Err(no_video(format!(
            "{video_codec} in {format} has no duration (a still image?)"
        )));
    }
    let fps = get(&format!("streams.stream.{vi}.avg_frame_rate"))
        .and_then(|r| parse_rate(&r))
        .or_else(|| get(&format!("streams.stream.{vi}.r_frame_rate")).and_then(|r| parse_rate(&r)));
    Ok(ProbeInfo {
        duration,
        width: num("width").unwrap_or(0),
        height: num("height").unwrap_or(0),
        fps,
        has_audio,
        video_codec,
    })
}

/// The transcode cache (see the module docs for its layout).
#[derive(Debug, Clone)]
pub struct TranscodeCache {
    dir: PathBuf,
    ffmpeg: Ffmpeg,
    settings: EncodeSettings,
}

impl TranscodeCache {
    /// A cache in `dir` (created if missing) producing files with `settings`.
    pub fn new(
        dir: PathBuf,
        ffmpeg: Ffmpeg,
        settings: EncodeSettings,
    ) -> Result<TranscodeCache, TranscodeError> {
        std::fs::create_dir_all(&dir).map_err(|source| TranscodeError::Cache {
            file: dir.clone(),
            source,
        })?;
        Ok(TranscodeCache {
            dir,
            ffmpeg,
            settings,
        })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings used.
    pub fn settings(&self) -> &EncodeSettings {
        &self.settings
    }

    /// Where the transcoded version of `source` (in its current state) is or will be.
    pub fn cache_path(&self, source: &Path) -> Result<PathBuf, TranscodeError> {
        let canon = source
            .canonicalize()
            .map_err(|e| TranscodeError::Unreadable {
                file: source.to_path_buf(),
                source: e,
            })?;
        let meta = canon.metadata().map_err(|e| TranscodeError::Unreadable {
            file: source.to_path_buf(),
            source: e,
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let path_bytes = canon.to_string_lossy().into_owned();
        let path_hash = fnv1a64(path_bytes.bytes());
        let key = format!(
            "{path_bytes}\0{}\0{mtime}\0{}",
            meta.len(),
            self.settings.fingerprint()
        );
        let key_hash = fnv1a64(key.bytes());
        Ok(self
            .dir
            .join(format!("{path_hash:016x}-{key_hash:016x}.ts")))
    }

    /// The stream-ready TS of `source`: reused from the cache if present, otherwise validated
    /// with ffprobe and transcoded now (progress logged every ~10 % as `transcoding`).
    pub async fn ensure(
        &self,
        source: &Path,
        cancel: &CancellationToken,
    ) -> Result<PathBuf, TranscodeError> {
        let target = self.cache_path(source)?;
        if target.is_file() {
            debug!(file = %source.display(), cache = %target.display(), "transcode cache hit");
            return Ok(target);
        }
        let info = probe(&self.ffmpeg, source).await?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The process id keeps servers that share a videos folder (and so a cache) from writing
        // the same temporary file; the last rename wins, with identical content.
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let started = Instant::now();
        info!(file = %source.display(), duration_s = info.duration, width = info.width,
              height = info.height, codec = %info.video_codec, audio = info.has_audio,
              encoder = %self.settings.encoder, "transcoding starts");
        let result = self.run_ffmpeg(source, &tmp, &info, cancel).await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &target).map_err(|e| TranscodeError::Cache {
            file: target.clone(),
            source: e,
        })?;
        let secs = started.elapsed().as_secs_f64();
        let size = target.metadata().map_or(0, |m| m.len());
        info!(file = %source.display(), seconds = format!("{secs:.1}"),
              speed = format!("{:.1}x", info.duration / secs.max(1e-3)),
              kbps = (size as f64 * 8.0 / info.duration.max(1e-3) / 1000.0) as u64,
              "transcoding done");
        self.remove_stale(&target);
        Ok(target)
    }

    /// Deletes older cache entries of the same source path.
    fn remove_stale(&self, keep: &Path) {
        let Some(prefix) = keep
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split_once('-'))
            .map(|(p, _)| format!("{p}-"))
        else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let n = e.file_name();
            if p != keep && n.to_string_lossy().starts_with(&prefix) {
                debug!(cache = %p.display(), "removing stale cache entry");
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// Removes the cache entries of the source whose cached file is `cached` (the source was
    /// deleted from the videos folder): every version of that path.
    pub fn forget(&self, cached: &Path) {
        let _ = std::fs::remove_file(cached);
        self.remove_stale(cached);
    }

    async fn run_ffmpeg(
        &self,
        source: &Path,
        tmp: &Path,
        info: &ProbeInfo,
        cancel: &CancellationToken,
    ) -> Result<(), TranscodeError> {
        let s = &self.settings;
        let mut cmd = child_command(&self.ffmpeg.ffmpeg);
        cmd.args(["-hide_banner", "-nostdin", "-nostats", "-v", "error", "-y"])
            .args(hw_input_args(&s.encoder))
            .arg("-i")
            .arg(source);
        if !info.has_audio {
            cmd.args([
                "-f",
                "lavfi",
                "-i",
                "anullsrc=channel_layout=stereo:sample_rate=48000",
            ]);
        }
        cmd.args(["-map", "0:v:0"]);
        if info.has_audio {
            cmd.args(["-map", "0:a:0"]);
        } else {
            cmd.args(["-map", "1:a:0", "-shortest"]);
        }
        let fps = match info.fps {
            Some(f) if (1.0..=60.5).contains(&f) => f,
            _ => {
                cmd.args(["-r", "25"]);
                25.0
            }
        };
        cmd.args(s.video_args(fps, false))
            .args(s.audio_args())
            .args(EncodeSettings::mux_args())
            .args(["-progress", "pipe:1"])
            .arg(tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| TranscodeError::Ffmpeg {
            file: source.to_path_buf(),
            reason: format!("cannot run ffmpeg: {e}"),
        })?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let err_task = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let file = source.display().to_string();
        let duration = info.duration;
        let progress = async {
            let mut lines = BufReader::new(stdout).lines();
            let mut next_decile = 1;
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(us) = line
                    .strip_prefix("out_time_us=")
                    .or_else(|| line.strip_prefix("out_time_ms="))
                    .and_then(|v| v.parse::<f64>().ok())
                else {
                    continue;
                };
                let percent = (us / 1e6 / duration.max(1e-3) * 100.0).min(100.0);
                if percent >= f64::from(next_decile * 10) && next_decile < 10 {
                    info!(file = %file, percent = percent as u32, "transcoding");
                    next_decile = (percent / 10.0) as u32 + 1;
                }
            }
        };
        let status = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(TranscodeError::Cancelled(source.to_path_buf()));
            }
            (status, ()) = async { tokio::join!(child.wait(), progress) } => status,
        };
        let err = err_task.await.unwrap_or_default();
        match status {
            Ok(s) if s.success() => {
                if !err.trim().is_empty() {
                    warn!(file = %source.display(), stderr = %tail(&err, 3), "ffmpeg warnings while transcoding");
                }
                Ok(())
            }
            Ok(s) => Err(TranscodeError::Ffmpeg {
                file: source.to_path_buf(),
                reason: format!("{s}: {}", tail(&err, 3)),
            }),
            Err(e) => Err(TranscodeError::Ffmpeg {
                file: source.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }
}

/// The last `n` non-empty lines of `s`, joined with " | ".
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

//! Live sources: ffmpeg encodes an input in real time to MPEG-TS on its stdout, which is cut
//! into keyframe-aligned datagrams and sent at once (the input is already real-time).
//!
//! Input syntax (`--source NAME=INPUT`):
//! * `lavfi:<video graph>` — a filter-graph source read at its native rate (`-re`), with
//!   silent stereo audio added (`anullsrc`), e.g. `lavfi:testsrc2=size=640x360:rate=25`;
//! * `lavfi:<video graph>|<audio graph>` — the same with an audio source, e.g.
//!   `lavfi:testsrc2=size=640x360:rate=25|sine=frequency=440`;
//! * anything else is given to `-i` (URL, device, file); an existing file is read with `-re`,
//!   looping (`-stream_loop -1`).
//!   Its first audio stream is used if it has one (no silence is added).
//!
//! If ffmpeg exits (bad input, camera unplugged), the exit and its last stderr lines are
//! logged with the channel name and it is restarted with exponential backoff (1 s → 30 s,
//! reset after 30 s of successful running).

use crate::ffmpeg::{hw_input_args, EncodeSettings, Ffmpeg};
use crate::pacer::DatagramAssembler;
use crate::playout::ChunkSink;
use crate::transcode::tail;
use crate::Chunk;
use common::runtime::child_command;
use common::ts::TsSplitter;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// First retry delay after ffmpeg exits.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Largest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// A live channel's encoder.
#[derive(Debug)]
pub struct LiveSource;

/// The ffmpeg input arguments for `input` (see the module docs), and the frame rate to
/// size the GOP with (from `rate=` in a lavfi graph, else 25).
pub fn input_args(input: &str) -> (Vec<String>, f64) {
    let s = |v: &str| v.to_string();
    if let Some(graph) = input.strip_prefix("lavfi:") {
        let (video, audio) = match graph.split_once('|') {
            Some((v, a)) => (v, a),
            None => (graph, "anullsrc=channel_layout=stereo:sample_rate=48000"),
        };
        let fps = video
            .split([':', ','])
            .find_map(|kv| kv.strip_prefix("rate=").or_else(|| kv.strip_prefix("r=")))
            .and_then(|r| {
                let (n, d) = r.split_once('/').unwrap_or((r, "1"));
                Some(n.parse::<f64>().ok()? / d.parse::<f64>().ok()?)
            })
            .filter(|f| f.is_finite() && *f >= 1.0)
            .unwrap_or(25.0);
        let args = vec![
            s("-re"),
            s("-f"),
            s("lavfi"),
            s("-i"),
            s(video),
            s("-re"),
            s("-f"),
            s("lavfi"),
            s("-i"),
            s(audio),
            s("-map"),
            s("0:v:0"),
            s("-map"),
            s("1:a:0"),
        ];
        return (args, fps);
    }
    let mut args = Vec::new();
    if std::path::Path::new(input).is_file() {
        // A file plays at its own pace, looping (timestamps stay continuous across loops).
        args.extend([s("-re"), s("-stream_loop"), s("-1")]);
    }
    args.extend([
        s("-i"),
        s(input),
        s("-map"),
        s("0:v:0"),
        s("-map"),
        s("0:a:0?"),
    ]);
    (args, 25.0)
}

impl LiveSource {
    /// Runs ffmpeg on `input` until `cancel` fires, sending datagrams to `sink`; restarts
    /// it with backoff when it exits. The child is killed on cancel and dies with us.
    pub fn start(
        name: String,
        input: String,
        ffmpeg: Ffmpeg,
        settings: EncodeSettings,
        mut sink: impl ChunkSink,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut delay = RETRY_MIN;
            loop {
                let started = Instant::now();
                let outcome = run_once(&name, &input, &ffmpeg, &settings, &mut sink, &cancel).await;
                match outcome {
                    RunOutcome::Stop => return,
                    RunOutcome::Exited(why) => {
                        if started.elapsed() > RETRY_MAX {
                            delay = RETRY_MIN;
                        }
                        warn!(channel = %name, input = %input, reason = %why,
                              retry_in_s = delay.as_secs(), "live source ffmpeg exited; retrying");
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        })
    }
}

enum RunOutcome {
    Stop,
    Exited(String),
}

async fn run_once(
    name: &str,
    input: &str,
    ffmpeg: &Ffmpeg,
    settings: &EncodeSettings,
    sink: &mut impl ChunkSink,
    cancel: &CancellationToken,
) -> RunOutcome {
    let (inputs, fps) = input_args(input);
    let mut cmd = child_command(&ffmpeg.ffmpeg);
    cmd.args(["-hide_banner", "-nostdin", "-nostats", "-v", "error"])
        .args(hw_input_args(&settings.encoder))
        .args(inputs)
        .args(settings.video_args(fps, true))
        .args(settings.audio_args())
        .args(EncodeSettings::mux_args())
        .args(["-flush_packets", "1", "pipe:1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return RunOutcome::Exited(format!("cannot run ffmpeg: {e}")),
    };
    info!(channel = name, input, "live source ffmpeg started");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut splitter = TsSplitter::new();
    let mut asm = DatagramAssembler::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return RunOutcome::Stop;
            }
            n = stdout.read(&mut buf) => n,
        };
        let n = match n {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        splitter.push(&buf[..n]);
        for p in splitter.drain() {
            if asm.push(p).is_err() {
                continue;
            }
            while let Some(d) = asm.pop() {
                let chunk = Chunk {
                    payload: d.payload,
                    keyframe: d.keyframe,
                };
                if !sink.send(chunk).await {
                    let _ = child.kill().await;
                    return RunOutcome::Stop;
                }
            }
        }
    }
    let status = child.wait().await;
    let err = err_task.await.unwrap_or_default();
    let status = match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    RunOutcome::Exited(format!("{status}: {}", tail(&err, 3)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_syntax() {
        let (a, fps) = input_args("lavfi:testsrc2=size=640x360:rate=30|sine=frequency=440");
        assert_eq!(fps, 30.0);
        assert!(a.contains(&"testsrc2=size=640x360:rate=30".to_string()));
        assert!(a.contains(&"sine=frequency=440".to_string()));
        let (a, fps) = input_args("lavfi:testsrc2");
        assert_eq!(fps, 25.0);
        assert!(a.iter().any(|x| x.starts_with("anullsrc")));
        let (a, _) = input_args("udp://239.0.0.1:1234");
        assert_eq!(a[0], "-i");
        assert!(a.contains(&"0:a:0?".to_string()));
    }
}

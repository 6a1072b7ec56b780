//! Instant start over loopback: the real bootstrapper `run()` in-process, real `node` binaries
//! (chain server – n1 – n2), an in-process server (`join_overlay` + `Relay`) fed in real time
//! with the keyframe-aligned datagrams (`server::pacer::DatagramAssembler`) of a clip made by
//! ffmpeg (H.264 with a 3 s GOP + AAC), and fake clients that subscribe at arbitrary points of a
//! GOP. Every client must start with the GOP cache (first datagram flagged KEYFRAME and
//! FROM_CACHE), get burst and live with contiguous sequence numbers, and what it received must
//! decode with `ffmpeg -v error` without a single error.
//!
//! Skipped (with a message) if `ffmpeg` is not installed. Address block: 127.0.55.*.

mod support;

use bytes::Bytes;
use common::host::{join_overlay, OverlayArgs};
use common::ts::TsSplitter;
use common::wire::{video_flags, ChannelId, ChannelInfo};
use node::{Relay, RelayConfig};
use server::pacer::DatagramAssembler;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use support::{start_bootstrapper, Daemon, Video};
use tokio_util::sync::CancellationToken;

const CHANNEL: &str = "clip";
const P: &str = "127.0.55";
const PORT: u16 = 18055;
/// Length of the generated clip; the test is over well before it ends.
const CLIP_SECS: u32 = 25;

/// A node of the chain (logging at `warn`: its lines are not read).
fn node(ip: &str, bport: u16) -> Daemon {
    Daemon::start_quiet(ip, PORT, P, bport)
}

fn ffmpeg_available() -> bool {
    Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A 640×360 25 fps H.264 (GOP 75 frames = 3 s) + AAC clip, cut into keyframe-aligned
/// datagrams exactly as the server's pacer does: `(payload, keyframe)`.
fn clip_datagrams(dir: &Path) -> Vec<(Bytes, bool)> {
    let path = dir.join("clip.ts");
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc2=size=640x360:rate=25")
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", &CLIP_SECS.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ])
        .args(["-g", "75", "-keyint_min", "75", "-sc_threshold", "0"])
        .args(["-c:a", "aac", "-b:a", "64k", "-f", "mpegts"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg could not make the clip");
    let data = std::fs::read(&path).unwrap();
    let mut split = TsSplitter::strict();
    let mut asm = DatagramAssembler::new();
    let mut out = Vec::new();
    let mut feed = |split: &mut TsSplitter, asm: &mut DatagramAssembler| {
        for pkt in split.drain().collect::<Vec<_>>() {
            asm.push(pkt).unwrap();
            while let Some(d) = asm.pop() {
                out.push((d.payload, d.keyframe));
            }
        }
    };
    for chunk in data.chunks(16 * 1024) {
        split.push(chunk);
        feed(&mut split, &mut asm);
    }
    split.finish();
    feed(&mut split, &mut asm);
    asm.flush();
    while let Some(d) = asm.pop() {
        out.push((d.payload, d.keyframe));
    }
    out
}

/// A fake client of [`CHANNEL`] at `ip` (with the daemons' large receive buffer), whose PoP
/// is `pop`:[`PORT`].
async fn client(ip: &str, pop: &str, shutdown: &CancellationToken) -> support::Client {
    let pop: SocketAddr = format!("{pop}:{PORT}").parse().unwrap();
    support::Client::start_with_big_buffer(ip, pop, CHANNEL, shutdown).await
}

/// Checks one client's stream; returns the burst length.
fn check(name: &str, got: &[Video], dir: &Path) -> usize {
    assert!(got.len() > 50, "{name}: only {} datagrams", got.len());
    let (seq0, flags0) = (got[0].seq, got[0].flags);
    assert!(
        flags0 & video_flags::KEYFRAME != 0 && flags0 & video_flags::FROM_CACHE != 0,
        "{name}: first datagram (seq {seq0}) has flags {flags0:#b}, not KEYFRAME|FROM_CACHE"
    );
    let burst = got
        .iter()
        .take_while(|d| d.flags & video_flags::FROM_CACHE != 0)
        .count();
    assert!(
        got[burst..]
            .iter()
            .all(|d| d.flags & video_flags::FROM_CACHE == 0),
        "{name}: FROM_CACHE datagrams after live ones"
    );
    for w in got.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "{name}: sequence numbers not contiguous (gap, duplicate or reorder)"
        );
    }
    let file = dir.join(format!("{name}.ts"));
    // The capture ends mid-PES; end it before its last keyframe datagram (where the server's
    // pacer starts a fresh access unit) so that only the start is judged.
    let end = got
        .iter()
        .rposition(|d| d.flags & video_flags::KEYFRAME != 0)
        .filter(|&i| i > 0)
        .unwrap_or(got.len());
    let bytes: Vec<u8> = got[..end]
        .iter()
        .flat_map(|d| d.payload.iter().copied())
        .collect();
    std::fs::write(&file, &bytes).unwrap();
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&file)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "{name}: decoding what was received gave errors:\n{err}"
    );
    println!(
        "{name}: {} datagrams, seq {}..={}, burst {burst} datagrams ({} KB), decodes cleanly",
        got.len(),
        seq0,
        got.last().unwrap().seq,
        got[..burst].iter().map(|g| g.payload.len()).sum::<usize>() / 1024
    );
    burst
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("pessi-gop-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn new_subscribers_start_at_a_keyframe_from_the_gop_cache() {
    assert!(
        ffmpeg_available(),
        "ffmpeg is required (real H.264 output): `sudo apt-get install ffmpeg` (scripts/test.sh does it)"
    );
    let dir = temp_dir();
    let datagrams = Arc::new(clip_datagrams(&dir));
    let keyframes = datagrams.iter().filter(|d| d.1).count();
    assert!(datagrams[0].1 && keyframes >= 8, "{keyframes} keyframes");
    // Real-time pacing of the clip's datagrams.
    let period = Duration::from_secs(CLIP_SECS.into()) / datagrams.len() as u32;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (bport, bshut) = start_bootstrapper(
        &rt,
        P,
        &format!(
            "\"{P}.1\" = [\"{P}.2\"]\n\"{P}.2\" = [\"{P}.1\", \"{P}.3\"]\n\"{P}.3\" = [\"{P}.2\"]\n"
        ),
        PORT,
    );
    let shutdown = CancellationToken::new();
    let _n1 = node(&format!("{P}.2"), bport);
    let _n2 = node(&format!("{P}.3"), bport);

    // The server: its channel plays from the start (so its cache is warm when n1 subscribes).
    let relay = rt.block_on(async {
        let args = OverlayArgs {
            ip: format!("{P}.1").parse().unwrap(),
            port: PORT,
            bootstrapper: format!("{P}.250").parse().unwrap(),
            bootstrapper_port: bport,
            impair: vec![],
            no_recovery: false,
            redundancy: 1,
            key: Some(support::key_files(format!("{P}.1").parse().unwrap()).0),
            network_key: Some(support::key_files(format!("{P}.1").parse().unwrap()).1),
            viewer_key: None,
            bench_plaintext: false,
        };
        let joined = join_overlay(&args, &shutdown).await.unwrap();
        let (relay, _task) = Relay::spawn(joined, RelayConfig::default(), shutdown.clone());
        relay
            .set_local_channels(vec![ChannelInfo {
                id: ChannelId::of_name(CHANNEL),
                name: CHANNEL.into(),
            }])
            .await;
        relay
    });
    let (feeder, stop, dgs) = (relay.clone(), shutdown.clone(), datagrams.clone());
    rt.spawn(async move {
        let t0 = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut i = 0usize;
        while i < dgs.len() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    while i < dgs.len() && t0 + period * i as u32 <= tokio::time::Instant::now() {
                        let (p, k) = dgs[i].clone();
                        feeder.send_local_video(ChannelId::of_name(CHANNEL), p, k).await;
                        i += 1;
                    }
                }
            }
        }
    });

    let mut bursts = Vec::new();
    rt.block_on(async {
        // A: first viewer anywhere, at the end of the chain: n2 and n1 are not receiving the
        // channel yet, so A's start comes from the server's cache through n1 and n2.
        let mut a = client(&format!("{P}.200"), &format!("{P}.3"), &shutdown).await;
        a.list_and_subscribe(Duration::from_secs(30)).await;
        let got = a.receive(usize::MAX, Duration::from_millis(3500)).await;
        bursts.push(("A (n2, first viewer)", check("A", &got, &dir)));
        // B joins n2 while the channel flows there (at another point of the GOP): n2's cache.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut b = client(&format!("{P}.201"), &format!("{P}.3"), &shutdown).await;
        b.list_and_subscribe(Duration::from_secs(30)).await;
        let got = b.receive(usize::MAX, Duration::from_millis(3500)).await;
        bursts.push(("B (n2, flowing)", check("B", &got, &dir)));
        // C joins n1 (flowing, feeding n2): n1's cache.
        let mut c = client(&format!("{P}.202"), &format!("{P}.2"), &shutdown).await;
        c.list_and_subscribe(Duration::from_secs(30)).await;
        let got = c.receive(usize::MAX, Duration::from_millis(3500)).await;
        bursts.push(("C (n1, flowing)", check("C", &got, &dir)));
        // The server sent one burst (to n1); A's came through n1 and n2 unchanged.
        let s = relay.stats().await;
        assert_eq!(s.gop_bursts, 1, "{s:?}");
        assert!(s.gop_bytes_cached > 0 && s.gop_overflows == 0, "{s:?}");
        println!(
            "server: {} burst(s), {} datagrams, {} KB cached now",
            s.gop_bursts,
            s.gop_burst_datagrams,
            s.gop_bytes_cached / 1024
        );
    });
    println!("bursts: {bursts:?}");
    shutdown.cancel();
    bshut.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

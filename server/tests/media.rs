//! End-to-end media tests with the real ffmpeg: transcode cache, paced looped playout checked
//! by ffmpeg/ffprobe, validation errors, live sources and the channel manager.

use common::ts::{datagram_packets, ContinuityChecker, DATAGRAM_PAYLOAD_LEN};
use common::wire::ChannelId;
use server::ffmpeg::{EncodeSettings, Ffmpeg};
use server::live::LiveSource;
use server::playout::Playout;
use server::transcode::{probe, TranscodeCache, TranscodeError};
use server::{ChannelManager, Chunk, ManagerConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn ffmpeg_gen(out: &Path, secs: u32, audio: bool) {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=320x240:rate=25:duration={secs}"));
    if audio {
        cmd.args(["-f", "lavfi", "-i"])
            .arg(format!("sine=frequency=440:duration={secs}"));
    }
    cmd.args(["-c:v", "libx264", "-preset", "ultrafast"])
        .arg(out);
    let st = cmd.status().expect("run ffmpeg");
    assert!(st.success(), "ffmpeg could not generate the test clip");
}

fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the ")".
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn cache(dir: &Path) -> (Ffmpeg, TranscodeCache) {
    let ff = Ffmpeg::discover().expect("ffmpeg installed");
    let settings = EncodeSettings::new("libx264", 1.0);
    let cache = TranscodeCache::new(dir.join(".pessi-cache"), ff.clone(), settings).unwrap();
    (ff, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_then_looped_playout_is_one_clean_stream() {
    common::runtime::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("clip.mp4");
    ffmpeg_gen(&src, 3, true);
    let (ff, cache) = cache(dir.path());
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let cached = cache.ensure(&src, &cancel).await.unwrap();
    let transcode_s = t.elapsed().as_secs_f64();
    // Reused, not redone.
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let made = mtime(&cached);
    assert_eq!(cache.ensure(&src, &cancel).await.unwrap(), cached);
    assert_eq!(mtime(&cached), made, "the cached file was rewritten");
    let info = probe(&ff, &cached).await.unwrap();
    assert!(info.has_audio);
    assert!((2.8..3.5).contains(&info.duration), "{info:?}");

    // Play ~7 s: two loops and a bit.
    let (tx, mut rx) = mpsc::channel::<Chunk>(4096);
    let stop = CancellationToken::new();
    let cpu0 = cpu_ticks();
    let task = Playout::start("clip".into(), cached.clone(), tx, stop.clone());
    let mut got: Vec<(Instant, Chunk)> = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(7200) {
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            got.push((Instant::now(), c));
        }
    }
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    let cpu = (cpu_ticks() - cpu0) as f64 / 100.0; // USER_HZ
                                                   // Paced in real time: never faster (at most 2 loops, 9 keyframes of a 1 s GOP in 7.2 s);
                                                   // slower only if the machine is loaded, so the lower bounds are loose.
    assert!((1..=2).contains(&stats.loops), "{stats:?}");
    assert!(got
        .iter()
        .all(|(_, c)| c.payload.len() == DATAGRAM_PAYLOAD_LEN));
    let keyframes = got.iter().filter(|(_, c)| c.keyframe).count();
    assert!(
        (3..=9).contains(&keyframes),
        "{keyframes} keyframes in 7.2 s"
    );
    // Smoothness as received (real timers on a shared machine: generous bounds).
    let gaps: Vec<f64> = got
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1000.0)
        .collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let max = gaps.iter().cloned().fold(0.0, f64::max);
    let kbps = got.len() as f64 * 1316.0 * 8.0 / 7200.0;
    eprintln!(
        "transcode {transcode_s:.2}s for 3 s; playout {} datagrams, mean gap {mean:.2} ms, \
         max gap {max:.1} ms, {kbps:.0} kbit/s, cpu {cpu:.2}s over 7.2 s",
        got.len()
    );
    // Stopping cut the last frame: keep up to the last keyframe datagram (exclusive), which
    // keyframe alignment makes a clean cut point.
    let last_kf = got.iter().rposition(|(_, c)| c.keyframe).unwrap();
    let mut cc = ContinuityChecker::new();
    let mut out = Vec::new();
    for (_, c) in &got[..last_kf] {
        for p in datagram_packets(&c.payload) {
            cc.push(&p.unwrap());
        }
        out.extend_from_slice(&c.payload);
    }
    assert_eq!(cc.lost(), 0);
    let out_ts = dir.path().join("out.ts");
    std::fs::write(&out_ts, &out).unwrap();
    // ffmpeg decodes it without a single error.
    let dec = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i"])
        .arg(&out_ts)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&dec.stderr);
    assert!(dec.status.success() && err.trim().is_empty(), "{err}");
    // Packet PTS increase monotonically across the loops, for video and audio.
    for stream in ["v:0", "a:0"] {
        let pr = Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", stream])
            .args(["-show_entries", "packet=pts", "-of", "csv=p=0"])
            .arg(&out_ts)
            .output()
            .unwrap();
        let pts: Vec<i64> = String::from_utf8_lossy(&pr.stdout)
            .lines()
            .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
            .collect();
        assert!(pts.len() > 100, "{stream}: {} packets", pts.len());
        for w in pts.windows(2) {
            assert!(w[1] > w[0], "{stream}: PTS {} then {}", w[0], w[1]);
        }
        // ~6-7 s of media (first packet to the last keyframe).
        let span = (pts[pts.len() - 1] - pts[0]) as f64 / 90_000.0;
        assert!((5.5..7.5).contains(&span), "{stream}: span {span}");
    }
}

#[tokio::test]
async fn invalid_files_are_rejected_by_name_and_silent_files_get_audio() {
    let dir = tempfile::tempdir().unwrap();
    let (ff, cache) = cache(dir.path());
    let cancel = CancellationToken::new();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a video\n".repeat(50)).unwrap();
    let junk = dir.path().join("broken.mp4");
    std::fs::write(
        &junk,
        (0..50_000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for bad in [&text, &junk, &dir.path().join("missing.mp4")] {
        let e = cache.ensure(bad, &cancel).await.unwrap_err();
        assert!(
            matches!(
                e,
                TranscodeError::NotMedia { .. }
                    | TranscodeError::NoVideo { .. }
                    | TranscodeError::Unreadable { .. }
            ),
            "{e:?}"
        );
        let name = bad.file_name().unwrap().to_string_lossy().to_string();
        assert!(e.to_string().contains(&name), "{e}");
    }
    let silent = dir.path().join("silent.mkv");
    ffmpeg_gen(&silent, 1, false);
    assert!(!probe(&ff, &silent).await.unwrap().has_audio);
    let cached = cache.ensure(&silent, &cancel).await.unwrap();
    let info = probe(&ff, &cached).await.unwrap();
    assert!(info.has_audio, "silence added");
    assert_eq!((info.width, info.height), (320, 240));
}

async fn collect(rx: &mut mpsc::Receiver<Chunk>, n: usize, within: Duration) -> Vec<Chunk> {
    let mut v = Vec::new();
    let end = tokio::time::Instant::now() + within;
    while v.len() < n {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(c)) => v.push(c),
            _ => break,
        }
    }
    v
}

#[tokio::test]
async fn live_lavfi_source_streams_keyframes_and_retries_bad_input() {
    let ff = Ffmpeg::discover().unwrap();
    let settings = EncodeSettings::new("libx264", 1.0);
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(1024);
    let task = LiveSource::start(
        "test".into(),
        "lavfi:testsrc2=size=160x120:rate=25|sine=frequency=440".into(),
        ff.clone(),
        settings.clone(),
        tx,
        cancel.clone(),
    );
    let got = collect(&mut rx, 200, Duration::from_secs(15)).await;
    assert!(got.len() >= 100, "{} datagrams", got.len());
    assert!(got.iter().any(|c| c.keyframe));
    assert!(got[0].keyframe, "the stream starts at a keyframe");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();

    // A bad input: ffmpeg exits, the task keeps retrying until cancelled.
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(16);
    let task = LiveSource::start(
        "cam".into(),
        "/dev/no-such-camera".into(),
        ff,
        settings,
        tx,
        cancel.clone(),
    );
    assert!(collect(&mut rx, 1, Duration::from_millis(1500))
        .await
        .is_empty());
    assert!(!task.is_finished());
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_announces_ready_channels_and_plays_only_watched_ones() {
    let dir = tempfile::tempdir().unwrap();
    let videos = dir.path().join("videos");
    std::fs::create_dir_all(videos.join("sports")).unwrap();
    ffmpeg_gen(&videos.join("sports/match.mp4"), 1, true);
    std::fs::write(videos.join("readme.txt"), "hello").unwrap();
    let cancel = CancellationToken::new();
    let cfg = ManagerConfig {
        videos: Some(videos.clone()),
        cache_dir: None,
        sources: vec![("live".into(), "lavfi:testsrc2=size=160x120:rate=25".into())],
        keyint_secs: 1.0,
    };
    let (mgr, mut rx) = ChannelManager::start(cfg, cancel.clone()).await.unwrap();
    // The live source is announced at once, the file once transcoded; the text file never.
    assert_eq!(mgr.channels().len(), 1);
    let mut changes = mgr.changes();
    let end = Instant::now() + Duration::from_secs(60);
    while mgr.channels().len() < 2 {
        assert!(Instant::now() < end, "file channel not announced");
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
    let names: Vec<String> = mgr.channels().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["live", "sports/match"]);
    assert!(videos.join(".pessi-cache").is_dir());
    // Nothing plays until watched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err());
    let id = ChannelId::of_name("sports/match");
    assert!(!mgr.is_running(id));
    mgr.set_watched(id, true);
    let c = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.channel, id);
    assert!(c.keyframe);
    assert!(mgr.is_running(id));
    mgr.set_watched(id, false);
    assert!(!mgr.is_running(id));
    tokio::time::sleep(Duration::from_millis(200)).await;
    while rx.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "stopped channel still sends");
    // Removing the file removes the channel (and its cache entry).
    std::fs::remove_file(videos.join("sports/match.mp4")).unwrap();
    let end = Instant::now() + Duration::from_secs(3);
    while mgr.channels().len() != 1 {
        assert!(Instant::now() < end, "removal not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<PathBuf> = std::fs::read_dir(videos.join(".pessi-cache"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_file_is_announced_before_its_transcode_and_playable_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let videos = dir.path().join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    // Long enough that its transcode takes seconds: 40 s.
    ffmpeg_gen(&videos.join("movie.mp4"), 40, true);
    let cancel = CancellationToken::new();
    let cfg = ManagerConfig {
        videos: Some(videos.clone()),
        cache_dir: None,
        sources: vec![],
        keyint_secs: 1.0,
    };
    let (mgr, mut rx) = ChannelManager::start(cfg, cancel.clone()).await.unwrap();
    let mut changes = mgr.changes();
    let end = Instant::now() + Duration::from_secs(30);
    while mgr.channels().is_empty() {
        assert!(Instant::now() < end, "file channel not announced");
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
    let cached = |v: &Path| {
        std::fs::read_dir(v.join(".pessi-cache"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "ts"))
            })
            .unwrap_or(false)
    };
    assert!(
        !cached(&videos),
        "announced only after the transcode: the early announcement did not happen"
    );
    // Watched before the cache is ready: it plays (encoded live from the file) at once.
    let id = ChannelId::of_name("movie");
    mgr.set_watched(id, true);
    let c = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no datagram from the live fallback")
        .unwrap();
    assert_eq!(c.channel, id);
    // Once the cache is ready the channel keeps playing, from the cache: the hand-over happens
    // at a keyframe, so what a viewer receives decodes cleanly across it.
    let mut stream: Vec<u8> = c.payload.to_vec();
    let end = Instant::now() + Duration::from_secs(120);
    while !cached(&videos) {
        assert!(Instant::now() < end, "transcode never finished");
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            stream.extend_from_slice(&c.payload);
        }
    }
    let after = Instant::now() + Duration::from_secs(3);
    while Instant::now() < after {
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            stream.extend_from_slice(&c.payload);
        }
    }
    assert!(mgr.is_running(id));
    cancel.cancel();
    // Decode from the first to the last keyframe (the end is cut mid-frame by the test).
    let keyframes: Vec<usize> = stream
        .chunks(188)
        .enumerate()
        .filter(|(_, p)| common::ts::TsPacket::parse(p).is_ok_and(|p| p.random_access_indicator()))
        .map(|(i, _)| i * 188)
        .collect();
    assert!(keyframes.len() >= 3, "{} keyframes", keyframes.len());
    let out = dir.path().join("across.ts");
    std::fs::write(&out, &stream[keyframes[0]..*keyframes.last().unwrap()]).unwrap();
    let o = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&out)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&o.stderr);
    assert!(
        errors.trim().is_empty(),
        "decode errors across the hand-over:\n{errors}"
    );
}

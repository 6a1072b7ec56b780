//! End to end, on loopback, with the real binaries and real FFmpeg output: what a user sees.

mod support;

use lab::Media;
use std::time::Duration;
use support::*;

const SEC: Duration = Duration::from_secs(1);

fn videos_with(dir: &std::path::Path, clips: &[(&str, u32)]) -> std::path::PathBuf {
    let videos = dir.join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    for (name, secs) in clips {
        make_clip(&videos.join(name), *secs, "testsrc2");
    }
    videos
}

fn packets(s: &lab::stats::Summary, stream: &str) -> u64 {
    s.streams.get(stream).map_or(0, |x| x.packets)
}

/// A stream recorded through three relays decodes without errors from its first keyframe on.
#[test]
fn a_stream_through_three_relays_decodes_cleanly() {
    let scratch = tempfile::tempdir().unwrap();
    let videos = videos_with(scratch.path(), &[("clip.mp4", 4)]);
    let mut o = Overlay::start(
        r#"
"127.0.71.1" = ["127.0.71.2"]
"127.0.71.2" = ["127.0.71.1", "127.0.71.3"]
"127.0.71.3" = ["127.0.71.2", "127.0.71.4"]
"127.0.71.4" = ["127.0.71.3"]
"#,
        &["127.0.71.1"],
        Media {
            videos: Some(videos),
            sources: vec![],
        },
    );
    let rec = o.path("rec.ts");
    let stats = o.client(
        "client",
        &["127.0.71.4"],
        &["--stream", "clip", "--record", rec.to_str().unwrap()],
    );
    // 6 s of a ~25 fps clip looping: plenty of datagrams and several keyframes.
    let s = o.wait_stats(&stats, 60 * SEC, "6 s of clip received", |s| {
        s.streams
            .get("clip")
            .and_then(|x| {
                x.first_packet_ms
                    .zip(s.streams.get("clip").map(|x| x.packets))
            })
            .is_some_and(|(_, n)| n >= 300)
    });
    let clip = &s.streams["clip"];
    eprintln!("through 3 relays: {s}");
    assert_eq!(clip.pop.as_deref(), Some("127.0.71.4:8010"));
    o.stop();
    let (errors, bytes) = decode_errors_between_keyframes(&rec);
    assert!(bytes > 100_000, "recording too short: {bytes} bytes");
    assert!(errors.trim().is_empty(), "ffmpeg decode errors:\n{errors}");
}

/// Killing the PoP in use: the client re-requests the stream from the other PoP and keeps
/// receiving.
#[test]
fn killing_the_pop_in_use_moves_the_client_to_the_other_pop() {
    let mut o = Overlay::start(
        r#"
"127.0.72.1" = ["127.0.72.2", "127.0.72.3"]
"127.0.72.2" = ["127.0.72.1"]
"127.0.72.3" = ["127.0.72.1"]
"#,
        &["127.0.72.1"],
        Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
    );
    let stats = o.client(
        "client",
        &["127.0.72.2", "127.0.72.3"],
        &["--stream", "live"],
    );
    let s = o.wait_stats(&stats, 60 * SEC, "live stream flowing", |s| {
        packets(s, "live") > 50
    });
    let pop = s.streams["live"].pop.clone().expect("a PoP in use");
    let host = pop.split(':').next().unwrap().to_owned();
    o.kill(&lab::process_name("node", ip(&host)));
    let before = packets(&s, "live");
    let s = o.wait_stats(&stats, 30 * SEC, "source_changed and packets again", |s| {
        let st = &s.streams["live"];
        !st.source_changes.is_empty() && st.packets > before + 50
    });
    let change = &s.streams["live"].source_changes[0];
    assert_eq!(change.1, pop);
    assert_ne!(change.2, pop);
    eprintln!("PoP failover: {s}");
    o.stop();
}

/// Killing the relay in use (not the PoP): the PoP reroutes through the other relay.
#[test]
fn killing_the_relay_in_use_reroutes_the_tree() {
    let mut o = Overlay::start(
        r#"
"127.0.73.1" = ["127.0.73.2", "127.0.73.3"]
"127.0.73.2" = ["127.0.73.1", "127.0.73.4"]
"127.0.73.3" = ["127.0.73.1", "127.0.73.4"]
"127.0.73.4" = ["127.0.73.2", "127.0.73.3"]
"#,
        &["127.0.73.1"],
        Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
    );
    let stats = o.client("client", &["127.0.73.4"], &["--stream", "live"]);
    let s = o.wait_stats(&stats, 60 * SEC, "live stream flowing", |s| {
        packets(s, "live") > 50
    });
    // Which relay feeds the PoP? The one with a subscriber for the channel.
    let line = o.wait_log("node-127.0.73.4", &[UPSTREAM_LINE], 10 * SEC);
    let relay = if line.contains("127.0.73.2") {
        "127.0.73.2"
    } else {
        "127.0.73.3"
    };
    o.kill(&lab::process_name("node", ip(relay)));
    let before = packets(&s, "live");
    let s = o.wait_stats(
        &stats,
        30 * SEC,
        "packets again after the relay died",
        |s| packets(s, "live") > before + 100,
    );
    eprintln!("relay {relay} killed; {s}");
    o.stop();
}

/// The upstream `node` uses now: the one named by its latest subscription (after waiting for
/// at least one).
fn upstream_in_use(o: &Overlay, node: &str) -> String {
    o.wait_log(node, &[UPSTREAM_LINE], 10 * SEC);
    latest_upstream(&o.log(node)).expect("upstream field")
}

/// Files added at runtime appear in the client's list; removed ones disappear.
#[test]
fn files_added_and_removed_at_runtime_come_and_go() {
    let scratch = tempfile::tempdir().unwrap();
    let videos = videos_with(scratch.path(), &[("first.mp4", 2)]);
    make_clip(&scratch.path().join("second.mp4"), 2, "smptebars");
    let mut o = Overlay::start(
        r#"
"127.0.74.1" = ["127.0.74.2"]
"127.0.74.2" = ["127.0.74.1"]
"#,
        &["127.0.74.1"],
        Media {
            videos: Some(videos.clone()),
            sources: vec![],
        },
    );
    let stats = o.client("client", &["127.0.74.2"], &[]);
    o.wait_stats(&stats, 60 * SEC, "first listed", |s| {
        s.channels == ["first"]
    });
    let t0 = std::time::Instant::now();
    std::fs::rename(scratch.path().join("second.mp4"), videos.join("second.mp4")).unwrap();
    o.wait_stats(&stats, 30 * SEC, "second listed", |s| {
        s.channels.contains(&"second".to_owned())
    });
    eprintln!("added file listed after {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    std::fs::remove_file(videos.join("first.mp4")).unwrap();
    o.wait_stats(&stats, 30 * SEC, "first gone", |s| s.channels == ["second"]);
    eprintln!("removed file unlisted after {:?}", t0.elapsed());
    o.stop();
}

/// A corrupt file and a non-video file are reported by name; the good one streams.
#[test]
fn a_corrupt_file_is_reported_and_others_stream() {
    let scratch = tempfile::tempdir().unwrap();
    let videos = videos_with(scratch.path(), &[("good.mp4", 2)]);
    let mut junk = vec![0u8; 200_000];
    let mut r = common::rng::Rng::seeded(5);
    junk.iter_mut().for_each(|b| *b = r.next_u64() as u8);
    std::fs::write(videos.join("broken.mp4"), &junk).unwrap();
    std::fs::write(videos.join("notes.txt"), "not a video").unwrap();
    let mut o = Overlay::start(
        r#"
"127.0.75.1" = ["127.0.75.2"]
"127.0.75.2" = ["127.0.75.1"]
"#,
        &["127.0.75.1"],
        Media {
            videos: Some(videos),
            sources: vec![],
        },
    );
    let stats = o.client("client", &["127.0.75.2"], &["--stream", "good"]);
    o.wait_stats(&stats, 60 * SEC, "good streaming", |s| {
        packets(s, "good") > 50
    });
    o.wait_log("server-127.0.75.1", &["broken.mp4"], 10 * SEC);
    let s = lab::stats::Summary::load(&stats);
    assert_eq!(s.channels, ["good"], "only the good file is a channel");
    o.stop();
}

/// Two servers with the same video: the PoP takes it from the nearer one.
#[test]
fn two_servers_with_the_same_video_the_nearer_one_serves() {
    let scratch = tempfile::tempdir().unwrap();
    let videos = videos_with(scratch.path(), &[("same.mp4", 2)]);
    let mut o = Overlay::start(
        r#"
"127.0.76.1" = ["127.0.76.2"]
"127.0.76.2" = ["127.0.76.1", "127.0.76.3"]
"127.0.76.3" = ["127.0.76.2", "127.0.76.4"]
"127.0.76.4" = ["127.0.76.3", "127.0.76.5"]
"127.0.76.5" = ["127.0.76.4"]
"#,
        &["127.0.76.1", "127.0.76.5"],
        Media {
            videos: Some(videos),
            sources: vec![],
        },
    );
    // 127.0.76.4 is one hop from server .5 and three from server .1.
    let stats = o.client("client", &["127.0.76.4"], &["--stream", "same"]);
    o.wait_stats(&stats, 60 * SEC, "same streaming", |s| {
        packets(s, "same") > 50
    });
    // The nearer replica may be announced after the PoP subscribed: give it a flood round.
    let t0 = std::time::Instant::now();
    while upstream_in_use(&o, "node-127.0.76.4") != "127.0.76.5" && t0.elapsed() < 10 * SEC {
        std::thread::sleep(SEC / 5);
    }
    assert_eq!(
        upstream_in_use(&o, "node-127.0.76.4"),
        "127.0.76.5",
        "not from the nearer server; logs:{}",
        o.all_logs()
    );
    o.stop();
}

/// The seed report's catastrophic death: the only way around the dead relay is through its
/// own parent, which is not a topology neighbour.
#[test]
fn catastrophic_death_recovers_through_the_dead_relays_parent() {
    let mut o = Overlay::start(
        r#"
"127.0.77.1" = ["127.0.77.2"]
"127.0.77.2" = ["127.0.77.1", "127.0.77.3"]
"127.0.77.3" = ["127.0.77.2", "127.0.77.4"]
"127.0.77.4" = ["127.0.77.3", "127.0.77.5"]
"127.0.77.5" = ["127.0.77.4"]
"#,
        &["127.0.77.1"],
        Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
    );
    let stats = o.client("client", &["127.0.77.5"], &["--stream", "live"]);
    let s = o.wait_stats(&stats, 60 * SEC, "live stream flowing", |s| {
        packets(s, "live") > 50
    });
    o.kill(&lab::process_name("node", ip("127.0.77.3")));
    let before = packets(&s, "live");
    o.wait_log("node-127.0.77.4", &["catastrophic fallback"], 30 * SEC);
    let s = o.wait_stats(&stats, 30 * SEC, "packets again after the fallback", |s| {
        packets(s, "live") > before + 100
    });
    eprintln!("catastrophic recovery: {s}");
    o.stop();
}

/// A relay that comes back is used again: kill the relay in use (the tree moves to the other),
/// restart it, then kill the other one: the stream comes back through the restarted relay.
#[test]
fn a_relay_that_comes_back_is_used_again() {
    let mut o = Overlay::start(
        r#"
"127.0.78.1" = ["127.0.78.2", "127.0.78.3"]
"127.0.78.2" = ["127.0.78.1", "127.0.78.4"]
"127.0.78.3" = ["127.0.78.1", "127.0.78.4"]
"127.0.78.4" = ["127.0.78.2", "127.0.78.3"]
"#,
        &["127.0.78.1"],
        Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
    );
    let pop = "node-127.0.78.4";
    let stats = o.client("client", &["127.0.78.4"], &["--stream", "live"]);
    let s = o.wait_stats(&stats, 60 * SEC, "live stream flowing", |s| {
        packets(s, "live") > 50
    });
    let first = upstream_in_use(&o, pop);
    let second = if first == "127.0.78.2" {
        "127.0.78.3"
    } else {
        "127.0.78.2"
    };
    let first = first.as_str();
    o.kill(&lab::process_name("node", ip(first)));
    let before = packets(&s, "live");
    o.wait_stats(&stats, 30 * SEC, "stream back via the second relay", |s| {
        packets(s, "live") > before + 100
    });
    // The PoP declares the first relay dead; it comes back and the PoP sees it again.
    o.wait_log(pop, &["neighbour down", first], 30 * SEC);
    let seen = o.log_lines(pop);
    o.restart(&lab::process_name("node", ip(first)));
    o.wait_log_after(pop, seen, &["neighbour up", first], 30 * SEC);
    // Give its floods a round or two to restore its routes, then kill the second relay (the
    // PoP may already have moved back to the first one when its route became clearly better).
    std::thread::sleep(3 * SEC);
    o.kill(&lab::process_name("node", ip(second)));
    o.wait_log(pop, &["neighbour down", second], 30 * SEC);
    let before = packets(&lab::stats::Summary::load(&stats), "live");
    o.wait_stats(
        &stats,
        30 * SEC,
        "stream back via the restarted relay",
        |s| packets(s, "live") > before + 300,
    );
    assert_eq!(
        upstream_in_use(&o, pop),
        first,
        "not back through the restarted relay; PoP log:\n{}",
        o.log(pop)
    );
    o.stop();
}

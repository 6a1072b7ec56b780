//! The fuzz targets' inputs on stable: every file of `fuzz/corpus/<target>/`, and seeded
//! mutations of them (bit flips, truncation, splicing, insertion), go through exactly the
//! drivers the cargo-fuzz targets run (`fuzz/targets.rs`, shared by `include!`); nothing may
//! panic. Longer, coverage-guided runs: `scripts/fuzz.sh` (nightly).
//!
//! `WRITE_FUZZ_CORPUS=1 cargo test -p common --test fuzz_corpus` regenerates the seed files
//! from real encodings: datagrams, bootstrap frames, handshake and data packets of two
//! `Secure` hosts, the shipped topologies, and TS packets (ffmpeg's, when it is installed).

include!("../../fuzz/targets.rs");

use common::keys::{KeyPair, Secret};
use common::rng::Rng;
use common::secure::{Secure, SecureConfig};
use common::wire::{
    encode_with_limit, Body, BootstrapRequest, BootstrapResponse, ChannelId, ChannelInfo, Datagram,
    Flood, Header, Member, Message, PathHop, VideoPacket, MAX_FRAME_LEN,
};
use common::NodeId;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

/// Seeded mutations per target.
const MUTATIONS: usize = 20_000;
/// Largest seed file, and largest corpus.
const MAX_FILE: usize = 4096;
const MAX_CORPUS: usize = 200 * 1024;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// `fuzz/corpus`, (re)written first if `WRITE_FUZZ_CORPUS` is set (once, before any test reads).
fn corpus() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fuzz_dir().join("corpus");
        if std::env::var_os("WRITE_FUZZ_CORPUS").is_some() {
            for (target, name, bytes) in seeds() {
                assert!(
                    bytes.len() < MAX_FILE,
                    "{target}/{name}: {} bytes",
                    bytes.len()
                );
                std::fs::create_dir_all(dir.join(target)).unwrap();
                std::fs::write(dir.join(target).join(name), bytes).unwrap();
            }
        }
        dir
    })
    .clone()
}

/// The files of one directory, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

fn hop(n: u8) -> PathHop {
    PathHop {
        id: NodeId(u64::from(n)),
        addr: SocketAddr::from(([127, 0, 0, n], 8010)),
    }
}

/// The seed files: (target, file name, content).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let news = ChannelInfo {
        id: ChannelId::of_name("news"),
        name: "news".into(),
    };
    let dgrams = [
        ("ping", Body::Unreliable(Message::Ping { nonce: 7 })),
        (
            "video",
            Body::Video(VideoPacket {
                channel: news.id,
                seq: 42,
                flags: common::wire::video_flags::KEYFRAME,
                payload: vec![0x47; 188].into(),
            }),
        ),
        (
            "flood",
            Body::Unreliable(Message::Flood(Flood {
                origin: NodeId(1),
                seq: 9,
                cost_us: 1200,
                load: 2,
                path: vec![hop(1), hop(2)],
                channels: vec![news.clone()],
            })),
        ),
        (
            "ack",
            Body::Ack {
                session: 5,
                ids: vec![1, 2, 300],
            },
        ),
        (
            "subscribe",
            Body::Reliable {
                session: 5,
                id: 0,
                msg: Message::Subscribe { channel: news.id },
            },
        ),
        (
            "channels",
            Body::Reliable {
                session: 5,
                id: 1,
                msg: Message::Channels {
                    page: 0,
                    pages: 1,
                    channels: vec![news.clone()],
                },
            },
        ),
        (
            "nack",
            Body::Unreliable(Message::Nack {
                channel: news.id,
                seqs: vec![4, 5, 9],
            }),
        ),
    ];
    for (name, body) in dgrams {
        let b = Datagram::new(NodeId(9), body).encode().unwrap().to_vec();
        out.push(("wire_datagram", name.to_string(), b.clone()));
        out.push(("wire_header", name.to_string(), b));
    }

    let h = Header::new(NodeId(0));
    let answer = BootstrapResponse::Neighbours {
        id: NodeId(2),
        addr: hop(2).addr,
        neighbours: vec![hop(1), hop(3)],
        members: vec![Member {
            id: NodeId(1),
            key: KeyPair::from_private(Secret([1; 32])).public,
        }],
    };
    let refused = BootstrapResponse::Refused {
        reason: "127.0.0.9 is not in the topology".into(),
    };
    let watch = BootstrapRequest::Watch {
        known: answer.digest(),
    };
    let frames = [
        (
            "request",
            encode_with_limit(&h, &BootstrapRequest::Neighbours, MAX_FRAME_LEN),
        ),
        ("watch", encode_with_limit(&h, &watch, MAX_FRAME_LEN)),
        ("answer", encode_with_limit(&h, &answer, MAX_FRAME_LEN)),
        ("refused", encode_with_limit(&h, &refused, MAX_FRAME_LEN)),
    ];
    for (name, b) in frames {
        out.push(("bootstrap_frames", name.to_string(), b.unwrap().to_vec()));
    }

    // Real handshakes with the target's member (`targets::member`): from the member it knows
    // (id 2, key [8; 32]) and from a viewer; the answers, and the first data packet.
    let t = Instant::now();
    let at = targets::addr();
    let mut peer = Secure::new(SecureConfig::member(
        KeyPair::from_private(Secret([8; 32])),
        Secret([9; 32]),
        5,
        3,
    ));
    peer.set_member(NodeId(1), KeyPair::from_private(Secret([7; 32])).public);
    let ping = Datagram::new(NodeId(2), Body::Unreliable(Message::Ping { nonce: 1 }))
        .encode()
        .unwrap();
    peer.send(t, NodeId(1), at, ping.clone());
    let init = peer.poll_transmit().unwrap().1;
    let mut m = targets::member();
    m.handle_datagram(t, at, &init[..]);
    let resp = m.poll_transmit().unwrap().1;
    peer.handle_datagram(t, at, &resp[..]);
    let data = peer.poll_transmit().unwrap().1;
    let mut v = Secure::new(SecureConfig::viewer(None, 4));
    v.add_pop(at, None);
    v.send(t, NodeId(0), at, ping.clone());
    let vinit = v.poll_transmit().unwrap().1;
    m.handle_datagram(t, at, &vinit[..]);
    let vresp = m.poll_transmit().unwrap().1;
    // Under load (its handshake budget drained): a cookie reply, and the initiation with it.
    let last = |m: &mut Secure| {
        let mut l = None;
        while let Some((_, b)) = m.poll_transmit() {
            l = Some(b);
        }
        l.unwrap()
    };
    for i in 0..100 {
        let mut w = Secure::new(SecureConfig::viewer(None, 10 + i));
        w.add_pop(at, None);
        w.send(t, NodeId(0), at, ping.clone());
        m.handle_datagram(t, at, &w.poll_transmit().unwrap().1[..]);
    }
    let mut w = Secure::new(SecureConfig::viewer(None, 5));
    w.add_pop(at, None);
    w.send(t, NodeId(0), at, ping);
    m.handle_datagram(t, at, &w.poll_transmit().unwrap().1[..]);
    let cookie = last(&mut m);
    assert_eq!(cookie[3], 6, "a cookie reply");
    w.handle_datagram(t, at, &cookie[..]);
    let cookied = w.poll_transmit().unwrap().1;
    for (name, b) in [
        ("member-init", init),
        ("member-response", resp),
        ("data", data),
        ("viewer-init", vinit),
        ("viewer-response", vresp),
        ("cookie-reply", cookie),
        ("viewer-init-with-cookie", cookied),
    ] {
        out.push(("secure_packets", name.to_string(), b.to_vec()));
    }

    let topologies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../topologies");
    for (name, text) in files(&topologies) {
        if let Some(stem) = name.strip_suffix(".toml") {
            out.push(("topology_toml", stem.to_string(), text));
        }
    }
    out.push((
        "topology_toml",
        "keys".into(),
        format!(
            "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\"127.0.0.1\"]\n\
             \"::1\" = []\n\n[keys]\n\"127.0.0.1\" = \"{}\"\n",
            KeyPair::from_private(Secret([1; 32])).public
        )
        .into_bytes(),
    ));

    // Synthetic TS: a PSI-less video packet with a random-access adaptation field, then
    // continuity-counted filler; and the same out of sync.
    let mut ts = Vec::new();
    for i in 0..7u8 {
        let mut p = vec![0xffu8; 188];
        p[..4].copy_from_slice(&[0x47, if i == 0 { 0x41 } else { 0x01 }, 0x00, 0x10 | i]);
        if i == 0 {
            p[3] |= 0x20;
            p[4..6].copy_from_slice(&[7, 0x40]);
            p[12..21].copy_from_slice(&[0, 0, 1, 0xe0, 0, 0, 0x80, 0, 0]);
            p[21..26].copy_from_slice(&[0, 0, 1, 0x65, 0x88]);
        }
        ts.extend_from_slice(&p);
    }
    out.push(("ts_splitter", "synthetic".into(), ts.clone()));
    let mut shifted = vec![0x47, 0, 0, 0, 0];
    shifted.extend_from_slice(&ts[..400]);
    out.push(("ts_splitter", "out-of-sync".into(), shifted));
    // ffmpeg's: SDT, PAT, PMT, a keyframe PES and more; the next packets; one datagram's worth.
    if let Some(ts) = ffmpeg_ts() {
        out.push(("ts_splitter", "ffmpeg-head".into(), ts[..17 * 188].to_vec()));
        let tail = &ts[17 * 188..];
        out.push((
            "ts_splitter",
            "ffmpeg-tail".into(),
            tail[..tail.len().min(20 * 188)].to_vec(),
        ));
        out.push((
            "ts_splitter",
            "ffmpeg-datagram".into(),
            ts[188..8 * 188].to_vec(),
        ));
    }
    out
}

/// One second of a tiny H.264 test picture in MPEG-TS, if ffmpeg is installed.
fn ffmpeg_ts() -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.ts");
    let ok = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi"])
        .args([
            "-i",
            "testsrc=size=64x64:rate=5",
            "-t",
            "1",
            "-c:v",
            "libx264",
        ])
        .args(["-f", "mpegts"])
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    let ts = std::fs::read(&path).ok().filter(|_| ok)?;
    (ts.len() >= 20 * 188).then_some(ts)
}

#[test]
fn every_target_has_a_fuzz_target_and_a_small_seed_corpus() {
    let corpus = corpus();
    let mut names: Vec<&str> = targets::ALL.iter().map(|t| t.0).collect();
    names.sort();
    let on_disk = |dir: PathBuf, ext: &str| -> Vec<String> {
        let mut v: Vec<String> = files(&dir)
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix(ext).map(str::to_owned))
            .collect();
        v.sort();
        v
    };
    assert_eq!(on_disk(fuzz_dir().join("fuzz_targets"), ".rs"), names);
    let mut dirs: Vec<String> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, names, "fuzz/corpus/ has one directory per target");
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let mut total = 0;
    for name in names {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} not in fuzz/Cargo.toml"
        );
        let seeds = files(&corpus.join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
        for (file, bytes) in seeds {
            assert!(
                bytes.len() < MAX_FILE,
                "{name}/{file}: {} bytes",
                bytes.len()
            );
            total += bytes.len();
        }
    }
    assert!(total < MAX_CORPUS, "corpus of {total} bytes");
}

#[test]
fn every_corpus_file_goes_through_its_target() {
    for (name, run) in targets::ALL {
        for (file, bytes) in files(&corpus().join(name)) {
            eprintln!("{name}/{file}");
            run(&bytes);
        }
    }
}

/// One mutation of `x` (AFL-style havoc, a little of it), using `pool` for splicing.
fn mutate(rng: &mut Rng, x: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..=rng.below(3) {
        let len = x.len() as u64;
        match rng.below(6) {
            0 if len > 0 => {
                for _ in 0..=rng.below(4) {
                    let i = rng.below(len * 8) as usize;
                    x[i / 8] ^= 1 << (i % 8);
                }
            }
            1 if len > 0 => {
                const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xff];
                let i = rng.below(len) as usize;
                x[i] = INTERESTING[rng.below(8) as usize];
            }
            2 => x.truncate(rng.below(len + 1) as usize),
            3 => {
                let other = &pool[rng.below(pool.len() as u64) as usize];
                let cut = rng.below(len + 1) as usize;
                let from = rng.below(other.len() as u64 + 1) as usize;
                x.truncate(cut);
                x.extend_from_slice(&other[from..]);
            }
            4 => {
                let at = rng.below(len + 1) as usize;
                let junk: Vec<u8> = (0..=rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                x.splice(at..at, junk);
            }
            _ if len > 1 => {
                let a = rng.below(len) as usize;
                let b = a + rng.below(len - a as u64) as usize;
                x.drain(a..=b.min(a + 16));
            }
            _ => x.push(rng.next_u64() as u8),
        }
    }
}

#[test]
fn seeded_mutations_of_the_corpus_go_through_every_target() {
    let t0 = Instant::now();
    let mut rng = Rng::seeded(0x5eed_f022);
    let mut report = Vec::new();
    for (name, run) in targets::ALL {
        let t = Instant::now();
        let seeds: Vec<Vec<u8>> = files(&corpus().join(name))
            .into_iter()
            .map(|f| f.1)
            .collect();
        for _ in 0..MUTATIONS {
            let mut x = seeds[rng.below(seeds.len() as u64) as usize].clone();
            mutate(&mut rng, &mut x, &seeds);
            let input = x.clone();
            if std::panic::catch_unwind(|| run(&x)).is_err() {
                panic!("{name} panicked on input {}", common::keys::hex(&input));
            }
        }
        report.push(format!("{name} {:?}", t.elapsed()));
    }
    eprintln!(
        "{MUTATIONS} mutations per target in {:?}: {}",
        t0.elapsed(),
        report.join(", ")
    );
}

//! The fuzz targets' inputs, on stable: every file of `fuzz/corpus/<target>/` and 20 000 seeded
//! mutations of them go through exactly the decoders the cargo-fuzz targets drive
//! (`fuzz/targets.rs`); nothing may panic. `WRITE_FUZZ_CORPUS=1` regenerates the seed files
//! from real encodings (datagrams, bootstrap frames, handshakes, topologies, TS packets).

include!("../../fuzz/targets.rs");

use common::keys::{KeyPair, Secret};
use common::secure::{Secure, SecureConfig};
use common::wire::{
    encode_with_limit, Body, BootstrapRequest, BootstrapResponse, ChannelId, ChannelInfo, Datagram,
    Flood, Header, Member, Message, PathHop, VideoPacket, MAX_FRAME_LEN,
};
use common::NodeId;
use std::path::PathBuf;
use std::time::Instant;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

fn hop(n: u8) -> PathHop {
    PathHop {
        id: NodeId(n as u64),
        addr: std::net::SocketAddr::from(([127, 0, 0, n], 8010)),
    }
}

/// The seed files: (target, name, content).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let dgrams = [
        ("ping", Body::Unreliable(Message::Ping { nonce: 7 })),
        (
            "video",
            Body::Video(VideoPacket {
                channel: ChannelId(3),
                seq: 42,
                flags: 1,
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
                channels: vec![ChannelInfo {
                    id: ChannelId(3),
                    name: "news".into(),
                }],
            })),
        ),
        (
            "ack",
            Body::Ack {
                session: 5,
                ids: vec![1, 2, 3],
            },
        ),
        (
            "subscribe",
            Body::Reliable {
                session: 5,
                id: 0,
                msg: Message::Subscribe {
                    channel: ChannelId(3),
                },
            },
        ),
        (
            "nack",
            Body::Unreliable(Message::Nack {
                channel: ChannelId(3),
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
    for (name, b) in [
        (
            "request",
            encode_with_limit(&h, &BootstrapRequest::Neighbours, MAX_FRAME_LEN).unwrap(),
        ),
        (
            "watch",
            encode_with_limit(&h, &BootstrapRequest::Watch { known: 77 }, MAX_FRAME_LEN).unwrap(),
        ),
        (
            "answer",
            encode_with_limit(
                &h,
                &BootstrapResponse::Neighbours {
                    id: NodeId(2),
                    addr: hop(2).addr,
                    neighbours: vec![hop(1), hop(3)],
                    members: vec![Member {
                        id: NodeId(1),
                        key: KeyPair::from_private(Secret([1; 32])).public,
                    }],
                },
                MAX_FRAME_LEN,
            )
            .unwrap(),
        ),
        (
            "refused",
            encode_with_limit(
                &h,
                &BootstrapResponse::Refused {
                    reason: "no".into(),
                },
                MAX_FRAME_LEN,
            )
            .unwrap(),
        ),
    ] {
        out.push(("bootstrap_frames", name.to_string(), b.to_vec()));
    }
    // Real handshake packets towards the target's member, and data after them.
    let t = Instant::now();
    let at = std::net::SocketAddr::from(([127, 0, 0, 2], 8010));
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
    out.push(("secure_packets", "member-init".into(), init.to_vec()));
    let mut m = targets::member();
    m.handle_datagram(t, at, &init);
    let resp = m.poll_transmit().unwrap().1;
    out.push(("secure_packets", "member-response".into(), resp.to_vec()));
    peer.handle_datagram(t, at, &resp);
    let data = peer.poll_transmit().unwrap().1;
    out.push(("secure_packets", "data".into(), data.to_vec()));
    let mut v = Secure::new(SecureConfig::viewer(None, 4));
    v.add_pop(at, None);
    v.send(t, NodeId(0), at, ping);
    let vinit = v.poll_transmit().unwrap().1;
    out.push(("secure_packets", "viewer-init".into(), vinit.to_vec()));
    m.handle_datagram(t, at, &vinit);
    let vresp = m.poll_transmit().unwrap().1;
    out.push(("secure_packets", "viewer-response".into(), vresp.to_vec()));
    for f in ["neighbours", "grid4x5", "catastrophic"] {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../topologies/{f}.toml"));
        out.push(("topology_toml", f.to_string(), std::fs::read(p).unwrap()));
    }
    out.push((
        "topology_toml",
        "keys".into(),
        format!(
            "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\"127.0.0.1\"]\n[keys]\n\"127.0.0.1\" = \"{}\"\n",
            KeyPair::from_private(Secret([1; 32])).public
        )
        .into_bytes(),
    ));
    // Seven TS packets: PAT-like, a video packet with a random-access adaptation field, filler.
    let mut ts = Vec::new();
    for i in 0..7u8 {
        let mut p = vec![0xffu8; 188];
        p[0] = 0x47;
        p[1] = if i == 1 { 0x41 } else { 0x01 };
        p[2] = if i == 0 { 0x00 } else { 0x00 + i };
        p[3] = if i == 1 { 0x30 } else { 0x10 | (i & 0x0f) };
        if i == 1 {
            p[4] = 7;
            p[5] = 0x40;
        }
        ts.extend_from_slice(&p);
    }
    out.push(("ts_splitter", "seven-packets".into(), ts.clone()));
    let mut shifted = vec![0u8; 5];
    shifted.extend_from_slice(&ts[..400]);
    out.push(("ts_splitter", "out-of-sync".into(), shifted));
    out
}

#[test]
fn every_corpus_input_and_its_mutations_go_through_the_decoders() {
    if std::env::var_os("WRITE_FUZZ_CORPUS").is_some() {
        for (target, name, bytes) in seeds() {
            let dir = corpus().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let t0 = Instant::now();
    let mut files: Vec<(fn(&[u8]), Vec<Vec<u8>>)> = Vec::new();
    for (name, run) in targets::ALL {
        let dir = corpus().join(name);
        let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(!inputs.is_empty(), "{} has no seed", dir.display());
        for i in &inputs {
            run(i);
        }
        files.push((run, inputs));
    }
    let mut rng = common::rng::Rng::seeded(2026);
    for n in 0..20_000u64 {
        let (run, inputs) = &files[(n % files.len() as u64) as usize];
        let mut x = inputs[rng.below(inputs.len() as u64) as usize].clone();
        match rng.below(4) {
            0 if !x.is_empty() => {
                for _ in 0..=rng.below(4) {
                    let i = rng.below(x.len() as u64 * 8) as usize;
                    x[i / 8] ^= 1 << (i % 8);
                }
            }
            1 => x.truncate(rng.below(x.len() as u64 + 1) as usize),
            2 => {
                let other = &inputs[rng.below(inputs.len() as u64) as usize];
                let cut = rng.below(x.len() as u64 + 1) as usize;
                let from = rng.below(other.len() as u64 + 1) as usize;
                x.truncate(cut);
                x.extend_from_slice(&other[from..]);
            }
            _ => {
                let at = rng.below(x.len() as u64 + 1) as usize;
                let junk: Vec<u8> = (0..rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                x.splice(at..at, junk);
            }
        }
        run(&x);
    }
    eprintln!(
        "{} corpus files and 20 000 mutations in {:?}",
        files.iter().map(|f| f.1.len()).sum::<usize>(),
        t0.elapsed()
    );
}

//! What encryption adds per forwarded datagram: sealing a video datagram for one subscriber
//! and opening one received datagram, on real session keys (`common::secure`), compared with
//! the plaintext path's per-subscriber work (nothing: the same `Bytes` goes to every
//! subscriber), with encoding a datagram once, and with the AEADs alone (AES-256-GCM, which
//! the data path uses, and ChaCha20-Poly1305).
//!
//! `cargo bench -p common --bench seal` (plain timing, medians of 15 rounds of 20 000 each;
//! the figures go to report/RESULTS.md by hand).

use bytes::Bytes;
use common::keys::{KeyPair, Secret};
use common::secure::{Secure, SecureConfig};
use common::wire::{Body, ChannelId, Datagram, VideoPacket};
use common::NodeId;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const N: usize = 20_000;
const ROUNDS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / N as f64
}

/// Median time of sealing `N` buffers of `len` bytes in place with `alg`.
fn aead_alone(alg: &'static ring::aead::Algorithm, len: usize) -> Duration {
    let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, &[9u8; 32]).unwrap());
    let mut buf = vec![0x47u8; len];
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let s = Instant::now();
        for i in 0..N as u64 {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&i.to_le_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(n),
                    ring::aead::Aad::from([0u8; 16]),
                    &mut buf,
                )
                .unwrap();
            let _ = std::hint::black_box(tag);
        }
        times.push(s.elapsed());
    }
    median(times)
}

fn main() {
    let t0 = Instant::now();
    let net = Secret::random();
    let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
    let (ia, ib) = (NodeId(1), NodeId(2));
    let (aa, ab): (SocketAddr, SocketAddr) = (
        "127.0.0.1:8010".parse().unwrap(),
        "127.0.0.2:8010".parse().unwrap(),
    );
    let mut a = Secure::new(SecureConfig::member(ka.clone(), net.clone(), 1, 1));
    let mut b = Secure::new(SecureConfig::member(kb.clone(), net, 1, 2));
    a.set_member(ib, kb.public);
    b.set_member(ia, ka.public);
    let video = Datagram::new(
        ia,
        Body::Video(VideoPacket {
            channel: ChannelId(7),
            seq: 1,
            flags: 0,
            payload: Bytes::from(vec![0x47u8; 1316]),
        }),
    );
    let plain = video.encode().unwrap();
    // Handshake.
    a.send(t0, ib, ab, plain.clone());
    for _ in 0..4 {
        while let Some((_, d)) = a.poll_transmit() {
            b.handle_datagram(t0, aa, &d[..]);
        }
        while let Some((_, d)) = b.poll_transmit() {
            a.handle_datagram(t0, ab, &d[..]);
        }
    }
    // Sealing (what the relay does per subscriber).
    // (Each sealed datagram is dropped at once, as after its send.)
    let mut seal = Vec::new();
    for _ in 0..ROUNDS {
        let s = Instant::now();
        for _ in 0..N {
            a.send(t0, ib, ab, plain.clone());
            std::hint::black_box(a.poll_transmit().unwrap());
        }
        seal.push(s.elapsed());
    }
    let mut sealed = Vec::with_capacity(N);
    let mut sealed_len = 0;
    // Opening (what the relay does per received datagram).
    let mut open = Vec::new();
    for _ in 0..ROUNDS {
        // Fresh counters each round (the replay window would refuse a second pass).
        {
            sealed.clear();
            for _ in 0..N {
                a.send(t0, ib, ab, plain.clone());
                // In a buffer of its own, as a receive hands it over (opened in place).
                sealed.push(bytes::BytesMut::from(&a.poll_transmit().unwrap().1[..]));
                sealed_len = sealed[0].len();
            }
        }
        let s = Instant::now();
        for d in sealed.drain(..) {
            std::hint::black_box(b.handle_datagram(t0, aa, d).expect("opens"));
        }
        open.push(s.elapsed());
    }
    // Encoding a video datagram once (the plaintext path's per-datagram work, for scale).
    let mut enc = Vec::new();
    for _ in 0..ROUNDS {
        let s = Instant::now();
        for _ in 0..N {
            std::hint::black_box(video.encode().unwrap());
        }
        enc.push(s.elapsed());
    }
    // The AEADs alone, in place on the same length (the floor of `seal`).
    for (name, alg) in [
        ("ChaCha20-Poly1305", &ring::aead::CHACHA20_POLY1305),
        ("AES-256-GCM", &ring::aead::AES_256_GCM),
    ] {
        println!(
            "AEAD alone (ring {name}, in place): {:.2} µs",
            per(aead_alone(alg, plain.len()))
        );
    }
    let (s, o, e) = (per(median(seal)), per(median(open)), per(median(enc)));
    println!(
        "video datagram {} bytes ({} sealed)",
        plain.len(),
        sealed_len
    );
    println!("seal (per subscriber):        {s:.2} µs");
    println!("open (per received datagram): {o:.2} µs");
    println!("encode once (plaintext path): {e:.2} µs");
    println!(
        "added per forwarded datagram: {:.2} µs with one subscriber (open + seal), {s:.2} µs per \
         further subscriber (budget 1.5 µs)",
        s + o
    );
}

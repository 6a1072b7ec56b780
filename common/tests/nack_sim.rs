//! Deterministic simulation of per-hop NACK recovery (`common::nack`): server → hop1 → hop2 →
//! client, every link direction through its own seeded `Impairment` (NACKs go through the lossy
//! reverse links too), a datagram every 4 ms for 60 simulated seconds, event-driven fake time.
//!
//! Every hop has a `RetransmitBuffer` (server, hop1, hop2) and a `NackTracker` towards its
//! upstream (hop1, hop2, client). The client counts a datagram on time if it arrives within
//! 200 ms of its send time. Run with `--nocapture` to see the figures.

use bytes::Bytes;
use common::id::NodeId;
use common::impair::Impairment;
use common::nack::{NackConfig, NackTracker, RetransmitBuffer, RetransmitConfig};
use common::wire::{video_flags, Body, ChannelId, Datagram, Message, VideoPacket};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const MS: Duration = Duration::from_millis(1);
const HOPS: usize = 3;
const PACKETS: u64 = 15_000; // 60 s at 250 datagrams/s
const INTERVAL: Duration = Duration::from_millis(4);
const BUDGET: Duration = Duration::from_millis(200);
const CHANNEL: ChannelId = ChannelId(0xC0FFEE);

/// `RetransmitConfig::min_age`: the RTT (10 ms) unless `SIM_MIN_AGE_MS` says otherwise.
fn min_age() -> Duration {
    std::env::var("SIM_MIN_AGE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(10 * MS, Duration::from_millis)
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i as u8], 8010))
}

fn video(sender: usize, seq: u64) -> Bytes {
    Datagram::new(
        NodeId(sender as u64 + 1),
        Body::Video(VideoPacket {
            channel: CHANNEL,
            seq,
            flags: 0,
            payload: Bytes::from_static(&[0x47; 188]),
        }),
    )
    .encode()
    .expect("encode video")
}

#[derive(Debug, Default)]
struct Outcome {
    on_time: u64,
    delivered: u64,
    originals: u64,
    retransmitted: u64,
    nacks: u64,
    duplicates: u64,
    missed_tail: Vec<u64>,
}

/// Runs one case; `spec` is the impairment of every link direction (a per-link seed is added).
fn run(spec: &str, seed: u64, recovery: bool) -> Outcome {
    let t0 = Instant::now();
    // down[i]: node i → node i+1 (video); up[i]: node i+1 → node i (NACKs).
    let shim = |dir: u64, i: usize| {
        let s = format!("{spec},seed={}", seed * 1000 + dir * 10 + i as u64);
        Impairment::new(s.parse().expect("impair spec"), t0)
    };
    let mut down: Vec<Impairment> = (0..HOPS).map(|i| shim(0, i)).collect();
    let mut up: Vec<Impairment> = (0..HOPS).map(|i| shim(1, i)).collect();
    // buffers[i] at node i (0..HOPS), trackers[i] at node i+1.
    let mut buffers: Vec<RetransmitBuffer> = (0..HOPS)
        .map(|_| {
            RetransmitBuffer::new(RetransmitConfig {
                min_age: min_age(),
                ..RetransmitConfig::default()
            })
        })
        .collect();
    let mut trackers: Vec<NackTracker> = (0..HOPS)
        .map(|i| {
            // The budget left at node i+1: 200 ms minus the one-way delay (+ jitter) so far.
            let mut t = NackTracker::new(NackConfig {
                deadline: BUDGET - 6 * MS * (i as u32 + 1),
                ..NackConfig::default()
            });
            t.set_rtt(10 * MS);
            t
        })
        .collect();
    let mut send_at: Vec<Instant> = Vec::with_capacity(PACKETS as usize);
    let mut arrived: Vec<Option<Instant>> = vec![None; PACKETS as usize];
    let mut out = Outcome::default();
    let mut now = t0;
    let mut next_send = t0;
    let mut seq = 0u64;
    loop {
        while seq < PACKETS && next_send <= now {
            let b = video(0, seq);
            send_at.push(next_send);
            buffers[0].insert(now, seq, b.clone());
            down[0].push(now, addr(1), b);
            out.originals += 1;
            seq += 1;
            next_send += INTERVAL;
        }
        for i in 0..HOPS {
            while let Some((_, b)) = down[i].poll_transmit(now) {
                let Ok(Datagram {
                    body: Body::Video(v),
                    ..
                }) = Datagram::decode(&b)
                else {
                    panic!("not video");
                };
                let node = i + 1;
                let a = trackers[i].on_packet(now, v.seq);
                if !a.is_new_data() {
                    continue;
                }
                if node < HOPS {
                    // (A real relay re-stamps the header with its own id once; the sim
                    // forwards the bytes as received.)
                    let fwd = b.clone();
                    buffers[node].insert(now, v.seq, fwd.clone());
                    down[node].push(now, addr(node + 1), fwd);
                    out.originals += 1;
                } else if let Some(slot) = arrived.get_mut(v.seq as usize) {
                    slot.get_or_insert(now);
                }
            }
            while let Some((_, b)) = up[i].poll_transmit(now) {
                let Ok(Datagram {
                    header,
                    body: Body::Unreliable(Message::Nack { seqs, .. }),
                }) = Datagram::decode(&b)
                else {
                    panic!("not a nack");
                };
                for (_, d) in buffers[i].handle_nack(now, header.sender, &seqs) {
                    let d =
                        common::wire::with_video_flag(&d, video_flags::RETRANSMIT).expect("video");
                    down[i].push(now, addr(i + 1), d);
                }
            }
        }
        if recovery {
            for (i, t) in trackers.iter_mut().enumerate() {
                while let Some(seqs) = t.poll_nacks(now) {
                    let n = Datagram::new(
                        NodeId(i as u64 + 2),
                        Body::Unreliable(Message::Nack {
                            channel: CHANNEL,
                            seqs,
                        }),
                    )
                    .encode()
                    .expect("encode nack");
                    up[i].push(now, addr(i), n);
                    out.nacks += 1;
                }
            }
        }
        let mut next: Option<Instant> = (seq < PACKETS).then_some(next_send);
        let timers = down
            .iter()
            .chain(up.iter())
            .filter_map(Impairment::poll_timeout)
            .chain(
                trackers
                    .iter()
                    .filter(|_| recovery)
                    .filter_map(NackTracker::poll_timeout),
            );
        for t in timers {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        match next {
            Some(n) => now = now.max(n),
            None => break,
        }
    }
    for (i, a) in arrived.iter().enumerate() {
        if let Some(a) = a {
            out.delivered += 1;
            if a.saturating_duration_since(send_at[i]) <= BUDGET {
                out.on_time += 1;
            }
        }
    }
    out.retransmitted = buffers.iter().map(|b| b.stats().hits).sum();
    for (i, t) in trackers.iter().enumerate() {
        let s = t.stats();
        assert!(!recovery || s.missing == 0, "hop {i}: {s:?}");
        out.duplicates += s.duplicates;
    }
    out.missed_tail = (0..PACKETS)
        .filter(|&s| arrived[s as usize].is_none())
        .take(3)
        .collect();
    out
}

fn case(spec: &str, mean_loss: f64, min_on_time: f64) {
    let expect_plain = (1.0 - mean_loss).powi(HOPS as i32);
    for seed in 1..=3 {
        let with = run(spec, seed, true);
        let without = run(spec, seed, false);
        let r_with = with.on_time as f64 / PACKETS as f64;
        let r_without = without.delivered as f64 / PACKETS as f64;
        let overhead = with.retransmitted as f64 / with.originals as f64;
        println!(
            "{spec:<32} seed {seed}: on time with NACK {:.4}% ({} / {PACKETS}), without {:.4}% \
             (expected ≈ {:.4}%), retransmissions {} / {} originals = {:.2}% overhead, \
             {} NACK datagrams, {} duplicates received{}",
            100.0 * r_with,
            with.on_time,
            100.0 * r_without,
            100.0 * expect_plain,
            with.retransmitted,
            with.originals,
            100.0 * overhead,
            with.nacks,
            with.duplicates,
            if with.on_time < PACKETS {
                format!(", first lost seqs {:?}", with.missed_tail)
            } else {
                String::new()
            },
        );
        assert!(r_with >= min_on_time, "{spec} seed {seed}: {r_with}");
        assert!(
            (r_without - expect_plain).abs() < 0.015,
            "{spec} seed {seed}: without recovery {r_without} vs {expect_plain}"
        );
        assert_eq!(without.retransmitted, 0);
    }
}

#[test]
fn nack_sim_5_percent_loss_per_link() {
    case("loss=5%,delay=5ms,jitter=1ms", 0.05, 0.999);
}

#[test]
fn nack_sim_10_percent_loss_per_link() {
    case("loss=10%,delay=5ms,jitter=1ms", 0.10, 0.99);
}

#[test]
fn nack_sim_bursty_1_percent_loss() {
    case("loss=1%,burst=2,delay=5ms,jitter=1ms", 0.01, 1.0);
}

//! Deterministic simulations of `ReliableEndpoint`: fake clock, seeded lossy / delaying /
//! duplicating links, event-driven time (the clock jumps to the next delivery or timer).
//!
//! Run with `--nocapture` to see the measured figures; `SIM_SEED=n` reruns the 10 000-message
//! test with another link seed (the committed expectation is for seed 1).

use bytes::Bytes;
use common::id::NodeId;
use common::impair::{ImpairConfig, Impairment};
use common::reliable::{Event, ReliableConfig, ReliableEndpoint};
use common::wire::{Body, Datagram, Message, PROTOCOL_VERSION};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i as u8], 8010))
}

/// The id of host `i` (the key of its state at its peers).
fn id(i: usize) -> NodeId {
    NodeId(i as u64 + 1)
}

const MS: Duration = Duration::from_millis(1);

/// One simulated host.
struct Node {
    ep: ReliableEndpoint,
    /// (from, id, msg) in delivery order.
    delivered: Vec<(SocketAddr, u64, Message)>,
    /// (peer, id, when).
    timed_out: Vec<(NodeId, u64, Instant)>,
    acked: Vec<(NodeId, u64)>,
}

impl Node {
    fn new(i: usize, session: u64, cfg: ReliableConfig) -> Node {
        Node {
            ep: ReliableEndpoint::new(id(i), session, cfg),
            delivered: Vec::new(),
            timed_out: Vec::new(),
            acked: Vec::new(),
        }
    }
}

/// Link parameters (same for both directions), realised by the project's impairment shim
/// (`common::impair`) on each host's send path, exactly as `--impair` does in the daemons.
#[derive(Clone, Copy)]
struct Link {
    loss: f64,
    delay: Duration,
    jitter: Duration,
    duplicate: bool,
}

impl Link {
    fn shim(&self, seed: u64, start: Instant) -> Impairment {
        let mut spec = format!(
            "loss={},delay={}us,jitter={}us,seed={seed}",
            self.loss,
            self.delay.as_micros(),
            self.jitter.as_micros()
        );
        if self.duplicate {
            spec.push_str(",dup=100%");
        }
        Impairment::new(spec.parse::<ImpairConfig>().expect("valid spec"), start)
    }
}

struct Sim {
    t0: Instant,
    now: Instant,
    nodes: Vec<Node>,
    /// Each host's send path (loss, delay, jitter, duplication).
    shims: Vec<Impairment>,
    /// Every datagram handed to the link: (time, src, dst, bytes).
    sent_log: Vec<(Instant, usize, usize, Bytes)>,
    datagrams: u64,
}

impl Sim {
    fn new(seed: u64, link: Link, cfg: ReliableConfig) -> Sim {
        let now = Instant::now();
        Sim {
            t0: now,
            now,
            nodes: vec![
                Node::new(0, 0xA000 + seed, cfg.clone()),
                Node::new(1, 0xB000 + seed, cfg),
            ],
            shims: vec![link.shim(seed, now), link.shim(seed ^ 0x5555, now)],
            sent_log: Vec::new(),
            datagrams: 0,
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Message) -> u64 {
        let now = self.now;
        self.nodes[from]
            .ep
            .send(now, id(to), addr(to), msg)
            .expect("fits a datagram")
    }

    /// Moves every pending transmit onto the links and every event into the nodes' logs.
    fn pump(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some((to, bytes)) = self.nodes[i].ep.poll_transmit() {
                let dst = (0..self.nodes.len())
                    .find(|&j| addr(j) == to)
                    .expect("known peer");
                self.datagrams += 1;
                self.sent_log.push((self.now, i, dst, bytes.clone()));
                let now = self.now;
                self.shims[i].push(now, addr(dst), bytes);
            }
            let now = self.now;
            let n = &mut self.nodes[i];
            while let Some(ev) = n.ep.poll_event() {
                match ev {
                    Event::Message { from, id, msg, .. } => n.delivered.push((from, id, msg)),
                    Event::TimedOut { peer, id } => n.timed_out.push((peer, id, now)),
                    Event::Acked { peer, id } => n.acked.push((peer, id)),
                }
            }
        }
    }

    /// Runs until nothing is in flight and no timer is armed (or `limit` of simulated time).
    fn run(&mut self, limit: Duration) {
        loop {
            self.pump();
            let next_timer = self.nodes.iter().filter_map(|n| n.ep.poll_timeout()).min();
            let next_wire = self.shims.iter().filter_map(|s| s.poll_timeout()).min();
            let Some(next) = [next_timer, next_wire].into_iter().flatten().min() else {
                return;
            };
            if next - self.t0 > limit {
                return;
            }
            self.now = self.now.max(next);
            for src in 0..self.shims.len() {
                while let Some((to, bytes)) = self.shims[src].poll_transmit(self.now) {
                    let dst = (0..self.nodes.len())
                        .find(|&j| addr(j) == to)
                        .expect("known peer");
                    let r = self.nodes[dst]
                        .ep
                        .handle_datagram(self.now, addr(src), &bytes);
                    assert_eq!(r, Ok(None), "only reliable traffic in this simulation");
                }
            }
            let now = self.now;
            for n in &mut self.nodes {
                if n.ep.poll_timeout().is_some_and(|t| t <= now) {
                    n.ep.handle_timeout(now);
                }
            }
        }
    }
}

fn ping(n: u64) -> Message {
    Message::Ping { nonce: n }
}

/// Asserts that `node` got exactly the nonces `expected` from `from`, each once (every nonce is
/// sent once, so a repeated nonce is a repeated delivery).
fn assert_exactly_once(node: &Node, from: SocketAddr, expected: impl Iterator<Item = u64>) {
    let mut seen = HashSet::new();
    for (f, _, msg) in &node.delivered {
        if *f != from {
            continue;
        }
        let Message::Ping { nonce } = msg else {
            panic!("unexpected {msg:?}")
        };
        assert!(seen.insert(*nonce), "payload {nonce} delivered twice");
    }
    let expected: HashSet<u64> = expected.collect();
    let missing = expected.difference(&seen).count();
    assert_eq!(missing, 0, "{missing} messages never delivered");
    assert_eq!(seen.len(), expected.len());
}

fn lossy_cfg() -> ReliableConfig {
    // 30 % loss each way: a round trip fails with p = 1 − 0.7² = 0.51. With 20 retries,
    // 0.51^21 · 10 000 ≈ 0.007 give-ups are expected per run (seed 1 of the impairment shim hits
    // one); with 30, 0.51^31 · 10 000 ≈ 1e-5.
    ReliableConfig {
        max_retries: 30,
        ..ReliableConfig::default()
    }
}

#[test]
fn reliable_10k_messages_at_30pct_loss_exactly_once_and_rtt_converges() {
    let link = Link {
        loss: 0.30,
        delay: 10 * MS,
        jitter: 2 * MS,
        duplicate: false,
    };
    let seed: u64 = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut sim = Sim::new(seed, link, lossy_cfg());
    const N: u64 = 10_000;
    for i in 0..N {
        sim.send(0, 1, ping(i));
    }
    sim.run(Duration::from_secs(3600));

    let a = &sim.nodes[0];
    let b = &sim.nodes[1];
    assert_exactly_once(b, addr(0), 0..N);
    assert!(
        a.timed_out.is_empty(),
        "timed out: {:?} stats a {:?} b {:?}",
        a.timed_out,
        a.ep.stats(),
        b.ep.stats()
    );
    assert_eq!(a.acked.len() as u64, N);
    let sa = a.ep.stats();
    let sb = b.ep.stats();
    assert_eq!(sa.sent, N);
    assert_eq!(sa.acked, N);
    assert_eq!(sb.delivered, N);
    // The sender's id span limit kept the receiver's window from forgetting anything.
    assert_eq!(sb.stale_dropped, 0);
    assert_eq!((sa.in_flight, sa.queued), (0, 0));
    let rtt = a.ep.rtt(id(1)).expect("sampled");
    let srtt_ms = rtt.srtt.as_secs_f64() * 1e3;
    eprintln!(
        "30% loss: delivered {} / {N} in {:.1} s simulated; retransmissions {} ({:.1} % of first \
         transmissions), duplicates dropped at B {}, ack datagrams {} for {} data datagrams; \
         SRTT {:.2} ms, RTTVAR {:.2} ms, RTO {:?}, min RTT {:?}, {} samples",
        sb.delivered,
        (sim.now - sim.t0).as_secs_f64(),
        sa.retransmitted,
        100.0 * sa.retransmitted as f64 / sa.sent as f64,
        sb.duplicates_dropped,
        sb.acks_sent,
        sa.sent + sa.retransmitted,
        srtt_ms,
        rtt.rttvar.as_secs_f64() * 1e3,
        rtt.rto,
        rtt.min_rtt,
        rtt.samples,
    );
    assert!(
        (srtt_ms - 20.0).abs() <= 3.0,
        "SRTT {srtt_ms} ms, want 20 ± 15 %"
    );
    assert!(rtt.min_rtt >= 16 * MS && rtt.min_rtt <= 20 * MS);
    // Ack batching: far fewer ack datagrams than data datagrams received.
    assert!(sb.acks_sent < sa.sent + sa.retransmitted);
}

#[test]
fn reliable_both_directions_at_once() {
    let link = Link {
        loss: 0.30,
        delay: 10 * MS,
        jitter: 3 * MS,
        duplicate: false,
    };
    let mut sim = Sim::new(2, link, lossy_cfg());
    const N: u64 = 3000;
    for i in 0..N {
        sim.send(0, 1, ping(i));
        sim.send(1, 0, ping(1_000_000 + i));
    }
    sim.run(Duration::from_secs(3600));
    assert_exactly_once(&sim.nodes[1], addr(0), 0..N);
    assert_exactly_once(&sim.nodes[0], addr(1), 1_000_000..1_000_000 + N);
    for n in &sim.nodes {
        assert!(n.timed_out.is_empty());
        assert_eq!(n.acked.len() as u64, N);
        let rtt = n.ep.rtt(id(1 - (n.ep.local().0 as usize - 1))).unwrap();
        assert!(
            (rtt.srtt.as_secs_f64() * 1e3 - 20.0).abs() <= 3.0,
            "{rtt:?}"
        );
    }
}

#[test]
fn reliable_dead_peer_times_out_with_exponential_backoff() {
    let link = Link {
        loss: 1.0,
        delay: 10 * MS,
        jitter: Duration::ZERO,
        duplicate: false,
    };
    let cfg = ReliableConfig::default(); // 200 ms initial, 2 s max, 8 retries, 256 in flight
    let mut sim = Sim::new(3, link, cfg.clone());
    const N: u64 = 300; // 44 more than max_in_flight: they wait, then time out in turn
    for i in 0..N {
        sim.send(0, 1, ping(i));
    }
    sim.run(Duration::from_secs(3600));
    let a = &sim.nodes[0];
    assert!(sim.nodes[1].delivered.is_empty());
    assert_eq!(a.timed_out.len() as u64, N);
    let ids: HashSet<u64> = a.timed_out.iter().map(|t| t.1).collect();
    assert_eq!(ids.len() as u64, N, "exactly one TimedOut per message");
    assert!(a.acked.is_empty());

    // Transmission times per id.
    let mut tx: HashMap<u64, Vec<Instant>> = HashMap::new();
    for (t, src, _, bytes) in &sim.sent_log {
        assert_eq!(*src, 0);
        let Body::Reliable { id, .. } = Datagram::decode(bytes).unwrap().body else {
            panic!("only data from A")
        };
        tx.entry(id).or_default().push(*t);
    }
    let expected_gaps: Vec<Duration> = [200, 400, 800, 1600, 2000, 2000, 2000, 2000]
        .map(|ms| ms * MS)
        .to_vec();
    for (peer, id, at) in &a.timed_out {
        assert_eq!(*peer, NodeId(2));
        let times = &tx[id];
        assert_eq!(times.len(), 1 + cfg.max_retries as usize, "id {id}");
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, expected_gaps, "id {id}");
        assert_eq!(
            *at - *times.last().unwrap(),
            cfg.max_rto,
            "give-up after the last timeout"
        );
        // The queued ones started when the first ones gave up (13 s).
        let start = times[0] - sim.t0;
        if *id < 256 {
            assert_eq!(start, Duration::ZERO);
        } else {
            assert_eq!(start, Duration::from_secs(13));
        }
    }
    let s = a.ep.stats();
    assert_eq!(s.timed_out, N);
    assert_eq!(s.retransmitted, N * cfg.max_retries as u64);
    assert_eq!((s.in_flight, s.queued), (0, 0));
    assert_eq!(a.ep.poll_timeout(), None);
    eprintln!(
        "dead peer: {N} TimedOut, gaps {expected_gaps:?}, give-up {:?} after first send",
        a.timed_out[0].2 - sim.t0
    );
}

#[test]
fn reliable_peer_restart_is_a_new_session() {
    let link = Link {
        loss: 0.2,
        delay: 10 * MS,
        jitter: 2 * MS,
        duplicate: false,
    };
    let mut sim = Sim::new(4, link, lossy_cfg());
    for i in 0..50 {
        sim.send(1, 0, ping(i));
    }
    sim.run(Duration::from_secs(3600));
    assert_exactly_once(&sim.nodes[0], addr(1), 0..50);
    let old_session = sim.nodes[1].ep.session();

    // B restarts: same address, fresh endpoint, new session, ids from 0 again.
    sim.nodes[1] = Node::new(1, 0xB0B, lossy_cfg());
    for i in 0..50 {
        let id = sim.send(1, 0, ping(100 + i));
        assert_eq!(id, i);
    }
    sim.run(Duration::from_secs(3600));
    let a = &sim.nodes[0];
    assert_eq!(a.delivered.len(), 100);
    let ids: Vec<u64> = a.delivered.iter().map(|d| d.1).collect();
    assert_eq!(ids.iter().filter(|&&id| id < 50).count(), 100);
    assert_exactly_once(a, addr(1), (0..50).chain(100..150));
    assert!(sim.nodes[1].timed_out.is_empty());

    // A late datagram of the old session is neither delivered nor acked (it must not switch the
    // receive state back and make the new session's ids deliverable twice).
    let before = sim.nodes[0].ep.stats();
    let late = Datagram::new(
        NodeId(2),
        Body::Reliable {
            session: old_session,
            id: 7,
            msg: ping(999),
        },
    )
    .encode()
    .unwrap();
    let a = &mut sim.nodes[0].ep;
    assert_eq!(a.handle_datagram(sim.now, addr(1), &late), Ok(None));
    assert_eq!(a.poll_event(), None);
    assert_eq!(a.poll_transmit(), None);
    assert_eq!(a.stats().stale_dropped, before.stale_dropped + 1);
    // ...and the new session's ids are still duplicates.
    let dup = Datagram::new(
        NodeId(2),
        Body::Reliable {
            session: 0xB0B,
            id: 7,
            msg: ping(107),
        },
    )
    .encode()
    .unwrap();
    assert_eq!(a.handle_datagram(sim.now, addr(1), &dup), Ok(None));
    assert_eq!(a.poll_event(), None);
    assert!(a.poll_transmit().is_some(), "duplicate is re-acked");
    assert_eq!(a.stats().duplicates_dropped, before.duplicates_dropped + 1);
}

#[test]
fn reliable_duplicating_link_still_exactly_once() {
    let link = Link {
        loss: 0.2,
        delay: 10 * MS,
        jitter: 5 * MS, // duplicates arrive out of order
        duplicate: true,
    };
    let mut sim = Sim::new(5, link, lossy_cfg());
    const N: u64 = 3000;
    for i in 0..N {
        sim.send(0, 1, ping(i));
        if i.is_multiple_of(3) {
            sim.send(1, 0, ping(i));
        }
    }
    sim.run(Duration::from_secs(3600));
    assert_exactly_once(&sim.nodes[1], addr(0), 0..N);
    assert_exactly_once(
        &sim.nodes[0],
        addr(1),
        (0..N).filter(|i| i.is_multiple_of(3)),
    );
    let sb = sim.nodes[1].ep.stats();
    assert!(sb.duplicates_dropped > N / 2, "{sb:?}");
    assert!(sim.nodes.iter().all(|n| n.timed_out.is_empty()));
    eprintln!(
        "duplicating link: {} delivered, {} duplicates dropped at B",
        sb.delivered, sb.duplicates_dropped
    );
}

#[test]
fn reliable_malformed_datagrams_are_counted_and_change_nothing() {
    let now = Instant::now();
    let mut a = ReliableEndpoint::new(NodeId(1), 42, ReliableConfig::default());
    let b = addr(1);
    a.send(now, id(1), b, ping(1)).unwrap();
    while a.poll_transmit().is_some() {}
    let before = a.stats();
    let timeout = a.poll_timeout();

    let good = Datagram::new(
        NodeId(2),
        Body::Ack {
            session: 42,
            ids: vec![0],
        },
    )
    .encode()
    .unwrap();
    let mut other_version = good.to_vec();
    other_version[2] = PROTOCOL_VERSION + 1;
    let mut bad_body = good.to_vec();
    bad_body.push(0);
    let inputs: Vec<Vec<u8>> = vec![
        vec![],
        b"hello".to_vec(),
        b"XX\x01\x00aaaaaaaaaaaa".to_vec(),
        good[..good.len() - 1].to_vec(),
        bad_body,
        vec![0xFF; 3000],
    ];
    for bytes in &inputs {
        assert!(a.handle_datagram(now, b, bytes).is_err());
    }
    assert!(matches!(
        a.handle_datagram(now, b, &other_version),
        Err(common::wire::WireError::Version { .. })
    ));
    let after = a.stats();
    assert_eq!(after.malformed, before.malformed + inputs.len() as u64);
    assert_eq!(after.wrong_version, before.wrong_version + 1);
    assert_eq!(
        ReliableStatsSansErrors::from(after),
        ReliableStatsSansErrors::from(before)
    );
    assert_eq!(a.poll_timeout(), timeout);
    assert_eq!(a.poll_transmit(), None);
    assert_eq!(a.poll_event(), None);
    // The real ack still works afterwards.
    assert_eq!(a.handle_datagram(now + 5 * MS, b, &good), Ok(None));
    assert_eq!(a.poll_event(), Some(Event::Acked { peer: id(1), id: 0 }));
    assert_eq!(a.rtt(id(1)).unwrap().srtt, 5 * MS);
    assert_eq!(a.poll_timeout(), None);
}

/// `ReliableStats` with the error counters zeroed, to compare the rest.
#[derive(Debug, PartialEq, Eq)]
struct ReliableStatsSansErrors(common::reliable::ReliableStats);
impl From<common::reliable::ReliableStats> for ReliableStatsSansErrors {
    fn from(mut s: common::reliable::ReliableStats) -> Self {
        s.malformed = 0;
        s.wrong_version = 0;
        ReliableStatsSansErrors(s)
    }
}

#[test]
fn reliable_acks_for_other_sessions_are_ignored_and_forget_peer_drops_state() {
    let now = Instant::now();
    let mut a = ReliableEndpoint::new(NodeId(1), 42, ReliableConfig::default());
    let b = addr(1);
    for i in 0..3 {
        assert_eq!(a.send(now, id(1), b, ping(i)).unwrap(), i);
    }
    while a.poll_transmit().is_some() {}
    let stale_ack = Datagram::new(
        NodeId(2),
        Body::Ack {
            session: 41,
            ids: vec![0, 1, 2],
        },
    )
    .encode()
    .unwrap();
    assert_eq!(a.handle_datagram(now, b, &stale_ack), Ok(None));
    assert_eq!(a.poll_event(), None);
    assert_eq!(a.stats().acks_ignored, 1);
    assert_eq!(a.stats().in_flight, 3);

    a.forget_peer(id(1));
    assert_eq!(a.poll_timeout(), None);
    assert_eq!(a.poll_transmit(), None);
    assert_eq!((a.stats().in_flight, a.stats().queued), (0, 0));
    a.handle_timeout(now + Duration::from_secs(100));
    assert_eq!(a.poll_event(), None, "no TimedOut for a forgotten peer");
    // Ids keep increasing: the peer's window for our session must not see id 0 again.
    assert_eq!(a.send(now, id(1), b, ping(9)).unwrap(), 3);
}

#[test]
fn reliable_oversize_message_is_refused_without_consuming_an_id() {
    use common::wire::{ChannelId, ChannelInfo};
    let now = Instant::now();
    let mut a = ReliableEndpoint::new(NodeId(1), 42, ReliableConfig::default());
    let big = Message::Channels {
        page: 0,
        pages: 1,
        channels: (0..32)
            .map(|i| ChannelInfo {
                id: ChannelId(i),
                name: "x".repeat(100),
            })
            .collect(),
    };
    assert!(a.send(now, id(1), addr(1), big).is_err());
    assert_eq!(a.send(now, id(1), addr(1), ping(0)).unwrap(), 0);
    assert_eq!(a.stats().sent, 1);
}

// ---------------------------------------------------------------------------------------------
// Property: whatever the network does (drop, duplicate, reorder, delay), nothing is delivered
// twice; once the network heals, every message is delivered or reported TimedOut, and every
// acked message was delivered.

#[derive(Debug, Clone)]
enum Step {
    /// Node `0`/`1` sends a new message to the other.
    Send(bool),
    /// Deliver the datagram at this index of the wire (any order: reordering).
    Deliver(prop::sample::Index),
    /// Lose it.
    Drop(prop::sample::Index),
    /// Copy it.
    Duplicate(prop::sample::Index),
    /// Let time pass (fires timers).
    Advance(u64),
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => any::<bool>().prop_map(Step::Send),
        4 => any::<prop::sample::Index>().prop_map(Step::Deliver),
        1 => any::<prop::sample::Index>().prop_map(Step::Drop),
        1 => any::<prop::sample::Index>().prop_map(Step::Duplicate),
        1 => (0u64..400).prop_map(Step::Advance),
    ]
}

struct Model {
    now: Instant,
    eps: [ReliableEndpoint; 2],
    wire: Vec<(usize, Bytes)>, // (dst, bytes)
    sent: [Vec<u64>; 2],       // nonces sent by each node, index = id
    delivered: [HashSet<u64>; 2],
    acked: [HashSet<u64>; 2],
    timed_out: [HashSet<u64>; 2],
}

impl Model {
    fn pump(&mut self) -> Result<(), TestCaseError> {
        for i in 0..2 {
            while let Some((to, bytes)) = self.eps[i].poll_transmit() {
                prop_assert_eq!(to, addr(1 - i));
                self.wire.push((1 - i, bytes));
            }
            while let Some(ev) = self.eps[i].poll_event() {
                match ev {
                    Event::Message { from, id, msg, .. } => {
                        prop_assert_eq!(from, addr(1 - i));
                        prop_assert!(self.delivered[i].insert(id), "id {} delivered twice", id);
                        let sent = &self.sent[1 - i];
                        prop_assert!((id as usize) < sent.len());
                        prop_assert_eq!(msg, ping(sent[id as usize]));
                    }
                    Event::Acked { id, .. } => prop_assert!(self.acked[i].insert(id)),
                    Event::TimedOut { id, .. } => prop_assert!(self.timed_out[i].insert(id)),
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, k: usize) -> Result<(), TestCaseError> {
        let (dst, bytes) = self.wire.remove(k);
        let r = self.eps[dst].handle_datagram(self.now, addr(1 - dst), &bytes);
        prop_assert_eq!(r, Ok(None));
        Ok(())
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
        for ep in &mut self.eps {
            ep.handle_timeout(self.now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn reliable_never_delivers_twice(steps in prop::collection::vec(arb_step(), 0..300)) {
        // Tiny limits so that queueing and the forced window advance are exercised.
        let cfg = ReliableConfig {
            initial_rto: 100 * MS,
            min_rto: 20 * MS,
            max_rto: 400 * MS,
            max_retries: 3,
            max_in_flight: 4,
            dup_window: 8,
        };
        let now = Instant::now();
        let mut m = Model {
            now,
            eps: [
                ReliableEndpoint::new(NodeId(1), 11, cfg.clone()),
                ReliableEndpoint::new(NodeId(2), 22, cfg),
            ],
            wire: Vec::new(),
            sent: [Vec::new(), Vec::new()],
            delivered: [HashSet::new(), HashSet::new()],
            acked: [HashSet::new(), HashSet::new()],
            timed_out: [HashSet::new(), HashSet::new()],
        };
        let mut nonce = 0;
        for step in steps {
            match step {
                Step::Send(b) => {
                    let i = usize::from(b);
                    nonce += 1;
                    let id = m.eps[i].send(m.now, id(1 - i), addr(1 - i), ping(nonce)).unwrap();
                    prop_assert_eq!(id as usize, m.sent[i].len());
                    m.sent[i].push(nonce);
                }
                Step::Deliver(k) if !m.wire.is_empty() => m.deliver(k.index(m.wire.len()))?,
                Step::Drop(k) if !m.wire.is_empty() => {
                    m.wire.remove(k.index(m.wire.len()));
                }
                Step::Duplicate(k) if !m.wire.is_empty() => {
                    let d = m.wire[k.index(m.wire.len())].clone();
                    m.wire.push(d);
                }
                Step::Advance(ms) => m.tick(Duration::from_millis(ms)),
                _ => {}
            }
            m.pump()?;
        }
        // Heal the network: deliver everything, let timers run, until quiescent.
        for _ in 0..10_000 {
            while !m.wire.is_empty() {
                m.deliver(0)?;
                m.pump()?;
            }
            let next = m.eps.iter().filter_map(|e| e.poll_timeout()).min();
            match next {
                Some(t) => {
                    let d = t.saturating_duration_since(m.now);
                    m.tick(d);
                    m.pump()?;
                }
                None => break,
            }
        }
        prop_assert!(m.wire.is_empty());
        for i in 0..2 {
            let peer = 1 - i;
            for id in 0..m.sent[i].len() as u64 {
                prop_assert!(
                    m.delivered[peer].contains(&id) || m.timed_out[i].contains(&id),
                    "message {} of node {} neither delivered nor timed out", id, i
                );
                prop_assert!(!(m.acked[i].contains(&id) && m.timed_out[i].contains(&id)));
                if m.acked[i].contains(&id) {
                    prop_assert!(m.delivered[peer].contains(&id), "acked but not delivered");
                }
            }
            let s = m.eps[i].stats();
            prop_assert_eq!((s.in_flight, s.queued), (0, 0));
        }
    }
}

#[test]
fn reliable_state_follows_a_peer_that_moves() {
    let now = Instant::now();
    let mut a = ReliableEndpoint::new(id(0), 42, ReliableConfig::default());
    let (old, new) = (addr(1), addr(9));
    for i in 0..2 {
        a.send(now, id(1), old, ping(i)).unwrap();
    }
    let first: Vec<SocketAddr> = std::iter::from_fn(|| a.poll_transmit().map(|t| t.0)).collect();
    assert_eq!(first, vec![old, old]);
    // The peer (same id) acks message 0 from a new address: the ack counts, the RTT is its.
    let ack = Datagram::new(
        id(1),
        Body::Ack {
            session: 42,
            ids: vec![0],
        },
    )
    .encode()
    .unwrap();
    assert_eq!(a.handle_datagram(now + 3 * MS, new, &ack), Ok(None));
    assert_eq!(a.poll_event(), Some(Event::Acked { peer: id(1), id: 0 }));
    assert_eq!(a.rtt(id(1)).unwrap().samples, 1);
    // Message 1's retransmission, and the acks of what it sends us, go to where it is now.
    a.handle_timeout(a.poll_timeout().unwrap());
    assert_eq!(a.poll_transmit().map(|t| t.0), Some(new));
    let msg = Datagram::new(
        id(1),
        Body::Reliable {
            session: 7,
            id: 0,
            msg: ping(5),
        },
    )
    .encode()
    .unwrap();
    assert_eq!(a.handle_datagram(now + 4 * MS, new, &msg), Ok(None));
    assert!(matches!(a.poll_event(), Some(Event::Message { sender, .. }) if sender == id(1)));
    assert_eq!(a.poll_transmit().map(|t| t.0), Some(new), "the ack");
    assert_eq!(a.stats().in_flight, 1);
}

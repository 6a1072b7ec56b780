//! Failure detection: is a peer alive? I/O-free, fed `(now, event)`.
//!
//! A [`FailureDetector`] watches a set of peers. The caller sends each of them a heartbeat
//! (a `Ping`) every [`FailureConfig::heartbeat_interval`] and reports *any* datagram received
//! from a peer with [`heard`](FailureDetector::heard) (pongs, pings, floods, video: everything
//! proves the peer is alive). A peer silent for its timeout
//!
//! ```text
//! timeout = max(k × heartbeat_interval, 2·SRTT + 4·RTTVAR)
//! ```
//!
//! is declared dead once by [`poll_dead`](FailureDetector::poll_dead). SRTT and RTTVAR come
//! from the caller's RTT estimator ([`rtt_sample`](FailureDetector::rtt_sample) or
//! [`rtt_estimate`](FailureDetector::rtt_estimate)); before the first sample only the
//! `k × heartbeat_interval` floor applies.
//!
//! A dead peer that is heard from again is *alive* at once, but not *usable*
//! ([`is_usable`](FailureDetector::is_usable)) for [`FailureConfig::hold_down`] after it came
//! back, so that a flapping peer is not switched back to.
//!
//! # Choice of k (false deaths at 10 % loss)
//!
//! Take the worst case where the only traffic is our heartbeats and their answers, with
//! independent 10 % loss each way: a heartbeat round trip fails with probability
//! `q = 1 − 0.9² = 0.19`. A false death needs `k` consecutive failed round trips; there are 10
//! heartbeats a second, so over 10 minutes (6000 heartbeats) the expected number of false
//! deaths of one peer is about `6000 · q^k`:
//!
//! | k | `q^k` | false deaths / 10 min |
//! |---|---|---|
//! | 3 | 6.9e-3 | 41 |
//! | 5 | 2.5e-4 | 1.5 |
//! | 6 | 4.7e-5 | 0.28 |
//! | 8 | 1.7e-6 | 0.010 |
//!
//! So the default is `k = 8` (an 800 ms floor at 100 ms heartbeats). Overlay nodes heartbeat
//! each other and do not answer each other's heartbeats (a pong only goes to a peer that does
//! not ping us), so a window is silent when the peer's own ping is lost: 0.1. The relay uses
//! 200 ms heartbeats and `k = 6` (a 1.2 s floor for idle neighbours; those that feed it are
//! watched at 25 ms): `3000 · 0.1⁶ = 3e-3` false deaths per 10 minutes, before counting the
//! floods and the acknowledged pings that also prove the peer alive. Bursty loss
//! (Gilbert–Elliott) is not covered by this computation: a burst longer than the timeout *is*
//! an outage as far as video is concerned.

use crate::map::Map;
use crate::reliable::RttEstimate;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Tuning of a [`FailureDetector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureConfig {
    /// How often the caller sends each watched peer a heartbeat. Default 100 ms.
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals of silence before a peer is dead (the timeout's floor is
    /// `k × heartbeat_interval`). Default 8 (see the module documentation).
    pub k: u32,
    /// How long a peer that died and came back stays unusable. Default 2 s.
    pub hold_down: Duration,
    /// Heartbeat period of *fast* peers ([`FailureDetector::set_fast`]). Default 25 ms.
    pub fast_interval: Duration,
    /// Heartbeat periods of silence before a fast peer is dead. Default 6 (150 ms).
    pub fast_k: u32,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            heartbeat_interval: Duration::from_millis(100),
            k: 8,
            hold_down: Duration::from_secs(2),
            fast_interval: Duration::from_millis(25),
            fast_k: 6,
        }
    }
}

impl FailureConfig {
    /// The timeout without RTT information: `k × heartbeat_interval`.
    pub fn floor(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(self.k.max(1))
    }

    /// The timeout of a fast peer without RTT information: `fast_k × fast_interval`.
    pub fn fast_floor(&self) -> Duration {
        self.fast_interval.saturating_mul(self.fast_k.max(1))
    }

    /// The timeout for a peer with this smoothed RTT and variation:
    /// `max(k × heartbeat_interval, 2·SRTT + 4·RTTVAR)`.
    pub fn timeout(&self, srtt: Duration, rttvar: Duration) -> Duration {
        self.floor().max(rtt_term(srtt, rttvar))
    }

    /// The timeout of a fast peer: `max(fast_k × fast_interval, 2·SRTT + 4·RTTVAR)`.
    pub fn fast_timeout(&self, srtt: Duration, rttvar: Duration) -> Duration {
        self.fast_floor().max(rtt_term(srtt, rttvar))
    }
}

fn rtt_term(srtt: Duration, rttvar: Duration) -> Duration {
    srtt.saturating_mul(2)
        .saturating_add(rttvar.saturating_mul(4))
}

#[derive(Debug, Clone, Copy)]
struct PeerState {
    last_heard: Instant,
    alive: bool,
    /// When it came back after being declared dead (start of the hold-down).
    revived_at: Option<Instant>,
    /// Last RTT estimate (SRTT, RTTVAR).
    rtt: Option<(Duration, Duration)>,
    fast: bool,
    /// When it last became fast.
    fast_since: Option<Instant>,
}

/// Per-peer liveness (see the module documentation). `P` is the peer's key, normally its
/// `SocketAddr`.
#[derive(Debug, Clone)]
pub struct FailureDetector<P> {
    cfg: FailureConfig,
    peers: Map<P, PeerState>,
}

impl<P: Copy + Eq + Hash + Ord> FailureDetector<P> {
    /// A detector watching nobody.
    pub fn new(cfg: FailureConfig) -> Self {
        FailureDetector {
            cfg,
            peers: Map::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FailureConfig {
        &self.cfg
    }

    /// Starts watching `peer`, presumed alive at `now` (its silence counts from `now`). No
    /// effect on a watched peer.
    pub fn watch(&mut self, now: Instant, peer: P) {
        self.peers.entry(peer).or_insert(PeerState {
            last_heard: now,
            alive: true,
            revived_at: None,
            rtt: None,
            fast: false,
            fast_since: None,
        });
    }

    /// Stops watching `peer`.
    pub fn unwatch(&mut self, peer: P) {
        self.peers.remove(&peer);
    }

    /// Whether `peer` is watched.
    pub fn is_watched(&self, peer: P) -> bool {
        self.peers.contains_key(&peer)
    }

    /// The watched peers, sorted.
    pub fn peers(&self) -> Vec<P> {
        let mut v: Vec<P> = self.peers.keys().copied().collect();
        v.sort();
        v
    }

    /// Something (anything) was received from `peer` at `now`. Returns `true` if the peer was
    /// dead and is alive again (its hold-down starts now). Unwatched peers are ignored.
    pub fn heard(&mut self, now: Instant, peer: P) -> bool {
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        p.last_heard = p.last_heard.max(now);
        if p.alive {
            return false;
        }
        p.alive = true;
        p.revived_at = Some(now);
        true
    }

    /// A new RTT estimate of `peer`: its timeout becomes
    /// `max(k × heartbeat_interval, 2·srtt + 4·rttvar)`.
    pub fn rtt_sample(&mut self, peer: P, srtt: Duration, rttvar: Duration) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.rtt = Some((srtt, rttvar));
        }
    }

    /// Makes `peer` fast (or normal again) at `now`: the caller heartbeats it every
    /// [`FailureConfig::fast_interval`], and its timeout's floor is `fast_k × fast_interval`
    /// (see the module documentation). Its silence so far counts against the new timeout, but
    /// a peer just made fast is given half of it from `now` (until now it was heartbeated at
    /// the slower pace, and may rightly have been silent longer): a dead one is found that
    /// soon, a live one answers the first fast heartbeat well within it.
    pub fn set_fast(&mut self, now: Instant, peer: P, fast: bool) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if fast && !p.fast {
                p.fast_since = Some(now);
            }
            p.fast = fast;
        }
    }

    /// Where `p`'s silence counts from: its last datagram, or for a peer that just became
    /// fast, no earlier than half a timeout before it did.
    fn silent_since(cfg: &FailureConfig, p: &PeerState) -> Instant {
        match (p.fast, p.fast_since) {
            (true, Some(since)) => {
                let grace = since
                    .checked_sub(Self::peer_timeout(cfg, p) / 2)
                    .unwrap_or(since);
                p.last_heard.max(grace)
            }
            _ => p.last_heard,
        }
    }

    /// Whether `peer` is watched and fast.
    pub fn is_fast(&self, peer: P) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.fast)
    }

    fn peer_timeout(cfg: &FailureConfig, p: &PeerState) -> Duration {
        match (p.fast, p.rtt) {
            (false, None) => cfg.floor(),
            (true, None) => cfg.fast_floor(),
            (false, Some((s, v))) => cfg.timeout(s, v),
            (true, Some((s, v))) => cfg.fast_timeout(s, v),
        }
    }

    /// [`rtt_sample`](Self::rtt_sample) from a reliable-channel estimate.
    pub fn rtt_estimate(&mut self, peer: P, est: &RttEstimate) {
        self.rtt_sample(peer, est.srtt, est.rttvar);
    }

    /// The current timeout of `peer` (the floor if it is not watched).
    pub fn timeout(&self, peer: P) -> Duration {
        self.peers
            .get(&peer)
            .map_or(self.cfg.floor(), |p| Self::peer_timeout(&self.cfg, p))
    }

    /// Declares `peer` dead now (e.g. a reliable message to it timed out, or it said goodbye).
    /// Returns `true` if it was alive. It will not be reported by [`poll_dead`](Self::poll_dead).
    pub fn mark_dead(&mut self, peer: P) -> bool {
        match self.peers.get_mut(&peer) {
            Some(p) => std::mem::replace(&mut p.alive, false),
            None => false,
        }
    }

    /// Declares dead, and returns (sorted), every alive peer silent for at least its timeout
    /// at `now`. Each death is reported once.
    pub fn poll_dead(&mut self, now: Instant) -> Vec<P> {
        let mut dead: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.alive
                    && now.saturating_duration_since(Self::silent_since(&self.cfg, p))
                        >= Self::peer_timeout(&self.cfg, p)
            })
            .map(|(k, _)| *k)
            .collect();
        dead.sort();
        for d in &dead {
            if let Some(p) = self.peers.get_mut(d) {
                p.alive = false;
            }
        }
        dead
    }

    /// When [`poll_dead`](Self::poll_dead) will next declare a death if nothing is heard (the
    /// earliest deadline of an alive peer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| p.alive)
            .map(|p| Self::silent_since(&self.cfg, p) + Self::peer_timeout(&self.cfg, p))
            .min()
    }

    /// Whether `peer` is alive (`true` for an unwatched peer: nothing says otherwise).
    pub fn is_alive(&self, peer: P) -> bool {
        self.peers.get(&peer).is_none_or(|p| p.alive)
    }

    /// When `peer` last sent anything (or started being watched).
    pub fn last_heard(&self, peer: P) -> Option<Instant> {
        self.peers.get(&peer).map(|p| p.last_heard)
    }

    /// Whether `peer` is alive and not in its hold-down at `now` (`true` for an unwatched peer).
    pub fn is_usable(&self, now: Instant, peer: P) -> bool {
        match self.peers.get(&peer) {
            None => true,
            Some(p) => {
                p.alive
                    && p.revived_at
                        .is_none_or(|r| now.saturating_duration_since(r) >= self.cfg.hold_down)
            }
        }
    }

    /// When the hold-down of `peer` ends, if it is alive and in one at `now`.
    pub fn hold_down_until(&self, now: Instant, peer: P) -> Option<Instant> {
        let p = self.peers.get(&peer)?;
        let end = p.revived_at? + self.cfg.hold_down;
        (p.alive && now < end).then_some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    const MS: Duration = Duration::from_millis(1);

    /// Simulates `secs` seconds of 100 ms heartbeats to a live peer over a link losing each
    /// datagram with probability `loss` each way; returns how many times it was declared dead
    /// (a revived peer is watched on).
    fn false_deaths(cfg: FailureConfig, loss: f64, secs: u64, seed: u64) -> usize {
        let t0 = Instant::now();
        let mut rng = Rng::seeded(seed);
        let mut d = FailureDetector::new(cfg);
        d.watch(t0, 1u8);
        // Loopback-like RTT, a little jitter.
        d.rtt_sample(1, MS, MS / 2);
        let mut deaths = 0;
        let n = secs * 1000 / cfg.heartbeat_interval.as_millis() as u64;
        for i in 0..n {
            let sent = t0 + cfg.heartbeat_interval * i as u32;
            // Check just before the answer could arrive (worst case for the detector).
            deaths += d.poll_dead(sent).len();
            let delivered = !rng.chance(loss) && !rng.chance(loss);
            if delivered {
                let rtt = MS + MS * rng.below(5) as u32;
                deaths += d.poll_dead(sent + rtt).len();
                d.heard(sent + rtt, 1);
            }
        }
        deaths
    }

    #[test]
    fn a_dead_peer_is_declared_once_within_its_timeout() {
        let t = Instant::now();
        let mut d = FailureDetector::new(FailureConfig::default());
        d.watch(t, "a");
        d.watch(t, "b");
        assert_eq!(d.poll_timeout(), Some(t + 800 * MS));
        // b keeps answering every 100 ms; a dies at t.
        let mut now = t;
        let mut declared = None;
        while now < t + Duration::from_secs(3) {
            now += 10 * MS;
            if (now - t).as_millis().is_multiple_of(100) {
                d.heard(now, "b");
            }
            for p in d.poll_dead(now) {
                assert_eq!(p, "a");
                assert!(declared.is_none(), "declared twice");
                declared = Some(now);
            }
        }
        let at = declared.expect("a declared dead") - t;
        assert_eq!(at, 800 * MS);
        assert!(!d.is_alive("a") && d.is_alive("b"));
        assert!(!d.is_usable(now, "a") && d.is_usable(now, "b"));
        // Only the living count for the next deadline.
        assert!(d.poll_timeout().unwrap() > now);
        // mark_dead is a death too, reported by its caller, not again by poll_dead.
        assert!(d.mark_dead("b"));
        assert!(!d.mark_dead("b"));
        assert!(d.poll_dead(now + Duration::from_secs(9)).is_empty());
        assert_eq!(d.poll_timeout(), None);
        assert!(d.is_alive("unwatched") && d.is_usable(now, "unwatched"));
    }

    #[test]
    fn no_false_death_in_ten_minutes_at_ten_percent_loss() {
        // 10 % loss each way, only heartbeats: q = 0.19 per round trip; expected false deaths
        // in 10 min = 6000 · 0.19^k (module documentation): 0.010 for k = 8.
        let cfg = FailureConfig::default();
        for seed in 1..=3 {
            assert_eq!(false_deaths(cfg, 0.10, 600, seed), 0, "seed {seed}");
        }
        // The same link with k = 3 (expected ≈ 41) does die falsely, so the test has teeth.
        let k3 = FailureConfig { k: 3, ..cfg };
        let n = false_deaths(k3, 0.10, 600, 1);
        assert!(n > 10, "k = 3: {n} false deaths");
    }

    #[test]
    fn hold_down_keeps_a_recovered_peer_unusable() {
        let t = Instant::now();
        let cfg = FailureConfig::default();
        let mut d = FailureDetector::new(cfg);
        d.watch(t, 7u32);
        assert!(d.is_usable(t, 7), "never died: usable");
        let dead_at = t + 801 * MS;
        assert_eq!(d.poll_dead(dead_at), vec![7]);
        // It comes back.
        let back = dead_at + Duration::from_secs(1);
        assert!(d.heard(back, 7), "revived");
        assert!(!d.heard(back, 7), "revived once");
        assert!(d.is_alive(7));
        assert!(!d.is_usable(back, 7));
        assert_eq!(d.hold_down_until(back, 7), Some(back + cfg.hold_down));
        // Still talking throughout the hold-down.
        let mut now = back;
        while now < back + cfg.hold_down {
            assert!(
                !d.is_usable(now, 7),
                "usable during hold-down at {:?}",
                now - back
            );
            now += 100 * MS;
            d.heard(now, 7);
            assert!(d.poll_dead(now).is_empty());
        }
        assert!(d.is_usable(now, 7));
        assert_eq!(d.hold_down_until(now, 7), None);
        // Flapping: dies again, comes back: a fresh hold-down.
        assert_eq!(d.poll_dead(now + 801 * MS), vec![7]);
        let again = now + Duration::from_secs(2);
        assert!(d.heard(again, 7));
        assert!(!d.is_usable(again + Duration::from_secs(1), 7));
        assert!(d.is_usable(again + cfg.hold_down, 7));
    }

    #[test]
    fn timeout_follows_the_rtt() {
        let cfg = FailureConfig {
            k: 3,
            ..FailureConfig::default()
        };
        let t = Instant::now();
        let mut d = FailureDetector::new(cfg);
        d.watch(t, "loopback");
        d.watch(t, "far");
        assert_eq!(d.timeout("far"), 300 * MS, "floor before any sample");
        d.rtt_sample(
            "loopback",
            Duration::from_micros(80),
            Duration::from_micros(40),
        );
        let est = RttEstimate {
            srtt: 200 * MS,
            rttvar: 25 * MS,
            rto: 300 * MS,
            min_rtt: 190 * MS,
            samples: 10,
        };
        d.rtt_estimate("far", &est);
        assert_eq!(d.timeout("loopback"), 300 * MS);
        assert_eq!(d.timeout("far"), 500 * MS, "2·200 + 4·25");
        assert!(d.timeout("far") > d.timeout("loopback"));
        // Both silent since t: the loopback peer dies first.
        assert_eq!(d.poll_dead(t + 301 * MS), vec!["loopback"]);
        assert!(d.poll_dead(t + 499 * MS).is_empty());
        assert_eq!(d.poll_dead(t + 500 * MS), vec!["far"]);
        // With the default k = 8, the RTT term takes over only on long links.
        let dflt = FailureConfig::default();
        assert_eq!(dflt.timeout(200 * MS, 25 * MS), 800 * MS);
        assert_eq!(dflt.timeout(400 * MS, 50 * MS), 1000 * MS);
    }

    /// Simulates `secs` seconds of a fast peer over a link losing each datagram with
    /// probability `loss` each way: our heartbeats every `fast_interval` (answered), its own
    /// pings every 100 ms, and `video_per_s` video datagrams a second. Returns the false deaths.
    fn fast_false_deaths(
        cfg: FailureConfig,
        loss: f64,
        video_per_s: u64,
        secs: u64,
        seed: u64,
    ) -> usize {
        let t0 = Instant::now();
        let mut rng = Rng::seeded(seed);
        let mut d = FailureDetector::new(cfg);
        d.watch(t0, 1u8);
        d.set_fast(t0, 1, true);
        d.rtt_sample(1, MS, MS / 2);
        // Arrival times of everything that gets through, in 1 ms steps.
        let mut deaths = 0;
        let hb = cfg.fast_interval.as_millis() as u64;
        let video_every = 1000u64.checked_div(video_per_s).unwrap_or(u64::MAX);
        for ms in 0..secs * 1000 {
            let now = t0 + MS * ms as u32;
            deaths += d.poll_dead(now).len();
            let mut heard = false;
            // Our heartbeat sent 1 ms ago, answered now.
            if ms % hb == 1 && !rng.chance(loss) && !rng.chance(loss) {
                heard = true;
            }
            if ms % 100 == 50 && !rng.chance(loss) {
                heard = true;
            }
            if ms % video_every == 3 && !rng.chance(loss) {
                heard = true;
            }
            if heard {
                d.heard(now, 1);
            }
        }
        deaths
    }

    /// A neighbour heartbeated at the slow pace (last heard 190 ms ago) becomes an upstream:
    /// it is not dead at once, but half a fast timeout later if it stays silent; once heard,
    /// the ordinary fast timeout runs from its datagram.
    #[test]
    fn a_peer_just_made_fast_has_half_a_fast_timeout_to_be_heard() {
        let cfg = FailureConfig::default();
        let t = Instant::now();
        let mut d = FailureDetector::new(cfg);
        d.watch(t, "up");
        d.watch(t, "dead");
        let now = t + 190 * MS;
        d.set_fast(now, "up", true);
        d.set_fast(now, "dead", true);
        assert!(
            d.poll_dead(now).is_empty(),
            "dead for its slow-paced silence"
        );
        assert_eq!(d.poll_timeout(), Some(now + 75 * MS));
        d.heard(now + 5 * MS, "up");
        assert_eq!(d.poll_dead(now + 75 * MS), vec!["dead"]);
        assert!(d.poll_dead(now + 154 * MS).is_empty());
        assert_eq!(d.poll_dead(now + 155 * MS), vec!["up"]);
        // Made fast again later: the grace is counted from then.
        d.heard(now + 400 * MS, "up");
        d.set_fast(now + 400 * MS, "up", false);
        d.set_fast(now + 600 * MS, "up", true);
        assert!(d.poll_dead(now + 600 * MS).is_empty());
        assert_eq!(d.poll_dead(now + 675 * MS), vec!["up"]);
    }

    #[test]
    fn a_fast_peer_dies_within_150_ms_and_not_falsely_at_ten_percent_loss() {
        let cfg = FailureConfig::default();
        let t = Instant::now();
        let mut d = FailureDetector::new(cfg);
        d.watch(t, "up");
        d.watch(t, "other");
        d.set_fast(t, "up", true);
        assert!(d.is_fast("up") && !d.is_fast("other"));
        assert_eq!(d.timeout("up"), 150 * MS);
        assert_eq!(d.poll_timeout(), Some(t + 150 * MS));
        assert!(d.poll_dead(t + 149 * MS).is_empty());
        assert_eq!(d.poll_dead(t + 150 * MS), vec!["up"]);
        // Back to normal: the ordinary floor (k × 100 ms).
        d.set_fast(t, "other", true);
        d.set_fast(t, "other", false);
        assert_eq!(d.timeout("other"), 800 * MS);
        // The RTT term still applies to a fast peer on a long link.
        d.rtt_sample("up", 100 * MS, 10 * MS);
        assert_eq!(d.timeout("up"), 240 * MS, "2·100 + 4·10");

        // 10 minutes at 10 % loss each way, streaming 50 datagrams/s: no false death.
        for seed in 1..=3 {
            assert_eq!(
                fast_false_deaths(cfg, 0.10, 50, 600, seed),
                0,
                "seed {seed}"
            );
        }
        // Heartbeats only (a stalled source): ≈ 0.03 expected per 10 min.
        assert!(fast_false_deaths(cfg, 0.10, 0, 600, 4) <= 1);
        // Teeth: with fast_k = 2 (50 ms) the heartbeats-only link dies falsely, often.
        let k2 = FailureConfig { fast_k: 2, ..cfg };
        let n = fast_false_deaths(k2, 0.10, 0, 600, 4);
        assert!(n > 50, "fast_k = 2: {n} false deaths");
    }
}

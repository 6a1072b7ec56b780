//! Per-stream playout: NACK loss recovery ([`NackTracker`]) and reordering within a latency
//! budget ([`JitterBuffer`]) between the network and the sinks. I/O-free.
//!
//! * Every video datagram of the stream's current source is fed to [`Playout::push`]; only what
//!   [`Playout::poll_release`] hands out goes to the sinks, in `seq` order. Call
//!   `poll_release` until `None` after each push and whenever [`Playout::poll_timeout`] passes.
//! * Start: the stream starts at its first keyframe datagram (the first datagram of a relay's
//!   GOP-cache burst is one) with [`JitterBuffer::start_at`]. Datagrams arriving before it are
//!   kept aside; those after the keyframe are pushed once it arrives, those before it are
//!   dropped (undecodable). If no keyframe shows up within the latency after the first datagram
//!   (a stream whose keyframes we cannot see), the stream starts at the lowest seq kept aside.
//! * Recovery: the [`NackTracker`] sees every datagram; [`Playout::poll_nacks`] gives the
//!   `Nack` batches to send (unreliably) to the source. Its deadline is `latency − RTT/2`
//!   (a retransmission requested later could not arrive before the jitter buffer skips the
//!   gap). Disabled by `--no-recovery` (the jitter buffer still reorders).
//! * [`Playout::reset`] (source change, stop): what the jitter buffer holds is released in order
//!   (gaps skipped), both state machines restart; counters are cumulative.

use bytes::Bytes;
use common::jitter::{JitterBuffer, JitterConfig, JitterStats, PushOutcome};
use common::nack::{NackConfig, NackTracker};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most datagrams kept aside while waiting for the first keyframe.
pub const MAX_PRESTART: usize = 4096;

/// Cumulative counters of a [`Playout`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutCounters {
    /// Datagrams that arrived after their slot was given up (or before the stream start).
    pub late: u64,
    /// Sequence numbers the viewer never got (skipped by the jitter buffer, or accepted and
    /// thrown away unreleased).
    pub skipped: u64,
    /// Duplicate datagrams dropped.
    pub duplicates: u64,
    /// Missing datagrams that arrived in time after being NACKed (or late originals).
    pub recovered: u64,
    /// `Nack` messages sent.
    pub nacks: u64,
    /// Datagrams received flagged `RETRANSMIT` (every copy: the overhead of recovery).
    pub retransmitted: u64,
}

/// Jitter buffer + NACK tracker of one stream. See the module docs.
#[derive(Debug)]
pub struct Playout {
    latency: Duration,
    rtt: Duration,
    jitter: JitterBuffer<Bytes>,
    nack: Option<NackTracker>,
    started: bool,
    /// Datagrams before the first keyframe: (arrival, seq, payload).
    prestart: Vec<(Instant, u64, Bytes)>,
    /// Released by a reset, handed out first.
    flushed: VecDeque<Bytes>,
    /// Counters of jitter buffers replaced by resets.
    base: JitterStats,
    prestart_duplicates: u64,
    retransmitted: u64,
}

impl Playout {
    /// A playout adding at most `latency`; NACKs only if `recovery`.
    pub fn new(latency: Duration, recovery: bool) -> Playout {
        let rtt = NackConfig::default().initial_rtt;
        let mut p = Playout {
            latency,
            rtt,
            jitter: JitterBuffer::new(latency, JitterConfig::default()),
            nack: recovery.then(|| {
                NackTracker::new(NackConfig {
                    deadline: latency,
                    ..NackConfig::default()
                })
            }),
            started: false,
            prestart: Vec::new(),
            flushed: VecDeque::new(),
            base: JitterStats::default(),
            prestart_duplicates: 0,
            retransmitted: 0,
        };
        p.set_rtt(rtt);
        p
    }

    /// The NACK deadline for the current RTT: `latency − RTT/2`.
    pub fn nack_deadline(&self) -> Duration {
        self.latency.saturating_sub(self.rtt / 2)
    }

    /// The smoothed RTT to the source.
    pub fn set_rtt(&mut self, srtt: Duration) {
        self.rtt = srtt;
        let deadline = self.nack_deadline();
        if let Some(n) = &mut self.nack {
            n.set_rtt(srtt);
            n.set_deadline(deadline);
        }
    }

    /// One datagram of the current source. Returns `false` if it is dropped at once
    /// (duplicate, too late).
    pub fn push(
        &mut self,
        now: Instant,
        seq: u64,
        keyframe: bool,
        retransmit: bool,
        payload: Bytes,
    ) -> bool {
        if retransmit {
            self.retransmitted += 1;
        }
        if let Some(n) = &mut self.nack {
            n.on_packet(now, seq);
        }
        if !self.started {
            if keyframe {
                self.start(seq);
                self.jitter.push(now, seq, payload);
                return true;
            }
            if self.prestart.iter().any(|(_, s, _)| *s == seq) {
                self.prestart_duplicates += 1;
                return false;
            }
            self.prestart.push((now, seq, payload));
            if self.prestart.len() >= MAX_PRESTART {
                self.start_at_lowest();
            }
            return true;
        }
        match self.jitter.push(now, seq, payload) {
            PushOutcome::Accepted | PushOutcome::Pending | PushOutcome::Reset => true,
            PushOutcome::Duplicate | PushOutcome::Late => false,
        }
    }

    fn start(&mut self, seq: u64) {
        self.started = true;
        self.jitter.start_at(seq);
        for (at, s, b) in std::mem::take(&mut self.prestart) {
            if s > seq {
                self.jitter.push(at, s, b);
            }
        }
    }

    fn start_at_lowest(&mut self) {
        if let Some(lowest) = self.prestart.iter().map(|(_, s, _)| *s).min() {
            self.started = true;
            self.jitter.start_at(lowest);
            for (at, s, b) in std::mem::take(&mut self.prestart) {
                self.jitter.push(at, s, b);
            }
        }
    }

    /// The next payload for the sinks, in order; `None` if nothing is due.
    pub fn poll_release(&mut self, now: Instant) -> Option<Bytes> {
        if let Some(b) = self.flushed.pop_front() {
            return Some(b);
        }
        if !self.started {
            let first = self.prestart.iter().map(|(at, _, _)| *at).min()?;
            if now < first + self.latency {
                return None;
            }
            self.start_at_lowest();
        }
        self.jitter.poll_release(now).map(|(_, b)| b)
    }

    /// The next NACK batch to send to the source, if one is due (call until `None`).
    pub fn poll_nacks(&mut self, now: Instant) -> Option<Vec<u64>> {
        self.nack.as_mut()?.poll_nacks(now)
    }

    /// When [`poll_release`](Self::poll_release) / [`poll_nacks`](Self::poll_nacks) have
    /// something to do next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let prestart = if self.started {
            None
        } else {
            self.prestart
                .iter()
                .map(|(at, _, _)| *at + self.latency)
                .min()
        };
        [
            prestart,
            self.jitter.poll_timeout(),
            self.nack.as_ref().and_then(NackTracker::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Source change or stop: what is held is released in order (handed out by the next
    /// `poll_release`s), both state machines restart at the next keyframe.
    pub fn reset(&mut self, now: Instant) {
        let far = now + self.latency + Duration::from_millis(1);
        while let Some((_, b)) = self.jitter.poll_release(far) {
            self.flushed.push_back(b);
        }
        let s = self.jitter.stats();
        self.base.late += s.late;
        self.base.skipped += s.skipped;
        self.base.dropped += s.dropped;
        self.base.duplicates += s.duplicates;
        self.jitter = JitterBuffer::new(self.latency, JitterConfig::default());
        if let Some(n) = &mut self.nack {
            n.reset();
        }
        self.started = false;
        self.prestart.clear();
    }

    /// Cumulative counters.
    pub fn counters(&self) -> PlayoutCounters {
        let j = self.jitter.stats();
        let n = self
            .nack
            .as_ref()
            .map(NackTracker::stats)
            .unwrap_or_default();
        PlayoutCounters {
            late: self.base.late + j.late,
            skipped: self.base.skipped + j.skipped + self.base.dropped + j.dropped,
            duplicates: self.base.duplicates + j.duplicates + self.prestart_duplicates,
            recovered: n.recovered,
            nacks: n.nacks_sent,
            retransmitted: self.retransmitted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn b(seq: u64) -> Bytes {
        Bytes::from(seq.to_be_bytes().to_vec())
    }

    fn drain(p: &mut Playout, now: Instant, out: &mut Vec<u64>) {
        while let Some(x) = p.poll_release(now) {
            out.push(u64::from_be_bytes(x[..].try_into().unwrap()));
        }
    }

    #[test]
    fn in_order_passes_at_once_and_reorder_is_fixed() {
        let t0 = Instant::now();
        let mut p = Playout::new(200 * MS, true);
        let mut out = Vec::new();
        assert!(p.push(t0, 10, true, false, b(10)));
        drain(&mut p, t0, &mut out);
        assert_eq!(out, [10]);
        for s in [12, 11, 13] {
            assert!(p.push(t0 + MS, s, false, false, b(s)));
            drain(&mut p, t0 + MS, &mut out);
        }
        assert_eq!(out, [10, 11, 12, 13]);
        assert!(!p.push(t0 + MS, 12, false, false, b(12)));
        let c = p.counters();
        assert_eq!((c.duplicates, c.skipped, c.recovered), (1, 0, 1));
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn gap_is_nacked_then_recovered_or_skipped() {
        let t0 = Instant::now();
        let mut p = Playout::new(200 * MS, true);
        p.set_rtt(20 * MS);
        assert_eq!(p.nack_deadline(), 190 * MS);
        let mut out = Vec::new();
        for s in [0, 1, 3, 4] {
            p.push(t0, s, s == 0, false, b(s));
        }
        drain(&mut p, t0, &mut out);
        assert_eq!(out, [0, 1]);
        // First NACK after the reorder delay (max(5 ms, srtt/4)).
        let t = p.poll_timeout().unwrap();
        assert_eq!(t, t0 + 5 * MS);
        assert_eq!(p.poll_nacks(t), Some(vec![2]));
        assert_eq!(p.poll_nacks(t), None);
        // The retransmission comes back.
        assert!(p.push(t + 20 * MS, 2, false, true, b(2)));
        drain(&mut p, t + 20 * MS, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4]);
        let c = p.counters();
        assert_eq!(
            (c.recovered, c.nacks, c.retransmitted, c.skipped),
            (1, 1, 1, 0)
        );
        // A gap never repaired is skipped at the latency.
        p.push(t0 + 100 * MS, 6, false, false, b(6));
        let mut now = t0 + 100 * MS;
        while let Some(t) = p.poll_timeout() {
            now = now.max(t);
            while p.poll_nacks(now).is_some() {}
            drain(&mut p, now, &mut out);
        }
        assert_eq!(out, [0, 1, 2, 3, 4, 6]);
        assert_eq!(now, t0 + 300 * MS);
        assert_eq!(p.counters().skipped, 1);
        assert!(p.counters().nacks > 1);
    }

    #[test]
    fn no_recovery_sends_no_nacks_but_reorders() {
        let t0 = Instant::now();
        let mut p = Playout::new(50 * MS, false);
        let mut out = Vec::new();
        for s in [0, 2, 1] {
            p.push(t0, s, s == 0, false, b(s));
        }
        drain(&mut p, t0, &mut out);
        assert_eq!(out, [0, 1, 2]);
        p.push(t0, 4, false, false, b(4));
        assert_eq!(p.poll_nacks(t0 + 40 * MS), None);
        assert_eq!(p.poll_timeout(), Some(t0 + 50 * MS));
        drain(&mut p, t0 + 50 * MS, &mut out);
        assert_eq!(out, [0, 1, 2, 4]);
        assert_eq!(p.counters().skipped, 1);
    }

    #[test]
    fn starts_at_the_first_keyframe_or_after_the_latency() {
        let t0 = Instant::now();
        let mut p = Playout::new(100 * MS, true);
        let mut out = Vec::new();
        // A GOP-cache burst overtaken by live data: 51, 52 before the keyframe 50; 49 is older.
        for s in [51, 49, 52] {
            assert!(p.push(t0, s, false, false, b(s)));
            drain(&mut p, t0, &mut out);
        }
        assert!(out.is_empty());
        p.push(t0 + MS, 50, true, false, b(50));
        drain(&mut p, t0 + MS, &mut out);
        assert_eq!(out, [50, 51, 52]);
        // Without keyframes: start at the lowest after the latency.
        let mut p = Playout::new(100 * MS, true);
        let mut out = Vec::new();
        for s in [8, 7] {
            p.push(t0, s, false, false, b(s));
        }
        assert!(!p.push(t0, 8, false, false, b(8)));
        assert_eq!(p.poll_timeout(), Some(t0 + 100 * MS));
        drain(&mut p, t0 + 99 * MS, &mut out);
        assert!(out.is_empty());
        drain(&mut p, t0 + 100 * MS, &mut out);
        assert_eq!(out, [7, 8]);
    }

    #[test]
    fn reset_flushes_in_order_and_restarts() {
        let t0 = Instant::now();
        let mut p = Playout::new(200 * MS, true);
        let mut out = Vec::new();
        for s in [0, 2, 3] {
            p.push(t0, s, s == 0, false, b(s));
        }
        drain(&mut p, t0, &mut out);
        assert_eq!(out, [0]);
        p.reset(t0 + MS);
        // A replica with another numbering.
        p.push(t0 + MS, 9000, true, false, b(9000));
        drain(&mut p, t0 + MS, &mut out);
        assert_eq!(out, [0, 2, 3, 9000]);
        assert_eq!(p.counters().skipped, 1);
        assert_eq!(p.poll_nacks(t0 + 100 * MS), None);
    }
}

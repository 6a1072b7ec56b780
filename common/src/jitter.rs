//! The client's jitter/reorder buffer: an I/O-free state machine that turns datagrams arriving
//! from one or several paths (out of order, duplicated, lost) into an in-order stream with a
//! bounded added delay.
//!
//! [`JitterBuffer`] is fed `(now, seq, item)` with [`JitterBuffer::push`] and asked
//! [`JitterBuffer::poll_release`] (next item for the player, in sequence order) and
//! [`JitterBuffer::poll_timeout`] (when to poll again). It never reads a clock.
//!
//! # Release rule
//!
//! Let `next` be the next expected sequence number.
//!
//! * If `next` is held, it is released **immediately** (no added delay when nothing is missing).
//! * If `next` is missing but later packets are held, the gap is waited for until
//!   `deadline = (earliest arrival among the held packets) + latency` — i.e. the time the gap
//!   was first observable (the first later packet arrived) plus the latency. At the deadline
//!   the missing sequence numbers up to the lowest held one are *skipped* (counted in
//!   [`JitterStats::skipped`]) and release continues.
//! * Consequently no packet is held longer than `latency` after its arrival, and output is
//!   strictly increasing in `seq` within an epoch (see resets).
//! * If nothing later is held, nothing is waited for: a missing packet at the tail is not
//!   skipped until a later packet shows up.
//!
//! # Several paths (SMPTE 2022-7 style merge)
//!
//! Push the packets of every path into the same buffer: the first copy of a `seq` wins
//! ([`PushOutcome::Accepted`]), later copies are [`PushOutcome::Duplicate`], whether the first
//! copy is still held or already released. A packet is lost for the player only if every path
//! lost it (or all copies missed the deadline).
//!
//! # Start and resets
//!
//! The first packet (or [`JitterBuffer::start_at`]) sets `next` and is released at once; an
//! earlier `seq` arriving afterwards is [`PushOutcome::Late`] (so a packet overtaken by its
//! successor right at the start is lost, unless the caller knows where to start). A packet more than [`JitterConfig::window`] away from
//! `next` (forward or backward: source restart, or a long outage) is not accepted on its own:
//! it becomes a *reset candidate* ([`PushOutcome::Pending`]). When
//! [`JitterConfig::reset_confirm`] candidates within `window` of each other have arrived within
//! `latency`, the buffer **resets**: what it held is flushed in order (released immediately,
//! gaps between them counted as skipped), then the new epoch starts at the lowest candidate.
//! Candidates that are not confirmed in time are dropped ([`JitterStats::stray`]), so one stray
//! datagram cannot reset the stream. For `2 × latency` after a reset, packets from the previous
//! epoch's range (a slower path still delivering the old numbering) are `Late`, never
//! candidates, so two paths cannot make the buffer flap between epochs. Across a reset the
//! released `seq` may go backwards.
//!
//! # Bounds
//!
//! At most [`JitterConfig::max_held`] packets are held (plus up to as many awaiting release
//! after a reset flush, plus `reset_confirm` candidates); the duplicate/late history covers
//! `window` sequence numbers (one byte each). If a push would exceed `max_held` (the caller
//! does not poll, or `latency × rate` exceeds `max_held`), the lowest held packet is dropped
//! ([`JitterStats::dropped`]) and the gap before it skipped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// Largest accepted [`JitterConfig::window`] (keeps the history small).
pub const MAX_WINDOW: u64 = 1 << 16;

/// Tuning of a [`JitterBuffer`] other than the latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitterConfig {
    /// A packet farther than this from the next expected `seq` (either way) is a reset candidate
    /// rather than part of the stream. Default 4096 (≈ 16 s at 250 datagrams/s). Clamped to
    /// `[1, MAX_WINDOW]`.
    pub window: u64,
    /// Maximum packets held. Default 8192. At least 1.
    pub max_held: usize,
    /// Consistent out-of-window packets needed (within `latency`) to reset. Default 3. Clamped
    /// to `[1, 64]`.
    pub reset_confirm: usize,
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            window: 4096,
            max_held: 8192,
            reset_confirm: 3,
        }
    }
}

impl JitterConfig {
    fn sanitized(mut self) -> Self {
        self.window = self.window.clamp(1, MAX_WINDOW);
        self.max_held = self.max_held.max(1);
        self.reset_confirm = self.reset_confirm.clamp(1, 64);
        self
    }
}

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// First copy of this `seq`: it will be released in order (or, on overflow of
    /// [`JitterConfig::max_held`], dropped and counted in [`JitterStats::dropped`]).
    Accepted,
    /// Another copy of a `seq` already held or released: discarded.
    Duplicate,
    /// Its slot was already skipped (or lies before the stream start / previous epoch):
    /// discarded.
    Late,
    /// Out of window: kept as a reset candidate, not yet part of the stream.
    Pending,
    /// This packet confirmed a reset: the old epoch is flushed and a new one starts with the
    /// candidates (this packet included).
    Reset,
}

/// Counters of a [`JitterBuffer`] (plus gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets that entered the stream (accepted, including confirmed reset candidates).
    pub accepted: u64,
    /// Packets handed out by [`JitterBuffer::poll_release`].
    pub released: u64,
    /// Copies discarded as duplicates.
    pub duplicates: u64,
    /// Packets discarded because their slot was already skipped/released or before the start.
    pub late: u64,
    /// Sequence numbers given up on (never released).
    pub skipped: u64,
    /// Epoch resets.
    pub resets: u64,
    /// Reset candidates discarded (not confirmed in time or inconsistent).
    pub stray: u64,
    /// Accepted packets thrown away unreleased: overflow of `max_held`, or below a `start_at`.
    pub dropped: u64,
    /// High-water mark of held packets.
    pub max_held: usize,
    /// Gauge: packets held now (waiting for order or for the flush after a reset).
    pub held: usize,
}

/// The jitter/reorder buffer. See the module docs for the release rule.
#[derive(Debug)]
pub struct JitterBuffer<T> {
    latency: Duration,
    cfg: JitterConfig,
    /// Next expected seq; `None` before the first packet.
    next: Option<u64>,
    /// First seq of the current epoch.
    epoch_start: u64,
    /// Held packets: seq → (arrival, item). All keys ≥ `next`.
    held: BTreeMap<u64, (Instant, T)>,
    /// Arrival index of `held`, for the deadline.
    arrivals: BTreeSet<(Instant, u64)>,
    /// For seqs `[next - history.len(), next)`: released (true) or skipped (false).
    history: VecDeque<bool>,
    /// Previous epoch flushed on reset, released before anything else: (seq, arrival, item).
    flush: VecDeque<(u64, Instant, T)>,
    /// Reset candidates: (seq, arrival, item).
    candidates: Vec<(u64, Instant, T)>,
    /// Range of the previous epoch and until when it is guarded.
    prev_epoch: Option<(u64, u64, Option<Instant>)>,
    stats: JitterStats,
}

impl<T> JitterBuffer<T> {
    /// An empty buffer holding a missing packet at most `latency` after a later one arrived.
    pub fn new(latency: Duration, cfg: JitterConfig) -> Self {
        JitterBuffer {
            latency,
            cfg: cfg.sanitized(),
            next: None,
            epoch_start: 0,
            held: BTreeMap::new(),
            arrivals: BTreeSet::new(),
            history: VecDeque::new(),
            flush: VecDeque::new(),
            candidates: Vec::new(),
            prev_epoch: None,
            stats: JitterStats::default(),
        }
    }

    /// The configured latency.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// Counters and gauges so far.
    pub fn stats(&self) -> JitterStats {
        let mut s = self.stats;
        s.held = self.held.len() + self.flush.len();
        s
    }

    /// Next expected sequence number (`None` before the first packet).
    pub fn next_seq(&self) -> Option<u64> {
        self.next
    }

    /// Start (or restart) the stream at `seq`, e.g. at a keyframe: held packets below `seq` are
    /// dropped (counted in [`JitterStats::dropped`]), earlier seqs pushed later are `Late`.
    /// Does not count as a reset.
    pub fn start_at(&mut self, seq: u64) {
        let keep = self.held.split_off(&seq);
        let gone = std::mem::replace(&mut self.held, keep);
        for (s, (at, _)) in gone {
            self.arrivals.remove(&(at, s));
            self.stats.dropped += 1;
        }
        if self.next != Some(seq) {
            self.history.clear();
            self.epoch_start = seq;
        }
        self.next = Some(seq);
    }

    /// Offer one packet (from any path) that arrived at `now`.
    /// `seq == u64::MAX` is reserved and always `Late`.
    pub fn push(&mut self, now: Instant, seq: u64, item: T) -> PushOutcome {
        if seq == u64::MAX {
            self.stats.late += 1;
            return PushOutcome::Late;
        }
        let Some(next) = self.next else {
            self.next = Some(seq);
            self.epoch_start = seq;
            self.insert(now, seq, item);
            return PushOutcome::Accepted;
        };
        let w = self.cfg.window;
        if seq >= next {
            if seq - next <= w {
                if self.held.contains_key(&seq) {
                    self.stats.duplicates += 1;
                    return PushOutcome::Duplicate;
                }
                self.insert(now, seq, item);
                return PushOutcome::Accepted;
            }
        } else {
            let back = next - seq;
            if back <= w {
                let len = self.history.len() as u64;
                if back <= len {
                    // back ≥ 1 and ≤ len, so the index is in range.
                    let idx = (len - back) as usize;
                    if self.history.get(idx).copied().unwrap_or(false) {
                        self.stats.duplicates += 1;
                        return PushOutcome::Duplicate;
                    }
                }
                self.stats.late += 1;
                return PushOutcome::Late;
            }
        }
        // Out of window: stale packet of the previous epoch, or a reset candidate.
        if let Some((lo, hi, until)) = self.prev_epoch {
            let guarded = until.is_none_or(|u| now < u);
            if guarded && seq >= lo && seq < hi {
                self.stats.late += 1;
                return PushOutcome::Late;
            }
        }
        self.candidate(now, seq, item)
    }

    /// Next packet for the player at `now`, in sequence order; `None` if nothing is due.
    /// Call until `None` after every push and whenever [`Self::poll_timeout`] passes.
    pub fn poll_release(&mut self, now: Instant) -> Option<(u64, T)> {
        if let Some((seq, _, item)) = self.flush.pop_front() {
            self.stats.released += 1;
            return Some((seq, item));
        }
        let next = self.next?;
        let (&first, _) = self.held.first_key_value()?;
        if first != next {
            let (oldest, _) = *self.arrivals.first()?;
            let due = oldest.checked_add(self.latency)?;
            if due > now {
                return None;
            }
            self.skip_to(first);
        }
        let (seq, (at, item)) = self.held.pop_first()?;
        self.arrivals.remove(&(at, seq));
        self.advance_released(seq);
        self.stats.released += 1;
        Some((seq, item))
    }

    /// When [`Self::poll_release`] should be called next: a time in the past means "now";
    /// `None` means only a push can make something due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some((_, at, _)) = self.flush.front() {
            return Some(*at);
        }
        let next = self.next?;
        let (&first, (at, _)) = self.held.first_key_value()?;
        if first == next {
            return Some(*at);
        }
        let (oldest, _) = *self.arrivals.first()?;
        oldest.checked_add(self.latency)
    }

    fn insert(&mut self, now: Instant, seq: u64, item: T) {
        self.stats.accepted += 1;
        if self.held.len() >= self.cfg.max_held {
            // Overflow: drop the lowest of the held packets and the new one.
            let lowest = self.held.first_key_value().map(|(s, _)| *s);
            if lowest.is_none_or(|l| seq < l) {
                self.drop_slot(seq);
                return;
            }
            if let Some((s, (at, _))) = self.held.pop_first() {
                self.arrivals.remove(&(at, s));
                self.drop_slot(s);
            }
        }
        self.held.insert(seq, (now, item));
        self.arrivals.insert((now, seq));
        self.stats.max_held = self.stats.max_held.max(self.held.len() + self.flush.len());
    }

    /// Give up the accepted packet `seq` (the lowest in the stream): skip up to it, drop it.
    fn drop_slot(&mut self, seq: u64) {
        self.skip_to(seq);
        self.push_history(false);
        self.next = Some(seq.saturating_add(1));
        self.stats.dropped += 1;
    }

    /// Skip every seq in `[next, to)`.
    fn skip_to(&mut self, to: u64) {
        if let Some(n) = self.next.filter(|n| *n < to) {
            let gap = to - n;
            self.stats.skipped += gap;
            let w = self.cfg.window as usize;
            if gap >= w as u64 {
                self.history.clear();
            }
            for _ in 0..gap.min(w as u64) {
                self.history.push_back(false);
            }
            while self.history.len() > w {
                self.history.pop_front();
            }
            self.next = Some(to);
        }
    }

    fn advance_released(&mut self, seq: u64) {
        self.push_history(true);
        self.next = Some(seq.saturating_add(1));
    }

    fn push_history(&mut self, released: bool) {
        self.history.push_back(released);
        while self.history.len() as u64 > self.cfg.window {
            self.history.pop_front();
        }
    }

    fn candidate(&mut self, now: Instant, seq: u64, item: T) -> PushOutcome {
        let w = self.cfg.window;
        let latency = self.latency;
        // Drop candidates too old, or inconsistent with this one.
        let before = self.candidates.len();
        self.candidates.retain(|(s, at, _)| {
            let fresh = at.checked_add(latency).is_none_or(|d| d > now);
            fresh && s.abs_diff(seq) <= w
        });
        self.stats.stray += (before - self.candidates.len()) as u64;
        if self.candidates.iter().any(|(s, _, _)| *s == seq) {
            self.stats.duplicates += 1;
            return PushOutcome::Duplicate;
        }
        self.candidates.push((seq, now, item));
        if self.candidates.len() < self.cfg.reset_confirm {
            return PushOutcome::Pending;
        }
        self.reset(now);
        PushOutcome::Reset
    }

    fn reset(&mut self, now: Instant) {
        self.stats.resets += 1;
        // Flush the old epoch in order; gaps between held packets are skipped.
        let old = std::mem::take(&mut self.held);
        self.arrivals.clear();
        for (s, (at, item)) in old {
            self.skip_to(s);
            self.advance_released(s);
            self.flush.push_back((s, at, item));
        }
        while self.flush.len() > self.cfg.max_held {
            if self.flush.pop_front().is_some() {
                self.stats.dropped += 1;
            }
        }
        let old_hi = self
            .next
            .unwrap_or(self.epoch_start)
            .saturating_add(self.cfg.window);
        let until = now.checked_add(latency_x2(self.latency));
        self.prev_epoch = Some((self.epoch_start, old_hi, until));
        let mut cands = std::mem::take(&mut self.candidates);
        cands.sort_by_key(|(s, _, _)| *s);
        let start = cands.first().map(|(s, _, _)| *s).unwrap_or(0);
        self.next = Some(start);
        self.epoch_start = start;
        self.history.clear();
        for (s, at, item) in cands {
            self.insert(at, s, item);
        }
    }
}

fn latency_x2(l: Duration) -> Duration {
    l.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impair::{ImpairConfig, Impairment};
    use crate::rng::Rng;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::net::SocketAddr;

    const MS: Duration = Duration::from_millis(1);

    fn jb(latency_ms: u64) -> JitterBuffer<u64> {
        JitterBuffer::new(Duration::from_millis(latency_ms), JitterConfig::default())
    }

    fn drain(b: &mut JitterBuffer<u64>, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((s, v)) = b.poll_release(now) {
            assert_eq!(s, v);
            out.push(s);
        }
        out
    }

    #[test]
    fn in_order_passthrough_is_immediate() {
        let t0 = Instant::now();
        let mut b = jb(200);
        for i in 0..1000u64 {
            let now = t0 + 4 * MS * i as u32;
            assert_eq!(b.push(now, 500 + i, 500 + i), PushOutcome::Accepted);
            assert!(b.poll_timeout().is_some_and(|t| t <= now));
            assert_eq!(drain(&mut b, now), vec![500 + i]);
            assert_eq!(b.poll_timeout(), None);
        }
        let s = b.stats();
        assert_eq!((s.released, s.skipped, s.held, s.max_held), (1000, 0, 0, 1));
    }

    #[test]
    fn reordered_inside_latency_is_released_in_order() {
        let t0 = Instant::now();
        let mut b = jb(200);
        b.push(t0, 10, 10);
        assert_eq!(drain(&mut b, t0), vec![10]);
        b.push(t0 + MS, 12, 12);
        b.push(t0 + 2 * MS, 13, 13);
        assert_eq!(drain(&mut b, t0 + 2 * MS), Vec::<u64>::new());
        assert_eq!(b.poll_timeout(), Some(t0 + 201 * MS));
        assert_eq!(b.push(t0 + 150 * MS, 11, 11), PushOutcome::Accepted);
        assert_eq!(drain(&mut b, t0 + 150 * MS), vec![11, 12, 13]);
        assert_eq!(b.stats().skipped, 0);
    }

    #[test]
    fn lost_packet_is_skipped_exactly_at_deadline_and_late_copy_never_released() {
        let t0 = Instant::now();
        let mut b = jb(200);
        b.push(t0, 0, 0);
        drain(&mut b, t0);
        b.push(t0 + 10 * MS, 3, 3); // 1 and 2 missing
        b.push(t0 + 20 * MS, 4, 4);
        assert_eq!(b.poll_timeout(), Some(t0 + 210 * MS));
        assert!(drain(&mut b, t0 + 209 * MS).is_empty());
        assert_eq!(drain(&mut b, t0 + 210 * MS), vec![3, 4]);
        assert_eq!(b.stats().skipped, 2);
        assert_eq!(b.push(t0 + 211 * MS, 2, 2), PushOutcome::Late);
        assert_eq!(b.push(t0 + 211 * MS, 4, 4), PushOutcome::Duplicate);
        assert!(drain(&mut b, t0 + 300 * MS).is_empty());
        let s = b.stats();
        assert_eq!((s.late, s.duplicates, s.released), (1, 1, 3));
    }

    #[test]
    fn duplicates_never_released() {
        let t0 = Instant::now();
        let mut b = jb(100);
        b.push(t0, 0, 0);
        b.push(t0, 2, 2);
        assert_eq!(b.push(t0, 2, 2), PushOutcome::Duplicate); // held copy
        assert_eq!(b.push(t0, 0, 0), PushOutcome::Duplicate); // released copy
        assert_eq!(drain(&mut b, t0), vec![0]);
        assert_eq!(b.push(t0, 0, 0), PushOutcome::Duplicate);
        assert_eq!(drain(&mut b, t0 + 100 * MS), vec![2]);
        assert_eq!(b.stats().duplicates, 3);
    }

    #[test]
    fn big_jumps_reset_after_confirmation_and_flush_in_order() {
        let t0 = Instant::now();
        let mut b = jb(200);
        let o = 1_000_000; // old epoch
        b.push(t0, o, o);
        drain(&mut b, t0);
        b.push(t0, o + 2, o + 2); // o+1 missing, o+2 held
                                  // One stray far datagram does nothing.
        assert_eq!(b.push(t0 + MS, 9_000_000, 0), PushOutcome::Pending);
        assert_eq!(b.push(t0 + 2 * MS, o + 3, o + 3), PushOutcome::Accepted);
        // Source restart at 0: three consistent candidates reset.
        assert_eq!(b.push(t0 + 3 * MS, 1, 1), PushOutcome::Pending);
        assert_eq!(b.stats().stray, 1);
        assert_eq!(b.push(t0 + 4 * MS, 0, 0), PushOutcome::Pending);
        assert_eq!(b.push(t0 + 5 * MS, 3, 3), PushOutcome::Reset);
        assert_eq!(drain(&mut b, t0 + 5 * MS), vec![o + 2, o + 3, 0, 1]);
        // Old epoch from a slow path: late, not a new reset.
        for s in o + 1..o + 10 {
            assert_eq!(b.push(t0 + 6 * MS, s, s), PushOutcome::Late);
        }
        assert_eq!(b.push(t0 + 7 * MS, 2, 2), PushOutcome::Accepted);
        assert_eq!(drain(&mut b, t0 + 7 * MS), vec![2, 3]);
        let s = b.stats();
        assert_eq!((s.resets, s.skipped, s.late, s.stray), (1, 1, 9, 1));
        // After the guard expires (2 × latency), a restart to the old numbering resets again.
        let t1 = t0 + 500 * MS;
        for s in [o, o + 1] {
            assert_eq!(b.push(t1, s, s), PushOutcome::Pending);
        }
        assert_eq!(b.push(t1, o + 2, o + 2), PushOutcome::Reset);
        assert_eq!(drain(&mut b, t1), vec![o, o + 1, o + 2]);
    }

    #[test]
    fn overflow_is_bounded_and_counted() {
        let t0 = Instant::now();
        let cfg = JitterConfig {
            max_held: 4,
            ..JitterConfig::default()
        };
        let mut b: JitterBuffer<u64> = JitterBuffer::new(Duration::from_secs(10), cfg);
        b.push(t0, 0, 0);
        drain(&mut b, t0);
        for s in 2..10 {
            b.push(t0, s, s);
        }
        let st = b.stats();
        assert_eq!((st.held, st.max_held, st.dropped), (4, 4, 4));
        assert_eq!(drain(&mut b, t0), vec![6, 7, 8, 9]);
        assert_eq!(b.stats().skipped, 1); // seq 1
    }

    #[test]
    fn start_at_drops_below_and_marks_late() {
        let t0 = Instant::now();
        let mut b = jb(200);
        b.start_at(50);
        assert_eq!(b.push(t0, 49, 49), PushOutcome::Late);
        assert_eq!(b.push(t0, 50, 50), PushOutcome::Accepted);
        assert_eq!(drain(&mut b, t0), vec![50]);
    }

    #[test]
    fn no_panic_at_extremes() {
        let t0 = Instant::now();
        let mut b: JitterBuffer<u64> = JitterBuffer::new(Duration::MAX, JitterConfig::default());
        let mut out = Vec::new();
        for s in [
            u64::MAX,
            0,
            u64::MAX - 1,
            u64::MAX,
            u64::MAX - 2,
            1,
            2,
            3,
            4,
            u64::MAX - 1,
            u64::MAX - 3,
        ] {
            b.push(t0, s, s);
            while let Some((s, _)) = b.poll_release(t0) {
                out.push(s);
            }
        }
        // u64::MAX is reserved; a repeated candidate is a duplicate; MAX-3..MAX-1 start an
        // epoch once confirmed (3 candidates).
        assert_eq!(
            out,
            vec![0, 1, 2, 3, 4, u64::MAX - 3, u64::MAX - 2, u64::MAX - 1]
        );
        assert_eq!(b.stats().resets, 1);
        assert!(!out.contains(&u64::MAX));
        let _ = b.poll_timeout();
    }

    fn addr() -> SocketAddr {
        "10.0.0.1:5000".parse().unwrap()
    }

    /// Simulate `n` packets 4 ms apart over two impaired paths into one buffer. `send_a(i)`
    /// decides whether path A carries packet `i` at all (to kill it). Returns (buffer, released
    /// seqs, seqs delivered on A, on B).
    fn two_paths(
        spec_a: &str,
        spec_b: &str,
        n: u64,
        send_a: impl Fn(u64) -> bool,
    ) -> (JitterBuffer<Bytes>, Vec<u64>, HashSet<u64>, HashSet<u64>) {
        let t0 = Instant::now();
        let mut paths = [
            Impairment::new(spec_a.parse::<ImpairConfig>().unwrap(), t0),
            Impairment::new(spec_b.parse::<ImpairConfig>().unwrap(), t0),
        ];
        let mut got = [HashSet::new(), HashSet::new()];
        let mut b = JitterBuffer::new(200 * MS, JitterConfig::default());
        // Without it, a reordered seq 0 arriving after seq 1 would be `Late` (see caveats).
        b.start_at(0);
        let mut out = Vec::new();
        let mut i = 0u64;
        loop {
            let send_at = (i < n).then(|| t0 + 4 * MS * i as u32);
            let now = [
                send_at,
                paths[0].poll_timeout(),
                paths[1].poll_timeout(),
                b.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(now) = now else { break };
            if send_at == Some(now) {
                let data = Bytes::copy_from_slice(&i.to_le_bytes());
                if send_a(i) {
                    paths[0].push(now, addr(), data.clone());
                }
                paths[1].push(now, addr(), data);
                i += 1;
            }
            for (p, g) in paths.iter_mut().zip(got.iter_mut()) {
                while let Some((_, d)) = p.poll_transmit(now) {
                    let seq = u64::from_le_bytes(d[..8].try_into().unwrap());
                    g.insert(seq);
                    let o = b.push(now, seq, d);
                    assert_ne!(o, PushOutcome::Late, "seq {seq} late");
                }
            }
            while let Some((s, d)) = b.poll_release(now) {
                assert_eq!(d[..8], s.to_le_bytes());
                out.push(s);
            }
        }
        let [a, bb] = got;
        (b, out, a, bb)
    }

    #[test]
    fn two_lossy_paths_merge_losing_only_what_both_lost() {
        let n = 100_000;
        let (b, out, a, bp) = two_paths(
            "loss=5%,delay=20ms,jitter=10ms,reorder=5%,seed=1",
            "loss=5%,delay=35ms,jitter=15ms,reorder=5%,seed=2",
            n,
            |_| true,
        );
        let last = *out.last().unwrap();
        let both_lost = (0..last)
            .filter(|s| !a.contains(s) && !bp.contains(s))
            .count() as u64;
        let s = b.stats();
        eprintln!(
            "2022-7 merge: A got {}, B got {}, both lost {both_lost}, stats {s:?}",
            a.len(),
            bp.len()
        );
        assert!(out.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.skipped, both_lost);
        assert_eq!(s.released + s.skipped, last + 1);
        assert_eq!(s.late, 0);
        assert_eq!(s.duplicates, a.intersection(&bp).count() as u64);
        // Each path alone would have lost ~5 %; merged ~0.25 %.
        assert!(both_lost < n / 200, "{both_lost}");
        assert!(a.len() < (n * 96 / 100) as usize);
    }

    #[test]
    fn killing_one_path_mid_stream_loses_nothing() {
        let n = 20_000;
        let (b, out, a, _) = two_paths(
            "loss=5%,delay=20ms,jitter=10ms,seed=3",
            "delay=40ms,jitter=10ms,seed=4",
            n,
            |i| i < n / 2,
        );
        let s = b.stats();
        assert_eq!(out, (0..n).collect::<Vec<_>>());
        assert_eq!((s.skipped, s.late, s.released), (0, 0, n));
        assert!(a.len() < (n / 2) as usize);
    }

    /// Random pushes: (time step ms, seq, copies).
    fn ops() -> impl Strategy<Value = Vec<(u64, u64, u8)>> {
        prop::collection::vec((0u64..40, 0u64..300, 1u8..3), 1..300)
    }

    proptest! {
        #[test]
        fn random_orders_keep_invariants(ops in ops(), latency in 0u64..150, seed in any::<u64>()) {
            let t0 = Instant::now();
            let latency = Duration::from_millis(latency);
            let mut b: JitterBuffer<u64> = JitterBuffer::new(latency, JitterConfig::default());
            let mut rng = Rng::seeded(seed);
            let mut now = t0;
            let mut arrival: BTreeMap<u64, Instant> = BTreeMap::new();
            let mut accepted = HashSet::new();
            let mut out: Vec<u64> = Vec::new();
            let release = |b: &mut JitterBuffer<u64>, until: Instant, now: &mut Instant,
                               out: &mut Vec<u64>, arrival: &BTreeMap<u64, Instant>| {
                // Walk the clock through every due time up to `until`.
                loop {
                    while let Some((s, v)) = b.poll_release(*now) {
                        assert_eq!(s, v);
                        let at = arrival[&s];
                        assert!(*now <= at + latency, "seq {s} held too long");
                        out.push(s);
                    }
                    match b.poll_timeout() {
                        Some(t) if t <= until => *now = t.max(*now),
                        _ => break,
                    }
                }
                *now = until;
            };
            for (step, seq, copies) in ops {
                let until = now + Duration::from_millis(step);
                release(&mut b, until, &mut now, &mut out, &arrival);
                for _ in 0..copies {
                    let o = b.push(now, seq, seq);
                    if o == PushOutcome::Accepted {
                        prop_assert!(accepted.insert(seq));
                        arrival.insert(seq, now);
                    }
                }
                if rng.chance(0.5) {
                    release(&mut b, now, &mut now, &mut out, &arrival);
                }
            }
            let end = now + latency + MS;
            release(&mut b, end, &mut now, &mut out, &arrival);
            let s = b.stats();
            prop_assert!(out.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(s.held, 0);
            prop_assert_eq!(s.resets, 0);
            prop_assert_eq!(out.len() as u64, s.released);
            prop_assert_eq!(accepted.len() as u64, s.accepted);
            prop_assert_eq!(s.released + s.dropped, s.accepted);
            let released: HashSet<u64> = out.iter().copied().collect();
            prop_assert_eq!(&released, &accepted);
            if let (Some(first), Some(last)) = (out.first(), out.last()) {
                prop_assert_eq!(s.skipped, last - first + 1 - s.released);
            }
        }

        #[test]
        fn resets_and_overflow_keep_accounting(
            ops in prop::collection::vec((0u64..30, 0u64..4, 0u64..64), 1..400),
            max_held in 1usize..16,
            reset_confirm in 1usize..4,
            latency in 1u64..100,
        ) {
            let t0 = Instant::now();
            let latency = Duration::from_millis(latency);
            let cfg = JitterConfig { window: 16, max_held, reset_confirm };
            let mut b: JitterBuffer<(u64, Instant)> = JitterBuffer::new(latency, cfg);
            let mut now = t0;
            let mut released = 0u64;
            let mut last: Option<u64> = None;
            let mut decreases = 0u64;
            for (step, region, off) in ops {
                // Regions far apart (> window) make resets; `off` spreads within a region.
                let seq = region * 1_000 + off;
                let until = now + Duration::from_millis(step);
                loop {
                    while let Some((s, (v, at))) = b.poll_release(now) {
                        prop_assert_eq!(s, v);
                        prop_assert!(now <= at + latency);
                        if last.is_some_and(|l| l >= s) {
                            decreases += 1;
                        }
                        last = Some(s);
                        released += 1;
                    }
                    match b.poll_timeout() {
                        Some(t) if t <= until => now = t.max(now),
                        _ => break,
                    }
                }
                now = until;
                b.push(now, seq, (seq, now));
                let st = b.stats();
                prop_assert!(st.held <= 2 * max_held);
            }
            let st = b.stats();
            prop_assert_eq!(st.released, released);
            // Order only ever breaks at an epoch change.
            prop_assert!(decreases <= st.resets, "{} decreases, {} resets", decreases, st.resets);
            prop_assert_eq!(st.accepted, st.released + st.dropped + st.held as u64);
        }
    }
}

//! Per-hop loss recovery for video within a latency budget: an I/O-free NACK state machine.
//!
//! Every hop (the server's own relay included) keeps, per channel, a bounded
//! [`RetransmitBuffer`] of the video datagrams it sent downstream. Every receiver (relay or
//! client) keeps, per channel and upstream, a [`NackTracker`]: it is fed the sequence number of
//! every received [`VideoPacket`](crate::wire::VideoPacket), detects gaps, and asks (via
//! [`NackTracker::poll_nacks`]) for [`Message::Nack`](crate::wire::Message::Nack) batches of at
//! most [`limits::NACK_SEQS`] seqs to send (unreliably) to its upstream, which answers from its
//! buffer ([`RetransmitBuffer::handle_nack`]).
//!
//! # Timing
//!
//! * A gap is NACKed first after a *reorder delay* `max(min_reorder_delay, srtt/4)`, so plain
//!   reordering costs nothing.
//! * A NACK for a still-missing seq is repeated every `max(min_repeat_interval, 5/4·srtt)`
//!   (a retransmission needs a round trip plus processing to come back).
//! * A seq is given up `deadline` after its gap was detected, or earlier when even a
//!   retransmission requested now (arriving about one srtt later) would miss that deadline.
//!   `deadline` is the latency budget still left at this hop (a client: its `--latency`; a relay:
//!   the budget minus what the path up to it already used).
//!
//! Multi-hop recovery needs no coordination: a relay that recovers a seq forwards it like any
//! new datagram ([`Arrival::is_new_data`]), which fills the downstream hops' gaps, whose NACKs
//! to this relay found nothing meanwhile.
//!
//! # Bounds
//!
//! The buffer holds at most `max_packets` datagrams no older than `max_age`, at most
//! `max_requesters_per_seq` requester records per datagram and `max_requesters` rate-limiting
//! buckets. The tracker keeps a received-bitmap of `reset_jump` bits (rounded up to 64) and at
//! most `max_missing` missing seqs. Nothing panics on any input (seqs near `u64::MAX`, NACKs for
//! anything, `Instant`s out of order).

use crate::id::NodeId;
use crate::map::Map;
use crate::wire::limits;
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// `now + d`, saturating at `now` if the sum is not representable.
fn add(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

// ---------------------------------------------------------------------------------------------
// Sender side
// ---------------------------------------------------------------------------------------------

/// Tuning of a [`RetransmitBuffer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetransmitConfig {
    /// Most datagrams held; the oldest inserted is evicted first. Default 2048 (≈ 8 s at
    /// 250 datagrams/s, so in practice `max_age` is the binding limit).
    pub max_packets: usize,
    /// Datagrams older than this (since insertion) are dropped. Default 1 s: far beyond any
    /// latency budget, so a NACK that could still help always finds its datagram.
    pub max_age: Duration,
    /// Times one seq is retransmitted to one requester over its life in the buffer. Default 8.
    pub max_per_requester: u32,
    /// Least time between two retransmissions of one seq to one requester (absorbs duplicate
    /// NACKs). Default 5 ms.
    pub min_interval: Duration,
    /// Retransmissions per second per requester (token bucket refill). Default 500 (2× a
    /// channel's rate): a NACK storm cannot make us send more than this to one requester.
    pub requester_rate: u32,
    /// A datagram inserted less than this long ago is not retransmitted: a NACK arriving that
    /// soon crossed the copy just sent downstream (typical when this hop has just recovered the
    /// datagram itself and forwarded it). Set it to about the RTT to the subscribers. Default
    /// 5 ms (a NACK for a datagram lost on the link itself arrives later than that: it needs a
    /// later datagram to reveal the gap, the reorder delay and a one-way trip).
    pub min_age: Duration,
    /// Token bucket depth per requester. Default 128 datagrams.
    pub requester_burst: u32,
    /// Requesters with a bucket; the least recently active is forgotten first. Default 256.
    pub max_requesters: usize,
    /// Requester records per datagram; NACKs from further requesters for that seq are refused.
    /// Default 64.
    pub max_requesters_per_seq: usize,
    /// An insert whose seq is this far above the newest or below the newest by this much means
    /// the source restarted: the buffer is cleared first. Default 4096.
    pub reset_jump: u64,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        RetransmitConfig {
            max_packets: 2048,
            max_age: Duration::from_secs(1),
            max_per_requester: 8,
            min_interval: Duration::from_millis(5),
            requester_rate: 500,
            min_age: Duration::from_millis(5),
            requester_burst: 128,
            max_requesters: 256,
            max_requesters_per_seq: 64,
            reset_jump: 4096,
        }
    }
}

/// Counters of a [`RetransmitBuffer`] (plus one gauge).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetransmitStats {
    /// Datagrams inserted.
    pub inserted: u64,
    /// Inserts ignored because the seq was already held.
    pub duplicate_inserts: u64,
    /// Datagrams evicted by `max_packets`.
    pub evicted_full: u64,
    /// Datagrams dropped by `max_age`.
    pub expired: u64,
    /// Times the buffer was cleared ([`RetransmitBuffer::clear`] or a seq jump).
    pub resets: u64,
    /// NACK messages handled.
    pub nacks: u64,
    /// Seqs requested (over all NACKs, at most [`limits::NACK_SEQS`] per NACK counted).
    pub requested: u64,
    /// Seqs found and returned for retransmission.
    pub hits: u64,
    /// Seqs requested that the buffer does not hold (never had, or dropped).
    pub misses: u64,
    /// Seqs held but refused by the rate limits.
    pub rate_limited: u64,
    /// Seqs held but refused because they were inserted less than `min_age` ago.
    pub too_fresh: u64,
    /// Gauge: datagrams held now.
    pub len: usize,
}

#[derive(Debug)]
struct Held {
    inserted_at: Instant,
    datagram: Bytes,
    /// (requester, retransmissions so far, last retransmission).
    sent_to: Vec<(NodeId, u32, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The sender-side buffer of one channel at one hop: what was sent recently, by seq, to answer
/// NACKs. See the [module docs](self).
#[derive(Debug)]
pub struct RetransmitBuffer {
    cfg: RetransmitConfig,
    held: Map<u64, Held>,
    /// Seqs in insertion order (the same set as `held`).
    order: VecDeque<u64>,
    newest: Option<u64>,
    buckets: Map<NodeId, Bucket>,
    stats: RetransmitStats,
}

impl RetransmitBuffer {
    /// An empty buffer; nonsensical values of `cfg` are repaired (no zero limits).
    pub fn new(mut cfg: RetransmitConfig) -> Self {
        cfg.max_packets = cfg.max_packets.max(1);
        cfg.max_requesters = cfg.max_requesters.max(1);
        cfg.max_requesters_per_seq = cfg.max_requesters_per_seq.max(1);
        cfg.reset_jump = cfg.reset_jump.max(1);
        RetransmitBuffer {
            cfg,
            held: Map::default(),
            order: VecDeque::new(),
            newest: None,
            buckets: Map::default(),
            stats: RetransmitStats::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RetransmitConfig {
        &self.cfg
    }

    /// Remembers `datagram` (the encoded datagram as sent downstream) under `seq`. A seq already
    /// held is ignored (the first copy is kept); a seq `reset_jump` or more away from the newest
    /// clears the buffer first (source restarted).
    pub fn insert(&mut self, now: Instant, seq: u64, datagram: Bytes) {
        self.expire(now);
        if let Some(newest) = self.newest {
            if seq.abs_diff(newest) >= self.cfg.reset_jump {
                self.clear();
            }
        }
        if self.held.contains_key(&seq) {
            self.stats.duplicate_inserts += 1;
            return;
        }
        while self.held.len() >= self.cfg.max_packets {
            match self.order.pop_front() {
                Some(old) => {
                    if self.held.remove(&old).is_some() {
                        self.stats.evicted_full += 1;
                    }
                }
                None => break,
            }
        }
        self.held.insert(
            seq,
            Held {
                inserted_at: now,
                datagram,
                sent_to: Vec::new(),
            },
        );
        self.order.push_back(seq);
        self.newest = Some(self.newest.map_or(seq, |n| n.max(seq)));
        self.stats.inserted += 1;
    }

    /// Drops everything held (e.g. when the tracker upstream reported [`Arrival::Reset`]).
    pub fn clear(&mut self) {
        self.held.clear();
        self.order.clear();
        self.newest = None;
        self.stats.resets += 1;
    }

    /// Drops datagrams older than `max_age`. Called by [`insert`](Self::insert) and
    /// [`handle_nack`](Self::handle_nack); call it when idle to free memory sooner.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&seq) = self.order.front() {
            let old = match self.held.get(&seq) {
                Some(h) => now.saturating_duration_since(h.inserted_at) >= self.cfg.max_age,
                None => true,
            };
            if !old {
                break;
            }
            self.order.pop_front();
            if self.held.remove(&seq).is_some() {
                self.stats.expired += 1;
            }
        }
    }

    /// Answers a NACK from `requester` (its header `sender`): returns `(seq, datagram)` for each
    /// requested seq still held and allowed by the rate limits, in request order. Only the
    /// first [`limits::NACK_SEQS`] seqs are considered. The caller sends the datagrams to the
    /// requester (flagged [`video_flags::RETRANSMIT`] by [`crate::wire::with_video_flag`]).
    pub fn handle_nack(
        &mut self,
        now: Instant,
        requester: NodeId,
        seqs: &[u64],
    ) -> Vec<(u64, Bytes)> {
        self.expire(now);
        self.stats.nacks += 1;
        let seqs = seqs.get(..limits::NACK_SEQS).unwrap_or(seqs);
        self.stats.requested += seqs.len() as u64;
        let mut out = Vec::new();
        let mut bucket = self.take_bucket(now, requester);
        for &seq in seqs {
            let Some(h) = self.held.get_mut(&seq) else {
                self.stats.misses += 1;
                continue;
            };
            if now.saturating_duration_since(h.inserted_at) < self.cfg.min_age {
                self.stats.too_fresh += 1;
                continue;
            }
            let rec = h.sent_to.iter().position(|(r, _, _)| *r == requester);
            let allowed_here = match rec {
                Some(i) => h.sent_to.get(i).is_some_and(|&(_, n, last)| {
                    n < self.cfg.max_per_requester
                        && now.saturating_duration_since(last) >= self.cfg.min_interval
                }),
                None => h.sent_to.len() < self.cfg.max_requesters_per_seq,
            };
            if !allowed_here || bucket.tokens < 1.0 {
                self.stats.rate_limited += 1;
                continue;
            }
            bucket.tokens -= 1.0;
            match rec.and_then(|i| h.sent_to.get_mut(i)) {
                Some(r) => {
                    r.1 = r.1.saturating_add(1);
                    r.2 = now;
                }
                None => h.sent_to.push((requester, 1, now)),
            }
            self.stats.hits += 1;
            out.push((seq, h.datagram.clone()));
        }
        self.buckets.insert(requester, bucket);
        out
    }

    /// The refilled bucket of `requester` (created full if unknown, forgetting the least
    /// recently active requester if there are too many).
    fn take_bucket(&mut self, now: Instant, requester: NodeId) -> Bucket {
        let burst = f64::from(self.cfg.requester_burst);
        match self.buckets.get(&requester).copied() {
            Some(b) => {
                let dt = now.saturating_duration_since(b.last).as_secs_f64();
                Bucket {
                    tokens: (b.tokens + dt * f64::from(self.cfg.requester_rate)).min(burst),
                    last: now.max(b.last),
                }
            }
            None => {
                if self.buckets.len() >= self.cfg.max_requesters {
                    let lru = self
                        .buckets
                        .iter()
                        .min_by_key(|(_, b)| b.last)
                        .map(|(k, _)| *k);
                    if let Some(k) = lru {
                        self.buckets.remove(&k);
                    }
                }
                Bucket {
                    tokens: burst,
                    last: now,
                }
            }
        }
    }

    /// Datagrams held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Counters so far.
    pub fn stats(&self) -> RetransmitStats {
        RetransmitStats {
            len: self.held.len(),
            ..self.stats
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver side
// ---------------------------------------------------------------------------------------------

/// Tuning of a [`NackTracker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackConfig {
    /// Latency budget left at this hop: a missing seq is NACKed until this long after its gap
    /// was detected, then given up. Default 200 ms (the client's default `--latency`).
    pub deadline: Duration,
    /// Lower bound of the reorder delay (`max(this, srtt/4)`) before a gap's first NACK.
    /// Default 5 ms.
    pub min_reorder_delay: Duration,
    /// Lower bound of the NACK repeat interval (`max(this, 5/4·srtt)`). Default 10 ms.
    pub min_repeat_interval: Duration,
    /// RTT to the upstream assumed until [`NackTracker::set_rtt`] is called. Default 20 ms.
    pub initial_rtt: Duration,
    /// A forward jump of this many seqs or more, or a backward one, resets the tracker instead
    /// of NACKing the gap (source restarted or changed). Also the size of the duplicate window.
    /// Default 4096; clamped to `[64, 1 << 20]`.
    pub reset_jump: u64,
    /// Most missing seqs tracked; past this the oldest are given up. Default 1024.
    pub max_missing: usize,
}

impl Default for NackConfig {
    fn default() -> Self {
        NackConfig {
            deadline: Duration::from_millis(200),
            min_reorder_delay: Duration::from_millis(5),
            min_repeat_interval: Duration::from_millis(10),
            initial_rtt: Duration::from_millis(20),
            reset_jump: 4096,
            max_missing: 1024,
        }
    }
}

/// What [`NackTracker::on_packet`] made of a received seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Not seen before: deliver / forward it.
    New,
    /// It filled a gap (a retransmission or a late original): deliver / forward it.
    Recovered,
    /// Already received: drop it.
    Duplicate,
    /// Not received before, but its gap was already given up (or it is older than the window):
    /// too late for this hop. A client drops it; a relay may drop it too.
    TooOld,
    /// A seq jump of `reset_jump` or more (either direction): the tracker restarted from this
    /// seq (source restarted or changed). Deliver / forward it, and clear the hop's
    /// [`RetransmitBuffer`] of the channel.
    Reset,
}

impl Arrival {
    /// True if the datagram carries data this hop did not have: deliver / forward it.
    pub fn is_new_data(self) -> bool {
        matches!(self, Arrival::New | Arrival::Recovered | Arrival::Reset)
    }
}

/// Counters of a [`NackTracker`] (plus one gauge).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NackStats {
    /// Seqs received for the first time in order or ahead ([`Arrival::New`], [`Arrival::Reset`]).
    pub received: u64,
    /// NACK batches returned by [`NackTracker::poll_nacks`].
    pub nacks_sent: u64,
    /// Seqs in those batches (a seq NACKed three times counts three).
    pub seqs_nacked: u64,
    /// Missing seqs that arrived in time ([`Arrival::Recovered`]).
    pub recovered: u64,
    /// Missing seqs given up (deadline passed, too many missing, or dropped by a reset).
    pub given_up: u64,
    /// Duplicates reported ([`Arrival::Duplicate`]).
    pub duplicates: u64,
    /// Late arrivals after give-up ([`Arrival::TooOld`]).
    pub too_old: u64,
    /// Resets ([`Arrival::Reset`]).
    pub resets: u64,
    /// Gauge: seqs missing now.
    pub missing: usize,
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    /// Gap detected at; given up at `detected + deadline`.
    detected: Instant,
    /// When to NACK next.
    next_nack: Instant,
}

/// The receiver side of one channel from one upstream: gap detection and NACK scheduling. See
/// the [module docs](self).
#[derive(Debug)]
pub struct NackTracker {
    cfg: NackConfig,
    srtt: Duration,
    /// Highest seq received, and the first seq after the last (re)start.
    highest: Option<(u64, u64)>,
    /// Received bitmap (ring) of the last `nbits` seqs up to `highest`.
    bits: Vec<u64>,
    missing: BTreeMap<u64, Missing>,
    stats: NackStats,
}

impl NackTracker {
    /// An empty tracker; nonsensical values of `cfg` are repaired.
    pub fn new(mut cfg: NackConfig) -> Self {
        cfg.reset_jump = cfg.reset_jump.clamp(64, 1 << 20);
        cfg.max_missing = cfg.max_missing.max(1);
        cfg.min_repeat_interval = cfg.min_repeat_interval.max(Duration::from_micros(100));
        let words = cfg.reset_jump.div_ceil(64) as usize;
        NackTracker {
            srtt: cfg.initial_rtt,
            cfg,
            highest: None,
            bits: vec![0; words],
            missing: BTreeMap::new(),
            stats: NackStats::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &NackConfig {
        &self.cfg
    }

    /// Sets the latency budget left at this hop (e.g. after the client's `--latency` or the
    /// path changed). Applies to gaps already tracked too.
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.cfg.deadline = deadline;
    }

    /// Feeds the smoothed RTT to the upstream (from the reliable layer).
    pub fn set_rtt(&mut self, srtt: Duration) {
        self.srtt = srtt;
    }

    /// The wait before a gap's first NACK: `max(min_reorder_delay, srtt/4)`.
    pub fn reorder_delay(&self) -> Duration {
        self.cfg.min_reorder_delay.max(self.srtt / 4)
    }

    /// The NACK repeat interval: `max(min_repeat_interval, 5/4·srtt)`.
    pub fn repeat_interval(&self) -> Duration {
        self.cfg
            .min_repeat_interval
            .max(self.srtt.saturating_add(self.srtt / 4))
    }

    fn nbits(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    fn slot(&self, seq: u64) -> (usize, u64) {
        let i = seq % self.nbits();
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn bit(&self, seq: u64) -> bool {
        let (w, m) = self.slot(seq);
        self.bits.get(w).is_some_and(|x| x & m != 0)
    }

    fn set_bit(&mut self, seq: u64, on: bool) {
        let (w, m) = self.slot(seq);
        if let Some(x) = self.bits.get_mut(w) {
            if on {
                *x |= m;
            } else {
                *x &= !m;
            }
        }
    }

    fn restart(&mut self, seq: u64) {
        self.stats.given_up += self.missing.len() as u64;
        self.missing.clear();
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.highest = Some((seq, seq));
        self.set_bit(seq, true);
    }

    /// Feeds the seq of a received video datagram (original or retransmission). See [`Arrival`]
    /// for what the caller does with it.
    pub fn on_packet(&mut self, now: Instant, seq: u64) -> Arrival {
        let Some((highest, start)) = self.highest else {
            self.restart(seq);
            self.stats.received += 1;
            return Arrival::New;
        };
        if seq > highest {
            let jump = seq - highest;
            if jump >= self.cfg.reset_jump {
                self.restart(seq);
                self.stats.resets += 1;
                self.stats.received += 1;
                return Arrival::Reset;
            }
            // Slide the window: forget the bits of seqs leaving it.
            for s in highest + 1..=seq {
                self.set_bit(s, false);
            }
            // Seqs that left the window can no longer be tracked.
            let floor = seq.saturating_sub(self.nbits() - 1);
            while let Some((&s, _)) = self.missing.first_key_value() {
                if s >= floor {
                    break;
                }
                self.missing.remove(&s);
                self.stats.given_up += 1;
            }
            // The gap (highest, seq), newest `max_missing` only.
            let gap = jump - 1;
            let keep = gap.min(self.cfg.max_missing as u64);
            self.stats.given_up += gap - keep;
            let first_nack = add(now, self.reorder_delay());
            for s in seq - keep..seq {
                self.missing.insert(
                    s,
                    Missing {
                        detected: now,
                        next_nack: first_nack,
                    },
                );
            }
            while self.missing.len() > self.cfg.max_missing {
                if self.missing.pop_first().is_some() {
                    self.stats.given_up += 1;
                }
            }
            self.set_bit(seq, true);
            self.highest = Some((seq, start));
            self.stats.received += 1;
            return Arrival::New;
        }
        let back = highest - seq;
        if back >= self.cfg.reset_jump {
            self.restart(seq);
            self.stats.resets += 1;
            self.stats.received += 1;
            return Arrival::Reset;
        }
        if self.bit(seq) {
            self.stats.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.set_bit(seq, true);
        if self.missing.remove(&seq).is_some() {
            self.stats.recovered += 1;
            return Arrival::Recovered;
        }
        if seq < start {
            // Older than the first seq since the (re)start (e.g. a GOP-cache burst that arrived
            // after live data): never missed, so new.
            self.stats.received += 1;
            return Arrival::New;
        }
        self.stats.too_old += 1;
        Arrival::TooOld
    }

    /// Gives up missing seqs whose retransmission could no longer arrive in time: those whose
    /// `detected + deadline` is at most `now + srtt`.
    fn give_up(&mut self, now: Instant) {
        let deadline = self.cfg.deadline;
        let horizon = add(now, self.srtt);
        let before = self.missing.len();
        self.missing
            .retain(|_, m| add(m.detected, deadline) > horizon);
        self.stats.given_up += (before - self.missing.len()) as u64;
    }

    /// The next NACK to send upstream, if one is due: up to [`limits::NACK_SEQS`] missing seqs
    /// (ascending). Call repeatedly until `None`. Seqs that can no longer arrive in time are
    /// given up first.
    pub fn poll_nacks(&mut self, now: Instant) -> Option<Vec<u64>> {
        self.give_up(now);
        let next = add(now, self.repeat_interval());
        let mut seqs = Vec::new();
        for (&s, m) in self.missing.iter_mut() {
            if m.next_nack <= now {
                m.next_nack = next;
                seqs.push(s);
                if seqs.len() == limits::NACK_SEQS {
                    break;
                }
            }
        }
        if seqs.is_empty() {
            return None;
        }
        self.stats.nacks_sent += 1;
        self.stats.seqs_nacked += seqs.len() as u64;
        Some(seqs)
    }

    /// When [`poll_nacks`](Self::poll_nacks) has something to do next (a NACK due or a seq to
    /// give up); `None` if nothing is missing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = self.cfg.deadline;
        self.missing
            .values()
            .map(|m| {
                let give_up = add(m.detected, deadline)
                    .checked_sub(self.srtt)
                    .unwrap_or(m.detected);
                m.next_nack.min(give_up)
            })
            .min()
    }

    /// Seqs missing now.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// The highest seq received since the last (re)start.
    pub fn highest(&self) -> Option<u64> {
        self.highest.map(|(h, _)| h)
    }

    /// Forgets everything (e.g. after unsubscribing); missing seqs count as given up.
    pub fn reset(&mut self) {
        self.stats.given_up += self.missing.len() as u64;
        self.missing.clear();
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.highest = None;
    }

    /// Counters so far.
    pub fn stats(&self) -> NackStats {
        NackStats {
            missing: self.missing.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::wire::{video_flags, Body, ChannelId, Datagram, VideoPacket};

    const MS: Duration = Duration::from_millis(1);

    fn tracker() -> NackTracker {
        let mut t = NackTracker::new(NackConfig::default());
        t.set_rtt(20 * MS);
        t
    }

    #[test]
    fn gap_nacked_after_reorder_delay_and_repeated_every_rtt() {
        let t0 = Instant::now();
        let mut t = tracker();
        assert_eq!(t.on_packet(t0, 10), Arrival::New);
        assert_eq!(t.on_packet(t0, 13), Arrival::New);
        assert_eq!(t.missing(), 2);
        assert_eq!(t.reorder_delay(), 5 * MS);
        assert_eq!(t.poll_nacks(t0 + 4 * MS), None);
        assert_eq!(t.poll_timeout(), Some(t0 + 5 * MS));
        assert_eq!(t.poll_nacks(t0 + 5 * MS), Some(vec![11, 12]));
        assert_eq!(t.poll_nacks(t0 + 5 * MS), None);
        // Repeated every 5/4 · 20 ms = 25 ms.
        assert_eq!(t.poll_timeout(), Some(t0 + 30 * MS));
        assert_eq!(t.poll_nacks(t0 + 29 * MS), None);
        assert_eq!(t.poll_nacks(t0 + 30 * MS), Some(vec![11, 12]));
        // One arrives (retransmission): recovered, no longer NACKed.
        assert_eq!(t.on_packet(t0 + 40 * MS, 12), Arrival::Recovered);
        assert_eq!(t.on_packet(t0 + 41 * MS, 12), Arrival::Duplicate);
        assert_eq!(t.poll_nacks(t0 + 55 * MS), Some(vec![11]));
        let s = t.stats();
        assert_eq!(
            (s.nacks_sent, s.seqs_nacked, s.recovered, s.duplicates),
            (3, 5, 1, 1)
        );
    }

    #[test]
    fn given_up_after_deadline() {
        let t0 = Instant::now();
        let mut t = tracker();
        t.on_packet(t0, 0);
        t.on_packet(t0, 2);
        let mut now = t0;
        let mut nacks = 0;
        while let Some(at) = t.poll_timeout() {
            now = at;
            while t.poll_nacks(now).is_some() {
                nacks += 1;
            }
        }
        // Given up once a retransmission could no longer arrive within 200 ms.
        assert!(
            now <= t0 + 200 * MS && now >= t0 + 170 * MS,
            "{:?}",
            now - t0
        );
        assert!((7..=9).contains(&nacks), "{nacks}");
        assert_eq!(t.stats().given_up, 1);
        assert_eq!(t.missing(), 0);
        // The original arrives late: not a duplicate, but too old; then a duplicate.
        assert_eq!(t.on_packet(now + MS, 1), Arrival::TooOld);
        assert_eq!(t.on_packet(now + MS, 1), Arrival::Duplicate);
    }

    #[test]
    fn reordering_within_reorder_delay_sends_no_nack() {
        let t0 = Instant::now();
        let mut t = tracker();
        for (i, s) in [0u64, 2, 1, 3, 5, 4, 6].into_iter().enumerate() {
            let a = t.on_packet(t0 + MS * i as u32 / 2, s);
            assert!(a.is_new_data());
        }
        assert_eq!(t.poll_nacks(t0 + 100 * MS), None);
        assert_eq!(t.stats().nacks_sent, 0);
        assert_eq!(t.stats().recovered, 2);
    }

    #[test]
    fn reset_on_huge_jump_either_way() {
        let t0 = Instant::now();
        let mut t = tracker();
        t.on_packet(t0, 100_000);
        t.on_packet(t0, 100_002);
        assert_eq!(t.on_packet(t0, 100_000 + 5000), Arrival::Reset);
        assert_eq!(t.missing(), 0);
        assert_eq!(t.poll_nacks(t0 + 10 * MS), None);
        // Server restart: back to 0.
        assert_eq!(t.on_packet(t0, 0), Arrival::Reset);
        assert_eq!(t.on_packet(t0, 1), Arrival::New);
        assert_eq!(t.stats().resets, 2);
        // A jump just below the window is a gap, capped at max_missing.
        assert_eq!(t.on_packet(t0, 4000), Arrival::New);
        assert_eq!(t.missing(), 1024);
        let mut batches = 0;
        while let Some(b) = t.poll_nacks(t0 + 10 * MS) {
            assert!(b.len() <= limits::NACK_SEQS);
            batches += 1;
        }
        assert_eq!(batches, 16);
    }

    #[test]
    fn older_than_start_is_new() {
        let t0 = Instant::now();
        let mut t = tracker();
        t.on_packet(t0, 50);
        assert_eq!(t.on_packet(t0, 40), Arrival::New);
        assert_eq!(t.on_packet(t0, 40), Arrival::Duplicate);
        assert_eq!(t.missing(), 0);
    }

    #[test]
    fn tracker_never_panics_and_stays_bounded() {
        let t0 = Instant::now();
        let mut rng = Rng::seeded(7);
        let mut t = NackTracker::new(NackConfig {
            max_missing: 100,
            ..NackConfig::default()
        });
        let mut now = t0;
        let mut base = 0u64;
        for i in 0..20_000u64 {
            now += Duration::from_micros(rng.below(3000));
            let seq = match rng.below(10) {
                0 => rng.next_u64(),
                1 => u64::MAX - rng.below(3),
                2 => base.wrapping_sub(rng.below(5000)),
                _ => base.wrapping_add(rng.below(200)),
            };
            base = base.max(seq.min(base + 300)).wrapping_add(i % 2);
            t.on_packet(now, seq);
            while let Some(b) = t.poll_nacks(now) {
                assert!(!b.is_empty() && b.len() <= limits::NACK_SEQS);
            }
            assert!(t.missing() <= 100);
        }
    }

    fn video(seq: u64) -> Bytes {
        Datagram::new(
            NodeId(1),
            Body::Video(VideoPacket {
                channel: ChannelId(9),
                seq,
                flags: 0,
                payload: Bytes::from_static(&[0x47; 188]),
            }),
        )
        .encode()
        .unwrap_or_default()
    }

    #[test]
    fn buffer_answers_what_it_has_and_counts() {
        let t0 = Instant::now();
        let mut b = RetransmitBuffer::new(RetransmitConfig::default());
        for s in 0..10 {
            b.insert(t0, s, video(s));
        }
        let got = b.handle_nack(t0 + 10 * MS, NodeId(2), &[3, 5, 42]);
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(got[0].1, video(3));
        let s = b.stats();
        assert_eq!((s.hits, s.misses, s.requested, s.nacks), (2, 1, 3, 1));
        // Marked as a retransmission.
        let m =
            crate::wire::with_video_flag(&got[0].1, video_flags::RETRANSMIT).unwrap_or_default();
        match Datagram::decode(&m).map(|d| d.body) {
            Ok(Body::Video(v)) => assert_eq!((v.seq, v.flags), (3, video_flags::RETRANSMIT)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            crate::wire::with_video_flag(b"garbage", video_flags::RETRANSMIT),
            None
        );
        // A NACK that crossed the copy just sent (inserted < min_age ago) is not answered.
        b.insert(t0 + 10 * MS, 10, video(10));
        assert!(b.handle_nack(t0 + 12 * MS, NodeId(2), &[10]).is_empty());
        assert_eq!(b.stats().too_fresh, 1);
        assert_eq!(b.handle_nack(t0 + 15 * MS, NodeId(2), &[10]).len(), 1);
    }

    #[test]
    fn buffer_bounded_by_count_and_age() {
        let t0 = Instant::now();
        let mut b = RetransmitBuffer::new(RetransmitConfig {
            max_packets: 100,
            ..RetransmitConfig::default()
        });
        for s in 0..250u64 {
            b.insert(t0 + MS * s as u32, s, video(s));
        }
        assert_eq!(b.len(), 100);
        assert_eq!(b.stats().evicted_full, 150);
        assert!(b.handle_nack(t0 + 250 * MS, NodeId(2), &[149]).is_empty());
        assert_eq!(b.handle_nack(t0 + 250 * MS, NodeId(2), &[150]).len(), 1);
        // 1 s after the last insert, everything has aged out.
        b.expire(t0 + 1250 * MS);
        assert!(b.is_empty());
        assert_eq!(b.stats().expired, 100);
        // A huge seq jump clears.
        b.insert(t0 + 1300 * MS, 1, video(1));
        b.insert(t0 + 1300 * MS, 100_000, video(1));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn nack_storm_does_not_amplify() {
        let t0 = Instant::now();
        let cfg = RetransmitConfig::default();
        let mut b = RetransmitBuffer::new(cfg.clone());
        for s in 0..64 {
            b.insert(t0, s, video(s));
        }
        let all: Vec<u64> = (0..64).collect();
        // The same NACK 1000 times within 1 ms: each seq once (min_interval).
        let mut sent = 0;
        for i in 0..1000u32 {
            sent += b
                .handle_nack(
                    t0 + 10 * MS + Duration::from_micros(i.into()),
                    NodeId(2),
                    &all,
                )
                .len();
        }
        assert_eq!(sent, 64);
        // Over the datagrams' whole life: at most max_per_requester each.
        for i in 0..1000u32 {
            sent += b.handle_nack(t0 + MS * i, NodeId(2), &all).len();
        }
        assert!(sent <= 64 * cfg.max_per_requester as usize, "{sent}");
        // The token bucket caps a requester's rate whatever it asks for.
        let mut b = RetransmitBuffer::new(cfg.clone());
        for s in 0..2048 {
            b.insert(t0, s, video(s));
        }
        let mut sent = 0;
        for i in 0..32u64 {
            let seqs: Vec<u64> = (i * 64..i * 64 + 64).collect();
            sent += b.handle_nack(t0 + 10 * MS, NodeId(3), &seqs).len();
        }
        assert_eq!(sent, cfg.requester_burst as usize);
        // Another requester has its own budget; the requester table is bounded.
        assert_eq!(b.handle_nack(t0 + 10 * MS, NodeId(4), &[5]).len(), 1);
        for r in 0..1000 {
            b.handle_nack(t0 + 10 * MS, NodeId(100 + r), &[]);
        }
        assert!(b.buckets.len() <= cfg.max_requesters);
        // Oversized NACKs are truncated.
        let many: Vec<u64> = (0..1000).collect();
        b.handle_nack(t0 + 20 * MS, NodeId(5), &many);
        assert_eq!(b.stats().requested, 64 * 32 + 1 + 64);
    }
}

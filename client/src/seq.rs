//! Per-stream sequence tracking: duplicate suppression over a small window and loss counting by
//! sequence gaps. I/O-free.
//!
//! `seq` is assigned by the origin server and kept end to end, so a gap is a loss somewhere on
//! the path. A packet that fills a gap later (reordering) is delivered and un-counts its loss.
//! Another replica (after a source change) or a restarted server numbers packets in an unrelated
//! space: the caller [`reset`](SeqTracker::reset)s on a source change, and the tracker resets by
//! itself on an implausibly large forward jump or on a run of packets far behind its window.

/// How many sequence numbers behind the highest one are remembered (duplicates older than this
/// cannot be recognised and are dropped as too old).
pub const WINDOW: u64 = 128;
/// A forward jump larger than this is not counted as loss: the sequence space changed.
pub const RESET_JUMP: u64 = 1 << 20;
/// This many consecutive packets older than the window mean the sequence restarted.
pub const RESET_STREAK: u32 = 16;

/// What [`SeqTracker::push`] made of a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The next one, or later (`gap` numbers were skipped and counted as lost).
    New {
        /// Sequence numbers skipped before this one.
        gap: u64,
    },
    /// Within the window, not seen before: fills an earlier gap (its loss is un-counted).
    Late,
    /// Already seen: drop it.
    Duplicate,
    /// Older than the window: cannot tell a duplicate from a very late packet; dropped.
    TooOld,
    /// First packet, or the sequence space changed (see the module doc): tracking restarted.
    Start,
}

impl SeqVerdict {
    /// Whether the packet should be delivered.
    pub fn accept(self) -> bool {
        matches!(
            self,
            SeqVerdict::New { .. } | SeqVerdict::Late | SeqVerdict::Start
        )
    }
}

/// Duplicate window and loss counter of one stream.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Highest sequence number seen.
    max: Option<u64>,
    /// Bit `i` set: `max - i` was received (bit 0 is `max` itself).
    seen: u128,
    old_streak: u32,
    lost: u64,
    duplicates: u64,
    too_old: u64,
    resets: u64,
}

impl SeqTracker {
    /// A tracker that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the sequence space (counters are kept): the next packet is a [`SeqVerdict::Start`].
    pub fn reset(&mut self) {
        self.max = None;
        self.seen = 0;
        self.old_streak = 0;
    }

    /// Whether `seq` is older than the duplicate window (a [`push`](Self::push) would call it
    /// [`SeqVerdict::TooOld`], or restart on a run of them). Nothing is changed.
    pub fn is_behind_window(&self, seq: u64) -> bool {
        self.max.is_some_and(|m| seq < m && m - seq >= WINDOW)
    }

    /// Checks one received sequence number.
    pub fn push(&mut self, seq: u64) -> SeqVerdict {
        let Some(max) = self.max else {
            return self.start(seq);
        };
        if seq > max {
            let gap = seq - max - 1;
            if gap > RESET_JUMP {
                self.resets += 1;
                return self.start(seq);
            }
            let shift = seq - max;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.max = Some(seq);
            self.lost += gap;
            self.old_streak = 0;
            return SeqVerdict::New { gap };
        }
        let back = max - seq;
        if back < WINDOW {
            self.old_streak = 0;
            let bit = 1u128 << back;
            if self.seen & bit != 0 {
                self.duplicates += 1;
                SeqVerdict::Duplicate
            } else {
                self.seen |= bit;
                self.lost = self.lost.saturating_sub(1);
                SeqVerdict::Late
            }
        } else {
            self.old_streak += 1;
            if self.old_streak >= RESET_STREAK {
                self.resets += 1;
                return self.start(seq);
            }
            self.too_old += 1;
            SeqVerdict::TooOld
        }
    }

    fn start(&mut self, seq: u64) -> SeqVerdict {
        self.max = Some(seq);
        self.seen = 1;
        self.old_streak = 0;
        SeqVerdict::Start
    }

    /// Sequence numbers missing so far (gaps not filled by late packets).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Duplicates dropped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Packets dropped for being older than the window.
    pub fn too_old(&self) -> u64 {
        self.too_old
    }

    /// Times the tracker restarted by itself (sequence space change).
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_loss() {
        let mut t = SeqTracker::new();
        assert_eq!(t.push(10), SeqVerdict::Start);
        for s in 11..500 {
            assert_eq!(t.push(s), SeqVerdict::New { gap: 0 });
        }
        assert_eq!(t.lost(), 0);
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut t = SeqTracker::new();
        for s in 0..10 {
            assert!(t.push(s).accept());
        }
        assert_eq!(t.push(9), SeqVerdict::Duplicate);
        assert_eq!(t.push(3), SeqVerdict::Duplicate);
        assert!(!t.push(3).accept());
        assert_eq!(t.duplicates(), 3);
        assert_eq!(t.lost(), 0);
    }

    #[test]
    fn gaps_count_as_loss_and_late_packets_uncount() {
        let mut t = SeqTracker::new();
        t.push(0);
        assert_eq!(t.push(5), SeqVerdict::New { gap: 4 });
        assert_eq!(t.lost(), 4);
        assert_eq!(t.push(2), SeqVerdict::Late);
        assert_eq!(t.lost(), 3);
        assert_eq!(t.push(2), SeqVerdict::Duplicate);
        assert_eq!(t.lost(), 3);
        // A jump past the whole window.
        assert_eq!(t.push(1000), SeqVerdict::New { gap: 994 });
        assert_eq!(t.lost(), 997);
        assert_eq!(t.push(999), SeqVerdict::Late);
    }

    #[test]
    fn too_old_then_restart() {
        let mut t = SeqTracker::new();
        t.push(10_000);
        assert_eq!(t.push(10_000 - WINDOW), SeqVerdict::TooOld);
        // A restarted server: a run of small numbers resets the tracker (the push above was
        // the first of the streak).
        for s in 0..RESET_STREAK as u64 - 2 {
            assert_eq!(t.push(s), SeqVerdict::TooOld);
        }
        assert_eq!(t.push(100), SeqVerdict::Start);
        assert_eq!(t.push(101), SeqVerdict::New { gap: 0 });
        assert_eq!(t.resets(), 1);
    }

    #[test]
    fn huge_forward_jump_is_a_new_space_not_loss() {
        let mut t = SeqTracker::new();
        t.push(5);
        assert_eq!(t.push(5 + RESET_JUMP + 10), SeqVerdict::Start);
        assert_eq!(t.lost(), 0);
    }

    #[test]
    fn reset_keeps_counters() {
        let mut t = SeqTracker::new();
        t.push(0);
        t.push(3);
        t.reset();
        assert_eq!(t.push(77), SeqVerdict::Start);
        assert_eq!(t.lost(), 2);
    }
}

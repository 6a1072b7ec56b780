//! Anti-replay window of a session's receive direction (RFC 6479: a ring of 64-bit words, so
//! moving the window costs clearing the words it passes, never shifting a bitmap).
//!
//! A counter is accepted once, and only if it is newer than everything seen or at most
//! [`WINDOW`] below the newest. [`ReplayWindow::check`] answers without changing anything (it
//! runs before the AEAD tag is verified); [`ReplayWindow::update`] records the counter, and is
//! only called once the tag has verified, so forged datagrams never move the window.

/// Counters accepted below the newest one seen (UDP reordering tolerated).
pub const WINDOW: u64 = 2048;
const WORD: u64 = 64;
/// One word more than the window, so the word being filled never overlaps the oldest one.
const WORDS: usize = (WINDOW / WORD) as usize + 1;
const RING: u64 = WORDS as u64 * WORD;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One more than the newest counter accepted (0: none yet).
    next: u64,
    ring: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            ring: [0; WORDS],
        }
    }
}

fn slot(c: u64) -> (usize, u64) {
    (((c % RING) / WORD) as usize, 1u64 << (c % WORD))
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `counter` would be accepted (not seen, not too old). Changes nothing.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - 1 - counter > WINDOW {
            return false;
        }
        let (w, bit) = slot(counter);
        self.ring[w] & bit == 0
    }

    /// Records `counter` (call after the datagram authenticated); false if it was a replay or
    /// too old (nothing recorded).
    pub fn update(&mut self, counter: u64) -> bool {
        if counter == u64::MAX || !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear the words after the old newest's, up to `counter`'s (they held counters
            // now outside the window).
            let from = self.next.saturating_sub(1) / WORD;
            let to = counter / WORD;
            if self.next == 0 || to - from >= WORDS as u64 {
                self.ring = [0; WORDS];
            } else {
                for word in from + 1..=to {
                    self.ring[(word % WORDS as u64) as usize] = 0;
                }
            }
            self.next = counter + 1;
        }
        let (w, bit) = slot(counter);
        self.ring[w] |= bit;
        true
    }

    /// One more than the newest counter accepted.
    pub fn next(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn accepts_once_in_any_order_within_the_window() {
        let mut w = ReplayWindow::new();
        assert!(w.update(0));
        assert!(!w.update(0));
        assert!(w.update(5));
        assert!(w.update(3));
        assert!(!w.update(3));
        assert!(w.update(5000));
        assert!(!w.check(5000 - WINDOW - 1), "too old");
        assert!(w.check(5000 - WINDOW));
        assert!(w.update(5000 - WINDOW));
        assert!(!w.update(5000 - WINDOW));
        assert!(w.update(u64::MAX - 1));
        assert!(!w.update(5001));
    }

    proptest! {
        /// The window agrees with the obvious model: accepted iff never accepted before and at
        /// most WINDOW below the newest accepted.
        #[test]
        fn matches_the_model(steps in prop::collection::vec((0u64..3, 0u64..6000), 0..2000)) {
            let mut w = ReplayWindow::new();
            let mut seen: HashSet<u64> = HashSet::new();
            let mut newest: Option<u64> = None;
            for (kind, x) in steps {
                // Mostly near the newest (reordering), sometimes far.
                let c = match (kind, newest) {
                    (0, Some(n)) => n.saturating_sub(x % (WINDOW + 200)),
                    (1, Some(n)) => n + x % 100,
                    _ => x,
                };
                let fresh = !seen.contains(&c) && newest.is_none_or(|n| c + WINDOW >= n);
                prop_assert_eq!(w.check(c), fresh, "check {}", c);
                prop_assert_eq!(w.update(c), fresh, "update {}", c);
                if fresh {
                    seen.insert(c);
                    newest = Some(newest.map_or(c, |n| n.max(c)));
                }
            }
        }
    }
}

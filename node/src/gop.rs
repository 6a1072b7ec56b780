//! The GOP cache ("instant start"), I/O-free: per channel, the encoded video datagrams a relay
//! sent since the last one flagged [`video_flags::KEYFRAME`], i.e. the current group of
//! pictures including the PAT/PMT that the server puts at the start of every keyframe datagram.
//!
//! A new subscriber of a channel that is already flowing is first sent this cache (a *burst*,
//! each datagram flagged [`video_flags::FROM_CACHE`]) and then the live datagrams, so its
//! player starts decoding at once instead of waiting up to a GOP for the next keyframe. The
//! relay engine owns the cache and sends the burst in the same task turn as it handles the
//! `Subscribe`, so no live datagram can come between (no gap, no duplicate).
//!
//! Entries are the `Bytes` exactly as they were sent to live subscribers (no re-encoding on the
//! data path); the flagged copies of a burst are made once per cached datagram per burst by
//! [`common::wire::with_video_flag`] (a copy with the flags byte changed, not a re-encoding).
//!
//! Bounded: at most [`GopConfig::max_bytes`] and [`GopConfig::max_datagrams`] per channel. A
//! GOP that outgrows either is dropped whole (a burst that does not start at a keyframe is
//! worthless) and caching resumes at the next keyframe; each such drop is counted as an
//! overflow. A cache not fed for [`GopConfig::max_age`] is stale (the stream stalled) and is
//! not sent.
//!
//! Every decision about time uses the `Instant` passed in.

use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bounds of a [`GopCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GopConfig {
    /// Bytes (encoded datagrams) kept per channel. Default 4 MiB (a 2 s GOP at 16 Mb/s).
    pub max_bytes: usize,
    /// Datagrams kept per channel. Default 4096.
    pub max_datagrams: usize,
    /// A cache not fed for this long is not sent (its stream has stalled; the burst would be
    /// followed by a jump). Default 2 s.
    pub max_age: Duration,
}

impl Default for GopConfig {
    fn default() -> Self {
        GopConfig {
            max_bytes: 4 * 1024 * 1024,
            max_datagrams: 4096,
            max_age: Duration::from_secs(2),
        }
    }
}

/// What [`GopCache::push`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Kept (part of the current GOP).
    Cached,
    /// Not kept: no keyframe seen since the start or since the last overflow.
    WaitingForKeyframe,
    /// The GOP outgrew the bounds: the cache was emptied until the next keyframe.
    Overflow,
}

/// The GOP cache of one channel.
#[derive(Debug, Clone)]
pub struct GopCache {
    cfg: GopConfig,
    /// `(seq, datagram)` from the last keyframe on, oldest first.
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// `entries` starts at a keyframe (false before the first one and after an overflow).
    open: bool,
    /// Newest sequence number pushed (kept across overflows).
    newest: Option<u64>,
    last_push: Option<Instant>,
    overflows: u64,
}

impl GopCache {
    /// An empty cache.
    pub fn new(cfg: GopConfig) -> GopCache {
        GopCache {
            cfg,
            entries: VecDeque::new(),
            bytes: 0,
            open: false,
            newest: None,
            last_push: None,
            overflows: 0,
        }
    }

    /// Records a datagram as it was sent (`seq` and `keyframe` from its header). A keyframe
    /// starts a new GOP: the previous one is forgotten.
    pub fn push(&mut self, now: Instant, seq: u64, keyframe: bool, datagram: Bytes) -> Pushed {
        self.newest = Some(seq);
        self.last_push = Some(now);
        if keyframe {
            self.clear_entries();
            self.open = true;
        }
        if !self.open {
            return Pushed::WaitingForKeyframe;
        }
        if self.entries.len() >= self.cfg.max_datagrams
            || self.bytes.saturating_add(datagram.len()) > self.cfg.max_bytes
        {
            self.clear_entries();
            self.open = false;
            self.overflows += 1;
            return Pushed::Overflow;
        }
        self.bytes += datagram.len();
        self.entries.push_back((seq, datagram));
        Pushed::Cached
    }

    /// The datagrams to send a new subscriber at `now`, oldest (the keyframe) first; empty if
    /// there is no complete GOP start or the cache is stale.
    pub fn burst(&self, now: Instant) -> impl ExactSizeIterator<Item = &Bytes> + '_ {
        let fresh = self
            .last_push
            .is_some_and(|l| now.saturating_duration_since(l) <= self.cfg.max_age);
        let n = if self.open && fresh {
            self.entries.len()
        } else {
            0
        };
        self.entries.iter().take(n).map(|(_, b)| b)
    }

    /// True if a datagram `seq` that came from an upstream's cache is not newer than what we
    /// already have (e.g. the burst of a new upstream after a switch): it must be dropped.
    pub fn is_behind(&self, seq: u64) -> bool {
        self.newest.is_some_and(|n| seq <= n)
    }

    /// Sequence numbers of the cached datagrams, oldest first.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|(s, _)| *s)
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// GOPs dropped for outgrowing the bounds.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    fn clear_entries(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::wire::{video_flags, Body, Datagram, VideoPacket};
    use common::NodeId;

    fn dg(seq: u64, keyframe: bool, len: usize) -> Bytes {
        Datagram::new(
            NodeId(7),
            Body::Video(VideoPacket {
                channel: common::wire::ChannelId::of_name("c"),
                seq,
                flags: if keyframe { video_flags::KEYFRAME } else { 0 },
                payload: Bytes::from(vec![0x47; len]),
            }),
        )
        .encode()
        .unwrap()
    }

    fn cfg() -> GopConfig {
        GopConfig {
            max_bytes: 100_000,
            max_datagrams: 10,
            max_age: Duration::from_secs(2),
        }
    }

    #[test]
    fn keeps_from_the_last_keyframe_on() {
        let t = Instant::now();
        let mut c = GopCache::new(cfg());
        assert_eq!(
            c.push(t, 0, false, dg(0, false, 10)),
            Pushed::WaitingForKeyframe
        );
        assert_eq!(c.burst(t).len(), 0);
        for s in 1..5 {
            assert_eq!(c.push(t, s, s == 1, dg(s, s == 1, 10)), Pushed::Cached);
        }
        assert_eq!(c.seqs().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        // The next keyframe cuts: the old GOP is gone.
        c.push(t, 5, true, dg(5, true, 10));
        c.push(t, 6, false, dg(6, false, 10));
        assert_eq!(c.seqs().collect::<Vec<_>>(), vec![5, 6]);
        let burst: Vec<&Bytes> = c.burst(t).collect();
        assert_eq!(burst.len(), 2);
        assert_eq!(*burst[0], dg(5, true, 10), "the same bytes as sent");
        assert_eq!(c.bytes(), burst.iter().map(|b| b.len()).sum::<usize>());
    }

    #[test]
    fn bounded_by_count_then_waits_for_the_next_keyframe() {
        let t = Instant::now();
        let mut c = GopCache::new(cfg());
        for s in 0..10 {
            assert_eq!(c.push(t, s, s == 0, dg(s, s == 0, 10)), Pushed::Cached);
        }
        assert_eq!(c.push(t, 10, false, dg(10, false, 10)), Pushed::Overflow);
        assert_eq!((c.len(), c.bytes(), c.overflows()), (0, 0, 1));
        assert_eq!(
            c.push(t, 11, false, dg(11, false, 10)),
            Pushed::WaitingForKeyframe
        );
        assert_eq!(c.burst(t).len(), 0);
        assert_eq!(c.push(t, 12, true, dg(12, true, 10)), Pushed::Cached);
        assert_eq!(c.seqs().collect::<Vec<_>>(), vec![12]);
        assert_eq!(c.overflows(), 1);
    }

    #[test]
    fn bounded_by_bytes() {
        let t = Instant::now();
        let mut c = GopCache::new(GopConfig {
            max_bytes: 3000,
            ..cfg()
        });
        assert_eq!(c.push(t, 0, true, dg(0, true, 1316)), Pushed::Cached);
        assert_eq!(c.push(t, 1, false, dg(1, false, 1316)), Pushed::Cached);
        assert!(c.bytes() <= 3000);
        assert_eq!(c.push(t, 2, false, dg(2, false, 1316)), Pushed::Overflow);
        assert_eq!(c.bytes(), 0);
        // A keyframe larger than the whole cache is never kept.
        let mut tiny = GopCache::new(GopConfig {
            max_bytes: 100,
            ..cfg()
        });
        assert_eq!(tiny.push(t, 0, true, dg(0, true, 1316)), Pushed::Overflow);
        assert_eq!(tiny.burst(t).len(), 0);
    }

    #[test]
    fn a_stale_cache_is_not_sent() {
        let t = Instant::now();
        let mut c = GopCache::new(cfg());
        c.push(t, 0, true, dg(0, true, 10));
        assert_eq!(c.burst(t + Duration::from_secs(2)).len(), 1);
        assert_eq!(c.burst(t + Duration::from_millis(2001)).len(), 0);
    }

    #[test]
    fn older_cached_datagrams_are_behind() {
        let t = Instant::now();
        let mut c = GopCache::new(cfg());
        assert!(!c.is_behind(0));
        c.push(t, 40, true, dg(40, true, 10));
        assert!(c.is_behind(40) && c.is_behind(3));
        assert!(!c.is_behind(41));
        // Kept across an overflow.
        for s in 41..60 {
            c.push(t, s, false, dg(s, false, 10));
        }
        assert!(c.is_behind(59) && !c.is_behind(60));
    }

    #[test]
    fn flagging_keeps_everything_else() {
        let src = dg(9, true, 1316);
        let flagged = common::wire::with_video_flag(&src, video_flags::FROM_CACHE).unwrap();
        let d = Datagram::decode(&flagged).unwrap();
        assert_eq!(d.header.sender, NodeId(7));
        match d.body {
            Body::Video(p) => {
                assert_eq!(p.flags, video_flags::KEYFRAME | video_flags::FROM_CACHE);
                assert_eq!((p.seq, p.payload.len()), (9, 1316));
            }
            other => panic!("{other:?}"),
        }
        let not_video = Datagram::new(
            NodeId(1),
            Body::Unreliable(common::wire::Message::Ping { nonce: 1 }),
        )
        .encode()
        .unwrap();
        assert!(common::wire::with_video_flag(&not_video, video_flags::FROM_CACHE).is_none());
    }
}

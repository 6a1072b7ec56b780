//! [`Feed`]: where one stream comes from — what the relay (a channel's upstream neighbours) and
//! the client (a stream's PoPs) share. A feed has a *primary* upstream and, with redundancy 2, a
//! *secondary* one on another path; both send the same datagrams (same origin, same `seq`),
//! merged by sequence number downstream of the feed. The feed keeps, per upstream, when it was
//! (re)subscribed, its last datagram and the last `seq` merged from it, and decides:
//!
//! * which role a datagram's sender plays ([`Feed::on_video`]), and whether its numbering
//!   contradicts the primary's (a *mismatched* secondary: another origin, e.g. a server
//!   replica, not merged while the primary delivers);
//! * promotion: when the primary is removed ([`Feed::remove`]), the secondary becomes the
//!   primary, already flowing, with no new subscription;
//! * stalls: an upstream that has sent nothing for the stall period since its last datagram or
//!   (re)subscription is due a new `Subscribe` ([`Feed::next_stall`], [`Feed::poll_stalled`]);
//! * which upstreams *feed* (sent video since subscribed): their liveness is watched with fast
//!   heartbeats by the owner's failure detector ([`Feed::feeds`]).
//!
//! I/O-free and clock-free: every call that needs the time takes `now`. `P` is how the owner
//! names a peer (a `PeerId` at the relay, a PoP's address at the client).

use std::time::{Duration, Instant};

/// A secondary's datagram this far (in `seq`) from the primary's latest merged one is numbered
/// by another origin: not merged while the primary delivers (see [`MISMATCH_HOLD`]).
pub const MISMATCH_SEQS: u64 = 2048;
/// ...that is, while the primary's latest merged datagram is younger than this.
pub const MISMATCH_HOLD: Duration = Duration::from_secs(1);

/// The role of an upstream in a [`Feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The upstream in use (NACKs go to it).
    Primary,
    /// The redundant one, on another path.
    Secondary,
}

/// One upstream of a [`Feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream<P> {
    /// Who it is.
    pub peer: P,
    /// When it was last asked for the stream (`Subscribe`).
    pub subscribed: Instant,
    /// Its last datagram of the stream.
    pub last_video: Option<Instant>,
    /// The last of its datagrams merged: (seq, arrival).
    pub merged: Option<(u64, Instant)>,
    /// Its latest datagram was numbered unlike the primary's (another origin).
    pub mismatched: bool,
}

impl<P> Upstream<P> {
    fn new(peer: P, now: Instant) -> Upstream<P> {
        Upstream {
            peer,
            subscribed: now,
            last_video: None,
            merged: None,
            mismatched: false,
        }
    }

    /// Its latest sign of life for this stream: a datagram, or our latest `Subscribe`.
    pub fn last_activity(&self) -> Instant {
        self.last_video
            .map_or(self.subscribed, |v| v.max(self.subscribed))
    }

    /// It has sent video since it was subscribed.
    pub fn fed(&self) -> bool {
        self.last_video.is_some()
    }
}

/// What [`Feed::on_video`] says of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Its sender's role.
    pub role: Role,
    /// Numbered by another origin than the primary's: not to be merged.
    pub mismatched: bool,
}

/// The upstreams of one stream (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed<P> {
    primary: Option<Upstream<P>>,
    secondary: Option<Upstream<P>>,
}

impl<P> Default for Feed<P> {
    fn default() -> Self {
        Feed {
            primary: None,
            secondary: None,
        }
    }
}

impl<P: Copy + Eq> Feed<P> {
    /// A feed with no upstream.
    pub fn new() -> Feed<P> {
        Feed::default()
    }

    /// The primary upstream.
    pub fn primary(&self) -> Option<&Upstream<P>> {
        self.primary.as_ref()
    }

    /// The secondary upstream.
    pub fn secondary(&self) -> Option<&Upstream<P>> {
        self.secondary.as_ref()
    }

    /// Every upstream, the primary first.
    pub fn upstreams(&self) -> impl Iterator<Item = &Upstream<P>> {
        self.primary.iter().chain(self.secondary.iter())
    }

    /// Every upstream's peer, the primary first.
    pub fn peers(&self) -> Vec<P> {
        self.upstreams().map(|u| u.peer).collect()
    }

    /// How many upstreams it has (0, 1 or 2).
    pub fn len(&self) -> usize {
        self.upstreams().count()
    }

    /// It has no upstream.
    pub fn is_empty(&self) -> bool {
        self.primary.is_none() && self.secondary.is_none()
    }

    /// The role of `peer`, if it is an upstream.
    pub fn role(&self, peer: P) -> Option<Role> {
        if self.primary.is_some_and(|u| u.peer == peer) {
            Some(Role::Primary)
        } else if self.secondary.is_some_and(|u| u.peer == peer) {
            Some(Role::Secondary)
        } else {
            None
        }
    }

    /// `peer` is an upstream.
    pub fn has(&self, peer: P) -> bool {
        self.role(peer).is_some()
    }

    /// `peer` is an upstream and has sent video since subscribed (watched with fast
    /// heartbeats).
    pub fn feeds(&self, peer: P) -> bool {
        self.upstreams().any(|u| u.peer == peer && u.fed())
    }

    /// `peer`, just subscribed at, becomes the primary, afresh (a former primary is dropped; a
    /// secondary that is `peer` is taken over with its state).
    pub fn set_primary(&mut self, peer: P, now: Instant) {
        if self.secondary.is_some_and(|u| u.peer == peer) {
            self.primary = self.secondary.take();
            return;
        }
        self.primary = Some(Upstream::new(peer, now));
    }

    /// `peer`, just subscribed at, becomes the secondary (replacing any).
    pub fn set_secondary(&mut self, peer: P, now: Instant) {
        self.secondary = Some(Upstream::new(peer, now));
    }

    /// Adds `peer`, just subscribed at: the primary if there is none, else the secondary.
    pub fn add(&mut self, peer: P, now: Instant) {
        if self.primary.is_none() {
            self.set_primary(peer, now);
        } else {
            self.set_secondary(peer, now);
        }
    }

    /// The secondary becomes the primary and the primary, if `keep`, the secondary (the two
    /// swap roles); returns the new primary.
    pub fn promote(&mut self, keep: bool) -> Option<&Upstream<P>> {
        let old = self.primary.take();
        self.primary = self.secondary.take();
        if keep {
            self.secondary = old;
        }
        self.primary.as_ref()
    }

    /// Removes `peer`; if it was the primary, the secondary is promoted. Returns its role.
    pub fn remove(&mut self, peer: P) -> Option<Upstream<P>> {
        match self.role(peer)? {
            Role::Primary => {
                let old = self.primary.take();
                self.primary = self.secondary.take();
                old
            }
            Role::Secondary => self.secondary.take(),
        }
    }

    /// Removes the secondary.
    pub fn clear_secondary(&mut self) -> Option<Upstream<P>> {
        self.secondary.take()
    }

    /// Removes every upstream.
    pub fn clear(&mut self) {
        self.primary = None;
        self.secondary = None;
    }

    fn get_mut(&mut self, peer: P) -> Option<&mut Upstream<P>> {
        self.primary
            .as_mut()
            .filter(|u| u.peer == peer)
            .or(self.secondary.as_mut().filter(|u| u.peer == peer))
    }

    /// A datagram numbered `seq` from `peer` at `now`: `None` if `peer` is no upstream; else
    /// its role, and whether its numbering contradicts the primary's (then it is not merged;
    /// see [`MISMATCH_SEQS`]).
    pub fn on_video(&mut self, now: Instant, peer: P, seq: u64) -> Option<Verdict> {
        let role = self.role(peer)?;
        let mismatched = role == Role::Secondary
            && self.primary.and_then(|p| p.merged).is_some_and(|(q, at)| {
                q.abs_diff(seq) > MISMATCH_SEQS && now.saturating_duration_since(at) < MISMATCH_HOLD
            });
        let u = self.get_mut(peer).expect("role found");
        u.last_video = Some(now);
        u.mismatched = mismatched;
        if !mismatched {
            u.merged = Some((seq, now));
        }
        Some(Verdict { role, mismatched })
    }

    /// When the earliest upstream `eligible` accepts stalls: `after` past its last activity.
    pub fn next_stall(&self, after: Duration, eligible: impl Fn(P) -> bool) -> Option<Instant> {
        self.upstreams()
            .filter(|u| eligible(u.peer))
            .map(|u| u.last_activity() + after)
            .min()
    }

    /// The upstreams silent for `after` (since their last datagram or subscription) among those
    /// `eligible` accepts: each is due a new `Subscribe`, and counts as subscribed at `now`.
    pub fn poll_stalled(
        &mut self,
        now: Instant,
        after: Duration,
        eligible: impl Fn(P) -> bool,
    ) -> Vec<P> {
        let mut out = Vec::new();
        for u in self.primary.iter_mut().chain(self.secondary.iter_mut()) {
            if now >= u.last_activity() + after && eligible(u.peer) {
                u.subscribed = now;
                out.push(u.peer);
            }
        }
        out
    }

    /// A `Subscribe` to `peer` was never acknowledged: its stall is due now.
    pub fn expedite(&mut self, peer: P, now: Instant, after: Duration) {
        if let Some(u) = self.get_mut(peer) {
            let due = now.checked_sub(after).unwrap_or(now);
            u.subscribed = u.subscribed.min(due);
            u.last_video = u.last_video.map(|v| v.min(due));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(2);

    #[test]
    fn removing_the_primary_promotes_the_flowing_secondary() {
        let t0 = Instant::now();
        let mut f = Feed::new();
        f.add(1u8, t0);
        f.add(2u8, t0);
        assert_eq!(f.role(2), Some(Role::Secondary));
        f.on_video(t0, 2, 10);
        assert!(f.feeds(2) && !f.feeds(1));
        assert_eq!(f.remove(1).map(|u| u.peer), Some(1));
        let p = f.primary().unwrap();
        assert_eq!((p.peer, p.last_video), (2, Some(t0)));
        assert!(f.secondary().is_none());
        assert_eq!(f.on_video(t0, 1, 11), None);
    }

    #[test]
    fn a_secondary_numbered_by_another_origin_is_mismatched_while_the_primary_delivers() {
        let t0 = Instant::now();
        let mut f = Feed::new();
        f.add(1u8, t0);
        f.add(2u8, t0);
        f.on_video(t0, 1, 100);
        let v = f.on_video(t0, 2, 100 + MISMATCH_SEQS + 1).unwrap();
        assert!(v.mismatched);
        assert!(!f.on_video(t0, 2, 101).unwrap().mismatched);
        // The primary silent for the hold: the secondary's numbering is no longer compared.
        let later = t0 + MISMATCH_HOLD;
        assert!(!f.on_video(later, 2, 90_000).unwrap().mismatched);
    }

    #[test]
    fn a_silent_upstream_is_due_a_subscribe_once_per_stall_period() {
        let t0 = Instant::now();
        let mut f = Feed::new();
        f.add(1u8, t0);
        f.add(2u8, t0);
        f.on_video(t0 + Duration::from_secs(1), 2, 0);
        assert_eq!(f.next_stall(STALL, |_| true), Some(t0 + STALL));
        assert!(f.poll_stalled(t0 + STALL / 2, STALL, |_| true).is_empty());
        assert_eq!(f.poll_stalled(t0 + STALL, STALL, |_| true), vec![1]);
        // Resubscribed at t0 + STALL: next due one period later; 2 is due at 3 s.
        assert_eq!(
            f.next_stall(STALL, |_| true),
            Some(t0 + Duration::from_secs(1) + STALL)
        );
        let t3 = t0 + Duration::from_secs(3);
        assert!(f.poll_stalled(t3, STALL, |p| p != 2).is_empty());
        f.expedite(1, t3, STALL);
        assert_eq!(f.poll_stalled(t3, STALL, |_| true), vec![1, 2]);
    }

    #[test]
    fn set_primary_takes_over_the_secondary_with_its_state() {
        let t0 = Instant::now();
        let mut f = Feed::new();
        f.add(1u8, t0);
        f.add(2u8, t0);
        f.on_video(t0, 2, 5);
        f.set_primary(2, t0 + STALL);
        assert_eq!(f.peers(), vec![2]);
        assert_eq!(f.primary().unwrap().merged, Some((5, t0)));
        f.set_secondary(1, t0);
        f.promote(true);
        assert_eq!(f.peers(), vec![1, 2]);
    }
}

//! The relay's upstream decisions as plain functions (no I/O, no clock, no state of their own):
//! when a working upstream gives way to another route (hysteresis), which route makes the best
//! secondary upstream (`--redundancy 2`: same origin, a path disjoint from the primary's where
//! possible), and which host to fall back to when no neighbour has a route (the catastrophic
//! fallback: the dead relay's own parent). The relay engine gathers the inputs from its routing
//! and subscription tables and acts on the answers.

use crate::routing::Route;
use common::wire::PathHop;
use common::PeerId;
use std::time::Duration;

/// How much better a route must be to replace a working upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    /// The new route costs at most this percentage of the current one (e.g. 80).
    pub switch_percent: u64,
    /// …and at least this much less: on a LAN or loopback, paths differ by fractions of a
    /// millisecond that are noise (a busy host's RTT spikes), not a reason to move a stream.
    /// Within this margin costs are equal, and then fewer hops wins.
    pub min_gain: Duration,
}

/// Why a working upstream gives way to another route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Clearly cheaper (both the percentage and the absolute gain).
    Cheaper,
    /// As cheap within the noise margin, and fewer hops (e.g. a nearer replica announced after
    /// we subscribed).
    Shorter,
}

impl Better {
    /// The reason as logged ("resubscribed … reason=").
    pub fn reason(self) -> &'static str {
        match self {
            Better::Cheaper => "better route",
            Better::Shorter => "shorter route",
        }
    }
}

/// Whether the upstream whose route is `current` should move to `best` (another neighbour's
/// route to the same channel). Stable: moving back needs a clearly better route again, so RTT
/// jitter between near-equal paths never makes a stream flap.
pub fn should_move(current: &Route, best: &Route, h: Hysteresis) -> Option<Better> {
    if best.via == current.via {
        return None;
    }
    let min_gain = u64::try_from(h.min_gain.as_micros()).unwrap_or(u64::MAX);
    let cheaper = best.cost_us.saturating_mul(100)
        <= current.cost_us.saturating_mul(h.switch_percent)
        && best.cost_us.saturating_add(min_gain) <= current.cost_us;
    let shorter =
        best.hops < current.hops && best.cost_us <= current.cost_us.saturating_add(min_gain);
    if cheaper {
        Some(Better::Cheaper)
    } else if shorter {
        Some(Better::Shorter)
    } else {
        None
    }
}

/// The best secondary upstream among `candidates` (routes to the channel) for a channel whose
/// primary route is `primary`, at a relay at `me`: the same origin (same sequence numbers),
/// through another neighbour, not through ourselves, and accepted by `allowed` (the caller's
/// checks: not a subscriber of the channel, usable). A path that shares no relay with the
/// primary's is preferred (the origin is shared by design), then the route order
/// ([`Route::key`]). Returns the route and whether it is disjoint.
pub fn secondary<'a>(
    primary: &Route,
    candidates: impl IntoIterator<Item = &'a Route>,
    me: PeerId,
    allowed: impl Fn(&Route) -> bool,
) -> Option<(Route, bool)> {
    // The path is origin first: the origin is shared by design.
    let relays = |r: &Route| -> Vec<PeerId> { r.path.iter().skip(1).map(|h| h.id).collect() };
    let prim_relays = relays(primary);
    candidates
        .into_iter()
        .filter(|r| {
            r.channel == primary.channel
                && r.origin == primary.origin
                && r.via != primary.via
                && !r.path.iter().any(|h| h.id == me)
                && allowed(r)
        })
        .map(|r| {
            let disjoint = !relays(r).iter().any(|a| prim_relays.contains(a));
            (r, disjoint)
        })
        .min_by_key(|(r, disjoint)| (!disjoint, r.key()))
        .map(|(r, d)| (r.clone(), d))
}

/// The catastrophic fallback: when no neighbour has a route to a channel whose upstream `dead`
/// died, the host to subscribe to instead is the nearest live relay before `dead` on the last
/// flood path seen through it (`path`, origin first): its parent, or the parent's parent if
/// that one is dead too, up to the origin. Never ourselves (`me`). `None` if `dead` is not on
/// the path or nobody before it is alive.
pub fn fallback_parent(
    path: &[PathHop],
    dead: PeerId,
    me: PathHop,
    alive: impl Fn(PeerId) -> bool,
) -> Option<PathHop> {
    let idx = path.iter().position(|h| h.id == dead)?;
    path[..idx]
        .iter()
        .rev()
        .find(|h| h.addr != me.addr && h.id != me.id && alive(h.id))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::wire::ChannelId;
    use common::NodeId;
    use std::time::Instant;

    use crate::testutil::hop;

    /// A route to channel "a" of origin 1 along `path` (origin first, the neighbour last).
    fn route(path: &[u8], cost_us: u64) -> Route {
        let path: Vec<PathHop> = path.iter().map(|n| hop(*n)).collect();
        Route {
            channel: ChannelId::of_name("a"),
            via: path.last().unwrap().id,
            origin: path[0].id,
            cost_us,
            hops: path.len(),
            load: 0,
            path,
            last_seen: Instant::now(),
        }
    }

    const H: Hysteresis = Hysteresis {
        switch_percent: 80,
        min_gain: Duration::from_millis(2),
    };

    #[test]
    fn a_working_upstream_moves_only_for_a_clearly_better_route() {
        let cur = route(&[1, 2], 10_000);
        // 20 % cheaper and 2 ms less: move.
        assert_eq!(
            should_move(&cur, &route(&[1, 3], 8_000), H),
            Some(Better::Cheaper)
        );
        // 20 % cheaper but only 1 ms less (loopback noise): stay.
        let small = route(&[1, 3], 800);
        assert_eq!(should_move(&route(&[1, 2], 1_000), &small, H), None);
        // 2 ms less but only 10 % cheaper: stay.
        assert_eq!(
            should_move(&route(&[1, 2], 20_000), &route(&[1, 3], 18_000), H),
            None
        );
        // The same neighbour: nothing to do.
        assert_eq!(should_move(&cur, &route(&[1, 2], 1), H), None);
        // Equal within the margin and fewer hops (a nearer replica): move; more hops: stay.
        let far = route(&[1, 4, 5, 2], 10_000);
        assert_eq!(
            should_move(&far, &route(&[9, 3], 11_500), H),
            Some(Better::Shorter)
        );
        assert_eq!(should_move(&route(&[9, 3], 11_500), &far, H), None);
        // No flapping: after a move for a cheaper route, the old one is not better.
        let new = route(&[1, 3], 8_000);
        assert_eq!(should_move(&new, &cur, H), None);
        assert_eq!(Better::Cheaper.reason(), "better route");
    }

    #[test]
    fn the_secondary_prefers_a_disjoint_path_of_the_same_origin() {
        // Me = 9. Primary via 4 over relay 2: 1-2-4. Candidates: via 5 over the same relay 2
        // (cheaper), via 6 over relay 3 (disjoint), via 7 from another origin, via 8 through me.
        let primary = route(&[1, 2, 4], 3_000);
        let shared = route(&[1, 2, 5], 2_000);
        let disjoint = route(&[1, 3, 6], 5_000);
        let mut other_origin = route(&[11, 7], 1_000);
        other_origin.origin = NodeId(11);
        let through_me = route(&[1, 9, 8], 1_000);
        let all = [
            primary.clone(),
            shared.clone(),
            disjoint.clone(),
            other_origin,
            through_me,
        ];
        let me = hop(9).id;
        let (r, d) = secondary(&primary, &all, me, |_| true).unwrap();
        assert_eq!((r.via, d), (disjoint.via, true));
        // Without the disjoint one, the shared path is still a second copy.
        let (r, d) = secondary(&primary, &all, me, |r| r.via != disjoint.via).unwrap();
        assert_eq!((r.via, d), (shared.via, false));
        // Nothing allowed: none.
        assert!(secondary(&primary, &all, me, |_| false).is_none());
    }

    #[test]
    fn the_fallback_is_the_nearest_live_relay_before_the_dead_one() {
        // S1 - N1 - N2 - N3 - me(N4): N3 died.
        let path = [hop(1), hop(2), hop(3), hop(4)];
        let me = hop(5);
        assert_eq!(
            fallback_parent(&path, hop(4).id, me, |_| true),
            Some(hop(3))
        );
        // Its parent is dead too: the next one up.
        let not3 = |a: PeerId| a != hop(3).id;
        assert_eq!(fallback_parent(&path, hop(4).id, me, not3), Some(hop(2)));
        // Everyone dead: none; a dead host not on the path: none.
        assert_eq!(fallback_parent(&path, hop(4).id, me, |_| false), None);
        assert_eq!(fallback_parent(&path, hop(8).id, me, |_| true), None);
        // Never ourselves.
        assert_eq!(
            fallback_parent(&path, hop(3).id, hop(2), |_| true),
            Some(hop(1))
        );
    }
}

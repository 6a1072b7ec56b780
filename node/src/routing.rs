//! The routing table: what floods taught this host about the way to each channel. I/O-free.
//!
//! [`RoutingTable::handle_flood`] implements the flood rules of `report/protocol.md`:
//! loop check (own id on the path → ignore), one *route* per `(channel, via neighbour, origin)`
//! with its cost, hop count and path, and duplicate suppression by `(origin, seq)` so that a
//! flood round costs at most one message per directed edge. Routes expire after
//! [`RoutingConfig::route_ttl`] without refresh ([`RoutingTable::expire`]).
//!
//! The table also tracks the liveness of its neighbours (and of any other peer the relay asks it
//! to watch, such as a catastrophic-fallback upstream) with a [`FailureDetector`]:
//! [`RoutingTable::heard_from`] on every datagram, [`RoutingTable::rtt_sample`] from the link's
//! RTT estimate, [`RoutingTable::poll_dead`] to learn who went silent (routes through a dead
//! peer are dropped at once), [`RoutingTable::best_usable_route`] to avoid a neighbour in its
//! hold-down after it came back. And it remembers, per
//! neighbour and channel, the path of the last flood seen through that neighbour, so that when
//! the neighbour dies the relay can reach *its* parent ([`RoutingTable::upstream_of`]).
//!
//! [`FloodOrigin`] builds a server's periodic floods.

use common::failure::{FailureConfig, FailureDetector};
use common::map::{Map, Set};
use common::wire::{limits, ChannelId, ChannelInfo, Flood, PathHop};
use common::{NodeId, PeerId};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The cost of a link whose RTT has not been measured yet (`DEFAULT_LINK_COST` in the protocol).
pub const DEFAULT_LINK_COST: Duration = Duration::from_millis(1);

/// How many flood rounds behind the newest one a `(origin, seq)` is still remembered exactly.
const SEQ_WINDOW: u64 = 64;

/// A sequence number this far *below* the newest one of its origin means the origin restarted
/// (with a fresh sequence start): the window is reset instead of suppressing its floods.
const SEQ_RESTART_GAP: u64 = 1024;

/// Tuning of a [`RoutingTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// A route not refreshed by a flood for this long is dropped (3.5 × the flood interval).
    pub route_ttl: Duration,
    /// Liveness of watched peers: a peer silent for `max(k × heartbeat_interval,
    /// 2·SRTT + 4·RTTVAR)` is dead; one that came back is avoided for the hold-down.
    /// Default: 100 ms heartbeats, k = 6 (both ends heartbeat; see `common::failure`), 2 s.
    pub failure: FailureConfig,
    /// Most origins whose flood sequence numbers are remembered (duplicate suppression memory);
    /// past it the least recently heard origin is forgotten.
    pub max_origins: usize,
    /// Most routes stored; floods that would add more are still forwarded, but their new routes
    /// are not recorded (and counted in [`FloodStats::routes_refused`]).
    pub max_routes: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            route_ttl: Duration::from_millis(3500),
            // At rest a relay's cost is its wake-ups, most of them its neighbours'
            // heartbeats: 200 ms (5 a second per neighbour) and k = 6, a 1.2 s floor for idle
            // neighbours. A neighbour that feeds us is watched by the fast detector (25 ms,
            // 150 ms) whatever this says, so failover does not depend on it.
            failure: FailureConfig {
                heartbeat_interval: Duration::from_millis(200),
                k: 6,
                ..FailureConfig::default()
            },
            max_origins: 1024,
            max_routes: 16 * 1024,
        }
    }
}

/// One way to a channel: through neighbour `via`, towards the server `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The channel.
    pub channel: ChannelId,
    /// The neighbour the flood came from (where to subscribe).
    pub via: PeerId,
    /// The server that originated the flood.
    pub origin: NodeId,
    /// Path cost to the origin, in microseconds (sum of link RTTs, our link to `via` included).
    pub cost_us: u64,
    /// Hops to the origin (`path.len()`).
    pub hops: usize,
    /// `via`'s load as its flood announced it (tie-break).
    pub load: u32,
    /// The flood's path, origin first, `via` last.
    pub path: Vec<PathHop>,
    /// When a flood last refreshed it.
    pub last_seen: Instant,
}

impl Route {
    /// The ordering key of routes: lower is better: cost, then hops, then the neighbour's load,
    /// then its id (to stay deterministic).
    pub fn key(&self) -> (u64, usize, u32, PeerId) {
        (self.cost_us, self.hops, self.load, self.via)
    }
}

/// What to do with a received flood.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FloodVerdict {
    /// The flood to forward (cost updated to ours, ourselves appended to the path), or `None`
    /// (duplicate, loop, malformed, path full).
    pub forward: Option<Flood>,
    /// Where to send `forward`: every neighbour except the sender and those on the path.
    pub to: Vec<PeerId>,
}

/// Flood counters of a [`RoutingTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// Floods handed to [`RoutingTable::handle_flood`].
    pub received: u64,
    /// Floods forwarded (one per `(origin, seq)` at most).
    pub forwarded: u64,
    /// Flood messages sent (sum of the verdicts' `to` lengths).
    pub messages_out: u64,
    /// Duplicates of an `(origin, seq)` already forwarded (routes were still refreshed).
    pub suppressed: u64,
    /// Floods whose path already held our id.
    pub loops: u64,
    /// Floods that make no sense (empty path, path not ending with the sender, origin not first,
    /// from a host that is not a neighbour).
    pub malformed: u64,
    /// Floods not forwarded because their path is full ([`limits::FLOOD_PATH`]).
    pub path_full: u64,
    /// New routes not recorded because the table is full.
    pub routes_refused: u64,
    /// Routes removed because their origin's flood stopped listing the channel.
    pub withdrawn: u64,
}

/// Per-origin duplicate memory: the newest sequence number and a bitmap of the ones below it.
#[derive(Debug, Clone, Copy)]
struct SeqWindow {
    highest: u64,
    /// Bit `d` set: `highest - d` was seen.
    mask: u64,
    last: Instant,
}

impl SeqWindow {
    fn new(seq: u64, now: Instant) -> SeqWindow {
        SeqWindow {
            highest: seq,
            mask: 1,
            last: now,
        }
    }

    /// Records `seq`; `true` if it was new.
    fn check(&mut self, seq: u64, now: Instant) -> bool {
        self.last = now;
        if seq > self.highest {
            let shift = seq - self.highest;
            self.mask = if shift >= SEQ_WINDOW {
                0
            } else {
                self.mask << shift
            };
            self.mask |= 1;
            self.highest = seq;
            return true;
        }
        let d = self.highest - seq;
        if d < SEQ_WINDOW {
            let bit = 1u64 << d;
            let new = self.mask & bit == 0;
            self.mask |= bit;
            new
        } else if d > SEQ_RESTART_GAP {
            // The origin restarted with another sequence start.
            *self = SeqWindow::new(seq, now);
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone)]
struct LastPath {
    path: Vec<PathHop>,
    seen: Instant,
}

/// The routing table of one host (see the module documentation).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    me: PathHop,
    cfg: RoutingConfig,
    neighbours: Vec<PathHop>,
    /// Liveness of the neighbours and of the peers watched on request.
    liveness: FailureDetector<PeerId>,
    /// Watched peers heard from at least once.
    heard: Set<PeerId>,
    origins: Map<NodeId, SeqWindow>,
    routes: Map<(ChannelId, PeerId, NodeId), Route>,
    names: BTreeMap<ChannelId, String>,
    last_paths: Map<(PeerId, ChannelId), LastPath>,
    stats: FloodStats,
    /// Our own load, put into the floods we forward.
    load: u32,
}

impl RoutingTable {
    /// Sets our load (how many (channel, subscriber) pairs we serve), announced in the floods we
    /// forward so downstream nodes can prefer the less loaded of equal routes.
    pub fn set_load(&mut self, load: u32) {
        self.load = load;
    }

    /// A table for the host `me` with the topology `neighbours`, all presumed alive at `now`.
    pub fn new(now: Instant, me: PathHop, neighbours: &[PathHop], cfg: RoutingConfig) -> Self {
        let mut nbrs: Vec<PathHop> = Vec::new();
        for n in neighbours {
            if n.id != me.id && !nbrs.iter().any(|m| m.id == n.id) {
                nbrs.push(*n);
            }
        }
        let mut liveness = FailureDetector::new(cfg.failure);
        for n in &nbrs {
            liveness.watch(now, n.id);
        }
        RoutingTable {
            me,
            cfg,
            neighbours: nbrs,
            liveness,
            heard: Set::default(),
            origins: Map::default(),
            routes: Map::default(),
            names: BTreeMap::new(),
            last_paths: Map::default(),
            stats: FloodStats::default(),
            load: 0,
        }
    }

    /// This host.
    pub fn me(&self) -> PathHop {
        self.me
    }

    /// The topology neighbours.
    pub fn neighbours(&self) -> &[PathHop] {
        &self.neighbours
    }

    /// Replaces the topology neighbours (the bootstrapper pushed an edit) at `now`: a new
    /// neighbour is watched (presumed alive); a removed one loses its routes and its flood
    /// paths, and stops being watched unless the caller watches it for another reason (call
    /// [`unwatch`](Self::unwatch) when it feeds nothing). Returns `(added, removed)`.
    pub fn set_neighbours(
        &mut self,
        now: Instant,
        neighbours: &[PathHop],
    ) -> (Vec<PathHop>, Vec<PeerId>) {
        let mut next: Vec<PathHop> = Vec::new();
        for n in neighbours {
            if n.id != self.me.id && !next.iter().any(|m| m.id == n.id) {
                next.push(*n);
            }
        }
        let removed: Vec<PeerId> = self
            .neighbours
            .iter()
            .map(|n| n.id)
            .filter(|a| !next.iter().any(|n| n.id == *a))
            .collect();
        // A neighbour whose address changed is not a new one: the address is only where to
        // send (see `neighbour`).
        let added: Vec<PathHop> = next
            .iter()
            .filter(|n| !self.is_neighbour(n.id))
            .copied()
            .collect();
        self.neighbours = next;
        for a in &removed {
            self.routes.retain(|(_, via, _), _| via != a);
            self.last_paths.retain(|(via, _), _| via != a);
        }
        for n in &added {
            self.liveness.watch(now, n.id);
        }
        (added, removed)
    }

    /// Whether `peer` is a topology neighbour.
    pub fn is_neighbour(&self, peer: PeerId) -> bool {
        self.neighbours.iter().any(|n| n.id == peer)
    }

    /// The topology neighbour `peer` (its id and address), if it is one.
    pub fn neighbour(&self, peer: PeerId) -> Option<PathHop> {
        self.neighbours.iter().find(|n| n.id == peer).copied()
    }

    /// The counters.
    pub fn stats(&self) -> FloodStats {
        self.stats
    }

    /// Handles a flood received from neighbour `from` over a link of cost `link_cost` (its
    /// smoothed RTT, or [`DEFAULT_LINK_COST`]): records the routes it announces and says
    /// whether and where to forward it. Never panics on hostile input.
    pub fn handle_flood(
        &mut self,
        now: Instant,
        from: PeerId,
        flood: &Flood,
        link_cost: Duration,
    ) -> FloodVerdict {
        self.stats.received += 1;
        let (Some(first), Some(last)) = (flood.path.first(), flood.path.last()) else {
            self.stats.malformed += 1;
            return FloodVerdict::default();
        };
        if last.id != from || first.id != flood.origin || !self.is_neighbour(from) {
            self.stats.malformed += 1;
            return FloodVerdict::default();
        }
        if flood
            .path
            .iter()
            .any(|h| h.id == self.me.id || h.addr == self.me.addr)
        {
            self.stats.loops += 1;
            return FloodVerdict::default();
        }
        self.heard_from(now, from);
        let link_us = u64::try_from(link_cost.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let cost_us = flood.cost_us.saturating_add(link_us);
        for info in &flood.channels {
            let key = (info.id, from, flood.origin);
            let route = Route {
                channel: info.id,
                via: from,
                origin: flood.origin,
                cost_us,
                hops: flood.path.len(),
                load: flood.load,
                path: flood.path.clone(),
                last_seen: now,
            };
            if self.routes.len() >= self.cfg.max_routes && !self.routes.contains_key(&key) {
                self.stats.routes_refused += 1;
                continue;
            }
            self.routes.insert(key, route);
            if !self.names.contains_key(&info.id) && self.names.len() < self.cfg.max_routes {
                self.names.insert(info.id, info.name.clone());
            }
            self.last_paths.insert(
                (from, info.id),
                LastPath {
                    path: flood.path.clone(),
                    seen: now,
                },
            );
        }
        // A flood carries its origin's whole channel set: a channel it no longer lists (a file
        // removed at the server) loses its route via this neighbour now, not at route expiry.
        let before = self.routes.len();
        self.routes.retain(|(ch, via, origin), _| {
            *via != from || *origin != flood.origin || flood.channels.iter().any(|c| c.id == *ch)
        });
        self.stats.withdrawn += (before - self.routes.len()) as u64;
        if !self.first_time(flood.origin, flood.seq, now) {
            self.stats.suppressed += 1;
            return FloodVerdict::default();
        }
        if flood.path.len() >= limits::FLOOD_PATH {
            self.stats.path_full += 1;
            return FloodVerdict::default();
        }
        let to: Vec<PeerId> = self
            .neighbours
            .iter()
            .filter(|n| n.id != from && !flood.path.iter().any(|h| h.id == n.id))
            .map(|n| n.id)
            .collect();
        if to.is_empty() {
            return FloodVerdict::default();
        }
        let mut path = flood.path.clone();
        path.push(self.me);
        self.stats.forwarded += 1;
        self.stats.messages_out += to.len() as u64;
        FloodVerdict {
            forward: Some(Flood {
                origin: flood.origin,
                seq: flood.seq,
                cost_us,
                load: self.load,
                path,
                channels: flood.channels.clone(),
            }),
            to,
        }
    }

    /// Records `(origin, seq)`; `true` the first time.
    fn first_time(&mut self, origin: NodeId, seq: u64, now: Instant) -> bool {
        if let Some(w) = self.origins.get_mut(&origin) {
            return w.check(seq, now);
        }
        if self.origins.len() >= self.cfg.max_origins.max(1) {
            if let Some(oldest) = self
                .origins
                .iter()
                .min_by_key(|(_, w)| w.last)
                .map(|(o, _)| *o)
            {
                self.origins.remove(&oldest);
            }
        }
        self.origins.insert(origin, SeqWindow::new(seq, now));
        true
    }

    /// Drops routes not refreshed for [`RoutingConfig::route_ttl`] (and remembered paths much
    /// older than that); returns how many routes were dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.cfg.route_ttl;
        let before = self.routes.len();
        self.routes
            .retain(|_, r| now.saturating_duration_since(r.last_seen) <= ttl);
        let keep_paths = ttl * 20;
        self.last_paths
            .retain(|_, p| now.saturating_duration_since(p.seen) <= keep_paths);
        let live: Set<ChannelId> = self.routes.keys().map(|(c, _, _)| *c).collect();
        self.names.retain(|c, _| live.contains(c));
        before - self.routes.len()
    }

    /// Drops the routes to `channel` through `via` (it said it cannot feed it); the next flood
    /// through it that still lists the channel brings them back. Returns how many went.
    pub fn withdraw(&mut self, channel: ChannelId, via: PeerId) -> usize {
        let before = self.routes.len();
        self.routes
            .retain(|(c, v, _), _| !(*c == channel && *v == via));
        before - self.routes.len()
    }

    /// When [`expire`](Self::expire) will next drop a route if no flood refreshes it.
    pub fn next_expiry(&self) -> Option<Instant> {
        let oldest = self.routes.values().map(|r| r.last_seen).min()?;
        // `expire` keeps a route whose age is exactly the TTL.
        Some(oldest + self.cfg.route_ttl + Duration::from_millis(1))
    }

    /// The earliest end of a hold-down (a peer that came back, not chosen as upstream until
    /// then unless it is the only route) after `now`: the routes may then be reconsidered.
    pub fn next_hold_down_end(&self, now: Instant) -> Option<Instant> {
        self.liveness
            .peers()
            .into_iter()
            .filter_map(|p| self.liveness.hold_down_until(now, p))
            .min()
    }

    /// The best route to `channel` not via any address of `exclude`: lowest
    /// [`Route::key`] `(cost, hops, via)`. Routes via dead peers are removed when they die, so
    /// they never show up here.
    pub fn best_route(&self, channel: ChannelId, exclude: &[PeerId]) -> Option<Route> {
        self.routes
            .values()
            .filter(|r| r.channel == channel && !exclude.contains(&r.via))
            .min_by_key(|r| r.key())
            .cloned()
    }

    /// Like [`best_route`](Self::best_route), but a route via a neighbour in its hold-down
    /// (it died and came back recently, see [`is_usable`](Self::is_usable)) is chosen only if
    /// no other route exists.
    pub fn best_usable_route(
        &self,
        now: Instant,
        channel: ChannelId,
        exclude: &[PeerId],
    ) -> Option<Route> {
        self.routes
            .values()
            .filter(|r| r.channel == channel && !exclude.contains(&r.via))
            .min_by_key(|r| (!self.liveness.is_usable(now, r.via), r.key()))
            .cloned()
    }

    /// The best route to `channel` via the neighbour `via`, if any.
    pub fn route_via(&self, channel: ChannelId, via: PeerId) -> Option<Route> {
        self.routes
            .values()
            .filter(|r| r.channel == channel && r.via == via)
            .min_by_key(|r| r.key())
            .cloned()
    }

    /// Every route (for inspection and tests), in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    /// The channels this host can get through its routes (names as announced), by id.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let mut ids: Vec<ChannelId> = self.routes.keys().map(|(c, _, _)| *c).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| ChannelInfo {
                id,
                name: self.names.get(&id).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// The name announced for `channel`, if any route carries it.
    pub fn channel_name(&self, channel: ChannelId) -> Option<&str> {
        self.names.get(&channel).map(String::as_str)
    }

    /// The path (origin first, `via` last) of the last flood for `channel` seen through the
    /// neighbour `via` — kept after `via` dies, so that the catastrophic fallback can find its
    /// parent (`path[len - 2]`).
    pub fn upstream_of(&self, via: PeerId, channel: ChannelId) -> Option<Vec<PathHop>> {
        self.last_paths.get(&(via, channel)).map(|p| p.path.clone())
    }

    /// Records that `addr` was heard from at `now` (any datagram). Returns `true` if it is a
    /// watched peer heard for the first time, or considered dead and now alive again (then in
    /// its hold-down).
    pub fn heard_from(&mut self, now: Instant, peer: PeerId) -> bool {
        if !self.liveness.is_watched(peer) {
            return false;
        }
        let revived = self.liveness.heard(now, peer);
        self.heard.insert(peer) || revived
    }

    /// A new RTT estimate of the link to `addr`: its liveness timeout becomes
    /// `max(k × heartbeat_interval, 2·srtt + 4·rttvar)`.
    pub fn rtt_sample(&mut self, peer: PeerId, srtt: Duration, rttvar: Duration) {
        self.liveness.rtt_sample(peer, srtt, rttvar);
    }

    /// The liveness timeout of `addr`.
    pub fn liveness_timeout(&self, peer: PeerId) -> Duration {
        self.liveness.timeout(peer)
    }

    /// Starts watching the liveness of a peer that is not a topology neighbour (e.g. a
    /// catastrophic-fallback upstream), presumed alive at `now`. No effect on a watched peer.
    pub fn watch(&mut self, now: Instant, peer: PeerId) {
        self.liveness.watch(now, peer);
    }

    /// Stops watching a peer added with [`watch`](Self::watch) (neighbours stay watched).
    pub fn unwatch(&mut self, peer: PeerId) {
        if !self.is_neighbour(peer) {
            self.liveness.unwatch(peer);
            self.heard.remove(&peer);
        }
    }

    /// Makes exactly the watched peers in `fast` fast (see `common::failure`, "Fast peers"):
    /// the caller heartbeats them every [`FailureConfig::fast_interval`] and they are declared
    /// dead after `fast_k` silent intervals. Returns the fast peers that are watched.
    pub fn set_fast_peers(&mut self, now: Instant, fast: &BTreeSet<PeerId>) -> Vec<PeerId> {
        let mut out = Vec::new();
        for p in self.liveness.peers() {
            let f = fast.contains(&p);
            self.liveness.set_fast(now, p, f);
            if f {
                out.push(p);
            }
        }
        out
    }

    /// The watched peers that are not topology neighbours.
    pub fn watched_non_neighbours(&self) -> Vec<PeerId> {
        self.liveness
            .peers()
            .into_iter()
            .filter(|a| !self.is_neighbour(*a))
            .collect()
    }

    /// Whether a watched peer is alive (`true` for peers that are not watched: nothing says
    /// otherwise).
    pub fn is_alive(&self, peer: PeerId) -> bool {
        self.liveness.is_alive(peer)
    }

    /// When `peer` (watched) was last heard from.
    pub fn last_heard(&self, peer: PeerId) -> Option<Instant> {
        self.liveness.last_heard(peer)
    }

    /// Whether `addr` is alive and not in its hold-down (a neighbour that died and came back
    /// less than [`FailureConfig::hold_down`] ago) at `now`.
    pub fn is_usable(&self, now: Instant, peer: PeerId) -> bool {
        self.liveness.is_usable(now, peer)
    }

    /// Watched peers silent for more than their liveness timeout at `now` (dead or about to be
    /// declared so).
    pub fn dead_neighbours(&self, now: Instant) -> Vec<PeerId> {
        self.liveness
            .peers()
            .into_iter()
            .filter(|a| {
                !self.liveness.is_alive(*a)
                    || self.liveness.last_heard(*a).is_some_and(|l| {
                        now.saturating_duration_since(l) >= self.liveness.timeout(*a)
                    })
            })
            .collect()
    }

    /// Declares dead every watched peer silent for at least its liveness timeout that was
    /// still alive, removes the routes through it, and returns them (each death is reported
    /// once; the peer is alive again as soon as it is heard from).
    pub fn poll_dead(&mut self, now: Instant) -> Vec<PeerId> {
        let dead = self.liveness.poll_dead(now);
        for a in &dead {
            self.routes.retain(|(_, via, _), _| via != a);
        }
        dead
    }

    /// When [`poll_dead`](Self::poll_dead) may next declare a death.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.liveness.poll_timeout()
    }

    /// Declares `addr` dead now (e.g. a reliable message to it timed out, or it said goodbye):
    /// removes the routes through it. Returns `true` if it was alive (or not watched).
    pub fn mark_dead(&mut self, peer: PeerId) -> bool {
        self.routes.retain(|(_, via, _), _| *via != peer);
        if !self.liveness.is_watched(peer) {
            return true;
        }
        self.liveness.mark_dead(peer)
    }
}

/// Builds a server's periodic floods: `origin = me`, `cost_us = 0`, `path = [me]`, with a
/// sequence number that increases by one per round.
#[derive(Debug, Clone)]
pub struct FloodOrigin {
    me: PathHop,
    seq: u64,
}

impl FloodOrigin {
    /// Floods from `me`, the first with sequence number `first_seq`. Use a random start (the
    /// relay does) so that a restarted server is not taken for a duplicate of its former self.
    pub fn new(me: PathHop, first_seq: u64) -> FloodOrigin {
        FloodOrigin { me, seq: first_seq }
    }

    /// The next round's flood announcing `channels` (at most [`limits::CHANNELS`] of them are
    /// announced; the rest are cut).
    pub fn next_flood(&mut self, channels: &[ChannelInfo], load: u32) -> Flood {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        Flood {
            origin: self.me.id,
            seq,
            cost_us: 0,
            load,
            path: vec![self.me],
            channels: channels.iter().take(limits::CHANNELS).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::hop;

    fn chan(name: &str) -> ChannelInfo {
        ChannelInfo {
            id: ChannelId::of_name(name),
            name: name.into(),
        }
    }

    #[test]
    fn seq_window_suppresses_duplicates_and_accepts_restarts() {
        let t = Instant::now();
        let mut w = SeqWindow::new(100, t);
        assert!(!w.check(100, t));
        assert!(w.check(101, t));
        assert!(w.check(99, t));
        assert!(!w.check(99, t));
        assert!(!w.check(101 - SEQ_WINDOW - 5, t), "too old");
        assert!(w.check(1_000_000, t));
        assert!(w.check(3, t), "restart");
        assert!(!w.check(3, t));
    }

    #[test]
    fn equal_routes_prefer_the_less_loaded_neighbour() {
        let t = Instant::now();
        let mut rt = RoutingTable::new(t, hop(4), &[hop(2), hop(3)], Default::default());
        let f = FloodOrigin::new(hop(1), 1).next_flood(&[chan("a")], 0);
        let via = |n: u8, load: u32| {
            let mut g = f.clone();
            g.path.push(hop(n));
            g.load = load;
            g
        };
        rt.handle_flood(t, hop(2).id, &via(2, 7), DEFAULT_LINK_COST);
        rt.handle_flood(t, hop(3).id, &via(3, 1), DEFAULT_LINK_COST);
        assert_eq!(rt.best_route(chan("a").id, &[]).unwrap().via, hop(3).id);
        // Our own load goes into what we forward.
        let mut rt = RoutingTable::new(t, hop(2), &[hop(1), hop(3)], Default::default());
        rt.set_load(5);
        let v = rt.handle_flood(t, hop(1).id, &f, DEFAULT_LINK_COST);
        assert_eq!(v.forward.unwrap().load, 5);
    }

    #[test]
    fn neighbours_edited_at_runtime() {
        let t = Instant::now();
        let mut rt = RoutingTable::new(t, hop(4), &[hop(2), hop(3)], Default::default());
        let f = FloodOrigin::new(hop(1), 1).next_flood(&[chan("a")], 0);
        let via = |n: u8| {
            let mut g = f.clone();
            g.path.push(hop(n));
            g
        };
        rt.handle_flood(t, hop(2).id, &via(2), DEFAULT_LINK_COST);
        rt.handle_flood(t, hop(3).id, &via(3), DEFAULT_LINK_COST);
        assert_eq!(rt.routes().count(), 2);
        // Link to 2 removed, 5 added (and 4 itself, and a duplicate, ignored).
        let (added, removed) = rt.set_neighbours(t, &[hop(3), hop(5), hop(4), hop(5)]);
        assert_eq!(added, [hop(5)]);
        assert_eq!(removed, [hop(2).id]);
        assert_eq!(rt.neighbours(), [hop(3), hop(5)]);
        assert!(!rt.is_neighbour(hop(2).id) && rt.is_neighbour(hop(5).id));
        assert_eq!(rt.best_route(chan("a").id, &[]).unwrap().via, hop(3).id);
        assert_eq!(rt.routes().count(), 1, "routes through 2 are gone");
        assert!(rt.upstream_of(hop(2).id, chan("a").id).is_none());
        // A flood through the new neighbour is taken; one from the removed one is not ours.
        let mut origin = FloodOrigin::new(hop(1), 5);
        let mut g = origin.next_flood(&[chan("a")], 0);
        g.path.push(hop(5));
        rt.handle_flood(t, hop(5).id, &g, DEFAULT_LINK_COST);
        assert!(rt.route_via(chan("a").id, hop(5).id).is_some());
        // The removed one is watched no more once the caller unwatches it.
        rt.unwatch(hop(2).id);
        assert!(!rt.watched_non_neighbours().contains(&hop(2).id));
        assert_eq!(rt.set_neighbours(t, &[hop(3), hop(5)]), (vec![], vec![]));
    }

    #[test]
    fn a_channel_missing_from_the_next_flood_is_withdrawn_at_once() {
        let t = Instant::now();
        let mut rt = RoutingTable::new(t, hop(2), &[hop(1), hop(3)], Default::default());
        let mut origin = FloodOrigin::new(hop(1), 1);
        let f = origin.next_flood(&[chan("a"), chan("b")], 0);
        rt.handle_flood(t, hop(1).id, &f, DEFAULT_LINK_COST);
        assert_eq!(rt.channels().len(), 2);
        let f = origin.next_flood(&[chan("a")], 0);
        rt.handle_flood(t, hop(1).id, &f, DEFAULT_LINK_COST);
        assert_eq!(rt.channels(), vec![chan("a")]);
        assert!(rt.best_route(chan("b").id, &[]).is_none());
        assert_eq!(rt.stats().withdrawn, 1);
    }

    #[test]
    fn flood_is_recorded_forwarded_once_and_loops_ignored() {
        let t = Instant::now();
        // me = 2, neighbours 1 (server side), 3, 4.
        let mut rt = RoutingTable::new(t, hop(2), &[hop(1), hop(3), hop(4)], Default::default());
        let mut origin = FloodOrigin::new(hop(1), 7);
        let f = origin.next_flood(&[chan("news")], 0);
        let v = rt.handle_flood(t, hop(1).id, &f, Duration::from_micros(300));
        let fwd = v.forward.expect("forwarded");
        assert_eq!(fwd.cost_us, 300);
        assert_eq!(fwd.path, vec![hop(1), hop(2)]);
        assert_eq!(v.to, vec![hop(3).id, hop(4).id]);
        // Same round again via 3 (path 1,3): route recorded, not forwarded.
        let mut f3 = f.clone();
        f3.path.push(hop(3));
        f3.cost_us = 500;
        let v = rt.handle_flood(t, hop(3).id, &f3, Duration::from_micros(100));
        assert!(v.forward.is_none());
        assert_eq!(rt.stats().suppressed, 1);
        let best = rt.best_route(chan("news").id, &[]).unwrap();
        assert_eq!(best.via, hop(1).id);
        let alt = rt.best_route(chan("news").id, &[hop(1).id]).unwrap();
        assert_eq!((alt.via, alt.cost_us, alt.hops), (hop(3).id, 600, 2));
        // A flood that already went through us is a loop.
        let mut lp = f.clone();
        lp.path = vec![hop(1), hop(2), hop(4)];
        rt.handle_flood(t, hop(4).id, &lp, DEFAULT_LINK_COST);
        assert_eq!(rt.stats().loops, 1);
        // Malformed: path does not end with the sender; sender not a neighbour.
        rt.handle_flood(t, hop(4).id, &f, DEFAULT_LINK_COST);
        let mut nb = f.clone();
        nb.path.push(hop(9));
        rt.handle_flood(t, hop(9).id, &nb, DEFAULT_LINK_COST);
        assert_eq!(rt.stats().malformed, 2);
        assert_eq!(rt.channels(), vec![chan("news")]);
        assert_eq!(
            rt.upstream_of(hop(3).id, chan("news").id).unwrap(),
            vec![hop(1), hop(3)]
        );
    }

    #[test]
    fn routes_expire_and_die_with_their_neighbour() {
        let t = Instant::now();
        let cfg = RoutingConfig::default();
        let mut rt = RoutingTable::new(t, hop(2), &[hop(1), hop(3)], cfg.clone());
        let f = FloodOrigin::new(hop(1), 0).next_flood(&[chan("a")], 0);
        rt.handle_flood(t, hop(1).id, &f, DEFAULT_LINK_COST);
        assert!(rt.best_route(chan("a").id, &[]).is_some());
        assert_eq!(rt.expire(t + cfg.route_ttl), 0);
        assert_eq!(rt.expire(t + cfg.route_ttl + Duration::from_millis(1)), 1);
        assert!(rt.best_route(chan("a").id, &[]).is_none());
        assert!(rt.channels().is_empty());
        // Liveness: 3 stays silent, 1 keeps talking.
        let later = t + cfg.failure.floor() + Duration::from_millis(1);
        rt.heard_from(later, hop(1).id);
        assert_eq!(rt.dead_neighbours(later), vec![hop(3).id]);
        assert_eq!(rt.poll_dead(later), vec![hop(3).id]);
        assert!(rt.poll_dead(later).is_empty(), "reported once");
        assert!(!rt.is_alive(hop(3).id));
        assert!(rt.heard_from(later, hop(3).id), "revived");
        assert!(rt.is_alive(hop(3).id));
        // Non-neighbours can be watched and unwatched.
        rt.watch(later, hop(7).id);
        assert_eq!(rt.watched_non_neighbours(), vec![hop(7).id]);
        rt.unwatch(hop(7).id);
        rt.unwatch(hop(1).id);
        assert!(rt.watched_non_neighbours().is_empty());
        assert!(rt.is_neighbour(hop(1).id));
    }

    #[test]
    fn a_dead_neighbour_loses_its_routes_at_once_and_is_avoided_during_its_hold_down() {
        let t = Instant::now();
        let cfg = RoutingConfig::default();
        let mut rt = RoutingTable::new(t, hop(4), &[hop(2), hop(3)], cfg.clone());
        let f = FloodOrigin::new(hop(1), 1).next_flood(&[chan("a")], 0);
        let via = |n: u8| {
            let mut g = f.clone();
            g.path.push(hop(n));
            g
        };
        let ch = chan("a").id;
        rt.handle_flood(t, hop(2).id, &via(2), Duration::from_micros(100));
        rt.handle_flood(t, hop(3).id, &via(3), Duration::from_micros(900));
        assert_eq!(rt.best_route(ch, &[]).unwrap().via, hop(2).id);
        // 2 goes silent; 3 keeps heartbeating. 2 is dead after k × the heartbeat interval,
        // long before the route TTL, and its route is gone with it.
        let mut now = t;
        let died = loop {
            now += Duration::from_millis(10);
            rt.heard_from(now, hop(3).id);
            if rt.poll_dead(now) == vec![hop(2).id] {
                break now;
            }
            assert!(
                now - t <= cfg.failure.floor() + Duration::from_millis(100),
                "not declared dead"
            );
        };
        assert_eq!(died - t, cfg.failure.floor());
        assert_eq!(rt.best_route(ch, &[]).unwrap().via, hop(3).id);
        // 2 comes back and floods again: cheaper, but in its hold-down.
        let back = died + Duration::from_millis(500);
        assert!(rt.heard_from(back, hop(2).id));
        rt.handle_flood(back, hop(2).id, &via(2), Duration::from_micros(100));
        assert!(rt.is_alive(hop(2).id) && !rt.is_usable(back, hop(2).id));
        assert_eq!(rt.best_route(ch, &[]).unwrap().via, hop(2).id);
        assert_eq!(rt.best_usable_route(back, ch, &[]).unwrap().via, hop(3).id);
        // …unless it is the only way.
        assert_eq!(
            rt.best_usable_route(back, ch, &[hop(3).id]).unwrap().via,
            hop(2).id
        );
        let over = back + cfg.failure.hold_down;
        assert_eq!(rt.best_usable_route(over, ch, &[]).unwrap().via, hop(2).id);
        // The timeout follows the link's RTT.
        rt.rtt_sample(
            hop(3).id,
            Duration::from_millis(500),
            Duration::from_millis(100),
        );
        assert_eq!(rt.liveness_timeout(hop(3).id), Duration::from_millis(1400));
        assert_eq!(rt.liveness_timeout(hop(2).id), cfg.failure.floor());
    }
}

//! Who wants which channel from us, and where we get it from. I/O-free.
//!
//! Peers are named by their [`PeerId`] (the relay maps them to addresses).
//!
//! Downstream *subscribers* (neighbour nodes and clients alike: any peer that subscribes,
//! including hosts that are not topology neighbours, for the catastrophic fallback) are soft
//! state: every datagram from a subscriber refreshes it ([`Subscriptions::touch`]), and a
//! subscriber silent for the timeout is dropped ([`Subscriptions::expire`]).
//!
//! Per channel with at least one subscriber there is an *upstream*: a host we are subscribed to
//! ([`Upstream::Node`]), or [`Upstream::Local`] for a channel this host originates. Transitions
//! emit [`SubAction`]s for the driver to carry out: subscribe/unsubscribe upstream, or tell the
//! server that one of its own channels became watched / unwatched.

use common::map::Map;
use common::wire::ChannelId;
use common::PeerId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Where a channel comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// This host originates the channel (a server's own channel).
    Local,
    /// We are subscribed to this host.
    Node(PeerId),
}

/// Something the driver must do after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAction {
    /// Send `Subscribe { channel }` to the upstream.
    Subscribe(ChannelId, PeerId),
    /// Send `Unsubscribe { channel }` to the former upstream.
    Unsubscribe(ChannelId, PeerId),
    /// A local channel became watched (`true`, first subscriber) or unwatched (`false`, last
    /// subscriber gone).
    LocalDemand(ChannelId, bool),
}

/// Why [`Subscriptions::subscribe`] refused a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// Too many distinct subscriber addresses already ([`Subscriptions::MAX_PEERS`]).
    #[error("too many subscribers")]
    TooManyPeers,
    /// This peer subscribed to too many channels ([`Subscriptions::MAX_CHANNELS_PER_PEER`]).
    #[error("too many channels for one subscriber")]
    TooManyChannels,
}

#[derive(Debug, Default)]
struct ChannelState {
    subscribers: BTreeSet<PeerId>,
    upstream: Option<Upstream>,
}

#[derive(Debug)]
struct Peer {
    last_heard: Instant,
    channels: BTreeSet<ChannelId>,
}

/// What [`Subscriptions::expire`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Subscribers dropped for silence: `(channel, subscriber)`.
    pub dropped: Vec<(ChannelId, PeerId)>,
    /// The resulting actions.
    pub actions: Vec<SubAction>,
}

/// The subscription state of one host (see the module documentation).
#[derive(Debug)]
pub struct Subscriptions {
    timeout: Duration,
    channels: BTreeMap<ChannelId, ChannelState>,
    peers: Map<PeerId, Peer>,
    local: BTreeSet<ChannelId>,
}

impl Subscriptions {
    /// Most distinct subscriber addresses held at once (bounds what spoofed subscribes cost).
    pub const MAX_PEERS: usize = 4096;
    /// Most channels one subscriber may hold.
    pub const MAX_CHANNELS_PER_PEER: usize = 64;

    /// How many (channel, subscriber) pairs this host serves: its load, announced in floods.
    pub fn load(&self) -> u32 {
        let n: usize = self.channels.values().map(|c| c.subscribers.len()).sum();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Empty state; subscribers silent for `timeout` are dropped.
    pub fn new(timeout: Duration) -> Subscriptions {
        Subscriptions {
            timeout,
            channels: BTreeMap::new(),
            peers: Map::default(),
            local: BTreeSet::new(),
        }
    }

    /// Replaces the set of channels this host originates. A channel that becomes local and was
    /// fed from upstream is unsubscribed there and, if watched, reported as demanded; a channel
    /// that stops being local loses its subscribers (and is reported as no longer demanded).
    pub fn set_local(&mut self, channels: &[ChannelId]) -> Vec<SubAction> {
        let new: BTreeSet<ChannelId> = channels.iter().copied().collect();
        let mut actions = Vec::new();
        let removed: Vec<ChannelId> = self.local.difference(&new).copied().collect();
        for ch in removed {
            if let Some(state) = self.channels.remove(&ch) {
                for s in &state.subscribers {
                    self.forget_peer_channel(*s, ch);
                }
                if !state.subscribers.is_empty() {
                    actions.push(SubAction::LocalDemand(ch, false));
                }
            }
        }
        for ch in new.difference(&self.local) {
            if let Some(state) = self.channels.get_mut(ch) {
                if let Some(Upstream::Node(u)) = state.upstream {
                    actions.push(SubAction::Unsubscribe(*ch, u));
                }
                state.upstream = Some(Upstream::Local);
                if !state.subscribers.is_empty() {
                    actions.push(SubAction::LocalDemand(*ch, true));
                }
            }
        }
        self.local = new;
        actions
    }

    /// Whether this host originates `channel`.
    pub fn is_local(&self, channel: ChannelId) -> bool {
        self.local.contains(&channel)
    }

    /// `peer` subscribes to `channel` at `now`. If it is the channel's first subscriber, the
    /// channel gets an upstream: [`Upstream::Local`] for a local channel (→
    /// [`SubAction::LocalDemand`]), else `upstream` if given (→ [`SubAction::Subscribe`]); with
    /// no upstream known yet the driver provides one later with
    /// [`set_upstream`](Self::set_upstream). Subscribing again only refreshes.
    pub fn subscribe(
        &mut self,
        now: Instant,
        peer: PeerId,
        channel: ChannelId,
        upstream: Option<PeerId>,
    ) -> Result<Vec<SubAction>, SubscribeError> {
        match self.peers.get(&peer) {
            None if self.peers.len() >= Self::MAX_PEERS => {
                return Err(SubscribeError::TooManyPeers)
            }
            Some(p)
                if p.channels.len() >= Self::MAX_CHANNELS_PER_PEER
                    && !p.channels.contains(&channel) =>
            {
                return Err(SubscribeError::TooManyChannels)
            }
            _ => {}
        }
        let p = self.peers.entry(peer).or_insert(Peer {
            last_heard: now,
            channels: BTreeSet::new(),
        });
        p.last_heard = p.last_heard.max(now);
        p.channels.insert(channel);
        let local = self.local.contains(&channel);
        let state = self.channels.entry(channel).or_default();
        let first = state.subscribers.is_empty();
        state.subscribers.insert(peer);
        let mut actions = Vec::new();
        if local {
            if state.upstream != Some(Upstream::Local) {
                state.upstream = Some(Upstream::Local);
            }
            if first {
                actions.push(SubAction::LocalDemand(channel, true));
            }
        } else if state.upstream.is_none() {
            if let Some(u) = upstream.filter(|u| *u != peer) {
                state.upstream = Some(Upstream::Node(u));
                actions.push(SubAction::Subscribe(channel, u));
            }
        }
        Ok(actions)
    }

    /// `peer` unsubscribes from `channel`. If it was the last subscriber, the upstream is
    /// released ([`SubAction::Unsubscribe`] or `LocalDemand(channel, false)`).
    pub fn unsubscribe(&mut self, peer: PeerId, channel: ChannelId) -> Vec<SubAction> {
        self.forget_peer_channel(peer, channel);
        self.remove_subscriber(peer, channel)
    }

    fn forget_peer_channel(&mut self, peer: PeerId, channel: ChannelId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.channels.remove(&channel);
            if p.channels.is_empty() {
                self.peers.remove(&peer);
            }
        }
    }

    fn remove_subscriber(&mut self, peer: PeerId, channel: ChannelId) -> Vec<SubAction> {
        let Some(state) = self.channels.get_mut(&channel) else {
            return Vec::new();
        };
        if !state.subscribers.remove(&peer) || !state.subscribers.is_empty() {
            return Vec::new();
        }
        let upstream = state.upstream;
        self.channels.remove(&channel);
        match upstream {
            Some(Upstream::Local) => vec![SubAction::LocalDemand(channel, false)],
            Some(Upstream::Node(u)) => vec![SubAction::Unsubscribe(channel, u)],
            None => Vec::new(),
        }
    }

    /// Whether `peer` subscribes to anything.
    pub fn is_peer(&self, peer: PeerId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Something arrived from `peer` at `now`: refreshes all its subscriptions.
    pub fn touch(&mut self, now: Instant, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_heard = p.last_heard.max(now);
        }
    }

    /// When [`expire`](Self::expire) will next drop a silent subscriber if nothing is heard.
    pub fn next_expiry(&self) -> Option<Instant> {
        let oldest = self.peers.values().map(|p| p.last_heard).min()?;
        // `expire` keeps a subscriber silent for exactly the timeout.
        Some(oldest + self.timeout + Duration::from_millis(1))
    }

    /// Drops every subscriber silent for longer than the timeout at `now`.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let timeout = self.timeout;
        let silent: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_heard) > timeout)
            .map(|(a, _)| *a)
            .collect();
        let mut out = Expired::default();
        for peer in silent {
            for ch in self
                .peers
                .get(&peer)
                .map(|p| p.channels.clone())
                .unwrap_or_default()
            {
                out.dropped.push((ch, peer));
            }
            out.actions.extend(self.drop_peer(peer));
        }
        out
    }

    /// Drops every subscription of `peer` (it said goodbye or was declared dead).
    pub fn drop_peer(&mut self, peer: PeerId) -> Vec<SubAction> {
        let Some(p) = self.peers.remove(&peer) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        for ch in p.channels {
            actions.extend(self.remove_subscriber(peer, ch));
        }
        actions
    }

    /// Sets the upstream of a watched, non-local `channel` (`None`: no way to get it for now).
    /// Emits `Unsubscribe` to the former upstream and `Subscribe` to the new one when it
    /// changes; does nothing for a local or unwatched channel.
    pub fn set_upstream(&mut self, channel: ChannelId, upstream: Option<PeerId>) -> Vec<SubAction> {
        let Some(state) = self.channels.get_mut(&channel) else {
            return Vec::new();
        };
        if state.upstream == Some(Upstream::Local) {
            return Vec::new();
        }
        let new = upstream.map(Upstream::Node);
        if state.upstream == new {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some(Upstream::Node(old)) = state.upstream {
            actions.push(SubAction::Unsubscribe(channel, old));
        }
        if let Some(u) = upstream {
            actions.push(SubAction::Subscribe(channel, u));
        }
        state.upstream = new;
        actions
    }

    /// The upstream of `channel` (`None` if unwatched, or watched with no upstream yet).
    pub fn upstream(&self, channel: ChannelId) -> Option<Upstream> {
        self.channels.get(&channel).and_then(|s| s.upstream)
    }

    /// The subscribers of `channel`.
    pub fn subscribers(&self, channel: ChannelId) -> impl Iterator<Item = PeerId> + '_ {
        self.channels
            .get(&channel)
            .into_iter()
            .flat_map(|s| s.subscribers.iter().copied())
    }

    /// Whether `peer` subscribes to `channel`.
    pub fn is_subscriber(&self, peer: PeerId, channel: ChannelId) -> bool {
        self.channels
            .get(&channel)
            .is_some_and(|s| s.subscribers.contains(&peer))
    }

    /// Whether `channel` has at least one subscriber.
    pub fn is_watched(&self, channel: ChannelId) -> bool {
        self.channels
            .get(&channel)
            .is_some_and(|s| !s.subscribers.is_empty())
    }

    /// Channels with at least one subscriber, not local (the ones that need an upstream).
    pub fn wanted(&self) -> Vec<ChannelId> {
        self.channels
            .iter()
            .filter(|(c, s)| !s.subscribers.is_empty() && !self.local.contains(c))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Local channels that currently have subscribers.
    pub fn demanded_local(&self) -> Vec<ChannelId> {
        self.channels
            .iter()
            .filter(|(c, s)| !s.subscribers.is_empty() && self.local.contains(c))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Channels whose upstream is `addr`.
    pub fn fed_by(&self, addr: PeerId) -> Vec<ChannelId> {
        self.channels
            .iter()
            .filter(|(_, s)| s.upstream == Some(Upstream::Node(addr)))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Every distinct upstream host in use.
    pub fn upstream_hosts(&self) -> BTreeSet<PeerId> {
        self.channels
            .values()
            .filter_map(|s| match s.upstream {
                Some(Upstream::Node(u)) => Some(u),
                _ => None,
            })
            .collect()
    }

    /// Per watched channel: its subscribers and upstream.
    pub fn snapshot(&self) -> BTreeMap<ChannelId, (Vec<PeerId>, Option<Upstream>)> {
        self.channels
            .iter()
            .map(|(c, s)| (*c, (s.subscribers.iter().copied().collect(), s.upstream)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> PeerId {
        PeerId::from(common::NodeId(u64::from(n)))
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn first_subscriber_subscribes_upstream_and_last_unsubscribes() {
        let t = Instant::now();
        let ch = ChannelId(1);
        let mut s = Subscriptions::new(TIMEOUT);
        let a = s.subscribe(t, addr(3), ch, Some(addr(1))).unwrap();
        assert_eq!(a, vec![SubAction::Subscribe(ch, addr(1))]);
        assert_eq!(s.upstream(ch), Some(Upstream::Node(addr(1))));
        // Second subscriber: nothing to do.
        assert!(s
            .subscribe(t, addr(4), ch, Some(addr(2)))
            .unwrap()
            .is_empty());
        assert!(s
            .subscribe(t, addr(4), ch, Some(addr(2)))
            .unwrap()
            .is_empty());
        assert_eq!(
            s.subscribers(ch).collect::<Vec<_>>(),
            vec![addr(3), addr(4)]
        );
        assert_eq!(s.fed_by(addr(1)), vec![ch]);
        assert!(s.unsubscribe(addr(3), ch).is_empty());
        assert_eq!(
            s.unsubscribe(addr(4), ch),
            vec![SubAction::Unsubscribe(ch, addr(1))]
        );
        assert_eq!(s.upstream(ch), None);
        assert!(s.wanted().is_empty());
        // Unsubscribing what was never subscribed is harmless.
        assert!(s.unsubscribe(addr(9), ch).is_empty());
    }

    #[test]
    fn upstream_can_come_later_and_change() {
        let t = Instant::now();
        let ch = ChannelId(2);
        let mut s = Subscriptions::new(TIMEOUT);
        assert!(s.subscribe(t, addr(3), ch, None).unwrap().is_empty());
        assert_eq!(s.wanted(), vec![ch]);
        assert_eq!(
            s.set_upstream(ch, Some(addr(1))),
            vec![SubAction::Subscribe(ch, addr(1))]
        );
        assert!(s.set_upstream(ch, Some(addr(1))).is_empty());
        assert_eq!(
            s.set_upstream(ch, Some(addr(2))),
            vec![
                SubAction::Unsubscribe(ch, addr(1)),
                SubAction::Subscribe(ch, addr(2))
            ]
        );
        assert_eq!(
            s.upstream_hosts().into_iter().collect::<Vec<_>>(),
            vec![addr(2)]
        );
        // A subscriber never becomes its own upstream.
        let ch2 = ChannelId(3);
        assert!(s
            .subscribe(t, addr(5), ch2, Some(addr(5)))
            .unwrap()
            .is_empty());
        // Unwatched channels have no upstream to set.
        assert!(s.set_upstream(ChannelId(99), Some(addr(1))).is_empty());
    }

    #[test]
    fn silent_subscribers_expire_and_touch_refreshes() {
        let t = Instant::now();
        let ch = ChannelId(1);
        let mut s = Subscriptions::new(TIMEOUT);
        s.subscribe(t, addr(3), ch, Some(addr(1))).unwrap();
        s.subscribe(t, addr(4), ch, Some(addr(1))).unwrap();
        s.touch(t + Duration::from_secs(4), addr(4));
        let e = s.expire(t + Duration::from_secs(5));
        assert!(e.dropped.is_empty(), "not yet");
        let e = s.expire(t + Duration::from_millis(5001));
        assert_eq!(e.dropped, vec![(ch, addr(3))]);
        assert!(e.actions.is_empty(), "4 still watches");
        let e = s.expire(t + Duration::from_millis(9001));
        assert_eq!(e.dropped, vec![(ch, addr(4))]);
        assert_eq!(e.actions, vec![SubAction::Unsubscribe(ch, addr(1))]);
        assert!(s.snapshot().is_empty());
    }

    #[test]
    fn local_demand_transitions() {
        let t = Instant::now();
        let (ch, other) = (ChannelId(1), ChannelId(2));
        let mut s = Subscriptions::new(TIMEOUT);
        assert!(s.set_local(&[ch]).is_empty());
        assert_eq!(
            s.subscribe(t, addr(3), ch, Some(addr(9))).unwrap(),
            vec![SubAction::LocalDemand(ch, true)]
        );
        assert_eq!(s.upstream(ch), Some(Upstream::Local));
        assert!(s.subscribe(t, addr(4), ch, None).unwrap().is_empty());
        assert!(
            s.set_upstream(ch, Some(addr(9))).is_empty(),
            "local stays local"
        );
        assert!(s.drop_peer(addr(3)).is_empty());
        assert_eq!(s.demanded_local(), vec![ch]);
        assert_eq!(
            s.drop_peer(addr(4)),
            vec![SubAction::LocalDemand(ch, false)]
        );
        // A relayed channel that becomes local: unsubscribe upstream, demand at once.
        s.subscribe(t, addr(5), other, Some(addr(1))).unwrap();
        assert_eq!(
            s.set_local(&[ch, other]),
            vec![
                SubAction::Unsubscribe(other, addr(1)),
                SubAction::LocalDemand(other, true)
            ]
        );
        // A local channel removed: its subscribers are dropped.
        assert_eq!(
            s.set_local(&[ch]),
            vec![SubAction::LocalDemand(other, false)]
        );
        assert!(!s.is_subscriber(addr(5), other));
        assert!(s.snapshot().is_empty());
    }

    #[test]
    fn subscriber_count_is_bounded() {
        let t = Instant::now();
        let mut s = Subscriptions::new(TIMEOUT);
        for i in 0..Subscriptions::MAX_CHANNELS_PER_PEER as u64 {
            s.subscribe(t, addr(3), ChannelId(i), None).unwrap();
        }
        assert_eq!(
            s.subscribe(t, addr(3), ChannelId(1000), None),
            Err(SubscribeError::TooManyChannels)
        );
    }
}

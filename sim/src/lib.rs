//! # sim — whole overlays on a fake clock
//!
//! A deterministic simulation harness in the style of quinn-proto's test utilities: the
//! I/O-free cores of every host — server origins and relays ([`node::RelayCore`]) and viewers
//! ([`client::host::ClientHost`]) — exchange their real encoded datagrams over a virtual network
//! with a per-hop latency, optional seeded impairment per sending host ([`common::impair`]: loss,
//! bursts, delay, jitter, reordering, duplication, blackouts), hosts that die, and links that go
//! down. Time is a fake `Instant` that jumps straight to the next thing due (a datagram's
//! arrival, a core's `poll_timeout`, an impairment's release, a source's next chunk): an hour of
//! overlay runs in seconds, and the same seed gives the same run, datagram for datagram.
//!
//! An origin is a `RelayCore` with local channels fed by a synthetic source while the channel
//! is demanded (exactly what a server does): one chunk every [`SourceConfig::interval`], a
//! keyframe every [`SourceConfig::gop`] chunks, each chunk carrying its running number in its
//! first 8 bytes. A viewer plays channels; what its jitter buffer releases (what the player
//! would get) is checked by number: [`Viewing`] counts what was delivered, duplicates (must be
//! none), what is missing, and the silences between releases (the longest, and the longest
//! ending after an instant, e.g. a kill).
//!
//! Writing a scenario: build a [`Net`], add hosts ([`Net::add_relay`], [`Net::add_origin`],
//! [`Net::add_viewer`]) with their neighbours, [`Net::play`], [`Net::run_for`], then
//! [`Net::kill`] / [`Net::set_link`] / [`Net::stop`] and run again; assert on
//! [`Net::viewing`] and [`Net::link_counts`]. See `tests/scenarios.rs`.

use bytes::Bytes;
use client::core::CoreConfig;
use client::host::ClientHost;
use common::impair::{ImpairConfig, Impairment};
use common::keys::{KeyPair, PublicKey, Secret};
use common::reliable::ReliableConfig;
use common::secure::{Secure, SecureConfig};
use common::wire::{Body, ChannelId, ChannelInfo, Datagram, PathHop};
use common::{NodeId, PeerId};
use node::{RelayCommand, RelayConfig, RelayCore, RelayEvent};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The overlay port of every host.
pub const PORT: u16 = 8010;

/// The overlay address of `ip`.
pub fn addr(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("an IP address"), PORT)
}

/// The overlay hop of `ip` (its id is derived from its address, as the bootstrapper does).
pub fn hop(ip: &str) -> PathHop {
    let a = addr(ip);
    PathHop {
        id: NodeId::for_ip(a.ip()),
        addr: a,
    }
}

/// A channel by name.
pub fn channel(name: &str) -> ChannelInfo {
    ChannelInfo {
        id: ChannelId::of_name(name),
        name: name.into(),
    }
}

/// How an origin's synthetic source produces a channel.
#[derive(Debug, Clone, Copy)]
pub struct SourceConfig {
    /// One chunk every this long. Default 10 ms (100 datagrams/s).
    pub interval: Duration,
    /// A keyframe every this many chunks. Default 50 (0.5 s).
    pub gop: u64,
    /// Bytes per chunk (at least 16: its number, its origin). Default 1316.
    pub len: usize,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            interval: Duration::from_millis(10),
            gop: 50,
            len: 1316,
        }
    }
}

#[derive(Debug)]
struct Source {
    channel: ChannelId,
    /// Written after the number, so a viewer tells replicas apart.
    origin: u64,
    cfg: SourceConfig,
    demanded: bool,
    next: Instant,
    counter: u64,
}

/// What a viewer saw of one channel: the chunks its jitter buffer released, by origin and
/// number (replicas of a channel number their chunks independently).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Viewing {
    seen: BTreeMap<u64, BTreeSet<u64>>,
    /// The origin of the latest chunk released.
    origin: u64,
    /// Chunks released more than once (a duplicate reached the player).
    pub duplicates: u64,
    /// When the first and the latest chunk were released.
    pub first_at: Option<Instant>,
    /// The latest release.
    pub last_at: Option<Instant>,
    /// Every silence between two releases longer than 50 ms: (end, length).
    pub gaps: Vec<(Instant, Duration)>,
}

impl Viewing {
    fn release(&mut self, now: Instant, origin: u64, n: u64) {
        self.origin = origin;
        if !self.seen.entry(origin).or_default().insert(n) {
            self.duplicates += 1;
        }
        if let Some(l) = self.last_at {
            let g = now.saturating_duration_since(l);
            if g > Duration::from_millis(50) {
                self.gaps.push((now, g));
            }
        }
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
    }

    /// Distinct chunks released.
    pub fn delivered(&self) -> u64 {
        self.seen.values().map(|s| s.len() as u64).sum()
    }

    /// Chunks never released between the first and the last released of each origin.
    pub fn missing(&self) -> u64 {
        self.seen
            .values()
            .map(|s| match (s.first(), s.last()) {
                (Some(a), Some(b)) => b - a + 1 - s.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// How many origins (replicas) the chunks came from.
    pub fn origins(&self) -> usize {
        self.seen.len()
    }

    /// Released / (released + missing).
    pub fn delivered_ratio(&self) -> f64 {
        let d = self.delivered() as f64;
        if d == 0.0 {
            return 0.0;
        }
        d / (d + self.missing() as f64)
    }

    /// Distinct chunks of the latest origin released numbered at least `n`.
    pub fn delivered_from(&self, n: u64) -> u64 {
        self.seen
            .get(&self.origin)
            .map_or(0, |s| s.range(n..).count() as u64)
    }

    /// The highest number released of the latest origin.
    pub fn latest(&self) -> Option<u64> {
        self.seen.get(&self.origin)?.last().copied()
    }

    /// The longest silence that ended after `t` (zero if none over 50 ms), or, if nothing was
    /// released since `t`, the time from `t` to `now`.
    pub fn gap_after(&self, t: Instant, now: Instant) -> Duration {
        if self.last_at.is_none_or(|l| l < t) {
            return now.saturating_duration_since(t);
        }
        self.gaps
            .iter()
            .filter(|(end, _)| *end > t)
            .map(|(_, g)| *g)
            .max()
            .unwrap_or_default()
    }

    /// The longest silence of the whole run.
    pub fn longest_gap(&self) -> Duration {
        self.gaps.iter().map(|(_, g)| *g).max().unwrap_or_default()
    }
}

enum Kind {
    Relay {
        core: Box<RelayCore>,
        sources: Vec<Source>,
    },
    Viewer {
        host: Box<ClientHost>,
        viewing: BTreeMap<ChannelId, Viewing>,
    },
}

struct Host {
    kind: Kind,
    shim: Option<Impairment>,
}

/// Datagrams per directed link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCount {
    /// Control datagrams (everything but video).
    pub control: u64,
    /// Video datagrams.
    pub video: u64,
}

/// A datagram in flight: (arrival, order of sending, from, to, bytes).
type Flight = (Instant, u64, SocketAddr, SocketAddr, Bytes);

/// A whole overlay on a fake clock (see the crate docs).
pub struct Net {
    now: Instant,
    start: Instant,
    seed: u64,
    hosts: BTreeMap<SocketAddr, Host>,
    /// In flight: (arrival, order, from, to, bytes).
    flights: BinaryHeap<Reverse<Flight>>,
    order: u64,
    /// One-way latency of every hop.
    pub latency: Duration,
    dead: BTreeSet<SocketAddr>,
    down: BTreeSet<(SocketAddr, SocketAddr)>,
    counts: BTreeMap<(SocketAddr, SocketAddr), LinkCount>,
    /// Count datagrams per link (decodes every datagram once more; on by default).
    pub count_links: bool,
    /// Whether hosts seal and authenticate every datagram, as the daemons do (the network
    /// key and the member directory are the harness's).
    secure: bool,
    network: Secret,
    members: Vec<(PeerId, PublicKey)>,
    /// Smallest source chunk (for telling sealed video by size).
    video_min: usize,
    /// Datagrams sent to the tapped host, as (from, bytes) (an attacker on the path).
    tap: Option<(SocketAddr, Vec<(SocketAddr, Bytes)>)>,
}

fn pair(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Net {
    /// An empty network of hosts that authenticate and encrypt every datagram (as the daemons
    /// do); `seed` seeds every host's randomness and impairment.
    pub fn new(seed: u64) -> Net {
        Net::with_security(seed, true)
    }

    /// An empty network of plaintext hosts (the benchmark's comparison).
    pub fn plaintext(seed: u64) -> Net {
        Net::with_security(seed, false)
    }

    pub(crate) fn with_security(seed: u64, secure: bool) -> Net {
        let now = Instant::now();
        Net {
            now,
            start: now,
            seed,
            hosts: BTreeMap::new(),
            flights: BinaryHeap::new(),
            order: 0,
            latency: Duration::from_millis(1),
            dead: BTreeSet::new(),
            down: BTreeSet::new(),
            counts: BTreeMap::new(),
            count_links: true,
            secure,
            network: Secret::random(),
            members: Vec::new(),
            video_min: usize::MAX,
            tap: None,
        }
    }

    /// The fake clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn host_seed(&self, a: SocketAddr) -> u64 {
        common::rng::fnv1a64(a.to_string().bytes()) ^ self.seed
    }

    /// A relay at `ip` with these neighbours.
    pub fn add_relay(&mut self, ip: &str, neighbours: &[&str], cfg: RelayConfig) {
        let me = hop(ip);
        let n: Vec<PathHop> = neighbours.iter().map(|n| hop(n)).collect();
        let seed = self.host_seed(me.addr);
        let mut core = RelayCore::new(me, &n, cfg, self.now, seed);
        if self.secure {
            let keys = KeyPair::generate();
            self.members.push((me.id, keys.public));
            core = core.with_secure(Secure::new(SecureConfig::member(
                keys,
                self.network.clone(),
                1,
                seed,
            )));
        }
        self.hosts.insert(
            me.addr,
            Host {
                kind: Kind::Relay {
                    core: Box::new(core),
                    sources: Vec::new(),
                },
                shim: None,
            },
        );
        if self.secure {
            // Every member learns the new one (what the bootstrapper hands out).
            let now = self.now;
            let members = self.members.clone();
            let relays: Vec<SocketAddr> = self.hosts.keys().copied().collect();
            for a in relays {
                if let Some(Host {
                    kind: Kind::Relay { core, .. },
                    ..
                }) = self.hosts.get_mut(&a)
                {
                    core.handle_command(now, RelayCommand::SetMembers(members.clone()));
                }
            }
        }
    }

    /// A server origin at `ip`: a relay announcing `channels`, each fed by a synthetic source
    /// while demanded.
    pub fn add_origin(
        &mut self,
        ip: &str,
        neighbours: &[&str],
        cfg: RelayConfig,
        channels: &[&str],
        source: SourceConfig,
    ) {
        self.add_relay(ip, neighbours, cfg);
        let now = self.now;
        let Some(Host {
            kind: Kind::Relay { core, sources },
            ..
        }) = self.hosts.get_mut(&addr(ip))
        else {
            unreachable!("just added");
        };
        core.handle_command(
            now,
            RelayCommand::SetLocal(channels.iter().map(|c| channel(c)).collect()),
        );
        self.video_min = self.video_min.min(source.len.max(16));
        for c in channels {
            sources.push(Source {
                channel: ChannelId::of_name(c),
                origin: common::rng::fnv1a64(ip.bytes()),
                cfg: source,
                demanded: false,
                next: now,
                counter: 0,
            });
        }
        self.flush(addr(ip));
    }

    /// Takes the relay (or origin) at `at` out of the network, with its state (sessions,
    /// subscribers, routes): a benchmark then drives it directly. Its synthetic sources stay.
    pub fn take_relay(&mut self, at: SocketAddr) -> Option<RelayCore> {
        if !matches!(self.hosts.get(&at)?.kind, Kind::Relay { .. }) {
            return None;
        }
        match self.hosts.remove(&at)?.kind {
            Kind::Relay { core, .. } => Some(*core),
            Kind::Viewer { .. } => None,
        }
    }

    /// A viewer at `at` (any address) whose PoPs are `pops` (overlay IPs).
    pub fn add_viewer(&mut self, at: SocketAddr, pops: &[&str], cfg: CoreConfig) {
        let pops: Vec<SocketAddr> = pops.iter().map(|p| addr(p)).collect();
        let seed = self.host_seed(at);
        let mut host = ClientHost::new(
            cfg,
            &pops,
            NodeId(seed | 1),
            seed,
            ReliableConfig::default(),
            self.now,
        );
        if self.secure {
            host = host.with_secure(Secure::new(SecureConfig::viewer(None, seed)));
        }
        self.hosts.insert(
            at,
            Host {
                kind: Kind::Viewer {
                    host: Box::new(host),
                    viewing: BTreeMap::new(),
                },
                shim: None,
            },
        );
    }

    /// Impairs everything host `at` sends (`spec` in the `--impair` grammar; a `seed=` is
    /// added from the net's seed and the host unless given).
    pub fn impair(&mut self, at: SocketAddr, spec: &str) {
        let spec = if spec.contains("seed=") {
            spec.to_string()
        } else {
            format!("{spec},seed={}", self.host_seed(at) >> 1)
        };
        let cfg = ImpairConfig::parse_many(&[spec]).expect("a valid impairment");
        let now = self.now;
        if let Some(h) = self.hosts.get_mut(&at) {
            h.shim = Some(Impairment::new(cfg, now));
        }
    }

    /// Impairs every host's sending.
    pub fn impair_all(&mut self, spec: &str) {
        let all: Vec<SocketAddr> = self.hosts.keys().copied().collect();
        for a in all {
            self.impair(a, spec);
        }
    }

    /// The viewer at `at` starts playing `name`.
    pub fn play(&mut self, at: SocketAddr, name: &str) {
        let now = self.now;
        if let Some(Host {
            kind: Kind::Viewer { host, .. },
            ..
        }) = self.hosts.get_mut(&at)
        {
            host.play(now, name);
        }
        self.flush(at);
    }

    /// The viewer at `at` stops playing `name`.
    pub fn stop(&mut self, at: SocketAddr, name: &str) {
        let now = self.now;
        if let Some(Host {
            kind: Kind::Viewer { host, .. },
            ..
        }) = self.hosts.get_mut(&at)
        {
            host.stop(now, name, "user");
        }
        self.flush(at);
    }

    /// The host at `at` dies (SIGKILL): it does nothing more, datagrams to it vanish.
    pub fn kill(&mut self, at: SocketAddr) {
        self.dead.insert(at);
    }

    /// The host at `at` is reached at `to` from now on (a viewer behind a NAT that rebinds its
    /// port): what it sends comes from `to`, datagrams still addressed to `at` vanish.
    pub fn rebind(&mut self, at: SocketAddr, to: SocketAddr) {
        if let Some(h) = self.hosts.remove(&at) {
            self.hosts.insert(to, h);
        }
    }

    /// The link between `a` and `b` carries nothing while down (both directions).
    pub fn set_link(&mut self, a: SocketAddr, b: SocketAddr, up: bool) {
        if up {
            self.down.remove(&pair(a, b));
        } else {
            self.down.insert(pair(a, b));
        }
    }

    /// What the viewer at `at` saw of `name`.
    pub fn viewing(&self, at: SocketAddr, name: &str) -> Viewing {
        match self.hosts.get(&at).map(|h| &h.kind) {
            Some(Kind::Viewer { viewing, .. }) => viewing
                .get(&ChannelId::of_name(name))
                .cloned()
                .unwrap_or_default(),
            _ => Viewing::default(),
        }
    }

    /// The relay core at `at` (stats, routes).
    pub fn relay(&self, at: SocketAddr) -> Option<&RelayCore> {
        match self.hosts.get(&at).map(|h| &h.kind) {
            Some(Kind::Relay { core, .. }) => Some(core),
            _ => None,
        }
    }

    /// The viewer at `at`.
    pub fn viewer(&self, at: SocketAddr) -> Option<&ClientHost> {
        match self.hosts.get(&at).map(|h| &h.kind) {
            Some(Kind::Viewer { host, .. }) => Some(host),
            _ => None,
        }
    }

    /// The overlay host the relay at `at` takes `name` from (its primary upstream).
    pub fn upstream_of(&self, at: SocketAddr, name: &str) -> Option<SocketAddr> {
        let up = self
            .relay(at)?
            .stats()
            .upstreams
            .get(&ChannelId::of_name(name))
            .copied()?;
        match up {
            node::subscriptions::Upstream::Node(id) => self
                .hosts
                .keys()
                .find(|a| NodeId::for_ip(a.ip()) == id)
                .copied(),
            node::subscriptions::Upstream::Local => Some(at),
        }
    }

    /// Whether origin `at` feeds `name` (someone downstream watches it).
    pub fn demanded(&self, at: SocketAddr, name: &str) -> bool {
        match self.hosts.get(&at).map(|h| &h.kind) {
            Some(Kind::Relay { sources, .. }) => sources
                .iter()
                .any(|s| s.channel == ChannelId::of_name(name) && s.demanded),
            _ => false,
        }
    }

    /// Datagrams sent per directed link (from, to) since the start or the last reset.
    pub fn link_counts(&self) -> &BTreeMap<(SocketAddr, SocketAddr), LinkCount> {
        &self.counts
    }

    /// Forgets the link counts.
    pub fn reset_counts(&mut self) {
        self.counts.clear();
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    /// Runs until `end`, handling everything due, in time order.
    pub fn run_until(&mut self, end: Instant) {
        let mut stuck = 0u32;
        while let Some(t) = self.next_event() {
            if t > end {
                break;
            }
            if t <= self.now {
                stuck += 1;
                assert!(
                    stuck < 100_000,
                    "the simulation does not advance at {:?}",
                    self.elapsed()
                );
            } else {
                stuck = 0;
                self.now = t;
            }
            self.step();
        }
        self.now = self.now.max(end);
    }

    fn next_event(&self) -> Option<Instant> {
        let mut t = self.flights.peek().map(|Reverse(f)| f.0);
        let mut min = |x: Instant| t = Some(t.map_or(x, |t: Instant| t.min(x)));
        for (a, h) in &self.hosts {
            if let Some(s) = h.shim.as_ref().and_then(Impairment::poll_timeout) {
                min(s);
            }
            if self.dead.contains(a) {
                continue;
            }
            match &h.kind {
                Kind::Relay { core, sources } => {
                    min(core.poll_timeout());
                    for s in sources.iter().filter(|s| s.demanded) {
                        min(s.next);
                    }
                }
                Kind::Viewer { host, .. } => min(host.poll_timeout()),
            }
        }
        t
    }

    /// Handles everything due at `now`.
    fn step(&mut self) {
        let now = self.now;
        while let Some(Reverse(f)) = self.flights.peek() {
            if f.0 > now {
                break;
            }
            let Reverse((_, _, from, to, bytes)) = self.flights.pop().expect("peeked");
            if self.dead.contains(&to) || self.down.contains(&pair(from, to)) {
                continue;
            }
            let Some(h) = self.hosts.get_mut(&to) else {
                continue;
            };
            match &mut h.kind {
                Kind::Relay { core, .. } => core.handle_datagram(now, from, bytes),
                Kind::Viewer { host, .. } => {
                    host.handle_datagram(now, from, bytes);
                }
            }
            self.flush(to);
        }
        let addrs: Vec<SocketAddr> = self.hosts.keys().copied().collect();
        for a in addrs {
            if !self.dead.contains(&a) {
                let h = self.hosts.get_mut(&a).expect("listed");
                match &mut h.kind {
                    Kind::Relay { core, sources } => {
                        if core.poll_timeout() <= now {
                            core.handle_timeout(now);
                        }
                        for s in sources.iter_mut().filter(|s| s.demanded && s.next <= now) {
                            let mut payload = vec![0u8; s.cfg.len.max(16)];
                            payload[..8].copy_from_slice(&s.counter.to_be_bytes());
                            payload[8..16].copy_from_slice(&s.origin.to_be_bytes());
                            let keyframe = s.counter.is_multiple_of(s.cfg.gop.max(1));
                            core.handle_command(
                                now,
                                RelayCommand::LocalVideo {
                                    channel: s.channel,
                                    payload: Bytes::from(payload),
                                    keyframe,
                                },
                            );
                            s.counter += 1;
                            s.next += s.cfg.interval;
                        }
                    }
                    Kind::Viewer { host, .. } => {
                        if host.poll_timeout() <= now {
                            host.handle_timeout(now);
                        }
                    }
                }
                self.flush(a);
            }
            // An impairment's held datagrams are released even after its host died (they
            // were on the wire).
            self.release(a);
        }
    }

    /// Moves what host `at` decided into its send path and its events into the harness.
    fn flush(&mut self, at: SocketAddr) {
        let now = self.now;
        let Some(h) = self.hosts.get_mut(&at) else {
            return;
        };
        let mut out: Vec<(SocketAddr, Bytes)> = Vec::new();
        match &mut h.kind {
            Kind::Relay { core, sources } => {
                while let Some(tx) = core.poll_transmit() {
                    out.push((tx.to, tx.bytes));
                }
                while let Some(ev) = core.poll_event() {
                    let RelayEvent::LocalDemand { channel, watched } = ev;
                    for s in sources.iter_mut().filter(|s| s.channel == channel) {
                        if watched && !s.demanded {
                            s.next = now;
                        }
                        s.demanded = watched;
                    }
                }
            }
            Kind::Viewer { host, viewing } => {
                while let Some((to, bytes)) = host.poll_transmit() {
                    out.push((to, bytes));
                }
                while host.poll_event().is_some() {}
                while let Some((ch, payload)) = host.poll_output() {
                    if payload.len() >= 16 {
                        let n = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                        let o = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
                        viewing.entry(ch).or_default().release(now, o, n);
                    }
                }
            }
        }
        match &mut h.shim {
            Some(shim) => {
                for (to, bytes) in out {
                    shim.push(now, to, bytes);
                }
                self.release(at);
            }
            None => {
                for (to, bytes) in out {
                    self.send(at, to, bytes);
                }
            }
        }
    }

    fn release(&mut self, at: SocketAddr) {
        let now = self.now;
        let mut out = Vec::new();
        if let Some(shim) = self.hosts.get_mut(&at).and_then(|h| h.shim.as_mut()) {
            while let Some(d) = shim.poll_transmit(now) {
                out.push(d);
            }
        }
        for (to, bytes) in out {
            self.send(at, to, bytes);
        }
    }

    /// Records from now on every datagram sent to `at` (see [`tapped`](Self::tapped)).
    pub fn tap(&mut self, at: SocketAddr) {
        self.tap = Some((at, Vec::new()));
    }

    /// What the tap recorded: (from, bytes).
    pub fn tapped(&self) -> &[(SocketAddr, Bytes)] {
        self.tap.as_ref().map_or(&[], |t| &t.1)
    }

    /// Puts a datagram on the wire as if `from` had sent it (an attacker: any source).
    pub fn inject(&mut self, from: SocketAddr, to: SocketAddr, bytes: Bytes) {
        self.order += 1;
        self.flights.push(Reverse((
            self.now + self.latency,
            self.order,
            from,
            to,
            bytes,
        )));
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, bytes: Bytes) {
        if let Some((at, log)) = &mut self.tap {
            if *at == to {
                log.push((from, bytes.clone()));
            }
        }
        if self.count_links {
            // Sealed datagrams cannot be read here: video is told by its size (a source's
            // chunk is larger than any control message of the scenarios).
            let video = if self.secure {
                bytes.len() >= common::secure::OVERHEAD + self.video_min
            } else {
                matches!(Datagram::decode(&bytes).map(|d| d.body), Ok(Body::Video(_)))
            };
            let c = self.counts.entry((from, to)).or_default();
            if video {
                c.video += 1;
            } else {
                c.control += 1;
            }
        }
        self.inject(from, to, bytes);
    }
}

/// An overlay of `ips` and their neighbours from a topology text (the bootstrapper's TOML).
pub fn neighbours_of(toml: &str) -> BTreeMap<String, Vec<String>> {
    let (t, _) = common::topology::Topology::parse(toml).expect("a valid topology");
    t.hosts()
        .map(|h: IpAddr| {
            (
                h.to_string(),
                t.neighbours(h)
                    .unwrap_or_default()
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
            )
        })
        .collect()
}

/// CPU time this process has used (user + system).
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A seeded random overlay: `relays` relays (connected, average degree about 3.5: a random
/// spanning tree plus random extra links), `servers` origins each with one channel (`ch0`, …)
/// and two relay neighbours, and `viewers` viewers each at a random relay (its PoP), each
/// playing a random channel. Returns the net and the viewers with their channel.
pub fn random_overlay(
    seed: u64,
    relays: usize,
    servers: usize,
    viewers: usize,
) -> (Net, Vec<(SocketAddr, String)>) {
    random_overlay_with(seed, relays, servers, viewers, true)
}

/// [`random_overlay`], encrypted or (`secure = false`, the benchmark's comparison) not.
pub fn random_overlay_with(
    seed: u64,
    relays: usize,
    servers: usize,
    viewers: usize,
    secure: bool,
) -> (Net, Vec<(SocketAddr, String)>) {
    let g = common::topology::RandomOverlay::new(seed, relays, servers, viewers);
    let mut net = Net::with_security(seed, secure);
    for (s, (ip, n)) in g.servers.iter().enumerate() {
        let names: Vec<String> = n.iter().map(IpAddr::to_string).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        net.add_origin(
            &ip.to_string(),
            &names,
            RelayConfig::default(),
            &[&format!("ch{s}")],
            SourceConfig::default(),
        );
    }
    for (ip, n) in g.relays.iter().zip(&g.neighbours) {
        let n: Vec<String> = n.iter().map(IpAddr::to_string).collect();
        let n: Vec<&str> = n.iter().map(String::as_str).collect();
        net.add_relay(&ip.to_string(), &n, RelayConfig::default());
    }
    let mut out = Vec::new();
    for (v, (pop, ch)) in g.viewers.iter().enumerate() {
        let at: SocketAddr = format!("127.0.76.{}:9000", v + 1).parse().expect("literal");
        net.add_viewer(at, &[&pop.to_string()], CoreConfig::default());
        out.push((at, format!("ch{ch}")));
    }
    (net, out)
}

/// Directed links (one per direction of a link) that carried anything, and the control /
/// video datagrams each carried per second over `secs`.
pub fn per_link_rates(net: &Net, secs: f64) -> (usize, f64, f64) {
    let (c, v) = net
        .link_counts()
        .values()
        .fold((0, 0), |(c, v), l| (c + l.control, v + l.video));
    let n = net.link_counts().len().max(1) as f64;
    (
        net.link_counts().len(),
        c as f64 / n / secs,
        v as f64 / n / secs,
    )
}

//! Seeded, deterministic network impairment shim (an in-process `tc netem`).
//!
//! Every daemon runs its outgoing datagrams through an [`Impairment`] when started with
//! `--impair SPEC` (a testing aid), and the deterministic simulation tests drive it with a
//! fake clock. It is I/O-free: it never reads a clock and never touches a socket; the caller
//! passes `now` to [`Impairment::push`] and [`Impairment::poll_transmit`], and sleeps until
//! [`Impairment::poll_timeout`].
//!
//! # SPEC grammar
//!
//! A SPEC is one or more *rules* separated by `;`. A rule is a comma-separated list of
//! `key=value` items (whitespace around items is ignored), or `none` / an empty string for
//! "no impairment".
//!
//! | key | value | meaning |
//! |-----|-------|---------|
//! | `loss=P` | probability | i.i.d. random loss |
//! | `burst=N` | mean burst length, `N ≥ 1` (needs `loss`) | turns `loss` into Gilbert–Elliott bursty loss with the same average rate |
//! | `ge=PGB/PBG[/H]` | probabilities | expert Gilbert–Elliott: p(good→bad), p(bad→good), loss in the bad state `H` (default 100 %); excludes `loss`/`burst` |
//! | `delay=D` | duration | fixed one-way delay |
//! | `jitter=J` | duration | uniform extra delay in `[-J, +J]`, total clamped at ≥ 0 (may reorder, as netem does) |
//! | `dup=P` | probability | send a second copy (it gets its own jitter/reorder draw) |
//! | `reorder=P` | probability | hold a datagram back by an extra `gap` so later ones overtake it |
//! | `gap=D` | duration (default `10ms`) | the extra hold of `reorder` |
//! | `corrupt=P` | probability | flip one random bit of one random byte (of a copy) |
//! | `blackout=AT+DUR[/EVERY]` | durations | drop everything sent in `[start+AT, start+AT+DUR)`, repeating every `EVERY` if given; the key may be repeated |
//! | `seed=N` | `u64` (default 0) | seed of this rule's random streams |
//! | `to=IP` or `to=IP:PORT` | address | the rule applies only to datagrams sent to that peer |
//!
//! * A probability is written `5%` or `0.05` and must lie in `[0, 1]`.
//! * Durations use humantime syntax: `20ms`, `1s`, `1s 500ms`, `250us`; `delay`, `jitter`
//!   and `gap` are limited to one hour.
//! * `burst=N` models loss as a two-state Markov chain: the bad state drops every datagram,
//!   p(bad→good) = 1/N (so bursts average N datagrams) and p(good→bad) is chosen so the
//!   stationary loss rate equals `loss`. That requires `loss ≤ N/(N+1)`.
//! * Unknown keys, repeated keys (other than `blackout`), malformed values and out-of-range
//!   probabilities are errors naming the offending item.
//! * The rule without `to` is the default for every peer no rule names; at most one default
//!   rule and one rule per `to` value are allowed (also across repeated `--impair` flags).
//!   A `to=IP:PORT` rule wins over a `to=IP` rule, which wins over the default. A rule of
//!   just `to=…` exempts that peer from the default rule.
//! * Each rule has its own random streams derived from its `seed` and its `to` value, so
//!   adding or removing another rule never changes this rule's sequence, and each effect
//!   (loss, corruption, duplication, delay, reordering) draws from its own stream, so e.g.
//!   changing `dup` does not change which datagrams are lost.
//!
//! Examples:
//!
//! ```text
//! loss=5%,delay=20ms,jitter=5ms,dup=1%,reorder=2%,seed=7
//! loss=1%,burst=2                        ~1 % loss in bursts averaging 2 datagrams
//! ge=1%/30%/80%                          expert Gilbert–Elliott
//! blackout=5s+2s,blackout=20s+1s         two outages
//! blackout=10s+1s/30s                    a 1 s outage at 10 s, 40 s, 70 s, …
//! delay=50ms;to=127.0.0.1:7001,loss=20%  20 % loss towards one peer, 50 ms delay to the rest
//! none                                   no impairment
//! ```
//!
//! # Order of operations
//!
//! For each pushed datagram, with the rule selected by its destination:
//! 1. **blackout** — dropped if pushed inside a blackout window;
//! 2. **loss** — dropped by the Gilbert–Elliott chain (`burst`/`ge`) or i.i.d. `loss`;
//! 3. **corrupt** — replaced by a copy with one bit flipped (the caller's buffer is untouched);
//! 4. **duplicate** — a second copy is made;
//! 5. **delay** — each copy is held for `delay ± jitter` (+ `gap` if picked for `reorder`);
//! 6. **queue** — held in a heap keyed by (due time, push sequence); a datagram with zero
//!    delay is due immediately.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::rng::Rng;

/// Default extra hold applied to datagrams picked by `reorder`.
pub const DEFAULT_REORDER_GAP: Duration = Duration::from_millis(10);

/// Upper bound accepted for `delay`, `jitter` and `gap`.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Error parsing an impairment SPEC; the message names the offending item and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("impair spec: `{item}`: {reason}")]
pub struct ImpairParseError {
    /// The key the error is about (`loss`, `burst`, `to`, …; the raw item if it had no key).
    pub key: String,
    /// The offending item (or rule) as written.
    pub item: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ImpairParseError {
    fn new(key: &str, item: &str, reason: impl Into<String>) -> Self {
        ImpairParseError {
            key: key.to_string(),
            item: item.to_string(),
            reason: reason.into(),
        }
    }
}

/// Which datagrams a per-peer rule applies to (`to=IP` or `to=IP:PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerMatch {
    /// Any port on this IP address.
    Ip(IpAddr),
    /// Exactly this address and port.
    Addr(SocketAddr),
}

impl PeerMatch {
    /// Whether a datagram sent to `dst` is covered by this match (IPv4-mapped IPv6
    /// addresses are treated as their IPv4 equivalent).
    pub fn matches(&self, dst: SocketAddr) -> bool {
        match self {
            PeerMatch::Ip(ip) => ip.to_canonical() == dst.ip().to_canonical(),
            PeerMatch::Addr(a) => {
                a.port() == dst.port() && a.ip().to_canonical() == dst.ip().to_canonical()
            }
        }
    }
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatch::Ip(ip) => write!(f, "{ip}"),
            PeerMatch::Addr(a) => write!(f, "{a}"),
        }
    }
}

impl FromStr for PeerMatch {
    type Err = ImpairParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = s.trim();
        if let Ok(a) = v.parse::<SocketAddr>() {
            return Ok(PeerMatch::Addr(a));
        }
        if let Ok(ip) = v.parse::<IpAddr>() {
            return Ok(PeerMatch::Ip(ip));
        }
        // Allow `[::1]` for symmetry with `[::1]:9000`.
        if let Some(inner) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            if let Ok(ip) = inner.parse::<IpAddr>() {
                return Ok(PeerMatch::Ip(ip));
            }
        }
        Err(ImpairParseError::new(
            "to",
            &format!("to={v}"),
            "to must be an IP address or IP:PORT",
        ))
    }
}

/// Explicit Gilbert–Elliott parameters (`ge=PGB/PBG[/H]`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct GeParams {
    p_gb: f64,
    p_bg: f64,
    loss_in_bad: f64,
}

/// One blackout window (`blackout=AT+DUR[/EVERY]`), relative to the impairment's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Blackout {
    at: Duration,
    dur: Duration,
    every: Option<Duration>,
}

impl Blackout {
    fn contains(&self, since_start: Duration) -> bool {
        let Some(rel) = since_start.checked_sub(self.at) else {
            return false;
        };
        match self.every {
            Some(period) if !period.is_zero() => {
                rel.as_nanos() % period.as_nanos() < self.dur.as_nanos()
            }
            _ => rel < self.dur,
        }
    }
}

/// The parsed, validated parameters of one impairment rule (everything except `to`).
///
/// Parse with [`str::parse`]; [`Display`](fmt::Display) prints the canonical SPEC, which
/// parses back to an equal value. `ImpairSpec::default()` is the no-op rule (`none`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImpairSpec {
    loss: f64,
    burst: Option<f64>,
    ge: Option<GeParams>,
    delay: Duration,
    jitter: Duration,
    dup: f64,
    reorder: f64,
    gap: Duration,
    corrupt: f64,
    blackouts: Vec<Blackout>,
    seed: u64,
}

impl Default for ImpairSpec {
    fn default() -> Self {
        ImpairSpec {
            loss: 0.0,
            burst: None,
            ge: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            dup: 0.0,
            reorder: 0.0,
            gap: DEFAULT_REORDER_GAP,
            corrupt: 0.0,
            blackouts: Vec::new(),
            seed: 0,
        }
    }
}

impl ImpairSpec {
    /// True if this rule changes nothing (every datagram is delivered at once, unaltered).
    pub fn is_noop(&self) -> bool {
        let ge_noop = match self.ge {
            None => true,
            Some(g) => g.p_gb == 0.0 || g.loss_in_bad == 0.0,
        };
        self.loss == 0.0
            && ge_noop
            && self.delay.is_zero()
            && self.jitter.is_zero()
            && self.dup == 0.0
            && (self.reorder == 0.0 || self.gap.is_zero())
            && self.corrupt == 0.0
            && self.blackouts.iter().all(|b| b.dur.is_zero())
    }

    /// The rule's seed (`seed=N`, default 0).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The fixed one-way delay (`delay=D`).
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The jitter amplitude (`jitter=J`).
    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    /// The average loss probability: `loss`, or the stationary loss rate of `ge`.
    pub fn mean_loss(&self) -> f64 {
        match self.ge {
            Some(g) if g.p_gb + g.p_bg > 0.0 => g.loss_in_bad * g.p_gb / (g.p_gb + g.p_bg),
            Some(_) => 0.0,
            None => self.loss,
        }
    }
}

fn parse_prob(key: &str, item: &str, v: &str) -> Result<f64, ImpairParseError> {
    let v = v.trim();
    let (num, pct) = match v.strip_suffix('%') {
        Some(n) => (n.trim(), true),
        None => (v, false),
    };
    let x: f64 = num.parse().map_err(|_| {
        ImpairParseError::new(
            key,
            item,
            format!("{key} must be a probability like `5%` or `0.05`"),
        )
    })?;
    let p = if pct { x / 100.0 } else { x };
    if !p.is_finite() || !(0.0..=1.0).contains(&p) {
        return Err(ImpairParseError::new(
            key,
            item,
            format!("{key} must be between 0% and 100%"),
        ));
    }
    Ok(p)
}

fn parse_dur(key: &str, item: &str, v: &str) -> Result<Duration, ImpairParseError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        ImpairParseError::new(
            key,
            item,
            format!("{key} must be a duration like `20ms` or `1s` ({e})"),
        )
    })
}

fn parse_bounded_dur(key: &str, item: &str, v: &str) -> Result<Duration, ImpairParseError> {
    let d = parse_dur(key, item, v)?;
    if d > MAX_DELAY {
        return Err(ImpairParseError::new(
            key,
            item,
            format!("{key} must be at most 1h"),
        ));
    }
    Ok(d)
}

fn parse_blackout(item: &str, v: &str) -> Result<Blackout, ImpairParseError> {
    const KEY: &str = "blackout";
    let (window, every) = match v.split_once('/') {
        Some((w, e)) => (w, Some(e)),
        None => (v, None),
    };
    let Some((at, dur)) = window.split_once('+') else {
        return Err(ImpairParseError::new(
            KEY,
            item,
            "blackout must be AT+DUR or AT+DUR/EVERY, e.g. `5s+2s` or `10s+1s/30s`",
        ));
    };
    let at = parse_dur(KEY, item, at)?;
    let dur = parse_dur(KEY, item, dur)?;
    if dur.is_zero() {
        return Err(ImpairParseError::new(
            KEY,
            item,
            "blackout duration must be greater than zero",
        ));
    }
    let every = match every {
        None => None,
        Some(e) => {
            let e = parse_dur(KEY, item, e)?;
            if e.is_zero() {
                return Err(ImpairParseError::new(
                    KEY,
                    item,
                    "blackout period must be greater than zero",
                ));
            }
            if dur > e {
                return Err(ImpairParseError::new(
                    KEY,
                    item,
                    "blackout duration must not exceed its period",
                ));
            }
            Some(e)
        }
    };
    Ok(Blackout { at, dur, every })
}

fn parse_ge(item: &str, v: &str) -> Result<GeParams, ImpairParseError> {
    const KEY: &str = "ge";
    let parts: Vec<&str> = v.split('/').collect();
    if parts.len() != 2 && parts.len() != 3 {
        return Err(ImpairParseError::new(
            KEY,
            item,
            "ge must be PGB/PBG or PGB/PBG/H, e.g. `1%/30%` or `1%/30%/80%`",
        ));
    }
    let p_gb = parse_prob(KEY, item, parts[0])?;
    let p_bg = parse_prob(KEY, item, parts[1])?;
    let loss_in_bad = match parts.get(2) {
        Some(h) => parse_prob(KEY, item, h)?,
        None => 1.0,
    };
    Ok(GeParams {
        p_gb,
        p_bg,
        loss_in_bad,
    })
}

const KEYS: &str = "loss, burst, ge, delay, jitter, dup, reorder, gap, corrupt, blackout, seed, to";

/// Parse one rule (no `;`), returning its optional peer match and its parameters.
fn parse_rule(text: &str) -> Result<(Option<PeerMatch>, ImpairSpec), ImpairParseError> {
    let text = text.trim();
    let mut spec = ImpairSpec::default();
    if text.is_empty() || text.eq_ignore_ascii_case("none") {
        return Ok((None, spec));
    }
    let mut to = None;
    let mut seen: Vec<String> = Vec::new();
    let mut burst_item = String::new();
    let mut ge_item = String::new();
    let mut loss_given = false;
    for raw in text.split(',') {
        let item = raw.trim();
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once('=') else {
            let reason = if item.eq_ignore_ascii_case("none") {
                "`none` must stand alone".to_string()
            } else {
                format!("expected key=value (keys: {KEYS})")
            };
            return Err(ImpairParseError::new(item, item, reason));
        };
        let key = k.trim().to_ascii_lowercase();
        let v = v.trim();
        if key != "blackout" {
            if seen.contains(&key) {
                return Err(ImpairParseError::new(
                    &key,
                    item,
                    format!("duplicate key `{key}`"),
                ));
            }
            seen.push(key.clone());
        }
        match key.as_str() {
            "loss" => {
                spec.loss = parse_prob(&key, item, v)?;
                loss_given = true;
            }
            "burst" => {
                let n: f64 = v
                    .parse()
                    .map_err(|_| ImpairParseError::new(&key, item, "burst must be a number ≥ 1"))?;
                if !n.is_finite() || n < 1.0 {
                    return Err(ImpairParseError::new(
                        &key,
                        item,
                        "burst must be a number ≥ 1",
                    ));
                }
                spec.burst = Some(n);
                burst_item = item.to_string();
            }
            "ge" => {
                spec.ge = Some(parse_ge(item, v)?);
                ge_item = item.to_string();
            }
            "delay" => spec.delay = parse_bounded_dur(&key, item, v)?,
            "jitter" => spec.jitter = parse_bounded_dur(&key, item, v)?,
            "gap" => spec.gap = parse_bounded_dur(&key, item, v)?,
            "dup" => spec.dup = parse_prob(&key, item, v)?,
            "reorder" => spec.reorder = parse_prob(&key, item, v)?,
            "corrupt" => spec.corrupt = parse_prob(&key, item, v)?,
            "blackout" => spec.blackouts.push(parse_blackout(item, v)?),
            "seed" => {
                spec.seed = v.parse().map_err(|_| {
                    ImpairParseError::new(&key, item, "seed must be an unsigned 64-bit integer")
                })?;
            }
            "to" => {
                let m = v.parse::<PeerMatch>().map_err(|mut e| {
                    e.item = item.to_string();
                    e
                })?;
                to = Some(m);
            }
            _ => {
                return Err(ImpairParseError::new(
                    &key,
                    item,
                    format!("unknown key `{key}` (keys: {KEYS})"),
                ));
            }
        }
    }
    if let Some(n) = spec.burst {
        if !loss_given {
            return Err(ImpairParseError::new(
                "burst",
                &burst_item,
                "burst needs loss=P too (the average loss rate)",
            ));
        }
        // Stationary loss L = p_gb / (p_gb + 1/N) with p_gb ≤ 1  ⇔  L ≤ N / (N + 1).
        if spec.loss * (n + 1.0) > n {
            return Err(ImpairParseError::new(
                "burst",
                &burst_item,
                format!(
                    "loss={} cannot be reached with bursts averaging {n}: need burst ≥ loss/(1-loss)",
                    fmt_prob(spec.loss)
                ),
            ));
        }
    }
    if spec.ge.is_some() && (loss_given || spec.burst.is_some()) {
        return Err(ImpairParseError::new(
            "ge",
            &ge_item,
            "ge cannot be combined with loss or burst",
        ));
    }
    Ok((to, spec))
}

impl FromStr for ImpairSpec {
    type Err = ImpairParseError;

    /// Parse one rule without `to` (see the module docs for the grammar).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(';') {
            return Err(ImpairParseError::new(
                ";",
                s.trim(),
                "a single rule cannot contain `;` (parse an ImpairConfig instead)",
            ));
        }
        match parse_rule(s)? {
            (None, spec) => Ok(spec),
            (Some(to), _) => Err(ImpairParseError::new(
                "to",
                &format!("to={to}"),
                "to is only valid in an ImpairConfig",
            )),
        }
    }
}

/// Format a probability so that it parses back to exactly the same `f64`.
fn fmt_prob(p: f64) -> String {
    let pct = (p * 100.0 * 1e9).round() / 1e9;
    if pct / 100.0 == p {
        format!("{pct}%")
    } else {
        format!("{p}")
    }
}

/// Format a duration compactly and exactly (humantime-parseable, no spaces).
fn fmt_dur(d: Duration) -> String {
    let (s, n) = (d.as_secs(), d.subsec_nanos());
    if n == 0 {
        format!("{s}s")
    } else if n.is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else if n.is_multiple_of(1_000) {
        format!("{}us", d.as_micros())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

impl fmt::Display for ImpairSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = Vec::new();
        if self.loss != 0.0 || self.burst.is_some() {
            items.push(format!("loss={}", fmt_prob(self.loss)));
        }
        if let Some(n) = self.burst {
            items.push(format!("burst={n}"));
        }
        if let Some(g) = self.ge {
            let mut s = format!("ge={}/{}", fmt_prob(g.p_gb), fmt_prob(g.p_bg));
            if g.loss_in_bad != 1.0 {
                s.push('/');
                s.push_str(&fmt_prob(g.loss_in_bad));
            }
            items.push(s);
        }
        if !self.delay.is_zero() {
            items.push(format!("delay={}", fmt_dur(self.delay)));
        }
        if !self.jitter.is_zero() {
            items.push(format!("jitter={}", fmt_dur(self.jitter)));
        }
        if self.dup != 0.0 {
            items.push(format!("dup={}", fmt_prob(self.dup)));
        }
        if self.reorder != 0.0 {
            items.push(format!("reorder={}", fmt_prob(self.reorder)));
        }
        if self.gap != DEFAULT_REORDER_GAP {
            items.push(format!("gap={}", fmt_dur(self.gap)));
        }
        if self.corrupt != 0.0 {
            items.push(format!("corrupt={}", fmt_prob(self.corrupt)));
        }
        for b in &self.blackouts {
            let mut s = format!("blackout={}+{}", fmt_dur(b.at), fmt_dur(b.dur));
            if let Some(e) = b.every {
                s.push('/');
                s.push_str(&fmt_dur(e));
            }
            items.push(s);
        }
        if self.seed != 0 {
            items.push(format!("seed={}", self.seed));
        }
        if items.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&items.join(","))
        }
    }
}

/// A full impairment configuration: an optional default rule plus per-peer rules.
///
/// Parse from one SPEC string (rules separated by `;`) with [`str::parse`], or from the
/// values of a repeated `--impair` flag with [`ImpairConfig::parse_many`]. `Display` prints
/// the canonical SPEC (default rule first), which parses back to an equal value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImpairConfig {
    default: Option<ImpairSpec>,
    per_peer: Vec<(PeerMatch, ImpairSpec)>,
}

impl ImpairConfig {
    /// The configuration that impairs nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parse and merge several SPEC strings (e.g. each occurrence of `--impair`). At most
    /// one default rule and one rule per `to` value may appear across all of them.
    pub fn parse_many<S: AsRef<str>>(specs: &[S]) -> Result<Self, ImpairParseError> {
        let mut cfg = ImpairConfig::default();
        for s in specs {
            cfg.add_rules(s.as_ref())?;
        }
        Ok(cfg)
    }

    fn add_rules(&mut self, text: &str) -> Result<(), ImpairParseError> {
        for rule in text.split(';') {
            let rule_text = rule.trim();
            if rule_text.is_empty() || rule_text.eq_ignore_ascii_case("none") {
                continue;
            }
            match parse_rule(rule_text)? {
                (None, spec) => {
                    if self.default.is_some() {
                        return Err(ImpairParseError::new(
                            "to",
                            rule_text,
                            "more than one default rule (one without `to`)",
                        ));
                    }
                    // A default rule that is all defaults is the same as none (and prints
                    // as `none`, so keep it absent to round-trip).
                    if spec != ImpairSpec::default() {
                        self.default = Some(spec);
                    }
                }
                (Some(m), spec) => {
                    if self.per_peer.iter().any(|(p, _)| *p == m) {
                        return Err(ImpairParseError::new(
                            "to",
                            rule_text,
                            format!("more than one rule for to={m}"),
                        ));
                    }
                    self.per_peer.push((m, spec));
                }
            }
        }
        Ok(())
    }

    /// The default rule (applies to peers no `to` rule matches), if any.
    pub fn default_rule(&self) -> Option<&ImpairSpec> {
        self.default.as_ref()
    }

    /// The per-peer rules, in the order given.
    pub fn peer_rules(&self) -> &[(PeerMatch, ImpairSpec)] {
        &self.per_peer
    }

    /// True if no rule impairs anything.
    pub fn is_passthrough(&self) -> bool {
        self.default.iter().all(ImpairSpec::is_noop)
            && self.per_peer.iter().all(|(_, s)| s.is_noop())
    }
}

impl FromStr for ImpairConfig {
    type Err = ImpairParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = ImpairConfig::default();
        cfg.add_rules(s)?;
        Ok(cfg)
    }
}

impl fmt::Display for ImpairConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rules: Vec<String> = Vec::new();
        if let Some(d) = &self.default {
            rules.push(d.to_string());
        }
        for (m, s) in &self.per_peer {
            if s.is_noop() && *s == ImpairSpec::default() {
                rules.push(format!("to={m}"));
            } else {
                rules.push(format!("to={m},{s}"));
            }
        }
        if rules.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&rules.join(";"))
        }
    }
}

/// Counters of what the shim did (summed over all rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairStats {
    /// Datagrams submitted with [`Impairment::push`].
    pub pushed: u64,
    /// Dropped by i.i.d. `loss`.
    pub dropped_random: u64,
    /// Dropped by the Gilbert–Elliott chain (`burst` or `ge`).
    pub dropped_burst: u64,
    /// Dropped because pushed inside a blackout window.
    pub dropped_blackout: u64,
    /// Extra copies made by `dup`.
    pub duplicated: u64,
    /// Copies held back by `reorder`.
    pub reordered: u64,
    /// Datagrams with a bit flipped by `corrupt`.
    pub corrupted: u64,
    /// Datagrams handed out by [`Impairment::poll_transmit`] (duplicates included).
    pub delivered: u64,
}

enum LossModel {
    None,
    Random(f64),
    Gilbert {
        p_gb: f64,
        p_bg: f64,
        loss_in_bad: f64,
    },
}

enum LossVerdict {
    Keep,
    DropRandom,
    DropBurst,
}

/// Per-rule state: the spec, the Gilbert–Elliott state and one rng stream per effect.
struct RuleState {
    spec: ImpairSpec,
    loss_model: LossModel,
    bad: bool,
    rng_loss: Rng,
    rng_corrupt: Rng,
    rng_dup: Rng,
    rng_delay: Rng,
    rng_reorder: Rng,
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl RuleState {
    fn new(spec: ImpairSpec, peer: Option<&PeerMatch>) -> Self {
        let identity = peer.map_or(0, |m| crate::rng::fnv1a64(m.to_string().bytes()));
        let rule_seed = mix(spec.seed, identity);
        let stream = |purpose: u64| Rng::seeded(mix(rule_seed, purpose));
        let loss_model = match (spec.ge, spec.burst) {
            (Some(g), _) => LossModel::Gilbert {
                p_gb: g.p_gb,
                p_bg: g.p_bg,
                loss_in_bad: g.loss_in_bad,
            },
            (None, Some(n)) if spec.loss > 0.0 && spec.loss < 1.0 => {
                let p_bg = 1.0 / n;
                let p_gb = (spec.loss * p_bg / (1.0 - spec.loss)).min(1.0);
                LossModel::Gilbert {
                    p_gb,
                    p_bg,
                    loss_in_bad: 1.0,
                }
            }
            _ if spec.loss > 0.0 => LossModel::Random(spec.loss),
            _ => LossModel::None,
        };
        RuleState {
            spec,
            loss_model,
            bad: false,
            rng_loss: stream(1),
            rng_corrupt: stream(2),
            rng_dup: stream(3),
            rng_delay: stream(4),
            rng_reorder: stream(5),
        }
    }

    fn in_blackout(&self, since_start: Option<Duration>) -> bool {
        match since_start {
            Some(t) => self.spec.blackouts.iter().any(|b| b.contains(t)),
            None => false,
        }
    }

    fn loss(&mut self) -> LossVerdict {
        match self.loss_model {
            LossModel::None => LossVerdict::Keep,
            LossModel::Random(p) => {
                if self.rng_loss.chance(p) {
                    LossVerdict::DropRandom
                } else {
                    LossVerdict::Keep
                }
            }
            LossModel::Gilbert {
                p_gb,
                p_bg,
                loss_in_bad,
            } => {
                // The current state decides this datagram's fate, then the chain steps.
                let drop = self.bad && self.rng_loss.chance(loss_in_bad);
                if self.bad {
                    if self.rng_loss.chance(p_bg) {
                        self.bad = false;
                    }
                } else if self.rng_loss.chance(p_gb) {
                    self.bad = true;
                }
                if drop {
                    LossVerdict::DropBurst
                } else {
                    LossVerdict::Keep
                }
            }
        }
    }

    fn maybe_corrupt(&mut self, data: Bytes) -> (Bytes, bool) {
        if data.is_empty() || !self.rng_corrupt.chance(self.spec.corrupt) {
            return (data, false);
        }
        let mut copy = BytesMut::from(&data[..]);
        let idx = self.rng_corrupt.below(copy.len() as u64) as usize;
        let bit = self.rng_corrupt.below(8) as u32;
        if let Some(b) = copy.get_mut(idx) {
            *b ^= 1u8 << bit;
        }
        (copy.freeze(), true)
    }

    /// How long to hold one copy, and whether it was picked for reordering.
    fn hold(&mut self) -> (Duration, bool) {
        let mut d = self.spec.delay;
        if !self.spec.jitter.is_zero() {
            let j = self.spec.jitter.as_nanos() as f64;
            let off = self.rng_delay.range_f64(-j, j);
            let total = (self.spec.delay.as_nanos() as f64 + off).max(0.0);
            d = Duration::from_nanos(total.round() as u64);
        }
        let reordered = self.rng_reorder.chance(self.spec.reorder);
        if reordered {
            d = d.saturating_add(self.spec.gap);
        }
        (d, reordered)
    }
}

/// A datagram held until it is due.
struct Held {
    due: Instant,
    seq: u64,
    dst: SocketAddr,
    data: Bytes,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest (due, seq) first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// The impairment state machine: feed it datagrams with [`push`](Self::push), take them
/// back out with [`poll_transmit`](Self::poll_transmit) when due.
///
/// Deterministic: the same configuration, start and sequence of calls always produce the
/// same output. Held datagrams are kept until polled (the caller must keep polling).
pub struct Impairment {
    start: Instant,
    default: Option<RuleState>,
    per_peer: Vec<(PeerMatch, RuleState)>,
    held: BinaryHeap<Held>,
    next_seq: u64,
    stats: ImpairStats,
    passthrough: bool,
}

impl fmt::Debug for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Impairment")
            .field("config", &self.config().to_string())
            .field("held", &self.held.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Impairment {
    /// Build the state machine; `start` is the origin of `blackout` windows.
    pub fn new(cfg: ImpairConfig, start: Instant) -> Self {
        let passthrough = cfg.is_passthrough();
        Impairment {
            start,
            default: cfg.default.map(|s| RuleState::new(s, None)),
            per_peer: cfg
                .per_peer
                .into_iter()
                .map(|(m, s)| {
                    let st = RuleState::new(s, Some(&m));
                    (m, st)
                })
                .collect(),
            held: BinaryHeap::new(),
            next_seq: 0,
            stats: ImpairStats::default(),
            passthrough,
        }
    }

    /// The configuration this was built from.
    pub fn config(&self) -> ImpairConfig {
        ImpairConfig {
            default: self.default.as_ref().map(|r| r.spec.clone()),
            per_peer: self
                .per_peer
                .iter()
                .map(|(m, r)| (*m, r.spec.clone()))
                .collect(),
        }
    }

    /// True if no rule impairs anything: drivers may bypass the shim entirely.
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// Submit one datagram that the application wants sent to `dst` at `now`.
    pub fn push(&mut self, now: Instant, dst: SocketAddr, datagram: Bytes) {
        self.stats.pushed += 1;
        let since_start = now.checked_duration_since(self.start);
        let rule = {
            let exact = self
                .per_peer
                .iter()
                .position(|(m, _)| matches!(m, PeerMatch::Addr(_)) && m.matches(dst));
            let by_ip = || {
                self.per_peer
                    .iter()
                    .position(|(m, _)| matches!(m, PeerMatch::Ip(_)) && m.matches(dst))
            };
            match exact.or_else(by_ip) {
                Some(i) => self.per_peer.get_mut(i).map(|(_, r)| r),
                None => self.default.as_mut(),
            }
        };
        let Some(rule) = rule else {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.held.push(Held {
                due: now,
                seq,
                dst,
                data: datagram,
            });
            return;
        };
        // 1. blackout
        if rule.in_blackout(since_start) {
            self.stats.dropped_blackout += 1;
            return;
        }
        // 2. loss
        match rule.loss() {
            LossVerdict::Keep => {}
            LossVerdict::DropRandom => {
                self.stats.dropped_random += 1;
                return;
            }
            LossVerdict::DropBurst => {
                self.stats.dropped_burst += 1;
                return;
            }
        }
        // 3. corrupt
        let (data, corrupted) = rule.maybe_corrupt(datagram);
        if corrupted {
            self.stats.corrupted += 1;
        }
        // 4. duplicate
        let copies = if rule.rng_dup.chance(rule.spec.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        // 5. delay + jitter + reorder, 6. queue
        for _ in 0..copies {
            let (hold, reordered) = rule.hold();
            if reordered {
                self.stats.reordered += 1;
            }
            let due = now.checked_add(hold).unwrap_or(now);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.held.push(Held {
                due,
                seq,
                dst,
                data: data.clone(),
            });
        }
    }

    /// Next datagram due for the wire at `now` (in due-time order; ties in push order).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Bytes)> {
        if self.held.peek()?.due > now {
            return None;
        }
        let h = self.held.pop()?;
        self.stats.delivered += 1;
        Some((h.dst, h.data))
    }

    /// When the next held datagram becomes due (`None` if nothing is held).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.held.peek().map(|h| h.due)
    }

    /// Number of datagrams currently held (not yet handed out).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> ImpairStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const N: u64 = 100_000;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// 32-byte payload: the sequence number four times, so a single bit flip is detectable
    /// and the sequence number is still recoverable by majority.
    fn payload(seq: u64) -> Bytes {
        let mut v = Vec::with_capacity(32);
        for _ in 0..4 {
            v.extend_from_slice(&seq.to_le_bytes());
        }
        Bytes::from(v)
    }

    /// (seq, intact)
    fn decode(b: &[u8]) -> (u64, bool) {
        assert_eq!(b.len(), 32);
        let words: Vec<u64> = b
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let intact = words.iter().all(|w| *w == words[0]);
        for w in &words {
            if words.iter().filter(|x| *x == w).count() >= 2 {
                return (*w, intact);
            }
        }
        panic!("undecodable payload");
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Delivery {
        at: Duration,
        dst: SocketAddr,
        data: Bytes,
    }

    /// Push `n` datagrams `interval` apart (destination chosen by `dst_of`), driving the fake
    /// clock through every due time, and return what came out, in order.
    fn drive(
        imp: &mut Impairment,
        t0: Instant,
        n: u64,
        interval: Duration,
        dst_of: impl Fn(u64) -> SocketAddr,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        let drain = |imp: &mut Impairment, until: Option<Instant>, out: &mut Vec<Delivery>| {
            while let Some(due) = imp.poll_timeout() {
                if until.is_some_and(|u| due > u) {
                    break;
                }
                let mut got = false;
                while let Some((dst, data)) = imp.poll_transmit(due) {
                    got = true;
                    out.push(Delivery {
                        at: due - t0,
                        dst,
                        data,
                    });
                }
                assert!(got, "poll_timeout said due but nothing came out");
            }
        };
        for i in 0..n {
            let now = t0 + interval * (i as u32);
            drain(imp, Some(now), &mut out);
            imp.push(now, dst_of(i), payload(i));
            drain(imp, Some(now), &mut out);
        }
        drain(imp, None, &mut out);
        assert_eq!(imp.held(), 0);
        out
    }

    fn run(spec: &str, n: u64) -> (Vec<Delivery>, ImpairStats) {
        let t0 = Instant::now();
        let mut imp = Impairment::new(spec.parse().unwrap(), t0);
        let out = drive(&mut imp, t0, n, Duration::from_millis(1), |_| {
            addr("10.0.0.1:5000")
        });
        (out, imp.stats())
    }

    fn counts(out: &[Delivery]) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for d in out {
            *m.entry(decode(&d.data).0).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn passthrough_is_immediate_and_identical() {
        for spec in ["", "none", " none ", "to=1.2.3.4", "seed=5"] {
            let cfg: ImpairConfig = spec.parse().unwrap();
            assert!(cfg.is_passthrough(), "{spec}");
            let t0 = Instant::now();
            let mut imp = Impairment::new(cfg, t0);
            assert!(imp.is_passthrough());
            let d = addr("1.2.3.4:9");
            imp.push(t0, d, payload(1));
            imp.push(t0, d, payload(2));
            assert_eq!(imp.poll_transmit(t0), Some((d, payload(1))));
            assert_eq!(imp.poll_transmit(t0), Some((d, payload(2))));
            assert_eq!(imp.poll_transmit(t0), None);
            assert_eq!(imp.poll_timeout(), None);
        }
        assert!(!"loss=1%".parse::<ImpairConfig>().unwrap().is_passthrough());
    }

    #[test]
    fn zero_delay_is_due_at_once_and_dup_follows_original() {
        let t0 = Instant::now();
        let mut imp = Impairment::new("dup=100%".parse().unwrap(), t0);
        let d = addr("1.2.3.4:9");
        imp.push(t0, d, payload(1));
        imp.push(t0, d, payload(2));
        assert_eq!(imp.poll_timeout(), Some(t0));
        let got: Vec<_> = std::iter::from_fn(|| imp.poll_transmit(t0)).collect();
        assert_eq!(
            got,
            vec![
                (d, payload(1)),
                (d, payload(1)),
                (d, payload(2)),
                (d, payload(2))
            ]
        );
        assert_eq!(imp.stats().duplicated, 2);
        assert_eq!(imp.stats().delivered, 4);
    }

    #[test]
    fn rates_match_spec() {
        let (out, st) = run("loss=5%,dup=1%,reorder=2%,corrupt=1%,seed=42", N);
        let c = counts(&out);
        let lost = (0..N).filter(|s| !c.contains_key(s)).count() as f64;
        let delivered_seqs = c.len() as f64;
        let dups = c.values().filter(|&&k| k == 2).count() as f64;
        assert!(c.values().all(|&k| k <= 2));
        let loss_rate = lost / N as f64;
        let dup_rate = dups / delivered_seqs;
        // Reordered: delivered after some datagram pushed later.
        let mut max_seen: Option<u64> = None;
        let mut reordered = 0usize;
        let mut corrupted = std::collections::HashSet::new();
        for d in &out {
            let (seq, intact) = decode(&d.data);
            if max_seen.is_some_and(|m| seq < m) {
                reordered += 1;
            }
            max_seen = max_seen.max(Some(seq));
            if !intact {
                corrupted.insert(seq);
            }
        }
        let reorder_rate = reordered as f64 / out.len() as f64;
        let corrupt_rate = corrupted.len() as f64 / delivered_seqs;
        // Tolerances are > 4 standard deviations for N = 100 000.
        assert!((loss_rate - 0.05).abs() < 0.003, "loss {loss_rate}");
        assert!((dup_rate - 0.01).abs() < 0.0015, "dup {dup_rate}");
        assert!(
            (reorder_rate - 0.02).abs() < 0.002,
            "reorder {reorder_rate}"
        );
        assert!(
            (corrupt_rate - 0.01).abs() < 0.0015,
            "corrupt {corrupt_rate}"
        );
        assert_eq!(st.pushed, N);
        assert_eq!(st.dropped_random, lost as u64);
        assert_eq!(st.dropped_burst + st.dropped_blackout, 0);
        assert_eq!(st.duplicated, dups as u64);
        assert_eq!(st.corrupted, corrupted.len() as u64);
        assert_eq!(st.delivered, out.len() as u64);
        assert!(st.reordered as usize >= reordered);
    }

    fn bursts(out: &[Delivery], n: u64) -> (f64, f64) {
        let c = counts(out);
        let mut lost = 0u64;
        let mut runs = Vec::new();
        let mut cur = 0u64;
        for s in 0..n {
            if c.contains_key(&s) {
                if cur > 0 {
                    runs.push(cur);
                }
                cur = 0;
            } else {
                lost += 1;
                cur += 1;
            }
        }
        if cur > 0 {
            runs.push(cur);
        }
        let mean_burst = runs.iter().sum::<u64>() as f64 / runs.len() as f64;
        (lost as f64 / n as f64, mean_burst)
    }

    #[test]
    fn gilbert_elliott_bursts() {
        let (out, st) = run("loss=1%,burst=2,seed=3", N);
        let (rate, mean_burst) = bursts(&out, N);
        assert!((rate - 0.01).abs() < 0.0025, "loss {rate}");
        assert!((mean_burst - 2.0).abs() < 0.3, "burst {mean_burst}");
        assert_eq!(st.dropped_random, 0);
        assert_eq!(st.dropped_burst, (rate * N as f64).round() as u64);

        let (out, _) = run("loss=5%,burst=4,seed=11", N);
        let (rate, mean_burst) = bursts(&out, N);
        assert!((rate - 0.05).abs() < 0.006, "loss {rate}");
        assert!((mean_burst - 4.0).abs() < 0.4, "burst {mean_burst}");

        // Expert form: stationary loss = p_gb / (p_gb + p_bg) = 1/51 ≈ 1.96 %, bursts of 2.
        let (out, _) = run("ge=1%/50%,seed=3", N);
        let (rate, mean_burst) = bursts(&out, N);
        assert!((rate - 1.0 / 51.0).abs() < 0.003, "loss {rate}");
        assert!((mean_burst - 2.0).abs() < 0.3, "burst {mean_burst}");
        let spec: ImpairSpec = "ge=1%/50%/50%".parse().unwrap();
        assert!((spec.mean_loss() - 0.5 / 51.0).abs() < 1e-12);
    }

    #[test]
    fn delay_and_jitter_bounds() {
        let (out, st) = run("delay=20ms,jitter=5ms,seed=1", N);
        assert_eq!(out.len() as u64, N);
        let mut sum = 0.0;
        let mut reordered = false;
        let mut max_seen = 0;
        for d in &out {
            let seq = decode(&d.data).0;
            let lat = d.at - Duration::from_millis(seq);
            assert!(
                lat >= Duration::from_millis(15) && lat <= Duration::from_millis(25),
                "{lat:?}"
            );
            sum += lat.as_secs_f64();
            reordered |= seq < max_seen;
            max_seen = max_seen.max(seq);
        }
        let mean = sum / N as f64;
        assert!((mean - 0.020).abs() < 0.0002, "mean {mean}");
        assert!(reordered, "jitter wider than the spacing must reorder");
        assert_eq!(st.reordered, 0);

        // Clamped at zero.
        let (out, _) = run("delay=2ms,jitter=5ms", 10_000);
        for d in &out {
            let lat = d.at - Duration::from_millis(decode(&d.data).0);
            assert!(lat <= Duration::from_millis(7), "{lat:?}");
        }
        assert!(out
            .iter()
            .any(|d| d.at == Duration::from_millis(decode(&d.data).0)));

        // Fixed delay keeps order; reorder adds exactly the gap.
        let (out, _) = run("delay=7ms,reorder=10%,gap=3ms", 10_000);
        for d in &out {
            let lat = d.at - Duration::from_millis(decode(&d.data).0);
            assert!(lat == Duration::from_millis(7) || lat == Duration::from_millis(10));
        }
    }

    #[test]
    fn blackout_drops_exactly_the_window() {
        let (out, st) = run("blackout=5s+2s,blackout=10s+1s/30s", N);
        let c = counts(&out);
        let in_window = |ms: u64| {
            (5_000..7_000).contains(&ms) || (ms >= 10_000 && (ms - 10_000) % 30_000 < 1_000)
        };
        let mut expected = 0;
        for s in 0..N {
            assert_eq!(c.contains_key(&s), !in_window(s), "seq {s}");
            expected += u64::from(in_window(s));
        }
        assert_eq!(expected, 2_000 + 3 * 1_000); // windows at 10 s, 40 s, 70 s
        assert_eq!(st.dropped_blackout, expected);
        assert_eq!(st.delivered, N - expected);
        // Before `start` nothing is blacked out.
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut imp = Impairment::new("blackout=0s+1h".parse().unwrap(), t0);
        imp.push(t0 - Duration::from_secs(1), addr("1.1.1.1:1"), payload(0));
        imp.push(t0, addr("1.1.1.1:1"), payload(1));
        assert_eq!(imp.stats().dropped_blackout, 1);
        assert_eq!(imp.held(), 1);
    }

    const FULL: &str =
        "loss=3%,burst=3,delay=10ms,jitter=4ms,dup=2%,reorder=3%,corrupt=2%,blackout=2s+100ms";

    fn run_two_peers(spec: &str) -> Vec<Delivery> {
        let t0 = Instant::now();
        let mut imp = Impairment::new(spec.parse().unwrap(), t0);
        drive(&mut imp, t0, 20_000, Duration::from_millis(1), |i| {
            if i.is_multiple_of(3) {
                addr("10.0.0.1:1")
            } else {
                addr("10.0.0.2:2")
            }
        })
    }

    #[test]
    fn same_seed_same_output() {
        let a = run_two_peers(&format!("{FULL},seed=9"));
        let b = run_two_peers(&format!("{FULL},seed=9"));
        assert_eq!(a, b);
        let c = run_two_peers(&format!("{FULL},seed=10"));
        assert_ne!(a, c);
        // Default seed (0) is deterministic too.
        assert_eq!(run_two_peers(FULL), run_two_peers(FULL));
    }

    #[test]
    fn per_peer_rules() {
        let t0 = Instant::now();
        let cfg: ImpairConfig = "delay=5ms;to=10.0.0.2,loss=50%;to=10.0.0.3:9000"
            .parse()
            .unwrap();
        let mut imp = Impairment::new(cfg, t0);
        let peers = [
            addr("10.0.0.1:1"),
            addr("10.0.0.2:7"),
            addr("10.0.0.2:8"),
            addr("10.0.0.3:9000"),
            addr("10.0.0.3:9001"),
        ];
        let out = drive(&mut imp, t0, 50_000, Duration::from_millis(1), |i| {
            peers[(i % 5) as usize]
        });
        let mut per: HashMap<SocketAddr, (u64, Vec<Duration>)> = HashMap::new();
        for d in &out {
            let seq = decode(&d.data).0;
            assert_eq!(d.dst, peers[(seq % 5) as usize]);
            let e = per.entry(d.dst).or_default();
            e.0 += 1;
            e.1.push(d.at - Duration::from_millis(seq));
        }
        let ms = Duration::from_millis;
        for (p, lat) in [(0, ms(5)), (3, ms(0)), (4, ms(5))] {
            let (n, lats) = &per[&peers[p]];
            assert_eq!(*n, 10_000, "{}", peers[p]);
            assert!(lats.iter().all(|l| *l == lat), "{}", peers[p]);
        }
        for p in [1, 2] {
            let (n, lats) = &per[&peers[p]];
            let rate = 1.0 - *n as f64 / 10_000.0;
            assert!((rate - 0.5).abs() < 0.03, "{} loss {rate}", peers[p]);
            assert!(lats.iter().all(|l| l.is_zero()));
        }

        // No default rule: other peers are untouched.
        let mut imp = Impairment::new("to=10.0.0.2,loss=100%".parse().unwrap(), t0);
        imp.push(t0, addr("10.0.0.1:1"), payload(1));
        imp.push(t0, addr("10.0.0.2:1"), payload(2));
        assert_eq!(
            imp.poll_transmit(t0),
            Some((addr("10.0.0.1:1"), payload(1)))
        );
        assert_eq!(imp.poll_transmit(t0), None);
        assert_eq!(imp.stats().dropped_random, 1);

        // IPv4-mapped IPv6 destinations match IPv4 rules.
        let m: PeerMatch = "10.0.0.2".parse().unwrap();
        assert!(m.matches(addr("[::ffff:10.0.0.2]:5")));
    }

    #[test]
    fn adding_a_rule_does_not_change_others() {
        let only = |spec: &str| {
            let t0 = Instant::now();
            let mut imp = Impairment::new(spec.parse().unwrap(), t0);
            drive(&mut imp, t0, 20_000, Duration::from_millis(1), |_| {
                addr("10.0.0.2:1")
            })
        };
        let a = only("to=10.0.0.2,loss=30%,jitter=3ms,seed=5");
        let b = only("loss=10%;to=10.0.0.9,dup=5%;to=10.0.0.2,loss=30%,jitter=3ms,seed=5");
        assert_eq!(a, b);
        // Changing another effect does not change the loss pattern.
        let c = only("to=10.0.0.2,loss=30%,jitter=3ms,seed=5,dup=10%");
        assert_eq!(
            counts(&a).keys().collect::<std::collections::BTreeSet<_>>(),
            counts(&c).keys().collect::<std::collections::BTreeSet<_>>()
        );
    }

    #[test]
    fn corruption_copies_and_flips_one_bit() {
        let t0 = Instant::now();
        let mut imp = Impairment::new("corrupt=100%,dup=50%,seed=4".parse().unwrap(), t0);
        let original = Bytes::from(vec![0xA5u8; 64]);
        let d = addr("1.2.3.4:5");
        for _ in 0..1000 {
            imp.push(t0, d, original.clone());
        }
        assert!(
            original.iter().all(|&b| b == 0xA5),
            "caller's buffer was altered"
        );
        let mut n = 0;
        while let Some((_, got)) = imp.poll_transmit(t0) {
            let flipped: u32 = got
                .iter()
                .zip(original.iter())
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1);
            n += 1;
        }
        assert!(n > 1000);
        assert_eq!(imp.stats().corrupted, 1000);
        // Empty datagrams pass unaltered.
        imp.push(t0, d, Bytes::new());
        assert_eq!(imp.poll_transmit(t0), Some((d, Bytes::new())));
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            "none",
            "loss=5%",
            "loss=0.05",
            "loss=7%,delay=20ms,jitter=5ms,dup=1%,reorder=2%,seed=7",
            "loss=1%,burst=2",
            "loss=0%,burst=1.5",
            "loss=33.333%,burst=2.5",
            "loss=0.123456789012345",
            "ge=1%/30%",
            "ge=1%/30%/80%",
            "delay=1s 500ms,jitter=250us,gap=3ns",
            "reorder=100%,gap=1h",
            "corrupt=0.1%",
            "blackout=5s+2s,blackout=20s+1s",
            "blackout=10s+1s/30s",
            "seed=18446744073709551615",
            " LOSS = 5% , delay = 1ms ,",
        ] {
            let a: ImpairSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
            let shown = a.to_string();
            let b: ImpairSpec = shown.parse().unwrap_or_else(|e| panic!("{shown}: {e}"));
            assert_eq!(a, b, "{spec} -> {shown}");
            assert_eq!(shown, b.to_string());
        }
        assert_eq!(
            "loss=0.05".parse::<ImpairSpec>().unwrap().to_string(),
            "loss=5%"
        );
        assert_eq!(
            "delay=1s 500ms".parse::<ImpairSpec>().unwrap().to_string(),
            "delay=1500ms"
        );
        for cfg in [
            "none",
            "loss=1%",
            "delay=50ms;to=127.0.0.1:7001,loss=20%",
            "to=10.0.0.1;to=[::1]:9000,dup=5%;to=::2,delay=1ms",
            "to=10.0.0.2,loss=1%;jitter=1ms",
        ] {
            let a: ImpairConfig = cfg.parse().unwrap_or_else(|e| panic!("{cfg}: {e}"));
            let shown = a.to_string();
            let b: ImpairConfig = shown.parse().unwrap_or_else(|e| panic!("{shown}: {e}"));
            assert_eq!(a, b, "{cfg} -> {shown}");
        }
        assert_eq!(
            "to=10.0.0.2,loss=1%;jitter=1ms"
                .parse::<ImpairConfig>()
                .unwrap()
                .to_string(),
            "jitter=1ms;to=10.0.0.2,loss=1%"
        );
    }

    #[test]
    fn parse_many_merges_flags() {
        let cfg =
            ImpairConfig::parse_many(&["loss=1%", "to=1.2.3.4,delay=1ms;to=1.2.3.5:6"]).unwrap();
        assert_eq!(cfg.peer_rules().len(), 2);
        assert!(cfg.default_rule().is_some());
        let e = ImpairConfig::parse_many(&["loss=1%", "dup=1%"]).unwrap_err();
        assert!(e.to_string().contains("more than one default rule"), "{e}");
        let e = ImpairConfig::parse_many(&["to=1.2.3.4,loss=1%", "to=1.2.3.4,dup=1%"]).unwrap_err();
        assert!(e.to_string().contains("to=1.2.3.4"), "{e}");
        assert_eq!(
            ImpairConfig::parse_many::<String>(&[]).unwrap(),
            ImpairConfig::none()
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("loss=150%", "loss", "between 0% and 100%"),
            ("loss=-1%", "loss", "between"),
            ("loss=1.5", "loss", "between"),
            ("loss=abc", "loss", "probability"),
            ("loss=NaN", "loss", "between"),
            ("loss=", "loss", "probability"),
            ("dup=2", "dup", "between"),
            ("reorder=x", "reorder", "probability"),
            ("corrupt=101%", "corrupt", "between"),
            ("delay=20", "delay", "duration"),
            ("delay=fast", "delay", "duration"),
            ("delay=2h", "delay", "at most 1h"),
            ("jitter=-5ms", "jitter", "duration"),
            ("gap=1parsec", "gap", "duration"),
            ("burst=0.5,loss=1%", "burst", "≥ 1"),
            ("burst=x,loss=1%", "burst", "≥ 1"),
            ("burst=2", "burst", "needs loss"),
            ("loss=90%,burst=2", "burst", "cannot be reached"),
            ("loss=100%,burst=1000", "burst", "cannot be reached"),
            ("ge=1%", "ge", "PGB/PBG"),
            ("ge=1%/2%/3%/4%", "ge", "PGB/PBG"),
            ("ge=1%/200%", "ge", "between"),
            ("ge=1%/20%,loss=1%", "ge", "cannot be combined"),
            ("blackout=5s", "blackout", "AT+DUR"),
            ("blackout=5s+0s", "blackout", "greater than zero"),
            ("blackout=5s+2s/1s", "blackout", "exceed its period"),
            ("blackout=5s+2s/0s", "blackout", "greater than zero"),
            ("blackout=x+2s", "blackout", "duration"),
            ("seed=-1", "seed", "unsigned"),
            ("seed=1.5", "seed", "unsigned"),
            ("to=localhost", "to", "IP address"),
            ("to=1.2.3.4:99999", "to", "IP address"),
            ("lsos=5%", "lsos", "unknown key"),
            ("loss=1%,loss=2%", "loss", "duplicate key"),
            ("seed=1,seed=1", "seed", "duplicate key"),
            ("loss", "loss", "key=value"),
            ("loss=1%,none", "none", "stand alone"),
        ];
        for (input, key, reason) in cases {
            let e = input
                .parse::<ImpairConfig>()
                .expect_err(&format!("{input} should fail"));
            let msg = e.to_string();
            assert_eq!(e.key, key, "{input}: {msg}");
            assert!(msg.starts_with("impair spec: `"), "{input}: {msg}");
            assert!(msg.contains(key), "{input}: {msg}");
            assert!(msg.contains(reason), "{input}: {msg}");
        }
        assert_eq!(
            "loss=150%".parse::<ImpairSpec>().unwrap_err().to_string(),
            "impair spec: `loss=150%`: loss must be between 0% and 100%"
        );
        // A single spec rejects `to` and `;`.
        assert_eq!("to=1.2.3.4".parse::<ImpairSpec>().unwrap_err().key, "to");
        assert!("loss=1%;dup=1%".parse::<ImpairSpec>().is_err());
        // Blackouts may repeat.
        assert!("blackout=1s+1s,blackout=1s+1s"
            .parse::<ImpairSpec>()
            .is_ok());
    }

    #[test]
    fn never_panics_on_odd_input() {
        for s in [
            "=",
            "==",
            ",,,",
            ";;;",
            "loss==5%",
            "loss=%",
            "delay=18446744073709551615s",
            "blackout=+",
            "blackout=1s+1s/",
            "ge=//",
            "to=[",
            "to=[::1",
            "burst=inf,loss=1%",
            "loss=1e-300",
            "\u{0}",
            "ß=1",
            "jitter=1ns",
        ] {
            let _ = s.parse::<ImpairConfig>();
        }
        // Huge blackout offsets and instants far in the future are fine.
        let t0 = Instant::now();
        let mut imp = Impairment::new(
            "delay=1h,jitter=1h,reorder=100%,gap=1h,blackout=100000000h+1s/200000000h"
                .parse()
                .unwrap(),
            t0,
        );
        imp.push(t0 + Duration::from_secs(1), addr("1.1.1.1:1"), payload(0));
        assert!(imp.poll_timeout().is_some());
    }
}

//! Overlay topology files: which hosts exist and who their neighbours are.
//!
//! The bootstrapper reads a topology file and hands every server/node its neighbour list;
//! the lab tooling and tests build topologies programmatically. The file format is a TOML
//! table whose keys are host IP addresses and whose values are arrays of neighbour IPs:
//!
//! ```toml
//! "127.0.0.1" = ["127.0.0.2"]
//! "127.0.0.2" = ["127.0.0.1", "127.0.0.3"]
//! "127.0.0.3" = ["127.0.0.2"]
//! ```
//!
//! Keys must be quoted (a bare `127.0.0.1` is a TOML *dotted key*). Addresses are bare IPv4 or
//! IPv6 literals without a port: every host listens on the overlay port.
//!
//! Optionally, a `[keys]` table (after the host entries) pins hosts' static public keys (64 hex
//! digits, what `keygen` prints and every host logs at start): the bootstrapper then refuses a
//! host at that address that presents another key.
//!
//! ```toml
//! [keys]
//! "127.0.0.1" = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
//! ```
//!
//! [`Topology::parse`] rejects files that cannot be used ([`TopologyError`], always naming the
//! offending entry and its 1-based line) and returns non-fatal findings as
//! [`TopologyWarning`]s for the caller to log.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A parsed overlay topology: hosts (in file order, or insertion order when built
/// programmatically) and each host's neighbour list.
///
/// Equality compares hosts and neighbour lists only, not where they came from in a file.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    entries: Vec<Entry>,
    /// Pinned static keys (`[keys]`).
    keys: std::collections::BTreeMap<IpAddr, crate::keys::PublicKey>,
}

/// One host of the topology, with optional source positions for diagnostics.
#[derive(Debug, Clone)]
struct Entry {
    host: IpAddr,
    neighbours: Vec<IpAddr>,
    /// 1-based line of the host's key, when parsed from a file.
    line: Option<usize>,
    /// 1-based line of each neighbour in `neighbours` (same length), when parsed from a file.
    neighbour_lines: Vec<Option<usize>>,
}

impl Entry {
    fn new(host: IpAddr) -> Entry {
        Entry {
            host,
            neighbours: Vec::new(),
            line: None,
            neighbour_lines: Vec::new(),
        }
    }

    fn push(&mut self, neighbour: IpAddr, line: Option<usize>) {
        self.neighbours.push(neighbour);
        self.neighbour_lines.push(line);
    }

    fn neighbour_line(&self, index: usize) -> Option<usize> {
        self.neighbour_lines.get(index).copied().flatten()
    }
}

impl PartialEq for Topology {
    fn eq(&self, other: &Topology) -> bool {
        self.keys == other.keys
            && self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| a.host == b.host && a.neighbours == b.neighbours)
    }
}

impl Eq for Topology {}

/// An optional 1-based line number, displayed as the `line N: ` prefix of a diagnostic (or
/// nothing for topologies that were not read from a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Line(pub Option<usize>);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "line {n}: "),
            None => Ok(()),
        }
    }
}

/// Why a topology was rejected. Every variant that concerns one entry names it and (when the
/// topology came from a file) its 1-based line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The topology file could not be read.
    #[error("cannot read topology file {}: {error}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error (included in the message, so not exposed as `source()`).
        error: std::io::Error,
    },
    /// The topology file was read but is invalid; `source` says why.
    #[error("topology file {}: {error}", path.display())]
    File {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it (included in the message, so not exposed as `source()`).
        error: Box<TopologyError>,
    },
    /// The text is not valid TOML. `message` is toml's own report (with line and column).
    #[error("{message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// toml's report, including the offending source line.
        message: String,
    },
    /// The same host key appears twice in the file (rejected by the TOML parser itself).
    #[error(
        "line {line}: duplicate entry for host \"{key}\"{}",
        first_line.map(|l| format!(" (first defined on line {l})")).unwrap_or_default()
    )]
    DuplicateKey {
        /// The repeated key, as written.
        key: String,
        /// 1-based line of the repetition.
        line: usize,
        /// 1-based line of the first definition, when known.
        first_line: Option<usize>,
    },
    /// Two keys spelled differently denote the same address (e.g. `"::1"` and
    /// `"0:0:0:0:0:0:0:1"`), or a programmatically built topology has a host twice.
    #[error(
        "{line}host {host} has a second entry{}",
        first_line.map(|l| format!(" (first defined on line {l})")).unwrap_or_default()
    )]
    DuplicateHost {
        /// The address with two entries.
        host: IpAddr,
        /// Where the second entry is.
        line: Line,
        /// 1-based line of the first entry, when known.
        first_line: Option<usize>,
    },
    /// A key or a neighbour-list element is not an IP address literal.
    #[error("{line}\"{text}\" is not an IP address{}", address_hint(text))]
    InvalidAddress {
        /// The text that failed to parse.
        text: String,
        /// Where it is.
        line: Line,
    },
    /// A host's value is not an array (of IP address strings).
    #[error(
        "{line}the value of \"{key}\" must be an array of IP address strings, found {} {found}{}",
        article(found),
        dotted_key_hint(key, found)
    )]
    NotAList {
        /// The host key, as written.
        key: String,
        /// The TOML type found instead (`"table"`, `"string"`, ...).
        found: &'static str,
        /// Where the key is.
        line: Line,
    },
    /// An element of a neighbour list is not a string.
    #[error(
        "{line}the neighbour list of \"{key}\" contains {} {found}; expected IP address strings",
        article(found)
    )]
    NotAString {
        /// The host key, as written.
        key: String,
        /// The TOML type found instead.
        found: &'static str,
        /// Where the offending element is.
        line: Line,
    },
    /// A `[keys]` entry is not a 64-hex-digit public key.
    #[error("{line}[keys] \"{host}\": {found} is not a public key (expected 64 hex digits, as `keygen` prints)")]
    BadKey {
        /// The entry's host, as written.
        host: String,
        /// What was found.
        found: String,
        /// Where.
        line: Line,
    },
    /// A `[keys]` entry names a host that has no entry.
    #[error("{line}[keys] pins a key for {host}, which is not a host of the topology")]
    KeyForUnknownHost {
        /// The host.
        host: IpAddr,
        /// Where.
        line: Line,
    },
    /// A host lists itself as a neighbour.
    #[error("{line}\"{host}\" lists itself as a neighbour")]
    SelfLoop {
        /// The host.
        host: IpAddr,
        /// Where the self-reference is.
        line: Line,
    },
    /// A host lists a neighbour that has no entry of its own.
    #[error(
        "{line}\"{host}\" lists \"{neighbour}\", which has no entry of its own in the topology"
    )]
    UnknownNeighbour {
        /// The host whose list is at fault.
        host: IpAddr,
        /// The neighbour without an entry.
        neighbour: IpAddr,
        /// Where the neighbour is listed.
        line: Line,
    },
    /// The topology has no hosts at all.
    #[error("the topology has no hosts")]
    Empty,
}

fn address_hint(text: &str) -> &'static str {
    if text.parse::<SocketAddr>().is_ok() {
        " (write the bare address without a port: every host uses the overlay port)"
    } else {
        ""
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn dotted_key_hint(key: &str, found: &str) -> &'static str {
    if found == "table" && key.chars().all(|c| c.is_ascii_digit()) {
        " (quote IP address keys: a bare 127.0.0.1 is a dotted TOML key)"
    } else {
        ""
    }
}

impl TopologyError {
    /// The 1-based line the error refers to, if it refers to a line of a file.
    pub fn line(&self) -> Option<usize> {
        match self {
            TopologyError::Io { .. } | TopologyError::Empty => None,
            TopologyError::File { error, .. } => error.line(),
            TopologyError::Syntax { line, .. } | TopologyError::DuplicateKey { line, .. } => {
                Some(*line)
            }
            TopologyError::DuplicateHost { line, .. }
            | TopologyError::InvalidAddress { line, .. }
            | TopologyError::NotAList { line, .. }
            | TopologyError::NotAString { line, .. }
            | TopologyError::BadKey { line, .. }
            | TopologyError::KeyForUnknownHost { line, .. }
            | TopologyError::SelfLoop { line, .. }
            | TopologyError::UnknownNeighbour { line, .. } => line.0,
        }
    }
}

/// A non-fatal finding about a topology; the topology is usable but probably not what its
/// author meant. Displayed with the line it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopologyWarning {
    /// `from` lists `to` but `to` does not list `from`.
    OneWay {
        /// The host that lists the link.
        from: IpAddr,
        /// The neighbour that does not list it back.
        to: IpAddr,
        /// Where `from` lists `to`.
        line: Line,
    },
    /// A host lists the same neighbour more than once (the repetition is dropped).
    DuplicateNeighbour {
        /// The host.
        host: IpAddr,
        /// The repeated neighbour.
        neighbour: IpAddr,
        /// Where the repetition is.
        line: Line,
    },
    /// A host's neighbour list is empty.
    NoNeighbours {
        /// The host.
        host: IpAddr,
        /// Where its entry is.
        line: Line,
    },
}

impl TopologyWarning {
    /// The 1-based line the warning refers to, if the topology came from a file.
    pub fn line(&self) -> Option<usize> {
        match self {
            TopologyWarning::OneWay { line, .. }
            | TopologyWarning::DuplicateNeighbour { line, .. }
            | TopologyWarning::NoNeighbours { line, .. } => line.0,
        }
    }
}

impl fmt::Display for TopologyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyWarning::OneWay { from, to, line } => write!(
                f,
                "{line}one-directional link: {from} → {to} is listed but not the reverse \
                 (\"{to}\" does not list \"{from}\")"
            ),
            TopologyWarning::DuplicateNeighbour {
                host,
                neighbour,
                line,
            } => write!(
                f,
                "{line}\"{host}\" lists \"{neighbour}\" more than once (repetition ignored)"
            ),
            TopologyWarning::NoNeighbours { host, line } => {
                write!(f, "{line}\"{host}\" has no neighbours")
            }
        }
    }
}

/// Maps byte offsets of a text to 1-based line numbers.
struct LineIndex {
    /// Byte offset at which each line starts.
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { starts }
    }

    /// 1-based line containing byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset).max(1)
    }

    fn line_of(&self, span: Range<usize>) -> Line {
        Line(Some(self.line(span.start)))
    }
}

impl Topology {
    /// Parses and validates a topology file's text.
    ///
    /// On success returns the topology (hosts in file order, repeated neighbours dropped)
    /// together with the non-fatal [`TopologyWarning`]s the caller should log.
    pub fn parse(text: &str) -> Result<(Topology, Vec<TopologyWarning>), TopologyError> {
        let lines = LineIndex::new(text);
        let table = DeTable::parse(text).map_err(|e| syntax_error(text, &lines, &e))?;
        let table = table.into_inner();

        // The map is ordered by key; restore file order.
        let mut items: Vec<(&Spanned<_>, &Spanned<DeValue<'_>>)> = table.iter().collect();
        items.sort_by_key(|(k, _)| k.span().start);

        let mut entries = Vec::with_capacity(items.len());
        let mut keys = std::collections::BTreeMap::new();
        let mut key_lines = Vec::new();
        for (key, value) in items {
            let key_line = lines.line_of(key.span());
            let key_text: &str = key.get_ref();
            if key_text == "keys" {
                if let DeValue::Table(t) = value.get_ref() {
                    for (host, k) in t.iter() {
                        let line = lines.line_of(host.span());
                        let ip = parse_ip(host.get_ref(), line)?;
                        let found = match k.get_ref() {
                            DeValue::String(s) => match crate::keys::PublicKey::parse(s) {
                                Ok(pk) => {
                                    keys.insert(ip, pk);
                                    key_lines.push((ip, line));
                                    continue;
                                }
                                Err(_) => format!("{s:?}"),
                            },
                            other => format!("{} {}", article(other.type_str()), other.type_str()),
                        };
                        return Err(TopologyError::BadKey {
                            host: host.get_ref().to_string(),
                            found,
                            line,
                        });
                    }
                    continue;
                }
            }
            // Shape first: a bare `127.0.0.1` key parses as nested tables, and the "not a list"
            // error explains that better than "\"127\" is not an IP address".
            let list = match value.get_ref() {
                DeValue::Array(list) => list,
                other => {
                    return Err(TopologyError::NotAList {
                        key: key_text.to_owned(),
                        found: other.type_str(),
                        line: key_line,
                    })
                }
            };
            let host = parse_ip(key_text, key_line)?;
            let mut entry = Entry::new(host);
            entry.line = key_line.0;
            for item in list.iter() {
                let item_line = lines.line_of(item.span());
                match item.get_ref() {
                    DeValue::String(s) => entry.push(parse_ip(s, item_line)?, item_line.0),
                    other => {
                        return Err(TopologyError::NotAString {
                            key: key_text.to_owned(),
                            found: other.type_str(),
                            line: item_line,
                        })
                    }
                }
            }
            entries.push(entry);
        }

        let mut topology = Topology { entries, keys };
        let warnings = topology.validate()?;
        for (ip, line) in key_lines {
            if topology.entry(ip).is_none() {
                return Err(TopologyError::KeyForUnknownHost { host: ip, line });
            }
        }
        topology.dedup_neighbours();
        Ok((topology, warnings))
    }

    /// Reads, parses and validates a topology file. Errors name the file.
    pub fn load(path: &Path) -> Result<(Topology, Vec<TopologyWarning>), TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|error| TopologyError::Io {
            path: path.to_owned(),
            error,
        })?;
        Topology::parse(&text).map_err(|e| TopologyError::File {
            path: path.to_owned(),
            error: Box::new(e),
        })
    }

    /// Checks the topology: rejects an empty topology, a host with two entries, self-loops and
    /// neighbours without an entry of their own (the first problem in host order is reported);
    /// returns warnings for one-directional links, repeated neighbours and hosts without
    /// neighbours. Usable on programmatically built topologies (diagnostics then have no line).
    pub fn validate(&self) -> Result<Vec<TopologyWarning>, TopologyError> {
        if self.entries.is_empty() {
            return Err(TopologyError::Empty);
        }
        let mut index: HashMap<IpAddr, usize> = HashMap::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            if let Some(&first) = index.get(&e.host) {
                return Err(TopologyError::DuplicateHost {
                    host: e.host,
                    line: Line(e.line),
                    first_line: self.entries[first].line,
                });
            }
            index.insert(e.host, i);
        }

        let mut warnings = Vec::new();
        for e in &self.entries {
            if e.neighbours.is_empty() {
                warnings.push(TopologyWarning::NoNeighbours {
                    host: e.host,
                    line: Line(e.line),
                });
            }
            let mut seen = BTreeSet::new();
            for (i, &n) in e.neighbours.iter().enumerate() {
                let line = Line(e.neighbour_line(i));
                if n == e.host {
                    return Err(TopologyError::SelfLoop { host: e.host, line });
                }
                let Some(&other) = index.get(&n) else {
                    return Err(TopologyError::UnknownNeighbour {
                        host: e.host,
                        neighbour: n,
                        line,
                    });
                };
                if !seen.insert(n) {
                    warnings.push(TopologyWarning::DuplicateNeighbour {
                        host: e.host,
                        neighbour: n,
                        line,
                    });
                    continue;
                }
                if !self.entries[other].neighbours.contains(&e.host) {
                    warnings.push(TopologyWarning::OneWay {
                        from: e.host,
                        to: n,
                        line,
                    });
                }
            }
        }
        Ok(warnings)
    }

    /// Builds a topology from undirected links: each `(a, b)` makes `a` and `b` neighbours of
    /// each other. Hosts appear in order of first mention; repeated links are ignored.
    /// The result is not validated (a `(a, a)` link is kept so [`Topology::validate`] rejects it).
    pub fn from_edges(edges: impl IntoIterator<Item = (IpAddr, IpAddr)>) -> Topology {
        edges
            .into_iter()
            .fold(TopologyBuilder::new(), |b, (x, y)| b.link(x, y))
            .build()
    }

    /// Builds a topology exactly as given, like a file would: hosts in order with their
    /// neighbour lists, nothing merged or deduplicated. Check it with [`Topology::validate`].
    pub fn from_adjacency(hosts: impl IntoIterator<Item = (IpAddr, Vec<IpAddr>)>) -> Topology {
        let entries = hosts
            .into_iter()
            .map(|(host, neighbours)| Entry {
                host,
                neighbour_lines: vec![None; neighbours.len()],
                neighbours,
                line: None,
            })
            .collect();
        Topology {
            entries,
            keys: Default::default(),
        }
    }

    /// The key pinned for `host` (`[keys]`), if any.
    pub fn pinned_key(&self, host: IpAddr) -> Option<crate::keys::PublicKey> {
        self.keys.get(&host).copied()
    }

    /// Pins `key` for `host` (programmatic topologies).
    pub fn pin_key(&mut self, host: IpAddr, key: crate::keys::PublicKey) {
        self.keys.insert(host, key);
    }

    /// Starts building a topology host by host and link by link.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::new()
    }

    /// The neighbour list of `host`, or `None` if it is not in the topology.
    pub fn neighbours(&self, host: IpAddr) -> Option<&[IpAddr]> {
        self.entry(host).map(|e| e.neighbours.as_slice())
    }

    /// The 1-based line of `host`'s entry, if the topology was parsed from a file.
    pub fn line_of(&self, host: IpAddr) -> Option<usize> {
        self.entry(host).and_then(|e| e.line)
    }

    /// All hosts, in file (or insertion) order.
    pub fn hosts(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.entries.iter().map(|e| e.host)
    }

    /// Whether `host` has an entry.
    pub fn contains(&self, host: IpAddr) -> bool {
        self.entry(host).is_some()
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the topology has no hosts (such a topology fails [`Topology::validate`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The undirected links, each once as `(lower, higher)` address, sorted. A link listed in
    /// only one direction counts too.
    pub fn edges(&self) -> Vec<(IpAddr, IpAddr)> {
        let set: BTreeSet<(IpAddr, IpAddr)> = self
            .entries
            .iter()
            .flat_map(|e| {
                e.neighbours
                    .iter()
                    .filter(move |&&n| n != e.host)
                    .map(move |&n| (e.host.min(n), e.host.max(n)))
            })
            .collect();
        set.into_iter().collect()
    }

    /// Number of undirected links (see [`Topology::edges`]).
    pub fn edge_count(&self) -> usize {
        self.edges().len()
    }

    /// Serialises the topology in the file format (one `"host" = ["n1", "n2"]` line per host,
    /// in host order). Parsing the result gives back an equal topology.
    pub fn to_toml_string(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            let list: Vec<String> = e.neighbours.iter().map(|n| format!("\"{n}\"")).collect();
            out.push_str(&format!("\"{}\" = [{}]\n", e.host, list.join(", ")));
        }
        if !self.keys.is_empty() {
            out.push_str("\n[keys]\n");
            for (host, key) in &self.keys {
                out.push_str(&format!("\"{host}\" = \"{key}\"\n"));
            }
        }
        out
    }

    fn entry(&self, host: IpAddr) -> Option<&Entry> {
        self.entries.iter().find(|e| e.host == host)
    }

    fn dedup_neighbours(&mut self) {
        for e in &mut self.entries {
            let mut seen = BTreeSet::new();
            let lines = std::mem::take(&mut e.neighbour_lines);
            let pairs: Vec<(IpAddr, Option<usize>)> = e
                .neighbours
                .iter()
                .copied()
                .zip(lines)
                .filter(|(n, _)| seen.insert(*n))
                .collect();
            (e.neighbours, e.neighbour_lines) = pairs.into_iter().unzip();
        }
    }
}

/// Incremental construction of a [`Topology`] (tests, generators). Hosts keep insertion
/// order; [`TopologyBuilder::build`] does not validate.
#[derive(Debug, Clone, Default)]
pub struct TopologyBuilder {
    entries: Vec<Entry>,
}

impl TopologyBuilder {
    /// An empty builder.
    pub fn new() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// Adds `host` (with no neighbours yet) unless already present.
    pub fn host(mut self, host: IpAddr) -> TopologyBuilder {
        self.entry_mut(host);
        self
    }

    /// Adds an undirected link: `a` and `b` list each other (each at most once).
    pub fn link(self, a: IpAddr, b: IpAddr) -> TopologyBuilder {
        self.one_way(a, b).one_way(b, a)
    }

    /// Adds a one-directional link: `from` lists `to` (at most once); both become hosts.
    pub fn one_way(mut self, from: IpAddr, to: IpAddr) -> TopologyBuilder {
        self.entry_mut(from);
        self.entry_mut(to);
        let e = self.entry_mut(from);
        if !e.neighbours.contains(&to) {
            e.push(to, None);
        }
        self
    }

    /// The topology built so far (unvalidated).
    pub fn build(self) -> Topology {
        Topology {
            entries: self.entries,
            keys: Default::default(),
        }
    }

    fn entry_mut(&mut self, host: IpAddr) -> &mut Entry {
        let i = match self.entries.iter().position(|e| e.host == host) {
            Some(i) => i,
            None => {
                self.entries.push(Entry::new(host));
                self.entries.len() - 1
            }
        };
        &mut self.entries[i]
    }
}

/// A seeded random overlay: the simulation harness's scale scenario (`sim::random_overlay`)
/// and the lab's (`lab --bin cost -- --only scale`) are this one topology. `relays` relays at
/// `127.0.{70 + i / 200}.{1 + i % 200}`, connected (a random spanning tree plus random extra
/// links up to 7/4 links per relay: average degree 3.5); `servers` servers at
/// `127.0.75.{s + 1}`, each with one channel `ch{s}` and two distinct relay neighbours; and
/// `viewers` viewers, each with a random relay as its PoP and a random channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomOverlay {
    /// The relays' addresses.
    pub relays: Vec<IpAddr>,
    /// Each relay's neighbours (relays, then servers), in the order drawn.
    pub neighbours: Vec<Vec<IpAddr>>,
    /// Each server and its two relay neighbours.
    pub servers: Vec<(IpAddr, [IpAddr; 2])>,
    /// Each viewer's PoP and channel index (`ch{index}`).
    pub viewers: Vec<(IpAddr, usize)>,
}

impl RandomOverlay {
    /// The overlay of `seed` (needs at least two relays and one server).
    pub fn new(seed: u64, relays: usize, servers: usize, viewers: usize) -> RandomOverlay {
        assert!(
            relays >= 2 && servers >= 1,
            "a random overlay needs 2 relays and a server"
        );
        let mut rng = crate::rng::Rng::seeded(seed);
        let relay_ip = |i: usize| -> IpAddr {
            std::net::Ipv4Addr::new(127, 0, 70 + (i / 200) as u8, 1 + (i % 200) as u8).into()
        };
        let mut links: BTreeSet<(usize, usize)> = BTreeSet::new();
        for i in 1..relays {
            let j = rng.below(i as u64) as usize;
            links.insert((j, i));
        }
        let target = relays * 7 / 4;
        while links.len() < target {
            let a = rng.below(relays as u64) as usize;
            let b = rng.below(relays as u64) as usize;
            if a != b {
                links.insert((a.min(b), a.max(b)));
            }
        }
        let mut neighbours: Vec<Vec<IpAddr>> = vec![Vec::new(); relays];
        for &(a, b) in &links {
            neighbours[a].push(relay_ip(b));
            neighbours[b].push(relay_ip(a));
        }
        let mut out_servers = Vec::new();
        for s in 0..servers {
            let ip: IpAddr = std::net::Ipv4Addr::new(127, 0, 75, (s + 1) as u8).into();
            let mut n: Vec<usize> = Vec::new();
            while n.len() < 2 {
                let r = rng.below(relays as u64) as usize;
                if !n.contains(&r) {
                    n.push(r);
                }
            }
            for &r in &n {
                neighbours[r].push(ip);
            }
            out_servers.push((ip, [relay_ip(n[0]), relay_ip(n[1])]));
        }
        let viewers = (0..viewers)
            .map(|_| {
                let pop = relay_ip(rng.below(relays as u64) as usize);
                (pop, rng.below(servers as u64) as usize)
            })
            .collect();
        RandomOverlay {
            relays: (0..relays).map(relay_ip).collect(),
            neighbours,
            servers: out_servers,
            viewers,
        }
    }

    /// The topology file (TOML) of the relays and servers.
    pub fn to_toml(&self) -> String {
        let list = |v: &[IpAddr]| {
            v.iter()
                .map(|ip| format!("\"{ip}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = String::new();
        for (ip, n) in self.relays.iter().zip(&self.neighbours) {
            s += &format!("\"{ip}\" = [{}]\n", list(n));
        }
        for (ip, n) in &self.servers {
            s += &format!("\"{ip}\" = [{}]\n", list(n));
        }
        s
    }
}

fn parse_ip(text: &str, line: Line) -> Result<IpAddr, TopologyError> {
    text.parse().map_err(|_| TopologyError::InvalidAddress {
        text: text.to_owned(),
        line,
    })
}

/// Turns toml's parse error into a [`TopologyError`]; duplicate keys get their own variant.
fn syntax_error(text: &str, lines: &LineIndex, err: &toml::de::Error) -> TopologyError {
    let (line, column) = match err.span() {
        Some(span) => {
            let line = lines.line(span.start);
            let line_start = lines.starts.get(line - 1).copied().unwrap_or(0);
            let column = text
                .get(line_start..span.start)
                .map_or(1, |s| s.chars().count() + 1);
            (line, column)
        }
        None => (1, 1),
    };
    if err.message().starts_with("duplicate key") {
        if let Some(raw) = err.span().and_then(|s| text.get(s)) {
            let key = unquote(raw.trim());
            // The recoverable parse keeps the first definition, which tells us its line.
            let (table, _) = DeTable::parse_recoverable(text);
            let first_line = table
                .get_ref()
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == key)
                .map(|(k, _)| lines.line(k.span().start))
                .filter(|&l| l != line);
            return TopologyError::DuplicateKey {
                key: key.to_owned(),
                line,
                first_line,
            };
        }
    }
    TopologyError::Syntax {
        line,
        column,
        message: err.to_string().trim_end().to_owned(),
    }
}

/// Strips one level of TOML basic/literal string quotes (keys here never need escapes).
fn unquote(raw: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = raw.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated overlay is a valid topology file (symmetric links, no warnings), the
    /// same for the same seed, with every relay reachable from the first.
    #[test]
    fn a_random_overlay_is_a_valid_connected_topology() {
        let g = RandomOverlay::new(1, 100, 3, 20);
        assert_eq!(g, RandomOverlay::new(1, 100, 3, 20));
        let (t, warnings) = Topology::parse(&g.to_toml()).expect("valid");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(t.hosts().count(), 103);
        let links: usize = g
            .relays
            .iter()
            .map(|r| t.neighbours(*r).unwrap().len())
            .sum();
        assert_eq!(
            links,
            2 * 175 + 2 * 3,
            "7/4 links per relay, two per server"
        );
        let mut seen = std::collections::HashSet::from([g.relays[0]]);
        let mut todo = vec![g.relays[0]];
        while let Some(h) = todo.pop() {
            for n in t.neighbours(h).unwrap() {
                if seen.insert(*n) {
                    todo.push(*n);
                }
            }
        }
        assert_eq!(seen.len(), 103);
        assert_eq!(g.viewers.len(), 20);
        assert!(g
            .viewers
            .iter()
            .all(|(pop, ch)| g.relays.contains(pop) && *ch < 3));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn err(text: &str) -> (TopologyError, String) {
        let e = Topology::parse(text).expect_err("expected a rejection");
        let msg = e.to_string();
        (e, msg)
    }

    #[test]
    fn parses_valid_file_in_file_order() {
        let text = "# comment\n\
                    \"127.0.0.3\" = [\"127.0.0.2\"]\n\
                    \"127.0.0.1\" = [\"127.0.0.2\"]\n\
                    \"127.0.0.2\" = [\n  \"127.0.0.1\",\n  \"127.0.0.3\",\n]\n";
        let (t, warnings) = Topology::parse(text).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let hosts: Vec<_> = t.hosts().collect();
        assert_eq!(hosts, [ip("127.0.0.3"), ip("127.0.0.1"), ip("127.0.0.2")]);
        assert_eq!(
            t.neighbours(ip("127.0.0.2")).unwrap(),
            [ip("127.0.0.1"), ip("127.0.0.3")]
        );
        assert_eq!(t.neighbours(ip("127.0.0.9")), None);
        assert!(t.contains(ip("127.0.0.1")) && !t.contains(ip("10.0.0.1")));
        assert_eq!(t.len(), 3);
        assert_eq!(t.edge_count(), 2);
        assert_eq!(t.line_of(ip("127.0.0.2")), Some(4));
    }

    #[test]
    fn accepts_ipv6() {
        let text = "\"::1\" = [\"fe80::2\"]\n\"fe80::2\" = [\"::1\"]\n";
        let (t, w) = Topology::parse(text).unwrap();
        assert!(w.is_empty());
        assert_eq!(t.neighbours(ip("::1")).unwrap(), [ip("fe80::2")]);
    }

    #[test]
    fn round_trips_through_to_toml_string() {
        let text = "# header\n\"127.0.0.1\" = [\"127.0.0.2\"]\n\n\"127.0.0.2\" = [\"127.0.0.1\", \"::1\"]\n\"::1\" = [\"127.0.0.2\"]\n";
        let (t, _) = Topology::parse(text).unwrap();
        let out = t.to_toml_string();
        assert_eq!(
            out,
            "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\"127.0.0.1\", \"::1\"]\n\"::1\" = [\"127.0.0.2\"]\n"
        );
        let (back, w) = Topology::parse(&out).unwrap();
        assert!(w.is_empty());
        assert_eq!(back, t);
        assert_eq!(
            back.hosts().collect::<Vec<_>>(),
            t.hosts().collect::<Vec<_>>()
        );
    }

    #[test]
    fn rejects_toml_syntax_error_with_line_and_column() {
        let (e, msg) = err("\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\"127.0.0.1\"\n");
        assert!(matches!(e, TopologyError::Syntax { line: 2, .. }), "{e:?}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("column"), "{msg}");
    }

    #[test]
    fn rejects_duplicate_key_naming_key_and_lines() {
        let text = "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\"127.0.0.1\"]\n# again\n\"127.0.0.1\" = []\n";
        let (e, msg) = err(text);
        assert!(
            matches!(e, TopologyError::DuplicateKey { line: 4, .. }),
            "{e:?}"
        );
        assert_eq!(
            msg,
            "line 4: duplicate entry for host \"127.0.0.1\" (first defined on line 1)"
        );
    }

    #[test]
    fn rejects_same_address_spelled_twice() {
        let text = "\"::1\" = [\"::2\"]\n\"::2\" = [\"::1\"]\n\"0:0:0:0:0:0:0:1\" = [\"::2\"]\n";
        let (e, msg) = err(text);
        assert_eq!(e.line(), Some(3));
        assert_eq!(
            msg,
            "line 3: host ::1 has a second entry (first defined on line 1)"
        );
    }

    #[test]
    fn rejects_bad_address_in_key() {
        let (e, msg) = err("\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.300\" = [\"127.0.0.1\"]\n");
        assert_eq!(e.line(), Some(2));
        assert_eq!(msg, "line 2: \"127.0.0.300\" is not an IP address");
    }

    #[test]
    fn rejects_bad_address_in_list() {
        let text = "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\n  \"127.0.0.1\",\n  \"127.0.0.300\",\n]\n";
        let (e, msg) = err(text);
        assert_eq!(e.line(), Some(4));
        assert_eq!(msg, "line 4: \"127.0.0.300\" is not an IP address");
    }

    #[test]
    fn rejects_address_with_port_with_hint() {
        let (_, msg) = err("\"127.0.0.1:8010\" = []\n");
        assert!(
            msg.starts_with(
                "line 1: \"127.0.0.1:8010\" is not an IP address (write the bare address"
            ),
            "{msg}"
        );
    }

    #[test]
    fn rejects_non_array_value() {
        let (e, msg) = err("\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = \"127.0.0.1\"\n");
        assert_eq!(e.line(), Some(2));
        assert_eq!(
            msg,
            "line 2: the value of \"127.0.0.2\" must be an array of IP address strings, found a string"
        );
    }

    #[test]
    fn rejects_unquoted_key_with_hint() {
        let (e, msg) = err("\n127.0.0.1 = [\"127.0.0.2\"]\n");
        assert_eq!(e.line(), Some(2));
        assert!(
            msg.starts_with("line 2: the value of \"127\" must be an array"),
            "{msg}"
        );
        assert!(msg.contains("quote IP address keys"), "{msg}");
    }

    #[test]
    fn rejects_non_string_element() {
        let (e, msg) =
            err("\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\n  \"127.0.0.1\",\n  3,\n]\n");
        assert_eq!(e.line(), Some(4));
        assert_eq!(
            msg,
            "line 4: the neighbour list of \"127.0.0.2\" contains an integer; expected IP address strings"
        );
    }

    #[test]
    fn rejects_self_loop() {
        let text =
            "\"127.0.0.1\" = [\"127.0.0.2\"]\n\n\"127.0.0.2\" = [\"127.0.0.1\", \"127.0.0.2\"]\n";
        let (e, msg) = err(text);
        assert_eq!(e.line(), Some(3));
        assert_eq!(msg, "line 3: \"127.0.0.2\" lists itself as a neighbour");
    }

    #[test]
    fn rejects_unknown_neighbour() {
        let text = "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\n  \"127.0.0.1\",\n\n  \"127.0.0.9\",\n]\n";
        let (e, msg) = err(text);
        assert_eq!(e.line(), Some(5));
        assert_eq!(
            msg,
            "line 5: \"127.0.0.2\" lists \"127.0.0.9\", which has no entry of its own in the topology"
        );
    }

    #[test]
    fn rejects_empty_topology() {
        for text in ["", "# only a comment\n"] {
            let (e, msg) = err(text);
            assert!(matches!(e, TopologyError::Empty));
            assert_eq!(msg, "the topology has no hosts");
        }
        assert!(matches!(
            Topology::builder().build().validate(),
            Err(TopologyError::Empty)
        ));
    }

    #[test]
    fn warns_about_one_way_duplicate_and_isolated() {
        let text = "\"127.0.0.1\" = [\"127.0.0.2\"]\n\
                    \"127.0.0.2\" = [\"127.0.0.1\", \"127.0.0.3\", \"127.0.0.1\"]\n\
                    \"127.0.0.3\" = []\n";
        let (t, w) = Topology::parse(text).unwrap();
        let msgs: Vec<String> = w.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "line 2: one-directional link: 127.0.0.2 → 127.0.0.3 is listed but not the reverse (\"127.0.0.3\" does not list \"127.0.0.2\")",
                "line 2: \"127.0.0.2\" lists \"127.0.0.1\" more than once (repetition ignored)",
                "line 3: \"127.0.0.3\" has no neighbours",
            ]
        );
        assert_eq!(w[0].line(), Some(2));
        // The repetition is dropped from the parsed topology.
        assert_eq!(
            t.neighbours(ip("127.0.0.2")).unwrap(),
            [ip("127.0.0.1"), ip("127.0.0.3")]
        );
        assert_eq!(t.edge_count(), 2);
    }

    #[test]
    fn validates_programmatic_topologies() {
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        let t = Topology::from_edges([(a, b), (b, c), (b, a)]);
        assert_eq!(t.validate().unwrap(), []);
        assert_eq!(t.hosts().collect::<Vec<_>>(), [a, b, c]);
        assert_eq!(t.edges(), [(a, b), (b, c)]);

        let t = Topology::builder().link(a, b).one_way(b, c).build();
        let w = t.validate().unwrap();
        assert_eq!(w.len(), 2, "{w:?}"); // b → c one-way, c has no neighbours
        assert_eq!(w[0].to_string(), "one-directional link: 10.0.0.2 → 10.0.0.3 is listed but not the reverse (\"10.0.0.3\" does not list \"10.0.0.2\")");
        assert_eq!(w[0].line(), None);

        let e = Topology::from_edges([(a, a)]).validate().unwrap_err();
        assert_eq!(e.to_string(), "\"10.0.0.1\" lists itself as a neighbour");

        let e = Topology::from_adjacency([(a, vec![c])])
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.0.0.1\" lists \"10.0.0.3\", which has no entry of its own in the topology"
        );
        let e = Topology::from_adjacency([(a, vec![]), (a, vec![])])
            .validate()
            .unwrap_err();
        assert_eq!(e.to_string(), "host 10.0.0.1 has a second entry");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("pessi-topology-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "\"127.0.0.1\" = [\"127.0.0.1\"]\n").unwrap();
        let msg = Topology::load(&path).unwrap_err().to_string();
        assert!(msg.contains("bad.toml"), "{msg}");
        assert!(
            msg.ends_with("line 1: \"127.0.0.1\" lists itself as a neighbour"),
            "{msg}"
        );
        let missing = dir.join("missing.toml");
        let msg = Topology::load(&missing).unwrap_err().to_string();
        assert!(msg.starts_with("cannot read topology file") && msg.contains("missing.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_panics_on_odd_input() {
        for text in [
            "[\"127.0.0.1\"]\n",
            "\"127.0.0.1\" = [[\"127.0.0.2\"]]\n",
            "\"127.0.0.1\" = {}\n",
            "x = 1\n",
            "\"\" = []\n",
            "\u{feff}\"127.0.0.1\" = []\n",
            "\"127.0.0.1\" = []\r\n\"127.0.0.1\" = []\r\n",
            "=",
            "\"127.0.0.1\" = [\"a\"",
        ] {
            let _ = Topology::parse(text);
        }
    }

    /// The topology files shipped in `topologies/`.
    mod shipped {
        use super::*;

        fn load(name: &str) -> Topology {
            let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../topologies")).join(name);
            let (t, warnings) = Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(warnings.is_empty(), "{name}: {warnings:?}");
            let (back, _) = Topology::parse(&t.to_toml_string()).unwrap();
            assert_eq!(back, t, "{name} does not round-trip");
            t
        }

        #[test]
        fn neighbours_toml() {
            let t = load("neighbours.toml");
            assert_eq!(t.len(), 5);
            assert_eq!(t.edge_count(), 5);
            assert_eq!(t.neighbours(ip("127.0.0.1")).unwrap(), [ip("127.0.0.2")]);
        }

        #[test]
        fn grid4x5_toml() {
            let t = load("grid4x5.toml");
            assert_eq!(t.len(), 22);
            assert_eq!(t.edge_count(), 33); // 31 grid links + 2 server links
                                            // Matches a generated 4×5 grid (row-major 127.0.1.1 ..= 127.0.1.20).
            let node = |r: u8, c: u8| ip(&format!("127.0.1.{}", r * 5 + c + 1));
            let mut b = Topology::builder();
            for r in 0..4 {
                for c in 0..5 {
                    if c + 1 < 5 {
                        b = b.link(node(r, c), node(r, c + 1));
                    }
                    if r + 1 < 4 {
                        b = b.link(node(r, c), node(r + 1, c));
                    }
                }
            }
            let grid = b
                .link(ip("127.0.1.100"), node(0, 0))
                .link(ip("127.0.1.101"), node(3, 4))
                .build();
            assert_eq!(t.edges(), grid.edges());
        }

        #[test]
        fn catastrophic_toml() {
            let t = load("catastrophic.toml");
            assert_eq!(t.len(), 5);
            assert_eq!(t.edge_count(), 4);
            // C's neighbours are B (which dies) and D (which only reaches the server via C).
            assert_eq!(
                t.neighbours(ip("127.0.2.4")).unwrap(),
                [ip("127.0.2.3"), ip("127.0.2.5")]
            );
            assert!(!t
                .neighbours(ip("127.0.2.4"))
                .unwrap()
                .contains(&ip("127.0.2.2")));
        }
    }

    #[test]
    fn keys_are_pinned_and_bad_pins_are_named() {
        let k = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
        let text = format!(
            "\"127.0.0.1\" = [\"127.0.0.2\"]\n\"127.0.0.2\" = [\"127.0.0.1\"]\n\n[keys]\n\"127.0.0.1\" = \"{k}\"\n"
        );
        let (t, _) = Topology::parse(&text).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(t.pinned_key(ip).unwrap().to_string(), k);
        assert_eq!(t.pinned_key("127.0.0.2".parse().unwrap()), None);
        let bad = text.replace(k, "abc");
        let e = Topology::parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("line 5") && e.contains("127.0.0.1") && e.contains("\"abc\""),
            "{e}"
        );
        let unknown = text.replace("\"127.0.0.1\" = \"3b", "\"127.0.0.9\" = \"3b");
        let e = Topology::parse(&unknown).unwrap_err().to_string();
        assert!(e.contains("127.0.0.9") && e.contains("not a host"), "{e}");
        let (t2, _) = Topology::parse(&text.replace(k, &k.replace('3', "4"))).unwrap();
        assert_ne!(t, t2, "a changed pin is a change of topology");
        assert_eq!(
            Topology::parse(&t.to_toml_string()).unwrap().0,
            t,
            "pins round-trip"
        );
    }
}

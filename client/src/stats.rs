//! The client's observable events and the `--stats FILE` JSON-lines writer.
//!
//! # Format
//!
//! One JSON object per line; `t_ms` is milliseconds since the client started (monotonic
//! `Instant`, never the wall clock); PoPs are written `"IP:PORT"`.
//!
//! ```text
//! {"event":"streams","t_ms":812,"names":["news","sport"]}        union of live PoPs' lists changed
//! {"event":"pop","t_ms":3,"pop":"127.0.0.2:8010","rtt_ms":0.21,"up":true}   PoP status changed
//! {"event":"play","t_ms":820,"stream":"news","pop":"127.0.0.2:8010"}         first subscribe
//! {"event":"first_packet","t_ms":840,"stream":"news","pop":"127.0.0.2:8010"}
//! {"event":"first_keyframe","t_ms":852,"stream":"news","pop":"127.0.0.2:8010"}
//! {"event":"gap","t_ms":6210,"stream":"news","pop":"127.0.0.3:8010","gap_ms":412.5}
//! {"event":"source_changed","t_ms":5120,"stream":"news","from":"127.0.0.2:8010","to":"127.0.0.3:8010"}
//! {"event":"path_added","t_ms":830,"stream":"news","pop":"127.0.0.3:8010"}     --redundancy 2
//! {"event":"path_lost","t_ms":4210,"stream":"news","pop":"127.0.0.2:8010","primary":"127.0.0.3:8010"}
//! {"event":"stats","t_ms":2000,"stream":"news","pop":"127.0.0.2:8010","packets":412,"bytes":542192,"lost":0,"cc_lost":0,"duplicates":0,"source_changes":0,"late":0,"skipped":0,"recovered":3,"nacks":3,"retransmitted":3,"pops":["127.0.0.2:8010"],"received":{"127.0.0.2:8010":415}}
//! {"event":"stop","t_ms":9000,"stream":"news","reason":"exit"}
//! ```
//!
//! `stats` lines come every second for each stream that has a source (and once at `stop`), with
//! cumulative counts: `packets` are datagrams handed to the sinks (released by the jitter
//! buffer, in order; duplicates never reach them), `bytes` their payload bytes, `lost` sequence
//! numbers the viewer never got: skipped by the jitter buffer after recovery (equal to
//! `skipped`; with `--latency 0`, sequence gaps), `cc_lost` TS packets missing by continuity
//! counter, `duplicates` copies dropped. Recovery and jitter buffer (all 0 with `--latency 0`):
//! `late` datagrams that arrived after their slot was given up, `skipped` sequence numbers
//! given up (never played), `recovered` missing datagrams that arrived in time (NACKed
//! retransmissions or late originals), `nacks` `Nack` messages sent to the PoP,
//! `retransmitted` datagrams received flagged `RETRANSMIT` (every copy, useful or not: the
//! recovery overhead). `pop` is the stream's primary PoP (NACKs go there), `pops` every PoP
//! feeding it (primary first; two with `--redundancy 2`), `received` the datagrams received
//! from each PoP that ever fed it (every copy: duplicates, retransmissions, cache bursts).
//! With `--redundancy 2`, `path_added` is a second PoP subscribed (its video is merged by
//! `seq`), `path_lost` one of the two went down: the stream continues from `primary` without a
//! reset (no `source_changed`).
//! `first_keyframe` is the first datagram flagged `KEYFRAME` or carrying a TS random access
//! indicator (a player can start decoding there). `gap` is written when a datagram ends a
//! silence longer than 100 ms in a stream that already had packets: `gap_ms` is the time since
//! the previous datagram (benchmarks measure failover with it).
//! `rtt_ms` is the smoothed RTT (`null` when unknown). A `pop` source is `null` in `stop`
//! when the stream had none.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Something observable happened (logged, written to `--stats`, reflected in the GUI).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StatEvent {
    /// The union of the live PoPs' channel lists changed.
    Streams {
        /// Channel names, sorted.
        names: Vec<String>,
    },
    /// A PoP went up or down.
    Pop {
        /// The PoP.
        pop: SocketAddr,
        /// Smoothed RTT in milliseconds, if measured.
        rtt_ms: Option<f64>,
        /// Whether it answers.
        up: bool,
    },
    /// A stream got its first source (subscribed at `pop`).
    Play {
        /// Channel name.
        stream: String,
        /// Where we subscribed.
        pop: SocketAddr,
    },
    /// The first video datagram of a stream arrived.
    FirstPacket {
        /// Channel name.
        stream: String,
        /// Where it came from.
        pop: SocketAddr,
    },
    /// The first datagram of a stream a decoder can start at (keyframe).
    FirstKeyframe {
        /// Channel name.
        stream: String,
        /// Where it came from.
        pop: SocketAddr,
    },
    /// A datagram ended a silence of more than [`GAP_EVENT_MIN`] in a flowing stream.
    Gap {
        /// Channel name.
        stream: String,
        /// Where the ending datagram came from.
        pop: SocketAddr,
        /// Time since the previous datagram, in milliseconds.
        gap_ms: f64,
    },
    /// A stream moved to another PoP (its PoP went down).
    SourceChanged {
        /// Channel name.
        stream: String,
        /// The previous PoP.
        from: SocketAddr,
        /// The new PoP.
        to: SocketAddr,
    },
    /// `--redundancy 2`: the stream is also subscribed at `pop` (merged by `seq`).
    PathAdded {
        /// Channel name.
        stream: String,
        /// The added PoP.
        pop: SocketAddr,
    },
    /// One of the PoPs feeding a stream went down; it continues from the other, `primary`,
    /// without a reset.
    PathLost {
        /// Channel name.
        stream: String,
        /// The PoP that went down.
        pop: SocketAddr,
        /// The PoP the stream continues from.
        primary: SocketAddr,
    },
    /// Periodic cumulative counters of a stream.
    Stats {
        /// Channel name.
        stream: String,
        /// Current source (the primary).
        pop: SocketAddr,
        /// Datagrams handed to the sinks.
        packets: u64,
        /// Their payload bytes.
        bytes: u64,
        /// Sequence numbers lost for the viewer (skipped by the jitter buffer; with
        /// `--latency 0`, gaps).
        lost: u64,
        /// TS packets lost according to continuity counters.
        cc_lost: u64,
        /// Duplicate datagrams dropped.
        duplicates: u64,
        /// Source changes so far.
        source_changes: u64,
        /// Datagrams arriving after their slot was given up.
        late: u64,
        /// Sequence numbers given up by the jitter buffer.
        skipped: u64,
        /// Missing datagrams that arrived in time.
        recovered: u64,
        /// `Nack` messages sent.
        nacks: u64,
        /// Datagrams received flagged `RETRANSMIT`.
        retransmitted: u64,
        /// Every PoP feeding the stream, primary first.
        pops: Vec<SocketAddr>,
        /// Datagrams received per PoP (every copy).
        received: BTreeMap<SocketAddr, u64>,
    },
    /// A stream stopped.
    Stop {
        /// Channel name.
        stream: String,
        /// Its PoP at that time, if any.
        pop: Option<SocketAddr>,
        /// Why: `"user"`, `"player exited"`, `"exit"`.
        reason: String,
    },
}

/// Silences shorter than this are not reported as `gap` events.
pub const GAP_EVENT_MIN: Duration = Duration::from_millis(100);

/// One line of the stats file: the event and its time.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    event: &'a StatEvent,
    t_ms: u64,
}

/// Renders `event` at `t` (time since start) as one JSON line, without the newline.
pub fn to_json_line(event: &StatEvent, t: Duration) -> String {
    let line = Line {
        event,
        t_ms: t.as_millis() as u64,
    };
    // Serialising plain data with string keys cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// Writes events as JSON lines, one `write` + flush per line (a reader tailing the file, or a
/// test, sees complete lines).
#[derive(Debug)]
pub struct StatsWriter {
    start: Instant,
    out: io::LineWriter<std::fs::File>,
}

impl StatsWriter {
    /// Creates (truncates) `path`; `start` is the client's start (`t_ms` = 0).
    pub fn create(path: &Path, start: Instant) -> io::Result<StatsWriter> {
        Ok(StatsWriter {
            start,
            out: io::LineWriter::new(std::fs::File::create(path)?),
        })
    }

    /// Appends one event stamped `now`.
    pub fn write(&mut self, now: Instant, event: &StatEvent) -> io::Result<()> {
        let mut line = to_json_line(event, now.saturating_duration_since(self.start));
        line.push('\n');
        self.out.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_shape() {
        let pop: SocketAddr = "127.0.0.2:8010".parse().unwrap();
        let l = to_json_line(
            &StatEvent::SourceChanged {
                stream: "news".into(),
                from: pop,
                to: "127.0.0.3:8010".parse().unwrap(),
            },
            Duration::from_millis(5120),
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["event"], "source_changed");
        assert_eq!(v["t_ms"], 5120);
        assert_eq!(v["from"], "127.0.0.2:8010");
        assert_eq!(v["to"], "127.0.0.3:8010");
        let l = to_json_line(
            &StatEvent::Pop {
                pop,
                rtt_ms: None,
                up: false,
            },
            Duration::ZERO,
        );
        assert_eq!(
            l,
            r#"{"event":"pop","pop":"127.0.0.2:8010","rtt_ms":null,"up":false,"t_ms":0}"#
        );
        let other: SocketAddr = "127.0.0.3:8010".parse().unwrap();
        let l = to_json_line(
            &StatEvent::Stats {
                stream: "news".into(),
                pop,
                packets: 10,
                bytes: 1880,
                lost: 1,
                cc_lost: 0,
                duplicates: 9,
                source_changes: 0,
                late: 0,
                skipped: 1,
                recovered: 0,
                nacks: 0,
                retransmitted: 0,
                pops: vec![pop, other],
                received: [(pop, 10), (other, 9)].into_iter().collect(),
            },
            Duration::from_millis(2000),
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["pop"], "127.0.0.2:8010");
        assert_eq!(v["lost"], 1);
        assert_eq!(v["pops"][1], "127.0.0.3:8010");
        assert_eq!(v["received"]["127.0.0.3:8010"], 9);
    }
}

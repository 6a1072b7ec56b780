//! Reading the client's `--stats` JSON lines into a per-stream summary.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// One line of the client's stats file (only the fields the lab uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Line {
    /// `streams`, `play`, `first_packet`, `source_changed`, `stats`, …
    pub event: String,
    /// Milliseconds since the client started.
    pub t_ms: u64,
    /// The stream, where the event is about one.
    #[serde(default)]
    pub stream: Option<String>,
    /// `streams` events: the channel names.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// The PoP in use.
    #[serde(default)]
    pub pop: Option<String>,
    /// `stats`: datagrams received (cumulative).
    #[serde(default)]
    pub packets: Option<u64>,
    /// `stats`: bytes received (cumulative).
    #[serde(default)]
    pub bytes: Option<u64>,
    /// `stats`: datagrams lost (cumulative).
    #[serde(default)]
    pub lost: Option<u64>,
    /// `stats`: TS packets lost by continuity counter (cumulative).
    #[serde(default)]
    pub cc_lost: Option<u64>,
    /// `stats`: retransmitted datagrams received (cumulative), once the client reports them.
    #[serde(default)]
    pub retransmitted: Option<u64>,
    /// `gap`: the silence a datagram ended, in milliseconds.
    #[serde(default)]
    pub gap_ms: Option<f64>,
    /// `source_changed`: previous PoP.
    #[serde(default)]
    pub from: Option<String>,
    /// `source_changed`: new PoP.
    #[serde(default)]
    pub to: Option<String>,
}

/// What happened to one stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSummary {
    /// When Play was pressed (ms since client start).
    pub play_ms: Option<u64>,
    /// When its first packet arrived.
    pub first_packet_ms: Option<u64>,
    /// When its first keyframe arrived.
    pub first_keyframe_ms: Option<u64>,
    /// Silences over 100 ms, as (t_ms when they ended, gap_ms).
    pub gaps: Vec<(u64, f64)>,
    /// TS packets lost by continuity counter.
    pub cc_lost: u64,
    /// Retransmitted datagrams received, when the client reports them.
    pub retransmitted: Option<u64>,
    /// Latest cumulative counters.
    pub packets: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Datagrams lost.
    pub lost: u64,
    /// PoP changes, in order: (t_ms, from, to).
    pub source_changes: Vec<(u64, String, String)>,
    /// The PoP in use at the end.
    pub pop: Option<String>,
}

/// Summary of a stats file.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The channel list, as last announced.
    pub channels: Vec<String>,
    /// Per stream.
    pub streams: BTreeMap<String, StreamSummary>,
    /// Lines that did not parse.
    pub bad_lines: usize,
}

impl Summary {
    /// Parses a stats file's content (incomplete last lines are ignored).
    pub fn parse(text: &str) -> Summary {
        let mut s = Summary::default();
        for raw in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(l) = serde_json::from_str::<Line>(raw) else {
                s.bad_lines += 1;
                continue;
            };
            if let Some(names) = l.names.clone() {
                if l.event == "streams" {
                    s.channels = names;
                }
            }
            let Some(name) = l.stream.clone() else {
                continue;
            };
            let st = s.streams.entry(name).or_default();
            match l.event.as_str() {
                "play" => {
                    st.play_ms.get_or_insert(l.t_ms);
                    st.pop = l.pop.clone();
                }
                "first_packet" => {
                    st.first_packet_ms.get_or_insert(l.t_ms);
                }
                "first_keyframe" => {
                    st.first_keyframe_ms.get_or_insert(l.t_ms);
                }
                "gap" => st.gaps.push((l.t_ms, l.gap_ms.unwrap_or_default())),
                "source_changed" => {
                    st.source_changes.push((
                        l.t_ms,
                        l.from.clone().unwrap_or_default(),
                        l.to.clone().unwrap_or_default(),
                    ));
                    st.pop = l.to.clone();
                }
                "stats" => {
                    st.packets = l.packets.unwrap_or(st.packets);
                    st.bytes = l.bytes.unwrap_or(st.bytes);
                    st.lost = l.lost.unwrap_or(st.lost);
                    st.cc_lost = l.cc_lost.unwrap_or(st.cc_lost);
                    if l.retransmitted.is_some() {
                        st.retransmitted = l.retransmitted;
                    }
                    if l.pop.is_some() {
                        st.pop = l.pop.clone();
                    }
                }
                _ => {}
            }
        }
        s
    }

    /// Reads and parses a stats file (empty summary if it does not exist yet).
    pub fn load(path: &Path) -> Summary {
        std::fs::read_to_string(path)
            .map(|t| Summary::parse(&t))
            .unwrap_or_default()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "channels: {}", self.channels.join(", "))?;
        for (name, s) in &self.streams {
            let start = match (s.play_ms, s.first_packet_ms) {
                (Some(p), Some(fp)) => format!("{} ms", fp.saturating_sub(p)),
                _ => "-".into(),
            };
            let loss = if s.packets + s.lost > 0 {
                100.0 * s.lost as f64 / (s.packets + s.lost) as f64
            } else {
                0.0
            };
            writeln!(
                f,
                "  {name}: via {} | {} datagrams, {:.1} MB, lost {} ({loss:.2} %) | start {start} | source changes {}",
                s.pop.as_deref().unwrap_or("-"),
                s.packets,
                s.bytes as f64 / 1e6,
                s.lost,
                s.source_changes.len()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_a_stats_file() {
        let text = r#"{"event":"streams","t_ms":10,"names":["demo","news"]}
{"event":"play","t_ms":20,"stream":"demo","pop":"127.0.0.5:8010"}
{"event":"first_packet","t_ms":45,"stream":"demo","pop":"127.0.0.5:8010"}
{"event":"first_keyframe","t_ms":60,"stream":"demo","pop":"127.0.0.5:8010"}
{"event":"gap","t_ms":1700,"stream":"demo","pop":"127.0.0.4:8010","gap_ms":250.5}
{"event":"stats","t_ms":1020,"stream":"demo","pop":"127.0.0.5:8010","packets":100,"bytes":131600,"lost":1}
{"event":"source_changed","t_ms":1500,"stream":"demo","from":"127.0.0.5:8010","to":"127.0.0.4:8010"}
{"event":"stats","t_ms":2020,"stream":"demo","pop":"127.0.0.4:8010","packets":200,"bytes":263200,"lost":3}
{"event":"stats","t_ms":20
"#;
        let s = Summary::parse(text);
        assert_eq!(s.channels, vec!["demo", "news"]);
        let d = &s.streams["demo"];
        assert_eq!((d.play_ms, d.first_packet_ms), (Some(20), Some(45)));
        assert_eq!((d.packets, d.lost), (200, 3));
        assert_eq!(d.source_changes.len(), 1);
        assert_eq!(d.first_keyframe_ms, Some(60));
        assert_eq!(d.gaps, vec![(1700, 250.5)]);
        assert_eq!(d.pop.as_deref(), Some("127.0.0.4:8010"));
        assert_eq!(s.bad_lines, 1);
        let shown = s.to_string();
        assert!(shown.contains("start 25 ms"), "{shown}");
    }
}

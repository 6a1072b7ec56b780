//! Scenario files: what to do to which host, when.
//!
//! ```toml
//! # Times are offsets from the moment the client starts.
//! duration = "30s"            # optional: stop the lab after this
//!
//! [impair]                    # optional: --impair given to hosts at start
//! "127.0.0.3" = "loss=5%,seed=1"
//!
//! [[step]]
//! at = "10s"
//! action = "kill"             # kill (SIGKILL, as a crash) | stop (SIGTERM) | restart
//! host = "127.0.0.3"
//!
//! [[step]]
//! at = "20s"
//! action = "restart"
//! host = "127.0.0.3"
//! impair = "loss=10%"         # optional: restart with this --impair
//!
//! [[step]]
//! at = "25s"
//! action = "add"              # a new host joins: added to the bootstrapper's topology (linked
//! host = "127.0.0.6"          # both ways), then a node is started on it
//! links = ["127.0.0.5", "127.0.0.4"]
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// What a step does to its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// SIGKILL: the host dies without a word, as in a crash.
    Kill,
    /// SIGTERM: a clean shutdown.
    Stop,
    /// Start it again (stopping it first if it runs), optionally with a new `--impair`.
    Restart,
    /// A new host joins the running overlay: it is added to the bootstrapper's copy of the
    /// topology with its `links` (both directions) and a node is started on it (in its own
    /// namespace with `--netns`), optionally with `--impair`.
    Add,
}

/// One timed step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When, after the client started.
    #[serde(with = "humantime_serde_compat")]
    pub at: Duration,
    /// What.
    pub action: Action,
    /// Which host (server or node).
    pub host: IpAddr,
    /// For `restart`: the `--impair` spec to restart with; for `add`: the new node's.
    #[serde(default)]
    pub impair: Option<String>,
    /// For `add`: the hosts the new host is linked to (both directions).
    #[serde(default)]
    pub links: Vec<std::net::IpAddr>,
}

/// A parsed scenario.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Stop the lab after this long (after the client started).
    #[serde(default, with = "humantime_serde_compat::option")]
    pub duration: Option<Duration>,
    /// `--impair` per host at start.
    #[serde(default)]
    pub impair: BTreeMap<IpAddr, String>,
    /// Timed steps, in any order (run sorted by time).
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Parses and checks a scenario: every impairment spec must parse.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let mut s: Scenario = toml::from_str(text)?;
        for (host, spec) in &s.impair {
            common::impair::ImpairConfig::parse_many(&[spec])
                .map_err(|e| anyhow::anyhow!("[impair] {host}: {e}"))?;
        }
        for (i, step) in s.steps.iter().enumerate() {
            let adds = step.action == Action::Add;
            anyhow::ensure!(
                adds || step.links.is_empty(),
                "step {}: `links` only goes with action = \"add\"",
                i + 1
            );
            anyhow::ensure!(
                !adds || !step.links.is_empty(),
                "step {}: action = \"add\" needs `links` (at least one host)",
                i + 1
            );
            if let Some(spec) = &step.impair {
                anyhow::ensure!(
                    matches!(step.action, Action::Restart | Action::Add),
                    "step {}: `impair` only goes with action = \"restart\" or \"add\"",
                    i + 1
                );
                common::impair::ImpairConfig::parse_many(&[spec])
                    .map_err(|e| anyhow::anyhow!("step {}: {e}", i + 1))?;
            }
        }
        s.steps.sort_by_key(|st| st.at);
        Ok(s)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))
    }
}

/// `"10s"`-style durations in TOML.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let s = Scenario::parse(
            r#"
duration = "30s"
[impair]
"127.0.0.3" = "loss=5%,seed=1"
[[step]]
at = "20s"
action = "restart"
host = "127.0.0.3"
impair = "loss=10%"
[[step]]
at = "10s"
action = "kill"
host = "127.0.0.3"
[[step]]
at = "25s"
action = "add"
host = "127.0.0.6"
links = ["127.0.0.5", "127.0.0.4"]
"#,
        )
        .unwrap();
        assert_eq!(s.duration, Some(Duration::from_secs(30)));
        assert_eq!(s.steps[0].action, Action::Kill);
        assert_eq!(s.steps[1].at, Duration::from_secs(20));
        assert_eq!(s.impair.len(), 1);
        assert_eq!(s.steps[2].action, Action::Add);
        assert_eq!(
            s.steps[2].links,
            [
                "127.0.0.5".parse::<std::net::IpAddr>().unwrap(),
                "127.0.0.4".parse().unwrap()
            ]
        );
    }

    #[test]
    fn bad_scenarios_are_named() {
        let e = Scenario::parse("[impair]\n\"127.0.0.3\" = \"loss=150%\"\n").unwrap_err();
        assert!(e.to_string().contains("127.0.0.3"), "{e}");
        let e =
            Scenario::parse("[[step]]\nat = \"1s\"\naction = \"explode\"\nhost = \"127.0.0.1\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("explode"), "{e}");
        let e = Scenario::parse(
            "[[step]]\nat = \"1s\"\naction = \"kill\"\nhost = \"127.0.0.1\"\nimpair = \"loss=1%\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("only goes with"), "{e}");
        let e = Scenario::parse("[[step]]\nat = \"1s\"\naction = \"add\"\nhost = \"127.0.0.9\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("needs `links`"), "{e}");
        let e = Scenario::parse(
            "[[step]]\nat = \"1s\"\naction = \"kill\"\nhost = \"127.0.0.1\"\nlinks = [\"127.0.0.2\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`links` only goes with"), "{e}");
    }
}

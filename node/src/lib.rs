//! # node — the overlay relay
//!
//! * [`routing`]: the I/O-free routing table (floods → routes, duplicate suppression, loop
//!   check, neighbour liveness) and [`routing::FloodOrigin`] for servers.
//! * [`subscriptions`]: the I/O-free subscription state (downstream subscribers as soft state,
//!   one upstream per watched channel, local demand for servers).
//! * [`gop`]: the I/O-free GOP cache (the current group of pictures per channel, sent to a
//!   new subscriber before the live datagrams: "instant start").
//! * [`choice`]: the upstream decisions as plain functions (hysteresis, disjoint secondary,
//!   catastrophic fallback parent).
//! * [`relay_core`]: [`RelayCore`], every decision of the relay and its datagram layer
//!   (decoding, reliable channel), synchronous, clock-free and I/O-free: fed
//!   `handle_datagram(now, from, bytes)` / `handle_timeout(now)`, polled for transmits.
//! * [`relay`]: the tokio driver that owns the socket and feeds the core; the `node` binary
//!   runs it with no local channel, servers use its [`relay::Relay`] handle.
//!
//! The protocol is described in `report/protocol.md`.

pub mod choice;
pub mod gop;
pub mod relay;
pub mod relay_core;
pub mod routing;
pub mod subscriptions;
#[cfg(test)]
mod testutil;

pub use relay::{Relay, RelayConfig, RelayStats};
pub use relay_core::{Command as RelayCommand, Event as RelayEvent, RelayCore, Transmit};

/// The decision modules read no clock, draw no entropy and use no tokio type: only the driver
/// (`relay`) does. Checked on their source (comments and tests aside), so a change that breaks
/// it fails here rather than in a review.
#[cfg(test)]
mod core_purity {
    #[test]
    fn the_decision_modules_read_no_clock_and_use_no_runtime() {
        let sources = [
            ("relay_core.rs", include_str!("relay_core.rs")),
            ("choice.rs", include_str!("choice.rs")),
            ("routing.rs", include_str!("routing.rs")),
            ("subscriptions.rs", include_str!("subscriptions.rs")),
            ("gop.rs", include_str!("gop.rs")),
        ];
        let banned = ["Instant::now", "SystemTime", "from_entropy", "tokio"];
        for (name, text) in sources {
            let code = text.split("#[cfg(test)]").next().unwrap_or(text);
            for (i, line) in code.lines().enumerate() {
                let l = line.trim_start();
                if l.starts_with("//") {
                    continue;
                }
                for b in banned {
                    assert!(!l.contains(b), "{name}:{}: {b} in `{l}`", i + 1);
                }
            }
        }
    }
}

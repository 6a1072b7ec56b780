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
//! * [`relay_core`]: every decision of the relay, synchronous and clock-free (the I/O-free
//!   core being extracted).
//! * [`relay`]: the tokio engine that drives both over a [`common::transport::Transport`]; the
//!   `node` binary runs it with no local channel, servers use its [`relay::Relay`] handle.
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

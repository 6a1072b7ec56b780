//! # client — watch Pessi Streamer channels through the best point of presence
//!
//! The client pings every PoP (overlay node) given with `--servers`, shows the union of their
//! channel lists, subscribes to a channel at the live PoP with the lowest RTT, and moves to the
//! next best PoP when that one stops answering. Each stream's MPEG-TS goes to a player (mpv or
//! ffplay, on stdin), a recording file and/or a plain UDP output; events and counters go to the
//! log, an optional JSON-lines stats file and the egui window (or nowhere visible, headless).
//!
//! Layout:
//! * [`host`] — the whole client protocol without I/O: the core on a `common::link::Link`
//!   (decoding, reliable channel), sender ids checked against the PoPs' addresses.
//! * [`core`] — the protocol logic, an I/O-free state machine fed `(now, event)` (fake-clock
//!   tests); [`seq`] — duplicate suppression and loss counting by sequence number (`--latency
//!   0`); [`playout`] — per-stream jitter buffer and NACK loss recovery.
//! * [`engine`] — the tokio task that drives the host: it owns the socket (`common::port`),
//!   feeds the host datagrams and timeouts, sends what it polls, and feeds the sinks, the stats
//!   file and the GUI snapshot.
//! * [`outputs`] — player, recording and UDP sinks (player choice and flags documented there);
//!   [`graphics`] — software-OpenGL detection and the video output mpv uses accordingly.
//! * [`stats`] — the events and the `--stats` JSON-lines format.
//! * [`gui`] — the eframe window; [`cli`] — the command line.

pub mod cli;
pub mod core;
pub mod engine;
pub mod graphics;
pub mod gui;
pub mod host;
pub mod outputs;
pub mod playout;
pub mod seq;
pub mod stats;

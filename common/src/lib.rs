//! # common — the Pessi Streamer protocol core
//!
//! Everything servers, nodes, clients and the bootstrapper share. Protocol logic here is
//! I/O-free (fed `(now, event)`, asked for `poll_transmit`/`poll_timeout`), so it is tested
//! with a fake clock and a seeded lossy network; the thin tokio drivers live beside it.

pub mod batch;
pub mod bootstrap;
pub mod failure;
pub mod feed;
pub mod host;
pub mod id;
pub mod impair;
pub mod jitter;
pub mod keys;
pub mod link;
pub mod map;
pub mod nack;
pub mod peers;
pub mod port;
pub mod reliable;
pub mod replay;
pub mod rng;
pub mod rtt;
pub mod runtime;
pub mod secure;
pub mod setup;
pub mod topology;
pub mod transport;
pub mod ts;
pub mod wire;

pub use id::{NodeId, PeerId};

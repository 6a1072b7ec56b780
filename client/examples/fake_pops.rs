//! Demo / manual test: fake PoPs streaming a test clip as channel `clip`, without the overlay.
//!
//! ```text
//! cargo run -p client --example fake_pops -- 127.0.0.51 127.0.0.52   # ctrl-c to stop
//! cargo run -p client -- --servers 127.0.0.51,127.0.0.52 --video-player ffplay --stream clip
//! ```
//! Each PoP listens on UDP 8010 of its IP; the second one answers pings 20 ms late.

#[path = "../tests/support/fake_pop.rs"]
mod fake_pop;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[tokio::main]
async fn main() {
    let ips: Vec<IpAddr> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("an IP address"))
        .collect();
    let ips = if ips.is_empty() {
        vec!["127.0.0.51".parse().expect("literal")]
    } else {
        ips
    };
    let mut pops = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let addr = SocketAddr::new(*ip, common::wire::DEFAULT_PORT);
        let pop = fake_pop::FakePop::start(
            addr,
            Duration::from_millis(20 * i as u64),
            1_000_000 * i as u64,
            true,
        )
        .await;
        eprintln!("fake PoP on {}", pop.addr);
        pops.push(pop);
    }
    let _ = tokio::signal::ctrl_c().await;
}

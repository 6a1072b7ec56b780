//! The 100-relay random overlay (3 servers, 20 viewers) for a minute of simulated time:
//! `cargo run --release -p sim --bin sim100 -- [SEED] [SECS] [--plaintext]`. Prints the CPU
//! time it took, what the viewers received, and the datagrams per link per second. Hosts
//! encrypt as the daemons do; `--plaintext` measures the same run without sessions.

use sim::{per_link_rates, random_overlay_with};
use std::time::Duration;

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let plaintext = all.iter().any(|a| a == "--plaintext");
    let mut args = all.into_iter().filter(|a| a != "--plaintext");
    let seed: u64 = args
        .next()
        .map_or(1, |s| s.parse().expect("SEED: a number"));
    let secs: u64 = args
        .next()
        .map_or(60, |s| s.parse().expect("SECS: a number"));
    let cpu = sim::cpu_time();
    let (mut net, viewers) = random_overlay_with(seed, 100, 3, 20, !plaintext);
    net.run_for(Duration::from_secs(3));
    for (v, ch) in &viewers {
        net.play(*v, ch);
    }
    net.run_for(Duration::from_secs(2));
    net.reset_counts();
    net.run_for(Duration::from_secs(secs));
    let cpu = sim::cpu_time() - cpu;
    let (links, control, video) = per_link_rates(&net, secs as f64);
    let ratios: Vec<f64> = viewers
        .iter()
        .map(|(v, ch)| net.viewing(*v, ch).delivered_ratio())
        .collect();
    let worst = ratios.iter().copied().fold(1.0, f64::min);
    let dups: u64 = viewers
        .iter()
        .map(|(v, ch)| net.viewing(*v, ch).duplicates)
        .sum();
    let mode = if plaintext { "plaintext" } else { "encrypted" };
    println!(
        "seed {seed}: 100 relays, 3 servers, 20 viewers, {secs} simulated s + 5 s start-up, {mode}"
    );
    println!("CPU: {:.2} s", cpu.as_secs_f64());
    println!(
        "viewers: worst delivered {:.3} %, duplicates {dups}",
        100.0 * worst
    );
    println!("directed links used: {links}; per directed link per second: {control:.2} control, {video:.2} video datagrams");
}

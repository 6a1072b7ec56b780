//! Whole overlays at scale on the fake clock: the 100-relay random topology with 20 viewers,
//! and the control traffic of the shipped 4×5 grid at rest.

use sim::{addr, per_link_rates, random_overlay, Net, SourceConfig};
use std::time::Duration;

#[test]
fn a_hundred_relays_carry_three_channels_to_twenty_viewers() {
    let (mut net, viewers) = random_overlay(1, 100, 3, 20);
    net.run_for(Duration::from_secs(3));
    for (v, ch) in &viewers {
        net.play(*v, ch);
    }
    net.run_for(Duration::from_secs(5));
    net.reset_counts();
    let cpu = sim::cpu_time();
    net.run_for(Duration::from_secs(15));
    let (links, control, video) = per_link_rates(&net, 15.0);
    println!(
        "100 relays, {links} directed links used: {control:.1} control and {video:.1} video datagrams \
         per directed link per second; {:?} of CPU for 15 simulated s (debug build)",
        sim::cpu_time() - cpu
    );
    for (v, ch) in &viewers {
        let seen = net.viewing(*v, ch);
        assert!(
            seen.delivered() >= 1900 && seen.delivered_ratio() >= 0.99,
            "{v} {ch}: {} delivered, {} missing",
            seen.delivered(),
            seen.missing()
        );
        assert_eq!(seen.duplicates, 0);
    }
    assert!(
        control < 40.0,
        "{control} control datagrams per link per second"
    );
}

#[test]
fn the_grid_at_rest_costs_few_control_datagrams_per_link() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topologies/grid4x5.toml"),
    )
    .unwrap();
    let mut net = Net::new(3);
    for (ip, n) in sim::neighbours_of(&text) {
        let n: Vec<&str> = n.iter().map(String::as_str).collect();
        if ip.ends_with(".100") || ip.ends_with(".101") {
            let ch = format!("ch{ip}");
            net.add_origin(&ip, &n, Default::default(), &[&ch], SourceConfig::default());
        } else {
            net.add_relay(&ip, &n, Default::default());
        }
    }
    net.run_for(Duration::from_secs(10));
    net.reset_counts();
    net.run_for(Duration::from_secs(60));
    let (links, control, video) = per_link_rates(&net, 60.0);
    println!("grid 4×5 at rest: {links} directed links, {control:.1} control datagrams per directed link per second");
    assert_eq!(video, 0.0);
    assert_eq!(links, 66);
    assert!(control <= 40.0, "{control}");
    assert!(net.relay(addr("127.0.1.1")).unwrap().stats().routes >= 2);
}

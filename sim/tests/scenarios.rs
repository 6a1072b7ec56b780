//! The overlay's decisions as a viewer sees them, on a fake clock: every scenario runs the real
//! relay cores and client hosts over the simulated network and asserts what the viewer's
//! jitter buffer released (delivered, missing, duplicates, longest silence). Simulated
//! seconds, deterministic: the figures printed are the same on every machine.

use client::core::CoreConfig;
use node::RelayConfig;
use sim::{addr, Net, SourceConfig, Viewing};
use std::net::SocketAddr;
use std::time::Duration;

const CH: &str = "news";

fn viewer() -> SocketAddr {
    "127.0.60.200:9000".parse().unwrap()
}

fn relay_cfg(redundancy: u8) -> RelayConfig {
    RelayConfig {
        redundancy,
        ..RelayConfig::default()
    }
}

fn client_cfg(redundancy: usize) -> CoreConfig {
    CoreConfig {
        redundancy,
        ..CoreConfig::default()
    }
}

/// S=.1 – {A=.2, B=.3} – C=.4 (the PoP); a viewer at C.
fn square(seed: u64, redundancy: u8) -> Net {
    let mut net = Net::new(seed);
    let r = || relay_cfg(redundancy);
    net.add_origin(
        "127.0.60.1",
        &["127.0.60.2", "127.0.60.3"],
        r(),
        &[CH],
        SourceConfig::default(),
    );
    net.add_relay("127.0.60.2", &["127.0.60.1", "127.0.60.4"], r());
    net.add_relay("127.0.60.3", &["127.0.60.1", "127.0.60.4"], r());
    net.add_relay("127.0.60.4", &["127.0.60.2", "127.0.60.3"], r());
    net.add_viewer(viewer(), &["127.0.60.4"], client_cfg(1));
    net
}

/// S1=.1 – N1=.2 – {N2=.3, N3=.4} – N4=.5 (the default topology's shape); a viewer at N4.
fn diamond(seed: u64) -> Net {
    let mut net = Net::new(seed);
    let r = RelayConfig::default;
    net.add_origin(
        "127.0.60.1",
        &["127.0.60.2"],
        r(),
        &[CH],
        SourceConfig::default(),
    );
    net.add_relay(
        "127.0.60.2",
        &["127.0.60.1", "127.0.60.3", "127.0.60.4"],
        r(),
    );
    net.add_relay("127.0.60.3", &["127.0.60.2", "127.0.60.5"], r());
    net.add_relay("127.0.60.4", &["127.0.60.2", "127.0.60.5"], r());
    net.add_relay("127.0.60.5", &["127.0.60.3", "127.0.60.4"], r());
    net.add_viewer(viewer(), &["127.0.60.5"], client_cfg(1));
    net
}

fn start(net: &mut Net) -> Viewing {
    net.run_for(Duration::from_secs(2));
    net.play(viewer(), CH);
    net.run_for(Duration::from_secs(3));
    let v = net.viewing(viewer(), CH);
    assert!(v.delivered() > 200, "the stream did not start: {v:?}");
    v
}

fn report(what: &str, v: &Viewing, gap: Duration) {
    println!(
        "{what}: delivered {} ({:.3} %), missing {}, duplicates {}, gap {:?}, longest {:?}",
        v.delivered(),
        100.0 * v.delivered_ratio(),
        v.missing(),
        v.duplicates,
        gap,
        v.longest_gap()
    );
}

/// Kills the relay the PoP takes the channel from; returns the viewer's gap after the kill.
fn kill_upstream(net: &mut Net, pop: &str) -> (SocketAddr, Duration) {
    let up = net
        .upstream_of(addr(pop), CH)
        .expect("the PoP has an upstream");
    let t = net.now();
    net.kill(up);
    net.run_for(Duration::from_secs(3));
    let v = net.viewing(viewer(), CH);
    (up, v.gap_after(t, net.now()))
}

#[test]
fn failover_of_the_relay_in_use() {
    for seed in 1..=5 {
        let mut net = square(seed, 1);
        start(&mut net);
        let (killed, gap) = kill_upstream(&mut net, "127.0.60.4");
        let v = net.viewing(viewer(), CH);
        report(
            &format!("failover r1 seed {seed} ({killed} killed)"),
            &v,
            gap,
        );
        assert_eq!(v.duplicates, 0);
        // 150 ms to declare the relay dead, a round trip to resubscribe, minus what the jitter
        // buffer (200 ms) hides.
        assert!(gap <= Duration::from_millis(300), "gap {gap:?}");
        let latest = v.latest().unwrap();
        net.run_for(Duration::from_secs(2));
        assert!(net.viewing(viewer(), CH).delivered_from(latest + 1) >= 190);
    }
}

#[test]
fn redundancy_two_loses_nothing_when_the_primary_path_dies() {
    for seed in 1..=5 {
        let mut net = square(seed, 2);
        start(&mut net);
        let (killed, gap) = kill_upstream(&mut net, "127.0.60.4");
        let v = net.viewing(viewer(), CH);
        report(
            &format!("failover r2 seed {seed} ({killed} killed)"),
            &v,
            gap,
        );
        assert_eq!(
            v.missing(),
            0,
            "a datagram was lost although two paths carried it"
        );
        assert_eq!(v.duplicates, 0);
        assert!(gap < Duration::from_millis(100), "gap {gap:?}");
    }
}

#[test]
fn catastrophic_chain_falls_back_to_the_dead_relays_parent() {
    let mut net = diamond(7);
    start(&mut net);
    // First death: a plain failover to the other relay.
    let (first, gap1) = kill_upstream(&mut net, "127.0.60.5");
    // Second death: N4 has no neighbour with a route; it asks N1 (the dead one's parent).
    let (second, gap2) = kill_upstream(&mut net, "127.0.60.5");
    assert_ne!(first, second);
    let v = net.viewing(viewer(), CH);
    report(
        &format!("catastrophic: {first} then {second} killed, first gap {gap1:?}"),
        &v,
        gap2,
    );
    assert_eq!(
        net.upstream_of(addr("127.0.60.5"), CH),
        Some(addr("127.0.60.2"))
    );
    assert!(net.relay(addr("127.0.60.5")).unwrap().stats().fallbacks >= 1);
    assert!(gap2 <= Duration::from_millis(300), "second gap {gap2:?}");
    assert_eq!(v.duplicates, 0);
    // Third death (N1): N4 falls back to N1's own parent, the server itself.
    let (third, gap3) = kill_upstream(&mut net, "127.0.60.5");
    assert_eq!(third, addr("127.0.60.2"));
    let v = net.viewing(viewer(), CH);
    report("catastrophic: then N1 killed", &v, gap3);
    assert_eq!(
        net.upstream_of(addr("127.0.60.5"), CH),
        Some(addr("127.0.60.1"))
    );
    assert!(gap3 <= Duration::from_millis(300), "third gap {gap3:?}");
    assert_eq!((v.duplicates, v.missing()), (0, 0));
}

#[test]
fn a_viewer_moves_to_its_other_pop_when_its_pop_dies() {
    let mut net = square(3, 1);
    // A second viewer-facing PoP: the viewer knows C and A.
    net.add_viewer(
        "127.0.60.201:9000".parse().unwrap(),
        &["127.0.60.4", "127.0.60.2"],
        client_cfg(1),
    );
    let v2: SocketAddr = "127.0.60.201:9000".parse().unwrap();
    net.run_for(Duration::from_secs(2));
    net.play(v2, CH);
    net.run_for(Duration::from_secs(3));
    let pop = net
        .viewer(v2)
        .unwrap()
        .core()
        .snapshot(net.now())
        .streams
        .first()
        .and_then(|s| s.pop)
        .expect("the stream has a PoP");
    let t = net.now();
    net.kill(pop);
    net.run_for(Duration::from_secs(4));
    let v = net.viewing(v2, CH);
    let gap = v.gap_after(t, net.now());
    report(&format!("PoP {pop} died"), &v, gap);
    assert!(gap <= Duration::from_secs(1), "gap {gap:?}");
    assert_eq!(v.duplicates, 0);
    assert!(v.delivered_from(v.latest().unwrap().saturating_sub(200)) >= 190);
}

/// A viewer behind a NAT that rebinds its port mid-stream: its PoP knows it by id, so the
/// subscription, its reliable state and its NACK budget follow it to the new address at its
/// next datagram; nothing is resubscribed and the old address is not served any more.
#[test]
fn a_viewer_whose_address_changes_keeps_its_subscription() {
    let mut net = square(4, 1);
    start(&mut net);
    let pop = addr("127.0.60.4");
    let ch = common::wire::ChannelId::of_name(CH);
    let before = net.relay(pop).unwrap().stats();
    assert_eq!(before.subscribers[&ch], vec![viewer()]);
    let moved: SocketAddr = "127.0.60.200:9001".parse().unwrap();
    let t = net.now();
    net.rebind(viewer(), moved);
    net.reset_counts();
    net.run_for(Duration::from_secs(3));
    let to = |a| net.link_counts().get(&(pop, a)).map_or(0, |c| c.video);
    println!(
        "after the rebind: {} video datagrams to the old address (lost), {} to the new",
        to(viewer()),
        to(moved)
    );
    assert!(to(moved) >= 280, "the PoP sends to the new address");
    let v = net.viewing(moved, CH);
    let gap = v.gap_after(t, net.now());
    report("viewer rebound to a new port", &v, gap);
    let after = net.relay(pop).unwrap().stats();
    assert_eq!(
        after.subscribers[&ch],
        vec![moved],
        "the subscription followed the viewer (and the old address is not served)"
    );
    assert_eq!(after.subscribes_refused, before.subscribes_refused);
    assert_eq!(after.peer_mismatch, 0);
    assert_eq!(net.relay(pop).unwrap().link_stats().reliable.timed_out, 0);
    assert!(gap <= Duration::from_millis(500), "gap {gap:?}");
    assert_eq!(v.duplicates, 0);
    assert!(v.delivered_from(v.latest().unwrap().saturating_sub(200)) >= 190);
}

/// An attacker on the path to the PoP: it records everything sent to it, then replays it,
/// replays it with a bit flipped, and adds junk from spoofed sources, while the viewer
/// watches. Nothing is accepted (the PoP's session layer counts every datagram), nothing is
/// answered, and the viewer sees no difference.
#[test]
fn replayed_altered_and_forged_datagrams_change_nothing() {
    let mut net = square(6, 1);
    start(&mut net);
    let pop = addr("127.0.60.4");
    net.tap(pop);
    net.run_for(Duration::from_secs(1));
    let captured: Vec<_> = net.tapped().to_vec();
    assert!(captured.len() > 100, "{}", captured.len());
    let opened_before = net.relay(pop).unwrap().link_stats().secure.opened;
    let rejected_before = net.relay(pop).unwrap().link_stats().secure.rejected_total();
    let t = net.now();
    let mut rng = common::rng::Rng::seeded(6);
    let mut injected = 0u64;
    for (from, bytes) in &captured {
        net.inject(*from, pop, bytes.clone());
        let mut b = bytes.to_vec();
        let i = rng.below(b.len() as u64 * 8) as usize;
        b[i / 8] ^= 1 << (i % 8);
        net.inject(*from, pop, b.into());
        let junk: Vec<u8> = (0..rng.below(200) + 16)
            .map(|_| rng.next_u64() as u8)
            .collect();
        let spoofed: SocketAddr = format!("127.0.61.{}:9000", rng.below(200) + 1)
            .parse()
            .unwrap();
        net.inject(spoofed, pop, junk.into());
        injected += 3;
    }
    net.reset_counts();
    net.run_for(Duration::from_secs(3));
    let v = net.viewing(viewer(), CH);
    let gap = v.gap_after(t, net.now());
    report("replays, bit flips, junk", &v, gap);
    let s = net.relay(pop).unwrap().link_stats().secure;
    let rejected = s.rejected_total() - rejected_before;
    println!(
        "{injected} injected, {rejected} rejected by reason {:?}",
        s.rejected_by_reason()
    );
    assert_eq!(rejected, injected, "every injected datagram was rejected");
    assert!(s.opened > opened_before, "the real traffic still flows");
    // Nothing answered to the spoofed sources.
    assert!(net
        .link_counts()
        .keys()
        .all(|(from, to)| !(*from == pop && to.ip().to_string().starts_with("127.0.61."))));
    assert_eq!(v.duplicates, 0);
    assert_eq!(gap, Duration::ZERO, "the viewer noticed");
    assert!(v.delivered_from(v.latest().unwrap().saturating_sub(200)) >= 200);
}

fn lossy(spec: &str, seed: u64) -> Viewing {
    let mut net = square(seed, 1);
    net.impair_all(spec);
    net.run_for(Duration::from_secs(2));
    net.play(viewer(), CH);
    net.run_for(Duration::from_secs(30));
    let v = net.viewing(viewer(), CH);
    report(spec, &v, Duration::ZERO);
    v
}

#[test]
fn five_and_ten_percent_loss_on_every_link_are_recovered() {
    for (spec, goal) in [("loss=5%", 0.999), ("loss=10%", 0.99)] {
        let v = lossy(spec, 11);
        assert!(v.delivered() > 2500, "{spec}: {v:?}");
        assert!(
            v.delivered_ratio() >= goal,
            "{spec}: {}",
            v.delivered_ratio()
        );
        assert_eq!(v.duplicates, 0);
    }
}

#[test]
fn the_tree_is_pruned_after_the_last_viewer_leaves() {
    let mut net = square(5, 1);
    start(&mut net);
    assert!(net.demanded(addr("127.0.60.1"), CH));
    net.stop(viewer(), CH);
    net.run_for(Duration::from_secs(5));
    net.reset_counts();
    net.run_for(Duration::from_secs(5));
    let video: u64 = net.link_counts().values().map(|c| c.video).sum();
    assert_eq!(video, 0, "video still flows: {:?}", net.link_counts());
    assert!(!net.demanded(addr("127.0.60.1"), CH));
}

#[test]
fn the_channel_moves_to_the_other_replica_when_its_server_dies() {
    // The relay next to the dead replica has no route left: it tells its subscriber (the PoP),
    // which moves to the other replica's route at once.
    // Two servers S1=.1 and S2=.5 serve "news"; S1 – A=.2 – C=.4 – B=.3 – S2; viewer at C.
    let mut net = Net::new(9);
    let r = RelayConfig::default;
    let src = SourceConfig::default();
    net.add_origin("127.0.60.1", &["127.0.60.2"], r(), &[CH], src);
    net.add_origin("127.0.60.5", &["127.0.60.3"], r(), &[CH], src);
    net.add_relay("127.0.60.2", &["127.0.60.1", "127.0.60.4"], r());
    net.add_relay("127.0.60.3", &["127.0.60.5", "127.0.60.4"], r());
    net.add_relay("127.0.60.4", &["127.0.60.2", "127.0.60.3"], r());
    net.add_viewer(viewer(), &["127.0.60.4"], client_cfg(1));
    start(&mut net);
    let server = [addr("127.0.60.1"), addr("127.0.60.5")]
        .into_iter()
        .find(|s| net.demanded(*s, CH))
        .expect("one replica feeds");
    let t = net.now();
    net.kill(server);
    net.run_for(Duration::from_secs(8));
    let v = net.viewing(viewer(), CH);
    let gap = v.gap_after(t, net.now());
    report(&format!("replica {server} died"), &v, gap);
    assert!(gap <= Duration::from_secs(5), "gap {gap:?}");
    assert_eq!(
        v.origins(),
        2,
        "the other replica's stream reached the viewer"
    );
    let other = if server == addr("127.0.60.1") {
        addr("127.0.60.5")
    } else {
        addr("127.0.60.1")
    };
    assert!(net.demanded(other, CH));
    assert_eq!(v.duplicates, 0);
    assert!(v.last_at.unwrap() + Duration::from_millis(100) >= net.now());
}

#[test]
fn a_flapping_link_keeps_the_stream_flowing() {
    let mut net = square(13, 1);
    start(&mut net);
    let pop = addr("127.0.60.4");
    let before = net.viewing(viewer(), CH).delivered();
    for _ in 0..5 {
        let up = net.upstream_of(pop, CH).unwrap();
        net.set_link(up, pop, false);
        net.run_for(Duration::from_secs(2));
        net.set_link(up, pop, true);
        net.run_for(Duration::from_secs(2));
    }
    let v = net.viewing(viewer(), CH);
    report("flapping link", &v, v.longest_gap());
    assert_eq!(v.duplicates, 0);
    // 20 s at 100 datagrams/s: each cut costs at most a failover's gap.
    assert!(v.delivered() - before >= 1900, "{}", v.delivered() - before);
    assert!(v.longest_gap() <= Duration::from_millis(500));
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = || {
        let mut net = square(21, 1);
        net.impair_all("loss=5%");
        start(&mut net);
        net.kill(net.upstream_of(addr("127.0.60.4"), CH).unwrap());
        net.run_for(Duration::from_secs(3));
        (net.viewing(viewer(), CH), net.link_counts().clone())
    };
    let (a, ca) = run();
    let (b, cb) = run();
    assert_eq!(a.delivered(), b.delivered());
    assert_eq!(a.missing(), b.missing());
    assert_eq!(a.latest(), b.latest());
    assert_eq!(ca, cb);
}

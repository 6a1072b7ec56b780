//! `lab --netns` end to end: the demo topology with every host (bootstrapper, server, relays,
//! clients) in its own network namespace on a private bridge, as on separate machines, with the
//! real binaries. The stream flows to a client that names its PoP by lab address (no `--bind`),
//! survives the death of the relay in use, and a host added while the overlay runs learns the
//! channel and serves a second client.
//!
//! Needs root and a working `ip netns`; without them it says why on stderr and passes (CI runs
//! as root). Its namespaces, bridge and veth pairs carry the test process's pid and its subnet
//! is one no interface uses, so it runs in parallel with the other tests.

mod support;

use lab::overlay::{Lab, LabOptions};
use lab::process::Binaries;
use lab::stats::Summary;
use lab::{Media, Plan};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

const SEC: Duration = Duration::from_secs(1);

/// The demo topology (`topologies/neighbours.toml`): server .1, relays .2–.4, PoP .5, reached
/// through .3 or .4.
const DEMO: &str = r#"
"127.0.0.1" = ["127.0.0.2"]
"127.0.0.2" = ["127.0.0.1", "127.0.0.3", "127.0.0.4"]
"127.0.0.3" = ["127.0.0.2", "127.0.0.5"]
"127.0.0.4" = ["127.0.0.2", "127.0.0.5"]
"127.0.0.5" = ["127.0.0.3", "127.0.0.4"]
"#;

fn packets(s: &Summary, stream: &str) -> u64 {
    s.streams.get(stream).map_or(0, |x| x.packets)
}

/// Waits until the log at `log` has a line containing every one of `parts`; returns it.
fn wait_log(log: &Path, logs: &Path, parts: &[&str], within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_owned();
        }
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for {parts:?} in {}; logs:{}",
            log.display(),
            logs_in(logs)
        );
        std::thread::sleep(SEC / 10);
    }
}

/// The upstream (a lab address) the node logging to `log` subscribed through last.
fn upstream_in_use(log: &Path, logs: &Path) -> IpAddr {
    wait_log(log, logs, &[UPSTREAM_LINE], 10 * SEC);
    latest_upstream(&std::fs::read_to_string(log).unwrap())
        .expect("upstream field")
        .parse()
        .unwrap()
}

/// Names of this process's namespaces that `ip netns` lists.
fn our_namespaces() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let prefix = format!("pessi{}-", std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_topology_in_namespaces_streams_heals_and_grows() {
    if let Err(e) = lab::netns::check_support() {
        eprintln!("skipped: {e}");
        return;
    }
    require_ffmpeg();
    std::env::set_var("RUST_BACKTRACE", "0");
    let t_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("topology.toml");
    std::fs::write(&topo, DEMO).unwrap();
    let logs = dir.path().join("logs");
    let (server, pop) = (ip("127.0.0.1"), ip("127.0.0.5"));
    let plan = Plan::new(topo, vec![server], vec![pop], None, 8010).unwrap();
    let bins = Binaries::locate().expect("binaries (run `cargo test --workspace`)");
    let opts = LabOptions {
        netns: true,
        media: Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
        ..LabOptions::default()
    };
    let rt = runtime();
    let _g = rt.enter();
    let mut lab = Lab::new(plan, bins, logs.clone(), opts).unwrap();
    let net = lab.network().expect("a lab network");
    eprintln!(
        "lab network {} (bridge {}), hosts: {:?}",
        net.subnet(),
        net.bridge(),
        lab.plan().addresses
    );
    // Every host, and the bootstrapper, is somewhere else than its topology address.
    for h in lab.plan().topology.hosts() {
        assert_ne!(lab.addr(h), h);
        assert!(lab.addr(h).to_string().starts_with("10.77."));
    }
    assert!(lab
        .plan()
        .bootstrapper
        .ip()
        .to_string()
        .starts_with("10.77."));
    rt.block_on(lab.start()).unwrap();

    // 1. The stream flows to a client in its own namespace, which has no --bind.
    let stats = dir.path().join("client-stats.jsonl");
    let mut args = lab::headless_client_args(&[lab.addr_list(&[pop])], &stats);
    args.extend(["--stream".into(), "live".into()]);
    lab.spawn_client("client", args).unwrap();
    let s = wait_stats_in(&stats, &logs, 60 * SEC, "the stream flowing", |s| {
        packets(s, "live") > 100
    });
    let pop_addr = format!("{}:8010", lab.addr(pop));
    assert_eq!(s.streams["live"].pop.as_deref(), Some(pop_addr.as_str()));
    eprintln!(
        "flowing after {:?}: {}",
        t_start.elapsed(),
        s.streams["live"].packets
    );

    // 2. Kill the relay the PoP receives through: the PoP reroutes, the client stays on it.
    let pop_log = lab.log_path(&lab.process_of(pop));
    let relay_addr = upstream_in_use(&pop_log, &logs);
    let relay = lab
        .plan()
        .topology
        .hosts()
        .find(|h| lab.addr(*h) == relay_addr)
        .expect("the upstream is a host of the lab");
    assert!(
        relay == ip("127.0.0.3") || relay == ip("127.0.0.4"),
        "{relay}"
    );
    let victim = lab.process_of(relay);
    rt.block_on(lab.supervisor().kill(&victim)).unwrap();
    let before = packets(&Summary::load(&stats), "live");
    let s = wait_stats_in(
        &stats,
        &logs,
        30 * SEC,
        "the stream after the relay died",
        |s| packets(s, "live") > before + 200,
    );
    // The client normally stays on its PoP (source changes 0); a false "PoP down" on a loaded
    // machine is a matter of timing, so it is printed, not asserted.
    assert_ne!(upstream_in_use(&pop_log, &logs), relay_addr);
    eprintln!("relay {relay} ({relay_addr}) killed; {s}");

    // 3. A host joins while the overlay runs: it learns the channel and serves a second client.
    let new = ip("127.0.0.6");
    rt.block_on(lab.add_host(new, &[ip("127.0.0.5"), ip("127.0.0.4")], None))
        .unwrap();
    let served = std::fs::read_to_string(lab.topology_path()).unwrap();
    let new_addr = lab.addr(new).to_string();
    assert!(
        served.contains(&format!("\"{new_addr}\" = [")),
        "not in the bootstrapper's topology:\n{served}"
    );
    let new_log = lab.log_path(&lab.process_of(new));
    wait_log(
        &new_log,
        &logs,
        &["channel available", "name=live"],
        30 * SEC,
    );
    let stats2 = dir.path().join("client2-stats.jsonl");
    let mut args = lab::headless_client_args(&[lab.addr_list(&[new])], &stats2);
    args.extend(["--stream".into(), "live".into()]);
    lab.spawn_client("client2", args).unwrap();
    let s2 = wait_stats_in(
        &stats2,
        &logs,
        60 * SEC,
        "the stream via the new host",
        |s| packets(s, "live") > 100,
    );
    assert_eq!(
        s2.streams["live"].pop.as_deref(),
        Some(format!("{new_addr}:8010").as_str())
    );
    eprintln!("via the new host {new} ({new_addr}): {s2}");
    // The first client kept receiving meanwhile.
    let before = packets(&Summary::load(&stats), "live");
    wait_stats_in(
        &stats,
        &logs,
        30 * SEC,
        "the first client still receiving",
        |s| packets(s, "live") > before + 50,
    );

    rt.block_on(lab.shutdown(5 * SEC));
    assert_eq!(our_namespaces(), Vec::<String>::new(), "namespaces left");
    eprintln!("netns test took {:?}", t_start.elapsed());
}

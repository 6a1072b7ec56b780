//! Flood simulation on the shipped 4×5 grid (20 nodes, 2 servers, 33 links): routing tables
//! only, a fake clock, no sockets. Floods are delivered breadth-first (every link costs the
//! same), which is what a uniform network does.

use common::topology::Topology;
use common::wire::{ChannelId, ChannelInfo, Flood, PathHop};
use common::NodeId;
use node::routing::{FloodOrigin, RoutingConfig, RoutingTable};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

const LINK: Duration = Duration::from_millis(1);

fn hop(ip: IpAddr) -> PathHop {
    PathHop {
        id: NodeId::for_ip(ip),
        addr: SocketAddr::new(ip, 8010),
    }
}

/// The address of the host with id `id` (routes name peers by id).
fn addr_of(id: NodeId, tables: &HashMap<SocketAddr, RoutingTable>) -> SocketAddr {
    tables
        .values()
        .map(|t| t.me())
        .find(|m| m.id == id)
        .map(|m| m.addr)
        .unwrap_or_else(|| panic!("no host with id {id}"))
}

fn chan(name: &str) -> ChannelInfo {
    ChannelInfo {
        id: ChannelId::of_name(name),
        name: name.into(),
    }
}

/// Floods are the only traffic here (no heartbeats), one round a second: liveness counts
/// in flood rounds (dead after 3 silent rounds).
fn sim_config() -> RoutingConfig {
    let mut cfg = RoutingConfig::default();
    cfg.failure.heartbeat_interval = Duration::from_secs(1);
    cfg.failure.k = 3;
    cfg
}

struct Sim {
    topology: Topology,
    tables: HashMap<SocketAddr, RoutingTable>,
    origins: Vec<(SocketAddr, FloodOrigin, Vec<ChannelInfo>)>,
    dead: HashSet<SocketAddr>,
    now: Instant,
}

impl Sim {
    fn new() -> Sim {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topologies/grid4x5.toml");
        let (topology, _) = Topology::load(&path).unwrap();
        let now = Instant::now();
        let mut tables = HashMap::new();
        for h in topology.hosts() {
            let neighbours: Vec<PathHop> = topology
                .neighbours(h)
                .unwrap()
                .iter()
                .map(|n| hop(*n))
                .collect();
            tables.insert(
                hop(h).addr,
                RoutingTable::new(now, hop(h), &neighbours, sim_config()),
            );
        }
        let s1: IpAddr = "127.0.1.100".parse().unwrap();
        let s2: IpAddr = "127.0.1.101".parse().unwrap();
        // Both serve "news" (two replicas); each has its own channel too.
        let origins = vec![
            (
                hop(s1).addr,
                FloodOrigin::new(hop(s1), 0),
                vec![chan("news"), chan("left")],
            ),
            (
                hop(s2).addr,
                FloodOrigin::new(hop(s2), 1000),
                vec![chan("news"), chan("right")],
            ),
        ];
        Sim {
            topology,
            tables,
            origins,
            dead: HashSet::new(),
            now,
        }
    }

    /// One flood round of every live origin, delivered breadth-first; returns the number of
    /// flood messages sent per origin.
    fn round(&mut self) -> Vec<usize> {
        self.now += Duration::from_secs(1);
        let now = self.now;
        let mut counts = Vec::new();
        let mut floods = Vec::new();
        for (addr, origin, channels) in &mut self.origins {
            if self.dead.contains(addr) {
                continue;
            }
            floods.push((*addr, origin.next_flood(channels, 0)));
        }
        let addr_of: std::collections::HashMap<NodeId, SocketAddr> =
            self.tables.iter().map(|(a, t)| (t.me().id, *a)).collect();
        for (addr, flood) in floods {
            let mut queue: VecDeque<(SocketAddr, SocketAddr, NodeId, Flood)> = VecDeque::new();
            let me = self.tables[&addr].me();
            for n in self.tables[&addr].neighbours() {
                queue.push_back((me.addr, n.addr, me.id, flood.clone()));
            }
            let mut sent = 0;
            while let Some((from, to, from_id, f)) = queue.pop_front() {
                sent += 1;
                if self.dead.contains(&to) {
                    continue;
                }
                let table = self.tables.get_mut(&to).unwrap();
                let _ = from;
                table.heard_from(now, from_id);
                let v = table.handle_flood(now, from_id, &f, LINK);
                let me = table.me();
                if let Some(fwd) = v.forward {
                    for t in v.to {
                        queue.push_back((me.addr, addr_of[&t], me.id, fwd.clone()));
                    }
                }
            }
            counts.push(sent);
        }
        for (addr, t) in &mut self.tables {
            if !self.dead.contains(addr) {
                t.expire(now);
            }
        }
        counts
    }

    fn servers(&self) -> HashSet<SocketAddr> {
        self.origins.iter().map(|(a, _, _)| *a).collect()
    }

    /// Follows best routes from `start` to a server that originates `channel`; returns the
    /// hosts visited (panics on a loop or a dead end).
    fn follow(&self, start: SocketAddr, channel: ChannelId) -> Vec<SocketAddr> {
        let servers: HashMap<SocketAddr, &Vec<ChannelInfo>> =
            self.origins.iter().map(|(a, _, c)| (*a, c)).collect();
        let mut at = start;
        let mut seen = vec![at];
        loop {
            if servers
                .get(&at)
                .is_some_and(|chs| chs.iter().any(|c| c.id == channel))
            {
                return seen;
            }
            let r = self.tables[&at]
                .best_route(channel, &[])
                .unwrap_or_else(|| panic!("{at} has no route to {channel:?} (path {seen:?})"));
            let via = addr_of(r.via, &self.tables);
            assert!(!self.dead.contains(&via), "{at} routes via dead {via}");
            at = via;
            assert!(!seen.contains(&at), "loop: {seen:?} then {at}");
            seen.push(at);
            assert!(seen.len() <= 32);
        }
    }
}

#[test]
fn grid_floods_cost_at_most_one_message_per_directed_edge_and_build_loop_free_routes() {
    let mut sim = Sim::new();
    let edges = sim.topology.edge_count();
    assert_eq!(edges, 33);
    let mut per_round = Vec::new();
    for _ in 0..5 {
        let counts = sim.round();
        for c in &counts {
            assert!(
                *c <= 2 * edges,
                "{c} flood messages for one origin > 2 × {edges}"
            );
        }
        per_round.push(counts);
    }
    println!(
        "grid4x5: {edges} links; flood messages per round per origin: {:?} (≤ 2 × edges = {}; \
         one per simple path would be ~40 000)",
        per_round.last().unwrap(),
        2 * edges
    );
    let servers = sim.servers();
    let hosts: Vec<SocketAddr> = sim.tables.keys().copied().collect();
    for name in ["news", "left", "right"] {
        let ch = ChannelId::of_name(name);
        for h in &hosts {
            if servers.contains(h) {
                continue;
            }
            let path = sim.follow(*h, ch);
            // Uniform links: the best route is a shortest path (grid distance + the server link).
            let r = sim.tables[h].best_route(ch, &[]).unwrap();
            assert_eq!(r.hops, path.len() - 1, "{h} {name}: {path:?}");
            assert!(sim.tables[h].channels().iter().any(|c| c.id == ch));
        }
    }
    // "news" from node 1 goes to the near server, from node 20 to the other one.
    let n1: SocketAddr = "127.0.1.1:8010".parse().unwrap();
    let n20: SocketAddr = "127.0.1.20:8010".parse().unwrap();
    let news = ChannelId::of_name("news");
    assert_eq!(sim.follow(n1, news).len(), 2);
    assert_eq!(sim.follow(n20, news).len(), 2);
}

#[test]
fn grid_heals_around_a_dead_node() {
    let mut sim = Sim::new();
    for _ in 0..3 {
        sim.round();
    }
    let left = ChannelId::of_name("left");
    let victim: SocketAddr = "127.0.1.2:8010".parse().unwrap();
    let victim_id = NodeId::for_ip(victim.ip());
    let dependents: Vec<SocketAddr> = sim
        .tables
        .iter()
        .filter(|(a, t)| {
            !sim.servers().contains(a)
                && t.best_route(left, &[]).is_some_and(|r| r.via == victim_id)
        })
        .map(|(a, _)| *a)
        .collect();
    assert!(!dependents.is_empty());
    sim.dead.insert(victim);
    // Its neighbours notice the silence (no flood from it) and drop routes through it.
    let mut rounds = 0;
    loop {
        sim.round();
        rounds += 1;
        let now = sim.now;
        for t in sim.tables.values_mut() {
            t.poll_dead(now);
        }
        let healed = dependents.iter().all(|d| {
            sim.tables[d]
                .best_route(left, &[])
                .is_some_and(|r| r.via != victim_id)
        });
        if healed {
            break;
        }
        assert!(rounds < 10, "not healed after {rounds} rounds");
    }
    println!("grid4x5: dependents of {victim} re-routed after {rounds} flood rounds");
    // After the route TTL, no path anywhere mentions the dead node.
    for _ in 0..4 {
        sim.round();
    }
    for (a, t) in &sim.tables {
        if *a == victim || sim.servers().contains(a) {
            continue;
        }
        assert!(
            t.routes().all(|r| r.via != victim_id),
            "{a} still routes via {victim}"
        );
        assert!(!t.routes().any(|r| r.path.iter().any(|h| h.addr == victim)));
        for name in ["news", "left", "right"] {
            let path = sim.follow(*a, ChannelId::of_name(name));
            assert!(!path.contains(&victim));
        }
    }
    let n3: SocketAddr = "127.0.1.3:8010".parse().unwrap();
    assert!(sim.tables[&n3]
        .dead_neighbours(sim.now)
        .contains(&victim_id));
}

//! The mesh in simulation: 10, 100 and 1,000 peers with at most 8 connections each,
//! under virtual time. Topology converges in about log N rounds with bytes that grow
//! near-linearly, broadcasts reach every peer exactly once, unicasts cross multi-hop
//! routes, halves of a partition reconverge after the heal, and a restarted peer is a
//! new incarnation everywhere.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use meshkv::mesh::sim::Sim;
use meshkv::mesh::{GCounter, NodeConfig, PeerName};

const MAX_DEGREE: usize = 8;

fn converge(sim: &mut Sim, max_rounds: u64) -> u64 {
    let start = sim.round;
    while !sim.converged() {
        assert!(sim.round - start < max_rounds, "no convergence after {max_rounds} rounds");
        sim.step();
    }
    sim.round - start
}

struct Figures {
    n: usize,
    rounds: u64,
    bytes_per_peer_per_round: f64,
    change_bytes: u64,
    change_rounds: u64,
}

fn topology_figures(n: usize) -> Figures {
    let mut sim = Sim::new(n, 42 + n as u64, NodeConfig::default());
    sim.link_random(4, MAX_DEGREE);
    assert!((0..n).all(|i| sim.degree(i) <= MAX_DEGREE));
    let rounds = converge(&mut sim, 200);
    sim.run_until_quiet(200);
    let bytes_per_peer_per_round = sim.bytes as f64 / n as f64 / rounds.max(1) as f64;

    // The cost of one change once converged: a new link between two far peers.
    let before = sim.bytes;
    let r0 = sim.round;
    let (a, b) = (0, n - 1);
    sim.link(a, b);
    sim.run_until_quiet(200);
    assert!(sim.converged());
    Figures { n, rounds, bytes_per_peer_per_round, change_bytes: sim.bytes - before, change_rounds: sim.round - r0 }
}

#[test]
fn topology_converges_in_log_rounds_with_near_linear_bytes() {
    let figures: Vec<Figures> = [10, 100, 1000].into_iter().map(topology_figures).collect();
    println!("| peers | rounds to converge | bytes/peer/round | one change: bytes | one change: bytes/peer | rounds |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for f in &figures {
        println!(
            "| {} | {} | {:.0} | {} | {:.0} | {} |",
            f.n,
            f.rounds,
            f.bytes_per_peer_per_round,
            f.change_bytes,
            f.change_bytes as f64 / f.n as f64,
            f.change_rounds
        );
    }
    for f in &figures {
        let log2 = (f.n as f64).log2();
        assert!((f.rounds as f64) <= 3.0 * log2 + 4.0, "{} peers took {} rounds", f.n, f.rounds);
    }
    // A single change costs bytes proportional to the number of links (linear in N),
    // not to N²: per peer it stays flat from 100 to 1,000 peers.
    let per_peer = |f: &Figures| f.change_bytes as f64 / f.n as f64;
    assert!(per_peer(&figures[2]) < 3.0 * per_peer(&figures[1]), "change cost grows faster than linear");
}

#[test]
fn broadcast_reaches_every_peer_exactly_once() {
    for n in [10, 100, 1000] {
        let mut sim = Sim::new(n, 7, NodeConfig::default());
        sim.add_channel("counter", || Box::new(GCounter::default()));
        sim.link_random(4, MAX_DEGREE);
        converge(&mut sim, 200);
        sim.run_until_quiet(200);
        sim.broadcasts_seen.clear();
        let src = sim.name(3).clone();
        let delta = sim.act(3, |node| {
            let me = node.name().to_string();
            let d = node.channel_mut::<GCounter>("counter").unwrap().increment(&me, 5);
            node.broadcast("counter", d.clone());
            d
        });
        sim.run_until_quiet(200);
        let mut per_peer: HashMap<usize, usize> = HashMap::new();
        for (to, s, p) in &sim.broadcasts_seen {
            assert_eq!((s, p), (&src, &delta));
            *per_peer.entry(*to).or_default() += 1;
        }
        assert_eq!(per_peer.len(), n - 1, "{n} peers: every other peer got it");
        assert!(per_peer.values().all(|&c| c == 1), "{n} peers: exactly once each");
        assert!(sim.nodes.iter().all(|node| node.channel::<GCounter>("counter").unwrap().total() == 5));
    }
}

#[test]
fn unicast_crosses_multi_hop_routes() {
    let mut sim = Sim::new(100, 11, NodeConfig::default());
    sim.link_random(3, MAX_DEGREE);
    converge(&mut sim, 200);
    sim.run_until_quiet(200);
    // The farthest peer from p0000 in its routing view.
    let target =
        (1..100).rfind(|&i| !sim.nodes[0].neighbours().contains(sim.name(i))).expect("a peer without a direct link");
    let dst = sim.name(target).clone();
    sim.act(0, |node| node.send_to(&dst, Bytes::from_static(b"over the hills"), false)).unwrap();
    sim.run_until_quiet(100);
    assert_eq!(sim.datagrams.len(), 1);
    assert_eq!(sim.datagrams[0], (target, sim.name(0).clone(), Bytes::from_static(b"over the hills")));
    let relayed: u64 = sim.nodes.iter().map(|n| n.stats().relayed).sum();
    assert!(relayed >= 1, "the datagram was relayed");
    // No route: an unknown peer.
    let err = sim.act(0, |node| node.send_to(&PeerName::from("nobody"), Bytes::new(), false));
    assert!(err.is_err());
}

#[test]
fn halves_of_a_partition_reconverge_after_the_heal() {
    let n = 100;
    let mut sim = Sim::new(n, 5, NodeConfig::default());
    sim.add_channel("counter", || Box::new(GCounter::default()));
    sim.link_random(4, MAX_DEGREE);
    sim.tick_every = 5;
    converge(&mut sim, 200);
    let left: HashSet<usize> = (0..n / 2).collect();
    let cut = sim.partition(&left);
    assert!(!cut.is_empty());
    // Each side may itself fall apart into pieces: each piece settles on its own view.
    let pieces = sim.components();
    assert!(pieces.len() >= 2);
    let mut rounds = 0;
    while !pieces.iter().all(|p| sim.converged_within(p)) {
        rounds += 1;
        assert!(rounds < 300, "the pieces of the partition did not settle apart");
        sim.step();
    }
    // Counts made on both sides during the partition.
    for i in [1, 2, n - 1] {
        sim.act(i, |node| {
            let me = node.name().to_string();
            let d = node.channel_mut::<GCounter>("counter").unwrap().increment(&me, 10);
            node.broadcast("counter", d);
        });
    }
    sim.run(20);
    for piece in &pieces {
        let want = 10 * [1, 2, n - 1].iter().filter(|i| piece.contains(i)).count() as u64;
        for &i in piece {
            assert_eq!(
                sim.nodes[i].channel::<GCounter>("counter").unwrap().total(),
                want,
                "peer {i} during the partition"
            );
        }
    }
    for (a, b) in cut {
        sim.link(a, b);
    }
    converge(&mut sim, 300);
    let mut rounds = 0;
    while !sim.nodes.iter().all(|node| node.channel::<GCounter>("counter").unwrap().total() == 30) {
        rounds += 1;
        assert!(rounds < 300, "counts did not merge after the heal");
        sim.step();
    }
}

#[test]
fn a_restarted_peer_is_a_new_incarnation() {
    let n = 100;
    let mut sim = Sim::new(n, 9, NodeConfig::default());
    sim.link_random(4, MAX_DEGREE);
    sim.tick_every = 5;
    converge(&mut sim, 200);
    // Give the old incarnation a high version, as a long-lived peer would have.
    for _ in 0..3 {
        let other = sim.nodes[20].neighbours().iter().next().map(sim_index).unwrap();
        sim.unlink(20, other);
        sim.link(20, other);
        converge(&mut sim, 200);
    }
    assert!(sim.nodes[20].topology().me().version > 3);
    let old_uid = sim.nodes[20].topology().me().uid;
    let new_uid = sim.restart(20, |_| {});
    assert_ne!(old_uid, new_uid);
    converge(&mut sim, 300);
    let name = sim.name(20).clone();
    for node in &sim.nodes {
        assert_eq!(node.topology().get(&name).unwrap().uid, new_uid);
    }
}

fn sim_index(p: &PeerName) -> usize {
    p[1..].parse().unwrap()
}

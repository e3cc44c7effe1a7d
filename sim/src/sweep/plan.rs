//! What a seed runs: a topology, a fault schedule and a workload, drawn from the seed
//! alone. Each part is drawn by its own small function, in a fixed order, so a seed keeps
//! its meaning (the `plans_of_pinned_seeds_do_not_change` test notices when it does not).
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use crate::{
    mesh::{Fault, Latency},
    rng::Rng,
};

/// Short faults happen in the first part of a run; a long edge outage may run past it.
pub(super) const FAULTS_END: Duration = Duration::from_secs(20);
/// Faults per run: up to this many, less one.
const FAULTS_MAX: u64 = 9;
/// A seed in this many has a long edge outage.
const OUTAGE_ONE_IN: u64 = 6;

/// A fault at a simulated time, with the kind of fault it injects (for the summary; `None`
/// for an event that heals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
    /// The kind it counts as: "link flap" and "link partition" are both partitions.
    pub kind: Option<&'static str>,
}

impl Scheduled {
    /// A fault that injects `kind`.
    pub fn injects(at: Duration, kind: &'static str, fault: Fault) -> Scheduled {
        Scheduled { at, fault, kind: Some(kind) }
    }

    /// An event that injects nothing new: the rest of a fault, or its repair.
    pub fn follows(at: Duration, fault: Fault) -> Scheduled {
        Scheduled { at, fault, kind: None }
    }
}

/// A producer: the node it writes through, and the node it fails over to, if any.
#[derive(Debug, Clone)]
pub struct ProducerPlan {
    /// Its producer name.
    pub name: String,
    /// Its node.
    pub home: String,
    /// Where it goes when its node fails for a while (and back, alternating).
    pub failover: Option<String>,
    /// It chooses its seqs (epoch 0) and sends a batch again with the same ones.
    pub chosen_seqs: bool,
    /// It restarts without memory: after a failed write, and in the middle of every
    /// fourth batch, a new session sends the batch again (a new epoch, unless it chooses
    /// its seqs).
    pub restarts: bool,
}

impl ProducerPlan {
    /// A producer on `home` that neither fails over, chooses seqs nor restarts.
    pub fn plain(name: &str, home: &str) -> ProducerPlan {
        ProducerPlan { name: name.into(), home: home.into(), failover: None, chosen_seqs: false, restarts: false }
    }
}

/// An operator's `ns set-clusters` through some node.
#[derive(Debug, Clone)]
pub struct ClustersEdit {
    /// When.
    pub at: Duration,
    /// Through which node.
    pub via: String,
    /// The new clusters.
    pub clusters: BTreeSet<String>,
}

/// What a seed runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Node names, edges first.
    pub nodes: Vec<String>,
    /// Links (a, b): a dials b.
    pub links: Vec<(String, String)>,
    /// Clock skew per node, in milliseconds (nodes absent are exact).
    pub skew_ms: BTreeMap<String, i64>,
    /// Fault events, in time order.
    pub faults: Vec<Scheduled>,
    /// When every fault is healed.
    pub heal_at: Duration,
    /// The producers.
    pub producers: Vec<ProducerPlan>,
    /// Clusters changes, in time order.
    pub edits: Vec<ClustersEdit>,
    /// The node a durable subscription reads from throughout.
    pub consumer: String,
}

/// The nodes and links of a plan.
struct Topology {
    edges: Vec<String>,
    regions: Vec<String>,
    links: Vec<(String, String)>,
}

impl Topology {
    fn nodes(&self) -> Vec<String> {
        self.edges.iter().chain(&self.regions).cloned().collect()
    }
}

impl Plan {
    /// Draws a plan from a seed:
    /// - 1-4 edges and 2-3 regions; regions linked to each other, each edge to one or two;
    /// - clock skew of up to a minute either way on some nodes;
    /// - up to eight faults in the first 20 s (crashes, link partitions and flaps, site
    ///   partitions, latency and loss, disk errors), and one seed in six a long edge outage
    ///   of 30-180 s;
    /// - a producer on every edge and one on a region, half of them failing over to a
    ///   second node;
    /// - in half the seeds, a region dropped from the clusters during the faults and (two
    ///   times in three) added back later, each through some node;
    /// - a consumer on one node.
    pub fn from_seed(seed: u64) -> Plan {
        let mut rng = Rng(seed);
        let topology = draw_topology(&mut rng);
        let nodes = topology.nodes();
        let skew_ms = draw_skew(&mut rng, &nodes);
        let mut faults = Vec::new();
        for _ in 0..rng.below(FAULTS_MAX) {
            faults.extend(draw_fault(&mut rng, &nodes, &topology.links));
        }
        let mut heal_at = FAULTS_END;
        if rng.one_in(OUTAGE_ONE_IN) {
            let (outage, rejoin) = draw_outage(&mut rng, &topology.edges);
            heal_at = rejoin.at;
            faults.extend([outage, rejoin]);
        }
        // Stable: a fault's own events keep their order when they fall at the same time.
        faults.sort_by_key(|f| f.at);
        let (edits, removed) = draw_edits(&mut rng, &topology);
        let producers = draw_producers(&mut rng, seed, &topology, removed.as_ref());
        let consumer = rng.pick(&nodes);
        Plan { nodes, links: topology.links, skew_ms, faults, heal_at, producers, edits, consumer }
    }

    /// The injected faults by kind, clock skew included.
    pub fn fault_kinds(&self) -> BTreeMap<&'static str, u64> {
        let mut kinds = BTreeMap::new();
        for kind in self.faults.iter().filter_map(|f| f.kind) {
            *kinds.entry(kind).or_default() += 1;
        }
        if !self.skew_ms.is_empty() {
            *kinds.entry("clock skew").or_default() += self.skew_ms.len() as u64;
        }
        if !self.edits.is_empty() {
            *kinds.entry("clusters change").or_default() += self.edits.len() as u64;
        }
        kinds
    }
}

fn draw_topology(rng: &mut Rng) -> Topology {
    let edges: Vec<String> = (1..=1 + rng.below(4)).map(|i| format!("edge-{i}")).collect();
    let regions: Vec<String> =
        ["region-a", "region-b", "region-c"][..2 + rng.below(2) as usize].iter().map(|r| r.to_string()).collect();
    let mut links = Vec::new();
    for (i, a) in regions.iter().enumerate() {
        links.extend(regions[i + 1..].iter().map(|b| (a.clone(), b.clone())));
    }
    for edge in &edges {
        let first = rng.pick(&regions);
        links.push((edge.clone(), first.clone()));
        if rng.one_in(2) {
            let others: Vec<String> = regions.iter().filter(|r| **r != first).cloned().collect();
            links.push((edge.clone(), rng.pick(&others)));
        }
    }
    Topology { edges, regions, links }
}

fn draw_skew(rng: &mut Rng, nodes: &[String]) -> BTreeMap<String, i64> {
    let mut skew_ms = BTreeMap::new();
    for node in nodes {
        if rng.one_in(3) {
            skew_ms.insert(node.clone(), rng.below(120_001) as i64 - 60_000);
        }
    }
    skew_ms
}

/// One short fault and what heals it, within [`FAULTS_END`].
fn draw_fault(rng: &mut Rng, nodes: &[String], links: &[(String, String)]) -> Vec<Scheduled> {
    let window = FAULTS_END.as_millis() as u64;
    let before_end = |t: Duration| t.min(FAULTS_END);
    let at = rng.millis(500, window - 500);
    let (a, b) = rng.pick(links);
    match rng.below(10) {
        0 | 1 => {
            let node = rng.pick(nodes);
            let restart = before_end(at + rng.millis(0, 4000));
            vec![
                Scheduled::injects(at, "crash", Fault::Crash(node.clone())),
                Scheduled::follows(restart, Fault::Restart(node)),
            ]
        }
        2..=4 => {
            let repair = before_end(at + rng.millis(500, 8500));
            vec![
                Scheduled::injects(at, "link partition", Fault::Partition(a.clone(), b.clone())),
                Scheduled::follows(repair, Fault::Repair(a, b)),
            ]
        }
        5 => {
            let node = rng.pick(nodes);
            let rejoin = before_end(at + rng.millis(1000, 10_000));
            vec![
                Scheduled::injects(at, "site partition", Fault::Isolate(node.clone())),
                Scheduled::follows(rejoin, Fault::Rejoin(node)),
            ]
        }
        6 => draw_flaps(rng, at, &a, &b),
        7 | 8 => {
            let (latency_ms, loss_permille) = (20 + rng.below(480), rng.below(300) as u32);
            let restore = before_end(at + rng.millis(2000, 15_000));
            let latency = Latency::up_to(Duration::from_millis(latency_ms));
            vec![
                Scheduled::injects(at, "latency+loss", Fault::SetLatency(a.clone(), b.clone(), latency)),
                Scheduled::follows(at, Fault::SetLoss(a.clone(), b.clone(), loss_permille)),
                Scheduled::follows(restore, Fault::SetLatency(a.clone(), b.clone(), Latency::DEFAULT)),
                Scheduled::follows(restore, Fault::SetLoss(a, b, 0)),
            ]
        }
        _ => {
            let node = rng.pick(nodes);
            let heal = before_end(at + rng.millis(200, 5000));
            vec![
                Scheduled::injects(at, "disk errors", Fault::FailDiskWrites(node.clone())),
                Scheduled::follows(heal, Fault::HealDisk(node)),
            ]
        }
    }
}

/// A link cut and repaired 3-8 times, each for under a second.
fn draw_flaps(rng: &mut Rng, at: Duration, a: &str, b: &str) -> Vec<Scheduled> {
    let before_end = |t: Duration| t.min(FAULTS_END);
    let mut t = at;
    let mut out = Vec::new();
    for _ in 0..3 + rng.below(6) {
        out.push(Scheduled::injects(before_end(t), "link flap", Fault::Partition(a.into(), b.into())));
        t += rng.millis(100, 900);
        out.push(Scheduled::follows(before_end(t), Fault::Repair(a.into(), b.into())));
        t += rng.millis(100, 900);
    }
    out
}

/// An edge's uplink down for 30-180 s, starting in the first 10 s.
fn draw_outage(rng: &mut Rng, edges: &[String]) -> (Scheduled, Scheduled) {
    let edge = rng.pick(edges);
    let at = rng.millis(1000, 10_000);
    let rejoin = at + rng.millis(30_000, 180_000);
    (
        Scheduled::injects(at, "long edge outage", Fault::Isolate(edge.clone())),
        Scheduled::follows(rejoin, Fault::Rejoin(edge)),
    )
}

/// In half the seeds, a region leaves the clusters (and, two times in three, comes back);
/// answers the edits and the region, if one left.
fn draw_edits(rng: &mut Rng, t: &Topology) -> (Vec<ClustersEdit>, Option<String>) {
    // A region that may leave the clusters: never region-a (which has a producer), and
    // never an edge's only uplink (its data would have no way out).
    let uplinks = |edge: &String, besides: &String| t.links.iter().any(|(a, b)| a == edge && b != besides);
    let removable: Vec<String> =
        t.regions[1..].iter().filter(|r| t.edges.iter().all(|e| uplinks(e, r))).cloned().collect();
    if removable.is_empty() || !rng.one_in(2) {
        return (Vec::new(), None);
    }
    let nodes = t.nodes();
    let region = rng.pick(&removable);
    let all: BTreeSet<String> = nodes.iter().cloned().collect();
    let mut fewer = all.clone();
    fewer.remove(&region);
    let at = rng.millis(2000, 15_000);
    let mut edits = vec![ClustersEdit { at, via: rng.pick(&nodes), clusters: fewer }];
    if !rng.one_in(3) {
        let at = at + rng.millis(1000, 8000);
        edits.push(ClustersEdit { at, via: rng.pick(&nodes), clusters: all });
    }
    (edits, Some(region))
}

/// A producer per edge and one on region-a; half fail over to a region that stays in
/// the clusters.
fn draw_producers(rng: &mut Rng, seed: u64, t: &Topology, removed: Option<&String>) -> Vec<ProducerPlan> {
    let targets: Vec<String> = t.regions.iter().filter(|r| Some(*r) != removed).cloned().collect();
    let mut producers = Vec::new();
    for (i, edge) in t.edges.iter().enumerate() {
        let failover = rng.one_in(2).then(|| rng.pick(&targets));
        producers.push(ProducerPlan { failover, ..ProducerPlan::plain(&format!("sensor-{}", i + 1), edge) });
    }
    let other_regions: Vec<String> = targets.iter().filter(|r| *r != "region-a").cloned().collect();
    let failover = (!other_regions.is_empty() && rng.one_in(2)).then(|| rng.pick(&other_regions));
    producers.push(ProducerPlan { failover, ..ProducerPlan::plain("model", "region-a") });
    // Drawn from a stream of their own, so that adding them changed no earlier plan.
    let mut modes = Rng(seed ^ 0x05e9_51d5);
    for p in &mut producers {
        (p.chosen_seqs, p.restarts) = (modes.one_in(2), modes.one_in(2));
    }
    producers
}

//! Seeded runs: each seed draws a topology, a fault schedule and a workload, runs the
//! production nodes under turmoil, heals, and checks design section 5's invariants on
//! every node.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use rill_node::{
    client::{Client, ClientError, ClientOptions, Outgoing, Producer},
    protocol::StartPosition,
};
use rill_replication::namespace::{ConfigDoc, Edit};

use crate::{
    client::{node_addr, sim_now as now},
    env::{Bugs, Host, splitmix64},
    mesh::{EPOCH_S, NetState, NodeSpawn, node_config},
    net::{Loss, SimNet, Trace},
};

const NAMESPACE: &str = "acme/sensors";
const TOPIC: &str = "acme/sensors/temp";
/// Short faults happen in the first part of a run; a long edge outage may run past it.
const FAULTS_END: Duration = Duration::from_secs(20);
/// After the heal, nodes get this long (simulated) to converge before the check reads them.
const CONVERGE_WAIT: Duration = Duration::from_secs(120);
/// A run that is not done by then fails.
const SIMULATION_MAX: Duration = Duration::from_secs(1200);
/// Batches per producer, their size, and the pause between them: production spans the
/// fault window.
const BATCHES: u64 = 20;
const BATCH: u64 = 10;
const BATCH_EVERY: Duration = Duration::from_secs(1);
/// A producer with a second node switches to it after failing this long.
const FAILOVER_AFTER: Duration = Duration::from_secs(1);
/// turmoil's default maximum link latency, restored when a link recovers.
const LATENCY_DEFAULT: Duration = Duration::from_millis(100);

/// The plan's randomness, from the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True one time in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }
}

/// An event on the fault timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Cut one link.
    Partition(String, String),
    /// Cut one link briefly (a flap: a repair follows within a second).
    Flap(String, String),
    /// Restore a cut link.
    Repair(String, String),
    /// Cut a node off from every peer (its local clients still reach it).
    Isolate(String),
    /// An edge's long uplink outage: isolated for minutes.
    Outage(String),
    /// End an isolation or outage.
    Rejoin(String),
    /// Slow and lossy link.
    Degrade {
        /// One end.
        a: String,
        /// The other end.
        b: String,
        /// Maximum one-way latency.
        latency_ms: u64,
        /// Datagrams lost, in thousandths.
        loss_permille: u32,
    },
    /// Back to a healthy link.
    Restore(String, String),
    /// Crash a node: unsynced writes and unflushed metadata are lost.
    Crash(String),
    /// Start a crashed node again.
    Restart(String),
    /// The node's disk fails every write and sync (writes are torn).
    DiskFails(String),
    /// The disk works again.
    DiskHeals(String),
}

impl Fault {
    /// The kind of fault this injects, for the summary; `None` for an event that heals.
    pub fn kind(&self) -> Option<&'static str> {
        Some(match self {
            Fault::Partition(..) => "link partition",
            Fault::Flap(..) => "link flap",
            Fault::Isolate(..) => "site partition",
            Fault::Outage(..) => "long edge outage",
            Fault::Degrade { .. } => "latency+loss",
            Fault::Crash(..) => "crash",
            Fault::DiskFails(..) => "disk errors",
            Fault::Repair(..) | Fault::Rejoin(..) | Fault::Restore(..) | Fault::Restart(..) | Fault::DiskHeals(..) => {
                return None;
            }
        })
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
    /// Fault events at simulated times, in time order.
    pub faults: Vec<(Duration, Fault)>,
    /// When every fault is healed.
    pub heal_at: Duration,
    /// The producers.
    pub producers: Vec<ProducerPlan>,
    /// Clusters changes, in time order.
    pub edits: Vec<ClustersEdit>,
    /// The node a durable subscription reads from throughout.
    pub consumer: String,
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
        let edges: Vec<String> = (1..=1 + rng.below(4)).map(|i| format!("edge-{i}")).collect();
        let regions: Vec<String> =
            ["region-a", "region-b", "region-c"][..2 + rng.below(2) as usize].iter().map(|r| r.to_string()).collect();
        let nodes: Vec<String> = edges.iter().chain(&regions).cloned().collect();
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
        let mut skew_ms = BTreeMap::new();
        for node in &nodes {
            if rng.one_in(3) {
                skew_ms.insert(node.clone(), rng.below(120_001) as i64 - 60_000);
            }
        }
        let mut faults = Vec::new();
        let window = FAULTS_END.as_millis() as u64;
        let before_end = |t: Duration| t.min(FAULTS_END);
        for _ in 0..rng.below(9) {
            let at = rng.millis(500, window - 500);
            let (a, b) = rng.pick(&links);
            match rng.below(10) {
                0 | 1 => {
                    let node = rng.pick(&nodes);
                    faults.push((at, Fault::Crash(node.clone())));
                    faults.push((before_end(at + rng.millis(0, 4000)), Fault::Restart(node)));
                }
                2..=4 => {
                    faults.push((at, Fault::Partition(a.clone(), b.clone())));
                    faults.push((before_end(at + rng.millis(500, 8500)), Fault::Repair(a, b)));
                }
                5 => {
                    let node = rng.pick(&nodes);
                    faults.push((at, Fault::Isolate(node.clone())));
                    faults.push((before_end(at + rng.millis(1000, 10_000)), Fault::Rejoin(node)));
                }
                6 => {
                    let mut t = at;
                    for _ in 0..3 + rng.below(6) {
                        faults.push((before_end(t), Fault::Flap(a.clone(), b.clone())));
                        t += rng.millis(100, 900);
                        faults.push((before_end(t), Fault::Repair(a.clone(), b.clone())));
                        t += rng.millis(100, 900);
                    }
                }
                7 | 8 => {
                    let (latency_ms, loss_permille) = (20 + rng.below(480), rng.below(300) as u32);
                    faults.push((at, Fault::Degrade { a: a.clone(), b: b.clone(), latency_ms, loss_permille }));
                    faults.push((before_end(at + rng.millis(2000, 15_000)), Fault::Restore(a, b)));
                }
                _ => {
                    let node = rng.pick(&nodes);
                    faults.push((at, Fault::DiskFails(node.clone())));
                    faults.push((before_end(at + rng.millis(200, 5000)), Fault::DiskHeals(node)));
                }
            }
        }
        let mut heal_at = FAULTS_END;
        if rng.one_in(6) {
            let edge = rng.pick(&edges);
            let at = rng.millis(1000, 10_000);
            heal_at = at + rng.millis(30_000, 180_000);
            faults.push((at, Fault::Outage(edge.clone())));
            faults.push((heal_at, Fault::Rejoin(edge)));
        }
        // Stable: a fault's own events keep their order when they fall at the same time.
        faults.sort_by_key(|f| f.0);

        // A region that may leave the clusters: never region-a (which has a producer), and
        // never an edge's only uplink (its data would have no way out).
        let uplinks = |edge: &String, besides: &String| links.iter().any(|(a, b)| a == edge && b != besides);
        let removable: Vec<String> =
            regions[1..].iter().filter(|r| edges.iter().all(|e| uplinks(e, r))).cloned().collect();
        let mut edits = Vec::new();
        let mut removed = None;
        if !removable.is_empty() && rng.one_in(2) {
            let region = rng.pick(&removable);
            let all: BTreeSet<String> = nodes.iter().cloned().collect();
            let mut fewer = all.clone();
            fewer.remove(&region);
            let at = rng.millis(2000, 15_000);
            edits.push(ClustersEdit { at, via: rng.pick(&nodes), clusters: fewer });
            if !rng.one_in(3) {
                let at = at + rng.millis(1000, 8000);
                edits.push(ClustersEdit { at, via: rng.pick(&nodes), clusters: all });
            }
            removed = Some(region);
        }
        // Failover targets: regions that stay in the clusters.
        let targets: Vec<String> = regions.iter().filter(|r| Some(*r) != removed.as_ref()).cloned().collect();
        let mut producers = Vec::new();
        for (i, edge) in edges.iter().enumerate() {
            let failover = rng.one_in(2).then(|| rng.pick(&targets));
            producers.push(ProducerPlan {
                name: format!("sensor-{}", i + 1),
                home: edge.clone(),
                failover,
                chosen_seqs: false,
                restarts: false,
            });
        }
        let other_regions: Vec<String> = targets.iter().filter(|r| *r != "region-a").cloned().collect();
        let failover = (!other_regions.is_empty() && rng.one_in(2)).then(|| rng.pick(&other_regions));
        producers.push(ProducerPlan {
            name: "model".into(),
            home: "region-a".into(),
            failover,
            chosen_seqs: false,
            restarts: false,
        });
        // Drawn from a stream of their own, so that adding them changed no earlier plan.
        let mut modes = Rng(seed ^ 0x05e9_51d5);
        for p in &mut producers {
            (p.chosen_seqs, p.restarts) = (modes.one_in(2), modes.one_in(2));
        }
        let consumer = rng.pick(&nodes);
        Plan { nodes, links, skew_ms, faults, heal_at, producers, edits, consumer }
    }

    /// The injected faults by kind, clock skew included.
    pub fn fault_kinds(&self) -> BTreeMap<&'static str, u64> {
        let mut kinds = BTreeMap::new();
        for kind in self.faults.iter().filter_map(|(_, f)| f.kind()) {
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

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant (design section 5).
    pub invariant: u8,
    /// Where and what.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invariant {}: {}", self.invariant, self.detail)
    }
}

/// A seed's result.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Its plan.
    pub plan: Plan,
    /// Hash of the datagram trace.
    pub trace_hash: u64,
    /// Simulated time.
    pub simulated: Duration,
    /// Producer switches to their second node.
    pub failovers: u64,
    /// Broken invariants (empty: all held).
    pub violations: Vec<Violation>,
}

fn make_certs(dir: &Path, nodes: &[String]) -> anyhow::Result<PathBuf> {
    let certs = dir.join("certs");
    rill_transport::certs::create_mesh(&certs, nodes)?;
    Ok(certs)
}

/// A message as the checker identifies it: (origin, producer session, seq), where the
/// session is the producer name and its epoch ([`session`]).
type Held = (String, String, u64);

/// What a node holds under each (producer session, seq): the payload.
type Contents = BTreeMap<(String, u64), String>;

/// A producer session as the checker names it: ids of two sessions never compare equal.
fn session(producer: &str, epoch: u64) -> String {
    format!("{producer}@{epoch:x}")
}

/// Shared between the harness and the simulated clients.
#[derive(Default)]
struct Shared {
    /// (producer session, seq) acknowledged, with the payload acknowledged under it.
    acked: Mutex<BTreeMap<(String, u64), String>>,
    failovers: Mutex<u64>,
    /// Producers and the operator that finished.
    clients_done: Mutex<usize>,
    healed: Mutex<bool>,
    /// Per node: what it holds, in log order; and its catalogue.
    holdings: Mutex<BTreeMap<String, Vec<Held>>>,
    /// Per node: the payload it holds under each (producer session, seq).
    contents: Mutex<BTreeMap<String, Contents>>,
    catalogues: Mutex<BTreeMap<String, ConfigDoc>>,
    /// When the checker finished reading the nodes.
    collected_at: Mutex<Option<Duration>>,
    /// The subscriber's first deliveries, in order.
    delivered: Mutex<(BTreeSet<Held>, Vec<Held>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("harness lock")
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> anyhow::Result<Report> {
    run_seed_with(seed, Bugs::default())
}

/// Runs one seed with injected bugs.
pub fn run_seed_with(seed: u64, bugs: Bugs) -> anyhow::Result<Report> {
    run_plan(seed, Plan::from_seed(seed), bugs)
}

/// Runs a given plan, with `seed` for everything random the plan does not fix.
pub fn run_plan(seed: u64, plan: Plan, bugs: Bugs) -> anyhow::Result<Report> {
    panics::reset();
    let dir = tempfile::tempdir()?;
    let certs = make_certs(dir.path(), &plan.nodes)?;
    let trace = Arc::new(Trace::default());
    let loss = Arc::new(Loss::new(seed ^ 0x1055));
    let mut builder = turmoil::Builder::new();
    builder.rng_seed(seed).epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S)).simulation_duration(SIMULATION_MAX);
    // A crash keeps a random prefix of each unsynced write, in 512-byte blocks.
    builder.fs().block_size(512);
    let mut sim = builder.build();
    let hosts: BTreeMap<String, Host> = plan
        .nodes
        .iter()
        .map(|n| (n.clone(), Host { skew_ms: plan.skew_ms.get(n).copied().unwrap_or(0), ..Host::default() }))
        .collect();
    let boots = Arc::new(Mutex::new(0u64));
    for name in &plan.nodes {
        let spawn = NodeSpawn {
            seed,
            host: hosts[name].clone(),
            trace: Arc::clone(&trace),
            loss: Arc::clone(&loss),
            boots: Arc::clone(&boots),
            bugs,
        };
        let (n, certs, links) = (name.clone(), certs.clone(), plan.links.clone());
        spawn.add(&mut sim, name, move || node_config(&n, &certs, &links));
    }
    let shared = Arc::new(Shared::default());
    spawn_clients(&mut sim, seed, &plan, &certs, &trace, &shared);
    drive(&mut sim, &plan, &hosts, &loss, &shared)?;
    let mut violations = check(&plan, &shared);
    violations.extend(panics::take().into_iter().map(|p| Violation { invariant: 5, detail: format!("panic: {p}") }));
    let failovers = *lock(&shared.failovers);
    Ok(Report { seed, plan, trace_hash: trace.hash(), simulated: sim.elapsed(), failovers, violations })
}

fn spawn_clients(
    sim: &mut turmoil::Sim,
    seed: u64,
    plan: &Plan,
    certs: &Path,
    trace: &Arc<Trace>,
    shared: &Arc<Shared>,
) {
    let net = |salt: u64| SimNet::new(seed ^ salt, Arc::clone(trace));
    let give_up = plan.heal_at + CONVERGE_WAIT;
    let all: BTreeSet<String> = plan.nodes.iter().cloned().collect();
    for (i, producer) in plan.producers.iter().enumerate() {
        let (producer, certs, shared, all) = (producer.clone(), certs.to_path_buf(), Arc::clone(shared), all.clone());
        let net = net(0xc11e + i as u64);
        sim.client(format!("producer-{i}"), async move {
            produce(&net, &certs, &producer, i == 0, &all, give_up, &shared).await?;
            *lock(&shared.clients_done) += 1;
            Ok(())
        });
    }
    let (edits, certs_dir, shared_op) = (plan.edits.clone(), certs.to_path_buf(), Arc::clone(shared));
    let op_net = net(0x0be7);
    sim.client("operator", async move {
        operate(&op_net, &certs_dir, &edits, give_up).await;
        *lock(&shared_op.clients_done) += 1;
        Ok(())
    });
    let (node, certs_dir, shared_c) = (plan.consumer.clone(), certs.to_path_buf(), Arc::clone(shared));
    let consumer_net = net(0xc0de);
    sim.client("consumer", async move {
        consume(&consumer_net, &certs_dir, &node, &shared_c).await;
        Ok(())
    });
    let (nodes, certs, shared, clients) =
        (plan.nodes.clone(), certs.to_path_buf(), Arc::clone(shared), plan.producers.len() + 1);
    let net = net(0xc4ec);
    sim.client("checker", async move {
        while *lock(&shared.clients_done) < clients || !*lock(&shared.healed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        collect(&net, &certs, &nodes, &shared).await
    });
}

/// A connection, if the node answers within a second.
async fn connect(net: &SimNet, certs: &Path, host: &str) -> Option<Client> {
    let options = ClientOptions::new(node_addr(host), certs);
    tokio::time::timeout(Duration::from_secs(1), Client::connect_with(net, &options)).await.ok()?.ok()
}

async fn connect_retrying(net: &SimNet, certs: &Path, host: &str) -> Client {
    loop {
        if let Some(c) = connect(net, certs, host).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Where a producer writes, and its switch to the other node after failing for a while.
struct Route<'a> {
    plan: &'a ProducerPlan,
    at: String,
    failing_since: Option<Duration>,
}

impl Route<'_> {
    fn failed(&mut self, shared: &Shared) {
        let since = *self.failing_since.get_or_insert(now());
        let Some(other) = &self.plan.failover else { return };
        if now() - since >= FAILOVER_AFTER {
            self.at = if self.at == self.plan.home { other.clone() } else { self.plan.home.clone() };
            self.failing_since = Some(now());
            *lock(&shared.failovers) += 1;
        }
    }

    async fn connect(&mut self, net: &SimNet, certs: &Path, shared: &Shared) -> Client {
        loop {
            if let Some(c) = connect(net, certs, &self.at).await {
                return c;
            }
            self.failed(shared);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One producer: (the first also creates the namespace) BATCHES batches, each retried
/// until acknowledged, failing over between its nodes if it has two.
async fn produce(
    net: &SimNet,
    certs: &Path,
    plan: &ProducerPlan,
    creates_namespace: bool,
    clusters: &BTreeSet<String>,
    give_up: Duration,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut route = Route { plan, at: plan.home.clone(), failing_since: None };
    let mut client = route.connect(net, certs, shared).await;
    if creates_namespace {
        while client.ns_edit(NAMESPACE, Edit::Create).await.is_err()
            || client.ns_edit(NAMESPACE, Edit::SetClusters(clusters.clone())).await.is_err()
        {
            client = connect_retrying(net, certs, &plan.home).await;
        }
    }
    let mut p = loop {
        match open_producer(&client, plan).await {
            Ok(p) => break p,
            Err(_) => client = route.connect(net, certs, shared).await,
        }
    };
    for batch in 0..BATCHES {
        let payloads: Vec<String> = (0..BATCH).map(|i| format!("{}-{}", plan.name, batch * BATCH + i)).collect();
        let outgoing = || {
            let seqs = batch * BATCH..;
            let chosen = plan.chosen_seqs;
            payloads.iter().zip(seqs).map(move |(pl, seq)| {
                let m = Outgoing::payload(pl.clone());
                if chosen { m.with_seq(seq) } else { m }
            })
        };
        let _ = p.send(outgoing().collect()).await;
        if plan.restarts && batch % 4 == 3 {
            // Restarted mid-batch without memory: a new session sends the batch again.
            if let Ok(restarted) = open_producer(&client, plan).await {
                p = restarted;
                let _ = p.send(outgoing().collect()).await;
            }
        }
        // Bounded: a node that never takes writes again shows up in the check.
        while now() < give_up {
            match p.flush().await {
                Ok(acks) => {
                    let mut acked = lock(&shared.acked);
                    for a in acks {
                        for (&seq, payload) in a.seqs.iter().zip(&payloads) {
                            acked.insert((session(&plan.name, p.epoch()), seq), payload.clone());
                        }
                    }
                    route.failing_since = None;
                    break;
                }
                Err(_) => {
                    route.failed(shared);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    client = route.connect(net, certs, shared).await;
                    if !plan.restarts {
                        let _ = p.resume(&client).await;
                    } else if let Ok(restarted) = open_producer(&client, plan).await {
                        p = restarted;
                        let _ = p.send(outgoing().collect()).await;
                    }
                }
            }
        }
        tokio::time::sleep(BATCH_EVERY).await;
    }
    Ok(())
}

/// A new producer session as the plan's producer opens one: a new epoch, or epoch 0 with
/// its own seqs.
async fn open_producer(client: &Client, plan: &ProducerPlan) -> Result<Producer, ClientError> {
    if plan.chosen_seqs {
        client.producer_with_seqs(TOPIC, plan.name.clone()).await
    } else {
        client.producer(TOPIC, plan.name.clone()).await
    }
}

/// The operator: each clusters change at its time through its node, retried until taken.
async fn operate(net: &SimNet, certs: &Path, edits: &[ClustersEdit], give_up: Duration) {
    for edit in edits {
        tokio::time::sleep(edit.at.saturating_sub(now())).await;
        while now() < give_up {
            if let Some(client) = connect(net, certs, &edit.via).await
                && client.ns_edit(NAMESPACE, Edit::SetClusters(edit.clusters.clone())).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A durable subscription on one node, reading and acknowledging from the start of the
/// run, through its node's crashes, until it has seen everything the checker found there
/// (or a minute after the checker finished).
async fn consume(net: &SimNet, certs: &Path, node: &str, shared: &Shared) {
    let done = || {
        let Some(collected_at) = *lock(&shared.collected_at) else { return false };
        let holdings = lock(&shared.holdings);
        let seen = &lock(&shared.delivered).0;
        holdings.get(node).is_none_or(|held| held.iter().all(|m| seen.contains(m)))
            || now() > collected_at + Duration::from_secs(60)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    while !done() {
        let subscribed = match connect(net, certs, node).await {
            Some(client) => client.subscribe(TOPIC, "feed", StartPosition::Earliest).await.ok(),
            None => None,
        };
        let Some(mut consumer) = subscribed else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        // A quiet subscription is dropped and opened again, so that `done` is checked.
        while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            let (origin, id) = (m.message.origin.to_string(), &m.message.id);
            let id = (origin, session(id.producer.as_str(), id.epoch), id.seq);
            let mut delivered = lock(&shared.delivered);
            if delivered.0.insert(id.clone()) {
                delivered.1.push(id);
            }
            consumer.ack(m.offset);
        }
    }
}

/// After the heal: waits for every node to hold the same catalogue (or CONVERGE_WAIT),
/// then for every node in the namespace's clusters to hold as many messages as were
/// acknowledged, then reads what each node holds.
async fn collect(
    net: &SimNet,
    certs: &Path,
    nodes: &[String],
    shared: &Shared,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = tokio::time::Instant::now() + CONVERGE_WAIT;
    // Invariant 4 is convergence after heal: poll every node's catalogue until all agree
    // or the deadline passes.
    let catalogues = loop {
        let mut catalogues = BTreeMap::new();
        for node in nodes {
            let client = connect_retrying(net, certs, node).await;
            catalogues.insert(node.clone(), client.ns_get().await?);
        }
        let agreed = catalogues.values().all(|c| Some(c) == catalogues.values().next());
        if agreed || tokio::time::Instant::now() >= deadline {
            break catalogues;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let clusters = final_clusters(&catalogues);
    *lock(&shared.catalogues) = catalogues;
    let acked = lock(&shared.acked).clone();
    for node in nodes {
        let client = connect_retrying(net, certs, node).await;
        // Read until the node holds every acknowledged id with its payload (a count is not
        // enough: restarting producers store messages nobody was told of). Every node is
        // read at least once, even after the deadline, so that one node that never
        // converges does not hide the others.
        for attempt in 0.. {
            let end = client
                .stats()
                .await
                .ok()
                .and_then(|s| s.topics.iter().find(|t| t.topic == TOPIC).map(|t| t.end_offset))
                .unwrap_or(0);
            // A node that cannot serve the topic holds nothing, as far as the check goes.
            let (mut held, mut contents) = (Vec::new(), BTreeMap::new());
            let reader = format!("checker-{attempt}");
            if end > 0
                && let Ok(mut consumer) = client.subscribe(TOPIC, &reader, StartPosition::Earliest).await
            {
                for _ in 0..end {
                    let Ok(Some(m)) = consumer.next().await else { break };
                    let id = &m.message.id;
                    let name = session(id.producer.as_str(), id.epoch);
                    held.push((m.message.origin.to_string(), name.clone(), id.seq));
                    contents.insert((name, id.seq), String::from_utf8_lossy(&m.message.payload).into_owned());
                    consumer.ack(m.offset);
                }
            }
            let complete = acked.iter().all(|(id, payload)| contents.get(id) == Some(payload));
            let done = complete || !clusters.contains(node) || tokio::time::Instant::now() >= deadline;
            if done {
                lock(&shared.holdings).insert(node.clone(), held);
                lock(&shared.contents).insert(node.clone(), contents);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    *lock(&shared.collected_at) = Some(now());
    Ok(())
}

/// The namespace's clusters as the (first) node's catalogue has them.
fn final_clusters(catalogues: &BTreeMap<String, ConfigDoc>) -> BTreeSet<String> {
    catalogues.values().next().and_then(|c| c.get(NAMESPACE)).map(|p| p.clusters.val.clone()).unwrap_or_default()
}

/// Applies the fault schedule, heals everything at the plan's heal time, and steps until
/// the clients are done.
fn drive(
    sim: &mut turmoil::Sim,
    plan: &Plan,
    hosts: &BTreeMap<String, Host>,
    loss: &Loss,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut next = 0;
    let mut net = NetState::default();
    let mut down = BTreeSet::new();
    let mut healed = false;
    loop {
        let now = sim.elapsed();
        while next < plan.faults.len() && plan.faults[next].0 <= now {
            match &plan.faults[next].1 {
                Fault::Partition(a, b) | Fault::Flap(a, b) => net.cut(a, b, true),
                Fault::Repair(a, b) => net.cut(a, b, false),
                Fault::Isolate(n) | Fault::Outage(n) => net.isolate(n, true),
                Fault::Rejoin(n) => net.isolate(n, false),
                Fault::Degrade { a, b, latency_ms, loss_permille } => {
                    sim.set_link_max_message_latency(a.as_str(), b.as_str(), Duration::from_millis(*latency_ms));
                    loss.set(sim.lookup(a.as_str()), sim.lookup(b.as_str()), *loss_permille);
                }
                Fault::Restore(a, b) => {
                    sim.set_link_max_message_latency(a.as_str(), b.as_str(), LATENCY_DEFAULT);
                    loss.set(sim.lookup(a.as_str()), sim.lookup(b.as_str()), 0);
                }
                Fault::Crash(n) => {
                    if down.insert(n.clone()) {
                        sim.crash(n.as_str());
                        hosts[n].meta.crash();
                    }
                }
                Fault::Restart(n) => {
                    if down.remove(n) {
                        sim.bounce(n.as_str());
                    }
                }
                Fault::DiskFails(n) => hosts[n].disk.set_failing(true),
                Fault::DiskHeals(n) => hosts[n].disk.set_failing(false),
            }
            net.apply(sim, &plan.nodes);
            next += 1;
        }
        if !healed && now >= plan.heal_at {
            net.heal();
            net.apply(sim, &plan.nodes);
            for (a, b) in &plan.links {
                sim.set_link_max_message_latency(a.as_str(), b.as_str(), LATENCY_DEFAULT);
                loss.set(sim.lookup(a.as_str()), sim.lookup(b.as_str()), 0);
            }
            for n in std::mem::take(&mut down) {
                sim.bounce(n.as_str());
            }
            for host in hosts.values() {
                host.disk.set_failing(false);
            }
            healed = true;
            *lock(&shared.healed) = true;
        }
        if sim.step().map_err(|e| anyhow::anyhow!("{e}"))? {
            return Ok(());
        }
    }
}

/// Design section 5's invariants 1-4 over what the checker and the subscriber read.
fn check(plan: &Plan, shared: &Shared) -> Vec<Violation> {
    let mut out = Vec::new();
    let acked = lock(&shared.acked);
    let holdings = lock(&shared.holdings);
    let catalogues = lock(&shared.catalogues);
    let clusters = final_clusters(&catalogues);
    let all_contents = lock(&shared.contents);
    let mut payloads: BTreeMap<&(String, u64), BTreeSet<&String>> = BTreeMap::new();
    for (id, payload) in all_contents.values().flatten() {
        payloads.entry(id).or_default().insert(payload);
    }
    let twins: Vec<String> =
        payloads.iter().filter(|(_, p)| p.len() > 1).take(5).map(|(id, p)| format!("{id:?}: {p:?}")).collect();
    if !twins.is_empty() {
        out.push(Violation { invariant: 1, detail: format!("ids with two contents on the nodes: {twins:?}") });
    }
    for node in &plan.nodes {
        let held = holdings.get(node).cloned().unwrap_or_default();
        let ids: Vec<(String, u64)> = held.iter().map(|(_, p, s)| (p.clone(), *s)).collect();
        let unique: BTreeSet<&(String, u64)> = ids.iter().collect();
        if unique.len() != ids.len() {
            out.push(Violation {
                invariant: 2,
                detail: format!("{node} holds {} duplicate message(s)", ids.len() - unique.len()),
            });
        }
        let contents = all_contents.get(node);
        let missing: Vec<&(String, u64)> = acked.keys().filter(|id| !unique.contains(id)).take(5).collect();
        if clusters.contains(node) && !missing.is_empty() {
            out.push(Violation { invariant: 1, detail: format!("{node} lacks acknowledged {missing:?}") });
        }
        let changed: Vec<String> = acked
            .iter()
            .filter_map(|(id, payload)| {
                let held = contents?.get(id).filter(|held| *held != payload)?;
                Some(format!("{id:?} holds '{held}', acknowledged '{payload}'"))
            })
            .take(5)
            .collect();
        if !changed.is_empty() {
            out.push(Violation { invariant: 1, detail: format!("{node}: {changed:?}") });
        }
        if let Some(v) = out_of_order(&held) {
            out.push(Violation { invariant: 3, detail: format!("{node}: {v}") });
        }
    }
    let node = &plan.consumer;
    let delivered = lock(&shared.delivered);
    let never: Vec<&Held> =
        holdings.get(node).into_iter().flatten().filter(|m| !delivered.0.contains(*m)).take(5).collect();
    if !never.is_empty() {
        out.push(Violation { invariant: 1, detail: format!("the subscriber on {node} never received {never:?}") });
    }
    if let Some(v) = out_of_order(&delivered.1) {
        out.push(Violation { invariant: 3, detail: format!("the subscriber on {node} first received {v}") });
    }
    if catalogues.values().any(|c| Some(c) != catalogues.values().next()) {
        let views: Vec<String> = catalogues.iter().map(|(n, c)| format!("{n}: {c:?}")).collect();
        out.push(Violation { invariant: 4, detail: format!("nodes hold different namespace catalogues: {views:?}") });
    }
    out
}

/// The first message that comes after a later one of the same producer through the same
/// node.
fn out_of_order(messages: &[Held]) -> Option<String> {
    let mut last: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (origin, producer, seq) in messages {
        if let Some(prev) = last.insert((origin, producer), *seq).filter(|&prev| prev >= *seq) {
            return Some(format!("{producer} seq {seq} (through {origin}) after seq {prev}"));
        }
    }
    None
}

/// Invariant 5: panics anywhere in a run (a node task's panic is caught by its runtime
/// and would go unseen). A run is single-threaded, so the count is per thread.
mod panics {
    use std::{cell::RefCell, sync::Once};

    thread_local! {
        static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Starts counting on this thread, from zero.
    pub(super) fn reset() {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                SEEN.with(|s| s.borrow_mut().push(info.to_string()));
                previous(info);
            }));
        });
        SEEN.with(|s| s.borrow_mut().clear());
    }

    /// The panics since [`reset`].
    pub(super) fn take() -> Vec<String> {
        SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use rill_node::env::Bugs as NodeBugs;

    use super::*;

    #[test]
    fn plans_cover_the_topologies_faults_and_workloads() {
        let plans: Vec<Plan> = (0..200).map(Plan::from_seed).collect();
        let sizes: BTreeSet<(usize, usize)> = plans
            .iter()
            .map(|p| {
                let edges = p.nodes.iter().filter(|n| n.starts_with("edge")).count();
                (edges, p.nodes.len() - edges)
            })
            .collect();
        assert_eq!(sizes, (1..=4).flat_map(|e| [(e, 2), (e, 3)]).collect());
        let kinds: BTreeSet<&str> = plans.iter().flat_map(|p| p.fault_kinds().into_keys()).collect();
        let want = [
            "clock skew",
            "clusters change",
            "crash",
            "disk errors",
            "latency+loss",
            "link flap",
            "link partition",
            "long edge outage",
            "site partition",
        ];
        assert_eq!(kinds, want.into());
        assert!(plans.iter().any(|p| p.producers.iter().filter(|q| q.failover.is_some()).count() >= 2));
        assert!(plans.iter().any(|p| p.edits.len() == 1) && plans.iter().any(|p| p.edits.len() == 2));
        for p in &plans {
            assert!(p.faults.windows(2).all(|w| w[0].0 <= w[1].0), "faults out of time order");
            assert!(p.faults.iter().all(|(t, _)| *t <= p.heal_at));
            // Every region-removing edit leaves every edge an uplink, and region-a in.
            for e in &p.edits {
                assert!(e.clusters.contains("region-a"));
                for edge in p.nodes.iter().filter(|n| n.starts_with("edge")) {
                    assert!(p.links.iter().any(|(a, b)| a == edge && e.clusters.contains(b)), "{edge} cut off: {p:?}");
                }
            }
        }
    }

    /// CI sweeps 200 seeds, in four tests so they run in parallel.
    fn sweep(seeds: std::ops::Range<u64>) {
        for seed in seeds {
            let report = run_seed(seed).unwrap();
            assert!(report.violations.is_empty(), "seed {seed}: {:?}\nplan {:?}", report.violations, report.plan);
        }
    }

    #[test]
    fn seeds_0_to_50_hold_every_invariant() {
        sweep(0..50);
    }

    #[test]
    fn seeds_50_to_100_hold_every_invariant() {
        sweep(50..100);
    }

    #[test]
    fn seeds_100_to_150_hold_every_invariant() {
        sweep(100..150);
    }

    #[test]
    fn seeds_150_to_200_hold_every_invariant() {
        sweep(150..200);
    }

    #[test]
    fn seeds_200_to_250_hold_every_invariant() {
        sweep(200..250);
    }

    /// Includes seed 252: a link replaced while its batches were in flight on a dead
    /// connection stalled a lane (invariant 1) until the core took over link identity.
    #[test]
    fn seeds_250_to_300_hold_every_invariant() {
        sweep(250..300);
    }

    /// A schedule the random plans rarely draw, a hand-made plan through `run_plan`: an
    /// edge whose disk fails for seconds at a time, again and again, while producers on
    /// it and on both regions write. (Written after soak seeds 667, 898 and 946 found
    /// replaced links' appenders storing and acknowledging out of turn; it does not
    /// reproduce that bug, whose seeds are recorded in the README.)
    #[test]
    fn a_flapping_disk_on_a_receiver_keeps_every_producer_in_order() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut faults = Vec::new();
        for i in 0..8u64 {
            let at = Duration::from_millis(1000 + i * 2300);
            faults.push((at, Fault::DiskFails("edge-1".into())));
            faults.push((at + Duration::from_millis(1500 + (i % 3) * 300), Fault::DiskHeals("edge-1".into())));
        }
        let producer = |name: &str, home: &str| ProducerPlan {
            name: name.into(),
            home: home.into(),
            failover: None,
            chosen_seqs: false,
            restarts: false,
        };
        for seed in 0..3 {
            let plan = Plan {
                nodes: names(&["edge-1", "region-a", "region-b"]),
                links: vec![("region-a".into(), "region-b".into()), ("edge-1".into(), "region-a".into())],
                skew_ms: BTreeMap::new(),
                faults: faults.clone(),
                heal_at: FAULTS_END,
                producers: vec![
                    producer("sensor-1", "edge-1"),
                    producer("model", "region-b"),
                    producer("ml", "region-a"),
                ],
                edits: Vec::new(),
                consumer: "region-b".into(),
            };
            let report = run_plan(seed, plan, Bugs::default()).unwrap();
            assert!(report.violations.is_empty(), "seed {seed}: {:?}", report.violations);
        }
    }

    /// The first seed below `limit` whose run shows a violation of `invariant`.
    fn caught(bugs: Bugs, limit: u64, invariant: u8) -> Option<u64> {
        (0..limit).find(|&seed| {
            let report = run_seed_with(seed, bugs).unwrap();
            report.violations.iter().any(|v| v.invariant == invariant)
        })
    }

    #[test]
    fn the_sweep_catches_acknowledging_before_sync() {
        let bugs = Bugs { skip_sync: true, ..Bugs::default() };
        assert!(caught(bugs, 40, 1).is_some(), "40 seeds with syncs skipped and no lost message: the checker is blind");
    }

    #[test]
    fn the_sweep_catches_disabled_dedup() {
        let bugs = Bugs { node: NodeBugs { no_dedup: true, ..NodeBugs::default() }, ..Bugs::default() };
        assert!(caught(bugs, 20, 2).is_some(), "20 seeds without dedup and no duplicate: the checker is blind");
    }

    /// A producer restarted without memory fails over from an edge that crashed after its
    /// uplink was cut to a region that lacks its latest acknowledged batches. With an epoch per session
    /// every content keeps its own id; with wave 1's one id space per producer (the
    /// `shared_epoch` bug) the region hands the producer's old seqs out again for other
    /// payloads, and the checker finds ids with two contents.
    #[test]
    fn a_producer_restarted_through_another_node_never_gives_an_id_two_contents() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (edge, region) = ("edge-1".to_string(), "region-a".to_string());
        let plan = |chosen_seqs| Plan {
            nodes: names(&["edge-1", "region-a"]),
            links: vec![(edge.clone(), region.clone())],
            skew_ms: BTreeMap::new(),
            faults: vec![
                (Duration::from_millis(500), Fault::Partition(edge.clone(), region.clone())),
                // Down until the heal, which restarts it.
                (Duration::from_secs(5), Fault::Crash(edge.clone())),
            ],
            heal_at: FAULTS_END,
            producers: vec![ProducerPlan {
                name: "gw".into(),
                home: edge.clone(),
                failover: Some(region.clone()),
                chosen_seqs,
                restarts: true,
            }],
            edits: Vec::new(),
            consumer: region.clone(),
        };
        let shared_epoch = Bugs { node: NodeBugs { shared_epoch: true, ..NodeBugs::default() }, ..Bugs::default() };
        for chosen_seqs in [false, true] {
            let report = run_plan(1, plan(chosen_seqs), Bugs::default()).unwrap();
            assert!(report.violations.is_empty(), "chosen seqs {chosen_seqs}: {:?}", report.violations);
            assert!(report.failovers > 0, "the producer never failed over: the test proves nothing: {report:?}");
        }
        let report = run_plan(1, plan(false), shared_epoch).unwrap();
        let twins = report.violations.iter().any(|v| v.detail.contains("two contents"));
        assert!(twins, "ids reused through another node and no id with two contents: {:?}", report.violations);
    }

    #[test]
    fn the_sweep_catches_a_replicator_that_skips_a_batch() {
        let bugs = Bugs { node: NodeBugs { skip_batch: true, ..NodeBugs::default() }, ..Bugs::default() };
        assert!(caught(bugs, 20, 1).is_some(), "20 seeds skipping batches and no lost message: the checker is blind");
    }

    #[test]
    fn a_seed_replays_to_the_same_trace() {
        // A seed whose faults draw on every source of randomness: loss, torn writes, skew.
        let busy = |seed: &u64| {
            let kinds = Plan::from_seed(*seed).fault_kinds();
            ["latency+loss", "crash", "disk errors", "clock skew"].iter().all(|k| kinds.contains_key(k))
        };
        let seed = (0..1000).find(busy).expect("a seed with every kind of randomness");
        let (a, b) = (run_seed(seed).unwrap(), run_seed(seed).unwrap());
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_ne!(a.trace_hash, run_seed(seed + 1).unwrap().trace_hash);
    }
}

//! Seeded runs: each seed draws a topology, a fault schedule and a workload, runs the
//! production nodes under turmoil, heals, and checks design section 5's invariants on
//! every node.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use rill_node::{
    Node,
    client::{Client, ClientOptions, Outgoing},
    config::{NodeConfig, PeerConfig, TlsConfig},
    protocol::StartPosition,
};
use rill_replication::namespace::Edit;
use rill_storage::meta::MemMeta;

use crate::{
    env::{Bugs, sim_env_with, splitmix64},
    net::SimNet,
    net::Trace,
};

const PORT: u16 = 7400;
const EPOCH_S: u64 = 1_893_456_000;
const NAMESPACE: &str = "acme/sensors";
const TOPIC: &str = "acme/sensors/temp";
/// Faults happen in the first part of a run; then everything heals.
const FAULTS_END: Duration = Duration::from_secs(20);
/// After the heal, nodes get this long (simulated) to converge before the check reads them.
const CONVERGE_WAIT: Duration = Duration::from_secs(120);
/// Batches and batch size per producer.
const BATCHES: u64 = 8;
const BATCH: u64 = 10;

/// The plan's randomness, from the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A fault on the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Cut a link.
    Partition(String, String),
    /// Restore a link.
    Repair(String, String),
    /// Crash a node (unsynced writes and unflushed metadata are lost) and restart it.
    CrashRestart(String),
}

impl Fault {
    /// The kind, for the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition(..) => "partition",
            Fault::Repair(..) => "repair",
            Fault::CrashRestart(..) => "crash+restart",
        }
    }
}

/// What a seed runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Node names, edges first.
    pub nodes: Vec<String>,
    /// Links (a, b): a dials b.
    pub links: Vec<(String, String)>,
    /// Faults at simulated times.
    pub faults: Vec<(Duration, Fault)>,
    /// (node, producer name) pairs.
    pub producers: Vec<(String, String)>,
}

impl Plan {
    /// Draws a plan: 1-2 edges and 2 regions; regions linked to each other; each edge
    /// linked to one or both regions; up to six faults in the first 20 s; a producer on
    /// every edge and one on a region.
    pub fn from_seed(seed: u64) -> Plan {
        let mut rng = Rng(seed);
        let edges = 1 + rng.below(2);
        let mut nodes: Vec<String> = (1..=edges).map(|i| format!("edge-{i}")).collect();
        nodes.extend(["region-a".to_string(), "region-b".to_string()]);
        let mut links = vec![("region-a".to_string(), "region-b".to_string())];
        for e in 1..=edges {
            let edge = format!("edge-{e}");
            match rng.below(3) {
                0 => links.push((edge, "region-a".into())),
                1 => links.push((edge, "region-b".into())),
                _ => {
                    links.push((edge.clone(), "region-a".into()));
                    links.push((edge, "region-b".into()));
                }
            }
        }
        let mut faults = Vec::new();
        for _ in 0..rng.below(7) {
            let at = Duration::from_millis(500 + rng.below(FAULTS_END.as_millis() as u64 - 1000));
            if rng.below(3) == 0 {
                let node = nodes[rng.below(nodes.len() as u64) as usize].clone();
                faults.push((at, Fault::CrashRestart(node)));
            } else {
                let (a, b) = links[rng.below(links.len() as u64) as usize].clone();
                let heal = at + Duration::from_millis(500 + rng.below(8000));
                faults.push((at, Fault::Partition(a.clone(), b.clone())));
                faults.push((heal.min(FAULTS_END), Fault::Repair(a, b)));
            }
        }
        faults.sort_by_key(|f| f.0);
        let mut producers: Vec<(String, String)> =
            (1..=edges).map(|e| (format!("edge-{e}"), format!("sensor-{e}"))).collect();
        producers.push(("region-a".into(), "model".into()));
        Plan { nodes, links, faults, producers }
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
    /// Broken invariants (empty: all held).
    pub violations: Vec<Violation>,
}

fn addr(host: &str) -> SocketAddr {
    (turmoil::lookup(host), PORT).into()
}

fn make_certs(dir: &Path, nodes: &[String]) -> anyhow::Result<PathBuf> {
    let certs = dir.join("certs");
    rill_transport::certs::create_mesh(&certs, nodes)?;
    Ok(certs)
}

fn node_config(name: &str, certs: &Path, plan: &Plan) -> NodeConfig {
    let peers = plan
        .links
        .iter()
        .filter_map(|(a, b)| match (a == name, b == name) {
            (true, _) => Some(PeerConfig { name: b.clone(), addr: Some(addr(b)) }),
            (_, true) => Some(PeerConfig { name: a.clone(), addr: None }),
            _ => None,
        })
        .collect();
    NodeConfig {
        name: Some(name.into()),
        data_dir: PathBuf::from("/data"),
        listen: (std::net::Ipv4Addr::UNSPECIFIED, PORT).into(),
        tls: TlsConfig {
            ca: Some(certs.join("ca.pem")),
            cert: Some(certs.join(format!("{name}.pem"))),
            key: Some(certs.join(format!("{name}.key"))),
        },
        peers,
        ..NodeConfig::default()
    }
}

/// What a node holds: (origin, producer, seq) in log order.
type Held = Vec<(String, String, u64)>;

/// Shared between the harness and the simulated clients.
#[derive(Default)]
struct Shared {
    /// (producer, seq) acknowledged, with the node it was produced through.
    acked: Mutex<BTreeSet<(String, u64)>>,
    producers_done: Mutex<usize>,
    healed: Mutex<bool>,
    /// Per node: the (origin, producer, seq) it holds, in log order; and its catalogue.
    holdings: Mutex<BTreeMap<String, Held>>,
    catalogues: Mutex<BTreeMap<String, String>>,
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> anyhow::Result<Report> {
    run_seed_with(seed, Bugs::default())
}

/// Runs one seed with injected bugs.
pub fn run_seed_with(seed: u64, bugs: Bugs) -> anyhow::Result<Report> {
    let plan = Plan::from_seed(seed);
    let dir = tempfile::tempdir()?;
    let certs = make_certs(dir.path(), &plan.nodes)?;
    let trace = Arc::new(Trace::default());
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .simulation_duration(Duration::from_secs(900));
    let mut sim = builder.build();
    let metas: BTreeMap<String, Arc<MemMeta>> = plan.nodes.iter().map(|n| (n.clone(), Arc::default())).collect();
    let boots = Arc::new(Mutex::new(0u64));
    for name in &plan.nodes {
        let (meta, trace, boots) = (Arc::clone(&metas[name]), Arc::clone(&trace), Arc::clone(&boots));
        let host = name.clone();
        let (name, certs, plan) = (name.clone(), certs.clone(), plan.clone());
        sim.host(host.as_str(), move || {
            let (meta, trace, boots) = (Arc::clone(&meta), Arc::clone(&trace), Arc::clone(&boots));
            let (name, certs, plan) = (name.clone(), certs.clone(), plan.clone());
            async move {
                let boot = {
                    let mut b = boots.lock().expect("boots");
                    *b += 1;
                    *b
                };
                let env = sim_env_with(seed.wrapping_mul(1_000_003).wrapping_add(boot), meta, trace, bugs);
                let _node = Node::start(node_config(&name, &certs, &plan), env).await?;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let shared = Arc::new(Shared::default());
    spawn_clients(&mut sim, seed, &plan, &certs, &trace, &shared);
    drive(&mut sim, &plan, &metas, &shared)?;
    let violations = check(&plan, &shared);
    Ok(Report { seed, plan, trace_hash: trace.hash(), simulated: sim.elapsed(), violations })
}

fn spawn_clients(
    sim: &mut turmoil::Sim,
    seed: u64,
    plan: &Plan,
    certs: &Path,
    trace: &Arc<Trace>,
    shared: &Arc<Shared>,
) {
    let all: BTreeSet<String> = plan.nodes.iter().cloned().collect();
    for (i, (node, producer)) in plan.producers.iter().enumerate() {
        let (node, producer, certs, shared, all) =
            (node.clone(), producer.clone(), certs.to_path_buf(), Arc::clone(shared), all.clone());
        let net = SimNet::new(seed ^ (0xc11e + i as u64), Arc::clone(trace));
        sim.client(format!("client-{i}"), async move {
            produce(&net, &certs, &node, &producer, i == 0, &all, &shared).await?;
            *shared.producers_done.lock().expect("done") += 1;
            Ok(())
        });
    }
    let (nodes, certs, shared, producers) =
        (plan.nodes.clone(), certs.to_path_buf(), Arc::clone(shared), plan.producers.len());
    let net = SimNet::new(seed ^ 0xc4ec, Arc::clone(trace));
    sim.client("checker", async move {
        while *shared.producers_done.lock().expect("done") < producers || !*shared.healed.lock().expect("healed") {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        collect(&net, &certs, &nodes, &shared).await
    });
}

async fn connect(net: &SimNet, certs: &Path, host: &str) -> Option<Client> {
    Client::connect_with(net, &ClientOptions::new(addr(host), certs)).await.ok()
}

async fn connect_retrying(net: &SimNet, certs: &Path, host: &str) -> Client {
    loop {
        if let Some(c) = connect(net, certs, host).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One producer: (the first also creates the namespace) BATCHES batches through its node,
/// each retried across crashes until acknowledged.
async fn produce(
    net: &SimNet,
    certs: &Path,
    node: &str,
    producer: &str,
    creates_namespace: bool,
    clusters: &BTreeSet<String>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut client = connect_retrying(net, certs, node).await;
    if creates_namespace {
        while client.ns_edit(NAMESPACE, Edit::Create).await.is_err()
            || client.ns_edit(NAMESPACE, Edit::SetClusters(clusters.clone())).await.is_err()
        {
            client = connect_retrying(net, certs, node).await;
        }
    }
    let mut p = loop {
        match client.producer(TOPIC, producer.into()).await {
            Ok(p) => break p,
            Err(_) => client = connect_retrying(net, certs, node).await,
        }
    };
    for batch in 0..BATCHES {
        let messages = (0..BATCH).map(|i| Outgoing::payload(format!("{producer}-{}", batch * BATCH + i))).collect();
        let _ = p.send(messages).await;
        loop {
            match p.flush().await {
                Ok(acks) => {
                    let mut acked = shared.acked.lock().expect("acked");
                    for a in acks {
                        acked.extend(
                            (a.first_seq..a.first_seq + a.results.len() as u64).map(|s| (producer.to_string(), s)),
                        );
                    }
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    client = connect_retrying(net, certs, node).await;
                    let _ = p.resume(&client).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    Ok(())
}

/// After the heal: waits for every node to hold everything acknowledged (or
/// CONVERGE_WAIT), then reads each node's topic and catalogue.
async fn collect(
    net: &SimNet,
    certs: &Path,
    nodes: &[String],
    shared: &Shared,
) -> Result<(), Box<dyn std::error::Error>> {
    let want = shared.acked.lock().expect("acked").len() as u64;
    let deadline = tokio::time::Instant::now() + CONVERGE_WAIT;
    for node in nodes {
        let client = connect_retrying(net, certs, node).await;
        // Every node is read at least once, even after the deadline, so that one node that
        // never converges does not hide the others.
        let end = loop {
            let end = client
                .stats()
                .await
                .ok()
                .and_then(|s| s.topics.iter().find(|t| t.topic == TOPIC).map(|t| t.end_offset))
                .unwrap_or(0);
            if end >= want || tokio::time::Instant::now() >= deadline {
                break end;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut held = Vec::new();
        if end > 0 {
            let mut consumer = client.subscribe(TOPIC, "checker", StartPosition::Earliest).await?;
            for _ in 0..end {
                let Some(m) = consumer.next().await? else { break };
                held.push((m.message.origin.to_string(), m.message.id.producer.to_string(), m.message.id.seq));
                consumer.ack(m.offset);
            }
        }
        shared.holdings.lock().expect("holdings").insert(node.clone(), held);
    }
    // Invariant 4 is convergence after heal: poll every node's catalogue until all agree
    // or the same deadline passes, then record what each holds.
    loop {
        let mut catalogues = BTreeMap::new();
        for node in nodes {
            let client = connect_retrying(net, certs, node).await;
            catalogues.insert(node.clone(), format!("{:?}", client.ns_get().await?));
        }
        let agreed = catalogues.values().collect::<BTreeSet<_>>().len() <= 1;
        if agreed || tokio::time::Instant::now() >= deadline {
            *shared.catalogues.lock().expect("catalogues") = catalogues;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies the fault schedule, heals everything at FAULTS_END, and steps until the
/// clients are done.
fn drive(
    sim: &mut turmoil::Sim,
    plan: &Plan,
    metas: &BTreeMap<String, Arc<MemMeta>>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut next = 0;
    let mut healed = false;
    loop {
        let now = sim.elapsed();
        while next < plan.faults.len() && plan.faults[next].0 <= now {
            match &plan.faults[next].1 {
                Fault::Partition(a, b) => sim.partition(a.as_str(), b.as_str()),
                Fault::Repair(a, b) => sim.repair(a.as_str(), b.as_str()),
                Fault::CrashRestart(n) => {
                    sim.crash(n.as_str());
                    metas[n].crash();
                    sim.bounce(n.as_str());
                }
            }
            next += 1;
        }
        if !healed && now >= FAULTS_END {
            for (a, b) in &plan.links {
                sim.repair(a.as_str(), b.as_str());
            }
            healed = true;
            *shared.healed.lock().expect("healed") = true;
        }
        if sim.step().map_err(|e| anyhow::anyhow!("{e}"))? {
            return Ok(());
        }
    }
}

/// Invariants 1-4 of design section 5 over what the checker read.
fn check(plan: &Plan, shared: &Shared) -> Vec<Violation> {
    let mut out = Vec::new();
    let acked = shared.acked.lock().expect("acked");
    let holdings = shared.holdings.lock().expect("holdings");
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
        let missing: Vec<&(String, u64)> = acked.iter().filter(|id| !unique.contains(id)).take(5).collect();
        if !missing.is_empty() {
            out.push(Violation { invariant: 1, detail: format!("{node} lacks acknowledged {missing:?}") });
        }
        let mut last: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (origin, producer, seq) in &held {
            if let Some(prev) = last.insert((origin, producer), *seq).filter(|&prev| prev >= *seq) {
                out.push(Violation {
                    invariant: 3,
                    detail: format!("{node}: {producer} seq {seq} (from {origin}) after seq {prev}"),
                });
                break;
            }
        }
    }
    let catalogues = shared.catalogues.lock().expect("catalogues");
    if catalogues.values().collect::<BTreeSet<_>>().len() > 1 {
        let views: Vec<String> = catalogues.iter().map(|(n, c)| format!("{n}: {}", &c[..c.len().min(160)])).collect();
        out.push(Violation { invariant: 4, detail: format!("nodes hold different namespace catalogues: {views:?}") });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_the_topologies_and_faults() {
        let plans: Vec<Plan> = (0..200).map(Plan::from_seed).collect();
        assert!(plans.iter().any(|p| p.nodes.len() == 3) && plans.iter().any(|p| p.nodes.len() == 4));
        let kinds: BTreeSet<&str> = plans.iter().flat_map(|p| p.faults.iter().map(|(_, f)| f.kind())).collect();
        assert_eq!(kinds, ["crash+restart", "partition", "repair"].into());
        assert!(plans.iter().all(|p| p.faults.iter().all(|(t, _)| *t <= FAULTS_END)));
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
    fn the_sweep_catches_acknowledging_before_sync() {
        let bugs = Bugs { skip_sync: true };
        let caught = (0..40).find(|&seed| run_seed_with(seed, bugs).map_or(true, |r| !r.violations.is_empty()));
        assert!(caught.is_some(), "40 seeds with syncs skipped and no violation: the checker is blind");
    }

    #[test]
    fn a_seed_replays_to_the_same_trace() {
        let (a, b) = (run_seed(5).unwrap(), run_seed(5).unwrap());
        assert_eq!(a.trace_hash, b.trace_hash);
    }
}

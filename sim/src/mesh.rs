//! A simulated mesh as a library: build edges, regions and links, run your own client
//! code on simulated hosts, script faults on a timeline, and assert on what the nodes hold
//! and what your clients saw. Everything runs in simulated time from one seed.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
    rc::Rc,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use rill_node::{
    Node,
    client::{Client, ClientError},
    config::{NodeConfig, PeerConfig, TlsConfig},
    protocol::{NodeStats, SeekTarget, StartPosition},
};
use rill_replication::namespace::{ConfigDoc, Edit};
use rill_storage::{NodeName, message::StoredMessage};

use crate::{
    client::{Ctx, PORT, node_addr, sim_now},
    env::{Bugs, Host, sim_env},
    history::History,
    net::{Loss, SimNet, Trace},
};

/// The simulated wall clock starts at 2030-01-01T00:00:00Z.
pub(crate) const EPOCH_S: u64 = 1_893_456_000;
/// No run is meant to pass this much simulated time.
const SIMULATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// The default simulation step.
pub const TICK_DEFAULT: Duration = Duration::from_millis(1);
/// How long [`MeshBuilder::build`] waits for the namespaces to reach every node.
const SETUP_MAX: Duration = Duration::from_secs(120);
/// How often the convergence wait polls the nodes.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// The subscription [`Mesh::holdings`] reads through.
pub const READER_SUBSCRIPTION: &str = "rill-sim-reader";

/// Whether a node is an edge gateway or a cloud region. Both run the same node; an edge
/// dials the regions it links to (as a gateway behind NAT would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Edge,
    Region,
}

/// A fault or repair on the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Cut the network between two hosts (nodes or clients), both ways.
    Partition(String, String),
    /// Restore what [`Fault::Partition`] cut.
    Repair(String, String),
    /// Cut a node off from every other node (its own clients still reach it): an edge's
    /// uplink outage.
    Isolate(String),
    /// End an isolation.
    Rejoin(String),
    /// Crash a node: unsynced writes and unflushed metadata are lost.
    Crash(String),
    /// Start a crashed node again.
    Restart(String),
    /// Fixed one-way latency between two hosts.
    SetLatency(String, String, Duration),
    /// Drop this share of datagrams, in thousandths, between two hosts (0 heals).
    SetLoss(String, String, u32),
    /// Every write and sync on the node's disk fails with EIO (a failing write is torn).
    FailDiskWrites(String),
    /// The disk works again.
    HealDisk(String),
}

/// Replication lag from one node to a peer, as the sending node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lag {
    /// True when the link is up.
    pub connected: bool,
    /// Messages not yet known to be at the peer, over all topics.
    pub messages: u64,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Age of the oldest of them, in milliseconds.
    pub oldest_ms: u64,
}

/// Builds a [`Mesh`]; see the crate documentation for an example.
#[derive(Debug)]
pub struct MeshBuilder {
    seed: u64,
    nodes: Vec<(String, Role)>,
    links: Vec<(String, String)>,
    namespaces: Vec<(String, BTreeSet<String>)>,
    skew_ms: BTreeMap<String, i64>,
    tick: Duration,
    errors: Vec<String>,
}

/// Node and client names: what a host name and a certificate can carry.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(format!("{name:?} is not a valid name: use 1-63 of a-z, 0-9 and '-'")) }
}

impl MeshBuilder {
    /// An empty mesh; everything random in the run derives from `seed`.
    pub fn new(seed: u64) -> Self {
        MeshBuilder {
            seed,
            nodes: Vec::new(),
            links: Vec::new(),
            namespaces: Vec::new(),
            skew_ms: BTreeMap::new(),
            tick: TICK_DEFAULT,
            errors: Vec::new(),
        }
    }

    fn node(mut self, name: &str, role: Role) -> Self {
        if let Err(e) = check_name(name) {
            self.errors.push(e);
        } else if self.nodes.iter().any(|(n, _)| n == name) {
            self.errors.push(format!("node {name:?} is declared twice"));
        } else {
            self.nodes.push((name.to_string(), role));
        }
        self
    }

    /// An edge gateway.
    pub fn edge(self, name: &str) -> Self {
        self.node(name, Role::Edge)
    }

    /// A cloud region.
    pub fn region(self, name: &str) -> Self {
        self.node(name, Role::Region)
    }

    /// A replication link between two nodes. An edge dials the region; between two nodes
    /// of the same kind, `a` dials `b`.
    pub fn link(mut self, a: &str, b: &str) -> Self {
        let role = |n: &str| self.nodes.iter().find(|(m, _)| m == n).map(|(_, r)| *r);
        match (role(a), role(b)) {
            (None, _) | (_, None) => {
                let missing = if role(a).is_none() { a } else { b };
                self.errors.push(format!("link {a} - {b}: no node named {missing:?} (declare nodes first)"));
            }
            _ if a == b => self.errors.push(format!("link {a} - {b}: a node cannot link to itself")),
            _ if self.links.iter().any(|(x, y)| (x == a && y == b) || (x == b && y == a)) => {
                self.errors.push(format!("link {a} - {b} is declared twice"))
            }
            (Some(Role::Region), Some(Role::Edge)) => self.links.push((b.to_string(), a.to_string())),
            _ => self.links.push((a.to_string(), b.to_string())),
        }
        self
    }

    /// A namespace (`tenant/namespace`) replicated among `clusters`, created when the mesh
    /// starts.
    pub fn namespace<S: AsRef<str>>(mut self, name: &str, clusters: impl IntoIterator<Item = S>) -> Self {
        let clusters: BTreeSet<String> = clusters.into_iter().map(|c| c.as_ref().to_string()).collect();
        if let Err(e) = rill_replication::namespace::check_namespace(name) {
            self.errors.push(format!("namespace {name:?}: {e}"));
        }
        for c in &clusters {
            if !self.nodes.iter().any(|(n, _)| n == c) {
                self.errors.push(format!("namespace {name}: no node named {c:?} (declare nodes first)"));
            }
        }
        if clusters.is_empty() {
            self.errors.push(format!("namespace {name}: clusters must name at least one node"));
        }
        self.namespaces.push((name.to_string(), clusters));
        self
    }

    /// Sets a node's clock off by `skew_ms` milliseconds (either way).
    pub fn clock_skew(mut self, node: &str, skew_ms: i64) -> Self {
        self.skew_ms.insert(node.to_string(), skew_ms);
        self
    }

    /// The simulation step (default 1 ms). A coarser step runs long simulations faster;
    /// timers and network delivery then move in steps of this size.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Starts the nodes and runs until every node knows every namespace (a few simulated
    /// seconds). Fails on a mesh that cannot be built: an unknown node in a link, a bad
    /// name, a namespace that does not reach every node within two simulated minutes.
    pub fn build(self) -> anyhow::Result<Mesh> {
        if !self.errors.is_empty() {
            bail!("invalid mesh: {}", self.errors.join("; "));
        }
        if self.nodes.is_empty() {
            bail!("invalid mesh: no nodes");
        }
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let names: Vec<String> = self.nodes.iter().map(|(n, _)| n.clone()).collect();
        rill_transport::certs::create_mesh(&certs, &names)?;
        let trace = Arc::new(Trace::default());
        let loss = Arc::new(Loss::new(self.seed ^ 0x1055));
        let mut builder = turmoil::Builder::new();
        builder
            .rng_seed(self.seed)
            .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
            .simulation_duration(SIMULATION_MAX)
            .tick_duration(self.tick);
        // A crash keeps a random prefix of each unsynced write, in 512-byte blocks.
        builder.fs().block_size(512);
        let mut sim = builder.build();
        let boots = Arc::new(Mutex::new(0u64));
        let mut hosts = BTreeMap::new();
        for name in &names {
            let host = Host { skew_ms: self.skew_ms.get(name).copied().unwrap_or(0), ..Host::default() };
            let (n, certs_dir, links) = (name.clone(), certs.clone(), self.links.clone());
            let spawn = NodeSpawn {
                seed: self.seed,
                host: host.clone(),
                trace: Arc::clone(&trace),
                loss: Arc::clone(&loss),
                boots: Arc::clone(&boots),
                bugs: Bugs::default(),
            };
            spawn.add(&mut sim, name, move || node_config(&n, &certs_dir, &links));
            hosts.insert(name.clone(), host);
        }
        let mut mesh = Mesh {
            seed: self.seed,
            sim,
            nodes: names,
            hosts,
            _dir: dir,
            certs,
            trace,
            loss,
            history: History::default(),
            timeline: BTreeMap::new(),
            scheduled: 0,
            net_state: NetState::default(),
            down: Rc::new(RefCell::new(BTreeSet::new())),
            running: Rc::new(RefCell::new(BTreeSet::new())),
            clients: BTreeSet::new(),
            hosts_added: 0,
        };
        mesh.create_namespaces(&self.namespaces)?;
        Ok(mesh)
    }
}

/// Starts one node on a simulated host: a supervisor restarts it when it fails to start
/// (a failing disk), as systemd would.
pub(crate) struct NodeSpawn {
    pub(crate) seed: u64,
    pub(crate) host: Host,
    pub(crate) trace: Arc<Trace>,
    pub(crate) loss: Arc<Loss>,
    /// Boots over the whole mesh: each boot's randomness is salted with its number.
    pub(crate) boots: Arc<Mutex<u64>>,
    pub(crate) bugs: Bugs,
}

impl NodeSpawn {
    /// Adds the host; `config` runs inside the simulation, where names resolve.
    pub(crate) fn add(self, sim: &mut turmoil::Sim<'_>, name: &str, config: impl Fn() -> NodeConfig + 'static) {
        let host_name = name.to_string();
        sim.host(name, move || {
            let (seed, host, bugs) = (self.seed, self.host.clone(), self.bugs);
            let (trace, loss) = (Arc::clone(&self.trace), Arc::clone(&self.loss));
            let boot = {
                let mut b = self.boots.lock().expect("boots lock");
                *b += 1;
                *b
            };
            let (config, host_name) = (config(), host_name.clone());
            async move {
                for attempt in 0u64.. {
                    let boot_seed = seed.wrapping_mul(1_000_003).wrapping_add(boot).wrapping_add(attempt << 32);
                    let ip = turmoil::lookup(host_name.as_str());
                    let net = SimNet::new(boot_seed, Arc::clone(&trace)).with_loss(ip, Arc::clone(&loss));
                    match Node::start(config.clone(), sim_env(boot_seed, &host, net, bugs)).await {
                        Ok(_node) => std::future::pending::<()>().await,
                        Err(e) => tracing::warn!(node = %host_name, error = %e, "node did not start; starting again"),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(())
            }
        });
    }
}

/// A node's configuration in the simulation: links as (dialer, listener).
pub(crate) fn node_config(name: &str, certs: &Path, links: &[(String, String)]) -> NodeConfig {
    let peers = links
        .iter()
        .filter_map(|(a, b)| {
            let peer = |n: &str| NodeName::parse(n).expect("node names are checked by the builder");
            match (a == name, b == name) {
                (true, _) => Some(PeerConfig { name: peer(b), addr: Some(node_addr(b)) }),
                (_, true) => Some(PeerConfig { name: peer(a), addr: None }),
                _ => None,
            }
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

/// Which pairs of hosts are cut, kept apart by cause so that one fault's repair does not
/// heal another: explicit partitions and isolated nodes.
#[derive(Debug, Default)]
pub(crate) struct NetState {
    cut: BTreeSet<(String, String)>,
    isolated: BTreeSet<String>,
    /// Pairs partitioned in turmoil now.
    partitioned: BTreeSet<(String, String)>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b { (a.to_string(), b.to_string()) } else { (b.to_string(), a.to_string()) }
}

impl NetState {
    pub(crate) fn cut(&mut self, a: &str, b: &str, cut: bool) {
        if cut {
            self.cut.insert(pair(a, b));
        } else {
            self.cut.remove(&pair(a, b));
        }
    }

    pub(crate) fn isolate(&mut self, node: &str, isolated: bool) {
        if isolated {
            self.isolated.insert(node.to_string());
        } else {
            self.isolated.remove(node);
        }
    }

    pub(crate) fn heal(&mut self) {
        self.cut.clear();
        self.isolated.clear();
    }

    /// The pairs that must be cut; `nodes` are the mesh's nodes (an isolated node stays
    /// reachable from clients).
    fn wanted(&self, nodes: &[String]) -> BTreeSet<(String, String)> {
        let mut want: BTreeSet<(String, String)> = self.cut.clone();
        for n in &self.isolated {
            want.extend(nodes.iter().filter(|m| *m != n).map(|m| pair(n, m)));
        }
        want
    }

    /// Partitions and repairs turmoil's links to match.
    pub(crate) fn apply(&mut self, sim: &turmoil::Sim<'_>, nodes: &[String]) {
        let want = self.wanted(nodes);
        for p in want.difference(&self.partitioned) {
            sim.partition(p.0.as_str(), p.1.as_str());
        }
        for p in self.partitioned.difference(&want) {
            sim.repair(p.0.as_str(), p.1.as_str());
        }
        self.partitioned = want;
    }
}

/// A running simulated mesh. See the crate documentation for an example.
pub struct Mesh {
    seed: u64,
    sim: turmoil::Sim<'static>,
    nodes: Vec<String>,
    hosts: BTreeMap<String, Host>,
    _dir: tempfile::TempDir,
    certs: PathBuf,
    trace: Arc<Trace>,
    loss: Arc<Loss>,
    history: History,
    /// Faults by (time, order scheduled).
    timeline: BTreeMap<(Duration, u64), Fault>,
    scheduled: u64,
    net_state: NetState,
    /// Nodes crashed and not restarted.
    down: Rc<RefCell<BTreeSet<String>>>,
    /// User clients still running.
    running: Rc<RefCell<BTreeSet<String>>>,
    /// Every user client added.
    clients: BTreeSet<String>,
    /// Client hosts added (names and network seeds).
    hosts_added: u64,
}

/// Schedules faults at one point of simulated time: `mesh.at(t).crash("eu").partition(..)`.
pub struct At<'a> {
    mesh: &'a mut Mesh,
    at: Duration,
}

impl At<'_> {
    /// Schedules any fault.
    ///
    /// # Panics
    /// When the fault names a host the mesh does not have: a typo in a test.
    pub fn fault(self, fault: Fault) -> Self {
        let nodes_only = |n: &String| {
            assert!(self.mesh.nodes.contains(n), "{fault:?}: no node named {n:?} in {:?}", self.mesh.nodes)
        };
        let any_host = |n: &String| {
            let known = self.mesh.nodes.contains(n) || self.mesh.clients.contains(n);
            assert!(known, "{fault:?}: no node or client named {n:?} (add clients before their faults)");
        };
        match &fault {
            Fault::Partition(a, b) | Fault::Repair(a, b) | Fault::SetLatency(a, b, _) | Fault::SetLoss(a, b, _) => {
                any_host(a);
                any_host(b);
                assert!(a != b, "{fault:?}: a host has no link to itself");
            }
            Fault::Isolate(n)
            | Fault::Rejoin(n)
            | Fault::Crash(n)
            | Fault::Restart(n)
            | Fault::FailDiskWrites(n)
            | Fault::HealDisk(n) => nodes_only(n),
        }
        self.mesh.scheduled += 1;
        self.mesh.timeline.insert((self.at, self.mesh.scheduled), fault);
        self
    }

    /// Cuts the network between two hosts, both ways.
    pub fn partition(self, a: &str, b: &str) -> Self {
        self.fault(Fault::Partition(a.into(), b.into()))
    }

    /// Restores the network between two hosts.
    pub fn repair(self, a: &str, b: &str) -> Self {
        self.fault(Fault::Repair(a.into(), b.into()))
    }

    /// Cuts a node off from every other node; its clients still reach it.
    pub fn isolate(self, node: &str) -> Self {
        self.fault(Fault::Isolate(node.into()))
    }

    /// Ends an isolation.
    pub fn rejoin(self, node: &str) -> Self {
        self.fault(Fault::Rejoin(node.into()))
    }

    /// Crashes a node (unsynced writes are lost).
    pub fn crash(self, node: &str) -> Self {
        self.fault(Fault::Crash(node.into()))
    }

    /// Starts a crashed node again.
    pub fn restart(self, node: &str) -> Self {
        self.fault(Fault::Restart(node.into()))
    }

    /// Sets a fixed one-way latency between two hosts.
    pub fn set_latency(self, a: &str, b: &str, latency: Duration) -> Self {
        self.fault(Fault::SetLatency(a.into(), b.into(), latency))
    }

    /// Drops `permille` thousandths of the datagrams between two hosts (0 heals).
    pub fn set_loss(self, a: &str, b: &str, permille: u32) -> Self {
        self.fault(Fault::SetLoss(a.into(), b.into(), permille.min(1000)))
    }

    /// Makes every write and sync on the node's disk fail, or (`false`) work again.
    pub fn fail_disk_writes(self, node: &str, failing: bool) -> Self {
        self.fault(if failing { Fault::FailDiskWrites(node.into()) } else { Fault::HealDisk(node.into()) })
    }
}

impl Mesh {
    /// Starts building a mesh.
    pub fn builder(seed: u64) -> MeshBuilder {
        MeshBuilder::new(seed)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Simulated time since the start.
    pub fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    /// The nodes, in declaration order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The recorded history of the clients.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// A hash of every datagram sent so far: the same seed and script give the same hash.
    pub fn trace_hash(&self) -> u64 {
        self.trace.hash()
    }

    /// Schedules faults at simulated time `at` (a time already past applies at the next
    /// step).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # fn main() -> anyhow::Result<()> {
    /// # let mut mesh = rill_sim::Mesh::builder(1).edge("gw").region("eu").region("us")
    /// #     .link("gw", "eu").link("eu", "us").build()?;
    /// let t = mesh.now();
    /// let minutes = |m: u64| Duration::from_secs(60 * m);
    /// mesh.at(t + minutes(1)).set_latency("gw", "eu", Duration::from_millis(300)).set_loss("gw", "eu", 50);
    /// mesh.at(t + minutes(5)).crash("eu").fail_disk_writes("us", true);
    /// mesh.at(t + minutes(6)).restart("eu").fail_disk_writes("us", false);
    /// mesh.at(t + minutes(8)).partition("gw", "eu");
    /// mesh.at(t + minutes(9)).repair("gw", "eu");
    /// mesh.run_until(t + minutes(10))?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn at(&mut self, at: Duration) -> At<'_> {
        At { mesh: self, at }
    }

    fn ctx(&mut self, name: &str) -> Ctx {
        self.hosts_added += 1;
        let salt = self.seed ^ 0xc11e_0000u64.wrapping_add(self.hosts_added);
        let net = SimNet::new(salt, Arc::clone(&self.trace)).with_loss(self.sim.lookup(name), Arc::clone(&self.loss));
        Ctx {
            name: Rc::from(name),
            net: Rc::new(net),
            certs: Rc::new(self.certs.clone()),
            history: self.history.clone(),
        }
    }

    /// Runs `f` as a client on its own simulated host named `name`, from now on. The
    /// client's error fails the run (every run method returns it).
    ///
    /// # Panics
    /// When `name` is not a valid host name or is already taken.
    pub fn client<F, Fut>(&mut self, name: &str, f: F)
    where
        F: FnOnce(Ctx) -> Fut,
        Fut: Future<Output = Result<(), Box<dyn std::error::Error>>> + 'static,
    {
        if let Err(e) = check_name(name) {
            panic!("client: {e}");
        }
        assert!(
            !self.nodes.iter().any(|n| n == name) && self.clients.insert(name.to_string()),
            "client: the name {name:?} is taken"
        );
        let ctx = self.ctx(name);
        let (running, owned) = (Rc::clone(&self.running), name.to_string());
        running.borrow_mut().insert(owned.clone());
        let future = f(ctx);
        self.sim.client(name, async move {
            let result = future.await;
            running.borrow_mut().remove(&owned);
            result.map_err(|e| format!("client {owned}: {e}").into())
        });
    }

    /// Applies the faults that are due and advances one step.
    fn step(&mut self) -> anyhow::Result<()> {
        let now = self.sim.elapsed();
        while let Some(entry) = self.timeline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let fault = entry.remove();
            tracing::info!(at = ?now, ?fault, "fault");
            self.apply(fault);
        }
        self.sim.step().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    fn apply(&mut self, fault: Fault) {
        let sim = &mut self.sim;
        match fault {
            Fault::Partition(a, b) => self.net_state.cut(&a, &b, true),
            Fault::Repair(a, b) => self.net_state.cut(&a, &b, false),
            Fault::Isolate(n) => self.net_state.isolate(&n, true),
            Fault::Rejoin(n) => self.net_state.isolate(&n, false),
            Fault::Crash(n) => {
                if self.down.borrow_mut().insert(n.clone()) {
                    sim.crash(n.as_str());
                    self.hosts[&n].meta.crash();
                }
            }
            Fault::Restart(n) => {
                if self.down.borrow_mut().remove(&n) {
                    sim.bounce(n.as_str());
                }
            }
            Fault::SetLatency(a, b, latency) => sim.set_link_latency(a.as_str(), b.as_str(), latency),
            Fault::SetLoss(a, b, permille) => self.loss.set(sim.lookup(a.as_str()), sim.lookup(b.as_str()), permille),
            Fault::FailDiskWrites(n) => self.hosts[&n].disk.set_failing(true),
            Fault::HealDisk(n) => self.hosts[&n].disk.set_failing(false),
        }
        self.net_state.apply(&self.sim, &self.nodes);
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) -> anyhow::Result<()> {
        self.run_until(self.now() + d)
    }

    /// Runs until simulated time `t`.
    pub fn run_until(&mut self, t: Duration) -> anyhow::Result<()> {
        while self.sim.elapsed() < t {
            self.step()?;
        }
        Ok(())
    }

    /// Runs until every client has finished; fails if some still run after `limit` of
    /// simulated time, naming them.
    pub fn run_clients(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = self.now() + limit;
        while !self.running.borrow().is_empty() {
            if self.now() >= deadline {
                bail!("after {limit:?} these clients still run: {:?}", self.running.borrow());
            }
            self.step()?;
        }
        Ok(())
    }

    /// Runs `f` on a hidden client until it answers, for at most `limit` of simulated
    /// time. The mesh runs on (faults included) meanwhile.
    fn query<T, F, Fut>(&mut self, what: &str, limit: Duration, f: F) -> anyhow::Result<T>
    where
        T: 'static,
        F: FnOnce(Ctx) -> Fut,
        Fut: Future<Output = anyhow::Result<T>> + 'static,
    {
        let name = format!("rill-sim-query-{}", self.hosts_added + 1);
        let ctx = self.ctx(&name);
        let slot: Rc<RefCell<Option<anyhow::Result<T>>>> = Rc::new(RefCell::new(None));
        let (answer, future) = (Rc::clone(&slot), f(ctx));
        self.sim.client(name.as_str(), async move {
            *answer.borrow_mut() = Some(future.await);
            Ok(())
        });
        let deadline = self.now() + limit;
        loop {
            if let Some(result) = slot.borrow_mut().take() {
                return result.with_context(|| what.to_string());
            }
            if self.now() >= deadline {
                bail!("{what}: no answer within {limit:?} of simulated time");
            }
            self.step()?;
        }
    }

    fn check_node(&self, node: &str) -> anyhow::Result<()> {
        if self.nodes.iter().any(|n| n == node) { Ok(()) } else { bail!("no node named {node:?} in {:?}", self.nodes) }
    }

    /// A node's statistics (topics, subscriptions, peers and their lag), now.
    pub fn stats(&mut self, node: &str) -> anyhow::Result<NodeStats> {
        self.check_node(node)?;
        let n = node.to_string();
        self.query(&format!("stats of {node}"), Duration::from_secs(30), |ctx| async move {
            Ok(retry(&ctx, &n, |c| async move { c.stats().await }).await?)
        })
    }

    /// The namespace catalogue as a node holds it, now.
    pub fn catalogue(&mut self, node: &str) -> anyhow::Result<ConfigDoc> {
        self.check_node(node)?;
        let n = node.to_string();
        self.query(&format!("catalogue of {node}"), Duration::from_secs(30), |ctx| async move {
            Ok(retry(&ctx, &n, |c| async move { c.ns_get().await }).await?)
        })
    }

    /// Replication lag from `from` to its peer `to`, now, as `from` sees it.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # fn main() -> anyhow::Result<()> {
    /// # let mut mesh = rill_sim::Mesh::builder(1).edge("gw").region("eu").link("gw", "eu").build()?;
    /// mesh.at(mesh.now()).isolate("gw");
    /// mesh.run_for(Duration::from_secs(600))?;
    /// let lag = mesh.lag("gw", "eu")?;
    /// assert!(!lag.connected);
    /// println!("{} messages, the oldest {} ms old, wait at the gateway", lag.messages, lag.oldest_ms);
    /// # Ok(())
    /// # }
    /// ```
    pub fn lag(&mut self, from: &str, to: &str) -> anyhow::Result<Lag> {
        let stats = self.stats(from)?;
        let peer =
            stats.peers.iter().find(|p| p.name == to).with_context(|| format!("{to} is not a peer of {from}"))?;
        Ok(Lag {
            connected: peer.connected,
            messages: peer.lanes.iter().map(|l| l.lag_messages).sum(),
            bytes: peer.lanes.iter().map(|l| l.lag_bytes).sum(),
            oldest_ms: peer.lanes.iter().map(|l| l.lag_ms).max().unwrap_or(0),
        })
    }

    /// Every message `node` holds for `topic`, in its log order. Reads through the
    /// subscription [`READER_SUBSCRIPTION`], moved back to the start for each read (like
    /// any subscription, it keeps what it has not acknowledged from retention).
    pub fn holdings(&mut self, node: &str, topic: &str) -> anyhow::Result<Vec<StoredMessage>> {
        self.check_node(node)?;
        let (n, t) = (node.to_string(), topic.to_string());
        self.query(&format!("what {node} holds of {topic}"), Duration::from_secs(600), |ctx| async move {
            read_topic(&ctx, &n, &t).await
        })
    }

    /// Runs until `namespace` has converged, for at most `limit` of simulated time:
    /// every reachable node holds the same catalogue, every node in the namespace's
    /// clusters is up and holds the same number of messages of each of its topics, and
    /// nothing is left to replicate between them. Answers how long it took. (With a
    /// retention policy, nodes may hold different counts: wait on [`Mesh::lag`] instead.)
    pub fn wait_converged(&mut self, namespace: &str, limit: Duration) -> anyhow::Result<Duration> {
        let started = self.now();
        let (ns, nodes, down) = (namespace.to_string(), self.nodes.clone(), Rc::clone(&self.down));
        let what = format!("convergence of {namespace}");
        self.query(&what, limit + Duration::from_secs(30), move |ctx| async move {
            let deadline = sim_now() + limit;
            loop {
                let up: Vec<String> = nodes.iter().filter(|n| !down.borrow().contains(*n)).cloned().collect();
                match converged(&ctx, &ns, &up).await {
                    Ok(()) => return Ok(sim_now() - started),
                    Err(why) if sim_now() >= deadline => bail!("not converged after {limit:?}: {why}"),
                    Err(_) => ctx.sleep(POLL_EVERY).await,
                }
            }
        })
    }

    /// Creates the namespaces through their first cluster node, then waits until every
    /// node knows them.
    fn create_namespaces(&mut self, namespaces: &[(String, BTreeSet<String>)]) -> anyhow::Result<()> {
        if namespaces.is_empty() {
            return Ok(());
        }
        let (namespaces, nodes) = (namespaces.to_vec(), self.nodes.clone());
        self.query("creating the namespaces", SETUP_MAX, |ctx| async move {
            for (ns, clusters) in &namespaces {
                let via = clusters.first().expect("checked: clusters not empty");
                let (ns, clusters) = (ns.clone(), clusters.clone());
                retry(&ctx, via, |c| {
                    let (ns, clusters) = (ns.clone(), clusters.clone());
                    async move {
                        c.ns_edit(&ns, Edit::Create).await?;
                        c.ns_edit(&ns, Edit::SetClusters(clusters)).await
                    }
                })
                .await?;
            }
            for node in &nodes {
                loop {
                    let doc = retry(&ctx, node, |c| async move { c.ns_get().await }).await?;
                    if namespaces.iter().all(|(ns, _)| doc.get(ns).is_some()) {
                        break;
                    }
                    ctx.sleep(POLL_EVERY).await;
                }
            }
            Ok(())
        })
    }
}

/// Runs `call` on a connection to `node`, reconnecting and retrying while the failure is
/// retriable (the node restarting, a partition): the harness's own reads must not fail
/// because of the faults under test. The query's time limit bounds it.
async fn retry<T, F, Fut>(ctx: &Ctx, node: &str, call: F) -> Result<T, ClientError>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    loop {
        let result = match ctx.connect(node).await {
            Ok(client) => call(client).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.is_retriable() => ctx.sleep(Duration::from_millis(300)).await,
            other => return other,
        }
    }
}

/// Reads all of `topic` on `node` (see [`Mesh::holdings`]).
async fn read_topic(ctx: &Ctx, node: &str, topic: &str) -> anyhow::Result<Vec<StoredMessage>> {
    Ok(retry(ctx, node, |client| read_from(client, topic.to_string())).await?)
}

/// One attempt at [`read_topic`] on a connection; a node that goes away mid-read is a
/// retriable error.
async fn read_from(client: Client, topic: String) -> Result<Vec<StoredMessage>, ClientError> {
    let stats = client.stats().await?;
    let Some(t) = stats.topics.iter().find(|t| t.topic == topic) else { return Ok(Vec::new()) };
    if t.end_offset == t.start_offset {
        return Ok(Vec::new());
    }
    // Back to the start (a new subscription fails with NotFound and starts there).
    let _ = client.seek(&topic, READER_SUBSCRIPTION, SeekTarget::Earliest).await;
    let mut consumer = client.subscribe(&topic, READER_SUBSCRIPTION, StartPosition::Earliest).await?;
    let mut held: Vec<StoredMessage> = Vec::new();
    while held.last().is_none_or(|m| m.offset + 1 < t.end_offset) {
        let m = consumer.next().await?.ok_or(ClientError::Closed)?;
        consumer.ack(m.offset);
        held.push(m);
    }
    let _ = consumer.close().await;
    Ok(held)
}

/// Why `namespace` has not converged among the `up` nodes, if it has not.
async fn converged(ctx: &Ctx, namespace: &str, up: &[String]) -> Result<(), String> {
    // `Ctx::connect` gives up after CONNECT_TIMEOUT.
    let connect = |node: String| async move { ctx.connect(&node).await.map_err(|_| format!("{node} does not answer")) };
    let mut docs = BTreeMap::new();
    for node in up {
        let client = connect(node.clone()).await?;
        docs.insert(node.clone(), client.ns_get().await.map_err(|e| format!("{node}: {e}"))?);
    }
    let first = docs.values().next().ok_or("no node is up")?;
    if let Some((node, _)) = docs.iter().find(|(_, d)| *d != first) {
        return Err(format!("{node} holds another catalogue than {}", docs.keys().next().expect("one")));
    }
    let policy = first.get(namespace).ok_or_else(|| format!("no node knows {namespace}"))?;
    let clusters = &policy.clusters.val;
    let prefix = format!("{namespace}/");
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for node in clusters {
        if !up.contains(node) {
            return Err(format!("{node} is down"));
        }
        let stats = connect(node.clone()).await?.stats().await.map_err(|e| format!("{node}: {e}"))?;
        for peer in stats.peers.iter().filter(|p| clusters.contains(&p.name)) {
            for lane in peer.lanes.iter().filter(|l| l.topic.starts_with(&prefix)) {
                if lane.lag_messages > 0 || lane.in_flight > 0 {
                    return Err(format!(
                        "{node} has {} messages of {} to send to {}",
                        lane.lag_messages, lane.topic, peer.name
                    ));
                }
            }
        }
        for t in stats.topics.iter().filter(|t| t.topic.starts_with(&prefix)) {
            counts.entry(t.topic.clone()).or_default().insert(node.clone(), t.end_offset - t.start_offset);
        }
    }
    for (topic, per_node) in &counts {
        let want = per_node.values().max().copied().unwrap_or(0);
        for node in clusters {
            let have = per_node.get(node).copied().unwrap_or(0);
            if have != want {
                return Err(format!("{node} holds {have} messages of {topic}, another node {want}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rill_node::{
        client::{ClientError, Outgoing},
        protocol::ErrorCode,
    };

    use super::*;

    const TOPIC: &str = "acme/sensors/temp";
    const STEP: Duration = Duration::from_millis(10);

    fn line(seed: u64) -> Mesh {
        Mesh::builder(seed)
            .edge("gw")
            .region("eu")
            .link("gw", "eu")
            .namespace("acme/sensors", ["gw", "eu"])
            .tick(STEP)
            .build()
            .unwrap()
    }

    /// A sensor writing `n` messages through `gw`, one a second, each until acknowledged.
    fn sensor(mesh: &mut Mesh, n: u64) {
        mesh.client("sensor", move |ctx| async move {
            let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
            for i in 0..n {
                p.send(vec![Outgoing::payload(format!("{i}"))]).await?;
                p.flush().await?;
                ctx.sleep(Duration::from_secs(1)).await;
            }
            Ok(())
        });
    }

    fn build_error(builder: MeshBuilder) -> String {
        builder.build().err().expect("an invalid mesh").to_string()
    }

    #[test]
    fn an_invalid_mesh_is_refused_naming_the_problem() {
        let b = || Mesh::builder(1).edge("gw").region("eu");
        assert!(build_error(b().link("gw", "us")).contains(r#"no node named "us""#));
        assert!(build_error(b().link("gw", "eu").link("eu", "gw")).contains("declared twice"));
        assert!(build_error(b().link("gw", "gw")).contains("itself"));
        assert!(build_error(b().edge("gw")).contains(r#"node "gw" is declared twice"#));
        assert!(build_error(b().region("EU_1")).contains(r#""EU_1" is not a valid name"#));
        assert!(build_error(b().namespace("acme/sensors", ["gw", "ap"])).contains(r#"no node named "ap""#));
        assert!(build_error(b().namespace("acme", ["gw"])).contains("namespace \"acme\""));
        assert!(build_error(b().namespace("acme/x", Vec::<String>::new())).contains("at least one node"));
        assert!(build_error(Mesh::builder(1)).contains("no nodes"));
    }

    #[test]
    fn isolation_and_partitions_heal_independently() {
        let nodes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut net = NetState::default();
        net.cut("b", "a", true);
        net.isolate("a", true);
        assert_eq!(net.wanted(&nodes), [pair("a", "b"), pair("a", "c")].into());
        net.isolate("a", false);
        assert_eq!(net.wanted(&nodes), [pair("a", "b")].into(), "the rejoin healed the partition");
        net.isolate("c", true);
        net.cut("a", "b", false);
        assert_eq!(net.wanted(&nodes), [pair("a", "c"), pair("b", "c")].into());
        net.cut("client", "c", true);
        assert!(net.wanted(&nodes).contains(&pair("c", "client")));
        net.heal();
        assert!(net.wanted(&nodes).is_empty());
    }

    #[test]
    fn a_partition_holds_back_replication_and_the_repair_drains_it() {
        let mut mesh = line(1);
        sensor(&mut mesh, 30);
        let t = mesh.now();
        mesh.at(t + Duration::from_secs(5)).partition("gw", "eu");
        mesh.at(t + Duration::from_secs(25)).repair("gw", "eu");
        mesh.run_until(t + Duration::from_secs(24)).unwrap();
        let lag = mesh.lag("gw", "eu").unwrap();
        assert!(!lag.connected && lag.messages >= 15, "{lag:?}");
        assert!(lag.oldest_ms >= 15_000, "{lag:?}");
        let held = mesh.holdings("eu", TOPIC).unwrap().len();
        assert!((4..=7).contains(&held), "eu holds {held} during the partition");
        mesh.run_clients(Duration::from_secs(60)).unwrap();
        mesh.wait_converged("acme/sensors", Duration::from_secs(30)).unwrap();
        assert_eq!(mesh.lag("gw", "eu").unwrap(), Lag { connected: true, ..Lag::default() });
        let acked = mesh.history().acked(TOPIC);
        let held: Vec<MessageIdOf> = mesh.holdings("eu", TOPIC).unwrap().into_iter().map(|m| m.message.id).collect();
        assert_eq!(acked.len(), 30);
        assert_eq!(held, acked.into_iter().collect::<Vec<_>>());
    }

    type MessageIdOf = rill_storage::message::MessageId;

    #[test]
    fn convergence_waits_for_the_backlog_to_drain() {
        let mut mesh = line(10);
        let t = mesh.now();
        mesh.at(t).isolate("gw").set_latency("gw", "eu", Duration::from_millis(250));
        sensor(&mut mesh, 10);
        mesh.run_clients(Duration::from_secs(60)).unwrap();
        mesh.at(mesh.now()).rejoin("gw");
        let took = mesh.wait_converged("acme/sensors", Duration::from_secs(120)).unwrap();
        // A handshake and a batch over a 500 ms round trip: the backlog cannot be across
        // sooner.
        assert!(took >= Duration::from_secs(1), "converged after {took:?}");
        let lag = mesh.lag("gw", "eu").unwrap();
        assert_eq!((lag.messages, lag.connected), (0, true));
        assert_eq!(mesh.stats("eu").unwrap().topics.iter().find(|t| t.topic == TOPIC).unwrap().end_offset, 10);
    }

    #[test]
    fn convergence_is_not_claimed_while_a_cluster_node_is_down() {
        let mut mesh = line(2);
        sensor(&mut mesh, 3);
        mesh.run_clients(Duration::from_secs(30)).unwrap();
        let t = mesh.now();
        mesh.at(t).crash("eu");
        let err = mesh.wait_converged("acme/sensors", Duration::from_secs(5)).unwrap_err();
        assert!(format!("{err:#}").contains("eu is down"), "{err:#}");
        mesh.at(mesh.now()).restart("eu");
        mesh.wait_converged("acme/sensors", Duration::from_secs(60)).unwrap();
        assert_eq!(mesh.holdings("eu", TOPIC).unwrap().len(), 3);
    }

    #[test]
    fn a_failing_disk_refuses_writes_until_it_heals() {
        let mut mesh = line(3);
        let t = mesh.now();
        mesh.client("sensor", |ctx| async move {
            let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
            ctx.sleep(Duration::from_secs(2)).await;
            p.send(vec![Outgoing::payload("while failing")]).await?;
            match p.flush().await {
                Err(ClientError::Refused { code: ErrorCode::Storage | ErrorCode::DiskFull, .. }) => {}
                other => return Err(format!("a failing disk answered {other:?}").into()),
            }
            ctx.sleep(Duration::from_secs(3)).await;
            let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
            p.send(vec![Outgoing::payload("healed")]).await?;
            p.flush().await?;
            Ok(())
        });
        mesh.at(t + Duration::from_secs(1)).fail_disk_writes("gw", true);
        mesh.at(t + Duration::from_secs(4)).fail_disk_writes("gw", false);
        mesh.run_clients(Duration::from_secs(30)).unwrap();
        let held = mesh.holdings("gw", TOPIC).unwrap();
        assert_eq!(held.iter().map(|m| m.message.payload.as_slice()).collect::<Vec<_>>(), [b"healed"]);
    }

    #[test]
    fn latency_and_loss_slow_a_link_and_heal() {
        let mut mesh = line(4);
        let t = mesh.now();
        mesh.client("sensor", |ctx| async move {
            let mut p = ctx.producer("gw", TOPIC, "sensor-1").await?;
            let mut took = Vec::new();
            for _ in 0..3 {
                let sent = ctx.now();
                p.send(vec![Outgoing::payload("x")]).await?;
                p.flush().await?;
                took.push(ctx.now() - sent);
                ctx.sleep(Duration::from_secs(5)).await;
            }
            let slow = took[1];
            if slow < Duration::from_millis(600) || took[2] >= Duration::from_millis(300) {
                return Err(format!("round trips {took:?} with 300 ms latency in the middle one").into());
            }
            Ok(())
        });
        mesh.at(t + Duration::from_secs(4)).set_latency("sensor", "gw", Duration::from_millis(300));
        mesh.at(t + Duration::from_secs(8)).set_latency("sensor", "gw", Duration::from_millis(10));
        mesh.at(t + Duration::from_secs(1)).set_loss("gw", "eu", 1000);
        mesh.run_until(t + Duration::from_secs(14)).unwrap();
        // Only the message written before the loss began reached eu.
        assert_eq!(mesh.holdings("eu", TOPIC).unwrap().len(), 1, "datagrams to eu got through a total loss");
        mesh.at(mesh.now()).set_loss("gw", "eu", 0);
        mesh.run_clients(Duration::from_secs(30)).unwrap();
        mesh.wait_converged("acme/sensors", Duration::from_secs(60)).unwrap();
        assert_eq!(mesh.holdings("eu", TOPIC).unwrap().len(), 3);
    }

    #[test]
    fn a_seed_and_script_replay_identically() {
        let run = |seed| {
            let mut mesh = line(seed);
            sensor(&mut mesh, 5);
            let t = mesh.now();
            mesh.at(t + Duration::from_secs(2)).crash("eu").set_loss("sensor", "gw", 200);
            mesh.at(t + Duration::from_secs(3)).restart("eu");
            mesh.run_clients(Duration::from_secs(120)).unwrap();
            (mesh.trace_hash(), mesh.history().events())
        };
        let (a, b) = (run(5), run(5));
        assert_eq!(a, b);
        assert_ne!(a.0, run(6).0);
    }

    #[test]
    fn a_failing_client_fails_the_run_by_name() {
        let mut mesh = line(7);
        mesh.client("broken", |ctx| async move {
            ctx.connect("gw").await?;
            Err("it gave up".into())
        });
        let err = mesh.run_clients(Duration::from_secs(30)).unwrap_err();
        assert!(err.to_string().contains("client broken: it gave up"), "{err}");
    }

    #[test]
    #[should_panic(expected = r#"no node named "ap""#)]
    fn a_fault_on_an_unknown_node_is_a_clear_panic() {
        line(8).at(Duration::ZERO).crash("ap");
    }

    #[test]
    fn queries_name_an_unknown_node() {
        let mut mesh = line(9);
        assert!(mesh.holdings("ap", TOPIC).unwrap_err().to_string().contains(r#"no node named "ap""#));
        assert!(mesh.lag("gw", "ap").unwrap_err().to_string().contains("ap is not a peer of gw"));
        assert_eq!(mesh.holdings("eu", "acme/sensors/none").unwrap(), Vec::new());
    }
}

//! Declaring a mesh and starting it.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    rc::Rc,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::bail;

use super::{Mesh, NetState, TICK_DEFAULT, spawn::NodeSpawn};
use crate::{
    clock::EPOCH_S,
    env::{Bugs, Host},
    history::History,
    net::{Loss, Trace},
};

/// No run is meant to pass this much simulated time.
const SIMULATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whether a node is an edge gateway or a cloud region. Both run the same node; an edge
/// dials the regions it links to (as a gateway behind NAT would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Edge,
    Region,
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
    bugs: Bugs,
    errors: Vec<String>,
}

/// Node and client names: what a host name and a certificate can carry.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
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
            bugs: Bugs::default(),
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

    /// Bugs to inject into every node, to show a checker catches them (never set outside
    /// such a test).
    pub fn bugs(mut self, bugs: Bugs) -> Self {
        self.bugs = bugs;
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
                bugs: self.bugs,
            };
            spawn.add(&mut sim, name, move || super::spawn::node_config(&n, &certs_dir, &links));
            hosts.insert(name.clone(), host);
        }
        let mut mesh = Mesh {
            seed: self.seed,
            sim,
            nodes: names,
            links: self.links,
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

//! A simulated mesh as a library: build edges, regions and links, run your own client
//! code on simulated hosts, script faults on a timeline, and assert on what the nodes hold
//! and what your clients saw. Everything runs in simulated time from one seed. The pieces,
//! one per file:
//! - `builder.rs`: declaring nodes, links, namespaces, skew and bugs, and starting them;
//! - `spawn.rs`: one node on a simulated host, restarted when it fails to start;
//! - `timeline.rs`: faults, scheduled at simulated times and applied between steps;
//! - `queries.rs`: what the harness asks the nodes (stats, catalogues, holdings,
//!   convergence), through hidden clients that retry over the faults.
mod builder;
mod queries;
mod spawn;
#[cfg(test)]
mod tests;
mod timeline;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::PathBuf,
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail};

pub(crate) use self::builder::check_name;
use self::timeline::NetState;
pub use self::{
    builder::MeshBuilder,
    queries::{Lag, READER_SUBSCRIPTION},
    timeline::{At, Fault, Latency},
};
use crate::{
    client::Ctx,
    env::Host,
    history::History,
    net::{Loss, SimNet, Trace},
};

/// The default simulation step.
pub const TICK_DEFAULT: Duration = Duration::from_millis(1);

/// A running simulated mesh. See the crate documentation for an example.
pub struct Mesh {
    seed: u64,
    sim: turmoil::Sim<'static>,
    nodes: Vec<String>,
    /// Replication links as (dialer, listener).
    links: Vec<(String, String)>,
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

    /// The replication links, as (dialer, listener).
    pub fn links(&self) -> &[(String, String)] {
        &self.links
    }

    /// Whether the user client `name` is still running.
    pub fn is_running(&self, name: &str) -> bool {
        self.running.borrow().contains(name)
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

    /// Runs until `done` holds; fails if it does not within `limit` of simulated time.
    pub fn run_while(&mut self, limit: Duration, mut running: impl FnMut(&Mesh) -> bool) -> anyhow::Result<()> {
        let deadline = self.now() + limit;
        while running(self) {
            if self.now() >= deadline {
                bail!("still running after {limit:?} of simulated time");
            }
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
}

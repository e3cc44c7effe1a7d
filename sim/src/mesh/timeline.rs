//! Faults on a timeline, applied between simulation steps. One fault type serves scripted
//! tests and the seeded sweep alike, and one function applies it.
use std::{collections::BTreeSet, time::Duration};

use super::Mesh;

/// A link's one-way latency: each datagram takes between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// The shortest.
    pub min: Duration,
    /// The longest.
    pub max: Duration,
}

impl Latency {
    /// turmoil's own default, which every link starts with: up to 100 ms.
    pub const DEFAULT: Latency = Latency::up_to(Duration::from_millis(100));

    /// Always `latency`.
    pub const fn fixed(latency: Duration) -> Latency {
        Latency { min: latency, max: latency }
    }

    /// Anything up to `max`.
    pub const fn up_to(max: Duration) -> Latency {
        Latency { min: Duration::ZERO, max }
    }
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
    /// One-way latency between two hosts.
    SetLatency(String, String, Latency),
    /// Drop this share of datagrams, in thousandths, between two hosts (0 heals).
    SetLoss(String, String, u32),
    /// Every write and sync on the node's disk fails with EIO (a failing write is torn).
    FailDiskWrites(String),
    /// The disk works again.
    HealDisk(String),
    /// Heal everything: repair every cut, end every isolation, restart every crashed node,
    /// give every link between nodes its default latency and no loss, heal every disk.
    HealAll,
}

/// Which pairs of hosts are cut, kept apart by cause so that one fault's repair does not
/// heal another: explicit partitions and isolated nodes.
#[derive(Debug, Default)]
pub(super) struct NetState {
    cut: BTreeSet<(String, String)>,
    isolated: BTreeSet<String>,
    /// Pairs partitioned in turmoil now.
    partitioned: BTreeSet<(String, String)>,
}

pub(super) fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b { (a.to_string(), b.to_string()) } else { (b.to_string(), a.to_string()) }
}

impl NetState {
    pub(super) fn cut(&mut self, a: &str, b: &str, cut: bool) {
        if cut {
            self.cut.insert(pair(a, b));
        } else {
            self.cut.remove(&pair(a, b));
        }
    }

    pub(super) fn isolate(&mut self, node: &str, isolated: bool) {
        if isolated {
            self.isolated.insert(node.to_string());
        } else {
            self.isolated.remove(node);
        }
    }

    pub(super) fn heal(&mut self) {
        self.cut.clear();
        self.isolated.clear();
    }

    /// The pairs that must be cut; `nodes` are the mesh's nodes (an isolated node stays
    /// reachable from clients).
    pub(super) fn wanted(&self, nodes: &[String]) -> BTreeSet<(String, String)> {
        let mut want: BTreeSet<(String, String)> = self.cut.clone();
        for n in &self.isolated {
            want.extend(nodes.iter().filter(|m| *m != n).map(|m| pair(n, m)));
        }
        want
    }

    /// Partitions and repairs turmoil's links to match.
    pub(super) fn apply(&mut self, sim: &turmoil::Sim<'_>, nodes: &[String]) {
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
            Fault::HealAll => {}
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
        self.fault(Fault::SetLatency(a.into(), b.into(), Latency::fixed(latency)))
    }

    /// Heals every fault (see [`Fault::HealAll`]).
    pub fn heal_all(self) -> Self {
        self.fault(Fault::HealAll)
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

    pub(super) fn apply(&mut self, fault: Fault) {
        let sim = &mut self.sim;
        match fault {
            Fault::HealAll => return self.heal_all(),
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
            Fault::SetLatency(a, b, latency) => {
                sim.set_link_latency(a.as_str(), b.as_str(), latency.min);
                sim.set_link_max_message_latency(a.as_str(), b.as_str(), latency.max);
            }
            Fault::SetLoss(a, b, permille) => self.loss.set(sim.lookup(a.as_str()), sim.lookup(b.as_str()), permille),
            Fault::FailDiskWrites(n) => self.hosts[&n].disk.set_failing(true),
            Fault::HealDisk(n) => self.hosts[&n].disk.set_failing(false),
        }
        self.net_state.apply(&self.sim, &self.nodes);
    }

    fn heal_all(&mut self) {
        self.net_state.heal();
        for n in std::mem::take(&mut *self.down.borrow_mut()) {
            self.sim.bounce(n.as_str());
        }
        for (a, b) in self.links.clone() {
            self.apply(Fault::SetLatency(a.clone(), b.clone(), Latency::DEFAULT));
            self.apply(Fault::SetLoss(a, b, 0));
        }
        for host in self.hosts.values() {
            host.disk.set_failing(false);
        }
        self.net_state.apply(&self.sim, &self.nodes);
    }
}

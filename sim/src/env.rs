//! A node's `Env` in simulation: simulated clock, seeded randomness, turmoil's disk, an
//! in-memory metadata store that loses unflushed writes on a crash, quinn over turmoil.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use rill_node::env::{Blocking, Bugs as NodeBugs, Clock, Env, MetaOpener, Random};
use rill_storage::{
    StorageError,
    meta::{MemMeta, MetaStore},
};

use crate::{
    fs::{DiskFaults, SimFs},
    net::SimNet,
    rng::splitmix64,
};

/// How long simulated blocking work (a write, a sync) takes: one tick, so a crash can fall
/// between a group's write and its sync.
const DISK_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// turmoil's simulated wall clock, off by the host's skew.
#[derive(Debug)]
struct SimClock {
    skew_ms: i64,
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let now = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
        now.saturating_add_signed(self.skew_ms)
    }
}

/// Randomness from a seed: deterministic per host boot.
#[derive(Debug)]
struct SeededRandom(Mutex<u64>);

impl Random for SeededRandom {
    fn next_u64(&self) -> u64 {
        splitmix64(&mut self.0.lock().expect("rng lock"))
    }
}

/// Hands out the host's metadata store, which outlives boots (the harness crashes it).
#[derive(Debug)]
struct SharedMeta(Arc<MemMeta>);

impl MetaOpener for SharedMeta {
    fn open(&self, _dir: &Path) -> Result<Arc<dyn MetaStore>, StorageError> {
        Ok(Arc::clone(&self.0) as Arc<dyn MetaStore>)
    }
}

/// Bugs a test can inject, to show the checker catches them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bugs {
    /// The disk acknowledges syncs without syncing (acknowledge before durable).
    pub skip_sync: bool,
    /// The node's own injectable bugs (no dedup, a replicator that skips a batch).
    pub node: NodeBugs,
}

/// What a simulated host keeps across its boots: its metadata store (which the harness
/// crashes), its disk's fault switch, and its clock's skew.
#[derive(Debug, Default, Clone)]
pub struct Host {
    /// The metadata store.
    pub meta: Arc<MemMeta>,
    /// The disk's fault switch.
    pub disk: Arc<DiskFaults>,
    /// How far the host's clock is off, in milliseconds.
    pub skew_ms: i64,
}

/// The environment of one boot of a simulated host, with its randomness from `seed`.
pub fn sim_env(seed: u64, host: &Host, net: SimNet, bugs: Bugs) -> Env {
    Env {
        clock: Arc::new(SimClock { skew_ms: host.skew_ms }),
        random: Arc::new(SeededRandom(Mutex::new(seed))),
        fs: Arc::new(SimFs { bug_skip_sync: bugs.skip_sync, faults: Arc::clone(&host.disk) }),
        meta: Arc::new(SharedMeta(Arc::clone(&host.meta))),
        net: Arc::new(net),
        // One tick of turmoil's clock: a crash can fall between a write and its sync.
        blocking: Blocking::Simulated(DISK_PAUSE),
        bugs: bugs.node,
    }
}

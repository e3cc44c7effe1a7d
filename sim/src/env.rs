//! A node's `Env` in simulation: simulated clock, seeded randomness, turmoil's disk, an
//! in-memory metadata store that loses unflushed writes on a crash, quinn over turmoil.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use rill_node::env::{Blocking, Clock, Env, MetaOpener, Random};
use rill_storage::{
    StorageError,
    meta::{MemMeta, MetaStore},
};

use crate::{fs::SimFs, net::SimNet, net::Trace};

/// turmoil's simulated wall clock.
#[derive(Debug)]
struct SimClock;

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
    }
}

/// One step of splitmix64: the simulation's deterministic randomness.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

/// Bugs a test can inject into the simulated edges, to show the checker catches them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bugs {
    /// The disk acknowledges syncs without syncing (acknowledge before durable).
    pub skip_sync: bool,
}

/// The environment of one boot of a simulated host.
pub fn sim_env(seed: u64, meta: Arc<MemMeta>, trace: Arc<Trace>) -> Env {
    sim_env_with(seed, meta, trace, Bugs::default())
}

/// [`sim_env`] with injected bugs.
pub fn sim_env_with(seed: u64, meta: Arc<MemMeta>, trace: Arc<Trace>, bugs: Bugs) -> Env {
    Env {
        clock: Arc::new(SimClock),
        random: Arc::new(SeededRandom(Mutex::new(seed))),
        fs: Arc::new(SimFs { bug_skip_sync: bugs.skip_sync }),
        meta: Arc::new(SharedMeta(meta)),
        net: Arc::new(SimNet::new(seed, trace)),
        blocking: Blocking::Inline,
    }
}

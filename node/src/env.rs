//! The node's environment: every I/O edge the node touches, in one value. `rill node run`
//! wires the real ones ([`Env::production`]); the simulation wires simulated ones. Node
//! code never reads the system clock or a thread RNG directly; it asks the `Env`.
use std::{fmt, path::Path, sync::Arc};

use rill_storage::{
    StorageError,
    fs::{FileSystem, StdFs},
    meta::MetaStore,
    metalog::LogMeta,
};
use rill_transport::{Net, TokioNet};

/// Wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// A source of randomness.
pub trait Random: Send + Sync + fmt::Debug {
    /// A uniformly random 64-bit value.
    fn next_u64(&self) -> u64;
}

/// Opens the metadata store of a data directory.
pub trait MetaOpener: Send + Sync + fmt::Debug {
    /// Opens (or creates) the store of the data dir `data_dir`.
    fn open(&self, data_dir: &Path) -> Result<Arc<dyn MetaStore>, StorageError>;
}

/// How blocking work (fdatasync, file reads) is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocking {
    /// On tokio's blocking thread pool (production).
    Pool,
    /// Inline on the calling task after a pause (the simulation: its disk never blocks,
    /// but takes this long, so a crash can fall between a write and its sync).
    Simulated(std::time::Duration),
}

/// Every I/O edge of a node.
#[derive(Debug, Clone)]
pub struct Env {
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Randomness (producer ids, jitter).
    pub random: Arc<dyn Random>,
    /// The file system under the segment log.
    pub fs: Arc<dyn FileSystem>,
    /// The metadata store.
    pub meta: Arc<dyn MetaOpener>,
    /// Sockets, quinn runtime, TLS clock.
    pub net: Arc<dyn Net>,
    /// Where blocking work runs.
    pub blocking: Blocking,
    /// Known bugs to inject: always off, except where the simulation proves its checker
    /// catches them.
    pub bugs: Bugs,
}

/// Bugs the simulation injects into the node to show that its checker notices them.
/// Production code never turns one on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bugs {
    /// Topics store every message, held or not (no deduplication).
    pub no_dedup: bool,
    /// The replicator skips one batch per lane: it advances past it without sending it.
    pub skip_batch: bool,
    /// Every assigned-seq session of a producer gets epoch 1 and continues after the
    /// highest seq its node holds, as wave 1's ids without epochs did: a producer that
    /// restarts through another node reuses ids for other messages.
    pub shared_epoch: bool,
    /// Stream functions leave out the first output of every batch they write.
    pub fn_drop_output: bool,
}

impl Env {
    /// Real clock, OS randomness, real files, the metadata log, real sockets.
    pub fn production() -> Self {
        Env {
            clock: Arc::new(SystemClock),
            random: Arc::new(OsRandom(ring::rand::SystemRandom::new())),
            fs: Arc::new(StdFs),
            meta: Arc::new(LogOpener),
            net: Arc::new(TokioNet),
            blocking: Blocking::Pool,
            bugs: Bugs::default(),
        }
    }

    /// Runs blocking work (disk I/O) without stalling the async runtime.
    pub async fn run_blocking<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        match self.blocking {
            Blocking::Simulated(pause) => {
                tokio::time::sleep(pause).await;
                f()
            }
            Blocking::Pool => match tokio::task::spawn_blocking(f).await {
                Ok(r) => r,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
        }
    }

    /// A random 128-bit id as 32 hex digits.
    pub fn random_id(&self) -> String {
        format!("{:016x}{:016x}", self.random.next_u64(), self.random.next_u64())
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // The one place the node reads the system clock.
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// The operating system's random source.
#[derive(Debug)]
pub struct OsRandom(ring::rand::SystemRandom);

impl Random for OsRandom {
    fn next_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        ring::rand::SecureRandom::fill(&self.0, &mut b).expect("the OS random source does not fail");
        u64::from_le_bytes(b)
    }
}

/// Opens the metadata log `meta.log` in the data dir, importing the sled store `meta` of
/// an older data dir once (see `rill_storage::metalog`).
#[derive(Debug, Clone, Copy)]
pub struct LogOpener;

impl MetaOpener for LogOpener {
    fn open(&self, data_dir: &Path) -> Result<Arc<dyn MetaStore>, StorageError> {
        Ok(Arc::new(LogMeta::open_importing(&data_dir.join("meta.log"), &data_dir.join("meta"))?))
    }
}

//! The topic registry: the node's open topics, the ones that failed to open, creation on
//! first use, and the checkpoints of their dedup snapshots. Every subsystem (the client
//! server, dispatchers, replication, retention) reaches topics through it; it depends on
//! none of them.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rill_storage::{
    StorageError, TopicName,
    blobs::Blobs,
    log::LogConfig,
    meta::MetaStore,
    store::{self, TOPICS_DIR},
    topic::TopicStore,
};

use crate::{
    config::StorageConfig,
    env::Env,
    topic::{Growth, Topic},
};

/// How a topic is opened and served.
#[derive(Debug, Clone, Copy)]
struct TopicSettings {
    log: LogConfig,
    queue_max: usize,
    group_max: usize,
}

/// The node's topics and the metadata store beside them.
pub(crate) struct Registry {
    pub(crate) env: Env,
    pub(crate) meta: Arc<dyn MetaStore>,
    root: PathBuf,
    settings: TopicSettings,
    topics: RwLock<BTreeMap<TopicName, Arc<Topic>>>,
    /// Topics that failed to open at start-up, with the reason; they stay unavailable
    /// until an operator repairs them and restarts the node.
    unavailable: BTreeMap<TopicName, String>,
    create_lock: tokio::sync::Mutex<()>,
    /// Topics whose durable end moved, for the replication driver.
    pub(crate) growth: Arc<Growth>,
    closing: AtomicBool,
    /// Function modules (and later models), by SHA-256.
    pub(crate) blobs: Blobs,
}

impl Registry {
    /// Opens every topic under `data_dir` (recovering its log); a topic that fails to open
    /// is logged and kept unavailable, and the others are served.
    pub(crate) fn open(
        env: Env,
        meta: Arc<dyn MetaStore>,
        data_dir: &Path,
        config: &StorageConfig,
    ) -> Result<Registry, StorageError> {
        let root = data_dir.join(TOPICS_DIR);
        let settings = TopicSettings {
            log: LogConfig {
                segment_bytes_max: config.segment_bytes_max,
                index_interval_bytes: config.index_interval_bytes,
            },
            queue_max: config.produce_queue_requests_max,
            group_max: config.group_commit_requests_max,
        };
        let growth = Arc::new(Growth::default());
        let blobs = Blobs::open(Arc::clone(&env.fs), data_dir)?;
        let (mut topics, mut unavailable) = (BTreeMap::new(), BTreeMap::new());
        for (name, opened) in store::open_all(&env.fs, meta.as_ref(), &root, settings.log)? {
            match opened {
                Ok(store) => {
                    topics.insert(name, serve(store, &env, &growth, settings));
                }
                Err(e) => {
                    tracing::error!(topic = %name, error = %e, "topic unavailable; serving the others");
                    unavailable.insert(name, e.to_string());
                }
            }
        }
        Ok(Registry {
            env,
            meta,
            root,
            settings,
            topics: RwLock::new(topics),
            unavailable,
            create_lock: tokio::sync::Mutex::new(()),
            growth,
            closing: AtomicBool::new(false),
            blobs,
        })
    }

    /// The topic, opened or created on first use.
    pub(crate) async fn topic(&self, name: &TopicName) -> Result<Arc<Topic>, StorageError> {
        if let Some(t) = self.topic_if_open(name) {
            return Ok(t);
        }
        if let Some(reason) = self.unavailable.get(name) {
            return Err(StorageError::Unavailable { topic: name.to_string(), reason: reason.clone() });
        }
        let _creating = self.create_lock.lock().await;
        if let Some(t) = self.topic_if_open(name) {
            return Ok(t);
        }
        let (fs, meta, root, name2, log) =
            (Arc::clone(&self.env.fs), Arc::clone(&self.meta), self.root.clone(), name.clone(), self.settings.log);
        let store = self.env.run_blocking(move || TopicStore::open(fs, meta.as_ref(), &root, name2, log)).await?;
        tracing::info!(topic = %name, "created topic");
        let topic = serve(store, &self.env, &self.growth, self.settings);
        self.topics.write().expect("topics lock poisoned").insert(name.clone(), Arc::clone(&topic));
        Ok(topic)
    }

    /// The topic if it is open (never creates one).
    pub(crate) fn topic_if_open(&self, name: &TopicName) -> Option<Arc<Topic>> {
        self.topics.read().expect("topics lock poisoned").get(name).cloned()
    }

    /// Every open topic.
    pub(crate) fn list(&self) -> Vec<Arc<Topic>> {
        self.topics.read().expect("topics lock poisoned").values().cloned().collect()
    }

    /// The topics that failed to open, with why.
    pub(crate) fn unavailable(&self) -> &BTreeMap<TopicName, String> {
        &self.unavailable
    }

    /// Marks the node as closing: loops stop and produces are refused.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Saves every topic's dedup snapshot and flushes the metadata store.
    pub(crate) async fn checkpoint(&self) {
        let topics = self.list();
        let meta = Arc::clone(&self.meta);
        let result = self
            .env
            .run_blocking(move || -> Result<(), StorageError> {
                for t in &topics {
                    t.checkpoint(meta.as_ref())?;
                }
                meta.flush()
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "checkpoint failed; metadata will be rebuilt from the log on restart");
        }
    }

    /// Checkpoints every `every` until the node closes.
    pub(crate) async fn checkpoint_loop(self: Arc<Self>, every: Duration) {
        while !self.is_closing() {
            tokio::time::sleep(every).await;
            self.checkpoint().await;
        }
    }
}

fn serve(store: TopicStore, env: &Env, growth: &Arc<Growth>, settings: TopicSettings) -> Arc<Topic> {
    Topic::start(store, env.clone(), Arc::clone(growth), settings.queue_max, settings.group_max)
}

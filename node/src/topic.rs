//! A served topic: its store, the queue in front of its group commit, and the watch that
//! wakes consumers when new messages become durable.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use rill_replication::wire::Summary;
use rill_storage::{
    Message, ProducerId, StorageError, StoredMessage, TopicName,
    log::SegmentInfo,
    meta::MetaStore,
    topic::{AppendOutcome, GroupResult, OnConflict, TopicStore, publish_group, sync_group, write_group},
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::env::Env;

/// One produce request waiting for its group commit.
struct AppendJob {
    messages: Vec<Message>,
    on_conflict: OnConflict,
    reply: oneshot::Sender<Appended>,
}

/// What an append did, once its group is synced.
pub(crate) struct Appended {
    /// What happened to each message, in order.
    pub(crate) result: GroupResult,
    /// The messages not stored because their ids are held with another content (only
    /// with [`OnConflict::SetAside`]), with the offset of the content stored first.
    pub(crate) set_aside: Vec<(Message, u64)>,
}

/// The answer to an append, once its group is synced.
pub(crate) type AppendReply = oneshot::Receiver<Appended>;

/// Counters of a topic since the node started.
#[derive(Debug, Default)]
pub(crate) struct TopicCounters {
    pub(crate) messages_in: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    /// Produce requests refused because an id was held with another content.
    pub(crate) conflicts_refused: AtomicU64,
    /// Replicated messages kept aside because their id was held with another content.
    pub(crate) conflicts_kept: AtomicU64,
    /// Messages refused (produce) or not stored (replication) because their producer
    /// session was dropped after the dedup horizon.
    pub(crate) expired: AtomicU64,
    /// Producer sessions whose dedup state was dropped after the dedup horizon.
    pub(crate) dedup_sessions_dropped: AtomicU64,
    /// Messages deleted by retention (every subscription and peer had them).
    pub(crate) retention_deleted: AtomicU64,
    /// Messages dropped by a full backlog quota (`drop_oldest`) before every subscription
    /// or peer had them.
    pub(crate) quota_dropped: AtomicU64,
}

/// Topics whose durable end moved, for the replication driver: one entry per topic
/// however often it grows, so it is bounded by the number of topics.
#[derive(Debug, Default)]
pub(crate) struct Growth {
    ends: Mutex<BTreeMap<TopicName, u64>>,
    pub(crate) notify: Notify,
}

impl Growth {
    fn note(&self, topic: &TopicName, end: u64) {
        let mut ends = self.ends.lock().expect("growth lock poisoned");
        let e = ends.entry(topic.clone()).or_insert(end);
        *e = (*e).max(end);
        drop(ends);
        self.notify.notify_one();
    }

    /// Takes the topics that grew since the last call.
    pub(crate) fn take(&self) -> BTreeMap<TopicName, u64> {
        std::mem::take(&mut *self.ends.lock().expect("growth lock poisoned"))
    }
}

/// The shape of a topic's log, for statistics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogShape {
    /// The first offset held.
    pub(crate) start: u64,
    /// One past the last durable offset.
    pub(crate) end: u64,
    pub(crate) bytes: u64,
    pub(crate) segments: usize,
    /// Producer sessions in the dedup index.
    pub(crate) producers: usize,
}

/// A topic being served.
pub(crate) struct Topic {
    pub(crate) name: TopicName,
    store: Arc<Mutex<TopicStore>>,
    queue: mpsc::Sender<AppendJob>,
    committed: watch::Receiver<u64>,
    pub(crate) counters: Arc<TopicCounters>,
    env: Env,
}

impl Topic {
    /// Starts serving `store`: spawns its group-commit writer.
    pub(crate) fn start(
        store: TopicStore,
        env: Env,
        growth: Arc<Growth>,
        queue_max: usize,
        group_max: usize,
    ) -> Arc<Topic> {
        let mut store = store;
        if env.bugs.no_dedup {
            store.inject_bug_no_dedup();
        }
        let name = store.name().clone();
        let (committed_tx, committed) = watch::channel(store.log().committed_offset());
        let store = Arc::new(Mutex::new(store));
        let (queue, rx) = mpsc::channel(queue_max);
        let counters = Arc::new(TopicCounters::default());
        growth.note(&name, *committed.borrow());
        let writer = Writer {
            store: Arc::clone(&store),
            env: env.clone(),
            committed_tx,
            counters: Arc::clone(&counters),
            group_max,
            growth,
            name: name.clone(),
        };
        tokio::spawn(writer.run(rx));
        Arc::new(Topic { name, store, queue, committed, counters, env })
    }

    /// Queues messages for the next group commit, waiting while the queue is full.
    pub(crate) async fn append(&self, messages: Vec<Message>, on_conflict: OnConflict) -> Option<AppendReply> {
        let (reply, rx) = oneshot::channel();
        self.queue.send(AppendJob { messages, on_conflict, reply }).await.ok()?;
        Some(rx)
    }

    /// Reads durable messages without blocking the runtime.
    pub(crate) async fn read(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let store = Arc::clone(&self.store);
        self.env
            .run_blocking(move || store.lock().expect("topic lock poisoned").read(from, max_messages, max_bytes))
            .await
    }

    /// The first offset held and one past the last durable one.
    pub(crate) fn bounds(&self) -> (u64, u64) {
        let store = self.store();
        (store.log().start_offset(), store.log().committed_offset())
    }

    fn store(&self) -> MutexGuard<'_, TopicStore> {
        self.store.lock().expect("topic lock poisoned")
    }

    /// The log's bounds and size, and how many producer sessions it remembers.
    pub(crate) fn shape(&self) -> LogShape {
        let store = self.store();
        let log = store.log();
        LogShape {
            start: log.start_offset(),
            end: log.committed_offset(),
            bytes: log.size_bytes(),
            segments: log.segment_count(),
            producers: store.dedup().producer_count(),
        }
    }

    /// The seq after the highest one held of a producer session.
    pub(crate) fn next_seq(&self, producer: &ProducerId, epoch: u64) -> u64 {
        self.store().dedup().next_seq(producer, epoch)
    }

    /// What this topic holds, as a Hello announces it to peers.
    pub(crate) fn summary(&self) -> Summary {
        Summary::of(self.store().dedup())
    }

    /// Bytes of the durable log from `offset` (or its start, if later) to the end.
    pub(crate) fn bytes_from(&self, offset: u64) -> u64 {
        let store = self.store();
        let log = store.log();
        if offset >= log.committed_offset() { 0 } else { log.bytes_from(offset.max(log.start_offset())) }
    }

    /// The publish time of the first durable message at or after `offset`, if there is
    /// one: how old what is left to consume (or replicate) from there is. Reads the log, so
    /// call it from blocking work.
    pub(crate) fn publish_time_from(&self, offset: u64) -> Option<u64> {
        let store = self.store();
        if offset >= store.log().committed_offset() {
            return None;
        }
        store.read(offset, 1, 1).ok()?.first().map(|m| m.message.publish_time_ms)
    }

    /// The oldest sealed segment (the active one is never deleted) and the publish time
    /// of its newest message. Reads the log, so call it from blocking work.
    pub(crate) fn oldest_sealed(&self) -> Result<Option<(SegmentInfo, u64)>, StorageError> {
        let store = self.store();
        let Some(oldest) = store.log().sealed_segments().into_iter().next() else { return Ok(None) };
        let newest_ms = store.read(oldest.end_offset - 1, 1, 1)?.first().map_or(0, |m| m.message.publish_time_ms);
        Ok(Some((oldest, newest_ms)))
    }

    /// Whether the log has a sealed segment retention or a quota could delete.
    pub(crate) fn has_sealed_segment(&self) -> bool {
        !self.store().log().sealed_segments().is_empty()
    }

    /// Deletes the oldest sealed segment. Blocking work.
    pub(crate) fn delete_oldest_segment(&self) -> Result<Option<SegmentInfo>, StorageError> {
        self.store().delete_oldest_segment()
    }

    /// Drops producer sessions idle for longer than `horizon_ms` (their highest seqs are
    /// kept), counting them.
    pub(crate) fn drop_idle_sessions(&self, now_ms: u64, horizon_ms: u64) -> usize {
        let dropped = self.store().drop_idle_sessions(now_ms, horizon_ms);
        self.counters.dedup_sessions_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Saves the dedup snapshot (blocking work).
    pub(crate) fn checkpoint(&self, meta: &dyn MetaStore) -> Result<bool, StorageError> {
        self.store().checkpoint(meta)
    }

    /// A receiver of the durable end offset, which changes after every group commit.
    pub(crate) fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// The group-commit loop of one topic.
struct Writer {
    store: Arc<Mutex<TopicStore>>,
    env: Env,
    committed_tx: watch::Sender<u64>,
    counters: Arc<TopicCounters>,
    group_max: usize,
    growth: Arc<Growth>,
    name: TopicName,
}

impl Writer {
    /// Takes whatever is queued (up to `group_max` requests), commits it with one sync,
    /// answers every request, and repeats. Requests that arrive during a sync form the
    /// next group, so the group size follows the load.
    async fn run(self, mut rx: mpsc::Receiver<AppendJob>) {
        let mut jobs = Vec::with_capacity(self.group_max);
        while rx.recv_many(&mut jobs, self.group_max).await > 0 {
            let (batches, replies): (Vec<(Vec<Message>, OnConflict)>, Vec<_>) =
                jobs.drain(..).map(|j| ((j.messages, j.on_conflict), j.reply)).unzip();
            let store = Arc::clone(&self.store);
            let (results, group, batches) = self
                .env
                .run_blocking(move || {
                    let refs: Vec<(&[Message], OnConflict)> = batches.iter().map(|(m, c)| (m.as_slice(), *c)).collect();
                    let (results, group) = write_group(&store, &refs);
                    (results, group, batches)
                })
                .await;
            // Written, not yet synced: a crash here loses the group, which nobody was told of.
            let store = Arc::clone(&self.store);
            let results = self
                .env
                .run_blocking(move || {
                    let synced = sync_group(&store, &group);
                    publish_group(&store, results, group, synced)
                })
                .await;
            let committed = self.store.lock().expect("topic lock poisoned").log().committed_offset();
            self.committed_tx.send_replace(committed);
            self.growth.note(&self.name, committed);
            for ((result, reply), (messages, _)) in results.into_iter().zip(replies).zip(batches) {
                let mut set_aside = Vec::new();
                match &result {
                    Ok(outcomes) => {
                        let (mut stored, mut duplicates, mut expired) = (0, 0, 0);
                        for (m, o) in messages.into_iter().zip(outcomes) {
                            match *o {
                                AppendOutcome::Appended { .. } => stored += 1,
                                AppendOutcome::Duplicate { .. } => duplicates += 1,
                                AppendOutcome::Expired => expired += 1,
                                AppendOutcome::Conflict { offset } => set_aside.push((m, offset)),
                            }
                        }
                        let c = &self.counters;
                        c.messages_in.fetch_add(stored, Ordering::Relaxed);
                        c.duplicates.fetch_add(duplicates, Ordering::Relaxed);
                        c.expired.fetch_add(expired, Ordering::Relaxed);
                        c.conflicts_kept.fetch_add(set_aside.len() as u64, Ordering::Relaxed);
                    }
                    Err(StorageError::Conflict { .. }) => {
                        self.counters.conflicts_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(StorageError::Expired { .. }) => {
                        self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
                // The producer may have gone; the data is stored anyway.
                let _ = reply.send(Appended { result, set_aside });
            }
        }
    }
}

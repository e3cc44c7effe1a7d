//! A topic's store: its log plus its dedup index, written under group commit.
//!
//! Group commit ([`commit_group`]): the batches of many producers are written to the page
//! cache under the topic's lock, then one fdatasync runs *without* the lock (so readers
//! are not stalled), then the lock is taken again to publish the new offsets and record
//! the dedup entries. Only then are the producers acknowledged. Dedup entries are recorded
//! after the sync, so a failed sync can never leave a message "held" that is not on disk.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use crate::{
    dedup::{DedupIndex, DedupSnapshot},
    error::{Result, StorageError},
    fs::FileSystem,
    log::{LogConfig, PendingSync, TopicLog},
    message::{Message, MessageId, StoredMessage},
    meta::{self, MetaStore},
    name::TopicName,
};

/// Messages read per step while rebuilding dedup state from the log tail.
const REBUILD_CHUNK_MESSAGES: usize = 10_000;

/// What happened to one produced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored at this offset.
    Appended {
        /// The offset.
        offset: u64,
    },
    /// Already held; stored earlier at this offset, when the node still remembers it.
    Duplicate {
        /// The original offset, if remembered.
        offset: Option<u64>,
    },
}

/// The metadata key of a topic's dedup snapshot.
fn dedup_key(topic: &TopicName) -> String {
    format!("dedup/{topic}")
}

/// One topic: log and dedup index.
#[derive(Debug)]
pub struct TopicStore {
    name: TopicName,
    log: TopicLog,
    dedup: DedupIndex,
    /// Written but not yet synced: merged into `dedup` when the sync succeeds.
    unsynced: DedupIndex,
    checkpointed_offset: u64,
    /// Why the last write or sync failed (and whether the disk was full); until
    /// [`TopicStore::recover`] cuts the log back to its last sync, nothing is written.
    poisoned: Option<(String, bool)>,
    /// Injected bug (see `rill_node::env::Bugs`): store every message, held or not.
    bug_no_dedup: bool,
}

/// A group's sync, taken out of the lock.
#[derive(Debug)]
pub struct GroupSync {
    log: PendingSync,
    ids: DedupIndex,
}

impl GroupSync {
    /// Runs the fdatasync for the group.
    pub fn run(&self) -> std::io::Result<()> {
        self.log.run()
    }
}

impl TopicStore {
    /// Opens the topic under `root`, rebuilding dedup state from the snapshot in `meta`
    /// and the log tail after it.
    pub fn open(
        fs: Arc<dyn FileSystem>,
        meta: &dyn MetaStore,
        root: &Path,
        name: TopicName,
        config: LogConfig,
    ) -> Result<Self> {
        let snapshot = match meta.get(&dedup_key(&name))? {
            Some(bytes) => match DedupSnapshot::decode(&bytes) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(topic = %name, error = %e, "dedup snapshot unreadable; rebuilding from the whole log");
                    None
                }
            },
            None => None,
        };
        // A snapshot is taken of synced data only, so its offset is a durable point.
        let durable_through = snapshot.as_ref().map(|s| s.through_offset);
        let log = TopicLog::open(fs, &root.join(name.dir()), config, durable_through)?;
        let (mut dedup, from) = match snapshot {
            Some(s) if s.through_offset <= log.next_offset() => {
                let from = s.through_offset;
                (DedupIndex::from_snapshot(s), from)
            }
            Some(s) => {
                tracing::warn!(topic = %name, snapshot_offset = s.through_offset, log_end = log.next_offset(),
                    "dedup snapshot does not match the log; rebuilding from the whole log");
                (DedupIndex::default(), log.start_offset())
            }
            None => (DedupIndex::default(), log.start_offset()),
        };
        index_log(&log, &mut dedup, from)?;
        let checkpointed_offset = from;
        Ok(TopicStore {
            name,
            log,
            dedup,
            unsynced: DedupIndex::default(),
            checkpointed_offset,
            poisoned: None,
            bug_no_dedup: false,
        })
    }

    /// Writes the messages not already held as one frame (page cache only) and says what
    /// happened to each. Nothing is acknowledged until the group's sync completes.
    ///
    /// Dedup works on runs (consecutive seqs of one producer, usually a whole client
    /// batch): a run that touches nothing held is checked and recorded with one lookup;
    /// only a run that overlaps held seqs is checked message by message.
    ///
    /// A failed write poisons the topic: this and every later write of the group fail, the
    /// group is not published, and the next group starts with [`TopicStore::recover`].
    pub fn write(&mut self, messages: &[Message]) -> Result<Vec<AppendOutcome>> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        if let Some(m) = messages.iter().find(|m| m.id.seq == u64::MAX) {
            return Err(StorageError::InvalidMessage(format!("{}: seq {} is reserved", m.id.producer, u64::MAX)));
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut fresh: Vec<&Message> = Vec::with_capacity(messages.len());
        let mut batch = DedupIndex::default();
        let base = self.log.next_offset();
        for run in runs(messages) {
            let (producer, epoch, first) = (&run[0].id.producer, run[0].id.epoch, run[0].id.seq);
            let seqs = first..first + run.len() as u64;
            let held = |d: &DedupIndex| d.intersects(producer, epoch, &seqs);
            if self.bug_no_dedup || !held(&self.dedup) && !held(&self.unsynced) && !held(&batch) {
                let offset = base + fresh.len() as u64;
                batch.record_run(producer, epoch, first, offset, run.len() as u64);
                outcomes.extend((0..run.len() as u64).map(|i| AppendOutcome::Appended { offset: offset + i }));
                fresh.extend(run);
                continue;
            }
            for m in run {
                match self.earlier_offset(&batch, &m.id) {
                    Some(offset) => outcomes.push(AppendOutcome::Duplicate { offset }),
                    None => {
                        let offset = base + fresh.len() as u64;
                        batch.record(&m.id, offset);
                        fresh.push(m);
                        outcomes.push(AppendOutcome::Appended { offset });
                    }
                }
            }
        }
        if !fresh.is_empty() {
            if let Err(e) = self.log.append(&fresh) {
                if matches!(e, StorageError::Io { .. }) {
                    self.poison(e.to_string(), e.is_disk_full());
                }
                return Err(e);
            }
            self.unsynced.merge(batch);
        }
        Ok(outcomes)
    }

    fn poison(&mut self, reason: String, disk_full: bool) {
        tracing::error!(topic = %self.name, %reason, "disk write failed; the next write cuts the log back to its last sync");
        self.poisoned = Some((reason, disk_full));
    }

    fn poisoned_error(&self) -> Option<StorageError> {
        let (reason, disk_full) = self.poisoned.clone()?;
        Some(StorageError::Poisoned { topic: self.name.to_string(), reason, disk_full })
    }

    /// After a failed write or sync: cuts the log back to what its last good sync made
    /// durable, reopens it from disk, and clears the poison. Nothing is lost that was
    /// acknowledged: only synced data was ever published. Fails (and stays poisoned) while
    /// the disk still fails.
    ///
    /// Why cut back rather than sync again: after a failed fdatasync the kernel may have
    /// dropped the dirty pages and marked them clean, so a later sync that succeeds proves
    /// nothing about them.
    pub fn recover(&mut self) -> Result<()> {
        let Some((reason, disk_full)) = self.poisoned.clone() else { return Ok(()) };
        let published = self.log.committed_offset();
        match self.log.cut_to_synced_and_reopen().and_then(|()| index_log(&self.log, &mut self.dedup, published)) {
            Ok(()) => {
                self.unsynced = DedupIndex::default();
                self.poisoned = None;
                tracing::info!(topic = %self.name, through_offset = self.log.committed_offset(),
                    "topic recovered after a failed disk write");
                Ok(())
            }
            Err(e) => Err(StorageError::Poisoned {
                topic: self.name.to_string(),
                reason: format!("{reason}; cutting back to the last sync failed too: {e}"),
                disk_full: disk_full || e.is_disk_full(),
            }),
        }
    }

    /// True while a failed write awaits [`TopicStore::recover`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Injects a bug for the simulation's checker to find: no deduplication.
    pub fn inject_bug_no_dedup(&mut self) {
        self.bug_no_dedup = true;
    }

    /// `Some` when `id` is held, synced or not: with its offset if remembered.
    fn earlier_offset(&self, batch: &DedupIndex, id: &MessageId) -> Option<Option<u64>> {
        [&self.dedup, &self.unsynced, batch].into_iter().find(|d| d.contains(id)).map(|d| d.offset_of(id))
    }

    /// Takes what was written since the last sync, to be synced outside the lock.
    pub fn prepare_sync(&mut self) -> GroupSync {
        GroupSync { log: self.log.prepare_sync(), ids: std::mem::take(&mut self.unsynced) }
    }

    /// Publishes a group after its sync. A failed fdatasync poisons the topic: the kernel
    /// may have dropped the dirty pages, so nothing written since the last good sync can be
    /// trusted until recovery re-reads the file.
    pub fn complete_sync(&mut self, group: GroupSync, synced: std::io::Result<()>) -> Result<()> {
        if let Err(e) = synced {
            self.poison(format!("fdatasync failed: {e}"), crate::error::is_full(e.kind()));
        }
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        self.log.complete_sync(&group.log);
        self.dedup.merge(group.ids);
        Ok(())
    }

    /// Reads durable messages (see [`TopicLog::read`]).
    pub fn read(&self, from_offset: u64, max_messages: usize, max_bytes: usize) -> Result<Vec<StoredMessage>> {
        self.log.read(from_offset, max_messages, max_bytes)
    }

    /// Saves the dedup snapshot if the log moved since the last one. The caller flushes
    /// the metadata store.
    pub fn checkpoint(&mut self, meta: &dyn MetaStore) -> Result<bool> {
        let through = self.log.committed_offset();
        if through == self.checkpointed_offset {
            return Ok(false);
        }
        meta::put_record(meta, &dedup_key(&self.name), &self.dedup.snapshot(through))?;
        self.checkpointed_offset = through;
        Ok(true)
    }

    /// Deletes the oldest sealed segment (see [`TopicLog::delete_oldest_segment`]).
    pub fn delete_oldest_segment(&mut self) -> Result<Option<crate::log::SegmentInfo>> {
        self.log.delete_oldest_segment()
    }

    /// The topic's name.
    pub fn name(&self) -> &TopicName {
        &self.name
    }
    /// The log.
    pub fn log(&self) -> &TopicLog {
        &self.log
    }
    /// The dedup index.
    pub fn dedup(&self) -> &DedupIndex {
        &self.dedup
    }
}

/// Records in `dedup` every durable message of `log` from `from` on: on open, the log past
/// the dedup snapshot; on recovery, what a segment roll made durable inside a group that
/// then failed (a roll syncs the sealed segment mid-group), which is kept and must be
/// indexed, or a retry would store it twice.
fn index_log(log: &TopicLog, dedup: &mut DedupIndex, from: u64) -> Result<()> {
    let mut at = from;
    while at < log.committed_offset() {
        let chunk = log.read(at, REBUILD_CHUNK_MESSAGES, usize::MAX)?;
        let Some(last) = chunk.last() else { break };
        at = last.offset + 1;
        for m in &chunk {
            dedup.record(&m.message.id, m.offset);
        }
    }
    Ok(())
}

/// Splits messages into runs of consecutive seqs from one producer session.
fn runs(messages: &[Message]) -> impl Iterator<Item = &[Message]> {
    messages.chunk_by(|a, b| {
        a.id.producer == b.id.producer && a.id.epoch == b.id.epoch && a.id.seq.checked_add(1) == Some(b.id.seq)
    })
}

/// The same error for another request of the group (storage errors hold an `io::Error`,
/// which cannot be cloned).
fn copy_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::Poisoned { topic, reason, disk_full } => {
            StorageError::Poisoned { topic: topic.clone(), reason: reason.clone(), disk_full: *disk_full }
        }
        other => {
            StorageError::Poisoned { topic: String::new(), reason: other.to_string(), disk_full: other.is_disk_full() }
        }
    }
}

/// One request's result within a group.
pub type GroupResult = Result<Vec<AppendOutcome>>;

/// Group commit: writes every request's messages, syncs once, and returns each request's
/// outcome. Blocking; call it from a thread that may block. The node runs its three steps
/// ([`write_group`], [`sync_group`], [`publish_group`]) as separate blocking calls.
pub fn commit_group(store: &Mutex<TopicStore>, requests: &[&[Message]]) -> Vec<GroupResult> {
    let (results, group) = write_group(store, requests);
    let synced = sync_group(store, &group);
    publish_group(store, results, group, synced)
}

/// Step 1 of a group commit: under the topic's lock, cuts the log back if the last group
/// failed, then writes every request's messages to the page cache.
pub fn write_group(store: &Mutex<TopicStore>, requests: &[&[Message]]) -> (Vec<GroupResult>, GroupSync) {
    let mut topic = store.lock().expect("topic lock poisoned");
    let results = match topic.recover() {
        Ok(()) => requests.iter().map(|msgs| topic.write(msgs)).collect(),
        Err(e) => requests.iter().map(|_| Err(copy_error(&e))).collect(),
    };
    (results, topic.prepare_sync())
}

/// Step 2: the group's fdatasync, outside the lock. A group that failed to write is not
/// synced: the next group's recovery cuts it back.
pub fn sync_group(store: &Mutex<TopicStore>, group: &GroupSync) -> std::io::Result<()> {
    if store.lock().expect("topic lock poisoned").is_poisoned() { Ok(()) } else { group.run() }
}

/// Step 3: publishes the group if it was synced, and returns each request's outcome.
pub fn publish_group(
    store: &Mutex<TopicStore>,
    mut results: Vec<GroupResult>,
    group: GroupSync,
    synced: std::io::Result<()>,
) -> Vec<GroupResult> {
    let done = store.lock().expect("topic lock poisoned").complete_sync(group, synced);
    if let Err(e) = done {
        for r in results.iter_mut().filter(|r| r.is_ok()) {
            *r = Err(copy_error(&e));
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        format::tests::msg,
        fs::{StdFs, TestFs, TestRoot},
        meta::MemMeta,
    };

    fn topic() -> TopicName {
        TopicName::parse("t/n/x").unwrap()
    }

    fn open(root: &Path, meta: &MemMeta) -> Mutex<TopicStore> {
        Mutex::new(TopicStore::open(Arc::new(StdFs), meta, root, topic(), LogConfig::default()).unwrap())
    }

    fn offsets(r: &GroupResult) -> Vec<AppendOutcome> {
        r.as_ref().unwrap().clone()
    }

    /// On a full disk every request of the group says so, not only the one whose write hit
    /// ENOSPC, and so does the next group while the disk stays full.
    #[test]
    fn a_full_disk_is_reported_as_full_to_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let full = Arc::new(TestFs { fail_writes: true, errno: 28, ..TestFs::default() });
        let fs: Arc<dyn FileSystem> = Arc::new(TestRoot(Arc::clone(&full)));
        let store = Mutex::new(TopicStore::open(fs, &meta, dir.path(), topic(), LogConfig::default()).unwrap());
        let batch = |p: &str| (0..3).map(|s| msg(p, s, b"x")).collect::<Vec<_>>();
        full.set_failing(true);
        let r = commit_group(&store, &[&batch("a"), &batch("b")]);
        assert!(r.iter().all(|r| r.as_ref().is_err_and(StorageError::is_disk_full)), "{r:?}");
        let again = commit_group(&store, &[&batch("a")]);
        assert!(again[0].as_ref().is_err_and(StorageError::is_disk_full), "{again:?}");
        full.set_failing(false);
        assert!(commit_group(&store, &[&batch("a")])[0].is_ok());
    }

    /// What the dedup index lists (and so a peer's Hello summary) never includes a message
    /// a failed fdatasync lost, before or after recovery; a message made durable by a
    /// segment roll inside a failed group is indexed on recovery, so its retry is a
    /// duplicate.
    #[test]
    fn the_dedup_index_lists_exactly_what_survived_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let flaky = Arc::new(TestFs::default());
        let fs: Arc<dyn FileSystem> = Arc::new(TestRoot(Arc::clone(&flaky)));
        let config = LogConfig { segment_bytes_max: 200, ..LogConfig::default() };
        let store = Mutex::new(TopicStore::open(fs, &meta, dir.path(), topic(), config).unwrap());
        let batch = |p: &str, seqs: std::ops::Range<u64>| seqs.map(|s| msg(p, s, b"x")).collect::<Vec<_>>();
        assert!(commit_group(&store, &[&batch("a", 0..3)])[0].is_ok());
        // b is written, c's write rolls the segment (syncing b's), then the group's sync fails.
        let (results, group) = write_group(&store, &[&batch("b", 0..3), &batch("c", 0..3)]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        flaky.set_failing(true);
        let synced = sync_group(&store, &group);
        let results = publish_group(&store, results, group, synced);
        assert!(results.iter().all(Result::is_err));
        let id = |p: &str, seq| MessageId::chosen(p, seq);
        let held = |s: &Mutex<TopicStore>, p: &str| s.lock().unwrap().dedup().contains(&id(p, 0));
        assert!(held(&store, "a") && !held(&store, "b") && !held(&store, "c"));
        flaky.set_failing(false);
        let retry = commit_group(&store, &[&batch("b", 0..3), &batch("c", 0..3)]);
        let log_len = store.lock().unwrap().log().committed_offset();
        let store_b = store.lock().unwrap().read(0, 100, usize::MAX).unwrap();
        let copies = |p: &str| store_b.iter().filter(|m| &*m.message.id.producer.0 == p).count();
        assert_eq!((copies("a"), copies("b"), copies("c")), (3, 3, 3), "retry {retry:?}, log end {log_len}");
        assert!(held(&store, "b") && held(&store, "c"));
    }

    /// While the disk fails, every group fails and nothing is published; once it works
    /// again the next group cuts the log back to its last sync and goes on, and a reopen
    /// sees exactly the acknowledged messages.
    #[test]
    fn a_failing_disk_fails_groups_and_the_topic_recovers_by_itself() {
        for writes in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let meta = MemMeta::default();
            let flaky = Arc::new(TestFs { fail_writes: writes, ..TestFs::default() });
            let fs: Arc<dyn FileSystem> = Arc::new(TestRoot(Arc::clone(&flaky)));
            let store = Mutex::new(TopicStore::open(fs, &meta, dir.path(), topic(), LogConfig::default()).unwrap());
            let batch = |p: &str, seqs: std::ops::Range<u64>| seqs.map(|s| msg(p, s, b"x")).collect::<Vec<_>>();
            assert!(commit_group(&store, &[&batch("a", 0..3)])[0].is_ok());
            flaky.set_failing(true);
            let r = commit_group(&store, &[&batch("b", 0..3), &batch("c", 0..3)]);
            assert!(r.iter().all(|r| r.is_err()), "writes={writes}: {r:?}");
            let again = commit_group(&store, &[&batch("b", 0..3)]);
            let text = again[0].as_ref().unwrap_err().to_string();
            assert!(text.contains("Input/output error"), "{text}");
            assert_eq!(store.lock().unwrap().log().committed_offset(), 3);
            flaky.set_failing(false);
            // The retry is stored once, at the offset after the last acknowledged message.
            let r = commit_group(&store, &[&batch("b", 0..3)]);
            assert_eq!(offsets(&r[0])[0], AppendOutcome::Appended { offset: 3 });
            drop(store);
            let store = open(dir.path(), &meta);
            let held: Vec<String> = store
                .lock()
                .unwrap()
                .read(0, 100, usize::MAX)
                .unwrap()
                .iter()
                .map(|m| format!("{}", m.message.id.producer))
                .collect();
            assert_eq!(held, ["a", "a", "a", "b", "b", "b"], "writes={writes}");
        }
    }

    #[test]
    fn retries_are_stored_once_and_acked_with_the_original_offset() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let store = open(dir.path(), &meta);
        let a: Vec<Message> = (0..3).map(|s| msg("a", s, b"x")).collect();
        let b: Vec<Message> = (0..2).map(|s| msg("b", s, b"y")).collect();
        let r = commit_group(&store, &[&a, &b, &a[1..2]]);
        use AppendOutcome::*;
        assert_eq!(offsets(&r[0]), vec![Appended { offset: 0 }, Appended { offset: 1 }, Appended { offset: 2 }]);
        assert_eq!(offsets(&r[1]), vec![Appended { offset: 3 }, Appended { offset: 4 }]);
        assert_eq!(offsets(&r[2]), vec![Duplicate { offset: Some(1) }], "duplicate within one group");
        let r = commit_group(&store, &[&a]);
        assert_eq!(
            offsets(&r[0]),
            vec![Duplicate { offset: Some(0) }, Duplicate { offset: Some(1) }, Duplicate { offset: Some(2) }]
        );
        assert_eq!(store.lock().unwrap().read(0, 100, usize::MAX).unwrap().len(), 5);
    }

    #[test]
    fn dedup_survives_restart_with_and_without_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let first: Vec<Message> = (0..10).map(|s| msg("a", s, b"x")).collect();
        let second: Vec<Message> = (10..20).map(|s| msg("a", s, b"x")).collect();
        {
            let store = open(dir.path(), &meta);
            commit_group(&store, &[&first]);
            assert!(store.lock().unwrap().checkpoint(&meta).unwrap());
            meta.flush().unwrap();
            commit_group(&store, &[&second]); // after the snapshot: rebuilt from the log tail
        }
        for crash_meta in [false, true] {
            if crash_meta {
                meta.delete("dedup/t/n/x").unwrap(); // no snapshot at all: rebuild from the whole log
            }
            let store = open(dir.path(), &meta);
            let r = commit_group(&store, &[&first, &second]);
            assert!(
                r.iter().all(|r| { r.as_ref().unwrap().iter().all(|o| matches!(o, AppendOutcome::Duplicate { .. })) })
            );
            assert_eq!(store.lock().unwrap().log().next_offset(), 20);
        }
    }

    #[test]
    fn overlapping_runs_fall_back_to_per_message_checks() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let store = open(dir.path(), &meta);
        let a: Vec<Message> = [0, 1, 2, 5].iter().map(|&s| msg("a", s, b"x")).collect();
        commit_group(&store, &[&a]);
        // One run 0..8 overlapping the held seqs, plus a second producer in the same batch.
        let mut b: Vec<Message> = (0..8).map(|s| msg("a", s, b"x")).collect();
        b.push(msg("b", 0, b"y"));
        let r = commit_group(&store, &[&b]);
        use AppendOutcome::*;
        let want = vec![
            Duplicate { offset: Some(0) },
            Duplicate { offset: Some(1) },
            Duplicate { offset: Some(2) },
            Appended { offset: 4 },
            Appended { offset: 5 },
            Duplicate { offset: Some(3) },
            Appended { offset: 6 },
            Appended { offset: 7 },
            Appended { offset: 8 },
        ];
        assert_eq!(offsets(&r[0]), want);
        let seq_max = [msg("a", u64::MAX, b"x")];
        assert!(commit_group(&store, &[&seq_max])[0].as_ref().unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn stale_snapshot_beyond_the_log_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let snap = DedupIndex::default().snapshot(1_000);
        meta::put_record(&meta, "dedup/t/n/x", &snap).unwrap();
        let store = open(dir.path(), &meta);
        let m = [msg("a", 0, b"x")];
        assert_eq!(offsets(&commit_group(&store, &[&m])[0]), vec![AppendOutcome::Appended { offset: 0 }]);
    }

    #[test]
    fn concurrent_groups_from_threads_lose_and_duplicate_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let store = Arc::new(open(dir.path(), &meta));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for chunk in 0..20u64 {
                        let ms: Vec<Message> =
                            (chunk * 5..chunk * 5 + 5).map(|s| msg(&format!("p{t}"), s, b"z")).collect();
                        // Every batch is sent twice, as a client retry would.
                        commit_group(&store, &[&ms]);
                        commit_group(&store, &[&ms]);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let all = store.lock().unwrap().read(0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(all.len(), 400);
        for t in 0..4 {
            let seqs: Vec<u64> = all
                .iter()
                .filter(|m| m.message.id.producer.as_str() == format!("p{t}"))
                .map(|m| m.message.id.seq)
                .collect();
            assert_eq!(seqs, (0..100).collect::<Vec<_>>(), "producer p{t} in order, exactly once");
        }
    }
}

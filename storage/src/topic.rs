//! A topic's store: its log plus its dedup index, written under group commit.
//!
//! Group commit ([`commit_group`]): the batches of many producers are written to the page
//! cache under the topic's lock, then one fdatasync runs *without* the lock (so readers
//! are not stalled), then the lock is taken again to publish the new offsets and record
//! the dedup entries. Only then are the producers acknowledged. Dedup entries are recorded
//! after the sync, so a failed sync can never leave a message "held" that is not on disk.
use std::{
    collections::{HashMap, VecDeque},
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

/// Messages read per step while rebuilding dedup state from the log tail, and while
/// looking for a held id's first copy.
const REBUILD_CHUNK_MESSAGES: usize = 10_000;

/// Messages at the log's end whose offsets are indexed again on open, past the dedup
/// snapshot (which keeps no offsets), so that a retry after a restart finds its first copy
/// without a search.
const REINDEXED_TAIL: usize = 8192;

/// Messages whose digests are computed together when a comparison needs one that is not
/// cached: the rest of a resent batch then finds its digests in the cache.
const DIGEST_FILL: usize = 1024;

/// What a write does with a message whose id is held with a different content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Refuse the whole request ([`StorageError::Conflict`]), storing none of it: a
    /// producer broke its promise and is told.
    Refuse,
    /// Store the rest and report the message as [`AppendOutcome::Conflict`], for the
    /// caller to keep aside: replication, where the content was acknowledged elsewhere.
    SetAside,
}

/// What happened to one produced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored at this offset.
    Appended {
        /// The offset.
        offset: u64,
    },
    /// Already held with the same content; stored earlier at this offset, when the node
    /// still holds it (a message retention deleted cannot be compared, and counts as held).
    Duplicate {
        /// The original offset, if known.
        offset: Option<u64>,
    },
    /// The id belongs to a producer session dropped after the namespace's dedup horizon
    /// and is at or below its highest seq: not stored, since it may have been stored and
    /// deleted since (only with [`OnConflict::SetAside`]; produce refuses it).
    Expired,
    /// The id is held with a different content, stored at this offset; the message was
    /// not stored (only with [`OnConflict::SetAside`]).
    Conflict {
        /// Where the content stored first is.
        offset: u64,
    },
}

/// Digests of a run of consecutive stored messages, by offset: computed when a comparison
/// first needs one, for [`DIGEST_FILL`] messages at once. Digests are never computed on the
/// write path: only resends pay for them.
#[derive(Debug, Default)]
struct DigestCache {
    /// The offset of `digests[0]`.
    start: u64,
    digests: VecDeque<u64>,
}

impl DigestCache {
    fn get(&self, offset: u64) -> Option<u64> {
        let i = usize::try_from(offset.checked_sub(self.start)?).ok()?;
        self.digests.get(i).copied()
    }

    /// Replaces the cache with the digests of `messages` (consecutive offsets).
    fn fill(&mut self, messages: &[StoredMessage]) {
        self.digests.clear();
        self.start = messages.first().map_or(0, |m| m.offset);
        let start = self.start;
        let consecutive = messages.iter().enumerate().take_while(|(i, m)| m.offset == start + *i as u64);
        self.digests.extend(consecutive.map(|(_, m)| m.message.content_digest()));
    }

    /// Forgets every offset at or past `end`.
    fn truncate(&mut self, end: u64) {
        self.digests.truncate(usize::try_from(end.saturating_sub(self.start)).unwrap_or(usize::MAX));
    }
}

/// One topic: log and dedup index.
#[derive(Debug)]
pub struct TopicStore {
    name: TopicName,
    log: TopicLog,
    dedup: DedupIndex,
    /// Written but not yet synced: merged into `dedup` when the sync succeeds.
    unsynced: DedupIndex,
    /// Content digests of a run of stored messages, computed for comparisons.
    digests: DigestCache,
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
        let snapshot = match meta.get(&crate::keys::dedup(&name))? {
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
        // The tail is read again even when the snapshot covers it: the snapshot keeps no
        // offsets, and a producer's retry after a restart needs them.
        let tail = log.committed_offset().saturating_sub(REINDEXED_TAIL as u64).max(log.start_offset());
        for_each_durable(&log, from.min(tail), |m| {
            // Below `from` the snapshot has the seqs; a session it dropped stays dropped.
            if m.offset >= from || !dedup.expired(&m.message.id) {
                dedup.record(&m.message, m.offset);
            }
        })?;
        let checkpointed_offset = from;
        Ok(TopicStore {
            name,
            log,
            dedup,
            unsynced: DedupIndex::unbounded(),
            digests: DigestCache::default(),
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
    /// only a run that overlaps held seqs is checked message by message, and each held
    /// message's content is compared with the stored one (see [`OnConflict`]).
    ///
    /// A failed write poisons the topic: this and every later write of the group fail, the
    /// group is not published, and the next group starts with [`TopicStore::recover`].
    pub fn write(&mut self, messages: &[Message], on_conflict: OnConflict) -> Result<Vec<AppendOutcome>> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        if let Some(m) = messages.iter().find(|m| m.id.seq == u64::MAX) {
            return Err(StorageError::InvalidMessage(format!("{}: seq {} is reserved", m.id.producer, u64::MAX)));
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut fresh: Vec<&Message> = Vec::with_capacity(messages.len());
        // Held messages with the index of their outcome, to compare their contents.
        let mut held: Vec<(usize, &Message)> = Vec::new();
        let mut batch = DedupIndex::unbounded();
        let base = self.log.next_offset();
        for run in runs(messages) {
            let (producer, epoch, first) = (&run[0].id.producer, run[0].id.epoch, run[0].id.seq);
            let seqs = first..first + run.len() as u64;
            let held_in = |d: &DedupIndex| d.intersects(producer, epoch, &seqs);
            let new = !held_in(&self.dedup) && !held_in(&self.unsynced) && !held_in(&batch);
            if self.bug_no_dedup || new && !self.dedup.any_expired(producer, epoch, &seqs) {
                let offset = base + fresh.len() as u64;
                let last_ms = run.iter().map(|m| m.publish_time_ms).max().unwrap_or(0);
                batch.record_run(producer, epoch, first, offset, run.len() as u64, last_ms);
                outcomes.extend((0..run.len() as u64).map(|i| AppendOutcome::Appended { offset: offset + i }));
                fresh.extend(run);
                continue;
            }
            for m in run {
                match self.earlier_offset(&batch, &m.id) {
                    Some(offset) => {
                        held.push((outcomes.len(), m));
                        outcomes.push(AppendOutcome::Duplicate { offset });
                    }
                    None if self.dedup.expired(&m.id) => outcomes.push(AppendOutcome::Expired),
                    None => {
                        let offset = base + fresh.len() as u64;
                        batch.record(m, offset);
                        fresh.push(m);
                        outcomes.push(AppendOutcome::Appended { offset });
                    }
                }
            }
        }
        if on_conflict == OnConflict::Refuse
            && let Some((m, _)) = messages.iter().zip(&outcomes).find(|(_, o)| **o == AppendOutcome::Expired)
        {
            return Err(StorageError::Expired { id: m.id.to_string() });
        }
        if !held.is_empty() {
            self.compare_contents(&held, &fresh, base, &mut outcomes)?;
            if on_conflict == OnConflict::Refuse
                && let Some((m, offset)) = messages.iter().zip(&outcomes).find_map(|(m, o)| match o {
                    AppendOutcome::Conflict { offset } => Some((m, *offset)),
                    _ => None,
                })
            {
                return Err(StorageError::Conflict { id: m.id.to_string(), offset });
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

    /// Compares each held message (with the index of its outcome, a `Duplicate`) with the
    /// content stored first under its id, and turns the differing ones into `Conflict`s.
    /// A stored copy is found by its remembered offset, or else by reading the log back
    /// from its end (bounded memory; time grows with how far back the copy is). A copy
    /// retention deleted cannot be compared, and stays a duplicate.
    fn compare_contents(
        &mut self,
        held: &[(usize, &Message)],
        fresh: &[&Message],
        base: u64,
        outcomes: &mut [AppendOutcome],
    ) -> Result<()> {
        let mut unknown: HashMap<&MessageId, Vec<usize>> = HashMap::new();
        let mut stored: Vec<Option<(u64, u64)>> = Vec::with_capacity(held.len());
        for (k, &(slot, m)) in held.iter().enumerate() {
            let AppendOutcome::Duplicate { offset } = outcomes[slot] else {
                unreachable!("held messages are duplicates")
            };
            stored.push(match offset {
                Some(offset) => self.digest_at(offset, fresh, base)?.map(|d| (offset, d)),
                None => {
                    unknown.entry(&m.id).or_default().push(k);
                    None
                }
            });
        }
        if !unknown.is_empty() {
            for (id, found) in self.locate(unknown.keys().copied())? {
                for &k in &unknown[id] {
                    stored[k] = Some(found);
                }
            }
        }
        for (&(slot, m), found) in held.iter().zip(stored) {
            if let Some((offset, digest)) = found {
                outcomes[slot] = if digest == m.content_digest() {
                    AppendOutcome::Duplicate { offset: Some(offset) }
                } else {
                    AppendOutcome::Conflict { offset }
                };
            }
        }
        Ok(())
    }

    /// The digest of the message at `offset`: one of this write's, a cached one, or read
    /// from the log, synced or not, with the next ones into the cache (`None` once
    /// retention deleted it).
    fn digest_at(&mut self, offset: u64, fresh: &[&Message], base: u64) -> Result<Option<u64>> {
        if offset >= base {
            return Ok(fresh.get((offset - base) as usize).map(|m| m.content_digest()));
        }
        if self.digests.get(offset).is_none() {
            self.digests.fill(&self.log.read_written(offset, DIGEST_FILL)?);
        }
        Ok(self.digests.get(offset))
    }

    /// Finds the durable copies of `ids` by reading the log backwards from its end, one
    /// chunk at a time, until all are found or the log's start is reached: (offset, digest)
    /// per id found.
    fn locate<'a>(&self, ids: impl Iterator<Item = &'a MessageId>) -> Result<HashMap<&'a MessageId, (u64, u64)>> {
        let mut wanted: HashMap<&MessageId, &'a MessageId> = ids.map(|id| (id, id)).collect();
        let mut found = HashMap::with_capacity(wanted.len());
        let (start, mut end) = (self.log.start_offset(), self.log.committed_offset());
        while end > start && !wanted.is_empty() {
            let from = end.saturating_sub(REBUILD_CHUNK_MESSAGES as u64).max(start);
            for m in self.log.read(from, (end - from) as usize, usize::MAX)? {
                if m.offset < end
                    && let Some(id) = wanted.remove(&m.message.id)
                {
                    found.insert(id, (m.offset, m.message.content_digest()));
                }
            }
            end = from;
        }
        Ok(found)
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
        let dedup = &mut self.dedup;
        let indexed = self
            .log
            .cut_to_synced_and_reopen()
            .and_then(|()| for_each_durable(&self.log, published, |m| dedup.record(&m.message, m.offset)));
        match indexed {
            Ok(()) => {
                self.unsynced = DedupIndex::unbounded();
                self.digests.truncate(self.log.next_offset());
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
        GroupSync { log: self.log.prepare_sync(), ids: std::mem::replace(&mut self.unsynced, DedupIndex::unbounded()) }
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
        meta::put_record(meta, &crate::keys::dedup(&self.name), &self.dedup.snapshot(through))?;
        self.checkpointed_offset = through;
        Ok(true)
    }

    /// Drops the producer sessions idle for longer than `horizon_ms` (see
    /// [`DedupIndex::drop_idle`]); the next checkpoint saves the change.
    pub fn drop_idle_sessions(&mut self, now_ms: u64, horizon_ms: u64) -> usize {
        let dropped = self.dedup.drop_idle(now_ms, horizon_ms);
        if dropped > 0 {
            // Force the next checkpoint even if the log did not move.
            self.checkpointed_offset = u64::MAX;
        }
        dropped
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

/// Calls `f` on every durable message of `log` from `from` on, a chunk at a time. Indexes
/// dedup state: on open, the log past the dedup snapshot; on recovery, what a segment roll
/// made durable inside a group that then failed (a roll syncs the sealed segment
/// mid-group), which is kept and must be indexed, or a retry would store it twice.
fn for_each_durable(log: &TopicLog, from: u64, mut f: impl FnMut(&StoredMessage)) -> Result<()> {
    let mut at = from;
    while at < log.committed_offset() {
        let chunk = log.read(at, REBUILD_CHUNK_MESSAGES, usize::MAX)?;
        let Some(last) = chunk.last() else { break };
        at = last.offset + 1;
        chunk.iter().for_each(&mut f);
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
pub fn commit_group(store: &Mutex<TopicStore>, requests: &[(&[Message], OnConflict)]) -> Vec<GroupResult> {
    let (results, group) = write_group(store, requests);
    let synced = sync_group(store, &group);
    publish_group(store, results, group, synced)
}

/// Step 1 of a group commit: under the topic's lock, cuts the log back if the last group
/// failed, then writes every request's messages to the page cache.
pub fn write_group(store: &Mutex<TopicStore>, requests: &[(&[Message], OnConflict)]) -> (Vec<GroupResult>, GroupSync) {
    let mut topic = store.lock().expect("topic lock poisoned");
    let results = match topic.recover() {
        Ok(()) => requests.iter().map(|(msgs, on_conflict)| topic.write(msgs, *on_conflict)).collect(),
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
        fs::{StdFs, TestFs},
        meta::MemMeta,
    };

    fn topic() -> TopicName {
        TopicName::parse("t/n/x").unwrap()
    }

    fn open(root: &Path, meta: &MemMeta) -> Mutex<TopicStore> {
        Mutex::new(TopicStore::open(Arc::new(StdFs), meta, root, topic(), LogConfig::default()).unwrap())
    }

    /// A group commit of produce requests (conflicts refused).
    fn commit(store: &Mutex<TopicStore>, requests: &[&[Message]]) -> Vec<GroupResult> {
        let requests: Vec<_> = requests.iter().map(|r| (*r, OnConflict::Refuse)).collect();
        commit_group(store, &requests)
    }

    fn write(store: &Mutex<TopicStore>, requests: &[&[Message]]) -> (Vec<GroupResult>, GroupSync) {
        let requests: Vec<_> = requests.iter().map(|r| (*r, OnConflict::Refuse)).collect();
        write_group(store, &requests)
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
        let fs: Arc<dyn FileSystem> = Arc::new(TestFs::root(&full));
        let store = Mutex::new(TopicStore::open(fs, &meta, dir.path(), topic(), LogConfig::default()).unwrap());
        let batch = |p: &str| (0..3).map(|s| msg(p, s, b"x")).collect::<Vec<_>>();
        full.set_failing(true);
        let r = commit(&store, &[&batch("a"), &batch("b")]);
        assert!(r.iter().all(|r| r.as_ref().is_err_and(StorageError::is_disk_full)), "{r:?}");
        let again = commit(&store, &[&batch("a")]);
        assert!(again[0].as_ref().is_err_and(StorageError::is_disk_full), "{again:?}");
        full.set_failing(false);
        assert!(commit(&store, &[&batch("a")])[0].is_ok());
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
        let fs: Arc<dyn FileSystem> = Arc::new(TestFs::root(&flaky));
        let config = LogConfig { segment_bytes_max: 200, ..LogConfig::default() };
        let store = Mutex::new(TopicStore::open(fs, &meta, dir.path(), topic(), config).unwrap());
        let batch = |p: &str, seqs: std::ops::Range<u64>| seqs.map(|s| msg(p, s, b"x")).collect::<Vec<_>>();
        assert!(commit(&store, &[&batch("a", 0..3)])[0].is_ok());
        // b is written, c's write rolls the segment (syncing b's), then the group's sync fails.
        let (results, group) = write(&store, &[&batch("b", 0..3), &batch("c", 0..3)]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        flaky.set_failing(true);
        let synced = sync_group(&store, &group);
        let results = publish_group(&store, results, group, synced);
        assert!(results.iter().all(Result::is_err));
        let id = |p: &str, seq| MessageId::chosen(p, seq);
        let held = |s: &Mutex<TopicStore>, p: &str| s.lock().unwrap().dedup().contains(&id(p, 0));
        assert!(held(&store, "a") && !held(&store, "b") && !held(&store, "c"));
        flaky.set_failing(false);
        let retry = commit(&store, &[&batch("b", 0..3), &batch("c", 0..3)]);
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
            let fs: Arc<dyn FileSystem> = Arc::new(TestFs::root(&flaky));
            let store = Mutex::new(TopicStore::open(fs, &meta, dir.path(), topic(), LogConfig::default()).unwrap());
            let batch = |p: &str, seqs: std::ops::Range<u64>| seqs.map(|s| msg(p, s, b"x")).collect::<Vec<_>>();
            assert!(commit(&store, &[&batch("a", 0..3)])[0].is_ok());
            flaky.set_failing(true);
            let r = commit(&store, &[&batch("b", 0..3), &batch("c", 0..3)]);
            assert!(r.iter().all(|r| r.is_err()), "writes={writes}: {r:?}");
            let again = commit(&store, &[&batch("b", 0..3)]);
            let text = again[0].as_ref().unwrap_err().to_string();
            assert!(text.contains("Input/output error"), "{text}");
            assert_eq!(store.lock().unwrap().log().committed_offset(), 3);
            flaky.set_failing(false);
            // The retry is stored once, at the offset after the last acknowledged message.
            let r = commit(&store, &[&batch("b", 0..3)]);
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
        let r = commit(&store, &[&a, &b, &a[1..2]]);
        use AppendOutcome::*;
        assert_eq!(offsets(&r[0]), vec![Appended { offset: 0 }, Appended { offset: 1 }, Appended { offset: 2 }]);
        assert_eq!(offsets(&r[1]), vec![Appended { offset: 3 }, Appended { offset: 4 }]);
        assert_eq!(offsets(&r[2]), vec![Duplicate { offset: Some(1) }], "duplicate within one group");
        let r = commit(&store, &[&a]);
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
            commit(&store, &[&first]);
            assert!(store.lock().unwrap().checkpoint(&meta).unwrap());
            meta.flush().unwrap();
            commit(&store, &[&second]); // after the snapshot: rebuilt from the log tail
        }
        for crash_meta in [false, true] {
            if crash_meta {
                meta.delete("dedup/t/n/x").unwrap(); // no snapshot at all: rebuild from the whole log
            }
            let store = open(dir.path(), &meta);
            let r = commit(&store, &[&first, &second]);
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
        commit(&store, &[&a]);
        // One run 0..8 overlapping the held seqs, plus a second producer in the same batch.
        let mut b: Vec<Message> = (0..8).map(|s| msg("a", s, b"x")).collect();
        b.push(msg("b", 0, b"y"));
        let r = commit(&store, &[&b]);
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
        assert!(commit(&store, &[&seq_max])[0].as_ref().unwrap_err().to_string().contains("reserved"));
    }

    /// At produce a different content under a held id refuses the whole request, naming
    /// the id and where the first content is; in replication it is reported and the rest
    /// is stored. The same content is a duplicate either way.
    #[test]
    fn a_held_id_with_another_content_is_a_conflict_never_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let store = open(dir.path(), &meta);
        let first: Vec<Message> = (0..3).map(|s| msg("a", s, b"first")).collect();
        assert!(commit(&store, &[&first])[0].is_ok());
        let twin = msg("a", 1, b"second");
        let request = [msg("b", 0, b"new"), twin.clone()];
        let err = commit(&store, &[&request])[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("message a:1 conflicts") && err.contains("offset 1"), "{err}");
        assert_eq!(store.lock().unwrap().log().committed_offset(), 3, "nothing of the request is stored");
        let r = commit_group(&store, &[(&request[..], OnConflict::SetAside)]);
        use AppendOutcome::*;
        assert_eq!(offsets(&r[0]), vec![Appended { offset: 3 }, Conflict { offset: 1 }]);
        assert_eq!(offsets(&commit(&store, &[&first[1..2]])[0]), vec![Duplicate { offset: Some(1) }]);
        // Twins within one request: the second conflicts with the first.
        let twins = [msg("c", 0, b"x"), msg("c", 0, b"y")];
        assert!(commit(&store, &[&twins])[0].as_ref().unwrap_err().to_string().contains("c:0 conflicts"));
        let r = commit_group(&store, &[(&twins[..], OnConflict::SetAside)]);
        assert_eq!(offsets(&r[0]), vec![Appended { offset: 4 }, Conflict { offset: 4 }]);
    }

    /// Within one group the first copy is written and not yet synced: its content is read
    /// back from the unsynced frame for the comparison.
    #[test]
    fn a_resend_within_one_group_is_compared_with_the_unsynced_first_copy() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let store = open(dir.path(), &meta);
        let first = [msg("a", 0, b"x"), msg("a", 1, b"x")];
        let same = [msg("a", 1, b"x")];
        let other = [msg("b", 0, b"new"), msg("a", 0, b"y")];
        let (results, group) = write(&store, &[&first, &same, &other]);
        let synced = sync_group(&store, &group);
        let results = publish_group(&store, results, group, synced);
        assert_eq!(offsets(&results[1]), vec![AppendOutcome::Duplicate { offset: Some(1) }]);
        let err = results[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("message a:0 conflicts") && err.contains("offset 0"), "{err}");
        assert_eq!(store.lock().unwrap().log().committed_offset(), 2);
    }

    /// An id whose offset the node no longer remembers (older than the recent digests,
    /// and after a restart from a snapshot, which keeps no offsets) is found through the
    /// log; once retention deleted it, a resend is a duplicate that cannot be compared.
    #[test]
    fn old_ids_are_compared_through_the_log_until_retention_deletes_them() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let config = LogConfig { segment_bytes_max: 64 * 1024, ..LogConfig::default() };
        let reopen = || Mutex::new(TopicStore::open(Arc::new(StdFs), &meta, dir.path(), topic(), config).unwrap());
        let old = msg("old", 7, b"kept");
        {
            let store = reopen();
            assert!(commit(&store, &[std::slice::from_ref(&old)])[0].is_ok());
            let filler: Vec<Message> = (0..REINDEXED_TAIL as u64 + 100).map(|s| msg("f", s, b"filler")).collect();
            for chunk in filler.chunks(1000) {
                assert!(commit(&store, &[chunk])[0].is_ok());
            }
            assert!(store.lock().unwrap().checkpoint(&meta).unwrap());
            meta.flush().unwrap();
        }
        let store = reopen();
        let changed = Message { payload: b"changed".to_vec(), ..old.clone() };
        let r = commit_group(&store, &[(std::slice::from_ref(&changed), OnConflict::SetAside)]);
        assert_eq!(offsets(&r[0]), vec![AppendOutcome::Conflict { offset: 0 }]);
        assert_eq!(
            offsets(&commit(&store, &[std::slice::from_ref(&old)])[0]),
            vec![AppendOutcome::Duplicate { offset: Some(0) }]
        );
        while store.lock().unwrap().delete_oldest_segment().unwrap().is_some_and(|s| s.end_offset < 5000) {}
        assert!(store.lock().unwrap().log().start_offset() > 0);
        let r = commit_group(&store, &[(&[changed][..], OnConflict::SetAside)]);
        assert_eq!(offsets(&r[0]), vec![AppendOutcome::Duplicate { offset: None }]);
    }

    /// After a session is dropped at the dedup horizon, its old ids are expired: refused at
    /// produce, not stored in replication, even after a restart; newer seqs are stored.
    #[test]
    fn ids_of_a_dropped_session_are_expired_not_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let store = open(dir.path(), &meta);
        let first: Vec<Message> = (0..5).map(|s| msg("a", s, b"x")).collect();
        assert!(commit(&store, &[&first])[0].is_ok());
        let now = first[4].publish_time_ms + 10_000;
        assert_eq!(store.lock().unwrap().drop_idle_sessions(now, 1_000), 1);
        assert!(store.lock().unwrap().checkpoint(&meta).unwrap(), "the drop is saved even though the log did not move");
        meta.flush().unwrap();
        drop(store);
        let store = open(dir.path(), &meta);
        let err = commit(&store, &[&first[2..3]])[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("message a:2 is expired"), "{err}");
        let resend = [msg("a", 2, b"x"), msg("a", 5, b"x")];
        let r = commit_group(&store, &[(&resend[..], OnConflict::SetAside)]);
        assert_eq!(offsets(&r[0]), vec![AppendOutcome::Expired, AppendOutcome::Appended { offset: 5 }]);
    }

    #[test]
    fn stale_snapshot_beyond_the_log_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MemMeta::default();
        let snap = DedupIndex::default().snapshot(1_000);
        meta::put_record(&meta, "dedup/t/n/x", &snap).unwrap();
        let store = open(dir.path(), &meta);
        let m = [msg("a", 0, b"x")];
        assert_eq!(offsets(&commit(&store, &[&m])[0]), vec![AppendOutcome::Appended { offset: 0 }]);
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
                        commit(&store, &[&ms]);
                        commit(&store, &[&ms]);
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

//! A topic's log: an ordered set of segments with one active segment at the end.
//!
//! Writes reach the page cache in [`TopicLog::append`]; [`TopicLog::prepare_sync`] hands out
//! the files to fdatasync so that the caller can sync without holding the log's lock, and
//! [`TopicLog::complete_sync`] then makes the new messages visible to readers. Readers only
//! ever see synced data, so a consumer never receives a message that a crash could take back.
use std::{
    collections::BTreeMap,
    ops::Bound,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    error::{Result, StorageError},
    format,
    fs::{FileSystem, LogFile},
    message::{Message, StoredMessage},
    segment::{self, Segment},
};

/// A segment's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First offset.
    pub base_offset: u64,
    /// One past the last offset.
    pub end_offset: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// Sizes that shape a log.
#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    /// A segment is sealed and a new one started once it reaches this size. Retention
    /// deletes whole segments, so this is also its granularity.
    pub segment_bytes_max: u64,
    /// Bytes between sparse index entries; smaller means faster seeks and more memory.
    pub index_interval_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        // 64 MiB keeps retention granular on a small edge disk; 4 KiB index spacing as in Kafka.
        LogConfig { segment_bytes_max: 64 << 20, index_interval_bytes: 4096 }
    }
}

/// Files written since the last sync, and how far the sync will make the log durable.
#[derive(Debug)]
pub struct PendingSync {
    files: Vec<Arc<dyn LogFile>>,
    through_offset: u64,
    segment_lens: Vec<(u64, u64)>,
}

impl PendingSync {
    /// Runs the fdatasyncs: the costly step, done without the log's lock.
    pub fn run(&self) -> std::io::Result<()> {
        self.files.iter().try_for_each(|f| f.sync_data())
    }
    /// True when there is nothing to sync.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// One topic's log.
#[derive(Debug)]
pub struct TopicLog {
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    config: LogConfig,
    segments: BTreeMap<u64, Segment>,
    /// Offset up to which (exclusive) messages are durable and readable.
    committed_offset: u64,
    /// Base offsets of segments written since the last sync.
    dirty: Vec<u64>,
    encode_buf: Vec<u8>,
}

impl TopicLog {
    /// Opens (or creates) the log in `dir`, recovering its last segment. `durable_through`,
    /// when known, is an offset every message below which was synced (a checkpoint's): damage
    /// below it is corruption, damage at or above it the remains of writes a crash cut short
    /// (see [`Segment::open`]).
    pub fn open(fs: Arc<dyn FileSystem>, dir: &Path, config: LogConfig, durable_through: Option<u64>) -> Result<Self> {
        crate::fs::create_dir_durably(fs.as_ref(), dir)?;
        let mut bases: Vec<(u64, PathBuf)> = fs
            .read_dir(dir)
            .map_err(|e| StorageError::io(dir, e))?
            .into_iter()
            .filter_map(|p| segment::parse_file_name(&p).map(|b| (b, p)))
            .collect();
        bases.sort();
        let mut segments = BTreeMap::new();
        let mut expected: Option<u64> = None;
        for (i, (base, path)) in bases.iter().enumerate() {
            let is_last = i + 1 == bases.len();
            let (seg, _) = Segment::open(
                fs.as_ref(),
                path,
                *base,
                is_last.then_some(durable_through),
                config.index_interval_bytes,
            )?;
            if let Some(want) = expected.filter(|&w| w != *base) {
                return Err(StorageError::Corruption {
                    path: path.clone(),
                    position: 0,
                    reason: format!("segment starts at offset {base} but the previous one ends at {want}"),
                });
            }
            expected = Some(seg.next_offset());
            segments.insert(*base, seg);
        }
        if segments.is_empty() {
            segments.insert(0, Segment::create(fs.as_ref(), dir, 0, config.index_interval_bytes)?);
        }
        let mut log = TopicLog {
            dir: dir.to_path_buf(),
            fs,
            config,
            segments,
            committed_offset: 0,
            dirty: Vec::new(),
            encode_buf: Vec::new(),
        };
        log.committed_offset = log.next_offset();
        Ok(log)
    }

    fn active(&mut self) -> &mut Segment {
        self.segments.values_mut().next_back().expect("a log always has a segment")
    }

    /// Appends `messages` as one frame at the end of the log (page cache only) and returns
    /// the offset of the first. Nothing is durable or readable until the next sync.
    pub fn append(&mut self, messages: &[&Message]) -> Result<u64> {
        let base = self.next_offset();
        self.encode_buf.clear();
        format::encode_frame(base, messages, &mut self.encode_buf);
        let body_bytes = (self.encode_buf.len() - format::FRAME_HEADER_BYTES) as u64;
        if body_bytes > u64::from(format::FRAME_BODY_BYTES_MAX) {
            return Err(StorageError::TooLarge {
                what: "batch",
                bytes: body_bytes,
                limit: format::FRAME_BODY_BYTES_MAX.into(),
            });
        }
        let seg_bytes_max = self.config.segment_bytes_max;
        if self.active().len_bytes() > 0 && self.active().len_bytes() + self.encode_buf.len() as u64 > seg_bytes_max {
            self.roll()?;
        }
        let frame = std::mem::take(&mut self.encode_buf);
        let result = self.active().append(&frame, base, messages.len() as u64);
        self.encode_buf = frame;
        result?;
        let active_base = self.active().base_offset();
        if !self.dirty.contains(&active_base) {
            self.dirty.push(active_base);
        }
        Ok(base)
    }

    /// After a failed write or sync: cuts every segment back to what its last good sync made
    /// durable (dropping whatever a failed write may have left past it) and reopens the log
    /// from disk.
    pub fn cut_to_synced_and_reopen(&mut self) -> Result<()> {
        for seg in self.segments.values() {
            let file = seg.file();
            let len = file.len().map_err(|e| StorageError::io(seg.path(), e))?;
            if len > seg.synced_bytes() {
                file.set_len(seg.synced_bytes()).map_err(|e| StorageError::io(seg.path(), e))?;
                file.sync_data().map_err(|e| StorageError::io(seg.path(), e))?;
            }
        }
        *self = TopicLog::open(Arc::clone(&self.fs), &self.dir, self.config, Some(self.committed_offset))?;
        Ok(())
    }

    /// The sealed segments (every one but the active), oldest first.
    pub fn sealed_segments(&self) -> Vec<SegmentInfo> {
        let n = self.segments.len().saturating_sub(1);
        self.segments
            .values()
            .take(n)
            .map(|s| SegmentInfo { base_offset: s.base_offset(), end_offset: s.next_offset(), bytes: s.len_bytes() })
            .collect()
    }

    /// Deletes the oldest sealed segment (never the active one): its messages are gone for
    /// readers, who continue from the next segment. `None` when only the active is left.
    pub fn delete_oldest_segment(&mut self) -> Result<Option<SegmentInfo>> {
        let Some(info) = self.sealed_segments().into_iter().next() else { return Ok(None) };
        let seg = self.segments.remove(&info.base_offset).expect("listed segment");
        self.dirty.retain(|b| *b != info.base_offset);
        self.fs.remove_file(seg.path()).map_err(|e| StorageError::io(seg.path(), e))?;
        self.fs.sync_dir(&self.dir).map_err(|e| StorageError::io(&self.dir, e))?;
        Ok(Some(info))
    }

    /// Seals the active segment (syncing it, so sealed segments never have torn tails) and
    /// starts a new one at the next offset.
    fn roll(&mut self) -> Result<()> {
        let active = self.active();
        active.file().sync_data().map_err(|e| StorageError::io(active.path(), e))?;
        let len = active.len_bytes();
        active.set_synced(len);
        let next = active.next_offset();
        let seg = Segment::create(self.fs.as_ref(), &self.dir, next, self.config.index_interval_bytes)?;
        self.segments.insert(next, seg);
        Ok(())
    }

    /// The files to sync for everything appended so far.
    pub fn prepare_sync(&mut self) -> PendingSync {
        let dirty = std::mem::take(&mut self.dirty);
        let files = dirty.iter().filter_map(|b| self.segments.get(b)).map(|s| Arc::clone(s.file())).collect();
        let segment_lens =
            dirty.iter().filter_map(|b| self.segments.get(b)).map(|s| (s.base_offset(), s.len_bytes())).collect();
        PendingSync { files, through_offset: self.next_offset(), segment_lens }
    }

    /// Makes what `pending` synced visible to readers.
    pub fn complete_sync(&mut self, pending: &PendingSync) {
        for &(base, len) in &pending.segment_lens {
            if let Some(seg) = self.segments.get_mut(&base) {
                seg.set_synced(len);
            }
        }
        self.committed_offset = self.committed_offset.max(pending.through_offset);
    }

    /// Reads durable messages from `from_offset` on (clamped to the first offset held), at
    /// most `max_messages` and about `max_bytes` (whole frames; at least one).
    pub fn read(&self, from_offset: u64, max_messages: usize, max_bytes: usize) -> Result<Vec<StoredMessage>> {
        self.read_below(false, from_offset, max_messages, max_bytes)
    }

    /// Like [`TopicLog::read`], but also the messages written and not yet synced: for the
    /// writer's own checks under the topic's lock, never for readers (a failed sync cuts
    /// them back).
    pub fn read_written(&self, from_offset: u64, max_messages: usize) -> Result<Vec<StoredMessage>> {
        self.read_below(true, from_offset, max_messages, usize::MAX)
    }

    fn read_below(
        &self,
        unsynced: bool,
        from_offset: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>> {
        let end = if unsynced { self.next_offset() } else { self.committed_offset };
        let from = from_offset.max(self.start_offset());
        let mut out = Vec::new();
        let mut bytes_left = max_bytes;
        let later = self.segments.range((Bound::Excluded(from), Bound::Unbounded));
        for seg in self.segments.range(..=from).next_back().into_iter().chain(later).map(|(_, s)| s) {
            if from >= end || out.len() >= max_messages || bytes_left == 0 {
                break;
            }
            let before = out.len();
            let (seg_from, room) = (from.max(seg.base_offset()), max_messages - out.len());
            if unsynced {
                seg.read_written(seg_from, room, &mut out)?;
            } else {
                seg.read(seg_from, room, bytes_left, &mut out)?;
            }
            let got: usize = out[before..].iter().map(|m| m.message.size_bytes()).sum();
            bytes_left = bytes_left.saturating_sub(got);
        }
        out.retain(|m| m.offset < end);
        Ok(out)
    }

    /// The first offset still held.
    pub fn start_offset(&self) -> u64 {
        self.segments.keys().next().copied().unwrap_or(0)
    }
    /// One past the last offset appended (durable or not).
    pub fn next_offset(&self) -> u64 {
        self.segments.values().next_back().map_or(0, Segment::next_offset)
    }
    /// One past the last durable offset.
    pub fn committed_offset(&self) -> u64 {
        self.committed_offset
    }
    /// Bytes on disk from `offset` to the end (to within one index interval).
    pub fn bytes_from(&self, offset: u64) -> u64 {
        let later = self.segments.range((Bound::Excluded(offset), Bound::Unbounded)).map(|(_, s)| s.len_bytes());
        let first = self.segments.range(..=offset).next_back().map_or(0, |(_, s)| s.bytes_from(offset));
        first + later.sum::<u64>()
    }

    /// Bytes on disk over all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(Segment::len_bytes).sum()
    }
    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        format::tests::msg,
        fs::{StdFs, TestFs},
    };

    fn open(dir: &Path, seg_bytes: u64) -> TopicLog {
        TopicLog::open(
            Arc::new(StdFs),
            dir,
            LogConfig { segment_bytes_max: seg_bytes, index_interval_bytes: 256 },
            None,
        )
        .unwrap()
    }

    fn append_sync(log: &mut TopicLog, ms: &[Message]) -> u64 {
        let refs: Vec<&Message> = ms.iter().collect();
        let base = log.append(&refs).unwrap();
        let p = log.prepare_sync();
        p.run().unwrap();
        log.complete_sync(&p);
        base
    }

    fn batch(producer: &str, seqs: std::ops::Range<u64>) -> Vec<Message> {
        seqs.map(|s| msg(producer, s, format!("payload-{s}").as_bytes())).collect()
    }

    #[test]
    fn append_read_and_reopen_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 2000);
        for i in 0..20 {
            assert_eq!(append_sync(&mut log, &batch("p", i * 10..i * 10 + 10)), i * 10);
        }
        assert!(log.segment_count() > 3, "segments: {}", log.segment_count());
        let all = log.read(0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(all.len(), 200);
        assert!(all.iter().enumerate().all(|(i, m)| m.offset == i as u64 && m.message.id.seq == i as u64));
        assert_eq!(log.bytes_from(0), log.size_bytes());
        assert!(log.bytes_from(150) < log.bytes_from(50) && log.bytes_from(199) > 0 && log.bytes_from(200) == 0);
        let mid = log.read(137, 5, usize::MAX).unwrap();
        assert_eq!(mid.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![137, 138, 139, 140, 141]);
        drop(log);
        let log = open(dir.path(), 2000);
        assert_eq!(log.next_offset(), 200);
        assert_eq!(log.read(195, 100, usize::MAX).unwrap().len(), 5);
    }

    #[test]
    fn a_new_topic_syncs_the_parent_of_every_directory_it_creates() {
        // Found by the simulation: without this a crash dropped a new topic's directories.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("t")).unwrap();
        let fs = Arc::new(TestFs::default());
        let dir = root.path().join("t/n/x");
        TopicLog::open(Arc::new(TestFs::root(&fs)), &dir, LogConfig::default(), None).unwrap();
        let synced = fs.dir_syncs.lock().unwrap().clone();
        for want in [root.path().join("t"), root.path().join("t/n"), dir.clone()] {
            assert!(synced.contains(&want), "{} not synced: {synced:?}", want.display());
        }
        assert!(!synced.contains(&root.path().to_path_buf()), "existing parents need no sync");
    }

    #[test]
    fn unsynced_appends_are_invisible() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1 << 20);
        append_sync(&mut log, &batch("p", 0..3));
        let ms = batch("p", 3..6);
        log.append(&ms.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(log.read(0, 100, usize::MAX).unwrap().len(), 3);
        let p = log.prepare_sync();
        p.run().unwrap();
        log.complete_sync(&p);
        assert_eq!(log.read(0, 100, usize::MAX).unwrap().len(), 6);
    }

    fn active_segment(dir: &Path) -> PathBuf {
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.pop().unwrap()
    }

    #[test]
    fn torn_tail_is_truncated_and_synced_data_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1 << 20);
        append_sync(&mut log, &batch("p", 0..10));
        append_sync(&mut log, &batch("p", 10..20));
        drop(log);
        let path = active_segment(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        // Cut the last frame in half, as a crash during an unsynced write would.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 40).unwrap();
        let log = open(dir.path(), 1 << 20);
        assert_eq!(log.next_offset(), 10);
        assert_eq!(log.read(0, 100, usize::MAX).unwrap().len(), 10);
        // Garbage appended after the last frame is a torn tail too.
        drop(log);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, &[0xAB; 100]).unwrap();
        let log = open(dir.path(), 1 << 20);
        assert_eq!(log.next_offset(), 10);
    }

    /// A log of three frames (offsets 0..30) whose second frame is damaged; and where that
    /// frame starts.
    fn damaged_log() -> (tempfile::TempDir, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1 << 20);
        append_sync(&mut log, &batch("p", 0..10));
        let second_frame_at = std::fs::metadata(active_segment(dir.path())).unwrap().len();
        append_sync(&mut log, &batch("p", 10..20));
        append_sync(&mut log, &batch("p", 20..30));
        drop(log);
        let path = active_segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[second_frame_at as usize + 40] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        (dir, second_frame_at)
    }

    #[test]
    fn corruption_in_the_middle_is_refused_with_file_and_position() {
        let (dir, second_frame_at) = damaged_log();
        let path = active_segment(dir.path());
        let err = TopicLog::open(Arc::new(StdFs), dir.path(), LogConfig::default(), None).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StorageError::Corruption { position, .. } if position == second_frame_at), "{text}");
        assert!(text.contains(&path.display().to_string()) && text.contains("valid frames follow"), "{text}");
    }

    /// A crash can keep a later unsynced frame whole and an earlier one in part (the disk
    /// writes pages in any order). Past the last durable point that is not corruption: the
    /// log is cut at the damage. Below it, the same damage is refused.
    #[test]
    fn damage_past_the_durable_point_is_cut_even_with_whole_frames_after_it() {
        let (dir, _) = damaged_log();
        let log = TopicLog::open(Arc::new(StdFs), dir.path(), LogConfig::default(), Some(10)).unwrap();
        assert_eq!(log.next_offset(), 10);
        assert_eq!(log.read(0, 100, usize::MAX).unwrap().len(), 10);
        drop(log);
        assert_eq!(
            TopicLog::open(Arc::new(StdFs), dir.path(), LogConfig::default(), Some(10)).unwrap().next_offset(),
            10
        );

        let (dir, at) = damaged_log();
        let err = TopicLog::open(Arc::new(StdFs), dir.path(), LogConfig::default(), Some(20)).unwrap_err();
        assert!(matches!(err, StorageError::Corruption { position, .. } if position == at), "{err}");
        assert!(err.to_string().contains("at offset 10 which was synced (below 20)"), "{err}");
    }

    /// After a failed sync the log is cut back to what was synced and reopened; appends go on
    /// from there.
    #[test]
    fn a_failed_sync_is_cut_back_to_the_last_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1 << 20);
        append_sync(&mut log, &batch("p", 0..10));
        let refs = batch("p", 10..20);
        log.append(&refs.iter().collect::<Vec<_>>()).unwrap();
        let _never_synced = log.prepare_sync();
        log.cut_to_synced_and_reopen().unwrap();
        assert_eq!((log.next_offset(), log.committed_offset()), (10, 10));
        assert_eq!(append_sync(&mut log, &batch("q", 0..5)), 10);
        drop(log);
        let log = open(dir.path(), 1 << 20);
        let read = log.read(0, 100, usize::MAX).unwrap();
        assert_eq!(read.len(), 15);
        assert_eq!(read[10].message.id.producer.to_string(), "q");
    }

    #[test]
    fn deleting_the_oldest_segments_moves_the_start_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1500);
        for i in 0..12 {
            append_sync(&mut log, &batch("p", i * 10..i * 10 + 10));
        }
        let sealed = log.sealed_segments();
        assert!(sealed.len() >= 2, "{sealed:?}");
        let first = log.delete_oldest_segment().unwrap().unwrap();
        assert_eq!(first, sealed[0]);
        assert_eq!(log.start_offset(), sealed[1].base_offset);
        assert_eq!(log.read(0, 1, usize::MAX).unwrap()[0].offset, sealed[1].base_offset, "reads start at the start");
        while log.delete_oldest_segment().unwrap().is_some() {}
        assert!(log.sealed_segments().is_empty(), "the active segment is never deleted");
        let (start, end) = (log.start_offset(), log.next_offset());
        drop(log);
        let log = open(dir.path(), 1500);
        assert_eq!((log.start_offset(), log.next_offset()), (start, end));
        assert_eq!(log.read(0, 100, usize::MAX).unwrap().len() as u64, end - start);
    }

    #[test]
    fn corruption_in_a_sealed_segment_is_found_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1500);
        for i in 0..6 {
            append_sync(&mut log, &batch("p", i * 10..i * 10 + 10));
        }
        drop(log);
        let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let first = &files[0];
        let mut bytes = std::fs::read(first).unwrap();
        bytes[60] ^= 0x01;
        std::fs::write(first, &bytes).unwrap();
        let log = open(dir.path(), 1500);
        let err = log.read(0, 100, usize::MAX).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch") && err.contains(&first.display().to_string()), "{err}");
        // Data after the damaged segment is still served.
        assert!(!log.read(log.next_offset() - 5, 100, usize::MAX).unwrap().is_empty());
    }
}

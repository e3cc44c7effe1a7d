//! Per-topic dedup state: for each (producer, epoch), the set of sequence numbers held
//! (ranges, a grow-only set CRDT) and, for recent runs, the offsets they were stored at so
//! that a retry is acknowledged with its original offset.
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    message::{Message, MessageId, ProducerId},
    rangeset::RangeSet,
};

/// Runs of (seq, offset) remembered per producer for answering retries with the original
/// offset. A run is one contiguous stretch of seqs stored at contiguous offsets, usually a
/// whole client batch; 256 runs cover every retry window a client can have in flight.
pub const RECENT_RUNS_MAX: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Run {
    seq_start: u64,
    offset_start: u64,
    len: u64,
}

/// One producer's dedup state.
#[derive(Debug, Clone, Default)]
pub struct ProducerDedup {
    seqs: RangeSet,
    recent: VecDeque<Run>,
    /// The latest publish time of its messages (origin's clock, ms); 0 while unknown (a
    /// snapshot older than version 3), until the first idle check starts counting.
    last_ms: u64,
}

impl ProducerDedup {
    /// Records that seqs `seq_start..seq_start + len` are stored at offsets
    /// `offset_start..offset_start + len`.
    fn record_run(&mut self, seq_start: u64, offset_start: u64, len: u64, runs_max: usize) {
        self.seqs.insert_range(seq_start..seq_start + len);
        if let Some(last) = self.recent.back_mut()
            && last.seq_start + last.len == seq_start
            && last.offset_start + last.len == offset_start
        {
            last.len += len;
            return;
        }
        if self.recent.len() >= runs_max {
            self.recent.pop_front();
        }
        self.recent.push_back(Run { seq_start, offset_start, len });
    }

    fn offset_of(&self, seq: u64) -> Option<u64> {
        self.recent
            .iter()
            .rev()
            .find(|r| seq >= r.seq_start && seq < r.seq_start + r.len)
            .map(|r| r.offset_start + (seq - r.seq_start))
    }

    /// The sequence numbers held.
    pub fn seqs(&self) -> &RangeSet {
        &self.seqs
    }
}

/// A producer session's id space: the producer and its epoch (0: caller-chosen seqs).
pub type ProducerKey = (ProducerId, u64);

/// The dedup state of one topic.
#[derive(Debug, Clone)]
pub struct DedupIndex {
    producers: BTreeMap<ProducerKey, ProducerDedup>,
    /// Sessions dropped after the dedup horizon, with the highest seq they held: an id at
    /// or below it is expired, neither new nor comparable.
    dropped: BTreeMap<ProducerKey, u64>,
    /// Runs remembered per producer session.
    runs_max: usize,
}

impl Default for DedupIndex {
    /// An index that remembers the offsets of [`RECENT_RUNS_MAX`] runs per session.
    fn default() -> Self {
        DedupIndex { producers: BTreeMap::new(), dropped: BTreeMap::new(), runs_max: RECENT_RUNS_MAX }
    }
}

/// A durable image of a topic's dedup sets, valid for log offsets below `through_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupSnapshot {
    /// Format version of this record.
    pub version: u8,
    /// The snapshot covers every message at an offset below this.
    pub through_offset: u64,
    /// Per (producer, epoch): the seqs held and the latest publish time.
    pub producers: Vec<(ProducerId, u64, RangeSet, u64)>,
    /// Sessions dropped after the dedup horizon, with their highest seq.
    pub dropped: Vec<(ProducerId, u64, u64)>,
}

/// Version 2 of the record (ids with epochs, no idle times or dropped sessions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DedupSnapshotV2 {
    version: u8,
    through_offset: u64,
    producers: Vec<(ProducerId, u64, RangeSet)>,
}

/// Version 1 of the record (wave 1): producers without epochs, read as epoch 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DedupSnapshotV1 {
    version: u8,
    through_offset: u64,
    producers: Vec<(ProducerId, RangeSet)>,
}

/// Current version of [`DedupSnapshot`].
pub const DEDUP_SNAPSHOT_VERSION: u8 = 3;

impl DedupSnapshot {
    /// Decodes a stored snapshot of any version this build reads (1 to 3); sessions of
    /// versions 1 and 2 have no known publish time yet. `Err` names the version or the
    /// decoding problem.
    pub fn decode(bytes: &[u8]) -> Result<DedupSnapshot, String> {
        let older = |through_offset, producers: Vec<(ProducerId, u64, RangeSet)>| DedupSnapshot {
            version: DEDUP_SNAPSHOT_VERSION,
            through_offset,
            producers: producers.into_iter().map(|(p, e, seqs)| (p, e, seqs, 0)).collect(),
            dropped: Vec::new(),
        };
        match bytes.first() {
            Some(1) => {
                let v1: DedupSnapshotV1 = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
                Ok(older(v1.through_offset, v1.producers.into_iter().map(|(p, seqs)| (p, 0, seqs)).collect()))
            }
            Some(2) => {
                let v2: DedupSnapshotV2 = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
                Ok(older(v2.through_offset, v2.producers))
            }
            Some(&DEDUP_SNAPSHOT_VERSION) => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
            Some(v) => Err(format!("dedup snapshot version {v} is not supported (this build reads 1 to 3)")),
            None => Err("empty dedup snapshot".into()),
        }
    }
}

impl DedupIndex {
    /// An index that remembers the offset of every run recorded in it: for the messages of
    /// one write group, whose offsets must all be known until the group is published.
    pub fn unbounded() -> Self {
        DedupIndex { producers: BTreeMap::new(), dropped: BTreeMap::new(), runs_max: usize::MAX }
    }

    /// True when the message is already held.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.get(&id.producer, id.epoch).is_some_and(|p| p.seqs.contains(id.seq))
    }

    fn get(&self, producer: &ProducerId, epoch: u64) -> Option<&ProducerDedup> {
        // A borrowed key: the map's keys are (ProducerId, u64) and `ProducerId` clones are
        // an `Arc` increment, so cloning for the lookup costs no allocation.
        self.producers.get(&(producer.clone(), epoch))
    }

    /// The offset a held message was stored at, if it is recent enough to be remembered.
    pub fn offset_of(&self, id: &MessageId) -> Option<u64> {
        self.get(&id.producer, id.epoch).and_then(|p| p.offset_of(id.seq))
    }

    /// Records that `m` is stored at `offset`.
    pub fn record(&mut self, m: &Message, offset: u64) {
        self.record_run(&m.id.producer, m.id.epoch, m.id.seq, offset, 1, m.publish_time_ms);
    }

    /// Records a run of seqs from one producer session stored at consecutive offsets, the
    /// latest published at `publish_ms`. The caller guarantees `seq_start + len` does not
    /// overflow.
    pub fn record_run(
        &mut self,
        producer: &ProducerId,
        epoch: u64,
        seq_start: u64,
        offset_start: u64,
        len: u64,
        publish_ms: u64,
    ) {
        let entry = self.producers.entry((producer.clone(), epoch)).or_default();
        entry.record_run(seq_start, offset_start, len, self.runs_max);
        entry.last_ms = entry.last_ms.max(publish_ms);
    }

    /// True when `id` belongs to a session dropped after the dedup horizon and is at or
    /// below its highest seq: it may have been stored and deleted since, so it can be
    /// neither stored nor compared.
    pub fn expired(&self, id: &MessageId) -> bool {
        self.any_expired(&id.producer, id.epoch, &(id.seq..id.seq + 1))
    }

    /// True when any seq of `seqs` from `producer` in `epoch` is expired.
    pub fn any_expired(&self, producer: &ProducerId, epoch: u64, seqs: &std::ops::Range<u64>) -> bool {
        self.dropped.get(&(producer.clone(), epoch)).is_some_and(|&highest| seqs.start <= highest)
    }

    /// Drops the sessions with no message published in the `horizon_ms` before `now_ms`,
    /// keeping each one's highest seq; returns how many were dropped. A session whose
    /// publish time is unknown (from an older snapshot) starts counting now.
    pub fn drop_idle(&mut self, now_ms: u64, horizon_ms: u64) -> usize {
        let mut idle = Vec::new();
        for (key, p) in self.producers.iter_mut() {
            if p.last_ms == 0 {
                p.last_ms = now_ms;
            } else if now_ms.saturating_sub(p.last_ms) > horizon_ms {
                idle.push(key.clone());
            }
        }
        for key in &idle {
            if let Some(p) = self.producers.remove(key)
                && let Some(last) = p.seqs.iter().next_back()
            {
                let highest = self.dropped.entry(key.clone()).or_insert(0);
                *highest = (*highest).max(last.end - 1);
            }
        }
        idle.len()
    }

    /// Sessions dropped after the dedup horizon (their highest seqs are kept).
    pub fn dropped_count(&self) -> usize {
        self.dropped.len()
    }

    /// True when any seq of `seqs` from `producer` in `epoch` is held.
    pub fn intersects(&self, producer: &ProducerId, epoch: u64, seqs: &std::ops::Range<u64>) -> bool {
        self.get(producer, epoch).is_some_and(|p| p.seqs.intersects(seqs))
    }

    /// Adds everything `other` holds (exact sets; remembered offsets as far as the window
    /// allows).
    pub fn merge(&mut self, other: DedupIndex) {
        for (producer, theirs) in other.producers {
            let ours = self.producers.entry(producer).or_default();
            ours.seqs.union(&theirs.seqs);
            ours.last_ms = ours.last_ms.max(theirs.last_ms);
            for run in theirs.recent {
                ours.record_run(run.seq_start, run.offset_start, run.len, self.runs_max);
            }
        }
    }

    /// One past the highest seq held for `producer` in `epoch` (0 when none is).
    pub fn next_seq(&self, producer: &ProducerId, epoch: u64) -> u64 {
        self.get(producer, epoch).and_then(|p| p.seqs.iter().next_back()).map_or(0, |r| r.end)
    }

    /// The seqs held, per (producer, epoch).
    pub fn seq_sets(&self) -> impl Iterator<Item = (&ProducerKey, &RangeSet)> {
        self.producers.iter().map(|(p, d)| (p, &d.seqs))
    }

    /// Number of producers tracked.
    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }

    /// Total number of ranges over all producers (the size of the state).
    pub fn range_count(&self) -> usize {
        self.producers.values().map(|p| p.seqs.range_count()).sum()
    }

    /// A durable image covering offsets below `through_offset`.
    pub fn snapshot(&self, through_offset: u64) -> DedupSnapshot {
        DedupSnapshot {
            version: DEDUP_SNAPSHOT_VERSION,
            through_offset,
            producers: self.producers.iter().map(|((p, e), d)| (p.clone(), *e, d.seqs.clone(), d.last_ms)).collect(),
            dropped: self.dropped.iter().map(|((p, e), highest)| (p.clone(), *e, *highest)).collect(),
        }
    }

    /// Rebuilds the index from a snapshot (without remembered offsets).
    pub fn from_snapshot(snapshot: DedupSnapshot) -> Self {
        let producers = snapshot
            .producers
            .into_iter()
            .map(|(p, e, seqs, last_ms)| ((p, e), ProducerDedup { seqs, recent: VecDeque::new(), last_ms }))
            .collect();
        let dropped = snapshot.dropped.into_iter().map(|(p, e, highest)| ((p, e), highest)).collect();
        DedupIndex { producers, dropped, runs_max: RECENT_RUNS_MAX }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str, seq: u64) -> MessageId {
        MessageId::chosen(p, seq)
    }

    /// A message under `id`, published at time 0.
    fn at(id: MessageId) -> Message {
        Message { id, origin: "n".into(), publish_time_ms: 0, key: None, headers: Vec::new(), payload: Vec::new() }
    }

    #[test]
    fn remembers_offsets_of_recent_runs() {
        let mut d = DedupIndex::default();
        for s in 0..100 {
            d.record(&at(id("a", s)), 1000 + s);
        }
        d.record(&at(id("b", 0)), 1100);
        for s in 100..110 {
            d.record(&at(id("a", s)), 1101 + (s - 100));
        }
        assert!(d.contains(&id("a", 50)) && !d.contains(&id("a", 110)) && !d.contains(&id("c", 0)));
        assert_eq!(d.offset_of(&id("a", 50)), Some(1050));
        assert_eq!(d.offset_of(&id("a", 105)), Some(1106));
        assert_eq!(d.offset_of(&id("b", 0)), Some(1100));
        assert_eq!(d.range_count(), 2);
    }

    #[test]
    fn merge_keeps_exact_sets_beyond_the_offset_window() {
        let mut pending = DedupIndex::default();
        // More single-message runs than the offset window holds.
        for s in 0..(RECENT_RUNS_MAX as u64 * 2) {
            pending.record(&at(id("a", s * 2)), s * 10);
        }
        let mut d = DedupIndex::default();
        d.record_run(&ProducerId("a".into()), 0, 1, 0, 1, 0);
        d.merge(pending);
        for s in 0..(RECENT_RUNS_MAX as u64 * 2) {
            assert!(d.contains(&id("a", s * 2)), "seq {}", s * 2);
        }
        assert!(d.contains(&id("a", 1)) && !d.contains(&id("a", 3)));
        let a = ProducerId("a".into());
        assert!(d.intersects(&a, 0, &(3..5)) && !d.intersects(&a, 0, &(3..4)) && !d.intersects(&a, 7, &(3..5)));
    }

    #[test]
    fn after_failover_older_seqs_are_still_accepted() {
        // A high-water mark would wrongly reject seq 5 once seq 10 is held.
        let mut d = DedupIndex::default();
        d.record(&at(id("a", 10)), 0);
        assert!(!d.contains(&id("a", 5)));
    }

    #[test]
    fn snapshot_round_trip_keeps_sets_and_drops_offsets() {
        let mut d = DedupIndex::default();
        d.record(&at(id("a", 1)), 7);
        d.record(&at(id("a", 3)), 8);
        let snap = d.snapshot(9);
        let bytes = postcard::to_stdvec(&snap).unwrap();
        let back = DedupSnapshot::decode(&bytes).unwrap();
        assert_eq!(back, snap);
        let r = DedupIndex::from_snapshot(back);
        assert!(r.contains(&id("a", 1)) && r.contains(&id("a", 3)) && !r.contains(&id("a", 2)));
        assert_eq!(r.offset_of(&id("a", 1)), None);
    }

    #[test]
    fn epochs_of_one_producer_are_separate_id_spaces() {
        let mut d = DedupIndex::default();
        d.record(&at(id("a", 5)), 0);
        let other = MessageId { epoch: 42, ..id("a", 5) };
        assert!(!d.contains(&other), "seq 5 of epoch 42 is another message");
        d.record(&at(other.clone()), 1);
        assert_eq!((d.next_seq(&ProducerId("a".into()), 0), d.next_seq(&ProducerId("a".into()), 42)), (6, 6));
        assert_eq!(d.producer_count(), 2);
    }

    #[test]
    fn a_wave_1_snapshot_reads_as_epoch_0_and_unknown_versions_are_named() {
        let v1 = DedupSnapshotV1 {
            version: 1,
            through_offset: 9,
            producers: vec![(ProducerId("a".into()), {
                let mut seqs = RangeSet::new();
                seqs.insert_range(1..4);
                seqs
            })],
        };
        let snap = DedupSnapshot::decode(&postcard::to_stdvec(&v1).unwrap()).unwrap();
        assert_eq!(snap.through_offset, 9);
        let r = DedupIndex::from_snapshot(snap);
        assert!(r.contains(&id("a", 2)) && !r.contains(&MessageId { epoch: 1, ..id("a", 2) }));
        assert!(DedupSnapshot::decode(&[7, 0]).unwrap_err().contains("version 7"));
    }

    #[test]
    fn sessions_idle_past_the_horizon_are_dropped_keeping_their_highest_seq() {
        let mut d = DedupIndex::default();
        let published = |seq, ms| Message { publish_time_ms: ms, ..at(id("old", seq)) };
        d.record(&published(3, 1_000), 0);
        d.record(&published(9, 2_000), 1);
        d.record(&Message { publish_time_ms: 50_000, ..at(id("busy", 1)) }, 2);
        // A session from a version 2 snapshot has no publish time: it starts counting now.
        let mut v2 = d.snapshot(3);
        v2.producers.push((ProducerId("unknown".into()), 0, RangeSet::new(), 0));
        let mut d = DedupIndex::from_snapshot(v2);
        assert_eq!(d.drop_idle(60_000, 30_000), 1, "only 'old' was idle for longer than the horizon");
        assert!(d.expired(&id("old", 9)) && d.expired(&id("old", 1)) && !d.expired(&id("old", 10)));
        assert!(!d.contains(&id("old", 3)) && d.contains(&id("busy", 1)));
        assert!(
            d.any_expired(&ProducerId("old".into()), 0, &(9..20))
                && !d.any_expired(&ProducerId("old".into()), 0, &(10..20))
        );
        assert_eq!(d.drop_idle(80_000, 30_000), 0, "'unknown' counts from 60 s");
        let back =
            DedupIndex::from_snapshot(DedupSnapshot::decode(&postcard::to_stdvec(&d.snapshot(3)).unwrap()).unwrap());
        assert!(back.expired(&id("old", 9)) && back.contains(&id("busy", 1)));
        assert_eq!((back.dropped_count(), back.producer_count()), (1, 2));
    }

    #[test]
    fn a_version_2_snapshot_reads_with_unknown_publish_times() {
        let mut seqs = RangeSet::new();
        seqs.insert_range(0..5);
        let v2 = DedupSnapshotV2 { version: 2, through_offset: 5, producers: vec![(ProducerId("a".into()), 7, seqs)] };
        let snap = DedupSnapshot::decode(&postcard::to_stdvec(&v2).unwrap()).unwrap();
        assert_eq!(snap.producers[0].3, 0);
        assert!(DedupIndex::from_snapshot(snap).contains(&MessageId { epoch: 7, ..id("a", 4) }));
    }
}

//! Progress records (DESIGN section 8, "who processes an input"): after each batch, the
//! node that processed it writes the ids of the inputs it processed (outputs written or
//! dead-lettered) to the function's progress topic, `fn.NAME.progress`, which replicates
//! like any topic. A node that becomes the owner of inputs when the function's nodes
//! change reads every record there and processes only the inputs none covers. Its own
//! records count only below its committed cursor: a record is written with the batch's
//! outputs, before the cursor (and an aggregate's states) are committed, so above the
//! cursor it may name a batch whose commit a crash lost, and that batch must run again.
//!
//! Records are increments (the ids processed since the last record, as range sets per
//! producer session), at most one a second and one when the node is caught up, so a
//! record costs the size of its sessions, not of all history, and the sync of the
//! progress topic is paid once a second, not once a batch; a reader unions them all. A
//! crash loses at most the last second's record, which costs re-running those inputs
//! after a takeover (under the same derived ids). Each record's id is `($fn/NAME.INC/T.p/NODE, E, n)`: `T.p` cannot be an
//! output's `T.K` (K is decimal), E is drawn when the node starts the function and n
//! counts records from 0, so a record written again after a crash is a new record, never
//! a conflicting one. Losing a record (retention) costs only work: the inputs it covered
//! are processed again, and their outputs carry the same derived ids.
use std::collections::BTreeMap;

use rill_storage::{MessageId, ProducerId, rangeset::RangeSet};
use serde::{Deserialize, Serialize};

/// Input ids, as range sets of seqs per (producer, epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Covered(BTreeMap<(ProducerId, u64), RangeSet>);

impl Covered {
    /// Adds an id.
    pub(crate) fn insert(&mut self, id: &MessageId) {
        self.0.entry((id.producer.clone(), id.epoch)).or_default().insert(id.seq);
    }

    /// True when `id` is covered.
    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.0.get(&(id.producer.clone(), id.epoch)).is_some_and(|s| s.contains(id.seq))
    }

    /// True when nothing is covered.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every id `other` covers.
    pub(crate) fn extend(&mut self, other: &Covered) {
        for (session, seqs) in &other.0 {
            self.0.entry(session.clone()).or_default().union(seqs);
        }
    }
}

/// One progress record: the inputs of input topic number `input` that a node processed
/// in one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The function's incarnation (a re-created function starts afresh).
    pub(crate) incarnation: u64,
    /// The node that processed them.
    pub(crate) node: String,
    /// The function's input topic, by index.
    pub(crate) input: u32,
    /// The ids processed.
    pub(crate) processed: Covered,
}

impl Record {
    /// The record's payload.
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// A record from a payload; an error says why it is not one.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Record, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("not a progress record: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str, epoch: u64, seq: u64) -> MessageId {
        MessageId { producer: ProducerId(p.into()), epoch, seq }
    }

    #[test]
    fn records_round_trip_and_union() {
        let mut a = Covered::default();
        for seq in 0..100 {
            a.insert(&id("dev", 0, seq));
        }
        a.insert(&id("dev", 1, 7));
        let record = Record { incarnation: 7, node: "edge-1".into(), input: 1, processed: a.clone() };
        let bytes = record.encode();
        assert!(bytes.len() < 50, "a run of seqs is one range: {} bytes", bytes.len());
        assert_eq!(Record::decode(&bytes), Ok(record));
        assert!(Record::decode(b"\xff\xff").is_err());
        let mut b = Covered::default();
        b.insert(&id("dev", 0, 150));
        b.extend(&a);
        assert!(b.contains(&id("dev", 0, 99)) && b.contains(&id("dev", 0, 150)) && b.contains(&id("dev", 1, 7)));
        assert!(!b.contains(&id("dev", 0, 100)) && !b.contains(&id("dev", 2, 7)) && !b.contains(&id("x", 0, 0)));
    }
}

//! The peer protocol's messages: what travels on a peer link, and nothing else. Its
//! version is the peer ALPN (`rill-peer/2` since the Hello carries a boot id and a
//! [`Summary`]); a node of another version fails the handshake with "no application
//! protocol" instead of misreading frames.
use std::collections::BTreeSet;

use rill_storage::{MessageId, ProducerId, TopicName, dedup::DedupIndex, rangeset::RangeSet};
use serde::{Deserialize, Serialize};

use crate::namespace::ConfigDoc;

/// What a node durably holds of one topic: per (producer, epoch), the seqs it has synced. Built
/// only from synced data (the dedup index that group commit fills after each fdatasync),
/// so a peer that skips what a summary lists never skips a message the sender could still
/// lose. It has no offsets: offsets are local to each node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Seqs held per (producer, epoch).
    pub producers: Vec<(ProducerId, u64, RangeSet)>,
}

impl Summary {
    /// The summary of a topic's synced dedup index.
    pub fn of(index: &DedupIndex) -> Summary {
        Summary { producers: index.seq_sets().map(|((p, e), seqs)| (p.clone(), *e, seqs.clone())).collect() }
    }

    /// True when it lists `id`.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.producers.iter().any(|(p, e, seqs)| *p == id.producer && *e == id.epoch && seqs.contains(id.seq))
    }

    /// The summary as a dedup index (with no remembered offsets), to merge into what a lane
    /// knows the peer holds.
    pub fn into_index(self) -> DedupIndex {
        let mut index = DedupIndex::default();
        for (producer, epoch, seqs) in self.producers {
            for run in seqs.iter() {
                index.record_run(&producer, epoch, run.start, 0, run.end - run.start);
            }
        }
        index
    }
}

/// Messages between peers (the replication part of the peer protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First message on a link, exactly once per link: the sender's boot, its catalogue,
    /// what it holds per topic, and the peers it has live links to (so relays know which
    /// nodes it serves directly).
    Hello {
        /// Drawn at random each time the sender starts: a new boot on a second link means
        /// the sender restarted and its older link is dead.
        boot: u64,
        /// The sender's namespace catalogue.
        config: ConfigDoc,
        /// What it durably holds, per topic.
        holds: Vec<(TopicName, Summary)>,
        /// The peers the sender has live links to.
        links: BTreeSet<String>,
    },
    /// The sender's set of live links changed.
    Links(BTreeSet<String>),
    /// Namespaces that changed (a delta of the catalogue).
    Config(ConfigDoc),
    /// Messages of one topic, in the sender's log order.
    Batch {
        /// The topic.
        topic: TopicName,
        /// Batch number on this lane (acks name it).
        batch: u64,
        /// The messages.
        messages: Vec<rill_storage::Message>,
    },
    /// The receiver stored a batch durably.
    Ack {
        /// The topic.
        topic: TopicName,
        /// The batch number.
        batch: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_round_trips_through_a_dedup_index() {
        let mut index = DedupIndex::default();
        let p = ProducerId("p".into());
        index.record_run(&p, 0, 0, 100, 10);
        index.record_run(&p, 0, 20, 110, 5);
        index.record_run(&p, 9, 0, 200, 1);
        let summary = Summary::of(&index);
        assert!(summary.contains(&MessageId { producer: p.clone(), epoch: 0, seq: 9 }));
        assert!(!summary.contains(&MessageId { producer: p.clone(), epoch: 0, seq: 10 }));
        assert!(summary.contains(&MessageId { producer: p.clone(), epoch: 9, seq: 0 }));
        assert!(!summary.contains(&MessageId { producer: p.clone(), epoch: 9, seq: 1 }));
        let back = summary.clone().into_index();
        assert_eq!(Summary::of(&back), summary);
    }
}

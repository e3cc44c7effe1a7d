//! The peer protocol's messages: what travels on a peer link, and nothing else. Its
//! version is the peer ALPN (`rill-peer/5` since blobs travel; 4 carried signed entries,
//! 3 the dedup horizon, 2 gave the Hello a boot id and a [`Summary`]); a node of another
//! version fails the handshake with "no application protocol" instead of misreading
//! frames.
use std::collections::BTreeSet;

use rill_storage::{MessageId, NodeName, ProducerId, TopicName, blobs::Hash, dedup::DedupIndex, rangeset::RangeSet};
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
                index.record_run(&producer, epoch, run.start, 0, run.end - run.start, 0);
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
        links: BTreeSet<NodeName>,
        /// The blobs the sender holds whole.
        blobs: Vec<Hash>,
    },
    /// The sender's set of live links changed.
    Links(BTreeSet<NodeName>),
    /// Namespaces that changed (a delta of the catalogue).
    Config(ConfigDoc),
    /// Messages of one topic, in the sender's log order.
    Batch {
        /// The topic.
        topic: TopicName,
        /// Batch number on this lane (acks name it).
        batch: u64,
        /// The messages, encoded as the log's batch bodies are: each (producer, epoch) and
        /// origin once per batch, so a message costs its seq, time, key, headers and
        /// payload, not its producer name and a 64-bit epoch again.
        #[serde(with = "rill_storage::format::batch")]
        messages: Vec<rill_storage::Message>,
    },
    /// The receiver stored a batch durably.
    Ack {
        /// The topic.
        topic: TopicName,
        /// The batch number.
        batch: u64,
    },
    /// The sender now holds these blobs too.
    Blobs(Vec<Hash>),
    /// Send the bytes `offset..offset + len` of a blob, as chunks in order.
    BlobWant {
        /// The blob.
        hash: Hash,
        /// The first byte wanted.
        offset: u64,
        /// How many (the sender may send fewer: the window limit, the blob's end).
        len: u64,
    },
    /// Bytes of a blob, on the link's blob stream.
    BlobChunk {
        /// The blob.
        hash: Hash,
        /// Where these bytes start.
        offset: u64,
        /// The blob's whole length.
        total: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The sender does not hold this blob, or may not send it to this peer.
    BlobMissing {
        /// The blob.
        hash: Hash,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_round_trips_through_a_dedup_index() {
        let mut index = DedupIndex::default();
        let p = ProducerId("p".into());
        index.record_run(&p, 0, 0, 100, 10, 0);
        index.record_run(&p, 0, 20, 110, 5, 0);
        index.record_run(&p, 9, 0, 200, 1, 0);
        let summary = Summary::of(&index);
        assert!(summary.contains(&MessageId { producer: p.clone(), epoch: 0, seq: 9 }));
        assert!(!summary.contains(&MessageId { producer: p.clone(), epoch: 0, seq: 10 }));
        assert!(summary.contains(&MessageId { producer: p.clone(), epoch: 9, seq: 0 }));
        assert!(!summary.contains(&MessageId { producer: p.clone(), epoch: 9, seq: 1 }));
        let back = summary.clone().into_index();
        assert_eq!(Summary::of(&back), summary);
    }

    fn message(producer: &str, epoch: u64, seq: u64, origin: &str) -> rill_storage::Message {
        rill_storage::Message {
            id: MessageId { producer: ProducerId(producer.into()), epoch, seq },
            origin: origin.into(),
            publish_time_ms: 1_700_000_000_000 + seq,
            key: seq.is_multiple_of(2).then(|| b"k".to_vec()),
            headers: vec![("h".into(), b"v".to_vec())],
            payload: vec![7; 256],
        }
    }

    #[test]
    fn a_batch_round_trips_and_names_each_producer_once() {
        let topic = TopicName::parse("t/n/x").unwrap();
        let messages: Vec<_> = (0..100)
            .map(|i| message("sensor-with-a-long-name", if i < 50 { u64::MAX - 1 } else { 0 }, i, "edge-1"))
            .collect();
        let batch = PeerMessage::Batch { topic, batch: 3, messages: messages.clone() };
        let bytes = postcard::to_stdvec(&batch).unwrap();
        assert_eq!(postcard::from_bytes::<PeerMessage>(&bytes).unwrap(), batch);
        // Per message: the payload and a few bytes of seq, time, key and headers; the
        // producer name and epoch appear once per batch, not per message.
        let overhead = bytes.len() - 100 * 256;
        assert!(overhead < 100 * 20, "{overhead} bytes beyond the payloads");
    }

    #[test]
    fn a_batch_naming_a_missing_producer_is_refused() {
        /// A record as the wire lays it out: producer, seq, origin, time, key, headers, payload.
        type RawRecord = (u32, u32, u64, u64, Option<Vec<u8>>, Vec<(String, Vec<u8>)>, Vec<u8>);
        #[derive(serde::Serialize)]
        struct Bad {
            producers: Vec<(ProducerId, u64)>,
            origins: Vec<std::sync::Arc<str>>,
            records: Vec<RawRecord>,
        }
        let encode = |producer: u32| {
            let topic = TopicName::parse("t/n/x").unwrap();
            let mut bytes = postcard::to_stdvec(&(3u32, topic, 1u64)).unwrap();
            let record = (producer, 1, 0, 1, None, vec![], vec![]);
            let bad =
                Bad { producers: vec![(ProducerId("p".into()), 0)], origins: vec!["a".into()], records: vec![record] };
            bytes.extend(postcard::to_stdvec(&bad).unwrap());
            bytes
        };
        assert!(postcard::from_bytes::<PeerMessage>(&encode(0)).is_ok(), "the hand-made batch is well formed");
        let bytes = encode(5);
        assert!(postcard::from_bytes::<PeerMessage>(&bytes).is_err(), "an index past the table is refused");
    }
}

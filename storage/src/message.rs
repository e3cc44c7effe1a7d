//! Messages as producers send them and as the log stores them.
use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

/// Longest producer id, in bytes. Ids are stored once per batch, but a bound keeps a
/// hostile client from making every batch header huge.
pub const PRODUCER_ID_BYTES_MAX: usize = 256;

/// A globally unique producer: the client's stable producer name, or a random 128-bit id
/// (as 32 hex digits) when it gives none. Shared (`Arc`) because every message of a batch
/// carries it: cloning it costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProducerId(pub Arc<str>);

impl ProducerId {
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProducerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dedup ID of a message: (producer, epoch, sequence number). Epoch 0 is for
/// sequence numbers the producer chooses (it guarantees that (producer, seq) names one
/// message forever); any other epoch is one producer session's, drawn at random by the
/// node that opened it, with seqs counted from 0. See ARCHITECTURE.md for why two
/// different messages never share an id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId {
    /// Who produced it.
    pub producer: ProducerId,
    /// 0 for caller-chosen seqs, else the producer session's epoch.
    pub epoch: u64,
    /// The producer's sequence number for it.
    pub seq: u64,
}

impl MessageId {
    /// An id with a caller-chosen seq (epoch 0).
    pub fn chosen(producer: impl Into<Arc<str>>, seq: u64) -> MessageId {
        MessageId { producer: ProducerId(producer.into()), epoch: 0, seq }
    }
}

impl fmt::Display for MessageId {
    /// `producer:seq` for caller-chosen seqs, `producer@epoch:seq` (epoch in hex) else.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.epoch {
            0 => write!(f, "{}:{}", self.producer, self.seq),
            e => write!(f, "{}@{e:x}:{}", self.producer, self.seq),
        }
    }
}

/// One message, as accepted by a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The dedup ID.
    pub id: MessageId,
    /// The node that first accepted it (shared: every message of a batch carries it).
    pub origin: Arc<str>,
    /// When the origin accepted it, in milliseconds since the Unix epoch (origin's clock).
    pub publish_time_ms: u64,
    /// Optional routing key.
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// Application headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Message {
    /// Bytes this message contributes to size limits: payload, key and headers.
    pub fn size_bytes(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    /// A 64-bit digest of what the producer wrote: key, headers and payload (XXH3). Each
    /// field is hashed on its own and folded into the seed of the next, so moving bytes
    /// between fields changes it, and a message without key or headers costs one one-shot
    /// hash of its payload. The id, the origin and the publish time are left out: a resend
    /// through another node changes the last two and is still the same message. Two
    /// messages under one id with different digests are a conflict (DESIGN section 2).
    pub fn content_digest(&self) -> u64 {
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        let mut seed = match &self.key {
            None => 0x6e6f_5f6b_6579,
            Some(k) => xxh3_64_with_seed(k, 1),
        };
        for (name, value) in &self.headers {
            seed = xxh3_64_with_seed(value, xxh3_64_with_seed(name.as_bytes(), seed));
        }
        xxh3_64_with_seed(&self.payload, seed)
    }
}

/// A message with the local offset this node's log gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Offset in this node's log of the topic (offsets are local to a node).
    pub offset: u64,
    /// The message.
    pub message: Message,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: Option<&[u8]>, headers: &[(&str, &[u8])], payload: &[u8]) -> Message {
        Message {
            id: MessageId::chosen("p", 1),
            origin: "a".into(),
            publish_time_ms: 1,
            key: key.map(<[u8]>::to_vec),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn the_digest_covers_what_the_producer_wrote_and_nothing_else() {
        let base = message(Some(b"k"), &[("h", b"v")], b"payload");
        let moved = Message { origin: "b".into(), publish_time_ms: 99, ..base.clone() };
        assert_eq!(base.content_digest(), moved.content_digest(), "origin and publish time are left out");
        let others = [
            message(None, &[("h", b"v")], b"payload"),
            message(Some(b""), &[("h", b"v")], b"payload"),
            message(Some(b"k"), &[], b"payload"),
            message(Some(b"k"), &[("h", b"")], b"vpayload"),
            message(Some(b"k"), &[("hv", b"")], b"payload"),
            message(Some(b"k"), &[("h", b"v")], b"payloaD"),
        ];
        for other in others {
            assert_ne!(base.content_digest(), other.content_digest(), "{other:?}");
        }
    }
}

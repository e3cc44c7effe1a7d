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

/// The dedup ID of a message: (producer, sequence number).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId {
    /// Who produced it.
    pub producer: ProducerId,
    /// The producer's sequence number for it.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.producer, self.seq)
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
}

/// A message with the local offset this node's log gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Offset in this node's log of the topic (offsets are local to a node).
    pub offset: u64,
    /// The message.
    pub message: Message,
}

//! The on-disk format of a log segment: a sequence of frames, one per record batch.
//!
//! ```text
//! frame  := magic u32 LE | body_len u32 LE | crc32c(body) u32 LE | body
//! body   := version u8 | base_offset u64 LE | count u32 LE | postcard(BatchBody)
//! ```
//!
//! The fixed-width fields at the start of the body let recovery and the sparse index read
//! a frame's offsets without decoding it. Producers (name and epoch) and origins are
//! stored once per batch and referenced by index from each record. A frame with an unknown
//! version is rejected with a clear error, never skipped.
//!
//! Versions: 1 stored producer names only (wave 1, before epochs); its messages read as
//! epoch 0, the caller-chosen id space, which is what a wave-1 (producer, seq) was. 2 adds
//! the epoch to each producer entry. This build writes 2 and reads both.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::message::{Message, MessageId, ProducerId, StoredMessage};

/// Marks the start of a frame ("RLB1"); lets recovery tell a torn tail from live data.
pub const FRAME_MAGIC: u32 = 0x3142_4C52;
/// The body format version this build writes.
pub const FORMAT_VERSION: u8 = 2;
/// The oldest body format version this build reads.
pub const FORMAT_VERSION_MIN: u8 = 1;
/// Bytes of the frame header (magic, length, checksum).
pub const FRAME_HEADER_BYTES: usize = 12;
/// Bytes of the fixed part of the body (version, base offset, count).
pub const BODY_PREFIX_BYTES: usize = 13;
/// Largest frame body rill writes or reads; checked before allocating. One batch of
/// maximal messages (see the node's `message_bytes_max`) must fit.
pub const FRAME_BODY_BYTES_MAX: u32 = 64 << 20;

/// A batch as written: borrows the messages. Byte fields are serialized as postcard
/// byte strings (length + raw bytes), the same encoding [`BatchBody`] reads.
#[derive(Serialize)]
struct BatchBodyRef<'a> {
    producers: Vec<(&'a str, u64)>,
    origins: Vec<&'a str>,
    records: RecordsRef<'a>,
}

/// The records of a batch, serialized straight from the messages (no intermediate copy).
struct RecordsRef<'a> {
    messages: &'a [&'a Message],
    /// (producer index, origin index) per message.
    tables: Vec<(u32, u32)>,
}

impl Serialize for RecordsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.messages.len()))?;
        for (m, &(producer, origin)) in self.messages.iter().zip(&self.tables) {
            seq.serialize_element(&RecordRef {
                producer,
                seq: m.id.seq,
                origin,
                publish_time_ms: m.publish_time_ms,
                key: m.key.as_deref(),
                headers: &m.headers,
                payload: &m.payload,
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct RecordRef<'a> {
    producer: u32,
    seq: u64,
    origin: u32,
    publish_time_ms: u64,
    #[serde(with = "serde_bytes")]
    key: Option<&'a [u8]>,
    headers: &'a [(String, Vec<u8>)],
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

/// A batch as read (version 2).
#[derive(Deserialize)]
struct BatchBody {
    producers: Vec<(ProducerId, u64)>,
    origins: Vec<Arc<str>>,
    records: Vec<Record>,
}

/// A batch of version 1: producers without epochs.
#[derive(Deserialize)]
struct BatchBodyV1 {
    producers: Vec<ProducerId>,
    origins: Vec<Arc<str>>,
    records: Vec<Record>,
}

#[derive(Deserialize)]
struct Record {
    producer: u32,
    seq: u64,
    origin: u32,
    publish_time_ms: u64,
    #[serde(with = "serde_bytes")]
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// Where in a table a value sits (`same` recognises it), adding it if new. Batches hold
/// few distinct values, so a linear search beats hashing.
fn intern<T>(table: &mut Vec<T>, value: T, same: impl Fn(&T) -> bool) -> u32 {
    let at = table.iter().rposition(same).unwrap_or_else(|| {
        table.push(value);
        table.len() - 1
    });
    u32::try_from(at).expect("a batch holds fewer than 2^32 messages")
}

/// Two table strings are the same; comparing pointers first means messages that share one
/// `Arc` (the usual case) never touch the string's bytes.
fn same_str(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

impl<'a> BatchBodyRef<'a> {
    /// The body of `messages`: each (producer, epoch) and origin once, records by index.
    fn of(messages: &'a [&'a Message]) -> Self {
        let (mut producers, mut origins) = (Vec::new(), Vec::new());
        let tables = messages
            .iter()
            .map(|m| {
                let (name, epoch) = (&*m.id.producer.0, m.id.epoch);
                let producer = intern(&mut producers, (name, epoch), |(v, e)| *e == epoch && same_str(v, name));
                let origin = intern(&mut origins, &*m.origin, |v| same_str(v, &m.origin));
                (producer, origin)
            })
            .collect();
        BatchBodyRef { producers, origins, records: RecordsRef { messages, tables } }
    }
}

impl BatchBody {
    /// A record as a message, its producer and origin looked up in the batch's tables.
    fn message(&self, r: Record) -> Result<Message, String> {
        let (producer, epoch) = self.producers.get(r.producer as usize).ok_or("record names a missing producer")?;
        let origin = self.origins.get(r.origin as usize).ok_or("record names a missing origin")?;
        Ok(Message {
            id: MessageId { producer: producer.clone(), epoch: *epoch, seq: r.seq },
            origin: Arc::clone(origin),
            publish_time_ms: r.publish_time_ms,
            key: r.key,
            headers: r.headers,
            payload: r.payload,
        })
    }
}

/// A batch of messages in the body encoding of format version 2, for other formats that
/// carry batches (the peer protocol's `Batch`): `#[serde(with = "rill_storage::format::batch")]`.
/// A record naming a producer or origin missing from its batch's tables is refused.
pub mod batch {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{BatchBody, BatchBodyRef};
    use crate::message::Message;

    /// Serializes `messages` as one batch body.
    pub fn serialize<S: Serializer>(messages: &[Message], s: S) -> Result<S::Ok, S::Error> {
        let refs: Vec<&Message> = messages.iter().collect();
        BatchBodyRef::of(&refs).serialize(s)
    }

    /// Deserializes a batch body into its messages.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Message>, D::Error> {
        let mut body = BatchBody::deserialize(d)?;
        let records = std::mem::take(&mut body.records);
        records.into_iter().map(|r| body.message(r).map_err(serde::de::Error::custom)).collect()
    }
}

/// Encodes `messages` as one frame whose first message gets `base_offset`, appending it to
/// `out`.
pub fn encode_frame(base_offset: u64, messages: &[&Message], out: &mut Vec<u8>) {
    let body = BatchBodyRef::of(messages);
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // length and checksum, filled in below
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&base_offset.to_le_bytes());
    let count = u32::try_from(messages.len()).expect("a batch holds fewer than 2^32 messages");
    out.extend_from_slice(&count.to_le_bytes());
    let encoded = postcard::to_extend(&body, std::mem::take(out)).expect("encoding into a Vec cannot fail");
    *out = encoded;
    let body_start = start + FRAME_HEADER_BYTES;
    let body_len = u32::try_from(out.len() - body_start).expect("frame body below 4 GiB");
    let crc = crc32c::crc32c(&out[body_start..]);
    out[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// A frame's header, read without its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Length of the body in bytes.
    pub body_len: u32,
    /// CRC32C of the body.
    pub crc: u32,
}

impl FrameHeader {
    /// Total bytes of the frame on disk.
    pub fn frame_bytes(&self) -> u64 {
        FRAME_HEADER_BYTES as u64 + u64::from(self.body_len)
    }
}

/// Parses a frame header. `Err` says why it is not a valid header.
pub fn parse_header(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, String> {
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4-byte slice"));
    if word(0) != FRAME_MAGIC {
        return Err(format!("bad frame magic {:#010x}", word(0)));
    }
    let body_len = word(4);
    if (body_len as usize) < BODY_PREFIX_BYTES || body_len > FRAME_BODY_BYTES_MAX {
        return Err(format!("frame body length {body_len} out of range"));
    }
    Ok(FrameHeader { body_len, crc: word(8) })
}

/// The fixed prefix of a body: version, first offset and message count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPrefix {
    /// The body's format version.
    pub version: u8,
    /// Offset of the first message.
    pub base_offset: u64,
    /// Number of messages.
    pub count: u32,
}

/// Parses the fixed prefix of a body, rejecting unknown versions.
pub fn parse_prefix(body: &[u8]) -> Result<BodyPrefix, String> {
    if body.len() < BODY_PREFIX_BYTES {
        return Err("frame body shorter than its fixed prefix".into());
    }
    let version = body[0];
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "frame format version {version} is not supported (this build reads versions \
             {FORMAT_VERSION_MIN} to {FORMAT_VERSION})"
        ));
    }
    let base_offset = u64::from_le_bytes(body[1..9].try_into().expect("8-byte slice"));
    let count = u32::from_le_bytes(body[9..13].try_into().expect("4-byte slice"));
    Ok(BodyPrefix { version, base_offset, count })
}

/// Checks a body against its header's checksum.
pub fn check_body(header: &FrameHeader, body: &[u8]) -> Result<(), String> {
    let crc = crc32c::crc32c(body);
    if crc != header.crc {
        return Err(format!("checksum mismatch (stored {:#010x}, computed {crc:#010x})", header.crc));
    }
    Ok(())
}

/// Decodes a checked body into its messages, keeping those with offset >= `from_offset`.
pub fn decode_body(body: &[u8], from_offset: u64, out: &mut Vec<StoredMessage>) -> Result<(), String> {
    let prefix = parse_prefix(body)?;
    let undecodable = |e: postcard::Error| format!("undecodable batch: {e}");
    let mut batch: BatchBody = match prefix.version {
        1 => {
            let v1: BatchBodyV1 = postcard::from_bytes(&body[BODY_PREFIX_BYTES..]).map_err(undecodable)?;
            let producers = v1.producers.into_iter().map(|p| (p, 0)).collect();
            BatchBody { producers, origins: v1.origins, records: v1.records }
        }
        _ => postcard::from_bytes(&body[BODY_PREFIX_BYTES..]).map_err(undecodable)?,
    };
    if batch.records.len() != prefix.count as usize {
        return Err(format!("batch says {} messages but holds {}", prefix.count, batch.records.len()));
    }
    let records = std::mem::take(&mut batch.records);
    for (i, r) in records.into_iter().enumerate() {
        let offset = prefix.base_offset + i as u64;
        if offset >= from_offset {
            out.push(StoredMessage { offset, message: batch.message(r)? });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn msg(producer: &str, seq: u64, payload: &[u8]) -> Message {
        Message {
            id: MessageId { producer: ProducerId(producer.into()), epoch: 0, seq },
            origin: "node-a".into(),
            publish_time_ms: 1_700_000_000_000u64.wrapping_add(seq),
            key: seq.is_multiple_of(2).then(|| b"k".to_vec()),
            headers: vec![("h".into(), b"v".to_vec())],
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn frame_round_trip() {
        let ms = [msg("p1", 7, b"hello"), msg("p2", 1, b""), msg("p1", 8, &[0xff; 300])];
        let refs: Vec<&Message> = ms.iter().collect();
        let mut buf = Vec::new();
        encode_frame(42, &refs, &mut buf);
        let header = parse_header(buf[..12].try_into().unwrap()).unwrap();
        assert_eq!(header.frame_bytes() as usize, buf.len());
        let body = &buf[12..];
        check_body(&header, body).unwrap();
        assert_eq!(parse_prefix(body).unwrap(), BodyPrefix { version: 2, base_offset: 42, count: 3 });
        let mut out = Vec::new();
        decode_body(body, 43, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].offset, 43);
        assert_eq!(out[0].message, ms[1]);
        assert_eq!(out[1].message, ms[2]);
    }

    #[test]
    fn flipped_bit_fails_the_checksum() {
        let m = msg("p", 1, b"payload");
        let mut buf = Vec::new();
        encode_frame(0, &[&m], &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let header = parse_header(buf[..12].try_into().unwrap()).unwrap();
        assert!(check_body(&header, &buf[12..]).unwrap_err().contains("checksum mismatch"));
    }

    #[test]
    fn unknown_version_is_rejected_by_name() {
        let m = msg("p", 1, b"x");
        let mut buf = Vec::new();
        encode_frame(0, &[&m], &mut buf);
        buf[12] = 9;
        let err = parse_prefix(&buf[12..]).unwrap_err();
        assert!(err.contains("version 9 is not supported"), "{err}");
    }

    #[test]
    fn header_rejects_bad_magic_and_lengths() {
        let mut h = [0u8; 12];
        assert!(parse_header(&h).unwrap_err().contains("magic"));
        h[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&h).unwrap_err().contains("out of range"));
    }

    /// A frame as wave 1 wrote it (format version 1, producers without epochs), built by
    /// hand here so the test does not depend on this build's encoder.
    fn v1_frame(base_offset: u64, ms: &[Message]) -> Vec<u8> {
        #[derive(Serialize)]
        struct BodyV1<'a> {
            producers: Vec<&'a str>,
            origins: Vec<&'a str>,
            records: Vec<RecordRef<'a>>,
        }
        let mut producers: Vec<&str> = Vec::new();
        let origins = vec!["node-a"];
        let records = ms
            .iter()
            .map(|m| RecordRef {
                producer: intern(&mut producers, &*m.id.producer.0, |v| same_str(v, &m.id.producer.0)),
                seq: m.id.seq,
                origin: 0,
                publish_time_ms: m.publish_time_ms,
                key: m.key.as_deref(),
                headers: &m.headers,
                payload: &m.payload,
            })
            .collect();
        let mut body = vec![1u8];
        body.extend_from_slice(&base_offset.to_le_bytes());
        body.extend_from_slice(&(ms.len() as u32).to_le_bytes());
        let body = postcard::to_extend(&BodyV1 { producers, origins, records }, body).unwrap();
        let mut out = FRAME_MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_wave_1_frame_reads_as_epoch_0_and_epochs_round_trip() {
        let old = [msg("p1", 7, b"a"), msg("p2", 1, b"b")];
        let frame = v1_frame(5, &old);
        let header = parse_header(frame[..12].try_into().unwrap()).unwrap();
        check_body(&header, &frame[12..]).unwrap();
        let mut out = Vec::new();
        decode_body(&frame[12..], 0, &mut out).unwrap();
        assert_eq!(out.iter().map(|m| m.message.clone()).collect::<Vec<_>>(), old, "wave-1 ids are epoch 0");
        assert_eq!(out[0].offset, 5);
        // The same producer name in two epochs is two producers in a batch.
        let mut a = msg("p1", 7, b"a");
        a.id.epoch = 0xdead_beef;
        let b = msg("p1", 7, b"b");
        let mut buf = Vec::new();
        encode_frame(0, &[&a, &b], &mut buf);
        let mut out = Vec::new();
        decode_body(&buf[12..], 0, &mut out).unwrap();
        assert_eq!((out[0].message.id.epoch, out[1].message.id.epoch), (0xdead_beef, 0));
        assert_eq!(out[0].message.id.to_string(), "p1@deadbeef:7");
    }
}

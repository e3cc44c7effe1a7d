//! Derived ids: the id of a function's output, computed from the input it came from, so a
//! re-run after a crash, or the same function on two nodes, writes each output under the
//! same id and the log's dedup stores it once (DESIGN sections 2 and 8).
//!
//! The rule, for output number `k` (counted per input) of input `(p, e, s)` read from the
//! function's input topic number `t`, function `name` in incarnation `i`:
//!
//! ```text
//! producer = "$fn/" name "." hex16(i) "/" t "." k "/" p      (when it fits in 256 bytes)
//!          = "$fn#/" name "." hex16(i) "/" t "." k "/" hex32(SHA-256(p)[..16])   (else)
//! epoch    = e
//! seq      = s
//! ```
//!
//! Injective: `name` (a name part, no `/`), `hex16(i)`, `t` and `k` (decimal, no `/`) are
//! read left to right up to fixed separators, and `p` is the rest, so distinct inputs,
//! topics, outputs, functions or incarnations give distinct producers; epoch and seq are
//! the input's. The long form is told apart by its prefix (`$fn#/` against `$fn/`), so it
//! never meets a short one. Only the long form can collide, when two input producer names
//! longer than the room left share the first 128 bits of their SHA-256: for n such names
//! the chance is below n^2 / 2^129. `$` names are reserved: no client can write them.
//!
//! The incarnation keeps a re-created function's outputs apart from those of the one
//! deleted before it: a new function is not a re-run.
use std::fmt::Write;

use rill_storage::{MessageId, ProducerId, blobs, hex, message::PRODUCER_ID_BYTES_MAX};

/// Which function, in which incarnation, derives ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deriver {
    /// `"$fn/" name "." hex16(incarnation) "/"`; the long form adds `#` after `$fn`.
    prefix: String,
}

impl Deriver {
    /// For function `name` (a checked name part) in incarnation `incarnation`.
    pub(crate) fn new(name: &str, incarnation: u64) -> Deriver {
        Deriver { prefix: format!("{name}.{incarnation:016x}/") }
    }

    /// The id of progress record number `seq` that `node` writes for input topic number
    /// `topic` in its session `epoch` (see [`super::progress`]): producer
    /// `$fn/NAME.INC/T.p/NODE`, never an output's (whose `T.K` has a decimal K).
    pub(crate) fn progress(&self, node: &str, topic: u32, epoch: u64, seq: u64) -> MessageId {
        let producer = format!("$fn/{}{topic}.p/{node}", self.prefix);
        MessageId { producer: ProducerId(producer.into()), epoch, seq }
    }

    /// The id of output `output` (counted per input) of `input`, read from input topic
    /// number `topic`.
    pub(crate) fn derive(&self, input: &MessageId, topic: u32, output: u32) -> MessageId {
        let producer = &*input.producer.0;
        let mut id = String::with_capacity(8 + self.prefix.len() + 24 + producer.len());
        id.push_str("$fn/");
        id.push_str(&self.prefix);
        let _ = write!(id, "{topic}.{output}/");
        if id.len() + producer.len() <= PRODUCER_ID_BYTES_MAX {
            id.push_str(producer);
        } else {
            id.replace_range(..4, "$fn#/");
            id.push_str(&hex::encode(&blobs::hash(producer.as_bytes())[..16]));
        }
        MessageId { producer: ProducerId(id.into()), epoch: input.epoch, seq: input.seq }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn id(producer: &str, epoch: u64, seq: u64) -> MessageId {
        MessageId { producer: ProducerId(producer.into()), epoch, seq }
    }

    #[test]
    fn the_rule_reads_as_documented() {
        let d = Deriver::new("norm", 0xab);
        let out = d.derive(&id("alice/gw", 7, 42), 1, 3);
        assert_eq!(out, id("$fn/norm.00000000000000ab/1.3/alice/gw", 7, 42));
        let long = "p".repeat(250);
        let out = d.derive(&id(&long, 0, 1), 0, 0);
        assert!(out.producer.0.starts_with("$fn#/norm.00000000000000ab/0.0/"), "{}", out.producer.0);
        assert!(out.producer.0.len() <= PRODUCER_ID_BYTES_MAX);
        assert_eq!(d.derive(&id(&long, 0, 1), 0, 0), out, "derived the same way every time");
        assert_eq!(d.progress("edge-1", 2, 9, 4), id("$fn/norm.00000000000000ab/2.p/edge-1", 9, 4));
    }

    #[test]
    fn distinct_inputs_outputs_topics_functions_and_incarnations_give_distinct_ids() {
        // Names chosen to tempt a sloppy rule: separators inside producers, prefixes of
        // one another, digits that could be read as indexes, and long names.
        let producers = ["a", "a/b", "a/b/c", "0.1/a", "1", "1/a", "", "$fn/x", &"q".repeat(240), &"q".repeat(241)];
        let derivers = [Deriver::new("f", 1), Deriver::new("f", 2), Deriver::new("f.1", 1), Deriver::new("g", 1)];
        let mut seen: BTreeMap<MessageId, String> = BTreeMap::new();
        for (di, d) in derivers.iter().enumerate() {
            for p in producers {
                for (epoch, seq) in [(0, 0), (0, 1), (1, 0), (u64::MAX, u64::MAX)] {
                    for topic in [0, 1, 10] {
                        for output in [0, 1, 10] {
                            let out = d.derive(&id(p, epoch, seq), topic, output);
                            let from = format!("deriver {di}, {p:?} {epoch} {seq}, topic {topic}, output {output}");
                            assert!(out.producer.0.len() <= PRODUCER_ID_BYTES_MAX);
                            if let Some(earlier) = seen.insert(out.clone(), from.clone()) {
                                panic!("{earlier} and {from} both derive {out:?}");
                            }
                        }
                    }
                }
            }
        }
    }
}

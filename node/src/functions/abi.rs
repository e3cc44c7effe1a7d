//! The guest ABI, version 1: the bytes that cross between the node and a function's
//! WebAssembly module. Sans-IO: encoding and decoding only, so the rules are tested
//! without a runtime.
//!
//! A guest exports:
//! - `memory`;
//! - `rill_alloc(len: i32) -> i32`: room for `len` bytes the host is about to write (the
//!   guest may reuse it after the call that reads it returns);
//! - `rill_process(ptr: i32, len: i32) -> i64`: one call per batch; the argument is an
//!   encoded batch ([`encode_batch`]), the result is `(out_ptr << 32) | out_len`, an
//!   encoded answer ([`decode_answer`]) in the guest's memory. The kinds `filter`, `map`,
//!   `filter_map` and `flat_map` are shapes of this one call: a guest answers each input
//!   with no output, one, or several;
//! - or, for the kind `aggregate`, `rill_aggregate(ptr: i32, len: i32) -> i64` in its
//!   place: the same call, with each distinct key's state before the batch (`states`) and
//!   each record naming its key's slot; the answer adds the states that changed. The node
//!   keeps the states per (function, input topic, key) and stores them with the input
//!   cursor in one record, so after a crash the batch runs again from the state it first
//!   ran from, and its outputs are the same (and stored once);
//! - optionally `rill_init(ptr: i32, len: i32) -> i32`: called once with the parameters
//!   ([`encode_params`]); 0 means ready, anything else fails the start (a guest says why
//!   through `log`).
//!
//! It may import `rill.log(ptr: i32, len: i32)`: a UTF-8 line for the node's log (the
//! host keeps a few per call and cuts long lines).
//!
//! Every integer is little-endian. A length written as `i32` uses -1 for "absent".
//!
//! ```text
//! batch   = count:u32 record*
//! record  = offset:u64 publish_time_ms:u64 key headers payload
//! key     = len:i32 (-1: none) bytes
//! headers = count:u32 (name_len:u32 name value_len:u32 value)*
//! payload = len:u32 bytes
//! params  = count:u32 (key_len:u32 key value_len:u32 value)*
//! answer  = 0:u32 count:u32 output*        (the batch's outputs)
//!         | 1:u32 message                  (the batch failed; UTF-8, the rest of it)
//! output  = input:u32 topic:u32 key headers payload
//!
//! aggregate batch  = slots:u32 (key state)* count:u32 (slot:u32 record)*
//! state            = len:i32 (-1: none yet) bytes
//! aggregate answer = 0:u32 count:u32 output* changed:u32 (slot:u32 state)*   (-1: forget it)
//!                  | 1:u32 message
//! ```
//! Slots are numbered from 0 in the order their keys first appear in the batch; records
//! without a key share one slot (key length -1). A state is at most [`STATE_BYTES_MAX`].
//! `input` is the index of the record in the batch that the output derives from (the
//! node derives its id from that input's id and the output's rank among that input's
//! outputs); `topic` is an index into the function's output topics.

/// The largest state a guest may keep for one key.
pub(crate) const STATE_BYTES_MAX: usize = 64 << 10;

/// A record's key, as the node keeps an aggregate's state under it.
pub(crate) type StateKey = Option<Vec<u8>>;

/// One message given to a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Input<'a> {
    pub(crate) offset: u64,
    pub(crate) publish_time_ms: u64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: &'a [(String, Vec<u8>)],
    pub(crate) payload: &'a [u8],
}

impl<'a> From<&'a rill_storage::StoredMessage> for Input<'a> {
    fn from(m: &'a rill_storage::StoredMessage) -> Input<'a> {
        Input {
            offset: m.offset,
            publish_time_ms: m.message.publish_time_ms,
            key: m.message.key.as_deref(),
            headers: &m.message.headers,
            payload: &m.message.payload,
        }
    }
}

/// One message a function emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Output {
    /// Index of the input (in its batch) it derives from.
    pub(crate) input: u32,
    /// Index into the function's output topics.
    pub(crate) topic: u32,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) payload: Vec<u8>,
}

/// What a guest answered for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Its outputs, and (an aggregate's) states that changed, by slot (`None`: forget).
    Outputs(Vec<Output>, Vec<(u32, Option<Vec<u8>>)>),
    /// The batch failed, with the guest's reason.
    Failed(String),
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

fn put_key(out: &mut Vec<u8>, key: Option<&[u8]>) {
    match key {
        Some(k) => put_bytes(out, k),
        None => out.extend_from_slice(&(-1i32).to_le_bytes()),
    }
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)]) {
    put_u32(out, headers.len() as u32);
    for (name, value) in headers {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

/// Encodes a batch for `rill_process`.
pub(crate) fn encode_batch(inputs: &[Input<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, inputs.len() as u32);
    for i in inputs {
        put_record(&mut out, i);
    }
    out
}

fn put_record(out: &mut Vec<u8>, i: &Input<'_>) {
    out.extend_from_slice(&i.offset.to_le_bytes());
    out.extend_from_slice(&i.publish_time_ms.to_le_bytes());
    put_key(out, i.key);
    put_headers(out, i.headers);
    put_bytes(out, i.payload);
}

/// Encodes a batch for `rill_aggregate`, with each key's state before it (a key missing
/// from `states` has none); returns the bytes and the key of each slot.
pub(crate) fn encode_aggregate_batch(
    inputs: &[Input<'_>],
    states: &std::collections::BTreeMap<StateKey, Vec<u8>>,
) -> (Vec<u8>, Vec<StateKey>) {
    let mut slots: Vec<StateKey> = Vec::new();
    let mut slot_of = Vec::with_capacity(inputs.len());
    for i in inputs {
        let key = i.key.map(<[u8]>::to_vec);
        let slot = slots.iter().position(|k| *k == key).unwrap_or_else(|| {
            slots.push(key);
            slots.len() - 1
        });
        slot_of.push(slot as u32);
    }
    let mut out = Vec::new();
    put_u32(&mut out, slots.len() as u32);
    for key in &slots {
        put_key(&mut out, key.as_deref());
        put_key(&mut out, states.get(key).map(Vec::as_slice));
    }
    put_u32(&mut out, inputs.len() as u32);
    for (input, slot) in inputs.iter().zip(slot_of) {
        put_u32(&mut out, slot);
        put_record(&mut out, input);
    }
    (out, slots)
}

/// Encodes a function's parameters for `rill_init`.
pub(crate) fn encode_params(params: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, params.len() as u32);
    for (k, v) in params {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    out
}

/// A reader over a guest's answer that names what it could not read.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!("{what} at byte {} runs past the answer's {} bytes", self.at, self.bytes.len()));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, String> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }

    fn key(&mut self) -> Result<Option<Vec<u8>>, String> {
        let at = self.at;
        match self.u32("key length")? as i32 {
            -1 => Ok(None),
            n if n >= 0 => Ok(Some(self.take(n as usize, "key")?.to_vec())),
            n => Err(format!("key length {n} at byte {at} is negative and not -1")),
        }
    }

    fn headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, String> {
        let count = self.u32("header count")?;
        let mut headers = Vec::new();
        for _ in 0..count {
            let at = self.at;
            let name = String::from_utf8(self.bytes("header name")?)
                .map_err(|_| format!("header name at byte {at} is not UTF-8"))?;
            headers.push((name, self.bytes("header value")?));
        }
        Ok(headers)
    }
}

/// Decodes a guest's answer to a batch of `inputs` records for a function with `topics`
/// output topics, and for an aggregate with `slots` keys (`None`: not an aggregate); an
/// error names what is wrong and where.
pub(crate) fn decode_answer(
    bytes: &[u8],
    inputs: usize,
    topics: usize,
    slots: Option<usize>,
) -> Result<Answer, String> {
    let mut r = Reader { bytes, at: 0 };
    match r.u32("status")? {
        0 => {}
        1 => return Ok(Answer::Failed(String::from_utf8_lossy(&bytes[4..]).into_owned())),
        s => return Err(format!("status {s} is neither 0 (outputs) nor 1 (failed)")),
    }
    let count = r.u32("output count")?;
    let mut outputs = Vec::new();
    for n in 0..count {
        let input = r.u32("output input index")?;
        if input as usize >= inputs {
            return Err(format!("output {n} names input {input}, but the batch has {inputs}"));
        }
        let topic = r.u32("output topic index")?;
        if topic as usize >= topics {
            return Err(format!("output {n} names output topic {topic}, but the function has {topics}"));
        }
        let (key, headers) = (r.key()?, r.headers()?);
        outputs.push(Output { input, topic, key, headers, payload: r.bytes("payload")? });
    }
    let mut states = Vec::new();
    if let Some(slots) = slots {
        for n in 0..r.u32("changed state count")? {
            let slot = r.u32("state slot")?;
            if slot as usize >= slots {
                return Err(format!("state {n} names slot {slot}, but the batch has {slots} keys"));
            }
            let state = r.key()?;
            if let Some(s) = state.as_ref().filter(|s| s.len() > STATE_BYTES_MAX) {
                return Err(format!("state {n} is {} bytes; a key's state may be {STATE_BYTES_MAX}", s.len()));
            }
            states.push((slot, state));
        }
    }
    if r.at != bytes.len() {
        let what = if slots.is_some() { "the last state" } else { "the last output" };
        return Err(format!("{} bytes follow {what}", bytes.len() - r.at));
    }
    Ok(Answer::Outputs(outputs, states))
}

/// Encodes an answer as a guest would (for tests and the native reference transform).
#[cfg(test)]
pub(crate) fn encode_answer(answer: &Answer, aggregate: bool) -> Vec<u8> {
    let mut out = Vec::new();
    match answer {
        Answer::Failed(why) => {
            put_u32(&mut out, 1);
            out.extend_from_slice(why.as_bytes());
        }
        Answer::Outputs(outputs, states) => {
            put_u32(&mut out, 0);
            put_u32(&mut out, outputs.len() as u32);
            for o in outputs {
                put_u32(&mut out, o.input);
                put_u32(&mut out, o.topic);
                put_key(&mut out, o.key.as_deref());
                put_headers(&mut out, &o.headers);
                put_bytes(&mut out, &o.payload);
            }
            if aggregate {
                put_u32(&mut out, states.len() as u32);
                for (slot, state) in states {
                    put_u32(&mut out, *slot);
                    put_key(&mut out, state.as_deref());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(input: u32, payload: &str) -> Output {
        Output {
            input,
            topic: 0,
            key: Some(b"k".to_vec()),
            headers: vec![("h".into(), b"v".to_vec())],
            payload: payload.into(),
        }
    }

    #[test]
    fn answers_round_trip() {
        for answer in
            [Answer::Outputs(vec![output(0, "a"), output(1, "")], vec![]), Answer::Failed("bad reading".into())]
        {
            assert_eq!(decode_answer(&encode_answer(&answer, false), 2, 1, None), Ok(answer));
        }
        let states = vec![(0, Some(b"s".to_vec())), (1, None)];
        let answer = Answer::Outputs(vec![output(0, "a")], states);
        assert_eq!(decode_answer(&encode_answer(&answer, true), 1, 1, Some(2)), Ok(answer));
    }

    #[test]
    fn a_batch_encodes_in_the_documented_layout() {
        let headers = vec![("h".to_string(), b"v".to_vec())];
        let input = Input { offset: 7, publish_time_ms: 9, key: None, headers: &headers, payload: b"xy" };
        let bytes = encode_batch(&[input]);
        let mut want = vec![1, 0, 0, 0];
        want.extend(7u64.to_le_bytes());
        want.extend(9u64.to_le_bytes());
        want.extend((-1i32).to_le_bytes());
        want.extend([1, 0, 0, 0, 1, 0, 0, 0, b'h', 1, 0, 0, 0, b'v']);
        want.extend([2, 0, 0, 0, b'x', b'y']);
        assert_eq!(bytes, want);
        let params = encode_params(&[("scale".into(), "2".into())]);
        assert_eq!(params, [1, 0, 0, 0, 5, 0, 0, 0, b's', b'c', b'a', b'l', b'e', 1, 0, 0, 0, b'2']);
    }

    #[test]
    fn an_aggregate_batch_gives_each_distinct_key_one_slot_with_its_state() {
        let headers = vec![];
        let input =
            |key: Option<&'static [u8]>| Input { offset: 0, publish_time_ms: 0, key, headers: &headers, payload: b"p" };
        let inputs = [input(Some(b"a")), input(None), input(Some(b"a")), input(Some(b"b"))];
        let states = [(Some(b"a".to_vec()), b"sa".to_vec())].into_iter().collect();
        let (bytes, slots) = encode_aggregate_batch(&inputs, &states);
        assert_eq!(slots, vec![Some(b"a".to_vec()), None, Some(b"b".to_vec())]);
        let mut want = vec![3, 0, 0, 0];
        want.extend([1, 0, 0, 0, b'a', 2, 0, 0, 0, b's', b'a']);
        want.extend([255, 255, 255, 255, 255, 255, 255, 255]);
        want.extend([1, 0, 0, 0, b'b', 255, 255, 255, 255]);
        want.extend([4, 0, 0, 0]);
        assert_eq!(&bytes[..want.len()], &want[..]);
        // Each record follows its slot, laid out as in a plain batch.
        let record = encode_batch(&inputs[..1]);
        assert_eq!(&bytes[want.len()..want.len() + 4], &[0, 0, 0, 0]);
        assert_eq!(&bytes[want.len() + 4..want.len() + 4 + record.len() - 4], &record[4..]);
    }

    #[test]
    fn bad_answers_say_what_and_where() {
        let good = encode_answer(&Answer::Outputs(vec![output(0, "abc")], vec![]), false);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "status at byte 0"),
            (vec![2, 0, 0, 0], "status 2"),
            (good[..good.len() - 1].to_vec(), "payload at byte"),
            ([good.clone(), vec![0]].concat(), "1 bytes follow"),
        ];
        for (bytes, want) in cases {
            let err = decode_answer(&bytes, 1, 1, None).unwrap_err();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        assert!(decode_answer(&good, 0, 1, None).unwrap_err().contains("names input 0, but the batch has 0"));
        assert!(decode_answer(&good, 1, 0, None).unwrap_err().contains("output topic 0"));
        let mut negative = good.clone();
        negative[16..20].copy_from_slice(&(-2i32).to_le_bytes());
        assert!(decode_answer(&negative, 1, 1, None).unwrap_err().contains("key length -2"));
        // An aggregate's states: a slot past the batch's keys, a state past the limit.
        let with = |slot: u32, len: usize| {
            let answer = Answer::Outputs(vec![], vec![(slot, Some(vec![0; len]))]);
            decode_answer(&encode_answer(&answer, true), 1, 1, Some(1)).unwrap_err()
        };
        assert!(with(1, 1).contains("names slot 1, but the batch has 1 keys"));
        assert!(with(0, STATE_BYTES_MAX + 1).contains("a key's state may be"));
    }
}

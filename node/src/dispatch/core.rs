//! The dispatcher's decisions, without I/O: which consumer gets which message, when a
//! message is given back, when it goes to the dead-letter topic, and what the cursor
//! holds. The task in `mod.rs` feeds it commands, the time and the messages it asks to
//! read, and carries out what it returns; the tests below drive it by hand.
//!
//! A *pass* ([`Core::begin_pass`]) moves what is due (nack delays, ack timeouts) into the
//! replay set; [`Core::next_read`] then asks for the replays (one offset each, in offset
//! order) and then for new messages, while a consumer has room. When it has nothing more
//! to ask, the pass's deliveries are ready as [`Output::Deliver`], one per consumer.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{Arc, atomic::Ordering},
};

use rill_storage::{StoredMessage, subscription::CursorState};

use super::Counters;
use crate::{
    error::NodeError,
    protocol::{ConsumerOptions, SubscriptionType},
};

/// Messages held back for later (Key_Shared keys whose consumer is full) before the
/// dispatcher stops reading new ones.
const REPLAY_MAX: usize = 10_000;

/// What the core asks to read from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// One message to deliver again.
    One(u64),
    /// New messages from this offset on.
    From(u64),
}

/// What the core asks its task to do.
#[derive(Debug)]
pub(crate) enum Output {
    /// Send these messages to a consumer.
    Deliver { consumer: u64, messages: Vec<StoredMessage> },
    /// Store this message in the dead-letter topic (`None`: `<topic>-DLQ`), then report
    /// the result with [`Core::dead_lettered`].
    DeadLetter { message: StoredMessage, topic: Option<String>, redelivered: u32 },
    /// The cursor changed: store it.
    SaveCursor,
    /// A consumer was dropped (a seek): end its stream.
    Disconnect { consumer: u64 },
}

/// A consumer's place in its subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attached {
    pub(crate) consumer: u64,
    pub(crate) start_offset: u64,
}

struct Consumer {
    id: u64,
    options: ConsumerOptions,
    /// Messages delivered to it and not yet acked or given back.
    pending: usize,
}

struct Pending {
    consumer: u64,
    key: u64,
    /// When its ack timeout gives it back, if its consumer has one.
    due_ms: Option<u64>,
}

/// Where a pass is.
#[derive(Debug, Default)]
struct Pass {
    /// The next replay offset to consider; `None` once replays are done.
    replay_from: Option<u64>,
    /// New messages are done for this pass (a read came back empty or failed).
    fresh_done: bool,
    /// Key_Shared keys that could not be routed in this pass: later messages of the key
    /// wait too, so a key's order holds.
    blocked: BTreeSet<u64>,
    out: BTreeMap<u64, Vec<StoredMessage>>,
}

/// One subscription's dispatch state.
pub(crate) struct Core {
    names: (String, String),
    unacked_max: usize,
    cursor: CursorState,
    /// The next offset never read for this subscription since it started.
    next: u64,
    /// Attach order: for Failover the first is active.
    consumers: Vec<Consumer>,
    next_consumer: u64,
    pending: BTreeMap<u64, Pending>,
    /// Given back (or held back) and due now, in offset order.
    replay: BTreeSet<u64>,
    /// Nacked: (due time in ms, offset).
    delayed: BTreeSet<(u64, u64)>,
    /// Pending with an ack timeout: (due time in ms, offset). Kept beside `pending` so a
    /// wake-up finds what is due without scanning every pending message.
    deadlines: BTreeSet<(u64, u64)>,
    /// Handed to the task for the dead-letter topic, not yet reported.
    dead_lettering: BTreeSet<u64>,
    redeliveries: BTreeMap<u64, u32>,
    /// Key_Shared: per key hash, the consumer holding its in-flight messages and how many.
    keys: BTreeMap<u64, (u64, usize)>,
    round_robin: usize,
    pass: Pass,
    outputs: VecDeque<Output>,
    counters: Arc<Counters>,
}

impl Core {
    /// A core for `subscription` of `topic` starting from its stored `cursor`.
    pub(crate) fn new(
        topic: &str,
        subscription: &str,
        cursor: CursorState,
        unacked_max: usize,
        counters: Arc<Counters>,
    ) -> Core {
        Core {
            names: (topic.to_string(), subscription.to_string()),
            unacked_max,
            next: cursor.next_unacked(cursor.ack_floor),
            cursor,
            consumers: Vec::new(),
            next_consumer: 0,
            pending: BTreeMap::new(),
            replay: BTreeSet::new(),
            delayed: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            dead_lettering: BTreeSet::new(),
            redeliveries: BTreeMap::new(),
            keys: BTreeMap::new(),
            round_robin: 0,
            pass: Pass::default(),
            outputs: VecDeque::new(),
            counters,
        }
    }

    /// The cursor to store.
    pub(crate) fn cursor(&self) -> &CursorState {
        &self.cursor
    }

    /// The next thing to do, if any.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn kind(&self) -> Option<SubscriptionType> {
        self.consumers.first().map(|c| c.options.kind)
    }

    fn consumer(&self, id: u64) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.id == id)
    }

    fn set_consumer_count(&self) {
        self.counters.consumers.store(self.consumers.len() as u64, Ordering::Relaxed);
    }

    /// Adds a consumer, unless the subscription's type refuses it.
    pub(crate) fn attach(&mut self, options: ConsumerOptions) -> Result<Attached, NodeError> {
        let (topic, subscription) = &self.names;
        let refused = match self.kind() {
            Some(SubscriptionType::Exclusive) => {
                Some(format!("subscription '{subscription}' on {topic} already has a consumer (exclusive)"))
            }
            Some(kind) if kind != options.kind => Some(format!(
                "subscription '{subscription}' on {topic} is {kind:?}; a {:?} consumer cannot join it",
                options.kind
            )),
            _ => None,
        };
        if let Some(why) = refused {
            return Err(NodeError::SubscriptionBusy(why));
        }
        let id = self.next_consumer;
        self.next_consumer += 1;
        tracing::debug!(topic, subscription, consumer = %options.name, kind = ?options.kind, "consumer attached");
        self.consumers.push(Consumer { id, options, pending: 0 });
        self.set_consumer_count();
        Ok(Attached { consumer: id, start_offset: self.cursor.next_unacked(self.cursor.ack_floor) })
    }

    /// Removes a consumer; what it held is given back at once.
    pub(crate) fn detach(&mut self, consumer: u64) {
        let Some(at) = self.consumers.iter().position(|c| c.id == consumer) else { return };
        self.consumers.remove(at);
        self.set_consumer_count();
        let held: Vec<u64> = self.pending.iter().filter(|(_, p)| p.consumer == consumer).map(|(o, _)| *o).collect();
        tracing::debug!(topic = %self.names.0, subscription = %self.names.1, given_back = held.len(),
            "consumer detached");
        for o in held {
            self.give_back(o, 0, 0);
        }
    }

    /// Acks each offset that was delivered (acks for offsets never delivered are ignored,
    /// so a confused client cannot skip messages).
    pub(crate) fn ack(&mut self, offsets: &[u64]) {
        for &o in offsets {
            self.ack_one(o);
        }
        self.outputs.push_back(Output::SaveCursor);
    }

    /// Acks every offset through `offset` (Exclusive and Failover only).
    pub(crate) fn ack_cumulative(&mut self, consumer: u64, offset: u64) {
        if !matches!(self.kind(), Some(SubscriptionType::Exclusive | SubscriptionType::Failover)) {
            tracing::info!(consumer, subscription = %self.names.1,
                "cumulative ack ignored: only Exclusive and Failover subscriptions take them");
            return;
        }
        let through: Vec<u64> = self.pending.range(..=offset).map(|(o, _)| *o).collect();
        for o in through {
            self.ack_one(o);
        }
        self.cursor.ack_through(offset.min(self.next.saturating_sub(1)));
        self.replay.retain(|o| *o > offset);
        self.delayed.retain(|(_, o)| *o > offset);
        self.outputs.push_back(Output::SaveCursor);
    }

    /// Gives back what `consumer` holds of `offsets`, after its nack delay.
    pub(crate) fn nack(&mut self, now_ms: u64, consumer: u64, offsets: &[u64]) {
        let delay = self.consumer(consumer).map_or(0, |c| c.options.nack_delay_ms);
        for &o in offsets {
            if self.pending.get(&o).is_some_and(|p| p.consumer == consumer) {
                self.give_back(o, now_ms, delay);
            }
        }
    }

    /// Moves the cursor to `offset` and drops every consumer, as Pulsar does: in-flight
    /// acks would refer to the old position.
    pub(crate) fn seek(&mut self, offset: u64) {
        tracing::info!(topic = %self.names.0, subscription = %self.names.1, offset,
            consumers = self.consumers.len(), "subscription moved");
        self.cursor = CursorState::at(offset);
        self.next = offset;
        for c in self.consumers.drain(..) {
            self.outputs.push_back(Output::Disconnect { consumer: c.id });
        }
        self.set_consumer_count();
        self.pending.clear();
        self.replay.clear();
        self.delayed.clear();
        self.deadlines.clear();
        self.dead_lettering.clear();
        self.redeliveries.clear();
        self.keys.clear();
        self.outputs.push_back(Output::SaveCursor);
    }

    /// Whether the subscription may be deleted: only with no consumer attached.
    pub(crate) fn check_deletable(&self) -> Result<(), NodeError> {
        if self.consumers.is_empty() {
            return Ok(());
        }
        let (topic, subscription) = &self.names;
        Err(NodeError::SubscriptionBusy(format!(
            "subscription '{subscription}' on {topic} has {} consumer(s) attached; stop them first",
            self.consumers.len()
        )))
    }

    /// When something is next due: a nack delay or an ack timeout.
    pub(crate) fn next_wake(&self) -> Option<u64> {
        let nack = self.delayed.first().map(|(at, _)| *at);
        let timeout = self.deadlines.first().map(|(at, _)| *at);
        nack.into_iter().chain(timeout).min()
    }

    /// Starts a pass: what is due by `now_ms` becomes a replay.
    pub(crate) fn begin_pass(&mut self, now_ms: u64) {
        while let Some(&(due, o)) = self.delayed.first().filter(|(due, _)| *due <= now_ms) {
            self.delayed.remove(&(due, o));
            self.replay.insert(o);
        }
        while let Some(&(due, o)) = self.deadlines.first().filter(|(due, _)| *due <= now_ms) {
            self.deadlines.remove(&(due, o));
            self.give_back(o, now_ms, 0);
        }
        self.pass = Pass { replay_from: Some(0), ..Pass::default() };
    }

    /// What to read next in this pass, given the log's durable end; `None` ends the pass
    /// and queues its deliveries.
    pub(crate) fn next_read(&mut self, end: u64) -> Option<Read> {
        if self.consumers.is_empty() {
            self.pass.replay_from = None;
            self.pass.fresh_done = true;
        }
        while let Some(from) = self.pass.replay_from {
            let Some(o) = self.replay.range(from..).next().copied() else {
                self.pass.replay_from = None;
                break;
            };
            if self.cursor.is_acked(o) {
                self.replay.remove(&o);
                continue;
            }
            if !self.has_room() {
                self.pass.replay_from = None;
                break;
            }
            self.pass.replay_from = Some(o + 1);
            return Some(Read::One(o));
        }
        if !self.pass.fresh_done && self.has_room() && self.replay.len() < REPLAY_MAX && self.next < end {
            return Some(Read::From(self.next));
        }
        for (consumer, messages) in std::mem::take(&mut self.pass.out) {
            self.outputs.push_back(Output::Deliver { consumer, messages });
        }
        None
    }

    /// What a read asked by [`Core::next_read`] returned (`None`: it failed).
    pub(crate) fn handle_read(&mut self, now_ms: u64, read: Read, messages: Option<Vec<StoredMessage>>) {
        match (read, messages) {
            (Read::One(_), None) => self.pass.replay_from = None,
            (Read::From(_), None) => self.pass.fresh_done = true,
            (Read::One(o), Some(m)) => match m.into_iter().next().filter(|m| m.offset == o) {
                Some(m) => {
                    if self.route(now_ms, m) {
                        self.replay.remove(&o);
                    }
                }
                None => {
                    self.replay.remove(&o); // no longer in the log
                }
            },
            (Read::From(_), Some(batch)) => {
                let Some(last) = batch.last() else {
                    self.pass.fresh_done = true;
                    return;
                };
                self.next = last.offset + 1;
                for m in batch {
                    if self.cursor.is_acked(m.offset) {
                        continue;
                    }
                    let o = m.offset;
                    if !self.route(now_ms, m) {
                        self.replay.insert(o);
                    }
                }
            }
        }
    }

    /// The result of an [`Output::DeadLetter`]: once stored there, the message is acked
    /// here; else it is tried again.
    pub(crate) fn dead_lettered(&mut self, offset: u64, stored: bool) {
        if !self.dead_lettering.remove(&offset) {
            return; // a seek forgot it
        }
        if stored {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            self.cursor.ack(offset);
            self.redeliveries.remove(&offset);
            self.outputs.push_back(Output::SaveCursor);
        } else {
            self.replay.insert(offset);
        }
    }

    /// Forgets `o` as pending (and its key's hold on its consumer).
    fn unpend(&mut self, o: u64) -> Option<Pending> {
        let p = self.pending.remove(&o)?;
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == p.consumer) {
            c.pending -= 1;
        }
        if let Some(k) = self.keys.get_mut(&p.key) {
            k.1 -= 1;
            if k.1 == 0 {
                self.keys.remove(&p.key);
            }
        }
        if let Some(due) = p.due_ms {
            self.deadlines.remove(&(due, o));
        }
        Some(p)
    }

    fn ack_one(&mut self, o: u64) {
        let delivered = self.unpend(o).is_some() || (o < self.next && !self.cursor.is_acked(o));
        if delivered {
            self.cursor.ack(o);
            self.replay.remove(&o);
            self.delayed.retain(|(_, d)| *d != o);
            self.redeliveries.remove(&o);
        }
    }

    /// Gives a pending message back, to be delivered again after `delay_ms`.
    fn give_back(&mut self, o: u64, now_ms: u64, delay_ms: u64) {
        if self.unpend(o).is_none() {
            return;
        }
        *self.redeliveries.entry(o).or_default() += 1;
        self.counters.redelivered.fetch_add(1, Ordering::Relaxed);
        if delay_ms == 0 {
            self.replay.insert(o);
        } else {
            self.delayed.insert((now_ms + delay_ms, o));
        }
    }

    fn has_room(&self) -> bool {
        let max = self.unacked_max;
        match self.kind() {
            Some(SubscriptionType::Exclusive | SubscriptionType::Failover) => self.consumers[0].pending < max,
            Some(_) => self.consumers.iter().any(|c| c.pending < max),
            None => false,
        }
    }

    /// The consumer `key`'s next message goes to, if one has room.
    fn target(&mut self, key: u64) -> Option<u64> {
        let max = self.unacked_max;
        match self.kind()? {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {
                Some(&self.consumers[0]).filter(|c| c.pending < max).map(|c| c.id)
            }
            SubscriptionType::Shared => {
                let n = self.consumers.len();
                let i = (0..n).map(|i| (self.round_robin + i) % n).find(|&i| self.consumers[i].pending < max)?;
                self.round_robin = i + 1;
                Some(self.consumers[i].id)
            }
            SubscriptionType::KeyShared => {
                let owner = match self.keys.get(&key) {
                    Some(&(owner, _)) => owner,
                    None => rendezvous(key, &self.consumers),
                };
                let free = !self.pass.blocked.contains(&key) && self.consumer(owner).is_some_and(|c| c.pending < max);
                if !free {
                    self.pass.blocked.insert(key);
                }
                free.then_some(owner)
            }
        }
    }

    /// Hands `m` to its consumer if it has room (or to the dead-letter topic); false when
    /// it must wait.
    fn route(&mut self, now_ms: u64, m: StoredMessage) -> bool {
        let key = key_hash(m.message.key.as_deref());
        let Some(target) = self.target(key) else { return false };
        let o = m.offset;
        let options = &self.consumer(target).expect("target attached").options;
        let redelivered = self.redeliveries.get(&o).copied().unwrap_or(0);
        if options.max_redeliveries.is_some_and(|max| redelivered > max) {
            let topic = options.dead_letter_topic.clone();
            self.dead_lettering.insert(o);
            self.outputs.push_back(Output::DeadLetter { message: m, topic, redelivered });
            return true;
        }
        let due_ms = options.ack_timeout_ms.map(|t| now_ms + t);
        if let Some(due) = due_ms {
            self.deadlines.insert((due, o));
        }
        self.pending.insert(o, Pending { consumer: target, key, due_ms });
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == target) {
            c.pending += 1;
        }
        if self.kind() == Some(SubscriptionType::KeyShared) {
            self.keys.entry(key).or_insert((target, 0)).1 += 1;
        }
        self.pass.out.entry(target).or_default().push(m);
        true
    }
}

/// A stable hash of a message key (FNV-1a); messages without a key share one.
fn key_hash(key: Option<&[u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.unwrap_or_default() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The consumer a free key goes to: the highest score of (key, consumer name), so a
/// consumer joining or leaving moves only the keys it wins or held.
fn rendezvous(key: u64, consumers: &[Consumer]) -> u64 {
    consumers.iter().max_by_key(|c| (mix(key ^ key_hash(Some(c.options.name.as_bytes()))), c.id)).map_or(0, |c| c.id)
}

/// splitmix64's finaliser: spreads the bits of a combined hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;

//! Subscription dispatchers: one task per subscription that has had a consumer since the
//! node started. It owns the subscription's durable cursor and decides which consumer gets
//! which message, by the subscription's type (as in Apache Pulsar):
//! - Exclusive: one consumer; a second is refused.
//! - Failover: the first attached consumer is active, the others stand by in attach order;
//!   when the active one goes, its unacked messages go to the next.
//! - Shared: round-robin over the consumers with room.
//! - Key_Shared: a key's messages go to one consumer (rendezvous hashing over the
//!   consumers' names, so few keys move when one joins or leaves). A key stays with its
//!   consumer while any of its messages is in flight there, so per-key order survives a
//!   rebalance: a key moves only once its messages are acked or given back.
//!
//! Delivery is at-least-once. A message is "pending" from delivery until acked; it is
//! given back (to be delivered again) when nacked (after the consumer's nack delay), when
//! its ack timeout passes, or when its consumer detaches. A message given back more often
//! than the receiving consumer's `max_redeliveries` is appended to the dead-letter topic
//! (durably, before it is acked here) with headers saying why. Redelivery counts live in
//! memory, as in Pulsar: a restart forgets them.
//!
//! Each consumer holds at most `consumer_unacked_messages_max` pending messages, which
//! bounds what a slow consumer costs.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rill_storage::{
    Message, MessageId, ProducerId, StorageError, StoredMessage, TopicName, meta, subscription::CursorState,
    topic::OnConflict,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    protocol::{ConsumerOptions, ErrorCode, Response, StartPosition, SubscriptionType},
    server::{Shared, error, storage_error},
    topic::Topic,
};

/// Messages read from the log per step.
const READ_MESSAGES_MAX: usize = 1000;
/// Messages held back for later (Key_Shared keys whose consumer is full) before the
/// dispatcher stops reading new ones.
const REPLAY_MAX: usize = 10_000;

/// The metadata key of a subscription's cursor.
pub(crate) fn cursor_key(topic: &TopicName, subscription: &str) -> String {
    format!("sub/{topic}/{subscription}")
}

/// A batch for one consumer's stream.
pub(crate) type Deliveries = mpsc::UnboundedSender<Vec<StoredMessage>>;

/// What a dispatcher is told.
pub(crate) enum Command {
    Attach {
        options: ConsumerOptions,
        deliver: Deliveries,
        reply: oneshot::Sender<Result<Attached, Response>>,
    },
    Detach {
        consumer: u64,
    },
    Ack {
        offsets: Vec<u64>,
    },
    AckCumulative {
        consumer: u64,
        offset: u64,
    },
    Nack {
        consumer: u64,
        offsets: Vec<u64>,
    },
    Seek {
        offset: u64,
        reply: oneshot::Sender<()>,
    },
    /// Delete the subscription and stop, unless consumers are attached.
    Delete {
        reply: oneshot::Sender<Result<(), Response>>,
    },
}

/// A consumer's place in its subscription.
pub(crate) struct Attached {
    pub(crate) consumer: u64,
    pub(crate) start_offset: u64,
}

/// Counters of a subscription since the node started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) consumers: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
}

#[derive(Clone)]
struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
}

/// The running dispatchers.
#[derive(Default)]
pub(crate) struct Registry {
    running: Mutex<BTreeMap<(TopicName, String), Handle>>,
}

impl Registry {
    /// The dispatcher of `subscription`, started (with its stored cursor, or a new one at
    /// `start`) if it is not running.
    pub(crate) fn get_or_start(
        &self,
        shared: &Arc<Shared>,
        topic: &Arc<Topic>,
        subscription: &str,
        start: StartPosition,
    ) -> Result<(mpsc::UnboundedSender<Command>, Arc<Counters>), Response> {
        let mut running = self.running.lock().expect("registry lock poisoned");
        let key = (topic.name.clone(), subscription.to_string());
        if let Some(h) = running.get(&key).filter(|h| !h.commands.is_closed()) {
            return Ok((h.commands.clone(), Arc::clone(&h.counters)));
        }
        let meta_key = cursor_key(&topic.name, subscription);
        let cursor =
            match meta::get_record::<CursorState>(shared.meta.as_ref(), &meta_key).map_err(|e| storage_error(&e))? {
                Some(c) => c,
                None => {
                    let (first, end) = topic.bounds();
                    let at = match start {
                        StartPosition::Earliest => first,
                        StartPosition::Latest => end,
                        StartPosition::Offset(o) => o.clamp(first, end),
                    };
                    let c = CursorState::at(at);
                    meta::put_record(shared.meta.as_ref(), &meta_key, &c).map_err(|e| storage_error(&e))?;
                    c
                }
            };
        let (commands, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let dispatcher = Dispatcher {
            shared: Arc::clone(shared),
            topic: Arc::clone(topic),
            subscription: subscription.to_string(),
            meta_key,
            next: cursor.next_unacked(cursor.ack_floor),
            cursor,
            consumers: Vec::new(),
            next_consumer: 0,
            pending: BTreeMap::new(),
            replay: BTreeSet::new(),
            delayed: BTreeSet::new(),
            redeliveries: BTreeMap::new(),
            keys: BTreeMap::new(),
            round_robin: 0,
            counters: Arc::clone(&counters),
        };
        tokio::spawn(dispatcher.run(rx));
        running.insert(key, Handle { commands: commands.clone(), counters: Arc::clone(&counters) });
        Ok((commands, counters))
    }

    /// Drops a deleted subscription's entry (its dispatcher has stopped).
    pub(crate) fn forget(&self, topic: &TopicName, subscription: &str) {
        let mut running = self.running.lock().expect("registry lock poisoned");
        running.remove(&(topic.clone(), subscription.to_string()));
    }

    /// The counters of a subscription, if its dispatcher ran since the node started.
    pub(crate) fn counters(&self, topic: &TopicName, subscription: &str) -> Option<Arc<Counters>> {
        let running = self.running.lock().expect("registry lock poisoned");
        running.get(&(topic.clone(), subscription.to_string())).map(|h| Arc::clone(&h.counters))
    }
}

struct Consumer {
    id: u64,
    options: ConsumerOptions,
    deliver: Deliveries,
    /// Messages delivered to it and not yet acked or given back.
    pending: usize,
}

struct Pending {
    consumer: u64,
    delivered_ms: u64,
    key: u64,
}

struct Dispatcher {
    shared: Arc<Shared>,
    topic: Arc<Topic>,
    subscription: String,
    meta_key: String,
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
    redeliveries: BTreeMap<u64, u32>,
    /// Key_Shared: per key hash, the consumer holding its in-flight messages and how many.
    keys: BTreeMap<u64, (u64, usize)>,
    round_robin: usize,
    counters: Arc<Counters>,
}

impl Dispatcher {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut committed = self.topic.committed();
        loop {
            self.dispatch().await;
            let wake = self.next_wake().map(|at| at.saturating_sub(self.now_ms()));
            let sleep = tokio::time::sleep(Duration::from_millis(wake.unwrap_or(3_600_000)));
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(c) => if self.handle(c) { return },
                    None => return,
                },
                changed = committed.changed() => if changed.is_err() { return },
                () = sleep, if wake.is_some() => {}
            }
            while let Ok(c) = commands.try_recv() {
                if self.handle(c) {
                    return;
                }
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.shared.env.clock.now_ms()
    }

    /// Deletes the subscription's stored state unless consumers are attached; true when
    /// it did (the dispatcher then stops).
    fn delete(&mut self, reply: oneshot::Sender<Result<(), Response>>) -> bool {
        if !self.consumers.is_empty() {
            let message = format!(
                "subscription '{}' on {} has {} consumer(s) attached; stop them first",
                self.subscription,
                self.topic.name,
                self.consumers.len()
            );
            let _ = reply.send(Err(error(ErrorCode::SubscriptionBusy, message)));
            return false;
        }
        let deleted = self.shared.meta.delete(&self.meta_key).and_then(|()| self.shared.meta.flush());
        let _ = reply.send(deleted.map_err(|e| storage_error(&e)));
        true
    }

    fn unacked_max(&self) -> usize {
        self.shared.config.limits.consumer_unacked_messages_max as usize
    }

    fn kind(&self) -> Option<SubscriptionType> {
        self.consumers.first().map(|c| c.options.kind)
    }

    /// Executes a command; true when the dispatcher must stop (its subscription is gone).
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Delete { reply } => return self.delete(reply),
            Command::Attach { options, deliver, reply } => {
                let _ = reply.send(self.attach(options, deliver));
            }
            Command::Detach { consumer } => self.detach(consumer),
            Command::Ack { offsets } => {
                for o in offsets {
                    self.ack(o);
                }
                self.store_cursor();
            }
            Command::AckCumulative { consumer, offset } => {
                if matches!(self.kind(), Some(SubscriptionType::Exclusive | SubscriptionType::Failover)) {
                    let through: Vec<u64> = self.pending.range(..=offset).map(|(o, _)| *o).collect();
                    for o in through {
                        self.ack(o);
                    }
                    self.cursor.ack_through(offset.min(self.next.saturating_sub(1)));
                    self.replay.retain(|o| *o > offset);
                    self.delayed.retain(|(_, o)| *o > offset);
                    self.store_cursor();
                } else {
                    tracing::info!(consumer, subscription = %self.subscription,
                        "cumulative ack ignored: only Exclusive and Failover subscriptions take them");
                }
            }
            Command::Seek { offset, reply } => {
                self.seek(offset);
                let _ = reply.send(());
            }
            Command::Nack { consumer, offsets } => {
                let delay = self.consumer(consumer).map_or(0, |c| c.options.nack_delay_ms);
                for o in offsets {
                    if self.pending.get(&o).is_some_and(|p| p.consumer == consumer) {
                        self.give_back(o, delay);
                    }
                }
            }
        }
        false
    }

    fn attach(&mut self, options: ConsumerOptions, deliver: Deliveries) -> Result<Attached, Response> {
        let refused = match self.kind() {
            Some(SubscriptionType::Exclusive) => Some(format!(
                "subscription '{}' on {} already has a consumer (exclusive)",
                self.subscription, self.topic.name
            )),
            Some(kind) if kind != options.kind => Some(format!(
                "subscription '{}' on {} is {kind:?}; a {:?} consumer cannot join it",
                self.subscription, self.topic.name, options.kind
            )),
            _ => None,
        };
        if let Some(why) = refused {
            return Err(error(ErrorCode::SubscriptionBusy, why));
        }
        let id = self.next_consumer;
        self.next_consumer += 1;
        tracing::debug!(topic = %self.topic.name, subscription = %self.subscription, consumer = %options.name,
            kind = ?options.kind, "consumer attached");
        self.consumers.push(Consumer { id, options, deliver, pending: 0 });
        self.counters.consumers.store(self.consumers.len() as u64, Ordering::Relaxed);
        Ok(Attached { consumer: id, start_offset: self.cursor.next_unacked(self.cursor.ack_floor) })
    }

    fn detach(&mut self, consumer: u64) {
        let Some(at) = self.consumers.iter().position(|c| c.id == consumer) else { return };
        self.consumers.remove(at);
        self.counters.consumers.store(self.consumers.len() as u64, Ordering::Relaxed);
        let held: Vec<u64> = self.pending.iter().filter(|(_, p)| p.consumer == consumer).map(|(o, _)| *o).collect();
        tracing::debug!(topic = %self.topic.name, subscription = %self.subscription, given_back = held.len(),
            "consumer detached");
        for o in held {
            self.give_back(o, 0);
        }
    }

    /// Moves the cursor to `offset` and disconnects every consumer (dropping its delivery
    /// channel ends its stream), as Pulsar does: in-flight acks would refer to the old
    /// position.
    fn seek(&mut self, offset: u64) {
        tracing::info!(topic = %self.topic.name, subscription = %self.subscription, offset,
            consumers = self.consumers.len(), "subscription moved");
        self.cursor = CursorState::at(offset);
        self.next = offset;
        self.consumers.clear();
        self.counters.consumers.store(0, Ordering::Relaxed);
        self.pending.clear();
        self.replay.clear();
        self.delayed.clear();
        self.redeliveries.clear();
        self.keys.clear();
        self.store_cursor();
    }

    fn consumer(&self, id: u64) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.id == id)
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
        Some(p)
    }

    /// Acks `o` if it was delivered (acks for offsets never delivered are ignored, so a
    /// confused client cannot skip messages).
    fn ack(&mut self, o: u64) {
        let delivered = self.unpend(o).is_some() || (o < self.next && !self.cursor.is_acked(o));
        if delivered {
            self.cursor.ack(o);
            self.replay.remove(&o);
            self.delayed.retain(|(_, d)| *d != o);
            self.redeliveries.remove(&o);
        }
    }

    /// Gives a pending message back, to be delivered again after `delay_ms`.
    fn give_back(&mut self, o: u64, delay_ms: u64) {
        if self.unpend(o).is_none() {
            return;
        }
        *self.redeliveries.entry(o).or_default() += 1;
        self.counters.redelivered.fetch_add(1, Ordering::Relaxed);
        if delay_ms == 0 {
            self.replay.insert(o);
        } else {
            self.delayed.insert((self.now_ms() + delay_ms, o));
        }
    }

    fn store_cursor(&self) {
        if let Err(e) = meta::put_record(self.shared.meta.as_ref(), &self.meta_key, &self.cursor) {
            tracing::warn!(key = %self.meta_key, error = %e, "could not store cursor; acks may be redelivered");
        }
    }

    /// When something is next due: a nack delay or an ack timeout.
    fn next_wake(&self) -> Option<u64> {
        let nack = self.delayed.first().map(|(at, _)| *at);
        let timeout = self
            .pending
            .values()
            .filter_map(|p| Some(p.delivered_ms + self.consumer(p.consumer)?.options.ack_timeout_ms?))
            .min();
        nack.into_iter().chain(timeout).min()
    }

    /// Moves what is due into the replay set, then hands out replays and new messages to
    /// consumers with room.
    async fn dispatch(&mut self) {
        let now = self.now_ms();
        while let Some(&(due, o)) = self.delayed.first().filter(|(due, _)| *due <= now) {
            self.delayed.remove(&(due, o));
            self.replay.insert(o);
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                self.consumer(p.consumer)
                    .and_then(|c| c.options.ack_timeout_ms)
                    .is_some_and(|t| p.delivered_ms + t <= now)
            })
            .map(|(o, _)| *o)
            .collect();
        for o in expired {
            self.give_back(o, 0);
        }
        if self.consumers.is_empty() {
            return;
        }
        let mut out: BTreeMap<u64, Vec<StoredMessage>> = BTreeMap::new();
        let mut blocked = BTreeSet::new();
        for o in self.replay.iter().copied().collect::<Vec<_>>() {
            if self.cursor.is_acked(o) {
                self.replay.remove(&o);
                continue;
            }
            if !self.has_room() {
                break;
            }
            match self.topic.read(o, 1, usize::MAX).await {
                Ok(m) if m.first().is_some_and(|m| m.offset == o) => {
                    let m = m.into_iter().next().expect("one message");
                    if self.route(m, &mut blocked, &mut out).await {
                        self.replay.remove(&o);
                    }
                }
                Ok(_) => {
                    self.replay.remove(&o); // no longer in the log
                }
                Err(e) => {
                    tracing::error!(topic = %self.topic.name, error = %e, "read failed; retrying later");
                    break;
                }
            }
        }
        let bytes_max = self.shared.config.limits.delivery_bytes_max as usize;
        while self.has_room() && self.replay.len() < REPLAY_MAX && self.next < *self.topic.committed().borrow() {
            let batch = match self.topic.read(self.next, READ_MESSAGES_MAX, bytes_max).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(topic = %self.topic.name, error = %e, "read failed; retrying later");
                    break;
                }
            };
            let Some(last) = batch.last() else { break };
            self.next = last.offset + 1;
            for m in batch {
                if self.cursor.is_acked(m.offset) {
                    continue;
                }
                let o = m.offset;
                if !self.route(m, &mut blocked, &mut out).await {
                    self.replay.insert(o);
                }
            }
        }
        for (id, batch) in out {
            if let Some(c) = self.consumer(id) {
                let _ = c.deliver.send(batch); // a consumer that went is detached by its stream
            }
        }
    }

    fn has_room(&self) -> bool {
        let max = self.unacked_max();
        match self.kind() {
            Some(SubscriptionType::Exclusive | SubscriptionType::Failover) => self.consumers[0].pending < max,
            Some(_) => self.consumers.iter().any(|c| c.pending < max),
            None => false,
        }
    }

    /// Hands `m` to its consumer if it has room (or to the dead-letter topic); false when
    /// it must wait.
    async fn route(
        &mut self,
        m: StoredMessage,
        blocked: &mut BTreeSet<u64>,
        out: &mut BTreeMap<u64, Vec<StoredMessage>>,
    ) -> bool {
        let max = self.unacked_max();
        let key = key_hash(m.message.key.as_deref());
        let target = match self.kind() {
            None => None,
            Some(SubscriptionType::Exclusive | SubscriptionType::Failover) => {
                Some(&self.consumers[0]).filter(|c| c.pending < max).map(|c| c.id)
            }
            Some(SubscriptionType::Shared) => {
                let n = self.consumers.len();
                let found = (0..n).map(|i| (self.round_robin + i) % n).find(|&i| self.consumers[i].pending < max);
                found.map(|i| {
                    self.round_robin = i + 1;
                    self.consumers[i].id
                })
            }
            Some(SubscriptionType::KeyShared) => {
                let owner = match self.keys.get(&key) {
                    Some(&(owner, _)) => owner,
                    None => rendezvous(key, &self.consumers),
                };
                let free = !blocked.contains(&key) && self.consumer(owner).is_some_and(|c| c.pending < max);
                if !free {
                    blocked.insert(key);
                }
                free.then_some(owner)
            }
        };
        let Some(target) = target else { return false };
        let o = m.offset;
        let options = &self.consumer(target).expect("target attached").options;
        let redelivered = self.redeliveries.get(&o).copied().unwrap_or(0);
        if options.max_redeliveries.is_some_and(|max| redelivered > max) {
            let dlq = options.dead_letter_topic.clone();
            return self.dead_letter(m, dlq, redelivered).await;
        }
        self.pending.insert(o, Pending { consumer: target, delivered_ms: self.now_ms(), key });
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == target) {
            c.pending += 1;
        }
        if self.kind() == Some(SubscriptionType::KeyShared) {
            self.keys.entry(key).or_insert((target, 0)).1 += 1;
        }
        out.entry(target).or_default().push(m);
        true
    }

    /// Appends `m` to the dead-letter topic and, once that is durable, acks it here. The
    /// dead letter's id is (`<subscription>@<topic>`, offset), so doing this twice (after a
    /// crash between the two steps) stores it once.
    async fn dead_letter(&mut self, m: StoredMessage, dlq: Option<String>, redelivered: u32) -> bool {
        let name = dlq.unwrap_or_else(|| format!("{}-DLQ", self.topic.name));
        let stored = async {
            let dlq_name = TopicName::parse(&name).map_err(|e| e.to_string())?;
            let topic = self.shared.topic(&dlq_name).await.map_err(|e| e.to_string())?;
            let mut headers = m.message.headers.clone();
            headers.extend([
                ("rill-dlq-reason".to_string(), format!("delivered {redelivered} times without an ack").into_bytes()),
                ("rill-dlq-redeliveries".to_string(), redelivered.to_string().into_bytes()),
                ("rill-dlq-topic".to_string(), self.topic.name.to_string().into_bytes()),
                ("rill-dlq-subscription".to_string(), self.subscription.clone().into_bytes()),
                ("rill-dlq-offset".to_string(), m.offset.to_string().into_bytes()),
            ]);
            let letter = Message {
                // A derived id under a reserved name: a dead letter written again after a
                // crash is the same message, stored once.
                id: MessageId {
                    producer: ProducerId(format!("$dlq/{}@{}", self.subscription, self.topic.name).into()),
                    epoch: 0,
                    seq: m.offset,
                },
                origin: m.message.origin.clone(),
                publish_time_ms: self.now_ms(),
                key: m.message.key.clone(),
                headers,
                payload: m.message.payload.clone(),
            };
            let reply =
                topic.append(vec![letter], OnConflict::Refuse).await.ok_or("the dead-letter topic is closing")?;
            match reply.await.map_err(|_| "the dead-letter write was abandoned".to_string())?.result {
                // Dead-lettered before a crash, with other headers (the redelivery count):
                // the input is in the dead-letter topic already.
                Err(StorageError::Conflict { .. }) => Ok(Vec::new()),
                other => other.map_err(|e| e.to_string()),
            }
        };
        match stored.await {
            Ok(_) => {
                tracing::info!(topic = %self.topic.name, subscription = %self.subscription, offset = m.offset,
                    dead_letter_topic = %name, redelivered, "message dead-lettered");
                self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                self.cursor.ack(m.offset);
                self.redeliveries.remove(&m.offset);
                self.store_cursor();
                true
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic.name, offset = m.offset, dead_letter_topic = %name, error = %e,
                    "could not dead-letter; will retry");
                false
            }
        }
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

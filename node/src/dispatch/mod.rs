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
//!
//! The decisions are in [`core`] (sans-IO, unit-tested); this file is the task that reads
//! the log, talks to consumers' streams, writes dead letters and stores the cursor.
mod core;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use rill_storage::{
    Message, MessageId, ProducerId, StorageError, StoredMessage, TopicName, keys, meta, subscription::CursorState,
    topic::OnConflict,
};
use tokio::sync::{mpsc, oneshot};

pub(crate) use self::core::Attached;
use self::core::{Core, Output, Read};
use crate::{
    error::NodeError,
    protocol::{ConsumerOptions, StartPosition},
    registry::Registry,
    topic::Topic,
};

/// Messages read from the log per step.
const READ_MESSAGES_MAX: usize = 1000;
/// Commands queued per dispatcher before senders (consumers' ack streams) wait: acks pile
/// up no further than this while the dispatcher reads or writes a dead letter.
const COMMANDS_MAX: usize = 1024;
/// How long a dispatcher with nothing due sleeps before looking again (it wakes at once
/// on a command or new data; this only bounds a sleep with no deadline).
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// A batch for one consumer's stream. Unbounded, because the dispatcher never has more
/// than `consumer_unacked_messages_max` messages pending at a consumer: that bounds what
/// this queue can hold.
pub(crate) type Deliveries = mpsc::UnboundedSender<Vec<StoredMessage>>;

/// A dispatcher's command queue.
pub(crate) type Commands = mpsc::Sender<Command>;

/// What a dispatcher is told.
pub(crate) enum Command {
    Attach {
        options: ConsumerOptions,
        deliver: Deliveries,
        reply: oneshot::Sender<Result<Attached, NodeError>>,
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
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
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
    commands: Commands,
    counters: Arc<Counters>,
}

/// Limits every dispatcher applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) unacked_max: usize,
    pub(crate) delivery_bytes_max: usize,
}

/// The running dispatchers.
pub(crate) struct Subscriptions {
    registry: Arc<Registry>,
    limits: Limits,
    running: Mutex<BTreeMap<(TopicName, String), Handle>>,
}

impl Subscriptions {
    pub(crate) fn new(registry: Arc<Registry>, limits: Limits) -> Subscriptions {
        Subscriptions { registry, limits, running: Mutex::new(BTreeMap::new()) }
    }

    /// The topic registry the dispatchers read.
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The dispatcher of `subscription`, started (with its stored cursor, or a new one at
    /// `start`) if it is not running.
    pub(crate) fn get_or_start(
        &self,
        topic: &Arc<Topic>,
        subscription: &str,
        start: StartPosition,
    ) -> Result<Commands, NodeError> {
        let mut running = self.running.lock().expect("registry lock poisoned");
        let key = (topic.name.clone(), subscription.to_string());
        if let Some(h) = running.get(&key).filter(|h| !h.commands.is_closed()) {
            return Ok(h.commands.clone());
        }
        let meta_key = keys::cursor(&topic.name, subscription);
        let cursor = match meta::get_record::<CursorState>(self.registry.meta.as_ref(), &meta_key)? {
            Some(c) => c,
            None => {
                let (first, end) = topic.bounds();
                let at = match start {
                    StartPosition::Earliest => first,
                    StartPosition::Latest => end,
                    StartPosition::Offset(o) => o.clamp(first, end),
                };
                let c = CursorState::at(at);
                meta::put_record(self.registry.meta.as_ref(), &meta_key, &c)?;
                c
            }
        };
        let (commands, rx) = mpsc::channel(COMMANDS_MAX);
        let counters = Arc::new(Counters::default());
        let name = topic.name.to_string();
        let core = Core::new(&name, subscription, cursor, self.limits.unacked_max, Arc::clone(&counters));
        let dispatcher = Dispatcher {
            registry: Arc::clone(&self.registry),
            topic: Arc::clone(topic),
            subscription: subscription.to_string(),
            meta_key,
            delivery_bytes_max: self.limits.delivery_bytes_max,
            core,
            streams: BTreeMap::new(),
        };
        tokio::spawn(dispatcher.run(rx));
        running.insert(key, Handle { commands: commands.clone(), counters });
        Ok(commands)
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

/// The task of one subscription.
struct Dispatcher {
    registry: Arc<Registry>,
    topic: Arc<Topic>,
    subscription: String,
    meta_key: String,
    delivery_bytes_max: usize,
    core: Core,
    /// Each attached consumer's stream.
    streams: BTreeMap<u64, Deliveries>,
}

impl Dispatcher {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut committed = self.topic.committed();
        loop {
            self.pass().await;
            let wake = self.core.next_wake().map(|at| at.saturating_sub(self.now_ms()));
            let sleep = tokio::time::sleep(wake.map_or(IDLE_WAKE, Duration::from_millis));
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(c) => if self.handle(c).await { return },
                    None => return,
                },
                changed = committed.changed() => if changed.is_err() { return },
                () = sleep, if wake.is_some() => {}
            }
            while let Ok(c) = commands.try_recv() {
                if self.handle(c).await {
                    return;
                }
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.registry.env.clock.now_ms()
    }

    /// Executes a command; true when the dispatcher must stop (its subscription is gone).
    async fn handle(&mut self, command: Command) -> bool {
        let now = self.now_ms();
        match command {
            Command::Delete { reply } => {
                let deleted = match self.core.check_deletable() {
                    Ok(()) => self.delete_cursor().await,
                    Err(e) => Err(e),
                };
                let stop = deleted.is_ok();
                let _ = reply.send(deleted);
                return stop;
            }
            Command::Attach { options, deliver, reply } => {
                let attached = self.core.attach(options);
                if let Ok(a) = &attached {
                    self.streams.insert(a.consumer, deliver);
                }
                let _ = reply.send(attached);
            }
            Command::Detach { consumer } => {
                self.core.detach(consumer);
                self.streams.remove(&consumer);
            }
            Command::Ack { offsets } => self.core.ack(&offsets),
            Command::AckCumulative { consumer, offset } => self.core.ack_cumulative(consumer, offset),
            Command::Nack { consumer, offsets } => self.core.nack(now, consumer, &offsets),
            Command::Seek { offset, reply } => {
                self.core.seek(offset);
                self.execute().await;
                let _ = reply.send(());
            }
        }
        self.execute().await;
        false
    }

    async fn delete_cursor(&self) -> Result<(), NodeError> {
        let (meta, key) = (Arc::clone(&self.registry.meta), self.meta_key.clone());
        self.registry.env.run_blocking(move || meta.delete(&key).and_then(|()| meta.flush())).await?;
        Ok(())
    }

    /// One pass of the core: reads what it asks for, then carries out what it decided.
    async fn pass(&mut self) {
        let now = self.now_ms();
        self.core.begin_pass(now);
        loop {
            let end = *self.topic.committed().borrow();
            let Some(read) = self.core.next_read(end) else { break };
            let result = match read {
                Read::One(o) => self.topic.read(o, 1, usize::MAX).await,
                Read::From(o) => self.topic.read(o, READ_MESSAGES_MAX, self.delivery_bytes_max).await,
            };
            if let Err(e) = &result {
                tracing::error!(topic = %self.topic.name, error = %e, "read failed; retrying later");
            }
            self.core.handle_read(now, read, result.ok());
        }
        self.execute().await;
    }

    /// Carries out the core's outputs; the cursor is stored once, after them.
    async fn execute(&mut self) {
        let mut save = false;
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Deliver { consumer, messages } => {
                    if let Some(stream) = self.streams.get(&consumer) {
                        let _ = stream.send(messages); // a consumer that went is detached by its stream
                    }
                }
                Output::DeadLetter { message, topic, redelivered } => {
                    let offset = message.offset;
                    let stored = self.dead_letter(message, topic, redelivered).await;
                    self.core.dead_lettered(offset, stored);
                }
                Output::SaveCursor => save = true,
                Output::Disconnect { consumer } => {
                    self.streams.remove(&consumer); // dropping its channel ends its stream
                }
            }
        }
        if save {
            self.store_cursor();
        }
    }

    fn store_cursor(&self) {
        if let Err(e) = meta::put_record(self.registry.meta.as_ref(), &self.meta_key, self.core.cursor()) {
            tracing::warn!(key = %self.meta_key, error = %e, "could not store cursor; acks may be redelivered");
        }
    }

    /// Appends `m` to the dead-letter topic; true once that is durable. The dead letter's
    /// id is (`$dlq/<subscription>@<topic>`, offset), so doing this twice (after a crash
    /// between this and the ack) stores it once.
    async fn dead_letter(&self, m: StoredMessage, dlq: Option<String>, redelivered: u32) -> bool {
        let name = dlq.unwrap_or_else(|| format!("{}-DLQ", self.topic.name));
        let offset = m.offset;
        match self.store_dead_letter(&name, m, redelivered).await {
            Ok(()) => {
                tracing::info!(topic = %self.topic.name, subscription = %self.subscription, offset,
                    dead_letter_topic = %name, redelivered, "message dead-lettered");
                true
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic.name, offset, dead_letter_topic = %name, error = %e,
                    "could not dead-letter; will retry");
                false
            }
        }
    }

    async fn store_dead_letter(&self, name: &str, m: StoredMessage, redelivered: u32) -> Result<(), NodeError> {
        let topic = self.registry.topic(&TopicName::parse(name)?).await?;
        let letter = self.letter(m, redelivered);
        let reply = topic
            .append(vec![letter], OnConflict::Refuse)
            .await
            .ok_or(NodeError::ShuttingDown("the topic is closing"))?;
        match reply.await.map_err(|_| NodeError::ShuttingDown("the dead-letter write was abandoned"))?.result {
            // Dead-lettered before a crash, with other headers (the redelivery count): the
            // input is in the dead-letter topic already.
            Ok(_) | Err(StorageError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The dead letter of `m`: its content, with headers saying why, under a derived id.
    fn letter(&self, m: StoredMessage, redelivered: u32) -> Message {
        let mut headers = m.message.headers;
        headers.extend([
            ("rill-dlq-reason".to_string(), format!("delivered {redelivered} times without an ack").into_bytes()),
            ("rill-dlq-redeliveries".to_string(), redelivered.to_string().into_bytes()),
            ("rill-dlq-topic".to_string(), self.topic.name.to_string().into_bytes()),
            ("rill-dlq-subscription".to_string(), self.subscription.clone().into_bytes()),
            ("rill-dlq-offset".to_string(), m.offset.to_string().into_bytes()),
        ]);
        Message {
            // A derived id under a reserved name: a dead letter written again after a
            // crash is the same message, stored once.
            id: MessageId {
                producer: ProducerId(format!("$dlq/{}@{}", self.subscription, self.topic.name).into()),
                epoch: 0,
                seq: m.offset,
            },
            origin: m.message.origin,
            publish_time_ms: self.now_ms(),
            key: m.message.key,
            headers,
            payload: m.message.payload,
        }
    }
}

//! Serving a subscription on a stream: the durable cursor, bounded deliveries, acks.
//!
//! Delivery is at-least-once: a message is delivered from the first offset not acked, and
//! redelivered after a reconnect unless its ack was stored. At most
//! `consumer_unacked_messages_max` messages are outstanding per consumer, so a slow consumer
//! costs the node a bounded amount of memory. One consumer per subscription for now
//! (exclusive); other subscription types will share the cursor, which already keeps
//! individually acked offsets beyond its floor.
use std::{collections::BTreeSet, sync::Arc, sync::atomic::Ordering};

use quinn::{RecvStream, SendStream};
use rill_storage::{
    TopicName,
    meta::{self, MetaStore},
    name::check_part,
    subscription::CursorState,
};
use rill_transport::frame;
use tokio::sync::mpsc;

use crate::{
    protocol::{ErrorCode, Request, Response, StartPosition, SubscriptionStats, TopicStats},
    server::{Shared, error, parse_topic, storage_error},
    topic::Topic,
};

/// Most messages in one delivery frame (besides the byte limit).
const DELIVERY_MESSAGES_MAX: usize = 1000;
/// Ack frames buffered between the stream reader and the delivery loop.
const ACK_QUEUE_FRAMES_MAX: usize = 64;

fn cursor_key(topic: &TopicName, subscription: &str) -> String {
    format!("sub/{topic}/{subscription}")
}

/// Marks a subscription attached while it lives.
struct Attached<'a> {
    shared: &'a Shared,
    key: (TopicName, String),
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.shared.attached.lock().expect("attached lock poisoned").remove(&self.key);
    }
}

/// Serves a subscription until the client goes away or the stream fails.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    topic: String,
    subscription: String,
    start: StartPosition,
    mut send: SendStream,
    recv: RecvStream,
) {
    let mut buf = Vec::new();
    let session = match open(&shared, &topic, &subscription, start).await {
        Ok(s) => s,
        Err(response) => {
            let _ = frame::write_frame(&mut send, &response, &mut buf).await;
            let _ = send.finish();
            return;
        }
    };
    let (topic, attached, cursor) = session;
    let start_offset = cursor.next_unacked(cursor.ack_floor);
    if frame::write_frame(&mut send, &Response::Subscribed { start_offset }, &mut buf).await.is_err() {
        return;
    }
    tracing::debug!(topic = %topic.name, subscription, start_offset, "consumer attached");
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE_FRAMES_MAX);
    let reader = read_acks(shared.config.limits.frame_bytes_max, recv, ack_tx);
    let delivery = Delivery { shared: &shared, topic: &topic, key: cursor_key(&topic.name, &subscription), cursor };
    let ((), mut send) = tokio::join!(reader, delivery.run(send, ack_rx));
    // Detach before ending the stream: a client that saw the end may subscribe again at once.
    drop(attached);
    let _ = send.finish();
    tracing::debug!(topic = %topic.name, subscription, "consumer detached");
}

async fn open<'a>(
    shared: &'a Shared,
    topic: &str,
    subscription: &str,
    start: StartPosition,
) -> Result<(Arc<Topic>, Attached<'a>, CursorState), Response> {
    let name = parse_topic(topic)?;
    check_part("subscription", subscription).map_err(|e| error(ErrorCode::InvalidName, e.to_string()))?;
    let topic = shared.topic(&name).await.map_err(|e| storage_error(&e))?;
    let key = (name.clone(), subscription.to_string());
    if !shared.attached.lock().expect("attached lock poisoned").insert(key.clone()) {
        return Err(error(
            ErrorCode::SubscriptionBusy,
            format!("subscription '{subscription}' on {name} already has a consumer"),
        ));
    }
    let attached = Attached { shared, key };
    let meta_key = cursor_key(&name, subscription);
    let cursor =
        match meta::get_record::<CursorState>(shared.meta.as_ref(), &meta_key).map_err(|e| storage_error(&e))? {
            Some(c) => c,
            None => {
                let (start_offset, end) = {
                    let store = topic.store.lock().expect("topic lock poisoned");
                    (store.log().start_offset(), store.log().committed_offset())
                };
                let at = match start {
                    StartPosition::Earliest => start_offset,
                    StartPosition::Latest => end,
                    StartPosition::Offset(o) => o.clamp(start_offset, end),
                };
                let c = CursorState::at(at);
                meta::put_record(shared.meta.as_ref(), &meta_key, &c).map_err(|e| storage_error(&e))?;
                c
            }
        };
    Ok((topic, attached, cursor))
}

/// Forwards the client's acks to the delivery loop; ends when the client finishes the
/// stream or sends something else.
async fn read_acks(max: u32, mut recv: RecvStream, tx: mpsc::Sender<Vec<u64>>) {
    let mut buf = Vec::new();
    loop {
        match frame::read_frame::<_, Request>(&mut recv, max, &mut buf).await {
            Ok(Some(Request::Ack { offsets })) => {
                if tx.send(offsets).await.is_err() {
                    return;
                }
            }
            Ok(Some(other)) => {
                tracing::info!(request = ?std::mem::discriminant(&other), "unexpected request on a subscription stream");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::info!(error = %e, "bad frame on a subscription stream");
                return;
            }
        }
    }
}

struct Delivery<'a> {
    shared: &'a Shared,
    topic: &'a Topic,
    key: String,
    cursor: CursorState,
}

impl Delivery<'_> {
    /// Delivers durable messages while fewer than the limit are unacked, applies acks, and
    /// waits for new messages; ends when the client goes away, returning the stream.
    async fn run(mut self, mut send: SendStream, mut acks: mpsc::Receiver<Vec<u64>>) -> SendStream {
        let limits = &self.shared.config.limits;
        let unacked_max = limits.consumer_unacked_messages_max as usize;
        let mut committed = self.topic.committed();
        let mut next = self.cursor.next_unacked(self.cursor.ack_floor);
        let mut unacked = BTreeSet::new();
        let mut buf = Vec::new();
        loop {
            while let Ok(offsets) = acks.try_recv() {
                self.apply_acks(&offsets, next, &mut unacked);
            }
            let end = *committed.borrow_and_update();
            if next < end && unacked.len() < unacked_max {
                let want = (unacked_max - unacked.len()).min(DELIVERY_MESSAGES_MAX);
                let batch = match self.topic.read(next, want, limits.delivery_bytes_max as usize).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(topic = %self.topic.name, error = %e, "read failed; closing the consumer");
                        let _ = frame::write_frame(&mut send, &storage_error(&e), &mut buf).await;
                        break;
                    }
                };
                if let Some(last) = batch.last() {
                    next = last.offset + 1;
                } else {
                    // Nothing readable yet below `end` (cannot happen while the watch only
                    // moves after a sync); wait for the next change instead of spinning.
                    if committed.changed().await.is_err() {
                        break;
                    }
                    continue;
                }
                let fresh: Vec<_> = batch.into_iter().filter(|m| !self.cursor.is_acked(m.offset)).collect();
                if !fresh.is_empty() {
                    unacked.extend(fresh.iter().map(|m| m.offset));
                    if frame::write_frame(&mut send, &Response::Deliver(fresh), &mut buf).await.is_err() {
                        break;
                    }
                }
                continue;
            }
            tokio::select! {
                biased;
                offsets = acks.recv() => match offsets {
                    Some(offsets) => self.apply_acks(&offsets, next, &mut unacked),
                    None => break,
                },
                changed = committed.changed() => if changed.is_err() { break },
            }
        }
        send
    }

    /// Applies acks for delivered offsets (acks for offsets never delivered are ignored, so
    /// a confused client cannot skip messages) and stores the cursor.
    fn apply_acks(&mut self, offsets: &[u64], next: u64, unacked: &mut BTreeSet<u64>) {
        let mut changed = false;
        for &o in offsets {
            if unacked.remove(&o) || (o < next && !self.cursor.is_acked(o)) {
                self.cursor.ack(o);
                changed = true;
            }
        }
        if changed && let Err(e) = meta::put_record(self.shared.meta.as_ref(), &self.key, &self.cursor) {
            tracing::warn!(key = %self.key, error = %e, "could not store cursor; acks may be redelivered");
        }
    }
}

/// Statistics of one topic and its subscriptions.
pub(crate) fn topic_stats(shared: &Shared, topic: &Topic) -> TopicStats {
    let (start, end, bytes, segments, producers) = {
        let store = topic.store.lock().expect("topic lock poisoned");
        let log = store.log();
        (
            log.start_offset(),
            log.committed_offset(),
            log.size_bytes(),
            log.segment_count(),
            store.dedup().producer_count(),
        )
    };
    let prefix = format!("sub/{}/", topic.name);
    let subscriptions = subscription_stats(shared.meta.as_ref(), &prefix, end, |name| {
        shared.attached.lock().expect("attached lock poisoned").contains(&(topic.name.clone(), name.to_string()))
    });
    TopicStats {
        topic: topic.name.to_string(),
        start_offset: start,
        end_offset: end,
        bytes,
        segments: segments as u64,
        producers: producers as u64,
        messages_in: topic.counters.messages_in.load(Ordering::Relaxed),
        duplicates: topic.counters.duplicates.load(Ordering::Relaxed),
        subscriptions,
        error: None,
    }
}

fn subscription_stats(
    meta: &dyn MetaStore,
    prefix: &str,
    end: u64,
    connected: impl Fn(&str) -> bool,
) -> Vec<SubscriptionStats> {
    let entries = meta.scan_prefix(prefix).unwrap_or_default();
    entries
        .into_iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(prefix)?.to_string();
            let cursor: CursorState = postcard::from_bytes(&value).ok()?;
            Some(SubscriptionStats {
                backlog_messages: end.saturating_sub(cursor.ack_floor),
                ack_floor: cursor.ack_floor,
                connected: connected(&name),
                name,
            })
        })
        .collect()
}

//! Serving a consumer on a stream: attach it to its subscription's dispatcher
//! ([`crate::dispatch`]), forward its acks and nacks there, and write what the dispatcher
//! hands it.
use std::sync::{Arc, atomic::Ordering};

use quinn::{RecvStream, SendStream};
use rill_storage::{name::check_part, subscription::CursorState};
use rill_transport::frame;
use tokio::sync::{mpsc, oneshot};

use crate::{
    dispatch::{Command, cursor_key},
    protocol::{
        ConsumerOptions, ErrorCode, Request, Response, SeekTarget, StartPosition, SubscriptionStats, TopicStats,
    },
    server::{Shared, error, parse_topic, storage_error},
    topic::Topic,
};

/// Serves a consumer until the client goes away or the stream fails.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    topic: String,
    subscription: String,
    start: StartPosition,
    options: ConsumerOptions,
    mut send: SendStream,
    recv: RecvStream,
) {
    let mut buf = Vec::new();
    let (deliver, mut deliveries) = mpsc::unbounded_channel();
    let attached = match attach(&shared, &topic, &subscription, start, options, deliver).await {
        Ok(a) => a,
        Err(response) => {
            let _ = frame::write_frame(&mut send, &response, &mut buf).await;
            let _ = send.finish();
            return;
        }
    };
    let (commands, consumer, start_offset) = attached;
    if frame::write_frame(&mut send, &Response::Subscribed { start_offset }, &mut buf).await.is_err() {
        let _ = commands.send(Command::Detach { consumer });
        return;
    }
    let reader = read_acks(shared.config.limits.frame_bytes_max, recv, consumer, commands.clone());
    let writer = async {
        while let Some(batch) = deliveries.recv().await {
            if frame::write_frame(&mut send, &Response::Deliver(batch), &mut buf).await.is_err() {
                break;
            }
        }
    };
    // Whichever ends first (the client left, or its stream broke) ends the consumer.
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
    // Detach before ending the stream: a client that saw the end may subscribe again at once.
    let _ = commands.send(Command::Detach { consumer });
    let _ = send.finish();
}

type AttachResult = (mpsc::UnboundedSender<Command>, u64, u64);

async fn attach(
    shared: &Arc<Shared>,
    topic: &str,
    subscription: &str,
    start: StartPosition,
    mut options: ConsumerOptions,
    deliver: crate::dispatch::Deliveries,
) -> Result<AttachResult, Response> {
    let name = parse_topic(topic)?;
    check_part("subscription", subscription).map_err(|e| error(ErrorCode::InvalidName, e.to_string()))?;
    if let Some(dlq) = &options.dead_letter_topic {
        parse_topic(dlq)?;
    }
    if options.name.is_empty() {
        options.name = format!("consumer-{:016x}", shared.env.random.next_u64());
    }
    let topic = shared.topic(&name).await.map_err(|e| storage_error(&e))?;
    let (commands, _) = shared.subscriptions.get_or_start(shared, &topic, subscription, start)?;
    let (reply, answer) = oneshot::channel();
    let closed = || error(ErrorCode::ShuttingDown, "the subscription's dispatcher stopped");
    commands.send(Command::Attach { options, deliver, reply }).map_err(|_| closed())?;
    let attached = answer.await.map_err(|_| closed())??;
    Ok((commands, attached.consumer, attached.start_offset))
}

/// Moves an existing subscription (see [`Request::Seek`]).
pub(crate) async fn seek(
    shared: &Arc<Shared>,
    topic: &str,
    subscription: &str,
    target: SeekTarget,
) -> Result<Response, Response> {
    let (topic, commands) = existing(shared, topic, subscription).await?;
    let (first, end) = topic.bounds();
    let offset = match target {
        SeekTarget::Earliest => first,
        SeekTarget::Latest => end,
        SeekTarget::Offset(o) => o.clamp(first, end),
        SeekTarget::PublishTime(t) => first_published_at(&topic, first, end, t).await?,
    };
    let (reply, done) = oneshot::channel();
    commands.send(Command::Seek { offset, reply }).map_err(|_| stopped())?;
    done.await.map_err(|_| stopped())?;
    Ok(Response::Sought { offset })
}

/// Deletes an existing subscription (see [`Request::DeleteSubscription`]): its dispatcher
/// checks that no consumer is attached, removes the stored cursor and stops.
pub(crate) async fn delete(shared: &Arc<Shared>, topic: &str, subscription: &str) -> Result<Response, Response> {
    let (topic, commands) = existing(shared, topic, subscription).await?;
    let (reply, done) = oneshot::channel();
    commands.send(Command::Delete { reply }).map_err(|_| stopped())?;
    done.await.map_err(|_| stopped())??;
    shared.subscriptions.forget(&topic.name, subscription);
    Ok(Response::SubscriptionDeleted)
}

/// An existing subscription's topic and dispatcher (started if it is not running), or the
/// error that names why not: a bad name, or no such subscription.
async fn existing(
    shared: &Arc<Shared>,
    topic: &str,
    subscription: &str,
) -> Result<(Arc<Topic>, mpsc::UnboundedSender<Command>), Response> {
    let name = parse_topic(topic)?;
    check_part("subscription", subscription).map_err(|e| error(ErrorCode::InvalidName, e.to_string()))?;
    let topic = shared.topic(&name).await.map_err(|e| storage_error(&e))?;
    let exists = shared.meta.get(&cursor_key(&name, subscription)).map_err(|e| storage_error(&e))?.is_some();
    if !exists {
        return Err(error(ErrorCode::NotFound, format!("{name} has no subscription '{subscription}'")));
    }
    let (commands, _) = shared.subscriptions.get_or_start(shared, &topic, subscription, StartPosition::Earliest)?;
    Ok((topic, commands))
}

fn stopped() -> Response {
    error(ErrorCode::ShuttingDown, "the subscription's dispatcher stopped")
}

/// The offset of the first message (in log order) published at or after `time_ms`, or
/// `end`. A linear scan in chunks; the log keeps no time index.
async fn first_published_at(topic: &Topic, from: u64, end: u64, time_ms: u64) -> Result<u64, Response> {
    let mut at = from;
    while at < end {
        let chunk = topic.read(at, 1000, 1 << 20).await.map_err(|e| storage_error(&e))?;
        let Some(last) = chunk.last() else { break };
        if let Some(m) = chunk.iter().find(|m| m.message.publish_time_ms >= time_ms) {
            return Ok(m.offset);
        }
        at = last.offset + 1;
    }
    Ok(end)
}

/// Forwards the client's acks and nacks to the dispatcher; ends when the client finishes
/// the stream or sends something else.
async fn read_acks(max: u32, mut recv: RecvStream, consumer: u64, commands: mpsc::UnboundedSender<Command>) {
    let mut buf = Vec::new();
    loop {
        let command = match frame::read_frame::<_, Request>(&mut recv, max, &mut buf).await {
            Ok(Some(Request::Ack { offsets })) => Command::Ack { offsets },
            Ok(Some(Request::AckCumulative { offset })) => Command::AckCumulative { consumer, offset },
            Ok(Some(Request::Nack { offsets })) => Command::Nack { consumer, offsets },
            Ok(Some(other)) => {
                tracing::info!(request = ?std::mem::discriminant(&other), "unexpected request on a subscription stream");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::info!(error = %e, "bad frame on a subscription stream");
                return;
            }
        };
        if commands.send(command).is_err() {
            return;
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
    let subscriptions = subscription_stats(shared, topic, start, end);
    TopicStats {
        topic: topic.name.to_string(),
        start_offset: start,
        end_offset: end,
        bytes,
        segments: segments as u64,
        producers: producers as u64,
        messages_in: topic.counters.messages_in.load(Ordering::Relaxed),
        duplicates: topic.counters.duplicates.load(Ordering::Relaxed),
        conflicts_refused: topic.counters.conflicts_refused.load(Ordering::Relaxed),
        conflicts_kept: topic.counters.conflicts_kept.load(Ordering::Relaxed),
        expired: topic.counters.expired.load(Ordering::Relaxed),
        dedup_sessions_dropped: topic.counters.dedup_sessions_dropped.load(Ordering::Relaxed),
        retention_deleted: topic.counters.retention_deleted.load(Ordering::Relaxed),
        quota_dropped: topic.counters.quota_dropped.load(Ordering::Relaxed),
        subscriptions,
        error: None,
    }
}

/// Statistics of the subscriptions of `topic`, whose log holds `start..end`.
fn subscription_stats(shared: &Shared, topic: &Topic, start: u64, end: u64) -> Vec<SubscriptionStats> {
    let prefix = cursor_key(&topic.name, "");
    let entries = shared.meta.scan_prefix(&prefix).unwrap_or_default();
    entries
        .into_iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(&prefix)?.to_string();
            let cursor: CursorState = postcard::from_bytes(&value).ok()?;
            let counters = shared.subscriptions.counters(&topic.name, &name);
            let count = |f: fn(&crate::dispatch::Counters) -> &std::sync::atomic::AtomicU64| {
                counters.as_ref().map_or(0, |c| f(c).load(Ordering::Relaxed))
            };
            // Messages below the log's start were deleted (retention, quota): not backlog.
            let floor = cursor.ack_floor.max(start);
            let acked_beyond: u64 =
                cursor.acked.iter().map(|r| r.end.min(end).saturating_sub(r.start.max(floor))).sum();
            let first_unacked = cursor.next_unacked(floor);
            let (bytes, oldest) = {
                let store = topic.store.lock().expect("topic lock poisoned");
                let oldest = (first_unacked < end)
                    .then(|| store.read(first_unacked, 1, 1).ok()?.first().map(|m| m.message.publish_time_ms))
                    .flatten();
                (store.log().bytes_from(floor), oldest)
            };
            Some(SubscriptionStats {
                backlog_age_ms: oldest.map(|t| shared.env.clock.now_ms().saturating_sub(t)),
                backlog_messages: end.saturating_sub(floor).saturating_sub(acked_beyond),
                backlog_bytes: if floor < end { bytes } else { 0 },
                ack_floor: cursor.ack_floor,
                consumers: count(|c| &c.consumers),
                redelivered: count(|c| &c.redelivered),
                dead_lettered: count(|c| &c.dead_lettered),
                ack_state_bytes: value.len() as u64,
                name,
            })
        })
        .collect()
}

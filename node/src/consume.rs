//! Serving a consumer on a stream: attach it to its subscription's dispatcher
//! ([`crate::dispatch`]), forward its acks and nacks there, and write what the dispatcher
//! hands it.
use std::sync::{Arc, atomic::Ordering};

use quinn::{RecvStream, SendStream};
use rill_storage::{name::check_part, subscription::CursorState};
use rill_transport::frame;
use tokio::sync::{mpsc, oneshot};

use crate::{
    dispatch::Command,
    protocol::{ConsumerOptions, ErrorCode, Request, Response, StartPosition, SubscriptionStats, TopicStats},
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
    let prefix = format!("sub/{}/", topic.name);
    let subscriptions = subscription_stats(shared, topic, &prefix, end);
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

fn subscription_stats(shared: &Shared, topic: &Topic, prefix: &str, end: u64) -> Vec<SubscriptionStats> {
    let entries = shared.meta.scan_prefix(prefix).unwrap_or_default();
    entries
        .into_iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(prefix)?.to_string();
            let cursor: CursorState = postcard::from_bytes(&value).ok()?;
            let counters = shared.subscriptions.counters(&topic.name, &name);
            let count = |f: fn(&crate::dispatch::Counters) -> &std::sync::atomic::AtomicU64| {
                counters.as_ref().map_or(0, |c| f(c).load(Ordering::Relaxed))
            };
            let acked_beyond: u64 = cursor.acked.iter().map(|r| r.end.min(end).saturating_sub(r.start)).sum();
            let first_unacked = cursor.next_unacked(cursor.ack_floor);
            let (bytes, oldest) = {
                let store = topic.store.lock().expect("topic lock poisoned");
                let oldest =
                    store.read(first_unacked, 1, 1).ok().and_then(|m| m.first().map(|m| m.message.publish_time_ms));
                (store.log().bytes_from(cursor.ack_floor), oldest.filter(|_| first_unacked < end))
            };
            Some(SubscriptionStats {
                backlog_age_ms: oldest.map(|t| shared.env.clock.now_ms().saturating_sub(t)),
                backlog_messages: end.saturating_sub(cursor.ack_floor).saturating_sub(acked_beyond),
                backlog_bytes: if cursor.ack_floor < end { bytes } else { 0 },
                ack_floor: cursor.ack_floor,
                consumers: count(|c| &c.consumers),
                redelivered: count(|c| &c.redelivered),
                dead_lettered: count(|c| &c.dead_lettered),
                name,
            })
        })
        .collect()
}

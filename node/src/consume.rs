//! Serving a consumer on a stream: attach it to its subscription's dispatcher
//! ([`crate::dispatch`]), forward its acks and nacks there, and write what the dispatcher
//! hands it. With `server.rs`, this is the client edge: errors become responses here.
use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use rill_storage::{NamespaceName, TopicName, keys, name::check_part};
use rill_transport::frame;
use tokio::sync::{mpsc, oneshot};

use crate::{
    authz::{Authz, Principal},
    dispatch::{Command, Commands, Deliveries, Subscriptions},
    error::NodeError,
    protocol::{ConsumerOptions, Request, Response, SeekTarget, StartPosition},
    topic::Topic,
};

/// What a consumer asked for in its `Subscribe`.
pub(crate) struct Subscribe {
    pub(crate) topic: String,
    pub(crate) subscription: String,
    pub(crate) start: StartPosition,
    pub(crate) options: ConsumerOptions,
}

/// Who consumes, and the check each of its acks passes.
pub(crate) struct Consumer {
    pub(crate) who: Arc<Principal>,
    pub(crate) authz: Arc<Authz>,
}

/// Serves a consumer until the client goes away, the stream fails, or its grant is gone.
pub(crate) async fn serve(
    subs: Arc<Subscriptions>,
    consumer_auth: Consumer,
    frame_max: u32,
    request: Subscribe,
    mut send: SendStream,
    recv: RecvStream,
) {
    let mut buf = Vec::new();
    let namespace = match TopicName::parse(&request.topic) {
        Ok(t) => t.namespace_name(),
        Err(e) => {
            let _ = frame::write_frame(&mut send, &Response::from(NodeError::from(e)), &mut buf).await;
            let _ = send.finish();
            return;
        }
    };
    // Unbounded: the dispatcher has at most `consumer_unacked_messages_max` messages
    // pending at this consumer, so that bounds what waits here (see `Deliveries`).
    let (deliver, mut deliveries) = mpsc::unbounded_channel();
    let (commands, consumer, start_offset) = match attach(&subs, request, deliver).await {
        Ok(a) => a,
        Err(e) => {
            let _ = frame::write_frame(&mut send, &Response::from(e), &mut buf).await;
            let _ = send.finish();
            return;
        }
    };
    if frame::write_frame(&mut send, &Response::Subscribed { start_offset }, &mut buf).await.is_err() {
        let _ = commands.send(Command::Detach { consumer }).await;
        return;
    }
    let reader = read_acks(frame_max, recv, consumer, commands.clone(), (&consumer_auth, &namespace));
    let writer = async {
        while let Some(batch) = deliveries.recv().await {
            // What the consumer was not acked is given back on detach; nothing is lost.
            if let Err(e) = consumer_auth.authz.check_delivery(&consumer_auth.who, &namespace) {
                return Some(e);
            }
            if frame::write_frame(&mut send, &Response::Deliver(batch), &mut buf).await.is_err() {
                break;
            }
        }
        None
    };
    // Whichever ends first (the client left, its stream broke, or its grant is gone: an
    // ack or a delivery was refused) ends the consumer. Biased, so that the simulation
    // polls them in the same order on every run.
    let refusal = tokio::select! {
        biased;
        r = reader => r,
        r = writer => r,
    };
    if let Some(e) = refusal {
        let _ = frame::write_frame(&mut send, &Response::from(e), &mut buf).await;
    }
    // Detach before ending the stream: a client that saw the end may subscribe again at once.
    let _ = commands.send(Command::Detach { consumer }).await;
    let _ = send.finish();
}

fn stopped() -> NodeError {
    NodeError::ShuttingDown("the subscription's dispatcher stopped")
}

async fn attach(
    subs: &Subscriptions,
    mut request: Subscribe,
    deliver: Deliveries,
) -> Result<(Commands, u64, u64), NodeError> {
    let name = TopicName::parse(&request.topic)?;
    check_part("subscription", &request.subscription)?;
    if let Some(dlq) = &request.options.dead_letter_topic {
        TopicName::parse(dlq)?;
    }
    let registry = subs.registry();
    if request.options.name.is_empty() {
        request.options.name = format!("consumer-{:016x}", registry.env.random.next_u64());
    }
    let topic = registry.topic(&name).await?;
    let commands = subs.get_or_start(&topic, &request.subscription, request.start)?;
    let (reply, answer) = oneshot::channel();
    commands.send(Command::Attach { options: request.options, deliver, reply }).await.map_err(|_| stopped())?;
    let attached = answer.await.map_err(|_| stopped())??;
    Ok((commands, attached.consumer, attached.start_offset))
}

/// Moves an existing subscription (see [`Request::Seek`]).
pub(crate) async fn seek(
    subs: &Subscriptions,
    topic: &str,
    subscription: &str,
    target: SeekTarget,
) -> Result<Response, NodeError> {
    let (topic, commands) = existing(subs, topic, subscription).await?;
    let (first, end) = topic.bounds();
    let offset = match target {
        SeekTarget::Earliest => first,
        SeekTarget::Latest => end,
        SeekTarget::Offset(o) => o.clamp(first, end),
        SeekTarget::PublishTime(t) => first_published_at(&topic, first, end, t).await?,
    };
    let (reply, done) = oneshot::channel();
    commands.send(Command::Seek { offset, reply }).await.map_err(|_| stopped())?;
    done.await.map_err(|_| stopped())?;
    Ok(Response::Sought { offset })
}

/// Deletes an existing subscription (see [`Request::DeleteSubscription`]): its dispatcher
/// checks that no consumer is attached, removes the stored cursor and stops.
pub(crate) async fn delete(subs: &Subscriptions, topic: &str, subscription: &str) -> Result<Response, NodeError> {
    let (topic, commands) = existing(subs, topic, subscription).await?;
    let (reply, done) = oneshot::channel();
    commands.send(Command::Delete { reply }).await.map_err(|_| stopped())?;
    done.await.map_err(|_| stopped())??;
    subs.forget(&topic.name, subscription);
    Ok(Response::SubscriptionDeleted)
}

/// An existing subscription's topic and dispatcher (started if it is not running), or the
/// error that names why not: a bad name, or no such subscription.
async fn existing(subs: &Subscriptions, topic: &str, subscription: &str) -> Result<(Arc<Topic>, Commands), NodeError> {
    let name = TopicName::parse(topic)?;
    check_part("subscription", subscription)?;
    let registry = subs.registry();
    let topic = registry.topic(&name).await?;
    if registry.meta.get(&keys::cursor(&name, subscription))?.is_none() {
        return Err(NodeError::NotFound(format!("{name} has no subscription '{subscription}'")));
    }
    let commands = subs.get_or_start(&topic, subscription, StartPosition::Earliest)?;
    Ok((topic, commands))
}

/// Messages read per step while looking for a publish time.
const SEEK_SCAN_MESSAGES: usize = 1000;
const SEEK_SCAN_BYTES: usize = 1 << 20;

/// The offset of the first message (in log order) published at or after `time_ms`, or
/// `end`. A linear scan in chunks; the log keeps no time index.
async fn first_published_at(topic: &Topic, from: u64, end: u64, time_ms: u64) -> Result<u64, NodeError> {
    let mut at = from;
    while at < end {
        let chunk = topic.read(at, SEEK_SCAN_MESSAGES, SEEK_SCAN_BYTES).await?;
        let Some(last) = chunk.last() else { break };
        if let Some(m) = chunk.iter().find(|m| m.message.publish_time_ms >= time_ms) {
            return Ok(m.offset);
        }
        at = last.offset + 1;
    }
    Ok(end)
}

/// Forwards the client's acks and nacks to the dispatcher, each checked against the
/// consumer's grants first; ends when the client finishes the stream, sends something
/// else, or is refused (returned).
async fn read_acks(
    max: u32,
    mut recv: RecvStream,
    consumer: u64,
    commands: Commands,
    (auth, namespace): (&Consumer, &NamespaceName),
) -> Option<NodeError> {
    let mut buf = Vec::new();
    loop {
        let request = frame::read_frame::<_, Request>(&mut recv, max, &mut buf).await;
        if let Ok(Some(r)) = &request
            && let Err(e) = auth.authz.check(&auth.who, r, Some(namespace))
        {
            return Some(e);
        }
        let command = match request {
            Ok(Some(Request::Ack { offsets })) => Command::Ack { offsets },
            Ok(Some(Request::AckCumulative { offset })) => Command::AckCumulative { consumer, offset },
            Ok(Some(Request::Nack { offsets })) => Command::Nack { consumer, offsets },
            Ok(Some(other)) => {
                tracing::info!(request = ?std::mem::discriminant(&other), "unexpected request on a subscription stream");
                return None;
            }
            Ok(None) => return None,
            Err(e) => {
                tracing::info!(error = %e, "bad frame on a subscription stream");
                return None;
            }
        };
        if commands.send(command).await.is_err() {
            return None;
        }
    }
}

//! Statistics of topics and subscriptions for `rill stats` and `rill topics`. Reading a
//! subscription's backlog age reads the log, so [`topics`] is blocking work.
use std::sync::atomic::{AtomicU64, Ordering};

use rill_storage::{keys, subscription::CursorState};

use crate::{
    dispatch::{Counters, Subscriptions},
    protocol::{SubscriptionStats, TopicStats},
    topic::Topic,
};

/// Statistics of every topic, the unavailable ones included with their error, by name.
pub(crate) fn topics(subs: &Subscriptions) -> Vec<TopicStats> {
    let registry = subs.registry();
    let mut stats: Vec<TopicStats> = registry.list().iter().map(|t| topic(subs, t)).collect();
    stats.extend(registry.unavailable().iter().map(|(name, reason)| TopicStats {
        topic: name.to_string(),
        error: Some(reason.clone()),
        ..TopicStats::default()
    }));
    stats.sort_by(|a, b| a.topic.cmp(&b.topic));
    stats
}

/// Statistics of one topic and its subscriptions.
fn topic(subs: &Subscriptions, topic: &Topic) -> TopicStats {
    let shape = topic.shape();
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = &topic.counters;
    TopicStats {
        topic: topic.name.to_string(),
        start_offset: shape.start,
        end_offset: shape.end,
        bytes: shape.bytes,
        segments: shape.segments as u64,
        producers: shape.producers as u64,
        messages_in: count(&c.messages_in),
        duplicates: count(&c.duplicates),
        conflicts_refused: count(&c.conflicts_refused),
        conflicts_kept: count(&c.conflicts_kept),
        expired: count(&c.expired),
        dedup_sessions_dropped: count(&c.dedup_sessions_dropped),
        retention_deleted: count(&c.retention_deleted),
        quota_dropped: count(&c.quota_dropped),
        subscriptions: subscriptions(subs, topic, shape.start, shape.end),
        error: None,
    }
}

/// Statistics of the subscriptions of `topic`, whose log holds `start..end`.
fn subscriptions(subs: &Subscriptions, topic: &Topic, start: u64, end: u64) -> Vec<SubscriptionStats> {
    let registry = subs.registry();
    let entries = registry.meta.scan_prefix(&keys::cursors_of(&topic.name)).unwrap_or_default();
    let now_ms = registry.env.clock.now_ms();
    entries
        .into_iter()
        .filter_map(|(key, value)| {
            let name = keys::cursor_name(&topic.name, &key)?.to_string();
            let cursor: CursorState = postcard::from_bytes(&value).ok()?;
            let counters = subs.counters(&topic.name, &name);
            let count = |f: fn(&Counters) -> &AtomicU64| counters.as_ref().map_or(0, |c| f(c).load(Ordering::Relaxed));
            // Messages below the log's start were deleted (retention, quota): not backlog.
            let floor = cursor.ack_floor.max(start);
            let acked_beyond: u64 =
                cursor.acked.iter().map(|r| r.end.min(end).saturating_sub(r.start.max(floor))).sum();
            let oldest_ms = topic.publish_time_from(cursor.next_unacked(floor));
            Some(SubscriptionStats {
                backlog_age_ms: oldest_ms.map(|t| now_ms.saturating_sub(t)),
                backlog_messages: end.saturating_sub(floor).saturating_sub(acked_beyond),
                backlog_bytes: topic.bytes_from(floor),
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

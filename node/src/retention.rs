//! Retention and backlog quotas, enforced every `retention_check_interval_ms` in whole
//! sealed segments (the active segment is never deleted).
//!
//! A topic's *protected* offset is the lowest offset some subscription has not acked or
//! some peer of its namespace's clusters may still need from this node. Below it a message
//! is consumed; at or past it, it is backlog.
//! - Retention (namespace policy: age, bytes, messages per topic) deletes the oldest
//!   segments while one of its limits is exceeded, but only segments wholly below the
//!   protected offset: unconsumed or unreplicated messages are never deleted by retention.
//!   With no retention limit set, consumed messages are kept.
//! - The backlog quota (bytes of backlog over the namespace's topics) with
//!   `on_full = reject` refuses produces to the namespace while it is exceeded (nothing
//!   stored is touched); with `drop_oldest` it deletes the oldest segments of the topics
//!   with the most backlog until the namespace is under its limit, counting every
//!   unconsumed message dropped (`quota_dropped` in `rill stats`) and logging it.
use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rill_replication::namespace::{NamespacePolicy, OnFull};
use rill_storage::subscription::CursorState;

use crate::{server::Shared, topic::Topic};

pub(crate) async fn run(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.config.storage.retention_check_interval_ms);
    loop {
        tokio::time::sleep(every).await;
        if shared.is_shutting_down() {
            return;
        }
        enforce(&shared).await;
    }
}

/// One topic as enforcement sees it.
struct Backlog {
    topic: Arc<Topic>,
    protected: u64,
}

impl Backlog {
    /// Bytes from the protected offset to the end.
    fn bytes(&self) -> u64 {
        let store = self.topic.store.lock().expect("topic lock poisoned");
        let log = store.log();
        if self.protected >= log.committed_offset() {
            0
        } else {
            log.bytes_from(self.protected.max(log.start_offset()))
        }
    }
}

async fn enforce(shared: &Shared) {
    let topics = shared.topic_list();
    if topics.is_empty() {
        return;
    }
    let config = shared.mesh.config().await;
    let needed = shared.mesh.retained_from(topics.iter().map(|t| t.name.clone()).collect()).await;
    let mut by_namespace: BTreeMap<String, Vec<Backlog>> = BTreeMap::new();
    for (topic, peers_need) in topics.into_iter().zip(needed) {
        let subscriptions_need = shared
            .meta
            .scan_prefix(&crate::dispatch::cursor_key(&topic.name, ""))
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, v)| postcard::from_bytes::<CursorState>(v).ok())
            .map(|c| c.ack_floor)
            .min()
            .unwrap_or(u64::MAX);
        let namespace = format!("{}/{}", topic.name.tenant(), topic.name.namespace());
        by_namespace
            .entry(namespace)
            .or_default()
            .push(Backlog { topic, protected: peers_need.min(subscriptions_need) });
    }
    let now_ms = shared.env.clock.now_ms();
    for (namespace, backlogs) in by_namespace {
        let Some(policy) = config.get(&namespace) else { continue };
        for b in &backlogs {
            if let Err(e) = retain(b, policy, now_ms) {
                tracing::warn!(topic = %b.topic.name, error = %e, "retention failed; retrying later");
            }
            let horizon_ms = policy.dedup_horizon_ms();
            let dropped = b.topic.store.lock().expect("topic lock poisoned").drop_idle_sessions(now_ms, horizon_ms);
            if dropped > 0 {
                b.topic.counters.dedup_sessions_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
                tracing::info!(topic = %b.topic.name, sessions = dropped, horizon_s = horizon_ms / 1000,
                    "dropped the dedup state of idle producer sessions (their highest seqs are kept)");
            }
        }
        quota(shared, &namespace, &backlogs, policy);
    }
}

/// Deletes the oldest consumed segments while a retention limit is exceeded.
fn retain(b: &Backlog, policy: &NamespacePolicy, now_ms: u64) -> Result<(), rill_storage::StorageError> {
    let (age, bytes, messages) =
        (policy.retention_age_s.val, policy.retention_bytes.val, policy.retention_messages.val);
    if age.is_none() && bytes.is_none() && messages.is_none() {
        return Ok(());
    }
    let mut store = b.topic.store.lock().expect("topic lock poisoned");
    loop {
        let log = store.log();
        let Some(oldest) = log.sealed_segments().into_iter().next() else { return Ok(()) };
        if oldest.end_offset > b.protected {
            return Ok(());
        }
        let newest_ms = store.read(oldest.end_offset - 1, 1, 1)?.first().map_or(0, |m| m.message.publish_time_ms);
        let log = store.log();
        let too_old = age.is_some_and(|s| now_ms.saturating_sub(newest_ms) > s.saturating_mul(1000));
        let too_big = bytes.is_some_and(|max| log.size_bytes() > max);
        let too_many = messages.is_some_and(|max| log.committed_offset() - log.start_offset() > max);
        if !(too_old || too_big || too_many) {
            return Ok(());
        }
        store.delete_oldest_segment()?;
        let n = oldest.end_offset - oldest.base_offset;
        b.topic.counters.retention_deleted.fetch_add(n, Ordering::Relaxed);
        tracing::info!(topic = %b.topic.name, from = oldest.base_offset, to = oldest.end_offset, messages = n,
            bytes = oldest.bytes, too_old, too_big, too_many, "retention deleted a segment");
    }
}

/// Applies the namespace's backlog quota.
fn quota(shared: &Shared, namespace: &str, backlogs: &[Backlog], policy: &NamespacePolicy) {
    let Some(max) = policy.backlog_bytes_max.val else {
        shared.backlog_full.lock().expect("backlog lock poisoned").remove(namespace);
        return;
    };
    let total = |bs: &[Backlog]| bs.iter().map(Backlog::bytes).sum::<u64>();
    let mut backlog = total(backlogs);
    if policy.on_full.val == OnFull::DropOldest {
        shared.backlog_full.lock().expect("backlog lock poisoned").remove(namespace);
        while backlog > max {
            // The topic with the most backlog that still has a sealed segment to drop.
            let Some(b) = backlogs
                .iter()
                .filter(|b| !b.topic.store.lock().expect("topic lock poisoned").log().sealed_segments().is_empty())
                .max_by_key(|b| b.bytes())
            else {
                tracing::warn!(namespace, backlog, max, "backlog over its quota, but only active segments are left");
                return;
            };
            let dropped = b.topic.store.lock().expect("topic lock poisoned").delete_oldest_segment();
            match dropped {
                Ok(Some(seg)) => {
                    let unconsumed = seg.end_offset.saturating_sub(seg.base_offset.max(b.protected));
                    b.topic.counters.quota_dropped.fetch_add(unconsumed, Ordering::Relaxed);
                    tracing::warn!(topic = %b.topic.name, from = seg.base_offset, to = seg.end_offset,
                        unconsumed, bytes = seg.bytes, backlog, max, "backlog quota full: dropped the oldest segment");
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(topic = %b.topic.name, error = %e, "could not drop a segment; retrying later");
                    return;
                }
            }
            backlog = total(backlogs);
        }
        return;
    }
    let mut full = shared.backlog_full.lock().expect("backlog lock poisoned");
    if backlog > max {
        let why = format!(
            "namespace {namespace}: backlog full ({backlog} bytes not yet consumed or replicated, quota {max}); \
             retry when consumers or replication catch up"
        );
        if full.insert(namespace.to_string(), why).is_none() {
            tracing::warn!(namespace, backlog, max, "backlog quota full: refusing produces");
        }
    } else if full.remove(namespace).is_some() {
        tracing::info!(namespace, backlog, max, "backlog back under its quota: taking produces again");
    }
}

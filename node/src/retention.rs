//! Retention and backlog quotas, enforced every `retention_check_interval_ms` in whole
//! sealed segments (the active segment is never deleted).
//!
//! A topic's *protected* offset is the lowest offset some subscription has not acked,
//! some peer of its namespace's clusters may still need from this node, or a stream
//! function running here (paused or not) has not processed. Below it a message
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
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use rill_replication::namespace::{NamespacePolicy, OnFull};
use rill_storage::{NamespaceName, NodeName, StorageError, keys, subscription::CursorState};

use crate::{authz::Authz, functions::driver, mesh::MeshHandle, registry::Registry, topic::Topic};

/// Namespaces whose backlog quota is full with `on_full = reject`, with the refusal a
/// producer gets. Retention fills it; the server reads it on every produce.
#[derive(Debug, Default)]
pub(crate) struct BacklogGate {
    full: Mutex<BTreeMap<NamespaceName, String>>,
}

impl BacklogGate {
    /// Why produces to `namespace` are refused, if they are.
    pub(crate) fn refusal(&self, namespace: &NamespaceName) -> Option<String> {
        self.lock().get(namespace).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NamespaceName, String>> {
        self.full.lock().expect("backlog lock poisoned")
    }
}

/// Enforces retention, dedup horizons and backlog quotas every `every` until the node
/// closes.
pub(crate) async fn run(
    registry: Arc<Registry>,
    mesh: MeshHandle,
    functions: (NodeName, Arc<Authz>),
    gate: Arc<BacklogGate>,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        if registry.is_closing() {
            return;
        }
        enforce(&registry, &mesh, &functions, &gate).await;
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
        self.topic.bytes_from(self.protected)
    }
}

/// The lowest ack floor of the topic's subscriptions (`u64::MAX` with none).
fn subscriptions_need(registry: &Registry, topic: &Topic) -> u64 {
    let cursors = registry.meta.scan_prefix(&keys::cursors_of(&topic.name)).unwrap_or_default();
    cursors
        .iter()
        .filter_map(|(_, v)| postcard::from_bytes::<CursorState>(v).ok())
        .map(|c| c.ack_floor)
        .min()
        .unwrap_or(u64::MAX)
}

async fn enforce(
    registry: &Arc<Registry>,
    mesh: &MeshHandle,
    (node, authz): &(NodeName, Arc<Authz>),
    gate: &Arc<BacklogGate>,
) {
    let topics = registry.list();
    if topics.is_empty() {
        return;
    }
    let config = mesh.config().await;
    let needed = mesh.retained_from(topics.iter().map(|t| t.name.clone()).collect()).await;
    let meta = Arc::clone(&registry.meta);
    let functions_need =
        driver::inputs_needed(&authz.functions(), &config, node, |key| driver::stored_cursor(meta.as_ref(), key));
    let mut by_namespace: BTreeMap<NamespaceName, Vec<Backlog>> = BTreeMap::new();
    for (topic, peers_need) in topics.into_iter().zip(needed) {
        let functions = functions_need.get(&topic.name).copied().unwrap_or(u64::MAX);
        let protected = peers_need.min(subscriptions_need(registry, &topic)).min(functions);
        by_namespace.entry(topic.name.namespace_name()).or_default().push(Backlog { topic, protected });
    }
    let now_ms = registry.env.clock.now_ms();
    for (namespace, backlogs) in by_namespace {
        let Some(policy) = config.get(namespace.as_str()).cloned() else { continue };
        let gate = Arc::clone(gate);
        // Deleting segments is disk work: off the async threads.
        registry.env.run_blocking(move || enforce_namespace(&namespace, &backlogs, &policy, &gate, now_ms)).await;
    }
}

fn enforce_namespace(
    namespace: &NamespaceName,
    backlogs: &[Backlog],
    policy: &NamespacePolicy,
    gate: &BacklogGate,
    now_ms: u64,
) {
    for b in backlogs {
        if let Err(e) = retain(b, policy, now_ms) {
            tracing::warn!(topic = %b.topic.name, error = %e, "retention failed; retrying later");
        }
        let horizon_ms = policy.dedup_horizon_ms();
        let dropped = b.topic.drop_idle_sessions(now_ms, horizon_ms);
        if dropped > 0 {
            tracing::info!(topic = %b.topic.name, sessions = dropped, horizon_s = horizon_ms / 1000,
                "dropped the dedup state of idle producer sessions (their highest seqs are kept)");
        }
    }
    quota(gate, namespace, backlogs, policy);
}

/// Deletes the oldest consumed segments while a retention limit is exceeded.
fn retain(b: &Backlog, policy: &NamespacePolicy, now_ms: u64) -> Result<(), StorageError> {
    let (age, bytes, messages) =
        (policy.retention_age_s.val, policy.retention_bytes.val, policy.retention_messages.val);
    if age.is_none() && bytes.is_none() && messages.is_none() {
        return Ok(());
    }
    loop {
        let Some((oldest, newest_ms)) = b.topic.oldest_sealed()? else { return Ok(()) };
        if oldest.end_offset > b.protected {
            return Ok(());
        }
        let shape = b.topic.shape();
        let too_old = age.is_some_and(|s| now_ms.saturating_sub(newest_ms) > s.saturating_mul(1000));
        let too_big = bytes.is_some_and(|max| shape.bytes > max);
        let too_many = messages.is_some_and(|max| shape.end - shape.start > max);
        if !(too_old || too_big || too_many) {
            return Ok(());
        }
        b.topic.delete_oldest_segment()?;
        let n = oldest.end_offset - oldest.base_offset;
        b.topic.counters.retention_deleted.fetch_add(n, Ordering::Relaxed);
        tracing::info!(topic = %b.topic.name, from = oldest.base_offset, to = oldest.end_offset, messages = n,
            bytes = oldest.bytes, too_old, too_big, too_many, "retention deleted a segment");
    }
}

/// Applies the namespace's backlog quota.
fn quota(gate: &BacklogGate, namespace: &NamespaceName, backlogs: &[Backlog], policy: &NamespacePolicy) {
    let Some(max) = policy.backlog_bytes_max.val else {
        gate.lock().remove(namespace);
        return;
    };
    let backlog = backlogs.iter().map(Backlog::bytes).sum::<u64>();
    if policy.on_full.val == OnFull::DropOldest {
        gate.lock().remove(namespace);
        drop_oldest(namespace, backlogs, backlog, max);
        return;
    }
    let mut full = gate.lock();
    if backlog > max {
        let why = format!(
            "namespace {namespace}: backlog full ({backlog} bytes not yet consumed or replicated, quota {max}); \
             retry when consumers or replication catch up"
        );
        if full.insert(namespace.clone(), why).is_none() {
            tracing::warn!(%namespace, backlog, max, "backlog quota full: refusing produces");
        }
    } else if full.remove(namespace).is_some() {
        tracing::info!(%namespace, backlog, max, "backlog back under its quota: taking produces again");
    }
}

/// `on_full = drop_oldest`: deletes the oldest segments of the topics with the most
/// backlog until the namespace is under `max`.
fn drop_oldest(namespace: &NamespaceName, backlogs: &[Backlog], mut backlog: u64, max: u64) {
    while backlog > max {
        // The topic with the most backlog that still has a sealed segment to drop.
        let Some(b) = backlogs.iter().filter(|b| b.topic.has_sealed_segment()).max_by_key(|b| b.bytes()) else {
            tracing::warn!(%namespace, backlog, max, "backlog over its quota, but only active segments are left");
            return;
        };
        match b.topic.delete_oldest_segment() {
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
        backlog = backlogs.iter().map(Backlog::bytes).sum::<u64>();
    }
}

//! The node-local conflict store: replicated messages whose id this node already held with
//! a different content (DESIGN section 2: an id names one message; a producer that breaks
//! that promise must not make an acknowledged content disappear).
//!
//! The log keeps the content it stored first; the other is kept here, in the metadata
//! store under `conflict/<topic>/<id>/<digest>`, flushed before the batch that carried it
//! is acknowledged to the peer. It is never replicated (it would conflict again on every
//! node), so each node keeps the contents that lost on it. A resent conflict has the same
//! key and is kept once. `rill conflicts list` shows them.
use std::sync::Arc;

use rill_storage::{
    Message, NodeName, StorageError, TopicName, keys,
    meta::{self, MetaStore},
};

use crate::{env::Env, protocol::KeptConflict};

/// The conflict store of a node.
#[derive(Debug)]
pub(crate) struct Conflicts {
    meta: Arc<dyn MetaStore>,
    env: Env,
}

impl Conflicts {
    pub(crate) fn new(meta: Arc<dyn MetaStore>, env: Env) -> Conflicts {
        Conflicts { meta, env }
    }

    /// Keeps `messages` (each with the offset of the content the log holds) durably.
    pub(crate) async fn keep(
        &self,
        topic: &TopicName,
        peer: &NodeName,
        messages: Vec<(Message, u64)>,
    ) -> Result<(), StorageError> {
        let meta = Arc::clone(&self.meta);
        let (topic, peer, now_ms) = (topic.clone(), peer.clone(), self.env.clock.now_ms());
        self.env
            .run_blocking(move || {
                for (message, stored_offset) in messages {
                    let key = keys::conflict(&topic, &message.id, message.content_digest());
                    if meta.get(&key)?.is_some() {
                        continue;
                    }
                    tracing::warn!(%topic, id = %message.id, stored_offset, from_peer = %peer,
                        "replicated message conflicts with the content stored under its id; kept aside");
                    let kept = KeptConflict {
                        topic: topic.to_string(),
                        message,
                        stored_offset,
                        from_peer: peer.to_string(),
                        kept_at_ms: now_ms,
                    };
                    meta::put_record(meta.as_ref(), &key, &kept)?;
                }
                meta.flush()
            })
            .await
    }

    /// The kept conflicts, of one topic or of all, in key order.
    pub(crate) fn list(&self, topic: Option<&TopicName>) -> Result<Vec<KeptConflict>, StorageError> {
        self.meta
            .scan_prefix(&keys::conflicts_of(topic))?
            .into_iter()
            .map(|(key, bytes)| {
                postcard::from_bytes(&bytes).map_err(|e| StorageError::MetaCorrupt { key, reason: e.to_string() })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rill_storage::{MessageId, meta::MemMeta};

    use super::*;

    fn message(seq: u64, payload: &[u8]) -> Message {
        Message {
            id: MessageId::chosen("twin", seq),
            origin: "edge".into(),
            publish_time_ms: 1,
            key: None,
            headers: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    fn edge(name: &str) -> NodeName {
        NodeName::parse(name).unwrap()
    }

    #[tokio::test]
    async fn a_kept_conflict_is_durable_listed_per_topic_and_kept_once() {
        let meta = Arc::new(MemMeta::default());
        let conflicts = Conflicts::new(Arc::clone(&meta) as Arc<dyn MetaStore>, Env::production());
        let (a, b) = (TopicName::parse("t/n/a").unwrap(), TopicName::parse("t/n/b").unwrap());
        conflicts.keep(&a, &edge("edge-1"), vec![(message(1, b"x"), 0), (message(2, b"y"), 1)]).await.unwrap();
        conflicts.keep(&a, &edge("edge-2"), vec![(message(1, b"x"), 0)]).await.unwrap();
        conflicts.keep(&b, &edge("edge-1"), vec![(message(1, b"z"), 5)]).await.unwrap();
        meta.crash();
        let kept = conflicts.list(Some(&a)).unwrap();
        let seen: Vec<_> = kept.iter().map(|k| (k.message.id.seq, k.stored_offset, k.from_peer.as_str())).collect();
        assert_eq!(seen, [(1, 0, "edge-1"), (2, 1, "edge-1")], "flushed, and a resend kept once");
        assert_eq!(conflicts.list(None).unwrap().len(), 3);
        assert_eq!(conflicts.list(Some(&b)).unwrap()[0].message.payload, b"z");
    }
}

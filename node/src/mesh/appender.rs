//! Appends a lane's received batches to the local topic, one at a time and in the order
//! they arrived, and reports each result. An appender belongs to one link: once the core
//! no longer counts that link, the driver stops it, and batches still queued are dropped
//! rather than stored after the new link's (the peer resends them from its cursor).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rill_replication::core::LinkId;
use rill_storage::{
    Message, NodeName, StorageError, TopicName,
    topic::{AppendOutcome, OnConflict},
};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::Context;
use super::Event;

/// Batches queued per (peer, topic) appender; the peer has at most
/// `inflight_batches_max` in flight per lane.
const APPEND_QUEUE_MAX: usize = 64;
/// How long a lane whose append failed (a disk error) waits before its link is dropped.
const FAILED_APPEND_PAUSE: Duration = Duration::from_secs(1);

/// Why a received batch was not stored. The core closes the link with it as the reason,
/// and the peer resends the batch on the next link.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    /// The topic could not be opened or created.
    #[error("cannot open the topic: {0}")]
    Open(#[source] StorageError),
    /// The topic is closing (the node is stopping).
    #[error("the topic is closing")]
    Closing,
    /// The group commit ended without an answer.
    #[error("the write was abandoned")]
    Abandoned,
    /// The write or its sync failed.
    #[error("{0}")]
    Write(#[source] StorageError),
    /// A conflicting content could not be kept aside.
    #[error("cannot keep a conflicting content: {0}")]
    Conflicts(#[source] StorageError),
}

/// The driver's handle on a running appender.
pub(super) struct AppenderHandle {
    pub(super) link: LinkId,
    queue: mpsc::Sender<(u64, Vec<Message>)>,
    stop: Arc<AtomicBool>,
}

/// What queuing a batch did.
pub(super) enum Queued {
    Yes,
    /// The appender stopped at a failed append; the core closes the link on its result.
    Stopped,
    /// The peer sent more batches than it may have in flight.
    Full,
}

impl AppenderHandle {
    pub(super) fn start(
        ctx: Arc<Context>,
        peer: NodeName,
        link: LinkId,
        topic: TopicName,
        events: mpsc::Sender<Event>,
    ) -> AppenderHandle {
        let (queue, rx) = mpsc::channel(APPEND_QUEUE_MAX);
        let stop = Arc::new(AtomicBool::new(false));
        let appender = Appender { ctx, peer, link, topic, events, stop: Arc::clone(&stop) };
        tokio::spawn(appender.run(rx).in_current_span());
        AppenderHandle { link, queue, stop }
    }

    pub(super) fn queue(&self, batch: u64, messages: Vec<Message>) -> Queued {
        match self.queue.try_send((batch, messages)) {
            Ok(()) => Queued::Yes,
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::Stopped,
            Err(mpsc::error::TrySendError::Full(_)) => Queued::Full,
        }
    }
}

impl Drop for AppenderHandle {
    /// Batches not yet started are dropped; one being stored completes (its result is then
    /// stale, and the core ignores it).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Appender {
    ctx: Arc<Context>,
    peer: NodeName,
    link: LinkId,
    topic: TopicName,
    events: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
}

impl Appender {
    async fn run(self, mut rx: mpsc::Receiver<(u64, Vec<Message>)>) {
        while let Some((batch, messages)) = rx.recv().await {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let result = self.append(messages).await;
            let failed = result.is_err();
            if failed {
                // The link is dropped and the peer resends after it reconnects; waiting first
                // keeps a failing disk from turning into hundreds of reconnects a second.
                tokio::time::sleep(FAILED_APPEND_PAUSE).await;
            }
            let event =
                Event::Appended { peer: self.peer.clone(), link: self.link, topic: self.topic.clone(), batch, result };
            if self.events.send(event).await.is_err() || failed {
                // After a failed append the batches queued behind it must not be stored: that
                // would put later messages before the failed ones, which the peer resends
                // once the link is back. (Found by the simulation's disk faults.)
                return;
            }
        }
    }

    /// Stores a batch durably; `Ok` with the number of messages already held.
    async fn append(&self, messages: Vec<Message>) -> Result<u64, AppendError> {
        let topic = self.ctx.registry.topic(&self.topic).await.map_err(AppendError::Open)?;
        let reply = topic.append(messages, OnConflict::SetAside).await.ok_or(AppendError::Closing)?;
        let appended = reply.await.map_err(|_| AppendError::Abandoned)?;
        let outcomes = appended.result.map_err(AppendError::Write)?;
        if !appended.set_aside.is_empty() {
            // Kept before the batch is acked: the peer may drop it once it is.
            self.ctx
                .conflicts
                .keep(&self.topic, &self.peer, appended.set_aside)
                .await
                .map_err(AppendError::Conflicts)?;
        }
        Ok(outcomes.iter().filter(|o| matches!(o, AppendOutcome::Duplicate { .. })).count() as u64)
    }
}

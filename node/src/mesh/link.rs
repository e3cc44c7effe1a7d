//! Link I/O: one QUIC connection to a peer, its outgoing streams and its reader. Each
//! side opens its own unidirectional streams, one for control messages (Hello, config
//! deltas, acks) and one per namespace for batches, so one namespace's backlog never waits
//! behind another's. Which connection counts is the core's business, not this file's.
use std::collections::BTreeMap;

use quinn::Connection;
use rill_replication::core::{LinkId, PeerMessage};
use rill_storage::{NamespaceName, NodeName};
use rill_transport::{frame, net::CloseCode};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::Event;

/// Messages queued per outgoing stream. The core keeps at most `inflight_batches_max`
/// batches in flight per topic, so this bounds a namespace of up to 500 busy topics.
const STREAM_QUEUE_MAX: usize = 4096;
/// Largest frame accepted from a peer (a batch is at most ~1 MiB of payload).
const PEER_FRAME_BYTES_MAX: u32 = 16 << 20;

/// An open connection to a peer.
pub(super) struct LinkConn {
    pub(super) peer: NodeName,
    pub(super) conn: Connection,
    streams: BTreeMap<StreamKey, mpsc::Sender<PeerMessage>>,
}

/// Which outgoing stream a message goes on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum StreamKey {
    /// Hello, catalogue deltas, link announcements and acks.
    Control,
    /// The batches of one namespace's topics.
    Batches(NamespaceName),
    /// Blob chunks, so a large blob never holds back control messages or batches.
    Blobs,
}

impl StreamKey {
    fn of(message: &PeerMessage) -> StreamKey {
        match message {
            PeerMessage::Batch { topic, .. } => StreamKey::Batches(topic.namespace_name()),
            PeerMessage::BlobChunk { .. } => StreamKey::Blobs,
            _ => StreamKey::Control,
        }
    }
}

impl LinkConn {
    /// Starts reading the connection's streams; their messages and its end are reported
    /// as events tagged with `id`.
    pub(super) fn start(peer: NodeName, conn: Connection, id: LinkId, events: mpsc::Sender<Event>) -> LinkConn {
        let span = tracing::info_span!("peer", name = %peer);
        tokio::spawn(read_link(conn.clone(), peer.clone(), id, events).instrument(span));
        LinkConn { peer, conn, streams: BTreeMap::new() }
    }

    /// Queues a message on its stream. False when the stream's queue is full or closed.
    pub(super) fn send(&mut self, message: PeerMessage) -> bool {
        let conn = &self.conn;
        let queue = self.streams.entry(StreamKey::of(&message)).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(STREAM_QUEUE_MAX);
            tokio::spawn(write_stream(conn.clone(), rx).in_current_span());
            tx
        });
        queue.try_send(message).is_ok()
    }
}

/// Writes one outgoing stream's messages in order.
async fn write_stream(conn: Connection, mut rx: mpsc::Receiver<PeerMessage>) {
    let Ok(mut send) = conn.open_uni().await else { return };
    let mut buf = Vec::new();
    while let Some(message) = rx.recv().await {
        if frame::write_frame(&mut send, &message, &mut buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Accepts the peer's streams and forwards their messages; reports when the link ends.
async fn read_link(conn: Connection, peer: NodeName, id: LinkId, tx: mpsc::Sender<Event>) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let (conn, peer, tx) = (conn.clone(), peer.clone(), tx.clone());
        tokio::spawn(
            async move {
                let mut buf = Vec::new();
                loop {
                    match frame::read_frame::<_, PeerMessage>(&mut recv, PEER_FRAME_BYTES_MAX, &mut buf).await {
                        Ok(Some(message)) => {
                            if tx.send(Event::Message { peer: peer.clone(), link: id, message }).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) | Err(frame::FrameError::Io(_)) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "bad frame from peer; closing the link");
                            conn.close(CloseCode::BadFrame.into(), b"bad frame");
                            return;
                        }
                    }
                }
            }
            .in_current_span(),
        );
    }
    let _ = tx.send(Event::LinkClosed { peer, link: id }).await;
}

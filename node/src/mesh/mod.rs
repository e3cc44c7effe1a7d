//! The replication driver: binds the sans-IO [`Replicator`] to QUIC peer links and the
//! node's topics. It decides nothing: one task owns the core, feeds it every event and
//! executes its actions. The pieces, one per file:
//! - `link.rs`: one connection's streams and reader;
//! - `dialer.rs`: a dialer per peer with an address, dialing while no link is greeted;
//! - `appender.rs`: an appender per (peer, topic), storing received batches in order.
//!
//! Connections are numbered ([`LinkId`]) as they arrive, dialed or accepted; the core says
//! which one counts (see `rill_replication::link`). Peers are identified by matching the
//! CA-verified certificate against the configured names.
mod appender;
mod dialer;
mod link;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use quinn::{Connection, Endpoint};
use rill_replication::{
    access::{EntryError, Signed},
    core::{Action, CloseReason, LinkId, PeerMessage, Replicator, Settings, blob_chunks},
    namespace::{ConfigDoc, Edit},
};
use rill_storage::{NamespaceName, NodeName, StorageError, StoredMessage, TopicName, blobs::Hash, keys, meta};
use rill_transport::net::CloseCode;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use self::{
    appender::{AppendError, AppenderHandle, Queued},
    dialer::Dialer,
    link::LinkConn,
};
use crate::{
    authz::Authz,
    config::PeerConfig,
    conflicts::Conflicts,
    error::NodeError,
    protocol::{LaneStats, PeerStats},
    registry::Registry,
};

/// What the driver, its dialers and its appenders share.
pub(crate) struct Context {
    /// This node's name.
    pub(crate) name: NodeName,
    pub(crate) registry: Arc<Registry>,
    /// Where replicated contents that lose a conflict are kept.
    pub(crate) conflicts: Arc<Conflicts>,
    /// Told of every catalogue change; checks the signatures of catalogue entries.
    pub(crate) authz: Arc<Authz>,
}

/// A change to the catalogue made through this node.
pub(crate) enum Change {
    /// A namespace edit.
    Namespace(NamespaceName, Edit),
    /// A signed entry's creation or deletion.
    Entry(Box<Signed>),
}

/// Events queued for the driver; senders wait when it is full.
const EVENTS_MAX: usize = 4096;
/// How often the core is told the time (candidate links expire on it).
const TICK: Duration = Duration::from_secs(1);
/// The stored catalogue: the versioned record, else wave 1's, else an empty one.
fn load_catalogue(meta: &dyn rill_storage::meta::MetaStore) -> Result<ConfigDoc, StorageError> {
    let corrupt = |key: &'static str| move |reason| StorageError::MetaCorrupt { key: key.to_string(), reason };
    if let Some(bytes) = meta.get(keys::CATALOGUE)? {
        return ConfigDoc::decode(&bytes).map_err(corrupt(keys::CATALOGUE));
    }
    match meta.get(keys::CATALOGUE_V1)? {
        Some(bytes) => ConfigDoc::decode_v1(&bytes).map_err(corrupt(keys::CATALOGUE_V1)),
        None => Ok(ConfigDoc::default()),
    }
}

/// The QUIC code a link closed by the core is closed with.
fn close_code(reason: &CloseReason) -> CloseCode {
    match reason {
        CloseReason::Replaced | CloseReason::Duplicate => CloseCode::Done,
        CloseReason::NoHello => CloseCode::NoHello,
        CloseReason::NotConfigured => CloseCode::NotConfigured,
        CloseReason::Violation(_) => CloseCode::Violation,
        CloseReason::AppendFailed(_) => CloseCode::AppendFailed,
    }
}

/// What the driver reacts to.
pub(crate) enum Event {
    Link {
        peer: NodeName,
        conn: Connection,
        dialed_by_us: bool,
    },
    LinkClosed {
        peer: NodeName,
        link: LinkId,
    },
    Message {
        peer: NodeName,
        link: LinkId,
        message: PeerMessage,
    },
    Read {
        peer: NodeName,
        topic: TopicName,
        ticket: u64,
        result: Result<Vec<StoredMessage>, StorageError>,
    },
    Appended {
        peer: NodeName,
        link: LinkId,
        topic: TopicName,
        batch: u64,
        result: Result<u64, AppendError>,
    },
    Edit {
        change: Change,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Config {
        reply: oneshot::Sender<ConfigDoc>,
    },
    Stats {
        reply: oneshot::Sender<Vec<PeerStats>>,
    },
    Retained {
        topics: Vec<TopicName>,
        reply: oneshot::Sender<Vec<u64>>,
    },
    /// A blob read for a peer: its length and the bytes asked for, or `None` when not held.
    BlobRead {
        peer: NodeName,
        link: LinkId,
        hash: Hash,
        offset: u64,
        read: Option<(u64, Vec<u8>)>,
    },
    /// A blob is stored durably (put by a client, or fetched: then `Err` if storing failed).
    BlobStored {
        hash: Hash,
        stored: bool,
    },
}

/// The node's handle on its driver.
#[derive(Debug, Clone)]
pub(crate) struct MeshHandle {
    tx: mpsc::Sender<Event>,
}

impl MeshHandle {
    pub(crate) fn new() -> (MeshHandle, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(EVENTS_MAX);
        (MeshHandle { tx }, rx)
    }

    /// Hands an accepted peer connection to the driver.
    pub(crate) async fn attach(&self, peer: NodeName, conn: Connection) {
        let _ = self.tx.send(Event::Link { peer, conn, dialed_by_us: false }).await;
    }

    /// Applies an admin edit to the catalogue; answers once it is durable.
    pub(crate) async fn edit(&self, change: Change) -> Result<(), NodeError> {
        let stopped = || NodeError::ShuttingDown("replication stopped");
        let (reply, rx) = oneshot::channel();
        self.tx.send(Event::Edit { change, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub(crate) async fn config(&self) -> ConfigDoc {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Event::Config { reply }).await;
        rx.await.unwrap_or_default()
    }

    pub(crate) async fn stats(&self) -> Vec<PeerStats> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Event::Stats { reply }).await;
        rx.await.unwrap_or_default()
    }

    /// A client stored a blob on this node: peers may fetch it now.
    pub(crate) async fn blob_stored(&self, hash: Hash) {
        let _ = self.tx.send(Event::BlobStored { hash, stored: true }).await;
    }

    /// Per topic, the lowest offset a peer may still need from this node (0 when the
    /// driver cannot answer: keep everything).
    pub(crate) async fn retained_from(&self, topics: Vec<TopicName>) -> Vec<u64> {
        let n = topics.len();
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Event::Retained { topics, reply }).await;
        rx.await.unwrap_or_else(|_| vec![0; n])
    }
}

struct Driver {
    ctx: Arc<Context>,
    rep: Replicator,
    /// Every open connection to a peer, current or not.
    links: BTreeMap<LinkId, LinkConn>,
    /// Per peer: true while the core has a greeted link to it (the dialer watches this).
    greeted: BTreeMap<NodeName, watch::Sender<bool>>,
    /// Per peer: it has dialed this node (so both sides dial).
    peer_dials: BTreeMap<NodeName, Arc<AtomicBool>>,
    appenders: BTreeMap<(NodeName, TopicName), AppenderHandle>,
    /// UDP bytes sent on links to each peer that have closed.
    closed_link_bytes: BTreeMap<NodeName, u64>,
    tx: mpsc::Sender<Event>,
    next_link: u64,
}

/// Starts the driver and a dialer per peer with an address.
pub(crate) fn start(
    ctx: Arc<Context>,
    peers: &[PeerConfig],
    endpoint: Endpoint,
    peer_client: quinn::ClientConfig,
    handle: &MeshHandle,
    rx: mpsc::Receiver<Event>,
) -> Result<(), StorageError> {
    let (env, meta) = (&ctx.registry.env, &ctx.registry.meta);
    let config = load_catalogue(meta.as_ref())?;
    let settings = Settings { bug_skip_batch: env.bugs.skip_batch, ..Settings::default() };
    let boot = env.random.next_u64();
    ctx.authz.update(&config);
    let mut rep = Replicator::new(ctx.name.clone(), boot, settings, config, ctx.authz.verifier());
    let (mut greeted, mut peer_dials) = (BTreeMap::new(), BTreeMap::new());
    for p in peers {
        rep.add_peer(p.name.clone());
        greeted.insert(p.name.clone(), watch::channel(false).0);
        peer_dials.insert(p.name.clone(), Arc::new(AtomicBool::new(false)));
    }
    for (key, value) in meta.scan_prefix(keys::REPL_CURSORS)? {
        let Some((peer, topic)) = keys::parse_repl_cursor(&key) else { continue };
        let Ok(offset) = postcard::from_bytes::<u64>(&value) else { continue };
        rep.restore_cursor(&peer, &topic, offset);
    }
    rep.restore_blobs(whole_blobs(&ctx.registry.blobs)?);
    for p in peers.iter().filter(|p| p.addr.is_some()) {
        let dialer = Dialer { ctx: Arc::clone(&ctx), endpoint: endpoint.clone(), client: peer_client.clone() };
        let span = tracing::info_span!("peer", name = %p.name);
        let (state, dials) = (greeted[&p.name].subscribe(), Arc::clone(&peer_dials[&p.name]));
        tokio::spawn(dialer.run(p.clone(), handle.tx.clone(), state, dials).instrument(span));
    }
    let driver = Driver {
        ctx,
        rep,
        links: BTreeMap::new(),
        greeted,
        peer_dials,
        appenders: BTreeMap::new(),
        closed_link_bytes: BTreeMap::new(),
        tx: handle.tx.clone(),
        next_link: 0,
    };
    tokio::spawn(driver.run(rx).in_current_span());
    Ok(())
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let growth = Arc::clone(&self.ctx.registry.growth);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                event = rx.recv() => match event {
                    Some(e) => self.handle(e),
                    None => return,
                },
                () = growth.notify.notified() => {
                    for (topic, end) in growth.take() {
                        self.rep.handle_log_grew(&topic, end);
                    }
                }
                _ = tick.tick() => self.rep.handle_timeout(self.now_ms()),
            }
            self.execute();
        }
    }

    fn now_ms(&self) -> u64 {
        self.ctx.registry.env.clock.now_ms()
    }

    fn handle(&mut self, event: Event) {
        let now = self.now_ms();
        match event {
            Event::Link { peer, conn, dialed_by_us } => self.link_opened(peer, conn, dialed_by_us),
            Event::LinkClosed { peer, link } => {
                if let Some(l) = self.links.remove(&link) {
                    tracing::info!(%peer, %link, reason = %close_reason(&l.conn), "peer link closed");
                    self.count_closed(&l);
                }
                self.rep.handle_link_closed(now, &peer, link);
            }
            Event::Message { peer, link, message } => self.rep.handle_message(now, &peer, link, message),
            Event::Read { peer, topic, ticket, result } => {
                let messages = result.unwrap_or_else(|e| {
                    tracing::warn!(%peer, %topic, error = %e, "replication read failed; retrying when the log grows");
                    Vec::new()
                });
                self.rep.handle_read(&peer, &topic, ticket, messages);
            }
            Event::Appended { peer, link, topic, batch, result } => {
                self.rep.handle_appended(now, &peer, link, &topic, batch, result.map_err(|e| e.to_string()));
            }
            Event::Edit { change, reply } => {
                let applied = match change {
                    Change::Namespace(namespace, edit) => {
                        self.rep.edit_config(&namespace, edit, now).map_err(|e| NodeError::Namespace(e.to_string()))
                    }
                    Change::Entry(signed) => self.rep.apply_signed(*signed).map_err(|e| match e {
                        EntryError::Signature(_) => NodeError::Forbidden(e.to_string()),
                        EntryError::Unknown(_) => NodeError::NotFound(e.to_string()),
                        EntryError::Malformed(..) => NodeError::Malformed(e.to_string()),
                    }),
                };
                if let Err(e) = applied {
                    let _ = reply.send(Err(e));
                    return;
                }
                // An acknowledged edit is durable, like an acknowledged message: save the
                // catalogue and flush before answering (found by the simulation: a crash
                // right after 'ns set-clusters' lost the edit, and nothing replicated).
                self.execute();
                let (env, meta) = (self.ctx.registry.env.clone(), Arc::clone(&self.ctx.registry.meta));
                tokio::spawn(async move {
                    let flushed = env.run_blocking(move || meta.flush()).await;
                    let why = |e| NodeError::Namespace(format!("the edit could not be made durable: {e}"));
                    let _ = reply.send(flushed.map_err(why));
                });
            }
            Event::Config { reply } => {
                let _ = reply.send(self.rep.config().clone());
            }
            Event::Stats { reply } => self.stats(reply),
            Event::Retained { topics, reply } => {
                let _ = reply.send(topics.iter().map(|t| self.rep.retained_from(t)).collect());
            }
            Event::BlobRead { peer, link, hash, offset, read } => {
                for message in blob_chunks(hash, offset, read) {
                    self.send(&peer, link, message);
                }
            }
            Event::BlobStored { hash, stored: true } => self.rep.handle_blob_stored(hash),
            Event::BlobStored { hash, stored: false } => self.rep.handle_blob_store_failed(hash),
        }
    }

    fn link_opened(&mut self, peer: NodeName, conn: Connection, dialed_by_us: bool) {
        if !dialed_by_us && let Some(dials) = self.peer_dials.get(&peer) {
            dials.store(true, Ordering::Relaxed);
        }
        self.next_link += 1;
        let link = LinkId(self.next_link);
        tracing::info!(%peer, %link, remote = %conn.remote_address(), dialed_by_us, "peer link opened");
        self.links.insert(link, LinkConn::start(peer.clone(), conn, link, self.tx.clone()));
        self.rep.handle_link_opened(self.now_ms(), &peer, link, dialed_by_us);
    }

    fn count_closed(&mut self, link: &LinkConn) {
        *self.closed_link_bytes.entry(link.peer.clone()).or_default() += link.conn.stats().udp_tx.bytes;
    }

    /// What this node durably holds, per topic, for a Hello.
    fn holds(&self) -> Vec<(TopicName, rill_replication::core::Summary)> {
        self.ctx.registry.list().iter().map(|t| (t.name.clone(), t.summary())).collect()
    }

    fn execute(&mut self) {
        while let Some(action) = self.rep.poll_action() {
            match action {
                Action::Send { peer, link, message } => self.send(&peer, link, message),
                Action::Greet { peer, link } => {
                    let hello = self.rep.hello(self.holds());
                    self.send(&peer, link, hello);
                }
                Action::Read { peer, topic, from, max_messages, max_bytes, ticket } => {
                    let (registry, tx) = (Arc::clone(&self.ctx.registry), self.tx.clone());
                    tokio::spawn(async move {
                        let result = match registry.topic(&topic).await {
                            Ok(t) => t.read(from, max_messages, max_bytes).await,
                            Err(e) => Err(e),
                        };
                        let _ = tx.send(Event::Read { peer, topic, ticket, result }).await;
                    });
                }
                Action::Append { peer, link, topic, batch, messages } => {
                    self.append(peer, link, topic, batch, messages);
                }
                Action::SaveCursor { peer, topic, offset } => {
                    let key = keys::repl_cursor(&peer, &topic);
                    if let Err(e) = meta::put_record(self.ctx.registry.meta.as_ref(), &key, &offset) {
                        tracing::warn!(key, error = %e, "could not save replication cursor; will resend from the old one");
                    }
                }
                Action::EntryRefused { peer, why } => {
                    self.ctx.authz.entry_refused();
                    tracing::warn!(%peer, %why, "refused a catalogue entry from a peer");
                }
                Action::SaveConfig => {
                    self.ctx.authz.update(self.rep.config());
                    if let Err(e) = self.ctx.registry.meta.put(keys::CATALOGUE, &self.rep.config().encode()) {
                        tracing::warn!(error = %e, "could not save the namespace catalogue; peers will resend it");
                    }
                }
                Action::ReadBlob { peer, link, hash, offset, len } => {
                    let (env, blobs, tx) =
                        (self.ctx.registry.env.clone(), self.ctx.registry.blobs.clone(), self.tx.clone());
                    tokio::spawn(async move {
                        let read = env.run_blocking(move || blobs.read_range(&hash, offset, len)).await;
                        let read = read.unwrap_or_else(|e| {
                            tracing::warn!(%peer, error = %e, "could not read a blob a peer asked for");
                            None
                        });
                        let _ = tx.send(Event::BlobRead { peer, link, hash, offset, read }).await;
                    });
                }
                Action::StoreBlob { hash, bytes } => {
                    let (env, blobs, tx) =
                        (self.ctx.registry.env.clone(), self.ctx.registry.blobs.clone(), self.tx.clone());
                    tokio::spawn(async move {
                        let stored = env.run_blocking(move || blobs.put(&bytes)).await;
                        if let Err(e) = &stored {
                            tracing::warn!(error = %e, "could not store a blob fetched from a peer; will fetch it again");
                        }
                        let _ = tx.send(Event::BlobStored { hash, stored: stored.is_ok() }).await;
                    });
                }
                Action::CloseLink { peer, link, reason } => {
                    if let Some(l) = self.links.remove(&link) {
                        tracing::info!(%peer, %link, %reason, "closing peer link");
                        l.conn.close(close_code(&reason).into(), reason.to_string().as_bytes());
                        self.count_closed(&l);
                    }
                }
            }
        }
        self.sync_links();
    }

    /// Brings the dialers' view and the appenders in line with the core's links: an
    /// appender of a link that no longer counts is stopped.
    fn sync_links(&mut self) {
        for (peer, state) in &self.greeted {
            let up = self.rep.link(peer).is_some();
            state.send_if_modified(|s| std::mem::replace(s, up) != up);
        }
        let rep = &self.rep;
        self.appenders.retain(|(peer, _), a| rep.current_link(peer) == Some(a.link));
    }

    fn send(&mut self, peer: &NodeName, link: LinkId, message: PeerMessage) {
        let Some(conn) = self.links.get_mut(&link) else { return };
        if let PeerMessage::Batch { topic, messages, batch } = &message
            && tracing::enabled!(tracing::Level::DEBUG)
        {
            let first = messages.first().map(|m| (m.origin.to_string(), m.id.to_string()));
            let last = messages.last().map(|m| (m.origin.to_string(), m.id.to_string()));
            tracing::debug!(%peer, %link, %topic, batch, count = messages.len(), ?first, ?last, "shipping batch");
        }
        if !conn.send(message) {
            tracing::info!(%peer, %link, "outgoing stream queue full or closed; closing the link");
            conn.conn.close(CloseCode::Stalled.into(), b"outgoing stream queue full");
        }
    }

    fn append(
        &mut self,
        peer: NodeName,
        link: LinkId,
        topic: TopicName,
        batch: u64,
        messages: Vec<rill_storage::Message>,
    ) {
        let key = (peer.clone(), topic.clone());
        if self.appenders.get(&key).is_none_or(|a| a.link != link) {
            let handle = AppenderHandle::start(Arc::clone(&self.ctx), peer.clone(), link, topic, self.tx.clone());
            self.appenders.insert(key.clone(), handle);
        }
        match self.appenders[&key].queue(batch, messages) {
            Queued::Yes | Queued::Stopped => {}
            Queued::Full => {
                if let Some(l) = self.links.get(&link) {
                    tracing::info!(%peer, %link, "peer sent more batches than allowed in flight; closing the link");
                    l.conn.close(CloseCode::Stalled.into(), b"more batches than allowed in flight");
                }
            }
        }
    }

    /// Answers a stats request. The lanes' figures that need the log (bytes behind, age
    /// of the oldest unreplicated message) are read off the driver's task.
    fn stats(&self, reply: oneshot::Sender<Vec<PeerStats>>) {
        let lanes = self.rep.lanes();
        let mut peers = Vec::new();
        let mut lags = Vec::new();
        for (i, peer) in self.greeted.keys().enumerate() {
            let links = self.rep.link_stats(peer);
            let open_bytes: u64 =
                self.links.values().filter(|l| l.peer == *peer).map(|l| l.conn.stats().udp_tx.bytes).sum();
            let mut stats = PeerStats {
                name: peer.to_string(),
                connected: self.rep.link(peer).is_some(),
                link_bytes_sent: self.closed_link_bytes.get(peer).copied().unwrap_or(0) + open_bytes,
                link_ups: links.ups,
                link_replacements: links.replacements,
                link_refusals: links.refusals,
                last_link_change_ms: links.last_change_ms,
                lanes: Vec::new(),
            };
            for (_, topic, s) in lanes.iter().filter(|(p, _, _)| p == peer) {
                if let (1.., Some(t)) = (s.lag_messages, self.ctx.registry.topic_if_open(topic)) {
                    lags.push((i, stats.lanes.len(), t, s.cursor));
                }
                stats.lanes.push(lane_stats(topic, s));
            }
            peers.push(stats);
        }
        let env = self.ctx.registry.env.clone();
        let now_ms = self.now_ms();
        tokio::spawn(async move {
            let peers = env
                .run_blocking(move || {
                    for (peer, lane, topic, cursor) in lags {
                        let stats = &mut peers[peer].lanes[lane];
                        stats.lag_bytes = topic.bytes_from(cursor);
                        stats.lag_ms = topic.publish_time_from(cursor).map_or(0, |t| now_ms.saturating_sub(t));
                    }
                    peers
                })
                .await;
            let _ = reply.send(peers);
        });
    }
}

/// The blobs held whole at start: each is read and checked against its name, so a file
/// torn by a crash is removed (and fetched again) rather than offered to peers.
fn whole_blobs(blobs: &rill_storage::blobs::Blobs) -> Result<Vec<Hash>, StorageError> {
    let mut whole = Vec::new();
    for hash in blobs.list()? {
        if blobs.get(&hash)?.is_some() {
            whole.push(hash);
        }
    }
    Ok(whole)
}

/// One lane's figures, without those read from the log.
fn lane_stats(topic: &TopicName, s: &rill_replication::core::LaneStats) -> LaneStats {
    LaneStats {
        topic: topic.to_string(),
        lag_messages: s.lag_messages,
        lag_bytes: 0,
        lag_ms: 0,
        cursor: s.cursor,
        in_flight: s.in_flight as u64,
        sent: s.counters.sent,
        received: s.counters.received,
        deduplicated: s.counters.deduplicated,
    }
}

/// Why a connection ended, for the log.
fn close_reason(conn: &Connection) -> String {
    conn.close_reason().map_or_else(|| "unknown".to_string(), |e| e.to_string())
}

#[cfg(test)]
mod tests {
    use rill_replication::{
        hlc::Hlc,
        namespace::{ConfigDoc, Edit, Stamp},
    };
    use rill_storage::meta::{MemMeta, MetaStore};

    use super::*;

    #[test]
    fn the_catalogue_is_read_from_its_versioned_record_else_from_wave_1s() {
        let meta = MemMeta::default();
        assert!(load_catalogue(&meta).unwrap().is_empty());
        let mut doc = ConfigDoc::default();
        let stamp = Stamp { hlc: Hlc { wall_ms: 1, logical: 0 }, node: "a".into() };
        doc.apply(&rill_storage::NamespaceName::parse("t/n").unwrap(), Edit::Create, stamp).unwrap();
        // Wave 1 stored the document's postcard form, without a version byte, here.
        meta.put(keys::CATALOGUE_V1, &doc.encode()[1..]).unwrap();
        assert!(load_catalogue(&meta).unwrap().get("t/n").is_some());
        meta.put(keys::CATALOGUE, &ConfigDoc::default().encode()).unwrap();
        assert!(load_catalogue(&meta).unwrap().is_empty(), "the versioned record wins");
        meta.put(keys::CATALOGUE, &[7]).unwrap();
        assert!(load_catalogue(&meta).unwrap_err().to_string().contains("version 7"));
    }
}

//! The replication driver: binds the sans-IO [`Replicator`] to QUIC peer links and the
//! node's topics. One task owns the core and executes its actions; link readers, dialers,
//! reads and appends run as tasks that report back through one bounded event channel.
//!
//! Streams on a link: each side opens its own unidirectional streams, one for control
//! messages (Hello, config deltas, acks) and one per namespace for batches, so one
//! namespace's backlog never waits behind another's.
//!
//! One connection per peer pair: both sides may dial; when two links to the same peer
//! exist, both keep the one dialed by the node with the smaller name.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use quinn::{Connection, Endpoint};
use rill_replication::{
    core::{Action, Holds, PeerMessage, Replicator, Settings},
    namespace::{ConfigDoc, Edit},
};
use rill_storage::{Message, StorageError, StoredMessage, TopicName, meta, topic::AppendOutcome};
use rill_transport::{backoff::Backoff, frame};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::{
    config::PeerConfig,
    protocol::{LaneStats, PeerStats},
    server::Shared,
};

/// Events queued for the driver; senders wait when it is full.
const EVENTS_MAX: usize = 4096;
/// Messages queued per outgoing stream. The core keeps at most `inflight_batches_max`
/// batches in flight per topic, so this bounds a namespace of up to 500 busy topics.
const STREAM_QUEUE_MAX: usize = 4096;
/// Batches queued per (peer, topic) appender; the peer has at most
/// `inflight_batches_max` in flight per lane.
const APPEND_QUEUE_MAX: usize = 64;
/// Largest frame accepted from a peer (a batch is at most ~1 MiB of payload).
const PEER_FRAME_BYTES_MAX: u32 = 16 << 20;
/// How long a lane whose append failed (a disk error) waits before its link is dropped.
const FAILED_APPEND_PAUSE: Duration = Duration::from_secs(1);
/// Metadata key of the catalogue.
const CONFIG_KEY: &str = "repl/config";

fn cursor_key(peer: &str, topic: &TopicName) -> String {
    format!("repl/cursor/{peer}/{topic}")
}

/// What the driver reacts to.
pub(crate) enum Event {
    Link { peer: String, conn: Connection, dialed_by: String },
    LinkClosed { peer: String, id: u64 },
    Message { peer: String, id: u64, message: PeerMessage },
    Read { peer: String, topic: TopicName, ticket: u64, result: Result<Vec<StoredMessage>, StorageError> },
    Appended { peer: String, link: u64, topic: TopicName, batch: u64, result: Result<u64, String> },
    Edit { namespace: String, edit: Edit, reply: oneshot::Sender<Result<(), String>> },
    Config { reply: oneshot::Sender<ConfigDoc> },
    Stats { reply: oneshot::Sender<Vec<PeerStats>> },
    Retained { topics: Vec<TopicName>, reply: oneshot::Sender<Vec<u64>> },
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
    pub(crate) async fn attach(&self, peer: String, conn: Connection) {
        let dialed_by = peer.clone();
        let _ = self.tx.send(Event::Link { peer, conn, dialed_by }).await;
    }

    pub(crate) async fn edit(&self, namespace: String, edit: Edit) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Event::Edit { namespace, edit, reply }).await.map_err(|_| "replication stopped".to_string())?;
        rx.await.map_err(|_| "replication stopped".to_string())?
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

    /// Per topic, the lowest offset a peer may still need from this node (0 when the
    /// driver cannot answer: keep everything).
    pub(crate) async fn retained_from(&self, topics: Vec<TopicName>) -> Vec<u64> {
        let n = topics.len();
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Event::Retained { topics, reply }).await;
        rx.await.unwrap_or_else(|_| vec![0; n])
    }
}

struct Link {
    id: u64,
    conn: Connection,
    dialed_by: String,
    streams: BTreeMap<String, mpsc::Sender<PeerMessage>>,
}

/// Messages moved on one (peer, topic) lane since start.
#[derive(Debug, Default, Clone, Copy)]
struct LaneCounters {
    sent: u64,
    received: u64,
    deduplicated: u64,
}

/// A lane's queue of batches to append: (batch number, messages).
type AppendQueue = mpsc::Sender<(u64, Vec<Message>)>;

struct Driver {
    shared: Arc<Shared>,
    rep: Replicator,
    links: BTreeMap<String, Link>,
    link_state: BTreeMap<String, watch::Sender<bool>>,
    /// Per peer: it has dialed this node (so both sides dial).
    peer_dials: BTreeMap<String, Arc<AtomicBool>>,
    appenders: BTreeMap<(String, TopicName), AppendQueue>,
    counters: BTreeMap<(String, TopicName), LaneCounters>,
    /// UDP bytes sent on links to each peer that have closed.
    closed_link_bytes: BTreeMap<String, u64>,
    tx: mpsc::Sender<Event>,
    next_link: u64,
}

/// Starts the driver and a dialer per peer with an address.
pub(crate) fn start(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    peer_client: quinn::ClientConfig,
    handle: &MeshHandle,
    rx: mpsc::Receiver<Event>,
) -> Result<(), StorageError> {
    let config: ConfigDoc = meta::get_record(shared.meta.as_ref(), CONFIG_KEY)?.unwrap_or_default();
    let mut rep = Replicator::new(
        &shared.name,
        Settings { bug_skip_batch: shared.env.bugs.skip_batch, ..Settings::default() },
        config,
    );
    let (mut link_state, mut peer_dials) = (BTreeMap::new(), BTreeMap::new());
    for p in &shared.config.peers {
        rep.add_peer(&p.name);
        let (state, _) = watch::channel(false);
        link_state.insert(p.name.clone(), state);
        peer_dials.insert(p.name.clone(), Arc::new(AtomicBool::new(false)));
    }
    for (key, value) in shared.meta.scan_prefix("repl/cursor/")? {
        let rest = key.trim_start_matches("repl/cursor/");
        let Some((peer, topic)) = rest.split_once('/') else { continue };
        let (Ok(topic), Ok(offset)) = (TopicName::parse(topic), postcard::from_bytes::<u64>(&value)) else { continue };
        rep.restore_cursor(peer, &topic, offset);
    }
    for p in shared.config.peers.iter().filter(|p| p.addr.is_some()) {
        let state = link_state[&p.name].subscribe();
        let dialer = Dialer { shared: Arc::clone(&shared), endpoint: endpoint.clone(), client: peer_client.clone() };
        let span = tracing::info_span!("peer", name = %p.name);
        let dials = Arc::clone(&peer_dials[&p.name]);
        tokio::spawn(dialer.run(p.clone(), handle.tx.clone(), state, dials).instrument(span));
    }
    let driver = Driver {
        shared,
        rep,
        links: BTreeMap::new(),
        link_state,
        peer_dials,
        appenders: BTreeMap::new(),
        counters: BTreeMap::new(),
        closed_link_bytes: BTreeMap::new(),
        tx: handle.tx.clone(),
        next_link: 0,
    };
    tokio::spawn(driver.run(rx).in_current_span());
    Ok(())
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let growth = Arc::clone(&self.shared.growth);
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
            }
            self.execute();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Link { peer, conn, dialed_by } => self.link_up(peer, conn, dialed_by),
            Event::LinkClosed { peer, id } => {
                if self.links.get(&peer).is_some_and(|l| l.id == id) {
                    self.link_down(&peer, "connection closed");
                }
            }
            Event::Message { peer, id, message } => {
                if self.links.get(&peer).is_some_and(|l| l.id == id) {
                    if let PeerMessage::Batch { topic, messages, .. } = &message {
                        self.counters.entry((peer.clone(), topic.clone())).or_default().received +=
                            messages.len() as u64;
                    }
                    self.rep.handle_message(&peer, message);
                }
            }
            Event::Read { peer, topic, ticket, result } => {
                let messages = result.unwrap_or_else(|e| {
                    tracing::warn!(peer, %topic, error = %e, "replication read failed; retrying when the log grows");
                    Vec::new()
                });
                self.rep.handle_read(&peer, &topic, ticket, messages);
            }
            Event::Appended { peer, link, topic, batch, result } => {
                // Batch numbers belong to a link: a result from an appender of a link that
                // has since been replaced must not acknowledge the new link's batch with the
                // same number (that lost messages; found by the simulation).
                if self.links.get(&peer).is_none_or(|l| l.id != link) {
                    return;
                }
                if let Ok(duplicates) = &result {
                    self.counters.entry((peer.clone(), topic.clone())).or_default().deduplicated += duplicates;
                }
                self.rep.handle_appended(&peer, &topic, batch, result.map(drop));
            }
            Event::Edit { namespace, edit, reply } => {
                let now = self.shared.env.clock.now_ms();
                let result = self.rep.edit_config(&namespace, edit, now).map_err(|e| e.to_string());
                // An acknowledged edit is durable, like an acknowledged message: save the
                // catalogue and flush before answering (found by the simulation: a crash
                // right after 'ns set-clusters' lost the edit, and nothing replicated).
                self.execute();
                let result = result.and_then(|()| {
                    self.shared.meta.flush().map_err(|e| format!("the edit could not be made durable: {e}"))
                });
                let _ = reply.send(result);
            }
            Event::Config { reply } => {
                let _ = reply.send(self.rep.config().clone());
            }
            Event::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Event::Retained { topics, reply } => {
                let _ = reply.send(topics.iter().map(|t| self.rep.retained_from(t)).collect());
            }
        }
    }

    fn link_up(&mut self, peer: String, conn: Connection, dialed_by: String) {
        if !self.link_state.contains_key(&peer) {
            conn.close(2u32.into(), b"not a configured peer");
            return;
        }
        if dialed_by == peer
            && let Some(dials) = self.peer_dials.get(&peer)
        {
            dials.store(true, Ordering::Relaxed);
        }
        if let Some(current) = self.links.get(&peer)
            && current.conn.close_reason().is_none()
        {
            // Keep the link the smaller name dialed. The same dialer dialing again means its
            // old link is dead (it restarted): the new one wins.
            if current.dialed_by < dialed_by {
                conn.close(0u32.into(), b"duplicate link");
                *self.closed_link_bytes.entry(peer).or_default() += conn.stats().udp_tx.bytes;
                return;
            }
            let old = self.links.remove(&peer).expect("checked above");
            tracing::info!(peer, "peer link replaced by the one the smaller name dialed");
            old.conn.close(0u32.into(), b"replaced by the link the smaller name dialed");
            *self.closed_link_bytes.entry(peer.clone()).or_default() += old.conn.stats().udp_tx.bytes;
            self.appenders.retain(|(p, _), _| *p != peer);
            self.rep.handle_link_replaced(&peer);
        }
        self.next_link += 1;
        let id = self.next_link;
        tracing::info!(peer, remote = %conn.remote_address(), dialed_by, "peer link up");
        let span = tracing::info_span!("peer", name = %peer);
        tokio::spawn(read_link(conn.clone(), peer.clone(), id, self.tx.clone()).instrument(span));
        self.links.insert(peer.clone(), Link { id, conn, dialed_by, streams: BTreeMap::new() });
        let holds = self.holds();
        self.rep.handle_link_up(&peer, holds);
        if let Some(state) = self.link_state.get(&peer) {
            state.send_replace(true);
        }
    }

    fn link_down(&mut self, peer: &str, reason: &str) {
        if let Some(link) = self.links.remove(peer) {
            tracing::info!(peer, reason, "peer link down");
            link.conn.close(0u32.into(), reason.as_bytes());
            *self.closed_link_bytes.entry(peer.to_string()).or_default() += link.conn.stats().udp_tx.bytes;
        }
        self.appenders.retain(|(p, _), _| p != peer);
        self.rep.handle_link_down(peer);
        if let Some(state) = self.link_state.get(peer) {
            state.send_replace(false);
        }
    }

    /// What this node holds, per topic, for a Hello.
    fn holds(&self) -> Vec<(TopicName, Holds)> {
        self.shared
            .topic_list()
            .iter()
            .map(|t| (t.name.clone(), t.store.lock().expect("topic lock poisoned").dedup().snapshot(0)))
            .collect()
    }

    fn execute(&mut self) {
        while let Some(action) = self.rep.poll_action() {
            match action {
                Action::Send { peer, message } => self.send(&peer, message),
                Action::Read { peer, topic, from, max_messages, max_bytes, ticket } => {
                    let (shared, tx) = (Arc::clone(&self.shared), self.tx.clone());
                    tokio::spawn(async move {
                        let result = match shared.topic(&topic).await {
                            Ok(t) => t.read(from, max_messages, max_bytes).await,
                            Err(e) => Err(e),
                        };
                        let _ = tx.send(Event::Read { peer, topic, ticket, result }).await;
                    });
                }
                Action::Append { peer, topic, batch, messages } => self.append(peer, topic, batch, messages),
                Action::SaveCursor { peer, topic, offset } => {
                    let key = cursor_key(&peer, &topic);
                    if let Err(e) = meta::put_record(self.shared.meta.as_ref(), &key, &offset) {
                        tracing::warn!(key, error = %e, "could not save replication cursor; will resend from the old one");
                    }
                }
                Action::SaveConfig => {
                    if let Err(e) = meta::put_record(self.shared.meta.as_ref(), CONFIG_KEY, self.rep.config()) {
                        tracing::warn!(error = %e, "could not save the namespace catalogue; peers will resend it");
                    }
                }
                Action::DropLink { peer, reason } => self.link_down(&peer, &reason),
            }
        }
    }

    fn send(&mut self, peer: &str, message: PeerMessage) {
        let Some(link) = self.links.get_mut(peer) else { return };
        if let PeerMessage::Batch { topic, messages, batch } = &message {
            self.counters.entry((peer.to_string(), topic.clone())).or_default().sent += messages.len() as u64;
            if tracing::enabled!(tracing::Level::DEBUG) {
                let first = messages.first().map(|m| (m.origin.to_string(), m.id.to_string()));
                let last = messages.last().map(|m| (m.origin.to_string(), m.id.to_string()));
                tracing::debug!(peer, %topic, batch, count = messages.len(), ?first, ?last, "shipping batch");
            }
        }
        let stream = match &message {
            PeerMessage::Batch { topic, .. } => format!("ns:{}/{}", topic.tenant(), topic.namespace()),
            _ => "control".to_string(),
        };
        let queue = link.streams.entry(stream).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(STREAM_QUEUE_MAX);
            tokio::spawn(write_stream(link.conn.clone(), rx).in_current_span());
            tx
        });
        if queue.try_send(message).is_err() {
            self.link_down(peer, "outgoing stream queue full or closed");
        }
    }

    fn append(&mut self, peer: String, topic: TopicName, batch: u64, messages: Vec<Message>) {
        let Some(link) = self.links.get(&peer).map(|l| l.id) else { return };
        let key = (peer.clone(), topic.clone());
        let queue = self.appenders.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(APPEND_QUEUE_MAX);
            let appender =
                Appender { shared: Arc::clone(&self.shared), peer: peer.clone(), link, topic, events: self.tx.clone() };
            tokio::spawn(appender.run(rx).in_current_span());
            tx
        });
        match queue.try_send((batch, messages)) {
            Ok(()) => {}
            // The lane's appender stopped at a failed append; the link is being dropped and
            // the peer resends from its cursor.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.link_down(&peer, "peer sent more batches than allowed in flight");
            }
        }
    }

    fn stats(&self) -> Vec<PeerStats> {
        let lanes = self.rep.lanes();
        let now_ms = self.shared.env.clock.now_ms();
        self.link_state
            .keys()
            .map(|peer| PeerStats {
                name: peer.clone(),
                connected: self.rep.is_up(peer),
                link_bytes_sent: self.closed_link_bytes.get(peer).copied().unwrap_or(0)
                    + self.links.get(peer).map_or(0, |l| l.conn.stats().udp_tx.bytes),
                lanes: lanes
                    .iter()
                    .filter(|(p, _, _)| p == peer)
                    .map(|(_, topic, s)| self.lane_stats(peer, topic, s, now_ms))
                    .collect(),
            })
            .collect()
    }

    /// One lane's figures; the age of its oldest unreplicated message is read from the log.
    fn lane_stats(
        &self,
        peer: &str,
        topic: &TopicName,
        s: &rill_replication::core::LaneStats,
        now_ms: u64,
    ) -> LaneStats {
        let c = self.counters.get(&(peer.to_string(), topic.clone())).copied().unwrap_or_default();
        let (lag_bytes, lag_ms) = match (s.lag_messages, self.shared.topic_if_open(topic)) {
            (1.., Some(t)) => {
                let store = t.store.lock().expect("topic lock poisoned");
                let oldest = store.read(s.cursor, 1, 1).ok().and_then(|m| m.first().map(|m| m.message.publish_time_ms));
                (store.log().bytes_from(s.cursor), oldest.map_or(0, |t| now_ms.saturating_sub(t)))
            }
            _ => (0, 0),
        };
        LaneStats {
            topic: topic.to_string(),
            lag_messages: s.lag_messages,
            lag_bytes,
            lag_ms,
            cursor: s.cursor,
            in_flight: s.in_flight as u64,
            sent: c.sent,
            received: c.received,
            deduplicated: c.deduplicated,
        }
    }
}

/// Appends a lane's batches in the order they arrived, one at a time, and reports each.
struct Appender {
    shared: Arc<Shared>,
    peer: String,
    /// The link whose batches it appends.
    link: u64,
    topic: TopicName,
    events: mpsc::Sender<Event>,
}

impl Appender {
    async fn run(self, mut rx: mpsc::Receiver<(u64, Vec<Message>)>) {
        while let Some((batch, messages)) = rx.recv().await {
            let result = match self.shared.topic(&self.topic).await {
                Ok(t) => match t.append(messages).await {
                    Some(reply) => match reply.await {
                        Ok(Ok(outcomes)) => {
                            Ok(outcomes.iter().filter(|o| matches!(o, AppendOutcome::Duplicate { .. })).count() as u64)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("the write was abandoned".to_string()),
                    },
                    None => Err("the topic is closing".to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
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
async fn read_link(conn: Connection, peer: String, id: u64, tx: mpsc::Sender<Event>) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let (conn, peer, tx) = (conn.clone(), peer.clone(), tx.clone());
        tokio::spawn(
            async move {
                let mut buf = Vec::new();
                loop {
                    match frame::read_frame::<_, PeerMessage>(&mut recv, PEER_FRAME_BYTES_MAX, &mut buf).await {
                        Ok(Some(message)) => {
                            if tx.send(Event::Message { peer: peer.clone(), id, message }).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) | Err(frame::FrameError::Io(_)) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "bad frame from peer; closing the link");
                            conn.close(3u32.into(), b"bad frame");
                            return;
                        }
                    }
                }
            }
            .in_current_span(),
        );
    }
    let _ = tx.send(Event::LinkClosed { peer, id }).await;
}

/// Keeps a link to one peer: dials while it is down, one attempt at a time. An attempt
/// that gets no answer is abandoned and a new one started, rather than left to QUIC's
/// Initial retransmission backoff, so that a path that comes back is found quickly.
struct Dialer {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
}

/// Gaps between dial attempts for the first two minutes of an outage: at most 250 ms.
/// With attempts of 1.2 s whose Initial is resent after 0.3 s and 0.9 s (peer links start
/// from a 100 ms round-trip estimate), an Initial leaves at least every 0.55 s, so a
/// path that comes back is found within a second (an uplink that flaps is the common
/// case at the edge).
const DIAL_BACKOFF_FAST_MS: (u64, u64) = (50, 250);
const DIAL_FAST_FOR: Duration = Duration::from_secs(120);
/// Gaps after that, up to 5 s, so a fleet of edges does not hammer a region that is away
/// for long; attempts then double up to 10 s, for paths slower than they were.
const DIAL_BACKOFF_MS: (u64, u64) = (400, 5_000);
/// The shortest attempt; an attempt lasts at least four round trips of the last link.
const DIAL_ATTEMPT_MS: u64 = 1_200;
const DIAL_ATTEMPT_MAX: Duration = Duration::from_secs(10);
/// Head start the smaller name gets when the peer dials too: the link the smaller name
/// dialed is kept, so the larger waits this long before dialing and skips it if a link
/// came up meanwhile. Without it both links form and one is torn down mid-transfer. A
/// peer that has never dialed (an edge behind NAT, for its region) gets no head start.
const DIAL_DEFER_MS: u64 = 500;

impl Dialer {
    async fn run(
        self,
        peer: PeerConfig,
        tx: mpsc::Sender<Event>,
        mut state: watch::Receiver<bool>,
        peer_dials: Arc<AtomicBool>,
    ) {
        let Some(addr) = peer.addr else { return };
        let mut fast = Backoff::new(DIAL_BACKOFF_FAST_MS.0, DIAL_BACKOFF_FAST_MS.1);
        let mut slow = Backoff::new(DIAL_BACKOFF_MS.0, DIAL_BACKOFF_MS.1);
        let mut base = Duration::from_millis(DIAL_ATTEMPT_MS);
        let mut attempt = base;
        let mut down_since = tokio::time::Instant::now();
        loop {
            if *state.borrow() {
                while *state.borrow_and_update() {
                    if state.changed().await.is_err() {
                        return;
                    }
                }
                down_since = tokio::time::Instant::now();
            }
            if self.shared.name > peer.name && peer_dials.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(DIAL_DEFER_MS), state.changed()).await;
                if *state.borrow_and_update() {
                    continue;
                }
            }
            let fast_phase = down_since.elapsed() < DIAL_FAST_FOR;
            match self.dial(&peer.name, addr, attempt).await {
                Ok(conn) => {
                    fast.reset();
                    slow.reset();
                    base = (conn.rtt() * 4).clamp(Duration::from_millis(DIAL_ATTEMPT_MS), DIAL_ATTEMPT_MAX);
                    attempt = base;
                    let event = Event::Link { peer: peer.name.clone(), conn, dialed_by: self.shared.name.clone() };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    // Give the driver time to take the link before checking the state again.
                    let _ = tokio::time::timeout(Duration::from_secs(5), state.changed()).await;
                    continue;
                }
                Err(reason) => {
                    tracing::debug!(%addr, reason, "dial failed");
                    attempt = if fast_phase { base } else { (attempt * 2).min(DIAL_ATTEMPT_MAX) };
                }
            }
            let backoff = if fast_phase { &mut fast } else { &mut slow };
            let delay = backoff.next_delay_ms(self.shared.env.random.next_u64());
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    async fn dial(&self, name: &str, addr: SocketAddr, attempt: Duration) -> Result<Connection, String> {
        let connecting = self.endpoint.connect_with(self.client.clone(), addr, name).map_err(|e| e.to_string())?;
        match tokio::time::timeout(attempt, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => {
                tracing::info!(%addr, error = %e, "peer handshake failed");
                Err(e.to_string())
            }
            Err(_) => Err(format!("no handshake within {} ms", attempt.as_millis())),
        }
    }
}

//! The replication core: a sans-IO state machine in the shape of quinn-proto. Inputs are
//! `handle_*` calls ("link to peer P came up", "local log of T grew to N", "peer said X",
//! "the read you asked for returned these messages"); outputs are [`Action`]s drained with
//! [`Replicator::poll_action`]. It opens no socket, reads no clock and spawns nothing, so
//! tests drive whole meshes of it in memory.
//!
//! Per (peer, topic) a *lane* ships the local log in order from a cursor: it asks the
//! driver to read a batch, leaves out what the peer is known to hold, sends the rest, and
//! advances the cursor when the peer acknowledges (the peer acks only after its append is
//! durable). What a peer holds is learned only from the peer itself: its summary when the
//! link comes up, its acks, and the messages it sends us. That makes forwarding safe:
//! - a message is never sent back to where it came from (the sender holds it);
//! - every lane delivers an origin's messages to a peer as a contiguous, in-order run
//!   starting at the first one the peer lacks, so a message that reaches a node along two
//!   paths arrives in the same order on both, and the second copy is dropped by dedup.
//!   Per-producer order therefore holds across multi-hop relays.
//!
//! A lane ships only while the topic's namespace lists both nodes in its clusters, and
//! relays transitively: whatever a node appends (from a producer or a peer) grows its log
//! and is shipped on its other lanes.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rill_storage::{
    Message, StoredMessage, TopicName,
    dedup::{DedupIndex, DedupSnapshot},
};
use serde::{Deserialize, Serialize};

use crate::{
    hlc::HlcClock,
    namespace::{ConfigDoc, Edit, EditError, Stamp},
};

/// Limits of the core.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Messages per batch.
    pub batch_messages_max: usize,
    /// Payload bytes per batch (about; whole messages).
    pub batch_bytes_max: usize,
    /// Batches in flight per lane; with the batch limits this bounds the memory a lane pins
    /// on both sides.
    pub inflight_batches_max: usize,
    /// An injected bug for the simulation's checker to find: each lane skips its second
    /// batch (advances past it without sending it). Never set outside that test.
    pub bug_skip_batch: bool,
}

impl Default for Settings {
    fn default() -> Self {
        // 1000 x 256 B messages per batch amortise a round trip; 8 in flight keep a 10 ms
        // link busy at ~200 MB/s while pinning at most 8 MiB per lane.
        Settings { batch_messages_max: 1000, batch_bytes_max: 1 << 20, inflight_batches_max: 8, bug_skip_batch: false }
    }
}

/// What the seqs held for one topic look like, per producer.
pub type Holds = DedupSnapshot;

/// Messages between peers (the replication part of the peer protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First message on a link: the sender's config, what it holds per topic, and the
    /// peers it has live links to (so relays know which nodes it serves directly).
    Hello {
        /// The sender's namespace catalogue.
        config: ConfigDoc,
        /// What it holds, per topic.
        holds: Vec<(TopicName, Holds)>,
        /// The peers the sender has live links to.
        links: BTreeSet<String>,
    },
    /// The sender's set of live links changed.
    Links(BTreeSet<String>),
    /// Namespaces that changed (a delta of the catalogue).
    Config(ConfigDoc),
    /// Messages of one topic, in the sender's log order.
    Batch {
        /// The topic.
        topic: TopicName,
        /// Batch number on this lane (acks name it).
        batch: u64,
        /// The messages.
        messages: Vec<Message>,
    },
    /// The receiver stored a batch durably.
    Ack {
        /// The topic.
        topic: TopicName,
        /// The batch number.
        batch: u64,
    },
}

/// What the core asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message to a peer (dropped if the link is gone; the core copes).
    Send {
        /// The peer.
        peer: String,
        /// The message.
        message: PeerMessage,
    },
    /// Read durable messages of a topic from `from` and report them with
    /// [`Replicator::handle_read`], passing `ticket` back.
    Read {
        /// For whom.
        peer: String,
        /// The topic.
        topic: TopicName,
        /// First offset wanted.
        from: u64,
        /// At most this many messages.
        max_messages: usize,
        /// About this many payload bytes.
        max_bytes: usize,
        /// Identifies the request; a stale answer is ignored.
        ticket: u64,
    },
    /// Append messages received from a peer (with dedup) and report with
    /// [`Replicator::handle_appended`].
    Append {
        /// Who sent them.
        peer: String,
        /// The topic.
        topic: TopicName,
        /// The sender's batch number.
        batch: u64,
        /// The messages.
        messages: Vec<Message>,
    },
    /// Persist a lane's cursor (everything below `offset` is held by the peer).
    SaveCursor {
        /// The peer.
        peer: String,
        /// The topic.
        topic: TopicName,
        /// The cursor.
        offset: u64,
    },
    /// Persist the catalogue: it changed.
    SaveConfig,
    /// Close the link to a peer (the driver reconnects later; lanes restart from cursors).
    DropLink {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    batch: u64,
    /// Local offset after the batch's last message.
    end: u64,
    /// What the batch carries, recorded into the peer's holds on ack.
    ids: DedupIndex,
    acked: bool,
}

/// One (peer, topic) lane.
#[derive(Debug, Default)]
struct Lane {
    /// Every local offset below this is held by the peer (persisted).
    cursor: u64,
    /// Next offset to read.
    next_read: u64,
    /// The outstanding read, if any.
    reading: Option<u64>,
    in_flight: VecDeque<InFlight>,
    next_batch: u64,
    /// What the peer is known to hold.
    peer_holds: DedupIndex,
    /// Lowest offset skipped because the origin delivers it itself, since the last rewind.
    skip_floor: Option<u64>,
}

impl Lane {
    /// The cursor to persist: never past a message skipped because its origin was to
    /// deliver it. After a restart this node does not yet know the origin's links and
    /// relays again; it must start at or before the first skip, or it would deliver the
    /// origin's later messages before the skipped ones (found by the simulation).
    fn durable_cursor(&self) -> u64 {
        self.skip_floor.map_or(self.cursor, |f| f.min(self.cursor))
    }
}

/// A configured peer.
#[derive(Debug, Default)]
struct Peer {
    up: bool,
    /// The peer's Hello arrived on the current link: its holds are known, lanes may ship.
    greeted: bool,
    lanes: BTreeMap<TopicName, Lane>,
}

/// Replication lag of one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneStats {
    /// Local messages at or past the cursor (not yet known to be at the peer).
    pub lag_messages: u64,
    /// The cursor.
    pub cursor: u64,
    /// Batches in flight.
    pub in_flight: usize,
}

/// The replication state machine of one node.
#[derive(Debug)]
pub struct Replicator {
    node: String,
    settings: Settings,
    config: ConfigDoc,
    clock: HlcClock,
    /// Local topics and their durable end offsets.
    topics: BTreeMap<TopicName, u64>,
    peers: BTreeMap<String, Peer>,
    /// Each peer's live links, from its Hello and Links messages.
    links_of: BTreeMap<String, BTreeSet<String>>,
    next_ticket: u64,
    actions: VecDeque<Action>,
}

fn namespace_of(topic: &TopicName) -> String {
    format!("{}/{}", topic.tenant(), topic.namespace())
}

impl Replicator {
    /// A replicator for node `node`, starting from a saved catalogue.
    pub fn new(node: &str, settings: Settings, config: ConfigDoc) -> Self {
        let mut clock = HlcClock::default();
        if let Some(s) = config.max_stamp() {
            clock.observe(s.hlc);
        }
        Replicator {
            node: node.to_string(),
            settings,
            config,
            clock,
            topics: BTreeMap::new(),
            peers: BTreeMap::new(),
            links_of: BTreeMap::new(),
            next_ticket: 0,
            actions: VecDeque::new(),
        }
    }

    /// Declares a configured peer (its link starts down).
    pub fn add_peer(&mut self, peer: &str) {
        self.peers.entry(peer.to_string()).or_default();
    }

    /// Restores a lane's saved cursor (at start-up, before links come up).
    pub fn restore_cursor(&mut self, peer: &str, topic: &TopicName, offset: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            let lane = p.lanes.entry(topic.clone()).or_default();
            lane.cursor = offset;
            lane.next_read = offset;
        }
    }

    /// The lowest offset of `topic` some peer of its namespace's clusters may still need
    /// from this node: retention must keep everything from here on. A peer whose lane was
    /// never set up (no cursor yet) needs everything.
    pub fn retained_from(&self, topic: &TopicName) -> u64 {
        let namespace = namespace_of(topic);
        self.peers
            .iter()
            .filter(|(peer, _)| self.config.replicates_between(&namespace, &self.node, peer))
            .map(|(_, p)| p.lanes.get(topic).map_or(0, Lane::durable_cursor))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The catalogue.
    pub fn config(&self) -> &ConfigDoc {
        &self.config
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A link came up: greet the peer with our catalogue and what we hold.
    pub fn handle_link_up(&mut self, peer: &str, holds: Vec<(TopicName, Holds)>) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        p.up = true;
        let links = self.live_links();
        self.actions.push_back(Action::Send {
            peer: peer.to_string(),
            message: PeerMessage::Hello { config: self.config.clone(), holds, links },
        });
    }

    /// The link to `peer` was replaced by another connection to the same peer (both sides
    /// dialed). Lanes restart from their cursors, since what was in flight on the old
    /// connection is gone, but the peer never became unreachable: what it said about its
    /// links still holds, and nothing is announced. The new link's Hello follows.
    pub fn handle_link_replaced(&mut self, peer: &str) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.greeted = false;
            Self::restart_lanes(p);
        }
    }

    fn restart_lanes(p: &mut Peer) {
        for lane in p.lanes.values_mut() {
            lane.in_flight.clear();
            lane.reading = None;
            lane.next_read = lane.cursor;
        }
    }

    /// A link went down: lanes forget what was in flight and restart from their cursors.
    pub fn handle_link_down(&mut self, peer: &str) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        let was_greeted = p.greeted;
        p.up = false;
        p.greeted = false;
        Self::restart_lanes(p);
        // Without the link we no longer know the peer's links: relay for it again, and
        // first rewind past whatever we skipped because it was to deliver it.
        self.learn_links(peer, BTreeSet::new());
        self.links_of.remove(peer);
        if was_greeted {
            self.announce_links();
        }
    }

    /// Peers with a live, greeted link.
    fn live_links(&self) -> BTreeSet<String> {
        self.peers.iter().filter(|(_, p)| p.greeted).map(|(n, _)| n.clone()).collect()
    }

    /// Tells every live peer which links this node has, so relays can rely on it.
    fn announce_links(&mut self) {
        let links = self.live_links();
        for peer in &links {
            self.actions.push_back(Action::Send { peer: peer.clone(), message: PeerMessage::Links(links.clone()) });
        }
    }

    /// The local log of `topic` now ends (durably) at `end`.
    pub fn handle_log_grew(&mut self, topic: &TopicName, end: u64) {
        let known = self.topics.entry(topic.clone()).or_insert(0);
        *known = (*known).max(end);
        let peers: Vec<String> = self.peers.keys().cloned().collect();
        for peer in peers {
            self.pump(&peer, topic);
        }
    }

    /// A local config edit (from an admin command), stamped at `wall_ms`.
    pub fn edit_config(&mut self, namespace: &str, edit: Edit, wall_ms: u64) -> Result<(), EditError> {
        let stamp = Stamp { hlc: self.clock.tick(wall_ms), node: self.node.clone() };
        let delta = self.config.apply(namespace, edit, stamp)?;
        self.config_changed(delta, None);
        Ok(())
    }

    fn config_changed(&mut self, delta: ConfigDoc, from: Option<&str>) {
        if delta.is_empty() {
            return;
        }
        self.actions.push_back(Action::SaveConfig);
        for (peer, p) in &self.peers {
            if p.up && Some(peer.as_str()) != from {
                self.actions
                    .push_back(Action::Send { peer: peer.clone(), message: PeerMessage::Config(delta.clone()) });
            }
        }
        // Clusters may have changed: every lane may now ship (or stop).
        self.pump_all();
    }

    fn pump_all(&mut self) {
        let topics: Vec<TopicName> = self.topics.keys().cloned().collect();
        for topic in &topics {
            let peers: Vec<String> = self.peers.keys().cloned().collect();
            for peer in peers {
                self.pump(&peer, topic);
            }
        }
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, peer: &str, message: PeerMessage) {
        if !self.peers.get(peer).is_some_and(|p| p.up) {
            return;
        }
        match message {
            PeerMessage::Hello { config, holds, links } => {
                let p = self.peers.get_mut(peer).expect("checked above");
                p.greeted = true;
                for (topic, snapshot) in holds {
                    p.lanes.entry(topic).or_default().peer_holds.merge(DedupIndex::from_snapshot(snapshot));
                }
                self.learn_links(peer, links);
                self.announce_links();
                self.merge_config(peer, &config);
                self.pump_all();
            }
            PeerMessage::Links(links) => {
                self.learn_links(peer, links);
                self.pump_all();
            }
            PeerMessage::Config(delta) => self.merge_config(peer, &delta),
            PeerMessage::Batch { topic, batch, messages } => {
                let lane = self.peers.get_mut(peer).expect("checked above").lanes.entry(topic.clone()).or_default();
                for m in &messages {
                    lane.peer_holds.record(&m.id, 0);
                }
                self.actions.push_back(Action::Append { peer: peer.to_string(), topic, batch, messages });
            }
            PeerMessage::Ack { topic, batch } => self.handle_ack(peer, &topic, batch),
        }
    }

    /// Records a peer's live links. Where one of them went down, messages we skipped
    /// for that node (its link to the origin was to deliver them) must now go through us:
    /// lanes to it rewind to the lowest skipped offset. What the node holds is still left
    /// out.
    fn learn_links(&mut self, peer: &str, links: BTreeSet<String>) {
        let dropped: Vec<String> = match self.links_of.get(peer) {
            Some(old) => old.difference(&links).cloned().collect(),
            None => Vec::new(),
        };
        self.links_of.insert(peer.to_string(), links);
        for q in dropped {
            let Some(p) = self.peers.get_mut(&q) else { continue };
            for (topic, lane) in &mut p.lanes {
                let skipped_at = lane.skip_floor.unwrap_or(u64::MAX);
                // The skip may sit in a batch still in flight, at or past the cursor.
                if skipped_at >= lane.next_read {
                    continue;
                }
                let target = skipped_at.min(lane.cursor);
                lane.cursor = target;
                lane.next_read = target;
                lane.in_flight.clear();
                lane.reading = None;
                lane.skip_floor = None;
                self.actions.push_back(Action::SaveCursor { peer: q.clone(), topic: topic.clone(), offset: target });
            }
        }
    }

    /// True when a message from `origin` need not travel from this node to `peer`: the
    /// peer is its origin, or the origin has a live link to the peer and its own lane (in
    /// order) delivers it. Relaying it too would only send duplicates.
    fn delivered_elsewhere(&self, origin: &str, peer: &str) -> bool {
        origin == peer || (origin != self.node && self.links_of.get(origin).is_some_and(|n| n.contains(peer)))
    }

    fn merge_config(&mut self, peer: &str, theirs: &ConfigDoc) {
        if let Some(s) = theirs.max_stamp() {
            self.clock.observe(s.hlc);
        }
        let delta = self.config.merge(theirs);
        self.config_changed(delta, Some(peer));
    }

    fn handle_ack(&mut self, peer: &str, topic: &TopicName, batch: u64) {
        let Some(lane) = self.peers.get_mut(peer).and_then(|p| p.lanes.get_mut(topic)) else { return };
        let Some(entry) = lane.in_flight.iter_mut().find(|b| b.batch == batch && !b.acked) else { return };
        entry.acked = true;
        lane.peer_holds.merge(std::mem::take(&mut entry.ids));
        self.advance(peer, topic);
        self.pump(peer, topic);
    }

    /// Moves the cursor past every acknowledged batch at the front of the lane.
    fn advance(&mut self, peer: &str, topic: &TopicName) {
        let Some(lane) = self.peers.get_mut(peer).and_then(|p| p.lanes.get_mut(topic)) else { return };
        let before = lane.durable_cursor();
        while lane.in_flight.front().is_some_and(|b| b.acked) {
            let done = lane.in_flight.pop_front().expect("front exists");
            lane.cursor = done.end;
        }
        let durable = lane.durable_cursor();
        if durable != before {
            self.actions.push_back(Action::SaveCursor {
                peer: peer.to_string(),
                topic: topic.clone(),
                offset: durable,
            });
        }
    }

    /// Starts a read on the lane if it may ship and has room.
    fn pump(&mut self, peer: &str, topic: &TopicName) {
        let end = self.topics.get(topic).copied().unwrap_or(0);
        let ships = self.config.replicates_between(&namespace_of(topic), &self.node, peer);
        let Some(p) = self.peers.get_mut(peer) else { return };
        if !p.greeted || !ships {
            return;
        }
        let lane = p.lanes.entry(topic.clone()).or_default();
        if lane.reading.is_some() || lane.in_flight.len() >= self.settings.inflight_batches_max || lane.next_read >= end
        {
            return;
        }
        self.next_ticket += 1;
        lane.reading = Some(self.next_ticket);
        self.actions.push_back(Action::Read {
            peer: peer.to_string(),
            topic: topic.clone(),
            from: lane.next_read,
            max_messages: self.settings.batch_messages_max,
            max_bytes: self.settings.batch_bytes_max,
            ticket: self.next_ticket,
        });
    }

    /// The result of an [`Action::Read`]: messages from the requested offset on, in order.
    pub fn handle_read(&mut self, peer: &str, topic: &TopicName, ticket: u64, messages: Vec<StoredMessage>) {
        let skip: BTreeSet<String> = messages
            .iter()
            .map(|m| m.message.origin.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|origin| self.delivered_elsewhere(origin, peer))
            .collect();
        let Some(lane) = self.peers.get_mut(peer).and_then(|p| p.lanes.get_mut(topic)) else { return };
        if lane.reading != Some(ticket) {
            return; // the link went down since; the lane restarted
        }
        lane.reading = None;
        let Some(last) = messages.last() else { return };
        let end = last.offset + 1;
        let mut ids = DedupIndex::default();
        let next_read = lane.next_read;
        if let Some(first) = messages.iter().find(|m| m.offset >= next_read && skip.contains(&*m.message.origin)) {
            lane.skip_floor = Some(lane.skip_floor.map_or(first.offset, |f| f.min(first.offset)));
        }
        let fresh: Vec<Message> = messages
            .into_iter()
            .filter(|m| m.offset >= lane.next_read && !lane.peer_holds.contains(&m.message.id))
            .filter(|m| !skip.contains(&*m.message.origin))
            .map(|m| {
                ids.record(&m.message.id, m.offset);
                m.message
            })
            .collect();
        let batch = lane.next_batch;
        lane.next_batch += 1;
        lane.next_read = end;
        let acked = fresh.is_empty() || (self.settings.bug_skip_batch && batch == 1);
        lane.in_flight.push_back(InFlight { batch, end, ids, acked });
        if !acked {
            self.actions.push_back(Action::Send {
                peer: peer.to_string(),
                message: PeerMessage::Batch { topic: topic.clone(), batch, messages: fresh },
            });
        }
        self.advance(peer, topic);
        self.pump(peer, topic);
    }

    /// The result of an [`Action::Append`]: acknowledge it, or drop the link so the peer
    /// resends after reconnecting.
    pub fn handle_appended(&mut self, peer: &str, topic: &TopicName, batch: u64, result: Result<(), String>) {
        match result {
            Ok(()) => self.actions.push_back(Action::Send {
                peer: peer.to_string(),
                message: PeerMessage::Ack { topic: topic.clone(), batch },
            }),
            Err(reason) => self.actions.push_back(Action::DropLink { peer: peer.to_string(), reason }),
        }
    }

    /// Lag of every lane that ships, by peer then topic.
    pub fn lanes(&self) -> Vec<(String, TopicName, LaneStats)> {
        let mut out = Vec::new();
        for (peer, p) in &self.peers {
            for (topic, lane) in &p.lanes {
                if !self.config.replicates_between(&namespace_of(topic), &self.node, peer) {
                    continue;
                }
                let end = self.topics.get(topic).copied().unwrap_or(0);
                let stats = LaneStats {
                    lag_messages: end.saturating_sub(lane.cursor),
                    cursor: lane.cursor,
                    in_flight: lane.in_flight.len(),
                };
                out.push((peer.clone(), topic.clone(), stats));
            }
        }
        out
    }

    /// True when the link to `peer` is up.
    pub fn is_up(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|p| p.up)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use rill_storage::{MessageId, ProducerId};

    use super::*;

    /// A node of the in-memory mesh: the core plus a log with dedup, as the driver has.
    #[derive(Debug)]
    struct Node {
        rep: Replicator,
        logs: BTreeMap<TopicName, Vec<StoredMessage>>,
        dedup: BTreeMap<TopicName, DedupIndex>,
        cursors: BTreeMap<(String, TopicName), u64>,
    }

    impl Node {
        /// Appends what is not held yet; returns the new end offset.
        fn append(&mut self, topic: &TopicName, messages: Vec<Message>) -> u64 {
            let log = self.logs.entry(topic.clone()).or_default();
            let dedup = self.dedup.entry(topic.clone()).or_default();
            for m in messages {
                if !dedup.contains(&m.id) {
                    let offset = log.len() as u64;
                    dedup.record(&m.id, offset);
                    log.push(StoredMessage { offset, message: m });
                }
            }
            log.len() as u64
        }

        fn holds(&self) -> Vec<(TopicName, Holds)> {
            self.dedup.iter().map(|(t, d)| (t.clone(), d.snapshot(0))).collect()
        }
    }

    /// Deterministic pseudo-random numbers for delivery order and faults.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Nodes, links (up or down), and messages on the wire (FIFO per link).
    struct Mesh {
        nodes: BTreeMap<String, Node>,
        links: BTreeMap<(String, String), bool>,
        wire: BTreeMap<(String, String), VecDeque<PeerMessage>>,
        rng: Rng,
        produced: Vec<(String, TopicName, MessageId)>,
        /// Messages carried in batches on all links.
        batch_messages_sent: usize,
    }

    fn topic(name: &str) -> TopicName {
        TopicName::parse(name).unwrap()
    }

    fn key(a: &str, b: &str) -> (String, String) {
        if a < b { (a.into(), b.into()) } else { (b.into(), a.into()) }
    }

    impl Mesh {
        /// Nodes with the given links (all down at first) and namespace `t/ns` held by all.
        fn new(names: &[&str], links: &[(&str, &str)], seed: u64) -> Mesh {
            let mut nodes = BTreeMap::new();
            for &n in names {
                let settings = Settings {
                    batch_messages_max: 7,
                    batch_bytes_max: 1 << 20,
                    inflight_batches_max: 3,
                    ..Settings::default()
                };
                let rep = Replicator::new(n, settings, ConfigDoc::default());
                nodes.insert(
                    n.to_string(),
                    Node { rep, logs: BTreeMap::new(), dedup: BTreeMap::new(), cursors: BTreeMap::new() },
                );
            }
            let mut mesh = Mesh {
                nodes,
                links: BTreeMap::new(),
                wire: BTreeMap::new(),
                rng: Rng(seed | 1),
                produced: Vec::new(),
                batch_messages_sent: 0,
            };
            for &(a, b) in links {
                mesh.links.insert(key(a, b), false);
                mesh.node(a).rep.add_peer(b);
                mesh.node(b).rep.add_peer(a);
            }
            let first = names[0];
            let all: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
            mesh.node(first).rep.edit_config("t/ns", Edit::Create, 1).unwrap();
            mesh.node(first).rep.edit_config("t/ns", Edit::SetClusters(all), 2).unwrap();
            mesh
        }

        fn node(&mut self, n: &str) -> &mut Node {
            self.nodes.get_mut(n).unwrap()
        }

        fn produce(&mut self, node: &str, t: &str, producer: &str, seqs: std::ops::Range<u64>) {
            let t = topic(t);
            let messages: Vec<Message> = seqs
                .map(|seq| Message {
                    id: MessageId { producer: ProducerId(producer.into()), seq },
                    origin: node.into(),
                    publish_time_ms: 0,
                    key: None,
                    headers: Vec::new(),
                    payload: format!("{producer}-{seq}").into_bytes(),
                })
                .collect();
            for m in &messages {
                self.produced.push((node.to_string(), t.clone(), m.id.clone()));
            }
            let n = self.node(node);
            let end = n.append(&t, messages);
            n.rep.handle_log_grew(&t, end);
        }

        fn set_link(&mut self, a: &str, b: &str, up: bool) {
            let k = key(a, b);
            if self.links.get(&k) == Some(&up) {
                return;
            }
            self.links.insert(k, up);
            if up {
                for (x, y) in [(a, b), (b, a)] {
                    let holds = self.node(x).holds();
                    self.node(x).rep.handle_link_up(y, holds);
                }
            } else {
                self.wire.remove(&(a.to_string(), b.to_string()));
                self.wire.remove(&(b.to_string(), a.to_string()));
                self.node(a).rep.handle_link_down(b);
                self.node(b).rep.handle_link_down(a);
            }
        }

        /// Replaces the link between `a` and `b` with a new connection (both sides dialed).
        fn replace_link(&mut self, a: &str, b: &str) {
            self.wire.remove(&(a.to_string(), b.to_string()));
            self.wire.remove(&(b.to_string(), a.to_string()));
            for (x, y) in [(a, b), (b, a)] {
                self.node(x).rep.handle_link_replaced(y);
                let holds = self.node(x).holds();
                self.node(x).rep.handle_link_up(y, holds);
            }
        }

        /// Executes one node's pending actions.
        fn drain(&mut self, name: &str) -> bool {
            let mut any = false;
            while let Some(action) = self.node(name).rep.poll_action() {
                any = true;
                match action {
                    Action::Send { peer, message } => {
                        if let PeerMessage::Batch { messages, .. } = &message {
                            self.batch_messages_sent += messages.len();
                        }
                        if self.links.get(&key(name, &peer)) == Some(&true) {
                            self.wire.entry((name.to_string(), peer)).or_default().push_back(message);
                        }
                    }
                    Action::Read { peer, topic, from, max_messages, ticket, .. } => {
                        let n = self.node(name);
                        let log = n.logs.get(&topic).cloned().unwrap_or_default();
                        let batch: Vec<StoredMessage> =
                            log.into_iter().skip(from as usize).take(max_messages).collect();
                        n.rep.handle_read(&peer, &topic, ticket, batch);
                    }
                    Action::Append { peer, topic, batch, messages } => {
                        let n = self.node(name);
                        let end = n.append(&topic, messages);
                        n.rep.handle_log_grew(&topic, end);
                        n.rep.handle_appended(&peer, &topic, batch, Ok(()));
                    }
                    Action::SaveCursor { peer, topic, offset } => {
                        self.node(name).cursors.insert((peer, topic), offset);
                    }
                    Action::SaveConfig => {}
                    Action::DropLink { peer, .. } => self.set_link(name, &peer, false),
                }
            }
            any
        }

        /// Delivers one message from a random link with traffic.
        fn deliver_one(&mut self) -> bool {
            let busy: Vec<(String, String)> =
                self.wire.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| k.clone()).collect();
            if busy.is_empty() {
                return false;
            }
            let (from, to) = busy[(self.rng.next() % busy.len() as u64) as usize].clone();
            let message = self.wire.get_mut(&(from.clone(), to.clone())).unwrap().pop_front().unwrap();
            self.node(&to).rep.handle_message(&from, message);
            true
        }

        /// Runs until nothing moves; `flap` is the chance (per mille) that a step flaps a link.
        fn run(&mut self, flap_per_mille: u64) {
            let names: Vec<String> = self.nodes.keys().cloned().collect();
            for step in 0.. {
                assert!(step < 200_000, "the mesh did not settle");
                let mut moved = false;
                for n in &names {
                    moved |= self.drain(n);
                }
                if flap_per_mille > 0 && self.rng.next() % 1000 < flap_per_mille {
                    let links: Vec<(String, String)> = self.links.keys().cloned().collect();
                    let (a, b) = links[(self.rng.next() % links.len() as u64) as usize].clone();
                    let up = self.links[&(a.clone(), b.clone())];
                    self.set_link(&a, &b, !up);
                    moved = true;
                }
                moved |= self.deliver_one();
                if std::env::var("RILL_STEP_CHECK").is_ok() {
                    self.check_order(step);
                }
                if !moved {
                    return;
                }
            }
        }

        fn heal(&mut self) {
            let links: Vec<(String, String)> = self.links.keys().cloned().collect();
            for (a, b) in links {
                self.set_link(&a, &b, true);
            }
            self.run(0);
        }

        /// Invariant 3 on every node: messages of one (origin, producer) keep their order.
        /// `RILL_STEP_CHECK=1` runs it after every step, to find where a violation starts.
        fn check_order(&self, step: usize) {
            for (name, node) in &self.nodes {
                for (t, log) in &node.logs {
                    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
                    for m in log {
                        let k = (m.message.origin.to_string(), m.message.id.producer.to_string());
                        if let Some(&prev) = last.get(&k) {
                            assert!(
                                m.message.id.seq > prev,
                                "step {step}: {name}/{t}: {} after seq {prev}; links {:?}",
                                m.message.id,
                                self.links
                            );
                        }
                        last.insert(k, m.message.id.seq);
                    }
                }
            }
        }

        /// Invariants 1-3: every produced message is on every node once, and messages of one
        /// (origin, producer) keep their order.
        fn check(&self) {
            for (name, node) in &self.nodes {
                for (origin, t, id) in &self.produced {
                    let log = node.logs.get(t).map(Vec::as_slice).unwrap_or_default();
                    let copies = log.iter().filter(|m| m.message.id == *id).count();
                    assert_eq!(copies, 1, "{name} holds {id} (from {origin}) {copies} times");
                }
            }
            self.check_order(usize::MAX);
        }
    }

    #[test]
    fn two_nodes_catch_up_in_order_and_exactly_once() {
        let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 1);
        mesh.produce("a", "t/ns/x", "p", 0..50);
        mesh.produce("b", "t/ns/x", "q", 0..30);
        mesh.heal();
        mesh.check();
        assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 80);
        assert!(mesh.nodes.values().all(|n| n.rep.lanes().iter().all(|(_, _, s)| s.lag_messages == 0)));
    }

    #[test]
    fn an_edge_reaches_a_region_it_has_no_link_to_through_a_relay() {
        // edge - r1 - r2: the edge has one uplink; r1 relays both ways.
        let mut mesh = Mesh::new(&["edge", "r1", "r2"], &[("edge", "r1"), ("r1", "r2")], 2);
        mesh.produce("edge", "t/ns/x", "sensor", 0..40);
        mesh.produce("r2", "t/ns/x", "model", 0..10);
        mesh.heal();
        mesh.check();
        assert_eq!(mesh.node("r2").logs[&topic("t/ns/x")].len(), 50);
        assert_eq!(mesh.node("edge").logs[&topic("t/ns/x")].len(), 50);
    }

    #[test]
    fn a_full_mesh_with_two_paths_keeps_order_under_random_delivery_and_flapping_links() {
        // RILL_CORE_SEEDS=N sweeps more seeds (a soak); 40 keep the unit tests quick.
        let seeds: u64 = std::env::var("RILL_CORE_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(40);
        for seed in 1..seeds {
            let names = ["e1", "e2", "r1", "r2", "r3"];
            let links = [("e1", "r1"), ("e1", "r2"), ("e2", "r2"), ("r1", "r2"), ("r2", "r3"), ("r1", "r3")];
            let mut mesh = Mesh::new(&names, &links, seed);
            mesh.heal();
            for round in 0..4u64 {
                for (i, n) in names.iter().enumerate() {
                    let start = round * 20;
                    mesh.produce(n, "t/ns/x", &format!("p{i}"), start..start + 20);
                    mesh.produce(n, "t/ns/y", &format!("p{i}"), start..start + 5);
                }
                mesh.run(30);
            }
            mesh.heal();
            mesh.check();
            for n in names {
                assert_eq!(mesh.node(n).logs[&topic("t/ns/x")].len(), 400, "seed {seed} node {n}");
            }
        }
    }

    #[test]
    fn in_a_full_mesh_each_message_crosses_each_link_once() {
        let mut mesh = Mesh::new(&["r1", "r2", "r3"], &[("r1", "r2"), ("r2", "r3"), ("r1", "r3")], 8);
        mesh.heal();
        for (i, n) in ["r1", "r2", "r3"].iter().enumerate() {
            mesh.produce(n, "t/ns/x", &format!("p{i}"), 0..100);
        }
        mesh.run(0);
        mesh.check();
        // 300 messages, each to the two other regions, no relayed copies.
        assert_eq!(mesh.batch_messages_sent, 600);
    }

    #[test]
    fn replacing_a_link_does_not_make_relays_resend() {
        let mut mesh = Mesh::new(&["r1", "r2", "r3"], &[("r1", "r2"), ("r2", "r3"), ("r1", "r3")], 10);
        mesh.heal();
        mesh.produce("r1", "t/ns/x", "p", 0..50);
        mesh.run(0);
        mesh.replace_link("r1", "r2");
        // r2 still knows r1 delivers to r3 itself: its lane to r3 must not rewind.
        let lanes = mesh.node("r2").rep.lanes();
        let to_r3 = lanes.iter().find(|(p, _, _)| p == "r3").expect("lane to r3").2;
        assert_eq!(to_r3.cursor, 50, "{lanes:?}");
        mesh.run(0);
        mesh.produce("r1", "t/ns/x", "p", 50..100);
        mesh.run(0);
        mesh.check();
        assert_eq!(mesh.batch_messages_sent, 200, "each message to each other region once, nothing relayed");
    }

    #[test]
    fn a_region_whose_link_to_the_origin_is_down_gets_its_messages_through_a_relay() {
        // The edge is dual-homed; its link to r2 goes down and stays down.
        let mut mesh = Mesh::new(&["edge", "r1", "r2"], &[("edge", "r1"), ("edge", "r2"), ("r1", "r2")], 9);
        mesh.heal();
        mesh.produce("edge", "t/ns/x", "sensor", 0..30);
        mesh.run(0);
        mesh.set_link("edge", "r2", false);
        mesh.produce("edge", "t/ns/x", "sensor", 30..60);
        mesh.run(0);
        assert_eq!(mesh.node("r2").logs[&topic("t/ns/x")].len(), 60, "r1 relays while the direct link is down");
        mesh.heal();
        mesh.check();
    }

    #[test]
    fn store_and_forward_ships_only_what_the_peer_lacks() {
        let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 3);
        mesh.heal();
        mesh.produce("a", "t/ns/x", "p", 0..10);
        mesh.run(0);
        mesh.set_link("a", "b", false);
        mesh.produce("a", "t/ns/x", "p", 10..25); // uplink down: accepted locally
        assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 10);
        mesh.heal();
        mesh.check();
        assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 25);
        assert_eq!(mesh.node("a").cursors[&("b".to_string(), topic("t/ns/x"))], 25);
    }

    #[test]
    fn a_restarted_replicator_resumes_from_its_cursor_and_the_peer_summary() {
        let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 4);
        mesh.heal();
        mesh.produce("a", "t/ns/x", "p", 0..30);
        mesh.run(0);
        // Restart a: a fresh core with the saved config and cursor, no memory of holds.
        mesh.set_link("a", "b", false);
        let config = mesh.node("a").rep.config().clone();
        let cursor = mesh.node("a").cursors[&("b".to_string(), topic("t/ns/x"))];
        let node = mesh.node("a");
        node.rep = Replicator::new("a", Settings::default(), config);
        node.rep.add_peer("b");
        node.rep.restore_cursor("b", &topic("t/ns/x"), cursor);
        node.rep.handle_log_grew(&topic("t/ns/x"), 30);
        mesh.produce("a", "t/ns/x", "p", 30..35);
        mesh.heal();
        mesh.check();
        assert_eq!(mesh.node("b").logs[&topic("t/ns/x")].len(), 35);
    }

    #[test]
    fn namespaces_outside_the_clusters_stay_home_until_added() {
        let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 5);
        mesh.node("a").rep.edit_config("t/private", Edit::Create, 10).unwrap();
        let only_a: BTreeSet<String> = ["a".to_string()].into();
        mesh.node("a").rep.edit_config("t/private", Edit::SetClusters(only_a), 11).unwrap();
        mesh.produce("a", "t/private/x", "p", 0..5);
        mesh.heal();
        assert!(!mesh.node("b").logs.contains_key(&topic("t/private/x")));
        let both: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        mesh.node("b").rep.edit_config("t/private", Edit::SetClusters(both), 12).unwrap();
        mesh.run(0);
        assert_eq!(mesh.node("b").logs[&topic("t/private/x")].len(), 5);
        assert_eq!(mesh.nodes["a"].rep.config(), mesh.nodes["b"].rep.config());
    }

    #[test]
    fn config_edits_during_a_partition_converge_after_heal() {
        let mut mesh = Mesh::new(&["a", "b", "c"], &[("a", "b"), ("b", "c")], 6);
        mesh.heal();
        mesh.set_link("a", "b", false);
        let ab: BTreeSet<String> = ["a".into(), "b".into()].into();
        let bc: BTreeSet<String> = ["b".into(), "c".into()].into();
        mesh.node("a").rep.edit_config("t/ns", Edit::SetClusters(ab), 100).unwrap();
        mesh.node("c").rep.edit_config("t/ns", Edit::SetClusters(bc.clone()), 200).unwrap();
        mesh.node("a").rep.edit_config("t/ns", Edit::RetentionAge(Some(60)), 300).unwrap();
        mesh.run(0);
        mesh.heal();
        let config = mesh.node("a").rep.config().clone();
        assert!(mesh.nodes.values().all(|n| *n.rep.config() == config), "all nodes converge");
        let p = config.get("t/ns").unwrap();
        assert_eq!(p.clusters.val, bc, "the later edit wins");
        assert_eq!(p.retention_age_s.val, Some(60));
    }

    #[test]
    fn the_checker_catches_a_replicator_that_ignores_what_the_peer_holds() {
        // Guard against a checker that cannot fail: duplicate a message by hand.
        let mut mesh = Mesh::new(&["a", "b"], &[("a", "b")], 7);
        mesh.produce("a", "t/ns/x", "p", 0..3);
        mesh.heal();
        let t = topic("t/ns/x");
        let dup = mesh.node("b").logs[&t][0].clone();
        mesh.node("b").logs.get_mut(&t).unwrap().push(dup);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mesh.check()));
        assert!(caught.is_err());
    }
}

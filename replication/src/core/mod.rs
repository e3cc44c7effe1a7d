//! The replication core: a sans-IO state machine in the shape of quinn-proto. It opens no
//! socket, reads no clock and spawns nothing, so tests drive whole meshes of it in memory.
//!
//! # Call contract
//! A driver owns one [`Replicator`] and feeds it every event, in the order they happen:
//! - links: [`Replicator::handle_link_opened`] for every connection to a peer (with a
//!   [`LinkId`] the driver never reuses), [`Replicator::handle_link_closed`] when one ends
//!   for any reason, and [`Replicator::handle_timeout`] about once a second;
//! - [`Replicator::handle_message`] for every message, with the link it came on;
//! - the results of what it asked for: [`Replicator::handle_read`],
//!   [`Replicator::handle_appended`] (with the link the batch came on);
//! - [`Replicator::handle_log_grew`] when a topic's durable end moves, and
//!   [`Replicator::edit_config`] for admin edits.
//!
//! After each input the driver drains [`Replicator::poll_action`] until it returns `None`
//! and executes every [`Action`] in order. [`Action::Send`] names the link to send on; if
//! that link is gone the message is dropped, and the core copes (it restarts lanes when it
//! learns the link closed). [`Action::CloseLink`] must be followed, once the connection is
//! closed, by nothing: the core already treats the link as closed.
//!
//! The core owns every rule about links (see [`crate::link`]): which of two links to a
//! peer survives, which results are stale, and the counters `rill stats` shows.
//!
//! # Lanes
//! Per (peer, topic) a *lane* ships the local log in order from a cursor: it asks the
//! driver to read a batch, leaves out what the peer is known to hold, sends the rest, and
//! advances the cursor when the peer acknowledges (the peer acks only after its append is
//! durable). What a peer holds is learned only from the peer itself: its [`Summary`] when
//! the link comes up, its acks, and the messages it sends us. That makes forwarding safe:
//! - a message is never sent back to where it came from (the sender holds it);
//! - every lane delivers an origin's messages to a peer as a contiguous, in-order run
//!   starting at the first one the peer lacks, so a message that reaches a node along two
//!   paths arrives in the same order on both, and the second copy is dropped by dedup.
//!   Per-producer order therefore holds across multi-hop relays.
//!
//! A lane ships only while the topic's namespace lists both nodes in its clusters, and
//! relays transitively: whatever a node appends (from a producer or a peer) grows its log
//! and is shipped on its other lanes.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
};

use rill_storage::{Message, NamespaceName, NodeName, TopicName};

mod blobs;
mod lane;
mod message;
#[cfg(test)]
mod tests;

use self::{blobs::BlobSync, lane::Lane};
pub use self::{
    blobs::{BLOB_BYTES_MAX, BLOB_CHUNK_BYTES, blob_chunks},
    lane::{LaneCounters, LaneStats},
};
use crate::{
    access::{EntryError, Signed, Verify},
    hlc::HlcClock,
    link::{Opened, PeerLinks},
    namespace::{ConfigDoc, Edit, EditError, Stamp},
};
pub use crate::{
    link::{CloseReason, LinkId, LinkStats},
    wire::{PeerMessage, Summary},
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

/// What the core asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message on a link (dropped if that link is gone; the core copes).
    Send {
        /// The peer.
        peer: NodeName,
        /// The link to send on.
        link: LinkId,
        /// The message.
        message: PeerMessage,
    },
    /// Read durable messages of a topic from `from` and report them with
    /// [`Replicator::handle_read`], passing `ticket` back.
    Read {
        /// For whom.
        peer: NodeName,
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
    /// Append messages received from a peer (with dedup), in the order of these actions per
    /// (peer, topic), and report with [`Replicator::handle_appended`]. Batches of a link
    /// that is no longer current must not be appended after the current link's.
    Append {
        /// Who sent them.
        peer: NodeName,
        /// The link they came on.
        link: LinkId,
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
        peer: NodeName,
        /// The topic.
        topic: TopicName,
        /// The cursor.
        offset: u64,
    },
    /// Persist the catalogue: it changed.
    SaveConfig,
    /// A peer sent a catalogue entry that does not verify (a signature that does not hold,
    /// a certificate not from the mesh CA, a node's signature): it was not taken. Log it.
    EntryRefused {
        /// The peer.
        peer: NodeName,
        /// Why.
        why: String,
    },
    /// Send this node's Hello on a link that just became current: build it with
    /// [`Replicator::hello`] from what the node durably holds now.
    Greet {
        /// The peer.
        peer: NodeName,
        /// The link.
        link: LinkId,
    },
    /// Read the bytes `offset..offset + len` of a blob this node holds (fewer at its end)
    /// and send them to `peer` on `link` as [`PeerMessage::BlobChunk`]s of at most
    /// [`BLOB_CHUNK_BYTES`], in order (one empty chunk for an empty blob); if the blob
    /// cannot be read, send [`PeerMessage::BlobMissing`].
    ReadBlob {
        /// The peer.
        peer: NodeName,
        /// The link.
        link: LinkId,
        /// The blob.
        hash: rill_storage::blobs::Hash,
        /// The first byte.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// Store a blob fetched whole (its hash checked) durably, then report with
    /// [`Replicator::handle_blob_stored`] (or [`Replicator::handle_blob_store_failed`]).
    StoreBlob {
        /// The blob.
        hash: rill_storage::blobs::Hash,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// Close a link (the core already treats it as closed). Log the reason.
    CloseLink {
        /// The peer.
        peer: NodeName,
        /// The link.
        link: LinkId,
        /// Why.
        reason: CloseReason,
    },
}

/// A configured peer.
#[derive(Debug, Default)]
struct Peer {
    links: PeerLinks,
    lanes: BTreeMap<TopicName, Lane>,
}

/// The replication state machine of one node.
#[derive(Debug)]
pub struct Replicator {
    node: NodeName,
    /// Drawn at each start; sent in every Hello.
    boot: u64,
    settings: Settings,
    config: ConfigDoc,
    /// Checks the signatures of catalogue entries.
    verify: Arc<dyn Verify>,
    /// Entry parts peers sent that did not verify.
    refused_entries: u64,
    clock: HlcClock,
    /// Local topics and their durable end offsets.
    topics: BTreeMap<TopicName, u64>,
    peers: BTreeMap<NodeName, Peer>,
    /// Each peer's live links, from its Hello and Links messages.
    links_of: BTreeMap<NodeName, BTreeSet<NodeName>>,
    next_ticket: u64,
    /// Which blobs this node and its peers hold, and the fetches under way.
    blobs: BlobSync,
    actions: VecDeque<Action>,
}

fn namespace_of(topic: &TopicName) -> NamespaceName {
    topic.namespace_name()
}

impl Replicator {
    /// A replicator for node `node` in the boot `boot` (random, new at every start),
    /// starting from a saved catalogue; `verify` checks the entries peers send.
    pub fn new(node: NodeName, boot: u64, settings: Settings, config: ConfigDoc, verify: Arc<dyn Verify>) -> Self {
        let mut clock = HlcClock::default();
        if let Some(s) = config.max_stamp() {
            clock.observe(s.hlc);
        }
        let blobs = BlobSync::new(&config);
        Replicator {
            node,
            boot,
            settings,
            config,
            verify,
            refused_entries: 0,
            clock,
            topics: BTreeMap::new(),
            peers: BTreeMap::new(),
            links_of: BTreeMap::new(),
            next_ticket: 0,
            blobs,
            actions: VecDeque::new(),
        }
    }

    /// Declares a configured peer (its link starts down).
    pub fn add_peer(&mut self, peer: NodeName) {
        self.peers.entry(peer).or_default();
    }

    /// Restores a lane's saved cursor (at start-up, before links come up).
    pub fn restore_cursor(&mut self, peer: &NodeName, topic: &TopicName, offset: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            let lane = p.lanes.entry(topic.clone()).or_default();
            lane.restore(offset);
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

    /// A connection to `peer` completed its handshake; `dialed_by_us` says which side
    /// opened it. It becomes current, replaces the current link, or waits as a candidate.
    pub fn handle_link_opened(&mut self, now_ms: u64, peer: &NodeName, link: LinkId, dialed_by_us: bool) {
        let Some(p) = self.peers.get_mut(peer) else {
            self.close(peer, link, CloseReason::NotConfigured);
            return;
        };
        match p.links.open(now_ms, link, dialed_by_us) {
            Opened::Adopted => {}
            Opened::Replaced(old) => {
                self.close(peer, old, CloseReason::Replaced);
                self.link_replaced(peer);
            }
            Opened::Candidate(dropped) => {
                if let Some(old) = dropped {
                    self.close(peer, old, CloseReason::Duplicate);
                }
                return;
            }
        }
        self.actions.push_back(Action::Greet { peer: peer.clone(), link });
    }

    /// This node's Hello, for an [`Action::Greet`]: `holds` is what it durably holds now
    /// (a [`Summary`] of synced data per topic).
    pub fn hello(&self, holds: Vec<(TopicName, Summary)>) -> PeerMessage {
        let (config, links, blobs) = (self.config.clone(), self.live_links(), self.held_blobs());
        PeerMessage::Hello { boot: self.boot, config, holds, links, blobs }
    }

    pub(super) fn close(&mut self, peer: &NodeName, link: LinkId, reason: CloseReason) {
        self.actions.push_back(Action::CloseLink { peer: peer.clone(), link, reason });
    }

    /// The current link to `peer` was replaced by another connection: lanes restart from
    /// their cursors, since what was in flight on the old connection is gone, but the peer
    /// never became unreachable: what it said about its links still holds, and nothing is
    /// announced until the new link's Hello.
    pub(super) fn link_replaced(&mut self, peer: &NodeName) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.lanes.values_mut().for_each(Lane::restart);
        }
    }

    /// A connection to `peer` ended (closed by either side, timed out, or closed by the
    /// driver). Unknown or stale links are ignored.
    pub fn handle_link_closed(&mut self, now_ms: u64, peer: &NodeName, link: LinkId) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        let was_greeted = p.links.greeted().is_some();
        let (was_current, promoted) = p.links.close(now_ms, link);
        if !was_current {
            return;
        }
        p.lanes.values_mut().for_each(Lane::restart);
        self.blobs_link_lost(peer);
        // Without the link we no longer know the peer's links: relay for it again, and
        // first rewind past whatever we skipped because it was to deliver it.
        self.learn_links(peer, BTreeSet::new());
        self.links_of.remove(peer);
        if was_greeted {
            self.announce_links();
        }
        if let Some(next) = promoted {
            self.actions.push_back(Action::Greet { peer: peer.clone(), link: next });
        }
    }

    /// Time passed: candidate links that waited too long for a Hello are closed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let expired: Vec<(NodeName, LinkId)> = self
            .peers
            .iter_mut()
            .filter_map(|(name, p)| p.links.expired_candidate(now_ms).map(|l| (name.clone(), l)))
            .collect();
        for (peer, link) in expired {
            self.close(&peer, link, CloseReason::NoHello);
        }
        self.blobs_tick(now_ms);
    }

    /// Peers with a live, greeted link.
    pub(super) fn live_links(&self) -> BTreeSet<NodeName> {
        self.peers.iter().filter(|(_, p)| p.links.greeted().is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// Tells every live peer which links this node has, so relays can rely on it.
    pub(super) fn announce_links(&mut self) {
        let links = self.live_links();
        for (peer, p) in &self.peers {
            if let Some(link) = p.links.greeted() {
                let message = PeerMessage::Links(links.clone());
                self.actions.push_back(Action::Send { peer: peer.clone(), link, message });
            }
        }
    }

    /// The local log of `topic` now ends (durably) at `end`.
    pub fn handle_log_grew(&mut self, topic: &TopicName, end: u64) {
        let known = self.topics.entry(topic.clone()).or_insert(0);
        *known = (*known).max(end);
        let peers: Vec<NodeName> = self.peers.keys().cloned().collect();
        for peer in peers {
            self.pump(&peer, topic);
        }
    }

    /// A local config edit (from an admin command), stamped at `wall_ms`.
    pub fn edit_config(&mut self, namespace: &NamespaceName, edit: Edit, wall_ms: u64) -> Result<(), EditError> {
        let stamp = Stamp { hlc: self.clock.tick(wall_ms), node: self.node.to_string() };
        let delta = self.config.apply(namespace, edit, stamp)?;
        self.config_changed(delta, None);
        Ok(())
    }

    /// A signed catalogue entry (a grant or token, or its deletion) made through this
    /// node; the caller has checked that its signer may make it.
    pub fn apply_signed(&mut self, signed: Signed) -> Result<(), EntryError> {
        let delta = self.config.apply_signed(signed, &*self.verify)?;
        self.config_changed(delta, None);
        Ok(())
    }

    /// Catalogue entry parts peers sent that did not verify, since start.
    pub fn refused_entries(&self) -> u64 {
        self.refused_entries
    }

    pub(super) fn config_changed(&mut self, delta: ConfigDoc, from: Option<&NodeName>) {
        if delta.is_empty() {
            return;
        }
        self.actions.push_back(Action::SaveConfig);
        for (peer, p) in &self.peers {
            if let Some(link) = p.links.current.map(|l| l.id)
                && Some(peer) != from
            {
                let message = PeerMessage::Config(delta.clone());
                self.actions.push_back(Action::Send { peer: peer.clone(), link, message });
            }
        }
        // Clusters may have changed: every lane may now ship (or stop); functions and
        // their modules may have changed too.
        self.pump_all();
        self.blobs_config_changed();
    }

    pub(super) fn pump_all(&mut self) {
        let topics: Vec<TopicName> = self.topics.keys().cloned().collect();
        for topic in &topics {
            let peers: Vec<NodeName> = self.peers.keys().cloned().collect();
            for peer in peers {
                self.pump(&peer, topic);
            }
        }
    }

    /// A message from `peer` on `link`. Only the current link's messages count, except a
    /// Hello, which also decides a candidate link, and a catalogue delta (a CRDT merge is
    /// Every lane that ships, by peer then topic.
    pub fn lanes(&self) -> Vec<(NodeName, TopicName, LaneStats)> {
        let mut out = Vec::new();
        for (peer, p) in &self.peers {
            for (topic, lane) in &p.lanes {
                if !self.config.replicates_between(&namespace_of(topic), &self.node, peer) {
                    continue;
                }
                let end = self.topics.get(topic).copied().unwrap_or(0);
                let stats = LaneStats {
                    lag_messages: end.saturating_sub(lane.cursor()),
                    cursor: lane.cursor(),
                    in_flight: lane.in_flight(),
                    counters: lane.counters,
                };
                out.push((peer.clone(), topic.clone(), stats));
            }
        }
        out
    }

    /// The greeted current link to `peer`, if any.
    pub fn link(&self, peer: &NodeName) -> Option<LinkId> {
        self.peers.get(peer).and_then(|p| p.links.greeted())
    }

    /// The current link to `peer`, greeted or not: the one whose batches may be appended.
    pub fn current_link(&self, peer: &NodeName) -> Option<LinkId> {
        self.peers.get(peer).and_then(|p| p.links.current.map(|l| l.id))
    }

    /// Link events of `peer` since start.
    pub fn link_stats(&self, peer: &NodeName) -> LinkStats {
        self.peers.get(peer).map(|p| p.links.stats).unwrap_or_default()
    }
}

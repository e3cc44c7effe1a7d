//! Messages from peers: Hello, catalogue deltas, link announcements, batches and acks.
use std::collections::BTreeSet;

use rill_storage::{NodeName, TopicName};

use super::{Action, PeerMessage, Replicator, Summary};
use crate::{
    link::{CloseReason, Greeting, LinkId},
    namespace::ConfigDoc,
};

impl Replicator {
    /// harmless from anywhere).
    pub fn handle_message(&mut self, now_ms: u64, peer: &NodeName, link: LinkId, message: PeerMessage) {
        self.blobs.saw_time(now_ms);
        let Some(p) = self.peers.get_mut(peer) else { return };
        if let PeerMessage::Hello { boot, config, holds, links, blobs } = message {
            let we_are_smaller = self.node < *peer;
            match p.links.hello(now_ms, link, boot, we_are_smaller) {
                Greeting::Greeted => {}
                Greeting::Promoted(old) => {
                    self.close(peer, old, CloseReason::Replaced);
                    self.link_replaced(peer);
                    // Our Hello goes out on the winner only now.
                    self.actions.push_back(Action::Greet { peer: peer.clone(), link });
                }
                Greeting::Refused => return self.close(peer, link, CloseReason::Duplicate),
                Greeting::Repeated => {
                    return self.violation(now_ms, peer, link, "a second Hello on the same link".into());
                }
                Greeting::Stale => return,
            }
            self.greeted(peer, &config, holds, links);
            return self.blobs_greeted(peer, blobs);
        }
        if let PeerMessage::Config(delta) = &message {
            return self.merge_config(peer, delta);
        }
        if !p.links.is_current(link) {
            return;
        }
        match message {
            PeerMessage::Hello { .. } | PeerMessage::Config(_) => unreachable!("handled above"),
            PeerMessage::Links(links) => {
                self.learn_links(peer, links);
                self.pump_all();
            }
            PeerMessage::Batch { topic, batch, messages } => {
                p.lanes.entry(topic.clone()).or_default().received(&messages);
                self.actions.push_back(Action::Append { peer: peer.clone(), link, topic, batch, messages });
            }
            PeerMessage::Ack { topic, batch } => self.handle_ack(now_ms, peer, link, &topic, batch),
            message @ (PeerMessage::Blobs(_)
            | PeerMessage::BlobWant { .. }
            | PeerMessage::BlobChunk { .. }
            | PeerMessage::BlobMissing { .. }) => self.handle_blob_message(peer, link, message),
        }
    }

    pub(super) fn greeted(
        &mut self,
        peer: &NodeName,
        config: &ConfigDoc,
        holds: Vec<(TopicName, Summary)>,
        links: BTreeSet<NodeName>,
    ) {
        let p = self.peers.get_mut(peer).expect("greeted peers exist");
        for (topic, summary) in holds {
            p.lanes.entry(topic).or_default().peer_holds_too(summary.into_index());
        }
        self.learn_links(peer, links);
        self.announce_links();
        self.merge_config(peer, config);
        self.pump_all();
    }

    /// The peer broke the protocol on `link`: close it. Closing the current link is a link
    /// loss like any other: lanes restart from their cursors, and no cursor moves.
    pub(super) fn violation(&mut self, now_ms: u64, peer: &NodeName, link: LinkId, what: String) {
        self.close(peer, link, CloseReason::Violation(what));
        self.handle_link_closed(now_ms, peer, link);
    }

    /// Records a peer's live links. Where one of them went down, messages we skipped
    /// for that node (its link to the origin was to deliver them) must now go through us:
    /// lanes to it rewind to the lowest skipped offset. What the node holds is still left
    /// out.
    pub(super) fn learn_links(&mut self, peer: &NodeName, links: BTreeSet<NodeName>) {
        let dropped: Vec<NodeName> = match self.links_of.get(peer) {
            Some(old) => old.difference(&links).cloned().collect(),
            None => Vec::new(),
        };
        self.links_of.insert(peer.clone(), links);
        for q in dropped {
            let Some(p) = self.peers.get_mut(&q) else { continue };
            for (topic, lane) in &mut p.lanes {
                if let Some(offset) = lane.rewind_past_skips() {
                    self.actions.push_back(Action::SaveCursor { peer: q.clone(), topic: topic.clone(), offset });
                }
            }
        }
    }

    /// True when a message from `origin` need not travel from this node to `peer`: the
    /// peer is its origin, or the origin has a live link to the peer and its own lane (in
    /// order) delivers it. Relaying it too would only send duplicates.
    pub(super) fn delivered_elsewhere(&self, origin: &str, peer: &NodeName) -> bool {
        *peer == *origin || (self.node != *origin && self.links_of.get(origin).is_some_and(|n| n.contains(peer)))
    }

    pub(super) fn merge_config(&mut self, peer: &NodeName, theirs: &ConfigDoc) {
        if let Some(s) = theirs.max_stamp() {
            self.clock.observe(s.hlc);
        }
        let (delta, refused) = self.config.merge(theirs, &*self.verify);
        for why in refused {
            self.refused_entries += 1;
            self.actions.push_back(Action::EntryRefused { peer: peer.clone(), why });
        }
        self.config_changed(delta, Some(peer));
    }
}

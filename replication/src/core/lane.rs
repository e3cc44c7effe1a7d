//! Lanes: per (peer, topic), the local log shipped in order from a cursor, and the acks
//! that move the cursor.
use std::collections::{BTreeSet, VecDeque};

use rill_storage::{Message, NodeName, StoredMessage, TopicName, dedup::DedupIndex};

use super::{Action, PeerMessage, Replicator, namespace_of};
use crate::link::{CloseReason, LinkId};

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
pub(super) struct InFlight {
    batch: u64,
    /// Local offset after the batch's last message.
    end: u64,
    /// What the batch carries, recorded into the peer's holds on ack.
    ids: DedupIndex,
    acked: bool,
}

/// One (peer, topic) lane.
#[derive(Debug, Default)]
pub(super) struct Lane {
    /// Every local offset below this is held by the peer (persisted).
    cursor: u64,
    /// Next offset to read.
    next_read: u64,
    /// The outstanding read, if any.
    reading: Option<u64>,
    in_flight: VecDeque<InFlight>,
    next_batch: u64,
    /// The first batch number sent on the current link: an ack below it (or at or past
    /// `next_batch`) names a batch the peer never got on this link.
    link_first_batch: u64,
    /// What the peer is known to hold.
    peer_holds: DedupIndex,
    /// Lowest offset skipped because the origin delivers it itself, since the last rewind.
    skip_floor: Option<u64>,
    pub(super) counters: LaneCounters,
}

/// Messages moved on one lane since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LaneCounters {
    /// Messages sent to the peer in batches.
    pub sent: u64,
    /// Messages received from the peer in batches on a current link.
    pub received: u64,
    /// Received messages this node already held.
    pub deduplicated: u64,
}

impl Lane {
    /// The cursor to persist: never past a message skipped because its origin was to
    /// deliver it. After a restart this node does not yet know the origin's links and
    /// relays again; it must start at or before the first skip, or it would deliver the
    /// origin's later messages before the skipped ones (found by the simulation).
    pub(super) fn durable_cursor(&self) -> u64 {
        self.skip_floor.map_or(self.cursor, |f| f.min(self.cursor))
    }

    /// Starts from a saved cursor (at start-up).
    pub(super) fn restore(&mut self, offset: u64) {
        self.cursor = offset;
        self.next_read = offset;
    }

    /// Every local offset below this is held by the peer.
    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Batches sent and not yet acknowledged.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A batch came from the peer: it holds these messages.
    pub(super) fn received(&mut self, messages: &[Message]) {
        self.counters.received += messages.len() as u64;
        for m in messages {
            self.peer_holds.record(m, 0);
        }
    }

    /// The peer also holds `index` (from its Hello).
    pub(super) fn peer_holds_too(&mut self, index: DedupIndex) {
        self.peer_holds.merge(index);
    }

    /// The node a skipped message's origin was to deliver it through lost its link: rewinds
    /// to the lowest offset skipped, so this lane delivers it. Answers the new cursor, or
    /// `None` when nothing read was skipped (a skip may sit in a batch still in flight, at
    /// or past the cursor: then nothing was sent past it yet).
    pub(super) fn rewind_past_skips(&mut self) -> Option<u64> {
        let skipped_at = self.skip_floor.unwrap_or(u64::MAX);
        if skipped_at >= self.next_read {
            return None;
        }
        let target = skipped_at.min(self.cursor);
        self.cursor = target;
        self.next_read = target;
        self.in_flight.clear();
        self.reading = None;
        self.skip_floor = None;
        Some(target)
    }

    /// Forgets what was in flight and reads again from the cursor (a new link, or a rewind).
    pub(super) fn restart(&mut self) {
        self.in_flight.clear();
        self.reading = None;
        self.next_read = self.cursor;
        self.link_first_batch = self.next_batch;
    }
}

/// Replication state of one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneStats {
    /// Local messages at or past the cursor (not yet known to be at the peer).
    pub lag_messages: u64,
    /// The cursor.
    pub cursor: u64,
    /// Batches in flight.
    pub in_flight: usize,
    /// Messages moved since start.
    pub counters: LaneCounters,
}

impl Replicator {
    pub(super) fn handle_ack(&mut self, now_ms: u64, peer: &NodeName, link: LinkId, topic: &TopicName, batch: u64) {
        let lane = self.peers.get_mut(peer).and_then(|p| p.lanes.get_mut(topic));
        let sent_here = lane.as_ref().is_some_and(|l| (l.link_first_batch..l.next_batch).contains(&batch));
        if !sent_here {
            let what = format!("an ack for batch {batch} of {topic}, never sent on this link");
            return self.violation(now_ms, peer, link, what);
        }
        let lane = lane.expect("checked above");
        // A batch sent here but no longer in flight was forgotten by a rewind: ignore it.
        let Some(entry) = lane.in_flight.iter_mut().find(|b| b.batch == batch) else { return };
        if entry.acked {
            return self.violation(now_ms, peer, link, format!("a second ack for batch {batch} of {topic}"));
        }
        entry.acked = true;
        lane.peer_holds.merge(std::mem::take(&mut entry.ids));
        self.advance(peer, topic);
        self.pump(peer, topic);
    }

    /// Moves the cursor past every acknowledged batch at the front of the lane.
    pub(super) fn advance(&mut self, peer: &NodeName, topic: &TopicName) {
        let Some(lane) = self.peers.get_mut(peer).and_then(|p| p.lanes.get_mut(topic)) else { return };
        let before = lane.durable_cursor();
        while lane.in_flight.front().is_some_and(|b| b.acked) {
            let done = lane.in_flight.pop_front().expect("front exists");
            lane.cursor = done.end;
        }
        let durable = lane.durable_cursor();
        if durable != before {
            self.actions.push_back(Action::SaveCursor { peer: peer.clone(), topic: topic.clone(), offset: durable });
        }
    }

    /// Starts a read on the lane if it may ship and has room.
    pub(super) fn pump(&mut self, peer: &NodeName, topic: &TopicName) {
        let end = self.topics.get(topic).copied().unwrap_or(0);
        let ships = self.config.replicates_between(&namespace_of(topic), &self.node, peer);
        let Some(p) = self.peers.get_mut(peer) else { return };
        if p.links.greeted().is_none() || !ships {
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
            peer: peer.clone(),
            topic: topic.clone(),
            from: lane.next_read,
            max_messages: self.settings.batch_messages_max,
            max_bytes: self.settings.batch_bytes_max,
            ticket: self.next_ticket,
        });
    }

    /// The result of an [`Action::Read`]: messages from the requested offset on, in order.
    pub fn handle_read(&mut self, peer: &NodeName, topic: &TopicName, ticket: u64, messages: Vec<StoredMessage>) {
        let skip: BTreeSet<std::sync::Arc<str>> = messages
            .iter()
            .map(|m| std::sync::Arc::clone(&m.message.origin))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|origin| self.delivered_elsewhere(origin, peer))
            .collect();
        let Some(p) = self.peers.get_mut(peer) else { return };
        let Some(link) = p.links.greeted() else { return };
        let Some(lane) = p.lanes.get_mut(topic) else { return };
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
                ids.record(&m.message, m.offset);
                m.message
            })
            .collect();
        let batch = lane.next_batch;
        lane.next_batch += 1;
        lane.next_read = end;
        let acked = fresh.is_empty() || (self.settings.bug_skip_batch && batch == 1);
        lane.in_flight.push_back(InFlight { batch, end, ids, acked });
        if !acked {
            lane.counters.sent += fresh.len() as u64;
            let message = PeerMessage::Batch { topic: topic.clone(), batch, messages: fresh };
            self.actions.push_back(Action::Send { peer: peer.clone(), link, message });
        }
        self.advance(peer, topic);
        self.pump(peer, topic);
    }

    /// The result of an [`Action::Append`] of a batch that came on `link`: `Ok` with the
    /// number of messages already held, or why it failed. A result of a link that is no
    /// longer current is ignored (its batch numbers mean nothing on the new link). A
    /// failure closes the link, so the peer resends from its cursor on the next one.
    pub fn handle_appended(
        &mut self,
        now_ms: u64,
        peer: &NodeName,
        link: LinkId,
        topic: &TopicName,
        batch: u64,
        result: Result<u64, String>,
    ) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        if !p.links.is_current(link) {
            return;
        }
        match result {
            Ok(duplicates) => {
                p.lanes.entry(topic.clone()).or_default().counters.deduplicated += duplicates;
                let message = PeerMessage::Ack { topic: topic.clone(), batch };
                self.actions.push_back(Action::Send { peer: peer.clone(), link, message });
            }
            Err(reason) => {
                self.close(peer, link, CloseReason::AppendFailed(reason));
                self.handle_link_closed(now_ms, peer, link);
            }
        }
    }
}

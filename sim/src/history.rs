//! What the user's simulated clients did, in simulated time order: every message sent,
//! every produce outcome, every delivery. Tests assert on it after a run.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    rc::Rc,
    time::Duration,
};

use rill_storage::message::MessageId;

/// One thing a simulated client did or saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message was sent (not yet acknowledged).
    Sent {
        /// Simulated time.
        at: Duration,
        /// The client.
        client: String,
        /// The node it was sent to.
        node: String,
        /// Its topic.
        topic: String,
        /// Its dedup id.
        id: MessageId,
    },
    /// The node acknowledged a message: it is on that node's disk.
    Acked {
        /// Simulated time.
        at: Duration,
        /// The client.
        client: String,
        /// The node that acknowledged it.
        node: String,
        /// Its topic.
        topic: String,
        /// Its dedup id.
        id: MessageId,
        /// True when the node already held it (a retry of a message stored before).
        duplicate: bool,
    },
    /// The node refused a batch for good (it will not be resent): a bad name, a message
    /// too large, a quota.
    Refused {
        /// Simulated time.
        at: Duration,
        /// The client.
        client: String,
        /// The node that refused.
        node: String,
        /// Its topic.
        topic: String,
        /// The refused messages.
        ids: Vec<MessageId>,
        /// The node's reason.
        error: String,
    },
    /// A consumer received a message.
    Delivered {
        /// Simulated time.
        at: Duration,
        /// The client.
        client: String,
        /// The node it came from.
        node: String,
        /// Its topic.
        topic: String,
        /// The subscription.
        subscription: String,
        /// Its offset in that node's log.
        offset: u64,
        /// Its dedup id.
        id: MessageId,
        /// The node that first accepted it.
        origin: String,
    },
    /// A line the client wrote with [`crate::Ctx::note`].
    Note {
        /// Simulated time.
        at: Duration,
        /// The client.
        client: String,
        /// The text.
        text: String,
    },
}

impl Event {
    /// When it happened, in simulated time since the start of the run.
    pub fn at(&self) -> Duration {
        match self {
            Event::Sent { at, .. }
            | Event::Acked { at, .. }
            | Event::Refused { at, .. }
            | Event::Delivered { at, .. }
            | Event::Note { at, .. } => *at,
        }
    }

    /// The client it belongs to.
    pub fn client(&self) -> &str {
        match self {
            Event::Sent { client, .. }
            | Event::Acked { client, .. }
            | Event::Refused { client, .. }
            | Event::Delivered { client, .. }
            | Event::Note { client, .. } => client,
        }
    }
}

/// A delivery, as [`History::deliveries`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Simulated time.
    pub at: Duration,
    /// The node it came from.
    pub node: String,
    /// Its topic.
    pub topic: String,
    /// Its dedup id.
    pub id: MessageId,
}

/// The recorded history of a run: a cheap handle, shared by the mesh and its clients.
#[derive(Debug, Clone, Default)]
pub struct History {
    events: Rc<RefCell<Vec<Event>>>,
}

impl History {
    pub(crate) fn push(&self, event: Event) {
        self.events.borrow_mut().push(event);
    }

    /// Every event so far, in simulated time order.
    pub fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }

    /// The messages of `topic` that some node acknowledged, by dedup id.
    pub fn acked(&self, topic: &str) -> BTreeSet<MessageId> {
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Acked { topic: t, id, .. } if t == topic => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    /// The messages of `topic` sent and never acknowledged (lost in flight or refused).
    pub fn unacked(&self, topic: &str) -> BTreeSet<MessageId> {
        let acked = self.acked(topic);
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Sent { topic: t, id, .. } if t == topic && !acked.contains(id) => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    /// What `client`'s consumers received, in order, redeliveries included.
    pub fn deliveries(&self, client: &str) -> Vec<Delivery> {
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Delivered { at, client: c, node, topic, id, .. } if c == client => {
                    Some(Delivery { at: *at, node: node.clone(), topic: topic.clone(), id: id.clone() })
                }
                _ => None,
            })
            .collect()
    }

    /// The lines `client` wrote with [`crate::Ctx::note`], in order.
    pub fn notes(&self, client: &str) -> Vec<String> {
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Note { client: c, text, .. } if c == client => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    /// Messages `client` received more than once, with how many times.
    pub fn redelivered(&self, client: &str) -> BTreeMap<MessageId, usize> {
        let mut seen: BTreeMap<MessageId, usize> = BTreeMap::new();
        for d in self.deliveries(client) {
            *seen.entry(d.id).or_default() += 1;
        }
        seen.retain(|_, n| *n > 1);
        seen
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rill_storage::message::ProducerId;

    use super::*;

    fn id(seq: u64) -> MessageId {
        MessageId { producer: ProducerId(Arc::from("p")), epoch: 0, seq }
    }

    #[test]
    fn acked_unacked_and_redelivered_follow_the_events() {
        let h = History::default();
        let at = Duration::ZERO;
        let (client, node, topic) = ("c".to_string(), "n".to_string(), "t/n/x".to_string());
        for seq in 0..3 {
            h.push(Event::Sent { at, client: client.clone(), node: node.clone(), topic: topic.clone(), id: id(seq) });
        }
        for seq in [0, 2] {
            let (client, node, topic) = (client.clone(), node.clone(), topic.clone());
            h.push(Event::Acked { at, client, node, topic, id: id(seq), duplicate: false });
        }
        for seq in [0, 2, 0] {
            let (client, node, topic) = ("reader".to_string(), node.clone(), topic.clone());
            let (subscription, origin) = ("s".to_string(), "n".to_string());
            h.push(Event::Delivered { at, client, node, topic, subscription, offset: seq, id: id(seq), origin });
        }
        assert_eq!(h.acked("t/n/x"), [id(0), id(2)].into());
        assert!(h.acked("t/n/y").is_empty());
        assert_eq!(h.unacked("t/n/x"), [id(1)].into());
        assert_eq!(h.deliveries("reader").len(), 3);
        assert_eq!(h.redelivered("reader"), [(id(0), 2)].into());
        assert!(h.redelivered("c").is_empty());
        h.push(Event::Note { at, client: "c".into(), text: "hello".into() });
        assert_eq!(h.notes("c"), ["hello"]);
        assert!(h.notes("reader").is_empty());
    }
}

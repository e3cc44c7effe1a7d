//! Every key of the metadata store, in one place: each is built here and parsed here, so
//! a reader and a writer can never disagree on a key's shape. The store is flat and
//! ordered; a key's first part says whose record it is:
//!
//! | key | record | written by |
//! |---|---|---|
//! | `dedup/<topic>` | the topic's dedup snapshot | storage (checkpoints) |
//! | `sub/<topic>/<subscription>` | a subscription's cursor | the node's dispatchers |
//! | `repl/cursor/<peer>/<topic>` | the offset a peer has of a topic | the replication driver |
//! | `repl/catalogue` | the namespace catalogue, versioned | the replication driver |
//! | `repl/config` | wave 1's catalogue, read when `repl/catalogue` is absent | nobody now |
//! | `conflict/<topic>/<id>/<digest>` | a replicated content that lost a conflict | the node |
//! | `fn/<function>/<incarnation>/<input>` | a function's cursor on one input topic | the node's functions |
use crate::{MessageId, NodeName, TopicName};

/// The namespace catalogue (versioned, see `ConfigDoc::encode` in rill-replication).
pub const CATALOGUE: &str = "repl/catalogue";
/// Wave 1's catalogue (version 1), read when [`CATALOGUE`] is absent.
pub const CATALOGUE_V1: &str = "repl/config";

const DEDUP: &str = "dedup/";
const CURSOR: &str = "sub/";
const REPL_CURSOR: &str = "repl/cursor/";
const CONFLICT: &str = "conflict/";
const FUNCTION_CURSOR: &str = "fn/";

/// The key of a function's cursor on its input topic number `input`, per incarnation (a
/// re-created function starts afresh; an updated one keeps its position).
pub fn function_cursor(function: &str, incarnation: u64, input: u32) -> String {
    format!("{FUNCTION_CURSOR}{function}/{incarnation:016x}/{input}")
}

/// The key of a topic's dedup snapshot.
pub fn dedup(topic: &TopicName) -> String {
    format!("{DEDUP}{topic}")
}

/// The key of a subscription's cursor.
pub fn cursor(topic: &TopicName, subscription: &str) -> String {
    format!("{CURSOR}{topic}/{subscription}")
}

/// The prefix of every cursor of `topic`; [`cursor_name`] takes a subscription's name
/// back out of a key found under it.
pub fn cursors_of(topic: &TopicName) -> String {
    format!("{CURSOR}{topic}/")
}

/// The subscription a cursor key of `topic` names, if it is one.
pub fn cursor_name<'k>(topic: &TopicName, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(CURSOR)?.strip_prefix(&topic.to_string())?.strip_prefix('/')
}

/// The key of the offset `peer` has of `topic`.
pub fn repl_cursor(peer: &NodeName, topic: &TopicName) -> String {
    format!("{REPL_CURSOR}{peer}/{topic}")
}

/// The prefix of every replication cursor; [`parse_repl_cursor`] reads a key under it.
pub const REPL_CURSORS: &str = REPL_CURSOR;

/// The peer and topic of a replication cursor key (None for any other key, or a name that
/// no longer validates).
pub fn parse_repl_cursor(key: &str) -> Option<(NodeName, TopicName)> {
    let (peer, topic) = key.strip_prefix(REPL_CURSOR)?.split_once('/')?;
    Some((NodeName::parse(peer).ok()?, TopicName::parse(topic).ok()?))
}

/// The key of a kept conflict: one per (topic, id, content).
pub fn conflict(topic: &TopicName, id: &MessageId, digest: u64) -> String {
    format!("{CONFLICT}{topic}/{id}/{digest:016x}")
}

/// The prefix of the kept conflicts of one topic, or of all.
pub fn conflicts_of(topic: Option<&TopicName>) -> String {
    match topic {
        Some(t) => format!("{CONFLICT}{t}/"),
        None => CONFLICT.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProducerId;

    fn topic(name: &str) -> TopicName {
        TopicName::parse(name).unwrap()
    }

    #[test]
    fn cursor_keys_round_trip_and_do_not_leak_between_topics() {
        let (t, longer) = (topic("t/n/x"), topic("t/n/xy"));
        let key = cursor(&t, "work");
        assert_eq!(key, "sub/t/n/x/work");
        assert!(key.starts_with(&cursors_of(&t)));
        assert_eq!(cursor_name(&t, &key), Some("work"));
        assert_eq!(cursor_name(&longer, &key), None);
        assert!(!cursor(&longer, "work").starts_with(&cursors_of(&t)));
    }

    #[test]
    fn replication_cursor_keys_round_trip() {
        let (peer, t) = (NodeName::parse("eu-1").unwrap(), topic("t/n/x"));
        let key = repl_cursor(&peer, &t);
        assert!(key.starts_with(REPL_CURSORS));
        assert_eq!(parse_repl_cursor(&key), Some((peer, t)));
        assert_eq!(parse_repl_cursor("repl/cursor/eu-1/not-a-topic"), None);
        assert_eq!(parse_repl_cursor(CATALOGUE), None);
    }

    #[test]
    fn conflict_keys_sort_under_their_topic() {
        let id = MessageId { producer: ProducerId("p".into()), epoch: 0, seq: 7 };
        let key = conflict(&topic("t/n/x"), &id, 0xab);
        assert!(key.starts_with(&conflicts_of(Some(&topic("t/n/x")))));
        assert!(key.starts_with(&conflicts_of(None)));
        assert!(!key.starts_with(&conflicts_of(Some(&topic("t/n/y")))));
        assert!(key.ends_with("/00000000000000ab"));
    }
}

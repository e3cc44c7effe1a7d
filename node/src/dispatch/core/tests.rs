//! The dispatcher's rules, driven by hand: no sockets, no tokio, no clock but the one
//! passed in.
use std::sync::Arc;

use rill_storage::{Message, MessageId, StoredMessage, subscription::CursorState};

use super::*;

/// A log of `n` messages; message `o` has key `k{o % keys}`.
fn log(n: u64, keys: u64) -> Vec<StoredMessage> {
    (0..n)
        .map(|o| StoredMessage {
            offset: o,
            message: Message {
                id: MessageId::chosen("p", o),
                origin: "node".into(),
                publish_time_ms: 0,
                key: Some(format!("k{}", o % keys).into_bytes()),
                headers: Vec::new(),
                payload: vec![o as u8],
            },
        })
        .collect()
}

/// A subscription over a log, driven pass by pass.
struct Sub {
    core: Core,
    log: Vec<StoredMessage>,
    now: u64,
}

impl Sub {
    fn new(n: u64, keys: u64, unacked_max: usize) -> Sub {
        let core = Core::new("t/n/x", "s", CursorState::at(0), unacked_max, Arc::new(Counters::default()));
        Sub { core, log: log(n, keys), now: 1_000 }
    }

    fn consumer(&mut self, kind: SubscriptionType, name: &str, tweak: impl FnOnce(&mut ConsumerOptions)) -> u64 {
        let mut options = ConsumerOptions { kind, name: name.into(), ..ConsumerOptions::default() };
        tweak(&mut options);
        self.core.attach(options).expect("attached").consumer
    }

    /// Runs one pass at the current time, answering reads from the log; returns what the
    /// core asked for, deliveries as (consumer, offsets).
    fn pass(&mut self) -> (Vec<(u64, Vec<u64>)>, Vec<Output>) {
        self.core.begin_pass(self.now);
        let end = self.log.len() as u64;
        while let Some(read) = self.core.next_read(end) {
            let got = match read {
                Read::One(o) => self.log.iter().filter(|m| m.offset == o).cloned().collect(),
                Read::From(o) => self.log.iter().filter(|m| m.offset >= o).take(1000).cloned().collect(),
            };
            self.core.handle_read(self.now, read, Some(got));
        }
        let (mut delivered, mut other) = (Vec::new(), Vec::new());
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Deliver { consumer, messages } => {
                    delivered.push((consumer, messages.iter().map(|m| m.offset).collect()));
                }
                o => other.push(o),
            }
        }
        (delivered, other)
    }

    fn delivered(&mut self) -> Vec<(u64, Vec<u64>)> {
        self.pass().0
    }

    fn offsets_of(&mut self, consumer: u64) -> Vec<u64> {
        self.delivered().into_iter().filter(|(c, _)| *c == consumer).flat_map(|(_, o)| o).collect()
    }
}

#[test]
fn exclusive_takes_one_consumer_and_refuses_a_second_naming_it() {
    let mut s = Sub::new(3, 1, 100);
    let a = s.consumer(SubscriptionType::Exclusive, "a", |_| {});
    let err = s.core.attach(ConsumerOptions { name: "b".into(), ..ConsumerOptions::default() }).unwrap_err();
    assert!(err.to_string().contains("already has a consumer (exclusive)"), "{err}");
    assert_eq!(s.delivered(), vec![(a, vec![0, 1, 2])]);
    assert_eq!(s.delivered(), vec![], "nothing is delivered twice");
}

#[test]
fn a_consumer_of_another_type_cannot_join() {
    let mut s = Sub::new(1, 1, 100);
    s.consumer(SubscriptionType::Shared, "a", |_| {});
    let options = ConsumerOptions { kind: SubscriptionType::KeyShared, ..ConsumerOptions::default() };
    assert!(s.core.attach(options).unwrap_err().to_string().contains("is Shared; a KeyShared consumer"));
}

#[test]
fn failover_gives_the_active_consumers_unacked_messages_to_the_next() {
    let mut s = Sub::new(4, 1, 100);
    let a = s.consumer(SubscriptionType::Failover, "a", |_| {});
    let b = s.consumer(SubscriptionType::Failover, "b", |_| {});
    assert_eq!(s.delivered(), vec![(a, vec![0, 1, 2, 3])], "only the first consumer is active");
    s.core.ack(&[0, 1]);
    s.core.detach(a);
    assert_eq!(s.delivered(), vec![(b, vec![2, 3])], "the unacked ones move to the stand-by");
}

#[test]
fn shared_spreads_round_robin_within_each_consumers_room() {
    let mut s = Sub::new(7, 7, 3);
    let a = s.consumer(SubscriptionType::Shared, "a", |_| {});
    let b = s.consumer(SubscriptionType::Shared, "b", |_| {});
    assert_eq!(s.delivered(), vec![(a, vec![0, 2, 4]), (b, vec![1, 3, 5])], "3 each at most");
    s.core.ack(&[2]);
    assert_eq!(s.delivered(), vec![(a, vec![6])], "an ack makes room for one more");
}

#[test]
fn key_shared_keeps_a_key_with_its_consumer_until_its_messages_are_acked() {
    let mut s = Sub::new(40, 4, 100);
    let a = s.consumer(SubscriptionType::KeyShared, "a", |_| {});
    let first = s.offsets_of(a);
    assert_eq!(first.len(), 40, "a lone consumer gets every key");
    // A second consumer joins while every key is in flight at `a`.
    s.log.extend(log(80, 4).into_iter().skip(40));
    let b = s.consumer(SubscriptionType::KeyShared, "b", |_| {});
    let second = s.delivered();
    assert!(second.iter().all(|(c, _)| *c == a), "in-flight keys stay with their consumer: {second:?}");
    // Once `a` acks everything, the keys `b` wins by rendezvous move to it, and only those.
    let all: Vec<u64> = (0..80).collect();
    s.core.ack(&all);
    s.log.extend(log(120, 4).into_iter().skip(80));
    let third = s.delivered();
    let key_of = |o: &u64| o % 4;
    for (consumer, offsets) in &third {
        let keys: std::collections::BTreeSet<u64> = offsets.iter().map(key_of).collect();
        let other = third.iter().find(|(c, _)| c != consumer).map(|(_, o)| o.iter().map(key_of).collect());
        assert!(other.is_none_or(|o: std::collections::BTreeSet<u64>| o.is_disjoint(&keys)), "{third:?}");
    }
    assert!(third.iter().any(|(c, _)| *c == b), "b wins some of the 4 keys: {third:?}");
}

#[test]
fn key_shared_holds_a_keys_later_messages_while_its_consumer_is_full() {
    let mut s = Sub::new(6, 1, 2);
    s.consumer(SubscriptionType::KeyShared, "a", |_| {});
    s.consumer(SubscriptionType::KeyShared, "b", |_| {});
    let owner = s.delivered();
    assert_eq!(owner.len(), 1, "one key, one consumer: {owner:?}");
    let (holder, offsets) = owner[0].clone();
    assert_eq!(offsets, vec![0, 1]);
    s.core.ack(&[0, 1]);
    let next = s.delivered();
    assert_eq!(next, vec![(holder, vec![2, 3])], "the key's order holds across the wait");
}

#[test]
fn a_nack_redelivers_only_after_the_consumers_nack_delay() {
    let mut s = Sub::new(2, 1, 100);
    let a = s.consumer(SubscriptionType::Exclusive, "a", |o| o.nack_delay_ms = 500);
    assert_eq!(s.delivered(), vec![(a, vec![0, 1])]);
    s.core.nack(s.now, a, &[1]);
    assert_eq!(s.core.next_wake(), Some(s.now + 500));
    s.now += 499;
    assert_eq!(s.delivered(), vec![]);
    s.now += 1;
    assert_eq!(s.delivered(), vec![(a, vec![1])]);
}

#[test]
fn an_ack_timeout_redelivers_what_was_not_acked_in_time() {
    let mut s = Sub::new(3, 1, 100);
    let a = s.consumer(SubscriptionType::Exclusive, "a", |o| o.ack_timeout_ms = Some(1_000));
    assert_eq!(s.delivered(), vec![(a, vec![0, 1, 2])]);
    s.core.ack(&[1]);
    assert_eq!(s.core.next_wake(), Some(s.now + 1_000));
    s.now += 999;
    assert_eq!(s.delivered(), vec![]);
    s.now += 1;
    assert_eq!(s.delivered(), vec![(a, vec![0, 2])], "the acked one is not redelivered");
    s.core.ack(&[0, 2]);
    assert_eq!(s.core.next_wake(), None, "acks clear their deadlines");
}

#[test]
fn past_max_redeliveries_a_message_goes_to_the_dead_letter_topic_once_stored_there() {
    let mut s = Sub::new(1, 1, 100);
    let a = s.consumer(SubscriptionType::Shared, "a", |o| {
        o.nack_delay_ms = 0;
        o.max_redeliveries = Some(1);
        o.dead_letter_topic = Some("t/n/dlq".into());
    });
    assert_eq!(s.delivered(), vec![(a, vec![0])]);
    s.core.nack(s.now, a, &[0]);
    assert_eq!(s.delivered(), vec![(a, vec![0])], "redelivery 1 of at most 1");
    s.core.nack(s.now, a, &[0]);
    let (delivered, outputs) = s.pass();
    assert_eq!(delivered, vec![]);
    let [Output::DeadLetter { message, topic, redelivered }] = &outputs[..] else { panic!("{outputs:?}") };
    assert_eq!((message.offset, topic.as_deref(), *redelivered), (0, Some("t/n/dlq"), 2));
    // The dead-letter write failed: it is tried again, not acked.
    s.core.dead_lettered(0, false);
    assert!(!s.core.cursor().is_acked(0));
    let (_, outputs) = s.pass();
    assert!(matches!(outputs[..], [Output::DeadLetter { .. }]), "{outputs:?}");
    s.core.dead_lettered(0, true);
    assert!(s.core.cursor().is_acked(0), "acked once stored in the dead-letter topic");
    assert!(matches!(s.core.poll_output(), Some(Output::SaveCursor)));
}

#[test]
fn acks_of_offsets_never_delivered_are_ignored() {
    let mut s = Sub::new(5, 1, 100);
    let a = s.consumer(SubscriptionType::Exclusive, "a", |_| {});
    assert_eq!(s.delivered(), vec![(a, vec![0, 1, 2, 3, 4])]);
    s.core.ack(&[7]);
    assert!(!s.core.cursor().is_acked(7), "a confused client cannot skip messages");
    s.core.ack_cumulative(a, 9);
    assert_eq!(s.core.cursor().ack_floor, 5, "a cumulative ack stops at what was read");
}

#[test]
fn a_detached_consumers_messages_go_to_the_others_at_once() {
    let mut s = Sub::new(4, 4, 100);
    let a = s.consumer(SubscriptionType::Shared, "a", |o| o.nack_delay_ms = 60_000);
    let b = s.consumer(SubscriptionType::Shared, "b", |_| {});
    assert_eq!(s.delivered(), vec![(a, vec![0, 2]), (b, vec![1, 3])]);
    s.core.detach(a);
    assert_eq!(s.delivered(), vec![(b, vec![0, 2])], "no nack delay for a detach");
}

#[test]
fn a_seek_drops_every_consumer_and_restarts_from_the_offset() {
    let mut s = Sub::new(5, 1, 100);
    let a = s.consumer(SubscriptionType::Exclusive, "a", |_| {});
    assert_eq!(s.delivered(), vec![(a, vec![0, 1, 2, 3, 4])]);
    s.core.seek(3);
    assert!(matches!(s.core.poll_output(), Some(Output::Disconnect { consumer }) if consumer == a));
    let b = s.consumer(SubscriptionType::Exclusive, "b", |_| {});
    assert_eq!(s.delivered(), vec![(b, vec![3, 4])]);
    assert!(s.core.check_deletable().unwrap_err().to_string().contains("1 consumer(s) attached"));
}

#[test]
fn a_failed_read_ends_the_pass_and_is_retried_by_the_next() {
    let mut s = Sub::new(3, 1, 100);
    let a = s.consumer(SubscriptionType::Exclusive, "a", |_| {});
    s.core.begin_pass(s.now);
    let read = s.core.next_read(3).expect("a read");
    s.core.handle_read(s.now, read, None);
    assert_eq!(s.core.next_read(3), None);
    assert_eq!(s.delivered(), vec![(a, vec![0, 1, 2])]);
}

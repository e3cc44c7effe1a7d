//! Subscription types, nacks, ack timeouts and dead letters, with consumers as separate
//! processes (`rill consume`) where the test needs no finer control than the CLI gives,
//! and as separate client connections in this process where it does.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use rill_node::{
    client::{Client, Consumer, Outgoing},
    protocol::{ConsumerOptions, StartPosition, SubscriptionType},
};

use crate::support::{ConsumerProcess, TestNode, eventually};

const WAIT: Duration = Duration::from_secs(20);

async fn produce(client: &Client, topic: &str, messages: Vec<Outgoing>) {
    let mut p = client.producer(topic, format!("p-{}", messages.len())).await.expect("producer");
    p.send(messages).await.expect("send");
    p.close().await.expect("acks");
}

fn payloads(from: usize, n: usize) -> Vec<Outgoing> {
    (from..from + n).map(|i| Outgoing::payload(format!("m{i}"))).collect()
}

/// Consumers attached to `subscription` of `topic`, per the node's stats.
async fn consumers(client: &Client, topic: &str, subscription: &str) -> u64 {
    let stats = client.stats().await.expect("stats");
    let t = stats.topics.iter().find(|t| t.topic == topic);
    t.and_then(|t| t.subscriptions.iter().find(|s| s.name == subscription)).map_or(0, |s| s.consumers)
}

async fn wait_consumers(client: &Client, topic: &str, subscription: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while consumers(client, topic, subscription).await != n {
        assert!(tokio::time::Instant::now() < deadline, "{n} consumers never attached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn options(kind: SubscriptionType, name: &str) -> ConsumerOptions {
    ConsumerOptions { kind, name: name.into(), ..ConsumerOptions::default() }
}

/// The next delivery within `timeout`, if any.
async fn next_within(c: &mut Consumer, timeout: Duration) -> Option<(u64, Vec<u8>)> {
    let m = tokio::time::timeout(timeout, c.next()).await.ok()?.expect("next")?;
    Some((m.offset, m.message.key.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_consumers_split_the_stream_and_each_message_goes_to_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "shared");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 1)).await; // the topic exists before the consumers
    let group: Vec<ConsumerProcess> =
        (0..3).map(|_| ConsumerProcess::start(&node, "t/n/x", "work", &["--type", "shared"])).collect();
    wait_consumers(&client, "t/n/x", "work", 3).await;
    for i in 0..10 {
        produce(&client, "t/n/x", payloads(1 + i * 300, 300)).await;
    }
    let all = |g: &[ConsumerProcess]| g.iter().map(|c| c.offsets().len()).sum::<usize>();
    assert!(eventually(WAIT, || all(&group) >= 3001).await, "delivered {} of 3001", all(&group));
    let mut seen = BTreeSet::new();
    for c in &group {
        let offsets = c.offsets();
        let shares: Vec<usize> = group.iter().map(|c| c.offsets().len()).collect();
        assert!(offsets.len() >= 300, "each consumer takes a share: {shares:?}");
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "a consumer sees its share in log order");
        seen.extend(offsets);
    }
    assert_eq!(seen, (0..3001).collect(), "every message delivered once, none lost");
    assert_eq!(all(&group), 3001, "no message delivered twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_standby_takes_over_after_kill9_of_the_active_consumer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "failover");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 1)).await;
    let mut active = ConsumerProcess::start(&node, "t/n/x", "feed", &["--type", "failover", "--name", "a"]);
    wait_consumers(&client, "t/n/x", "feed", 1).await;
    let standby = ConsumerProcess::start(&node, "t/n/x", "feed", &["--type", "failover", "--name", "b"]);
    wait_consumers(&client, "t/n/x", "feed", 2).await;
    produce(&client, "t/n/x", payloads(1, 99)).await;
    assert!(eventually(WAIT, || active.offsets().len() == 100).await, "the active consumer gets everything");
    assert!(standby.offsets().is_empty(), "the standby gets nothing while the active one lives");
    // Wait for the acks to be stored, then kill the active consumer.
    let acked = || async {
        let stats = client.stats().await.expect("stats");
        stats.topics[0].subscriptions.iter().find(|s| s.name == "feed").map(|s| s.ack_floor)
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked().await != Some(100) {
        assert!(tokio::time::Instant::now() < deadline, "acks never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    active.kill9();
    produce(&client, "t/n/x", payloads(100, 100)).await;
    assert!(eventually(WAIT, || standby.offsets().len() >= 100).await, "the standby took over");
    assert_eq!(standby.offsets(), (100..200).collect::<Vec<_>>(), "in order, from the acked position");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_shared_moves_a_key_only_once_none_of_its_messages_is_in_flight() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "keyshared");
    let client = node.client().await;
    let keyed = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| Outgoing { key: Some(format!("k{}", i % 20).into_bytes()), ..Outgoing::payload(format!("m{i}")) })
            .collect::<Vec<_>>()
    };
    produce(&client, "t/n/x", keyed(0, 200)).await;
    let (c1_conn, c2_conn) = (node.client().await, node.client().await);
    let start = StartPosition::Earliest;
    let mut c1 =
        c1_conn.subscribe_with("t/n/x", "s", start, options(SubscriptionType::KeyShared, "c1")).await.expect("c1");
    let mut held = Vec::new();
    while let Some(m) = next_within(&mut c1, Duration::from_secs(5)).await {
        held.push(m);
        if held.len() == 200 {
            break;
        }
    }
    assert_eq!(held.len(), 200, "alone, c1 gets every key");
    // c1 holds all 200 unacked: every key is in flight there, so none may move to c2.
    let mut c2 =
        c2_conn.subscribe_with("t/n/x", "s", start, options(SubscriptionType::KeyShared, "c2")).await.expect("c2");
    wait_consumers(&client, "t/n/x", "s", 2).await;
    produce(&client, "t/n/x", keyed(200, 200)).await;
    assert!(next_within(&mut c2, Duration::from_millis(700)).await.is_none(), "a key moved while in flight");
    while let Some(m) = next_within(&mut c1, Duration::from_secs(2)).await {
        held.push(m);
        if held.len() == 400 {
            break;
        }
    }
    assert_eq!(held.len(), 400);
    for (o, _) in &held {
        c1.ack(*o);
    }
    c1.flush_acks().await.expect("acks");
    // Nothing in flight: new messages go by the hash of key and consumer, so some keys move.
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce(&client, "t/n/x", keyed(400, 200)).await;
    let mut by_consumer: BTreeMap<&str, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    while by_consumer.values().map(Vec::len).sum::<usize>() < 200 {
        tokio::select! {
            Some(m) = next_within(&mut c1, WAIT) => by_consumer.entry("c1").or_default().push(m),
            Some(m) = next_within(&mut c2, WAIT) => by_consumer.entry("c2").or_default().push(m),
            else => panic!("deliveries stopped at {:?}", by_consumer.values().map(Vec::len).collect::<Vec<_>>()),
        }
    }
    let keys = |c: &str| by_consumer.get(c).into_iter().flatten().map(|(_, k)| k.clone()).collect::<BTreeSet<_>>();
    assert!(!keys("c2").is_empty() && !keys("c1").is_empty(), "keys spread over both consumers");
    assert!(keys("c1").is_disjoint(&keys("c2")), "a key is on one consumer at a time");
    for msgs in by_consumer.values() {
        let mut last: BTreeMap<&[u8], u64> = BTreeMap::new();
        for (o, k) in msgs {
            assert!(last.insert(k, *o).is_none_or(|prev| prev < *o), "per-key order");
        }
    }
    // c1 leaves with its last messages unacked: c2 gets them, each key in order.
    let c1_unacked: Vec<u64> = by_consumer.get("c1").into_iter().flatten().map(|(o, _)| *o).collect();
    c1.close().await.expect("close");
    let mut redelivered = Vec::new();
    while redelivered.len() < c1_unacked.len() {
        let m = next_within(&mut c2, WAIT).await.expect("c1's messages come to c2");
        c2.ack(m.0);
        redelivered.push(m.0);
    }
    redelivered.sort_unstable();
    assert_eq!(redelivered, c1_unacked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_every_time_goes_to_the_dead_letter_topic_with_headers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "dlq");
    let client = node.client().await;
    produce(&client, "t/n/x", vec![Outgoing::payload("ok-0"), Outgoing::payload("poison"), Outgoing::payload("ok-1")])
        .await;
    let args = ["--type", "shared", "--nack-matching", "poison", "--max-redeliveries", "2", "--nack-delay", "100"];
    let worker = ConsumerProcess::start(&node, "t/n/x", "work", &args);
    let dlq_conn = node.client().await;
    let mut dlq = dlq_conn.subscribe("t/n/x-DLQ", "audit", StartPosition::Earliest).await.expect("dlq");
    let letter = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter").expect("next").expect("message");
    assert_eq!(letter.message.payload, b"poison");
    let header = |k: &str| {
        let v = letter.message.headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
        String::from_utf8(v.unwrap_or_else(|| panic!("header {k}"))).expect("utf-8")
    };
    assert_eq!(header("rill-dlq-redeliveries"), "3");
    assert_eq!(header("rill-dlq-topic"), "t/n/x");
    assert_eq!(header("rill-dlq-subscription"), "work");
    assert_eq!(header("rill-dlq-offset"), "1");
    assert!(header("rill-dlq-reason").contains("3 times"));
    let printed: Vec<String> = worker.messages().iter().map(|m| m["payload"].as_str().unwrap_or("").into()).collect();
    assert_eq!(printed, ["ok-0", "ok-1"]);
    let stats = client.stats().await.expect("stats");
    let topic = stats.topics.iter().find(|t| t.topic == "t/n/x").expect("topic");
    let sub = topic.subscriptions.iter().find(|s| s.name == "work").expect("subscription");
    assert_eq!((sub.redelivered, sub.dead_lettered, sub.backlog_messages), (3, 1, 0), "{sub:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_message_comes_back_after_the_ack_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "timeout");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 2)).await;
    let options = ConsumerOptions { ack_timeout_ms: Some(300), ..options(SubscriptionType::Shared, "slow") };
    let mut c = client.subscribe_with("t/n/x", "s", StartPosition::Earliest, options).await.expect("subscribe");
    let first = [next_within(&mut c, WAIT).await, next_within(&mut c, WAIT).await];
    assert_eq!(first.map(|m| m.expect("delivered").0), [0, 1]);
    c.ack(1);
    c.flush_acks().await.expect("ack");
    let again = next_within(&mut c, Duration::from_secs(5)).await.expect("redelivered");
    assert_eq!(again.0, 0, "only the unacked message comes back");
    c.ack(0);
    c.flush_acks().await.expect("ack");
    assert!(next_within(&mut c, Duration::from_millis(800)).await.is_none(), "acked messages stay acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_of_a_shared_subscription_survive_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut node = TestNode::start(tmp.path(), "acks");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 20)).await;
    let mut c = client
        .subscribe_with("t/n/x", "s", StartPosition::Earliest, options(SubscriptionType::Shared, "w"))
        .await
        .expect("subscribe");
    for want in 0..20 {
        let (o, _) = next_within(&mut c, WAIT).await.expect("delivered");
        assert_eq!(o, want);
        if o % 2 == 1 {
            c.ack(o);
        }
    }
    c.close().await.expect("close");
    // A clean stop flushes the cursor; after kill -9 the last second of acks may be
    // delivered again (at-least-once).
    node.stop();
    node.restart();
    let client = node.client().await;
    let mut c = client
        .subscribe_with("t/n/x", "s", StartPosition::Earliest, options(SubscriptionType::Shared, "w"))
        .await
        .expect("subscribe after restart");
    let mut again = Vec::new();
    while let Some((o, _)) = next_within(&mut c, Duration::from_secs(2)).await {
        again.push(o);
    }
    assert_eq!(again, (0..20).step_by(2).collect::<Vec<_>>(), "exactly the unacked messages come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_another_type_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "mismatch");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 1)).await;
    let start = StartPosition::Earliest;
    let _shared = client.subscribe_with("t/n/x", "s", start, options(SubscriptionType::Shared, "a")).await.expect("a");
    let err = client.subscribe_with("t/n/x", "s", start, options(SubscriptionType::Failover, "b")).await.unwrap_err();
    assert!(err.to_string().contains("is Shared; a Failover consumer cannot join"), "{err}");
    let _second = client.subscribe_with("t/n/x", "s", start, options(SubscriptionType::Shared, "c")).await.expect("c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subs_seek_and_reset_move_a_subscription_by_offset_and_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "seek");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 5)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    tokio::time::sleep(Duration::from_millis(50)).await;
    produce(&client, "t/n/x", payloads(5, 5)).await;
    let consume = |n: &str| {
        let out = node.cli(&["consume", "t/n/x", "-s", "s", "-n", n], "");
        assert!(out.status.success(), "{}", crate::support::text(&out.stderr));
        crate::support::text(&out.stdout)
    };
    assert_eq!(consume("10").lines().count(), 10);
    let seek = |args: &[&str]| {
        let mut all = vec!["subs", "seek", "t/n/x", "s"];
        all.extend(args);
        let out = node.cli(&all, "");
        (out.status.success(), crate::support::text(&out.stdout) + &crate::support::text(&out.stderr))
    };
    let (ok, said) = seek(&["--offset", "7"]);
    assert!(ok && said.contains("now at offset 7"), "{said}");
    assert_eq!(consume("3"), "m7\nm8\nm9\n");
    let (ok, said) = seek(&["--time", &later.to_string()]);
    assert!(ok && said.contains("now at offset 5"), "{said}");
    assert_eq!(consume("5"), "m5\nm6\nm7\nm8\nm9\n");
    let out = node.cli(&["subs", "reset", "t/n/x", "s"], "");
    assert!(out.status.success());
    let list = crate::support::text(&node.cli(&["subs", "list", "t/n/x"], "").stdout);
    let row = list.lines().find(|l| l.starts_with("s ")).unwrap_or_else(|| panic!("{list}"));
    assert_eq!(row.split_whitespace().collect::<Vec<_>>()[..4], ["s", "0", "0", "10"], "{list}");
    // A consumer attached during a seek is disconnected, and continues from the new place.
    let mut attached = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe");
    assert_eq!(next_within(&mut attached, WAIT).await.map(|m| m.0), Some(0));
    assert!(seek(&["--offset", "9"]).0);
    let after = tokio::time::timeout(WAIT, async { while attached.next().await.is_ok_and(|m| m.is_some()) {} });
    assert!(after.await.is_ok(), "the consumer was disconnected");
    let mut again = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe");
    assert_eq!(next_within(&mut again, WAIT).await.map(|m| m.0), Some(9));
    let out = node.cli(&["subs", "seek", "t/n/x", "nobody", "--offset", "1"], "");
    let err = crate::support::text(&out.stderr);
    assert!(!out.status.success() && err.contains("t/n/x has no subscription 'nobody'"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cumulative_ack_acks_everything_up_to_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "cumulative");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 10)).await;
    let start = StartPosition::Earliest;
    let mut c = client.subscribe_with("t/n/x", "s", start, options(SubscriptionType::Failover, "a")).await.expect("a");
    for want in 0..10 {
        assert_eq!(next_within(&mut c, WAIT).await.map(|m| m.0), Some(want));
    }
    c.ack_cumulative(6).await.expect("cumulative ack");
    c.close().await.expect("close");
    let mut c = client.subscribe_with("t/n/x", "s", start, options(SubscriptionType::Failover, "a")).await.expect("a");
    assert_eq!(c.start_offset(), 7);
    assert_eq!(next_within(&mut c, WAIT).await.map(|m| m.0), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_is_deleted_only_without_consumers_and_starts_afresh_after() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "subs-delete");
    let client = node.client().await;
    produce(&client, "t/n/x", payloads(0, 5)).await;
    let mut c = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe");
    for _ in 0..5 {
        let (offset, _) = next_within(&mut c, WAIT).await.expect("a delivery");
        c.ack(offset);
    }
    c.flush_acks().await.expect("acks");
    let out = node.cli(&["subs", "delete", "t/n/x", "s"], "");
    assert!(!out.status.success(), "deleted with a consumer attached");
    assert!(
        crate::support::text(&out.stderr).contains("1 consumer(s) attached"),
        "{}",
        crate::support::text(&out.stderr)
    );
    c.close().await.expect("close");
    wait_consumers(&client, "t/n/x", "s", 0).await;
    let out = node.cli(&["subs", "delete", "t/n/x", "s"], "");
    assert!(out.status.success(), "{}", crate::support::text(&out.stderr));
    let out = node.cli(&["subs", "delete", "t/n/x", "s"], "");
    assert!(
        crate::support::text(&out.stderr).contains("has no subscription 's'"),
        "{}",
        crate::support::text(&out.stderr)
    );
    // The name is free again: a new subscription starts where it is told, not at the old acks.
    let mut again = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe again");
    let (first, _) = next_within(&mut again, WAIT).await.expect("a delivery");
    assert_eq!(first, 0, "a fresh subscription, not the deleted one's position");
}

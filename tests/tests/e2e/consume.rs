//! Subscriptions: at-least-once delivery, resume after the last ack, bounded in-flight.
use std::time::Duration;

use rill_node::{
    client::{Consumer, Outgoing},
    protocol::StartPosition,
};

use crate::support::TestNode;

async fn produce(node: &TestNode, topic: &str, n: usize) {
    let client = node.client().await;
    let mut p = client.producer(topic, "p".into()).await.expect("producer");
    let batch = (0..n).map(|i| Outgoing::payload(format!("m{i}"))).collect();
    p.send(batch).await.expect("send");
    p.close().await.expect("acks");
}

/// The next delivered offset, waiting up to 10 s (a loaded CI machine is slow).
async fn next(c: &mut Consumer) -> u64 {
    let m = tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("a delivery within 10 s");
    m.expect("next").expect("message").offset
}

/// True when nothing is delivered for half a second.
async fn quiet(c: &mut Consumer) -> bool {
    tokio::time::timeout(Duration::from_millis(500), c.next()).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_consumer_continues_after_its_last_ack() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "resume");
    produce(&node, "t/n/x", 10).await;
    let client = node.client().await;
    let mut c = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe");
    for want in 0..6 {
        assert_eq!(next(&mut c).await, want);
        if want < 4 {
            c.ack(want);
        }
    }
    c.close().await.expect("close");
    // Offsets 4 and 5 were delivered but not acked: at-least-once redelivers them.
    let mut c = client.subscribe("t/n/x", "s", StartPosition::Latest).await.expect("subscribe again");
    assert_eq!(c.start_offset(), 4, "an existing subscription ignores the start position");
    for want in 4..10 {
        assert_eq!(next(&mut c).await, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_does_not_ack_holds_only_the_configured_window() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("small.toml");
    std::fs::write(&config, "[limits]\nconsumer_unacked_messages_max = 10\n").expect("config");
    let node =
        TestNode::start_with(tmp.path(), "window", &["--config", config.to_str().expect("utf-8")]).expect("start");
    produce(&node, "t/n/x", 100).await;
    let client = node.client().await;
    let mut c = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("subscribe");
    for want in 0..10 {
        assert_eq!(next(&mut c).await, want);
    }
    assert!(quiet(&mut c).await, "the node must stop at 10 unacked messages");
    c.ack(0);
    c.ack(1);
    c.flush_acks().await.expect("acks");
    assert_eq!(next(&mut c).await, 10);
    assert_eq!(next(&mut c).await, 11);
    assert!(quiet(&mut c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_on_a_subscription_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = TestNode::start(tmp.path(), "busy");
    let client = node.client().await;
    let _first = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect("first");
    let err = client.subscribe("t/n/x", "s", StartPosition::Earliest).await.expect_err("second must be refused");
    assert!(err.to_string().contains("already has a consumer"), "{err}");
}

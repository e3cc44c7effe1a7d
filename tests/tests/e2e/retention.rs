//! Retention and backlog quotas: whole segments deleted only once consumed and
//! replicated; a full backlog refuses produces or drops the oldest segments, counted.
use std::time::Duration;

use rill_node::{
    client::{Client, ClientError, Outgoing},
    protocol::{StartPosition, TopicStats},
};

use crate::support::TestNode;

const WAIT: Duration = Duration::from_secs(20);
const TOPIC: &str = "t/n/x";

/// A node with 64 KiB segments, enforcement every 100 ms, and `extra` config lines.
fn node(tmp: &std::path::Path, name: &str, extra: &str) -> TestNode {
    let config = tmp.join(format!("{name}.toml"));
    let text = format!("{extra}\n[storage]\nsegment_bytes_max = 65536\nretention_check_interval_ms = 100\n");
    std::fs::write(&config, text).expect("config");
    TestNode::start_with(tmp, name, &["--config", config.to_str().expect("utf-8")]).expect("start")
}

fn ns(node: &TestNode, args: &[&str]) {
    let out = node.cli(args, "");
    assert!(out.status.success(), "{args:?}: {}", crate::support::text(&out.stderr));
}

/// Produces `n` messages of about 100 bytes in batches of 500.
async fn produce(client: &Client, producer: &str, n: usize) -> Result<(), ClientError> {
    let mut p = client.producer(TOPIC, producer.into()).await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        p.send(chunk.iter().map(|i| Outgoing::payload(format!("{i:0100}"))).collect()).await?;
        p.flush().await?;
    }
    Ok(())
}

async fn topic(client: &Client) -> TopicStats {
    let stats = client.stats().await.expect("stats");
    stats.topics.into_iter().find(|t| t.topic == TOPIC).expect("topic")
}

/// Polls the topic's stats until `done` holds (or panics after WAIT with `what`).
async fn until(client: &Client, what: &str, done: impl Fn(&TopicStats) -> bool) -> TopicStats {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = topic(client).await;
        if done(&t) {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Acks the first `n` messages of subscription `s`.
async fn consume(client: &Client, n: u64) {
    let mut c = client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe");
    for _ in 0..n {
        let m = tokio::time::timeout(WAIT, c.next()).await.expect("delivered").expect("next").expect("message");
        c.ack(m.offset);
    }
    c.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_segments_every_subscription_has_acked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = node(tmp.path(), "ret", "");
    ns(&node, &["ns", "create", "t/n"]);
    ns(&node, &["ns", "policy", "t/n", "--retention-messages", "1000"]);
    let client = node.client().await;
    client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe").close().await.expect("close");
    produce(&client, "p", 5000).await.expect("produce");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t = topic(&client).await;
    assert_eq!((t.start_offset, t.retention_deleted), (0, 0), "nothing consumed, nothing deleted: {t:?}");
    consume(&client, 3000).await;
    let t = until(&client, "consumed segments deleted", |t| t.start_offset > 0).await;
    assert!(t.start_offset <= 3000, "never past the acked position: {t:?}");
    assert_eq!(t.retention_deleted, t.start_offset);
    let mut c = client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe");
    let m = tokio::time::timeout(WAIT, c.next()).await.expect("delivered").expect("next").expect("message");
    assert_eq!(m.offset, 3000, "the subscription continues where it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_peer_still_needs_are_kept_whatever_the_retention() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A peer in the clusters that never comes up: nothing may be deleted before it has it.
    let node = node(tmp.path(), "edge", "[[peers]]\nname = \"region\"\naddr = \"127.0.0.1:9\"\n");
    ns(&node, &["ns", "create", "t/n"]);
    ns(&node, &["ns", "set-clusters", "t/n", "--clusters", "edge,region"]);
    ns(&node, &["ns", "policy", "t/n", "--retention-messages", "100"]);
    let client = node.client().await;
    produce(&client, "p", 3000).await.expect("produce");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t = topic(&client).await;
    assert_eq!((t.start_offset, t.retention_deleted), (0, 0), "unreplicated messages kept: {t:?}");
    // Once the region leaves the clusters, nobody needs them and retention applies.
    ns(&node, &["ns", "set-clusters", "t/n", "--clusters", "edge"]);
    let t = until(&client, "retention applies", |t| t.start_offset > 0).await;
    assert!(t.end_offset - t.start_offset < 3000, "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_with_reject_refuses_produces_and_touches_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = node(tmp.path(), "reject", "");
    ns(&node, &["ns", "create", "t/n"]);
    ns(&node, &["ns", "policy", "t/n", "--backlog-max", "200KiB", "--on-full", "reject"]);
    let client = node.client().await;
    client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe").close().await.expect("close");
    let mut refused = None;
    for round in 0..100 {
        if let Err(e) = produce(&client, &format!("p{round}"), 500).await {
            refused = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = refused.expect("a full backlog refuses produces");
    assert!(err.to_string().contains("backlog full") && err.is_retriable(), "{err}");
    let held = topic(&client).await;
    assert_eq!(held.start_offset, 0, "nothing stored is touched");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(topic(&client).await.end_offset, held.end_offset);
    consume(&client, held.end_offset).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while produce(&client, "after", 10).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "produces never resumed after the backlog drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_with_drop_oldest_drops_whole_segments_and_counts_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut node = node(tmp.path(), "drop", "");
    ns(&node, &["ns", "create", "t/n"]);
    ns(&node, &["ns", "policy", "t/n", "--backlog-max", "200KiB", "--on-full", "drop-oldest"]);
    let client = node.client().await;
    client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe").close().await.expect("close");
    produce(&client, "p", 6000).await.expect("drop_oldest never refuses");
    let t = until(&client, "oldest segments dropped", |t| t.start_offset > 0 && t.bytes < 300 * 1024).await;
    assert_eq!(t.quota_dropped, t.start_offset, "every dropped message was unconsumed and is counted");
    assert!(node.wait_for_log("backlog quota full: dropped the oldest segment"), "{}", node.log());
    let mut c = client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe");
    let m = tokio::time::timeout(WAIT, c.next()).await.expect("delivered").expect("next").expect("message");
    assert_eq!(m.offset, t.start_offset, "the subscription skips what was dropped");
    c.close().await.expect("close");
    node.restart();
    let client = node.client().await;
    assert_eq!(topic(&client).await.start_offset, t.start_offset, "dropped segments stay dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_deletes_consumed_segments_once_they_are_old_enough() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = node(tmp.path(), "age", "");
    ns(&node, &["ns", "create", "t/n"]);
    ns(&node, &["ns", "policy", "t/n", "--retention-age", "2s"]);
    let client = node.client().await;
    client.subscribe(TOPIC, "s", StartPosition::Earliest).await.expect("subscribe").close().await.expect("close");
    produce(&client, "p", 3000).await.expect("produce");
    consume(&client, 3000).await;
    let young = topic(&client).await;
    assert_eq!(young.start_offset, 0, "consumed but younger than 2 s: kept: {young:?}");
    let t = until(&client, "old consumed segments deleted", |t| t.start_offset > 0).await;
    assert_eq!(t.end_offset, 3000);
    assert!(t.segments >= 1 && t.retention_deleted == t.start_offset, "{t:?}");
}

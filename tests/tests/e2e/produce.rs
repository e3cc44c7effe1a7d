//! Produce under tight limits: the node's byte budget makes producers wait, never stall.
use rill_node::client::Outgoing;

use crate::support::TestNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_one_frame_still_stores_every_pipelined_batch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("tight.toml");
    let limits = "[limits]\nmessage_bytes_max = 4096\nframe_bytes_max = 69632\nproduce_inflight_bytes_max = 69632\n\
                  delivery_bytes_max = 34816\n";
    std::fs::write(&config, limits).expect("config");
    let node =
        TestNode::start_with(tmp.path(), "tight", &["--config", config.to_str().expect("utf-8")]).expect("start");
    let client = node.client().await;
    let mut p = client.producer("t/n/x", "p".into()).await.expect("producer");
    // 40 batches of ~60 KB, 8 in flight: the node can hold only one at a time.
    let mut acked = 0;
    for _ in 0..40 {
        while p.in_flight() >= 8 {
            acked += p.next_ack().await.expect("ack").results.len();
        }
        p.send((0..15).map(|_| Outgoing::payload(vec![7u8; 4000])).collect()).await.expect("send");
    }
    for ack in p.flush().await.expect("acks") {
        acked += ack.results.len();
    }
    assert_eq!(acked, 600);
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.topics.iter().find(|t| t.topic == "t/n/x").map(|t| t.end_offset), Some(600));
}

//! kill -9 while several producers write: every acknowledged message survives exactly once,
//! in per-producer order.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use rill_node::client::{Client, ClientError, ClientOptions, Outgoing, Producer};
use tokio::time::Instant;

use crate::support::{TestNode, read_seqs};

const PRODUCERS: usize = 4;
const BATCHES: u64 = 80;
const BATCH: u64 = 50;
const WINDOW: usize = 4;
/// Longest a producer keeps trying to reach a restarting node.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

type Acked = Arc<Mutex<BTreeMap<String, BTreeSet<u64>>>>;

async fn reconnect(options: &ClientOptions, producer: &mut Producer) -> Result<Client, ClientError> {
    let deadline = Instant::now() + RECONNECT_DEADLINE;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let attempt = async {
            let client = Client::connect(options).await?;
            producer.resume(&client).await?;
            Ok::<Client, ClientError>(client)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retriable() && Instant::now() < deadline => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends `BATCHES` batches, resending unacknowledged ones after every failure, and records
/// every acknowledged seq.
async fn producer_task(options: ClientOptions, name: String, acked: Acked) {
    let mut client = Client::connect(&options).await.expect("connect");
    let mut p = client.producer("crash/test/t", name.clone()).await.expect("producer");
    let mut sent = 0;
    while sent < BATCHES || p.in_flight() > 0 {
        let step = if sent < BATCHES && p.in_flight() < WINDOW {
            let batch = (0..BATCH).map(|i| Outgoing::payload(format!("{name}-{}", sent * BATCH + i))).collect();
            p.send(batch).await.map(|_| {
                sent += 1;
            })
        } else {
            p.next_ack().await.map(|ack| {
                let seqs = ack.first_seq..ack.first_seq + ack.results.len() as u64;
                acked.lock().expect("lock").entry(name.clone()).or_default().extend(seqs);
            })
        };
        if let Err(e) = step {
            assert!(e.is_retriable(), "{name}: unexpected error {e}");
            client = reconnect(&options, &mut p).await.unwrap_or_else(|e| panic!("{name}: could not reconnect: {e}"));
        }
    }
    drop(client);
}

async fn wait_for_acks(acked: &Acked, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().expect("lock").values().map(BTreeSet::len).sum::<usize>() < at_least {
        assert!(Instant::now() < deadline, "producers made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_concurrent_produce_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut node = TestNode::start(tmp.path(), "crash");
    let acked: Acked = Arc::default();
    let tasks: Vec<_> = (0..PRODUCERS)
        .map(|i| tokio::spawn(producer_task(node.options(), format!("producer-{i}"), Arc::clone(&acked))))
        .collect();
    let total = (PRODUCERS as u64 * BATCHES * BATCH) as usize;
    for fraction in [4, 2] {
        wait_for_acks(&acked, total / fraction).await;
        node.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.restart();
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(180), t).await.expect("producers finish").expect("producer task");
    }

    // Read everything back.
    let client = node.client().await;
    let end = client
        .stats()
        .await
        .expect("stats")
        .topics
        .iter()
        .find(|t| t.topic == "crash/test/t")
        .expect("topic")
        .end_offset;
    let held = read_seqs(&node, "crash/test/t", end, |m| {
        let payload = String::from_utf8(m.message.payload.clone()).expect("utf-8");
        assert_eq!(payload, format!("{}-{}", m.message.id.producer, m.message.id.seq), "payload matches its id");
    })
    .await;
    let acked = acked.lock().expect("lock");
    for (producer, seqs) in &held {
        if let Some(at) = seqs.windows(2).position(|w| w[0] >= w[1]) {
            panic!(
                "{producer}: seq {} follows seq {} at read position {at}: duplicated or out of order",
                seqs[at + 1],
                seqs[at]
            );
        }
    }
    for (producer, want) in acked.iter() {
        let have: BTreeSet<u64> = held.get(producer).map(|v| v.iter().copied().collect()).unwrap_or_default();
        let lost: Vec<_> = want.difference(&have).take(10).collect();
        assert!(lost.is_empty(), "{producer}: acknowledged but lost: {lost:?}\n{}", node.log());
        assert_eq!(want.len() as u64, BATCHES * BATCH, "{producer}: every batch was eventually acknowledged");
    }
    assert_eq!(end, total as u64, "exactly the produced messages are stored");
}

//! `rill bench subscriptions`: a Shared subscription with several consumers draining a
//! backlog, acking every message individually.
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rill_storage::{meta::MetaStore, metalog::LogMeta};
use tokio::time::Instant;

use super::{ChildNode, payloads, tempfile_in};
use crate::{
    client::{Client, ClientOptions},
    protocol::{ConsumerOptions, StartPosition, SubscriptionType},
};

const TOPIC: &str = "bench/subs/backlog";

/// Flags of `rill bench subscriptions`.
#[derive(Debug, Args)]
pub(crate) struct SubscriptionArgs {
    /// Messages in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Consumers on the Shared subscription, each on its own connection.
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// Directory for the node's scratch data dir.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

/// A consumer that sees nothing this long is done (the others took the rest).
const QUIET_END: Duration = Duration::from_secs(2);
/// How often the ack state is sampled during the drain.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

async fn produce_backlog(client: &Client, a: &SubscriptionArgs) -> anyhow::Result<()> {
    eprintln!("bench subscriptions: producing a backlog of {} x {} B", a.messages, a.size);
    let mut p = client.producer(TOPIC, "bench-backlog".into()).await?;
    let mut sent = 0;
    while sent < a.messages {
        while p.in_flight() >= 16 {
            p.next_ack().await?;
        }
        let n = 1000.min(a.messages - sent);
        p.send(payloads(n as usize, a.size)).await?;
        sent += n;
    }
    p.close().await?;
    Ok(())
}

/// One Shared consumer acking every message: how many it got, and when it saw the last.
async fn drain(options: ClientOptions, i: usize) -> anyhow::Result<(u64, Instant)> {
    let client = Client::connect(&options).await?;
    let opts =
        ConsumerOptions { kind: SubscriptionType::Shared, name: format!("worker-{i}"), ..ConsumerOptions::default() };
    let mut c = client.subscribe_with(TOPIC, "work", StartPosition::Earliest, opts).await?;
    let mut got = 0u64;
    while let Ok(m) = tokio::time::timeout(QUIET_END, c.next()).await {
        let Some(m) = m? else { break };
        c.ack(m.offset);
        got += 1;
    }
    c.close().await?;
    client.close().await;
    Ok((got, Instant::now() - QUIET_END))
}

/// The largest ack state of the subscription while consumers ack out of order, sampled
/// from the node's stats until the backlog is gone.
async fn sample_ack_state(options: ClientOptions) -> anyhow::Result<u64> {
    let client = Client::connect(&options).await?;
    let mut peak = 0;
    loop {
        let stats = client.stats().await?;
        let sub = stats.topics.iter().flat_map(|t| &t.subscriptions).find(|s| s.name == "work");
        let Some(sub) = sub else { continue };
        peak = peak.max(sub.ack_state_bytes);
        if sub.backlog_messages == 0 {
            client.close().await;
            return Ok(peak);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

pub(crate) async fn run(a: SubscriptionArgs) -> anyhow::Result<()> {
    let mut node = ChildNode::start_with(tempfile_in(&a.dir)?, &["--name", "bench-node", "--listen", "127.0.0.1:0"])?;
    let client = Client::connect(&node.options()).await?;
    produce_backlog(&client, &a).await?;
    eprintln!("bench subscriptions: draining with {} Shared consumers, one ack per message", a.consumers);
    let started = Instant::now();
    let tasks: Vec<_> = (0..a.consumers).map(|i| tokio::spawn(drain(node.options(), i))).collect();
    let sampler = tokio::spawn(sample_ack_state(node.options()));
    let mut total = 0;
    let mut shares = Vec::new();
    let mut last = started;
    for t in tasks {
        let (got, done) = t.await??;
        total += got;
        shares.push(got);
        last = last.max(done);
    }
    let secs = (last - started).as_secs_f64();
    println!(
        "shared drain: {total} msgs by {} consumers ({shares:?}) in {secs:.2}s = {:.0} msgs/s, per-message acks (target >= 200000)",
        a.consumers,
        total as f64 / secs
    );
    anyhow::ensure!(total >= a.messages, "only {total} of {} messages delivered", a.messages);
    let stats = client.stats().await?;
    client.close().await;
    let sub = stats.topics.iter().flat_map(|t| &t.subscriptions).find(|s| s.name == "work").context("subscription")?;
    println!("backlog after the drain: {} messages, ack floor {}", sub.backlog_messages, sub.ack_floor);
    let peak = sampler.await??;
    println!("ack state during the drain: up to {peak} bytes (sampled every 50 ms)");
    let data = node.stop()?;
    let meta = LogMeta::open(&data.join("meta.log"))?;
    let key = rill_storage::keys::cursor(&rill_storage::TopicName::parse(TOPIC)?, "work");
    let record = meta.get(&key)?.map_or(0, |v| v.len());
    println!("ack state in the metadata log: {record} bytes for the subscription's record");
    Ok(())
}

//! `rill bench produce`.
use std::time::Duration;

use clap::Args;
use tokio::time::Instant;

use crate::client::Client;

use super::{ChildNode, payloads};

/// Flags of `rill bench produce`.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    #[command(flatten)]
    pipeline: Pipeline,
    /// Rate of the latency run, messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Duration of the latency run, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Directory for the node's scratch data dir (the disk being measured).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
}

/// A pipelined throughput run.
#[derive(Debug, Args)]
pub(crate) struct Pipeline {
    /// Messages in the throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    pub(crate) size: usize,
    /// Messages per batch in the throughput run (one produce request each).
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
    /// Batches in flight in the throughput run.
    #[arg(long, default_value_t = 16)]
    pub(crate) window: usize,
}

impl Pipeline {
    /// Sends everything through `p`; returns the messages acknowledged and the seconds taken.
    pub(crate) async fn run(&self, p: &mut crate::client::Producer) -> anyhow::Result<(u64, f64)> {
        let started = Instant::now();
        let (mut sent, mut acked) = (0u64, 0u64);
        while sent < self.messages {
            while p.in_flight() >= self.window {
                acked += p.next_ack().await?.results.len() as u64;
            }
            let n = (self.batch as u64).min(self.messages - sent) as usize;
            p.send(payloads(n, self.size)).await?;
            sent += n as u64;
        }
        for ack in p.flush().await? {
            acked += ack.results.len() as u64;
        }
        Ok((acked, started.elapsed().as_secs_f64()))
    }
}

pub(crate) async fn run(a: ProduceArgs) -> anyhow::Result<()> {
    let node = ChildNode::start(&a.dir)?;
    let client = Client::connect(&node.options()).await?;
    let mut p = client.producer("bench/produce/throughput", "bench-throughput".into()).await?;
    let shape = &a.pipeline;
    eprintln!(
        "bench produce: {} x {} B in batches of {}, {} in flight",
        shape.messages, shape.size, shape.batch, shape.window
    );
    let (acked, secs) = shape.run(&mut p).await?;
    let rate = acked as f64 / secs;
    println!(
        "produce throughput: {acked} msgs in {secs:.2}s = {rate:.0} msgs/s ({:.1} MB/s payload), durable acks (target >= 250000)",
        rate * shape.size as f64 / 1e6
    );

    // Latency at a fixed rate: batches every millisecond, each ack timed from its send.
    let per_ms = (a.rate / 1000).max(1) as usize;
    let mut p = client.producer("bench/produce/latency", "bench-latency".into()).await?;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let start = Instant::now();
    let total_batches = a.seconds * 1000;
    for i in 0..total_batches {
        tokio::time::sleep_until(start + Duration::from_millis(i)).await;
        while p.in_flight() > 0 {
            // Drain acks that are already here without waiting for the others.
            match tokio::time::timeout(Duration::ZERO, p.next_ack()).await {
                Ok(ack) => hist.record(ack?.sent_at.elapsed().as_micros() as u64)?,
                Err(_) => break,
            }
        }
        p.send(payloads(per_ms, shape.size)).await?;
    }
    for ack in p.flush().await? {
        hist.record(ack.sent_at.elapsed().as_micros() as u64)?;
    }
    println!(
        "produce latency at {} msgs/s ({} per batch, 1 batch/ms): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        per_ms * 1000,
        per_ms,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    client.close().await;
    Ok(())
}

//! A consumer that fails over between regions.
//!
//! Gateways `gw-1` and `gw-2` write sensor readings through regions `eu` and `us`, which
//! replicate to each other. An alerting service reads every reading from `eu`. Five
//! minutes in, its own network to `eu` breaks for ten minutes: it moves to `us`. While it
//! is there, `us` crashes for a minute (with `eu` still out of reach, the service retries
//! until `us` is back), and later crashes again: the service moves back to `eu`.
//!
//! A subscription's position is local to its node, so on the new node the service seeks
//! its subscription by publish time to just before the oldest of its per-producer
//! positions, and skips what it already processed by dedup id (`seq` at or below the last
//! one it processed from that producer: every node keeps each producer's order). It
//! processes every reading exactly once, in order per producer.
//!
//! `cargo run -p rill-sim --release --example failover_consumer [-- SEED]`
use std::{collections::BTreeMap, time::Duration};

use rill_sim::{ClientError, ConsumerOptions, Ctx, Mesh, Outgoing, SeekTarget, StartPosition};

const TOPIC: &str = "acme/sensors/temp";
const READINGS: u64 = 1800;
const EVERY: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// The service's own state: per producer, the last seq and publish time processed.
#[derive(Default)]
struct Progress {
    last: BTreeMap<String, (u64, u64)>,
    processed: u64,
}

/// Reads on `region` until every reading is processed or the region fails the service.
async fn consume_on(ctx: &Ctx, region: &str, progress: &mut Progress) -> Result<(), ClientError> {
    let client = ctx.connect(region).await?;
    // Back to just before the oldest position (a new subscription starts at the earliest).
    if let Some(oldest) = progress.last.values().map(|(_, t)| *t).min() {
        match client.seek(TOPIC, "alerts", SeekTarget::PublishTime(oldest.saturating_sub(60_000))).await {
            Ok(_) | Err(ClientError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    ctx.note(format!("consuming on {region}"));
    let options = ConsumerOptions::default();
    let mut consumer = ctx.subscribe(region, TOPIC, "alerts", StartPosition::Earliest, options).await?;
    while progress.processed < 2 * READINGS {
        let Some(m) = consumer.next().await? else { return Err(ClientError::Closed) };
        let producer = m.message.id.producer.to_string();
        let seen = progress.last.get(&producer).is_some_and(|(seq, _)| m.message.id.seq <= *seq);
        if !seen {
            // Process: here, an alert check on the reading.
            progress.last.insert(producer, (m.message.id.seq, m.message.publish_time_ms));
            progress.processed += 1;
            ctx.note(format!("processed {}", m.message.id));
        }
        consumer.ack(m.offset);
    }
    consumer.close().await
}

/// What the run showed.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Readings processed.
    pub(crate) processed: usize,
    /// Deliveries skipped as already processed (after a move).
    pub(crate) skipped: usize,
    /// The regions the service read from, in order.
    pub(crate) moves: Vec<String>,
}

/// Runs the scenario and checks it; an error says what did not hold.
pub(crate) fn run(seed: u64) -> anyhow::Result<Outcome> {
    let mut mesh = Mesh::builder(seed)
        .edge("gw-1")
        .edge("gw-2")
        .region("eu")
        .region("us")
        .link("gw-1", "eu")
        .link("gw-2", "us")
        .link("eu", "us")
        .namespace("acme/sensors", ["gw-1", "gw-2", "eu", "us"])
        .tick(Duration::from_millis(20))
        .build()?;
    for (gateway, sensor) in [("gw-1", "sensor-1"), ("gw-2", "sensor-2")] {
        mesh.client(sensor, move |ctx| async move {
            let mut producer = ctx.producer(gateway, TOPIC, sensor).await?;
            for i in 0..READINGS {
                producer.send(vec![Outgoing::payload(format!("{i}"))]).await?;
                producer.flush().await?;
                ctx.sleep(EVERY).await;
            }
            Ok(())
        });
    }
    mesh.client("alerts", |ctx| async move {
        let (regions, mut at, mut progress) = (["eu", "us"], 0, Progress::default());
        while progress.processed < 2 * READINGS {
            if let Err(e) = consume_on(&ctx, regions[at], &mut progress).await {
                ctx.note(format!("{} failed: {e}", regions[at]));
                at = 1 - at;
                ctx.sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(())
    });

    let start = mesh.now();
    mesh.at(start + 5 * MINUTE).partition("alerts", "eu");
    mesh.at(start + 15 * MINUTE).repair("alerts", "eu");
    mesh.at(start + 8 * MINUTE).crash("us");
    mesh.at(start + 9 * MINUTE).restart("us");
    mesh.at(start + 20 * MINUTE).crash("us");
    mesh.at(start + 25 * MINUTE).restart("us");
    mesh.run_clients(EVERY * 3 * READINGS as u32)?;

    let history = mesh.history();
    let notes = history.notes("alerts");
    let moves: Vec<String> = notes.iter().filter_map(|n| n.strip_prefix("consuming on ").map(String::from)).collect();
    let processed: Vec<&str> = notes.iter().filter_map(|n| n.strip_prefix("processed ")).collect();
    // Every acknowledged reading processed once, each producer's in order.
    let acked = history.acked(TOPIC);
    anyhow::ensure!(acked.len() as u64 == 2 * READINGS, "{} readings acknowledged", acked.len());
    let want: Vec<String> = acked.iter().map(|id| id.to_string()).collect();
    let mut got: Vec<String> = processed.iter().map(|s| s.to_string()).collect();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    anyhow::ensure!(
        got == want_sorted,
        "processed {} readings, {} acknowledged (or some twice)",
        got.len(),
        want.len()
    );
    for sensor in ["sensor-1", "sensor-2"] {
        let seqs: Vec<u64> = processed
            .iter()
            .filter_map(|p| p.strip_prefix(sensor).and_then(|s| s.strip_prefix(':')))
            .map(|s| s.parse().expect("a seq"))
            .collect();
        anyhow::ensure!(seqs.windows(2).all(|w| w[0] < w[1]), "{sensor}'s readings processed out of order");
    }
    anyhow::ensure!(moves.len() >= 3, "the service read from {moves:?}: it should have moved twice");
    let skipped = history.deliveries("alerts").len() - processed.len();
    Ok(Outcome { processed: processed.len(), skipped, moves })
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let seed = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let wall = std::time::Instant::now();
    let outcome = run(seed)?;
    println!(
        "seed {seed}: {} readings processed once, {} deliveries skipped after moves; read from {:?}; {:.1} s wall",
        outcome.processed,
        outcome.skipped,
        outcome.moves,
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}

//! An edge sensor feed through a six-hour uplink outage.
//!
//! Gateway `gw-17` links to region `eu`, which links to `us`. A sensor writes a reading
//! every ten seconds through the gateway for eight hours; one hour in, the gateway loses
//! its uplink for six hours. The gateway keeps taking (and acknowledging) readings
//! locally; once the uplink is back, its backlog reaches both regions, and a dashboard
//! reading from `us` sees every reading exactly once, in order.
//!
//! `cargo run -p rill-sim --release --example outage [-- SEED]`
use std::time::Duration;

use rill_sim::{ConsumerOptions, Event, Mesh, Outgoing, StartPosition};

const TOPIC: &str = "acme/sensors/temp";
const READINGS: u64 = 8 * 360;
const EVERY: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);

/// What the run showed.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Readings acknowledged by the gateway.
    pub(crate) acked: usize,
    /// Readings each region holds (`eu`, `us`).
    pub(crate) held: (usize, usize),
    /// The gateway's backlog towards `eu` just before the uplink came back.
    pub(crate) backlog_at_restore: u64,
    /// How long after the uplink came back both regions held the whole backlog.
    pub(crate) converged_after: Duration,
}

/// Runs the scenario and checks it; an error says what did not hold.
pub(crate) fn run(seed: u64) -> anyhow::Result<Outcome> {
    let mut mesh = Mesh::builder(seed)
        .edge("gw-17")
        .region("eu")
        .region("us")
        .link("gw-17", "eu")
        .link("eu", "us")
        .namespace("acme/sensors", ["gw-17", "eu", "us"])
        // Hours of simulated time: a 100 ms step is plenty for a reading every 10 s.
        .tick(Duration::from_millis(100))
        .build()?;

    mesh.client("sensor", |ctx| async move {
        let mut producer = ctx.producer("gw-17", TOPIC, "sensor-17").await?;
        for i in 0..READINGS {
            producer.send(vec![Outgoing::payload(format!("reading {i}"))]).await?;
            producer.flush().await?;
            ctx.sleep(EVERY).await;
        }
        Ok(())
    });
    mesh.client("dashboard", |ctx| async move {
        let mut consumer =
            ctx.subscribe("us", TOPIC, "dashboard", StartPosition::Earliest, ConsumerOptions::default()).await?;
        for _ in 0..READINGS {
            let m = consumer.next().await?.ok_or("us closed the subscription")?;
            consumer.ack(m.offset);
        }
        consumer.close().await?;
        Ok(())
    });

    let start = mesh.now();
    mesh.at(start + HOUR).isolate("gw-17");
    mesh.at(start + 7 * HOUR).rejoin("gw-17");
    mesh.run_until(start + 7 * HOUR - Duration::from_secs(1))?;
    let backlog_at_restore = mesh.lag("gw-17", "eu")?.messages;
    // The backlog drains while the sensor goes on writing.
    mesh.run_until(start + 7 * HOUR)?;
    let converged_after = mesh.wait_converged("acme/sensors", Duration::from_secs(300))?;
    mesh.run_clients(2 * HOUR)?;
    mesh.wait_converged("acme/sensors", Duration::from_secs(120))?;

    // Every acknowledged reading is in both regions, once; nothing else is.
    let acked = mesh.history().acked(TOPIC);
    anyhow::ensure!(acked.len() as u64 == READINGS, "{} of {READINGS} readings acknowledged", acked.len());
    let mut held = Vec::new();
    for region in ["eu", "us"] {
        let ids: Vec<_> = mesh.holdings(region, TOPIC)?.into_iter().map(|m| m.message.id).collect();
        let unique: std::collections::BTreeSet<_> = ids.iter().cloned().collect();
        anyhow::ensure!(unique.len() == ids.len(), "{region} holds {} duplicates", ids.len() - unique.len());
        anyhow::ensure!(unique == acked, "{region} holds {} readings, {} acknowledged", unique.len(), acked.len());
        held.push(ids.len());
    }
    // The dashboard saw each reading once, in the sensor's order.
    let seen: Vec<u64> = mesh.history().deliveries("dashboard").iter().map(|d| d.id.seq).collect();
    anyhow::ensure!(seen == (0..READINGS).collect::<Vec<_>>(), "the dashboard saw readings out of order or twice");
    // Just before the restore, the gateway still had every reading it took during the
    // outage to send.
    let (cut, back) = (start + HOUR, start + 7 * HOUR - Duration::from_secs(1));
    let during = mesh
        .history()
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Acked { .. }) && e.at() > cut && e.at() < back)
        .count();
    anyhow::ensure!(
        backlog_at_restore >= during as u64,
        "backlog of {backlog_at_restore} at the restore, {during} readings taken during the outage"
    );
    Ok(Outcome { acked: acked.len(), held: (held[0], held[1]), backlog_at_restore, converged_after })
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let seed = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(17);
    let wall = std::time::Instant::now();
    let outcome = run(seed)?;
    println!(
        "seed {seed}: {} readings acknowledged; eu holds {}, us {}; backlog at the restore {}, \
         in both regions {:.1} s later; {:.1} s wall",
        outcome.acked,
        outcome.held.0,
        outcome.held.1,
        outcome.backlog_at_restore,
        outcome.converged_after.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}

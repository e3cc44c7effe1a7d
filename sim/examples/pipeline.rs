//! A feature pipeline through a region crash.
//!
//! A sensor on gateway `gw-1` writes raw readings; the gateway links to regions `eu` and
//! `us`, which link to each other. A featurizer reads the raw topic in a region, computes
//! a feature from each reading and writes it to the features topic in the same region.
//! Half an hour in, `eu` (where the featurizer runs) crashes for twenty minutes; the
//! featurizer moves to `us` and carries on there.
//!
//! Exactly once across the move comes from the dedup ids: the featurizer chooses its seqs
//! and writes the feature of raw reading `n` as its own message `n` (epoch 0). On `us` it
//! asks where its sequence stands (what `eu` replicated before the crash), skips the
//! readings it already covered, and any feature it writes again is the same message id,
//! which the nodes store once, even after `eu` comes back with its own copies.
//!
//! `cargo run -p rill-sim --release --example pipeline [-- SEED]`
use std::{collections::BTreeSet, time::Duration};

use rill_sim::{ConsumerOptions, Ctx, Event, Mesh, Outgoing, StartPosition};

const RAW: &str = "acme/ml/raw";
const FEATURES: &str = "acme/ml/features";
const READINGS: u64 = 3600;
const EVERY: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// The feature of a raw reading: a pure function of it, so that computing it twice gives
/// the same message.
fn feature(raw: &[u8]) -> Vec<u8> {
    let celsius: f64 = std::str::from_utf8(raw).ok().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    format!("{:.2}", celsius * 1.8 + 32.0).into_bytes()
}

/// The featurizer on one region until it is done or the region fails it: returns how many
/// features it has written in all.
async fn featurize_on(ctx: &Ctx, region: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let mut out = ctx.producer_with_seqs(region, FEATURES, "featurizer").await?;
    // Where this region's copy of the features ends: readings below it are covered.
    let covered = out.producer().next_seq();
    ctx.note(format!("featurizing on {region} from reading {covered}"));
    let options = ConsumerOptions::default();
    let mut raw = ctx.subscribe(region, RAW, "featurizer", StartPosition::Earliest, options).await?;
    let mut done = covered;
    while done < READINGS {
        let m = raw.next().await?.ok_or("the subscription closed")?;
        if m.message.id.seq >= done {
            out.send(vec![Outgoing::payload(feature(&m.message.payload)).with_seq(m.message.id.seq)]).await?;
            out.flush().await?;
            done += 1;
        }
        raw.ack(m.offset);
    }
    Ok(done)
}

/// What the run showed.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Features each region holds (`eu`, `us`).
    pub(crate) held: (usize, usize),
    /// Features `us` acknowledged while `eu` was down.
    pub(crate) written_during_crash: usize,
    /// The regions the featurizer ran on, in order.
    pub(crate) moves: Vec<String>,
}

/// Runs the scenario and checks it; an error says what did not hold.
pub(crate) fn run(seed: u64) -> anyhow::Result<Outcome> {
    let mut mesh = Mesh::builder(seed)
        .edge("gw-1")
        .region("eu")
        .region("us")
        .link("gw-1", "eu")
        .link("gw-1", "us")
        .link("eu", "us")
        .namespace("acme/ml", ["gw-1", "eu", "us"])
        .tick(Duration::from_millis(20))
        .build()?;

    mesh.client("sensor", |ctx| async move {
        let mut producer = ctx.producer("gw-1", RAW, "sensor-1").await?;
        for i in 0..READINGS {
            let celsius = 20.0 + (i % 100) as f64 / 10.0;
            producer.send(vec![Outgoing::payload(format!("{celsius:.1}"))]).await?;
            producer.flush().await?;
            ctx.sleep(EVERY).await;
        }
        Ok(())
    });
    mesh.client("featurizer", |ctx| async move {
        let regions = ["eu", "us"];
        let mut at = 0;
        loop {
            match featurize_on(&ctx, regions[at]).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    ctx.note(format!("{} failed: {e}", regions[at]));
                    at = 1 - at;
                    ctx.sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });

    let start = mesh.now();
    let (crash, back) = (start + 30 * MINUTE, start + 50 * MINUTE);
    mesh.at(crash).crash("eu");
    mesh.at(back).restart("eu");
    mesh.run_clients(EVERY * 3 * READINGS as u32)?;
    mesh.wait_converged("acme/ml", Duration::from_secs(300))?;

    // Both regions hold each reading's feature once, and it is the right one.
    let raw = mesh.holdings("us", RAW)?;
    let mut held = Vec::new();
    for region in ["eu", "us"] {
        let features = mesh.holdings(region, FEATURES)?;
        let seqs: Vec<u64> = features.iter().map(|m| m.message.id.seq).collect();
        anyhow::ensure!(seqs == (0..READINGS).collect::<Vec<_>>(), "{region}: features missing, twice or out of order");
        for f in &features {
            let r = raw.iter().find(|r| r.message.id.seq == f.message.id.seq).expect("every reading is in us");
            anyhow::ensure!(
                f.message.payload == feature(&r.message.payload),
                "{region}: wrong feature {}",
                f.message.id
            );
        }
        held.push(features.len());
    }
    // The pipeline kept going while eu was down.
    let history = mesh.history();
    let written_during_crash = history
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Acked { node, topic, .. } if node == "us" && topic == FEATURES))
        .filter(|e| e.at() > crash && e.at() < back)
        .count();
    anyhow::ensure!(written_during_crash > 0, "no features were written while eu was down");
    let moves: Vec<String> = history
        .notes("featurizer")
        .iter()
        .filter_map(|n| n.strip_prefix("featurizing on ").and_then(|rest| rest.split(' ').next()).map(String::from))
        .collect();
    anyhow::ensure!(moves.len() >= 2 && moves[0] == "eu" && moves[1] == "us", "the featurizer ran on {moves:?}");
    let acked: BTreeSet<_> = history.acked(FEATURES);
    anyhow::ensure!(acked.len() as u64 == READINGS, "{} features acknowledged", acked.len());
    Ok(Outcome { held: (held[0], held[1]), written_during_crash, moves })
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let seed = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let wall = std::time::Instant::now();
    let outcome = run(seed)?;
    println!(
        "seed {seed}: eu holds {} features, us {}; {} written on us while eu was down; ran on {:?}; {:.1} s wall",
        outcome.held.0,
        outcome.held.1,
        outcome.written_during_crash,
        outcome.moves,
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}

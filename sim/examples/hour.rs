//! The cost of simulation: one simulated hour of a three-node mesh (an edge and two
//! regions in a line) with a sensor writing 100 messages a second through the edge.
//! Prints the wall time it took.
//!
//! `cargo run -p rill-sim --release --example hour [-- SEED TICK_MS BATCH]`
//!
//! BATCH messages go in each produce request, BATCH / 100 seconds apart (default 10
//! every 100 ms); TICK_MS is the simulation step (default 10).
use std::time::{Duration, Instant};

use rill_sim::{Mesh, Outgoing};

const HOUR: Duration = Duration::from_secs(3600);
const TOPIC: &str = "acme/sensors/temp";

fn arg(n: usize, default: u64) -> anyhow::Result<u64> {
    Ok(std::env::args().nth(n).map(|s| s.parse()).transpose()?.unwrap_or(default))
}

fn main() -> anyhow::Result<()> {
    let (seed, tick_ms, batch) = (arg(1, 1)?, arg(2, 10)?, arg(3, 10)?.max(1));
    let wall = Instant::now();
    let mut mesh = Mesh::builder(seed)
        .edge("gw-1")
        .region("eu")
        .region("us")
        .link("gw-1", "eu")
        .link("eu", "us")
        .namespace("acme/sensors", ["gw-1", "eu", "us"])
        .tick(Duration::from_millis(tick_ms))
        .build()?;
    mesh.client("sensor", move |ctx| async move {
        let mut producer = ctx.producer("gw-1", TOPIC, "sensor-1").await?;
        let start = ctx.now();
        let mut next = start;
        while next < start + HOUR {
            producer.send((0..batch).map(|i| Outgoing::payload(format!("reading {i}"))).collect()).await?;
            producer.flush().await?;
            next += Duration::from_millis(batch * 10);
            ctx.sleep(next.saturating_sub(ctx.now())).await;
        }
        Ok(())
    });
    let simulated = mesh.now();
    mesh.run_clients(HOUR + Duration::from_secs(600))?;
    mesh.wait_converged("acme/sensors", Duration::from_secs(60))?;
    let elapsed = wall.elapsed();
    let simulated = mesh.now() - simulated;
    let acked = mesh.history().acked(TOPIC).len();
    let us = mesh.holdings("us", TOPIC)?.len();
    anyhow::ensure!(acked == us, "{acked} messages acknowledged, {us} at us");
    println!(
        "seed {seed}, step {tick_ms} ms, {batch} per request: {acked} messages at every node; \
         {:.1} s wall for {:.2} simulated hours ({:.1} s per simulated hour)",
        elapsed.as_secs_f64(),
        simulated.as_secs_f64() / 3600.0,
        elapsed.as_secs_f64() * 3600.0 / simulated.as_secs_f64()
    );
    Ok(())
}

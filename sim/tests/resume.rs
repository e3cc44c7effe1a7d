//! A restored uplink carries data again within a second, whatever the outage's length:
//! the node's redial schedule, checked in simulated time through the public API.
use std::time::Duration;

use rill_sim::{ConsumerOptions, Mesh, Outgoing, StartPosition};

const TOPIC: &str = "acme/sensors/temp";

/// Seconds from the repair to the first message the region delivers from after it.
fn resume_after(outage: Duration, seed: u64) -> Duration {
    let mut mesh = Mesh::builder(seed)
        .edge("gw")
        .region("eu")
        .link("gw", "eu")
        .namespace("acme/sensors", ["gw", "eu"])
        .build()
        .expect("a valid mesh");
    let span = outage + Duration::from_secs(10);
    mesh.client("sensor", move |ctx| async move {
        let mut p = ctx.producer("gw", TOPIC, "sensor").await?;
        let end = ctx.now() + span;
        while ctx.now() < end {
            p.send(vec![Outgoing::payload("x")]).await?;
            p.flush().await?;
            ctx.sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    });
    mesh.client("reader", move |ctx| async move {
        let options = ConsumerOptions::default();
        let mut c = ctx.subscribe("eu", TOPIC, "reader", StartPosition::Earliest, options).await?;
        // Quiet through the outage; done once the sensor has long stopped.
        while let Ok(Ok(Some(m))) = tokio::time::timeout(span, c.next()).await {
            c.ack(m.offset);
        }
        Ok(())
    });
    let cut = mesh.now() + Duration::from_secs(2);
    let repaired = cut + outage;
    mesh.at(cut).partition("gw", "eu");
    mesh.at(repaired).repair("gw", "eu");
    mesh.run_clients(3 * span).expect("the clients finish");
    let first = mesh.history().deliveries("reader").into_iter().map(|d| d.at).find(|at| *at > repaired);
    let all = mesh.history().deliveries("reader");
    let Some(first) = first else {
        panic!(
            "no delivery after the repair at {repaired:?}: {} in all, the last at {:?}; eu holds {}",
            all.len(),
            all.last().map(|d| d.at),
            mesh.holdings("eu", TOPIC).map(|h| h.len()).unwrap_or_default()
        )
    };
    first - repaired
}

#[test]
fn a_restored_uplink_carries_data_again_within_a_second() {
    for (outage, seed) in [(5, 1), (15, 2), (30, 3), (60, 4)] {
        let took = resume_after(Duration::from_secs(outage), seed);
        assert!(took <= Duration::from_secs(1), "after a {outage} s outage, data moved again after {took:?}");
    }
}

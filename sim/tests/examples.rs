//! The examples in `sim/examples/` are what users copy: each checks its own scenario and
//! runs here, so that they keep working.
#[path = "../examples/outage.rs"]
mod outage;

#[path = "../examples/pipeline.rs"]
mod pipeline;

#[path = "../examples/failover_consumer.rs"]
mod failover_consumer;

use std::time::Duration;

#[test]
fn a_sensor_feed_survives_a_six_hour_uplink_outage() {
    let outcome = outage::run(17).unwrap();
    assert_eq!((outcome.acked, outcome.held), (2880, (2880, 2880)));
    assert!(outcome.backlog_at_restore > 2000, "{outcome:?}");
    assert!(outcome.converged_after < Duration::from_secs(60), "{outcome:?}");
}

#[test]
fn a_feature_pipeline_keeps_going_through_a_region_crash() {
    let outcome = pipeline::run(1).unwrap();
    assert_eq!(outcome.held, (3600, 3600));
    assert!(outcome.written_during_crash > 1000, "{outcome:?}");
    assert_eq!(outcome.moves[..2], ["eu", "us"]);
}

#[test]
fn a_failover_consumer_processes_every_reading_once_across_moves() {
    let outcome = failover_consumer::run(1).unwrap();
    assert_eq!(outcome.processed, 3600);
    assert!(outcome.skipped > 0, "a move re-reads from before its last position: {outcome:?}");
    assert_eq!(outcome.moves.first().map(String::as_str), Some("eu"));
    assert!(outcome.moves.len() >= 3, "{outcome:?}");
}

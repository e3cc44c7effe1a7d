//! Simulated time: where the wall clock starts, and the run's elapsed time as every host
//! sees it.
use std::time::Duration;

/// The simulated wall clock starts at 2030-01-01T00:00:00Z.
pub(crate) const EPOCH_S: u64 = 1_893_456_000;

/// Simulated time since the start of the run, the same on every host (turmoil's
/// `sim_elapsed` counts from the host's own start).
pub(crate) fn sim_now() -> Duration {
    let epoch = Duration::from_secs(EPOCH_S);
    turmoil::since_epoch().map_or(Duration::ZERO, |t| t.saturating_sub(epoch))
}

//! Hybrid logical clocks: wall-clock milliseconds plus a logical counter, so that stamps
//! follow real time where clocks agree and still respect causality where they do not (an
//! edit made after seeing another is stamped later, even on a node whose clock is behind).
use serde::{Deserialize, Serialize};

/// A hybrid logical timestamp; ordered by wall time, then counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest wall time seen).
    pub wall_ms: u64,
    /// Counter for events within one `wall_ms`.
    pub logical: u32,
}

/// A node's hybrid logical clock. Time is passed in; the clock reads none.
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A stamp for a local event at wall time `wall_ms`: later than every stamp this clock
    /// issued or observed.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        self.last = if wall_ms > self.last.wall_ms {
            Hlc { wall_ms, logical: 0 }
        } else if self.last.logical == u32::MAX {
            Hlc { wall_ms: self.last.wall_ms + 1, logical: 0 }
        } else {
            Hlc { wall_ms: self.last.wall_ms, logical: self.last.logical + 1 }
        };
        self.last
    }

    /// Takes a remote stamp into account, so later local stamps exceed it.
    pub fn observe(&mut self, seen: Hlc) {
        self.last = self.last.max(seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_even_when_the_wall_clock_goes_back() {
        let mut c = HlcClock::default();
        let a = c.tick(1000);
        let b = c.tick(900);
        let d = c.tick(1000);
        assert!(a < b && b < d);
        assert_eq!(c.tick(2000), Hlc { wall_ms: 2000, logical: 0 });
    }

    #[test]
    fn a_stamp_after_observing_is_later_than_what_was_observed() {
        let mut behind = HlcClock::default();
        let remote = Hlc { wall_ms: 50_000, logical: 7 };
        behind.observe(remote);
        assert!(behind.tick(10) > remote);
    }
}

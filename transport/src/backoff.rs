//! Reconnect backoff: exponential with full jitter and a cap, randomness passed in so that
//! the simulation stays deterministic.

/// Exponential backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// Delays start near `base_ms` and double up to `cap_ms`.
    pub fn new(base_ms: u64, cap_ms: u64) -> Self {
        Backoff { base_ms: base_ms.max(1), cap_ms: cap_ms.max(base_ms.max(1)), attempt: 0 }
    }

    /// The next delay: uniform in [ceiling/2, ceiling] where ceiling doubles per attempt
    /// ("equal jitter": never zero, so a fleet that lost its uplink does not stampede).
    pub fn next_delay_ms(&mut self, random: u64) -> u64 {
        let ceiling = self.base_ms.saturating_mul(1u64 << self.attempt.min(32)).min(self.cap_ms);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + random % (ceiling - half + 1)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(100, 1000);
        let delays: Vec<u64> = (0..8).map(|i| b.next_delay_ms(i * 7919)).collect();
        assert!((50..=100).contains(&delays[0]));
        assert!((100..=200).contains(&delays[1]));
        assert!(delays[5..].iter().all(|d| (500..=1000).contains(d)), "{delays:?}");
        b.reset();
        assert!(b.next_delay_ms(u64::MAX) <= 100);
    }
}

//! A subscription's acknowledgement state: every offset below `ack_floor` is acked, and
//! offsets at or above it that were acked individually are kept as ranges. This shape
//! serves exclusive consumers (acks arrive in order: one range collapses into the floor)
//! and shared ones (acks arrive out of order) alike.
use serde::{Deserialize, Serialize};

use crate::rangeset::RangeSet;

/// Current version of the [`CursorState`] record.
pub const CURSOR_VERSION: u8 = 1;

/// Durable acked state of one subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorState {
    /// Record format version.
    pub version: u8,
    /// Every offset below this is acked.
    pub ack_floor: u64,
    /// Acked offsets at or above `ack_floor`.
    pub acked: RangeSet,
}

impl CursorState {
    /// A cursor positioned at `offset` (nothing from there on acked).
    pub fn at(offset: u64) -> Self {
        CursorState { version: CURSOR_VERSION, ack_floor: offset, acked: RangeSet::new() }
    }

    /// True when `offset` is acked.
    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.ack_floor || self.acked.contains(offset)
    }

    /// Acks one offset.
    pub fn ack(&mut self, offset: u64) {
        if offset >= self.ack_floor {
            self.acked.insert(offset);
            self.settle();
        }
    }

    /// Acks every offset up to and including `offset`.
    pub fn ack_through(&mut self, offset: u64) {
        self.ack_floor = self.ack_floor.max(offset.saturating_add(1));
        self.settle();
    }

    fn settle(&mut self) {
        if let Some(r) = self.acked.range_containing(self.ack_floor) {
            self.ack_floor = r.end;
        }
        self.acked.remove_below(self.ack_floor);
    }

    /// The first offset at or after `from` that is not acked.
    pub fn next_unacked(&self, from: u64) -> u64 {
        let from = from.max(self.ack_floor);
        self.acked.range_containing(from).map_or(from, |r| r.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_move_the_floor() {
        let mut c = CursorState::at(10);
        for o in 10..20 {
            c.ack(o);
        }
        assert_eq!(c.ack_floor, 20);
        assert!(c.acked.is_empty());
        assert!(c.is_acked(5) && !c.is_acked(20));
    }

    #[test]
    fn out_of_order_acks_are_kept_until_the_gap_closes() {
        let mut c = CursorState::at(0);
        c.ack(2);
        c.ack(3);
        c.ack(7);
        assert_eq!(c.ack_floor, 0);
        assert_eq!(c.next_unacked(0), 0);
        assert_eq!(c.next_unacked(2), 4);
        c.ack(0);
        c.ack(1);
        assert_eq!(c.ack_floor, 4);
        assert_eq!(c.acked.iter().collect::<Vec<_>>(), vec![7..8]);
        c.ack_through(6);
        assert_eq!(c.ack_floor, 8);
        assert!(c.acked.is_empty());
        c.ack(3); // already below the floor: no effect
        assert_eq!(c.ack_floor, 8);
    }
}

//! A set of `u64` stored as disjoint, non-adjacent half-open ranges: the representation of
//! dedup sets (producer sequence numbers) and of acked offsets. Merge is union, so it is a
//! grow-only set CRDT.
use std::{
    collections::BTreeMap,
    ops::{Bound, Range},
};

use serde::{Deserialize, Serialize};

/// A set of integers as sorted ranges; a producer writing in order keeps a single range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet {
    /// start -> end (exclusive); ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when `value` is in the set.
    pub fn contains(&self, value: u64) -> bool {
        self.ranges.range(..=value).next_back().is_some_and(|(_, &end)| value < end)
    }

    /// Adds one value.
    pub fn insert(&mut self, value: u64) {
        self.insert_range(value..value.saturating_add(1));
    }

    /// Adds every value of `range`. Extending the last range (a producer writing in
    /// order) costs two lookups and an in-place update.
    pub fn insert_range(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // Merge with a range that starts at or before `start` and reaches it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            if e >= end {
                return;
            }
            start = s;
        }
        // Absorb every later range that starts inside or right after the new one.
        while let Some((&s, &e)) = self.ranges.range((Bound::Excluded(start), Bound::Included(end))).next() {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// True when any value of `range` is in the set (one lookup).
    pub fn intersects(&self, range: &Range<u64>) -> bool {
        !range.is_empty() && self.ranges.range(..range.end).next_back().is_some_and(|(_, &e)| e > range.start)
    }

    /// Adds every value of `other` (CRDT merge).
    pub fn union(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.insert_range(r);
        }
    }

    /// Removes every value below `floor`.
    pub fn remove_below(&mut self, floor: u64) {
        let below: Vec<(u64, u64)> = self.ranges.range(..floor).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in below {
            self.ranges.remove(&s);
            if e > floor {
                self.ranges.insert(floor, e);
            }
        }
    }

    /// The ranges in ascending order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// The range containing `value`, if any.
    pub fn range_containing(&self, value: u64) -> Option<Range<u64>> {
        self.ranges.range(..=value).next_back().filter(|&(_, &end)| value < end).map(|(&s, &e)| s..e)
    }

    /// Number of stored ranges (a measure of fragmentation and of size on disk).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Number of values in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(s: &RangeSet) -> Vec<Range<u64>> {
        s.iter().collect()
    }

    #[test]
    fn in_order_inserts_keep_one_range() {
        let mut s = RangeSet::new();
        for v in 0..1000 {
            s.insert(v);
        }
        assert_eq!(ranges(&s), vec![0..1000]);
        assert!(s.contains(999) && !s.contains(1000));
    }

    #[test]
    fn out_of_order_inserts_merge() {
        let mut s = RangeSet::new();
        s.insert_range(10..20);
        s.insert_range(30..40);
        assert_eq!(ranges(&s), vec![10..20, 30..40]);
        assert!(!s.contains(25) && s.contains(10) && !s.contains(20));
        s.insert_range(20..30);
        assert_eq!(ranges(&s), vec![10..40]);
        s.insert_range(0..5);
        s.insert_range(3..12);
        assert_eq!(ranges(&s), vec![0..40]);
        s.insert_range(50..60);
        s.insert_range(45..70);
        assert_eq!(ranges(&s), vec![0..40, 45..70]);
        assert_eq!(s.len(), 65);
    }

    #[test]
    fn intersects_is_exact_at_the_edges() {
        let mut s = RangeSet::new();
        s.insert_range(10..20);
        s.insert_range(30..40);
        assert!(!s.intersects(&(0..10)) && !s.intersects(&(20..30)) && !s.intersects(&(40..50)));
        assert!(
            s.intersects(&(0..11)) && s.intersects(&(19..30)) && s.intersects(&(25..31)) && s.intersects(&(0..100))
        );
        assert!(!s.intersects(&(15..15)));
    }

    #[test]
    fn union_and_remove_below() {
        let mut a = RangeSet::new();
        a.insert_range(0..10);
        let mut b = RangeSet::new();
        b.insert_range(5..15);
        b.insert(20);
        a.union(&b);
        assert_eq!(ranges(&a), vec![0..15, 20..21]);
        a.remove_below(12);
        assert_eq!(ranges(&a), vec![12..15, 20..21]);
        assert_eq!(a.range_containing(13), Some(12..15));
        assert_eq!(a.range_containing(16), None);
    }

    #[test]
    fn matches_a_naive_set() {
        // A deterministic pseudo-random sequence of ranges against a BTreeSet model.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut set = RangeSet::new();
        let mut model = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let start = x % 500;
            let len = (x >> 20) % 6;
            set.insert_range(start..start + len);
            model.extend(start..start + len);
        }
        for v in 0..520 {
            assert_eq!(set.contains(v), model.contains(&v), "value {v}");
        }
        assert_eq!(set.len(), model.len() as u64);
        let r = ranges(&set);
        assert!(r.windows(2).all(|w| w[0].end < w[1].start), "ranges must not touch: {r:?}");
    }
}

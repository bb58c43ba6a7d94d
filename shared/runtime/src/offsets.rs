//! Which offset of a partition may be committed when messages finish out of order.
//!
//! Messages of a partition are taken in offset order but may finish in any order (concurrent
//! work, retries). The committable position is one past the highest offset below which every
//! taken message has finished: nothing unfinished is ever committed past.

use std::collections::{BTreeSet, HashMap};

/// Tracks taken and finished offsets of every partition of a consumer.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    /// Taken and not finished yet.
    pending: BTreeSet<i64>,
    /// Finished while an earlier offset is still pending.
    done_early: BTreeSet<i64>,
    /// Highest offset taken so far.
    highest_taken: Option<i64>,
    /// The next offset to commit (one past the contiguous finished prefix), once known.
    committable: Option<i64>,
}

impl OffsetTracker {
    /// Records that `offset` of `topic`/`partition` was taken for processing.
    pub fn take(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_default();
        p.pending.insert(offset);
        p.highest_taken = Some(p.highest_taken.map_or(offset, |h| h.max(offset)));
    }

    /// Records that `offset` finished. Returns the new commit position (the offset to store) if
    /// it advanced.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        if !p.pending.remove(&offset) {
            return None;
        }
        p.done_early.insert(offset);
        // Everything below the lowest pending offset is finished.
        let bound = p.pending.first().copied();
        let finished: Vec<i64> = match bound {
            Some(low) => p.done_early.range(..low).copied().collect(),
            None => p.done_early.iter().copied().collect(),
        };
        let last = *finished.last()?;
        for o in &finished {
            p.done_early.remove(o);
        }
        let next = last + 1;
        if p.committable.is_some_and(|c| c >= next) {
            return None;
        }
        p.committable = Some(next);
        Some(next)
    }

    /// Messages taken and not finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.pending.len()).sum()
    }

    /// Messages of one partition taken and not finished.
    pub fn in_flight_of(&self, topic: &str, partition: i32) -> usize {
        self.partitions
            .get(&(topic.to_owned(), partition))
            .map_or(0, |p| p.pending.len())
    }

    /// Forgets a partition (after it was revoked and drained or handed back).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completion_advances_each_time() {
        let mut t = OffsetTracker::default();
        for o in 10..13 {
            t.take("a", 0, o);
        }
        assert_eq!(t.finish("a", 0, 10), Some(11));
        assert_eq!(t.finish("a", 0, 11), Some(12));
        assert_eq!(t.finish("a", 0, 12), Some(13));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn never_commits_past_unfinished_work() {
        let mut t = OffsetTracker::default();
        for o in 0..5 {
            t.take("a", 0, o);
        }
        assert_eq!(t.finish("a", 0, 3), None);
        assert_eq!(t.finish("a", 0, 1), None);
        assert_eq!(t.finish("a", 0, 0), Some(2), "0 and 1 are done, 2 is not");
        assert_eq!(t.finish("a", 0, 4), None);
        assert_eq!(t.finish("a", 0, 2), Some(5), "2 completes the run up to 4");
    }

    #[test]
    fn partitions_are_independent_and_unknown_offsets_ignored() {
        let mut t = OffsetTracker::default();
        t.take("a", 0, 7);
        t.take("a", 1, 3);
        t.take("b", 0, 100);
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.finish("a", 1, 3), Some(4));
        assert_eq!(t.finish("a", 1, 3), None, "finishing twice does nothing");
        assert_eq!(t.finish("a", 0, 8), None, "never taken");
        assert_eq!(t.in_flight_of("a", 0), 1);
        t.forget("a", 0);
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn any_completion_order_ends_at_the_same_position() {
        // Every permutation of 6 offsets: the final position is one past the last, and no
        // intermediate position ever passes an unfinished offset.
        let offsets: Vec<i64> = (20..26).collect();
        let mut order = offsets.clone();
        let mut count = 0;
        permute(&mut order, 0, &mut |perm| {
            count += 1;
            let mut t = OffsetTracker::default();
            offsets.iter().for_each(|&o| t.take("t", 0, o));
            let mut done = BTreeSet::new();
            let mut last = None;
            for &o in perm {
                done.insert(o);
                if let Some(pos) = t.finish("t", 0, o) {
                    assert!(
                        (20..pos).all(|x| done.contains(&x)),
                        "{perm:?}: {pos} passes unfinished work"
                    );
                    last = Some(pos);
                }
            }
            assert_eq!(last, Some(26), "{perm:?}");
        });
        assert_eq!(count, 720);
    }

    fn permute(v: &mut Vec<i64>, k: usize, f: &mut impl FnMut(&[i64])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }
}

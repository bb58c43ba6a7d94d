//! How many messages a stage instance takes at once, sized from the latency it measures (a
//! gradient limit, after Netflix's concurrency-limits).
//!
//! Messages that wait on something that does not saturate (the broker's acknowledgement, the
//! object store, the database) finish as fast with more of them in flight: the latency stays
//! near its floor and the limit grows, so those waits overlap. Messages that queue for a
//! saturated resource (the cores, behind the process's CPU budget, `on_cpu`) take longer the
//! more are in flight: the latency rises above its floor, the gradient (floor / latency) falls
//! below one and the limit shrinks, so the stage holds few messages (and their inputs in
//! memory) beyond what keeps the resource busy. Each round (as many finished messages as the limit, at least
//! `MIN_ROUND`):
//!
//! ```text
//! floor = min(floor, mean latency of the round)
//! limit = clamp(limit * clamp(floor / mean, 0.5, 1) + sqrt(limit), MIN_LIMIT, max)
//! ```
//!
//! The `sqrt(limit)` term leaves a small queue, so the resource never waits for the stage.

use std::time::Duration;

/// The least an adaptive limit goes down to.
pub const MIN_LIMIT: usize = 2;
/// Where an adaptive limit starts (or the maximum, if lower).
pub const START: usize = 4;
/// Finished messages per round at least.
const MIN_ROUND: usize = 4;

/// The in-flight limit of one stage instance.
#[derive(Debug)]
pub(crate) struct Limit {
    current: usize,
    max: usize,
    adaptive: bool,
    /// The lowest mean latency of a round so far, in seconds.
    floor: Option<f64>,
    round_sum: f64,
    round_n: usize,
}

impl Limit {
    /// `max` at all times, or (`adaptive`) sized from latency between `MIN_LIMIT` and `max`.
    pub(crate) fn new(max: usize, adaptive: bool) -> Self {
        let max = max.max(1);
        Self {
            current: if adaptive { START.min(max) } else { max },
            max,
            adaptive,
            floor: None,
            round_sum: 0.0,
            round_n: 0,
        }
    }

    pub(crate) fn get(&self) -> usize {
        self.current
    }

    /// Records how long a finished message took, from taken to acknowledged; the new limit
    /// when a round ends.
    pub(crate) fn finished(&mut self, latency: Duration) -> Option<usize> {
        if !self.adaptive {
            return None;
        }
        self.round_sum += latency.as_secs_f64();
        self.round_n += 1;
        if self.round_n < self.current.max(MIN_ROUND) {
            return None;
        }
        let mean = self.round_sum / self.round_n as f64;
        self.round_sum = 0.0;
        self.round_n = 0;
        let floor = self.floor.map_or(mean, |f| f.min(mean));
        self.floor = Some(floor);
        let gradient = if mean > 0.0 {
            (floor / mean).clamp(0.5, 1.0)
        } else {
            1.0
        };
        let limit = self.current as f64;
        let next = (limit * gradient + limit.sqrt()).round() as usize;
        self.current = next.clamp(MIN_LIMIT.min(self.max), self.max);
        Some(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latency of a message with `limit` in flight: `wait` that overlaps freely, and `service`
    /// on one resource that serves one message at a time; once that resource is busy, messages
    /// queue for it.
    fn latency(limit: usize, wait: f64, service: f64) -> Duration {
        Duration::from_secs_f64((wait + service).max(service * limit as f64))
    }

    fn settle(max: usize, wait: f64, service: f64) -> usize {
        let mut l = Limit::new(max, true);
        for _ in 0..5000 {
            let n = l.get();
            l.finished(latency(n, wait, service));
        }
        l.get()
    }

    #[test]
    fn fixed_limits_do_not_move() {
        let mut l = Limit::new(7, false);
        for _ in 0..100 {
            assert_eq!(l.finished(Duration::from_secs(1)), None);
        }
        assert_eq!(l.get(), 7);
    }

    #[test]
    fn waits_that_overlap_raise_the_limit_to_the_maximum() {
        // All waiting, no saturated resource: the latency stays at its floor.
        assert_eq!(settle(64, 0.050, 0.0), 64);
    }

    #[test]
    fn a_saturated_resource_keeps_the_limit_small() {
        // All queueing behind one resource: each message in flight adds its service time.
        let n = settle(64, 0.0, 0.020);
        assert!((MIN_LIMIT..=8).contains(&n), "{n}");
    }

    #[test]
    fn long_waits_with_some_work_settle_between() {
        // 100 ms of waiting and 5 ms on the saturated resource: more in flight hides the wait
        // until the resource is busy (20 messages), not far beyond.
        let n = settle(256, 0.100, 0.005);
        assert!((8..=60).contains(&n), "{n}");
    }
}

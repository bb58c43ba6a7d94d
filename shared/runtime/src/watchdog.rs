//! The stage watchdog: tells a wedged stage instance from a busy or idle one. A stage is wedged
//! when messages wait for it and nothing moves: it holds no partitions while its input has lag,
//! or its partitions with lag have not moved their committed offset while it had nothing in
//! flight, for longer than `stall_after`. A consumer-group coordinator that lost track of a
//! member after a crash looks exactly like this, on any broker.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mediaflow_bus::PartitionPosition;

use crate::Source;
use tokio_util::sync::CancellationToken;

type PartitionId = (String, i32);

/// What the watchdog sees of one stage instance at one moment.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The partitions this instance holds.
    pub held: Vec<PartitionId>,
    /// Messages it has taken and not finished.
    pub in_flight: usize,
    /// Its group's positions on every partition of its inputs.
    pub positions: Vec<PartitionPosition>,
}

/// The watchdog's verdict on an observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Working, or idle with nothing waiting.
    Healthy,
    /// Messages wait and nothing moves, for less than `stall_after` so far.
    Suspect,
    /// Nothing moved for `stall_after` while messages waited; the reason says what was seen.
    Wedged(String),
}

/// Watches one stage instance across observations.
#[derive(Debug)]
pub struct Watchdog {
    stall_after: Duration,
    /// Since when the instance looked stuck, and the committed offsets it was stuck at.
    stuck: Option<(Instant, BTreeMap<PartitionId, Option<i64>>)>,
}

impl Watchdog {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            stall_after,
            stuck: None,
        }
    }

    /// Judges `seen`, taken at `now`.
    pub fn observe(&mut self, now: Instant, seen: &Observation) -> Verdict {
        let held: HashSet<&PartitionId> = seen.held.iter().collect();
        // With partitions, this instance answers for those; without, for every partition: one
        // that others hold and move on is not stuck.
        let relevant: Vec<&PartitionPosition> = seen
            .positions
            .iter()
            .filter(|p| held.is_empty() || held.contains(&(p.topic.clone(), p.partition)))
            .filter(|p| p.lag() > 0)
            .collect();
        if relevant.is_empty() || seen.in_flight > 0 {
            self.stuck = None;
            return Verdict::Healthy;
        }
        let at: BTreeMap<PartitionId, Option<i64>> = relevant
            .iter()
            .map(|p| ((p.topic.clone(), p.partition), p.committed))
            .collect();
        match &self.stuck {
            // Still at the same offsets: stuck since then.
            Some((since, before)) if at.iter().all(|(p, c)| before.get(p) == Some(c)) => {
                let stuck_for = now.saturating_duration_since(*since);
                if stuck_for < self.stall_after {
                    return Verdict::Suspect;
                }
                let waiting: i64 = relevant.iter().map(|p| p.lag()).sum();
                Verdict::Wedged(if held.is_empty() {
                    format!(
                        "holds no partitions while {waiting} message(s) wait on its input and \
                         none was committed for {} s",
                        stuck_for.as_secs()
                    )
                } else {
                    let stuck: Vec<String> = relevant
                        .iter()
                        .map(|p| format!("{}/{}", p.topic, p.partition))
                        .collect();
                    format!(
                        "committed nothing on {} for {} s while {waiting} message(s) waited \
                         there and it had none in flight",
                        stuck.join(", "),
                        stuck_for.as_secs()
                    )
                })
            }
            // Moved since: progress, and the clock starts again.
            Some(_) => {
                self.stuck = Some((now, at));
                Verdict::Healthy
            }
            // Newly stuck: the clock starts now.
            None => {
                self.stuck = Some((now, at));
                Verdict::Suspect
            }
        }
    }
}

/// A running stage instance as the watchdog sees it, and the way to make it rejoin its group.
/// The runtime fills it in; whoever watches the stage reads it.
#[derive(Clone, Debug, Default)]
pub struct StageProbe {
    inner: Arc<Mutex<ProbeState>>,
    rejoin: CancellationToken,
}

#[derive(Debug, Default)]
struct ProbeState {
    source: Option<std::sync::Weak<dyn Source>>,
    in_flight: usize,
}

impl StageProbe {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn attach(&self, source: &Arc<dyn Source>) {
        self.state().source = Some(Arc::downgrade(source));
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.state().in_flight = n;
    }

    /// The partitions held and the messages in flight now; None while the stage has no
    /// consumer (starting or stopped) or its assignment cannot be read.
    pub fn held_and_in_flight(&self) -> Option<(Vec<PartitionId>, usize)> {
        let state = self.state();
        let source = state.source.as_ref()?.upgrade()?;
        let held = source.assignment().ok()?;
        Some((held, state.in_flight))
    }

    /// Asks the stage instance to drain, leave and join its group again.
    pub fn request_rejoin(&self) {
        self.rejoin.cancel();
    }

    /// Whether a rejoin was asked for.
    pub fn rejoin_requested(&self) -> bool {
        self.rejoin.is_cancelled()
    }

    pub(crate) fn rejoin_token(&self) -> &CancellationToken {
        &self.rejoin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(partition: i32, committed: Option<i64>, high: i64) -> PartitionPosition {
        PartitionPosition {
            topic: "in".into(),
            partition,
            committed,
            low: 0,
            high,
        }
    }

    fn seen(held: &[i32], in_flight: usize, positions: Vec<PartitionPosition>) -> Observation {
        Observation {
            held: held.iter().map(|&p| ("in".to_owned(), p)).collect(),
            in_flight,
            positions,
        }
    }

    const STALL: Duration = Duration::from_secs(30);

    #[test]
    fn no_partitions_while_lag_waits_is_wedged_after_the_stall_time() {
        let mut w = Watchdog::new(STALL);
        let t0 = Instant::now();
        let s = seen(&[], 0, vec![pos(0, Some(3), 10), pos(1, None, 2)]);
        assert_eq!(w.observe(t0, &s), Verdict::Suspect);
        assert_eq!(
            w.observe(t0 + Duration::from_secs(29), &s),
            Verdict::Suspect
        );
        match w.observe(t0 + Duration::from_secs(31), &s) {
            Verdict::Wedged(why) => assert!(why.contains("holds no partitions while 9"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn others_moving_the_partitions_on_is_not_wedged() {
        let mut w = Watchdog::new(STALL);
        let t0 = Instant::now();
        for i in 0..10 {
            // Another member commits a little more each time.
            let s = seen(&[], 0, vec![pos(0, Some(i), 100)]);
            let expected = if i == 0 {
                Verdict::Suspect
            } else {
                Verdict::Healthy
            };
            assert_eq!(
                w.observe(t0 + Duration::from_secs(10 * i as u64), &s),
                expected
            );
        }
    }

    #[test]
    fn work_in_flight_or_no_lag_is_healthy() {
        let mut w = Watchdog::new(STALL);
        let t0 = Instant::now();
        let busy = seen(&[0], 1, vec![pos(0, Some(3), 10)]);
        let idle = seen(&[0], 0, vec![pos(0, Some(10), 10)]);
        for i in 0..10 {
            let t = t0 + Duration::from_secs(20 * i);
            assert_eq!(w.observe(t, &busy), Verdict::Healthy);
            assert_eq!(w.observe(t, &idle), Verdict::Healthy);
        }
    }

    #[test]
    fn held_partition_stuck_with_nothing_in_flight_is_wedged() {
        let mut w = Watchdog::new(STALL);
        let t0 = Instant::now();
        // Partition 1 is someone else's and lags too; this instance answers for partition 0.
        let s = seen(&[0], 0, vec![pos(0, Some(3), 10), pos(1, Some(0), 5)]);
        assert_eq!(w.observe(t0, &s), Verdict::Suspect);
        match w.observe(t0 + STALL, &s) {
            Verdict::Wedged(why) => {
                assert!(why.contains("in/0") && !why.contains("in/1"), "{why}");
                assert!(why.contains("7 message(s)"), "{why}");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn lag_only_on_partitions_others_hold_is_not_this_instances_problem() {
        let mut w = Watchdog::new(STALL);
        let t0 = Instant::now();
        let s = seen(&[0], 0, vec![pos(0, Some(10), 10), pos(1, Some(0), 5)]);
        assert_eq!(w.observe(t0, &s), Verdict::Healthy);
        assert_eq!(w.observe(t0 + STALL * 3, &s), Verdict::Healthy);
    }

    #[test]
    fn a_commit_restarts_the_clock() {
        let mut w = Watchdog::new(STALL);
        let t0 = Instant::now();
        assert_eq!(
            w.observe(t0, &seen(&[0], 0, vec![pos(0, Some(3), 10)])),
            Verdict::Suspect
        );
        assert_eq!(
            w.observe(t0 + STALL, &seen(&[0], 0, vec![pos(0, Some(4), 10)])),
            Verdict::Healthy
        );
        assert_eq!(
            w.observe(
                t0 + STALL + STALL / 2,
                &seen(&[0], 0, vec![pos(0, Some(4), 10)])
            ),
            Verdict::Suspect
        );
        assert!(matches!(
            w.observe(t0 + STALL * 2, &seen(&[0], 0, vec![pos(0, Some(4), 10)])),
            Verdict::Wedged(_)
        ));
    }
}

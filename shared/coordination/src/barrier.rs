//! The join's pure core (ch. 12's barrier): what one key (a media, a batch) waits for, what has
//! arrived, and the one outcome it releases. Arrivals are idempotent and order does not matter:
//! any order and any repeats of the same arrivals release the same outcome, once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why what had not arrived by the deadline failed.
pub const TIMED_OUT: &str = "timed out: never arrived before the deadline";

/// The failure's name for the items a count barrier still waited for at its deadline.
pub const MISSING: &str = "(missing)";

/// What a barrier waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    /// These names: the branches a pipeline declares for a media, or a batch's manifest.
    Names(BTreeSet<String>),
    /// This many distinct names (a batch declared by its item count).
    Count(u64),
}

/// What a declared join does when a branch or an item fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// The first failure fails the whole key, at once.
    #[default]
    FailBatch,
    /// Wait for everything, then complete listing the failures.
    CompletePartial,
}

/// One arrival: a branch's or an item's result, or its failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    Done(Value),
    Failed(String),
}

/// What a barrier released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Everything arrived and succeeded.
    Complete { results: BTreeMap<String, Value> },
    /// Everything arrived or timed out; some failed (`complete-partial`).
    Partial {
        results: BTreeMap<String, Value>,
        failures: BTreeMap<String, String>,
    },
    /// A failure under `fail-batch`: what had arrived by then, and the failures.
    Failed {
        results: BTreeMap<String, Value>,
        failures: BTreeMap<String, String>,
    },
}

/// What an arrival did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Recorded (or a repeat of what was recorded); still waiting.
    Waiting,
    /// This arrival released the barrier.
    Released(Outcome),
    /// The barrier had released already: the arrival changes nothing (a late or repeated one).
    Late,
}

/// Why an arrival was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    #[error("`{0}` is not one of the names this join waits for")]
    Unexpected(String),
}

/// The state of one key's join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Barrier {
    expected: Expected,
    policy: FailurePolicy,
    /// Event time (ms) after which what has not arrived counts as failed.
    deadline_ms: Option<i64>,
    done: BTreeMap<String, Value>,
    failed: BTreeMap<String, String>,
    released: Option<Outcome>,
}

impl Barrier {
    pub fn new(expected: Expected, policy: FailurePolicy, deadline_ms: Option<i64>) -> Self {
        Self {
            expected,
            policy,
            deadline_ms,
            done: BTreeMap::new(),
            failed: BTreeMap::new(),
            released: None,
        }
    }

    /// The outcome, once released.
    pub fn released(&self) -> Option<&Outcome> {
        self.released.as_ref()
    }

    /// How many names arrived (done or failed), and how many are expected.
    pub fn progress(&self) -> (u64, u64) {
        let arrived = self.done.len() as u64 + self.failed.len() as u64;
        let expected = match &self.expected {
            Expected::Names(names) => names.len() as u64,
            Expected::Count(n) => *n,
        };
        (arrived, expected)
    }

    /// Records `arrival` for `name`. A success replaces an earlier failure of the same name (a
    /// retried branch); a repeat changes nothing.
    pub fn arrive(&mut self, name: &str, arrival: Arrival) -> Result<Step, BarrierError> {
        if self.released.is_some() {
            return Ok(Step::Late);
        }
        // (A count's surplus cannot come here: the count's last name released the barrier.)
        if let Expected::Names(names) = &self.expected
            && !names.contains(name)
        {
            return Err(BarrierError::Unexpected(name.to_owned()));
        }
        match arrival {
            Arrival::Done(result) => {
                self.failed.remove(name);
                self.done.entry(name.to_owned()).or_insert(result);
            }
            Arrival::Failed(why) => {
                if !self.done.contains_key(name) {
                    self.failed.entry(name.to_owned()).or_insert(why);
                }
            }
        }
        Ok(self.evaluate().map_or(Step::Waiting, Step::Released))
    }

    /// At event time `now_ms`: past the deadline, whatever has not arrived fails ("timed out")
    /// and the barrier releases. None if it was released before or the deadline is not past.
    pub fn expire(&mut self, now_ms: i64) -> Option<Outcome> {
        if self.released.is_some() || self.deadline_ms.is_none_or(|d| now_ms < d) {
            return None;
        }
        let missing: Vec<(String, String)> = match &self.expected {
            Expected::Names(names) => names
                .iter()
                .filter(|n| !self.done.contains_key(*n) && !self.failed.contains_key(*n))
                .map(|n| (n.clone(), TIMED_OUT.to_owned()))
                .collect(),
            // Nameless items that never came: one entry, `(missing)`, says how many.
            Expected::Count(n) => {
                let gap = n.saturating_sub(self.progress().0);
                (gap > 0)
                    .then(|| {
                        (
                            MISSING.to_owned(),
                            format!("{gap} of {n} items: {TIMED_OUT}"),
                        )
                    })
                    .into_iter()
                    .collect()
            }
        };
        for (name, why) in missing {
            self.failed.insert(name, why);
        }
        self.release()
    }

    fn evaluate(&mut self) -> Option<Outcome> {
        let (arrived, expected) = self.progress();
        let first_failure = self.policy == FailurePolicy::FailBatch && !self.failed.is_empty();
        (first_failure || arrived >= expected)
            .then(|| self.release())
            .flatten()
    }

    fn release(&mut self) -> Option<Outcome> {
        let results = self.done.clone();
        let failures = self.failed.clone();
        let outcome = match (failures.is_empty(), self.policy) {
            (true, _) => Outcome::Complete { results },
            (false, FailurePolicy::FailBatch) => Outcome::Failed { results, failures },
            (false, FailurePolicy::CompletePartial) => Outcome::Partial { results, failures },
        };
        self.released = Some(outcome.clone());
        Some(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(n: &[&str]) -> Expected {
        Expected::Names(n.iter().map(|s| (*s).to_owned()).collect())
    }

    fn done(v: i64) -> Arrival {
        Arrival::Done(json!(v))
    }

    /// Every order of `arrivals`, each once (Heap's algorithm).
    fn orders<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        fn go<T: Clone>(k: usize, a: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
            if k <= 1 {
                out.push(a.clone());
                return;
            }
            for i in 0..k {
                go(k - 1, a, out);
                let j = if k.is_multiple_of(2) { i } else { 0 };
                a.swap(j, k - 1);
            }
        }
        let mut out = Vec::new();
        go(items.len(), &mut items.to_vec(), &mut out);
        out
    }

    #[test]
    fn releases_once_with_the_same_outcome_in_any_order_and_with_repeats() {
        let arrivals = [("thumbs", done(1)), ("tags", done(2)), ("faces", done(3))];
        let mut outcomes = BTreeSet::new();
        for order in orders(&arrivals) {
            let mut b = Barrier::new(
                names(&["thumbs", "tags", "faces"]),
                FailurePolicy::FailBatch,
                None,
            );
            let mut released = 0;
            // Each arrival twice: a redelivered event.
            for (name, a) in order.iter().flat_map(|x| [x.clone(), x.clone()]) {
                match b.arrive(name, a).unwrap() {
                    Step::Released(o) => {
                        released += 1;
                        outcomes.insert(serde_json::to_string(&o).unwrap());
                    }
                    Step::Waiting | Step::Late => {}
                }
            }
            assert_eq!(released, 1);
            assert_eq!(b.arrive("tags", done(9)).unwrap(), Step::Late);
        }
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        assert!(
            outcomes
                .first()
                .unwrap()
                .contains(r#""outcome":"complete""#)
        );
    }

    #[test]
    fn fail_batch_releases_at_the_first_failure_and_complete_partial_waits() {
        let mut b = Barrier::new(names(&["a", "b", "c"]), FailurePolicy::FailBatch, None);
        assert_eq!(b.arrive("a", done(1)).unwrap(), Step::Waiting);
        let Step::Released(Outcome::Failed { results, failures }) =
            b.arrive("b", Arrival::Failed("corrupt".into())).unwrap()
        else {
            panic!("fail-batch releases at once")
        };
        assert_eq!((results.len(), failures["b"].as_str()), (1, "corrupt"));

        let mut b = Barrier::new(
            names(&["a", "b", "c"]),
            FailurePolicy::CompletePartial,
            None,
        );
        assert_eq!(
            b.arrive("b", Arrival::Failed("corrupt".into())).unwrap(),
            Step::Waiting
        );
        // A retried branch that then succeeds replaces its failure.
        assert_eq!(
            b.arrive("a", Arrival::Failed("flaky".into())).unwrap(),
            Step::Waiting
        );
        assert_eq!(b.arrive("a", done(1)).unwrap(), Step::Waiting);
        let Step::Released(Outcome::Partial { results, failures }) =
            b.arrive("c", done(3)).unwrap()
        else {
            panic!("complete-partial releases once all arrived")
        };
        assert_eq!(results.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(failures.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            b.arrive("zzz", done(1)).unwrap(),
            Step::Late,
            "after release nothing is refused or counted"
        );
    }

    #[test]
    fn unknown_names_are_refused_and_surplus_items_are_late() {
        let mut b = Barrier::new(names(&["a"]), FailurePolicy::FailBatch, None);
        assert_eq!(
            b.arrive("b", done(1)),
            Err(BarrierError::Unexpected("b".into()))
        );
        let mut b = Barrier::new(Expected::Count(2), FailurePolicy::FailBatch, None);
        assert_eq!(b.arrive("x", done(1)).unwrap(), Step::Waiting);
        assert_eq!(b.arrive("x", done(1)).unwrap(), Step::Waiting, "a repeat");
        assert!(matches!(
            b.arrive("y", done(2)).unwrap(),
            Step::Released(Outcome::Complete { .. })
        ));
        assert_eq!(b.progress(), (2, 2));
        let mut b = Barrier::new(Expected::Count(1), FailurePolicy::CompletePartial, None);
        assert!(matches!(
            b.arrive("x", Arrival::Failed("bad".into())).unwrap(),
            Step::Released(Outcome::Partial { .. })
        ));
        let mut b = Barrier::new(Expected::Count(1), FailurePolicy::FailBatch, None);
        b.arrive("x", done(1)).unwrap();
        b = serde_json::from_value(serde_json::to_value(&b).unwrap()).unwrap();
        let mut c = Barrier::new(Expected::Count(2), FailurePolicy::FailBatch, None);
        c.arrive("x", done(1)).unwrap();
        c.arrive("y", done(1)).unwrap();
        assert!(
            matches!(c.arrive("z", done(1)), Ok(Step::Late)),
            "a surplus item after the release is late, not an error"
        );
        assert_eq!(b.arrive("y", done(1)).unwrap(), Step::Late);
    }

    #[test]
    fn the_deadline_fails_what_never_came() {
        let mut b = Barrier::new(
            names(&["a", "b"]),
            FailurePolicy::CompletePartial,
            Some(1_000),
        );
        b.arrive("a", done(1)).unwrap();
        assert_eq!(b.expire(999), None);
        let Some(Outcome::Partial { failures, .. }) = b.expire(1_000) else {
            panic!("released at the deadline")
        };
        assert_eq!(failures["b"], TIMED_OUT);
        assert_eq!(b.expire(2_000), None, "released once");

        let mut b = Barrier::new(Expected::Count(3), FailurePolicy::FailBatch, Some(10));
        b.arrive("x", done(1)).unwrap();
        let Some(Outcome::Failed { failures, .. }) = b.expire(10) else {
            panic!("fail-batch at the deadline")
        };
        assert_eq!(
            failures[MISSING],
            format!("2 of 3 items: {TIMED_OUT}"),
            "{failures:?}"
        );

        // The state survives its JSON form (the stage keeps it in the database).
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Barrier>(&text).unwrap(), b);
    }
}

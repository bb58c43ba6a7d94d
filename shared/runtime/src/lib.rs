//! The stage runtime. A stage supplies a `Handler`; the runtime owns the consume loop: it takes
//! messages (up to a bounded number at once, one at a time per key), runs the handler, publishes
//! the outputs it returns on the topics their ports are bound to, retries transient failures
//! with exponential backoff without holding up the rest of the partition, dead-letters what fails
//! for good, and stores each partition's offset only past messages that are finished: handled and
//! their outputs acknowledged by the broker.

mod cpu;
mod limit;
#[cfg(test)]
mod loop_tests;
mod offsets;
mod output;
mod seam;
mod stage;
mod watchdog;

pub use cpu::on_cpu;
pub use offsets::OffsetTracker;
pub use output::{Bound, Output, Ports};
pub use seam::{Sink, Source, Tracker};
pub use stage::{RUNNING_AFTER, StageOptions, StageRun, Stopped, run_stage};
pub use watchdog::{Observation, StageProbe, Verdict, Watchdog};

use std::future::Future;
use std::time::Duration;

use cloudevents::Event;

/// What kind of failure a stage hit; decides what the runtime does with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// May heal by itself (a service down, a timeout): retried with backoff.
    Transient,
    /// Will fail the same way every time (a bug, a missing object): not retried.
    Permanent,
    /// The input itself is unusable (corrupt media, malformed event): not retried.
    BadInput,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::BadInput => "bad_input",
        }
    }
}

/// A classified stage failure.
#[derive(Debug, thiserror::Error)]
#[error("{class} error: {message}", class = .class.as_str())]
pub struct StageError {
    pub class: ErrorClass,
    pub message: String,
}

impl StageError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
        }
    }
    /// A dependency's failure: transient if the dependency says a retry can succeed, else
    /// permanent.
    pub fn dependency(transient: bool, message: impl Into<String>) -> Self {
        if transient {
            Self::transient(message)
        } else {
            Self::permanent(message)
        }
    }
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::BadInput,
            message: message.into(),
        }
    }
}

/// A stage's logic for one message.
pub trait Handler: Send + Sync + 'static {
    /// Processes one event and returns the events it produces, each on an output port. Returns
    /// only when its own effects are acknowledged (objects written, rows committed); the runtime
    /// publishes the events and waits for the broker's acknowledgements before the input counts
    /// as done.
    fn handle(&self, event: &Event)
    -> impl Future<Output = Result<Vec<Output>, StageError>> + Send;

    /// Called once when the runtime stops trying `event` (None: the message was not a valid
    /// CloudEvent), before the message goes to the dead-letter topic, for a stage with more to
    /// clean up. (The runtime itself records the stage as failed for the entity the event is
    /// about, through its `Tracker`, and dead-letters the message.)
    fn give_up(
        &self,
        event: Option<&Event>,
        error: &StageError,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        let _ = (event, error);
        async { Ok(()) }
    }
}

/// How a stage backs off between attempts at a transiently failing message.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1`: exponential, with up to 50% jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_backoff);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 2000.0);
        base.saturating_sub(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for attempt in 0..10 {
            let b = p.backoff(attempt);
            let base = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(1));
            assert!(
                b <= base && b >= base / 2,
                "attempt {attempt}: {b:?} vs {base:?}"
            );
        }
    }
}

//! The stage runtime. A stage supplies a `Handler`; the runtime owns the consume loop: it takes a
//! message, runs the handler, retries transient failures with exponential backoff until they
//! heal, hands failures that will not heal to the handler's `give_up`, and only then acknowledges
//! the message, in order within each partition.

mod offsets;

pub use offsets::OffsetTracker;

use std::future::Future;
use std::time::Duration;

use cloudevents::Event;
use mediaflow_bus::{Consumer, Delivery};
use mediaflow_telemetry::Metrics;
use tokio_util::sync::CancellationToken;

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
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::BadInput,
            message: message.into(),
        }
    }
}

/// A stage's logic for one message.
pub trait Handler: Send + Sync {
    /// Processes one event. Returns only when every output is acknowledged (objects written,
    /// rows committed, events acknowledged by the broker).
    fn handle(&self, event: &Event) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Called once when the runtime stops trying `event` (None: the message was not a valid
    /// CloudEvent). The stage records the failure where users can see it.
    fn give_up(
        &self,
        event: Option<&Event>,
        error: &StageError,
    ) -> impl Future<Output = Result<(), StageError>> + Send;
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

/// Runs `handler` over `consumer` until `shutdown` is cancelled, then commits and leaves the
/// group. A message is acknowledged only after it succeeded or was given up on.
pub async fn run_stage<H: Handler>(
    stage: &str,
    consumer: Consumer,
    handler: H,
    retry: RetryPolicy,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), mediaflow_bus::BusError> {
    tracing::info!(stage, group = consumer.group(), "stage started");
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            d = consumer.recv() => d,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                // Consumer errors (broker briefly unreachable) are reported, librdkafka reconnects.
                tracing::warn!(stage, error = %e, "consumer error");
                metrics.stage_error(stage, "consumer");
                continue;
            }
        };
        let started = std::time::Instant::now();
        let outcome = process(stage, &delivery, &handler, retry, &metrics, &shutdown).await;
        match outcome {
            Outcome::Done(result) => {
                metrics.stage_processed(stage, result, started.elapsed());
                if let Err(e) = consumer.ack(&delivery) {
                    // The offset could not be stored (the partition was revoked meanwhile): the
                    // message will be redelivered, and its effects are idempotent.
                    tracing::warn!(stage, error = %e, "could not store offset");
                    metrics.stage_error(stage, "ack");
                }
            }
            // Shutting down mid-retry: leave the message unacknowledged; it is redelivered.
            Outcome::Interrupted => break,
        }
    }
    consumer.close()?;
    tracing::info!(stage, "stage stopped");
    Ok(())
}

enum Outcome {
    Done(&'static str),
    Interrupted,
}

/// Runs the handler until the message succeeds or fails for good. Transient failures are retried
/// with backoff for as long as they last: a message is never acknowledged because a dependency
/// was down. A failure for good is handed to `give_up`, and acknowledged only once that
/// succeeded.
async fn process<H: Handler>(
    stage: &str,
    delivery: &Delivery,
    handler: &H,
    retry: RetryPolicy,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Outcome {
    let event = match &delivery.event {
        Ok(e) => e,
        Err(why) => {
            let err = StageError::bad_input(format!(
                "message {}/{}@{} is not a CloudEvent: {why}",
                delivery.topic, delivery.partition, delivery.offset
            ));
            tracing::warn!(stage, error = %err, "malformed message");
            return give_up(stage, handler, None, err, retry, metrics, shutdown).await;
        }
    };
    let mut attempt = 0;
    loop {
        let err = match handler.handle(event).await {
            Ok(()) => return Outcome::Done("ok"),
            Err(err) => err,
        };
        if err.class != ErrorClass::Transient {
            tracing::warn!(stage, id = event.id(), error = %err, "giving up");
            return give_up(stage, handler, Some(event), err, retry, metrics, shutdown).await;
        }
        let wait = retry.backoff(attempt);
        attempt += 1;
        tracing::warn!(stage, id = event.id(), attempt, error = %err, ?wait, "retrying");
        metrics.stage_error(stage, "retry");
        if !backoff(wait, shutdown).await {
            return Outcome::Interrupted;
        }
    }
}

/// Records a failure for good through the handler, retrying while recording itself fails.
async fn give_up<H: Handler>(
    stage: &str,
    handler: &H,
    event: Option<&Event>,
    err: StageError,
    retry: RetryPolicy,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Outcome {
    let mut attempt = 0;
    loop {
        match handler.give_up(event, &err).await {
            Ok(()) => return Outcome::Done(err.class.as_str()),
            Err(e) => {
                let wait = retry.backoff(attempt);
                attempt += 1;
                tracing::error!(stage, error = %e, attempt, ?wait, "could not record a failure");
                metrics.stage_error(stage, "give_up");
                if !backoff(wait, shutdown).await {
                    return Outcome::Interrupted;
                }
            }
        }
    }
}

/// Waits `wait`; false if shutdown came first.
async fn backoff(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

use cloudevents::AttributesReader as _;

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

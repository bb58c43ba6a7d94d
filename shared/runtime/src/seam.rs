//! The runtime's seam to the bus: where a stage's messages come from (`Source`) and where its
//! dead letters go (`Sink`). The bus's `Consumer` and `Publisher` are the real ones; the unit
//! tests of the consume loop use in-memory ones, with no broker and with paused time.

use cloudevents::Event;
use futures::future::BoxFuture;
use mediaflow_bus::{BusError, Consumer, Delivery, Publisher};

use crate::{Bound, StageError};

/// A stage's input: a consumer-group member's view of its partitions.
pub trait Source: Send + Sync + 'static {
    /// The consumer group.
    fn group(&self) -> &str;
    /// The next message. `BusError::Fatal` means the source can never deliver again.
    fn recv(&self) -> BoxFuture<'_, Result<Delivery, BusError>>;
    /// Stores `next` (one past the last finished offset) as the position to commit.
    fn store(&self, topic: &str, partition: i32, next: i64) -> Result<(), BusError>;
    /// Stops fetching from every assigned partition (while `recv` keeps the membership alive).
    fn pause_all(&self) -> Result<(), BusError>;
    /// Fetches again from every assigned partition.
    fn resume_all(&self) -> Result<(), BusError>;
    /// The partitions held now.
    fn assignment(&self) -> Result<Vec<(String, i32)>, BusError>;
    /// Commits every stored position and leaves.
    fn close(&self) -> Result<(), BusError>;
}

impl Source for Consumer {
    fn group(&self) -> &str {
        Consumer::group(self)
    }
    fn recv(&self) -> BoxFuture<'_, Result<Delivery, BusError>> {
        Box::pin(Consumer::recv(self))
    }
    fn store(&self, topic: &str, partition: i32, next: i64) -> Result<(), BusError> {
        Consumer::store(self, topic, partition, next)
    }
    fn pause_all(&self) -> Result<(), BusError> {
        Consumer::pause_all(self)
    }
    fn resume_all(&self) -> Result<(), BusError> {
        Consumer::resume_all(self)
    }
    fn assignment(&self) -> Result<Vec<(String, i32)>, BusError> {
        Consumer::assignment(self)
    }
    fn close(&self) -> Result<(), BusError> {
        Consumer::close(self)
    }
}

/// Where a stage publishes: events acknowledged by the broker before the future resolves.
pub trait Sink: Send + Sync + 'static {
    /// The CloudEvents `source` of what this sink publishes.
    fn source(&self) -> &str;
    /// Publishes `event` on `topic` with partition key `key`.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), BusError>>;
}

impl Sink for Publisher {
    fn source(&self) -> &str {
        Publisher::source(self)
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.publish_event(topic, key, event).await?;
            Ok(())
        })
    }
}

/// Where a stage's progress on the entities its events are about is recorded (a media item's
/// per-stage status). A failed `done` fails the attempt as a handler error would (tried again
/// when transient); `failed` is tried until it succeeds; a failed `running` is only logged.
pub trait Tracker: Send + Sync + 'static {
    /// `stage` has been working on `input` for a while (`RUNNING_AFTER`): work that finishes
    /// sooner goes from queued to done without it, a write saved per message.
    fn running<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
    ) -> BoxFuture<'a, Result<(), StageError>>;
    /// `outputs` are about to be published by something other than a stage's handler (a
    /// coordinated stage's relay): the stages that read their topics have work queued.
    fn queued<'a>(&'a self, outputs: &'a [Bound]) -> BoxFuture<'a, Result<(), StageError>>;
    /// `stage` finished with `input` and is about to publish `outputs`: in one step, the
    /// stages that read their topics have work queued and `stage` is done with `input`.
    fn done<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
        outputs: &'a [Bound],
    ) -> BoxFuture<'a, Result<(), StageError>>;
    /// `stage` gave up on `input` for `error`.
    fn failed<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
        error: &'a StageError,
    ) -> BoxFuture<'a, Result<(), StageError>>;
}

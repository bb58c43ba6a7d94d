//! Each stage's own state for each media item and work item, recorded by the runtime through
//! this `Tracker`: queued when an event about the entity is published on a topic the stage
//! reads (the pipeline says which stages read which topic), running, then done or failed. The
//! entity's status is derived from those rows in the database, so with several stages reading
//! one queue a media item is done only when every one of them is, and failed (with the stage
//! and its reason) when one gave up.
//!
//! Which entity an event is about comes from its type: the media events (`mediaflow.media.*`,
//! `mediaflow.image.processed`, `mediaflow.image.redacted`, `mediaflow.video.processed`,
//! `mediaflow.media.completed`) are about the media item their
//! subject names, work items and their results about the item. Other events (a linking stage's
//! own traffic) are about no entity and cost no database write.

use std::collections::HashMap;

use cloudevents::{AttributesReader, Event};
use futures::future::BoxFuture;
use mediaflow_db::{Db, Entity, StageState};
use mediaflow_events::{
    EventData, ImageProcessed, ImageRedacted, ItemProcessed, MediaCompleted, MediaProcessed,
    MediaUploaded, VideoProcessed, WorkItem,
};
use mediaflow_runtime::{Bound, StageError, Tracker};

use super::wiring::Topology;

/// The tracker of one process: the database, and which stages read each topic (under the
/// prefix).
pub(crate) struct StageStatus {
    db: Db,
    readers: HashMap<String, Vec<String>>,
}

impl StageStatus {
    pub(crate) fn new(db: Db, topology: &Topology, prefix: &str) -> Self {
        let mut readers: HashMap<String, Vec<String>> = HashMap::new();
        for stage in &topology.stages {
            for input in &stage.inputs {
                readers
                    .entry(format!("{prefix}{input}"))
                    .or_default()
                    .push(stage.name.clone());
            }
        }
        Self { db, readers }
    }

    async fn set(
        &self,
        stage: &str,
        input: &Event,
        state: StageState,
        error: Option<&str>,
    ) -> Result<(), StageError> {
        let Some(entity) = entity(input) else {
            return Ok(());
        };
        self.db
            .set_stage_state(entity, stage, state, error)
            .await
            .map_err(db_error)
    }
}

/// The media item or work item `event` is about, if any.
fn entity(event: &Event) -> Option<Entity<'_>> {
    let subject = event.subject()?;
    match event.ty() {
        MediaUploaded::TYPE
        | ImageProcessed::TYPE
        | ImageRedacted::TYPE
        | VideoProcessed::TYPE
        | MediaProcessed::TYPE
        | MediaCompleted::TYPE => Some(Entity::Media(subject)),
        WorkItem::TYPE | ItemProcessed::TYPE => Some(Entity::Item(subject)),
        _ => None,
    }
}

fn db_error(e: mediaflow_db::DbError) -> StageError {
    StageError::dependency(e.is_transient(), format!("recording stage status: {e}"))
}

impl Tracker for StageStatus {
    fn running<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.set(stage, input, StageState::Running, None))
    }

    fn queued<'a>(&'a self, outputs: &'a [Bound]) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async move {
            for output in outputs {
                let (Some(entity), Some(stages)) =
                    (entity(&output.event), self.readers.get(&output.topic))
                else {
                    continue;
                };
                self.db
                    .queue_stages(entity, stages)
                    .await
                    .map_err(db_error)?;
            }
            Ok(())
        })
    }

    fn done<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.set(stage, input, StageState::Done, None))
    }

    fn failed<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
        error: &'a StageError,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async move {
            let why = error.to_string();
            self.set(stage, input, StageState::Failed, Some(&why)).await
        })
    }
}

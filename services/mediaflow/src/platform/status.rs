//! Each stage's own state for each media item and work item, recorded by the runtime through
//! this `Tracker`: queued when an event about the entity is published on a topic the stage
//! reads (the pipeline says which stages read which topic), running (once it has worked on one
//! for `RUNNING_AFTER`), then done or failed; done with one event while another is still on its
//! way to it, queued again. A stage done with an event queues the readers of what it is about
//! to publish in the same transaction. The
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
use mediaflow_db::{Db, Entity, Queued, StageState};
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
            .set_stage_state(entity, stage, input.id(), state, error)
            .await
            .map_err(db_error)
    }

    /// Each of `outputs` with the stages that read its topic and the entity it is about.
    fn readers<'a>(
        &'a self,
        outputs: &'a [Bound],
    ) -> impl Iterator<Item = (Entity<'a>, Queued<'a>)> + 'a {
        outputs.iter().filter_map(|output| {
            let entity = entity(&output.event)?;
            let stages = self.readers.get(&output.topic)?;
            Some((
                entity,
                Queued {
                    event_id: output.event.id(),
                    stages,
                },
            ))
        })
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
            for (entity, q) in self.readers(outputs) {
                self.db
                    .queue_stages(entity, q.event_id, q.stages)
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
        outputs: &'a [Bound],
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async move {
            let about = entity(input);
            // Outputs about the input's entity are queued in the step that finishes it (one
            // transaction); any about another entity first, on their own.
            let mut same = Vec::new();
            for (entity, q) in self.readers(outputs) {
                if Some(entity) == about {
                    same.push(q);
                } else {
                    self.db
                        .queue_stages(entity, q.event_id, q.stages)
                        .await
                        .map_err(db_error)?;
                }
            }
            let Some(about) = about else {
                return Ok(());
            };
            self.db
                .stage_done(about, stage, input.id(), &same)
                .await
                .map_err(db_error)
        })
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

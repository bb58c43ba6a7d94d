//! The router stage: consumes `media.uploaded` and copies each event to the work queue of its
//! kind (`jobs.image` or `jobs.video`), keyed by media id. One in, one out.

use cloudevents::Event;
use mediaflow_bus::{Bus, BusError, Publisher};
use mediaflow_events::{MediaKind, MediaUploaded, Topics};
use mediaflow_runtime::{Handler, StageError};

/// The stage name, also its consumer group.
pub const STAGE: &str = "router";

/// Routes uploads to work queues.
#[derive(Debug)]
pub struct Router {
    publisher: Publisher,
    topics: Topics,
}

impl Router {
    pub fn new(bus: &Bus) -> Result<Self, BusError> {
        Ok(Self {
            publisher: bus.publisher("/mediaflow/router")?,
            topics: bus.topics(),
        })
    }

    /// The topic this stage reads.
    pub fn input_topics(bus: &Bus) -> Vec<String> {
        vec![bus.topics().media_uploaded()]
    }

    fn destination(&self, kind: MediaKind) -> String {
        match kind {
            MediaKind::Image => self.topics.jobs_image(),
            MediaKind::Video => self.topics.jobs_video(),
        }
    }
}

impl Handler for Router {
    async fn handle(&self, event: &Event) -> Result<(), StageError> {
        let upload: MediaUploaded =
            mediaflow_events::decode(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        let topic = self.destination(upload.kind);
        self.publisher
            .publish(&topic, &upload)
            .await
            .map_err(|e| StageError::dependency(e.is_transient(), e.to_string()))?;
        Ok(())
    }

    async fn give_up(&self, _event: Option<&Event>, _error: &StageError) -> Result<(), StageError> {
        // The runtime has logged and counted it; the upload stays `queued`, visible in the API.
        Ok(())
    }
}

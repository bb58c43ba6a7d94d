//! The exec worker: the book's one-shot worker interface (ch. 10) as a stage. It takes any event
//! from the topics it is declared on and for each runs a configured command with
//!
//! - `WORK_ITEM_FILE`: a file holding the item's JSON: the event's data (for a work item from a
//!   source, `mediaflow.work.item`, the item's own `data` exactly as the source served it),
//! - `EVENT_FILE`: the whole CloudEvent (JSON, structured mode), and `EVENT_TYPE`,
//! - `INPUT_FILE`, when the event refers to an object (an upload's `object`, a result's
//!   `input`): that object, downloaded,
//! - `OUTPUT_DIR`: an empty folder; every regular file the command leaves there is uploaded under
//!   a deterministic key, recorded as a result and announced on the stage's port `out` as a
//!   `mediaflow.media.processed` (events about a media item: their data has a `media_id`) or a
//!   `mediaflow.item.processed` event (anything else: work items, events of other systems),
//! - `STAGE`, and `MEDIA_ID` (media) or `ITEM_ID` and `ITEM_NAME` (items).
//!
//! Exit status 0 is success; 75 (`EX_TEMPFAIL`) a transient failure, retried; 65 (`EX_DATAERR`)
//! bad input; anything else, a signal or the timeout, a permanent failure.

pub mod command;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use cloudevents::{AttributesReader, Data, Event};
use mediaflow_db::{Db, Entity};
use mediaflow_events::{EventData, ItemProcessed, MediaProcessed, ObjectRef, Output, WorkItem};
use mediaflow_outputs::Outputs;
use mediaflow_runtime::{Handler, Output as OutputEvent, StageError};
use mediaflow_store::ObjectStore;
use serde::{Deserialize, Serialize};

use command::io_error;
pub use command::{EXIT_BAD_INPUT, EXIT_TRANSIENT};

/// One exec stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecWorkerConfig {
    /// Stage name: its consumer group, part of its output keys, and `mediaflow run <name>`.
    /// (A stage declared in a pipeline file takes the declared name.)
    #[serde(default)]
    pub name: String,
    /// The command and its arguments; run without a shell.
    pub command: Vec<String>,
    /// Topic the stage reads, without prefix (e.g. `jobs.image`).
    #[serde(default = "default_input")]
    pub input_topic: String,
    /// Bump when the command's output for the same input changes; part of every output key.
    #[serde(default = "default_version")]
    pub version: String,
    /// Longest run of the command, in seconds; it is killed after that (a permanent failure).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Largest input downloaded, in bytes.
    #[serde(default = "default_max_input")]
    pub max_input_bytes: u64,
    /// Most output files, and largest total output, in bytes.
    #[serde(default = "default_max_outputs")]
    pub max_outputs: usize,
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: u64,
}

fn default_input() -> String {
    "jobs.image".into()
}
fn default_version() -> String {
    "1".into()
}
fn default_timeout() -> u64 {
    600
}
fn default_max_input() -> u64 {
    1 << 30
}
fn default_max_outputs() -> usize {
    100
}
fn default_max_output_bytes() -> u64 {
    1 << 30
}

/// The exec stage's handler.
#[derive(Debug)]
pub struct ExecWorker {
    config: ExecWorkerConfig,
    /// Bounds the inputs on local disk at once, whatever the concurrency.
    budget: mediaflow_outputs::InputBudget,
    work_dir: PathBuf,
    store: ObjectStore,
    outputs: Outputs,
    db: Db,
}

/// What an exec stage works on, read from any event.
struct Job {
    /// The media item or item the event is about, and what the result event says of it.
    about: About,
    /// What `WORK_ITEM_FILE` holds.
    work_item: serde_json::Value,
    /// The object the event refers to, downloaded as `INPUT_FILE`.
    input: Option<ObjectRef>,
}

enum About {
    Media(String),
    Item {
        id: String,
        source: String,
        name: String,
    },
}

impl Job {
    /// A media item's event when its data has a `media_id`; a work item's own `data`; any
    /// other event as an item named by its subject (else its id).
    fn from_event(event: &Event) -> Result<Self, StageError> {
        let bad = |e: mediaflow_events::EventError| StageError::bad_input(e.to_string());
        if event.ty() == WorkItem::TYPE {
            let item: WorkItem = mediaflow_events::decode(event).map_err(bad)?;
            return Ok(Job {
                about: About::Item {
                    id: item.item_id,
                    source: item.source,
                    name: item.name,
                },
                work_item: item.data,
                input: None,
            });
        }
        // Text that is not JSON is handed over as a JSON string; other unreadable data is bad
        // input.
        let data = match mediaflow_events::data_json(event) {
            Ok(data) => data,
            Err(mediaflow_events::EventError::NoData { .. }) => serde_json::Value::Null,
            Err(e) => match event.data() {
                Some(Data::String(text)) => serde_json::Value::String(text.clone()),
                _ => return Err(StageError::bad_input(e.to_string())),
            },
        };
        let media_id = data
            .get("media_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let input = ObjectRef::referenced_by(&data);
        let about = match media_id {
            Some(id) => About::Media(id),
            None => About::Item {
                id: event.subject().unwrap_or(event.id()).to_owned(),
                source: event.source().to_string(),
                name: event.ty().to_owned(),
            },
        };
        Ok(Job {
            about,
            work_item: data,
            input,
        })
    }

    fn entity(&self) -> Entity<'_> {
        match &self.about {
            About::Media(id) => Entity::Media(id),
            About::Item { id, .. } => Entity::Item(id),
        }
    }
}

impl ExecWorker {
    pub fn new(config: ExecWorkerConfig, work_dir: PathBuf, store: ObjectStore, db: Db) -> Self {
        Self {
            outputs: Outputs::new(store.clone(), &config.name, &config.version),
            budget: mediaflow_outputs::InputBudget::for_inputs_up_to(config.max_input_bytes),
            config,
            work_dir,
            store,
            db,
        }
    }
}

impl Handler for ExecWorker {
    async fn handle(&self, event: &Event) -> Result<Vec<OutputEvent>, StageError> {
        let job = Job::from_event(event)?;
        let _room = match &job.input {
            Some(object) => Some(self.budget.take(object.size).await?),
            None => None,
        };
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| io_error("creating the work folder", e))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", self.config.name))
            .tempdir_in(&self.work_dir)
            .map_err(|e| io_error("creating a work folder", e))?;
        let item_file = dir.path().join("item.json");
        let event_file = dir.path().join("event.json");
        let out = dir.path().join("out");
        let item_json = serde_json::to_vec_pretty(&job.work_item).unwrap_or_default();
        tokio::fs::write(&item_file, item_json)
            .await
            .map_err(|e| io_error("writing the work item", e))?;
        let event_json = serde_json::to_vec_pretty(event).unwrap_or_default();
        tokio::fs::write(&event_file, event_json)
            .await
            .map_err(|e| io_error("writing the event", e))?;
        tokio::fs::create_dir(&out)
            .await
            .map_err(|e| io_error("creating the output folder", e))?;
        let input = match &job.input {
            Some(object) => {
                let ext = object.key.rsplit_once('.').map_or("bin", |(_, e)| e);
                let input = dir.path().join(format!("input.{ext}"));
                mediaflow_outputs::download(
                    &self.store,
                    object,
                    &input,
                    self.config.max_input_bytes,
                )
                .await?;
                Some(input)
            }
            None => None,
        };

        let stage = &self.config.name;
        let mut env: Vec<(&str, &OsStr)> = vec![
            ("WORK_ITEM_FILE", item_file.as_os_str()),
            ("EVENT_FILE", event_file.as_os_str()),
            ("EVENT_TYPE", OsStr::new(event.ty())),
            ("OUTPUT_DIR", out.as_os_str()),
            ("STAGE", OsStr::new(stage)),
        ];
        if let Some(input) = &input {
            env.push(("INPUT_FILE", input.as_os_str()));
        }
        match &job.about {
            About::Media(id) => env.push(("MEDIA_ID", OsStr::new(id))),
            About::Item { id, name, .. } => {
                env.push(("ITEM_ID", OsStr::new(id)));
                env.push(("ITEM_NAME", OsStr::new(name)));
            }
        }
        let timeout = Duration::from_secs(self.config.timeout_secs);
        command::run(&self.config.command, dir.path(), &env, timeout).await?;

        let files = command::output_files(
            &out,
            self.config.max_outputs,
            self.config.max_output_bytes,
            &[],
        )
        .await?;
        let mut rows = Vec::new();
        let mut outputs = Vec::new();
        for file in files {
            let bytes = tokio::fs::read(&file.path)
                .await
                .map_err(|e| io_error("reading an output", e))?;
            let content_type = command::content_type_of(&file.name);
            let written = self
                .outputs
                .put_for(
                    job.entity(),
                    &file.name,
                    &file.name,
                    bytes,
                    content_type,
                    None,
                )
                .await?;
            rows.push(written.row);
            outputs.push(Output {
                name: file.name,
                object: written.object,
            });
        }
        self.db
            .record_results(job.entity(), &rows)
            .await
            .map_err(mediaflow_outputs::db_error)?;
        let version = &self.config.version;
        let result = match job.about {
            About::Media(media_id) => OutputEvent::data(
                "out",
                &MediaProcessed {
                    media_id,
                    stage: stage.clone(),
                    stage_version: version.clone(),
                    input: job.input,
                    outputs,
                    steps: Vec::new(),
                },
            ),
            About::Item { id, source, name } => OutputEvent::data(
                "out",
                &ItemProcessed {
                    item_id: id,
                    source,
                    name,
                    stage: stage.clone(),
                    stage_version: version.clone(),
                    outputs,
                },
            ),
        };
        Ok(vec![result?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_apply() {
        let c: ExecWorkerConfig =
            serde_json::from_str(r#"{"name": "x", "command": ["true"]}"#).unwrap();
        assert_eq!(
            (c.input_topic.as_str(), c.version.as_str(), c.timeout_secs),
            ("jobs.image", "1", 600)
        );
    }
}

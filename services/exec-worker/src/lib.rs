//! The exec worker: the book's one-shot worker interface (ch. 10) as a stage. It takes uploads
//! (`mediaflow.media.uploaded`) or work items from a source (`mediaflow.work.item`) and for each
//! runs a configured command with
//!
//! - `WORK_ITEM_FILE`: a file holding the item's JSON: the upload event's payload, or the work
//!   item's `data` exactly as the source served it,
//! - `INPUT_FILE` (uploads): the uploaded object, downloaded,
//! - `OUTPUT_DIR`: an empty folder; every regular file the command leaves there is uploaded under
//!   a deterministic key, recorded as a result and announced on the stage's port `out` as a
//!   `mediaflow.media.processed` (uploads) or `mediaflow.item.processed` (work items) event,
//! - `STAGE`, and `MEDIA_ID` (uploads) or `ITEM_ID` and `ITEM_NAME` (work items).
//!
//! Exit status 0 is success; 75 (`EX_TEMPFAIL`) a transient failure, retried; 65 (`EX_DATAERR`)
//! bad input; anything else, a signal or the timeout, a permanent failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cloudevents::AttributesReader;
use cloudevents::Event;
use futures::StreamExt;
use mediaflow_db::{Db, Entity, ResultRow};
use mediaflow_events::{
    EventData, ItemProcessed, MediaProcessed, MediaUploaded, ObjectRef, Output, WorkItem,
};
use mediaflow_runtime::{Handler, Output as OutputEvent, StageError};
use mediaflow_store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Exit status for "try again later" (sysexits `EX_TEMPFAIL`).
pub const EXIT_TRANSIENT: i32 = 75;
/// Exit status for "this input is unusable" (sysexits `EX_DATAERR`).
pub const EXIT_BAD_INPUT: i32 = 65;

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
    work_dir: PathBuf,
    store: ObjectStore,
    db: Db,
}

/// A job's process group: every process in it is killed when this is dropped, so nothing a
/// command started outlives its job.
struct ProcessGroup(rustix::process::Pid);

impl ProcessGroup {
    fn of(leader: u32) -> Option<Self> {
        rustix::process::Pid::from_raw(i32::try_from(leader).ok()?).map(Self)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Fails with ESRCH when the group is already gone: nothing left to stop.
        let _ = rustix::process::kill_process_group(self.0, rustix::process::Signal::KILL);
    }
}

/// What an exec stage works on.
enum Job {
    Media(MediaUploaded),
    Item(WorkItem),
}

impl Job {
    fn from_event(event: &Event) -> Result<Self, StageError> {
        let bad = |e: mediaflow_events::EventError| StageError::bad_input(e.to_string());
        match event.ty() {
            MediaUploaded::TYPE => Ok(Job::Media(mediaflow_events::decode(event).map_err(bad)?)),
            WorkItem::TYPE => Ok(Job::Item(mediaflow_events::decode(event).map_err(bad)?)),
            other => Err(StageError::bad_input(format!(
                "an exec stage takes `{}` or `{}` events, not `{other}`",
                MediaUploaded::TYPE,
                WorkItem::TYPE
            ))),
        }
    }

    fn entity(&self) -> Entity<'_> {
        match self {
            Job::Media(m) => Entity::Media(&m.media_id),
            Job::Item(i) => Entity::Item(&i.item_id),
        }
    }

    /// What `WORK_ITEM_FILE` holds.
    fn work_item(&self) -> serde_json::Value {
        match self {
            Job::Media(m) => serde_json::to_value(m).unwrap_or_default(),
            Job::Item(i) => i.data.clone(),
        }
    }
}

/// Where output `name` of `entity` is written by stage `stage` at `version`.
fn output_key(entity: Entity<'_>, stage: &str, version: &str, name: &str) -> String {
    match entity {
        Entity::Media(id) => format!("derived/{id}/{stage}/v{version}/{name}"),
        Entity::Item(id) => format!("derived/items/{id}/{stage}/v{version}/{name}"),
    }
}

fn store_error(e: StoreError) -> StageError {
    match e {
        StoreError::TooLarge { .. } => StageError::bad_input(e.to_string()),
        e => StageError::dependency(e.is_transient(), e.to_string()),
    }
}

fn io_error(what: &str, e: std::io::Error) -> StageError {
    // Local disk trouble (full, permissions) is not the item's fault and may pass.
    StageError::transient(format!("{what}: {e}"))
}

fn content_type_of(name: &str) -> &'static str {
    match name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .as_deref()
    {
        Some("json") => "application/json",
        Some("txt" | "log") => "text/plain",
        Some("vtt") => "text/vtt",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

impl ExecWorker {
    pub fn new(config: ExecWorkerConfig, work_dir: PathBuf, store: ObjectStore, db: Db) -> Self {
        Self {
            config,
            work_dir,
            store,
            db,
        }
    }

    async fn download(&self, object: &ObjectRef, to: &Path) -> Result<(), StageError> {
        let key = &object.key;
        // The original may live in another bucket (a backfilled one).
        let object = self
            .store
            .in_bucket(&object.bucket)
            .get_stream(key)
            .await
            .map_err(store_error)?;
        if let Some(size) = object.size
            && size > self.config.max_input_bytes
        {
            return Err(StageError::bad_input(format!(
                "input `{key}` is {size} bytes, over the limit of {}",
                self.config.max_input_bytes
            )));
        }
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| io_error("creating the input file", e))?;
        let mut body = object.body;
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| StageError::transient(format!("downloading `{key}`: {e}")))?;
            written += chunk.len() as u64;
            if written > self.config.max_input_bytes {
                return Err(StageError::bad_input(format!(
                    "input `{key}` is over the limit of {} bytes",
                    self.config.max_input_bytes
                )));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| io_error("writing the input file", e))?;
        }
        file.flush()
            .await
            .map_err(|e| io_error("writing the input file", e))
    }

    /// Runs the command; maps its exit to a result.
    async fn run(
        &self,
        job: &Job,
        dir: &Path,
        item: &Path,
        input: Option<&Path>,
        out: &Path,
    ) -> Result<(), StageError> {
        let (program, args) = self.config.command.split_first().ok_or_else(|| {
            StageError::permanent(format!(
                "exec stage {} has an empty command",
                self.config.name
            ))
        })?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .current_dir(dir)
            .env("WORK_ITEM_FILE", item)
            .env("OUTPUT_DIR", out)
            .env("STAGE", &self.config.name);
        if let Some(input) = input {
            command.env("INPUT_FILE", input);
        }
        match job {
            Job::Media(m) => command.env("MEDIA_ID", &m.media_id),
            Job::Item(i) => command.env("ITEM_ID", &i.item_id).env("ITEM_NAME", &i.name),
        };
        // The command runs in a process group of its own, so whatever it starts ends with it.
        let mut child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StageError::permanent(format!("cannot run `{program}`: {e}")))?;
        // Kills the whole group when the job ends, times out or is abandoned (drain deadline).
        let group = child.id().and_then(ProcessGroup::of);
        let mut pipe = child.stderr.take().expect("stderr is piped");
        // Read all of stderr (so the child never blocks on a full pipe), keep the end.
        let reading = tokio::spawn(async move {
            let mut text = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                text.extend_from_slice(&buf[..n]);
                if text.len() > 16 * 1024 {
                    text.drain(..text.len() - 4 * 1024);
                }
            }
            text
        });
        let timeout = Duration::from_secs(self.config.timeout_secs);
        let waited = tokio::time::timeout(timeout, child.wait()).await;
        // The command is over: what it left running in the background goes too (and with it
        // the last holders of its stderr).
        drop(group);
        let stderr = reading.await.unwrap_or_default();
        let status = match waited {
            Ok(status) => status
                .map_err(|e| StageError::permanent(format!("waiting for `{program}`: {e}")))?,
            Err(_) => {
                return Err(StageError::permanent(format!(
                    "`{program}` did not finish within {} s and was killed",
                    self.config.timeout_secs
                )));
            }
        };
        let tail = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(1024)..])
            .trim()
            .to_owned();
        let said = if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        };
        match status.code() {
            Some(0) => Ok(()),
            Some(EXIT_TRANSIENT) => Err(StageError::transient(format!(
                "`{program}` exited {EXIT_TRANSIENT} (try again){said}"
            ))),
            Some(EXIT_BAD_INPUT) => Err(StageError::bad_input(format!(
                "`{program}` exited {EXIT_BAD_INPUT} (bad input){said}"
            ))),
            Some(code) => Err(StageError::permanent(format!(
                "`{program}` exited {code}{said}"
            ))),
            None => Err(StageError::permanent(format!(
                "`{program}` was killed by a signal ({status}){said}"
            ))),
        }
    }

    /// The regular files the command left in `out`, sorted, within the output limits.
    async fn outputs(&self, out: &Path) -> Result<Vec<(String, PathBuf, u64)>, StageError> {
        let mut entries = tokio::fs::read_dir(out)
            .await
            .map_err(|e| io_error("reading the output folder", e))?;
        let mut files = Vec::new();
        let mut total = 0;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| io_error("reading the output folder", e))?
        {
            // Symlinks and folders are not followed: only files the command wrote count.
            let meta = tokio::fs::symlink_metadata(entry.path())
                .await
                .map_err(|e| io_error("reading an output", e))?;
            if !meta.is_file() {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(StageError::permanent("an output file name is not UTF-8"));
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                || name.starts_with('.')
            {
                return Err(StageError::permanent(format!(
                    "output file name `{name}` is not allowed (letters, digits, `.`, `_`, `-`)"
                )));
            }
            total += meta.len();
            files.push((name, entry.path(), meta.len()));
        }
        if files.len() > self.config.max_outputs || total > self.config.max_output_bytes {
            return Err(StageError::permanent(format!(
                "the command wrote {} files, {total} bytes; limits: {} files, {} bytes",
                files.len(),
                self.config.max_outputs,
                self.config.max_output_bytes
            )));
        }
        files.sort();
        Ok(files)
    }
}

impl Handler for ExecWorker {
    async fn handle(&self, event: &Event) -> Result<Vec<OutputEvent>, StageError> {
        let job = Job::from_event(event)?;
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| io_error("creating the work folder", e))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", self.config.name))
            .tempdir_in(&self.work_dir)
            .map_err(|e| io_error("creating a work folder", e))?;
        let item_file = dir.path().join("item.json");
        let out = dir.path().join("out");
        tokio::fs::write(
            &item_file,
            serde_json::to_vec_pretty(&job.work_item()).unwrap_or_default(),
        )
        .await
        .map_err(|e| io_error("writing the work item", e))?;
        tokio::fs::create_dir(&out)
            .await
            .map_err(|e| io_error("creating the output folder", e))?;
        let input = match &job {
            Job::Media(upload) => {
                let ext = upload.object.key.rsplit_once('.').map_or("bin", |(_, e)| e);
                let input = dir.path().join(format!("input.{ext}"));
                self.download(&upload.object, &input).await?;
                Some(input)
            }
            Job::Item(_) => None,
        };

        self.run(&job, dir.path(), &item_file, input.as_deref(), &out)
            .await?;

        let stage = &self.config.name;
        let version = &self.config.version;
        let mut rows = Vec::new();
        let mut outputs = Vec::new();
        for (name, path, size) in self.outputs(&out).await? {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| io_error("reading an output", e))?;
            let sha256: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let key = output_key(job.entity(), stage, version, &name);
            let content_type = content_type_of(&name);
            self.store
                .put_bytes(&key, bytes::Bytes::from(bytes), content_type)
                .await
                .map_err(store_error)?;
            rows.push(ResultRow {
                entity_id: job.entity().id().to_owned(),
                stage: stage.clone(),
                stage_version: version.clone(),
                name: name.clone(),
                bucket: self.store.bucket().to_owned(),
                object_key: key.clone(),
                content_type: content_type.to_owned(),
                size_bytes: size as i64,
                sha256: sha256.clone(),
                width: None,
                height: None,
            });
            outputs.push(Output {
                name,
                object: ObjectRef {
                    bucket: self.store.bucket().to_owned(),
                    key,
                    size,
                    sha256,
                    content_type: content_type.to_owned(),
                },
            });
        }
        self.db
            .record_results(job.entity(), &rows)
            .await
            .map_err(|e| StageError::dependency(e.is_transient(), e.to_string()))?;
        let result = match job {
            Job::Media(upload) => {
                let result = MediaProcessed {
                    media_id: upload.media_id,
                    stage: stage.clone(),
                    stage_version: version.clone(),
                    input: upload.object,
                    outputs,
                };
                OutputEvent::data("out", &result)
            }
            Job::Item(item) => {
                let result = ItemProcessed {
                    item_id: item.item_id,
                    source: item.source,
                    name: item.name,
                    stage: stage.clone(),
                    stage_version: version.clone(),
                    outputs,
                };
                OutputEvent::data("out", &result)
            }
        };
        Ok(vec![result?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_types() {
        assert_eq!(
            output_key(Entity::Media("m"), "exif", "2", "a.json"),
            "derived/m/exif/v2/a.json"
        );
        assert_eq!(
            output_key(Entity::Item("i"), "exif", "2", "a.json"),
            "derived/items/i/exif/v2/a.json"
        );
        assert_eq!(content_type_of("A.JPG"), "image/jpeg");
        assert_eq!(content_type_of("noext"), "application/octet-stream");
    }

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

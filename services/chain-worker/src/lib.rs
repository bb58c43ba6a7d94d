//! Multi-worker chains: the book's aggregator (ch. 10). A chain stage runs reusable workers in
//! order on one media item in one process: the input is downloaded once, then each step works on
//! the local file (a step may replace it: a blur, a conversion) and sees the results of the steps
//! before it. Every file a step writes is stored under
//! `derived/<media_id>/<stage>/v<version>/<step>/<file>` and recorded as result `<step>.<file>`;
//! the stage's port `out` carries one `mediaflow.media.processed` with every output and each
//! step's result.
//!
//! A worker is declared once ([`WorkerKind`]) and used by name in any number of chains and
//! pipelines:
//!
//! ```yaml
//! - name: photos
//!   kind: chain
//!   inputs: [jobs.image]
//!   outputs: { out: photos.processed }
//!   config:
//!     steps:
//!       - worker: probe
//!       - worker: thumbnail
//!         config: { renditions: [{ name: small, width: 320, height: 320 }] }
//!       - worker: tag
//! ```

pub mod workers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloudevents::{AttributesReader, Event};
use futures::future::BoxFuture;
use mediaflow_db::{Db, Entity};
use mediaflow_events::{MediaKind, MediaProcessed, ObjectRef, Output, RenditionRef, StepResult};
use mediaflow_imaging::renditions::Rendition;
use mediaflow_imaging::{DecodeLimits, Small};
use mediaflow_outputs::{Outputs, Written};
use mediaflow_runtime::{Handler, StageError, on_cpu};
use mediaflow_store::ObjectStore;
use mediaflow_telemetry::Metrics;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A kind of worker: its name in chains, and how a step's `config` makes one.
pub trait WorkerKind: Send + Sync + 'static {
    /// The name steps use (`worker: <name>`).
    fn name(&self) -> &str;

    /// The worker a step's `config` declares (`Value::Null` when it gives none), or what is
    /// wrong with it. Cheap and without effects: it also checks pipeline files.
    fn build(&self, config: &Value) -> Result<Arc<dyn Worker>, String>;
}

/// One step's work on a job.
pub trait Worker: Send + Sync + 'static {
    /// Works on `job` (its current file, the results before it) and returns what it found:
    /// the step's result in the stage's event.
    fn work<'a>(&'a self, job: &'a mut Job) -> BoxFuture<'a, Result<Value, StageError>>;
}

/// The worker kinds chains can use, by name.
#[derive(Clone)]
pub struct Workers {
    kinds: BTreeMap<String, Arc<dyn WorkerKind>>,
}

impl Default for Workers {
    /// `probe`, `thumbnail`, `tag` and `exec`.
    fn default() -> Self {
        Self {
            kinds: BTreeMap::new(),
        }
        .with(workers::Probe)
        .with(workers::Thumbnail)
        .with(workers::Tag)
        .with(workers::Exec)
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

impl Workers {
    /// These workers and `kind` (replacing one of the same name).
    pub fn with(mut self, kind: impl WorkerKind) -> Self {
        self.kinds.insert(kind.name().to_owned(), Arc::new(kind));
        self
    }

    /// The steps `config` declares, each worker built from its settings; the error names the
    /// step and what is wrong.
    pub fn steps(&self, config: &ChainConfig) -> Result<Vec<Step>, String> {
        if config.steps.is_empty() {
            return Err("`steps` is empty: a chain runs at least one worker".into());
        }
        let mut steps: Vec<Step> = Vec::with_capacity(config.steps.len());
        for (i, decl) in config.steps.iter().enumerate() {
            let name = decl.name();
            let at = format!("step {} (`{name}`)", i + 1);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
            {
                return Err(format!("{at}: a step name is letters, digits, `_` and `-`"));
            }
            if steps.iter().any(|s| s.name == name) {
                return Err(format!(
                    "{at}: two steps are named `{name}`; give one a `name`"
                ));
            }
            let kind = self.kinds.get(&decl.worker).ok_or_else(|| {
                let known: Vec<_> = self.kinds.keys().map(String::as_str).collect();
                format!(
                    "{at}: unknown worker `{}` (known: {})",
                    decl.worker,
                    known.join(", ")
                )
            })?;
            let run = kind.build(&decl.config).map_err(|e| format!("{at}: {e}"))?;
            steps.push(Step {
                name: name.to_owned(),
                worker: decl.worker.clone(),
                run,
            });
        }
        Ok(steps)
    }
}

/// Settings of a chain stage (its `config`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// The workers, in order.
    pub steps: Vec<StepDecl>,
    /// Largest input downloaded, in bytes.
    #[serde(default = "default_max_input")]
    pub max_input_bytes: u64,
    /// Limits on images the workers decode.
    #[serde(default)]
    pub image_limits: ImageLimits,
    /// Limits on videos the workers open (duration, size, streams, time per job).
    #[serde(default)]
    pub video_limits: mediaflow_video::Limits,
}

fn default_max_input() -> u64 {
    4 << 30
}

/// One step as declared.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDecl {
    /// The worker it runs.
    pub worker: String,
    /// Its name in the chain, results and output keys; the worker's name when not given.
    #[serde(default)]
    pub name: Option<String>,
    /// The worker's settings.
    #[serde(default)]
    pub config: Value,
}

impl StepDecl {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.worker)
    }
}

/// Limits on decoded images, as the image stage's.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    pub max_side: u32,
    pub max_pixels: u64,
    pub max_frames: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        let d = DecodeLimits::default();
        Self {
            max_side: d.max_side,
            max_pixels: d.max_pixels,
            max_frames: d.max_frames,
        }
    }
}

impl ImageLimits {
    fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.max_side,
            max_pixels: self.max_pixels,
            max_frames: self.max_frames,
            ..DecodeLimits::default()
        }
    }
}

/// A built step.
#[derive(Clone)]
pub struct Step {
    pub name: String,
    pub worker: String,
    run: Arc<dyn Worker>,
}

/// An image decoded once for the steps of a job.
pub struct Decoded {
    /// Oriented as shown; possibly scaled down from the source (sizes are the source's).
    pub image: Small,
    /// A JPEG's EXIF (TIFF) block.
    pub exif: Option<Vec<u8>>,
}

/// One media item going through a chain: what each worker gets.
pub struct Job {
    media_id: String,
    kind: MediaKind,
    stage: String,
    step: String,
    file: PathBuf,
    dir: PathBuf,
    steps: Vec<StepResult>,
    outputs: Outputs,
    written: Vec<(String, Written)>,
    image_limits: DecodeLimits,
    video_limits: mediaflow_video::Limits,
    decoded: Option<Arc<Decoded>>,
}

impl Job {
    pub fn media_id(&self) -> &str {
        &self.media_id
    }

    pub fn kind(&self) -> MediaKind {
        self.kind
    }

    /// The chain stage's name.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// The running step's name.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The local file the step works on: the input, or what an earlier step replaced it with.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The job's folder, removed when the job ends: where a step makes its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The results of the steps before this one.
    pub fn results(&self) -> &[StepResult] {
        &self.steps
    }

    pub fn image_limits(&self) -> &DecodeLimits {
        &self.image_limits
    }

    pub fn video_limits(&self) -> &mediaflow_video::Limits {
        &self.video_limits
    }

    /// The steps after this one work on `path` instead (the media as this step changed it).
    pub fn replace_file(&mut self, path: PathBuf) {
        self.file = path;
        self.decoded = None;
    }

    /// The current file's bytes.
    pub async fn read(&self) -> Result<Vec<u8>, StageError> {
        tokio::fs::read(&self.file)
            .await
            .map_err(|e| StageError::transient(format!("reading the local input: {e}")))
    }

    /// The current file decoded as an image, at no less than `target(width, height)` of the
    /// source: decoded once per file, shared by the steps that need no larger.
    pub async fn image(
        &mut self,
        target: impl Fn(u32, u32) -> (u32, u32) + Send + 'static,
    ) -> Result<Arc<Decoded>, StageError> {
        if let Some(d) = &self.decoded {
            let (w, h) = target(d.image.source_width, d.image.source_height);
            if d.image.image.width() >= w && d.image.image.height() >= h {
                return Ok(d.clone());
            }
        }
        let bytes = self.read().await?;
        let limits = self.image_limits;
        let id = self.media_id.clone();
        let decoded = on_cpu(&self.stage, move || {
            mediaflow_imaging::renditions::decode_working(&bytes, &limits, target).map(
                |(image, exif)| Decoded {
                    image,
                    exif: exif.map(<[u8]>::to_vec),
                },
            )
        })
        .await?
        .map_err(|e| StageError::bad_input(format!("image {id}: {e}")))?;
        let decoded = Arc::new(decoded);
        self.decoded = Some(decoded.clone());
        Ok(decoded)
    }

    /// Stores `bytes` as this step's output `file`; returns where it is.
    pub async fn put(
        &mut self,
        file: &str,
        bytes: Vec<u8>,
        content_type: &str,
        dims: Option<(u32, u32)>,
    ) -> Result<ObjectRef, StageError> {
        let name = format!("{}.{file}", self.step);
        let path = format!("{}/{file}", self.step);
        let written = self
            .outputs
            .put(&self.media_id, &name, &path, bytes, content_type, dims)
            .await?;
        let object = written.object.clone();
        self.written.push((name, written));
        Ok(object)
    }

    /// Stores rendition `r` as this step's output `<file>.<extension>` (`file` is the
    /// rendition's name when `None`).
    pub async fn put_rendition(
        &mut self,
        r: Rendition,
        file: Option<&str>,
    ) -> Result<RenditionRef, StageError> {
        let file = format!("{}.{}", file.unwrap_or(&r.name), r.format.extension());
        let dims = (r.width, r.height);
        let object = self
            .put(&file, r.bytes, r.format.content_type(), Some(dims))
            .await?;
        Ok(RenditionRef {
            name: r.name,
            object,
            width: r.width,
            height: r.height,
            mode: mediaflow_outputs::enum_name(&r.mode),
            format: mediaflow_outputs::enum_name(&r.format),
        })
    }
}

/// What a chain works on: a media item and its object, from any event about one (an upload,
/// a work queue's job, another stage's result naming its `input`).
fn media_of(event: &Event) -> Result<(String, MediaKind, ObjectRef), StageError> {
    let data = mediaflow_events::data_json(event)
        .map_err(|e| StageError::bad_input(format!("a chain cannot read it: {e}")))?;
    let unusable = |why: &str| {
        StageError::bad_input(format!(
            "event {} (`{}`) {why}: a chain works on events about a media item (`media_id`) and its object (`object` or `input`)",
            event.id(),
            event.ty()
        ))
    };
    let media_id = data
        .get("media_id")
        .and_then(Value::as_str)
        .ok_or_else(|| unusable("has no `media_id`"))?
        .to_owned();
    let object = ObjectRef::referenced_by(&data).ok_or_else(|| unusable("refers to no object"))?;
    let kind = match data.get("kind").and_then(Value::as_str) {
        Some("image") => MediaKind::Image,
        Some("video") => MediaKind::Video,
        _ if object.content_type.starts_with("image/") => MediaKind::Image,
        _ if object.content_type.starts_with("video/") => MediaKind::Video,
        _ => return Err(unusable("is neither an image nor a video")),
    };
    Ok((media_id, kind, object))
}

/// A chain stage's handler.
pub struct Chain {
    stage: String,
    version: String,
    steps: Vec<Step>,
    config: ChainConfig,
    store: ObjectStore,
    outputs: Outputs,
    db: Db,
    work_dir: PathBuf,
    /// Bounds the inputs on local disk at once, whatever the concurrency.
    budget: mediaflow_outputs::InputBudget,
    metrics: Metrics,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<_> = self.steps.iter().map(|s| &s.name).collect();
        f.debug_struct("Chain")
            .field("stage", &self.stage)
            .field("steps", &steps)
            .finish()
    }
}

impl Chain {
    /// Stage `stage` at `version` running `config`'s steps of `workers`; jobs work in
    /// `work_dir`.
    pub fn new(
        stage: &str,
        version: &str,
        config: ChainConfig,
        workers: &Workers,
        work_dir: PathBuf,
        store: ObjectStore,
        db: Db,
    ) -> Result<Self, String> {
        let steps = workers.steps(&config)?;
        Ok(Self {
            stage: stage.to_owned(),
            version: version.to_owned(),
            steps,
            outputs: Outputs::new(store.clone(), stage, version),
            budget: mediaflow_outputs::InputBudget::for_inputs_up_to(config.max_input_bytes),
            config,
            store,
            db,
            work_dir,
            metrics: Metrics::default(),
        })
    }

    /// Each step's time goes to `metrics` (`mediaflow_chain_step_seconds`).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }
}

impl Handler for Chain {
    async fn handle(&self, event: &Event) -> Result<Vec<mediaflow_runtime::Output>, StageError> {
        let (media_id, kind, object) = media_of(event)?;
        let _room = self.budget.take(object.size).await?;
        let local = |e: std::io::Error| StageError::transient(format!("work folder: {e}"));
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(local)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", self.stage))
            .tempdir_in(&self.work_dir)
            .map_err(local)?;
        let ext = object
            .key
            .rsplit_once('.')
            .map(|(_, e)| e)
            .filter(|e| e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or("bin");
        let input = dir.path().join(format!("input.{ext}"));
        mediaflow_outputs::download(&self.store, &object, &input, self.config.max_input_bytes)
            .await?;

        let mut job = Job {
            media_id: media_id.clone(),
            kind,
            stage: self.stage.clone(),
            step: String::new(),
            file: input,
            dir: dir.path().to_owned(),
            steps: Vec::with_capacity(self.steps.len()),
            outputs: self.outputs.clone(),
            written: Vec::new(),
            image_limits: self.config.image_limits.decode_limits(),
            video_limits: self.config.video_limits.clone(),
            decoded: None,
        };
        for step in &self.steps {
            job.step.clone_from(&step.name);
            let started = std::time::Instant::now();
            let result = step.run.work(&mut job).await;
            let outcome = result.as_ref().map_or_else(|e| e.class.as_str(), |_| "ok");
            self.metrics
                .chain_step(&self.stage, &step.name, outcome, started.elapsed());
            let result = result.map_err(|e| StageError {
                class: e.class,
                message: format!("step `{}` ({}): {}", step.name, step.worker, e.message),
            })?;
            job.steps.push(StepResult {
                name: step.name.clone(),
                worker: step.worker.clone(),
                result,
            });
        }
        drop(dir);

        let (outputs, rows): (Vec<_>, Vec<_>) = job
            .written
            .into_iter()
            .map(|(name, w)| {
                (
                    Output {
                        name,
                        object: w.object,
                    },
                    w.row,
                )
            })
            .unzip();
        self.db
            .record_results(Entity::Media(&media_id), &rows)
            .await
            .map_err(mediaflow_outputs::db_error)?;
        tracing::info!(media_id = %media_id, stage = %self.stage, steps = job.steps.len(), outputs = outputs.len(), "chain done");
        let result = MediaProcessed {
            media_id,
            stage: self.stage.clone(),
            stage_version: self.version.clone(),
            input: Some(object),
            outputs,
            steps: job.steps,
        };
        Ok(vec![mediaflow_runtime::Output::data("out", &result)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: Value) -> ChainConfig {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn steps_are_checked_by_name_and_settings() {
        let workers = Workers::default();
        let ok = config(serde_json::json!({"steps": [
            {"worker": "probe"}, {"worker": "thumbnail"}, {"worker": "tag"},
            {"worker": "exec", "name": "count", "config": {"command": ["true"]}}
        ]}));
        let steps = workers.steps(&ok).unwrap();
        let names: Vec<_> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["probe", "thumbnail", "tag", "count"]);

        let wrong = |steps: Value| {
            workers
                .steps(&config(serde_json::json!({ "steps": steps })))
                .err()
                .unwrap_or_default()
        };
        assert!(wrong(serde_json::json!([])).contains("empty"));
        let e = wrong(serde_json::json!([{"worker": "blur"}]));
        assert!(
            e.contains("step 1") && e.contains("unknown worker `blur`") && e.contains("thumbnail"),
            "{e}"
        );
        let e = wrong(serde_json::json!([{"worker": "tag"}, {"worker": "tag"}]));
        assert!(e.contains("step 2") && e.contains("two steps"), "{e}");
        let e = wrong(serde_json::json!([{"worker": "thumbnail", "config": {"renditions": []}}]));
        assert!(e.contains("renditions is empty"), "{e}");
        let e = wrong(serde_json::json!([{"worker": "exec", "config": {"command": []}}]));
        assert!(e.contains("command"), "{e}");
        let e = wrong(serde_json::json!([{"worker": "probe", "config": {"deep": true}}]));
        assert!(e.contains("takes no settings"), "{e}");
        let e = wrong(serde_json::json!([{"worker": "tag", "name": "a/b"}]));
        assert!(e.contains("step name"), "{e}");
    }

    #[test]
    fn any_event_about_a_media_item_and_its_object_is_a_job() {
        let object = serde_json::json!({"bucket": "b", "key": "uploads/m/original.png", "size": 3,
            "sha256": "00", "content_type": "image/png"});
        let event = |ty: &str, data: Value| {
            cloudevents::EventBuilderV10::new()
                .id("e1")
                .ty(ty)
                .source("test")
                .data("application/json", data)
                .build()
                .unwrap()
        };
        use cloudevents::EventBuilder;
        let (id, kind, o) = media_of(&event(
            "mediaflow.image.processed",
            serde_json::json!({"media_id": "m", "input": object}),
        ))
        .unwrap();
        assert_eq!(
            (id.as_str(), kind, o.key.as_str()),
            ("m", MediaKind::Image, "uploads/m/original.png")
        );
        let e = media_of(&event("x", serde_json::json!({"media_id": "m"}))).unwrap_err();
        assert!(e.message.contains("no object"), "{e}");
        let e = media_of(&event("x", serde_json::json!({"name": "n"}))).unwrap_err();
        assert_eq!(e.class, mediaflow_runtime::ErrorClass::BadInput);
    }
}

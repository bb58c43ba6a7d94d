//! The workers chains ship with: `probe` (what the media is), `thumbnail` (renditions of an
//! image, or of chosen frames of a video), `tag` (an image's EXIF, colours, perceptual hash,
//! sharpness) and `exec` (any command, the book's worker interface).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use mediaflow_events::{MediaKind, VideoFrame};
use mediaflow_exec_worker::command::{self, io_error};
use mediaflow_imaging::renditions::{
    RenditionSpec, check_specs, render_all, tags_of, working_size,
};
use mediaflow_runtime::{StageError, on_cpu};
use mediaflow_video::select::Strategy;
use mediaflow_video::{Seek, Video, VideoError};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{Job, Worker, WorkerKind};

/// A step's settings of type `T` (its defaults when the step gives none).
fn settings<T: DeserializeOwned>(config: &Value) -> Result<T, String> {
    let config = match config {
        Value::Null => json!({}),
        other => other.clone(),
    };
    serde_json::from_value(config).map_err(|e| e.to_string())
}

/// For workers without settings.
fn no_settings(worker: &str, config: &Value) -> Result<(), String> {
    match config {
        Value::Null => Ok(()),
        Value::Object(m) if m.is_empty() => Ok(()),
        _ => Err(format!("worker `{worker}` takes no settings")),
    }
}

fn video_error(id: &str, e: VideoError) -> StageError {
    let message = format!("video {id}: {e}");
    if e.is_bad_input() {
        StageError::bad_input(message)
    } else {
        StageError::permanent(message)
    }
}

/// `probe`: what the media is, from its headers (an image is not decoded): kind, format,
/// size, orientation, frames; a video's duration, codecs and streams. Media over the chain's
/// limits is refused here, before anything decodes it.
pub struct Probe;

impl WorkerKind for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn build(&self, config: &Value) -> Result<Arc<dyn Worker>, String> {
        no_settings("probe", config)?;
        Ok(Arc::new(Probe))
    }
}

impl Worker for Probe {
    fn work<'a>(&'a self, job: &'a mut Job) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let id = job.media_id().to_owned();
            match job.kind() {
                MediaKind::Image => {
                    let bytes = job.read().await?;
                    let bad = |e| StageError::bad_input(format!("image {id}: {e}"));
                    let p = mediaflow_imaging::probe::probe(&bytes).map_err(bad)?;
                    mediaflow_imaging::probe::check(&p, job.image_limits()).map_err(bad)?;
                    Ok(json!({
                        "kind": "image",
                        "format": p.format,
                        "width": p.width,
                        "height": p.height,
                        "orientation": p.orientation,
                        "frames": p.frames,
                        "bytes": bytes.len(),
                    }))
                }
                MediaKind::Video => {
                    let (path, limits) = (job.file().to_owned(), job.video_limits().clone());
                    let probe = on_cpu(job.stage(), move || {
                        mediaflow_video::probe::probe(&path, &limits)
                    })
                    .await?
                    .map_err(|e| video_error(&id, e))?;
                    let mut value = serde_json::to_value(&probe)
                        .map_err(|e| StageError::permanent(format!("probe: {e}")))?;
                    value["kind"] = json!("video");
                    Ok(value)
                }
            }
        })
    }
}

/// Settings of `thumbnail`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ThumbnailConfig {
    /// What is made of an image, or of each chosen frame of a video.
    renditions: Vec<RenditionSpec>,
    /// Which frames of a video (as the video stage's `frames`).
    frames: Strategy,
    seek: Seek,
}

impl Default for ThumbnailConfig {
    fn default() -> Self {
        Self {
            renditions: vec![RenditionSpec::thumbnail("thumb-256", 256, 85)],
            frames: Strategy::Representative { count: 1 },
            seek: Seek::Keyframe,
        }
    }
}

/// `thumbnail`: the configured renditions of an image (one decode, cut in parallel), or of
/// the chosen frames of a video (`frame-01-<rendition>`...). Result: the renditions, or the
/// frames with theirs.
pub struct Thumbnail;

struct ThumbnailWorker(ThumbnailConfig);

impl WorkerKind for Thumbnail {
    fn name(&self) -> &str {
        "thumbnail"
    }

    fn build(&self, config: &Value) -> Result<Arc<dyn Worker>, String> {
        let config: ThumbnailConfig = settings(config)?;
        check_specs(&config.renditions, 8192)?;
        config.frames.check().map_err(|e| e.to_string())?;
        Ok(Arc::new(ThumbnailWorker(config)))
    }
}

impl Worker for ThumbnailWorker {
    fn work<'a>(&'a self, job: &'a mut Job) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let specs = self.0.renditions.clone();
            let id = job.media_id().to_owned();
            match job.kind() {
                MediaKind::Image => {
                    let needed = specs.clone();
                    let decoded = job
                        .image(move |w, h| working_size(&needed, w, h, 0))
                        .await?;
                    let made = on_cpu(job.stage(), move || {
                        render_all(&decoded.image, &specs, decoded.exif.as_deref())
                    })
                    .await?
                    .map_err(|e| StageError::permanent(format!("image {id}: {e}")))?;
                    let mut renditions = Vec::with_capacity(made.len());
                    for r in made {
                        renditions.push(job.put_rendition(r, None).await?);
                    }
                    Ok(json!({ "renditions": renditions }))
                }
                MediaKind::Video => {
                    let (path, limits) = (job.file().to_owned(), job.video_limits().clone());
                    let (strategy, seek) = (self.0.frames.clone(), self.0.seek);
                    let made = on_cpu(job.stage(), move || {
                        let mut video = Video::open(&path, &limits)?;
                        let mut frames = Vec::new();
                        mediaflow_video::select::select_each(&mut video, &strategy, seek, |p| {
                            let r = mediaflow_video::encode::renditions(&p, &specs)?;
                            frames.push((p.time_s, p.keyframe, r));
                            Ok(())
                        })?;
                        Ok::<_, VideoError>(frames)
                    })
                    .await?
                    .map_err(|e| video_error(&id, e))?;
                    let mut frames = Vec::with_capacity(made.len());
                    for (i, (time_s, keyframe, renditions)) in made.into_iter().enumerate() {
                        let mut refs = Vec::with_capacity(renditions.len());
                        for r in renditions {
                            let file = format!("frame-{:02}-{}", i + 1, r.name);
                            refs.push(job.put_rendition(r, Some(&file)).await?);
                        }
                        frames.push(VideoFrame {
                            time_s,
                            keyframe,
                            renditions: refs,
                        });
                    }
                    Ok(json!({ "frames": frames }))
                }
            }
        })
    }
}

/// `tag`: an image's tags (EXIF camera, time and place; dominant colours; perceptual hash;
/// sharpness; orientation; size class), stored as `tags.json` and returned as the result.
/// Shares the decode of a `thumbnail` step before it.
pub struct Tag;

impl WorkerKind for Tag {
    fn name(&self) -> &str {
        "tag"
    }

    fn build(&self, config: &Value) -> Result<Arc<dyn Worker>, String> {
        no_settings("tag", config)?;
        Ok(Arc::new(Tag))
    }
}

impl Worker for Tag {
    fn work<'a>(&'a self, job: &'a mut Job) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let id = job.media_id().to_owned();
            if job.kind() != MediaKind::Image {
                return Err(StageError::bad_input(format!(
                    "media {id} is a {}: the tag worker takes images",
                    job.kind()
                )));
            }
            let decoded = job.image(|w, h| working_size(&[], w, h, 256)).await?;
            let tags = on_cpu(job.stage(), move || {
                tags_of(&decoded.image, decoded.exif.as_deref())
            })
            .await?
            .map_err(|e| StageError::permanent(format!("image {id}: {e}")))?;
            let tags = serde_json::to_value(&tags)
                .map_err(|e| StageError::permanent(format!("tags: {e}")))?;
            let file = serde_json::to_vec_pretty(&tags)
                .map_err(|e| StageError::permanent(format!("tags: {e}")))?;
            job.put("tags.json", file, "application/json", None).await?;
            Ok(tags)
        })
    }
}

/// Settings of an `exec` step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecConfig {
    /// The command and its arguments; run without a shell.
    command: Vec<String>,
    /// Longest run, in seconds; it is killed after that (a permanent failure).
    #[serde(default = "default_timeout")]
    timeout_secs: u64,
    /// Most output files, and largest total output, in bytes.
    #[serde(default = "default_max_outputs")]
    max_outputs: usize,
    #[serde(default = "default_max_output_bytes")]
    max_output_bytes: u64,
}

fn default_timeout() -> u64 {
    600
}
fn default_max_outputs() -> usize {
    100
}
fn default_max_output_bytes() -> u64 {
    1 << 30
}

/// `exec`: a command as a step, with `INPUT_FILE` (the chain's current file), `RESULTS_FILE`
/// (the steps before it and their results, JSON), `OUTPUT_DIR` (files left there are its
/// outputs; `result.json` there is its result), `NEXT_FILE` (a file written there is what the
/// steps after it work on), `MEDIA_ID`, `MEDIA_KIND`, `STAGE` and `STEP`. Exit statuses as an
/// exec stage's: 0 done, 75 try again, 65 bad input, anything else a permanent failure.
pub struct Exec;

struct ExecWorker(ExecConfig);

impl WorkerKind for Exec {
    fn name(&self) -> &str {
        "exec"
    }

    fn build(&self, config: &Value) -> Result<Arc<dyn Worker>, String> {
        let config: ExecConfig = settings(config)?;
        if config.command.is_empty() {
            return Err("`command` is empty".into());
        }
        Ok(Arc::new(ExecWorker(config)))
    }
}

impl Worker for ExecWorker {
    fn work<'a>(&'a self, job: &'a mut Job) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            let dir = job.dir().join(format!("step-{}", job.step()));
            let out = dir.join("out");
            tokio::fs::create_dir_all(&out)
                .await
                .map_err(|e| io_error("creating the output folder", e))?;
            let results = dir.join("results.json");
            let next: PathBuf = dir.join("next");
            let json = serde_json::to_vec_pretty(job.results()).unwrap_or_default();
            tokio::fs::write(&results, json)
                .await
                .map_err(|e| io_error("writing the results", e))?;
            let kind = job.kind().to_string();
            let env: Vec<(&str, &OsStr)> = vec![
                ("INPUT_FILE", job.file().as_os_str()),
                ("RESULTS_FILE", results.as_os_str()),
                ("OUTPUT_DIR", out.as_os_str()),
                ("NEXT_FILE", next.as_os_str()),
                ("MEDIA_ID", OsStr::new(job.media_id())),
                ("MEDIA_KIND", OsStr::new(&kind)),
                ("STAGE", OsStr::new(job.stage())),
                ("STEP", OsStr::new(job.step())),
            ];
            let timeout = Duration::from_secs(self.0.timeout_secs);
            command::run(&self.0.command, &dir, &env, timeout).await?;

            let files = command::output_files(
                &out,
                self.0.max_outputs,
                self.0.max_output_bytes,
                &["result.json"],
            )
            .await?;
            let mut names = Vec::with_capacity(files.len());
            for file in files {
                let bytes = tokio::fs::read(&file.path)
                    .await
                    .map_err(|e| io_error("reading an output", e))?;
                job.put(
                    &file.name,
                    bytes,
                    command::content_type_of(&file.name),
                    None,
                )
                .await?;
                names.push(file.name);
            }
            let result = match tokio::fs::read(out.join("result.json")).await {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                    StageError::permanent(format!("the command's result.json is not JSON: {e}"))
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({ "outputs": names }),
                Err(e) => return Err(io_error("reading result.json", e)),
            };
            if tokio::fs::symlink_metadata(&next)
                .await
                .is_ok_and(|m| m.is_file())
            {
                job.replace_file(next);
            }
            Ok(result)
        })
    }
}

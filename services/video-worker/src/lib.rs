//! The video stage: downloads a video upload to a local temporary file, and on a CPU thread
//! (`on_cpu`) probes it, chooses its frames, renders each in every configured rendition, makes a storyboard
//! (sprite + WebVTT) and an animated preview (`mediaflow-video`); writes them under deterministic
//! keys, records them as result rows, and returns the `VideoProcessed` event on its port `out`. A video the
//! kernel refuses (empty, truncated, audio only, over a limit, a playlist or other reference
//! format) is bad input: dead-lettered with the kernel's reason, never retried.

use std::path::Path;

use cloudevents::Event;
use mediaflow_db::{Db, Entity};
use mediaflow_events::{
    MediaKind, MediaUploaded, PreviewRef, StoryboardRef, VideoFrame, VideoProcessed,
};
use mediaflow_imaging::renditions::{Rendition, RenditionSpec};
use mediaflow_outputs::{Outputs, db_error, enum_name};
use mediaflow_runtime::{Handler, Output, StageError, on_cpu};
use mediaflow_store::ObjectStore;
use mediaflow_video::preview::{Preview, PreviewSpec};
use mediaflow_video::select::Strategy;
use mediaflow_video::storyboard::{Storyboard, StoryboardSpec};
use mediaflow_video::{Limits, Probe, Seek, Video, VideoError};
use serde::{Deserialize, Serialize};

/// The kernel, for the types of the configuration.
pub use mediaflow_video as video;

/// Configuration of the video stage (`[video_worker]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoWorkerConfig {
    /// How frames are chosen: `{ strategy = "representative", count = 4 }`, `count`, `interval`
    /// (`every_s`), `offsets` (`at = [3, "50%", "1:02.5"]`) or `scenes` (`count`, `threshold`).
    pub frames: Strategy,
    /// `keyframe` (fast: the keyframe at or before each time) or `accurate` (the frame shown at
    /// each time).
    pub seek: Seek,
    /// Every chosen frame is made into each of these (`[[video_worker.renditions]]`, as the
    /// image stage's: name, box, mode, format, quality).
    pub renditions: Vec<RenditionSpec>,
    /// Whether to make a storyboard, and how.
    pub storyboard_enabled: bool,
    pub storyboard: StoryboardSpec,
    /// Whether to make an animated preview, and how.
    pub preview_enabled: bool,
    pub preview: PreviewSpec,
    /// Limits on the input (duration, size, streams, time per job).
    pub limits: Limits,
    /// Largest input object downloaded, in bytes.
    pub max_input_bytes: u64,
    /// Input bytes downloaded to local disk at once by one instance, whatever its concurrency:
    /// a message waits for room before it downloads its original.
    pub max_inflight_input_bytes: u64,
}

impl Default for VideoWorkerConfig {
    fn default() -> Self {
        Self {
            frames: Strategy::Representative { count: 4 },
            seek: Seek::Keyframe,
            renditions: vec![RenditionSpec::thumbnail("thumb-320", 320, 80)],
            storyboard_enabled: true,
            storyboard: StoryboardSpec::default(),
            preview_enabled: true,
            preview: PreviewSpec::default(),
            limits: Limits::default(),
            max_input_bytes: 4 * 1024 * 1024 * 1024,
            max_inflight_input_bytes: 16 * 1024 * 1024 * 1024,
        }
    }
}

impl VideoWorkerConfig {
    /// Checks the configuration before the stage starts.
    pub fn check(&self) -> Result<(), String> {
        let wrong = |e: VideoError| format!("video_worker: {e}");
        self.frames.check().map_err(wrong)?;
        self.limits.check().map_err(wrong)?;
        self.storyboard.check().map_err(wrong)?;
        self.preview.check().map_err(wrong)?;
        mediaflow_imaging::renditions::check_specs(&self.renditions, 8192)
            .map_err(|e| format!("video_worker: {e}"))
    }
}

/// The video stage's handler.
#[derive(Debug)]
pub struct VideoWorker {
    config: VideoWorkerConfig,
    /// Bounds the originals on local disk at once.
    budget: mediaflow_outputs::InputBudget,
    store: ObjectStore,
    outputs: Outputs,
    db: Db,
    work_dir: std::path::PathBuf,
}

/// Everything made from one video, before it is written.
struct Made {
    probe: Probe,
    frames: Vec<(f64, bool, Vec<Rendition>)>,
    storyboard: Option<Storyboard>,
    preview: Option<Preview>,
}

fn make(path: &Path, config: &VideoWorkerConfig) -> Result<Made, VideoError> {
    let mut video = Video::open(path, &config.limits)?;
    // Each frame is rendered as soon as it is chosen; only its encoded renditions are kept.
    let mut frames = Vec::new();
    mediaflow_video::select::select_each(&mut video, &config.frames, config.seek, |p| {
        let renditions = mediaflow_video::encode::renditions(&p, &config.renditions)?;
        frames.push((p.time_s, p.keyframe, renditions));
        Ok(())
    })?;
    let storyboard = if config.storyboard_enabled {
        Some(mediaflow_video::storyboard::storyboard(
            &mut video,
            &config.storyboard,
        )?)
    } else {
        None
    };
    video.check_time()?;
    let preview = if config.preview_enabled {
        Some(mediaflow_video::preview::preview(
            &mut video,
            &config.preview,
        )?)
    } else {
        None
    };
    video.check_time()?;
    Ok(Made {
        probe: video.probe().clone(),
        frames,
        storyboard,
        preview,
    })
}

impl VideoWorker {
    /// The video stage declared as `stage` at `version` (both part of every output key);
    /// `work_dir` holds each job's downloaded input while it runs.
    pub fn new(
        stage: &str,
        version: &str,
        config: VideoWorkerConfig,
        work_dir: std::path::PathBuf,
        store: ObjectStore,
        db: Db,
    ) -> Self {
        Self {
            budget: mediaflow_outputs::InputBudget::new(config.max_inflight_input_bytes),
            config,
            outputs: Outputs::new(store.clone(), stage, version),
            store,
            db,
            work_dir,
        }
    }
}

impl Handler for VideoWorker {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let upload: MediaUploaded =
            mediaflow_events::decode(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        if upload.kind != MediaKind::Video {
            return Err(StageError::bad_input(format!(
                "media {} is a {}, not a video",
                upload.media_id, upload.kind
            )));
        }
        let id = upload.media_id.clone();
        let _room = self.budget.take(upload.object.size).await?;
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| StageError::transient(format!("work dir: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("video-")
            .tempdir_in(&self.work_dir)
            .map_err(|e| StageError::transient(format!("work dir: {e}")))?;
        let input = dir.path().join("input");
        mediaflow_outputs::download(
            &self.store,
            &upload.object,
            &input,
            self.config.max_input_bytes,
        )
        .await?;

        let config = self.config.clone();
        let made = on_cpu(self.outputs.stage(), move || make(&input, &config))
            .await?
            .map_err(|e| {
                let message = format!("video {id}: {e}");
                if e.is_bad_input() {
                    StageError::bad_input(message)
                } else {
                    StageError::permanent(message)
                }
            })?;
        drop(dir);

        let mut rows = Vec::new();
        let mut frames = Vec::with_capacity(made.frames.len());
        for (i, (time_s, keyframe, renditions)) in made.frames.into_iter().enumerate() {
            let mut refs = Vec::with_capacity(renditions.len());
            for r in renditions {
                let name = format!("frame-{:02}-{}", i + 1, r.name);
                let (reference, row) = self.outputs.put_rendition(&id, Some(&name), r).await?;
                rows.push(row);
                refs.push(reference);
            }
            frames.push(VideoFrame {
                time_s,
                keyframe,
                renditions: refs,
            });
        }
        let storyboard = match made.storyboard {
            Some(board) => {
                let vtt = board.vtt("storyboard.jpg").into_bytes();
                let sprite = self
                    .outputs
                    .put(
                        &id,
                        "storyboard",
                        "storyboard.jpg",
                        board.sprite,
                        "image/jpeg",
                        Some((board.width, board.height)),
                    )
                    .await?;
                let index = self
                    .outputs
                    .put(
                        &id,
                        "storyboard-vtt",
                        "storyboard.vtt",
                        vtt,
                        "text/vtt",
                        None,
                    )
                    .await?;
                rows.push(sprite.row);
                rows.push(index.row);
                let first = board.tiles.first();
                Some(StoryboardRef {
                    sprite: sprite.object,
                    vtt: index.object,
                    width: board.width,
                    height: board.height,
                    tiles: board.tiles.len() as u32,
                    tile_width: first.map_or(0, |t| t.width),
                    tile_height: first.map_or(0, |t| t.height),
                    interval_s: first.map_or(0.0, |t| t.end_s - t.start_s),
                })
            }
            None => None,
        };
        let preview = match made.preview {
            Some(p) => {
                let file = format!("preview.{}", p.format.extension());
                let written = self
                    .outputs
                    .put(
                        &id,
                        "preview",
                        &file,
                        p.bytes,
                        p.format.content_type(),
                        Some((p.width, p.height)),
                    )
                    .await?;
                rows.push(written.row);
                Some(PreviewRef {
                    object: written.object,
                    format: enum_name(&p.format),
                    width: p.width,
                    height: p.height,
                    frames: p.frames,
                    start_s: p.start_s,
                    duration_s: p.duration_s,
                })
            }
            None => None,
        };
        let probe = serde_json::to_value(&made.probe)
            .map_err(|e| StageError::permanent(format!("probe: {e}")))?;
        let probe_json = serde_json::to_vec_pretty(&probe)
            .map_err(|e| StageError::permanent(format!("probe: {e}")))?;
        rows.push(
            self.outputs
                .put(
                    &id,
                    "probe",
                    "probe.json",
                    probe_json,
                    "application/json",
                    None,
                )
                .await?
                .row,
        );
        self.db
            .record_results(Entity::Media(&id), &rows)
            .await
            .map_err(db_error)?;

        let strategy = serde_json::to_value(&self.config.frames)
            .ok()
            .and_then(|v| v["strategy"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let result = VideoProcessed {
            media_id: id.clone(),
            stage: self.outputs.stage().into(),
            stage_version: self.outputs.version().into(),
            input: upload.object.clone(),
            probe,
            strategy,
            seek: enum_name(&self.config.seek),
            frames,
            storyboard,
            preview,
        };
        tracing::info!(
            media_id = %id,
            duration_s = made.probe.duration_s,
            codec = %made.probe.video.codec,
            frames = result.frames.len(),
            "video processed"
        );
        Ok(vec![Output::data("out", &result)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_valid_and_mistakes_are_named() {
        let mut c = VideoWorkerConfig::default();
        c.check().unwrap();
        c.renditions.push(c.renditions[0].clone());
        assert!(c.check().unwrap_err().contains("twice"));
        c.renditions.truncate(1);
        c.frames = Strategy::Count { count: 0 };
        assert!(c.check().unwrap_err().contains("count"));
        c.frames = Strategy::Count { count: 3 };
        c.preview.fps = 0;
        assert!(c.check().unwrap_err().contains("fps"));
    }
}

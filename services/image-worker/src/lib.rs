//! The image stage: reads an image upload from object storage, makes its renditions and tags on
//! a CPU thread (`on_cpu`; one decode, renditions in parallel), writes them under deterministic keys,
//! records them (result rows, an `image_tags` row), and returns the `ImageProcessed` event on its
//! port `out` (bound to `images.processed` in the shipped pipeline).

use cloudevents::Event;
use mediaflow_db::{Db, ImageTagsRow};
use mediaflow_events::ImageProcessed;
use mediaflow_imaging::renditions::RenditionSpec;
use mediaflow_imaging::{DecodeLimits, ImagingError};
use mediaflow_outputs::{InputBudget, Outputs, Written, db_error};
use mediaflow_runtime::{Handler, Output, StageError, on_cpu};
use mediaflow_store::ObjectStore;
use serde::{Deserialize, Serialize};

/// Configuration of the image stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageWorkerConfig {
    /// The renditions made of every image (`[[image_worker.renditions]]`): name, box size, mode
    /// (`fit`, `fill`, `crop`), format (`jpeg`, `webp`, `png`) and quality.
    pub renditions: Vec<RenditionSpec>,
    /// Largest input object read, in bytes.
    pub max_input_bytes: u64,
    /// Largest accepted width or height of an input image, in pixels (checked before decoding).
    pub max_side: u32,
    /// Largest accepted width x height of an input image.
    pub max_pixels: u64,
    /// Most frames an animated input (GIF, WebP, APNG) may declare; its first frame is used.
    pub max_frames: u32,
    /// Input bytes held in memory at once by one instance, whatever its concurrency: a message
    /// waits for room before it reads its original.
    pub max_inflight_input_bytes: u64,
}

impl Default for ImageWorkerConfig {
    fn default() -> Self {
        let limits = DecodeLimits::default();
        Self {
            renditions: vec![RenditionSpec::thumbnail("thumb-256", 256, 85)],
            max_input_bytes: 256 * 1024 * 1024,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
            max_frames: limits.max_frames,
            max_inflight_input_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl ImageWorkerConfig {
    /// Checks the rendition list (`renditions::check_specs`, sides up to 16384); `tags` is not
    /// a rendition name (the tags are stored as `tags`).
    pub fn check(&self) -> Result<(), String> {
        mediaflow_imaging::renditions::check_specs(&self.renditions, 16_384)
            .map_err(|e| format!("image_worker: {e}"))?;
        if self.renditions.iter().any(|r| r.name == "tags") {
            return Err("image_worker: rendition name `tags` is not allowed (the tags are stored as `tags`)".into());
        }
        Ok(())
    }
}

/// The image stage's handler.
#[derive(Debug)]
pub struct ImageWorker {
    config: ImageWorkerConfig,
    /// Bounds the originals held in memory at once.
    budget: InputBudget,
    outputs: Outputs,
    db: Db,
}

impl ImageWorker {
    /// The image stage declared as `stage` at `version` (both part of every output key: bump
    /// the version whenever the output for the same input changes).
    pub fn new(
        stage: &str,
        version: &str,
        config: ImageWorkerConfig,
        store: ObjectStore,
        db: Db,
    ) -> Self {
        Self {
            budget: InputBudget::new(config.max_inflight_input_bytes),
            config,
            outputs: Outputs::new(store, stage, version),
            db,
        }
    }

    fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.config.max_side,
            max_pixels: self.config.max_pixels,
            max_frames: self.config.max_frames,
            ..DecodeLimits::default()
        }
    }
}

impl Handler for ImageWorker {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let upload = mediaflow_outputs::image_upload(event)?;
        let _room = self.budget.take(upload.object.size).await?;
        // The original may live in another bucket (a backfilled one).
        let Some(input) = self
            .outputs
            .read_input(
                &upload.object,
                &upload.media_id,
                "tags.json",
                self.config.max_input_bytes,
            )
            .await?
        else {
            return Ok(Vec::new());
        };

        let specs = self.config.renditions.clone();
        let limits = self.limits();
        let bytes = input.bytes;
        let processed = on_cpu(self.outputs.stage(), move || {
            mediaflow_imaging::renditions::process(&bytes, &specs, &limits)
        })
        .await?
        .map_err(|e: ImagingError| {
            StageError::bad_input(format!("image {}: {e}", upload.media_id))
        })?;

        let mut rows = Vec::new();
        let mut renditions = Vec::new();
        for r in processed.renditions {
            let (reference, row) = self
                .outputs
                .put_rendition(&upload.media_id, None, r)
                .await?;
            rows.push(row);
            renditions.push(reference);
        }
        let tags = serde_json::to_value(&processed.tags)
            .map_err(|e| StageError::permanent(format!("tags: {e}")))?;
        let tags_json = serde_json::to_vec_pretty(&tags)
            .map_err(|e| StageError::permanent(format!("tags: {e}")))?;
        let Written { row, .. } = self
            .outputs
            .put(
                &upload.media_id,
                "tags",
                "tags.json",
                tags_json,
                "application/json",
                None,
            )
            .await?;
        rows.push(row);
        let t = &processed.tags;
        let exif = t.exif.as_ref();
        let gps = exif.and_then(|e| e.gps);
        let tags_row = ImageTagsRow {
            media_id: upload.media_id.clone(),
            stage_version: self.outputs.version().into(),
            phash: t.phash.clone(),
            camera_make: exif.and_then(|e| e.make.clone()),
            camera_model: exif.and_then(|e| e.model.clone()),
            taken_at: exif.and_then(|e| e.taken_at.clone()),
            latitude: gps.map(|g| g.latitude),
            longitude: gps.map(|g| g.longitude),
            tags_json: tags.to_string(),
        };
        self.db
            .record_image(&rows, &tags_row)
            .await
            .map_err(db_error)?;

        let result = ImageProcessed {
            media_id: upload.media_id.clone(),
            stage: self.outputs.stage().into(),
            stage_version: self.outputs.version().into(),
            input: upload.object.clone(),
            source_width: t.width,
            source_height: t.height,
            renditions,
            tags,
        };
        tracing::info!(media_id = %upload.media_id, width = t.width, height = t.height, renditions = result.renditions.len(), "image processed");
        Ok(vec![Output::data("out", &result)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_modes_and_formats() {
        assert_eq!(
            mediaflow_outputs::enum_name(&mediaflow_imaging::renditions::Mode::Fill),
            "fill"
        );
        assert_eq!(
            mediaflow_outputs::enum_name(&mediaflow_imaging::renditions::Format::Webp),
            "webp"
        );
    }

    #[test]
    fn rendition_lists_are_checked() {
        let mut c = ImageWorkerConfig::default();
        assert!(c.check().is_ok());
        c.renditions.push(c.renditions[0].clone());
        assert!(c.check().unwrap_err().contains("twice"));
        c.renditions[1].name = "../x".into();
        assert!(c.check().unwrap_err().contains("not allowed"));
        c.renditions[1].name = "big".into();
        c.renditions[1].width = 0;
        assert!(c.check().unwrap_err().contains("sides"));
        c.renditions.clear();
        assert!(c.check().unwrap_err().contains("empty"));
    }
}

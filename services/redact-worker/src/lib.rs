//! The detect-and-blur stage (kind `redact`), the multi-worker stage of the book's image tagging
//! pipeline (ch. 12): reads an image upload, finds faces and licence plates with OpenCV's own
//! `CascadeClassifier` and the Haar cascades Debian's `opencv-data` ships, blurs every box, and
//! writes the result losslessly (PNG) beside the original, so the copy differs from the original
//! inside the boxes and nowhere else. Returns `mediaflow.image.redacted` on port `out`.
//!
//! The image is decoded by `mediaflow-imaging` (declared dimensions checked before any pixel is
//! decoded; EXIF orientation applied), so OpenCV sees pixels only, never a file. Detection runs as
//! OpenCV's documented recipe does it: grey, histogram equalised, `detectMultiScale` with the
//! declared scale factor, neighbours and smallest size.

mod detect;

use std::collections::BTreeMap;
use std::path::PathBuf;

use cloudevents::Event;
use mediaflow_db::Db;
use mediaflow_events::{Detection, ImageRedacted};
use mediaflow_imaging::DecodeLimits;
use mediaflow_outputs::{InputBudget, Outputs, Written, db_error};
use mediaflow_runtime::{Handler, Output, StageError, on_cpu};
use mediaflow_store::ObjectStore;
use serde::{Deserialize, Serialize};

pub use detect::{Detector, DetectorSpec, detect_and_blur};

/// Where Debian's `opencv-data` puts the Haar cascades.
pub const DEBIAN_CASCADES: &str = "/usr/share/opencv4/haarcascades";

/// Settings of a redact stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedactConfig {
    /// Where cascade files named by `detectors` are looked up.
    pub cascades_dir: PathBuf,
    /// What to find and blur: a label and its cascade file.
    pub detectors: Vec<DetectorSpec>,
    /// `detectMultiScale`'s scale step between image pyramid levels.
    pub scale_factor: f64,
    /// `detectMultiScale`'s neighbours a candidate needs to be kept.
    pub min_neighbors: i32,
    /// Smallest box found, in pixels (each side).
    pub min_size: u32,
    /// Images larger than this (either side) are searched at this size and the boxes scaled back:
    /// a Haar cascade over 12 megapixels takes seconds and finds nothing more.
    pub detect_max_side: u32,
    /// Largest input object read, in bytes.
    pub max_input_bytes: u64,
    /// Largest accepted width or height, and width x height (checked before decoding).
    pub max_side: u32,
    pub max_pixels: u64,
    /// Input bytes held in memory at once by one instance.
    pub max_inflight_input_bytes: u64,
}

impl Default for RedactConfig {
    fn default() -> Self {
        let limits = DecodeLimits::default();
        Self {
            cascades_dir: PathBuf::from(DEBIAN_CASCADES),
            detectors: vec![
                DetectorSpec {
                    label: "face".into(),
                    cascade: "haarcascade_frontalface_default.xml".into(),
                },
                DetectorSpec {
                    label: "plate".into(),
                    cascade: "haarcascade_russian_plate_number.xml".into(),
                },
            ],
            scale_factor: 1.1,
            min_neighbors: 5,
            min_size: 30,
            detect_max_side: 1600,
            max_input_bytes: 256 * 1024 * 1024,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
            max_inflight_input_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl RedactConfig {
    /// Problems with the settings: no detectors, a label twice, a scale factor not above 1, a
    /// cascade that is not there.
    pub fn check(&self) -> Result<(), String> {
        if self.detectors.is_empty() {
            return Err("redact: no `detectors`".into());
        }
        let mut labels = std::collections::BTreeSet::new();
        for d in &self.detectors {
            if d.label.is_empty() || !labels.insert(d.label.as_str()) {
                return Err(format!(
                    "redact: detector label `{}` is empty or given twice",
                    d.label
                ));
            }
        }
        if self.scale_factor.is_nan() || self.scale_factor <= 1.0 {
            return Err("redact: `scale_factor` must be above 1".into());
        }
        if self.min_neighbors < 0 || self.min_size == 0 || self.detect_max_side < 64 {
            return Err(
                "redact: `min_neighbors` >= 0, `min_size` >= 1 and `detect_max_side` >= 64".into(),
            );
        }
        Ok(())
    }

    /// The cascade files, each checked to exist.
    pub fn cascade_paths(&self) -> Result<Vec<(String, PathBuf)>, String> {
        self.detectors
            .iter()
            .map(|d| {
                let path = self.cascades_dir.join(&d.cascade);
                if path.is_file() {
                    Ok((d.label.clone(), path))
                } else {
                    Err(format!(
                        "redact: cascade {} for `{}` is not there (Debian: apt-get install opencv-data)",
                        path.display(),
                        d.label
                    ))
                }
            })
            .collect()
    }

    fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.max_side,
            max_pixels: self.max_pixels,
            ..DecodeLimits::default()
        }
    }
}

/// The redact stage's handler.
pub struct RedactWorker {
    config: RedactConfig,
    detector: Detector,
    /// Bounds the detections running at once to the cores there are.
    budget: InputBudget,
    outputs: Outputs,
    db: Db,
}

impl RedactWorker {
    pub fn new(
        stage: &str,
        version: &str,
        config: RedactConfig,
        store: ObjectStore,
        db: Db,
    ) -> Result<Self, String> {
        config.check()?;
        // One thread per detection: the stage runs one per core at once (its messages are its
        // parallelism); OpenCV's own pool on top would oversubscribe the cores.
        opencv::core::set_num_threads(1).map_err(|e| format!("OpenCV threads: {e}"))?;
        let detector = Detector::new(
            config.cascade_paths()?,
            config.scale_factor,
            config.min_neighbors,
            config.min_size,
            config.detect_max_side,
        );
        Ok(Self {
            budget: InputBudget::new(config.max_inflight_input_bytes),
            detector,
            config,
            outputs: Outputs::new(store, stage, version),
            db,
        })
    }
}

impl Handler for RedactWorker {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let upload = mediaflow_outputs::image_upload(event)?;
        let _room = self.budget.take(upload.object.size).await?;
        let Some(input) = self
            .outputs
            .read_input(
                &upload.object,
                &upload.media_id,
                "redacted.png",
                self.config.max_input_bytes,
            )
            .await?
        else {
            return Ok(Vec::new());
        };
        let limits = self.config.limits();
        let detector = self.detector.clone();
        let bytes = input.bytes;
        let media_id = upload.media_id.clone();
        // Decoding, detection and the lossless encode are the stage's CPU work: one budget.
        let (redacted, png) = on_cpu(self.outputs.stage(), move || {
            let image = mediaflow_imaging::decode(&bytes, &limits)
                .map_err(|e| StageError::bad_input(format!("image {media_id}: {e}")))?;
            let redacted = detect_and_blur(&detector, image)?;
            let mut png = Vec::new();
            redacted
                .image
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| StageError::permanent(format!("encoding the redacted copy: {e}")))?;
            Ok::<_, StageError>((redacted, png))
        })
        .await??;
        let (width, height) = (redacted.image.width(), redacted.image.height());
        let Written { object, row } = self
            .outputs
            .put(
                &upload.media_id,
                "redacted",
                "redacted.png",
                png,
                "image/png",
                Some((width, height)),
            )
            .await?;
        self.db
            .record_results(mediaflow_db::Entity::Media(&upload.media_id), &[row])
            .await
            .map_err(db_error)?;
        let mut objects: BTreeMap<String, u64> = self
            .config
            .detectors
            .iter()
            .map(|d| (d.label.clone(), 0))
            .collect();
        for d in &redacted.detections {
            *objects.entry(d.label.clone()).or_default() += 1;
        }
        let result = ImageRedacted {
            media_id: upload.media_id.clone(),
            stage: self.outputs.stage().into(),
            stage_version: self.outputs.version().into(),
            input: upload.object.clone(),
            output: object,
            width,
            height,
            pixels: u64::from(width) * u64::from(height),
            objects,
            detections: redacted.detections,
        };
        tracing::info!(media_id = %upload.media_id, found = result.detections.len(), "image redacted");
        Ok(vec![Output::data("out", &result)?])
    }
}

/// What `detect_and_blur` made: the image with every box blurred, and the boxes.
pub struct Redacted {
    pub image: image::DynamicImage,
    pub detections: Vec<Detection>,
}

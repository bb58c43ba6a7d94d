//! Payloads of the media pipeline: an upload, and what stages made from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::EventData;

/// Namespace for deterministic event ids (UUID v5 over the event's identity).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_6469_6166_6c6f_7700_0000_0000_0001);

pub(crate) fn deterministic_id(parts: &[&str]) -> String {
    Uuid::new_v5(&ID_NAMESPACE, parts.join("\u{1f}").as_bytes()).to_string()
}

/// What kind of media an upload is; decides which work queue it goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    Image,
    Video,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
        }
    }
}

impl std::fmt::Display for MediaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MediaKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "image" => Ok(MediaKind::Image),
            "video" => Ok(MediaKind::Video),
            other => Err(format!("unknown media kind `{other}`")),
        }
    }
}

/// A reference to an object in object storage. Events carry these, never media bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub bucket: String,
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the object's bytes.
    pub sha256: String,
    pub content_type: String,
}

impl ObjectRef {
    /// The object an event's data refers to: an upload's `object`, else a result's `input`.
    pub fn referenced_by(data: &serde_json::Value) -> Option<Self> {
        ["object", "input"]
            .iter()
            .find_map(|field| serde_json::from_value(data.get(*field)?.clone()).ok())
    }
}

/// `mediaflow.media.uploaded`: an upload was stored and recorded and is ready for processing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaUploaded {
    pub media_id: String,
    pub kind: MediaKind,
    /// The stored original.
    pub object: ObjectRef,
    /// The client's file name, reduced to a safe base name; metadata only, never part of a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// RFC 3339 time the upload was accepted.
    pub uploaded_at: String,
    /// The batch the upload is an item of (`POST /v1/batches/{id}/media`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchItem>,
}

/// An upload's place in a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    pub batch_id: String,
    /// The item's name: its manifest name, or (a batch declared by its count) the media id.
    pub item: String,
}

impl EventData for MediaUploaded {
    const TYPE: &'static str = "mediaflow.media.uploaded";

    fn subject(&self) -> String {
        self.media_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.media_id])
    }
}

/// One rendition a stage produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenditionRef {
    /// Rendition name, unique per media and stage (e.g. `thumb-256`).
    pub name: String,
    pub object: ObjectRef,
    pub width: u32,
    pub height: u32,
    /// `fit`, `fill` or `crop`.
    pub mode: String,
    /// `jpeg`, `webp` or `png`.
    pub format: String,
}

/// `mediaflow.image.processed`: the image stage made an image's renditions and tags (a result
/// event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessed {
    pub media_id: String,
    /// Lineage: the stage that made the renditions, its version, and the input it read.
    pub stage: String,
    pub stage_version: String,
    pub input: ObjectRef,
    /// Width and height of the source image after orientation was applied.
    pub source_width: u32,
    pub source_height: u32,
    pub renditions: Vec<RenditionRef>,
    /// The image's tags (EXIF, colours, perceptual hash, sharpness, orientation, size class),
    /// also stored as the `tags` result (`tags.json`).
    pub tags: serde_json::Value,
}

impl EventData for ImageProcessed {
    const TYPE: &'static str = "mediaflow.image.processed";

    fn subject(&self) -> String {
        self.media_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.media_id, &self.stage, &self.stage_version])
    }
}

/// One thing a detector found: a box in the image's pixels (as shown, after EXIF orientation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    /// What was found (`face`, `plate`): the detector's name.
    pub label: String,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// `mediaflow.image.redacted`: a detect-and-blur stage found faces and licence plates in an
/// image and wrote a copy with each one blurred (lossless, so only the boxes differ).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRedacted {
    pub media_id: String,
    pub stage: String,
    pub stage_version: String,
    /// The original.
    pub input: ObjectRef,
    /// The redacted copy (PNG).
    pub output: ObjectRef,
    /// Size as shown (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    /// width x height.
    pub pixels: u64,
    /// Label -> how many were found (every detector's label present, 0 included).
    pub objects: BTreeMap<String, u64>,
    pub detections: Vec<Detection>,
}

impl EventData for ImageRedacted {
    const TYPE: &'static str = "mediaflow.image.redacted";

    fn subject(&self) -> String {
        self.media_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.media_id, &self.stage, &self.stage_version])
    }
}

/// One file a stage produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// File name, unique per media and stage.
    pub name: String,
    pub object: ObjectRef,
}

/// `mediaflow.media.processed`: a generic stage (an exec stage, a chain of workers) produced
/// outputs for a media item (a result event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaProcessed {
    pub media_id: String,
    /// Lineage: the stage, its version, and the input it read (none when the event it read
    /// referred to no object).
    pub stage: String,
    pub stage_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ObjectRef>,
    pub outputs: Vec<Output>,
    /// A chain's steps in the order they ran, each with its result (empty for other stages).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepResult>,
}

/// What one step of a chain (a worker run in a chain stage) found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// The step's name in the chain (its worker's name unless declared otherwise).
    pub name: String,
    /// The worker it ran.
    pub worker: String,
    /// What the worker reported (its probe, renditions, tags, or a command's `result.json`).
    pub result: serde_json::Value,
}

impl EventData for MediaProcessed {
    const TYPE: &'static str = "mediaflow.media.processed";

    fn subject(&self) -> String {
        self.media_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.media_id, &self.stage, &self.stage_version])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{decode, encode};

    pub(crate) fn object(key: &str) -> ObjectRef {
        ObjectRef {
            bucket: "media".into(),
            key: key.into(),
            size: 1234,
            sha256: "ab".repeat(32),
            content_type: "image/jpeg".into(),
        }
    }

    pub(crate) fn uploaded() -> MediaUploaded {
        MediaUploaded {
            media_id: "0190c0de-0000-7000-8000-000000000001".into(),
            kind: MediaKind::Image,
            object: object("uploads/0190c0de-0000-7000-8000-000000000001/original.jpg"),
            filename: Some("cat.jpg".into()),
            uploaded_at: "2026-11-23T12:00:00Z".into(),
            batch: Some(BatchItem {
                batch_id: "0190c0de-0000-7000-8000-0000000000b1".into(),
                item: "cat.jpg".into(),
            }),
        }
    }

    pub(crate) fn processed() -> MediaProcessed {
        MediaProcessed {
            media_id: "0190c0de-0000-7000-8000-000000000001".into(),
            stage: "exif".into(),
            stage_version: "1".into(),
            input: Some(object(
                "uploads/0190c0de-0000-7000-8000-000000000001/original.jpg",
            )),
            outputs: vec![Output {
                name: "size.txt".into(),
                object: object("derived/x/exif/v1/size.txt"),
            }],
            steps: vec![StepResult {
                name: "probe".into(),
                worker: "probe".into(),
                result: serde_json::json!({"format": "jpeg", "width": 1024, "height": 768}),
            }],
        }
    }

    pub(crate) fn image_processed() -> ImageProcessed {
        ImageProcessed {
            media_id: "0190c0de-0000-7000-8000-000000000001".into(),
            stage: "image-worker".into(),
            stage_version: "1".into(),
            input: object("uploads/0190c0de-0000-7000-8000-000000000001/original.jpg"),
            source_width: 1024,
            source_height: 768,
            renditions: vec![RenditionRef {
                name: "thumb-256".into(),
                object: object("derived/x/thumb-256.jpg"),
                width: 256,
                height: 192,
                mode: "fit".into(),
                format: "jpeg".into(),
            }],
            tags: serde_json::json!({
                "width": 1024, "height": 768, "orientation": "landscape", "size_class": "small",
                "exif": null, "colours": [{"name": "blue", "hex": "#1428c8", "share": 0.75}],
                "phash": "c3a1e0f01f0f8f87", "sharpness": 412.5
            }),
        }
    }

    #[test]
    fn envelope_round_trips() {
        let data = uploaded();
        let event = encode(&data, "/mediaflow/gateway").unwrap();
        assert_eq!(decode::<MediaUploaded>(&event).unwrap(), data);
    }

    #[test]
    fn decoding_checks_the_type() {
        let event = encode(&uploaded(), "/mediaflow/gateway").unwrap();
        let err = decode::<ImageProcessed>(&event).unwrap_err();
        assert!(
            err.to_string().contains("mediaflow.media.uploaded"),
            "{err}"
        );
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(uploaded().id(), uploaded().id());
        assert_ne!(uploaded().id(), image_processed().id());
        let mut other = image_processed();
        other.stage_version = "2".into();
        assert_ne!(other.id(), image_processed().id());
    }
}

//! The image stage: reads an image upload from object storage, makes a thumbnail on the blocking
//! pool, writes it under a deterministic key, records it, and announces it on the result topic
//! `media.thumbnailed`. Returns only after all three are acknowledged.

use cloudevents::Event;
use mediaflow_bus::{Bus, BusError, Publisher};
use mediaflow_db::{Db, ResultRow};
use mediaflow_events::{MediaKind, MediaThumbnailed, MediaUploaded, ObjectRef, Thumbnail, Topics};
use mediaflow_imaging::{DecodeLimits, ImagingError};
use mediaflow_runtime::{Handler, StageError};
use mediaflow_store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The stage name, also its consumer group and part of every output key.
pub const STAGE: &str = "image-worker";
/// Bumped whenever the output for the same input changes; part of every output key.
pub const STAGE_VERSION: &str = "1";

/// Configuration of the image stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageWorkerConfig {
    /// Longest side of the thumbnail, in pixels.
    pub thumbnail_size: u32,
    /// Largest input object read, in bytes.
    pub max_input_bytes: u64,
    /// Largest accepted width or height of an input image, in pixels (checked before decoding).
    pub max_side: u32,
    /// Largest accepted width x height of an input image.
    pub max_pixels: u64,
}

impl Default for ImageWorkerConfig {
    fn default() -> Self {
        let limits = DecodeLimits::default();
        Self {
            thumbnail_size: 256,
            max_input_bytes: 256 * 1024 * 1024,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        }
    }
}

/// The image stage's handler.
#[derive(Debug)]
pub struct ImageWorker {
    config: ImageWorkerConfig,
    /// Bounds the decodes running at once to the cores there are, however many messages the
    /// runtime has in flight.
    cpu: std::sync::Arc<tokio::sync::Semaphore>,
    store: ObjectStore,
    db: Db,
    publisher: Publisher,
    topics: Topics,
}

impl ImageWorker {
    pub fn new(
        config: ImageWorkerConfig,
        store: ObjectStore,
        db: Db,
        bus: &Bus,
    ) -> Result<Self, BusError> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Ok(Self {
            config,
            cpu: std::sync::Arc::new(tokio::sync::Semaphore::new(cores)),
            store,
            db,
            publisher: bus.publisher("/mediaflow/image-worker")?,
            topics: bus.topics(),
        })
    }

    /// The work queue this stage reads.
    pub fn input_topics(bus: &Bus) -> Vec<String> {
        vec![bus.topics().jobs_image()]
    }

    fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.config.max_side,
            max_pixels: self.config.max_pixels,
            ..DecodeLimits::default()
        }
    }
}

/// Where the thumbnail of `media_id` is written: the same input and stage version always map to
/// the same key.
pub fn thumbnail_key(media_id: &str, size: u32, extension: &str) -> String {
    format!("derived/{media_id}/{STAGE}/v{STAGE_VERSION}/thumb-{size}.{extension}")
}

fn store_error(e: StoreError) -> StageError {
    match e {
        StoreError::TooLarge { .. } => StageError::bad_input(e.to_string()),
        e => StageError::dependency(e.is_transient(), e.to_string()),
    }
}

fn db_error(e: mediaflow_db::DbError) -> StageError {
    StageError::dependency(e.is_transient(), e.to_string())
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Handler for ImageWorker {
    async fn handle(&self, event: &Event) -> Result<(), StageError> {
        let upload: MediaUploaded =
            mediaflow_events::decode(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        if upload.kind != MediaKind::Image {
            return Err(StageError::bad_input(format!(
                "media {} is a {}, not an image",
                upload.media_id, upload.kind
            )));
        }
        // The original may live in another bucket (a backfilled one).
        let input = self
            .store
            .in_bucket(&upload.object.bucket)
            .get(&upload.object.key, self.config.max_input_bytes)
            .await
            .map_err(store_error)?;

        let size = self.config.thumbnail_size;
        let limits = self.limits();
        let bytes = input.bytes;
        let thumb = {
            let _core = self
                .cpu
                .acquire()
                .await
                .map_err(|e| StageError::permanent(e.to_string()))?;
            tokio::task::spawn_blocking(move || mediaflow_imaging::thumbnail(&bytes, size, &limits))
                .await
                .map_err(|e| StageError::permanent(format!("thumbnail task failed: {e}")))?
                .map_err(|e: ImagingError| {
                    StageError::bad_input(format!("image {}: {e}", upload.media_id))
                })?
        };

        let key = thumbnail_key(&upload.media_id, size, thumb.format.extension());
        let content_type = thumb.format.content_type();
        let sha256 = hex_sha256(&thumb.bytes);
        let thumb_size = thumb.bytes.len() as u64;
        self.store
            .put_bytes(&key, bytes::Bytes::from(thumb.bytes), content_type)
            .await
            .map_err(store_error)?;

        let name = format!("thumb-{size}");
        let row = ResultRow {
            media_id: upload.media_id.clone(),
            stage: STAGE.into(),
            stage_version: STAGE_VERSION.into(),
            name: name.clone(),
            bucket: self.store.bucket().to_owned(),
            object_key: key.clone(),
            content_type: content_type.into(),
            size_bytes: thumb_size as i64,
            sha256: sha256.clone(),
            width: Some(i64::from(thumb.width)),
            height: Some(i64::from(thumb.height)),
        };
        self.db
            .record_results(&upload.media_id, &[row])
            .await
            .map_err(db_error)?;

        let result = MediaThumbnailed {
            media_id: upload.media_id.clone(),
            stage: STAGE.into(),
            stage_version: STAGE_VERSION.into(),
            input: upload.object.clone(),
            source_width: thumb.source_width,
            source_height: thumb.source_height,
            thumbnails: vec![Thumbnail {
                name,
                object: ObjectRef {
                    bucket: self.store.bucket().to_owned(),
                    key,
                    size: thumb_size,
                    sha256,
                    content_type: content_type.into(),
                },
                width: thumb.width,
                height: thumb.height,
            }],
        };
        self.publisher
            .publish(&self.topics.media_thumbnailed(), &result)
            .await
            .map_err(|e| StageError::transient(e.to_string()))?;
        tracing::info!(media_id = %upload.media_id, width = thumb.width, height = thumb.height, "thumbnail made");
        Ok(())
    }

    async fn give_up(&self, event: Option<&Event>, error: &StageError) -> Result<(), StageError> {
        let Some(upload) = event.and_then(|e| mediaflow_events::decode::<MediaUploaded>(e).ok())
        else {
            return Ok(());
        };
        self.db
            .mark_failed(&upload.media_id, &error.to_string())
            .await
            .map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnail_keys_are_deterministic_and_versioned() {
        let a = thumbnail_key("m1", 256, "jpg");
        assert_eq!(a, thumbnail_key("m1", 256, "jpg"));
        assert_eq!(a, "derived/m1/image-worker/v1/thumb-256.jpg");
    }
}

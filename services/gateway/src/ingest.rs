//! Admitting a stored object into the pipeline: record it as a queued media item and announce it
//! on `media.uploaded`. Shared by uploads and by sources (the S3 backfill).

use mediaflow_bus::{Bus, BusError, Publisher};
use mediaflow_db::{Db, DbError, MediaRow, MediaStatus};
use mediaflow_events::{BatchItem, EventData, MediaKind, MediaUploaded, ObjectRef};

/// Why an object could not be admitted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("recording the media item: {0}")]
    Db(#[from] DbError),
    #[error("announcing the media item: {0}")]
    Bus(#[from] BusError),
}

/// Where admitted media is announced: `media.uploaded` (under the bus's prefix) through a
/// publisher, and the stages that read it, for which each item is queued.
pub struct Intake<'a> {
    pub bus: &'a Bus,
    pub publisher: &'a Publisher,
    pub stages: &'a [String],
}

/// Records `object` as media item `id`, queued for the intake's stages, and announces it. If
/// the announcement fails the row is removed again, so a retry starts clean: an item is queued
/// exactly when it was announced.
pub async fn record_and_announce(
    db: &Db,
    intake: &Intake<'_>,
    id: &str,
    kind: MediaKind,
    object: ObjectRef,
    filename: Option<String>,
    batch: Option<BatchItem>,
) -> Result<MediaUploaded, IngestError> {
    let Intake {
        bus,
        publisher,
        stages,
    } = intake;
    let now = Db::now_ms();
    let row = MediaRow {
        id: id.to_owned(),
        kind: kind.to_string(),
        content_type: object.content_type.clone(),
        filename: filename.clone(),
        bucket: object.bucket.clone(),
        object_key: object.key.clone(),
        size_bytes: object.size as i64,
        sha256: object.sha256.clone(),
        status: MediaStatus::Queued,
        error: None,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let event = MediaUploaded {
        media_id: id.to_owned(),
        kind,
        object,
        filename,
        uploaded_at: chrono::DateTime::from_timestamp_millis(now)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        batch,
    };
    db.insert_media(&row, &event.id(), stages).await?;
    if let Err(e) = publisher
        .publish(&bus.topics().media_uploaded(), &event)
        .await
    {
        if let Err(del) = db.delete_media(id).await {
            tracing::error!(media_id = %id, error = %del, "could not remove unannounced media");
        }
        return Err(e.into());
    }
    Ok(event)
}

impl From<IngestError> for crate::ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Db(e) => e.into(),
            IngestError::Bus(e) => e.into(),
        }
    }
}

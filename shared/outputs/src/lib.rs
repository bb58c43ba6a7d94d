//! How a built-in stage writes what it makes for a media item: under a deterministic key
//! (`derived/<media_id>/<stage>/v<version>/<file>`, the same input and stage version always map
//! to the same key, so a redelivered message overwrites instead of duplicating), as an object
//! described by an [`ObjectRef`] and a [`ResultRow`], with store and database failures classified
//! for the runtime (bad input, transient, permanent).

use mediaflow_db::{DbError, Entity, ResultRow};
use mediaflow_events::{ObjectRef, RenditionRef};
use mediaflow_imaging::renditions::Rendition;
use mediaflow_runtime::StageError;
use mediaflow_store::{ObjectStore, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Where one stage version writes.
#[derive(Clone, Debug)]
pub struct Outputs {
    store: ObjectStore,
    stage: String,
    version: String,
}

/// One written output: what the event carries and what the database records.
#[derive(Clone, Debug)]
pub struct Written {
    pub object: ObjectRef,
    pub row: ResultRow,
}

impl Outputs {
    pub fn new(store: ObjectStore, stage: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            store,
            stage: stage.into(),
            version: version.into(),
        }
    }

    /// The stage these outputs are written by, and its version: their lineage.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The key of output file `file` of `media_id`.
    pub fn key(&self, media_id: &str, file: &str) -> String {
        key(&self.stage, &self.version, media_id, file)
    }

    /// Reads a stage's input object, or finds that the input was handled before: when the
    /// object is gone and this stage's own output `file` for `media_id` exists, a join deleted
    /// the original once every branch's output existed (`delete_originals`), and this is a
    /// redelivery of a message already handled (its event published; the join released on it).
    /// `None` then: the redelivery is done, with nothing to publish again.
    pub async fn read_input(
        &self,
        input: &ObjectRef,
        media_id: &str,
        file: &str,
        limit: u64,
    ) -> Result<Option<mediaflow_store::Object>, StageError> {
        match self
            .store
            .in_bucket(&input.bucket)
            .get(&input.key, limit)
            .await
        {
            Ok(object) => Ok(Some(object)),
            Err(StoreError::NotFound { key }) => {
                let output = self.key(media_id, file);
                if self.store.exists(&output).await.map_err(store_error)? {
                    tracing::info!(media_id, input = %key, %output,
                        "the original is gone and this stage's output exists: handled before");
                    Ok(None)
                } else {
                    Err(store_error(StoreError::NotFound { key }))
                }
            }
            Err(e) => Err(store_error(e)),
        }
    }

    /// The key of output file `file` of `entity`: an item's go under `derived/items/`.
    pub fn key_for(&self, entity: Entity<'_>, file: &str) -> String {
        match entity {
            Entity::Media(id) => self.key(id, file),
            Entity::Item(id) => key(&self.stage, &self.version, &format!("items/{id}"), file),
        }
    }

    /// Writes `bytes` as output `file` of `media_id`, recorded as result `name`.
    pub async fn put(
        &self,
        media_id: &str,
        name: &str,
        file: &str,
        bytes: Vec<u8>,
        content_type: &str,
        dims: Option<(u32, u32)>,
    ) -> Result<Written, StageError> {
        self.put_for(
            Entity::Media(media_id),
            name,
            file,
            bytes,
            content_type,
            dims,
        )
        .await
    }

    /// Writes `bytes` as output `file` of `entity` (a media item, or an item from a source or
    /// another system: `derived/items/<id>/<stage>/v<version>/<file>`), recorded as result
    /// `name`.
    pub async fn put_for(
        &self,
        entity: Entity<'_>,
        name: &str,
        file: &str,
        bytes: Vec<u8>,
        content_type: &str,
        dims: Option<(u32, u32)>,
    ) -> Result<Written, StageError> {
        let key = self.key_for(entity, file);
        let object = ObjectRef {
            bucket: self.store.bucket().to_owned(),
            key: key.clone(),
            size: bytes.len() as u64,
            sha256: hex_sha256(&bytes),
            content_type: content_type.into(),
        };
        self.store
            .put_bytes(
                &key,
                bytes::Bytes::from(bytes),
                content_type,
                &object.sha256,
            )
            .await
            .map_err(store_error)?;
        let row = ResultRow {
            entity_id: entity.id().to_owned(),
            stage: self.stage.clone(),
            stage_version: self.version.clone(),
            name: name.to_owned(),
            bucket: object.bucket.clone(),
            object_key: key,
            content_type: content_type.into(),
            size_bytes: object.size as i64,
            sha256: object.sha256.clone(),
            width: dims.map(|d| i64::from(d.0)),
            height: dims.map(|d| i64::from(d.1)),
        };
        Ok(Written { object, row })
    }
}

impl Outputs {
    /// Writes rendition `r` of `media_id` as `<name>.<extension>`, recorded as result `name`
    /// (`r.name` itself when `name` is `None`), and describes it for a result event.
    pub async fn put_rendition(
        &self,
        media_id: &str,
        name: Option<&str>,
        r: Rendition,
    ) -> Result<(RenditionRef, ResultRow), StageError> {
        let name = name.unwrap_or(&r.name).to_owned();
        let file = format!("{name}.{}", r.format.extension());
        let Written { object, row } = self
            .put(
                media_id,
                &name,
                &file,
                r.bytes,
                r.format.content_type(),
                Some((r.width, r.height)),
            )
            .await?;
        let reference = RenditionRef {
            name: r.name,
            object,
            width: r.width,
            height: r.height,
            mode: enum_name(&r.mode),
            format: enum_name(&r.format),
        };
        Ok((reference, row))
    }
}

/// `derived/<media_id>/<stage>/v<version>/<file>`.
pub fn key(stage: &str, version: &str, media_id: &str, file: &str) -> String {
    format!("derived/{media_id}/{stage}/v{version}/{file}")
}

/// Streams `object` (from its own bucket: a backfilled original may live in another) to the
/// local file `to`, refusing it as bad input once it is over `limit` bytes.
pub async fn download(
    store: &ObjectStore,
    object: &ObjectRef,
    to: &std::path::Path,
    limit: u64,
) -> Result<(), StageError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    let key = &object.key;
    let over =
        || StageError::bad_input(format!("input `{key}` is over the limit of {limit} bytes"));
    let stream = store
        .in_bucket(&object.bucket)
        .get_stream(key)
        .await
        .map_err(store_error)?;
    if stream.size.is_some_and(|s| s > limit) {
        return Err(over());
    }
    // Local disk trouble (full, permissions) is not the input's fault and may pass.
    let local = |e: std::io::Error| StageError::transient(format!("writing the input file: {e}"));
    // Written 1 MiB at a time: each write is a hop to the blocking pool.
    let mut file = tokio::io::BufWriter::with_capacity(
        1024 * 1024,
        tokio::fs::File::create(to).await.map_err(local)?,
    );
    let mut body = stream.body;
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| StageError::transient(format!("downloading `{key}`: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(over());
        }
        file.write_all(&chunk).await.map_err(local)?;
    }
    file.flush().await.map_err(local)
}

/// Bounds the input bytes a stage holds at once (in memory or on local disk), whatever its
/// concurrency: a message takes its input's size from the budget before fetching it, and gives
/// it back when it is done. An input larger than the whole budget takes all of it.
#[derive(Clone, Debug)]
pub struct InputBudget {
    mib: std::sync::Arc<tokio::sync::Semaphore>,
    total_mib: u32,
}

impl InputBudget {
    /// A budget of `bytes` (at least 1 MiB), counted in whole MiB.
    pub fn new(bytes: u64) -> Self {
        let total_mib = u32::try_from(bytes.div_ceil(MIB))
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_PERMITS);
        Self {
            mib: std::sync::Arc::new(tokio::sync::Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    /// Room for `INPUTS` inputs of `max_input_bytes` each: what a stage with the former fixed
    /// concurrency of 4 could hold at worst.
    pub fn for_inputs_up_to(max_input_bytes: u64) -> Self {
        Self::new(max_input_bytes.saturating_mul(INPUTS))
    }

    /// Waits until `size` bytes (at least 1 MiB) fit in the budget and takes them.
    pub async fn take(&self, size: u64) -> Result<tokio::sync::OwnedSemaphorePermit, StageError> {
        let mib = u32::try_from(size.div_ceil(MIB))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_mib);
        self.mib
            .clone()
            .acquire_many_owned(mib)
            .await
            .map_err(|e| StageError::permanent(format!("input budget: {e}")))
    }
}

const MIB: u64 = 1024 * 1024;
/// Inputs of the largest size a budget made by `for_inputs_up_to` holds.
const INPUTS: u64 = 4;
/// The most permits a tokio semaphore holds, well above any budget in MiB.
const MAX_PERMITS: u32 = 1 << 28;

/// An object over the read limit is the input's fault; the rest depends on the store.
/// The upload `event` announces, which must be an image: bad input otherwise.
pub fn image_upload(
    event: &cloudevents::Event,
) -> Result<mediaflow_events::MediaUploaded, StageError> {
    let upload: mediaflow_events::MediaUploaded =
        mediaflow_events::decode(event).map_err(|e| StageError::bad_input(e.to_string()))?;
    if upload.kind != mediaflow_events::MediaKind::Image {
        return Err(StageError::bad_input(format!(
            "media {} is a {}, not an image",
            upload.media_id, upload.kind
        )));
    }
    Ok(upload)
}

pub fn store_error(e: StoreError) -> StageError {
    match e {
        StoreError::TooLarge { .. } => StageError::bad_input(e.to_string()),
        e => StageError::dependency(e.is_transient(), e.to_string()),
    }
}

pub fn db_error(e: DbError) -> StageError {
    StageError::dependency(e.is_transient(), e.to_string())
}

/// How a unit enum serialises (`fit`, `jpeg`, `keyframe`).
pub fn enum_name(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_versioned() {
        assert_eq!(
            key("image-worker", "2", "m1", "thumb-256.jpg"),
            "derived/m1/image-worker/v2/thumb-256.jpg"
        );
        assert_eq!(hex_sha256(b"").len(), 64);
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum E {
            KeyFrame,
        }
        assert_eq!(enum_name(&E::KeyFrame), "key_frame");
    }
}

#[cfg(test)]
mod budget_tests {
    use super::InputBudget;
    use futures::FutureExt;

    #[tokio::test]
    async fn inputs_wait_for_room_in_the_budget() {
        let budget = InputBudget::new(3 * 1024 * 1024);
        let first = budget.take(2 * 1024 * 1024).await.unwrap();
        // 1 MiB fits beside the first 2 MiB (sizes round up to whole MiB); 2 MiB more do not.
        let small = budget.take(10).now_or_never().expect("1 MiB fits").unwrap();
        drop(small);
        let second = budget.take(2 * 1024 * 1024);
        futures::pin_mut!(second);
        assert!(second.as_mut().now_or_never().is_none());
        drop(first);
        assert!(
            second.now_or_never().is_some(),
            "room once the first is done"
        );
        // An input larger than the whole budget takes all of it rather than waiting forever.
        let all = budget
            .take(1 << 40)
            .now_or_never()
            .expect("takes the whole budget");
        assert!(all.is_ok());
    }
}

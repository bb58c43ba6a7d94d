//! The REST gateway. Accepts uploads (streamed raw bodies or multipart forms), stores them in
//! object storage, records them in the database and announces them on `media.uploaded`; serves
//! status, results and result downloads, the sign-up API (`users`), plus `/healthz`, `/readyz`
//! and `/metrics`.

pub mod admin;
pub mod archive;
pub mod batches;
mod error;
pub mod ingest;
mod sniff;
mod spool;
pub mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mediaflow_bus::{Bus, Publisher};
use mediaflow_db::{Db, MediaStatus};
use mediaflow_events::{BatchItem, ObjectRef};
use mediaflow_store::ObjectStore;
use mediaflow_telemetry::Metrics;
use serde::{Deserialize, Serialize};

pub use error::ApiError;
pub use sniff::{SNIFF_LEN, Sniffed, sniff};

/// Configuration of the gateway.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: u64,
    /// Folder for spooling uploads while they stream in; the system temp folder when unset.
    pub spool_dir: Option<PathBuf>,
    /// Uploads up to this size are received in memory; larger ones are spooled to
    /// `spool_dir` while they stream in. Bounds upload memory to about this many bytes times
    /// `max_concurrent_uploads`.
    pub spool_memory_bytes: u64,
    /// Lifetime of presigned download URLs in API responses, in seconds.
    pub presign_ttl_secs: u64,
    /// Uploads received at once; more get `503` with `Retry-After`. Bounds spool disk use to
    /// about this many times `max_upload_bytes` (an archive counts as one upload).
    pub max_concurrent_uploads: usize,
    /// Largest zip archive `POST /v1/batches/{id}/zip` takes, in bytes.
    pub max_archive_bytes: u64,
    /// Most entries (files and directories) such an archive may have.
    pub max_archive_entries: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_upload_bytes: 256 * 1024 * 1024,
            spool_dir: None,
            spool_memory_bytes: 16 * 1024 * 1024,
            presign_ttl_secs: 3600,
            max_concurrent_uploads: 16,
            max_archive_bytes: 4 * 1024 * 1024 * 1024,
            max_archive_entries: 10_000,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config: GatewayConfig,
    uploads: Arc<tokio::sync::Semaphore>,
    spool_dir: PathBuf,
    store: ObjectStore,
    db: Db,
    bus: Bus,
    publisher: Publisher,
    metrics: Metrics,
    /// The stages that read `media.uploaded`: an upload is queued for each.
    upload_stages: Vec<String>,
    /// The sign-up API, when the platform runs the sign-up flow.
    signup: Option<users::SignupApi>,
}

/// The stage name the gateway stamps on its events.
pub const SOURCE: &str = "/mediaflow/gateway";

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        store: ObjectStore,
        db: Db,
        bus: Bus,
        metrics: Metrics,
    ) -> Result<Self, mediaflow_bus::BusError> {
        let publisher = bus.publisher(SOURCE)?;
        let spool_dir = config.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_uploads.max(1),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                uploads,
                spool_dir,
                store,
                db,
                bus,
                publisher,
                metrics,
                upload_stages: Vec::new(),
                signup: None,
            }),
        })
    }

    /// With `stages` as the stages an upload is queued for (those reading `media.uploaded`).
    #[must_use]
    pub fn with_upload_stages(mut self, stages: Vec<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.upload_stages = stages;
        }
        self
    }

    /// With the sign-up API (`/v1/users`); without it those routes answer 404.
    #[must_use]
    pub fn with_signup(mut self, signup: users::SignupApi) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.signup = Some(signup);
        }
        self
    }

    /// A place among the `max_concurrent_uploads` uploads received at once, or `Busy`.
    fn upload_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.inner
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy)
    }

    /// The HTTP routes.
    pub fn router(self) -> Router {
        let body_limit = usize::try_from(self.inner.config.max_upload_bytes + MULTIPART_FRAMING)
            .unwrap_or(usize::MAX);
        let admin = admin::router(
            self.inner.bus.clone(),
            self.inner.store.clone(),
            self.inner.db.clone(),
            self.inner.metrics.clone(),
        );
        Router::new()
            .route("/v1/media", post(upload))
            .route("/v1/media/{id}", get(media_status))
            .route("/v1/media/{id}/results/{name}", get(download_result))
            .route("/v1/batches/{id}/media", post(batch_upload))
            .route("/v1/batches/{id}/zip", post(archive::upload_zip))
            // Raw bodies are limited while they stream (`spool`); this bounds what the multipart
            // parser reads, part headers included.
            .layer(DefaultBodyLimit::max(body_limit))
            .merge(users::routes())
            .merge(batches::routes())
            .with_state(self)
            .merge(admin)
    }
}

/// Body of a `202 Accepted` upload response.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub id: String,
    pub status: MediaStatus,
    pub status_url: String,
    pub kind: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

/// `POST /v1/media`; with an `X-Batch-Id` header, as `POST /v1/batches/{id}/media`.
async fn upload(State(gw): State<Gateway>, request: Request) -> Response {
    let batch = request
        .headers()
        .get("x-batch-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned());
    answer_upload(&gw, request, batch).await
}

/// An upload that takes an item of batch `id`.
async fn batch_upload(
    State(gw): State<Gateway>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    answer_upload(&gw, request, Some(id)).await
}

async fn answer_upload(gw: &Gateway, request: Request, batch: Option<String>) -> Response {
    let result = accept_upload(gw, request, batch).await;
    match result {
        Ok(accepted) => {
            gw.inner.metrics.upload("accepted", accepted.size);
            let location = accepted.status_url.clone();
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(accepted),
            )
                .into_response()
        }
        Err(e) => {
            gw.inner.metrics.upload(e.code(), 0);
            e.into_response()
        }
    }
}

/// The client's filename reduced to a safe base name: no directories, no control characters.
fn safe_filename(raw: &str) -> Option<String> {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !c.is_control()).take(255).collect();
    let clean = clean.trim().trim_start_matches('.').to_owned();
    (!clean.is_empty()).then_some(clean)
}

/// Room for multipart boundaries and part headers around the file.
const MULTIPART_FRAMING: u64 = 64 * 1024;

/// Refuses an upload that cannot take an item of `batch` (by its file name), before its bytes
/// are read.
async fn check_batch(
    gw: &Gateway,
    batch: Option<&str>,
    filename: Option<&str>,
) -> Result<(), ApiError> {
    let Some(batch) = batch else {
        return Ok(());
    };
    let take = batches::store(gw).check(batch, filename).await?;
    batches::refusal(take).map_or(Ok(()), Err)
}

async fn accept_upload(
    gw: &Gateway,
    request: Request,
    batch: Option<String>,
) -> Result<Accepted, ApiError> {
    let _permit = gw.upload_permit()?;
    let limit = gw.inner.config.max_upload_bytes;
    let memory = gw.inner.config.spool_memory_bytes;
    let headers = request.headers().clone();
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());

    let is_multipart = declared.as_deref() == Some("multipart/form-data");
    let framing = if is_multipart { MULTIPART_FRAMING } else { 0 };
    if declared_len.is_some_and(|n| n > limit + framing) {
        return Err(ApiError::TooLarge { limit });
    }

    let (spooled, declared, filename) = if is_multipart {
        let mut form =
            Multipart::from_request(request, &())
                .await
                .map_err(|e| ApiError::BadRequest {
                    detail: e.body_text(),
                })?;
        let bad = |e: axum::extract::multipart::MultipartError| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit }
            } else {
                ApiError::BadRequest {
                    detail: format!("malformed multipart body: {}", e.body_text()),
                }
            }
        };
        let mut found = None;
        while let Some(field) = form.next_field().await.map_err(bad)? {
            if field.file_name().is_none() && field.name() != Some("file") {
                continue;
            }
            if found.is_some() {
                return Err(ApiError::BadRequest {
                    detail: "send one file per request".into(),
                });
            }
            let filename = field.file_name().and_then(safe_filename);
            check_batch(gw, batch.as_deref(), filename.as_deref()).await?;
            let declared = field.content_type().map(str::to_ascii_lowercase);
            let spooled = spool::spool(&gw.inner.spool_dir, field, limit, memory).await?;
            found = Some((spooled, declared, filename));
        }
        found.ok_or_else(|| ApiError::BadRequest {
            detail: "the multipart form has no file field (send the file as a field named `file`)"
                .into(),
        })?
    } else {
        let filename = filename_from_headers(&headers);
        check_batch(gw, batch.as_deref(), filename.as_deref()).await?;
        let body = request.into_body().into_data_stream();
        (
            spool::spool(&gw.inner.spool_dir, body, limit, memory).await?,
            declared,
            filename,
        )
    };

    if spooled.size == 0 {
        return Err(ApiError::EmptyBody);
    }
    let detected = sniff(&spooled.head);
    let format = match detected {
        Some(s) if s.supported => s,
        other => {
            return Err(ApiError::UnsupportedMedia {
                declared,
                detected: other.map(|s| s.content_type),
            });
        }
    };

    // From here on the upload is committed as one unit: a client that disconnects must not stop
    // it between the row and the event.
    let gw = gw.clone();
    tokio::spawn(async move { commit_upload(&gw, spooled, format, filename, batch).await })
        .await
        .map_err(|e| ApiError::Internal {
            internal: format!("upload task: {e}"),
        })?
}

/// Stores a received upload, records it and announces it; answers what the client is told.
async fn commit_upload(
    gw: &Gateway,
    spooled: spool::Spooled,
    format: Sniffed,
    filename: Option<String>,
    batch: Option<String>,
) -> Result<Accepted, ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    // The batch's item is taken before the object is stored, and given back if the upload
    // fails after: a refused upload leaves nothing behind.
    let batch = match batch {
        None => None,
        Some(batch_id) => {
            let item = batches::store(gw)
                .take(&batch_id, filename.as_deref(), &id, Db::now_ms())
                .await?
                .map_err(|refused| {
                    batches::refusal(refused).unwrap_or(ApiError::Internal {
                        internal: format!("batch {batch_id}: an item refused without a reason"),
                    })
                })?;
            Some(BatchItem { batch_id, item })
        }
    };
    let stored = store_and_announce(gw, &id, &spooled, &format, filename, batch.clone()).await;
    if let (Err(_), Some(b)) = (&stored, &batch)
        && let Err(e) = batches::store(gw).give_back(&b.batch_id, &id).await
    {
        tracing::error!(batch = %b.batch_id, media_id = %id, error = %e, "could not give back a failed upload's batch item");
    }
    stored
}

/// Stores upload `id`'s object, records it and announces it.
async fn store_and_announce(
    gw: &Gateway,
    id: &str,
    spooled: &spool::Spooled,
    format: &Sniffed,
    filename: Option<String>,
    batch: Option<BatchItem>,
) -> Result<Accepted, ApiError> {
    let id = id.to_owned();
    let key = format!("uploads/{id}/original.{}", format.extension);
    let store = &gw.inner.store;
    match &spooled.body {
        spool::Body::Memory(bytes) => {
            store
                .put_bytes(&key, bytes.clone(), format.content_type, &spooled.sha256)
                .await?;
        }
        spool::Body::File(path) => store.put_file(&key, path, format.content_type).await?,
    }

    let object = ObjectRef {
        bucket: gw.inner.store.bucket().to_owned(),
        key,
        size: spooled.size,
        sha256: spooled.sha256.clone(),
        content_type: format.content_type.to_owned(),
    };
    let inner = &gw.inner;
    let intake = ingest::Intake {
        bus: &inner.bus,
        publisher: &inner.publisher,
        stages: &inner.upload_stages,
    };
    ingest::record_and_announce(
        &inner.db,
        &intake,
        &id,
        format.kind,
        object,
        filename,
        batch,
    )
    .await?;
    tracing::info!(media_id = %id, kind = %format.kind, size = spooled.size, "upload accepted");
    Ok(Accepted {
        status_url: format!("/v1/media/{id}"),
        id,
        status: MediaStatus::Queued,
        kind: format.kind.to_string(),
        content_type: format.content_type.to_owned(),
        size: spooled.size,
        sha256: spooled.sha256.clone(),
    })
}

/// `Content-Disposition: attachment; filename="x.jpg"` or `X-Filename: x.jpg` on raw uploads.
fn filename_from_headers(headers: &HeaderMap) -> Option<String> {
    if let Some(name) = headers.get("x-filename").and_then(|v| v.to_str().ok()) {
        return safe_filename(name);
    }
    let disposition = headers.get(header::CONTENT_DISPOSITION)?.to_str().ok()?;
    let value = disposition
        .split(';')
        .find_map(|p| p.trim().strip_prefix("filename="))?;
    safe_filename(value.trim_matches('"'))
}

/// A stage result as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResultView {
    pub name: String,
    pub stage: String,
    pub stage_version: String,
    pub bucket: String,
    pub key: String,
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
    /// Pixel size, for image results.
    pub width: Option<i64>,
    pub height: Option<i64>,
    /// Download through the gateway.
    pub download_url: String,
    /// Direct download from object storage, valid for a limited time.
    pub presigned_url: Option<String>,
}

/// `GET /v1/media/{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MediaView {
    pub id: String,
    pub kind: String,
    pub status: MediaStatus,
    pub error: Option<String>,
    pub content_type: String,
    pub filename: Option<String>,
    pub size: i64,
    pub sha256: String,
    pub original: ObjectLocation,
    pub created_at: String,
    pub updated_at: String,
    /// Each stage's own state for this media: `status` is derived from them (failed if one
    /// failed, queued while one is queued or running, done when all are done).
    pub stages: Vec<StageView>,
    pub results: Vec<ResultView>,
}

/// One stage's state for a media item.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageView {
    pub stage: String,
    pub state: mediaflow_db::StageState,
    pub error: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ObjectLocation {
    pub bucket: String,
    pub key: String,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_id(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::NotFound {
            what: format!("media `{}`", id.chars().take(64).collect::<String>()),
        })
}

async fn media_status(
    State(gw): State<Gateway>,
    Path(id): Path<String>,
) -> Result<Json<MediaView>, ApiError> {
    let id = parse_id(&id)?;
    let media = gw.inner.db.media(&id).await?.ok_or(ApiError::NotFound {
        what: format!("media `{id}`"),
    })?;
    let ttl = Duration::from_secs(gw.inner.config.presign_ttl_secs);
    let mut results = Vec::new();
    for r in gw.inner.db.results(&id).await? {
        let presigned_url = match gw.inner.store.presigned_get(&r.object_key, ttl).await {
            Ok(url) => Some(url),
            Err(e) => {
                tracing::warn!(key = %r.object_key, error = %e, "could not presign");
                None
            }
        };
        results.push(ResultView {
            download_url: format!("/v1/media/{id}/results/{}", r.name),
            name: r.name,
            stage: r.stage,
            stage_version: r.stage_version,
            bucket: r.bucket,
            key: r.object_key,
            content_type: r.content_type,
            size: r.size_bytes,
            sha256: r.sha256,
            width: r.width,
            height: r.height,
            presigned_url,
        });
    }
    Ok(Json(MediaView {
        id: media.id,
        kind: media.kind,
        status: media.status,
        error: media.error,
        content_type: media.content_type,
        filename: media.filename,
        size: media.size_bytes,
        sha256: media.sha256,
        original: ObjectLocation {
            bucket: media.bucket,
            key: media.object_key,
        },
        created_at: rfc3339(media.created_at_ms),
        updated_at: rfc3339(media.updated_at_ms),
        stages: gw
            .inner
            .db
            .stage_states(&id)
            .await?
            .into_iter()
            .map(|s| StageView {
                stage: s.stage,
                state: s.state,
                error: s.error,
                updated_at: rfc3339(s.updated_at_ms),
            })
            .collect(),
        results,
    }))
}

async fn download_result(
    State(gw): State<Gateway>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let results = gw.inner.db.results(&id).await?;
    let result = results
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ApiError::NotFound {
            what: format!("result `{name}` of media `{id}`"),
        })?;
    let object = gw.inner.store.get_stream(&result.object_key).await?;
    let mut response = Body::from_stream(object.body).into_response();
    let headers = response.headers_mut();
    let value = |v: String| axum::http::HeaderValue::try_from(v).ok();
    if let Some(v) = value(result.content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Some(v) = value(format!("\"{}\"", result.sha256)) {
        headers.insert(header::ETAG, v);
    }
    if let Some(len) = object.size.and_then(|n| value(n.to_string())) {
        headers.insert(header::CONTENT_LENGTH, len);
    }
    headers.insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_their_paths() {
        assert_eq!(safe_filename("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(
            safe_filename("C:\\Users\\me\\cat.jpg").as_deref(),
            Some("cat.jpg")
        );
        assert_eq!(safe_filename("..").as_deref(), None);
        assert_eq!(safe_filename("a\u{0}b.png").as_deref(), Some("ab.png"));
        assert_eq!(safe_filename("").as_deref(), None);
    }
}

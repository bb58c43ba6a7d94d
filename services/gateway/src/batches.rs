//! The batch API (ch. 12): `POST /v1/batches` declares a batch (a name, an item count or a
//! manifest of file names, a failure policy, a timeout); `POST /v1/batches/{id}/media` uploads
//! one of its items (the upload API, with the item taken before the object is stored);
//! `GET /v1/batches/{id}` shows its items by status and each stage's items by state.

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mediaflow_batches::{BatchRequest, BatchRow, Batches, BatchesError, Progress, Take};
use mediaflow_users::now_ms;
use serde::Serialize;

use crate::{ApiError, Gateway};

/// Largest batch declaration: a manifest of 100,000 names fits.
const MAX_BODY: usize = 8 * 1024 * 1024;

pub(crate) fn routes() -> Router<Gateway> {
    Router::new()
        .route("/v1/batches", post(create))
        .route("/v1/batches/{id}", get(show))
}

pub(crate) fn store(gw: &Gateway) -> Batches {
    Batches::new(gw.inner.db.clone())
}

impl From<BatchesError> for ApiError {
    fn from(e: BatchesError) -> Self {
        match e {
            BatchesError::Db(e) => e.into(),
        }
    }
}

/// A batch as the API shows it.
#[derive(Debug, Serialize)]
pub struct BatchView {
    #[serde(flatten)]
    pub batch: BatchRow,
    pub progress: Progress,
    /// Every reducer's report of the batch, by reduce stage (`report` is the one the pipeline
    /// names the batch's own).
    pub reports: std::collections::BTreeMap<String, serde_json::Value>,
    pub status_url: String,
    /// Where its items are uploaded.
    pub upload_url: String,
}

async fn view(gw: &Gateway, batch: BatchRow) -> Result<BatchView, ApiError> {
    let progress = store(gw).progress(&batch.id).await?;
    let reports = store(gw).reports(&batch.id).await?;
    Ok(BatchView {
        reports,
        status_url: format!("/v1/batches/{}", batch.id),
        upload_url: format!("/v1/batches/{}/media", batch.id),
        batch,
        progress,
    })
}

async fn create(State(gw): State<Gateway>, request: Request) -> Result<Response, ApiError> {
    let body: BatchRequest = crate::users::json_body(request, MAX_BODY).await?;
    let spec = body.validate().map_err(|e| ApiError::Refused {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "invalid-batch",
        title: "Invalid batch",
        detail: e.to_string(),
    })?;
    let id = uuid::Uuid::now_v7().to_string();
    let batch = store(&gw).create(&id, &spec, now_ms()).await?;
    tracing::info!(batch = %id, name = %batch.name, items = batch.expected_items, "batch created");
    let view = view(&gw, batch).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, view.status_url.clone())],
        Json(view),
    )
        .into_response())
}

async fn show(State(gw): State<Gateway>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let batch = store(&gw).batch(&id).await?.ok_or(ApiError::NotFound {
        what: format!("batch `{}`", id.chars().take(64).collect::<String>()),
    })?;
    Ok(Json(view(&gw, batch).await?).into_response())
}

/// Why an upload cannot be an item of its batch, as the API says it; None when it can.
pub(crate) fn refusal(take: Take) -> Option<ApiError> {
    let (status, code, title, detail) = match take {
        Take::Taken => return None,
        Take::UnknownBatch => {
            return Some(ApiError::NotFound {
                what: "this batch".into(),
            });
        }
        Take::Closed => (
            StatusCode::CONFLICT,
            "batch-closed",
            "Batch closed",
            "the batch has completed and takes no more uploads",
        ),
        Take::Full => (
            StatusCode::CONFLICT,
            "batch-full",
            "Batch full",
            "every item of the batch has been uploaded",
        ),
        Take::NameNeeded => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "item-name-needed",
            "Item name needed",
            "this batch's items are its manifest's file names: name the file (`X-Filename`, \
             `Content-Disposition`, or the multipart part's file name)",
        ),
        Take::NotInManifest => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-in-manifest",
            "Not in the manifest",
            "the file name is not one of the batch's manifest",
        ),
        Take::AlreadyTaken => (
            StatusCode::CONFLICT,
            "item-taken",
            "Item already uploaded",
            "an upload with this file name is already an item of the batch",
        ),
    };
    Some(ApiError::Refused {
        status,
        code,
        title,
        detail: detail.into(),
    })
}

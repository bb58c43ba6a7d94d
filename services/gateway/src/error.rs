//! `ApiError`: every failure the API reports, rendered as an RFC 9457 problem document
//! (`application/problem+json`). Internal details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A failure of an API request.
#[derive(Debug)]
pub enum ApiError {
    EmptyBody,
    TooLarge {
        limit: u64,
    },
    UnsupportedMedia {
        declared: Option<String>,
        detected: Option<&'static str>,
    },
    BadRequest {
        detail: String,
    },
    NotFound {
        what: String,
    },
    /// Too many uploads in progress.
    Busy,
    /// A request the API understood and refuses, with its own status and problem type.
    Refused {
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: String,
    },
    /// A request refused for now (429, with `Retry-After`): a rate limit.
    TooSoon {
        code: &'static str,
        title: &'static str,
        detail: String,
        retry_after_secs: u64,
    },
    /// A dependency (object store, database, broker) failed; retrying later can succeed.
    Unavailable {
        dependency: &'static str,
        internal: String,
    },
    Internal {
        internal: String,
    },
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    ty: String,
    title: &'a str,
    status: u16,
    detail: String,
    code: &'a str,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str, String) {
        match self {
            ApiError::EmptyBody => (
                StatusCode::BAD_REQUEST,
                "empty-body",
                "Empty upload",
                "the upload body is empty (0 bytes); send the file's bytes as the request body \
                 or as a multipart `file` field"
                    .into(),
            ),
            ApiError::TooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Upload too large",
                format!("the upload exceeds the limit of {limit} bytes"),
            ),
            ApiError::UnsupportedMedia { declared, detected } => {
                let declared = declared.as_deref().map_or_else(
                    || "no content type was declared".to_owned(),
                    |d| format!("it was declared as `{d}`"),
                );
                let detail = match detected {
                    Some(t) => format!(
                        "the content is `{t}`, which mediaflow cannot process yet ({declared}); \
                         supported: JPEG, PNG, GIF, WebP, TIFF, BMP images and MP4, QuickTime, \
                         WebM, Matroska, AVI videos"
                    ),
                    None => format!(
                        "the content is not a supported image or video: its first bytes match no \
                         known format ({declared}); supported: JPEG, PNG, GIF, WebP, TIFF, BMP \
                         images and MP4, QuickTime, WebM, Matroska, AVI videos"
                    ),
                };
                (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media",
                    "Unsupported media",
                    detail,
                )
            }
            ApiError::BadRequest { detail } => (
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                detail.clone(),
            ),
            ApiError::NotFound { what } => (
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!("{what} does not exist"),
            ),
            ApiError::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "Too many uploads",
                "too many uploads are in progress; retry shortly".into(),
            ),
            ApiError::Refused {
                status,
                code,
                title,
                detail,
            } => (*status, code, title, detail.clone()),
            ApiError::TooSoon {
                code,
                title,
                detail,
                ..
            } => (StatusCode::TOO_MANY_REQUESTS, code, title, detail.clone()),
            ApiError::Unavailable { dependency, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                format!("the {dependency} is unavailable; nothing was stored, retry later"),
            ),
            ApiError::Internal { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "an internal error occurred; it has been logged".into(),
            ),
        }
    }

    /// Status, problem code and detail, for a failure reported inside another answer (an
    /// archive's entry); what is internal is logged, as `into_response` does.
    pub(crate) fn reported(&self) -> (StatusCode, &'static str, String) {
        self.log();
        let (status, code, _, detail) = self.parts();
        (status, code, detail)
    }

    fn log(&self) {
        match self {
            ApiError::Unavailable {
                dependency,
                internal,
            } => {
                tracing::warn!(dependency, error = %internal, "dependency unavailable");
            }
            ApiError::Internal { internal } => tracing::error!(error = %internal, "internal error"),
            _ => {}
        }
    }

    /// The problem type slug, also used as the metric outcome.
    pub fn code(&self) -> &'static str {
        self.parts().1
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let (status, code, title, detail) = self.parts();
        let body = Problem {
            ty: format!("/problems/{code}"),
            title,
            status: status.as_u16(),
            detail,
            code,
        };
        let mut response = (status, Json(body)).into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::TooLarge { .. }) {
            // Part of the body may be left unread, so the connection cannot carry another
            // request: said up front, so that a client does not send its next one on it and
            // see it closed (hyper closes it after this answer).
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if let ApiError::TooSoon {
            retry_after_secs, ..
        } = &self
        {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(*retry_after_secs),
            );
        }
        if matches!(self, ApiError::Unavailable { .. } | ApiError::Busy) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        response
    }
}

impl From<mediaflow_db::DbError> for ApiError {
    fn from(e: mediaflow_db::DbError) -> Self {
        if e.is_transient() {
            ApiError::Unavailable {
                dependency: "database",
                internal: e.to_string(),
            }
        } else {
            ApiError::Internal {
                internal: e.to_string(),
            }
        }
    }
}

impl From<mediaflow_store::StoreError> for ApiError {
    fn from(e: mediaflow_store::StoreError) -> Self {
        match e {
            mediaflow_store::StoreError::NotFound { key } => ApiError::NotFound {
                what: format!("object `{key}`"),
            },
            e if e.is_transient() => ApiError::Unavailable {
                dependency: "object store",
                internal: e.to_string(),
            },
            e => ApiError::Internal {
                internal: e.to_string(),
            },
        }
    }
}

impl From<mediaflow_bus::BusError> for ApiError {
    fn from(e: mediaflow_bus::BusError) -> Self {
        ApiError::Unavailable {
            dependency: "event bus",
            internal: e.to_string(),
        }
    }
}

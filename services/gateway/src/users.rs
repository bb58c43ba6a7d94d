//! The sign-up API (ch. 11): `POST /v1/users` records a user and publishes
//! `users.signed-up`; `POST /v1/users/{id}/verify` checks the code the verification mail
//! carried and publishes `users.verified`; `POST /v1/users/{id}/code` grants a pending user a
//! new code (rate-limited) and publishes `mediaflow.user.code-requested` on `users.signed-up`;
//! `GET /v1/users/{id}` shows where the user is. A
//! request retried with the same `Idempotency-Key` (or the same sign-up again) returns the same
//! user; an announcement that failed is made again by the retry.

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mediaflow_events::{CodeRequested, UserSignedUp, UserVerified};
use mediaflow_users::{
    CodeKey, CodeRequest, MailRow, RegistrationRow, SignupConfig, SignupRequest, UserRow,
    UserState, Users, UsersError, VerifyError, now_ms, rfc3339,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ApiError, Gateway};

/// What the sign-up API needs beyond the gateway's own parts.
#[derive(Clone, Debug)]
pub struct SignupApi {
    pub users: Users,
    pub key: CodeKey,
    pub config: SignupConfig,
}

/// Largest sign-up or verification body, in bytes.
const MAX_BODY: usize = 16 * 1024;

/// Longest `Idempotency-Key`.
const MAX_KEY: usize = 255;

pub(crate) fn routes() -> Router<Gateway> {
    Router::new()
        .route("/v1/users", post(sign_up))
        .route("/v1/users/{id}", get(user))
        .route("/v1/users/{id}/verify", post(verify))
        .route("/v1/users/{id}/code", post(new_code))
}

/// A user as the API shows it.
#[derive(Debug, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    pub zone: String,
    pub notifications: mediaflow_events::NotificationPrefs,
    /// `pending` until the code is entered, then `verified`.
    pub state: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<String>,
    pub status_url: String,
    /// The verification code's state (attempts used, expiry), once a code was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeView>,
    /// The user's mails: kind, Message-ID, state (pending, sending, unconfirmed, sent, failed).
    pub mails: Vec<MailRow>,
    /// Notification channels set up once verified.
    pub registrations: Vec<RegistrationRow>,
}

#[derive(Debug, Serialize)]
pub struct CodeView {
    /// 0 for the sign-up's code, then one more for each new code asked for.
    pub round: i64,
    pub attempts: i64,
    pub max_attempts: u32,
    pub expires_at: String,
}

fn view(u: &UserRow, config: &SignupConfig) -> UserView {
    let p = &u.profile;
    UserView {
        id: p.user_id.clone(),
        email: p.email.clone(),
        phone: p.phone.clone(),
        zone: p.zone.clone(),
        notifications: p.notifications,
        state: match u.state {
            UserState::Pending => "pending",
            UserState::Verified => "verified",
        }
        .into(),
        created_at: rfc3339(u.created_at_ms),
        verified_at: u.verified_at_ms.map(rfc3339),
        status_url: format!("/v1/users/{}", p.user_id),
        code: u.code_expires_at_ms.map(|e| CodeView {
            round: u.code_round,
            attempts: u.code_attempts,
            max_attempts: config.max_code_attempts,
            expires_at: rfc3339(e),
        }),
        mails: Vec::new(),
        registrations: Vec::new(),
    }
}

fn api(gw: &Gateway) -> Result<&SignupApi, ApiError> {
    gw.inner.signup.as_ref().ok_or_else(|| ApiError::Refused {
        status: StatusCode::NOT_FOUND,
        code: "no-signup-flow",
        title: "No sign-up flow",
        detail: "this platform runs no sign-up flow (no declared stage reads `users.signed-up`)"
            .into(),
    })
}

impl From<UsersError> for ApiError {
    fn from(e: UsersError) -> Self {
        match e {
            UsersError::Db(e) => e.into(),
            UsersError::KeyReused => ApiError::Refused {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "idempotency-key-reused",
                title: "Idempotency-Key reused",
                detail: "this Idempotency-Key was used for a different sign-up; use a new key \
                         for a new request"
                    .into(),
            },
            UsersError::EmailTaken => ApiError::Refused {
                status: StatusCode::CONFLICT,
                code: "email-taken",
                title: "Email already signed up",
                detail: "this email address has signed up already, with other details".into(),
            },
        }
    }
}

impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> Self {
        let (status, code, title) = match &e {
            VerifyError::Store(_) | VerifyError::UnknownUser => {
                return match e {
                    VerifyError::Store(e) => e.into(),
                    _ => ApiError::NotFound {
                        what: "this user".into(),
                    },
                };
            }
            VerifyError::AlreadyVerified { .. } => {
                (StatusCode::CONFLICT, "already-verified", "Already verified")
            }
            VerifyError::NoCode => (StatusCode::CONFLICT, "no-code-yet", "No code sent yet"),
            VerifyError::Expired => (StatusCode::GONE, "code-expired", "Code expired"),
            VerifyError::TooManyAttempts => (
                StatusCode::FORBIDDEN,
                "too-many-attempts",
                "Too many attempts",
            ),
            VerifyError::WrongCode { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "wrong-code", "Wrong code")
            }
        };
        ApiError::Refused {
            status,
            code,
            title,
            detail: e.to_string(),
        }
    }
}

/// The JSON body of a request, at most `limit` bytes, as `T`.
pub(crate) async fn json_body<T: serde::de::DeserializeOwned>(
    request: Request,
    limit: usize,
) -> Result<T, ApiError> {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError::Refused {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "not-json",
            title: "Not JSON",
            detail: "send the body as `Content-Type: application/json`".into(),
        });
    }
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| ApiError::TooLarge {
            limit: limit as u64,
        })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest {
        detail: format!("the body is not a valid request: {e}"),
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY && k.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| ApiError::BadRequest {
            detail: format!(
                "Idempotency-Key must be 1 to {MAX_KEY} printable ASCII characters without spaces"
            ),
        })?;
    Ok(Some(key.to_owned()))
}

async fn sign_up(State(gw): State<Gateway>, request: Request) -> Response {
    let result = accept_sign_up(&gw, request).await;
    let outcome = result.as_ref().map_or_else(|e| e.code(), |_| "signed-up");
    gw.inner.metrics.signup(outcome);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn accept_sign_up(gw: &Gateway, request: Request) -> Result<Response, ApiError> {
    let api = api(gw)?;
    let key = idempotency_key(request.headers())?;
    let body: SignupRequest = json_body(request, MAX_BODY).await?;
    let id = uuid::Uuid::now_v7().to_string();
    let profile = body
        .profile(&id, &api.config.zones)
        .map_err(|e| ApiError::Refused {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid-signup",
            title: "Invalid sign-up",
            detail: e.to_string(),
        })?;
    // The request as normalised, without the id this attempt drew: what a retry must repeat.
    let mut canonical = serde_json::to_value(&profile).unwrap_or_default();
    if let Some(map) = canonical.as_object_mut() {
        map.remove("user_id");
    }
    let request_sha256 = format!("{:x}", Sha256::digest(canonical.to_string().as_bytes()));
    let now = now_ms();
    let created = api
        .users
        .create(&profile, &request_sha256, key.as_deref(), now)
        .await?;
    let user = created.user;
    if !user.signed_up_announced {
        let event = UserSignedUp {
            user: user.profile.clone(),
            signed_up_at: rfc3339(user.created_at_ms),
        };
        let topic = gw.inner.bus.topics().name("users.signed-up");
        gw.inner.publisher.publish(&topic, &event).await?;
        api.users
            .mark_announced(&user.profile.user_id, false)
            .await?;
    }
    let view = view(&user, &api.config);
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, view.status_url.clone())],
        Json(view),
    )
        .into_response();
    if !created.new {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Body of `POST /v1/users/{id}/verify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    code: String,
}

async fn verify(State(gw): State<Gateway>, Path(id): Path<String>, request: Request) -> Response {
    let result = accept_verify(&gw, &id, request).await;
    let outcome = result.as_ref().map_or_else(|e| e.code(), |_| "verified");
    gw.inner.metrics.signup(outcome);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn accept_verify(gw: &Gateway, id: &str, request: Request) -> Result<Response, ApiError> {
    let api = api(gw)?;
    let body: VerifyRequest = json_body(request, MAX_BODY).await?;
    let verified = api
        .users
        .verify(
            id,
            &body.code,
            &api.key,
            api.config.max_code_attempts,
            now_ms(),
        )
        .await;
    let user = match verified {
        Ok(user) => user,
        // Verified before, but `users.verified` was not acknowledged: announce it now.
        Err(VerifyError::AlreadyVerified { announced: false }) => {
            api.users.user(id).await?.ok_or(ApiError::NotFound {
                what: "this user".into(),
            })?
        }
        Err(e) => return Err(e.into()),
    };
    let event = UserVerified {
        user: user.profile.clone(),
        verified_at: rfc3339(user.verified_at_ms.unwrap_or_else(now_ms)),
    };
    let topic = gw.inner.bus.topics().name("users.verified");
    gw.inner.publisher.publish(&topic, &event).await?;
    api.users.mark_announced(id, true).await?;
    Ok((StatusCode::OK, Json(view(&user, &api.config))).into_response())
}

async fn new_code(State(gw): State<Gateway>, Path(id): Path<String>) -> Response {
    let result = grant_code(&gw, &id).await;
    let outcome = result
        .as_ref()
        .map_or_else(|e| e.code(), |_| "code-requested");
    gw.inner.metrics.signup(outcome);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn grant_code(gw: &Gateway, id: &str) -> Result<Response, ApiError> {
    let api = api(gw)?;
    let interval_ms =
        i64::try_from(api.config.resend_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let request = api
        .users
        .request_code(id, interval_ms, api.config.max_codes, now_ms())
        .await?;
    let user = match request {
        CodeRequest::Granted(user) => user,
        CodeRequest::UnknownUser => {
            return Err(ApiError::NotFound {
                what: "this user".into(),
            });
        }
        CodeRequest::Verified => {
            return Err(ApiError::Refused {
                status: StatusCode::CONFLICT,
                code: "already-verified",
                title: "Already verified",
                detail: "this user is verified already; no code is needed".into(),
            });
        }
        CodeRequest::TooSoon { retry_after_ms } => {
            let secs = u64::try_from((retry_after_ms + 999) / 1000).unwrap_or(1);
            return Err(ApiError::TooSoon {
                code: "code-too-soon",
                title: "Too soon for a new code",
                detail: format!(
                    "the last code was asked for less than {}s ago; ask again in {secs}s",
                    api.config.resend_interval_secs
                ),
                retry_after_secs: secs,
            });
        }
        CodeRequest::TooMany { max_codes } => {
            return Err(ApiError::Refused {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "too-many-codes",
                title: "Too many codes",
                detail: format!("this user had {max_codes} codes, as many as allowed"),
            });
        }
    };
    let event = CodeRequested {
        user: user.profile.clone(),
        round: user.code_round,
        requested_at: rfc3339(user.code_requested_at_ms.unwrap_or_else(now_ms)),
    };
    let topic = gw.inner.bus.topics().name("users.signed-up");
    gw.inner.publisher.publish(&topic, &event).await?;
    api.users.mark_code_announced(id, user.code_round).await?;
    let mut view = view(&user, &api.config);
    view.mails = api.users.mails(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, view.status_url.clone())],
        Json(view),
    )
        .into_response())
}

async fn user(State(gw): State<Gateway>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let api = api(&gw)?;
    let row = api.users.user(&id).await?.ok_or(ApiError::NotFound {
        what: format!("user `{}`", id.chars().take(64).collect::<String>()),
    })?;
    let mut view = view(&row, &api.config);
    view.mails = api.users.mails(&id).await?;
    view.registrations = api.users.registrations(&id).await?;
    Ok(Json(view).into_response())
}

//! The admin endpoints every mediaflow process serves: `/healthz` (liveness), `/readyz` (Kafka,
//! object storage and the database all answer, and no stage of the process is wedged) and
//! `/metrics` (Prometheus). The gateway serves
//! them beside its API; a stage run on its own serves them on `admin.listen`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use mediaflow_bus::Bus;
use mediaflow_db::Db;
use mediaflow_store::ObjectStore;
use mediaflow_telemetry::Metrics;
use serde::Serialize;

/// How long a readiness verdict is reused: probes and floods of `/readyz` cost one check a second.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// How long each dependency may take to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Serialize)]
struct Readiness {
    ready: bool,
    kafka: String,
    object_store: String,
    database: String,
    /// Stages of this process the watchdog finds wedged, with what it saw.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    wedged_stages: std::collections::BTreeMap<String, String>,
}

struct Admin {
    bus: Bus,
    store: ObjectStore,
    db: Db,
    metrics: Metrics,
    cached: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
}

/// The admin routes over the process's connections and metrics.
pub fn router(bus: Bus, store: ObjectStore, db: Db, metrics: Metrics) -> Router {
    let admin = Arc::new(Admin {
        bus,
        store,
        db,
        metrics,
        cached: tokio::sync::Mutex::new(None),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(admin)
}

async fn check(admin: &Admin) -> Readiness {
    let verdict = |r: Result<(), String>| r.map_or_else(|e| e, |()| "ok".to_owned());
    let timed = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| {
        verdict(r.unwrap_or_else(|_| Err("timed out".into())))
    };
    let (kafka, s3, db) = tokio::join!(
        admin.bus.ping(CHECK_TIMEOUT),
        tokio::time::timeout(CHECK_TIMEOUT, async {
            admin.store.ping().await.map_err(|e| e.to_string())
        }),
        tokio::time::timeout(CHECK_TIMEOUT, async {
            admin.db.ping().await.map_err(|e| e.to_string())
        }),
    );
    let kafka = verdict(kafka.map_err(|e| e.to_string()));
    let (object_store, database) = (timed(s3), timed(db));
    let wedged_stages = admin.metrics.wedged_stages();
    let ready =
        kafka == "ok" && object_store == "ok" && database == "ok" && wedged_stages.is_empty();
    Readiness {
        ready,
        kafka,
        object_store,
        database,
        wedged_stages,
    }
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let readiness = {
        // Holding the lock while checking makes concurrent probes share one check.
        let mut cached = admin.cached.lock().await;
        match &*cached {
            Some((at, r)) if at.elapsed() < READINESS_TTL => r.clone(),
            _ => {
                let r = check(&admin).await;
                *cached = Some((Instant::now(), r.clone()));
                r
            }
        }
    };
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

async fn render_metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.render(),
    )
}

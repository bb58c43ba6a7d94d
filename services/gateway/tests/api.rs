//! The gateway through its public router with `oneshot`: request handling that needs neither a
//! broker nor an object store (they point at closed ports here), on a real SQLite database.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use mediaflow_bus::{Bus, BusConfig};
use mediaflow_db::Db;
use mediaflow_gateway::{Gateway, GatewayConfig};
use mediaflow_store::{ObjectStore, StoreConfig};
use tower::ServiceExt;

const LIMIT: u64 = 1024;

struct Fixture {
    router: axum::Router,
    db: Db,
    _dir: tempfile::TempDir,
}

async fn gateway(max_concurrent_uploads: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(
        &format!("sqlite://{}", dir.path().join("t.db").display()),
        2,
    )
    .await
    .unwrap();
    // Nothing listens on port 1: any request that reached Kafka or S3 would fail.
    let bus = Bus::new(BusConfig {
        brokers: "127.0.0.1:1".into(),
        ..BusConfig::default()
    });
    let store = ObjectStore::new(&StoreConfig {
        endpoint: "http://127.0.0.1:1".into(),
        timeout_ms: 2000,
        ..StoreConfig::default()
    });
    let config = GatewayConfig {
        max_upload_bytes: LIMIT,
        spool_dir: Some(dir.path().to_owned()),
        max_concurrent_uploads,
        ..GatewayConfig::default()
    };
    let gw = Gateway::new(
        config,
        store,
        db.clone(),
        bus,
        mediaflow_telemetry::Metrics::new(),
    )
    .unwrap();
    Fixture {
        router: gw.router(),
        db,
        _dir: dir,
    }
}

async fn problem(response: Response) -> (StatusCode, serde_json::Value) {
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

fn upload(body: impl Into<Body>) -> Request<Body> {
    Request::post("/v1/media")
        .header("content-type", "image/png")
        .body(body.into())
        .unwrap()
}

#[tokio::test]
async fn refusals_name_the_problem() {
    let f = gateway(4).await;
    let (status, body) = problem(f.router.clone().oneshot(upload(Vec::new())).await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("empty-body"))
    );

    let (status, body) = problem(
        f.router
            .clone()
            .oneshot(upload("plain text, no image"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported-media")
        )
    );
    assert!(
        body["detail"].as_str().unwrap().contains("image/png"),
        "{body}"
    );

    let (status, body) = problem(
        f.router
            .clone()
            .oneshot(upload(vec![0x89; 2048]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too-large"))
    );

    let request = Request::get("/v1/media/not-an-id")
        .body(Body::empty())
        .unwrap();
    let (status, _) = problem(f.router.clone().oneshot(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let request = Request::get(format!("/v1/media/{}", uuid::Uuid::now_v7()))
        .body(Body::empty())
        .unwrap();
    let (status, _) = problem(f.router.clone().oneshot(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(f.db.media_count().await.unwrap(), 0);
}

#[tokio::test]
async fn an_unreachable_object_store_is_a_503_and_nothing_is_recorded() {
    let f = gateway(4).await;
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0".to_vec();
    let response = f.router.clone().oneshot(upload(png)).await.unwrap();
    assert_eq!(response.headers()["retry-after"], "5");
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"))
    );
    assert!(
        body["detail"].as_str().unwrap().contains("object store"),
        "{body}"
    );
    assert_eq!(f.db.media_count().await.unwrap(), 0);
}

#[tokio::test]
async fn uploads_beyond_the_concurrency_limit_are_turned_away() {
    let f = gateway(1).await;
    // The first upload streams slowly: it holds the only slot until its body ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = Body::from_stream(tokio_stream(rx));
    let first = tokio::spawn(f.router.clone().oneshot(upload(body)));
    tx.send(Ok(b"\x89PNG".to_vec())).await.unwrap();
    // The channel holds one chunk: once a second one fits, the first was taken by the handler.
    tx.send(Ok(b"\r\n\x1a\n".to_vec())).await.unwrap();

    let (status, body) = problem(
        f.router
            .clone()
            .oneshot(upload(b"\x89PNG\r\n\x1a\n".to_vec()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("busy"))
    );
    drop(tx);
    // The first upload was admitted: it got as far as the (unreachable) object store.
    let (_, body) = problem(first.await.unwrap().unwrap()).await;
    assert_eq!(body["code"], "unavailable");
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

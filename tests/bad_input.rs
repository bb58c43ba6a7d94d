//! Bad uploads get a clear 4xx problem document and leave no trace: no object, no row, no event.

mod support;

use anyhow::Result;
use mediaflow_events::EventData;
use support::{Backend, TestPlatform, fixtures};

const LIMIT: u64 = 64 * 1024;

struct Refusal {
    status: u16,
    code: String,
    detail: String,
}

async fn refused(response: reqwest::Response) -> Result<Refusal> {
    let status = response.status().as_u16();
    let content_type = response.headers()["content-type"].to_str()?.to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["type"].is_string());
    Ok(Refusal {
        status,
        code: body["code"].as_str().unwrap_or_default().to_owned(),
        detail: body["detail"].as_str().unwrap_or_default().to_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_uploads_are_refused_and_leave_nothing_behind() -> Result<()> {
    let tp =
        TestPlatform::start_with(Backend::Sqlite, |c| c.gateway.max_upload_bytes = LIMIT).await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/media", tp.base);
    let jpeg = std::fs::read(fixtures().join("rocket.jpg"))?;
    assert!(
        jpeg.len() as u64 > LIMIT,
        "the fixture must exceed the test limit"
    );

    // Zero bytes.
    let r = refused(
        http.post(&url)
            .header("content-type", "image/jpeg")
            .body(Vec::<u8>::new())
            .send()
            .await?,
    )
    .await?;
    assert_eq!((r.status, r.code.as_str()), (400, "empty-body"));
    assert!(r.detail.contains("empty"), "{}", r.detail);

    // A text file claiming to be a JPEG.
    let text = b"This is a plain text file, not a photograph.\n".repeat(20);
    let r = refused(
        http.post(&url)
            .header("content-type", "image/jpeg")
            .body(text.clone())
            .send()
            .await?,
    )
    .await?;
    assert_eq!((r.status, r.code.as_str()), (415, "unsupported-media"));
    assert!(
        r.detail.contains("image/jpeg") && r.detail.contains("not a supported image"),
        "{}",
        r.detail
    );

    // The same as a multipart file field.
    let part = reqwest::multipart::Part::bytes(text)
        .file_name("photo.jpg")
        .mime_str("image/jpeg")?;
    let r = refused(
        http.post(&url)
            .multipart(reqwest::multipart::Form::new().part("file", part))
            .send()
            .await?,
    )
    .await?;
    assert_eq!((r.status, r.code.as_str()), (415, "unsupported-media"));

    // Over the limit, announced by Content-Length: refused before the body is read, so the
    // answer says the connection closes (a client reusing it would see it cut).
    let response = http
        .post(&url)
        .header("content-type", "image/jpeg")
        .body(jpeg.clone())
        .send()
        .await?;
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let r = refused(response).await?;
    assert_eq!((r.status, r.code.as_str()), (413, "too-large"));
    assert!(r.detail.contains(&LIMIT.to_string()), "{}", r.detail);

    // Over the limit, streamed without a length (chunked): caught while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        jpeg.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let r = refused(
        http.post(&url)
            .header("content-type", "image/jpeg")
            .body(body)
            .send()
            .await?,
    )
    .await?;
    assert_eq!((r.status, r.code.as_str()), (413, "too-large"));

    // A multipart form without a file.
    let r = refused(
        http.post(&url)
            .multipart(reqwest::multipart::Form::new().text("title", "x"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!((r.status, r.code.as_str()), (400, "bad-request"));

    // Nothing stored, recorded or published...
    assert_eq!(tp.object_keys().await?, Vec::<String>::new());
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    assert_eq!(db.media_count().await?, 0);
    let uploaded = format!("{}media.uploaded", tp.config.bus.topic_prefix);
    assert_eq!(tp.bus.message_count(&uploaded).await?, 0);

    // ...while a good upload within the limit is stored, recorded and published exactly once.
    let small = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let ok = http
        .post(&url)
        .header("content-type", "image/png")
        .body(small)
        .send()
        .await?;
    assert_eq!(ok.status(), 202);
    assert_eq!(tp.object_keys().await?.len(), 1);
    assert_eq!(db.media_count().await?, 1);
    assert_eq!(tp.bus.message_count(&uploaded).await?, 1);
    tp.stop().await
}

/// Runs `tests/py/produce_raw.py` to put one message on `topic` with kafka-python.
async fn produce_raw(tp: &TestPlatform, topic: &str, value: &str, headers: &[&str]) -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/produce_raw.py");
    let topic = format!("{}{topic}", tp.config.bus.topic_prefix);
    let out = tokio::process::Command::new(support::python())
        .args([
            script,
            &tp.platform.endpoints.kafka,
            &topic,
            "some-key",
            value,
        ])
        .args(headers)
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Messages that are not valid mediaflow events (not a CloudEvent, an unknown type, a payload that
/// breaks the schema) are counted as bad input and skipped; the image queued behind them on the
/// same partition is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_events_do_not_wedge_a_stage() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| c.bus.partitions = Some(1)).await?;
    let ce = |ty: &'static str| {
        [
            "ce_specversion=1.0",
            "ce_id=x-1",
            "ce_source=/somebody/else",
            ty,
            "content-type=application/json",
        ]
    };
    produce_raw(&tp, "jobs.image", "this is not an event", &[]).await?;
    produce_raw(&tp, "jobs.image", "{}", &ce("ce_type=com.example.unknown")).await?;
    produce_raw(
        &tp,
        "jobs.image",
        "{\"media_id\": 7}",
        &ce("ce_type=mediaflow.media.uploaded"),
    )
    .await?;

    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", tp.base))
        .body(png)
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let events = tp
        .read_events("images.processed", 1, std::time::Duration::from_secs(60))
        .await?;
    assert_eq!(events.len(), 1);

    let metrics = reqwest::get(format!("{}/metrics", tp.base))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(
            "mediaflow_stage_messages_total{stage=\"image-worker\",outcome=\"bad_input\"} 3"
        ),
        "{metrics}"
    );
    // Each went to the dead-letter topic with its reason, as it arrived.
    let letters = tp
        .bus
        .read_to_end(&format!("{}dead-letters", tp.config.bus.topic_prefix))
        .await?;
    assert_eq!(letters.len(), 3);
    for delivery in &letters {
        let event = delivery
            .event
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let data = mediaflow_events::data_json(event)?;
        mediaflow_events::schema::validate(mediaflow_events::DeadLetter::TYPE, &data)
            .map_err(anyhow::Error::msg)?;
        let letter: mediaflow_events::DeadLetter = mediaflow_events::decode(event)?;
        assert_eq!(
            (letter.stage.as_str(), letter.error_class.as_str()),
            ("image-worker", "bad_input")
        );
        assert_eq!(letter.attempts, 1);
    }
    let first: mediaflow_events::DeadLetter =
        mediaflow_events::decode(letters[0].event.as_ref().unwrap())?;
    assert_eq!(
        first.raw.as_ref().map(|r| r.value.as_str()),
        Some("this is not an event")
    );
    assert!(first.error.contains("not a CloudEvent"), "{}", first.error);
    tp.stop().await
}

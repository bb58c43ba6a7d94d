//! The walking skeleton end to end: real photos uploaded over HTTP become thumbnails on the result
//! topic, read back with rdkafka and with kafka-python, fetched with aws-sdk-s3. Once as
//! `mediaflow up` runs (embedded broker and S3, SQLite), once as production runs (Kafka and S3 as
//! separate services reached through configuration, PostgreSQL).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use cloudevents::AttributesReader;
use mediaflow_events::{EventData, ImageProcessed, MediaUploaded};
use mediaflow_gateway::{Accepted, MediaView};
use support::{Backend, TestPlatform, fixtures, python};

const TIMEOUT: Duration = Duration::from_secs(90);

async fn upload_raw(
    base: &str,
    bytes: Vec<u8>,
    content_type: &str,
    name: &str,
) -> Result<Accepted> {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/media"))
        .header("content-type", content_type)
        .header("x-filename", name)
        .body(bytes)
        .send()
        .await?;
    accepted(response, name).await
}

async fn upload_multipart(base: &str, bytes: Vec<u8>, name: &str) -> Result<Accepted> {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_owned())
        .mime_str("image/png")?;
    let form = reqwest::multipart::Form::new()
        .text("note", "a cat")
        .part("file", part);
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/media"))
        .multipart(form)
        .send()
        .await?;
    accepted(response, name).await
}

async fn accepted(response: reqwest::Response, name: &str) -> Result<Accepted> {
    anyhow::ensure!(
        response.status() == 202,
        "upload of {name}: {} {}",
        response.status(),
        response.text().await?
    );
    Ok(response.json().await?)
}

/// Reads the result topic with kafka-python and returns (ce_id -> message JSON).
async fn read_with_kafka_python(
    tp: &TestPlatform,
    count: usize,
) -> Result<BTreeMap<String, serde_json::Value>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/read_topic.py");
    let topic = format!("{}images.processed", tp.config.bus.topic_prefix);
    let out = tokio::process::Command::new(python())
        .args([
            script,
            &tp.platform.endpoints.kafka,
            &topic,
            &count.to_string(),
            "60",
        ])
        .kill_on_drop(true)
        .output()
        .await
        .context("running kafka-python")?;
    anyhow::ensure!(
        out.status.success(),
        "kafka-python reader failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_id = BTreeMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let msg: serde_json::Value = serde_json::from_str(line)?;
        by_id.insert(
            msg["headers"]["ce_id"]
                .as_str()
                .context("ce_id header")?
                .to_owned(),
            msg,
        );
    }
    Ok(by_id)
}

async fn scenario(backend: Backend) -> Result<()> {
    let tp = TestPlatform::start(backend).await?;
    let dir = fixtures();
    let jpeg = std::fs::read(dir.join("rocket.jpg"))?;
    let png = std::fs::read(dir.join("chelsea.png"))?;
    let jpeg_dims = image::load_from_memory(&jpeg)?;
    let png_dims = image::load_from_memory(&png)?;

    // The JPEG is declared with a misleading type: the gateway trusts the bytes.
    let a = upload_raw(&tp.base, jpeg, "application/octet-stream", "rocket.jpg").await?;
    let b = upload_multipart(&tp.base, png, "chelsea.png").await?;
    assert_eq!(
        (a.kind.as_str(), a.content_type.as_str()),
        ("image", "image/jpeg")
    );
    assert_eq!(
        (b.kind.as_str(), b.content_type.as_str()),
        ("image", "image/png")
    );

    // The upload facts and the work items the router made of them match their schema.
    for (topic, source) in [
        ("media.uploaded", "/mediaflow/gateway"),
        ("jobs.image", "/mediaflow/router"),
    ] {
        let mut seen = Vec::new();
        for event in tp.read_events(topic, 2, TIMEOUT).await? {
            assert_eq!(event.ty(), MediaUploaded::TYPE);
            assert_eq!(event.source().to_string(), source);
            let data = mediaflow_events::data_json(&event)?;
            mediaflow_events::schema::validate(MediaUploaded::TYPE, &data)
                .map_err(anyhow::Error::msg)?;
            let upload: MediaUploaded = mediaflow_events::decode(&event)?;
            assert_eq!(event.id(), upload.id());
            seen.push(upload.media_id);
        }
        seen.sort();
        let mut want = vec![a.id.clone(), b.id.clone()];
        want.sort();
        assert_eq!(seen, want, "{topic}");
    }

    // rdkafka: both result events, valid against their schema, with lineage.
    let events = tp.read_events("images.processed", 2, TIMEOUT).await?;
    let mut results = BTreeMap::new();
    for event in &events {
        assert_eq!(event.ty(), ImageProcessed::TYPE);
        assert_eq!(event.source().to_string(), "/mediaflow/image-worker");
        assert_eq!(event.datacontenttype(), Some("application/json"));
        let data = mediaflow_events::data_json(event)?;
        mediaflow_events::schema::validate(ImageProcessed::TYPE, &data)
            .map_err(anyhow::Error::msg)?;
        let result: ImageProcessed = mediaflow_events::decode(event)?;
        assert_eq!(event.subject(), Some(result.media_id.as_str()));
        assert_eq!(event.id(), result.id(), "event ids are deterministic");
        assert_eq!(result.stage, "image-worker");
        results.insert(result.media_id.clone(), result);
    }
    let ids: Vec<&String> = results.keys().collect();
    let mut expected = vec![&a.id, &b.id];
    expected.sort();
    assert_eq!(ids, expected);

    // kafka-python, an independent protocol implementation, sees the same events in binary mode.
    let python_view = read_with_kafka_python(&tp, 2).await?;
    assert_eq!(python_view.len(), 2);
    for event in &events {
        let msg = &python_view[event.id()];
        assert_eq!(msg["headers"]["ce_specversion"], "1.0");
        assert_eq!(msg["headers"]["ce_type"], ImageProcessed::TYPE);
        assert_eq!(msg["headers"]["content-type"], "application/json");
        let media_id = msg["data"]["media_id"].as_str().context("media_id")?;
        assert_eq!(msg["key"], media_id, "partition key is the media id");
        mediaflow_events::schema::validate(ImageProcessed::TYPE, &msg["data"])
            .map_err(anyhow::Error::msg)?;
    }

    // Each thumbnail, fetched with aws-sdk-s3, has the announced size and the source's aspect.
    let s3 = tp.s3_client();
    for (upload, source) in [(&a, &jpeg_dims), (&b, &png_dims)] {
        let result = &results[&upload.id];
        assert_eq!(
            (result.source_width, result.source_height),
            (source.width(), source.height())
        );
        let thumb = &result.renditions[0];
        let object = s3
            .get_object()
            .bucket(&thumb.object.bucket)
            .key(&thumb.object.key)
            .send()
            .await?;
        let bytes = object.body.collect().await?.into_bytes();
        assert_eq!(bytes.len() as u64, thumb.object.size);
        let img = image::load_from_memory(&bytes)?;
        assert_eq!((img.width(), img.height()), (thumb.width, thumb.height));
        assert_eq!(img.width().max(img.height()), 256);
        let want = f64::from(source.width()) / f64::from(source.height());
        let got = f64::from(img.width()) / f64::from(img.height());
        assert!(
            (want - got).abs() < 0.02,
            "aspect {got} differs from the source's {want}"
        );

        // The API reports the same result, and its download route serves the same bytes.
        let view: MediaView = reqwest::get(format!("{}/v1/media/{}", tp.base, upload.id))
            .await?
            .json()
            .await?;
        assert_eq!(view.status, mediaflow_db::MediaStatus::Done);
        let names: Vec<&str> = view.results.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["tags", "thumb-256"]);
        // The tags result is the event's tags, as a JSON document.
        let tags: serde_json::Value =
            reqwest::get(format!("{}{}", tp.base, view.results[0].download_url))
                .await?
                .json()
                .await?;
        assert_eq!(tags, result.tags);
        assert_eq!(
            (tags["width"].as_u64(), tags["height"].as_u64()),
            (
                Some(u64::from(source.width())),
                Some(u64::from(source.height()))
            )
        );
        let view_thumb = &view.results[1];
        assert_eq!(view_thumb.key, thumb.object.key);
        let served = reqwest::get(format!("{}{}", tp.base, view_thumb.download_url)).await?;
        assert_eq!(served.status(), 200);
        assert_eq!(
            served.headers()["content-type"],
            thumb.object.content_type.as_str()
        );
        assert_eq!(served.bytes().await?, bytes);
        let presigned = view_thumb
            .presigned_url
            .as_deref()
            .context("presigned url")?;
        assert_eq!(reqwest::get(presigned).await?.bytes().await?, bytes);
    }
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_become_thumbnails_on_sqlite() -> Result<()> {
    scenario(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_become_thumbnails_on_postgres() -> Result<()> {
    scenario(Backend::Postgres).await
}

/// An upload whose magic bytes pass but whose body is corrupt fails visibly in the worker and
/// does not hold up the images behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_image_fails_visibly_without_blocking_others() -> Result<()> {
    // One partition: the good image queues behind the corrupt one.
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| c.bus.partitions = Some(1)).await?;
    let mut corrupt = std::fs::read(fixtures().join("rocket.jpg"))?;
    corrupt.truncate(600);
    let bad = upload_raw(&tp.base, corrupt, "image/jpeg", "broken.jpg").await?;
    let good = upload_raw(
        &tp.base,
        std::fs::read(fixtures().join("chelsea.png"))?,
        "image/png",
        "cat.png",
    )
    .await?;

    let events = tp.read_events("images.processed", 1, TIMEOUT).await?;
    let done: ImageProcessed = mediaflow_events::decode(&events[0])?;
    assert_eq!(done.media_id, good.id);

    let view: MediaView = reqwest::get(format!("{}/v1/media/{}", tp.base, bad.id))
        .await?
        .json()
        .await?;
    assert_eq!(view.status, mediaflow_db::MediaStatus::Failed);
    let error = view.error.context("failure reason")?;
    assert!(
        error.contains("bad_input") && error.contains("truncated JPEG"),
        "unclear reason: {error}"
    );
    assert!(view.results.is_empty());
    tp.stop().await
}

/// Broker data, objects, rows and committed offsets live in the data folder and survive a
/// restart: old results stay readable and nothing is processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_survives_a_restart() -> Result<()> {
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let first = upload_raw(
        &tp.base,
        std::fs::read(fixtures().join("rocket.jpg"))?,
        "image/jpeg",
        "a.jpg",
    )
    .await?;
    tp.read_events("images.processed", 1, TIMEOUT).await?;
    let (config, dir) = tp.stop_keeping_data().await?;

    let tp = TestPlatform::restart(config, dir).await?;
    let view: MediaView = reqwest::get(format!("{}/v1/media/{}", tp.base, first.id))
        .await?
        .json()
        .await?;
    assert_eq!(view.status, mediaflow_db::MediaStatus::Done);
    let served = reqwest::get(format!("{}{}", tp.base, view.results[0].download_url)).await?;
    assert_eq!(served.status(), 200);

    let second = upload_raw(
        &tp.base,
        std::fs::read(fixtures().join("coffee.png"))?,
        "image/png",
        "b.png",
    )
    .await?;
    let events = tp.read_events("images.processed", 2, TIMEOUT).await?;
    let ids: Vec<String> = events
        .iter()
        .map(|e| mediaflow_events::decode::<ImageProcessed>(e).map(|r| r.media_id))
        .collect::<Result<_, _>>()?;
    assert!(
        ids.contains(&first.id) && ids.contains(&second.id),
        "{ids:?}"
    );
    // Once both stages have committed everything they were given, the result topic must hold
    // exactly the two results: the first upload was not processed again after the restart.
    tp.wait_caught_up("router", "media.uploaded").await?;
    tp.wait_caught_up("image-worker", "jobs.image").await?;
    let topic = format!("{}images.processed", tp.config.bus.topic_prefix);
    assert_eq!(
        tp.bus.message_count(&topic).await?,
        2,
        "the first upload was processed again"
    );
    tp.stop().await
}

/// While S3 is down the image stage retries with backoff and acknowledges nothing; when S3 comes
/// back the same message completes. Nothing is marked failed, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_store_outage_is_retried_until_it_heals() -> Result<()> {
    let mut tp = TestPlatform::start_with(Backend::Postgres, |c| {
        c.stages.max_backoff_ms = 400;
        // Outlast the outage: this test is about retrying, not dead-lettering.
        c.stages.max_attempts = 10_000;
    })
    .await?;

    // An upload as the gateway records it, stored while S3 is up.
    let event = tp.seed_upload(true).await?;
    let id = event.media_id.clone();
    tp.stop_s3();
    tp.announce(&event).await?;

    // The worker keeps failing transiently and keeps the item queued; readiness reports S3.
    let retries = "mediaflow_stage_errors_total{stage=\"image-worker\",outcome=\"retry\"}";
    let deadline = std::time::Instant::now() + TIMEOUT;
    while tp.metric(retries).await? < 3.0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the worker never retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view: MediaView = reqwest::get(format!("{}/v1/media/{id}", tp.base))
        .await?
        .json()
        .await?;
    assert_eq!(view.status, mediaflow_db::MediaStatus::Queued);
    // The stuck message shows as consumer lag.
    let lag = "mediaflow_consumer_lag{stage=\"image-worker\"}";
    while tp.metric(lag).await? < 1.0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no consumer lag reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = reqwest::get(format!("{}/readyz", tp.base)).await?;
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await?;
    assert_ne!(ready["object_store"], "ok");
    assert_eq!(ready["kafka"], "ok");

    tp.start_s3().await?;
    let events = tp.read_events("images.processed", 1, TIMEOUT).await?;
    let done: ImageProcessed = mediaflow_events::decode(&events[0])?;
    assert_eq!(done.media_id, id);
    let view: MediaView = reqwest::get(format!("{}/v1/media/{id}", tp.base))
        .await?
        .json()
        .await?;
    assert_eq!(view.status, mediaflow_db::MediaStatus::Done);
    assert_eq!(
        tp.metric("mediaflow_stage_messages_total{stage=\"image-worker\",outcome=\"ok\"}")
            .await?,
        1.0
    );
    tp.stop().await
}

//! Sources beyond uploads: a bucket of old media backfilled into the pipeline, each object once;
//! a server speaking the book's `/api/v1/items` contract polled, each item enqueued once.

mod support;

use std::time::Duration;

use anyhow::Result;
use cloudevents::AttributesReader;
use mediaflow::backfill::{self, Report};
use mediaflow_events::{EventData, ImageProcessed};
use support::{Backend, TestPlatform, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_prefix_is_backfilled_once() -> Result<()> {
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let s3 = tp.s3_client();
    let legacy = format!("legacy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    s3.create_bucket().bucket(&legacy).send().await?;
    let put = |key: &'static str, body: Vec<u8>| {
        let (s3, bucket) = (s3.clone(), legacy.clone());
        async move {
            s3.put_object()
                .bucket(bucket)
                .key(key)
                .body(body.into())
                .send()
                .await
        }
    };
    put(
        "photos/2019/rocket.jpg",
        std::fs::read(fixtures().join("rocket.jpg"))?,
    )
    .await?;
    put(
        "photos/2019/cat.png",
        std::fs::read(fixtures().join("chelsea.png"))?,
    )
    .await?;
    put(
        "photos/2020/coffee",
        std::fs::read(fixtures().join("coffee.png"))?,
    )
    .await?; // no extension
    put("photos/2020/notes.txt", b"not a photo".to_vec()).await?;
    put(
        "other/astronaut.png",
        std::fs::read(fixtures().join("astronaut.png"))?,
    )
    .await?;

    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let store = mediaflow_store::ObjectStore::new(&tp.config.store);
    let report = backfill::backfill(
        &store,
        &legacy,
        "photos/",
        &db,
        &tp.bus,
        &tp.platform.topology().upload_stages(),
        None,
    )
    .await?;
    assert_eq!((report.enqueued, report.already), (3, 0));
    assert_eq!(
        report.skipped,
        vec![(
            "photos/2020/notes.txt".to_owned(),
            "not a supported image or video".to_owned()
        )]
    );

    let events = tp
        .read_events("images.processed", 3, Duration::from_secs(60))
        .await?;
    let mut inputs: Vec<String> = events
        .iter()
        .map(|e| {
            mediaflow_events::decode::<ImageProcessed>(e)
                .map(|r| format!("{}/{}", r.input.bucket, r.input.key))
        })
        .collect::<Result<_, _>>()?;
    inputs.sort();
    let want: Vec<String> = [
        "photos/2019/cat.png",
        "photos/2019/rocket.jpg",
        "photos/2020/coffee",
    ]
    .iter()
    .map(|k| format!("{legacy}/{k}"))
    .collect();
    assert_eq!(inputs, want, "thumbnails read the originals in place");

    // A second run finds nothing new; the result topic keeps one result per object.
    let again = backfill::backfill(
        &store,
        &legacy,
        "photos/",
        &db,
        &tp.bus,
        &tp.platform.topology().upload_stages(),
        None,
    )
    .await?;
    assert_eq!(
        again,
        Report {
            enqueued: 0,
            already: 3,
            skipped: report.skipped.clone(),
            batch: None,
        }
    );
    tp.wait_caught_up("router", "media.uploaded").await?;
    tp.wait_caught_up("image-worker", "jobs.image").await?;
    let topic = format!("{}images.processed", tp.config.bus.topic_prefix);
    assert_eq!(tp.bus.message_count(&topic).await?, 3);
    tp.stop().await
}

/// The book's work-queue source (`tests/py/book_source.py`): serves the `<name>.json` files of
/// its folder as items.
struct BookSource {
    items: tempfile::TempDir,
    url: String,
    _server: tokio::process::Child,
}

impl BookSource {
    async fn start() -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let items = tempfile::tempdir()?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/book_source.py");
        let mut server = tokio::process::Command::new(support::python())
            .arg(script)
            .arg(items.path())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = server.stdout.take().expect("piped");
        let mut port = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut port)
            .await?;
        let url = format!("http://127.0.0.1:{}", port.trim());
        Ok(Self {
            items,
            url,
            _server: server,
        })
    }

    fn put(&self, name: &str, data: &serde_json::Value) -> Result<()> {
        self.put_raw(name, &serde_json::to_vec(data)?)
    }

    /// Writes an item's file as it is (atomically: the server never sees half a file).
    fn put_raw(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.items.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, self.items.path().join(format!("{name}.json")))?;
        Ok(())
    }
}

/// The book's worker: records what it was given.
const ITEM_WORKER: &str = r#"#!/bin/sh
set -eu
[ -z "${INPUT_FILE:-}" ] || { echo "a work item has no input object" >&2; exit 1; }
cp "$WORK_ITEM_FILE" "$OUTPUT_DIR/item.json"
printf '%s' "$ITEM_NAME" > "$OUTPUT_DIR/name.txt"
"#;

fn item_worker(dir: &std::path::Path) -> Result<mediaflow_exec_worker::ExecWorkerConfig> {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("item-worker.sh");
    std::fs::write(&script, ITEM_WORKER)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let mut stage = support::exec_stage("item-worker", &script);
    stage.input_topic = "jobs.items".into();
    Ok(stage)
}

fn http_source(url: &str) -> mediaflow::http_source::HttpSourceConfig {
    mediaflow::http_source::HttpSourceConfig {
        name: "books".into(),
        url: url.into(),
        interval_secs: 1,
        topic: "jobs.items".into(),
        timeout_secs: 5,
        max_response_bytes: 1 << 20,
    }
}

/// Waits until `done` items of source `books` are done, or fails after a minute.
async fn wait_items_done(db: &mediaflow_db::Db, ids: &[String]) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut done = 0;
        for id in ids {
            if db
                .item(id)
                .await?
                .is_some_and(|i| i.status == mediaflow_db::MediaStatus::Done)
            {
                done += 1;
            }
        }
        if done == ids.len() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {done} of {} items done",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the source has listed its items `n` more times than now.
async fn wait_polls(tp: &TestPlatform, n: f64) -> Result<()> {
    let series = "mediaflow_source_polls_total{source=\"books\",outcome=\"ok\"}";
    let target = tp.metric(series).await? + n;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tp.metric(series).await? < target {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the source stopped polling"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_book_contract_http_source_enqueues_each_item_once() -> Result<()> {
    let source = BookSource::start().await?;
    // Names a URL path must escape, an item in the book's plain form, one that fails twice.
    let mut items: Vec<(String, serde_json::Value)> = (0..8)
        .map(|i| {
            (
                format!("movie-{i}"),
                serde_json::json!({"file": format!("movie-{i}.mp4"), "n": i}),
            )
        })
        .collect();
    items.push((
        "with space & ü".into(),
        serde_json::json!({"note": "escaped"}),
    ));
    items.push(("flaky".into(), serde_json::json!({"fail": 2, "n": 99})));
    for (name, data) in &items {
        source.put(name, data)?;
    }
    source.put_raw("broken", b"{\"kind\": \"Item\", this is not json")?;
    let scripts = tempfile::tempdir()?;
    let worker = item_worker(scripts.path())?;
    let url = source.url.clone();
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| {
        c.exec.push(worker);
        c.http_source.push(http_source(&url));
    })
    .await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let ids = |items: &[(String, serde_json::Value)]| -> Vec<String> {
        items
            .iter()
            .map(|(n, _)| mediaflow_events::item_id("books", n))
            .collect()
    };
    wait_items_done(&db, &ids(&items)).await?;

    // The broken item is refused every poll and never enqueued; fixed, it goes through.
    let errors = "mediaflow_source_items_total{source=\"books\",outcome=\"error\"}";
    assert!(tp.metric(errors).await? >= 1.0);
    assert!(
        db.item(&mediaflow_events::item_id("books", "broken"))
            .await?
            .is_none()
    );
    items.push(("broken".into(), serde_json::json!({"fixed": true})));
    source.put("broken", &items.last().unwrap().1)?;
    // Items added later are picked up by a later poll.
    for i in 8..12 {
        let item = (format!("movie-{i}"), serde_json::json!({"n": i}));
        source.put(&item.0, &item.1)?;
        items.push(item);
    }
    wait_items_done(&db, &ids(&items)).await?;
    // More polls list every item again; none is enqueued twice.
    wait_polls(&tp, 3.0).await?;
    tp.wait_caught_up("item-worker", "jobs.items").await?;

    let queued = tp.events("jobs.items").await?;
    let mut enqueued = std::collections::BTreeMap::new();
    for event in &queued {
        let data = mediaflow_events::data_json(event)?;
        mediaflow_events::schema::validate(mediaflow_events::WorkItem::TYPE, &data)
            .map_err(anyhow::Error::msg)?;
        let item: mediaflow_events::WorkItem = mediaflow_events::decode(event)?;
        *enqueued.entry(item.name).or_insert(0) += 1;
    }
    let duplicates: usize = enqueued.values().map(|n| n - 1).sum();
    let lost = items
        .iter()
        .filter(|(n, _)| !enqueued.contains_key(n))
        .count();
    println!(
        "http source: items {}, enqueued {}, duplicates found {duplicates}, lost {lost}",
        items.len(),
        queued.len()
    );
    assert_eq!((queued.len(), duplicates, lost), (items.len(), 0, 0));

    // Each item's worker got the item's data in WORK_ITEM_FILE; its outputs are stored under
    // the item, recorded once and announced.
    let s3 = tp.s3_client();
    for (name, data) in &items {
        let id = mediaflow_events::item_id("books", name);
        let results = db.results(&id).await?;
        let names: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["item.json", "name.txt"], "{name}");
        let got = s3
            .get_object()
            .bucket(&tp.config.store.bucket)
            .key(&results[0].object_key)
            .send()
            .await?
            .body
            .collect()
            .await?
            .into_bytes();
        assert_eq!(
            &serde_json::from_slice::<serde_json::Value>(&got)?,
            data,
            "{name}"
        );
        assert_eq!(
            results[1].object_key,
            format!("derived/items/{id}/item-worker/v1/name.txt")
        );
    }
    let processed = tp
        .read_events("items.processed", items.len(), Duration::from_secs(30))
        .await?;
    let mut distinct = std::collections::BTreeSet::new();
    for event in &processed {
        let data = mediaflow_events::data_json(event)?;
        mediaflow_events::schema::validate(mediaflow_events::ItemProcessed::TYPE, &data)
            .map_err(anyhow::Error::msg)?;
        distinct.insert(event.id().to_owned());
    }
    assert_eq!(distinct.len(), items.len());
    tp.stop().await
}

/// A source that fails (here: it cannot enqueue while the broker is down) is restarted by
/// `mediaflow up` with backoff while the rest of the platform keeps serving; once the broker is
/// back it goes on, and every item is enqueued and processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_source_is_restarted_with_backoff() -> Result<()> {
    let source = BookSource::start().await?;
    let mut names: Vec<String> = (0..4).map(|i| format!("a-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        source.put(name, &serde_json::json!({"n": i}))?;
    }
    let scripts = tempfile::tempdir()?;
    let worker = item_worker(scripts.path())?;
    let url = source.url.clone();
    let mut tp = TestPlatform::start_with(Backend::Postgres, |c| {
        c.bus.request_timeout_ms = 3_000;
        c.exec.push(worker);
        c.http_source.push(http_source(&url));
    })
    .await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let ids = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .map(|n| mediaflow_events::item_id("books", n))
            .collect()
    };
    wait_items_done(&db, &ids(&names)).await?;

    tp.stop_kafka().await;
    for i in 0..4 {
        let name = format!("b-{i}");
        source.put(&name, &serde_json::json!({"n": 10 + i}))?;
        names.push(name);
    }
    // The source fails to enqueue, ends with an error and is restarted; the gateway still
    // answers meanwhile.
    let restarts = "mediaflow_stage_restarts_total{stage=\"books\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tp.metric(restarts).await? < 2.0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the failed source was not restarted twice"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let health = reqwest::get(format!("{}/healthz", tp.base)).await?;
    assert!(health.status().is_success());
    tp.start_kafka().await?;

    wait_items_done(&db, &ids(&names)).await?;
    tp.wait_caught_up("item-worker", "jobs.items").await?;
    let queued = tp.events("jobs.items").await?;
    let distinct: std::collections::BTreeSet<&str> = queued.iter().map(|e| e.id()).collect();
    let mut result_rows = 0;
    for id in ids(&names) {
        result_rows += db.results(&id).await?.len();
    }
    println!(
        "source restart: items {}, restarts {}, enqueued {} ({} distinct), result rows {result_rows}",
        names.len(),
        tp.metric(restarts).await?,
        queued.len(),
        distinct.len()
    );
    assert_eq!(distinct.len(), names.len());
    assert_eq!(
        result_rows,
        2 * names.len(),
        "two outputs per item, once each"
    );
    tp.stop().await
}

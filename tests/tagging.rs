//! The book's image tagging pipeline (ch. 12, `pipelines/tagging.yaml`) on real photos, on the
//! real broker, S3 server and database: batches of photos are redacted (faces and plates found by
//! OpenCV and blurred), joined per media and per batch, and reduced into a report that an
//! independent computation (kafka-python over the raw per-item events) agrees with; detections
//! agree with OpenCV's own Python binding; blurring changes the boxes and nothing else.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cloudevents::AttributesReader;
use mediaflow_events::{BatchCompleted, ImageRedacted, MediaCompleted, Report};
use serde_json::{Value, json};
use support::{Backend, TestPlatform, fixtures, repo_file, with_tagging};

/// Photos with people (astronaut, OpenCV's samples), a licence plate, and none (chelsea,
/// coffee, hubble, rocket, camera shots with EXIF orientation); PNG and JPEG.
const PHOTOS: [&str; 17] = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "exif/r_canon.jpg",
    "exif/r_sony.jpg",
    "exif/L01.jpg",
    "opencv/messi5.jpg",
    "opencv/basketball1.png",
    "opencv/basketball2.png",
    "opencv/aloeL.jpg",
    "opencv/left.jpg",
    "opencv/board.jpg",
    "opencv/chicky_512.png",
    "opencv/aero1.jpg",
    "opencv/licenseplate_motion.jpg",
];

/// A photo's item name in a batch: its file name.
fn item(photo: &str) -> &str {
    photo.rsplit('/').next().unwrap_or(photo)
}

/// The redact stage's `detect_max_side` default.
const DETECT_MAX_SIDE: u32 = 1600;

async fn create_batch(tp: &TestPlatform, body: Value) -> Result<String> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/batches", tp.base))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    ensure!(status == 201, "{status} {body}");
    Ok(body["id"].as_str().context("batch id")?.to_owned())
}

/// Uploads `bytes` into `batch` as item `name`; the media id.
async fn upload(tp: &TestPlatform, batch: &str, name: &str, bytes: Vec<u8>) -> Result<String> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/batches/{batch}/media", tp.base))
        .header("x-filename", name)
        .body(bytes)
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    ensure!(status.is_success(), "{name}: {status} {body}");
    Ok(body["id"].as_str().context("media id")?.to_owned())
}

fn iou(a: &Value, b: &Value) -> f64 {
    let n = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let (ax, ay, aw, ah) = (n(a, "x"), n(a, "y"), n(a, "width"), n(a, "height"));
    let (bx, by, bw, bh) = (n(b, "x"), n(b, "y"), n(b, "width"), n(b, "height"));
    let w = ((ax + aw).min(bx + bw) - ax.max(bx)).max(0.0);
    let h = ((ay + ah).min(by + bh) - ay.max(by)).max(0.0);
    let inter = w * h;
    inter / (aw * ah + bw * bh - inter)
}

/// How many of `boxes` overlap a box of the same label in `others` with IoU >= 0.5.
fn matched(boxes: &[Value], others: &[Value]) -> usize {
    boxes
        .iter()
        .filter(|b| {
            others
                .iter()
                .any(|o| o["label"] == b["label"] && iou(b, o) >= 0.5)
        })
        .count()
}

/// Counts of a histogram as a report shows it.
fn histogram_counts(report: &Value) -> Vec<u64> {
    report["buckets"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["count"].as_u64()).collect())
        .unwrap_or_default()
}

/// What kafka-python and plain Python compute from the raw per-item events of `media`.
async fn independent_aggregates(tp: &TestPlatform, media: &[String]) -> Result<Value> {
    let mut args = vec![
        tp.config.bus.brokers.clone(),
        tp.config.bus.topic_prefix.clone(),
        "120".to_owned(),
    ];
    args.extend(media.iter().cloned());
    Ok(serde_json::from_slice(
        &support::run_py("batch_aggregates.py", args).await?,
    )?)
}

/// The report's aggregates against the independent computation.
fn check_report(report: &Value, expected: &Value) -> Result<()> {
    let a = &report["aggregates"];
    ensure!(
        a["objects"] == expected["objects"],
        "objects: {} vs {}",
        a["objects"],
        expected["objects"]
    );
    ensure!(
        a["colors"] == expected["colors"],
        "colors: {} vs {}",
        a["colors"],
        expected["colors"]
    );
    for sum in ["bytes", "pixels"] {
        ensure!(
            a[sum]["sum"].as_f64() == expected[sum]["sum"].as_f64()
                && a[sum]["count"] == expected[sum]["count"],
            "{sum}: {} vs {}",
            a[sum],
            expected[sum]
        );
    }
    for hist in ["sizes", "sharpness"] {
        let counts: Vec<Value> = histogram_counts(&a[hist])
            .into_iter()
            .map(Value::from)
            .collect();
        ensure!(
            Value::Array(counts.clone()) == expected[hist],
            "{hist}: {counts:?} vs {}",
            expected[hist]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_photos_is_redacted_joined_and_reported_once() -> Result<()> {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        batch_of_photos(backend)
            .await
            .with_context(|| format!("on {backend:?}"))?;
    }
    Ok(())
}

async fn batch_of_photos(backend: Backend) -> Result<()> {
    let tp = TestPlatform::start_with(backend, with_tagging).await?;
    let id = create_batch(
        &tp,
        json!({"name": "photos", "manifest": PHOTOS.map(item), "failure_policy": "complete-partial"}),
    )
    .await?;
    let mut media = BTreeMap::new();
    for photo in PHOTOS {
        let m = upload(
            &tp,
            &id,
            item(photo),
            std::fs::read(fixtures().join(photo))?,
        )
        .await?;
        media.insert(photo, m);
    }
    let shown = tp.batch_reported(&id, Duration::from_secs(180)).await?;
    ensure!(shown["state"] == "complete", "{shown}");
    let report = &shown["report"];
    ensure!(
        report["inputs"] == PHOTOS.len() && report["outcome"] == "complete",
        "{report}"
    );
    for stage in ["colours", "objects", "report"] {
        ensure!(shown["reports"][stage].is_object(), "{stage}: {shown}");
    }

    // The report equals what an independent computation over the raw events finds.
    let ids: Vec<String> = media.values().cloned().collect();
    let expected = independent_aggregates(&tp, &ids).await?;
    check_report(report, &expected)?;
    ensure!(
        expected["objects"]["face"].as_u64().unwrap_or(0) >= 1,
        "no face found at all: {expected}"
    );

    // Each join released once: one media.completed per photo, one batch.completed; one report
    // per reducer.
    let completed: Vec<MediaCompleted> = tp.decoded("media.completed").await?;
    let completed_ids: BTreeSet<&str> = completed.iter().map(|m| m.media_id.as_str()).collect();
    ensure!(
        completed.len() == PHOTOS.len() && completed_ids.len() == PHOTOS.len(),
        "{} media.completed for {} photos",
        completed.len(),
        PHOTOS.len()
    );
    ensure!(
        completed
            .iter()
            .all(|m| m.branches.len() == 2 && m.batch.as_ref().is_some_and(|b| b.batch_id == id)),
        "{completed:?}"
    );
    let batches: Vec<BatchCompleted> = tp.decoded("batch.completed").await?;
    ensure!(
        batches.len() == 1 && batches[0].items.len() == PHOTOS.len(),
        "{batches:?}"
    );
    let reports: Vec<Report> = tp.decoded("reports").await?;
    ensure!(reports.len() == 1, "{reports:?}");
    ensure!(
        serde_json::to_value(&reports[0].aggregates)? == report["aggregates"],
        "the published report differs from the stored one"
    );
    let partials: Vec<Report> = tp.decoded("tagging.partials").await?;
    ensure!(partials.len() == 2, "{} leaf reports", partials.len());

    // Detections agree with OpenCV's own Python binding on the same photos.
    let redacted: Vec<ImageRedacted> = tp.decoded("images.redacted").await?;
    ensure!(
        redacted.len() == PHOTOS.len(),
        "{} redacted",
        redacted.len()
    );
    let paths: Vec<String> = PHOTOS
        .iter()
        .map(|p| fixtures().join(p).display().to_string())
        .collect();
    let mut args = vec![DETECT_MAX_SIDE.to_string()];
    args.extend(paths.iter().cloned());
    let theirs: Value = serde_json::from_slice(&support::run_py("opencv_detect.py", args).await?)?;
    let (mut ours_total, mut ours_matched, mut theirs_total, mut theirs_matched) = (0, 0, 0, 0);
    for (name, path) in PHOTOS.iter().zip(&paths) {
        let r = redacted
            .iter()
            .find(|r| r.media_id == media[name])
            .with_context(|| format!("no redacted event for {name}"))?;
        let ours: Vec<Value> = r
            .detections
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        let other = theirs[path].as_array().cloned().unwrap_or_default();
        ours_total += ours.len();
        theirs_total += other.len();
        ours_matched += matched(&ours, &other);
        theirs_matched += matched(&other, &ours);
    }
    eprintln!(
        "detections: ours {ours_matched}/{ours_total} matched, OpenCV's {theirs_matched}/{theirs_total}; report {}",
        report["aggregates"]
    );
    ensure!(theirs_total > 0, "OpenCV found nothing: {theirs}");
    ensure!(
        ours_matched * 10 >= ours_total * 9 && theirs_matched * 10 >= theirs_total * 9,
        "IoU >= 0.5: ours {ours_matched}/{ours_total}, OpenCV's {theirs_matched}/{theirs_total}; {theirs}"
    );

    // The redacted copy differs from the original inside the boxes and nowhere else (measured
    // on the PNG photos, whose decoded pixels every decoder agrees on).
    let s3 = tp.s3_client();
    for name in PHOTOS.iter().filter(|p| p.ends_with(".png")) {
        let r = redacted
            .iter()
            .find(|r| r.media_id == media[name])
            .context("redacted")?;
        let body = s3
            .get_object()
            .bucket(&r.output.bucket)
            .key(&r.output.key)
            .send()
            .await?
            .body
            .collect()
            .await?
            .into_bytes();
        let copy = image::load_from_memory(&body)?.into_rgb8();
        let original = image::open(fixtures().join(name))?.into_rgb8();
        ensure!(copy.dimensions() == original.dimensions(), "{name}: size");
        let inside = |x: u32, y: u32| {
            r.detections
                .iter()
                .any(|d| x >= d.x && x < d.x + d.width && y >= d.y && y < d.y + d.height)
        };
        let (mut changed_outside, mut changed_inside) = (0u64, 0u64);
        for (x, y, p) in copy.enumerate_pixels() {
            if p != original.get_pixel(x, y) {
                if inside(x, y) {
                    changed_inside += 1;
                } else {
                    changed_outside += 1;
                }
            }
        }
        ensure!(
            changed_outside == 0,
            "{name}: {changed_outside} pixels changed outside the boxes"
        );
        for d in &r.detections {
            let area = u64::from(d.width) * u64::from(d.height);
            let changed = (d.y..d.y + d.height)
                .flat_map(|y| (d.x..d.x + d.width).map(move |x| (x, y)))
                .filter(|&(x, y)| copy.get_pixel(x, y) != original.get_pixel(x, y))
                .count() as u64;
            ensure!(
                changed * 2 >= area,
                "{name}: only {changed} of {area} pixels blurred in {d:?}"
            );
        }
        if !r.detections.is_empty() {
            ensure!(changed_inside > 0, "{name}: nothing blurred");
        }
    }

    // The originals were deleted once every derived object existed; the derived ones remain.
    let keys = tp.object_keys().await?;
    for r in &redacted {
        ensure!(
            !keys.contains(&r.input.key),
            "original {} kept",
            r.input.key
        );
        ensure!(
            keys.contains(&r.output.key),
            "redacted copy {} missing",
            r.output.key
        );
    }
    let events = tp.events("media.completed").await?;
    ensure!(events.iter().all(|e| e.source() == "/mediaflow/media-join"));
    tp.stop().await
}

/// A JPEG cut short: the gateway takes it (it is a JPEG by its magic bytes), both branches
/// refuse it as bad input.
fn broken_jpeg() -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(fixtures().join("rocket.jpg"))?;
    bytes.truncate(4000);
    Ok(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn interleaved_batches_complete_independently_under_their_policies() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Postgres, with_tagging).await?;
    let partial = create_batch(
        &tp,
        json!({"name": "partial", "manifest": ["a.png", "b.jpg", "broken.jpg"],
               "failure_policy": "complete-partial"}),
    )
    .await?;
    let failing = create_batch(
        &tp,
        json!({"name": "failing", "manifest": ["c.png", "broken.jpg", "d.jpg"],
               "failure_policy": "fail-batch"}),
    )
    .await?;
    let counted = create_batch(&tp, json!({"name": "counted", "expected_items": 3})).await?;
    // One of two expected items comes; the batch's deadline releases it without the other.
    let short = create_batch(
        &tp,
        json!({"name": "short", "expected_items": 2, "timeout_secs": 12,
               "failure_policy": "complete-partial"}),
    )
    .await?;
    let photo = |name: &str| std::fs::read(fixtures().join(name));
    let uploads: Vec<(&str, &str, Vec<u8>)> = vec![
        (&partial, "a.png", photo("coffee.png")?),
        (&failing, "c.png", photo("chelsea.png")?),
        (&counted, "x1", photo("astronaut.png")?),
        (&partial, "broken.jpg", broken_jpeg()?),
        (&short, "s1", photo("coffee.png")?),
        (&failing, "broken.jpg", broken_jpeg()?),
        (&counted, "x2", photo("rocket.jpg")?),
        (&partial, "b.jpg", photo("rocket.jpg")?),
        (&counted, "x3", photo("opencv/messi5.jpg")?),
        (&failing, "d.jpg", photo("opencv/left.jpg")?),
    ];
    for (batch, name, bytes) in uploads {
        upload(&tp, batch, name, bytes).await?;
    }

    let shown = tp
        .batch_reported(&partial, Duration::from_secs(120))
        .await?;
    let report = &shown["report"];
    ensure!(
        shown["state"] == "partial"
            && report["outcome"] == "partial"
            && report["inputs"] == 2
            && report["failures"]["broken.jpg"]
                .as_str()
                .is_some_and(|why| why.contains("bad_input")),
        "{shown}"
    );
    ensure!(report["aggregates"]["bytes"]["count"] == 2, "{report}");

    let shown = tp
        .batch_reported(&failing, Duration::from_secs(120))
        .await?;
    let report = &shown["report"];
    ensure!(
        shown["state"] == "failed"
            && report["outcome"] == "failed"
            && report["aggregates"] == json!({})
            && report["failures"]["broken.jpg"].is_string(),
        "{shown}"
    );

    let shown = tp
        .batch_reported(&counted, Duration::from_secs(120))
        .await?;
    ensure!(
        shown["state"] == "complete"
            && shown["report"]["inputs"] == 3
            && shown["report"]["aggregates"]["objects"]["face"]
                .as_u64()
                .is_some_and(|n| n >= 1),
        "{shown}"
    );

    let shown = tp.batch_reported(&short, Duration::from_secs(120)).await?;
    ensure!(
        shown["state"] == "partial"
            && shown["report"]["inputs"] == 1
            && shown["report"]["failures"].as_object().is_some_and(|f| f
                .values()
                .any(|w| w.as_str().is_some_and(|w| w.contains("never arrived")))),
        "{shown}"
    );

    // Each batch released once, whatever the interleaving.
    let released: Vec<BatchCompleted> = tp.decoded("batch.completed").await?;
    let ids: BTreeSet<&str> = released.iter().map(|b| b.batch_id.as_str()).collect();
    ensure!(released.len() == 4 && ids.len() == 4, "{released:?}");
    let reports: Vec<Report> = tp.decoded("reports").await?;
    ensure!(reports.len() == 4, "{} reports", reports.len());
    tp.stop().await
}

/// The book's census example as event-time windows: towns report their population and
/// family-size histogram; a minute's report sums the people and merges the histograms weighted
/// by population. An event whose minute already closed goes to the late topic, counted.
const WINDOWED: &str = r#"
topics:
  - name: towns
    produced_by: the test
  - name: census
  - name: towns.late
stages:
  - name: census
    kind: reduce
    inputs: [towns]
    outputs:
      out: census
      late: towns.late
    config:
      group_by: window
      window: {size_secs: 60, allowed_lateness_secs: 10}
      aggregates:
        people: {op: sum, field: /population}
        families:
          op: weighted
          fractions: /family_sizes
          weight: /population
          buckets: ["1", "2", "3", "4+"]
        regions: {op: count, field: /region}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn windows_close_on_the_watermark_and_late_events_are_kept_visible() -> Result<()> {
    use cloudevents::{EventBuilder, EventBuilderV10};
    let files = tempfile::tempdir()?;
    let path = files.path().join("census.yaml");
    std::fs::write(&path, WINDOWED)?;
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| c.pipeline = Some(path.into())).await?;
    let topic = format!("{}towns", tp.config.bus.topic_prefix);
    let publisher = tp.bus.publisher("/test")?;
    // A minute boundary.
    let t0 = chrono::DateTime::from_timestamp_millis(30_000_000 * 60_000).context("t0")?;
    let town = |id: &str, secs: i64, population: u64, fractions: [f64; 4], region: &str| {
        EventBuilderV10::new()
            .id(id)
            .ty("census.town")
            .source("/test")
            .subject("towns")
            .time(t0 + chrono::Duration::seconds(secs))
            .data(
                "application/json",
                json!({"population": population, "family_sizes": fractions, "region": region}),
            )
            .build()
            .map_err(anyhow::Error::msg)
    };
    let send = |e: cloudevents::Event| {
        let (publisher, topic) = (&publisher, &topic);
        async move { anyhow::Ok(publisher.publish_event(topic, "towns", e).await?) }
    };
    // The first minute, a town of the next, and one that moves the watermark past the first.
    send(town("a", 5, 1000, [0.3, 0.3, 0.2, 0.2], "north")?).await?;
    send(town("b", 30, 3000, [0.1, 0.4, 0.3, 0.2], "south")?).await?;
    send(town("c", 65, 500, [0.5, 0.5, 0.0, 0.0], "north")?).await?;
    tp.wait_caught_up("census", "towns").await?;
    ensure!(
        tp.decoded::<Report>("census").await?.is_empty(),
        "a window reported before the watermark passed it"
    );
    send(town("d", 75, 200, [0.25, 0.25, 0.25, 0.25], "south")?).await?;
    tp.wait_caught_up("census", "towns").await?;
    let reports: Vec<Report> = tp.decoded("census").await?;
    ensure!(reports.len() == 1, "{reports:?}");
    let first = &reports[0];
    let a = serde_json::to_value(&first.aggregates)?;
    ensure!(first.inputs == 2, "{a}");
    ensure!(a["people"]["sum"].as_f64() == Some(4000.0), "{a}");
    ensure!(a["regions"] == json!({"north": 1, "south": 1}), "{a}");
    // (0.3 x 1000 + 0.1 x 3000) / 4000, ...
    for (bucket, want) in [("1", 0.15), ("2", 0.375), ("3", 0.275), ("4+", 0.2)] {
        let got = a["families"]["fractions"][bucket]
            .as_f64()
            .context("fraction")?;
        ensure!(
            (got - want).abs() < 1e-9,
            "bucket {bucket}: {got} != {want}: {a}"
        );
    }

    // Late: an event of the closed minute, and a repeat of one already counted.
    send(town("e", 20, 700, [1.0, 0.0, 0.0, 0.0], "east")?).await?;
    send(town("a", 5, 1000, [0.3, 0.3, 0.2, 0.2], "north")?).await?;
    tp.wait_caught_up("census", "towns").await?;
    let late: Vec<mediaflow_events::LateEvent> = tp.decoded("towns.late").await?;
    ensure!(
        late.len() == 1
            && late[0].event_id == "e"
            && late[0].window_end_ms == t0.timestamp_millis() + 60_000,
        "{late:?}"
    );
    ensure!(
        tp.metric("mediaflow_late_events_total{stage=\"census\"}")
            .await?
            == 1.0,
        "late events not counted"
    );
    ensure!(
        tp.decoded::<Report>("census").await?.len() == 1,
        "the closed window reported again"
    );
    tp.stop().await
}

/// The join and reduce stages of `tagging.yaml`, with the topics they read.
const COORDINATED: [(&str, &[&str]); 5] = [
    (
        "media-join",
        &["images.redacted", "tagging.tagged", "dead-letters"],
    ),
    ("batch-join", &["media.completed"]),
    ("colours", &["tagging.for-colours", "batch.completed"]),
    ("objects", &["tagging.for-objects", "batch.completed"]),
    ("report", &["tagging.partials"]),
];

/// A tagging platform whose join and reduce stages are left to run as processes of their own
/// (`spawn_coordinated`), to be stopped, rewound and killed.
async fn coordinated_platform() -> Result<TestPlatform> {
    TestPlatform::start_with(Backend::Postgres, |c| {
        with_tagging(c);
        c.stages.enabled = Some(
            [
                "router",
                "image-worker",
                "video-worker",
                "batch-intake",
                "redact-sharder",
                "redact-0",
                "redact-1",
                "tag",
                "completed-fanout",
            ]
            .map(str::to_owned)
            .to_vec(),
        );
    })
    .await
}

/// Starts coordinated stage `n` as its own process (a static group member, as a restarted pod
/// would be); a killed relay's emission is taken over after 3 s.
fn spawn_coordinated(
    tp: &TestPlatform,
    n: usize,
    logs: &std::path::Path,
) -> Result<tokio::process::Child> {
    let stage = COORDINATED[n].0;
    tp.spawn_stage(
        stage,
        stage,
        logs,
        &[
            ("MEDIAFLOW__STAGES__EMISSION_LEASE_SECS", "3"),
            ("MEDIAFLOW__BUS__GROUP_INSTANCE_ID", stage),
        ],
    )
}

async fn wait_coordinated_caught_up(tp: &TestPlatform) -> Result<()> {
    for (stage, inputs) in COORDINATED {
        for input in inputs {
            tp.wait_caught_up_within(stage, input, Duration::from_secs(120))
                .await?;
        }
    }
    Ok(())
}

/// Every report of batch `id` in the database, by reduce stage, without the time it was made.
async fn stored_reports(tp: &TestPlatform, id: &str) -> Result<BTreeMap<String, Value>> {
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let rows = sqlx::query("SELECT stage, report FROM reports WHERE batch_id = $1")
        .bind(id)
        .fetch_all(db.pool())
        .await?;
    rows.iter()
        .map(|r| {
            let mut report: Value =
                serde_json::from_str(&sqlx::Row::try_get::<String, _>(r, "report")?)?;
            report
                .as_object_mut()
                .context("a report")?
                .remove("reported_at");
            Ok((sqlx::Row::try_get(r, "stage")?, report))
        })
        .collect()
}

/// Messages on each topic the coordinated stages write, by topic.
async fn emitted(tp: &TestPlatform) -> Result<BTreeMap<&'static str, usize>> {
    let mut counts = BTreeMap::new();
    for topic in [
        "media.completed",
        "batch.completed",
        "tagging.partials",
        "reports",
    ] {
        counts.insert(topic, tp.events(topic).await?.len());
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_input_delivered_twice_changes_no_report() -> Result<()> {
    let tp = coordinated_platform().await?;
    let logs = tempfile::tempdir()?;
    let mut running = (0..COORDINATED.len())
        .map(|n| spawn_coordinated(&tp, n, logs.path()))
        .collect::<Result<Vec<_>>>()?;
    let photos = &PHOTOS[..8];
    let names: Vec<&str> = photos.iter().map(|p| item(p)).collect();
    let id = create_batch(&tp, json!({"name": "twice", "manifest": names})).await?;
    for photo in photos {
        upload(
            &tp,
            &id,
            item(photo),
            std::fs::read(fixtures().join(photo))?,
        )
        .await?;
    }
    let shown = tp.batch_reported(&id, Duration::from_secs(180)).await?;
    wait_coordinated_caught_up(&tp).await?;
    let reports = stored_reports(&tp, &id).await?;
    ensure!(reports.len() == 3, "{reports:?}");
    let before = emitted(&tp).await?;
    ensure!(
        before["media.completed"] == photos.len()
            && before["batch.completed"] == 1
            && before["tagging.partials"] == 2
            && before["reports"] == 1,
        "{before:?}"
    );

    // Stop the stages (SIGTERM: they drain and leave), move their groups back to the start of
    // every input, and produce every input event once more on purpose.
    for child in &mut running {
        let pid = child.id().context("pid")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        child.wait().await?;
    }
    let prefix = tp.config.bus.topic_prefix.clone();
    let publisher = tp.bus.publisher("/test")?;
    let mut inputs = BTreeSet::new();
    for (stage, topics) in COORDINATED {
        let topics: Vec<String> = topics.iter().map(|t| format!("{prefix}{t}")).collect();
        tp.bus
            .rewind_group(&format!("{prefix}{stage}"), &topics)
            .await?;
        inputs.extend(topics);
    }
    let mut duplicated = 0;
    for topic in &inputs {
        for d in tp.bus.read_to_end(topic).await? {
            let event = d.event.map_err(anyhow::Error::msg)?;
            let key = d.key.unwrap_or_else(|| event.id().to_owned());
            publisher.publish_event(topic, &key, event).await?;
            duplicated += 1;
        }
    }
    ensure!(duplicated > 4 * photos.len(), "{duplicated} duplicates");
    let after_duplicates = emitted(&tp).await?;

    // Everything again, twice over: nothing new is emitted, no report changes.
    let _again = (0..COORDINATED.len())
        .map(|n| spawn_coordinated(&tp, n, logs.path()))
        .collect::<Result<Vec<_>>>()?;
    wait_coordinated_caught_up(&tp).await?;
    ensure!(
        emitted(&tp).await? == after_duplicates,
        "new events after redelivery: {after_duplicates:?} -> {:?}",
        emitted(&tp).await?
    );
    ensure!(
        stored_reports(&tp, &id).await? == reports,
        "a report changed"
    );
    let again: Value = reqwest::get(format!("{}/v1/batches/{id}", tp.base))
        .await?
        .json()
        .await?;
    ensure!(again["report"] == shown["report"], "{again}");
    tp.stop().await
}

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_and_reducers_killed_mid_batch_report_as_if_undisturbed() -> Result<()> {
    let tp = coordinated_platform().await?;
    let logs = tempfile::tempdir()?;
    let mut running = (0..COORDINATED.len())
        .map(|n| spawn_coordinated(&tp, n, logs.path()))
        .collect::<Result<Vec<_>>>()?;
    // Every photo twice, under two names: 34 items.
    let items: Vec<(String, &str)> = PHOTOS
        .iter()
        .flat_map(|p| {
            [
                (format!("1-{}", item(p)), *p),
                (format!("2-{}", item(p)), *p),
            ]
        })
        .collect();
    let names: Vec<&str> = items.iter().map(|(n, _)| n.as_str()).collect();
    let id = create_batch(&tp, json!({"name": "killed", "manifest": names})).await?;
    let uploads = {
        let (base, id) = (tp.base.clone(), id.clone());
        let items: Vec<(String, Vec<u8>)> = items
            .iter()
            .map(|(n, p)| Ok((n.clone(), std::fs::read(fixtures().join(p))?)))
            .collect::<Result<_>>()?;
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut media = Vec::new();
            for (name, bytes) in items {
                let r = http
                    .post(format!("{base}/v1/batches/{id}/media"))
                    .header("x-filename", &name)
                    .body(bytes)
                    .send()
                    .await?;
                ensure!(r.status().is_success(), "{name}: {}", r.status());
                let body: Value = r.json().await?;
                media.push(body["id"].as_str().unwrap_or_default().to_owned());
            }
            anyhow::Ok(media)
        })
    };
    let mut rng = support::Rng::seeded("tagging crash test");
    let started = Instant::now();
    for kill in 0..KILLS {
        // Kill while the joins and reducers work: once more media completed since the last
        // kill (or, late in the batch, once the batch is released).
        let before = tp
            .bus
            .message_count(&format!("{}media.completed", tp.config.bus.topic_prefix))
            .await?;
        let wait = Instant::now();
        loop {
            let now = tp
                .bus
                .message_count(&format!("{}media.completed", tp.config.bus.topic_prefix))
                .await?;
            if now > before || wait.elapsed() > Duration::from_secs(20) {
                break;
            }
            // Polling the topic for progress.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every stage on some kills, one of them on the others.
        let victims: Vec<usize> = if kill % 3 == 0 {
            (0..COORDINATED.len()).collect()
        } else {
            vec![rng.below(COORDINATED.len() as u64) as usize]
        };
        for n in victims {
            running[n].start_kill()?; // SIGKILL
            running[n].wait().await?;
            running[n] = spawn_coordinated(&tp, n, logs.path())?;
        }
    }
    let media = uploads.await??;
    let shown = tp.batch_reported(&id, Duration::from_secs(300)).await?;
    wait_coordinated_caught_up(&tp).await?;
    let mut recovered = 0;
    for entry in std::fs::read_dir(logs.path())? {
        let log = std::fs::read_to_string(entry?.path())?;
        recovered += log.matches("not sending it again").count();
    }
    eprintln!(
        "tagging crash test: {} items, {KILLS} kills, reported after {:.1?}; emissions found \
         on their topic after a crash: {recovered}",
        items.len(),
        started.elapsed()
    );
    ensure!(shown["state"] == "complete", "{shown}");
    // The same report as an undisturbed run: what the raw per-item events say.
    let expected = independent_aggregates(&tp, &media).await?;
    check_report(&shown["report"], &expected)?;
    // Each release emitted once.
    let completed: Vec<MediaCompleted> = tp.decoded("media.completed").await?;
    let distinct: BTreeSet<&str> = completed.iter().map(|m| m.media_id.as_str()).collect();
    ensure!(
        completed.len() == items.len() && distinct.len() == items.len(),
        "{} media.completed for {} items ({} distinct)",
        completed.len(),
        items.len(),
        distinct.len()
    );
    let counts = emitted(&tp).await?;
    ensure!(
        counts["batch.completed"] == 1 && counts["tagging.partials"] == 2 && counts["reports"] == 1,
        "{counts:?}"
    );
    tp.stop().await
}

/// A tracker that remembers which events it was told are about to be published.
#[derive(Default)]
struct Told(std::sync::Mutex<Vec<String>>);

impl mediaflow_runtime::Tracker for Told {
    fn running<'a>(
        &'a self,
        _: &'a str,
        _: &'a cloudevents::Event,
    ) -> futures::future::BoxFuture<'a, Result<(), mediaflow_runtime::StageError>> {
        Box::pin(async { Ok(()) })
    }
    fn queued<'a>(
        &'a self,
        outputs: &'a [mediaflow_runtime::Bound],
    ) -> futures::future::BoxFuture<'a, Result<(), mediaflow_runtime::StageError>> {
        if let Ok(mut told) = self.0.lock() {
            told.extend(outputs.iter().map(|o| o.event.id().to_owned()));
        }
        Box::pin(async { Ok(()) })
    }
    fn done<'a>(
        &'a self,
        _: &'a str,
        _: &'a cloudevents::Event,
        _: &'a [mediaflow_runtime::Bound],
    ) -> futures::future::BoxFuture<'a, Result<(), mediaflow_runtime::StageError>> {
        Box::pin(async { Ok(()) })
    }
    fn failed<'a>(
        &'a self,
        _: &'a str,
        _: &'a cloudevents::Event,
        _: &'a mediaflow_runtime::StageError,
    ) -> futures::future::BoxFuture<'a, Result<(), mediaflow_runtime::StageError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Notes, as a relay does before it sends, the partition of `e` and that partition's end, with
/// the relay's lease ending at `lease_until`; the partition.
async fn note(
    tp: &TestPlatform,
    db: &mediaflow_db::Db,
    topic: &str,
    e: &mediaflow_coordinator::Emission,
    lease_until: i64,
) -> Result<i32> {
    let partition = mediaflow_bus::Publisher::partition_for(&e.key, 3);
    let from = tp.bus.end_offset(topic, partition).await?;
    sqlx::query(
        "UPDATE emissions SET partition_no = $2, from_offset = $3, lease_until_ms = $4 \
         WHERE id = $1",
    )
    .bind(e.event.id())
    .bind(i64::from(partition))
    .bind(from)
    .bind(lease_until)
    .execute(db.pool())
    .await?;
    Ok(partition)
}

/// The emission ledger's crash window, made on purpose: a relay that noted a partition's end
/// and sent, then died before marking the emission published; one that noted and died before
/// sending; one that never started. The next relay publishes each exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn the_emission_ledger_publishes_once_across_a_crash_between_send_and_mark() -> Result<()> {
    use mediaflow_coordinator::{Emission, Relay};
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let topic = format!("{}ledger", tp.config.bus.topic_prefix);
    tp.bus
        .ensure_topics(&[mediaflow_events::TopicSpec {
            name: topic.clone(),
            partitions: 3,
            retention: Duration::from_secs(3600),
        }])
        .await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 2).await?;
    let publisher = tp.bus.publisher("/mediaflow/ledger-test")?;
    let emission = |batch: &str| {
        Emission::of(
            &topic,
            "/mediaflow/ledger-test",
            &BatchCompleted {
                batch_id: batch.to_owned(),
                stage: "ledger-test".into(),
                outcome: mediaflow_events::JoinOutcome::Complete,
                items: BTreeMap::new(),
                failures: BTreeMap::new(),
                completed_at: "2026-12-03T10:00:00Z".into(),
            },
        )
    };
    let now = mediaflow_db::Db::now_ms();
    let (sent, noted, fresh, held) = (
        emission("sent-then-crashed")?,
        emission("noted-then-crashed")?,
        emission("never-tried")?,
        emission("held-by-a-live-relay")?,
    );
    for e in [&sent, &noted, &fresh, &held] {
        let mut tx = db.pool().begin().await?;
        e.record(&mut tx, "ledger-test", now).await?;
        // Recording the same decision again changes nothing.
        e.record(&mut tx, "ledger-test", now).await?;
        tx.commit().await?;
    }
    // What the dead relays had done before they died.
    let partition = note(&tp, &db, &topic, &sent, now - 1).await?;
    let landed = publisher
        .publish_to(&topic, partition, &sent.key, sent.event.clone())
        .await?;
    note(&tp, &db, &topic, &noted, now - 1).await?;
    note(&tp, &db, &topic, &held, now + 600_000).await?;

    let metrics = mediaflow_telemetry::Metrics::new();
    let told = std::sync::Arc::new(Told::default());
    let relay = Relay::new(
        "ledger-test",
        db.clone(),
        tp.bus.clone(),
        publisher.clone(),
        metrics.clone(),
        Duration::from_secs(3),
        told.clone(),
    );
    ensure!(relay.pass().await? == 3, "three emissions finished");
    ensure!(relay.pass().await? == 0, "nothing left to do");
    let on_topic = tp.bus.read_to_end(&topic).await?;
    let mut ids: Vec<String> = on_topic
        .iter()
        .map(|d| {
            d.event
                .as_ref()
                .map(|e| e.id().to_owned())
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<_>>()?;
    ids.sort();
    let mut want: Vec<String> = [&sent, &noted, &fresh]
        .iter()
        .map(|e| e.event.id().to_owned())
        .collect();
    want.sort();
    ensure!(
        ids == want,
        "on the topic: {ids:?}, wanted each of {want:?} once"
    );
    let offset: Option<i64> =
        sqlx::query_scalar("SELECT published_offset FROM emissions WHERE id = $1")
            .bind(sent.event.id())
            .fetch_one(db.pool())
            .await?;
    ensure!(offset == Some(landed.offset), "{offset:?} vs {landed:?}");
    // The stages reading the topic were told before each of the two sends.
    let mut queued = told.0.lock().map_err(|e| anyhow::anyhow!("{e}"))?.clone();
    queued.sort();
    let mut sent_now: Vec<String> = [&noted, &fresh]
        .iter()
        .map(|e| e.event.id().to_owned())
        .collect();
    sent_now.sort();
    ensure!(queued == sent_now, "queued {queued:?}, sent {sent_now:?}");
    let rendered = metrics.render();
    ensure!(
        rendered
            .contains(r#"mediaflow_coordinated_total{stage="ledger-test",outcome="recovered"} 1"#)
            && rendered.contains(
                r#"mediaflow_coordinated_total{stage="ledger-test",outcome="emitted"} 2"#
            ),
        "{rendered}"
    );
    tp.stop().await
}

/// A bucket of old photos as a batch (`mediaflow backfill s3://... --batch NAME`): read in
/// place, reduced into a report, and never deleted (only uploads the gateway stored are
/// originals the join may delete).
#[tokio::test(flavor = "multi_thread")]
async fn a_backfilled_prefix_becomes_a_batch_whose_originals_are_kept() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Sqlite, with_tagging).await?;
    let s3 = tp.s3_client();
    let legacy = format!("legacy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    s3.create_bucket().bucket(&legacy).send().await?;
    let keys = ["trip/astronaut.png", "trip/coffee.png", "trip/messi5.jpg"];
    for (key, fixture) in keys
        .iter()
        .zip(["astronaut.png", "coffee.png", "opencv/messi5.jpg"])
    {
        s3.put_object()
            .bucket(&legacy)
            .key(*key)
            .body(std::fs::read(fixtures().join(fixture))?.into())
            .send()
            .await?;
    }
    let out = tokio::process::Command::new(support::mediaflow_bin())
        .args([
            "backfill",
            &format!("s3://{legacy}/trip/"),
            "--batch",
            "old trip",
        ])
        .args(["--failure-policy", "complete-partial"])
        .env("MEDIAFLOW__EMBEDDED__KAFKA", "false")
        .env("MEDIAFLOW__EMBEDDED__S3", "false")
        .env("MEDIAFLOW__BUS__BROKERS", &tp.config.bus.brokers)
        .env("MEDIAFLOW__BUS__TOPIC_PREFIX", &tp.config.bus.topic_prefix)
        .env("MEDIAFLOW__STORE__ENDPOINT", &tp.config.store.endpoint)
        .env("MEDIAFLOW__STORE__BUCKET", &tp.config.store.bucket)
        .env(
            "MEDIAFLOW__PIPELINE",
            format!(
                "[{:?}, {:?}]",
                repo_file("pipelines/default.yaml").display().to_string(),
                repo_file("pipelines/tagging.yaml").display().to_string()
            ),
        )
        .env("DATABASE_URL", tp.config.database_url())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("enqueued 3"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("batch "))
        .and_then(|l| l.split(':').next())
        .context("the batch id")?
        .to_owned();
    let shown = tp.batch_reported(&id, Duration::from_secs(120)).await?;
    ensure!(
        shown["state"] == "complete"
            && shown["name"] == "old trip"
            && shown["report"]["inputs"] == 3
            && shown["report"]["aggregates"]["objects"]["face"]
                .as_u64()
                .is_some_and(|n| n >= 2),
        "{shown}"
    );
    let kept = s3
        .list_objects_v2()
        .bucket(&legacy)
        .send()
        .await?
        .contents()
        .len();
    ensure!(
        kept == keys.len(),
        "the backfilled originals were deleted: {kept} left"
    );
    tp.stop().await
}

/// After a join deleted the originals, the branch stages get their messages again (as after a
/// crash between publishing their result and committing their input): each finds its own
/// output there and is done, without a dead letter or a failed media.
#[tokio::test(flavor = "multi_thread")]
async fn branches_redelivered_after_their_originals_went_are_done_without_dead_letters()
-> Result<()> {
    let tp = TestPlatform::start_with(Backend::Sqlite, with_tagging).await?;
    let photos = ["astronaut.png", "opencv/messi5.jpg"];
    let names: Vec<&str> = photos.iter().map(|p| item(p)).collect();
    let id = create_batch(&tp, json!({"name": "again", "manifest": names})).await?;
    let mut media = Vec::new();
    for photo in photos {
        media.push(
            upload(
                &tp,
                &id,
                item(photo),
                std::fs::read(fixtures().join(photo))?,
            )
            .await?,
        );
    }
    tp.batch_reported(&id, Duration::from_secs(120)).await?;
    let keys = tp.object_keys().await?;
    ensure!(
        !keys.iter().any(|k| k.starts_with("uploads/")),
        "the originals were not deleted: {keys:?}"
    );

    let prefix = tp.config.bus.topic_prefix.clone();
    let publisher = tp.bus.publisher("/test")?;
    // The sharder reads the tag stage's topic too: it sends the images to the shards again.
    let branches = [
        ("redact-0", "tagging.shard-0"),
        ("redact-1", "tagging.shard-1"),
        ("tag", "tagging.images"),
    ];
    let mut again = 0;
    for (_, topic) in branches {
        let topic = format!("{prefix}{topic}");
        for d in tp.bus.read_to_end(&topic).await? {
            let event = d.event.map_err(anyhow::Error::msg)?;
            let key = d.key.unwrap_or_else(|| event.id().to_owned());
            publisher.publish_event(&topic, &key, event).await?;
            again += 1;
        }
    }
    ensure!(again == 2 * photos.len(), "{again} messages again");
    tp.wait_caught_up("redact-sharder", "tagging.images")
        .await?;
    for (stage, topic) in branches {
        tp.wait_caught_up(stage, topic).await?;
    }
    let dead = tp.events("dead-letters").await?;
    ensure!(dead.is_empty(), "dead letters: {dead:?}");
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    for m in &media {
        let row = db.media(m).await?.context("media row")?;
        ensure!(
            row.status == mediaflow_db::MediaStatus::Done,
            "{m}: {:?} {:?}",
            row.status,
            row.error
        );
    }
    let redacted: Vec<ImageRedacted> = tp.decoded("images.redacted").await?;
    ensure!(
        redacted.len() == photos.len(),
        "{} redacted events",
        redacted.len()
    );
    tp.stop().await
}

//! The book's image tagging pipeline (ch. 12, `pipelines/tagging.yaml`) on real photos, on the
//! real broker, S3 server and database: batches of photos are redacted (faces and plates found by
//! OpenCV and blurred), joined per media and per batch, and reduced into a report that an
//! independent computation (kafka-python over the raw per-item events) agrees with; detections
//! agree with OpenCV's own Python binding; blurring changes the boxes and nothing else.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cloudevents::AttributesReader;
use mediaflow_events::{BatchCompleted, ImageRedacted, MediaCompleted, Report};
use serde_json::{Value, json};
use support::{Backend, TestPlatform, fixtures, python, repo_file, with_tagging};

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

/// Waits until batch `id` is released by its join and its report is in; the batch as shown.
async fn wait_reported(tp: &TestPlatform, id: &str, timeout: Duration) -> Result<Value> {
    let start = Instant::now();
    loop {
        let shown: Value = reqwest::get(format!("{}/v1/batches/{id}", tp.base))
            .await?
            .json()
            .await?;
        if shown["state"] != "open" && !shown["report"].is_null() {
            return Ok(shown);
        }
        if start.elapsed() > timeout {
            bail!("batch {id} not reported after {timeout:?}: {shown}");
        }
        // Polling the API.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
    let out = tokio::process::Command::new(python())
        .arg(repo_file("tests/py/batch_aggregates.py"))
        .arg(&tp.config.bus.brokers)
        .arg(&tp.config.bus.topic_prefix)
        .arg("120")
        .args(media)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "batch_aggregates.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
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
    let shown = wait_reported(&tp, &id, Duration::from_secs(180)).await?;
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
    let out = tokio::process::Command::new(python())
        .arg(repo_file("tests/py/opencv_detect.py"))
        .arg(DETECT_MAX_SIDE.to_string())
        .args(&paths)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "opencv_detect.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout)?;
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

    let shown = wait_reported(&tp, &partial, Duration::from_secs(120)).await?;
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

    let shown = wait_reported(&tp, &failing, Duration::from_secs(120)).await?;
    let report = &shown["report"];
    ensure!(
        shown["state"] == "failed"
            && report["outcome"] == "failed"
            && report["aggregates"] == json!({})
            && report["failures"]["broken.jpg"].is_string(),
        "{shown}"
    );

    let shown = wait_reported(&tp, &counted, Duration::from_secs(120)).await?;
    ensure!(
        shown["state"] == "complete"
            && shown["report"]["inputs"] == 3
            && shown["report"]["aggregates"]["objects"]["face"]
                .as_u64()
                .is_some_and(|n| n >= 1),
        "{shown}"
    );

    let shown = wait_reported(&tp, &short, Duration::from_secs(120)).await?;
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
    let t0 =
        chrono::DateTime::from_timestamp_millis(1_800_000_000_000 - 1_800_000_000_000 % 60_000)
            .context("t0")?;
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

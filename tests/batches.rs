//! Batches (ch. 12) through the API on the real broker, S3 server and database: a manifest batch
//! takes each of its names once, a count batch takes as many uploads as it expects, refusals
//! come before anything is stored, uploads announce their batch item, and the batch shows its
//! items' progress per stage.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use support::{Backend, TestPlatform, fixtures, with_tagging};

async fn create(tp: &TestPlatform, body: Value) -> Result<(u16, Value)> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/batches", tp.base))
        .json(&body)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

/// Uploads fixture `file` raw into batch `batch`, named `name` (or unnamed).
async fn upload(
    tp: &TestPlatform,
    batch: &str,
    file: &str,
    name: Option<&str>,
) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/batches/{batch}/media", tp.base))
        .body(std::fs::read(fixtures().join(file))?);
    if let Some(name) = name {
        request = request.header("x-filename", name);
    }
    let r = request.send().await?;
    Ok((r.status().as_u16(), r.json().await?))
}

/// Runs `mediaflow batch upload SOURCE ARGS...`: whether it succeeded, its stdout and stderr.
async fn cli_upload(source: &std::path::Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(support::mediaflow_bin())
        .args(["batch", "upload"])
        .arg(source)
        .args(args)
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn media_rows(tp: &TestPlatform) -> Result<i64> {
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let r = sqlx::query("SELECT COUNT(*) AS n FROM media")
        .fetch_one(db.pool())
        .await?;
    Ok(sqlx::Row::try_get(&r, "n")?)
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_take_their_items_once_and_show_progress_per_stage() -> Result<()> {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        batch_scenario(backend).await?;
    }
    Ok(())
}

async fn batch_scenario(backend: Backend) -> Result<()> {
    let tp = TestPlatform::start_with(backend, with_tagging).await?;
    let (status, body) = create(
        &tp,
        json!({"name": "x", "expected_items": 2, "manifest": ["a"]}),
    )
    .await?;
    ensure!(
        status == 422 && body["code"] == "invalid-batch",
        "{status} {body}"
    );

    let (status, batch) = create(
        &tp,
        json!({"name": "holiday", "manifest": ["rocket.jpg", "coffee.png", "astronaut.png"],
               "failure_policy": "complete-partial"}),
    )
    .await?;
    ensure!(
        status == 201 && batch["state"] == "open" && batch["expected_items"] == 3,
        "{batch}"
    );
    let id = batch["id"].as_str().context("id")?.to_owned();

    let (status, first) = upload(&tp, &id, "rocket.jpg", Some("rocket.jpg")).await?;
    ensure!(status == 202, "{status} {first}");
    let before = media_rows(&tp).await?;
    for (file, name, want, code) in [
        ("rocket.jpg", Some("rocket.jpg"), 409, "item-taken"),
        ("rocket.jpg", Some("other.jpg"), 422, "not-in-manifest"),
        ("rocket.jpg", None, 422, "item-name-needed"),
    ] {
        let (status, body) = upload(&tp, &id, file, name).await?;
        ensure!(
            status == want && body["code"] == code,
            "{name:?}: {status} {body}"
        );
    }
    let (status, _) = upload(
        &tp,
        "0190c0de-0000-7000-8000-000000000000",
        "rocket.jpg",
        Some("a.jpg"),
    )
    .await?;
    ensure!(status == 404, "unknown batch: {status}");
    ensure!(
        media_rows(&tp).await? == before,
        "a refused upload left a media row"
    );
    for name in ["coffee.png", "astronaut.png"] {
        let (status, body) = upload(&tp, &id, name, Some(name)).await?;
        ensure!(status == 202, "{name}: {status} {body}");
    }

    // Count batches: as many uploads as expected, items named by media id.
    let (_, counted) = create(&tp, json!({"name": "two", "expected_items": 2})).await?;
    let counted_id = counted["id"].as_str().context("id")?.to_owned();
    for n in 0..3 {
        let (status, body) = if n == 0 {
            // The batch named by a header on a plain upload.
            let r = reqwest::Client::new()
                .post(format!("{}/v1/media", tp.base))
                .header("x-batch-id", &counted_id)
                .body(std::fs::read(fixtures().join("chelsea.png"))?)
                .send()
                .await?;
            (r.status().as_u16(), r.json::<Value>().await?)
        } else {
            upload(&tp, &counted_id, "chelsea.png", None).await?
        };
        let want = if n < 2 { 202 } else { 409 };
        ensure!(status == want, "upload {n}: {status} {body}");
        if n == 2 {
            ensure!(body["code"] == "batch-full", "{body}");
        }
    }

    // Each upload announced its batch item (the header's one too).
    let events = tp.events("media.uploaded").await?;
    let counted_items = events
        .iter()
        .filter_map(|e| mediaflow_events::data_json(e).ok())
        .filter(|d| d["batch"]["batch_id"] == counted_id.as_str())
        .count();
    ensure!(
        counted_items == 2,
        "{counted_items} uploads announced into the count batch"
    );
    let mut items: Vec<(String, String)> = Vec::new();
    for e in &events {
        let data = mediaflow_events::data_json(e)?;
        mediaflow_events::schema::validate("mediaflow.media.uploaded", &data)
            .map_err(anyhow::Error::msg)?;
        if data["batch"]["batch_id"] == id.as_str() {
            items.push((
                data["batch"]["item"].as_str().unwrap_or("").to_owned(),
                data["filename"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    items.sort();
    ensure!(
        items
            == [
                ("astronaut.png".into(), "astronaut.png".into()),
                ("coffee.png".into(), "coffee.png".into()),
                ("rocket.jpg".into(), "rocket.jpg".into())
            ],
        "{items:?}"
    );

    // Progress: every item done, by media status and per stage.
    let start = Instant::now();
    let shown = loop {
        let shown: Value = reqwest::get(format!("{}/v1/batches/{id}", tp.base))
            .await?
            .json()
            .await?;
        if shown["progress"]["items"]["done"] == 3 && shown["state"] != "open" {
            break shown;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "batch not done: {shown}"
        );
        // Polling the API.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The tagging pipeline's batch join released it, and its reducers reported.
    ensure!(
        shown["uploaded"] == 3 && shown["state"] == "complete" && shown["completed_at_ms"].is_i64(),
        "{shown}"
    );
    let stages = shown["progress"]["stages"].as_array().context("stages")?;
    ensure!(
        stages
            .iter()
            .any(|s| s["stage"] == "tag" && s["items"]["done"] == 3),
        "{shown}"
    );
    let r = reqwest::get(format!(
        "{}/v1/batches/0190c0de-0000-7000-8000-000000000000",
        tp.base
    ))
    .await?;
    ensure!(r.status() == 404);
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_uploads_a_folder_as_a_batch_and_follows_it() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Sqlite, with_tagging).await?;
    let folder = tempfile::tempdir()?;
    for name in ["rocket.jpg", "coffee.png", "astronaut.png"] {
        std::fs::copy(fixtures().join(name), folder.path().join(name))?;
    }
    std::fs::write(folder.path().join(".hidden"), b"not an item")?;
    let (ok, stdout, stderr) = cli_upload(
        folder.path(),
        &["--name", "from the cli", "--url", &tp.base, "--wait", "120"],
    )
    .await?;
    ensure!(ok, "{stdout}\n{stderr}");
    ensure!(
        stdout.contains("(from the cli): 3 of 3 items uploaded") && stdout.contains("done 3"),
        "{stdout}"
    );
    ensure!(stderr.contains("uploaded 3 of 3 files"), "{stderr}");
    let id = stdout
        .split_whitespace()
        .nth(1)
        .context("the batch id")?
        .to_owned();
    let shown: Value = reqwest::get(format!("{}/v1/batches/{id}", tp.base))
        .await?
        .json()
        .await?;
    ensure!(
        shown["manifest"] == true && shown["expected_items"] == 3,
        "{shown}"
    );

    // A folder with a name that cannot be an item is refused before anything is declared.
    std::fs::write(folder.path().join(" padded.jpg"), b"x")?;
    let (ok, _, stderr) = cli_upload(folder.path(), &["--url", &tp.base]).await?;
    ensure!(!ok && stderr.contains("padded.jpg"), "{stderr}");
    tp.stop().await
}

/// Writes `spec` (see `tests/py/make_zip.py`) as a zip archive at `out` with Python's zipfile.
async fn make_zip(out: &std::path::Path, spec: Value) -> Result<()> {
    let spec_path = out.with_extension("json");
    std::fs::write(&spec_path, spec.to_string())?;
    support::run_py("make_zip.py", [out, spec_path.as_path()]).await?;
    Ok(())
}

async fn post_zip(tp: &TestPlatform, batch: &str, body: Vec<u8>) -> Result<(u16, Value)> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/batches/{batch}/zip", tp.base))
        .header("content-type", "application/zip")
        .body(body)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zip_archive_uploads_its_files_into_a_batch_entry_by_entry() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| {
        with_tagging(c);
        c.gateway.max_upload_bytes = 1024 * 1024;
        c.gateway.max_archive_bytes = 6 * 1024 * 1024;
        c.gateway.max_archive_entries = 20;
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let fixture = |name: &str| fixtures().join(name).display().to_string();
    let archive = dir.path().join("holiday.zip");
    make_zip(
        &archive,
        json!([
            {"name": "holiday/", "dir": true},
            {"name": "holiday/rocket.jpg", "file": fixture("rocket.jpg")},
            {"name": "holiday/day 2/coffee.png", "file": fixture("coffee.png"), "stored": true},
            {"name": "__MACOSX/holiday/._rocket.jpg", "text": "resource fork"},
            {"name": "holiday/.DS_Store", "text": "finder"},
            {"name": "notes.jpg", "text": "not a photo at all"},
            {"name": "bomb.png", "zeros": 3 * 1024 * 1024},
            {"name": "broken.jpg", "file": fixture("astronaut.png"), "stored": true, "corrupt": true},
            {"name": "link.jpg", "symlink": "../../etc/passwd"},
            {"name": "stranger.png", "file": fixture("chelsea.png")},
        ]),
    )
    .await?;
    let bytes = std::fs::read(&archive)?;
    // An archive is bounded by max_archive_bytes, not by the single upload's limit.
    ensure!(bytes.len() > 1024 * 1024, "{} bytes", bytes.len());
    let manifest = [
        "rocket.jpg",
        "coffee.png",
        "notes.jpg",
        "bomb.png",
        "broken.jpg",
        "link.jpg",
    ];
    let (_, batch) = create(
        &tp,
        json!({"name": "holiday", "manifest": manifest, "failure_policy": "complete-partial"}),
    )
    .await?;
    let id = batch["id"].as_str().context("id")?.to_owned();

    // Whole-request refusals, before anything is taken.
    let (status, body) =
        post_zip(&tp, "0190c0de-0000-7000-8000-000000000000", bytes.clone()).await?;
    ensure!(status == 404, "unknown batch: {status} {body}");
    let (status, body) = post_zip(&tp, &id, b"PK but not really a zip".to_vec()).await?;
    ensure!(
        status == 400 && body["code"] == "bad-archive",
        "{status} {body}"
    );
    // Streamed without a length, so the gateway reads it up to the limit (a declared length
    // over it is refused before a byte is read, with the connection closed under the sender).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..7).map(|_| Ok(vec![7; 1024 * 1024])).collect();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/batches/{id}/zip", tp.base))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    let (status, body) = (r.status().as_u16(), r.json::<Value>().await?);
    ensure!(
        status == 413 && body["code"] == "too-large",
        "an archive over max_archive_bytes: {status} {body}"
    );
    let many = dir.path().join("many.zip");
    let entries: Vec<Value> = (0..21)
        .map(|i| json!({"name": format!("f{i}.jpg"), "text": "x"}))
        .collect();
    make_zip(&many, Value::Array(entries)).await?;
    let (status, body) = post_zip(&tp, &id, std::fs::read(&many)?).await?;
    ensure!(
        status == 413 && body["code"] == "too-many-entries",
        "{status} {body}"
    );
    ensure!(media_rows(&tp).await? == 0, "a refused archive left media");

    // Entry by entry: the photos taken under their base names, the rest each with its reason.
    let (status, report) = post_zip(&tp, &id, bytes.clone()).await?;
    ensure!(status == 202, "{status} {report}");
    ensure!(
        report["batch_id"] == id.as_str() && report["entries"] == 10,
        "{report}"
    );
    let mut accepted: Vec<(String, String)> = report["accepted"]
        .as_array()
        .context("accepted")?
        .iter()
        .map(|a| {
            (
                a["entry"].as_str().unwrap_or("").to_owned(),
                a["item"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    accepted.sort();
    ensure!(
        accepted
            == [
                ("holiday/day 2/coffee.png".into(), "coffee.png".into()),
                ("holiday/rocket.jpg".into(), "rocket.jpg".into()),
            ],
        "{report}"
    );
    let rejected: std::collections::BTreeMap<String, (u64, String)> = report["rejected"]
        .as_array()
        .context("rejected")?
        .iter()
        .map(|r| {
            (
                r["entry"].as_str().unwrap_or("").to_owned(),
                (
                    r["status"].as_u64().unwrap_or(0),
                    r["code"].as_str().unwrap_or("").to_owned(),
                ),
            )
        })
        .collect();
    let want: std::collections::BTreeMap<String, (u64, String)> = [
        ("notes.jpg", 415, "unsupported-media"),
        ("bomb.png", 413, "too-large"),
        ("broken.jpg", 422, "bad-entry"),
        ("link.jpg", 422, "bad-entry"),
        ("stranger.png", 422, "not-in-manifest"),
    ]
    .into_iter()
    .map(|(e, s, c)| (e.to_owned(), (s, c.to_owned())))
    .collect();
    ensure!(rejected == want, "{rejected:?}\n{report}");
    let mut skipped: Vec<&str> = report["skipped"]
        .as_array()
        .context("skipped")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    skipped.sort();
    ensure!(
        skipped == ["__MACOSX/holiday/._rocket.jpg", "holiday/.DS_Store"],
        "{report}"
    );
    ensure!(media_rows(&tp).await? == 2, "only the two photos are media");

    // The same archive again takes nothing twice.
    let (status, again) = post_zip(&tp, &id, bytes).await?;
    ensure!(status == 422, "{status} {again}");
    ensure!(
        again["accepted"].as_array().is_some_and(Vec::is_empty)
            && again["rejected"]
                .as_array()
                .context("rejected")?
                .iter()
                .filter(|r| r["code"] == "item-taken")
                .count()
                == 2,
        "{again}"
    );

    // The refused names are still the batch's to fill: it completes once they are.
    for (name, file) in [
        ("notes.jpg", "chelsea.png"),
        ("bomb.png", "astronaut.png"),
        ("broken.jpg", "rocket.jpg"),
        ("link.jpg", "coffee.png"),
    ] {
        let (status, body) = upload(&tp, &id, file, Some(name)).await?;
        ensure!(status == 202, "{name}: {status} {body}");
    }
    let shown = tp.batch_reported(&id, Duration::from_secs(120)).await?;
    ensure!(
        shown["state"] == "complete"
            && shown["uploaded"] == 6
            && shown["progress"]["items"]["done"] == 6,
        "{shown}"
    );
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_uploads_a_zip_archive_as_a_batch() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Sqlite, with_tagging).await?;
    let dir = tempfile::tempdir()?;
    let fixture = |name: &str| fixtures().join(name).display().to_string();
    let archive = dir.path().join("trip.zip");
    make_zip(
        &archive,
        json!([
            {"name": "trip/a/rocket.jpg", "file": fixture("rocket.jpg")},
            {"name": "trip/b/coffee.png", "file": fixture("coffee.png")},
            {"name": "trip/astronaut.png", "file": fixture("astronaut.png"), "stored": true},
            {"name": "__MACOSX/trip/._astronaut.png", "text": "resource fork"},
        ]),
    )
    .await?;
    let (ok, stdout, stderr) = cli_upload(&archive, &["--url", &tp.base, "--wait", "120"]).await?;
    ensure!(ok, "{stdout}\n{stderr}");
    ensure!(
        stdout.contains("(trip): 3 of 3 items uploaded") && stdout.contains("done 3"),
        "{stdout}"
    );
    ensure!(stderr.contains("uploaded 3 of 3 files"), "{stderr}");

    // Two files of one base name cannot both be items: refused before a batch is declared.
    let clash = dir.path().join("clash.zip");
    make_zip(
        &clash,
        json!([
            {"name": "a/rocket.jpg", "file": fixture("rocket.jpg")},
            {"name": "b/rocket.jpg", "file": fixture("rocket.jpg")},
        ]),
    )
    .await?;
    let (ok, _, stderr) = cli_upload(&clash, &["--url", &tp.base]).await?;
    ensure!(
        !ok && stderr.contains("a/rocket.jpg") && stderr.contains("b/rocket.jpg"),
        "{stderr}"
    );
    tp.stop().await
}

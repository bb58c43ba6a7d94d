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
    let out = tokio::process::Command::new(support::mediaflow_bin())
        .args(["batch", "upload"])
        .arg(folder.path())
        .args(["--name", "from the cli", "--url", &tp.base, "--wait", "120"])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{stdout}\n{stderr}");
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
    let out = tokio::process::Command::new(support::mediaflow_bin())
        .args(["batch", "upload"])
        .arg(folder.path())
        .args(["--url", &tp.base])
        .output()
        .await?;
    ensure!(!out.status.success());
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("padded.jpg"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tp.stop().await
}

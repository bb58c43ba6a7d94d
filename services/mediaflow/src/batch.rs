//! `mediaflow batch upload FOLDER`: a folder's files as one batch. The batch is declared with the
//! files' names as its manifest, the files are streamed to `POST /v1/batches/{id}/media` a few
//! at a time behind a progress bar, and with `--wait` the batch's progress is followed until
//! every item is done or failed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use mediaflow_batches::spec::is_item_name;
use serde_json::{Value, json};

/// How a folder is uploaded.
#[derive(Clone, Debug)]
pub struct FolderUpload {
    /// The gateway, e.g. `http://127.0.0.1:8080`.
    pub base: String,
    pub dir: PathBuf,
    /// The batch's name; the folder's name when None.
    pub name: Option<String>,
    /// `fail-batch` or `complete-partial`.
    pub failure_policy: String,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// Follow the batch until every item is done or failed, at most this long.
    pub wait: Option<Duration>,
}

/// The files of `dir` a batch takes: regular files, not hidden, sorted. A name that cannot be a
/// manifest item is an error naming it.
pub fn batch_files(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !meta.is_file() || name.starts_with('.') {
            continue;
        }
        if !is_item_name(&name) {
            bail!(
                "{}: the file name cannot be a batch item (rename it)",
                entry.path().display()
            );
        }
        files.push((name, entry.path(), meta.len()));
    }
    if files.is_empty() {
        bail!("{} has no files to upload", dir.display());
    }
    files.sort();
    Ok(files)
}

/// Declares the batch, uploads the folder, and (with `wait`) follows it. Returns the batch as
/// `GET /v1/batches/{id}` last showed it.
pub async fn upload_folder(job: &FolderUpload) -> Result<Value> {
    upload_files(job, batch_files(&job.dir)?).await
}

/// As `upload_folder`, for `files` (name, path, size) of the folder (some of `batch_files`).
pub async fn upload_files(job: &FolderUpload, files: Vec<(String, PathBuf, u64)>) -> Result<Value> {
    let http = reqwest::Client::new();
    let name = job.name.clone().unwrap_or_else(|| {
        job.dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "batch".into())
    });
    let manifest: Vec<&str> = files.iter().map(|(n, _, _)| n.as_str()).collect();
    let response = http
        .post(format!("{}/v1/batches", job.base))
        .json(&json!({"name": name, "manifest": manifest, "failure_policy": job.failure_policy}))
        .send()
        .await
        .with_context(|| format!("reaching the gateway at {}", job.base))?;
    let status = response.status();
    let batch: Value = response.json().await.unwrap_or(Value::Null);
    if status != reqwest::StatusCode::CREATED {
        bail!("declaring the batch: {status} {}", batch["detail"]);
    }
    let id = batch["id"]
        .as_str()
        .context("the gateway gave no batch id")?
        .to_owned();
    eprintln!("batch {id} ({name}): {} files", files.len());

    let total: u64 = files.iter().map(|(_, _, size)| size).sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("uploading [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let uploads = futures::stream::iter(files.iter().map(|(name, path, size)| {
        let http = http.clone();
        let url = format!("{}/v1/batches/{id}/media", job.base);
        let bar = bar.clone();
        async move {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let response = http
                .post(url)
                .header("content-type", "application/octet-stream")
                .header("content-length", size.to_string())
                .header("x-filename", name.as_str())
                .body(body)
                .send()
                .await?;
            let status = response.status();
            bar.inc(*size);
            if status == reqwest::StatusCode::ACCEPTED {
                Ok::<_, anyhow::Error>(None)
            } else {
                let problem: Value = response.json().await.unwrap_or(Value::Null);
                let why = problem["detail"].as_str().unwrap_or("").to_owned();
                bar.println(format!("{name}: refused ({status}): {why}"));
                Ok(Some((name.clone(), format!("{status}: {why}"))))
            }
        }
    }))
    .buffer_unordered(job.concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    bar.finish_and_clear();
    let mut refused = Vec::new();
    for u in uploads {
        if let Some(r) = u? {
            refused.push(r);
        }
    }
    eprintln!(
        "uploaded {} of {} files ({} bytes){}",
        files.len() - refused.len(),
        files.len(),
        total,
        if refused.is_empty() {
            String::new()
        } else {
            format!("; {} refused", refused.len())
        }
    );
    let status_url = format!("{}/v1/batches/{id}", job.base);
    let Some(limit) = job.wait else {
        return Ok(http.get(&status_url).send().await?.json().await?);
    };

    let uploaded = (files.len() - refused.len()) as u64;
    let bar = ProgressBar::new(uploaded).with_style(
        ProgressStyle::with_template("processing [{bar:32}] {pos}/{len} items {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let start = Instant::now();
    loop {
        let shown: Value = http.get(&status_url).send().await?.json().await?;
        let count = |state: &str| shown["progress"]["items"][state].as_u64().unwrap_or(0);
        let (done, failed) = (count("done"), count("failed"));
        bar.set_position(done + failed);
        bar.set_message(if failed > 0 {
            format!("({failed} failed)")
        } else {
            String::new()
        });
        // Every item final; a pipeline that joins batches has released this one by then (its
        // join marks each item done in the transaction that counts it), and its report
        // follows.
        let released = shown["state"] != "open";
        if done + failed >= uploaded && (!released || !shown["report"].is_null()) {
            bar.finish_and_clear();
            return Ok(shown);
        }
        if start.elapsed() > limit {
            bar.finish_and_clear();
            bail!("batch {id}: {done} done, {failed} failed of {uploaded} after {limit:?}");
        }
        // Following the batch's progress.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The batch in a few lines: items by status, each stage's items by state.
pub fn summary(batch: &Value) -> String {
    let mut out = format!(
        "batch {} ({}): {} of {} items uploaded, state {}\n",
        batch["id"].as_str().unwrap_or("?"),
        batch["name"].as_str().unwrap_or("?"),
        batch["uploaded"],
        batch["expected_items"],
        batch["state"].as_str().unwrap_or("?"),
    );
    let counts = |v: &Value| {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    out.push_str(&format!(
        "  items: {}\n",
        counts(&batch["progress"]["items"])
    ));
    for stage in batch["progress"]["stages"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<20} {}\n",
            stage["stage"].as_str().unwrap_or("?"),
            counts(&stage["items"])
        ));
    }
    if let Some(report) = batch["report"]["aggregates"].as_object() {
        out.push_str(&format!(
            "  report ({} items):\n",
            batch["report"]["inputs"]
        ));
        for (name, value) in report {
            out.push_str(&format!("    {name:<12} {}\n", brief(value)));
        }
    }
    if let Some(failures) = batch["report"]["failures"].as_object() {
        for (item, why) in failures {
            out.push_str(&format!(
                "  failed: {item}: {}\n",
                why.as_str().unwrap_or_default()
            ));
        }
    }
    out.push_str(&format!(
        "  status: GET /v1/batches/{}\n",
        batch["id"].as_str().unwrap_or("?")
    ));
    out
}

/// An aggregate in one line: counts as they are, a sum as its total, a histogram as its
/// buckets' counts.
fn brief(value: &Value) -> String {
    if let Some(sum) = value.get("sum") {
        return format!("{sum} (of {})", value["count"]);
    }
    if let Some(buckets) = value.get("buckets").and_then(Value::as_array) {
        return buckets
            .iter()
            .map(|b| match (&b["from"], &b["to"]) {
                (Value::Null, to) => format!("<{to}: {}", b["count"]),
                (from, Value::Null) => format!(">={from}: {}", b["count"]),
                (from, to) => format!("{from}..{to}: {}", b["count"]),
            })
            .collect::<Vec<_>>()
            .join("  ");
    }
    if let Some(fractions) = value.get("fractions") {
        return format!("{fractions} (weight {})", value["weight"]);
    }
    value.to_string()
}

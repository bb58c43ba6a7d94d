//! `mediaflow batch upload FOLDER|ARCHIVE.zip`: a folder's files, or a zip archive's, as one
//! batch. The batch is declared with the files' names as its manifest; a folder's files are
//! streamed to `POST /v1/batches/{id}/media` a few at a time, an archive is sent whole to
//! `POST /v1/batches/{id}/zip`, behind a progress bar; with `--wait` the batch's progress is
//! followed until every item is done or failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use mediaflow_batches::spec::is_item_name;
use mediaflow_gateway::archive::{EntryName, entry_name};
use serde_json::{Value, json};

/// How a batch is uploaded.
#[derive(Clone, Debug)]
pub struct BatchUpload {
    /// The gateway, e.g. `http://127.0.0.1:8080`.
    pub base: String,
    /// A folder, or a zip archive (a file).
    pub source: PathBuf,
    /// The batch's name; the folder's or archive's name when None.
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

/// The items a zip archive holds, by the gateway's rule (`entry_name`): its files' base names,
/// sorted; directories, hidden files and `__MACOSX/` left out. Two files of the same base name,
/// or a name that cannot be an item, are an error naming them.
pub fn archive_items(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a readable zip archive", path.display()))?;
    let mut items: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..archive.len() {
        let Some(Ok(entry)) = archive.name_for_index(i) else {
            bail!("{}: entry #{i} has no readable name", path.display());
        };
        match entry_name(&entry) {
            EntryName::Item(name) => {
                if let Some(first) = items.insert(name.clone(), entry.to_string()) {
                    bail!(
                        "{}: `{first}` and `{entry}` are both named `{name}`; a batch's items \
                         are named by their base names",
                        path.display()
                    );
                }
            }
            EntryName::Directory | EntryName::Skipped => {}
            EntryName::Invalid => bail!(
                "{}: `{entry}`: the file name cannot be a batch item",
                path.display()
            ),
        }
    }
    if items.is_empty() {
        bail!("{} has no files to upload", path.display());
    }
    Ok(items.into_keys().collect())
}

/// Declares the batch, uploads the folder or archive, and (with `wait`) follows it. Returns the
/// batch as `GET /v1/batches/{id}` last showed it.
pub async fn upload(job: &BatchUpload) -> Result<Value> {
    if job.source.is_file() {
        upload_archive(job).await
    } else {
        upload_files(job, batch_files(&job.source)?).await
    }
}

/// `POST /v1/batches` with `manifest`; the batch's id.
async fn declare(http: &reqwest::Client, job: &BatchUpload, manifest: &[&str]) -> Result<String> {
    let name = job.name.clone().unwrap_or_else(|| {
        let source = job
            .source
            .canonicalize()
            .unwrap_or_else(|_| job.source.clone());
        let stem = if source.is_file() {
            source.file_stem()
        } else {
            source.file_name()
        };
        stem.map_or_else(|| "batch".into(), |n| n.to_string_lossy().into_owned())
    });
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
    eprintln!("batch {id} ({name}): {} files", manifest.len());
    Ok(id)
}

fn bytes_bar(total: u64) -> ProgressBar {
    ProgressBar::new(total).with_style(
        ProgressStyle::with_template("uploading [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    )
}

/// As `upload`, for `files` (name, path, size) of the folder (some of `batch_files`).
pub async fn upload_files(job: &BatchUpload, files: Vec<(String, PathBuf, u64)>) -> Result<Value> {
    let http = reqwest::Client::new();
    let manifest: Vec<&str> = files.iter().map(|(n, _, _)| n.as_str()).collect();
    let id = declare(&http, job, &manifest).await?;

    let total: u64 = files.iter().map(|(_, _, size)| size).sum();
    let bar = bytes_bar(total);
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
    let mut refused = 0;
    for u in uploads {
        if u?.is_some() {
            refused += 1;
        }
    }
    eprintln!(
        "uploaded {} of {} files ({total} bytes){}",
        files.len() - refused,
        files.len(),
        if refused == 0 {
            String::new()
        } else {
            format!("; {refused} refused")
        }
    );
    follow(&http, job, &id, (files.len() - refused) as u64).await
}

/// As `upload`, for a zip archive: its items (`archive_items`) are the manifest, and the
/// archive goes whole to `POST /v1/batches/{id}/zip`, which answers entry by entry.
async fn upload_archive(job: &BatchUpload) -> Result<Value> {
    let path = &job.source;
    let items = archive_items(path)?;
    let http = reqwest::Client::new();
    let manifest: Vec<&str> = items.iter().map(String::as_str).collect();
    let id = declare(&http, job, &manifest).await?;

    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    let bar = bytes_bar(size);
    let counted = bar.clone();
    let body = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            counted.inc(chunk.len() as u64);
        }
    });
    let response = http
        .post(format!("{}/v1/batches/{id}/zip", job.base))
        .header("content-type", "application/zip")
        .header("content-length", size.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .with_context(|| format!("sending {}", path.display()))?;
    let status = response.status();
    bar.finish_and_clear();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if answer["accepted"].is_null() {
        bail!(
            "uploading {}: {status} {}",
            path.display(),
            answer["detail"].as_str().unwrap_or_default()
        );
    }
    let accepted = answer["accepted"].as_array().map_or(0, Vec::len);
    for r in answer["rejected"].as_array().into_iter().flatten() {
        eprintln!(
            "{}: refused ({} {}): {}",
            r["entry"].as_str().unwrap_or("?"),
            r["status"],
            r["code"].as_str().unwrap_or("?"),
            r["detail"].as_str().unwrap_or_default()
        );
    }
    eprintln!(
        "uploaded {accepted} of {} files ({size} bytes of archive){}",
        items.len(),
        match answer["rejected"].as_array().map_or(0, Vec::len) {
            0 => String::new(),
            n => format!("; {n} refused"),
        }
    );
    follow(&http, job, &id, accepted as u64).await
}

/// With `job.wait`, follows batch `id` until its `uploaded` items are done or failed (and its
/// report is in, if it was released); the batch as last shown.
async fn follow(
    http: &reqwest::Client,
    job: &BatchUpload,
    id: &str,
    uploaded: u64,
) -> Result<Value> {
    let status_url = format!("{}/v1/batches/{id}", job.base);
    let Some(limit) = job.wait else {
        return Ok(http.get(&status_url).send().await?.json().await?);
    };
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

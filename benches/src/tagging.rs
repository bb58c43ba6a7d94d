//! The book's image tagging pipeline (`pipelines/tagging.yaml`) end to end on one core, against
//! the sum of its kernels' own time on the same images: how much the platform (gateway, broker,
//! S3, database, sharder, copiers, joins, reducers, the emission ledger) costs beyond the image
//! work itself.
//!
//! usage: tagging --mediaflow BIN --photos DIR --work DIR [--images 500] [--cpus 0] [--clients 4]
//!        tagging --kernels-only --photos DIR [--images 500]
//!
//! 1. Kernels, one image at a time on one thread, in a copy of this program pinned to the first
//!    of `--cpus` (`--kernels-only`), before and after the end-to-end run (this machine's speed
//!    drifts within minutes; their mean counts): the `tag` stage's (decode, the 256 px
//!    rendition, tags) and the `redact` stage's (decode, both Haar cascades, blur, PNG encode),
//!    over the `--images` uploads (the photos under `--photos`, cycled).
//! 2. End to end: the release `mediaflow up` running `tagging.yaml` alone, pinned to `--cpus`;
//!    a warm-up batch of one photo goes through first (consumer groups form); then a batch of
//!    `--images` is declared, uploaded by `--clients` clients from this process, and the clock
//!    stops when `GET /v1/batches/{id}` shows its report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use mediaflow_benches::up::{SET_ASIDE, Up};
use mediaflow_imaging::DecodeLimits;
use mediaflow_imaging::renditions::RenditionSpec;
use mediaflow_redact_worker::{Detector, RedactConfig, detect_and_blur};
use serde_json::{Value, json};

/// How far apart (relative) the kernel runs before and after may be before the bench warns
/// that the machine's speed drifted (on the machine of 2026-12-08: about 2% between agreeing
/// runs, 12 to 13% in the drifting ones).
const DRIFT_WARNING: f64 = 0.05;

struct Args {
    kernels_only: bool,
    mediaflow: PathBuf,
    photos: PathBuf,
    work: PathBuf,
    images: usize,
    cpus: String,
    clients: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        kernels_only: false,
        mediaflow: PathBuf::new(),
        photos: PathBuf::new(),
        work: PathBuf::new(),
        images: 500,
        cpus: "0".into(),
        clients: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--kernels-only" {
            args.kernels_only = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mediaflow" => args.mediaflow = value.into(),
            "--photos" => args.photos = value.into(),
            "--work" => args.work = value.into(),
            "--images" => args.images = value.parse()?,
            "--cpus" => args.cpus = value,
            "--clients" => args.clients = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(
        args.photos.is_dir()
            && (args.kernels_only || args.mediaflow.is_file() && !args.work.as_os_str().is_empty()),
        "usage: tagging --mediaflow BIN --photos DIR --work DIR [--images 500] [--cpus 0] [--clients 4] \
         | tagging --kernels-only --photos DIR [--images 500]"
    );
    Ok(args)
}

/// Every JPEG and PNG under `dir` (one level of folders down), by path.
fn photos(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "video") {
            folders.push(path);
        }
    }
    for folder in folders {
        for entry in std::fs::read_dir(folder)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "jpg" || e == "png") {
                found.push(path);
            }
        }
    }
    found.sort();
    ensure!(!found.is_empty(), "no photos under {}", dir.display());
    Ok(found)
}

/// Seconds the two stages' kernels take over `files`, one after another on this thread:
/// (tag, redact).
fn kernels(files: &[Vec<u8>]) -> Result<(f64, f64)> {
    // One thread, as the stage runs each detection (OpenCV would use every core otherwise).
    opencv::core::set_num_threads(1)?;
    let specs = vec![RenditionSpec::thumbnail("thumb-256", 256, 85)];
    let limits = DecodeLimits::default();
    let config = RedactConfig::default();
    let detector = Detector::new(
        config.cascade_paths().map_err(anyhow::Error::msg)?,
        config.scale_factor,
        config.min_neighbors,
        config.min_size,
        config.detect_max_side,
    );
    // Warm-up: the cascades load once per thread.
    let first = mediaflow_imaging::decode(&files[0], &limits)?;
    detect_and_blur(&detector, first).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut tag, mut redact) = (Duration::ZERO, Duration::ZERO);
    for bytes in files {
        let t = Instant::now();
        mediaflow_imaging::renditions::process(bytes, &specs, &limits)?;
        tag += t.elapsed();
        let t = Instant::now();
        let image = mediaflow_imaging::decode(bytes, &limits)?;
        let redacted = detect_and_blur(&detector, image).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut png = Vec::new();
        redacted
            .image
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        redact += t.elapsed();
    }
    Ok((tag.as_secs_f64(), redact.as_secs_f64()))
}

async fn declare(up: &Up, items: usize) -> Result<String> {
    let r = up
        .http
        .post(format!("{}/v1/batches", up.gateway))
        .json(&json!({"name": "bench", "expected_items": items}))
        .send()
        .await?;
    ensure!(r.status() == 201, "declaring a batch: {}", r.status());
    let body: Value = r.json().await?;
    Ok(body["id"].as_str().context("batch id")?.to_owned())
}

async fn upload_batch(up: &Up, id: &str, files: &[Vec<u8>], clients: usize) -> Result<()> {
    let sent = futures::stream::iter(files.iter().map(|bytes| async move {
        let r = up
            .http
            .post(format!("{}/v1/batches/{id}/media", up.gateway))
            .body(bytes.clone())
            .send()
            .await?;
        ensure!(r.status() == 202, "upload: {}", r.status());
        anyhow::Ok(())
    }))
    .buffer_unordered(clients)
    .collect::<Vec<_>>()
    .await;
    sent.into_iter().collect()
}

/// Waits until batch `id` shows its report; the batch.
async fn reported(up: &Up, id: &str, limit: Duration) -> Result<Value> {
    let start = Instant::now();
    loop {
        let shown: Value = up
            .http
            .get(format!("{}/v1/batches/{id}", up.gateway))
            .send()
            .await?
            .json()
            .await?;
        if !shown["report"].is_null() {
            return Ok(shown);
        }
        ensure!(start.elapsed() < limit, "batch {id} not reported: {shown}");
        // Polling the batch as `mediaflow batch upload --wait` does; the time taken is the
        // report's own (`reported_at`), not when a poll saw it.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = args()?;
    let photos = photos(&args.photos)?;
    let files: Vec<Vec<u8>> = (0..args.images)
        .map(|i| std::fs::read(&photos[i % photos.len()]))
        .collect::<Result<_, _>>()?;
    if args.kernels_only {
        let (tag, redact) = kernels(&files)?;
        println!("{tag} {redact}");
        return Ok(());
    }
    let bytes: usize = files.iter().map(Vec::len).sum();
    println!(
        "tagging pipeline: {} uploads of {} distinct photos ({:.1} MB), mediaflow on CPU {}",
        files.len(),
        photos.len(),
        bytes as f64 / 1e6,
        args.cpus
    );
    let cpu = args.cpus.split([',', '-']).next().unwrap_or("0").to_owned();
    let before = pinned_kernels(&args, &cpu)?;

    let pipeline = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pipelines/tagging.yaml"
    ));
    let dir = args.work.join("tagging");
    let up = Up::start(&args.mediaflow, &args.cpus, &dir, &pipeline).await?;
    let warm = declare(&up, 1).await?;
    upload_batch(&up, &warm, &files[..1], 1).await?;
    reported(&up, &warm, Duration::from_secs(120)).await?;

    let (cpu0, broker0) = up.cpu();
    let start = chrono::Utc::now();
    let id = declare(&up, files.len()).await?;
    upload_batch(&up, &id, &files, args.clients).await?;
    let shown = reported(&up, &id, Duration::from_secs(3600)).await?;
    let (cpu1, broker1) = up.cpu();
    let reported_at = shown["report"]["reported_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .context("the report has no reported_at")?;
    let took = (reported_at.with_timezone(&chrono::Utc) - start).as_seconds_f64();
    ensure!(
        shown["state"] == "complete" && shown["report"]["inputs"] == files.len(),
        "the batch did not complete: {}",
        shown["state"]
    );
    println!(
        "end to end: {took:.2} s, {:.2} images/s; CPU: mediaflow {:.2} s, broker {:.2} s",
        files.len() as f64 / took,
        cpu1 - cpu0,
        broker1 - broker0
    );
    up.stop().await?;
    let _ = std::fs::remove_dir_all(args.work.join(SET_ASIDE));
    let after = pinned_kernels(&args, &cpu)?;
    let kernel = (before.0 + before.1 + after.0 + after.1) / 2.0;
    println!(
        "kernels, one thread on CPU {cpu}: before tag {:.2} s + redact {:.2} s; after tag {:.2} s + redact {:.2} s; mean {kernel:.2} s ({:.2} images/s)",
        before.0,
        before.1,
        after.0,
        after.1,
        files.len() as f64 / kernel
    );
    // The ratio assumes the machine ran as fast during the end to end as during the kernel runs
    // around it; when those two disagree, so may it.
    let (first, last) = (before.0 + before.1, after.0 + after.1);
    let drift = (first - last).abs() / first.min(last);
    if drift > DRIFT_WARNING {
        println!(
            "warning: the kernel runs before and after differ by {:.1}%: this machine's speed \
             drifted during the run, and the ratio below is only as good as their agreement",
            drift * 100.0
        );
    }
    println!(
        "platform overhead: end to end / kernels = {:.3} ({:+.1}%); CPU (mediaflow + broker) / kernels = {:.3}",
        took / kernel,
        (took / kernel - 1.0) * 100.0,
        (cpu1 - cpu0 + broker1 - broker0) / kernel
    );
    Ok(())
}

/// The kernels' seconds (tag, redact), measured by a copy of this program pinned to `cpu`.
fn pinned_kernels(args: &Args, cpu: &str) -> Result<(f64, f64)> {
    let out = std::process::Command::new("taskset")
        .args(["-c", cpu])
        .arg(std::env::current_exe()?)
        .arg("--kernels-only")
        .arg("--photos")
        .arg(&args.photos)
        .args(["--images", &args.images.to_string()])
        .output()
        .context("running the kernels under taskset")?;
    ensure!(
        out.status.success(),
        "the kernels failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut times = text.split_whitespace().map(str::parse::<f64>);
    match (times.next(), times.next()) {
        (Some(Ok(tag)), Some(Ok(redact))) => Ok((tag, redact)),
        _ => bail!("unexpected kernel output: {text}"),
    }
}

//! Uploading sample media through the gateway and waiting for their results: what
//! `mediaflow up --samples` does, as a user with `curl` would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mediaflow_gateway::{Accepted, MediaView};

/// One sample's outcome.
#[derive(Debug)]
pub struct SampleResult {
    pub file: PathBuf,
    pub media: MediaView,
    /// Its `tags` result (images), fetched through the API, when it has one.
    pub tags: Option<serde_json::Value>,
    /// Its `probe` result (videos), fetched through the API, when it has one.
    pub probe: Option<serde_json::Value>,
}

/// Whether a sample's file name says it is a photo (the batch demo takes photos only).
pub fn is_photo(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        ".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp",
    ]
    .iter()
    .any(|ext| lower.ends_with(ext))
}

/// Media files in `dir`, sorted by name.
pub fn sample_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading sample folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Uploads each file to the gateway at `base` and waits (up to `timeout` in all) until each is
/// done or failed.
pub async fn upload_and_wait(
    base: &str,
    files: &[PathBuf],
    timeout: Duration,
) -> Result<Vec<SampleResult>> {
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    for file in files {
        let bytes = tokio::fs::read(file)
            .await
            .with_context(|| format!("reading {}", file.display()))?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("upload");
        let response = http
            .post(format!("{base}/v1/media"))
            .header("content-type", "application/octet-stream")
            .header("x-filename", name)
            .body(bytes)
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            let status = response.status();
            bail!(
                "uploading {} failed: {status} {}",
                file.display(),
                response.text().await.unwrap_or_default()
            );
        }
        let body: Accepted = response.json().await?;
        println!(
            "uploaded {:<28} -> media {} ({}, {} bytes)",
            name, body.id, body.content_type, body.size
        );
        accepted.push((file.clone(), body));
    }

    let deadline = Instant::now() + timeout;
    let mut results = Vec::new();
    for (file, body) in accepted {
        loop {
            let media: MediaView = http
                .get(format!("{base}{}", body.status_url))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            if media.status != mediaflow_db::MediaStatus::Queued {
                let tags = json_result(&http, base, &media, "tags").await?;
                let probe = json_result(&http, base, &media, "probe").await?;
                results.push(SampleResult {
                    file: file.clone(),
                    media,
                    tags,
                    probe,
                });
                break;
            }
            if Instant::now() > deadline {
                bail!("{} was not processed within {timeout:?}", file.display());
            }
            // Polling the status API, as a client would.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(results)
}

/// The JSON result `name` of `media`, downloaded through the API, if it has one.
async fn json_result(
    http: &reqwest::Client,
    base: &str,
    media: &MediaView,
    name: &str,
) -> Result<Option<serde_json::Value>> {
    let Some(r) = media.results.iter().find(|r| r.name == name) else {
        return Ok(None);
    };
    Ok(Some(
        http.get(format!("{base}{}", r.download_url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?,
    ))
}

/// One line of a video's probe: codec, size, duration, frame rate, streams.
fn probe_summary(probe: &serde_json::Value) -> String {
    let v = &probe["video"];
    format!(
        "probe: {} {}x{} (shown {}x{}), {:.2} s at {:.2} fps, {} stream(s)",
        v["codec"].as_str().unwrap_or("?"),
        v["width"],
        v["height"],
        v["display_width"],
        v["display_height"],
        probe["duration_s"].as_f64().unwrap_or(0.0),
        v["frame_rate"].as_f64().unwrap_or(0.0),
        probe["streams"].as_array().map_or(0, Vec::len)
    )
}

/// One line of an image's tags: size class, colours, camera, perceptual hash, sharpness.
fn tags_summary(tags: &serde_json::Value) -> String {
    let colours: Vec<String> = tags["colours"]
        .as_array()
        .into_iter()
        .flatten()
        .take(3)
        .map(|c| {
            format!(
                "{} {:.0}%",
                c["name"].as_str().unwrap_or("?"),
                c["share"].as_f64().unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    let camera = [&tags["exif"]["make"], &tags["exif"]["model"]]
        .iter()
        .filter_map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "tags: {} {}, colours {}, {}phash {}, sharpness {:.0}",
        tags["size_class"].as_str().unwrap_or("?"),
        tags["orientation"].as_str().unwrap_or("?"),
        colours.join(", "),
        if camera.is_empty() {
            String::new()
        } else {
            format!("camera {camera}, ")
        },
        tags["phash"].as_str().unwrap_or("?"),
        tags["sharpness"].as_f64().unwrap_or(0.0)
    )
}

/// Prints where each sample's results are and how to fetch them.
pub fn print_results(base: &str, results: &[SampleResult]) {
    println!();
    for r in results {
        let name = r.file.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        match r.media.status {
            mediaflow_db::MediaStatus::Done => {
                for t in &r.media.results {
                    let size = match (t.width, t.height) {
                        (Some(w), Some(h)) => format!(" {w}x{h}"),
                        _ => String::new(),
                    };
                    let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
                    let file = format!("{stem}.{}", t.key.rsplit('/').next().unwrap_or(&t.name));
                    println!(
                        "{name}: {}{size} {} ({} bytes)\n    s3://{}/{}\n    curl -o {file} {base}{}",
                        t.name, t.content_type, t.size, t.bucket, t.key, t.download_url
                    );
                }
                if let Some(tags) = &r.tags {
                    println!("    {}", tags_summary(tags));
                }
                if let Some(probe) = &r.probe {
                    println!("    {}", probe_summary(probe));
                }
            }
            _ => println!(
                "{name}: {:?}: {}",
                r.media.status,
                r.media.error.as_deref().unwrap_or("no reason recorded")
            ),
        }
    }
}

//! Hostile and odd images pushed straight to the image stage (past the gateway's checks): each
//! ends as a correct thumbnail, or dead-lettered once as bad input with its reason, never
//! retried; the stage keeps going.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mediaflow_db::MediaStatus;
use mediaflow_events::{DeadLetter, ImageProcessed};
use mediaflow_imaging::samples::{Expect, hostile, near};
use support::{Backend, TestPlatform};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_images_end_as_thumbnails_or_bad_input_dead_letters() -> Result<()> {
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let samples = hostile();
    let mut by_id = HashMap::new();
    for sample in &samples {
        let event = tp
            .seed_media(&sample.bytes, sample.content_type, sample.extension, true)
            .await?;
        tp.announce(&event).await?;
        by_id.insert(event.media_id.clone(), sample);
    }
    // Every item reaches a final status.
    let ids: Vec<&str> = by_id.keys().map(String::as_str).collect();
    tp.wait_final(&ids, Duration::from_secs(120)).await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    tp.wait_caught_up("image-worker", "jobs.image").await?;

    let letters: Vec<DeadLetter> = tp.decoded("dead-letters").await?;
    let results: Vec<ImageProcessed> = tp.decoded("images.processed").await?;
    let s3 = tp.s3_client();
    for (id, sample) in &by_id {
        let media = db.media(id).await?.expect("seeded");
        let letter: Vec<&DeadLetter> = letters
            .iter()
            .filter(|l| l.source.key.as_deref() == Some(id.as_str()))
            .collect();
        let result: Vec<&ImageProcessed> = results.iter().filter(|r| &r.media_id == id).collect();
        match &sample.expect {
            Expect::Refused(why) => {
                assert_eq!(media.status, MediaStatus::Failed, "{}", sample.name);
                let error = media.error.unwrap_or_default();
                assert!(error.contains(why), "{}: {error}", sample.name);
                assert_eq!(letter.len(), 1, "{}: one dead letter", sample.name);
                assert_eq!(
                    (letter[0].error_class.as_str(), letter[0].attempts),
                    ("bad_input", 1),
                    "{}: bad input, not retried",
                    sample.name
                );
                assert!(result.is_empty(), "{}", sample.name);
            }
            Expect::Thumbnail {
                width,
                height,
                colour,
            } => {
                assert_eq!(media.status, MediaStatus::Done, "{}", sample.name);
                assert!(letter.is_empty(), "{}: {letter:?}", sample.name);
                assert_eq!(result.len(), 1, "{}", sample.name);
                let t = &result[0].renditions[0];
                assert_eq!((t.width, t.height), (*width, *height), "{}", sample.name);
                let bytes = s3
                    .get_object()
                    .bucket(&t.object.bucket)
                    .key(&t.object.key)
                    .send()
                    .await?
                    .body
                    .collect()
                    .await?
                    .into_bytes();
                let back = image::load_from_memory(&bytes)?.to_rgb8();
                assert_eq!(back.dimensions(), (*width, *height), "{}", sample.name);
                if let Some((x, y, want)) = colour {
                    let got = back.get_pixel(*x, *y).0;
                    assert!(near(got, *want, 60), "{}: {got:?}", sample.name);
                }
            }
        }
    }
    println!(
        "hostile images: {} samples, {} thumbnails, {} dead letters (all bad input, 1 attempt)",
        samples.len(),
        results.len(),
        letters.len()
    );
    tp.stop().await
}

/// Peak resident memory of process `pid` so far, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM for {pid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_image_stage_stays_under_100_mib_on_a_100_mp_jpeg() -> Result<()> {
    // The image stage runs only in its own process, whose memory is measured.
    let tp = TestPlatform::start_with(Backend::Postgres, |c| {
        c.stages.enabled = Some(vec!["router".into()]);
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let mut worker = tp.spawn_image_worker(0, dir.path())?;
    let pid = worker.id().expect("running");
    let jpeg = mediaflow_imaging::samples::camera_jpeg(10_000, 10_000, 7);
    let size = jpeg.len();
    let event = tp.seed_media(&jpeg, "image/jpeg", "jpg", true).await?;
    drop(jpeg);
    tp.announce(&event).await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let media = db.media(&event.media_id).await?.expect("seeded");
        match media.status {
            MediaStatus::Done => break,
            MediaStatus::Failed => bail!("failed: {:?}", media.error),
            MediaStatus::Queued if Instant::now() > deadline => bail!("not done in time"),
            MediaStatus::Queued => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let kib = peak_rss_kib(pid)?;
    println!(
        "image stage: peak RSS {:.1} MiB over a 100 MP JPEG (10000x10000, {:.1} MB)",
        kib as f64 / 1024.0,
        size as f64 / 1e6
    );
    worker.start_kill()?;
    worker.wait().await?;
    tp.stop().await?;
    anyhow::ensure!(kib <= 100 * 1024, "peak RSS {kib} KiB is over 100 MiB");
    Ok(())
}

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

/// A figure of `/proc/<pid>/status` in KiB: `VmHWM` (peak resident memory so far), `RssFile`
/// (resident pages of mapped files: the binary's code and its libraries), ...
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} for {pid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_image_stage_stays_under_64_mib_of_its_own_on_a_100_mp_jpeg() -> Result<()> {
    // The image stage runs only in its own process, whose memory is measured.
    let tp = TestPlatform::start_with(Backend::Postgres, |c| {
        c.stages.enabled = Some(vec!["router".into()]);
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let mut worker = tp.spawn_image_worker(0, dir.path())?;
    let pid = worker.id().expect("running");
    // What the stage holds before any work: once it has joined its group.
    let group = format!("{}image-worker", tp.config.bus.topic_prefix);
    let joined = Instant::now() + Duration::from_secs(60);
    while tp.bus.group_members(&group).await? == 0 {
        anyhow::ensure!(
            Instant::now() < joined,
            "the image stage never joined its group"
        );
        // Polling the group's membership.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (idle, code) = (status_kib(pid, "VmHWM")?, status_kib(pid, "RssFile")?);
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
    let kib = status_kib(pid, "VmHWM")?;
    // The stage's own memory at its peak: the peak less the mapped code resident before the job
    // (code pages are only added meanwhile, so this never understates it). The code of a debug
    // build is most of an idle process and says nothing about how the stage handles images.
    let own = kib.saturating_sub(code);
    println!(
        "image stage over a 100 MP JPEG (10000x10000, {:.1} MB): peak RSS {:.1} MiB, of which \
         mapped code {:.1} MiB and its own memory {:.1} MiB; {:.1} MiB before the job",
        size as f64 / 1e6,
        kib as f64 / 1024.0,
        code as f64 / 1024.0,
        own as f64 / 1024.0,
        idle as f64 / 1024.0
    );
    worker.start_kill()?;
    worker.wait().await?;
    tp.stop().await?;
    anyhow::ensure!(
        own <= 64 * 1024,
        "the stage's own memory peaked at {own} KiB, over 64 MiB"
    );
    Ok(())
}

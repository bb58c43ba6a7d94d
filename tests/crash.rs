//! At-least-once in, effectively-once out, under fire: 500 items flow through two image-worker
//! processes while one of them is killed with SIGKILL at random moments and restarted each time,
//! as an orchestrator would. Every item ends with exactly one result row and one thumbnail object,
//! and the result topic holds exactly one distinct event id per item.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cloudevents::AttributesReader;
use futures::StreamExt;
use mediaflow_events::{EventData, ImageProcessed};
use support::{Backend, Rng, TestPlatform, fixtures};

/// Outputs the image stage records per item: the `thumb-256` rendition and the `tags`.
const OUTPUTS: i64 = 2;

const ITEMS: usize = 500;
const KILLS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_survive_workers_killed_at_random() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Postgres, |c| {
        // The gateway and router run here; the image stage runs only in the two processes.
        c.stages.enabled = Some(vec!["router".into()]);
    })
    .await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 2).await?;
    let logs = tempfile::tempdir()?;
    let mut workers = vec![
        tp.spawn_image_worker(0, logs.path())?,
        tp.spawn_image_worker(1, logs.path())?,
    ];

    let mut rng = Rng::seeded("crash test");

    // Upload the items, eight at a time, while the killing goes on.
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let base = tp.base.clone();
    let uploads = tokio::spawn(async move {
        let http = reqwest::Client::new();
        futures::stream::iter(0..ITEMS)
            .map(|_| {
                let (http, base, png) = (http.clone(), base.clone(), png.clone());
                async move {
                    let r = http
                        .post(format!("{base}/v1/media"))
                        .body(png)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status() == 202, "upload refused: {}", r.status());
                    Ok(())
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<Result<()>>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()
    });

    let started = Instant::now();
    let mut kills = 0;
    while kills < KILLS {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(5000))).await;
        let victim = rng.below(2) as usize;
        workers[victim].start_kill()?; // SIGKILL
        workers[victim].wait().await?;
        kills += 1;
        workers[victim] = tp.spawn_image_worker(victim, logs.path())?;
    }
    uploads.await??;

    // Wait for every item to be done; the workers keep running.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = db.media_count_with(mediaflow_db::MediaStatus::Done).await?;
        if done == ITEMS as i64 {
            break;
        }
        for (n, w) in workers.iter_mut().enumerate() {
            if let Some(status) = w.try_wait()? {
                bail!(
                    "worker {n} exited on its own ({status}); see {}",
                    logs.path().display()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "only {done} of {ITEMS} items done after {:?}; logs in {}",
                started.elapsed(),
                logs.keep().display()
            );
        }
        // Polling the database for progress.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let results = db.result_count("image-worker").await?;
    let failed = db
        .media_count_with(mediaflow_db::MediaStatus::Failed)
        .await?;
    let objects = list_keys(&tp, "derived/").await?;
    let events = tp.events("images.processed").await?;
    let mut ids = HashSet::new();
    let mut media = HashSet::new();
    for event in &events {
        let result: ImageProcessed = mediaflow_events::decode(event)?;
        assert_eq!(
            event.id(),
            result.id().as_str(),
            "event ids are deterministic"
        );
        ids.insert(result.id());
        media.insert(result.media_id);
    }
    let dead = tp
        .bus
        .message_count(&format!("{}dead-letters", tp.config.bus.topic_prefix))
        .await?;
    eprintln!(
        "crash test: items {ITEMS}, kills {kills}, took {:.1?}; result rows {results} and objects {} \
         ({OUTPUTS} per item), \
         result events {} ({} distinct ids, {} redelivered duplicates), failed {failed}, dead letters {dead}, \
         duplicates found {}, lost {}",
        started.elapsed(),
        objects.len(),
        events.len(),
        ids.len(),
        events.len() - ids.len(),
        results - OUTPUTS * ITEMS as i64,
        ITEMS - media.len(),
    );
    assert_eq!(
        results,
        OUTPUTS * ITEMS as i64,
        "one set of result rows per item"
    );
    assert_eq!(
        objects.len() as i64,
        OUTPUTS * ITEMS as i64,
        "one set of output objects per item"
    );
    assert_eq!(ids.len(), ITEMS, "one distinct result event id per item");
    assert_eq!(media.len(), ITEMS, "every item has a result event");
    assert_eq!((failed, dead), (0, 0));

    for w in &mut workers {
        w.start_kill()?;
        w.wait().await?;
    }
    tp.stop().await
}

async fn list_keys(tp: &TestPlatform, prefix: &str) -> Result<Vec<String>> {
    let s3 = tp.s3_client();
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(&tp.config.store.bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await?;
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    Ok(keys)
}

/// The broker goes down mid-stream and comes back on the same data: uploads made meanwhile are
/// refused with 503 and retried by the client, stages reconnect, and every item completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_survive_a_broker_restart() -> Result<()> {
    const N: usize = 30;
    // Refuse uploads after 5 s without the broker instead of the default 30 s.
    let mut tp =
        TestPlatform::start_with(Backend::Postgres, |c| c.bus.request_timeout_ms = 5_000).await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 2).await?;
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let http = reqwest::Client::new();
    let mut refused = 0;
    for i in 0..N {
        if i == N / 3 {
            tp.stop_kafka().await;
        }
        if i == N / 2 {
            tp.start_kafka().await?;
        }
        // A client retries what the gateway refused while the broker was away.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = http
                .post(format!("{}/v1/media", tp.base))
                .body(png.clone())
                .send()
                .await?;
            if r.status() == 202 {
                break;
            }
            anyhow::ensure!(r.status() == 503, "unexpected {}", r.status());
            refused += 1;
            if i < N / 2 {
                // While the broker is down every upload is refused: go on to bring it back.
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "uploads still refused after the broker came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let accepted = db.media_count().await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = db.media_count_with(mediaflow_db::MediaStatus::Done).await?;
        if done == accepted {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {accepted} accepted items done after the broker restart");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tp.wait_caught_up("image-worker", "jobs.image").await?;
    let events = tp.events("images.processed").await?;
    let ids: HashSet<&str> = events.iter().map(|e| e.id()).collect();
    eprintln!(
        "broker restart: uploads attempted {N}, refused while down {refused}, accepted {accepted}, \
         result events {} ({} distinct), results {}",
        events.len(),
        ids.len(),
        db.result_count("image-worker").await?
    );
    assert!(refused > 0, "the broker outage was not noticed");
    assert_eq!(ids.len() as i64, accepted, "one result per accepted item");
    assert_eq!(db.result_count("image-worker").await?, OUTPUTS * accepted);
    tp.stop().await
}

/// S3 goes away for 15 s while a worker has a queue of items: every item is retried through the
/// outage and completes once; nothing fails, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_survive_a_15s_object_store_outage() -> Result<()> {
    const N: usize = 20;
    const OUTAGE: Duration = Duration::from_secs(15);
    let mut tp = TestPlatform::start_with(Backend::Postgres, |c| {
        c.stages.enabled = Some(vec!["router".into()]);
    })
    .await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 2).await?;
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let http = reqwest::Client::new();
    for _ in 0..N {
        let r = http
            .post(format!("{}/v1/media", tp.base))
            .body(png.clone())
            .send()
            .await?;
        anyhow::ensure!(r.status() == 202, "upload refused: {}", r.status());
    }
    tp.wait_caught_up("router", "media.uploaded").await?;

    // The queue is full; S3 goes down, and only then does a worker start on it.
    tp.stop_s3();
    let logs = tempfile::tempdir()?;
    let mut worker = tp.spawn_image_worker(0, logs.path())?;
    let outage_started = Instant::now();
    // The outage lasts a fixed time: this is the scenario, not a wait for some other event.
    tokio::time::sleep(OUTAGE).await;
    let done_during = db.media_count_with(mediaflow_db::MediaStatus::Done).await?;
    tp.start_s3().await?;

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = db.media_count_with(mediaflow_db::MediaStatus::Done).await?;
        if done == N as i64 {
            break;
        }
        if let Some(status) = worker.try_wait()? {
            bail!(
                "the worker exited ({status}); logs in {}",
                logs.keep().display()
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {N} done after S3 came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let failed = db
        .media_count_with(mediaflow_db::MediaStatus::Failed)
        .await?;
    let dead = tp
        .bus
        .message_count(&format!("{}dead-letters", tp.config.bus.topic_prefix))
        .await?;
    let results = db.result_count("image-worker").await?;
    eprintln!(
        "object store outage: items {N}, outage {:.1?}, done during the outage {done_during}, \
         result rows {results} ({OUTPUTS} per item), failed {failed}, dead letters {dead}, lost {}",
        OUTAGE,
        N as i64 - results / OUTPUTS
    );
    assert_eq!(done_during, 0, "nothing can finish without S3");
    assert_eq!((results, failed, dead), (OUTPUTS * N as i64, 0, 0));
    assert!(outage_started.elapsed() >= OUTAGE);
    worker.start_kill()?;
    worker.wait().await?;
    tp.stop().await
}

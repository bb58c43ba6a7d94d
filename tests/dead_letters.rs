//! A message that fails for good goes to the dead-letter topic with its reason while the messages
//! behind it keep flowing; once the cause is fixed, `dlq replay` completes it, once.

mod support;

use std::time::Duration;

use anyhow::Result;
use mediaflow::dlq::{self, Filter};
use mediaflow_events::ImageProcessed;
use mediaflow_gateway::MediaView;
use support::{Backend, TestPlatform, fixtures};

const TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_dead_lettered_and_replayed_after_the_fix() -> Result<()> {
    // One partition everywhere: the good upload queues behind the poison one.
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| c.bus.partitions = Some(1)).await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;

    // The poison: an upload whose original is missing from S3 (a permanent failure).
    let poison = tp.seed_upload(false).await?;
    let (id, object) = (poison.media_id.clone(), poison.object.clone());
    tp.announce(&poison).await?;

    // A good upload behind it on the same partition completes.
    let png = std::fs::read(fixtures().join("chelsea.png"))?;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", tp.base))
        .body(png)
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let events = tp.read_events("images.processed", 1, TIMEOUT).await?;
    let good: ImageProcessed = mediaflow_events::decode(&events[0])?;
    assert_ne!(good.media_id, id);

    // The poison is dead-lettered with its reason and shown as failed.
    let filter = Filter {
        stage: Some("image-worker".into()),
        class: None,
    };
    let entries = dlq::list(&tp.bus, &db, &filter).await?;
    assert_eq!(entries.len(), 1);
    let letter = &entries[0].letter;
    assert_eq!(
        (letter.error_class.as_str(), letter.attempts),
        ("permanent", 1)
    );
    assert!(letter.error.contains("not found"), "{}", letter.error);
    assert_eq!(letter.source.key.as_deref(), Some(id.as_str()));
    assert!(!entries[0].replayed);
    let view: MediaView = reqwest::get(format!("{}/v1/media/{id}", tp.base))
        .await?
        .json()
        .await?;
    assert_eq!(view.status, mediaflow_db::MediaStatus::Failed);
    // Filters apply.
    let other = Filter {
        stage: Some("router".into()),
        class: None,
    };
    assert!(dlq::list(&tp.bus, &db, &other).await?.is_empty());
    let bad_input = Filter {
        stage: None,
        class: Some("bad_input".into()),
    };
    assert!(dlq::list(&tp.bus, &db, &bad_input).await?.is_empty());

    // Fix the cause, replay: the item completes. A second replay does nothing.
    let bytes = std::fs::read(fixtures().join("rocket.jpg"))?;
    tp.s3_client()
        .put_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .body(bytes.into())
        .send()
        .await?;
    let report = dlq::replay(&tp.bus, &db, &filter).await?;
    assert_eq!(
        report,
        dlq::Replayed {
            replayed: 1,
            already: 0,
            unreplayable: 0
        }
    );
    let events = tp.read_events("images.processed", 2, TIMEOUT).await?;
    let ids: Vec<String> = events
        .iter()
        .map(|e| mediaflow_events::decode::<ImageProcessed>(e).map(|r| r.media_id))
        .collect::<Result<_, _>>()?;
    assert!(ids.contains(&id), "{ids:?}");
    let view: MediaView = reqwest::get(format!("{}/v1/media/{id}", tp.base))
        .await?
        .json()
        .await?;
    assert_eq!(view.status, mediaflow_db::MediaStatus::Done);
    assert_eq!(view.error, None);

    let again = dlq::replay(&tp.bus, &db, &filter).await?;
    assert_eq!(
        again,
        dlq::Replayed {
            replayed: 0,
            already: 1,
            unreplayable: 0
        }
    );
    assert!(dlq::list(&tp.bus, &db, &filter).await?[0].replayed);
    tp.stop().await
}

/// A message that keeps failing transiently is retried `max_attempts` times while the messages
/// behind it flow, then dead-lettered as `transient`; replayed once the cause is fixed, it
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_poison_is_dead_lettered_after_its_attempts_and_replayed() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let fix = dir.path().join("license-server-is-back");
    let script = dir.path().join("flaky.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -eu\n\
             if grep -q '\"filename\": \"poison.jpg\"' \"$WORK_ITEM_FILE\" && [ ! -e '{}' ]; then\n\
               echo 'license server unreachable' >&2; exit 75\n\
             fi\n\
             echo ok > \"$OUTPUT_DIR/ok.txt\"\n",
            fix.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| {
        c.bus.partitions = Some(1);
        c.stages.max_attempts = 3;
        c.stages.enabled = Some(vec!["router".into(), "flaky".into()]);
        c.exec.push(support::exec_stage("flaky", &script));
    })
    .await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let http = reqwest::Client::new();
    let jpeg = std::fs::read(fixtures().join("rocket.jpg"))?;
    let mut ids = Vec::new();
    for name in ["poison.jpg", "fine.jpg"] {
        let r = http
            .post(format!("{}/v1/media", tp.base))
            .header("x-filename", name)
            .body(jpeg.clone())
            .send()
            .await?;
        ids.push(r.json::<mediaflow_gateway::Accepted>().await?.id);
    }

    // The fine item behind the poison completes.
    let events = tp.read_events("media.processed", 1, TIMEOUT).await?;
    let done: mediaflow_events::MediaProcessed = mediaflow_events::decode(&events[0])?;
    assert_eq!(done.media_id, ids[1]);

    // The poison is dead-lettered after its three attempts, with what the command said.
    let filter = Filter {
        stage: Some("flaky".into()),
        class: Some("transient".into()),
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    let entries = loop {
        let entries = dlq::list(&tp.bus, &db, &filter).await?;
        if !entries.is_empty() {
            break entries;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the poison never reached the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].letter.attempts, 3);
    assert!(
        entries[0]
            .letter
            .error
            .contains("license server unreachable"),
        "{}",
        entries[0].letter.error
    );
    assert_eq!(
        entries[0].letter.source.key.as_deref(),
        Some(ids[0].as_str())
    );

    // Fixed and replayed, it completes.
    std::fs::write(&fix, "")?;
    assert_eq!(dlq::replay(&tp.bus, &db, &filter).await?.replayed, 1);
    let events = tp.read_events("media.processed", 2, TIMEOUT).await?;
    let mut done: Vec<String> = events
        .iter()
        .map(|e| {
            mediaflow_events::decode::<mediaflow_events::MediaProcessed>(e).map(|r| r.media_id)
        })
        .collect::<Result<_, _>>()?;
    done.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(done, want);
    tp.stop().await
}

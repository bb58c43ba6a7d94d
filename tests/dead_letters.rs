//! A message that fails for good goes to the dead-letter topic with its reason while the messages
//! behind it keep flowing; once the cause is fixed, `dlq replay` completes it, once.

mod support;

use std::time::Duration;

use anyhow::Result;
use mediaflow::dlq::{self, Filter};
use mediaflow_events::{MediaKind, MediaThumbnailed, MediaUploaded, ObjectRef};
use mediaflow_gateway::MediaView;
use sha2::Digest;
use support::{Backend, TestPlatform, fixtures};

const TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_dead_lettered_and_replayed_after_the_fix() -> Result<()> {
    // One partition everywhere: the good upload queues behind the poison one.
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| c.bus.partitions = 1).await?;
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;

    // The poison: an upload whose original is missing from S3 (a permanent failure).
    let bytes = std::fs::read(fixtures().join("rocket.jpg"))?;
    let id = uuid::Uuid::now_v7().to_string();
    let object = ObjectRef {
        bucket: tp.config.store.bucket.clone(),
        key: format!("uploads/{id}/original.jpg"),
        size: bytes.len() as u64,
        sha256: format!("{:x}", sha2::Sha256::digest(&bytes)),
        content_type: "image/jpeg".into(),
    };
    db.insert_media(&mediaflow_db::MediaRow {
        id: id.clone(),
        kind: "image".into(),
        content_type: object.content_type.clone(),
        filename: None,
        bucket: object.bucket.clone(),
        object_key: object.key.clone(),
        size_bytes: object.size as i64,
        sha256: object.sha256.clone(),
        status: mediaflow_db::MediaStatus::Queued,
        error: None,
        created_at_ms: mediaflow_db::Db::now_ms(),
        updated_at_ms: mediaflow_db::Db::now_ms(),
    })
    .await?;
    let poison = MediaUploaded {
        media_id: id.clone(),
        kind: MediaKind::Image,
        object: object.clone(),
        filename: None,
        uploaded_at: "2026-11-24T00:00:00Z".into(),
    };
    let uploaded = format!("{}media.uploaded", tp.config.bus.topic_prefix);
    tp.bus
        .publisher("/test")?
        .publish(&uploaded, &poison)
        .await?;

    // A good upload behind it on the same partition completes.
    let png = std::fs::read(fixtures().join("chelsea.png"))?;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", tp.base))
        .body(png)
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let events = tp.read_events("media.thumbnailed", 1, TIMEOUT).await?;
    let good: MediaThumbnailed = mediaflow_events::decode(&events[0])?;
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
    let events = tp.read_events("media.thumbnailed", 2, TIMEOUT).await?;
    let ids: Vec<String> = events
        .iter()
        .map(|e| mediaflow_events::decode::<MediaThumbnailed>(e).map(|r| r.media_id))
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

//! Sources beyond uploads: a bucket of old media backfilled into the pipeline, each object once.

mod support;

use std::time::Duration;

use anyhow::Result;
use mediaflow::backfill::{self, Report};
use mediaflow_events::MediaThumbnailed;
use support::{Backend, TestPlatform, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_prefix_is_backfilled_once() -> Result<()> {
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let s3 = tp.s3_client();
    let legacy = format!("legacy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    s3.create_bucket().bucket(&legacy).send().await?;
    let put = |key: &'static str, body: Vec<u8>| {
        let (s3, bucket) = (s3.clone(), legacy.clone());
        async move {
            s3.put_object()
                .bucket(bucket)
                .key(key)
                .body(body.into())
                .send()
                .await
        }
    };
    put(
        "photos/2019/rocket.jpg",
        std::fs::read(fixtures().join("rocket.jpg"))?,
    )
    .await?;
    put(
        "photos/2019/cat.png",
        std::fs::read(fixtures().join("chelsea.png"))?,
    )
    .await?;
    put(
        "photos/2020/coffee",
        std::fs::read(fixtures().join("coffee.png"))?,
    )
    .await?; // no extension
    put("photos/2020/notes.txt", b"not a photo".to_vec()).await?;
    put(
        "other/astronaut.png",
        std::fs::read(fixtures().join("astronaut.png"))?,
    )
    .await?;

    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let store = mediaflow_store::ObjectStore::new(&tp.config.store);
    let report = backfill::backfill(&store, &legacy, "photos/", &db, &tp.bus).await?;
    assert_eq!((report.enqueued, report.already), (3, 0));
    assert_eq!(
        report.skipped,
        vec![(
            "photos/2020/notes.txt".to_owned(),
            "not a supported image or video".to_owned()
        )]
    );

    let events = tp
        .read_events("media.thumbnailed", 3, Duration::from_secs(60))
        .await?;
    let mut inputs: Vec<String> = events
        .iter()
        .map(|e| {
            mediaflow_events::decode::<MediaThumbnailed>(e)
                .map(|r| format!("{}/{}", r.input.bucket, r.input.key))
        })
        .collect::<Result<_, _>>()?;
    inputs.sort();
    let want: Vec<String> = [
        "photos/2019/cat.png",
        "photos/2019/rocket.jpg",
        "photos/2020/coffee",
    ]
    .iter()
    .map(|k| format!("{legacy}/{k}"))
    .collect();
    assert_eq!(inputs, want, "thumbnails read the originals in place");

    // A second run finds nothing new; the result topic keeps one result per object.
    let again = backfill::backfill(&store, &legacy, "photos/", &db, &tp.bus).await?;
    assert_eq!(
        again,
        Report {
            enqueued: 0,
            already: 3,
            skipped: report.skipped.clone()
        }
    );
    tp.wait_caught_up("router", "media.uploaded").await?;
    tp.wait_caught_up("image-worker", "jobs.image").await?;
    let topic = format!("{}media.thumbnailed", tp.config.bus.topic_prefix);
    assert_eq!(tp.bus.message_count(&topic).await?, 3);
    tp.stop().await
}

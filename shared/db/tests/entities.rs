//! The database through its public API on a real SQLite file: media and work items, their
//! results, and the migration that made results belong to either.

use mediaflow_db::{Db, Entity, MediaRow, MediaStatus, ResultRow, StageState};

fn result(entity: &str, name: &str) -> ResultRow {
    ResultRow {
        entity_id: entity.into(),
        stage: "s".into(),
        stage_version: "1".into(),
        name: name.into(),
        bucket: "b".into(),
        object_key: format!("derived/{entity}/s/v1/{name}"),
        content_type: "text/plain".into(),
        size_bytes: 3,
        sha256: "ab".repeat(32),
        width: None,
        height: None,
    }
}

fn media(id: &str) -> MediaRow {
    MediaRow {
        id: id.into(),
        kind: "image".into(),
        content_type: "image/png".into(),
        filename: None,
        bucket: "b".into(),
        object_key: format!("uploads/{id}/original.png"),
        size_bytes: 10,
        sha256: "cd".repeat(32),
        status: MediaStatus::Queued,
        error: None,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

#[tokio::test]
async fn work_items_are_recorded_once_and_carry_their_results() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}/t.db", dir.path().display()), 2)
        .await
        .unwrap();
    assert!(db.insert_item("i1", "books", "first").await.unwrap());
    assert!(
        !db.insert_item("i1", "books", "first").await.unwrap(),
        "recorded once"
    );
    assert!(db.insert_item("i2", "books", "second").await.unwrap());
    assert!(db.insert_item("i3", "other", "first").await.unwrap());
    let mut names: Vec<String> = db.item_names("books").await.unwrap().into_iter().collect();
    names.sort();
    assert_eq!(names, ["first", "second"]);

    // Results twice: upserted, one row per output; the item is done once its stage is.
    for _ in 0..2 {
        db.record_results(
            Entity::Item("i1"),
            &[result("i1", "a.txt"), result("i1", "b.txt")],
        )
        .await
        .unwrap();
    }
    let rows = db.results("i1").await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0], result("i1", "a.txt"));
    assert_eq!(
        db.item("i1").await.unwrap().unwrap().status,
        MediaStatus::Queued
    );
    db.set_stage_state(Entity::Item("i1"), "s", "e1", StageState::Done, None)
        .await
        .unwrap();
    assert_eq!(
        db.item("i1").await.unwrap().unwrap().status,
        MediaStatus::Done
    );

    db.set_stage_state(
        Entity::Item("i2"),
        "s",
        "e2",
        StageState::Failed,
        Some("exit 1"),
    )
    .await
    .unwrap();
    let failed = db.item("i2").await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.error.as_deref()),
        (MediaStatus::Failed, Some("s: exit 1"))
    );
    assert!(db.item("nope").await.unwrap().is_none());

    // Media results live beside them and mark the media, not an item, done.
    db.insert_media(&media("m1"), "up", &[]).await.unwrap();
    db.record_results(Entity::Media("m1"), &[result("m1", "a.txt")])
        .await
        .unwrap();
    db.set_stage_state(Entity::Media("m1"), "s", "up", StageState::Done, None)
        .await
        .unwrap();
    assert_eq!(
        db.media("m1").await.unwrap().unwrap().status,
        MediaStatus::Done
    );
    assert_eq!(db.results("m1").await.unwrap().len(), 1);
    assert_eq!(db.result_count("s").await.unwrap(), 3);
}

#[tokio::test]
async fn results_recorded_before_work_items_existed_survive_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/old.db?mode=rwc", dir.path().display());
    {
        // The schema as it was before work items: the first three migrations.
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let mut old = sqlx::migrate!("./migrations");
        old.migrations = old.migrations[..3].to_vec().into();
        old.run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO media (id, kind, content_type, bucket, object_key, size_bytes, sha256, \
             status, created_at_ms, updated_at_ms) \
             VALUES ('m1', 'image', 'image/png', 'b', 'k', 1, 'x', 'done', 1, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO results (media_id, stage, stage_version, name, bucket, object_key, \
             content_type, size_bytes, sha256, width, height, created_at_ms) \
             VALUES ('m1', 'image-worker', '1', 'thumb-256', 'b', 'd', 'image/jpeg', 5, 'y', \
             256, 170, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let db = Db::connect(&format!("sqlite://{}/old.db", dir.path().display()), 1)
        .await
        .unwrap();
    let rows = db.results("m1").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].entity_id.as_str(),
            rows[0].name.as_str(),
            rows[0].width
        ),
        ("m1", "thumb-256", Some(256))
    );
}

#[tokio::test]
async fn a_media_item_is_done_only_when_every_stage_it_was_queued_for_is() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}/t.db", dir.path().display()), 2)
        .await
        .unwrap();
    db.insert_media(&media("m1"), "up", &[]).await.unwrap();
    let m1 = Entity::Media("m1");
    let status = || async { db.media("m1").await.unwrap().unwrap() };
    db.queue_stages(m1, "up", &["router".to_owned()])
        .await
        .unwrap();
    db.set_stage_state(m1, "router", "up", StageState::Running, None)
        .await
        .unwrap();
    // Two stages read the router's output: both are queued before it is done.
    db.queue_stages(m1, "routed", &["thumbs".to_owned(), "exif".to_owned()])
        .await
        .unwrap();
    db.set_stage_state(m1, "router", "up", StageState::Done, None)
        .await
        .unwrap();
    assert_eq!(status().await.status, MediaStatus::Queued);
    db.set_stage_state(m1, "thumbs", "routed", StageState::Done, None)
        .await
        .unwrap();
    assert_eq!(
        status().await.status,
        MediaStatus::Queued,
        "exif is still queued"
    );
    // Queuing again (another event for it: a redelivery, a join's next branch) puts a finished
    // stage back in the queue until it has taken that event too.
    db.queue_stages(m1, "again", &["thumbs".to_owned()])
        .await
        .unwrap();
    assert_eq!(status().await.status, MediaStatus::Queued);
    db.set_stage_state(m1, "thumbs", "again", StageState::Done, None)
        .await
        .unwrap();
    db.set_stage_state(
        m1,
        "exif",
        "routed",
        StageState::Failed,
        Some("bad_input error: no EXIF"),
    )
    .await
    .unwrap();
    let failed = status().await;
    assert_eq!(
        (failed.status, failed.error.as_deref()),
        (MediaStatus::Failed, Some("exif: bad_input error: no EXIF"))
    );
    let states: Vec<(String, StageState)> = db
        .stage_states("m1")
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.stage, s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("exif".to_owned(), StageState::Failed),
            ("router".to_owned(), StageState::Done),
            ("thumbs".to_owned(), StageState::Done),
        ]
    );
    // Replayed and done: the media is done, its error gone.
    db.set_stage_state(m1, "exif", "routed", StageState::Done, None)
        .await
        .unwrap();
    let done = status().await;
    assert_eq!((done.status, done.error), (MediaStatus::Done, None));
}

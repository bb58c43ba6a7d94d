//! Status that fan-out cannot break: two stages read the image queue; a media item is done only
//! when both are, failed (naming the stage and its reason) when one gives up, and
//! `GET /v1/media/{id}` shows each stage's own state.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mediaflow_db::{MediaStatus, StageState};
use mediaflow_gateway::MediaView;
use support::{Backend, TestPlatform, fixtures};

/// The shipped upload pipeline plus an `exif` exec stage on the image queue that waits for a
/// gate file before it answers, and refuses PNGs.
fn pipeline(gate: &std::path::Path) -> String {
    format!(
        r#"
topics:
  - {{name: media.uploaded, produced_by: gateway}}
  - {{name: jobs.image}}
  - {{name: jobs.video}}
  - {{name: images.processed}}
  - {{name: videos.processed}}
  - {{name: exif.done}}
stages:
  - name: router
    kind: splitter
    inputs: [media.uploaded]
    outputs: {{image: jobs.image, video: jobs.video}}
    config:
      routes: {{image: 'data.kind == "image"', video: 'data.kind == "video"'}}
  - {{name: image-worker, kind: image, version: 2, inputs: [jobs.image], outputs: {{out: images.processed}}}}
  - {{name: video-worker, kind: video, inputs: [jobs.video], outputs: {{out: videos.processed}}}}
  - name: exif
    kind: exec
    inputs: [jobs.image]
    outputs: {{out: exif.done}}
    config:
      command:
        - sh
        - -c
        - |
          while [ ! -e '{gate}' ]; do sleep 0.05; done
          case "$INPUT_FILE" in *.png) echo "exif takes no PNGs" >&2; exit 65;; esac
          echo ok > "$OUTPUT_DIR/exif.txt"
"#,
        gate = gate.display()
    )
}

async fn view(tp: &TestPlatform, id: &str) -> Result<MediaView> {
    Ok(reqwest::get(format!("{}/v1/media/{id}", tp.base))
        .await?
        .error_for_status()?
        .json()
        .await?)
}

fn state(v: &MediaView, stage: &str) -> Option<StageState> {
    v.stages.iter().find(|s| s.stage == stage).map(|s| s.state)
}

/// Polls the media's view until `done` holds for it.
async fn until(
    tp: &TestPlatform,
    id: &str,
    what: &str,
    done: impl Fn(&MediaView) -> bool,
) -> Result<MediaView> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = view(tp, id).await?;
        if done(&v) {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{what}: never; last {v:?}");
        // Polling the API, as a client would.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn upload(tp: &TestPlatform, name: &str) -> Result<String> {
    let bytes = std::fs::read(fixtures().join(name))?;
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()),
    );
    let body: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/media", tp.base))
        .multipart(form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["id"].as_str().context("id")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_media_item_is_done_when_every_stage_reading_its_queue_is() -> Result<()> {
    let files = tempfile::tempdir()?;
    let gate = files.path().join("gate");
    let path = files.path().join("pipeline.yaml");
    std::fs::write(&path, pipeline(&gate))?;
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| c.pipeline = Some(path.into())).await?;

    let jpeg = upload(&tp, "rocket.jpg").await?;
    let png = upload(&tp, "chelsea.png").await?;
    // The image stage finishes while exif waits at its gate: not done, whatever finished last.
    for id in [&jpeg, &png] {
        let v = until(&tp, id, "image-worker done", |v| {
            state(v, "image-worker") == Some(StageState::Done)
                && state(v, "exif") == Some(StageState::Running)
        })
        .await?;
        ensure!(v.status == MediaStatus::Queued, "{v:?}");
        ensure!(state(&v, "router") == Some(StageState::Done), "{v:?}");
        ensure!(
            state(&v, "video-worker").is_none(),
            "an image is not queued for video"
        );
        ensure!(
            !v.results.is_empty(),
            "the image stage's results are already shown"
        );
    }

    std::fs::write(&gate, b"open")?;
    let done = until(&tp, &jpeg, "jpeg done", |v| v.status != MediaStatus::Queued).await?;
    ensure!(done.status == MediaStatus::Done, "{done:?}");
    ensure!(done.error.is_none());
    ensure!(
        done.stages.iter().all(|s| s.state == StageState::Done),
        "{done:?}"
    );
    ensure!(done.results.iter().any(|r| r.stage == "exif"), "{done:?}");

    let failed = until(&tp, &png, "png final", |v| v.status != MediaStatus::Queued).await?;
    ensure!(failed.status == MediaStatus::Failed, "{failed:?}");
    let error = failed.error.as_deref().unwrap_or_default();
    ensure!(
        error.starts_with("exif: ") && error.contains("exif takes no PNGs"),
        "{error}"
    );
    ensure!(state(&failed, "image-worker") == Some(StageState::Done));
    let exif = failed
        .stages
        .iter()
        .find(|s| s.stage == "exif")
        .context("exif")?;
    ensure!(
        exif.state == StageState::Failed && exif.error.is_some(),
        "{exif:?}"
    );
    tp.stop().await
}

/// A queued image's row, as the gateway records it.
fn media_row(id: &str) -> mediaflow_db::MediaRow {
    mediaflow_db::MediaRow {
        id: id.to_owned(),
        kind: "image".into(),
        content_type: "image/png".into(),
        filename: None,
        bucket: "b".into(),
        object_key: format!("uploads/{id}"),
        size_bytes: 1,
        sha256: "0".repeat(64),
        status: MediaStatus::Queued,
        error: None,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

/// Two stages finishing the same media item at the same moment, on PostgreSQL (where each
/// transaction reads its own snapshot): the item ends `done`, every time.
#[tokio::test(flavor = "multi_thread")]
async fn stages_finishing_at_once_leave_the_item_done() -> Result<()> {
    let db = mediaflow_db::Db::connect(&support::scratch_postgres().await?, 8).await?;
    let stages = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
    for n in 0..40 {
        let id = format!("media-{n}");
        let row = media_row(&id);
        db.insert_media(&row, "uploaded", &stages).await?;
        let done = |stage: &'static str| {
            let (db, id) = (db.clone(), id.clone());
            tokio::spawn(async move {
                db.set_stage_state(
                    mediaflow_db::Entity::Media(&id),
                    stage,
                    "uploaded",
                    StageState::Done,
                    None,
                )
                .await
            })
        };
        let (a, b, c) = tokio::join!(done("a"), done("b"), done("c"));
        a??;
        b??;
        c??;
        let status = db.media(&id).await?.context("the row")?.status;
        ensure!(
            status == MediaStatus::Done,
            "{id}: {status:?} with every stage done"
        );
    }
    Ok(())
}

/// A scratch SQLite database with media `m` uploaded (event `first`) and queued for one stage,
/// `join` (the stages' list, for queueing more).
async fn one_media_for_a_join() -> Result<(tempfile::TempDir, mediaflow_db::Db, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let db = mediaflow_db::Db::connect(&url, 4).await?;
    let join = vec!["join".to_owned()];
    db.insert_media(&media_row("m"), "first", &join).await?;
    Ok((dir, db, join))
}

/// A stage done with an item (a join that took its first branch) is queued again when another
/// event about the item is published for it: the item is not done until the stage took that
/// too.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_done_with_an_item_is_queued_again_by_its_next_event() -> Result<()> {
    let (_dir, db, join) = one_media_for_a_join().await?;
    let media = mediaflow_db::Entity::Media("m");
    let status = || async { anyhow::Ok(db.media("m").await?.context("row")?.status) };
    db.set_stage_state(media, "join", "first", StageState::Done, None)
        .await?;
    ensure!(status().await? == MediaStatus::Done);
    db.queue_stages(media, "second", &join).await?;
    ensure!(status().await? == MediaStatus::Queued);
    db.set_stage_state(media, "join", "second", StageState::Failed, Some("no"))
        .await?;
    db.queue_stages(media, "third", &join).await?;
    ensure!(
        status().await? == MediaStatus::Failed,
        "a failed stage stays failed"
    );
    Ok(())
}

/// A stage still running on an item's first event when the next one is published for it (a
/// join taking its first branch while the second arrives) is not done with the item when it
/// finishes the first: it is queued until it has finished the second. A redelivered event
/// changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_running_when_the_next_event_is_queued_is_not_done_with_the_item() -> Result<()> {
    let (_dir, db, join) = one_media_for_a_join().await?;
    let media = mediaflow_db::Entity::Media("m");
    let status = || async { anyhow::Ok(db.media("m").await?.context("row")?.status) };
    let join_state = || async {
        let states = db.stage_states("m").await?;
        anyhow::Ok(states.iter().find(|s| s.stage == "join").map(|s| s.state))
    };
    db.set_stage_state(media, "join", "first", StageState::Running, None)
        .await?;
    db.queue_stages(media, "second", &join).await?;
    db.set_stage_state(media, "join", "first", StageState::Done, None)
        .await?;
    ensure!(join_state().await? == Some(StageState::Queued));
    ensure!(
        status().await? == MediaStatus::Queued,
        "the second is on its way"
    );
    // The first again (a redelivery), then republished: the second still waits.
    db.set_stage_state(media, "join", "first", StageState::Done, None)
        .await?;
    db.queue_stages(media, "second", &join).await?;
    ensure!(status().await? == MediaStatus::Queued);
    db.set_stage_state(media, "join", "second", StageState::Running, None)
        .await?;
    db.set_stage_state(media, "join", "second", StageState::Done, None)
        .await?;
    ensure!(join_state().await? == Some(StageState::Done));
    ensure!(status().await? == MediaStatus::Done);
    Ok(())
}

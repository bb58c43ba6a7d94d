//! SIGTERM during a long job: a stage process either finishes the job within its drain deadline
//! and commits it (exit 0), or hands it back uncommitted (exit 3) for the next instance. Either
//! way the job is neither lost nor done twice. The same holds when a rebalance takes the job's
//! partition away: the job finishes and is committed before the partition moves.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mediaflow_events::MediaProcessed;
use support::{Backend, TestPlatform, fixtures, mediaflow_bin};

const SCRIPT: &str = r#"#!/bin/sh
set -eu
echo "$MEDIA_ID" >> "$MARKER_DIR/runs.log"
touch "$MARKER_DIR/started-$MEDIA_ID"
sleep "$JOB_SECONDS"
echo finished > "$OUTPUT_DIR/done.txt"
"#;

/// A `mediaflow run slow` process: an exec stage whose jobs take `job_seconds`.
fn spawn_stage(
    tp: &TestPlatform,
    dir: &Path,
    job_seconds: u32,
    drain_secs: u64,
) -> Result<tokio::process::Child> {
    let c = &tp.config;
    let script = dir.join("slow.sh");
    std::fs::write(&script, SCRIPT)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let config = dir.join("slow.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[embedded]
kafka = false
s3 = false
[bus]
brokers = "{brokers}"
topic_prefix = "{prefix}"
[store]
endpoint = "{s3}"
bucket = "{bucket}"
[database]
url = "{db}"
[admin]
listen = "127.0.0.1:0"
[stages]
drain_deadline_secs = {drain_secs}
[[exec]]
name = "slow"
command = ["{script}"]
input_topic = "jobs.image"
"#,
            data = dir.display(),
            brokers = c.bus.brokers,
            prefix = c.bus.topic_prefix,
            s3 = c.store.endpoint,
            bucket = c.store.bucket,
            db = c.database_url(),
            script = script.display(),
        ),
    )?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stage.log"))?;
    tokio::process::Command::new(mediaflow_bin())
        .args(["run", "slow", "--config"])
        .arg(&config)
        .env("MARKER_DIR", dir)
        .env("JOB_SECONDS", job_seconds.to_string())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the stage process")
}

async fn wait_for_file(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} never appeared", path.display());
        }
        // Polling for the job's start marker.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn sigterm(child: &mut tokio::process::Child) -> Result<i32> {
    let pid = child.id().context("stage process already gone")?;
    let ok = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(ok.success(), "kill -TERM failed");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    status
        .code()
        .context("the stage process died of a signal instead of draining")
}

/// Result events for `media_id` on `media.processed`.
async fn results_for(tp: &TestPlatform, media_id: &str) -> Result<usize> {
    let mut n = 0;
    for event in tp.events("media.processed").await? {
        if mediaflow_events::decode::<MediaProcessed>(&event)?.media_id == media_id {
            n += 1;
        }
    }
    Ok(n)
}

async fn upload(tp: &TestPlatform) -> Result<String> {
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/media", tp.base))
        .body(png)
        .send()
        .await?;
    let accepted: mediaflow_gateway::Accepted = r.json().await?;
    Ok(accepted.id)
}

fn production_without_stages(c: &mut mediaflow::MediaflowConfig) {
    // The gateway and router run here; the slow stage only in its own process.
    c.stages.enabled = Some(vec!["router".into()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_a_long_job_finish_within_the_deadline() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Postgres, production_without_stages).await?;
    let dir = tempfile::tempdir()?;
    let mut stage = spawn_stage(&tp, dir.path(), 2, 30)?;
    let id = upload(&tp).await?;
    wait_for_file(&dir.path().join(format!("started-{id}"))).await?;

    assert_eq!(sigterm(&mut stage).await?, 0, "drained: exit 0");
    assert_eq!(
        results_for(&tp, &id).await?,
        1,
        "the job finished before the process left"
    );
    tp.wait_caught_up("slow", "jobs.image").await?;

    // A new instance finds nothing left to do: the job is not done twice.
    let mut next = spawn_stage(&tp, dir.path(), 0, 30)?;
    let second = upload(&tp).await?;
    wait_for_file(&dir.path().join(format!("started-{second}"))).await?;
    tp.wait_caught_up("slow", "jobs.image").await?;
    assert_eq!(results_for(&tp, &id).await?, 1);
    assert_eq!(results_for(&tp, &second).await?, 1);
    assert_eq!(sigterm(&mut next).await?, 0);
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_back_a_job_that_outlasts_the_deadline() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Postgres, production_without_stages).await?;
    let dir = tempfile::tempdir()?;
    let mut stage = spawn_stage(&tp, dir.path(), 30, 1)?;
    let id = upload(&tp).await?;
    wait_for_file(&dir.path().join(format!("started-{id}"))).await?;

    assert_eq!(sigterm(&mut stage).await?, 3, "handed back: exit 3");
    assert_eq!(results_for(&tp, &id).await?, 0, "the job did not finish");

    // The next instance gets the job again and completes it, once.
    std::fs::remove_file(dir.path().join(format!("started-{id}")))?;
    let mut next = spawn_stage(&tp, dir.path(), 0, 30)?;
    wait_for_file(&dir.path().join(format!("started-{id}"))).await?;
    tp.wait_caught_up("slow", "jobs.image").await?;
    assert_eq!(results_for(&tp, &id).await?, 1);
    assert_eq!(sigterm(&mut next).await?, 0);
    tp.stop().await
}

/// How many times the slow stage started the job of `media_id`.
fn runs_of(dir: &Path, media_id: &str) -> Result<usize> {
    let log = std::fs::read_to_string(dir.join("runs.log"))?;
    Ok(log.lines().filter(|l| *l == media_id).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_lets_the_running_job_finish_instead_of_redoing_it() -> Result<()> {
    let tp = TestPlatform::start_with(Backend::Postgres, production_without_stages).await?;
    let dir = tempfile::tempdir()?;
    let mut first = spawn_stage(&tp, dir.path(), 8, 30)?;
    let id = upload(&tp).await?;
    wait_for_file(&dir.path().join(format!("started-{id}"))).await?;

    // A second instance joins mid-job: the group rebalances and the first instance's partitions
    // are revoked while the job runs.
    let mut second = spawn_stage(&tp, dir.path(), 8, 30)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while results_for(&tp, &id).await? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the job never finished");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tp.wait_caught_up("slow", "jobs.image").await?;
    // Both instances are in the group and idle: another item is taken by one of them, once.
    let next = upload(&tp).await?;
    wait_for_file(&dir.path().join(format!("started-{next}"))).await?;
    while results_for(&tp, &next).await? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the second job never finished");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tp.wait_caught_up("slow", "jobs.image").await?;
    let log = std::fs::read_to_string(dir.path().join("stage.log"))?;
    println!(
        "rebalance mid-job: runs of the job {}, result events {}",
        runs_of(dir.path(), &id)?,
        results_for(&tp, &id).await?
    );
    assert!(
        log.contains("partitions revoked; letting their messages finish"),
        "the rebalance did not happen while the job ran:\n{log}"
    );
    assert_eq!(runs_of(dir.path(), &id)?, 1, "the job was redone:\n{log}");
    assert_eq!(results_for(&tp, &id).await?, 1);
    assert_eq!(runs_of(dir.path(), &next)?, 1);
    assert_eq!(sigterm(&mut second).await?, 0);
    assert_eq!(sigterm(&mut first).await?, 0);
    tp.stop().await
}

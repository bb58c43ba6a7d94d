//! The stage watchdog against a wedge made on purpose: another member of the router's consumer
//! group (kafka-python, leading the group) keeps every partition from it. The router must be
//! found wedged (readiness names it, the stall metric rises), keep rejoining its group, and heal
//! by its own rejoin once the group would hand it partitions again.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use support::{Backend, TestPlatform, fixtures, metric_at as metric, python};

/// Polls `check` every 100 ms until it returns Some, for at most `timeout`.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        // Polling for a condition with a deadline.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_kept_from_its_partitions_is_found_wedged_and_heals_by_rejoining() -> Result<()> {
    // The router runs as its own process, so that the hog can lead its group first.
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| {
        c.stages.enabled = Some(vec!["image-worker".into()]);
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let (flag, ready, stop) = (
        dir.path().join("hog"),
        dir.path().join("hog.ready"),
        dir.path().join("hog.stop"),
    );
    std::fs::write(&flag, "")?;
    let prefix = &tp.config.bus.topic_prefix;
    let mut hog = tokio::process::Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hog.py"))
        .arg(&tp.platform.endpoints.kafka)
        .arg(format!("{prefix}media.uploaded"))
        .arg(format!("{prefix}router"))
        .args([&flag, &ready, &stop])
        .stdout(std::fs::File::create(dir.path().join("hog.log"))?)
        .stderr(std::fs::File::create(dir.path().join("hog.err"))?)
        .kill_on_drop(true)
        .spawn()
        .context("starting the hog")?;
    until(
        "the hog holds the partitions",
        Duration::from_secs(60),
        || async { Ok(ready.is_file().then_some(())) },
    )
    .await?;

    let admin_port = mediaflow_embedded::free_port()?;
    let admin = format!("http://127.0.0.1:{admin_port}");
    let mut router = tp.spawn_stage(
        "router",
        "router",
        dir.path(),
        &[
            (
                "MEDIAFLOW__ADMIN__LISTEN",
                &format!("127.0.0.1:{admin_port}"),
            ),
            ("MEDIAFLOW__STAGES__STALL_TIMEOUT_SECS", "2"),
        ],
    )?;

    // Work for the router, which it cannot see.
    let http = reqwest::Client::new();
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = http
            .post(format!("{}/v1/media", tp.base))
            .body(png.clone())
            .send()
            .await?;
        ensure!(r.status() == 202, "upload refused: {}", r.status());
        let body: serde_json::Value = r.json().await?;
        ids.push(body["id"].as_str().context("no id")?.to_owned());
    }

    let started = Instant::now();
    let reason = until(
        "readiness fails naming the router",
        Duration::from_secs(60),
        || async {
            let Ok(r) = http.get(format!("{admin}/readyz")).send().await else {
                return Ok(None); // still starting
            };
            if r.status() != 503 {
                return Ok(None);
            }
            let body: serde_json::Value = r.json().await?;
            Ok(body["wedged_stages"]["router"].as_str().map(str::to_owned))
        },
    )
    .await?;
    eprintln!("wedged after {:.1?}: {reason}", started.elapsed());
    ensure!(reason.contains("holds no partitions"), "{reason}");
    ensure!(
        metric(&admin, "mediaflow_stage_stalls_total{stage=\"router\"}").await? >= 1.0,
        "the stall metric did not rise"
    );
    ensure!(metric(&admin, "mediaflow_stage_wedged{stage=\"router\"}").await? == 1.0);
    // It keeps trying: each rejoin still finds the partitions kept from it.
    let stalls = metric(&admin, "mediaflow_stage_stalls_total{stage=\"router\"}").await?;
    until("another rejoin", Duration::from_secs(30), || async {
        Ok(
            (metric(&admin, "mediaflow_stage_stalls_total{stage=\"router\"}").await? > stalls)
                .then_some(()),
        )
    })
    .await?;
    for id in &ids {
        let media = reqwest::get(format!("{}/v1/media/{id}", tp.base))
            .await?
            .json::<serde_json::Value>()
            .await?;
        ensure!(
            media["status"] == "queued",
            "{id} moved while the router held nothing"
        );
    }

    // The group would hand the partitions over at its next rebalance; only the router's own
    // rejoin makes one.
    std::fs::remove_file(&flag)?;
    let healed = Instant::now();
    tp.wait_final(
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(60),
    )
    .await?;
    until("readiness recovers", Duration::from_secs(30), || async {
        let r = http.get(format!("{admin}/readyz")).send().await?;
        Ok(r.status().is_success().then_some(()))
    })
    .await?;
    ensure!(metric(&admin, "mediaflow_stage_wedged{stage=\"router\"}").await? == 0.0);
    eprintln!("healed {:.1?} after the hog let go", healed.elapsed());

    std::fs::write(&stop, "")?;
    tokio::time::timeout(Duration::from_secs(30), hog.wait()).await??;
    router.start_kill()?;
    router.wait().await?;
    tp.stop().await
}

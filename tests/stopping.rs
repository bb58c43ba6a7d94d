//! Stopping and crashing as users do. `mediaflow up` runs as in a terminal, in a process group of
//! its own (the terminal's foreground group): Ctrl-C goes to the whole group and must drain,
//! commit and leave nothing behind; SIGKILL of the whole group again and again, with uploads
//! going on, must lose nothing, do nothing twice, and resume quickly after each restart.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cloudevents::AttributesReader;
use mediaflow_bus::{Bus, BusConfig};
use mediaflow_events::{EventData, ImageProcessed};
use support::{Rng, fixtures, mediaflow_bin, metric_at};

/// `mediaflow up` on a data folder, in a process group of its own (its pid is the group id),
/// as a shell runs a foreground job.
struct Up {
    child: tokio::process::Child,
    data: PathBuf,
}

impl Up {
    fn spawn(data: &Path, prefix: &str, log: &Path) -> Result<Self> {
        // A fresh endpoints file tells when this run is up.
        let _ = std::fs::remove_file(data.join("endpoints.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = tokio::process::Command::new(mediaflow_bin())
            .arg("up")
            .env("MEDIAFLOW__DATA_DIR", data)
            .env("MEDIAFLOW__EMBEDDED__KAFKA_PORT", "0")
            .env("MEDIAFLOW__EMBEDDED__S3_PORT", "0")
            .env("MEDIAFLOW__EMBEDDED__SMTP_PORT", "0")
            .env("MEDIAFLOW__GATEWAY__LISTEN", "127.0.0.1:0")
            .env("MEDIAFLOW__BUS__TOPIC_PREFIX", prefix)
            .env("MEDIAFLOW__STAGES__INITIAL_BACKOFF_MS", "50")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting mediaflow up")?;
        Ok(Self {
            child,
            data: data.to_owned(),
        })
    }

    fn pgid(&self) -> u32 {
        self.child.id().expect("a running process")
    }

    /// Sends `signal` to the whole process group, as a terminal or `kill -- -PGID` does.
    async fn signal_group(&self, signal: &str) -> Result<()> {
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{}", self.pgid()))
            .status()
            .await?;
        ensure!(status.success(), "kill -{signal} of the group failed");
        Ok(())
    }

    /// Waits until this run has written its endpoints and its gateway is ready; the gateway's
    /// base URL.
    async fn ready(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let http = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("mediaflow up exited during start-up: {status}");
            }
            let endpoints: Option<mediaflow::Endpoints> =
                std::fs::read(self.data.join("endpoints.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(e) = endpoints {
                let ready = http
                    .get(format!("{}/readyz", e.gateway))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    return Ok(e.gateway);
                }
            }
            ensure!(Instant::now() < deadline, "not ready within {timeout:?}");
            // Polling for start-up.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    async fn exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("mediaflow up still running {timeout:?} after the signal"))?
            .map_err(Into::into)
    }
}

/// Processes whose process group is `pgid`, from `/proc`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // Fields after the command name (which may hold spaces): state, ppid, pgrp.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// The embedded broker's pid, from its pid file.
fn broker_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("kafka/broker.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The parent of process `pid`, from `/proc`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Uploads `file` and returns the media id, or None when the upload was not accepted (the
/// platform going down under it).
async fn upload(http: &reqwest::Client, base: &str, bytes: Vec<u8>) -> Option<String> {
    let r = http
        .post(format!("{base}/v1/media"))
        .body(bytes)
        .send()
        .await
        .ok()?;
    if r.status() != 202 {
        return None;
    }
    let body: serde_json::Value = r.json().await.ok()?;
    body["id"].as_str().map(str::to_owned)
}

async fn status(http: &reqwest::Client, base: &str, id: &str) -> Result<String> {
    let body: serde_json::Value = http
        .get(format!("{base}/v1/media/{id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["status"].as_str().unwrap_or_default().to_owned())
}

/// Waits up to 60 s until every media of `ids` is `done`; the error names the first that is not,
/// and `when`.
async fn all_done(http: &reqwest::Client, base: &str, ids: &[String], when: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ids {
        while status(http, base, id).await? != "done" {
            ensure!(Instant::now() < deadline, "{id} not done {when}");
            // Polling the API for the result.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A unique topic prefix, so that groups and topics are this test's own.
fn prefix() -> String {
    format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_to_the_whole_group_drains_commits_and_leaves_nothing_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, log, prefix) = (dir.path().join("data"), dir.path().join("up.log"), prefix());
    let mut up = Up::spawn(&data, &prefix, &log)?;
    let base = up.ready(Duration::from_secs(60)).await?;
    let http = reqwest::Client::new();
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            upload(&http, &base, png.clone())
                .await
                .context("upload refused")?,
        );
    }
    all_done(&http, &base, &ids, "before Ctrl-C").await?;
    // Some more, not waited for: Ctrl-C may come while they are being processed.
    for _ in 0..3 {
        ids.push(
            upload(&http, &base, png.clone())
                .await
                .context("upload refused")?,
        );
    }
    let broker = broker_pid(&data).context("no broker pid file")?;
    let pgid = up.pgid();

    let log_before = std::fs::metadata(&log)?.len() as usize;
    let sent = Instant::now();
    up.signal_group("INT").await?;
    let exit = up.exit(Duration::from_secs(15)).await?;
    let took = sent.elapsed();
    eprintln!("ctrl-c: exit {exit} after {took:.1?}");
    ensure!(
        exit.success(),
        "exit after Ctrl-C: {exit}; log {}",
        log.display()
    );
    ensure!(
        took < Duration::from_secs(10),
        "took {took:?} to stop after Ctrl-C"
    );
    ensure!(
        group_members(pgid).is_empty(),
        "processes left in the group: {:?}",
        group_members(pgid)
    );
    ensure!(
        !Path::new(&format!("/proc/{broker}")).exists(),
        "the broker (pid {broker}) is still there, running or a zombie"
    );
    let text = std::fs::read_to_string(&log)?;
    let stopping = text.get(log_before..).unwrap_or_default();
    let noise = stopping
        .lines()
        .filter(|l| l.contains("librdkafka"))
        .count();
    eprintln!("while stopping:\n{stopping}");
    ensure!(noise <= 1, "{noise} librdkafka lines while stopping");

    // Everything taken was committed: after a restart on the same data, every media is
    // routed once and processed once, with no output made a second time.
    let mut up = Up::spawn(&data, &prefix, &log)?;
    let base = up.ready(Duration::from_secs(60)).await?;
    all_done(&http, &base, &ids, "after the restart").await?;
    let endpoints: mediaflow::Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json"))?)?;
    let bus = Bus::new(BusConfig {
        brokers: endpoints.kafka,
        ..BusConfig::default()
    });
    let routed = bus.message_count(&format!("{prefix}jobs.image")).await?;
    let processed = bus
        .message_count(&format!("{prefix}images.processed"))
        .await?;
    eprintln!(
        "after the restart: {} uploads, {routed} routed, {processed} results",
        ids.len()
    );
    ensure!(routed == ids.len() as i64, "routed {routed} times");
    ensure!(
        processed == ids.len() as i64,
        "{processed} results: something was processed again"
    );
    up.signal_group("INT").await?;
    ensure!(up.exit(Duration::from_secs(15)).await?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_stops_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, log) = (dir.path().join("data"), dir.path().join("up.log"));
    let mut up = Up::spawn(&data, &prefix(), &log)?;
    let base = up.ready(Duration::from_secs(60)).await?;
    let broker = broker_pid(&data).context("no broker pid file")?;
    // A long job in hand, so that the drain the first Ctrl-C starts would wait for it.
    let video = std::fs::read(fixtures().join("video/synthetic-1080p-60s.mp4"))?;
    upload(&reqwest::Client::new(), &base, video)
        .await
        .context("video upload refused")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_at(&base, "mediaflow_stage_in_flight{stage=\"video-worker\"}").await? < 1.0 {
        ensure!(Instant::now() < deadline, "the video job never started");
        // Polling the metrics for the job to start.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    up.signal_group("INT").await?;
    // Two signals delivered before the first is handled count as one: the second Ctrl-C is sent
    // once the first has started the drain, as a person pressing it again would.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)?.contains("signal received: draining") {
        ensure!(Instant::now() < deadline, "the first Ctrl-C was not seen");
        // Polling the log for the first signal's line.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = Instant::now();
    up.signal_group("INT").await?;
    let exit = up.exit(Duration::from_secs(5)).await?;
    ensure!(exit.code() == Some(130), "exit after two Ctrl-C: {exit}");
    eprintln!("second Ctrl-C: exit 130 after {:.1?}", second.elapsed());
    // The broker is told to die with its parent.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{broker}")).exists() {
        ensure!(Instant::now() < deadline, "the broker outlived mediaflow");
        // Polling for the exit of a process that is not ours.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// When a round's platform is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after the process started, ready or not.
    DuringStartUp(Duration),
    /// As soon as this run's broker process exists: the platform is still starting.
    OnceTheBrokerRuns,
    /// This long after it is ready, while uploads go on.
    WhileServing(Duration),
}

const ROUNDS: usize = 9;
/// Uploads at most per round, one after another until the kill.
const UPLOADS_PER_ROUND: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_platform_killed_again_and_again_loses_nothing_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, log, prefix) = (dir.path().join("data"), dir.path().join("up.log"), prefix());
    let mut rng = Rng::seeded("crash loop");
    let png = std::fs::read(fixtures().join("chessboard_RGB.png"))?;
    let http = reqwest::Client::new();
    let mut accepted: Vec<String> = Vec::new();
    // (round, when, whether start-up had finished, how long it ran, time since the last kill)
    let mut kills = Vec::new();
    let mut last_kill: Option<Instant> = None;

    for round in 0..ROUNDS {
        let kill = match round {
            // During start-up: before anything is ready, and while the broker comes up.
            0 => Kill::DuringStartUp(Duration::from_millis(rng.below(50))),
            5 => Kill::OnceTheBrokerRuns,
            // Twice within two seconds: round 4 is killed soon after round 3 was.
            4 => Kill::WhileServing(Duration::from_millis(rng.below(300))),
            _ => Kill::WhileServing(Duration::from_millis(200 + rng.below(2500))),
        };
        let mut up = Up::spawn(&data, &prefix, &log)?;
        let started = Instant::now();
        match kill {
            Kill::DuringStartUp(after) => tokio::time::sleep(after).await,
            Kill::OnceTheBrokerRuns => {
                let pid = up.pgid();
                let deadline = Instant::now() + Duration::from_secs(30);
                while broker_pid(&data).is_none_or(|b| parent_of(b) != Some(pid)) {
                    ensure!(Instant::now() < deadline, "this run's broker never started");
                    // Polling for the broker process of this run.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Kill::WhileServing(after) => {
                let base = up.ready(Duration::from_secs(60)).await?;
                // Uploads go on until the kill.
                let uploads = {
                    let (http, base, png) = (http.clone(), base.clone(), png.clone());
                    tokio::spawn(async move {
                        let mut ids = Vec::new();
                        while ids.len() < UPLOADS_PER_ROUND {
                            match upload(&http, &base, png.clone()).await {
                                Some(id) => ids.push(id),
                                None => break,
                            }
                        }
                        ids
                    })
                };
                tokio::time::sleep(after).await;
                up.signal_group("KILL").await?;
                accepted.extend(uploads.await?);
            }
        }
        let mut started_up = true;
        if !matches!(kill, Kill::WhileServing(_)) {
            started_up = data.join("endpoints.json").is_file();
            up.signal_group("KILL").await?;
        }
        up.child.wait().await?;
        let now = Instant::now();
        kills.push((
            round,
            kill,
            started_up,
            started.elapsed(),
            last_kill.map(|k| now - k),
        ));
        last_kill = Some(now);
    }
    let kill_gaps: Vec<Duration> = kills.iter().filter_map(|k| k.4).collect();
    ensure!(
        kill_gaps.iter().any(|g| *g < Duration::from_secs(2)),
        "no two kills within two seconds: {kills:?}"
    );
    ensure!(
        kills.iter().any(|k| !k.2),
        "no kill came before start-up finished: {kills:?}"
    );

    // What was left unfinished at the last kill, read from the database while nothing runs.
    let mut config = mediaflow::MediaflowConfig::with_defaults();
    config.data_dir = data.clone();
    let pending: Vec<String> = {
        let db = mediaflow_db::Db::connect(&config.database_url(), 1).await?;
        let mut pending = Vec::new();
        for id in &accepted {
            let media = db.media(id).await?.context("accepted media not recorded")?;
            if media.status != mediaflow_db::MediaStatus::Done {
                pending.push(id.clone());
            }
        }
        pending
    };

    // The last restart: it must take the backlog up at once.
    let mut up = Up::spawn(&data, &prefix, &log)?;
    let spawned = Instant::now();
    let base = up.ready(Duration::from_secs(60)).await?;
    let ready = Instant::now();
    let mut fresh = Vec::new();
    for _ in 0..3 {
        fresh.push(
            upload(&http, &base, png.clone())
                .await
                .context("upload refused after the last restart")?,
        );
    }
    accepted.extend(fresh.iter().cloned());
    let watch: Vec<String> = if pending.is_empty() {
        fresh.clone()
    } else {
        pending.clone()
    };
    let mut first_done = None;
    let mut done: HashSet<String> = HashSet::new();
    let deadline = ready + Duration::from_secs(180);
    while done.len() < accepted.len() {
        for id in &accepted {
            if done.contains(id) {
                continue;
            }
            match status(&http, &base, id).await?.as_str() {
                "done" => {
                    done.insert(id.clone());
                    if first_done.is_none() && watch.contains(id) {
                        first_done = Some(spawned.elapsed());
                    }
                }
                "queued" => {}
                other => bail!("media {id} ended {other}"),
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {} done 180 s after the last restart; log {}",
            done.len(),
            accepted.len(),
            dir.keep().join("up.log").display()
        );
        // Polling the API for progress.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_done = ready.elapsed();
    let resumed = first_done.context("nothing watched was done")?;

    // Exactly once: one set of result rows and one result event id per media.
    let endpoints: mediaflow::Endpoints =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json"))?)?;
    let bus = Bus::new(BusConfig {
        brokers: endpoints.kafka.clone(),
        ..BusConfig::default()
    });
    let events = bus
        .read_to_end(&format!("{prefix}images.processed"))
        .await?;
    let mut ids = HashSet::new();
    let mut media = HashSet::new();
    for delivery in &events {
        let event = delivery
            .event
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let result: ImageProcessed = mediaflow_events::decode(event)?;
        ensure!(
            event.id() == result.id().as_str(),
            "event ids are deterministic"
        );
        ids.insert(result.id());
        media.insert(result.media_id);
    }
    let db = mediaflow_db::Db::connect(&config.database_url(), 1).await?;
    let rows = db.result_count("image-worker").await?;
    let dead = bus.message_count(&format!("{prefix}dead-letters")).await?;
    eprintln!(
        "crash loop: {} kills ({kills:?}); {} uploads accepted, {} pending at the last restart; \
         ready {:.1?} after the last start; first pending media done {resumed:.1?} after the \
         start, all done {all_done:.1?} after ready; result events {} ({} distinct ids), result rows {rows}, \
         dead letters {dead}",
        kills.len(),
        accepted.len(),
        pending.len(),
        ready - spawned,
        events.len(),
        ids.len(),
    );
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    ensure!(accepted_set.len() == accepted.len(), "media ids are unique");
    // An upload whose 202 was lost in a kill may be processed too: it is counted among the
    // processed media, not among the accepted ones.
    ensure!(
        accepted.iter().all(|id| media.contains(id)),
        "every accepted upload has its result event"
    );
    ensure!(ids.len() == media.len(), "one result event id per media");
    ensure!(
        rows == 2 * media.len() as i64,
        "one set of result rows (thumbnail and tags) per processed media: {rows} for {}",
        media.len()
    );
    ensure!(dead == 0, "{dead} dead letters");
    ensure!(
        resumed < Duration::from_secs(10),
        "processing resumed only {resumed:?} after the last restart"
    );

    up.signal_group("INT").await?;
    let exit = up.exit(Duration::from_secs(30)).await?;
    ensure!(exit.success(), "exit after Ctrl-C: {exit}");
    Ok(())
}

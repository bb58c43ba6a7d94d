//! A release `mediaflow up` run as a user runs it, for the end-to-end benchmarks: started under
//! `taskset` on a data folder of its own, media uploaded through the REST API, CPU time read
//! from `/proc` for it and the broker it starts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use mediaflow_bus::{Bus, BusConfig};

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) `pid` has used so far, with its reaped children's.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let t = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // Fields 14..17 of stat(5) (utime, stime, cutime, cstime), counted from `state` (field 3).
    Some((t(11)? + t(12)? + t(13)? + t(14)?) / TICKS)
}

/// The processes `pid` started (every thread's children).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// A running `mediaflow up` on a data folder of its own.
pub struct Up {
    child: tokio::process::Child,
    pub pid: u32,
    pub broker: Option<u32>,
    pub gateway: String,
    pub bus: Bus,
    pub http: reqwest::Client,
}

impl Up {
    /// Starts `bin up` under `taskset -c cpus` on data folder `dir` (an earlier one set aside),
    /// running `pipeline`, and waits until it is ready.
    pub async fn start(bin: &Path, cpus: &str, dir: &Path, pipeline: &Path) -> Result<Self> {
        set_aside(dir)?;
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let mut child = tokio::process::Command::new("taskset")
            .args(["-c", cpus])
            .arg(bin)
            .arg("up")
            .env("MEDIAFLOW__DATA_DIR", dir)
            .env("MEDIAFLOW__EMBEDDED__KAFKA_PORT", "0")
            .env("MEDIAFLOW__EMBEDDED__S3_PORT", "0")
            .env("MEDIAFLOW__EMBEDDED__SMTP_PORT", "0")
            .env("MEDIAFLOW__PIPELINE", pipeline)
            .env("MEDIAFLOW__GATEWAY__LISTEN", "127.0.0.1:0")
            .env("MEDIAFLOW__GATEWAY__MAX_CONCURRENT_UPLOADS", "64")
            .env_remove("DATABASE_URL")
            .env_remove("MEDIAFLOW_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting mediaflow up under taskset")?;
        let pid = child.id().context("mediaflow up exited at once")?;
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "mediaflow up exited during start-up ({status}); see {}",
                    dir.with_extension("log").display()
                );
            }
            let endpoints: Option<serde_json::Value> = std::fs::read(dir.join("endpoints.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(e) = endpoints {
                let gateway = e["gateway"].as_str().unwrap_or_default().to_owned();
                let kafka = e["kafka"].as_str().unwrap_or_default().to_owned();
                let ready = http
                    .get(format!("{gateway}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    let broker = children(pid).into_iter().find(|c| {
                        std::fs::read_to_string(format!("/proc/{c}/comm"))
                            .is_ok_and(|n| !n.trim().starts_with("mediaflow"))
                    });
                    let bus = Bus::new(BusConfig {
                        brokers: kafka,
                        ..BusConfig::default()
                    });
                    return Ok(Self {
                        child,
                        pid,
                        broker,
                        gateway,
                        bus,
                        http,
                    });
                }
            }
            ensure!(Instant::now() < deadline, "mediaflow up not ready in 120 s");
            // Polling for start-up.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU seconds so far: (mediaflow, broker).
    pub fn cpu(&self) -> (f64, f64) {
        (
            cpu_seconds(self.pid).unwrap_or(0.0),
            self.broker.and_then(cpu_seconds).unwrap_or(0.0),
        )
    }

    /// Uploads `file` as a raw body; the media id.
    pub async fn upload(&self, file: &Path, content_type: &str) -> Result<String> {
        let body = tokio::fs::read(file).await?;
        let response = self
            .http
            .post(format!("{}/v1/media", self.gateway))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let json: serde_json::Value = response.json().await?;
        ensure!(status.as_u16() == 202, "upload answered {status}: {json}");
        Ok(json["id"].as_str().context("no id")?.to_owned())
    }

    /// Uploads every file, `clients` at a time.
    pub async fn upload_all(&self, files: &[PathBuf], clients: usize) -> Result<Vec<String>> {
        let uploads = futures::stream::iter(files.iter().map(|f| async move {
            let ct = if f.extension().is_some_and(|e| e == "png") {
                "image/png"
            } else if f.extension().is_some_and(|e| e == "mp4") {
                "video/mp4"
            } else {
                "image/jpeg"
            };
            self.upload(f, ct).await
        }))
        .buffer_unordered(clients)
        .collect::<Vec<_>>()
        .await;
        uploads.into_iter().collect()
    }

    /// Waits until `topic` holds `n` messages; when it got there.
    pub async fn wait_topic(&self, topic: &str, n: usize, limit: Duration) -> Result<Instant> {
        let start = Instant::now();
        loop {
            let count = usize::try_from(self.bus.message_count(topic).await?)?;
            if count >= n {
                return Ok(Instant::now());
            }
            ensure!(
                start.elapsed() < limit,
                "{topic}: {count} of {n} after {limit:?}"
            );
            ensure!(
                cpu_seconds(self.pid).is_some(),
                "mediaflow exited during the run"
            );
            // Polling the topic's size: one request to the broker per partition, whose work is
            // counted in the broker's CPU, against the platform.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Checks through the API that every media is `done`.
    pub async fn check_done(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let json: serde_json::Value = self
                    .http
                    .get(format!("{}/v1/media/{id}", self.gateway))
                    .send()
                    .await?
                    .json()
                    .await?;
                match json["status"].as_str() {
                    Some("done") => break,
                    Some("failed") => bail!("media {id} failed: {json}"),
                    _ => {}
                }
                ensure!(Instant::now() < deadline, "media {id} not done: {json}");
                // Polling the status API, as a user would.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    pub async fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
            bail!("mediaflow did not stop within 60 s of SIGTERM");
        }
        Ok(())
    }
}

/// Where earlier runs' data folders wait until every measurement is over.
pub const SET_ASIDE: &str = "set-aside";

/// Moves the folder `dir` (an earlier run's data) out of the way without deleting it. Files
/// deleted just before a run make the files the run creates dearer: ext4 without a journal,
/// as on the machines here, skips over inodes freed in the last minutes one by one when it
/// allocates one (`recently_deleted`), and the platform creates several files per media where
/// vipsthumbnail rewrites its outputs in place. They are deleted when every scenario is done.
pub fn set_aside(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let parent = dir.parent().context("a data folder has a parent")?;
    let aside = parent.join(SET_ASIDE);
    std::fs::create_dir_all(&aside)?;
    let name = format!(
        "{}-{}",
        dir.file_name()
            .context("a data folder has a name")?
            .to_string_lossy(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    std::fs::rename(dir, aside.join(name))?;
    Ok(())
}

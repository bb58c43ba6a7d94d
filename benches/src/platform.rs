//! End to end, as a user runs mediaflow: the release `mediaflow up` on embedded defaults (broker,
//! S3, SQLite), pinned to `--cpus`, media uploaded through the REST API until every one is
//! `done`; against the tools a user would pick instead, on the same files and the same CPUs, in
//! the same run.
//!
//! usage: platform --mediaflow BIN --photos DIR --videos DIR --work DIR
//!                 [--images 48] [--clients 4] [--cpus 0] [--backlog 1000] [--backlog-cpus 0,1]
//!                 [--videos-n 3] [--rounds 3] [--perf] [--only images|backlog|video]
//!
//! The image scenarios run `--rounds` times, alternating with their peer; the medians count.
//! Scenarios:
//! - `images`: `--images` camera-like 12 MP JPEGs (made from the real photos, as the thumbnails
//!   bench makes them) uploaded by `--clients` concurrent clients, against one `vipsthumbnail`
//!   invocation over the same files (256 px, quality 85, as the default `thumb-256`);
//! - `backlog`: `--backlog` uploads of 1024x768 JPEGs at 32 concurrent clients, on
//!   `--backlog-cpus`, against `vipsthumbnail` on the same files, one process per CPU;
//! - `video`: the default video job (4 representative frames, storyboard + WebVTT, preview,
//!   probe) on the 60 s 1080p fixture, one upload at a time, against the commands that make the
//!   same outputs: `ffprobe`, `ffmpegthumbnailer` for each frame, an `ffmpeg` keyframe-only pass
//!   for the sprite and an `ffmpeg` preview.
//!
//! Each run first sends one media through and waits for its result (the stages' consumer
//! groups form, as on a platform that has been serving); then the clock runs from the first upload to the last result on the stage's output topic (polled
//! by its size from this process, which runs outside `--cpus` when it can); then every media's
//! status is checked through the API. CPU time is read from `/proc` for `mediaflow` and for the
//! broker it starts. With `--perf`, `perf record` samples both during the run and the samples
//! are sorted into steps by their call stacks (see `STEPS`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use mediaflow_benches::{allowed_cpus, real_photos, synthetic_set};
use mediaflow_bus::{Bus, BusConfig};

struct Args {
    mediaflow: PathBuf,
    photos: PathBuf,
    videos: PathBuf,
    work: PathBuf,
    images: usize,
    clients: usize,
    cpus: String,
    backlog: usize,
    backlog_cpus: String,
    videos_n: usize,
    rounds: usize,
    perf: bool,
    only: Option<String>,
}

fn args() -> Result<Args> {
    let mut args = Args {
        mediaflow: PathBuf::new(),
        photos: PathBuf::new(),
        videos: PathBuf::new(),
        work: PathBuf::new(),
        images: 48,
        clients: 4,
        cpus: "0".into(),
        backlog: 1000,
        backlog_cpus: "0,1".into(),
        videos_n: 3,
        rounds: 3,
        perf: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--perf" {
            args.perf = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mediaflow" => args.mediaflow = value.into(),
            "--photos" => args.photos = value.into(),
            "--videos" => args.videos = value.into(),
            "--work" => args.work = value.into(),
            "--images" => args.images = value.parse()?,
            "--clients" => args.clients = value.parse()?,
            "--cpus" => args.cpus = value,
            "--backlog" => args.backlog = value.parse()?,
            "--backlog-cpus" => args.backlog_cpus = value,
            "--videos-n" => args.videos_n = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            "--only" => args.only = Some(value),
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(
        args.mediaflow.is_file() && args.photos.is_dir() && !args.work.as_os_str().is_empty(),
        "usage: platform --mediaflow BIN --photos DIR --videos DIR --work DIR [...]"
    );
    Ok(args)
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) `pid` has used so far, with its reaped children's.
fn cpu_seconds(pid: u32) -> Option<f64> {
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
struct Up {
    child: tokio::process::Child,
    pid: u32,
    broker: Option<u32>,
    gateway: String,
    bus: Bus,
    http: reqwest::Client,
}

impl Up {
    async fn start(bin: &Path, cpus: &str, dir: &Path) -> Result<Self> {
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
            // The upload pipeline alone, as in the runs BENCHMARKS.md records: the sign-up
            // flow's ten idle consumers would add broker polling to the measured overhead.
            .env(
                "MEDIAFLOW__PIPELINE",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines/default.yaml"),
            )
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
    fn cpu(&self) -> (f64, f64) {
        (
            cpu_seconds(self.pid).unwrap_or(0.0),
            self.broker.and_then(cpu_seconds).unwrap_or(0.0),
        )
    }

    /// Uploads `file` as a raw body; the media id.
    async fn upload(&self, file: &Path, content_type: &str) -> Result<String> {
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
    async fn upload_all(&self, files: &[PathBuf], clients: usize) -> Result<Vec<String>> {
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
    async fn wait_topic(&self, topic: &str, n: usize, limit: Duration) -> Result<Instant> {
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
    async fn check_done(&self, ids: &[String]) -> Result<()> {
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

    async fn stop(mut self) -> Result<()> {
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

/// The steps samples are sorted into. A sample belongs to the step of the innermost frame of its
/// call stack that names one of `STEPS` (what the work was for: a `memcpy` under the S3 client
/// is storing, a futex wake under the blocking pool's file read is too); a stack naming none
/// goes to the first of `MECHANISMS` it names, else `other`.
const STEPS: &[(&str, &[&str])] = &[
    ("hash (sha-256, md5)", &["sha2::", "md5::"]),
    (
        "decode",
        &[
            "mediaflow_imaging::jpeg::dc",
            "decompress",
            "Decompress",
            "zune_jpeg",
            "png::",
            "image::codecs",
            "decode_working",
            "libavcodec",
            "libavformat",
            "mediaflow_video",
        ],
    ),
    (
        "encode",
        &[
            "turbojpeg::compress",
            "tjCompress",
            "tj3Compress",
            "encode",
            "libwebp",
            "libsharpyuv",
        ],
    ),
    ("resize", &["resize", "libswscale"]),
    ("tags", &["mediaflow_imaging::tags"]),
    ("record (database)", &["sqlx", "sqlite3", "mediaflow_db"]),
    ("store (S3 client)", &["aws_", "mediaflow_store"]),
    ("store (embedded S3 server)", &["s3s"]),
    ("kafka (librdkafka)", &["rd_kafka", "rdkafka"]),
    (
        "receive (gateway)",
        &["mediaflow_gateway", "multer", "axum"],
    ),
    (
        "events (JSON, CloudEvents, CEL)",
        &["serde_json", "cloudevents", "jsonschema", "cel::"],
    ),
    ("stage runtime", &["mediaflow_runtime"]),
];

/// Where a sample's CPU went when its stack names no step.
const MECHANISMS: &[(&str, &[&str])] = &[
    ("http (hyper)", &["hyper", "h2::"]),
    ("blocking pool hops (tokio)", &["blocking::pool"]),
    ("async runtime (tokio)", &["tokio::"]),
    (
        "memory (malloc, copies)",
        &["malloc", "free", "memcpy", "memmove"],
    ),
];

fn classify(comm: &str, frames: &[&str]) -> &'static str {
    if comm.starts_with("rdk:") || comm.starts_with("producer") {
        return "kafka (librdkafka)";
    }
    for frame in frames {
        // `perf script` frames: address, symbol, (object).
        let sym = frame.split_once(' ').map_or(*frame, |(_, s)| s);
        if let Some((name, _)) = STEPS
            .iter()
            .find(|(_, pats)| pats.iter().any(|p| sym.contains(p)))
        {
            return name;
        }
    }
    MECHANISMS
        .iter()
        .find(|(_, pats)| frames.iter().any(|f| pats.iter().any(|p| f.contains(p))))
        .map_or("other", |(name, _)| name)
}

/// `perf record` on `pids` until stopped.
struct Perf {
    child: std::process::Child,
    data: PathBuf,
}

impl Perf {
    fn start(pids: &[u32], data: &Path) -> Result<Self> {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                "499",
                "-g",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ])
            .arg(data)
            .arg("-p")
            .arg(pids.join(","))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf (Debian package linux-perf)")?;
        Ok(Self {
            child,
            data: data.to_owned(),
        })
    }

    /// Stops recording and sorts the samples into steps: (process, step) -> samples.
    fn finish(mut self, broker: Option<u32>) -> Result<BTreeMap<(String, String), usize>> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.child.wait()?;
        let out = Command::new("perf")
            .args(["script", "--no-inline", "-F", "comm,pid,ip,sym,dso", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()?;
        ensure!(out.status.success(), "perf script failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut steps = BTreeMap::new();
        for sample in text.split("\n\n") {
            let mut lines = sample.lines().filter(|l| !l.trim().is_empty());
            let Some(header) = lines.next() else { continue };
            let mut fields = header.split_whitespace();
            let comm = fields.next().unwrap_or("?").to_owned();
            let pid: Option<u32> = fields.next().and_then(|p| p.parse().ok());
            // By process id: the broker's threads are tokio workers too.
            let process = if pid.is_some() && pid == broker {
                "broker".to_owned()
            } else {
                "mediaflow".to_owned()
            };
            let frames: Vec<&str> = lines.collect();
            let step = if process == "broker" {
                "broker".to_owned()
            } else {
                classify(&comm, &frames).to_owned()
            };
            *steps.entry((process, step)).or_insert(0) += 1;
        }
        Ok(steps)
    }
}

/// What one run through the platform measured.
struct Run {
    uploads: Duration,
    total: Duration,
    cpu_mediaflow: f64,
    cpu_broker: f64,
    steps: Option<BTreeMap<(String, String), usize>>,
}

async fn through_platform(
    args: &Args,
    name: &str,
    cpus: &str,
    files: &[PathBuf],
    clients: usize,
    topic: &str,
    sequential: bool,
) -> Result<Run> {
    let dir = args.work.join(format!("data-{name}"));
    let up = Up::start(&args.mediaflow, cpus, &dir).await?;
    // A warm-up media through the same stages, outside the clock: the stages' consumer groups
    // form (the broker waits for members before it assigns partitions) and caches fill, as on
    // a platform that has been serving for a while.
    up.upload_all(&files[..1], 1).await?;
    up.wait_topic(topic, 1, Duration::from_secs(120)).await?;
    let base = usize::try_from(up.bus.message_count(topic).await?)?;
    let perf = if args.perf {
        let mut pids = vec![up.pid];
        pids.extend(up.broker);
        Some(Perf::start(
            &pids,
            &args.work.join(format!("perf-{name}.data")),
        )?)
    } else {
        None
    };
    let (m0, b0) = up.cpu();
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut uploads = Duration::ZERO;
    if sequential {
        for (i, f) in files.iter().enumerate() {
            ids.extend(up.upload_all(std::slice::from_ref(f), 1).await?);
            up.wait_topic(topic, base + i + 1, Duration::from_secs(600))
                .await?;
        }
    } else {
        ids = up.upload_all(files, clients).await?;
        uploads = start.elapsed();
        up.wait_topic(topic, base + files.len(), Duration::from_secs(1800))
            .await?;
    }
    let total = start.elapsed();
    let (m1, b1) = up.cpu();
    let steps = perf.map(|p| p.finish(up.broker)).transpose()?;
    up.check_done(&ids).await?;
    up.stop().await?;
    Ok(Run {
        uploads,
        total,
        cpu_mediaflow: m1 - m0,
        cpu_broker: b1 - b0,
        steps,
    })
}

/// `vipsthumbnail` over `files` split over one process per CPU of `cpus`, each pinned; wall
/// time.
fn vips(files: &[PathBuf], cpus: &str, out: &Path) -> Result<Duration> {
    std::fs::create_dir_all(out)?;
    let cpu_list: Vec<&str> = cpus.split(',').collect();
    let start = Instant::now();
    let mut children = Vec::new();
    for (i, cpu) in cpu_list.iter().enumerate() {
        let part: Vec<&PathBuf> = files.iter().skip(i).step_by(cpu_list.len()).collect();
        children.push(
            Command::new("taskset")
                .args(["-c", cpu, "vipsthumbnail", "--size", "256x256>", "-o"])
                .arg(format!("{}/%s.jpg[Q=85]", out.display()))
                .args(part)
                .spawn()
                .context("running vipsthumbnail (Debian package libvips-tools)")?,
        );
    }
    for mut c in children {
        let status = c.wait()?;
        ensure!(status.success(), "vipsthumbnail failed: {status}");
    }
    Ok(start.elapsed())
}

fn print_run(label: &str, n: usize, run: &Run) {
    let per = |s: f64| s * 1000.0 / n as f64;
    println!(
        "  {label}: {n} media in {:.2} s ({:.1} media/s; uploads accepted in {:.2} s); CPU per media: mediaflow {:.1} ms, broker {:.1} ms",
        run.total.as_secs_f64(),
        n as f64 / run.total.as_secs_f64(),
        run.uploads.as_secs_f64(),
        per(run.cpu_mediaflow),
        per(run.cpu_broker),
    );
    if let Some(steps) = &run.steps {
        let total: usize = steps.values().sum();
        let cpu = run.cpu_mediaflow + run.cpu_broker;
        println!("    CPU by step (perf samples, share of both processes' CPU; ms per media):");
        let mut rows: Vec<_> = steps.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1));
        for ((process, step), count) in rows {
            let share = *count as f64 / total.max(1) as f64;
            println!(
                "      {process:<10} {step:<38} {:>5.1}%  {:>7.1} ms",
                share * 100.0,
                per(cpu * share)
            );
        }
    }
}

async fn images(args: &Args) -> Result<()> {
    let photos = real_photos(&args.photos)?;
    let files = synthetic_set(&photos, &args.work.join("synthetic"), args.images)?;
    println!(
        "images: {} synthetic 12 MP JPEGs (4000x3000), {} clients; mediaflow up and vipsthumbnail on CPUs {}",
        files.len(),
        args.clients,
        args.cpus
    );
    against_vips(args, "images", &args.cpus, &files, &files, args.clients).await
}

async fn backlog(args: &Args) -> Result<()> {
    let photos = real_photos(&args.photos)?;
    let dir = args.work.join("small");
    std::fs::create_dir_all(&dir)?;
    let mut distinct = Vec::new();
    for (i, p) in photos.iter().enumerate() {
        let path = dir.join(format!("small-{i}.jpg"));
        if !path.is_file() {
            mediaflow_benches::synthetic_photo(p, 256, (1024, 768), i as u64 + 7, &path)?;
        }
        distinct.push(path);
    }
    // Every upload is its own media item; the bytes repeat.
    let files: Vec<PathBuf> = distinct
        .iter()
        .cycle()
        .take(args.backlog)
        .cloned()
        .collect();
    println!(
        "backlog: {} uploads of 1024x768 JPEGs at 32 clients; mediaflow up and vipsthumbnail on CPUs {}",
        files.len(),
        args.backlog_cpus
    );
    // vipsthumbnail names outputs by input name: give it the same number of distinct files.
    let vips_in = args.work.join("small-vips");
    std::fs::create_dir_all(&vips_in)?;
    let mut vips_files = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let p = vips_in.join(format!("s{i}.jpg"));
        if !p.is_file() {
            std::fs::copy(f, &p)?;
        }
        vips_files.push(p);
    }
    against_vips(args, "backlog", &args.backlog_cpus, &files, &vips_files, 32).await
}

/// `--rounds` rounds, each one `vipsthumbnail` batch over `vips_files` and one run of the
/// platform over `files` (alternating, so that both see the machine's drift alike); prints each
/// round and the medians.
async fn against_vips(
    args: &Args,
    name: &str,
    cpus: &str,
    files: &[PathBuf],
    vips_files: &[PathBuf],
    clients: usize,
) -> Result<()> {
    let n = files.len();
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        let v = vips(
            vips_files,
            cpus,
            &args.work.join(format!("out-vips-{name}")),
        )?;
        let run =
            through_platform(args, name, cpus, files, clients, "images.processed", false).await?;
        println!(
            "  round {round}: vipsthumbnail batch: {n} in {:.2} s ({:.1} images/s)",
            v.as_secs_f64(),
            n as f64 / v.as_secs_f64()
        );
        print_run("mediaflow up", n, &run);
        ours.push(n as f64 / run.total.as_secs_f64());
        theirs.push(n as f64 / v.as_secs_f64());
        ratios.push(v.as_secs_f64() / run.total.as_secs_f64());
    }
    println!(
        "  median of {} rounds: mediaflow {:.1} media/s, vipsthumbnail {:.1} images/s, ratio (mediaflow end to end / vipsthumbnail) {:.2}x",
        ratios.len(),
        median_of(&mut ours),
        median_of(&mut theirs),
        median_of(&mut ratios)
    );
    Ok(())
}

fn median_of(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The commands that make the default video job's outputs: probe, 4 frames at 320 px, a
/// storyboard sprite of keyframes at 160 px, a 3 s preview at 8 fps, 320 px, WebP. Wall time.
fn video_peer(video: &Path, cpus: &str, out: &Path) -> Result<Duration> {
    std::fs::create_dir_all(out)?;
    let run = |cmd: &mut Command| -> Result<()> {
        let status = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running {cmd:?}"))?;
        ensure!(status.success(), "{cmd:?} failed: {status}");
        Ok(())
    };
    let pinned = |prog: &str| {
        let mut c = Command::new("taskset");
        c.args(["-c", cpus, prog]);
        c
    };
    let start = Instant::now();
    run(pinned("ffprobe")
        .args([
            "-v",
            "error",
            "-show_format",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(video))?;
    for (i, pct) in [20, 40, 60, 80].iter().enumerate() {
        run(pinned("ffmpegthumbnailer")
            .arg("-i")
            .arg(video)
            .arg("-o")
            .arg(out.join(format!("frame-{i}.jpg")))
            .args(["-s", "320", "-q", "8", "-t", &format!("{pct}%")]))?;
    }
    run(pinned("ffmpeg")
        .args(["-y", "-v", "error", "-skip_frame", "nokey", "-i"])
        .arg(video)
        .args([
            "-vsync",
            "vfr",
            "-vf",
            "scale=160:-2,tile=10x2",
            "-frames:v",
            "1",
            "-q:v",
            "3",
        ])
        .arg(out.join("storyboard.jpg")))?;
    run(pinned("ffmpeg")
        .args(["-y", "-v", "error", "-ss", "20", "-t", "3", "-i"])
        .arg(video)
        .args(["-vf", "fps=8,scale=320:-2", "-loop", "0", "-an"])
        .arg(out.join("preview.webp")))?;
    Ok(start.elapsed())
}

async fn video(args: &Args) -> Result<()> {
    let video = args.videos.join("synthetic-1080p-60s.mp4");
    ensure!(
        video.is_file(),
        "no {} (./x setup makes it)",
        video.display()
    );
    // Distinct copies: each upload is a video of its own.
    let files: Vec<PathBuf> = vec![video.clone(); args.videos_n];
    println!(
        "video: the default job on synthetic-1080p-60s.mp4 (60 s, 1080p H.264, a keyframe every 5 s), {} uploads one after another; CPUs {}",
        files.len(),
        args.cpus
    );
    let mut peer = Vec::new();
    for _ in 0..files.len() {
        peer.push(video_peer(
            &video,
            &args.cpus,
            &args.work.join("out-video-peer"),
        )?);
    }
    peer.sort();
    let peer = peer[peer.len() / 2];
    let run = through_platform(
        args,
        "video",
        &args.cpus,
        &files,
        1,
        "videos.processed",
        true,
    )
    .await?;
    let n = files.len();
    println!(
        "  ffprobe + 4 ffmpegthumbnailer + ffmpeg keyframe sprite + ffmpeg preview: {:.2} s per video (median)",
        peer.as_secs_f64()
    );
    print_run("mediaflow up", n, &run);
    println!(
        "  mediaflow: {:.2} s per video, upload to result; ratio (peer / mediaflow) {:.2}x",
        run.total.as_secs_f64() / n as f64,
        peer.as_secs_f64() * n as f64 / run.total.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    std::fs::create_dir_all(&args.work)?;
    println!(
        "platform end to end: {} (release), this process on CPUs {}",
        args.mediaflow.display(),
        allowed_cpus()
    );
    let only = args.only.as_deref();
    if only.is_none_or(|o| o == "images") {
        images(&args).await?;
    }
    if only.is_none_or(|o| o == "backlog") {
        backlog(&args).await?;
    }
    if only.is_none_or(|o| o == "video") {
        video(&args).await?;
    }
    let _ = std::fs::remove_dir_all(args.work.join(SET_ASIDE));
    Ok(())
}

/// Where earlier runs' data folders wait until every measurement is over.
const SET_ASIDE: &str = "set-aside";

/// Moves the folder `dir` (an earlier run's data) out of the way without deleting it. Files
/// deleted just before a run make the files the run creates dearer: ext4 without a journal,
/// as on the machines here, skips over inodes freed in the last minutes one by one when it
/// allocates one (`recently_deleted`), and the platform creates several files per media where
/// vipsthumbnail rewrites its outputs in place. They are deleted when every scenario is done.
fn set_aside(dir: &Path) -> Result<()> {
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

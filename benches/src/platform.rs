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
use mediaflow_benches::up::{SET_ASIDE, Up};
use mediaflow_benches::{allowed_cpus, real_photos, synthetic_set};

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
    let up = Up::start(&args.mediaflow, cpus, &dir, &default_pipeline()).await?;
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

/// The upload pipeline alone, as in the runs BENCHMARKS.md records: the sign-up flow's and the
/// tagging pipeline's idle consumers would add broker polling to the measured overhead.
fn default_pipeline() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pipelines/default.yaml"
    ))
}

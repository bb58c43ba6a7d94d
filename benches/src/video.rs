//! Video thumbnails: mediaflow's video kernel against `ffmpegthumbnailer` and the `ffmpeg`
//! command line, for the same videos, the same times and the same size, in the same run.
//!
//! usage: video_thumbnails --videos DIR --work DIR [--count 10] [--size 320] [--rounds 3]
//!
//! For each video, `count` times evenly spaced over it (whole seconds, which every tool takes
//! alike). mediaflow opens the video once and writes `count` JPEGs, as the video stage does;
//! the peers are run once per thumbnail, as they are used: `ffmpegthumbnailer -t hh:mm:ss`, and
//! `ffmpeg -ss T -i ...` (input seeking: fast, and accurate by default) and the same with
//! `-noaccurate_seek` (keyframe). mediaflow is measured in keyframe and in accurate mode; each
//! is compared with the peer that does the same. CPU pinning is the caller's (`./x bench` runs
//! this under `taskset`); the peers inherit it. SSIM (ffmpeg's filter) of mediaflow's accurate
//! thumbnails against ffmpeg's accurate ones shows that both took the same frames.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mediaflow_benches::{allowed_cpus, median, ssim};
use mediaflow_video::select::{Offset, Strategy, select};
use mediaflow_video::{Limits, Seek, Video};

const VIDEOS: &[&str] = &[
    "synthetic-1080p-60s.mp4",
    "bigbuckbunny.mp4",
    "bikes.mp4",
    "carphone_pristine.mp4",
];
/// JPEG quality on our side and ffmpeg's (`-q:v 3` is about 80); ffmpegthumbnailer's `-q 8`.
const QUALITY: u8 = 80;

struct Args {
    videos: PathBuf,
    work: PathBuf,
    count: u32,
    size: u32,
    rounds: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        videos: PathBuf::new(),
        work: PathBuf::new(),
        count: 10,
        size: 320,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--videos" => args.videos = value.into(),
            "--work" => args.work = value.into(),
            "--count" => args.count = value.parse()?,
            "--size" => args.size = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    ensure!(
        !args.videos.as_os_str().is_empty() && !args.work.as_os_str().is_empty(),
        "usage: video_thumbnails --videos DIR --work DIR [--count 10] [--size 320] [--rounds 3]"
    );
    Ok(args)
}

fn clear(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// mediaflow: open once, `times.len()` JPEGs fitting in `size` x `size`.
fn mediaflow(video: &Path, times: &[u64], size: u32, seek: Seek, out: &Path) -> Result<Duration> {
    clear(out)?;
    let start = Instant::now();
    let mut v = Video::open(video, &Limits::default())?;
    let strategy = Strategy::Offsets {
        at: times.iter().map(|&t| Offset::Seconds(t as f64)).collect(),
    };
    for (i, p) in select(&mut v, &strategy, seek)?.iter().enumerate() {
        let jpeg = mediaflow_video::encode::jpeg(&p.fit(size, size)?, QUALITY)?;
        std::fs::write(out.join(format!("{i:02}.jpg")), jpeg)?;
    }
    Ok(start.elapsed())
}

fn clock(t: u64) -> String {
    format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
}

fn run(command: &mut Command) -> Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `ffmpegthumbnailer` once per time.
fn ffmpegthumbnailer(video: &Path, times: &[u64], size: u32, out: &Path) -> Result<Duration> {
    clear(out)?;
    let start = Instant::now();
    for (i, &t) in times.iter().enumerate() {
        run(Command::new("ffmpegthumbnailer")
            .arg("-i")
            .arg(video)
            .arg("-o")
            .arg(out.join(format!("{i:02}.jpg")))
            .args(["-s", &size.to_string(), "-t", &clock(t), "-q", "8"]))?;
    }
    Ok(start.elapsed())
}

/// `ffmpeg -ss T -i VIDEO` once per time; `accurate: false` adds `-noaccurate_seek`.
fn ffmpeg(video: &Path, times: &[u64], size: u32, accurate: bool, out: &Path) -> Result<Duration> {
    clear(out)?;
    let start = Instant::now();
    for (i, &t) in times.iter().enumerate() {
        let mut c = Command::new("ffmpeg");
        c.args(["-nostdin", "-loglevel", "error", "-y"]);
        if !accurate {
            c.arg("-noaccurate_seek");
        }
        c.args(["-ss", &t.to_string(), "-i"])
            .arg(video)
            .args(["-frames:v", "1", "-q:v", "3", "-vf"])
            .arg(format!(
                "scale='if(gt(iw,ih),min({size},iw),-2)':'if(gt(iw,ih),-2,min({size},ih))'"
            ))
            .arg(out.join(format!("{i:02}.jpg")));
        run(&mut c)?;
    }
    Ok(start.elapsed())
}

fn main() -> Result<()> {
    let args = args()?;
    println!(
        "{} thumbnails per video, fitting {size}x{size}, median of {} rounds, CPUs allowed: {}",
        args.count,
        args.rounds,
        allowed_cpus(),
        size = args.size
    );
    println!(
        "{:<26} {:>9} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7} | {:>9} {:>7} | {:>8}",
        "video",
        "size",
        "mf key ms",
        "ffm nas",
        "ratio",
        "mf acc ms",
        "ffm -ss",
        "ratio",
        "ffmthumb",
        "ratio",
        "SSIM min"
    );
    for name in VIDEOS {
        let video = args.videos.join(name);
        ensure!(
            video.is_file(),
            "{} is missing (./x setup makes it)",
            video.display()
        );
        let probe = Video::open(&video, &Limits::default())?.probe().clone();
        let d = probe.duration_s;
        let n = u64::from(args.count);
        let times: Vec<u64> = (1..=n)
            .map(|i| (d * i as f64 / (n + 1) as f64) as u64)
            .collect();
        let w = args.work.join(name);
        let (o_key, o_acc, o_nas, o_ss, o_ft) = (
            w.join("mediaflow-keyframe"),
            w.join("mediaflow-accurate"),
            w.join("ffmpeg-noaccurate"),
            w.join("ffmpeg-ss"),
            w.join("ffmpegthumbnailer"),
        );
        let key = median(args.rounds, || {
            mediaflow(&video, &times, args.size, Seek::Keyframe, &o_key)
        })?;
        let acc = median(args.rounds, || {
            mediaflow(&video, &times, args.size, Seek::Accurate, &o_acc)
        })?;
        let nas = median(args.rounds, || {
            ffmpeg(&video, &times, args.size, false, &o_nas)
        })?;
        let ss = median(args.rounds, || {
            ffmpeg(&video, &times, args.size, true, &o_ss)
        })?;
        let ft = median(args.rounds, || {
            ffmpegthumbnailer(&video, &times, args.size, &o_ft)
        })?;
        let mut min_ssim = f64::INFINITY;
        for i in 0..times.len() {
            let f = format!("{i:02}.jpg");
            min_ssim = min_ssim.min(ssim(&o_acc.join(&f), &o_ss.join(&f))?);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let ratio = |peer: Duration, ours: Duration| peer.as_secs_f64() / ours.as_secs_f64();
        println!(
            "{name:<26} {:>9} | {:>9.0} {:>9.0} {:>6.2}x | {:>9.0} {:>9.0} {:>6.2}x | {:>9.0} {:>6.2}x | {min_ssim:>8.4}",
            format!("{}x{}", probe.video.width, probe.video.height),
            ms(key),
            ms(nas),
            ratio(nas, key),
            ms(acc),
            ms(ss),
            ratio(ss, acc),
            ms(ft),
            ratio(ft, key),
        );
    }
    println!(
        "ratio = peer time / mediaflow time. key: keyframe seeking, vs ffmpeg -noaccurate_seek and \
         ffmpegthumbnailer (which also takes keyframes); acc: accurate, vs ffmpeg -ss before -i."
    );
    Ok(())
}

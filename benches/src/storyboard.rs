//! Storyboards: the video stage's storyboard (default settings: 160 px tiles, one every second,
//! keyframes) against the `ffmpeg` command line making a sprite of the same tiles, in the same
//! run.
//!
//! usage: storyboard --videos DIR --work DIR [--rounds 3]
//!
//! Sides, each writing one JPEG sprite:
//! - mediaflow, `seek = "keyframe"` (the default): one tile per keyframe where keyframes are
//!   farther apart than a second, else one per second; only keyframes are decoded;
//! - mediaflow, `seek = "accurate"`: the exact frame at each second's middle;
//! - `ffmpeg -skip_frame nokey ... tile`: a keyframe-only pass, every keyframe a tile (the
//!   cheapest sprite ffmpeg makes);
//! - `ffmpeg ... fps=1,...,tile`: every frame decoded, one tile a second (what mediaflow's
//!   accurate mode stands for).
//!
//! CPU pinning is the caller's (`./x bench` runs this under `taskset`); ffmpeg inherits it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mediaflow_benches::{allowed_cpus, median};
use mediaflow_video::storyboard::{StoryboardSpec, storyboard};
use mediaflow_video::{Limits, Seek, Video};

const VIDEOS: &[&str] = &["synthetic-1080p-60s.mp4", "bigbuckbunny.mp4", "bikes.mp4"];

fn ours(video: &Path, seek: Seek, out: &Path) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let mut v = Video::open(video, &Limits::default())?;
    let board = storyboard(
        &mut v,
        &StoryboardSpec {
            seek,
            ..StoryboardSpec::default()
        },
    )?;
    std::fs::write(out, &board.sprite)?;
    Ok((start.elapsed(), board.tiles.len()))
}

fn ffmpeg(video: &Path, keyframes_only: bool, tiles: usize, out: &Path) -> Result<Duration> {
    let rows = tiles.div_ceil(10).max(1);
    let start = Instant::now();
    let mut c = Command::new("ffmpeg");
    c.args(["-nostdin", "-loglevel", "error", "-y"]);
    if keyframes_only {
        c.args(["-skip_frame", "nokey"]);
    }
    c.arg("-i").arg(video);
    let filter = if keyframes_only {
        format!("scale=160:-2,tile=10x{rows}")
    } else {
        format!("fps=1,scale=160:-2,tile=10x{rows}")
    };
    c.args(["-an", "-fps_mode", "passthrough", "-vf", &filter])
        .args(["-frames:v", "1", "-q:v", "5"])
        .arg(out);
    let output = c.output().context("running ffmpeg")?;
    ensure!(
        output.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(start.elapsed())
}

fn main() -> Result<()> {
    let (mut videos, mut work, mut rounds) = (PathBuf::new(), PathBuf::new(), 3usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--videos" => videos = value.into(),
            "--work" => work = value.into(),
            "--rounds" => rounds = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    ensure!(
        !videos.as_os_str().is_empty() && !work.as_os_str().is_empty(),
        "usage: storyboard --videos DIR --work DIR [--rounds 3]"
    );
    std::fs::create_dir_all(&work)?;
    println!(
        "storyboards (160 px tiles, 1 s interval), median of {rounds} rounds, CPUs allowed: {}",
        allowed_cpus()
    );
    println!(
        "{:<26} {:>8} {:>8} {:>11} {:>12} {:>11} {:>12} {:>12}",
        "video",
        "keyframe",
        "tiles",
        "ffmpeg key",
        "ratio (key)",
        "accurate",
        "ffmpeg fps=1",
        "ratio (acc)"
    );
    for name in VIDEOS {
        let video = videos.join(name);
        let sprite = |side: &str| work.join(format!("{name}.{side}.jpg"));
        let mut tiles = 0;
        let key = median(rounds, || {
            let (took, n) = ours(&video, Seek::Keyframe, &sprite("keyframe"))?;
            tiles = n;
            Ok(took)
        })?;
        let accurate = median(rounds, || {
            Ok(ours(&video, Seek::Accurate, &sprite("accurate"))?.0)
        })?;
        let ff_key = median(rounds, || {
            ffmpeg(&video, true, tiles, &sprite("ffmpeg-key"))
        })?;
        let seconds = Video::open(&video, &Limits::default())?
            .probe()
            .duration_s
            .ceil() as usize;
        let ff_fps = median(rounds, || {
            ffmpeg(&video, false, seconds.min(100), &sprite("ffmpeg-fps"))
        })?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<26} {:>6.0}ms {:>8} {:>9.0}ms {:>11.2}x {:>9.0}ms {:>10.0}ms {:>11.2}x",
            name,
            ms(key),
            tiles,
            ms(ff_key),
            ms(ff_key) / ms(key),
            ms(accurate),
            ms(ff_fps),
            ms(ff_fps) / ms(accurate)
        );
    }
    Ok(())
}

//! Thumbnail throughput: mediaflow's thumbnailer against `vipsthumbnail`, on the same photos, at
//! the same output size and JPEG quality, in the same run.
//!
//! usage: thumbnails --photos DIR --work DIR [--size 256] [--rounds 5] [--synthetic 24]
//!
//! Both sides read each photo from disk and write a JPEG thumbnail to disk. mediaflow runs in
//! process, on the image stage's own path (`mediaflow_imaging::thumbnail`: `renditions::process`
//! with one rendition, which also computes the tags the stage stores); `vipsthumbnail` gets every photo of a set in one invocation, so its start-up is paid
//! once per round of at least 24 photos (small sets are cycled). CPU pinning is the caller's (`./x bench` runs this under `taskset`), and
//! `vipsthumbnail` inherits it. Prints one line per photo set with both rates and their ratio,
//! and how alike the two sides' thumbnails are (SSIM by ffmpeg's `ssim` filter).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mediaflow_benches::{allowed_cpus, median, real_photos, ssim, synthetic_photo, synthetic_set};
use mediaflow_imaging::DecodeLimits;

struct Args {
    photos: PathBuf,
    work: PathBuf,
    size: u32,
    rounds: usize,
    synthetic: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        photos: PathBuf::new(),
        work: PathBuf::new(),
        size: 256,
        rounds: 5,
        synthetic: 24,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--photos" => args.photos = value.into(),
            "--work" => args.work = value.into(),
            "--size" => args.size = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            "--synthetic" => args.synthetic = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(
        args.photos.is_dir() && !args.work.as_os_str().is_empty(),
        "usage: thumbnails --photos DIR --work DIR [--size N] [--rounds N] [--synthetic N]"
    );
    Ok(args)
}

/// Photos per timed round at least.
const MIN_FILES: usize = 24;

/// Quality both sides encode with.
const QUALITY: u8 = mediaflow_imaging::jpeg::JPEG_QUALITY;

/// One round of mediaflow over `files`: read, thumbnail, write.
fn mediaflow_round(files: &[PathBuf], out: &Path, size: u32) -> Result<Duration> {
    let limits = DecodeLimits::default();
    let start = Instant::now();
    for f in files {
        let bytes = std::fs::read(f)?;
        let thumb = mediaflow_imaging::thumbnail(&bytes, size, &limits)
            .with_context(|| format!("thumbnail of {}", f.display()))?;
        let name = f.file_stem().unwrap_or_default().to_string_lossy();
        std::fs::write(out.join(format!("{name}.jpg")), &thumb.bytes)?;
    }
    Ok(start.elapsed())
}

/// One round of `vipsthumbnail` over `files`, in one invocation.
fn vips_round(files: &[PathBuf], out: &Path, size: u32) -> Result<Duration> {
    let start = Instant::now();
    // `>`: shrink only, as mediaflow never enlarges a photo.
    let status = Command::new("vipsthumbnail")
        .arg("--size")
        .arg(format!("{size}x{size}>"))
        .arg("-o")
        .arg(format!("{}/%s.jpg[Q={QUALITY}]", out.display()))
        .args(files)
        .status()
        .context("running vipsthumbnail (Debian package libvips-tools)")?;
    ensure!(status.success(), "vipsthumbnail failed: {status}");
    Ok(start.elapsed())
}

/// Peak resident memory of this process so far, in KiB (`VmHWM`).
fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// `thumbnails --rss FILE`: makes one thumbnail of FILE as the image stage does (the whole file
/// in memory, then `thumbnail`) and prints the process's peak RSS in KiB.
fn rss_child(file: &Path, size: u32) -> Result<()> {
    let bytes = std::fs::read(file)?;
    let thumb = mediaflow_imaging::thumbnail(&bytes, size, &DecodeLimits::default())?;
    println!(
        "{} {}x{}",
        peak_rss_kib().unwrap_or(0),
        thumb.width,
        thumb.height
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("--rss") {
        let file = raw.next().context("--rss FILE")?;
        return rss_child(Path::new(&file), 256);
    }
    let args = args()?;
    let real = real_photos(&args.photos)?;
    let synthetic = synthetic_set(&real, &args.work.join("synthetic"), args.synthetic)?;
    let real_jpegs: Vec<PathBuf> = real
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg")))
        .cloned()
        .collect();

    let cpus = allowed_cpus();
    println!(
        "thumbnails {} px, JPEG quality {QUALITY}, median of {} rounds, CPUs allowed: {cpus}",
        args.size, args.rounds
    );
    println!(
        "{:<34} {:>6} {:>12} {:>16} {:>7} {:>9} {:>9}",
        "photos", "files", "mediaflow/s", "vipsthumbnail/s", "ratio", "min SSIM", "mean SSIM"
    );
    for (name, set) in [
        ("synthetic 12 MP JPEG (4000x3000)", &synthetic),
        ("real JPEG (scikit-image)", &real_jpegs),
        ("real JPEG + PNG (scikit-image)", &real),
    ] {
        if set.is_empty() {
            continue;
        }
        // Small sets are cycled to MIN_FILES, so that vipsthumbnail's start-up is spread over
        // as many photos as on the synthetic set instead of dominating.
        let files: &Vec<PathBuf> = &set
            .iter()
            .cycle()
            .take(set.len().max(MIN_FILES))
            .cloned()
            .collect();
        let ours = args.work.join("out-mediaflow");
        let theirs = args.work.join("out-vips");
        std::fs::create_dir_all(&ours)?;
        std::fs::create_dir_all(&theirs)?;
        let m = median(args.rounds, || mediaflow_round(files, &ours, args.size))?;
        let v = median(args.rounds, || vips_round(files, &theirs, args.size))?;
        let rate = |d: Duration| files.len() as f64 / d.as_secs_f64();
        // Do the thumbnails look the same? Each of ours against vips's of the same photo.
        let mut scores = Vec::new();
        for f in set {
            let name = format!(
                "{}.jpg",
                f.file_stem().unwrap_or_default().to_string_lossy()
            );
            scores.push(ssim(&ours.join(&name), &theirs.join(&name))?);
        }
        let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        println!(
            "{name:<34} {:>6} {:>12.1} {:>16.1} {:>6.2}x {min:>9.4} {mean:>9.4}",
            files.len(),
            rate(m),
            rate(v),
            v.as_secs_f64() / m.as_secs_f64()
        );
    }

    // Memory: one thumbnail of a 100 MP JPEG in a fresh process.
    let big = args.work.join("synthetic").join("synthetic-100mp.jpg");
    if !big.is_file() {
        // A 100 MP (10000x10000) photo, made like the 12 MP ones.
        synthetic_photo(&real[0], 1000, (10_000, 10_000), 100, &big)?;
    }
    let out = Command::new(std::env::current_exe()?)
        .arg("--rss")
        .arg(&big)
        .output()?;
    ensure!(
        out.status.success(),
        "thumbnail of the 100 MP JPEG failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let kib: u64 = fields.next().context("no RSS")?.parse()?;
    println!(
        "peak RSS making a {} thumbnail of a 100 MP JPEG (10000x10000, {:.1} MB): {:.1} MiB",
        fields.next().unwrap_or("?"),
        std::fs::metadata(&big)?.len() as f64 / 1e6,
        kib as f64 / 1024.0
    );
    Ok(())
}

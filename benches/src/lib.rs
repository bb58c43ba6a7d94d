//! What the benchmark programs share: timing, the CPUs they may use, and image similarity
//! measured by a tool nobody here wrote.

pub mod up;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mediaflow_imaging::jpeg::resize_rgb;

/// SSIM ("All", over Y, U and V) of two images by ffmpeg's `ssim` filter.
pub fn ssim(a: &Path, b: &Path) -> Result<f64> {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostats", "-i"])
        .arg(a)
        .arg("-i")
        .arg(b)
        .args(["-lavfi", "ssim", "-f", "null", "-"])
        .output()
        .context("running ffmpeg (Debian package ffmpeg)")?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.split("All:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no SSIM in ffmpeg's output: {text}"))
}

/// The median of `rounds` runs of `f`, after one warm-up run.
pub fn median(rounds: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    f()?;
    let mut times = (0..rounds.max(1))
        .map(|_| f())
        .collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[times.len() / 2])
}

/// The CPUs this process may run on (`taskset` sets them), as Linux lists them.
pub fn allowed_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_owned())
            })
        })
        .unwrap_or_default()
}

/// Deterministic noise (a 64-bit LCG), so every run makes the same synthetic photos.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

/// A camera-like JPEG of `size` made from a real photo: a `view` x `view` copy of it upscaled
/// with Lanczos3, with sensor-like grain added so that it carries a camera photo's entropy
/// (about 3 MB at 12 MP), encoded at quality 90 with 4:2:0 chroma subsampling.
pub fn synthetic_photo(
    source: &Path,
    view: u32,
    (w, h): (u32, u32),
    seed: u64,
    out: &Path,
) -> Result<()> {
    let small = image::open(source)
        .with_context(|| format!("opening {}", source.display()))?
        .resize_exact(view, view, image::imageops::FilterType::Triangle)
        .to_rgb8();
    let mut pixels = resize_rgb(small.into_raw(), (view, view), (w, h))?;
    let mut rng = Lcg(seed);
    for p in &mut pixels {
        let grain = i16::from(rng.next() % 25) - 12;
        *p = (i16::from(*p) + grain).clamp(0, 255) as u8;
    }
    let jpeg = turbojpeg::compress(
        turbojpeg::Image {
            pixels: pixels.as_slice(),
            width: w as usize,
            pitch: w as usize * 3,
            height: h as usize,
            format: turbojpeg::PixelFormat::RGB,
        },
        90,
        turbojpeg::Subsamp::Sub2x2,
    )?;
    std::fs::write(out, &*jpeg)?;
    Ok(())
}

/// Makes `n` synthetic photos in `dir` (once; kept for later runs) from the real `photos`.
pub fn synthetic_set(photos: &[PathBuf], dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for i in 0..n {
        let path = dir.join(format!("synthetic-12mp-{i}.jpg"));
        if !path.is_file() {
            synthetic_photo(
                &photos[i % photos.len()],
                512,
                (4000, 3000),
                i as u64 + 1,
                &path,
            )?;
        }
        out.push(path);
    }
    Ok(out)
}

/// The JPEG and PNG photos in `dir`, sorted by name; an error when there are none.
pub fn real_photos(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut real: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("png"))
        })
        .collect();
    real.sort();
    ensure!(!real.is_empty(), "no photos in {}", dir.display());
    Ok(real)
}

//! What the benchmark programs share: timing, the CPUs they may use, and image similarity
//! measured by a tool nobody here wrote.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

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

